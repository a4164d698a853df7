//! From extracted e-graph terms back to a Cascade IR, with online sums lowered to split ranks
//! and recurrences (the FlashAttention form of FuseMax Cascade 5).
//!
//! Needs: a saturated e-graph, the best node of every class, and the cascade it came from.
//! Guarantees: a cascade with the same ranks, params, inputs and outputs (names, order, ranks and
//! storage types) whose outputs equal the terms. Every reduction becomes a tensor; element-wise
//! operations stay inline in their readers. An `(rsum m a x)` becomes, with `m = m1 * M0 + m0`:
//! a blocked score `Ba[.., m1, m0]`, a tile maximum `LM`, a running maximum `RM` (iterative along
//! `M1`), a correction `PRM = exp(RM[m1] - RM[m1 + 1])`, shifted scores `SLN`, and for each `x` a
//! tile sum and a running sum read at its final iterate; a maximum of the same (total) scores
//! elsewhere reads the running maximum's final iterate instead of a second pass over the keys. A
//! transcendental function of fewer indices than its Einsum iterates over becomes a tensor of its
//! own, computed once (`computed_again`). Where the source split a rank by hand
//! (`M1 = M / M0`), no rank is tiled again: an online sum over its tile index `m1` is a recurrence
//! along `M1` itself, one tile per step, and one over its within-tile index `m0` is the tile's
//! maximum, then the tile's shifted sum (FuseMax's Cascade 5 over the source's own tiles). The
//! running maximum starts at the lowest finite f32 rather than `-inf`, so that a row with no score
//! so far corrects by `exp(0) = 1` instead of `exp(-inf - -inf) = NaN`.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use egg::{EGraph, Id, Language, Symbol};

use super::lang::{Ein, EinAnalysis};
use crate::ir::*;

/// The lowest finite f32, the running maximum before any score.
pub const NO_MAX_YET: f64 = -3.4028234663852886e38;

pub struct Emitter<'a> {
    egraph: &'a EGraph<Ein, EinAnalysis>,
    best: &'a dyn Fn(Id) -> Ein,
    pub cascade: Cascade,
    /// Original tensors by the class of their term (at their own indices).
    names: &'a HashMap<Id, String>,
    /// Tensors already emitted, by (class, substitution).
    memo: HashMap<(Id, String), TensorId>,
    /// Online-sum groups already emitted: (index, score class, substitution) -> state.
    groups: HashMap<(Symbol, Id, String), OnlineGroup>,
    online: HashMap<(Id, String), Expr>,
    /// Scores shifted by their tile's maximum, by (score class, substitution).
    tile_shifted: HashMap<(Id, String), TensorId>,
    tile: u64,
    counter: usize,
    /// Names kept for the outputs until they are emitted.
    reserved: BTreeSet<String>,
    /// The (index, score class) of every online sum the chosen terms hold: a maximum of the same
    /// total scores is that sum's running maximum at its final iterate, not a second pass.
    online_scores: BTreeSet<(Symbol, Id)>,
    /// The indices the Einsum being emitted iterates over (its left-hand and reduced indices).
    iteration: Vec<Index>,
}

#[derive(Clone)]
struct OnlineGroup {
    /// The shifted scores `SLN[.., m1, m0]`, and its left-hand indices.
    shifted: TensorId,
    shifted_lhs: Vec<Index>,
    correction: TensorId,
    correction_lhs: Vec<Index>,
    running_max: TensorId,
    tile_index: Index,
    /// The within-tile index; none where the recurrence runs along the sum's own index (a tile
    /// rank the source split by hand: each step is one tile).
    inner_index: Option<Index>,
    tile_rank: RankId,
    suffix: String,
}

/// A substitution from term indices to subscripts in the current Einsum.
type Subst = BTreeMap<Symbol, Affine>;

fn subst_key(subst: &Subst, free: &BTreeSet<Symbol>) -> String {
    free.iter().map(|f| format!("{f}={:?};", subst.get(f))).collect()
}

impl<'a> Emitter<'a> {
    pub fn new(
        egraph: &'a EGraph<Ein, EinAnalysis>,
        best: &'a dyn Fn(Id) -> Ein,
        original: &Cascade,
        names: &'a HashMap<Id, String>,
        tile: u64,
        roots: &[Id],
    ) -> Self {
        // Every online sum reachable from the roots through the chosen nodes.
        let mut online_scores = BTreeSet::new();
        let mut seen = BTreeSet::new();
        let mut stack: Vec<Id> = roots.iter().map(|r| egraph.find(*r)).collect();
        while let Some(id) = stack.pop() {
            if !seen.insert(id) {
                continue;
            }
            let node = best(id);
            if let Ein::RSum([k, a, _]) = &node {
                // Only the sums lowered to tiles of their own keep a running maximum that a
                // maximum of the same scores may read.
                if let Some(symbol) = egraph[*k].data.free.iter().next() {
                    let analysis = &egraph.analysis;
                    if analysis.tile_of_inner(*symbol).is_none() && !analysis.is_tile_index(*symbol) {
                        online_scores.insert((*symbol, egraph.find(*a)));
                    }
                }
            }
            stack.extend(node.children().iter().map(|c| egraph.find(*c)));
        }
        let mut cascade = original.clone();
        let reserved = original.outputs.iter().map(|o| original.tensor(o.tensor).name.clone()).collect();
        cascade.tensors.retain(|t| matches!(t.kind, TensorKind::Input { .. }));
        cascade.einsums.clear();
        cascade.outputs.clear();
        Emitter {
            egraph,
            best,
            cascade,
            names,
            memo: HashMap::new(),
            groups: HashMap::new(),
            online: HashMap::new(),
            tile_shifted: HashMap::new(),
            tile,
            counter: 0,
            reserved,
            online_scores,
            iteration: Vec::new(),
        }
    }

    fn free(&self, id: Id) -> BTreeSet<Symbol> {
        self.egraph[id].data.free.clone()
    }

    /// The IR index a term index names (`m'` is rank `M` with one prime).
    fn index(&self, symbol: Symbol) -> Index {
        let text = symbol.as_str();
        let base = text.trim_end_matches('\'');
        let primes = (text.len() - base.len()) as u8;
        let rank = self
            .cascade
            .ranks
            .iter()
            .position(|r| r.name.to_lowercase() == base)
            .map(RankId::new)
            .expect("term indices name ranks of the cascade");
        Index { rank, primes }
    }

    /// Orders indices as their ranks are declared, a split's parts where their whole rank is.
    fn sort_indices(&self, indices: &mut [Index]) {
        let key = |index: &Index| -> (usize, usize, u8) {
            match self.cascade.rank(index.rank).extent {
                Extent::Split { whole, .. } => (whole.index(), 1, index.primes),
                _ => {
                    let is_inner = self
                        .cascade
                        .split_pairs()
                        .iter()
                        .find(|(_, inner, _)| *inner == index.rank)
                        .map(|(_, _, w)| *w);
                    match is_inner {
                        Some(whole) if whole.index() < index.rank.index() => (whole.index(), 2, index.primes),
                        _ => (index.rank.index(), 0, index.primes),
                    }
                }
            }
        };
        indices.sort_by_key(key);
    }

    fn fresh_name(&mut self, base: &str) -> String {
        let reserved = &self.reserved;
        let taken = |c: &Cascade, n: &str| {
            reserved.contains(n)
                || c.tensors.iter().any(|t| t.name == n)
                || c.ranks.iter().any(|r| r.name == n || r.name.to_lowercase() == n)
                || c.params.iter().any(|p| p.name == n)
        };
        if !taken(&self.cascade, base) && !base.is_empty() {
            return base.to_string();
        }
        let mut n = 1;
        loop {
            let candidate = format!("{base}{n}");
            if !taken(&self.cascade, &candidate) {
                return candidate;
            }
            n += 1;
        }
    }

    fn add_tensor(&mut self, name: &str, ranks: Vec<RankId>, iterative: Option<usize>) -> TensorId {
        let name = self.fresh_name(name);
        self.cascade.tensors.push(Tensor { name, ranks, kind: TensorKind::Defined { iterative } });
        TensorId::new(self.cascade.tensors.len() - 1)
    }

    fn push(&mut self, target: TensorId, lhs: Vec<Lhs>, body: Expr, filter: Vec<Cond>) {
        self.cascade.einsums.push(Einsum { target, lhs, body, filter });
    }

    /// The indices of the current Einsum that a term's value depends on under `subst`.
    fn lhs_of(&self, free: &BTreeSet<Symbol>, subst: &Subst) -> Vec<Index> {
        let mut indices: Vec<Index> = Vec::new();
        for symbol in free {
            match subst.get(symbol) {
                Some(affine) => affine.for_each_index(&mut |i| {
                    if !indices.contains(&i) {
                        indices.push(i)
                    }
                }),
                None => {
                    let i = self.index(*symbol);
                    if !indices.contains(&i) {
                        indices.push(i);
                    }
                }
            }
        }
        self.sort_indices(&mut indices);
        indices
    }

    /// Emits an output tensor with its original name and left-hand side.
    pub fn output(&mut self, root: Id, name: &str, lhs: &[Index], elem: ElemType) {
        let ranks = lhs.iter().map(|i| i.rank).collect();
        let subst = Subst::new();
        // The body first: the IR numbers tensors in the order of their first definition.
        let outer = std::mem::replace(&mut self.iteration, lhs.to_vec());
        let (body, filter) = self.definition(root, &subst, lhs);
        self.iteration = outer;
        self.reserved.remove(name);
        let target = self.add_tensor(name, ranks, None);
        self.push(target, lhs.iter().map(|i| Lhs::Index(*i)).collect(), body, filter);
        self.cascade.outputs.push(Output { tensor: target, elem });
    }

    /// The body and output filter of a tensor defined as class `id`: a reduction or filter at
    /// the top becomes the Einsum's own reduction or filter.
    fn definition(&mut self, id: Id, subst: &Subst, lhs: &[Index]) -> (Expr, Vec<Cond>) {
        match (self.best)(id) {
            Ein::Filter([cond, body]) => {
                let (body, mut filter) = self.definition(body, subst, lhs);
                let mut conds = Vec::new();
                self.conds(cond, subst, &mut conds);
                conds.append(&mut filter);
                (body, conds)
            }
            Ein::Sum([k, body]) | Ein::RMax([k, body]) | Ein::RMin([k, body]) => {
                let op = match (self.best)(id) {
                    Ein::Sum(_) => ReduceOp::Sum,
                    Ein::RMax(_) => ReduceOp::Max,
                    _ => ReduceOp::Min,
                };
                (self.reduction(op, k, body, subst, lhs), vec![])
            }
            _ => (self.value(id, subst), vec![]),
        }
    }

    /// A reduction over `k` (and directly nested reductions of the same kind), with the filters
    /// directly under it as the reducer's filter.
    fn reduction(&mut self, op: ReduceOp, k: Id, body: Id, subst: &Subst, lhs: &[Index]) -> Expr {
        let mut indices: Vec<Index> = Vec::new();
        let mut inner = subst.clone();
        let mut k = k;
        let mut body = body;
        loop {
            for symbol in self.free(k) {
                // A reduced index must differ from the left-hand ones and from the other reduced
                // ones: rename it (more primes) where it would clash.
                let mut index = self.index(symbol);
                while lhs.contains(&index) || indices.contains(&index) {
                    index.primes += 1;
                }
                indices.push(index);
                inner.insert(symbol, Affine::Index(index));
            }
            let same_kind = match ((self.best)(body), op) {
                (Ein::Sum([k2, b2]), ReduceOp::Sum)
                | (Ein::RMax([k2, b2]), ReduceOp::Max)
                | (Ein::RMin([k2, b2]), ReduceOp::Min) => Some((k2, b2)),
                _ => None,
            };
            match same_kind {
                Some((k2, b2)) => {
                    k = k2;
                    body = b2;
                }
                None => break,
            }
        }
        let mut filter = Vec::new();
        while let Ein::Filter([cond, rest]) = (self.best)(body) {
            self.conds(cond, &inner, &mut filter);
            body = rest;
        }
        let outer = self.iteration.clone();
        self.iteration.extend(indices.iter().copied());
        let value = self.value(body, &inner);
        self.iteration = outer;
        Expr::Reduce { op, indices, filter, body: Box::new(value) }
    }

    fn conds(&mut self, id: Id, subst: &Subst, out: &mut Vec<Cond>) {
        let node = (self.best)(id);
        let op = match node {
            Ein::And([a, b]) => {
                self.conds(a, subst, out);
                self.conds(b, subst, out);
                return;
            }
            Ein::Lt(_) => CmpOp::Lt,
            Ein::Le(_) => CmpOp::Le,
            Ein::Gt(_) => CmpOp::Gt,
            Ein::Ge(_) => CmpOp::Ge,
            Ein::Eq(_) => CmpOp::Eq,
            _ => CmpOp::Ne,
        };
        let children = node.children();
        let lhs = self.value(children[0], subst);
        let rhs = self.value(children[1], subst);
        out.push(Cond { lhs, op, rhs });
    }

    fn affine(&self, id: Id, subst: &Subst) -> Affine {
        match (self.best)(id) {
            Ein::Num(c) => Affine::Const(c.value() as i64),
            Ein::Index(name) => subst.get(&name.0).cloned().unwrap_or_else(|| Affine::Index(self.index(name.0))),
            Ein::Extent(name) => Affine::Extent(self.cascade.rank_by_name(name.0.as_str()).expect("extent of a rank")),
            Ein::AffAdd([a, b]) => Affine::Add(Box::new(self.affine(a, subst)), Box::new(self.affine(b, subst))),
            Ein::AffSub([a, b]) => Affine::Sub(Box::new(self.affine(a, subst)), Box::new(self.affine(b, subst))),
            Ein::AffMul([a, b]) => Affine::Mul(Box::new(self.affine(a, subst)), Box::new(self.affine(b, subst))),
            Ein::AffNeg(a) => Affine::Neg(Box::new(self.affine(a, subst))),
            other => unreachable!("not a subscript: {other:?}"),
        }
    }

    fn affine_value(affine: &Affine) -> Expr {
        match affine {
            Affine::Const(c) => Expr::Const(*c as f64),
            Affine::Index(i) => Expr::Index(*i),
            Affine::Extent(r) => Expr::Extent(*r),
            Affine::Add(a, b) => {
                Expr::Binary(BinaryOp::Add, Box::new(Self::affine_value(a)), Box::new(Self::affine_value(b)))
            }
            Affine::Sub(a, b) => {
                Expr::Binary(BinaryOp::Sub, Box::new(Self::affine_value(a)), Box::new(Self::affine_value(b)))
            }
            Affine::Mul(a, b) => {
                Expr::Binary(BinaryOp::Mul, Box::new(Self::affine_value(a)), Box::new(Self::affine_value(b)))
            }
            Affine::Neg(a) => Expr::Unary(UnaryOp::Neg, Box::new(Self::affine_value(a))),
        }
    }

    /// Whether class `id` under `subst` is a transcendental function of fewer indices than the
    /// Einsum being emitted iterates over: inline, it would be evaluated again for every value
    /// of the others (`softplus(S[m, p])` in `sum[m](softplus(S[m, p]) * V[f, m])`, once per `f`).
    fn computed_again(&self, id: Id, subst: &Subst) -> bool {
        if !self.expensive(id) || self.iteration.is_empty() {
            return false;
        }
        let free = self.free(id);
        // Already a tensor (another reader needed it): read it rather than compute it again.
        if self.memo.contains_key(&(self.egraph.find(id), subst_key(subst, &free))) {
            return true;
        }
        let needs = self.lhs_of(&free, subst);
        self.iteration.iter().any(|i| !needs.contains(i))
    }

    /// Whether the best term of class `id` evaluates a transcendental function or a division
    /// somewhere inside it (the rest of the term, inline, would be evaluated again beside it:
    /// `max(S, 0) + 1 / (1 - min(S, 0))` is one tensor, not a quotient and two extrema per `f`).
    fn expensive(&self, id: Id) -> bool {
        let node = (self.best)(id);
        match node {
            Ein::Exp(_)
            | Ein::Log(_)
            | Ein::Tanh(_)
            | Ein::Sigmoid(_)
            | Ein::Softplus(_)
            | Ein::Sqrt(_)
            | Ein::Div(_) => true,
            // Reductions and reads are their own tensors or loops already.
            Ein::Sum(_) | Ein::RSum(_) | Ein::RMax(_) | Ein::RMin(_) | Ein::Filter(_) | Ein::In(_) => false,
            _ => node.children().iter().any(|c| self.expensive(*c)),
        }
    }

    /// The value of class `id` as an expression of the current Einsum.
    fn value(&mut self, id: Id, subst: &Subst) -> Expr {
        if self.computed_again(id, subst) {
            // Its own tensor, computed once per point of the indices it needs.
            let (tensor, lhs) = self.tensor(id, subst, None);
            return Expr::Access { tensor, subscripts: lhs.into_iter().map(Affine::Index).collect() };
        }
        let node = (self.best)(id);
        let unary = |op: UnaryOp, this: &mut Self, a: Id| Expr::Unary(op, Box::new(this.value(a, subst)));
        let binary = |op: BinaryOp, this: &mut Self, a: Id, b: Id| {
            let a = this.value(a, subst);
            Expr::Binary(op, Box::new(a), Box::new(this.value(b, subst)))
        };
        match node {
            Ein::Num(c) => Expr::Const(c.value()),
            Ein::Param(name) => Expr::Param(ParamId::new(
                self.cascade.params.iter().position(|p| p.name == name.0.as_str()).expect("a param"),
            )),
            Ein::Extent(name) => Expr::Extent(self.cascade.rank_by_name(name.0.as_str()).expect("a rank")),
            Ein::IndexValue(a) => Self::affine_value(&self.affine(a, subst)),
            Ein::In(children) => {
                let Ein::Tensor(name) = (self.best)(children[0]) else { unreachable!("in starts with a tensor") };
                let tensor = self.cascade.tensor_by_name(name.0.as_str()).expect("an input");
                let subscripts = children[1..].iter().map(|c| self.affine(*c, subst)).collect();
                Expr::Access { tensor, subscripts }
            }
            Ein::Neg(a) => match self.value(a, subst) {
                Expr::Const(c) => Expr::Const(-c),
                v => Expr::Unary(UnaryOp::Neg, Box::new(v)),
            },
            Ein::Exp(a) => unary(UnaryOp::Exp, self, a),
            Ein::Log(a) => unary(UnaryOp::Log, self, a),
            Ein::Sqrt(a) => unary(UnaryOp::Sqrt, self, a),
            Ein::Tanh(a) => unary(UnaryOp::Tanh, self, a),
            Ein::Sigmoid(a) => unary(UnaryOp::Sigmoid, self, a),
            Ein::Softplus(a) => unary(UnaryOp::Softplus, self, a),
            Ein::Relu(a) => unary(UnaryOp::Relu, self, a),
            Ein::Abs(a) => unary(UnaryOp::Abs, self, a),
            Ein::Add([a, b]) => binary(BinaryOp::Add, self, a, b),
            Ein::Sub([a, b]) => binary(BinaryOp::Sub, self, a, b),
            Ein::Mul([a, b]) => binary(BinaryOp::Mul, self, a, b),
            Ein::Div([a, b]) => binary(BinaryOp::Div, self, a, b),
            Ein::Max2([a, b]) => binary(BinaryOp::Max, self, a, b),
            Ein::Min2([a, b]) => binary(BinaryOp::Min, self, a, b),
            Ein::RSum([k, a, x]) if self.is_within_tile(k) => self.tile_local_sum(id, k, a, x, subst),
            Ein::RSum([k, a, x]) => self.online_sum(id, k, a, x, subst),
            Ein::RMax([k, a]) if self.is_running_max(k, a) => self.running_max(k, a, subst),
            Ein::Sum(_) | Ein::RMax(_) | Ein::RMin(_) | Ein::Filter(_) => {
                let (tensor, lhs) = self.tensor(id, subst, None);
                Expr::Access { tensor, subscripts: lhs.into_iter().map(Affine::Index).collect() }
            }
            other => unreachable!("not a value: {other:?}"),
        }
    }

    /// The tensor holding class `id` under `subst`, emitted once; returns it with its indices.
    fn tensor(&mut self, id: Id, subst: &Subst, name: Option<&str>) -> (TensorId, Vec<Index>) {
        let free = self.free(id);
        let lhs = self.lhs_of(&free, subst);
        let key = (self.egraph.find(id), subst_key(subst, &free));
        if let Some(t) = self.memo.get(&key) {
            return (*t, lhs);
        }
        let blocked = free.iter().any(|f| matches!(subst.get(f), Some(a) if a.as_index().is_none()));
        let input_name = match (self.best)(id) {
            Ein::In(children) => match (self.best)(children[0]) {
                Ein::Tensor(t) => Some(t.0.as_str().to_string()),
                _ => None,
            },
            _ => None,
        };
        let base = match (name, self.names.get(&self.egraph.find(id))) {
            (Some(n), _) => n.to_string(),
            (None, None) if input_name.is_some() => format!("B{}", input_name.unwrap_or_default()),
            (None, Some(n)) if blocked => format!("B{n}"),
            (None, Some(n)) => n.clone(),
            (None, None) => match self.filtered_name(id) {
                Some(n) => n,
                None => {
                    self.counter += 1;
                    format!("T{}", self.counter)
                }
            },
        };
        let outer = std::mem::replace(&mut self.iteration, lhs.clone());
        let (body, filter) = self.definition(id, subst, &lhs);
        self.iteration = outer;
        let target = self.add_tensor(&base, lhs.iter().map(|i| i.rank).collect(), None);
        self.push(target, lhs.iter().map(|i| Lhs::Index(*i)).collect(), body, filter);
        self.memo.insert(key, target);
        (target, lhs)
    }

    /// The name of a source tensor whose term is class `id` under a filter (`BQK` where a
    /// reduction took the filter as its own), the first by name if several are.
    fn filtered_name(&self, id: Id) -> Option<String> {
        let class = self.egraph.find(id);
        self.names
            .iter()
            .filter(|(named, _)| match (self.best)(**named) {
                Ein::Filter([_, body]) => self.egraph.find(body) == class,
                _ => false,
            })
            .map(|(_, name)| name.clone())
            .min()
    }

    /// The split of `rank` into tiles, created on first use: (tile rank, within-tile rank).
    fn split(&mut self, rank: RankId) -> (RankId, RankId) {
        if let Some((tile, inner, _)) = self.cascade.split_pairs().into_iter().find(|(_, _, whole)| *whole == rank) {
            if matches!(self.cascade.rank(inner).extent, Extent::Fixed(n) if n == self.tile) {
                return (tile, inner);
            }
        }
        let base = self.cascade.rank(rank).name.clone();
        let fresh = |c: &Cascade, suffix: &str| {
            let mut name = format!("{base}{suffix}");
            while c.ranks.iter().any(|r| r.name == name || r.name.to_lowercase() == name.to_lowercase())
                || c.tensors.iter().any(|t| t.name == name)
            {
                name.push('_');
            }
            name
        };
        let inner_name = fresh(&self.cascade, "0");
        self.cascade.ranks.push(Rank { name: inner_name, extent: Extent::Fixed(self.tile) });
        let inner = RankId::new(self.cascade.ranks.len() - 1);
        let tile_name = fresh(&self.cascade, "1");
        self.cascade.ranks.push(Rank { name: tile_name, extent: Extent::Split { whole: rank, tile: inner } });
        (RankId::new(self.cascade.ranks.len() - 1), inner)
    }

    /// Whether `(rmax k a)` is the maximum an online sum over the same scores keeps running. Only
    /// total scores: a row that a filter empties has the maximum -inf, where the running maximum
    /// stays at `NO_MAX_YET`.
    fn is_running_max(&self, k: Id, a: Id) -> bool {
        let Some(symbol) = self.free(k).iter().next().copied() else { return false };
        self.free(k).len() == 1
            && self.egraph[a].data.total
            && self.online_scores.contains(&(symbol, self.egraph.find(a)))
    }

    /// The online-sum group of `(k, a)` under `subst`, emitted once.
    fn group(&mut self, k_symbol: Symbol, a: Id, subst: &Subst) -> OnlineGroup {
        let a_free = self.free(a);
        let group_key = (k_symbol, self.egraph.find(a), subst_key(subst, &a_free));
        match self.groups.get(&group_key) {
            Some(group) => group.clone(),
            None => {
                let group = self.online_group(k_symbol, a, subst);
                self.groups.insert(group_key, group.clone());
                group
            }
        }
    }

    /// `(rmax k a)` where an online sum over the same scores runs: its running maximum at the
    /// final iterate.
    fn running_max(&mut self, k: Id, a: Id, subst: &Subst) -> Expr {
        let k_symbol = *self.free(k).iter().next().expect("a reduced index");
        let group = self.group(k_symbol, a, subst);
        Expr::Access {
            tensor: group.running_max,
            subscripts: group
                .correction_lhs
                .iter()
                .map(|i| if *i == group.tile_index { Affine::Extent(group.tile_rank) } else { Affine::Index(*i) })
                .collect(),
        }
    }

    /// `(rsum k a x)`: the running-max recurrence, shared by every online sum over the same
    /// scores; returns the read of this sum's final iterate.
    fn online_sum(&mut self, id: Id, k: Id, a: Id, x: Id, subst: &Subst) -> Expr {
        let k_symbol = *self.free(k).iter().next().expect("a reduced index");
        let sum_free = self.free(id);
        let memo_key = (self.egraph.find(id), subst_key(subst, &sum_free));
        if let Some(read) = self.online.get(&memo_key) {
            return read.clone();
        }
        let group = self.group(k_symbol, a, subst);
        let mut blocked = subst.clone();
        let position = match group.inner_index {
            Some(inner) => Affine::Add(
                Box::new(Affine::Mul(Box::new(Affine::Index(group.tile_index)), Box::new(Affine::Extent(inner.rank)))),
                Box::new(Affine::Index(inner)),
            ),
            None => Affine::Index(group.tile_index),
        };
        blocked.insert(k_symbol, position);
        // The tile sum: sum over m0 of SLN * x, indexed by the sum's free indices and m1.
        let x_is_one = matches!((self.best)(x), Ein::Num(c) if c.value() == 1.0);
        let shifted_read = Expr::Access {
            tensor: group.shifted,
            subscripts: group.shifted_lhs.iter().map(|i| Affine::Index(*i)).collect(),
        };
        let term = if x_is_one {
            shifted_read
        } else {
            let xv = self.value(x, &blocked);
            Expr::Binary(BinaryOp::Mul, Box::new(shifted_read), Box::new(xv))
        };
        let mut lhs = self.lhs_of(&sum_free, subst);
        lhs.push(group.tile_index);
        self.sort_indices(&mut lhs);
        let mut x_name = self.summand_name(x);
        // Along a tile rank, each step adds a tile's sum: `RNV` runs over `SLNV`.
        if let (None, Expr::Binary(BinaryOp::Mul, _, summand)) = (group.inner_index, &term) {
            if let Expr::Access { tensor, .. } = &**summand {
                if let Some(rest) = self.cascade.tensor(*tensor).name.strip_prefix("SL") {
                    x_name = rest.to_string();
                }
            }
        }
        let suffix = group.suffix.clone();
        // Each step adds a tile's sum, or (a recurrence along a tile rank itself) its one term.
        let local_read = match group.inner_index {
            Some(inner) => {
                let local = self.add_tensor(&format!("SL{x_name}{suffix}"), lhs.iter().map(|i| i.rank).collect(), None);
                let reduce =
                    Expr::Reduce { op: ReduceOp::Sum, indices: vec![inner], filter: vec![], body: Box::new(term) };
                self.push(local, lhs.iter().map(|i| Lhs::Index(*i)).collect(), reduce, vec![]);
                Expr::Access { tensor: local, subscripts: lhs.iter().map(|i| Affine::Index(*i)).collect() }
            }
            None => term,
        };
        // The running sum, iterative along m1.
        let position = lhs.iter().position(|i| *i == group.tile_index).expect("the tile index");
        let running =
            self.add_tensor(&format!("R{x_name}{suffix}"), lhs.iter().map(|i| i.rank).collect(), Some(position));
        let initial: Vec<Lhs> =
            lhs.iter().map(|i| if *i == group.tile_index { Lhs::Initial } else { Lhs::Index(*i) }).collect();
        self.push(running, initial, Expr::Const(0.0), vec![]);
        let next: Vec<Lhs> =
            lhs.iter().map(|i| if *i == group.tile_index { Lhs::Next(*i) } else { Lhs::Index(*i) }).collect();
        let previous = Expr::Access { tensor: running, subscripts: lhs.iter().map(|i| Affine::Index(*i)).collect() };
        let correction = Expr::Access {
            tensor: group.correction,
            subscripts: group.correction_lhs.iter().map(|i| Affine::Index(*i)).collect(),
        };
        let body = Expr::Binary(
            BinaryOp::Add,
            Box::new(local_read),
            Box::new(Expr::Binary(BinaryOp::Mul, Box::new(previous), Box::new(correction))),
        );
        self.push(running, next, body, vec![]);
        let read = Expr::Access {
            tensor: running,
            subscripts: lhs
                .iter()
                .map(|i| if *i == group.tile_index { Affine::Extent(group.tile_rank) } else { Affine::Index(*i) })
                .collect(),
        };
        self.online.insert(memo_key, read.clone());
        read
    }

    /// The name part of a summand: `D` for 1, `N` and the tensor's name otherwise.
    fn summand_name(&self, x: Id) -> String {
        if matches!((self.best)(x), Ein::Num(c) if c.value() == 1.0) {
            return "D".to_string();
        }
        match self.names.get(&self.egraph.find(x)) {
            Some(n) => format!("N{n}"),
            None => match (self.best)(x) {
                Ein::In(children) => match (self.best)(children[0]) {
                    Ein::Tensor(t) => format!("N{}", t.0),
                    _ => "X".into(),
                },
                _ => "X".into(),
            },
        }
    }

    /// Whether the index class `k` is the within-tile index of a split the source made by hand.
    fn is_within_tile(&self, k: Id) -> bool {
        let free = self.free(k);
        free.len() == 1 && free.iter().all(|i| self.egraph.analysis.tile_of_inner(*i).is_some())
    }

    /// `(rsum k a x)` over the within-tile index of a split the source made by hand (`m0`): tiling
    /// that rank again would make tiles of tiles, and a recurrence along it would meet the last,
    /// ragged tile's invalid points, which a recurrence cannot skip. So it is the tile's maximum,
    /// then the tile's sum shifted by it: two passes over the tile, as the cost counts them.
    fn tile_local_sum(&mut self, id: Id, k: Id, a: Id, x: Id, subst: &Subst) -> Expr {
        let sum_free = self.free(id);
        let memo_key = (self.egraph.find(id), subst_key(subst, &sum_free));
        if let Some(read) = self.online.get(&memo_key) {
            return read.clone();
        }
        let lhs = self.lhs_of(&sum_free, subst);
        let mut inner = subst.clone();
        let mut indices = Vec::new();
        for symbol in self.free(k) {
            let mut index = self.index(symbol);
            while lhs.contains(&index) {
                index.primes += 1;
            }
            indices.push(index);
            inner.insert(symbol, Affine::Index(index));
        }
        // The filters on the scores are the reducer's filter too.
        let mut filter = Vec::new();
        let mut scores = a;
        while let Ein::Filter([cond, rest]) = (self.best)(scores) {
            self.conds(cond, &inner, &mut filter);
            scores = rest;
        }
        let shifted = self.tile_shifted(k, a, subst, &inner);
        let outer = std::mem::replace(&mut self.iteration, lhs.iter().chain(&indices).copied().collect());
        let body = if matches!((self.best)(x), Ein::Num(c) if c.value() == 1.0) {
            shifted
        } else {
            let xv = self.value(x, &inner);
            Expr::Binary(BinaryOp::Mul, Box::new(shifted), Box::new(xv))
        };
        self.iteration = outer;
        let name = format!("SL{}", self.summand_name(x));
        let tensor = self.add_tensor(&name, lhs.iter().map(|i| i.rank).collect(), None);
        let reduce = Expr::Reduce { op: ReduceOp::Sum, indices, filter, body: Box::new(body) };
        self.push(tensor, lhs.iter().map(|i| Lhs::Index(*i)).collect(), reduce, vec![]);
        let read = Expr::Access { tensor, subscripts: lhs.into_iter().map(Affine::Index).collect() };
        self.online.insert(memo_key, read.clone());
        read
    }

    /// The scores of a sum within a hand-made tile shifted by the tile's maximum,
    /// `SLN = exp(a - max[k](a))`, a tensor shared by every such sum over the same scores (so that
    /// `exp` runs once per score, not once per score and value column). `inner` maps the summed
    /// index to the reducer's.
    fn tile_shifted(&mut self, k: Id, a: Id, subst: &Subst, inner: &Subst) -> Expr {
        let a_free = self.free(a);
        let lhs = self.lhs_of(&a_free, inner);
        let key = (self.egraph.find(a), subst_key(inner, &a_free));
        if let Some(tensor) = self.tile_shifted.get(&key) {
            return Expr::Access { tensor: *tensor, subscripts: lhs.into_iter().map(Affine::Index).collect() };
        }
        // The tile maximum: the class of `(rmax k a)` where the e-graph holds one (other readers
        // share its tensor), else a tensor of its own.
        let max = match self.egraph.lookup(Ein::RMax([k, a])) {
            Some(class) => {
                let (tensor, max_lhs) = self.tensor(class, subst, None);
                Expr::Access { tensor, subscripts: max_lhs.into_iter().map(Affine::Index).collect() }
            }
            None => {
                let mut max_free = a_free.clone();
                for index in self.free(k) {
                    max_free.remove(&index);
                }
                let max_lhs = self.lhs_of(&max_free, subst);
                let outer = std::mem::replace(&mut self.iteration, max_lhs.clone());
                let reduce = self.reduction(ReduceOp::Max, k, a, subst, &max_lhs);
                self.iteration = outer;
                let tensor = self.add_tensor("LM", max_lhs.iter().map(|i| i.rank).collect(), None);
                self.push(tensor, max_lhs.iter().map(|i| Lhs::Index(*i)).collect(), reduce, vec![]);
                Expr::Access { tensor, subscripts: max_lhs.into_iter().map(Affine::Index).collect() }
            }
        };
        let mut filter = Vec::new();
        let mut scores = a;
        while let Ein::Filter([cond, rest]) = (self.best)(scores) {
            self.conds(cond, inner, &mut filter);
            scores = rest;
        }
        let outer = std::mem::replace(&mut self.iteration, lhs.clone());
        let score = self.value(scores, inner);
        self.iteration = outer;
        let body = Expr::Unary(UnaryOp::Exp, Box::new(Expr::Binary(BinaryOp::Sub, Box::new(score), Box::new(max))));
        let tensor = self.add_tensor("SLN", lhs.iter().map(|i| i.rank).collect(), None);
        self.push(tensor, lhs.iter().map(|i| Lhs::Index(*i)).collect(), body, filter);
        self.tile_shifted.insert(key, tensor);
        Expr::Access { tensor, subscripts: lhs.into_iter().map(Affine::Index).collect() }
    }

    /// The recurrence of an online sum along a tile rank the source split by hand (`m1`), one
    /// tile per step: the running maximum of the scores, its correction and the shifted scores.
    /// The rules build such a sum only over total scores and summands, so every step is defined.
    fn direct_group(&mut self, k_symbol: Symbol, a: Id, subst: &Subst) -> OnlineGroup {
        let tile_index = self.index(k_symbol);
        let suffix = if self.groups.is_empty() { String::new() } else { (self.groups.len() + 1).to_string() };
        let mut own = subst.clone();
        own.insert(k_symbol, Affine::Index(tile_index));
        let (scores, lhs) = self.tensor(a, &own, None);
        let at = |m1: Affine| -> Vec<Affine> {
            lhs.iter().map(|i| if *i == tile_index { m1.clone() } else { Affine::Index(*i) }).collect()
        };
        let ranks: Vec<RankId> = lhs.iter().map(|i| i.rank).collect();
        let here = Affine::Index(tile_index);
        let after = Affine::Add(Box::new(Affine::Index(tile_index)), Box::new(Affine::Const(1)));
        let score_read = Expr::Access { tensor: scores, subscripts: at(here.clone()) };
        let position = lhs.iter().position(|i| *i == tile_index).expect("the scores depend on the summed index");
        let rm = self.add_tensor(&format!("RM{suffix}"), ranks.clone(), Some(position));
        let initial: Vec<Lhs> =
            lhs.iter().map(|i| if *i == tile_index { Lhs::Initial } else { Lhs::Index(*i) }).collect();
        self.push(rm, initial, Expr::Const(NO_MAX_YET), vec![]);
        let next: Vec<Lhs> =
            lhs.iter().map(|i| if *i == tile_index { Lhs::Next(*i) } else { Lhs::Index(*i) }).collect();
        let rm_here = Expr::Access { tensor: rm, subscripts: at(here) };
        let rm_after = Expr::Access { tensor: rm, subscripts: at(after) };
        self.push(
            rm,
            next,
            Expr::Binary(BinaryOp::Max, Box::new(rm_here.clone()), Box::new(score_read.clone())),
            vec![],
        );
        let own_lhs: Vec<Lhs> = lhs.iter().map(|i| Lhs::Index(*i)).collect();
        let prm = self.add_tensor(&format!("PRM{suffix}"), ranks.clone(), None);
        let shift = Expr::Binary(BinaryOp::Sub, Box::new(rm_here), Box::new(rm_after.clone()));
        self.push(prm, own_lhs.clone(), Expr::Unary(UnaryOp::Exp, Box::new(shift)), vec![]);
        // Each tile's scale: its maximum shifted by the running one.
        let sln = self.add_tensor(&format!("SLM{suffix}"), ranks, None);
        let shifted = Expr::Binary(BinaryOp::Sub, Box::new(score_read), Box::new(rm_after));
        self.push(sln, own_lhs, Expr::Unary(UnaryOp::Exp, Box::new(shifted)), vec![]);
        let tile_rank = tile_index.rank;
        OnlineGroup {
            shifted: sln,
            shifted_lhs: lhs.clone(),
            correction: prm,
            correction_lhs: lhs,
            running_max: rm,
            tile_index,
            inner_index: None,
            tile_rank,
            suffix,
        }
    }

    fn online_group(&mut self, k_symbol: Symbol, a: Id, subst: &Subst) -> OnlineGroup {
        if self.egraph.analysis.is_tile_index(k_symbol) {
            return self.direct_group(k_symbol, a, subst);
        }
        let k_index = self.index(k_symbol);
        let (tile_rank, inner_rank) = self.split(k_index.rank);
        let tile_index = Index { rank: tile_rank, primes: k_index.primes };
        let inner_index = Index { rank: inner_rank, primes: k_index.primes };
        let suffix = if self.groups.is_empty() { String::new() } else { (self.groups.len() + 1).to_string() };
        let mut blocked = subst.clone();
        blocked.insert(
            k_symbol,
            Affine::Add(
                Box::new(Affine::Mul(Box::new(Affine::Index(tile_index)), Box::new(Affine::Extent(inner_rank)))),
                Box::new(Affine::Index(inner_index)),
            ),
        );
        // The blocked scores, as their own tensor.
        let (scores, scores_lhs) = self.tensor(a, &blocked, None);
        let score_read = |lhs: &[Index]| Expr::Access {
            tensor: scores,
            subscripts: lhs.iter().map(|i| Affine::Index(*i)).collect(),
        };
        let row_lhs: Vec<Index> = scores_lhs.iter().copied().filter(|i| *i != inner_index).collect();
        let at = |lhs: &[Index], m1: Affine| -> Vec<Affine> {
            lhs.iter().map(|i| if *i == tile_index { m1.clone() } else { Affine::Index(*i) }).collect()
        };
        let ranks = |lhs: &[Index]| lhs.iter().map(|i| i.rank).collect::<Vec<_>>();
        let lm = self.add_tensor(&format!("LM{suffix}"), ranks(&row_lhs), None);
        let max = Expr::Reduce {
            op: ReduceOp::Max,
            indices: vec![inner_index],
            filter: vec![],
            body: Box::new(score_read(&scores_lhs)),
        };
        self.push(lm, row_lhs.iter().map(|i| Lhs::Index(*i)).collect(), max, vec![]);
        let position = row_lhs.iter().position(|i| *i == tile_index).expect("the tile index");
        let rm = self.add_tensor(&format!("RM{suffix}"), ranks(&row_lhs), Some(position));
        let initial: Vec<Lhs> =
            row_lhs.iter().map(|i| if *i == tile_index { Lhs::Initial } else { Lhs::Index(*i) }).collect();
        self.push(rm, initial, Expr::Const(NO_MAX_YET), vec![]);
        let next: Vec<Lhs> =
            row_lhs.iter().map(|i| if *i == tile_index { Lhs::Next(*i) } else { Lhs::Index(*i) }).collect();
        let here = Affine::Index(tile_index);
        let after = Affine::Add(Box::new(Affine::Index(tile_index)), Box::new(Affine::Const(1)));
        let rm_here = Expr::Access { tensor: rm, subscripts: at(&row_lhs, here.clone()) };
        let rm_after = Expr::Access { tensor: rm, subscripts: at(&row_lhs, after.clone()) };
        let lm_read = Expr::Access { tensor: lm, subscripts: row_lhs.iter().map(|i| Affine::Index(*i)).collect() };
        self.push(rm, next, Expr::Binary(BinaryOp::Max, Box::new(rm_here.clone()), Box::new(lm_read)), vec![]);
        let prm = self.add_tensor(&format!("PRM{suffix}"), ranks(&row_lhs), None);
        let shift = Expr::Binary(BinaryOp::Sub, Box::new(rm_here), Box::new(rm_after.clone()));
        self.push(
            prm,
            row_lhs.iter().map(|i| Lhs::Index(*i)).collect(),
            Expr::Unary(UnaryOp::Exp, Box::new(shift)),
            vec![],
        );
        let sln = self.add_tensor(&format!("SLN{suffix}"), ranks(&scores_lhs), None);
        let rm_after_row = Expr::Access { tensor: rm, subscripts: at(&row_lhs, after) };
        let _ = rm_after;
        let shifted = Expr::Binary(BinaryOp::Sub, Box::new(score_read(&scores_lhs)), Box::new(rm_after_row));
        self.push(
            sln,
            scores_lhs.iter().map(|i| Lhs::Index(*i)).collect(),
            Expr::Unary(UnaryOp::Exp, Box::new(shifted)),
            vec![],
        );
        OnlineGroup {
            shifted: sln,
            shifted_lhs: scores_lhs,
            correction: prm,
            correction_lhs: row_lhs,
            running_max: rm,
            tile_index,
            inner_index: Some(inner_index),
            tile_rank,
            suffix,
        }
    }
}
