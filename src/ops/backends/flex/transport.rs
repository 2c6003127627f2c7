//! GSP's partial transport per sample: one exp pass over the costs `[K, N]` gives
//! ℓ_j = logsumexp_k(−c_kj / ε) and the softmax over prototypes, the scalar dual β is found
//! on `[N]` vectors in f64 (each sample stops on its own, with no device read), and the plan is
//! written in place over the softmax. The backward is the closed form of
//! `transport::implicit_backward`, one pass over the plan.

use rayon::prelude::*;

use super::real::{Real, lane_sum};
use super::simd::wide_kernel;
use crate::maths::implicit_backward::MIN_DENOMINATOR;
use crate::maths::settings::{TransportSettings, TransportSolver};
use crate::maths::solver::{BETA_AT_FULL_TRANSPORT, SolveReport, Status, Stopping};
use crate::ops::TransportOutput;

/// The plan `[B, K+1, N]` (row 0 = ρ) and the batch's report: the largest iteration count,
/// converged if every sample is.
pub(super) fn forward<T: Real>(
    costs: &[T],
    mass: &[T],
    count: usize,
    positions: usize,
    settings: &TransportSettings,
) -> (Vec<T>, SolveReport) {
    let n = positions;
    let batch = mass.len() / n;
    let mut plan = vec![T::default(); batch * (count + 1) * n];
    let report = plan
        .par_chunks_mut((count + 1) * n)
        .enumerate()
        .map(|(b, plan)| {
            let costs = &costs[b * count * n..(b + 1) * count * n];
            let mass: Vec<f64> = mass[b * n..(b + 1) * n]
                .iter()
                .map(|m| m.to_f64())
                .collect();
            solve_sample_wide(costs, &mass, plan, settings)
        })
        .reduce(|| SolveReport::IMMEDIATE, SolveReport::merge);
    (plan, report)
}

wide_kernel! {
/// Solves one sample into `plan` `[K+1, N]`; returns how the solve ended.
fn solve_sample<T: Real>(
    costs: &[T],
    mass: &[f64],
    plan: &mut [T],
    settings: &TransportSettings,
) -> SolveReport {
    let n = mass.len();
    let inv_epsilon = T::from_f64(1.0 / settings.epsilon);
    // Shift by the smallest cost of each position so the largest exponent is 0.
    let mut smallest = costs[..n].to_vec();
    for row in costs.chunks_exact(n).skip(1) {
        for (s, &c) in smallest.iter_mut().zip(row) {
            if c < *s {
                *s = c;
            }
        }
    }
    let (residual, kernel) = plan.split_at_mut(n);
    let mut totals = vec![T::default(); n];
    for (row, costs) in kernel.chunks_exact_mut(n).zip(costs.chunks_exact(n)) {
        for (((w, &c), &s), total) in row.iter_mut().zip(costs).zip(&smallest).zip(&mut totals) {
            *w = ((s - c) * inv_epsilon).exp();
            *total += *w;
        }
    }
    // ℓ_j anchored at the nearest valid position's cost (β absorbs the shift): with costs of
    // 1e30, ℓ itself would leave no digit for β + ℓ.
    let anchor = smallest
        .iter()
        .zip(mass)
        .filter(|(_, a)| **a > 0.0)
        .map(|(s, _)| s.to_f64())
        .fold(f64::INFINITY, f64::min);
    let log_mass: Vec<f64> = totals
        .iter()
        .zip(&smallest)
        .map(|(&t, &s)| t.to_f64().ln() - (s.to_f64() - anchor) / settings.epsilon)
        .collect();
    let (beta, report) = solve_beta(&log_mass, mass, settings);
    // t_j = a_j σ(β + ℓ_j), ρ_j = a_j σ(−β − ℓ_j), P_kj = t_j · softmax_k.
    let mut factor = vec![T::default(); n];
    for j in 0..n {
        let logit = beta + log_mass[j];
        residual[j] = T::from_f64(mass[j] * sigmoid(-logit));
        factor[j] = T::from_f64(mass[j] * sigmoid(logit) / totals[j].to_f64());
    }
    for row in kernel.chunks_exact_mut(n) {
        for (w, &f) in row.iter_mut().zip(&factor) {
            *w = *w * f;
        }
    }
    report
}
=> solve_sample_wide
}

fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

fn softplus(x: f64) -> f64 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

/// logsumexp of `values` (the caller passes the valid positions'); −∞ when there are none.
fn logsumexp(values: impl Iterator<Item = f64> + Clone) -> f64 {
    let shift = values.clone().fold(f64::NEG_INFINITY, f64::max);
    if shift == f64::NEG_INFINITY {
        return shift;
    }
    values.map(|v| (v - shift).exp()).sum::<f64>().ln() + shift
}

/// Solves Σ_j a_j σ(β + ℓ_j) = μ for one sample, as `maths::solver::solve_beta` does for
/// a batch: the same bracket, the same safeguarded Newton on the log of the mass (or the
/// log-domain Sinkhorn iteration), the same stopping rule, applied to this sample alone (the
/// portable solver stops when the whole batch meets it).
fn solve_beta(log_mass: &[f64], mass: &[f64], settings: &TransportSettings) -> (f64, SolveReport) {
    let mu = settings.transport_ratio;
    if mu >= 1.0 {
        return (BETA_AT_FULL_TRANSPORT, SolveReport::IMMEDIATE);
    }
    let valid = || {
        log_mass
            .iter()
            .zip(mass)
            .filter(|(_, a)| **a > 0.0)
            .map(|(&l, &a)| (l, a))
    };
    let logit_mu = (mu / (1.0 - mu)).ln();
    let largest = valid().map(|(l, _)| l).fold(f64::NEG_INFINITY, f64::max);
    let smallest = valid().map(|(l, _)| l).fold(f64::INFINITY, f64::min);
    let lower = (logit_mu - largest).max(mu.ln() - logsumexp(valid().map(|(l, a)| a.ln() + l)));
    let upper =
        (logit_mu - smallest).min(logsumexp(valid().map(|(l, a)| a.ln() - l)) - (1.0 - mu).ln());
    let sent = |beta: f64| -> f64 { valid().map(|(l, a)| a * sigmoid(beta + l)).sum() };
    match settings.solver {
        TransportSolver::Newton => newton(lower, upper, settings, |beta| {
            let (mut sent, mut kept, mut slope) = (0.0, 0.0, 0.0);
            for (l, a) in valid() {
                let s = sigmoid(beta + l);
                sent += a * s;
                kept += a * sigmoid(-beta - l);
                slope += a * s * (1.0 - s);
            }
            (sent, kept, slope)
        }),
        TransportSolver::Sinkhorn => {
            // From the lower bound β rises monotonically: progress is a new highest β.
            let (mut beta, mut highest, mut previous) = (lower, lower, lower);
            let mut stopping = Stopping::new(settings);
            for iteration in 0.. {
                let residual = sent(beta) - mu;
                let next =
                    mu.ln() - logsumexp(valid().map(|(l, a)| a.ln() + l - softplus(beta + l)));
                let rose = next > highest;
                highest = highest.max(next);
                let status = Status::of_sample(residual, rose, beta != previous);
                if let Some(report) = stopping.check(iteration, status) {
                    return (beta, report);
                }
                previous = beta;
                beta = next;
            }
            unreachable!("the stopping rule ends the loop at the cap")
        }
    }
}

/// Newton on ln F − ln μ from the lower bound when μ ≤ ½, on the residual mass from the upper
/// bound otherwise; bisection when a step leaves the shrinking bracket. `masses(β)` returns
/// (F, R, F') = (Σ a σ(β+ℓ), Σ a σ(−β−ℓ), Σ a σ(1−σ)). Progress is the bracket shrinking.
fn newton(
    mut lower: f64,
    mut upper: f64,
    settings: &TransportSettings,
    masses: impl Fn(f64) -> (f64, f64, f64),
) -> (f64, SolveReport) {
    let mu = settings.transport_ratio;
    let from_below = mu <= 0.5;
    let mut beta = if from_below { lower } else { upper };
    let mut previous = beta;
    let mut stopping = Stopping::new(settings);
    for iteration in 0.. {
        let (sent, kept, slope) = masses(beta);
        let residual = sent - mu;
        // A bound moves strictly inward unless β sits on it (the rounding floor).
        let shrank = if residual > 0.0 {
            beta < upper
        } else {
            beta > lower
        };
        if residual > 0.0 {
            upper = beta;
        } else {
            lower = beta;
        }
        let status = Status::of_sample(residual, shrank, beta != previous);
        if let Some(report) = stopping.check(iteration, status) {
            return (beta, report);
        }
        let step = if from_below {
            beta - (sent / mu).ln() * sent / slope
        } else {
            beta + (kept / (1.0 - mu)).ln() * kept / slope
        };
        let next = if step >= lower && step <= upper {
            step
        } else {
            (lower + upper) / 2.0
        };
        previous = beta;
        beta = next;
    }
    unreachable!("the stopping rule ends the loop at the cap")
}

/// The marginals `[B, N + K]` of plans `[B, K+1, N]`: per sample the mass each position sends
/// t_j = Σ_k P_kj `[N]` (summed from the plan, not a_j − ρ_j, which cancels at small μ), then
/// the mass each prototype receives Σ_j P_kj `[K]`.
pub(super) fn marginals<T: Real>(plan: &[T], [count, n]: [usize; 2]) -> Vec<T> {
    let rows = count + 1;
    let batch = plan.len() / (rows * n);
    let mut out = vec![T::default(); batch * (n + count)];
    out.par_chunks_mut(n + count)
        .zip(plan.par_chunks(rows * n))
        .for_each(|(out, plan)| {
            let (sent, prototypes) = out.split_at_mut(n);
            for (total, row) in prototypes.iter_mut().zip(plan[n..].chunks_exact(n)) {
                for (t, &p) in sent.iter_mut().zip(row) {
                    *t += p;
                }
                *total = lane_sum(n, |j| row[j]);
            }
        });
    out
}

/// ∂L/∂X of one sample, row by row: the full `[K+1, N]` gradient of the plan, or the gradients
/// of its marginals (g_j of each position's sent mass, g_k of each prototype's received mass),
/// which give P_kj the gradient g_j + g_k and ρ none.
#[derive(Clone, Copy)]
enum Upstream<'a, T> {
    Plan(&'a [T]),
    Marginals { sent: &'a [T], prototypes: &'a [T] },
}

/// One row of an [`Upstream`].
#[derive(Clone, Copy)]
enum Row<'a, T> {
    Values(&'a [T]),
    /// `values[j] + constant` at position j.
    Shifted(&'a [T], T),
    Zero,
}

impl<'a, T: Real> Upstream<'a, T> {
    fn row(self, k: usize, n: usize) -> Row<'a, T> {
        match self {
            Upstream::Plan(grad) => Row::Values(&grad[k * n..(k + 1) * n]),
            Upstream::Marginals { .. } if k == 0 => Row::Zero,
            Upstream::Marginals { sent, prototypes } => Row::Shifted(sent, prototypes[k - 1]),
        }
    }
}

/// ∂L/∂costs `[B, K, N]` from the plan `[B, K+1, N]`, the masses `[B, N]` and the gradient of
/// the solve's `output`: ∂L/∂plan `[B, K+1, N]`, or ∂L/∂[`marginals`] `[B, N + K]` (never
/// expanded to the plan's size).
pub(super) fn backward<T: Real>(
    plan: &[T],
    grad: &[T],
    mass: &[T],
    [count, n]: [usize; 2],
    epsilon: f64,
    output: TransportOutput,
) -> Vec<T> {
    implicit_backward(plan, mass, [count, n], epsilon, |b| match output {
        TransportOutput::Plan => {
            let rows = (count + 1) * n;
            Upstream::Plan(&grad[b * rows..(b + 1) * rows])
        }
        TransportOutput::Marginals => {
            let width = n + count;
            let (sent, prototypes) = grad[b * width..(b + 1) * width].split_at(n);
            Upstream::Marginals { sent, prototypes }
        }
    })
}

/// The closed form of `transport::implicit_backward`, per sample, one pass over the plan:
/// h = X ⊙ g, U_j = Σ_k h_kj, t_j = Σ_k P_kj, λ = (Σ ρU/a − Σ h_0) / Σ ρt/a,
/// V = (U + λρ)/a, ∂L/∂c_kj = −(h_kj − V_j P_kj)/ε.
fn implicit_backward<'a, T: Real>(
    plan: &[T],
    mass: &[T],
    [count, n]: [usize; 2],
    epsilon: f64,
    upstream: impl Fn(usize) -> Upstream<'a, T> + Sync,
) -> Vec<T> {
    let batch = mass.len() / n;
    let rows = count + 1;
    let mut dc = vec![T::default(); batch * count * n];
    dc.par_chunks_mut(count * n)
        .enumerate()
        .for_each(|(b, dc)| {
            let plan = &plan[b * rows * n..(b + 1) * rows * n];
            let mass = &mass[b * n..(b + 1) * n];
            let upstream = upstream(b);
            // U_j = Σ_k X_kj g_kj, and t_j = Σ_{k≥1} P_kj.
            let mut column = vec![0.0f64; n];
            let mut sent = vec![0.0f64; n];
            for row in plan[n..].chunks_exact(n) {
                for (t, &p) in sent.iter_mut().zip(row) {
                    *t += p.to_f64();
                }
            }
            for (k, p) in plan.chunks_exact(n).enumerate() {
                match upstream.row(k, n) {
                    Row::Values(g) => {
                        for ((u, &p), &g) in column.iter_mut().zip(p).zip(g) {
                            *u += (p * g).to_f64();
                        }
                    }
                    Row::Shifted(g, constant) => {
                        for ((u, &p), &g) in column.iter_mut().zip(p).zip(g) {
                            *u += (p * (g + constant)).to_f64();
                        }
                    }
                    Row::Zero => {}
                }
            }
            // h_0j = ρ_j g_0j: none when the upstream is of the marginals.
            let residual_grad = match upstream.row(0, n) {
                Row::Values(g) => Some(g),
                _ => None,
            };
            // λ's denominator Σ_j ρ_j t_j / a_j is the slope Σ a σ(1 − σ) of the mass in β
            // (1 − μ − Σ ρ²/a at the exact root), read from the plan: neither the solver's
            // tolerance nor cancellation enters.
            let (mut numerator, mut slope) = (0.0, 0.0);
            let mut inverse_mass = vec![0.0f64; n];
            for j in 0..n {
                let a = mass[j].to_f64();
                if a > 0.0 {
                    inverse_mass[j] = 1.0 / a;
                }
                let rho = plan[j].to_f64();
                let h0 = residual_grad.map_or(0.0, |g| (plan[j] * g[j]).to_f64());
                numerator += rho * column[j] * inverse_mass[j] - h0;
                slope += rho * sent[j] * inverse_mass[j];
            }
            let lambda = numerator / slope.max(MIN_DENOMINATOR);
            let v: Vec<T> = (0..n)
                .map(|j| T::from_f64((column[j] + lambda * plan[j].to_f64()) * inverse_mass[j]))
                .collect();
            let scale = T::from_f64(-1.0 / epsilon);
            for (k, (dc, p)) in dc
                .chunks_exact_mut(n)
                .zip(plan[n..].chunks_exact(n))
                .enumerate()
            {
                match upstream.row(k + 1, n) {
                    Row::Values(g) => {
                        for (((d, &p), &g), &v) in dc.iter_mut().zip(p).zip(g).zip(&v) {
                            *d = scale * (p * g - v * p);
                        }
                    }
                    Row::Shifted(g, constant) => {
                        for (((d, &p), &g), &v) in dc.iter_mut().zip(p).zip(g).zip(&v) {
                            *d = scale * p * (g + constant - v);
                        }
                    }
                    Row::Zero => unreachable!("only row 0 has no gradient"),
                }
            }
        });
    dc
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::backends::flex::simd::check::{agree, values};

    /// The copy chosen at run time and the baseline build solve to the same plan.
    #[test]
    fn wide_copy_matches_baseline() {
        let (k, n) = (5, 11);
        let costs = values(k * n, 6, 0.0, 2.0);
        let mass = vec![1.0 / n as f64; n];
        let settings = TransportSettings {
            transport_ratio: 0.3,
            epsilon: 0.2,
            max_iterations: 100,
            tolerance: 1e-6,
            solver: TransportSolver::Newton,
        };
        let (mut wide, mut base) = (vec![0.0; (k + 1) * n], vec![0.0; (k + 1) * n]);
        let steps_wide = solve_sample_wide(&costs, &mass, &mut wide, &settings);
        let steps_base = solve_sample(&costs, &mass, &mut base, &settings);
        assert_eq!(steps_wide, steps_base);
        agree("plan", &wide, &base);
    }
}
