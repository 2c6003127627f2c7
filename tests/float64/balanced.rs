//! The balanced entropic transport in f64 against the independent plain Sinkhorn of
//! `tests/reference` (kernel domain, run to a 1e-15 row error): the plan, its implicit gradient
//! against central differences of the oracle at an ill-conditioned ε, and the properties of
//! docs/maths.md §7 (uniform costs, masks, the dustbin, the marginals, the budget).

use crate::{common, reference};
use burn::tensor::{Device, Tensor};
use burn_pooling::transport::{BalancedSettings, Dustbin, balanced_transport};
use common::{Rng, assert_close, flex_f64, tensor, values};

fn settings(epsilon: f64) -> BalancedSettings {
    BalancedSettings::new(epsilon)
        .with_tolerance(1e-13)
        .with_max_iterations(100_000)
}

fn solve(
    costs: &[Vec<f64>],
    rows: &[f64],
    columns: &[f64],
    epsilon: f64,
    device: &Device,
) -> (Vec<f64>, bool) {
    let (k, n) = (rows.len(), columns.len());
    let solved = balanced_transport(
        tensor(costs.concat(), [1, k, n], device),
        tensor(rows.to_vec(), [1, k], device),
        tensor(columns.to_vec(), [1, n], device),
        None,
        &settings(epsilon),
    );
    (values(solved.plan), solved.converged.into_scalar::<bool>())
}

/// Masses summing to `total`, each in [0.5, 1.5] times the mean.
fn masses(rng: &mut Rng, count: usize, total: f64) -> Vec<f64> {
    let raw: Vec<f64> = (0..count).map(|_| rng.uniform(0.5, 1.5)).collect();
    let sum: f64 = raw.iter().sum();
    raw.iter().map(|v| v * total / sum).collect()
}

/// The plan of the library (batched, one sample with masked columns holding NaN costs)
/// against the oracle, for K < N and K > N, at ε from 1 down to 0.05.
#[test]
fn the_plan_matches_the_oracle() {
    let device = flex_f64();
    let mut rng = Rng::new(22);
    for (k, n) in [(3, 7), (6, 4)] {
        for epsilon in [1.0, 0.1, 0.05] {
            let costs: Vec<Vec<Vec<f64>>> = (0..2).map(|_| rng.matrix(k, n, 0.0, 1.0)).collect();
            let rows: Vec<Vec<f64>> = (0..2).map(|_| masses(&mut rng, k, 1.0)).collect();
            let mut columns: Vec<Vec<f64>> = (0..2).map(|_| masses(&mut rng, n, 1.0)).collect();
            // Sample 1: column 1 masked (mass 0, NaN costs), the rest rescaled.
            let mut masked_costs = costs.clone();
            columns[1][1] = 0.0;
            let sum: f64 = columns[1].iter().sum();
            columns[1].iter_mut().for_each(|v| *v /= sum);
            for row in masked_costs[1].iter_mut() {
                row[1] = f64::NAN;
            }
            let flat = |m: &[Vec<Vec<f64>>]| m.iter().flat_map(|s| s.concat()).collect();
            let solved = balanced_transport(
                tensor(flat(&masked_costs), [2, k, n], &device),
                tensor(rows.concat(), [2, k], &device),
                tensor(columns.concat(), [2, n], &device),
                None,
                &settings(epsilon),
            );
            assert!(
                solved.converged.into_scalar::<bool>(),
                "K {k} N {n} ε {epsilon}"
            );
            let plan = values(solved.plan);
            for s in 0..2 {
                let expected = reference::balanced_plan(&costs[s], &rows[s], &columns[s], epsilon);
                assert_close(
                    &plan[s * k * n..(s + 1) * k * n],
                    &expected.concat(),
                    1e-9,
                    1e-13,
                    &format!("K {k} N {n} ε {epsilon} sample {s}"),
                );
            }
        }
    }
}

/// ∂L/∂C, and ∂L/∂a_i + ∂L/∂b_j (a balanced change of the masses), for L = Σ G ⊙ P, against
/// central differences of the oracle at ε = 0.05 with costs in [0, 1] (the Schur system's
/// condition number is then large), for K < N and K > N.
#[test]
fn the_implicit_gradient_matches_finite_differences() {
    let device = flex_f64().autodiff();
    let mut rng = Rng::new(7);
    let epsilon = 0.05;
    for (k, n) in [(3, 6), (5, 3)] {
        let costs = rng.matrix(k, n, 0.0, 1.0);
        let upstream = rng.matrix(k, n, -1.0, 1.0);
        let rows = masses(&mut rng, k, 1.0);
        let columns = masses(&mut rng, n, 1.0);
        let c = tensor(costs.concat(), [1, k, n], &device).require_grad();
        let a = tensor(rows.clone(), [1, k], &device).require_grad();
        let b = tensor(columns.clone(), [1, n], &device).require_grad();
        let solved = balanced_transport(c.clone(), a.clone(), b.clone(), None, &settings(epsilon));
        let loss = (solved.plan * tensor(upstream.concat(), [1, k, n], &device)).sum();
        let grads = loss.backward();
        let grad_c = values(c.grad(&grads).unwrap());
        let grad_a = values(a.grad(&grads).unwrap());
        let grad_b = values(b.grad(&grads).unwrap());

        let loss_of = |c: &[Vec<f64>], a: &[f64], b: &[f64]| -> f64 {
            let plan = reference::balanced_plan(c, a, b, epsilon);
            (0..k)
                .flat_map(|i| (0..n).map(move |j| (i, j)))
                .map(|(i, j)| plan[i][j] * upstream[i][j])
                .sum()
        };
        let fd_c = reference::central_difference(
            &|v: &[f64]| {
                let c: Vec<Vec<f64>> = v.chunks(n).map(|r| r.to_vec()).collect();
                loss_of(&c, &rows, &columns)
            },
            &costs.concat(),
            1e-6,
        );
        assert_close(&grad_c, &fd_c, 1e-5, 1e-7, &format!("∂L/∂C, K {k} N {n}"));
        let h = 1e-6;
        for i in 0..k {
            for j in 0..n {
                let shifted = |t: f64| {
                    let (mut a, mut b) = (rows.clone(), columns.clone());
                    a[i] += t;
                    b[j] += t;
                    loss_of(&costs, &a, &b)
                };
                let fd = (shifted(h) - shifted(-h)) / (2.0 * h);
                assert_close(
                    &[grad_a[i] + grad_b[j]],
                    &[fd],
                    1e-5,
                    1e-7,
                    &format!("∂L/∂a_{i} + ∂L/∂b_{j}, K {k} N {n}"),
                );
            }
        }
    }
}

/// Uniform costs give the independent plan a bᵀ / Σa, whatever ε, and a dustbin with the
/// same constant cost changes nothing of it.
#[test]
fn uniform_costs_give_the_product_plan() {
    let device = flex_f64();
    let mut rng = Rng::new(5);
    let (k, n) = (4, 9);
    let rows = masses(&mut rng, k, 2.0);
    let columns = masses(&mut rng, n, 2.0);
    for epsilon in [0.01, 1.0] {
        let costs = vec![vec![0.7; n]; k];
        let (plan, converged) = solve(&costs, &rows, &columns, epsilon, &device);
        assert!(converged);
        let expected: Vec<f64> = rows
            .iter()
            .flat_map(|a| columns.iter().map(move |b| a * b / 2.0))
            .collect();
        assert_close(&plan, &expected, 1e-12, 1e-14, &format!("ε {epsilon}"));
    }
}

/// A masked column (mass 0, any cost) gives the plan of the problem without that column,
/// with a zero column in its place.
#[test]
fn a_masked_column_equals_dropping_it() {
    let device = flex_f64();
    let mut rng = Rng::new(9);
    let (k, n) = (3, 6);
    let costs = rng.matrix(k, n, 0.0, 1.0);
    let rows = masses(&mut rng, k, 1.0);
    let kept = masses(&mut rng, n - 1, 1.0);
    let masked = 2;
    let mut columns = kept.clone();
    columns.insert(masked, 0.0);
    let mut noisy = costs.clone();
    for (i, row) in noisy.iter_mut().enumerate() {
        row[masked] = if i == 0 { f64::INFINITY } else { -1e300 };
    }
    let (plan, converged) = solve(&noisy, &rows, &columns, 0.1, &device);
    assert!(converged);
    let dropped: Vec<Vec<f64>> = costs
        .iter()
        .map(|row| {
            let mut row = row.clone();
            row.remove(masked);
            row
        })
        .collect();
    let (reduced, _) = solve(&dropped, &rows, &kept, 0.1, &device);
    for i in 0..k {
        assert_eq!(plan[i * n + masked], 0.0);
        let mut row = plan[i * n..(i + 1) * n].to_vec();
        row.remove(masked);
        assert_close(
            &row,
            &reduced[i * (n - 1)..(i + 1) * (n - 1)],
            1e-12,
            1e-15,
            &format!("row {i}"),
        );
    }
}

/// SALAD's setting: K clusters of 1/(N+K), a dustbin of (N−K)/(N+K), N columns of 1/(N+K).
/// The dustbin row takes exactly its mass, on the columns where it is cheapest; its row
/// constant score gets a zero gradient (the first row update cancels it), the costs do not.
#[test]
fn the_dustbin_takes_its_mass_where_it_is_cheapest() {
    let device = flex_f64().autodiff();
    let mut rng = Rng::new(11);
    let (k, n) = (2, 6);
    let total = (n + k) as f64;
    // The dustbin costs 0 on columns 0..4 (as much mass as it has) and 2 elsewhere; the
    // clusters cost 1 everywhere but one cheap cell each, on columns 4 and 5.
    let mut costs = vec![vec![1.0; n]; k];
    costs[0][4] = 0.0;
    costs[1][5] = 0.0;
    let dustbin_cost: Vec<f64> = (0..n).map(|j| if j < 4 { 0.0 } else { 2.0 }).collect();
    let score = tensor(vec![0.3], [1], &device).require_grad();
    let c = tensor(costs.concat(), [1, k, n], &device).require_grad();
    let dustbin = Dustbin {
        cost: tensor(dustbin_cost.clone(), [1, n], &device) - score.clone().reshape([1, 1]),
        mass: tensor(vec![(n - k) as f64 / total], [1], &device),
    };
    let solved = balanced_transport(
        c.clone(),
        Tensor::ones([1, k], &device).div_scalar(total),
        Tensor::ones([1, n], &device).div_scalar(total),
        Some(dustbin),
        &settings(0.3),
    );
    assert!(
        solved.converged.clone().into_scalar::<bool>(),
        "{} iterations",
        solved.iterations.clone().into_scalar::<i64>()
    );
    assert_eq!(solved.plan.dims(), [1, k + 1, n]);
    let upstream = tensor(
        rng.matrix(k + 1, n, -1.0, 1.0).concat(),
        [1, k + 1, n],
        &device,
    );
    let grads = (solved.plan.clone() * upstream).sum().backward();
    let plan = values(solved.plan);
    let bin = &plan[k * n..];
    let taken: f64 = bin.iter().sum();
    assert!((taken - (n - k) as f64 / total).abs() < 1e-12, "{bin:?}");
    let cheap: f64 = bin[..4].iter().sum();
    assert!(cheap > 0.95 * taken, "{bin:?}");
    let score_grad = values(score.grad(&grads).unwrap())[0];
    assert!(score_grad.abs() < 1e-9, "∂L/∂score = {score_grad}");
    let cost_grad = values(c.grad(&grads).unwrap());
    assert!(cost_grad.iter().any(|g| g.abs() > 1e-3), "{cost_grad:?}");
    // The oracle agrees with the appended row.
    let mut all = costs.clone();
    all.push(dustbin_cost.iter().map(|c| c - 0.3).collect());
    let mut rows = vec![1.0 / total; k];
    rows.push((n - k) as f64 / total);
    let expected = reference::balanced_plan(&all, &rows, &vec![1.0 / total; n], 0.3);
    assert_close(&plan, &expected.concat(), 1e-8, 1e-13, "the dustbin plan");
}

/// Both marginals within the tolerance when converged; `converged` false, with the
/// iterations at the budget, when the budget is too small.
#[test]
fn the_marginals_match_and_a_small_budget_says_so() {
    let device = flex_f64();
    let mut rng = Rng::new(13);
    let (k, n) = (5, 12);
    let costs = rng.matrix(k, n, 0.0, 1.0);
    let rows = masses(&mut rng, k, 3.0);
    let columns = masses(&mut rng, n, 3.0);
    let (plan, converged) = solve(&costs, &rows, &columns, 0.05, &device);
    assert!(converged);
    let row_sums: Vec<f64> = plan.chunks(n).map(|r| r.iter().sum()).collect();
    let column_sums: Vec<f64> = (0..n)
        .map(|j| (0..k).map(|i| plan[i * n + j]).sum())
        .collect();
    assert_close(&row_sums, &rows, 1e-12, 1e-13, "rows");
    assert_close(&column_sums, &columns, 1e-12, 1e-13, "columns");
    let solved = balanced_transport(
        tensor(costs.concat(), [1, k, n], &device),
        tensor(rows, [1, k], &device),
        tensor(columns, [1, n], &device),
        None,
        &settings(0.05).with_max_iterations(3),
    );
    assert!(!solved.converged.into_scalar::<bool>());
    assert_eq!(solved.iterations.into_scalar::<i64>(), 3);
}
