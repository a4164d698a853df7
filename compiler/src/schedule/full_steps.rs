//! Full steps: a streamed step whose filters admit every point of the step runs without them.
//!
//! Under a causal mask most key tiles lie wholly below the diagonal: every score is admitted,
//! yet the step still evaluates the filter per point, stores a mask and carries it through the
//! exponentials and sums (a masked step costs about a fifth more than an unmasked one). When
//! every filter of a streamed loop's Einsums is a comparison of integer affine expressions in
//! the indices (`m1 * M0 + m0 <= p`), the smallest margin over the step's box of points is an
//! affine function of the loop index, the call's bases and the extents, found from the signs of
//! the coefficients. At each step the kernel computes it and, where every filter holds
//! everywhere, runs a *variant* of the step compiled from the cascade with those filters removed
//! (and the masks that only they made dropped); elsewhere the step as before. Where the filter
//! of the Einsum whose emptiness makes a step skippable (see `skip`) holds nowhere, the step is
//! skipped before anything is computed.
//!
//! Needs: a scheduled program. Guarantees: `plan` returns a variant only when it schedules to
//! the same loops and buffers, with masks dropped only from buffers kept for the current step of
//! the loop, so that the variant's step leaves every buffer read after the step as the original
//! step would where the test passes.

use std::collections::BTreeMap;

use crate::ir::*;
use crate::schedule::{schedule, LoopProgram, Node, Slot};

/// `constant + sum(coefficient * index) + sum(coefficient * extent)`, in integers.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Linear {
    pub constant: i64,
    pub indices: BTreeMap<Index, i64>,
    pub extents: BTreeMap<RankId, i64>,
}

impl Linear {
    fn scaled(mut self, k: i64) -> Option<Linear> {
        self.constant = self.constant.checked_mul(k)?;
        for v in self.indices.values_mut().chain(self.extents.values_mut()) {
            *v = v.checked_mul(k)?;
        }
        Some(self)
    }

    fn plus(mut self, other: Linear) -> Option<Linear> {
        self.constant = self.constant.checked_add(other.constant)?;
        for (i, k) in other.indices {
            *self.indices.entry(i).or_default() += k;
        }
        for (r, k) in other.extents {
            *self.extents.entry(r).or_default() += k;
        }
        Some(self)
    }

    fn as_constant(&self) -> Option<i64> {
        (self.indices.values().all(|k| *k == 0) && self.extents.values().all(|k| *k == 0)).then_some(self.constant)
    }
}

fn integer(v: f64) -> Option<i64> {
    (v.fract() == 0.0 && v.abs() < (1u64 << 40) as f64).then_some(v as i64)
}

fn linear(c: &Cascade, e: &Expr) -> Option<Linear> {
    match e {
        Expr::Const(v) => Some(Linear { constant: integer(*v)?, ..Linear::default() }),
        Expr::Param(p) => Some(Linear { constant: integer(c.param(*p).value)?, ..Linear::default() }),
        Expr::Extent(r) => match c.rank(*r).extent {
            Extent::Fixed(n) => Some(Linear { constant: i64::try_from(n).ok()?, ..Linear::default() }),
            _ => Some(Linear { extents: [(*r, 1)].into(), ..Linear::default() }),
        },
        Expr::Index(i) => Some(Linear { indices: [(*i, 1)].into(), ..Linear::default() }),
        Expr::Unary(UnaryOp::Neg, a) => linear(c, a)?.scaled(-1),
        Expr::Binary(BinaryOp::Add, a, b) => linear(c, a)?.plus(linear(c, b)?),
        Expr::Binary(BinaryOp::Sub, a, b) => linear(c, a)?.plus(linear(c, b)?.scaled(-1)?),
        Expr::Binary(BinaryOp::Mul, a, b) => {
            let (a, b) = (linear(c, a)?, linear(c, b)?);
            match (a.as_constant(), b.as_constant()) {
                (Some(k), _) => b.scaled(k),
                (_, Some(k)) => a.scaled(k),
                _ => None,
            }
        }
        _ => None,
    }
}

/// The masks a tier generates `variant`'s code with: those of the buffers still masked there
/// (a buffer without a mask in the variant is treated as wholly defined).
pub fn variant_masks<T: Clone>(masks: &[Option<T>], variant: &LoopProgram) -> Vec<Option<T>> {
    masks.iter().zip(&variant.buffers).map(|(mask, buffer)| mask.clone().filter(|_| buffer.masked)).collect()
}

/// A margin that must be at least `least` at every point of an Einsum for its filter to hold.
#[derive(Clone, Debug, PartialEq)]
pub struct Margin {
    pub margin: Linear,
    pub least: i64,
    /// The Einsum's indices, whose ranges make the box.
    pub indices: Vec<Index>,
    /// The tensor the Einsum writes.
    pub tensor: TensorId,
}

/// Where an index's coordinate is taken in a margin's extreme over a step's box.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum At {
    /// The loop index: its current value.
    Current,
    /// The first point of the range.
    First,
    /// The last point of the range (its extent less one).
    Last,
}

/// One term of a margin's extreme: a coefficient times a rank's extent, or times an index's
/// global coordinate (the call's base plus the local coordinate `at`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MarginTerm {
    Extent { rank: RankId, k: i64 },
    Coordinate { index: Index, at: At, k: i64 },
}

impl Margin {
    /// The terms (besides the constant) of the smallest margin over the current step of the loop
    /// over `index`, or with `largest` the largest: each index at the end of its range that makes
    /// its term smallest (largest). `None` when the margin mentions an index the Einsum does
    /// not bind.
    pub fn extreme_terms(&self, index: Index, largest: bool) -> Option<Vec<MarginTerm>> {
        let mut terms: Vec<MarginTerm> =
            self.margin.extents.iter().map(|(rank, k)| MarginTerm::Extent { rank: *rank, k: *k }).collect();
        for (i, k) in self.margin.indices.iter().filter(|(_, k)| **k != 0) {
            let at = if *i == index {
                At::Current
            } else if !self.indices.contains(i) {
                return None;
            } else if (*k > 0) == largest {
                At::Last
            } else {
                At::First
            };
            terms.push(MarginTerm::Coordinate { index: *i, at, k: *k });
        }
        Some(terms)
    }
}

/// The margins of an Einsum's filter, one per comparison; `None` where a comparison is not of
/// integer affine expressions (or is `==` or `!=`).
pub fn margins_of(c: &Cascade, e: &Einsum) -> Option<Vec<Margin>> {
    let mut margins = Vec::new();
    for cond in &e.filter {
        let (lhs, rhs) = (linear(c, &cond.lhs)?, linear(c, &cond.rhs)?);
        // `rhs - lhs >= least` for `lhs <= rhs` and the like.
        let difference = |a: Linear, b: Linear| a.plus(b.scaled(-1)?);
        let (margin, least) = match cond.op {
            CmpOp::Le => (difference(rhs, lhs), 0),
            CmpOp::Lt => (difference(rhs, lhs), 1),
            CmpOp::Ge => (difference(lhs, rhs), 0),
            CmpOp::Gt => (difference(lhs, rhs), 1),
            CmpOp::Eq | CmpOp::Ne => (None, 0),
        };
        margins.push(Margin { margin: margin?, least, indices: e.lhs_indices().collect(), tensor: e.target });
    }
    Some(margins)
}

/// The variant of a program whose streamed steps may run without filters, and the margins each
/// loop (by its index) must meet.
pub struct FullSteps {
    pub variant: LoopProgram,
    pub margins: Vec<(Index, Vec<Margin>)>,
}

/// The full-step variant of `program`, if its streamed loops have filters to drop.
pub fn plan(program: &LoopProgram) -> Option<FullSteps> {
    let c = &program.cascade;
    let mut variant = c.clone();
    let mut margins = Vec::new();
    for node in &program.body {
        let Node::Loop { index, body, .. } = node else { continue };
        let mut loop_margins = Vec::new();
        let mut usable = true;
        for inner in body {
            let Node::Compute { einsum } = inner else {
                usable = false;
                continue;
            };
            let e = &c.einsums[einsum.index()];
            let mut reduce_filtered = false;
            e.body.walk(&mut |x| reduce_filtered |= matches!(x, Expr::Reduce { filter, .. } if !filter.is_empty()));
            usable &= !reduce_filtered;
            match margins_of(c, e) {
                Some(found) => loop_margins.extend(found),
                None => usable = false,
            }
        }
        if usable && !loop_margins.is_empty() {
            for inner in body {
                if let Node::Compute { einsum } = inner {
                    variant.einsums[einsum.index()].filter.clear();
                }
            }
            margins.push((*index, loop_margins));
        }
    }
    if margins.is_empty() {
        return None;
    }
    let variant = schedule(&variant).ok()?;
    // The same loops, and the same masks on every buffer that outlives a step.
    let same_shape = |a: &[Node], b: &[Node]| {
        a.len() == b.len()
            && a.iter().zip(b).all(|(x, y)| match (x, y) {
                (Node::Compute { einsum: e1 }, Node::Compute { einsum: e2 }) => e1 == e2,
                (Node::Loop { index: i1, body: b1, .. }, Node::Loop { index: i2, body: b2, .. }) => i1 == i2
                    && b1.len() == b2.len()
                    && b1.iter().zip(b2).all(
                        |(p, q)| matches!((p, q), (Node::Compute { einsum: x }, Node::Compute { einsum: y }) if x == y),
                    ),
                _ => false,
            })
    };
    if !same_shape(&program.body, &variant.body) {
        return None;
    }
    for (a, b) in program.buffers.iter().zip(&variant.buffers) {
        if a.slots != b.slots || a.role != b.role || (a.masked != b.masked && !a.slots.contains(&Slot::Current)) {
            return None;
        }
        if b.masked && !a.masked {
            return None;
        }
    }
    Some(FullSteps { variant, margins })
}
