//! Skipping the empty steps of a streamed loop (see `crate::skip`): test, copy, skip.
//!
//! Needs: a `Node::Loop` whose `skip` names a masked tensor written by its body, and a body whose
//! recurrences each keep two slots along the loop's index. Guarantees: a step where that tensor
//! has no defined point leaves every running tensor's next slot equal to its current one (values
//! and masks) without computing the Einsums after it, as the proof in `crate::skip` allows.

use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::{types, InstBuilder, Value};

use super::codegen::Gen;
use crate::ir::*;
use crate::schedule::{BufferRole, Node, Slot};

impl Gen<'_, '_> {
    /// One step of the loop over `index`: the body up to the Einsum writing `skip`, then the
    /// rest only where `skip` has a defined point, else the running tensors carried over.
    pub(super) fn skippable_step(&mut self, index: Index, body: &[Node], skip: TensorId) {
        let c = &self.program.cascade;
        let at = body
            .iter()
            .position(|n| matches!(n, Node::Compute { einsum } if c.einsums[einsum.index()].target == skip))
            .expect("the skipped tensor is written in the loop");
        self.nodes(&body[..=at]);
        let any = self.any_defined(skip.index());
        let (rest, carry, join) = (self.b.create_block(), self.b.create_block(), self.b.create_block());
        self.b.ins().brif(any, rest, &[], carry, &[]);
        self.enter(rest);
        self.nodes(&body[at + 1..]);
        self.b.ins().jump(join, &[]);
        self.enter(carry);
        self.carry_recurrences(index, &body[at + 1..]);
        self.b.ins().jump(join, &[]);
        self.enter(join);
    }

    /// Copies the current iterate of every recurrence of `body` into its next slot.
    pub(super) fn carry_recurrences(&mut self, index: Index, body: &[Node]) {
        let c = &self.program.cascade;
        for node in body {
            let Node::Compute { einsum } = node else { continue };
            let einsum = &c.einsums[einsum.index()];
            if let Some(position) = einsum.lhs.iter().position(|l| *l == Lhs::Next(index)) {
                self.carry_over(einsum.target.index(), index, position);
            }
        }
    }

    /// The stored extent of position `d` of buffer `b`.
    fn stored_dim(&mut self, b: usize, d: usize) -> Value {
        let dim = self.dims[b][d];
        match self.program.buffers[b].slots[d] {
            Slot::Full => dim,
            Slot::Current => {
                let one = self.b.ins().iconst(types::I64, 1);
                self.b.ins().smin(dim, one)
            }
            Slot::Alternate => {
                let two = self.b.ins().iconst(types::I64, 2);
                self.b.ins().smin(dim, two)
            }
        }
    }

    /// Whether any byte of buffer `b`'s mask is set (8 bytes at a time, then the last ones).
    fn any_defined(&mut self, b: usize) -> Value {
        let mask = self.masks[b].expect("a skipped tensor has a mask");
        let first = self.stored_dim(b, 0);
        let len = self.b.ins().imul(first, self.strides[b][0]);
        let seen = self.b.declare_var(types::I64);
        let zero = self.b.ins().iconst(types::I64, 0);
        self.b.def_var(seen, zero);
        let done = self.counted_loop(zero, len, 8, &mut |g, counter| {
            let i = g.b.use_var(counter);
            let address = g.b.ins().iadd(mask, i);
            let word = g.b.ins().load(types::I64, g.flags, address, 0);
            let so_far = g.b.use_var(seen);
            let both = g.b.ins().bor(so_far, word);
            g.b.def_var(seen, both);
        });
        self.counted_loop(done, len, 1, &mut |g, counter| {
            let i = g.b.use_var(counter);
            let address = g.b.ins().iadd(mask, i);
            let byte = g.b.ins().load(types::I8, g.flags, address, 0);
            let byte = g.b.ins().uextend(types::I64, byte);
            let so_far = g.b.use_var(seen);
            let both = g.b.ins().bor(so_far, byte);
            g.b.def_var(seen, both);
        });
        let seen = self.b.use_var(seen);
        self.b.ins().icmp_imm_s(IntCC::NotEqual, seen, 0)
    }

    /// Copies the current iterate of recurrence buffer `b` (values and mask), which iterates at
    /// position `d`, into its next slot: the other of two alternating slots of a scratch buffer,
    /// or the next point of a recurrence kept whole (an output, which may be a window of the
    /// caller's array, so copied point by point through its strides).
    fn carry_over(&mut self, b: usize, index: Index, d: usize) {
        let step = self.index(index);
        let following = self.b.ins().iadd_imm_s(step, 1);
        let (current, following) = match self.program.buffers[b].slots[d] {
            Slot::Alternate => (self.b.ins().band_imm_s(step, 1), self.b.ins().band_imm_s(following, 1)),
            _ => (step, following),
        };
        let inner = self.strides[b][d];
        let from = self.b.ins().imul(current, inner);
        let to = self.b.ins().imul(following, inner);
        if self.program.buffers[b].role != BufferRole::Temp {
            let others: Vec<usize> = (0..self.strides[b].len()).filter(|k| *k != d).collect();
            let zero = self.b.ins().iconst(types::I64, 0);
            self.copy_points(b, &others, zero, (from, to));
            return;
        }
        let mut outer = self.b.ins().iconst(types::I64, 1);
        for k in 0..d {
            let n = self.stored_dim(b, k);
            outer = self.b.ins().imul(outer, n);
        }
        let slots = self.stored_dim(b, d);
        let block = self.b.ins().imul(slots, inner);
        let (values, mask) = (self.values[b], self.masks[b]);
        let zero = self.b.ins().iconst(types::I64, 0);
        let value_bytes = self.b.ins().ishl_imm_s(inner, 2);
        self.counted_loop(zero, outer, 1, &mut |g, counter| {
            let o = g.b.use_var(counter);
            let base = g.b.ins().imul(o, block);
            let source = g.b.ins().iadd(base, from);
            let target = g.b.ins().iadd(base, to);
            let (sb, tb) = (g.b.ins().ishl_imm_s(source, 2), g.b.ins().ishl_imm_s(target, 2));
            let (sa, ta) = (g.b.ins().iadd(values, sb), g.b.ins().iadd(values, tb));
            g.copy_bytes(ta, sa, value_bytes);
            if let Some(mask) = mask {
                let (sa, ta) = (g.b.ins().iadd(mask, source), g.b.ins().iadd(mask, target));
                g.copy_bytes(ta, sa, inner);
            }
        });
    }

    /// Copies every point of buffer `b` over `positions` (at `offset` so far) from the slot at
    /// `slots.0` to the one at `slots.1`, values and mask.
    fn copy_points(&mut self, b: usize, positions: &[usize], offset: Value, slots: (Value, Value)) {
        let Some((&k, rest)) = positions.split_first() else {
            let flags = cranelift_codegen::ir::MemFlagsData::new().with_notrap();
            let (source, target) = (self.b.ins().iadd(offset, slots.0), self.b.ins().iadd(offset, slots.1));
            let (sb, tb) = (self.b.ins().ishl_imm_s(source, 2), self.b.ins().ishl_imm_s(target, 2));
            let (sa, ta) = (self.b.ins().iadd(self.values[b], sb), self.b.ins().iadd(self.values[b], tb));
            let x = self.b.ins().load(types::F32, flags, sa, 0);
            self.b.ins().store(flags, x, ta, 0);
            if let Some(mask) = self.masks[b] {
                let (sa, ta) = (self.b.ins().iadd(mask, source), self.b.ins().iadd(mask, target));
                let m = self.b.ins().load(types::I8, flags, sa, 0);
                self.b.ins().store(flags, m, ta, 0);
            }
            return;
        };
        let n = self.stored_dim(b, k);
        let stride = self.strides[b][k];
        let zero = self.b.ins().iconst(types::I64, 0);
        self.counted_loop(zero, n, 1, &mut |g, counter| {
            let i = g.b.use_var(counter);
            let at = g.b.ins().imul(i, stride);
            let at = g.b.ins().iadd(offset, at);
            g.copy_points(b, rest, at, slots);
        });
    }

    /// Copies `len` bytes from `from` to `to` (not overlapping): sixteen at a time, then one by one.
    fn copy_bytes(&mut self, to: Value, from: Value, len: Value) {
        let zero = self.b.ins().iconst(types::I64, 0);
        let flags = cranelift_codegen::ir::MemFlagsData::new().with_notrap();
        let done = self.counted_loop(zero, len, 16, &mut |g, counter| {
            let i = g.b.use_var(counter);
            let (s, t) = (g.b.ins().iadd(from, i), g.b.ins().iadd(to, i));
            let x = g.b.ins().load(types::I8X16, flags, s, 0);
            g.b.ins().store(flags, x, t, 0);
        });
        self.counted_loop(done, len, 1, &mut |g, counter| {
            let i = g.b.use_var(counter);
            let (s, t) = (g.b.ins().iadd(from, i), g.b.ins().iadd(to, i));
            let x = g.b.ins().load(types::I8, flags, s, 0);
            g.b.ins().store(flags, x, t, 0);
        });
    }
}
