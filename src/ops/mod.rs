//! The backend-extension trait behind which every backend-specific kernel of the crate lives:
//! GSP's cost matrix and transport solve, each with its analytical backward, the generalized
//! mean of GeM/GGeM with its analytical backward, and the weighted sum of GAP and GSP.
//!
//! - `portable`: bodies written once with the `Tensor` API, valid on every backend;
//! - `backends`: the implementations. Flex has fused CPU kernels for every op; Cube (wgpu)
//!   has CubeCL kernels for the generalized mean (forward, backward) and the weighted sum
//!   (forward, weights gradient), and portable bodies for the rest; NdArray uses the portable bodies; `Autodiff<B, C>` runs the inner
//!   backend's forward off the tape and records one node whose backward is the closed form.
//!
//! Devices whose backend is not listed here (see [`extension_covers`]) take the layers'
//! composite paths, differentiated by ordinary autodiff.

// NdArray is deprecated in Burn 0.22 but still a supported backend of this crate; the
// extension macro names it in generated code.
#![allow(deprecated)]

mod backends;
pub(crate) mod portable;

use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Backend, DispatchDevice, backend_extension};
use burn::tensor::Device;

use crate::transport::TransportSettings;

/// Short names of the backend's primitives for the macro-generated impls.
#[cfg(any(feature = "ndarray", feature = "wgpu"))]
pub(crate) type Float<B> = FloatTensor<B>;
#[cfg(any(feature = "ndarray", feature = "wgpu"))]
pub(crate) type Int<B> = IntTensor<B>;

#[cfg(all(test, feature = "autodiff"))]
pub(crate) use backends::BACKWARD_CALLS;

/// Pooling kernels as backend ops.
#[backend_extension(
    Flex: cfg(feature = "flex"),
    NdArray: cfg(feature = "ndarray"),
    Cube: cfg(feature = "wgpu"),
    Autodiff: cfg(feature = "autodiff"),
)]
pub trait PoolingOps: Backend {
    /// GSP's costs c_kj = ‖φ(ω_k) − φ(x_j)‖₂ with φ(v) = v / max(1, ‖v‖₂), for features
    /// `[B, N, C]` (`channels_last`) or `[B, C, N]` and prototypes `[K, C]`: `[B, K, N]`.
    fn transport_costs(
        features: FloatTensor<Self>,
        prototypes: FloatTensor<Self>,
        channels_last: bool,
    ) -> FloatTensor<Self>;

    /// (∂L/∂features, ∂L/∂prototypes) of [`transport_costs`](Self::transport_costs) given
    /// its output and ∂L/∂costs `[B, K, N]`.
    fn transport_costs_backward(
        features: FloatTensor<Self>,
        prototypes: FloatTensor<Self>,
        costs: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        channels_last: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// Solves GSP's partial transport for costs `[B, K, N]` and position masses `[B, N]`;
    /// returns the plan `[B, K+1, N]` (row 0 = residual ρ) and the iteration count `[1]`.
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
        epsilon: f64,
    ) -> FloatTensor<Self>;

    /// GSP's transport reduced to its marginals, for costs `[B, K, N]` and masses `[B, N]`:
    /// `[B, N + K]`, per sample the residual masses ρ_j then the mass sent to each prototype
    /// Σ_j P_kj; also the plan `[B, K+1, N]` (never tracked: what the backward needs) and the
    /// iteration count `[1]`. GSP's pooling needs only the marginals, and their backward never
    /// expands their gradient to the plan's size.
    fn transport_marginals(
        costs: FloatTensor<Self>,
        mass: FloatTensor<Self>,
        settings: TransportSettings,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, IntTensor<Self>);

    /// ∂L/∂costs `[B, K, N]` from the plan, ∂L/∂marginals `[B, N + K]` and the masses, by
    /// implicit differentiation at the fixed point.
    fn transport_marginals_backward(
        plan: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        mass: FloatTensor<Self>,
        epsilon: f64,
    ) -> FloatTensor<Self>;

    /// The clamped generalized mean `((Σ_n m_n max(x_n, ε)^p_c) / Σ_n m_n)^(1/p_c)` of
    /// `x` `[B, C, N]` (or `[B, N, C]` when `channels_last`), powers `[C]`, mask `[B, N]`
    /// (1 valid, 0 padding): `[B, C]`. Every mask row needs a valid position (the layers
    /// check it); an all-padding row's mean is 0/0.
    fn generalized_mean(
        x: FloatTensor<Self>,
        powers: FloatTensor<Self>,
        mask: FloatTensor<Self>,
        eps: f64,
        channels_last: bool,
    ) -> FloatTensor<Self>;

    /// (∂L/∂x, ∂L/∂powers) of [`generalized_mean`](Self::generalized_mean) given its output
    /// and ∂L/∂output `[B, C]`.
    #[allow(clippy::too_many_arguments)]
    fn generalized_mean_backward(
        x: FloatTensor<Self>,
        powers: FloatTensor<Self>,
        mask: FloatTensor<Self>,
        output: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        eps: f64,
        channels_last: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// The weighted sum y_bc = Σ_n w_bn x_bnc of `x` `[B, C, N]` (or `[B, N, C]` when
    /// `channels_last`) with weights `[B, N]`: `[B, C]`. GAP's masked mean and GSP's pooling.
    fn weighted_sum(
        x: FloatTensor<Self>,
        weights: FloatTensor<Self>,
        channels_last: bool,
    ) -> FloatTensor<Self>;

    /// ∂L/∂x = w_bn ∂L/∂y_bc of [`weighted_sum`](Self::weighted_sum), in `x`'s layout.
    fn weighted_sum_features_backward(
        weights: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        channels_last: bool,
    ) -> FloatTensor<Self>;

    /// ∂L/∂w_bn = Σ_c x_bnc ∂L/∂y_bc of [`weighted_sum`](Self::weighted_sum): `[B, N]`.
    fn weighted_sum_weights_backward(
        x: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        channels_last: bool,
    ) -> FloatTensor<Self>;
}

/// Whether [`PoolingOps`] has an implementation for the device's backend in this build.
pub fn extension_covers(device: &Device) -> bool {
    if device.is_autodiff() && !cfg!(feature = "autodiff") {
        return false;
    }
    #[allow(unreachable_patterns)]
    match device.as_dispatch().clone().inner() {
        #[cfg(feature = "flex")]
        DispatchDevice::Flex(_) => true,
        #[cfg(feature = "ndarray")]
        DispatchDevice::NdArray(_) => true,
        #[cfg(feature = "wgpu")]
        DispatchDevice::Cube(_) => true,
        _ => false,
    }
}
