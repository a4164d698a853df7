//! Scalar functions that compiled kernels call, with the interpreter's semantics in f32.

/// `exp` as the kernels compute it in lanes (Cephes' `expf`, see `cpu::vector` and
/// `llvm::lower`), so that a point gives the same bits whether it runs in a lane or alone.
pub extern "C" fn einfuse_expf(x: f32) -> f32 {
    exp(x)
}

/// Cephes' `expf`: `x = n ln 2 + r`, a degree-6 polynomial in `r`, `2^n` applied in two halves
/// (subnormal results come out right); below -104 it is 0, above 89 infinity, NaN stays NaN.
/// Relative error at most 2.5e-7 where the result is normal (tested).
pub fn exp(x: f32) -> f32 {
    if x.is_nan() {
        return x;
    }
    let below = x < -104.0;
    let x2 = x.clamp(-104.0, 89.0);
    let n = x2.mul_add(std::f32::consts::LOG2_E, 0.5).floor();
    let r = n.mul_add(-0.693_359_4, x2);
    let r = n.mul_add(2.121_944_4e-4, r);
    let mut p = 1.987_569_1e-4f32;
    for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5] {
        p = p.mul_add(r, c);
    }
    let mut y = p.mul_add(r * r, r) + 1.0;
    let n = n as i32;
    let first = n >> 1;
    for k in [first, n - first] {
        y *= f32::from_bits(((k + 127) as u32) << 23);
    }
    if below {
        0.0
    } else {
        y
    }
}

pub extern "C" fn einfuse_logf(x: f32) -> f32 {
    x.ln()
}

pub extern "C" fn einfuse_tanhf(x: f32) -> f32 {
    x.tanh()
}

pub extern "C" fn einfuse_sigmoidf(x: f32) -> f32 {
    crate::ir::UnaryOp::Sigmoid.apply(x as f64) as f32
}

pub extern "C" fn einfuse_softplusf(x: f32) -> f32 {
    crate::ir::UnaryOp::Softplus.apply(x as f64) as f32
}

/// An f16 (its bits) widened to f32, for the host emulation of GPU kernels that store f16
/// (LLVM 14 lowers `fpext half` on x86 to a library call that a JIT cannot count on).
pub extern "C" fn einfuse_f16_to_f32(bits: u16) -> f32 {
    half::f16::from_bits(bits).to_f32()
}

/// An f32 rounded to the nearest f16 (ties to even), as its bits; see `einfuse_f16_to_f32`.
pub extern "C" fn einfuse_f32_to_f16(x: f32) -> u16 {
    half::f16::from_f32(x).to_bits()
}

/// The helpers by name, for the JIT's symbol table.
pub fn symbols() -> [(&'static str, *const u8); 7] {
    [
        ("einfuse_expf", einfuse_expf as *const u8),
        ("einfuse_logf", einfuse_logf as *const u8),
        ("einfuse_tanhf", einfuse_tanhf as *const u8),
        ("einfuse_sigmoidf", einfuse_sigmoidf as *const u8),
        ("einfuse_softplusf", einfuse_softplusf as *const u8),
        ("einfuse_f16_to_f32", einfuse_f16_to_f32 as *const u8),
        ("einfuse_f32_to_f16", einfuse_f32_to_f16 as *const u8),
    ]
}
