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
//!
//! [`balanced_transport`] solves the balanced problem (both marginals fixed) of the cluster
//! aggregators, with an optional dustbin row (docs/maths.md §7).

use burn::tensor::{Bool, Int, Tensor};

use crate::checks;
use crate::layout::Layout;
use crate::ops::routing;

pub use crate::maths::balanced::BalancedSettings;
pub use crate::maths::costs::lipschitz_normalize;
pub use crate::maths::settings::{
    MAX_SOLVER_ITERATIONS, MIN_EPSILON, MIN_TRANSPORT_RATIO, TransportSettings, TransportSolver,
};

/// A solved transport problem.
#[derive(Debug, Clone)]
pub struct TransportPlan {
    /// `[B, K+1, N]`: row 0 is the residual mass ρ of each position, rows 1..=K the plan P.
    pub plan: Tensor<3>,
    /// `[1]`: solver iterations run (the maximum over the batch).
    pub iterations: Tensor<1, Int>,
    /// `[1]`: whether every sample's transported mass is within the tolerance of μ. False
    /// when a solve used its `max_iterations`, stalled at the float's rounding floor (a
    /// tolerance the float cannot resolve; costs so large that β + ℓ cannot be resolved near
    /// the root) or met a NaN: the plan is then the last iterate, and its mass may be off.
    pub converged: Tensor<1, Bool>,
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
/// B = 0 gives an empty `[0, K, N]`.
///
/// # Panics
///
/// If the features' and the prototypes' channel counts differ, N, C or K is 0, or the
/// features and the prototypes are on different devices.
pub fn transport_costs(features: Tensor<3>, prototypes: Tensor<2>, layout: Layout) -> Tensor<3> {
    let (batch, positions, channels) = layout.split(features.dims());
    let [count, width] = prototypes.dims();
    assert!(
        channels == width,
        "transport_costs: channel mismatch: the features have C = {channels} ({layout:?}), the prototypes [K, C] have C = {width}"
    );
    assert!(
        positions > 0 && channels > 0 && count > 0,
        "transport_costs: empty dimension: expected N, C, K > 0, got N = {positions}, C = {channels}, K = {count}"
    );
    checks::same_device(
        "transport_costs",
        [
            ("the features", &features.device()),
            ("the prototypes", &prototypes.device()),
        ],
    );
    if batch == 0 {
        return Tensor::empty([0, count, positions], &features.device());
    }
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
/// The solver stops at the tolerance, at `max_iterations` (at most
/// [`MAX_SOLVER_ITERATIONS`]), when it stalls at the float's rounding floor, or on NaN; only
/// the first sets [`TransportPlan::converged`]. B = 0 gives an empty plan, converged.
///
/// # Panics
///
/// If a setting is invalid (μ outside [[`MIN_TRANSPORT_RATIO`], 1], ε below [`MIN_EPSILON`],
/// `max_iterations` or `tolerance` not positive), the shapes do not match, K or N is 0, the
/// costs and the masses are on different devices, or a mass row is negative somewhere or does
/// not sum to 1 (within 1e-3). Checking the masses reads `[B]` values back from the device.
pub fn partial_transport(
    costs: Tensor<3>,
    mass: Tensor<2>,
    settings: &TransportSettings,
) -> TransportPlan {
    settings.validate("partial_transport");
    let [batch, count, positions] = costs.dims();
    let dims = mass.dims();
    assert!(
        dims == [batch, positions],
        "partial_transport: mass shape mismatch: expected [B, N] = [{batch}, {positions}] (from the costs [B, K, N]), got {dims:?}"
    );
    assert!(
        count > 0 && positions > 0,
        "partial_transport: empty dimension: expected K, N > 0 in the costs [B, K, N], got K = {count}, N = {positions}"
    );
    let device = costs.device();
    checks::same_device(
        "partial_transport",
        [("the costs", &device), ("the masses", &mass.device())],
    );
    if batch == 0 {
        return TransportPlan {
            plan: Tensor::empty([0, count + 1, positions], &device),
            iterations: Tensor::zeros([1], &device),
            converged: Tensor::from_data([true], &device),
        };
    }
    check_masses(&mass);
    let (plan, (iterations, converged)) = routing::partial_transport(costs, mass, settings);
    TransportPlan {
        plan,
        iterations,
        converged,
    }
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

/// A dustbin: one more row of the balanced problem, appended after the K rows of the costs,
/// that absorbs the column mass the rows do not take (SALAD's "unmatched" tokens).
///
/// Its cost row is the caller's: SALAD's learnable dustbin score z is a score, so its cost is
/// −z, the same for every column (`(-z).reshape([1, 1]).expand([B, N])`; the row is tracked
/// like the costs). Its mass is the row mass it must take, per sample: the row masses plus
/// the dustbin's must sum to the column masses (SALAD: K clusters of 1/(N+K) each, the dustbin
/// (N−K)/(N+K), N columns of 1/(N+K)). Note that a cost constant along its row changes no
/// plan (the row potential absorbs it): such a dustbin score gets a zero gradient, as in the
/// reference.
#[derive(Debug, Clone)]
pub struct Dustbin {
    /// `[B, N]`: the dustbin's cost to each column (−score).
    pub cost: Tensor<2>,
    /// `[B]`: the dustbin's row mass, ≥ 0.
    pub mass: Tensor<1>,
}

/// A solved balanced transport problem.
#[derive(Debug, Clone)]
pub struct BalancedPlan {
    /// `[B, K, N]`, or `[B, K+1, N]` with a dustbin (its row last): row sums the row masses,
    /// column sums the column masses (exactly, up to rounding: the last update is a column
    /// update), zero on every zero-mass column or row.
    pub plan: Tensor<3>,
    /// `[1]`: solver iterations run (the maximum over the batch).
    pub iterations: Tensor<1, Int>,
    /// `[1]`: whether every sample's relative row error ‖P𝟙 − a‖₁ / Σa is within the
    /// tolerance. False when a solve used its `max_iterations`, stalled at the float's rounding
    /// floor or met a NaN (a NaN cost at a position with mass stays within its sample).
    pub converged: Tensor<1, Bool>,
}

/// Solves the balanced entropic transport problem, with the implicit backward.
///
/// Per sample, with costs C, row masses a (the dustbin's appended) and column masses b:
///
/// ```text
/// P = argmin ⟨C, P⟩ + ε Σ P (ln P − 1)   s.t.  P𝟙 = a,  Pᵀ𝟙 = b
/// ```
///
/// solved by Sinkhorn's iterations on the potentials in the log domain. The gradients with
/// respect to the costs, both masses and the dustbin come from implicit differentiation at
/// the returned plan (docs/maths.md §7): backward memory is a few plans, whatever the
/// iteration count. The mass gradients are defined up to adding t to the rows' and −t to the
/// columns' (no balanced change of the masses sees it).
///
/// # Shapes
///
/// - costs: `[B, K, N]` (scores s enter as costs −s)
/// - row_mass: `[B, K]`, non-negative
/// - column_mass: `[B, N]`, non-negative; 0 marks a masked column (its costs are never read:
///   NaN there is harmless) and gives it an exactly zero plan column
/// - dustbin: cost `[B, N]`, mass `[B]` (see [`Dustbin`])
/// - output plan: `[B, K, N]`, `[B, K+1, N]` with a dustbin (last row)
///
/// Per sample, Σ row_mass (+ the dustbin mass) must equal Σ column_mass within a relative
/// 1e-3; the column masses are then rescaled to the row total exactly. B = 0 gives an empty
/// plan, converged.
///
/// # Panics
///
/// `"balanced_transport: ..."`, naming the parameter and the expected and actual value, if a
/// setting is invalid (ε below [`MIN_EPSILON`], NaN or not finite; `max_iterations` 0;
/// `tolerance` not positive), a shape does not match the costs', K or N is 0, the inputs are
/// on different devices, or a sample has a negative (or NaN) mass, a total mass of 0, or row
/// and column totals that differ. Checking the masses reads `[B, 3]` values back.
pub fn balanced_transport(
    costs: Tensor<3>,
    row_mass: Tensor<2>,
    column_mass: Tensor<2>,
    dustbin: Option<Dustbin>,
    settings: &BalancedSettings,
) -> BalancedPlan {
    const OWNER: &str = "balanced_transport";
    settings.validate(OWNER);
    let [batch, rows, columns] = costs.dims();
    assert!(
        rows > 0 && columns > 0,
        "{OWNER}: empty dimension: expected K, N > 0 in the costs [B, K, N], got K = {rows}, N = {columns}"
    );
    let named = |name: &str, actual: &[usize], expected: &[usize], what: &str| {
        assert!(
            actual == expected,
            "{OWNER}: `{name}` shape mismatch: expected {what} = {expected:?} (from the costs [B, K, N]), got {actual:?}"
        );
    };
    named("row_mass", &row_mass.dims(), &[batch, rows], "[B, K]");
    named(
        "column_mass",
        &column_mass.dims(),
        &[batch, columns],
        "[B, N]",
    );
    let device = costs.device();
    let same = |name: &str, other: &burn::tensor::Device| {
        checks::same_device(OWNER, [("the costs", &device), (name, other)]);
    };
    same("`row_mass`", &row_mass.device());
    same("`column_mass`", &column_mass.device());
    if let Some(dustbin) = &dustbin {
        named(
            "dustbin.cost",
            &dustbin.cost.dims(),
            &[batch, columns],
            "[B, N]",
        );
        named("dustbin.mass", &dustbin.mass.dims(), &[batch], "[B]");
        same("`dustbin.cost`", &dustbin.cost.device());
        same("`dustbin.mass`", &dustbin.mass.device());
    }
    let (costs, row_mass) = match dustbin {
        Some(Dustbin { cost, mass }) => (
            Tensor::cat(vec![costs, cost.unsqueeze_dim(1)], 1),
            Tensor::cat(vec![row_mass, mass.unsqueeze_dim(1)], 1),
        ),
        None => (costs, row_mass),
    };
    let all_rows = row_mass.dims()[1];
    if batch == 0 {
        return BalancedPlan {
            plan: Tensor::empty([0, all_rows, columns], &device),
            iterations: Tensor::zeros([1], &device),
            converged: Tensor::from_data([true], &device),
        };
    }
    check_balance(OWNER, &row_mass, &column_mass);
    let scale = row_mass.clone().sum_dim(1) / column_mass.clone().sum_dim(1);
    let column_mass = column_mass * scale;
    let (plan, (iterations, converged)) =
        routing::balanced_transport(costs, row_mass, column_mass, settings);
    BalancedPlan {
        plan,
        iterations,
        converged,
    }
}

/// Panics, naming the first offending sample, unless its masses are non-negative, its row
/// total positive and equal to its column total within a relative 1e-3.
fn check_balance(owner: &str, row_mass: &Tensor<2>, column_mass: &Tensor<2>) {
    let (rows, columns) = (row_mass.clone().detach(), column_mass.clone().detach());
    let [batch, _] = rows.dims();
    let summary = Tensor::cat(
        vec![
            rows.clone().sum_dim(1),
            columns.clone().sum_dim(1),
            rows.min_dim(1).min_pair(columns.min_dim(1)),
        ],
        1,
    )
    .into_data()
    .convert::<f64>();
    let values = summary.iter::<f64>().collect::<Vec<_>>();
    for sample in 0..batch {
        let [row_total, column_total, minimum] = [0, 1, 2].map(|i| values[sample * 3 + i]);
        assert!(
            minimum >= 0.0 && row_total.is_finite() && column_total.is_finite(),
            "{owner}: masses must be non-negative and finite, got a smallest mass of {minimum}, Σ row_mass = {row_total} and Σ column_mass = {column_total} in sample {sample}"
        );
        assert!(
            row_total > 0.0,
            "{owner}: each sample's total mass must be positive, got Σ row_mass = {row_total} in sample {sample}"
        );
        assert!(
            (row_total - column_total).abs() <= 1e-3 * row_total.max(column_total),
            "{owner}: Σ row_mass (with the dustbin's) must equal Σ column_mass (within a relative 1e-3), got {row_total} and {column_total} in sample {sample}"
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
                    let (marginals, _, _, _) = <Dispatch as PoolingOps>::partial_transport(
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
    #[should_panic(
        expected = "partial_transport: empty dimension: expected K, N > 0 in the costs [B, K, N], got K = 0, N = 3"
    )]
    fn no_prototype_panics() {
        let device = Device::flex();
        let mass = Tensor::full([1, 3], 1.0 / 3.0, &device);
        partial_transport(Tensor::zeros([1, 0, 3], &device), mass, &settings());
    }

    #[test]
    #[should_panic(
        expected = "partial_transport: empty dimension: expected K, N > 0 in the costs [B, K, N], got K = 2, N = 0"
    )]
    fn no_position_panics() {
        let device = Device::flex();
        partial_transport(
            Tensor::zeros([1, 2, 0], &device),
            Tensor::zeros([1, 0], &device),
            &settings(),
        );
    }

    #[test]
    #[should_panic(
        expected = "transport_costs: empty dimension: expected N, C, K > 0, got N = 4, C = 3, K = 0"
    )]
    fn costs_without_prototypes_panic() {
        let device = Device::flex();
        transport_costs(
            Tensor::zeros([1, 3, 4], &device),
            Tensor::zeros([0, 3], &device),
            Layout::ChannelsFirst,
        );
    }

    /// B = 0: empty costs and an empty plan, converged, on every CPU backend.
    #[test]
    fn an_empty_batch_gives_empty_results() {
        for (name, device) in crate::test_support::cpu_devices() {
            let costs = transport_costs(
                Tensor::zeros([0, 3, 4], &device),
                Tensor::ones([2, 3], &device),
                Layout::ChannelsFirst,
            );
            assert_eq!(costs.dims(), [0, 2, 4], "{name}");
            let solved = partial_transport(costs, Tensor::zeros([0, 4], &device), &settings());
            assert_eq!(solved.plan.dims(), [0, 3, 4], "{name}");
            assert_eq!(solved.iterations.into_scalar::<i64>(), 0, "{name}");
            assert!(solved.converged.into_scalar::<bool>(), "{name}");
        }
    }

    /// Costs near 1e30 through the public API: the right mass and converged where the root is
    /// among the nearest positions, else not converged (never a wrong mass reported as
    /// converged); the iteration budget may be anything up to usize::MAX.
    #[test]
    fn huge_costs_are_right_or_flagged() {
        for (name, device) in crate::test_support::cpu_devices() {
            for (mu, solver) in [
                (0.2, TransportSolver::Newton),
                (0.2, TransportSolver::Sinkhorn),
                (0.9, TransportSolver::Newton),
            ] {
                let settings = TransportSettings {
                    transport_ratio: mu,
                    max_iterations: usize::MAX,
                    solver,
                    ..settings()
                };
                // Positions 0 and 1 are nearest (cost 1e30); the others 1e24 farther.
                let costs = Tensor::<2>::from_floats(
                    [[1e30, 1e30, 1.000001e30, 1.000001e30, 1.000002e30]],
                    &device,
                )
                .unsqueeze_dim::<3>(0);
                let mass = Tensor::full([1, 5], 0.2, &device);
                let solved = partial_transport(costs, mass, &settings);
                let sent = solved
                    .plan
                    .slice([0..1, 1..2, 0..5])
                    .sum()
                    .into_scalar::<f64>();
                let converged = solved.converged.into_scalar::<bool>();
                let case = format!("{name} {solver:?} μ = {mu}: Σ P = {sent}, {converged}");
                let right = (sent - mu).abs() < 1e-5;
                assert!(right || !converged, "{case}");
                if mu < 0.4 {
                    assert!(right && converged, "{case}");
                }
            }
        }
    }

    /// What hung before the stall tests, through the public API on every CPU backend (the
    /// Flex kernels and the portable solver): a tolerance no float resolves, or a NaN cost,
    /// with `max_iterations` = usize::MAX, both solvers, μ on both sides of ½. Each returns
    /// within seconds; a NaN is never reported as converged.
    #[test]
    fn nothing_spins() {
        use crate::test_support::{cpu_devices, within_seconds};
        let (k, n) = (3, 20);
        for (name, device) in cpu_devices() {
            for solver in [TransportSolver::Newton, TransportSolver::Sinkhorn] {
                for mu in [0.3, 0.9] {
                    for nan in [false, true] {
                        let device = device.clone();
                        let case = format!("{name} {solver:?} μ = {mu}, NaN: {nan}");
                        let (iterations, converged) = within_seconds(20, &case, move || {
                            let mut values: Vec<f32> = (0..2 * k * n)
                                .map(|i| ((i * 7919) % 101) as f32 / 50.0)
                                .collect();
                            if nan {
                                values[k * n + 4] = f32::NAN;
                            }
                            let costs = Tensor::<1>::from_floats(values.as_slice(), &device)
                                .reshape([2, k, n]);
                            let mass = Tensor::full([2, n], 1.0 / n as f64, &device);
                            let settings = TransportSettings {
                                transport_ratio: mu,
                                max_iterations: usize::MAX,
                                tolerance: if nan { 1e-6 } else { 1e-300 },
                                solver,
                                ..settings()
                            };
                            let solved = partial_transport(costs, mass, &settings);
                            (
                                solved.iterations.into_scalar::<i64>(),
                                solved.converged.into_scalar::<bool>(),
                            )
                        });
                        assert!(iterations < 1000, "{case}: {iterations}");
                        assert!(!(nan && converged), "{case}");
                    }
                }
            }
        }
    }

    /// On every CPU backend with autodiff, the gradient comes from the balanced node (its
    /// counter moves), and a dustbin adds its row last.
    #[cfg(feature = "autodiff")]
    #[test]
    fn balanced_gradients_come_from_the_node() {
        use crate::ops::BACKWARD_CALLS;
        use std::sync::atomic::Ordering;
        for (name, device) in crate::test_support::cpu_devices() {
            let device = device.autodiff();
            let costs = Tensor::<3>::ones([1, 2, 4], &device).require_grad();
            let before = BACKWARD_CALLS::BALANCED.load(Ordering::SeqCst);
            let solved = balanced_transport(
                costs.clone(),
                Tensor::full([1, 2], 0.25, &device),
                Tensor::full([1, 4], 0.25, &device),
                Some(Dustbin {
                    cost: Tensor::zeros([1, 4], &device),
                    mass: Tensor::full([1], 0.5, &device),
                }),
                &BalancedSettings::new(0.5),
            );
            assert_eq!(solved.plan.dims(), [1, 3, 4], "{name}");
            let grads = solved.plan.sum().backward();
            assert!(costs.grad(&grads).is_some(), "{name}");
            assert!(
                BACKWARD_CALLS::BALANCED.load(Ordering::SeqCst) > before,
                "{name}"
            );
        }
    }

    /// Inputs on two devices: a panic naming both.
    #[cfg(feature = "ndarray")]
    #[test]
    #[should_panic(expected = "partial_transport: device mismatch: the costs on Device<Flex")]
    #[allow(deprecated)] // NdArray is deprecated in Burn 0.22, still supported here.
    fn a_device_mismatch_names_both_devices() {
        let mass = Tensor::full([1, 3], 1.0 / 3.0, &Device::ndarray());
        partial_transport(Tensor::zeros([1, 2, 3], &Device::flex()), mass, &settings());
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
