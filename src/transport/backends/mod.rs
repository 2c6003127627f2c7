//! [`TransportOps`](super::TransportOps) for each covered backend. Flex, NdArray and Cube use
//! the portable bodies for now; this is where fused kernels plug in.

#[cfg(feature = "autodiff")]
mod autodiff;
#[cfg(all(test, feature = "autodiff"))]
pub(crate) use autodiff::IMPLICIT_BACKWARD_CALLS;

use burn::backend::tensor::{FloatTensor, IntTensor};

use super::ops::{TransportOps, portable};
use super::settings::TransportSettings;

/// Implements [`TransportOps`] for a backend with the portable bodies.
macro_rules! portable_transport_ops {
    ($backend:ty) => {
        impl TransportOps for $backend {
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
        }
    };
}

#[cfg(feature = "flex")]
portable_transport_ops!(burn::backend::Flex);
#[cfg(feature = "ndarray")]
portable_transport_ops!(burn::backend::NdArray);
#[cfg(feature = "wgpu")]
portable_transport_ops!(burn::backend::Cube);
