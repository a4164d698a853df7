//! Sums computed by the Einsum that reads them: a scratch sum read at the same point by one
//! element-wise Einsum becomes that Einsum's reduction, and what the reader does with it the
//! register block's epilogue.
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
//! A score modification folds the same way: `BS = cap * tanh(BQK / cap) + Slope[h] * (m - p)
//! where m <= p` takes `BQK`'s contraction, and the block applies the soft-capping and the bias
//! to its accumulators in registers, where a hand-written kernel applies a `score_mod`, on the
//! tiers whose register blocks leave room for it (`lanes::folds_modifications`; elsewhere only
//! the additions fold). The tensor-core kernels make the running output's fold in their own plan
//! (`tensor_cores::Accumulate`).
//!
//! Needs: a scheduled program. Guarantees: the cascade computes the same values in the same
//! order of operations (the sum is complete before the reader uses it, as before); a sum is
//! folded only where its reader names it once, at plain indices in the order of its own
//! left-hand side, both run in lanes along the same index in the same loop, the sum is a scratch
//! tensor with no undefined point, or one under a statement filter masked by it alone, read at its
//! own indices by a reader whose filter makes every comparison of it, with no reduction inside and
//! no other reader, the
//! reader holds no reduction, a reader under a statement filter reads only points that always
//! exist (`lanes::defined_everywhere`), the folded Einsum is what a register block computes
//! (`lanes::blockable_reduction`), and a reader takes one sum at most.

use crate::ir::*;
use crate::schedule::lanes::{blockable_reduction, folds_modifications, reduction, vectorizable, without_reductions};
use crate::schedule::{schedule, BufferRole, HostTier, LoopProgram, Node, ScheduleError};

/// A sum (`partial`) folded into the one Einsum that reads it (`update`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Fold {
    pub partial: EinsumId,
    pub update: EinsumId,
}

/// `program` with every fold `plan` finds, scheduled again; `program` itself when there is none.
pub fn accumulate(program: LoopProgram, tier: HostTier) -> Result<LoopProgram, ScheduleError> {
    let folds = plan(&program, tier);
    if folds.is_empty() {
        return Ok(program);
    }
    schedule(&apply(&program.cascade, &folds))
}

/// The sums of `program` worth folding into their readers on `tier`.
pub fn plan(program: &LoopProgram, tier: HostTier) -> Vec<Fold> {
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
            if let Some(update) = foldable(program, *partial, bound, tier) {
                if computed.contains(&update) && !folds.iter().any(|f: &Fold| f.update == update) {
                    folds.push(Fold { partial: *partial, update });
                }
            }
        }
    }
    folds
}

/// The Einsum `partial` folds into, if it can and it pays (see the module's guarantees).
fn foldable(program: &LoopProgram, partial: EinsumId, bound: Option<Index>, tier: HostTier) -> Option<EinsumId> {
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
        && distinct
        && buffer.role == BufferRole::Temp
        // Masked, a sum may be only by its own filter (checked below).
        && (!buffer.masked || !s.filter.is_empty())
        && c.definitions(tensor).count() == 1
        && matches!(c.tensor(tensor).kind, TensorKind::Defined { iterative: None });
    if !ok {
        return None;
    }
    let readers: Vec<(usize, &Einsum)> =
        c.einsums.iter().enumerate().filter(|(_, e)| e.reads().iter().any(|(t, _)| *t == tensor)).collect();
    let [(update, u)] = readers.as_slice() else { return None };
    // An element-wise reader: a read inside a reader's own reduction is not the reader's value.
    if u.body.holds_reduction() {
        return None;
    }
    let subscripts = the_read(u, tensor)?;
    let renamed: Vec<Index> = subscripts.iter().map(|a| a.as_index()).collect::<Option<_>>()?;
    let in_order = u.lhs_indices().eq(renamed.iter().copied());
    let clash = r.indices.iter().any(|i| renamed.contains(i));
    // A sum under a filter folds into a reader that reads it at its own indices (so no split
    // pair of it is read at other primes, which would mask it too) and makes every comparison of
    // its filter: the reader then reads it only where it is defined (narrowing,
    // `optimize::narrow`, gives a masked score's contraction its reader's mask).
    let filtered_alike = s.filter.is_empty() || (renamed == plain && s.filter.iter().all(|c| u.filter.contains(c)));
    if !in_order || clash || !filtered_alike || !(adds_to(u, tensor) || folds_modifications(tier)) {
        return None;
    }
    // The folded Einsum must be what a register block computes (an element-wise reader, under a
    // statement filter one that reads nothing that may be undefined).
    let folded = Einsum { body: folded_value(s, u), ..(*u).clone() };
    if !blockable_reduction(program, &folded) {
        return None;
    }
    // Both in lanes along the same index: the last the loop does not bind, with more than a point.
    let lane = plain.iter().rposition(|i| Some(*i) != bound && !matches!(c.rank(i.rank).extent, Extent::Fixed(1)))?;
    let pays = vectorizable(program, s, plain[lane]) && vectorizable(program, u, renamed[lane]);
    pays.then_some(EinsumId::new(*update))
}

/// Gives the subscripts at which `reader`'s value reads `tensor`, when that is its only read of
/// `tensor` (its filter reads none).
fn the_read(reader: &Einsum, tensor: TensorId) -> Option<&[Affine]> {
    let reads = reader.reads();
    let [(_, subscripts)] = reads.iter().filter(|(t, _)| *t == tensor).collect::<Vec<_>>()[..] else { return None };
    reader.body.accesses().iter().any(|(t, _)| *t == tensor).then_some(*subscripts)
}

/// Whether `reader`'s value is its read of `tensor` plus a term that does not read it.
fn adds_to(reader: &Einsum, tensor: TensorId) -> bool {
    let Expr::Binary(BinaryOp::Add, a, b) = &reader.body else { return false };
    let is_read = |e: &Expr| matches!(e, Expr::Access { tensor: t, .. } if *t == tensor);
    (is_read(a) || is_read(b)) && the_read(reader, tensor).is_some()
}

/// Gives the value of `reader` with its read of the sum that `partial` computes replaced by the
/// sum itself, whose left-hand indices take the names the reader reads them at.
fn folded_value(partial: &Einsum, reader: &Einsum) -> Expr {
    let subscripts = the_read(reader, partial.target).expect("read once");
    let to = |i: Index| partial.lhs.iter().position(|l| *l == Lhs::Index(i)).map(|k| subscripts[k].clone());
    let mut sum = partial.body.clone();
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
    // A sum added to a term comes first, as the register blocks have always added them.
    match &reader.body {
        Expr::Binary(BinaryOp::Add, term, read) if matches!(&**read, Expr::Access { tensor, .. } if *tensor == partial.target) => {
            Expr::Binary(BinaryOp::Add, Box::new(sum), term.clone())
        }
        value => replaced(value, partial.target, &sum),
    }
}

/// The cascade with each fold made: the reader's read of the sum becomes the sum, its indices
/// renamed to the reader's; the sums and their tensors are gone.
pub fn apply(cascade: &Cascade, folds: &[Fold]) -> Cascade {
    let mut c = cascade.clone();
    for fold in folds {
        let s = &cascade.einsums[fold.partial.index()];
        let u = &cascade.einsums[fold.update.index()];
        c.einsums[fold.update.index()].body = folded_value(s, u);
    }
    let gone: Vec<TensorId> = folds.iter().map(|f| cascade.einsums[f.partial.index()].target).collect();
    c.remove_tensors(&gone);
    c
}

/// Gives `value` with its read of `tensor` replaced by `by`.
fn replaced(value: &Expr, tensor: TensorId, by: &Expr) -> Expr {
    match value {
        Expr::Access { tensor: t, .. } if *t == tensor => by.clone(),
        Expr::Unary(op, a) => Expr::Unary(*op, Box::new(replaced(a, tensor, by))),
        Expr::Binary(op, a, b) => {
            Expr::Binary(*op, Box::new(replaced(a, tensor, by)), Box::new(replaced(b, tensor, by)))
        }
        other => other.clone(),
    }
}
