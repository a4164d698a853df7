//! The text form of the Cascade IR, which is `.ein` source.
//!
//! Printing is deterministic and re-parses to the same IR: reductions are written explicitly,
//! every filter comparison goes in the statement's `where` clause (where the checker attaches it
//! to the same reducer again), and parentheses follow the grammar's precedence exactly.

use std::fmt::Write;

use einfuse_dsl::ast::format_number;

use crate::ir::*;

/// Prints a cascade as a `.ein` kernel.
pub fn print_cascade(cascade: &Cascade) -> String {
    let mut out = String::new();
    writeln!(out, "kernel {} {{", cascade.name).unwrap();
    if !cascade.ranks.is_empty() {
        let ranks: Vec<String> = cascade
            .ranks
            .iter()
            .map(|rank| match rank.extent {
                Extent::Fixed(n) => format!("{} = {n}", rank.name),
                Extent::Symbolic => rank.name.clone(),
                Extent::Split { whole, tile } => {
                    format!("{} = {} / {}", rank.name, cascade.rank(whole).name, cascade.rank(tile).name)
                }
            })
            .collect();
        writeln!(out, "  rank {}", ranks.join(", ")).unwrap();
    }
    let inputs: Vec<String> = cascade
        .tensors
        .iter()
        .filter_map(|tensor| match tensor.kind {
            TensorKind::Input { elem } => {
                let ranks: Vec<&str> = tensor.ranks.iter().map(|r| cascade.rank(*r).name.as_str()).collect();
                let ty = if elem == ElemType::F32 { String::new() } else { format!(": {elem}") };
                Some(format!("{}[{}]{ty}", tensor.name, ranks.join(", ")))
            }
            TensorKind::Defined { .. } => None,
        })
        .collect();
    if !inputs.is_empty() {
        writeln!(out, "  input {}", inputs.join(", ")).unwrap();
    }
    for param in &cascade.params {
        writeln!(out, "  param {} = {}", param.name, format_number(param.value)).unwrap();
    }
    if !cascade.einsums.is_empty() {
        writeln!(out).unwrap();
    }
    for einsum in &cascade.einsums {
        writeln!(out, "  {}", print_einsum(cascade, einsum)).unwrap();
    }
    let outputs: Vec<String> = cascade
        .outputs
        .iter()
        .map(|output| {
            let name = &cascade.tensor(output.tensor).name;
            if output.elem == ElemType::F32 {
                name.clone()
            } else {
                format!("{name}: {}", output.elem)
            }
        })
        .collect();
    writeln!(out).unwrap();
    writeln!(out, "  output {}", outputs.join(", ")).unwrap();
    writeln!(out, "}}").unwrap();
    out
}

/// Prints several cascades as one file.
pub fn print_cascades(cascades: &[Cascade]) -> String {
    cascades.iter().map(print_cascade).collect::<Vec<_>>().join("\n")
}

/// Prints one Einsum statement (without indentation).
pub fn print_einsum(cascade: &Cascade, einsum: &Einsum) -> String {
    let lhs: Vec<String> = einsum
        .lhs
        .iter()
        .map(|lhs| match lhs {
            Lhs::Index(index) => cascade.index_name(*index),
            Lhs::Initial => "0".to_string(),
            Lhs::Next(index) => format!("{} + 1", cascade.index_name(*index)),
        })
        .collect();
    let mut text =
        format!("{}[{}] = {}", cascade.tensor(einsum.target).name, lhs.join(", "), print_expr(cascade, &einsum.body));
    let mut conds: Vec<String> = Vec::new();
    collect_filters(cascade, &einsum.body, &mut conds);
    conds.extend(einsum.filter.iter().map(|c| print_cond(cascade, c)));
    if !conds.is_empty() {
        write!(text, " where {}", conds.join(" && ")).unwrap();
    }
    text
}

fn collect_filters(cascade: &Cascade, expr: &Expr, out: &mut Vec<String>) {
    match expr {
        Expr::Reduce { filter, body, .. } => {
            out.extend(filter.iter().map(|c| print_cond(cascade, c)));
            collect_filters(cascade, body, out);
        }
        Expr::Unary(_, arg) => collect_filters(cascade, arg, out),
        Expr::Binary(_, a, b) => {
            collect_filters(cascade, a, out);
            collect_filters(cascade, b, out);
        }
        _ => {}
    }
}

pub fn print_cond(cascade: &Cascade, cond: &Cond) -> String {
    format!("{} {} {}", print_expr(cascade, &cond.lhs), cond.op.symbol(), print_expr(cascade, &cond.rhs))
}

/// Precedence levels: sums 1, products 2, unary minus 3, atoms 4.
fn precedence(expr: &Expr) -> u8 {
    match expr {
        Expr::Binary(BinaryOp::Add | BinaryOp::Sub, ..) => 1,
        Expr::Binary(BinaryOp::Mul | BinaryOp::Div, ..) => 2,
        Expr::Unary(UnaryOp::Neg, _) => 3,
        Expr::Const(value) if value.is_sign_negative() && *value != 0.0 => 3,
        _ => 4,
    }
}

pub fn print_expr(cascade: &Cascade, expr: &Expr) -> String {
    match expr {
        Expr::Const(value) => {
            if *value == 0.0 && value.is_sign_negative() {
                "-0".to_string()
            } else {
                format_number(*value)
            }
        }
        Expr::Param(id) => cascade.param(*id).name.clone(),
        Expr::Extent(id) => cascade.rank(*id).name.clone(),
        Expr::Index(index) => cascade.index_name(*index),
        Expr::Access { tensor, subscripts } => {
            let subs: Vec<String> = subscripts.iter().map(|s| print_affine(cascade, s, 0)).collect();
            format!("{}[{}]", cascade.tensor(*tensor).name, subs.join(", "))
        }
        Expr::Unary(UnaryOp::Neg, arg) => format!("-{}", wrap(cascade, arg, precedence(arg) < 3)),
        Expr::Unary(op, arg) => format!("{}({})", op.name(), print_expr(cascade, arg)),
        Expr::Binary(op @ (BinaryOp::Max | BinaryOp::Min), a, b) => {
            let name = if *op == BinaryOp::Max { "max" } else { "min" };
            format!("{name}({}, {})", print_expr(cascade, a), print_expr(cascade, b))
        }
        Expr::Binary(op, a, b) => {
            let (level, symbol) = match op {
                BinaryOp::Add => (1, "+"),
                BinaryOp::Sub => (1, "-"),
                BinaryOp::Mul => (2, "*"),
                _ => (2, "/"),
            };
            format!("{} {symbol} {}", wrap(cascade, a, precedence(a) < level), wrap(cascade, b, precedence(b) <= level))
        }
        Expr::Reduce { op, indices, body, .. } => {
            let names: Vec<String> = indices.iter().map(|i| cascade.index_name(*i)).collect();
            format!("{}[{}]({})", op.name(), names.join(", "), print_expr(cascade, body))
        }
    }
}

fn wrap(cascade: &Cascade, expr: &Expr, parens: bool) -> String {
    let text = print_expr(cascade, expr);
    if parens {
        format!("({text})")
    } else {
        text
    }
}

/// Prints a subscript; `outer` is the precedence of the context.
pub fn print_affine(cascade: &Cascade, affine: &Affine, outer: u8) -> String {
    let (level, text) = match affine {
        Affine::Const(c) if *c < 0 => (3, c.to_string()),
        Affine::Const(c) => (4, c.to_string()),
        Affine::Index(index) => (4, cascade.index_name(*index)),
        Affine::Extent(rank) => (4, cascade.rank(*rank).name.clone()),
        Affine::Add(a, b) => (1, format!("{} + {}", print_affine(cascade, a, 0), print_affine(cascade, b, 1))),
        Affine::Sub(a, b) => (1, format!("{} - {}", print_affine(cascade, a, 0), print_affine(cascade, b, 1))),
        Affine::Mul(a, b) => (2, format!("{} * {}", print_affine(cascade, a, 1), print_affine(cascade, b, 2))),
        Affine::Neg(a) => (3, format!("-{}", print_affine(cascade, a, 2))),
    };
    // `outer` is the level a child must exceed to go without parentheses.
    if level <= outer {
        format!("({text})")
    } else {
        text
    }
}
