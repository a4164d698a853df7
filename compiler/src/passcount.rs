//! The pass-count analysis (FuseMax §III): how many times a cascade must traverse each rank.
//!
//! Needs: a verified cascade. Guarantees: for every rank that some Einsum reduces or iterates over
//! (and, for a split rank, the whole rank and each part), the number of passes, the pass of each
//! Einsum that traverses the rank, and for each extra pass the read that forces it.
//!
//! The method, for a target rank R:
//! - An Einsum *covers* R when its iteration space traverses R: it binds an index of R (for a
//!   split whole rank `M = (M1, M0)`: an index of `M`, or indices of both parts).
//! - A value is *R-complete* when it needs every coordinate of R and is no longer indexed by R:
//!   `GM[p] = max[m](QK[m, p])` is; `SN[m, p]` is not (it is a fiber still indexed by `m`). A
//!   value built by a recurrence along an iterative rank is complete only at its final iterate.
//! - Fibers are traced to the inputs they come from, through element-wise copies, scalings and
//!   filters, so a renaming cannot hide a pass; reading a complete value adds a pass only to an
//!   Einsum that re-reads a fiber of an input the value consumed (`SN * V` after `GM` does not
//!   re-read `K` along `E`).
//! - Levels: `level(E) = max over the reads v of E of level(v) + [v is R-complete and E covers R]`.
//!   A read of an earlier iterate (`RD[m1, p]` inside step `m1`) is the carried state of a
//!   recurrence: it is available before the step and adds nothing.
//! - The passes over R are the distinct levels of the Einsums that cover R: each step is a
//!   read-read dependency, an R fiber re-read after a value that needed all of it.

use std::collections::{BTreeSet, HashMap};

use petgraph::graph::DiGraph;

use crate::ir::*;

/// What one analysis found, for one kernel.
#[derive(Clone, Debug, PartialEq)]
pub struct PassReport {
    pub kernel: String,
    pub ranks: Vec<RankPasses>,
    /// Numerical hazards the analysis noticed, such as an `exp` of an unbounded argument.
    pub warnings: Vec<String>,
}

/// The passes over one rank (or over a whole split rank, or one of its parts).
#[derive(Clone, Debug, PartialEq)]
pub struct RankPasses {
    /// The rank's name (for a split rank's whole, the original rank's name).
    pub rank: String,
    pub passes: usize,
    /// For every Einsum that covers the rank: its pass, from 1.
    pub einsum_passes: Vec<(EinsumId, usize)>,
    /// For each pass after the first: why it is needed.
    pub extra: Vec<ExtraPass>,
}

/// One read-read dependency: `reader` re-reads the rank after `value`, which needed all of it.
#[derive(Clone, Debug, PartialEq)]
pub struct ExtraPass {
    pub pass: usize,
    pub reader: EinsumId,
    pub value: TensorId,
}

impl PassReport {
    pub fn passes(&self, rank: &str) -> Option<usize> {
        self.ranks.iter().find(|r| r.rank == rank).map(|r| r.passes)
    }

    /// `(rank, passes)` for every reported rank, in report order.
    pub fn counts(&self) -> Vec<(String, usize)> {
        self.ranks.iter().map(|r| (r.rank.clone(), r.passes)).collect()
    }
}

/// What the analysis traverses.
#[derive(Clone, Debug)]
struct Target {
    name: String,
    /// Indices of these ranks traverse the target.
    parts: BTreeSet<RankId>,
    /// For a split whole rank: the pair (tile, within-tile) that together traverse it.
    pair: Option<(RankId, RankId)>,
    /// Which index of these ranks: `m` (0) or `m'` (1), ... A self-attention over one rank `M`
    /// reduces the keys `m` while the queries `m'` stay.
    primes: u8,
    /// The value is complete once it has consumed one of these rank sets.
    complete_when: Vec<BTreeSet<RankId>>,
}

/// Analyses every rank that some Einsum reduces or iterates over.
pub fn analyze(cascade: &Cascade) -> PassReport {
    let consumed = consumed_ranks(cascade);
    let order = topological_order(cascade);
    let roles = Roles::of(cascade);
    let ranks = targets(cascade, &roles)
        .into_iter()
        .map(|target| analyze_target(cascade, &target, &roles, &consumed, &order))
        .collect();
    PassReport { kernel: cascade.name.clone(), ranks, warnings: exp_warnings(cascade) }
}

/// The roles a rank plays: which of its index names (`m`, `m'`, ...) walk the same fibers.
///
/// A pass is a traversal of a fiber of a tensor's position, whatever index walks it: in
/// `GM[p] = max[m](A[m, p])` and `Y[p] = sum[m'](exp(A[m', p] - GM[p]))` both reductions walk
/// `A`'s first position, so `m` and `m'` play one role and their passes are counted together.
/// Two names that appear in one Einsum (`QK[m, m'] = Q[e, m'] * K[e, m]`: keys and queries of a
/// self-attention over one rank) always play two roles. Names are merged when they walk a common
/// tensor position and never meet in an Einsum. The roles of a rank are numbered in the order of
/// their fewest primes and reported as `M`, `M'`, ..., so renaming an index changes nothing.
#[derive(Clone, Debug, Default)]
pub struct Roles {
    role: HashMap<(RankId, u8), u8>,
}

impl Roles {
    pub fn of(cascade: &Cascade) -> Roles {
        // The positions each name walks, and the pairs of names that meet in an Einsum.
        let mut walks: HashMap<(RankId, u8), BTreeSet<(TensorId, usize)>> = HashMap::new();
        let mut together: BTreeSet<(RankId, u8, u8)> = BTreeSet::new();
        for einsum in &cascade.einsums {
            let mut present: BTreeSet<(RankId, u8)> = BTreeSet::new();
            for (position, lhs) in einsum.lhs.iter().enumerate() {
                if let Some(i) = lhs.index() {
                    present.insert((i.rank, i.primes));
                    walks.entry((i.rank, i.primes)).or_default().insert((einsum.target, position));
                }
            }
            einsum.body.walk(&mut |e| match e {
                Expr::Reduce { indices, .. } => present.extend(indices.iter().map(|i| (i.rank, i.primes))),
                Expr::Index(i) => {
                    present.insert((i.rank, i.primes));
                }
                _ => {}
            });
            for (read, subscripts) in einsum.reads() {
                for (position, subscript) in subscripts.iter().enumerate() {
                    subscript.for_each_index(&mut |i| {
                        present.insert((i.rank, i.primes));
                        walks.entry((i.rank, i.primes)).or_default().insert((read, position));
                    });
                }
            }
            for a in &present {
                for b in &present {
                    if a.0 == b.0 && a.1 < b.1 {
                        together.insert((a.0, a.1, b.1));
                    }
                }
            }
        }
        // Classes of names per rank, merged until nothing changes.
        let mut names: Vec<(RankId, u8)> = walks.keys().copied().collect();
        names.sort();
        let mut class: HashMap<(RankId, u8), usize> = names.iter().enumerate().map(|(n, k)| (*k, n)).collect();
        loop {
            let mut merged = false;
            for a in &names {
                for b in &names {
                    let (ca, cb) = (class[a], class[b]);
                    if a.0 != b.0 || ca >= cb || walks[a].is_disjoint(&walks[b]) {
                        continue;
                    }
                    let members = |c: usize| names.iter().filter(|n| class[*n] == c).map(|n| n.1).collect::<Vec<_>>();
                    let (left, right) = (members(ca), members(cb));
                    let meet = left
                        .iter()
                        .any(|x| right.iter().any(|y| together.contains(&(a.0, (*x).min(*y), (*x).max(*y)))));
                    if !meet {
                        for n in &names {
                            if class[n] == cb {
                                class.insert(*n, ca);
                            }
                        }
                        merged = true;
                    }
                }
            }
            if !merged {
                break;
            }
        }
        // The roles of a rank in the order of their fewest primes: the first is reported as the
        // rank (`M`), the second with one prime (`M'`), whatever names the source chose.
        let mut role = HashMap::new();
        for n in &names {
            let fewest = |c: usize| names.iter().filter(|m| class[*m] == c).map(|m| m.1).min().expect("a member");
            let mine = fewest(class[n]);
            let mut earlier: Vec<usize> = names.iter().filter(|m| m.0 == n.0).map(|m| class[m]).collect();
            earlier.sort();
            earlier.dedup();
            let rank = earlier.iter().filter(|c| fewest(**c) < mine).count();
            role.insert(*n, rank as u8);
        }
        Roles { role }
    }

    /// The role of an index: the primes of the name its role is reported under (0 for the first).
    pub fn role(&self, index: Index) -> u8 {
        self.role.get(&(index.rank, index.primes)).copied().unwrap_or(index.primes)
    }
}

/// Whether a tensor holds a maximum: a max reduction, or a running maximum.
fn is_max_like(cascade: &Cascade, tensor: TensorId) -> bool {
    cascade.definitions(tensor).all(|(_, einsum)| {
        matches!(einsum.body, Expr::Reduce { op: ReduceOp::Max, .. } | Expr::Binary(BinaryOp::Max, ..))
            || einsum.is_initial()
    })
}

/// Whether an expression is a maximum: a max reduction, a tensor that holds one, or the larger of
/// two values one of which is (`max(a, b) >= a`: `max(max[m](S), sink)` bounds `S` as well).
fn is_maximum(cascade: &Cascade, expr: &Expr) -> bool {
    match expr {
        Expr::Reduce { op: ReduceOp::Max, .. } => true,
        Expr::Access { tensor, .. } => is_max_like(cascade, *tensor),
        Expr::Binary(BinaryOp::Max, a, b) => is_maximum(cascade, a) || is_maximum(cascade, b),
        _ => false,
    }
}

/// Whether `exp(arg)` cannot overflow: the argument is shifted by a maximum (`a - max(..)`), or
/// is bounded above by a constant (`min(a, 0)`, a constant).
fn bounded_exponent(cascade: &Cascade, arg: &Expr) -> bool {
    match arg {
        Expr::Const(_) => true,
        Expr::Binary(BinaryOp::Sub, _, shift) => is_maximum(cascade, shift),
        Expr::Binary(BinaryOp::Min, a, b) => {
            matches!(**a, Expr::Const(c) if c <= 0.0) || matches!(**b, Expr::Const(c) if c <= 0.0)
        }
        Expr::Unary(UnaryOp::Neg, inner) => matches!(**inner, Expr::Unary(UnaryOp::Abs | UnaryOp::Relu, _)),
        _ => false,
    }
}

fn exp_warnings(cascade: &Cascade) -> Vec<String> {
    let mut warnings = Vec::new();
    for (e, einsum) in cascade.einsums.iter().enumerate() {
        let mut unbounded = false;
        einsum.body.walk(&mut |expr| {
            if let Expr::Unary(UnaryOp::Exp, arg) = expr {
                unbounded |= !bounded_exponent(cascade, arg);
            }
        });
        if unbounded {
            warnings.push(format!(
                "{}: the argument of exp is not shifted by a maximum, so it is unbounded: f32 overflows to \
                 infinity once it exceeds about 88",
                cascade.einsum_label(EinsumId::new(e))
            ));
        }
    }
    warnings
}

/// The ranks to report, in declaration order: reduced or iterated ranks, and for a split pair
/// the whole rank and both parts.
fn targets(cascade: &Cascade, roles: &Roles) -> Vec<Target> {
    let mut used: BTreeSet<(u8, RankId)> = BTreeSet::new();
    for einsum in &cascade.einsums {
        einsum.body.walk(&mut |e| {
            if let Expr::Reduce { indices, .. } = e {
                used.extend(indices.iter().map(|i| (roles.role(*i), i.rank)));
            }
        });
    }
    for tensor in &cascade.tensors {
        if let TensorKind::Defined { iterative: Some(p) } = tensor.kind {
            used.insert((0, tensor.ranks[p]));
        }
    }
    let splits = cascade.split_pairs();
    for (tile, inner, whole) in &splits {
        for primes in 0..=3u8 {
            if used.contains(&(primes, *tile)) || used.contains(&(primes, *inner)) || used.contains(&(primes, *whole)) {
                used.extend([(primes, *tile), (primes, *inner), (primes, *whole)]);
            }
        }
    }
    let mut targets = Vec::new();
    for (primes, rank) in used {
        let name = format!("{}{}", cascade.rank(rank).name, "'".repeat(primes as usize));
        let whole_of = splits.iter().find(|(_, _, whole)| *whole == rank);
        let part_of = splits.iter().find(|(tile, inner, _)| *tile == rank || *inner == rank);
        let target = if let Some((tile, inner, whole)) = whole_of {
            Target {
                name,
                parts: [*whole, *tile, *inner].into(),
                pair: Some((*tile, *inner)),
                primes,
                complete_when: vec![[*whole].into(), [*tile, *inner].into()],
            }
        } else if let Some((_, _, whole)) = part_of {
            Target {
                name,
                parts: [rank, *whole].into(),
                pair: None,
                primes,
                complete_when: vec![[rank].into(), [*whole].into()],
            }
        } else {
            Target { name, parts: [rank].into(), pair: None, primes, complete_when: vec![[rank].into()] }
        };
        targets.push(target);
    }
    targets
}

/// How an Einsum reads a tensor along the tensor's iterative position.
#[derive(Clone, Copy, Debug, PartialEq)]
enum IterateRead {
    /// Not an iterative tensor, or read at an ordinary coordinate.
    Plain,
    /// An earlier iterate (`T[r]` in step `r`): carried state.
    Earlier,
    /// The final iterate (`T[R]`): complete along the iterative rank.
    Final(RankId),
}

fn iterate_read(cascade: &Cascade, read: TensorId, subscripts: &[Affine]) -> IterateRead {
    let tensor = cascade.tensor(read);
    let TensorKind::Defined { iterative: Some(position) } = tensor.kind else {
        return IterateRead::Plain;
    };
    let subscript = &subscripts[position];
    if !subscript.mentions_index() {
        return match subscript {
            Affine::Const(0) => IterateRead::Plain,
            _ => IterateRead::Final(tensor.ranks[position]),
        };
    }
    let offset = match subscript {
        Affine::Index(_) => Some(0),
        Affine::Add(a, b) => match (&**a, &**b) {
            (Affine::Index(_), Affine::Const(c)) | (Affine::Const(c), Affine::Index(_)) => Some(*c),
            _ => None,
        },
        Affine::Sub(a, b) => match (&**a, &**b) {
            (Affine::Index(_), Affine::Const(c)) => Some(-*c),
            _ => None,
        },
        _ => None,
    };
    match offset {
        Some(c) if c <= 0 => IterateRead::Earlier,
        _ => IterateRead::Plain,
    }
}

/// The ranks each tensor's value has consumed entirely (by a reduction, by reading a value that
/// has, or by reading a final iterate), by fixpoint over the cascade.
fn consumed_ranks(cascade: &Cascade) -> Vec<BTreeSet<Index>> {
    let mut consumed = vec![BTreeSet::new(); cascade.tensors.len()];
    loop {
        let mut changed = false;
        for einsum in &cascade.einsums {
            let mut set: BTreeSet<Index> = BTreeSet::new();
            einsum.body.walk(&mut |e| {
                if let Expr::Reduce { indices, .. } = e {
                    set.extend(indices.iter().copied());
                }
            });
            for (read, subscripts) in einsum.reads() {
                set.extend(consumed[read.index()].iter().copied());
                if let IterateRead::Final(rank) = iterate_read(cascade, read, subscripts) {
                    set.insert(Index { rank, primes: 0 });
                }
            }
            let target = &mut consumed[einsum.target.index()];
            let before = target.len();
            target.extend(set);
            changed |= target.len() != before;
        }
        if !changed {
            return consumed;
        }
    }
}

/// The tensors in an order where every non-carried read comes first.
fn topological_order(cascade: &Cascade) -> Vec<TensorId> {
    let mut graph: DiGraph<TensorId, ()> = DiGraph::new();
    let nodes: Vec<_> = (0..cascade.tensors.len()).map(|t| graph.add_node(TensorId::new(t))).collect();
    for einsum in &cascade.einsums {
        for (read, subscripts) in einsum.reads() {
            if iterate_read(cascade, read, subscripts) != IterateRead::Earlier && read != einsum.target {
                graph.update_edge(nodes[read.index()], nodes[einsum.target.index()], ());
            }
        }
    }
    match petgraph::algo::toposort(&graph, None) {
        Ok(order) => order.into_iter().map(|n| graph[n]).collect(),
        // The checker rejects cycles that no recurrence carries; fall back to cascade order.
        Err(_) => (0..cascade.tensors.len()).map(TensorId::new).collect(),
    }
}

/// The ranks of the indices of the role `primes` that an Einsum binds.
fn binds(einsum: &Einsum, roles: &Roles, primes: u8) -> BTreeSet<RankId> {
    let mut indices: BTreeSet<Index> = einsum.lhs_indices().collect();
    einsum.body.walk(&mut |e| {
        if let Expr::Reduce { indices: reduced, .. } = e {
            indices.extend(reduced.iter().copied());
        }
    });
    indices.into_iter().filter(|i| roles.role(*i) == primes).map(|i| i.rank).collect()
}

fn analyze_target(
    cascade: &Cascade,
    target: &Target,
    roles: &Roles,
    consumed: &[BTreeSet<Index>],
    order: &[TensorId],
) -> RankPasses {
    let covers = |einsum: &Einsum| {
        let bound = binds(einsum, roles, target.primes);
        match target.pair {
            Some((tile, inner)) => {
                bound.iter().any(|r| target.parts.contains(r) && *r != tile && *r != inner)
                    || (bound.contains(&tile) && bound.contains(&inner))
            }
            None => bound.iter().any(|r| target.parts.contains(r)),
        }
    };
    let complete = |set: &BTreeSet<Index>| {
        let ranks: BTreeSet<RankId> = set.iter().filter(|i| roles.role(**i) == target.primes).map(|i| i.rank).collect();
        target.complete_when.iter().any(|needed| needed.is_subset(&ranks))
    };
    let indexed = |cascade: &Cascade, subscripts: &[Affine]| {
        let mut any = false;
        for subscript in subscripts {
            subscript.for_each_index(&mut |i| any |= target.parts.contains(&i.rank) && roles.role(i) == target.primes);
        }
        let _ = cascade;
        any
    };
    // Which input fibers along the target each tensor is derived from (through element-wise
    // copies, scalings and filters), and which input fibers a value has consumed. A re-read
    // counts only when it reads a fiber of an input that the complete value consumed.
    let mut sources: Vec<BTreeSet<TensorId>> = cascade
        .tensors
        .iter()
        .enumerate()
        .map(|(t, tensor)| match tensor.kind {
            TensorKind::Input { .. } if tensor.ranks.iter().any(|r| target.parts.contains(r)) => {
                [TensorId::new(t)].into()
            }
            _ => BTreeSet::new(),
        })
        .collect();
    let mut consumed_sources: Vec<BTreeSet<TensorId>> = vec![BTreeSet::new(); cascade.tensors.len()];
    loop {
        let mut changed = false;
        for einsum in &cascade.einsums {
            let mut own = BTreeSet::new();
            let mut seen = BTreeSet::new();
            for (read, subscripts) in einsum.reads() {
                if indexed(cascade, subscripts) {
                    own.extend(sources[read.index()].iter().copied());
                }
                seen.extend(consumed_sources[read.index()].iter().copied());
            }
            seen.extend(own.iter().copied());
            let t = einsum.target.index();
            let before = (sources[t].len(), consumed_sources[t].len());
            sources[t].extend(own);
            consumed_sources[t].extend(seen);
            changed |= before != (sources[t].len(), consumed_sources[t].len());
        }
        if !changed {
            break;
        }
    }
    let mut tensor_level: HashMap<TensorId, usize> = HashMap::new();
    let mut einsum_level: Vec<Option<(usize, Option<TensorId>)>> = vec![None; cascade.einsums.len()];
    for tensor in order {
        for (id, einsum) in cascade.definitions(*tensor) {
            let covering = covers(einsum);
            let fibers_read: BTreeSet<TensorId> = einsum
                .reads()
                .into_iter()
                .filter(|(_, subscripts)| indexed(cascade, subscripts))
                .flat_map(|(read, _)| sources[read.index()].iter().copied().collect::<Vec<_>>())
                .collect();
            let mut level = 0;
            let mut cause = None;
            for (read, subscripts) in einsum.reads() {
                let kind = iterate_read(cascade, read, subscripts);
                if kind == IterateRead::Earlier || read == einsum.target {
                    continue;
                }
                let mut read_consumed = consumed[read.index()].clone();
                if let IterateRead::Final(rank) = kind {
                    read_consumed.insert(Index { rank, primes: 0 });
                }
                let rereads = !fibers_read.is_disjoint(&consumed_sources[read.index()]);
                let is_complete = !indexed(cascade, subscripts) && complete(&read_consumed) && rereads;
                let step = usize::from(is_complete && covering);
                let candidate = tensor_level.get(&read).copied().unwrap_or(0) + step;
                if candidate > level || (candidate == level && step == 1 && cause.is_none()) {
                    level = candidate;
                    cause = (step == 1).then_some(read);
                }
            }
            einsum_level[id.index()] = Some((level, cause));
            let entry = tensor_level.entry(*tensor).or_insert(0);
            *entry = (*entry).max(level);
        }
    }
    let covering: Vec<(EinsumId, usize, Option<TensorId>)> = cascade
        .einsums
        .iter()
        .enumerate()
        .filter(|(_, e)| covers(e))
        .filter_map(|(i, _)| einsum_level[i].map(|(level, cause)| (EinsumId::new(i), level, cause)))
        .collect();
    let levels: BTreeSet<usize> = covering.iter().map(|(_, level, _)| *level).collect();
    let pass_of = |level: usize| levels.iter().position(|l| *l == level).expect("level present") + 1;
    let einsum_passes = covering.iter().map(|(id, level, _)| (*id, pass_of(*level))).collect();
    let mut extra = Vec::new();
    for level in levels.iter().skip(1) {
        if let Some((reader, _, Some(value))) = covering.iter().find(|(_, l, cause)| l == level && cause.is_some()) {
            extra.push(ExtraPass { pass: pass_of(*level), reader: *reader, value: *value });
        }
    }
    RankPasses { rank: target.name.clone(), passes: levels.len(), einsum_passes, extra }
}

/// The report as text: per rank, the passes and the Einsums of each, and why each extra pass is
/// needed.
pub fn describe(cascade: &Cascade, report: &PassReport) -> String {
    let roles = Roles::of(cascade);
    let mut out = String::new();
    for rank in &report.ranks {
        let plural = if rank.passes == 1 { "pass" } else { "passes" };
        out.push_str(&format!("  {}: {} {plural}\n", rank.rank, rank.passes));
        for pass in 1..=rank.passes {
            let members: Vec<String> = rank
                .einsum_passes
                .iter()
                .filter(|(_, p)| *p == pass)
                .map(|(id, _)| cascade.einsum_label(*id))
                .collect();
            out.push_str(&format!("    pass {pass}: {}\n", members.join(", ")));
        }
        for extra in &rank.extra {
            out.push_str(&format!(
                "    pass {} is needed because {} reads {}, which needs all of {} first\n",
                extra.pass,
                cascade.einsum_label(extra.reader),
                cascade.tensor(extra.value).name,
                rank.rank
            ));
            let reader = &cascade.einsums[extra.reader.index()];
            let is_output = cascade.outputs.iter().any(|o| o.tensor == reader.target);
            let role = |i: Index| format!("{}{}", cascade.rank(i.rank).name, "'".repeat(roles.role(i) as usize));
            let indexed_by_rank = reader.lhs_indices().any(|i| role(i) == rank.rank);
            if is_output && indexed_by_rank {
                out.push_str(&format!(
                    "    no rewrite removes pass {}: the output {} is indexed by {} and every element needs {}, \
                     which needs all of {}\n",
                    extra.pass,
                    cascade.tensor(reader.target).name,
                    rank.rank,
                    cascade.tensor(extra.value).name,
                    rank.rank
                ));
            }
        }
    }
    for warning in &report.warnings {
        out.push_str(&format!("  warning: {warning}\n"));
    }
    out
}
