//! Where a lowered program runs, behind one trait: the graph interpreter (the reference),
//! the compiled kernels on this CPU through Cranelift, or on an NVIDIA GPU through CUDA.

use crate::cpu::CpuProgram;
use crate::progress::Progress;
use crate::{RuntimeError, Weights};
use kiln_cuda::{CudaPackage, CudaProgram, FedInput, PendingRun};
use kiln_ir::{DType, Module, Tensor};
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

/// A lowered program with its weights, ready to run its entry functions.
pub trait Executor {
    /// The backend, for messages: "the reference interpreter (CPU)", ...
    fn describe(&self) -> String;
    /// The program as lowered (entry signatures).
    fn module(&self) -> &Module;
    /// Runs entry `function` on `inputs` (one per parameter, in order).
    fn run(&mut self, function: &str, inputs: &[Tensor]) -> Result<Vec<Tensor>, RuntimeError>;
    /// Runs entry `function` keeping the inputs it updates in place (KV caches: results that
    /// are `kv_write` chains of a parameter, see `kiln_ir::in_place_inputs`) in the executor
    /// between runs. `inputs[i] = None` uses the value input i was left with by the previous
    /// run (the first run must give it). Returns the other results, in order; the updated
    /// inputs stay in the executor (on the GPU: on the device, never copied back).
    fn run_kept(
        &mut self,
        function: &str,
        inputs: Vec<Option<Tensor>>,
    ) -> Result<Vec<Tensor>, RuntimeError>;
    /// Like [`Executor::run_kept`], returning only the results at the positions `wanted`
    /// (among those `run_kept` returns, each at most once), in that order. The GPU copies
    /// back only those: a greedy decode step reads its tokens, not its logits.
    fn run_kept_outputs(
        &mut self,
        function: &str,
        inputs: Vec<Option<Tensor>>,
        wanted: &[usize],
    ) -> Result<Vec<Tensor>, RuntimeError> {
        let returned = self.run_kept(function, inputs)?;
        pick_outputs(function, returned, wanted)
    }
    /// Queues a kept run of `function` (as [`Executor::run_kept_outputs`]) whose results
    /// [`Executor::collect_kept_outputs`] returns; the GPU returns at once, so that the
    /// host prepares the next run while the device computes this one (the CPU backends run
    /// it here). Each of `fed` names an input given as `None` that takes a result of the
    /// run of `function` submitted just before this one, without the host reading it: a
    /// decode step's tokens from the step before's greedy tokens. The input has the
    /// result's shape, and its dtype or, for an `i64` result, `i32`.
    fn submit_kept_outputs(
        &mut self,
        function: &str,
        inputs: Vec<Option<Tensor>>,
        wanted: &[usize],
        fed: &[FedInput],
    ) -> Result<(), RuntimeError>;
    /// The wanted results of the oldest run of `function` submitted and not collected yet.
    fn collect_kept_outputs(&mut self, function: &str) -> Result<Vec<Tensor>, RuntimeError>;
    /// Makes input `index` of `function` (one it updates in place) a kept value of zeros of
    /// `dtype` and `shape`, without a host tensor of that size, when the executor can (the
    /// GPU makes the zeros on the device); returns whether it did. When it returns false,
    /// give the zeros on the first [`Executor::run_kept`] instead.
    fn keep_zeros(
        &mut self,
        function: &str,
        index: usize,
        dtype: DType,
        shape: &[usize],
    ) -> Result<bool, RuntimeError> {
        let _ = (function, index, dtype, shape);
        Ok(false)
    }
}

/// The inputs updated in place that the interpreter keeps between runs (as tensors; the
/// CPU plans keep bytes, `kiln_cpu::KeptInput`, and CUDA keeps device buffers).
#[derive(Default)]
struct KeptInputs(BTreeMap<(String, usize), Tensor>);

impl KeptInputs {
    /// Fills the kept inputs in, calls `run` on the full inputs, keeps the updated ones and
    /// returns the other results. A failed run leaves the kept values as they were.
    fn run(
        &mut self,
        module: &Module,
        function: &str,
        inputs: Vec<Option<Tensor>>,
        run: impl FnOnce(&[Tensor]) -> Result<Vec<Tensor>, RuntimeError>,
    ) -> Result<Vec<Tensor>, RuntimeError> {
        let func = module
            .function(function)
            .ok_or_else(|| no_entry(module, function))?;
        let updated = kiln_ir::in_place_inputs(func);
        let mut full = Vec::with_capacity(inputs.len());
        for (index, input) in inputs.into_iter().enumerate() {
            match input {
                Some(tensor) => full.push(tensor),
                None => {
                    let kept = self.0.get(&(function.to_string(), index));
                    let Some(kept) = kept else {
                        let why = if updated.contains(&Some(index)) {
                            "no value is kept for it yet: give it on the first run"
                        } else {
                            "only inputs the function updates in place are kept"
                        };
                        return Err(RuntimeError::Input(format!(
                            "`{function}` input {index} was not given, and {why}"
                        )));
                    };
                    full.push(kept.clone());
                }
            }
        }
        let results = run(&full)?;
        let mut returned = Vec::new();
        for (result, input) in results.into_iter().zip(updated) {
            match input {
                Some(index) => {
                    self.0.insert((function.to_string(), index), result);
                }
                None => returned.push(result),
            }
        }
        Ok(returned)
    }
}

/// Submitted runs of the host backends, which run them at once: each function's last
/// returned results (what a later run's fed inputs take) and the wanted results not
/// collected yet, oldest first.
#[derive(Default)]
struct SubmittedRuns {
    last: BTreeMap<String, Vec<Tensor>>,
    waiting: BTreeMap<String, VecDeque<Vec<Tensor>>>,
}

impl SubmittedRuns {
    /// `inputs` with the `fed` ones filled from the last run's results, converted to the
    /// inputs' dtypes (`dtypes`, the entry's parameters) as the GPU's copy converts them.
    fn feed(
        &self,
        dtypes: &[DType],
        function: &str,
        mut inputs: Vec<Option<Tensor>>,
        fed: &[FedInput],
    ) -> Result<Vec<Option<Tensor>>, RuntimeError> {
        for &FedInput { input, result } in fed {
            let bad = |why: String| {
                RuntimeError::Input(format!("`{function}` input {input} cannot be fed: {why}"))
            };
            let source = self
                .last
                .get(function)
                .and_then(|last| last.get(result))
                .ok_or_else(|| bad(format!("no earlier run returned a result {result}")))?;
            let Some(slot) = inputs.get_mut(input).filter(|slot| slot.is_none()) else {
                return Err(bad("give it as `None`".into()));
            };
            let Some(&dtype) = dtypes.get(input) else {
                return Err(bad("the entry has no such input".into()));
            };
            let narrowing = source.dtype == DType::I64 && dtype == DType::I32;
            *slot = Some(if source.dtype == dtype {
                source.clone()
            } else if narrowing {
                let values = source
                    .to_i64_vec()
                    .iter()
                    .map(|&v| v as i32 as i64)
                    .collect();
                Tensor::from_ints(dtype, &source.shape, values)
            } else {
                return Err(bad(format!(
                    "result {result} is {}, the input {dtype}",
                    source.dtype
                )));
            });
        }
        Ok(inputs)
    }

    /// Keeps a run's `returned` results as the last ones and queues its `wanted` ones.
    fn record(
        &mut self,
        function: &str,
        returned: Vec<Tensor>,
        wanted: &[usize],
    ) -> Result<(), RuntimeError> {
        let picked = pick_outputs(function, returned.clone(), wanted)?;
        self.last.insert(function.to_string(), returned);
        self.waiting
            .entry(function.to_string())
            .or_default()
            .push_back(picked);
        Ok(())
    }

    fn collect(&mut self, function: &str) -> Result<Vec<Tensor>, RuntimeError> {
        self.waiting
            .get_mut(function)
            .and_then(VecDeque::pop_front)
            .ok_or_else(|| nothing_submitted(function))
    }
}

/// [`Executor::submit_kept_outputs`] on a host backend: the run at once, its fed inputs
/// from the last run's results, its wanted results queued in `submitted(executor)`.
fn submit_on_host<E: Executor>(
    executor: &mut E,
    submitted: fn(&mut E) -> &mut SubmittedRuns,
    function: &str,
    inputs: Vec<Option<Tensor>>,
    (wanted, fed): (&[usize], &[FedInput]),
) -> Result<(), RuntimeError> {
    let module = executor.module();
    let func = module
        .function(function)
        .ok_or_else(|| no_entry(module, function))?;
    let dtypes: Vec<DType> = func.params().iter().map(|&p| func.ty(p).dtype).collect();
    let inputs = submitted(executor).feed(&dtypes, function, inputs, fed)?;
    let returned = executor.run_kept(function, inputs)?;
    submitted(executor).record(function, returned, wanted)
}

fn nothing_submitted(function: &str) -> RuntimeError {
    RuntimeError::Input(format!(
        "no run of `{function}` was submitted that is not collected yet"
    ))
}

/// The results at the positions `wanted` of those a run of `function` returned.
fn pick_outputs(
    function: &str,
    returned: Vec<Tensor>,
    wanted: &[usize],
) -> Result<Vec<Tensor>, RuntimeError> {
    let count = returned.len();
    let mut slots: Vec<Option<Tensor>> = returned.into_iter().map(Some).collect();
    wanted
        .iter()
        .map(|&i| {
            slots.get_mut(i).and_then(Option::take).ok_or_else(|| {
                RuntimeError::Input(format!(
                    "`{function}`: result {i} was asked for (once), but it returns {count}"
                ))
            })
        })
        .collect()
}

fn no_entry(module: &Module, function: &str) -> RuntimeError {
    let names: Vec<&str> = module.functions.iter().map(|f| f.name.as_str()).collect();
    RuntimeError::Input(format!(
        "no entry function `{function}`; the program has: {}",
        names.join(", ")
    ))
}

fn backend_error(function: &str, message: impl ToString) -> RuntimeError {
    RuntimeError::Backend {
        function: function.to_string(),
        message: message.to_string(),
    }
}

/// The graph-IR reference interpreter: exact, slow, always available.
pub struct Interpreter {
    module: Module,
    weights: Arc<Weights>,
    kept: KeptInputs,
    submitted: SubmittedRuns,
}

impl Interpreter {
    pub fn new(module: Module, weights: Arc<Weights>) -> Interpreter {
        Interpreter {
            module,
            weights,
            kept: KeptInputs::default(),
            submitted: SubmittedRuns::default(),
        }
    }
}

impl Executor for Interpreter {
    fn describe(&self) -> String {
        crate::Backend::Interpreter.name().to_string()
    }

    fn module(&self) -> &Module {
        &self.module
    }

    fn run(&mut self, function: &str, inputs: &[Tensor]) -> Result<Vec<Tensor>, RuntimeError> {
        crate::run(
            crate::Backend::Interpreter,
            &self.module,
            function,
            inputs,
            &self.weights,
        )
    }

    fn run_kept(
        &mut self,
        function: &str,
        inputs: Vec<Option<Tensor>>,
    ) -> Result<Vec<Tensor>, RuntimeError> {
        let (module, weights) = (&self.module, &self.weights);
        self.kept.run(module, function, inputs, |full| {
            crate::run(crate::Backend::Interpreter, module, function, full, weights)
        })
    }

    fn submit_kept_outputs(
        &mut self,
        function: &str,
        inputs: Vec<Option<Tensor>>,
        wanted: &[usize],
        fed: &[FedInput],
    ) -> Result<(), RuntimeError> {
        submit_on_host(self, |e| &mut e.submitted, function, inputs, (wanted, fed))
    }

    fn collect_kept_outputs(&mut self, function: &str) -> Result<Vec<Tensor>, RuntimeError> {
        self.submitted.collect(function)
    }
}

/// The program optimized and fused into kernels, compiled for this CPU with Cranelift
/// ([`CpuProgram`]) and run plan by plan, blocks in parallel.
pub struct CpuPlans {
    module: Module,
    program: CpuProgram,
    weights: Arc<Weights>,
    /// Inputs updated in place, by entry and input index, kept in host memory.
    kept: BTreeMap<String, BTreeMap<usize, kiln_cpu::KeptInput>>,
    submitted: SubmittedRuns,
}

impl CpuPlans {
    /// Optimizes, fuses and compiles every entry of `module`, reporting to `progress`.
    pub fn compile(
        module: Module,
        weights: Arc<Weights>,
        progress: &mut dyn Progress,
    ) -> Result<CpuPlans, RuntimeError> {
        let program = CpuProgram::compile(&module, progress)?;
        Ok(CpuPlans {
            module,
            program,
            weights,
            kept: BTreeMap::new(),
            submitted: SubmittedRuns::default(),
        })
    }

    /// Makes the plans batch invariant: a row's result is the same bits whatever else the run
    /// computes (for bf16 GEMMs, which otherwise pick decode-sized kernels for few rows).
    pub fn set_batch_invariant(&mut self, batch_invariant: bool) {
        self.program.set_batch_invariant(batch_invariant);
    }
}

impl Executor for CpuPlans {
    fn describe(&self) -> String {
        "Cranelift CPU backend".to_string()
    }

    fn module(&self) -> &Module {
        &self.module
    }

    fn run(&mut self, function: &str, inputs: &[Tensor]) -> Result<Vec<Tensor>, RuntimeError> {
        self.program.run(function, inputs, &self.weights)
    }

    fn run_kept(
        &mut self,
        function: &str,
        inputs: Vec<Option<Tensor>>,
    ) -> Result<Vec<Tensor>, RuntimeError> {
        let refs: Vec<Option<&Tensor>> = inputs.iter().map(Option::as_ref).collect();
        let kept = self.kept.entry(function.to_string()).or_default();
        self.program.run_kept(function, &refs, kept, &self.weights)
    }

    fn submit_kept_outputs(
        &mut self,
        function: &str,
        inputs: Vec<Option<Tensor>>,
        wanted: &[usize],
        fed: &[FedInput],
    ) -> Result<(), RuntimeError> {
        submit_on_host(self, |e| &mut e.submitted, function, inputs, (wanted, fed))
    }

    fn collect_kept_outputs(&mut self, function: &str) -> Result<Vec<Tensor>, RuntimeError> {
        self.submitted.collect(function)
    }
}

/// A compiled package loaded on a GPU: one [`CudaProgram`] per entry, its weights uploaded
/// on first use; repeated runs with the same shapes replay a CUDA graph.
pub struct CudaPlans {
    module: Module,
    package: Arc<CudaPackage>,
    programs: BTreeMap<String, CudaProgram>,
    weights: Arc<Weights>,
    batch_invariant: bool,
    max_graphs: Option<usize>,
    /// Submitted runs by entry, oldest first ([`Executor::submit_kept_outputs`]).
    submitted: BTreeMap<String, VecDeque<PendingRun>>,
}

impl CudaPlans {
    /// `package` must be compiled from `module` (the driver's pipeline does both).
    pub fn new(module: Module, package: Arc<CudaPackage>, weights: Arc<Weights>) -> CudaPlans {
        CudaPlans {
            module,
            package,
            programs: BTreeMap::new(),
            weights,
            batch_invariant: false,
            max_graphs: None,
            submitted: BTreeMap::new(),
        }
    }

    /// Bounds the CUDA graphs each program keeps (`kiln_cuda::ProgramOptions::max_graphs`).
    pub fn set_max_graphs(&mut self, max_graphs: Option<usize>) {
        self.max_graphs = max_graphs;
        for program in self.programs.values_mut() {
            program.set_max_graphs(max_graphs);
        }
    }

    /// Makes every program batch invariant (`kiln_cuda::ProgramOptions::batch_invariant`): a
    /// row's result is the same bits whatever else the run computes, as a server needs for a
    /// request's tokens not to depend on the batch it ran in.
    pub fn set_batch_invariant(&mut self, batch_invariant: bool) {
        self.batch_invariant = batch_invariant;
        for program in self.programs.values_mut() {
            program.set_batch_invariant(batch_invariant);
        }
    }
}

impl Executor for CudaPlans {
    fn describe(&self) -> String {
        let info = self.package.device().info();
        let (major, minor) = info.compute_capability;
        format!("GPU ({}, sm_{major}{minor})", info.name)
    }

    fn module(&self) -> &Module {
        &self.module
    }

    fn run(&mut self, function: &str, inputs: &[Tensor]) -> Result<Vec<Tensor>, RuntimeError> {
        let program = self.program(function)?;
        program
            .run_graph(inputs)
            .map_err(|e| backend_error(function, e))
    }

    fn run_kept(
        &mut self,
        function: &str,
        inputs: Vec<Option<Tensor>>,
    ) -> Result<Vec<Tensor>, RuntimeError> {
        self.run_kept_selected(function, &inputs, None)
    }

    fn run_kept_outputs(
        &mut self,
        function: &str,
        inputs: Vec<Option<Tensor>>,
        wanted: &[usize],
    ) -> Result<Vec<Tensor>, RuntimeError> {
        self.run_kept_selected(function, &inputs, Some(wanted))
    }

    fn submit_kept_outputs(
        &mut self,
        function: &str,
        inputs: Vec<Option<Tensor>>,
        wanted: &[usize],
        fed: &[FedInput],
    ) -> Result<(), RuntimeError> {
        let refs: Vec<Option<&Tensor>> = inputs.iter().map(Option::as_ref).collect();
        let pending = self
            .program(function)?
            .submit_kept(&refs, Some(wanted), fed)
            .map_err(|e| backend_error(function, e))?;
        self.submitted
            .entry(function.to_string())
            .or_default()
            .push_back(pending);
        Ok(())
    }

    fn collect_kept_outputs(&mut self, function: &str) -> Result<Vec<Tensor>, RuntimeError> {
        let pending = self
            .submitted
            .get_mut(function)
            .and_then(VecDeque::pop_front)
            .ok_or_else(|| nothing_submitted(function))?;
        self.program(function)?
            .collect(pending)
            .map_err(|e| backend_error(function, e))
    }

    fn keep_zeros(
        &mut self,
        function: &str,
        index: usize,
        dtype: DType,
        shape: &[usize],
    ) -> Result<bool, RuntimeError> {
        let program = self.program(function)?;
        program
            .keep_zeros(index, dtype, shape)
            .map_err(|e| backend_error(function, e))?;
        Ok(true)
    }
}

impl CudaPlans {
    /// A kept run of `function` ([`CudaProgram::run_graph_kept_outputs`]) copying back the
    /// returned results at the positions `wanted` (all with `None`).
    fn run_kept_selected(
        &mut self,
        function: &str,
        inputs: &[Option<Tensor>],
        wanted: Option<&[usize]>,
    ) -> Result<Vec<Tensor>, RuntimeError> {
        let program = self.program(function)?;
        let refs: Vec<Option<&Tensor>> = inputs.iter().map(Option::as_ref).collect();
        program
            .run_graph_kept_outputs(&refs, wanted)
            .map_err(|e| backend_error(function, e))
    }

    /// Makes entry `function`'s program and uploads its weights now rather than on its first
    /// run (so that the device memory left for other uses, a KV cache, can be measured).
    pub fn load(&mut self, function: &str) -> Result<(), RuntimeError> {
        self.program(function).map(|_| ())
    }

    /// Device bytes a run of entry `function` on inputs of `shapes` allocates beside its
    /// weights: its arena and the inputs and outputs it does not update in place
    /// ([`kiln_cuda::working_bytes`]). A server reserves this for its largest step before
    /// giving the rest of the memory to the KV cache.
    pub fn working_bytes(
        &mut self,
        function: &str,
        shapes: &[Vec<usize>],
    ) -> Result<usize, RuntimeError> {
        let program = self.program(function)?;
        let shapes: Vec<&[usize]> = shapes.iter().map(Vec::as_slice).collect();
        let bytes = kiln_cuda::bind_symbols(program.plan(), &shapes)
            .and_then(|symbols| kiln_cuda::working_bytes(program.plan(), &symbols));
        bytes.map_err(|e| backend_error(function, e))
    }

    /// Times `runs` replays of entry `function`'s last kept run on the device alone
    /// ([`CudaProgram::time_last_kept_run`]): its GPU time without the host's share.
    pub fn time_last_kept_run(
        &mut self,
        function: &str,
        runs: usize,
    ) -> Result<kiln_cuda::Timing, RuntimeError> {
        let program = self.program(function)?;
        program
            .time_last_kept_run(runs)
            .map_err(|e| backend_error(function, e))
    }

    /// Where the host's time of entry `function`'s kept runs went since the last
    /// [`CudaPlans::reset_kept_run_times`] ([`CudaProgram::kept_run_times`]).
    pub fn kept_run_times(
        &mut self,
        function: &str,
    ) -> Result<kiln_cuda::KeptRunTimes, RuntimeError> {
        Ok(self.program(function)?.kept_run_times().clone())
    }

    /// Starts entry `function`'s [`CudaPlans::kept_run_times`] over.
    pub fn reset_kept_run_times(&mut self, function: &str) -> Result<(), RuntimeError> {
        self.program(function)?.reset_kept_run_times();
        Ok(())
    }

    /// The package (and through it the device) the plans run on.
    pub fn package(&self) -> &Arc<CudaPackage> {
        &self.package
    }

    /// The program of entry `function`, made and given its weights on first use.
    fn program(&mut self, function: &str) -> Result<&mut CudaProgram, RuntimeError> {
        if self.module.function(function).is_none() {
            return Err(no_entry(&self.module, function));
        }
        if !self.programs.contains_key(function) {
            let mut program = CudaProgram::new(self.package.clone(), function)
                .map_err(|e| backend_error(function, e))?;
            program.set_batch_invariant(self.batch_invariant);
            program.set_max_graphs(self.max_graphs);
            let weights = &self.weights;
            program
                .bind_weights(&|name| weights.get(name))
                .map_err(|e| backend_error(function, e))?;
            self.programs.insert(function.to_string(), program);
        }
        Ok(self.programs.get_mut(function).expect("inserted above"))
    }
}
