//! A generator of random valid cascades, for differential tests and fuzzing.
//!
//! Every generated cascade checks and verifies, and keeps its values finite: element-wise
//! functions are chosen so that they cannot overflow (`tanh`, `sigmoid`, `exp` of a bounded
//! argument, division by `1 + |x|`), and extents are small. It uses ranks fixed and symbolic (and
//! sometimes a split pair), inputs and outputs of every storage type, sum/max/min reductions
//! (implicit and explicit), index values,
//! affine subscripts into split ranks, `where` filters, recurrences and several outputs. The result
//! is `.ein` text from the IR printer, so every failure is a reproducible file.

use crate::ir::*;

/// A small, reproducible generator (SplitMix64).
#[derive(Clone, Debug)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// A generated cascade and the extents to bind its symbolic ranks to.
#[derive(Clone, Debug)]
pub struct Generated {
    pub cascade: Cascade,
    pub bindings: Vec<(String, u64)>,
}

struct Builder<'r> {
    rng: &'r mut Rng,
    c: Cascade,
    /// Ranks that Einsums may bind freely (not the parts of a split).
    plain: Vec<RankId>,
    split: Option<(RankId, RankId, RankId)>,
    /// Primes for the next explicit reduction of the current Einsum: every reduction gets its own
    /// index, so that a filter names exactly one of them.
    next_prime: u8,
}

/// Generates the cascade of seed `seed`.
pub fn generate(seed: u64) -> Generated {
    let mut rng = Rng(seed);
    let mut c = Cascade {
        name: format!("g{seed}"),
        ranks: vec![],
        params: vec![],
        tensors: vec![],
        einsums: vec![],
        outputs: vec![],
    };
    let mut bindings = Vec::new();
    let names = ["A", "B", "C"];
    let rank_count = 1 + rng.below(3);
    for name in &names[..rank_count] {
        if rng.chance(50) {
            let extent = 1 + rng.below(5) as u64;
            c.ranks.push(Rank { name: name.to_string(), extent: Extent::Fixed(extent) });
        } else {
            c.ranks.push(Rank { name: name.to_string(), extent: Extent::Symbolic });
            bindings.push((name.to_string(), 1 + rng.below(7) as u64));
        }
    }
    let plain: Vec<RankId> = (0..rank_count).map(RankId::new).collect();
    let mut split = None;
    if rng.chance(30) {
        // Split the first rank into tiles of 2 or 3.
        let whole = RankId::new(0);
        c.ranks.push(Rank { name: "T0".into(), extent: Extent::Fixed(2 + rng.below(2) as u64) });
        let inner = RankId::new(c.ranks.len() - 1);
        c.ranks.push(Rank { name: "T1".into(), extent: Extent::Split { whole, tile: inner } });
        split = Some((RankId::new(c.ranks.len() - 1), inner, whole));
    }
    if rng.chance(50) {
        c.params.push(Param { name: "w".into(), value: 0.5 + rng.below(4) as f64 * 0.25 });
    }
    let mut b = Builder { rng: &mut rng, c, plain, split, next_prime: 1 };
    let input_count = 1 + b.rng.below(3);
    for n in 0..input_count {
        let ranks = b.random_ranks(1);
        b.c.tensors.push(Tensor { name: format!("X{n}"), ranks, kind: TensorKind::Input { elem: ElemType::F32 } });
    }
    let einsum_count = 1 + b.rng.below(5);
    for n in 0..einsum_count {
        match b.rng.below(100) {
            0..=14 => b.recurrence(n),
            15..=34 => b.softmax(n),
            _ => b.einsum(n),
        }
    }
    // The last one or two defined tensors are the outputs.
    let defined: Vec<TensorId> = (0..b.c.tensors.len())
        .map(TensorId::new)
        .filter(|t| matches!(b.c.tensor(*t).kind, TensorKind::Defined { .. }))
        .collect();
    let outputs = if defined.len() > 1 && b.rng.chance(40) { 2 } else { 1 };
    for t in &defined[defined.len() - outputs..] {
        b.c.outputs.push(Output { tensor: *t, elem: ElemType::F32 });
    }
    // Storage types from a stream of their own, so that the rest of a seed's cascade is what it
    // was before they were drawn: some inputs and outputs f16 or bf16.
    let mut types = Rng(seed ^ 0x5DEE_CE66_D1CE_4E5B);
    let mut narrow = |percent: usize| match types.below(100) {
        n if n < percent / 2 => ElemType::Bf16,
        n if n < percent => ElemType::F16,
        _ => ElemType::F32,
    };
    for tensor in &mut b.c.tensors {
        if let TensorKind::Input { elem } = &mut tensor.kind {
            *elem = narrow(30);
        }
    }
    for output in &mut b.c.outputs {
        output.elem = narrow(30);
    }
    // The checker's form of the same cascade (it folds `-1` and the like), so that printing and
    // checking again is the identity on what is returned.
    let text = crate::print::print_cascade(&b.c);
    let cascade = crate::compile_source(&text)
        .map(|mut kernels| kernels.remove(0))
        .unwrap_or_else(|d| panic!("generated cascade {seed} does not check: {d:?}\n{text}"));
    Generated { cascade, bindings }
}

impl Builder<'_> {
    fn index(rank: RankId) -> Index {
        Index { rank, primes: 0 }
    }

    /// A random set of distinct plain ranks, at least `min`.
    fn random_ranks(&mut self, min: usize) -> Vec<RankId> {
        let mut ranks: Vec<RankId> = self.plain.iter().copied().filter(|_| self.rng.chance(50)).collect();
        while ranks.len() < min {
            let r = *self.rng.pick(&self.plain.clone());
            if !ranks.contains(&r) {
                ranks.push(r);
            }
        }
        ranks
    }

    fn tensors_before(&self) -> Vec<TensorId> {
        (0..self.c.tensors.len()).map(TensorId::new).collect()
    }

    fn einsum(&mut self, n: usize) {
        self.next_prime = 1;
        let lhs_ranks = if self.rng.chance(20) { vec![] } else { self.random_ranks(0) };
        let lhs: Vec<Index> = lhs_ranks.iter().map(|r| Self::index(*r)).collect();
        let use_split = self.split.is_some() && self.rng.chance(40);
        let body = self.expr(&lhs, 2, use_split);
        // Indices read but not on the left are reduced by an explicit sum/max/min.
        let mut free = Vec::new();
        collect_free(&body, &lhs, &mut free);
        let body = if free.is_empty() {
            body
        } else {
            let op = *self.rng.pick(&[ReduceOp::Sum, ReduceOp::Max, ReduceOp::Min]);
            let mut filter = Vec::new();
            if free.len() >= 2 && self.rng.chance(30) {
                filter.push(Cond { lhs: Expr::Index(free[0]), op: CmpOp::Le, rhs: Expr::Index(free[1]) });
            }
            clamp(op, Expr::Reduce { op, indices: free, filter, body: Box::new(body) })
        };
        let mut filter = Vec::new();
        if lhs.len() >= 2 && self.rng.chance(25) {
            filter.push(Cond {
                lhs: Expr::Index(lhs[0]),
                op: *self.rng.pick(&[CmpOp::Le, CmpOp::Ne, CmpOp::Gt]),
                rhs: Expr::Index(lhs[1]),
            });
        }
        let target = TensorId::new(self.c.tensors.len());
        self.c.tensors.push(Tensor {
            name: format!("Y{n}"),
            ranks: lhs_ranks,
            kind: TensorKind::Defined { iterative: None },
        });
        self.c.einsums.push(Einsum { target, lhs: lhs.into_iter().map(Lhs::Index).collect(), body, filter });
    }

    fn define(&mut self, name: String, lhs: &[Index], body: Expr, filter: Vec<Cond>) -> TensorId {
        let target = TensorId::new(self.c.tensors.len());
        let ranks = lhs.iter().map(|i| i.rank).collect();
        self.c.tensors.push(Tensor { name, ranks, kind: TensorKind::Defined { iterative: None } });
        self.c.einsums.push(Einsum { target, lhs: lhs.iter().map(|i| Lhs::Index(*i)).collect(), body, filter });
        target
    }

    fn read(&self, tensor: TensorId, lhs: &[Index]) -> Expr {
        let subscripts = self
            .c
            .tensor(tensor)
            .ranks
            .iter()
            .map(|r| Affine::Index(*lhs.iter().find(|i| i.rank == *r).expect("in scope")))
            .collect();
        Expr::Access { tensor, subscripts }
    }

    /// The textbook softmax-weighted sum along a rank, which the optimizer turns into an online
    /// sum: `S`, its maximum `G`, `N = exp(S - G)`, `D = sum N`, `Y = sum (N / D) * x`, sometimes
    /// with a filter on the scores.
    fn softmax(&mut self, n: usize) {
        self.next_prime = 1;
        let r = *self.rng.pick(&self.plain.clone());
        let mut outer: Vec<Index> = self.random_ranks(0).into_iter().filter(|q| *q != r).map(Self::index).collect();
        outer.truncate(2);
        let mut full = outer.clone();
        full.push(Self::index(r));
        let scores = self.expr(&full, 1, false);
        let mut free = Vec::new();
        collect_free(&scores, &full, &mut free);
        let scores = if free.is_empty() {
            scores
        } else {
            Expr::Reduce { op: ReduceOp::Sum, indices: free, filter: vec![], body: Box::new(scores) }
        };
        let mut filter = Vec::new();
        if let (true, Some(first)) = (self.rng.chance(40), outer.first()) {
            filter.push(Cond { lhs: Expr::Index(Self::index(r)), op: CmpOp::Le, rhs: Expr::Index(*first) });
        }
        let s = self.define(format!("S{n}"), &full, scores, filter);
        let g_body = Expr::Reduce {
            op: ReduceOp::Max,
            indices: vec![Self::index(r)],
            filter: vec![],
            body: Box::new(self.read(s, &full)),
        };
        let g = self.define(format!("G{n}"), &outer, g_body, vec![]);
        let shifted = Expr::Binary(BinaryOp::Sub, Box::new(self.read(s, &full)), Box::new(self.read(g, &outer)));
        let e = self.define(format!("N{n}"), &full, Expr::Unary(UnaryOp::Exp, Box::new(shifted)), vec![]);
        let d_body = Expr::Reduce {
            op: ReduceOp::Sum,
            indices: vec![Self::index(r)],
            filter: vec![],
            body: Box::new(self.read(e, &full)),
        };
        let d = self.define(format!("D{n}"), &outer, d_body, vec![]);
        let x = self.leaf(&full, false);
        let weight = Expr::Binary(BinaryOp::Div, Box::new(self.read(e, &full)), Box::new(self.read(d, &outer)));
        let y_body = Expr::Reduce {
            op: ReduceOp::Sum,
            indices: vec![Self::index(r)],
            filter: vec![],
            body: Box::new(Expr::Binary(BinaryOp::Mul, Box::new(weight), Box::new(x))),
        };
        // The leaf may read indices beyond `full`: those are summed too.
        let mut extra = Vec::new();
        collect_free(&y_body, &outer, &mut extra);
        let y_body = if extra.is_empty() {
            y_body
        } else {
            Expr::Reduce { op: ReduceOp::Sum, indices: extra, filter: vec![], body: Box::new(y_body) }
        };
        self.define(format!("Y{n}"), &outer, y_body, vec![]);
    }

    /// `R[0, ..] = 0; R[r + 1, ..] = R[r, ..] * 0.5 + tanh(x)` along a plain rank.
    fn recurrence(&mut self, n: usize) {
        let along = *self.rng.pick(&self.plain.clone());
        let mut ranks = vec![along];
        for r in self.plain.clone() {
            if r != along && self.rng.chance(40) {
                ranks.push(r);
            }
        }
        let lhs: Vec<Index> = ranks.iter().map(|r| Self::index(*r)).collect();
        let target = TensorId::new(self.c.tensors.len());
        self.c.tensors.push(Tensor {
            name: format!("R{n}"),
            ranks: ranks.clone(),
            kind: TensorKind::Defined { iterative: Some(0) },
        });
        let mut initial = vec![Lhs::Initial];
        initial.extend(lhs[1..].iter().map(|i| Lhs::Index(*i)));
        self.c.einsums.push(Einsum { target, lhs: initial, body: Expr::Const(0.0), filter: vec![] });
        // The step reads only tensors defined before, at the current coordinates.
        let step = self.expr_over(&lhs, 1, target);
        let previous = Expr::Access { tensor: target, subscripts: lhs.iter().map(|i| Affine::Index(*i)).collect() };
        let body = Expr::Binary(
            BinaryOp::Add,
            Box::new(Expr::Binary(BinaryOp::Mul, Box::new(previous), Box::new(Expr::Const(0.5)))),
            Box::new(Expr::Unary(UnaryOp::Tanh, Box::new(step))),
        );
        let mut next = vec![Lhs::Next(lhs[0])];
        next.extend(lhs[1..].iter().map(|i| Lhs::Index(*i)));
        self.c.einsums.push(Einsum { target, lhs: next, body, filter: vec![] });
    }

    /// An expression that reads only tensors before `limit` at exactly the indices `lhs`.
    fn expr_over(&mut self, lhs: &[Index], depth: usize, limit: TensorId) -> Expr {
        let candidates: Vec<TensorId> = (0..limit.index())
            .map(TensorId::new)
            .filter(|t| self.c.tensor(*t).ranks.iter().all(|r| lhs.iter().any(|i| i.rank == *r)))
            .filter(|t| !matches!(self.c.tensor(*t).kind, TensorKind::Defined { iterative: Some(_) }))
            .collect();
        if candidates.is_empty() || depth == 0 {
            return Expr::Index(lhs[0]);
        }
        let t = *self.rng.pick(&candidates);
        let read = Expr::Access {
            tensor: t,
            subscripts: self.c.tensor(t).ranks.iter().map(|r| Affine::Index(Self::index(*r))).collect(),
        };
        if self.rng.chance(50) {
            Expr::Binary(BinaryOp::Add, Box::new(read), Box::new(self.expr_over(lhs, depth - 1, limit)))
        } else {
            read
        }
    }

    /// A random bounded expression; every index it reads is an LHS index or becomes reduced.
    fn expr(&mut self, lhs: &[Index], depth: usize, use_split: bool) -> Expr {
        if depth == 0 || self.rng.chance(30) {
            return self.leaf(lhs, use_split);
        }
        match self.rng.below(6) {
            0 => {
                let f = *self.rng.pick(&[UnaryOp::Tanh, UnaryOp::Sigmoid, UnaryOp::Abs, UnaryOp::Relu, UnaryOp::Neg]);
                Expr::Unary(f, Box::new(self.expr(lhs, depth - 1, use_split)))
            }
            1 => {
                // exp of a bounded argument.
                let inner = Expr::Unary(UnaryOp::Tanh, Box::new(self.expr(lhs, depth - 1, use_split)));
                Expr::Unary(UnaryOp::Exp, Box::new(inner))
            }
            2 => {
                // Division by 1 + |x|: never by zero.
                let a = self.expr(lhs, depth - 1, use_split);
                let b = self.expr(lhs, depth - 1, use_split);
                let denominator = Expr::Binary(
                    BinaryOp::Add,
                    Box::new(Expr::Const(1.0)),
                    Box::new(Expr::Unary(UnaryOp::Abs, Box::new(b))),
                );
                Expr::Binary(BinaryOp::Div, Box::new(a), Box::new(denominator))
            }
            3 => {
                // An explicit reduction over a rank not on the left.
                let others: Vec<RankId> =
                    self.plain.iter().copied().filter(|r| !lhs.iter().any(|i| i.rank == *r)).collect();
                if others.is_empty() {
                    return self.leaf(lhs, use_split);
                }
                let r = *self.rng.pick(&others);
                // A primed index, so that it never shadows a reduction of the plain one.
                let reduced = Index { rank: r, primes: self.next_prime };
                self.next_prime += 1;
                let mut inner_lhs = lhs.to_vec();
                inner_lhs.push(reduced);
                let body = self.expr(&inner_lhs, depth - 1, false);
                let op = *self.rng.pick(&[ReduceOp::Sum, ReduceOp::Max, ReduceOp::Min]);
                let mut filter = Vec::new();
                if !lhs.is_empty() && self.rng.chance(30) {
                    filter.push(Cond { lhs: Expr::Index(reduced), op: CmpOp::Lt, rhs: Expr::Index(lhs[0]) });
                }
                clamp(op, Expr::Reduce { op, indices: vec![reduced], filter, body: Box::new(body) })
            }
            _ => {
                let op = *self.rng.pick(&[BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul, BinaryOp::Max, BinaryOp::Min]);
                let a = self.expr(lhs, depth - 1, use_split);
                let b = self.expr(lhs, depth - 1, use_split);
                Expr::Binary(op, Box::new(a), Box::new(b))
            }
        }
    }

    fn leaf(&mut self, lhs: &[Index], use_split: bool) -> Expr {
        match self.rng.below(10) {
            0 => Expr::Const(*self.rng.pick(&[0.5, -1.0, 2.0, 0.0])),
            1 if !self.c.params.is_empty() => Expr::Param(ParamId::new(0)),
            2 if !lhs.is_empty() => Expr::Index(*self.rng.pick(lhs)),
            _ => {
                let tensors = self.tensors_before();
                let readable: Vec<TensorId> = tensors
                    .into_iter()
                    .filter(|t| !matches!(self.c.tensor(*t).kind, TensorKind::Defined { iterative: Some(_) }))
                    .collect();
                if readable.is_empty() {
                    return Expr::Const(1.0);
                }
                let t = *self.rng.pick(&readable);
                let ranks = self.c.tensor(t).ranks.clone();
                // The innermost index of each rank in scope, else the plain one.
                let index_of = |r: RankId| lhs.iter().rev().find(|i| i.rank == r).copied().unwrap_or(Self::index(r));
                let subscripts = ranks
                    .iter()
                    .map(|r| match (self.split, use_split) {
                        // Read the split rank through its tile pair.
                        (Some((tile, inner, whole)), true) if *r == whole => Affine::Add(
                            Box::new(Affine::Mul(
                                Box::new(Affine::Index(Self::index(tile))),
                                Box::new(Affine::Extent(inner)),
                            )),
                            Box::new(Affine::Index(Self::index(inner))),
                        ),
                        _ if self.rng.chance(10) => {
                            Affine::Add(Box::new(Affine::Index(index_of(*r))), Box::new(Affine::Const(1)))
                        }
                        _ => Affine::Index(index_of(*r)),
                    })
                    .collect();
                Expr::Access { tensor: t, subscripts }
            }
        }
    }
}

/// A maximum or minimum over an empty set is infinite; clamped, the values stay finite (and the
/// cascades free of `inf - inf`).
fn clamp(op: ReduceOp, reduction: Expr) -> Expr {
    if op == ReduceOp::Sum {
        return reduction;
    }
    let low = Expr::Binary(BinaryOp::Max, Box::new(reduction), Box::new(Expr::Const(-1e6)));
    Expr::Binary(BinaryOp::Min, Box::new(low), Box::new(Expr::Const(1e6)))
}

/// Indices the expression uses outside any reducer that binds them, and not in `lhs`.
fn collect_free(expr: &Expr, lhs: &[Index], out: &mut Vec<Index>) {
    fn walk(expr: &Expr, bound: &mut Vec<Index>, out: &mut Vec<Index>) {
        let note = |i: Index, bound: &Vec<Index>, out: &mut Vec<Index>| {
            if !bound.contains(&i) && !out.contains(&i) {
                out.push(i);
            }
        };
        match expr {
            Expr::Index(i) => note(*i, bound, out),
            Expr::Access { subscripts, .. } => {
                for s in subscripts {
                    let mut found = Vec::new();
                    s.for_each_index(&mut |i| found.push(i));
                    for i in found {
                        note(i, bound, out);
                    }
                }
            }
            Expr::Unary(_, a) => walk(a, bound, out),
            Expr::Binary(_, a, b) => {
                walk(a, bound, out);
                walk(b, bound, out);
            }
            Expr::Reduce { indices, filter, body, .. } => {
                let before = bound.len();
                bound.extend(indices.iter().copied());
                for c in filter {
                    walk(&c.lhs, bound, out);
                    walk(&c.rhs, bound, out);
                }
                walk(body, bound, out);
                bound.truncate(before);
            }
            Expr::Const(_) | Expr::Param(_) | Expr::Extent(_) => {}
        }
    }
    let mut bound = lhs.to_vec();
    walk(expr, &mut bound, out);
}
