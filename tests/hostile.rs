//! Hostile input: every bad thing a user can hand einfuse gives a clear error or an IEEE-correct
//! result, never a panic, a hang or unbounded memory.

use std::process::{Command, Output};

use einfuse::compiler::interp::{interpret, InterpError, InterpLimits};
use einfuse::compiler::optimize::{optimize, OptimizeOptions};
use einfuse::{compile, CompileOptions, DType, Program, RunOptions, Target, Tensor};

fn einfuse_cli(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_einfuse")).current_dir(env!("CARGO_MANIFEST_DIR")).args(args).output().unwrap()
}

fn temp(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("einfuse-hostile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn attention() -> Program {
    Program::from_file(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/attention.ein")).unwrap()
}

#[test]
fn an_oversized_source_file_is_refused() {
    let path = temp("huge.ein");
    std::fs::write(&path, vec![b'#'; 17 << 20]).unwrap();
    let output = einfuse_cli(&["check", path.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("larger than"));
}

#[test]
fn too_many_einsums_or_declarations() {
    let mut source = String::from("kernel k {\n rank N\n input X[N]\n");
    for i in 0..5000 {
        source.push_str(&format!(" Y{i}[n] = X[n]\n"));
    }
    source.push_str(" output Y0\n}\n");
    let errors = einfuse::compiler::compile_source(&source).unwrap_err();
    assert!(errors[0].message.contains("too large"), "{:?}", errors[0]);
    let ranks: Vec<String> = (0..1100).map(|i| format!("R{i}")).collect();
    let source = format!("kernel k {{\n rank {}\n input X[R0]\n Y[r0] = X[r0]\n output Y\n}}\n", ranks.join(", "));
    assert!(einfuse::compiler::compile_source(&source).unwrap_err()[0].message.contains("too large"));
}

#[test]
fn huge_extents_are_errors_not_crashes() {
    let program = attention();
    let kernel = program.kernel(Some("attention")).unwrap();
    // The product of extents overflows u64.
    let options =
        RunOptions { bindings: vec![("M".into(), u64::MAX / 2), ("P".into(), u64::MAX / 2)], ..Default::default() };
    for target in [Target::Interp, Target::Cpu] {
        let error = einfuse::run(kernel, target, &options).unwrap_err().to_string();
        assert!(error.contains("elements") || error.contains("overflow") || error.contains("limit"), "{error}");
    }
    // Large but representable: refused before any allocation.
    let options = RunOptions { bindings: vec![("M".into(), 1 << 28), ("P".into(), 1 << 20)], ..Default::default() };
    for target in [Target::Interp, Target::Cpu] {
        assert!(einfuse::run(kernel, target, &options).is_err());
    }
}

#[test]
fn the_interpreter_is_bounded_in_memory_and_time() {
    let program = attention();
    let kernel = program.kernel(Some("attention")).unwrap();
    let extents =
        einfuse::compiler::shapes::bind_extents(kernel, &[("M".into(), 300), ("P".into(), 200)], &[]).unwrap();
    let q = vec![0.0; 64 * 200];
    let k = vec![0.0; 64 * 300];
    let inputs: [&[f64]; 3] = [&q, &k, &k];
    let small_memory = InterpLimits { max_elements: 1000, ..Default::default() };
    assert!(matches!(interpret(kernel, &extents, &inputs, small_memory), Err(InterpError::TooLarge { .. })));
    let few_steps = InterpLimits { max_steps: 10_000, ..Default::default() };
    assert!(matches!(interpret(kernel, &extents, &inputs, few_steps), Err(InterpError::TooManySteps { .. })));
}

#[test]
fn the_optimizer_stops_at_its_limits_with_a_valid_result() {
    let program = attention();
    let kernel = program.kernel(Some("attention")).unwrap();
    for options in [
        OptimizeOptions { node_limit: 5, ..Default::default() },
        OptimizeOptions { iter_limit: 1, ..Default::default() },
        OptimizeOptions { time_limit: std::time::Duration::from_nanos(1), ..Default::default() },
    ] {
        let result = optimize(kernel, &options).unwrap();
        assert!(einfuse::compiler::verify::verify(&result.cascade).is_ok());
    }
}

#[test]
fn nan_and_infinity_in_inputs_propagate() {
    let compiled = compile(
        "kernel k {\n rank N\n input X[N]\n S[] = X[n]\n M[] = max[n](X[n])\n E[n] = exp(X[n])\n output S, M, E\n}",
        &CompileOptions { check_finite: false, ..Default::default() },
    )
    .unwrap();
    let kernel = compiled.kernel("k").unwrap();
    let x = Tensor::new(DType::F32, vec![4], vec![1.0, f32::NAN, f32::INFINITY, -f32::INFINITY]).unwrap();
    let out = kernel.call(&[("X", &x)]).unwrap();
    assert!(out[0].1.data()[0].is_nan()); // NaN + ... = NaN
    assert!(out[1].1.data()[0].is_nan()); // max with a NaN is NaN
    let e = out[2].1.data();
    assert_eq!(e[0], 1.0f32.exp());
    assert!(e[1].is_nan() && e[2] == f32::INFINITY && e[3] == 0.0);
    // With the check on (the default), the non-finite output is named.
    let checked =
        compile("kernel k {\n rank N\n input X[N]\n S[] = X[n]\n output S\n}", &CompileOptions::default()).unwrap();
    let error = checked.kernel("k").unwrap().call(&[("X", &x)]).unwrap_err().to_string();
    assert!(error.contains("`S`") && error.contains("NaN"), "{error}");
}

#[test]
fn zero_sized_ranks() {
    let program = attention();
    let textbook = program.kernel(Some("attention")).unwrap();
    let optimized = einfuse::optimize(textbook).unwrap().cascade;
    for kernel in [textbook, &optimized] {
        for (m, p) in [(0u64, 3u64), (5, 0), (0, 0)] {
            let options = RunOptions { bindings: vec![("M".into(), m), ("P".into(), p)], ..Default::default() };
            for target in [Target::Interp, Target::Cpu] {
                let out = einfuse::run(kernel, target, &options).unwrap();
                // No keys: every output row is an empty sum, 0.
                assert!(out[0].1.data().iter().all(|x| *x == 0.0), "{target:?} M={m} P={p}");
                assert_eq!(out[0].1.shape(), &[64, p as usize]);
            }
        }
    }
    // The contract's 1-pass form divides without a guard: with no keys it computes 0 / 0, NaN, as
    // IEEE says, on every target; the default check reports it.
    let unguarded = program.kernel(Some("attention_1pass")).unwrap();
    let options =
        RunOptions { bindings: vec![("M".into(), 0), ("P".into(), 2)], check_finite: false, ..Default::default() };
    for target in [Target::Interp, Target::Cpu] {
        let out = einfuse::run(unguarded, target, &options).unwrap();
        assert!(out[0].1.data().iter().all(|x| x.is_nan()), "{target:?}");
        let checked = RunOptions { check_finite: true, ..options.clone() };
        assert!(matches!(einfuse::run(unguarded, target, &checked), Err(einfuse::Error::NonFinite { .. })));
    }
}

#[test]
fn outputs_never_alias_inputs() {
    // The API returns fresh output tensors: a caller cannot make an output alias an input.
    let compiled =
        compile("kernel k {\n rank N\n input X[N]\n Y[n] = X[n] * 2\n output Y\n}", &CompileOptions::default())
            .unwrap();
    let x = Tensor::random(DType::F32, vec![5], 1).unwrap();
    let out = compiled.kernel("k").unwrap().call(&[("X", &x)]).unwrap();
    assert_ne!(out[0].1.data().as_ptr(), x.data().as_ptr());
    // And an output cannot be declared as an input.
    assert!(einfuse::compiler::compile_source("kernel k {\n rank N\n input X[N]\n output X\n}").is_err());
}

fn npy_header(descr: &str, fortran: bool, shape: &str) -> Vec<u8> {
    let mut dict = format!(
        "{{'descr': '{descr}', 'fortran_order': {}, 'shape': {shape}, }}",
        if fortran { "True" } else { "False" }
    );
    while (10 + dict.len() + 1) % 64 != 0 {
        dict.push(' ');
    }
    dict.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    bytes.extend_from_slice(dict.as_bytes());
    bytes
}

#[test]
fn bad_npy_files_are_clear_errors() {
    let q = temp("q_bad.npy");
    let run = |path: &std::path::Path| {
        einfuse_cli(&[
            "run",
            "examples/attention.ein",
            "--kernel",
            "attention",
            "--bind",
            "M=4",
            "--input",
            &format!("Q={}", path.display()),
        ])
    };
    // Not a .npy at all.
    std::fs::write(&q, b"hello, world").unwrap();
    let out = run(&q);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a .npy"), "{}", String::from_utf8_lossy(&out.stderr));
    // The wrong element type (int32).
    let mut bytes = npy_header("<i4", false, "(64, 2)");
    bytes.extend(std::iter::repeat_n(0u8, 64 * 2 * 4));
    std::fs::write(&q, &bytes).unwrap();
    let out = run(&q);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unsupported element type"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Truncated data.
    let mut bytes = npy_header("<f4", false, "(64, 2)");
    bytes.extend(std::iter::repeat_n(0u8, 64 * 2 * 4 - 10));
    std::fs::write(&q, &bytes).unwrap();
    let out = run(&q);
    assert_eq!(out.status.code(), Some(1));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
    // Fortran order is read correctly (transposed into row-major).
    let mut bytes = npy_header("<f4", true, "(2, 3)");
    for x in [0.0f32, 3.0, 1.0, 4.0, 2.0, 5.0] {
        bytes.extend_from_slice(&x.to_le_bytes());
    }
    let t = einfuse::runtime::npy::read_npy_bytes(&bytes, "f.npy", DType::F32).unwrap();
    assert_eq!(t.data(), &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
    // A missing file.
    let out = run(std::path::Path::new("/no/such/q.npy"));
    assert_eq!(out.status.code(), Some(1));
}
