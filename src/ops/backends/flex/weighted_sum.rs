//! The weighted sum over positions (GAP's masked mean, GSP's pooling) and its two backward
//! halves: one read of the input forward, one write of the input-sized gradient for ∂L/∂x,
//! one read of the input for ∂L/∂w.

use rayon::prelude::*;

use super::Shape3;
use super::real::{Real, dot};
use super::simd::wide_kernel;
#[cfg(test)]
use crate::layout::Layout;

/// y_bc = Σ_n w_bn x_bnc: `[B, C]`.
pub(super) fn forward<T: Real>(x: &[T], weights: &[T], shape: Shape3) -> Vec<T> {
    let (n, c) = (shape.positions, shape.channels);
    per_sample(x, (weights, n), c, shape, |x, w, out| {
        sum_sample_wide(x, w, shape, out)
    })
}

/// `kernel(x_b, other_b, out_b)` for every sample b, in parallel: `x` holds N·C values per
/// sample, `other` `per_sample` values, the output `out_len`.
fn per_sample<T: Real>(
    x: &[T],
    (other, per_sample): (&[T], usize),
    out_len: usize,
    shape: Shape3,
    kernel: impl Fn(&[T], &[T], &mut [T]) + Sync,
) -> Vec<T> {
    let size = shape.positions * shape.channels;
    let mut out = vec![T::default(); shape.batch * out_len];
    out.par_chunks_mut(out_len)
        .enumerate()
        .for_each(|(b, out)| {
            let other = &other[b * per_sample..(b + 1) * per_sample];
            kernel(&x[b * size..(b + 1) * size], other, out)
        });
    out
}

wide_kernel! {
/// One sample's weighted sum `[C]` of `x` (`[N, C]` or `[C, N]`).
fn sum_sample<T: Real>(x: &[T], w: &[T], shape: Shape3, out: &mut [T]) {
    if shape.layout.is_channels_last() {
        for (row, &w) in x.chunks_exact(shape.channels).zip(w) {
            for (o, &v) in out.iter_mut().zip(row) {
                *o += w * v;
            }
        }
    } else {
        for (o, row) in out.iter_mut().zip(x.chunks_exact(shape.positions)) {
            *o = dot(row, w);
        }
    }
}
=> sum_sample_wide
}

/// ∂L/∂x_bnc = w_bn g_bc, in `x`'s layout.
pub(super) fn features_backward<T: Real>(weights: &[T], grad: &[T], shape: Shape3) -> Vec<T> {
    let (n, c) = (shape.positions, shape.channels);
    let mut dx = vec![T::default(); shape.batch * n * c];
    dx.par_chunks_mut(n * c).enumerate().for_each(|(b, dx)| {
        let w = &weights[b * n..(b + 1) * n];
        let g = &grad[b * c..(b + 1) * c];
        if shape.layout.is_channels_last() {
            for (row, &w) in dx.chunks_exact_mut(c).zip(w) {
                for (d, &g) in row.iter_mut().zip(g) {
                    *d = w * g;
                }
            }
        } else {
            for (row, &g) in dx.chunks_exact_mut(n).zip(g) {
                for (d, &w) in row.iter_mut().zip(w) {
                    *d = g * w;
                }
            }
        }
    });
    dx
}

/// ∂L/∂w_bn = Σ_c x_bnc g_bc: `[B, N]`.
pub(super) fn weights_backward<T: Real>(x: &[T], grad: &[T], shape: Shape3) -> Vec<T> {
    let (n, c) = (shape.positions, shape.channels);
    per_sample(x, (grad, c), n, shape, |x, g, dw| {
        weights_sample_wide(x, g, shape, dw)
    })
}

wide_kernel! {
/// One sample's ∂L/∂w `[N]`: the dot products of its positions with ∂L/∂y.
fn weights_sample<T: Real>(x: &[T], g: &[T], shape: Shape3, dw: &mut [T]) {
    if shape.layout.is_channels_last() {
        for (d, row) in dw.iter_mut().zip(x.chunks_exact(shape.channels)) {
            *d = dot(row, g);
        }
    } else {
        for (row, &g) in x.chunks_exact(shape.positions).zip(g) {
            for (d, &v) in dw.iter_mut().zip(row) {
                *d += g * v;
            }
        }
    }
}
=> weights_sample_wide
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::backends::flex::simd::check::{agree, values};

    /// The copy chosen at run time and the baseline build give the same sums and ∂L/∂w.
    #[test]
    fn wide_copy_matches_baseline() {
        let (n, c) = (49, 19);
        let w = values(n, 3, 0.0, 0.1);
        let g = values(c, 4, -1.0, 1.0);
        let x = values(n * c, 5, -1.0, 1.0);
        for layout in [Layout::ChannelsFirst, Layout::ChannelsLast] {
            let shape = Shape3::one_sample(n, c, layout);
            let (mut wide, mut base) = (vec![0.0; c], vec![0.0; c]);
            sum_sample_wide(&x, &w, shape, &mut wide);
            sum_sample(&x, &w, shape, &mut base);
            agree("sum", &wide, &base);
            let (mut wide, mut base) = (vec![0.0; n], vec![0.0; n]);
            weights_sample_wide(&x, &g, shape, &mut wide);
            weights_sample(&x, &g, shape, &mut base);
            agree("dw", &wide, &base);
        }
    }
}

/// The fused kernel and both halves of its backward against the composite under autodiff.
#[cfg(all(test, feature = "autodiff"))]
mod against_composite {
    use burn::tensor::{Distribution, Tensor, TensorData, Tolerance};

    use crate::layout::Layout;
    use crate::maths::weighted_sum::weighted_sum as composite;
    use crate::ops::backends::flex::simd::check::{
        assert_same, output_and_gradients, seeded_autodiff,
    };
    use crate::ops::routing::weighted_sum;

    /// In both layouts, as GAP's masked mean (untracked weights, 0 on padding) and as GSP's
    /// pooling (tracked weights).
    #[test]
    fn fused_weighted_sum_matches_composite() {
        let device = seeded_autodiff(2);
        let (b, n, c) = (3, 6, 5);
        let normal = Distribution::Normal(0.0, 1.0);
        // GAP's weights: 1/4 on the 4 valid positions of each sample, 0 on the 2 padded ones.
        let mean = (0..b * n)
            .map(|i| if i % 3 != 1 { 0.25f32 } else { 0.0 })
            .collect::<Vec<_>>();
        let mean = Tensor::<2>::from_data(TensorData::new(mean, [b, n]), &device);
        let free = Tensor::<2>::random([b, n], normal, &device);
        let tolerance = Tolerance::rel_abs(1e-5, 1e-6);
        for layout in [Layout::ChannelsFirst, Layout::ChannelsLast] {
            let x = Tensor::<3>::random(layout.dims(b, n, c), normal, &device);
            let upstream = Tensor::<2>::random([b, c], normal, &device);
            for (weights, tracked) in [(&mean, false), (&free, true)] {
                let run = |pool: fn(Tensor<3>, Tensor<2>, Layout) -> Tensor<2>| {
                    let pool = |x, w| pool(x, w, layout);
                    output_and_gradients(pool, &x, weights, tracked, &upstream)
                };
                let (fused, fused_dx, fused_dw) = run(weighted_sum);
                let (expected, expected_dx, expected_dw) = run(composite);
                assert_same(fused, expected, tolerance);
                assert_same(fused_dx, expected_dx, tolerance);
                assert_eq!(fused_dw.is_some(), tracked, "{layout:?}");
                if let (Some(dw), Some(expected_dw)) = (fused_dw, expected_dw) {
                    assert_same(dw, expected_dw, tolerance);
                }
            }
        }
    }
}
