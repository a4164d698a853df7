//! Where a buffer's points live and along which rank a kernel splits into independent calls:
//! facts about a schedule that every back end and the runner read, decided here once.

use crate::ir::*;
use crate::schedule::{HostTier, LoopProgram, Slot};

/// A rank along which the kernel splits into independent calls (see `is_batch_rank`): of the
/// candidates, the one with the largest extent, if above 1.
pub fn batch_rank(cascade: &Cascade, extents: &[u64]) -> Option<RankId> {
    let mut best: Option<RankId> = None;
    for r in 0..cascade.ranks.len() {
        let id = RankId::new(r);
        if is_batch_rank(cascade, id) && best.is_none_or(|b| extents[r] > extents[b.index()]) {
            best = Some(id);
        }
    }
    best.filter(|b| extents[b.index()] > 1)
}

/// Whether the kernel splits into independent calls along `id`: every Einsum binds its plain
/// index on the left, none reduces it or uses its extent, every output has it, and at a position
/// of its own rank it is read as the bare index. Elsewhere in a subscript it is a number, the
/// global coordinate (`K[e, c * MC + m]` reads the chunk `c` of keys: the split-key schedule).
/// A split tile rank qualifies only when its within-tile rank indexes nothing, so that no split
/// pair's validity depends on it.
pub fn is_batch_rank(cascade: &Cascade, id: RankId) -> bool {
    let rank = cascade.rank(id);
    if let Extent::Split { tile, .. } = rank.extent {
        if indexes_rank(cascade, tile) {
            return false;
        }
    }
    if cascade.split_pairs().iter().any(|(_, i, w)| *i == id || *w == id) {
        return false;
    }
    let plain = Index { rank: id, primes: 0 };
    let mut ok = cascade.outputs.iter().all(|o| cascade.tensor(o.tensor).ranks.contains(&id));
    for einsum in &cascade.einsums {
        if is_staged_tile(cascade, einsum) && !mentions_rank(cascade, einsum, id) {
            continue;
        }
        ok &= einsum.lhs.contains(&Lhs::Index(plain));
        ok &= einsum.lhs_indices().all(|i| i.rank != id || i == plain);
        einsum.body.walk(&mut |e| match e {
            Expr::Reduce { indices, .. } => ok &= indices.iter().all(|i| i.rank != id),
            Expr::Access { tensor, subscripts } => {
                for (position, sub) in subscripts.iter().enumerate() {
                    let mut mentions = false;
                    sub.for_each_index(&mut |i| mentions |= i.rank == id);
                    if cascade.tensor(*tensor).ranks[position] == id {
                        ok &= *sub == Affine::Index(plain);
                    } else if mentions {
                        sub.for_each_index(&mut |i| ok &= i.rank != id || i == plain);
                    }
                }
            }
            // An index used as a number is offset to its global coordinate by the call.
            Expr::Index(i) => ok &= i.rank != id || *i == plain,
            Expr::Extent(r) => ok &= *r != id,
            _ => {}
        });
        for cond in &einsum.filter {
            let mut uses_extent = false;
            cond.lhs.walk(&mut |e| uses_extent |= matches!(e, Expr::Extent(r) if *r == id));
            cond.rhs.walk(&mut |e| uses_extent |= matches!(e, Expr::Extent(r) if *r == id));
            ok &= !uses_extent;
        }
    }
    ok
}

/// Whether `einsum` stages one step of an input for a streamed loop (see `pack::Staging::Tile`):
/// an element-wise copy of an input, filtered by nothing but its split pairs' validity, whose
/// target holds a split pair's tile and inner ranks. A call on a chunk of a batch rank that the
/// copy does not mention computes it alike, as every call streams every step, so such a copy
/// does not keep a rank from batching.
pub fn is_staged_tile(cascade: &Cascade, einsum: &Einsum) -> bool {
    let Expr::Access { tensor, subscripts } = &einsum.body else { return false };
    let lhs: Vec<Index> = einsum.lhs_indices().collect();
    // The copy reads the pair's whole rank at `t * T0 + i`, with both indices on its left, so
    // that its points outside the whole rank are absent as the input's would be.
    let steps = subscripts.iter().zip(&cascade.tensor(*tensor).ranks).any(|(sub, rank)| {
        split_point(cascade, sub).is_some_and(|i| {
            cascade.split_pairs().iter().any(|(t, inner, whole)| {
                *inner == i.rank
                    && whole == rank
                    && lhs.contains(&i)
                    && lhs.contains(&Index { rank: *t, primes: i.primes })
            })
        })
    });
    matches!(cascade.tensor(*tensor).kind, TensorKind::Input { .. })
        && einsum.filter.iter().all(|c| cascade.is_split_validity(c))
        && einsum.lhs.iter().all(|l| matches!(l, Lhs::Index(_)))
        && steps
}

/// Whether `einsum` names an index of `rank` anywhere or its extent, or reads a tensor that has
/// the rank (at whatever subscript: a call on a chunk of the rank sees only its chunk of it).
fn mentions_rank(cascade: &Cascade, einsum: &Einsum, rank: RankId) -> bool {
    let mut found = einsum.lhs_indices().any(|i| i.rank == rank);
    einsum.body.walk(&mut |e| match e {
        Expr::Access { tensor, subscripts } => {
            found |= cascade.tensor(*tensor).ranks.contains(&rank);
            for sub in subscripts {
                sub.for_each_index(&mut |i| found |= i.rank == rank);
            }
        }
        Expr::Index(i) => found |= i.rank == rank,
        Expr::Extent(r) => found |= *r == rank,
        _ => {}
    });
    found
}

/// Whether some index of the cascade ranges over `rank`.
fn indexes_rank(cascade: &Cascade, rank: RankId) -> bool {
    let mut found = false;
    for einsum in &cascade.einsums {
        found |= einsum.lhs_indices().any(|i| i.rank == rank);
        let mut visit = |e: &Expr| match e {
            Expr::Index(i) => found |= i.rank == rank,
            Expr::Reduce { indices, .. } => found |= indices.iter().any(|i| i.rank == rank),
            Expr::Access { subscripts, .. } => {
                subscripts.iter().for_each(|s| s.for_each_index(&mut |i| found |= i.rank == rank))
            }
            _ => {}
        };
        einsum.body.walk(&mut visit);
        for cond in &einsum.filter {
            cond.lhs.walk(&mut visit);
            cond.rhs.walk(&mut visit);
        }
    }
    found
}

/// Whether a subscript can never leave its position: a bare index of the position's rank, or
/// a split pair `m1 * M0 + m0` into its whole rank (whose validity is checked before any read).
pub fn always_inside(cascade: &Cascade, subscript: &Affine, rank: RankId) -> bool {
    match subscript {
        Affine::Index(i) => i.rank == rank,
        Affine::Add(a, b) => match (&**a, &**b) {
            (Affine::Mul(t, e), Affine::Index(i)) => match (&**t, &**e) {
                (Affine::Index(t), Affine::Extent(e)) => cascade.split_pairs().iter().any(|(tile, inner, whole)| {
                    t.rank == *tile && i.rank == *inner && *e == *inner && *whole == rank && t.primes == i.primes
                }),
                _ => false,
            },
            _ => false,
        },
        _ => false,
    }
}

/// Whether the points of `einsum`'s target past the last valid point of the split pair whose
/// inner index is `v` are never read, so that a step need not write them: the target is a
/// temporary, neither an output nor an iterate, and every read of it anywhere names the pair's
/// tile and inner positions by bare indices of those ranks with the same primes, which the
/// reader binds and whose validity it checks before reading (`walk::valid_pairs`). A ragged last
/// tile then costs only its valid points, and a tile longer than the call's keys (decode's 4096)
/// costs nothing past them.
pub fn unread_past_valid(cascade: &Cascade, einsum: &Einsum, v: Index) -> bool {
    let Some((tile, _, _)) = cascade.split_pairs().into_iter().find(|(_, inner, _)| *inner == v.rank) else {
        return false;
    };
    let target = einsum.target;
    let temporary = matches!(cascade.tensor(target).kind, TensorKind::Defined { iterative: None })
        && !cascade.outputs.iter().any(|o| o.tensor == target);
    let ranks = &cascade.tensor(target).ranks;
    let once = |rank: RankId| ranks.iter().filter(|r| **r == rank).count() == 1;
    temporary
        && once(tile)
        && once(v.rank)
        && cascade.einsums.iter().all(|reader| {
            reader.reads().iter().filter(|(t, _)| *t == target).all(|(_, subscripts)| {
                let at = |rank: RankId| {
                    ranks.iter().position(|r| *r == rank).and_then(|p| match &subscripts[p] {
                        Affine::Index(i) if i.rank == rank => Some(i.primes),
                        _ => None,
                    })
                };
                matches!((at(tile), at(v.rank)), (Some(a), Some(b)) if a == b)
            })
        })
}

/// The extents a buffer stores: a position kept for the current step only holds one, a recurrence
/// kept as two slots holds two.
pub fn stored_shape(shape: &[u64], slots: &[Slot]) -> Vec<u64> {
    shape
        .iter()
        .zip(slots)
        .map(|(n, slot)| match slot {
            Slot::Full => *n,
            Slot::Current => (*n).min(1),
            Slot::Alternate => (*n).min(2),
        })
        .collect()
}

/// The extents of every rank of `cascade` from those of its first ranks: a schedule may add ranks
/// after the ones a caller binds (`stream` adds a tile and a tile count), each fixed or a split of
/// an earlier rank, so a caller passes the extents of the cascade it wrote.
pub fn derived_extents(cascade: &Cascade, given: &[u64]) -> Vec<u64> {
    let mut extents = given.to_vec();
    for rank in &cascade.ranks[given.len().min(cascade.ranks.len())..] {
        let n = match rank.extent {
            Extent::Fixed(n) => n,
            Extent::Split { whole, tile } => {
                let (w, t) = (extents[whole.index()], extents[tile.index()]);
                w.div_ceil(t.max(1))
            }
            // A symbolic rank is always the caller's to bind.
            Extent::Symbolic => 0,
        };
        extents.push(n);
    }
    extents
}

/// Where each buffer's dimensions and strides start in the tables a host kernel is called with:
/// one entry per position of each buffer's tensor, in buffer order.
pub fn table_offsets(program: &LoopProgram) -> Vec<usize> {
    let mut offsets = Vec::new();
    let mut at = 0;
    for buffer in &program.buffers {
        offsets.push(at);
        at += program.cascade.tensor(buffer.tensor).ranks.len();
    }
    offsets
}

/// Whether some Einsum reads `tensor` again and again: it iterates over a rank that the tensor
/// does not have, whole or as a part of a split (queries read once for every key). A call that
/// reads a box of such an input, strided in the caller's array, is given a dense copy of the box
/// (which stays in cache while it is read again); any other input is read in place.
pub fn read_repeatedly(cascade: &Cascade, tensor: TensorId) -> bool {
    let ranks = &cascade.tensor(tensor).ranks;
    let pairs = cascade.split_pairs();
    let whole = |r: RankId| pairs.iter().find(|(t, i, _)| *t == r || *i == r).map_or(r, |(_, _, w)| *w);
    cascade.einsums.iter().any(|einsum| {
        let mut indices: Vec<Index> = einsum.lhs_indices().collect();
        einsum.body.walk(&mut |e| {
            if let Expr::Reduce { indices: reduced, .. } = e {
                indices.extend(reduced.iter().copied());
            }
        });
        let reads = einsum.reads().iter().any(|(t, _)| *t == tensor);
        reads && indices.iter().any(|i| !ranks.contains(&whole(i.rank)) && !ranks.contains(&i.rank))
    })
}

/// The key tile of a host tier's streamed loops: 64 keys for vectors of 8 lanes or more, 128 for
/// Cranelift's 4, whose per-step work (rescaling the running output, storing and reading back a
/// step's partial sums) costs more beside its slower contractions. Measured with `einfuse bench
/// benches/pytorch.ein --bind P=2048 --bind M=2048 --target cpu --tile T`: 128 against 64 is 2-4%
/// faster for prefill in each layout, GQA, sinks and decode, and the same for the causal,
/// ALiBi, sigmoid and softplus kernels; `cpu-llvm` gains nothing from 128.
pub fn host_tile(tier: HostTier) -> u64 {
    if tier.lanes >= 8 {
        64
    } else {
        128
    }
}

/// The longer key tile a host kernel asks for, when the one it was scheduled with is too short
/// to stream: a streamed contraction reads an input whose tile of keys is its contiguous last
/// position, cut into runs of one tile per row of another rank (decode's `K[h, e, m]`: each step
/// reads 64 floats from each of 128 rows of `E`, one stream per row, more than the prefetchers
/// follow), and nothing in the call reads a tile twice (the contraction's other indices are batch
/// ranks or fixed at fewer than 8 points, such as decode's single query). Measured on
/// `examples/variants.ein` decode at M = 16384 (`einfuse bench --tile`, 9 runs): on `cpu` 13.7 ms
/// with tiles of 64, 11.8 with 256, 9.0 with 1024 (unfused 8.7); `gqa_decode` 30.4, 17.2, 13.8
/// (unfused 15.4). With 32 heads (session 15, fused against unfused, `cpu` / `cpu-llvm`): tiles
/// of 1024 0.83x / 0.77x, 4096 0.99x / 0.97x, 16384 1.01x / 1.02x; at M = 65536, 4096 0.97x /
/// 0.98x; at M = 2048, 1024 0.88x / 0.85x and 4096 (one partial tile) 0.93x / 0.95x; `gqa_decode`
/// 1.02-1.11x with either. Prefill in `[H, E, P]`, whose tiles are reused by 64 queries, gains
/// nothing and keeps 64.
pub fn longer_host_tile(program: &LoopProgram) -> Option<u64> {
    const LONGER: u64 = 4096;
    let c = &program.cascade;
    let pairs = c.split_pairs();
    let streamed_runs = |einsum: &Einsum| {
        if crate::schedule::lanes::reduction(&einsum.body).is_none() {
            return false;
        }
        einsum.reads().iter().any(|(t, subscripts)| {
            let tensor = c.tensor(*t);
            let last = subscripts.len().saturating_sub(1);
            let rows = tensor.ranks[..last]
                .iter()
                .any(|r| !is_batch_rank(c, *r) && !matches!(c.rank(*r).extent, Extent::Fixed(n) if n < 8));
            // The points of the Einsum that read the same element of the tile: its indices
            // outside the split pair that no subscript of the read names (the queries `m'` of a
            // self-attention read `K[e, m1 * M0 + m0]`, though `K` has their rank).
            let mut named = Vec::new();
            subscripts.iter().for_each(|s| s.for_each_index(&mut |i| named.push(i)));
            let readers = einsum
                .lhs_indices()
                .filter(|i| !pairs.iter().any(|(t, inner, _)| i.rank == *t || i.rank == *inner))
                .filter(|i| !named.contains(i))
                .map(|i| match c.rank(i.rank).extent {
                    Extent::Fixed(n) => n,
                    _ => u64::MAX,
                })
                .fold(1u64, |a, n| a.saturating_mul(n));
            matches!(tensor.kind, TensorKind::Input { .. })
                && subscripts.last().is_some_and(|s| split_point(c, s).is_some())
                && rows
                && readers < 8
        })
    };
    let wants = program.body.iter().any(|node| match node {
        crate::schedule::Node::Loop { body, .. } => body.iter().any(
            |n| matches!(n, crate::schedule::Node::Compute { einsum } if streamed_runs(&c.einsums[einsum.index()])),
        ),
        crate::schedule::Node::Compute { .. } => false,
    });
    wants.then_some(LONGER)
}

/// The inner index `v` of `sub` when it is `t * M0 + v`, a point of a tile of a split pair whose
/// tile rank is `t`'s and inner rank `v`'s, both with the same primes.
pub fn split_point(cascade: &Cascade, sub: &Affine) -> Option<Index> {
    let Affine::Add(a, b) = sub else { return None };
    let (Affine::Mul(t, e), Affine::Index(v)) = (&**a, &**b) else { return None };
    let (Affine::Index(t), Affine::Extent(e)) = (&**t, &**e) else { return None };
    let paired = cascade.split_pairs().iter().any(|(tile, inner, _)| t.rank == *tile && *inner == v.rank);
    (*e == v.rank && t.primes == v.primes && paired).then_some(*v)
}
