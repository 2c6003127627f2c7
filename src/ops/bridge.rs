//! How the portable bodies of [`PoolingOps`](super::PoolingOps) see a backend's primitives as
//! ordinary `Tensor`s, so that the reference maths is written once with the `Tensor` API.

use burn::backend::tensor::{BoolTensor, FloatTensor, IntTensor};
use burn::backend::{Backend, Dispatch, DispatchKindConversion, DispatchTensor};
use burn::tensor::{Bool, Int, Tensor};

/// A backend whose primitives convert to and from `Tensor`s: the supertrait of
/// [`PoolingOps`](super::PoolingOps) that lets its default bodies run the composites.
///
/// Implemented for every covered backend (generated from the same list as the extension), for
/// their autodiff wrappers and for `Dispatch`.
pub trait TensorBridge: Backend {
    /// The primitive as a `Tensor` on this backend.
    fn wrap<const D: usize>(primitive: FloatTensor<Self>) -> Tensor<D>;
    /// A `Tensor` computed on this backend as its primitive.
    fn unwrap<const D: usize>(tensor: Tensor<D>) -> FloatTensor<Self>;
    /// An int `Tensor` computed on this backend as its primitive.
    fn unwrap_int<const D: usize>(tensor: Tensor<D, Int>) -> IntTensor<Self>;
    /// A bool `Tensor` computed on this backend as its primitive.
    fn unwrap_bool<const D: usize>(tensor: Tensor<D, Bool>) -> BoolTensor<Self>;
}

impl TensorBridge for Dispatch {
    fn wrap<const D: usize>(primitive: FloatTensor<Self>) -> Tensor<D> {
        Tensor::from_dispatch(primitive)
    }
    fn unwrap<const D: usize>(tensor: Tensor<D>) -> FloatTensor<Self> {
        tensor.into_dispatch()
    }
    fn unwrap_int<const D: usize>(tensor: Tensor<D, Int>) -> IntTensor<Self> {
        tensor.into_dispatch()
    }
    fn unwrap_bool<const D: usize>(tensor: Tensor<D, Bool>) -> BoolTensor<Self> {
        tensor.into_dispatch()
    }
}

#[cfg(feature = "autodiff")]
impl<B: Backend, C: burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy> TensorBridge
    for burn::backend::autodiff::Autodiff<B, C>
where
    DispatchTensor: DispatchKindConversion<Self>,
{
    fn wrap<const D: usize>(primitive: FloatTensor<Self>) -> Tensor<D> {
        wrap::<Self, D>(primitive)
    }
    fn unwrap<const D: usize>(tensor: Tensor<D>) -> FloatTensor<Self> {
        unwrap::<Self, D>(tensor)
    }
    fn unwrap_int<const D: usize>(tensor: Tensor<D, Int>) -> IntTensor<Self> {
        unwrap_int::<Self, D>(tensor)
    }
    fn unwrap_bool<const D: usize>(tensor: Tensor<D, Bool>) -> BoolTensor<Self> {
        unwrap_bool::<Self, D>(tensor)
    }
}

const SAME_BACKEND: &str = "a result lives on the backend it was computed on";

pub(crate) fn wrap<B: Backend, const D: usize>(primitive: FloatTensor<B>) -> Tensor<D>
where
    DispatchTensor: DispatchKindConversion<B>,
{
    Tensor::from_primitive::<B>(primitive)
}

pub(crate) fn unwrap<B: Backend, const D: usize>(tensor: Tensor<D>) -> FloatTensor<B>
where
    DispatchTensor: DispatchKindConversion<B>,
{
    tensor.try_into_primitive::<B>().expect(SAME_BACKEND)
}

pub(crate) fn unwrap_int<B: Backend, const D: usize>(tensor: Tensor<D, Int>) -> IntTensor<B>
where
    DispatchTensor: DispatchKindConversion<B>,
{
    tensor.try_into_primitive::<B>().expect(SAME_BACKEND)
}

pub(crate) fn unwrap_bool<B: Backend, const D: usize>(tensor: Tensor<D, Bool>) -> BoolTensor<B>
where
    DispatchTensor: DispatchKindConversion<B>,
{
    tensor.try_into_primitive::<B>().expect(SAME_BACKEND)
}
