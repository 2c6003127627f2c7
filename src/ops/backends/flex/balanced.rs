//! The balanced transport solve (docs/maths.md §7) per sample: `maths::balanced`'s log-domain
//! Sinkhorn on the CPU, each sample on its own thread and stopping on its own (no batch-wide
//! stopping test), with the portable solve's masks, anchoring, bounds, stopping rule and final
//! check. κ = −C/ε (anchored per row, bounded) is written once over the plan's storage, the
//! iterations read it row by row (the row update) and column by column through per-column
//! accumulators (the column update), and the last pass turns it into the plan in place. The
//! iterations run in the scaling domain first ([`Scaling`]: two matrix-vector products on
//! K = exp(κ + u₀ + v₀) per iteration, no exp), and in the log domain from wherever that
//! cannot go on (an underflowed row or column sum, a NaN).
//!
//! The potentials u `[K']`, v `[N]` and κ are in the kernel's float (as the portable body keeps
//! them in the tensors' dtype); each logsumexp's sum, the marginal error and the final check
//! are accumulated in f64. Zero masses are masks: their rows and columns of the plan are
//! exactly 0 and their costs are never read.

use rayon::prelude::*;

use super::product::{Strided, product};
use super::real::{Real, dot, lane_max, lane_sum};
use super::simd::wide_kernel;
use crate::maths::balanced::{
    BalancedSettings, POTENTIAL_BOUND, STALL_PATIENCE, cholesky_factor, cholesky_substitute,
    gauge_fixed, stall_floor,
};
use crate::maths::solver::{SolveReport, Status, Stopping};

/// The plans `[B, K', N]` of costs `[B, K', N]`, row masses `[B, K']` and column masses
/// `[B, N]`, and the batch's report (the most iterations; converged if every sample is).
/// `roundoff` is the unit roundoff of the caller's dtype (the final check's slack).
pub(super) fn forward<T: Real>(
    costs: &[T],
    row_mass: &[T],
    column_mass: &[T],
    [rows, columns]: [usize; 2],
    settings: &BalancedSettings,
    roundoff: f64,
) -> (Vec<T>, SolveReport) {
    let size = rows * columns;
    let mut plan = vec![T::default(); costs.len()];
    if size == 0 {
        return (plan, SolveReport::IMMEDIATE);
    }
    let report = plan
        .par_chunks_mut(size)
        .enumerate()
        .map(|(b, plan)| {
            let widen = |m: &[T]| m.iter().map(|m| m.to_f64()).collect::<Vec<f64>>();
            let a = widen(&row_mass[b * rows..(b + 1) * rows]);
            let c = widen(&column_mass[b * columns..(b + 1) * columns]);
            let costs = &costs[b * size..(b + 1) * size];
            solve_sample_wide(costs, &a, &c, plan, settings, roundoff)
        })
        .reduce(|| SolveReport::IMMEDIATE, SolveReport::merge);
    (plan, report)
}

/// ln m, or −∞ (the mask of a zero mass) where m ≤ 0.
fn log_mass(m: f64) -> f64 {
    if m <= 0.0 { f64::NEG_INFINITY } else { m.ln() }
}

/// A potential within ±[`POTENTIAL_BOUND`] (NaN stays NaN).
fn bounded(potential: f64) -> f64 {
    potential.clamp(-POTENTIAL_BOUND, POTENTIAL_BOUND)
}

/// ln(sum) + shift for a logsumexp whose terms were shifted by `shift` (the largest term): −∞
/// when every term is −∞ (`largest`, before the shift's floor, is −∞).
fn finish_logsumexp(sum: f64, shift: f64, largest: f64) -> f64 {
    if largest == f64::NEG_INFINITY {
        f64::NEG_INFINITY
    } else {
        sum.ln() + shift
    }
}

/// How the scaling iterations ended.
enum Handover {
    /// The stopping rule ended the solve (u, v hold the final potentials).
    Done(SolveReport),
    /// The log-domain iterations take over from u, v (after a column update of u when
    /// `needs_column_update` says so).
    Log { needs_column_update: bool },
}

/// The log-domain iterations' updates in the scaling (kernel) domain (docs/maths.md §7): on
/// K = exp(κ + u₀ + v₀), formed once, with the scalings α = e^(u − u₀), β = e^(v − v₀), the row
/// update is α_i = a_i / Σ_j K_ij β_j and the column update β_j = b_j / Σ_i α_i K_ij: two
/// matrix-vector products per iteration instead of 2·K'·N exponentials, the same iterates up to
/// rounding, and the same stopping rule. A scaling that leaves [1/SCALING_LIMIT, SCALING_LIMIT]
/// is absorbed into u₀, v₀ (and K formed again); a row or column sum that is 0, ∞ or NaN (an
/// underflowed kernel, a NaN cost) hands the solve to the log domain, which resolves it.
struct Scaling<'a, T> {
    kappa: &'a [T],
    a: &'a [f64],
    b: &'a [f64],
    valid_row: &'a [bool],
    valid_column: &'a [bool],
}

/// The largest factor a scaling may reach before it is absorbed into the potentials: far from
/// f32's range once multiplied by K ≤ 1 and summed over N.
const SCALING_LIMIT: f64 = 1e12;

impl<T: Real> Scaling<'_, T> {
    /// K_ij = exp(u_i + v_j + κ_ij), exactly 0 where a mass is zero.
    #[inline(always)]
    fn fill(&self, kernel: &mut [T], u: &[T], v: &[T]) {
        let n = v.len();
        let zero = T::default();
        for (i, (row, kappa)) in kernel
            .chunks_exact_mut(n)
            .zip(self.kappa.chunks_exact(n))
            .enumerate()
        {
            if !self.valid_row[i] {
                row.fill(zero);
                continue;
            }
            let (row, kappa, valid) = (&mut row[..n], &kappa[..n], &self.valid_column[..n]);
            let ui = u[i];
            for j in 0..n {
                let x = (ui + v[j] + kappa[j]).exp();
                row[j] = if valid[j] { x } else { zero };
            }
        }
    }

    /// u ← u + ln α, v ← v + ln β (bounded, on the non-empty rows and columns); α = β = 1.
    #[inline(always)]
    fn absorb(&self, u: &mut [T], v: &mut [T], alpha: &mut [T], beta: &mut [T]) {
        let one = T::from_f64(1.0);
        for ((u, s), &valid) in u.iter_mut().zip(alpha.iter_mut()).zip(self.valid_row) {
            if valid {
                *u = T::from_f64(bounded(u.to_f64() + s.to_f64().ln()));
            }
            *s = one;
        }
        for ((v, s), &valid) in v.iter_mut().zip(beta.iter_mut()).zip(self.valid_column) {
            if valid {
                *v = T::from_f64(bounded(v.to_f64() + s.to_f64().ln()));
            }
            *s = one;
        }
    }

    /// Iterates from u, v right after a column update, as the log-domain loop would.
    #[inline(always)]
    fn iterate(
        &self,
        u: &mut [T],
        v: &mut [T],
        stopping: &mut Stopping,
        best: &mut f64,
        iteration: &mut usize,
        stall_floor: f64,
    ) -> Handover {
        let (k, n) = (u.len(), v.len());
        let zero = T::default();
        let one = T::from_f64(1.0);
        let total: f64 = self.a.iter().sum();
        let in_range = |s: f64| (1.0 / SCALING_LIMIT..=SCALING_LIMIT).contains(&s);
        let mut kernel = vec![zero; k * n];
        self.fill(&mut kernel, u, v);
        let (mut alpha, mut beta) = (vec![one; k], vec![one; n]);
        let mut next = vec![one; k];
        let mut next_beta = vec![one; n];
        let mut column_sum = vec![zero; n];
        loop {
            // Rows: Σ_j K_ij β_j, the error ‖P𝟙 − a‖₁ / Σa with P𝟙 = α_i Σ_j K_ij β_j, and the
            // row update α_i = a_i / Σ_j K_ij β_j.
            let mut error = 0.0;
            let mut moved = false;
            for i in 0..k {
                if !self.valid_row[i] {
                    next[i] = alpha[i];
                    continue;
                }
                let sum = dot(&kernel[i * n..(i + 1) * n], &beta).to_f64();
                if !(sum.is_finite() && sum > 0.0) {
                    self.absorb(u, v, &mut alpha, &mut beta);
                    return Handover::Log {
                        needs_column_update: false,
                    };
                }
                error += (alpha[i].to_f64() * sum - self.a[i]).abs();
                next[i] = T::from_f64(self.a[i] / sum);
                moved |= next[i] != alpha[i];
            }
            let error = error / total;
            let progress = error < *best || error > stall_floor;
            if !error.is_nan() {
                *best = best.min(error);
            }
            if let Some(report) =
                stopping.check(*iteration, Status::of_sample(error, progress, moved))
            {
                self.absorb(u, v, &mut alpha, &mut beta);
                return Handover::Done(report);
            }
            std::mem::swap(&mut alpha, &mut next);
            // Columns: β_j = b_j / Σ_i α_i K_ij.
            column_sum.fill(zero);
            for i in 0..k {
                if !self.valid_row[i] {
                    continue;
                }
                let ai = alpha[i];
                let row = &kernel[i * n..(i + 1) * n];
                for (c, &x) in column_sum.iter_mut().zip(row) {
                    *c += ai * x;
                }
            }
            *iteration += 1;
            let mut healthy = true;
            for j in 0..n {
                if self.valid_column[j] {
                    let sum = column_sum[j].to_f64();
                    healthy &= sum.is_finite() && sum > 0.0;
                    next_beta[j] = T::from_f64(self.b[j] / sum);
                } else {
                    next_beta[j] = beta[j];
                }
            }
            if !healthy {
                // u from the new α, v from the previous β: the log domain redoes the column
                // update from u.
                self.absorb(u, v, &mut alpha, &mut beta);
                return Handover::Log {
                    needs_column_update: true,
                };
            }
            std::mem::swap(&mut beta, &mut next_beta);
            let extreme = alpha
                .iter()
                .zip(self.valid_row)
                .any(|(s, &valid)| valid && !in_range(s.to_f64()))
                || beta
                    .iter()
                    .zip(self.valid_column)
                    .any(|(s, &valid)| valid && !in_range(s.to_f64()));
            if extreme {
                self.absorb(u, v, &mut alpha, &mut beta);
                self.fill(&mut kernel, u, v);
            }
        }
    }
}

wide_kernel! {
/// One sample's solve into `plan` `[K', N]` (κ first, then the plan); returns how it ended.
fn solve_sample<T: Real>(
    costs: &[T],
    a: &[f64],
    b: &[f64],
    plan: &mut [T],
    settings: &BalancedSettings,
    roundoff: f64,
) -> SolveReport {
    let (k, n) = (a.len(), b.len());
    let log_a: Vec<f64> = a.iter().map(|&m| log_mass(m)).collect();
    let log_b: Vec<f64> = b.iter().map(|&m| log_mass(m)).collect();
    let valid_row: Vec<bool> = a.iter().map(|&m| m > 0.0).collect();
    let valid_column: Vec<bool> = b.iter().map(|&m| m > 0.0).collect();
    let bound = T::from_f64(POTENTIAL_BOUND);
    let low = T::from_f64(-POTENTIAL_BOUND);
    let neg_epsilon = T::from_f64(-settings.epsilon);
    let neg_infinity = T::from_f64(f64::NEG_INFINITY);

    // κ_ij = −c_ij/ε − max_{j valid} (−c_ij/ε), within ±bound; 0 where a mass is zero (those
    // costs, NaN or ∞ at padding, are never read, and κ there is never used). The maxima here
    // and in the logsumexps may skip a NaN: it surfaces in the sums, and so in the error.
    for (i, (kappa, costs)) in plan.chunks_exact_mut(n).zip(costs.chunks_exact(n)).enumerate() {
        if !valid_row[i] {
            kappa.fill(T::default());
            continue;
        }
        let mut anchor = neg_infinity;
        for j in 0..n {
            kappa[j] = if valid_column[j] { costs[j] / neg_epsilon } else { T::default() };
            if valid_column[j] {
                anchor = Real::max(anchor, kappa[j]);
            }
        }
        let anchor = if anchor < low { low } else { anchor };
        for x in kappa.iter_mut() {
            let shifted = *x - anchor;
            *x = if shifted > bound {
                bound
            } else if shifted < low {
                low
            } else {
                shifted
            };
        }
    }
    let kappa: &[T] = plan;

    // u = 0 (−∞ on empty rows), then the columns' update.
    let mut u: Vec<T> = valid_row
        .iter()
        .map(|&valid| if valid { T::default() } else { neg_infinity })
        .collect();
    let mut v = vec![neg_infinity; n];
    let mut column_max = vec![T::default(); n];
    let mut column_sum = vec![T::default(); n];
    let floor = T::from_f64(-4.0 * POTENTIAL_BOUND);
    // v_j ← ln b_j − logsumexp_i(u_i + κ_ij), over the non-empty rows.
    let mut column_update = |u: &[T], v: &mut [T]| {
        column_max.fill(neg_infinity);
        for (i, kappa) in kappa.chunks_exact(n).enumerate() {
            if !valid_row[i] {
                continue;
            }
            let ui = u[i];
            for (m, &x) in column_max.iter_mut().zip(kappa) {
                *m = Real::max(*m, ui + x);
            }
        }
        let shift: Vec<T> = column_max
            .iter()
            .map(|&m| if m < floor { floor } else { m })
            .collect();
        column_sum.fill(T::default());
        for (i, kappa) in kappa.chunks_exact(n).enumerate() {
            if !valid_row[i] {
                continue;
            }
            let ui = u[i];
            for ((s, &x), &shift) in column_sum.iter_mut().zip(kappa).zip(&shift) {
                *s += (ui + x - shift).exp();
            }
        }
        for j in 0..n {
            v[j] = if valid_column[j] {
                let largest = column_max[j].to_f64();
                let lse = finish_logsumexp(column_sum[j].to_f64(), shift[j].to_f64(), largest);
                T::from_f64(bounded(log_b[j] - lse))
            } else {
                neg_infinity
            };
        }
    };
    column_update(&u, &mut v);

    let total: f64 = a.iter().sum();
    let mut row_lse = vec![0.0f64; k];
    let mut best = f64::INFINITY;
    let mut stopping = Stopping::with_patience(
        settings.iteration_cap(),
        settings.tolerance,
        STALL_PATIENCE,
    );
    let mut iteration = 0;
    let stall_floor = stall_floor(k, n, roundoff);
    let scaling = Scaling {
        kappa,
        a,
        b,
        valid_row: &valid_row,
        valid_column: &valid_column,
    };
    let handover = scaling.iterate(
        &mut u,
        &mut v,
        &mut stopping,
        &mut best,
        &mut iteration,
        stall_floor,
    );
    let done = match handover {
        Handover::Done(report) => Some(report),
        Handover::Log {
            needs_column_update,
        } => {
            if needs_column_update {
                column_update(&u, &mut v);
            }
            None
        }
    };
    let report = if let Some(report) = done { report } else { loop {
        // logsumexp_j(v_j + κ_ij) per non-empty row (v = −∞ at empty columns: their terms
        // are 0, or e⁻⁸⁷ in f32's fast exp, below the rounding of a sum of at least 1).
        for (i, kappa) in kappa.chunks_exact(n).enumerate() {
            if !valid_row[i] {
                row_lse[i] = f64::NEG_INFINITY;
                continue;
            }
            let largest = lane_max(n, neg_infinity, |j| v[j] + kappa[j]);
            let shift = if largest < floor { floor } else { largest };
            let sum = lane_sum(n, |j| (v[j] + kappa[j] - shift).exp());
            row_lse[i] = finish_logsumexp(sum.to_f64(), shift.to_f64(), largest.to_f64());
        }
        // ‖P𝟙 − a‖₁ / Σa with P𝟙 = exp(u + lse) (the columns are exact after their update).
        let mut error = 0.0;
        for i in 0..k {
            let sum = if valid_row[i] {
                (u[i].to_f64() + row_lse[i]).exp()
            } else {
                0.0
            };
            error += (sum - a[i]).abs();
        }
        let error = error / total;
        // A stall only near the rounding floor (`maths::balanced::stall_floor`).
        let progress = error < best || error > stall_floor;
        if !error.is_nan() {
            best = best.min(error);
        }
        let mut moved = false;
        let next: Vec<T> = (0..k)
            .map(|i| {
                let next = if valid_row[i] {
                    T::from_f64(bounded(log_a[i] - row_lse[i]))
                } else {
                    neg_infinity
                };
                moved |= next != u[i];
                next
            })
            .collect();
        let status = Status::of_sample(error, progress, moved);
        if let Some(report) = stopping.check(iteration, status) {
            break report;
        }
        u = next;
        column_update(&u, &mut v);
        iteration += 1;
    } };

    // P = exp(min(u_i + v_j + κ_ij, ln b_j)), exactly 0 on zero masses.
    let cap: Vec<T> = log_b.iter().map(|&l| T::from_f64(l)).collect();
    let mut error = 0.0;
    for (i, row) in plan.chunks_exact_mut(n).enumerate() {
        if !valid_row[i] {
            row.fill(T::default());
            error += a[i].abs();
            continue;
        }
        let ui = u[i];
        for (((p, &vj), &cap), &valid) in row.iter_mut().zip(&v).zip(&cap).zip(&valid_column) {
            let exponent = ui + vj + *p;
            let exponent = if exponent < cap { exponent } else { cap };
            *p = if valid { exponent.exp() } else { T::default() };
        }
        let sum: f64 = row.iter().map(|p| p.to_f64()).sum();
        error += (sum - a[i]).abs();
    }
    if !report.converged {
        return report;
    }
    // The portable solve's final check: the plan itself meets the tolerance (up to the
    // rounding of its row sums).
    let slack = (n + k) as f64 * roundoff;
    SolveReport {
        converged: error / total <= 2.0 * settings.tolerance.max(slack),
        ..report
    }
}
=> solve_sample_wide
}

/// (∂L/∂costs `[B, K', N]`, ∂L/∂row_mass `[B, K']`, ∂L/∂column_mass `[B, N]`) from the plans
/// and ∂L/∂plan `[B, K', N]`: `maths::balanced::implicit_gradients` per sample (one thread
/// each). The shorter side's Schur system is assembled in the kernel's float by `gemm`, as
/// the portable body's matmul does, and solved by the same gauge-fixed f64 Cholesky; every
/// other sum is accumulated in f64.
pub(super) fn backward<T: Real>(
    plan: &[T],
    grad: &[T],
    [rows, columns]: [usize; 2],
    epsilon: f64,
    roundoff: f64,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let size = rows * columns;
    let batch = plan.len().checked_div(size).unwrap_or(0);
    let mut costs = vec![T::default(); plan.len()];
    let mut row_grad = vec![T::default(); batch * rows];
    let mut column_grad = vec![T::default(); batch * columns];
    if size == 0 {
        return (costs, row_grad, column_grad);
    }
    costs
        .par_chunks_mut(size)
        .zip(row_grad.par_chunks_mut(rows))
        .zip(column_grad.par_chunks_mut(columns))
        .enumerate()
        .for_each(|(b, ((costs, da), db))| {
            let plan = &plan[b * size..(b + 1) * size];
            let grad = &grad[b * size..(b + 1) * size];
            if rows <= columns {
                backward_sample(plan, grad, costs, da, db, epsilon, roundoff);
            } else {
                // The system is symmetric in the two sides: solve the transposed sample.
                let transpose = |m: &[T]| -> Vec<T> {
                    (0..size)
                        .map(|x| m[(x % rows) * columns + x / rows])
                        .collect()
                };
                let (plan, grad) = (transpose(plan), transpose(grad));
                let mut transposed = vec![T::default(); size];
                backward_sample(&plan, &grad, &mut transposed, db, da, epsilon, roundoff);
                for (x, &value) in transposed.iter().enumerate() {
                    costs[(x % rows) * columns + x / rows] = value;
                }
            }
        });
    (costs, row_grad, column_grad)
}

/// One sample's implicit gradient with the rows the shorter side (K' ≤ N): `plan`, `grad` and
/// `costs` `[K', N]`, `da` `[K']`, `db` `[N]`.
fn backward_sample<T: Real>(
    plan: &[T],
    grad: &[T],
    costs: &mut [T],
    da: &mut [T],
    db: &mut [T],
    epsilon: f64,
    roundoff: f64,
) {
    let (k, n) = (da.len(), db.len());
    // r = P𝟙, c = Pᵀ𝟙, W𝟙 and Wᵀ𝟙 for W = G ⊙ P.
    let mut r = vec![0.0f64; k];
    let mut c = vec![0.0f64; n];
    let mut weighted_rows = vec![0.0f64; k];
    let mut weighted_columns = vec![0.0f64; n];
    for (i, (p, g)) in plan.chunks_exact(n).zip(grad.chunks_exact(n)).enumerate() {
        for j in 0..n {
            let (p, w) = (p[j].to_f64(), (p[j] * g[j]).to_f64());
            r[i] += p;
            c[j] += p;
            weighted_rows[i] += w;
            weighted_columns[j] += w;
        }
    }
    let inverse_columns: Vec<f64> = c
        .iter()
        .map(|&c| if c <= 0.0 { 0.0 } else { 1.0 / c })
        .collect();
    // diag(r) − P diag(1/c) Pᵀ, the product in the kernel's float.
    let inverse_t: Vec<T> = inverse_columns.iter().map(|&v| T::from_f64(v)).collect();
    let mut scaled = plan.to_vec();
    for row in scaled.chunks_exact_mut(n) {
        for (s, &v) in row.iter_mut().zip(&inverse_t) {
            *s = *s * v;
        }
    }
    let mut product_out = vec![T::default(); k * k];
    product(
        [k, k, n],
        &mut product_out,
        (k, 1),
        false,
        Strided::rows(&scaled, n),
        Strided::transposed(plan, n),
        T::from_f64(1.0),
    );
    let schur: Vec<f64> = (0..k * k)
        .map(|x| {
            let diagonal = if x / k == x % k { r[x / k] } else { 0.0 };
            diagonal - product_out[x].to_f64()
        })
        .collect();
    // x = S⁻¹ (W𝟙 − P((Wᵀ𝟙) ⊘ c)), x_i = 0 on the empty rows.
    let mut x: Vec<f64> = (0..k)
        .map(|i| {
            if r[i] <= 0.0 {
                return 0.0;
            }
            let row = &plan[i * n..(i + 1) * n];
            let spread: f64 = (0..n)
                .map(|j| row[j].to_f64() * inverse_columns[j] * weighted_columns[j])
                .sum();
            weighted_rows[i] - spread
        })
        .collect();
    let mut matrix = gauge_fixed(&schur, &r);
    cholesky_factor(&mut matrix, k, roundoff);
    cholesky_substitute(&matrix, &mut x, k);
    // y = (Wᵀ𝟙 − Pᵀx) ⊘ c, 0 on the empty columns.
    let mut y = weighted_columns;
    for (i, row) in plan.chunks_exact(n).enumerate() {
        for (y, &p) in y.iter_mut().zip(row) {
            *y -= x[i] * p.to_f64();
        }
    }
    for (y, &inverse) in y.iter_mut().zip(&inverse_columns) {
        *y *= inverse;
    }
    // ∂L/∂C_ij = P_ij (x_i + y_j − G_ij) / ε.
    let scale = T::from_f64(1.0 / epsilon);
    let y_t: Vec<T> = y.iter().map(|&v| T::from_f64(v)).collect();
    for (i, ((d, p), g)) in costs
        .chunks_exact_mut(n)
        .zip(plan.chunks_exact(n))
        .zip(grad.chunks_exact(n))
        .enumerate()
    {
        let xi = T::from_f64(x[i]);
        for j in 0..n {
            d[j] = p[j] * (xi + y_t[j] - g[j]) * scale;
        }
    }
    for (d, &v) in da.iter_mut().zip(&x) {
        *d = T::from_f64(v);
    }
    for (d, &v) in db.iter_mut().zip(&y) {
        *d = T::from_f64(v);
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::Device;

    use super::*;
    use crate::ops::backends::flex::simd::check::{agree, values};
    use crate::test_support::{
        balanced_backward_matches_portable, balanced_kernel_matches_portable,
    };

    /// The copy chosen at run time and the baseline build solve to the same plan.
    #[test]
    fn wide_copy_matches_baseline() {
        let (k, n) = (5, 11);
        let costs = values(k * n, 6, 0.0, 2.0);
        let (a, b) = (vec![1.0 / k as f64; k], vec![1.0 / n as f64; n]);
        let settings = BalancedSettings::new(0.2);
        let (mut wide, mut base) = (vec![0.0; k * n], vec![0.0; k * n]);
        let roundoff = f32::EPSILON as f64;
        let steps_wide = solve_sample_wide(&costs, &a, &b, &mut wide, &settings, roundoff);
        let steps_base = solve_sample(&costs, &a, &b, &mut base, &settings, roundoff);
        assert_eq!(steps_wide, steps_base);
        agree("plan", &wide, &base);
    }

    /// The kernel agrees with the portable solve on every case of `balanced_cases`.
    #[test]
    fn kernel_matches_the_portable_solve() {
        balanced_kernel_matches_portable(&Device::flex(), "Flex");
    }

    /// The backward kernel agrees with `maths::balanced::implicit_gradients` (the portable
    /// body): see `test_support::balanced_backward_matches_portable`.
    #[test]
    fn backward_matches_the_portable_body() {
        balanced_backward_matches_portable(&Device::flex(), "Flex");
    }
}
