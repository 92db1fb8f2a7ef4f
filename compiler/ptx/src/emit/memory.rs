//! Loads and stores: addresses, scalar and vector accesses, and the conversions between
//! memory dtypes and compute types.
//!
//! - Global buffers are 64-bit addresses (`ld.global.nc` when the kernel only reads the
//!   buffer, `ld.global.cg` — L2 only — for `Access::Settled` buffers); shared arrays use
//!   32-bit shared-window addresses, and constant indices become `[symbol+offset]`.
//! - Half floats travel as `.b16` (`ld.b16`, never `.f16`); bytes (i8, bool, f8) are
//!   `ld/st.u8`/`.s8` through 16-bit registers (PTX has no 8-bit register operations).
//! - Vectors: 4- and 8-byte elements move as `.v2`/`.v4` of themselves; 16-bit and 8-bit
//!   elements move as packed `.b32` words (or one `.b16` for two bytes), unpacked with
//!   shifts, `bfe`, `mov.b32 {lo, hi}` and `cvt`, and packed with the `x2` conversions or
//!   `bfi`.
//! - f8 uses the sm_89+ `cvt` forms when [`Feature::Fp8Convert`] is available, else the
//!   exact routines of [`crate::numeric::convert`] (encode) and bit placement (decode).

use kiln_ir::DType;
use kiln_kir::{Access, Buf, Expr, Ty};

use super::features::Feature;
use super::function::{FunctionEmitter, Place, Value};
use super::isa;
use super::regs::{Operand, Reg, RegKind};
use super::EmitError;
use crate::numeric::{e4m3_decode_routine, Fp8, Scalar};

/// A resolved address: the state space suffix (`global.nc`, `global`, `shared`) and the
/// bracketed address.
struct Address {
    space: &'static str,
    text: String,
}

impl FunctionEmitter<'_, '_> {
    /// The address of element `index` of `buf`, for a load (`write == false`) or a store.
    fn address(
        &mut self,
        buf: Buf,
        index: &Expr,
        bytes: u32,
        write: bool,
    ) -> Result<Address, EmitError> {
        let place = self.place(buf)?;
        let index = self.expr(index)?;
        let constant = match index.operand {
            Operand::Imm(Scalar::I32(i)) => Some(i64::from(i)),
            Operand::Imm(Scalar::I64(i)) => Some(i),
            _ => None,
        };
        let offset = constant
            .and_then(|i| i.checked_mul(i64::from(bytes)))
            .filter(|offset| i32::try_from(*offset).is_ok());
        match place {
            Place::Global { pointer, access } => {
                // Settled buffers may change while the kernel runs (a row its early loads
                // read stale is loaded again after the wait): their loads stay out of the
                // non-coherent L1, so that no stale line serves a later load.
                let space = match access {
                    _ if write || access.writes() => "global",
                    Access::Settled => "global.cg",
                    _ => "global.nc",
                };
                if let Some(offset) = offset {
                    return Ok(Address {
                        space,
                        text: with_offset(&pointer.to_string(), offset),
                    });
                }
                let address = match index.ty {
                    Ty::I32 => {
                        let index = self.reg(index.operand, RegKind::B32);
                        let scaled = self.fresh(RegKind::B64);
                        self.inst("mul.wide.s32", &[&scaled, &index, &bytes]);
                        let address = self.fresh(RegKind::B64);
                        self.inst("add.s64", &[&address, &pointer, &scaled]);
                        address
                    }
                    _ => {
                        let index = self.reg(index.operand, RegKind::B64);
                        let address = self.fresh(RegKind::B64);
                        self.inst("mad.lo.s64", &[&address, &index, &bytes, &pointer]);
                        address
                    }
                };
                Ok(Address {
                    space,
                    text: format!("[{address}]"),
                })
            }
            Place::Shared {
                symbol,
                offset: array_offset,
                base,
            } => {
                if let Some(offset) = offset {
                    return Ok(Address {
                        space: "shared",
                        text: with_offset(&symbol, array_offset as i64 + offset),
                    });
                }
                let index32 = match index.ty {
                    Ty::I64 => {
                        let wide = self.reg(index.operand, RegKind::B64);
                        let narrow = self.fresh(RegKind::B32);
                        self.inst("cvt.u32.u64", &[&narrow, &wide]);
                        narrow
                    }
                    _ => self.reg(index.operand, RegKind::B32),
                };
                let address = self.fresh(RegKind::B32);
                self.inst("mad.lo.s32", &[&address, &index32, &bytes, &base]);
                Ok(Address {
                    space: "shared",
                    text: format!("[{address}]"),
                })
            }
        }
    }

    /// `Expr::Load`: one element, converted to its compute type.
    pub(super) fn load(&mut self, buf: Buf, index: &Expr) -> Result<Value, EmitError> {
        let dtype = self.dtype(buf)?;
        let element = isa::element(dtype);
        let address = self.address(buf, index, element.bytes, false)?;
        let raw = self.fresh(element.raw);
        let opcode = format!("ld.{}.{}", address.space, element.memory_type);
        self.inst(&opcode, &[&raw, &address.text]);
        let ty = Ty::compute_type_of(dtype);
        let value = self.widen(dtype, raw)?;
        Ok(Value {
            operand: value.into(),
            ty,
        })
    }

    /// A scalar `raw` register of `dtype` (as [`isa::element`] loads it) → compute type.
    pub(super) fn widen(&mut self, dtype: DType, raw: Reg) -> Result<Reg, EmitError> {
        Ok(match dtype {
            DType::F32 | DType::I32 | DType::I64 => raw,
            DType::F16 => self.unary_into(RegKind::F32, "cvt.f32.f16", raw),
            DType::BF16 => {
                if self.ctx.use_feature(Feature::Bf16ToF32) {
                    self.unary_into(RegKind::F32, "cvt.f32.bf16", raw)
                } else {
                    let word = self.unary_into(RegKind::B32, "cvt.u32.u16", raw);
                    let dst = self.fresh(RegKind::F32);
                    self.bf16_half_to_f32(word, true, dst);
                    dst
                }
            }
            DType::F8E4M3 | DType::F8E5M2 => {
                if self.ctx.use_feature(Feature::Fp8Convert) {
                    let halves = self.unary_into(RegKind::B32, fp8_to_f16x2(dtype), raw);
                    let low = self.unary_into(RegKind::B16, "cvt.u16.u32", halves);
                    self.unary_into(RegKind::F32, "cvt.f32.f16", low)
                } else {
                    let word = self.unary_into(RegKind::B32, "cvt.u32.u16", raw);
                    self.decode_fp8_byte(dtype, word)
                }
            }
            DType::I8 => self.unary_into(RegKind::B32, "cvt.s32.s16", raw),
            DType::Bool => {
                let dst = self.fresh(RegKind::Pred);
                self.inst("setp.ne.u16", &[&dst, &raw, &0]);
                dst
            }
        })
    }

    /// `dst = opcode(a)` into a fresh register of `kind`.
    fn unary_into(&mut self, kind: RegKind, opcode: &str, a: Reg) -> Reg {
        let dst = self.fresh(kind);
        self.inst(opcode, &[&dst, &a]);
        dst
    }

    /// `dst` = the f32 of a bf16 in a 32-bit word: its low half (`low`, shifted up) or its
    /// high half (masked).
    fn bf16_half_to_f32(&mut self, word: Reg, low: bool, dst: Reg) {
        let bits = self.fresh(RegKind::B32);
        if low {
            self.inst("shl.b32", &[&bits, &word, &16]);
        } else {
            self.inst("and.b32", &[&bits, &word, &-65536]);
        }
        self.inst("mov.b32", &[&dst, &bits]);
    }

    /// An f8 byte (in the low bits of a 32-bit register, upper bits zero) → f32, without
    /// the f8 `cvt`.
    fn decode_fp8_byte(&mut self, dtype: DType, byte: Reg) -> Reg {
        if dtype == DType::F8E5M2 {
            // E5M2 is the top byte of an f16.
            let shifted = self.fresh(RegKind::B32);
            self.inst("shl.b32", &[&shifted, &byte, &8]);
            let half = self.unary_into(RegKind::B16, "cvt.u16.u32", shifted);
            self.unary_into(RegKind::F32, "cvt.f32.f16", half)
        } else {
            let routine = e4m3_decode_routine();
            self.inline_routine(&routine, &[byte])[0]
        }
    }

    /// `Stmt::Store`: converts `value` to the dtype and writes one element.
    pub(super) fn store(&mut self, buf: Buf, index: &Expr, value: Value) -> Result<(), EmitError> {
        let dtype = self.dtype(buf)?;
        let value = self.cast(value, Ty::compute_type_of(dtype));
        let element = isa::element(dtype);
        let address = self.address(buf, index, element.bytes, true)?;
        let raw = self.narrow(dtype, value)?;
        let opcode = format!("st.{}.{}", address.space, element.memory_type);
        self.inst(&opcode, &[&address.text, &raw]);
        Ok(())
    }

    /// A compute-type value → the raw register a scalar store of `dtype` writes.
    pub(super) fn narrow(&mut self, dtype: DType, value: Value) -> Result<Reg, EmitError> {
        let input = self.value_reg(value);
        Ok(match dtype {
            DType::F32 | DType::I32 | DType::I64 => input,
            DType::F16 => self.unary_into(RegKind::B16, "cvt.rn.f16.f32", input),
            DType::BF16 => self.unary_into(RegKind::B16, "cvt.rn.bf16.f32", input),
            DType::F8E4M3 | DType::F8E5M2 => {
                if self.ctx.use_feature(Feature::Fp8Convert) {
                    let pair = self.fresh(RegKind::B16);
                    self.inst(fp8_from_f32x2(dtype), &[&pair, &input, &input]);
                    pair
                } else {
                    let byte = self.encode_fp8(dtype, input);
                    self.unary_into(RegKind::B16, "cvt.u16.u32", byte)
                }
            }
            DType::I8 => self.unary_into(RegKind::B16, "cvt.u16.u32", input),
            DType::Bool => {
                let byte = self.fresh(RegKind::B16);
                self.inst("selp.b16", &[&byte, &1, &0, &input]);
                byte
            }
        })
    }

    /// f32 → f8 byte in a 32-bit register, by the integer routine.
    fn encode_fp8(&mut self, dtype: DType, value: Reg) -> Reg {
        let format = if dtype == DType::F8E4M3 {
            Fp8::E4M3
        } else {
            Fp8::E5M2
        };
        let routine = format.encode_routine();
        self.inline_routine(&routine, &[value])[0]
    }

    /// `Stmt::LoadVec` into the registers `dsts`.
    pub(super) fn load_vector(
        &mut self,
        dsts: &[Reg],
        buf: Buf,
        index: &Expr,
    ) -> Result<(), EmitError> {
        let dtype = self.dtype(buf)?;
        let element = isa::element(dtype);
        let count = dsts.len();
        let total = element.bytes as usize * count;
        if !matches!(count, 2 | 4 | 8) || total > 16 {
            return Err(self.error(format!("a vector of {count} {dtype} elements")));
        }
        let address = self.address(buf, index, element.bytes, false)?;
        if element.bytes >= 4 {
            let list = brace_list(dsts);
            let opcode = format!(
                "ld.{}{}.{}",
                address.space,
                isa::vector_suffix(count),
                element.memory_type
            );
            self.inst(&opcode, &[&list, &address.text]);
            return Ok(());
        }
        let words = self.load_words(&address, total);
        self.unpack_elements(dtype, &words, dsts)
    }

    /// `Stmt::LoadVec` of raw 16-bit element pairs into the 32-bit registers `dsts`
    /// (`kiln_kir::loads_raw_pairs`): one `ld.b32` vector, no conversion.
    pub(super) fn load_raw_pairs(
        &mut self,
        dsts: &[Reg],
        buf: Buf,
        index: &Expr,
    ) -> Result<(), EmitError> {
        if !matches!(dsts.len(), 1 | 2 | 4) {
            return Err(self.error(format!("a vector of {} raw element pairs", dsts.len())));
        }
        let address = self.address(buf, index, 2, false)?;
        let opcode = format!("ld.{}{}.b32", address.space, isa::vector_suffix(dsts.len()));
        let list = match dsts {
            [one] => one.to_string(),
            _ => brace_list(dsts),
        };
        self.inst(&opcode, &[&list, &address.text]);
        Ok(())
    }

    /// `Stmt::LdMatrix`: `ldmatrix.sync.aligned.m8n8.xN[.trans].shared.b16`.
    pub(super) fn ldmatrix(
        &mut self,
        dsts: &[Reg],
        trans: bool,
        buf: Buf,
        index: &Expr,
    ) -> Result<(), EmitError> {
        let bytes = self.dtype(buf)?.size_bytes() as u32;
        let address = self.address(buf, index, bytes, false)?;
        if address.space != "shared" || !matches!(dsts.len(), 1 | 2 | 4) {
            return Err(self.error(format!(
                "an ldmatrix of {} matrices from {} memory",
                dsts.len(),
                address.space
            )));
        }
        let opcode = format!(
            "ldmatrix.sync.aligned.m8n8.x{}{}.shared.b16",
            dsts.len(),
            if trans { ".trans" } else { "" }
        );
        self.inst(&opcode, &[&brace_list(dsts), &address.text]);
        Ok(())
    }

    /// `dst = atomicAdd(&buf[index], value)`: a relaxed GPU-scope `atom` (the default of an
    /// `atom` without qualifiers). What it publishes is ordered by the `Fence`s around it
    /// (`fence.acq_rel.gpu`, `Stmt::Fence`): in the PTX memory model a release fence
    /// followed by a strong (atomic) write in one thread, and a strong read of that value
    /// followed by an acquire fence in another, synchronize at GPU scope, and `bar.sync`
    /// before the first and after the second extends that order to the other threads of both
    /// blocks (causality order is transitive), so plain `ld.global` loads after it see the
    /// stores made before it. Never `.nc`: the buffers are written by the kernel.
    pub(super) fn atomic_add(
        &mut self,
        dst: Reg,
        buf: Buf,
        index: &Expr,
        value: &Expr,
    ) -> Result<(), EmitError> {
        let address = self.address(buf, index, 4, true)?;
        if address.space != "global" {
            return Err(self.error(format!("an atomic add to {} memory", address.space)));
        }
        let value = self.expr(value)?;
        let value = match value.operand {
            Operand::Imm(Scalar::I32(n)) => Operand::Imm(Scalar::I32(n)),
            operand => Operand::Reg(self.reg(operand, RegKind::B32)),
        };
        self.inst("atom.global.add.u32", &[&dst, &address.text, &value]);
        Ok(())
    }

    /// `cp.async.bulk.prefetch.L2.global [address], size;` (the caller checked the feature).
    pub(super) fn prefetch_l2(
        &mut self,
        buf: Buf,
        index: &Expr,
        bytes: &Expr,
    ) -> Result<(), EmitError> {
        let element = self.dtype(buf)?.size_bytes() as u32;
        let address = self.address(buf, index, element, false)?;
        if !address.space.starts_with("global") {
            return Err(self.error(format!("an L2 prefetch of {} memory", address.space)));
        }
        let size = self.expr(bytes)?;
        let size = match size.operand {
            Operand::Imm(Scalar::I32(n)) => Operand::Imm(Scalar::I32(n)),
            operand => Operand::Reg(self.reg(operand, RegKind::B32)),
        };
        self.inst("cp.async.bulk.prefetch.L2.global", &[&address.text, &size]);
        Ok(())
    }

    /// `Stmt::CpAsync`: `cp.async.cg.shared.global [dst], [src], 16[, src-size]`, the
    /// source size in bytes (omitted when it is a constant 16).
    pub(super) fn cp_async(
        &mut self,
        dst: Buf,
        dst_index: &Expr,
        src: Buf,
        src_index: &Expr,
        src_len: &Expr,
    ) -> Result<(), EmitError> {
        let dtype = self.dtype(dst)?;
        let bytes = dtype.size_bytes() as u32;
        let destination = self.address(dst, dst_index, bytes, true)?;
        // The source is read through the async proxy, never `.nc`: the address is the same.
        let source = self.address(src, src_index, bytes, false)?;
        if destination.space != "shared" || !source.space.starts_with("global") {
            return Err(self.error(format!(
                "a cp.async from {} to {} memory",
                source.space, destination.space
            )));
        }
        let len = self.expr(src_len)?;
        match len.operand {
            Operand::Imm(Scalar::I32(n)) if n as u32 * bytes == 16 => {
                self.inst(
                    "cp.async.cg.shared.global",
                    &[&destination.text, &source.text, &16],
                );
            }
            Operand::Imm(Scalar::I32(n)) => {
                let size = (n as u32).wrapping_mul(bytes);
                self.inst(
                    "cp.async.cg.shared.global",
                    &[&destination.text, &source.text, &16, &size],
                );
            }
            operand => {
                let count = self.reg(operand, RegKind::B32);
                let size = self.fresh(RegKind::B32);
                self.inst("mul.lo.s32", &[&size, &count, &bytes]);
                self.inst(
                    "cp.async.cg.shared.global",
                    &[&destination.text, &source.text, &16, &size],
                );
            }
        }
        Ok(())
    }

    /// Loads `total` bytes (2, 4, 8 or 16) as 32-bit words (2 bytes: one word whose upper
    /// half is zero).
    fn load_words(&mut self, address: &Address, total: usize) -> Vec<Reg> {
        if total == 2 {
            let half = self.fresh(RegKind::B16);
            self.inst(
                &format!("ld.{}.b16", address.space),
                &[&half, &address.text],
            );
            return vec![self.unary_into(RegKind::B32, "cvt.u32.u16", half)];
        }
        let words: Vec<Reg> = (0..total / 4).map(|_| self.fresh(RegKind::B32)).collect();
        let opcode = format!(
            "ld.{}{}.b32",
            address.space,
            isa::vector_suffix(words.len())
        );
        let list = brace_list(&words);
        self.inst(&opcode, &[&list, &address.text]);
        words
    }

    /// Unpacks the 1- or 2-byte elements of `dtype` in `words` into `dsts`.
    fn unpack_elements(
        &mut self,
        dtype: DType,
        words: &[Reg],
        dsts: &[Reg],
    ) -> Result<(), EmitError> {
        match dtype {
            DType::BF16 => {
                for (k, &dst) in dsts.iter().enumerate() {
                    self.bf16_half_to_f32(words[k / 2], k % 2 == 0, dst);
                }
            }
            DType::F16 => {
                for (word, pair) in words.iter().zip(dsts.chunks(2)) {
                    let (lo, hi) = self.split_word(*word);
                    self.inst("cvt.f32.f16", &[&pair[0], &lo]);
                    self.inst("cvt.f32.f16", &[&pair[1], &hi]);
                }
            }
            DType::F8E4M3 | DType::F8E5M2 if self.ctx.use_feature(Feature::Fp8Convert) => {
                // Each .b16 half of a word holds two elements, converted to f16x2 at once.
                let halves: Vec<Reg> = words
                    .iter()
                    .flat_map(|&word| {
                        let (lo, hi) = self.split_word(word);
                        [lo, hi]
                    })
                    .collect();
                for (&pair, dst_pair) in halves.iter().zip(dsts.chunks(2)) {
                    let f16x2 = self.unary_into(RegKind::B32, fp8_to_f16x2(dtype), pair);
                    let (lo, hi) = self.split_word(f16x2);
                    self.inst("cvt.f32.f16", &[&dst_pair[0], &lo]);
                    self.inst("cvt.f32.f16", &[&dst_pair[1], &hi]);
                }
            }
            DType::F8E4M3 | DType::F8E5M2 | DType::I8 | DType::Bool => {
                for (k, &dst) in dsts.iter().enumerate() {
                    let (word, bit) = (words[k / 4], 8 * (k % 4) as u32);
                    match dtype {
                        DType::I8 => self.inst("bfe.s32", &[&dst, &word, &bit, &8]),
                        DType::Bool => {
                            let byte = self.fresh(RegKind::B32);
                            self.inst("bfe.u32", &[&byte, &word, &bit, &8]);
                            self.inst("setp.ne.u32", &[&dst, &byte, &0]);
                        }
                        _ => {
                            let byte = self.fresh(RegKind::B32);
                            self.inst("bfe.u32", &[&byte, &word, &bit, &8]);
                            let value = self.decode_fp8_byte(dtype, byte);
                            self.inst("mov.f32", &[&dst, &value]);
                        }
                    }
                }
            }
            other => return Err(self.error(format!("packed elements of {other}"))),
        }
        Ok(())
    }

    /// The low and high `.b16` halves of a 32-bit word.
    fn split_word(&mut self, word: Reg) -> (Reg, Reg) {
        let (lo, hi) = (self.fresh(RegKind::B16), self.fresh(RegKind::B16));
        self.inst("mov.b32", &[&format!("{{{lo}, {hi}}}"), &word]);
        (lo, hi)
    }

    /// `Stmt::StoreVec` of `values` (already evaluated, of the compute type).
    pub(super) fn store_vector(
        &mut self,
        buf: Buf,
        index: &Expr,
        values: &[Value],
    ) -> Result<(), EmitError> {
        let dtype = self.dtype(buf)?;
        let element = isa::element(dtype);
        let count = values.len();
        let total = element.bytes as usize * count;
        if !matches!(count, 2 | 4 | 8) || total > 16 {
            return Err(self.error(format!("a vector of {count} {dtype} elements")));
        }
        let compute = Ty::compute_type_of(dtype);
        let regs: Vec<Reg> = values
            .iter()
            .map(|&v| {
                let v = self.cast(v, compute);
                self.value_reg(v)
            })
            .collect();
        let address = self.address(buf, index, element.bytes, true)?;
        if element.bytes >= 4 {
            let opcode = format!(
                "st.{}{}.{}",
                address.space,
                isa::vector_suffix(count),
                element.memory_type
            );
            self.inst(&opcode, &[&address.text, &brace_list(&regs)]);
            return Ok(());
        }
        let words = self.pack_words(dtype, &regs)?;
        if total == 2 {
            let half = self.unary_into(RegKind::B16, "cvt.u16.u32", words[0]);
            self.inst(
                &format!("st.{}.b16", address.space),
                &[&address.text, &half],
            );
        } else {
            let opcode = format!(
                "st.{}{}.b32",
                address.space,
                isa::vector_suffix(words.len())
            );
            self.inst(&opcode, &[&address.text, &brace_list(&words)]);
        }
        Ok(())
    }

    /// Packs 1- or 2-byte elements into 32-bit words (a last partial word holds two bytes
    /// in its low half).
    fn pack_words(&mut self, dtype: DType, values: &[Reg]) -> Result<Vec<Reg>, EmitError> {
        match dtype {
            DType::BF16 | DType::F16 => {
                let opcode = if dtype == DType::BF16 {
                    "cvt.rn.bf16x2.f32"
                } else {
                    "cvt.rn.f16x2.f32"
                };
                // d = {a → upper half, b → lower half}: the later element is `a`.
                Ok(values
                    .chunks(2)
                    .map(|pair| {
                        let word = self.fresh(RegKind::B32);
                        self.inst(opcode, &[&word, &pair[1], &pair[0]]);
                        word
                    })
                    .collect())
            }
            DType::F8E4M3 | DType::F8E5M2 if self.ctx.use_feature(Feature::Fp8Convert) => {
                let pairs: Vec<Reg> = values
                    .chunks(2)
                    .map(|pair| {
                        let packed = self.fresh(RegKind::B16);
                        self.inst(fp8_from_f32x2(dtype), &[&packed, &pair[1], &pair[0]]);
                        packed
                    })
                    .collect();
                Ok(pairs
                    .chunks(2)
                    .map(|halves| {
                        let word = self.fresh(RegKind::B32);
                        if let [lo, hi] = halves {
                            self.inst("mov.b32", &[&word, &format!("{{{lo}, {hi}}}")]);
                        } else {
                            self.inst("cvt.u32.u16", &[&word, &halves[0]]);
                        }
                        word
                    })
                    .collect())
            }
            DType::F8E4M3 | DType::F8E5M2 | DType::I8 | DType::Bool => {
                let bytes: Vec<Reg> = values
                    .iter()
                    .map(|&value| match dtype {
                        DType::I8 => value,
                        DType::Bool => {
                            let byte = self.fresh(RegKind::B32);
                            self.inst("selp.b32", &[&byte, &1, &0, &value]);
                            byte
                        }
                        _ => self.encode_fp8(dtype, value),
                    })
                    .collect();
                Ok(bytes
                    .chunks(4)
                    .map(|group| {
                        let mut word = group[0];
                        for (j, byte) in group.iter().enumerate().skip(1) {
                            let next = self.fresh(RegKind::B32);
                            self.inst("bfi.b32", &[&next, byte, &word, &(8 * j as u32), &8]);
                            word = next;
                        }
                        word
                    })
                    .collect())
            }
            other => Err(self.error(format!("packed elements of {other}"))),
        }
    }
}

/// `[base+offset]`, or `[base]` for offset 0.
fn with_offset(base: &str, offset: i64) -> String {
    if offset == 0 {
        format!("[{base}]")
    } else {
        format!("[{base}+{offset}]")
    }
}

/// `{r1, r2, ...}`.
fn brace_list(regs: &[Reg]) -> String {
    let names: Vec<String> = regs.iter().map(|r| r.to_string()).collect();
    format!("{{{}}}", names.join(", "))
}

fn fp8_to_f16x2(dtype: DType) -> &'static str {
    if dtype == DType::F8E4M3 {
        "cvt.rn.f16x2.e4m3x2"
    } else {
        "cvt.rn.f16x2.e5m2x2"
    }
}

fn fp8_from_f32x2(dtype: DType) -> &'static str {
    if dtype == DType::F8E4M3 {
        "cvt.rn.satfinite.e4m3x2.f32"
    } else {
        "cvt.rn.satfinite.e5m2x2.f32"
    }
}
