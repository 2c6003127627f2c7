//! Fused CPU kernels of [`PoolingOps`] for Flex: the masked mean, and the generalized mean and
//! its analytical backward in two passes over the input each, threads over the batch, branch-free inner loops
//! that the compiler vectorises, and f32 `ln`/`exp` as short polynomials (≈1e-7 relative error;
//! f64 uses the standard library's).
//!
//! The transport ops use the portable bodies.

use burn::backend::Flex;
use burn::backend::TensorMetadata;
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::tensor::{DType, Element, TensorData};
use rayon::prelude::*;

use crate::ops::{PoolingOps, portable};
use crate::transport::TransportSettings;

/// Runs `$body` with the type `$t` bound to the element type of `$dtype` (f32 or f64).
macro_rules! with_float {
    ($dtype:expr, $op:literal, $t:ident => $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $t = f32;
                $body
            }
            DType::F64 => {
                type $t = f64;
                $body
            }
            dtype => panic!("{}: unsupported float dtype {dtype:?}", $op),
        }
    };
}

impl PoolingOps for Flex {
    fn partial_transport(
        costs: FloatTensor<Self>,
        mass: FloatTensor<Self>,
        settings: TransportSettings,
    ) -> (FloatTensor<Self>, IntTensor<Self>) {
        portable::partial_transport::<Self>(costs, mass, settings)
    }

    fn partial_transport_backward(
        plan: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        mass: FloatTensor<Self>,
        transport_ratio: f64,
        epsilon: f64,
    ) -> FloatTensor<Self> {
        portable::partial_transport_backward::<Self>(plan, grad, mass, transport_ratio, epsilon)
    }

    fn generalized_mean(
        x: FloatTensor<Self>,
        powers: FloatTensor<Self>,
        mask: FloatTensor<Self>,
        eps: f64,
        channels_last: bool,
    ) -> FloatTensor<Self> {
        let shape = Shape3::of(&x, channels_last);
        let (x, powers, mask) = (
            x.to_contiguous(),
            powers.to_contiguous(),
            mask.to_contiguous(),
        );
        with_float!(x.dtype(), "generalized mean", T => {
            tensor(
                forward::<T>(view(&x), view(&powers), view(&mask), eps, shape),
                [shape.batch, shape.channels],
            )
        })
    }

    fn generalized_mean_backward(
        x: FloatTensor<Self>,
        powers: FloatTensor<Self>,
        mask: FloatTensor<Self>,
        output: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        eps: f64,
        channels_last: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let shape = Shape3::of(&x, channels_last);
        let dims = x.shape().clone();
        let [x, powers, mask, output, grad] =
            [x, powers, mask, output, grad].map(|t| t.to_contiguous());
        with_float!(x.dtype(), "generalized mean", T => {
            let (dx, dp) = backward::<T>(
                view(&x),
                view(&powers),
                view(&mask),
                view(&output),
                view(&grad),
                eps,
                shape,
            );
            (tensor(dx, dims.clone()), tensor(dp, [shape.channels]))
        })
    }

    fn masked_mean(
        x: FloatTensor<Self>,
        mask: FloatTensor<Self>,
        channels_last: bool,
    ) -> FloatTensor<Self> {
        let shape = Shape3::of(&x, channels_last);
        let (x, mask) = (x.to_contiguous(), mask.to_contiguous());
        with_float!(x.dtype(), "masked mean", T => {
            tensor(
                mean_forward::<T>(view(&x), view(&mask), shape),
                [shape.batch, shape.channels],
            )
        })
    }

    fn masked_mean_backward(
        mask: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        channels_last: bool,
    ) -> FloatTensor<Self> {
        let ([batch, positions], [_, channels]) = (dims2(&mask), dims2(&grad));
        let shape = Shape3 {
            batch,
            positions,
            channels,
            channels_last,
        };
        let dims = if channels_last {
            [batch, positions, channels]
        } else {
            [batch, channels, positions]
        };
        let (mask, grad) = (mask.to_contiguous(), grad.to_contiguous());
        with_float!(grad.dtype(), "masked mean", T => {
            tensor(mean_backward::<T>(view(&mask), view(&grad), shape), dims)
        })
    }
}

fn dims2(tensor: &FlexTensor) -> [usize; 2] {
    let dims = tensor.shape();
    [dims[0], dims[1]]
}

/// The elements of a contiguous Flex tensor.
fn view<T: Element + bytemuck::Pod>(tensor: &FlexTensor) -> &[T] {
    tensor
        .as_slice::<T>()
        .expect("a contiguous tensor of the kernel's dtype")
}

fn tensor<T: Element, S: Into<burn::tensor::Shape>>(values: Vec<T>, shape: S) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

/// `[B, C, N]` (channels first, one contiguous row per channel) or `[B, N, C]`.
#[derive(Clone, Copy, Debug)]
struct Shape3 {
    batch: usize,
    positions: usize,
    channels: usize,
    channels_last: bool,
}

impl Shape3 {
    fn of(x: &FlexTensor, channels_last: bool) -> Self {
        let dims = x.shape();
        let (positions, channels) = if channels_last {
            (dims[1], dims[2])
        } else {
            (dims[2], dims[1])
        };
        Self {
            batch: dims[0],
            positions,
            channels,
            channels_last,
        }
    }
}

/// The float operations the kernels need.
trait Real:
    Copy
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
    /// ln x for normal x > 0.
    fn ln(self) -> Self;
    /// eˣ, saturating outside the finite range.
    fn exp(self) -> Self;
    fn max(self, other: Self) -> Self;
    /// The smallest positive normal value (the floor of the clamp, so `ln` stays exact).
    const MIN_POSITIVE: Self;
}

impl Real for f64 {
    fn from_f64(value: f64) -> Self {
        value
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
        e * std::f32::consts::LN_2 + t * series
    }

    /// eʸ = 2ᵏ·eʳ with k = round(y / ln 2), |r| ≤ ln2/2, eʳ by its degree-7 Taylor polynomial.
    #[inline(always)]
    fn exp(self) -> Self {
        const ROUND: f32 = 12_582_912.0; // 1.5·2²³: adding it rounds to an integer
        const LN_2_HIGH: f32 = 0.693_145_75;
        const LN_2_LOW: f32 = 1.428_606_8e-6;
        // Not `clamp`: max/min keep the loop free of its NaN assertion and vectorise.
        #[allow(clippy::manual_clamp)]
        let y = self.max(-87.0).min(88.0);
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
const LANES: usize = 8;

/// Σ f(i) over `0..len`, in `LANES` interleaved partial sums.
#[inline(always)]
fn lane_sum<T: Real>(len: usize, mut f: impl FnMut(usize) -> T) -> T {
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

/// Per-sample, per-channel statistics of the forward: the log of the largest valid value and
/// the scaled power sum Σ m·exp(p·(ln x − ln max)).
struct Moments<T> {
    log_max: Vec<T>,
    sum: Vec<T>,
}

fn forward<T: Real>(x: &[T], powers: &[T], mask: &[T], eps: f64, shape: Shape3) -> Vec<T> {
    let floor = T::from_f64(eps).max(T::MIN_POSITIVE);
    let (n, c) = (shape.positions, shape.channels);
    let mut out = vec![T::default(); shape.batch * c];
    out.par_chunks_mut(c).enumerate().for_each(|(b, out)| {
        let x = &x[b * n * c..(b + 1) * n * c];
        let mask = &mask[b * n..(b + 1) * n];
        let count = lane_sum(n, |i| mask[i]);
        let moments = moments(x, powers, mask, floor, shape);
        for ch in 0..c {
            let mean = moments.sum[ch] / count;
            out[ch] = (moments.log_max[ch] + mean.ln() / powers[ch]).exp();
        }
    });
    out
}

/// Max pass then power-sum pass over one sample `x` (`[C, N]` or `[N, C]`). Each pass is a
/// plain element-wise loop (so it vectorises) into the scratch rows `log_x` and `weight`.
/// The backward runs the same passes and also writes ∂L/∂x from the same `weight`.
fn moments<T: Real>(x: &[T], powers: &[T], mask: &[T], floor: T, shape: Shape3) -> Moments<T> {
    let (n, c) = (shape.positions, shape.channels);
    let zero = T::default();
    let mut log_max = vec![floor; c];
    let mut sum = vec![zero; c];
    if shape.channels_last {
        log_max = column_log_max(x, mask, floor, c);
        let mut log_x = vec![zero; c];
        let mut weight = vec![zero; c];
        for (row, &valid) in x.chunks_exact(c).zip(mask) {
            if valid > zero {
                weigh_position(row, powers, &log_max, floor, &mut log_x, &mut weight);
                for ch in 0..c {
                    sum[ch] += weight[ch];
                }
            }
        }
    } else {
        let mut log_x = vec![zero; n];
        let mut weight = vec![zero; n];
        for (ch, row) in x.chunks_exact(n).enumerate() {
            log_max[ch] = weigh_row(row, mask, powers[ch], floor, &mut log_x, &mut weight);
            sum[ch] = lane_sum(n, |i| weight[i]);
        }
    }
    Moments { log_max, sum }
}

/// Σ_n m_n x_n / Σ_n m_n per sample and channel: one read of `x`.
fn mean_forward<T: Real>(x: &[T], mask: &[T], shape: Shape3) -> Vec<T> {
    let (n, c) = (shape.positions, shape.channels);
    let mut out = vec![T::default(); shape.batch * c];
    out.par_chunks_mut(c).enumerate().for_each(|(b, out)| {
        let x = &x[b * n * c..(b + 1) * n * c];
        let mask = &mask[b * n..(b + 1) * n];
        let count = lane_sum(n, |i| mask[i]);
        if shape.channels_last {
            for (row, &valid) in x.chunks_exact(c).zip(mask) {
                for (o, &v) in out.iter_mut().zip(row) {
                    *o += valid * v;
                }
            }
            out.iter_mut().for_each(|o| *o = *o / count);
        } else {
            for (o, row) in out.iter_mut().zip(x.chunks_exact(n)) {
                *o = lane_sum(n, |i| mask[i] * row[i]) / count;
            }
        }
    });
    out
}

/// ∂L/∂x_n = m_n g / Σ m: one write of the input-sized gradient.
fn mean_backward<T: Real>(mask: &[T], grad: &[T], shape: Shape3) -> Vec<T> {
    let (n, c) = (shape.positions, shape.channels);
    let mut dx = vec![T::default(); shape.batch * n * c];
    dx.par_chunks_mut(n * c).enumerate().for_each(|(b, dx)| {
        let mask = &mask[b * n..(b + 1) * n];
        let g = &grad[b * c..(b + 1) * c];
        let count = lane_sum(n, |i| mask[i]);
        if shape.channels_last {
            for (row, &valid) in dx.chunks_exact_mut(c).zip(mask) {
                let weight = valid / count;
                for (d, &g) in row.iter_mut().zip(g) {
                    *d = g * weight;
                }
            }
        } else {
            for (row, &g) in dx.chunks_exact_mut(n).zip(g) {
                let scale = g / count;
                for (d, &valid) in row.iter_mut().zip(mask) {
                    *d = scale * valid;
                }
            }
        }
    });
    dx
}

/// One channel's row `[N]` (channels first): `log_x = ln max(x, ε)`, then the masked
/// maximum of it, then `weight = m·exp(p (log_x − max))`. Returns the maximum.
#[inline(always)]
fn weigh_row<T: Real>(
    row: &[T],
    mask: &[T],
    p: T,
    floor: T,
    log_x: &mut [T],
    weight: &mut [T],
) -> T {
    let zero = T::default();
    for (l, &v) in log_x.iter_mut().zip(row) {
        *l = v.max(floor).ln();
    }
    let mut log_max = floor.ln();
    for (&l, &valid) in log_x.iter().zip(mask) {
        let candidate = log_max.max(l);
        log_max = if valid > zero { candidate } else { log_max };
    }
    for ((w, &l), &valid) in weight.iter_mut().zip(log_x.iter()).zip(mask) {
        *w = valid * (p * (l - log_max)).exp();
    }
    log_max
}

/// Per channel of one sample `[N, C]` (channels last): ln of the largest valid value.
fn column_log_max<T: Real>(x: &[T], mask: &[T], floor: T, channels: usize) -> Vec<T> {
    let mut largest = vec![floor; channels];
    for (row, &valid) in x.chunks_exact(channels).zip(mask) {
        if valid > T::default() {
            for (m, &v) in largest.iter_mut().zip(row) {
                *m = m.max(v);
            }
        }
    }
    largest.into_iter().map(|m| m.ln()).collect()
}

/// One position's row `[C]` (channels last): `log_x = ln max(x, ε)` and
/// `weight = exp(p (log_x − max))` per channel.
#[inline(always)]
fn weigh_position<T: Real>(
    row: &[T],
    powers: &[T],
    log_max: &[T],
    floor: T,
    log_x: &mut [T],
    weight: &mut [T],
) {
    for (l, &v) in log_x.iter_mut().zip(row) {
        *l = v.max(floor).ln();
    }
    for (((w, &l), &p), &m) in weight.iter_mut().zip(log_x.iter()).zip(powers).zip(log_max) {
        *w = (p * (l - m)).exp();
    }
}

/// ∂L/∂x = g/count · (x/y)^(p−1) where x > ε (else 0), and
/// ∂L/∂p = Σ_b g · (y/p) · (Σ w ln x / Σ w − ln y) with w = exp(p (ln x − ln max)).
///
/// One ln, one exp and one division per element: (x/y)^(p−1) = w · exp(p (ln max − ln y)) · y / x
/// reuses w.
fn backward<T: Real>(
    x: &[T],
    powers: &[T],
    mask: &[T],
    output: &[T],
    grad: &[T],
    eps: f64,
    shape: Shape3,
) -> (Vec<T>, Vec<T>) {
    let floor = T::from_f64(eps).max(T::MIN_POSITIVE);
    let (n, c) = (shape.positions, shape.channels);
    let zero = T::default();
    let mut dx = vec![zero; x.len()];
    let mut dp_per_sample = vec![zero; shape.batch * c];
    dx.par_chunks_mut(n * c)
        .zip(dp_per_sample.par_chunks_mut(c))
        .enumerate()
        .for_each(|(b, (dx, dp))| {
            let x = &x[b * n * c..(b + 1) * n * c];
            let mask = &mask[b * n..(b + 1) * n];
            let y = &output[b * c..(b + 1) * c];
            let g = &grad[b * c..(b + 1) * c];
            let count = lane_sum(n, |i| mask[i]);
            let log_y: Vec<T> = y.iter().map(|&y| y.ln()).collect();
            // ∂L/∂x = g/count · exp(p (ln max − ln y)) · y · w / x: `factor` holds all but w / x.
            let factor = |ch: usize, log_max: T| {
                g[ch] / count * (powers[ch] * (log_max - log_y[ch])).exp() * y[ch]
            };
            let mut sum = vec![zero; c];
            let mut weighted_log = vec![zero; c];
            if shape.channels_last {
                let log_max = column_log_max(x, mask, floor, c);
                let factors: Vec<T> = (0..c).map(|ch| factor(ch, log_max[ch])).collect();
                let mut log_x = vec![zero; c];
                let mut weight = vec![zero; c];
                for ((dx_row, row), &valid) in
                    dx.chunks_exact_mut(c).zip(x.chunks_exact(c)).zip(mask)
                {
                    if valid <= zero {
                        continue;
                    }
                    weigh_position(row, powers, &log_max, floor, &mut log_x, &mut weight);
                    for ch in 0..c {
                        sum[ch] += weight[ch];
                        weighted_log[ch] += weight[ch] * log_x[ch];
                        let active = if row[ch] > floor { factors[ch] } else { zero };
                        dx_row[ch] = active * weight[ch] / row[ch].max(floor);
                    }
                }
            } else {
                let mut log_x = vec![zero; n];
                let mut weight = vec![zero; n];
                for (ch, (dx_row, row)) in dx.chunks_exact_mut(n).zip(x.chunks_exact(n)).enumerate()
                {
                    let log_max = weigh_row(row, mask, powers[ch], floor, &mut log_x, &mut weight);
                    sum[ch] = lane_sum(n, |i| weight[i]);
                    weighted_log[ch] = lane_sum(n, |i| weight[i] * log_x[i]);
                    let row_factor = factor(ch, log_max);
                    for i in 0..n {
                        let active = if row[i] > floor { row_factor } else { zero };
                        dx_row[i] = active * weight[i] / row[i].max(floor);
                    }
                }
            }
            for ch in 0..c {
                let mean_log = weighted_log[ch] / sum[ch];
                dp[ch] = g[ch] * y[ch] / powers[ch] * (mean_log - log_y[ch]);
            }
        });
    let mut dp = vec![zero; c];
    for sample in dp_per_sample.chunks_exact(c) {
        for (total, &v) in dp.iter_mut().zip(sample) {
            *total += v;
        }
    }
    (dx, dp)
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
}
