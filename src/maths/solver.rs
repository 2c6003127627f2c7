//! The forward solve: costs to transport plan, on plain (untracked) tensors.
//!
//! Per sample, with position masses a_j (1/N, or 0 for padding) and
//! ℓ_j = logsumexp_k(−c_kj / ε), the optimum of the problem (docs/maths.md §3) is closed-form up to one scalar β:
//!
//! ```text
//! t_j  = a_j σ(β + ℓ_j)                 mass sent by position j
//! P_kj = t_j · softmax_k(−c_·j / ε)_k   the plan
//! ρ_j  = a_j σ(−β − ℓ_j)                residual mass (= a_j − t_j, without cancellation)
//! Σ_j a_j σ(β + ℓ_j) = μ                the equation for β
//! ```
//!
//! So the costs `[B, K, N]` are touched once (for ℓ and at the end for the plan), and the
//! iterations only see `[B, N]` vectors. Everything is in the log domain: the linear kernel
//! exp(−c/ε) underflows in f32 once 2/ε ≳ 85.

use burn::tensor::{Int, Tensor};

use super::settings::{TransportSettings, TransportSolver};

/// β used for μ = 1, where the root is at +∞: large enough that σ(β + ℓ) = 1 in any float.
pub(crate) const BETA_AT_FULL_TRANSPORT: f64 = 1e30;

/// One exp pass over the costs `[B, K, N]` gives both ℓ_j = logsumexp_k(−c_kj / ε) `[B, N]`
/// and softmax_k(−c_·j / ε) `[B, K, N]`. Tracks gradients if `costs` does.
pub(crate) fn kernel(costs: Tensor<3>, epsilon: f64) -> (Tensor<2>, Tensor<3>) {
    let scaled = costs.div_scalar(-epsilon);
    // The shift changes neither result, so its gradient is exactly zero: detach it.
    let shift = scaled.clone().max_dim(1).detach();
    let weights = (scaled - shift.clone()).exp();
    let total = weights.clone().sum_dim(1);
    let log_mass = (total.clone().log() + shift).squeeze_dim(1);
    (log_mass, weights / total)
}

/// ℓ_j = logsumexp_k(−c_kj / ε): `[B, K, N]` → `[B, N]`.
#[cfg(test)]
pub(crate) fn log_kernel_mass(costs: Tensor<3>, epsilon: f64) -> Tensor<2> {
    kernel(costs, epsilon).0
}

/// softplus(x) = ln(1 + eˣ) without overflow.
pub(crate) fn softplus(x: Tensor<2>) -> Tensor<2> {
    x.clone().clamp_min(0.0) + x.abs().neg().exp().log1p()
}

/// σ(x) = exp(−softplus(−x)), exact in both tails.
pub(crate) fn sigmoid(x: Tensor<2>) -> Tensor<2> {
    softplus(x.neg()).neg().exp()
}

/// The plan `[B, K+1, N]` (row 0 = ρ, rows 1..=K = P) for a given β `[B, 1]`, from the
/// [`kernel`]. Tracks gradients through its arguments if they are tracked.
pub(crate) fn plan_from_beta(
    softmax: Tensor<3>,
    log_mass: Tensor<2>,
    beta: Tensor<2>,
    mass: Tensor<2>,
) -> Tensor<3> {
    let logits = beta + log_mass;
    let sent = sigmoid(logits.clone()) * mass.clone();
    let residual = sigmoid(logits.neg()) * mass;
    let plan = softmax * sent.unsqueeze_dim(1);
    Tensor::cat(vec![residual.unsqueeze_dim(1), plan], 1)
}

/// Solves Σ_j a_j σ(β + ℓ_j) = μ for β `[B, 1]`; also returns the iterations run.
///
/// `log_mass` and `mass` must not be tracked (detach them first). Reads one scalar per
/// iteration back from the device for the stopping test.
pub(crate) fn solve_beta(
    log_mass: Tensor<2>,
    mass: Tensor<2>,
    settings: &TransportSettings,
) -> (Tensor<2>, usize) {
    let [batch, _] = log_mass.dims();
    let device = log_mass.device();
    let mu = settings.transport_ratio;
    if mu >= 1.0 {
        return (Tensor::full([batch, 1], BETA_AT_FULL_TRANSPORT, &device), 0);
    }
    let padding = mass.clone().lower_equal_elem(0.0);
    let logit_mu = (mu / (1.0 - mu)).ln();
    // The root lies in [logit μ − max ℓ, logit μ − min ℓ] over the valid positions; padded
    // positions are filled with the value the reduction ignores.
    let bound = |ignored: f64, extreme: fn(Tensor<2>, usize) -> Tensor<2>| {
        extreme(log_mass.clone().mask_fill(padding.clone(), ignored), 1)
            .neg()
            .add_scalar(logit_mu)
    };
    let lower = bound(f64::NEG_INFINITY, Tensor::max_dim);
    let upper = bound(f64::INFINITY, Tensor::min_dim);
    // Tighter bounds from σ(u) ≤ eᵘ and σ(−u) ≤ e⁻ᵘ:
    // at β = ln μ − lse(ln a + ℓ) the mass is ≤ μ; at β = lse(ln a − ℓ) − ln(1 − μ) it is ≥ μ.
    let log_weight = mass
        .clone()
        .log()
        .mask_fill(padding.clone(), f64::NEG_INFINITY);
    let lower = lower.max_pair(
        logsumexp(log_weight.clone() + log_mass.clone())
            .neg()
            .add_scalar(mu.ln()),
    );
    let upper =
        upper.min_pair(logsumexp(log_weight - log_mass.clone()).sub_scalar((1.0 - mu).ln()));
    match settings.solver {
        TransportSolver::Newton => newton(log_mass, mass, lower, upper, settings),
        TransportSolver::Sinkhorn => sinkhorn(log_mass, mass, padding, lower, settings),
    }
}

/// logsumexp over positions, `[B, N]` → `[B, 1]` (−∞ entries allowed, not all of a row).
fn logsumexp(x: Tensor<2>) -> Tensor<2> {
    let shift = x.clone().max_dim(1);
    (x - shift.clone()).exp().sum_dim(1).log() + shift
}

/// Transported mass minus μ, per sample: `[B, 1]`, and the sigmoids it used.
fn mass_residual(
    log_mass: &Tensor<2>,
    mass: &Tensor<2>,
    beta: &Tensor<2>,
    mu: f64,
) -> (Tensor<2>, Tensor<2>) {
    let sigma = sigmoid(log_mass.clone() + beta.clone());
    let residual = (sigma.clone() * mass.clone()).sum_dim(1).sub_scalar(mu);
    (residual, sigma)
}

/// Whether every sample's mass constraint holds within the tolerance (one device read).
fn converged(residual: &Tensor<2>, tolerance: f64) -> bool {
    residual.clone().abs().max().into_scalar::<f64>() <= tolerance
}

/// Safeguarded Newton on the log of the mass.
///
/// F(β) = Σ a σ(β+ℓ) is increasing. For μ ≤ 1/2 we run Newton on ln F − ln μ from the lower
/// bound, where F ≈ e^β Σ a e^ℓ is nearly exponential and its log nearly linear; for μ > 1/2
/// the mirror image, on the residual mass R(β) = Σ a σ(−β−ℓ) from the upper bound. Both use
/// F' = −R' = Σ a σ(1−σ). The bracket shrinks with every step and a step that leaves it is
/// replaced by bisection, so the iteration always converges: 2–4 steps for typical costs at
/// ε = 0.2, about 10 when ε is so small that the sigmoids are near steps.
fn newton(
    log_mass: Tensor<2>,
    mass: Tensor<2>,
    mut lower: Tensor<2>,
    mut upper: Tensor<2>,
    settings: &TransportSettings,
) -> (Tensor<2>, usize) {
    let mu = settings.transport_ratio;
    let from_below = mu <= 0.5;
    let mut beta = if from_below {
        lower.clone()
    } else {
        upper.clone()
    };
    let mut change: Option<Tensor<1>> = None;
    for iteration in 0..settings.max_iterations {
        let (residual, sigma) = mass_residual(&log_mass, &mass, &beta, mu);
        if converged_or_stalled(&residual, change.take(), settings.tolerance) {
            return (beta, iteration);
        }
        let slope = (sigma.clone() * sigma.clone().neg().add_scalar(1.0) * mass.clone()).sum_dim(1);
        let too_high = residual.clone().greater_elem(0.0);
        upper = upper.mask_where(too_high.clone(), beta.clone());
        lower = beta.clone().mask_where(too_high, lower);
        let step = if from_below {
            let sent = residual.add_scalar(mu);
            beta.clone() - sent.clone().div_scalar(mu).log() * sent / slope
        } else {
            let kept =
                (sigmoid(log_mass.clone().add(beta.clone()).neg()) * mass.clone()).sum_dim(1);
            beta.clone() + kept.clone().div_scalar(1.0 - mu).log() * kept / slope
        };
        // Closed bounds: at the rounding floor the step is 0 and lands on a bound.
        let inside = step
            .clone()
            .greater_equal(lower.clone())
            .bool_and(step.clone().lower_equal(upper.clone()));
        let bisection = (lower.clone() + upper.clone()).div_scalar(2.0);
        let next = bisection.mask_where(inside, step);
        change = Some((next.clone() - beta).abs().max());
        beta = next;
    }
    (beta, settings.max_iterations)
}

/// Whether every sample's mass is within the tolerance, or the last step changed no β (the
/// float's rounding floor is above the tolerance). One device read.
fn converged_or_stalled(residual: &Tensor<2>, change: Option<Tensor<1>>, tolerance: f64) -> bool {
    let error = residual.clone().abs().max();
    match change {
        None => error.into_scalar::<f64>() <= tolerance,
        Some(change) => {
            let read = Tensor::cat(vec![error, change], 0).into_data();
            let values = read.iter::<f64>().collect::<Vec<_>>();
            values[0] <= tolerance || values[1] == 0.0
        }
    }
}

/// The reference's scaling iteration in the log domain:
/// β ← ln μ − logsumexp_j(ln a_j + ℓ_j − softplus(β + ℓ_j)).
fn sinkhorn(
    log_mass: Tensor<2>,
    mass: Tensor<2>,
    padding: Tensor<2, burn::tensor::Bool>,
    start: Tensor<2>,
    settings: &TransportSettings,
) -> (Tensor<2>, usize) {
    let mu = settings.transport_ratio;
    let log_weight = (mass.clone().log() + log_mass.clone()).mask_fill(padding, f64::NEG_INFINITY);
    let mut beta = start;
    for iteration in 0..settings.max_iterations {
        let (residual, _) = mass_residual(&log_mass, &mass, &beta, mu);
        if converged(&residual, settings.tolerance) {
            return (beta, iteration);
        }
        let terms = log_weight.clone() - softplus(log_mass.clone() + beta);
        beta = logsumexp(terms).neg().add_scalar(mu.ln());
    }
    (beta, settings.max_iterations)
}

/// The whole forward solve on untracked tensors: plan `[B, K+1, N]` and iterations run.
pub(crate) fn solve(
    costs: Tensor<3>,
    mass: Tensor<2>,
    settings: &TransportSettings,
) -> (Tensor<3>, usize) {
    let (log_mass, softmax) = kernel(costs, settings.epsilon);
    let (beta, iterations) = solve_beta(log_mass.clone(), mass.clone(), settings);
    (plan_from_beta(softmax, log_mass, beta, mass), iterations)
}

/// The iteration count as a one-element int tensor, to cross the backend-extension boundary.
pub(crate) fn iterations_tensor(
    iterations: usize,
    device: &burn::tensor::Device,
) -> Tensor<1, Int> {
    Tensor::from_data([iterations as i64], device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, Distribution};

    /// Newton needs few steps for every μ, at the default ε and at a tiny one (ℓ spanning
    /// ~100, sigmoids near steps), and reaches the same fixed point as the Sinkhorn iteration.
    #[test]
    fn newton_converges_fast_and_agrees_with_sinkhorn() {
        let device = Device::flex();
        device.seed(9);
        let costs = Tensor::<3>::random([4, 8, 50], Distribution::Uniform(0.0, 2.0), &device);
        let mass = Tensor::<2>::full([4, 50], 1.0 / 50.0, &device);
        for (epsilon, most) in [(0.2, 5), (0.02, 12)] {
            for mu in [0.05, 0.3, 0.7, 0.95] {
                check(&costs, &mass, mu, epsilon, most);
            }
        }
    }

    fn check(costs: &Tensor<3>, mass: &Tensor<2>, mu: f64, epsilon: f64, most: usize) {
        {
            let settings = |solver, max_iterations| TransportSettings {
                transport_ratio: mu,
                epsilon,
                max_iterations,
                tolerance: 1e-6,
                solver,
            };
            let log_mass = log_kernel_mass(costs.clone(), epsilon);
            let (newton, steps) = solve_beta(
                log_mass.clone(),
                mass.clone(),
                &settings(TransportSolver::Newton, 100),
            );
            assert!(
                steps <= most,
                "μ = {mu}, ε = {epsilon}: {steps} Newton steps"
            );
            let (sinkhorn, _) = solve_beta(
                log_mass.clone(),
                mass.clone(),
                &settings(TransportSolver::Sinkhorn, 5000),
            );
            // Newton may stop at f32's rounding floor just above the tolerance.
            let (residual, _) = mass_residual(&log_mass, mass, &newton, mu);
            assert!(converged(&residual, 1e-5), "μ = {mu}, ε = {epsilon}");
            let (residual, _) = mass_residual(&log_mass, mass, &sinkhorn, mu);
            assert!(converged(&residual, 1e-5), "μ = {mu}, ε = {epsilon}");
            let gap = (newton - sinkhorn).abs().max().into_scalar::<f64>();
            assert!(gap < 1e-3, "μ = {mu}, ε = {epsilon}: β differs by {gap}");
        }
    }
}
