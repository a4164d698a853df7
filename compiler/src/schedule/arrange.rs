//! Scratch layouts: the order in which each scratch buffer of a host schedule stores its
//! positions is the layer's choice, not the order in which the source happened to declare its
//! ranks or write an intermediate tensor's indices. Scratch tensors are internal, so they may take
//! any order; the one they take decides which index runs in lanes (an Einsum's last left-hand
//! index, `lanes::vectorizable`), which in a register block's rows (the next one out) and which
//! inputs are packed (`pack`). The same attention declared `rank P, M, F = 64, E = 64, H = 8`
//! put the heads last in every scratch buffer: lanes along eight heads and no packed panels,
//! thirty times slower than declared `rank H, E = 64, F = 64, M, P`.
//!
//! One order for every scratch tensor, by the role of each rank:
//! - first the ranks of an output other than the lane rank (heads, a group, the values' feature
//!   rank), those more inputs have further out, else in the order they had;
//! - then the ranks of no output and those a recurrence iterates along (the keys, their tiles and
//!   tile counts), a tile count outside the others, else in the order they had;
//! - then the lane rank (`lane_rank`);
//! - last, ranks of one point, which change no address.
//!
//! Needs: a checked cascade. Guarantees: the same cascade with each scratch tensor's positions,
//! the left-hand sides that define it and the subscripts that read it permuted alike (an
//! iterative position follows its rank), so that every value is what it was. Inputs and outputs
//! keep the caller's layout; a copy of an input (a panel, a staged tile, a transpose the source
//! writes) keeps the order it was written in. The thread kernels keep the cascade's order (their
//! scratch is per thread and interleaved) but take their blocks' rank from `lane_rank`.

use crate::ir::*;

/// `cascade` with its scratch tensors' positions in the layer's order (see the module).
pub fn arrange(cascade: &Cascade) -> Cascade {
    let lane = lane_rank(cascade);
    let mut c = cascade.clone();
    let orders: Vec<Option<Vec<usize>>> = (0..cascade.tensors.len())
        .map(|t| {
            let id = TensorId::new(t);
            let ranks = &cascade.tensor(id).ranks;
            let mut order: Vec<usize> = (0..ranks.len()).collect();
            order.sort_by_key(|p| role(cascade, ranks[*p], lane));
            (arranged(cascade, id) && order.iter().enumerate().any(|(k, p)| k != *p)).then_some(order)
        })
        .collect();
    for (t, order) in orders.iter().enumerate() {
        let Some(order) = order else { continue };
        let tensor = &mut c.tensors[t];
        tensor.ranks = order.iter().map(|p| tensor.ranks[*p]).collect();
        if let TensorKind::Defined { iterative: Some(p) } = &mut tensor.kind {
            *p = order.iter().position(|q| q == p).expect("a position");
        }
    }
    for einsum in &mut c.einsums {
        if let Some(order) = &orders[einsum.target.index()] {
            einsum.lhs = order.iter().map(|p| einsum.lhs[*p]).collect();
        }
        einsum.walk_exprs_mut(&mut |e| {
            if let Expr::Access { tensor, subscripts } = e {
                if let Some(order) = &orders[tensor.index()] {
                    *subscripts = order.iter().map(|p| subscripts[*p].clone()).collect();
                }
            }
        });
    }
    c
}

/// Where a position of rank `rank` goes in a scratch tensor: the smaller, the further out. The
/// ranks of an output go out the further, the more inputs have them (the heads, which every
/// input has, outside the values' feature rank), so that the next rank out of the lanes is one
/// along which a register block's rows share a vector.
fn role(cascade: &Cascade, rank: RankId, lane: Option<RankId>) -> (u8, std::cmp::Reverse<usize>) {
    let inputs = cascade
        .tensors
        .iter()
        .filter(|t| matches!(t.kind, TensorKind::Input { .. }) && t.ranks.contains(&rank))
        .count();
    if matches!(cascade.rank(rank).extent, Extent::Fixed(1)) {
        (3, std::cmp::Reverse(0))
    } else if Some(rank) == lane {
        (2, std::cmp::Reverse(0))
    } else if in_an_output(cascade, rank) && !iterated(cascade, rank) {
        (0, std::cmp::Reverse(inputs))
    } else {
        // A rank a recurrence iterates along (a tile count) outside the others (its tile).
        (1, std::cmp::Reverse(iterated(cascade, rank) as usize))
    }
}

/// Whether the layer chooses `tensor`'s layout: a tensor the kernel defines, not an output, and
/// not a copy of an input.
fn arranged(cascade: &Cascade, tensor: TensorId) -> bool {
    let copy = cascade.definitions(tensor).all(|(_, e)| {
        matches!(&e.body, Expr::Access { tensor: read, .. } if matches!(cascade.tensor(*read).kind, TensorKind::Input { .. }))
    });
    matches!(cascade.tensor(tensor).kind, TensorKind::Defined { .. })
        && !cascade.outputs.iter().any(|o| o.tensor == tensor)
        && !copy
}

fn in_an_output(cascade: &Cascade, rank: RankId) -> bool {
    cascade.outputs.iter().any(|o| cascade.tensor(o.tensor).ranks.contains(&rank))
}

/// Whether a recurrence iterates along `rank`.
fn iterated(cascade: &Cascade, rank: RankId) -> bool {
    cascade.tensors.iter().any(|t| matches!(t.kind, TensorKind::Defined { iterative: Some(p) } if t.ranks[p] == rank))
}

/// The rank that runs in lanes in every scratch tensor that has it, if any qualifies: of the
/// output's ranks that nothing reduces, no recurrence iterates along and no split pair holds,
/// first one that some input lacks (the lanes then share that input's elements: the keys and
/// values, for the queries; the heads, which every input has, share nothing), then the one most
/// scratch tensors have, then the longest (symbolic counts as longest, and ranks of fewer than
/// `SHORT` points as one point), then the one innermost in the inputs that have it, then the
/// first declared. Decode's single query wins as prefill's queries do, and its one point leaves
/// the rest in the order the other roles give.
pub fn lane_rank(cascade: &Cascade) -> Option<RankId> {
    let inputs: Vec<&Tensor> = cascade.tensors.iter().filter(|t| matches!(t.kind, TensorKind::Input { .. })).collect();
    let scratch: Vec<&Tensor> = (0..cascade.tensors.len())
        .filter(|t| arranged(cascade, TensorId::new(*t)))
        .map(|t| &cascade.tensors[t])
        .collect();
    let pairs = cascade.split_pairs();
    let mut reduced = vec![false; cascade.ranks.len()];
    for einsum in &cascade.einsums {
        einsum.body.walk(&mut |e| {
            if let Expr::Reduce { indices, .. } = e {
                indices.iter().for_each(|i| reduced[i.rank.index()] = true);
            }
        });
    }
    let candidates = (0..cascade.ranks.len()).map(RankId::new).filter(|r| {
        in_an_output(cascade, *r)
            && !reduced[r.index()]
            && !iterated(cascade, *r)
            && !pairs.iter().any(|(t, i, w)| r == t || r == i || r == w)
    });
    candidates.max_by_key(|r| {
        let shares = inputs.iter().any(|t| !t.ranks.contains(r));
        let scratch = scratch.iter().filter(|t| t.ranks.contains(r)).count();
        let length = match cascade.rank(*r).extent {
            Extent::Fixed(n) if n < SHORT => 0,
            Extent::Fixed(_) => 1,
            _ => 2,
        };
        // How many positions follow the rank's in the input that holds it innermost.
        let depth =
            inputs.iter().filter_map(|t| t.ranks.iter().rposition(|q| q == r).map(|p| t.ranks.len() - 1 - p)).min();
        // Keys are unique (the rank's index is one of them): the first declared wins a tie.
        (shares, scratch, length, std::cmp::Reverse(depth.unwrap_or(0)), std::cmp::Reverse(r.index()))
    })
}

/// A rank of fewer fixed points than this fills less than the widest vector (16 lanes): as a lane
/// rank it counts no more than a rank of one point.
const SHORT: u64 = 16;
