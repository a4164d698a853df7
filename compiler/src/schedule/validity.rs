//! Filters that only restate a split pair's validity (`where m1 * M0 + m0 < M`, which the
//! optimizer writes for split ranks a person declared) are dropped: every back end, like the
//! interpreter, already takes a point outside the whole rank to be absent, and the filter would
//! keep a reduction or an element-wise Einsum off its unfiltered fast paths (a step of FuseMax's
//! `attention_2pass` ran with masks at every point).
//!
//! Needs: a checked cascade. Guarantees: the same values (the interpreter skips a point whose
//! split pairs lie outside their whole ranks before it tests any filter); every statement and
//! reduction filter that is not such a condition stays, in its order.

use crate::ir::*;

/// `cascade` without its split-validity filters (see the module).
pub fn drop_split_validity(cascade: &Cascade) -> Cascade {
    let mut c = cascade.clone();
    for einsum in &mut c.einsums {
        einsum.filter.retain(|cond| !cascade.is_split_validity(cond));
        einsum.body.walk_mut(&mut |e| {
            if let Expr::Reduce { filter, .. } = e {
                filter.retain(|cond| !cascade.is_split_validity(cond));
            }
        });
    }
    c
}
