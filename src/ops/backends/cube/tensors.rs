//! Between Burn's `Cube` primitives and the CubeCL tensors the kernels take, and the launch
//! grid of one unit per output element.

use std::any::{Any, TypeId};

use burn::backend::Cube;
use burn::backend::tensor::FloatTensor;
use burn::tensor::Shape;
use burn_cubecl::cubecl::prelude::*;
use burn_cubecl::cubecl::{calculate_cube_count_elemwise, client::Client};
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;

use crate::layout::Layout;

/// Whether `Cube`'s float primitive is the CubeCL tensor the kernels take (it is not when Burn's
/// `fusion` feature is on).
pub(super) fn kernels_apply() -> bool {
    TypeId::of::<FloatTensor<Cube>>() == TypeId::of::<CubeTensor>()
}

/// `value` as type `T` when it is one (a type-checked identity, no conversion).
pub(super) fn same_type<S: 'static, T: 'static>(value: S) -> Result<T, S> {
    let mut slot = Some(value);
    match (&mut slot as &mut dyn Any).downcast_mut::<Option<T>>() {
        Some(same) => Ok(same.take().expect("filled above")),
        None => Err(slot.expect("not taken")),
    }
}

/// The CubeCL tensors behind `Cube` primitives of one float dtype, or the primitives back when a
/// kernel does not apply (a fused backend, or mixed dtypes).
pub(super) fn cube_tensors<const K: usize>(
    tensors: [FloatTensor<Cube>; K],
) -> Result<[CubeTensor; K], [FloatTensor<Cube>; K]> {
    if !kernels_apply() {
        return Err(tensors);
    }
    let tensors = tensors.map(|tensor| {
        same_type::<_, CubeTensor>(tensor).unwrap_or_else(|_| unreachable!("kernels_apply"))
    });
    if tensors
        .iter()
        .all(|tensor| tensor.dtype == tensors[0].dtype)
    {
        Ok(tensors)
    } else {
        Err(tensors.map(from_cube))
    }
}

pub(super) fn from_cube(tensor: CubeTensor) -> FloatTensor<Cube> {
    same_type(tensor).unwrap_or_else(|_| unreachable!("called only when kernels_apply"))
}

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
