//! The partition of a function into kernels: which values are materialized, which kernel
//! computes each of them, and the order the kernels run in.
//!
//! Materialization rule (decided once per element-wise value, in program order, with the
//! [`Cost`] of its expression measured with every element-wise producer inlined; a concat
//! counts its costliest piece, as each of its elements is computed from one piece):
//! an element-wise value gets a buffer when it is a result of its region (a function output
//! or a loop yield), is used across a loop boundary or as a loop operand, is the operand of
//! a matmul and is not cheap there (more than one load, any transcendental function or more
//! than four other ops: the matmul reads each operand element many times), is the key or
//! value operand of `attention` and more than a load or a view (read once per query row or
//! tile: RoPE'd keys), computes a
//! transcendental function at a constant size and is read by a larger consumer (which would
//! recompute each element many times: RoPE's inverse frequencies for every position), or has
//! several users and costs more than 8. Everything else is recomputed inside each consumer.
//! Reductions and matmuls are always kernel roots; their results get a buffer only when
//! something outside their kernel reads them.
//!
//! Placement (in program order): a reduction over the innermost axes joins the latest row
//! group of the same row space whose inputs it does not depend on, else starts one; a matmul
//! joins the latest matmul group with the same left operand and output rows (horizontal
//! fusion), else starts one; the stdlib attention pattern (matmul, masked softmax, matmul)
//! becomes one attention kernel. A materialized element-wise value becomes an output of the
//! last kernel it depends on when that kernel holds every element it needs (a matmul
//! epilogue at the same index, a row group's epilogue over the same rows, a pointwise kernel
//! of the same shape); otherwise it waits ("pending") until a new row group over its shape
//! takes it as a prologue output, or it gets a pointwise kernel of its own just before its
//! first consumer.

use crate::error::FusionError;
use crate::graph::{op_cost, Cost, FuncGraph};
use kiln_ir::{Dim, Inst, Op, ReduceOp, Value};
use std::collections::{BTreeMap, BTreeSet};

/// The values of the stdlib attention pattern that one attention kernel computes.
#[derive(Clone, Debug)]
pub(crate) struct AttentionParts {
    /// `q @ kᵀ`.
    pub qk: Value,
    /// The scores after the element-wise prologue (scale, mask): the softmax input.
    pub scores: Value,
    pub max: Value,
    pub sum: Value,
    /// `p @ v`: the kernel's result.
    pub pv: Value,
}

#[derive(Clone, Debug)]
pub(crate) enum GroupKind {
    Pointwise {
        shape: Vec<Dim>,
    },
    /// Reductions over the innermost axes of `outer ++ inner`, one row per `outer` index.
    Row {
        outer: Vec<Dim>,
        inner: Vec<Dim>,
    },
    /// One reduction over arbitrary axes, a thread per output element.
    LoopReduce,
    /// Matmuls sharing the left operand `a` (horizontal fusion).
    Matmul {
        a: Value,
    },
    /// The stdlib attention pattern of matmuls and softmax.
    Attention(AttentionParts),
    /// The built-in `attention` op.
    BuiltinAttention(Value),
    /// `kv_write`s (the group's roots): the new rows stored into each cache's memory (each
    /// result is a view of its cache operand). Consecutive independent writes of rows of
    /// one shape — a layer's keys and values — share the kernel.
    KvWrite,
    /// The built-in `paged_attention` op.
    PagedAttention(Value),
    /// A `sort` over a constant axis of at most [`SMALL_SORT_LEN`] elements, a thread per
    /// line held in registers; when the axis is the last, the reductions over it and the
    /// element-wise values of the line that read the sorted line within the thread's own
    /// line join the kernel (its roots after the sort, and its outputs).
    SmallSort {
        sort: Value,
        axis: usize,
        len: u64,
    },
    /// Any other `sort`: a thread per line ranks its elements (correct, not fast).
    SortLoop(Value),
}

/// The longest sorted axis the register template takes.
pub(crate) const SMALL_SORT_LEN: u64 = 32;

/// The longest constant reduction (or line of an output) the small-sort kernel unrolls.
const SMALL_SORT_UNROLL: u64 = 64;

/// One kernel to be: what it computes and stores.
#[derive(Clone, Debug)]
pub(crate) struct Group {
    pub kind: GroupKind,
    /// Its position in the schedule (increasing in run order).
    pub pos: usize,
    pub region: usize,
    /// Reductions / matmuls it computes, in order.
    pub roots: Vec<Value>,
    /// Element-wise values it writes to their buffers.
    pub outputs: Vec<Value>,
    /// Everything it computes itself.
    pub owned: BTreeSet<Value>,
}

/// A step of a region's schedule.
#[derive(Clone, Debug)]
pub(crate) enum Item<'f> {
    Kernel(usize),
    Loop { inst: &'f Inst, body: Vec<Item<'f>> },
}

pub(crate) struct Partition<'f> {
    pub groups: Vec<Group>,
    pub items: Vec<Item<'f>>,
    /// Reshapes of a stored value that share its buffer.
    pub view_of: BTreeMap<Value, Value>,
    /// Per value: read from a buffer by some kernel other than its producer, or a result.
    pub stored: Vec<bool>,
    pub owner: Vec<Option<usize>>,
}

struct State<'g, 'f> {
    g: &'g FuncGraph<'f>,
    cost: Vec<Cost>,
    materialized: Vec<bool>,
    internal: BTreeSet<Value>,
    attention: BTreeMap<Value, AttentionParts>,
    groups: Vec<Group>,
    view_of: BTreeMap<Value, Value>,
    owner: Vec<Option<usize>>,
    pos: Vec<Option<usize>>,
    next_pos: usize,
    pending: Vec<Value>,
}

pub(crate) fn partition<'f>(g: &FuncGraph<'f>) -> Result<Partition<'f>, FusionError> {
    let n = g.func.values.len();
    let mut st = State {
        g,
        cost: vec![Cost::default(); n],
        materialized: vec![false; n],
        internal: BTreeSet::new(),
        attention: BTreeMap::new(),
        groups: Vec::new(),
        view_of: BTreeMap::new(),
        owner: vec![None; n],
        pos: vec![None; n],
        next_pos: 0,
        pending: Vec::new(),
    };
    for region in 0..g.regions.len() {
        for inst in &g.regions[region].insts {
            if matches!(inst.op, Op::MatMul) {
                if let Some(parts) = st.match_attention(inst.results[0]) {
                    st.attention.insert(parts.pv, parts);
                }
            }
        }
    }
    let internal: BTreeSet<Value> = st
        .attention
        .values()
        .flat_map(|p| st.attention_internal(p))
        .collect();
    st.internal = internal;
    st.decide_materialization(0);
    let items = st.place_region(0)?;
    let stored = st.stored_values();
    Ok(Partition {
        groups: st.groups,
        items,
        view_of: st.view_of,
        stored,
        owner: st.owner,
    })
}

impl<'g, 'f> State<'g, 'f> {
    fn users(&self, v: Value) -> usize {
        self.g.user_count(v)
    }

    fn operands(&self, v: Value) -> &'f [Value] {
        match self.g.inst(v) {
            Some(inst) => &inst.operands,
            None => &[],
        }
    }

    /// The stdlib attention: `p' @ v` where `p'` is a cast chain of `e / sum(e)`,
    /// `e = exp(x - max(x))` over the last axis and `x` an element-wise function of one
    /// single-use matmul `q @ kᵀ` of the same shape.
    fn match_attention(&self, pv: Value) -> Option<AttentionParts> {
        let g = self.g;
        let mut p = self.operands(pv)[0];
        while let Some(Op::Cast { .. }) = g.op(p) {
            if self.users(p) != 1 {
                return None;
            }
            p = self.operands(p)[0];
        }
        let last = g.shape(p).len().checked_sub(1)?;
        let is_reduce = |v: Value, want: ReduceOp| matches!(g.op(v), Some(Op::Reduce { op, axes, keep: true }) if *op == want && axes == &[last]);
        if !matches!(g.op(p), Some(Op::Binary(kiln_ir::BinaryOp::Div))) || self.users(p) != 1 {
            return None;
        }
        let (e, sum) = (self.operands(p)[0], self.operands(p)[1]);
        if !is_reduce(sum, ReduceOp::Sum) || self.operands(sum)[0] != e || self.users(sum) != 1 {
            return None;
        }
        if !matches!(g.op(e), Some(Op::Unary(kiln_ir::UnaryOp::Exp))) || self.users(e) != 2 {
            return None;
        }
        let d = self.operands(e)[0];
        if !matches!(g.op(d), Some(Op::Binary(kiln_ir::BinaryOp::Sub))) || self.users(d) != 1 {
            return None;
        }
        let (scores, max) = (self.operands(d)[0], self.operands(d)[1]);
        if !is_reduce(max, ReduceOp::Max) || self.operands(max)[0] != scores || self.users(max) != 1
        {
            return None;
        }
        if self.users(scores) != 2 || g.shape(scores) != g.shape(p) {
            return None;
        }
        // Exactly one matmul feeds the scores, used nowhere else, of the scores' shape.
        let mut heavy = BTreeSet::new();
        self.heavy_leaves(scores, &mut heavy);
        let matmuls: Vec<Value> = heavy
            .into_iter()
            .filter(|h| matches!(g.op(*h), Some(Op::MatMul)))
            .collect();
        let [qk] = matmuls[..] else { return None };
        if self.users(qk) != 1 || g.shape(qk) != g.shape(scores) {
            return None;
        }
        // Constant head dims (the kernel keeps a query row and an output row per block).
        let q = self.operands(qk)[0];
        let v = self.operands(pv)[1];
        let const_last = |x: Value| g.shape(x).last().and_then(Dim::as_const).is_some();
        if !const_last(q) || !const_last(v) || g.shape(qk).len() < 2 {
            return None;
        }
        Some(AttentionParts {
            qk,
            scores,
            max,
            sum,
            pv,
        })
    }

    fn heavy_leaves(&self, v: Value, out: &mut BTreeSet<Value>) {
        for &o in self.operands(v) {
            if self.g.is_heavy(o) {
                out.insert(o);
            } else if self.g.is_elementwise(o) {
                self.heavy_leaves(o, out);
            }
        }
    }

    /// Values the attention kernel computes itself (everything between its operands and
    /// its result that is not used elsewhere).
    fn attention_internal(&self, p: &AttentionParts) -> Vec<Value> {
        let mut vals = vec![p.qk, p.max, p.sum, p.pv];
        let mut x = self.operands(p.pv)[0];
        loop {
            vals.push(x);
            match self.g.op(x) {
                Some(Op::Cast { .. }) => x = self.operands(x)[0],
                Some(Op::Binary(kiln_ir::BinaryOp::Div)) => {
                    let e = self.operands(x)[0];
                    vals.push(e);
                    vals.push(self.operands(e)[0]);
                    break;
                }
                _ => break,
            }
        }
        vals
    }

    // ---- materialization ------------------------------------------------------------

    fn leaf_cost(&self, o: Value) -> Cost {
        if self.g.is_source(o) || self.g.is_heavy(o) || self.materialized[o.0 as usize] {
            Cost::LOAD
        } else {
            self.cost[o.0 as usize]
        }
    }

    fn decide_materialization(&mut self, region: usize) {
        let g = self.g;
        for inst in &g.regions[region].insts {
            for sub in &inst.regions {
                let id = g
                    .regions
                    .iter()
                    .position(|r| std::ptr::eq(*r, sub))
                    .expect("a known region");
                self.decide_materialization(id);
            }
            if matches!(inst.op, Op::Loop) {
                continue;
            }
            for &r in &inst.results {
                if !g.is_elementwise(r) {
                    continue;
                }
                let mut cost = op_cost(&inst.op);
                if matches!(inst.op, Op::Concat { .. }) {
                    // An element of a concat is computed from one piece (a branch, or the
                    // piece its index is known to lie in); only pieces that cost about a
                    // load are all read, and then the costliest is a fair measure too.
                    let piece = inst
                        .operands
                        .iter()
                        .map(|&o| self.leaf_cost(o))
                        .max_by_key(|c| c.total())
                        .unwrap_or_default();
                    cost = cost.plus(piece);
                } else {
                    for &o in &inst.operands {
                        cost = cost.plus(self.leaf_cost(o));
                    }
                }
                self.cost[r.0 as usize] = cost;
                self.materialized[r.0 as usize] = self.rule(r, cost);
            }
        }
    }

    fn rule(&self, v: Value, cost: Cost) -> bool {
        let g = self.g;
        let users = &g.users[v.0 as usize];
        let forced = g.yielded[v.0 as usize]
            || users.iter().any(|(region, inst)| {
                *region != g.region_of[v.0 as usize] || matches!(inst.op, Op::Loop)
            });
        if forced {
            return true;
        }
        if self.internal.contains(&v) {
            return false;
        }
        let cheap_for_matmul = cost.loads <= 1 && cost.transcendental == 0 && cost.arith <= 4;
        let matmul_operand = users.iter().any(|(_, inst)| {
            matches!(inst.op, Op::MatMul) && !self.internal.contains(&inst.results[0])
        });
        if matmul_operand && !cheap_for_matmul {
            return true;
        }
        if cost.transcendental > 0 && self.broadcast_into_larger(v) {
            return true;
        }
        // The keys and values of `attention` are read once per query row (the reference
        // template) or query tile (the tensor-core one, which copies them straight from
        // memory): anything more than a load or a view gets a buffer (RoPE'd keys).
        let attention_kv = users.iter().any(|(_, inst)| {
            matches!(inst.op, Op::Attention { .. }) && inst.operands[1..3].contains(&v)
        });
        let just_a_load = cost.loads <= 1 && cost.transcendental == 0 && cost.arith == 0;
        if attention_kv && !just_a_load {
            return true;
        }
        self.users(v) >= 2 && cost.total() > 8
    }

    /// Whether `v`, of a constant size of at least 2 elements, is read (directly or through
    /// movement ops) by a consumer with more elements: its elements would be recomputed for
    /// each element of the consumer (RoPE's inverse frequencies for every position).
    fn broadcast_into_larger(&self, v: Value) -> bool {
        let Some(size) = const_numel(self.g.shape(v)) else {
            return false;
        };
        size >= 2 && self.read_by_larger(v, size, 4)
    }

    fn read_by_larger(&self, v: Value, size: u64, depth: u32) -> bool {
        self.g.users[v.0 as usize].iter().any(|(_, inst)| {
            let Some(&r) = inst.results.first() else {
                return false;
            };
            match const_numel(self.g.shape(r)) {
                None => true,
                Some(n) if n > size => true,
                Some(_) => {
                    let movement = matches!(
                        inst.op,
                        Op::Reshape { .. } | Op::Permute { .. } | Op::BroadcastTo { .. }
                    );
                    movement && depth > 0 && self.read_by_larger(r, size, depth - 1)
                }
            }
        })
    }

    // ---- placement -----------------------------------------------------------------

    fn new_pos(&mut self) -> usize {
        self.next_pos += 1;
        self.next_pos
    }

    fn is_loaded_leaf(&self, o: Value) -> bool {
        self.g.is_source(o) || self.g.is_heavy(o) || self.materialized[o.0 as usize]
    }

    /// The stored values that computing the operands of `v` reads, for a kernel owning
    /// `owned`.
    fn leaves(&self, v: Value, owned: &BTreeSet<Value>, out: &mut BTreeSet<Value>) {
        for &o in self.operands(v) {
            self.visit_leaf(o, owned, out);
        }
    }

    fn visit_leaf(&self, o: Value, owned: &BTreeSet<Value>, out: &mut BTreeSet<Value>) {
        if owned.contains(&o) {
            if !self.g.is_heavy(o) {
                self.leaves(o, owned, out);
            }
        } else if self.is_loaded_leaf(o) {
            out.insert(o);
        } else {
            self.leaves(o, owned, out);
        }
    }

    fn ready_before(&self, leaves: &BTreeSet<Value>, pos: usize) -> bool {
        leaves.iter().all(|l| {
            !self.pending.contains(l)
                && (self.g.is_source(*l) && self.pos[l.0 as usize].is_none()
                    || self.pos[l.0 as usize].is_some_and(|p| p < pos))
        })
    }

    fn place_region(&mut self, region: usize) -> Result<Vec<Item<'f>>, FusionError> {
        let g = self.g;
        let mut items = Vec::new();
        for inst in &g.regions[region].insts {
            match &inst.op {
                Op::Param { .. } => {}
                Op::Loop => {
                    self.flush_all(region, &mut items);
                    self.new_pos();
                    let sub = g
                        .regions
                        .iter()
                        .position(|r| std::ptr::eq(*r, &inst.regions[0]))
                        .expect("a known region");
                    for &a in &inst.regions[0].args {
                        self.pos[a.0 as usize] = None;
                    }
                    let body = self.place_region(sub)?;
                    let end = self.new_pos();
                    for &r in &inst.results {
                        self.pos[r.0 as usize] = Some(end);
                    }
                    items.push(Item::Loop { inst, body });
                }
                Op::Attention { .. } | Op::PagedAttention { .. } => {
                    let h = inst.results[0];
                    self.settle_pending(region, &[h], None, &mut items);
                    let kind = match inst.op {
                        Op::Attention { .. } => GroupKind::BuiltinAttention(h),
                        _ => GroupKind::PagedAttention(h),
                    };
                    let id = self.add_group(kind, region, &mut items);
                    self.own(id, h, false);
                }
                Op::KvWrite { .. } => {
                    // Updated in place: the result lives in the cache operand's buffer.
                    let h = inst.results[0];
                    self.settle_pending(region, &[h], None, &mut items);
                    let id = match self.kv_write_partner(h, &items) {
                        Some(id) => id,
                        None => self.add_group(GroupKind::KvWrite, region, &mut items),
                    };
                    self.own(id, h, false);
                    let cache = inst.operands[0];
                    let base = self.view_of.get(&cache).copied().unwrap_or(cache);
                    self.view_of.insert(h, base);
                }
                Op::Sort { axis } => {
                    let h = inst.results[0];
                    self.settle_pending(region, &[h], None, &mut items);
                    let kind = match g.shape(h)[*axis].as_const() {
                        Some(len) if len <= SMALL_SORT_LEN => GroupKind::SmallSort {
                            sort: h,
                            axis: *axis,
                            len,
                        },
                        _ => GroupKind::SortLoop(h),
                    };
                    let id = self.add_group(kind, region, &mut items);
                    self.own(id, h, false);
                }
                Op::MatMul | Op::Reduce { .. } | Op::ArgMax { .. } | Op::ArgMin { .. } => {
                    let h = inst.results[0];
                    if let Some(parts) = self.attention.get(&h).cloned() {
                        self.place_attention(region, parts, &mut items);
                    } else if !self.internal.contains(&h) {
                        self.place_heavy(region, h, &mut items);
                    }
                }
                _ => {
                    for &r in &inst.results {
                        if self.materialized[r.0 as usize] {
                            self.place_materialized(region, r, &mut items);
                        }
                    }
                }
            }
        }
        self.flush_all(region, &mut items);
        Ok(items)
    }

    /// The `kv_write` group that `kv_write` result `h` can join: the last group placed, when
    /// it writes rows of the same shape and dtype, into other caches than `h`'s, and
    /// everything `h` reads was ready before it.
    fn kv_write_partner(&self, h: Value, items: &[Item<'f>]) -> Option<usize> {
        let Some(Item::Kernel(id)) = items.last() else {
            return None;
        };
        let grp = &self.groups[*id];
        if !matches!(grp.kind, GroupKind::KvWrite) {
            return None;
        }
        let g = self.g;
        let rows = |v: Value| g.inst(v).map(|i| i.operands[1]);
        let (first, new_rows) = (rows(*grp.roots.first()?)?, rows(h)?);
        if g.shape(first) != g.shape(new_rows) || g.ty(first).dtype != g.ty(new_rows).dtype {
            return None;
        }
        let mut leaves = BTreeSet::new();
        self.leaves(h, &BTreeSet::from([h]), &mut leaves);
        let writes_what_it_reads = grp.roots.iter().any(|r| leaves.contains(r));
        (!writes_what_it_reads && self.ready_before(&leaves, grp.pos)).then_some(*id)
    }

    fn add_group(&mut self, kind: GroupKind, region: usize, items: &mut Vec<Item<'f>>) -> usize {
        let pos = self.new_pos();
        self.groups.push(Group {
            kind,
            pos,
            region,
            roots: Vec::new(),
            outputs: Vec::new(),
            owned: BTreeSet::new(),
        });
        let id = self.groups.len() - 1;
        items.push(Item::Kernel(id));
        id
    }

    fn own(&mut self, group: usize, v: Value, as_output: bool) {
        let grp = &mut self.groups[group];
        grp.owned.insert(v);
        if as_output {
            grp.outputs.push(v);
        } else {
            grp.roots.push(v);
        }
        self.owner[v.0 as usize] = Some(group);
        self.pos[v.0 as usize] = Some(grp.pos);
    }

    /// Pending values among `leaves`: those of `shape` (and the pending values of that
    /// shape they read) are returned to be owned by a new kernel; the others are flushed
    /// into pointwise kernels first.
    fn settle_pending(
        &mut self,
        region: usize,
        roots: &[Value],
        shape: Option<&[Dim]>,
        items: &mut Vec<Item<'f>>,
    ) -> Vec<Value> {
        let mut take = Vec::new();
        let mut owned: BTreeSet<Value> = roots.iter().copied().collect();
        loop {
            let mut leaves = BTreeSet::new();
            for &r in roots.iter().chain(&take) {
                self.leaves(r, &owned, &mut leaves);
            }
            let pend: Vec<Value> = leaves
                .into_iter()
                .filter(|l| self.pending.contains(l))
                .collect();
            if pend.is_empty() {
                break;
            }
            for p in pend {
                if shape == Some(self.g.shape(p)) {
                    owned.insert(p);
                    take.push(p);
                } else {
                    self.flush(region, p, items);
                }
            }
        }
        self.pending.retain(|p| !take.contains(p));
        // Keep program order among the taken values.
        take.sort();
        take
    }

    fn flush(&mut self, region: usize, v: Value, items: &mut Vec<Item<'f>>) {
        if !self.pending.contains(&v) {
            return;
        }
        // Every pending value of the same shape goes into the same pointwise kernel.
        let shape = self.g.shape(v).to_vec();
        let same: Vec<Value> = self
            .pending
            .iter()
            .copied()
            .filter(|p| self.g.shape(*p) == shape.as_slice())
            .collect();
        self.pending.retain(|p| !same.contains(p));
        let mut take = self.settle_pending(region, &same, Some(&shape), items);
        take.extend(same);
        take.sort();
        take.dedup();
        let id = self.add_group(GroupKind::Pointwise { shape }, region, items);
        for t in take {
            self.own(id, t, true);
        }
    }

    fn flush_all(&mut self, region: usize, items: &mut Vec<Item<'f>>) {
        while let Some(&v) = self.pending.first() {
            self.flush(region, v, items);
        }
    }

    fn place_heavy(&mut self, region: usize, h: Value, items: &mut Vec<Item<'f>>) {
        let g = self.g;
        let op = g.op(h).expect("heavy values have an op");
        let input_shape = g.shape(self.operands(h)[0]).to_vec();
        let rank = input_shape.len();
        let trailing = match op {
            Op::Reduce { axes, .. } => {
                !axes.is_empty()
                    && axes
                        .iter()
                        .enumerate()
                        .all(|(i, &a)| a == rank - axes.len() + i)
            }
            Op::ArgMax { axis, .. } | Op::ArgMin { axis, .. } => *axis + 1 == rank,
            _ => false,
        };
        if matches!(op, Op::MatMul) {
            let a = self.operands(h)[0];
            let out_shape = g.shape(h);
            let rows = &out_shape[..out_shape.len() - 1];
            // Matmuls of different widths fuse too (GQA's q with its narrower k and v): on
            // an H100 at 65bc0c3, fusing only equal shapes (q alone and split over K, k and
            // v together) left the 1.1B decode step unchanged (1.72 ms) and made its
            // 128-token prefill slower (6.0-6.2 ms from 5.4).
            for gid in (0..self.groups.len()).rev() {
                let grp = &self.groups[gid];
                let same = grp.region == region
                    && matches!(grp.kind, GroupKind::Matmul { a: a2 } if a2 == a)
                    && grp.roots.iter().all(|r| {
                        let s = g.shape(*r);
                        &s[..s.len() - 1] == rows && g.ty(*r).dtype == g.ty(h).dtype
                    });
                if same {
                    let mut leaves = BTreeSet::new();
                    self.leaves(h, &grp.owned, &mut leaves);
                    if self.ready_before(&leaves, grp.pos) {
                        self.own(gid, h, false);
                        return;
                    }
                }
            }
            self.settle_pending(region, &[h], None, items);
            let id = self.add_group(GroupKind::Matmul { a }, region, items);
            self.own(id, h, false);
            return;
        }
        if !trailing {
            self.settle_pending(region, &[h], None, items);
            let id = self.add_group(GroupKind::LoopReduce, region, items);
            self.own(id, h, false);
            return;
        }
        let k = match op {
            Op::Reduce { axes, .. } => axes.len(),
            _ => 1,
        };
        if k == 1 {
            if let Some(gid) = self.sort_group_for(region, h, &input_shape) {
                self.own(gid, h, false);
                return;
            }
        }
        let (outer, inner) = (
            input_shape[..rank - k].to_vec(),
            input_shape[rank - k..].to_vec(),
        );
        for gid in (0..self.groups.len()).rev() {
            let grp = &self.groups[gid];
            let same = grp.region == region
                && matches!(&grp.kind, GroupKind::Row { outer: o, inner: i } if *o == outer && *i == inner);
            if same {
                let mut leaves = BTreeSet::new();
                self.leaves(h, &grp.owned, &mut leaves);
                if self.ready_before(&leaves, grp.pos) {
                    self.own(gid, h, false);
                    return;
                }
            }
        }
        let take = self.settle_pending(region, &[h], Some(&input_shape), items);
        let id = self.add_group(GroupKind::Row { outer, inner }, region, items);
        self.own(id, h, false);
        for t in take {
            self.own(id, t, true);
        }
    }

    fn place_attention(&mut self, region: usize, parts: AttentionParts, items: &mut Vec<Item<'f>>) {
        let internal = self.attention_internal(&parts);
        self.settle_pending(region, &internal, None, items);
        let pv = parts.pv;
        let id = self.add_group(GroupKind::Attention(parts), region, items);
        for v in internal {
            self.groups[id].owned.insert(v);
            self.owner[v.0 as usize] = Some(id);
        }
        self.groups[id].owned.insert(pv);
        self.own(id, pv, false);
    }

    fn place_materialized(&mut self, region: usize, v: Value, _items: &mut Vec<Item<'f>>) {
        let g = self.g;
        // A reshape of a stored tensor shares its buffer.
        let mut base = v;
        while let Some(Op::Reshape { .. }) = g.op(base) {
            base = self.operands(base)[0];
            let stored_base =
                (g.is_source(base) || g.is_heavy(base) || self.materialized[base.0 as usize])
                    && !self.internal.contains(&base)
                    && !self.pending.contains(&base);
            if stored_base && (self.pos[base.0 as usize].is_some() || g.is_source(base)) {
                self.view_of.insert(v, base);
                self.pos[v.0 as usize] = self.pos[base.0 as usize];
                return;
            }
            if stored_base {
                break;
            }
        }
        let mut leaves = BTreeSet::new();
        self.leaves(v, &BTreeSet::new(), &mut leaves);
        if leaves.iter().any(|l| self.pending.contains(l)) {
            self.pending.push(v);
            return;
        }
        let last = leaves
            .iter()
            .filter_map(|l| self.owner[l.0 as usize])
            .max_by_key(|gid| self.groups[*gid].pos);
        let last_pos = leaves.iter().filter_map(|l| self.pos[l.0 as usize]).max();
        if let Some(gid) = last {
            let grp = &self.groups[gid];
            if grp.region == region && Some(grp.pos) == last_pos && self.can_take(gid, v) {
                self.own(gid, v, true);
                return;
            }
        }
        self.pending.push(v);
    }

    /// Whether kernel `gid` holds every element `v` needs (see the module doc).
    fn can_take(&self, gid: usize, v: Value) -> bool {
        let g = self.g;
        let grp = &self.groups[gid];
        let shape = g.shape(v);
        match &grp.kind {
            GroupKind::Pointwise { shape: s } => s == shape,
            GroupKind::Row { outer, inner } => {
                let full: Vec<Dim> = outer.iter().chain(inner).cloned().collect();
                let keep: Vec<Dim> = outer
                    .iter()
                    .cloned()
                    .chain(inner.iter().map(|_| Dim::Const(1)))
                    .collect();
                let mode = if shape == full.as_slice() {
                    Mode::Full
                } else if shape == keep.as_slice() || shape == outer.as_slice() {
                    Mode::Row
                } else {
                    return false;
                };
                self.access_ok(v, grp, mode, &keep)
            }
            GroupKind::Matmul { .. } => {
                grp.roots.iter().any(|r| g.shape(*r) == shape)
                    && self.access_ok(v, grp, Mode::Full, &[])
            }
            GroupKind::SmallSort { sort, axis, .. } => {
                let row = &g.shape(*sort)[..*axis];
                *axis + 1 == g.shape(*sort).len()
                    && shape.len() >= row.len()
                    && &shape[..row.len()] == row
                    && const_numel(&shape[row.len()..]).is_some_and(|n| n <= SMALL_SORT_UNROLL)
                    && self.row_local(v, grp, row.len(), false)
            }
            GroupKind::SortLoop(_)
            | GroupKind::LoopReduce
            | GroupKind::Attention(_)
            | GroupKind::BuiltinAttention(_)
            | GroupKind::KvWrite
            | GroupKind::PagedAttention(_) => false,
        }
    }

    /// Walks `v`'s expression: every value the group holds in registers (its roots) must be
    /// read at the element the thread holds: the same index (`Full`), or the same row.
    fn access_ok(&self, v: Value, grp: &Group, mode: Mode, row_shape: &[Dim]) -> bool {
        let g = self.g;
        if grp.roots.contains(&v) {
            return match grp.kind {
                GroupKind::Row { .. } => {
                    mode == Mode::Row
                        || mode == Mode::Full && g.shape(v).iter().all(|d| *d == Dim::Const(1))
                }
                _ => mode == Mode::Full,
            };
        }
        if !grp.owned.contains(&v) && self.is_loaded_leaf(v) {
            return true;
        }
        let Some(inst) = g.inst(v) else { return true };
        let shape = g.shape(v);
        let elementwise = matches!(
            inst.op,
            Op::Unary(_) | Op::Binary(_) | Op::Select | Op::Cast { .. } | Op::BroadcastTo { .. }
        );
        inst.operands.iter().all(|&o| {
            if !self.depends_on_roots(o, grp) {
                return true;
            }
            let os = g.shape(o);
            let next = if !elementwise {
                Mode::Other
            } else if os == shape {
                mode
            } else if mode == Mode::Full
                && !row_shape.is_empty()
                && broadcasts_as_row(os, row_shape)
            {
                Mode::Row
            } else {
                Mode::Other
            };
            next != Mode::Other && self.access_ok(o, grp, next, row_shape)
        })
    }

    /// The small-sort group a reduction `h` over the last axis of `input_shape` can join:
    /// the latest one of this region sorting the last axis of lines of the same outer
    /// shape, whose roots `h`'s input reads within the thread's line, and whose other
    /// inputs are ready before it.
    fn sort_group_for(&self, region: usize, h: Value, input_shape: &[Dim]) -> Option<usize> {
        let g = self.g;
        let outer = &input_shape[..input_shape.len().checked_sub(1)?];
        input_shape
            .last()?
            .as_const()
            .filter(|n| *n <= SMALL_SORT_UNROLL)?;
        let gid = (0..self.groups.len()).rev().find(|&gid| {
            let grp = &self.groups[gid];
            grp.region == region && matches!(grp.kind, GroupKind::SmallSort { .. })
        })?;
        let grp = &self.groups[gid];
        let GroupKind::SmallSort { sort, axis, .. } = grp.kind else {
            return None;
        };
        let sort_shape = g.shape(sort);
        if axis + 1 != sort_shape.len() || &sort_shape[..axis] != outer {
            return None;
        }
        let input = self.operands(h)[0];
        if !self.depends_on_roots(input, grp) || !self.row_local(input, grp, outer.len(), false) {
            return None;
        }
        let mut leaves = BTreeSet::new();
        self.leaves(h, &grp.owned, &mut leaves);
        self.ready_before(&leaves, grp.pos).then_some(gid)
    }

    /// Whether computing `v` in a small-sort kernel reads the group's roots only within
    /// the thread's own line: every value on the way keeps the `outer` leading dims (no
    /// broadcast over them); element-wise ops, slices past the outer dims and reshapes
    /// that keep them lead to the sorted line (held in registers, read at any position);
    /// the group's reductions are reached through element-wise ops only (`moved` says a
    /// slice or reshape came first), where they are read at the line's own index.
    fn row_local(&self, v: Value, grp: &Group, outer: usize, moved: bool) -> bool {
        let g = self.g;
        let keeps_outer = |x: Value, of: Value| {
            let (xs, os) = (g.shape(x), g.shape(of));
            xs.len() >= outer && os.len() >= outer && xs[..outer] == os[..outer]
        };
        if grp.roots.first() == Some(&v) {
            return true;
        }
        if grp.roots.contains(&v) {
            return !moved;
        }
        if !self.depends_on_roots(v, grp) {
            return true;
        }
        let Some(inst) = g.inst(v) else { return true };
        let (elementwise, movement) = match &inst.op {
            Op::Unary(_)
            | Op::Binary(_)
            | Op::Select
            | Op::Cast { .. }
            | Op::BroadcastTo { .. } => (true, false),
            Op::Slice { axis, .. } => (false, *axis >= outer),
            Op::Reshape { .. } => (false, true),
            _ => (false, false),
        };
        if !elementwise && !movement {
            return false;
        }
        let rank = g.shape(v).len();
        inst.operands.iter().all(|&o| {
            if !self.depends_on_roots(o, grp) {
                return true;
            }
            // Right-aligned broadcasting: the operand must reach the outer dims unchanged.
            (movement || g.shape(o).len() == rank)
                && keeps_outer(o, v)
                && self.row_local(o, grp, outer, moved || movement)
        })
    }

    fn depends_on_roots(&self, v: Value, grp: &Group) -> bool {
        if grp.roots.contains(&v) {
            return true;
        }
        if !grp.owned.contains(&v) && self.is_loaded_leaf(v) {
            return false;
        }
        self.operands(v)
            .iter()
            .any(|&o| self.depends_on_roots(o, grp))
    }

    // ---- storage -------------------------------------------------------------------

    fn stored_values(&self) -> Vec<bool> {
        let g = self.g;
        let n = g.func.values.len();
        let mut stored = vec![false; n];
        for grp in &self.groups {
            let mut leaves = BTreeSet::new();
            for &o in &grp.owned {
                self.leaves(o, &grp.owned, &mut leaves);
            }
            for l in leaves {
                stored[l.0 as usize] = true;
            }
        }
        for (v, slot) in stored.iter_mut().enumerate() {
            if g.def[v].is_none() {
                continue;
            }
            let crosses = g.users[v]
                .iter()
                .any(|(region, inst)| *region != g.region_of[v] || matches!(inst.op, Op::Loop));
            if g.yielded[v] || crosses {
                *slot = true;
            }
        }
        // A view's base is stored whenever the view is.
        for (&view, &base) in &self.view_of {
            if stored[view.0 as usize] {
                stored[base.0 as usize] = true;
            }
        }
        stored
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// The element at the kernel's own index.
    Full,
    /// Some element of the kernel's own row.
    Row,
    Other,
}

/// Whether `shape` is the per-row shape `row` (outer dims then 1s), possibly with fewer
/// leading dims of 1.
/// The element count of a shape whose dims are all constant.
fn const_numel(shape: &[Dim]) -> Option<u64> {
    shape.iter().map(Dim::as_const).product()
}

fn broadcasts_as_row(shape: &[Dim], row: &[Dim]) -> bool {
    shape == row
        || shape.iter().all(|d| *d == Dim::Const(1))
        || (shape.len() < row.len() && shape == &row[row.len() - shape.len()..])
}
