//! The GPU kernels on a real GPU against the interpreter: every kernel of `examples/`
//! (optimized) through PTX and the CUDA driver. Where no driver or no GPU is found, the test
//! prints why and passes: CI machines have none.
#![cfg(all(feature = "llvm", feature = "cuda"))]

use einfuse::compiler::ir::Extent;
use einfuse::gpu::{GpuDevice, GpuError, GpuKernel};
use einfuse::{RunOptions, Target};

mod common;

#[test]
fn every_corpus_kernel_on_the_gpu_agrees_with_the_interpreter() {
    let device = match GpuDevice::open() {
        Ok(device) => device,
        Err(GpuError::NoDriver(why)) => {
            eprintln!("skipped: {why}");
            return;
        }
        Err(other) => panic!("{other}"),
    };
    eprintln!("GPU: {} (compute capability {:?})", device.name, device.capability);
    for cascade in common::kernels_in("examples") {
        let optimized = einfuse::optimize(&cascade).unwrap().cascade;
        let program = einfuse::compiler::schedule::schedule(&optimized).unwrap();
        let ptx = einfuse::compile_ptx(&optimized, "sm_80").unwrap();
        let kernel = GpuKernel::load(&device, &program, &ptx).unwrap();
        for (m, p) in [(100u64, 7u64), (1, 3), (65, 70)] {
            let bindings: Vec<(String, u64)> = [("M", m), ("P", p), ("K", 37), ("H", 2), ("T", 20)]
                .iter()
                .filter(|(r, _)| {
                    optimized.rank_by_name(r).is_some_and(|id| matches!(optimized.rank(id).extent, Extent::Symbolic))
                })
                .map(|(r, n)| (r.to_string(), *n))
                .collect();
            let options = RunOptions { bindings, seed: m + p, check_finite: false, ..RunOptions::default() };
            let (extents, inputs) = einfuse::prepare_inputs(&optimized, &options).unwrap();
            let slices: Vec<&[f32]> = inputs.iter().map(einfuse::Tensor::data).collect();
            let got = kernel.run(&extents, &slices).unwrap();
            let want = einfuse::run(&optimized, Target::Interp, &options).unwrap();
            for (g, (_, w)) in got.iter().zip(&want) {
                for (a, b) in g.iter().zip(w.data()) {
                    let (a, b) = (*a as f64, *b as f64);
                    let close = (a.is_nan() && b.is_nan()) || (a - b).abs() <= 1e-4 * (1.0 + b.abs());
                    assert!(close, "{} M={m} P={p}: {a} vs {b}", cascade.name);
                }
            }
        }
    }
}
