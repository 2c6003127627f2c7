//! Entropy-smoothed partial optimal transport with a free target marginal, the engine of
//! [`Gsp`](crate::pooling::Gsp) (docs/maths.md §2–4).
//!
//! Per sample, position j holds mass a_j (1/N, or 0 for padding); a fraction μ of the total is
//! moved onto K prototypes at cost c `[K, N]`, with entropy weight ε:
//!
//! ```text
//! minimise  Σ c P + ε Σ P (ln P − 1) + ε Σ ρ (ln ρ − 1)
//! s.t.      ρ_j + Σ_k P_kj = a_j,   Σ P = μ,   P, ρ ≥ 0
//! ```
//!
//! The optimum is closed-form up to one scalar dual β per sample, found by Newton (or
//! Sinkhorn) iterations; the gradient with respect to the costs comes from implicit
//! differentiation at the fixed point, so backward memory does not grow with the iterations.
//! On a device the crate's extension does not cover, the same plan is differentiated through
//! one tracked Newton step, which gives the same first derivative.

use burn::tensor::{Int, Tensor};

use crate::layout::Layout;
use crate::ops::routing;

pub use crate::maths::costs::lipschitz_normalize;
pub use crate::maths::settings::{TransportSettings, TransportSolver};

/// A solved transport problem.
#[derive(Debug, Clone)]
pub struct TransportPlan {
    /// `[B, K+1, N]`: row 0 is the residual mass ρ of each position, rows 1..=K the plan P.
    pub plan: Tensor<3>,
    /// `[1]`: solver iterations run (the maximum over the batch).
    pub iterations: Tensor<1, Int>,
}

/// c_kj = ‖φ(ω_k) − φ(x_j)‖₂ (not squared), φ(v) = v / max(1, ‖v‖₂), between every position
/// of `features` and every prototype: GSP's costs, each in [0, 2].
///
/// # Shapes
///
/// - features: `[B, C, N]` or `[B, N, C]` as `layout` says
/// - prototypes: `[K, C]`
/// - output: `[B, K, N]`
///
/// # Panics
///
/// If the features' and the prototypes' channel counts differ.
pub fn transport_costs(features: Tensor<3>, prototypes: Tensor<2>, layout: Layout) -> Tensor<3> {
    let (_, _, channels) = layout.split(features.dims());
    let [_, width] = prototypes.dims();
    assert!(
        channels == width,
        "transport_costs: channel mismatch: the features have C = {channels} ({layout:?}), the prototypes [K, C] have C = {width}"
    );
    routing::transport_costs(features, prototypes, layout)
}

/// Solves the partial transport problem, with the analytical backward.
///
/// # Shapes
///
/// - costs: `[B, K, N]`
/// - mass: `[B, N]`, each row non-negative and summing to 1; 0 marks a padded position
/// - output plan: `[B, K+1, N]`
///
/// # Panics
///
/// If a setting is invalid (μ outside (0, 1], ε, `max_iterations` or `tolerance` not
/// positive), the shapes do not match, or a mass row is negative somewhere or does not sum
/// to 1 (within 1e-3). Checking the masses reads `[B]` values back from the device.
pub fn partial_transport(
    costs: Tensor<3>,
    mass: Tensor<2>,
    settings: &TransportSettings,
) -> TransportPlan {
    settings.validate("partial_transport");
    let [batch, _, positions] = costs.dims();
    let dims = mass.dims();
    assert!(
        dims == [batch, positions],
        "partial_transport: mass shape mismatch: expected [B, N] = [{batch}, {positions}] (from the costs [B, K, N]), got {dims:?}"
    );
    check_masses(&mass);
    let (plan, iterations) = routing::partial_transport(costs, mass, settings);
    TransportPlan { plan, iterations }
}

/// Panics, naming the first offending row, unless every row of `mass` `[B, N]` is
/// non-negative and sums to 1 within 1e-3.
fn check_masses(mass: &Tensor<2>) {
    let detached = mass.clone().detach();
    let sums = detached.clone().sum_dim(1).into_data().convert::<f64>();
    let minima = detached.min_dim(1).into_data().convert::<f64>();
    let sums = sums.iter::<f64>();
    for (row, (sum, minimum)) in sums.zip(minima.iter::<f64>()).enumerate() {
        assert!(
            minimum >= 0.0 && (sum - 1.0).abs() <= 1e-3,
            "partial_transport: every mass row must be non-negative and sum to 1, got row {row} with sum {sum} and minimum {minimum}"
        );
    }
}

#[cfg(all(test, feature = "flex"))]
mod tests {
    use super::*;
    use burn::tensor::{Bool, Device, Distribution, TensorData, Tolerance};

    use burn::backend::Dispatch;

    use crate::maths::implicit_backward::implicit_cost_gradient;
    use crate::maths::marginals::{marginals_gradient_as_plan_gradient, marginals_of};
    use crate::maths::solver::solve;
    use crate::ops::{PoolingOps, TransportOutput};

    /// The fused Flex solve and backward, and its marginals with their backward, against the
    /// portable ones (tensor ops), for both solvers, transport ratios from 0.05 to 1, a small
    /// and the default ε, with padding.
    #[test]
    fn fused_kernel_matches_portable_solver_and_backward() {
        let device = Device::flex();
        device.seed(6);
        let (b, k, n) = (3, 5, 9);
        let costs = Tensor::<3>::random([b, k, n], Distribution::Uniform(0.0, 2.0), &device);
        let keep: Vec<bool> = (0..b * n).map(|i| i % 5 != 4).collect();
        let valid = Tensor::<2, Bool>::from_bool(TensorData::new(keep, [b, n]), &device).float();
        let mass = valid.clone() / valid.sum_dim(1);
        let grad = Tensor::<3>::random([b, k + 1, n], Distribution::Uniform(-1.0, 1.0), &device);
        let marginals_grad =
            Tensor::<2>::random([b, n + k], Distribution::Uniform(-1.0, 1.0), &device);
        for solver in [TransportSolver::Newton, TransportSolver::Sinkhorn] {
            for epsilon in [0.2, 0.05] {
                for transport_ratio in [0.05, 0.3, 0.9, 1.0] {
                    let settings = TransportSettings {
                        transport_ratio,
                        epsilon,
                        max_iterations: 2000,
                        tolerance: 1e-7,
                        solver,
                    };
                    let case = format!("{solver:?}, ε = {epsilon}, μ = {transport_ratio}");
                    let fused = partial_transport(costs.clone(), mass.clone(), &settings);
                    let (portable, _) = solve(costs.clone(), mass.clone(), &settings);
                    let tolerance = Tolerance::rel_abs(1e-4, 1e-6);
                    fused
                        .plan
                        .clone()
                        .into_data()
                        .assert_approx_eq::<f32>(&portable.clone().into_data(), tolerance);
                    let total = fused.plan.clone().slice([0..b, 1..k + 1, 0..n]).sum_dim(2);
                    let total = total.sum_dim(1).into_data().try_to_vec::<f32>().unwrap();
                    for t in total {
                        assert!(
                            (t as f64 - transport_ratio).abs() < 1e-5,
                            "{case}: Σ P = {t}"
                        );
                    }
                    let (marginals, _, _) = <Dispatch as PoolingOps>::partial_transport(
                        costs.clone().into_dispatch(),
                        mass.clone().into_dispatch(),
                        settings,
                        TransportOutput::Marginals,
                    );
                    Tensor::<2>::from_dispatch(marginals)
                        .into_data()
                        .assert_approx_eq::<f32>(
                            &marginals_of(portable.clone()).into_data(),
                            tolerance,
                        );
                    if transport_ratio < 1.0 {
                        // The kernel's backward of `output` for ∂L/∂output = `grad`, against
                        // the implicit cost gradient of the same ∂L/∂plan.
                        let check = |grad, output, plan_grad: Tensor<3>| {
                            let kernel = <Dispatch as PoolingOps>::partial_transport_backward(
                                fused.plan.clone().into_dispatch(),
                                grad,
                                mass.clone().into_dispatch(),
                                epsilon,
                                output,
                            );
                            let reference = implicit_cost_gradient(
                                portable.clone(),
                                plan_grad,
                                mass.clone(),
                                epsilon,
                            );
                            Tensor::<3>::from_dispatch(kernel)
                                .into_data()
                                .assert_approx_eq::<f32>(
                                    &reference.into_data(),
                                    Tolerance::rel_abs(1e-3, 1e-5),
                                );
                        };
                        let as_plan = marginals_gradient_as_plan_gradient(
                            marginals_grad.clone(),
                            [b, k + 1, n],
                        );
                        check(
                            marginals_grad.clone().into_dispatch(),
                            TransportOutput::Marginals,
                            as_plan,
                        );
                        check(
                            grad.clone().into_dispatch(),
                            TransportOutput::Plan,
                            grad.clone(),
                        );
                    }
                }
            }
        }
    }
}

#[cfg(all(test, feature = "flex"))]
mod validation {
    use super::*;
    use burn::tensor::Device;

    fn settings() -> TransportSettings {
        TransportSettings {
            transport_ratio: 0.3,
            epsilon: 0.2,
            max_iterations: 50,
            tolerance: 1e-6,
            solver: TransportSolver::Newton,
        }
    }

    #[test]
    #[should_panic(expected = "partial_transport: `transport_ratio` must be in (0, 1], got 0")]
    fn invalid_settings_panic() {
        let device = Device::flex();
        let settings = TransportSettings {
            transport_ratio: 0.0,
            ..settings()
        };
        let mass = Tensor::full([1, 3], 1.0 / 3.0, &device);
        partial_transport(Tensor::zeros([1, 2, 3], &device), mass, &settings);
    }

    #[test]
    #[should_panic(
        expected = "partial_transport: mass shape mismatch: expected [B, N] = [1, 3] (from the costs [B, K, N]), got [1, 4]"
    )]
    fn mass_of_wrong_shape_panics() {
        let device = Device::flex();
        let mass = Tensor::full([1, 4], 0.25, &device);
        partial_transport(Tensor::zeros([1, 2, 3], &device), mass, &settings());
    }

    #[test]
    #[should_panic(
        expected = "partial_transport: every mass row must be non-negative and sum to 1, got row 1 with sum 2"
    )]
    fn mass_not_summing_to_one_panics() {
        let device = Device::flex();
        let mass = Tensor::<2>::from_data([[0.5, 0.5], [1.0, 1.0]], &device);
        partial_transport(Tensor::zeros([2, 2, 2], &device), mass, &settings());
    }

    #[test]
    #[should_panic(expected = "transport_costs: channel mismatch")]
    fn costs_channel_mismatch_panics() {
        let device = Device::flex();
        transport_costs(
            Tensor::zeros([1, 3, 4], &device),
            Tensor::zeros([2, 4], &device),
            Layout::ChannelsFirst,
        );
    }
}

/// Not API: the route that devices outside the extension take, for the integration tests'
/// f64 process, which checks it against the analytical backward. Hidden, and free to change.
#[doc(hidden)]
pub mod fallback {
    pub use crate::maths::newton_step::partial_transport_newton_step;
}
