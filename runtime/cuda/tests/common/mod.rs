//! What the kiln-cuda tests share: the GPU gate, hand-written PTX kernels with their
//! manifest entries, the plans run over them, and a package built with ptxas/fatbinary.
#![allow(dead_code)]

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use kiln_cuda::{CudaDevice, CudaPackage};
use kiln_ir::{DType, Tensor};
use kiln_kir::manifest::{KernelInfo, Manifest, ParamLayout, WeightInfo};
use kiln_kir::{Arg, BufferDecl, BufferId, BufferKind, Plan, SizeExpr, Step, SymBinding};
use kiln_ptx::{AssembleOptions, Target, Toolchain};

/// Threads per block of the test kernels.
pub const BLOCK: u32 = 128;

/// Writes a line to the real stderr, past the test harness's output capture, so that the
/// log of a plain `cargo test` shows it.
pub fn log_line(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Device 0, for the tests that need a GPU (they are `#[ignore]`d, so they only run when
/// asked for); a missing or failing GPU fails them.
pub fn gpu() -> CudaDevice {
    CudaDevice::new(0).unwrap_or_else(|error| panic!("this test needs a usable GPU: {error}"))
}

pub fn sym(name: &str) -> SizeExpr {
    SizeExpr::Sym(name.to_string())
}

pub fn konst(value: u64) -> SizeExpr {
    SizeExpr::Const(value)
}

pub fn mul(a: SizeExpr, b: SizeExpr) -> SizeExpr {
    SizeExpr::Mul(Box::new(a), Box::new(b))
}

pub fn add(a: SizeExpr, b: SizeExpr) -> SizeExpr {
    SizeExpr::Add(Box::new(a), Box::new(b))
}

pub fn ceil_div(a: SizeExpr, b: SizeExpr) -> SizeExpr {
    SizeExpr::CeilDiv(Box::new(a), Box::new(b))
}

/// One PTX entry `name(a, b, out, n)`: `out[i] = a[i] OP b[i]` for `i < n`, one element a
/// thread, where `instruction` is the PTX of OP on f32 (`add.rn.f32`). With `max_threads`,
/// the entry declares `.maxntid` (launching more threads a block must then fail).
pub fn elementwise_entry(name: &str, instruction: &str, max_threads: Option<u32>) -> String {
    let max_threads = max_threads
        .map(|threads| format!(" .maxntid {threads}, 1, 1"))
        .unwrap_or_default();
    format!(
        r#"
.visible .entry {name}(
    .param .u64 {name}_a,
    .param .u64 {name}_b,
    .param .u64 {name}_out,
    .param .u64 {name}_n
){max_threads}
{{
    .reg .pred %p<2>;
    .reg .b32 %r<4>;
    .reg .f32 %f<4>;
    .reg .b64 %rd<12>;

    ld.param.u64 %rd1, [{name}_a];
    ld.param.u64 %rd2, [{name}_b];
    ld.param.u64 %rd3, [{name}_out];
    ld.param.u64 %rd4, [{name}_n];
    mov.u32 %r1, %ctaid.x;
    mov.u32 %r2, %ntid.x;
    mov.u32 %r3, %tid.x;
    mul.wide.u32 %rd5, %r1, %r2;
    cvt.u64.u32 %rd6, %r3;
    add.s64 %rd5, %rd5, %rd6;
    setp.ge.s64 %p1, %rd5, %rd4;
    @%p1 bra $L_done;
    shl.b64 %rd7, %rd5, 2;
    cvta.to.global.u64 %rd8, %rd1;
    cvta.to.global.u64 %rd9, %rd2;
    cvta.to.global.u64 %rd10, %rd3;
    add.s64 %rd8, %rd8, %rd7;
    add.s64 %rd9, %rd9, %rd7;
    add.s64 %rd10, %rd10, %rd7;
    ld.global.f32 %f1, [%rd8];
    ld.global.f32 %f2, [%rd9];
    {instruction} %f3, %f1, %f2;
    st.global.f32 [%rd10], %f3;
$L_done:
    ret;
}}
"#
    )
}

/// The test module: `vadd_f32`, `vmul_f32` and `vadd_small_block` (`.maxntid 64`), as
/// PTX 8.0 for sm_80 (JIT-able by a CUDA 13.0 driver).
pub fn test_ptx() -> String {
    let mut ptx = String::from(".version 8.0\n.target sm_80\n.address_size 64\n");
    ptx.push_str(&elementwise_entry("vadd_f32", "add.rn.f32", None));
    ptx.push_str(&elementwise_entry("vmul_f32", "mul.rn.f32", None));
    ptx.push_str(&elementwise_entry(
        "vadd_small_block",
        "add.rn.f32",
        Some(64),
    ));
    ptx
}

/// The manifest entry of an elementwise test kernel over `n` elements.
pub fn elementwise_kernel(name: &str) -> KernelInfo {
    let buffer = |param: &str, writes: bool| ParamLayout::Buffer {
        name: param.to_string(),
        dtype: DType::F32,
        writes,
    };
    KernelInfo {
        name: name.to_string(),
        params: vec![
            buffer("a", false),
            buffer("b", false),
            buffer("out", true),
            ParamLayout::Scalar {
                name: "n".to_string(),
                ty: "i64".to_string(),
            },
        ],
        block_dim: BLOCK,
        grid: [
            ceil_div(sym("n"), konst(u64::from(BLOCK))),
            konst(1),
            konst(1),
        ],
        shared_bytes: 0,
        dynamic_shared_bytes: 0,
    }
}

/// Kernel indices in [`test_kernels`].
pub const VADD: usize = 0;
pub const VMUL: usize = 1;
pub const VADD_SMALL_BLOCK: usize = 2;

pub fn test_kernels() -> Vec<KernelInfo> {
    vec![
        elementwise_kernel("vadd_f32"),
        elementwise_kernel("vmul_f32"),
        elementwise_kernel("vadd_small_block"),
    ]
}

pub fn buffer(id: u32, dtype: DType, shape: Vec<SizeExpr>, kind: BufferKind) -> BufferDecl {
    BufferDecl {
        id: BufferId(id),
        dtype,
        shape,
        kind,
        offset: None,
    }
}

pub fn temp(id: u32, dtype: DType, shape: Vec<SizeExpr>, offset: SizeExpr) -> BufferDecl {
    BufferDecl {
        offset: Some(offset),
        ..buffer(id, dtype, shape, BufferKind::Temp)
    }
}

pub fn launch(kernel: usize, buffers: [u32; 3]) -> Step {
    let mut args: Vec<Arg> = buffers
        .iter()
        .map(|&id| Arg::Buffer(BufferId(id)))
        .collect();
    args.push(Arg::Sym("n".to_string()));
    Step::Launch { kernel, args }
}

pub fn n_from_input_0() -> Vec<SymBinding> {
    vec![SymBinding {
        name: "n".to_string(),
        input: 0,
        axis: 0,
    }]
}

/// `out = a + b` over `n` elements.
pub fn vector_add_plan() -> Plan {
    Plan {
        function: "vector_add".to_string(),
        symbols: n_from_input_0(),
        buffers: vec![
            buffer(0, DType::F32, vec![sym("n")], BufferKind::Input(0)),
            buffer(1, DType::F32, vec![sym("n")], BufferKind::Input(1)),
            buffer(2, DType::F32, vec![sym("n")], BufferKind::Output(0)),
        ],
        inputs: vec![BufferId(0), BufferId(1)],
        outputs: vec![BufferId(2)],
        steps: vec![launch(VADD, [0, 1, 2])],
        arena_bytes: konst(0),
        symbol_bound: None,
    }
}

/// `t = a + b` (a temp), `out = view(t) * b` and `sum = copy of view(t)`.
pub fn two_launch_plan() -> Plan {
    Plan {
        function: "add_then_mul".to_string(),
        symbols: n_from_input_0(),
        buffers: vec![
            buffer(0, DType::F32, vec![sym("n")], BufferKind::Input(0)),
            buffer(1, DType::F32, vec![sym("n")], BufferKind::Input(1)),
            temp(2, DType::F32, vec![sym("n")], konst(0)),
            buffer(
                3,
                DType::F32,
                vec![sym("n"), konst(1)],
                BufferKind::View(BufferId(2)),
            ),
            buffer(4, DType::F32, vec![sym("n")], BufferKind::Output(0)),
            buffer(
                5,
                DType::F32,
                vec![sym("n"), konst(1)],
                BufferKind::Output(1),
            ),
        ],
        inputs: vec![BufferId(0), BufferId(1)],
        outputs: vec![BufferId(4), BufferId(5)],
        steps: vec![
            launch(VADD, [0, 1, 2]),
            launch(VMUL, [3, 1, 4]),
            Step::Copy {
                src: BufferId(3),
                dst: BufferId(5),
            },
        ],
        arena_bytes: mul(sym("n"), konst(4)),
        symbol_bound: None,
    }
}

/// The checkpoint name of [`weighted_plan`]'s weight.
pub const WEIGHT_NAME: &str = "layers.0.bias";
/// Elements of [`weighted_plan`]'s input and weight.
pub const WEIGHT_LEN: u64 = 256;

/// `out = x + w`, `w` a checkpoint weight of [`WEIGHT_LEN`] elements.
pub fn weighted_plan() -> Plan {
    Plan {
        function: "add_bias".to_string(),
        symbols: n_from_input_0(),
        buffers: vec![
            buffer(0, DType::F32, vec![konst(WEIGHT_LEN)], BufferKind::Input(0)),
            buffer(
                1,
                DType::F32,
                vec![konst(WEIGHT_LEN)],
                BufferKind::Weight(WEIGHT_NAME.to_string()),
            ),
            buffer(
                2,
                DType::F32,
                vec![konst(WEIGHT_LEN)],
                BufferKind::Output(0),
            ),
        ],
        inputs: vec![BufferId(0)],
        outputs: vec![BufferId(2)],
        steps: vec![launch(VADD, [0, 1, 2])],
        arena_bytes: konst(0),
        symbol_bound: None,
    }
}

pub fn weight_info() -> WeightInfo {
    WeightInfo {
        checkpoint_name: WEIGHT_NAME.to_string(),
        dtype: DType::F32,
        shape: vec![WEIGHT_LEN],
        declared_as: vec!["bias".to_string()],
    }
}

/// `x = a; repeat count times: x = x + b`, then `out = x` (so `out = a + count * b`).
pub fn loop_plan() -> Plan {
    let n_bytes = || mul(sym("n"), konst(4));
    Plan {
        function: "repeat_add".to_string(),
        symbols: n_from_input_0(),
        buffers: vec![
            buffer(0, DType::F32, vec![sym("n")], BufferKind::Input(0)),
            buffer(1, DType::F32, vec![sym("n")], BufferKind::Input(1)),
            buffer(2, DType::I64, vec![], BufferKind::Input(2)),
            temp(3, DType::F32, vec![sym("n")], konst(0)),
            temp(4, DType::F32, vec![sym("n")], n_bytes()),
            temp(5, DType::I64, vec![], mul(n_bytes(), konst(2))),
            buffer(6, DType::F32, vec![sym("n")], BufferKind::Output(0)),
        ],
        inputs: vec![BufferId(0), BufferId(1), BufferId(2)],
        outputs: vec![BufferId(6)],
        steps: vec![
            Step::Loop {
                count: BufferId(2),
                carried: vec![BufferId(3)],
                init: vec![BufferId(0)],
                next: vec![BufferId(4)],
                counter: BufferId(5),
                body: vec![launch(VADD, [3, 1, 4])],
            },
            Step::Copy {
                src: BufferId(3),
                dst: BufferId(6),
            },
        ],
        arena_bytes: add(mul(n_bytes(), konst(2)), konst(8)),
        symbol_bound: None,
    }
}

/// [`loop_plan`] with the count copied to a temp first, so that the runtime reads it back
/// from the device instead of from the caller's tensor.
pub fn device_count_loop_plan() -> Plan {
    let mut plan = loop_plan();
    plan.function = "repeat_add_device_count".to_string();
    let count_offset = add(mul(mul(sym("n"), konst(4)), konst(2)), konst(8));
    plan.buffers
        .push(temp(7, DType::I64, vec![], count_offset.clone()));
    plan.arena_bytes = add(count_offset, konst(8));
    if let Step::Loop { count, .. } = &mut plan.steps[0] {
        *count = BufferId(7);
    }
    plan.steps.insert(
        0,
        Step::Copy {
            src: BufferId(2),
            dst: BufferId(7),
        },
    );
    plan
}

/// A manifest of `kernels` and `plans`.
pub fn manifest(kernels: Vec<KernelInfo>, plans: Vec<Plan>, weights: Vec<WeightInfo>) -> Manifest {
    Manifest {
        format: Manifest::FORMAT,
        program: "kiln-cuda tests".to_string(),
        config: serde_json::Map::new(),
        targets: Vec::new(),
        ptx_target: Some("sm_80".to_string()),
        dependent_launch: false,
        kernels,
        plans,
        weights,
        resources: Vec::new(),
    }
}

/// The manifest of the test package: every test kernel and plan.
pub fn test_manifest() -> Manifest {
    manifest(
        test_kernels(),
        vec![
            vector_add_plan(),
            two_launch_plan(),
            weighted_plan(),
            loop_plan(),
            device_count_loop_plan(),
        ],
        vec![weight_info()],
    )
}

/// A fatbin of [`test_ptx`]: the PTX for JIT, plus (with `with_cubin`) a cubin for the
/// device's own target, built by ptxas.
pub fn test_fatbin(device: &CudaDevice, with_cubin: bool) -> (Vec<u8>, Vec<String>) {
    let toolchain = Toolchain::discover().unwrap_or_else(|error| panic!("{error}"));
    let ptx = test_ptx();
    let (major, minor) = device.info().compute_capability;
    let mut cubins = Vec::new();
    if with_cubin {
        let target = Target::for_compute_capability(major, minor)
            .filter(|target| target.cubin_runs_on(major, minor))
            .unwrap_or_else(|| panic!("kiln has no cubin target for sm_{major}{minor}"));
        let assembled = toolchain
            .assemble(&ptx, target, &AssembleOptions::default())
            .unwrap_or_else(|error| panic!("{error}"));
        cubins.push((target, assembled.cubin));
    }
    let targets = cubins
        .iter()
        .map(|(target, _)| target.to_string())
        .collect();
    let fatbin = toolchain
        .fatbin(&cubins, Some((&ptx, Target::Sm80)))
        .unwrap_or_else(|error| panic!("{error}"));
    (fatbin, targets)
}

/// A directory of its own under the system temp directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(purpose: &str) -> TempDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "kiln-cuda-{purpose}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes `manifest.json` and `kernels.fatbin` into `dir`.
pub fn write_package(dir: &TempDir, manifest: &Manifest, fatbin: &[u8]) {
    let json = serde_json::to_string_pretty(manifest).unwrap();
    std::fs::write(dir.0.join(Manifest::FILE), json).unwrap();
    std::fs::write(dir.0.join(Manifest::FATBIN), fatbin).unwrap();
}

/// The test package, written to a directory and loaded from it with a cubin for the device.
pub fn test_package(device: &CudaDevice) -> Arc<CudaPackage> {
    let (fatbin, targets) = test_fatbin(device, true);
    let mut manifest = test_manifest();
    manifest.targets = targets;
    let dir = TempDir::new("package");
    write_package(&dir, &manifest, &fatbin);
    Arc::new(CudaPackage::load(device, &dir.0).unwrap_or_else(|error| panic!("{error}")))
}

/// `len` distinct, exactly representable f32 values starting near `start`.
pub fn ramp(len: usize, start: f32) -> Vec<f32> {
    (0..len).map(|i| start + (i % 1000) as f32 * 0.25).collect()
}

pub fn f32_tensor(values: Vec<f32>) -> Tensor {
    let len = values.len();
    Tensor::from_f32(&[len], values)
}
