//! The one fusion mechanism: the element of any graph value at a given index, as a kir
//! expression over the buffers of materialized values.
//!
//! [`Emitter::elem`] walks from a value down through element-wise ops (index unchanged,
//! broadcast dims read at 0) and movement ops (reshape, permute, broadcast, slice, concat,
//! gather: index arithmetic) until it reaches a value that is stored in a buffer (a load)
//! or held in registers by the kernel being built (a [`Binding`]: a reduction result for
//! the current row, a matmul accumulator for the current output element). Every
//! intermediate is assigned to a fresh register, memoized per (value, index) within a
//! scope, so shared subexpressions are computed once per thread. The memo key writes each
//! index in a canonical affine form (`(64 + j) - 64` and `j` are one key), so a template
//! that visits an element twice under different index expressions reads it once.
//!
//! Index ranges: [`Emitter::bind`] records the bounds of integer registers it can derive
//! (templates may add their own, [`Emitter::set_range`]); a concat whose index is known to
//! lie in one piece reads only that piece, without a select or a branch.
//!
//! Lanes: `elem(.., lanes = W)` computes `W` consecutive elements along the last axis at
//! once (the last index is a multiple of `W`); buffer reads then become `LoadVec`s when the
//! index arithmetic keeps the lanes contiguous, and fall back to one load per lane where it
//! does not (a permuted last axis, a gather over the last axis).
//!
//! Numerics: every value is computed in its compute type (f32 for every float dtype);
//! intermediate values of narrow float dtypes are not rounded to that dtype between fused
//! ops (the interpreter rounds after every op), so bf16/f16 results may differ from it by
//! about one unit in the last place of the narrow dtype.

use crate::error::{EmitError, FusionError};
use crate::graph::FuncGraph;
use kiln_ir::{BinaryOp, DType, Dim, Op, UnaryOp, Value};
use kiln_kir::{
    Access, BinOp, Buf, Const, Expr, Kernel, Param, Shared, SizeExpr, Special, Stmt, Ty, UnOp, Var,
    VarId,
};
use std::collections::{BTreeMap, BTreeSet};

/// What a kernel parameter is bound to in the plan.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum ParamArg {
    /// The buffer holding this graph value.
    Buffer(Value),
    /// The value of a symbolic dim.
    Sym(String),
    /// Workspace `n` of the kernel's group (scratch memory its launches share, declared
    /// by the template and placed in the arena by the plan).
    Workspace(usize),
    /// The split-K workspace of another group, the GEMM group `n` whose partial sums this
    /// kernel adds itself ([`SplitSum`]).
    GroupWorkspace(usize),
    /// `I32` counters that are zero before each launch (`BufferKind::Zeroed`), at least
    /// this many; the plan gives every kernel asking for the same count the same buffer.
    Counters(SizeExpr),
}

/// The split-K partial sums of a GEMM group that the kernel being built adds itself in
/// place of that group's sum kernel: every value the GEMM group stores is then computed
/// here, element by element, exactly as its sum kernel would (the f32 partial sums added in
/// split order, then the group's epilogue), stored to its buffer and read back from there
/// (so that this kernel uses the value as rounded to its dtype, as a kernel loading it
/// would).
#[derive(Clone, Debug)]
pub(crate) struct SplitSum {
    /// The f32 workspace `[matmuls, splits, out..]` (`matmuls` left out for one).
    pub workspace: Buf,
    /// The GEMM group's matmuls (its roots), all of the shape of the values it stores.
    pub matmuls: Vec<Value>,
    pub splits: u32,
    /// Everything the GEMM group computes (its epilogue is computed as in its own kernel).
    pub owned: BTreeSet<Value>,
    /// For one matmul of a grid of segments: the workspace's row length (every segment's
    /// columns, `[splits, M, row]`) and the matmul's first column in it.
    pub segment: Option<(u64, u64)>,
}

/// A value the kernel holds in a register for exactly one index.
#[derive(Clone, Debug)]
pub(crate) struct Binding {
    pub value: Value,
    pub index: Vec<Expr>,
    pub expr: Expr,
}

/// A value whose lines along `axis` the kernel holds in registers, one line per thread
/// (the small-sort template's sorted row): `regs[j]` is the element at position `j` of the
/// thread's own line. The partition only lets a kernel read such a value within the
/// thread's line, so a read looks at the index along `axis` only: a constant picks its
/// register, anything else selects among them.
#[derive(Clone, Debug)]
pub(crate) struct HeldRow {
    pub value: Value,
    pub axis: usize,
    pub regs: Vec<Expr>,
    /// The positions along `axis` of the registers when the thread holds only some of its
    /// line (a GEMV warp's columns, `templates::KvWrites`): a read selects the register
    /// whose position it equals, the last for any other (which only reads whose result
    /// is not selected make). Empty: positions `0..regs.len()`.
    pub at: Vec<Expr>,
}

/// A value the kernel keeps in a shared-memory array (the persistent loop template): one
/// instance's slice of it when `batched` (its leading axis is the loop's batch axis, read
/// at the block's instance), else all of it.
#[derive(Clone, Debug)]
pub(crate) struct LocalArray {
    pub buf: Buf,
    pub batched: bool,
    /// The dims the array holds (the value's dims without the batch axis when batched).
    pub dims: Vec<Dim>,
    /// Extra elements after each row of the innermost axis (rows of 32·k floats read down a
    /// column by neighbouring threads would otherwise fall into one bank).
    pub pad: u64,
}

/// Builds one kernel: parameters, registers, shared arrays and element expressions.
pub(crate) struct Emitter<'a, 'f> {
    pub g: &'a FuncGraph<'f>,
    /// Per value: whether a consumer outside its producing kernel reads it from a buffer.
    pub stored: &'a [bool],
    pub index_ty: Ty,
    pub params: Vec<Param>,
    pub args: Vec<ParamArg>,
    pub vars: Vec<Var>,
    pub shared: Vec<Shared>,
    /// Values this kernel computes itself (inlined even when they are also stored).
    pub owned: BTreeSet<Value>,
    pub bindings: Vec<Binding>,
    /// Values held a line per thread in registers.
    pub rows: Vec<HeldRow>,
    /// Values held in shared arrays by the kernel (read from there, never from a buffer).
    pub local: BTreeMap<Value, LocalArray>,
    /// Split-K GEMM groups whose partial sums this kernel adds itself.
    pub split_sums: Vec<SplitSum>,
    /// The values those groups store, each with its index in `split_sums`: computed from
    /// the partial sums instead of loaded.
    pub sourced: BTreeMap<Value, usize>,
    memo: Vec<BTreeMap<String, Vec<Expr>>>,
    /// Inclusive bounds of integer registers, where known.
    ranges: BTreeMap<VarId, (i64, i64)>,
    /// Every graph value whose op this kernel computes (for the statistics).
    pub fused: BTreeSet<Value>,
    buffer_params: BTreeMap<Value, u32>,
    sym_params: BTreeMap<String, u32>,
    /// The kernel's [`Kernel::blocks_per_sm`] (1 unless the template asks for more).
    pub blocks_per_sm: u32,
}

pub(crate) type EResult<T> = Result<T, EmitError>;

impl<'a, 'f> Emitter<'a, 'f> {
    pub fn new(g: &'a FuncGraph<'f>, stored: &'a [bool], index_ty: Ty) -> Emitter<'a, 'f> {
        Emitter {
            g,
            stored,
            index_ty,
            params: Vec::new(),
            args: Vec::new(),
            vars: Vec::new(),
            shared: Vec::new(),
            owned: BTreeSet::new(),
            bindings: Vec::new(),
            rows: Vec::new(),
            local: BTreeMap::new(),
            split_sums: Vec::new(),
            sourced: BTreeMap::new(),
            memo: vec![BTreeMap::new()],
            ranges: BTreeMap::new(),
            fused: BTreeSet::new(),
            buffer_params: BTreeMap::new(),
            sym_params: BTreeMap::new(),
            blocks_per_sm: 1,
        }
    }

    pub fn internal(&self, v: Value, message: impl Into<String>) -> EmitError {
        EmitError::Fatal(FusionError::Internal {
            function: self.g.func.name.clone(),
            value: v,
            message: message.into(),
        })
    }

    // ---- declarations ----------------------------------------------------------------

    pub fn var(&mut self, name: &str, ty: Ty) -> VarId {
        let id = VarId(self.vars.len() as u32);
        self.vars.push(Var {
            name: format!("{name}{}", id.0),
            ty,
        });
        id
    }

    pub fn shared_array(&mut self, name: &str, dtype: DType, len: u32) -> Buf {
        let id = self.shared.len() as u32;
        self.shared.push(Shared {
            name: name.to_string(),
            dtype,
            len,
        });
        Buf::Shared(id)
    }

    /// The buffer parameter of value `v`, declared on first use. A checkpoint tensor (a
    /// `param`) that is read is [`Access::Constant`]: no kernel writes it, so its loads may
    /// precede the grid-dependency wait.
    pub fn buffer(&mut self, v: Value, access: Access) -> Buf {
        let access = match access {
            Access::Read if self.g.is_checkpoint(v) => Access::Constant,
            _ => access,
        };
        if let Some(&i) = self.buffer_params.get(&v) {
            if let Param::Buffer { access: a, .. } = &mut self.params[i as usize] {
                *a = a.and(access);
            }
            return Buf::Global(i);
        }
        let i = self.params.len() as u32;
        // Positional names, so that kernels differing only in which values they read are
        // identical (and shared).
        let name = match self.g.name(v) {
            Some(n) => format!("{}{i}", sanitize(n)),
            None => format!("buf{i}"),
        };
        self.params.push(Param::Buffer {
            name,
            dtype: self.g.ty(v).dtype,
            access,
        });
        self.args.push(ParamArg::Buffer(v));
        self.buffer_params.insert(v, i);
        Buf::Global(i)
    }

    /// Moves each top-level vector load of a checkpoint tensor in `stmts` up to just after
    /// the last top-level statement writing a register its index reads: its latency then
    /// overlaps the work between (a norm's weights, loaded after the row's reduction
    /// otherwise, come with the row's first loads). Safe because no kernel writes a
    /// checkpoint tensor ([`Access::Constant`]), the index reads the same registers with
    /// the same values, and the load stays unconditional; nothing else moves.
    pub fn hoist_constant_loads(&self, stmts: &mut Vec<Stmt>) {
        for i in 0..stmts.len() {
            let Stmt::LoadVec { dsts, buf, index } = &stmts[i] else {
                continue;
            };
            if !kiln_kir::constant_buffer(&self.params, *buf) {
                continue;
            }
            let mut reads = BTreeSet::new();
            kiln_kir::verify::vars_read(index, &mut reads);
            let writes_any = |stmt: &Stmt, vars: &BTreeSet<VarId>| {
                let mut written = BTreeSet::new();
                kiln_kir::verify::vars_written(std::slice::from_ref(stmt), &mut written);
                !written.is_disjoint(vars)
            };
            let target = (0..i)
                .rev()
                .find(|&j| writes_any(&stmts[j], &reads))
                .map_or(0, |j| j + 1);
            let dsts: BTreeSet<VarId> = dsts.iter().copied().collect();
            if target < i && !stmts[target..i].iter().any(|s| writes_any(s, &dsts)) {
                let load = stmts.remove(i);
                stmts.insert(target, load);
            }
        }
    }

    /// The buffer parameter of the group's workspace `slot` (f32 or another `dtype`).
    pub fn workspace(&mut self, slot: usize, dtype: DType, access: Access) -> Buf {
        let i = self.params.len() as u32;
        self.params.push(Param::Buffer {
            name: format!("workspace{i}"),
            dtype,
            access,
        });
        self.args.push(ParamArg::Workspace(slot));
        Buf::Global(i)
    }

    /// The buffer parameter of `count` zeroed `I32` counters ([`ParamArg::Counters`]); the
    /// kernel leaves every counter it changes at zero when its launch ends.
    pub fn counters(&mut self, count: SizeExpr) -> Buf {
        let i = self.params.len() as u32;
        self.params.push(Param::Buffer {
            name: format!("counters{i}"),
            dtype: DType::I32,
            access: Access::ReadWrite,
        });
        self.args.push(ParamArg::Counters(count));
        Buf::Global(i)
    }

    /// The buffer parameter of GEMM group `gid`'s split-K workspace (read only).
    pub fn group_workspace(&mut self, gid: usize) -> Buf {
        let i = self.params.len() as u32;
        self.params.push(Param::Buffer {
            name: format!("workspace{i}"),
            dtype: DType::F32,
            access: Access::Read,
        });
        self.args.push(ParamArg::GroupWorkspace(gid));
        Buf::Global(i)
    }

    /// A symbolic dim's value, of the index type.
    pub fn sym(&mut self, name: &str) -> Expr {
        let i = match self.sym_params.get(name) {
            Some(&i) => i,
            None => {
                let i = self.params.len() as u32;
                self.params.push(Param::Scalar {
                    name: name.to_string(),
                    ty: Ty::I64,
                });
                self.args.push(ParamArg::Sym(name.to_string()));
                self.sym_params.insert(name.to_string(), i);
                i
            }
        };
        if self.index_ty == Ty::I64 {
            Expr::Param(i)
        } else {
            Expr::Cast(Ty::I32, Box::new(Expr::Param(i)))
        }
    }

    pub fn dim(&mut self, d: &Dim) -> Expr {
        match d {
            Dim::Const(n) => self.ix(*n as i64),
            Dim::Sym(s) => self.sym(s),
        }
    }

    pub fn numel(&mut self, dims: &[Dim]) -> Expr {
        let mut acc = self.ix(1);
        for d in dims {
            let e = self.dim(d);
            acc = mul(acc, e);
        }
        acc
    }

    /// An integer constant of the index type.
    pub fn ix(&self, n: i64) -> Expr {
        int_const(self.index_ty, n)
    }

    /// A special register converted to the index type.
    pub fn special(&self, s: Special) -> Expr {
        let e = Expr::Special(s);
        if self.index_ty == Ty::I64 {
            Expr::Cast(Ty::I64, Box::new(e))
        } else {
            e
        }
    }

    pub fn push_scope(&mut self) {
        self.memo.push(BTreeMap::new());
    }

    pub fn pop_scope(&mut self) {
        self.memo.pop();
    }

    /// Assigns `e` to a fresh register unless it is trivial; returns what to read.
    pub fn bind(&mut self, out: &mut Vec<Stmt>, name: &str, ty: Ty, e: Expr) -> Expr {
        let e = fold_const(e);
        if is_trivial(&e) {
            return e;
        }
        let v = self.var(name, ty);
        if let Some(r) = self.range(&e) {
            self.ranges.insert(v, r);
        }
        out.push(Stmt::Assign(v, e));
        Expr::Var(v)
    }

    /// Like [`Emitter::bind`] for the value of an element-wise op: an expression already
    /// bound in a visible scope is read from its register instead of being computed again
    /// (RoPE's two halves take the cosine of the same angle through different indices).
    fn bind_value(&mut self, out: &mut Vec<Stmt>, name: &str, ty: Ty, e: Expr) -> Expr {
        let e = fold_const(e);
        if is_trivial(&e) {
            return e;
        }
        let key = format!("={ty:?}|{e:?}");
        if let Some(hit) = self.memo.iter().rev().find_map(|m| m.get(&key)) {
            return hit[0].clone();
        }
        let r = self.bind(out, name, ty, e);
        self.memo
            .last_mut()
            .expect("a scope")
            .insert(key, vec![r.clone()]);
        r
    }

    /// Declares that register `v` stays within `lo..=hi`.
    pub fn set_range(&mut self, v: VarId, lo: i64, hi: i64) {
        self.ranges.insert(v, (lo, hi));
    }

    /// Inclusive bounds of the integer index expression `e`, where they follow from
    /// constants, special registers and the recorded ranges of registers (`None`: unknown;
    /// `i64::MAX`: no known upper bound). Index arithmetic never wraps (the index width is
    /// chosen to hold every index), so the bounds of sums and products are those of
    /// integers.
    pub fn range(&self, e: &Expr) -> Option<(i64, i64)> {
        Some(match e {
            Expr::Const(_) => as_int(e).map(|n| (n, n))?,
            Expr::Var(v) => *self.ranges.get(v)?,
            Expr::Special(_) => (0, i64::MAX),
            Expr::Cast(Ty::I32 | Ty::I64, x) => self.range(x)?,
            Expr::Binary(op, a, b) => {
                let (al, ah) = self.range(a)?;
                let (bl, bh) = self.range(b)?;
                match op {
                    BinOp::Add => (al.saturating_add(bl), ah.saturating_add(bh)),
                    BinOp::Sub => (al.saturating_sub(bh), ah.saturating_sub(bl)),
                    BinOp::Mul if al >= 0 && bl >= 0 => {
                        (al.saturating_mul(bl), ah.saturating_mul(bh))
                    }
                    BinOp::Div if al >= 0 && bl > 0 => (al / bh, ah / bl),
                    BinOp::Rem if al >= 0 && bl > 0 => {
                        if ah < bl {
                            (al, ah)
                        } else {
                            (0, bh - 1)
                        }
                    }
                    BinOp::Min => (al.min(bl), ah.min(bh)),
                    BinOp::Max => (al.max(bl), ah.max(bh)),
                    _ => return None,
                }
            }
            _ => return None,
        })
    }

    /// Splits a flat row-major index over `dims` into one index per dim.
    pub fn delinearize(&mut self, out: &mut Vec<Stmt>, flat: Expr, dims: &[Dim]) -> Vec<Expr> {
        let outermost = dims.iter().position(|d| *d != Dim::Const(1));
        let mut idx = vec![self.ix(0); dims.len()];
        let mut rest = flat;
        for d in (0..dims.len()).rev() {
            if dims[d] == Dim::Const(1) {
                continue;
            }
            if Some(d) == outermost {
                idx[d] = rest.clone();
                break;
            }
            let size = self.dim(&dims[d]);
            let ity = self.index_ty;
            idx[d] = self.bind(out, "i", ity, rem(rest.clone(), size.clone()));
            rest = self.bind(out, "r", ity, div(rest, size));
        }
        idx
    }

    /// The row-major offset of `idx` in a tensor of `dims`.
    pub fn linear(&mut self, dims: &[Dim], idx: &[Expr]) -> Expr {
        let mut acc = self.ix(0);
        for (d, i) in dims.iter().zip(idx) {
            if *d == Dim::Const(1) {
                continue;
            }
            let size = self.dim(d);
            acc = add(mul(acc, size), i.clone());
        }
        acc
    }

    /// Stores `values` (lanes along the last axis) into the buffer of `v` at `idx`.
    pub fn store(&mut self, out: &mut Vec<Stmt>, v: Value, idx: &[Expr], values: Vec<Expr>) {
        let buf = self.buffer(v, Access::Write);
        let shape = self.g.shape(v);
        let lin = self.linear(shape, idx);
        let size = self.g.ty(v).dtype.size_bytes();
        let lanes = values.len();
        let chunk = vector_chunk(lanes, size);
        for (c, part) in values.chunks(chunk).enumerate() {
            let at = add(lin.clone(), self.ix((c * chunk) as i64));
            if part.len() == 1 {
                out.push(Stmt::Store {
                    buf,
                    index: at,
                    value: part[0].clone(),
                });
            } else {
                out.push(Stmt::StoreVec {
                    buf,
                    index: at,
                    values: part.to_vec(),
                });
            }
        }
    }

    /// The finished kernel and what each of its parameters is bound to.
    pub fn finish(
        self,
        name: String,
        block_dim: u32,
        grid: [SizeExpr; 3],
        body: Vec<Stmt>,
    ) -> (Kernel, Vec<ParamArg>, BTreeSet<Value>) {
        let kernel = Kernel {
            name,
            params: self.params,
            block_dim,
            blocks_per_sm: self.blocks_per_sm,
            grid,
            shared: self.shared,
            vars: self.vars,
            body,
        };
        (kernel, self.args, self.fused)
    }

    // ---- element expressions ------------------------------------------------------------

    /// The compute type of a value's elements.
    pub fn cty(&self, v: Value) -> Ty {
        Ty::compute_type_of(self.g.ty(v).dtype)
    }

    fn var_name(&self, v: Value) -> String {
        match self.g.name(v) {
            Some(n) => sanitize(n),
            None => "t".to_string(),
        }
    }

    /// Whether `v` is read from its buffer (not computed by the kernel being built).
    pub(crate) fn is_loaded(&self, v: Value) -> bool {
        self.local.contains_key(&v)
            || !self.owned.contains(&v)
                && (self.g.is_source(v) || self.g.is_heavy(v) || self.stored[v.0 as usize])
    }

    /// `lanes` consecutive elements of `v` from `idx` along the last axis.
    pub fn elem(
        &mut self,
        out: &mut Vec<Stmt>,
        v: Value,
        idx: &[Expr],
        lanes: usize,
    ) -> EResult<Vec<Expr>> {
        let shape = self.g.shape(v);
        if idx.len() != shape.len() {
            return Err(self.internal(v, "index rank differs from the value's rank"));
        }
        if lanes > 1 {
            let divisible =
                matches!(shape.last(), Some(Dim::Const(n)) if (*n as usize).is_multiple_of(lanes));
            if shape.is_empty() || shape.last() == Some(&Dim::Const(1)) {
                let one = self.elem(out, v, idx, 1)?;
                return Ok(vec![one[0].clone(); lanes]);
            }
            if !divisible {
                return self.per_lane(out, v, idx, lanes);
            }
        }
        if let Some(row) = self.rows.iter().find(|r| r.value == v).cloned() {
            if lanes > 1 {
                return self.per_lane(out, v, idx, lanes);
            }
            return Ok(vec![self.held_element(out, &row, &idx[row.axis])]);
        }
        if self.bindings.iter().any(|b| b.value == v) {
            if lanes > 1 {
                return self.per_lane(out, v, idx, lanes);
            }
            // A value may be bound at several indices (the lanes of a matmul epilogue).
            if let Some(b) = self
                .bindings
                .iter()
                .find(|b| b.value == v && b.index.as_slice() == idx)
            {
                return Ok(vec![b.expr.clone()]);
            }
            return Err(EmitError::NotFusable(v));
        }
        let key = memo_key(v, idx, lanes);
        if let Some(hit) = self.memo.iter().rev().find_map(|m| m.get(&key)) {
            return Ok(hit.clone());
        }
        let sourced = self.sourced.get(&v).copied();
        let result = if let Some(s) = sourced.filter(|_| !self.owned.contains(&v)) {
            self.split_sum_element(out, v, idx, lanes, s)?
        } else if self.is_loaded(v) {
            self.load(out, v, idx, lanes)
        } else {
            if self.g.is_heavy(v) || self.g.is_source(v) {
                return Err(
                    self.internal(v, "a reduction or matmul result read outside its kernel")
                );
            }
            self.fused.insert(v);
            self.compute(out, v, idx, lanes)?
        };
        self.memo
            .last_mut()
            .expect("a scope")
            .insert(key, result.clone());
        Ok(result)
    }

    /// `lanes` elements of `v`, a value split-K GEMM group `split_sums[s]` stores, from
    /// its partial sums: each matmul's sum in split order (what the group's sum kernel adds),
    /// then every value the group stores as that kernel computes it (its epilogue inline,
    /// nothing reused from this kernel's other expressions). Each is stored to its buffer
    /// and, unless its dtype is its compute type, read back, so that this kernel sees the
    /// stored bits; the others are remembered for their later reads at this index.
    fn split_sum_element(
        &mut self,
        out: &mut Vec<Stmt>,
        v: Value,
        idx: &[Expr],
        lanes: usize,
        s: usize,
    ) -> EResult<Vec<Expr>> {
        let src = self.split_sums[s].clone();
        let ity = self.index_ty;
        let shape = self.g.shape(src.matmuls[0]);
        let values: Vec<Value> = self
            .sourced
            .iter()
            .filter(|(_, &i)| i == s)
            .map(|(u, _)| *u)
            .collect();
        if values.iter().any(|u| self.g.shape(*u) != shape) {
            return Err(self.internal(v, "a split-K sum read at another shape"));
        }
        let (total, lin) = match src.segment {
            Some((row_len, first_col)) => {
                // `[splits, M, row_len]`: the matmul's columns from `first_col` of each row.
                let rows = self.numel(&shape[..shape.len() - 1]);
                let total = mul(rows, self.ix(row_len as i64));
                let row = self.linear(&shape[..shape.len() - 1], &idx[..idx.len() - 1]);
                let lin = add(
                    mul(row, self.ix(row_len as i64)),
                    add(self.ix(first_col as i64), idx[idx.len() - 1].clone()),
                );
                (total, lin)
            }
            None => (self.numel(shape), self.linear(shape, idx)),
        };
        let total = self.bind(out, "total", ity, total);
        let lin = self.bind(out, "at", ity, lin);
        let last = idx.len() - 1;
        let mut bound = Vec::new();
        for (i, &m) in src.matmuls.iter().enumerate() {
            let first = add(
                lin.clone(),
                mul(self.ix(i as i64 * i64::from(src.splits)), total.clone()),
            );
            let sums = self.sum_splits(out, src.workspace, first, &total, src.splits, lanes);
            for (c, sum) in sums.into_iter().enumerate() {
                let mut index = idx.to_vec();
                index[last] = add(idx[last].clone(), self.ix(c as i64));
                bound.push(Binding {
                    value: m,
                    index,
                    expr: Expr::Var(sum),
                });
            }
        }
        let owned = std::mem::replace(&mut self.owned, src.owned.clone());
        let memo = std::mem::replace(&mut self.memo, vec![BTreeMap::new()]);
        let held = self.bindings.len();
        self.bindings.extend(bound);
        let mut computed = Vec::with_capacity(values.len());
        for &u in &values {
            let vals = match src.matmuls.iter().position(|&m| m == u) {
                Some(i) => Ok(self.bindings[held + i * lanes..held + (i + 1) * lanes]
                    .iter()
                    .map(|b| b.expr.clone())
                    .collect()),
                None => self.elem(out, u, idx, lanes),
            };
            computed.push(vals);
        }
        self.bindings.truncate(held);
        self.memo = memo;
        self.owned = owned;
        let mut result = Vec::new();
        for (u, vals) in values.into_iter().zip(computed) {
            let vals = vals?;
            self.store(out, u, idx, vals.clone());
            let exact = matches!(self.g.ty(u).dtype, DType::F32 | DType::I32 | DType::I64);
            let read = if exact {
                vals
            } else {
                self.load(out, u, idx, lanes)
            };
            if u == v {
                result = read;
            } else {
                self.memo
                    .last_mut()
                    .expect("a scope")
                    .insert(memo_key(u, idx, lanes), read);
            }
        }
        Ok(result)
    }

    /// The f32 sums of `lanes` consecutive elements of the workspace's `splits` partial
    /// sums at `first`, `first + stride`, ..., each added in split order (16-byte vector
    /// loads where the lanes allow).
    fn sum_splits(
        &mut self,
        out: &mut Vec<Stmt>,
        workspace: Buf,
        first: Expr,
        stride: &Expr,
        splits: u32,
        lanes: usize,
    ) -> Vec<VarId> {
        let sums: Vec<VarId> = (0..lanes).map(|_| self.var("sum", Ty::F32)).collect();
        let chunk = vector_chunk(lanes, 4);
        for s in 0..i64::from(splits) {
            let base = add(first.clone(), mul(self.ix(s), stride.clone()));
            let dsts: Vec<VarId> = if s == 0 {
                sums.clone()
            } else {
                (0..lanes).map(|_| self.var("part", Ty::F32)).collect()
            };
            for c in (0..lanes).step_by(chunk) {
                let at = add(base.clone(), self.ix(c as i64));
                if chunk == 1 {
                    out.push(Stmt::Assign(dsts[c], Expr::load(workspace, at)));
                } else {
                    out.push(Stmt::LoadVec {
                        dsts: dsts[c..c + chunk].to_vec(),
                        buf: workspace,
                        index: at,
                    });
                }
            }
            if s > 0 {
                for (sum, part) in sums.iter().zip(&dsts) {
                    out.push(Stmt::assign(*sum, Expr::var(*sum) + Expr::var(*part)));
                }
            }
        }
        sums
    }

    /// Element `at` of the thread's line of a held row: its register when `at` is known,
    /// else a chain of selects over the registers.
    fn held_element(&mut self, out: &mut Vec<Stmt>, row: &HeldRow, at: &Expr) -> Expr {
        let len = row.regs.len() as i64;
        if !row.at.is_empty() {
            let ity = self.index_ty;
            let at = self.bind(out, "at", ity, at.clone());
            let mut e = row.regs[row.regs.len() - 1].clone();
            for (j, position) in row.at.iter().enumerate().rev().skip(1) {
                let here = bin(BinOp::Eq, at.clone(), position.clone());
                e = Expr::Select(Box::new(here), Box::new(row.regs[j].clone()), Box::new(e));
            }
            let ty = self.cty(row.value);
            return self.bind(out, "held", ty, e);
        }
        match self.range(at) {
            Some((lo, hi)) if lo == hi && (0..len).contains(&lo) => row.regs[lo as usize].clone(),
            _ => {
                let ity = self.index_ty;
                let at = self.bind(out, "at", ity, at.clone());
                let mut e = row.regs[row.regs.len() - 1].clone();
                for j in (0..row.regs.len() - 1).rev() {
                    let here = bin(BinOp::Eq, at.clone(), self.ix(j as i64));
                    e = Expr::Select(Box::new(here), Box::new(row.regs[j].clone()), Box::new(e));
                }
                let ty = self.cty(row.value);
                self.bind(out, "held", ty, e)
            }
        }
    }

    fn per_lane(
        &mut self,
        out: &mut Vec<Stmt>,
        v: Value,
        idx: &[Expr],
        lanes: usize,
    ) -> EResult<Vec<Expr>> {
        let mut vals = Vec::with_capacity(lanes);
        for k in 0..lanes {
            let mut at = idx.to_vec();
            let last = at.len() - 1;
            at[last] = add(at[last].clone(), self.ix(k as i64));
            vals.push(self.elem(out, v, &at, 1)?.remove(0));
        }
        Ok(vals)
    }

    /// The offset of element `idx` (an index of the whole value) in `v`'s shared array.
    pub fn local_offset(&mut self, v: Value, idx: &[Expr]) -> Expr {
        let l = self.local[&v].clone();
        let idx = if l.batched { &idx[1..] } else { idx };
        let mut acc = self.ix(0);
        let last = l.dims.len().saturating_sub(1);
        for (k, (d, i)) in l.dims.iter().zip(idx).enumerate() {
            if *d == Dim::Const(1) {
                continue;
            }
            let size = if k == last && l.pad > 0 {
                let d = self.dim(d);
                add(d, self.ix(l.pad as i64))
            } else {
                self.dim(d)
            };
            acc = add(mul(acc, size), i.clone());
        }
        acc
    }

    fn load(&mut self, out: &mut Vec<Stmt>, v: Value, idx: &[Expr], lanes: usize) -> Vec<Expr> {
        if let Some(buf) = self.local.get(&v).map(|l| l.buf) {
            let name = self.var_name(v);
            let ty = self.cty(v);
            return (0..lanes)
                .map(|k| {
                    let mut at = idx.to_vec();
                    if k > 0 {
                        let last = at.len() - 1;
                        at[last] = add(at[last].clone(), self.ix(k as i64));
                    }
                    let index = self.local_offset(v, &at);
                    let e = Expr::Load {
                        buf,
                        index: Box::new(index),
                    };
                    self.bind(out, &name, ty, e)
                })
                .collect();
        }
        let buf = self.buffer(v, Access::Read);
        let shape = self.g.shape(v);
        let lin = self.linear(shape, idx);
        let ty = self.cty(v);
        let name = self.var_name(v);
        let chunk = vector_chunk(lanes, self.g.ty(v).dtype.size_bytes());
        let mut vals = Vec::with_capacity(lanes);
        for c in 0..lanes / chunk {
            let at = add(lin.clone(), self.ix((c * chunk) as i64));
            if chunk == 1 {
                let e = Expr::Load {
                    buf,
                    index: Box::new(at),
                };
                vals.push(self.bind(out, &name, ty, e));
            } else {
                let dsts: Vec<VarId> = (0..chunk).map(|_| self.var(&name, ty)).collect();
                vals.extend(dsts.iter().map(|d| Expr::Var(*d)));
                out.push(Stmt::LoadVec {
                    dsts,
                    buf,
                    index: at,
                });
            }
        }
        vals
    }

    /// The index of operand `x` (numpy-broadcast to `out_shape`) for output index `idx`,
    /// and whether the lanes of the last axis pass through (the last axis not broadcast).
    fn broadcast_index(&self, x: Value, out_shape: &[Dim], idx: &[Expr]) -> (Vec<Expr>, bool) {
        let xs = self.g.shape(x);
        let pad = out_shape.len() - xs.len();
        let mut xi = Vec::with_capacity(xs.len());
        for (d, xd) in xs.iter().enumerate() {
            if *xd == Dim::Const(1) && out_shape[d + pad] != Dim::Const(1) {
                xi.push(self.ix(0));
            } else {
                xi.push(idx[d + pad].clone());
            }
        }
        let passes = !xs.is_empty() && *xs.last().expect("rank >= 1") != Dim::Const(1);
        (xi, passes)
    }

    /// Operand `x` of an element-wise op with result shape `out_shape`, at `lanes` lanes.
    fn operand(
        &mut self,
        out: &mut Vec<Stmt>,
        x: Value,
        out_shape: &[Dim],
        idx: &[Expr],
        lanes: usize,
    ) -> EResult<Vec<Expr>> {
        let (xi, passes) = self.broadcast_index(x, out_shape, idx);
        if lanes > 1 && !passes {
            let one = self.elem(out, x, &xi, 1)?;
            return Ok(vec![one[0].clone(); lanes]);
        }
        self.elem(out, x, &xi, lanes)
    }

    /// Whether `v` costs about a load: loaded, or a movement, cast or sign op over something
    /// that does (within `depth` ops). Concat evaluates cheap pieces without branches.
    fn is_cheap(&self, v: Value, depth: u32) -> bool {
        if self.is_loaded(v) {
            return true;
        }
        if depth == 0 || self.g.is_heavy(v) || self.g.is_source(v) {
            return false;
        }
        let Some(inst) = self.g.inst(v) else {
            return false;
        };
        let movement = matches!(
            inst.op,
            Op::Reshape { .. }
                | Op::Permute { .. }
                | Op::BroadcastTo { .. }
                | Op::Slice { .. }
                | Op::Cast { .. }
                | Op::Unary(UnaryOp::Neg | UnaryOp::Abs)
        );
        movement && inst.operands.iter().all(|o| self.is_cheap(*o, depth - 1))
    }

    /// Concat of cheap pieces: every piece is read at an index clamped into it (so every read
    /// is in bounds) and each element selects the piece it comes from, without branches.
    #[allow(clippy::too_many_arguments)]
    fn concat_by_select(
        &mut self,
        out: &mut Vec<Stmt>,
        idx: &[Expr],
        axis: usize,
        ops: &[Value],
        sizes: &[u64],
        lanes: usize,
        ty: Ty,
        name: &str,
    ) -> EResult<Vec<Expr>> {
        let step = if axis == idx.len() - 1 {
            lanes as i64
        } else {
            1
        };
        let ity = self.index_ty;
        let mut pieces = Vec::new();
        let mut offset = 0i64;
        for (o, size) in ops.iter().zip(sizes) {
            let local = sub(idx[axis].clone(), self.ix(offset));
            let clamped = min_e(max_e(local, self.ix(0)), self.ix(*size as i64 - step));
            let mut xi = idx.to_vec();
            xi[axis] = self.bind(out, "c", ity, clamped);
            offset += *size as i64;
            pieces.push((offset, self.elem(out, *o, &xi, lanes)?));
        }
        let mut vals = Vec::with_capacity(lanes);
        for k in 0..lanes {
            let (_, last) = pieces.last().expect("concat has operands");
            let mut e = last[k].clone();
            for (end, piece) in pieces.iter().rev().skip(1) {
                let cond = lt(idx[axis].clone(), self.ix(*end));
                e = Expr::Select(Box::new(cond), Box::new(piece[k].clone()), Box::new(e));
            }
            vals.push(self.bind(out, name, ty, e));
        }
        Ok(vals)
    }

    pub(crate) fn compute(
        &mut self,
        out: &mut Vec<Stmt>,
        v: Value,
        idx: &[Expr],
        lanes: usize,
    ) -> EResult<Vec<Expr>> {
        let inst = self
            .g
            .inst(v)
            .expect("an element-wise value has an instruction");
        let shape = self.g.shape(v);
        let dtype = self.g.ty(v).dtype;
        let ty = self.cty(v);
        let name = self.var_name(v);
        let ops = &inst.operands;
        Ok(match &inst.op {
            Op::Full { value, dtype, .. } => vec![Expr::Const(full_const(*dtype, *value)); lanes],
            Op::Arange { .. } => {
                let mut vals = Vec::with_capacity(lanes);
                for k in 0..lanes {
                    let i = add(idx[0].clone(), self.ix(k as i64));
                    let e = if ty == self.index_ty {
                        i
                    } else {
                        Expr::Cast(ty, Box::new(i))
                    };
                    vals.push(self.bind(out, &name, ty, e));
                }
                vals
            }
            Op::Unary(u) => {
                let a = self.operand(out, ops[0], shape, idx, lanes)?;
                let mut vals = Vec::with_capacity(lanes);
                for x in a {
                    let e = unary_expr(*u, ty, x);
                    vals.push(self.bind_value(out, &name, ty, e));
                }
                vals
            }
            Op::Binary(b) => {
                let a = self.operand(out, ops[0], shape, idx, lanes)?;
                let c = self.operand(out, ops[1], shape, idx, lanes)?;
                let operand_dtype = self.g.ty(ops[0]).dtype;
                let mut vals = Vec::with_capacity(lanes);
                for (x, y) in a.into_iter().zip(c) {
                    let e = self.binary_expr(out, *b, operand_dtype, x, y);
                    vals.push(self.bind_value(out, &name, ty, e));
                }
                vals
            }
            Op::Select => {
                let c = self.operand(out, ops[0], shape, idx, lanes)?;
                let a = self.operand(out, ops[1], shape, idx, lanes)?;
                let b = self.operand(out, ops[2], shape, idx, lanes)?;
                let mut vals = Vec::with_capacity(lanes);
                for ((c, a), b) in c.into_iter().zip(a).zip(b) {
                    let e = Expr::Select(Box::new(c), Box::new(a), Box::new(b));
                    vals.push(self.bind_value(out, &name, ty, e));
                }
                vals
            }
            Op::Cast { to } => {
                let from = self.g.ty(ops[0]).dtype;
                let a = self.operand(out, ops[0], shape, idx, lanes)?;
                let mut vals = Vec::with_capacity(lanes);
                for x in a {
                    let e = cast_expr(from, *to, x);
                    vals.push(self.bind_value(out, &name, ty, e));
                }
                vals
            }
            Op::BroadcastTo { .. } => self.operand(out, ops[0], shape, idx, lanes)?,
            Op::Reshape { .. } => {
                let in_shape = self.g.shape(ops[0]);
                let (xi, passes) = self.reshape_index(out, in_shape, shape, idx, lanes);
                if lanes > 1 && !passes {
                    return self.per_lane(out, v, idx, lanes);
                }
                self.elem(out, ops[0], &xi, lanes)?
            }
            Op::Permute { perm } => {
                let rank = perm.len();
                if lanes > 1 && perm[rank - 1] != rank - 1 {
                    return self.per_lane(out, v, idx, lanes);
                }
                let mut xi = vec![self.ix(0); rank];
                for (i, &p) in perm.iter().enumerate() {
                    xi[p] = idx[i].clone();
                }
                self.elem(out, ops[0], &xi, lanes)?
            }
            Op::Slice {
                axis, start, step, ..
            } => {
                let last = shape.len() - 1;
                if lanes > 1
                    && *axis == last
                    && !(*step == 1 && (*start as usize).is_multiple_of(lanes))
                {
                    return self.per_lane(out, v, idx, lanes);
                }
                let mut xi = idx.to_vec();
                let s = self.ix(*start as i64);
                let st = self.ix(*step as i64);
                xi[*axis] = add(s, mul(idx[*axis].clone(), st));
                self.elem(out, ops[0], &xi, lanes)?
            }
            Op::Concat { axis } => {
                let last = shape.len() - 1;
                let sizes: Vec<u64> = ops
                    .iter()
                    .map(|o| self.g.shape(*o)[*axis].as_const().unwrap_or(0))
                    .collect();
                if lanes > 1
                    && *axis == last
                    && sizes.iter().any(|s| !(*s as usize).is_multiple_of(lanes))
                {
                    return self.per_lane(out, v, idx, lanes);
                }
                // An index known to lie in one piece reads that piece only. Pieces along the
                // last axis hold whole vectors here (sizes divisible by `lanes`) and the index
                // is a multiple of `lanes`, so a first lane inside a piece keeps all inside.
                let all_const = ops
                    .iter()
                    .all(|o| self.g.shape(*o)[*axis].as_const().is_some());
                if let Some((lo, hi)) = self.range(&idx[*axis]).filter(|_| all_const) {
                    let mut offset = 0i64;
                    for (o, size) in ops.iter().zip(&sizes) {
                        let end = offset + *size as i64;
                        if lo >= offset && hi < end {
                            let mut xi = idx.to_vec();
                            xi[*axis] = shift(idx[*axis].clone(), -offset, self.index_ty);
                            return self.elem(out, *o, &xi, lanes);
                        }
                        offset = end;
                    }
                }
                if ops.iter().all(|o| self.is_cheap(*o, 4)) {
                    return self.concat_by_select(out, idx, *axis, ops, &sizes, lanes, ty, &name);
                }
                // One branch per piece, so each element reads only the piece it comes from;
                // what a branch computes stays inside it.
                let vals: Vec<VarId> = (0..lanes).map(|_| self.var(&name, ty)).collect();
                let mut offset = 0i64;
                let mut branches = Vec::new();
                for (o, size) in ops.iter().zip(&sizes) {
                    let mut xi = idx.to_vec();
                    xi[*axis] = sub(idx[*axis].clone(), self.ix(offset));
                    let mut stmts = Vec::new();
                    self.push_scope();
                    let piece = self.elem(&mut stmts, *o, &xi, lanes)?;
                    self.pop_scope();
                    for (dst, x) in vals.iter().zip(piece) {
                        stmts.push(Stmt::Assign(*dst, x));
                    }
                    offset += *size as i64;
                    branches.push((offset, stmts));
                }
                let (_, mut nested) = branches.pop().expect("concat has operands");
                while let Some((end, stmts)) = branches.pop() {
                    nested = vec![Stmt::If {
                        cond: lt(idx[*axis].clone(), self.ix(end)),
                        then: stmts,
                        otherwise: nested,
                    }];
                }
                out.extend(nested);
                vals.into_iter().map(Expr::Var).collect()
            }
            Op::Gather { axis } => {
                let (table, indices) = (ops[0], ops[1]);
                let table_shape = self.g.shape(table);
                let ir = self.g.shape(indices).len();
                let last = shape.len() - 1;
                if lanes > 1 && *axis + ir > last {
                    return self.per_lane(out, v, idx, lanes);
                }
                let at = self
                    .elem(out, indices, &idx[*axis..*axis + ir], 1)?
                    .remove(0);
                let ity = self.index_ty;
                let at = if self.cty(indices) == ity {
                    at
                } else {
                    Expr::Cast(ity, Box::new(at))
                };
                let len = self.dim(&table_shape[*axis]);
                let clamped = min_e(max_e(at, self.ix(0)), sub(len, self.ix(1)));
                let row = self.bind(out, "row", ity, clamped);
                let mut xi = idx[..*axis].to_vec();
                xi.push(row);
                xi.extend_from_slice(&idx[*axis + ir..]);
                self.elem(out, table, &xi, lanes)?
            }
            other => {
                return Err(EmitError::Fatal(FusionError::Unsupported {
                    function: self.g.func.name.clone(),
                    value: v,
                    op: other.name().to_string(),
                    reason: format!("cannot be computed element-wise in a kernel ({dtype})"),
                }))
            }
        })
    }

    /// Maps an index of a reshape's result to an index of its operand, dim group by dim
    /// group; the second result says whether lanes along the last axis stay contiguous.
    fn reshape_index(
        &mut self,
        out: &mut Vec<Stmt>,
        in_dims: &[Dim],
        out_dims: &[Dim],
        idx: &[Expr],
        lanes: usize,
    ) -> (Vec<Expr>, bool) {
        let mut xi = vec![self.ix(0); in_dims.len()];
        let ins: Vec<usize> = (0..in_dims.len())
            .filter(|&i| in_dims[i] != Dim::Const(1))
            .collect();
        let outs: Vec<usize> = (0..out_dims.len())
            .filter(|&i| out_dims[i] != Dim::Const(1))
            .collect();
        let groups = match group_dims(in_dims, &ins, out_dims, &outs) {
            Some(g) => g,
            None => vec![(ins.clone(), outs.clone())],
        };
        for (gi, go) in groups {
            if gi.len() == 1 && go.len() == 1 {
                xi[gi[0]] = idx[go[0]].clone();
                continue;
            }
            let o_dims: Vec<Dim> = go.iter().map(|&j| out_dims[j].clone()).collect();
            let o_idx: Vec<Expr> = go.iter().map(|&j| idx[j].clone()).collect();
            let flat = self.linear(&o_dims, &o_idx);
            let ity = self.index_ty;
            let flat = self.bind(out, "f", ity, flat);
            let i_dims: Vec<Dim> = gi.iter().map(|&i| in_dims[i].clone()).collect();
            let parts = self.delinearize(out, flat, &i_dims);
            for (k, &i) in gi.iter().enumerate() {
                xi[i] = parts[k].clone();
            }
        }
        let divisible = |d: Option<&Dim>| matches!(d, Some(Dim::Const(n)) if (*n as usize).is_multiple_of(lanes));
        let passes = divisible(in_dims.last()) && divisible(out_dims.last());
        (xi, passes)
    }

    fn binary_expr(
        &mut self,
        out: &mut Vec<Stmt>,
        op: BinaryOp,
        dtype: DType,
        a: Expr,
        b: Expr,
    ) -> Expr {
        let ty = Ty::compute_type_of(dtype);
        let bin = |o: BinOp, x: Expr, y: Expr| Expr::Binary(o, Box::new(x), Box::new(y));
        if dtype == DType::Bool {
            return match op {
                BinaryOp::Eq => Expr::Unary(UnOp::Not, Box::new(bin(BinOp::Xor, a, b))),
                BinaryOp::Ne => bin(BinOp::Xor, a, b),
                BinaryOp::And => bin(BinOp::And, a, b),
                _ => bin(BinOp::Or, a, b),
            };
        }
        let simple = match op {
            BinaryOp::Add => Some(BinOp::Add),
            BinaryOp::Sub => Some(BinOp::Sub),
            BinaryOp::Mul => Some(BinOp::Mul),
            BinaryOp::Pow => Some(BinOp::Pow),
            BinaryOp::Max => Some(BinOp::Max),
            BinaryOp::Min => Some(BinOp::Min),
            BinaryOp::Eq => Some(BinOp::Eq),
            BinaryOp::Ne => Some(BinOp::Ne),
            BinaryOp::Lt => Some(BinOp::Lt),
            BinaryOp::Le => Some(BinOp::Le),
            BinaryOp::Gt => Some(BinOp::Gt),
            BinaryOp::Ge => Some(BinOp::Ge),
            BinaryOp::And => Some(BinOp::And),
            BinaryOp::Or => Some(BinOp::Or),
            BinaryOp::Div if ty == Ty::F32 => Some(BinOp::Div),
            _ => None,
        };
        if let Some(o) = simple {
            return bin(o, a, b);
        }
        // Floored division and remainder (the graph IR's) from truncating ones.
        let zero = Expr::Const(zero_of(ty));
        let r = self.bind(out, "rem", ty, bin(BinOp::Rem, a.clone(), b.clone()));
        let adjust = bin(
            BinOp::And,
            bin(BinOp::Ne, r.clone(), zero.clone()),
            bin(
                BinOp::Ne,
                bin(BinOp::Lt, r.clone(), zero.clone()),
                bin(BinOp::Lt, b.clone(), zero),
            ),
        );
        match op {
            BinaryOp::Rem => Expr::Select(
                Box::new(adjust),
                Box::new(bin(BinOp::Add, r.clone(), b)),
                Box::new(r),
            ),
            _ => {
                let q = self.bind(out, "quot", ty, bin(BinOp::Div, a, b));
                let one = Expr::Const(one_of(ty));
                Expr::Select(
                    Box::new(adjust),
                    Box::new(bin(BinOp::Sub, q.clone(), one)),
                    Box::new(q),
                )
            }
        }
    }
}

/// Splits the non-unit dims of a reshape's operand and result into groups of equal size
/// (a symbolic dim only matches itself); `None` when they do not line up.
fn group_dims(
    in_dims: &[Dim],
    ins: &[usize],
    out_dims: &[Dim],
    outs: &[usize],
) -> Option<Vec<(Vec<usize>, Vec<usize>)>> {
    let mut groups = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < ins.len() && j < outs.len() {
        let (a, b) = (&in_dims[ins[i]], &out_dims[outs[j]]);
        if let (Dim::Sym(x), Dim::Sym(y)) = (a, b) {
            if x != y {
                return None;
            }
            groups.push((vec![ins[i]], vec![outs[j]]));
            i += 1;
            j += 1;
            continue;
        }
        let (mut pa, mut pb) = (a.as_const()?, b.as_const()?);
        let (mut gi, mut go) = (vec![ins[i]], vec![outs[j]]);
        i += 1;
        j += 1;
        while pa != pb {
            if pa < pb {
                pa *= in_dims.get(*ins.get(i)?)?.as_const()?;
                gi.push(ins[i]);
                i += 1;
            } else {
                pb *= out_dims.get(*outs.get(j)?)?.as_const()?;
                go.push(outs[j]);
                j += 1;
            }
        }
        groups.push((gi, go));
    }
    (i == ins.len() && j == outs.len()).then_some(groups)
}

/// The memo key of `lanes` elements of `v` from `idx` (each index in its canonical affine
/// form).
fn memo_key(v: Value, idx: &[Expr], lanes: usize) -> String {
    format!(
        "{}|{lanes}|{}",
        v.0,
        idx.iter().map(affine_key).collect::<Vec<_>>().join(",")
    )
}

/// How many lanes one vector access moves: at most 16 bytes, 2/4/8 elements, or 1.
pub(crate) fn vector_chunk(lanes: usize, elem_bytes: usize) -> usize {
    let mut chunk = lanes.min(16 / elem_bytes.max(1)).min(8);
    while chunk > 1 && !lanes.is_multiple_of(chunk) {
        chunk /= 2;
    }
    chunk.max(1)
}

pub(crate) fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// `e` with its comparisons, logical ops, selects and integer casts of constants replaced
/// by their values (exact in every backend's semantics; arithmetic is left alone). A
/// template that holds a row in registers reads it at constant positions, and masks such
/// as `arange(K) == r` then cost nothing.
pub(crate) fn fold_const(e: Expr) -> Expr {
    match e {
        Expr::Select(c, a, b) => match fold_const(*c) {
            Expr::Const(Const::Pred(true)) => fold_const(*a),
            Expr::Const(Const::Pred(false)) => fold_const(*b),
            c => Expr::Select(
                Box::new(c),
                Box::new(fold_const(*a)),
                Box::new(fold_const(*b)),
            ),
        },
        Expr::Unary(UnOp::Not, x) => match fold_const(*x) {
            Expr::Const(Const::Pred(p)) => Expr::Const(Const::Pred(!p)),
            x => Expr::Unary(UnOp::Not, Box::new(x)),
        },
        Expr::Cast(ty, x) => {
            let x = fold_const(*x);
            let n = match x {
                Expr::Const(Const::I32(n)) => i64::from(n),
                Expr::Const(Const::I64(n)) => n,
                _ => return Expr::Cast(ty, Box::new(x)),
            };
            match ty {
                Ty::I32 => Expr::Const(Const::I32(n as i32)),
                Ty::I64 => Expr::Const(Const::I64(n)),
                Ty::F32 if n.unsigned_abs() <= 1 << 24 => Expr::Const(Const::F32(n as f32)),
                _ => Expr::Cast(ty, Box::new(x)),
            }
        }
        Expr::Binary(op, a, b) => {
            let (a, b) = (fold_const(*a), fold_const(*b));
            // `false || x`, `true && x` and the like (a logical op's other operand).
            for (c, other) in [(&a, &b), (&b, &a)] {
                match (op, c) {
                    (BinOp::Or, Expr::Const(Const::Pred(false)))
                    | (BinOp::And, Expr::Const(Const::Pred(true))) => return other.clone(),
                    (BinOp::Or, Expr::Const(Const::Pred(true)))
                    | (BinOp::And, Expr::Const(Const::Pred(false))) => return c.clone(),
                    _ => {}
                }
            }
            let (Expr::Const(x), Expr::Const(y)) = (&a, &b) else {
                return Expr::Binary(op, Box::new(a), Box::new(b));
            };
            // Comparisons and the logic of predicates, by the kernel IR's own semantics.
            let folds = op.is_comparison()
                || matches!(
                    (x, op),
                    (Const::Pred(_), BinOp::And | BinOp::Or | BinOp::Xor)
                );
            match kiln_kir::interp::binary(op, *x, *y) {
                Ok(value) if folds => Expr::Const(value),
                _ => Expr::Binary(op, Box::new(a), Box::new(b)),
            }
        }
        e => e,
    }
}

fn is_trivial(e: &Expr) -> bool {
    matches!(
        e,
        Expr::Const(_) | Expr::Var(_) | Expr::Param(_) | Expr::Special(_)
    )
}

pub(crate) fn int_const(ty: Ty, n: i64) -> Expr {
    match ty {
        Ty::I64 => Expr::Const(Const::I64(n)),
        _ => Expr::Const(Const::I32(n as i32)),
    }
}

pub(crate) fn zero_of(ty: Ty) -> Const {
    match ty {
        Ty::Pred => Const::Pred(false),
        Ty::I32 => Const::I32(0),
        Ty::I64 => Const::I64(0),
        Ty::F32 => Const::F32(0.0),
    }
}

pub(crate) fn one_of(ty: Ty) -> Const {
    match ty {
        Ty::Pred => Const::Pred(true),
        Ty::I32 => Const::I32(1),
        Ty::I64 => Const::I64(1),
        Ty::F32 => Const::F32(1.0),
    }
}

/// The constant a `full` of `dtype` holds, converted as the interpreter converts it.
pub(crate) fn full_const(dtype: DType, value: f64) -> Const {
    if dtype.is_float() {
        Const::F32(kiln_ir::tensor::round_f64(dtype, value))
    } else if dtype == DType::Bool {
        Const::Pred(value != 0.0)
    } else {
        let n = kiln_ir::tensor::float_to_int(dtype, value);
        match Ty::compute_type_of(dtype) {
            Ty::I64 => Const::I64(n),
            _ => Const::I32(n as i32),
        }
    }
}

pub(crate) fn as_int(e: &Expr) -> Option<i64> {
    match e {
        Expr::Const(Const::I32(n)) => Some(i64::from(*n)),
        Expr::Const(Const::I64(n)) => Some(*n),
        _ => None,
    }
}

fn same_kind_const(like: &Expr, n: i64) -> Expr {
    match like {
        Expr::Const(Const::I64(_)) => Expr::Const(Const::I64(n)),
        _ => Expr::Const(Const::I32(n as i32)),
    }
}

/// `e + k` for an integer expression of type `ty`, folding `k` into a constant term of `e`.
pub(crate) fn shift(e: Expr, k: i64, ty: Ty) -> Expr {
    if k == 0 {
        return e;
    }
    if let Expr::Binary(BinOp::Add, a, b) = &e {
        if let Some(c) = as_int(a) {
            return add(same_kind_const(a, c + k), (**b).clone());
        }
        if let Some(c) = as_int(b) {
            return add((**a).clone(), same_kind_const(b, c + k));
        }
    }
    match as_int(&e) {
        Some(c) => same_kind_const(&e, c + k),
        None if k > 0 => add(e, int_const(ty, k)),
        None => sub(e, int_const(ty, -k)),
    }
}

/// A canonical text of an integer index expression: sums, differences and products by
/// constants flattened into `constant + Σ coefficient·term`, terms sorted. Two indices with
/// equal keys are equal (also under wrapping arithmetic), so the memo may share them.
fn affine_key(e: &Expr) -> String {
    fn walk(e: &Expr, coef: i64, terms: &mut BTreeMap<String, i64>, c: &mut i64) {
        match e {
            Expr::Binary(BinOp::Add, a, b) => {
                walk(a, coef, terms, c);
                walk(b, coef, terms, c);
            }
            Expr::Binary(BinOp::Sub, a, b) => {
                walk(a, coef, terms, c);
                walk(b, coef.wrapping_neg(), terms, c);
            }
            Expr::Binary(BinOp::Mul, a, b) if as_int(b).is_some() => {
                walk(a, coef.wrapping_mul(as_int(b).unwrap_or(1)), terms, c);
            }
            Expr::Binary(BinOp::Mul, a, b) if as_int(a).is_some() => {
                walk(b, coef.wrapping_mul(as_int(a).unwrap_or(1)), terms, c);
            }
            _ => match as_int(e) {
                Some(n) => *c = c.wrapping_add(coef.wrapping_mul(n)),
                None => {
                    let t = terms.entry(format!("{e:?}")).or_insert(0);
                    *t = t.wrapping_add(coef);
                }
            },
        }
    }
    let mut terms = BTreeMap::new();
    let mut c = 0i64;
    walk(e, 1, &mut terms, &mut c);
    terms.retain(|_, k| *k != 0);
    format!("{c}{terms:?}")
}

/// Integer `a + b` with constants folded.
pub(crate) fn add(a: Expr, b: Expr) -> Expr {
    match (as_int(&a), as_int(&b)) {
        (Some(0), _) => b,
        (_, Some(0)) => a,
        (Some(x), Some(y)) => same_kind_const(&a, x + y),
        _ => Expr::Binary(BinOp::Add, Box::new(a), Box::new(b)),
    }
}

pub(crate) fn sub(a: Expr, b: Expr) -> Expr {
    match (as_int(&a), as_int(&b)) {
        (_, Some(0)) => a,
        (Some(x), Some(y)) => same_kind_const(&a, x - y),
        _ => Expr::Binary(BinOp::Sub, Box::new(a), Box::new(b)),
    }
}

pub(crate) fn mul(a: Expr, b: Expr) -> Expr {
    match (as_int(&a), as_int(&b)) {
        (Some(0), _) => a,
        (_, Some(0)) => b,
        (Some(1), _) => b,
        (_, Some(1)) => a,
        (Some(x), Some(y)) => same_kind_const(&a, x * y),
        _ => Expr::Binary(BinOp::Mul, Box::new(a), Box::new(b)),
    }
}

pub(crate) fn div(a: Expr, b: Expr) -> Expr {
    match (as_int(&a), as_int(&b)) {
        (_, Some(1)) => a,
        (Some(x), Some(y)) if y != 0 => same_kind_const(&a, x / y),
        _ => Expr::Binary(BinOp::Div, Box::new(a), Box::new(b)),
    }
}

pub(crate) fn rem(a: Expr, b: Expr) -> Expr {
    match (as_int(&a), as_int(&b)) {
        (_, Some(1)) => same_kind_const(&b, 0),
        (Some(x), Some(y)) if y != 0 => same_kind_const(&a, x % y),
        _ => Expr::Binary(BinOp::Rem, Box::new(a), Box::new(b)),
    }
}

pub(crate) fn min_e(a: Expr, b: Expr) -> Expr {
    match (as_int(&a), as_int(&b)) {
        (Some(x), Some(y)) => same_kind_const(&a, x.min(y)),
        _ => Expr::Binary(BinOp::Min, Box::new(a), Box::new(b)),
    }
}

pub(crate) fn max_e(a: Expr, b: Expr) -> Expr {
    match (as_int(&a), as_int(&b)) {
        (Some(x), Some(y)) => same_kind_const(&a, x.max(y)),
        _ => Expr::Binary(BinOp::Max, Box::new(a), Box::new(b)),
    }
}

pub(crate) fn lt(a: Expr, b: Expr) -> Expr {
    Expr::Binary(BinOp::Lt, Box::new(a), Box::new(b))
}

pub(crate) fn and(a: Expr, b: Expr) -> Expr {
    Expr::Binary(BinOp::And, Box::new(a), Box::new(b))
}

pub(crate) fn bin(op: BinOp, a: Expr, b: Expr) -> Expr {
    Expr::Binary(op, Box::new(a), Box::new(b))
}

fn unary_expr(u: UnaryOp, _ty: Ty, x: Expr) -> Expr {
    let op = match u {
        UnaryOp::Neg => UnOp::Neg,
        UnaryOp::Abs => UnOp::Abs,
        UnaryOp::Exp => UnOp::Exp,
        UnaryOp::Log => UnOp::Log,
        UnaryOp::Sqrt => UnOp::Sqrt,
        UnaryOp::Rsqrt => UnOp::Rsqrt,
        UnaryOp::Sin => UnOp::Sin,
        UnaryOp::Cos => UnOp::Cos,
        UnaryOp::Tanh => UnOp::Tanh,
        UnaryOp::Sigmoid => UnOp::Sigmoid,
        UnaryOp::Erf => UnOp::Erf,
        UnaryOp::Floor => UnOp::Floor,
        UnaryOp::Ceil => UnOp::Ceil,
        UnaryOp::Recip => UnOp::Recip,
        UnaryOp::Not => UnOp::Not,
    };
    Expr::Unary(op, Box::new(x))
}

/// The graph IR's `cast` between compute types (bool is `!= 0`; narrow floats stay f32).
pub(crate) fn cast_expr(from: DType, to: DType, x: Expr) -> Expr {
    let (ft, tt) = (Ty::compute_type_of(from), Ty::compute_type_of(to));
    if to == DType::Bool {
        if from == DType::Bool {
            return x;
        }
        return Expr::Binary(BinOp::Ne, Box::new(x), Box::new(Expr::Const(zero_of(ft))));
    }
    if ft == tt {
        x
    } else {
        Expr::Cast(tt, Box::new(x))
    }
}
