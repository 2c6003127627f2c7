//! GSP's partial transport and its implicit backward as CubeCL kernels, one cube per sample
//! over its N positions, as Flex's `transport.rs` does per sample on the CPU:
//!
//! - the solve: one exp pass over the sample's costs `[K, N]` gives ℓ_j = logsumexp_k(−c_kj/ε),
//!   anchored at the sample's nearest valid cost (as the portable solver anchors it; kept in
//!   the plan's row 0 until the end), the bracket of the dual β is four block reductions, and
//!   the safeguarded Newton on β (the portable solver's: on ln F − ln μ from below when μ ≤ ½,
//!   on the residual mass from above otherwise, bisection when a step leaves the bracket) runs
//!   in the cube with the portable solver's stopping rule (tolerance, cap, β unchanged, the
//!   bracket not shrinking for `STALL_PATIENCE` steps), each sample stopping on its own: no
//!   host read. The last pass writes ρ and the plan; each sample's iteration count goes to
//!   `[B]`, as −(count + 1) when the sample did not converge.
//! - the backward: the closed form of `maths::implicit_backward`, two passes over the plan,
//!   h = X ⊙ g, U_j = Σ_k h_kj, t_j = Σ_k P_kj, λ = (Σ ρU/a − Σ h_0) / Σ ρt/a,
//!   V = (U + λρ)/a, ∂L/∂c_kj = −(h_kj − V_j P_kj)/ε, with the upstream gradient of the plan
//!   `[B, K+1, N]` or of its marginals `[B, N + K]` (each position's sent mass, each
//!   prototype's received mass; never expanded).
//!
//! Every reduction is over the cube's units through shared memory, so every unit reads the same
//! sums and takes the same branches (the loop and its `sync_cube`s stay uniform).

use burn::tensor::Shape;
use burn_cubecl::cubecl;
use burn_cubecl::cubecl::prelude::*;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;

use super::cube_block::{MAX, MIN, SUM, block, block_reduce};
use super::strided::Strided;
use super::tensors::{Launch, empty_like};
use crate::maths::implicit_backward::MIN_DENOMINATOR;
use crate::maths::settings::{STALL_PATIENCE, TransportSettings};

/// (the plan `[B, K+1, N]`, each sample's iteration count `[B]` in the plan's dtype, negative
/// when the sample did not converge) for costs `[B, K, N]`, masses
/// `[B, N]` and Newton's settings (μ < 1).
pub(super) fn launch_partial_transport(
    costs: CubeTensor,
    mass: CubeTensor,
    settings: TransportSettings,
) -> (CubeTensor, CubeTensor) {
    let [costs, mass] = [costs, mass].map(into_contiguous);
    let dims = costs.meta.shape().clone();
    let (batch, count, positions) = (dims[0], dims[1], dims[2]);
    let plan = empty_like(&costs, Shape::new([batch, count + 1, positions]));
    let iterations = empty_like(&costs, Shape::new([batch]));
    let block = block(positions);
    let launch = Launch::per_sample(&costs, batch, block);
    let mu = settings.transport_ratio;
    partial_transport_kernel::launch(
        &launch.client,
        launch.count,
        launch.dim,
        costs.into_tensor_arg(),
        mass.into_tensor_arg(),
        plan.clone().into_tensor_arg(),
        iterations.clone().into_tensor_arg(),
        InputScalar::new(1.0 / settings.epsilon, launch.dtype),
        InputScalar::new(mu, launch.dtype),
        InputScalar::new(settings.tolerance, launch.dtype),
        // The cap fits: `MAX_SOLVER_ITERATIONS` < u32::MAX.
        settings.iteration_cap() as u32,
        STALL_PATIENCE as u32,
        block,
        mu <= 0.5,
        launch.dtype,
    );
    (plan, iterations)
}

/// ∂L/∂costs `[B, K, N]` from the plan `[B, K+1, N]`, the upstream gradient (of the plan, or of
/// its marginals `[B, N + K]` when `marginals`) and the masses `[B, N]`.
pub(super) fn launch_partial_transport_backward(
    plan: CubeTensor,
    grad: CubeTensor,
    mass: CubeTensor,
    epsilon: f64,
    marginals: bool,
) -> CubeTensor {
    let [plan, grad, mass] = [plan, grad, mass].map(into_contiguous);
    let dims = plan.meta.shape().clone();
    let (batch, rows, positions) = (dims[0], dims[1], dims[2]);
    let costs_gradient = empty_like(&plan, Shape::new([batch, rows - 1, positions]));
    let block = block(positions);
    let launch = Launch::per_sample(&plan, batch, block);
    partial_transport_backward_kernel::launch(
        &launch.client,
        launch.count,
        launch.dim,
        plan.into_tensor_arg(),
        grad.into_tensor_arg(),
        mass.into_tensor_arg(),
        costs_gradient.clone().into_tensor_arg(),
        InputScalar::new(-1.0 / epsilon, launch.dtype),
        InputScalar::new(MIN_DENOMINATOR, launch.dtype),
        block,
        marginals,
        launch.dtype,
    );
    costs_gradient
}

/// Over the valid positions (a_j > 0), the cube's largest ln a_j + ℓ_j and ln a_j − ℓ_j (ℓ in
/// the plan's row 0), or when `exponentiate`, Σ_j exp(ln a_j ± ℓ_j − shift): the two logsumexps of
/// the bracket, in two calls. (`plan` is only read: the kernel's output, passed as it has it.)
#[cube]
fn bracket_pass<F: Float>(
    mass: &Tensor<F>,
    plan: &mut Tensor<F>,
    b: usize,
    above_shift: F,
    below_shift: F,
    #[comptime] exponentiate: bool,
    #[comptime] block: usize,
) -> (F, F) {
    let n = mass.shape(1);
    let mass_line = Strided::row::<F>(mass, b);
    let plan_line = Strided::new(b * plan.stride(0), plan.stride(2));
    let zero = F::new(0.0);
    let mut above = F::min_value();
    let mut below = F::min_value();
    if comptime![exponentiate] {
        above = zero;
        below = zero;
    }
    let mut j = UNIT_POS_X as usize;
    while j < n {
        let a = mass[mass_line.at(j)];
        if a > zero {
            let log_mass = plan[plan_line.at(j)];
            let (up, down) = (a.ln() + log_mass, a.ln() - log_mass);
            if comptime![exponentiate] {
                above += (up - above_shift).exp();
                below += (down - below_shift).exp();
            } else {
                above = above.max(up);
                below = below.max(down);
            }
        }
        j += block;
    }
    let reduce = comptime![if exponentiate { SUM } else { MAX }];
    (
        block_reduce::<F>(above, reduce, block),
        block_reduce::<F>(below, reduce, block),
    )
}

/// σ(x), exact in both tails.
#[cube]
fn sigmoid<F: Float>(x: F) -> F {
    let one = F::new(1.0);
    if x >= F::new(0.0) {
        one / (one + (-x).exp())
    } else {
        let e = x.exp();
        e / (one + e)
    }
}

/// The smallest cost of position `j` over the prototypes and Σ_k exp((min − c_kj)/ε).
#[cube]
fn shifted_total<F: Float>(costs: &Tensor<F>, at: usize, count: usize, inv_epsilon: F) -> (F, F) {
    let step = costs.stride(1);
    let mut smallest = costs[at];
    for k in 1..count {
        smallest = smallest.min(costs[at + k * step]);
    }
    let mut total = F::new(0.0);
    for k in 0..count {
        total += ((smallest - costs[at + k * step]) * inv_epsilon).exp();
    }
    (smallest, total)
}

/// One sample's solve (cube `b`): see the module's comment.
#[cube(launch)]
fn partial_transport_kernel<F: Float>(
    costs: &Tensor<F>,
    mass: &Tensor<F>,
    plan: &mut Tensor<F>,
    iterations: &mut Tensor<F>,
    inv_epsilon: InputScalar,
    mu: InputScalar,
    tolerance: InputScalar,
    max_iterations: u32,
    patience: u32,
    #[comptime] block: usize,
    #[comptime] from_below: bool,
    #[define(F)] _dtype: ElemType,
) {
    let b = CUBE_POS_X as usize;
    let unit = UNIT_POS_X as usize;
    let count = costs.shape(1);
    let n = costs.shape(2);
    let inv_epsilon = inv_epsilon.get::<F>();
    let mu = mu.get::<F>();
    let tolerance = tolerance.get::<F>();
    let (zero, one) = (F::new(0.0), F::new(1.0));
    let (lowest, highest) = (F::min_value(), F::max_value());
    // Row 0 of the costs and of the plan along the positions, and the masses.
    let costs_line = Strided::through::<F>(costs, b, 0, 1usize, 2usize);
    let plan_line = Strided::new(b * plan.stride(0), plan.stride(2));
    let mass_line = Strided::row::<F>(mass, b);

    // The smallest cost of each position into the plan's row 0 and ln Σ_k exp((min − c)/ε)
    // into row 1 (K ≥ 1); the smallest over the valid positions is the anchor.
    let plan_step_k = plan.stride(1);
    let mut nearest = highest;
    let mut j = unit;
    while j < n {
        let (shift, total) = shifted_total::<F>(costs, costs_line.at(j), count, inv_epsilon);
        let at = plan_line.at(j);
        plan[at] = shift;
        plan[at + plan_step_k] = total.ln();
        if mass[mass_line.at(j)] > zero {
            nearest = nearest.min(shift);
        }
        j += block;
    }
    let nearest = block_reduce::<F>(nearest, MIN, block);

    // ℓ_j, anchored (β absorbs the shift; with costs of 1e30 the plain ℓ would leave no digit
    // for β + ℓ), into row 0; the extremes of ℓ over the valid positions.
    let mut largest = lowest;
    let mut smallest = highest;
    let mut j = unit;
    while j < n {
        let at = plan_line.at(j);
        let log_mass = plan[at + plan_step_k] - (plan[at] - nearest) * inv_epsilon;
        plan[at] = log_mass;
        if mass[mass_line.at(j)] > zero {
            largest = largest.max(log_mass);
            smallest = smallest.min(log_mass);
        }
        j += block;
    }
    let largest = block_reduce::<F>(largest, MAX, block);
    let smallest = block_reduce::<F>(smallest, MIN, block);

    // The bracket [logit μ − max ℓ, logit μ − min ℓ], tightened by
    // β ≥ ln μ − lse(ln a + ℓ) and β ≤ lse(ln a − ℓ) − ln(1 − μ).
    let (above_shift, below_shift) = bracket_pass::<F>(mass, plan, b, zero, zero, false, block);
    let (above, below) = bracket_pass::<F>(mass, plan, b, above_shift, below_shift, true, block);
    let above = above.ln() + above_shift;
    let below = below.ln() + below_shift;
    let logit_mu = (mu / (one - mu)).ln();
    let mut lower = (logit_mu - largest).max(mu.ln() - above);
    let mut upper = (logit_mu - smallest).min(below - (one - mu).ln());

    // Newton on β with the portable solver's stopping rule: the tolerance (converged), the
    // cap, β unchanged, or the bracket not shrinking for `patience` steps (the rounding
    // floor).
    let mut beta = upper;
    if comptime![from_below] {
        beta = lower;
    }
    let mut previous = beta;
    let mut idle = 0u32;
    let mut converged = false;
    let mut iteration = 0u32;
    loop {
        let mut sent = zero;
        let mut kept = zero;
        let mut slope = zero;
        let mut j = unit;
        while j < n {
            let a = mass[mass_line.at(j)];
            if a > zero {
                let logit = beta + plan[plan_line.at(j)];
                let s = sigmoid::<F>(logit);
                sent += a * s;
                kept += a * sigmoid::<F>(-logit);
                slope += a * s * (one - s);
            }
            j += block;
        }
        let sent = block_reduce::<F>(sent, SUM, block);
        let kept = block_reduce::<F>(kept, SUM, block);
        let slope = block_reduce::<F>(slope, SUM, block);
        let residual = sent - mu;
        if residual.abs() <= tolerance {
            converged = true;
            break;
        }
        if iteration >= max_iterations || (iteration > 0 && beta == previous) {
            break;
        }
        // A bound moves strictly inward unless β sits on it (the rounding floor; a NaN leaves
        // every comparison false).
        let mut shrank = beta > lower;
        if residual > zero {
            shrank = beta < upper;
            upper = beta;
        } else {
            lower = beta;
        }
        if shrank {
            idle = 0;
        } else {
            idle += 1;
        }
        if idle >= patience {
            break;
        }
        let mut step = beta + (kept / (one - mu)).ln() * kept / slope;
        if comptime![from_below] {
            step = beta - (sent / mu).ln() * sent / slope;
        }
        let mut next = (lower + upper) / F::new(2.0);
        if step >= lower && step <= upper {
            next = step;
        }
        previous = beta;
        beta = next;
        iteration += 1;
    }
    if unit == 0 {
        let at = b * iterations.stride(0);
        let mut count = F::cast_from(iteration);
        if !converged {
            count = -count - one;
        }
        iterations[at] = count;
    }

    // ρ_j = a_j σ(−β − ℓ_j) over ℓ_j in row 0; P_kj = a_j σ(β + ℓ_j) softmax_k.
    let costs_step_k = costs.stride(1);
    let mut j = unit;
    while j < n {
        let a = mass[mass_line.at(j)];
        let at = plan_line.at(j);
        let logit = beta + plan[at];
        let costs_at = costs_line.at(j);
        let (shift, total) = shifted_total::<F>(costs, costs_at, count, inv_epsilon);
        let factor = a * sigmoid::<F>(logit) / total;
        for k in 0..count {
            let weight = ((shift - costs[costs_at + k * costs_step_k]) * inv_epsilon).exp();
            plan[at + (k + 1) * plan_step_k] = weight * factor;
        }
        plan[at] = a * sigmoid::<F>(-logit);
        j += block;
    }
}

/// The upstream gradient of plan entry (k, j) of sample `b`: the plan's own, or its marginals'
/// (none for ρ in row 0; position j's sent mass's plus prototype k's received mass's for
/// P_kj).
#[cube]
fn upstream<F: Float>(
    grad: &Tensor<F>,
    b: usize,
    k: usize,
    j: usize,
    n: usize,
    #[comptime] marginals: bool,
) -> F {
    if comptime![marginals] {
        let row = b * grad.stride(0);
        if k == 0 {
            F::new(0.0)
        } else {
            grad[row + j * grad.stride(1)] + grad[row + (n + k - 1) * grad.stride(1)]
        }
    } else {
        grad[b * grad.stride(0) + k * grad.stride(1) + j * grad.stride(2)]
    }
}

/// U_j = Σ_k P_kj g_kj over the K+1 rows, and t_j = Σ_{k≥1} P_kj.
#[cube]
fn column_sums<F: Float>(
    plan: &Tensor<F>,
    grad: &Tensor<F>,
    b: usize,
    j: usize,
    #[comptime] marginals: bool,
) -> (F, F) {
    let rows = plan.shape(1);
    let n = plan.shape(2);
    let at = b * plan.stride(0) + j * plan.stride(2);
    let mut column = F::new(0.0);
    let mut sent = F::new(0.0);
    for k in 0..rows {
        let p = plan[at + k * plan.stride(1)];
        column += p * upstream::<F>(grad, b, k, j, n, marginals);
        if k > 0 {
            sent += p;
        }
    }
    (column, sent)
}

/// One sample's implicit backward (cube `b`): see the module's comment.
#[cube(launch)]
fn partial_transport_backward_kernel<F: Float>(
    plan: &Tensor<F>,
    grad: &Tensor<F>,
    mass: &Tensor<F>,
    costs_gradient: &mut Tensor<F>,
    scale: InputScalar,
    min_denominator: InputScalar,
    #[comptime] block: usize,
    #[comptime] marginals: bool,
    #[define(F)] _dtype: ElemType,
) {
    let b = CUBE_POS_X as usize;
    let unit = UNIT_POS_X as usize;
    let rows = plan.shape(1);
    let n = plan.shape(2);
    let scale = scale.get::<F>();
    let zero = F::new(0.0);
    let plan_line = Strided::through::<F>(plan, b, 0, 1usize, 2usize);
    let mass_line = Strided::row::<F>(mass, b);

    let mut numerator = zero;
    let mut slope = zero;
    let mut j = unit;
    while j < n {
        let a = mass[mass_line.at(j)];
        let (column, sent) = column_sums::<F>(plan, grad, b, j, marginals);
        let rho = plan[plan_line.at(j)];
        let mut inverse_mass = zero;
        if a > zero {
            inverse_mass = F::new(1.0) / a;
        }
        numerator += rho * column * inverse_mass - rho * upstream::<F>(grad, b, 0, j, n, marginals);
        slope += rho * sent * inverse_mass;
        j += block;
    }
    let numerator = block_reduce::<F>(numerator, SUM, block);
    let slope = block_reduce::<F>(slope, SUM, block);
    let lambda = numerator / slope.max(min_denominator.get::<F>());

    let out_row = b * costs_gradient.stride(0);
    let out_step_k = costs_gradient.stride(1);
    let out_step = costs_gradient.stride(2);
    let mut j = unit;
    while j < n {
        let a = mass[mass_line.at(j)];
        let (column, _) = column_sums::<F>(plan, grad, b, j, marginals);
        let rho = plan[plan_line.at(j)];
        let mut v = zero;
        if a > zero {
            v = (column + lambda * rho) / a;
        }
        for k in 1..rows {
            let p = plan[plan_line.at(j) + k * plan.stride(1)];
            let g = upstream::<F>(grad, b, k, j, n, marginals);
            costs_gradient[out_row + (k - 1) * out_step_k + j * out_step] = scale * p * (g - v);
        }
        j += block;
    }
}
