//! The float operations of the Flex kernels, with f32 `ln`/`exp` as short polynomials
//! (≈1e-7 relative error, branch-free so loops over them vectorise); f64 uses the standard
//! library's.

/// The float operations the kernels need.
pub(super) trait Real:
    'static
    + Copy
    + Send
    + Sync
    + PartialOrd
    + Default
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::AddAssign
{
    fn from_f64(value: f64) -> Self;
    fn to_f64(self) -> f64;
    fn sqrt(self) -> Self;
    /// ln x for normal x > 0, +∞ and NaN (which it returns as they are).
    fn ln(self) -> Self;
    /// eˣ, saturating outside the finite range; NaN for NaN.
    fn exp(self) -> Self;
    /// The larger of the two, `other` when they are unordered: a maximum that a NaN may skip,
    /// for the loops whose NaN surfaces elsewhere.
    fn max(self, other: Self) -> Self;
    /// max(self, floor) that keeps a NaN `self` (`f32::max` and [`max`](Self::max) would turn
    /// it into `floor`): the clamp of the generalized mean, which must not hide a NaN input.
    fn at_least(self, floor: Self) -> Self {
        if self < floor { floor } else { self }
    }
    /// The smallest positive normal value (the floor of the clamp, so `ln` stays exact).
    const MIN_POSITIVE: Self;
}

impl Real for f64 {
    fn from_f64(value: f64) -> Self {
        value
    }
    fn to_f64(self) -> f64 {
        self
    }
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
    fn ln(self) -> Self {
        f64::ln(self)
    }
    fn exp(self) -> Self {
        f64::exp(self)
    }
    fn max(self, other: Self) -> Self {
        if self > other { self } else { other }
    }
    const MIN_POSITIVE: Self = f64::MIN_POSITIVE;
}

impl Real for f32 {
    fn from_f64(value: f64) -> Self {
        value as f32
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }

    /// x = m·2ᵉ with m in [√½, √2); ln m = 2 atanh(t), t = (m−1)/(m+1), |t| ≤ 0.172.
    #[inline(always)]
    fn ln(self) -> Self {
        let bits = self.to_bits();
        let exponent = ((bits >> 23) & 0xff) as i32 - 127;
        let mantissa = f32::from_bits((bits & 0x007f_ffff) | 0x3f80_0000);
        let high = mantissa > std::f32::consts::SQRT_2;
        let m = if high { mantissa * 0.5 } else { mantissa };
        let e = (exponent + high as i32) as f32;
        let t = (m - 1.0) / (m + 1.0);
        let t2 = t * t;
        let series =
            2.0 + t2 * (2.0 / 3.0 + t2 * (2.0 / 5.0 + t2 * (2.0 / 7.0 + t2 * (2.0 / 9.0))));
        let ln = e * std::f32::consts::LN_2 + t * series;
        // The bits of +∞ and NaN read as 2¹²⁸·m: give them back as they are (a select, so the
        // loops still vectorise).
        if self < f32::INFINITY { ln } else { self }
    }

    /// eʸ = 2ᵏ·eʳ with k = round(y / ln 2), |r| ≤ ln2/2, eʳ by its degree-7 Taylor polynomial.
    #[inline(always)]
    fn exp(self) -> Self {
        const ROUND: f32 = 12_582_912.0; // 1.5·2²³: adding it rounds to an integer
        const LN_2_HIGH: f32 = 0.693_145_75;
        const LN_2_LOW: f32 = 1.428_606_8e-6;
        // Selects, not `clamp` (whose NaN assertion keeps the loop from vectorising) nor
        // `f32::max`/`min` (which turn a NaN into the bound): a NaN goes through and the
        // result is NaN.
        let y = if self > 88.0 { 88.0 } else { self };
        let y = if y < -87.0 { -87.0 } else { y };
        let rounded = y * std::f32::consts::LOG2_E + ROUND;
        let k = rounded - ROUND;
        // The integer k sits in the low mantissa bits of `rounded`: no float-to-int cast.
        let k_bits = rounded.to_bits().wrapping_sub(ROUND.to_bits());
        let r = (y - k * LN_2_HIGH) - k * LN_2_LOW;
        let poly = 1.0
            + r * (1.0
                + r * (0.5
                    + r * (1.0 / 6.0
                        + r * (1.0 / 24.0
                            + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
        poly * f32::from_bits(k_bits.wrapping_add(127) << 23)
    }

    fn max(self, other: Self) -> Self {
        if self > other { self } else { other }
    }
    const MIN_POSITIVE: Self = f32::MIN_POSITIVE;
}

/// Lanes of the independent accumulators that let the sums vectorise.
pub(super) const LANES: usize = 8;

/// Σ f(i) over `0..len`, in `LANES` interleaved partial sums.
#[inline(always)]
pub(super) fn lane_sum<T: Real>(len: usize, mut f: impl FnMut(usize) -> T) -> T {
    let mut acc = [T::default(); LANES];
    let full = len / LANES * LANES;
    for base in (0..full).step_by(LANES) {
        for (lane, slot) in acc.iter_mut().enumerate() {
            *slot += f(base + lane);
        }
    }
    let mut total = T::default();
    for i in full..len {
        total += f(i);
    }
    acc.iter().fold(total, |s, &v| s + v)
}

/// ⟨a, b⟩ in `LANES` independent partial sums, so the loop vectorises.
/// max(start, f(0), …, f(len − 1)) in `LANES` interleaved partial maxima, so the loop
/// vectorises (a NaN may be skipped, as in [`Real::max`]).
#[inline(always)]
pub(super) fn lane_max<T: Real>(len: usize, start: T, mut f: impl FnMut(usize) -> T) -> T {
    let mut acc = [start; LANES];
    let full = len / LANES * LANES;
    for base in (0..full).step_by(LANES) {
        for (lane, slot) in acc.iter_mut().enumerate() {
            *slot = Real::max(*slot, f(base + lane));
        }
    }
    let mut largest = start;
    for i in full..len {
        largest = Real::max(largest, f(i));
    }
    acc.iter().fold(largest, |m, &v| Real::max(m, v))
}

#[inline(always)]
pub(super) fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    let mut acc = [T::default(); LANES];
    let (a_body, a_tail) = a.split_at(a.len() / LANES * LANES);
    let (b_body, b_tail) = b.split_at(a_body.len());
    for (a, b) in a_body.chunks_exact(LANES).zip(b_body.chunks_exact(LANES)) {
        for lane in 0..LANES {
            acc[lane] += a[lane] * b[lane];
        }
    }
    let tail = a_tail
        .iter()
        .zip(b_tail)
        .fold(T::default(), |s, (&a, &b)| s + a * b);
    acc.iter().fold(tail, |s, &v| s + v)
}

#[cfg(test)]
mod tests {
    use super::Real;

    #[test]
    fn fast_ln_and_exp_are_accurate() {
        let mut worst_ln = 0.0f64;
        let mut worst_exp = 0.0f64;
        for i in 0..20_000 {
            let x = 1e-7f64 * (1.0011f64).powi(i);
            let ln = Real::ln(x as f32) as f64;
            let exact = (x as f32 as f64).ln();
            worst_ln = worst_ln.max((ln - exact).abs() / exact.abs().max(1.0));
            let y = -80.0 + 160.0 * i as f64 / 20_000.0;
            let e = Real::exp(y as f32) as f64;
            let exact = (y as f32 as f64).exp();
            worst_exp = worst_exp.max((e - exact).abs() / exact);
        }
        assert!(worst_ln < 2e-7, "ln: {worst_ln:e}");
        assert!(worst_exp < 5e-7, "exp: {worst_exp:e}");
    }

    /// NaN stays NaN through `ln`, `exp` and the clamp, and ln(+∞) = +∞, as in the standard
    /// library (the bit tricks read them as finite numbers otherwise).
    #[test]
    fn non_finite_values_go_through() {
        assert!(Real::ln(f32::NAN).is_nan());
        assert_eq!(Real::ln(f32::INFINITY), f32::INFINITY);
        assert!(Real::exp(f32::NAN).is_nan());
        assert!(f32::NAN.at_least(1e-6).is_nan());
        assert!(f64::NAN.at_least(1e-6).is_nan());
        assert_eq!((-1.0f32).at_least(1e-6), 1e-6);
        // ln of the largest finite value is finite and accurate.
        let ln_max = Real::ln(f32::MAX) as f64;
        assert!((ln_max - (f32::MAX as f64).ln()).abs() < 1e-5, "{ln_max}");
    }
}
