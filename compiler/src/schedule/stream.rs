//! Streaming a cascade without a recurrence: a 1-pass cascade over a symbolic rank `M` whose
//! sums over `M` need nothing but the current key (sigmoid attention, softplus with an l1 sum)
//! runs as one loop over tiles of `M`, each sum a running sum, instead of materialising every
//! tensor indexed by `M` in full.
//!
//! The optimizer streams what it rewrites (a running maximum and the sums it rescales); a cascade
//! that is already one pass over `M` without a maximum is left as written, and its score matrix
//! `QK[h, p, m]` would be computed whole (for a chunk of queries, every key) before the sums read
//! it. Here `M` is split into `M1` tiles of `M0 = TILE` keys: every tensor indexed by `m` is kept
//! by tile (`QK[h, m1, m0, p]`, the batch rank `p` last so that it runs in lanes), and every
//! `X[..] = sum[m](body)` becomes a partial sum per tile, a running sum over the tiles and the
//! final iterate:
//!
//! ```text
//! PX[.., m1, p] = sum[m0](body)          RX[.., 0, p] = 0
//! RX[.., m1 + 1, p] = RX[.., m1, p] + PX[.., m1, p]          X[..] = RX[.., M1, p]
//! ```
//!
//! `schedule` then runs every Einsum that binds `m1` in one streamed loop, each tile's tensors kept
//! for the current step only.
//!
//! Needs: a verified cascade. Guarantees: the result is a verified cascade that computes the same
//! values in real arithmetic (each sum is split into partial sums over disjoint tiles, the split
//! pair's last tile running only over valid keys), or `None`. It streams only when every read of a
//! tensor indexed by `m` is at the bare index, inputs are read at `M`'s own positions by the bare
//! index, no Einsum indexed by `m` reads a sum over `m` (the cascade is one pass over `M`), every
//! reduction over `m` is a plain sum over `m` alone with no filter, and no output is indexed by `m`.

use crate::ir::*;
use crate::schedule::layout::is_batch_rank;

/// The keys in a tile of a streamed rank, as the optimizer's tiles.
pub const TILE: u64 = 64;

/// `cascade` streamed over one of its ranks (see the module doc), if one qualifies.
pub fn stream(cascade: &Cascade) -> Option<Cascade> {
    let recurrent = cascade.tensors.iter().any(|t| matches!(t.kind, TensorKind::Defined { iterative: Some(_) }));
    if recurrent {
        return None;
    }
    (0..cascade.ranks.len()).map(RankId::new).find_map(|m| stream_over(cascade, m))
}

/// The Einsums of a cascade by their relation to the streamed index.
#[derive(Clone, Copy, PartialEq)]
enum Role {
    /// Binds the index on the left: computed per key, kept per tile.
    PerKey,
    /// A sum over the index: a running sum over tiles.
    Sum,
    /// Neither: unchanged.
    Other,
}

fn stream_over(c: &Cascade, whole: RankId) -> Option<Cascade> {
    if c.rank(whole).extent != Extent::Symbolic || is_batch_rank(c, whole) {
        return None;
    }
    // The one index of the rank, wherever it appears.
    let mut index: Option<Index> = None;
    let mut consistent = true;
    let mut note = |i: Index| {
        if i.rank == whole {
            consistent &= index.is_none_or(|j| j == i);
            index = Some(i);
        }
    };
    for e in &c.einsums {
        e.lhs_indices().for_each(&mut note);
        let mut visit = |x: &Expr| match x {
            Expr::Index(i) => note(*i),
            Expr::Reduce { indices, .. } => indices.iter().for_each(|i| note(*i)),
            Expr::Access { subscripts, .. } => subscripts.iter().for_each(|s| s.for_each_index(&mut note)),
            _ => {}
        };
        e.body.walk(&mut visit);
        for cond in &e.filter {
            cond.lhs.walk(&mut visit);
            cond.rhs.walk(&mut visit);
        }
    }
    let m = index.filter(|_| consistent)?;
    let roles: Vec<Role> = c
        .einsums
        .iter()
        .map(|e| {
            if e.lhs_indices().any(|i| i == m) {
                Role::PerKey
            } else if matches!(&e.body, Expr::Reduce { op: ReduceOp::Sum, indices, filter, .. } if indices == &[m] && filter.is_empty())
            {
                Role::Sum
            } else {
                Role::Other
            }
        })
        .collect();
    if !roles.contains(&Role::Sum) || !roles.contains(&Role::PerKey) {
        return None;
    }
    let per_key: Vec<TensorId> =
        c.einsums.iter().zip(&roles).filter(|(_, r)| **r == Role::PerKey).map(|(e, _)| e.target).collect();
    let sums: Vec<TensorId> =
        c.einsums.iter().zip(&roles).filter(|(_, r)| **r == Role::Sum).map(|(e, _)| e.target).collect();
    // Each streamed tensor has one Einsum, and a per-key tensor has `M` at one position.
    for t in per_key.iter().chain(&sums) {
        if c.definitions(*t).count() != 1 {
            return None;
        }
    }
    for t in &per_key {
        if c.tensor(*t).ranks.iter().filter(|r| **r == whole).count() != 1 {
            return None;
        }
    }
    if c.outputs.iter().any(|o| per_key.contains(&o.tensor)) {
        return None;
    }
    // Reads: per-key tensors at the bare index, inputs at `M`'s positions by the bare index, and
    // nothing indexed by `m` reads a sum (that would be a second pass).
    for (e, role) in c.einsums.iter().zip(&roles) {
        let mut ok = true;
        let mut check = |x: &Expr| match x {
            Expr::Access { tensor, subscripts } => {
                let ranks = &c.tensor(*tensor).ranks;
                for (q, sub) in subscripts.iter().enumerate() {
                    let mut mentions = false;
                    sub.for_each_index(&mut |i| mentions |= i == m);
                    if ranks[q] == whole {
                        ok &= *sub == Affine::Index(m) || (!mentions && !per_key.contains(tensor));
                    } else {
                        ok &= !mentions;
                    }
                }
                ok &= !(*role != Role::Other && sums.contains(tensor));
            }
            Expr::Reduce { indices, .. } if *role != Role::Sum => ok &= !indices.contains(&m),
            _ => {}
        };
        e.body.walk(&mut check);
        for cond in &e.filter {
            cond.lhs.walk(&mut check);
            cond.rhs.walk(&mut check);
        }
        if !ok {
            return None;
        }
        // A sum's body holds no other reduction over `m`; an `Other` Einsum reads no per-key tensor.
        if *role == Role::Other {
            let mut reads_per_key = false;
            e.body.walk(&mut |x| reads_per_key |= matches!(x, Expr::Access { tensor, .. } if per_key.contains(tensor)));
            if reads_per_key {
                return None;
            }
        }
    }
    let streamed = rewrite(c, whole, m, &roles, &per_key);
    crate::verify::verify(&streamed).ok()?;
    Some(streamed)
}

/// A fresh rank name from `base`.
fn fresh_rank(c: &Cascade, base: String) -> String {
    let mut name = base;
    while c.rank_by_name(&name).is_some() {
        name.push('_');
    }
    name
}

/// A fresh tensor name from `base`.
fn fresh_tensor(c: &Cascade, base: String) -> String {
    let mut name = base;
    while c.tensor_by_name(&name).is_some() {
        name.push('_');
    }
    name
}

fn rewrite(c: &Cascade, whole: RankId, m: Index, roles: &[Role], per_key: &[TensorId]) -> Cascade {
    let mut out = c.clone();
    let whole_name = c.rank(whole).name.clone();
    let tile_rank = RankId::new(out.ranks.len());
    out.ranks.push(Rank { name: fresh_rank(c, format!("{whole_name}0")), extent: Extent::Fixed(TILE) });
    let tiles_rank = RankId::new(out.ranks.len());
    let tiles_name = fresh_rank(&out, format!("{whole_name}1"));
    out.ranks.push(Rank { name: tiles_name, extent: Extent::Split { whole, tile: tile_rank } });
    let (m0, m1) = (Index { rank: tile_rank, primes: m.primes }, Index { rank: tiles_rank, primes: m.primes });
    let key = Affine::Add(
        Box::new(Affine::Mul(Box::new(Affine::Index(m1)), Box::new(Affine::Extent(tile_rank)))),
        Box::new(Affine::Index(m0)),
    );
    // The lane rank: a batch rank every per-key tensor has (a symbolic one first, the queries),
    // kept last.
    let candidates: Vec<RankId> = (0..c.ranks.len())
        .map(RankId::new)
        .filter(|r| is_batch_rank(c, *r) && per_key.iter().all(|t| c.tensor(*t).ranks.contains(r)))
        .collect();
    let lane =
        candidates.iter().copied().find(|r| c.rank(*r).extent == Extent::Symbolic).or(candidates.last().copied());
    // Each per-key tensor's new order: its other positions, then `M1, M0`, then the lane rank. An
    // entry is the old position, or `None` for `M1` (first) and `M0` (second).
    let order_of = |ranks: &[RankId], with_tiles: bool| -> Vec<Option<usize>> {
        let mut order: Vec<Option<usize>> =
            (0..ranks.len()).filter(|q| ranks[*q] != whole && Some(ranks[*q]) != lane).map(Some).collect();
        if with_tiles {
            order.extend([None, None]);
        }
        order.extend((0..ranks.len()).filter(|q| Some(ranks[*q]) == lane).map(Some));
        order
    };
    let mut orders: std::collections::BTreeMap<TensorId, Vec<Option<usize>>> = Default::default();
    for t in per_key {
        let order = order_of(&c.tensor(*t).ranks, true);
        let ranks = c.tensor(*t).ranks.clone();
        out.tensors[t.index()].ranks = tiles_order(&order, &ranks, tiles_rank, tile_rank);
        orders.insert(*t, order);
    }
    // Reads of per-key tensors follow their new order; `m` elsewhere is the key `m1 * M0 + m0`.
    let redirect = |x: &mut Expr| match x {
        Expr::Access { tensor, subscripts } => match orders.get(tensor) {
            Some(order) => {
                let old = subscripts.clone();
                let mut tiles = [Affine::Index(m1), Affine::Index(m0)].into_iter();
                *subscripts = order
                    .iter()
                    .map(|q| match q {
                        Some(q) => old[*q].clone(),
                        None => tiles.next().expect("two tile positions"),
                    })
                    .collect();
            }
            None => {
                for sub in subscripts.iter_mut() {
                    if *sub == Affine::Index(m) {
                        *sub = key.clone();
                    }
                }
            }
        },
        Expr::Index(i) if *i == m => {
            *x = Expr::Binary(
                BinaryOp::Add,
                Box::new(Expr::Binary(BinaryOp::Mul, Box::new(Expr::Index(m1)), Box::new(Expr::Extent(tile_rank)))),
                Box::new(Expr::Index(m0)),
            );
        }
        _ => {}
    };
    let substitute = |e: &mut Einsum| {
        let mut redirect = redirect;
        e.body.walk_mut(&mut redirect);
        for cond in &mut e.filter {
            cond.lhs.walk_mut(&mut redirect);
            cond.rhs.walk_mut(&mut redirect);
        }
    };
    let mut einsums = Vec::new();
    for (e, role) in c.einsums.iter().zip(roles) {
        let mut e = e.clone();
        match role {
            Role::Other => einsums.push(e),
            Role::PerKey => {
                let order = &orders[&e.target];
                let old = e.lhs.clone();
                let mut tiles = [Lhs::Index(m1), Lhs::Index(m0)].into_iter();
                e.lhs = order
                    .iter()
                    .map(|q| match q {
                        Some(q) => old[*q],
                        None => tiles.next().expect("two tile positions"),
                    })
                    .collect();
                substitute(&mut e);
                einsums.push(e);
            }
            Role::Sum => {
                substitute(&mut e);
                let target = c.tensor(e.target);
                let order = order_of(&target.ranks, false);
                // `M1` goes before the lane rank (or last).
                let at =
                    order.iter().position(|q| q.is_some_and(|q| Some(target.ranks[q]) == lane)).unwrap_or(order.len());
                let mut ranks: Vec<RankId> = order.iter().map(|q| target.ranks[q.expect("no tiles")]).collect();
                ranks.insert(at, tiles_rank);
                let mut lhs: Vec<Lhs> = order.iter().map(|q| e.lhs[q.expect("no tiles")]).collect();
                let partial = TensorId::new(out.tensors.len());
                out.tensors.push(Tensor {
                    name: fresh_tensor(&out, format!("P{}", target.name)),
                    ranks: ranks.clone(),
                    kind: TensorKind::Defined { iterative: None },
                });
                let running = TensorId::new(out.tensors.len());
                out.tensors.push(Tensor {
                    name: fresh_tensor(&out, format!("R{}", target.name)),
                    ranks,
                    kind: TensorKind::Defined { iterative: Some(at) },
                });
                let Expr::Reduce { op, filter, body, .. } = e.body else { unreachable!("a sum") };
                let read = |tensor: TensorId, at_tile: Affine| {
                    let mut subscripts: Vec<Affine> =
                        lhs.iter().map(|l| Affine::Index(l.index().expect("plain indices"))).collect::<Vec<_>>();
                    subscripts.insert(at, at_tile);
                    Expr::Access { tensor, subscripts }
                };
                let mut partial_lhs = lhs.clone();
                partial_lhs.insert(at, Lhs::Index(m1));
                einsums.push(Einsum {
                    target: partial,
                    lhs: partial_lhs,
                    body: Expr::Reduce { op, indices: vec![m0], filter, body },
                    filter: vec![],
                });
                let mut initial = lhs.clone();
                initial.insert(at, Lhs::Initial);
                einsums.push(Einsum { target: running, lhs: initial, body: Expr::Const(0.0), filter: vec![] });
                let mut next = lhs.clone();
                next.insert(at, Lhs::Next(m1));
                einsums.push(Einsum {
                    target: running,
                    lhs: next,
                    body: Expr::Binary(
                        BinaryOp::Add,
                        Box::new(read(running, Affine::Index(m1))),
                        Box::new(read(partial, Affine::Index(m1))),
                    ),
                    filter: vec![],
                });
                // The final iterate, in the sum's own order.
                lhs = e.lhs.clone();
                let body = {
                    let mut subscripts: Vec<Affine> = order
                        .iter()
                        .map(|q| Affine::Index(e.lhs[q.expect("no tiles")].index().expect("plain")))
                        .collect();
                    subscripts.insert(at, Affine::Extent(tiles_rank));
                    Expr::Access { tensor: running, subscripts }
                };
                einsums.push(Einsum { target: e.target, lhs, body, filter: e.filter.clone() });
            }
        }
    }
    out.einsums = einsums;
    out
}

/// The ranks of a per-key tensor in its new order.
fn tiles_order(order: &[Option<usize>], ranks: &[RankId], tiles: RankId, tile: RankId) -> Vec<RankId> {
    let mut next = [tiles, tile].into_iter();
    order
        .iter()
        .map(|q| match q {
            Some(q) => ranks[*q],
            None => next.next().expect("two tile positions"),
        })
        .collect()
}
