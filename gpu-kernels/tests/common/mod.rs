//! Test helpers: a plan runner around kiln-kir's reference interpreter, and `check`, which
//! compiles a graph function, runs its plan and compares every result with the graph
//! interpreter's.
//!
//! Tolerances: f32 results within a relative error (max |a - b| / max |b|) of 1e-5 (f32
//! accumulation in a different order than the interpreter's f64); results of narrow float
//! dtypes within 2e-2 (fused kernels do not round intermediates to bf16/f16 as the
//! interpreter does after every op); integers and bools exactly.

#![allow(dead_code)]

use kiln_gpu_kernels::{compile_function, CompiledFunction, Options};
use kiln_ir::{DType, Dim, Function, Module, Tensor};
use kiln_kir::{Arg, BufferId, BufferKind, Const, Kernel, Param, Plan, Step};
use std::collections::BTreeMap;

/// Where a buffer's bytes live: an allocation and a byte range in it.
#[derive(Clone, Copy, Debug)]
struct Loc {
    alloc: usize,
    offset: usize,
    len: usize,
}

struct Machine<'a> {
    kernels: &'a [Kernel],
    plan: &'a Plan,
    symbols: BTreeMap<String, u64>,
    memory: Vec<Vec<u8>>,
    locs: Vec<Loc>,
    /// The memory before the last launch, when a launch came last: what the next kernel's
    /// statements before its grid-dependency wait read (programmatic dependent launch may
    /// run them before that launch's writes). A copy waits for everything before it.
    before_last: Option<Vec<Vec<u8>>>,
}

impl Machine<'_> {
    fn sym(&self) -> impl Fn(&str) -> Option<u64> + '_ {
        |s: &str| self.symbols.get(s).copied()
    }

    fn bytes(&self, b: BufferId) -> &[u8] {
        let l = self.locs[b.0 as usize];
        &self.memory[l.alloc][l.offset..l.offset + l.len]
    }

    fn write(&mut self, b: BufferId, data: &[u8]) {
        let l = self.locs[b.0 as usize];
        assert_eq!(data.len(), l.len, "buffer {b:?}: size mismatch");
        self.memory[l.alloc][l.offset..l.offset + l.len].copy_from_slice(data);
    }

    fn run(&mut self, steps: &[Step]) -> Result<(), String> {
        for step in steps {
            match step {
                Step::Launch { kernel, args } => {
                    let k = &self.kernels[*kernel];
                    let grid = kiln_kir::launch_grid(k, &self.sym()).map_err(|e| e.to_string())?;
                    let mut bufs: Vec<(BufferId, Vec<u8>, bool)> = Vec::new();
                    let mut scalars = Vec::new();
                    for (p, a) in k.params.iter().zip(args) {
                        match (p, a) {
                            (Param::Buffer { access, .. }, Arg::Buffer(b)) => {
                                let writes = access.writes();
                                bufs.push((*b, self.bytes(*b).to_vec(), writes));
                            }
                            (Param::Scalar { .. }, Arg::Sym(s)) => {
                                let v =
                                    self.symbols.get(s).copied().ok_or(format!("unbound {s}"))?;
                                scalars.push(Const::I64(v as i64));
                            }
                            _ => return Err(format!("{}: argument kind mismatch", k.name)),
                        }
                    }
                    {
                        let earlier = self.before_last.replace(self.memory.clone());
                        let earlier = earlier.as_ref().unwrap_or(&self.memory);
                        let before: Vec<&[u8]> = bufs
                            .iter()
                            .map(|(b, _, _)| {
                                let l = self.locs[b.0 as usize];
                                &earlier[l.alloc][l.offset..l.offset + l.len]
                            })
                            .collect();
                        let mut slices: Vec<&mut [u8]> =
                            bufs.iter_mut().map(|(_, d, _)| d.as_mut_slice()).collect();
                        kiln_kir::run_kernel_across_wait(k, grid, &before, &mut slices, &scalars)
                            .map_err(|e| e.to_string())?;
                    }
                    for (b, data, writes) in bufs {
                        if writes {
                            self.write(b, &data);
                        }
                    }
                }
                Step::Copy { src, dst } => {
                    let data = self.bytes(*src).to_vec();
                    self.write(*dst, &data);
                    self.before_last = None;
                }
                Step::Loop {
                    count,
                    carried,
                    init,
                    next,
                    counter,
                    body,
                } => {
                    let decl = &self.plan.buffers[count.0 as usize];
                    let t = Tensor::from_le_bytes(decl.dtype, &[], self.bytes(*count))
                        .map_err(|e| e.to_string())?;
                    let n = t.to_i64_vec()[0];
                    for (c, i) in carried.iter().zip(init) {
                        let data = self.bytes(*i).to_vec();
                        self.write(*c, &data);
                    }
                    for it in 0..n {
                        self.write(*counter, &it.to_le_bytes());
                        self.before_last = None;
                        self.run(body)?;
                        for (c, x) in carried.iter().zip(next) {
                            let data = self.bytes(*x).to_vec();
                            self.write(*c, &data);
                        }
                    }
                    self.before_last = None;
                }
                Step::BySize { .. } => {
                    let symbols = &self.symbols;
                    let branch = step
                        .by_size_branch(|s| symbols.get(s).copied())
                        .expect("a BySize step")?;
                    self.run(branch)?;
                }
            }
        }
        Ok(())
    }
}

/// Runs a plan on the kernel interpreter: inputs in, results out.
pub fn run_plan(
    kernels: &[Kernel],
    plan: &Plan,
    inputs: &[Tensor],
    weights: &BTreeMap<String, Tensor>,
) -> Result<Vec<Tensor>, String> {
    let mut symbols = BTreeMap::new();
    for s in &plan.symbols {
        symbols.insert(s.name.clone(), inputs[s.input].shape[s.axis] as u64);
    }
    let syms = symbols.clone();
    let eval = move |e: &kiln_kir::SizeExpr| {
        e.eval(&|s: &str| syms.get(s).copied())
            .ok_or(format!("cannot evaluate {e}"))
    };
    let arena = eval(&plan.arena_bytes)? as usize;
    let mut memory = vec![vec![0xA5u8; arena]];
    let mut locs = Vec::new();
    for b in &plan.buffers {
        let numel: u64 = b
            .shape
            .iter()
            .map(&eval)
            .collect::<Result<Vec<_>, _>>()?
            .iter()
            .product();
        let len = numel as usize * b.dtype.size_bytes();
        let loc = match &b.kind {
            BufferKind::Temp => {
                let offset = eval(b.offset.as_ref().ok_or("temp without offset")?)? as usize;
                if offset + len > arena {
                    return Err(format!("buffer {:?} overflows the arena", b.id));
                }
                Loc {
                    alloc: 0,
                    offset,
                    len,
                }
            }
            BufferKind::Zeroed => {
                memory.push(vec![0u8; len]);
                Loc {
                    alloc: memory.len() - 1,
                    offset: 0,
                    len,
                }
            }
            BufferKind::View(base) => {
                let l: Loc = locs[base.0 as usize];
                assert_eq!(l.len, len, "a view and its base differ in size");
                l
            }
            _ => {
                memory.push(vec![0x5Au8; len]);
                Loc {
                    alloc: memory.len() - 1,
                    offset: 0,
                    len,
                }
            }
        };
        locs.push(loc);
    }
    let mut m = Machine {
        kernels,
        plan,
        symbols,
        memory,
        locs,
        before_last: None,
    };
    for b in &plan.buffers {
        match &b.kind {
            BufferKind::Input(i) => m.write(b.id, &inputs[*i].to_le_bytes()),
            BufferKind::Weight(name) => {
                let t = weights.get(name).ok_or(format!("missing weight {name}"))?;
                m.write(b.id, &t.to_le_bytes());
            }
            BufferKind::Constant(bytes) => m.write(b.id, bytes),
            _ => {}
        }
    }
    m.run(&plan.steps)?;
    let mut outs = Vec::new();
    for &o in &plan.outputs {
        let b = &plan.buffers[o.0 as usize];
        let shape: Vec<usize> = b
            .shape
            .iter()
            .map(|d| eval(d).map(|x| x as usize))
            .collect::<Result<_, _>>()?;
        outs.push(Tensor::from_le_bytes(b.dtype, &shape, m.bytes(o)).map_err(|e| e.to_string())?);
    }
    Ok(outs)
}

/// A deterministic stream of values in [-1, 1).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    }
}

/// Inputs for `func` with every symbolic dim set from `symbols` (default `n`): floats in
/// [-1, 1), integers in [0, 4) (scalars: 3), bools alternating.
pub fn inputs_for(
    func: &Function,
    symbols: &BTreeMap<String, usize>,
    n: usize,
    seed: u64,
) -> Vec<Tensor> {
    let mut rng = Rng(seed);
    func.params()
        .iter()
        .map(|&p| {
            let ty = func.ty(p);
            let shape: Vec<usize> = ty
                .shape
                .dims()
                .iter()
                .map(|d| match d {
                    Dim::Const(c) => *c as usize,
                    Dim::Sym(s) => symbols.get(s).copied().unwrap_or(n),
                })
                .collect();
            let count: usize = shape.iter().product();
            if ty.dtype.is_float() {
                Tensor::from_floats(
                    ty.dtype,
                    &shape,
                    (0..count).map(|_| rng.next() as f32).collect(),
                )
            } else if ty.dtype.is_int() {
                if shape.is_empty() {
                    Tensor::from_ints(ty.dtype, &shape, vec![3])
                } else {
                    Tensor::from_ints(
                        ty.dtype,
                        &shape,
                        (0..count)
                            .map(|_| ((rng.next() + 1.0) * 2.0) as i64)
                            .collect(),
                    )
                }
            } else {
                Tensor::from_bool(&shape, (0..count).map(|i| i % 3 != 0).collect())
            }
        })
        .collect()
}

/// Random values for every checkpoint tensor (`param`) `func` reads, by name (seeded).
pub fn weights_for(func: &Function, seed: u64) -> BTreeMap<String, Tensor> {
    let mut rng = Rng(seed);
    let mut weights = BTreeMap::new();
    for (name, ty) in func.checkpoint_params() {
        let shape: Vec<usize> = ty
            .shape
            .dims()
            .iter()
            .map(|d| d.as_const().expect("a constant param shape") as usize)
            .collect();
        let count: usize = shape.iter().product();
        let values = (0..count).map(|_| rng.next() as f32).collect();
        weights.insert(
            name.to_string(),
            Tensor::from_floats(ty.dtype, &shape, values),
        );
    }
    weights
}

/// The relative error of `got` against `want`: max |a - b| / max |b| (NaN where exactly one
/// side is NaN).
pub fn rel_err(got: &Tensor, want: &Tensor) -> f64 {
    let scale = want
        .to_f64_vec()
        .iter()
        .filter(|x| x.is_finite())
        .fold(0.0f64, |m, x| m.max(x.abs()))
        .max(1e-30);
    got.max_abs_diff(want) / scale
}

pub fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-5,
        d if d.is_float() => 2e-2,
        _ => 0.0,
    }
}

/// Lowers `source` and runs kiln-opt's default pipeline.
pub fn lower(
    name: &str,
    source: &str,
    dir: Option<&std::path::Path>,
    config: Option<&serde_json::Value>,
) -> Module {
    let lowered =
        kiln_tests::compile_source(name, source, dir, config).unwrap_or_else(|d| panic!("{d}"));
    let mut module = lowered.module;
    kiln_opt::optimize(&mut module).unwrap_or_else(|e| panic!("{e}"));
    module
}

/// [`lower`] for a program whose `param`s (declared without a dtype) are bf16 checkpoint
/// tensors, as a model's are when compiled for bf16.
pub fn lower_with(name: &str, source: &str) -> Module {
    let options = kiln_lower::Options {
        param_dtype: DType::BF16,
        entries: None,
    };
    let lowered = kiln_tests::compile_source_with(name, source, None, None, &options)
        .unwrap_or_else(|d| panic!("{d}"));
    let mut module = lowered.module;
    kiln_opt::optimize(&mut module).unwrap_or_else(|e| panic!("{e}"));
    module
}

/// Compiles `function`, runs it on the kernel interpreter and on the graph interpreter,
/// and asserts the results agree. Returns the compiled function.
#[track_caller]
pub fn check(
    module: &Module,
    function: &str,
    inputs: &[Tensor],
    weights: &BTreeMap<String, Tensor>,
    options: &Options,
) -> CompiledFunction {
    let func = module
        .function(function)
        .unwrap_or_else(|| panic!("no function {function}"));
    let want = kiln_ir::interpret(func, inputs, weights)
        .unwrap_or_else(|e| panic!("graph interpreter: {e}"));
    let compiled = compile_function(module, function, options).unwrap_or_else(|e| panic!("{e}"));
    let got = run_plan(&compiled.kernels, &compiled.plan, inputs, weights)
        .unwrap_or_else(|e| panic!("@{function}: {e}"));
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g.shape, w.shape, "@{function} result {i}: shape");
        assert_eq!(g.dtype, w.dtype, "@{function} result {i}: dtype");
        let err = rel_err(g, w);
        let tol = tolerance(w.dtype);
        assert!(
            err <= tol,
            "@{function} result {i} ({}): relative error {err:e} > {tol:e}\n got {:?}\nwant {:?}",
            w.dtype,
            &g.to_f64_vec()[..g.numel().min(8)],
            &w.to_f64_vec()[..w.numel().min(8)]
        );
    }
    compiled
}

/// ptxas and fatbinary, or `None` (the test says NOT RUN) when they are missing and
/// `KILN_ALLOW_NO_PTXAS=1` allows that; otherwise a missing toolchain fails the test.
pub fn toolchain() -> Option<kiln_ptx::Toolchain> {
    match kiln_ptx::Toolchain::discover() {
        Ok(t) => Some(t),
        Err(e) if std::env::var("KILN_ALLOW_NO_PTXAS").as_deref() == Ok("1") => {
            eprintln!("NOT RUN (no ptxas): {e}");
            None
        }
        Err(e) => panic!("{e}\n(set KILN_ALLOW_NO_PTXAS=1 to skip)"),
    }
}

/// Assembles each of `kernels` for every target with `toolchain`, prints its registers and
/// shared memory, and asserts that none spills. Returns each kernel's registers per target
/// (target, kernel name, registers).
pub fn assert_assembles_without_spills(
    toolchain: &kiln_ptx::Toolchain,
    kernels: &[Kernel],
) -> Vec<(kiln_ptx::Target, String, u32)> {
    assert_assembles_without_spills_for(toolchain, kernels, &kiln_ptx::Target::ALL)
}

/// [`assert_assembles_without_spills`] for the given targets only (FP8 tensor-core kernels
/// exist from sm_89).
pub fn assert_assembles_without_spills_for(
    toolchain: &kiln_ptx::Toolchain,
    kernels: &[Kernel],
    targets: &[kiln_ptx::Target],
) -> Vec<(kiln_ptx::Target, String, u32)> {
    use kiln_ptx::{emit_ptx, AssembleOptions, EmitOptions};
    let mut registers = Vec::new();
    for &target in targets {
        for kernel in kernels {
            let ptx = emit_ptx(
                std::slice::from_ref(kernel),
                target,
                &EmitOptions::default(),
            )
            .unwrap_or_else(|e| panic!("{e}"));
            let assembled = toolchain
                .assemble(&ptx, target, &AssembleOptions::default())
                .unwrap_or_else(|e| panic!("{}: {e}", kernel.name));
            let report = assembled
                .report
                .functions
                .iter()
                .find(|f| f.name == kernel.name)
                .unwrap_or_else(|| panic!("no report for {}:\n{}", kernel.name, assembled.log));
            println!(
                "{:>7} {:<50} {:>4} threads {:>3} registers, {} bytes smem",
                target.sm_name(),
                kernel.name,
                kernel.block_dim,
                report.registers,
                report.shared_memory_bytes
            );
            assert!(
                !report.has_spills(),
                "{} spills on {target}:\n{}",
                kernel.name,
                assembled.log
            );
            registers.push((target, kernel.name.clone(), report.registers));
        }
    }
    registers
}

/// One launch of a GPU check (the `tools/*_gpu_check.py` scripts): writes the kernel's PTX
/// (sm_90a, capped for the driver's JIT) to `dir/file` and describes the launch — kernel,
/// PTX file, grid and block at the symbol values `symbols`, and each parameter as an input
/// or output index, a temp (its id and bytes, which the script allocates) or a symbol.
pub fn export_launch(
    dir: &std::path::Path,
    file: &str,
    compiled: &CompiledFunction,
    kernel: &Kernel,
    args: &[Arg],
    symbols: &dyn Fn(&str) -> Option<u64>,
) -> serde_json::Value {
    use kiln_ptx::{emit_ptx, EmitOptions, Target};
    let ptx = emit_ptx(
        std::slice::from_ref(kernel),
        Target::Sm90a,
        &EmitOptions::for_jit(),
    )
    .unwrap();
    std::fs::write(dir.join(file), ptx).unwrap();
    let params: Vec<serde_json::Value> = kernel
        .params
        .iter()
        .zip(args)
        .map(|(param, arg)| match (param, arg) {
            (Param::Buffer { .. }, Arg::Buffer(b)) => {
                let decl = &compiled.plan.buffers[b.0 as usize];
                match &decl.kind {
                    BufferKind::Input(i) => serde_json::json!({ "input": i }),
                    BufferKind::Output(o) => serde_json::json!({ "output": o }),
                    BufferKind::Temp => {
                        let bytes = decl
                            .shape
                            .iter()
                            .fold(decl.dtype.size_bytes() as u64, |acc, d| {
                                acc * d.eval(symbols).expect("a size")
                            });
                        serde_json::json!({ "temp": b.0, "bytes": bytes })
                    }
                    other => panic!("{}: a {other:?} buffer", kernel.name),
                }
            }
            (Param::Scalar { .. }, Arg::Sym(s)) => serde_json::json!({ "sym": s }),
            other => panic!("{}: {other:?}", kernel.name),
        })
        .collect();
    serde_json::json!({
        "kernel": kernel.name,
        "ptx": file,
        "grid": kiln_kir::launch_grid(kernel, symbols).unwrap(),
        "block": kernel.block_dim,
        "dynamic_shared_bytes": kiln_kir::shared_layout::SharedLayout::of(kernel).dynamic_bytes(),
        "params": params,
    })
}

/// The shapes of `function`'s parameters with every symbolic dim at `t`.
pub fn param_shapes(module: &Module, function: &str, t: u64) -> Vec<Vec<u64>> {
    let func = module.function(function).unwrap();
    func.params()
        .iter()
        .map(|&p| {
            func.ty(p)
                .shape
                .dims()
                .iter()
                .map(|d| d.as_const().unwrap_or(t))
                .collect()
        })
        .collect()
}

/// The launches a plan makes at the given symbol values (each `BySize` step's branch
/// for those values).
pub fn launches(plan: &Plan, kernels: &[Kernel], symbols: &BTreeMap<String, u64>) -> Vec<String> {
    fn walk(
        steps: &[Step],
        kernels: &[Kernel],
        symbols: &BTreeMap<String, u64>,
        out: &mut Vec<String>,
    ) {
        for step in steps {
            match step {
                Step::Launch { kernel, .. } => out.push(kernels[*kernel].name.clone()),
                Step::BySize { .. } => {
                    let branch = step
                        .by_size_branch(|s| symbols.get(s).copied())
                        .expect("a BySize step")
                        .expect("a bound symbol");
                    walk(branch, kernels, symbols, out);
                }
                Step::Loop { body, .. } => walk(body, kernels, symbols, out),
                Step::Copy { .. } => {}
            }
        }
    }
    let mut out = Vec::new();
    walk(&plan.steps, kernels, symbols, &mut out);
    // Without the `k{index}_` prefix, which depends on the order kernels were made in.
    out.iter()
        .map(|n| {
            n.split_once('_')
                .map_or(n.clone(), |(_, rest)| rest.to_string())
        })
        .collect()
}

/// The `step` entry of models/llama.kiln at the 1.1B shape `kiln bench decode` measures
/// (hidden 2048, 16 layers, 32 query / 8 KV heads, ffn 8192), bf16 weights, optimized.
pub fn llama_1b() -> kiln_ir::Module {
    let root = kiln_tests::repo_root();
    let mut config = kiln_tests::read_json(&root.join("tests/fixtures/tiny-llama/config.json"));
    for (key, value) in [
        ("hidden_size", 2048),
        ("intermediate_size", 8192),
        ("num_attention_heads", 32),
        ("num_key_value_heads", 8),
        ("head_dim", 64),
        ("num_hidden_layers", 16),
        ("vocab_size", 32000),
    ] {
        config[key] = serde_json::json!(value);
    }
    let path = root.join("models/llama.kiln");
    let source = std::fs::read_to_string(&path).expect("program");
    let options = kiln_lower::Options {
        param_dtype: kiln_ir::DType::BF16,
        entries: Some(vec!["step".to_string()]),
    };
    let lowered = kiln_tests::compile_source_with(
        "llama.kiln",
        &source,
        path.parent(),
        Some(&config),
        &options,
    )
    .unwrap_or_else(|d| panic!("{d}"));
    let mut module = lowered.module;
    kiln_opt::optimize(&mut module).unwrap_or_else(|e| panic!("{e}"));
    module
}

/// The 1.1B Llama `step` compiled with `options`: the kernels it launches at one token of
/// one sequence (8 cache blocks in its table, 64 in the cache), and all its kernels.
pub fn llama_decode_launches(
    module: &kiln_ir::Module,
    options: &kiln_gpu_kernels::Options,
) -> (Vec<String>, Vec<Kernel>) {
    let sizes = [("T", 1), ("B", 1), ("MB", 8), ("NB", 64)];
    llama_step_launches(module, options, &sizes)
}

/// [`llama_decode_launches`] at other values of the step's symbols (`T`, `B`, `MB`, `NB`):
/// wider block tables take the long-context paged attention.
pub fn llama_step_launches(
    module: &kiln_ir::Module,
    options: &kiln_gpu_kernels::Options,
    sizes: &[(&str, u64)],
) -> (Vec<String>, Vec<Kernel>) {
    let compiled = kiln_gpu_kernels::compile_function(module, "step", options).unwrap();
    let sizes: BTreeMap<String, u64> = sizes.iter().map(|&(s, v)| (s.to_string(), v)).collect();
    let names = launches(&compiled.plan, &compiled.kernels, &sizes);
    (names, compiled.kernels)
}

/// How many of the kernel names contain `part`.
pub fn count(names: &[String], part: &str) -> usize {
    names.iter().filter(|n| n.contains(part)).count()
}

/// Runs `function` of `module` on `inputs` (symbol `T` = `t`) compiled with `options(true)`
/// and `options(false)`, each on the kir interpreter (checked against the graph
/// interpreter) and on Cranelift; asserts the four results are the same bits and returns
/// the launches of both plans (with, without).
pub fn same_bits_with_and_without(
    module: &Module,
    function: &str,
    inputs: &[Tensor],
    weights: &BTreeMap<String, Tensor>,
    t: usize,
    options: impl Fn(bool) -> Options,
) -> (Vec<String>, Vec<String>) {
    let mut results: Vec<(String, Vec<Tensor>)> = Vec::new();
    let mut names = Vec::new();
    for on in [true, false] {
        let compiled = check(module, function, inputs, weights, &options(on));
        let got = run_plan(&compiled.kernels, &compiled.plan, inputs, weights).unwrap();
        results.push((format!("switch {on}, kir interpreter"), got));
        let cpu = kiln_cpu::CpuExecutor::new(&compiled.kernels).unwrap_or_else(|e| panic!("{e}"));
        let got = cpu
            .run(&compiled.plan, inputs, &|name| weights.get(name))
            .unwrap_or_else(|e| panic!("@{function} on Cranelift: {e}"));
        results.push((format!("switch {on}, Cranelift"), got));
        let sizes = BTreeMap::from([("T".to_string(), t as u64)]);
        names.push(launches(&compiled.plan, &compiled.kernels, &sizes));
    }
    let (first, want) = &results[0];
    for (what, got) in &results[1..] {
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert_eq!(
                g.to_le_bytes(),
                w.to_le_bytes(),
                "@{function} T={t}: result {i} of {what} differs from {first}"
            );
        }
    }
    let without = names.pop().unwrap();
    let with = names.pop().unwrap();
    (with, without)
}

/// The default options with both GEMVs off (`GemmTuning::gemv`, `GemmTuning::mma_gemv`):
/// tests of the tensor-core template's decode tile, its split-K and what rides on it (row
/// sums, KV writes) at the decode sizes the GEMVs would otherwise take.
pub fn mma_options() -> kiln_gpu_kernels::Options {
    let mut options = kiln_gpu_kernels::Options::default();
    options.gemm.gemv = false;
    options.gemm.mma_gemv = false;
    options
}

/// Whether `buf` is a constant buffer of `kernel`.
pub fn constant(kernel: &Kernel, buf: kiln_kir::Buf) -> bool {
    kiln_kir::constant_buffer(&kernel.params, buf)
}

/// What a kernel does before its wait: an L2 prefetch, or a load (of a constant buffer or
/// not).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Before {
    Prefetch,
    Load { constant: bool },
}

/// The prefetches and loads of `stmts` (nested ones included) in order.
pub fn events(kernel: &Kernel, stmts: &[kiln_kir::Stmt], out: &mut Vec<Before>) {
    for stmt in stmts {
        match stmt {
            kiln_kir::Stmt::LoadVec { buf, .. } => out.push(Before::Load {
                constant: constant(kernel, *buf),
            }),
            kiln_kir::Stmt::PrefetchL2 { .. } => out.push(Before::Prefetch),
            kiln_kir::Stmt::If {
                then, otherwise, ..
            } => {
                events(kernel, then, out);
                events(kernel, otherwise, out);
            }
            kiln_kir::Stmt::For { body, .. } => events(kernel, body, out),
            _ => {}
        }
    }
}

/// The prefetches and loads before the kernel's one top-level wait (`None`: no explicit
/// wait); the kernel passes the kir verifier (rule 23: only constant buffers are read
/// before the wait).
pub fn before_wait(kernel: &Kernel) -> Option<Vec<Before>> {
    kiln_kir::verify_kernel(kernel).unwrap_or_else(|e| panic!("{e}"));
    let waits: Vec<usize> = (0..kernel.body.len())
        .filter(|&i| kernel.body[i] == kiln_kir::Stmt::GridDependencyWait)
        .collect();
    assert!(waits.len() <= 1, "{}: {} waits", kernel.name, waits.len());
    let wait = *waits.first()?;
    let mut out = Vec::new();
    events(kernel, &kernel.body[..wait], &mut out);
    Some(out)
}

/// The loads before the kernel's top-level wait (`None`: no explicit wait), each whether it
/// is of a constant buffer.
pub fn loads_before_wait(kernel: &Kernel) -> Option<Vec<bool>> {
    let before = before_wait(kernel)?;
    Some(
        before
            .into_iter()
            .filter_map(|b| match b {
                Before::Load { constant } => Some(constant),
                Before::Prefetch => None,
            })
            .collect(),
    )
}
