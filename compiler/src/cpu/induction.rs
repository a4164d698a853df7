//! Reductions in lanes whose reads advance by a fixed step: offsets as induction variables.
//!
//! The innermost loop of a reduction over one index `r` reads its tensors at offsets affine in
//! `r` and in the row index `u` of a register block. Computing every offset from the indices
//! costs a multiplication per position, per row, per step; on x86-64 those multiplications (one
//! issued per cycle) bounded the register blocks, not the arithmetic. Here each read whose
//! subscripts are always inside gets an offset variable, set before the loop and advanced by a
//! loop-invariant step after each iteration, and per row a loop-invariant delta.
//!
//! Needs: the body holds no reduction; `r` is in no split pair, or is the inner index of one
//! whose tile index is bound (the loop then stops at the last valid point); every row of the
//! block is valid. Guarantees: the same loads, at the same addresses, as the generic path; a
//! sum of a product folds with a fused multiply-add; factors of a sum that are finite constants
//! are applied once, after the loop (`schedule::lanes::invariant_factors`).

use cranelift_codegen::ir::{types, InstBuilder, MemFlagsData, Value};
use cranelift_frontend::Variable;

use super::codegen::{Def, Gen};
use super::vector::{Block, LANES};
use crate::ir::*;
use crate::schedule::lanes::Reduction;
use crate::schedule::Slot;

/// A read of the loop's body addressed by an induction variable.
#[derive(Clone)]
pub struct PlannedRead {
    /// The `Expr::Access` node, by address: the body outlives the loop's code generation.
    pub expr: *const Expr,
    /// The element offset of the read at the current step, for row 0 of the block.
    pub offset: Variable,
    /// Cells 1, 2, ... of the block; empty when the read does not move across the block.
    pub cells: Vec<CellOffset>,
    /// Whether this step is known to read only defined points, so that the mask is not loaded.
    pub defined: bool,
}

/// Where a cell of a block reads, relative to cell 0.
#[derive(Clone, Copy)]
pub enum CellOffset {
    /// A fixed number of elements further (rows and columns run along the last position),
    /// which the load takes as its immediate offset.
    Fixed(i64),
    /// An induction variable of its own: a loop-invariant delta added at each step would be
    /// folded back into the loop by Cranelift's rewrites, with its multiplications.
    Own(Variable),
}

impl Gen<'_, '_> {
    /// Whether `r` can run as the loop of `planned_reduce`: in no split pair, or the inner index
    /// of one whose tile is bound; returns the end of its valid points.
    pub(super) fn planned_end(&mut self, r: Index, body: &Expr, filter: &[Cond]) -> Option<Value> {
        let nested = !crate::schedule::lanes::without_reductions(body, filter);
        let pairs = self.program.cascade.split_pairs();
        if nested || pairs.iter().any(|(t, _, w)| r.rank == *t || r.rank == *w) {
            return None;
        }
        self.valid_rows(r)
    }

    /// The reads of `exprs` whose offsets are affine in `r` and `u`: every subscript always
    /// inside, and neither index at an alternating slot.
    fn plannable_reads<'e>(&self, exprs: &[&'e Expr], r: Index, block: Block) -> Vec<&'e Expr> {
        let c = &self.program.cascade;
        let mut reads: Vec<&'e Expr> = Vec::new();
        for expr in exprs {
            walk_ref(expr, &mut |e| {
                let Expr::Access { tensor, subscripts } = e else { return };
                let ranks = &c.tensor(*tensor).ranks;
                let slots = &self.program.buffers[tensor.index()].slots;
                let ok = subscripts.iter().zip(ranks).zip(slots).all(|((sub, rank), slot)| {
                    let mut moves = false;
                    sub.for_each_index(&mut |i| moves |= i == r || Some(i) == block.u || i == block.v);
                    crate::schedule::layout::always_inside(c, sub, *rank) && !(moves && *slot == Slot::Alternate)
                });
                if ok && !reads.iter().any(|x| std::ptr::eq(*x, e)) {
                    reads.push(e);
                }
            });
        }
        reads
    }

    /// The element offset of an access at the current point, no bounds checked.
    fn linear_offset(&mut self, expr: &Expr) -> Value {
        let Expr::Access { tensor, subscripts } = expr else { unreachable!("an access") };
        let coords = self.coordinates(*tensor, subscripts);
        let always = vec![true; coords.len()];
        self.offset(tensor.index(), &coords, &always).0
    }

    /// The loop of a reduction over its one index `r` alone, from 0 while `step` more points fit
    /// before `end` (see `planned_end`), folding into one accumulator per cell of `block`, `unroll`
    /// steps per iteration while they fit; returns where it stopped. With `step == LANES` and
    /// `block.v == r`, each step folds four points of `r` in lanes.
    pub(super) fn planned_reduce(
        &mut self,
        red: Reduction<'_>,
        (end, step, unroll): (Value, i64, i64),
        accumulators: &[Variable],
        block: Block,
    ) -> Value {
        let Reduction { op, indices, filter, body, .. } = red;
        let r = indices[0];
        let mut exprs = vec![body];
        for c in filter {
            exprs.push(&c.lhs);
            exprs.push(&c.rhs);
        }
        let reads = self.plannable_reads(&exprs, r, block);
        // Offsets at r = 0 for every cell, and at r = step for cell 0.
        let at = |g: &mut Self, point: i64, each: &mut dyn FnMut(&mut Self)| {
            let var = g.b.declare_var(types::I64);
            let value = g.b.ins().iconst(types::I64, point);
            g.b.def_var(var, value);
            g.env.push((r, var));
            each(g);
            g.env.pop();
        };
        let mut first: Vec<Vec<Value>> = vec![Vec::new(); reads.len()];
        at(self, 0, &mut |g| {
            g.each_cell(block, &mut |g, _| {
                for (k, read) in reads.iter().enumerate() {
                    let offset = g.linear_offset(read);
                    first[k].push(offset);
                }
            })
        });
        let mut second: Vec<Value> = Vec::new();
        at(self, step, &mut |g| {
            for read in &reads {
                second.push(g.linear_offset(read));
            }
        });
        let mut plans = Vec::new();
        let mut steps = Vec::new();
        for (k, read) in reads.iter().enumerate() {
            let offset = self.b.declare_var(types::I64);
            self.b.def_var(offset, first[k][0]);
            let moves = |i: Option<Index>| i.is_some_and(|i| read.mentions(i));
            let (along_u, along_v) = (moves(block.u), block.columns > 1 && moves(Some(block.v)));
            let cells = if !along_u && !along_v {
                Vec::new()
            } else {
                let fixed = |g: &Self, i: Option<Index>| match i {
                    Some(i) if moves(Some(i)) => g.fixed_row_step(read, i),
                    _ => Some(0),
                };
                match (fixed(self, block.u), fixed(self, Some(block.v))) {
                    (Some(per_row), Some(per_lane)) => (1..block.cells() as i64)
                        .map(|cell| {
                            let (column, row) = (cell / block.rows, cell % block.rows);
                            CellOffset::Fixed(row * block.row_step() * per_row + column * LANES * per_lane)
                        })
                        .collect(),
                    _ => {
                        // A cell shares the variable of the cell it reads alike: the same row
                        // of the first column when the read does not move along `v`, the first
                        // row of its column when it does not move along `u`.
                        let mut cells: Vec<CellOffset> = Vec::new();
                        for cell in 1..block.cells() {
                            let (column, row) = (cell as i64 / block.rows, cell as i64 % block.rows);
                            let alike = match (along_u, along_v) {
                                (_, false) => row,
                                (false, true) => column * block.rows,
                                (true, true) => cell as i64,
                            } as usize;
                            cells.push(match alike {
                                0 => CellOffset::Fixed(0),
                                a if a < cell => cells[a - 1],
                                _ => {
                                    let own = self.b.declare_var(types::I64);
                                    self.b.def_var(own, first[k][cell]);
                                    CellOffset::Own(own)
                                }
                            });
                        }
                        cells
                    }
                }
            };
            steps.push(self.b.ins().isub(second[k], first[k][0]));
            plans.push(PlannedRead { expr: *read as *const Expr, offset, cells, defined: false });
        }
        let zero = self.b.ins().iconst(types::I64, 0);
        // Masked reads shared by every cell (a tile of scores under a causal mask): a step where
        // all their points are defined folds without selecting lane by lane.
        let shared: Vec<usize> = (0..reads.len())
            .filter(|k| {
                let Expr::Access { tensor, .. } = reads[*k] else { return false };
                plans[*k].cells.is_empty() && self.masks[tensor.index()].is_some()
            })
            .collect();
        // One step of the reduction: fold every cell, then advance each planned offset.
        let one_step = |g: &mut Self| {
            let saved = std::mem::replace(&mut g.planned, plans.clone());
            let fold = |g: &mut Self| {
                g.each_cell(block, &mut |g, k| {
                    let passes = g.vconds(filter, block.v);
                    g.fold_term(op, accumulators[k], body, passes, block.v);
                })
            };
            if shared.is_empty() {
                fold(g);
            } else {
                let mut all: Option<Value> = None;
                for k in &shared {
                    let Expr::Access { tensor, .. } = reads[*k] else { unreachable!("an access") };
                    let offset = g.b.use_var(plans[*k].offset);
                    let mask = g.masks[tensor.index()].expect("masked");
                    let address = g.b.ins().iadd(mask, offset);
                    let defined = if reads[*k].mentions(block.v) {
                        let lanes = g.mask_word(address);
                        g.b.ins().vall_true(lanes)
                    } else {
                        let flag = g.b.ins().load(types::I8, g.flags, address, 0);
                        g.b.ins().icmp_imm_s(cranelift_codegen::ir::condcodes::IntCC::NotEqual, flag, 0)
                    };
                    all = Some(match all {
                        Some(a) => g.b.ins().band(a, defined),
                        None => defined,
                    });
                }
                let (whole, partial, join) = (g.b.create_block(), g.b.create_block(), g.b.create_block());
                g.b.ins().brif(all.expect("a shared read"), whole, &[], partial, &[]);
                g.enter(whole);
                for k in &shared {
                    g.planned[*k].defined = true;
                }
                fold(g);
                for k in &shared {
                    g.planned[*k].defined = false;
                }
                g.b.ins().jump(join, &[]);
                g.enter(partial);
                fold(g);
                g.b.ins().jump(join, &[]);
                g.enter(join);
            }
            g.planned = saved;
            for (plan, step) in plans.iter().zip(&steps) {
                let mut owned: Vec<Variable> = Vec::new();
                for cell in &plan.cells {
                    if let CellOffset::Own(var) = cell {
                        if !owned.contains(var) {
                            owned.push(*var);
                        }
                    }
                }
                for var in std::iter::once(plan.offset).chain(owned) {
                    let offset = g.b.use_var(var);
                    let next = g.b.ins().iadd(offset, *step);
                    g.b.def_var(var, next);
                }
            }
        };
        // `unroll` steps per iteration, each folded into the same accumulators in the same order
        // (the same bits), then the last steps one at a time.
        let mut done = zero;
        if unroll > 1 {
            done = self.for_loop_from(r, zero, end, step * unroll, &mut |g| {
                one_step(g);
                for k in 1..unroll {
                    let var = g.b.declare_var(types::I64);
                    let first = g.index(r);
                    let at = g.b.ins().iadd_imm_s(first, k * step);
                    g.b.def_var(var, at);
                    g.env.push((r, var));
                    one_step(g);
                    g.env.pop();
                }
            });
        }
        self.for_loop_from(r, done, end, step, &mut |g| one_step(g))
    }

    /// Whether the rows of a block along `u` read `read` a fixed number of elements apart (per
    /// unit of `u`): `u` at the last position of a full buffer, bare or as the inner index of a
    /// split pair, and elsewhere only at positions not stored.
    fn fixed_row_step(&self, read: &Expr, u: Index) -> Option<i64> {
        let Expr::Access { tensor, subscripts } = read else { return None };
        let slots = &self.program.buffers[tensor.index()].slots;
        let last = subscripts.len() - 1;
        let mut step = 0;
        for (d, sub) in subscripts.iter().enumerate() {
            let mut mentions = false;
            sub.for_each_index(&mut |i| mentions |= i == u);
            if !mentions || slots[d] == Slot::Current {
                continue;
            }
            let unit = match sub {
                Affine::Index(i) => *i == u,
                Affine::Add(_, b) => matches!(&**b, Affine::Index(i) if *i == u) && !sub_mentions_twice(sub, u),
                _ => false,
            };
            if slots[d] != Slot::Full || !unit {
                return None;
            }
            // The distance between neighbouring points of `u` is a constant when every later
            // position stores a number of points known now (the last position: 1).
            let ranks = &self.program.cascade.tensor(*tensor).ranks;
            let mut stride = 1i64;
            for q in d + 1..=last {
                let points = match (slots[q], self.program.cascade.rank(ranks[q]).extent) {
                    (Slot::Current, _) => 1,
                    (Slot::Full, Extent::Fixed(n)) => n as i64,
                    (Slot::Alternate, Extent::Fixed(n)) => (n as i64).min(2),
                    _ => return None,
                };
                stride = stride.checked_mul(points)?;
            }
            step += stride;
        }
        Some(step)
    }

    /// Whether a planned read is known to be defined at this step.
    pub(super) fn planned_defined(&self, expr: &Expr) -> bool {
        self.planned.iter().any(|p| std::ptr::eq(p.expr, expr) && p.defined)
    }

    /// The offset of `expr` at the current step and cell, when it is a planned read, and the
    /// elements to add to it.
    pub(super) fn planned_offset(&mut self, expr: &Expr) -> Option<(Value, i64)> {
        let plan = self.planned.iter().find(|p| std::ptr::eq(p.expr, expr))?;
        let cell = if self.cell > 0 { plan.cells.get(self.cell - 1).copied() } else { None };
        Some(match cell {
            None => (self.b.use_var(plan.offset), 0),
            Some(CellOffset::Fixed(elements)) => (self.b.use_var(plan.offset), elements),
            Some(CellOffset::Own(var)) => (self.b.use_var(var), 0),
        })
    }

    /// A planned read, `extra` elements after `offset`: four contiguous lanes, or one value in
    /// every lane. `known`: the point is known to be defined, so its mask is not read.
    pub(super) fn planned_load(
        &mut self,
        buffer: usize,
        (offset, extra): (Value, i64),
        in_lanes: bool,
        known: bool,
    ) -> (Value, Def) {
        let bytes = self.b.ins().ishl_imm_s(offset, 2);
        let address = self.b.ins().iadd(self.values[buffer], bytes);
        let flags = MemFlagsData::new().with_notrap();
        let at = (extra * 4) as i32;
        let value = if in_lanes {
            self.b.ins().load(types::F32X4, flags, address, at)
        } else {
            let x = self.b.ins().load(types::F32, flags, address, at);
            self.b.ins().splat(types::F32X4, x)
        };
        let Some(mask) = self.masks[buffer].filter(|_| !known) else { return (value, None) };
        let address = self.b.ins().iadd(mask, offset);
        let address = if extra != 0 { self.b.ins().iadd_imm_s(address, extra) } else { address };
        let defined = if in_lanes {
            self.mask_word(address)
        } else {
            let flag = self.b.ins().load(types::I8, self.flags, address, 0);
            self.lanes(Some(flag)).expect("a mask")
        };
        (value, Some(defined))
    }

    /// Folds one term of a reduction into `acc` where `passes` and the term's definedness hold;
    /// a sum of a product as a fused multiply-add.
    pub(super) fn fold_term(&mut self, op: ReduceOp, acc: Variable, body: &Expr, passes: Def, v: Index) {
        if let (ReduceOp::Sum, Expr::Binary(BinaryOp::Mul, a, b)) = (op, body) {
            let (x, dx) = self.vexpr(a, v);
            let (y, dy) = self.vexpr(b, v);
            let defined = self.and_def(dx, dy);
            let ok = self.and_def(passes, defined);
            let current = self.b.use_var(acc);
            let next = self.b.ins().fma(x, y, current);
            self.update_lanes(acc, current, next, ok);
            return;
        }
        let (x, defined) = self.vexpr(body, v);
        let ok = self.and_def(passes, defined);
        self.fold(op, acc, x, ok);
    }
}

/// Whether `u` occurs more than once in `sub` (its coefficient would not be 1).
fn sub_mentions_twice(sub: &Affine, u: Index) -> bool {
    let mut count = 0;
    sub.for_each_index(&mut |i| count += (i == u) as usize);
    count > 1
}

/// `Expr::walk` with the nodes' lifetime kept, so that their addresses can be collected.
fn walk_ref<'e>(expr: &'e Expr, visit: &mut impl FnMut(&'e Expr)) {
    visit(expr);
    match expr {
        Expr::Unary(_, arg) => walk_ref(arg, visit),
        Expr::Binary(_, a, b) => {
            walk_ref(a, visit);
            walk_ref(b, visit);
        }
        Expr::Reduce { filter, body, .. } => {
            for cond in filter {
                walk_ref(&cond.lhs, visit);
                walk_ref(&cond.rhs, visit);
            }
            walk_ref(body, visit);
        }
        Expr::Const(_) | Expr::Param(_) | Expr::Extent(_) | Expr::Index(_) | Expr::Access { .. } => {}
    }
}
