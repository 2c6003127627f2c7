//! The backend-extension trait behind which every backend-specific kernel of the crate lives:
//! GSP's cost matrix and transport solve, the balanced transport solve of the cluster
//! aggregators, each with its analytical backward, the generalized
//! mean of GeM/GGeM and the log-sum-exp of LSE with their analytical backward, the
//! weighted sum of GAP and GSP, the L2 normalisation of the cluster aggregators, and SALAD's
//! hidden activation (bias, ReLU and dropout in one pass).
//!
//! - [`PoolingOps`]: the ops. Each default body is the portable composite from the crate's
//!   reference maths (`portable`), valid on every backend; a backend overrides what it has a
//!   kernel for.
//! - `backends`: one folder or file per backend. Flex overrides every op with fused CPU
//!   kernels; Cube (every CubeCL runtime, fused or not) overrides with CubeCL kernels every op
//!   but the balanced transport's backward (its portable body: the assembly as tensor ops, a
//!   K'×K' Cholesky in f64 on the host), the log-sum-exp, the weighted sum's features
//!   gradient, the L2 normalisation and the hidden activation (Burn's element-wise ops and
//!   random numbers, already fast on a GPU); NdArray keeps the defaults;
//!   `Autodiff<B, C>` runs the inner backend's forward off the tape and records one node whose
//!   backward is the closed form.
//! - `routing`: the `Tensor`-level entry points the layers call, which take the extension on
//!   a device it covers ([`extension_covers`]) and the composites, differentiated by ordinary
//!   autodiff, elsewhere (or, for timing one against the other, wherever the caller asks).
//!
//! The list of covered backends is written once, in `pooling_extension!`: it generates the
//! extension's dispatch, the [`TensorBridge`] of each backend and [`extension_covers`].

// NdArray is deprecated in Burn 0.22 but still a supported backend of this crate; the
// extension macro names it in generated code.
#![allow(deprecated)]
// With no backend compiled in, the generated dispatch has nothing to route its arguments to.
#![cfg_attr(
    not(any(feature = "flex", feature = "ndarray", feature = "cube")),
    allow(unused_variables)
)]

mod backends;
mod bridge;
mod portable;
pub(crate) mod routing;

use burn::backend::tensor::{BoolTensor, FloatTensor, IntTensor};
use burn::backend::{DispatchDevice, backend_extension};
use burn::tensor::Device;

pub use bridge::TensorBridge;
/// Not API: the composite route on a covered device, for the speed table. Hidden, and free to
/// change.
#[doc(hidden)]
pub use routing::with_composites;

use crate::layout::Layout;
use crate::maths::balanced::BalancedSettings;
use crate::maths::log_sum_exp::LseOutput;
use crate::maths::settings::TransportSettings;

#[cfg(all(test, feature = "autodiff"))]
pub(crate) use backends::BACKWARD_CALLS;

/// Declares the extension trait for the listed backends (each with the crate feature that
/// enables it), and from the same list the [`TensorBridge`] of each backend and
/// `backend_is_covered`, so that what [`extension_covers`] answers cannot drift from what the
/// dispatch routes.
macro_rules! pooling_extension {
    ($($backend:ident: cfg $cfg:tt),+ ; $($trait:tt)*) => {
        #[backend_extension($($backend: cfg $cfg,)+ Autodiff: cfg(feature = "autodiff"))]
        $($trait)*

        $(
            #[cfg $cfg]
            impl TensorBridge for burn::backend::$backend {
                fn wrap<const D: usize>(primitive: FloatTensor<Self>) -> burn::tensor::Tensor<D> {
                    bridge::wrap::<Self, D>(primitive)
                }
                fn unwrap<const D: usize>(tensor: burn::tensor::Tensor<D>) -> FloatTensor<Self> {
                    bridge::unwrap::<Self, D>(tensor)
                }
                fn unwrap_int<const D: usize>(
                    tensor: burn::tensor::Tensor<D, burn::tensor::Int>,
                ) -> IntTensor<Self> {
                    bridge::unwrap_int::<Self, D>(tensor)
                }
                fn unwrap_bool<const D: usize>(
                    tensor: burn::tensor::Tensor<D, burn::tensor::Bool>,
                ) -> BoolTensor<Self> {
                    bridge::unwrap_bool::<Self, D>(tensor)
                }
            }
        )+

        /// Whether the (inner) backend of `device` has a [`PoolingOps`] implementation.
        fn backend_is_covered(device: &DispatchDevice) -> bool {
            #[allow(unreachable_patterns)]
            match device {
                $(#[cfg $cfg] DispatchDevice::$backend(_) => true,)+
                _ => false,
            }
        }
    };
}

pooling_extension! {
    Flex: cfg(feature = "flex"),
    NdArray: cfg(feature = "ndarray"),
    Cube: cfg(feature = "cube");

/// Pooling kernels as backend ops. Every method's default body is the portable composite
/// (see [`TensorBridge`]); a backend overrides the methods it has a kernel for.
pub trait PoolingOps: TensorBridge {
    /// GSP's costs c_kj = ‖φ(ω_k) − φ(x_j)‖₂ with φ(v) = v / max(1, ‖v‖₂), for features
    /// `[B, C, N]` or `[B, N, C]` (as `layout` says) and prototypes `[K, C]`: `[B, K, N]`.
    fn transport_costs(
        features: FloatTensor<Self>,
        prototypes: FloatTensor<Self>,
        layout: Layout,
    ) -> FloatTensor<Self> {
        portable::transport_costs::<Self>(features, prototypes, layout)
    }

    /// (∂L/∂features, ∂L/∂prototypes) of [`transport_costs`](Self::transport_costs) given
    /// its output and ∂L/∂costs `[B, K, N]`.
    fn transport_costs_backward(
        features: FloatTensor<Self>,
        prototypes: FloatTensor<Self>,
        costs: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        layout: Layout,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        portable::transport_costs_backward::<Self>(features, prototypes, costs, grad, layout)
    }

    /// Solves GSP's partial transport for costs `[B, K, N]` and position masses `[B, N]`.
    /// Returns `output`: the plan `[B, K+1, N]` (row 0 = residual ρ), or its marginals
    /// `[B, N + K]` (per sample the mass t_j = Σ_k P_kj each position sends, summed from the
    /// plan, then the mass Σ_j P_kj each prototype receives: all GSP's pooling reads); then
    /// the plan (never tracked: what the backward reads), the iteration count `[1]` (the most
    /// over the samples) and whether every sample's mass met the tolerance `[1]` (false when a
    /// solve ran into its cap, stalled at the float's rounding floor or met a NaN: see
    /// [`TransportSettings`]).
    fn partial_transport(
        costs: FloatTensor<Self>,
        mass: FloatTensor<Self>,
        settings: TransportSettings,
        output: TransportOutput,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        IntTensor<Self>,
        BoolTensor<Self>,
    ) {
        portable::partial_transport::<Self>(costs, mass, settings, output)
    }

    /// ∂L/∂costs `[B, K, N]` from the plan, the upstream gradient of `output` and the masses,
    /// by implicit differentiation at the fixed point. The marginals' gradient is never
    /// expanded to the plan's size.
    fn partial_transport_backward(
        plan: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        mass: FloatTensor<Self>,
        epsilon: f64,
        output: TransportOutput,
    ) -> FloatTensor<Self> {
        portable::partial_transport_backward::<Self>(plan, grad, mass, epsilon, output)
    }

    /// Solves the balanced entropic transport problem for costs `[B, K', N]`, row masses
    /// `[B, K']` and column masses `[B, N]` (non-negative, equal sums per sample; a zero mass
    /// gets an exactly zero row or column, whatever its costs). Returns the plan `[B, K', N]`,
    /// the iteration count `[1]` (the most over the samples) and whether every sample's
    /// marginal error met the tolerance `[1]` (see [`BalancedSettings`]).
    fn balanced_transport(
        costs: FloatTensor<Self>,
        row_mass: FloatTensor<Self>,
        column_mass: FloatTensor<Self>,
        settings: BalancedSettings,
    ) -> (FloatTensor<Self>, IntTensor<Self>, BoolTensor<Self>) {
        portable::balanced_transport::<Self>(costs, row_mass, column_mass, settings)
    }

    /// (∂L/∂costs `[B, K', N]`, ∂L/∂row_mass `[B, K']`, ∂L/∂column_mass `[B, N]`) of
    /// [`balanced_transport`](Self::balanced_transport) from its plan and ∂L/∂plan, by
    /// implicit differentiation (no iteration replayed; the mass gradients are fixed up to
    /// the null direction (+t, −t), with Σ over the shorter side's gradient = 0).
    fn balanced_transport_backward(
        plan: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        epsilon: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        portable::balanced_transport_backward::<Self>(plan, grad, epsilon)
    }

    /// The clamped generalized mean `((Σ_n m_n max(x_n, ε)^p_c) / Σ_n m_n)^(1/p_c)` of
    /// `x` `[B, C, N]` or `[B, N, C]` (as `layout` says), powers `[C]`, mask `[B, N]`
    /// (1 valid, 0 padding): `[B, C]`. Every mask row needs a valid position (the layers
    /// check it); an all-padding row's mean is 0/0.
    fn generalized_mean(
        x: FloatTensor<Self>,
        powers: FloatTensor<Self>,
        mask: FloatTensor<Self>,
        eps: f64,
        layout: Layout,
    ) -> FloatTensor<Self> {
        portable::generalized_mean::<Self>(x, powers, mask, eps, layout)
    }

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
        layout: Layout,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        portable::generalized_mean_backward::<Self>(x, powers, mask, output, grad, eps, layout)
    }

    /// The log-sum-exp `m + ln((1/N) Σ_n exp(r (x_n − m))) / r` (or, as `output` says, its
    /// softmax-weighted mean) of `x` `[B, C, N]` or `[B, N, C]` (as `layout` says) over the
    /// positions `mask` `[B, N]` marks valid (1 valid, 0 padding; every row has one), with
    /// temperature `r` `[1]`: `[B, C]`, with the Taylor form below the crossover
    /// (docs/maths.md §8).
    fn log_sum_exp(
        x: FloatTensor<Self>,
        r: FloatTensor<Self>,
        mask: FloatTensor<Self>,
        layout: Layout,
        output: LseOutput,
    ) -> FloatTensor<Self> {
        portable::log_sum_exp::<Self>(x, r, mask, layout, output)
    }

    /// (∂L/∂x, ∂L/∂r `[1]`) of [`log_sum_exp`](Self::log_sum_exp) given its output and
    /// ∂L/∂output `[B, C]`.
    fn log_sum_exp_backward(
        x: FloatTensor<Self>,
        r: FloatTensor<Self>,
        mask: FloatTensor<Self>,
        output: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        layout: Layout,
        kind: LseOutput,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        portable::log_sum_exp_backward::<Self>(x, r, mask, output, grad, layout, kind)
    }

    /// `x / max(‖x‖, eps)` along `axis` of `x` (any rank, contiguous or not), eps = 1e-12
    /// (f16: 2.4e-4), with ‖x‖ computed on x / max(1, max |x|) so that it cannot overflow.
    /// Returns the output, then the denominators max(‖x‖, eps) with `axis` kept at size 1
    /// (never tracked: what the backward reads).
    fn l2_normalize(x: FloatTensor<Self>, axis: usize) -> (FloatTensor<Self>, FloatTensor<Self>) {
        portable::l2_normalize::<Self>(x, axis)
    }

    /// ∂L/∂x of [`l2_normalize`](Self::l2_normalize) from its output, denominators and
    /// ∂L/∂output.
    fn l2_normalize_backward(
        output: FloatTensor<Self>,
        denominator: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        axis: usize,
    ) -> FloatTensor<Self> {
        portable::l2_normalize_backward::<Self>(output, denominator, grad, axis)
    }

    /// A perceptron's hidden activation with inverted dropout, `relu(hidden + bias) ⊙ k /
    /// (1 − p)` for `hidden` `[R, H]` (the layer's product x·w), `bias` `[H]` and drop
    /// probability `drop` = p ∈ [0, 1), each k ~ Bernoulli(1 − p) from the device's random
    /// numbers (p = 0: no dropout): `[R, H]`.
    fn bias_relu_dropout(
        hidden: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        drop: f64,
    ) -> FloatTensor<Self> {
        portable::bias_relu_dropout::<Self>(hidden, bias, drop)
    }

    /// (∂L/∂hidden `[R, H]`, ∂L/∂bias `[H]`) of
    /// [`bias_relu_dropout`](Self::bias_relu_dropout) from its output and ∂L/∂output: the
    /// output is positive exactly where the gradient passes, so no mask is kept.
    fn bias_relu_dropout_backward(
        output: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        drop: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        portable::bias_relu_dropout_backward::<Self>(output, grad, drop)
    }

    /// A weighted sum of `x` `[B, C, N]` or `[B, N, C]` (as `layout` says) over one axis:
    /// over the positions, y_bc = Σ_n v_bn x_bnc with `vector` `[B, N]` gives `[B, C]` (GAP's
    /// masked mean and GSP's pooling); over the channels, z_bn = Σ_c v_bc x_bnc with `vector`
    /// `[B, C]` gives `[B, N]` (the positions' weights gradient of the first, v = ∂L/∂y).
    fn weighted_sum(
        x: FloatTensor<Self>,
        vector: FloatTensor<Self>,
        layout: Layout,
        over: SumOver,
    ) -> FloatTensor<Self> {
        portable::weighted_sum::<Self>(x, vector, layout, over)
    }

    /// ∂L/∂x = w_bn ∂L/∂y_bc of [`weighted_sum`](Self::weighted_sum) over the positions, in
    /// `x`'s layout, from `weights` `[B, N]` and `grad` `[B, C]` (over the channels, the same
    /// outer product with the roles of the two swapped).
    fn weighted_sum_features_backward(
        weights: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        layout: Layout,
    ) -> FloatTensor<Self> {
        portable::weighted_sum_features_backward::<Self>(weights, grad, layout)
    }
}
}

/// What [`PoolingOps::partial_transport`] returns first, and so what its gradient is of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransportOutput {
    /// The plan `[B, K+1, N]`.
    Plan,
    /// Its marginals `[B, N + K]`.
    Marginals,
}

/// The axis a [`PoolingOps::weighted_sum`] runs over; the other one is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SumOver {
    /// Σ_n over the positions: `[B, C]`, the pooling.
    Positions,
    /// Σ_c over the channels: `[B, N]`, the pooling's weights gradient.
    Channels,
}

/// Whether [`PoolingOps`] has an implementation for the device's backend in this build (its
/// autodiff wrapper included when the `autodiff` feature is on). Where it does not, the
/// layers run the same maths as composites of tensor ops.
pub fn extension_covers(device: &Device) -> bool {
    if device.is_autodiff() && !cfg!(feature = "autodiff") {
        return false;
    }
    backend_is_covered(&device.as_dispatch().clone().inner())
}
