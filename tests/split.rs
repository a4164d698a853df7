//! The split-key (Flash-Decoding) form against the interpreter: every corpus kernel whose
//! streamed loop splits, cut into chunks of two tiles, with ragged sizes (a last chunk with
//! tiles wholly past the end), on the Cranelift tier; masked and decode kernels with fully masked
//! rows and logits near 1e4 on every back end (the LLVM ones included); the chunk
//! index is a batch rank, so chunks run at once; and the split text and the verdict on every
//! corpus kernel as snapshots.

mod common;

use einfuse::compiler::ir::Cascade;
use einfuse::compiler::split::split_keys;
use einfuse::{RunOptions, Target};

fn corpus() -> Vec<Cascade> {
    let mut kernels = common::kernels_in("examples");
    kernels.extend(common::kernels_in("benches"));
    kernels
}

/// Two tiles of 64 keys.
const CHUNK: u64 = 128;

/// The interpreter and the Cranelift tier, and with `all`, the LLVM targets too (whose O3
/// compiles take seconds a kernel).
fn targets(all: bool) -> Vec<Target> {
    let mut targets = vec![Target::Interp, Target::Cpu];
    if all && cfg!(feature = "llvm") {
        targets.extend([Target::CpuLlvm, Target::GpuEmulated]);
    }
    targets
}

/// The largest relative difference between the split form on each target and the interpreter
/// on the cascade as written.
fn errors(
    written: &Cascade,
    optimized: &Cascade,
    bindings: &[(&str, u64)],
    scale: Option<f64>,
    targets: Vec<Target>,
) -> Vec<(Target, f64)> {
    let symbolic = |name: &str| {
        written.rank_by_name(name).is_some_and(|r| written.rank(r).extent == einfuse::compiler::ir::Extent::Symbolic)
    };
    let mut options = RunOptions {
        bindings: bindings.iter().filter(|(name, _)| symbolic(name)).map(|(n, v)| (n.to_string(), *v)).collect(),
        seed: 7,
        check_finite: false,
        threads: 2,
        ..RunOptions::default()
    };
    if let Some(scale) = scale {
        options.params = vec![("scale".to_string(), scale)];
    }
    let want = einfuse::run(written, Target::Interp, &options).unwrap();
    let split = RunOptions { split_keys: Some(CHUNK), ..options };
    targets
        .into_iter()
        .map(|target| {
            let got = einfuse::run(optimized, target, &split).unwrap();
            let mut worst = 0.0f64;
            for ((_, g), (_, w)) in got.iter().zip(&want) {
                assert_eq!(g.shape(), w.shape());
                for (a, b) in g.data().iter().zip(w.data()) {
                    let (a, b) = (*a as f64, *b as f64);
                    if a.is_nan() && b.is_nan() {
                        continue;
                    }
                    worst = worst.max((a - b).abs() / (1.0 + b.abs()));
                }
            }
            (target, worst)
        })
        .collect()
}

#[test]
fn split_kernels_agree_with_the_interpreter_on_every_target() {
    let mut split = 0;
    for written in common::kernels_in("examples") {
        let optimized = einfuse::optimize(&written).unwrap().cascade;
        if split_keys(&optimized, CHUNK).is_err() {
            continue;
        }
        split += 1;
        // One key; three chunks, the last with a ragged tile and a tile wholly past the end.
        for (m, p) in [(1, 1), (300, 2)] {
            let bindings = [("M", m), ("P", p), ("H", 2), ("K", 37), ("T", 20)];
            for (target, e) in errors(&written, &optimized, &bindings, None, targets(false)) {
                assert!(e <= 1e-4, "{} M={m} P={p} on {}: relative error {e:.3e}", written.name, target.name());
            }
        }
    }
    assert!(split >= 8, "only {split} corpus kernels split");
}

#[test]
fn split_kernels_keep_masked_rows_empty_and_large_logits_finite() {
    for name in ["causal", "padding_mask", "sliding_window", "gqa_decode"] {
        let Some(written) = corpus().into_iter().find(|k| k.name == name) else { panic!("no corpus kernel `{name}`") };
        let optimized = einfuse::optimize(&written).unwrap().cascade;
        // More queries than keys leaves causal rows with no key at all; the scale puts logits
        // near 1e4; a chunk of two tiles makes three chunks, the last one ragged.
        let bindings = [("M", 140), ("P", 150), ("H", 1)];
        for (target, e) in errors(&written, &optimized, &bindings, Some(2000.0), targets(true)) {
            assert!(e <= 1e-4, "{name} on {}: relative error {e:.3e}", target.name());
        }
    }
}

#[test]
fn the_chunk_index_is_a_batch_rank() {
    for written in corpus() {
        let optimized = einfuse::optimize(&written).unwrap().cascade;
        let Ok(split) = split_keys(&optimized, CHUNK) else { continue };
        let chunks = &split.chunks;
        let names: Vec<&str> = einfuse::compiler::llvm::launch::batch_ranks(chunks)
            .iter()
            .map(|r| chunks.rank(*r).name.as_str())
            .collect();
        assert!(names.contains(&"C"), "{}: batch ranks {names:?}", written.name);
    }
}

#[test]
fn which_corpus_kernels_split() {
    let mut report = String::new();
    for written in corpus() {
        let optimized = einfuse::optimize(&written).unwrap().cascade;
        let line = match split_keys(&optimized, CHUNK) {
            Ok(split) => {
                let partials: Vec<&str> =
                    split.chunks.outputs.iter().map(|o| split.chunks.tensor(o.tensor).name.as_str()).collect();
                format!("{}: splits, partials {}\n", written.name, partials.join(", "))
            }
            Err(why) => format!("{}: does not split: {why}\n", written.name),
        };
        report.push_str(&line);
    }
    insta::assert_snapshot!(report);
}

#[test]
fn split_text_of_decode() {
    let written = corpus().into_iter().find(|k| k.name == "decode").unwrap();
    let optimized = einfuse::optimize(&written).unwrap().cascade;
    let split = split_keys(&optimized, 1024).unwrap();
    let text = einfuse::compiler::print::print_cascades(&[split.chunks, split.merge]);
    // The text is `.ein` that checks.
    einfuse::compiler::compile_source(&text).unwrap();
    insta::assert_snapshot!(text);
}

#[test]
fn chunks_that_are_not_whole_tiles_are_refused() {
    let written = corpus().into_iter().find(|k| k.name == "decode").unwrap();
    let optimized = einfuse::optimize(&written).unwrap().cascade;
    let why = split_keys(&optimized, 100).unwrap_err().to_string();
    assert!(why.contains("not a whole number of tiles"), "{why}");
}

/// A running sum of tiles (not rescaled) merges by a sum over chunks; recurrences that do not
/// merge are refused with the reason.
#[test]
fn plain_running_sums_split_and_unmergeable_steps_are_refused() {
    let sum = "kernel tiled_sum {
  rank E = 4, M, P, M0 = 64, M1 = M / M0
  input X[E, M], Y[P]
  T[m1, p] = sum[m0](X[e, m1 * M0 + m0] * Y[p])
  R[0, p] = 0
  R[m1 + 1, p] = R[m1, p] + T[m1, p]
  Z[p] = R[M1, p] * 0.5
  output Z
}";
    let written = einfuse::compiler::compile_source(sum).unwrap().remove(0);
    if let Err(why) = split_keys(&written, CHUNK) {
        panic!("a tiled running sum does not split: {why}");
    }
    for target in targets(false) {
        let options =
            RunOptions { bindings: vec![("M".into(), 300), ("P".into(), 3)], seed: 2, ..RunOptions::default() };
        let want = einfuse::run(&written, Target::Interp, &options).unwrap();
        let got = einfuse::run(&written, target, &RunOptions { split_keys: Some(CHUNK), ..options }).unwrap();
        for (a, b) in got[0].1.data().iter().zip(want[0].1.data()) {
            assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{} on {}: {a} against {b}", written.name, target.name());
        }
    }
    let refused = [
        // Doubling the last iterate: chunks cannot be added.
        ("R[m1 + 1, p] = R[m1, p] + T[m1, p]", "R[m1 + 1, p] = R[m1, p] * 2 + T[m1, p]", "does not merge"),
        // A step past the last key would add 1.
        ("R[m1 + 1, p] = R[m1, p] + T[m1, p]", "R[m1 + 1, p] = R[m1, p] + T[m1, p] + 1", "past the last key"),
        // Starting at 1: every chunk would count it.
        ("R[0, p] = 0", "R[0, p] = 1", "does not start at 0"),
    ];
    for (from, to, why) in refused {
        let source = sum.replace(from, to);
        let cascade = einfuse::compiler::compile_source(&source).unwrap().remove(0);
        let error = split_keys(&cascade, CHUNK).unwrap_err().to_string();
        assert!(error.contains(why), "{to}: {error}");
    }
}

/// A rescaled running sum whose new term is not scaled by `exp(-RM[m1 + 1])` is refused.
#[test]
fn a_rescaled_sum_must_be_scaled_by_the_new_maximum() {
    let written = corpus().into_iter().find(|k| k.name == "attention_1pass").unwrap();
    let text = einfuse::compiler::print::print_cascade(&written);
    assert!(split_keys(&written, CHUNK).is_ok());
    let unscaled = text.replace("exp(BQK[m1, m0, p] - RM[m1 + 1, p])", "exp(BQK[m1, m0, p] - RM[m1, p])");
    assert_ne!(unscaled, text);
    let cascade = einfuse::compiler::compile_source(&unscaled).unwrap().remove(0);
    let error = split_keys(&cascade, CHUNK).unwrap_err().to_string();
    assert!(error.contains("does not merge"), "{error}");
}
