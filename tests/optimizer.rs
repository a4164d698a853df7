//! The optimizer on the example corpus: the pass counts it reaches, its agreement with the
//! interpreter on the cascade as written (ragged sizes, large logits), its determinism, and the
//! optimized cascades as `.ein` snapshots.

use std::collections::BTreeMap;
use std::path::Path;

use einfuse::compiler::interp::{interpret, InterpLimits};
use einfuse::compiler::ir::{Cascade, Extent};
use einfuse::compiler::optimize::{optimize, OptimizeOptions};
use einfuse::compiler::passcount::analyze;
use einfuse::compiler::print::print_cascade;
use einfuse::compiler::shapes::tensor_shape;
use einfuse::{DType, Program, Tensor};

fn corpus() -> Vec<(String, Cascade)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut files: Vec<_> = std::fs::read_dir(&root).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    let mut kernels = Vec::new();
    for path in files.into_iter().filter(|p| p.extension().is_some_and(|e| e == "ein")) {
        let program = Program::from_file(&path).unwrap();
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        kernels.extend(program.kernels.into_iter().map(|k| (file.clone(), k)));
    }
    kernels
}

fn kernel(name: &str) -> Cascade {
    corpus().into_iter().find(|(_, k)| k.name == name).unwrap_or_else(|| panic!("no kernel {name}")).1
}

fn passes(cascade: &Cascade, rank: &str) -> usize {
    analyze(cascade).passes(rank).unwrap_or_else(|| panic!("{}: no rank {rank}", cascade.name))
}

/// (kernel, its streamed rank, passes over it as written, after optimization).
const EXPECTED: &[(&str, &str, usize, usize)] = &[
    ("attention", "M", 3, 1),
    ("attention_deferred", "M", 2, 1),
    ("attention_1pass", "M", 1, 1),
    ("cascade1", "K", 2, 1),
    ("cascade2", "K", 1, 1),
    ("cascade3", "K", 1, 1),
    ("attention_2pass", "M", 2, 1),
    ("scaled", "M", 3, 1),
    ("causal", "M", 3, 1),
    ("sliding_window", "M", 3, 1),
    ("alibi", "M", 3, 1),
    ("softcap", "M", 3, 1),
    ("gqa", "M", 3, 1),
    ("sink", "M", 3, 1),
    ("sigmoid_attention", "M", 1, 1),
    ("softplus_l1", "M", 2, 1),
    ("stablemax", "M", 2, 1),
    ("relu_attention", "M", 1, 1),
    ("decode", "M", 3, 1),
    // Softmax alone: the online normalizer reaches 2; the output itself needs the denominator.
    ("softmax", "M", 3, 2),
    ("fixed_max", "M", 1, 1),
    ("causal_linear", "T", 1, 1),
    ("causal_linear_unnormalised", "T", 1, 1),
    ("ssm_scan", "T", 1, 1),
    ("padding_mask", "M", 3, 1),
    ("document_mask", "M", 3, 1),
    ("mqa", "M", 3, 1),
    ("gqa_decode", "M", 3, 1),
];

#[test]
fn every_corpus_kernel_has_expected_passes() {
    let corpus = corpus();
    for (_, cascade) in &corpus {
        assert!(EXPECTED.iter().any(|(n, ..)| *n == cascade.name), "{} has no expected pass count", cascade.name);
    }
    for (name, rank, written, optimized) in EXPECTED {
        let cascade = kernel(name);
        assert_eq!(passes(&cascade, rank), *written, "{name} as written");
        let result = optimize(&cascade, &OptimizeOptions::default()).unwrap();
        assert_eq!(passes(&result.cascade, rank), *optimized, "{name} optimized:\n{}", print_cascade(&result.cascade));
    }
}

#[test]
fn every_corpus_kernel_saturates_and_claims_what_the_analysis_finds() {
    for (_, cascade) in corpus() {
        let result = optimize(&cascade, &OptimizeOptions::default()).unwrap();
        if result.note.is_some() && result.iterations == 0 {
            continue; // Already scheduled (iterative): not run.
        }
        assert_eq!(result.stop, "saturated", "{}", cascade.name);
        let report = analyze(&result.cascade);
        for (rank, claimed) in &result.claimed_passes {
            assert_eq!(report.passes(rank), Some(*claimed as usize), "{}: rank {rank}", cascade.name);
        }
        // The optimized cascade prints as `.ein` that checks to the same IR.
        let text = print_cascade(&result.cascade);
        let again = einfuse::compiler::compile_source(&text).unwrap_or_else(|_| panic!("does not re-parse:\n{text}"));
        assert_eq!(again, vec![result.cascade.clone()], "{}", cascade.name);
    }
}

#[test]
fn optimization_is_deterministic() {
    for (_, cascade) in corpus() {
        let a = print_cascade(&optimize(&cascade, &OptimizeOptions::default()).unwrap().cascade);
        let b = print_cascade(&optimize(&cascade, &OptimizeOptions::default()).unwrap().cascade);
        assert_eq!(a, b, "{}", cascade.name);
    }
}

/// Runs the interpreter with every symbolic rank bound from `sizes` (default 5), random inputs
/// from `seed`, params overridden.
fn evaluate(cascade: &Cascade, sizes: &BTreeMap<&str, u64>, seed: u64, params: &[(&str, f64)]) -> Vec<Vec<f64>> {
    let mut cascade = cascade.clone();
    for (name, value) in params {
        if let Some(p) = cascade.params.iter_mut().find(|p| p.name == *name) {
            p.value = *value;
        }
    }
    let bindings: Vec<(String, u64)> = cascade
        .ranks
        .iter()
        .filter(|r| matches!(r.extent, Extent::Symbolic))
        .map(|r| (r.name.clone(), sizes.get(r.name.as_str()).copied().unwrap_or(5)))
        .collect();
    let extents = einfuse::compiler::shapes::bind_extents(&cascade, &bindings, &[]).unwrap();
    let inputs: Vec<Vec<f64>> = cascade
        .inputs()
        .iter()
        .enumerate()
        .map(|(n, id)| {
            let shape = tensor_shape(&cascade, *id, &extents).iter().map(|s| *s as usize).collect();
            Tensor::random(DType::F32, shape, seed * 100 + n as u64).unwrap().to_f64()
        })
        .collect();
    let slices: Vec<&[f64]> = inputs.iter().map(Vec::as_slice).collect();
    interpret(&cascade, &extents, &slices, InterpLimits::default()).unwrap()
}

fn assert_agree(name: &str, written: &[Vec<f64>], optimized: &[Vec<f64>], tolerance: f64) {
    for (a, b) in written.iter().zip(optimized) {
        assert_eq!(a.len(), b.len(), "{name}");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            if x.is_nan() && y.is_nan() {
                continue;
            }
            let scale = 1.0 + x.abs().max(y.abs());
            assert!((x - y).abs() <= tolerance * scale, "{name}: element {i}: {x} as written, {y} optimized");
        }
    }
}

#[test]
fn optimized_cascades_agree_with_the_interpreter() {
    // Ragged sizes: M not a multiple of the tile of 64, a single key, less than a tile, and
    // (for causal kernels) rows with no key at all when P > M.
    let shapes: [&[(&str, u64)]; 4] =
        [&[("M", 100), ("P", 7)], &[("M", 1), ("P", 3)], &[("M", 63), ("P", 70)], &[("M", 129), ("P", 2)]];
    for (_, cascade) in corpus() {
        let result = optimize(&cascade, &OptimizeOptions::default()).unwrap();
        for (s, shape) in shapes.iter().enumerate() {
            let mut sizes: BTreeMap<&str, u64> = shape.iter().copied().collect();
            sizes.insert("K", 37);
            sizes.insert("H", 2);
            sizes.insert("T", 20);
            let written = evaluate(&cascade, &sizes, s as u64, &[]);
            let optimized = evaluate(&result.cascade, &sizes, s as u64, &[]);
            assert_agree(&cascade.name, &written, &optimized, 1e-9);
        }
    }
}

#[test]
fn softmax_variants_stay_finite_with_logits_near_1e4() {
    for name in [
        "attention",
        "scaled",
        "causal",
        "sliding_window",
        "alibi",
        "gqa",
        "sink",
        "decode",
        "softmax",
        "padding_mask",
        "document_mask",
        "mqa",
        "gqa_decode",
    ] {
        let cascade = kernel(name);
        let result = optimize(&cascade, &OptimizeOptions::default()).unwrap();
        // |Q . K| reaches about 5 with these inputs: a scale of 2000 makes logits near 1e4.
        let sizes: BTreeMap<&str, u64> = [("M", 150), ("P", 4), ("H", 2)].into();
        let written = evaluate(&cascade, &sizes, 9, &[("scale", 2000.0)]);
        let optimized = evaluate(&result.cascade, &sizes, 9, &[("scale", 2000.0)]);
        assert!(optimized.iter().flatten().all(|x| x.is_finite()), "{name}: non-finite output");
        let max_logit = 2000.0 * 5.0;
        assert!(max_logit >= 1e4);
        assert_agree(name, &written, &optimized, 1e-9);
    }
}

#[test]
fn optimized_cascades_snapshot() {
    for (file, cascade) in corpus() {
        let result = optimize(&cascade, &OptimizeOptions::default()).unwrap();
        let name = format!("{}__{}", file.trim_end_matches(".ein"), cascade.name);
        insta::assert_snapshot!(name, print_cascade(&result.cascade));
    }
}

#[test]
fn optimizing_the_corpus_is_fast() {
    let corpus = corpus();
    let start = std::time::Instant::now();
    for (_, cascade) in &corpus {
        optimize(cascade, &OptimizeOptions::default()).unwrap();
    }
    let elapsed = start.elapsed();
    println!("optimized {} kernels in {:.1} ms", corpus.len(), elapsed.as_secs_f64() * 1e3);
    // A loose bound (debug build, shared machine); `cargo bench --bench optimizer` measures it.
    assert!(elapsed.as_secs_f64() < 20.0);
}
