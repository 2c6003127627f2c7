//! The kernels' outputs and the launch grid of one unit per output element.

use burn::tensor::Shape;
use burn_cubecl::cubecl::prelude::*;
use burn_cubecl::cubecl::{calculate_cube_count_elemwise, client::Client};
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;

use crate::layout::Layout;

/// An uninitialised `[B, C]` output for `x` and the launch grid of one unit per element.
pub(super) fn output_and_grid(x: &CubeTensor, layout: Layout) -> (CubeTensor, CubeCount, CubeDim) {
    let dims = x.meta.shape();
    let (batch, channels) = (dims[0], dims[layout.channel_axis()]);
    let output = empty_like(x, Shape::new([batch, channels]));
    let (cube_count, cube_dim) = grid(&x.client, batch * channels);
    (output, cube_count, cube_dim)
}

/// An uninitialised tensor of `shape` on `like`'s device, in its dtype.
pub(super) fn empty_like(like: &CubeTensor, shape: Shape) -> CubeTensor {
    empty_device_dtype(like.client.clone(), like.device.clone(), shape, like.dtype)
}

pub(super) fn grid(client: &Client, units: usize) -> (CubeCount, CubeDim) {
    let cube_dim = CubeDim::new(client, units);
    (
        calculate_cube_count_elemwise(client, units, cube_dim),
        cube_dim,
    )
}
