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
//! The host's own staged tiles (`Staging::Tile`) serve the other operand of such a block: the keys
//! `K[h, e, m]` of einfuse's own layout, broadcast across the lanes and read along `e` a whole
//! rank `M` apart, are copied at each step of the streamed loop into `staged_K[h, e, m1, m0]`,
//! whose rows lie a tile apart. Every host tier stages them: with 128-bit vectors the copy cost
//! more than it saved until Cranelift's loop-invariant code motion worked (`prefill_hep` at P = M
//! = 2048: 297 ms without the tile and 307 ms with it in session 14; 8% faster with it since).
//!
//! The pass works on the cascade and the program is scheduled again, so that a panel is an
//! ordinary Einsum (printed in `einfuse emit --stage loops`, run by every back end) and every
//! later plan (full steps, batch ranks) sees it.
//!
//! Needs: a scheduled program. Guarantees: the cascade computes the same values (a panel or a
//! tile is an element-wise copy of an input, and only the reads named in the plan are redirected
//! to it, with their subscripts permuted or unfolded as its positions are); a tile is staged only
//! for a read of one step of the streamed loop whose other subscripts are plain indices; an input
//! is packed only where the contraction's target is contiguous along the lanes, the read names
//! the lane index bare (or as the inner index of a split pair) at one position, the read is
//! reused across an index it does not mention (so that the copy is a small part of the work), and
//! the kernel keeps every batch rank it had.

use crate::ir::*;
use crate::schedule::lanes::{blockable_reduction, one_point_after, reduction, strided_after, vectorizable, Reduction};
use crate::schedule::layout::{is_batch_rank, is_staged_tile, split_point};
use crate::schedule::{schedule, LoopProgram, Node, ScheduleError, Slot};

/// One copy of an input, read by the Einsums `readers` in place of `tensor`.
#[derive(Clone, Debug, PartialEq)]
pub struct Pack {
    pub tensor: TensorId,
    pub position: usize,
    pub readers: Vec<EinsumId>,
    pub staging: Staging,
}

/// When a copy is made and what it reorders.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Staging {
    /// Once per call, before the loops: `position` moved last (`packed_Q[h, e, p] = Q[h, p, e]`).
    Panel,
    /// At each step of the streamed loop: the step's tile of the split subscript at `position`,
    /// in a contiguous buffer with the positions' order kept (`staged_K[h, e, m1, m0] = K[h, e,
    /// m1 * M0 + m0]`). The register block reads the tile's rows a tile apart instead of a whole
    /// rank apart: where that rank is a large power of two, every row fell in one set of the
    /// first-level cache and the block re-read its rows from the second. `tile` and `inner` are
    /// the split pair the subscript steps through.
    Tile { tile: RankId, inner: RankId },
}

/// `program` with the copies `plan` finds, scheduled again; `program` itself when there are none.
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
            if !blockable_reduction(program, einsum) {
                continue;
            }
            let Some(v) = lane_index(c, einsum, *streamed) else { continue };
            let mut wanted = Vec::new();
            if !vectorizable(program, einsum, v) {
                let Some(k) = einsum.lhs.iter().position(|l| *l == Lhs::Index(v)) else { continue };
                if program.buffers[einsum.target.index()].slots[k] != Slot::Full
                    || !one_point_after(program, einsum.target, k)
                {
                    continue;
                }
                let Some(panels) = panels_for(program, einsum, v) else { continue };
                wanted.extend(panels.into_iter().map(|(t, q)| (t, q, Staging::Panel)));
            }
            wanted.extend(strided_tiles(c, einsum, v, *streamed));
            for (tensor, position, staging) in wanted {
                match packs.iter_mut().find(|p| p.tensor == tensor && p.position == position && p.staging == staging) {
                    Some(pack) => pack.readers.push(*id),
                    None => packs.push(Pack { tensor, position, readers: vec![*id], staging }),
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
    let Some(Reduction { indices, .. }) = reduction(&einsum.body) else { return None };
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

/// `cascade` with every staged tile (`layout::is_staged_tile`: an element-wise copy of one step
/// of an input, such as FuseMax's `BK[e, m1, m0] = K[e, m1 * M0 + m0]`) read in place: its readers
/// read the input at the copy's subscripts, and the copy and its tensor are gone. Every schedule
/// starts from it, so that how a person staged a cascade does not decide how it runs: the thread
/// kernels stage the tiles of inputs in shared memory themselves (`llvm::staging`; a copy would
/// cost each thread a tile), the host tiers stage what `plan` chooses for the tier. A copy that is
/// an output, whose tensor something else defines, or that some Einsum reads at a subscript other
/// than a bare index (where the copy's edge would differ from the input's next point) stays.
pub fn unstage(cascade: &Cascade) -> Cascade {
    let outputs: Vec<TensorId> = cascade.outputs.iter().map(|o| o.tensor).collect();
    let defines = |t: TensorId| cascade.einsums.iter().filter(|e| e.target == t).count();
    let read_plainly = |t: TensorId| {
        cascade
            .einsums
            .iter()
            .flat_map(|e| e.reads())
            .all(|(tensor, subscripts)| tensor != t || subscripts.iter().all(|s| s.as_index().is_some()))
    };
    let copies: Vec<&Einsum> = cascade
        .einsums
        .iter()
        .filter(|e| {
            is_staged_tile(cascade, e)
                && !outputs.contains(&e.target)
                && defines(e.target) == 1
                && cascade.tensor(e.target).kind == TensorKind::Defined { iterative: None }
                && read_plainly(e.target)
        })
        .collect();
    if copies.is_empty() {
        return cascade.clone();
    }
    let mut c = cascade.clone();
    for copy in &copies {
        let Expr::Access { tensor: source, subscripts: at } = &copy.body else { continue };
        let lhs: Vec<Index> = copy.lhs_indices().collect();
        let read_in_place = &mut |e: &mut Expr| {
            if let Expr::Access { tensor, subscripts } = e {
                if *tensor == copy.target {
                    let read = subscripts.clone();
                    let to = |i: Index| lhs.iter().position(|l| *l == i).map(|q| read[q].clone());
                    *subscripts = at.iter().map(|a| a.substitute(&to)).collect();
                    *tensor = *source;
                }
            }
        };
        for einsum in &mut c.einsums {
            einsum.walk_exprs_mut(read_in_place);
        }
    }
    // Drop the copies and their tensors; the other tensors keep their order.
    let gone: Vec<TensorId> = copies.iter().map(|e| e.target).collect();
    c.remove_tensors(&gone);
    c
}

/// The reads of `einsum` worth a staged tile (`Staging::Tile`): reads of an input shared by the
/// lanes along `v` (they do not mention it), whose one split subscript is the step of the
/// streamed loop `streamed`, whose rows along a reduced index lie an extent known only at the
/// call apart (`K[h, e, m1 * M0 + m0]` along `e`), and whose other subscripts are plain indices.
fn strided_tiles(c: &Cascade, einsum: &Einsum, v: Index, streamed: Index) -> Vec<(TensorId, usize, Staging)> {
    let Some(Reduction { indices, .. }) = reduction(&einsum.body) else { return vec![] };
    let mut wanted = Vec::new();
    einsum.body.walk(&mut |e| {
        let Expr::Access { tensor, subscripts } = e else { return };
        if !matches!(c.tensor(*tensor).kind, TensorKind::Input { .. }) {
            return;
        }
        let mut mentions_lanes = false;
        for sub in subscripts {
            sub.for_each_index(&mut |i| mentions_lanes |= i == v);
        }
        // A subscript `t * T0 + i` whose tile index is the streamed one, at a position of the
        // pair's whole rank: the split pair it steps through.
        let step = |q: usize| {
            let point = split_point(c, &subscripts[q])?;
            let mut tile = false;
            subscripts[q].for_each_index(&mut |i| tile |= i == streamed);
            let pair = c.split_pairs().into_iter().find(|(t, i, _)| *t == streamed.rank && *i == point.rank)?;
            (tile && pair.2 == c.tensor(*tensor).ranks[q]).then_some(Staging::Tile { tile: pair.0, inner: pair.1 })
        };
        let steps: Vec<(usize, Staging)> = (0..subscripts.len()).filter_map(|q| Some((q, step(q)?))).collect();
        let [(q, staging)] = steps.as_slice() else { return };
        let plain = subscripts.iter().enumerate().all(|(p, sub)| p == *q || sub.as_index().is_some());
        let strided = subscripts
            .iter()
            .enumerate()
            .any(|(p, sub)| sub.as_index().is_some_and(|i| indices.contains(&i)) && strided_after(c, *tensor, p));
        if !mentions_lanes && plain && strided && !wanted.contains(&(*tensor, *q, *staging)) {
            wanted.push((*tensor, *q, *staging));
        }
    });
    wanted
}

/// `cascade` with the copies of `packs`: a tensor and an element-wise Einsum each (before every
/// other Einsum), and the planned reads redirected to it.
pub fn apply(cascade: &Cascade, packs: &[Pack]) -> Cascade {
    let mut c = cascade.clone();
    let mut copies = Vec::new();
    for pack in packs {
        let source = cascade.tensor(pack.tensor);
        let q = pack.position;
        let plain = |r: RankId| Index { rank: r, primes: 0 };
        // How the copy's positions stand for the source's, and how a read is rewritten.
        // A read of the source rewritten to read the copy; `None` where it reads the source
        // still (a tile serves only the reads that step through its pair).
        type Reorder<'a> = Box<dyn Fn(&[Affine]) -> Option<Vec<Affine>> + 'a>;
        let (ranks, reorder): (Vec<RankId>, Reorder) = match pack.staging {
            Staging::Panel => {
                let order: Vec<usize> = (0..source.ranks.len()).filter(|p| *p != q).chain([q]).collect();
                let ranks = order.iter().map(|p| source.ranks[*p]).collect();
                (ranks, Box::new(move |subs: &[Affine]| Some(order.iter().map(|p| subs[*p].clone()).collect())))
            }
            Staging::Tile { tile, inner } => {
                let mut ranks = source.ranks.clone();
                ranks.splice(q..=q, [tile, inner]);
                let unfold = move |subs: &[Affine]| {
                    let point = split_point(cascade, &subs[q]).filter(|i| i.rank == inner)?;
                    let step = Index { rank: tile, primes: point.primes };
                    let mut stepping = false;
                    subs[q].for_each_index(&mut |i| stepping |= i == step);
                    let mut out = subs.to_vec();
                    out.splice(q..=q, [Affine::Index(step), Affine::Index(point)]);
                    stepping.then_some(out)
                };
                (ranks, Box::new(unfold))
            }
        };
        let prefix = match pack.staging {
            Staging::Panel => "packed",
            Staging::Tile { .. } => "staged",
        };
        let mut name = format!("{prefix}_{}", source.name);
        while c.tensor_by_name(&name).is_some() {
            name.push('_');
        }
        let id = TensorId::new(c.tensors.len());
        c.tensors.push(Tensor { name, ranks: ranks.clone(), kind: TensorKind::Defined { iterative: None } });
        // Redirect the planned reads (by the ids of `cascade`, before any Einsum is inserted).
        for reader in &pack.readers {
            let einsum = &mut c.einsums[reader.index()];
            let redirect = &mut |e: &mut Expr| {
                if let Expr::Access { tensor, subscripts } = e {
                    if *tensor == pack.tensor {
                        if let Some(moved) = reorder(subscripts) {
                            *tensor = id;
                            *subscripts = moved;
                        }
                    }
                }
            };
            einsum.walk_exprs_mut(redirect);
        }
        // The copy reads the source at plain indices, its split subscript as the tile's step and point.
        let mut subscripts: Vec<Affine> = source.ranks.iter().map(|r| Affine::Index(plain(*r))).collect();
        if matches!(pack.staging, Staging::Tile { .. }) {
            let (tile, inner) = (ranks[q], ranks[q + 1]);
            subscripts[q] = Affine::Add(
                Box::new(Affine::Mul(Box::new(Affine::Index(plain(tile))), Box::new(Affine::Extent(inner)))),
                Box::new(Affine::Index(plain(inner))),
            );
        }
        let lhs = match pack.staging {
            Staging::Panel => {
                let order = reorder(&subscripts).expect("a panel reorders every read");
                order.iter().map(|a| Lhs::Index(a.as_index().expect("plain"))).collect()
            }
            Staging::Tile { .. } => ranks.iter().map(|r| Lhs::Index(plain(*r))).collect(),
        };
        copies.push(Einsum { target: id, lhs, body: Expr::Access { tensor: pack.tensor, subscripts }, filter: vec![] });
    }
    // The copies first, in the order of `packs`: they read only inputs.
    c.einsums.splice(0..0, copies);
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
