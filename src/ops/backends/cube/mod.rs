//! [`PoolingOps`] for the CubeCL backend (`Cube`: the wgpu device in this crate): the generalized
//! mean of GeM/GGeM (forward and backward) and the weighted sum of GAP and GSP (forward and its
//! weights' gradient) as CubeCL kernels. The portable bodies run these as a chain of
//! element-wise kernels and reductions with several `[B, C, N]` intermediates; a kernel here
//! reads the input once or twice and writes only its result. One unit per (b, c) (or per
//! (b, n) for the weights' gradient) loops over the other axis, which is short (the tokens or
//! the cells of a feature map; the channels), reading `x` through its strides, so both layouts
//! take the same kernel.
//!
//! The kernels are generic over the float type (the floor ε is raised to the dtype's smallest
//! normal value). The transport ops and the features' gradient of the weighted sum (already one
//! broadcast product) use the portable bodies, and so does every op when Burn's `fusion`
//! feature (a default of `burn-wgpu`) wraps the backend: `Cube` is then `Fusion<CubeBackend>`,
//! whose lazy tensors are not CubeCL buffers yet.

mod generalized_mean;
mod tensors;
#[cfg(test)]
mod tests;
mod weighted_sum;

use burn::backend::Cube;
use burn::backend::ops::FloatTensorOps;
use burn::backend::tensor::FloatTensor;
use burn::tensor::Shape;

use generalized_mean::{launch_generalized_mean, launch_generalized_mean_backward};
use tensors::{cube_tensors, from_cube};
use weighted_sum::launch_contraction;

use crate::layout::Layout;
use crate::ops::{PoolingOps, portable};

/// The float primitive of the impl below.
type Float = FloatTensor<Cube>;

impl PoolingOps for Cube {
    fn generalized_mean(x: Float, powers: Float, mask: Float, eps: f64, layout: Layout) -> Float {
        match cube_tensors([x, powers, mask]) {
            Ok([x, powers, mask]) => {
                from_cube(launch_generalized_mean(x, powers, mask, eps, layout))
            }
            Err([x, powers, mask]) => {
                portable::generalized_mean::<Self>(x, powers, mask, eps, layout)
            }
        }
    }

    fn generalized_mean_backward(
        x: Float,
        powers: Float,
        mask: Float,
        output: Float,
        grad: Float,
        eps: f64,
        layout: Layout,
    ) -> (Float, Float) {
        match cube_tensors([x, powers, mask, output, grad]) {
            Ok([x, powers, mask, output, grad]) => {
                let channels = powers.meta.shape()[0];
                let (dx, dp_per_sample) =
                    launch_generalized_mean_backward(x, powers, mask, output, grad, eps, layout);
                // ∂L/∂p sums the samples' terms: a `[B, C]` → `[C]` reduction.
                let dp = Self::float_sum_dim(from_cube(dp_per_sample), 0);
                (
                    from_cube(dx),
                    Self::float_reshape(dp, Shape::new([channels])),
                )
            }
            Err([x, powers, mask, output, grad]) => portable::generalized_mean_backward::<Self>(
                x, powers, mask, output, grad, eps, layout,
            ),
        }
    }

    fn weighted_sum(x: Float, weights: Float, layout: Layout) -> Float {
        match cube_tensors([x, weights]) {
            Ok([x, weights]) => {
                let (positions, channels) = (layout.position_axis(), layout.channel_axis());
                from_cube(launch_contraction(x, weights, channels, positions))
            }
            Err([x, weights]) => portable::weighted_sum::<Self>(x, weights, layout),
        }
    }

    fn weighted_sum_weights_backward(x: Float, grad: Float, layout: Layout) -> Float {
        match cube_tensors([x, grad]) {
            Ok([x, grad]) => {
                let (positions, channels) = (layout.position_axis(), layout.channel_axis());
                from_cube(launch_contraction(x, grad, positions, channels))
            }
            Err([x, grad]) => portable::weighted_sum_weights_backward::<Self>(x, grad, layout),
        }
    }
}
