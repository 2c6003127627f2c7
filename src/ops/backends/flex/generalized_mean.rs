//! The generalized mean of GeM/GGeM and its analytical backward: two passes over the input
//! each, threads over the batch, element-wise passes through scratch rows that vectorise.

use rayon::prelude::*;

use super::Shape3;
use super::real::{Real, lane_sum};
use super::simd::wide_kernel;
#[cfg(test)]
use crate::layout::Layout;

/// Per-sample, per-channel statistics of the forward: the largest valid (clamped) value and
/// the scaled power sum Σ m·exp(p·(ln x − ln max)).
struct Moments<T> {
    largest: Vec<T>,
    sum: Vec<T>,
}

pub(super) fn forward<T: Real>(
    x: &[T],
    powers: &[T],
    mask: &[T],
    eps: f64,
    shape: Shape3,
) -> Vec<T> {
    let floor = T::from_f64(eps).max(T::MIN_POSITIVE);
    let (n, c) = (shape.positions, shape.channels);
    let mut out = vec![T::default(); shape.batch * c];
    out.par_chunks_mut(c).enumerate().for_each(|(b, out)| {
        let x = &x[b * n * c..(b + 1) * n * c];
        let mask = &mask[b * n..(b + 1) * n];
        forward_sample_wide(x, powers, mask, floor, shape, out);
    });
    out
}

wide_kernel! {
/// The output `[C]` of one sample `x` (`[C, N]` or `[N, C]`).
fn forward_sample<T: Real>(
    x: &[T],
    powers: &[T],
    mask: &[T],
    floor: T,
    shape: Shape3,
    out: &mut [T],
) {
    let count = lane_sum(shape.positions, |i| mask[i]);
    let moments = moments(x, powers, mask, floor, shape);
    for (ch, out) in out.iter_mut().enumerate() {
        // y = max · mean^(1/p): the exponent is ≤ 0 (mean ≤ 1), so y is exact up to the
        // largest float; exp(ln max + ln(mean)/p) would need e^88.7 for a value near f32::MAX.
        let mean = moments.sum[ch] / count;
        *out = moments.largest[ch] * (mean.ln() / powers[ch]).exp();
    }
}
=> forward_sample_wide
}

/// Max pass then power-sum pass over one sample `x` (`[C, N]` or `[N, C]`). Each pass is a
/// plain element-wise loop (so it vectorises) into the scratch rows `log_x` and `weight`.
/// The backward runs the same passes and also writes ∂L/∂x from the same `weight`.
#[inline(always)]
fn moments<T: Real>(x: &[T], powers: &[T], mask: &[T], floor: T, shape: Shape3) -> Moments<T> {
    let (n, c) = (shape.positions, shape.channels);
    let zero = T::default();
    let mut sum = vec![zero; c];
    let largest = if shape.layout.is_channels_last() {
        let largest = column_largest(x, mask, floor, c);
        let log_max: Vec<T> = largest.iter().map(|&m| m.ln()).collect();
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
        largest
    } else {
        let mut log_x = vec![zero; n];
        let mut weight = vec![zero; n];
        let mut largest = vec![zero; c];
        for (ch, row) in x.chunks_exact(n).enumerate() {
            largest[ch] = weigh_row(row, mask, powers[ch], floor, &mut log_x, &mut weight);
            sum[ch] = lane_sum(n, |i| weight[i]);
        }
        largest
    };
    Moments { largest, sum }
}

/// One channel's row `[N]` (channels first): `log_x = ln max(x, ε)`, then the masked
/// maximum of `max(x, ε)`, then `weight = m·exp(p (log_x − ln max))`. Returns the maximum.
///
/// A NaN input stays NaN through the clamp, `ln` and `exp` ([`Real::at_least`]), so its weight
/// and the sum are NaN: the output of its channel is NaN, as in the portable body, whether or
/// not the maximum skipped it.
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
    // Padding reads as ε: its weight is 0, and its ln must be finite for the backward's
    // Σ w ln x (0 · NaN = NaN).
    for ((l, &v), &valid) in log_x.iter_mut().zip(row).zip(mask) {
        let v = if valid > zero { v } else { floor };
        *l = v.at_least(floor).ln();
    }
    let mut largest = floor;
    for (&v, &valid) in row.iter().zip(mask) {
        let candidate = largest.max(v);
        largest = if valid > zero { candidate } else { largest };
    }
    let log_max = largest.ln();
    for ((w, &l), &valid) in weight.iter_mut().zip(log_x.iter()).zip(mask) {
        // A select, not `valid * term`: a padded value above the maximum overflows the `exp`,
        // and 0·∞ is NaN.
        let term = valid * (p * (l - log_max)).exp();
        *w = if valid > zero { term } else { zero };
    }
    largest
}

/// Per channel of one sample `[N, C]` (channels last): the largest valid `max(x, ε)`.
#[inline(always)]
fn column_largest<T: Real>(x: &[T], mask: &[T], floor: T, channels: usize) -> Vec<T> {
    let mut largest = vec![floor; channels];
    for (row, &valid) in x.chunks_exact(channels).zip(mask) {
        if valid > T::default() {
            for (m, &v) in largest.iter_mut().zip(row) {
                *m = m.max(v);
            }
        }
    }
    largest
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
        *l = v.at_least(floor).ln();
    }
    for (((w, &l), &p), &m) in weight.iter_mut().zip(log_x.iter()).zip(powers).zip(log_max) {
        *w = (p * (l - m)).exp();
    }
}

/// ∂L/∂x = g/count · (x/y)^(p−1) where x > ε (else 0), and
/// ∂L/∂p = Σ_b g · (y/p) · (Σ w ln x / Σ w − ln y) with w = exp(p (ln x − ln max)).
///
/// One ln, one exp and one division per element: (x/y)^(p−1) = w · exp(p (ln max − ln y)) · y / x
/// reuses w. The products are ordered so that none overflows where the result is finite:
/// w / x · y (≤ 1 for p ≥ 1) before the factor g/count · exp(p (ln max − ln y)), and
/// g · (Σ w ln x / Σ w − ln y) / p before y, which may be near the largest float.
pub(super) fn backward<T: Real>(
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
            backward_sample_wide(x, powers, mask, y, g, floor, shape, dx, dp);
        });
    let mut dp = vec![zero; c];
    for sample in dp_per_sample.chunks_exact(c) {
        for (total, &v) in dp.iter_mut().zip(sample) {
            *total += v;
        }
    }
    (dx, dp)
}

wide_kernel! {
/// ∂L/∂x `[C, N]` or `[N, C]` and this sample's term of ∂L/∂p `[C]`, for one sample with
/// output `y` and upstream gradient `g`.
fn backward_sample<T: Real>(
    x: &[T],
    powers: &[T],
    mask: &[T],
    y: &[T],
    g: &[T],
    floor: T,
    shape: Shape3,
    dx: &mut [T],
    dp: &mut [T],
) {
    let (n, c) = (shape.positions, shape.channels);
    let zero = T::default();
    let count = lane_sum(n, |i| mask[i]);
    let log_y: Vec<T> = y.iter().map(|&y| y.ln()).collect();
    // ∂L/∂x = g/count · exp(p (ln max − ln y)) · (w / x · y): `factor` holds the first part.
    let factor = |ch: usize, log_max: T| g[ch] / count * (powers[ch] * (log_max - log_y[ch])).exp();
    let mut sum = vec![zero; c];
    let mut weighted_log = vec![zero; c];
    if shape.layout.is_channels_last() {
        let log_max: Vec<T> = column_largest(x, mask, floor, c)
            .into_iter()
            .map(|m| m.ln())
            .collect();
        let factors: Vec<T> = (0..c).map(|ch| factor(ch, log_max[ch])).collect();
        let mut log_x = vec![zero; c];
        let mut weight = vec![zero; c];
        for ((dx_row, row), &valid) in dx.chunks_exact_mut(c).zip(x.chunks_exact(c)).zip(mask) {
            if valid <= zero {
                continue;
            }
            weigh_position(row, powers, &log_max, floor, &mut log_x, &mut weight);
            for ch in 0..c {
                sum[ch] += weight[ch];
                weighted_log[ch] += weight[ch] * log_x[ch];
                // A select: 0 at the clamp, and for a NaN (its output and ∂L/∂p are NaN).
                let v = row[ch];
                let term = factors[ch] * (weight[ch] / v * y[ch]);
                dx_row[ch] = if v > floor { term } else { zero };
            }
        }
    } else {
        let mut log_x = vec![zero; n];
        let mut weight = vec![zero; n];
        for (ch, (dx_row, row)) in dx.chunks_exact_mut(n).zip(x.chunks_exact(n)).enumerate() {
            let largest = weigh_row(row, mask, powers[ch], floor, &mut log_x, &mut weight);
            sum[ch] = lane_sum(n, |i| weight[i]);
            weighted_log[ch] = lane_sum(n, |i| weight[i] * log_x[i]);
            let (row_factor, row_y) = (factor(ch, largest.ln()), y[ch]);
            for i in 0..n {
                // A select: 0 at the clamp and for NaN, and 0 on padding (weight 0, whatever
                // the value there).
                let v = row[i];
                let term = row_factor * (weight[i] / v * row_y);
                dx_row[i] = if v > floor && mask[i] > zero {
                    term
                } else {
                    zero
                };
            }
        }
    }
    for ch in 0..c {
        let mean_log = weighted_log[ch] / sum[ch];
        dp[ch] = g[ch] * ((mean_log - log_y[ch]) / powers[ch]) * y[ch];
    }
}
=> backward_sample_wide
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::backends::flex::simd::check::{self, PADDED_SHAPE, agree, padded_mask, values};

    /// The copy chosen at run time and the baseline build give the same forward and backward.
    #[test]
    fn wide_copy_matches_baseline() {
        let (n, c) = (13, 10);
        let powers: Vec<f32> = (0..c).map(|i| 1.0 + 3.0 * i as f32).collect();
        let mut mask = vec![1.0f32; n];
        mask[4] = 0.0;
        for layout in [Layout::ChannelsFirst, Layout::ChannelsLast] {
            let shape = Shape3::one_sample(n, c, layout);
            let x = values(n * c, 1, -0.2, 2.0);
            let g = values(c, 2, -1.0, 1.0);
            let floor = 1e-6f32;
            let (mut wide, mut base) = (vec![0.0; c], vec![0.0; c]);
            forward_sample_wide(&x, &powers, &mask, floor, shape, &mut wide);
            forward_sample(&x, &powers, &mask, floor, shape, &mut base);
            agree("forward", &wide, &base);
            type Backward =
                fn(&[f32], &[f32], &[f32], &[f32], &[f32], f32, Shape3, &mut [f32], &mut [f32]);
            let run = |backward: Backward| {
                let (mut dx, mut dp) = (vec![0.0; n * c], vec![0.0; c]);
                backward(
                    &x, &powers, &mask, &base, &g, floor, shape, &mut dx, &mut dp,
                );
                (dx, dp)
            };
            let (dx_wide, dp_wide) = run(backward_sample_wide);
            let (dx_base, dp_base) = run(backward_sample);
            agree("dx", &dx_wide, &dx_base);
            agree("dp", &dp_wide, &dp_base);
        }
    }
    /// A padded position's value does not matter: an outlier there (whose power overflows
    /// f64 at p = 1000), a NaN or an ∞ leaves the output and ∂L/∂p unchanged and gets zero
    /// ∂L/∂x, in both layouts: the kernel selects, it never multiplies by the mask.
    #[test]
    fn padded_values_do_not_matter() {
        let (batch, n, c) = PADDED_SHAPE;
        let powers = [1.0f64, 40.0, 1000.0];
        let mask = padded_mask();
        let grad = [0.5f64, -1.0, 2.0, 1.0, 0.25, -0.5];
        for layout in [Layout::ChannelsFirst, Layout::ChannelsLast] {
            let shape = Shape3 {
                batch,
                positions: n,
                channels: c,
                layout,
            };
            check::padded_values_do_not_matter("GeM", layout, |x| {
                let y = forward(x, &powers, &mask, 1e-6, shape);
                let (dx, dp) = backward(x, &powers, &mask, &y, &grad, 1e-6, shape);
                (y, dx, dp)
            });
        }
    }
}

/// The fused kernel and its backward against the reference composites.
#[cfg(all(test, feature = "autodiff"))]
mod against_composite {
    use burn::tensor::{Device, Tensor, Tolerance};

    use super::super::simd::check::{
        assert_same, masked_batch, output_and_gradients, seeded_autodiff,
    };
    use crate::layout::Layout;
    use crate::maths::generalized_mean::{composite_backward, composite_forward};
    use crate::ops::routing::generalized_mean;

    /// The fused Flex kernel and its analytical backward against the composite form under
    /// autodiff and against the composite closed-form backward, both layouts, with a mask
    /// (one padded position holding an outlier), a clamped channel and powers from 1 to 200 (in f32, ∂y/∂x at p = 200 carries p times
    /// the rounding of ln, hence 1e-4).
    #[test]
    fn fused_kernel_matches_composite_paths() {
        let device = seeded_autodiff(1);
        for layout in [Layout::ChannelsFirst, Layout::ChannelsLast] {
            // The padded outlier of `masked_batch`: at p = 40 and 200 its power overflows f32,
            // which must not reach any output or gradient.
            let (x, mask, weights) = masked_batch(&device, layout, (-0.5, 3.0));
            // Channel 0 at the first position of each sample below the clamp.
            let x = x.slice_fill([0..3, 0..1, 0..1], -1.0);
            let powers = Tensor::<1>::from_floats([1.0, 2.5, 3.0, 40.0, 200.0], &device);
            // y, ∂L/∂x and ∂L/∂p of L = Σ weights ⊙ y, for y the kernel's or the composite's.
            let run = |pool: &dyn Fn(Tensor<3>, Tensor<1>) -> Tensor<2>| {
                let (y, dx, dp) = output_and_gradients(pool, &x, &powers, true, &weights);
                (y, dx, dp.expect("the powers are tracked"))
            };
            let (fused, fused_dx, fused_dp) =
                run(&|x, p| generalized_mean(x, p, Some(mask.clone()), 1e-6, layout));
            let (composite, composite_dx, composite_dp) =
                run(&|x, p| composite_forward(x, p, Some(mask.clone().float()), 1e-6, layout));
            let tolerance = Tolerance::rel_abs(1e-4, 1e-6);
            assert_same(fused.clone(), composite, tolerance);
            assert_same(fused_dx.clone(), composite_dx, tolerance);
            assert_same(
                fused_dp.clone(),
                composite_dp,
                Tolerance::rel_abs(1e-4, 1e-5),
            );

            let (closed_dx, closed_dp) = composite_backward(
                x.inner(),
                powers.inner(),
                mask.float().inner(),
                fused.inner(),
                weights.inner(),
                1e-6,
                layout,
            );
            assert_same(closed_dx, fused_dx, tolerance);
            assert_same(closed_dp, fused_dp, Tolerance::rel_abs(1e-4, 1e-5));
        }
    }

    #[test]
    fn generalized_mean_backward_runs_the_analytical_node() {
        use crate::ops::BACKWARD_CALLS;
        use std::sync::atomic::Ordering;
        let device = Device::flex().autodiff();
        let x = Tensor::<3>::ones([2, 3, 4], &device).require_grad();
        let before = BACKWARD_CALLS::GENERALIZED_MEAN.load(Ordering::SeqCst);
        let powers = Tensor::ones([3], &device);
        let grads = generalized_mean(x.clone(), powers, None, 1e-6, Layout::ChannelsFirst)
            .sum()
            .backward();
        assert!(BACKWARD_CALLS::GENERALIZED_MEAN.load(Ordering::SeqCst) > before);
        assert!(x.grad(&grads).is_some());
    }
}
