//! Metamorphic tests of the analysis and the optimizer: every corpus kernel written other ways
//! than the corpus writes it, by a seeded generator of rewritings of the Cascade IR:
//!
//! - `rename`: the bound indices of reductions primed (`sum[m']`), where no name clashes;
//! - `reorder`: the statements in another order that still defines each tensor before use;
//! - `commute`: the operands of `+`, `*`, `max` and `min` swapped;
//! - `inline`: an element-wise intermediate substituted into its readers;
//! - `name`: an element-wise subexpression made a tensor of its own;
//! - `reciprocal`: a division written as a product by a reciprocal (`a * (1 / b)`).
//!
//! Every rewriting computes the same values on the interpreter and optimizes to the same passes
//! as the kernel it came from, and the optimizer's claim equals the analysis of its output; the
//! rewritings that only rename, reorder, commute, inline or name keep the as-written table. A
//! fixed-seed set runs in CI; `EINFUSE_META_CASES=N cargo test --release --test metamorphic long
//! -- --ignored` runs N more.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use einfuse::compiler::interp::{interpret, InterpLimits};
use einfuse::compiler::ir::*;
use einfuse::compiler::optimize::{optimize, OptimizeOptions};
use einfuse::compiler::passcount::analyze;
use einfuse::compiler::print::print_cascade;
use einfuse::compiler::shapes::{bind_extents, tensor_shape};
use einfuse::{DType, Tensor};

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Rename,
    Reorder,
    Commute,
    Inline,
    Name,
    Reciprocal,
}

const KINDS: [Kind; 6] = [Kind::Rename, Kind::Reorder, Kind::Commute, Kind::Inline, Kind::Name, Kind::Reciprocal];

impl Kind {
    /// Whether the rewriting only renames, reorders, commutes, inlines or names: the as-written
    /// pass table stays.
    fn keeps_table(self) -> bool {
        self != Kind::Reciprocal
    }
}

fn map_expr(expr: &Expr, f: &mut dyn FnMut(&Expr) -> Option<Expr>) -> Expr {
    if let Some(replaced) = f(expr) {
        return replaced;
    }
    match expr {
        Expr::Unary(op, a) => Expr::Unary(*op, Box::new(map_expr(a, f))),
        Expr::Binary(op, a, b) => Expr::Binary(*op, Box::new(map_expr(a, f)), Box::new(map_expr(b, f))),
        Expr::Reduce { op, indices, filter, body } => Expr::Reduce {
            op: *op,
            indices: indices.clone(),
            filter: filter
                .iter()
                .map(|c| Cond { lhs: map_expr(&c.lhs, f), op: c.op, rhs: map_expr(&c.rhs, f) })
                .collect(),
            body: Box::new(map_expr(body, f)),
        },
        other => other.clone(),
    }
}

fn rename_affine(a: &Affine, from: Index, to: &Affine) -> Affine {
    match a {
        Affine::Index(i) if *i == from => to.clone(),
        Affine::Add(x, y) => Affine::Add(Box::new(rename_affine(x, from, to)), Box::new(rename_affine(y, from, to))),
        Affine::Sub(x, y) => Affine::Sub(Box::new(rename_affine(x, from, to)), Box::new(rename_affine(y, from, to))),
        Affine::Mul(x, y) => Affine::Mul(Box::new(rename_affine(x, from, to)), Box::new(rename_affine(y, from, to))),
        Affine::Neg(x) => Affine::Neg(Box::new(rename_affine(x, from, to))),
        other => other.clone(),
    }
}

fn affine_expr(a: &Affine) -> Expr {
    let bin = |op, x: &Affine, y: &Affine| Expr::Binary(op, Box::new(affine_expr(x)), Box::new(affine_expr(y)));
    match a {
        Affine::Const(c) => Expr::Const(*c as f64),
        Affine::Index(i) => Expr::Index(*i),
        Affine::Extent(r) => Expr::Extent(*r),
        Affine::Add(x, y) => bin(BinaryOp::Add, x, y),
        Affine::Sub(x, y) => bin(BinaryOp::Sub, x, y),
        Affine::Mul(x, y) => bin(BinaryOp::Mul, x, y),
        Affine::Neg(x) => Expr::Unary(UnaryOp::Neg, Box::new(affine_expr(x))),
    }
}

/// `expr` with the index `from` replaced by `to` everywhere (as a value and in subscripts).
fn substitute(expr: &Expr, from: Index, to: &Affine) -> Expr {
    map_expr(expr, &mut |e| match e {
        Expr::Index(i) if *i == from => Some(affine_expr(to)),
        Expr::Access { tensor, subscripts } => Some(Expr::Access {
            tensor: *tensor,
            subscripts: subscripts.iter().map(|s| rename_affine(s, from, to)).collect(),
        }),
        _ => None,
    })
}

fn indices_of(expr: &Expr) -> BTreeSet<Index> {
    let mut found = BTreeSet::new();
    expr.walk(&mut |e| match e {
        Expr::Index(i) => {
            found.insert(*i);
        }
        Expr::Access { subscripts, .. } => subscripts.iter().for_each(|s| {
            s.for_each_index(&mut |i| {
                found.insert(i);
            })
        }),
        Expr::Reduce { indices, .. } => found.extend(indices.iter().copied()),
        _ => {}
    });
    found
}

fn has_reduce(expr: &Expr) -> bool {
    let mut any = false;
    expr.walk(&mut |e| any |= matches!(e, Expr::Reduce { .. }));
    any
}

fn is_iterative(c: &Cascade, t: TensorId) -> bool {
    matches!(c.tensor(t).kind, TensorKind::Defined { iterative: Some(_) })
}

/// One rewriting of `c`, or `None` where the kind does not apply.
fn rewrite(c: &Cascade, kind: Kind, rng: &mut Rng) -> Option<Cascade> {
    let mut out = c.clone();
    match kind {
        Kind::Rename => {
            let mut changed = false;
            for einsum in &mut out.einsums {
                let mut used: BTreeSet<Index> = indices_of(&einsum.body);
                used.extend(einsum.lhs_indices());
                for cond in &einsum.filter {
                    used.extend(indices_of(&cond.lhs));
                    used.extend(indices_of(&cond.rhs));
                }
                einsum.body = map_expr(&einsum.body.clone(), &mut |e| {
                    let Expr::Reduce { op, indices, filter, body } = e else { return None };
                    let mut renamed = Vec::new();
                    let (mut body, mut filter) = ((**body).clone(), filter.clone());
                    for index in indices {
                        let free: Vec<Index> = (1..=3u8)
                            .map(|p| Index { rank: index.rank, primes: p })
                            .filter(|i| !used.contains(i))
                            .collect();
                        if free.is_empty() {
                            renamed.push(*index);
                            continue;
                        }
                        let fresh = free[rng.below(free.len())];
                        used.insert(fresh);
                        let to = Affine::Index(fresh);
                        body = substitute(&body, *index, &to);
                        filter = filter
                            .iter()
                            .map(|c| Cond {
                                lhs: substitute(&c.lhs, *index, &to),
                                op: c.op,
                                rhs: substitute(&c.rhs, *index, &to),
                            })
                            .collect();
                        renamed.push(fresh);
                        changed = true;
                    }
                    Some(Expr::Reduce { op: *op, indices: renamed, filter, body: Box::new(body) })
                });
            }
            changed.then_some(out)
        }
        Kind::Reorder => {
            // Groups of definitions (a tensor's initial value and recurrence stay together), then a
            // random order in which every tensor is defined before another tensor reads it.
            let mut groups: Vec<(TensorId, Vec<Einsum>)> = Vec::new();
            for einsum in &c.einsums {
                match groups.iter_mut().find(|(t, _)| *t == einsum.target) {
                    Some((_, list)) => list.push(einsum.clone()),
                    None => groups.push((einsum.target, vec![einsum.clone()])),
                }
            }
            let mut placed: BTreeSet<TensorId> = BTreeSet::new();
            let mut order = Vec::new();
            while !groups.is_empty() {
                let ready: Vec<usize> = (0..groups.len())
                    .filter(|g| {
                        groups[*g].1.iter().all(|e| {
                            e.reads().iter().all(|(t, _)| {
                                *t == e.target
                                    || placed.contains(t)
                                    || matches!(c.tensor(*t).kind, TensorKind::Input { .. })
                            })
                        })
                    })
                    .collect();
                if ready.is_empty() {
                    return None;
                }
                let pick = ready[rng.below(ready.len())];
                let (tensor, list) = groups.remove(pick);
                placed.insert(tensor);
                order.extend(list);
            }
            let changed = order != c.einsums;
            out.einsums = order;
            changed.then_some(out)
        }
        Kind::Commute => {
            let mut changed = false;
            for einsum in &mut out.einsums {
                einsum.body = map_expr(&einsum.body.clone(), &mut |e| match e {
                    Expr::Binary(op @ (BinaryOp::Add | BinaryOp::Mul | BinaryOp::Max | BinaryOp::Min), a, b)
                        if rng.below(2) == 0 =>
                    {
                        changed = true;
                        let flip = |x: &Expr| map_expr(x, &mut |_| None);
                        Some(Expr::Binary(*op, Box::new(flip(b)), Box::new(flip(a))))
                    }
                    _ => None,
                });
            }
            changed.then_some(out)
        }
        Kind::Inline => {
            // A tensor with one plain definition, element-wise, unfiltered, not an output.
            let candidates: Vec<TensorId> = (0..c.tensors.len())
                .map(TensorId::new)
                .filter(|t| matches!(c.tensor(*t).kind, TensorKind::Defined { iterative: None }))
                .filter(|t| !c.outputs.iter().any(|o| o.tensor == *t))
                .filter(|t| {
                    let defs: Vec<_> = c.definitions(*t).collect();
                    defs.len() == 1
                        && defs[0].1.filter.is_empty()
                        && !has_reduce(&defs[0].1.body)
                        && defs[0].1.lhs.iter().all(|l| matches!(l, Lhs::Index(_)))
                        && c.einsums.iter().all(|e| {
                            e.filter
                                .iter()
                                .all(|f| !f.lhs.accesses().iter().chain(f.rhs.accesses().iter()).any(|(r, _)| r == t))
                        })
                })
                .collect();
            if candidates.is_empty() {
                return None;
            }
            let tensor = candidates[rng.below(candidates.len())];
            let (_, definition) = c.definitions(tensor).next().expect("one definition");
            let definition = definition.clone();
            let lhs: Vec<Index> = definition.lhs_indices().collect();
            let mut readers_changed = false;
            for einsum in out.einsums.iter_mut().filter(|e| e.target != tensor) {
                einsum.body = map_expr(&einsum.body.clone(), &mut |e| match e {
                    Expr::Access { tensor: t, subscripts } if *t == tensor => {
                        readers_changed = true;
                        // Substitute through fresh placeholders so that one index's value does not
                        // capture another's (`T[p, m]` read as `T[m, p]`).
                        let mut body = definition.body.clone();
                        let placeholders: Vec<Index> = lhs
                            .iter()
                            .enumerate()
                            .map(|(n, i)| Index { rank: i.rank, primes: 200 + n as u8 })
                            .collect();
                        for (i, ph) in lhs.iter().zip(&placeholders) {
                            body = substitute(&body, *i, &Affine::Index(*ph));
                        }
                        for (ph, s) in placeholders.iter().zip(subscripts) {
                            body = substitute(&body, *ph, s);
                        }
                        Some(body)
                    }
                    _ => None,
                });
            }
            if !readers_changed {
                return None;
            }
            out.einsums.retain(|e| e.target != tensor);
            Some(out)
        }
        Kind::Name => {
            // An element-wise subexpression of a plain Einsum, outside any reduction, whose
            // indices are all plain left-hand indices of that Einsum.
            let plain: Vec<usize> = (0..c.einsums.len())
                .filter(|e| !is_iterative(c, c.einsums[*e].target))
                .filter(|e| c.einsums[*e].lhs.iter().all(|l| matches!(l, Lhs::Index(_))))
                .collect();
            if plain.is_empty() {
                return None;
            }
            let at = plain[rng.below(plain.len())];
            let einsum = &c.einsums[at];
            let lhs: Vec<Index> = einsum.lhs_indices().collect();
            let mut options: Vec<Expr> = Vec::new();
            let collect = |e: &Expr, options: &mut Vec<Expr>| {
                if matches!(e, Expr::Unary(..) | Expr::Binary(..))
                    && !has_reduce(e)
                    && indices_of(e).iter().all(|i| lhs.contains(i))
                {
                    options.push(e.clone());
                }
            };
            // Only outside reductions: the top of the body and its element-wise parents.
            fn outside(e: &Expr, visit: &mut dyn FnMut(&Expr)) {
                visit(e);
                match e {
                    Expr::Unary(_, a) => outside(a, visit),
                    Expr::Binary(_, a, b) => {
                        outside(a, visit);
                        outside(b, visit);
                    }
                    _ => {}
                }
            }
            outside(&einsum.body, &mut |e| collect(e, &mut options));
            if options.is_empty() {
                return None;
            }
            let chosen = options[rng.below(options.len())].clone();
            let used: Vec<Index> = lhs.iter().copied().filter(|i| indices_of(&chosen).contains(i)).collect();
            let name = (1..).map(|n| format!("NAMED{n}")).find(|n| c.tensor_by_name(n).is_none()).expect("a name");
            out.tensors.push(einfuse::compiler::ir::Tensor {
                name,
                ranks: used.iter().map(|i| i.rank).collect(),
                kind: TensorKind::Defined { iterative: None },
            });
            let named = TensorId::new(out.tensors.len() - 1);
            let read = Expr::Access { tensor: named, subscripts: used.iter().map(|i| Affine::Index(*i)).collect() };
            let mut replaced = false;
            out.einsums[at].body = map_expr(&einsum.body, &mut |e| {
                (!replaced && *e == chosen).then(|| {
                    replaced = true;
                    read.clone()
                })
            });
            let definition = Einsum {
                target: named,
                lhs: used.iter().map(|i| Lhs::Index(*i)).collect(),
                body: chosen,
                filter: vec![],
            };
            out.einsums.insert(at, definition);
            Some(out)
        }
        Kind::Reciprocal => {
            let mut changed = false;
            for einsum in &mut out.einsums {
                einsum.body = map_expr(&einsum.body.clone(), &mut |e| match e {
                    Expr::Binary(BinaryOp::Div, a, b) if !matches!(**a, Expr::Const(_)) => {
                        changed = true;
                        let (a, b) = (map_expr(a, &mut |_| None), map_expr(b, &mut |_| None));
                        let reciprocal = Expr::Binary(BinaryOp::Div, Box::new(Expr::Const(1.0)), Box::new(b));
                        Some(Expr::Binary(BinaryOp::Mul, Box::new(a), Box::new(reciprocal)))
                    }
                    _ => None,
                });
            }
            changed.then_some(out)
        }
    }
}

/// The interpreter's outputs on seeded inputs (scaled so that some logits are large).
fn values(c: &Cascade, sizes: &BTreeMap<&str, u64>, seed: u64) -> Vec<Vec<f64>> {
    let bindings: Vec<(String, u64)> = c
        .ranks
        .iter()
        .filter(|r| matches!(r.extent, Extent::Symbolic))
        .map(|r| (r.name.clone(), sizes.get(r.name.as_str()).copied().unwrap_or(3)))
        .collect();
    let extents = bind_extents(c, &bindings, &[]).unwrap();
    let inputs: Vec<Vec<f64>> = c
        .inputs()
        .iter()
        .enumerate()
        .map(|(n, id)| {
            let shape = tensor_shape(c, *id, &extents).iter().map(|s| *s as usize).collect();
            Tensor::random(DType::F32, shape, seed * 31 + n as u64).unwrap().to_f64()
        })
        .collect();
    let slices: Vec<&[f64]> = inputs.iter().map(Vec::as_slice).collect();
    interpret(c, &extents, &slices, InterpLimits::default()).unwrap()
}

/// Passes per rank of the optimized kernel, checked against the optimizer's own claim.
fn optimized_passes(c: &Cascade) -> Result<Vec<(String, usize)>, String> {
    let optimized = optimize(c, &OptimizeOptions::default()).map_err(|e| e.to_string())?;
    let report = analyze(&optimized.cascade);
    if optimized.changed {
        for (rank, claimed) in &optimized.claimed_passes {
            if let Some(found) = report.passes(rank) {
                if found != *claimed as usize {
                    return Err(format!(
                        "the optimizer claims {claimed} passes over {rank}, the analysis finds {found}"
                    ));
                }
            }
        }
    }
    Ok(report.counts())
}

/// Checks one rewriting against the kernel it came from.
fn check(original: &Cascade, rewritten: &Cascade, kind: Kind) -> Result<(), String> {
    let text = print_cascade(rewritten);
    let parsed = einfuse::compiler::compile_source(&text)
        .map_err(|d| format!("does not check: {}", einfuse::dsl::diagnostic::render_all(&d, "rewritten.ein", &text)))?
        .remove(0);
    if kind.keeps_table() && analyze(original).counts() != analyze(&parsed).counts() {
        return Err(format!("as written: {:?} against {:?}", analyze(original).counts(), analyze(&parsed).counts()));
    }
    let (want, got) = (optimized_passes(original)?, optimized_passes(&parsed)?);
    // The ranks of the original; a split rank the optimizer made is named the same way in both.
    let want_max = want.iter().map(|(_, n)| *n).max().unwrap_or(0);
    let got_max = got.iter().map(|(_, n)| *n).max().unwrap_or(0);
    if want_max != got_max {
        return Err(format!("optimized: {want:?} against {got:?}"));
    }
    for sizes in
        [[("M", 37u64), ("P", 5), ("K", 9), ("H", 2), ("T", 4)], [("M", 1), ("P", 2), ("K", 1), ("H", 1), ("T", 1)]]
    {
        let sizes: BTreeMap<&str, u64> = sizes.into();
        let (a, b) = (values(original, &sizes, 7), values(&parsed, &sizes, 7));
        for (x, y) in a.iter().flatten().zip(b.iter().flatten()) {
            let same = (x - y).abs() <= 1e-9 * (1.0 + x.abs()) || (x.is_nan() && y.is_nan()) || x == y;
            if !same {
                return Err(format!("values differ at sizes {sizes:?}: {x} against {y}"));
            }
        }
    }
    Ok(())
}

/// Runs `cases` rewritings from `seed`; returns (checked, failures).
fn campaign(seed: u64, cases: usize) -> (usize, Vec<String>) {
    let corpus = common::kernels_in("examples");
    let mut rng = Rng(seed.max(1));
    let mut checked = 0;
    let mut failures = Vec::new();
    let mut attempts = 0;
    while checked < cases && attempts < cases * 20 {
        attempts += 1;
        let original = &corpus[rng.below(corpus.len())];
        // One to three rewritings in a row.
        let steps = 1 + rng.below(3);
        let mut current = original.clone();
        let mut kinds = Vec::new();
        for _ in 0..steps {
            let kind = KINDS[rng.below(KINDS.len())];
            if let Some(next) = rewrite(&current, kind, &mut rng) {
                // Later kinds see the rewriting as the checker sees it.
                let text = print_cascade(&next);
                match einfuse::compiler::compile_source(&text) {
                    Ok(mut parsed) => current = parsed.remove(0),
                    Err(_) => current = next,
                }
                kinds.push(kind);
            }
        }
        if kinds.is_empty() {
            continue;
        }
        checked += 1;
        let keeps = kinds.iter().all(|k| k.keeps_table());
        let kind = if keeps { Kind::Rename } else { Kind::Reciprocal };
        if let Err(why) = check(original, &current, kind) {
            failures.push(format!("{} via {kinds:?}: {why}\n{}", original.name, print_cascade(&current)));
        }
    }
    (checked, failures)
}

#[test]
fn rewritings_keep_passes_and_values() {
    let (checked, failures) = campaign(0x5eed, 300);
    assert!(checked >= 300, "only {checked} rewritings applied");
    assert!(failures.is_empty(), "{} of {checked} rewritings disagree:\n{}", failures.len(), failures.join("\n\n"));
}

/// Every kind of rewriting applies to some corpus kernel, and each such rewriting passes.
#[test]
fn every_kind_applies() {
    let corpus = common::kernels_in("examples");
    for kind in KINDS {
        let mut rng = Rng(3);
        let found = corpus.iter().find_map(|k| (0..20).find_map(|_| rewrite(k, kind, &mut rng)).map(|r| (k, r)));
        let (original, rewritten) = found.unwrap_or_else(|| panic!("{kind:?} applies to no corpus kernel"));
        check(original, &rewritten, kind).unwrap_or_else(|why| panic!("{kind:?} on {}: {why}", original.name));
    }
}

#[test]
#[ignore = "a long campaign: EINFUSE_META_CASES=2000 cargo test --release --test metamorphic long -- --ignored"]
fn long() {
    let cases: usize = std::env::var("EINFUSE_META_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(2000);
    let seed: u64 = std::env::var("EINFUSE_META_SEED").ok().and_then(|n| n.parse().ok()).unwrap_or(0xfeed);
    let (checked, failures) = campaign(seed, cases);
    println!("{checked} rewritings checked, {} disagree", failures.len());
    assert!(failures.is_empty(), "{} of {checked} rewritings disagree:\n{}", failures.len(), failures.join("\n\n"));
}
