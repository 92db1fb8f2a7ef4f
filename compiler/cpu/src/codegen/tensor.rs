//! Cranelift lowering of the tensor-core statements: `Mma` and `LdMatrix` as block-level
//! exchanges between the threads' register slots (the fragment layouts of
//! `kiln_kir::tensor`), `CpAsync` as an immediate copy inside a thread loop.

use super::{data_flags, own_flags, CpuError, Emitter, FaultCode, Lane, Operand};
use crate::fission::expr_vars;
use crate::helpers::Helper;
use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::{types, BlockArg, InstBuilder, MemFlagsData, Type, Value};
use kiln_kir::{Buf, Expr, MmaInput, Stmt, Ty, VarId};
use std::collections::BTreeSet;

impl Emitter<'_, '_> {
    fn slot_offsets(&self, vars: &[VarId]) -> Result<Vec<i32>, CpuError> {
        vars.iter().map(|&v| self.slot_offset(v)).collect()
    }

    /// The f32 value of element `i` of a packed `I32` word of `input` values (two 16-bit
    /// halves or four FP8 bytes).
    fn element_value(&mut self, input: MmaInput, word: Value, i: usize) -> Value {
        match input {
            MmaInput::Bf16 => {
                let bits = if i == 0 {
                    self.builder.ins().ishl_imm_s(word, 16)
                } else {
                    self.builder.ins().band_imm_s(word, -65536)
                };
                self.builder
                    .ins()
                    .bitcast(types::F32, MemFlagsData::new(), bits)
            }
            MmaInput::F16 => {
                let bits = if i == 0 {
                    self.builder.ins().band_imm_s(word, 0xFFFF)
                } else {
                    self.builder.ins().ushr_imm_s(word, 16)
                };
                self.call_helper(Helper::F16ToF32, &[bits])
            }
            MmaInput::E4M3 | MmaInput::E5M2 => {
                let shifted = self.builder.ins().ushr_imm_s(word, 8 * i as i64);
                let bits = self.builder.ins().band_imm_s(shifted, 0xFF);
                let helper = if input == MmaInput::E4M3 {
                    Helper::E4m3ToF32
                } else {
                    Helper::E5m2ToF32
                };
                self.call_helper(helper, &[bits])
            }
        }
    }

    /// `Stmt::Mma` for every warp: each thread reads the A and B words of the lanes that
    /// hold its row and column, and its own C, and adds the products in k order with `fma`
    /// (as `kiln_kir::tensor::mma` does). A and B are `I32` and D `F32`, so writing
    /// D while later threads still read A and B is safe; C is read only by its own thread.
    pub(super) fn mma(&mut self, stmt: &Stmt) -> Result<(), CpuError> {
        let Stmt::Mma { input, d, a, b, c } = stmt else {
            return Err(self.invalid("not an mma statement"));
        };
        let input = *input;
        // p values a word; a run of 4p consecutive k is spread over the 4 lanes of a group.
        let p = input.per_register();
        let k_len = input.k();
        let (a_slots, b_slots) = (self.slot_offsets(a)?, self.slot_offsets(b)?);
        let (c_slots, d_slots) = (self.slot_offsets(c)?, self.slot_offsets(d)?);
        self.for_each_thread(&mut |this: &mut Self, thread, row| {
            let lane = this.builder.ins().band_imm_s(thread, 31);
            let warp_first = this.builder.ins().isub(thread, lane);
            let g = this.builder.ins().ushr_imm_s(lane, 2);
            let t = this.builder.ins().band_imm_s(lane, 3);
            let g4 = this.builder.ins().ishl_imm_s(g, 2);
            let a_lanes = this.builder.ins().iadd(warp_first, g4);
            let mut results = Vec::with_capacity(4);
            for j in 0..4 {
                let mut acc = this
                    .builder
                    .ins()
                    .load(types::F32, own_flags(), row, c_slots[j]);
                // Column 2t + j % 2 of B is held by lanes 4 * column ..= 4 * column + 3.
                let t8 = this.builder.ins().ishl_imm_s(t, 3);
                let column4 = this.builder.ins().iadd_imm_s(t8, 4 * (j as i64 % 2));
                let b_lanes = this.builder.ins().iadd(warp_first, column4);
                for word_k in (0..k_len).step_by(p) {
                    // k = word_k .. word_k + p: lane (k % 4p) / p of the group, register
                    // k / 4p (A: j / 2 + 2 · that).
                    let lane_in_group = ((word_k % (4 * p)) / p) as i64;
                    let reg = word_k / (4 * p);
                    let a_lane = this.builder.ins().iadd_imm_s(a_lanes, lane_in_group);
                    let a_row = this.scratch_row(a_lane);
                    let a_word = this.builder.ins().load(
                        types::I32,
                        own_flags(),
                        a_row,
                        a_slots[j / 2 + 2 * reg],
                    );
                    let b_lane = this.builder.ins().iadd_imm_s(b_lanes, lane_in_group);
                    let b_row = this.scratch_row(b_lane);
                    let b_word =
                        this.builder
                            .ins()
                            .load(types::I32, own_flags(), b_row, b_slots[reg]);
                    for i in 0..p {
                        let x = this.element_value(input, a_word, i);
                        let y = this.element_value(input, b_word, i);
                        acc = this.builder.ins().fma(x, y, acc);
                    }
                }
                results.push(acc);
            }
            for (value, slot) in results.into_iter().zip(&d_slots) {
                this.builder.ins().store(own_flags(), value, row, *slot);
            }
            Ok(())
        })
    }

    /// `Stmt::LdMatrix` for every warp: every thread's row index goes to the staging area
    /// first, then each thread gathers its halves from the rows its layout names.
    pub(super) fn ldmatrix(&mut self, stmt: &Stmt) -> Result<(), CpuError> {
        let Stmt::LdMatrix {
            dsts,
            trans,
            buf,
            index,
        } = stmt
        else {
            return Err(self.invalid("not an ldmatrix statement"));
        };
        let dst_slots = self.slot_offsets(dsts)?;
        let staging = self.layout.shuffle_offset as i64;
        let mut index_vars = BTreeSet::new();
        expr_vars(index, &mut index_vars);
        self.for_each_thread(&mut |this: &mut Self, thread, row| {
            for &var in &index_vars {
                let ty = this.var_ty(var)?;
                let offset = this.slot_offset(var)?;
                let value = this
                    .builder
                    .ins()
                    .load(super::clif_type(ty), own_flags(), row, offset);
                this.builder.def_var(this.vars[var.0 as usize], value);
            }
            let start = this.index_value(Lane::Thread(thread), index)?;
            let stage = this.staging_address(thread, staging);
            this.builder.ins().store(own_flags(), start, stage, 0);
            Ok(())
        })?;
        let operand = self.operand(*buf)?;
        let trans = *trans;
        // Elements of one 16-bit position: 2 for an 8-bit array (a row is 16 of them).
        let per_half: i64 = if operand.dtype.size_bytes() == 1 {
            2
        } else {
            1
        };
        self.for_each_thread(&mut |this: &mut Self, thread, row| {
            let lane = this.builder.ins().band_imm_s(thread, 31);
            let warp_first = this.builder.ins().isub(thread, lane);
            let g = this.builder.ins().ushr_imm_s(lane, 2);
            let t = this.builder.ins().band_imm_s(lane, 3);
            let t2 = this.builder.ins().ishl_imm_s(t, 1);
            for (matrix, slot) in dst_slots.iter().enumerate() {
                let mut halves = Vec::with_capacity(2);
                for half in 0..2i64 {
                    let matrix_first = this.builder.ins().iadd_imm_s(warp_first, 8 * matrix as i64);
                    let (row_in_matrix, offset) = if trans {
                        (this.builder.ins().iadd_imm_s(t2, half), g)
                    } else {
                        (g, this.builder.ins().iadd_imm_s(t2, half))
                    };
                    let source = this.builder.ins().iadd(matrix_first, row_in_matrix);
                    let stage = this.staging_address(source, staging);
                    let start = this.builder.ins().load(types::I64, own_flags(), stage, 0);
                    let offset = if per_half == 2 {
                        this.builder.ins().ishl_imm_s(offset, 1)
                    } else {
                        offset
                    };
                    let element = this.ldmatrix_element(&operand, source, start, offset, per_half);
                    let address = this.element_address(&operand, element);
                    halves.push(
                        this.builder
                            .ins()
                            .uload16(types::I32, data_flags(), address, 0),
                    );
                }
                let high = this.builder.ins().ishl_imm_s(halves[1], 16);
                let word = this.builder.ins().bor(halves[0], high);
                this.builder.ins().store(own_flags(), word, row, *slot);
            }
            Ok(())
        })
    }

    /// Checks the row start `start` (`I64`) staged by thread `source` (a row is 16 bytes,
    /// `8 · per_half` elements) and returns the index of element `offset` (`I32`) of that
    /// row, whose 16 bits (`per_half` elements) must lie in the array.
    fn ldmatrix_element(
        &mut self,
        operand: &Operand,
        source: Value,
        start: Value,
        offset: Value,
        per_half: i64,
    ) -> Value {
        let thread = self.builder.ins().uextend(types::I64, source);
        let buffer = self.iconst(types::I64, operand.fault_id as i64);
        let eight = self.const_i64(8 * per_half);
        let misaligned = self.builder.ins().band_imm_s(start, 8 * per_half - 1);
        let aligned = self.builder.ins().icmp_imm_s(IntCC::Equal, misaligned, 0);
        let code = self.const_i64(FaultCode::Misaligned as i64);
        self.guard(aligned, [code, buffer, start, eight, thread]);
        let offset = self.builder.ins().uextend(types::I64, offset);
        let element = self.builder.ins().iadd(start, offset);
        let last = self.builder.ins().iadd_imm_s(element, per_half - 1);
        let in_bounds = self
            .builder
            .ins()
            .icmp(IntCC::UnsignedLessThan, last, operand.len);
        let code = self.const_i64(FaultCode::OutOfBounds as i64);
        self.guard(in_bounds, [code, buffer, element, eight, thread]);
        element
    }

    /// An `I32`/`I64` index expression as `I64`.
    fn index_value(&mut self, lane: Lane, index: &Expr) -> Result<Value, CpuError> {
        let (value, ty) = self.expr(lane, index)?;
        match ty {
            Ty::I64 => Ok(value),
            Ty::I32 => Ok(self.builder.ins().sextend(types::I64, value)),
            other => Err(self.invalid(format!("an index of type {other}"))),
        }
    }

    /// `Stmt::CpAsync` for one thread, copied at once: `src_len` elements, then zeros.
    pub(super) fn cp_async(
        &mut self,
        lane: Lane,
        [dst, src]: [Buf; 2],
        dst_index: &Expr,
        src_index: &Expr,
        src_len: &Expr,
    ) -> Result<(), CpuError> {
        let destination = self.operand(dst)?;
        let source = self.operand(src)?;
        let size = destination.dtype.size_bytes();
        let width = 16 / size;
        let first = self.checked_index(lane, &destination, dst_index, width)?;
        let start = self.index_value(lane, src_index)?;
        let len = self.expr_of_type(lane, src_len, Ty::I32)?;
        let len = self.builder.ins().sextend(types::I64, len);
        let thread = self.thread_word(lane);
        let buffer = self.iconst(types::I64, source.fault_id as i64);
        let width_word = self.const_i64(width as i64);
        let out_of_bounds = self.const_i64(FaultCode::OutOfBounds as i64);
        let len_ok =
            self.builder
                .ins()
                .icmp_imm_s(IntCC::UnsignedLessThanOrEqual, len, width as i64);
        self.guard(len_ok, [out_of_bounds, buffer, len, width_word, thread]);
        let misaligned = self.builder.ins().band_imm_s(start, width as i64 - 1);
        let aligned = self.builder.ins().icmp_imm_s(IntCC::Equal, misaligned, 0);
        let code = self.const_i64(FaultCode::Misaligned as i64);
        self.guard(aligned, [code, buffer, start, width_word, thread]);
        let end = self.builder.ins().iadd(start, len);
        let last = self.builder.ins().iadd_imm_s(end, -1);
        let empty = self.builder.ins().icmp_imm_s(IntCC::Equal, len, 0);
        let first_in = self
            .builder
            .ins()
            .icmp(IntCC::UnsignedLessThan, start, source.len);
        let last_in = self
            .builder
            .ins()
            .icmp(IntCC::UnsignedLessThan, last, source.len);
        let inside = self.builder.ins().band(first_in, last_in);
        let readable = self.builder.ins().bor(empty, inside);
        self.guard(readable, [out_of_bounds, buffer, start, len, thread]);
        let raw: Type = match size {
            1 => types::I8,
            2 => types::I16,
            4 => types::I32,
            _ => types::I64,
        };
        for element in 0..width as i64 {
            let take = self
                .builder
                .ins()
                .icmp_imm_s(IntCC::SignedGreaterThan, len, element);
            let load_block = self.builder.create_block();
            let merge = self.builder.create_block();
            self.builder.append_block_param(merge, raw);
            let zero = self.builder.ins().iconst(raw, 0);
            self.builder
                .ins()
                .brif(take, load_block, &[], merge, &[BlockArg::from(zero)]);
            self.builder.seal_block(load_block);
            self.builder.switch_to_block(load_block);
            let index = self.builder.ins().iadd_imm_s(start, element);
            let address = self.element_address(&source, index);
            let value = self.builder.ins().load(raw, data_flags(), address, 0);
            self.builder.ins().jump(merge, &[BlockArg::from(value)]);
            self.builder.seal_block(merge);
            self.builder.switch_to_block(merge);
            let value = self.builder.block_params(merge)[0];
            let index = self.builder.ins().iadd_imm_s(first, element);
            let address = self.element_address(&destination, index);
            self.builder.ins().store(data_flags(), value, address, 0);
        }
        Ok(())
    }
}
