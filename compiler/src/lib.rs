//! The einfuse compiler: the Cascade IR and the passes over it.
//!
//! A kernel is a *cascade*: an ordered list of extended Einsums, each defining one tensor from
//! inputs, params and earlier tensors. An Einsum iterates over the product of its indices'
//! ranges; an index on the right that is not on the left is reduced (summed unless a `max[..]`
//! or `min[..]` says otherwise). Every tensor has a *domain* of defined points: a point is
//! defined when every operand it reads is defined and in range, its split pairs are valid
//! (`m1 * M0 + m0 < M`) and its `where` filter holds; a reduction over an empty set gives the
//! reducer's identity. Iterative tensors hold an initial value at `0` and one iterate per step
//! of their rank. `interp` is the executable form of these rules.
//!
//! Pipeline: `check` (AST to IR), `verify` (invariants), `print` (IR to `.ein`), `interp` (the
//! oracle), `graph` (the dependency graph as DOT), `shapes` (extents at a call).

pub mod check;
pub mod cpu;
pub mod generate;
pub mod graph;
pub mod helpers;
pub mod host;
pub mod interp;
pub mod ir;
pub mod llvm;
pub mod math;
pub mod optimize;
pub mod passcount;
pub mod print;
pub mod schedule;
pub mod shapes;
pub mod skip;
pub mod split;
pub mod verify;

pub use check::{check_file, check_kernel};
pub use ir::Cascade;

/// Parses and checks a whole source file.
pub fn compile_source(source: &str) -> Result<Vec<Cascade>, Vec<einfuse_dsl::Diagnostic>> {
    let (file, diagnostics) = einfuse_dsl::parse(source);
    // Checking a file that did not parse would mostly report the parse errors' consequences.
    if !diagnostics.is_empty() {
        return Err(diagnostics);
    }
    let (cascades, mut diagnostics) = check_file(&file);
    if diagnostics.is_empty() {
        Ok(cascades)
    } else {
        diagnostics.sort_by_key(|d| d.span.start);
        Err(diagnostics)
    }
}
