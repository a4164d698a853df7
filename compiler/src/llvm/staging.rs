//! Staging: which input tiles the threads of a GPU block share through shared memory.
//!
//! In a thread kernel the threads of a block compute neighbouring points of the *lane rank*
//! (the last batch rank) at one point of the other batch ranks (see `launch`). A read of an
//! input inside a streamed loop whose subscripts do not mention the lane rank is then the same
//! for every thread of the block: in attention, the key and value tiles `K[h, e, m1 * M0 + m0]`
//! and `V[h, f, m1 * M0 + m0]`, which every query row of the block reads in full at each step.
//! Such a read is *staged*: at the start of each step the block copies the box of the input that
//! the step reads into shared memory, every thread taking every `ntid`-th element, and between
//! two barriers the threads read the copy instead of global memory.
//!
//! Needs: a scheduled program. Guarantees: `staged_reads` lists a read only when, with the
//! streamed index fixed, each subscript is its value at the step's first point plus a sum of
//! the other indices times non-negative constants, so that the points the step reads fill the
//! box `first + [0, extent)` per position, whose extents `box_extents` gives from the call's
//! extents alone.

use std::collections::BTreeMap;

use crate::ir::*;
use crate::schedule::layout::is_batch_rank;
use crate::schedule::{BufferRole, LoopProgram, Node};

/// One staged read: an input read at these subscripts by the Einsums of a top-level streamed
/// loop, one box per step.
#[derive(Clone, Debug, PartialEq)]
pub struct StagedRead {
    /// The streamed loop's index.
    pub step: Index,
    pub tensor: TensorId,
    pub subscripts: Vec<Affine>,
    /// Per position, the coefficient of every index that varies within a step (not the
    /// streamed index, not a batch rank's).
    pub terms: Vec<BTreeMap<Index, i64>>,
}

impl StagedRead {
    /// The box's extent per position at a call whose local extents (batch ranks as 1) are
    /// `extents`: one more than the largest offset from the step's first point.
    pub fn box_extents(&self, extents: &[u64]) -> Vec<u64> {
        self.terms
            .iter()
            .map(|terms| {
                terms.iter().fold(1u64, |n, (index, k)| {
                    let last = extents[index.rank.index()].saturating_sub(1);
                    n.saturating_add((*k as u64).saturating_mul(last))
                })
            })
            .collect()
    }
}

/// The staged reads of a thread kernel, in the order the loops first read them.
pub fn staged_reads(program: &LoopProgram) -> Vec<StagedRead> {
    let c = &program.cascade;
    let Some(lane) = super::launch::batch_ranks(c).last().copied() else { return vec![] };
    let mut staged: Vec<StagedRead> = Vec::new();
    for node in &program.body {
        let Node::Loop { index: step, body, .. } = node else { continue };
        for inner in body {
            let Node::Compute { einsum } = inner else { continue };
            c.einsums[einsum.index()].body.walk(&mut |e| {
                let Expr::Access { tensor, subscripts } = e else { return };
                if !matches!(program.buffers[tensor.index()].role, BufferRole::Input(_)) {
                    return;
                }
                if staged.iter().any(|s| s.step == *step && s.tensor == *tensor && s.subscripts == *subscripts) {
                    return;
                }
                let mut lane_free = true;
                for s in subscripts {
                    s.for_each_index(&mut |i| lane_free &= i.rank != lane);
                }
                let fixed = |i: Index| i == *step || is_batch_rank(c, i.rank);
                let terms: Option<Vec<_>> = subscripts.iter().map(|s| free_terms(c, s, &fixed)).collect();
                if let (true, Some(terms)) = (lane_free, terms) {
                    staged.push(StagedRead { step: *step, tensor: *tensor, subscripts: subscripts.clone(), terms });
                }
            });
        }
    }
    staged
}

/// A subscript split into what is fixed during a step and the rest.
struct Split {
    /// The coefficients of the indices other than the streamed one.
    terms: BTreeMap<Index, i64>,
    /// The value, when it is a number known before any call.
    constant: Option<i64>,
}

/// The coefficients of the indices of `subscript` that vary within a step (all but the `fixed`
/// ones: the streamed index and the batch ranks'), when it is linear in them with non-negative
/// constant coefficients (anything may multiply a fixed index).
fn free_terms(c: &Cascade, subscript: &Affine, fixed: &dyn Fn(Index) -> bool) -> Option<BTreeMap<Index, i64>> {
    let split = split(c, subscript, fixed)?;
    split.terms.values().all(|k| *k >= 0).then_some(split.terms.into_iter().filter(|(_, k)| *k != 0).collect())
}

fn split(c: &Cascade, a: &Affine, fixed: &dyn Fn(Index) -> bool) -> Option<Split> {
    let known = |constant| Some(Split { terms: BTreeMap::new(), constant });
    match a {
        Affine::Const(k) => known(Some(*k)),
        Affine::Extent(r) => match c.rank(*r).extent {
            Extent::Fixed(n) => known(i64::try_from(n).ok()),
            _ => known(None),
        },
        Affine::Index(i) if fixed(*i) => known(None),
        Affine::Index(i) => Some(Split { terms: [(*i, 1)].into(), constant: None }),
        Affine::Add(x, y) | Affine::Sub(x, y) => {
            let (x, y) = (split(c, x, fixed)?, split(c, y, fixed)?);
            let sign = if matches!(a, Affine::Sub(..)) { -1 } else { 1 };
            let mut terms = x.terms;
            for (i, k) in y.terms {
                *terms.entry(i).or_default() += sign * k;
            }
            let constant = match (x.constant, y.constant) {
                (Some(p), Some(q)) => p.checked_add(sign * q),
                _ => None,
            };
            Some(Split { terms, constant })
        }
        Affine::Neg(x) => {
            let x = split(c, x, fixed)?;
            Some(Split {
                terms: x.terms.into_iter().map(|(i, k)| (i, -k)).collect(),
                constant: x.constant.and_then(|k| k.checked_neg()),
            })
        }
        Affine::Mul(x, y) => {
            let (x, y) = (split(c, x, fixed)?, split(c, y, fixed)?);
            let constant = match (x.constant, y.constant) {
                (Some(p), Some(q)) => p.checked_mul(q),
                _ => None,
            };
            let terms = match (x.terms.is_empty(), y.terms.is_empty()) {
                (true, true) => BTreeMap::new(),
                (false, true) => scaled(x.terms, y.constant?)?,
                (true, false) => scaled(y.terms, x.constant?)?,
                (false, false) => return None,
            };
            Some(Split { terms, constant })
        }
    }
}

fn scaled(terms: BTreeMap<Index, i64>, k: i64) -> Option<BTreeMap<Index, i64>> {
    terms.into_iter().map(|(i, v)| Some((i, v.checked_mul(k)?))).collect()
}
