//! SALAD's optimal-transport aggregation in f64: values against the independent reference
//! (`tests/reference`: plain-loop MLPs, a long-run log-domain Sinkhorn, the aggregation and
//! the norms), gradients (input and every parameter) against its central differences, the
//! fixed-iteration setting against the same iterations in f64, and the properties: masking =
//! dropping (left and right padding), the plan's marginals (the dustbin takes its mass),
//! uniform scores give the uniform plan, and the dustbin score and the last score bias get a
//! zero gradient.

use crate::{common, reference};
use burn::module::Param;
use burn::nn::Linear;
use burn::tensor::Device;
use burn_pooling::{OtAggregation, OtAggregationConfig, OtSinkhorn, PoolingInput};
use common::{
    Rng, assert_close, bool_mask, dot, flex_f64, max_abs_difference, padded_both_sides, tensor,
    values,
};
use reference::{SaladIterations, SaladParams};

const B: usize = 2;
/// Tokens per sample, the prefix (global token) included.
const N: usize = 9;
const C: usize = 3;
const HIDDEN: usize = 5;
const L: usize = 3;
const M: usize = 2;
const T: usize = 4;
const PREFIX: usize = 1;

/// Valid tokens per sample (prefix included); the second sample has padding: 5 valid > M.
const VALID: [[bool; N]; B] = [
    [true; N],
    [true, true, false, true, true, false, true, true, false],
];

type Layer = (Vec<Vec<f64>>, Vec<f64>);

fn random_linear(rng: &mut Rng, d_in: usize, d_out: usize, scale: f64) -> Layer {
    (
        rng.matrix(d_in, d_out, -scale, scale),
        (0..d_out).map(|_| rng.uniform(-0.5, 0.5)).collect(),
    )
}

fn random_params(rng: &mut Rng, global: bool) -> SaladParams {
    SaladParams {
        features_hidden: random_linear(rng, C, HIDDEN, 1.0),
        features_out: random_linear(rng, HIDDEN, L, 1.0),
        scores_hidden: random_linear(rng, C, HIDDEN, 1.0),
        // Scores of a few units: the plan is far from uniform.
        scores_out: random_linear(rng, HIDDEN, M, 2.0),
        token: global.then(|| {
            (
                random_linear(rng, C, HIDDEN, 1.0),
                random_linear(rng, HIDDEN, T, 1.0),
            )
        }),
        dustbin: 0.7,
        epsilon: 1.0,
    }
}

fn linear((w, b): &Layer, device: &Device) -> Linear {
    let shape = [w.len(), w[0].len()];
    Linear {
        weight: Param::from_tensor(tensor(w.concat(), shape, device)),
        bias: Some(Param::from_tensor(tensor(b.clone(), [b.len()], device))),
    }
}

const CONVERGED: OtSinkhorn = OtSinkhorn::Converged {
    max_iterations: 5000,
    tolerance: 1e-13,
};

/// The layer holding `params`, dropout off.
fn layer(
    params: &SaladParams,
    sinkhorn: OtSinkhorn,
    prefix: usize,
    device: &Device,
) -> OtAggregation {
    let base = OtAggregationConfig::new(C)
        .with_num_clusters(M)
        .with_cluster_dim(L)
        .with_hidden_dim(HIDDEN)
        .with_token_dim(params.token.as_ref().map(|_| T))
        .with_dropout(0.0)
        .with_epsilon(params.epsilon)
        .with_sinkhorn(sinkhorn)
        .with_num_prefix_tokens(prefix)
        .init(device);
    OtAggregation {
        features_hidden: linear(&params.features_hidden, device),
        features_out: linear(&params.features_out, device),
        scores_hidden: linear(&params.scores_hidden, device),
        scores_out: linear(&params.scores_out, device),
        token_hidden: params
            .token
            .as_ref()
            .map(|(first, _)| linear(first, device)),
        token_out: params
            .token
            .as_ref()
            .map(|(_, second)| linear(second, device)),
        dustbin: Param::from_tensor(tensor(vec![params.dustbin], [1], device)),
        ..base
    }
}

/// Sample b's token n, `[C]`.
fn token(x: &[f64], b: usize, n: usize) -> Vec<f64> {
    x[(b * N + n) * C..(b * N + n + 1) * C].to_vec()
}

/// `[B·width]` by the reference, for tokens `[B, N, C]` with the prefix and `VALID`.
fn reference_batch(params: &SaladParams, x: &[f64], iterations: SaladIterations) -> Vec<f64> {
    (0..B)
        .flat_map(|b| {
            let rows: Vec<Vec<f64>> = (PREFIX..N)
                .filter(|&n| VALID[b][n])
                .map(|n| token(x, b, n))
                .collect();
            let global = token(x, b, 0);
            reference::salad(&rows, Some(&global), params, iterations)
        })
        .collect()
}

/// Random tokens whose padding holds large values, so that letting them through fails.
fn inputs(rng: &mut Rng) -> Vec<f64> {
    let mut x: Vec<f64> = (0..B * N * C).map(|_| rng.uniform(-1.5, 1.5)).collect();
    for b in 0..B {
        for n in 0..N {
            if !VALID[b][n] {
                for c in 0..C {
                    x[(b * N + n) * C + c] = 7.0 + rng.uniform(0.0, 1.0);
                }
            }
        }
    }
    x
}

fn masked_tokens(x: &[f64], device: &Device) -> PoolingInput {
    PoolingInput::tokens(tensor(x.to_vec(), [B, N, C], device)).with_mask(bool_mask(
        &VALID.concat(),
        B,
        device,
    ))
}

/// Tokens with a prefix and a mask (with and without the global token), and masked maps
/// (without it, and with it given apart): the layer against the reference, converged.
#[test]
fn ot_aggregation_matches_the_reference() {
    let device = flex_f64();
    let mut rng = Rng::new(71);
    let mut worst: f64 = 0.0;
    for global in [true, false] {
        for _ in 0..3 {
            let params = random_params(&mut rng, global);
            let x = inputs(&mut rng);
            let width = M * L + if global { T } else { 0 };
            let expected = reference_batch(&params, &x, SaladIterations::Converged);
            let layer = layer(&params, CONVERGED, PREFIX, &device);
            let out = layer.forward_detailed(masked_tokens(&x, &device));
            assert!(out.converged.into_scalar::<bool>());
            assert_eq!(out.pooled.dims(), [B, width]);
            let y = values(out.pooled);
            worst = worst.max(max_abs_difference(&y, &expected));
            assert_close(
                &y,
                &expected,
                1e-10,
                1e-11,
                &format!("global {global}: tokens"),
            );

            // Maps [B, C, 1, N] of the same values, the prefix masked out instead of skipped.
            let mut map_valid = VALID.concat();
            (0..B).for_each(|b| map_valid[b * N] = false);
            let maps = tensor(x.clone(), [B, N, C], &device)
                .swap_dims(1, 2)
                .reshape([B, C, 1, N]);
            let input = PoolingInput::maps(maps).with_mask(bool_mask(&map_valid, B, &device));
            let y = if global {
                let first = tensor(x.clone(), [B, N, C], &device)
                    .slice([0..B, 0..1, 0..C])
                    .reshape([B, C]);
                layer.forward_with_global(input, first)
            } else {
                layer.forward(input)
            };
            let y = values(y);
            worst = worst.max(max_abs_difference(&y, &expected));
            assert_close(
                &y,
                &expected,
                1e-10,
                1e-11,
                &format!("global {global}: maps"),
            );
        }
    }
    println!("OtAggregation vs the f64 reference: max |error| = {worst:.2e}");
}

/// The fixed setting runs the crate's iterations (the f64 oracle of the same sequence), and
/// how far that is from the reference's own 3 sweeps and from convergence.
#[test]
fn fixed_iterations_match_the_same_iterations_in_f64() {
    let device = flex_f64();
    let mut rng = Rng::new(72);
    let (mut worst, mut from_reference, mut from_converged): (f64, f64, f64) = (0.0, 0.0, 0.0);
    for steps in [1, 3, 7] {
        let params = random_params(&mut rng, true);
        let x = inputs(&mut rng);
        let layer = layer(
            &params,
            OtSinkhorn::Fixed { iterations: steps },
            PREFIX,
            &device,
        );
        let out = layer.forward_detailed(masked_tokens(&x, &device));
        assert_eq!(out.iterations.into_scalar::<i64>(), steps as i64);
        assert!(!out.converged.into_scalar::<bool>());
        let y = values(out.pooled);
        let expected = reference_batch(&params, &x, SaladIterations::Crate(steps));
        worst = worst.max(max_abs_difference(&y, &expected));
        assert_close(&y, &expected, 1e-12, 1e-13, &format!("{steps} iterations"));
        if steps == 3 {
            let theirs = reference_batch(&params, &x, SaladIterations::Reference(3));
            from_reference = max_abs_difference(&y, &theirs);
            let converged = reference_batch(&params, &x, SaladIterations::Converged);
            from_converged = max_abs_difference(&theirs, &converged);
        }
    }
    println!(
        "OtAggregation fixed iterations vs the same iterations in f64: max |error| = {worst:.2e}; at 3: |crate − reference's 3 sweeps| = {from_reference:.2e}, |reference's 3 sweeps − converged| = {from_converged:.2e}"
    );
}

/// A flat view of the parameters, in a fixed order, and back.
fn flatten(params: &SaladParams) -> Vec<f64> {
    let mut out = Vec::new();
    let mut push = |(w, b): &Layer| {
        out.extend(w.concat());
        out.extend(b);
    };
    push(&params.features_hidden);
    push(&params.features_out);
    push(&params.scores_hidden);
    push(&params.scores_out);
    if let Some((first, second)) = &params.token {
        push(first);
        push(second);
    }
    out.push(params.dustbin);
    out
}

fn unflatten(template: &SaladParams, flat: &[f64]) -> SaladParams {
    let mut at = 0;
    let mut take = |(w, b): &Layer| -> Layer {
        let (rows, cols) = (w.len(), w[0].len());
        let weights = (0..rows)
            .map(|r| flat[at + r * cols..at + (r + 1) * cols].to_vec())
            .collect();
        at += rows * cols;
        let bias = flat[at..at + b.len()].to_vec();
        at += b.len();
        (weights, bias)
    };
    let features_hidden = take(&template.features_hidden);
    let features_out = take(&template.features_out);
    let scores_hidden = take(&template.scores_hidden);
    let scores_out = take(&template.scores_out);
    let token = template
        .token
        .as_ref()
        .map(|(first, second)| (take(first), take(second)));
    SaladParams {
        features_hidden,
        features_out,
        scores_hidden,
        scores_out,
        token,
        dustbin: flat[flat.len() - 1],
        epsilon: template.epsilon,
    }
}

/// The autodiff gradients of every parameter in [`flatten`]'s order.
fn parameter_gradients(layer: &OtAggregation, grads: &burn::tensor::Gradients) -> Vec<f64> {
    let mut out = Vec::new();
    let mut push = |linear: &Linear| {
        out.extend(values(linear.weight.val().grad(grads).unwrap()));
        out.extend(values(
            linear.bias.as_ref().unwrap().val().grad(grads).unwrap(),
        ));
    };
    push(&layer.features_hidden);
    push(&layer.features_out);
    push(&layer.scores_hidden);
    push(&layer.scores_out);
    if let (Some(first), Some(second)) = (&layer.token_hidden, &layer.token_out) {
        push(first);
        push(second);
    }
    out.extend(values(layer.dustbin.val().grad(grads).unwrap()));
    out
}

/// ∂/∂x and ∂/∂(every parameter) of Σ g·y against central differences of the reference
/// (converged, dropout off), on masked tokens with a prefix, with and without the global
/// token; the dustbin score's and the last score bias's gradients are 0.
#[test]
fn ot_aggregation_gradients_match_finite_differences() {
    let device = flex_f64().autodiff();
    let mut rng = Rng::new(73);
    for global in [true, false] {
        let params = random_params(&mut rng, global);
        let x = inputs(&mut rng);
        let width = M * L + if global { T } else { 0 };
        let g: Vec<f64> = (0..B * width).map(|_| rng.uniform(-1.0, 1.0)).collect();
        let layer = layer(&params, CONVERGED, PREFIX, &device);
        let tokens = tensor(x.clone(), [B, N, C], &device).require_grad();
        let y = layer.forward(PoolingInput::tokens(tokens.clone()).with_mask(bool_mask(
            &VALID.concat(),
            B,
            &device,
        )));
        let grads = (y * tensor(g.clone(), [B, width], &device))
            .sum()
            .backward();
        let loss = |p: &SaladParams, x: &[f64]| {
            dot(&reference_batch(p, x, SaladIterations::Converged), &g)
        };
        let h = 1e-6;
        let dx = values(tokens.grad(&grads).unwrap());
        for (i, d) in dx.iter().enumerate() {
            let (b, n) = (i / (N * C), (i / C) % N);
            if !VALID[b][n] || (n < PREFIX && !global) {
                assert_eq!(*d, 0.0, "global {global}: the gradient at element {i}");
            }
        }
        let fd = reference::central_difference(&|v: &[f64]| loss(&params, v), &x, h);
        let dx_error = max_abs_difference(&dx, &fd);
        assert_close(&dx, &fd, 1e-6, 1e-8, &format!("global {global}: dx"));
        let flat = flatten(&params);
        let dp = parameter_gradients(&layer, &grads);
        let fd =
            reference::central_difference(&|v: &[f64]| loss(&unflatten(&params, v), &x), &flat, h);
        let dp_error = max_abs_difference(&dp, &fd);
        assert_close(&dp, &fd, 1e-6, 1e-8, &format!("global {global}: dparams"));
        let dz = dp[dp.len() - 1];
        let bias = values(
            layer
                .scores_out
                .bias
                .as_ref()
                .unwrap()
                .val()
                .grad(&grads)
                .unwrap(),
        );
        let largest = dp.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        for v in bias.iter().chain([&dz]) {
            assert!(
                v.abs() <= 1e-10 * largest.max(1.0),
                "global {global}: the dustbin / last score bias gradient {v} is not 0"
            );
        }
        println!(
            "OtAggregation FD (global {global}): dx max |autodiff − FD| = {dx_error:.2e}, dparams {dp_error:.2e}; |dz| = {:.1e}, max |d b_s2| = {:.1e} (largest |dparam| {largest:.2})",
            dz.abs(),
            bias.iter().fold(0.0f64, |m, v| m.max(v.abs()))
        );
    }
}

/// The fixed setting's gradient is the implicit one at its unconverged plan (computed with
/// the plan's actual sums): the dustbin score and the last score bias still get 0, and the
/// input gradient is finite and not the converged one.
#[test]
fn fixed_iterations_give_zero_dustbin_and_score_bias_gradients() {
    let device = flex_f64().autodiff();
    let mut rng = Rng::new(74);
    let params = random_params(&mut rng, true);
    let x = inputs(&mut rng);
    let layer = layer(
        &params,
        OtSinkhorn::Fixed { iterations: 3 },
        PREFIX,
        &device,
    );
    let tokens = tensor(x.clone(), [B, N, C], &device).require_grad();
    let y = layer.forward(PoolingInput::tokens(tokens.clone()).with_mask(bool_mask(
        &VALID.concat(),
        B,
        &device,
    )));
    let width = M * L + T;
    let g: Vec<f64> = (0..B * width).map(|_| rng.uniform(-1.0, 1.0)).collect();
    let grads = (y * tensor(g, [B, width], &device)).sum().backward();
    let dp = parameter_gradients(&layer, &grads);
    let largest = dp.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let dz = dp[dp.len() - 1];
    assert!(dz.abs() <= 1e-10 * largest, "dz = {dz}");
    let bias = values(
        layer
            .scores_out
            .bias
            .as_ref()
            .unwrap()
            .val()
            .grad(&grads)
            .unwrap(),
    );
    assert!(
        bias.iter().all(|v| v.abs() <= 1e-10 * largest),
        "d b_s2 = {bias:?}"
    );
    assert!(
        values(tokens.grad(&grads).unwrap())
            .iter()
            .all(|v| v.is_finite())
    );
}

/// Masking = dropping the tokens (NaN padding, left or right); the plan's marginals (the
/// dustbin row takes (N−m)/(N+m), each cluster 1/(N+m), each valid column 1/(N+m), padding
/// 0).
#[test]
fn masking_equals_dropping_and_the_dustbin_takes_its_mass() {
    let device = flex_f64();
    let mut rng = Rng::new(75);
    let params = random_params(&mut rng, false);
    let layer = layer(&params, CONVERGED, 0, &device);
    for len in [3, 4, 6] {
        let x: Vec<f64> = (0..len * C).map(|_| rng.uniform(-2.0, 2.0)).collect();
        let dropped = values(layer.forward_tokens(tensor(x.clone(), [1, len, C], &device)));
        let n = len + 2;
        for (name, padded, valid) in padded_both_sides(&x, len, n, C, f64::NAN) {
            let out = layer.forward_detailed(
                PoolingInput::tokens(tensor(padded, [1, n, C], &device))
                    .with_mask(bool_mask(&valid, 1, &device)),
            );
            let y = values(out.pooled);
            assert_close(&y, &dropped, 1e-12, 1e-13, &format!("len {len} {name} pad"));
            let plan = values(out.plan);
            let total = (len + M) as f64;
            for k in 0..=M {
                let row: f64 = plan[k * n..(k + 1) * n].iter().sum();
                let expected = if k < M {
                    1.0 / total
                } else {
                    (len - M) as f64 / total
                };
                assert!(
                    (row - expected).abs() < 1e-12,
                    "len {len} {name}: row {k} sums to {row}, expected {expected}"
                );
            }
            for j in 0..n {
                let column: f64 = (0..=M).map(|k| plan[k * n + j]).sum();
                let expected = if valid[j] { 1.0 / total } else { 0.0 };
                assert!(
                    (column - expected).abs() < 1e-14,
                    "len {len} {name}: column {j} sums to {column}, expected {expected}"
                );
            }
        }
    }
}

/// Scores constant along each cluster (the last score layer's weights 0: only its bias is
/// left, a row constant) give the product plan a bᵀ / Σb, P̃ = 1/N for every cluster, so every
/// cluster's block is the normalised mean feature, whatever the bias and the dustbin score.
#[test]
fn uniform_scores_give_the_uniform_plan() {
    let device = flex_f64();
    let mut rng = Rng::new(76);
    let mut params = random_params(&mut rng, false);
    params.scores_out.0 = vec![vec![0.0; M]; HIDDEN];
    params.scores_out.1 = vec![3.0, -2.0];
    params.dustbin = 5.0;
    let layer = layer(&params, CONVERGED, 0, &device);
    let n = 7;
    let x: Vec<f64> = (0..n * C).map(|_| rng.uniform(-2.0, 2.0)).collect();
    let out = layer.forward_detailed(tensor(x.clone(), [1, n, C], &device));
    let total = (n + M) as f64;
    let plan = values(out.plan);
    for k in 0..=M {
        let mass = if k < M { 1.0 } else { (n - M) as f64 };
        for j in 0..n {
            let expected = mass / total / total / (n as f64 / total);
            assert!(
                (plan[k * n + j] - expected).abs() < 1e-14,
                "P[{k}][{j}] = {}, expected {expected}",
                plan[k * n + j]
            );
        }
    }
    let features: Vec<Vec<f64>> = x
        .chunks(C)
        .map(|t| reference::salad_mlp(t, &params.features_hidden, &params.features_out))
        .collect();
    let mean: Vec<f64> = (0..L)
        .map(|i| features.iter().map(|f| f[i]).sum::<f64>() / n as f64)
        .collect();
    let block = reference::salad_unit(&mean);
    let y = values(out.pooled);
    // l-major, cluster fastest; the whole normalised: each block then has norm 1/√m.
    for i in 0..L {
        for k in 0..M {
            let expected = block[i] / (M as f64).sqrt();
            assert!(
                (y[i * M + k] - expected).abs() < 1e-12,
                "y[{i}·m + {k}] = {}, expected {expected}",
                y[i * M + k]
            );
        }
    }
}

/// The oracle's own check: its long-run log-domain plan equals the kernel-domain Sinkhorn of
/// `reference::balanced_plan` on the costs −s (and −z) with SALAD's masses.
#[test]
fn the_salad_oracle_plan_is_the_balanced_plan() {
    let mut rng = Rng::new(77);
    let (m, n) = (3, 8);
    let s = rng.matrix(m, n, -3.0, 3.0);
    let z = 0.4;
    let plan = reference::salad_plan(&s, z, 1.0, SaladIterations::Converged);
    let mut costs: Vec<Vec<f64>> = s.iter().map(|r| r.iter().map(|v| -v).collect()).collect();
    costs.push(vec![-z; n]);
    let total = (n + m) as f64;
    let mut a = vec![1.0 / total; m + 1];
    a[m] = (n - m) as f64 / total;
    let other = reference::balanced_plan(&costs, &a, &vec![1.0 / total; n], 1.0);
    assert_close(&plan.concat(), &other.concat(), 1e-12, 1e-15, "plan");
}

/// `OtSinkhorn::Reference`: the output is the reference's own sweeps (from v = 0, row update
/// first) on masked tokens and maps; its gradient (the implicit one at that plan) gives the
/// dustbin score and the last score bias 0, is finite, and misses the padding.
#[test]
fn reference_iterations_are_the_reference_bit_for_bit() {
    let mut rng = Rng::new(78);
    let mut worst: f64 = 0.0;
    for steps in [1, 3] {
        let device = flex_f64();
        let params = random_params(&mut rng, true);
        let x = inputs(&mut rng);
        let sinkhorn = OtSinkhorn::Reference { iterations: steps };
        let expected = reference_batch(&params, &x, SaladIterations::Reference(steps));
        let y =
            values(layer(&params, sinkhorn, PREFIX, &device).forward(masked_tokens(&x, &device)));
        worst = worst.max(max_abs_difference(&y, &expected));
        assert_close(&y, &expected, 1e-12, 1e-13, &format!("{steps} sweeps"));

        let device = device.autodiff();
        let layer = layer(&params, sinkhorn, PREFIX, &device);
        let tokens = tensor(x.clone(), [B, N, C], &device).require_grad();
        let y = layer.forward(PoolingInput::tokens(tokens.clone()).with_mask(bool_mask(
            &VALID.concat(),
            B,
            &device,
        )));
        let width = M * L + T;
        let g: Vec<f64> = (0..B * width).map(|_| rng.uniform(-1.0, 1.0)).collect();
        assert_close(&values(y.clone()), &expected, 1e-12, 1e-13, "tracked");
        let grads = (y * tensor(g, [B, width], &device)).sum().backward();
        let dp = parameter_gradients(&layer, &grads);
        let largest = dp.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        assert!(dp.iter().all(|v| v.is_finite()) && largest > 0.0);
        let dz = dp[dp.len() - 1];
        assert!(dz.abs() <= 1e-10 * largest, "dz = {dz}");
        let dx = values(tokens.grad(&grads).unwrap());
        for (i, d) in dx.iter().enumerate() {
            let (b, n) = (i / (N * C), (i / C) % N);
            assert!(d.is_finite());
            if !VALID[b][n] {
                assert_eq!(*d, 0.0, "the gradient at padded element {i}");
            }
        }
    }
    println!("OtAggregation Reference sweeps vs the f64 reference's: max |error| = {worst:.2e}");
}

/// `OtSinkhorn::Reference`'s gradient is the implicit gradient at the reference's plan P_T:
/// central differences of the oracle whose plan is the converged balanced plan of P_T's own
/// row sums r (held fixed) and the column masses (`reference::balanced_plan`, kernel domain).
#[test]
fn reference_iterations_get_the_implicit_gradient_at_their_plan() {
    let device = flex_f64().autodiff();
    let mut rng = Rng::new(79);
    let params = random_params(&mut rng, true);
    let x = inputs(&mut rng);
    let steps = 3;
    let width = M * L + T;
    let g: Vec<f64> = (0..B * width).map(|_| rng.uniform(-1.0, 1.0)).collect();
    let layer = layer(
        &params,
        OtSinkhorn::Reference { iterations: steps },
        PREFIX,
        &device,
    );
    let tokens = tensor(x.clone(), [B, N, C], &device).require_grad();
    let y = layer.forward(PoolingInput::tokens(tokens.clone()).with_mask(bool_mask(
        &VALID.concat(),
        B,
        &device,
    )));
    let grads = (y * tensor(g.clone(), [B, width], &device))
        .sum()
        .backward();
    let dx = values(tokens.grad(&grads).unwrap());
    // Each sample's valid rows and global token.
    let sample = |x: &[f64], b: usize| -> (Vec<Vec<f64>>, Vec<f64>) {
        let rows = (PREFIX..N)
            .filter(|&n| VALID[b][n])
            .map(|n| token(x, b, n))
            .collect();
        (rows, token(x, b, 0))
    };
    // r of P_T at the unperturbed input, per sample.
    let row_sums: Vec<Vec<f64>> = (0..B)
        .map(|b| {
            let (rows, _) = sample(&x, b);
            let scores: Vec<Vec<f64>> = rows
                .iter()
                .map(|t| reference::salad_mlp(t, &params.scores_hidden, &params.scores_out))
                .collect();
            let s: Vec<Vec<f64>> = (0..M)
                .map(|k| scores.iter().map(|row| row[k]).collect())
                .collect();
            let plan = reference::salad_plan(
                &s,
                params.dustbin,
                params.epsilon,
                SaladIterations::Reference(steps),
            );
            plan.iter().map(|row| row.iter().sum()).collect()
        })
        .collect();
    let loss = |v: &[f64]| -> f64 {
        let y: Vec<f64> = (0..B)
            .flat_map(|b| {
                let (rows, global) = sample(v, b);
                let n = rows.len();
                let a = row_sums[b].clone();
                let plan_of = |s: &[Vec<f64>]| -> Vec<Vec<f64>> {
                    let mut costs: Vec<Vec<f64>> =
                        s.iter().map(|r| r.iter().map(|v| -v).collect()).collect();
                    costs.push(vec![-params.dustbin; n]);
                    let columns = vec![1.0 / (n + M) as f64; n];
                    reference::balanced_plan(&costs, &a, &columns, params.epsilon)
                };
                reference::salad_with(&rows, Some(&global), &params, &plan_of)
            })
            .collect();
        dot(&y, &g)
    };
    let fd = reference::central_difference(&loss, &x, 1e-6);
    let error = max_abs_difference(&dx, &fd);
    println!(
        "OtAggregation Reference: dx vs FD at the plan's own marginals: max |error| = {error:.2e}"
    );
    assert_close(&dx, &fd, 1e-4, 1e-6, "dx");
}
