//! The weighted sum of GAP and GSP and its weights' gradient as one CubeCL contraction kernel.

use burn::tensor::Shape;
use burn_cubecl::cubecl;
use burn_cubecl::cubecl::prelude::*;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;

use super::strided::{Strided, unit_position};
use super::tensors::{Launch, empty_like};

/// `out[b, i] = Σ_j v[b, j] x[b, ·, ·]` with i on `x`'s axis `kept` and j on its axis
/// `summed`: the weighted sum (kept = channels, summed = positions, v = the weights) and its
/// weights' gradient (kept = positions, summed = channels, v = ∂L/∂output).
pub(super) fn launch_contraction(
    x: CubeTensor,
    vector: CubeTensor,
    kept: usize,
    summed: usize,
) -> CubeTensor {
    let [x, vector] = [x, vector].map(into_contiguous);
    let dims = x.meta.shape();
    let (batch, length) = (dims[0], dims[kept]);
    let output = empty_like(&x, Shape::new([batch, length]));
    let launch = Launch::per_element(&x, batch * length);
    contraction_kernel::launch(
        &launch.client,
        launch.count,
        launch.dim,
        x.into_tensor_arg(),
        vector.into_tensor_arg(),
        output.clone().into_tensor_arg(),
        kept,
        summed,
        launch.dtype,
    );
    output
}

/// `out[b, i] = Σ_j v[b, j] x[b, ·, ·]`, i on `x`'s axis `kept`, j on its axis `summed`
/// (see [`launch_contraction`]).
#[cube(launch)]
fn contraction_kernel<F: Float>(
    x: &Tensor<F>,
    vector: &Tensor<F>,
    output: &mut Tensor<F>,
    #[comptime] kept: usize,
    #[comptime] summed: usize,
    #[define(F)] _dtype: ElemType,
) {
    let length = output.shape(1);
    if ABSOLUTE_POS >= output.shape(0) * length {
        terminate!();
    }
    let (b, i) = unit_position(length);
    let x_line = Strided::through::<F>(x, b, i, kept, summed);
    let vector_line = Strided::row::<F>(vector, b);

    let mut sum = F::new(0.0);
    for j in 0..vector.shape(1) {
        sum += vector[vector_line.at(j)] * x[x_line.at(j)];
    }

    let at = b * output.stride(0) + i * output.stride(1);
    output[at] = sum;
}
