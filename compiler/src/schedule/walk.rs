//! Walks that both host emitters run the same way, written once over a small interface of
//! loop primitives that each emitter implements for its own values (a Cranelift `Value`, an LLVM
//! register name).
//!
//! Needs: a verified program and an Einsum the layer chose the walk for. Guarantees: every point
//! of the Einsum's free indices is computed exactly once through `compute_point`, in the order
//! the layer decided; what a point computes is the emitter's.

use crate::ir::*;
use crate::schedule::pack::{CopyOrder, COPY_BLOCK};

/// The loop primitives of a host emitter.
pub trait Walker<'a> {
    /// An `i64` value of the emitted code.
    type Int: Clone;

    fn constant(&mut self, n: i64) -> Self::Int;

    /// The extent of `rank` at run time.
    fn extent(&mut self, rank: RankId) -> Self::Int;

    /// Runs `body` for `index` = `start`, `start + step`, ... while `index + step <= end`, and
    /// returns where it stopped (the start of the remainder).
    fn for_range(
        &mut self,
        index: Index,
        start: Self::Int,
        end: Self::Int,
        step: i64,
        body: &mut dyn FnMut(&mut Self),
    ) -> Self::Int;

    /// Runs `body` with `index` bound to its current value plus `k`.
    fn with_offset(&mut self, index: Index, k: i64, body: &mut dyn FnMut(&mut Self));

    /// Computes and stores `einsum` at the point its bound indices name.
    fn compute_point(&mut self, einsum: &'a Einsum);
}

/// A transposing copy in the order `schedule::pack::copy_order` chose: the free indices other
/// than the copy's rows and columns outside, then blocks of `COPY_BLOCK` rows, each walked column
/// by column with the rows of the block innermost, then the last rows one by one.
pub fn copy<'a, W: Walker<'a> + ?Sized>(g: &mut W, einsum: &'a Einsum, free: &[Index], order: CopyOrder) {
    let (u, v) = (order.rows, order.columns);
    if let Some(first) = free.iter().find(|i| **i != u && **i != v) {
        let rest: Vec<Index> = free.iter().copied().filter(|i| i != first).collect();
        each(g, *first, &mut |g| copy(g, einsum, &rest, order));
        return;
    }
    let (zero, end) = (g.constant(0), g.extent(u.rank));
    let done = g.for_range(u, zero, end.clone(), COPY_BLOCK, &mut |g| {
        each(g, v, &mut |g| {
            for k in 0..COPY_BLOCK {
                g.with_offset(u, k, &mut |g| g.compute_point(einsum));
            }
        })
    });
    g.for_range(u, done, end, 1, &mut |g| each(g, v, &mut |g| g.compute_point(einsum)));
}

/// `body` for every point of `index`'s rank.
fn each<'a, W: Walker<'a> + ?Sized>(g: &mut W, index: Index, body: &mut dyn FnMut(&mut W)) {
    let (zero, end) = (g.constant(0), g.extent(index.rank));
    g.for_range(index, zero, end, 1, body);
}
