//! The Loop IR verifier: the invariants every emitter relies on, checked between the scheduling
//! passes (after `schedule`, after `pack`), as Cranelift checks its IR between passes.
//!
//! Needs: a `LoopProgram`. Guarantees, when it returns `Ok`:
//! - one buffer per tensor, in tensor order, with one slot per position; inputs, outputs and
//!   scratch as the cascade says (input `i` is the cascade's `i`-th input, and so on);
//! - every Einsum is computed exactly once, and loops are only at the top level, over an index
//!   that every Einsum in them binds;
//! - a position kept for the current step (`Slot::Current`) belongs to a tensor written and read
//!   only inside the loop over that position's rank; two slots (`Slot::Alternate`) only at the
//!   iterative position of a recurrence;
//! - every tensor is written before it is read, in program order (inside a loop, a recurrence
//!   reads its own previous iterate, which its initial value wrote before the loop);
//! - no Einsum writes an input.

use crate::ir::*;
use crate::schedule::{BufferRole, LoopProgram, Node, Slot};

/// A broken invariant, named with the tensor or Einsum it concerns.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid Loop IR for `{kernel}`: {what}")]
pub struct LoopIrError {
    pub kernel: String,
    pub what: String,
}

/// Checks `program` (see the module doc).
pub fn verify(program: &LoopProgram) -> Result<(), LoopIrError> {
    let c = &program.cascade;
    let fail = |what: String| Err(LoopIrError { kernel: c.name.clone(), what });
    if program.buffers.len() != c.tensors.len() {
        return fail(format!("{} buffers for {} tensors", program.buffers.len(), c.tensors.len()));
    }
    let inputs = c.inputs();
    for (t, buffer) in program.buffers.iter().enumerate() {
        let tensor = &c.tensors[t];
        if buffer.tensor.index() != t || buffer.slots.len() != tensor.ranks.len() {
            return fail(format!("the buffer of `{}` does not match its tensor", tensor.name));
        }
        let role_ok = match buffer.role {
            BufferRole::Input(i) => inputs.get(i) == Some(&buffer.tensor),
            BufferRole::Output(o) => c.outputs.get(o).map(|out| out.tensor) == Some(buffer.tensor),
            BufferRole::Temp => {
                matches!(tensor.kind, TensorKind::Defined { .. })
                    && !c.outputs.iter().any(|o| o.tensor == buffer.tensor)
            }
        };
        if !role_ok {
            return fail(format!("`{}` has the role {:?}", tensor.name, buffer.role));
        }
        for (q, slot) in buffer.slots.iter().enumerate() {
            let iterative = matches!(tensor.kind, TensorKind::Defined { iterative: Some(p) } if p == q);
            if *slot == Slot::Alternate && !iterative {
                return fail(format!("`{}` keeps two slots at position {q}, which is not iterative", tensor.name));
            }
        }
    }
    // Program order: which Einsums run, where, and what is written before what is read.
    let mut computed = vec![0usize; c.einsums.len()];
    let mut written = vec![false; c.tensors.len()];
    for id in &inputs {
        written[id.index()] = true;
    }
    for node in &program.body {
        match node {
            Node::Compute { einsum } => {
                let e = check_compute(program, *einsum, &mut computed, &written, None)
                    .map_err(|what| LoopIrError { kernel: c.name.clone(), what })?;
                written[e.target.index()] = true;
            }
            Node::Loop { index, body, .. } => {
                // A loop's members are written by the loop as a whole: a member may read another
                // that comes later in the step only as a recurrence's previous iterate.
                let members: Vec<TensorId> = body
                    .iter()
                    .filter_map(|n| match n {
                        Node::Compute { einsum } => Some(c.einsums.get(einsum.index()).map(|e| e.target)),
                        Node::Loop { .. } => None,
                    })
                    .flatten()
                    .collect();
                let mut inside = written.clone();
                for m in &members {
                    let iterative = matches!(c.tensor(*m).kind, TensorKind::Defined { iterative: Some(_) });
                    inside[m.index()] |= iterative;
                }
                for inner in body {
                    let Node::Compute { einsum } = inner else {
                        return fail(format!("a loop over `{}` holds a loop", c.index_name(*index)));
                    };
                    let e = check_compute(program, *einsum, &mut computed, &inside, Some(*index))
                        .map_err(|what| LoopIrError { kernel: c.name.clone(), what })?;
                    inside[e.target.index()] = true;
                }
                for m in members {
                    written[m.index()] = true;
                }
            }
        }
    }
    if let Some(e) = computed.iter().position(|n| *n != 1) {
        let label = c.einsum_label(EinsumId::new(e));
        return fail(format!("`{label}` is computed {} times", computed[e]));
    }
    // A position kept for the current step is written and read only inside the loop over it.
    for (t, buffer) in program.buffers.iter().enumerate() {
        for (q, slot) in buffer.slots.iter().enumerate() {
            if *slot != Slot::Current {
                continue;
            }
            let rank = c.tensors[t].ranks[q];
            let touched_outside = program.body.iter().any(|node| match node {
                Node::Compute { einsum } => touches(&c.einsums[einsum.index()], TensorId::new(t)),
                Node::Loop { index, body, .. } => {
                    index.rank != rank
                        && body.iter().any(|n| match n {
                            Node::Compute { einsum } => touches(&c.einsums[einsum.index()], TensorId::new(t)),
                            Node::Loop { .. } => false,
                        })
                }
            });
            if touched_outside {
                return fail(format!(
                    "`{}` keeps only the current step of `{}` but is used outside the loop over it",
                    c.tensors[t].name,
                    c.rank(rank).name
                ));
            }
        }
    }
    Ok(())
}

/// Checks one `Compute` node: the Einsum exists, is counted, writes no input, binds the loop's
/// index (inside a loop), and reads only tensors in `written`; returns the Einsum.
fn check_compute<'p>(
    program: &'p LoopProgram,
    id: EinsumId,
    computed: &mut [usize],
    written: &[bool],
    loop_index: Option<Index>,
) -> Result<&'p Einsum, String> {
    let c = &program.cascade;
    let Some(e) = c.einsums.get(id.index()) else { return Err(format!("no Einsum {}", id.index())) };
    computed[id.index()] += 1;
    let label = c.einsum_label(id);
    if matches!(program.buffers[e.target.index()].role, BufferRole::Input(_)) {
        return Err(format!("`{label}` writes an input"));
    }
    if let Some(index) = loop_index {
        if !e.lhs.iter().any(|l| matches!(l, Lhs::Index(i) | Lhs::Next(i) if *i == index)) {
            return Err(format!("`{label}` runs in the loop over `{}` but does not bind it", c.index_name(index)));
        }
    }
    for (tensor, _) in e.reads() {
        if !written[tensor.index()] && tensor != e.target {
            return Err(format!("`{label}` reads `{}` before it is written", c.tensor(tensor).name));
        }
    }
    Ok(e)
}

/// Whether `einsum` writes or reads `tensor`.
fn touches(einsum: &Einsum, tensor: TensorId) -> bool {
    einsum.target == tensor || einsum.reads().iter().any(|(t, _)| *t == tensor)
}
