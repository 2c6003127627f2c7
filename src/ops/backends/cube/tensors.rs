//! The kernels' outputs and what every launch takes besides the kernel's own arguments.

use burn::backend::cubecl::dtype_to_storage_type;
use burn::tensor::Shape;
use burn_cubecl::cubecl::prelude::*;
use burn_cubecl::cubecl::{calculate_cube_count_elemwise, client::Client};
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;

use crate::layout::Layout;

/// The client, the grid and the element type of one launch: the kernels are compiled for the
/// one float dtype of their inputs.
pub(super) struct Launch {
    pub(super) client: Client,
    pub(super) count: CubeCount,
    pub(super) dim: CubeDim,
    pub(super) dtype: ElemType,
}

impl Launch {
    /// One unit per element of `units` outputs, on `like`'s client and in its dtype.
    pub(super) fn per_element(like: &CubeTensor, units: usize) -> Self {
        let dim = CubeDim::new(&like.client, units);
        let count = calculate_cube_count_elemwise(&like.client, units, dim);
        Self::new(like, count, dim)
    }

    /// One cube of `block` units per sample of `batch`.
    pub(super) fn per_sample(like: &CubeTensor, batch: usize, block: usize) -> Self {
        let count = CubeCount::Static(batch as u32, 1, 1);
        Self::new(like, count, CubeDim::new_1d(block as u32))
    }

    fn new(like: &CubeTensor, count: CubeCount, dim: CubeDim) -> Self {
        Self {
            client: like.client.clone(),
            count,
            dim,
            dtype: dtype_to_storage_type(like.dtype),
        }
    }
}

/// An uninitialised `[B, C]` output for `x` and the launch of one unit per element.
pub(super) fn output_and_launch(x: &CubeTensor, layout: Layout) -> (CubeTensor, Launch) {
    let dims = x.meta.shape();
    let (batch, channels) = (dims[0], dims[layout.channel_axis()]);
    let output = empty_like(x, Shape::new([batch, channels]));
    (output, Launch::per_element(x, batch * channels))
}

/// An uninitialised tensor of `shape` on `like`'s device, in its dtype.
pub(super) fn empty_like(like: &CubeTensor, shape: Shape) -> CubeTensor {
    empty_device_dtype(like.client.clone(), like.device.clone(), shape, like.dtype)
}
