//! The analysis and the optimizer on the same mathematics written in other ways than the
//! corpus writes it: a primed index, a sink written as a maximum, FuseMax's 2-pass form, the
//! log-sum-exp form, the scale applied after the shift, named intermediates and a reciprocal.
//! Each kernel's passes as written and after optimization are pinned, the optimizer's claim must
//! equal the analysis of its output, and the optimized kernel must agree with the interpreter on
//! the kernel as written (ragged sizes, large logits).

use einfuse::compiler::interp::{interpret, InterpLimits};
use einfuse::compiler::ir::Cascade;
use einfuse::compiler::optimize::{optimize, OptimizeOptions};
use einfuse::compiler::passcount::analyze;
use einfuse::compiler::shapes::{bind_extents, tensor_shape};
use einfuse::{DType, Program, Tensor};

fn kernel(source: &str) -> Cascade {
    let program = Program::from_source("general.ein", source).unwrap_or_else(|e| panic!("{e}"));
    program.kernels.into_iter().next().unwrap()
}

/// Passes over `rank` as written and after optimization; checks the optimizer's claim and the
/// values of the optimized kernel.
fn passes(cascade: &Cascade, rank: &str) -> (usize, usize) {
    let written = analyze(cascade).passes(rank).unwrap_or_else(|| panic!("{}: no rank {rank}", cascade.name));
    let optimized = optimize(cascade, &OptimizeOptions::default()).unwrap();
    let after = analyze(&optimized.cascade);
    let after_passes = after.passes(rank).unwrap_or(1);
    if optimized.changed {
        let claimed = optimized.claimed_passes.get(rank).copied().unwrap_or(1) as usize;
        assert_eq!(claimed, after_passes, "{}: the optimizer claims {claimed} passes over {rank}", cascade.name);
    }
    agree(cascade, &optimized.cascade);
    (written, after_passes)
}

/// The optimized cascade computes what the written one does, on ragged sizes and large logits.
fn agree(written: &Cascade, optimized: &Cascade) {
    for (m, p, scale) in [(70u64, 5u64, 1.0f32), (1, 3, 1.0), (130, 2, 1e4)] {
        let bindings = [("M".to_string(), m), ("P".to_string(), p), ("H".to_string(), 2)];
        let bindings: Vec<(String, u64)> =
            bindings.into_iter().filter(|(r, _)| written.rank_by_name(r).is_some()).collect();
        let extents = bind_extents(written, &bindings, &[]).unwrap();
        let inputs: Vec<Vec<f64>> = written
            .inputs()
            .iter()
            .enumerate()
            .map(|(n, id)| {
                let shape: Vec<usize> = tensor_shape(written, *id, &extents).iter().map(|x| *x as usize).collect();
                let t = Tensor::random(DType::F32, shape, m * 100 + n as u64).unwrap();
                t.data().iter().map(|x| (*x * scale) as f64).collect()
            })
            .collect();
        let slices: Vec<&[f64]> = inputs.iter().map(Vec::as_slice).collect();
        let want = interpret(written, &extents, &slices, InterpLimits::default()).unwrap();
        let optimized_extents = bind_extents(optimized, &bindings, &[]).unwrap();
        let got = interpret(optimized, &optimized_extents, &slices, InterpLimits::default()).unwrap();
        for (w, g) in want.iter().zip(&got) {
            for (a, b) in w.iter().zip(g) {
                assert!(
                    (a - b).abs() <= 1e-6 * (1.0 + a.abs()) || (a.is_nan() && b.is_nan()),
                    "{}: M={m} P={p}: {a} as written, {b} optimized",
                    written.name
                );
            }
        }
    }
}

#[test]
fn a_primed_index_walks_the_same_fiber() {
    let softmax = kernel(
        "kernel primed {
           rank M, P
           input A[M, P]
           GM[p]    = max[m](A[m, p])
           Y[p]     = sum[m'](exp(A[m', p] - GM[p]))
           output Y
         }",
    );
    let report = analyze(&softmax);
    assert_eq!(report.passes("M"), Some(2), "{report:?}");
    assert_eq!(report.passes("M'"), None, "{report:?}");
    assert_eq!(passes(&softmax, "M"), (2, 1));
}

#[test]
fn two_roles_of_one_rank_stay_apart() {
    let program = Program::from_file("examples/masks.ein".as_ref()).unwrap();
    let document = program.kernel(Some("document_mask")).unwrap();
    let report = analyze(document);
    assert_eq!(report.passes("M"), Some(3), "{report:?}");
    let optimized = optimize(document, &OptimizeOptions::default()).unwrap();
    assert_eq!(analyze(&optimized.cascade).passes("M"), Some(1));
}

/// Attention with a sink, in the layout and names of `examples/variants.ein` but with the sink as
/// an extra term of the maximum: `exp(S - max(max S, sink))` is bounded, and one pass suffices.
const SINK_AS_MAX: &str = "kernel sink_as_max {
  rank H, E = 8, F = 8, M, P
  input Q[H, P, E], K[H, M, E], V[H, M, F], Sink[H]
  param scale = 0.35
  S[h, p, m]  = Q[h, p, e] * K[h, m, e] * scale
  GM[h, p]    = max(max[m](S[h, p, m]), Sink[h])
  SN[h, p, m] = exp(S[h, p, m] - GM[h, p])
  SD[h, p]    = sum[m](SN[h, p, m]) + exp(Sink[h] - GM[h, p])
  A[h, p, m]  = SN[h, p, m] / SD[h, p]
  AV[h, p, f] = A[h, p, m] * V[h, m, f]
  output AV
}";

#[test]
fn a_sink_written_as_a_maximum_is_bounded_and_one_pass() {
    let sink = kernel(SINK_AS_MAX);
    let report = analyze(&sink);
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    assert_eq!(passes(&sink, "M"), (3, 1));
    let optimized = optimize(&sink, &OptimizeOptions::default()).unwrap();
    assert!(analyze(&optimized.cascade).warnings.is_empty(), "{:?}", analyze(&optimized.cascade).warnings);
}

/// The 1-pass sink computes its maximum once: the running maximum's final iterate, not a second
/// full maximum over the keys (which would also keep the scores out of the streamed loop).
#[test]
fn a_sink_reuses_the_running_maximum() {
    let program = Program::from_file("examples/variants.ein".as_ref()).unwrap();
    for written in [program.kernel(Some("sink")).unwrap().clone(), kernel(SINK_AS_MAX)] {
        let optimized = optimize(&written, &OptimizeOptions::default()).unwrap().cascade;
        let maxima = optimized
            .einsums
            .iter()
            .filter(|e| {
                matches!(e.body, einfuse::compiler::ir::Expr::Reduce { op: einfuse::compiler::ir::ReduceOp::Max, .. })
            })
            .count();
        assert_eq!(maxima, 1, "only the tile maximum:\n{}", einfuse::compiler::print::print_cascade(&optimized));
        agree(&written, &optimized);
    }
}

/// Softmax attention written through the log-sum-exp: `exp(S - LSE)` with
/// `LSE = GM + log(sum exp(S - GM))` is `exp(S - GM) / sum exp(S - GM)`.
#[test]
fn the_log_sum_exp_form_is_one_pass() {
    let lse = kernel(
        "kernel lse {
           rank E = 8, F = 8, M, P
           input Q[E, P], K[E, M], V[F, M]
           S[m, p]   = Q[e, p] * K[e, m]
           GM[p]     = max[m](S[m, p])
           LSE[p]    = GM[p] + log(sum[m](exp(S[m, p] - GM[p])))
           A[m, p]   = exp(S[m, p] - LSE[p])
           AV[f, p]  = A[m, p] * V[f, m]
           output AV
         }",
    );
    assert_eq!(passes(&lse, "M"), (3, 1));
}

/// Every intermediate named, the division written as a product by a reciprocal.
#[test]
fn a_product_by_a_reciprocal_is_one_pass() {
    let named = kernel(
        "kernel reciprocal {
           rank E = 8, F = 8, M, P
           input Q[E, P], K[E, M], V[F, M]
           S[m, p]   = Q[e, p] * K[e, m]
           GM[p]     = max[m](S[m, p])
           D[m, p]   = S[m, p] - GM[p]
           SN[m, p]  = exp(D[m, p])
           SD[p]     = sum[m](SN[m, p])
           R[p]      = 1 / SD[p]
           A[m, p]   = SN[m, p] * R[p]
           AV[f, p]  = A[m, p] * V[f, m]
           output AV
         }",
    );
    assert_eq!(passes(&named, "M"), (3, 1));
}

/// The scale applied after the shift: `exp((S - GM) * scale)` with a positive param `scale`.
#[test]
fn the_scale_after_the_shift_is_one_pass() {
    let scaled = kernel(
        "kernel scale_after {
           rank E = 8, F = 8, M, P
           input Q[E, P], K[E, M], V[F, M]
           param scale = 0.125
           S[m, p]   = Q[e, p] * K[e, m]
           GM[p]     = max[m](S[m, p])
           SN[m, p]  = exp((S[m, p] - GM[p]) * scale)
           SD[p]     = SN[m, p]
           AV[f, p]  = SN[m, p] / SD[p] * V[f, m]
           output AV
         }",
    );
    assert_eq!(passes(&scaled, "M"), (3, 1));
    // With a negative scale the maximum is not the scaled maximum: nothing may be derived from it.
    let mut negative = scaled.clone();
    negative.params[0].value = -0.125;
    let optimized = optimize(&negative, &OptimizeOptions::default()).unwrap();
    assert!(!optimized.applied.iter().any(|(_, rule, _)| rule.starts_with("scale-after-shift")));
    agree(&negative, &optimized.cascade);
}

/// FuseMax's 2-pass form, split by hand into tiles of 16 (ragged for M = 70), with the factors of
/// the rescaled denominator and of the attention in other orders: the global maximum becomes a
/// running one along the source's own tile rank, and one pass over M suffices.
#[test]
fn the_two_pass_form_becomes_one_pass_over_its_own_tiles() {
    let two_pass = kernel(
        "kernel two_pass {
           rank E = 8, F = 8, M, P
           rank M0 = 16, M1 = M / M0
           input Q[E, P], K[E, M], V[F, M]
           param scale = 0.5
           S[m1, m0, p]  = Q[e, p] * K[e, m1 * M0 + m0] * scale
           LM[m1, p]     = max[m0](S[m1, m0, p])
           GM[p]         = max[m1](LM[m1, p])
           PRM[m1, p]    = exp(LM[m1, p] - GM[p])
           SLD[m1, p]    = sum[m0](exp(S[m1, m0, p] - LM[m1, p]))
           SD[p]         = sum[m1](PRM[m1, p] * SLD[m1, p])
           A[m1, m0, p]  = PRM[m1, p] * exp(S[m1, m0, p] - LM[m1, p]) / SD[p]
           AV[f, p]      = sum[m1, m0](V[f, m1 * M0 + m0] * A[m1, m0, p])
           output AV
         }",
    );
    assert_eq!(passes(&two_pass, "M"), (2, 1));
    let optimized = optimize(&two_pass, &OptimizeOptions::default()).unwrap();
    let report = analyze(&optimized.cascade);
    assert_eq!((report.passes("M1"), report.passes("M0")), (Some(1), Some(2)), "{report:?}");
    // No rank was tiled again.
    assert_eq!(optimized.cascade.split_pairs().len(), 1);
}

/// Attention over a hand-split key rank with the global maximum over the pair, as one would
/// write it without FuseMax's per-tile maxima: the shift by the maximum over the pair is the
/// shift by each tile's, rescaled, and the form becomes the 1-pass one over the same tiles.
#[test]
fn a_maximum_over_the_pair_becomes_one_pass_over_its_own_tiles() {
    let pair = kernel(
        "kernel pair_max {
           rank E = 8, F = 8, M, P
           rank M0 = 16, M1 = M / M0
           input Q[E, P], K[E, M], V[F, M]
           S[m1, m0, p]  = Q[e, p] * K[e, m1 * M0 + m0]
           GM[p]         = max[m1, m0](S[m1, m0, p])
           SD[p]         = sum[m1, m0](exp(S[m1, m0, p] - GM[p]))
           AV[f, p]      = sum[m1, m0](exp(S[m1, m0, p] - GM[p]) * V[f, m1 * M0 + m0]) / SD[p]
           output AV
         }",
    );
    assert_eq!(passes(&pair, "M"), (3, 1));
    let optimized = optimize(&pair, &OptimizeOptions::default()).unwrap();
    assert!(optimized.applied.iter().any(|(_, rule, _)| rule == "shift-by-nested-max"));
    assert_eq!(optimized.cascade.split_pairs().len(), 1);
    // Softmax alone over the same tiles: its output is indexed by the keys, so it needs the
    // denominator complete first, as `softmax` in the corpus does (3 passes to 2).
    let softmax = kernel(
        "kernel softmax_tiles {
           rank M, P
           rank M0 = 16, M1 = M / M0
           input S[M, P]
           GM[p]         = max[m1, m0](S[m1 * M0 + m0, p])
           SD[p]         = sum[m1, m0](exp(S[m1 * M0 + m0, p] - GM[p]))
           Y[m1, m0, p]  = exp(S[m1 * M0 + m0, p] - GM[p]) / SD[p]
           output Y
         }",
    );
    assert_eq!(passes(&softmax, "M1"), (3, 2));
    let optimized = optimize(&softmax, &OptimizeOptions::default()).unwrap();
    assert_eq!(analyze(&optimized.cascade).passes("M"), Some(2));
}

/// The same form under a causal mask: a tile may hold no score, whose maximum is -inf, so the
/// rescale `exp(LM - GM)` is not known to be finite and is not deferred past the tile sums. The
/// values stay those of the kernel as written.
#[test]
fn the_two_pass_form_under_a_mask_keeps_its_values() {
    let masked = kernel(
        "kernel two_pass_masked {
           rank E = 8, F = 8, M, P
           rank M0 = 16, M1 = M / M0
           input Q[E, P], K[E, M], V[F, M]
           S[m1, m0, p]  = Q[e, p] * K[e, m1 * M0 + m0] where m1 * M0 + m0 <= p * 20
           LM[m1, p]     = max[m0](S[m1, m0, p])
           GM[p]         = max[m1](LM[m1, p])
           PRM[m1, p]    = exp(LM[m1, p] - GM[p])
           SLD[m1, p]    = sum[m0](exp(S[m1, m0, p] - LM[m1, p]))
           SD[p]         = sum[m1](SLD[m1, p] * PRM[m1, p])
           A[m1, m0, p]  = exp(S[m1, m0, p] - LM[m1, p]) * PRM[m1, p] / SD[p]
           AV[f, p]      = A[m1, m0, p] * V[f, m1 * M0 + m0]
           output AV
         }",
    );
    let (written, _) = passes(&masked, "M");
    assert_eq!(written, 2);
}

/// On every kernel of `examples/` and `benches/`, the passes the optimizer claims are the passes
/// the analysis finds in its result.
#[test]
fn claims_equal_the_analysis_on_the_corpus() {
    let mut kernels = Vec::new();
    for dir in ["examples", "benches"] {
        let mut files: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        for path in files.into_iter().filter(|p| p.extension().is_some_and(|e| e == "ein")) {
            kernels.extend(Program::from_file(&path).unwrap().kernels);
        }
    }
    assert!(kernels.len() > 40);
    for written in &kernels {
        let optimized = optimize(written, &OptimizeOptions::default()).unwrap();
        if !optimized.changed {
            continue;
        }
        let found = analyze(&optimized.cascade);
        for (rank, claimed) in &optimized.claimed_passes {
            if let Some(n) = found.passes(rank) {
                assert_eq!(n, *claimed as usize, "{}: claims {claimed} passes over {rank}", written.name);
            }
        }
    }
}
