//! GSP's cost matrix c_kj = ‖φ(ω_k) − φ(x_j)‖₂ and its closed-form backward, fused per sample:
//! the normalisation φ(v) = v / max(1, ‖v‖) is folded into per-position scales instead of
//! materialising normalised features, the cross products are one matrix product per sample
//! written straight into the `[K, N]` layout the solver reads, and the backward is two
//! products per sample plus two element-wise passes (no autodiff of the normalisation).

use std::borrow::Cow;

use rayon::prelude::*;

use super::Shape3;
use super::product::{Strided, product};
use super::real::{Real, dot, lane_sum};
use super::simd::wide_kernel;
use crate::layout::Layout;
use crate::maths::costs::{MIN_ACTIVE_COST, MIN_SQUARED_DISTANCE};

/// Sample groups of the backward's prototype-gradient reduction (at most; fewer for B < 16).
const GROUPS: usize = 16;

/// Per vector: s = 1 / max(1, ‖v‖) and ‖v‖².
struct Scales<T> {
    scale: Vec<T>,
    squared_norm: Vec<T>,
}

/// Scales of the positions of one sample (`[N, C]` or `[C, N]`).
#[inline(always)]
fn position_scales<T: Real>(x: &[T], shape: Shape3) -> Scales<T> {
    let (n, c) = (shape.positions, shape.channels);
    let squared_norm: Vec<T> = if shape.layout.is_channels_last() {
        x.chunks_exact(c).map(|row| dot(row, row)).collect()
    } else {
        let mut sums = vec![T::default(); n];
        for row in x.chunks_exact(n) {
            for (s, &v) in sums.iter_mut().zip(row) {
                *s += v * v;
            }
        }
        sums
    };
    scales_from_norms(squared_norm)
}

impl<T: Real> Scales<T> {
    /// ‖φ(v)‖² = s² ‖v‖² per vector.
    fn normalized_squares(&self) -> Vec<T> {
        self.squared_norm
            .iter()
            .zip(&self.scale)
            .map(|(&q, &s)| q * s * s)
            .collect()
    }
}

#[inline(always)]
fn scales_from_norms<T: Real>(squared_norm: Vec<T>) -> Scales<T> {
    let one = T::from_f64(1.0);
    let scale = squared_norm
        .iter()
        .map(|&q| one / q.max(one).sqrt())
        .collect();
    Scales {
        scale,
        squared_norm,
    }
}

/// A copy of a sample's features with its huge vectors rescaled, and (vector, factor) of each.
type Rescaled<T> = (Vec<T>, Vec<(usize, T)>);

/// Squared norms above this (or not a number) take [`rescale_huge`]: below it s = 1/‖v‖ ≥ 2⁻³⁰
/// and the backward's s³ ≥ 2⁻⁹⁰ stay normal f32 numbers, and no product with v overflows.
const HUGE_SQUARED_NORM: f64 = 1_152_921_504_606_846_976.0; // 2⁶⁰

/// A copy of `x` (`[N, C]` or `[C, N]` in `shape`'s layout) in which each vector whose squared
/// norm is above [`HUGE_SQUARED_NORM`] (or not a number) is multiplied by the power of two
/// that brings its largest entry to [2¹⁰, 2¹¹), with those factors; `None` when there is no
/// such vector (the usual case: no copy). Both vectors lie outside the unit ball, so φ is the
/// same (φ(cv) = φ(v)), and φ's Jacobian at v is c times its Jacobian at cv: the kernels run
/// on the copy, in the range where they are exact, and scale the gradients back. Exact: a
/// power of two changes no mantissa.
fn rescale_huge<T: Real>(x: &[T], squared_norms: &[T], shape: Shape3) -> Option<Rescaled<T>> {
    let limit = T::from_f64(HUGE_SQUARED_NORM);
    // Not `q > limit`: a NaN norm takes this path too.
    let huge = |q: T| q.partial_cmp(&limit).is_none_or(|order| order.is_gt());
    if !squared_norms.iter().any(|&q| huge(q)) {
        return None;
    }
    let (n, c) = (shape.positions, shape.channels);
    let index = |j: usize, ch: usize| {
        if shape.layout.is_channels_last() {
            j * c + ch
        } else {
            ch * n + j
        }
    };
    let mut copy = x.to_vec();
    let mut factors = Vec::new();
    for (j, &q) in squared_norms.iter().enumerate() {
        if !huge(q) {
            continue;
        }
        let largest = (0..c)
            .map(|ch| x[index(j, ch)].to_f64().abs())
            .fold(0.0, f64::max);
        // ∞ gives the factor 0 and NaN entries, as φ(∞) is undefined: the NaN propagates.
        let factor = T::from_f64((10.0 - largest.log2().floor()).exp2());
        for ch in 0..c {
            copy[index(j, ch)] = copy[index(j, ch)] * factor;
        }
        factors.push((j, factor));
    }
    Some((copy, factors))
}

/// The prototypes as the kernels use them: `raw` `[K, C]` (a rescaled copy if a row is huge,
/// see [`rescale_huge`]), φ(ω) and the scales, and the factors of the rescaled rows.
struct Prototypes<'a, T: Clone> {
    raw: Cow<'a, [T]>,
    normalized: Vec<T>,
    scales: Scales<T>,
    factors: Vec<(usize, T)>,
}

/// φ(ω) `[K, C]` and the prototypes' scales.
fn normalized_prototypes<T: Real>(prototypes: &[T], channels: usize) -> Prototypes<'_, T> {
    let squared = |rows: &[T]| -> Vec<T> {
        rows.chunks_exact(channels)
            .map(|row| dot(row, row))
            .collect()
    };
    let norms = squared(prototypes);
    let count = norms.len();
    let shape = Shape3 {
        batch: 1,
        positions: count,
        channels,
        layout: Layout::ChannelsLast,
    };
    let (raw, norms, factors) = match rescale_huge(prototypes, &norms, shape) {
        Some((copy, factors)) => {
            let norms = squared(&copy);
            (Cow::Owned(copy), norms, factors)
        }
        None => (Cow::Borrowed(prototypes), norms, Vec::new()),
    };
    let scales = scales_from_norms(norms);
    let mut normalized = raw.to_vec();
    for (row, &s) in normalized.chunks_exact_mut(channels).zip(&scales.scale) {
        row.iter_mut().for_each(|v| *v = *v * s);
    }
    Prototypes {
        raw,
        normalized,
        scales,
        factors,
    }
}

/// One sample's features as the `[C, N]` right operand (column j = position j).
fn features_by_column<T>(x: &[T], shape: Shape3) -> Strided<'_, T> {
    if shape.layout.is_channels_last() {
        Strided::transposed(x, shape.channels)
    } else {
        Strided::rows(x, shape.positions)
    }
}

/// One sample's features as the `[N, C]` operand (row j = position j).
fn features_by_row<T>(x: &[T], shape: Shape3) -> Strided<'_, T> {
    if shape.layout.is_channels_last() {
        Strided::rows(x, shape.channels)
    } else {
        Strided::transposed(x, shape.positions)
    }
}

/// Costs `[B, K, N]`.
pub(super) fn forward<T: Real>(x: &[T], prototypes: &[T], count: usize, shape: Shape3) -> Vec<T> {
    let (n, c) = (shape.positions, shape.channels);
    let prototypes = normalized_prototypes(prototypes, c);
    let (normalized, prototype_squares) = (
        &prototypes.normalized,
        prototypes.scales.normalized_squares(),
    );
    let mut costs = vec![T::default(); shape.batch * count * n];
    costs
        .par_chunks_mut(count * n)
        .enumerate()
        .for_each(|(b, costs)| {
            let x = &x[b * n * c..(b + 1) * n * c];
            forward_sample_wide(x, normalized, &prototype_squares, shape, costs);
        });
    costs
}

/// (∂L/∂x in `x`'s layout, ∂L/∂prototypes `[K, C]`) from the costs and ∂L/∂costs.
///
/// With a_kj = (∂L/∂c_kj) / c_kj: ∂L/∂φ(x_j) = φ(x_j) Σ_k a_kj − Σ_k a_kj φ(ω_k) and
/// ∂L/∂φ(ω_k) = φ(ω_k) Σ_j a_kj − Σ_j a_kj φ(x_j), then φ's Jacobian
/// g ↦ s g − s³ ⟨v, g⟩ v where ‖v‖ > 1 (s = 1/‖v‖), the identity elsewhere.
pub(super) fn backward<T: Real>(
    x: &[T],
    prototypes: &[T],
    costs: &[T],
    grad: &[T],
    count: usize,
    shape: Shape3,
) -> (Vec<T>, Vec<T>) {
    let (n, c) = (shape.positions, shape.channels);
    let zero = T::default();
    let one = T::from_f64(1.0);
    let prototypes = normalized_prototypes(prototypes, c);
    let normalized = &prototypes.normalized;
    let mut dx = vec![zero; x.len()];
    // Per group of samples: Σ_b Σ_j a_kj φ(x_j) `[K, C]` and Σ_b Σ_j a_kj `[K]`. The groups
    // depend on B only, and their partial sums are added in order, so the prototypes' gradient
    // does not change from run to run with the threads' scheduling.
    let group = shape.batch.div_ceil(GROUPS).max(1);
    let partials: Vec<(Vec<T>, Vec<T>)> = dx
        .par_chunks_mut(group * n * c)
        .enumerate()
        .map(|(g, dx)| {
            let mut cross = vec![zero; count * c];
            let mut row_sums = vec![zero; count];
            for (i, dx) in dx.chunks_exact_mut(n * c).enumerate() {
                let b = g * group + i;
                let x = &x[b * n * c..(b + 1) * n * c];
                let costs = &costs[b * count * n..(b + 1) * count * n];
                let grad = &grad[b * count * n..(b + 1) * count * n];
                backward_sample_wide(
                    x,
                    costs,
                    grad,
                    normalized,
                    shape,
                    dx,
                    &mut cross,
                    &mut row_sums,
                );
            }
            (cross, row_sums)
        })
        .collect();
    let mut cross = vec![zero; count * c];
    let mut row_sums = vec![zero; count];
    for (group_cross, group_sums) in &partials {
        cross
            .iter_mut()
            .zip(group_cross)
            .for_each(|(a, &b)| *a += b);
        row_sums
            .iter_mut()
            .zip(group_sums)
            .for_each(|(a, &b)| *a += b);
    }
    // ∂L/∂φ(ω_k) = φ(ω_k) Σ a_k· − cross_k, then φ's Jacobian per prototype.
    let mut dprototypes = vec![zero; count * c];
    for (k, d) in dprototypes.chunks_exact_mut(c).enumerate() {
        let range = k * c..(k + 1) * c;
        let (z, z_hat) = (&prototypes.raw[range.clone()], &normalized[range.clone()]);
        let g: Vec<T> = z_hat
            .iter()
            .zip(&cross[range])
            .map(|(&v, &cr)| v * row_sums[k] - cr)
            .collect();
        let s = prototypes.scales.scale[k];
        let coefficient = if s < one {
            s * s * s * dot(z, &g)
        } else {
            zero
        };
        for ((d, &g), &v) in d.iter_mut().zip(&g).zip(z) {
            *d = s * g - coefficient * v;
        }
    }
    // Rescaled rows: φ's Jacobian at ω is the factor times its Jacobian at the copy.
    for &(k, factor) in &prototypes.factors {
        for d in &mut dprototypes[k * c..(k + 1) * c] {
            *d = *d * factor;
        }
    }
    (dx, dprototypes)
}

wide_kernel! {
/// One sample's costs `[K, N]` from its features and the normalised prototypes `[K, C]` with
/// their squared norms.
fn forward_sample<T: Real>(
    x: &[T],
    normalized: &[T],
    prototype_squares: &[T],
    shape: Shape3,
    costs: &mut [T],
) {
    let (n, c) = (shape.positions, shape.channels);
    let count = prototype_squares.len();
    let floor = T::from_f64(MIN_SQUARED_DISTANCE);
    let two = T::from_f64(2.0);
    let scales = position_scales(x, shape);
    let rescaled = rescale_huge(x, &scales.squared_norm, shape);
    let (x, scales) = match &rescaled {
        Some((copy, _)) => (copy.as_slice(), position_scales(copy, shape)),
        None => (x, scales),
    };
    // ⟨φ(ω_k), x_j⟩ for all k, j: [K, C] · [C, N].
    product(
        [count, n, c],
        costs,
        (n, 1),
        false,
        Strided::rows(normalized, c),
        features_by_column(x, shape),
        T::from_f64(1.0),
    );
    let feature_squares = scales.normalized_squares();
    for (row, &prototype_square) in costs.chunks_exact_mut(n).zip(prototype_squares) {
        for ((cost, &feature_square), &s) in row.iter_mut().zip(&feature_squares).zip(&scales.scale)
        {
            let squared = prototype_square + feature_square - two * s * *cost;
            // Not `max`, which drops a NaN: a NaN feature keeps NaN costs, so the solve sees
            // it and reports `converged = false`.
            *cost = if squared < floor { floor } else { squared }.sqrt();
        }
    }
}
=> forward_sample_wide
}

wide_kernel! {
/// One sample of [`backward`]: writes its ∂L/∂x into `dx` and adds its Σ_j a_kj φ(x_j)
/// `[K, C]` and Σ_j a_kj `[K]` into `cross` and `row_sums`.
fn backward_sample<T: Real>(
    x: &[T],
    costs: &[T],
    grad: &[T],
    normalized: &[T],
    shape: Shape3,
    dx: &mut [T],
    cross: &mut [T],
    row_sums: &mut [T],
) {
    let (n, c) = (shape.positions, shape.channels);
    let count = row_sums.len();
    let zero = T::default();
    let scales = position_scales(x, shape);
    let rescaled = rescale_huge(x, &scales.squared_norm, shape);
    let (x, scales) = match &rescaled {
        Some((copy, _)) => (copy.as_slice(), position_scales(copy, shape)),
        None => (x, scales),
    };
    let active = T::from_f64(MIN_ACTIVE_COST);
    let mut a: Vec<T> = costs
        .iter()
        .zip(grad)
        .map(|(&cost, &g)| if cost > active { g / cost } else { zero })
        .collect();
    let mut column_sums = vec![zero; n];
    for (row, total) in a.chunks_exact(n).zip(row_sums.iter_mut()) {
        for (s, &v) in column_sums.iter_mut().zip(row) {
            *s += v;
        }
        *total += lane_sum(n, |j| row[j]);
    }
    // −Σ_k a_kj φ(ω_k) for all j: [N, K] · [K, C], into ∂L/∂x's layout.
    let out_strides = if shape.layout.is_channels_last() {
        (c, 1)
    } else {
        (1, n)
    };
    product(
        [n, c, count],
        dx,
        out_strides,
        false,
        Strided::transposed(&a, n),
        Strided::rows(normalized, c),
        T::from_f64(-1.0),
    );
    // Then + s_j x_j Σ_k a_kj, and φ's Jacobian.
    let position_factor: Vec<T> = column_sums
        .iter()
        .zip(&scales.scale)
        .map(|(&sum, &s)| sum * s)
        .collect();
    normalize_backward(x, dx, &position_factor, &scales, shape);
    // Σ_j a_kj s_j x_j: [K, N] · [N, C], summed into the thread's total.
    for row in a.chunks_exact_mut(n) {
        for (v, &s) in row.iter_mut().zip(&scales.scale) {
            *v = *v * s;
        }
    }
    product(
        [count, c, n],
        cross,
        (c, 1),
        true,
        Strided::rows(&a, n),
        features_by_row(x, shape),
        T::from_f64(1.0),
    );
    // Rescaled positions: φ's Jacobian at x_j is the factor times its Jacobian at the copy.
    if let Some((_, factors)) = &rescaled {
        for &(j, factor) in factors {
            for ch in 0..c {
                let at = if shape.layout.is_channels_last() {
                    j * c + ch
                } else {
                    ch * n + j
                };
                dx[at] = dx[at] * factor;
            }
        }
    }
}
=> backward_sample_wide
}

/// In place on one sample's `dx` (holding −Σ_k a_kj φ(ω_k)): adds `factor_j · x_j` to get
/// g_j = ∂L/∂φ(x_j), then applies φ's Jacobian g ↦ s g − s³ ⟨x, g⟩ x where ‖x_j‖ > 1.
#[inline(always)]
fn normalize_backward<T: Real>(
    x: &[T],
    dx: &mut [T],
    factor: &[T],
    scales: &Scales<T>,
    shape: Shape3,
) {
    let (n, c) = (shape.positions, shape.channels);
    let one = T::from_f64(1.0);
    let zero = T::default();
    let coefficient = |j: usize, dot: T| {
        let s = scales.scale[j];
        if s < one { s * s * s * dot } else { zero }
    };
    if shape.layout.is_channels_last() {
        for (j, (d, v)) in dx.chunks_exact_mut(c).zip(x.chunks_exact(c)).enumerate() {
            for (d, &v) in d.iter_mut().zip(v) {
                *d += factor[j] * v;
            }
            let t = coefficient(j, dot(v, d));
            let s = scales.scale[j];
            for (d, &v) in d.iter_mut().zip(v) {
                *d = s * *d - t * v;
            }
        }
    } else {
        let mut dots = vec![zero; n];
        for (d, v) in dx.chunks_exact_mut(n).zip(x.chunks_exact(n)) {
            for ((d, &v), (dot, &f)) in d.iter_mut().zip(v).zip(dots.iter_mut().zip(factor)) {
                *d += f * v;
                *dot += v * *d;
            }
        }
        let t: Vec<T> = dots
            .iter()
            .enumerate()
            .map(|(j, &dot)| coefficient(j, dot))
            .collect();
        for (d, v) in dx.chunks_exact_mut(n).zip(x.chunks_exact(n)) {
            for (((d, &v), &t), &s) in d.iter_mut().zip(v).zip(&t).zip(&scales.scale) {
                *d = s * *d - t * v;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::backends::flex::simd::check::{agree, values};

    /// The copy chosen at run time and the baseline build give the same costs and gradients.
    #[test]
    fn wide_copy_matches_baseline() {
        let (n, c, k) = (9, 12, 4);
        let prototypes = values(k * c, 7, -0.5, 0.5);
        let prototypes = normalized_prototypes(&prototypes, c);
        let (normalized, squares) = (
            prototypes.normalized,
            prototypes.scales.normalized_squares(),
        );
        let x = values(n * c, 8, -0.6, 0.6);
        let grad = values(k * n, 9, -1.0, 1.0);
        for layout in [Layout::ChannelsFirst, Layout::ChannelsLast] {
            let shape = Shape3::one_sample(n, c, layout);
            let (mut wide, mut base) = (vec![0.0; k * n], vec![0.0; k * n]);
            forward_sample_wide(&x, &normalized, &squares, shape, &mut wide);
            forward_sample(&x, &normalized, &squares, shape, &mut base);
            agree("costs", &wide, &base);
            let mut out_wide = (vec![0.0; n * c], vec![0.0; k * c], vec![0.0; k]);
            let mut out_base = (vec![0.0; n * c], vec![0.0; k * c], vec![0.0; k]);
            let (dx, cross, sums) = (&mut out_wide.0, &mut out_wide.1, &mut out_wide.2);
            backward_sample_wide(&x, &base, &grad, &normalized, shape, dx, cross, sums);
            let (dx, cross, sums) = (&mut out_base.0, &mut out_base.1, &mut out_base.2);
            backward_sample(&x, &base, &grad, &normalized, shape, dx, cross, sums);
            agree("dx", &out_wide.0, &out_base.0);
            agree("cross", &out_wide.1, &out_base.1);
            agree("row sums", &out_wide.2, &out_base.2);
        }
    }
}

/// The fused kernel and its backward against the reference composites.
#[cfg(all(test, feature = "autodiff"))]
mod against_composite {
    use std::sync::atomic::Ordering;

    use burn::tensor::{Distribution, Tensor, Tolerance};

    use super::super::simd::check::{assert_same, seeded_autodiff};
    use crate::layout::Layout;
    use crate::maths::costs::{composite_costs, costs_gradient};
    use crate::ops::BACKWARD_CALLS;
    use crate::ops::routing::transport_costs;

    /// The fused Flex kernel and its backward against the composite form under autodiff and
    /// against the closed-form `costs_gradient`, both layouts, with features and prototypes
    /// inside and outside the unit ball and one position equal to a prototype (its distance
    /// is clamped, so its gradient is 0).
    #[test]
    fn fused_kernel_matches_composite_paths() {
        let device = seeded_autodiff(4);
        let (b, n, c, k) = (3, 7, 6, 4);
        let prototypes = Tensor::<2>::random([k, c], Distribution::Uniform(-0.6, 0.6), &device);
        // Prototype 0 outside the unit ball.
        let prototypes = prototypes.slice_fill([0..1, 0..c], 0.9);
        for layout in [Layout::ChannelsFirst, Layout::ChannelsLast] {
            let shape = layout.dims(b, n, c);
            // Rows of either norm: values up to 0.8 give norms on both sides of 1.
            let x = Tensor::<3>::random(shape, Distribution::Uniform(-0.8, 0.8), &device);
            // Position 0 of sample 0 equal to prototype 1 (inside the ball).
            let copy = prototypes.clone().slice([1..2, 0..c]);
            let x = match layout {
                Layout::ChannelsLast => x.slice_assign([0..1, 0..1, 0..c], copy.unsqueeze_dim(0)),
                Layout::ChannelsFirst => {
                    x.slice_assign([0..1, 0..c, 0..1], copy.transpose().unsqueeze_dim(0))
                }
            };
            let weights = Tensor::<3>::random([b, k, n], Distribution::Uniform(-1.0, 1.0), &device);

            // c, ∂L/∂x and ∂L/∂ω of L = Σ weights ⊙ c, for c the kernel's or the composite's.
            let differentiate = |costs: fn(Tensor<3>, Tensor<2>, Layout) -> Tensor<3>| {
                let (x, w) = (x.clone().require_grad(), prototypes.clone().require_grad());
                let c = costs(x.clone(), w.clone(), layout);
                let grads = (c.clone() * weights.clone()).sum().backward();
                (c, x.grad(&grads).unwrap(), w.grad(&grads).unwrap())
            };
            let before = BACKWARD_CALLS::COSTS.load(Ordering::SeqCst);
            let (fused, fused_dx, fused_dp) = differentiate(transport_costs);
            assert!(BACKWARD_CALLS::COSTS.load(Ordering::SeqCst) > before);
            let (composite, composite_dx, composite_dp) = differentiate(composite_costs);
            let tolerance = Tolerance::rel_abs(1e-4, 1e-5);
            assert_same(fused.clone(), composite, tolerance);
            let cost = fused.clone().slice([0..1, 1..2, 0..1]).into_scalar::<f32>();
            // In f32 the squared distance cancels to within rounding, not necessarily to 0.
            assert!(cost < 1e-3, "a position equal to a prototype costs {cost}");
            assert_same(fused_dx.clone(), composite_dx, tolerance);
            assert_same(fused_dp.clone(), composite_dp, tolerance);

            let (closed_dx, closed_dp) = costs_gradient(
                x.inner(),
                prototypes.clone().inner(),
                fused.inner(),
                weights.inner(),
                layout,
            );
            assert_same(closed_dx, fused_dx, tolerance);
            assert_same(closed_dp, fused_dp, tolerance);
        }
    }
}
