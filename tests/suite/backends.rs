//! One set of test bodies run on every backend available: the compiled kernels and plans of
//! every stdlib function and model program, executed by the Cranelift CPU backend (always)
//! and by CUDA on the GPU (where there is one: the PTX for the device's target, assembled by
//! ptxas and loaded from a fatbin), compared with the graph-IR reference interpreter on the
//! same inputs. The GPU tests are `#[ignore]`d with the reason (they need an NVIDIA GPU), so
//! a machine without one reports them as ignored, never as passed; run them where there is
//! one with `--include-ignored` (scripts/gpu-check.sh does).
//!
//! Sizes bind the symbolic dims to values that are not multiples of any tile (7, 33, 5, ...).
//! Tolerances per output dtype (relative error max|a - b| / max|b|): f32 1e-4 (the kernels
//! reorder f32 sums), f16 and bf16 2e-2 (one rounding of the narrower type may land on the
//! other side), f8 0.13, integers and bools exact (argmax ties are avoided by random data).

use kiln_cuda::{CudaDevice, CudaPackage, CudaProgram};
use kiln_driver::pipeline::{self, CompileOptions};
use kiln_ir::{interpret, DType, Function, Tensor};
use kiln_ptx::{Target, Toolchain};
use kiln_tests::{
    compile_source, compile_source_with, load_safetensors, read_json, rel_err, repo_root, Rng,
};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, OnceLock};

/// The size given to each symbolic dim.
fn symbol_size(name: &str) -> u64 {
    match name {
        "B" => 2,
        "S" | "T" => 7,
        "G" => 3,
        "N" => 33,
        "M" => 5,
        "K" => 9,
        "V" => 17,
        "R" => 5,
        _ => 6,
    }
}

/// Random inputs for an entry function: floats in [-1, 1), integers in [0, 4) (valid indices
/// and masks with zeros), the loop counts `n`/`iters` equal to 3.
fn inputs_for(func: &Function, rng: &mut Rng) -> Vec<Tensor> {
    func.params()
        .iter()
        .map(|p| {
            let ty = func.ty(*p);
            let shape: Vec<usize> = ty
                .shape
                .0
                .iter()
                .map(|d| d.as_const().unwrap_or_else(|| symbol_size(&d.to_string())) as usize)
                .collect();
            let n: usize = shape.iter().product();
            if ty.dtype.is_float() {
                Tensor::from_f32(
                    &shape,
                    (0..n).map(|_| (rng.unit() * 2.0 - 1.0) as f32).collect(),
                )
                .cast(ty.dtype)
            } else if ty.dtype == DType::Bool {
                Tensor::from_bool(&shape, (0..n).map(|_| rng.unit() < 0.7).collect())
            } else if shape.is_empty() {
                Tensor::from_ints(ty.dtype, &shape, vec![3])
            } else {
                Tensor::from_ints(
                    ty.dtype,
                    &shape,
                    (0..n).map(|_| (rng.unit() * 4.0) as i64).collect(),
                )
            }
        })
        .collect()
}

/// Inputs of a model's KV-cached `step` entry: two sequences with scattered blocks of 4
/// slots in a cache of 6 blocks holding random earlier keys and values: the first adds 3
/// tokens after 3 cached ones, the second 2 after 8, then one padding token (T = 6).
fn paged_step_inputs(func: &Function, rng: &mut Rng) -> Vec<Tensor> {
    paged_step_inputs_of(func, rng, &[(0, 3), (0, 4), (0, 5), (1, 8), (1, 9)], [2, 4])
}

/// [`paged_step_inputs`] with the tokens `entries` (sequence, position) of the two
/// sequences, `last` the index of each one's last token, and the padding token.
fn paged_step_inputs_of(
    func: &Function,
    rng: &mut Rng,
    entries: &[(i64, i64)],
    last: [i64; 2],
) -> Vec<Tensor> {
    let int = |shape: &[usize], v: Vec<i64>| Tensor::from_ints(DType::I32, shape, v);
    let tables = [[4i64, 1, 3], [0, 5, 2]];
    let t = entries.len() + 1;
    let mut tokens: Vec<i64> = (0..entries.len())
        .map(|_| (rng.unit() * 50.0) as i64)
        .collect();
    let mut pos: Vec<i64> = entries.iter().map(|e| e.1).collect();
    let mut seq: Vec<i64> = entries.iter().map(|e| e.0).collect();
    let mut slots: Vec<i64> = entries
        .iter()
        .map(|&(b, p)| tables[b as usize][(p / 4) as usize] * 4 + p % 4)
        .collect();
    // The padding token.
    tokens.push(0);
    pos.push(0);
    seq.push(-1);
    slots.push(-1);
    let cache_ty = func.ty(func.params()[6]);
    let dims: Vec<usize> = cache_ty
        .shape
        .0
        .iter()
        .zip([None, Some(6), Some(4), None, None])
        .map(|(d, given)| given.unwrap_or_else(|| d.as_const().expect("constant") as usize))
        .collect();
    let n: usize = dims.iter().product();
    let mut cache = || {
        Tensor::from_f32(
            &dims,
            (0..n).map(|_| (rng.unit() * 2.0 - 1.0) as f32).collect(),
        )
        .cast(cache_ty.dtype)
    };
    let (k_cache, v_cache) = (cache(), cache());
    vec![
        int(&[t], tokens),
        int(&[t], pos),
        int(&[t], seq),
        int(&[t], slots),
        int(&[2, 3], tables.concat()),
        int(&[2], last.to_vec()),
        k_cache,
        v_cache,
    ]
}

fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-4,
        DType::F16 | DType::BF16 => 2e-2,
        DType::F8E4M3 | DType::F8E5M2 => 0.13,
        _ => 0.0,
    }
}

/// The GPU and the toolchain for it (once per process); the GPU tests fail without them.
fn gpu() -> &'static (CudaDevice, Toolchain, Target) {
    static GPU: OnceLock<Result<(CudaDevice, Toolchain, Target), String>> = OnceLock::new();
    let found = GPU.get_or_init(|| {
        let device = CudaDevice::new(0).map_err(|e| e.to_string())?;
        let (major, minor) = device.info().compute_capability;
        let target = Target::for_compute_capability(major, minor)
            .ok_or_else(|| format!("no kiln target for sm_{major}{minor}"))?;
        let toolchain = Toolchain::discover().map_err(|e| e.to_string())?;
        Ok((device, toolchain, target))
    });
    match found {
        Ok(found) => found,
        Err(why) => panic!("this test needs a GPU and ptxas: {why}"),
    }
}

/// Where the compiled plans run.
#[derive(Clone, Copy, PartialEq)]
enum Backend {
    Cpu,
    Gpu,
}

fn compare(what: &str, got: &[Tensor], want: &[Tensor], tolerance_given: Option<f64>) {
    assert_eq!(got.len(), want.len(), "{what}: number of results");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(
            (g.dtype, &g.shape),
            (w.dtype, &w.shape),
            "{what} result {i}"
        );
        let err = rel_err(&g.to_f64_vec(), &w.to_f64_vec());
        let tol = tolerance_given.unwrap_or_else(|| tolerance(w.dtype));
        assert!(
            err <= tol,
            "{what} result {i} ({}): relative error {err:e} > {tol:e}",
            w.ty()
        );
    }
}

/// Compiles `source` with `config`, runs every entry function through `backend` and the
/// interpreter, and compares every output.
fn check_program(
    backend: Backend,
    name: &str,
    source: &str,
    dir: Option<&Path>,
    config: Option<&serde_json::Value>,
    weights: &BTreeMap<String, Tensor>,
    given_inputs: Option<Vec<Tensor>>,
) {
    let fusion = kiln_gpu_kernels::Options::default();
    check_program_with(
        backend,
        &fusion,
        name,
        source,
        dir,
        config,
        weights,
        given_inputs,
    );
}

/// [`check_program`] with the given fusion options (template settings).
#[allow(clippy::too_many_arguments)]
fn check_program_with(
    backend: Backend,
    fusion: &kiln_gpu_kernels::Options,
    name: &str,
    source: &str,
    dir: Option<&Path>,
    config: Option<&serde_json::Value>,
    weights: &BTreeMap<String, Tensor>,
    given_inputs: Option<Vec<Tensor>>,
) {
    let lowered = compile_source(name, source, dir, config).unwrap_or_else(|d| panic!("{d}"));
    check_lowered(backend, fusion, name, lowered, weights, given_inputs, None);
}

/// [`check_program_with`] for a lowered program; `tolerance` replaces the per-dtype one.
fn check_lowered(
    backend: Backend,
    fusion: &kiln_gpu_kernels::Options,
    name: &str,
    lowered: kiln_lower::Lowered,
    weights: &BTreeMap<String, Tensor>,
    given_inputs: Option<Vec<Tensor>>,
    tolerance: Option<f64>,
) {
    let mut optimized = lowered.module.clone();
    kiln_opt::optimize(&mut optimized).expect("optimize");
    let compiled = kiln_gpu_kernels::compile_module(&optimized, fusion)
        .unwrap_or_else(|e| panic!("{name}: fusion failed: {e}"));
    let executor = (backend == Backend::Cpu).then(|| {
        kiln_cpu::CpuExecutor::new(&compiled.kernels).unwrap_or_else(|e| panic!("{name}: {e}"))
    });
    let cuda = (backend == Backend::Gpu).then(|| {
        let (device, toolchain, target) = gpu();
        let options = CompileOptions {
            targets: vec![*target],
            fusion: fusion.clone(),
            ..CompileOptions::default()
        };
        let package = pipeline::compile(name, lowered.clone(), &options, Some(toolchain))
            .unwrap_or_else(|e| panic!("{name}: compiling for {target}: {e}"));
        let fatbin = package.fatbin.as_ref().expect("assembled");
        Arc::new(
            CudaPackage::from_image(device, package.manifest.clone(), fatbin, name)
                .unwrap_or_else(|e| panic!("{name}: {e}")),
        )
    });
    let mut rng = Rng(0xBAC_0E4D);
    for (func, plan) in lowered.module.functions.iter().zip(&compiled.plans) {
        assert_eq!(func.name, plan.function);
        let what = format!("{name}@{}", func.name);
        // A `step` takes the given inputs only when they are its own (one per parameter).
        let inputs = match (&given_inputs, func.name == "step") {
            (Some(given), true) if given.len() == func.params().len() => given.clone(),
            (_, true) => paged_step_inputs(func, &mut rng),
            (Some(given), false) => given.clone(),
            (None, false) => inputs_for(func, &mut rng),
        };
        let want = interpret(func, &inputs, weights)
            .unwrap_or_else(|e| panic!("{what}: interpreter: {e}"));
        if let Some(executor) = &executor {
            let got = executor
                .run(plan, &inputs, &|n| weights.get(n))
                .unwrap_or_else(|e| panic!("{what}: cpu backend: {e}"));
            compare(
                &format!("{what} on the cpu backend"),
                &got,
                &want,
                tolerance,
            );
        }
        if let Some(package) = &cuda {
            let mut program = CudaProgram::new(package.clone(), &func.name)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            program
                .bind_weights(&|n| weights.get(n))
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            let got = program
                .run(&inputs)
                .unwrap_or_else(|e| panic!("{what}: cuda: {e}"));
            compare(&format!("{what} on the GPU"), &got, &want, tolerance);
        }
    }
}

#[test]
fn stdlib_functions_on_the_cpu_backend_equal_the_interpreter() {
    check_stdlib(Backend::Cpu);
}

#[test]
#[ignore = "needs an NVIDIA GPU; run with --include-ignored on a machine with one"]
fn stdlib_functions_on_the_gpu_equal_the_interpreter() {
    check_stdlib(Backend::Gpu);
}

#[test]
fn model_programs_on_the_cpu_backend_equal_the_interpreter() {
    check_models(Backend::Cpu);
}

#[test]
#[ignore = "needs an NVIDIA GPU; run with --include-ignored on a machine with one"]
fn model_programs_on_the_gpu_equal_the_interpreter() {
    check_models(Backend::Gpu);
}

#[test]
fn llama_steps_in_bf16_on_the_cpu_backend_equal_the_interpreter() {
    check_bf16_steps(Backend::Cpu);
}

#[test]
#[ignore = "needs an NVIDIA GPU; run with --include-ignored on a machine with one"]
fn llama_steps_in_bf16_on_the_gpu_equal_the_interpreter() {
    check_bf16_steps(Backend::Gpu);
}

/// The Llama program's KV-cached `step` in bf16 on tiny-llama and tiny-qwen2 (q/k/v biases)
/// with the fixtures' weights rounded to bf16: 6 tokens take the tensor-core GEMV
/// (`GemmTuning::mma_gemv`, at 1, 2 and 4 n8 tiles a block), q/k/v (64, 32 and 32 wide
/// under GQA) a grid of segments. Tolerance 2e-2 for
/// every output, the f32 logits too: the interpreter rounds each op's result to bf16, the
/// kernels only what they store.
fn check_bf16_steps(backend: Backend) {
    for fixture in ["tiny-llama", "tiny-qwen2"] {
        let dir = repo_root().join("tests/fixtures").join(fixture);
        let mut config = read_json(&dir.join("config.json"));
        config["kv_block_size"] = serde_json::json!(4);
        let weights: BTreeMap<String, Tensor> = load_safetensors(&dir.join("model.safetensors"))
            .into_iter()
            .map(|(n, t)| (n, t.cast(DType::BF16)))
            .collect();
        let path = repo_root().join("models/llama.kiln");
        let source = std::fs::read_to_string(&path).expect("program");
        let name = format!("models/llama.kiln ({fixture}, bf16)");
        let options = kiln_lower::Options {
            param_dtype: DType::BF16,
            entries: Some(vec!["step".to_string()]),
        };
        let lowered = compile_source_with(&name, &source, path.parent(), Some(&config), &options)
            .unwrap_or_else(|d| panic!("{d}"));
        let mut optimized = lowered.module.clone();
        kiln_opt::optimize(&mut optimized).expect("optimize");
        // One, two and four n8 tiles a block (`GemmTuning::mma_gemv_tiles`).
        for (tiles, seg) in [(1, "_u1_seg"), (2, "_u1_t2_seg"), (4, "_u1_t4_seg")] {
            let mut fusion = kiln_gpu_kernels::Options::default();
            fusion.gemm.mma_gemv = true;
            fusion.gemm.mma_gemv_tiles = tiles;
            let compiled = kiln_gpu_kernels::compile_module(&optimized, &fusion).unwrap();
            let want = format!("mma_gemv_n8_w4{seg}");
            assert!(
                compiled.kernels.iter().any(|k| k.name.contains(&want)),
                "{name}: a grid of segments for q/k/v, {want}"
            );
            check_lowered(
                backend,
                &fusion,
                &name,
                lowered.clone(),
                &weights,
                None,
                Some(2e-2),
            );
        }
    }
}

#[test]
fn the_largest_step_is_sized_from_the_paged_models_input_shapes() {
    // What the GPU server reserves before sizing its KV cache: the step plan's symbols bound
    // from `PagedModel::step_shapes` (no dim names assumed), and its working bytes, which
    // grow with the tokens of the step and leave out the caches it updates in place.
    let lowered = llama_step_bf16("tiny-llama");
    let compiled = kiln_gpu_kernels::compile_function(
        &lowered.module,
        "step",
        &kiln_gpu_kernels::Options::default(),
    )
    .unwrap();
    let bytes_with = |blocks: usize, tokens: usize, sequences: usize| {
        let model = kiln_runtime::PagedModel::new(&lowered.module, "step", blocks, 4, 12).unwrap();
        let shapes = model.step_shapes(tokens, sequences);
        let shapes: Vec<&[usize]> = shapes.iter().map(Vec::as_slice).collect();
        let symbols = kiln_cuda::bind_symbols(&compiled.plan, &shapes).unwrap();
        assert_eq!(
            [
                symbols.get("T"),
                symbols.get("B"),
                symbols.get("MB"),
                symbols.get("NB")
            ],
            [
                Some(tokens as u64),
                Some(sequences as u64),
                Some(3),
                Some(blocks as u64)
            ]
        );
        kiln_cuda::working_bytes(&compiled.plan, &symbols).unwrap()
    };
    let (small, large) = (bytes_with(8, 6, 2), bytes_with(8, 60, 2));
    assert!(small < large, "{small} {large}");
    // The caches are the server's budget, not working memory: their size changes nothing.
    assert_eq!(bytes_with(64, 60, 2), large);
}

#[test]
fn llama_step_with_the_gemv_on_the_cpu_backend() {
    // Four tokens (three of two sequences and a padding token) on tiny-llama in bf16: every
    // projection (q/k/v as a grid of segments, o-proj, gate/up, down, the LM head) takes
    // the GEMV variant (`GemmTuning::gemv`), no split-K sum kernel, and the gate/up GEMVs
    // and the LM head compute the RMSNorms they read (the q/k/v GEMV, which writes the
    // caches, keeps its norm kernel); within bf16 tolerance of the interpreter on Cranelift.
    let dir = repo_root().join("tests/fixtures/tiny-llama");
    let mut config = read_json(&dir.join("config.json"));
    config["kv_block_size"] = serde_json::json!(4);
    let weights: BTreeMap<String, Tensor> = load_safetensors(&dir.join("model.safetensors"))
        .into_iter()
        .map(|(n, t)| (n, t.cast(DType::BF16)))
        .collect();
    let path = repo_root().join("models/llama.kiln");
    let source = std::fs::read_to_string(&path).expect("program");
    let name = "models/llama.kiln (tiny-llama, bf16, the GEMV)";
    let options = kiln_lower::Options {
        param_dtype: DType::BF16,
        entries: Some(vec!["step".to_string()]),
    };
    let lowered = compile_source_with(name, &source, path.parent(), Some(&config), &options)
        .unwrap_or_else(|d| panic!("{d}"));
    let func = &lowered.module.functions[0];
    let inputs = paged_step_inputs_of(func, &mut Rng(0x6E3F), &[(0, 3), (0, 4), (1, 8)], [1, 2]);
    let mut optimized = lowered.module.clone();
    kiln_opt::optimize(&mut optimized).expect("optimize");
    let mut fusion = kiln_gpu_kernels::Options::default();
    fusion.gemm.norm_prologue = true;
    let compiled = kiln_gpu_kernels::compile_module(&optimized, &fusion).unwrap();
    let plan = &compiled.plans[0];
    let sizes: BTreeMap<String, u64> = plan
        .symbols
        .iter()
        .map(|s| (s.name.clone(), inputs[s.input].shape[s.axis] as u64))
        .collect();
    let names = launches(&plan.steps, &compiled.kernels, &sizes);
    let count = |part: &str| names.iter().filter(|k| k.contains(part)).count();
    let layers = config["num_hidden_layers"].as_u64().expect("layers") as usize;
    assert_eq!(count("gemv"), 4 * layers + 1, "{names:?}");
    assert_eq!(count("_seg_x3_kv_write"), layers, "{names:?}");
    assert_eq!(count("splitk") + count("mma_gemm"), 0, "{names:?}");
    // The RMSNorms before gate/up and the final one computed by the GEMVs reading them
    // (`GemmTuning::norm_prologue`): the same bits as with their norm kernels.
    assert_eq!(count("rms_norm"), layers, "{names:?}");
    let gemv_norms = names
        .iter()
        .filter(|n| n.contains("_gemv") && n.contains("_norm"))
        .count();
    assert_eq!(gemv_norms, layers + 1, "{names:?}");
    let mut kernels_off = fusion.clone();
    kernels_off.gemm.norm_prologue = false;
    let off = kiln_gpu_kernels::compile_module(&optimized, &kernels_off).unwrap();
    assert_eq!(
        launches(&off.plans[0].steps, &off.kernels, &sizes).len(),
        names.len() + layers + 1
    );
    let run = |compiled: &kiln_gpu_kernels::CompiledModule| {
        kiln_cpu::CpuExecutor::new(&compiled.kernels)
            .unwrap()
            .run(&compiled.plans[0], &inputs, &|n| weights.get(n))
            .unwrap_or_else(|e| panic!("{name}: {e}"))
    };
    for (i, (a, b)) in run(&compiled).iter().zip(&run(&off)).enumerate() {
        assert_eq!(a.to_le_bytes(), b.to_le_bytes(), "{name}: result {i}");
    }
    check_lowered(
        Backend::Cpu,
        &fusion,
        name,
        lowered,
        &weights,
        Some(inputs),
        Some(2e-2),
    );
}

#[test]
fn llama_steps_with_kv_writes_in_the_qkv_gemv_on_the_cpu_backend() {
    // Four tokens (a padding token among them) on tiny-llama and tiny-qwen2 (q/k/v biases)
    // in bf16: the q/k/v GEMV of segments writes RoPE'd k and v into the paged caches at
    // their slots (`GemmTuning::gemv_kv_writes`; slot -1 stores nothing): no kv_write
    // kernel, the same bits on Cranelift as with the kv_write kernels, and within bf16
    // tolerance of the interpreter.
    for fixture in ["tiny-llama", "tiny-qwen2"] {
        let dir = repo_root().join("tests/fixtures").join(fixture);
        let mut config = read_json(&dir.join("config.json"));
        config["kv_block_size"] = serde_json::json!(4);
        let weights: BTreeMap<String, Tensor> = load_safetensors(&dir.join("model.safetensors"))
            .into_iter()
            .map(|(n, t)| (n, t.cast(DType::BF16)))
            .collect();
        let path = repo_root().join("models/llama.kiln");
        let source = std::fs::read_to_string(&path).expect("program");
        let name = format!("models/llama.kiln ({fixture}, bf16, kv writes in the GEMV)");
        let options = kiln_lower::Options {
            param_dtype: DType::BF16,
            entries: Some(vec!["step".to_string()]),
        };
        let lowered = compile_source_with(&name, &source, path.parent(), Some(&config), &options)
            .unwrap_or_else(|d| panic!("{d}"));
        let func = &lowered.module.functions[0];
        let inputs =
            paged_step_inputs_of(func, &mut Rng(0x6E3F), &[(0, 3), (0, 4), (1, 8)], [1, 2]);
        let mut optimized = lowered.module.clone();
        kiln_opt::optimize(&mut optimized).expect("optimize");
        let layers = config["num_hidden_layers"].as_u64().expect("layers") as usize;
        let mut results = Vec::new();
        for on in [true, false] {
            let mut fusion = kiln_gpu_kernels::Options::default();
            fusion.gemm.gemv_kv_writes = on;
            let compiled = kiln_gpu_kernels::compile_module(&optimized, &fusion).unwrap();
            let plan = &compiled.plans[0];
            let sizes: BTreeMap<String, u64> = plan
                .symbols
                .iter()
                .map(|s| (s.name.clone(), inputs[s.input].shape[s.axis] as u64))
                .collect();
            let names = launches(&plan.steps, &compiled.kernels, &sizes);
            let count = |part: &str| names.iter().filter(|k| k.contains(part)).count();
            // tiny-qwen2's first layer keeps its kv_write kernel: RoPE's cosines are stored
            // in bf16 by a pointwise kernel after the GEMV (`KvWrites` computes only f32
            // values inline).
            let kept = usize::from(fixture == "tiny-qwen2");
            let (fused, kernels) = if on {
                (layers - kept, kept)
            } else {
                (0, layers)
            };
            assert_eq!(count("_seg_x3_kv_write"), fused, "{name}: {names:?}");
            assert_eq!(count("kv_write_x2"), kernels, "{name}: {names:?}");
            let executor = kiln_cpu::CpuExecutor::new(&compiled.kernels).unwrap();
            results.push(
                executor
                    .run(plan, &inputs, &|n| weights.get(n))
                    .unwrap_or_else(|e| panic!("{name}: {e}")),
            );
        }
        for (i, (a, b)) in results[0].iter().zip(&results[1]).enumerate() {
            assert_eq!(a.to_le_bytes(), b.to_le_bytes(), "{name}: result {i}");
        }
        let fusion = kiln_gpu_kernels::Options::default();
        check_lowered(
            Backend::Cpu,
            &fusion,
            &name,
            lowered,
            &weights,
            Some(inputs),
            Some(2e-2),
        );
    }
}

#[test]
fn llama_step_with_split_k_sums_in_rms_norms_on_the_cpu_backend() {
    // A Llama shape whose o-proj (K = 8 × 128) and down-proj (K = 1024) split K across
    // blocks at decode sizes: each RMSNorm that reads a residual add adds the split-K sums
    // itself (`GemmTuning::row_sums`). Six tokens take the decode kernels: three sum
    // kernels fewer (layer 0's o-proj and down-proj, layer 1's o-proj; layer 1's down-proj
    // sum is read first by the final norm through `h[last]`, another shape), the same bits
    // as without, and within bf16 tolerance of the interpreter.
    let launched = split_step_with_and_without(
        "models/llama.kiln (split-K sums in RMSNorms, bf16)",
        &[],
        |options, on| options.gemm.row_sums = on,
    );
    let fused = launched[0]
        .iter()
        .filter(|k| k.contains("rms_norm_splitk"))
        .count();
    assert_eq!(fused, 3, "{:?}", launched[0]);
    assert_eq!(launched[0].len() + 3, launched[1].len(), "{launched:?}");
}

#[test]
fn llama_step_with_kv_writes_in_the_qkv_sum_kernel_on_the_cpu_backend() {
    // Hidden 1024: the q/k/v grid of segments (1024, 256, 256 wide) splits K across blocks
    // at decode sizes, and its sum kernel writes RoPE'd k and v into the paged caches at
    // their slots (`GemmTuning::kv_writes`; the padding token's slot -1 stores nothing):
    // no kv_write kernel in either layer, the same bits as without, and within bf16
    // tolerance of the interpreter.
    let launched = split_step_with_and_without(
        "models/llama.kiln (k/v written by the q/k/v sum kernel, bf16)",
        &[("hidden_size", 1024)],
        |options, on| options.gemm.kv_writes = on,
    );
    let count = |names: &[String], part: &str| names.iter().filter(|k| k.contains(part)).count();
    assert_eq!(
        count(&launched[0], "_sum_x3_kv_write"),
        2,
        "{:?}",
        launched[0]
    );
    assert_eq!(count(&launched[0], "kv_write_x2"), 0, "{:?}", launched[0]);
    assert_eq!(count(&launched[1], "kv_write_x2"), 2, "{:?}", launched[1]);
    assert_eq!(launched[0].len() + 2, launched[1].len(), "{launched:?}");
}

/// The Llama program's `step` at tiny-llama's config with 8 heads × 128, ffn 1024, blocks
/// of 4 (and `edits`), random bf16 weights, on the paged inputs of six tokens (one
/// padding): compiled with a fusion switched on and off (`switch`), run on Cranelift;
/// asserts both give the same bits and the switched-on plan is within bf16 tolerance of
/// the interpreter. Returns both plans' launches at these sizes (on, off).
fn split_step_with_and_without(
    name: &str,
    edits: &[(&str, i64)],
    switch: fn(&mut kiln_gpu_kernels::Options, bool),
) -> Vec<Vec<String>> {
    let dir = repo_root().join("tests/fixtures/tiny-llama");
    let mut config = read_json(&dir.join("config.json"));
    config["num_attention_heads"] = serde_json::json!(8);
    config["head_dim"] = serde_json::json!(128);
    config["intermediate_size"] = serde_json::json!(1024);
    config["kv_block_size"] = serde_json::json!(4);
    for (key, value) in edits {
        config[*key] = serde_json::json!(value);
    }
    let path = repo_root().join("models/llama.kiln");
    let source = std::fs::read_to_string(&path).expect("program");
    let options = kiln_lower::Options {
        param_dtype: DType::BF16,
        entries: Some(vec!["step".to_string()]),
    };
    let lowered = compile_source_with(name, &source, path.parent(), Some(&config), &options)
        .unwrap_or_else(|d| panic!("{d}"));
    let func = &lowered.module.functions[0];
    let mut rng = Rng(0x5EED_5A11);
    let weights: BTreeMap<String, Tensor> = func
        .checkpoint_params()
        .into_iter()
        .map(|(n, ty)| {
            let dims: Vec<usize> = ty
                .shape
                .dims()
                .iter()
                .map(|d| d.as_const().expect("constant weights") as usize)
                .collect();
            let scale = 1.0 / (*dims.last().unwrap_or(&1) as f64).sqrt();
            let count: usize = dims.iter().product();
            let data = (0..count)
                .map(|_| {
                    let x = rng.signed();
                    (if dims.len() == 1 {
                        1.0 + 0.1 * x
                    } else {
                        x * scale
                    }) as f32
                })
                .collect();
            (
                n.to_string(),
                Tensor::from_f32(&dims, data).cast(DType::BF16),
            )
        })
        .collect();
    let inputs = paged_step_inputs(func, &mut rng);
    let mut optimized = lowered.module.clone();
    kiln_opt::optimize(&mut optimized).expect("optimize");
    let mut results = Vec::new();
    let mut launched = Vec::new();
    for on in [true, false] {
        let mut fusion = kiln_gpu_kernels::Options::default();
        // Six tokens take the split decode tile, not the tensor-core GEMV (no split-K).
        fusion.gemm.mma_gemv = false;
        switch(&mut fusion, on);
        let compiled = kiln_gpu_kernels::compile_module(&optimized, &fusion).unwrap();
        let plan = &compiled.plans[0];
        let sizes: BTreeMap<String, u64> = plan
            .symbols
            .iter()
            .map(|s| (s.name.clone(), inputs[s.input].shape[s.axis] as u64))
            .collect();
        launched.push(launches(&plan.steps, &compiled.kernels, &sizes));
        let executor = kiln_cpu::CpuExecutor::new(&compiled.kernels).unwrap();
        results.push(
            executor
                .run(plan, &inputs, &|n| weights.get(n))
                .unwrap_or_else(|e| panic!("{name}: {e}")),
        );
    }
    for (i, (a, b)) in results[0].iter().zip(&results[1]).enumerate() {
        assert_eq!(a.to_le_bytes(), b.to_le_bytes(), "{name}: result {i}");
    }
    let fusion = kiln_gpu_kernels::Options::default();
    check_lowered(
        Backend::Cpu,
        &fusion,
        name,
        lowered,
        &weights,
        Some(inputs),
        Some(2e-2),
    );
    launched
}

/// The names of the kernels `steps` launch with the symbols at `sizes`.
fn launches(
    steps: &[kiln_kir::Step],
    kernels: &[kiln_kir::Kernel],
    sizes: &BTreeMap<String, u64>,
) -> Vec<String> {
    let mut out = Vec::new();
    for step in steps {
        match step {
            kiln_kir::Step::Launch { kernel, .. } => out.push(kernels[*kernel].name.clone()),
            kiln_kir::Step::Loop { body, .. } => out.extend(launches(body, kernels, sizes)),
            kiln_kir::Step::BySize { .. } => {
                let branch = step
                    .by_size_branch(|s| sizes.get(s).copied())
                    .expect("a BySize step")
                    .expect("bound symbols");
                out.extend(launches(branch, kernels, sizes));
            }
            kiln_kir::Step::Copy { .. } => {}
        }
    }
    out
}

fn check_stdlib(backend: Backend) {
    let dir = repo_root().join("tests/filetests/ir");
    let mut programs: Vec<_> = std::fs::read_dir(&dir)
        .expect("filetests")
        .map(|e| e.expect("entry").path())
        .collect();
    programs.push(repo_root().join("stdlib/consensus.kiln"));
    programs.sort();
    for path in programs {
        let source = std::fs::read_to_string(&path).expect("program");
        let name = path
            .file_name()
            .expect("name")
            .to_string_lossy()
            .to_string();
        check_program(
            backend,
            &name,
            &source,
            path.parent(),
            None,
            &BTreeMap::new(),
            None,
        );
    }
}

fn check_models(backend: Backend) {
    for (program, fixture) in [
        ("models/llama.kiln", "tiny-llama"),
        ("models/llama.kiln", "tiny-qwen2"),
        ("models/gpt2.kiln", "tiny-gpt2"),
        ("models/bert.kiln", "tiny-bert"),
    ] {
        let fixture_dir = repo_root().join("tests/fixtures").join(fixture);
        let mut config = read_json(&fixture_dir.join("config.json"));
        // The KV-cached step with blocks of 4 tokens (paged_step_inputs' layout).
        config["kv_block_size"] = serde_json::json!(4);
        let weights = load_safetensors(&fixture_dir.join("model.safetensors"));
        let expected = load_safetensors(&fixture_dir.join("expected.safetensors"));
        let mut inputs = vec![expected["input_ids"].cast(DType::I32)];
        if let Some(mask) = expected.get("attention_mask") {
            inputs.push(mask.cast(DType::I32));
        }
        let path = repo_root().join(program);
        let source = std::fs::read_to_string(&path).expect("program");
        check_program(
            backend,
            &format!("{program} ({fixture})"),
            &source,
            path.parent(),
            Some(&config),
            &weights,
            Some(inputs),
        );
    }
}

/// Paged attention at head dims the split template takes (32, 64 and 128, GQA 8/2), f32
/// and bf16: tokens whose keys span several partitions of 128 positions, one in the first
/// partition only, one at a partition's first position, and a padding token; block tables
/// in scrambled order; with the default settings (partitions of 128 keys, eight keys a warp
/// and step, four warps), with four keys a warp, with partitions of 32 positions (per-warp
/// block-table reads across blocks of 8) and of 96 for two warps of 3 keys (a partition
/// that starts inside a cache block: the table read per key). The block tables hold 320
/// positions: the default plan has both partition sizes and runs its short-context variant
/// (partitions of 32 up to 512 positions); with that variant up to 256 positions it runs
/// the partitions of 128; the other settings turn the variant off. The first six run the
/// register design (the default); the staged design (key/value tiles through shared
/// memory) runs with tiles of 16 in four stages, tiles of 32 for two warps in two stages, tiles of 12 with a warp a
/// key (crossing cache blocks, partitions rounded up to 132) and tiles of 8 in five stages
/// (rounded up to 16 lanes a key's warps; at head dim 32 a tile is fewer 16-byte chunks
/// than threads). The last three ask for the tensor-core staged design (bf16 only; f32
/// and head dim 32 run the register design): one warp of 16 keys a tile in four stages, two warps of 16 in
/// two stages, one warp in three stages with partitions of 100 rounded up to 112 (a tile
/// that crosses cache blocks of 8).
fn check_paged_attention(backend: Backend) {
    let defaults = kiln_gpu_kernels::PagedTuning::default();
    let (short_part, short_context) = (defaults.short_part, defaults.short_context);
    // (part, unroll, warps, short_part, short_context, tile, stages, tensor-core warps);
    // tile 0 is the register design. Short tables (the 320 positions here, at most
    // `short_context`) take the one-pass kernel of `one_pass` warps (0, the default: the
    // partial kernel, whose last block of a token and head group merges).
    let one_pass = 16;
    let settings = [
        (128, 8, 4, short_part, short_context, 0, 0, 0, one_pass),
        (128, 8, 4, short_part, short_context, 0, 0, 0, 0),
        (128, 8, 4, short_part, 256, 0, 0, 0, one_pass),
        (128, 4, 4, short_part, 512, 0, 0, 0, 3),
        (128, 8, 4, 128, 0, 0, 0, 0, one_pass),
        (128, 4, 4, 128, 0, 0, 0, 0, one_pass),
        (32, 8, 4, 32, 0, 0, 0, 0, one_pass),
        (96, 3, 2, 96, 0, 0, 0, 0, one_pass),
        (defaults.part, 8, 4, short_part, 256, 16, 4, 0, one_pass),
        (96, 1, 2, 96, 0, 32, 2, 0, one_pass),
        (128, 1, 4, 128, 0, 12, 3, 0, one_pass),
        (100, 1, 4, 100, 0, 8, 5, 0, one_pass),
        (defaults.part, 8, 4, short_part, 256, 16, 4, 1, one_pass),
        (96, 1, 4, 96, 0, 32, 2, 2, one_pass),
        (100, 1, 4, 100, 0, 16, 3, 1, one_pass),
    ];
    let mut fusion = kiln_gpu_kernels::Options::default();
    for (part, unroll, warps, short_part, short_context, tile, stages, mma_warps, one_pass) in
        settings
    {
        fusion.paged = kiln_gpu_kernels::PagedTuning {
            part,
            unroll,
            warps,
            short_part,
            short_context,
            tile,
            stages,
            lanes: if tile == 12 { 32 } else { defaults.lanes },
            mma_warps,
            one_pass,
            ..defaults
        };
        check_paged_attention_with(backend, &fusion);
    }
    // The separate merge kernel (`PagedTuning::fused_merge` off; on by default: the
    // partial kernel's last block of a token and head group merges).
    fusion.paged = kiln_gpu_kernels::PagedTuning {
        one_pass: 0,
        fused_merge: false,
        ..defaults
    };
    check_paged_attention_with(backend, &fusion);
}

fn check_paged_attention_with(backend: Backend, fusion: &kiln_gpu_kernels::Options) {
    // (dtype, head dim, block size): blocks of 16 put a step's keys in one block, blocks of
    // 8 read the block table per key.
    for (dtype, d, bs) in [
        ("f32", 64, 16),
        ("bf16", 128, 16),
        ("f32", 32, 8),
        ("bf16", 64, 8),
    ] {
        let source = format!(
            "import nn\n\
             fn attend(q: {dtype}[N, 8, {d}], k_cache: {dtype}[2, NB, {bs}, 2, {d}], \
             v_cache: {dtype}[2, NB, {bs}, 2, {d}], block_tables: i32[B, MB], seq: i32[N], \
             pos: i32[N]) -> {dtype}[N, 8, {d}] {{\n\
             paged_attention(q, k_cache, v_cache, block_tables, seq, pos, 1)\n}}\n"
        );
        let (blocks, batch, width) = (40usize, 3usize, 320 / bs);
        let mut rng = Rng(0x9A6E + d as u64);
        let mut random = |shape: &[usize]| {
            let n: usize = shape.iter().product();
            Tensor::from_f32(
                shape,
                (0..n).map(|_| (rng.unit() * 2.0 - 1.0) as f32).collect(),
            )
            .cast(DType::from_name(dtype).expect("dtype"))
        };
        let tokens = 5;
        let q = random(&[tokens, 8, d]);
        let k = random(&[2, blocks, bs, 2, d]);
        let v = random(&[2, blocks, bs, 2, d]);
        let tables: Vec<i64> = (0..batch * width)
            .map(|i| ((i * 17 + 5) % blocks) as i64)
            .collect();
        let int = |shape: &[usize], v: Vec<i64>| Tensor::from_ints(DType::I32, shape, v);
        let inputs = vec![
            q,
            k,
            v,
            int(&[batch, width], tables),
            int(&[tokens], vec![0, 1, 2, -1, 0]),
            int(&[tokens], vec![299, 5, 130, 0, 128]),
        ];
        check_program_with(
            backend,
            fusion,
            &format!(
                "paged attention {dtype} d{d} blocks of {bs}, partitions of {} ({} up to {} \
                 positions, one pass of {} warps) for {} warps of {}, tiles of {} ({} stages, \
                 {} lanes a key, {} tensor-core warps)",
                fusion.paged.part,
                fusion.paged.short_part,
                fusion.paged.short_context,
                fusion.paged.one_pass,
                fusion.paged.warps,
                fusion.paged.unroll,
                fusion.paged.tile,
                fusion.paged.stages,
                fusion.paged.lanes,
                fusion.paged.mma_warps
            ),
            &source,
            Some(&repo_root().join("stdlib")),
            None,
            &BTreeMap::new(),
            Some(inputs),
        );
    }
}

#[test]
fn paged_attention_on_the_cpu_backend_equals_the_interpreter() {
    check_paged_attention(Backend::Cpu);
}

#[test]
#[ignore = "needs an NVIDIA GPU; run with --include-ignored on a machine with one"]
fn paged_attention_on_the_gpu_equals_the_interpreter() {
    check_paged_attention(Backend::Gpu);
}

/// The tensor-core attention prefill (`flash_attention.rs`) at shapes that are not
/// multiples of its 64-row tiles: causal GQA at head dim 64, more keys than queries at head
/// dim 128 in f16, RoPE'd q computed in the kernel (its k in a buffer of its own) and a
/// padding mask evaluated per score.
fn check_flash_attention(backend: Backend) {
    let source = "import nn
fn causal64(q: bf16[2, 200, 8, 64], k: bf16[2, 200, 2, 64], v: bf16[2, 200, 2, 64]) -> bf16[2, 200, 8, 64] { attention(q, k, v, causal: true) }
fn full128(q: f16[1, 150, 4, 128], k: f16[1, 333, 4, 128], v: f16[1, 333, 4, 128]) -> f16[1, 150, 4, 128] { attention_core(q, k, v, true) }
fn roped(q: bf16[2, 130, 8, 128], k: bf16[2, 130, 2, 128], v: bf16[2, 130, 2, 128]) -> bf16[2, 130, 8, 128] {
    let pos = arange(130)
    attention(rope(q, pos, 10000.0), rope(k, pos, 10000.0), v, causal: true)
}
fn padded(q: bf16[2, 90, 4, 64], k: bf16[2, 100, 4, 64], v: bf16[2, 100, 4, 64], keep: bool[2, 100]) -> bf16[2, 90, 4, 64] { attention_padded(q, k, v, keep) }
";
    check_program(
        backend,
        "flash attention",
        source,
        Some(&repo_root().join("stdlib")),
        None,
        &BTreeMap::new(),
        None,
    );
}

#[test]
fn flash_attention_on_the_cpu_backend_equals_the_interpreter() {
    check_flash_attention(Backend::Cpu);
}

#[test]
#[ignore = "needs an NVIDIA GPU; run with --include-ignored on a machine with one"]
fn flash_attention_on_the_gpu_equals_the_interpreter() {
    check_flash_attention(Backend::Gpu);
}

/// The worked examples of docs/consensus.md: with the agents' preferences (fictitious play),
/// and without them (the similarity as preferences, Hedge).
fn consensus_examples() -> Vec<kiln_runtime::consensus::ConsensusRequest> {
    use kiln_runtime::consensus::{ConsensusRequest, Method};
    let embeddings = vec![
        vec![0.9, 0.1, 0.0, 0.2],
        vec![0.8, 0.2, 0.1, 0.1],
        vec![0.1, 0.9, 0.3, 0.0],
        vec![0.85, 0.0, 0.05, 0.3],
    ];
    let preferences = vec![
        vec![1.0, 0.0, 0.0, 0.0],
        vec![0.0, 1.0, 0.0, 0.0],
        vec![0.0, 0.0, 1.0, 0.0],
    ];
    vec![
        ConsensusRequest {
            embeddings: embeddings.clone(),
            preferences: Some(preferences),
            lambda: 0.5,
            iterations: 500,
            eta: 0.5,
            method: Method::FictitiousPlay,
        },
        ConsensusRequest {
            embeddings,
            preferences: None,
            lambda: 1.0,
            iterations: 500,
            eta: 0.5,
            method: Method::Hedge,
        },
    ]
}

/// The consensus decisions of `backend` equal the interpreter's: the same winner, supports
/// and NashConv within 1e-4 (the documented winners: 0 with preferences, 1 without).
fn check_consensus_decisions(backend: kiln_driver::backend::BackendChoice) {
    use kiln_runtime::consensus::ConsensusSolver;
    let mut reference = ConsensusSolver::interpreter();
    let mut solver = kiln_driver::backend::consensus_solver(backend).expect("a consensus solver");
    for (request, documented_winner) in consensus_examples().iter().zip([0, 1]) {
        let want = reference.decide(request).expect("interpreter decision");
        let got = solver.decide(request).expect("decision");
        let what = format!("{} on {}", request.method.name(), solver.describe());
        assert_eq!(
            want.winner, documented_winner,
            "{what}: the documented winner"
        );
        assert_eq!(got.winner, want.winner, "{what}: winner");
        let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-4);
        assert!(
            close(&got.proposal_support, &want.proposal_support),
            "{what}: support {:?} vs {:?}",
            got.proposal_support,
            want.proposal_support
        );
        assert!(
            (got.nashconv - want.nashconv).abs() <= 1e-4,
            "{what}: NashConv {} vs {}",
            got.nashconv,
            want.nashconv
        );
    }
}

#[test]
fn consensus_decisions_on_the_cpu_backend_equal_the_interpreter() {
    check_consensus_decisions(kiln_driver::backend::BackendChoice::Cpu);
}

#[test]
#[ignore = "needs an NVIDIA GPU; run with --include-ignored on a machine with one"]
fn consensus_decisions_on_the_gpu_equal_the_interpreter() {
    check_consensus_decisions(kiln_driver::backend::BackendChoice::Gpu);
}

// ---------------------------------------------------------------------------------------
// Decode steps submitted ahead, their tokens fed on the executor
// ---------------------------------------------------------------------------------------

/// models/llama.kiln lowered with its `step` entry alone, bf16 parameters and cache blocks
/// of 4 tokens, for the config of tests/fixtures/`fixture`.
fn llama_step_bf16(fixture: &str) -> kiln_lower::Lowered {
    let dir = repo_root().join("tests/fixtures").join(fixture);
    let mut config = read_json(&dir.join("config.json"));
    config["kv_block_size"] = serde_json::json!(4);
    let path = repo_root().join("models/llama.kiln");
    let source = std::fs::read_to_string(&path).expect("program");
    let options = kiln_lower::Options {
        param_dtype: DType::BF16,
        entries: Some(vec!["step".to_string()]),
    };
    compile_source_with(
        "llama.kiln",
        &source,
        path.parent(),
        Some(&config),
        &options,
    )
    .unwrap_or_else(|d| panic!("{d}"))
}

/// [`llama_step_bf16`] on tiny-llama, and its weights.
fn tiny_llama_step() -> (kiln_lower::Lowered, Arc<kiln_runtime::Weights>) {
    let lowered = llama_step_bf16("tiny-llama");
    let dir = repo_root().join("tests/fixtures/tiny-llama");
    let weights = kiln_runtime::Weights::load(&dir, &lowered.params).expect("weights");
    (lowered, Arc::new(weights))
}

/// Greedy decoding of two sequences with every step submitted before the step before it is
/// collected, its tokens that step's greedy tokens fed on the executor
/// (`PagedModel::submit_greedy`, chained), gives the tokens of step-by-step decoding
/// (`step_greedy`, each token read back before the next step); the two runs use disjoint
/// cache blocks of one executor and the same batch shapes. A chained step over other
/// sequences than the step before, or a collect with nothing submitted, is an error that
/// leaves the model usable.
fn check_chained_greedy(executor: &mut dyn kiln_runtime::Executor) {
    use kiln_runtime::{PagedModel, StepSequence, STEP_ENTRY};
    const PROMPT: usize = 5;
    const NEW: usize = 9;
    let prompts: [Vec<u32>; 2] = [
        (0..PROMPT as u32).map(|i| (i * 37 + 11) % 256).collect(),
        (0..PROMPT as u32).map(|i| (i * 53 + 7) % 256).collect(),
    ];
    let module = executor.module().clone();
    // 4 blocks of 4 tokens hold a sequence (5 + 9 tokens); two runs of two sequences.
    let mut model = PagedModel::new(&module, STEP_ENTRY, 16, 4, 16).expect("step entry");
    let blocks: Vec<Vec<u32>> = (0..4).map(|s| (4 * s..4 * s + 4).collect()).collect();
    fn batch<'a>(
        tokens: &'a [Vec<u32>; 2],
        cached: usize,
        blocks: &'a [Vec<u32>],
    ) -> Vec<StepSequence<'a>> {
        tokens
            .iter()
            .zip(blocks)
            .map(|(tokens, blocks)| StepSequence {
                tokens,
                cached,
                blocks,
            })
            .collect()
    }
    let push = |tokens: &mut [Vec<u32>; 2], next: &[u32]| {
        for (sequence, &token) in tokens.iter_mut().zip(next) {
            sequence.push(token);
        }
    };
    let mut want = prompts.clone();
    let mut cached = 0;
    while want[0].len() < PROMPT + NEW {
        let next = model
            .step_greedy(executor, &batch(&want, cached, &blocks[..2]))
            .expect("step");
        cached = want[0].len();
        push(&mut want, &next);
    }

    let mut got = prompts.clone();
    let first = model
        .step_greedy(executor, &batch(&got, 0, &blocks[2..]))
        .expect("prefill");
    push(&mut got, &first);
    // Tokens whose values the host has; the rest are placeholders of submitted steps.
    let mut known = got[0].len();
    let mut chained = false;
    while got[0].len() < PROMPT + NEW {
        let cached = got[0].len() - 1;
        model
            .submit_greedy(executor, &batch(&got, cached, &blocks[2..]), chained)
            .expect("submit");
        if chained {
            let next = model.collect_greedy(executor).expect("collect");
            for (sequence, token) in got.iter_mut().zip(next) {
                sequence[known] = token;
            }
            known += 1;
        }
        push(&mut got, &[u32::MAX, u32::MAX]);
        chained = true;
    }
    let next = model.collect_greedy(executor).expect("collect the last");
    for (sequence, token) in got.iter_mut().zip(next) {
        sequence[known] = token;
    }
    assert_eq!(got, want, "{}", executor.describe());

    let one = [StepSequence {
        tokens: &got[0],
        cached: got[0].len() - 1,
        blocks: &blocks[2],
    }];
    let err = model.submit_greedy(executor, &one, true).unwrap_err();
    assert!(err.to_string().contains("had 2 sequences, not 1"), "{err}");
    let err = model.collect_greedy(executor).unwrap_err();
    assert!(err.to_string().contains("not collected"), "{err}");
    let again = model
        .step_greedy(executor, &batch(&prompts, 0, &blocks[2..]))
        .expect("the model is still usable");
    assert_eq!(again, first);
}

#[test]
fn chained_greedy_steps_on_the_cpu_backend_equal_step_by_step() {
    let (lowered, weights) = tiny_llama_step();
    let mut plans =
        kiln_runtime::CpuPlans::compile(lowered.module, weights, &mut kiln_runtime::NoProgress)
            .expect("compiles");
    check_chained_greedy(&mut plans);
    let (lowered, weights) = tiny_llama_step();
    let mut interpreter = kiln_runtime::Interpreter::new(lowered.module, weights);
    check_chained_greedy(&mut interpreter);
}

#[test]
#[ignore = "needs an NVIDIA GPU; run with --include-ignored on a machine with one"]
fn chained_greedy_steps_on_the_gpu_equal_step_by_step() {
    let (device, toolchain, target) = gpu();
    let (lowered, weights) = tiny_llama_step();
    let parts = (device.clone(), *target, toolchain.clone());
    let mut plans = kiln_driver::backend::gpu_plans("llama.kiln", lowered, weights, parts)
        .expect("compiles for the GPU");
    check_chained_greedy(&mut plans);
}

/// Reductions over constant rows of a vocabulary's length (a block of threads a row, several
/// positions' loads a step): the greedy argmax over 32000 logits, a sum over 20001
/// elements, a softmax that stores the row; random data, so the argmax has no ties.
const LONG_ROWS: &str = "
fn greedy(x: f32[3, 32000]) -> i64[3] { argmax(x, axis: -1) }
fn total(x: bf16[2, 20001]) -> f32[2] { sum(f32(x), axis: -1) }
fn probabilities(x: f32[2, 20001]) -> f32[2, 20001] {
    let e = exp(x - max(x, axis: -1, keep: true))
    e / sum(e, axis: -1, keep: true)
}
";

#[test]
fn long_rows_on_the_cpu_backend_equal_the_interpreter() {
    check_program(
        Backend::Cpu,
        "long_rows.kiln",
        LONG_ROWS,
        None,
        None,
        &BTreeMap::new(),
        None,
    );
}

#[test]
#[ignore = "needs an NVIDIA GPU; run with --include-ignored on a machine with one"]
fn long_rows_on_the_gpu_equal_the_interpreter() {
    check_program(
        Backend::Gpu,
        "long_rows.kiln",
        LONG_ROWS,
        None,
        None,
        &BTreeMap::new(),
        None,
    );
}
