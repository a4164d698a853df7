//! Which exponentials never see a positive argument: softmax's `exp(S - M)` where `M` is a
//! maximum that `S` takes part in, however the cascade names them.
//!
//! `M` bounds `S` from above when it is `S` itself at the same point, a `max` with such an
//! operand, a maximum over indices whose body is `S` at some point of those indices (with no
//! filter inside the reduction but a split pair's validity), or an element of a tensor whose one definition is such a bound
//! (the running maximum `RM[m1 + 1, p] = max(RM[m1, p], LM[m1, p])` of a tile maximum
//! `LM[m1, p] = max[m0](BQK[m1, m0, p])`). Floats keep the order exactly here: a maximum is one of
//! its operands, and `a - b <= 0` whenever `a <= b`. Where either side is undefined (a masked
//! score, a filtered row) the exponential is undefined too, so only points where both are
//! defined matter; NaN stays NaN either way.
//!
//! Needs: a verified cascade. Guarantees: `exp_range` says `NonPositive` only for an argument that
//! is at most 0 (or NaN) wherever it is defined; the emitters then use `math::exp_nonpositive`,
//! the same bits as `exp` there in fewer instructions.

use crate::ir::*;
use crate::math::Range;

/// How deep the definitions of a bound are followed.
const DEPTH: usize = 6;

/// The arguments `exp(arg)` can see: `NonPositive` where `arg` is `a - b` with `b` bounding `a`
/// from above, or `-|x|`.
pub fn exp_range(cascade: &Cascade, arg: &Expr) -> Range {
    let outer = Frame { pairs: cascade.split_pairs(), ..Frame::default() };
    let nonpositive = match arg {
        Expr::Binary(BinaryOp::Sub, a, b) => at_least(cascade, b, &outer, a, DEPTH),
        Expr::Unary(UnaryOp::Neg, x) => matches!(**x, Expr::Unary(UnaryOp::Abs, _)),
        _ => false,
    };
    if nonpositive {
        Range::NonPositive
    } else {
        Range::Any
    }
}

/// Where an expression of a definition's body stands in the argument's terms: its left-hand
/// indices as the subscripts they were read at, and the indices of enclosing maxima, free to be
/// any index of their rank (bound as the comparison goes).
#[derive(Clone, Default)]
struct Frame {
    mapped: Vec<(Index, Affine)>,
    free: Vec<Index>,
    bound: Vec<(Index, Index)>,
    /// The split pairs: a reduction over a pair's inner index covers only the points valid
    /// with its tile index.
    pairs: Vec<(RankId, RankId, RankId)>,
}

impl Frame {
    /// Whether the free index `i` may stand for the argument's index `j` (the same rank): the
    /// reduction over `i` reaches every point `j` takes. For the inner index of a split pair it
    /// reaches only those valid with the frame's tile index, so that index must be `j`'s own
    /// tile index (`LM[m1, p] = max[m0](...)` read at `LM[m1, p]` bounds a score at `m1, m0`,
    /// not one at another tile or one not in a pair at all).
    fn may_stand_for(&self, i: Index, j: Index) -> bool {
        if i.rank != j.rank {
            return false;
        }
        match self.pairs.iter().find(|(t, inner, _)| *inner == i.rank || *t == i.rank) {
            None => true,
            Some((tile, inner, _)) if *inner == i.rank => {
                let own = Index { rank: *tile, primes: i.primes };
                let theirs = Affine::Index(Index { rank: *tile, primes: j.primes });
                self.mapped.iter().any(|(m, sub)| *m == own && *sub == theirs)
                    || (self.mapped.is_empty() && !self.free.contains(&own) && i.primes == j.primes)
            }
            // A tile index reduced freely: its inner index's range depends on it.
            Some(_) => false,
        }
    }

    /// Whether subscript `b` (in this frame) is subscript `a` (in the argument's), binding free
    /// indices on the way.
    fn same_affine(&mut self, b: &Affine, a: &Affine) -> bool {
        match (b, a) {
            (Affine::Index(i), _) if self.free.contains(i) => {
                let Affine::Index(j) = a else { return false };
                match self.bound.iter().find(|(f, _)| f == i) {
                    Some((_, k)) => k == j,
                    None if self.may_stand_for(*i, *j) => {
                        self.bound.push((*i, *j));
                        true
                    }
                    None => false,
                }
            }
            (Affine::Index(i), _) => match self.mapped.iter().find(|(m, _)| m == i) {
                Some((_, sub)) => sub == a,
                None => self.mapped.is_empty() && b == a,
            },
            (Affine::Const(x), Affine::Const(y)) => x == y,
            (Affine::Extent(x), Affine::Extent(y)) => x == y,
            (Affine::Add(b1, b2), Affine::Add(a1, a2))
            | (Affine::Sub(b1, b2), Affine::Sub(a1, a2))
            | (Affine::Mul(b1, b2), Affine::Mul(a1, a2)) => self.same_affine(b1, a1) && self.same_affine(b2, a2),
            (Affine::Neg(b), Affine::Neg(a)) => self.same_affine(b, a),
            _ => false,
        }
    }

    /// Whether expression `b` (in this frame) is expression `a` (in the argument's) at every
    /// point: the same operations on the same elements.
    fn same(&mut self, b: &Expr, a: &Expr) -> bool {
        match (b, a) {
            (Expr::Const(x), Expr::Const(y)) => x.to_bits() == y.to_bits(),
            (Expr::Param(x), Expr::Param(y)) => x == y,
            (Expr::Extent(x), Expr::Extent(y)) => x == y,
            (Expr::Index(i), Expr::Index(j)) => self.same_affine(&Affine::Index(*i), &Affine::Index(*j)),
            (Expr::Access { tensor: t, subscripts: s }, Expr::Access { tensor: u, subscripts: r }) => {
                t == u && s.len() == r.len() && s.iter().zip(r).all(|(s, r)| self.same_affine(s, r))
            }
            (Expr::Unary(p, x), Expr::Unary(q, y)) => p == q && self.same(x, y),
            (Expr::Binary(p, x1, x2), Expr::Binary(q, y1, y2)) => p == q && self.same(x1, y1) && self.same(x2, y2),
            _ => false,
        }
    }
}

/// Whether `b` (in `frame`) is at least `a` wherever both are defined.
fn at_least(cascade: &Cascade, b: &Expr, frame: &Frame, a: &Expr, depth: usize) -> bool {
    if depth == 0 {
        return false;
    }
    let mut same = frame.clone();
    if same.same(b, a) {
        return true;
    }
    match b {
        Expr::Binary(BinaryOp::Max, x, y) => {
            at_least(cascade, x, frame, a, depth) || at_least(cascade, y, frame, a, depth)
        }
        // A filter that says only that a split pair is valid leaves out no point that exists.
        Expr::Reduce { op: ReduceOp::Max, indices, filter, body }
            if filter.iter().all(|c| cascade.is_split_validity(c)) =>
        {
            let mut inner = frame.clone();
            inner.free.extend(indices.iter().copied());
            at_least(cascade, body, &inner, a, depth - 1)
        }
        Expr::Access { tensor, subscripts } => {
            let mut definitions = cascade.definitions(*tensor).filter(|(_, e)| !e.is_initial());
            let (Some((_, definition)), None) = (definitions.next(), definitions.next()) else {
                return false;
            };
            // The subscripts in the argument's terms, then the definition's left-hand indices
            // as them (`RM[m1 + 1, p]` read at `m1 + 1` is the recurrence at `m1`).
            let mut at = Vec::new();
            for sub in subscripts {
                match in_terms_of(frame, sub) {
                    Some(sub) => at.push(sub),
                    None => return false,
                }
            }
            let mut mapped = Vec::new();
            for (lhs, sub) in definition.lhs.iter().zip(at) {
                match (lhs, sub) {
                    (Lhs::Index(i), sub) => mapped.push((*i, sub)),
                    // `R[j + 1]` for an index `j` (never -1) is the recurrence at `j`.
                    (Lhs::Next(i), Affine::Add(x, one))
                        if *one == Affine::Const(1) && matches!(*x, Affine::Index(_)) =>
                    {
                        mapped.push((*i, *x))
                    }
                    _ => return false,
                }
            }
            let inner = Frame { mapped, pairs: frame.pairs.clone(), ..Frame::default() };
            at_least(cascade, &definition.body, &inner, a, depth - 1)
        }
        _ => false,
    }
}

/// Subscript `sub` of `frame` in the argument's terms; `None` where it names a free index.
fn in_terms_of(frame: &Frame, sub: &Affine) -> Option<Affine> {
    let mut free = false;
    sub.for_each_index(&mut |i| free |= frame.free.contains(&i));
    if free {
        return None;
    }
    if frame.mapped.is_empty() {
        return Some(sub.clone());
    }
    let mut unmapped = false;
    sub.for_each_index(&mut |i| unmapped |= !frame.mapped.iter().any(|(m, _)| *m == i));
    if unmapped {
        return None;
    }
    Some(sub.substitute(&|i| frame.mapped.iter().find(|(m, _)| *m == i).map(|(_, s)| s.clone())))
}
