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
    let optimized = einfuse::optimize_for_gpu(cascade).unwrap().cascade;
    einfuse::compiler::schedule::schedule_streamed(&optimized).unwrap()
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
        for (s, (m, p)) in [(100u64, 70u64), (1, 3), (64, 64)].into_iter().enumerate() {
            let sizes: BTreeMap<&str, u64> = [("M", m), ("P", p)].into();
            let error = compare(&program.cascade, &kernel, &sizes, s as u64);
            eprintln!("{} M={m} P={p}: {error:.2e}", cascade.name);
            assert!(error <= 1e-2, "{} M={m} P={p}: relative error {error:.3e}", cascade.name);
        }
    }
}
