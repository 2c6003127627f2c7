//! [`PoolingOps`](super::PoolingOps) for each covered backend. Flex has fused CPU kernels for
//! every op (`flex`); Cube has CubeCL kernels (`cube`) for the forward generalized mean and
//! weighted sum, and the portable bodies for the rest; NdArray uses the portable bodies.

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
            fn transport_costs(
                features: FloatTensor<Self>,
                prototypes: FloatTensor<Self>,
                channels_last: bool,
            ) -> FloatTensor<Self> {
                portable::transport_costs::<Self>(features, prototypes, channels_last)
            }

            fn transport_costs_backward(
                features: FloatTensor<Self>,
                prototypes: FloatTensor<Self>,
                costs: FloatTensor<Self>,
                grad: FloatTensor<Self>,
                channels_last: bool,
            ) -> (FloatTensor<Self>, FloatTensor<Self>) {
                portable::transport_costs_backward::<Self>(
                    features,
                    prototypes,
                    costs,
                    grad,
                    channels_last,
                )
            }

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

            fn transport_marginals(
                costs: FloatTensor<Self>,
                mass: FloatTensor<Self>,
                settings: TransportSettings,
            ) -> (FloatTensor<Self>, FloatTensor<Self>, IntTensor<Self>) {
                portable::transport_marginals::<Self>(costs, mass, settings)
            }

            fn transport_marginals_backward(
                plan: FloatTensor<Self>,
                grad: FloatTensor<Self>,
                mass: FloatTensor<Self>,
                transport_ratio: f64,
                epsilon: f64,
            ) -> FloatTensor<Self> {
                portable::transport_marginals_backward::<Self>(
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

            fn weighted_sum(
                x: FloatTensor<Self>,
                weights: FloatTensor<Self>,
                channels_last: bool,
            ) -> FloatTensor<Self> {
                portable::weighted_sum::<Self>(x, weights, channels_last)
            }

            fn weighted_sum_features_backward(
                weights: FloatTensor<Self>,
                grad: FloatTensor<Self>,
                channels_last: bool,
            ) -> FloatTensor<Self> {
                portable::weighted_sum_features_backward::<Self>(weights, grad, channels_last)
            }

            fn weighted_sum_weights_backward(
                x: FloatTensor<Self>,
                grad: FloatTensor<Self>,
                channels_last: bool,
            ) -> FloatTensor<Self> {
                portable::weighted_sum_weights_backward::<Self>(x, grad, channels_last)
            }
        }
    };
}

#[cfg(feature = "ndarray")]
portable_pooling_ops!(burn::backend::NdArray);
