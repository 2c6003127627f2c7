//! LSE pooling and its softmax-weighted mean, with their closed-form backward: per channel a
//! min/max pass and one exp pass over the positions (the backward repeats them and writes
//! ∂L/∂x), threads over the batch. The maths, the Taylor crossover and the clamps are the
//! portable composite's (`maths::log_sum_exp`, docs/maths.md §8).

use rayon::prelude::*;

use super::Shape3;
use super::real::{Real, lane_max, lane_sum};
use super::simd::wide_kernel;
use crate::maths::log_sum_exp::LseOutput;

/// The per-type constants of the kernel.
#[derive(Clone, Copy)]
struct Limits<T> {
    /// Where `x − m` is clamped: the type's lowest finite value.
    lowest: T,
    /// Below this exponent `exp` is taken as 0 (f32's polynomial `exp` clamps its argument at
    /// −87 and would give 1.6·10⁻³⁸ instead, which a huge |d| turns into a visible term).
    exp_floor: T,
    /// `r (max − min)` below which the LSE takes its Taylor form.
    crossover: T,
}

impl<T: Real> Limits<T> {
    fn new() -> Self {
        let single = std::mem::size_of::<T>() == 4;
        let (lowest, exp_floor, roundoff) = if single {
            (f32::MIN as f64, -87.0, f32::EPSILON as f64)
        } else {
            (f64::MIN, -745.0, f64::EPSILON)
        };
        Self {
            lowest: T::from_f64(lowest),
            exp_floor: T::from_f64(exp_floor),
            crossover: T::from_f64(4.0 * roundoff.cbrt()),
        }
    }
}

/// One channel's statistics over its valid positions.
struct Channel<T> {
    /// m, the largest valid value.
    top: T,
    /// Σ e_n, e_n = exp(r d_n), d_n = x_n − m.
    sum: T,
    /// Σ e_n d_n.
    weighted: T,
    /// Whether the LSE takes the Taylor form here; then the mean and variance of d.
    taylor: bool,
    mean: T,
    variance: T,
}

/// Fills `d` and `e` for one channel's row (padding: 0 in both) and returns its statistics.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn channel<T: Real>(
    row: &[T],
    mask: &[T],
    r: T,
    count: T,
    kind: LseOutput,
    limits: Limits<T>,
    d: &mut [T],
    e: &mut [T],
) -> Channel<T> {
    let zero = T::default();
    let n = row.len();
    // One length for every slice, so that the indexed loops below need no bounds checks.
    let (mask, d, e) = (&mask[..n], &mut d[..n], &mut e[..n]);
    // Padding reads as −∞ in both (so the loops vectorise, with interleaved partial maxima).
    let below = T::from_f64(f64::NEG_INFINITY);
    let top = lane_max(n, below, |i| if mask[i] > zero { row[i] } else { below });
    let bottom = zero
        - lane_max(
            n,
            below,
            |i| if mask[i] > zero { zero - row[i] } else { below },
        );
    for ((d, &v), &valid) in d.iter_mut().zip(row).zip(mask) {
        *d = if valid > zero {
            (v - top).at_least(limits.lowest)
        } else {
            zero
        };
    }
    for ((e, &d), &valid) in e.iter_mut().zip(d.iter()).zip(mask) {
        let t = r * d;
        let v = t.exp();
        // A NaN compares false, so it is no underflow: it propagates to the output, as in the
        // composite.
        let underflow = t < limits.exp_floor;
        *e = if valid > zero && !underflow { v } else { zero };
    }
    let sum = lane_sum(n, |i| e[i]);
    let weighted = lane_sum(n, |i| e[i] * d[i]);
    let taylor = kind == LseOutput::LogSumExp && r * (top - bottom) < limits.crossover;
    let (mut mean, mut variance) = (zero, zero);
    if taylor {
        mean = lane_sum(n, |i| d[i]) / count;
        variance = lane_sum(n, |i| {
            let deviation = d[i] - mean;
            if mask[i] > zero {
                deviation * deviation
            } else {
                zero
            }
        }) / count;
    }
    Channel {
        top,
        sum,
        weighted,
        taylor,
        mean,
        variance,
    }
}

/// The output of one channel from its statistics.
#[inline(always)]
fn pooled<T: Real>(stats: &Channel<T>, r: T, count: T, kind: LseOutput) -> T {
    match kind {
        LseOutput::SoftmaxMean => stats.top + stats.weighted / stats.sum,
        LseOutput::LogSumExp if stats.taylor => {
            stats.top + stats.mean + r * T::from_f64(0.5) * stats.variance
        }
        LseOutput::LogSumExp => stats.top + (stats.sum / count).ln() / r,
    }
}

/// The sample `x` `[C, N]` or `[N, C]` as channel rows `[C, N]` (a copy when channels last).
fn channel_rows<T: Real>(x: &[T], shape: Shape3) -> std::borrow::Cow<'_, [T]> {
    let (n, c) = (shape.positions, shape.channels);
    if !shape.layout.is_channels_last() {
        return std::borrow::Cow::Borrowed(x);
    }
    let mut rows = vec![T::default(); n * c];
    for (position, values) in x.chunks_exact(c).enumerate() {
        for (ch, &v) in values.iter().enumerate() {
            rows[ch * n + position] = v;
        }
    }
    std::borrow::Cow::Owned(rows)
}

pub(super) fn forward<T: Real>(
    x: &[T],
    r: T,
    mask: &[T],
    kind: LseOutput,
    shape: Shape3,
) -> Vec<T> {
    let (n, c) = (shape.positions, shape.channels);
    let mut out = vec![T::default(); shape.batch * c];
    out.par_chunks_mut(c).enumerate().for_each(|(b, out)| {
        let x = &x[b * n * c..(b + 1) * n * c];
        let mask = &mask[b * n..(b + 1) * n];
        forward_sample_wide(&channel_rows(x, shape), r, mask, kind, out);
    });
    out
}

wide_kernel! {
/// The output `[C]` of one sample given as channel rows `[C, N]`.
fn forward_sample<T: Real>(rows: &[T], r: T, mask: &[T], kind: LseOutput, out: &mut [T]) {
    let n = mask.len();
    let limits = Limits::new();
    let count = lane_sum(n, |i| mask[i]);
    let (mut d, mut e) = (vec![T::default(); n], vec![T::default(); n]);
    for (row, out) in rows.chunks_exact(n).zip(out.iter_mut()) {
        let stats = channel(row, mask, r, count, kind, limits, &mut d, &mut e);
        *out = pooled(&stats, r, count, kind);
    }
}
=> forward_sample_wide
}

/// (∂L/∂x in `x`'s layout, ∂L/∂r) from the output `[B, C]` and its gradient `[B, C]`
/// (module docs of `maths::log_sum_exp` for the formulas). ∂L/∂r is summed in f64.
#[allow(clippy::too_many_arguments)]
pub(super) fn backward<T: Real>(
    x: &[T],
    r: T,
    mask: &[T],
    output: &[T],
    grad: &[T],
    kind: LseOutput,
    shape: Shape3,
) -> (Vec<T>, T) {
    let (n, c) = (shape.positions, shape.channels);
    let mut dx = vec![T::default(); x.len()];
    let dr: f64 = dx
        .par_chunks_mut(n * c)
        .enumerate()
        .map(|(b, dx)| {
            let x = &x[b * n * c..(b + 1) * n * c];
            let mask = &mask[b * n..(b + 1) * n];
            let (y, g) = (&output[b * c..(b + 1) * c], &grad[b * c..(b + 1) * c]);
            if shape.layout.is_channels_last() {
                let mut rows = vec![T::default(); n * c];
                let dr =
                    backward_sample_wide(&channel_rows(x, shape), r, mask, y, g, kind, &mut rows);
                for (position, out) in dx.chunks_exact_mut(c).enumerate() {
                    for (ch, out) in out.iter_mut().enumerate() {
                        *out = rows[ch * n + position];
                    }
                }
                dr
            } else {
                backward_sample_wide(x, r, mask, y, g, kind, dx)
            }
        })
        .sum();
    (dx, T::from_f64(dr))
}

wide_kernel! {
/// ∂L/∂x of one sample as channel rows `[C, N]` into `dx`, and its part of ∂L/∂r.
fn backward_sample<T: Real>(
    rows: &[T],
    r: T,
    mask: &[T],
    output: &[T],
    grad: &[T],
    kind: LseOutput,
    dx: &mut [T],
) -> f64 {
    let n = mask.len();
    let zero = T::default();
    let limits = Limits::new();
    let count = lane_sum(n, |i| mask[i]);
    let (mut d, mut e) = (vec![zero; n], vec![zero; n]);
    let mut dr = 0.0;
    for (((row, dx), &y), &g) in rows.chunks_exact(n).zip(dx.chunks_exact_mut(n)).zip(output).zip(grad) {
        let stats = channel(row, mask, r, count, kind, limits, &mut d, &mut e);
        let shifted = y - stats.top;
        let scale = g / stats.sum;
        match kind {
            LseOutput::SoftmaxMean => {
                // s (d − y) first: s is 0 where d is far below, and r (d − y) may overflow.
                for ((dx, &e), &d) in dx.iter_mut().zip(e.iter()).zip(d.iter()) {
                    *dx = (e * (d - shifted) * r + e) * scale;
                }
                let spread = lane_sum(n, |i| e[i] * d[i] * (d[i] - shifted));
                dr += (spread * scale).to_f64();
            }
            LseOutput::LogSumExp if stats.taylor => {
                let per_position = g / count;
                for ((dx, &d), &valid) in dx.iter_mut().zip(d.iter()).zip(mask) {
                    let term = ((d - stats.mean) * r + T::from_f64(1.0)) * per_position;
                    *dx = if valid > zero { term } else { zero };
                }
                dr += (stats.variance * T::from_f64(0.5) * g).to_f64();
            }
            LseOutput::LogSumExp => {
                for (dx, &e) in dx.iter_mut().zip(e.iter()) {
                    *dx = e * scale;
                }
                dr += ((stats.weighted / stats.sum - shifted) / r * g).to_f64();
            }
        }
    }
    dr
}
=> backward_sample_wide
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::Layout;
    use crate::ops::backends::flex::simd::check::{self, PADDED_SHAPE, agree, padded_mask, values};

    /// The copy chosen at run time and the baseline build give the same forward and backward,
    /// for both outputs and a Taylor channel (r small).
    #[test]
    fn wide_copy_matches_baseline() {
        let (n, c) = (13, 10);
        let mut mask = vec![1.0f32; n];
        mask[4] = 0.0;
        let rows = values(n * c, 1, -0.2, 2.0);
        let g = values(c, 2, -1.0, 1.0);
        for (r, kind) in [
            (3.0f32, LseOutput::LogSumExp),
            (1e-3, LseOutput::LogSumExp),
            (3.0, LseOutput::SoftmaxMean),
        ] {
            let (mut wide, mut base) = (vec![0.0; c], vec![0.0; c]);
            forward_sample_wide(&rows, r, &mask, kind, &mut wide);
            forward_sample(&rows, r, &mask, kind, &mut base);
            agree("forward", &wide, &base);
            let (mut dx_wide, mut dx_base) = (vec![0.0; n * c], vec![0.0; n * c]);
            let dr_wide = backward_sample_wide(&rows, r, &mask, &base, &g, kind, &mut dx_wide);
            let dr_base = backward_sample(&rows, r, &mask, &base, &g, kind, &mut dx_base);
            agree("dx", &dx_wide, &dx_base);
            agree("dr", &[dr_wide as f32], &[dr_base as f32]);
        }
    }

    /// A padded position's value does not matter: 50, NaN or ±∞ there leaves the output and
    /// ∂L/∂r unchanged and gets zero ∂L/∂x, in both layouts and for both outputs.
    #[test]
    fn padded_values_do_not_matter() {
        let (batch, n, c) = PADDED_SHAPE;
        let mask = padded_mask();
        let grad = [0.5f64, -1.0, 2.0, 1.0, 0.25, -0.5];
        for kind in [LseOutput::LogSumExp, LseOutput::SoftmaxMean] {
            for layout in [Layout::ChannelsFirst, Layout::ChannelsLast] {
                let shape = Shape3 {
                    batch,
                    positions: n,
                    channels: c,
                    layout,
                };
                check::padded_values_do_not_matter(&format!("{kind:?}"), layout, |x| {
                    let y = forward(x, 4.0, &mask, kind, shape);
                    let (dx, dr) = backward(x, 4.0, &mask, &y, &grad, kind, shape);
                    (y, dx, vec![dr])
                });
            }
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
    use crate::maths::log_sum_exp::{LseOutput, composite_backward, composite_forward};
    use crate::ops::routing::log_sum_exp;

    /// The Flex kernel and its analytical backward against the composite under autodiff and
    /// the composite closed-form backward: both layouts, both outputs, a mask with an outlier
    /// at a padded position, and temperatures from the Taylor side of the crossover (1e-4) to
    /// a near-max (200).
    #[test]
    fn fused_kernel_matches_composite_paths() {
        let device = seeded_autodiff(3);
        for layout in [Layout::ChannelsFirst, Layout::ChannelsLast] {
            let (x, mask, weights) = masked_batch(&device, layout, (-1.0, 2.0));
            for kind in [LseOutput::LogSumExp, LseOutput::SoftmaxMean] {
                for r in [1e-4, 0.5, 10.0, 200.0] {
                    let r = Tensor::<1>::from_floats([r], &device);
                    let run = |pool: &dyn Fn(Tensor<3>, Tensor<1>) -> Tensor<2>| {
                        let (y, dx, dr) = output_and_gradients(pool, &x, &r, true, &weights);
                        (y, dx, dr.expect("r is tracked"))
                    };
                    let (fused, fused_dx, fused_dr) =
                        run(&|x, r| log_sum_exp(x, r, Some(mask.clone()), layout, kind));
                    let (composite, composite_dx, composite_dr) =
                        run(&|x, r| composite_forward(x, r, Some(mask.clone()), layout, kind));
                    let tolerance = Tolerance::rel_abs(1e-4, 1e-5);
                    assert_same(fused.clone(), composite, tolerance);
                    assert_same(fused_dx.clone(), composite_dx, tolerance);
                    assert_same(
                        fused_dr.clone(),
                        composite_dr,
                        Tolerance::rel_abs(1e-3, 1e-4),
                    );

                    let (closed_dx, closed_dr) = composite_backward(
                        x.clone().inner(),
                        r.clone().inner(),
                        Some(mask.clone().inner()),
                        fused.inner(),
                        weights.clone().inner(),
                        layout,
                        kind,
                    );
                    assert_same(closed_dx, fused_dx, tolerance);
                    assert_same(closed_dr, fused_dr, Tolerance::rel_abs(1e-3, 1e-4));
                }
            }
        }
    }

    #[test]
    fn log_sum_exp_backward_runs_the_analytical_node() {
        use crate::ops::BACKWARD_CALLS;
        use std::sync::atomic::Ordering;
        let device = Device::flex().autodiff();
        let x = Tensor::<3>::ones([2, 3, 4], &device).require_grad();
        let before = BACKWARD_CALLS::LOG_SUM_EXP.load(Ordering::SeqCst);
        let r = Tensor::<1>::ones([1], &device);
        let y = log_sum_exp(
            x.clone(),
            r,
            None,
            Layout::ChannelsFirst,
            LseOutput::LogSumExp,
        );
        let grads = y.sum().backward();
        assert!(BACKWARD_CALLS::LOG_SUM_EXP.load(Ordering::SeqCst) > before);
        assert!(x.grad(&grads).is_some());
    }
}
