//! `Stmt::Wgmma` (sm_90a only, [`Feature::Wgmma`]): the warpgroup fences, batches and
//! waits, the async-proxy fence, and `wgmma.mma_async` with the 64-bit shared-memory
//! descriptors of [`kiln_kir::wgmma`] built from each operand's address.

use kiln_kir::wgmma::{self, WgmmaOp, WgmmaTile};

use super::features::Feature;
use super::function::{FunctionEmitter, Place};
use super::regs::{Reg, RegKind};
use super::EmitError;

impl FunctionEmitter<'_, '_> {
    pub(super) fn wgmma(&mut self, op: &WgmmaOp) -> Result<(), EmitError> {
        if !self.ctx.use_feature(Feature::Wgmma) {
            return Err(self.error(format!(
                "wgmma and fence.proxy.async need sm_90a and PTX 8.0 ({} with cap {:?})",
                self.ctx.target,
                self.ctx.cap.map(|c| c.to_string())
            )));
        }
        match op {
            WgmmaOp::Fence => self.inst("wgmma.fence.sync.aligned", &[]),
            WgmmaOp::Commit => self.inst("wgmma.commit_group.sync.aligned", &[]),
            WgmmaOp::Wait(n) => self.inst("wgmma.wait_group.sync.aligned", &[n]),
            WgmmaOp::FenceProxyAsync => self.inst("fence.proxy.async.shared::cta", &[]),
            WgmmaOp::Mma {
                input,
                n,
                d,
                a,
                b,
                accumulate,
            } => {
                let a_desc = self.descriptor(a)?;
                let b_desc = self.descriptor(b)?;
                let scale_d = self.fresh(RegKind::Pred);
                self.inst("mov.pred", &[&scale_d, &u8::from(*accumulate)]);
                let regs = d
                    .iter()
                    .map(|&v| self.var_reg(v).map(|r| r.to_string()))
                    .collect::<Result<Vec<_>, _>>()?;
                let opcode = format!(
                    "wgmma.mma_async.sync.aligned.m64n{n}k16.f32.{0}.{0}",
                    input.name()
                );
                let list = format!("{{{}}}", regs.join(", "));
                self.inst(
                    &opcode,
                    &[&list, &a_desc, &b_desc, &scale_d, &1, &1, &0, &0],
                );
            }
        }
        Ok(())
    }

    /// The descriptor of `tile`: its shared address's bits 4..18 in bits 0..14, or'ed with
    /// the constant fields ([`wgmma::descriptor`]).
    fn descriptor(&mut self, tile: &WgmmaTile) -> Result<Reg, EmitError> {
        let Place::Shared { base, .. } = self.place(tile.buf)? else {
            return Err(self.error("a wgmma operand outside shared memory".into()));
        };
        let element = self.dtype(tile.buf)?.size_bytes() as u32;
        let index = self.expr(&tile.index)?;
        let index = self.reg(index.operand, RegKind::B32);
        let address = self.fresh(RegKind::B32);
        self.inst("mad.lo.s32", &[&address, &index, &element, &base]);
        let field = self.fresh(RegKind::B32);
        self.inst("bfe.u32", &[&field, &address, &4, &14]);
        let wide = self.fresh(RegKind::B64);
        self.inst("cvt.u64.u32", &[&wide, &field]);
        let desc = self.fresh(RegKind::B64);
        self.inst("or.b64", &[&desc, &wide, &wgmma::descriptor_high(tile.sbo)]);
        Ok(desc)
    }
}
