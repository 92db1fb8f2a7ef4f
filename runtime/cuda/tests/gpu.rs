//! Running packages on a GPU: hand-written PTX kernels assembled with ptxas and packed with
//! fatbinary, loaded through the manifest, run through plans directly and through CUDA
//! graphs, and timed. Every test needs a GPU: each is `#[ignore]`d with that reason, so a
//! machine without one reports them as ignored (never as passed); run them where there is
//! one with `cargo test -- --include-ignored` (scripts/gpu-check.sh does).

mod common;

use std::sync::Arc;

use common::*;
use kiln_cuda::{CudaError, CudaPackage, CudaProgram, KernelArg, ProgramOptions, WARMUP_RUNS};
use kiln_ir::{DType, Tensor};

fn program(package: &Arc<CudaPackage>, function: &str) -> CudaProgram {
    CudaProgram::with_options(package.clone(), function, ProgramOptions::default())
        .unwrap_or_else(|error| panic!("{error}"))
}

fn elementwise(a: &[f32], b: &[f32], op: fn(f32, f32) -> f32) -> Vec<f32> {
    a.iter().zip(b).map(|(&x, &y)| op(x, y)).collect()
}

fn values(tensor: &Tensor) -> Vec<f32> {
    tensor.as_f32().expect("an f32 tensor").to_vec()
}

#[test]
#[ignore = "needs an NVIDIA GPU; run with --include-ignored on a machine with one"]
fn vector_add_runs_from_a_package_directory() {
    let device = gpu();
    let package = test_package(&device);
    let mut add = program(&package, "vector_add");
    for n in [1000usize, 1, 128, 4096 + 3] {
        let (a, b) = (ramp(n, -3.5), ramp(n, 100.0));
        let outputs = add
            .run(&[f32_tensor(a.clone()), f32_tensor(b.clone())])
            .unwrap_or_else(|error| panic!("{error}"));
        assert_eq!(outputs.len(), 1);
        assert_eq!(outputs[0].shape, [n]);
        assert_eq!(
            values(&outputs[0]),
            elementwise(&a, &b, |x, y| x + y),
            "n = {n}"
        );
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU; run with --include-ignored on a machine with one"]
fn vector_add_runs_through_the_ptx_jit() {
    let device = gpu();
    let (fatbin, targets) = test_fatbin(&device, false);
    assert!(targets.is_empty(), "no cubin: the driver must JIT the PTX");
    let package = Arc::new(
        CudaPackage::from_image(&device, test_manifest(), &fatbin, "ptx-only test package")
            .unwrap_or_else(|error| panic!("{error}")),
    );
    let (a, b) = (ramp(777, 1.0), ramp(777, 2.0));
    let outputs = program(&package, "vector_add")
        .run(&[f32_tensor(a.clone()), f32_tensor(b.clone())])
        .unwrap();
    assert_eq!(values(&outputs[0]), elementwise(&a, &b, |x, y| x + y));
}

#[test]
#[ignore = "needs an NVIDIA GPU; run with --include-ignored on a machine with one"]
fn a_plan_with_a_temp_buffer_and_two_launches() {
    let device = gpu();
    let package = test_package(&device);
    let mut fused = program(&package, "add_then_mul");
    // Growing n re-allocates the arena and the input/output buffers; shrinking reuses them.
    for n in [300usize, 5000, 17] {
        let (a, b) = (ramp(n, 0.5), ramp(n, -7.0));
        let outputs = fused
            .run(&[f32_tensor(a.clone()), f32_tensor(b.clone())])
            .unwrap_or_else(|error| panic!("{error}"));
        let sum = elementwise(&a, &b, |x, y| x + y);
        assert_eq!(
            values(&outputs[0]),
            elementwise(&sum, &b, |x, y| x * y),
            "n = {n}"
        );
        assert_eq!(outputs[1].shape, [n, 1]);
        assert_eq!(values(&outputs[1]), sum, "n = {n}");
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU; run with --include-ignored on a machine with one"]
fn an_empty_input_launches_nothing() {
    let device = gpu();
    let package = test_package(&device);
    let mut fused = program(&package, "add_then_mul");
    let empty = f32_tensor(Vec::new());
    let outputs = fused.run(&[empty.clone(), empty.clone()]).unwrap();
    assert_eq!(outputs[0].shape, [0]);
    assert_eq!(outputs[1].shape, [0, 1]);
    let graphed = fused.run_graph(&[empty.clone(), empty]).unwrap();
    assert_eq!(graphed, outputs);
}

#[test]
#[ignore = "needs an NVIDIA GPU; run with --include-ignored on a machine with one"]
fn a_graph_replay_equals_the_direct_run() {
    let device = gpu();
    let package = test_package(&device);
    let mut fused = program(&package, "add_then_mul");
    let inputs = |n: usize, start: f32| [f32_tensor(ramp(n, start)), f32_tensor(ramp(n, -start))];

    let direct = fused.run(&inputs(1000, 3.0)).unwrap();
    let captured = fused.run_graph(&inputs(1000, 3.0)).unwrap();
    assert_eq!(
        captured, direct,
        "the first run_graph captures, then replays"
    );
    assert_eq!(fused.captured_graphs(), 1);

    // Same shape, new data: the graph is replayed and reads the new inputs.
    let replayed = fused.run_graph(&inputs(1000, 9.0)).unwrap();
    assert_eq!(replayed, fused.run(&inputs(1000, 9.0)).unwrap());
    assert_ne!(replayed, direct);
    assert_eq!(fused.captured_graphs(), 1);

    // A smaller shape reuses the memory and captures a second graph.
    let smaller = fused.run_graph(&inputs(640, 1.0)).unwrap();
    assert_eq!(smaller, fused.run(&inputs(640, 1.0)).unwrap());
    assert_eq!(fused.captured_graphs(), 2);

    // A larger shape re-allocates, which drops the graphs holding the old addresses.
    let larger = fused.run_graph(&inputs(8000, 2.0)).unwrap();
    assert_eq!(larger, fused.run(&inputs(8000, 2.0)).unwrap());
    assert_eq!(fused.captured_graphs(), 1);
    let again = fused.run_graph(&inputs(1000, 9.0)).unwrap();
    assert_eq!(again, replayed);

    fused.set_use_graphs(false);
    assert_eq!(fused.captured_graphs(), 0);
    assert_eq!(fused.run_graph(&inputs(1000, 9.0)).unwrap(), replayed);
    assert_eq!(
        fused.captured_graphs(),
        0,
        "graphs off: nothing is captured"
    );

    // Waiting after each launch (for debugging) gives the same results.
    fused.set_sync_after_each_launch(true);
    assert_eq!(fused.run(&inputs(1000, 9.0)).unwrap(), replayed);
}

#[test]
#[ignore = "needs an NVIDIA GPU; run with --include-ignored on a machine with one"]
fn past_the_graph_bound_runs_are_direct_and_equal() {
    let device = gpu();
    let package = test_package(&device);
    let mut fused = program(&package, "add_then_mul");
    fused.set_max_graphs(Some(2));
    let inputs = |n: usize, start: f32| [f32_tensor(ramp(n, start)), f32_tensor(ramp(n, -start))];
    for n in [1000, 900, 800, 700] {
        let graphed = fused.run_graph(&inputs(n, 2.0)).unwrap();
        assert_eq!(graphed, fused.run(&inputs(n, 2.0)).unwrap(), "{n} elements");
    }
    assert_eq!(
        fused.captured_graphs(),
        2,
        "only the first two shapes are captured"
    );
    // A captured shape still replays.
    let replayed = fused.run_graph(&inputs(900, 5.0)).unwrap();
    assert_eq!(replayed, fused.run(&inputs(900, 5.0)).unwrap());
    assert_eq!(fused.captured_graphs(), 2);
}

#[test]
#[ignore = "needs an NVIDIA GPU; run with --include-ignored on a machine with one"]
fn loops_run_their_body_count_times() {
    let device = gpu();
    let package = test_package(&device);
    let n = 1500;
    let (a, b) = (ramp(n, 1.0), ramp(n, 0.25));
    for function in ["repeat_add", "repeat_add_device_count"] {
        let mut repeat = program(&package, function);
        for count in [0i64, 1, 5] {
            let inputs = [
                f32_tensor(a.clone()),
                f32_tensor(b.clone()),
                Tensor::from_i64(&[], vec![count]),
            ];
            let mut expected = a.clone();
            for _ in 0..count {
                expected = elementwise(&expected, &b, |x, y| x + y);
            }
            let outputs = repeat
                .run(&inputs)
                .unwrap_or_else(|error| panic!("{error}"));
            assert_eq!(values(&outputs[0]), expected, "{function}, count = {count}");
            // A plan with a loop cannot be one graph: run_graph runs it directly.
            assert_eq!(repeat.run_graph(&inputs).unwrap(), outputs);
            assert_eq!(repeat.captured_graphs(), 0);
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU; run with --include-ignored on a machine with one"]
fn weights_are_checked_and_bound_once() {
    let device = gpu();
    let package = test_package(&device);
    let mut biased = program(&package, "add_bias");
    let len = WEIGHT_LEN as usize;
    let x = f32_tensor(ramp(len, 10.0));

    let unbound = biased.run(std::slice::from_ref(&x)).unwrap_err();
    assert!(
        matches!(unbound, CudaError::WeightNotBound { .. }),
        "{unbound}"
    );
    assert!(unbound.to_string().contains(WEIGHT_NAME));

    let missing = biased.bind_weights(&|_| None).unwrap_err();
    assert_eq!(
        missing.to_string(),
        format!("weight `{WEIGHT_NAME}` was not given to bind_weights")
    );

    let wrong = Tensor::zeros(DType::F32, &[len, 2]);
    let mismatch = biased.bind_weights(&|_| Some(&wrong)).unwrap_err();
    assert!(
        matches!(mismatch, CudaError::WeightMismatch { .. }),
        "{mismatch}"
    );
    assert!(mismatch.to_string().contains(WEIGHT_NAME), "{mismatch}");

    let bias = f32_tensor(ramp(len, -1.0));
    biased
        .bind_weights(&|name| (name == WEIGHT_NAME).then_some(&bias))
        .unwrap();
    let outputs = biased.run(std::slice::from_ref(&x)).unwrap();
    assert_eq!(
        values(&outputs[0]),
        elementwise(&values(&x), &values(&bias), |p, q| p + q)
    );
    // Graph replays see the bound weight too.
    assert_eq!(biased.run_graph(std::slice::from_ref(&x)).unwrap(), outputs);
}

#[test]
#[ignore = "needs an NVIDIA GPU; run with --include-ignored on a machine with one"]
fn a_kernel_missing_from_the_fatbin_is_named() {
    let device = gpu();
    let (fatbin, _) = test_fatbin(&device, true);
    let mut kernels = test_kernels();
    kernels.push(elementwise_kernel("vsub_f32_not_compiled"));
    let manifest = manifest(kernels, vec![vector_add_plan()], Vec::new());
    let error = CudaPackage::from_image(&device, manifest, &fatbin, "bad package").unwrap_err();
    assert!(
        matches!(error, CudaError::MissingKernel { .. }),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(
        message.starts_with(
            "kernel `vsub_f32_not_compiled` of package `bad package` is not in its fatbin"
        ),
        "{message}"
    );
    log_line(&format!("a missing kernel reads: {message}"));

    let package = test_package(&device);
    let unknown = package.launch("vsub_f32", [1, 1, 1], &[]).unwrap_err();
    assert!(
        unknown.to_string().contains("no kernel named `vsub_f32`"),
        "{unknown}"
    );
    let plan = CudaProgram::new(package.clone(), "forward").unwrap_err();
    assert!(
        plan.to_string().contains("no plan for function `forward`"),
        "{plan}"
    );
}

#[test]
#[ignore = "needs an NVIDIA GPU; run with --include-ignored on a machine with one"]
fn a_garbage_image_is_a_module_load_error() {
    let device = gpu();
    let error =
        CudaPackage::from_image(&device, test_manifest(), b"not a fatbin", "garbage").unwrap_err();
    assert!(matches!(error, CudaError::ModuleLoad { .. }), "{error:?}");
    assert!(error.to_string().contains("`garbage`"), "{error}");
    log_line(&format!("a garbage image reads: {error}"));
}

#[test]
#[ignore = "needs an NVIDIA GPU; run with --include-ignored on a machine with one"]
fn a_failed_launch_names_the_kernel_and_its_shape() {
    let device = gpu();
    let package = test_package(&device);
    // vadd_small_block declares .maxntid 64; the manifest launches it with 128 threads.
    let a = device.upload(&f32_tensor(ramp(256, 1.0))).unwrap();
    let out = device.zeros(DType::F32, &[256]).unwrap();
    let error = package
        .launch(
            "vadd_small_block",
            [2, 1, 1],
            &[
                KernelArg::Tensor(&a),
                KernelArg::Tensor(&a),
                KernelArg::Tensor(&out),
                KernelArg::I64(256),
            ],
        )
        .and_then(|()| device.synchronize())
        .unwrap_err();
    let message = error.to_string();
    assert!(matches!(error, CudaError::Launch { .. }), "{error:?}");
    assert!(
        message.starts_with(
            "kernel `vadd_small_block` with grid (2, 1, 1), block (128, 1, 1) failed: "
        ),
        "{message}"
    );
    log_line(&format!("a failed launch reads: {message}"));
    // The device is still usable afterwards.
    let mut add = program(&package, "vector_add");
    let x = f32_tensor(ramp(10, 1.0));
    assert!(add.run(&[x.clone(), x]).is_ok());
}

#[test]
#[ignore = "needs an NVIDIA GPU; run with --include-ignored on a machine with one"]
fn single_kernels_launch_and_time_on_caller_buffers() {
    let device = gpu();
    let package = test_package(&device);
    let n = 1 << 20;
    let (a_host, b_host) = (ramp(n, 1.0), ramp(n, 3.0));
    let a = device.upload(&f32_tensor(a_host.clone())).unwrap();
    let b = device.upload(&f32_tensor(b_host.clone())).unwrap();
    let out = device.zeros(DType::F32, &[n]).unwrap();
    let grid = [(n as u64).div_ceil(u64::from(BLOCK)), 1, 1];
    let args = [
        KernelArg::Tensor(&a),
        KernelArg::Tensor(&b),
        KernelArg::Tensor(&out),
        KernelArg::I64(n as i64),
    ];
    package.launch("vmul_f32", grid, &args).unwrap();
    let product = device.download(&out).unwrap();
    assert_eq!(
        values(&product),
        elementwise(&a_host, &b_host, |x, y| x * y)
    );

    let timing = package.time_kernel("vmul_f32", grid, &args, 20).unwrap();
    assert_eq!(timing.runs(), 20);
    assert!(
        timing.median_ms > 0.0 && timing.median_ms.is_finite(),
        "{timing:?}"
    );
    assert!(timing.min_ms <= timing.median_ms && timing.median_ms <= timing.max_ms);
    log_line(&format!(
        "vmul_f32 over {n} elements: median {:.4} ms ({:.0} GB/s), {} warm-up runs",
        timing.median_ms,
        (3 * n * 4) as f64 / timing.median_ms / 1e6,
        WARMUP_RUNS
    ));

    let wrong = package
        .launch(
            "vmul_f32",
            grid,
            &[args[0], args[1], args[2], KernelArg::I32(5)],
        )
        .unwrap_err();
    assert_eq!(
        wrong.to_string(),
        "kernel `vmul_f32`: parameter `n` is a i64 scalar, but argument 3 is i32 5"
    );
    let bf16 = device.zeros(DType::BF16, &[n]).unwrap();
    let dtype = package
        .launch(
            "vmul_f32",
            grid,
            &[args[0], args[1], KernelArg::Tensor(&bf16), args[3]],
        )
        .unwrap_err();
    assert!(dtype
        .to_string()
        .contains("parameter `out` is a f32 buffer, but the tensor is bf16"));
}

#[test]
#[ignore = "needs an NVIDIA GPU; run with --include-ignored on a machine with one"]
fn plans_time_their_launches() {
    let device = gpu();
    let package = test_package(&device);
    let mut fused = program(&package, "add_then_mul");
    let n = 1 << 20;
    let inputs = [f32_tensor(ramp(n, 1.0)), f32_tensor(ramp(n, 2.0))];
    let graphed = fused.time_launches(&inputs, 10).unwrap();
    assert_eq!(graphed.runs(), 10);
    assert!(
        graphed.median_ms > 0.0 && graphed.median_ms.is_finite(),
        "{graphed:?}"
    );
    assert_eq!(fused.captured_graphs(), 1, "timing goes through the graph");
    fused.set_use_graphs(false);
    let direct = fused.time_launches(&inputs, 10).unwrap();
    log_line(&format!(
        "add_then_mul over {n} elements: median {:.4} ms with a graph, {:.4} ms without",
        graphed.median_ms, direct.median_ms
    ));
    // The timed runs leave the right results behind.
    let outputs = fused.run(&inputs).unwrap();
    let sum = elementwise(&values(&inputs[0]), &values(&inputs[1]), |x, y| x + y);
    assert_eq!(values(&outputs[1]), sum);
}

/// A kernel whose 96 KiB of shared arrays live in the dynamic window: each block stages
/// its 256 elements at the far end of the window and writes them back reversed.
fn dynamic_shared_kernel() -> kiln_kir::Kernel {
    use kiln_kir::{Access, Expr, KernelBuilder, SizeExpr, Stmt, Ty};
    let block_dim = 256;
    let tile_len = 24 * 1024;
    let mut k = KernelBuilder::new("reverse_far", block_dim);
    k.grid([
        SizeExpr::Sym("blocks".to_string()),
        SizeExpr::Const(1),
        SizeExpr::Const(1),
    ]);
    let x = k.buffer("x", DType::F32, Access::Read);
    let out = k.buffer("out", DType::F32, Access::Write);
    let tile = k.shared("tile", DType::F32, tile_len);
    let base = k.var("base", Ty::I32);
    let start = (tile_len - block_dim) as i32;
    k.finish(vec![
        Stmt::assign(base, Expr::block_idx(0) * Expr::block_dim()),
        Stmt::store(
            tile,
            Expr::i32(start) + Expr::thread_idx(),
            Expr::load(x, Expr::var(base) + Expr::thread_idx()),
        ),
        Stmt::Barrier,
        Stmt::store(
            out,
            Expr::var(base) + Expr::thread_idx(),
            Expr::load(tile, Expr::i32(tile_len as i32 - 1) - Expr::thread_idx()),
        ),
    ])
}

#[test]
#[ignore = "needs an NVIDIA GPU; run with --include-ignored on a machine with one"]
fn kernels_beyond_48_kib_launch_with_dynamic_shared_memory() {
    let device = gpu();
    let kernel = dynamic_shared_kernel();
    let info = kiln_kir::KernelInfo::of(&kernel);
    assert_eq!(info.dynamic_shared_bytes, 96 * 1024);
    let (major, minor) = device.info().compute_capability;
    let target = kiln_ptx::Target::for_compute_capability(major, minor).unwrap();
    let mut ptx = kiln_ptx::emit_ptx(
        std::slice::from_ref(&kernel),
        target,
        &kiln_ptx::EmitOptions::for_jit(),
    )
    .unwrap();
    ptx.push('\0');
    let package = CudaPackage::from_image(
        &device,
        manifest(vec![info], Vec::new(), Vec::new()),
        ptx.as_bytes(),
        "dynamic shared",
    )
    .unwrap_or_else(|error| panic!("{error}"));
    let blocks = 40;
    let host = ramp(blocks * 256, 2.0);
    let x = device.upload(&f32_tensor(host.clone())).unwrap();
    let out = device.zeros(DType::F32, &[blocks * 256]).unwrap();
    package
        .launch(
            "reverse_far",
            [blocks as u64, 1, 1],
            &[KernelArg::Tensor(&x), KernelArg::Tensor(&out)],
        )
        .unwrap_or_else(|error| panic!("{error}"));
    let expected: Vec<f32> = host
        .chunks(256)
        .flat_map(|block| block.iter().rev().copied())
        .collect();
    assert_eq!(values(&device.download(&out).unwrap()), expected);
}
