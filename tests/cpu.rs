//! The Cranelift CPU back end against the interpreter: every kernel of `examples/`, as written and
//! optimized, on random inputs with ragged sizes, fully masked rows and logits near 1e4; a sweep of
//! sizes; narrow storage types.

use std::collections::BTreeMap;

mod common;

use einfuse::compiler::interp::{interpret, InterpLimits};
use einfuse::compiler::ir::{Cascade, ElemType};
use einfuse::compiler::shapes::{bind_extents, tensor_shape};
use einfuse::{DType, Tensor};

fn corpus() -> Vec<Cascade> {
    common::kernels_in("examples")
}

/// Runs `cascade` on the CPU and on the interpreter with the same inputs; returns the largest
/// relative difference.
fn compare(cascade: &Cascade, sizes: &BTreeMap<&str, u64>, seed: u64, params: &[(&str, f64)]) -> f64 {
    compare_on(einfuse::compile_cpu, cascade, sizes, seed, params)
}

/// `compare` on the host tier that `compile` builds.
fn compare_on(
    compile: fn(&Cascade) -> Result<einfuse::compiler::cpu::CpuKernel, einfuse::Error>,
    cascade: &Cascade,
    sizes: &BTreeMap<&str, u64>,
    seed: u64,
    params: &[(&str, f64)],
) -> f64 {
    let mut cascade = cascade.clone();
    for (name, value) in params {
        if let Some(p) = cascade.params.iter_mut().find(|p| p.name == *name) {
            p.value = *value;
        }
    }
    let (_, extents, inputs) = common::random_call(&cascade, sizes, seed);
    let kernel = compile(&cascade).unwrap();
    let slices: Vec<&[f32]> = inputs.iter().map(Tensor::data).collect();
    let got = kernel.run(&extents, &slices).unwrap();
    let data: Vec<Vec<f64>> = inputs.iter().map(Tensor::to_f64).collect();
    let slices: Vec<&[f64]> = data.iter().map(Vec::as_slice).collect();
    let want = interpret(&cascade, &extents, &slices, InterpLimits::default()).unwrap();
    let mut worst = 0.0f64;
    for (output, (g, w)) in cascade.outputs.iter().zip(got.iter().zip(&want)) {
        assert_eq!(g.len(), w.len());
        let dtype = einfuse::dtype_of(output.elem);
        for (a, b) in g.iter().zip(w) {
            let a = dtype.round(*a) as f64;
            let b = dtype.round(*b as f32) as f64;
            if a.is_nan() && b.is_nan() {
                continue;
            }
            worst = worst.max((a - b).abs() / (1.0 + b.abs()));
        }
    }
    worst
}

#[test]
fn every_corpus_kernel_agrees_with_the_interpreter() {
    let shapes: [&[(&str, u64)]; 3] = [&[("M", 100), ("P", 7)], &[("M", 1), ("P", 3)], &[("M", 65), ("P", 70)]];
    for cascade in corpus() {
        let optimized = einfuse::optimize(&cascade).unwrap().cascade;
        for (s, shape) in shapes.iter().enumerate() {
            let mut sizes: BTreeMap<&str, u64> = shape.iter().copied().collect();
            sizes.extend([("K", 37), ("H", 2), ("T", 20)]);
            for (form, kernel) in [("as written", &cascade), ("optimized", &optimized)] {
                let error = compare(kernel, &sizes, s as u64, &[]);
                assert!(error <= 1e-4, "{} {form} {shape:?}: relative error {error:.3e}", cascade.name);
            }
        }
    }
}

#[test]
fn a_sweep_of_sizes() {
    let attention = corpus().into_iter().find(|k| k.name == "causal").unwrap();
    let optimized = einfuse::optimize(&attention).unwrap().cascade;
    for m in [1u64, 2, 3, 17, 63, 64, 65, 127, 128, 129, 200] {
        for p in [1u64, 5, 64, 200] {
            if m * p > 64 * 200 {
                continue;
            }
            let sizes: BTreeMap<&str, u64> = [("M", m), ("P", p)].into();
            let error = compare(&optimized, &sizes, m + p, &[]);
            assert!(error <= 1e-4, "M={m} P={p}: {error:.3e}");
        }
    }
}

#[test]
fn large_logits_and_masked_rows() {
    for name in ["attention", "causal", "sink", "padding_mask", "document_mask", "gqa_decode"] {
        let cascade = corpus().into_iter().find(|k| k.name == name).unwrap();
        let optimized = einfuse::optimize(&cascade).unwrap().cascade;
        // P > M leaves causal rows with no key at all; the scale puts logits near 1e4.
        let sizes: BTreeMap<&str, u64> = [("M", 40), ("P", 50), ("H", 2)].into();
        let error = compare(&optimized, &sizes, 3, &[("scale", 2000.0)]);
        assert!(error <= 1e-4, "{name}: {error:.3e}");
    }
}

#[test]
fn narrow_storage_types() {
    let source = "
kernel attention_bf16 {
  rank E = 64, F = 64, M, P
  input Q[E, P]: bf16, K[E, M]: bf16, V[F, M]: f16
  param scale = 0.125
  QK[m, p] = Q[e, p] * K[e, m] * scale
  GM[p]    = max[m](QK[m, p])
  SN[m, p] = exp(QK[m, p] - GM[p])
  SD[p]    = SN[m, p]
  AV[f, p] = SN[m, p] * V[f, m] / SD[p]
  output AV: bf16
}";
    let cascade = einfuse::compiler::compile_source(source).unwrap().remove(0);
    assert!(matches!(cascade.outputs[0].elem, ElemType::Bf16));
    let optimized = einfuse::optimize(&cascade).unwrap().cascade;
    let sizes: BTreeMap<&str, u64> = [("M", 90), ("P", 6)].into();
    let error = compare(&optimized, &sizes, 1, &[]);
    assert!(error <= 1e-2, "{error:.3e}");
    let _ = DType::Bf16;
}

#[test]
fn threads_split_a_batch_rank_and_give_the_same_outputs() {
    for (name, sizes) in [
        ("attention", [("M", 70u64), ("P", 37)]),
        ("decode", [("M", 70), ("H", 5)]),
        ("causal", [("M", 33), ("P", 40)]),
        // More rows than one chunk holds (`CHUNK_ROWS`): several chunks per thread.
        ("causal", [("M", 90), ("P", 200)]),
    ] {
        let cascade = corpus().into_iter().find(|k| k.name == name).unwrap();
        let optimized = einfuse::optimize(&cascade).unwrap().cascade;
        let bindings: Vec<(String, u64)> = sizes.iter().map(|(r, n)| (r.to_string(), *n)).collect();
        let extents = bind_extents(&optimized, &bindings, &[]).unwrap();
        assert!(
            einfuse::compiler::schedule::layout::batch_rank(&optimized, &extents).is_some(),
            "{name} has no batch rank"
        );
        let inputs: Vec<Tensor> = optimized
            .inputs()
            .iter()
            .enumerate()
            .map(|(n, id)| {
                let shape = tensor_shape(&optimized, *id, &extents).iter().map(|s| *s as usize).collect();
                Tensor::random(DType::F32, shape, n as u64).unwrap()
            })
            .collect();
        let slices: Vec<&[f32]> = inputs.iter().map(Tensor::data).collect();
        let kernel = einfuse::compile_cpu(&optimized).unwrap();
        let one = kernel.run(&extents, &slices).unwrap();
        for threads in [2, 3, 64] {
            assert_eq!(kernel.run_threads(&extents, &slices, threads).unwrap(), one, "{name} on {threads} threads");
        }
    }
}

/// The vector `exp` (four lanes, a polynomial) over the range it is used on: relative error at
/// most 2.5e-7 wherever the result is a normal float, and the IEEE answers at the edges.
#[test]
fn vector_exp_is_accurate_over_the_float_range() {
    let source = "kernel e { rank I\n input X[I]\n Y[i] = exp(X[i])\n output Y }";
    let cascade = einfuse::compiler::compile_source(source).unwrap().remove(0);
    let kernel = einfuse::compile_cpu(&cascade).unwrap();
    // A multiple of four, so that every point goes through the lanes.
    let xs: Vec<f32> = (0..200_000).map(|k| -87.3 + (88.7 + 87.3) * k as f32 / 200_000.0).collect();
    let got = kernel.run(&[xs.len() as u64], &[&xs]).unwrap().remove(0);
    let mut worst = 0.0f64;
    for (x, y) in xs.iter().zip(&got) {
        let want = (*x as f64).exp();
        if want >= f32::MIN_POSITIVE as f64 && want <= f32::MAX as f64 {
            worst = worst.max((*y as f64 - want).abs() / want);
        }
    }
    println!("largest relative error of the vector exp: {worst:.3e}");
    assert!(worst <= 2.5e-7, "relative error {worst:.3e}");
    let edges = [f32::NEG_INFINITY, f32::INFINITY, f32::NAN, 89.0, -104.0, -1e30, 1e30, -100.0];
    let got = kernel.run(&[edges.len() as u64], &[&edges]).unwrap().remove(0);
    assert_eq!(&got[..2], &[0.0, f32::INFINITY]);
    assert!(got[2].is_nan());
    assert_eq!(&got[3..7], &[f32::INFINITY, 0.0, 0.0, f32::INFINITY]);
    // A result that would be subnormal is 0 (exp(-100) = 3.7e-44): see `math::EXP_LO`.
    assert_eq!(got[7], 0.0);
}

/// Steps of a streamed loop where the filtered tensor has no point are skipped (see
/// `compiler::skip`); the outputs still agree with the interpreter, whether a step is empty for
/// every query (more keys than queries under a causal mask) or for a chunk of them only.
#[test]
fn skipped_steps_agree_with_the_interpreter() {
    let tiles = "kernel tiles {
  rank I, J = 4, P
  input X[I, J, P]
  S[i, j, p] = X[i, j, p] where i * J + j <= p
  T[i, p] = S[i, j, p]
  R[0, p] = 0
  R[i + 1, p] = R[i, p] + T[i, p]
  Y[p] = R[I, p]
  output Y
}";
    let tiles = einfuse::compiler::compile_source(tiles).unwrap().remove(0);
    for (i, p) in [(9, 5), (3, 40), (1, 1), (30, 3)] {
        let sizes = BTreeMap::from([("I", i), ("P", p)]);
        let worst = compare(&tiles, &sizes, 7, &[]);
        assert!(worst <= 1e-5, "tiles at I = {i}, P = {p}: {worst}");
    }
    let causal = corpus().into_iter().find(|k| k.name == "causal").unwrap();
    let optimized = einfuse::optimize(&causal).unwrap().cascade;
    let program = einfuse::compiler::schedule::schedule(&optimized).unwrap();
    assert!(
        einfuse::compiler::schedule::print_program(&program).contains("skipping a step where"),
        "causal attention's streamed loop skips empty steps"
    );
    for (m, p) in [(300, 7), (130, 65), (64, 1), (65, 64)] {
        let sizes = BTreeMap::from([("M", m), ("P", p)]);
        let worst = compare(&optimized, &sizes, 3, &[]);
        assert!(worst <= 1e-4, "causal at M = {m}, P = {p}: {worst}");
    }
}

/// Steps that a shifted causal filter (`m <= p + shift`) admits whole run without the filter,
/// and steps it empties are carried over before anything is computed (`schedule::full_steps`): every
/// shift that moves the diagonal across the tiles (so that some tile is one point short of full
/// or of empty), against the interpreter.
#[test]
fn full_and_empty_steps_at_the_edges_of_tiles() {
    let cascade = einfuse::compiler::compile_source(common::SHIFTED_CAUSAL).unwrap().remove(0);
    let optimized = einfuse::optimize(&cascade).unwrap().cascade;
    let sizes = BTreeMap::from([("M", 140), ("P", 100)]);
    for shift in -100..=70 {
        let worst = compare(&optimized, &sizes, 5, &[("shift", shift as f64)]);
        assert!(worst <= 1e-4, "shift {shift}: {worst}");
    }
}

/// Reductions with no rows to block run vectors side by side (`lanes::side_by_side`), and blocks of
/// rows with the reduced index in lanes run their loop two steps at a time on Cranelift
/// (`lane_rows`, `planned_reduce`): decode in PyTorch's layout with head dimensions that end the
/// unrolled loop after a single step or in a scalar tail and value widths that end the vectors side
/// by side in single vectors or points, a rowless reduction with an epilogue under a statement
/// filter, and one whose lanes run along the inner index of a ragged split pair; as written and
/// optimized, on both host tiers.
#[test]
fn rowless_reductions_and_unrolled_lane_rows_agree_with_the_interpreter() {
    let decode = |e: u64| {
        format!(
            "kernel decode {{
  rank H = 3, E = {e}, F, M, P = 1
  input Q[H, P, E], K[H, M, E], V[H, M, F]
  param scale = 0.3
  QK[h, p, m] = Q[h, p, e] * K[h, m, e] * scale
  GM[h, p] = max[m](QK[h, p, m])
  SN[h, p, m] = exp(QK[h, p, m] - GM[h, p])
  SD[h, p] = SN[h, p, m]
  AV[h, p, f] = SN[h, p, m] * V[h, m, f] / SD[h, p]
  output AV
}}"
        )
    };
    let filtered = "kernel filtered {
  rank M, P
  input X[M, P], W[M], B[P]
  Y[p] = sum[m](W[m] * X[m, p]) * 2 + B[p] where p >= 3
  output Y
}";
    let split = "kernel split {
  rank K, M
  rank M0 = 20, M1 = M / M0
  input X[K, M], W[K]
  Y[m1, m0] = sum[k](W[k] * X[k, m1 * M0 + m0])
  output Y
}";
    let mut cases: Vec<(String, Vec<(&str, u64)>)> = Vec::new();
    for e in [3, 4, 8, 12, 13, 22, 128] {
        for (f, m) in [(5, 1), (16, 130), (17, 63), (36, 300)] {
            cases.push((decode(e), vec![("F", f), ("M", m)]));
        }
    }
    for (m, p) in [(1, 1), (7, 5), (9, 16), (3, 17), (40, 35), (5, 64)] {
        cases.push((filtered.to_string(), vec![("M", m), ("P", p)]));
    }
    for (k, m) in [(3, 1), (5, 19), (2, 20), (7, 47), (4, 100)] {
        cases.push((split.to_string(), vec![("K", k), ("M", m)]));
    }
    type Compile = fn(&Cascade) -> Result<einfuse::compiler::cpu::CpuKernel, einfuse::Error>;
    let tiers: [(&str, Compile); 2] = [("cpu", einfuse::compile_cpu), ("cpu-llvm", einfuse::compile_cpu_llvm)];
    for (source, sizes) in &cases {
        let cascade = einfuse::compiler::compile_source(source).unwrap().remove(0);
        let optimized = einfuse::optimize(&cascade).unwrap().cascade;
        let sizes: BTreeMap<&str, u64> = sizes.iter().copied().collect();
        for (form, cascade) in [("as written", &cascade), ("optimized", &optimized)] {
            for (tier, compile) in tiers {
                let worst = compare_on(compile, cascade, &sizes, 11, &[]);
                assert!(worst <= 1e-4, "{} {form} on {tier} at {sizes:?}: {worst}", cascade.name);
            }
        }
    }
}
