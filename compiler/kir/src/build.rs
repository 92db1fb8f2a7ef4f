//! Conveniences for writing kernels by hand: expression constructors and operators on
//! [`Expr`], statement constructors, and [`KernelBuilder`], which hands out parameter,
//! shared-array and register ids while a kernel is put together.
//!
//! Nothing here checks types; run [`verify_kernel`](crate::verify_kernel) on the result.

use crate::kernel::{
    Access, BinOp, Buf, Const, Expr, Kernel, Param, Shared, SizeExpr, Special, Stmt, Ty, UnOp, Var,
    VarId,
};
use kiln_ir::DType;
use std::ops;

impl From<VarId> for Expr {
    fn from(var: VarId) -> Expr {
        Expr::Var(var)
    }
}

impl From<Const> for Expr {
    fn from(value: Const) -> Expr {
        Expr::Const(value)
    }
}

impl Expr {
    pub fn var(var: VarId) -> Expr {
        Expr::Var(var)
    }

    pub fn i32(value: i32) -> Expr {
        Expr::Const(Const::I32(value))
    }

    pub fn i64(value: i64) -> Expr {
        Expr::Const(Const::I64(value))
    }

    pub fn f32(value: f32) -> Expr {
        Expr::Const(Const::F32(value))
    }

    pub fn pred(value: bool) -> Expr {
        Expr::Const(Const::Pred(value))
    }

    /// The scalar parameter at `index` in [`Kernel::params`].
    pub fn param(index: u32) -> Expr {
        Expr::Param(index)
    }

    pub fn thread_idx() -> Expr {
        Expr::Special(Special::ThreadIdx)
    }

    pub fn block_idx(axis: u8) -> Expr {
        Expr::Special(Special::BlockIdx(axis))
    }

    pub fn block_dim() -> Expr {
        Expr::Special(Special::BlockDim)
    }

    pub fn lane_id() -> Expr {
        Expr::Special(Special::LaneId)
    }

    pub fn warp_id() -> Expr {
        Expr::Special(Special::WarpId)
    }

    pub fn load(buf: Buf, index: impl Into<Expr>) -> Expr {
        Expr::Load {
            buf,
            index: Box::new(index.into()),
        }
    }

    /// `a * b + c`.
    pub fn fma(a: impl Into<Expr>, b: impl Into<Expr>, c: impl Into<Expr>) -> Expr {
        Expr::Fma(Box::new(a.into()), Box::new(b.into()), Box::new(c.into()))
    }

    /// `cond ? if_true : if_false`.
    pub fn select(
        cond: impl Into<Expr>,
        if_true: impl Into<Expr>,
        if_false: impl Into<Expr>,
    ) -> Expr {
        Expr::Select(
            Box::new(cond.into()),
            Box::new(if_true.into()),
            Box::new(if_false.into()),
        )
    }

    pub fn binary(op: BinOp, a: impl Into<Expr>, b: impl Into<Expr>) -> Expr {
        Expr::Binary(op, Box::new(a.into()), Box::new(b.into()))
    }

    pub fn unary(op: UnOp, a: impl Into<Expr>) -> Expr {
        Expr::Unary(op, Box::new(a.into()))
    }

    /// This expression converted to `ty`.
    pub fn cast(self, ty: Ty) -> Expr {
        Expr::Cast(ty, Box::new(self))
    }

    pub fn apply(self, op: UnOp) -> Expr {
        Expr::unary(op, self)
    }

    pub fn min(self, other: impl Into<Expr>) -> Expr {
        Expr::binary(BinOp::Min, self, other)
    }

    pub fn max(self, other: impl Into<Expr>) -> Expr {
        Expr::binary(BinOp::Max, self, other)
    }

    pub fn pow(self, other: impl Into<Expr>) -> Expr {
        Expr::binary(BinOp::Pow, self, other)
    }

    pub fn lt(self, other: impl Into<Expr>) -> Expr {
        Expr::binary(BinOp::Lt, self, other)
    }

    pub fn le(self, other: impl Into<Expr>) -> Expr {
        Expr::binary(BinOp::Le, self, other)
    }

    pub fn gt(self, other: impl Into<Expr>) -> Expr {
        Expr::binary(BinOp::Gt, self, other)
    }

    pub fn ge(self, other: impl Into<Expr>) -> Expr {
        Expr::binary(BinOp::Ge, self, other)
    }

    /// The comparison `self == other` (a `Pred` expression).
    pub fn equals(self, other: impl Into<Expr>) -> Expr {
        Expr::binary(BinOp::Eq, self, other)
    }

    /// The comparison `self != other` (a `Pred` expression).
    pub fn not_equals(self, other: impl Into<Expr>) -> Expr {
        Expr::binary(BinOp::Ne, self, other)
    }
}

macro_rules! binary_operator {
    ($trait:ident, $method:ident, $op:expr) => {
        impl<R: Into<Expr>> ops::$trait<R> for Expr {
            type Output = Expr;
            fn $method(self, rhs: R) -> Expr {
                Expr::binary($op, self, rhs)
            }
        }
    };
}

binary_operator!(Add, add, BinOp::Add);
binary_operator!(Sub, sub, BinOp::Sub);
binary_operator!(Mul, mul, BinOp::Mul);
binary_operator!(Div, div, BinOp::Div);
binary_operator!(Rem, rem, BinOp::Rem);
binary_operator!(BitAnd, bitand, BinOp::And);
binary_operator!(BitOr, bitor, BinOp::Or);
binary_operator!(BitXor, bitxor, BinOp::Xor);
binary_operator!(Shl, shl, BinOp::Shl);
binary_operator!(Shr, shr, BinOp::Shr);

impl ops::Neg for Expr {
    type Output = Expr;
    fn neg(self) -> Expr {
        Expr::unary(UnOp::Neg, self)
    }
}

impl ops::Not for Expr {
    type Output = Expr;
    fn not(self) -> Expr {
        Expr::unary(UnOp::Not, self)
    }
}

impl Stmt {
    pub fn assign(var: VarId, value: impl Into<Expr>) -> Stmt {
        Stmt::Assign(var, value.into())
    }

    pub fn store(buf: Buf, index: impl Into<Expr>, value: impl Into<Expr>) -> Stmt {
        Stmt::Store {
            buf,
            index: index.into(),
            value: value.into(),
        }
    }

    /// `for var in start..end step step { body }`.
    pub fn for_range(
        var: VarId,
        start: impl Into<Expr>,
        end: impl Into<Expr>,
        step: impl Into<Expr>,
        body: Vec<Stmt>,
    ) -> Stmt {
        Stmt::For {
            var,
            start: start.into(),
            end: end.into(),
            step: step.into(),
            body,
        }
    }

    /// Whether `pred` holds for this statement or one nested in its branches or loop body.
    pub fn any(&self, pred: &dyn Fn(&Stmt) -> bool) -> bool {
        pred(self)
            || match self {
                Stmt::If {
                    then, otherwise, ..
                } => then.iter().chain(otherwise).any(|s| s.any(pred)),
                Stmt::For { body, .. } => body.iter().any(|s| s.any(pred)),
                _ => false,
            }
    }

    /// `if cond { then }` with no else branch.
    pub fn if_then(cond: impl Into<Expr>, then: Vec<Stmt>) -> Stmt {
        Stmt::If {
            cond: cond.into(),
            then,
            otherwise: Vec::new(),
        }
    }

    pub fn if_else(cond: impl Into<Expr>, then: Vec<Stmt>, otherwise: Vec<Stmt>) -> Stmt {
        Stmt::If {
            cond: cond.into(),
            then,
            otherwise,
        }
    }
}

/// Puts a [`Kernel`] together: each declaration returns the id to refer to it by.
#[derive(Clone, Debug)]
pub struct KernelBuilder {
    kernel: Kernel,
}

impl KernelBuilder {
    /// A kernel with no parameters, no shared arrays, no registers, an empty body and a grid
    /// of one block.
    pub fn new(name: impl Into<String>, block_dim: u32) -> KernelBuilder {
        KernelBuilder {
            kernel: Kernel {
                name: name.into(),
                params: Vec::new(),
                block_dim,
                blocks_per_sm: 1,
                grid: [SizeExpr::Const(1), SizeExpr::Const(1), SizeExpr::Const(1)],
                shared: Vec::new(),
                vars: Vec::new(),
                body: Vec::new(),
            },
        }
    }

    /// Sets [`Kernel::blocks_per_sm`].
    pub fn blocks_per_sm(&mut self, blocks: u32) -> &mut KernelBuilder {
        self.kernel.blocks_per_sm = blocks;
        self
    }

    /// Sets the number of blocks along each grid axis.
    pub fn grid(&mut self, grid: [SizeExpr; 3]) -> &mut KernelBuilder {
        self.kernel.grid = grid;
        self
    }

    /// Declares a global buffer parameter.
    pub fn buffer(&mut self, name: impl Into<String>, dtype: DType, access: Access) -> Buf {
        let index = self.next_param_index();
        self.kernel.params.push(Param::Buffer {
            name: name.into(),
            dtype,
            access,
        });
        Buf::Global(index)
    }

    /// Declares a scalar parameter; returns the expression that reads it.
    pub fn scalar(&mut self, name: impl Into<String>, ty: Ty) -> Expr {
        let index = self.next_param_index();
        self.kernel.params.push(Param::Scalar {
            name: name.into(),
            ty,
        });
        Expr::Param(index)
    }

    /// Declares a shared-memory array of `len` elements.
    pub fn shared(&mut self, name: impl Into<String>, dtype: DType, len: u32) -> Buf {
        let index = u32::try_from(self.kernel.shared.len()).expect("fewer than 2^32 arrays");
        self.kernel.shared.push(Shared {
            name: name.into(),
            dtype,
            len,
        });
        Buf::Shared(index)
    }

    /// Declares a register.
    pub fn var(&mut self, name: impl Into<String>, ty: Ty) -> VarId {
        let index = u32::try_from(self.kernel.vars.len()).expect("fewer than 2^32 registers");
        self.kernel.vars.push(Var {
            name: name.into(),
            ty,
        });
        VarId(index)
    }

    /// The kernel with `body` as its statements.
    pub fn finish(&self, body: Vec<Stmt>) -> Kernel {
        Kernel {
            body,
            ..self.kernel.clone()
        }
    }

    fn next_param_index(&self) -> u32 {
        u32::try_from(self.kernel.params.len()).expect("fewer than 2^32 parameters")
    }
}
