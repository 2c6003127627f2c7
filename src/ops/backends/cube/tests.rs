//! Each CubeCL kernel against the portable body it replaces, on the wgpu device (lavapipe
//! without a GPU).

use burn::backend::Cube;
use burn::backend::tensor::FloatTensor;
use burn::tensor::{Device, DeviceKind, Tensor, TensorData};

use super::tensors::kernels_apply;
use crate::layout::Layout;
use crate::ops::{PoolingOps, portable};

const EPS: f64 = 1e-6;
const TOLERANCE: f64 = 1e-5;

fn device() -> Device {
    Device::wgpu(DeviceKind::DefaultDevice)
}

fn primitive<const D: usize>(values: &[f32], shape: [usize; D]) -> FloatTensor<Cube> {
    Tensor::<D>::from_data(TensorData::new(values.to_vec(), shape), &device())
        .try_into_primitive::<Cube>()
        .expect("a wgpu tensor")
}

fn read<const D: usize>(tensor: FloatTensor<Cube>) -> Vec<f32> {
    Tensor::<D>::from_primitive::<Cube>(tensor)
        .into_data()
        .to_vec::<f32>()
        .expect("f32 values")
}

/// A deterministic spread of values in [-0.5, 3), a fifth of them at or below ε.
fn features(len: usize) -> Vec<f32> {
    let mut state = 0x2545_f491_u32;
    (0..len)
        .map(|i| {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            match i % 5 {
                0 => [-0.3, 0.0, 1e-9, EPS as f32][i / 5 % 4],
                _ => (state >> 8) as f32 / (1 << 24) as f32 * 3.5 - 0.5,
            }
        })
        .collect()
}

/// Three samples of 49 positions: all valid; padded positions, one of them holding the
/// largest value of its sample; and only positions whose values are all below ε valid.
fn mask_and_features(
    channels: usize,
    layout: Layout,
) -> (Vec<f32>, Vec<f32>, [usize; 3], [usize; 2]) {
    let (batch, positions) = (3, 49);
    let mut x = features(batch * channels * positions);
    let index = |b: usize, c: usize, n: usize| {
        if layout.is_channels_last() {
            (b * positions + n) * channels + c
        } else {
            (b * channels + c) * positions + n
        }
    };
    let mut mask = vec![1.0f32; batch * positions];
    for n in (0..positions).step_by(3) {
        mask[positions + n] = 0.0;
    }
    for c in 0..channels {
        x[index(1, c, 0)] = 50.0; // padded: must not raise the maximum
    }
    for n in 0..positions {
        let valid = n % 7 == 0;
        mask[2 * positions + n] = if valid { 1.0 } else { 0.0 };
        for c in 0..channels {
            if valid {
                x[index(2, c, n)] = [-1.0, 0.0, 1e-8, 5e-7][(n + c) % 4];
            }
        }
    }
    let shape = if layout.is_channels_last() {
        [batch, positions, channels]
    } else {
        [batch, channels, positions]
    };
    (x, mask, shape, [batch, positions])
}

/// The largest absolute and relative differences; panics past the tolerance or on a
/// non-finite value.
fn compare(label: &str, kernel: &[f32], reference: &[f32]) -> (f64, f64) {
    assert_eq!(kernel.len(), reference.len(), "{label}");
    let (mut worst_abs, mut worst_rel) = (0.0f64, 0.0f64);
    for (i, (&k, &r)) in kernel.iter().zip(reference).enumerate() {
        let (k, r) = (k as f64, r as f64);
        assert!(k.is_finite() && r.is_finite(), "{label}[{i}]: {k} vs {r}");
        let abs = (k - r).abs();
        let rel = abs / r.abs().max(f64::MIN_POSITIVE);
        assert!(
            abs <= TOLERANCE * r.abs().max(1.0),
            "{label}[{i}]: kernel {k}, portable {r}"
        );
        worst_abs = worst_abs.max(abs);
        worst_rel = worst_rel.max(rel);
    }
    eprintln!("{label}: max |Δ| = {worst_abs:e}, max |Δ|/|y| = {worst_rel:e}");
    (worst_abs, worst_rel)
}

#[test]
fn generalized_mean_kernel_matches_portable() {
    assert!(kernels_apply(), "Cube's primitive is not a CubeTensor");
    let powers = [1.0f32, 3.0, 0.5, 1000.0, 7.5, 2.0];
    for layout in [Layout::ChannelsFirst, Layout::ChannelsLast] {
        let (x, mask, shape, mask_shape) = mask_and_features(powers.len(), layout);
        let inputs = || {
            (
                primitive(&x, shape),
                primitive(&powers, [powers.len()]),
                primitive(&mask, mask_shape),
            )
        };
        let (xs, ps, ms) = inputs();
        let kernel = read::<2>(<Cube as PoolingOps>::generalized_mean(
            xs, ps, ms, EPS, layout,
        ));
        let (xs, ps, ms) = inputs();
        let reference = read::<2>(portable::generalized_mean::<Cube>(xs, ps, ms, EPS, layout));
        // The all-below-ε sample pools to ε; the padded 50 is not its sample's maximum.
        let near_eps = |y: f32| (y as f64 - EPS).abs() <= TOLERANCE * EPS;
        assert!(kernel[2 * powers.len()..].iter().all(|&y| near_eps(y)));
        assert!(
            kernel[powers.len()..2 * powers.len()]
                .iter()
                .all(|&y| y < 3.0)
        );
        let label = format!("generalized mean ({layout:?})");
        compare(&label, &kernel, &reference);
    }
}

#[test]
fn weighted_sum_kernel_matches_portable() {
    assert!(kernels_apply(), "Cube's primitive is not a CubeTensor");
    for layout in [Layout::ChannelsFirst, Layout::ChannelsLast] {
        let (x, mask, shape, mask_shape) = mask_and_features(6, layout);
        // Uneven weights, 0 on the padded positions.
        let weights: Vec<f32> = mask
            .iter()
            .enumerate()
            .map(|(i, &m)| m * (1.0 + (i % 7) as f32 / 10.0))
            .collect();
        let kernel = read::<2>(<Cube as PoolingOps>::weighted_sum(
            primitive(&x, shape),
            primitive(&weights, mask_shape),
            layout,
        ));
        let reference = read::<2>(portable::weighted_sum::<Cube>(
            primitive(&x, shape),
            primitive(&weights, mask_shape),
            layout,
        ));
        let label = format!("weighted sum ({layout:?})");
        compare(&label, &kernel, &reference);
    }
}
/// A deterministic upstream gradient in [-1, 1).
fn upstream(len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 37 % 101) as f32 / 50.5) - 1.0)
        .collect()
}

#[test]
fn generalized_mean_backward_kernel_matches_portable() {
    assert!(kernels_apply(), "Cube's primitive is not a CubeTensor");
    let powers = [1.0f32, 3.0, 0.5, 1000.0, 7.5, 2.0];
    let channels = powers.len();
    for layout in [Layout::ChannelsFirst, Layout::ChannelsLast] {
        let (x, mask, shape, mask_shape) = mask_and_features(channels, layout);
        let grad = upstream(shape[0] * channels);
        let output = read::<2>(portable::generalized_mean::<Cube>(
            primitive(&x, shape),
            primitive(&powers, [channels]),
            primitive(&mask, mask_shape),
            EPS,
            layout,
        ));
        let inputs = || {
            (
                primitive(&x, shape),
                primitive(&powers, [channels]),
                primitive(&mask, mask_shape),
                primitive(&output, [shape[0], channels]),
                primitive(&grad, [shape[0], channels]),
            )
        };
        let (xs, ps, ms, ys, gs) = inputs();
        let (kernel_dx, kernel_dp) =
            <Cube as PoolingOps>::generalized_mean_backward(xs, ps, ms, ys, gs, EPS, layout);
        let (xs, ps, ms, ys, gs) = inputs();
        let (reference_dx, reference_dp) =
            portable::generalized_mean_backward::<Cube>(xs, ps, ms, ys, gs, EPS, layout);
        let kernel_dx = read::<3>(kernel_dx);
        // Padded positions and values at or below ε get no gradient.
        for (i, (&dx, &v)) in kernel_dx.iter().zip(&x).enumerate() {
            let n = if layout.is_channels_last() {
                i / channels % shape[1]
            } else {
                i % shape[2]
            };
            let b = i / (shape[1] * shape[2]);
            if mask[b * mask_shape[1] + n] == 0.0 || v as f64 <= EPS {
                assert_eq!(dx, 0.0, "dx[{i}] of a padded or clamped value");
            }
        }
        let label = format!("generalized mean backward ({layout:?})");
        compare(
            &format!("{label}: dx"),
            &kernel_dx,
            &read::<3>(reference_dx),
        );
        compare(
            &format!("{label}: dp"),
            &read::<1>(kernel_dp),
            &read::<1>(reference_dp),
        );
    }
}

#[test]
fn weighted_sum_weights_backward_kernel_matches_portable() {
    assert!(kernels_apply(), "Cube's primitive is not a CubeTensor");
    let channels = 6;
    for layout in [Layout::ChannelsFirst, Layout::ChannelsLast] {
        let (x, _, shape, _) = mask_and_features(channels, layout);
        let grad = upstream(shape[0] * channels);
        let run = |kernel: bool| {
            let (xs, gs) = (primitive(&x, shape), primitive(&grad, [shape[0], channels]));
            read::<2>(if kernel {
                <Cube as PoolingOps>::weighted_sum_weights_backward(xs, gs, layout)
            } else {
                portable::weighted_sum_weights_backward::<Cube>(xs, gs, layout)
            })
        };
        let label = format!("weighted sum backward: weights ({layout:?})");
        compare(&label, &run(true), &run(false));
    }
}
