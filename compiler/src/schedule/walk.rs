//! Walks that both host emitters run the same way, written once over a small interface of
//! loop primitives that each emitter implements for its own values (a Cranelift `Value`, an LLVM
//! register name).
//!
//! Needs: a verified program and an Einsum the layer chose the walk for. Guarantees: every point
//! of the Einsum's free indices is computed exactly once through `compute_point`, in the order
//! the layer decided; what a point computes is the emitter's. The integer arithmetic of
//! subscripts and split pairs (`affine`, `coordinates`, `valid_pairs`) is written here once too.

use crate::ir::*;
use crate::schedule::layout::is_batch_rank;
use crate::schedule::pack::{CopyOrder, COPY_BLOCK};

/// An integer operation of the emitted code, on `i64` values.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum IntOp {
    Add,
    Sub,
    Mul,
}

/// The loop primitives of a host emitter.
pub trait Walker<'a> {
    /// An `i64` value of the emitted code.
    type Int: Clone;
    /// A truth value of the emitted code, or a vector of them.
    type Flag: Clone;
    /// An `f32` value of the emitted code, or a vector of them.
    type Value;

    fn cascade(&self) -> &'a Cascade;

    fn constant(&mut self, n: i64) -> Self::Int;

    /// The extent of `rank` at run time.
    fn extent(&mut self, rank: RankId) -> Self::Int;

    /// The value of a bound index: local to the call along a batch rank.
    fn index(&mut self, index: Index) -> Self::Int;

    /// The call's first point along the batch rank `rank`.
    fn base(&mut self, rank: RankId) -> Self::Int;

    fn int(&mut self, op: IntOp, a: Self::Int, b: Self::Int) -> Self::Int;

    /// `a < b`, signed.
    fn less(&mut self, a: Self::Int, b: Self::Int) -> Self::Flag;

    /// Both flags, or (with `lanes`) both vectors of flags.
    fn and(&mut self, a: Self::Flag, b: Self::Flag, lanes: Option<Index>) -> Self::Flag;

    /// An expression's value at the current point, and whether it is defined (`None`: always).
    fn value(&mut self, expr: &Expr) -> (Self::Value, Option<Self::Flag>);

    /// A float comparison, of values or (with `lanes`) of vectors.
    fn compare(&mut self, op: CmpOp, a: Self::Value, b: Self::Value, lanes: Option<Index>) -> Self::Flag;

    /// An expression's values at the lanes `v`, `v + 1`, ..., and their definedness.
    fn value_in_lanes(&mut self, expr: &Expr, v: Index) -> (Self::Value, Option<Self::Flag>);

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

/// A subscript's value; with `global`, a batch rank's index is offset by the call's base.
pub fn affine<'a, W: Walker<'a> + ?Sized>(g: &mut W, subscript: &Affine, global: bool) -> W::Int {
    let both = |g: &mut W, op, a: &Affine, b: &Affine| {
        let (a, b) = (affine(g, a, global), affine(g, b, global));
        g.int(op, a, b)
    };
    match subscript {
        Affine::Const(c) => g.constant(*c),
        Affine::Index(i) if global && is_batch_rank(g.cascade(), i.rank) => {
            let (v, base) = (g.index(*i), g.base(i.rank));
            g.int(IntOp::Add, v, base)
        }
        Affine::Index(i) => g.index(*i),
        Affine::Extent(r) => g.extent(*r),
        Affine::Add(a, b) => both(g, IntOp::Add, a, b),
        Affine::Sub(a, b) => both(g, IntOp::Sub, a, b),
        Affine::Mul(a, b) => both(g, IntOp::Mul, a, b),
        Affine::Neg(a) => {
            let (zero, a) = (g.constant(0), affine(g, a, global));
            g.int(IntOp::Sub, zero, a)
        }
    }
}

/// The coordinates of an access to `tensor`. A bare index at a position of its own rank is local
/// to the call (the buffer is offset along a batch rank); any other subscript is evaluated at
/// global coordinates, a batch rank's index plus the call's base.
pub fn coordinates<'a, W: Walker<'a> + ?Sized>(g: &mut W, tensor: TensorId, subscripts: &[Affine]) -> Vec<W::Int> {
    let ranks = &g.cascade().tensor(tensor).ranks;
    subscripts
        .iter()
        .zip(ranks)
        .map(|(s, rank)| match s {
            Affine::Index(i) if i.rank == *rank => g.index(*i),
            _ => affine(g, s, true),
        })
        .collect()
}

/// Whether every split pair whose indices are both in `bound`, with one of `new` in it, is inside
/// its whole rank (all such pairs when `new` is empty): `tile * inner extent + inner < whole`.
/// `None` when no pair applies. `known(inner, tile)` leaves out a pair the caller's loop bound
/// already keeps inside.
pub fn valid_pairs<'a, W: Walker<'a> + ?Sized>(
    g: &mut W,
    bound: &[Index],
    new: &[Index],
    known: &dyn Fn(Index, RankId) -> bool,
) -> Option<W::Flag> {
    let mut ok: Option<W::Flag> = None;
    for (tile, inner, whole) in g.cascade().split_pairs() {
        for outer in bound.iter().filter(|i| i.rank == tile) {
            let partner = Index { rank: inner, primes: outer.primes };
            if !bound.contains(&partner) || known(partner, tile) {
                continue;
            }
            if !new.is_empty() && !new.contains(outer) && !new.contains(&partner) {
                continue;
            }
            let (t, m, size) = (g.index(*outer), g.index(partner), g.extent(inner));
            let at = g.int(IntOp::Mul, t, size);
            let at = g.int(IntOp::Add, at, m);
            let whole = g.extent(whole);
            let inside = g.less(at, whole);
            ok = Some(match ok {
                Some(so_far) => g.and(so_far, inside, None),
                None => inside,
            });
        }
    }
    ok
}

/// Both of two definednesses (`None`: always).
pub fn and_defined<'a, W: Walker<'a> + ?Sized>(
    g: &mut W,
    a: Option<W::Flag>,
    b: Option<W::Flag>,
    lanes: Option<Index>,
) -> Option<W::Flag> {
    match (a, b) {
        (None, x) | (x, None) => x,
        (Some(x), Some(y)) => Some(g.and(x, y, lanes)),
    }
}

/// Whether every comparison of `conds` holds, each where both its sides are defined; `None`
/// when there is none (always).
pub fn conjunction<'a, W: Walker<'a> + ?Sized>(g: &mut W, conds: &[Cond], lanes: Option<Index>) -> Option<W::Flag> {
    let mut ok: Option<W::Flag> = None;
    for cond in conds {
        let side = |g: &mut W, e: &Expr| match lanes {
            Some(v) => g.value_in_lanes(e, v),
            None => g.value(e),
        };
        let (a, da) = side(g, &cond.lhs);
        let (b, db) = side(g, &cond.rhs);
        let holds = g.compare(cond.op, a, b, lanes);
        let holds = and_defined(g, Some(holds), da, lanes);
        let holds = and_defined(g, holds, db, lanes);
        ok = and_defined(g, ok, holds, lanes);
    }
    ok
}

/// An Einsum's value at the current point, where its split pairs are valid, and whether it is
/// defined there: its filter holds and its value is defined.
pub fn point_value<'a, W: Walker<'a> + ?Sized>(g: &mut W, einsum: &Einsum) -> (W::Value, Option<W::Flag>) {
    let passes = conjunction(g, &einsum.filter, None);
    let (value, defined) = g.value(&einsum.body);
    (value, and_defined(g, passes, defined, None))
}
