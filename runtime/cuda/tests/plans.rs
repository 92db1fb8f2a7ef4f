//! The checks that run before anything reaches the GPU, as specifications: plan
//! validation, symbol binding, buffer placement, input and weight checks, manifest reading
//! and the test PTX itself. None of these needs a GPU.

mod common;

use common::*;
use kiln_cuda::binding::{check_inputs, check_weight, expected_weight};
use kiln_cuda::{bind_symbols, check_plan, place, CudaError, CudaPackage, Placement, Storage};
use kiln_cuda::{working_bytes, LaunchShape, SymbolValues};
use kiln_ir::{DType, Tensor};
use kiln_kir::manifest::Manifest;
use kiln_kir::{Arg, BufferId, BufferKind, Step};
use kiln_ptx::{AssembleOptions, Target, Toolchain};

/// The message of a plan check that must fail.
fn plan_error(plan: &kiln_kir::Plan) -> String {
    check_plan(plan, &test_kernels())
        .expect_err("the plan is bad")
        .to_string()
}

#[test]
fn the_test_plans_are_valid() {
    for plan in test_manifest().plans {
        check_plan(&plan, &test_kernels()).unwrap_or_else(|error| panic!("{error}"));
    }
}

#[test]
fn a_launch_with_too_few_arguments_names_the_kernel_and_its_parameters() {
    let mut plan = vector_add_plan();
    plan.steps = vec![Step::Launch {
        kernel: VADD,
        args: vec![Arg::Buffer(BufferId(0)), Arg::Buffer(BufferId(1))],
    }];
    assert_eq!(
        plan_error(&plan),
        "plan `vector_add`: step 0 launches kernel `vadd_f32`: 2 arguments for 4 parameters \
         (a, b, out, n)"
    );
}

#[test]
fn a_buffer_of_the_wrong_dtype_is_named() {
    let mut plan = vector_add_plan();
    plan.buffers[1].dtype = DType::F16;
    assert_eq!(
        plan_error(&plan),
        "plan `vector_add`: step 0 launches kernel `vadd_f32`: parameter `b` is a f32 buffer, \
         but b1 is f16"
    );
}

#[test]
fn kinds_of_arguments_must_match_the_parameters() {
    let mut plan = vector_add_plan();
    plan.steps = vec![Step::Launch {
        kernel: VADD,
        args: vec![
            Arg::Sym("n".to_string()),
            Arg::Buffer(BufferId(1)),
            Arg::Buffer(BufferId(2)),
            Arg::Buffer(BufferId(0)),
        ],
    }];
    assert!(plan_error(&plan).ends_with("parameter `a` is a buffer, but it is given symbol `n`"));
    plan.steps = vec![Step::Launch {
        kernel: 9,
        args: Vec::new(),
    }];
    assert!(plan_error(&plan).ends_with("step 0 launches kernel #9, but the package has 3 kernels"));
}

#[test]
fn temps_views_and_loops_are_checked() {
    let mut no_offset = two_launch_plan();
    no_offset.buffers[2].offset = None;
    assert!(plan_error(&no_offset).ends_with("temp buffer b2 has no arena offset"));

    let mut cycle = two_launch_plan();
    cycle.buffers[2].kind = BufferKind::View(BufferId(3));
    cycle.buffers[2].offset = None;
    assert!(plan_error(&cycle).contains("is part of a cycle of views"));

    let mut undeclared = two_launch_plan();
    undeclared.steps.push(Step::Copy {
        src: BufferId(2),
        dst: BufferId(42),
    });
    assert!(plan_error(&undeclared).ends_with("buffer b42 is used but not declared"));

    let mut counter = loop_plan();
    counter.buffers[5].dtype = DType::I32;
    assert!(plan_error(&counter).ends_with("step 0: the loop counter b5 is i32, not i64"));

    let mut body = loop_plan();
    if let Step::Loop { body, .. } = &mut body.steps[0] {
        body[0] = launch(VADD, [3, 2, 4]);
    }
    assert!(
        plan_error(&body).contains("step 0, body step 0 launches kernel `vadd_f32`: parameter `b`")
    );
}

#[test]
fn symbols_come_from_input_shapes_and_must_agree() {
    let plan = two_launch_plan();
    let symbols = bind_symbols(&plan, &[&[1000], &[1000]]).unwrap();
    assert_eq!(symbols, SymbolValues::from_pairs([("n", 1000)]));
    assert_eq!(symbols.to_string(), "n=1000");

    let mut twice = plan.clone();
    twice.symbols.push(kiln_kir::SymBinding {
        name: "n".to_string(),
        input: 1,
        axis: 0,
    });
    let conflict = bind_symbols(&twice, &[&[1000], &[999]])
        .unwrap_err()
        .to_string();
    assert_eq!(
        conflict,
        "input 1 of `add_then_mul`: symbol `n` is 999 on axis 0 here but 1000 on axis 0 of input 0"
    );
    let missing = bind_symbols(&plan, &[]).unwrap_err().to_string();
    assert!(missing.contains("only 0 inputs were given"), "{missing}");
    let scalar = bind_symbols(&plan, &[&[]]).unwrap_err().to_string();
    assert!(
        scalar.contains("read from axis 0, but the input has shape []"),
        "{scalar}"
    );
}

#[test]
fn inputs_are_checked_against_the_plan() {
    let plan = vector_add_plan();
    let symbols = SymbolValues::from_pairs([("n", 4)]);
    let a = f32_tensor(vec![1.0; 4]);
    check_inputs(&plan, &[a.clone(), a.clone()], &symbols).unwrap();
    let short = f32_tensor(vec![1.0; 3]);
    let message = check_inputs(&plan, &[a.clone(), short], &symbols)
        .unwrap_err()
        .to_string();
    assert_eq!(
        message,
        "input 1 of `vector_add`: expected f32 [4] (n=4), got f32 [3]"
    );
    let count = check_inputs(&plan, &[a], &symbols).unwrap_err().to_string();
    assert!(
        count.ends_with("1 inputs were given, the plan takes 2"),
        "{count}"
    );
}

#[test]
fn buffers_are_placed_in_their_storage() {
    let plan = two_launch_plan();
    let symbols = SymbolValues::from_pairs([("n", 10)]);
    let at = |id: u32| place(&plan, BufferId(id), &symbols).unwrap();
    // The inputs side by side, each at a multiple of 256 bytes.
    assert_eq!(
        [at(0), at(1)],
        [0, 256].map(|offset| Placement {
            storage: Storage::Inputs,
            offset,
            bytes: 40
        })
    );
    assert_eq!(
        kiln_cuda::layout::input_block(&plan, &symbols).unwrap(),
        (vec![(BufferId(0), 0), (BufferId(1), 256)], 512)
    );
    assert_eq!(at(2).storage, Storage::Arena);
    // A view is its base's memory from offset 0.
    assert_eq!(at(3), at(2));

    let looped = loop_plan();
    let counter = place(&looped, BufferId(5), &symbols).unwrap();
    assert_eq!(
        (counter.storage, counter.offset, counter.bytes),
        (Storage::Arena, 80, 8)
    );

    let mut overflowing = two_launch_plan();
    overflowing.buffers[2].offset = Some(konst(4));
    let message = place(&overflowing, BufferId(2), &symbols)
        .unwrap_err()
        .to_string();
    assert_eq!(
        message,
        "plan `add_then_mul`: temp buffer b2 (40 bytes at offset 4) does not fit in the arena \
         of 40 bytes (n=10)"
    );
}

#[test]
fn working_bytes_count_the_arena_and_the_buffers_not_updated_in_place() {
    let symbols = SymbolValues::from_pairs([("n", 10)]);
    let mut plan = two_launch_plan();
    // The arena (n f32), the inputs' allocation (two inputs of n f32, each padded to 256
    // bytes) and two outputs of n f32.
    assert_eq!(
        working_bytes(&plan, &symbols).unwrap(),
        40 + 2 * 256 + 2 * 40
    );
    // An input the plan updates in place is left to the caller (a server's KV cache), and
    // has an allocation of its own.
    plan.outputs[1] = BufferId(1);
    plan.buffers.remove(5);
    assert_eq!(working_bytes(&plan, &symbols).unwrap(), 40 + 256 + 40);
    assert_eq!(
        place(&plan, BufferId(1), &symbols).unwrap().storage,
        Storage::Own(BufferId(1))
    );
    let unbound = working_bytes(&plan, &SymbolValues::new()).unwrap_err();
    assert!(unbound.to_string().contains("n"), "{unbound}");
}

#[test]
fn weights_are_checked_by_name_dtype_and_shape() {
    let plan = weighted_plan();
    let decl = &plan.buffers[1];
    let (dtype, shape) = expected_weight(&plan, decl, WEIGHT_NAME, &[weight_info()]).unwrap();
    assert_eq!(
        (dtype, shape.as_slice()),
        (DType::F32, &[WEIGHT_LEN as usize][..])
    );

    let wrong = Tensor::zeros(DType::F32, &[128]);
    let error = check_weight(WEIGHT_NAME, dtype, &shape, &wrong).unwrap_err();
    assert!(matches!(error, CudaError::WeightMismatch { .. }));
    assert_eq!(
        error.to_string(),
        "weight `layers.0.bias` is f32 [128], but the package expects f32 [256]"
    );

    let mut listed = weight_info();
    listed.dtype = DType::BF16;
    let disagreement = expected_weight(&plan, decl, WEIGHT_NAME, &[listed])
        .unwrap_err()
        .to_string();
    assert!(
        disagreement.contains("declared f32 [256] in the plan (b1) but bf16 [256] in the manifest")
    );
}

#[test]
fn launch_shapes_come_from_the_manifest() {
    let kernel = elementwise_kernel("vadd_f32");
    let shape = LaunchShape::for_kernel(&kernel, &SymbolValues::from_pairs([("n", 1000)]))
        .unwrap()
        .unwrap();
    assert_eq!(shape.to_string(), "grid (8, 1, 1), block (128, 1, 1)");
    let empty = LaunchShape::for_kernel(&kernel, &SymbolValues::from_pairs([("n", 0)])).unwrap();
    assert_eq!(empty, None, "an empty grid launches nothing");
}

#[test]
fn manifests_are_read_from_a_package_directory() {
    let dir = TempDir::new("manifest");
    write_package(&dir, &test_manifest(), b"not read here");
    assert_eq!(CudaPackage::read_manifest(&dir.0).unwrap(), test_manifest());

    let mut future = test_manifest();
    future.format = Manifest::FORMAT + 1;
    write_package(&dir, &future, b"");
    let message = CudaPackage::read_manifest(&dir.0).unwrap_err().to_string();
    assert!(
        message.contains("format version 2, but this runtime reads version 1"),
        "{message}"
    );

    std::fs::write(dir.0.join(Manifest::FILE), "{").unwrap();
    let broken = CudaPackage::read_manifest(&dir.0).unwrap_err();
    assert!(matches!(broken, CudaError::BadManifest { .. }), "{broken}");
    let missing = CudaPackage::read_manifest(&dir.0.join("nowhere")).unwrap_err();
    assert!(
        missing.to_string().starts_with("could not read `"),
        "{missing}"
    );
}

#[test]
fn the_test_ptx_assembles_for_every_target() {
    let toolchain = match Toolchain::discover() {
        Ok(toolchain) => toolchain,
        Err(error) => {
            log_line(&format!("NOT RUN (no ptxas): {error}"));
            return;
        }
    };
    let ptx = test_ptx();
    for target in [Target::Sm80, Target::Sm90a] {
        let assembled = toolchain
            .assemble(&ptx, target, &AssembleOptions::default())
            .unwrap_or_else(|error| panic!("{error}"));
        assert!(assembled.cubin.starts_with(b"\x7fELF"));
    }
    if toolchain.fatbinary_path().is_some() {
        let fatbin = toolchain
            .fatbin::<Vec<u8>>(&[], Some((&ptx, Target::Sm80)))
            .unwrap();
        assert_eq!(&fatbin[..4], &kiln_ptx::FATBIN_MAGIC.to_le_bytes());
    }
}
