//! The kernel verifier: checks every invariant the backends rely on, so that they can
//! translate a verified kernel without checking anything themselves.
//!
//! The header:
//! 1. the name is a PTX identifier: `[A-Za-z][A-Za-z0-9_$]*` or `[_$][A-Za-z0-9_$]+`
//!    (PTX also allows a leading `%`, which kiln leaves to registers);
//! 2. `block_dim` is a multiple of 32 in `32..=1024`; `blocks_per_sm` is at least 1, and
//!    that many blocks hold at most 1536 threads (what an SM of sm_89 or sm_120 holds, the
//!    fewest among kiln's targets);
//! 3. every shared array has at least one element, and together they take at most
//!    48 KiB (the static shared-memory limit of a block).
//!
//! Every expression has a type, by these rules (a `VarId` indexes [`Kernel::vars`]):
//! 4. `Var` refers to a declared register; `Param(i)` to a `Param::Scalar` (its type);
//!    `Special` is `I32`, and `BlockIdx`'s axis is 0, 1 or 2;
//! 5. `Unary`: `Neg`, `Abs` take `I32`, `I64` or `F32`; `Not` takes `Pred` or an integer;
//!    the other operators (`Exp` … `Exp2`, the roundings `RoundBf16` and `RoundF16`) take
//!    `F32`; the result has the operand's type;
//! 6. `Binary`: both operands have one type; `Add`, `Sub`, `Mul`, `Div`, `Rem`, `Min`,
//!    `Max` take `I32`, `I64` or `F32`; `Pow` takes `F32`; `And`, `Or`, `Xor` take `Pred`
//!    or integers; `Shl`, `Shr` take integers; `Eq`, `Ne` take any type and `Lt`, `Le`,
//!    `Gt`, `Ge` any but `Pred`; comparisons give `Pred`, the others the operand type;
//! 7. `Fma`: three operands of one type, `I32`, `I64` or `F32`;
//! 8. `Select`: the condition is `Pred`, both arms have one type (the result's);
//! 9. `Cast`: any type to any type;
//! 10. `Load`: the index is `I32` or `I64`; the result is the buffer's compute type
//!     ([`Ty::compute_type_of`]).
//!
//! Memory operands:
//! 11. `Buf::Global(i)` refers to a `Param::Buffer`; loads (`Load`, `LoadVec`) need `Read`
//!     or `ReadWrite` access, stores (`Store`, `StoreVec`) `Write` or `ReadWrite`;
//!     `Buf::Shared(i)` refers to a declared shared array.
//!
//! Statements:
//! 12. `Assign`: the register is declared and the value has its type;
//! 13. `LoadVec`/`StoreVec`: 2, 4 or 8 elements taking at most 16 bytes of memory, an
//!     `I32`/`I64` index; every destination register is declared, distinct and of the
//!     buffer's compute type; every stored value is of the buffer's compute type;
//! 14. `Store`: an `I32`/`I64` index and a value of the buffer's compute type;
//! 15. `For`: the loop register is declared and an integer; start, end and step have its
//!     type; a constant step is positive; the body does not write the loop register nor
//!     any register that `end` or `step` reads (so evaluating them once on entry, as the
//!     interpreter does, or on every iteration gives the same loop);
//! 16. `If`: the condition is `Pred`;
//! 17. `ShuffleXor`: both registers are declared and of one type; the mask is below 32;
//! 18. `Barrier`, `ShuffleXor`, `Mma` and `LdMatrix` appear only under block-uniform
//!     control flow, as [`uniformity`](crate::uniformity::uniformity) defines it;
//! 19. `Mma`: `a` and `b` are `I32` registers, `c` and `d` `F32`, the four `d` distinct;
//! 20. `LdMatrix`: 1, 2 or 4 distinct `I32` destinations; a shared array of 16-bit
//!     elements, or of 8-bit elements without `trans`; an `I32`/`I64` index;
//! 21. `CpAsync`: `dst` is a shared array and `src` a readable global buffer of the same
//!     dtype; both indices are `I32`/`I64`; `src_len` is `I32`.
//! 22. `PrefetchL2`: a readable global buffer, an `I32`/`I64` index, `bytes` `I32`;
//! 23. `GridDependencyWait`: at most one, at the top level of the body; every statement
//!     before it is an `Assign` whose value loads nothing, a `LoadVec` of a constant or
//!     settled buffer, a `PrefetchL2`, or an `If` / `For`, whose operands, condition or
//!     bounds load nothing but constant or settled buffers, and whose statements follow the
//!     same rule (no memory that a running kernel may write is touched before the wait).
//! 24. `Wgmma`: collectives only under block-uniform control flow in a block of whole
//!     warpgroups (`block_dim` a multiple of 128); an `Mma` of f16 or bf16 inputs, `n` a
//!     multiple of 8 in 8..=256, `n / 2` distinct `F32` registers `d`, both operands in
//!     shared arrays of the input's dtype with an `I32` index and an `sbo` that is a
//!     positive multiple of 16 below 2^18.
//!
//! Errors name the kernel and the statement (its path, e.g. `body[2].then[0]`, and its
//! first printed line).

use crate::error::KirError;
use crate::kernel::{BinOp, Buf, Expr, Kernel, Param, Special, Stmt, Ty, UnOp, VarId};
use crate::print::{binop_symbol, unop_name, Names};
use crate::uniformity::{uniformity, Uniformity};
use kiln_ir::DType;
use std::collections::BTreeSet;

/// The threads an SM holds at once on every kiln target (sm_89 and sm_120 hold 1536).
pub const MAX_THREADS_PER_SM: u64 = 1536;

/// The static shared memory a block may declare, in bytes: kernels needing more take the
/// dynamic window of [`crate::shared_layout`].
pub const MAX_SHARED_BYTES: u64 = crate::shared_layout::MAX_STATIC_SHARED_BYTES;

/// Checks every invariant listed in this module's documentation.
pub fn verify_kernel(kernel: &Kernel) -> Result<(), KirError> {
    let header_error = |message: String| KirError::new(&kernel.name, "header", message);
    if !is_ptx_identifier(&kernel.name) {
        return Err(header_error(format!(
            "the name {:?} is not a PTX identifier",
            kernel.name
        )));
    }
    if !kernel.block_dim.is_multiple_of(32) || !(32..=1024).contains(&kernel.block_dim) {
        return Err(header_error(format!(
            "block_dim {} is not a multiple of 32 in 32..=1024",
            kernel.block_dim
        )));
    }
    let resident = u64::from(kernel.block_dim) * u64::from(kernel.blocks_per_sm);
    if kernel.blocks_per_sm == 0 || resident > MAX_THREADS_PER_SM {
        return Err(header_error(format!(
            "blocks_per_sm {} of {} threads is not 1..={} threads an SM",
            kernel.blocks_per_sm, kernel.block_dim, MAX_THREADS_PER_SM
        )));
    }
    let mut shared_bytes: u64 = 0;
    for shared in &kernel.shared {
        if shared.len == 0 {
            return Err(header_error(format!(
                "shared array `{}` has no elements",
                shared.name
            )));
        }
        shared_bytes += u64::from(shared.len) * shared.dtype.size_bytes() as u64;
    }
    let max = crate::shared_layout::MAX_DYNAMIC_SHARED_BYTES;
    if shared_bytes > max {
        return Err(header_error(format!(
            "shared arrays take {shared_bytes} bytes, more than the {max} a block of any target may use"
        )));
    }
    let checker = Checker {
        kernel,
        names: Names::new(kernel),
        uniformity: uniformity(kernel),
    };
    checker.check_block(&kernel.body, "body", true)?;
    checker.check_wait_placement()
}

/// Whether `expr` reads memory that is neither [`Access::Constant`] nor [`Access::Settled`]
/// (`constant` says which buffers are either).
fn loads(expr: &Expr, constant: &dyn Fn(Buf) -> bool) -> bool {
    let loads = |e: &Expr| loads(e, constant);
    match expr {
        Expr::Const(_) | Expr::Param(_) | Expr::Special(_) | Expr::Var(_) => false,
        Expr::Unary(_, a) | Expr::Cast(_, a) => loads(a),
        Expr::Binary(_, a, b) => loads(a) || loads(b),
        Expr::Fma(a, b, c) | Expr::Select(a, b, c) => loads(a) || loads(b) || loads(c),
        Expr::Load { buf, index } => !constant(*buf) || loads(index),
    }
}

/// How many of `kernel`'s leading top-level statements may run before a grid-dependency
/// wait (rule 23): address arithmetic, loads of constant or settled buffers, L2 prefetches,
/// and branches and loops of those. An explicit wait ends them.
pub fn early_statements(kernel: &Kernel) -> usize {
    let settled = |buf: Buf| crate::kernel::settled_buffer(&kernel.params, buf);
    kernel
        .body
        .iter()
        .take_while(|s| before_wait_violation(std::slice::from_ref(*s), "body", &settled).is_none())
        .count()
}

/// Whether `stmt` (nested statements included) loads global or shared memory.
pub fn stmt_loads(stmt: &Stmt) -> bool {
    let any = |e: &Expr| loads(e, &|_| false);
    stmt.any(&|s| match s {
        Stmt::LoadVec { .. } => true,
        Stmt::Assign(_, value) => any(value),
        _ => false,
    })
}

/// The first statement of `stmts` (nested ones included) that may not run before the
/// grid-dependency wait (rule 23), with its path below `path`.
fn before_wait_violation<'s>(
    stmts: &'s [Stmt],
    path: &str,
    constant: &dyn Fn(Buf) -> bool,
) -> Option<(String, &'s Stmt)> {
    let loads = |e: &Expr| loads(e, constant);
    for (i, stmt) in stmts.iter().enumerate() {
        let here = format!("{path}[{i}]");
        let found = match stmt {
            Stmt::Assign(_, value) if !loads(value) => None,
            Stmt::LoadVec { buf, index, .. } if constant(*buf) && !loads(index) => None,
            Stmt::PrefetchL2 { index, bytes, .. } if !loads(index) && !loads(bytes) => None,
            Stmt::If {
                cond,
                then,
                otherwise,
            } if !loads(cond) => before_wait_violation(then, &format!("{here}.then"), constant)
                .or_else(|| before_wait_violation(otherwise, &format!("{here}.else"), constant)),
            Stmt::For {
                start,
                end,
                step,
                body,
                ..
            } if !loads(start) && !loads(end) && !loads(step) => {
                before_wait_violation(body, &format!("{here}.body"), constant)
            }
            _ => Some((here, stmt)),
        };
        if found.is_some() {
            return found;
        }
    }
    None
}

/// Whether `name` is a PTX identifier (without the leading `%` that PTX also allows).
pub fn is_ptx_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    let follows = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '$';
    match chars.next() {
        Some(c) if c.is_ascii_alphabetic() => chars.all(follows),
        Some('_' | '$') => {
            let rest: Vec<char> = chars.collect();
            !rest.is_empty() && rest.into_iter().all(follows)
        }
        _ => false,
    }
}

/// What a memory operand is used for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Use {
    Read,
    Write,
}

struct Checker<'k> {
    kernel: &'k Kernel,
    names: Names<'k>,
    uniformity: Uniformity,
}

/// Where a statement is: its path and its first printed line, for error messages.
struct Site {
    location: String,
}

impl Checker<'_> {
    fn error(&self, site: &Site, message: impl Into<String>) -> KirError {
        KirError::new(&self.kernel.name, site.location.clone(), message)
    }

    fn check_block(&self, stmts: &[Stmt], path: &str, uniform_flow: bool) -> Result<(), KirError> {
        for (i, stmt) in stmts.iter().enumerate() {
            let path = format!("{path}[{i}]");
            let site = Site {
                location: format!("statement {path} `{}`", self.names.stmt_head(stmt)),
            };
            self.check_stmt(stmt, &path, &site, uniform_flow)?;
        }
        Ok(())
    }

    fn check_stmt(
        &self,
        stmt: &Stmt,
        path: &str,
        site: &Site,
        uniform_flow: bool,
    ) -> Result<(), KirError> {
        match stmt {
            Stmt::Assign(var, value) => {
                let var_ty = self.var_ty(*var, site)?;
                let value_ty = self.expr_ty(value, site)?;
                if var_ty != value_ty {
                    return Err(self.error(
                        site,
                        format!(
                            "assigns a {value_ty} value to {} of type {var_ty}",
                            self.names.var(*var)
                        ),
                    ));
                }
            }
            Stmt::LoadVec { dsts, buf, index } => {
                let dtype = self.memory_dtype(*buf, Use::Read, site)?;
                let raw = match dsts.first() {
                    Some(&d) => crate::kernel::loads_raw_pairs(dtype, self.var_ty(d, site)?),
                    None => false,
                };
                let element = if raw {
                    Ty::I32
                } else {
                    Ty::compute_type_of(dtype)
                };
                let width = dsts.len() * if raw { 2 } else { 1 };
                self.check_vector_width(*buf, width, site)?;
                self.check_index(index, site)?;
                let mut seen = BTreeSet::new();
                for &dst in dsts {
                    if !seen.insert(dst) {
                        return Err(self.error(
                            site,
                            format!("{} is a destination twice", self.names.var(dst)),
                        ));
                    }
                    let ty = self.var_ty(dst, site)?;
                    if ty != element {
                        return Err(self.error(
                            site,
                            format!(
                                "destination {} is {ty}, but the buffer's elements load as {element}",
                                self.names.var(dst)
                            ),
                        ));
                    }
                }
            }
            Stmt::Store { buf, index, value } => {
                let element = self.memory_ty(*buf, Use::Write, site)?;
                self.check_index(index, site)?;
                self.check_stored_value(value, element, site)?;
            }
            Stmt::StoreVec { buf, index, values } => {
                let element = self.memory_ty(*buf, Use::Write, site)?;
                self.check_vector_width(*buf, values.len(), site)?;
                self.check_index(index, site)?;
                for value in values {
                    self.check_stored_value(value, element, site)?;
                }
            }
            Stmt::For {
                var,
                start,
                end,
                step,
                body,
            } => {
                let ty = self.var_ty(*var, site)?;
                if !ty.is_int() {
                    return Err(self.error(
                        site,
                        format!(
                            "the loop register {} is {ty}, not an integer",
                            self.names.var(*var)
                        ),
                    ));
                }
                for (what, expr) in [("start", start), ("end", end), ("step", step)] {
                    let expr_ty = self.expr_ty(expr, site)?;
                    if expr_ty != ty {
                        return Err(self.error(
                            site,
                            format!("the loop's {what} is {expr_ty}, but its register is {ty}"),
                        ));
                    }
                }
                if let Expr::Const(step) = step {
                    let positive = match *step {
                        crate::Const::I32(s) => s > 0,
                        crate::Const::I64(s) => s > 0,
                        _ => false,
                    };
                    if !positive {
                        return Err(self.error(site, "the loop's step is not positive"));
                    }
                }
                let mut fixed = BTreeSet::from([*var]);
                vars_read(end, &mut fixed);
                vars_read(step, &mut fixed);
                let mut written = BTreeSet::new();
                vars_written(body, &mut written);
                if let Some(var) = fixed.intersection(&written).next() {
                    return Err(self.error(
                        site,
                        format!(
                            "the body writes {}, which the loop's register, end or step depends on",
                            self.names.var(*var)
                        ),
                    ));
                }
                let body_uniform =
                    uniform_flow && self.uniformity.is_uniform_loop(*var, start, end, step);
                self.check_block(body, &format!("{path}.body"), body_uniform)?;
            }
            Stmt::If {
                cond,
                then,
                otherwise,
            } => {
                let cond_ty = self.expr_ty(cond, site)?;
                if cond_ty != Ty::Pred {
                    return Err(self.error(site, format!("the condition is {cond_ty}, not pred")));
                }
                let branch_uniform = uniform_flow && self.uniformity.is_uniform_expr(cond);
                self.check_block(then, &format!("{path}.then"), branch_uniform)?;
                self.check_block(otherwise, &format!("{path}.else"), branch_uniform)?;
            }
            Stmt::Barrier => {
                if !uniform_flow {
                    return Err(self.error(
                        site,
                        "a barrier under control flow that is not block-uniform",
                    ));
                }
            }
            Stmt::ShuffleXor { dst, src, mask } => {
                let dst_ty = self.var_ty(*dst, site)?;
                let src_ty = self.var_ty(*src, site)?;
                if dst_ty != src_ty {
                    return Err(self.error(
                        site,
                        format!("shuffles a {src_ty} register into a {dst_ty} one"),
                    ));
                }
                if *mask >= 32 {
                    return Err(self.error(site, format!("lane mask {mask} is not below 32")));
                }
                if !uniform_flow {
                    return Err(self.error(
                        site,
                        "a warp shuffle under control flow that is not block-uniform",
                    ));
                }
            }
            Stmt::PackHalves { dst, lo, hi, input } => {
                if input.is_fp8() {
                    return Err(self.error(
                        site,
                        format!("packs halves of {}, not f16 or bf16", input.name()),
                    ));
                }
                let ty = self.var_ty(*dst, site)?;
                if ty != Ty::I32 {
                    return Err(self.error(
                        site,
                        format!("pack destination {} is {ty}, not i32", self.names.var(*dst)),
                    ));
                }
                for value in [lo, hi] {
                    let ty = self.expr_ty(value, site)?;
                    if ty != Ty::F32 {
                        return Err(self.error(site, format!("packs a {ty} value, not f32")));
                    }
                }
            }
            Stmt::Mma { d, a, b, c, .. } => {
                let groups: [(&str, &[VarId], Ty); 4] = [
                    ("d", &d[..], Ty::F32),
                    ("a", &a[..], Ty::I32),
                    ("b", &b[..], Ty::I32),
                    ("c", &c[..], Ty::F32),
                ];
                for (what, vars, want) in groups {
                    for &var in vars {
                        let ty = self.var_ty(var, site)?;
                        if ty != want {
                            return Err(self.error(
                                site,
                                format!(
                                    "mma operand {what} register {} is {ty}, not {want}",
                                    self.names.var(var)
                                ),
                            ));
                        }
                    }
                }
                self.check_distinct(d, site)?;
                if !uniform_flow {
                    return Err(
                        self.error(site, "an mma under control flow that is not block-uniform")
                    );
                }
            }
            Stmt::LdMatrix {
                dsts, buf, index, ..
            } => {
                if !matches!(dsts.len(), 1 | 2 | 4) {
                    return Err(self.error(
                        site,
                        format!("ldmatrix of {} matrices (1, 2 or 4)", dsts.len()),
                    ));
                }
                for &dst in dsts {
                    let ty = self.var_ty(dst, site)?;
                    if ty != Ty::I32 {
                        return Err(self.error(
                            site,
                            format!(
                                "ldmatrix destination {} is {ty}, not i32",
                                self.names.var(dst)
                            ),
                        ));
                    }
                }
                self.check_distinct(dsts, site)?;
                let Buf::Shared(_) = buf else {
                    return Err(self.error(site, "ldmatrix reads a shared array only"));
                };
                let dtype = self.memory_dtype(*buf, Use::Read, site)?;
                let trans = matches!(stmt, Stmt::LdMatrix { trans: true, .. });
                match (dtype.size_bytes(), trans) {
                    (2, _) | (1, false) => {}
                    (1, true) => {
                        return Err(self.error(
                            site,
                            format!("a transposing ldmatrix of {dtype} elements (16-bit only)"),
                        ))
                    }
                    _ => {
                        return Err(self.error(
                            site,
                            format!("ldmatrix of {dtype} elements (16-bit or 8-bit elements)"),
                        ))
                    }
                }
                self.check_index(index, site)?;
                if !uniform_flow {
                    return Err(self.error(
                        site,
                        "an ldmatrix under control flow that is not block-uniform",
                    ));
                }
            }
            Stmt::CpAsync {
                dst,
                dst_index,
                src,
                src_index,
                src_len,
            } => {
                let (Buf::Shared(_), Buf::Global(_)) = (dst, src) else {
                    return Err(self.error(
                        site,
                        "cp.async copies from a global buffer to a shared array",
                    ));
                };
                let dst_dtype = self.memory_dtype(*dst, Use::Write, site)?;
                let src_dtype = self.memory_dtype(*src, Use::Read, site)?;
                if dst_dtype != src_dtype {
                    return Err(self.error(
                        site,
                        format!("cp.async from {src_dtype} elements to {dst_dtype} elements"),
                    ));
                }
                self.check_index(dst_index, site)?;
                self.check_index(src_index, site)?;
                let len_ty = self.expr_ty(src_len, site)?;
                if len_ty != Ty::I32 {
                    return Err(self.error(
                        site,
                        format!("the cp.async source length is {len_ty}, not i32"),
                    ));
                }
            }
            Stmt::PrefetchL2 { buf, index, bytes } => {
                let Buf::Global(_) = buf else {
                    return Err(self.error(site, "an L2 prefetch of a shared array"));
                };
                self.memory_dtype(*buf, Use::Read, site)?;
                self.check_index(index, site)?;
                let ty = self.expr_ty(bytes, site)?;
                if ty != Ty::I32 {
                    return Err(self.error(site, format!("the L2 prefetch size is {ty}, not i32")));
                }
            }
            Stmt::AtomicAdd {
                dst,
                buf,
                index,
                value,
            } => {
                let Buf::Global(_) = buf else {
                    return Err(self.error(site, "an atomic add to a shared array"));
                };
                self.memory_dtype(*buf, Use::Read, site)?;
                let dtype = self.memory_dtype(*buf, Use::Write, site)?;
                if dtype != DType::I32 {
                    return Err(
                        self.error(site, format!("an atomic add to {dtype} elements, not i32"))
                    );
                }
                self.check_index(index, site)?;
                let ty = self.expr_ty(value, site)?;
                if ty != Ty::I32 {
                    return Err(self.error(site, format!("the atomic addend is {ty}, not i32")));
                }
                let ty = self.var_ty(*dst, site)?;
                if ty != Ty::I32 {
                    return Err(self.error(
                        site,
                        format!(
                            "atomic destination {} is {ty}, not i32",
                            self.names.var(*dst)
                        ),
                    ));
                }
            }
            Stmt::CpAsyncCommit
            | Stmt::CpAsyncWait(_)
            | Stmt::GridDependencyWait
            | Stmt::Fence
            | Stmt::LaunchDependents => {}
            Stmt::Wgmma(op) => self.check_wgmma(op, site, uniform_flow)?,
        }
        Ok(())
    }

    /// Rule 24.
    fn check_wgmma(
        &self,
        op: &crate::wgmma::WgmmaOp,
        site: &Site,
        uniform_flow: bool,
    ) -> Result<(), KirError> {
        use crate::wgmma::WgmmaOp;
        if op.is_collective() {
            if !uniform_flow {
                return Err(self.error(
                    site,
                    "a wgmma collective under control flow that is not block-uniform",
                ));
            }
            if !self
                .kernel
                .block_dim
                .is_multiple_of(crate::wgmma::WARPGROUP as u32)
            {
                return Err(self.error(
                    site,
                    format!(
                        "a wgmma collective in a block of {} threads (whole warpgroups of 128)",
                        self.kernel.block_dim
                    ),
                ));
            }
        }
        let WgmmaOp::Mma {
            input, n, d, a, b, ..
        } = op
        else {
            return Ok(());
        };
        if input.is_fp8() {
            return Err(self.error(site, "a wgmma of FP8 inputs (f16 or bf16 only)"));
        }
        if !n.is_multiple_of(8) || !(8..=256).contains(n) {
            return Err(self.error(
                site,
                format!("a wgmma of n {n} (a multiple of 8 in 8..=256)"),
            ));
        }
        if d.len() != *n as usize / 2 {
            return Err(self.error(
                site,
                format!(
                    "a wgmma of n {n} with {} accumulators, not {}",
                    d.len(),
                    n / 2
                ),
            ));
        }
        for &var in d {
            let ty = self.var_ty(var, site)?;
            if ty != Ty::F32 {
                return Err(self.error(
                    site,
                    format!("wgmma accumulator {} is {ty}, not f32", self.names.var(var)),
                ));
            }
        }
        self.check_distinct(d, site)?;
        for tile in [a, b] {
            let Buf::Shared(_) = tile.buf else {
                return Err(self.error(site, "a wgmma operand outside shared memory"));
            };
            let dtype = self.memory_dtype(tile.buf, Use::Read, site)?;
            if dtype != input.dtype() {
                return Err(self.error(
                    site,
                    format!("a {} wgmma reading {dtype} elements", input.name()),
                ));
            }
            let ty = self.expr_ty(&tile.index, site)?;
            if ty != Ty::I32 {
                return Err(self.error(site, format!("a wgmma operand index of {ty}, not i32")));
            }
            if tile.sbo == 0 || !tile.sbo.is_multiple_of(16) || tile.sbo >= 1 << 18 {
                return Err(
                    self.error(site, format!("a wgmma stride offset of {} bytes", tile.sbo))
                );
            }
        }
        Ok(())
    }

    /// Rule 23.
    fn check_wait_placement(&self) -> Result<(), KirError> {
        let body = &self.kernel.body;
        let top: Vec<usize> = (0..body.len())
            .filter(|&i| body[i] == Stmt::GridDependencyWait)
            .collect();
        let site = |path: String, stmt: &Stmt| Site {
            location: format!("statement {path} `{}`", self.names.stmt_head(stmt)),
        };
        for (i, stmt) in body.iter().enumerate() {
            // A wait inside this statement, not the statement itself.
            let nested =
                *stmt != Stmt::GridDependencyWait && stmt.any(&|s| *s == Stmt::GridDependencyWait);
            if nested {
                return Err(self.error(
                    &site(format!("body[{i}]"), stmt),
                    "a grid-dependency wait below the top level of the body",
                ));
            }
        }
        if let Some(&second) = top.get(1) {
            return Err(self.error(
                &site(format!("body[{second}]"), &body[second]),
                "a second grid-dependency wait",
            ));
        }
        if let Some(&wait) = top.first() {
            let params = &self.kernel.params;
            let constant = |buf: Buf| crate::kernel::settled_buffer(params, buf);
            if let Some((path, stmt)) = before_wait_violation(&body[..wait], "body", &constant) {
                return Err(self.error(
                    &site(path, stmt),
                    "touches memory before the grid-dependency wait (only address arithmetic, loads of constant or settled buffers and L2 prefetches may)",
                ));
            }
        }
        Ok(())
    }

    fn check_distinct(&self, vars: &[VarId], site: &Site) -> Result<(), KirError> {
        let mut seen = BTreeSet::new();
        for &var in vars {
            if !seen.insert(var) {
                return Err(self.error(
                    site,
                    format!("{} is a destination twice", self.names.var(var)),
                ));
            }
        }
        Ok(())
    }

    fn var_ty(&self, var: VarId, site: &Site) -> Result<Ty, KirError> {
        match self.kernel.vars.get(var.0 as usize) {
            Some(decl) => Ok(decl.ty),
            None => Err(self.error(
                site,
                format!(
                    "register %{} is not declared (the kernel has {})",
                    var.0,
                    self.kernel.vars.len()
                ),
            )),
        }
    }

    /// The dtype of a memory operand used for `usage`.
    fn memory_dtype(&self, buf: Buf, usage: Use, site: &Site) -> Result<DType, KirError> {
        match buf {
            Buf::Global(index) => match self.kernel.params.get(index as usize) {
                Some(Param::Buffer {
                    name,
                    dtype,
                    access,
                }) => {
                    let allowed = match usage {
                        Use::Read => access.reads(),
                        Use::Write => access.writes(),
                    };
                    if !allowed {
                        let verb = match usage {
                            Use::Read => "reads",
                            Use::Write => "writes",
                        };
                        return Err(self.error(
                            site,
                            format!("{verb} buffer `{name}`, whose access is {access:?}"),
                        ));
                    }
                    Ok(*dtype)
                }
                Some(Param::Scalar { name, .. }) => Err(self.error(
                    site,
                    format!("parameter {index} (`{name}`) is a scalar, not a buffer"),
                )),
                None => Err(self.error(
                    site,
                    format!(
                        "global buffer {index} is not a parameter (the kernel has {})",
                        self.kernel.params.len()
                    ),
                )),
            },
            Buf::Shared(index) => match self.kernel.shared.get(index as usize) {
                Some(shared) => Ok(shared.dtype),
                None => Err(self.error(
                    site,
                    format!(
                        "shared array {index} is not declared (the kernel has {})",
                        self.kernel.shared.len()
                    ),
                )),
            },
        }
    }

    fn memory_ty(&self, buf: Buf, usage: Use, site: &Site) -> Result<Ty, KirError> {
        Ok(Ty::compute_type_of(self.memory_dtype(buf, usage, site)?))
    }

    fn check_vector_width(&self, buf: Buf, width: usize, site: &Site) -> Result<(), KirError> {
        // The access itself was checked before; only the dtype matters here.
        let dtype = match buf {
            Buf::Global(index) => match self.kernel.params.get(index as usize) {
                Some(Param::Buffer { dtype, .. }) => *dtype,
                _ => return Ok(()),
            },
            Buf::Shared(index) => match self.kernel.shared.get(index as usize) {
                Some(shared) => shared.dtype,
                None => return Ok(()),
            },
        };
        let bytes = width * dtype.size_bytes();
        if !matches!(width, 2 | 4 | 8) || bytes > 16 {
            return Err(self.error(
                site,
                format!(
                    "a vector of {width} {dtype} elements ({bytes} bytes): the width must be 2, 4 or 8 and take at most 16 bytes"
                ),
            ));
        }
        Ok(())
    }

    fn check_index(&self, index: &Expr, site: &Site) -> Result<(), KirError> {
        let ty = self.expr_ty(index, site)?;
        if !ty.is_int() {
            return Err(self.error(site, format!("the index is {ty}, not i32 or i64")));
        }
        Ok(())
    }

    fn check_stored_value(&self, value: &Expr, element: Ty, site: &Site) -> Result<(), KirError> {
        let ty = self.expr_ty(value, site)?;
        if ty != element {
            return Err(self.error(
                site,
                format!("stores a {ty} value, but the buffer's elements are stored from {element}"),
            ));
        }
        Ok(())
    }

    /// The type of `expr`, checking rules 4 to 11 on the way.
    fn expr_ty(&self, expr: &Expr, site: &Site) -> Result<Ty, KirError> {
        let describe = |expr: &Expr| format!("`{}`", self.names.expr(expr));
        match expr {
            Expr::Const(value) => Ok(value.ty()),
            Expr::Var(var) => self.var_ty(*var, site),
            Expr::Param(index) => match self.kernel.params.get(*index as usize) {
                Some(Param::Scalar { ty, .. }) => Ok(*ty),
                Some(Param::Buffer { name, .. }) => Err(self.error(
                    site,
                    format!("parameter {index} (`{name}`) is a buffer, read as a scalar"),
                )),
                None => Err(self.error(
                    site,
                    format!(
                        "scalar parameter {index} does not exist (the kernel has {} parameters)",
                        self.kernel.params.len()
                    ),
                )),
            },
            Expr::Special(Special::BlockIdx(axis)) if *axis > 2 => {
                Err(self.error(site, format!("block index axis {axis} is not 0, 1 or 2")))
            }
            Expr::Special(_) => Ok(Ty::I32),
            Expr::Unary(op, a) => {
                let ty = self.expr_ty(a, site)?;
                let accepted = match op {
                    UnOp::Neg | UnOp::Abs => matches!(ty, Ty::I32 | Ty::I64 | Ty::F32),
                    UnOp::Not => matches!(ty, Ty::Pred | Ty::I32 | Ty::I64),
                    _ => ty == Ty::F32,
                };
                if !accepted {
                    return Err(self.error(
                        site,
                        format!(
                            "{} does not take a {ty} operand in {}",
                            unop_name(*op),
                            describe(expr)
                        ),
                    ));
                }
                Ok(ty)
            }
            Expr::Binary(op, a, b) => {
                let (a_ty, b_ty) = (self.expr_ty(a, site)?, self.expr_ty(b, site)?);
                if a_ty != b_ty {
                    return Err(self.error(
                        site,
                        format!(
                            "`{}` has operands of two types, {a_ty} and {b_ty}, in {}",
                            binop_symbol(*op),
                            describe(expr)
                        ),
                    ));
                }
                let accepted = match op {
                    BinOp::Add
                    | BinOp::Sub
                    | BinOp::Mul
                    | BinOp::Div
                    | BinOp::Rem
                    | BinOp::Min
                    | BinOp::Max
                    | BinOp::Lt
                    | BinOp::Le
                    | BinOp::Gt
                    | BinOp::Ge => a_ty != Ty::Pred,
                    BinOp::Pow => a_ty == Ty::F32,
                    BinOp::And | BinOp::Or | BinOp::Xor => a_ty != Ty::F32,
                    BinOp::Shl | BinOp::Shr => a_ty.is_int(),
                    BinOp::Eq | BinOp::Ne => true,
                };
                if !accepted {
                    return Err(self.error(
                        site,
                        format!(
                            "`{}` does not take {a_ty} operands in {}",
                            binop_symbol(*op),
                            describe(expr)
                        ),
                    ));
                }
                Ok(if op.is_comparison() { Ty::Pred } else { a_ty })
            }
            Expr::Fma(a, b, c) => {
                let tys = [
                    self.expr_ty(a, site)?,
                    self.expr_ty(b, site)?,
                    self.expr_ty(c, site)?,
                ];
                if tys[0] != tys[1] || tys[0] != tys[2] || tys[0] == Ty::Pred {
                    return Err(self.error(
                        site,
                        format!(
                            "fma takes three operands of one numeric type, not {}, {}, {} in {}",
                            tys[0],
                            tys[1],
                            tys[2],
                            describe(expr)
                        ),
                    ));
                }
                Ok(tys[0])
            }
            Expr::Select(cond, a, b) => {
                let cond_ty = self.expr_ty(cond, site)?;
                if cond_ty != Ty::Pred {
                    return Err(self.error(
                        site,
                        format!(
                            "select's condition is {cond_ty}, not pred, in {}",
                            describe(expr)
                        ),
                    ));
                }
                let (a_ty, b_ty) = (self.expr_ty(a, site)?, self.expr_ty(b, site)?);
                if a_ty != b_ty {
                    return Err(self.error(
                        site,
                        format!("select's arms are {a_ty} and {b_ty} in {}", describe(expr)),
                    ));
                }
                Ok(a_ty)
            }
            Expr::Cast(ty, a) => {
                self.expr_ty(a, site)?;
                Ok(*ty)
            }
            Expr::Load { buf, index } => {
                let ty = self.memory_ty(*buf, Use::Read, site)?;
                self.check_index(index, site)?;
                Ok(ty)
            }
        }
    }
}

/// Every register that `expr` reads.
pub fn vars_read(expr: &Expr, out: &mut BTreeSet<VarId>) {
    match expr {
        Expr::Const(_) | Expr::Param(_) | Expr::Special(_) => {}
        Expr::Var(var) => {
            out.insert(*var);
        }
        Expr::Unary(_, a) | Expr::Cast(_, a) => vars_read(a, out),
        Expr::Binary(_, a, b) => {
            vars_read(a, out);
            vars_read(b, out);
        }
        Expr::Fma(a, b, c) | Expr::Select(a, b, c) => {
            vars_read(a, out);
            vars_read(b, out);
            vars_read(c, out);
        }
        Expr::Load { index, .. } => vars_read(index, out),
    }
}

/// Every register that some statement of `stmts` writes (nested ones included).
pub fn vars_written(stmts: &[Stmt], out: &mut BTreeSet<VarId>) {
    for stmt in stmts {
        match stmt {
            Stmt::Assign(var, _) | Stmt::ShuffleXor { dst: var, .. } => {
                out.insert(*var);
            }
            Stmt::LoadVec { dsts, .. } | Stmt::LdMatrix { dsts, .. } => {
                out.extend(dsts.iter().copied())
            }
            Stmt::Mma { d, .. } => out.extend(d.iter().copied()),
            Stmt::Wgmma(crate::wgmma::WgmmaOp::Mma { d, .. }) => out.extend(d.iter().copied()),
            Stmt::Wgmma(_) => {}
            Stmt::PackHalves { dst, .. } | Stmt::AtomicAdd { dst, .. } => {
                out.insert(*dst);
            }
            Stmt::For { var, body, .. } => {
                out.insert(*var);
                vars_written(body, out);
            }
            Stmt::If {
                then, otherwise, ..
            } => {
                vars_written(then, out);
                vars_written(otherwise, out);
            }
            Stmt::Store { .. }
            | Stmt::StoreVec { .. }
            | Stmt::Barrier
            | Stmt::CpAsync { .. }
            | Stmt::CpAsyncCommit
            | Stmt::CpAsyncWait(_)
            | Stmt::GridDependencyWait
            | Stmt::PrefetchL2 { .. }
            | Stmt::Fence
            | Stmt::LaunchDependents => {}
        }
    }
}
