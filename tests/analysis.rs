//! The pass-count analysis reproduces FuseMax: Cascades 1-5 and the classification of Table I.

use einfuse::compiler::passcount::analyze;
use einfuse::Program;

fn program(path: &str) -> Program {
    Program::from_file(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap()
}

fn passes(program: &Program, kernel: &str) -> Vec<(String, usize)> {
    analyze(program.kernel(Some(kernel)).unwrap()).counts()
}

fn counts(pairs: &[(&str, usize)]) -> Vec<(String, usize)> {
    pairs.iter().map(|(r, n)| (r.to_string(), *n)).collect()
}

#[test]
fn fusemax_cascades_1_to_3() {
    let fusemax = program("examples/fusemax.ein");
    assert_eq!(passes(&fusemax, "cascade1"), counts(&[("K", 2)]));
    assert_eq!(passes(&fusemax, "cascade2"), counts(&[("K", 1)]));
    assert_eq!(passes(&fusemax, "cascade3"), counts(&[("K", 1)]));
}

#[test]
fn attention_cascades_4_and_5() {
    let attention = program("examples/attention.ein");
    // Cascade 4, the textbook form: 3 passes over M.
    assert_eq!(passes(&attention, "attention"), counts(&[("E", 1), ("M", 3)]));
    // With the division deferred (FuseMax §IV-D): 2.
    assert_eq!(passes(&attention, "attention_deferred"), counts(&[("E", 1), ("M", 2)]));
    // Cascade 5: 1 over M and over M1; 2 over M0 (a tile of memory).
    assert_eq!(passes(&attention, "attention_1pass"), counts(&[("E", 1), ("M", 1), ("M0", 2), ("M1", 1)]));
}

/// FuseMax Table I, "Classifying prior attention algorithms", with the cascade each family uses.
#[test]
fn fusemax_table_1() {
    let attention = program("examples/attention.ein");
    let fusemax = program("examples/fusemax.ein");
    let table: [(&[&str], &Program, &str, usize); 3] = [
        (&["PyTorch", "TensorFlow", "FLAT", "E.T."], &attention, "attention", 3),
        (&["TileFlow", "Choi et al."], &fusemax, "attention_2pass", 2),
        (&["FlashAttention", "FlashAttention-2", "Rabe and Staats"], &attention, "attention_1pass", 1),
    ];
    for (algorithms, program, kernel, expected) in table {
        let report = analyze(program.kernel(Some(kernel)).unwrap());
        assert_eq!(report.passes("M"), Some(expected), "{algorithms:?} ({kernel})");
    }
    // The 2-pass form traverses its small tile rank three times.
    assert_eq!(analyze(fusemax.kernel(Some("attention_2pass")).unwrap()).passes("M1"), Some(3));
}

#[test]
fn the_report_says_why() {
    let attention = program("examples/attention.ein");
    let kernel = attention.kernel(Some("attention")).unwrap();
    let text = einfuse::compiler::passcount::describe(kernel, &analyze(kernel));
    assert!(text.contains("pass 2 is needed because SN[m, p] reads GM, which needs all of M first"), "{text}");
    assert!(text.contains("pass 3 is needed because A[m, p] reads SD, which needs all of M first"), "{text}");
}

#[test]
fn analyze_json() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_einfuse"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["analyze", "--json", "examples/fusemax.ein", "--kernel", "cascade1"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let kernel = &report["kernels"][0];
    assert_eq!(kernel["name"], "cascade1");
    assert_eq!(kernel["passes"], serde_json::json!({"K": 2}));
    assert_eq!(kernel["optimized_passes"], serde_json::json!({"K": 1}));
}

#[test]
fn softmax_alone_needs_two_passes_and_says_why() {
    let softmax = program("examples/softmax.ein");
    let kernel = softmax.kernel(Some("softmax")).unwrap();
    assert_eq!(analyze(kernel).passes("M"), Some(3));
    let optimized = einfuse::optimize(kernel).unwrap().cascade;
    let report = analyze(&optimized);
    assert_eq!(report.passes("M"), Some(2));
    let text = einfuse::compiler::passcount::describe(&optimized, &report);
    assert!(text.contains("no rewrite removes pass 2: the output Y is indexed by M"), "{text}");
}

#[test]
fn an_unbounded_exponential_is_a_warning() {
    let softmax = program("examples/softmax.ein");
    let report = analyze(softmax.kernel(Some("fixed_max")).unwrap());
    assert_eq!(report.passes("M"), Some(1));
    assert_eq!(report.warnings.len(), 1, "{:?}", report.warnings);
    assert!(report.warnings[0].starts_with("SN[m, p]: the argument of exp is not shifted by a maximum"));
    // Max-shifted exponentials, bounded ones and the optimizer's output raise none.
    for (file, kernel) in [("examples/attention.ein", "attention"), ("examples/linear.ein", "causal_linear")] {
        let cascade = program(file).kernel(Some(kernel)).unwrap().clone();
        assert!(analyze(&cascade).warnings.is_empty(), "{kernel}");
        assert!(analyze(&einfuse::optimize(&cascade).unwrap().cascade).warnings.is_empty(), "{kernel} optimized");
    }
}

#[test]
fn an_overflow_is_reported_with_the_tensor_and_coordinate() {
    let softmax = program("examples/softmax.ein");
    let kernel = softmax.kernel(Some("fixed_max")).unwrap();
    let options = einfuse::RunOptions {
        bindings: vec![("M".into(), 50), ("P".into(), 3)],
        // Logits near 1.5e4 against an estimate of 0: exp overflows even in f64.
        params: vec![("scale".into(), 3000.0), ("estimate".into(), 0.0)],
        ..Default::default()
    };
    match einfuse::run(kernel, einfuse::Target::Interp, &options) {
        Err(einfuse::Error::NonFinite { tensor, coordinates, .. }) => {
            assert_eq!(tensor, "AV");
            assert_eq!(coordinates.len(), 2);
        }
        other => panic!("expected a non-finite error, got {other:?}"),
    }
    // With the check off, the infinities come back as IEEE says.
    let unchecked = einfuse::RunOptions { check_finite: false, ..options };
    let outputs = einfuse::run(kernel, einfuse::Target::Interp, &unchecked).unwrap();
    assert!(outputs[0].1.data().iter().any(|x| !x.is_finite()));
}
