//! The execution plan of one function: buffers (inputs, outputs, weights, constants the
//! compiler computed, arena temps and views), the launches and loops in order, symbol
//! bindings, and the arena layout. A group whose stored values are all small constant
//! tensors (RoPE's inverse frequencies) launches nothing: its buffers are plan constants.
//!
//! Arena: every `Temp` buffer is live from the first step that touches it to the last (a
//! buffer touched inside a loop is live for the whole loop). When every temp has a constant
//! size they are placed first-fit by liveness (buffers whose live ranges overlap never
//! overlap in memory); with symbolic sizes they are laid out one after another. Offsets and
//! sizes are aligned to 256 bytes.

use crate::emit::ParamArg;
use crate::error::FusionError;
use crate::graph::FuncGraph;
use crate::partition::{Item, Partition};
use crate::stats::KernelStats;
use crate::templates::{self, Variant};
use crate::Options;
use kiln_ir::{DType, Dim, Op, Tensor, Value};
use kiln_kir::{
    Arg, BufferDecl, BufferId, BufferKind, Kernel, Plan, SizeExpr, Step, Stmt, SymBinding,
};
use std::collections::{BTreeMap, BTreeSet};

const ALIGN: u64 = 256;

pub(crate) struct PlanBuilder<'a, 'f> {
    g: &'a FuncGraph<'f>,
    part: &'a Partition<'f>,
    options: &'a Options,
    /// The package's kernels (shared by every function of a module).
    kernels: &'a mut Vec<Kernel>,
    buffers: Vec<BufferDecl>,
    buffer_of: BTreeMap<Value, BufferId>,
    weights: BTreeMap<String, BufferId>,
    pub stats: Vec<KernelStats>,
    /// The decoder layer whose kernel last wrote each buffer.
    layer_of: BTreeMap<BufferId, usize>,
    /// Small constant tensors of distinct elements (`kiln_opt::small_constants`): a group
    /// that stores only such values is no kernel, its buffers hold the values.
    constants: BTreeMap<Value, Tensor>,
    /// Split-K GEMM groups whose sums a row-reduction kernel adds, and the row groups whose
    /// rows the GEMVs reading them compute (`templates::NormPrologues`).
    row_sums: templates::RowSums,
    /// `kv_write` groups whose writes a split-K GEMM's sum kernel performs.
    kv_writes: templates::KvWrites,
    /// The split-K workspace of each such GEMM group, once launched.
    group_workspaces: BTreeMap<usize, BufferId>,
    /// The zeroed counter buffers by element count (every launch leaves them zero, so the
    /// kernels asking for one count share it: the layers' paged attention).
    counters: Vec<(SizeExpr, BufferId)>,
}

impl<'a, 'f> PlanBuilder<'a, 'f> {
    pub fn new(
        g: &'a FuncGraph<'f>,
        part: &'a Partition<'f>,
        options: &'a Options,
        kernels: &'a mut Vec<Kernel>,
    ) -> PlanBuilder<'a, 'f> {
        let mut row_sums = templates::RowSums::find(g, part, options);
        let constants = kiln_opt::small_constants(g.func);
        let kv_writes = templates::KvWrites::find(
            g,
            part,
            options,
            &row_sums,
            &constants.keys().copied().collect(),
        );
        row_sums.prologues =
            templates::NormPrologues::find(g, part, options, &row_sums, &kv_writes);
        PlanBuilder {
            g,
            part,
            options,
            kernels,
            buffers: Vec::new(),
            buffer_of: BTreeMap::new(),
            weights: BTreeMap::new(),
            stats: Vec::new(),
            layer_of: BTreeMap::new(),
            constants,
            row_sums,
            kv_writes,
            group_workspaces: BTreeMap::new(),
            counters: Vec::new(),
        }
    }

    /// The `BufferKind::Zeroed` buffer of `count` `I32` counters (declared on first use).
    fn counters(&mut self, count: &SizeExpr) -> BufferId {
        if let Some((_, id)) = self.counters.iter().find(|(c, _)| c == count) {
            return *id;
        }
        let id = BufferId(self.buffers.len() as u32);
        self.buffers.push(BufferDecl {
            id,
            dtype: DType::I32,
            shape: vec![count.clone()],
            kind: BufferKind::Zeroed,
            offset: None,
        });
        self.counters.push((count.clone(), id));
        id
    }

    fn shape_of(&self, v: Value) -> Vec<SizeExpr> {
        self.g.shape(v).iter().map(dim_size).collect()
    }

    fn declare(&mut self, v: Value, kind: BufferKind) -> BufferId {
        let id = BufferId(self.buffers.len() as u32);
        self.buffers.push(BufferDecl {
            id,
            dtype: self.g.ty(v).dtype,
            shape: self.shape_of(v),
            kind,
            offset: None,
        });
        id
    }

    /// The buffer holding `v`, declared on first use.
    fn buffer(&mut self, v: Value) -> BufferId {
        if let Some(&b) = self.buffer_of.get(&v) {
            return b;
        }
        let b = if let Some(Op::Param { name, .. }) = self.g.op(v) {
            match self.weights.get(name) {
                Some(&b) => b,
                None => {
                    let b = self.declare(v, BufferKind::Weight(name.clone()));
                    self.weights.insert(name.clone(), b);
                    b
                }
            }
        } else if let Some(&base) = self.part.view_of.get(&v) {
            let base_buf = self.buffer(base);
            self.declare(v, BufferKind::View(base_buf))
        } else if let Some(bytes) = self.constant_bytes(v).filter(|_| self.constant_group(v)) {
            // A plan constant read before its group's place in the schedule (a sum kernel
            // computing RoPE's angles inline, `templates::KvWrites`).
            self.declare(v, BufferKind::Constant(bytes))
        } else {
            self.declare(v, BufferKind::Temp)
        };
        self.buffer_of.insert(v, b);
        b
    }

    pub fn build(mut self) -> Result<(Plan, Vec<KernelStats>), FusionError> {
        let g = self.g;
        let func = g.func;
        let mut inputs = Vec::new();
        for (i, &p) in func.params().iter().enumerate() {
            let b = self.declare(p, BufferKind::Input(i));
            self.buffer_of.insert(p, b);
            inputs.push(b);
        }
        // Results written in place by their kernel, or copied at the end.
        let mut outputs = Vec::new();
        let mut copies = Vec::new();
        let updated_inputs = kiln_ir::in_place_inputs(func);
        for (n, &r) in func.results().iter().enumerate() {
            // A cache updated in place by `kv_write`s is returned in its input's buffer.
            if let Some(i) = updated_inputs[n] {
                outputs.push(inputs[i]);
                continue;
            }
            let in_place = self.part.owner[r.0 as usize].is_some()
                && !self.part.view_of.contains_key(&r)
                && !self.buffer_of.contains_key(&r);
            if in_place {
                let b = self.declare(r, BufferKind::Output(n));
                self.buffer_of.insert(r, b);
                outputs.push(b);
            } else {
                let b = self.declare(r, BufferKind::Output(n));
                outputs.push(b);
                copies.push((r, b));
            }
        }
        let items = self.part.items.clone();
        let mut steps = self.steps(&items)?;
        for (r, dst) in copies {
            let src = self.buffer(r);
            steps.push(Step::Copy { src, dst });
        }
        let symbols = self.symbols(&steps)?;
        let arena_bytes = self.layout(&steps);
        // With index widths chosen from the shapes, 32-bit indexing assumed every symbol at
        // most `symbol_bound`.
        let symbol_bound = (self.options.index_width == crate::IndexWidth::Auto
            && !symbols.is_empty())
        .then_some(self.options.symbol_bound);
        Ok((
            Plan {
                function: func.name.clone(),
                symbols,
                buffers: self.buffers,
                inputs,
                outputs,
                steps,
                arena_bytes,
                symbol_bound,
            },
            self.stats,
        ))
    }

    fn steps(&mut self, items: &[Item<'f>]) -> Result<Vec<Step>, FusionError> {
        let mut steps = Vec::new();
        for item in items {
            match item {
                Item::Kernel(gid) => {
                    let launches = self.launch(*gid)?;
                    steps.extend(launches);
                }
                Item::Loop { inst, body } => {
                    let persistent = if self.options.persistent.enabled {
                        templates::persistent_loop::plan(self.g, self.part, inst, self.options)
                    } else {
                        Err("persistent loops are disabled".to_string())
                    };
                    match persistent {
                        Ok(p) => {
                            // With symbolic dims the kernel holds them up to a bound: it runs
                            // when every one is within it, the plan loop otherwise. The loop
                            // comes first so that both write the loop's result buffers.
                            let fallback = if p.symbols.is_empty() {
                                None
                            } else {
                                Some(self.loop_step(inst, body)?)
                            };
                            let built = templates::persistent_loop::emit(
                                self.g,
                                self.part,
                                inst,
                                &p,
                                self.options,
                            )?;
                            let mut chosen = vec![self.launch_kernel(built, &[])?];
                            if let Some(fallback) = fallback {
                                for symbol in p.symbols.iter().rev() {
                                    chosen = vec![Step::BySize {
                                        symbol: symbol.clone(),
                                        at_most: p.bound,
                                        small: chosen,
                                        large: vec![fallback.clone()],
                                    }];
                                }
                            }
                            steps.extend(chosen);
                        }
                        Err(_) => steps.push(self.loop_step(inst, body)?),
                    }
                }
            }
        }
        Ok(steps)
    }

    /// The launches of group `gid` (none when it stores nothing anyone reads), each of
    /// its workspaces a fresh temp. A GEMM with a symbolic row count gets both its variants,
    /// chosen at run time by the row count (`Step::BySize`).
    fn launch(&mut self, gid: usize) -> Result<Vec<Step>, FusionError> {
        if self.store_constants(gid) {
            return Ok(Vec::new());
        }
        if let Some(variant) = templates::size_variant(
            self.g,
            self.part,
            gid,
            self.options,
            &self.row_sums,
            &self.kv_writes,
        ) {
            let small = self.launch_variant(gid, Variant::Small)?;
            let large = self.launch_variant(gid, Variant::Large)?;
            let (gemv, gemv_one) = if variant.gemv {
                (
                    self.launch_variant(gid, Variant::Gemv)?,
                    self.launch_variant(gid, Variant::GemvOne)?,
                )
            } else {
                (Vec::new(), Vec::new())
            };
            if small.is_empty() && large.is_empty() && gemv.is_empty() && gemv_one.is_empty() {
                return Ok(Vec::new());
            }
            let by_size = Step::BySize {
                symbol: variant.symbol.clone(),
                at_most: variant.at_most,
                small,
                large,
            };
            if !variant.gemv {
                return Ok(vec![by_size]);
            }
            // The one-row GEMV, the GEMV for a few rows, then the decode tile, then the
            // large tile; no one-row choice where it launches what the few-row one does (a
            // row group taking the GEMVs' variants).
            let few = Step::BySize {
                symbol: variant.symbol.clone(),
                at_most: templates::GEMV_ROWS,
                small: gemv.clone(),
                large: vec![by_size],
            };
            if gemv_one == gemv {
                return Ok(vec![few]);
            }
            return Ok(vec![Step::BySize {
                symbol: variant.symbol,
                at_most: 1,
                small: gemv_one,
                large: vec![few],
            }]);
        }
        self.launch_variant(gid, Variant::Large)
    }

    /// When every value group `gid` stores is a small constant tensor (and none is a
    /// function result), declares their buffers as plan constants holding the values and
    /// returns true: the group needs no kernel.
    fn store_constants(&mut self, gid: usize) -> bool {
        let group = &self.part.groups[gid];
        let stores: Vec<Value> = group
            .roots
            .iter()
            .chain(&group.outputs)
            .copied()
            .filter(|v| self.part.stored[v.0 as usize])
            .collect();
        let constant = |v: &Value| match self.buffer_of.get(v) {
            Some(b) => matches!(self.buffers[b.0 as usize].kind, BufferKind::Constant(_)),
            None => self.constant_bytes(*v).is_some(),
        };
        if stores.is_empty() || !stores.iter().all(constant) {
            return false;
        }
        for v in stores {
            self.buffer(v);
        }
        true
    }

    /// The bytes of `v` when it is a small constant tensor the plan may hold as a constant
    /// (of its own dtype and a constant shape, no view).
    fn constant_bytes(&self, v: Value) -> Option<Vec<u8>> {
        let t = self.constants.get(&v)?;
        let ty = self.g.ty(v);
        let fits = t.dtype == ty.dtype
            && !self.part.view_of.contains_key(&v)
            && ty.shape.dims().iter().all(|d| d.as_const().is_some());
        fits.then(|| t.to_le_bytes())
    }

    /// Whether the group computing `v` stores only plan constants (so launches nothing).
    fn constant_group(&self, v: Value) -> bool {
        let Some(gid) = self.part.owner[v.0 as usize] else {
            return false;
        };
        let group = &self.part.groups[gid];
        group
            .roots
            .iter()
            .chain(&group.outputs)
            .filter(|u| self.part.stored[u.0 as usize])
            .all(|&u| self.constant_bytes(u).is_some())
    }

    fn launch_variant(&mut self, gid: usize, variant: Variant) -> Result<Vec<Step>, FusionError> {
        let Some(launches) = templates::build(
            self.g,
            self.part,
            gid,
            self.options,
            variant,
            &self.row_sums,
            &self.kv_writes,
        )?
        else {
            return Ok(Vec::new());
        };
        let workspaces: Vec<BufferId> = launches
            .workspaces
            .into_iter()
            .map(|w| {
                let id = BufferId(self.buffers.len() as u32);
                self.buffers.push(BufferDecl {
                    id,
                    dtype: w.dtype,
                    shape: w.shape,
                    kind: BufferKind::Temp,
                    offset: None,
                });
                id
            })
            .collect();
        if launches.shared_workspace {
            self.group_workspaces.insert(gid, workspaces[0]);
        }
        launches
            .kernels
            .into_iter()
            .map(|built| self.launch_kernel(built, &workspaces))
            .collect()
    }

    fn launch_kernel(
        &mut self,
        built: templates::Built,
        workspaces: &[BufferId],
    ) -> Result<Step, FusionError> {
        let mut args = Vec::new();
        let mut bytes: Option<SizeExpr> = None;
        let mut seen = BTreeSet::new();
        let mut layer: Option<usize> = None;
        let mut reads_params = false;
        let mut written = Vec::new();
        for (k, a) in built.args.iter().enumerate() {
            let (b, value) = match a {
                ParamArg::Buffer(v) => (self.buffer(*v), Some(*v)),
                ParamArg::Workspace(w) => (workspaces[*w], None),
                ParamArg::GroupWorkspace(gid) => match self.group_workspaces.get(gid) {
                    Some(&b) => (b, None),
                    None => {
                        return Err(FusionError::Internal {
                            function: self.g.func.name.clone(),
                            value: self.part.groups[*gid].roots[0],
                            message: "a split-K sum read before its GEMM ran".into(),
                        })
                    }
                },
                ParamArg::Counters(count) => (self.counters(count), None),
                ParamArg::Sym(s) => {
                    args.push(Arg::Sym(s.clone()));
                    continue;
                }
            };
            args.push(Arg::Buffer(b));
            if seen.insert(b) {
                let size = bytes_of(&self.buffers[b.0 as usize]);
                bytes = Some(match bytes {
                    None => size,
                    Some(acc) => SizeExpr::Add(Box::new(acc), Box::new(size)),
                });
            }
            let writes = matches!(
                built.kernel.params[k],
                kiln_kir::Param::Buffer {
                    access: kiln_kir::Access::Write | kiln_kir::Access::ReadWrite,
                    ..
                }
            );
            if writes {
                written.push(b);
            } else if let Some(Op::Param { name, .. }) = value.and_then(|v| self.g.op(v)) {
                reads_params = true;
                if let Some(l) = layer_of_name(name) {
                    layer = Some(layer.map_or(l, |x: usize| x.max(l)));
                }
            } else if let Some(&l) = self.layer_of.get(&b) {
                if !reads_params {
                    layer = Some(layer.map_or(l, |x: usize| x.max(l)));
                }
            }
        }
        if reads_params {
            // Kernels reading weights belong to the layer of their weights (or none).
            layer = built
                .args
                .iter()
                .filter_map(|a| match a {
                    ParamArg::Buffer(v) => match self.g.op(*v) {
                        Some(Op::Param { name, .. }) => layer_of_name(name),
                        _ => None,
                    },
                    _ => None,
                })
                .max();
        }
        for b in written {
            match layer {
                Some(l) => {
                    self.layer_of.insert(b, l);
                }
                None => {
                    self.layer_of.remove(&b);
                }
            }
        }
        let index = self.intern(built.kernel, &built.what);
        let mut ops: Vec<String> = built
            .fused
            .iter()
            .filter_map(|v| self.g.op(*v).map(|op| op.name().to_string()))
            .collect();
        ops.retain(|o| o != "param");
        self.stats.push(KernelStats {
            function: self.g.func.name.clone(),
            kernel: index,
            name: self.kernels[index].name.clone(),
            layer,
            ops,
            bytes: bytes.unwrap_or(SizeExpr::Const(0)),
        });
        Ok(Step::Launch {
            kernel: index,
            args,
        })
    }

    /// The index of `kernel` in the package, reusing an identical one.
    fn intern(&mut self, mut kernel: Kernel, what: &str) -> usize {
        if self.options.gemm.early_loads {
            wait_after_early_loads(&mut kernel);
        }
        if self.options.gemm.early_trigger {
            trigger_after_wait(&mut kernel);
        }
        for (i, k) in self.kernels.iter().enumerate() {
            kernel.name.clone_from(&k.name);
            if *k == kernel {
                return i;
            }
        }
        let index = self.kernels.len();
        kernel.name = format!("k{index}_{what}");
        self.kernels.push(kernel);
        index
    }

    fn loop_step(
        &mut self,
        inst: &'f kiln_ir::Inst,
        body: &[Item<'f>],
    ) -> Result<Step, FusionError> {
        let region = &inst.regions[0];
        let count = self.buffer(inst.operands[0]);
        let init: Vec<BufferId> = inst.operands[1..].iter().map(|v| self.buffer(*v)).collect();
        let counter = self.declare(region.args[0], BufferKind::Temp);
        self.buffer_of.insert(region.args[0], counter);
        let mut carried = Vec::new();
        for (k, &r) in inst.results.iter().enumerate() {
            let b = self.declare(r, BufferKind::Temp);
            self.buffer_of.insert(r, b);
            self.buffer_of.insert(region.args[k + 1], b);
            carried.push(b);
        }
        let mut steps = self.steps(body)?;
        let mut next = Vec::new();
        for &y in &region.yields {
            let produced_here = self.part.owner[y.0 as usize].is_some_and(|gid| {
                self.part.groups[gid].region == self.g.region_of[region.args[0].0 as usize]
            }) && !self.part.view_of.contains_key(&y);
            if produced_here {
                next.push(self.buffer(y));
            } else {
                let src = self.buffer(y);
                let dst = self.declare(y, BufferKind::Temp);
                steps.push(Step::Copy { src, dst });
                next.push(dst);
            }
        }
        Ok(Step::Loop {
            count,
            carried,
            init,
            next,
            counter,
            body: steps,
        })
    }

    /// The symbol bindings of the function's inputs; every symbol a buffer shape or a
    /// kernel launched by `steps` needs must be among them. (The kernel list is shared by
    /// every function of a module, so only this function's launches count.)
    fn symbols(&self, steps: &[Step]) -> Result<Vec<SymBinding>, FusionError> {
        let func = self.g.func;
        let mut bound: Vec<SymBinding> = Vec::new();
        for (i, &p) in func.params().iter().enumerate() {
            for (axis, d) in self.g.shape(p).iter().enumerate() {
                if let Dim::Sym(s) = d {
                    if !bound.iter().any(|b| &b.name == s) {
                        bound.push(SymBinding {
                            name: s.clone(),
                            input: i,
                            axis,
                        });
                    }
                }
            }
        }
        let mut needed = BTreeSet::new();
        for b in &self.buffers {
            for s in &b.shape {
                collect_syms(s, &mut needed);
            }
        }
        let mut launched = BTreeSet::new();
        launched_kernels(steps, &mut launched);
        for k in launched.iter().map(|&i| &self.kernels[i]) {
            for p in &k.params {
                if let kiln_kir::Param::Scalar { name, .. } = p {
                    needed.insert(name.clone());
                }
            }
        }
        for s in needed {
            if !bound.iter().any(|b| b.name == s) {
                return Err(FusionError::UnboundSymbol {
                    function: func.name.clone(),
                    symbol: s,
                });
            }
        }
        Ok(bound)
    }

    /// Places the temps in the arena; returns its size.
    fn layout(&mut self, steps: &[Step]) -> SizeExpr {
        let mut live: BTreeMap<BufferId, (usize, usize)> = BTreeMap::new();
        let mut clock = 0;
        liveness(steps, &mut clock, &mut live, None);
        // A view keeps its base alive.
        for b in &self.buffers {
            if let (BufferKind::View(base), Some(&(s, e))) = (&b.kind, live.get(&b.id)) {
                let entry = live.entry(*base).or_insert((s, e));
                entry.0 = entry.0.min(s);
                entry.1 = entry.1.max(e);
            }
        }
        let temps: Vec<BufferId> = self
            .buffers
            .iter()
            .filter(|b| b.kind == BufferKind::Temp)
            .map(|b| b.id)
            .collect();
        let sizes: Vec<SizeExpr> = temps
            .iter()
            .map(|b| aligned(bytes_of(&self.buffers[b.0 as usize])))
            .collect();
        if sizes.iter().all(|s| matches!(s, SizeExpr::Const(_))) {
            let mut placed: Vec<(u64, u64, (usize, usize))> = Vec::new();
            let mut order: Vec<usize> = (0..temps.len()).collect();
            order.sort_by_key(|&i| (live.get(&temps[i]).copied().unwrap_or((0, 0)), i));
            let mut end = 0;
            for i in order {
                let SizeExpr::Const(size) = sizes[i] else {
                    unreachable!()
                };
                let span = live.get(&temps[i]).copied().unwrap_or((0, 0));
                let mut busy: Vec<(u64, u64)> = placed
                    .iter()
                    .filter(|(_, _, s)| s.0 <= span.1 && span.0 <= s.1)
                    .map(|(o, z, _)| (*o, *z))
                    .collect();
                busy.sort();
                let mut offset = 0;
                for (o, z) in busy {
                    if offset + size <= o {
                        break;
                    }
                    offset = offset.max(o + z);
                }
                placed.push((offset, size, span));
                end = end.max(offset + size);
                self.buffers[temps[i].0 as usize].offset = Some(SizeExpr::Const(offset));
            }
            SizeExpr::Const(end)
        } else {
            // Symbolic sizes cannot be compared, so temps share a slot only with temps of
            // the same size expression whose lifetimes do not overlap (a layer's workspace
            // with the next layer's); each slot follows the one before it.
            struct Slot {
                size: SizeExpr,
                offset: SizeExpr,
                spans: Vec<(usize, usize)>,
            }
            let mut slots: Vec<Slot> = Vec::new();
            let mut offset = SizeExpr::Const(0);
            let mut order: Vec<usize> = (0..temps.len()).collect();
            order.sort_by_key(|&i| (live.get(&temps[i]).copied().unwrap_or((0, 0)), i));
            for i in order {
                let span = live.get(&temps[i]).copied().unwrap_or((0, 0));
                let free = slots.iter_mut().find(|slot| {
                    slot.size == sizes[i] && slot.spans.iter().all(|s| s.1 < span.0 || span.1 < s.0)
                });
                let at = match free {
                    Some(slot) => {
                        slot.spans.push(span);
                        slot.offset.clone()
                    }
                    None => {
                        let at = offset.clone();
                        offset = match offset {
                            SizeExpr::Const(0) => sizes[i].clone(),
                            o => SizeExpr::Add(Box::new(o), Box::new(sizes[i].clone())),
                        };
                        slots.push(Slot {
                            size: sizes[i].clone(),
                            offset: at.clone(),
                            spans: vec![span],
                        });
                        at
                    }
                };
                self.buffers[temps[i].0 as usize].offset = Some(at);
            }
            offset
        }
    }
}

fn liveness(
    steps: &[Step],
    clock: &mut usize,
    live: &mut BTreeMap<BufferId, (usize, usize)>,
    enclosing: Option<(usize, usize)>,
) {
    let touch = |b: BufferId, at: (usize, usize), live: &mut BTreeMap<BufferId, (usize, usize)>| {
        let e = live.entry(b).or_insert(at);
        e.0 = e.0.min(at.0);
        e.1 = e.1.max(at.1);
    };
    for step in steps {
        *clock += 1;
        let here = enclosing.unwrap_or((*clock, *clock));
        match step {
            Step::Launch { args, .. } => {
                for a in args {
                    if let Arg::Buffer(b) = a {
                        touch(*b, here, live);
                    }
                }
            }
            Step::Copy { src, dst } => {
                touch(*src, here, live);
                touch(*dst, here, live);
            }
            Step::Loop {
                count,
                carried,
                init,
                next,
                counter,
                body,
            } => {
                let start = *clock;
                let mut inner_clock = *clock;
                let mut inner = BTreeMap::new();
                liveness(body, &mut inner_clock, &mut inner, Some((0, 0)));
                let end = inner_clock + 1;
                *clock = end;
                let span = enclosing.unwrap_or((start, end));
                for b in inner
                    .keys()
                    .chain([count, counter])
                    .chain(carried)
                    .chain(init)
                    .chain(next)
                {
                    touch(*b, span, live);
                }
            }
            // Either branch may run: both count, one after the other.
            Step::BySize { small, large, .. } => {
                liveness(small, clock, live, enclosing);
                liveness(large, clock, live, enclosing);
            }
        }
    }
}

fn collect_syms(s: &SizeExpr, out: &mut BTreeSet<String>) {
    match s {
        SizeExpr::Const(_) => {}
        SizeExpr::Sym(n) => {
            out.insert(n.clone());
        }
        SizeExpr::Add(a, b)
        | SizeExpr::Mul(a, b)
        | SizeExpr::CeilDiv(a, b)
        | SizeExpr::Min(a, b)
        | SizeExpr::Max(a, b) => {
            collect_syms(a, out);
            collect_syms(b, out);
        }
    }
}

pub(crate) fn dim_size(d: &Dim) -> SizeExpr {
    match d {
        Dim::Const(n) => SizeExpr::Const(*n),
        Dim::Sym(s) => SizeExpr::Sym(s.clone()),
    }
}

/// The bytes a buffer holds.
pub(crate) fn bytes_of(b: &BufferDecl) -> SizeExpr {
    let mut acc = SizeExpr::Const(b.dtype.size_bytes() as u64);
    for d in &b.shape {
        acc = templates::mul_size(acc, d.clone());
    }
    acc
}

fn aligned(s: SizeExpr) -> SizeExpr {
    match s {
        SizeExpr::Const(n) => SizeExpr::Const(n.div_ceil(ALIGN) * ALIGN),
        other => SizeExpr::Mul(
            Box::new(SizeExpr::CeilDiv(
                Box::new(other),
                Box::new(SizeExpr::Const(ALIGN)),
            )),
            Box::new(SizeExpr::Const(ALIGN)),
        ),
    }
}

/// The decoder layer a checkpoint name belongs to (`model.layers.3.mlp...` → 3).
pub(crate) fn layer_of_name(name: &str) -> Option<usize> {
    let parts: Vec<&str> = name.split('.').collect();
    parts.windows(2).find_map(|w| {
        if w[0] == "layers" || w[0] == "layer" || w[0] == "h" {
            w[1].parse().ok()
        } else {
            None
        }
    })
}

/// Indices of the kernels that `steps` launch, loop bodies included.
fn launched_kernels(steps: &[Step], out: &mut BTreeSet<usize>) {
    for step in steps {
        match step {
            Step::Launch { kernel, .. } => {
                out.insert(*kernel);
            }
            Step::Loop { body, .. } => launched_kernels(body, out),
            Step::BySize { small, large, .. } => {
                launched_kernels(small, out);
                launched_kernels(large, out);
            }
            Step::Copy { .. } => {}
        }
    }
}

/// Moves the implicit grid-dependency wait of `kernel` (before the body, when it has no
/// explicit one) below the leading statements that may precede it, when they load
/// something (`GemmTuning::early_loads`, off by default): a norm's gain, which the row
/// kernel loads first (`Emitter::hoist_constant_loads`), then comes while the previous
/// kernel still runs.
fn wait_after_early_loads(kernel: &mut Kernel) {
    if kernel.body.contains(&Stmt::GridDependencyWait) {
        return;
    }
    let early = kiln_kir::verify::early_statements(kernel);
    if kernel.body[..early]
        .iter()
        .any(kiln_kir::verify::stmt_loads)
    {
        kernel.body.insert(early, Stmt::GridDependencyWait);
    }
}

/// Lets the kernel launched after `kernel` start once every block of `kernel` has passed its
/// grid-dependency wait (`GemmTuning::early_trigger`), unless `kernel` triggers itself. The
/// implicit wait at the start becomes an explicit one so that the trigger follows it.
fn trigger_after_wait(kernel: &mut Kernel) {
    let triggers = |s: &Stmt| *s == Stmt::LaunchDependents;
    if kernel.body.iter().any(|s| s.any(&triggers)) {
        return;
    }
    match kernel
        .body
        .iter()
        .position(|s| *s == Stmt::GridDependencyWait)
    {
        Some(wait) => kernel.body.insert(wait + 1, Stmt::LaunchDependents),
        None => {
            kernel
                .body
                .splice(0..0, [Stmt::GridDependencyWait, Stmt::LaunchDependents]);
        }
    }
}
