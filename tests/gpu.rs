//! The GPU kernels on a real GPU against the interpreter: every kernel of `examples/`
//! (optimized for the GPU), and one with f16 and bf16 storage, through PTX and the CUDA driver.
//! Where no driver or no GPU is found, the test prints why and passes: CI machines have none.
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
    let mut kernels = common::kernels_in("examples");
    kernels.extend(common::kernels_in("tests/filetests").into_iter().filter(|k| k.name == "types_and_scalars"));
    for cascade in kernels {
        let optimized = einfuse::optimize_for_gpu(&cascade).unwrap().cascade;
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
                // A narrow output may round to the neighbour of the interpreter's value.
                let dtype = w.dtype();
                let tolerance = 1e-4
                    + match dtype {
                        einfuse::DType::F32 => 0.0,
                        einfuse::DType::F16 => 2f64.powi(-10),
                        einfuse::DType::Bf16 => 2f64.powi(-7),
                    };
                for (a, b) in g.iter().zip(w.data()) {
                    let (a, b) = (dtype.round(*a) as f64, *b as f64);
                    let close = (a.is_nan() && b.is_nan()) || (a - b).abs() <= tolerance * (1.0 + b.abs());
                    assert!(close, "{} M={m} P={p}: {a} vs {b}", cascade.name);
                }
            }
        }
    }
}
