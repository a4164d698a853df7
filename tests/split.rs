//! The split-key (Flash-Decoding) form against the interpreter: every corpus kernel whose
//! streamed loop splits, cut into chunks of two tiles, on every back end, with ragged sizes (a
//! last chunk with tiles wholly past the end), fully masked rows and logits near 1e4; the chunk
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

fn targets() -> Vec<Target> {
    let mut targets = vec![Target::Interp, Target::Cpu];
    if cfg!(feature = "llvm") {
        targets.extend([Target::CpuLlvm, Target::GpuEmulated]);
    }
    targets
}

/// The largest relative difference between the split form on `target` and the interpreter on
/// the cascade as written.
fn error(written: &Cascade, optimized: &Cascade, target: Target, bindings: &[(&str, u64)], scale: Option<f64>) -> f64 {
    let mut options = RunOptions {
        bindings: bindings
            .iter()
            .filter(|(name, _)| written.rank_by_name(name).is_some_and(|r| written.rank(r).extent == einfuse::compiler::ir::Extent::Symbolic))
            .map(|(n, v)| (n.to_string(), *v))
            .collect(),
        seed: 7,
        check_finite: false,
        threads: 2,
        ..RunOptions::default()
    };
    if let Some(scale) = scale {
        options.params = vec![("scale".to_string(), scale)];
    }
    let want = einfuse::run(written, Target::Interp, &options).unwrap();
    let got = einfuse::run(optimized, target, &RunOptions { split_keys: Some(CHUNK), ..options }).unwrap();
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
    worst
}

#[test]
fn split_kernels_agree_with_the_interpreter_on_every_target() {
    let mut split = 0;
    for written in corpus() {
        let optimized = einfuse::optimize(&written).unwrap().cascade;
        if split_keys(&optimized, CHUNK).is_err() {
            continue;
        }
        split += 1;
        // One key; one tile; a chunk and a ragged tile; three chunks, the last with a tile past
        // the end; several queries.
        for (m, p) in [(1, 1), (64, 1), (129, 2), (300, 1), (200, 9)] {
            for target in targets() {
                let bindings = [("M", m), ("P", p), ("H", 2), ("K", 37), ("T", 20)];
                let e = error(&written, &optimized, target, &bindings, None);
                assert!(e <= 1e-4, "{} M={m} P={p} on {}: relative error {e:.3e}", written.name, target.name());
            }
        }
    }
    assert!(split >= 8, "only {split} corpus kernels split");
}

#[test]
fn split_kernels_keep_masked_rows_empty_and_large_logits_finite() {
    for name in ["causal", "padding_mask", "sliding_window", "decode", "prefill_causal"] {
        let Some(written) = corpus().into_iter().find(|k| k.name == name) else {
            panic!("no corpus kernel `{name}`")
        };
        let optimized = einfuse::optimize(&written).unwrap().cascade;
        // More queries than keys leaves causal rows with no key at all; the scale puts logits
        // near 1e4.
        for target in targets() {
            let bindings = [("M", 200), ("P", 230), ("H", 1)];
            let e = error(&written, &optimized, target, &bindings, Some(2000.0));
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
    let why = split_keys(&optimized, 100).unwrap_err();
    assert!(why.contains("not a whole number of tiles"), "{why}");
}
