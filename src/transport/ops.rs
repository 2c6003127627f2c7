//! The backend-extension trait behind which the transport solver and its analytical backward
//! live, so each backend can supply its own kernels.
//!
//! Every covered backend starts from the portable bodies in [`portable`], written once with the
//! `Tensor` API. `Autodiff<B, C>` runs the inner backend's solve off the tape and registers the
//! closed-form backward ([`backends::autodiff`](super::backends)).

use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Backend, backend_extension};

use super::settings::TransportSettings;

/// Entropy-smoothed partial transport with a free prototype marginal, as a backend op.
#[backend_extension(
    Flex: cfg(feature = "flex"),
    NdArray: cfg(feature = "ndarray"),
    Cube: cfg(feature = "wgpu"),
    Autodiff: cfg(feature = "autodiff"),
)]
pub trait TransportOps: Backend {
    /// Solves the problem for costs `[B, K, N]` and position masses `[B, N]`; returns the plan
    /// `[B, K+1, N]` (row 0 = residual ρ) and the iteration count `[1]`.
    fn partial_transport(
        costs: FloatTensor<Self>,
        mass: FloatTensor<Self>,
        settings: TransportSettings,
    ) -> (FloatTensor<Self>, IntTensor<Self>);

    /// ∂L/∂costs `[B, K, N]` from the plan, the upstream gradient ∂L/∂plan `[B, K+1, N]` and
    /// the masses, by implicit differentiation at the fixed point.
    fn partial_transport_backward(
        plan: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        mass: FloatTensor<Self>,
        transport_ratio: f64,
        epsilon: f64,
    ) -> FloatTensor<Self>;
}

/// Backend-independent bodies of [`TransportOps`], written with the `Tensor` API.
pub(crate) mod portable {
    use burn::backend::tensor::{FloatTensor, IntTensor};
    use burn::backend::{Backend, DispatchKindConversion, DispatchTensor};
    use burn::tensor::Tensor;

    use crate::transport::implicit_backward::implicit_cost_gradient;
    use crate::transport::settings::TransportSettings;
    use crate::transport::solver::{iterations_tensor, solve};

    fn wrap<B: Backend, const D: usize>(primitive: FloatTensor<B>) -> Tensor<D>
    where
        DispatchTensor: DispatchKindConversion<B>,
    {
        Tensor::from_primitive::<B>(primitive)
    }

    fn unwrap<B: Backend, const D: usize>(tensor: Tensor<D>) -> FloatTensor<B>
    where
        DispatchTensor: DispatchKindConversion<B>,
    {
        tensor
            .try_into_primitive::<B>()
            .expect("the result lives on the backend it was computed on")
    }

    pub fn partial_transport<B: Backend>(
        costs: FloatTensor<B>,
        mass: FloatTensor<B>,
        settings: TransportSettings,
    ) -> (FloatTensor<B>, IntTensor<B>)
    where
        DispatchTensor: DispatchKindConversion<B>,
    {
        let costs: Tensor<3> = wrap::<B, 3>(costs);
        let device = costs.device();
        let (plan, iterations) = solve(costs, wrap::<B, 2>(mass), &settings);
        let iterations = iterations_tensor(iterations, &device)
            .try_into_primitive::<B>()
            .expect("the result lives on the backend it was computed on");
        (unwrap::<B, 3>(plan), iterations)
    }

    pub fn partial_transport_backward<B: Backend>(
        plan: FloatTensor<B>,
        grad: FloatTensor<B>,
        mass: FloatTensor<B>,
        transport_ratio: f64,
        epsilon: f64,
    ) -> FloatTensor<B>
    where
        DispatchTensor: DispatchKindConversion<B>,
    {
        unwrap::<B, 3>(implicit_cost_gradient(
            wrap::<B, 3>(plan),
            wrap::<B, 3>(grad),
            wrap::<B, 2>(mass),
            transport_ratio,
            epsilon,
        ))
    }
}
