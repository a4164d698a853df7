//! The host kernels at the edges of f32, on both CPU tiers: positions converted to floats in
//! lanes past 32 bits, and subnormal results flushed to zero without touching the caller's
//! floating-point state.

use einfuse::compiler::ir::Cascade;

fn kernel(source: &str) -> Cascade {
    einfuse::compiler::compile_source(source).unwrap().remove(0)
}

/// `Y[i] = i` at positions around 2^31 and 2^40 (a shard's offset, `CallOptions::offsets`):
/// every lane holds its position rounded once to f32, as the scalar path and the interpreter
/// give it, whether the vector of positions fits in 32 bits, straddles 2^31 or lies past it, and
/// whether the whole call's positions end exactly at 2^31 (`lane_checks`) or one past it.
#[test]
fn positions_convert_exactly_in_lanes_past_32_bits() {
    let cascade = kernel("kernel positions { rank I\n input X[I]\n Y[i] = X[i] + i\n output Y }");
    let n = 41u64;
    let zeros = vec![0.0f32; n as usize];
    let builds =
        [("cpu", einfuse::compile_cpu(&cascade).unwrap()), ("cpu-llvm", einfuse::compile_cpu_llvm(&cascade).unwrap())];
    for origin in [
        0i64,
        (1 << 31) - 41,
        (1 << 31) - 40,
        (1 << 31) - 19,
        (1 << 31) - 3,
        1 << 31,
        -(1 << 31) - 7,
        -(1 << 31),
        (1 << 40) + 5,
        (1 << 48) - 64,
    ] {
        for (tier, built) in &builds {
            let got = built.run_threads_at(&[n], &[&zeros], 1, &[origin]).unwrap().remove(0);
            for (k, y) in got.iter().enumerate() {
                let want = (origin + k as i64) as f32;
                assert_eq!(*y, want, "{tier}: position {} of a call at {origin}", origin + k as i64);
            }
        }
    }
}

/// A product of two small normal floats that would be subnormal is 0 in a kernel (no microcode
/// assist), on both tiers; a subnormal input is read as it is (`log(1e-40)` is -92.1, not
/// `log(0)`); and the caller's own arithmetic keeps its subnormals after the call.
#[test]
#[cfg(target_arch = "x86_64")]
fn kernels_flush_subnormal_results_and_leave_the_caller_as_it_was() {
    let cascade =
        kernel("kernel tiny { rank I\n input X[I], Z[I]\n Y[i] = X[i] * 1e-20\n L[i] = log(Z[i])\n output Y, L }");
    let n = 37;
    let xs = vec![1e-20f32; n];
    let zs = vec![1e-40f32; n];
    for built in [einfuse::compile_cpu(&cascade).unwrap(), einfuse::compile_cpu_llvm(&cascade).unwrap()] {
        let got = built.run(&[n as u64], &[&xs, &zs]).unwrap();
        assert!(got[0].iter().all(|y| *y == 0.0), "{:?}", got[0]);
        let want = (1e-40f64).ln();
        assert!(got[1].iter().all(|l| ((*l as f64 - want) / want).abs() < 1e-6), "{:?}", got[1]);
        let product = std::hint::black_box(1e-20f32) * std::hint::black_box(1e-20f32);
        assert!(product > 0.0 && product < f32::MIN_POSITIVE, "the caller's arithmetic was left flushing");
    }
}
