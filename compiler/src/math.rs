//! The element-wise functions of the CPU kernels in f32: one table of polynomial constants and
//! one scalar version of each algorithm, which the lanes of both CPU tiers (`cpu::vector`,
//! `llvm::lower`) compute instruction for instruction, so that a point gives the same bits in a
//! lane, in a ragged tail and in the scalar helpers (`helpers`).
//!
//! - `exp`: Cephes' `expf`: `x = n ln 2 + r`, a degree-6 polynomial in `r`, `2^n` applied in two
//!   halves (no overflow on the way to a large result); 0 where the result would be subnormal
//!   (below `EXP_LO`, as the GPU's `ex2.approx.ftz`), above 89 infinity. A subnormal float costs
//!   the CPU a microcode assist in every instruction that makes or reads one, and attention makes
//!   many (keys far below a row's maximum); the difference from the exact result is below 1.2e-38.
//!   Where the argument cannot be positive (`sigmoid`, `softplus`), the same bits in fewer steps:
//!   no upper clamp and `2^n` applied at once (`Range::NonPositive`).
//! - `log`: Cephes' `logf`: `x = m 2^e` with `m` in `[sqrt(1/2), sqrt(2))`, a degree-8
//!   polynomial in `m - 1`; subnormals scaled by 2^23 first.
//! - `tanh`: below 0.625 in magnitude, the odd polynomial `x + x^3 P(x^2)`, `P` of degree 4 (no
//!   division: soft-capped attention scores, `cap * tanh(s / cap)`, almost all lie there); above,
//!   a rational function, `x N(x^2) / D(x^2)` of degrees 11 and 8, with `x` clamped to +-9.1 and
//!   the result to [-1, 1]: one division and no `exp`. Lanes take the polynomial alone where every
//!   lane is below 0.625, and choose lane by lane otherwise.
//! - `sigmoid`: from `e = exp(-|x|) <= 1`: `1 / (1 + e)`, or `e / (1 + e)` below 0; nothing
//!   overflows.
//! - `softplus`: `max(x, 0) + log1p(exp(-|x|))`, with `log1p(y) = y P(y)` for `y` in `(0, 1]`, `P`
//!   of degree 10 (no `log`, no division).
//!
//! Measured relative errors against f64 (tests/llvm.rs): `exp` 2.5e-7 where the result is
//! normal, `log` 7.7e-8 (absolute near 1), `tanh` 3.2e-7 (every float of [-12, 12]; its rounding
//! errors, not the fit's; 7.6e-8 for every float of (1e-30, 0.625), the polynomial's), `sigmoid`
//! 1.7e-7, `softplus` 2.0e-7 (every float of [-87, 60]).

// The constants as Cephes publishes them; some have more digits than an f32 holds.
#![allow(clippy::excessive_precision)]

/// `exp`: the argument's clamps. `EXP_LO` is the smallest float whose exponential is a normal
/// float; below it `exp` is 0.
pub const EXP_LO: f32 = -87.33654;
pub const EXP_HI: f32 = 89.0;
/// `ln 2` in two parts: `n ln 2 = n C1 - n C2` (C1 exact in few bits).
pub const EXP_LN2_HI: f32 = -0.693_359_4;
pub const EXP_LN2_LO: f32 = 2.121_944_4e-4;
/// The polynomial of `exp(r) - 1 - r` over `r^2`, highest degree first.
pub const EXP_POLY: [f32; 6] = [1.987_569_1e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5];

/// The polynomial of `log(1 + z)` past `z - z^2 / 2`, over `z^3`, highest degree first.
pub const LOG_POLY: [f32; 9] = [
    7.037_683_6e-2,
    -1.151_461e-1,
    1.167_699_9e-1,
    -1.242_014_1e-1,
    1.424_932_3e-1,
    -1.666_805_8e-1,
    2.000_071_5e-1,
    -2.499_999_4e-1,
    3.333_333_1e-1,
];
/// `ln 2` in two parts for `log`: `e ln 2 = e HI + e LO`.
pub const LOG_LN2_HI: f32 = 0.693_359_4;
pub const LOG_LN2_LO: f32 = -2.121_944_4e-4;

/// The polynomial of `log1p(y) / y` on `[0, 1]`, highest degree first: a minimax fit for relative
/// error (7.4e-10 before rounding to f32), with `P(0) = 1` exactly so that `y P(y) = y` where `y`
/// is tiny.
pub const LOG1P_POLY: [f32; 11] = [
    2.030_240_6e-3,
    -1.340_752_8e-2,
    4.147_822_8e-2,
    -8.244_176e-2,
    1.241_843_7e-1,
    -1.610_569_2e-1,
    1.989_074_8e-1,
    -2.498_727_1e-1,
    3.333_256e-1,
    -4.999_998_2e-1,
    1.0,
];

/// `tanh(x) = x N(x^2) / D(x^2)` for `|x| <= TANH_CLAMP` (past which `tanh` rounds to 1): a
/// rational fit for relative error on `[0, TANH_CLAMP]` (1.4e-9 before rounding to f32), highest
/// degree first, `N(0) = D(0) = 1`.
pub const TANH_CLAMP: f32 = 9.1;
/// Below this magnitude `tanh(x) = x + x^3 P(x^2)`: a fit for relative error on `[0, TANH_SMALL]`
/// (4.4e-9 before rounding to f32), highest degree first.
pub const TANH_SMALL: f32 = 0.625;
pub const TANH_POLY: [f32; 5] = [-5.704_994_3e-3, 2.063_909_5e-2, -5.373_971_9e-2, 1.333_144_2e-1, -3.333_328_1e-1];
pub const TANH_NUM: [f32; 6] = [-1.203_380_1e-11, 3.035_579_3e-8, 2.791_206_1e-5, 3.863_599_6e-3, 1.367_614_3e-1, 1.0];
pub const TANH_DEN: [f32; 5] = [1.280_702_9e-6, 3.930_294_5e-4, 2.722_853_6e-2, 4.700_947_4e-1, 1.0];

/// Horner's rule with fused multiply-adds, as the lanes compute it.
fn horner(coefficients: &[f32], x: f32) -> f32 {
    coefficients[1..].iter().fold(coefficients[0], |p, c| p.mul_add(x, *c))
}

pub fn exp(x: f32) -> f32 {
    exp_in(x, Range::Any)
}

/// `exp` of an argument known not to be positive (`exp(-|x|)` in `sigmoid` and `softplus`), with
/// the same bits as `exp` there: no upper clamp, and `2^n` (`n >= -126`) applied at once.
pub fn exp_nonpositive(x: f32) -> f32 {
    exp_in(x, Range::NonPositive)
}

/// Which arguments an exponential takes: any float, or those at most 0 (or NaN).
#[derive(Clone, Copy, PartialEq)]
pub enum Range {
    Any,
    NonPositive,
}

fn exp_in(x: f32, range: Range) -> f32 {
    if x.is_nan() {
        return x;
    }
    let below = x < EXP_LO;
    let x2 = if below { EXP_LO } else { x };
    let x2 = if range == Range::Any && x2 > EXP_HI { EXP_HI } else { x2 };
    let n = x2.mul_add(std::f32::consts::LOG2_E, 0.5).floor();
    let r = n.mul_add(EXP_LN2_HI, x2);
    let r = n.mul_add(EXP_LN2_LO, r);
    let p = horner(&EXP_POLY, r);
    let y = p.mul_add(r * r, r) + 1.0;
    let n = n as i32;
    let power = |k: i32| f32::from_bits(((k + 127) as u32) << 23);
    let y = match range {
        // Up to 2^128, past the largest power of two a float holds: two factors.
        Range::Any => y * power(n >> 1) * power(n - (n >> 1)),
        Range::NonPositive => y * power(n),
    };
    if below {
        0.0
    } else {
        y
    }
}

pub fn log(x: f32) -> f32 {
    let tiny = x < f32::MIN_POSITIVE;
    let xs = if tiny { x * 8_388_608.0 } else { x };
    let bias = if tiny { -149 } else { -126 };
    let bits = xs.to_bits();
    let e = ((bits >> 23) & 255) as i32 + bias;
    let m = f32::from_bits((bits & 0x007f_ffff) | 0x3f00_0000);
    let low = m < std::f32::consts::FRAC_1_SQRT_2;
    let m = if low { m + m } else { m };
    let e = if low { e as f32 - 1.0 } else { e as f32 };
    let z = m - 1.0;
    let z2 = z * z;
    let p = horner(&LOG_POLY, z);
    let y = (z * z2) * p;
    let y = e.mul_add(LOG_LN2_LO, y);
    let y = z2.mul_add(-0.5, y);
    let r = e.mul_add(LOG_LN2_HI, z + y);
    if x.is_nan() || x == f32::INFINITY {
        x
    } else if x < 0.0 {
        f32::NAN
    } else if x == 0.0 {
        f32::NEG_INFINITY
    } else {
        r
    }
}

pub fn tanh(x: f32) -> f32 {
    if x.abs() < TANH_SMALL {
        tanh_small(x)
    } else {
        tanh_rational(x)
    }
}

/// `tanh` below `TANH_SMALL` in magnitude; `tanh(-0) = -0` (the sum would give `+0`).
pub fn tanh_small(x: f32) -> f32 {
    let z = x * x;
    let r = (x * z).mul_add(horner(&TANH_POLY, z), x);
    if x == 0.0 {
        x
    } else {
        r
    }
}

/// `tanh` at and above `TANH_SMALL` in magnitude (and of NaN).
pub fn tanh_rational(x: f32) -> f32 {
    let x1 = if x > TANH_CLAMP { TANH_CLAMP } else { x };
    let x2 = if x1 < -TANH_CLAMP { -TANH_CLAMP } else { x1 };
    let z = x2 * x2;
    let r = x2 * horner(&TANH_NUM, z) / horner(&TANH_DEN, z);
    let r = if r > 1.0 { 1.0 } else { r };
    if r < -1.0 {
        -1.0
    } else {
        r
    }
}

pub fn sigmoid(x: f32) -> f32 {
    let e = exp_nonpositive(-x.abs());
    let q = 1.0 / (e + 1.0);
    if x < 0.0 {
        e * q
    } else {
        q
    }
}

pub fn softplus(x: f32) -> f32 {
    if x.is_nan() {
        return x;
    }
    let y = exp_nonpositive(-x.abs());
    let log1p = y * horner(&LOG1P_POLY, y);
    let part = if x > 0.0 { x } else { 0.0 };
    part + log1p
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `exp_nonpositive` is `exp` where it applies, bit for bit: every 61st float from -0 down to
    /// past `EXP_LO`, the ends and NaN.
    #[test]
    fn the_nonpositive_exponential_is_the_exponential() {
        let mut bits = (-0.0f32).to_bits();
        let last = (EXP_LO * 1.5).to_bits();
        let mut checked = 0;
        while bits <= last {
            let x = f32::from_bits(bits);
            assert_eq!(exp_nonpositive(x).to_bits(), exp(x).to_bits(), "at {x:e}");
            bits += 61;
            checked += 1;
        }
        assert!(checked > 10_000_000, "{checked}");
        for x in [0.0, -0.0, EXP_LO, -f32::MIN_POSITIVE, f32::NEG_INFINITY, -f32::MAX] {
            assert_eq!(exp_nonpositive(x).to_bits(), exp(x).to_bits(), "at {x:e}");
        }
        assert!(exp_nonpositive(f32::NAN).is_nan());
    }
}
