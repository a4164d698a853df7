//! The `einfuse` command line: exit statuses, help, errors at the boundary, and the text stages.

use std::process::{Command, Output};

fn einfuse(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_einfuse")).current_dir(env!("CARGO_MANIFEST_DIR")).args(args).output().unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn every_subcommand_has_help() {
    for sub in [
        vec!["--help"],
        vec!["check", "--help"],
        vec!["emit", "--help"],
        vec!["graph", "--help"],
        vec!["run", "--help"],
    ] {
        let output = einfuse(&sub);
        assert_eq!(output.status.code(), Some(0), "{sub:?}");
        assert!(stdout(&output).contains("Usage"), "{sub:?}");
    }
}

#[test]
fn usage_errors_exit_1() {
    for args in
        [vec!["bogus"], vec!["emit", "--stage", "nope", "examples/attention.ein"], vec!["run", "--bind", "M", "x.ein"]]
    {
        assert_eq!(einfuse(&args).status.code(), Some(1), "{args:?}");
    }
    let missing = einfuse(&["check", "no/such/file.ein"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(stderr(&missing).contains("no/such/file.ein"));
}

#[test]
fn a_shape_mismatch_names_tensor_rank_and_sizes() {
    let dir = std::env::temp_dir().join(format!("einfuse-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let q = dir.join("q.npy");
    // Q is declared [E = 64, P]; give it 63 rows.
    einfuse::runtime::npy::write_npy(&q, &einfuse::Tensor::zeros(einfuse::DType::F32, vec![63, 4]).unwrap()).unwrap();
    let output = einfuse(&[
        "run",
        "examples/attention.ein",
        "--kernel",
        "attention",
        "--bind",
        "M=8",
        "--input",
        &format!("Q={}", q.display()),
    ]);
    let text = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(text.contains("`Q`") && text.contains("`E`") && text.contains("64") && text.contains("63"), "{text}");
    let output = einfuse(&[
        "run",
        "examples/attention.ein",
        "--kernel",
        "attention",
        "--bind",
        "M=8",
        "--bind",
        "P=3",
        "--input",
        &format!("Q={}", q.display()),
    ]);
    assert_eq!(output.status.code(), Some(1));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn run_reports_unknown_names() {
    let output = einfuse(&[
        "run",
        "examples/attention.ein",
        "--kernel",
        "attention",
        "--bind",
        "M=8",
        "--bind",
        "P=2",
        "--param",
        "nope=1",
    ]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("nope"));
    let output = einfuse(&["run", "examples/attention.ein", "--kernel", "nope"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("attention_1pass"));
}

#[test]
fn run_prints_a_summary_and_is_deterministic() {
    let args = [
        "run",
        "examples/attention.ein",
        "--kernel",
        "attention_1pass",
        "--bind",
        "M=70",
        "--bind",
        "P=3",
        "--seed",
        "4",
    ];
    let first = einfuse(&args);
    assert_eq!(first.status.code(), Some(0), "{}", stderr(&first));
    assert!(stdout(&first).starts_with("AV: f32 [64, 3]"));
    assert_eq!(stdout(&first), stdout(&einfuse(&args)));
}

#[test]
fn graph_and_emit_ast() {
    let dot = einfuse(&["graph", "examples/attention.ein", "--kernel", "attention"]);
    assert_eq!(dot.status.code(), Some(0));
    let text = stdout(&dot);
    assert!(text.starts_with("digraph \"attention\"") && text.contains("->"), "{text}");
    insta::assert_snapshot!(text);
    let ast = einfuse(&["emit", "--stage", "ast", "examples/attention.ein", "--kernel", "attention_1pass"]);
    assert_eq!(ast.status.code(), Some(0));
    assert!(stdout(&ast).starts_with("(kernel attention_1pass"));
}

#[test]
fn explain_shows_the_derivation() {
    let output = einfuse(&["explain", "examples/attention.ein", "--kernel", "attention"]);
    assert_eq!(output.status.code(), Some(0));
    let text = stdout(&output);
    for expected in
        ["== rewrites", "Rewrite=> defer-division", "Rewrite=> online-sum-right", "== optimized", "RM[m1 + 1, p]"]
    {
        assert!(text.contains(expected), "missing {expected}:\n{text}");
    }
}

/// Where more than one pass remains, `explain` names the read that forces it: softmax's output
/// is indexed by the keys and needs the denominator, so 2 passes remain.
#[test]
fn explain_says_what_forces_the_remaining_passes() {
    let output = einfuse(&["explain", "examples/softmax.ein", "--kernel", "softmax"]);
    assert_eq!(output.status.code(), Some(0));
    let text = stdout(&output);
    let forced = text.split("== what forces the passes that remain").nth(1).unwrap_or_else(|| panic!("{text}"));
    assert!(forced.contains("pass 2 is needed because"), "{text}");
    assert!(forced.contains("no rewrite removes pass 2"), "{text}");
}

/// The split-key form and the tile size from the command line: `--check` against the
/// interpreter passes; a kernel that does not split, and a chunk that is not whole tiles, are
/// usage errors that say why.
#[test]
fn split_keys_and_tiles_on_the_command_line() {
    let run = |extra: &[&str]| {
        let mut args = vec!["run", "examples/variants.ein", "--kernel", "causal", "--target", "cpu", "--bind", "M=300"];
        args.extend(["--bind", "P=20", "--check"]);
        args.extend(extra);
        einfuse(&args)
    };
    for extra in [&["--split-keys", "128"][..], &["--tile", "16"], &["--tile", "16", "--split-keys", "48"]] {
        let output = run(extra);
        assert_eq!(output.status.code(), Some(0), "{extra:?}: {}", stderr(&output));
        assert!(stdout(&output).contains("check against the interpreter"), "{extra:?}");
    }
    let output = run(&["--split-keys", "100"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("not a whole number of tiles"), "{}", stderr(&output));
    let output = run(&["--tile", "0"]);
    assert_eq!(output.status.code(), Some(1));
    let output = einfuse(&[
        "run",
        "examples/variants.ein",
        "--kernel",
        "relu_attention",
        "--bind",
        "M=9",
        "--bind",
        "P=2",
        "--split-keys",
        "128",
    ]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("does not split into chunks"), "{}", stderr(&output));
    let split = einfuse(&["emit", "--stage", "split", "benches/attention.ein", "--kernel", "decode", "--chunk", "256"]);
    assert_eq!(split.status.code(), Some(0));
    assert!(stdout(&split).contains("kernel decode_chunks") && stdout(&split).contains("kernel decode_merge"));
}

/// `--check` allows an f16 or bf16 output one unit in its last place beside the tolerance (both
/// sides are rounded to its type, and may round to neighbours): bf16 attention passes on the CPU
/// and on the emulated GPU, whose kernel rounds the output itself.
#[test]
fn narrow_outputs_are_checked_to_a_unit_in_the_last_place() {
    let mut targets = vec!["cpu"];
    if cfg!(feature = "llvm") {
        targets.push("gpu-emu");
    }
    for target in targets {
        let output = einfuse(&[
            "run",
            "benches/attention.ein",
            "--kernel",
            "gpu_prefill_bf16",
            "--bind",
            "M=100",
            "--bind",
            "P=70",
            "--check",
            "--target",
            target,
        ]);
        assert_eq!(output.status.code(), Some(0), "{target}: {}", stderr(&output));
        assert!(stdout(&output).contains("AV: bf16 [32, 64, 70]"), "{target}: {}", stdout(&output));
    }
}

/// `gpu-check --emulate`, the rehearsal of the GPU run: a folder as `scripts/gpu-build.sh` makes
/// it (one kernel with f16 and bf16 storage, its PTX) checked against the interpreter on the
/// emulated GPU, with the report written.
#[cfg(all(feature = "llvm", feature = "cuda"))]
#[test]
fn gpu_check_rehearses_on_the_emulated_gpu() {
    let dir = std::env::temp_dir().join(format!("einfuse-gpu-check-{}", std::process::id()));
    let artifacts = dir.join("artifacts");
    std::fs::create_dir_all(artifacts.join("tests/filetests")).unwrap();
    let source = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/filetests/features.ein");
    std::fs::copy(&source, artifacts.join("tests/filetests/features.ein")).unwrap();
    let ptx = artifacts.join("features.types_and_scalars.ptx");
    let compile = einfuse(&[
        "compile",
        "--target",
        "nvptx",
        source.to_str().unwrap(),
        "--kernel",
        "types_and_scalars",
        "-o",
        ptx.to_str().unwrap(),
    ]);
    assert_eq!(compile.status.code(), Some(0), "{}", stderr(&compile));
    std::fs::write(
        artifacts.join("kernels.txt"),
        "tests/filetests/features.ein types_and_scalars optimized features.types_and_scalars.ptx\n",
    )
    .unwrap();
    let out = dir.join("out");
    let check = einfuse(&["gpu-check", "--emulate", artifacts.to_str().unwrap(), out.to_str().unwrap()]);
    assert_eq!(check.status.code(), Some(0), "{}{}", stdout(&check), stderr(&check));
    let results = std::fs::read_to_string(out.join("results.txt")).unwrap();
    assert_eq!(results.lines().filter(|l| l.starts_with("ok tests/filetests/features.ein")).count(), 3, "{results}");
    assert!(results.contains("0 mismatch(es)"), "{results}");
    std::fs::remove_dir_all(&dir).unwrap();
}
