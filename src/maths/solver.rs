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
//! exp(−c/ε) underflows in f32 once 2/ε ≳ 85. ℓ is anchored per sample (its largest valid
//! value subtracted, [`anchor`]) before the solve: β absorbs any common shift, and with costs
//! of 1e30 an unanchored β + ℓ would lose every digit of the logit.
//!
//! Both iterations stop on the tolerance, on a hard cap, on a stall (no progress for
//! [`STALL_PATIENCE`] iterations: the float's rounding floor) and on NaN, and say which.

use burn::tensor::{Bool, Int, Tensor};

use super::settings::{STALL_PATIENCE, TransportSettings, TransportSolver};

/// β used for μ = 1, where the root is at +∞: large enough that σ(β + ℓ) = 1 in any float for
/// anchored ℓ (f32's largest value: ∞ in the half types, which is as good).
pub(crate) const BETA_AT_FULL_TRANSPORT: f64 = f32::MAX as f64;

/// How a solve ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SolveReport {
    /// Iterations run (β updates).
    pub iterations: usize,
    /// Whether every sample's mass met the tolerance (false after the cap, a stall or a NaN).
    pub converged: bool,
}

impl SolveReport {
    /// No iteration needed (μ = 1, or an empty batch).
    pub(crate) const IMMEDIATE: Self = Self {
        iterations: 0,
        converged: true,
    };

    /// The report of a batch from its samples' reports: the most iterations, and converged
    /// only if every sample is.
    pub(crate) fn merge(self, other: Self) -> Self {
        Self {
            iterations: self.iterations.max(other.iterations),
            converged: self.converged && other.converged,
        }
    }
}

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

/// ℓ − max_{j valid} ℓ_j per sample (the maximum detached: the plan does not depend on it, so
/// its derivative is exactly zero). Keeps gradients through `log_mass`.
pub(crate) fn anchor(log_mass: Tensor<2>, mass: &Tensor<2>) -> Tensor<2> {
    let padding = mass.clone().detach().lower_equal_elem(0.0);
    let largest = log_mass
        .clone()
        .detach()
        .mask_fill(padding, f64::NEG_INFINITY)
        .max_dim(1);
    log_mass - largest
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
/// [`kernel`] (with ℓ anchored as β was solved for). Tracks gradients through its arguments if
/// they are tracked.
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

/// Solves Σ_j a_j σ(β + ℓ_j) = μ for β `[B, 1]`; also says how the solve ended.
///
/// `log_mass` (anchored, see [`anchor`]) and `mass` must not be tracked (detach them first).
/// Reads four scalars per iteration back from the device for the stopping tests.
pub(crate) fn solve_beta(
    log_mass: Tensor<2>,
    mass: Tensor<2>,
    settings: &TransportSettings,
) -> (Tensor<2>, SolveReport) {
    let [batch, _] = log_mass.dims();
    let device = log_mass.device();
    let mu = settings.transport_ratio;
    if mu >= 1.0 || batch == 0 {
        let beta = Tensor::full([batch, 1], BETA_AT_FULL_TRANSPORT, &device);
        return (beta, SolveReport::IMMEDIATE);
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

/// What one iteration tells the stopping rule (for a batch, in one device read).
pub(crate) struct Status {
    /// The largest |residual| over the samples that are not NaN.
    pub error: f64,
    /// Whether some sample's residual is NaN (a non-finite input): it can never converge.
    pub nan: bool,
    /// Whether some sample still outside the tolerance made progress.
    pub progress: bool,
    /// Whether some sample still outside the tolerance has a β other than the last one.
    pub moved: bool,
}

impl Status {
    /// The status of one sample (the fused kernels solve each on its own).
    pub(crate) fn of_sample(residual: f64, progress: bool, moved: bool) -> Self {
        let nan = residual.is_nan();
        Self {
            error: if nan { 0.0 } else { residual.abs() },
            nan,
            progress,
            moved,
        }
    }

    /// `progress` and `moved` `[B, 1]` per sample, counted only where the residual is finite
    /// and outside the tolerance.
    pub(crate) fn read(
        residual: &Tensor<2>,
        progress: Tensor<2, Bool>,
        moved: Tensor<2, Bool>,
        tolerance: f64,
    ) -> Self {
        let nan = residual.clone().is_nan();
        let error = residual.clone().abs().mask_fill(nan.clone(), 0.0);
        let open = error.clone().greater_elem(tolerance);
        let any = |flags: Tensor<2, Bool>| flags.bool_and(open.clone()).any().float();
        let read = Tensor::cat(
            vec![error.max(), nan.any().float(), any(progress), any(moved)],
            0,
        )
        .into_data()
        .convert::<f64>();
        let values = read.iter::<f64>().collect::<Vec<_>>();
        Self {
            error: values[0],
            nan: values[1] != 0.0,
            progress: values[2] != 0.0,
            moved: values[3] != 0.0,
        }
    }
}

/// The stopping rule every iteration shares (portable and Flex, Newton and Sinkhorn; Cube's
/// kernel writes the same in CubeCL), fed one [`Status`] per iteration before the step from
/// iteration `iteration`: `Some(report)` to stop. In order: the tolerance met (converged
/// unless a sample is NaN); the cap; β unchanged; no progress for [`STALL_PATIENCE`]
/// iterations.
pub(crate) struct Stopping {
    cap: usize,
    tolerance: f64,
    patience: usize,
    idle: usize,
}

impl Stopping {
    pub(crate) fn new(settings: &TransportSettings) -> Self {
        Self::with_patience(settings.iteration_cap(), settings.tolerance, STALL_PATIENCE)
    }

    /// The same rule for another solver: its cap, tolerance and stall patience.
    pub(crate) fn with_patience(cap: usize, tolerance: f64, patience: usize) -> Self {
        Self {
            cap,
            tolerance,
            patience,
            idle: 0,
        }
    }

    pub(crate) fn check(&mut self, iteration: usize, status: Status) -> Option<SolveReport> {
        let report = |converged| {
            Some(SolveReport {
                iterations: iteration,
                converged,
            })
        };
        if status.error <= self.tolerance {
            // The finite samples converged; a NaN sample never does.
            return report(!status.nan);
        }
        if iteration >= self.cap || (iteration > 0 && !status.moved) {
            return report(false);
        }
        self.idle = if status.progress { 0 } else { self.idle + 1 };
        if self.idle >= self.patience {
            return report(false);
        }
        None
    }
}

/// Safeguarded Newton on the log of the mass.
///
/// F(β) = Σ a σ(β+ℓ) is increasing. For μ ≤ 1/2 we run Newton on ln F − ln μ from the lower
/// bound, where F ≈ e^β Σ a e^ℓ is nearly exponential and its log nearly linear; for μ > 1/2
/// the mirror image, on the residual mass R(β) = Σ a σ(−β−ℓ) from the upper bound. Both use
/// F' = −R' = Σ a σ(1−σ). The bracket shrinks with every step and a step that leaves it is
/// replaced by bisection, so the iteration always converges: 2–4 steps for typical costs at
/// ε = 0.2, about 10 when ε is so small that the sigmoids are near steps. Progress is the
/// bracket shrinking: at the float's rounding floor it stops doing so.
fn newton(
    log_mass: Tensor<2>,
    mass: Tensor<2>,
    mut lower: Tensor<2>,
    mut upper: Tensor<2>,
    settings: &TransportSettings,
) -> (Tensor<2>, SolveReport) {
    let mu = settings.transport_ratio;
    let from_below = mu <= 0.5;
    let mut beta = if from_below {
        lower.clone()
    } else {
        upper.clone()
    };
    let mut previous = beta.clone();
    let mut stopping = Stopping::new(settings);
    for iteration in 0.. {
        let (residual, sigma) = mass_residual(&log_mass, &mass, &beta, mu);
        let too_high = residual.clone().greater_elem(0.0);
        // A bound moves strictly inward unless β sits on it (the rounding floor). Not the
        // width: next to a bound of 1e24 it does not change in any float.
        let shrank = beta
            .clone()
            .lower(upper.clone())
            .bool_and(too_high.clone())
            .bool_or(
                beta.clone()
                    .greater(lower.clone())
                    .bool_and(too_high.clone().bool_not()),
            );
        upper = upper.mask_where(too_high.clone(), beta.clone());
        lower = beta.clone().mask_where(too_high, lower);
        let moved = beta.clone().not_equal(previous);
        let status = Status::read(&residual, shrank, moved, settings.tolerance);
        if let Some(report) = stopping.check(iteration, status) {
            return (beta, report);
        }
        let slope = (sigma.clone() * sigma.clone().neg().add_scalar(1.0) * mass.clone()).sum_dim(1);
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
        previous = beta;
        beta = bisection.mask_where(inside, step);
    }
    unreachable!("the stopping rule ends the loop at the cap")
}

/// The reference's scaling iteration in the log domain:
/// β ← ln μ − logsumexp_j(ln a_j + ℓ_j − softplus(β + ℓ_j)). From the lower bound it rises
/// monotonically to the root: progress is β exceeding every earlier value.
fn sinkhorn(
    log_mass: Tensor<2>,
    mass: Tensor<2>,
    padding: Tensor<2, Bool>,
    start: Tensor<2>,
    settings: &TransportSettings,
) -> (Tensor<2>, SolveReport) {
    let mu = settings.transport_ratio;
    let log_weight = (mass.clone().log() + log_mass.clone()).mask_fill(padding, f64::NEG_INFINITY);
    let mut beta = start;
    let mut highest = beta.clone();
    let mut previous = beta.clone();
    let mut stopping = Stopping::new(settings);
    for iteration in 0.. {
        let (residual, _) = mass_residual(&log_mass, &mass, &beta, mu);
        let terms = log_weight.clone() - softplus(log_mass.clone() + beta.clone());
        let next = logsumexp(terms).neg().add_scalar(mu.ln());
        let rose = next.clone().greater(highest.clone());
        highest = highest.max_pair(next.clone());
        let moved = beta.clone().not_equal(previous);
        let status = Status::read(&residual, rose, moved, settings.tolerance);
        if let Some(report) = stopping.check(iteration, status) {
            return (beta, report);
        }
        previous = beta;
        beta = next;
    }
    unreachable!("the stopping rule ends the loop at the cap")
}

/// The whole forward solve on untracked tensors: plan `[B, K+1, N]` and how the solve ended.
pub(crate) fn solve(
    costs: Tensor<3>,
    mass: Tensor<2>,
    settings: &TransportSettings,
) -> (Tensor<3>, SolveReport) {
    let (log_mass, softmax) = kernel(costs, settings.epsilon);
    let log_mass = anchor(log_mass, &mass);
    let (beta, report) = solve_beta(log_mass.clone(), mass.clone(), settings);
    (plan_from_beta(softmax, log_mass, beta, mass), report)
}

/// The report as tensors, to cross the backend-extension boundary: the iteration count `[1]`
/// and whether the solve converged `[1]`.
pub(crate) fn report_tensors(
    report: SolveReport,
    device: &burn::tensor::Device,
) -> (Tensor<1, Int>, Tensor<1, Bool>) {
    (
        Tensor::from_data([report.iterations as i64], device),
        Tensor::from_data([report.converged], device),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{cpu_devices, within_seconds};
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

    fn settings(mu: f64, epsilon: f64, solver: TransportSolver, max: usize) -> TransportSettings {
        TransportSettings {
            transport_ratio: mu,
            epsilon,
            max_iterations: max,
            tolerance: 1e-6,
            solver,
        }
    }

    fn check(costs: &Tensor<3>, mass: &Tensor<2>, mu: f64, epsilon: f64, most: usize) {
        let log_mass = anchor(log_kernel_mass(costs.clone(), epsilon), mass);
        let (newton, report) = solve_beta(
            log_mass.clone(),
            mass.clone(),
            &settings(mu, epsilon, TransportSolver::Newton, 100),
        );
        let steps = report.iterations;
        assert!(
            steps <= most,
            "μ = {mu}, ε = {epsilon}: {steps} Newton steps"
        );
        let (sinkhorn, _) = solve_beta(
            log_mass.clone(),
            mass.clone(),
            &settings(mu, epsilon, TransportSolver::Sinkhorn, 5000),
        );
        // Newton may stop at f32's rounding floor just above the tolerance.
        for beta in [&newton, &sinkhorn] {
            let (residual, _) = mass_residual(&log_mass, mass, beta, mu);
            let error = residual.abs().max().into_scalar::<f64>();
            assert!(error <= 1e-5, "μ = {mu}, ε = {epsilon}: {error}");
        }
        let gap = (newton - sinkhorn).abs().max().into_scalar::<f64>();
        assert!(gap < 1e-3, "μ = {mu}, ε = {epsilon}: β differs by {gap}");
    }

    /// The portable solve of `costs` `[B, K, N]` (uniform masses) on `device`, guarded.
    fn solve_guarded(
        device: &Device,
        costs: Vec<f32>,
        [b, k, n]: [usize; 3],
        settings: TransportSettings,
    ) -> (Vec<f32>, SolveReport) {
        let device = device.clone();
        within_seconds(20, &format!("{settings:?}"), move || {
            let costs = Tensor::<1>::from_floats(costs.as_slice(), &device).reshape([b, k, n]);
            let mass = Tensor::<2>::full([b, n], 1.0 / n as f64, &device);
            let (plan, report) = solve(costs, mass, &settings);
            (
                plan.into_data().convert::<f32>().try_to_vec().unwrap(),
                report,
            )
        })
    }

    fn costs(len: usize) -> Vec<f32> {
        (0..len).map(|i| ((i * 7919) % 101) as f32 / 50.0).collect()
    }

    /// A tolerance below f32's resolution with an iteration budget of usize::MAX: both solvers
    /// return at once (converged only where the residual happens to be exactly 0), never
    /// spin; a reachable tolerance with the same budget reports convergence (no wrapping cast).
    #[test]
    fn unreachable_tolerance_returns() {
        let dims = [2, 3, 20];
        for (name, device) in cpu_devices() {
            for solver in [TransportSolver::Newton, TransportSolver::Sinkhorn] {
                for mu in [0.3, 0.9] {
                    let stuck = TransportSettings {
                        tolerance: 1e-300,
                        ..settings(mu, 0.2, solver, usize::MAX)
                    };
                    let (plan, report) = solve_guarded(&device, costs(120), dims, stuck);
                    let case = format!("{name} {solver:?} μ = {mu}: {report:?}");
                    assert!(report.iterations < 1000, "{case}");
                    assert!(plan.iter().all(|v| v.is_finite()), "{case}");
                    let reachable = settings(mu, 0.2, solver, usize::MAX);
                    let (_, report) = solve_guarded(&device, costs(120), dims, reachable);
                    assert!(report.converged, "{name} {solver:?} μ = {mu}: {report:?}");
                }
            }
        }
    }

    /// The stopping rule itself: tolerance (converged, unless a sample is NaN), cap, β
    /// unchanged and [`STALL_PATIENCE`] iterations without progress each stop the solve, only
    /// the first as converged.
    #[test]
    fn the_stopping_rule_stops_for_each_reason() {
        let settings = TransportSettings {
            max_iterations: 50,
            ..settings(0.3, 0.2, TransportSolver::Newton, 0)
        };
        let status = |error: f64, progress, moved| Status::of_sample(error, progress, moved);
        let stop = |iteration, converged| {
            Some(SolveReport {
                iterations: iteration,
                converged,
            })
        };
        let mut rule = Stopping::new(&settings);
        assert_eq!(rule.check(0, status(0.1, false, true)), None);
        assert_eq!(rule.check(1, status(1e-7, false, true)), stop(1, true));
        let mut rule = Stopping::new(&settings);
        assert_eq!(rule.check(4, status(f64::NAN, false, true)), stop(4, false));
        let mut rule = Stopping::new(&settings);
        assert_eq!(rule.check(3, status(0.1, true, false)), stop(3, false));
        let mut rule = Stopping::new(&settings);
        assert_eq!(rule.check(50, status(0.1, true, true)), stop(50, false));
        let mut rule = Stopping::new(&settings);
        for iteration in 0..STALL_PATIENCE - 1 {
            assert_eq!(rule.check(iteration, status(0.1, false, true)), None);
        }
        let last = STALL_PATIENCE - 1;
        assert_eq!(
            rule.check(last, status(0.1, false, true)),
            stop(last, false)
        );
        // Progress resets the count.
        let mut rule = Stopping::new(&settings);
        for iteration in 0..10 {
            let progress = iteration % 2 == 0;
            assert_eq!(rule.check(iteration, status(0.1, progress, true)), None);
        }
        // A batch with a NaN sample whose other samples converged: stop, unconverged.
        let batch = Status {
            error: 0.0,
            nan: true,
            progress: false,
            moved: true,
        };
        assert_eq!(Stopping::new(&settings).check(2, batch), stop(2, false));
    }

    /// NaN costs (NaN features) with a large budget return at once, unconverged, and leave the
    /// other samples of the batch converged to their own plan.
    #[test]
    fn nan_costs_stop_the_solve_and_stay_in_their_sample() {
        let (k, n) = (3, 10);
        for (name, device) in cpu_devices() {
            for solver in [TransportSolver::Newton, TransportSolver::Sinkhorn] {
                let mut values = costs(2 * k * n);
                values[k * n + 4] = f32::NAN;
                let settings = settings(0.3, 0.2, solver, 1 << 40);
                let (plan, report) = solve_guarded(&device, values, [2, k, n], settings);
                assert!(!report.converged, "{name} {solver:?}: {report:?}");
                assert!(report.iterations < 100, "{name} {solver:?}: {report:?}");
                let (first, second) = plan.split_at((k + 1) * n);
                assert!(first.iter().all(|v| v.is_finite()), "{name} {solver:?}");
                let sent: f32 = first[n..].iter().sum();
                assert!((sent - 0.3).abs() < 1e-5, "{name} {solver:?}: Σ P = {sent}");
                assert!(second.iter().any(|v| v.is_nan()), "{name} {solver:?}");
            }
        }
    }

    /// The cap holds whatever `max_iterations` says: Sinkhorn at μ = 0.999 (rate ≈ μ) with a
    /// tolerance it would take ~30 000 iterations to reach stops at `max_iterations` when that
    /// is smaller, unconverged.
    #[test]
    fn max_iterations_caps_the_solve() {
        for (name, device) in cpu_devices() {
            let settings = TransportSettings {
                tolerance: 1e-12,
                ..settings(0.999, 0.2, TransportSolver::Sinkhorn, 7)
            };
            let (_, report) = solve_guarded(&device, costs(60), [1, 3, 20], settings);
            assert_eq!(
                report,
                SolveReport {
                    iterations: 7,
                    converged: false
                },
                "{name}"
            );
        }
    }

    /// Costs near 1e30 (ℓ near −5e30), whose nearest positions hold more than μ: anchored, the
    /// solve moves exactly μ, converged. When the root falls among positions 5e24 below the
    /// nearest ones (μ = 0.8), no float resolves it: the solve says so.
    #[test]
    fn huge_costs_transport_the_right_mass_or_say_they_do_not() {
        let (k, n) = (2, 8);
        for (name, device) in cpu_devices() {
            for solver in [TransportSolver::Newton, TransportSolver::Sinkhorn] {
                for mu in [0.3, 0.8] {
                    // The nearest cost of positions 0, 2, 5, 7 is 1e30, of the others more.
                    let values = (0..k * n)
                        .map(|i| 1e30 * (1.0 + (i % 5) as f32 * 1e-6))
                        .collect();
                    let settings = settings(mu, 0.2, solver, 2000);
                    let (plan, report) = solve_guarded(&device, values, [1, k, n], settings);
                    let sent: f32 = plan[n..].iter().sum();
                    let right = (sent as f64 - mu).abs() < 1e-5;
                    let case = format!("{name} {solver:?} μ = {mu}: Σ P = {sent}, {report:?}");
                    assert!(right || !report.converged, "{case}");
                    if mu < 0.5 {
                        assert!(right && report.converged, "{case}");
                    }
                }
            }
        }
    }
}
