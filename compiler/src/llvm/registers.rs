//! Registers: which scratch buffers of a GPU thread kernel each thread keeps in registers.
//!
//! A thread kernel's scratch buffers live in global memory, one copy per thread, interleaved
//! (see `lower::Lowering::stride`). A buffer that is small and of fixed size per thread (every
//! position a batch rank, the current step of a streamed loop, or a rank of fixed extent) is
//! better in the thread's registers: in attention, the score tile `BQK[h, m1, m0, p]` and the
//! probabilities of a step (64 floats each), and the step's maximum and sum; and a running tensor
//! of one value per thread (the running maximum and sum), as its current and next iterate. Such
//! a buffer becomes a private array (`alloca`) addressed with constant strides, and the loops
//! over its fixed ranks are unrolled where it is read or written, so that every element is at a
//! constant offset and LLVM promotes the array to registers.
//!
//! Needs: a scheduled program. Guarantees: `register_buffers` picks only buffers whose per-thread
//! size is fixed (so that the private array holds every point a thread addresses, whatever the
//! loops), whose fixed positions are read and written at bare indices of their own rank (so that
//! unrolling makes every offset constant), that are used within the steps of one top-level loop
//! or only outside loops (`place`), or are running tensors of one loop (`running_loop`), and
//! that keep every Einsum's unrolled points, its other addresses at unrolled indices, and the
//! total, within bounds (`settle`). Correctness does not depend on the unrolling: an index left
//! in a loop addresses the array at run time (local memory) and computes the same values.
//!
//! Kernels whose lane rank is short by definition (decode, `P = 1`) always run a warp per point
//! (see `launch::lanes_per_point`), whose lanes split each reduction's outermost loop; an
//! unrolled loop cannot be split, so those kernels keep every buffer in global scratch.

use crate::ir::*;
use crate::schedule::layout::is_batch_rank;
use crate::schedule::{BufferRole, LoopProgram, Node, Slot};

/// The largest buffer kept in registers, in floats (its mask, if any, is the bits of an `i64`).
pub const MAX_BUFFER: u64 = 64;

/// The most floats kept in registers per thread, over all register buffers (not all live at once:
/// a step's score tile dies into its probabilities).
pub const MAX_TOTAL: u64 = 256;

/// The most points of an Einsum's unrolled indices (copies of its innermost code).
pub const MAX_UNROLLED: u64 = 64;

/// Per buffer of `program`, whether each thread keeps it in registers (all `false` for a program
/// without batch ranks, or whose lane rank runs a warp per point whatever the extents).
pub fn register_buffers(program: &LoopProgram) -> Vec<bool> {
    let c = &program.cascade;
    let none = vec![false; program.buffers.len()];
    let batch = super::launch::batch_ranks(c);
    let Some(lane) = batch.last() else { return none };
    if let Extent::Fixed(n) = c.rank(*lane).extent {
        if super::launch::lanes_per_point(program, n, super::launch::WARP) > 1 {
            return none;
        }
    }
    let streamed = loop_indices(&program.body);
    let mut chosen: Vec<bool> = (0..program.buffers.len())
        .map(|b| {
            private_size(program, b).is_some()
                && addressed_plainly(program, b)
                && (place(program, b).is_some() || running_loop(program, b).is_some())
        })
        .collect();
    loop {
        settle(program, &streamed, &mut chosen);
        let total: u64 = (0..chosen.len()).filter(|b| chosen[*b]).filter_map(|b| private_size(program, b)).sum();
        if total <= MAX_TOTAL {
            return chosen;
        }
        // Too many: the last buffer goes, and the rest settles again.
        let last = chosen.iter().rposition(|c| *c).expect("a chosen buffer");
        chosen[last] = false;
    }
}

/// Drops buffers from `chosen` until every Einsum's unrolled code is within bounds and its
/// addresses at the unrolled indices are constants: a register buffer, or the last (contiguous)
/// position of an input or output at a subscript that needs no range check. Any other access
/// at an unrolled index (interleaved scratch, a strided row, a checked coordinate) would need
/// an address or a condition per point, which LLVM computes once before the loops around it
/// and keeps in registers throughout.
fn settle(program: &LoopProgram, streamed: &[Index], chosen: &mut [bool]) {
    let c = &program.cascade;
    loop {
        let mut dropped = false;
        for e in &c.einsums {
            let unrolled = unrolled_indices(program, chosen, e);
            if unrolled.is_empty() {
                continue;
            }
            let points =
                unrolled.iter().map(|i| fixed_extent(c, i.rank).unwrap_or(u64::MAX)).fold(1u64, u64::saturating_mul);
            // `at(d)`: the indices of position `d`'s subscript, and whether it is always inside.
            let constant = |tensor: TensorId, at: &dyn Fn(usize) -> (Vec<Index>, bool)| {
                let buffer = &program.buffers[tensor.index()];
                let positions = c.tensor(tensor).ranks.len();
                chosen[tensor.index()]
                    || (0..positions).all(|d| {
                        let (indices, inside) = at(d);
                        !indices.iter().any(|i| unrolled.contains(i))
                            || (d + 1 == positions && buffer.role != BufferRole::Temp && inside)
                    })
            };
            let target_ok = constant(e.target, &|d| (e.lhs[d].index().into_iter().collect(), true));
            let reads_ok = e.reads().iter().all(|(t, subscripts)| {
                constant(*t, &|d| {
                    let mut found = vec![];
                    subscripts[d].for_each_index(&mut |i| found.push(i));
                    (found, crate::schedule::layout::always_inside(c, &subscripts[d], c.tensor(*t).ranks[d]))
                })
            });
            if points <= MAX_UNROLLED && !unrolled.iter().any(|i| streamed.contains(i)) && target_ok && reads_ok {
                continue;
            }
            // The target goes first (a sum into a row of `F` floats over a tile of 64 keeps the
            // tile); where it is not in registers, the reads that unroll the Einsum go.
            if std::mem::replace(&mut chosen[e.target.index()], false) {
                dropped = true;
                continue;
            }
            for (t, _) in e.reads() {
                dropped |= std::mem::replace(&mut chosen[t.index()], false);
            }
        }
        if !dropped {
            return;
        }
    }
}

/// The indices of `einsum` to unroll: those at the fixed positions of its register buffers'
/// accesses (its target's and its reads'), in order of first appearance.
pub fn unrolled_indices(program: &LoopProgram, registers: &[bool], einsum: &Einsum) -> Vec<Index> {
    let mut found: Vec<Index> = Vec::new();
    let mut add = |tensor: TensorId, at: &mut dyn FnMut(usize) -> Option<Index>| {
        if !registers[tensor.index()] {
            return;
        }
        for d in fixed_positions(program, tensor.index()) {
            if let Some(i) = at(d) {
                if !found.contains(&i) {
                    found.push(i);
                }
            }
        }
    };
    add(einsum.target, &mut |d| einsum.lhs[d].index());
    for (tensor, subscripts) in einsum.reads() {
        add(tensor, &mut |d| subscripts[d].as_index());
    }
    found
}

/// The positions of buffer `b` that a thread stores in full at a fixed extent (not batch ranks,
/// not the current step of a streamed loop).
pub fn fixed_positions(program: &LoopProgram, b: usize) -> Vec<usize> {
    let c = &program.cascade;
    let tensor = c.tensor(program.buffers[b].tensor);
    (0..tensor.ranks.len())
        .filter(|d| program.buffers[b].slots[*d] == Slot::Full && !is_batch_rank(c, tensor.ranks[*d]))
        .collect()
}

/// The constant element strides of a register buffer: row-major over its fixed positions and
/// the two slots of a running tensor's iterate, 0 at every other position (a batch rank's
/// coordinate is 0 in a thread, a current slot is one).
pub fn private_strides(program: &LoopProgram, b: usize) -> Vec<u64> {
    let c = &program.cascade;
    let buffer = &program.buffers[b];
    let tensor = c.tensor(buffer.tensor);
    let fixed = fixed_positions(program, b);
    let mut strides = vec![0; tensor.ranks.len()];
    let mut next = 1;
    for d in (0..tensor.ranks.len()).rev() {
        if fixed.contains(&d) {
            strides[d] = next;
            next *= fixed_extent(c, tensor.ranks[d]).expect("a register buffer's fixed position");
        } else if buffer.slots[d] == Slot::Alternate {
            strides[d] = next;
            next *= 2;
        }
    }
    strides
}

/// The floats a thread needs for buffer `b` as a private array, if it can have one: a tensor of
/// fixed size per thread, or a running tensor of one value per thread (its two iterates; see
/// `running_loop`).
pub fn private_size(program: &LoopProgram, b: usize) -> Option<u64> {
    let c = &program.cascade;
    let buffer = &program.buffers[b];
    let tensor = c.tensor(buffer.tensor);
    if buffer.role != BufferRole::Temp {
        return None;
    }
    if running_loop(program, b).is_some() {
        return fixed_positions(program, b).is_empty().then_some(2);
    }
    if tensor.kind != (TensorKind::Defined { iterative: None }) || buffer.slots.contains(&Slot::Alternate) {
        return None;
    }
    let mut size = 1u64;
    for d in fixed_positions(program, b) {
        size = size.saturating_mul(fixed_extent(c, tensor.ranks[d])?);
    }
    (size <= MAX_BUFFER).then_some(size)
}

/// For a running tensor (an iterate kept in two slots) of one top-level loop, that loop's index:
/// every Einsum that writes or reads it inside the loop addresses its iterate at the loop index
/// or the next, and outside the loop it is only initialized (before) and read at the last
/// iterate (after). In registers its two slots are the current and the next iterate (`lower`
/// addresses the iterate at `c` as slot `c - index` inside the loop, slot 0 outside) and each
/// step ends by moving the next into the current.
pub fn running_loop(program: &LoopProgram, b: usize) -> Option<Index> {
    let c = &program.cascade;
    let buffer = &program.buffers[b];
    let tensor_id = buffer.tensor;
    let tensor = c.tensor(tensor_id);
    let TensorKind::Defined { iterative: Some(k) } = tensor.kind else { return None };
    if buffer.slots[k] != Slot::Alternate {
        return None;
    }
    let rank = tensor.ranks[k];
    let touches = |e: &Einsum| e.target == tensor_id || e.reads().iter().any(|(t, _)| *t == tensor_id);
    let mut found: Option<Index> = None;
    let mut after = false;
    for node in &program.body {
        match node {
            Node::Loop { index, body, .. } => {
                let ids = computes(body);
                if !ids.iter().any(|id| touches(&c.einsums[id.index()])) {
                    continue;
                }
                if found.is_some() || index.rank != rank {
                    return None;
                }
                let current = |s: &Affine| match s {
                    Affine::Index(i) => *i == *index,
                    Affine::Add(a, b) => {
                        matches!((&**a, &**b), (Affine::Index(i), Affine::Const(1)) if *i == *index)
                    }
                    _ => false,
                };
                for id in ids {
                    let e = &c.einsums[id.index()];
                    if e.target == tensor_id && !matches!(e.lhs[k], Lhs::Next(i) if i == *index) {
                        return None;
                    }
                    if !e.reads().iter().filter(|(t, _)| *t == tensor_id).all(|(_, s)| current(&s[k])) {
                        return None;
                    }
                }
                found = Some(*index);
                after = true;
            }
            Node::Compute { einsum } => {
                let e = &c.einsums[einsum.index()];
                let initial = e.target == tensor_id && e.lhs[k] == Lhs::Initial && !after;
                let last = e.reads().iter().filter(|(t, _)| *t == tensor_id).all(|(_, s)| s[k] == Affine::Extent(rank));
                if e.target == tensor_id && !initial || !last || (after && e.target == tensor_id) {
                    return None;
                }
                if !after && e.reads().iter().any(|(t, _)| *t == tensor_id) {
                    return None;
                }
            }
        }
    }
    found
}

fn fixed_extent(c: &Cascade, rank: RankId) -> Option<u64> {
    match c.rank(rank).extent {
        Extent::Fixed(n) if n > 0 => Some(n),
        _ => None,
    }
}

/// Whether every write and read of buffer `b` is at a bare index of the position's own rank at
/// each fixed position, so that its coordinates stay inside the private array.
fn addressed_plainly(program: &LoopProgram, b: usize) -> bool {
    let c = &program.cascade;
    let tensor_id = program.buffers[b].tensor;
    let ranks = &c.tensor(tensor_id).ranks;
    let fixed = fixed_positions(program, b);
    let plain = |i: Option<Index>, d: usize| i.is_some_and(|i| i.rank == ranks[d]);
    c.einsums.iter().all(|e| {
        let target_ok = e.target != tensor_id || fixed.iter().all(|d| plain(e.lhs[*d].index(), *d));
        let reads_ok = e.reads().iter().filter(|(t, _)| *t == tensor_id).all(|(_, subscripts)| {
            fixed.iter().all(|d| matches!(&subscripts[*d], Affine::Index(_)) && plain(subscripts[*d].as_index(), *d))
        });
        target_ok && reads_ok
    })
}

/// Where every Einsum that writes or reads buffer `b` is: `Some(Some(index))` when all are in
/// the top-level loop over `index` (the buffer lives within a step), `Some(None)` when all are
/// outside loops, `None` when they are in several places.
pub fn place(program: &LoopProgram, b: usize) -> Option<Option<Index>> {
    let c = &program.cascade;
    let tensor = program.buffers[b].tensor;
    let touches = |id: &EinsumId| {
        let e = &c.einsums[id.index()];
        e.target == tensor || e.reads().iter().any(|(t, _)| *t == tensor)
    };
    let mut found: Option<Option<Index>> = None;
    for node in &program.body {
        let (here, ids) = match node {
            Node::Loop { index, body, .. } => (Some(*index), computes(body)),
            Node::Compute { einsum } => (None, vec![*einsum]),
        };
        if ids.iter().any(touches) {
            if found.is_some_and(|f| f != here) {
                return None;
            }
            found = Some(here);
        }
    }
    found
}

/// The Einsums computed in `body`, at any depth.
fn computes(body: &[Node]) -> Vec<EinsumId> {
    let mut found = Vec::new();
    for node in body {
        match node {
            Node::Loop { body, .. } => found.extend(computes(body)),
            Node::Compute { einsum } => found.push(*einsum),
        }
    }
    found
}

/// The indices of the program's loops, at any depth.
fn loop_indices(body: &[Node]) -> Vec<Index> {
    let mut found = Vec::new();
    for node in body {
        if let Node::Loop { index, body, .. } = node {
            found.push(*index);
            found.extend(loop_indices(body));
        }
    }
    found
}
