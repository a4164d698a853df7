//! Scalar functions that compiled kernels call, with the interpreter's semantics in f32.

/// `exp` as the kernels compute it in lanes (Cephes' `expf`, see `cpu::vector` and
/// `llvm::lower`), so that a point gives the same bits whether it runs in a lane or alone.
pub extern "C" fn einfuse_expf(x: f32) -> f32 {
    exp(x)
}

/// `exp` (see `crate::math`).
pub fn exp(x: f32) -> f32 {
    crate::math::exp(x)
}

/// The scalar helpers compute what the lanes compute (`crate::math`), so a point gives the same
/// bits in a lane and alone.
pub extern "C" fn einfuse_logf(x: f32) -> f32 {
    crate::math::log(x)
}

pub extern "C" fn einfuse_tanhf(x: f32) -> f32 {
    crate::math::tanh(x)
}

pub extern "C" fn einfuse_sigmoidf(x: f32) -> f32 {
    crate::math::sigmoid(x)
}

pub extern "C" fn einfuse_softplusf(x: f32) -> f32 {
    crate::math::softplus(x)
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
