//! Balanced entropic optimal transport, log domain, with its implicit backward
//! (docs/maths.md §7): the solver behind the cluster aggregators (SALAD's dustbin, OTK).
//!
//! Per sample, costs C `[K', N]`, row masses a `[K']`, column masses b `[N]` with Σa = Σb and
//! entropy ε:
//!
//! ```text
//! P = argmin ⟨C, P⟩ + ε Σ P (ln P − 1)   s.t.  P𝟙 = a,  Pᵀ𝟙 = b
//! P_ij = exp(u_i + v_j + κ_ij),  κ = −C/ε   (u = f/ε, v = g/ε: the scaled potentials)
//! u ← ln a − logsumexp_j(v_j + κ_ij)        (rows exact)
//! v ← ln b − logsumexp_i(u_i + κ_ij)        (columns exact)
//! ```
//!
//! A zero mass (a masked column, an empty row) has ln 0 = −∞ as its potential, set by a mask,
//! never by adding a small constant: its row or column of the plan is exactly 0, and its costs
//! (NaN or ∞ at padding) are replaced by 0 before they are read, so nothing leaks into the
//! other entries. κ is anchored per row (its largest valid entry subtracted: u absorbs it) and
//! every finite potential and κ is kept within ±[`POTENTIAL_BOUND`], so that no sum of three
//! of them overflows: costs near 1e30 give a finite plan (or say they did not converge).
//!
//! The stopping rule is GSP's (`solver::Stopping`): the relative row error
//! ‖P𝟙 − a‖₁ / Σa (after a column update, the columns are exact) at most the tolerance
//! (converged), the iteration cap, the potentials not moving, [`STALL_PATIENCE`] iterations
//! without a new smallest error, or a NaN.

use burn::tensor::{Bool, Int, Tensor, TensorData};

use super::precision::unit_roundoff;
use super::settings::{MAX_SOLVER_ITERATIONS, MIN_EPSILON};
use super::solver::{SolveReport, Status, Stopping, report_tensors};
use crate::checks;

/// Iterations without a new smallest marginal error before the solve counts as stalled. The
/// error of Sinkhorn is not monotone (unlike GSP's β, whose patience is 3), and at the float's
/// rounding floor it jitters: a new record then comes ever more rarely, so the solve stops.
pub(crate) const STALL_PATIENCE: usize = 20;

/// The marginal error below which a sample solved on its own (the Flex and CubeCL kernels)
/// counts an iteration without a new smallest error as a stall: 10³ · (K' + N) · u, the
/// rounding floor of the error with room to spare. Above it the error can sit on a plateau
/// (small ε, large costs: one row's mass creeping to a far column) that the iterations do
/// leave; the portable solve rides it out on its batch mates' progress (its stall test counts
/// any open sample's progress), and a sample alone must too.
pub(crate) fn stall_floor(rows: usize, columns: usize, roundoff: f64) -> f64 {
    1e3 * (rows + columns) as f64 * roundoff
}

/// The largest magnitude of a finite scaled potential or of an anchored −C/ε: a quarter of
/// f32's largest value, so that u + v + κ never overflows (and stays finite in f64 too).
pub(crate) const POTENTIAL_BOUND: f64 = f32::MAX as f64 / 4.0;

/// Settings of a balanced transport solve ([`balanced_transport`](crate::transport::balanced_transport)).
///
/// The solve stops at the first of: every sample's relative marginal error
/// ‖P𝟙 − a‖₁ / Σa at most `tolerance` (converged); `max_iterations` (or
/// [`MAX_SOLVER_ITERATIONS`]) iterations; the potentials not changing, or no new smallest error
/// for 20 iterations (the float's rounding floor); a NaN. Only the first counts as converged.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BalancedSettings {
    /// ε ≥ [`MIN_EPSILON`], the entropy weight (SALAD uses 1, OTK 0.1).
    pub epsilon: f64,
    /// Upper bound on the iterations (one row and one column update each): at least 1; above
    /// [`MAX_SOLVER_ITERATIONS`], that is the bound.
    pub max_iterations: usize,
    /// The solve stops once every sample's ‖P𝟙 − a‖₁ / Σa is at most this.
    pub tolerance: f64,
}

impl BalancedSettings {
    /// ε with 1000 iterations at most and a tolerance of 1e-6.
    pub fn new(epsilon: f64) -> Self {
        Self {
            epsilon,
            max_iterations: 1000,
            tolerance: 1e-6,
        }
    }

    /// The same settings with another iteration bound.
    pub fn with_max_iterations(self, max_iterations: usize) -> Self {
        Self {
            max_iterations,
            ..self
        }
    }

    /// The same settings with another tolerance.
    pub fn with_tolerance(self, tolerance: f64) -> Self {
        Self { tolerance, ..self }
    }

    /// Panics with the name of the first invalid setting and its value.
    pub fn validate(&self, owner: &str) {
        checks::at_least(
            owner,
            "epsilon",
            self.epsilon,
            MIN_EPSILON,
            "below it c/ε leaves f32's range",
        );
        checks::at_least_one(owner, "max_iterations", self.max_iterations);
        checks::positive(owner, "tolerance", self.tolerance);
    }

    /// The iterations a solve may run: `max_iterations`, at most [`MAX_SOLVER_ITERATIONS`].
    pub(crate) fn iteration_cap(&self) -> usize {
        self.max_iterations.min(MAX_SOLVER_ITERATIONS)
    }
}

/// The problem in the form the iterations read: κ = −C/ε (masked, anchored, bounded) and the
/// log masses with −∞ for zero masses.
struct Problem {
    /// `[B, K', N]`.
    kernel: Tensor<3>,
    /// ln a `[B, K', 1]`, −∞ where a = 0.
    log_rows: Tensor<3>,
    /// ln b `[B, 1, N]`, −∞ where b = 0.
    log_columns: Tensor<3>,
    /// a = 0 `[B, K', 1]`.
    empty_rows: Tensor<3, Bool>,
    /// b = 0 `[B, 1, N]`.
    empty_columns: Tensor<3, Bool>,
}

impl Problem {
    /// Tracks gradients through `costs` if it is tracked (the row anchor is detached: the plan
    /// does not depend on it).
    fn new(costs: Tensor<3>, row_mass: Tensor<2>, column_mass: Tensor<2>, epsilon: f64) -> Self {
        let [batch, rows, columns] = costs.dims();
        let (log_rows, empty_rows) = log_mass(row_mass.unsqueeze_dim(2));
        let (log_columns, empty_columns) = log_mass(column_mass.unsqueeze_dim(1));
        let empty_columns_full = empty_columns.clone().expand([batch, rows, columns]);
        let masked = empty_rows
            .clone()
            .expand([batch, rows, columns])
            .bool_or(empty_columns_full.clone());
        // Costs at zero masses may be anything (NaN padding): they are never read.
        let kernel = costs.mask_fill(masked, 0.0).div_scalar(-epsilon);
        let anchor = kernel
            .clone()
            .detach()
            .mask_fill(empty_columns_full, f64::NEG_INFINITY)
            .max_dim(2)
            .clamp_min(-POTENTIAL_BOUND);
        let kernel = (kernel - anchor).clamp(-POTENTIAL_BOUND, POTENTIAL_BOUND);
        Self {
            kernel,
            log_rows,
            log_columns,
            empty_rows,
            empty_columns,
        }
    }

    fn detach(&self) -> Self {
        Self {
            kernel: self.kernel.clone().detach(),
            log_rows: self.log_rows.clone().detach(),
            log_columns: self.log_columns.clone().detach(),
            empty_rows: self.empty_rows.clone(),
            empty_columns: self.empty_columns.clone(),
        }
    }

    /// u ← ln a − logsumexp_j(v_j + κ_ij), from that logsumexp `[B, K', 1]`.
    fn row_update(&self, row_lse: Tensor<3>) -> Tensor<3> {
        bounded(self.log_rows.clone() - row_lse, self.empty_rows.clone())
    }

    /// v ← ln b − logsumexp_i(u_i + κ_ij).
    fn column_update(&self, u: Tensor<3>) -> Tensor<3> {
        let lse = logsumexp(u + self.kernel.clone(), 1);
        bounded(self.log_columns.clone() - lse, self.empty_columns.clone())
    }

    /// P = exp(u + v + κ), at most b_j per entry (true of any column-exact plan: the bound
    /// only ever acts on rounding or on a potential at its bound).
    fn plan(&self, u: Tensor<3>, v: Tensor<3>) -> Tensor<3> {
        let [batch, rows, columns] = self.kernel.dims();
        let cap = self.log_columns.clone().expand([batch, rows, columns]);
        (u + v + self.kernel.clone()).min_pair(cap).exp()
    }
}

/// ln m with −∞ (by mask) where m ≤ 0, and that mask.
fn log_mass<const D: usize>(mass: Tensor<D>) -> (Tensor<D>, Tensor<D, Bool>) {
    let empty = mass.clone().lower_equal_elem(0.0);
    let log = mass
        .clamp_min(0.0)
        .log()
        .mask_fill(empty.clone(), f64::NEG_INFINITY);
    (log, empty)
}

/// A potential within ±[`POTENTIAL_BOUND`], −∞ where its mass is 0.
fn bounded(potential: Tensor<3>, empty: Tensor<3, Bool>) -> Tensor<3> {
    potential
        .clamp(-POTENTIAL_BOUND, POTENTIAL_BOUND)
        .mask_fill(empty, f64::NEG_INFINITY)
}

/// logsumexp over `dim`, kept; −∞ for a line of −∞ (never NaN).
fn logsumexp(x: Tensor<3>, dim: usize) -> Tensor<3> {
    // A line of −∞ has shift −∞; its entries minus any finite shift stay −∞.
    let shift = x
        .clone()
        .max_dim(dim)
        .detach()
        .clamp_min(-4.0 * POTENTIAL_BOUND);
    (x - shift.clone()).exp().sum_dim(dim).log() + shift
}

/// Runs the iterations on an untracked problem: the potentials u `[B, K', 1]`, v `[B, 1, N]`
/// (after a column update: the columns are exact) and how the solve ended. Reads four scalars
/// per iteration back from the device for the stopping test, as GSP's portable solve does.
fn iterate(
    problem: &Problem,
    row_mass: &Tensor<2>,
    settings: &BalancedSettings,
) -> (Tensor<3>, Tensor<3>, SolveReport) {
    let [batch, rows, _] = problem.kernel.dims();
    let device = problem.kernel.device();
    let mut u = Tensor::<3>::zeros([batch, rows, 1], &device)
        .mask_fill(problem.empty_rows.clone(), f64::NEG_INFINITY);
    let mut v = problem.column_update(u.clone());
    let total = row_mass.clone().sum_dim(1); // [B, 1]
    let target = row_mass.clone().unsqueeze_dim::<3>(2);
    let mut best = Tensor::<2>::full([batch, 1], f64::INFINITY, &device);
    let mut stopping =
        Stopping::with_patience(settings.iteration_cap(), settings.tolerance, STALL_PATIENCE);
    for iteration in 0.. {
        let row_lse = logsumexp(v.clone() + problem.kernel.clone(), 2);
        let row_sums = (u.clone() + row_lse.clone())
            .exp()
            .mask_fill(problem.empty_rows.clone(), 0.0);
        let error = (row_sums - target.clone())
            .abs()
            .sum_dim(1)
            .reshape([batch, 1])
            / total.clone();
        let progress = error.clone().lower(best.clone());
        best = best.min_pair(
            error
                .clone()
                .mask_fill(error.clone().is_nan(), f64::INFINITY),
        );
        let next = problem.row_update(row_lse);
        let moved = next
            .clone()
            .not_equal(u.clone())
            .any_dim(1)
            .reshape([batch, 1]);
        let status = Status::read(&error, progress, moved, settings.tolerance);
        if let Some(report) = stopping.check(iteration, status) {
            return (u, v, report);
        }
        u = next;
        v = problem.column_update(u.clone());
    }
    unreachable!("the stopping rule ends the loop at the cap")
}

/// The forward solve on untracked tensors: the plan `[B, K', N]` and how the solve ended.
///
/// `costs` `[B, K', N]`, `row_mass` `[B, K']`, `column_mass` `[B, N]`, non-negative, with equal
/// positive sums per sample (the public API checks it).
pub(crate) fn solve(
    costs: Tensor<3>,
    row_mass: Tensor<2>,
    column_mass: Tensor<2>,
    settings: &BalancedSettings,
) -> (Tensor<3>, SolveReport) {
    let [batch, rows, columns] = costs.dims();
    if batch == 0 {
        return (
            Tensor::zeros([0, rows, columns], &costs.device()),
            SolveReport::IMMEDIATE,
        );
    }
    let problem = Problem::new(costs, row_mass.clone(), column_mass, settings.epsilon);
    let (u, v, report) = iterate(&problem, &row_mass, settings);
    let plan = problem.plan(u, v);
    let report = confirm(&plan, &row_mass, report, settings.tolerance);
    (plan, report)
}

/// The report, unconverged unless the returned plan itself meets the tolerance (up to the
/// rounding of its row sums): the iterations measure the error from the potentials, which
/// agrees with the plan except where κ or the potentials lost their digits (costs/ε beyond
/// the float's range), and there the plan is what the caller gets. One read of `[1]`.
fn confirm(
    plan: &Tensor<3>,
    row_mass: &Tensor<2>,
    report: SolveReport,
    tolerance: f64,
) -> SolveReport {
    if !report.converged {
        return report;
    }
    let [batch, rows, columns] = plan.dims();
    let error = (plan.clone().sum_dim(2).reshape([batch, rows]) - row_mass.clone())
        .abs()
        .sum_dim(1)
        / row_mass.clone().sum_dim(1);
    let error = error.max().into_scalar::<f64>();
    let slack = (columns + rows) as f64 * unit_roundoff(plan.dtype());
    SolveReport {
        converged: error <= 2.0 * tolerance.max(slack),
        ..report
    }
}

/// The route for devices the extension does not cover: the plan solved off the tape, then
/// rebuilt with tracked tensor ops as P = P̄ ⊙ exp(Δ − detach(Δ)), Δ_ij = x_i + y_j + κ_ij, with
/// (x, y) = H⁻¹ [a − (P̄ ⊙ κ)𝟙; b − (P̄ ⊙ κ)ᵀ𝟙] for the detached plan P̄ and the detached
/// (gauge-fixed) inverse of the matrix H of [`implicit_gradients`]. Its value is P̄ exactly;
/// its first derivative is dP = P̄ ⊙ (dx + dy + dκ) with H [dx; dy] = [da; db] − [(P̄ ⊙ dκ)𝟙;
/// (P̄ ⊙ dκ)ᵀ𝟙], the implicit one, so ordinary autodiff gets the implicit gradient. The tape
/// holds the `[B, K', K']` inverse and a few plans, not the iterations. Also the iterations
/// `[1]` and convergence `[1]`.
pub(crate) fn solve_with_tracked_step(
    costs: Tensor<3>,
    row_mass: Tensor<2>,
    column_mass: Tensor<2>,
    settings: &BalancedSettings,
) -> (Tensor<3>, Tensor<1, Int>, Tensor<1, Bool>) {
    let device = costs.device();
    let problem = Problem::new(
        costs,
        row_mass.clone(),
        column_mass.clone(),
        settings.epsilon,
    );
    let detached = problem.detach();
    let row_mass_detached = row_mass.clone().detach();
    let (u, v, report) = iterate(&detached, &row_mass_detached, settings);
    let fixed = detached.plan(u, v);
    let report = confirm(&fixed, &row_mass_detached, report, settings.tolerance);
    let plan = implicit_plan(fixed, problem.kernel, row_mass, column_mass);
    let (iterations, converged) = report_tensors(report, &device);
    (plan, iterations, converged)
}

/// P̄ ⊙ exp(Δ − detach(Δ)) of [`solve_with_tracked_step`], for the detached plan `[B, K', N]`,
/// the tracked κ and masses.
fn implicit_plan(
    fixed: Tensor<3>,
    kernel: Tensor<3>,
    row_mass: Tensor<2>,
    column_mass: Tensor<2>,
) -> Tensor<3> {
    let [batch, rows, columns] = fixed.dims();
    if rows > columns {
        let transposed = implicit_plan(
            fixed.swap_dims(1, 2),
            kernel.swap_dims(1, 2),
            column_mass,
            row_mass,
        );
        return transposed.swap_dims(1, 2);
    }
    let row_sums = fixed.clone().sum_dim(2);
    let column_sums = fixed.clone().sum_dim(1);
    let empty_columns = column_sums.clone().lower_equal_elem(0.0);
    let inverse_columns = column_sums.recip().mask_fill(empty_columns, 0.0);
    let scaled = fixed.clone() * inverse_columns.clone();
    let identity = Tensor::<2>::eye(rows, &fixed.device())
        .cast(fixed.dtype())
        .unsqueeze_dim::<3>(0);
    let schur =
        row_sums.clone() * identity.clone() - scaled.clone().matmul(fixed.clone().swap_dims(1, 2));
    let inverse = solve_schur(schur, identity.expand([batch, rows, rows]), row_sums);
    let weighted = fixed.clone() * kernel.clone();
    let rhs_rows = row_mass.unsqueeze_dim::<3>(2) - weighted.clone().sum_dim(2);
    let rhs_columns = column_mass.unsqueeze_dim::<3>(1) - weighted.sum_dim(1);
    let x = inverse.matmul(rhs_rows - scaled.matmul(rhs_columns.clone().swap_dims(1, 2)));
    let y = (rhs_columns - x.clone().swap_dims(1, 2).matmul(fixed.clone())) * inverse_columns;
    let delta = x + y + kernel;
    fixed * (delta.clone() - delta.detach()).exp()
}

/// (∂L/∂C `[B, K', N]`, ∂L/∂a `[B, K']`, ∂L/∂b `[B, N]`) at the plan P `[B, K', N]` from
/// G = ∂L/∂P, by implicit differentiation of the marginal conditions (docs/maths.md §7):
///
/// ```text
/// W = G ⊙ P,  r = P𝟙,  c = Pᵀ𝟙   (the plan's actual sums: consistent even unconverged)
/// [diag(r)  P      ] [x]   [W𝟙 ]
/// [Pᵀ       diag(c)] [y] = [Wᵀ𝟙]
/// ∂L/∂C_ij = (P_ij/ε)(x_i + y_j − G_ij),   ∂L/∂a = x,   ∂L/∂b = y
/// ```
///
/// The longer side is eliminated (for K' ≤ N, y = (Wᵀ𝟙 − Pᵀx) ⊘ c) and the K'×K' Schur system
/// (diag(r) − P diag(1/c) Pᵀ + s m mᵀ) x = W𝟙 − P((Wᵀ𝟙) ⊘ c) solved by Cholesky; m marks the
/// non-empty rows and s m mᵀ removes the null vector (𝟙, −𝟙) of the full system (it fixes
/// Σx = 0 and changes neither ∂L/∂C nor ∂L/∂a·da + ∂L/∂b·db for any balanced perturbation).
/// Zero columns (c_j = 0: masked) get y_j = 0 and a zero cost gradient; zero rows likewise.
/// Memory: a few `[B, K', N]` tensors and the `[B, K', K']` system, whatever the iterations.
pub(crate) fn implicit_gradients(
    plan: Tensor<3>,
    grad: Tensor<3>,
    epsilon: f64,
) -> (Tensor<3>, Tensor<2>, Tensor<2>) {
    let [batch, rows, columns] = plan.dims();
    if rows > columns {
        // The system is symmetric in the two sides: transpose, and swap the mass gradients.
        let (cost_grad, column_grad, row_grad) =
            implicit_gradients(plan.swap_dims(1, 2), grad.swap_dims(1, 2), epsilon);
        return (cost_grad.swap_dims(1, 2), row_grad, column_grad);
    }
    let weighted = grad.clone() * plan.clone();
    let row_sums = plan.clone().sum_dim(2); // r: [B, K', 1]
    let column_sums = plan.clone().sum_dim(1); // c: [B, 1, N]
    let empty_columns = column_sums.clone().lower_equal_elem(0.0);
    let inverse_columns = column_sums.recip().mask_fill(empty_columns, 0.0);
    let scaled = plan.clone() * inverse_columns.clone(); // P diag(1/c)
    let weighted_rows = weighted.clone().sum_dim(2); // W𝟙: [B, K', 1]
    let weighted_columns = weighted.sum_dim(1); // Wᵀ𝟙: [B, 1, N]
    let identity = Tensor::<2>::eye(rows, &plan.device())
        .cast(plan.dtype())
        .unsqueeze_dim::<3>(0);
    let schur = row_sums.clone() * identity - scaled.clone().matmul(plan.clone().swap_dims(1, 2));
    let rhs = weighted_rows - scaled.matmul(weighted_columns.clone().swap_dims(1, 2));
    let x = solve_schur(schur, rhs, row_sums); // [B, K', 1]
    let y = (weighted_columns - x.clone().swap_dims(1, 2).matmul(plan.clone())) * inverse_columns;
    let cost_grad = (plan * (x.clone() + y.clone() - grad)).div_scalar(epsilon);
    (
        cost_grad,
        x.reshape([batch, rows]),
        y.reshape([batch, columns]),
    )
}

/// Solves the `[B, n, n]` Schur systems of [`implicit_gradients`] for right-hand sides
/// `[B, n, m]`, given the row sums r `[B, n, 1]`: on the host, in f64, by Cholesky (n = K' is
/// small: ~65 for SALAD, and the N·K'² assembly stays on the device). f64 because the system is
/// ill-conditioned exactly when the forward converges slowly (small ε). Each squared pivot is
/// floored at n·u·max_i A_ii (u the plan dtype's roundoff, the error the assembly left), so a
/// plan whose support splits into blocks (entries underflowed at a tiny ε) gives finite values.
fn solve_schur(schur: Tensor<3>, rhs: Tensor<3>, row_sums: Tensor<3>) -> Tensor<3> {
    let [batch, n, _] = schur.dims();
    let [_, _, m] = rhs.dims();
    let device = schur.device();
    let dtype = schur.dtype();
    let read = |t: Tensor<3>| -> Vec<f64> {
        t.into_data()
            .convert::<f64>()
            .try_into_vec::<f64>()
            .expect("f64 values")
    };
    let (schur, rhs, row_sums) = (read(schur), read(rhs), read(row_sums));
    let roundoff = unit_roundoff(dtype);
    let mut solution = vec![0.0f64; batch * n * m];
    for sample in 0..batch {
        let a = &schur[sample * n * n..(sample + 1) * n * n];
        let r = &row_sums[sample * n..(sample + 1) * n];
        let mut matrix = gauge_fixed(a, r);
        cholesky_factor(&mut matrix, n, roundoff);
        for column in 0..m {
            let mut vector: Vec<f64> = (0..n)
                .map(|i| {
                    if r[i] > 0.0 {
                        rhs[(sample * n + i) * m + column]
                    } else {
                        0.0
                    }
                })
                .collect();
            cholesky_substitute(&matrix, &mut vector, n);
            for i in 0..n {
                solution[(sample * n + i) * m + column] = vector[i];
            }
        }
    }
    Tensor::<3>::from_data(TensorData::new(solution, [batch, n, m]), &device).cast(dtype)
}

/// One sample's Schur matrix `[n, n]` (row major) as [`solve_schur`] factors it, from the
/// row sums r `[n]`: symmetrised (the assembly's rounding may differ across the diagonal), the
/// gauge s = Σr / |m|² added on the non-empty rows' pairs (m marks r_i > 0), and an identity row
/// for each empty row (x_i = 0 there, its right-hand side is set to 0).
pub(crate) fn gauge_fixed(a: &[f64], r: &[f64]) -> Vec<f64> {
    let n = r.len();
    let valid: Vec<bool> = r.iter().map(|&v| v > 0.0).collect();
    let count = valid.iter().filter(|&&v| v).count().max(1) as f64;
    let total: f64 = r.iter().filter(|v| **v > 0.0).sum();
    let gauge = total / (count * count);
    let mut matrix = vec![0.0f64; n * n];
    for i in 0..n {
        if !valid[i] {
            matrix[i * n + i] = 1.0;
            continue;
        }
        for j in 0..n {
            if valid[j] {
                matrix[i * n + j] = 0.5 * (a[i * n + j] + a[j * n + i]) + gauge;
            }
        }
    }
    matrix
}

/// The Cholesky factor L (A = L Lᵀ) of a symmetric positive (semi)definite A `[n, n]`, row
/// major, in place (lower triangle); squared pivots floored at n·u·max_i A_ii.
pub(crate) fn cholesky_factor(a: &mut [f64], n: usize, roundoff: f64) {
    let largest = (0..n).map(|i| a[i * n + i]).fold(0.0f64, f64::max);
    let floor = (n as f64 * roundoff * largest).max(f64::MIN_POSITIVE);
    for j in 0..n {
        let mut pivot = a[j * n + j];
        for k in 0..j {
            pivot -= a[j * n + k] * a[j * n + k];
        }
        let pivot = if pivot.is_nan() {
            pivot
        } else {
            pivot.max(floor)
        }
        .sqrt();
        a[j * n + j] = pivot;
        for i in j + 1..n {
            let mut value = a[i * n + j];
            for k in 0..j {
                value -= a[i * n + k] * a[j * n + k];
            }
            a[i * n + j] = value / pivot;
        }
    }
}

/// Solves L Lᵀ x = b in place (x into `b`) from the factor of [`cholesky_factor`].
pub(crate) fn cholesky_substitute(l: &[f64], b: &mut [f64], n: usize) {
    for i in 0..n {
        let mut value = b[i];
        for k in 0..i {
            value -= l[i * n + k] * b[k];
        }
        b[i] = value / l[i * n + i];
    }
    for i in (0..n).rev() {
        let mut value = b[i];
        for k in i + 1..n {
            value -= l[k * n + i] * b[k];
        }
        b[i] = value / l[i * n + i];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::cpu_devices;
    use burn::tensor::Device;

    #[test]
    fn cholesky_solves_a_known_system() {
        let mut a = vec![4.0, 2.0, 0.4, 2.0, 5.0, 1.0, 0.4, 1.0, 3.0];
        let x = [1.0, -0.5, 2.0];
        let mut b: Vec<f64> = (0..3)
            .map(|i| (0..3).map(|j| a[i * 3 + j] * x[j]).sum())
            .collect();
        cholesky_factor(&mut a, 3, f64::EPSILON);
        cholesky_substitute(&a, &mut b, 3);
        for (got, want) in b.iter().zip(x) {
            assert!((got - want).abs() < 1e-12, "{b:?}");
        }
    }

    /// Marginals met at convergence, masked columns exactly 0 even with NaN costs there, on
    /// every CPU backend; a tiny budget reports non-convergence.
    #[test]
    fn marginals_masks_and_budget() {
        for (name, device) in cpu_devices() {
            let (b, k, n) = (2, 3, 5);
            // Not of the form α_i + β_j (whose plan is a bᵀ after one iteration).
            let values: Vec<f32> = (0..b * k * n)
                .map(|i| ((i * i * 37 + i * 11) % 101) as f32 / 100.0)
                .collect();
            let mut costs = Tensor::<1>::from_floats(values.as_slice(), &device).reshape([b, k, n]);
            // Column 4 of sample 1 is masked, with a NaN cost.
            let nan = Tensor::<3>::full([1, 1, 1], f64::NAN, &device);
            costs = costs.slice_assign([1..2, 0..1, 4..5], nan);
            let column_mass = Tensor::<2>::from_floats(
                [[0.2, 0.2, 0.2, 0.2, 0.2], [0.25, 0.25, 0.25, 0.25, 0.0]],
                &device,
            );
            let row_mass = Tensor::<2>::from_floats([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]], &device);
            let settings = BalancedSettings::new(0.1).with_tolerance(1e-5);
            let (plan, report) = solve(
                costs.clone(),
                row_mass.clone(),
                column_mass.clone(),
                &settings,
            );
            assert!(report.converged, "{name}: {report:?}");
            let values = plan
                .clone()
                .into_data()
                .convert::<f32>()
                .try_to_vec::<f32>()
                .unwrap();
            assert!(values.iter().all(|v| v.is_finite()), "{name}: {values:?}");
            for i in 0..k {
                assert_eq!(values[k * n + i * n + 4], 0.0, "{name}");
            }
            let rows = plan.clone().sum_dim(2).reshape([b, k]) - row_mass.clone();
            let columns = plan.sum_dim(1).reshape([b, n]) - column_mass.clone();
            for residual in [rows.abs().max(), columns.abs().max()] {
                let residual = residual.into_scalar::<f64>();
                assert!(residual < 1e-5, "{name}: {residual}");
            }
            let tight = BalancedSettings::new(0.05).with_max_iterations(2);
            let (_, report) = solve(costs, row_mass, column_mass, &tight);
            assert_eq!(
                report,
                SolveReport {
                    iterations: 2,
                    converged: false
                },
                "{name}"
            );
        }
    }

    /// The implicit gradient of a plan where K' > N (the transposed path) equals the
    /// transpose of the gradient of the transposed problem.
    #[test]
    fn the_two_eliminations_agree() {
        let device = Device::flex();
        device.seed(3);
        let costs = Tensor::<3>::random(
            [2, 4, 6],
            burn::tensor::Distribution::Uniform(0.0, 1.0),
            &device,
        );
        let grad = Tensor::<3>::random(
            [2, 4, 6],
            burn::tensor::Distribution::Uniform(-1.0, 1.0),
            &device,
        );
        let rows = Tensor::<2>::full([2, 4], 0.25, &device);
        let columns = Tensor::<2>::full([2, 6], 1.0 / 6.0, &device);
        let settings = BalancedSettings::new(0.3).with_tolerance(1e-6);
        let (plan, _) = solve(costs, rows, columns, &settings);
        let (direct, da, db) = implicit_gradients(plan.clone(), grad.clone(), 0.3);
        let (swapped, db2, da2) =
            implicit_gradients(plan.swap_dims(1, 2), grad.swap_dims(1, 2), 0.3);
        let tolerance = burn::tensor::Tolerance::rel_abs(1e-3, 1e-5);
        direct
            .into_data()
            .assert_approx_eq::<f32>(&swapped.swap_dims(1, 2).into_data(), tolerance);
        // Both gauges fix Σx = 0 on the eliminated-into side; compare up to the null vector.
        let centre = |t: Tensor<2>| t.clone() - t.mean_dim(1);
        centre(da)
            .into_data()
            .assert_approx_eq::<f32>(&centre(da2).into_data(), tolerance);
        centre(db)
            .into_data()
            .assert_approx_eq::<f32>(&centre(db2).into_data(), tolerance);
    }

    /// The route of uncovered devices gives the same plan as the solve and, through ordinary
    /// autodiff, the implicit gradient of the costs and of a balanced change of the masses
    /// (on Flex with autodiff, called directly), for K' < N and K' > N, with a masked column.
    #[test]
    fn the_tracked_route_gives_the_plan_and_the_implicit_gradient() {
        let device = Device::flex().autodiff();
        device.seed(5);
        for (k, n) in [(3, 5), (5, 3)] {
            let costs = Tensor::<3>::random(
                [2, k, n],
                burn::tensor::Distribution::Uniform(0.0, 1.0),
                &device,
            )
            .require_grad();
            let upstream = Tensor::<3>::random(
                [2, k, n],
                burn::tensor::Distribution::Uniform(-1.0, 1.0),
                &device,
            );
            let rows = Tensor::<2>::full([2, k], 1.0 / k as f64, &device).require_grad();
            let mut column_values = vec![1.0 / n as f32; 2 * n];
            column_values[n] = 0.0;
            column_values[n + 1] *= 2.0;
            let columns = Tensor::<1>::from_floats(column_values.as_slice(), &device)
                .reshape([2, n])
                .require_grad();
            for epsilon in [0.1, 1.0] {
                let settings = BalancedSettings::new(epsilon);
                let (plan, _, converged) = solve_with_tracked_step(
                    costs.clone(),
                    rows.clone(),
                    columns.clone(),
                    &settings,
                );
                assert!(converged.into_scalar::<bool>());
                let (solved, _) = solve(
                    costs.clone().detach(),
                    rows.clone().detach(),
                    columns.clone().detach(),
                    &settings,
                );
                let tolerance = burn::tensor::Tolerance::rel_abs(1e-4, 1e-6);
                plan.clone()
                    .into_data()
                    .assert_approx_eq::<f32>(&solved.clone().into_data(), tolerance);
                let grads = (plan * upstream.clone()).sum().backward();
                let (exact, exact_rows, exact_columns) =
                    implicit_gradients(solved.inner(), upstream.clone().inner(), epsilon);
                costs
                    .grad(&grads)
                    .unwrap()
                    .into_data()
                    .assert_approx_eq::<f32>(&exact.into_data(), tolerance);
                // A balanced change: ∂/∂a_i + ∂/∂b_j agrees whatever the gauge.
                let pair =
                    |a: Tensor<2>, b: Tensor<2>| a.unsqueeze_dim::<3>(2) + b.unsqueeze_dim::<3>(1);
                let tracked = pair(rows.grad(&grads).unwrap(), columns.grad(&grads).unwrap());
                let valid = Tensor::<1>::from_floats(column_values.as_slice(), &device)
                    .inner()
                    .reshape([2, 1, n])
                    .greater_elem(0.0)
                    .float();
                (tracked * valid.clone())
                    .into_data()
                    .assert_approx_eq::<f32>(
                        &(pair(exact_rows, exact_columns) * valid).into_data(),
                        tolerance,
                    );
            }
        }
    }
}
