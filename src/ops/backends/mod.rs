//! [`PoolingOps`](super::PoolingOps) for each covered backend. Flex has fused CPU kernels
//! (`flex`) and Cube has CubeCL kernels (`cube`) for the generalized mean and the masked mean;
//! NdArray uses the portable bodies for everything.

#[cfg(feature = "autodiff")]
mod autodiff;
#[cfg(feature = "wgpu")]
mod cube;
#[cfg(feature = "flex")]
mod flex;

#[cfg(all(test, feature = "autodiff"))]
pub(crate) use autodiff::BACKWARD_CALLS;

#[cfg(feature = "ndarray")]
use burn::backend::tensor::{FloatTensor, IntTensor};

#[cfg(feature = "ndarray")]
use super::{PoolingOps, portable};
#[cfg(feature = "ndarray")]
use crate::transport::TransportSettings;

/// Implements [`PoolingOps`](super::PoolingOps) for a backend with the portable bodies.
#[cfg(feature = "ndarray")]
macro_rules! portable_pooling_ops {
    ($backend:ty) => {
        impl PoolingOps for $backend {
            fn partial_transport(
                costs: FloatTensor<Self>,
                mass: FloatTensor<Self>,
                settings: TransportSettings,
            ) -> (FloatTensor<Self>, IntTensor<Self>) {
                portable::partial_transport::<Self>(costs, mass, settings)
            }

            fn partial_transport_backward(
                plan: FloatTensor<Self>,
                grad: FloatTensor<Self>,
                mass: FloatTensor<Self>,
                transport_ratio: f64,
                epsilon: f64,
            ) -> FloatTensor<Self> {
                portable::partial_transport_backward::<Self>(
                    plan,
                    grad,
                    mass,
                    transport_ratio,
                    epsilon,
                )
            }

            fn generalized_mean(
                x: FloatTensor<Self>,
                powers: FloatTensor<Self>,
                mask: FloatTensor<Self>,
                eps: f64,
                channels_last: bool,
            ) -> FloatTensor<Self> {
                portable::generalized_mean::<Self>(x, powers, mask, eps, channels_last)
            }

            fn generalized_mean_backward(
                x: FloatTensor<Self>,
                powers: FloatTensor<Self>,
                mask: FloatTensor<Self>,
                output: FloatTensor<Self>,
                grad: FloatTensor<Self>,
                eps: f64,
                channels_last: bool,
            ) -> (FloatTensor<Self>, FloatTensor<Self>) {
                portable::generalized_mean_backward::<Self>(
                    x,
                    powers,
                    mask,
                    output,
                    grad,
                    eps,
                    channels_last,
                )
            }

            fn masked_mean(
                x: FloatTensor<Self>,
                mask: FloatTensor<Self>,
                channels_last: bool,
            ) -> FloatTensor<Self> {
                portable::masked_mean::<Self>(x, mask, channels_last)
            }

            fn masked_mean_backward(
                mask: FloatTensor<Self>,
                grad: FloatTensor<Self>,
                channels_last: bool,
            ) -> FloatTensor<Self> {
                portable::masked_mean_backward::<Self>(mask, grad, channels_last)
            }
        }
    };
}

#[cfg(feature = "ndarray")]
portable_pooling_ops!(burn::backend::NdArray);
