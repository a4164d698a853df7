//! Empty steps: which streamed loops may skip a step where a filtered tensor has no point.
//!
//! A causal mask leaves whole key tiles without a single admitted point for a block of queries.
//! Such a step of the streamed loop still computes exponentials of nothing and folds empty sums
//! into the running tensors; for softmax attention it changes nothing: the running maximum is
//! `max(RM, -inf) = RM`, its correction `exp(RM - RM) = 1`, the running sums `0 + R * 1 = R`.
//! This pass proves that, per loop, by evaluating the steps after the filtered Einsum over an
//! abstract domain, assuming the filtered tensor undefined everywhere: every recurrence of the
//! loop must give back its current iterate. A back end may then test the filtered tensor after
//! computing it and, when no point is defined, copy each running tensor's current iterate into
//! its next slot and skip the rest of the step.
//!
//! Needs: a scheduled loop (its Einsums in order). Guarantees: `empty_step_tensor` names a tensor
//! only when skipping is exact for finite running values: `x - x` is taken as 0, which an infinite
//! running maximum would make NaN (the interpreter then gives NaN; a skipped step keeps the
//! earlier value). Every other Einsum of the step after the filtered one writes a tensor kept
//! for the current step only, so that nothing outside the step sees what was skipped.

use crate::ir::*;
use crate::schedule::{Buffer, Slot};

/// What every point of a tensor holds at an empty step.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Abstract {
    /// No point is defined.
    Undefined,
    /// Every point is defined and holds this number.
    Constant(f64),
    /// Every point equals the current iterate of this running tensor.
    Same(TensorId),
    /// Anything.
    Unknown,
}

/// The tensor, written by the first filtered Einsum of `einsums` (the body of the loop over
/// `index`, in order), whose emptiness makes a step skippable; `None` when no proof is found.
pub fn empty_step_tensor(
    cascade: &Cascade,
    buffers: &[Buffer],
    einsums: &[EinsumId],
    index: Index,
) -> Option<TensorId> {
    let first = einsums.iter().position(|e| !cascade.einsums[e.index()].filter.is_empty())?;
    let filtered = cascade.einsums[einsums[first].index()].target;
    if !buffers[filtered.index()].masked {
        return None;
    }
    let written_before = |t: TensorId| einsums[..first].iter().any(|e| cascade.einsums[e.index()].target == t);
    // The filtered tensor is written once, and no recurrence steps before it.
    if einsums[first + 1..].iter().any(|e| cascade.einsums[e.index()].target == filtered)
        || einsums[..first].iter().any(|e| cascade.einsums[e.index()].recurrence_index().is_some())
    {
        return None;
    }
    let mut known: Vec<(TensorId, Abstract)> = vec![(filtered, Abstract::Undefined)];
    let mut next: Vec<(TensorId, Abstract)> = Vec::new();
    for id in &einsums[first + 1..] {
        let einsum = &cascade.einsums[id.index()];
        let target = einsum.target;
        let reader = Reader { cascade, index, known: &known, next: &next, written_before: &written_before };
        let mut value = reader.eval(&einsum.body);
        if !einsum.filter.is_empty() && value != Abstract::Undefined {
            value = Abstract::Unknown;
        }
        if einsum.recurrence_index() == Some(index) {
            if value != Abstract::Same(target) {
                return None;
            }
            next.push((target, value));
        } else {
            // Skipped, so it must not be seen outside the step.
            let position = cascade.tensor(target).ranks.iter().position(|r| *r == index.rank)?;
            if buffers[target.index()].slots[position] != Slot::Current {
                return None;
            }
            known.push((target, value));
        }
    }
    Some(filtered)
}

struct Reader<'a> {
    cascade: &'a Cascade,
    index: Index,
    known: &'a [(TensorId, Abstract)],
    next: &'a [(TensorId, Abstract)],
    written_before: &'a dyn Fn(TensorId) -> bool,
}

impl Reader<'_> {
    fn eval(&self, expr: &Expr) -> Abstract {
        use Abstract::*;
        match expr {
            Expr::Const(c) => Constant(*c),
            Expr::Param(p) => Constant(self.cascade.param(*p).value),
            Expr::Extent(_) | Expr::Index(_) => Unknown,
            Expr::Access { tensor, subscripts } => self.access(*tensor, subscripts),
            Expr::Unary(op, arg) => match (op, self.eval(arg)) {
                (_, Undefined) => Undefined,
                (UnaryOp::Exp, Constant(c)) => Constant(c.exp()),
                (UnaryOp::Neg, Constant(c)) => Constant(-c),
                _ => Unknown,
            },
            Expr::Binary(op, a, b) => {
                let (a, b) = (self.eval(a), self.eval(b));
                match (op, a, b) {
                    (_, Undefined, _) | (_, _, Undefined) => Undefined,
                    (_, Constant(x), Constant(y)) => Constant(op.apply(x, y)),
                    // Taken as exact for finite running values (see the module's comment).
                    (BinaryOp::Sub, Same(s), Same(t)) if s == t => Constant(0.0),
                    (BinaryOp::Max, Same(t), Constant(c)) | (BinaryOp::Max, Constant(c), Same(t))
                        if c == f64::NEG_INFINITY =>
                    {
                        Same(t)
                    }
                    (BinaryOp::Min, Same(t), Constant(c)) | (BinaryOp::Min, Constant(c), Same(t))
                        if c == f64::INFINITY =>
                    {
                        Same(t)
                    }
                    (BinaryOp::Add, Same(t), Constant(c)) | (BinaryOp::Add, Constant(c), Same(t)) if c == 0.0 => {
                        Same(t)
                    }
                    (BinaryOp::Sub, Same(t), Constant(0.0)) => Same(t),
                    (BinaryOp::Mul, Same(t), Constant(c)) | (BinaryOp::Mul, Constant(c), Same(t)) if c == 1.0 => {
                        Same(t)
                    }
                    (BinaryOp::Div, Same(t), Constant(1.0)) => Same(t),
                    _ => Unknown,
                }
            }
            // An empty reduction is its identity, and defined.
            Expr::Reduce { op, body, .. } => match self.eval(body) {
                Undefined => Constant(reduce_identity(*op)),
                _ => Unknown,
            },
        }
    }

    fn access(&self, tensor: TensorId, subscripts: &[Affine]) -> Abstract {
        let t = self.cascade.tensor(tensor);
        let Some(position) = t.ranks.iter().position(|r| *r == self.index.rank) else {
            return Abstract::Unknown;
        };
        let current = subscripts[position] == Affine::Index(self.index);
        let following = matches!(&subscripts[position], Affine::Add(a, b)
            if **a == Affine::Index(self.index) && **b == Affine::Const(1));
        if let Some((_, value)) = self.known.iter().find(|(k, _)| *k == tensor) {
            return if current { *value } else { Abstract::Unknown };
        }
        if matches!(t.kind, TensorKind::Defined { iterative: Some(_) }) && !(self.written_before)(tensor) {
            if current {
                return Abstract::Same(tensor);
            }
            if following {
                return self.next.iter().find(|(k, _)| *k == tensor).map_or(Abstract::Unknown, |(_, v)| *v);
            }
        }
        Abstract::Unknown
    }
}

#[cfg(test)]
mod tests {
    use crate::schedule::{schedule, Node};

    /// The tensor a kernel's streamed loop may skip on, by name.
    fn skipped_on(source: &str) -> Option<String> {
        let cascade = crate::compile_source(source).expect("checks").remove(0);
        let program = schedule(&cascade).expect("schedules");
        program.body.iter().find_map(|node| match node {
            Node::Loop { skip, .. } => skip.map(|t| cascade.tensor(t).name.clone()),
            Node::Compute { .. } => None,
        })
    }

    const TILES: &str = "kernel tiles {
  rank I, J = 4, P
  input X[I, J, P]
  S[i, j, p] = X[i, j, p] where i * J + j <= p
  T[i, p] = S[i, j, p]
  R[0, p] = 0
  R[i + 1, p] = R[i, p] + T[i, p]
  Y[p] = R[I, p]
  output Y
}";

    #[test]
    fn an_empty_sum_leaves_a_running_sum_unchanged() {
        assert_eq!(skipped_on(TILES).as_deref(), Some("S"));
    }

    #[test]
    fn a_step_that_changes_the_running_tensor_anyway_is_not_skipped() {
        let counting = TILES.replace("R[i, p] + T[i, p]", "R[i, p] + T[i, p] + 1");
        assert_eq!(skipped_on(&counting), None);
        // An undefined term makes the next iterate undefined: not the current one.
        let undefined =
            TILES.replace("T[i, p] = S[i, j, p]\n", "").replace("R[i, p] + T[i, p]", "R[i, p] + S[i, 0, p]");
        assert_eq!(skipped_on(&undefined), None);
        let scaled = TILES.replace("R[i, p] + T[i, p]", "R[i, p] * 2 + T[i, p]");
        assert_eq!(skipped_on(&scaled), None);
    }

    #[test]
    fn a_loop_without_a_filter_has_nothing_to_skip() {
        assert_eq!(skipped_on(&TILES.replace(" where i * J + j <= p", "")), None);
    }
}
