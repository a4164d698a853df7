//! Running outputs updated by their contraction: a sum read by one Einsum that adds something
//! to it at the same point is computed by that Einsum.
//!
//! FlashAttention's cascade contracts each tile of probabilities with the values into a
//! partial product, then updates the running output with it:
//!
//! ```text
//! SLNV[f, m1, p]    = sum[m0](SLN[m1, m0, p] * V[f, m1 * M0 + m0])
//! RNV[f, m1 + 1, p] = SLNV[f, m1, p] + RNV[f, m1, p] * PRM[m1, p]
//! ```
//!
//! Run as written, each step stores the partial product and passes over it again to update the
//! running output. Here the two become one Einsum,
//! `RNV[f, m1 + 1, p] = sum[m0](SLN[m1, m0, p] * V[f, m1 * M0 + m0]) + RNV[f, m1, p] * PRM[m1, p]`,
//! which a register block computes as it computes the partial product, adding the rescaled
//! running output to its accumulators before it stores them (`lanes::reduction`'s epilogue).
//! The tensor-core kernels make the same fold in their own plan (`tensor_cores::Accumulate`).
//!
//! Needs: a scheduled program. Guarantees: the cascade computes the same values in the same
//! order of operations (the sum is complete before the term is added, as before); a sum is
//! folded only where its reader names it at plain indices in the order of its own left-hand
//! side, both run in lanes along the same index in the same loop, the sum is a scratch tensor
//! with no filter, no undefined point, no reduction inside and no other reader, and a reader
//! takes one sum at most.

use crate::ir::*;
use crate::schedule::lanes::{reduction, vectorizable, without_reductions};
use crate::schedule::{schedule, BufferRole, LoopProgram, Node, ScheduleError};

/// A sum (`partial`) folded into the one Einsum that reads it (`update`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Fold {
    pub partial: EinsumId,
    pub update: EinsumId,
}

/// `program` with every fold `plan` finds, scheduled again; `program` itself when there is none.
pub fn accumulate(program: LoopProgram) -> Result<LoopProgram, ScheduleError> {
    let folds = plan(&program);
    if folds.is_empty() {
        return Ok(program);
    }
    schedule(&apply(&program.cascade, &folds))
}

/// The sums of `program` worth folding into their readers.
pub fn plan(program: &LoopProgram) -> Vec<Fold> {
    let mut folds = Vec::new();
    let mut groups: Vec<(Option<Index>, &[Node])> = vec![(None, &program.body)];
    for node in &program.body {
        if let Node::Loop { index, body, .. } = node {
            groups.push((Some(*index), body));
        }
    }
    for (bound, nodes) in groups {
        let computed: Vec<EinsumId> = nodes
            .iter()
            .filter_map(|n| match n {
                Node::Compute { einsum } => Some(*einsum),
                Node::Loop { .. } => None,
            })
            .collect();
        for partial in &computed {
            // One sum per reader: `W x + U h` keeps its second product apart.
            if let Some(update) = foldable(program, *partial, bound) {
                if computed.contains(&update) && !folds.iter().any(|f: &Fold| f.update == update) {
                    folds.push(Fold { partial: *partial, update });
                }
            }
        }
    }
    folds
}

/// The Einsum `partial` folds into, if it can and it pays (see the module's guarantees).
fn foldable(program: &LoopProgram, partial: EinsumId, bound: Option<Index>) -> Option<EinsumId> {
    let c = &program.cascade;
    let s = &c.einsums[partial.index()];
    let r = reduction(&s.body)?;
    let tensor = s.target;
    let buffer = &program.buffers[tensor.index()];
    let plain: Vec<Index> =
        s.lhs.iter().map(|l| if let Lhs::Index(i) = l { Some(*i) } else { None }).collect::<Option<_>>()?;
    let distinct = plain.iter().enumerate().all(|(k, i)| !plain[..k].contains(i));
    // No reduction inside: renaming the sum's indices to the reader's could let an inner
    // reduction capture one (`sum[n'](... C[n', n])` read at `n'`).
    let ok = r.op == ReduceOp::Sum
        && r.epilogue.is_none()
        && without_reductions(r.body, r.filter)
        && s.filter.is_empty()
        && distinct
        && buffer.role == BufferRole::Temp
        && !buffer.masked
        && c.definitions(tensor).count() == 1
        && matches!(c.tensor(tensor).kind, TensorKind::Defined { iterative: None });
    if !ok {
        return None;
    }
    let readers: Vec<(usize, &Einsum)> =
        c.einsums.iter().enumerate().filter(|(_, e)| e.reads().iter().any(|(t, _)| *t == tensor)).collect();
    let [(update, u)] = readers.as_slice() else { return None };
    let subscripts = added_read(u, tensor)?;
    let renamed: Vec<Index> = subscripts.iter().map(|a| a.as_index()).collect::<Option<_>>()?;
    let in_order = u.lhs_indices().eq(renamed.iter().copied());
    let clash = r.indices.iter().any(|i| renamed.contains(i));
    if !u.filter.is_empty() || !in_order || clash {
        return None;
    }
    // Both in lanes along the same index: the last the loop does not bind, with more than a point.
    let lane = plain.iter().rposition(|i| Some(*i) != bound && !matches!(c.rank(i.rank).extent, Extent::Fixed(1)))?;
    let pays = vectorizable(program, s, plain[lane]) && vectorizable(program, u, renamed[lane]);
    pays.then_some(EinsumId::new(*update))
}

/// The subscripts at which `update`'s value adds `tensor` to a term that does not read it, when
/// that is the only read of `tensor` in the Einsum.
fn added_read(update: &Einsum, tensor: TensorId) -> Option<&[Affine]> {
    let Expr::Binary(BinaryOp::Add, a, b) = &update.body else { return None };
    let only = update.reads().iter().filter(|(t, _)| *t == tensor).count() == 1;
    [(a, b), (b, a)].into_iter().find_map(|(x, _)| match &**x {
        Expr::Access { tensor: t, subscripts } if *t == tensor && only => Some(subscripts.as_slice()),
        _ => None,
    })
}

/// The cascade with each fold made: the reader's value becomes the sum, its indices renamed to
/// the reader's, plus the reader's other term; the sums and their tensors are gone.
pub fn apply(cascade: &Cascade, folds: &[Fold]) -> Cascade {
    let mut c = cascade.clone();
    for fold in folds {
        let s = &cascade.einsums[fold.partial.index()];
        let u = &cascade.einsums[fold.update.index()];
        let subscripts = added_read(u, s.target).expect("planned");
        let to = |i: Index| s.lhs.iter().position(|l| *l == Lhs::Index(i)).map(|k| subscripts[k].clone());
        let mut sum = s.body.clone();
        sum.walk_mut(&mut |e| match e {
            Expr::Index(i) => {
                if let Some(Affine::Index(j)) = to(*i) {
                    *i = j;
                }
            }
            Expr::Access { subscripts, .. } => {
                for sub in subscripts.iter_mut() {
                    *sub = sub.substitute(&to);
                }
            }
            _ => {}
        });
        let Expr::Binary(_, a, b) = &u.body else { unreachable!("planned") };
        let reads_partial = |e: &Expr| matches!(e, Expr::Access { tensor, .. } if *tensor == s.target);
        let term = if reads_partial(a) { b } else { a };
        c.einsums[fold.update.index()].body = Expr::Binary(BinaryOp::Add, Box::new(sum), term.clone());
    }
    let gone: Vec<TensorId> = folds.iter().map(|f| cascade.einsums[f.partial.index()].target).collect();
    c.remove_tensors(&gone);
    c
}
