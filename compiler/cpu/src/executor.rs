//! Plan execution on the CPU: [`CpuExecutor`] compiles a package's kernels once and runs a
//! [`Plan`] over host memory.
//!
//! A run binds the plan's symbols from the input shapes, allocates every buffer (its size
//! from its `SizeExpr` shape and dtype), copies the inputs and the weights in, runs the
//! steps in order and returns the outputs as tensors. Memory: every buffer that is not a
//! `View` gets its own zeroed allocation, `Temp` buffers included, so the plan's arena
//! offsets and `arena_bytes` are not used (on the CPU a separate allocation costs nothing
//! extra, and a kernel that overruns a temp is caught by its own buffer's bounds check
//! instead of corrupting a neighbour); a `View` shares the memory of the buffer it views
//! (from its first byte, at most that buffer's size). Weights are copied on every run.

use crate::error::CpuError;
use crate::launch::CpuKernel;
use crate::native::{ArgWord, RawBuffer};
use kiln_ir::{DType, Tensor};
use kiln_kir::{Arg, BufferId, BufferKind, Kernel, Param, Plan, SizeExpr, Step, Ty};
use std::collections::BTreeMap;

/// The kernels of a package, compiled for this CPU, ready to run plans.
#[derive(Debug)]
pub struct CpuExecutor {
    kernels: Vec<CpuKernel>,
    /// Whether every `Step::BySize` runs its `large` branch (see
    /// [`CpuExecutor::set_batch_invariant`]).
    batch_invariant: bool,
}

impl CpuExecutor {
    /// Compiles every kernel (in package order: `Step::Launch::kernel` indexes this list).
    pub fn new(kernels: &[Kernel]) -> Result<CpuExecutor, CpuError> {
        let kernels = kernels
            .iter()
            .map(CpuKernel::compile)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(CpuExecutor::from_compiled(kernels))
    }

    /// An executor over kernels compiled already.
    pub fn from_compiled(kernels: Vec<CpuKernel>) -> CpuExecutor {
        CpuExecutor {
            kernels,
            batch_invariant: false,
        }
    }

    /// With `true`, every `Step::BySize` runs its `large` branch whatever the row count, so a
    /// row's result never depends on how many rows the run has (batch invariance for a
    /// server; the decode-sized GEMM kernels sum in another order).
    pub fn set_batch_invariant(&mut self, batch_invariant: bool) {
        self.batch_invariant = batch_invariant;
    }

    pub fn kernels(&self) -> &[CpuKernel] {
        &self.kernels
    }

    /// Runs `plan` on `inputs` (one per plan input, in order) with weights looked up by
    /// checkpoint name; returns one tensor per plan output.
    pub fn run<'w>(
        &self,
        plan: &Plan,
        inputs: &[Tensor],
        weights: &dyn Fn(&str) -> Option<&'w Tensor>,
    ) -> Result<Vec<Tensor>, CpuError> {
        let given: Vec<Option<&Tensor>> = inputs.iter().map(Some).collect();
        let mut run = PlanRun::prepare(plan, &given, &mut BTreeMap::new(), weights)?;
        run.steps(self, &plan.steps, "step")?;
        plan.outputs
            .iter()
            .enumerate()
            .map(|(position, &id)| run.tensor(id, &format!("output {position}")))
            .collect()
    }

    /// Runs `plan` keeping the inputs it updates in place (outputs that are input buffers:
    /// KV caches) in `kept` between runs, by input index: `inputs[i] = None` moves input i's
    /// bytes in from `kept` (no copy); after the run, successful or not, every updated
    /// input's bytes move back into `kept`. Returns the outputs that are not updated inputs.
    pub fn run_kept<'w>(
        &self,
        plan: &Plan,
        inputs: &[Option<&Tensor>],
        kept: &mut BTreeMap<usize, KeptInput>,
        weights: &dyn Fn(&str) -> Option<&'w Tensor>,
    ) -> Result<Vec<Tensor>, CpuError> {
        let updated: Vec<usize> = plan
            .outputs
            .iter()
            .filter_map(|id| plan.inputs.iter().position(|i| i == id))
            .collect();
        for (n, input) in inputs.iter().enumerate() {
            if input.is_none() && !updated.contains(&n) {
                return Err(plan_error(
                    plan,
                    "setup",
                    format!("input {n} was not given, and only inputs updated in place are kept"),
                ));
            }
        }
        let mut run = PlanRun::prepare(plan, inputs, kept, weights)?;
        let result = run.steps(self, &plan.steps, "step");
        for &n in &updated {
            let position = run.index_of[&plan.inputs[n]];
            let info = &run.buffers[position];
            kept.insert(
                n,
                KeptInput {
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    bytes: std::mem::take(&mut run.storage[info.root]),
                },
            );
        }
        result?;
        plan.outputs
            .iter()
            .enumerate()
            .filter(|(_, id)| !plan.inputs.contains(id))
            .map(|(position, &id)| run.tensor(id, &format!("output {position}")))
            .collect()
    }
}

/// An input a plan updates in place, kept in host memory between runs.
#[derive(Clone, Debug)]
pub struct KeptInput {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

/// One buffer's resolved declaration.
#[derive(Clone, Debug)]
struct BufferInfo {
    dtype: DType,
    shape: Vec<usize>,
    bytes: usize,
    /// The buffer whose allocation this one uses (itself unless it is a view).
    root: usize,
}

/// The state of one run of a plan.
struct PlanRun<'p> {
    plan: &'p Plan,
    symbols: BTreeMap<String, u64>,
    /// `BufferId` → index into `buffers`.
    index_of: BTreeMap<BufferId, usize>,
    buffers: Vec<BufferInfo>,
    /// One allocation per root buffer (empty for views).
    storage: Vec<Vec<u8>>,
}

impl<'p> PlanRun<'p> {
    /// Sets up a run: `inputs[n] = None` takes input n from `kept` (moved, not copied).
    fn prepare<'w>(
        plan: &'p Plan,
        inputs: &[Option<&Tensor>],
        kept: &mut BTreeMap<usize, KeptInput>,
        weights: &dyn Fn(&str) -> Option<&'w Tensor>,
    ) -> Result<PlanRun<'p>, CpuError> {
        let setup_error = |message: String| plan_error(plan, "setup", message);
        if inputs.len() != plan.inputs.len() {
            return Err(setup_error(format!(
                "{} inputs given, the plan takes {}",
                inputs.len(),
                plan.inputs.len()
            )));
        }
        for (n, input) in inputs.iter().enumerate() {
            if input.is_none() && !kept.contains_key(&n) {
                return Err(setup_error(format!(
                    "input {n} was not given and no value is kept for it"
                )));
            }
        }
        let shape_of = |n: usize| -> Option<&[usize]> {
            match inputs.get(n)? {
                Some(tensor) => Some(&tensor.shape),
                None => kept.get(&n).map(|k| k.shape.as_slice()),
            }
        };
        let mut symbols = BTreeMap::new();
        for binding in &plan.symbols {
            let Some(&value) = shape_of(binding.input).and_then(|shape| shape.get(binding.axis))
            else {
                return Err(setup_error(format!(
                    "symbol `{}` is bound to axis {} of input {}, which it does not have",
                    binding.name, binding.axis, binding.input
                )));
            };
            let value = value as u64;
            plan.check_symbol(&binding.name, value)
                .map_err(setup_error)?;
            if let Some(previous) = symbols.insert(binding.name.clone(), value) {
                if previous != value {
                    return Err(setup_error(format!(
                        "symbol `{}` is {previous} by one binding and {value} by another",
                        binding.name
                    )));
                }
            }
        }

        let mut index_of = BTreeMap::new();
        for (position, decl) in plan.buffers.iter().enumerate() {
            if index_of.insert(decl.id, position).is_some() {
                return Err(setup_error(format!(
                    "buffer {} is declared twice",
                    decl.id.0
                )));
            }
        }
        for (n, id) in plan.inputs.iter().enumerate() {
            let kind = index_of
                .get(id)
                .map(|&position| &plan.buffers[position].kind);
            if kind != Some(&BufferKind::Input(n)) {
                return Err(setup_error(format!(
                    "the plan's input {n} is buffer {}, which is not declared as input {n}",
                    id.0
                )));
            }
        }
        let sym = |name: &str| symbols.get(name).copied();
        let mut buffers = Vec::with_capacity(plan.buffers.len());
        for decl in &plan.buffers {
            let mut shape = Vec::with_capacity(decl.shape.len());
            for dim in &decl.shape {
                shape.push(
                    eval_size(dim, &sym).map_err(|m| {
                        setup_error(format!("buffer {}: dim `{dim}`: {m}", decl.id.0))
                    })?,
                );
            }
            let bytes = shape
                .iter()
                .try_fold(decl.dtype.size_bytes(), |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| {
                    setup_error(format!("buffer {}: {shape:?} is too large", decl.id.0))
                })?;
            buffers.push(BufferInfo {
                dtype: decl.dtype,
                shape,
                bytes,
                root: 0,
            });
        }
        for position in 0..plan.buffers.len() {
            let root = resolve_root(plan, &index_of, position).map_err(setup_error)?;
            if buffers[position].bytes > buffers[root].bytes {
                return Err(setup_error(format!(
                    "view {} has {} bytes, more than the {} of buffer {}",
                    plan.buffers[position].id.0,
                    buffers[position].bytes,
                    buffers[root].bytes,
                    plan.buffers[root].id.0
                )));
            }
            buffers[position].root = root;
        }

        let mut storage: Vec<Vec<u8>> = buffers
            .iter()
            .enumerate()
            .map(|(position, info)| {
                if info.root == position {
                    vec![0; info.bytes]
                } else {
                    Vec::new()
                }
            })
            .collect();
        let mut kept_moves = Vec::new();
        for (position, decl) in plan.buffers.iter().enumerate() {
            let info = &buffers[position];
            let (tensor, what) = match &decl.kind {
                BufferKind::Input(n) => {
                    if plan.inputs.get(*n) != Some(&decl.id) {
                        return Err(setup_error(format!(
                            "buffer {} is input {n}, but the plan's input {n} is {:?}",
                            decl.id.0,
                            plan.inputs.get(*n).map(|id| id.0)
                        )));
                    }
                    match inputs[*n] {
                        Some(tensor) => (tensor, format!("input {n}")),
                        None => {
                            let k = &kept[n];
                            if k.dtype != info.dtype
                                || k.shape != info.shape
                                || k.bytes.len() != info.bytes
                            {
                                return Err(setup_error(format!(
                                    "kept input {n} is {}{:?}, buffer {} is {}{:?}",
                                    k.dtype, k.shape, decl.id.0, info.dtype, info.shape
                                )));
                            }
                            // Moved in once nothing else can fail.
                            kept_moves.push((*n, info.root));
                            continue;
                        }
                    }
                }
                BufferKind::Weight(name) => match weights(name) {
                    Some(tensor) => (tensor, format!("weight `{name}`")),
                    None => return Err(setup_error(format!("weight `{name}` is not given"))),
                },
                BufferKind::Constant(bytes) => {
                    if bytes.len() != info.bytes {
                        return Err(setup_error(format!(
                            "constant buffer {} holds {} bytes, its type {}{:?} needs {}",
                            decl.id.0,
                            bytes.len(),
                            info.dtype,
                            info.shape,
                            info.bytes
                        )));
                    }
                    let root = info.root;
                    storage[root].copy_from_slice(bytes);
                    continue;
                }
                // Zeroed buffers start zeroed like every allocation here (a run allocates
                // its buffers afresh; the launches of one run share them).
                BufferKind::Output(_)
                | BufferKind::Temp
                | BufferKind::Zeroed
                | BufferKind::View(_) => continue,
            };
            if tensor.dtype != info.dtype || tensor.shape != info.shape {
                return Err(setup_error(format!(
                    "{what} is {}{:?}, buffer {} is {}{:?}",
                    tensor.dtype, tensor.shape, decl.id.0, info.dtype, info.shape
                )));
            }
            let bytes = tensor.to_le_bytes();
            storage[info.root][..bytes.len()].copy_from_slice(&bytes);
        }
        for (n, root) in kept_moves {
            storage[root] = kept.remove(&n).expect("checked above").bytes;
        }
        Ok(PlanRun {
            plan,
            symbols,
            index_of,
            buffers,
            storage,
        })
    }

    fn error(&self, step: &str, message: impl Into<String>) -> CpuError {
        plan_error(self.plan, step, message)
    }

    fn buffer(&self, id: BufferId, step: &str) -> Result<usize, CpuError> {
        self.index_of
            .get(&id)
            .copied()
            .ok_or_else(|| self.error(step, format!("buffer {} is not declared", id.0)))
    }

    /// The current contents of a buffer.
    fn bytes(&self, position: usize) -> &[u8] {
        let info = &self.buffers[position];
        &self.storage[info.root][..info.bytes]
    }

    fn tensor(&self, id: BufferId, what: &str) -> Result<Tensor, CpuError> {
        let position = self.buffer(id, what)?;
        let info = &self.buffers[position];
        Tensor::from_le_bytes(info.dtype, &info.shape, self.bytes(position))
            .map_err(|e| self.error(what, e.to_string()))
    }

    fn steps(
        &mut self,
        executor: &CpuExecutor,
        steps: &[Step],
        prefix: &str,
    ) -> Result<(), CpuError> {
        for (position, step) in steps.iter().enumerate() {
            let label = format!("{prefix} {position}");
            match step {
                Step::Launch { kernel, args } => self.launch(executor, *kernel, args, &label)?,
                Step::Copy { src, dst } => {
                    let (src, dst) = (self.buffer(*src, &label)?, self.buffer(*dst, &label)?);
                    self.copy(src, dst, &label)?;
                }
                Step::Loop {
                    count,
                    carried,
                    init,
                    next,
                    counter,
                    body,
                } => {
                    let label = format!("{label} (loop)");
                    if carried.len() != init.len() || carried.len() != next.len() {
                        return Err(self.error(
                            &label,
                            format!(
                                "{} carried buffers, {} inits and {} nexts",
                                carried.len(),
                                init.len(),
                                next.len()
                            ),
                        ));
                    }
                    let count = self.read_integer(*count, &label)?;
                    let count = u64::try_from(count).map_err(|_| {
                        self.error(&label, format!("the trip count is {count}, negative"))
                    })?;
                    let carried = self.positions(carried, &label)?;
                    let init = self.positions(init, &label)?;
                    let next = self.positions(next, &label)?;
                    let counter = self.buffer(*counter, &label)?;
                    self.copy_all(&init, &carried, &label)?;
                    for iteration in 0..count {
                        self.write_integer(counter, iteration as i64, &label)?;
                        self.steps(
                            executor,
                            body,
                            &format!("{label} iteration {iteration} step"),
                        )?;
                        self.copy_all(&next, &carried, &label)?;
                    }
                }
                Step::BySize { large, .. } if executor.batch_invariant => {
                    self.steps(executor, large, &format!("{label} branch step"))?;
                }
                Step::BySize { .. } => {
                    let branch = step
                        .by_size_branch(|s| self.symbols.get(s).copied())
                        .expect("a BySize step")
                        .map_err(|m| self.error(&label, m))?;
                    self.steps(executor, branch, &format!("{label} branch step"))?;
                }
            }
        }
        Ok(())
    }

    fn positions(&self, ids: &[BufferId], step: &str) -> Result<Vec<usize>, CpuError> {
        ids.iter().map(|&id| self.buffer(id, step)).collect()
    }

    /// Copies every `from[k]` to `to[k]`, reading all sources before writing (a loop may
    /// carry buffers that swap).
    fn copy_all(&mut self, from: &[usize], to: &[usize], step: &str) -> Result<(), CpuError> {
        let snapshots: Vec<Vec<u8>> = from.iter().map(|&p| self.bytes(p).to_vec()).collect();
        for (snapshot, (&source, &target)) in snapshots.iter().zip(from.iter().zip(to)) {
            self.check_copy(source, target, step)?;
            let info = &self.buffers[target];
            self.storage[info.root][..info.bytes].copy_from_slice(snapshot);
        }
        Ok(())
    }

    fn check_copy(&self, src: usize, dst: usize, step: &str) -> Result<(), CpuError> {
        let (from, to) = (&self.buffers[src], &self.buffers[dst]);
        if from.bytes != to.bytes {
            return Err(self.error(
                step,
                format!(
                    "copy of buffer {} ({} bytes) into buffer {} ({} bytes)",
                    self.plan.buffers[src].id.0, from.bytes, self.plan.buffers[dst].id.0, to.bytes
                ),
            ));
        }
        Ok(())
    }

    fn copy(&mut self, src: usize, dst: usize, step: &str) -> Result<(), CpuError> {
        self.check_copy(src, dst, step)?;
        let bytes = self.buffers[src].bytes;
        let (from, to) = (self.buffers[src].root, self.buffers[dst].root);
        if from == to {
            // Both start at the root's first byte: the same bytes.
            return Ok(());
        }
        let (source, target) = if from < to {
            let (low, high) = self.storage.split_at_mut(to);
            (&low[from], &mut high[0])
        } else {
            let (low, high) = self.storage.split_at_mut(from);
            (&high[0], &mut low[to])
        };
        target[..bytes].copy_from_slice(&source[..bytes]);
        Ok(())
    }

    /// The first element of an integer buffer.
    fn read_integer(&self, id: BufferId, step: &str) -> Result<i64, CpuError> {
        let position = self.buffer(id, step)?;
        let dtype = self.buffers[position].dtype;
        let bytes = self.bytes(position);
        if !dtype.is_int() || bytes.len() < dtype.size_bytes() {
            return Err(self.error(
                step,
                format!("buffer {} is not an integer scalar ({dtype})", id.0),
            ));
        }
        let element = Tensor::from_le_bytes(dtype, &[1], &bytes[..dtype.size_bytes()])
            .map_err(|e| self.error(step, e.to_string()))?;
        Ok(element.to_i64_vec()[0])
    }

    /// Writes `value` as the first element of an integer buffer.
    fn write_integer(&mut self, position: usize, value: i64, step: &str) -> Result<(), CpuError> {
        let info = &self.buffers[position];
        let dtype = info.dtype;
        if !dtype.is_int() || info.bytes < dtype.size_bytes() {
            return Err(self.error(
                step,
                format!(
                    "the loop counter, buffer {}, is not an integer scalar ({dtype})",
                    self.plan.buffers[position].id.0
                ),
            ));
        }
        let bytes = Tensor::from_ints(dtype, &[1], vec![value]).to_le_bytes();
        let root = info.root;
        self.storage[root][..bytes.len()].copy_from_slice(&bytes);
        Ok(())
    }

    fn launch(
        &mut self,
        executor: &CpuExecutor,
        kernel_index: usize,
        args: &[Arg],
        label: &str,
    ) -> Result<(), CpuError> {
        let Some(compiled) = executor.kernels.get(kernel_index) else {
            return Err(self.error(
                label,
                format!(
                    "launches kernel {kernel_index} of a package of {}",
                    executor.kernels.len()
                ),
            ));
        };
        let kernel = compiled.kernel();
        let label = format!("{label} (launch of `{}`)", kernel.name);
        if args.len() != kernel.params.len() {
            return Err(self.error(
                &label,
                format!(
                    "{} arguments for {} parameters",
                    args.len(),
                    kernel.params.len()
                ),
            ));
        }
        let sym = |name: &str| self.symbols.get(name).copied();
        let mut grid = [0u64; 3];
        for (axis, size) in kernel.grid.iter().enumerate() {
            grid[axis] = eval_size(size, &sym)
                .map_err(|m| self.error(&label, format!("grid axis {axis} `{size}`: {m}")))?
                as u64;
        }

        // Resolve every argument before borrowing the storage.
        enum Resolved {
            Buffer { root: usize, bytes: usize },
            Scalar(u64),
        }
        let mut resolved = Vec::with_capacity(args.len());
        for (position, (arg, param)) in args.iter().zip(&kernel.params).enumerate() {
            let mismatch = |what: String| {
                self.error(
                    &label,
                    format!("argument {position} (`{}`): {what}", param.name()),
                )
            };
            resolved.push(match (arg, param) {
                (Arg::Buffer(id), Param::Buffer { dtype, .. }) => {
                    let index = self.buffer(*id, &label)?;
                    let info = &self.buffers[index];
                    if info.dtype != *dtype {
                        return Err(mismatch(format!(
                            "buffer {} is {}, the parameter is {dtype}",
                            id.0, info.dtype
                        )));
                    }
                    Resolved::Buffer {
                        root: info.root,
                        bytes: info.bytes,
                    }
                }
                (Arg::Sym(name), Param::Scalar { ty, .. }) => {
                    let Some(value) = self.symbols.get(name).copied() else {
                        return Err(mismatch(format!("symbol `{name}` is not bound")));
                    };
                    let bits = match ty {
                        Ty::I64 => value,
                        Ty::I32 => u64::from(
                            u32::try_from(value)
                                .ok()
                                .filter(|v| *v <= i32::MAX as u32)
                                .ok_or_else(|| {
                                    mismatch(format!("symbol `{name}` = {value} does not fit i32"))
                                })?,
                        ),
                        other => {
                            return Err(mismatch(format!("a symbol passed to a {other} parameter")))
                        }
                    };
                    Resolved::Scalar(bits)
                }
                (Arg::Buffer(_), Param::Scalar { .. }) => {
                    return Err(mismatch("a buffer for a scalar parameter".to_string()))
                }
                (Arg::Sym(_), Param::Buffer { .. }) => {
                    return Err(mismatch("a symbol for a buffer parameter".to_string()))
                }
            });
        }

        let roots: Vec<RawBuffer<'_>> = self
            .storage
            .iter_mut()
            .map(|bytes| RawBuffer::new(bytes))
            .collect();
        let mut words = Vec::with_capacity(resolved.len());
        for arg in &resolved {
            words.push(match arg {
                Resolved::Buffer { root, bytes } => ArgWord::Buffer(
                    roots[*root]
                        .prefix(*bytes)
                        .expect("a buffer fits its root (checked in prepare)"),
                ),
                Resolved::Scalar(bits) => ArgWord::Scalar(*bits),
            });
        }
        compiled
            .launch_words(grid, words)
            .map_err(|source| CpuError::Step {
                plan: self.plan.function.clone(),
                step: label.clone(),
                source: Box::new(source),
            })
    }
}

fn plan_error(plan: &Plan, step: &str, message: impl Into<String>) -> CpuError {
    CpuError::Plan {
        plan: plan.function.clone(),
        step: step.to_string(),
        message: message.into(),
    }
}

fn eval_size(size: &SizeExpr, sym: &dyn Fn(&str) -> Option<u64>) -> Result<usize, String> {
    let value = size.eval(sym).ok_or_else(|| {
        "cannot be evaluated (an unbound symbol, an overflow or a division by zero)".to_string()
    })?;
    usize::try_from(value).map_err(|_| format!("{value} does not fit in memory"))
}

/// The buffer whose allocation `position` uses, following views.
fn resolve_root(
    plan: &Plan,
    index_of: &BTreeMap<BufferId, usize>,
    position: usize,
) -> Result<usize, String> {
    let mut current = position;
    for _ in 0..=plan.buffers.len() {
        match &plan.buffers[current].kind {
            BufferKind::View(target) => {
                current = *index_of.get(target).ok_or_else(|| {
                    format!(
                        "buffer {} views buffer {}, which is not declared",
                        plan.buffers[current].id.0, target.0
                    )
                })?;
            }
            _ => return Ok(current),
        }
    }
    Err(format!(
        "buffer {} is part of a cycle of views",
        plan.buffers[position].id.0
    ))
}
