//! Lanes and register blocks on the host: which index of an Einsum runs in vector lanes, which
//! reductions run as register blocks and which inputs they stream. Both CPU tiers (Cranelift's
//! `cpu::vector`, LLVM's `llvm::lower`) ask these questions and get one answer, here.
//!
//! Needs: a scheduled program. Guarantees: an index said to run in lanes is contiguous in the
//! target and in every read that mentions it (a position kept for the current step counts as
//! extent 1, since it stores one point), so that a vector of points is a vector of addresses.

use crate::ir::*;
use crate::schedule::layout::split_point;
use crate::schedule::HostTier;
use crate::schedule::{BufferRole, LoopProgram, Slot};

/// A reduction as a register block computes it: `op` over `indices` of `body` where `filter`
/// holds; then, where the Einsum's value is more than the reduction, `epilogue`: that value, in
/// which the reduction stands for its result. Two cascades make one (see `accumulate`): a
/// running output's update folded into the contraction that feeds it
/// (`sum[m0](...) + RNV[f, m1, p] * PRM[m1, p]`), and a score's modification folded into the
/// scores' contraction (`cap * tanh(sum[e](...) / cap) + Slope[h] * (m - p)`). The epilogue is
/// evaluated after the reduction, on its result, as the interpreter and the scalar paths do.
#[derive(Clone, Copy, Debug)]
pub struct Reduction<'e> {
    pub op: ReduceOp,
    pub indices: &'e [Index],
    pub filter: &'e [Cond],
    pub body: &'e Expr,
    pub epilogue: Option<&'e Expr>,
}

/// The reduction of an Einsum's value (see `Reduction`): a value with exactly one reduction,
/// reached through element-wise operations only.
pub fn reduction(value: &Expr) -> Option<Reduction<'_>> {
    let reduce = the_reduction(value)?;
    let Expr::Reduce { op, indices, filter, body } = reduce else { return None };
    let epilogue = (!std::ptr::eq(reduce, value)).then_some(value);
    Some(Reduction { op: *op, indices, filter, body, epilogue })
}

/// Finds the one reduction of `value` outside any other, if `value` has exactly one.
fn the_reduction(value: &Expr) -> Option<&Expr> {
    match value {
        Expr::Reduce { .. } => Some(value),
        Expr::Unary(_, a) => the_reduction(a),
        Expr::Binary(_, a, b) => match (a.holds_reduction(), b.holds_reduction()) {
            (true, false) => the_reduction(a),
            (false, true) => the_reduction(b),
            _ => None,
        },
        Expr::Const(_) | Expr::Param(_) | Expr::Extent(_) | Expr::Index(_) | Expr::Access { .. } => None,
    }
}

/// Whether neither `value` nor any comparison of `filter` holds a reduction.
pub fn without_reductions(value: &Expr, filter: &[Cond]) -> bool {
    !value.holds_reduction() && filter.iter().all(|c| !c.lhs.holds_reduction() && !c.rhs.holds_reduction())
}

/// Whether the value of `einsum` is a reduction with none inside (see `reduction`), its
/// left-hand side indices (a recurrence's next step among them) and any statement filter free of
/// reductions: the shape a register block computes. Under a statement filter, an epilogue reads
/// only points that always exist, so that a block's points are defined where the filter holds.
pub fn blockable_reduction(program: &LoopProgram, einsum: &Einsum) -> bool {
    let Some(r) = reduction(&einsum.body) else { return false };
    einsum.lhs.iter().all(|l| matches!(l, Lhs::Index(_) | Lhs::Next(_)))
        && einsum.filter.iter().all(|c| !c.lhs.holds_reduction() && !c.rhs.holds_reduction())
        && without_reductions(r.body, r.filter)
        && r.epilogue.is_none_or(|value| einsum.filter.is_empty() || defined_everywhere(program, value))
}

/// Whether every read of `value` outside its reductions is of a buffer without a mask, at its
/// own ranks' indices: a point that always exists.
pub fn defined_everywhere(program: &LoopProgram, value: &Expr) -> bool {
    match value {
        Expr::Reduce { .. } | Expr::Const(_) | Expr::Param(_) | Expr::Extent(_) | Expr::Index(_) => true,
        Expr::Unary(_, a) => defined_everywhere(program, a),
        Expr::Binary(_, a, b) => defined_everywhere(program, a) && defined_everywhere(program, b),
        Expr::Access { tensor, subscripts } => {
            let ranks = &program.cascade.tensor(*tensor).ranks;
            !program.buffers[tensor.index()].masked
                && subscripts.iter().zip(ranks).all(|(s, r)| matches!(s, Affine::Index(i) if i.rank == *r))
        }
    }
}

/// Whether `einsum`, vectorizable along `v`, runs as register blocks of rows along `u`, the next
/// index out: its body is one reduction over indices other than `u` and `v`, with no reduction
/// inside and its left-hand side plain indices; a statement filter must hold no reduction. `u`
/// must be in no split pair, or be the inner index of one (its block then stops at the last
/// valid row).
pub fn blockable_rows(program: &LoopProgram, einsum: &Einsum, u: Index, v: Index) -> bool {
    let Some(Reduction { indices, body, .. }) = reduction(&einsum.body) else { return false };
    let pairs = program.cascade.split_pairs();
    let pair_ok = pairs.iter().all(|(t, _, w)| u.rank != *t && u.rank != *w);
    // Rows pay when they share a vector: some read in lanes that does not mention `u`.
    blockable_reduction(program, einsum)
        && pair_ok
        && shares_a_read(body, v, u)
        && !indices.contains(&u)
        && einsum.lhs.contains(&Lhs::Index(u))
}

/// Whether some read in `body` mentions `lanes` but not `rows`: one vector shared by the rows.
fn shares_a_read(body: &Expr, lanes: Index, rows: Index) -> bool {
    let mut shared = false;
    body.walk(&mut |e| {
        if let Expr::Access { subscripts, .. } = e {
            let (mut in_lanes, mut in_rows) = (false, false);
            for sub in subscripts {
                sub.for_each_index(&mut |i| {
                    in_lanes |= i == lanes;
                    in_rows |= i == rows;
                });
            }
            shared |= in_lanes && !in_rows;
        }
    });
    shared
}

/// Whether `einsum`, not vectorizable along its last free index `u`, runs as blocks of rows of
/// `u` with its one reduced index `r` in lanes (see `Gen::compute_lane_rows`): no statement
/// filter, every read of `r` contiguous, and one of them shared by the rows: decode's value
/// contraction `sum[m0] SLN[m0] * V[f, m0]` along `f` in `[H, F, M]`, or its scores
/// `sum[e] Q[e] * K[m, e]` along the keys in PyTorch's `[H, M, E]`.
pub fn lane_rows(program: &LoopProgram, einsum: &Einsum, u: Index) -> bool {
    let Some(Reduction { indices, filter, body, .. }) = reduction(&einsum.body) else { return false };
    let [r] = indices else { return false };
    let pairs = program.cascade.split_pairs();
    blockable_reduction(program, einsum)
        && einsum.filter.is_empty()
        && shares_a_read(body, *r, u)
        && !pairs.iter().any(|(t, _, w)| u.rank == *t || u.rank == *w)
        && reducible_in_lanes(program, body, filter, *r)
}

/// Whether a register block along `u` and `v` would stream an input badly: the reduction
/// reads an input in lanes along `v` whose position of a reduced index comes before a
/// position of extent known only at the call, so that each step of the reduction jumps across
/// it (as decode's `K[h, e, m]` does along `e`), and no read in lanes is shared by the rows
/// along `u`. One vector per row would then visit each cache line once per vector, long after
/// the hardware prefetched it; vectors side by side along `v` read whole lines at each step.
/// Both CPU tiers ask this.
pub fn streams_input(program: &LoopProgram, einsum: &Einsum, u: Option<Index>, v: Index) -> bool {
    let Some(Reduction { indices, body, .. }) = reduction(&einsum.body) else { return false };
    let c = &program.cascade;
    let (mut strided, mut shared) = (false, false);
    body.walk(&mut |e| {
        let Expr::Access { tensor, subscripts } = e else { return };
        let (mut lanes, mut rows) = (false, false);
        for sub in subscripts {
            sub.for_each_index(&mut |i| {
                lanes |= i == v;
                rows |= Some(i) == u;
            });
        }
        if !lanes {
            return;
        }
        shared |= u.is_some() && !rows;
        if !matches!(program.buffers[tensor.index()].role, BufferRole::Input(_)) {
            return;
        }
        for (p, sub) in subscripts.iter().enumerate() {
            let mut reduced = false;
            sub.for_each_index(&mut |i| reduced |= indices.contains(&i));
            strided |= reduced && strided_after(c, *tensor, p);
        }
    });
    strided && !shared
}

/// Whether a position of `tensor` after `position` has an extent known only at the call, so that
/// consecutive points along `position` lie that far apart in the caller's array.
pub fn strided_after(c: &Cascade, tensor: TensorId, position: usize) -> bool {
    c.tensor(tensor).ranks[position + 1..].iter().any(|r| !matches!(c.rank(*r).extent, Extent::Fixed(_)))
}

/// Whether `einsum` can compute a vector of points along `v` at once: `v` is at a position of
/// the target followed only by positions that store one point (see `one_point_after`), so the
/// results are contiguous, and every read either does not mention `v` (one value, splatted) or
/// has it, followed only by such positions, as a bare index or as the inner index of a split pair (`t * M0 + v`), whose vectors
/// then cover only valid points (see `Gen::valid_rows`).
pub fn vectorizable(program: &LoopProgram, einsum: &Einsum, v: Index) -> bool {
    let Some(k) = einsum.lhs.iter().position(|l| *l == Lhs::Index(v)) else { return false };
    let once = einsum.lhs.iter().filter(|l| l.index() == Some(v)).count() == 1;
    once && program.buffers[einsum.target.index()].slots[k] == Slot::Full
        && one_point_after(program, einsum.target, k)
        && reads_in_lanes(
            program,
            std::iter::once(&einsum.body).chain(einsum.filter.iter().flat_map(|c| [&c.lhs, &c.rhs])),
            v,
        )
}

/// Whether every position of `tensor`'s buffer after `position` stores one point: a rank of
/// fixed extent 1 (but a recurrence's position along it, which holds its initial value and one
/// step), or a position kept for the current step only. Consecutive points along `position` then
/// sit at consecutive addresses.
pub fn one_point_after(program: &LoopProgram, tensor: TensorId, position: usize) -> bool {
    let t = program.cascade.tensor(tensor);
    let slots = &program.buffers[tensor.index()].slots;
    let recurrence = |q: usize| matches!(t.kind, TensorKind::Defined { iterative: Some(p) } if p == q);
    (position + 1..t.ranks.len()).all(|q| {
        slots[q] == Slot::Current
            || (matches!(program.cascade.rank(t.ranks[q]).extent, Extent::Fixed(1)) && !recurrence(q))
    })
}

/// Whether every read in `exprs` that mentions `v` has it, followed only by ranks of extent 1, as
/// a bare index at a position of its own rank or as the inner index of a split pair (`t * M0 +
/// v`) at a position of the pair's whole rank, so that four points from `v` are contiguous; `v`
/// is not the tile or the whole rank of a split pair.
pub fn reads_in_lanes<'e>(program: &LoopProgram, exprs: impl Iterator<Item = &'e Expr>, v: Index) -> bool {
    let c = &program.cascade;
    let pairs = c.split_pairs();
    if pairs.iter().any(|(t, _, w)| v.rank == *t || v.rank == *w) {
        return false;
    }
    let mut ok = true;
    for expr in exprs {
        expr.walk(&mut |e| {
            if let Expr::Access { tensor, subscripts } = e {
                for (p, sub) in subscripts.iter().enumerate() {
                    let mut mentions = false;
                    sub.for_each_index(&mut |i| mentions |= i == v);
                    if mentions {
                        let rank = c.tensor(*tensor).ranks[p];
                        let bare = *sub == Affine::Index(v) && rank == v.rank;
                        let whole = pairs.iter().any(|(_, inner, w)| *inner == v.rank && *w == rank);
                        ok &= (bare || (split_point(c, sub) == Some(v) && whole))
                            && program.buffers[tensor.index()].slots[p] == Slot::Full
                            && one_point_after(program, *tensor, p);
                    }
                }
            }
        });
    }
    ok
}

/// Whether a reduction can run its innermost reduced index `r` in lanes (partial results per
/// lane, combined at the end): every read of `r` in its body and filter is contiguous (see
/// `reads_in_lanes`), and nothing inside is another reduction.
pub fn reducible_in_lanes(program: &LoopProgram, body: &Expr, filter: &[Cond], r: Index) -> bool {
    without_reductions(body, filter)
        && reads_in_lanes(program, std::iter::once(body).chain(filter.iter().flat_map(|c| [&c.lhs, &c.rhs])), r)
}

/// Splits a sum's body into the factors that depend on the loop and the finite constants that
/// do not (`Q * K * scale` into `Q * K` and `scale`), when there is at least one of each.
pub fn invariant_factors(cascade: &Cascade, op: ReduceOp, body: &Expr) -> Option<(Expr, f32)> {
    if op != ReduceOp::Sum {
        return None;
    }
    let mut factors = Vec::new();
    body.operands(BinaryOp::Mul, &mut factors);
    let mut constant = 1.0f64;
    let mut varying: Vec<&Expr> = Vec::new();
    for factor in factors {
        match factor {
            Expr::Const(c) => constant *= c,
            Expr::Param(p) => constant *= cascade.param(*p).value,
            other => varying.push(other),
        }
    }
    let constant = constant as f32;
    if varying.is_empty() || constant == 1.0 || !constant.is_finite() {
        return None;
    }
    let mut rest = varying.into_iter().cloned();
    let first = rest.next().expect("one varying factor");
    Some((rest.fold(first, |a, b| Expr::Binary(BinaryOp::Mul, Box::new(a), Box::new(b))), constant))
}

/// A register block's shape: `rows` along one index (a broadcast each) by `columns` vectors side
/// by side along the lanes' index, one accumulator per cell.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RegisterShape {
    pub rows: usize,
    pub columns: usize,
}

/// The register block of a host tier's contractions: four rows by as many vectors as fit beside
/// them. Sixteen registers (x86-64's SSE and AVX2, Cranelift's tier) hold 4 x 2: eight
/// accumulators, two vectors and four broadcasts; measured on prefill (P = M = 1024, AVX2) at
/// 53-59 GFLOP/s against 44 for 4 x 1, 36-43 for 6 x 2, 4 x 3 and 3 x 3 (which spill), and 46-53
/// for 2 x 4 and 8 x 1. Thirty-two (AVX-512) hold 4 x 4, a whole tile of 64 keys in sixteen lanes:
/// prefill (P = M = 2048, `cpu-llvm`) 40.1 ms against 44.6 for 4 x 2, 41.4 for 8 x 2 and 41.5 for
/// 6 x 4.
pub const fn register_block(tier: HostTier) -> RegisterShape {
    if tier.registers >= 32 {
        RegisterShape { rows: 4, columns: 4 }
    } else {
        RegisterShape { rows: 4, columns: 2 }
    }
}

/// Vectors side by side along the lanes' index in a reduction with no rows to block (decode's
/// value contraction `sum[m0] SLN[m0] * V[m0, f]` for one query, a tile's maximum along the
/// queries) or in a row along a strided input (`streams`, see `streams_input`). One vector at a
/// time chains every step of the reduction through one register; four independent accumulators
/// hide most of that latency (`benches/pytorch.ein` decode on Cranelift at M = 16384: 31.8 ms
/// with four, 30.7 with eight, 36.1 with two, 43.2 with one), and eight cost more code to compile
/// (ALiBi's Cranelift IR a sixth longer) for no more speed. A strided input wants whole cache
/// lines at each step: as many vectors as make 64 points, at most eight (decode reading
/// `K[h, e, m]` on Cranelift: 37-42 ms with eight, 42-52 with four). Both CPU tiers ask this.
pub const fn side_by_side(lanes: usize, streams: bool) -> usize {
    if !streams {
        return 4;
    }
    let columns = 64 / lanes;
    if columns < 1 {
        1
    } else if columns > 8 {
        8
    } else {
        columns
    }
}

/// Whether `tier`'s register blocks take an epilogue that does more than add a term to their
/// accumulators (a score modification folded into its contraction, see `accumulate`). With
/// thirty-two registers the block's sixteen accumulators leave room for the epilogue's constants:
/// ALiBi + soft-capping + causal on `cpu-llvm` with AVX-512, 1.27x to 1.22x of plain causal
/// attention (before flushing subnormals), softplus-l1 4% faster. With sixteen, Cranelift's
/// sigmoid attention ran 10% slower folded and ALiBi 3% (P = M = 2048), so the modification keeps
/// its own pass over the scores there (AVX2's `cpu-llvm` is not measured and keeps it too).
pub const fn folds_modifications(tier: HostTier) -> bool {
    tier.registers >= 32
}
