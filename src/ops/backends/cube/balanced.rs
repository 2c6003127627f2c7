//! The balanced transport solve (docs/maths.md §7) as a CubeCL kernel, one cube per sample, as
//! Flex's `balanced.rs` solves one sample per thread: `maths::balanced`'s log-domain Sinkhorn
//! with its masks, anchoring, bounds, stopping rule (tolerance, cap, potentials unchanged,
//! [`STALL_PATIENCE`] iterations without a new smallest error, NaN) and final check, each
//! sample stopping on its own with no host read.
//!
//! κ = −C/ε (anchored per row, bounded) is written once over the plan's storage and turned into
//! the plan in place at the end. The row update runs one unit per row (a serial logsumexp over
//! the columns), the column update one unit per column (over the rows); each logsumexp is a
//! single pass (the running maximum rescales the running sum). The potentials u `[K']`, the
//! next u and v `[N]` live in a `[B, 2K' + N]` scratch tensor, and `sync_storage` publishes
//! each update to the cube. The marginal error and the "moved" flag are block reductions, so
//! every unit takes the same branches.
//!
//! Zero masses are tested, never turned into −∞ (WGSL has no infinite literal): their rows and
//! columns are skipped by every logsumexp, their costs are never read, and their plan entries
//! are written as exact zeros. Each sample's iteration count goes to `[B]`, as −(count + 1)
//! when the sample did not converge (as GSP's kernel encodes it).

use burn::tensor::Shape;
use burn_cubecl::cubecl;
use burn_cubecl::cubecl::prelude::*;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;

use super::cube_block::{MAX, SUM, block, block_reduce};
use super::tensors::{Launch, empty_like};
use crate::maths::balanced::{BalancedSettings, POTENTIAL_BOUND, STALL_PATIENCE, stall_floor};
use crate::maths::precision::unit_roundoff;

/// (the plan `[B, K', N]`, each sample's iteration count `[B]` in the plan's dtype, negative
/// when the sample did not converge) for costs `[B, K', N]` and masses `[B, K']`, `[B, N]`.
pub(super) fn launch_balanced_transport(
    costs: CubeTensor,
    row_mass: CubeTensor,
    column_mass: CubeTensor,
    settings: BalancedSettings,
) -> (CubeTensor, CubeTensor) {
    let [costs, row_mass, column_mass] = [costs, row_mass, column_mass].map(into_contiguous);
    let dims = costs.meta.shape().clone();
    let (batch, rows, columns) = (dims[0], dims[1], dims[2]);
    let plan = empty_like(&costs, Shape::new([batch, rows, columns]));
    let iterations = empty_like(&costs, Shape::new([batch]));
    let potentials = empty_like(&costs, Shape::new([batch, 2 * rows + columns]));
    if batch == 0 {
        return (plan, iterations);
    }
    let block = block(rows.max(columns));
    let launch = Launch::per_sample(&costs, batch, block);
    let costs_dtype = costs.dtype;
    let slack = (rows + columns) as f64 * unit_roundoff(costs_dtype);
    balanced_transport_kernel::launch(
        &launch.client,
        launch.count,
        launch.dim,
        costs.into_tensor_arg(),
        row_mass.into_tensor_arg(),
        column_mass.into_tensor_arg(),
        plan.clone().into_tensor_arg(),
        potentials.into_tensor_arg(),
        iterations.clone().into_tensor_arg(),
        InputScalar::new(-settings.epsilon, launch.dtype),
        InputScalar::new(settings.tolerance, launch.dtype),
        InputScalar::new(2.0 * settings.tolerance.max(slack), launch.dtype),
        InputScalar::new(POTENTIAL_BOUND, launch.dtype),
        InputScalar::new(
            stall_floor(rows, columns, unit_roundoff(costs_dtype)),
            launch.dtype,
        ),
        // The cap fits: `MAX_SOLVER_ITERATIONS` < u32::MAX.
        settings.iteration_cap() as u32,
        STALL_PATIENCE as u32,
        block,
        launch.dtype,
    );
    (plan, iterations)
}

/// `x` within ±`bound`; a NaN stays NaN (selects, not `clamp`).
#[cube]
fn bounded<F: Float>(x: F, bound: F) -> F {
    let mut y = x;
    if x > bound {
        y = bound;
    }
    if x < -bound {
        y = -bound;
    }
    y
}

/// One step of a single-pass logsumexp: (running maximum, sum of exp(term − maximum)) after
/// `x`. Starts from (lowest finite value, 0); a NaN term makes the sum NaN.
#[cube]
fn accumulate<F: Float>(largest: F, sum: F, x: F) -> (F, F) {
    let mut m = largest;
    let mut s = sum;
    if x > m {
        s = s * (m - x).exp() + F::new(1.0);
        m = x;
    } else {
        s += (x - m).exp();
    }
    (m, s)
}

/// One sample's solve (cube `b`): see the module's comment.
#[cube(launch)]
fn balanced_transport_kernel<F: Float>(
    costs: &Tensor<F>,
    row_mass: &Tensor<F>,
    column_mass: &Tensor<F>,
    plan: &mut Tensor<F>,
    potentials: &mut Tensor<F>,
    iterations: &mut Tensor<F>,
    neg_epsilon: InputScalar,
    tolerance: InputScalar,
    plan_tolerance: InputScalar,
    bound: InputScalar,
    stall_floor: InputScalar,
    max_iterations: u32,
    patience: u32,
    #[comptime] block: usize,
    #[define(F)] _dtype: ElemType,
) {
    let b = CUBE_POS_X as usize;
    let unit = UNIT_POS_X as usize;
    let k = costs.shape(1);
    let n = costs.shape(2);
    let neg_epsilon = neg_epsilon.get::<F>();
    let tolerance = tolerance.get::<F>();
    let plan_tolerance = plan_tolerance.get::<F>();
    let stall_floor = stall_floor.get::<F>();
    let bound = bound.get::<F>();
    let zero = F::new(0.0);
    let one = F::new(1.0);
    let lowest = F::min_value();
    let sample = b * k * n;
    let rows_at = b * k;
    let columns_at = b * n;
    // The scratch: u at [0, K'), the next u at [K', 2K'), v at [2K', 2K' + N).
    let scratch = b * (2 * k + n);
    let next_at = scratch + k;
    let v_at = scratch + 2 * k;

    // κ row by row: −c/ε at the non-empty columns, less its largest (at least −bound), within
    // ±bound; 0 elsewhere (those costs are never read). u = 0 on the non-empty rows.
    let mut total = zero;
    let mut i = unit;
    while i < k {
        let a = row_mass[rows_at + i];
        let row = sample + i * n;
        if a > zero {
            total += a;
            let mut anchor = lowest;
            for j in 0..n {
                if column_mass[columns_at + j] > zero {
                    anchor = anchor.max(costs[row + j] / neg_epsilon);
                }
            }
            anchor = anchor.max(-bound);
            for j in 0..n {
                let mut kappa = zero;
                if column_mass[columns_at + j] > zero {
                    kappa = bounded::<F>(costs[row + j] / neg_epsilon - anchor, bound);
                }
                plan[row + j] = kappa;
            }
        } else {
            for j in 0..n {
                plan[row + j] = zero;
            }
        }
        potentials[scratch + i] = zero;
        i += block;
    }
    let total = block_reduce::<F>(total, SUM, block);
    sync_storage();
    column_update::<F>(row_mass, column_mass, plan, potentials, b, bound, block);
    sync_storage();

    let mut best = F::max_value();
    let mut idle = 0u32;
    let mut converged = false;
    let mut iteration = 0u32;
    loop {
        // The row update into the scratch's next u, and the row error |P𝟙 − a| from
        // P𝟙 = exp(u + logsumexp_j(v_j + κ_ij)) (the columns are exact).
        let mut error = zero;
        let mut moved = zero;
        let mut i = unit;
        while i < k {
            let a = row_mass[rows_at + i];
            if a > zero {
                let row = sample + i * n;
                let mut largest = lowest;
                let mut sum = zero;
                for j in 0..n {
                    if column_mass[columns_at + j] > zero {
                        let (m, s) =
                            accumulate::<F>(largest, sum, potentials[v_at + j] + plan[row + j]);
                        largest = m;
                        sum = s;
                    }
                }
                let lse = sum.ln() + largest;
                let u = potentials[scratch + i];
                error += ((u + lse).exp() - a).abs();
                let next = bounded::<F>(a.ln() - lse, bound);
                potentials[next_at + i] = next;
                if next != u {
                    moved = one;
                }
            } else {
                error += a.abs();
            }
            i += block;
        }
        let error = block_reduce::<F>(error, SUM, block) / total;
        let moved = block_reduce::<F>(moved, MAX, block) > zero;
        // The stopping rule of `maths::solver::Stopping` on this sample's status.
        // A sum of magnitudes: only NaN fails `≥ 0`.
        let mut nan = true;
        if error >= zero {
            nan = false;
        }
        let mut open = error;
        if nan {
            open = zero;
        }
        // A stall only near the rounding floor (`maths::balanced::stall_floor`).
        let progress = error < best || error > stall_floor;
        if !nan {
            best = best.min(error);
        }
        if open <= tolerance {
            converged = !nan;
            break;
        }
        if iteration >= max_iterations || (iteration > 0 && !moved) {
            break;
        }
        if progress {
            idle = 0;
        } else {
            idle += 1;
        }
        if idle >= patience {
            break;
        }
        let mut i = unit;
        while i < k {
            potentials[scratch + i] = potentials[next_at + i];
            i += block;
        }
        sync_storage();
        column_update::<F>(row_mass, column_mass, plan, potentials, b, bound, block);
        sync_storage();
        iteration += 1;
    }

    // P = exp(min(u_i + v_j + κ_ij, ln b_j)), exactly 0 on the zero masses; one unit per column.
    let mut j = unit;
    while j < n {
        let c = column_mass[columns_at + j];
        let v = potentials[v_at + j];
        let cap = c.ln();
        for i in 0..k {
            let at = sample + i * n + j;
            let mut p = zero;
            if c > zero && row_mass[rows_at + i] > zero {
                p = (potentials[scratch + i] + v + plan[at]).min(cap).exp();
            }
            plan[at] = p;
        }
        j += block;
    }
    // The portable solve's final check: the plan itself meets the tolerance (up to the rounding
    // of its row sums).
    if converged {
        sync_storage();
        let mut error = zero;
        let mut i = unit;
        while i < k {
            let row = sample + i * n;
            let mut sum = zero;
            for j in 0..n {
                sum += plan[row + j];
            }
            error += (sum - row_mass[rows_at + i]).abs();
            i += block;
        }
        let error = block_reduce::<F>(error, SUM, block) / total;
        converged = error <= plan_tolerance;
    }
    if unit == 0 {
        let mut count = F::cast_from(iteration);
        if !converged {
            count = -count - one;
        }
        iterations[b] = count;
    }
}

/// v_j ← ln b_j − logsumexp_i(u_i + κ_ij) over the non-empty rows, one unit per non-empty
/// column, into the scratch (`plan`, holding κ, is only read: the kernel's output, passed as it
/// has it).
#[cube]
fn column_update<F: Float>(
    row_mass: &Tensor<F>,
    column_mass: &Tensor<F>,
    plan: &mut Tensor<F>,
    potentials: &mut Tensor<F>,
    b: usize,
    bound: F,
    #[comptime] block: usize,
) {
    let k = row_mass.shape(1);
    let n = column_mass.shape(1);
    let sample = b * k * n;
    let scratch = b * (2 * k + n);
    let v_at = scratch + 2 * k;
    let mut j = UNIT_POS_X as usize;
    while j < n {
        let c = column_mass[b * n + j];
        if c > F::new(0.0) {
            let mut largest = F::min_value();
            let mut sum = F::new(0.0);
            for i in 0..k {
                if row_mass[b * k + i] > F::new(0.0) {
                    let (m, s) = accumulate::<F>(
                        largest,
                        sum,
                        potentials[scratch + i] + plan[sample + i * n + j],
                    );
                    largest = m;
                    sum = s;
                }
            }
            potentials[v_at + j] = bounded::<F>(c.ln() - (sum.ln() + largest), bound);
        }
        j += block;
    }
}
