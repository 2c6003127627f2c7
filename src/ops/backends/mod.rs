//! [`PoolingOps`](super::PoolingOps) for each covered backend. Flex has fused CPU kernels for
//! every op (`flex`); Cube has CubeCL kernels (`cube`) for the generalized mean (forward,
//! backward) and the weighted sum (forward, weights gradient), and the portable bodies for the
//! rest; NdArray uses the portable bodies.

/// Methods of [`PoolingOps`](super::PoolingOps) that run the portable bodies, by name, for
/// the impls of the backends without a kernel for them:
/// `impl PoolingOps for B { portable_methods!(weighted_sum, ...); }`.
#[cfg(any(feature = "ndarray", feature = "wgpu"))]
macro_rules! portable_methods {
    ($($op:ident),* $(,)?) => {
        $(portable_methods!(@ $op);)*
    };
    (@ transport_costs) => {
        fn transport_costs(
            features: $crate::ops::Float<Self>,
            prototypes: $crate::ops::Float<Self>,
            channels_last: bool,
        ) -> $crate::ops::Float<Self> {
            $crate::ops::portable::transport_costs::<Self>(features, prototypes, channels_last)
        }
    };
    (@ transport_costs_backward) => {
        fn transport_costs_backward(
            features: $crate::ops::Float<Self>,
            prototypes: $crate::ops::Float<Self>,
            costs: $crate::ops::Float<Self>,
            grad: $crate::ops::Float<Self>,
            channels_last: bool,
        ) -> ($crate::ops::Float<Self>, $crate::ops::Float<Self>) {
            $crate::ops::portable::transport_costs_backward::<Self>(
                features,
                prototypes,
                costs,
                grad,
                channels_last,
            )
        }
    };
    (@ partial_transport) => {
        fn partial_transport(
            costs: $crate::ops::Float<Self>,
            mass: $crate::ops::Float<Self>,
            settings: $crate::transport::TransportSettings,
        ) -> ($crate::ops::Float<Self>, $crate::ops::Int<Self>) {
            $crate::ops::portable::partial_transport::<Self>(costs, mass, settings)
        }
    };
    (@ partial_transport_backward) => {
        fn partial_transport_backward(
            plan: $crate::ops::Float<Self>,
            grad: $crate::ops::Float<Self>,
            mass: $crate::ops::Float<Self>,
            epsilon: f64,
        ) -> $crate::ops::Float<Self> {
            $crate::ops::portable::partial_transport_backward::<Self>(
                plan,
                grad,
                mass,
                epsilon,
            )
        }
    };
    (@ transport_marginals) => {
        fn transport_marginals(
            costs: $crate::ops::Float<Self>,
            mass: $crate::ops::Float<Self>,
            settings: $crate::transport::TransportSettings,
        ) -> ($crate::ops::Float<Self>, $crate::ops::Float<Self>, $crate::ops::Int<Self>) {
            $crate::ops::portable::transport_marginals::<Self>(costs, mass, settings)
        }
    };
    (@ transport_marginals_backward) => {
        fn transport_marginals_backward(
            plan: $crate::ops::Float<Self>,
            grad: $crate::ops::Float<Self>,
            mass: $crate::ops::Float<Self>,
            epsilon: f64,
        ) -> $crate::ops::Float<Self> {
            $crate::ops::portable::transport_marginals_backward::<Self>(
                plan,
                grad,
                mass,
                epsilon,
            )
        }
    };
    (@ generalized_mean) => {
        fn generalized_mean(
            x: $crate::ops::Float<Self>,
            powers: $crate::ops::Float<Self>,
            mask: $crate::ops::Float<Self>,
            eps: f64,
            channels_last: bool,
        ) -> $crate::ops::Float<Self> {
            $crate::ops::portable::generalized_mean::<Self>(x, powers, mask, eps, channels_last)
        }
    };
    (@ generalized_mean_backward) => {
        fn generalized_mean_backward(
            x: $crate::ops::Float<Self>,
            powers: $crate::ops::Float<Self>,
            mask: $crate::ops::Float<Self>,
            output: $crate::ops::Float<Self>,
            grad: $crate::ops::Float<Self>,
            eps: f64,
            channels_last: bool,
        ) -> ($crate::ops::Float<Self>, $crate::ops::Float<Self>) {
            $crate::ops::portable::generalized_mean_backward::<Self>(
                x,
                powers,
                mask,
                output,
                grad,
                eps,
                channels_last,
            )
        }
    };
    (@ weighted_sum) => {
        fn weighted_sum(
            x: $crate::ops::Float<Self>,
            weights: $crate::ops::Float<Self>,
            channels_last: bool,
        ) -> $crate::ops::Float<Self> {
            $crate::ops::portable::weighted_sum::<Self>(x, weights, channels_last)
        }
    };
    (@ weighted_sum_features_backward) => {
        fn weighted_sum_features_backward(
            weights: $crate::ops::Float<Self>,
            grad: $crate::ops::Float<Self>,
            channels_last: bool,
        ) -> $crate::ops::Float<Self> {
            $crate::ops::portable::weighted_sum_features_backward::<Self>(weights, grad, channels_last)
        }
    };
    (@ weighted_sum_weights_backward) => {
        fn weighted_sum_weights_backward(
            x: $crate::ops::Float<Self>,
            grad: $crate::ops::Float<Self>,
            channels_last: bool,
        ) -> $crate::ops::Float<Self> {
            $crate::ops::portable::weighted_sum_weights_backward::<Self>(x, grad, channels_last)
        }
    };
}

#[cfg(feature = "autodiff")]
mod autodiff;
#[cfg(feature = "wgpu")]
mod cube;
#[cfg(feature = "flex")]
mod flex;

#[cfg(all(test, feature = "autodiff"))]
pub(crate) use autodiff::BACKWARD_CALLS;

#[cfg(feature = "ndarray")]
impl super::PoolingOps for burn::backend::NdArray {
    portable_methods!(
        transport_costs,
        transport_costs_backward,
        partial_transport,
        partial_transport_backward,
        transport_marginals,
        transport_marginals_backward,
        generalized_mean,
        generalized_mean_backward,
        weighted_sum,
        weighted_sum_features_backward,
        weighted_sum_weights_backward,
    );
}
