//! Every rewrite rule against the interpreter: its two sides, written as cascades, agree on random
//! data under the rule's side condition, and the optimizer applies the rule to the left side.
//! Every rule that must not fire has a negative test.

use std::collections::BTreeMap;

use einfuse::compiler::interp::{interpret, InterpLimits};
use einfuse::compiler::ir::{Cascade, Extent};
use einfuse::compiler::optimize::{optimize, OptimizeOptions};
use einfuse::compiler::shapes::{bind_extents, tensor_shape};
use einfuse::{DType, Tensor};

fn kernel(source: &str) -> Cascade {
    let text = format!("kernel k {{\n  rank M, P, F = 3\n  input A[M, P], B[P], C[M, P], V[F, M]\n{source}\n}}\n");
    einfuse::compiler::compile_source(&text)
        .unwrap_or_else(|d| panic!("{}", einfuse::dsl::diagnostic::render_all(&d, "rule.ein", &text)))
        .remove(0)
}

fn evaluate(cascade: &Cascade, m: u64, p: u64, seed: u64) -> Vec<Vec<f64>> {
    let sizes: BTreeMap<&str, u64> = [("M", m), ("P", p)].into();
    let bindings: Vec<(String, u64)> = cascade
        .ranks
        .iter()
        .filter(|r| matches!(r.extent, Extent::Symbolic))
        .map(|r| (r.name.clone(), sizes[r.name.as_str()]))
        .collect();
    let extents = bind_extents(cascade, &bindings, &[]).unwrap();
    let inputs: Vec<Vec<f64>> = cascade
        .inputs()
        .iter()
        .enumerate()
        .map(|(n, id)| {
            let shape = tensor_shape(cascade, *id, &extents).iter().map(|s| *s as usize).collect();
            Tensor::random(DType::F32, shape, seed * 10 + n as u64).unwrap().to_f64()
        })
        .collect();
    let slices: Vec<&[f64]> = inputs.iter().map(Vec::as_slice).collect();
    interpret(cascade, &extents, &slices, InterpLimits::default()).unwrap()
}

fn assert_same(left: &Cascade, right: &Cascade, what: &str) {
    for (m, p) in [(1, 1), (7, 3), (70, 2), (130, 4)] {
        for seed in 0..3 {
            let (a, b) = (evaluate(left, m, p, seed), evaluate(right, m, p, seed));
            for (x, y) in a.iter().flatten().zip(b.iter().flatten()) {
                assert!((x - y).abs() <= 1e-9 * (1.0 + x.abs()), "{what} (M={m}, P={p}): {x} vs {y}");
            }
        }
    }
}

fn applied(cascade: &Cascade, options: &OptimizeOptions) -> Vec<String> {
    optimize(cascade, options).unwrap().applied.into_iter().map(|(_, rule, _)| rule).collect()
}

/// (rule, left side, right side): statements after the shared declarations; `Y` is the output.
const RULES: &[(&str, &str, &str)] = &[
    (
        "div-out-of-mul-left",
        "D[p] = exp(B[p])\n Y[m, p] = (A[m, p] / D[p]) * C[m, p]\n output Y",
        "D[p] = exp(B[p])\n Y[m, p] = (A[m, p] * C[m, p]) / D[p]\n output Y",
    ),
    (
        "div-out-of-mul-right",
        "D[p] = exp(B[p])\n Y[m, p] = C[m, p] * (A[m, p] / D[p])\n output Y",
        "D[p] = exp(B[p])\n Y[m, p] = (C[m, p] * A[m, p]) / D[p]\n output Y",
    ),
    (
        "defer-division",
        "D[p] = exp(B[p])\n Y[p] = sum[m](A[m, p] / D[p])\n output Y",
        "D[p] = exp(B[p])\n Y[p] = sum[m](A[m, p]) / max(D[p], 1.1754943508222875e-38)\n output Y",
    ),
    ("defer-factor-left", "Y[p] = sum[m](B[p] * A[m, p])\n output Y", "Y[p] = B[p] * sum[m](A[m, p])\n output Y"),
    ("defer-factor-right", "Y[p] = sum[m](A[m, p] * B[p])\n output Y", "Y[p] = sum[m](A[m, p]) * B[p]\n output Y"),
    (
        "filter-into-exp",
        "Y[m, p] = exp(A[m, p]) where C[m, p] > 0\n output Y",
        "T[m, p] = A[m, p] where C[m, p] > 0\n Y[m, p] = exp(T[m, p])\n output Y",
    ),
    (
        "filter-into-sub",
        "Y[m, p] = A[m, p] - B[p] where C[m, p] > 0\n output Y",
        "T[m, p] = A[m, p] where C[m, p] > 0\n Y[m, p] = T[m, p] - B[p]\n output Y",
    ),
    (
        "filter-into-mul",
        "Y[m, p] = A[m, p] * B[p] where C[m, p] > 0\n output Y",
        "T[m, p] = A[m, p] where C[m, p] > 0\n Y[m, p] = T[m, p] * B[p]\n output Y",
    ),
    (
        "filter-out-of-mul-left",
        "T[m, p] = A[m, p] where C[m, p] > 0\n Y[m, p] = T[m, p] * B[p]\n output Y",
        "Y[m, p] = A[m, p] * B[p] where C[m, p] > 0\n output Y",
    ),
    (
        "filter-out-of-mul-right",
        "T[m, p] = A[m, p] where C[m, p] > 0\n Y[m, p] = B[p] * T[m, p]\n output Y",
        "Y[m, p] = B[p] * A[m, p] where C[m, p] > 0\n output Y",
    ),
    (
        "filter-into-div",
        "D[p] = exp(B[p])\n Y[m, p] = A[m, p] / D[p] where C[m, p] > 0\n output Y",
        "T[m, p] = A[m, p] where C[m, p] > 0\n D[p] = exp(B[p])\n Y[m, p] = T[m, p] / D[p]\n output Y",
    ),
    (
        "filter-twice",
        "T[m, p] = A[m, p] where C[m, p] > 0\n Y[m, p] = T[m, p] where C[m, p] > 0\n output Y",
        "Y[m, p] = A[m, p] where C[m, p] > 0\n output Y",
    ),
    ("max-twice", "Y[m, p] = max(max(A[m, p], B[p]), B[p])\n output Y", "Y[m, p] = max(A[m, p], B[p])\n output Y"),
    (
        "max-positive-factor",
        "D[p] = exp(B[p])\n Y[p] = max[m](A[m, p] * D[p])\n output Y",
        "D[p] = exp(B[p])\n Y[p] = max[m](A[m, p]) * D[p]\n output Y",
    ),
    ("max-bias", "Y[p] = max[m](A[m, p] + B[p])\n output Y", "Y[p] = max[m](A[m, p]) + B[p]\n output Y"),
    (
        "shift-by-larger-max-left",
        "G[p] = max(max[m](A[m, p]), B[p])\n Y[m, p] = exp(A[m, p] - G[p])\n output Y",
        "H[p] = max[m](A[m, p])\n Y[m, p] = exp(A[m, p] - H[p]) * exp(H[p] - max(H[p], B[p]))\n output Y",
    ),
    (
        "shift-by-larger-max-right",
        "G[p] = max(B[p], max[m](A[m, p]))\n Y[m, p] = exp(A[m, p] - G[p])\n output Y",
        "H[p] = max[m](A[m, p])\n Y[m, p] = exp(A[m, p] - H[p]) * exp(H[p] - max(B[p], H[p]))\n output Y",
    ),
    (
        "scale-after-shift-right",
        "G[p] = max[m](A[m, p])\n Y[m, p] = exp((A[m, p] - G[p]) * 2)\n output Y",
        "G[p] = max[m](A[m, p] * 2)\n Y[m, p] = exp(A[m, p] * 2 - G[p])\n output Y",
    ),
    (
        "scale-after-shift-left",
        "G[p] = max[m](A[m, p])\n Y[m, p] = exp(2 * (A[m, p] - G[p]))\n output Y",
        "G[p] = max[m](A[m, p] * 2)\n Y[m, p] = exp(A[m, p] * 2 - G[p])\n output Y",
    ),
    (
        "exp-minus-log-right",
        "D[p] = exp(B[p])\n Y[m, p] = exp(A[m, p] - (B[p] + log(D[p])))\n output Y",
        "D[p] = exp(B[p])\n Y[m, p] = exp(A[m, p] - B[p]) / D[p]\n output Y",
    ),
    (
        "exp-minus-log-left",
        "D[p] = exp(B[p])\n Y[m, p] = exp(A[m, p] - (log(D[p]) + B[p]))\n output Y",
        "D[p] = exp(B[p])\n Y[m, p] = exp(A[m, p] - B[p]) / D[p]\n output Y",
    ),
    (
        "exp-minus-log-after",
        "D[p] = exp(B[p])\n Y[m, p] = exp(A[m, p] - B[p] - log(D[p]))\n output Y",
        "D[p] = exp(B[p])\n Y[m, p] = exp(A[m, p] - B[p]) / D[p]\n output Y",
    ),
    (
        "reciprocal-right",
        "D[p] = exp(B[p])\n Y[m, p] = A[m, p] * (1 / D[p])\n output Y",
        "D[p] = exp(B[p])\n Y[m, p] = A[m, p] / D[p]\n output Y",
    ),
    (
        "reciprocal-left",
        "D[p] = exp(B[p])\n Y[m, p] = (1 / D[p]) * A[m, p]\n output Y",
        "D[p] = exp(B[p])\n Y[m, p] = A[m, p] / D[p]\n output Y",
    ),
];

#[test]
fn both_sides_of_every_rule_agree() {
    for (rule, left, right) in RULES {
        let (left, right) = (kernel(left), kernel(right));
        assert_same(&left, &right, rule);
        assert!(applied(&left, &OptimizeOptions::default()).contains(&rule.to_string()), "{rule} does not fire");
    }
}

/// The online-sum rules: the right side is the running-max recurrence the optimizer emits.
#[test]
fn online_sums_agree_with_their_lowering() {
    let cases = [
        ("online-sum-right", "G[p] = max[m](A[m, p])\n Y[f, p] = sum[m](exp(A[m, p] - G[p]) * V[f, m])\n output Y"),
        ("online-sum-left", "G[p] = max[m](A[m, p])\n Y[f, p] = sum[m](V[f, m] * exp(A[m, p] - G[p]))\n output Y"),
        ("online-sum-one", "G[p] = max[m](A[m, p])\n Y[p] = sum[m](exp(A[m, p] - G[p]))\n output Y"),
        ("online-sum-one", "S[m, p] = A[m, p] where C[m, p] > 0\n G[p] = max[m](S[m, p])\n Y[p] = sum[m](exp(S[m, p] - G[p]))\n output Y"),
    ];
    for (rule, source) in cases {
        let left = kernel(source);
        let result = optimize(&left, &OptimizeOptions::default()).unwrap();
        assert!(result.applied.iter().any(|(_, r, _)| r == rule), "{rule} does not fire on {source}");
        assert!(result.changed, "{rule}: not lowered");
        assert!(result.cascade.tensors.iter().any(|t| t.name == "RM"), "{rule}: no running max");
        assert_same(&left, &result.cascade, rule);
    }
}

#[test]
fn rules_do_not_fire_outside_their_conditions() {
    let default = OptimizeOptions::default();
    let cases = [
        // The divisor depends on the reduced index.
        ("defer-division", "Y[p] = sum[m](A[m, p] / exp(C[m, p]))\n output Y"),
        // The divisor's sign is unknown: deferring it could turn 0 / 0 into a value.
        ("defer-division", "Y[p] = sum[m](A[m, p] / B[p])\n output Y"),
        // The factor depends on the reduced index.
        ("defer-factor-left", "Y[p] = sum[m](C[m, p] * A[m, p])\n output Y"),
        ("defer-factor-right", "Y[p] = sum[m](A[m, p] * C[m, p])\n output Y"),
        // The shift is the maximum of other scores.
        ("online-sum-one", "G[p] = max[m](C[m, p])\n Y[p] = sum[m](exp(A[m, p] - G[p]))\n output Y"),
        ("online-sum-right", "G[p] = max[m](C[m, p])\n Y[f, p] = sum[m](exp(A[m, p] - G[p]) * V[f, m])\n output Y"),
        // A negative factor does not commute with a maximum.
        ("max-positive-factor", "Y[p] = max[m](A[m, p] * -2)\n output Y"),
        ("max-positive-factor", "Y[p] = max[m](A[m, p] * B[p])\n output Y"),
        // The bias depends on the reduced index.
        ("max-bias", "Y[p] = max[m](A[m, p] + C[m, p])\n output Y"),
        // The inner maximum may be over an empty set (no split pair): it may be -inf.
        ("shift-by-nested-max", "G[] = max[m, p](A[m, p])\n Y[m, p] = exp(A[m, p] - G[])\n output Y"),
        // The maximum is of other scores than those shifted.
        ("shift-by-larger-max-left", "G[p] = max(max[m](C[m, p]), B[p])\n Y[m, p] = exp(A[m, p] - G[p])\n output Y"),
        // A negative scale turns the maximum into a minimum.
        ("scale-after-shift-right", "G[p] = max[m](A[m, p])\n Y[m, p] = exp((A[m, p] - G[p]) * -2)\n output Y"),
        // The logarithm's argument may be negative.
        ("exp-minus-log-right", "Y[m, p] = exp(A[m, p] - (B[p] + log(C[m, p])))\n output Y"),
    ];
    for (rule, source) in cases {
        let rules = applied(&kernel(source), &default);
        assert!(!rules.contains(&rule.to_string()), "{rule} fired on {source}");
    }
}

/// `exp(a - b) = exp(a) / exp(b)` is exact in real arithmetic and lets the e-graph factor the
/// maximum out of the sums. It may fire, but extraction must never choose its unbounded result.
#[test]
fn unbounded_exponentials_are_never_extracted() {
    let attention =
        einfuse::Program::from_file(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/attention.ein"))
            .unwrap()
            .kernel(Some("attention"))
            .unwrap()
            .clone();
    let risky = OptimizeOptions { unsafe_rules: true, ..OptimizeOptions::default() };
    let result = optimize(&attention, &risky).unwrap();
    assert!(result.applied.iter().any(|(_, r, _)| r == "exp-split"), "the unsafe rule should have fired");
    let safe = optimize(&attention, &OptimizeOptions::default()).unwrap();
    assert_eq!(
        einfuse::compiler::print::print_cascade(&result.cascade),
        einfuse::compiler::print::print_cascade(&safe.cascade)
    );
    // And the chosen cascade is finite with logits near 1e4.
    let mut hot = result.cascade.clone();
    hot.params[0].value = 2000.0;
    let out = {
        let extents = bind_extents(&hot, &[("M".into(), 90), ("P".into(), 3)], &[]).unwrap();
        let inputs: Vec<Vec<f64>> = hot
            .inputs()
            .iter()
            .enumerate()
            .map(|(n, id)| {
                let shape = tensor_shape(&hot, *id, &extents).iter().map(|s| *s as usize).collect();
                Tensor::random(DType::F32, shape, n as u64).unwrap().to_f64()
            })
            .collect();
        let slices: Vec<&[f64]> = inputs.iter().map(Vec::as_slice).collect();
        interpret(&hot, &extents, &slices, InterpLimits::default()).unwrap()
    };
    assert!(out.iter().flatten().all(|x| x.is_finite()));
}
