//! L2 normalisation along one axis (`maths::l2_normalize`): x seen as `[outer, len, inner]`
//! with the axis in the middle; per outer slab one pass for the sum of squares and one for the
//! output (a third, for max |x|, only where a sum overflowed), and in the backward one for
//! ⟨y, g⟩ and one for ∂L/∂x; the inner positions side by side, or for a contiguous vector
//! interleaved partial sums, so the loops vectorise whichever axis it is. Threads split the
//! slabs.
//! Burn's composite of the same maths takes about eight passes and their autodiff nodes.

use rayon::prelude::*;

use super::real::{Real, dot, lane_max, lane_sum};
use super::simd::wide_kernel;

/// (y, d): the normalised `x` `[outer, len, inner]` (the axis in the middle) and its
/// denominators `[outer, inner]`.
pub(super) fn forward<T: Real>(
    x: &[T],
    [outer, len, inner]: [usize; 3],
    eps: f64,
) -> (Vec<T>, Vec<T>) {
    let mut y = vec![T::default(); outer * len * inner];
    let mut d = vec![T::default(); outer * inner];
    if y.is_empty() || d.is_empty() {
        return (y, vec![T::from_f64(eps); outer * inner]);
    }
    y.par_chunks_mut(len * inner)
        .zip(d.par_chunks_mut(inner))
        .zip(x.par_chunks(len * inner))
        .for_each(|((y, d), x)| forward_slab(x, y, d, inner, T::from_f64(eps)));
    (y, d)
}

/// Whether `v` is finite (neither ±∞ nor NaN).
#[inline(always)]
fn finite<T: Real>(v: T) -> bool {
    #[allow(clippy::eq_op)]
    let zero_difference = v - v == T::default();
    zero_difference
}

wide_kernel! {
    /// One slab `[len, inner]`: d = max(‖x‖, eps) and y = x / d per column. The plain sum of
    /// squares first (one read); only a column whose sum overflowed (or is NaN) takes the scaled
    /// path of the composite: s = max(1, max |x|), ‖x / s‖ clamped at eps, y = (x / s) / ‖x / s‖
    /// and d = s·‖x / s‖ (∞ where that overflows, as in the composite). Where the plain sum is
    /// finite, the scaled one differs from it by rounding only (s ≥ 1 cannot underflow it).
    fn forward_slab_body<T: Real>(x: &[T], y: &mut [T], d: &mut [T], inner: usize, eps: T) {
        let zero = T::default();
        let one = T::from_f64(1.0);
        let floor = eps * eps;
        let len = x.len() / inner;
        let clamped_root = |sum: T| (if sum < floor { floor } else { sum }).sqrt();
        if inner == 1 {
            // One contiguous vector: sums in interleaved lanes, so the loops vectorise.
            let sum = lane_sum(len, |i| x[i] * x[i]);
            if finite(sum) {
                let norm = clamped_root(sum);
                d[0] = norm;
                let inverse = one / norm;
                for (o, &v) in y.iter_mut().zip(x) {
                    *o = v * inverse;
                }
            } else {
                let largest = lane_max(len, one, |i| {
                    let v = x[i];
                    if v < zero { zero - v } else { v }
                });
                let scaled = lane_sum(len, |i| {
                    let w = x[i] / largest;
                    w * w
                });
                let norm = clamped_root(scaled);
                d[0] = largest * norm;
                let inverse = one / norm;
                for (o, &v) in y.iter_mut().zip(x) {
                    *o = v / largest * inverse;
                }
            }
            return;
        }
        let mut sums = vec![zero; inner];
        for row in x.chunks_exact(inner) {
            for (sum, &v) in sums.iter_mut().zip(row) {
                *sum += v * v;
            }
        }
        if sums.iter().all(|&sum| finite(sum)) {
            let mut inverse = vec![zero; inner];
            for ((n, d), &sum) in inverse.iter_mut().zip(d.iter_mut()).zip(&sums) {
                let norm = clamped_root(sum);
                *d = norm;
                *n = one / norm;
            }
            for (out, row) in y.chunks_exact_mut(inner).zip(x.chunks_exact(inner)) {
                for ((o, &v), &n) in out.iter_mut().zip(row).zip(&inverse) {
                    *o = v * n;
                }
            }
            return;
        }
        // Some column overflowed: the scaled path for every column of the slab.
        let mut scale = vec![one; inner];
        for row in x.chunks_exact(inner) {
            for (s, &v) in scale.iter_mut().zip(row) {
                let a = if v < zero { zero - v } else { v };
                *s = Real::max(*s, a);
            }
        }
        sums.fill(zero);
        for row in x.chunks_exact(inner) {
            for ((sum, &v), &s) in sums.iter_mut().zip(row).zip(&scale) {
                let w = v / s;
                *sum += w * w;
            }
        }
        let mut inverse_norm = vec![zero; inner];
        for (((n, d), &s), &sum) in inverse_norm.iter_mut().zip(d.iter_mut()).zip(&scale).zip(&sums) {
            let norm = clamped_root(sum);
            *n = one / norm;
            *d = s * norm;
        }
        for (out, row) in y.chunks_exact_mut(inner).zip(x.chunks_exact(inner)) {
            for (((o, &v), &s), &n) in out.iter_mut().zip(row).zip(&scale).zip(&inverse_norm) {
                *o = v / s * n;
            }
        }
    }
    => forward_slab
}

/// ∂L/∂x from y, d `[outer, inner]` and ∂L/∂y.
pub(super) fn backward<T: Real>(
    y: &[T],
    d: &[T],
    grad: &[T],
    [outer, len, inner]: [usize; 3],
    eps: f64,
) -> Vec<T> {
    let mut dx = vec![T::default(); outer * len * inner];
    if dx.is_empty() {
        return dx;
    }
    // Unclamped, d = ‖x‖ ≥ eps; clamped, d = eps up to the rounding of its square root.
    let clamp = T::from_f64(eps * (1.0 + 1e-3));
    dx.par_chunks_mut(len * inner)
        .zip(y.par_chunks(len * inner))
        .zip(grad.par_chunks(len * inner))
        .zip(d.par_chunks(inner))
        .for_each(|(((dx, y), g), d)| backward_slab(y, g, d, dx, inner, clamp));
    dx
}

wide_kernel! {
    /// One slab: ∂L/∂x = (g − y ⟨y, g⟩) / d, without the projection where d is the clamp.
    fn backward_slab_body<T: Real>(y: &[T], g: &[T], d: &[T], dx: &mut [T], inner: usize, clamp: T) {
        let zero = T::default();
        let one = T::from_f64(1.0);
        if inner == 1 {
            let projection = if d[0] <= clamp { zero } else { dot(y, g) };
            let inverse = one / d[0];
            for ((o, &y), &g) in dx.iter_mut().zip(y).zip(g) {
                *o = (g - y * projection) * inverse;
            }
            return;
        }
        let mut projection = vec![zero; inner];
        for (y_row, g_row) in y.chunks_exact(inner).zip(g.chunks_exact(inner)) {
            for ((p, &y), &g) in projection.iter_mut().zip(y_row).zip(g_row) {
                *p += y * g;
            }
        }
        let mut inverse = vec![zero; inner];
        for ((p, n), &d) in projection.iter_mut().zip(inverse.iter_mut()).zip(d) {
            if d <= clamp {
                *p = zero;
            }
            *n = one / d;
        }
        for ((out, y_row), g_row) in dx.chunks_exact_mut(inner).zip(y.chunks_exact(inner)).zip(g.chunks_exact(inner)) {
            for ((((o, &y), &g), &p), &n) in out.iter_mut().zip(y_row).zip(g_row).zip(&projection).zip(&inverse) {
                *o = (g - y * p) * n;
            }
        }
    }
    => backward_slab
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::backends::flex::simd::check::{agree, values};

    /// The copy chosen at run time and the baseline build give the same forward and backward,
    /// for a contiguous vector and a slab, each on the plain path and on the scaled one (a sum
    /// of squares that overflows), and for a zero vector (the clamp).
    #[test]
    fn wide_copy_matches_baseline() {
        let eps = 1e-12f32;
        let clamp = eps * (1.0 + 1e-3);
        for (len, inner) in [(37, 1), (13, 10)] {
            let plain = values(len * inner, 1, -2.0, 3.0);
            let mut huge = plain.clone();
            huge[len * inner / 2] = 3e38;
            let zero = vec![0.0f32; len * inner];
            let g = values(len * inner, 2, -1.0, 1.0);
            for x in [plain, huge, zero] {
                let (mut y_wide, mut y_base) = (vec![0.0; x.len()], vec![0.0; x.len()]);
                let (mut d_wide, mut d_base) = (vec![0.0; inner], vec![0.0; inner]);
                forward_slab(&x, &mut y_wide, &mut d_wide, inner, eps);
                forward_slab_body(&x, &mut y_base, &mut d_base, inner, eps);
                agree("y", &y_wide, &y_base);
                agree("d", &d_wide, &d_base);
                let (mut dx_wide, mut dx_base) = (vec![0.0; x.len()], vec![0.0; x.len()]);
                backward_slab(&y_base, &g, &d_base, &mut dx_wide, inner, clamp);
                backward_slab_body(&y_base, &g, &d_base, &mut dx_base, inner, clamp);
                agree("dx", &dx_wide, &dx_base);
            }
        }
    }
}

/// The kernel and its backward against the reference composite under autodiff.
#[cfg(all(test, feature = "autodiff"))]
mod against_composite {
    use burn::tensor::{Distribution, Tensor, TensorData, Tolerance};

    use super::super::simd::check::{assert_same, seeded_autodiff};
    use crate::maths::l2_normalize::{closed_form_backward, composite_forward};
    use crate::ops::routing::l2_normalize;

    /// Every axis of a rank-3 tensor and the last of a rank-2 one, with a zero vector (the
    /// clamp), a vector at f32's largest values and one at 1e30 (overflow-safe norms), and a
    /// small one: the outputs, the gradients through autodiff and the closed form agree.
    #[test]
    fn fused_kernel_matches_composite_paths() {
        let device = seeded_autodiff(5);
        let normal = Distribution::Normal(0.0, 1.0);
        let base = Tensor::<3>::random([3, 5, 4], normal, &device);
        // Column (0, ·, 1) zero, (1, ·, 2) near f32::MAX, (2, ·, 0) at 1e30, (2, ·, 3) tiny.
        let mut values = base.to_data().to_vec::<f32>().unwrap();
        for l in 0..5 {
            values[l * 4 + 1] = 0.0;
            values[20 + l * 4 + 2] = f32::MAX * if l % 2 == 0 { 0.9 } else { -0.5 };
            values[40 + l * 4] = 1e30 * (l as f32 - 2.0);
            values[40 + l * 4 + 3] = 1e-20 * (l as f32 + 1.0);
        }
        let x = Tensor::<3>::from_data(TensorData::new(values, [3, 5, 4]), &device);
        let upstream = Tensor::<3>::random([3, 5, 4], normal, &device);
        let tolerance = Tolerance::rel_abs(1e-5, 1e-6);
        for axis in 0..3 {
            let run = |f: &dyn Fn(Tensor<3>) -> Tensor<3>| {
                let x = x.clone().detach().require_grad();
                let y = f(x.clone());
                let grads = (y.clone() * upstream.clone()).sum().backward();
                (y, x.grad(&grads).unwrap())
            };
            let (y, dx) = run(&|x| l2_normalize(x, axis));
            let (y_c, dx_c) = run(&|x| composite_forward(x, axis).0);
            assert!(
                y.clone().is_finite().all().into_scalar::<bool>(),
                "axis {axis}"
            );
            assert_same(y.clone(), y_c, tolerance);
            assert_same(dx.clone(), dx_c, tolerance);
            let (_, d) = composite_forward(x.clone().inner(), axis);
            let closed = closed_form_backward(y.inner(), d, upstream.clone().inner(), axis);
            assert_same(dx.inner(), closed, tolerance);
        }
        let flat = x.clone().reshape([3, 20]);
        assert_same(
            l2_normalize(flat.clone(), 1),
            composite_forward(flat, 1).0,
            tolerance,
        );
    }

    /// A NaN poisons its own vector only.
    #[test]
    fn nan_stays_in_its_vector() {
        let device = seeded_autodiff(6);
        let x = Tensor::<2>::from_floats([[1.0, f32::NAN, 2.0], [3.0, 4.0, 0.0]], &device);
        let y = l2_normalize(x, 1).to_data().to_vec::<f32>().unwrap();
        assert!(y[..3].iter().all(|v| v.is_nan()), "{y:?}");
        assert_eq!(&y[3..], &[0.6, 0.8, 0.0]);
    }
}
