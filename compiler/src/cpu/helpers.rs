//! Scalar functions that compiled kernels call, with the interpreter's semantics in f32.

pub extern "C" fn einfuse_expf(x: f32) -> f32 {
    x.exp()
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

/// The helpers by name, for the JIT's symbol table.
pub fn symbols() -> [(&'static str, *const u8); 5] {
    [
        ("einfuse_expf", einfuse_expf as *const u8),
        ("einfuse_logf", einfuse_logf as *const u8),
        ("einfuse_tanhf", einfuse_tanhf as *const u8),
        ("einfuse_sigmoidf", einfuse_sigmoidf as *const u8),
        ("einfuse_softplusf", einfuse_softplusf as *const u8),
    ]
}
