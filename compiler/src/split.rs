//! Split-key schedule (Flash-Decoding): a streamed loop cut into chunks of keys that run
//! independently, and a merge of their partial running tensors.
//!
//! A decode-shaped problem (one query row per head) streams a long key rank with little else to
//! run in parallel. This pass cuts the tile rank `M1 = M / M0` of a streamed loop into chunks of
//! `MC` keys: a *chunk* cascade runs the loop over each chunk `c` from the initial values (`c` is
//! a batch rank, so every chunk runs at once) and outputs every running tensor's last iterate per
//! chunk; a *merge* cascade combines them and evaluates what the original cascade computed after
//! the loop. Three kinds of running tensor merge:
//!
//! - a running maximum (minimum) `R[m1 + 1] = max(R[m1], X)`: the maximum over chunks;
//! - a running sum `R[m1 + 1] = R[m1] + X`, from 0: the sum over chunks;
//! - a rescaled sum `R[m1 + 1] = X + R[m1] * exp(RM[m1] - RM[m1 + 1])`, from 0, where `RM` is a
//!   running maximum and `X` is `exp(-RM[m1 + 1])` times a value that depends on no running
//!   tensor (checked by exponent bookkeeping): `R` is then `exp(-RM)` times a plain sum, and the
//!   merge is `sum[c](R[c] * exp(RM[c] - max[c'](RM[c'])))`.
//!
//! A chunk's last tiles may lie past `M`. The original loop never runs them; here they must leave
//! the running tensors unchanged, so every `X` must be a reduction over the within-tile index
//! with the kind's identity for an empty set, and every point of a chunk that lies past `M` is
//! filtered out (`where c * MC + m1 * M0 + m0 < M`) unless a read past the end of an input
//! already leaves it undefined.
//!
//! Needs: a verified cascade. Guarantees: two verified cascades; running `merge` on the outputs
//! of `chunks` gives what the cascade gives (in exact arithmetic; the merge rounds differently),
//! or an error that says why the cascade does not split.

use std::collections::BTreeMap;

use crate::ir::*;

/// A cascade cut into chunks and a merge.
#[derive(Clone, Debug, PartialEq)]
pub struct SplitKeys {
    /// The streamed loop per chunk: outputs every running tensor's last iterate, per chunk.
    pub chunks: Cascade,
    /// The merge of the partial running tensors, then the original cascade's Einsums after the
    /// loop: the original outputs.
    pub merge: Cascade,
    /// For each input of `chunks`, in order, its position among the original inputs.
    pub chunk_inputs: Vec<usize>,
    /// For each input of `merge`, in order, where it comes from.
    pub merge_inputs: Vec<MergeInput>,
    /// Keys per chunk.
    pub chunk: u64,
}

/// Where an input of the merge comes from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MergeInput {
    /// The original input at this position.
    Original(usize),
    /// The chunk cascade's output at this position.
    Partial(usize),
}

/// How a running tensor's partial values combine.
#[derive(Clone, Debug, PartialEq)]
enum Kind {
    Extremum(BinaryOp),
    Sum,
    /// Scaled by `exp(-RM)` at the point `point` (indices of the running tensor).
    Rescaled {
        by: TensorId,
        point: Vec<Index>,
    },
}

#[derive(Clone, Debug)]
struct Running {
    tensor: TensorId,
    /// The iterative position.
    position: usize,
    kind: Kind,
    /// The initial value.
    init: f64,
}

/// How a value scales with the running maximum `anchor`: `F * exp(old * RM[m1] + new * RM[m1+1])`
/// times the old iterates in `sums`, with `F` free of every running tensor.
#[derive(Clone, Debug, PartialEq)]
struct Class {
    old: i32,
    new: i32,
    anchor: Option<(TensorId, Vec<Index>)>,
    sums: Vec<TensorId>,
}

impl Class {
    const FREE: Class = Class { old: 0, new: 0, anchor: None, sums: Vec::new() };

    fn is_free(&self) -> bool {
        *self == Class::FREE
    }

    fn times(self, other: Class) -> Result<Class, String> {
        let anchor = match (self.anchor, other.anchor) {
            (Some(a), Some(b)) if a != b => return Err("two running maxima scale one value".into()),
            (a, b) => a.or(b),
        };
        let mut sums = self.sums;
        sums.extend(other.sums);
        sums.sort();
        let (old, new) = (self.old + other.old, self.new + other.new);
        let anchor = if old == 0 && new == 0 { None } else { anchor };
        Ok(Class { old, new, anchor, sums })
    }
}

/// Why a cascade has no split-key form.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SplitError {
    /// The cascade's shape does not allow it (a user-facing reason).
    #[error("{0}")]
    NotSplittable(String),
    /// A bug: a cascade this pass built does not verify.
    #[error("internal error: the {part} cascade does not verify: {errors}")]
    Internal { part: &'static str, errors: String },
}

/// Cuts `cascade`'s streamed loop into chunks of `chunk` keys; an error says why it cannot.
pub fn split_keys(cascade: &Cascade, chunk: u64) -> Result<SplitKeys, SplitError> {
    let analysis = Analysis::new(cascade, chunk).map_err(SplitError::NotSplittable)?;
    let running = analysis.running().map_err(SplitError::NotSplittable)?;
    let chunks = analysis.chunk_cascade(&running).map_err(SplitError::NotSplittable)?;
    let (merge, merge_inputs) = analysis.merge_cascade(&running).map_err(SplitError::NotSplittable)?;
    let chunk_inputs = cascade
        .inputs()
        .iter()
        .enumerate()
        .filter(|(_, id)| chunks.tensor_by_name(&cascade.tensor(**id).name).is_some())
        .map(|(i, _)| i)
        .collect();
    crate::verify::verify(&chunks).map_err(|e| SplitError::Internal { part: "chunk", errors: e.to_string() })?;
    crate::verify::verify(&merge).map_err(|e| SplitError::Internal { part: "merge", errors: e.to_string() })?;
    Ok(SplitKeys { chunks, merge, chunk_inputs, merge_inputs, chunk })
}

struct Analysis<'a> {
    cascade: &'a Cascade,
    chunk: u64,
    /// The streamed index and the ranks of its split.
    m1: Index,
    m0: Index,
    whole: RankId,
    /// Einsums that bind `m1`, and the initial values of the running tensors.
    in_loop: Vec<bool>,
    running_ids: Vec<TensorId>,
}

fn constant(expr: &Expr) -> Option<f64> {
    match expr {
        Expr::Const(v) => Some(*v),
        Expr::Unary(UnaryOp::Neg, a) => constant(a).map(|v| -v),
        _ => None,
    }
}

fn plus_one(index: Index) -> Affine {
    Affine::Add(Box::new(Affine::Index(index)), Box::new(Affine::Const(1)))
}

impl<'a> Analysis<'a> {
    fn new(cascade: &'a Cascade, chunk: u64) -> Result<Analysis<'a>, String> {
        let recurrences: Vec<Index> = cascade.einsums.iter().filter_map(|e| e.recurrence_index()).collect();
        let Some(&m1) = recurrences.first() else {
            return Err("it has no streamed loop (no recurrence)".into());
        };
        if recurrences.iter().any(|i| *i != m1) {
            return Err("it has recurrences along more than one index".into());
        }
        let Extent::Split { whole, tile } = cascade.rank(m1.rank).extent else {
            return Err(format!(
                "its recurrence runs along `{}`, which is not a tile rank",
                cascade.rank(m1.rank).name
            ));
        };
        let Extent::Fixed(tile_extent) = cascade.rank(tile).extent else {
            return Err("its tile is not of fixed size".into());
        };
        if chunk == 0 || !chunk.is_multiple_of(tile_extent) {
            return Err(format!("a chunk of {chunk} keys is not a whole number of tiles of {tile_extent}"));
        }
        let m0 = Index { rank: tile, primes: m1.primes };
        let running_ids: Vec<TensorId> =
            cascade.einsums.iter().filter(|e| e.recurrence_index().is_some()).map(|e| e.target).collect();
        let in_loop = cascade
            .einsums
            .iter()
            .map(|e| {
                e.lhs.contains(&Lhs::Index(m1))
                    || e.lhs.contains(&Lhs::Next(m1))
                    || (e.is_initial() && running_ids.contains(&e.target))
            })
            .collect();
        let analysis = Analysis { cascade, chunk, m1, m0, whole, in_loop, running_ids };
        analysis.check_indices()?;
        Ok(analysis)
    }

    fn loop_ranks(&self) -> [RankId; 3] {
        [self.m1.rank, self.m0.rank, self.whole]
    }

    fn is_running(&self, tensor: TensorId) -> bool {
        self.running_ids.contains(&tensor)
    }

    fn definition(&self, tensor: TensorId) -> Option<(EinsumId, &'a Einsum)> {
        self.cascade.definitions(tensor).find(|(_, e)| !e.is_initial())
    }

    /// Only `m1` and `m0` index the loop's ranks; the tail reads the loop's results only as last
    /// iterates, and the loop reads nothing computed outside it.
    fn check_indices(&self) -> Result<(), String> {
        let c = self.cascade;
        for (i, einsum) in c.einsums.iter().enumerate() {
            let label = c.einsum_label(EinsumId::new(i));
            let mut problem: Option<String> = None;
            let mut note = |p: String| {
                problem.get_or_insert(p);
            };
            let mut indices = Vec::new();
            einsum.body.walk(&mut |e| match e {
                Expr::Index(i) => indices.push(*i),
                Expr::Reduce { indices: reduced, .. } => indices.extend(reduced.iter().copied()),
                Expr::Access { subscripts, .. } => {
                    subscripts.iter().for_each(|s| s.for_each_index(&mut |i| indices.push(i)))
                }
                Expr::Extent(r) if *r == self.m1.rank => note("it uses the number of tiles as a value".into()),
                _ => {}
            });
            for cond in &einsum.filter {
                for side in [&cond.lhs, &cond.rhs] {
                    side.walk(&mut |e| match e {
                        Expr::Index(i) => indices.push(*i),
                        Expr::Access { subscripts, .. } => {
                            subscripts.iter().for_each(|s| s.for_each_index(&mut |i| indices.push(i)))
                        }
                        Expr::Extent(r) if *r == self.m1.rank => note("it uses the number of tiles as a value".into()),
                        _ => {}
                    });
                }
            }
            indices.extend(einsum.lhs_indices());
            if self.in_loop[i] {
                if indices
                    .iter()
                    .any(|x| (x.rank == self.m1.rank && *x != self.m1) || (x.rank == self.m0.rank && *x != self.m0))
                {
                    note("it indexes the tiles by more than one index".into());
                }
                for (tensor, subscripts) in einsum.reads() {
                    let t = c.tensor(tensor);
                    if let TensorKind::Input { .. } = t.kind {
                        if t.ranks.iter().any(|r| *r == self.m1.rank || *r == self.m0.rank) {
                            note(format!("input `{}` is laid out in tiles", t.name));
                        }
                        continue;
                    }
                    let defined_in_loop = c.definitions(tensor).all(|(id, _)| self.in_loop[id.index()]);
                    if !defined_in_loop {
                        note(format!("the loop reads `{}`, computed outside it", t.name));
                    }
                    let position = t.ranks.iter().position(|r| *r == self.m1.rank);
                    match position {
                        Some(p) if subscripts[p] == Affine::Index(self.m1) || subscripts[p] == plus_one(self.m1) => {}
                        _ => note(format!("the loop reads `{}` at another step than the current one", t.name)),
                    }
                }
            } else {
                let loop_ranks = self.loop_ranks();
                if indices.iter().any(|x| loop_ranks.contains(&x.rank)) {
                    note("an Einsum outside the streamed loop indexes the streamed rank".into());
                }
                for (tensor, subscripts) in einsum.reads() {
                    let t = c.tensor(tensor);
                    if let TensorKind::Input { .. } = t.kind {
                        if t.ranks.iter().any(|r| loop_ranks.contains(r)) {
                            note(format!(
                                "`{}` reads input `{}` after the streamed loop",
                                c.tensor(einsum.target).name,
                                t.name
                            ));
                        }
                    } else if self.is_running(tensor) {
                        let position = t.ranks.iter().position(|r| *r == self.m1.rank).expect("iterative");
                        if subscripts[position] != Affine::Extent(self.m1.rank) {
                            note(format!("`{}` is read before its last iterate after the loop", t.name));
                        }
                    } else if c.definitions(tensor).any(|(id, _)| self.in_loop[id.index()]) {
                        note(format!("`{}` of the streamed loop is read after it", t.name));
                    }
                }
            }
            if let Some(problem) = problem {
                return Err(format!("{problem} (in `{label}`)"));
            }
        }
        if c.outputs.iter().any(|o| c.definitions(o.tensor).any(|(id, _)| self.in_loop[id.index()])) {
            return Err("an output is computed in the streamed loop".into());
        }
        Ok(())
    }

    /// Whether `subscripts` of a running tensor read its iterate at `m1` (`false`: at `m1 + 1`).
    fn is_old(&self, tensor: TensorId, subscripts: &[Affine]) -> Option<bool> {
        let position = self.cascade.tensor(tensor).ranks.iter().position(|r| *r == self.m1.rank)?;
        if subscripts[position] == Affine::Index(self.m1) {
            Some(true)
        } else if subscripts[position] == plus_one(self.m1) {
            Some(false)
        } else {
            None
        }
    }

    /// The indices of a running tensor's point, without its iterative position; all bare.
    fn point(&self, tensor: TensorId, subscripts: &[Affine]) -> Result<Vec<Index>, String> {
        let t = self.cascade.tensor(tensor);
        subscripts
            .iter()
            .zip(&t.ranks)
            .filter(|(_, r)| **r != self.m1.rank)
            .map(|(s, _)| s.as_index().ok_or_else(|| format!("`{}` is read at a computed coordinate", t.name)))
            .collect()
    }

    /// The value class of `expr` in the loop (see `Class`).
    fn class(&self, expr: &Expr, extremes: &[TensorId]) -> Result<Class, String> {
        let c = self.cascade;
        match expr {
            Expr::Const(_) | Expr::Param(_) | Expr::Extent(_) | Expr::Index(_) => Ok(Class::FREE),
            Expr::Access { tensor, subscripts } => {
                let t = c.tensor(*tensor);
                if matches!(t.kind, TensorKind::Input { .. }) {
                    return Ok(Class::FREE);
                }
                if self.is_running(*tensor) {
                    if extremes.contains(tensor) {
                        return Err(format!("the running extremum `{}` is used as a value", t.name));
                    }
                    if self.is_old(*tensor, subscripts) != Some(true) {
                        return Err(format!("`{}` is read at its next iterate within the loop", t.name));
                    }
                    self.point(*tensor, subscripts)?;
                    return Ok(Class { sums: vec![*tensor], ..Class::FREE });
                }
                let (_, definition) = self.definition(*tensor).expect("defined");
                let class = self.class(&definition.body, extremes)?;
                if class.is_free() {
                    return Ok(class);
                }
                let same: Vec<Affine> = definition.lhs_indices().map(Affine::Index).collect();
                if *subscripts != same[..] {
                    return Err(format!("`{}` is read at other indices than it binds", t.name));
                }
                for cond in &definition.filter {
                    if !self.class(&cond.lhs, extremes)?.is_free() || !self.class(&cond.rhs, extremes)?.is_free() {
                        return Err(format!("`{}` is filtered by a running value", t.name));
                    }
                }
                Ok(class)
            }
            Expr::Unary(UnaryOp::Exp, arg) => {
                let (old, new, anchor) = self.exponent(arg, extremes)?;
                Ok(Class { old, new, anchor, sums: vec![] })
            }
            Expr::Unary(UnaryOp::Neg, arg) => self.class(arg, extremes),
            Expr::Unary(op, arg) => {
                let class = self.class(arg, extremes)?;
                if class.is_free() {
                    Ok(class)
                } else {
                    Err(format!("`{}` of a running value", op.name()))
                }
            }
            Expr::Binary(op, a, b) => {
                let (x, y) = (self.class(a, extremes)?, self.class(b, extremes)?);
                match op {
                    BinaryOp::Mul => x.times(y),
                    BinaryOp::Div if y.is_free() => Ok(x),
                    BinaryOp::Div => Err("a division by a running value".into()),
                    _ if x == y => Ok(x),
                    _ => Err(format!("`{}` of values that scale differently", print_op(*op))),
                }
            }
            Expr::Reduce { op, indices, filter, body } => {
                for cond in filter {
                    if !self.class(&cond.lhs, extremes)?.is_free() || !self.class(&cond.rhs, extremes)?.is_free() {
                        return Err("a reduction filtered by a running value".into());
                    }
                }
                let class = self.class(body, extremes)?;
                if *op != ReduceOp::Sum && !class.sums.is_empty() {
                    return Err("a maximum over running sums".into());
                }
                let mentions = |point: &[Index]| point.iter().any(|i| indices.contains(i));
                if class.anchor.as_ref().is_some_and(|(_, point)| mentions(point)) {
                    return Err("a reduction over the running maximum's own indices".into());
                }
                Ok(class)
            }
        }
    }

    /// `expr` as `old * RM[m1] + new * RM[m1 + 1] + (free)`.
    #[allow(clippy::type_complexity)]
    fn exponent(
        &self,
        expr: &Expr,
        extremes: &[TensorId],
    ) -> Result<(i32, i32, Option<(TensorId, Vec<Index>)>), String> {
        match expr {
            Expr::Access { tensor, subscripts } if extremes.contains(tensor) => {
                let point = self.point(*tensor, subscripts)?;
                match self.is_old(*tensor, subscripts) {
                    Some(true) => Ok((1, 0, Some((*tensor, point)))),
                    Some(false) => Ok((0, 1, Some((*tensor, point)))),
                    None => Err("a running maximum read at another step".into()),
                }
            }
            Expr::Binary(op @ (BinaryOp::Add | BinaryOp::Sub), a, b) => {
                let (o1, n1, a1) = self.exponent(a, extremes)?;
                let (o2, n2, a2) = self.exponent(b, extremes)?;
                let sign = if *op == BinaryOp::Sub { -1 } else { 1 };
                let anchor = match (a1, a2) {
                    (Some(x), Some(y)) if x != y => return Err("two running maxima in one exponent".into()),
                    (x, y) => x.or(y),
                };
                let (old, new) = (o1 + sign * o2, n1 + sign * n2);
                Ok((old, new, if old == 0 && new == 0 { None } else { anchor }))
            }
            Expr::Unary(UnaryOp::Neg, a) => {
                let (old, new, anchor) = self.exponent(a, extremes)?;
                Ok((-old, -new, anchor))
            }
            _ => {
                if self.class(expr, extremes)?.is_free() {
                    Ok((0, 0, None))
                } else {
                    Err("an exponent that is not linear in the running maximum".into())
                }
            }
        }
    }

    /// Whether `expr` is the identity of `op` (0 for a sum) at a step whose tile lies wholly
    /// past the end: a reduction over the within-tile index.
    fn vanishes(&self, expr: &Expr, op: ReduceOp) -> bool {
        match expr {
            Expr::Access { tensor, .. } => match self.definition(*tensor) {
                Some((id, definition)) if self.in_loop[id.index()] && !self.is_running(*tensor) => {
                    definition.filter.is_empty() && self.vanishes(&definition.body, op)
                }
                _ => false,
            },
            // A reduction of identities is the identity too.
            Expr::Reduce { op: reducer, indices, body, .. } => {
                *reducer == op && (indices.contains(&self.m0) || self.vanishes(body, op))
            }
            Expr::Binary(BinaryOp::Add, a, b) if op == ReduceOp::Sum => self.vanishes(a, op) && self.vanishes(b, op),
            Expr::Binary(BinaryOp::Mul, a, b) if op == ReduceOp::Sum => self.vanishes(a, op) || self.vanishes(b, op),
            Expr::Binary(BinaryOp::Div, a, _) if op == ReduceOp::Sum => self.vanishes(a, op),
            _ => false,
        }
    }

    /// Every running tensor and how it merges.
    fn running(&self) -> Result<Vec<Running>, String> {
        let c = self.cascade;
        let init_of = |tensor: TensorId| -> Result<f64, String> {
            let (_, init) = c.definitions(tensor).find(|(_, e)| e.is_initial()).ok_or("no initial value")?;
            constant(&init.body)
                .filter(|_| init.filter.is_empty())
                .ok_or_else(|| format!("the initial value of `{}` is not a constant", c.tensor(tensor).name))
        };
        let recurrence = |tensor: TensorId| {
            c.einsums.iter().find(|e| e.target == tensor && e.recurrence_index().is_some()).expect("running")
        };
        let is_self_old = |tensor: TensorId, expr: &Expr| -> bool {
            let Expr::Access { tensor: t, subscripts } = expr else { return false };
            if *t != tensor || self.is_old(tensor, subscripts) != Some(true) {
                return false;
            }
            let lhs: Vec<Index> = recurrence(tensor).lhs_indices().filter(|i| *i != self.m1).collect();
            self.point(tensor, subscripts).is_ok_and(|p| p == lhs)
        };
        // The extrema first: the sums' classes refer to them.
        let mut extremes = Vec::new();
        let mut found = Vec::new();
        for &tensor in &self.running_ids {
            let rec = recurrence(tensor);
            let position = match c.tensor(tensor).kind {
                TensorKind::Defined { iterative: Some(p) } => p,
                _ => unreachable!("a recurrence's target is iterative"),
            };
            if !rec.filter.is_empty() {
                return Err(format!("the recurrence of `{}` is filtered", c.tensor(tensor).name));
            }
            if let Expr::Binary(op @ (BinaryOp::Max | BinaryOp::Min), a, b) = &rec.body {
                let other = if is_self_old(tensor, a) {
                    b
                } else if is_self_old(tensor, b) {
                    a
                } else {
                    continue;
                };
                let reducer = if *op == BinaryOp::Max { ReduceOp::Max } else { ReduceOp::Min };
                let free = self.class(other, &[]).is_ok_and(|k| k.is_free())
                    && !reads_any(other, &self.running_ids, &|id| self.definition(id).map(|(_, e)| e));
                if free && self.vanishes(other, reducer) {
                    extremes.push(tensor);
                    found.push(Running { tensor, position, kind: Kind::Extremum(*op), init: init_of(tensor)? });
                }
            }
        }
        for &tensor in &self.running_ids {
            if extremes.contains(&tensor) {
                continue;
            }
            let name = &c.tensor(tensor).name;
            let rec = recurrence(tensor);
            let position = match c.tensor(tensor).kind {
                TensorKind::Defined { iterative: Some(p) } => p,
                _ => unreachable!("a recurrence's target is iterative"),
            };
            let mut addends = Vec::new();
            rec.body.operands(BinaryOp::Add, &mut addends);
            let mut carried = None;
            let mut rest = Vec::new();
            for addend in addends {
                let class = self.class(addend, &extremes).map_err(|e| format!("`{name}` does not merge: {e}"))?;
                if class.sums.is_empty() {
                    rest.push((addend, class));
                } else if class.sums == [tensor] && carried.is_none() {
                    carried = Some((addend, class));
                } else {
                    return Err(format!("`{name}` does not merge: its step reads other running sums"));
                }
            }
            let Some((carried, carried_class)) = carried else {
                return Err(format!("`{name}` does not merge: its step does not add to its last iterate"));
            };
            if init_of(tensor)? != 0.0 {
                return Err(format!("`{name}` does not merge: it does not start at 0"));
            }
            if rest.iter().any(|(addend, _)| !self.vanishes(addend, ReduceOp::Sum)) {
                return Err(format!("`{name}` does not merge: a step past the last key would change it"));
            }
            let kind = if is_self_old(tensor, carried) && rest.iter().all(|(_, class)| class.is_free()) {
                Kind::Sum
            } else {
                let Some((by, point)) = carried_class.anchor.clone() else {
                    return Err(format!("`{name}` does not merge: its step scales it by a plain value"));
                };
                let lhs: Vec<Index> = rec.lhs_indices().filter(|i| *i != self.m1).collect();
                let scaled = Class { old: 0, new: -1, anchor: Some((by, point.clone())), sums: vec![] };
                if (carried_class.old, carried_class.new) != (1, -1)
                    || rest.iter().any(|(_, class)| *class != scaled)
                    || point.iter().any(|i| !lhs.contains(i))
                {
                    return Err(format!(
                        "`{name}` does not merge: its step is not `X + {name} * exp(RM_old - RM_new)` with X scaled by `exp(-RM_new)`"
                    ));
                }
                Kind::Rescaled { by, point }
            };
            found.push(Running { tensor, position, kind, init: 0.0 });
        }
        found.sort_by_key(|r| r.tensor);
        Ok(found)
    }
}

fn print_op(op: BinaryOp) -> &'static str {
    match op {
        BinaryOp::Add => "+",
        BinaryOp::Sub => "-",
        BinaryOp::Mul => "*",
        BinaryOp::Div => "/",
        BinaryOp::Max => "max",
        BinaryOp::Min => "min",
    }
}

/// Whether `expr` reads one of `tensors`, directly or through the definitions `definition` gives.
fn reads_any<'e>(expr: &Expr, tensors: &[TensorId], definition: &dyn Fn(TensorId) -> Option<&'e Einsum>) -> bool {
    expr.accesses().iter().any(|(t, _)| {
        tensors.contains(t)
            || definition(*t).is_some_and(|e| {
                reads_any(&e.body, tensors, definition)
                    || e.filter
                        .iter()
                        .any(|c| reads_any(&c.lhs, tensors, definition) || reads_any(&c.rhs, tensors, definition))
            })
    })
}

/// A fresh name: `base`, or `base` with a number appended, that `taken` does not hold.
fn fresh(base: &str, taken: &mut Vec<String>) -> String {
    let mut name = base.to_string();
    let mut n = 1;
    while taken.contains(&name) {
        name = format!("{base}{n}");
        n += 1;
    }
    taken.push(name.clone());
    name
}

/// Rewrites every rank id in an Einsum (indices, extents, subscripts).
struct RankMap<'m>(&'m dyn Fn(RankId) -> RankId);

impl RankMap<'_> {
    fn index(&self, i: Index) -> Index {
        Index { rank: (self.0)(i.rank), primes: i.primes }
    }

    fn affine(&self, a: &Affine) -> Affine {
        match a {
            Affine::Const(v) => Affine::Const(*v),
            Affine::Index(i) => Affine::Index(self.index(*i)),
            Affine::Extent(r) => Affine::Extent((self.0)(*r)),
            Affine::Add(x, y) => Affine::Add(Box::new(self.affine(x)), Box::new(self.affine(y))),
            Affine::Sub(x, y) => Affine::Sub(Box::new(self.affine(x)), Box::new(self.affine(y))),
            Affine::Mul(x, y) => Affine::Mul(Box::new(self.affine(x)), Box::new(self.affine(y))),
            Affine::Neg(x) => Affine::Neg(Box::new(self.affine(x))),
        }
    }

    fn cond(&self, cond: &Cond) -> Cond {
        Cond { lhs: self.expr(&cond.lhs), op: cond.op, rhs: self.expr(&cond.rhs) }
    }

    fn expr(&self, e: &Expr) -> Expr {
        match e {
            Expr::Const(_) | Expr::Param(_) => e.clone(),
            Expr::Extent(r) => Expr::Extent((self.0)(*r)),
            Expr::Index(i) => Expr::Index(self.index(*i)),
            Expr::Access { tensor, subscripts } => {
                Expr::Access { tensor: *tensor, subscripts: subscripts.iter().map(|s| self.affine(s)).collect() }
            }
            Expr::Unary(op, a) => Expr::Unary(*op, Box::new(self.expr(a))),
            Expr::Binary(op, a, b) => Expr::Binary(*op, Box::new(self.expr(a)), Box::new(self.expr(b))),
            Expr::Reduce { op, indices, filter, body } => Expr::Reduce {
                op: *op,
                indices: indices.iter().map(|i| self.index(*i)).collect(),
                filter: filter.iter().map(|c| self.cond(c)).collect(),
                body: Box::new(self.expr(body)),
            },
        }
    }

    fn einsum(&self, e: &Einsum) -> Einsum {
        Einsum {
            target: e.target,
            lhs: e
                .lhs
                .iter()
                .map(|l| match l {
                    Lhs::Index(i) => Lhs::Index(self.index(*i)),
                    Lhs::Next(i) => Lhs::Next(self.index(*i)),
                    Lhs::Initial => Lhs::Initial,
                })
                .collect(),
            body: self.expr(&e.body),
            filter: e.filter.iter().map(|c| self.cond(c)).collect(),
        }
    }
}

/// Rewrites the tensor ids of every access in an expression by `map` (which may also change
/// the subscripts).
fn map_accesses(e: &Expr, map: &mut dyn FnMut(TensorId, &[Affine]) -> Expr) -> Expr {
    match e {
        Expr::Const(_) | Expr::Param(_) | Expr::Extent(_) | Expr::Index(_) => e.clone(),
        Expr::Access { tensor, subscripts } => map(*tensor, subscripts),
        Expr::Unary(op, a) => Expr::Unary(*op, Box::new(map_accesses(a, map))),
        Expr::Binary(op, a, b) => Expr::Binary(*op, Box::new(map_accesses(a, map)), Box::new(map_accesses(b, map))),
        Expr::Reduce { op, indices, filter, body } => Expr::Reduce {
            op: *op,
            indices: indices.clone(),
            filter: filter
                .iter()
                .map(|c| Cond { lhs: map_accesses(&c.lhs, map), op: c.op, rhs: map_accesses(&c.rhs, map) })
                .collect(),
            body: Box::new(map_accesses(body, map)),
        },
    }
}

/// Keeps the ranks `keep` says, renumbered in order, throughout a cascade.
fn renumber_ranks(cascade: &mut Cascade, keep: &[bool]) {
    let mut new_ids = Vec::new();
    let mut next = 0;
    for k in keep {
        new_ids.push(RankId::new(next));
        if *k {
            next += 1;
        }
    }
    let lookup = |r: RankId| new_ids[r.index()];
    let map = RankMap(&lookup);
    let ranks = std::mem::take(&mut cascade.ranks);
    cascade.ranks = ranks
        .into_iter()
        .zip(keep)
        .filter(|(_, k)| **k)
        .map(|(mut rank, _)| {
            if let Extent::Split { whole, tile } = rank.extent {
                rank.extent = Extent::Split { whole: lookup(whole), tile: lookup(tile) };
            }
            rank
        })
        .collect();
    for tensor in &mut cascade.tensors {
        tensor.ranks = tensor.ranks.iter().map(|r| lookup(*r)).collect();
    }
    cascade.einsums = cascade.einsums.iter().map(|e| map.einsum(e)).collect();
}

impl Analysis<'_> {
    /// Whether an access in the loop is undefined at every point of a tile past the end: an
    /// input read at `m1 * M0 + m0` along the whole rank, or a tile tensor that is.
    fn restricted_read(&self, tensor: TensorId, subscripts: &[Affine], restricted: &[TensorId]) -> bool {
        let t = self.cascade.tensor(tensor);
        let pair = Affine::Add(
            Box::new(Affine::Mul(Box::new(Affine::Index(self.m1)), Box::new(Affine::Extent(self.m0.rank)))),
            Box::new(Affine::Index(self.m0)),
        );
        match t.kind {
            TensorKind::Input { .. } => t.ranks.iter().zip(subscripts).any(|(r, s)| *r == self.whole && *s == pair),
            TensorKind::Defined { .. } => {
                restricted.contains(&tensor)
                    && t.ranks.iter().zip(subscripts).all(|(r, s)| {
                        (*r != self.m1.rank || *s == Affine::Index(self.m1))
                            && (*r != self.m0.rank || *s == Affine::Index(self.m0))
                    })
            }
        }
    }

    /// Whether some access of `expr` outside its reductions is restricted.
    fn restricted_outside_reductions(&self, expr: &Expr, restricted: &[TensorId]) -> bool {
        match expr {
            Expr::Access { tensor, subscripts } => self.restricted_read(*tensor, subscripts, restricted),
            Expr::Unary(_, a) => self.restricted_outside_reductions(a, restricted),
            Expr::Binary(_, a, b) => {
                self.restricted_outside_reductions(a, restricted) || self.restricted_outside_reductions(b, restricted)
            }
            _ => false,
        }
    }

    /// The chunk cascade: ranks `MC` and `C = M / MC` before the tile rank, which becomes
    /// `M1 = MC / M0`; every tensor of the loop gets the chunk index first.
    fn chunk_cascade(&self, running: &[Running]) -> Result<Cascade, String> {
        let c = self.cascade;
        let m1_position = self.m1.rank.index();
        let mut names: Vec<String> = c.ranks.iter().map(|r| r.name.clone()).collect();
        let whole_name = c.rank(self.whole).name.clone();
        let size_name = fresh(&format!("{whole_name}C"), &mut names);
        let chunk_name = fresh("C", &mut names);
        // Old rank r goes to r, or r + 2 from the tile rank on.
        let shift = |r: RankId| if r.index() >= m1_position { RankId::new(r.index() + 2) } else { r };
        let size = RankId::new(m1_position);
        let chunk_rank = RankId::new(m1_position + 1);
        let map = RankMap(&shift);
        let mut out = Cascade {
            name: format!("{}_chunks", c.name),
            ranks: Vec::new(),
            params: c.params.clone(),
            tensors: Vec::new(),
            einsums: Vec::new(),
            outputs: Vec::new(),
        };
        for (i, rank) in c.ranks.iter().enumerate() {
            if i == m1_position {
                out.ranks.push(Rank { name: size_name.clone(), extent: Extent::Fixed(self.chunk) });
                out.ranks
                    .push(Rank { name: chunk_name.clone(), extent: Extent::Split { whole: self.whole, tile: size } });
            }
            let mut rank = rank.clone();
            rank.extent = match rank.extent {
                Extent::Split { .. } if i == m1_position => Extent::Split { whole: size, tile: self.m0.rank },
                Extent::Split { whole, tile } => Extent::Split { whole: shift(whole), tile: shift(tile) },
                other => other,
            };
            out.ranks.push(rank);
        }
        let m1 = map.index(self.m1);
        let chunk = Index { rank: chunk_rank, primes: 0 };
        // The tensors: the inputs the loop reads, and the loop's tensors with the chunk first.
        let mut tensor_ids: BTreeMap<TensorId, TensorId> = BTreeMap::new();
        let loop_reads: Vec<TensorId> = c
            .einsums
            .iter()
            .enumerate()
            .filter(|(i, _)| self.in_loop[*i])
            .flat_map(|(_, e)| e.reads().into_iter().map(|(t, _)| t).chain([e.target]))
            .collect();
        for (i, tensor) in c.tensors.iter().enumerate() {
            let id = TensorId::new(i);
            if !loop_reads.contains(&id) {
                continue;
            }
            let mut tensor = tensor.clone();
            tensor.ranks = tensor.ranks.iter().map(|r| shift(*r)).collect();
            if let TensorKind::Defined { iterative } = tensor.kind {
                tensor.ranks.insert(0, chunk_rank);
                tensor.kind = TensorKind::Defined { iterative: iterative.map(|p| p + 1) };
            }
            tensor_ids.insert(id, TensorId::new(out.tensors.len()));
            out.tensors.push(tensor);
        }
        // The global tile of `m1` in chunk `c`: `c * M1 + m1`.
        let global_tile = Affine::Add(
            Box::new(Affine::Mul(Box::new(Affine::Index(chunk)), Box::new(Affine::Extent(m1.rank)))),
            Box::new(Affine::Index(m1)),
        );
        fn global_index(e: &Expr, m1: Index, chunk: Index) -> Expr {
            let global = Expr::Binary(
                BinaryOp::Add,
                Box::new(Expr::Binary(BinaryOp::Mul, Box::new(Expr::Index(chunk)), Box::new(Expr::Extent(m1.rank)))),
                Box::new(Expr::Index(m1)),
            );
            match e {
                Expr::Index(i) if *i == m1 => global,
                Expr::Unary(op, a) => Expr::Unary(*op, Box::new(global_index(a, m1, chunk))),
                Expr::Binary(op, a, b) => {
                    Expr::Binary(*op, Box::new(global_index(a, m1, chunk)), Box::new(global_index(b, m1, chunk)))
                }
                Expr::Reduce { op, indices, filter, body } => Expr::Reduce {
                    op: *op,
                    indices: indices.clone(),
                    filter: filter
                        .iter()
                        .map(|c| Cond {
                            lhs: global_index(&c.lhs, m1, chunk),
                            op: c.op,
                            rhs: global_index(&c.rhs, m1, chunk),
                        })
                        .collect(),
                    body: Box::new(global_index(body, m1, chunk)),
                },
                other => other.clone(),
            }
        }
        // The point lies before the end: `(c * M1 + m1) * M0 + m0 < M`.
        let inside = {
            let cond = map.cond(&self.pair_inside());
            Cond { lhs: global_index(&cond.lhs, m1, chunk), op: cond.op, rhs: global_index(&cond.rhs, m1, chunk) }
        };
        let mut restricted: Vec<TensorId> = Vec::new();
        for (i, einsum) in c.einsums.iter().enumerate() {
            if !self.in_loop[i] {
                continue;
            }
            let binds_pair = einsum.lhs.contains(&Lhs::Index(self.m1)) && einsum.lhs.contains(&Lhs::Index(self.m0));
            let needs_filter = binds_pair && !self.restricted_outside_reductions(&einsum.body, &restricted);
            if binds_pair {
                restricted.push(einsum.target);
            }
            // Reductions over the within-tile index whose body is not restricted by a read.
            let filtered_body =
                self.filter_reductions(&einsum.body, &restricted, einsum.lhs.contains(&Lhs::Index(self.m1)));
            let mut rewritten = map.einsum(&Einsum { body: filtered_body, ..einsum.clone() });
            rewritten.target = tensor_ids[&einsum.target];
            rewritten.lhs.insert(0, Lhs::Index(chunk));
            let mut read = |tensor: TensorId, subscripts: &[Affine]| -> Expr {
                let t = c.tensor(tensor);
                let mut subs: Vec<Affine> = subscripts
                    .iter()
                    .zip(&t.ranks)
                    .map(|(s, r)| {
                        if *r == self.m1.rank {
                            s.clone()
                        } else {
                            s.substitute(&|i| (i == m1).then(|| global_tile.clone()))
                        }
                    })
                    .collect();
                if matches!(t.kind, TensorKind::Defined { .. }) {
                    subs.insert(0, Affine::Index(chunk));
                }
                Expr::Access { tensor: tensor_ids[&tensor], subscripts: subs }
            };
            rewritten.body = global_index(&map_accesses(&rewritten.body, &mut read), m1, chunk);
            rewritten.filter = rewritten
                .filter
                .iter()
                .map(|cond| Cond {
                    lhs: global_index(&map_accesses(&cond.lhs, &mut read), m1, chunk),
                    op: cond.op,
                    rhs: global_index(&map_accesses(&cond.rhs, &mut read), m1, chunk),
                })
                .collect();
            if needs_filter {
                rewritten.filter.push(inside.clone());
            }
            out.einsums.push(rewritten);
        }
        // The partial results: every running tensor's last iterate, per chunk.
        let mut taken: Vec<String> = out.tensors.iter().map(|t| t.name.clone()).collect();
        for r in running {
            let source = c.tensor(r.tensor);
            let name = fresh(&format!("{}_C", source.name), &mut taken);
            let mut ranks: Vec<RankId> = source.ranks.iter().map(|x| shift(*x)).collect();
            ranks.remove(r.position);
            ranks.insert(0, chunk_rank);
            let id = TensorId::new(out.tensors.len());
            out.tensors.push(Tensor { name, ranks, kind: TensorKind::Defined { iterative: None } });
            let recurrence =
                c.einsums.iter().find(|e| e.target == r.tensor && e.recurrence_index().is_some()).expect("running");
            let point: Vec<Index> = recurrence.lhs_indices().filter(|i| *i != self.m1).map(|i| map.index(i)).collect();
            let mut subscripts: Vec<Affine> = point.iter().map(|i| Affine::Index(*i)).collect();
            subscripts.insert(r.position, Affine::Extent(m1.rank));
            subscripts.insert(0, Affine::Index(chunk));
            let mut lhs: Vec<Lhs> = point.iter().map(|i| Lhs::Index(*i)).collect();
            lhs.insert(0, Lhs::Index(chunk));
            out.einsums.push(Einsum {
                target: id,
                lhs,
                body: Expr::Access { tensor: tensor_ids[&r.tensor], subscripts },
                filter: vec![],
            });
            out.outputs.push(Output { tensor: id, elem: ElemType::F32 });
        }
        Ok(out)
    }

    /// Adds `m1 * M0 + m0 < M` to the reductions over `m0` (with `m1` bound) whose body reads
    /// nothing restricted, in the original ranks: the chunk's offset comes in when `m1` becomes
    /// the global tile `c * M1 + m1`.
    fn filter_reductions(&self, expr: &Expr, restricted: &[TensorId], m1_bound: bool) -> Expr {
        match expr {
            Expr::Reduce { op, indices, filter, body } => {
                let body = Box::new(self.filter_reductions(body, restricted, m1_bound));
                let mut filter = filter.clone();
                if m1_bound && indices.contains(&self.m0) && !self.restricted_outside_reductions(&body, restricted) {
                    filter.push(self.pair_inside());
                }
                Expr::Reduce { op: *op, indices: indices.clone(), filter, body }
            }
            Expr::Unary(op, a) => Expr::Unary(*op, Box::new(self.filter_reductions(a, restricted, m1_bound))),
            Expr::Binary(op, a, b) => Expr::Binary(
                *op,
                Box::new(self.filter_reductions(a, restricted, m1_bound)),
                Box::new(self.filter_reductions(b, restricted, m1_bound)),
            ),
            other => other.clone(),
        }
    }

    /// `m1 * M0 + m0 < M` in the original ranks (the chunk's offset is added when `m1` becomes
    /// global).
    fn pair_inside(&self) -> Cond {
        Cond {
            lhs: Expr::Binary(
                BinaryOp::Add,
                Box::new(Expr::Binary(
                    BinaryOp::Mul,
                    Box::new(Expr::Index(self.m1)),
                    Box::new(Expr::Extent(self.m0.rank)),
                )),
                Box::new(Expr::Index(self.m0)),
            ),
            op: CmpOp::Lt,
            rhs: Expr::Extent(self.whole),
        }
    }

    /// The merge cascade: the partial results as inputs (chunk first), their merge, then the
    /// Einsums after the loop reading the merged values.
    fn merge_cascade(&self, running: &[Running]) -> Result<(Cascade, Vec<MergeInput>), String> {
        let c = self.cascade;
        let chunk_rank = RankId::new(c.ranks.len());
        let mut out = Cascade {
            name: format!("{}_merge", c.name),
            ranks: c.ranks.clone(),
            params: c.params.clone(),
            tensors: Vec::new(),
            einsums: Vec::new(),
            outputs: Vec::new(),
        };
        let mut names: Vec<String> = c.ranks.iter().map(|r| r.name.clone()).collect();
        out.ranks.push(Rank { name: fresh("C", &mut names), extent: Extent::Symbolic });
        let chunk = Index { rank: chunk_rank, primes: 0 };
        let mut taken: Vec<String> = c.tensors.iter().map(|t| t.name.clone()).collect();
        let mut inputs = Vec::new();
        let mut tensor_ids: BTreeMap<TensorId, TensorId> = BTreeMap::new();
        let tail: Vec<usize> = (0..c.einsums.len()).filter(|i| !self.in_loop[*i]).collect();
        // Original inputs the tail reads.
        let tail_reads: Vec<TensorId> =
            tail.iter().flat_map(|i| c.einsums[*i].reads().into_iter().map(|(t, _)| t)).collect();
        for (position, id) in c.inputs().iter().enumerate() {
            if tail_reads.contains(id) {
                tensor_ids.insert(*id, TensorId::new(out.tensors.len()));
                out.tensors.push(c.tensor(*id).clone());
                inputs.push(MergeInput::Original(position));
            }
        }
        // The partials, then the merged values (named as the running tensors).
        let mut partial_ids = BTreeMap::new();
        for (k, r) in running.iter().enumerate() {
            let source = c.tensor(r.tensor);
            let mut ranks = source.ranks.clone();
            ranks.remove(r.position);
            ranks.insert(0, chunk_rank);
            let name = fresh(&format!("{}_C", source.name), &mut taken);
            partial_ids.insert(r.tensor, TensorId::new(out.tensors.len()));
            out.tensors.push(Tensor { name, ranks, kind: TensorKind::Input { elem: ElemType::F32 } });
            inputs.push(MergeInput::Partial(k));
        }
        let point_of = |r: &Running| -> Vec<Index> {
            let rec =
                c.einsums.iter().find(|e| e.target == r.tensor && e.recurrence_index().is_some()).expect("running");
            rec.lhs_indices().filter(|i| *i != self.m1).collect()
        };
        let access = |tensor: TensorId, first: Option<Index>, point: &[Index]| Expr::Access {
            tensor,
            subscripts: first.iter().chain(point).map(|i| Affine::Index(*i)).collect(),
        };
        let mut merged_ids = BTreeMap::new();
        let mut weights = BTreeMap::new();
        for r in running {
            let source = c.tensor(r.tensor);
            let point = point_of(r);
            let mut ranks = source.ranks.clone();
            ranks.remove(r.position);
            let id = TensorId::new(out.tensors.len());
            out.tensors.push(Tensor {
                name: source.name.clone(),
                ranks,
                kind: TensorKind::Defined { iterative: None },
            });
            merged_ids.insert(r.tensor, id);
            let partial = access(partial_ids[&r.tensor], Some(chunk), &point);
            let body = match &r.kind {
                Kind::Extremum(op) => Expr::Reduce {
                    op: if *op == BinaryOp::Max { ReduceOp::Max } else { ReduceOp::Min },
                    indices: vec![chunk],
                    filter: vec![],
                    body: Box::new(partial),
                },
                Kind::Sum => {
                    Expr::Reduce { op: ReduceOp::Sum, indices: vec![chunk], filter: vec![], body: Box::new(partial) }
                }
                Kind::Rescaled { by, point: anchor_point } => {
                    let weight = *weights.entry(*by).or_insert_with(|| {
                        let by_running = running.iter().find(|x| x.tensor == *by).expect("a running maximum");
                        let by_point = point_of(by_running);
                        let mut ranks = c.tensor(*by).ranks.clone();
                        ranks.remove(by_running.position);
                        ranks.insert(0, chunk_rank);
                        let weight = TensorId::new(out.tensors.len());
                        let name = fresh(&format!("W_{}", c.tensor(*by).name), &mut taken);
                        out.tensors.push(Tensor { name, ranks, kind: TensorKind::Defined { iterative: None } });
                        let mut lhs: Vec<Lhs> = by_point.iter().map(|i| Lhs::Index(*i)).collect();
                        lhs.insert(0, Lhs::Index(chunk));
                        let partial_max = access(partial_ids[by], Some(chunk), &by_point);
                        let filter = if by_running.init == f64::NEG_INFINITY {
                            vec![Cond { lhs: partial_max.clone(), op: CmpOp::Gt, rhs: Expr::Const(f64::NEG_INFINITY) }]
                        } else {
                            vec![]
                        };
                        out.einsums.push(Einsum {
                            target: weight,
                            lhs,
                            body: Expr::Unary(
                                UnaryOp::Exp,
                                Box::new(Expr::Binary(
                                    BinaryOp::Sub,
                                    Box::new(partial_max),
                                    Box::new(access(merged_ids[by], None, &by_point)),
                                )),
                            ),
                            filter,
                        });
                        weight
                    });
                    // The weight's indices are the running maximum's; read it at this tensor's.
                    Expr::Reduce {
                        op: ReduceOp::Sum,
                        indices: vec![chunk],
                        filter: vec![],
                        body: Box::new(Expr::Binary(
                            BinaryOp::Mul,
                            Box::new(partial),
                            Box::new(access(weight, Some(chunk), anchor_point)),
                        )),
                    }
                }
            };
            out.einsums.push(Einsum {
                target: id,
                lhs: point.iter().map(|i| Lhs::Index(*i)).collect(),
                body,
                filter: vec![],
            });
        }
        // The tail, reading the merged values.
        for &i in &tail {
            let einsum = &c.einsums[i];
            tensor_ids.entry(einsum.target).or_insert_with(|| {
                let id = TensorId::new(out.tensors.len());
                out.tensors.push(c.tensor(einsum.target).clone());
                id
            });
        }
        let mut read = |tensor: TensorId, subscripts: &[Affine]| -> Expr {
            if let Some(merged) = merged_ids.get(&tensor) {
                let position = running.iter().find(|r| r.tensor == tensor).expect("running").position;
                let mut subs = subscripts.to_vec();
                subs.remove(position);
                Expr::Access { tensor: *merged, subscripts: subs }
            } else {
                Expr::Access { tensor: tensor_ids[&tensor], subscripts: subscripts.to_vec() }
            }
        };
        for &i in &tail {
            let einsum = &c.einsums[i];
            out.einsums.push(Einsum {
                target: tensor_ids[&einsum.target],
                lhs: einsum.lhs.clone(),
                body: map_accesses(&einsum.body, &mut read),
                filter: einsum
                    .filter
                    .iter()
                    .map(|cond| Cond {
                        lhs: map_accesses(&cond.lhs, &mut read),
                        op: cond.op,
                        rhs: map_accesses(&cond.rhs, &mut read),
                    })
                    .collect(),
            });
        }
        out.outputs = c.outputs.iter().map(|o| Output { tensor: tensor_ids[&o.tensor], elem: o.elem }).collect();
        // Drop the ranks nothing uses any more (the streamed rank and its split, among others).
        let mut used = vec![false; out.ranks.len()];
        for tensor in &out.tensors {
            tensor.ranks.iter().for_each(|r| used[r.index()] = true);
        }
        for einsum in &out.einsums {
            einsum.lhs_indices().for_each(|i| used[i.rank.index()] = true);
            let mut mark = |e: &Expr| match e {
                Expr::Extent(r) => used[r.index()] = true,
                Expr::Index(i) => used[i.rank.index()] = true,
                Expr::Reduce { indices, .. } => indices.iter().for_each(|i| used[i.rank.index()] = true),
                _ => {}
            };
            einsum.body.walk(&mut mark);
            for cond in &einsum.filter {
                cond.lhs.walk(&mut mark);
                cond.rhs.walk(&mut mark);
            }
        }
        for rank in 0..used.len() {
            if let Extent::Split { whole, tile } = out.ranks[rank].extent {
                if used[rank] {
                    used[whole.index()] = true;
                    used[tile.index()] = true;
                }
            }
        }
        renumber_ranks(&mut out, &used);
        Ok((out, inputs))
    }
}
