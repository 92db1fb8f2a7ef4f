//! Running one plan of a package on the GPU.
//!
//! A [`CudaProgram`] owns the device memory of one plan: the weights (uploaded once by
//! [`CudaProgram::bind_weights`]), one allocation per input and output buffer, and one
//! arena holding every temp buffer at its offset. Allocations are sized for the symbol
//! values of each run and re-allocated only when they must grow. A run binds the symbols
//! from the input shapes, copies the inputs in, executes the steps on the device's stream
//! (launches with arguments packed from the kernels' parameter layouts, device-to-device
//! copies, loops whose count is read on the host) and copies the outputs back.
//!
//! [`CudaProgram::run_graph`] captures the steps of a plan without loops into a CUDA graph
//! once per set of symbol values and replays it afterwards. Graphs hold raw device
//! addresses, so every (re-)allocation of the program's memory drops them all first.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::DriverError;
use kiln_ir::{DType, Tensor};
use kiln_kir::manifest::ParamLayout;
use kiln_kir::{Arg, BufferId, BufferKind, Plan, Step};

use crate::binding::{
    bind_symbols, buffer_bytes, buffer_decl, buffer_shape, check_input, check_input_count,
    check_inputs, check_weight, expected_weight, SymbolValues,
};
use crate::device::{host_tensor, CudaDevice, DeviceBuffer};
use crate::error::CudaError;
use crate::ffi::{
    self, ArgValue, CapturedGraph, DeviceRegion, LaunchOrder, PinnedStaging, QueuedDownload,
};
use crate::launch::LaunchShape;
use crate::layout::{arena_bytes, place, Storage};
use crate::package::CudaPackage;
use crate::timing::{time_on_device, Timing};
use crate::validate::{check_plan, has_loop};

/// The environment variable that turns CUDA graphs off when set to `0`.
pub const GRAPHS_ENV: &str = "KILN_CUDA_GRAPHS";
/// The environment variable that, set to `1`, waits after every launch so that a faulting
/// kernel is named in the error.
pub const SYNC_LAUNCHES_ENV: &str = "KILN_CUDA_SYNC_LAUNCHES";

/// Set to `0` to launch a plan's kernels one after another, without programmatic
/// dependent launch ([`ProgramOptions::dependent_launch`]).
pub const DEPENDENT_LAUNCH_ENV: &str = "KILN_CUDA_DEPENDENT_LAUNCH";

/// How a [`CudaProgram`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProgramOptions {
    /// Whether [`CudaProgram::run_graph`] captures and replays CUDA graphs (otherwise it
    /// runs the steps directly, like [`CudaProgram::run`]).
    pub use_graphs: bool,
    /// Whether to wait for each launch to finish (outside graph capture), so that a kernel
    /// fault is reported with the kernel's name and launch shape. Slow; for debugging.
    pub sync_after_each_launch: bool,
    /// Whether every `Step::BySize` runs its `large` branch whatever the row count, so that a
    /// row's result never depends on how many rows the run has (batch invariance for a
    /// server, at the price of the decode-sized GEMM kernels for runs of few rows).
    pub batch_invariant: bool,
    /// The most graphs kept; runs of further symbol values run directly, uncaptured (a
    /// server meets a new token count at many steps; `None`: no bound).
    pub max_graphs: Option<usize>,
    /// Whether a plan's kernels may start while the kernel before them finishes
    /// (programmatic dependent launch, on devices and packages that allow it; each kernel
    /// still waits for its predecessor's results). Off with [`DEPENDENT_LAUNCH_ENV`]`=0`,
    /// for comparisons.
    pub dependent_launch: bool,
}

impl Default for ProgramOptions {
    fn default() -> Self {
        ProgramOptions {
            use_graphs: true,
            sync_after_each_launch: false,
            batch_invariant: false,
            max_graphs: None,
            dependent_launch: true,
        }
    }
}

impl ProgramOptions {
    /// The defaults, changed by [`GRAPHS_ENV`]`=0`, [`SYNC_LAUNCHES_ENV`]`=1` and
    /// [`DEPENDENT_LAUNCH_ENV`]`=0`.
    pub fn from_env() -> ProgramOptions {
        let set_to =
            |name: &str, value: &str| std::env::var(name).is_ok_and(|found| found.trim() == value);
        ProgramOptions {
            use_graphs: !set_to(GRAPHS_ENV, "0"),
            sync_after_each_launch: set_to(SYNC_LAUNCHES_ENV, "1"),
            batch_invariant: false,
            max_graphs: None,
            dependent_launch: !set_to(DEPENDENT_LAUNCH_ENV, "0"),
        }
    }
}

/// One plan of a package with its device memory.
#[derive(Debug)]
pub struct CudaProgram {
    package: Arc<CudaPackage>,
    plan_index: usize,
    options: ProgramOptions,
    /// Bound weights by checkpoint name.
    weights: BTreeMap<String, DeviceBuffer>,
    /// The allocations of `Input`, `Output` and `Zeroed` buffers.
    own: BTreeMap<BufferId, DeviceBuffer>,
    arena: Option<DeviceBuffer>,
    /// Captured graphs by symbol values; `None` for a capture with no work in it.
    graphs: BTreeMap<SymbolValues, Option<CapturedGraph>>,
    /// The dtype and shape of each input updated in place whose device contents are kept
    /// between runs (see [`CudaProgram::run_graph_kept`]).
    kept: BTreeMap<usize, (DType, Vec<usize>)>,
    /// The symbol values of the last [`CudaProgram::run_graph_kept`], whose steps
    /// [`CudaProgram::time_last_kept_run`] replays.
    last_kept: Option<SymbolValues>,
    /// Where the host's time of the kept runs went ([`CudaProgram::kept_run_times`]).
    kept_times: KeptRunTimes,
    /// The page-locked host memory inputs and outputs are copied through (a lock, so that
    /// copies can be staged while device regions borrow the program).
    staging: Mutex<PinnedStaging>,
    /// The symbol values the device memory was last sized for: [`CudaProgram::allocate`]
    /// has nothing to do for them again (what replaces a buffer elsewhere clears it).
    allocated_for: Option<SymbolValues>,
}

/// The host's time in [`CudaProgram::run_graph_kept`], by phase, summed over runs: what a
/// benchmark reports to show where a decode step's time outside the GPU goes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KeptRunTimes {
    /// Runs summed.
    pub runs: u64,
    /// Binding the symbols, checking the inputs, sizing the device memory.
    pub prepare: std::time::Duration,
    /// Copying the given inputs to the device.
    pub upload: std::time::Duration,
    /// Launching the graph (or the steps).
    pub launch: std::time::Duration,
    /// Waiting for the device to finish.
    pub wait: std::time::Duration,
    /// Copying the outputs back into host tensors.
    pub read: std::time::Duration,
}

impl CudaProgram {
    /// The program of entry function `function`, with [`ProgramOptions::from_env`]. The plan
    /// is checked against the package's kernels here.
    pub fn new(package: Arc<CudaPackage>, function: &str) -> Result<CudaProgram, CudaError> {
        CudaProgram::with_options(package, function, ProgramOptions::from_env())
    }

    pub fn with_options(
        package: Arc<CudaPackage>,
        function: &str,
        options: ProgramOptions,
    ) -> Result<CudaProgram, CudaError> {
        let plan_index = package.plan_index(function)?;
        check_plan(package.plan_at(plan_index), &package.manifest().kernels)?;
        Ok(CudaProgram {
            package,
            plan_index,
            options,
            weights: BTreeMap::new(),
            own: BTreeMap::new(),
            arena: None,
            graphs: BTreeMap::new(),
            kept: BTreeMap::new(),
            last_kept: None,
            kept_times: KeptRunTimes::default(),
            staging: Mutex::new(PinnedStaging::default()),
            allocated_for: None,
        })
    }

    pub fn plan(&self) -> &Plan {
        self.package.plan_at(self.plan_index)
    }

    pub fn package(&self) -> &Arc<CudaPackage> {
        &self.package
    }

    pub fn options(&self) -> ProgramOptions {
        self.options
    }

    /// Turns graph capture and replay on or off (off drops the captured graphs).
    pub fn set_use_graphs(&mut self, use_graphs: bool) {
        self.options.use_graphs = use_graphs;
        if !use_graphs {
            self.graphs.clear();
        }
    }

    pub fn set_sync_after_each_launch(&mut self, sync: bool) {
        self.options.sync_after_each_launch = sync;
    }

    /// Bounds the graphs kept ([`ProgramOptions::max_graphs`]).
    pub fn set_max_graphs(&mut self, max_graphs: Option<usize>) {
        self.options.max_graphs = max_graphs;
    }

    /// Turns batch invariance on or off ([`ProgramOptions::batch_invariant`]; a change drops
    /// the captured graphs, which hold the other branches).
    pub fn set_batch_invariant(&mut self, batch_invariant: bool) {
        if self.options.batch_invariant != batch_invariant {
            self.graphs.clear();
        }
        self.options.batch_invariant = batch_invariant;
    }

    /// How many graphs are captured (one per set of symbol values run with
    /// [`CudaProgram::run_graph`] since the memory was last re-allocated).
    pub fn captured_graphs(&self) -> usize {
        self.graphs.len()
    }

    /// Uploads every weight the plan reads, looked up by checkpoint name, after checking
    /// each one's dtype and shape against the manifest. Either all weights are bound or,
    /// on an error naming the first bad one, none changes.
    pub fn bind_weights<'w>(
        &mut self,
        lookup: &dyn Fn(&str) -> Option<&'w Tensor>,
    ) -> Result<(), CudaError> {
        let package = self.package.clone();
        let plan = package.plan_at(self.plan_index);
        let mut checked: BTreeMap<&str, &'w Tensor> = BTreeMap::new();
        for decl in &plan.buffers {
            let BufferKind::Weight(name) = &decl.kind else {
                continue;
            };
            if checked.contains_key(name.as_str()) {
                continue;
            }
            let (dtype, shape) = expected_weight(plan, decl, name, &package.manifest().weights)?;
            let tensor =
                lookup(name).ok_or_else(|| CudaError::MissingWeight { name: name.clone() })?;
            check_weight(name, dtype, &shape, tensor)?;
            checked.insert(name, tensor);
        }
        let device = package.device();
        for (name, tensor) in checked {
            let bytes = tensor.to_le_bytes();
            let reusable = self
                .weights
                .get(name)
                .is_some_and(|buffer| buffer.len() == bytes.len());
            if !reusable {
                // Captured graphs hold the old weight's address.
                self.graphs.clear();
                self.weights
                    .insert(name.to_string(), device.alloc(bytes.len())?);
            }
            device.write(&self.weights[name], &bytes)?;
        }
        Ok(())
    }

    /// Runs the plan on `inputs` and returns its outputs.
    pub fn run(&mut self, inputs: &[Tensor]) -> Result<Vec<Tensor>, CudaError> {
        let symbols = self.prepare(inputs)?;
        self.execute(&self.plan().steps, &symbols, inputs, false)?;
        self.finish(&symbols)
    }

    /// Like [`CudaProgram::run`], but through a CUDA graph: the first run with given symbol
    /// values captures the plan's steps, later ones replay them. Plans with loops, and
    /// programs with graphs turned off, run directly.
    pub fn run_graph(&mut self, inputs: &[Tensor]) -> Result<Vec<Tensor>, CudaError> {
        if !self.graphs_apply() {
            return self.run(inputs);
        }
        let symbols = self.prepare(inputs)?;
        self.replay(&symbols, inputs)?;
        self.finish(&symbols)
    }

    /// Like [`CudaProgram::run_graph`], for a plan that updates inputs in place (outputs
    /// that are input buffers: KV caches). Such an input may be given as `None` to keep the
    /// device contents the previous run left in it, so it is neither copied in nor out; the
    /// first run gives it. Returns the outputs that are not inputs updated in place.
    pub fn run_graph_kept(&mut self, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, CudaError> {
        self.run_graph_kept_outputs(inputs, None)
    }

    /// Like [`CudaProgram::run_graph_kept`], copying back only the returned outputs at the
    /// positions `wanted` (among the outputs it returns; all of them with `None`), in that
    /// order: a decode step that only needs its greedy tokens leaves its logits on the
    /// device.
    pub fn run_graph_kept_outputs(
        &mut self,
        inputs: &[Option<&Tensor>],
        wanted: Option<&[usize]>,
    ) -> Result<Vec<Tensor>, CudaError> {
        let started = Instant::now();
        let package = self.package.clone();
        let plan = package.plan_at(self.plan_index);
        if has_loop(&plan.steps) {
            return Err(CudaError::BadPlan {
                plan: plan.function.clone(),
                detail: "a plan with loops cannot keep inputs on the device".into(),
            });
        }
        check_input_count(plan, inputs.len())?;
        let returned: Vec<BufferId> = plan
            .outputs
            .iter()
            .copied()
            .filter(|id| !plan.inputs.contains(id))
            .collect();
        let outputs = match wanted {
            None => returned,
            Some(wanted) => wanted
                .iter()
                .map(|&i| {
                    returned.get(i).copied().ok_or_else(|| CudaError::BadPlan {
                        plan: plan.function.clone(),
                        detail: format!(
                            "output {i} was asked for, but the plan returns {}",
                            returned.len()
                        ),
                    })
                })
                .collect::<Result<_, _>>()?,
        };
        let updated: Vec<usize> = plan
            .outputs
            .iter()
            .filter_map(|id| plan.inputs.iter().position(|i| i == id))
            .collect();
        let mut shapes: Vec<Vec<usize>> = Vec::with_capacity(inputs.len());
        for (index, input) in inputs.iter().enumerate() {
            match (input, self.kept.get(&index)) {
                (Some(tensor), _) => shapes.push(tensor.shape.clone()),
                (None, Some((_, shape))) => shapes.push(shape.clone()),
                (None, None) => {
                    let detail = if updated.contains(&index) {
                        "no value is kept on the device for this input yet: give it"
                    } else {
                        "only inputs the plan updates in place can be kept on the device"
                    };
                    return Err(CudaError::BadInput {
                        plan: plan.function.clone(),
                        index,
                        detail: detail.into(),
                    });
                }
            }
        }
        let shape_refs: Vec<&[usize]> = shapes.iter().map(Vec::as_slice).collect();
        let symbols = bind_symbols(plan, &shape_refs)?;
        let given: Vec<(usize, &Tensor)> = inputs
            .iter()
            .enumerate()
            .filter_map(|(i, t)| t.map(|t| (i, t)))
            .collect();
        for &(index, tensor) in &given {
            check_input(plan, index, tensor, &symbols)?;
        }
        self.allocate(plan, &symbols)?;
        let prepared = Instant::now();
        self.upload(plan, &given, &symbols)?;
        let uploaded = Instant::now();
        for &index in &updated {
            if let Some(tensor) = inputs.get(index).copied().flatten() {
                self.kept
                    .insert(index, (tensor.dtype, tensor.shape.clone()));
            }
        }
        if self.graphs_apply() {
            self.replay(&symbols, &[])?;
        } else {
            self.execute(&plan.steps, &symbols, &[], false)?;
        }
        self.last_kept = Some(symbols.clone());
        let queued = self.queue_outputs(&outputs, &symbols)?;
        let launched = Instant::now();
        self.wait(plan, &symbols)?;
        let waited = Instant::now();
        let read = self.take_outputs(&queued);
        let times = &mut self.kept_times;
        times.runs += 1;
        times.prepare += prepared - started;
        times.upload += uploaded - prepared;
        times.launch += launched - uploaded;
        times.wait += waited - launched;
        times.read += waited.elapsed();
        read
    }

    /// Where the host's time of the kept runs went so far.
    pub fn kept_run_times(&self) -> &KeptRunTimes {
        &self.kept_times
    }

    /// Starts [`CudaProgram::kept_run_times`] over.
    pub fn reset_kept_run_times(&mut self) {
        self.kept_times = KeptRunTimes::default();
    }

    /// Keeps input `index` (one the plan updates in place) on the device as zeros of `dtype`
    /// and `shape`, made there rather than copied from the host: a later
    /// [`CudaProgram::run_graph_kept`] given `None` for it starts from zeros. This is how a
    /// KV cache of many gigabytes starts without a host copy of its size.
    pub fn keep_zeros(
        &mut self,
        index: usize,
        dtype: DType,
        shape: &[usize],
    ) -> Result<(), CudaError> {
        let package = self.package.clone();
        let plan = package.plan_at(self.plan_index);
        let bad = |detail: &str| CudaError::BadInput {
            plan: plan.function.clone(),
            index,
            detail: detail.into(),
        };
        let id = *plan
            .inputs
            .get(index)
            .ok_or_else(|| bad("the plan has no such input"))?;
        if !plan.outputs.contains(&id) {
            return Err(bad(
                "only inputs the plan updates in place can be kept on the device",
            ));
        }
        let decl = buffer_decl(plan, id)?;
        let bytes = shape.iter().product::<usize>() * dtype.size_bytes();
        // A new buffer is zeroed; captured graphs hold the old one's address.
        self.graphs.clear();
        self.own.remove(&decl.id);
        self.allocated_for = None;
        self.own.insert(decl.id, package.device().alloc(bytes)?);
        self.kept.insert(index, (dtype, shape.to_vec()));
        Ok(())
    }

    /// The current device contents of input `index` (an input updated in place and kept).
    pub fn read_input(&self, index: usize) -> Result<Tensor, CudaError> {
        let plan = self.plan();
        let Some((dtype, shape)) = self.kept.get(&index) else {
            return Err(CudaError::BadInput {
                plan: plan.function.clone(),
                index,
                detail: "no value is kept on the device for this input".into(),
            });
        };
        let id = plan.inputs[index];
        let decl = buffer_decl(plan, id)?;
        let bytes = self
            .package
            .device()
            .read_region(self.package.device().region_of(
                &self.own[&decl.id],
                0,
                dtype.size_bytes() * shape.iter().product::<usize>(),
                "reading a kept input",
            )?)?;
        Ok(host_tensor(*dtype, shape, &bytes))
    }

    /// Times `runs` runs of the plan's steps on `inputs` (after warm-up) with CUDA events,
    /// through a graph when [`CudaProgram::run_graph`] would use one. Inputs are copied in
    /// once, before the timed runs; outputs are not read.
    pub fn time_launches(&mut self, inputs: &[Tensor], runs: usize) -> Result<Timing, CudaError> {
        let symbols = self.prepare(inputs)?;
        let device = self.package.device().clone();
        if self.graphs_apply() {
            self.replay(&symbols, inputs)?;
            time_on_device(&device, runs, &mut || self.replay(&symbols, inputs))
        } else {
            time_on_device(&device, runs, &mut || {
                self.execute(&self.plan().steps, &symbols, inputs, false)
            })
        }
    }

    /// Times `runs` more runs (after warm-up) of the steps of the last
    /// [`CudaProgram::run_graph_kept`] with CUDA events, through its graph when graphs
    /// apply: on the device contents that run left, nothing copied in or out. This is the
    /// GPU's share of such a run, without the host's input copies, synchronization and
    /// output copies. The steps run again on the same inputs, so a plan that updates its
    /// inputs in place must write the same values again (a decode step rewrites its token's
    /// cache slots with the same keys and values).
    pub fn time_last_kept_run(&mut self, runs: usize) -> Result<Timing, CudaError> {
        let Some(symbols) = self.last_kept.clone() else {
            return Err(CudaError::BadInput {
                plan: self.plan().function.clone(),
                index: 0,
                detail: "no kept run to time: run it with `run_graph_kept` first".into(),
            });
        };
        let device = self.package.device().clone();
        if self.graphs_apply() {
            time_on_device(&device, runs, &mut || self.replay(&symbols, &[]))
        } else {
            time_on_device(&device, runs, &mut || {
                self.execute(&self.plan().steps, &symbols, &[], false)
            })
        }
    }

    fn graphs_apply(&self) -> bool {
        self.options.use_graphs && !has_loop(&self.plan().steps)
    }

    /// Launches the graph for `symbols`, capturing it first when there is none.
    fn replay(&mut self, symbols: &SymbolValues, inputs: &[Tensor]) -> Result<(), CudaError> {
        let full = self
            .options
            .max_graphs
            .is_some_and(|most| self.graphs.len() >= most);
        if full && !self.graphs.contains_key(symbols) {
            return self.execute(&self.plan().steps, symbols, inputs, false);
        }
        if !self.graphs.contains_key(symbols) {
            let graph = self.capture(symbols, inputs)?;
            self.graphs.insert(symbols.clone(), graph);
        }
        match &self.graphs[symbols] {
            Some(graph) => graph.launch().map_err(|error| {
                CudaError::driver(
                    format!(
                        "replaying the CUDA graph of plan `{}` ({symbols})",
                        self.plan().function
                    ),
                    error,
                )
            }),
            None => Ok(()),
        }
    }

    /// Captures the plan's steps for `symbols` into a graph (which is not run yet).
    fn capture(
        &self,
        symbols: &SymbolValues,
        inputs: &[Tensor],
    ) -> Result<Option<CapturedGraph>, CudaError> {
        let stream = self.package.device().stream();
        let what = |step: &str| {
            format!(
                "{step} the CUDA graph of plan `{}` ({symbols})",
                self.plan().function
            )
        };
        stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(|error| CudaError::driver(what("starting to capture"), error))?;
        let executed = self.execute(&self.plan().steps, symbols, inputs, true);
        // End the capture even when a step failed, so the stream is usable again.
        let ended = stream.end_capture(CUgraphInstantiate_flags(0));
        executed?;
        let graph = ended.map_err(|error| CudaError::driver(what("finishing"), error))?;
        Ok(graph.map(CapturedGraph::new))
    }

    /// Binds the symbols, checks inputs and weights, sizes the memory and copies the
    /// inputs in.
    fn prepare(&mut self, inputs: &[Tensor]) -> Result<SymbolValues, CudaError> {
        let package = self.package.clone();
        let plan = package.plan_at(self.plan_index);
        let shapes: Vec<&[usize]> = inputs.iter().map(|t| t.shape.as_slice()).collect();
        let symbols = bind_symbols(plan, &shapes)?;
        check_inputs(plan, inputs, &symbols)?;
        self.allocate(plan, &symbols)?;
        let given: Vec<(usize, &Tensor)> = inputs.iter().enumerate().collect();
        self.upload(plan, &given, &symbols)?;
        Ok(symbols)
    }

    /// Checks that every weight is bound and sizes the device memory for `symbols`
    /// (re-allocating only what must grow, which drops the captured graphs).
    fn allocate(&mut self, plan: &Plan, symbols: &SymbolValues) -> Result<(), CudaError> {
        if self.allocated_for.as_ref() == Some(symbols) {
            return Ok(());
        }
        let package = self.package.clone();
        for decl in &plan.buffers {
            if let BufferKind::Weight(name) = &decl.kind {
                if !self.weights.contains_key(name) {
                    return Err(CudaError::WeightNotBound {
                        plan: plan.function.clone(),
                        name: name.clone(),
                    });
                }
            }
        }

        let device = package.device();
        let arena_needed = arena_bytes(plan, symbols)?;
        if self
            .arena
            .as_ref()
            .is_none_or(|arena| arena.len() < arena_needed)
        {
            self.graphs.clear();
            self.arena = Some(device.alloc(arena_needed)?);
        }
        for decl in &plan.buffers {
            // Constants: allocated and written once (no kernel writes them).
            if let BufferKind::Constant(bytes) = &decl.kind {
                if !self.own.contains_key(&decl.id) {
                    let needed = buffer_bytes(plan, decl, symbols)?;
                    if needed != bytes.len() {
                        return Err(CudaError::BadPlan {
                            plan: plan.function.clone(),
                            detail: format!(
                                "constant buffer b{} holds {} bytes, its type needs {needed}",
                                decl.id.0,
                                bytes.len()
                            ),
                        });
                    }
                    let buffer = device.alloc(bytes.len())?;
                    device.write(&buffer, bytes)?;
                    self.graphs.clear();
                    self.own.insert(decl.id, buffer);
                }
                continue;
            }
            // Zeroed counters: a new allocation is zeroed (`alloc`), and kernels leave the
            // elements they use zero, so growing needs no copy.
            if matches!(
                decl.kind,
                BufferKind::Input(_) | BufferKind::Output(_) | BufferKind::Zeroed
            ) {
                let needed = buffer_bytes(plan, decl, symbols)?;
                if self
                    .own
                    .get(&decl.id)
                    .is_none_or(|buffer| buffer.len() < needed)
                {
                    self.graphs.clear();
                    self.own.insert(decl.id, device.alloc(needed)?);
                }
            }
        }
        self.allocated_for = Some(symbols.clone());
        Ok(())
    }

    /// Copies the given inputs (by input index) to their device buffers, through the
    /// page-locked staging memory.
    fn upload(
        &self,
        plan: &Plan,
        inputs: &[(usize, &Tensor)],
        symbols: &SymbolValues,
    ) -> Result<(), CudaError> {
        let device = self.package.device();
        let bytes: Vec<Vec<u8>> = inputs.iter().map(|(_, t)| t.to_le_bytes()).collect();
        let mut parts = Vec::with_capacity(inputs.len());
        for (&(index, _), bytes) in inputs.iter().zip(&bytes) {
            let region = self.region(plan, plan.inputs[index], symbols)?;
            parts.push((region, bytes.as_slice()));
        }
        self.staging()
            .upload(device.stream(), &parts)
            .map_err(|error| {
                let ids: Vec<String> = inputs
                    .iter()
                    .map(|&(index, _)| format!("b{}", plan.inputs[index].0))
                    .collect();
                CudaError::driver(
                    format!(
                        "copying inputs {} of plan `{}` to the device",
                        ids.join(", "),
                        plan.function
                    ),
                    error,
                )
            })
    }

    /// The staging memory (a poisoned lock only means a copy failed; the memory is whole).
    fn staging(&self) -> std::sync::MutexGuard<'_, PinnedStaging> {
        self.staging
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Waits for the steps and copies the outputs back.
    fn finish(&self, symbols: &SymbolValues) -> Result<Vec<Tensor>, CudaError> {
        let plan = self.plan();
        let queued = self.queue_outputs(&plan.outputs, symbols)?;
        self.wait(plan, symbols)?;
        self.take_outputs(&queued)
    }

    /// Queues the copies of buffers `outputs` back behind the steps on the stream (no
    /// wait): after [`CudaProgram::wait`], [`CudaProgram::take_outputs`] returns them, so
    /// that one wait covers the steps and the copies.
    fn queue_outputs(
        &self,
        outputs: &[BufferId],
        symbols: &SymbolValues,
    ) -> Result<QueuedOutputs, CudaError> {
        let plan = self.plan();
        let device = self.package.device();
        let mut regions = Vec::with_capacity(outputs.len());
        let mut types = Vec::with_capacity(outputs.len());
        for &id in outputs {
            let decl = buffer_decl(plan, id)?;
            types.push((decl.dtype, buffer_shape(plan, decl, symbols)?));
            regions.push(self.region(plan, id, symbols)?);
        }
        let staged = self
            .staging()
            .queue_download(device.stream(), &regions)
            .map_err(|error| self.copy_back_error(error))?;
        Ok(QueuedOutputs { types, staged })
    }

    /// The outputs of [`CudaProgram::queue_outputs`], once [`CudaProgram::wait`] returned.
    fn take_outputs(&self, queued: &QueuedOutputs) -> Result<Vec<Tensor>, CudaError> {
        let staging = self.staging();
        let bytes = staging
            .downloaded(&queued.staged)
            .map_err(|error| self.copy_back_error(error))?;
        Ok(queued
            .types
            .iter()
            .zip(bytes)
            .map(|((dtype, shape), bytes)| host_tensor(*dtype, shape, bytes))
            .collect())
    }

    fn copy_back_error(&self, error: DriverError) -> CudaError {
        CudaError::driver(
            format!(
                "copying the outputs of plan `{}` back",
                self.plan().function
            ),
            error,
        )
    }

    /// Waits for the device's stream to finish the steps of a run of `plan`.
    fn wait(&self, plan: &Plan, symbols: &SymbolValues) -> Result<(), CudaError> {
        let synchronized = self.package.device().stream().synchronize();
        if synchronized.is_ok() {
            self.staging().finished();
        }
        synchronized.map_err(|error| {
            CudaError::driver(
                format!(
                    "running plan `{}` ({symbols}); to find the kernel that failed, run with \
                     {SYNC_LAUNCHES_ENV}=1",
                    plan.function
                ),
                error,
            )
        })
    }

    /// The device bytes of buffer `id` for `symbols`.
    fn region(
        &self,
        plan: &Plan,
        id: BufferId,
        symbols: &SymbolValues,
    ) -> Result<DeviceRegion<'_>, CudaError> {
        let placement = place(plan, id, symbols)?;
        let buffer = match &placement.storage {
            Storage::Own(owner) => self.own.get(owner),
            Storage::Weight(name) => self.weights.get(name),
            Storage::Arena => self.arena.as_ref(),
        };
        let buffer = buffer.ok_or_else(|| match &placement.storage {
            Storage::Weight(name) => CudaError::WeightNotBound {
                plan: plan.function.clone(),
                name: name.clone(),
            },
            _ => CudaError::BadPlan {
                plan: plan.function.clone(),
                detail: format!("buffer b{} has no device memory (not prepared)", id.0),
            },
        })?;
        self.package
            .device()
            .region_of(buffer, placement.offset, placement.bytes, "using buffer")
    }

    /// Runs (or, when `capturing`, records) `steps` on the device's stream.
    fn execute(
        &self,
        steps: &[Step],
        symbols: &SymbolValues,
        inputs: &[Tensor],
        capturing: bool,
    ) -> Result<(), CudaError> {
        let plan = self.plan();
        let device = self.package.device();
        for step in steps {
            match step {
                Step::Launch { kernel, args } => {
                    self.launch(plan, *kernel, args, symbols, capturing)?;
                }
                Step::Copy { src, dst } => {
                    let source = self.region(plan, *src, symbols)?;
                    let destination = self.region(plan, *dst, symbols)?;
                    copy_between(device, plan, (*src, source), (*dst, destination))?;
                }
                Step::Loop {
                    count,
                    carried,
                    init,
                    next,
                    counter,
                    body,
                } => {
                    let iterations = self.loop_count(plan, *count, symbols, inputs)?;
                    for (&from, &to) in init.iter().zip(carried) {
                        let source = self.region(plan, from, symbols)?;
                        let destination = self.region(plan, to, symbols)?;
                        copy_between(device, plan, (from, source), (to, destination))?;
                    }
                    let counter_region = self.region(plan, *counter, symbols)?;
                    for iteration in 0..iterations {
                        ffi::copy_host_to_device(
                            device.stream(),
                            counter_region,
                            &(iteration as i64).to_le_bytes(),
                        )
                        .map_err(|error| {
                            CudaError::driver(
                                format!(
                                    "writing loop counter b{} of `{}`",
                                    counter.0, plan.function
                                ),
                                error,
                            )
                        })?;
                        self.execute(body, symbols, inputs, capturing)?;
                        for (&from, &to) in next.iter().zip(carried) {
                            let source = self.region(plan, from, symbols)?;
                            let destination = self.region(plan, to, symbols)?;
                            copy_between(device, plan, (from, source), (to, destination))?;
                        }
                    }
                }
                Step::BySize { large, .. } if self.options.batch_invariant => {
                    self.execute(large, symbols, inputs, capturing)?;
                }
                Step::BySize { .. } => {
                    let branch = step
                        .by_size_branch(|s| symbols.get(s))
                        .expect("a BySize step")
                        .map_err(|detail| CudaError::BadPlan {
                            plan: plan.function.clone(),
                            detail,
                        })?;
                    self.execute(branch, symbols, inputs, capturing)?;
                }
            }
        }
        Ok(())
    }

    fn launch(
        &self,
        plan: &Plan,
        kernel: usize,
        args: &[Arg],
        symbols: &SymbolValues,
        capturing: bool,
    ) -> Result<(), CudaError> {
        let info = self.package.kernel_info(kernel);
        let Some(shape) = LaunchShape::for_kernel(info, symbols)? else {
            return Ok(());
        };
        let mut values = Vec::with_capacity(args.len());
        for (param, arg) in info.params.iter().zip(args) {
            values.push(match (param, arg) {
                (_, Arg::Buffer(id)) => {
                    ArgValue::Address(self.region(plan, *id, symbols)?.address())
                }
                (ParamLayout::Scalar { name, ty }, Arg::Sym(symbol)) => {
                    symbol_argument(plan, &info.name, name, ty, symbol, symbols)?
                }
                (ParamLayout::Buffer { name, .. }, Arg::Sym(symbol)) => {
                    return Err(CudaError::BadPlan {
                        plan: plan.function.clone(),
                        detail: format!(
                            "kernel `{}`: buffer parameter `{name}` is given symbol `{symbol}`",
                            info.name
                        ),
                    });
                }
            });
        }
        let order = if self.options.dependent_launch {
            self.package.plan_launch_order()
        } else {
            LaunchOrder::Serial
        };
        self.package
            .launch_index(kernel, &shape, &mut values, order)?;
        if self.options.sync_after_each_launch && !capturing {
            self.package
                .device()
                .stream()
                .synchronize()
                .map_err(|error| CudaError::Launch {
                    kernel: info.name.clone(),
                    shape,
                    source: error.into(),
                })?;
        }
        Ok(())
    }

    /// The iteration count of a loop: from the caller's tensor when the count is an input,
    /// else read back from the device (waiting for the steps before it).
    fn loop_count(
        &self,
        plan: &Plan,
        count: BufferId,
        symbols: &SymbolValues,
        inputs: &[Tensor],
    ) -> Result<u64, CudaError> {
        let bad = |detail: String| CudaError::BadPlan {
            plan: plan.function.clone(),
            detail,
        };
        let value = if let Some(position) = plan.inputs.iter().position(|&id| id == count) {
            let tensor = &inputs[position];
            *tensor
                .to_i64_vec()
                .first()
                .ok_or_else(|| CudaError::BadInput {
                    plan: plan.function.clone(),
                    index: position,
                    detail: "the loop count is read from this input, but it is empty".to_string(),
                })?
        } else {
            let dtype = buffer_decl(plan, count)?.dtype;
            let width = dtype.size_bytes();
            let region = self.region(plan, count, symbols)?;
            if region.len() < width {
                return Err(bad(format!("the loop count b{} holds no element", count.0)));
            }
            let bytes = self.package.device().read_region(region)?;
            let mut raw = [0u8; 8];
            raw[..width].copy_from_slice(&bytes[..width]);
            match dtype {
                DType::I8 => i64::from(raw[0] as i8),
                DType::I32 => i64::from(i32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]])),
                DType::I64 => i64::from_le_bytes(raw),
                other => {
                    return Err(bad(format!(
                        "the loop count b{} is {other}, not an integer",
                        count.0
                    )))
                }
            }
        };
        Ok(value.max(0) as u64)
    }
}

/// The value of `symbol` as the scalar parameter `param` of type `ty`.
fn symbol_argument(
    plan: &Plan,
    kernel: &str,
    param: &str,
    ty: &str,
    symbol: &str,
    symbols: &SymbolValues,
) -> Result<ArgValue, CudaError> {
    let bad = |detail: String| CudaError::BadPlan {
        plan: plan.function.clone(),
        detail: format!("kernel `{kernel}`, parameter `{param}`: {detail}"),
    };
    let value = symbols
        .get(symbol)
        .ok_or_else(|| bad(format!("symbol `{symbol}` is not bound ({symbols})")))?;
    match ty {
        "i64" => i64::try_from(value)
            .map(ArgValue::I64)
            .map_err(|_| bad(format!("`{symbol}` = {value} does not fit in i64"))),
        "i32" => i32::try_from(value)
            .map(ArgValue::I32)
            .map_err(|_| bad(format!("`{symbol}` = {value} does not fit in i32"))),
        other => Err(bad(format!("a symbol cannot be passed as {other}"))),
    }
}

/// A `Copy` step: all of `source`'s bytes into `destination`.
fn copy_between(
    device: &CudaDevice,
    plan: &Plan,
    (source_id, source): (BufferId, DeviceRegion<'_>),
    (destination_id, destination): (BufferId, DeviceRegion<'_>),
) -> Result<(), CudaError> {
    if destination.len() < source.len() {
        return Err(CudaError::BadPlan {
            plan: plan.function.clone(),
            detail: format!(
                "copy b{} -> b{}: {} bytes do not fit in {}",
                source_id.0,
                destination_id.0,
                source.len(),
                destination.len()
            ),
        });
    }
    ffi::copy_device_to_device(device.stream(), destination, source, source.len()).map_err(
        |error| {
            CudaError::driver(
                format!(
                    "copying b{} -> b{} in plan `{}`",
                    source_id.0, destination_id.0, plan.function
                ),
                error,
            )
        },
    )
}

/// Outputs whose copies back are queued on the stream ([`CudaProgram::queue_outputs`]).
struct QueuedOutputs {
    /// Each output's dtype and shape.
    types: Vec<(DType, Vec<usize>)>,
    staged: QueuedDownload,
}
