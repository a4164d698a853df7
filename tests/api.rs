//! The JIT API: calls by name, errors at the boundary, several threads at once.

use std::sync::Arc;

use einfuse::{compile, compile_file, CompileOptions, DType, Target, Tensor};

fn attention() -> einfuse::Compiled {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/attention.ein");
    compile_file(&path, &CompileOptions::default()).unwrap()
}

#[test]
fn a_kernel_is_callable_from_two_threads_at_once() {
    let compiled = Arc::new(attention());
    let q = Tensor::random(DType::F32, vec![64, 9], 1).unwrap();
    let k = Tensor::random(DType::F32, vec![64, 130], 2).unwrap();
    let v = Tensor::random(DType::F32, vec![64, 130], 3).unwrap();
    let expected = compiled.kernel("attention").unwrap().call(&[("Q", &q), ("K", &k), ("V", &v)]).unwrap();
    let handles: Vec<_> = (0..2)
        .map(|_| {
            let (compiled, q, k, v) = (compiled.clone(), q.clone(), k.clone(), v.clone());
            std::thread::spawn(move || {
                let kernel = compiled.kernel("attention").unwrap();
                (0..5).map(|_| kernel.call(&[("Q", &q), ("K", &k), ("V", &v)]).unwrap()).collect::<Vec<_>>()
            })
        })
        .collect();
    for handle in handles {
        for outputs in handle.join().unwrap() {
            assert_eq!(outputs, expected);
        }
    }
}

#[test]
fn the_interpreter_and_the_cpu_agree_through_the_api() {
    let source =
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/variants.ein"))
            .unwrap();
    let cpu = compile(&source, &CompileOptions::default()).unwrap();
    let interp =
        compile(&source, &CompileOptions { target: Target::Interp, optimize: false, ..Default::default() }).unwrap();
    let q = Tensor::random(DType::F32, vec![64, 5], 1).unwrap();
    let k = Tensor::random(DType::F32, vec![64, 77], 2).unwrap();
    let v = Tensor::random(DType::F32, vec![64, 77], 3).unwrap();
    for name in ["scaled", "causal", "sliding_window", "softcap", "sigmoid_attention", "stablemax"] {
        let a = cpu.kernel(name).unwrap().call(&[("Q", &q), ("K", &k), ("V", &v)]).unwrap();
        let b = interp.kernel(name).unwrap().call(&[("Q", &q), ("K", &k), ("V", &v)]).unwrap();
        for (x, y) in a[0].1.data().iter().zip(b[0].1.data()) {
            assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "{name}: {x} vs {y}");
        }
    }
}

#[test]
fn errors_at_the_boundary() {
    let compiled = attention();
    let kernel = compiled.kernel("attention").unwrap();
    let q = Tensor::random(DType::F32, vec![64, 4], 1).unwrap();
    let k = Tensor::random(DType::F32, vec![64, 10], 2).unwrap();
    let v = Tensor::random(DType::F32, vec![64, 11], 3).unwrap();
    // K says M = 10, V says 11: the error names the tensor, the rank and both sizes.
    let error = kernel.call(&[("Q", &q), ("K", &k), ("V", &v)]).unwrap_err().to_string();
    assert!(error.contains("`V`") && error.contains("`M`") && error.contains("10") && error.contains("11"), "{error}");
    let error = kernel.call(&[("Q", &q), ("K", &k)]).unwrap_err().to_string();
    assert!(error.contains("`V` is missing"), "{error}");
    let error = kernel.call(&[("Q", &q), ("K", &k), ("V", &k), ("W", &k)]).unwrap_err().to_string();
    assert!(error.contains("`W`"), "{error}");
    let short = [0.0f32; 7];
    let error = kernel.call_slices(&[("Q", &short, &[64, 4]), ("K", k.data(), k.shape()), ("V", k.data(), k.shape())]);
    assert!(error.unwrap_err().to_string().contains("`Q`"));
    assert!(compiled.kernel("nope").is_err());
    assert!(compile("kernel k {", &CompileOptions::default()).is_err());
}

/// A kernel compiled in its split-key form (`CompileOptions::split_keys`) gives what the plain
/// kernel gives, on the Cranelift tier and the interpreter; a kernel that does not split is an
/// error at compile time that says why.
#[test]
fn split_key_kernels_through_the_api() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/variants.ein");
    let plain = compile_file(&path, &CompileOptions::default()).unwrap();
    let q = Tensor::random(DType::F32, vec![64, 5], 1).unwrap();
    let k = Tensor::random(DType::F32, vec![64, 300], 2).unwrap();
    let v = Tensor::random(DType::F32, vec![64, 300], 3).unwrap();
    let inputs = [("Q", &q), ("K", &k), ("V", &v)];
    let want = plain.kernel("causal").unwrap().call(&inputs).unwrap();
    for target in [Target::Cpu, Target::Interp] {
        let options = CompileOptions { target, split_keys: Some(128), ..CompileOptions::default() };
        let split = compile_file(&path, &CompileOptions { ..options.clone() });
        // Some kernels of the file do not split: compile the one that does from its own text.
        assert!(split.is_err(), "every kernel of variants.ein splits?");
        let causal = plain.kernel("causal").unwrap().cascade().clone();
        let text = einfuse::compiler::print::print_cascade(&causal);
        let compiled = compile(&text, &options).unwrap();
        let got = compiled.kernel("causal").unwrap().call(&inputs).unwrap();
        for (a, b) in got[0].1.data().iter().zip(want[0].1.data()) {
            assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{}: {a} against {b}", target.name());
        }
    }
    let error = compile(
        "kernel s { rank I\n input X[I]\n Y[i] = X[i] * 2\n output Y }",
        &CompileOptions { split_keys: Some(128), ..CompileOptions::default() },
    )
    .err()
    .unwrap();
    assert!(error.to_string().contains("does not split into chunks"), "{error}");
}
