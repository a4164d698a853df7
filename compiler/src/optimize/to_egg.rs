//! From the Cascade IR to e-graph terms: every defined tensor inlined into its readers.
//!
//! Needs: a verified cascade without iterative tensors. Guarantees: one term per defined tensor
//! (at its own indices) with the same meaning: filters become `filt`, reductions nest one index
//! at a time, a read at a shifted coordinate keeps its range check, and bound indices get
//! canonical names (the fewest primes that no free index of the context captures), so that the
//! same reduction written with another index name is the same term.

use std::collections::HashMap;

use egg::{Id, RecExpr, Symbol};

use super::lang::{Constant, Ein, ExtentName, IndexName, ParamName, TensorName};
use crate::ir::*;

/// Builds a DAG-shaped `RecExpr` (each distinct node once).
pub struct TermBuilder {
    pub expr: RecExpr<Ein>,
    memo: HashMap<Ein, Id>,
}

impl TermBuilder {
    pub fn new() -> Self {
        TermBuilder { expr: RecExpr::default(), memo: HashMap::new() }
    }

    pub fn add(&mut self, node: Ein) -> Id {
        if let Some(id) = self.memo.get(&node) {
            return *id;
        }
        let id = self.expr.add(node.clone());
        self.memo.insert(node, id);
        id
    }
}

/// Why a cascade is left as written.
#[derive(Debug, Clone, PartialEq)]
pub enum Unsupported {
    Iterative(String),
}

/// Index substitution in the reader's terms: index -> subscript.
type Env = HashMap<Index, Affine>;

pub struct Translator<'c> {
    cascade: &'c Cascade,
}

impl<'c> Translator<'c> {
    pub fn new(cascade: &'c Cascade) -> Result<Self, Unsupported> {
        if let Some(t) = cascade.tensors.iter().find(|t| matches!(t.kind, TensorKind::Defined { iterative: Some(_) })) {
            return Err(Unsupported::Iterative(t.name.clone()));
        }
        Ok(Translator { cascade })
    }

    pub fn index_symbol(&self, index: Index) -> Symbol {
        Symbol::from(self.cascade.index_name(index))
    }

    /// The term of `tensor` at its own indices, as a fresh `RecExpr`.
    pub fn tensor_term(&self, tensor: TensorId) -> RecExpr<Ein> {
        let mut builder = TermBuilder::new();
        let (_, einsum) = self.cascade.definitions(tensor).next().expect("a defined tensor");
        let env: Env = einsum.lhs_indices().map(|i| (i, Affine::Index(i))).collect();
        self.einsum(&mut builder, einsum, &env);
        builder.expr
    }

    fn einsum(&self, b: &mut TermBuilder, einsum: &Einsum, env: &Env) -> Id {
        let body = self.expr(b, &einsum.body, env);
        let mut conds: Vec<Id> = einsum.filter.iter().map(|c| self.cond(b, c, env)).collect();
        let lhs: Vec<Index> = einsum.lhs_indices().collect();
        conds.extend(self.split_validity(b, &lhs, &lhs, env));
        self.filtered(b, conds, body)
    }

    fn filtered(&self, b: &mut TermBuilder, conds: Vec<Id>, body: Id) -> Id {
        let Some(first) = conds.first().copied() else { return body };
        let cond = conds[1..].iter().fold(first, |acc, c| b.add(Ein::And([acc, *c])));
        b.add(Ein::Filter([cond, body]))
    }

    /// For every split pair with both indices in scope and at least one newly bound: the pair must
    /// address a point inside the whole rank. Indices are the callee's; `env` maps them.
    fn split_validity(&self, b: &mut TermBuilder, newly_bound: &[Index], in_scope: &[Index], env: &Env) -> Vec<Id> {
        let mut conds = Vec::new();
        for (tile, inner, whole) in self.cascade.split_pairs() {
            for outer in in_scope.iter().chain(newly_bound).filter(|i| i.rank == tile) {
                let partner = Index { rank: inner, primes: outer.primes };
                let both = in_scope.iter().chain(newly_bound).any(|i| *i == partner);
                let new = newly_bound.contains(outer) || newly_bound.contains(&partner);
                if !both || !new || conds.len() > 8 {
                    continue;
                }
                let position = Affine::Add(
                    Box::new(Affine::Mul(Box::new(Affine::Index(*outer)), Box::new(Affine::Extent(inner)))),
                    Box::new(Affine::Index(partner)),
                );
                let at = self.affine(b, &position, env);
                let value = b.add(Ein::IndexValue(at));
                let extent = self.extent(b, whole);
                let cond = b.add(Ein::Lt([value, extent]));
                if !conds.contains(&cond) {
                    conds.push(cond);
                }
            }
        }
        conds
    }

    fn extent(&self, b: &mut TermBuilder, rank: RankId) -> Id {
        b.add(Ein::Extent(ExtentName(Symbol::from(self.cascade.rank(rank).name.as_str()))))
    }

    fn affine(&self, b: &mut TermBuilder, affine: &Affine, env: &Env) -> Id {
        match affine {
            Affine::Const(c) => b.add(Ein::Num(Constant::new(*c as f64))),
            Affine::Index(i) => match env.get(i) {
                Some(Affine::Index(j)) => b.add(Ein::Index(IndexName(self.index_symbol(*j)))),
                // The substitution is already in the reader's terms.
                Some(other) => self.affine(b, other, &Env::new()),
                None => b.add(Ein::Index(IndexName(self.index_symbol(*i)))),
            },
            Affine::Extent(rank) => self.extent(b, *rank),
            Affine::Add(x, y) => {
                let (x, y) = (self.affine(b, x, env), self.affine(b, y, env));
                b.add(Ein::AffAdd([x, y]))
            }
            Affine::Sub(x, y) => {
                let (x, y) = (self.affine(b, x, env), self.affine(b, y, env));
                b.add(Ein::AffSub([x, y]))
            }
            Affine::Mul(x, y) => {
                let (x, y) = (self.affine(b, x, env), self.affine(b, y, env));
                b.add(Ein::AffMul([x, y]))
            }
            Affine::Neg(x) => {
                let x = self.affine(b, x, env);
                b.add(Ein::AffNeg(x))
            }
        }
    }

    /// `affine` with the substitution applied, in the reader's terms.
    fn substitute(&self, affine: &Affine, env: &Env) -> Affine {
        match affine {
            Affine::Index(i) => env.get(i).cloned().unwrap_or(Affine::Index(*i)),
            Affine::Const(_) | Affine::Extent(_) => affine.clone(),
            Affine::Add(x, y) => Affine::Add(Box::new(self.substitute(x, env)), Box::new(self.substitute(y, env))),
            Affine::Sub(x, y) => Affine::Sub(Box::new(self.substitute(x, env)), Box::new(self.substitute(y, env))),
            Affine::Mul(x, y) => Affine::Mul(Box::new(self.substitute(x, env)), Box::new(self.substitute(y, env))),
            Affine::Neg(x) => Affine::Neg(Box::new(self.substitute(x, env))),
        }
    }

    fn cond(&self, b: &mut TermBuilder, cond: &Cond, env: &Env) -> Id {
        let (x, y) = (self.expr(b, &cond.lhs, env), self.expr(b, &cond.rhs, env));
        b.add(match cond.op {
            CmpOp::Lt => Ein::Lt([x, y]),
            CmpOp::Le => Ein::Le([x, y]),
            CmpOp::Gt => Ein::Gt([x, y]),
            CmpOp::Ge => Ein::Ge([x, y]),
            CmpOp::Eq => Ein::Eq([x, y]),
            CmpOp::Ne => Ein::Ne([x, y]),
        })
    }

    fn expr(&self, b: &mut TermBuilder, expr: &Expr, env: &Env) -> Id {
        match expr {
            Expr::Const(c) => b.add(Ein::Num(Constant::new(*c))),
            Expr::Param(p) => b.add(Ein::Param(ParamName(Symbol::from(self.cascade.param(*p).name.as_str())))),
            Expr::Extent(r) => self.extent(b, *r),
            Expr::Index(i) => {
                let at = self.affine(b, &Affine::Index(*i), env);
                b.add(Ein::IndexValue(at))
            }
            Expr::Access { tensor, subscripts } => self.access(b, *tensor, subscripts, env),
            Expr::Unary(op, arg) => {
                let a = self.expr(b, arg, env);
                b.add(match op {
                    UnaryOp::Neg => Ein::Neg(a),
                    UnaryOp::Exp => Ein::Exp(a),
                    UnaryOp::Log => Ein::Log(a),
                    UnaryOp::Sqrt => Ein::Sqrt(a),
                    UnaryOp::Tanh => Ein::Tanh(a),
                    UnaryOp::Sigmoid => Ein::Sigmoid(a),
                    UnaryOp::Softplus => Ein::Softplus(a),
                    UnaryOp::Relu => Ein::Relu(a),
                    UnaryOp::Abs => Ein::Abs(a),
                })
            }
            Expr::Binary(op, x, y) => {
                let (x, y) = (self.expr(b, x, env), self.expr(b, y, env));
                b.add(match op {
                    BinaryOp::Add => Ein::Add([x, y]),
                    BinaryOp::Sub => Ein::Sub([x, y]),
                    BinaryOp::Mul => Ein::Mul([x, y]),
                    BinaryOp::Div => Ein::Div([x, y]),
                    BinaryOp::Max => Ein::Max2([x, y]),
                    BinaryOp::Min => Ein::Min2([x, y]),
                })
            }
            Expr::Reduce { op, indices, filter, body } => {
                // Bound indices get canonical names: the fewest primes of their rank that no
                // substitution would capture. So `max[m](A[m, p])` and `max[m'](A[m', p])` are one
                // term, whatever name the source chose.
                let mut inner = env.clone();
                let mut bound = Vec::new();
                for index in indices {
                    let mut fresh = Index { rank: index.rank, primes: 0 };
                    while env.values().any(|a| {
                        let mut hit = false;
                        a.for_each_index(&mut |j| hit |= j == fresh);
                        hit
                    }) || bound.contains(&fresh)
                    {
                        fresh.primes += 1;
                    }
                    inner.insert(*index, Affine::Index(fresh));
                    bound.push(fresh);
                }
                let body_term = self.expr(b, body, &inner);
                let mut conds: Vec<Id> = filter.iter().map(|c| self.cond(b, c, &inner)).collect();
                let mut in_scope: Vec<Index> = env.keys().copied().collect();
                in_scope.sort();
                conds.extend(self.split_validity(b, indices, &in_scope, &inner));
                let mut term = self.filtered(b, conds, body_term);
                for index in bound.iter().rev() {
                    let k = b.add(Ein::Index(IndexName(self.index_symbol(*index))));
                    term = b.add(match op {
                        ReduceOp::Sum => Ein::Sum([k, term]),
                        ReduceOp::Max => Ein::RMax([k, term]),
                        ReduceOp::Min => Ein::RMin([k, term]),
                    });
                }
                term
            }
        }
    }

    fn access(&self, b: &mut TermBuilder, tensor: TensorId, subscripts: &[Affine], env: &Env) -> Id {
        let t = self.cascade.tensor(tensor);
        let reader_subscripts: Vec<Affine> = subscripts.iter().map(|s| self.substitute(s, env)).collect();
        match t.kind {
            TensorKind::Input { .. } => {
                let mut children = vec![b.add(Ein::Tensor(TensorName(Symbol::from(t.name.as_str()))))];
                for s in &reader_subscripts {
                    children.push(self.affine(b, s, &Env::new()));
                }
                b.add(Ein::In(children.into_boxed_slice()))
            }
            TensorKind::Defined { .. } => {
                let (_, einsum) = self.cascade.definitions(tensor).next().expect("defined");
                let mut inner = Env::new();
                let mut range_checks = Vec::new();
                for ((lhs, s), rank) in einsum.lhs.iter().zip(&reader_subscripts).zip(&t.ranks) {
                    let Some(index) = lhs.index() else { continue };
                    // A bare index of the position's rank is always in range.
                    if !matches!(s, Affine::Index(i) if i.rank == *rank) {
                        let at = self.affine(b, s, &Env::new());
                        let value = b.add(Ein::IndexValue(at));
                        let zero = b.add(Ein::Num(Constant::new(0.0)));
                        let extent = self.extent(b, *rank);
                        range_checks.push(b.add(Ein::Ge([value, zero])));
                        range_checks.push(b.add(Ein::Lt([value, extent])));
                    }
                    inner.insert(index, s.clone());
                }
                let term = self.einsum(b, einsum, &inner);
                self.filtered(b, range_checks, term)
            }
        }
    }
}
