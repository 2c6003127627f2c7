//! The pure-tensor path: exact gradients from ordinary autodiff, for any backend.
//!
//! β is solved on detached tensors, then **one Newton step written with tracked ops**,
//! β = β* − f(β*)/f'(β*), makes β a differentiable function of the costs whose first
//! derivative at the fixed point is the implicit one (detaching β without that step gives a
//! gradient about 5 % off). The tape holds one step, not the iterations, so memory stays flat.
//!
//! Used when the device's backend is not covered by the extension, and as an independent
//! oracle for the analytical backward in tests.

use burn::tensor::{Bool, Int, Tensor};

use super::settings::TransportSettings;
use super::solver::{anchor, kernel, plan_from_beta, report_tensors, sigmoid, solve_beta};

/// Smallest f'(β) divided by in the tracked step (f' = 0 only when every σ saturated, where
/// f = 0 too).
const MIN_SLOPE: f64 = 1e-30;

/// The transport plan `[B, K+1, N]` for costs `[B, K, N]` and masses `[B, N]` (rows summing
/// to 1, 0 = padded position), with gradients from one tracked Newton step; also the
/// iterations run `[1]` and whether the solve converged `[1]`.
pub fn partial_transport_newton_step(
    costs: Tensor<3>,
    mass: Tensor<2>,
    settings: &TransportSettings,
) -> (Tensor<3>, Tensor<1, Int>, Tensor<1, Bool>) {
    let mass = mass.detach();
    let (log_mass, softmax) = kernel(costs, settings.epsilon);
    let log_mass = anchor(log_mass, &mass);
    let (beta, report) = solve_beta(log_mass.clone().detach(), mass.clone(), settings);
    let sigma = sigmoid(log_mass.clone() + beta.clone());
    let residual = (sigma.clone() * mass.clone())
        .sum_dim(1)
        .sub_scalar(settings.transport_ratio);
    let slope = (sigma.clone() * sigma.neg().add_scalar(1.0) * mass.clone())
        .sum_dim(1)
        .clamp_min(MIN_SLOPE);
    let beta = beta - residual / slope;
    let plan = plan_from_beta(softmax, log_mass, beta, mass);
    let (iterations, converged) = report_tensors(report, &plan.device());
    (plan, iterations, converged)
}
