//! Tensor-core kernels (`mma.sync`, `ldmatrix`, `cp.async`) in the host emulation against the
//! interpreter, on ragged shapes, causal masks with fully masked rows and large logits; and
//! their PTX through `ptxas`.
#![cfg(feature = "llvm")]

use std::collections::BTreeMap;

mod common;

use einfuse::compiler::interp::{interpret, InterpLimits};
use einfuse::compiler::ir::Cascade;
use einfuse::compiler::llvm::warp_emulator::EmulatedTensorCoreKernel;
use einfuse::Tensor;

fn kernels() -> Vec<Cascade> {
    common::kernels_in("tests/tensor_cores")
}

fn scheduled(cascade: &Cascade) -> einfuse::compiler::schedule::LoopProgram {
    einfuse::optimize_for_tensor_cores(cascade).unwrap()
}

/// The largest difference `|a - b| / (1 + |b|)` between the emulated kernel and the interpreter.
fn compare(cascade: &Cascade, kernel: &EmulatedTensorCoreKernel, sizes: &BTreeMap<&str, u64>, seed: u64) -> f64 {
    let (_, extents, inputs) = common::random_call(cascade, sizes, seed);
    let slices: Vec<&[f32]> = inputs.iter().map(Tensor::data).collect();
    let got = kernel.run(&extents, &slices).unwrap();
    let data: Vec<Vec<f64>> = inputs.iter().map(Tensor::to_f64).collect();
    let slices: Vec<&[f64]> = data.iter().map(Vec::as_slice).collect();
    let want = interpret(cascade, &extents, &slices, InterpLimits::default()).unwrap();
    let mut worst = 0.0f64;
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g.len(), w.len());
        for (a, b) in g.iter().zip(w) {
            assert!(a.is_finite(), "a non-finite output: {a}");
            worst = worst.max((*a as f64 - b).abs() / (1.0 + b.abs()));
        }
    }
    worst
}

#[test]
fn every_tensor_core_kernel_plans() {
    for cascade in kernels() {
        let program = scheduled(&cascade);
        if let Err(why) = einfuse::compiler::schedule::tensor_cores::plan(&program) {
            panic!("{}: {why}", cascade.name);
        }
    }
}

#[test]
fn emulated_tensor_core_kernels_agree_with_the_interpreter() {
    for cascade in kernels() {
        let program = scheduled(&cascade);
        let kernel = EmulatedTensorCoreKernel::new(&program).unwrap_or_else(|e| panic!("{}: {e}", cascade.name));
        // The thread kernel (f32 probabilities) on the same inputs, for the cost of rounding the
        // probabilities to 16 bits.
        let thread = einfuse::compile_emulated(&program.cascade).unwrap();
        for (s, (m, p)) in [(100u64, 70u64), (1, 3), (64, 64)].into_iter().enumerate() {
            let sizes: BTreeMap<&str, u64> = [("M", m), ("P", p)].into();
            let error = compare(&program.cascade, &kernel, &sizes, s as u64);
            let (_, extents, inputs) = common::random_call(&program.cascade, &sizes, s as u64);
            let slices: Vec<&[f32]> = inputs.iter().map(Tensor::data).collect();
            let data: Vec<Vec<f64>> = inputs.iter().map(Tensor::to_f64).collect();
            let exact: Vec<&[f64]> = data.iter().map(Vec::as_slice).collect();
            let want = interpret(&program.cascade, &extents, &exact, InterpLimits::default()).unwrap();
            let got = thread.run(&extents, &slices).unwrap();
            let f32_error =
                got[0].iter().zip(&want[0]).map(|(a, b)| (*a as f64 - b).abs() / (1.0 + b.abs())).fold(0.0, f64::max);
            eprintln!("{} M={m} P={p}: {error:.2e} (the f32 thread kernel: {f32_error:.2e})", cascade.name);
            assert!(error <= 1e-2, "{} M={m} P={p}: relative error {error:.3e}", cascade.name);
        }
    }
}

/// Logits near 1e4 (the scale set to 2000) and rows with no key at all (a sliding window of 24
/// keys with more queries than keys plus 24): the online maximum keeps the exponentials finite,
/// and an empty row is 0, as the interpreter says.
#[test]
fn large_logits_and_fully_masked_rows() {
    for name in ["causal_f16", "sliding_window", "alibi_softcap_causal"] {
        let mut cascade = kernels().into_iter().find(|k| k.name == name).unwrap();
        for p in cascade.params.iter_mut().filter(|p| p.name == "scale") {
            p.value = 2000.0;
        }
        let program = scheduled(&cascade);
        let kernel = EmulatedTensorCoreKernel::new(&program).unwrap();
        let sizes: BTreeMap<&str, u64> = [("M", 30), ("P", 100)].into();
        let error = compare(&program.cascade, &kernel, &sizes, 7);
        eprintln!("{name} scale 2000, M=30 P=100: {error:.2e}");
        assert!(error <= 1e-2, "{name}: relative error {error:.3e}");
    }
}
