//! Packed panels: an input that a streamed contraction reads across its lanes is copied once,
//! before the kernel's loops, into a scratch panel in which the lanes are contiguous.
//!
//! On the host, a contraction inside a streamed loop runs in vector lanes along the innermost
//! free index of its target (`lanes::vectorizable`). Attention in PyTorch's layout reads its
//! queries as `Q[h, p, e]`, which is strided along the lane index `p`: the contraction then
//! falls back to one dot product per point, with a sum across lanes at the end of each. Fast
//! libraries do not depend on the caller's layout because they pack: here the panel
//! `packed_Q[h, e, p] = Q[h, p, e]` is written once per call, and every step of the stream reads
//! it in lanes, as register blocks (rows of keys by vectors of queries). The layer decides this
//! once for both CPU tiers; the thread kernels stage their tiles instead and are never packed.
//!
//! The pass works on the cascade and the program is scheduled again, so that a panel is an
//! ordinary Einsum (printed in `einfuse emit --stage loops`, run by every back end) and every
//! later plan (full steps, batch ranks) sees it.
//!
//! Needs: a scheduled program. Guarantees: the cascade computes the same values (a panel is an
//! element-wise copy of an input, and only the reads named in the plan are redirected to it,
//! with their subscripts permuted as its positions are); an input is packed only where the
//! contraction's target is contiguous along the lanes, the read names the lane index bare (or as
//! the inner index of a split pair) at one position, the read is reused across an index it does
//! not mention (so that the copy is a small part of the work), and the kernel keeps every batch
//! rank it had.

use crate::ir::*;
use crate::schedule::lanes::{blockable_reduction, one_point_after, vectorizable};
use crate::schedule::layout::{is_batch_rank, split_point};
use crate::schedule::{schedule, LoopProgram, Node, ScheduleError, Slot};

/// One panel: `tensor`'s position `position` moved last, read by the Einsums `readers`.
#[derive(Clone, Debug, PartialEq)]
pub struct Pack {
    pub tensor: TensorId,
    pub position: usize,
    pub readers: Vec<EinsumId>,
}

/// `program` with the panels `plan` finds, scheduled again; `program` itself when there are none.
pub fn pack(program: LoopProgram) -> Result<LoopProgram, ScheduleError> {
    let packs = plan(&program);
    if packs.is_empty() {
        return Ok(program);
    }
    let cascade = &program.cascade;
    let packed = apply(cascade, &packs);
    // The panels must not cost the kernel a batch rank (every Einsum binds one, and an input
    // without it would break that); should one, the program stands as it is.
    let batch = |c: &Cascade| (0..c.ranks.len()).filter(|r| is_batch_rank(c, RankId::new(*r))).collect::<Vec<_>>();
    if batch(&packed) != batch(cascade) {
        return Ok(program);
    }
    schedule(&packed)
}

/// The panels worth making for `program`'s streamed contractions.
pub fn plan(program: &LoopProgram) -> Vec<Pack> {
    let c = &program.cascade;
    let mut packs: Vec<Pack> = Vec::new();
    for node in &program.body {
        let Node::Loop { index: streamed, body, .. } = node else { continue };
        for inner in body {
            let Node::Compute { einsum: id } = inner else { continue };
            let einsum = &c.einsums[id.index()];
            if !blockable_reduction(einsum) {
                continue;
            }
            let Some(v) = lane_index(c, einsum, *streamed) else { continue };
            if vectorizable(program, einsum, v) {
                continue;
            }
            let Some(k) = einsum.lhs.iter().position(|l| *l == Lhs::Index(v)) else { continue };
            if program.buffers[einsum.target.index()].slots[k] != Slot::Full
                || !one_point_after(program, einsum.target, k)
            {
                continue;
            }
            let Some(wanted) = panels_for(program, einsum, v) else { continue };
            for (tensor, position) in wanted {
                match packs.iter_mut().find(|p| p.tensor == tensor && p.position == position) {
                    Some(pack) => pack.readers.push(*id),
                    None => packs.push(Pack { tensor, position, readers: vec![*id] }),
                }
            }
        }
    }
    packs
}

/// The index a host tier runs in lanes for `einsum` inside the loop over `streamed`: its last
/// free index whose extent is not fixed at 1 (an index of extent 1 at the end is bound first).
fn lane_index(c: &Cascade, einsum: &Einsum, streamed: Index) -> Option<Index> {
    einsum
        .lhs_indices()
        .filter(|i| *i != streamed)
        .filter(|i| !matches!(c.rank(i.rank).extent, Extent::Fixed(1)))
        .last()
}

/// The panels that would put every read of `einsum` that mentions `v` in lanes: each such read
/// of an input that is strided along `v` names `v` bare at one position (or as a split pair's
/// inner index), and is reused across some index of the Einsum it does not mention. `None` when
/// a read cannot be packed so (a scratch tensor, `v` in a compound subscript, no reuse).
fn panels_for(program: &LoopProgram, einsum: &Einsum, v: Index) -> Option<Vec<(TensorId, usize)>> {
    let c = &program.cascade;
    let Expr::Reduce { indices, .. } = &einsum.body else { return None };
    let all: Vec<Index> = einsum.lhs_indices().chain(indices.iter().copied()).collect();
    let mut wanted = Vec::new();
    let mut ok = true;
    let mut visit = |e: &Expr| {
        let Expr::Access { tensor, subscripts } = e else { return };
        let at: Vec<usize> = (0..subscripts.len())
            .filter(|q| {
                let mut mentions = false;
                subscripts[*q].for_each_index(&mut |i| mentions |= i == v);
                mentions
            })
            .collect();
        let [q] = at.as_slice() else {
            ok &= at.is_empty();
            return;
        };
        let contiguous =
            program.buffers[tensor.index()].slots[*q] == Slot::Full && one_point_after(program, *tensor, *q);
        if contiguous {
            return;
        }
        let input = matches!(c.tensor(*tensor).kind, TensorKind::Input { .. });
        let bare = subscripts[*q] == Affine::Index(v) || split_point(c, &subscripts[*q]) == Some(v);
        let mut mentioned = Vec::new();
        for sub in subscripts {
            sub.for_each_index(&mut |i| mentioned.push(i));
        }
        let reused =
            all.iter().any(|i| !mentioned.contains(i) && !matches!(c.rank(i.rank).extent, Extent::Fixed(n) if n < 8));
        if input && bare && reused {
            wanted.push((*tensor, *q));
        } else {
            ok = false;
        }
    };
    einsum.body.walk(&mut visit);
    for cond in &einsum.filter {
        cond.lhs.walk(&mut visit);
        cond.rhs.walk(&mut visit);
    }
    (ok && !wanted.is_empty()).then_some(wanted)
}

/// `cascade` with the panels of `packs`: a tensor and an element-wise Einsum each (before every
/// other Einsum), and the planned reads redirected to it.
pub fn apply(cascade: &Cascade, packs: &[Pack]) -> Cascade {
    let mut c = cascade.clone();
    let mut panels: Vec<(TensorId, &Pack, Vec<usize>)> = Vec::new();
    for pack in packs {
        let source = cascade.tensor(pack.tensor);
        let n = source.ranks.len();
        // The new order of positions: every other one as it was, then the lane position.
        let order: Vec<usize> = (0..n).filter(|q| *q != pack.position).chain([pack.position]).collect();
        let mut name = format!("packed_{}", source.name);
        while c.tensor_by_name(&name).is_some() {
            name.push('_');
        }
        let id = TensorId::new(c.tensors.len());
        c.tensors.push(Tensor {
            name,
            ranks: order.iter().map(|q| source.ranks[*q]).collect(),
            kind: TensorKind::Defined { iterative: None },
        });
        panels.push((id, pack, order));
    }
    // Redirect the planned reads (by the ids of `cascade`, before any Einsum is inserted).
    for (panel, pack, order) in &panels {
        for reader in &pack.readers {
            let einsum = &mut c.einsums[reader.index()];
            let redirect = &mut |e: &mut Expr| {
                if let Expr::Access { tensor, subscripts } = e {
                    if *tensor == pack.tensor {
                        *tensor = *panel;
                        *subscripts = order.iter().map(|q| subscripts[*q].clone()).collect();
                    }
                }
            };
            einsum.body.walk_mut(redirect);
            for cond in &mut einsum.filter {
                cond.lhs.walk_mut(redirect);
                cond.rhs.walk_mut(redirect);
            }
        }
    }
    // The copies first, in the order of `packs`: they read only inputs.
    let copies = panels.iter().map(|(panel, pack, order)| {
        let source = cascade.tensor(pack.tensor);
        let plain: Vec<Index> = source.ranks.iter().map(|r| Index { rank: *r, primes: 0 }).collect();
        Einsum {
            target: *panel,
            lhs: order.iter().map(|q| Lhs::Index(plain[*q])).collect(),
            body: Expr::Access { tensor: pack.tensor, subscripts: plain.iter().map(|i| Affine::Index(*i)).collect() },
            filter: vec![],
        }
    });
    c.einsums.splice(0..0, copies.collect::<Vec<_>>());
    c
}

/// The edge of the blocks in which a transposing copy is walked: rows of the source's
/// contiguous index taken together. Eight rows of a panel are eight cache lines written a float
/// at a time while eight consecutive floats of each source row are read, so that both sides stay
/// in the first-level cache even where power-of-two strides map every row to one set (measured
/// on a 2048 x 2048 transpose: 43 ms point by point, 11-12 ms in blocks of 4 to 16 rows).
pub const COPY_BLOCK: i64 = 8;

/// How a host tier walks a transposing copy: `rows`, the index contiguous in the source, in
/// blocks of `COPY_BLOCK`, outside `columns`, the index contiguous in the target, with the rows
/// of a block innermost. The other free indices stay outside both.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CopyOrder {
    pub rows: Index,
    pub columns: Index,
}

/// The blocked walk for `einsum` over its `free` indices, when it copies a tensor element by
/// element with its positions reordered (a packed panel, or a transpose the source writes) so
/// that the source's contiguous index is not the target's. `None` for any other Einsum: a
/// filter, a computed value, a compound subscript, or a copy whose order already matches.
pub fn copy_order(program: &LoopProgram, einsum: &Einsum, free: &[Index]) -> Option<CopyOrder> {
    let c = &program.cascade;
    let Expr::Access { tensor, subscripts } = &einsum.body else { return None };
    if !einsum.filter.is_empty() || einsum.lhs.iter().any(|l| !matches!(l, Lhs::Index(_))) {
        return None;
    }
    let contiguous =
        |t: TensorId, q: usize| program.buffers[t.index()].slots[q] == Slot::Full && one_point_after(program, t, q);
    let source = (0..subscripts.len()).rev().find(|q| contiguous(*tensor, *q))?;
    let rows = subscripts[source].as_index()?;
    let target = (0..einsum.lhs.len()).rev().find(|q| contiguous(einsum.target, *q))?;
    let Lhs::Index(columns) = einsum.lhs[target] else { return None };
    let wide = |i: Index| !matches!(c.rank(i.rank).extent, Extent::Fixed(n) if (n as i64) < COPY_BLOCK);
    let split = c.split_pairs().iter().any(|(t, i, _)| [*t, *i].iter().any(|r| *r == rows.rank || *r == columns.rank));
    let ok = rows != columns
        && free.contains(&rows)
        && free.contains(&columns)
        && wide(rows)
        && wide(columns)
        && !split
        && subscripts.iter().all(|s| s.as_index().is_some());
    ok.then_some(CopyOrder { rows, columns })
}
