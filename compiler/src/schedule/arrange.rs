//! Scratch layouts: the order in which each scratch buffer of a host schedule stores its
//! positions is the layer's choice, not the order in which the source happened to declare its
//! ranks or write an intermediate tensor's indices. Scratch tensors are internal, so they may take
//! any order; the one they take decides which index runs in lanes (an Einsum's last left-hand
//! index, `lanes::vectorizable`), which in a register block's rows (the next one out) and which
//! inputs are packed (`pack`). The same attention declared `rank P, M, F = 64, E = 64, H = 8`
//! put the heads last in every scratch buffer: lanes along eight heads and no packed panels,
//! thirty times slower than declared `rank H, E = 64, F = 64, M, P`.
//!
//! One order for every scratch tensor that has the lane rank, by the role of each position's
//! rank:
//! - first the ranks of an output other than the lane rank: tile counts (a split-key chunk),
//!   then those more inputs have (the heads, which every input has, outside the values' feature
//!   rank), then those more scratch tensors have (a group of query heads outside the values'
//!   feature rank), else in the order they had;
//! - then a recurrence's position and the ranks a recurrence iterates along (an output's too),
//!   and the ranks of no output (the keys' tiles and tile counts, the reduced ranks):
//!   recurrences and tile counts outside the others, else in the order they had;
//! - then the lane rank (`lane_rank`), where one qualifies;
//! - last, ranks of one point, which change no address (never a recurrence's position, which
//!   holds two).
//!
//! Where no rank qualifies for the lanes (a row softmax of `X[P, M]`, whose rows are read along
//! their keys; a layer norm; a scan), every scratch tensor keeps the order it was written in, as
//! before this pass; so does a scratch tensor without the lane rank, unless its innermost rank
//! is shorter than the vector (decode's four queries, written last, wasting twelve of sixteen
//! lanes), and ranks of the same role keep the order they had. So the pass takes away the declaration order's say over the lanes
//! where one rank clearly belongs there (attention's queries), not every choice the source makes.
//!
//! Needs: a checked cascade. Guarantees: the same cascade with each scratch tensor's positions,
//! the left-hand sides that define it and the subscripts that read it permuted alike (an
//! iterative position follows its rank), so that every value is what it was. Inputs and outputs
//! keep the caller's layout; a copy of an input (a panel, a staged tile, a transpose the source
//! writes) keeps the order it was written in. The thread kernels keep the cascade's order (their
//! scratch is per thread and interleaved) but take their blocks' rank from `lane_rank`.

use crate::ir::*;

/// `cascade` with its scratch tensors' positions in the layer's order (see the module), for a
/// tier whose vectors hold `lanes` floats.
pub fn arrange(cascade: &Cascade, lanes: usize) -> Cascade {
    let lane = lane_rank(cascade, lanes);
    let roles = roles(cascade, lane);
    let mut c = cascade.clone();
    let orders: Vec<Option<Vec<usize>>> = (0..cascade.tensors.len())
        .map(|t| {
            let id = TensorId::new(t);
            let tensor = cascade.tensor(id);
            let iterative = match tensor.kind {
                TensorKind::Defined { iterative } => iterative,
                TensorKind::Input { .. } => None,
            };
            let role = |p: usize| if Some(p) == iterative { Role::Recurrence } else { roles[tensor.ranks[p].index()] };
            let mut order: Vec<usize> = (0..tensor.ranks.len()).collect();
            order.sort_by_key(|p| role(*p));
            let moved = order.iter().enumerate().any(|(k, p)| k != *p);
            let wasteful = || {
                let innermost = tensor.ranks.iter().rev().find(|r| !matches!(roles[r.index()], Role::OnePoint));
                innermost.is_some_and(|r| matches!(cascade.rank(*r).extent, Extent::Fixed(n) if n < lanes as u64))
            };
            let chosen = lane.is_some_and(|l| tensor.ranks.contains(&l)) || wasteful();
            (arranged(cascade, id) && chosen && moved).then_some(order)
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

/// Where a position goes in a scratch tensor, outermost first (see the module).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Role {
    /// A rank of an output: tile counts first, then those more inputs have, then those more
    /// scratch tensors have.
    TileCountOfAnOutput,
    Output(std::cmp::Reverse<usize>, std::cmp::Reverse<usize>),
    /// A recurrence's position, or a rank a recurrence iterates along, or a tile count.
    Recurrence,
    /// A rank of no output.
    Inner,
    Lane,
    OnePoint,
}

/// Each rank's role, by rank.
fn roles(cascade: &Cascade, lane: Option<RankId>) -> Vec<Role> {
    let pairs = cascade.split_pairs();
    (0..cascade.ranks.len())
        .map(RankId::new)
        .map(|r| {
            let tile_count = pairs.iter().any(|(t, _, _)| *t == r);
            let inputs =
                cascade.tensors.iter().filter(|t| matches!(t.kind, TensorKind::Input { .. }) && t.ranks.contains(&r));
            if matches!(cascade.rank(r).extent, Extent::Fixed(1)) {
                Role::OnePoint
            } else if Some(r) == lane {
                Role::Lane
            } else if iterated(cascade, r) {
                Role::Recurrence
            } else if in_an_output(cascade, r) && tile_count {
                Role::TileCountOfAnOutput
            } else if in_an_output(cascade, r) {
                let scratch = (0..cascade.tensors.len())
                    .filter(|t| arranged(cascade, TensorId::new(*t)) && cascade.tensors[*t].ranks.contains(&r))
                    .count();
                Role::Output(std::cmp::Reverse(inputs.count()), std::cmp::Reverse(scratch))
            } else if tile_count {
                Role::Recurrence
            } else {
                Role::Inner
            }
        })
        .collect()
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

/// The rank that runs in lanes in every scratch tensor that has it, on a tier of `lanes` floats
/// per vector (1 for the thread kernels), if one qualifies: of the output's ranks that nothing
/// reduces, no recurrence iterates along and no split pair holds, that has one point or at least
/// `lanes` (a query rank of four points in sixteen lanes wastes twelve: the keys take the lanes
/// then), and that every input read naming it reads in lanes (`read_in_lanes`); first one that
/// some input lacks (the lanes then share that input's elements: the keys and values, for the
/// queries; the heads, which every input has, share nothing), then the one most scratch tensors
/// have, then the longest by class (symbolic, then `SHORT` points or more, then shorter: ranks of
/// one class alike), then the one innermost in the inputs that have it, then the first declared. Decode's single query wins as prefill's queries
/// do, and its one point leaves the rest in the order the other roles give.
pub fn lane_rank(cascade: &Cascade, lanes: usize) -> Option<RankId> {
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
    let length = |r: RankId| match cascade.rank(r).extent {
        Extent::Fixed(n) => n,
        _ => u64::MAX,
    };
    // Ranks shorter than the widest vector count alike: a group of four query heads does not
    // take decode's single query's place.
    let class = |r: RankId| match length(r) {
        n if n < SHORT => 0,
        u64::MAX => 2,
        _ => 1,
    };
    let candidates = (0..cascade.ranks.len()).map(RankId::new).filter(|r| {
        in_an_output(cascade, *r)
            && !reduced[r.index()]
            && !iterated(cascade, *r)
            && !pairs.iter().any(|(t, i, w)| r == t || r == i || r == w)
            && (length(*r) == 1 || length(*r) >= lanes as u64)
            && read_in_lanes(cascade, *r)
    });
    candidates.max_by_key(|r| {
        let shares = inputs.iter().any(|t| !t.ranks.contains(r));
        let scratch = scratch.iter().filter(|t| t.ranks.contains(r)).count();
        // How many positions follow the rank's in the input that holds it innermost.
        let depth =
            inputs.iter().filter_map(|t| t.ranks.iter().rposition(|q| q == r).map(|p| t.ranks.len() - 1 - p)).min();
        // Keys are unique (the rank's index is one of them): the first declared wins a tie.
        (shares, scratch, class(*r), std::cmp::Reverse(depth.unwrap_or(0)), std::cmp::Reverse(r.index()))
    })
}

/// A fixed rank of fewer points than this (the widest host vector's lanes) is short: as a lane
/// rank it counts no more than one of a single point.
const SHORT: u64 = 16;

/// Whether every read of an input that names `rank` reads along it in lanes: at its last
/// position, as the bare index, or inside a contraction (a sum, or its statement filter) whose
/// Einsum also runs over a rank a streamed loop may run over (symbolic, or split from a symbolic
/// rank or one of `SHORT` points or more),
/// where the read is reused across some index of the Einsum it does not name, so that `pack`
/// copies it once into a panel read again and again (the queries `Q[h, p, e]` of prefill's scores,
/// across the keys; a padding mask, across the reduced index). A strided read elsewhere (a row
/// softmax's `X[p, m]`, a product over fixed ranks only, a merge of split-key partial results
/// that names every index of its Einsum) would take one element per lane.
fn read_in_lanes(cascade: &Cascade, rank: RankId) -> bool {
    let pairs = cascade.split_pairs();
    // A rank a streamed loop may run over: a symbolic one, or a part of a split of a symbolic
    // rank or one of `SHORT` points or more.
    let long = |i: &Index| {
        let pair = pairs.iter().find(|(t, n, _)| i.rank == *t || i.rank == *n);
        i.rank != rank
            && match (pair, cascade.rank(i.rank).extent) {
                (Some((_, _, whole)), _) => match cascade.rank(*whole).extent {
                    Extent::Fixed(n) => n >= SHORT,
                    _ => true,
                },
                (None, Extent::Symbolic) => true,
                (None, _) => false,
            }
    };
    cascade.einsums.iter().all(|einsum| {
        let streams = einsum.lhs_indices().any(|i| long(&i));
        let mut indices: Vec<Index> = einsum.lhs_indices().filter(|i| i.rank != rank).collect();
        einsum.body.walk(&mut |e| {
            if let Expr::Reduce { indices: reduced, .. } = e {
                indices.extend(reduced.iter().copied());
            }
        });
        let mut ok = true;
        let mut visit = |e: &Expr, inside: bool| {
            let Expr::Access { tensor, subscripts } = e else { return };
            if !matches!(cascade.tensor(*tensor).kind, TensorKind::Input { .. }) {
                return;
            }
            let names = |s: &Affine| {
                let mut found = false;
                s.for_each_index(&mut |i| found |= i.rank == rank);
                found
            };
            // Reused across an index of the Einsum it does not name, as `pack` requires of a panel.
            let mut named = Vec::new();
            subscripts.iter().for_each(|s| s.for_each_index(&mut |i| named.push(i)));
            let packed = inside && indices.iter().any(|i| !named.contains(i));
            let last = subscripts.len().saturating_sub(1);
            let contiguous = subscripts.iter().enumerate().all(|(k, s)| {
                if k == last {
                    !names(s) || matches!(s, Affine::Index(i) if i.rank == rank)
                } else {
                    !names(s)
                }
            });
            ok &= contiguous || packed || !subscripts.iter().any(names);
        };
        reads_with_context(&einsum.body, streams, false, &mut visit);
        // `pack` copies what the filter of such a contraction reads too (a padding mask).
        let contraction = matches!(&einsum.body, Expr::Reduce { op: ReduceOp::Sum, .. });
        for cond in &einsum.filter {
            reads_with_context(&cond.lhs, false, streams && contraction, &mut visit);
            reads_with_context(&cond.rhs, false, streams && contraction, &mut visit);
        }
        ok
    })
}

/// Visits every access of `expr` with whether it lies inside a sum over a long rank of an
/// Einsum that `streams` (see `read_in_lanes`).
fn reads_with_context(expr: &Expr, streams: bool, inside: bool, visit: &mut impl FnMut(&Expr, bool)) {
    match expr {
        Expr::Access { .. } => visit(expr, inside),
        Expr::Unary(_, a) => reads_with_context(a, streams, inside, visit),
        Expr::Binary(_, a, b) => {
            reads_with_context(a, streams, inside, visit);
            reads_with_context(b, streams, inside, visit);
        }
        Expr::Reduce { op, filter, body, .. } => {
            reads_with_context(body, streams, inside || (streams && *op == ReduceOp::Sum), visit);
            for cond in filter {
                reads_with_context(&cond.lhs, streams, false, visit);
                reads_with_context(&cond.rhs, streams, false, visit);
            }
        }
        Expr::Const(_) | Expr::Param(_) | Expr::Extent(_) | Expr::Index(_) => {}
    }
}
