//! The whole compile path on generated cascades: optimize, schedule, compile for the CPU
//! (Cranelift) and as a GPU kernel emulated on the host (the LLVM lowering), run on small random
//! inputs, and agree with the interpreter.
#![no_main]

use libfuzzer_sys::fuzz_target;

use einfuse::compiler::interp::{interpret, InterpLimits};
use einfuse::compiler::shapes::{bind_extents, tensor_shape};
use einfuse::{DType, Tensor};

fuzz_target!(|data: &[u8]| {
    let mut seed = [0u8; 8];
    for (i, b) in data.iter().take(8).enumerate() {
        seed[i] = *b;
    }
    let generated = einfuse::compiler::generate::generate(u64::from_le_bytes(seed));
    let optimized = einfuse::optimize(&generated.cascade).expect("optimizes").cascade;
    let extents = bind_extents(&optimized, &generated.bindings, &[]).expect("binds");
    let inputs: Vec<Tensor> = optimized
        .inputs()
        .iter()
        .enumerate()
        .map(|(n, id)| {
            let shape = tensor_shape(&optimized, *id, &extents).iter().map(|s| *s as usize).collect();
            Tensor::random(DType::F32, shape, n as u64).unwrap()
        })
        .collect();
    let kernel = einfuse::compile_cpu(&optimized).expect("compiles");
    let slices: Vec<&[f32]> = inputs.iter().map(Tensor::data).collect();
    let got = kernel.run(&extents, &slices).expect("runs");
    let emulated = einfuse::compile_emulated(&optimized).expect("compiles for the GPU");
    let got_gpu = emulated.run(&extents, &slices).expect("runs on the emulated GPU");
    let wide: Vec<Vec<f64>> = inputs.iter().map(Tensor::to_f64).collect();
    let wide: Vec<&[f64]> = wide.iter().map(Vec::as_slice).collect();
    let want = interpret(&optimized, &extents, &wide, InterpLimits::default()).expect("interprets");
    for (g, w) in got.iter().zip(&want).chain(got_gpu.iter().zip(&want)) {
        for (a, b) in g.iter().zip(w) {
            let (a, b) = (*a as f64, *b);
            assert!((a.is_nan() && b.is_nan()) || a == b || (a - b).abs() <= 1e-3 * (1.0 + b.abs()), "{a} vs {b}");
        }
    }
});
