//! The LLVM back ends against the interpreter: the `cpu-llvm` tier and the host emulation of the
//! NVPTX kernels, on every kernel of `examples/` as written and optimized, with ragged sizes,
//! fully masked rows and logits near 1e4; and the PTX of every kernel through `ptxas`.
#![cfg(feature = "llvm")]

use std::collections::BTreeMap;

mod common;

use einfuse::compiler::interp::{interpret, InterpLimits};
use einfuse::compiler::ir::{Cascade, Extent};
use einfuse::compiler::schedule::Slot;
use einfuse::compiler::shapes::bind_extents;
use einfuse::Tensor;

fn corpus() -> Vec<Cascade> {
    common::kernels_in("examples")
}

/// A compiled kernel of one LLVM back end.
enum Compiled {
    Cpu(einfuse::compiler::cpu::CpuKernel),
    Emulated(einfuse::compiler::llvm::EmulatedKernel),
}

impl Compiled {
    fn new(cascade: &Cascade, emulated: bool) -> Compiled {
        if emulated {
            Compiled::Emulated(einfuse::compile_emulated(cascade).unwrap())
        } else {
            Compiled::Cpu(einfuse::compile_cpu_llvm(cascade).unwrap())
        }
    }

    fn run(&self, extents: &[u64], inputs: &[&[f32]]) -> Vec<Vec<f32>> {
        match self {
            Compiled::Cpu(k) => k.run(extents, inputs).unwrap(),
            Compiled::Emulated(k) => k.run(extents, inputs).unwrap(),
        }
    }
}

/// Runs `kernel` and the interpreter on the same random inputs; the largest relative difference.
fn compare(cascade: &Cascade, kernel: &Compiled, sizes: &BTreeMap<&str, u64>, seed: u64) -> f64 {
    let (_, extents, inputs) = common::random_call(cascade, sizes, seed);
    let slices: Vec<&[f32]> = inputs.iter().map(Tensor::data).collect();
    let got = kernel.run(&extents, &slices);
    let data: Vec<Vec<f64>> = inputs.iter().map(Tensor::to_f64).collect();
    let slices: Vec<&[f64]> = data.iter().map(Vec::as_slice).collect();
    let want = interpret(cascade, &extents, &slices, InterpLimits::default()).unwrap();
    let mut worst = 0.0f64;
    for (output, (g, w)) in cascade.outputs.iter().zip(got.iter().zip(&want)) {
        assert_eq!(g.len(), w.len());
        let dtype = einfuse::dtype_of(output.elem);
        for (a, b) in g.iter().zip(w) {
            let a = dtype.round(*a) as f64;
            let b = dtype.round(*b as f32) as f64;
            if a.is_nan() && b.is_nan() {
                continue;
            }
            worst = worst.max((a - b).abs() / (1.0 + b.abs()));
        }
    }
    worst
}

fn with_scale(cascade: &Cascade, scale: f64) -> Cascade {
    let mut cascade = cascade.clone();
    for p in cascade.params.iter_mut().filter(|p| p.name == "scale") {
        p.value = scale;
    }
    cascade
}

fn every_corpus_kernel(emulated: bool) {
    let shapes: [&[(&str, u64)]; 3] = [&[("M", 100), ("P", 7)], &[("M", 1), ("P", 3)], &[("M", 65), ("P", 70)]];
    for cascade in corpus() {
        let optimized = einfuse::optimize(&cascade).unwrap().cascade;
        for (form, kernel) in [("as written", &cascade), ("optimized", &optimized)] {
            let compiled = Compiled::new(kernel, emulated);
            for (s, shape) in shapes.iter().enumerate() {
                let mut sizes: BTreeMap<&str, u64> = shape.iter().copied().collect();
                sizes.extend([("K", 37), ("H", 2), ("T", 20)]);
                let error = compare(kernel, &compiled, &sizes, s as u64);
                assert!(error <= 1e-4, "{} {form} {shape:?}: relative error {error:.3e}", cascade.name);
            }
        }
    }
}

#[test]
fn cpu_llvm_runs_every_corpus_kernel() {
    every_corpus_kernel(false);
}

#[test]
fn emulated_gpu_kernels_run_every_corpus_kernel() {
    every_corpus_kernel(true);
}

fn large_logits_and_masked_rows(emulated: bool) {
    for name in ["attention", "causal", "sink", "padding_mask", "document_mask", "gqa_decode"] {
        let cascade = corpus().into_iter().find(|k| k.name == name).unwrap();
        // P > M leaves causal rows with no key at all; the scale puts logits near 1e4.
        let optimized = with_scale(&einfuse::optimize(&cascade).unwrap().cascade, 2000.0);
        let compiled = Compiled::new(&optimized, emulated);
        let sizes: BTreeMap<&str, u64> = [("M", 40), ("P", 50), ("H", 2)].into();
        let error = compare(&optimized, &compiled, &sizes, 3);
        assert!(error <= 1e-4, "{name}: {error:.3e}");
    }
}

#[test]
fn large_logits_and_masked_rows_on_both_llvm_targets() {
    large_logits_and_masked_rows(false);
    large_logits_and_masked_rows(true);
}

#[test]
fn a_sweep_of_sizes_on_the_emulated_gpu() {
    let causal = corpus().into_iter().find(|k| k.name == "causal").unwrap();
    let optimized = einfuse::optimize(&causal).unwrap().cascade;
    let emulated = Compiled::new(&optimized, true);
    let cpu = Compiled::new(&optimized, false);
    for m in [1u64, 2, 17, 64, 65, 129, 200] {
        for p in [1u64, 5, 64, 200] {
            if m * p > 64 * 200 {
                continue;
            }
            let sizes: BTreeMap<&str, u64> = [("M", m), ("P", p)].into();
            for kernel in [&emulated, &cpu] {
                let error = compare(&optimized, kernel, &sizes, m + p);
                assert!(error <= 1e-4, "M={m} P={p}: {error:.3e}");
            }
        }
    }
}

/// The host `exp` (an inline polynomial) over the whole range it is used on: relative error at
/// most 2.5e-7 wherever the result is a normal float, and the IEEE answers at the edges.
#[test]
fn host_exp_is_accurate_over_the_float_range() {
    let source = "kernel e { rank I\n input X[I]\n Y[i] = exp(X[i])\n output Y }";
    let cascade = einfuse::compiler::compile_source(source).unwrap().remove(0);
    let kernel = einfuse::compile_cpu_llvm(&cascade).unwrap();
    let mut xs: Vec<f32> = (0..200_001).map(|k| -87.3 + (88.7 + 87.3) * k as f32 / 200_000.0).collect();
    xs.extend([0.0, -0.0, 1e-30, -1e-30, 88.72, -87.33]);
    let got = kernel.run(&[xs.len() as u64], &[&xs]).unwrap().remove(0);
    let mut worst = 0.0f64;
    for (x, y) in xs.iter().zip(&got) {
        let want = (*x as f64).exp();
        if want >= f32::MIN_POSITIVE as f64 && want <= f32::MAX as f64 {
            worst = worst.max((*y as f64 - want).abs() / want);
        }
    }
    assert!(worst <= 2.5e-7, "relative error {worst:.3e}");
    let edges = [f32::NEG_INFINITY, f32::INFINITY, f32::NAN, 89.0, -104.0, -1e30, 1e30, -100.0];
    let got = kernel.run(&[edges.len() as u64], &[&edges]).unwrap().remove(0);
    assert_eq!(got[0], 0.0);
    assert_eq!(got[1], f32::INFINITY);
    assert!(got[2].is_nan());
    assert_eq!(got[3], f32::INFINITY);
    assert_eq!(got[4], 0.0);
    assert_eq!(got[5], 0.0);
    assert_eq!(got[6], f32::INFINITY);
    // A result that would be subnormal is 0 (exp(-100) = 3.7e-44): see `math::EXP_LO`.
    assert_eq!(got[7], 0.0);
}

/// `log`, `tanh`, `sigmoid` and `softplus` in lanes on the host: within a bound of the f64
/// interpreter over their domains, IEEE edges right, and the same bits in a lane as in the
/// scalar path that a ragged tail (or a call with one element) takes.
#[test]
fn host_functions_are_accurate_and_the_same_in_lanes_and_tails() {
    type Case = (&'static str, fn(f64) -> f64, f32, f32, f64);
    let cases: [Case; 4] = [
        // Measured on these points: 7.7e-8, 2.56e-7, 1.73e-7, 1.41e-7; over every float of the
        // range, `tanh` 3.18e-7 (at 6.99: 5 units in the last place) and `softplus` 1.98e-7.
        ("log", f64::ln, -30.0, 30.0, 1.5e-7),
        ("tanh", f64::tanh, -12.0, 12.0, 3.5e-7),
        ("sigmoid", |x| 1.0 / (1.0 + (-x).exp()), -87.0, 40.0, 2.5e-7),
        ("softplus", |x| x.max(0.0) + (-x.abs()).exp().ln_1p(), -87.0, 60.0, 3e-7),
    ];
    for (name, reference, lo, hi, bound) in cases {
        let source = format!("kernel f {{ rank I\n input X[I]\n Y[i] = {name}(X[i])\n output Y }}");
        let cascade = einfuse::compiler::compile_source(&source).unwrap().remove(0);
        let kernel = einfuse::compile_cpu_llvm(&cascade).unwrap();
        // log over 2^-30 .. 2^30 (and subnormals), the others over [lo, hi]; 100,003 points (not a
        // multiple of any vector width).
        let n = 100_003;
        let xs: Vec<f32> = (0..n)
            .map(|k| {
                let t = lo + (hi - lo) * k as f32 / (n - 1) as f32;
                if name == "log" {
                    2f32.powf(t)
                } else {
                    t
                }
            })
            .chain(if name == "log" {
                vec![1e-40, 3e-45, 1.0, 0.999_999_9, 1.000_000_1]
            } else {
                // Signed zeros and tiny values, then vectors that mix points from near 0 with
                // points from the whole range in their lanes (`tanh` chooses lane by lane).
                let mixed =
                    (0..96).map(|k| if k % 3 == 0 { 0.6 - k as f32 / 80.0 } else { lo + (hi - lo) * k as f32 / 95.0 });
                [0.0, -0.0, 1e-6, -1e-6].into_iter().chain(mixed).collect()
            })
            .collect();
        let got = kernel.run(&[xs.len() as u64], &[&xs]).unwrap().remove(0);
        let mut worst = 0.0f64;
        for (x, y) in xs.iter().zip(&got) {
            let want = reference(*x as f64);
            if want.abs() >= f32::MIN_POSITIVE as f64 {
                let error = (*y as f64 - want).abs() / want.abs().max(if name == "log" { 1.0 } else { 0.0 });
                worst = worst.max(error);
            }
        }
        assert!(worst <= bound, "{name}: relative error {worst:.3e}");
        // The Cranelift tier (4 lanes, helpers in its tails) and the scalar definition
        // (`compiler::math`) give the same bits as the LLVM tier's 8 lanes, everywhere.
        let cranelift = einfuse::compile_cpu(&cascade).unwrap().run(&[xs.len() as u64], &[&xs]).unwrap().remove(0);
        let scalar: fn(f32) -> f32 = match name {
            "log" => einfuse::compiler::math::log,
            "tanh" => einfuse::compiler::math::tanh,
            "sigmoid" => einfuse::compiler::math::sigmoid,
            _ => einfuse::compiler::math::softplus,
        };
        for ((x, a), b) in xs.iter().zip(&got).zip(&cranelift) {
            assert_eq!(a.to_bits(), b.to_bits(), "{name}({x}): {a} on cpu-llvm, {b} on cpu");
            assert_eq!(a.to_bits(), scalar(*x).to_bits(), "{name}({x}): {a} on cpu-llvm, {} in math", scalar(*x));
        }
        // Lanes against the scalar path: every element alone, bit for bit.
        for (x, y) in xs.iter().zip(&got).step_by(997) {
            let alone = kernel.run(&[1], &[&[*x]]).unwrap().remove(0)[0];
            assert_eq!(alone.to_bits(), y.to_bits(), "{name}({x}): {alone} alone, {y} in a lane");
        }
        let edges = [f32::NEG_INFINITY, f32::INFINITY, f32::NAN, -1e30, 1e30];
        let got = kernel.run(&[edges.len() as u64], &[&edges]).unwrap().remove(0);
        assert!(got[2].is_nan(), "{name}(NaN) = {}", got[2]);
        let want: [f32; 5] = match name {
            "log" => [f32::NAN, f32::INFINITY, f32::NAN, f32::NAN, 1e30f32.ln()],
            "tanh" => [-1.0, 1.0, f32::NAN, -1.0, 1.0],
            "sigmoid" => [0.0, 1.0, f32::NAN, 0.0, 1.0],
            _ => [0.0, f32::INFINITY, f32::NAN, 0.0, 1e30],
        };
        for (k, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()) || (g - w).abs() <= 1e-6 * w.abs(),
                "{name}({}) = {g}, want {w}",
                edges[k]
            );
        }
        if name == "tanh" {
            // Lanes that mix the polynomial's arguments with the rational function's, the edges
            // and NaN, in vectors on both tiers: the same bits as the scalar definition (NaN as
            // NaN), and -0 stays -0.
            let small = [0.3f32, -0.0, 0.624_999_94, -0.624_999_94, 1e-30, 0.0];
            let large = [0.625f32, -0.625, 0.625_000_06, f32::INFINITY, f32::NEG_INFINITY, f32::NAN, 9.2, -3.0];
            let xs: Vec<f32> = (0..48).map(|k| if k % 2 == 0 { small[k / 2 % 6] } else { large[k / 2 % 8] }).collect();
            let tiers = [
                kernel.run(&[48], &[&xs]).unwrap().remove(0),
                einfuse::compile_cpu(&cascade).unwrap().run(&[48], &[&xs]).unwrap().remove(0),
            ];
            for got in &tiers {
                for (x, y) in xs.iter().zip(got) {
                    let want = einfuse::compiler::math::tanh(*x);
                    assert!(
                        y.to_bits() == want.to_bits() || (y.is_nan() && want.is_nan()),
                        "tanh({x}) = {y}, want {want}"
                    );
                }
            }
            assert!(einfuse::compiler::math::tanh(-0.0).is_sign_negative());
        }
        let zero = kernel.run(&[1], &[&[0.0]]).unwrap().remove(0)[0];
        if name == "log" {
            assert_eq!(zero, f32::NEG_INFINITY);
        }
    }
}

/// Narrow storage types (bf16 and f16 inputs, a bf16 output) on both LLVM targets.
#[test]
fn narrow_storage_types_on_both_llvm_targets() {
    let inputs = "Q[E, P]: bf16, K[E, M]: bf16, V[F, M]: f16";
    let source = common::attention("attention_bf16", "E = 64, F = 64, M, P", inputs, "AV: bf16");
    let cascade = einfuse::compiler::compile_source(&source).unwrap().remove(0);
    let optimized = einfuse::optimize(&cascade).unwrap().cascade;
    let sizes: BTreeMap<&str, u64> = [("M", 90), ("P", 37)].into();
    for emulated in [false, true] {
        let compiled = Compiled::new(&optimized, emulated);
        let error = compare(&optimized, &compiled, &sizes, 1);
        assert!(error <= 1e-2, "emulated: {emulated}: {error:.3e}");
    }
}

/// The GPU kernels store f16 and bf16 inputs and outputs as 16-bit values (see
/// `llvm::storage`): inputs always, an output where nothing reads it back. Staged tiles of
/// 16-bit keys and values are widened into shared memory, or read from global memory where they
/// do not fit; outputs are rounded to nearest even, bit for bit as `half` rounds them.
#[test]
fn narrow_storage_in_the_gpu_kernels() {
    use einfuse::compiler::ir::ElemType::{Bf16, F16, F32};
    use einfuse::compiler::llvm::storage::storage_types;
    let source =
        common::attention("narrow", "E, F, M, P", "Q[E, P]: bf16, K[E, M]: bf16, V[F, M]: f16", "AV: bf16, SD: f16");
    let cascade = einfuse::compiler::compile_source(&source).unwrap().remove(0);
    let optimized = einfuse::optimize(&cascade).unwrap().cascade;
    let program = einfuse::compiler::schedule::schedule(&optimized).unwrap();
    let storage = storage_types(&program);
    let of = |name: &str| {
        let b = program.buffers.iter().position(|b| optimized.tensor(b.tensor).name == name).unwrap();
        storage[b]
    };
    // The optimized cascade computes `SD` from the running sum after the loop, once.
    assert_eq!([of("Q"), of("K"), of("V"), of("AV"), of("SD")], [Bf16, Bf16, F16, Bf16, F16]);
    assert!(program
        .buffers
        .iter()
        .zip(&storage)
        .all(|(b, s)| { *s == F32 || !matches!(b.role, einfuse::compiler::schedule::BufferRole::Temp) }));
    let emulated = Compiled::new(&optimized, true);
    // Head dimensions whose tiles fit in shared memory or not (200 rows of 64 keys do not).
    for (e, f) in [(8, 8), (200, 8), (8, 200)] {
        let sizes: BTreeMap<&str, u64> = [("E", e), ("F", f), ("M", 130), ("P", 70)].into();
        let error = compare(&optimized, &emulated, &sizes, e + f);
        assert!(error <= 1e-2, "E={e} F={f}: relative error {error:.3e}");
    }
    // Rounding: ties, overflow to infinity, subnormals, signed zeros and NaN. `Y` is read back
    // (by `W`, which must see it unrounded), so the kernel stores it as f32 and the caller
    // rounds it.
    let copy = "kernel copy {
      rank I
      input X[I]
      Y[i] = X[i]
      Z[i] = X[i]
      U[i] = X[i]
      W[i] = Y[i] * 3
      output Y: bf16, Z: f16, U: bf16, W
    }";
    let cascade = einfuse::compiler::compile_source(copy).unwrap().remove(0);
    let program = einfuse::compiler::schedule::schedule(&cascade).unwrap();
    let names: Vec<&str> = program.buffers.iter().map(|b| cascade.tensor(b.tensor).name.as_str()).collect();
    assert_eq!(names, ["X", "Y", "Z", "U", "W"]);
    assert_eq!(storage_types(&program), [F32, F32, F16, Bf16, F32]);
    let mut x: Vec<f32> = vec![
        1.0 + 1.0 / 256.0,           // a bf16 tie, rounded down to even
        1.0 + 3.0 / 256.0,           // a bf16 tie, rounded up to even
        1.0 + 1.0 / 2048.0,          // an f16 tie
        f32::from_bits(0x3f80_8001), // just past a bf16 tie
        65520.0,                     // rounds to f16 infinity
        3.4e38,                      // rounds to bf16 infinity
        1e-6,                        // an f16 subnormal
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        f32::from_bits(0x7f7f_ffff), // the largest f32
        f32::from_bits(0x0000_0001), // the smallest f32 subnormal
    ];
    x.extend((0..200).map(|k| ((k as f32) * 0.731).sin() * 10f32.powi(k % 11 - 5)));
    let kernel = Compiled::new(&cascade, true);
    let got = kernel.run(&[x.len() as u64], &[&x]);
    for (output, dtype) in [(0, einfuse::DType::Bf16), (1, einfuse::DType::F16), (2, einfuse::DType::Bf16)] {
        for (value, got) in x.iter().zip(&got[output]) {
            let (want, got) = (dtype.round(*value), dtype.round(*got));
            let same = want.to_bits() == got.to_bits() || (want.is_nan() && got.is_nan());
            assert!(same, "{value:e} ({:#010x}) as {}: {got:e}, expected {want:e}", value.to_bits(), dtype.name());
        }
    }
    for (value, got) in x.iter().zip(&got[3]) {
        assert!((value * 3.0).to_bits() == got.to_bits() || value.is_nan(), "{value:e} * 3: {got:e}");
    }
}

/// The `cpu-llvm` tier's full and empty steps (`schedule::full_steps`) at shifts of a causal filter
/// that leave some tile one point short of full or of empty, against the interpreter.
#[test]
fn cpu_llvm_full_and_empty_steps_at_the_edges_of_tiles() {
    let cascade = einfuse::compiler::compile_source(common::SHIFTED_CAUSAL).unwrap().remove(0);
    let optimized = einfuse::optimize(&cascade).unwrap().cascade;
    let sizes: BTreeMap<&str, u64> = [("M", 140), ("P", 100)].into();
    // With P = 100 rows in one call: a tile is one point short of full at shifts 62 - 64k, and
    // one point short of empty at 64k - 99.
    for shift in [-99, -66, -35, -2, 0, 29, 62] {
        let mut shifted = optimized.clone();
        shifted.params.iter_mut().filter(|p| p.name == "shift").for_each(|p| p.value = shift as f64);
        let compiled = Compiled::new(&shifted, false);
        let error = compare(&shifted, &compiled, &sizes, 5);
        assert!(error <= 1e-4, "shift {shift}: {error:.3e}");
    }
}

/// Key and value tiles staged in shared memory by the emulated GPU kernel, and where a tile does
/// not fit in a block's shared memory, read from global memory instead: both agree with the
/// interpreter.
#[test]
fn staged_tiles_in_shared_memory_or_global_where_they_do_not_fit() {
    use einfuse::compiler::llvm::{launch, staging};
    let plain = "Q[E, P], K[E, M], V[F, M]";
    let cascade =
        einfuse::compiler::compile_source(&common::attention("wide", "E, F, M, P", plain, "AV")).unwrap().remove(0);
    let optimized = einfuse::optimize(&cascade).unwrap().cascade;
    let program = einfuse::compiler::schedule::schedule(&optimized).unwrap();
    let staged = staging::staged_reads(&program);
    let names: Vec<&str> = staged.iter().map(|r| optimized.tensor(r.tensor).name.as_str()).collect();
    assert_eq!(names, ["K", "V"]);
    let emulated = Compiled::new(&optimized, true);
    // A tile of 64 keys: 200 rows of it take 51 200 bytes, more than a block's 48 KB.
    for (e, f, shared) in
        [(8, 8, [true, true]), (200, 8, [false, true]), (8, 200, [true, false]), (200, 200, [false; 2])]
    {
        let sizes: BTreeMap<&str, u64> = [("E", e), ("F", f), ("M", 130), ("P", 70)].into();
        let bindings: Vec<(String, u64)> = sizes.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        let extents = bind_extents(&optimized, &bindings, &[]).unwrap();
        let layout = launch::ThreadLayout::new(&program, &extents, u64::MAX).unwrap();
        // The staged reads' entries close the batch table, before the threads per point.
        let table_start = layout.batch.len() - 1 - staged.iter().map(|r| 1 + r.subscripts.len()).sum::<usize>();
        let mut at = table_start;
        for (read, expected) in staged.iter().zip(shared) {
            assert_eq!(layout.batch[at] >= 0, expected, "E={e} F={f}: {:?}", layout.batch[at..].to_vec());
            at += 1 + read.subscripts.len();
        }
        assert!(layout.shared_bytes <= launch::SHARED_BYTES);
        let error = compare(&optimized, &emulated, &sizes, e + f);
        assert!(error <= 1e-4, "E={e} F={f}: relative error {error:.3e}");
    }
    // Tiles of 30 keys: the rows of each tile are padded to 32 floats in shared memory, and the
    // value tile starts 16-byte aligned after the key tile (5 rows of 32 floats for E = 5), in
    // the steps with register buffers (which read the tiles with 16-byte reads) and the others.
    let fixed = common::attention("wide", "E = 5, F = 7, M, P", plain, "AV");
    let cascade = einfuse::compiler::compile_source(&fixed).unwrap().remove(0);
    let optimized = einfuse::optimize_tiled(&cascade, 30).unwrap().cascade;
    let program = einfuse::compiler::schedule::schedule(&optimized).unwrap();
    assert_eq!(staging::staged_reads(&program).len(), 2);
    let registers = einfuse::compiler::llvm::registers::register_buffers(&program);
    let step_local = program.buffers.iter().zip(&registers).filter(|(b, r)| **r && b.slots.contains(&Slot::Current));
    assert!(step_local.count() >= 2, "{registers:?}");
    let emulated = Compiled::new(&optimized, true);
    for (m, p) in [(120u64, 70u64), (131, 9), (3, 130)] {
        let sizes: BTreeMap<&str, u64> = [("M", m), ("P", p)].into();
        let bindings: Vec<(String, u64)> = sizes.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        let extents = bind_extents(&optimized, &bindings, &[]).unwrap();
        let layout = launch::ThreadLayout::new(&program, &extents, u64::MAX).unwrap();
        let at = layout.batch.len() - 1 - 2 * 3;
        assert_eq!((layout.batch[at], layout.batch[at + 3]), (0, 5 * 32), "{:?}", layout.batch);
        assert_eq!(layout.shared_bytes, (5 * 32 + 7 * 32) * 4);
        let error = compare(&optimized, &emulated, &sizes, m + p);
        assert!(error <= 1e-4, "tiles of 30, M={m} P={p}: relative error {error:.3e}");
    }
}

/// `optimize_for_gpu` tiles the keys by 64 unless the kernel keeps register buffers and its key
/// and value tiles do not both fit in shared memory at 64: a head dimension of 128 then gets
/// tiles of 32, at which both are in shared memory, and the emulation agrees.
#[test]
fn gpu_tiles_small_enough_for_shared_memory() {
    use einfuse::compiler::llvm::launch::{staged_tiles_fit, ThreadLayout};
    let plain = "Q[E, P], K[E, M], V[F, M]";
    let tile_of = |cascade: &Cascade| {
        let pairs = cascade.split_pairs();
        let Extent::Fixed(n) = cascade.rank(pairs[0].1).extent else { panic!("a fixed tile") };
        n
    };
    let kernel = |text: &str| einfuse::compiler::compile_source(text).unwrap().remove(0);
    let wide = kernel(&common::attention("wide", "E = 128, F = 128, M, P", plain, "AV"));
    let program = |c: &Cascade| einfuse::compiler::schedule::schedule(c).unwrap();
    assert_eq!(staged_tiles_fit(&program(&einfuse::optimize(&wide).unwrap().cascade)), Some(false));
    let optimized = einfuse::optimize_for_gpu(&wide).unwrap().cascade;
    assert_eq!(tile_of(&optimized), 32);
    let loops = program(&optimized);
    assert_eq!(staged_tiles_fit(&loops), Some(true));
    // Head dimension 64 fits at 64; a symbolic head dimension cannot be known; decode keeps no
    // register buffers (a warp per row), so its tile stays 64 too.
    let narrow = kernel(&common::attention("narrow", "E = 64, F = 64, M, P", plain, "AV"));
    let symbolic = kernel(&common::attention("symbolic", "E, F, M, P", plain, "AV"));
    let decode = kernel(&common::attention("decode", "E = 128, F = 128, M, P = 1", plain, "AV"));
    for cascade in [&narrow, &symbolic, &decode] {
        assert_eq!(tile_of(&einfuse::optimize_for_gpu(cascade).unwrap().cascade), 64, "{}", cascade.name);
    }
    let emulated = Compiled::new(&optimized, true);
    for (m, p) in [(100u64, 40u64), (64, 5)] {
        let sizes: BTreeMap<&str, u64> = [("M", m), ("P", p)].into();
        let bindings: Vec<(String, u64)> = sizes.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        let extents = bind_extents(&optimized, &bindings, &[]).unwrap();
        let layout = ThreadLayout::new(&loops, &extents, u64::MAX).unwrap();
        assert_eq!(layout.shared_bytes, 2 * 128 * 32 * 4);
        let error = compare(&optimized, &emulated, &sizes, m + p);
        assert!(error <= 1e-4, "M={m} P={p}: relative error {error:.3e}");
    }
}

/// Where the lane rank is short (decode's one query row), a warp computes each point, its lanes
/// splitting the reductions: one block of one warp per point on a GPU, four-lane warps in the
/// emulation, which agrees with the interpreter at every length of the reduced ranks around
/// the warp's width.
#[test]
fn a_warp_per_point_where_the_lane_rank_is_short() {
    use einfuse::compiler::llvm::launch;
    let decode = corpus().into_iter().find(|k| k.name == "gqa_decode").unwrap();
    let optimized = einfuse::optimize(&decode).unwrap().cascade;
    let program = einfuse::compiler::schedule::schedule(&optimized).unwrap();
    let sizes: BTreeMap<&str, u64> = [("M", 100), ("H", 2)].into();
    let bindings: Vec<(String, u64)> = sizes.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    let extents = bind_extents(&optimized, &bindings, &[]).unwrap();
    let gpu = launch::ThreadLayout::new(&program, &extents, u64::MAX).unwrap();
    assert_eq!((gpu.lanes_per_point, gpu.block, gpu.grid), (launch::WARP, launch::WARP, gpu.threads));
    assert_eq!(gpu.scratch_copies(), gpu.threads * launch::WARP);
    let emulated = launch::ThreadLayout::with_warp(&program, &extents, u64::MAX, launch::EMULATED_WARP).unwrap();
    assert_eq!(emulated.lanes_per_point, launch::EMULATED_WARP);
    let kernel = Compiled::new(&optimized, true);
    for m in [1u64, 2, 3, 4, 5, 63, 64, 65, 130] {
        let sizes: BTreeMap<&str, u64> = [("M", m), ("H", 2)].into();
        let error = compare(&optimized, &kernel, &sizes, m);
        assert!(error <= 1e-4, "M={m}: relative error {error:.3e}");
    }
    // A long query rank keeps one thread per point.
    let causal = corpus().into_iter().find(|k| k.name == "causal").unwrap();
    let program = einfuse::compiler::schedule::schedule(&einfuse::optimize(&causal).unwrap().cascade).unwrap();
    let extents = bind_extents(&program.cascade, &[("M".into(), 50), ("P".into(), 50)], &[]).unwrap();
    let layout = launch::ThreadLayout::new(&program, &extents, u64::MAX).unwrap();
    assert_eq!((layout.lanes_per_point, layout.block), (1, 64));
}

/// Register buffers (`llvm::registers`): the score tile and the probabilities of a step stay in
/// each thread's registers in full steps, and in global scratch in a ragged last step, a diagonal
/// step of a causal mask, and where a short query rank runs a warp per row (the lanes then
/// compute the unrolled reductions whole); the running maximum and sum stay in registers
/// throughout. Decode, always a warp per row, keeps none.
#[test]
fn register_buffers_in_full_steps_and_scratch_in_the_others() {
    use einfuse::compiler::llvm::registers::register_buffers;
    let named = |name: &str| {
        let cascade = common::kernels_in("benches").into_iter().find(|k| k.name == name).unwrap();
        let optimized = einfuse::optimize(&cascade).unwrap().cascade;
        let program = einfuse::compiler::schedule::schedule(&optimized).unwrap();
        let chosen = register_buffers(&program);
        let names: Vec<String> = program
            .buffers
            .iter()
            .zip(&chosen)
            .filter(|(_, r)| **r)
            .map(|(b, _)| program.cascade.tensor(b.tensor).name.clone())
            .collect();
        (optimized, names)
    };
    let (prefill, registers) = named("prefill");
    assert_eq!(registers, ["BQK", "LM", "RM", "PRM", "SLN", "SLD", "RD"]);
    let (causal, registers) = named("prefill_causal");
    assert_eq!(registers, ["BS", "LM", "RM", "PRM", "SLN", "SLD", "RD"]);
    assert!(named("decode").1.is_empty());
    // Whole tiles only, a ragged last tile, one key; query rows for a warp each, and for blocks.
    for kernel in [&prefill, &causal] {
        let compiled = Compiled::new(kernel, true);
        for (m, p) in [(128u64, 70u64), (130, 70), (1, 9), (64, 3), (100, 1), (65, 130)] {
            let sizes: BTreeMap<&str, u64> = [("M", m), ("P", p)].into();
            let error = compare(kernel, &compiled, &sizes, m * 1000 + p);
            assert!(error <= 1e-4, "{} M={m} P={p}: relative error {error:.3e}", kernel.name);
        }
    }
}
