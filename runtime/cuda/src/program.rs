//! Running one plan of a package on the GPU.
//!
//! A [`CudaProgram`] owns the device memory of one plan: the weights (uploaded once by
//! [`CudaProgram::bind_weights`]), one allocation holding the inputs side by side (one copy
//! brings a run's inputs in), one per output buffer and per input updated in place, and one
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
use cudarc::driver::{CudaEvent, DriverError};
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
use crate::layout::{arena_bytes, input_block, place, Placement, Storage};
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
    /// The allocations of `Output`, `Zeroed` and constant buffers and of the inputs the
    /// plan updates in place.
    own: BTreeMap<BufferId, DeviceBuffer>,
    /// The inputs the plan does not update in place, side by side
    /// ([`crate::layout::input_block`]).
    inputs: Option<DeviceBuffer>,
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
    /// The page-locked host memory inputs and outputs are copied through, one piece a run
    /// in flight: a run takes a free one (a new one when none is), and a submitted kept run
    /// ([`PendingRun`]) holds its own until it is collected, so that the next run's inputs
    /// can be written while it runs. (A lock, so that copies can be staged while device
    /// regions borrow the program.)
    staging: Mutex<Vec<PinnedStaging>>,
    /// The symbol values the device memory was last sized for: [`CudaProgram::allocate`]
    /// has nothing to do for them again (what replaces a buffer elsewhere clears it).
    allocated_for: Option<SymbolValues>,
    /// Every buffer's placement for `allocated_for`, computed once by
    /// [`CudaProgram::allocate`] rather than at each launch argument (a run that is not a
    /// graph replay resolves each kernel's buffers).
    placements: BTreeMap<BufferId, Placement>,
    /// Counts the replacements of input, output, zeroed or arena memory
    /// ([`CudaProgram::memory_replaced`]): a fed input's result must not have moved.
    memory_generation: u64,
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
            inputs: None,
            arena: None,
            graphs: BTreeMap::new(),
            kept: BTreeMap::new(),
            last_kept: None,
            kept_times: KeptRunTimes::default(),
            staging: Mutex::new(Vec::new()),
            allocated_for: None,
            placements: BTreeMap::new(),
            memory_generation: 0,
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
        let pending = self.submit_kept(inputs, wanted, &[])?;
        self.collect(pending)
    }

    /// Queues a run like [`CudaProgram::run_graph_kept_outputs`] (inputs copied in, the
    /// graph launched, the wanted outputs' copies back queued behind it) and returns without
    /// waiting for it: [`CudaProgram::collect`] waits and returns the outputs. The host can
    /// meanwhile prepare and submit the next run, which the device starts as soon as this
    /// one is done (a decode loop whose host work overlaps the device's).
    ///
    /// Each of `fed` names an input (given as `None`) that takes a result of the kept run
    /// submitted before this one, copied on the device behind that run (stream order):
    /// the next step's tokens from this step's greedy tokens, which the host has not seen
    /// yet. The input has the result's shape and its dtype or, for an `i64` result, `i32`
    /// (each value's low half: token ids fit).
    pub fn submit_kept(
        &mut self,
        inputs: &[Option<&Tensor>],
        wanted: Option<&[usize]>,
        fed: &[FedInput],
    ) -> Result<PendingRun, CudaError> {
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
            None => returned.clone(),
            Some(wanted) => wanted
                .iter()
                .map(|&i| returned_output(plan, &returned, i))
                .collect::<Result<_, _>>()?,
        };
        let updated: Vec<usize> = plan
            .outputs
            .iter()
            .filter_map(|id| plan.inputs.iter().position(|i| i == id))
            .collect();
        let feeds = self.feeds(plan, &returned, inputs, fed)?;
        let mut shapes: Vec<Vec<usize>> = Vec::with_capacity(inputs.len());
        for (index, input) in inputs.iter().enumerate() {
            let feed = feeds.iter().find(|f| f.input == index);
            match (input, self.kept.get(&index), feed) {
                (Some(tensor), _, _) => shapes.push(tensor.shape.clone()),
                (None, _, Some(feed)) => shapes.push(feed.shape.clone()),
                (None, Some((_, shape)), None) => shapes.push(shape.clone()),
                (None, None, None) => {
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
        let mut staging = self.take_staging();
        let uploaded = self
            .upload(plan, &given, &symbols, &mut staging)
            .and_then(|()| self.copy_feeds(plan, &feeds, &symbols));
        if let Err(error) = uploaded {
            self.give_back_staging(staging);
            return Err(error);
        }
        let uploaded = Instant::now();
        for &index in &updated {
            if let Some(tensor) = inputs.get(index).copied().flatten() {
                self.kept
                    .insert(index, (tensor.dtype, tensor.shape.clone()));
            }
        }
        let launched = if self.graphs_apply() {
            self.replay(&symbols, &[])
        } else {
            self.execute(&plan.steps, &symbols, &[], false)
        };
        self.last_kept = Some(symbols.clone());
        let queued = launched.and_then(|()| self.queue_outputs(&outputs, &symbols, &mut staging));
        let done = queued.and_then(|queued| {
            let stream = package.device().stream();
            match stream.record_event(None) {
                Ok(done) => Ok((queued, done)),
                Err(error) => Err(self.run_error(plan, &symbols, error)),
            }
        });
        let (queued, done) = match done {
            Ok(done) => done,
            Err(error) => {
                self.give_back_staging(staging);
                return Err(error);
            }
        };
        let times = &mut self.kept_times;
        times.runs += 1;
        times.prepare += prepared - started;
        times.upload += uploaded - prepared;
        times.launch += uploaded.elapsed();
        Ok(PendingRun {
            staging,
            queued,
            done,
            symbols,
        })
    }

    /// Waits for a run of [`CudaProgram::submit_kept`] and returns its outputs. Runs may be
    /// collected in any order; each one's outputs are its own.
    pub fn collect(&mut self, run: PendingRun) -> Result<Vec<Tensor>, CudaError> {
        let started = Instant::now();
        let PendingRun {
            mut staging,
            queued,
            done,
            symbols,
        } = run;
        if let Err(error) = done.synchronize() {
            // The copies into the staging memory may not have run: drop it with the run.
            self.package.device().stream().synchronize().ok();
            return Err(self.run_error(self.plan(), &symbols, error));
        }
        let waited = Instant::now();
        staging.finished();
        let read = self.take_outputs(&queued, &staging);
        self.give_back_staging(staging);
        let times = &mut self.kept_times;
        times.wait += waited - started;
        times.read += waited.elapsed();
        read
    }

    /// The inputs of a submitted run that take a result of the kept run before it, checked
    /// against the plan: where each result lies (for the last kept run's symbols) and the
    /// input's shape.
    fn feeds(
        &self,
        plan: &Plan,
        returned: &[BufferId],
        inputs: &[Option<&Tensor>],
        fed: &[FedInput],
    ) -> Result<Vec<Feed>, CudaError> {
        let mut feeds: Vec<Feed> = Vec::with_capacity(fed.len());
        for &FedInput { input, result } in fed {
            let bad = |detail: String| CudaError::BadInput {
                plan: plan.function.clone(),
                index: input,
                detail,
            };
            if inputs.get(input).is_none_or(Option::is_some) {
                return Err(bad(format!(
                    "it is fed from result {result}, so give it as `None` (the run has {} inputs)",
                    inputs.len()
                )));
            }
            if feeds.iter().any(|f| f.input == input) || self.kept.contains_key(&input) {
                return Err(bad(
                    "it is fed twice, or it is an input the plan updates in place".into(),
                ));
            }
            let Some(last) = &self.last_kept else {
                return Err(bad(
                    "there is no earlier kept run whose result could feed it".into(),
                ));
            };
            let source = returned_output(plan, returned, result)?;
            let from = buffer_decl(plan, source)?;
            let to = buffer_decl(plan, plan.inputs[input])?;
            let narrowing = from.dtype == DType::I64 && to.dtype == DType::I32;
            if from.dtype != to.dtype && !narrowing {
                return Err(bad(format!(
                    "result {result} is {}, which cannot feed an input of {}",
                    from.dtype, to.dtype
                )));
            }
            feeds.push(Feed {
                input,
                source,
                generation: self.memory_generation,
                shape: buffer_shape(plan, from, last)?,
                last: last.clone(),
                sizes: (from.dtype.size_bytes(), to.dtype.size_bytes()),
            });
        }
        Ok(feeds)
    }

    /// Queues the copies of `feeds` (after [`CudaProgram::allocate`] for the run's
    /// `symbols`). The results are those of the last kept run, in buffers it did not
    /// outgrow: a result whose memory was re-allocated since is an error, not stale data.
    fn copy_feeds(
        &self,
        plan: &Plan,
        feeds: &[Feed],
        symbols: &SymbolValues,
    ) -> Result<(), CudaError> {
        for feed in feeds {
            if self.memory_generation != feed.generation {
                return Err(CudaError::BadInput {
                    plan: plan.function.clone(),
                    index: feed.input,
                    detail: format!(
                        "sizing the device memory for this run replaced buffers, so the result \
                         that feeds it (b{}) may be gone: give the input instead",
                        feed.source.0
                    ),
                });
            }
            let source = self.region(plan, feed.source, &feed.last)?;
            let destination = self.region(plan, plan.inputs[feed.input], symbols)?;
            let count = feed.shape.iter().product::<usize>();
            ffi::copy_narrowing(
                self.package.device().stream(),
                destination,
                source,
                count,
                feed.sizes,
            )
            .map_err(|error| {
                CudaError::driver(
                    format!(
                        "copying buffer b{} of the last run into input {} of plan `{}`",
                        feed.source.0, feed.input, plan.function
                    ),
                    error,
                )
            })?;
        }
        Ok(())
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
        self.memory_replaced();
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
        let mut staging = self.take_staging();
        let uploaded = self.upload(plan, &given, &symbols, &mut staging);
        self.give_back_staging(staging);
        uploaded.map(|()| symbols)
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
        if let Some(arena) = grown(device, self.arena.as_ref(), arena_bytes(plan, symbols)?)? {
            self.memory_replaced();
            self.arena = Some(arena);
        }
        let (_, inputs_needed) = input_block(plan, symbols)?;
        if let Some(inputs) = grown(device, self.inputs.as_ref(), inputs_needed)? {
            self.memory_replaced();
            self.inputs = Some(inputs);
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
                    self.memory_replaced();
                    self.own.insert(decl.id, buffer);
                }
                continue;
            }
            // Zeroed counters: a new allocation is zeroed (`alloc`), and kernels leave the
            // elements they use zero, so growing needs no copy. The other inputs are in
            // `inputs`.
            let own = match decl.kind {
                BufferKind::Input(_) => plan.outputs.contains(&decl.id),
                BufferKind::Output(_) | BufferKind::Zeroed => true,
                _ => false,
            };
            if own {
                let needed = buffer_bytes(plan, decl, symbols)?;
                if let Some(buffer) = grown(device, self.own.get(&decl.id), needed)? {
                    self.memory_replaced();
                    self.own.insert(decl.id, buffer);
                }
            }
        }
        self.placements = plan
            .buffers
            .iter()
            .map(|decl| Ok((decl.id, place(plan, decl.id, symbols)?)))
            .collect::<Result<_, CudaError>>()?;
        self.allocated_for = Some(symbols.clone());
        Ok(())
    }

    /// Copies the given inputs (by input index) to their device buffers, through the
    /// page-locked staging memory: each run of given inputs lying side by side in the
    /// inputs' allocation (no input between them left out) as one copy, padding included,
    /// and each input updated in place by a copy of its own.
    fn upload(
        &self,
        plan: &Plan,
        inputs: &[(usize, &Tensor)],
        symbols: &SymbolValues,
        staging: &mut PinnedStaging,
    ) -> Result<(), CudaError> {
        let device = self.package.device();
        let given_bytes = |id: BufferId| {
            inputs
                .iter()
                .find(|&&(index, _)| plan.inputs[index] == id)
                .map(|(_, tensor)| tensor.to_le_bytes())
        };
        // Runs of the inputs' allocation: (offset, bytes from there on).
        let (placed, _) = input_block(plan, symbols)?;
        let mut runs: Vec<(usize, Vec<u8>)> = Vec::new();
        let mut extend_run = false;
        for &(id, offset) in &placed {
            let Some(bytes) = given_bytes(id) else {
                extend_run = false;
                continue;
            };
            match runs.last_mut() {
                Some((start, run)) if extend_run => {
                    run.resize(offset - *start, 0);
                    run.extend_from_slice(&bytes);
                }
                _ => runs.push((offset, bytes)),
            }
            extend_run = true;
        }
        let own: Vec<(BufferId, Vec<u8>)> = inputs
            .iter()
            .map(|&(index, tensor)| (plan.inputs[index], tensor))
            .filter(|(id, _)| !placed.iter().any(|(p, _)| p == id))
            .map(|(id, tensor)| (id, tensor.to_le_bytes()))
            .collect();
        let mut parts = Vec::with_capacity(runs.len() + own.len());
        if !runs.is_empty() {
            let block = self.inputs.as_ref().ok_or_else(|| CudaError::BadPlan {
                plan: plan.function.clone(),
                detail: "the inputs have no device memory (not prepared)".into(),
            })?;
            for (offset, bytes) in &runs {
                let region =
                    device.region_of(block, *offset, bytes.len(), "copying inputs into")?;
                parts.push((region, bytes.as_slice()));
            }
        }
        for (id, bytes) in &own {
            parts.push((self.region(plan, *id, symbols)?, bytes.as_slice()));
        }
        staging.upload(device.stream(), &parts).map_err(|error| {
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

    /// Input, output, zeroed or arena memory was replaced: the captured graphs hold the
    /// old addresses, and the results a fed input would take are gone.
    fn memory_replaced(&mut self) {
        self.graphs.clear();
        self.memory_generation += 1;
    }

    /// The free staging memories (a poisoned lock only means a copy failed; the memory is
    /// whole).
    fn free_staging(&self) -> std::sync::MutexGuard<'_, Vec<PinnedStaging>> {
        self.staging
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A staging memory for a run's copies. One given back with copies still queued is
    /// safe to take: it waits for them before the host rewrites it.
    fn take_staging(&self) -> PinnedStaging {
        self.free_staging().pop().unwrap_or_default()
    }

    fn give_back_staging(&self, staging: PinnedStaging) {
        self.free_staging().push(staging);
    }

    /// Waits for the steps and copies the outputs back.
    fn finish(&self, symbols: &SymbolValues) -> Result<Vec<Tensor>, CudaError> {
        let plan = self.plan();
        let mut staging = self.take_staging();
        let read = self
            .queue_outputs(&plan.outputs, symbols, &mut staging)
            .and_then(|queued| {
                self.wait(plan, symbols)?;
                staging.finished();
                self.take_outputs(&queued, &staging)
            });
        self.give_back_staging(staging);
        read
    }

    /// Queues the copies of buffers `outputs` back behind the steps on the stream (no
    /// wait): after [`CudaProgram::wait`], [`CudaProgram::take_outputs`] returns them, so
    /// that one wait covers the steps and the copies.
    fn queue_outputs(
        &self,
        outputs: &[BufferId],
        symbols: &SymbolValues,
        staging: &mut PinnedStaging,
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
        let staged = staging
            .queue_download(device.stream(), &regions)
            .map_err(|error| self.copy_back_error(error))?;
        Ok(QueuedOutputs { types, staged })
    }

    /// The outputs of [`CudaProgram::queue_outputs`], once [`CudaProgram::wait`] returned.
    fn take_outputs(
        &self,
        queued: &QueuedOutputs,
        staging: &PinnedStaging,
    ) -> Result<Vec<Tensor>, CudaError> {
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
            self.free_staging()
                .iter_mut()
                .for_each(PinnedStaging::finished);
        }
        synchronized.map_err(|error| self.run_error(plan, symbols, error))
    }

    /// A failure of the device's work for a run of `plan`.
    fn run_error(&self, plan: &Plan, symbols: &SymbolValues, error: DriverError) -> CudaError {
        CudaError::driver(
            format!(
                "running plan `{}` ({symbols}); to find the kernel that failed, run with \
                 {SYNC_LAUNCHES_ENV}=1",
                plan.function
            ),
            error,
        )
    }

    /// The device bytes of buffer `id` for `symbols`.
    fn region(
        &self,
        plan: &Plan,
        id: BufferId,
        symbols: &SymbolValues,
    ) -> Result<DeviceRegion<'_>, CudaError> {
        let placement = match self.placements.get(&id) {
            Some(placement) if self.allocated_for.as_ref() == Some(symbols) => placement.clone(),
            _ => place(plan, id, symbols)?,
        };
        let buffer = match &placement.storage {
            Storage::Own(owner) => self.own.get(owner),
            Storage::Inputs => self.inputs.as_ref(),
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

/// A new (zeroed) allocation of `needed` bytes where `current` is missing or smaller; `None`
/// where it is large enough.
fn grown(
    device: &CudaDevice,
    current: Option<&DeviceBuffer>,
    needed: usize,
) -> Result<Option<DeviceBuffer>, CudaError> {
    match current {
        Some(buffer) if buffer.len() >= needed => Ok(None),
        _ => device.alloc(needed).map(Some),
    }
}

/// The output at position `index` among those a kept run returns (`returned`).
fn returned_output(
    plan: &Plan,
    returned: &[BufferId],
    index: usize,
) -> Result<BufferId, CudaError> {
    returned
        .get(index)
        .copied()
        .ok_or_else(|| CudaError::BadPlan {
            plan: plan.function.clone(),
            detail: format!(
                "output {index} was asked for, but the plan returns {}",
                returned.len()
            ),
        })
}

/// An input of a kept run that takes a result of the kept run before it
/// ([`CudaProgram::submit_kept`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FedInput {
    /// The input's position among the plan's inputs.
    pub input: usize,
    /// The result's position among the outputs the run returns (those not updated in
    /// place).
    pub result: usize,
}

/// A [`FedInput`] checked: where the result lies and the input's shape.
struct Feed {
    input: usize,
    source: BufferId,
    /// [`CudaProgram::memory_generation`] before the run sized the memory.
    generation: u64,
    shape: Vec<usize>,
    /// The symbol values of the run that made the result.
    last: SymbolValues,
    /// Bytes of an element of the result and of the input.
    sizes: (usize, usize),
}

/// A kept run queued on the device ([`CudaProgram::submit_kept`]), to be given to
/// [`CudaProgram::collect`]: it holds the staging memory its outputs are copied into.
#[derive(Debug)]
pub struct PendingRun {
    staging: PinnedStaging,
    queued: QueuedOutputs,
    /// Recorded on the stream behind the run's output copies.
    done: CudaEvent,
    symbols: SymbolValues,
}

/// Outputs whose copies back are queued on the stream ([`CudaProgram::queue_outputs`]).
#[derive(Debug)]
struct QueuedOutputs {
    /// Each output's dtype and shape.
    types: Vec<(DType, Vec<usize>)>,
    staged: QueuedDownload,
}
