//! The Cascade IR: a kernel as plain data, with every name resolved to a typed index.
//!
//! A cascade is an ordered list of Einsums, each defining one tensor from inputs, params and
//! earlier tensors. Reductions are explicit (`Expr::Reduce`), filters are attached to the
//! reduction or output points they restrict, and an iterative tensor is defined by two Einsums:
//! its initial value (`Lhs::Initial`) and its recurrence (`Lhs::Next`). The text form of this IR is
//! `.ein` source (see `print.rs`); `verify.rs` states and checks its invariants.

use std::fmt;

pub use einfuse_dsl::ast::{BinOp as SyntaxBinOp, CmpOp, ElemType, ReduceOp};

macro_rules! entity {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub u32);

        impl $name {
            pub fn index(self) -> usize {
                self.0 as usize
            }

            pub fn new(index: usize) -> $name {
                $name(u32::try_from(index).expect("entity index fits in u32"))
            }
        }
    };
}

entity!(
    /// A rank of the cascade (`M`, `M1`, ...).
    RankId
);
entity!(
    /// A tensor: an input or one defined by Einsums.
    TensorId
);
entity!(
    /// A named scalar constant.
    ParamId
);
entity!(
    /// An Einsum, by its position in the cascade.
    EinsumId
);

/// One kernel.
#[derive(Clone, Debug, PartialEq)]
pub struct Cascade {
    pub name: String,
    pub ranks: Vec<Rank>,
    pub params: Vec<Param>,
    pub tensors: Vec<Tensor>,
    pub einsums: Vec<Einsum>,
    pub outputs: Vec<Output>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Rank {
    pub name: String,
    pub extent: Extent,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Extent {
    /// Known when the kernel is compiled.
    Fixed(u64),
    /// Bound when the kernel is called.
    Symbolic,
    /// The tile rank of `whole`: ceil(extent(whole) / extent(tile)) tiles of the fixed rank `tile`.
    Split { whole: RankId, tile: RankId },
}

#[derive(Clone, Debug, PartialEq)]
pub struct Param {
    pub name: String,
    pub value: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub name: String,
    /// The ranks of its positions, in storage order (the last is contiguous).
    pub ranks: Vec<RankId>,
    pub kind: TensorKind,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum TensorKind {
    Input {
        elem: ElemType,
    },
    /// Defined by one Einsum, or by an initial value and a recurrence when `iterative` names the
    /// position along which it iterates (that position's extent is the rank's extent plus one).
    Defined {
        iterative: Option<usize>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Output {
    pub tensor: TensorId,
    pub elem: ElemType,
}

/// An index variable: ranges over `rank`; `primes` tells `m` from `m'`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Index {
    pub rank: RankId,
    pub primes: u8,
}

/// A subscript on the left-hand side of an Einsum.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Lhs {
    /// `m`: the Einsum iterates `m` over its rank.
    Index(Index),
    /// `0` at the iterative position: the initial value.
    Initial,
    /// `r + 1` at the iterative position: the recurrence, evaluated for `r = 0, 1, ...` in order.
    Next(Index),
}

impl Lhs {
    pub fn index(self) -> Option<Index> {
        match self {
            Lhs::Index(index) | Lhs::Next(index) => Some(index),
            Lhs::Initial => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Einsum {
    pub target: TensorId,
    pub lhs: Vec<Lhs>,
    pub body: Expr,
    /// Comparisons on left-hand indices (and tensor elements) that restrict the output points.
    pub filter: Vec<Cond>,
}

impl Einsum {
    /// The indices this Einsum binds on its left-hand side.
    pub fn lhs_indices(&self) -> impl Iterator<Item = Index> + '_ {
        self.lhs.iter().filter_map(|lhs| lhs.index())
    }

    pub fn is_initial(&self) -> bool {
        self.lhs.iter().any(|lhs| matches!(lhs, Lhs::Initial))
    }

    /// Every tensor read of the Einsum, in its body and its filter, with the subscripts.
    pub fn reads(&self) -> Vec<(TensorId, &[Affine])> {
        let mut found = self.body.accesses();
        for cond in &self.filter {
            found.extend(cond.lhs.accesses());
            found.extend(cond.rhs.accesses());
        }
        found
    }

    /// Visits every expression of the Einsum, mutably: its value and both sides of each
    /// statement filter (see `Expr::walk_mut`).
    pub fn walk_exprs_mut(&mut self, visit: &mut impl FnMut(&mut Expr)) {
        self.body.walk_mut(visit);
        for cond in &mut self.filter {
            cond.lhs.walk_mut(visit);
            cond.rhs.walk_mut(visit);
        }
    }

    pub fn recurrence_index(&self) -> Option<Index> {
        self.lhs.iter().find_map(|lhs| match lhs {
            Lhs::Next(index) => Some(*index),
            _ => None,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UnaryOp {
    Neg,
    Exp,
    Log,
    Sqrt,
    Tanh,
    Sigmoid,
    Softplus,
    Relu,
    Abs,
}

impl UnaryOp {
    pub const FUNCTIONS: [UnaryOp; 8] = [
        UnaryOp::Exp,
        UnaryOp::Log,
        UnaryOp::Sqrt,
        UnaryOp::Tanh,
        UnaryOp::Sigmoid,
        UnaryOp::Softplus,
        UnaryOp::Relu,
        UnaryOp::Abs,
    ];

    pub fn name(self) -> &'static str {
        match self {
            UnaryOp::Neg => "-",
            UnaryOp::Exp => "exp",
            UnaryOp::Log => "log",
            UnaryOp::Sqrt => "sqrt",
            UnaryOp::Tanh => "tanh",
            UnaryOp::Sigmoid => "sigmoid",
            UnaryOp::Softplus => "softplus",
            UnaryOp::Relu => "relu",
            UnaryOp::Abs => "abs",
        }
    }

    pub fn from_name(name: &str) -> Option<UnaryOp> {
        UnaryOp::FUNCTIONS.into_iter().find(|op| op.name() == name)
    }

    pub fn apply(self, x: f64) -> f64 {
        match self {
            UnaryOp::Neg => -x,
            UnaryOp::Exp => x.exp(),
            UnaryOp::Log => x.ln(),
            UnaryOp::Sqrt => x.sqrt(),
            UnaryOp::Tanh => x.tanh(),
            UnaryOp::Sigmoid => {
                // Written so that neither branch overflows.
                if x >= 0.0 {
                    1.0 / (1.0 + (-x).exp())
                } else {
                    let e = x.exp();
                    e / (1.0 + e)
                }
            }
            UnaryOp::Softplus => x.max(0.0) + (-x.abs()).exp().ln_1p(),
            UnaryOp::Relu => {
                if x.is_nan() {
                    x
                } else {
                    x.max(0.0)
                }
            }
            UnaryOp::Abs => x.abs(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    /// Element-wise `max(a, b)`.
    Max,
    /// Element-wise `min(a, b)`.
    Min,
}

impl BinaryOp {
    pub fn apply(self, a: f64, b: f64) -> f64 {
        match self {
            BinaryOp::Add => a + b,
            BinaryOp::Sub => a - b,
            BinaryOp::Mul => a * b,
            BinaryOp::Div => a / b,
            // NaN propagates, as IEEE maximum does.
            BinaryOp::Max => {
                if a.is_nan() || b.is_nan() {
                    f64::NAN
                } else {
                    a.max(b)
                }
            }
            BinaryOp::Min => {
                if a.is_nan() || b.is_nan() {
                    f64::NAN
                } else {
                    a.min(b)
                }
            }
        }
    }
}

/// The identity and combining step of a reducer.
pub fn reduce_identity(op: ReduceOp) -> f64 {
    match op {
        ReduceOp::Sum => 0.0,
        ReduceOp::Max => f64::NEG_INFINITY,
        ReduceOp::Min => f64::INFINITY,
    }
}

pub fn reduce_step(op: ReduceOp, acc: f64, x: f64) -> f64 {
    match op {
        ReduceOp::Sum => acc + x,
        ReduceOp::Max => BinaryOp::Max.apply(acc, x),
        ReduceOp::Min => BinaryOp::Min.apply(acc, x),
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Expr {
    Const(f64),
    Param(ParamId),
    /// A rank's extent, as a number.
    Extent(RankId),
    /// An index's coordinate, as a number.
    Index(Index),
    Access {
        tensor: TensorId,
        subscripts: Vec<Affine>,
    },
    Unary(UnaryOp, Box<Expr>),
    Binary(BinaryOp, Box<Expr>, Box<Expr>),
    /// A reduction over `indices`, restricted by `filter`; an empty set gives the identity.
    Reduce {
        op: ReduceOp,
        indices: Vec<Index>,
        filter: Vec<Cond>,
        body: Box<Expr>,
    },
}

impl Expr {
    /// Calls `visit` on this expression and every sub-expression, parents first.
    pub fn walk(&self, visit: &mut impl FnMut(&Expr)) {
        visit(self);
        match self {
            Expr::Unary(_, arg) => arg.walk(visit),
            Expr::Binary(_, a, b) => {
                a.walk(visit);
                b.walk(visit);
            }
            Expr::Reduce { filter, body, .. } => {
                for cond in filter {
                    cond.lhs.walk(visit);
                    cond.rhs.walk(visit);
                }
                body.walk(visit);
            }
            Expr::Const(_) | Expr::Param(_) | Expr::Extent(_) | Expr::Index(_) | Expr::Access { .. } => {}
        }
    }

    /// Calls `visit` on this expression and every sub-expression, children first, mutably.
    pub fn walk_mut(&mut self, visit: &mut impl FnMut(&mut Expr)) {
        match self {
            Expr::Unary(_, arg) => arg.walk_mut(visit),
            Expr::Binary(_, a, b) => {
                a.walk_mut(visit);
                b.walk_mut(visit);
            }
            Expr::Reduce { filter, body, .. } => {
                for cond in filter {
                    cond.lhs.walk_mut(visit);
                    cond.rhs.walk_mut(visit);
                }
                body.walk_mut(visit);
            }
            Expr::Const(_) | Expr::Param(_) | Expr::Extent(_) | Expr::Index(_) | Expr::Access { .. } => {}
        }
        visit(self);
    }

    /// The operands of a chain of `op` (`a * b * c` for `Mul`), left to right.
    pub fn operands<'e>(&'e self, op: BinaryOp, out: &mut Vec<&'e Expr>) {
        match self {
            Expr::Binary(o, a, b) if *o == op => {
                a.operands(op, out);
                b.operands(op, out);
            }
            other => out.push(other),
        }
    }

    /// Whether this expression holds a reduction, at any depth.
    pub fn holds_reduction(&self) -> bool {
        let mut found = false;
        self.walk(&mut |e| found |= matches!(e, Expr::Reduce { .. }));
        found
    }

    /// Whether `index` appears anywhere in this expression, as a value or in a subscript.
    pub fn mentions(&self, index: Index) -> bool {
        let mut found = false;
        self.walk(&mut |e| match e {
            Expr::Index(i) => found |= *i == index,
            Expr::Access { subscripts, .. } => {
                for sub in subscripts {
                    sub.for_each_index(&mut |i| found |= i == index);
                }
            }
            _ => {}
        });
        found
    }

    /// The tensors this expression reads, with their subscripts, in order of appearance.
    pub fn accesses(&self) -> Vec<(TensorId, &[Affine])> {
        let mut found = Vec::new();
        collect_accesses(self, &mut found);
        found
    }
}

fn collect_accesses<'a>(expr: &'a Expr, found: &mut Vec<(TensorId, &'a [Affine])>) {
    match expr {
        Expr::Access { tensor, subscripts } => found.push((*tensor, subscripts)),
        Expr::Unary(_, arg) => collect_accesses(arg, found),
        Expr::Binary(_, a, b) => {
            collect_accesses(a, found);
            collect_accesses(b, found);
        }
        Expr::Reduce { filter, body, .. } => {
            for cond in filter {
                collect_accesses(&cond.lhs, found);
                collect_accesses(&cond.rhs, found);
            }
            collect_accesses(body, found);
        }
        Expr::Const(_) | Expr::Param(_) | Expr::Extent(_) | Expr::Index(_) => {}
    }
}

/// One comparison of a filter.
#[derive(Clone, Debug, PartialEq)]
pub struct Cond {
    pub lhs: Expr,
    pub op: CmpOp,
    pub rhs: Expr,
}

/// An integer subscript: affine in the indices, with rank extents as coefficients or terms.
#[derive(Clone, Debug, PartialEq)]
pub enum Affine {
    Const(i64),
    Index(Index),
    Extent(RankId),
    Add(Box<Affine>, Box<Affine>),
    Sub(Box<Affine>, Box<Affine>),
    Mul(Box<Affine>, Box<Affine>),
    Neg(Box<Affine>),
}

impl Affine {
    /// The single index this subscript is, if it is a bare index.
    pub fn as_index(&self) -> Option<Index> {
        match self {
            Affine::Index(index) => Some(*index),
            _ => None,
        }
    }

    pub fn for_each_index(&self, visit: &mut impl FnMut(Index)) {
        match self {
            Affine::Index(index) => visit(*index),
            Affine::Const(_) | Affine::Extent(_) => {}
            Affine::Add(a, b) | Affine::Sub(a, b) | Affine::Mul(a, b) => {
                a.for_each_index(visit);
                b.for_each_index(visit);
            }
            Affine::Neg(a) => a.for_each_index(visit),
        }
    }

    pub fn mentions_index(&self) -> bool {
        let mut any = false;
        self.for_each_index(&mut |_| any = true);
        any
    }

    /// This subscript with each index for which `to` gives a subscript replaced by it.
    pub fn substitute(&self, to: &impl Fn(Index) -> Option<Affine>) -> Affine {
        let both = |a: &Affine, b: &Affine| (Box::new(a.substitute(to)), Box::new(b.substitute(to)));
        match self {
            Affine::Index(i) => to(*i).unwrap_or(Affine::Index(*i)),
            Affine::Const(_) | Affine::Extent(_) => self.clone(),
            Affine::Add(a, b) => {
                let (a, b) = both(a, b);
                Affine::Add(a, b)
            }
            Affine::Sub(a, b) => {
                let (a, b) = both(a, b);
                Affine::Sub(a, b)
            }
            Affine::Mul(a, b) => {
                let (a, b) = both(a, b);
                Affine::Mul(a, b)
            }
            Affine::Neg(a) => Affine::Neg(Box::new(a.substitute(to))),
        }
    }
}

impl Cascade {
    pub fn rank(&self, id: RankId) -> &Rank {
        &self.ranks[id.index()]
    }

    pub fn tensor(&self, id: TensorId) -> &Tensor {
        &self.tensors[id.index()]
    }

    pub fn param(&self, id: ParamId) -> &Param {
        &self.params[id.index()]
    }

    pub fn rank_by_name(&self, name: &str) -> Option<RankId> {
        self.ranks.iter().position(|r| r.name == name).map(RankId::new)
    }

    pub fn tensor_by_name(&self, name: &str) -> Option<TensorId> {
        self.tensors.iter().position(|t| t.name == name).map(TensorId::new)
    }

    /// The name of an index variable: the rank's name in lower case, then its primes.
    pub fn index_name(&self, index: Index) -> String {
        let mut name = self.rank(index.rank).name.to_lowercase();
        for _ in 0..index.primes {
            name.push('\'');
        }
        name
    }

    /// The Einsums that define `tensor`, in cascade order.
    pub fn definitions(&self, tensor: TensorId) -> impl Iterator<Item = (EinsumId, &Einsum)> + '_ {
        self.einsums.iter().enumerate().filter(move |(_, e)| e.target == tensor).map(|(i, e)| (EinsumId::new(i), e))
    }

    /// Removes the tensors `gone` and the Einsums that define them; the other tensors keep their
    /// order and every reference is renumbered. No Einsum that stays may read a removed tensor.
    pub fn remove_tensors(&mut self, gone: &[TensorId]) {
        let mut renumber = vec![None; self.tensors.len()];
        let mut kept = Vec::new();
        for (k, tensor) in self.tensors.iter().enumerate() {
            if !gone.contains(&TensorId::new(k)) {
                renumber[k] = Some(TensorId::new(kept.len()));
                kept.push(tensor.clone());
            }
        }
        let new = |t: TensorId| renumber[t.index()].expect("a tensor that stays");
        self.tensors = kept;
        self.einsums.retain(|e| !gone.contains(&e.target));
        let remap = &mut |e: &mut Expr| {
            if let Expr::Access { tensor, .. } = e {
                *tensor = new(*tensor);
            }
        };
        for einsum in &mut self.einsums {
            einsum.target = new(einsum.target);
            einsum.walk_exprs_mut(remap);
        }
        for output in &mut self.outputs {
            output.tensor = new(output.tensor);
        }
    }

    /// The split pairs `(tile rank, within-tile rank, whole rank)` of the cascade.
    pub fn split_pairs(&self) -> Vec<(RankId, RankId, RankId)> {
        self.ranks
            .iter()
            .enumerate()
            .filter_map(|(i, rank)| match rank.extent {
                Extent::Split { whole, tile } => Some((RankId::new(i), tile, whole)),
                _ => None,
            })
            .collect()
    }

    /// Whether `cond` says only that a split pair's point lies inside its whole rank (`m1 * M0 +
    /// m0 < M`, as the optimizer writes it): what every back end and the interpreter already take
    /// a point outside to mean (its reads there are undefined), so that it restricts nothing.
    pub fn is_split_validity(&self, cond: &Cond) -> bool {
        let Expr::Binary(BinaryOp::Add, step, point) = &cond.lhs else { return false };
        let Expr::Binary(BinaryOp::Mul, tile, size) = &**step else { return false };
        let (Expr::Index(t), Expr::Extent(e), Expr::Index(i), Expr::Extent(w)) =
            (&**tile, &**size, &**point, &cond.rhs)
        else {
            return false;
        };
        cond.op == CmpOp::Lt
            && t.primes == i.primes
            && *e == i.rank
            && self.split_pairs().contains(&(t.rank, i.rank, *w))
    }

    /// A short human name for an Einsum: its target with the left-hand side (`RM[m1 + 1, p]`).
    pub fn einsum_label(&self, id: EinsumId) -> String {
        let einsum = &self.einsums[id.index()];
        let subscripts: Vec<String> = einsum
            .lhs
            .iter()
            .map(|lhs| match lhs {
                Lhs::Index(index) => self.index_name(*index),
                Lhs::Initial => "0".to_string(),
                Lhs::Next(index) => format!("{} + 1", self.index_name(*index)),
            })
            .collect();
        format!("{}[{}]", self.tensor(einsum.target).name, subscripts.join(", "))
    }
}

impl fmt::Display for Cascade {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&crate::print::print_cascade(self))
    }
}
