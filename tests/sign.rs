//! Exponentials of a maximum's complement (`schedule::sign`): which arguments are found never
//! positive, however the cascade names and nests them, and that a kernel whose argument can be
//! positive keeps the exponential that clamps it (checked on arguments up to 200, where the
//! shorter one would make no float).

mod common;

use einfuse::compiler::interp::{interpret, InterpLimits};
use einfuse::compiler::ir::{Cascade, Expr, UnaryOp};
use einfuse::compiler::math::Range;
use einfuse::compiler::schedule::sign::exp_range;
use einfuse::{BuildOptions, Target};

/// The range of every exponential of `cascade`, by the name of the tensor it defines.
fn ranges(cascade: &Cascade) -> Vec<(String, Range)> {
    let mut found = Vec::new();
    for einsum in &cascade.einsums {
        einsum.body.walk(&mut |e| {
            if let Expr::Unary(UnaryOp::Exp, arg) = e {
                found.push((cascade.tensor(einsum.target).name.clone(), exp_range(cascade, arg)));
            }
        });
    }
    found
}

const SOURCE: &str = "
kernel renamed {
  rank K, Q
  input S[K, Q]
  Mx[q] = max[k](S[k, q])
  Y[k, q] = exp(S[k, q] - Mx[q])
  output Y
}
kernel nested {
  rank K, Q
  input S[K, Q], C[Q]
  Mx[q] = max[k](S[k, q])
  Both[q] = max(C[q], Mx[q])
  Y[k, q] = exp(S[k, q] - Both[q])
  output Y
}
kernel minimum {
  rank K, Q
  input S[K, Q]
  Mn[q] = min[k](S[k, q])
  Y[k, q] = exp(S[k, q] - Mn[q])
  output Y
}
kernel other_tensor {
  rank K, Q
  input S[K, Q], T[K, Q]
  Mx[q] = max[k](T[k, q])
  Y[k, q] = exp(S[k, q] - Mx[q])
  output Y
}
kernel other_point {
  rank K
  input S[K, K]
  Mx[k] = max[k'](S[k', k])
  Y[k, k'] = exp(S[k, k'] - Mx[k])
  output Y
}
kernel filtered_max {
  rank K, Q
  input S[K, Q]
  Mx[q] = max[k](S[k, q]) where k < 3
  Y[k, q] = exp(S[k, q] - Mx[q])
  output Y
}
kernel other_tile {
  rank M, P, M0 = 4, M1 = M / M0
  input X[M0, P]
  param s = 1000
  LM[m1, p] = max[m0](X[m0, p] * s)
  Y[m0, p] = exp(X[m0, p] * s - LM[0, p])
  output Y
}
kernel other_primes {
  rank M, P, M0 = 4, M1 = M / M0
  input X[M0, P]
  param s = 1000
  LM[m1, p] = max[m0](X[m0, p] * s) where m1 * M0 + m0 < M
  Y[m1, m0', p] = exp(X[m0', p] * s - LM[m1, p])
  output Y
}
kernel initial_value {
  rank M, P
  input C[P]
  R[0, p] = -1000
  R[m + 1, p] = max(R[m, p], C[p])
  Y[m, p] = exp(C[p] - R[m - 1 + 1, p])
  output Y
}
kernel own_tile {
  rank M, P, M0 = 4, M1 = M / M0
  input X[M, P]
  B[m1, m0, p] = X[m1 * M0 + m0, p]
  LM[m1, p] = max[m0](B[m1, m0, p])
  Y[m1, m0, p] = exp(B[m1, m0, p] - LM[m1, p])
  output Y
}
kernel scaled {
  rank K, Q
  input S[K, Q]
  Mx[q] = max[k](S[k, q])
  Y[k, q] = exp(S[k, q] * 2 - Mx[q])
  output Y
}";

#[test]
fn exponentials_below_their_maximum_are_found_however_written() {
    let program = einfuse::Program::from_source("sign.ein", SOURCE).unwrap();
    let expected = [
        ("renamed", Range::NonPositive),
        ("nested", Range::NonPositive),
        ("minimum", Range::Any),
        ("other_tensor", Range::Any),
        ("other_point", Range::Any),
        ("filtered_max", Range::Any),
        ("scaled", Range::Any),
        // A maximum over a ragged tile's valid keys bounds only the keys of that tile.
        ("other_tile", Range::Any),
        ("other_primes", Range::Any),
        // `R[m - 1 + 1]` at `m = 0` is the initial value, not the recurrence.
        ("initial_value", Range::Any),
        ("own_tile", Range::NonPositive),
    ];
    for (name, range) in expected {
        let kernel = program.kernel(Some(name)).unwrap();
        assert!(ranges(kernel) == vec![("Y".to_string(), range)], "{name}: {:?}", ranges(kernel).len());
    }
    // Every softmax attention of the corpus, as written and as the optimizer streams it: the
    // scores' exponential and the running maximum's correction.
    for kernel in common::kernels_in("examples").iter().chain(&common::kernels_in("benches")) {
        let optimized = einfuse::optimize_for_target(kernel, Target::CpuLlvm, None).unwrap().cascade;
        for (tensor, range) in ranges(&optimized) {
            if ["SLN", "PRM"].contains(&tensor.as_str()) {
                assert!(range == Range::NonPositive, "{}: {tensor}", kernel.name);
            }
        }
    }
    let attention = einfuse::Program::from_file(&common::root().join("examples/attention.ein")).unwrap();
    let written = ranges(attention.kernel(Some("attention")).unwrap());
    assert!(written.iter().all(|(_, r)| *r == Range::NonPositive) && !written.is_empty());
}

/// Runs `kernel` on both CPU tiers and the interpreter and checks every output point: an
/// infinity must be one in both, a finite value within a relative `tolerance`.
fn agrees_with_interpreter(kernel: &Cascade, name: &str, extents: &[u64], inputs: &[Vec<f32>], tolerance: f32) {
    let slices: Vec<&[f32]> = inputs.iter().map(Vec::as_slice).collect();
    let data: Vec<Vec<f64>> = inputs.iter().map(|x| x.iter().map(|v| *v as f64).collect()).collect();
    let wide: Vec<&[f64]> = data.iter().map(Vec::as_slice).collect();
    let want = interpret(kernel, extents, &wide, InterpLimits::default()).unwrap();
    for target in [Target::Cpu, Target::CpuLlvm] {
        let built = einfuse::build(kernel, &BuildOptions::new(target)).unwrap();
        let got = built.run(extents, &slices, 2).unwrap();
        for (g, w) in got[0].iter().zip(&want[0]) {
            let w = *w as f32;
            let agree = if w.is_infinite() || g.is_infinite() {
                *g == w
            } else {
                (g - w).abs() <= tolerance * w.abs().max(1e-30)
            };
            assert!(agree, "{name} on {target:?}: {g} against {w}");
        }
    }
}

/// Both CPU tiers compute what the interpreter does with the input `S` spread over [-200, 200]
/// (an infinity must be one in both), in lanes (67 queries) and in the scalar tails.
#[test]
fn positive_arguments_keep_the_clamped_exponential() {
    let program = einfuse::Program::from_source("sign.ein", SOURCE).unwrap();
    let (k, q) = (37u64, 67u64);
    let s: Vec<f32> = (0..k * q).map(|i| ((i * 7919 % 401) as f32) - 200.0).collect();
    let c: Vec<f32> = (0..q).map(|i| i as f32 * 50.0 - 100.0).collect();
    let t: Vec<f32> = s.iter().map(|x| x * 0.5).collect();
    for name in ["renamed", "nested", "minimum", "other_tensor", "other_point", "scaled"] {
        let kernel = program.kernel(Some(name)).unwrap();
        let inputs: Vec<&[f32]> = kernel
            .inputs()
            .iter()
            .map(|id| match kernel.tensor(*id).name.as_str() {
                "S" => s.as_slice(),
                "C" => c.as_slice(),
                _ => t.as_slice(),
            })
            .collect();
        let extents = if name == "other_point" { vec![k] } else { vec![k, q] };
        let inputs = if name == "other_point" {
            let square: Vec<f32> = (0..k * k).map(|i| ((i * 7919 % 401) as f32) - 200.0).collect();
            vec![square]
        } else {
            inputs.iter().map(|x| x.to_vec()).collect()
        };
        agrees_with_interpreter(kernel, name, &extents, &inputs, 1e-5);
    }
}

/// The kernels whose maximum does not bound their argument, on ragged tiles, against the
/// interpreter: arguments up to 2000, so that a wrongly shortened exponential shows (the f32
/// rounding of a product near 2000 allows a relative 5e-4 where the result is finite).
#[test]
fn maxima_of_other_tiles_and_initial_values_bound_nothing() {
    let program = einfuse::Program::from_source("sign.ein", SOURCE).unwrap();
    for (name, m) in [("other_tile", 6u64), ("other_primes", 6), ("initial_value", 2), ("own_tile", 7)] {
        let kernel = program.kernel(Some(name)).unwrap();
        let bindings = [("M".to_string(), m), ("P".to_string(), 67)];
        let extents = einfuse::compiler::shapes::bind_extents(kernel, &bindings, &[]).unwrap();
        let inputs: Vec<Vec<f32>> = kernel
            .inputs()
            .iter()
            .map(|id| {
                let shape = einfuse::compiler::shapes::tensor_shape(kernel, *id, &extents);
                let n: u64 = shape.iter().product();
                let spread = if kernel.tensor(*id).name == "C" { 200.0 } else { 2.0 };
                (0..n).map(|i| ((i * 7919 % 401) as f32 / 200.0 - 1.0) * spread).collect()
            })
            .collect();
        agrees_with_interpreter(kernel, name, &extents, &inputs, 5e-4);
    }
}
