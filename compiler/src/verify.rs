//! The verifier: states the invariants of the Cascade IR and checks them.
//!
//! Every pass returns IR that passes `verify`; the back ends accept only verified IR. A failure
//! is a bug in einfuse, never the user's fault, so errors are internal (`VerifyError`).
//!
//! Invariants:
//! - Ids are in range: ranks, tensors, params; a split names an earlier fixed, non-zero tile rank
//!   and an earlier whole rank.
//! - Names are unique across ranks, tensors and params.
//! - Every defined tensor has exactly one Einsum, or, when iterative at position `k`, one initial
//!   Einsum (`Lhs::Initial` at `k`) followed by one recurrence (`Lhs::Next` at `k`); inputs have
//!   none. Left-hand sides match the tensor's ranks, with no index twice.
//! - Every access has one subscript per rank; a bare index subscript has the position's rank.
//! - Every index used on the right is bound by the left-hand side or an enclosing reducer; no
//!   reducer binds a left-hand index; every reducer binds at least one index.
//! - Every read of a defined tensor comes after its first definition (a recurrence may read its
//!   own tensor), and dependency cycles are carried by a recurrence (see `check::dependency_cycles`).
//! - Outputs are distinct defined tensors, and there is at least one.

use std::collections::HashSet;
use std::fmt;

use crate::ir::*;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{location}: {message}")]
pub struct VerifyError {
    /// What is wrong where: `einsum 3 (RD[m1 + 1, p])`, `tensor QK`, `kernel`.
    pub location: String,
    pub message: String,
}

/// All the errors the verifier found.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub struct VerifyErrors(pub Vec<VerifyError>);

impl fmt::Display for VerifyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lines: Vec<String> = self.0.iter().map(|e| e.to_string()).collect();
        f.write_str(&lines.join("; "))
    }
}

/// Checks every invariant listed in the module documentation.
pub fn verify(cascade: &Cascade) -> Result<(), VerifyErrors> {
    let mut verifier = Verifier { cascade, errors: vec![] };
    verifier.declarations();
    if verifier.errors.is_empty() {
        verifier.definitions();
    }
    if verifier.errors.is_empty() {
        for (e, einsum) in cascade.einsums.iter().enumerate() {
            verifier.einsum(EinsumId::new(e), einsum);
        }
    }
    if verifier.errors.is_empty() {
        verifier.outputs();
    }
    if verifier.errors.is_empty() {
        if let Err(problem) = crate::check::dependency_cycles(cascade) {
            verifier.error(
                "kernel".into(),
                format!("dependency cycle not carried by a recurrence: {}", problem.cycle.join(" -> ")),
            );
        }
    }
    if verifier.errors.is_empty() {
        Ok(())
    } else {
        Err(VerifyErrors(verifier.errors))
    }
}

struct Verifier<'a> {
    cascade: &'a Cascade,
    errors: Vec<VerifyError>,
}

impl Verifier<'_> {
    fn error(&mut self, location: String, message: String) {
        self.errors.push(VerifyError { location, message });
    }

    fn declarations(&mut self) {
        let c = self.cascade;
        let mut names = HashSet::new();
        let all_names = c
            .ranks
            .iter()
            .map(|r| &r.name)
            .chain(c.tensors.iter().map(|t| &t.name))
            .chain(c.params.iter().map(|p| &p.name));
        for name in all_names {
            if !names.insert(name.clone()) {
                self.error("kernel".into(), format!("the name `{name}` is declared twice"));
            }
        }
        for (r, rank) in c.ranks.iter().enumerate() {
            if let Extent::Split { whole, tile } = rank.extent {
                if whole.index() >= r || tile.index() >= r {
                    self.error(format!("rank {}", rank.name), "a split must name earlier ranks".into());
                } else if !matches!(c.rank(tile).extent, Extent::Fixed(n) if n > 0) {
                    self.error(
                        format!("rank {}", rank.name),
                        "the tile rank of a split must be fixed and non-zero".into(),
                    );
                }
            }
        }
        for tensor in &c.tensors {
            if tensor.ranks.iter().any(|r| r.index() >= c.ranks.len()) {
                self.error(format!("tensor {}", tensor.name), "rank id out of range".into());
            }
            if let TensorKind::Defined { iterative: Some(p) } = tensor.kind {
                if p >= tensor.ranks.len() {
                    self.error(format!("tensor {}", tensor.name), "iterative position out of range".into());
                }
            }
        }
    }

    fn definitions(&mut self) {
        let c = self.cascade;
        for einsum in &c.einsums {
            if einsum.target.index() >= c.tensors.len() {
                self.error("kernel".into(), "an Einsum's target is out of range".into());
                return;
            }
        }
        for (t, tensor) in c.tensors.iter().enumerate() {
            let id = TensorId::new(t);
            let definitions: Vec<(EinsumId, &Einsum)> = c.definitions(id).collect();
            let location = format!("tensor {}", tensor.name);
            match tensor.kind {
                TensorKind::Input { .. } => {
                    if !definitions.is_empty() {
                        self.error(location, "an input is assigned".into());
                    }
                }
                TensorKind::Defined { iterative: None } => {
                    if definitions.len() != 1 {
                        self.error(location, format!("{} definitions instead of one", definitions.len()));
                    } else if definitions[0].1.lhs.iter().any(|l| !matches!(l, Lhs::Index(_))) {
                        self.error(location, "a non-iterative tensor has an iterative left-hand side".into());
                    }
                }
                TensorKind::Defined { iterative: Some(position) } => {
                    let shape_ok = definitions.len() == 2
                        && matches!(definitions[0].1.lhs.get(position), Some(Lhs::Initial))
                        && matches!(definitions[1].1.lhs.get(position), Some(Lhs::Next(_)));
                    if !shape_ok {
                        self.error(location, "an iterative tensor needs an initial value, then a recurrence".into());
                    }
                }
            }
        }
    }

    fn einsum(&mut self, id: EinsumId, einsum: &Einsum) {
        let c = self.cascade;
        let location = format!("einsum {} ({})", id.0, c.einsum_label(id));
        let tensor = c.tensor(einsum.target);
        if einsum.lhs.len() != tensor.ranks.len() {
            self.error(location, "the left-hand side does not match the tensor's ranks".into());
            return;
        }
        let mut bound: Vec<Index> = Vec::new();
        for (lhs, rank) in einsum.lhs.iter().zip(&tensor.ranks) {
            if let Some(index) = lhs.index() {
                if index.rank != *rank {
                    self.error(location.clone(), "a left-hand index does not have its position's rank".into());
                }
                if bound.contains(&index) {
                    self.error(location.clone(), "an index appears twice on the left".into());
                }
                bound.push(index);
            }
        }
        let first_definition = |t: TensorId| c.definitions(t).next().map(|(e, _)| e);
        let mut context = ExprContext { id, einsum, location: &location, first_definition: &first_definition };
        self.expr(&einsum.body, &bound, &bound, &mut context);
        for cond in &einsum.filter {
            self.expr(&cond.lhs, &bound, &bound, &mut context);
            self.expr(&cond.rhs, &bound, &bound, &mut context);
        }
    }

    fn expr(&mut self, expr: &Expr, lhs: &[Index], bound: &[Index], cx: &mut ExprContext<'_>) {
        let c = self.cascade;
        match expr {
            Expr::Const(_) => {}
            Expr::Param(p) => {
                if p.index() >= c.params.len() {
                    self.error(cx.location.to_string(), "param id out of range".into());
                }
            }
            Expr::Extent(r) => {
                if r.index() >= c.ranks.len() {
                    self.error(cx.location.to_string(), "rank id out of range".into());
                }
            }
            Expr::Index(index) => self.bound_index(*index, bound, cx),
            Expr::Access { tensor, subscripts } => {
                if tensor.index() >= c.tensors.len() {
                    self.error(cx.location.to_string(), "tensor id out of range".into());
                    return;
                }
                let read = c.tensor(*tensor);
                if read.ranks.len() != subscripts.len() {
                    self.error(
                        cx.location.to_string(),
                        format!("`{}` is read with the wrong number of subscripts", read.name),
                    );
                    return;
                }
                for (sub, rank) in subscripts.iter().zip(&read.ranks) {
                    if let Some(index) = sub.as_index() {
                        if index.rank != *rank {
                            self.error(
                                cx.location.to_string(),
                                format!("`{}` is read with an index of another rank", read.name),
                            );
                        }
                    }
                    sub.for_each_index(&mut |index| {
                        if !bound.contains(&index) {
                            self.errors.push(VerifyError {
                                location: cx.location.to_string(),
                                message: format!("index `{}` is not bound", c.index_name(index)),
                            });
                        }
                    });
                }
                if let Some(first) = (cx.first_definition)(*tensor) {
                    let own_recurrence = *tensor == cx.einsum.target && cx.einsum.recurrence_index().is_some();
                    if (first > cx.id || (*tensor == cx.einsum.target && first == cx.id)) && !own_recurrence {
                        self.error(cx.location.to_string(), format!("`{}` is read before it is defined", read.name));
                    }
                }
            }
            Expr::Unary(_, arg) => self.expr(arg, lhs, bound, cx),
            Expr::Binary(_, a, b) => {
                self.expr(a, lhs, bound, cx);
                self.expr(b, lhs, bound, cx);
            }
            Expr::Reduce { indices, filter, body, .. } => {
                if indices.is_empty() {
                    self.error(cx.location.to_string(), "a reduction binds no index".into());
                }
                if indices.iter().any(|i| lhs.contains(i)) {
                    self.error(cx.location.to_string(), "a reduction binds a left-hand index".into());
                }
                let mut inner = bound.to_vec();
                inner.extend(indices.iter().copied());
                for cond in filter {
                    self.expr(&cond.lhs, lhs, &inner, cx);
                    self.expr(&cond.rhs, lhs, &inner, cx);
                }
                self.expr(body, lhs, &inner, cx);
            }
        }
    }

    fn bound_index(&mut self, index: Index, bound: &[Index], cx: &ExprContext<'_>) {
        if !bound.contains(&index) {
            let name = self.cascade.index_name(index);
            self.error(cx.location.to_string(), format!("index `{name}` is not bound"));
        }
    }

    fn outputs(&mut self) {
        let c = self.cascade;
        if c.outputs.is_empty() {
            self.error("kernel".into(), "no outputs".into());
        }
        let mut seen = HashSet::new();
        for output in &c.outputs {
            if output.tensor.index() >= c.tensors.len() {
                self.error("kernel".into(), "output tensor out of range".into());
                continue;
            }
            if !seen.insert(output.tensor) {
                self.error("kernel".into(), "an output appears twice".into());
            }
            if matches!(c.tensor(output.tensor).kind, TensorKind::Input { .. }) {
                self.error("kernel".into(), "an input is an output".into());
            }
        }
    }
}

struct ExprContext<'a> {
    id: EinsumId,
    einsum: &'a Einsum,
    location: &'a str,
    first_definition: &'a dyn Fn(TensorId) -> Option<EinsumId>,
}
