//! The interpreter's warpgroup matrix multiply ([`crate::wgmma`]): the product read through
//! its descriptors, and the bookkeeping of the async proxy (shared elements written without
//! a following `FenceProxyAsync` of their writer, elements a pending batch reads, and the
//! accumulator registers of batches not yet waited for, which no other statement may
//! touch).

use super::{int_value, Interpreter, Path};
use crate::error::KirError;
use crate::kernel::{Buf, Const, Expr, Stmt, VarId};
use crate::tensor::element_to_f32;
use crate::wgmma::{self, WgmmaOp, WgmmaTile, WARPGROUP};
use std::collections::{BTreeSet, VecDeque};

/// The async-proxy state of a running block.
#[derive(Default)]
pub(super) struct AsyncProxy {
    /// Per shared array and element: writes not yet followed by a fence of their writer.
    unfenced: Vec<Vec<u32>>,
    /// Per thread: the (array, element) writes it has not fenced yet.
    thread_writes: Vec<Vec<(usize, usize)>>,
    /// Per shared array and element: the pending `Mma` batches that read it.
    reads: Vec<Vec<u32>>,
    /// Per warpgroup: the open batch's reads, then the committed batches, oldest first.
    open: Vec<Vec<(usize, usize)>>,
    committed: Vec<VecDeque<Vec<(usize, usize)>>>,
    /// Per warpgroup: the accumulators of the open batch, then of each committed one.
    open_vars: Vec<Vec<VarId>>,
    committed_vars: Vec<VecDeque<Vec<VarId>>>,
}

impl AsyncProxy {
    pub(super) fn new(array_lens: &[usize], threads: usize) -> AsyncProxy {
        let groups = threads.div_ceil(WARPGROUP);
        AsyncProxy {
            unfenced: array_lens.iter().map(|&n| vec![0; n]).collect(),
            thread_writes: vec![Vec::new(); threads],
            reads: array_lens.iter().map(|&n| vec![0; n]).collect(),
            open: vec![Vec::new(); groups],
            committed: vec![VecDeque::new(); groups],
            open_vars: vec![Vec::new(); groups],
            committed_vars: vec![VecDeque::new(); groups],
        }
    }

    /// Records a generic-proxy write of `element` of `array` by `thread` (a store, or a
    /// completed copy).
    pub(super) fn written(&mut self, thread: usize, array: usize, element: usize) {
        self.unfenced[array][element] += 1;
        self.thread_writes[thread].push((array, element));
    }

    /// An error when a pending `Mma` batch reads `element` of `array`.
    pub(super) fn check_write(&self, array: usize, element: usize) -> Result<(), String> {
        if self.reads[array][element] > 0 {
            return Err(format!(
                "writes element {element} of shared array {array} while a pending wgmma reads it \
                 (before its wgmma_wait)"
            ));
        }
        Ok(())
    }
}

impl Interpreter<'_, '_> {
    pub(super) fn run_wgmma(
        &mut self,
        stmt: &Stmt,
        op: &WgmmaOp,
        mask: &[bool],
        path: &Path,
    ) -> Result<(), KirError> {
        if op.is_collective() {
            self.require_whole_warpgroups(stmt, path, mask)?;
        }
        let groups: Vec<usize> = (0..mask.len())
            .step_by(WARPGROUP)
            .filter(|&first| mask[first])
            .collect();
        match op {
            WgmmaOp::Fence => {}
            WgmmaOp::FenceProxyAsync => {
                for t in Self::active(mask) {
                    let writes = std::mem::take(&mut self.proxy.thread_writes[t]);
                    for (array, element) in writes {
                        self.proxy.unfenced[array][element] -= 1;
                    }
                }
            }
            WgmmaOp::Commit => {
                for first in groups {
                    let w = first / WARPGROUP;
                    let batch = std::mem::take(&mut self.proxy.open[w]);
                    self.proxy.committed[w].push_back(batch);
                    let vars = std::mem::take(&mut self.proxy.open_vars[w]);
                    self.proxy.committed_vars[w].push_back(vars);
                }
            }
            WgmmaOp::Wait(n) => {
                for first in groups {
                    let w = first / WARPGROUP;
                    while self.proxy.committed[w].len() > *n as usize {
                        let batch = self.proxy.committed[w].pop_front().expect("a batch");
                        self.proxy.committed_vars[w].pop_front();
                        for (array, element) in batch {
                            self.proxy.reads[array][element] -= 1;
                        }
                    }
                }
            }
            WgmmaOp::Mma {
                input,
                n,
                d,
                a,
                b,
                accumulate,
            } => {
                let n = *n as usize;
                for first in groups {
                    let fail = |this: &Self, m: String| this.error(stmt, path, Some(first), &m);
                    let (a_matrix, a_read) = self
                        .wgmma_operand(a, wgmma::M, first, *input)
                        .map_err(|m| fail(self, format!("operand a: {m}")))?;
                    let (b_matrix, b_read) = self
                        .wgmma_operand(b, n, first, *input)
                        .map_err(|m| fail(self, format!("operand b: {m}")))?;
                    let mut results = Vec::with_capacity(WARPGROUP * d.len());
                    for t in 0..WARPGROUP {
                        for (i, &var) in d.iter().enumerate() {
                            let (row, col) = wgmma::accumulator_element(t, i);
                            let mut acc = if *accumulate {
                                match self.register(first + t, var) {
                                    Const::F32(x) => x,
                                    other => {
                                        return Err(fail(
                                            self,
                                            format!("wgmma accumulator is {other:?}"),
                                        ))
                                    }
                                }
                            } else {
                                0.0
                            };
                            for k in 0..wgmma::K {
                                acc = libm::fmaf(a_matrix[row][k], b_matrix[col][k], acc);
                            }
                            results.push((first + t, var, acc));
                        }
                    }
                    for (t, var, value) in results {
                        self.set_register(t, var, Const::F32(value));
                    }
                    let w = first / WARPGROUP;
                    self.proxy.open_vars[w].extend(d.iter().copied());
                    for (array, element) in a_read.into_iter().chain(b_read) {
                        self.proxy.reads[array][element] += 1;
                        self.proxy.open[w].push((array, element));
                    }
                }
            }
        }
        Ok(())
    }

    /// An error when `stmt` (not a `Wgmma`; of a `For` or `If` only its own expressions and
    /// register) reads or writes, in an active thread, an accumulator of its warpgroup's
    /// `Mma` whose batch no `Wait` has completed.
    pub(super) fn check_accumulators(
        &self,
        stmt: &Stmt,
        mask: &[bool],
        path: &Path,
    ) -> Result<(), KirError> {
        let in_flight = |w: usize| {
            !self.proxy.open_vars[w].is_empty()
                || self.proxy.committed_vars[w].iter().any(|v| !v.is_empty())
        };
        let groups: Vec<usize> = (0..self.proxy.open_vars.len())
            .filter(|&w| in_flight(w))
            .filter(|&w| {
                mask.iter()
                    .skip(w * WARPGROUP)
                    .take(WARPGROUP)
                    .any(|&on| on)
            })
            .collect();
        if groups.is_empty() || matches!(stmt, Stmt::Wgmma(_)) {
            return Ok(());
        }
        let mut touched = BTreeSet::new();
        head_vars(stmt, &mut touched);
        for w in groups {
            let pending = self.proxy.open_vars[w]
                .iter()
                .chain(self.proxy.committed_vars[w].iter().flatten());
            for var in pending {
                if touched.contains(var) {
                    return Err(self.error(
                        stmt,
                        path,
                        Some(w * WARPGROUP),
                        &format!(
                            "touches accumulator {} of a wgmma no wgmma_wait has completed",
                            self.names.var(*var)
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// An error unless each warpgroup has all of its threads active or none.
    fn require_whole_warpgroups(
        &self,
        stmt: &Stmt,
        path: &Path,
        mask: &[bool],
    ) -> Result<(), KirError> {
        for (w, threads) in mask.chunks(WARPGROUP).enumerate() {
            let active = threads.iter().filter(|&&on| on).count();
            if active != 0 && active != WARPGROUP {
                return Err(self.error(
                    stmt,
                    path,
                    None,
                    &format!(
                        "a wgmma collective in warpgroup {w} with {active} of its threads active"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The `rows` × 16 tile `tile` of the warpgroup starting at thread `first`, read through
    /// its descriptor, and the (array, element) pairs read.
    #[allow(clippy::type_complexity)]
    fn wgmma_operand(
        &self,
        tile: &WgmmaTile,
        rows: usize,
        first: usize,
        input: crate::kernel::MmaInput,
    ) -> Result<(Vec<[f32; wgmma::K]>, Vec<(usize, usize)>), String> {
        let Buf::Shared(array) = tile.buf else {
            return Err("not a shared array".into());
        };
        let array = array as usize;
        let mut start = None;
        for t in first..first + WARPGROUP {
            let index = int_value(self.eval(&tile.index, t)?)
                .ok_or("the operand index is not an integer")?;
            match start {
                None => start = Some(index),
                Some(s) if s != index => {
                    return Err(format!(
                        "operand index {index} in thread {t} differs from {s} in thread {first} \
                         of its warpgroup"
                    ))
                }
                Some(_) => {}
            }
        }
        let start = start.expect("a warpgroup has threads");
        let size = self.shared[array].dtype.size_bytes() as i64;
        let start_byte = start * size;
        if start < 0 || start_byte % 16 != 0 || start_byte >= 1 << 18 {
            return Err(format!(
                "operand starts at byte {start_byte} (16-byte aligned, below 2^18)"
            ));
        }
        let desc = wgmma::descriptor(start_byte as u32, wgmma::LBO, tile.sbo);
        let mut matrix = vec![[0f32; wgmma::K]; rows];
        let mut read = Vec::with_capacity(rows * wgmma::K);
        for (row, values) in matrix.iter_mut().enumerate() {
            for (k, value) in values.iter_mut().enumerate() {
                let byte = wgmma::k_major_address(desc, row as u64, k as u64 * size as u64)?;
                let element = (byte / size as u64) as i64;
                let bytes = self.element_bytes(tile.buf, element)?;
                let element = element as usize;
                if self.proxy.unfenced[array][element] > 0 {
                    return Err(format!(
                        "reads element {element} of shared array `{}`, written through the \
                         generic proxy with no fence_proxy_async of its writer since",
                        self.kernel.shared[array].name
                    ));
                }
                let mut bits = 0u32;
                for (i, b) in bytes.iter().enumerate() {
                    bits |= u32::from(*b) << (8 * i);
                }
                *value = element_to_f32(input, bits);
                read.push((array, element));
            }
        }
        Ok((matrix, read))
    }
}

/// The registers `stmt` itself reads or writes (a `For`'s or `If`'s own expressions and
/// register, not its body's).
fn head_vars(stmt: &Stmt, out: &mut BTreeSet<VarId>) {
    use crate::verify::vars_read;
    let mut exprs: Vec<&Expr> = Vec::new();
    match stmt {
        Stmt::Assign(var, value) => {
            out.insert(*var);
            exprs.push(value);
        }
        Stmt::LoadVec { dsts, index, .. } | Stmt::LdMatrix { dsts, index, .. } => {
            out.extend(dsts.iter().copied());
            exprs.push(index);
        }
        Stmt::Store { index, value, .. } => exprs.extend([index, value]),
        Stmt::StoreVec { index, values, .. } => {
            exprs.push(index);
            exprs.extend(values);
        }
        Stmt::For {
            var,
            start,
            end,
            step,
            ..
        } => {
            out.insert(*var);
            exprs.extend([start, end, step]);
        }
        Stmt::If { cond, .. } => exprs.push(cond),
        Stmt::ShuffleXor { dst, src, .. } => out.extend([*dst, *src]),
        Stmt::Mma { d, a, b, c, .. } => out.extend(d.iter().chain(a).chain(b).chain(c).copied()),
        Stmt::CpAsync {
            dst_index,
            src_index,
            src_len,
            ..
        } => exprs.extend([dst_index, src_index, src_len]),
        Stmt::PackHalves { dst, lo, hi, .. } => {
            out.insert(*dst);
            exprs.extend([lo, hi]);
        }
        Stmt::PrefetchL2 { index, bytes, .. } => exprs.extend([index, bytes]),
        Stmt::AtomicAdd {
            dst, index, value, ..
        } => {
            out.insert(*dst);
            exprs.extend([index, value]);
        }
        Stmt::Barrier
        | Stmt::Fence
        | Stmt::CpAsyncCommit
        | Stmt::CpAsyncWait(_)
        | Stmt::GridDependencyWait
        | Stmt::LaunchDependents
        | Stmt::Wgmma(_) => {}
    }
    for expr in exprs {
        vars_read(expr, out);
    }
}
