//! Divisions by a constant as multiplications by its reciprocal, as hand-written kernels compute
//! them (FlashAttention multiplies its scores by `1 / softcap`): a vector division takes several
//! cycles where a multiplication takes half of one, and soft-capping's `x / cap` ran once per
//! score (where `tanh`, below 0.625, divides nothing itself).
//!
//! Needs: a checked cascade. Guarantees: every `a / c` in an Einsum's value, where `c` is a
//! constant or a param that is finite and nonzero with a finite normal reciprocal, reads
//! `a * r` with `r = 1 / c` (rounded to `f32` once, when the kernel is compiled; the product is
//! within two roundings of the quotient). Conditions (statement and reduction filters) are left
//! as written, so that which points a mask keeps does not move; so is everything else.

use crate::ir::*;

/// `cascade` with its divisions by constants turned into multiplications (see the module).
pub fn constant_divisions(cascade: &Cascade) -> Cascade {
    let mut c = cascade.clone();
    for einsum in &mut c.einsums {
        rewrite(&mut einsum.body, &cascade.params);
    }
    c
}

fn rewrite(e: &mut Expr, params: &[Param]) {
    match e {
        Expr::Unary(_, a) => rewrite(a, params),
        Expr::Binary(_, a, b) => {
            rewrite(a, params);
            rewrite(b, params);
        }
        Expr::Reduce { body, .. } => rewrite(body, params),
        Expr::Const(_) | Expr::Param(_) | Expr::Extent(_) | Expr::Index(_) | Expr::Access { .. } => {}
    }
    let Expr::Binary(BinaryOp::Div, a, b) = e else { return };
    let value = match **b {
        Expr::Const(v) => v,
        Expr::Param(p) => params[p.index()].value,
        _ => return,
    };
    let reciprocal = (1.0 / value) as f32;
    if !value.is_finite() || value == 0.0 || !reciprocal.is_normal() {
        return;
    }
    let a = std::mem::replace(a, Box::new(Expr::Const(0.0)));
    *e = Expr::Binary(BinaryOp::Mul, a, Box::new(Expr::Const(reciprocal as f64)));
}
