//! Entropy-smoothed partial optimal transport with a free target marginal, the engine of
//! [`Gsp`](crate::pooling::Gsp) (gsp.md §4–6).
//!
//! Per sample, position j holds mass a_j (1/N, or 0 for padding); a fraction μ of the total is
//! moved onto K prototypes at cost c `[K, N]`, with entropy weight ε:
//!
//! ```text
//! minimise  Σ c P + ε Σ P (ln P − 1) + ε Σ ρ (ln ρ − 1)
//! s.t.      ρ_j + Σ_k P_kj = a_j,   Σ P = μ,   P, ρ ≥ 0
//! ```
//!
//! The layout of the module:
//! - [`settings`](TransportSettings): μ, ε and the solver's settings;
//! - `costs`: φ-normalised distances between features and prototypes, and their gradient;
//! - `solver`: the forward solve (Newton or Sinkhorn on the scalar dual β);
//! - `implicit_backward`: the closed-form gradient at the fixed point;
//! - `marginals`: the residual and per-prototype masses, all that GSP's pooling reads;
//! - [`PoolingOps`], the crate's backend-extension trait, carries the costs, the solve and the
//!   marginals as ops (its autodiff implementation records their analytical backwards);
//! - `fallback`: one tracked Newton step, for backends the extension does not cover.

pub(crate) mod costs;
mod fallback;
pub(crate) mod implicit_backward;
pub(crate) mod marginals;
mod settings;
pub(crate) mod solver;

use burn::backend::Dispatch;
use burn::tensor::{Int, Tensor};

pub use costs::{lipschitz_normalize, transport_costs};
pub use fallback::partial_transport_newton_step;
pub use settings::{TransportSettings, TransportSolver};

use crate::ops::PoolingOps;
pub use crate::ops::extension_covers;

/// A solved transport problem.
#[derive(Debug, Clone)]
pub struct TransportPlan {
    /// `[B, K+1, N]`: row 0 is the residual mass ρ of each position, rows 1..=K the plan P.
    pub plan: Tensor<3>,
    /// `[1]`: solver iterations run (the maximum over the batch).
    pub iterations: Tensor<1, Int>,
}

/// Solves the partial transport problem, with the analytical backward when the backend is
/// covered by [`PoolingOps`] (Flex, NdArray, wgpu and their autodiff devices, as enabled by
/// this crate's features), else with [`partial_transport_newton_step`].
///
/// # Shapes
///
/// - costs: `[B, K, N]`
/// - mass: `[B, N]`, each row sums to 1; 0 marks a padded position
/// - output plan: `[B, K+1, N]`
pub fn partial_transport(
    costs: Tensor<3>,
    mass: Tensor<2>,
    settings: &TransportSettings,
) -> TransportPlan {
    if extension_covers(&costs.device()) {
        let (plan, iterations) = <Dispatch as PoolingOps>::partial_transport(
            costs.into_dispatch(),
            mass.into_dispatch(),
            *settings,
        );
        TransportPlan {
            plan: Tensor::from_dispatch(plan),
            iterations: Tensor::from_dispatch(iterations),
        }
    } else {
        partial_transport_newton_step(costs, mass, settings)
    }
}

/// The marginals `[B, N + K]` of the solved transport (per sample the residual masses ρ_j,
/// then Σ_j P_kj per prototype) and the iterations run: what GSP's pooling reads. Through the
/// backend extension when it covers the device (its backward never expands the marginals'
/// gradient to the plan's size), else from [`partial_transport_newton_step`].
pub(crate) fn transport_marginals(
    costs: Tensor<3>,
    mass: Tensor<2>,
    settings: &TransportSettings,
) -> (Tensor<2>, Tensor<1, Int>) {
    if extension_covers(&costs.device()) {
        let (marginals, _plan, iterations) = <Dispatch as PoolingOps>::transport_marginals(
            costs.into_dispatch(),
            mass.into_dispatch(),
            *settings,
        );
        (
            Tensor::from_dispatch(marginals),
            Tensor::from_dispatch(iterations),
        )
    } else {
        let TransportPlan { plan, iterations } =
            partial_transport_newton_step(costs, mass, settings);
        (marginals::marginals_of(plan), iterations)
    }
}

#[cfg(all(test, feature = "flex"))]
mod tests {
    use super::*;
    use burn::tensor::{Bool, Device, Distribution, TensorData, Tolerance};

    use crate::transport::implicit_backward::implicit_cost_gradient;
    use crate::transport::marginals::{marginals_gradient_as_plan_gradient, marginals_of};
    use crate::transport::solver::solve;

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
                    let (marginals, _, _) = <Dispatch as PoolingOps>::transport_marginals(
                        costs.clone().into_dispatch(),
                        mass.clone().into_dispatch(),
                        settings,
                    );
                    Tensor::<2>::from_dispatch(marginals)
                        .into_data()
                        .assert_approx_eq::<f32>(
                            &marginals_of(portable.clone()).into_data(),
                            tolerance,
                        );
                    if transport_ratio < 1.0 {
                        let fused_grad = Tensor::<3>::from_dispatch(
                            <Dispatch as PoolingOps>::transport_marginals_backward(
                                fused.plan.clone().into_dispatch(),
                                marginals_grad.clone().into_dispatch(),
                                mass.clone().into_dispatch(),
                                epsilon,
                            ),
                        );
                        let portable_grad = implicit_cost_gradient(
                            portable.clone(),
                            marginals_gradient_as_plan_gradient(
                                marginals_grad.clone(),
                                [b, k + 1, n],
                            ),
                            mass.clone(),
                            epsilon,
                        );
                        fused_grad.into_data().assert_approx_eq::<f32>(
                            &portable_grad.into_data(),
                            Tolerance::rel_abs(1e-3, 1e-5),
                        );
                        let fused_grad = Tensor::<3>::from_dispatch(
                            <Dispatch as PoolingOps>::partial_transport_backward(
                                fused.plan.clone().into_dispatch(),
                                grad.clone().into_dispatch(),
                                mass.clone().into_dispatch(),
                                epsilon,
                            ),
                        );
                        let portable_grad =
                            implicit_cost_gradient(portable, grad.clone(), mass.clone(), epsilon);
                        fused_grad.into_data().assert_approx_eq::<f32>(
                            &portable_grad.into_data(),
                            Tolerance::rel_abs(1e-3, 1e-5),
                        );
                    }
                }
            }
        }
    }
}
