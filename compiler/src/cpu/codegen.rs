//! Lowering the Loop IR to Cranelift IR: one function per kernel.
//!
//! The function takes six pointers: the buffers' values (`*mut f32` each), their masks (`*mut u8`,
//! null for a buffer without one), the rank extents (`i64` each), every buffer's dimensions and
//! strides (`i64`, buffer after buffer), and per rank the coordinate of its first point (`i64`;
//! non-zero when a call computes a chunk of a batch rank, so that an index used as a number is
//! still the global coordinate). Every point of every buffer is written: an undefined point
//! as value 0 with mask 0. Arithmetic is f32; a value travels with its definedness (an `i8`), and a
//! read out of range reads nothing (its address is clamped and the result marked undefined).

use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::{types, AbiParam, FuncRef, InstBuilder, MemFlagsData, Signature, Value};
use cranelift_frontend::{FunctionBuilder, Variable};
use cranelift_module::{Linkage, Module};

use super::vector::Block;
use crate::ir::*;
use crate::schedule::lanes::Reduction;
use crate::schedule::walk::{IntOp, Walker};
use crate::schedule::{LoopProgram, Node, Slot};

/// Definedness: `None` when a value is defined wherever it is computed, else an `i8` (or, in
/// lanes, an `i32x4` mask).
pub type Def = Option<Value>;

/// Imported scalar helpers.
pub struct Helpers {
    pub exp: FuncRef,
    pub log: FuncRef,
    pub tanh: FuncRef,
    pub sigmoid: FuncRef,
    pub softplus: FuncRef,
}

pub fn declare_helpers<M: Module>(
    module: &mut M,
    func: &mut cranelift_codegen::ir::Function,
) -> Result<Helpers, String> {
    let mut signature = Signature::new(module.isa().default_call_conv());
    signature.params.push(AbiParam::new(types::F32));
    signature.returns.push(AbiParam::new(types::F32));
    let mut import = |name: &str| -> Result<FuncRef, String> {
        let id = module.declare_function(name, Linkage::Import, &signature).map_err(|e| e.to_string())?;
        Ok(module.declare_func_in_func(id, func))
    };
    Ok(Helpers {
        exp: import("einfuse_expf")?,
        log: import("einfuse_logf")?,
        tanh: import("einfuse_tanhf")?,
        sigmoid: import("einfuse_sigmoidf")?,
        softplus: import("einfuse_softplusf")?,
    })
}

pub struct Gen<'a, 'f> {
    pub b: FunctionBuilder<'f>,
    pub program: &'a LoopProgram,
    pub helpers: Helpers,
    pub values: Vec<Value>,
    pub masks: Vec<Option<Value>>,
    pub extents: Vec<Value>,
    /// Each rank's first global position in this call (what `Index` values and filters see).
    pub bases: Vec<Value>,
    /// Each rank's first coordinate within the arrays of this call (what subscripts that read a
    /// batch rank's coordinate off its own position see).
    pub array_bases: Vec<Value>,
    pub dims: Vec<Vec<Value>>,
    pub strides: Vec<Vec<Value>>,
    pub env: Vec<(Index, Variable)>,
    /// Aligned, non-trapping accesses: every address is inside a buffer.
    pub flags: MemFlagsData,
    /// Reads addressed by induction variables in the loop being generated (see `induction`).
    pub planned: Vec<super::induction::PlannedRead>,
    /// The cell of a register block being generated (see `vector::each_cell`).
    pub cell: usize,
    /// The variant for steps that every filter admits whole (see `full_steps`).
    pub full_steps: Option<&'a crate::schedule::full_steps::FullSteps>,
    /// While a register block's epilogue is evaluated, the value its reduction stands for: four
    /// lanes, or one point in a block of rows (see `lanes::Reduction`).
    pub reduced: Option<Value>,
    /// While four points of an Einsum are evaluated, their positions along the lanes' index as
    /// floats, converted once for every use (see `vector::vector_value`).
    pub positions: Option<(Index, Value)>,
}

impl<'a, 'f> Gen<'a, 'f> {
    fn cascade(&self) -> &'a Cascade {
        &self.program.cascade
    }

    /// Loads the tables in the entry block; `params` are the function's five arguments.
    pub fn prologue(&mut self, params: [Value; 6]) {
        let [values, masks, extents, dims, strides, bases] = params;
        let flags = self.flags;
        let c = self.cascade();
        for r in 0..c.ranks.len() {
            let e = self.b.ins().load(types::I64, flags, extents, (r * 8) as i32);
            self.extents.push(e);
            let base = self.b.ins().load(types::I64, flags, bases, (r * 8) as i32);
            self.array_bases.push(base);
            let base = self.b.ins().load(types::I64, flags, bases, ((c.ranks.len() + r) * 8) as i32);
            self.bases.push(base);
        }
        let offsets = crate::schedule::layout::table_offsets(self.program);
        for (b, buffer) in self.program.buffers.iter().enumerate() {
            let v = self.b.ins().load(types::I64, flags, values, (b * 8) as i32);
            self.values.push(v);
            self.masks.push(buffer.masked.then(|| self.b.ins().load(types::I64, flags, masks, (b * 8) as i32)));
            let n = c.tensor(buffer.tensor).ranks.len();
            let mut d = Vec::new();
            let mut s = Vec::new();
            for k in 0..n {
                d.push(self.b.ins().load(types::I64, flags, dims, ((offsets[b] + k) * 8) as i32));
                s.push(self.b.ins().load(types::I64, flags, strides, ((offsets[b] + k) * 8) as i32));
            }
            self.dims.push(d);
            self.strides.push(s);
        }
    }

    /// Generates `emit` as `variant` (the same buffers, with fewer masks) says: a buffer that
    /// has no mask there is treated as wholly defined.
    fn with_program(&mut self, variant: &'a LoopProgram, emit: &mut dyn FnMut(&mut Self)) {
        let (program, masks) = (self.program, self.masks.clone());
        self.masks = crate::schedule::full_steps::variant_masks(&masks, variant);
        self.program = variant;
        emit(self);
        self.program = program;
        self.masks = masks;
    }

    pub fn nodes(&mut self, body: &[Node]) {
        for node in body {
            match node {
                Node::Loop { index, body, skip } => {
                    let extent = self.extents[index.rank.index()];
                    let full = self.full_steps.and_then(|f| {
                        f.margins.iter().find(|(i, _)| i == index).map(|(_, margins)| (&f.variant, margins))
                    });
                    self.for_loop(*index, extent, &mut |g| {
                        let join = g.b.create_block();
                        // A step the filter empties: carried over before anything is computed.
                        let empty_margins: Vec<_> = match (full, skip) {
                            (Some((_, margins)), Some(tensor)) => {
                                margins.iter().filter(|m| m.tensor == *tensor).cloned().collect()
                            }
                            _ => vec![],
                        };
                        if !empty_margins.is_empty() {
                            let empty = g.step_is_empty(&empty_margins, *index);
                            let (carry, compute) = (g.b.create_block(), g.b.create_block());
                            g.b.ins().brif(empty, carry, &[], compute, &[]);
                            g.enter(carry);
                            g.carry_recurrences(*index, body);
                            g.b.ins().jump(join, &[]);
                            g.enter(compute);
                        }
                        if let Some((variant, margins)) = full {
                            let whole = g.step_is_full(margins, *index);
                            let (fast, slow) = (g.b.create_block(), g.b.create_block());
                            g.b.ins().brif(whole, fast, &[], slow, &[]);
                            g.enter(fast);
                            g.with_program(variant, &mut |g| g.nodes(body));
                            g.b.ins().jump(join, &[]);
                            g.enter(slow);
                        }
                        match skip {
                            Some(tensor) => g.skippable_step(*index, body, *tensor),
                            None => g.nodes(body),
                        }
                        g.b.ins().jump(join, &[]);
                        g.enter(join);
                    });
                }
                Node::Compute { einsum } => self.compute(*einsum),
            }
        }
    }

    /// `for index in 0..extent { body }`, with `index` bound in the environment.
    fn for_loop(&mut self, index: Index, extent: Value, body: &mut dyn FnMut(&mut Self)) {
        let zero = self.b.ins().iconst(types::I64, 0);
        self.for_loop_from(index, zero, extent, 1, body);
    }

    /// `for index in (start..end).step_by(step) { body }`; with a step above 1, the body runs only
    /// where `index + step <= end`, and the final value of the index is returned for a remainder.
    pub fn for_loop_from(
        &mut self,
        index: Index,
        start: Value,
        end: Value,
        step: i64,
        body: &mut dyn FnMut(&mut Self),
    ) -> Value {
        self.counted_loop(start, end, step, &mut |g, var| {
            g.env.push((index, var));
            body(g);
            g.env.pop();
        })
    }

    /// `for i in (start..end).step_by(step)` while `i + step <= end`, the counter in a variable
    /// that `body` may bind to an index; returns where it stopped.
    pub(super) fn counted_loop(
        &mut self,
        start: Value,
        end: Value,
        step: i64,
        body: &mut dyn FnMut(&mut Self, Variable),
    ) -> Value {
        let var = self.b.declare_var(types::I64);
        self.b.def_var(var, start);
        let header = self.b.create_block();
        let inner = self.b.create_block();
        let exit = self.b.create_block();
        self.b.ins().jump(header, &[]);
        self.b.switch_to_block(header);
        let i = self.b.use_var(var);
        let last = self.b.ins().iadd_imm_s(i, step);
        // The exit as the first target: Cranelift's code motion visits the blocks a branch
        // dominates last target first, and once it has visited a block outside a loop it no
        // longer hoists out of that loop, so the body must be visited before the exit.
        let done = self.b.ins().icmp(IntCC::SignedGreaterThan, last, end);
        self.b.ins().brif(done, exit, &[], inner, &[]);
        self.enter(inner);
        body(self, var);
        let i = self.b.use_var(var);
        let next = self.b.ins().iadd_imm_s(i, step);
        self.b.def_var(var, next);
        self.b.ins().jump(header, &[]);
        self.b.seal_block(header);
        self.enter(exit);
        self.b.use_var(var)
    }

    /// Continues in `block` and seals it: every jump to it is already emitted. Sealing as soon
    /// as the predecessors are known lets the SSA builder resolve a variable by looking up the
    /// predecessors, so that an index bound outside a loop is the same value inside, not a
    /// parameter of each block on the way, and Cranelift's loop-invariant code motion sees it.
    pub(super) fn enter(&mut self, block: cranelift_codegen::ir::Block) {
        self.b.switch_to_block(block);
        self.b.seal_block(block);
    }

    pub(super) fn index(&mut self, index: Index) -> Value {
        let var = self.env.iter().rev().find(|(i, _)| *i == index).map(|(_, v)| *v).expect("a bound index");
        self.b.use_var(var)
    }

    /// The coordinates of an access (see `walk::coordinates`).
    pub(super) fn coordinates(&mut self, tensor: TensorId, subscripts: &[Affine]) -> Vec<Value> {
        crate::schedule::walk::coordinates(self, tensor, subscripts)
    }

    pub(super) fn one(&mut self) -> Value {
        self.b.ins().iconst(types::I8, 1)
    }

    /// `a && b` for definedness: `None` is "always".
    pub(super) fn and_def(&mut self, a: Def, b: Def) -> Def {
        match (a, b) {
            (None, x) | (x, None) => x,
            (Some(x), Some(y)) => Some(self.b.ins().band(x, y)),
        }
    }

    /// Whether every split pair bound in the environment, with one of `new` in it, is inside its
    /// whole rank (all pairs when `new` is empty); `None` when no pair applies.
    pub(super) fn valid_pairs(&mut self, new: &[Index]) -> Def {
        self.valid_pairs_but(new, None)
    }

    /// `valid_pairs`, leaving out the pair `valid_rows` bounds for `known`: the first whose inner
    /// index is `known` (valid by the caller's loop bound).
    pub(super) fn valid_pairs_but(&mut self, new: &[Index], known: Option<Index>) -> Def {
        let pairs = self.cascade().split_pairs();
        let bounded = known.and_then(|k| pairs.iter().find(|(_, i, _)| *i == k.rank).map(|(t, _, _)| *t));
        let bound: Vec<Index> = self.env.iter().map(|(i, _)| *i).collect();
        let skip = |partner: Index, tile: RankId| Some(partner) == known && Some(tile) == bounded;
        crate::schedule::walk::valid_pairs(self, &bound, new, &skip)
    }

    pub(super) fn always_inside(&self, subscript: &Affine, rank: RankId) -> bool {
        crate::schedule::layout::always_inside(self.cascade(), subscript, rank)
    }

    fn conds(&mut self, conds: &[Cond]) -> Def {
        crate::schedule::walk::conjunction(self, conds, None)
    }

    /// The element offset of `coords` in buffer `b`, clamped to 0 when out of range, and whether
    /// it is in range (`None`: always).
    pub(super) fn offset(&mut self, buffer: usize, coords: &[Value], always_inside: &[bool]) -> (Value, Def) {
        let mut inside: Def = None;
        let mut offset: Option<Value> = None;
        let slots = self.program.buffers[buffer].slots.clone();
        for (d, c) in coords.iter().enumerate() {
            if !always_inside[d] {
                let below = self.b.ins().icmp(IntCC::SignedLessThan, *c, self.dims[buffer][d]);
                let nonneg = self.b.ins().icmp_imm_s(IntCC::SignedGreaterThanOrEqual, *c, 0);
                let both = self.b.ins().band(below, nonneg);
                inside = self.and_def(inside, Some(both));
            }
            let stored = match slots[d] {
                Slot::Full => *c,
                Slot::Current => continue,
                Slot::Alternate => self.b.ins().band_imm_s(*c, 1),
            };
            // The last position of a full buffer has stride 1.
            let term = if d + 1 == coords.len() && slots[d] == Slot::Full {
                stored
            } else {
                self.b.ins().imul(stored, self.strides[buffer][d])
            };
            offset = Some(match offset {
                Some(o) => self.b.ins().iadd(o, term),
                None => term,
            });
        }
        let offset = offset.unwrap_or_else(|| self.b.ins().iconst(types::I64, 0));
        let Some(check) = inside else { return (offset, None) };
        let zero = self.b.ins().iconst(types::I64, 0);
        let offset = self.b.ins().select(check, offset, zero);
        (offset, Some(check))
    }

    pub(super) fn load(&mut self, tensor: TensorId, coords: &[Value], always_inside: &[bool]) -> (Value, Def) {
        let buffer = tensor.index();
        let (offset, inside) = self.offset(buffer, coords, always_inside);
        let bytes = self.b.ins().ishl_imm_s(offset, 2);
        let address = self.b.ins().iadd(self.values[buffer], bytes);
        let value = self.b.ins().load(types::F32, self.flags, address, 0);
        let defined = match self.masks[buffer] {
            Some(mask) => {
                let address = self.b.ins().iadd(mask, offset);
                let m = self.b.ins().load(types::I8, self.flags, address, 0);
                self.and_def(Some(m), inside)
            }
            None => inside,
        };
        (value, defined)
    }

    pub(super) fn call(&mut self, func: FuncRef, x: Value) -> Value {
        let call = self.b.ins().call(func, &[x]);
        self.b.inst_results(call)[0]
    }

    pub(super) fn expr_scalar(&mut self, expr: &Expr) -> (Value, Def) {
        self.expr(expr)
    }

    /// The value of an expression and whether it is defined.
    fn expr(&mut self, expr: &Expr) -> (Value, Def) {
        if let (Expr::Reduce { .. }, Some(x)) = (expr, self.reduced) {
            return (x, None);
        }
        match expr {
            Expr::Const(c) => (self.b.ins().f32const(*c as f32), None),
            Expr::Param(p) => {
                let v = self.cascade().param(*p).value as f32;
                (self.b.ins().f32const(v), None)
            }
            Expr::Extent(r) => {
                let e = self.extents[r.index()];
                (self.b.ins().fcvt_from_sint(types::F32, e), None)
            }
            Expr::Index(i) => {
                let v = self.index(*i);
                let v = self.b.ins().iadd(v, self.bases[i.rank.index()]);
                (self.b.ins().fcvt_from_sint(types::F32, v), None)
            }
            Expr::Access { tensor, subscripts } => {
                let coords = self.coordinates(*tensor, subscripts);
                let ranks = self.cascade().tensor(*tensor).ranks.clone();
                let always: Vec<bool> = subscripts.iter().zip(&ranks).map(|(s, r)| self.always_inside(s, *r)).collect();
                self.load(*tensor, &coords, &always)
            }
            Expr::Unary(op, arg) => {
                let (x, d) = self.expr(arg);
                let v = match op {
                    UnaryOp::Neg => self.b.ins().fneg(x),
                    UnaryOp::Abs => self.b.ins().fabs(x),
                    UnaryOp::Sqrt => self.b.ins().sqrt(x),
                    UnaryOp::Relu => {
                        let zero = self.b.ins().f32const(0.0);
                        self.b.ins().fmax(x, zero)
                    }
                    UnaryOp::Exp => self.call(self.helpers.exp, x),
                    UnaryOp::Log => self.call(self.helpers.log, x),
                    UnaryOp::Tanh => self.call(self.helpers.tanh, x),
                    UnaryOp::Sigmoid => self.call(self.helpers.sigmoid, x),
                    UnaryOp::Softplus => self.call(self.helpers.softplus, x),
                };
                (v, d)
            }
            Expr::Binary(op, a, b) => {
                let (x, dx) = self.expr(a);
                let (y, dy) = self.expr(b);
                let v = match op {
                    BinaryOp::Add => self.b.ins().fadd(x, y),
                    BinaryOp::Sub => self.b.ins().fsub(x, y),
                    BinaryOp::Mul => self.b.ins().fmul(x, y),
                    BinaryOp::Div => self.b.ins().fdiv(x, y),
                    BinaryOp::Max => self.b.ins().fmax(x, y),
                    BinaryOp::Min => self.b.ins().fmin(x, y),
                };
                (v, self.and_def(dx, dy))
            }
            Expr::Reduce { op, indices, filter, body } => {
                let acc = self.b.declare_var(types::F32);
                let identity = self.b.ins().f32const(reduce_identity(*op) as f32);
                self.b.def_var(acc, identity);
                // As in every path of this tier, so that a point gives the same bits in lanes,
                // in a register block or alone: a constant factor applied after the loop, and
                // a product folded by a fused multiply-add.
                let factored = crate::schedule::lanes::invariant_factors(self.cascade(), *op, body);
                let body = factored.as_ref().map_or(&**body, |(b, _)| b);
                let r = Reduction { op: *op, indices, filter, body, epilogue: None };
                self.reduce_loops(r, indices, acc);
                let value = self.b.use_var(acc);
                match factored {
                    Some((_, scale)) => {
                        let scale = self.b.ins().f32const(scale);
                        (self.b.ins().fmul(value, scale), None)
                    }
                    None => (value, None),
                }
            }
        }
    }

    /// `op` applied to `a` and `b` (scalars or lanes alike).
    pub(super) fn combine(&mut self, op: ReduceOp, a: Value, b: Value) -> Value {
        match op {
            ReduceOp::Sum => self.b.ins().fadd(a, b),
            ReduceOp::Max => self.b.ins().fmax(a, b),
            ReduceOp::Min => self.b.ins().fmin(a, b),
        }
    }

    /// `acc` combined with the term `body` (a sum of a product as a fused multiply-add), and
    /// the term's definedness.
    fn term(&mut self, op: ReduceOp, acc: Variable, body: &Expr) -> (Value, Def) {
        if let (ReduceOp::Sum, Expr::Binary(BinaryOp::Mul, a, b)) = (op, body) {
            let (x, dx) = self.expr(a);
            let (y, dy) = self.expr(b);
            let current = self.b.use_var(acc);
            return (self.b.ins().fma(x, y, current), self.and_def(dx, dy));
        }
        let (x, defined) = self.expr(body);
        let current = self.b.use_var(acc);
        (self.combine(op, current, x), defined)
    }

    /// Runs `then` only where `condition` holds (always, when it is `None`).
    pub(super) fn when(&mut self, condition: Def, then: &mut dyn FnMut(&mut Self)) {
        let Some(condition) = condition else {
            then(self);
            return;
        };
        let inside = self.b.create_block();
        let after = self.b.create_block();
        self.b.ins().brif(condition, inside, &[], after, &[]);
        self.enter(inside);
        then(self);
        self.b.ins().jump(after, &[]);
        self.enter(after);
    }

    /// Loops over the `remaining` reduced indices, then folds the body into `acc` where the point
    /// exists (valid split pairs, filter, defined body).
    fn reduce_loops(&mut self, red: Reduction<'_>, remaining: &[Index], acc: Variable) {
        let Reduction { op, filter, body, .. } = red;
        let Some((first, rest)) = remaining.split_first() else {
            // Reads may rely on valid split pairs: evaluate nothing outside them.
            let valid = self.valid_pairs(red.indices);
            self.when(valid, &mut |g| g.fold_scalar(op, acc, filter, body));
            return;
        };
        let extent = self.extents[first.rank.index()];
        if rest.is_empty() && crate::schedule::lanes::reducible_in_lanes(self.program, body, filter, *first) {
            if let Some(end) = self.valid_rows(*first) {
                // Four points of the innermost reduced index at a time, partial results per
                // lane folded together at the end, then the last points one by one.
                let r = *first;
                let lanes = self.b.declare_var(types::F32X4);
                let identity = self.b.ins().f32const(reduce_identity(op) as f32);
                let identity = self.b.ins().splat(types::F32X4, identity);
                self.b.def_var(lanes, identity);
                let zero = self.b.ins().iconst(types::I64, 0);
                let done = self.for_loop_from(r, zero, end, super::vector::LANES, &mut |g| {
                    g.vreduce_rows(red, &[], &[lanes], super::vector::Block::single(r))
                });
                self.fold_across(op, lanes, acc);
                self.for_loop_from(r, done, end, 1, &mut |g| g.reduce_loops(red, rest, acc));
                return;
            }
        }
        // Points past a split pair's valid ones add nothing.
        let end = self.valid_rows(*first).unwrap_or(extent);
        let zero = self.b.ins().iconst(types::I64, 0);
        self.for_loop_from(*first, zero, end, 1, &mut |g| g.reduce_loops(red, rest, acc));
    }

    /// Evaluates an Einsum at every point of its left-hand side not bound by an enclosing loop.
    fn compute(&mut self, id: EinsumId) {
        let einsum = &self.cascade().einsums[id.index()];
        let free: Vec<Index> = einsum.lhs_indices().filter(|i| !self.env.iter().any(|(bound, _)| bound == i)).collect();
        self.compute_loops(einsum, &free);
    }

    fn compute_loops(&mut self, einsum: &'a Einsum, free: &[Index]) {
        if let Some(order) = crate::schedule::pack::copy_order(self.program, einsum, free) {
            crate::schedule::walk::copy(self, einsum, free, order);
            return;
        }
        // Indices of fixed extent 1 at the end (decode's single query) are bound first, so that
        // lanes run along the last index with more than one point.
        let c = self.cascade();
        let trailing = free.iter().rev().take_while(|i| matches!(c.rank(i.rank).extent, Extent::Fixed(1))).count();
        if trailing > 0 && trailing < free.len() {
            let (head, tail) = free.split_at(free.len() - trailing);
            let index = tail[0];
            let rest: Vec<Index> = head.iter().chain(&tail[1..]).copied().collect();
            let one = self.b.ins().iconst(types::I64, 1);
            self.for_loop(index, one, &mut |g| g.compute_loops(einsum, &rest));
            return;
        }
        let Some((first, rest)) = free.split_first() else {
            self.compute_point(einsum);
            return;
        };
        let narrow = |v: Index| matches!(self.cascade().rank(v.rank).extent, Extent::Fixed(n) if (n as i64) < super::vector::LANES);
        if rest.len() == 1
            && !narrow(rest[0])
            && crate::schedule::lanes::vectorizable(self.program, einsum, rest[0])
            && crate::schedule::lanes::blockable_rows(self.program, einsum, *first, rest[0])
        {
            if let (Some(end), Some(vector_end)) = (self.valid_rows(*first), self.valid_rows(rest[0])) {
                // Blocks of rows while whole blocks are valid, then row by row.
                let (u, v) = (*first, rest[0]);
                let rows = super::vector::BLOCK_ROWS;
                let zero = self.b.ins().iconst(types::I64, 0);
                let done = self.for_loop_from(u, zero, end, rows, &mut |g| {
                    let zero = g.b.ins().iconst(types::I64, 0);
                    let lanes = super::vector::LANES;
                    let columns = super::vector::BLOCK_COLUMNS;
                    let block = Block { u: Some(u), rows, v, columns };
                    let done = g.for_loop_from(v, zero, vector_end, lanes * columns, &mut |g| {
                        g.compute_vector_rows(einsum, block)
                    });
                    let block = Block { columns: 1, ..block };
                    let done =
                        g.for_loop_from(v, done, vector_end, lanes, &mut |g| g.compute_vector_rows(einsum, block));
                    let written_v = g.written_end(einsum, v);
                    g.for_loop_from(v, done, written_v, 1, &mut |g| {
                        for k in 0..rows {
                            g.with_offset(u, k, &mut |g| g.compute_point(einsum));
                        }
                    });
                });
                let written = self.written_end(einsum, u);
                self.for_loop_from(u, done, written, 1, &mut |g| g.compute_loops(einsum, rest));
                return;
            }
        }
        let vector_end = if rest.is_empty() && crate::schedule::lanes::vectorizable(self.program, einsum, *first) {
            self.valid_rows(*first)
        } else {
            None
        };
        if let Some(vector_end) = vector_end {
            let v = *first;
            let mut zero = self.b.ins().iconst(types::I64, 0);
            if crate::schedule::lanes::blockable_reduction(self.program, einsum) {
                // A reduction with no rows to block: vectors side by side, independent
                // accumulators (and whole cache lines at each step along a strided input).
                let streams = crate::schedule::lanes::streams_input(self.program, einsum, None, v);
                let columns = crate::schedule::lanes::side_by_side(super::vector::LANES as usize, streams) as i64;
                zero = self.for_loop_from(v, zero, vector_end, columns * super::vector::LANES, &mut |g| {
                    g.compute_vector_rows(einsum, Block { u: Some(v), rows: columns, v, columns: 1 })
                });
            }
            // Four points at a time along the innermost index (valid points only), then the rest
            // one by one. What holds for the whole loop is asked once before it: where it does
            // (every row but the invalid ones of a ragged tile), the vectors ask nothing; where it
            // does not, every point goes one by one.
            let lanes = super::vector::LANES;
            let done = match self.lane_checks(einsum, v, zero, vector_end) {
                None => self.for_loop_from(v, zero, vector_end, lanes, &mut |g| g.compute_vector(einsum, v)),
                Some(hold) => {
                    let (vectors, join) = (self.b.create_block(), self.b.create_block());
                    self.b.append_block_param(join, types::I64);
                    self.b.ins().brif(hold, vectors, &[], join, &[zero.into()]);
                    self.enter(vectors);
                    let done = self.for_loop_from(v, zero, vector_end, lanes, &mut |g| g.compute_vector(einsum, v));
                    self.b.ins().jump(join, &[done.into()]);
                    self.enter(join);
                    self.b.block_params(join)[0]
                }
            };
            let written = self.written_end(einsum, *first);
            self.for_loop_from(*first, done, written, 1, &mut |g| g.compute_point(einsum));
            return;
        }
        if rest.is_empty() && crate::schedule::lanes::lane_rows(self.program, einsum, *first) {
            if let Some(end) = self.valid_rows(*first) {
                // Blocks of rows with the reduced index in lanes while whole blocks are valid,
                // then row by row.
                let (u, rows) = (*first, super::vector::BLOCK_ROWS);
                let zero = self.b.ins().iconst(types::I64, 0);
                let done = self.for_loop_from(u, zero, end, rows, &mut |g| g.compute_lane_rows(einsum, u, rows));
                let written = self.written_end(einsum, u);
                self.for_loop_from(u, done, written, 1, &mut |g| g.compute_point(einsum));
                return;
            }
        }
        let written = self.written_end(einsum, *first);
        let zero = self.b.ins().iconst(types::I64, 0);
        self.for_loop_from(*first, zero, written, 1, &mut |g| g.compute_loops(einsum, rest));
    }

    /// The end of the points of `u` at which `einsum` is computed: for the inner index of a split
    /// pair whose points past the valid ones nobody reads (`layout::unread_past_valid`), the
    /// valid ones; otherwise the whole extent.
    pub(super) fn written_end(&mut self, einsum: &Einsum, u: Index) -> Value {
        let extent = self.extents[u.rank.index()];
        if !crate::schedule::layout::unread_past_valid(self.cascade(), einsum, u) {
            return extent;
        }
        self.valid_rows(u).unwrap_or(extent)
    }

    /// The end of `u`'s rows that are all valid: its extent, or for the inner index of a split
    /// pair whose tile index is bound, the points inside the whole rank (`whole - tile * inner`,
    /// clamped to `0..=inner`). `None` when `u` is the inner index of a pair whose tile index is
    /// not bound, so that its validity is not known here.
    pub(super) fn valid_rows(&mut self, u: Index) -> Option<Value> {
        let extent = self.extents[u.rank.index()];
        let Some((tile, _, whole)) = self.cascade().split_pairs().into_iter().find(|(_, i, _)| *i == u.rank) else {
            return Some(extent);
        };
        let outer = Index { rank: tile, primes: u.primes };
        if !self.env.iter().any(|(i, _)| *i == outer) {
            return None;
        }
        let t = self.index(outer);
        let first = self.b.ins().imul(t, extent);
        let left = self.b.ins().isub(self.extents[whole.index()], first);
        let limit = self.b.ins().smin(left, extent);
        let zero = self.b.ins().iconst(types::I64, 0);
        Some(self.b.ins().smax(limit, zero))
    }

    /// One step of a scalar reduction: `body` folded into `acc` where the filter passes and the
    /// term is defined.
    pub(super) fn fold_scalar(&mut self, op: ReduceOp, acc: Variable, filter: &[Cond], body: &Expr) {
        let passes = self.conds(filter);
        let (next, defined) = self.term(op, acc, body);
        let ok = self.and_def(passes, defined);
        let current = self.b.use_var(acc);
        let chosen = match ok {
            Some(ok) => self.b.ins().select(ok, next, current),
            None => next,
        };
        self.b.def_var(acc, chosen);
    }

    /// The coordinates of the target's current point (an iterate's next slot for `Lhs::Next`).
    pub(super) fn target_coords(&mut self, einsum: &Einsum) -> Vec<Value> {
        einsum
            .lhs
            .iter()
            .map(|lhs| match lhs {
                Lhs::Index(i) => self.index(*i),
                Lhs::Initial => self.b.ins().iconst(types::I64, 0),
                Lhs::Next(i) => {
                    let v = self.index(*i);
                    self.b.ins().iadd_imm_s(v, 1)
                }
            })
            .collect()
    }

    /// The element offset of the target's current point.
    pub(super) fn target_offset(&mut self, einsum: &Einsum) -> Value {
        let coords = self.target_coords(einsum);
        let always = vec![true; coords.len()];
        self.offset(einsum.target.index(), &coords, &always).0
    }

    /// Stores `value` at the target's current point, with its definedness.
    pub(super) fn store_point(&mut self, einsum: &Einsum, value: Value, defined: Def) {
        let offset = self.target_offset(einsum);
        self.store_scalar(einsum.target.index(), offset, value, defined);
    }

    /// Stores one value at `offset` of buffer `buffer`: zero and an unset flag where not defined.
    fn store_scalar(&mut self, buffer: usize, offset: Value, value: Value, defined: Def) {
        let stored = match defined {
            Some(d) => {
                let zero = self.b.ins().f32const(0.0);
                self.b.ins().select(d, value, zero)
            }
            None => value,
        };
        let bytes = self.b.ins().ishl_imm_s(offset, 2);
        let address = self.b.ins().iadd(self.values[buffer], bytes);
        self.b.ins().store(self.flags, stored, address, 0);
        if let Some(mask) = self.masks[buffer] {
            let address = self.b.ins().iadd(mask, offset);
            let d = defined.unwrap_or_else(|| self.one());
            self.b.ins().store(self.flags, d, address, 0);
        }
    }

    pub(super) fn compute_point(&mut self, einsum: &Einsum) {
        let valid = self.valid_pairs(&[]);
        let offset = self.target_offset(einsum);
        let (value, defined) = match valid {
            None => crate::schedule::walk::point_value(self, einsum),
            Some(valid) => {
                // Evaluate only where the point exists: a body may read where it should not.
                let then = self.b.create_block();
                let join = self.b.create_block();
                self.b.append_block_param(join, types::F32);
                self.b.append_block_param(join, types::I8);
                let zero = self.b.ins().f32const(0.0);
                let no = self.b.ins().iconst(types::I8, 0);
                self.b.ins().brif(valid, then, &[], join, &[zero.into(), no.into()]);
                self.enter(then);
                let (value, defined) = crate::schedule::walk::point_value(self, einsum);
                let defined = defined.unwrap_or_else(|| self.one());
                self.b.ins().jump(join, &[value.into(), defined.into()]);
                self.enter(join);
                (self.b.block_params(join)[0], Some(self.b.block_params(join)[1]))
            }
        };
        self.store_scalar(einsum.target.index(), offset, value, defined);
    }
}

impl<'a, 'f> Walker<'a> for Gen<'a, 'f> {
    type Int = Value;
    type Flag = Value;
    type Value = Value;

    fn cascade(&self) -> &'a Cascade {
        Gen::cascade(self)
    }

    fn constant(&mut self, n: i64) -> Value {
        self.b.ins().iconst(types::I64, n)
    }

    fn extent(&mut self, rank: RankId) -> Value {
        self.extents[rank.index()]
    }

    fn index(&mut self, index: Index) -> Value {
        Gen::index(self, index)
    }

    fn base(&mut self, rank: RankId) -> Value {
        self.array_bases[rank.index()]
    }

    fn int(&mut self, op: IntOp, a: Value, b: Value) -> Value {
        match op {
            IntOp::Add => self.b.ins().iadd(a, b),
            IntOp::Sub => self.b.ins().isub(a, b),
            IntOp::Mul => self.b.ins().imul(a, b),
        }
    }

    fn less(&mut self, a: Value, b: Value) -> Value {
        self.b.ins().icmp(IntCC::SignedLessThan, a, b)
    }

    /// One instruction for flags and for lanes (masks of all ones or zeros per lane).
    fn and(&mut self, a: Value, b: Value, _: Option<Index>) -> Value {
        self.b.ins().band(a, b)
    }

    fn value(&mut self, expr: &Expr) -> (Value, Def) {
        self.expr(expr)
    }

    fn compare(&mut self, op: CmpOp, a: Value, b: Value, _: Option<Index>) -> Value {
        let cc = match op {
            CmpOp::Lt => FloatCC::LessThan,
            CmpOp::Le => FloatCC::LessThanOrEqual,
            CmpOp::Gt => FloatCC::GreaterThan,
            CmpOp::Ge => FloatCC::GreaterThanOrEqual,
            CmpOp::Eq => FloatCC::Equal,
            CmpOp::Ne => FloatCC::NotEqual,
        };
        self.b.ins().fcmp(cc, a, b)
    }

    fn value_in_lanes(&mut self, expr: &Expr, v: Index) -> (Value, Def) {
        self.vexpr(expr, v)
    }

    fn for_range(
        &mut self,
        index: Index,
        start: Value,
        end: Value,
        step: i64,
        body: &mut dyn FnMut(&mut Self),
    ) -> Value {
        self.for_loop_from(index, start, end, step, body)
    }

    fn with_offset(&mut self, index: Index, k: i64, body: &mut dyn FnMut(&mut Self)) {
        let first = self.index(index);
        let var = self.b.declare_var(types::I64);
        let moved = self.b.ins().iadd_imm_s(first, k);
        self.b.def_var(var, moved);
        self.env.push((index, var));
        body(self);
        self.env.pop();
    }

    fn compute_point(&mut self, einsum: &'a Einsum) {
        Gen::compute_point(self, einsum)
    }
}
