//! Four points at a time: the innermost left-hand index of an Einsum in f32x4 lanes.
//!
//! An Einsum qualifies when its innermost index `v` is the last position of its target (so the
//! four results are contiguous), and every read either does not mention `v` (one value, splatted)
//! or has `v` as the bare last subscript (four contiguous values). Definedness travels as an
//! i32x4 lane mask. Functions without a vector form (`exp`, ...) are called lane by lane.

use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::{types, Endianness, InstBuilder, MemFlagsData, Value};

use super::codegen::{Def, Gen};
use crate::ir::*;
use crate::math;
use crate::schedule::lanes::{invariant_factors, reduction, Reduction};

pub const LANES: i64 = 4;

/// The tier Cranelift's code runs on: vectors of four floats in x86-64's sixteen registers.
pub const TIER: crate::schedule::HostTier = crate::schedule::HostTier { lanes: LANES as usize, registers: 16 };

/// Rows of a register block (see `Gen::compute_vector_rows`), from the layer's shape for the tier.
pub const BLOCK_ROWS: i64 = crate::schedule::lanes::register_block(TIER).rows as i64;

/// Vectors side by side in a register block.
pub const BLOCK_COLUMNS: i64 = crate::schedule::lanes::register_block(TIER).columns as i64;

/// Steps of the reduced index per loop iteration in a block of rows with that index in lanes
/// (see `Gen::compute_lane_rows`): Cranelift does not unroll, and a loop of one multiply-add per
/// row spends as many instructions again on its counter, its offsets and reloads, so that fewer
/// of its loads are in flight when they miss the cache (decode's scores read every key once).
const LANE_ROWS_UNROLL: i64 = 2;

/// The cells of a register block: `rows` along `u` by `columns` vectors along `v`. With
/// `u == Some(v)`, the rows are vectors side by side (`LANES` apart) and there is one column;
/// without `u`, one row.
#[derive(Clone, Copy)]
pub struct Block {
    pub u: Option<Index>,
    pub rows: i64,
    pub v: Index,
    pub columns: i64,
}

impl Block {
    pub fn single(v: Index) -> Block {
        Block { u: None, rows: 1, v, columns: 1 }
    }

    pub fn cells(&self) -> usize {
        (self.rows * self.columns) as usize
    }

    /// The distance between rows, in points of `u`.
    pub fn row_step(&self) -> i64 {
        if self.u == Some(self.v) {
            LANES
        } else {
            1
        }
    }
}

impl Gen<'_, '_> {
    fn splat(&mut self, x: Value) -> Value {
        self.b.ins().splat(types::F32X4, x)
    }

    /// `exp` in lanes, as Cephes' `expf`: `x = n ln 2 + r`, a degree-6 polynomial in `r`, and
    /// `2^n` applied in two halves (at once for `Range::NonPositive`); 0 where the result would be
    /// subnormal (below `EXP_LO`), above 89 infinity, and NaN stays NaN (the same code as the LLVM
    /// tier's and `math::exp`).
    fn vector_exp(&mut self, x: Value, range: math::Range) -> Value {
        let constant = |g: &mut Self, c: f32| {
            let s = g.b.ins().f32const(c);
            g.splat(s)
        };
        let integer = |g: &mut Self, c: i64| {
            let s = g.b.ins().iconst(types::I32, c);
            g.b.ins().splat(types::I32X4, s)
        };
        let lo = constant(self, math::EXP_LO);
        let below = self.b.ins().fcmp(FloatCC::LessThan, x, lo);
        let below = self.as_floats(below);
        let x1 = self.b.ins().bitselect(below, lo, x);
        let x2 = match range {
            math::Range::Any => {
                let hi = constant(self, math::EXP_HI);
                let above = self.b.ins().fcmp(FloatCC::GreaterThan, x1, hi);
                let above = self.as_floats(above);
                self.b.ins().bitselect(above, hi, x1)
            }
            math::Range::NonPositive => x1,
        };
        let log2e = constant(self, std::f32::consts::LOG2_E);
        let half = constant(self, 0.5);
        let t = self.b.ins().fma(x2, log2e, half);
        let n = self.b.ins().floor(t);
        let c1 = constant(self, math::EXP_LN2_HI);
        let r = self.b.ins().fma(n, c1, x2);
        let c2 = constant(self, math::EXP_LN2_LO);
        let r = self.b.ins().fma(n, c2, r);
        let p = self.vector_horner(&math::EXP_POLY, r);
        let rr = self.b.ins().fmul(r, r);
        let y = self.b.ins().fma(p, rr, r);
        let one = constant(self, 1.0);
        let mut y = self.b.ins().fadd(y, one);
        let ni = self.b.ins().fcvt_to_sint_sat(types::I32X4, n);
        let factors = match range {
            math::Range::Any => {
                let first = self.b.ins().sshr_imm_s(ni, 1);
                vec![first, self.b.ins().isub(ni, first)]
            }
            math::Range::NonPositive => vec![ni],
        };
        for k in factors {
            let bias = integer(self, 127);
            let biased = self.b.ins().iadd(k, bias);
            let bits = self.b.ins().ishl_imm_s(biased, 23);
            let factor = self.as_floats(bits);
            y = self.b.ins().fmul(y, factor);
        }
        let zero = constant(self, 0.0);
        let zeroed = self.b.ins().bitselect(below, zero, y);
        let nan = self.b.ins().fcmp(FloatCC::Unordered, x, x);
        let nan = self.as_floats(nan);
        self.b.ins().bitselect(nan, x, zeroed)
    }

    fn vconst(&mut self, c: f32) -> Value {
        let s = self.b.ins().f32const(c);
        self.splat(s)
    }

    /// Horner's rule with fused multiply-adds, highest degree first (`math::horner`).
    fn vector_horner(&mut self, coefficients: &[f32], x: Value) -> Value {
        let mut p = self.vconst(coefficients[0]);
        for c in &coefficients[1..] {
            let c = self.vconst(*c);
            p = self.b.ins().fma(p, x, c);
        }
        p
    }

    /// `select(condition, a, b)` on lanes, the condition a float comparison.
    fn vselect(&mut self, cc: FloatCC, x: Value, y: Value, a: Value, b: Value) -> Value {
        let mask = self.b.ins().fcmp(cc, x, y);
        let mask = self.as_floats(mask);
        self.b.ins().bitselect(mask, a, b)
    }

    /// `math::log` in lanes.
    fn vector_log(&mut self, x: Value) -> Value {
        let integer = |g: &mut Self, c: i64| {
            let s = g.b.ins().iconst(types::I32, c);
            g.b.ins().splat(types::I32X4, s)
        };
        let min_normal = self.vconst(f32::MIN_POSITIVE);
        let scale = self.vconst(8_388_608.0);
        let scaled = self.b.ins().fmul(x, scale);
        let xs = self.vselect(FloatCC::LessThan, x, min_normal, scaled, x);
        let tiny = self.b.ins().fcmp(FloatCC::LessThan, x, min_normal);
        let (sub_bias, bias) = (integer(self, -149), integer(self, -126));
        let bias = self.b.ins().bitselect(tiny, sub_bias, bias);
        let bits = self.b.ins().bitcast(types::I32X4, MemFlagsData::new().with_endianness(Endianness::Little), xs);
        let shifted = self.b.ins().ushr_imm_u(bits, 23);
        let mask = integer(self, 255);
        let biased = self.b.ins().band(shifted, mask);
        let exponent = self.b.ins().iadd(biased, bias);
        let keep = integer(self, 0x007f_ffff);
        let mantissa = self.b.ins().band(bits, keep);
        let half = integer(self, 0x3f00_0000);
        let mantissa = self.b.ins().bor(mantissa, half);
        let m = self.as_floats(mantissa);
        let e = self.b.ins().fcvt_from_sint(types::F32X4, exponent);
        let root = self.vconst(std::f32::consts::FRAC_1_SQRT_2);
        let doubled = self.b.ins().fadd(m, m);
        let one = self.vconst(1.0);
        let e_less = self.b.ins().fsub(e, one);
        let e = self.vselect(FloatCC::LessThan, m, root, e_less, e);
        let m = self.vselect(FloatCC::LessThan, m, root, doubled, m);
        let z = self.b.ins().fsub(m, one);
        let z2 = self.b.ins().fmul(z, z);
        let p = self.vector_horner(&math::LOG_POLY, z);
        let zz2 = self.b.ins().fmul(z, z2);
        let y = self.b.ins().fmul(zz2, p);
        let lo = self.vconst(math::LOG_LN2_LO);
        let y = self.b.ins().fma(e, lo, y);
        let minus_half = self.vconst(-0.5);
        let y = self.b.ins().fma(z2, minus_half, y);
        let r = self.b.ins().fadd(z, y);
        let hi = self.vconst(math::LOG_LN2_HI);
        let r = self.b.ins().fma(e, hi, r);
        let zero = self.vconst(0.0);
        let minus_inf = self.vconst(f32::NEG_INFINITY);
        let r = self.vselect(FloatCC::Equal, x, zero, minus_inf, r);
        let nan = self.vconst(f32::NAN);
        let r = self.vselect(FloatCC::LessThan, x, zero, nan, r);
        let inf = self.vconst(f32::INFINITY);
        let r = self.vselect(FloatCC::Equal, x, inf, x, r);
        self.vselect(FloatCC::Unordered, x, x, x, r)
    }

    /// `math::tanh` in lanes.
    fn vector_tanh(&mut self, x: Value) -> Value {
        // The polynomial alone where every lane is small (`math::tanh`), else lane by lane.
        let a = self.b.ins().fabs(x);
        let bound = self.vconst(math::TANH_SMALL);
        let small = self.b.ins().fcmp(FloatCC::LessThan, a, bound);
        let all = self.b.ins().vall_true(small);
        self.branch(all, &mut |g| g.vector_tanh_small(x), &mut |g| {
            let near = g.vector_tanh_small(x);
            let far = g.vector_tanh_rational(x);
            let small = g.as_floats(small);
            g.b.ins().bitselect(small, near, far)
        })
    }

    /// `if condition { then } else { otherwise }` for a value of four float lanes.
    fn branch(
        &mut self,
        condition: Value,
        then: &mut dyn FnMut(&mut Self) -> Value,
        otherwise: &mut dyn FnMut(&mut Self) -> Value,
    ) -> Value {
        let (yes, no, join) = (self.b.create_block(), self.b.create_block(), self.b.create_block());
        self.b.append_block_param(join, types::F32X4);
        self.b.ins().brif(condition, yes, &[], no, &[]);
        self.enter(yes);
        let value = then(self);
        self.b.ins().jump(join, &[value.into()]);
        self.enter(no);
        let value = otherwise(self);
        self.b.ins().jump(join, &[value.into()]);
        self.enter(join);
        self.b.block_params(join)[0]
    }

    /// `math::tanh_small` in lanes.
    fn vector_tanh_small(&mut self, x: Value) -> Value {
        let z = self.b.ins().fmul(x, x);
        let p = self.vector_horner(&math::TANH_POLY, z);
        let xz = self.b.ins().fmul(x, z);
        let r = self.b.ins().fma(xz, p, x);
        let zero = self.vconst(0.0);
        self.vselect(FloatCC::Equal, x, zero, x, r)
    }

    /// `math::tanh_rational` in lanes.
    fn vector_tanh_rational(&mut self, x: Value) -> Value {
        let hi = self.vconst(math::TANH_CLAMP);
        let lo = self.vconst(-math::TANH_CLAMP);
        let x1 = self.vselect(FloatCC::GreaterThan, x, hi, hi, x);
        let x2 = self.vselect(FloatCC::LessThan, x1, lo, lo, x1);
        let z = self.b.ins().fmul(x2, x2);
        let n = self.vector_horner(&math::TANH_NUM, z);
        let d = self.vector_horner(&math::TANH_DEN, z);
        let xn = self.b.ins().fmul(x2, n);
        let r = self.b.ins().fdiv(xn, d);
        let one = self.vconst(1.0);
        let minus_one = self.vconst(-1.0);
        let r = self.vselect(FloatCC::GreaterThan, r, one, one, r);
        self.vselect(FloatCC::LessThan, r, minus_one, minus_one, r)
    }

    /// `math::sigmoid` in lanes.
    fn vector_sigmoid(&mut self, x: Value) -> Value {
        let a = self.b.ins().fabs(x);
        let na = self.b.ins().fneg(a);
        let e = self.vector_exp(na, math::Range::NonPositive);
        let one = self.vconst(1.0);
        let d = self.b.ins().fadd(e, one);
        let q = self.b.ins().fdiv(one, d);
        let eq = self.b.ins().fmul(e, q);
        let zero = self.vconst(0.0);
        self.vselect(FloatCC::LessThan, x, zero, eq, q)
    }

    /// `math::softplus` in lanes.
    fn vector_softplus(&mut self, x: Value) -> Value {
        let a = self.b.ins().fabs(x);
        let na = self.b.ins().fneg(a);
        let y = self.vector_exp(na, math::Range::NonPositive);
        let p = self.vector_horner(&math::LOG1P_POLY, y);
        let log1p = self.b.ins().fmul(y, p);
        let zero = self.vconst(0.0);
        let part = self.vselect(FloatCC::GreaterThan, x, zero, x, zero);
        let sum = self.b.ins().fadd(part, log1p);
        self.vselect(FloatCC::Unordered, x, x, x, sum)
    }

    /// A scalar definedness (i8) as a lane mask.
    pub(super) fn lanes(&mut self, defined: Def) -> Def {
        let defined = defined?;
        let all = self.b.ins().iconst(types::I32, -1);
        let none = self.b.ins().iconst(types::I32, 0);
        let lane = self.b.ins().select(defined, all, none);
        Some(self.b.ins().splat(types::I32X4, lane))
    }

    pub(super) fn as_floats(&mut self, mask: Value) -> Value {
        self.b.ins().bitcast(types::F32X4, MemFlagsData::new().with_endianness(Endianness::Little), mask)
    }

    /// Runs `each` once per cell of a block, column after column: `v` bound to the first vector
    /// of each column, `u` to each row (`LANES` apart when `u == v`: vectors side by side).
    /// `self.cell` is the cell's number (`column * rows + row`) while `each` runs, and the
    /// enclosing block's again after.
    pub(super) fn each_cell(&mut self, block: Block, each: &mut dyn FnMut(&mut Self, usize)) {
        let outer = self.cell;
        // `v` need not be bound for a block of one column (the lanes of a reduced index).
        let first_v = if block.columns > 1 { Some(self.index(block.v)) } else { None };
        for column in 0..block.columns {
            if let Some(first_v) = first_v.filter(|_| column > 0) {
                let var = self.b.declare_var(types::I64);
                let at = self.b.ins().iadd_imm_s(first_v, column * LANES);
                self.b.def_var(var, at);
                self.env.push((block.v, var));
            }
            let first = block.u.map(|u| self.index(u));
            for row in 0..block.rows {
                let cell = (column * block.rows + row) as usize;
                self.cell = cell;
                match (block.u, first) {
                    (Some(u), Some(first)) if row > 0 => {
                        let var = self.b.declare_var(types::I64);
                        let at = self.b.ins().iadd_imm_s(first, row * block.row_step());
                        self.b.def_var(var, at);
                        self.env.push((u, var));
                        each(self, cell);
                        self.env.pop();
                    }
                    _ => each(self, cell),
                }
            }
            if column > 0 {
                self.env.pop();
            }
        }
        self.cell = outer;
    }

    /// A register block of a reduction (see `blockable_rows`): rows `u .. u + rows` by
    /// `columns` vectors from `v`, or with `u == v`, `rows` vectors side by side from `v` (a
    /// reduction with no rows to block, see `lanes::side_by_side`): one accumulator per cell in a
    /// register while the reduced indices run, so that each step loads a value shared by a row or
    /// a column once and keeps several additions in flight. Every cell is valid (the caller stops the block at the last valid
    /// row and vector). A statement filter decides which lanes exist: a block where none does is
    /// skipped (an empty tile of a causal mask), the others computed whole and stored masked.
    pub fn compute_vector_rows(&mut self, einsum: &Einsum, block: Block) {
        let (rows, v) = (block.cells() as i64, block.v);
        let Some(red) = reduction(&einsum.body) else { unreachable!("checked") };
        let Reduction { op, indices, body, epilogue, .. } = red;
        let zero = self.b.ins().f32const(0.0);
        let zeros = self.splat(zero);
        let none = self.b.ins().iconst(types::I32, 0);
        let nones = self.b.ins().splat(types::I32X4, none);
        // The caller's bounds keep every vector of `v` valid (and `u` is in no pair): the other
        // split pairs are one answer for the block.
        let valid = self.valid_pairs_but(&[], Some(v));
        let (then, otherwise, join) = (self.b.create_block(), self.b.create_block(), self.b.create_block());
        match valid {
            Some(valid) => self.b.ins().brif(valid, then, &[], otherwise, &[]),
            None => self.b.ins().jump(then, &[]),
        };
        self.b.switch_to_block(otherwise);
        self.each_cell(block, &mut |g, _| g.store_vector(einsum, zeros, Some(nones)));
        self.b.ins().jump(join, &[]);
        self.enter(then);
        let mut passes: Vec<Def> = Vec::new();
        let mut any: Option<Value> = None;
        // A scratch tensor takes its filter's mask now, and its values, unzeroed, after the
        // reduction: lane masks kept across the loop would push the accumulators out of registers.
        let buffer = einsum.target.index();
        let early_mask =
            self.program.buffers[buffer].role == crate::schedule::BufferRole::Temp && self.masks[buffer].is_some();
        if !einsum.filter.is_empty() {
            self.each_cell(block, &mut |g, _| {
                let holds = g.vconds(&einsum.filter, v).expect("a filter");
                let some = g.b.ins().vany_true(holds);
                any = Some(match any {
                    Some(a) => g.b.ins().bor(a, some),
                    None => some,
                });
                if early_mask {
                    let offset = g.target_offset(einsum);
                    g.store_mask(buffer, offset, Some(holds));
                }
                passes.push(Some(holds));
            });
        } else {
            passes = vec![None; rows as usize];
        }
        if let Some(any) = any {
            // No lane of the block passes the filter: every lane undefined, nothing computed.
            // A scratch tensor has its (unset) mask already, and no reader looks at the values
            // of its undefined points.
            let compute = self.b.create_block();
            let empty = if early_mask { join } else { otherwise };
            self.b.ins().brif(any, compute, &[], empty, &[]);
            self.enter(compute);
        }
        let identity = self.b.ins().f32const(reduce_identity(op) as f32);
        let identity = self.splat(identity);
        let accumulators: Vec<cranelift_frontend::Variable> = (0..rows)
            .map(|_| {
                let acc = self.b.declare_var(types::F32X4);
                self.b.def_var(acc, identity);
                acc
            })
            .collect();
        let factored = invariant_factors(&self.program.cascade, op, body);
        let body = factored.as_ref().map_or(body, |(b, _)| b);
        let red = Reduction { body, epilogue: None, ..red };
        self.vreduce_rows(red, indices, &accumulators, block);
        let scale = factored.map(|(_, s)| s);
        // Under a filter, an epilogue reads only points that always exist (`blockable_reduction`).
        let values_only = early_mask && !einsum.filter.is_empty();
        self.each_cell(block, &mut |g, k| {
            let value = g.b.use_var(accumulators[k]);
            let value = g.scaled(value, scale);
            let (value, dy) = g.epilogue(epilogue, value, Some(v));
            if values_only {
                debug_assert!(dy.is_none(), "an epilogue under a filter reads only points that exist");
                let offset = g.target_offset(einsum);
                g.store_values(buffer, offset, value, None);
            } else {
                let defined = g.and_def(passes[k], dy);
                g.store_vector(einsum, value, defined);
            }
        });
        self.b.ins().jump(join, &[]);
        // `otherwise` takes the filter's empty blocks too, so it is sealed only now.
        self.b.seal_block(otherwise);
        self.enter(join);
    }

    /// Rows `u .. u + rows` of a reduction over one index `r` (see `lane_rows`), every row
    /// valid: one accumulator of four lanes of `r` per row while `r` runs four points at a time,
    /// the lanes folded together, then the last points of `r` one by one, in the order of the
    /// scalar path, so that a row gives the same bits in a block or alone.
    pub fn compute_lane_rows(&mut self, einsum: &Einsum, u: Index, rows: i64) {
        let Some(red) = reduction(&einsum.body) else { unreachable!("checked") };
        let Reduction { op, indices, filter, body, epilogue } = red;
        let r = indices[0];
        let factored = invariant_factors(&self.program.cascade, op, body);
        let body = factored.as_ref().map_or(body, |(b, _)| b);
        let block = Block { u: Some(u), rows, v: r, columns: 1 };
        // The caller's bound keeps every row valid; other split pairs are one answer for the block.
        let bound = self.valid_pairs_but(&[], Some(u));
        let end = if bound.is_none() { self.planned_end(r, body, filter) } else { None };
        let Some(end) = end else {
            self.each_cell(block, &mut |g, _| g.compute_point(einsum));
            return;
        };
        let identity = reduce_identity(op) as f32;
        let lanes: Vec<cranelift_frontend::Variable> = (0..rows)
            .map(|_| {
                let acc = self.b.declare_var(types::F32X4);
                let x = self.b.ins().f32const(identity);
                let x = self.splat(x);
                self.b.def_var(acc, x);
                acc
            })
            .collect();
        let totals: Vec<cranelift_frontend::Variable> = (0..rows)
            .map(|_| {
                let acc = self.b.declare_var(types::F32);
                let x = self.b.ins().f32const(identity);
                self.b.def_var(acc, x);
                acc
            })
            .collect();
        let done = self.planned_reduce(Reduction { body, ..red }, (end, LANES, LANE_ROWS_UNROLL), &lanes, block);
        for (lane, total) in lanes.iter().zip(&totals) {
            self.fold_across(op, *lane, *total);
        }
        self.for_loop_from(r, done, end, 1, &mut |g| {
            g.each_cell(block, &mut |g, k| g.fold_scalar(op, totals[k], filter, body));
        });
        let scale = factored.map(|(_, s)| s);
        self.each_cell(block, &mut |g, k| {
            let mut value = g.b.use_var(totals[k]);
            if let Some(scale) = scale {
                let s = g.b.ins().f32const(scale);
                value = g.b.ins().fmul(value, s);
            }
            let (value, defined) = g.epilogue(epilogue, value, None);
            g.store_point(einsum, value, defined);
        });
    }

    /// The loops over the `remaining` reduced indices of `red`, folding its body into one
    /// accumulator per cell of `block` (lanes along `block.v`) where the point exists (valid split
    /// pairs, filter, defined body).
    pub(super) fn vreduce_rows(
        &mut self,
        red: Reduction<'_>,
        remaining: &[Index],
        accumulators: &[cranelift_frontend::Variable],
        block: Block,
    ) {
        let Reduction { op, indices: all, filter, body, .. } = red;
        let Some((first, rest)) = remaining.split_first() else {
            let valid = self.valid_pairs(all);
            self.when(valid, &mut |g| {
                g.each_cell(block, &mut |g, k| {
                    let passes = g.vconds(filter, block.v);
                    g.fold_term(op, accumulators[k], body, passes, block.v);
                });
            });
            return;
        };
        if rest.is_empty() && all.len() == 1 {
            if let Some(end) = self.planned_end(*first, body, filter) {
                self.planned_reduce(red, (end, 1, 1), accumulators, block);
                return;
            }
        }
        // Points past a split pair's valid ones add nothing.
        let end = self.valid_rows(*first).unwrap_or(self.extents[first.rank.index()]);
        let first = *first;
        let zero = self.b.ins().iconst(types::I64, 0);
        self.for_loop_from(first, zero, end, 1, &mut |g| g.vreduce_rows(red, rest, accumulators, block));
    }

    /// `value` times the constant factored out of a sum, if any.
    fn scaled(&mut self, value: Value, scale: Option<f32>) -> Value {
        let Some(scale) = scale else { return value };
        let s = self.b.ins().f32const(scale);
        let s = self.splat(s);
        self.b.ins().fmul(value, s)
    }

    /// Folds the four lanes of `lanes` into the scalar accumulator `acc`.
    pub fn fold_across(
        &mut self,
        op: ReduceOp,
        lanes: cranelift_frontend::Variable,
        acc: cranelift_frontend::Variable,
    ) {
        let vector = self.b.use_var(lanes);
        let mut total = self.b.use_var(acc);
        for lane in 0..LANES as u8 {
            let x = self.b.ins().extractlane(vector, lane);
            total = self.combine(op, total, x);
        }
        self.b.def_var(acc, total);
    }

    /// Folds `x` into the accumulator `acc` in the lanes where `ok` holds.
    pub(super) fn fold(&mut self, op: ReduceOp, acc: cranelift_frontend::Variable, x: Value, ok: Def) {
        let current = self.b.use_var(acc);
        let next = self.combine(op, current, x);
        self.update_lanes(acc, current, next, ok);
    }

    /// Sets `acc` to `next` in the lanes where `ok` holds, to `current` elsewhere.
    pub(super) fn update_lanes(&mut self, acc: cranelift_frontend::Variable, current: Value, next: Value, ok: Def) {
        let chosen = match ok {
            Some(ok) => {
                let bits = self.as_floats(ok);
                self.b.ins().bitselect(bits, next, current)
            }
            None => next,
        };
        self.b.def_var(acc, chosen);
    }

    /// Four points of `einsum` at `v`, `v + 1`, `v + 2`, `v + 3`, in a loop for which the caller
    /// has established `lane_checks`.
    pub fn compute_vector(&mut self, einsum: &Einsum, v: Index) {
        let buffer = einsum.target.index();
        let offset = self.target_offset(einsum);
        // One answer for the four lanes: a split pair of `v` is valid at all four (the caller's
        // vectors cover valid points only), those without `v` were checked before the loop, and
        // any other with `v` is asked here. Where they are not valid, the lanes are undefined
        // and nothing is read.
        let valid = self.valid_pairs_but(&[v], Some(v));
        let (value, defined) = match valid {
            None => self.vector_value(einsum, v),
            Some(valid) => {
                let then = self.b.create_block();
                let join = self.b.create_block();
                self.b.append_block_param(join, types::F32X4);
                self.b.append_block_param(join, types::I32X4);
                let zero = self.b.ins().f32const(0.0);
                let zeros = self.splat(zero);
                let none = self.b.ins().iconst(types::I32, 0);
                let nones = self.b.ins().splat(types::I32X4, none);
                self.b.ins().brif(valid, then, &[], join, &[zeros.into(), nones.into()]);
                self.enter(then);
                let (value, defined) = self.vector_value(einsum, v);
                let defined = match defined {
                    Some(d) => d,
                    None => {
                        let all = self.b.ins().iconst(types::I32, -1);
                        self.b.ins().splat(types::I32X4, all)
                    }
                };
                self.b.ins().jump(join, &[value.into(), defined.into()]);
                self.enter(join);
                (self.b.block_params(join)[0], Some(self.b.block_params(join)[1]))
            }
        };
        self.store_at(buffer, offset, value, defined);
    }

    /// Stores four lanes at the target's current point: zero and an unset mask where a lane is
    /// not defined.
    fn store_vector(&mut self, einsum: &Einsum, value: Value, defined: Def) {
        let offset = self.target_offset(einsum);
        self.store_at(einsum.target.index(), offset, value, defined);
    }

    fn store_at(&mut self, buffer: usize, offset: Value, value: Value, defined: Def) {
        self.store_values(buffer, offset, value, defined);
        self.store_mask(buffer, offset, defined);
    }

    /// Stores four lanes of values, zero where `defined` is not set.
    fn store_values(&mut self, buffer: usize, offset: Value, value: Value, defined: Def) {
        let stored = match defined {
            Some(d) => {
                let zero = self.b.ins().f32const(0.0);
                let zeros = self.splat(zero);
                let bits = self.as_floats(d);
                self.b.ins().bitselect(bits, value, zeros)
            }
            None => value,
        };
        let bytes = self.b.ins().ishl_imm_s(offset, 2);
        let address = self.b.ins().iadd(self.values[buffer], bytes);
        self.b.ins().store(MemFlagsData::new().with_notrap(), stored, address, 0);
    }

    /// Stores the definedness of four lanes in a masked buffer.
    fn store_mask(&mut self, buffer: usize, offset: Value, defined: Def) {
        if let Some(mask) = self.masks[buffer] {
            // The four lanes' flags as four bytes, stored at once.
            let address = self.b.ins().iadd(mask, offset);
            let word = match defined {
                Some(d) => {
                    let one = self.b.ins().iconst(types::I32, 1);
                    let ones = self.b.ins().splat(types::I32X4, one);
                    let flags = self.b.ins().band(d, ones);
                    let halves = self.b.ins().unarrow(flags, flags);
                    let bytes = self.b.ins().unarrow(halves, halves);
                    let little = self.little();
                    let words = self.b.ins().bitcast(types::I32X4, little, bytes);
                    self.b.ins().extractlane(words, 0)
                }
                None => self.b.ins().iconst(types::I32, 0x0101_0101),
            };
            self.b.ins().store(self.flags, word, address, 0);
        }
    }

    /// The four lanes' flags at `address`, loaded as one word and widened to lane masks.
    pub(super) fn mask_word(&mut self, address: Value) -> Value {
        let word = self.b.ins().load(types::I32, self.flags, address, 0);
        let words = self.b.ins().scalar_to_vector(types::I32X4, word);
        let little = self.little();
        let bytes = self.b.ins().bitcast(types::I8X16, little, words);
        let halves = self.b.ins().uwiden_low(bytes);
        let flags = self.b.ins().uwiden_low(halves);
        self.b.ins().ineg(flags)
    }

    fn little(&self) -> MemFlagsData {
        MemFlagsData::new().with_endianness(Endianness::Little)
    }

    fn vector_value(&mut self, einsum: &Einsum, v: Index) -> (Value, Def) {
        // A filter and a value that both see `v`'s position (ALiBi's `m <= p` and `m - p`)
        // convert it once, in 32 bits (`lane_checks`).
        let outer = self.positions;
        if sees_position(einsum, v) {
            let i = self.index(v);
            let i = self.b.ins().iadd(i, self.bases[v.rank.index()]);
            self.positions = Some((v, self.narrow_positions(i)));
        }
        let passes = self.vconds(&einsum.filter, v);
        let (value, defined) = self.vexpr(&einsum.body, v);
        self.positions = outer;
        (value, self.and_def(passes, defined))
    }

    /// The positions of the four lanes along `v` at the current point, as floats.
    fn lane_positions(&mut self, v: Index) -> Value {
        let i = self.index(v);
        let i = self.b.ins().iadd(i, self.bases[v.rank.index()]);
        // Positions that fit in 32 bits convert four at once; the others lane by lane.
        // Both give the bits the scalar path's conversion gives.
        let shifted = self.b.ins().iadd_imm_s(i, 1 << 31);
        let fits = self.b.ins().icmp_imm_s(IntCC::UnsignedLessThan, shifted, (1i64 << 32) - LANES);
        self.branch(fits, &mut |g| g.narrow_positions(i), &mut |g| {
            let first = g.b.ins().fcvt_from_sint(types::F32, i);
            let mut large = g.splat(first);
            for k in 1..LANES {
                let ik = g.b.ins().iadd_imm_s(i, k);
                let fk = g.b.ins().fcvt_from_sint(types::F32, ik);
                large = g.b.ins().insertlane(large, fk, k as u8);
            }
            large
        })
    }

    /// `i`, `i + 1`, `i + 2`, `i + 3` as floats, for `i` whose four fit in 32 bits.
    fn narrow_positions(&mut self, i: Value) -> Value {
        let i32s = self.b.ins().ireduce(types::I32, i);
        let i32s = self.b.ins().splat(types::I32X4, i32s);
        let steps = self
            .b
            .func
            .dfg
            .constants
            .insert([0i32, 1, 2, 3].iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>().into());
        let steps = self.b.ins().vconst(types::I32X4, steps);
        let i32s = self.b.ins().iadd(i32s, steps);
        self.b.ins().fcvt_from_sint(types::F32X4, i32s)
    }

    /// What `compute_vector` would ask at every vector of a loop over `v` from `start` to `end`
    /// and may ask once before it: whether the split pairs that do not involve `v` are valid,
    /// and, where the Einsum sees `v`'s position, whether every position of the loop fits in 32
    /// bits. `None` when there is nothing to ask.
    pub fn lane_checks(&mut self, einsum: &Einsum, v: Index, start: Value, end: Value) -> Def {
        let pairs = self.valid_pairs_but(&[], Some(v));
        let fits = sees_position(einsum, v).then(|| {
            let base = self.bases[v.rank.index()];
            let first = self.b.ins().iadd(base, start);
            let first = self.b.ins().iadd_imm_s(first, 1 << 31);
            let first = self.b.ins().icmp_imm_s(IntCC::UnsignedLessThan, first, 1 << 32);
            let last = self.b.ins().iadd(base, end);
            let last = self.b.ins().iadd_imm_s(last, 1 << 31);
            let last = self.b.ins().icmp_imm_s(IntCC::UnsignedLessThanOrEqual, last, 1 << 32);
            self.b.ins().band(first, last)
        });
        self.and_def(pairs, fits)
    }

    pub(super) fn vconds(&mut self, conds: &[Cond], v: Index) -> Def {
        crate::schedule::walk::conjunction(self, conds, Some(v))
    }

    /// A register block's result (`value`: four lanes along `v`, or one point without `v`)
    /// through the reduction's epilogue, if any (see `lanes::Reduction`), and its definedness.
    fn epilogue(&mut self, epilogue: Option<&Expr>, value: Value, v: Option<Index>) -> (Value, Def) {
        let Some(around) = epilogue else { return (value, None) };
        self.reduced = Some(value);
        let result = match v {
            Some(v) => self.vexpr(around, v),
            None => self.expr_scalar(around),
        };
        self.reduced = None;
        result
    }

    /// Four lanes of an expression and their definedness.
    pub(super) fn vexpr(&mut self, expr: &Expr, v: Index) -> (Value, Def) {
        if let (Expr::Reduce { .. }, Some(x)) = (expr, self.reduced) {
            return (x, None);
        }
        if let Expr::Access { tensor, .. } = expr {
            if let Some(offset) = self.planned_offset(expr) {
                let in_lanes = expr.mentions(v);
                let known = self.planned_defined(expr);
                return self.planned_load(tensor.index(), offset, in_lanes, known);
            }
        }
        if !expr.mentions(v)
            && !matches!(expr, Expr::Reduce { .. })
            && !(self.reduced.is_some() && expr.holds_reduction())
        {
            let (x, d) = self.expr_scalar(expr);
            let x = self.splat(x);
            let d = self.lanes(d);
            return (x, d);
        }
        match expr {
            Expr::Index(_) => match self.positions {
                Some((along, positions)) if along == v => (positions, None),
                _ => (self.lane_positions(v), None),
            },
            Expr::Access { tensor, subscripts } => {
                let coords = self.coordinates(*tensor, subscripts);
                let ranks = self.program.cascade.tensor(*tensor).ranks.clone();
                let always: Vec<bool> = subscripts.iter().zip(&ranks).map(|(s, r)| self.always_inside(s, *r)).collect();
                let buffer = tensor.index();
                let (offset, inside) = self.offset(buffer, &coords, &always);
                let bytes = self.b.ins().ishl_imm_s(offset, 2);
                let address = self.b.ins().iadd(self.values[buffer], bytes);
                let value = self.b.ins().load(types::F32X4, MemFlagsData::new().with_notrap(), address, 0);
                let mut defined = self.lanes(inside);
                if let Some(mask) = self.masks[buffer] {
                    let address = self.b.ins().iadd(mask, offset);
                    let lanes = self.mask_word(address);
                    defined = self.and_def(defined, Some(lanes));
                }
                (value, defined)
            }
            Expr::Unary(op, arg) => {
                let (x, d) = self.vexpr(arg, v);
                let value = match op {
                    UnaryOp::Neg => self.b.ins().fneg(x),
                    UnaryOp::Abs => self.b.ins().fabs(x),
                    UnaryOp::Sqrt => self.b.ins().sqrt(x),
                    UnaryOp::Relu => {
                        let zero = self.b.ins().f32const(0.0);
                        let zero = self.splat(zero);
                        self.b.ins().fmax(x, zero)
                    }
                    UnaryOp::Exp => {
                        let range = crate::schedule::sign::exp_range(&self.program.cascade, arg);
                        self.vector_exp(x, range)
                    }
                    UnaryOp::Log => self.vector_log(x),
                    UnaryOp::Tanh => self.vector_tanh(x),
                    UnaryOp::Sigmoid => self.vector_sigmoid(x),
                    UnaryOp::Softplus => self.vector_softplus(x),
                };
                (value, d)
            }
            Expr::Binary(op, a, b) => {
                let (x, dx) = self.vexpr(a, v);
                let (y, dy) = self.vexpr(b, v);
                let value = match op {
                    BinaryOp::Add => self.b.ins().fadd(x, y),
                    BinaryOp::Sub => self.b.ins().fsub(x, y),
                    BinaryOp::Mul => self.b.ins().fmul(x, y),
                    BinaryOp::Div => self.b.ins().fdiv(x, y),
                    BinaryOp::Max => self.b.ins().fmax(x, y),
                    BinaryOp::Min => self.b.ins().fmin(x, y),
                };
                (value, self.and_def(dx, dy))
            }
            Expr::Reduce { op, indices, filter, body } => {
                let acc = self.b.declare_var(types::F32X4);
                let identity = self.b.ins().f32const(reduce_identity(*op) as f32);
                let identity = self.splat(identity);
                self.b.def_var(acc, identity);
                let factored = invariant_factors(&self.program.cascade, *op, body);
                let body = factored.as_ref().map_or(&**body, |(b, _)| b);
                let red = Reduction { op: *op, indices, filter, body, epilogue: None };
                self.vreduce_rows(red, indices, &[acc], Block::single(v));
                let value = self.b.use_var(acc);
                (self.scaled(value, factored.map(|(_, s)| s)), None)
            }
            Expr::Const(_) | Expr::Param(_) | Expr::Extent(_) => unreachable!("handled as scalars"),
        }
    }
}

/// Whether `einsum`'s value or filter sees the position of `v` (as a number, not a subscript).
fn sees_position(einsum: &Einsum, v: Index) -> bool {
    let mut seen = false;
    let mut sees = |e: &Expr| seen |= *e == Expr::Index(v);
    einsum.body.walk(&mut sees);
    for cond in &einsum.filter {
        cond.lhs.walk(&mut sees);
        cond.rhs.walk(&mut sees);
    }
    seen
}
