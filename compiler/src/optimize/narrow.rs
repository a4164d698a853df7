//! Narrowing: a tensor that every reader reads only under a filter takes the filter itself.
//!
//! ALiBi with soft-capping masks its scores after a function of the contraction,
//! `S = cap * tanh(QK / cap) + bias where m <= p`: the mask sits on `S`, so `QK` is computed at
//! every point, twice the work of a causal kernel whose filter sits on the contraction itself. But
//! `S` reads `QK` only where `m <= p`, and so does every other reader: the points of `QK` outside
//! the filter are never read. Giving `QK` the same filter changes no value that is read (by the
//! sparse semantics, a point the filter admits is defined exactly when it was before), and it lets
//! the scheduler skip the masked tiles of the contraction as it does for causal attention.
//!
//! A comparison is lifted from a reader onto a tensor `T` when it mentions only indices that
//! subscript `T` bare and distinct in that access, and it restricts every point where the access
//! is evaluated: a statement filter for an access anywhere in the value, a reducer's filter for an
//! access in the reducer's body. `T` takes the comparisons, renamed into its own indices, that
//! every access of every reader admits; a split pair's validity (`m1 * M0 + m0 < M`) restricts
//! nothing and is not lifted. Tensors defined by a recurrence, outputs and tensors read in a
//! filter are left as they are.
//!
//! Needs: a verified cascade. Guarantees: a verified cascade whose outputs hold the same bits; its
//! tensors differ only in points that nothing reads.

use std::collections::HashMap;

use crate::ir::*;

/// The cascade with every tensor narrowed to the points its readers read; `None` when no filter
/// could be lifted.
pub fn narrow(cascade: &Cascade) -> Option<Cascade> {
    let mut result = cascade.clone();
    let mut changed = false;
    // A tensor narrowed makes the filters of its own reads liftable onto its operands: visit the
    // definitions last to first, so that one sweep carries a filter up a chain.
    for e in (0..result.einsums.len()).rev() {
        let target = result.einsums[e].target;
        let Some(lifted) = liftable(&result, target) else { continue };
        let filter = &mut result.einsums[e].filter;
        let new: Vec<Cond> = lifted.into_iter().filter(|cond| !filter.contains(cond)).collect();
        if !new.is_empty() {
            filter.extend(new);
            changed = true;
        }
    }
    changed.then_some(result)
}

/// The comparisons, in `tensor`'s indices, that every read of `tensor` is evaluated under;
/// `None` where `tensor` may not be narrowed.
fn liftable(cascade: &Cascade, tensor: TensorId) -> Option<Vec<Cond>> {
    if cascade.outputs.iter().any(|o| o.tensor == tensor)
        || !matches!(cascade.tensor(tensor).kind, TensorKind::Defined { iterative: None })
    {
        return None;
    }
    let mut definitions = cascade.definitions(tensor);
    let (_, definition) = definitions.next()?;
    if definitions.next().is_some() || definition.lhs.iter().any(|lhs| !matches!(lhs, Lhs::Index(_))) {
        return None;
    }
    let own: Vec<Index> = definition.lhs_indices().collect();
    let mut common: Option<Vec<Cond>> = None;
    for reader in cascade.einsums.iter().filter(|r| r.target != tensor) {
        let read_in_filter = reader.filter.iter().any(|cond| reads(&cond.lhs, tensor) || reads(&cond.rhs, tensor));
        if read_in_filter {
            return None;
        }
        let scope: Vec<&Cond> = reader.filter.iter().collect();
        let mut admitted = Vec::new();
        if !admitted_by(cascade, &reader.body, tensor, &own, &scope, &mut admitted) {
            return None;
        }
        for conds in admitted {
            common = Some(match common {
                None => conds,
                Some(before) => before.into_iter().filter(|cond| conds.contains(cond)).collect(),
            });
        }
    }
    common.filter(|conds| !conds.is_empty())
}

/// Collects, for each access of `tensor` in `expr`, the comparisons of `scope` (and of the
/// reducers around it) it can be narrowed by, renamed into `own`; false where an access is read
/// in a reducer's filter.
fn admitted_by<'e>(
    cascade: &Cascade,
    expr: &'e Expr,
    tensor: TensorId,
    own: &[Index],
    scope: &[&'e Cond],
    found: &mut Vec<Vec<Cond>>,
) -> bool {
    match expr {
        Expr::Access { tensor: t, subscripts } if *t == tensor => {
            found.push(renamed(cascade, scope, subscripts, own));
            true
        }
        Expr::Unary(_, arg) => admitted_by(cascade, arg, tensor, own, scope, found),
        Expr::Binary(_, a, b) => {
            admitted_by(cascade, a, tensor, own, scope, found) && admitted_by(cascade, b, tensor, own, scope, found)
        }
        Expr::Reduce { indices, filter, body, .. } => {
            if filter.iter().any(|cond| reads(&cond.lhs, tensor) || reads(&cond.rhs, tensor)) {
                return false;
            }
            // Inside, the reducer's indices are its own: a comparison from outside that names one
            // of them names another binding.
            let mut inner: Vec<&'e Cond> = scope
                .iter()
                .copied()
                .filter(|cond| !indices.iter().any(|i| cond.lhs.mentions(*i) || cond.rhs.mentions(*i)))
                .collect();
            inner.extend(filter.iter());
            admitted_by(cascade, body, tensor, own, &inner, found)
        }
        Expr::Access { .. } | Expr::Const(_) | Expr::Param(_) | Expr::Extent(_) | Expr::Index(_) => true,
    }
}

/// The comparisons of `scope` that mention only indices the access subscripts bare, renamed into
/// the tensor's own indices (none when the subscripts are not distinct bare indices).
fn renamed(cascade: &Cascade, scope: &[&Cond], subscripts: &[Affine], own: &[Index]) -> Vec<Cond> {
    let mut rename: HashMap<Index, Index> = HashMap::new();
    for (subscript, index) in subscripts.iter().zip(own) {
        match subscript.as_index() {
            Some(read) if !rename.contains_key(&read) => rename.insert(read, *index),
            _ => return vec![],
        };
    }
    scope
        .iter()
        // A split pair's validity restricts nothing (`Cascade::is_split_validity`).
        .filter(|cond| !cascade.is_split_validity(cond))
        .filter_map(|cond| {
            let lhs = renamed_expr(&cond.lhs, &rename)?;
            let rhs = renamed_expr(&cond.rhs, &rename)?;
            Some(Cond { lhs, op: cond.op, rhs })
        })
        .collect()
}

/// `expr` with its indices renamed; `None` where it reads a tensor, reduces, or mentions an index
/// outside `rename`.
fn renamed_expr(expr: &Expr, rename: &HashMap<Index, Index>) -> Option<Expr> {
    Some(match expr {
        Expr::Index(index) => Expr::Index(*rename.get(index)?),
        Expr::Const(_) | Expr::Param(_) | Expr::Extent(_) => expr.clone(),
        Expr::Unary(op, arg) => Expr::Unary(*op, Box::new(renamed_expr(arg, rename)?)),
        Expr::Binary(op, a, b) => {
            Expr::Binary(*op, Box::new(renamed_expr(a, rename)?), Box::new(renamed_expr(b, rename)?))
        }
        Expr::Access { .. } | Expr::Reduce { .. } => return None,
    })
}

fn reads(expr: &Expr, tensor: TensorId) -> bool {
    expr.accesses().iter().any(|(t, _)| *t == tensor)
}
