//! LSE and the token modes in f64: values against the independent reference
//! (`tests/reference`), gradients against its central differences, and their properties
//! (masking = dropping the tokens, padding side, LSE's limits, the softmax mean as the gradient
//! of LSE applied to x).

use crate::{common, reference};
use burn::module::Param;
use burn::tensor::{Device, Tensor};
use burn_pooling::{
    Lse, LseConfig, LseOutput, PoolingInput, TokenMode, TokenPooling, TokenPoolingConfig,
};
use common::{Rng, assert_close, bool_mask, dot, flex_f64, padded_both_sides, tensor, values};
use proptest::prelude::*;

const B: usize = 2;
const N: usize = 6;
const C: usize = 3;
const PREFIX: usize = 1;

/// Valid positions per sample (prefix included); the second sample has padding.
const VALID: [[bool; N]; B] = [[true; N], [true, true, false, true, false, true]];

/// Sample b's rows `x[n][c]` from `[B, N, C]` values.
fn sample(x: &[f64], b: usize, n: usize) -> Vec<Vec<f64>> {
    (0..n)
        .map(|j| x[(b * n + j) * C..(b * n + j + 1) * C].to_vec())
        .collect()
}

/// Random tokens whose prefix and padding hold large values, so that letting them through
/// fails.
fn inputs(rng: &mut Rng, lo: f64, hi: f64) -> Vec<f64> {
    let mut x: Vec<f64> = (0..B * N * C).map(|_| rng.uniform(lo, hi)).collect();
    for b in 0..B {
        for n in 0..N {
            if n < PREFIX || !VALID[b][n] {
                for c in 0..C {
                    x[(b * N + n) * C + c] = 7.0 + rng.uniform(0.0, 1.0);
                }
            }
        }
    }
    x
}

/// `[B·C]` LSE (or softmax mean) over the pooled positions, by the reference.
fn lse_reference(x: &[f64], r: f64, output: LseOutput) -> Vec<f64> {
    (0..B)
        .flat_map(|b| {
            let rows = sample(x, b, N);
            (0..C)
                .map(|c| {
                    let column: Vec<f64> = (PREFIX..N)
                        .filter(|&n| VALID[b][n])
                        .map(|n| rows[n][c])
                        .collect();
                    match output {
                        LseOutput::LogSumExp => reference::lse_channel(&column, r),
                        LseOutput::SoftmaxMean => reference::softmax_mean_channel(&column, r),
                    }
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

fn lse_layer(rho: f64, r_min: f64, output: LseOutput, device: &Device) -> Lse {
    let layer = LseConfig::new()
        .with_r_min(r_min)
        .with_output(output)
        .with_num_prefix_tokens(PREFIX)
        .init(device);
    Lse {
        rho: Param::from_tensor(tensor(vec![rho], [1], device)),
        ..layer
    }
}

/// LSE and its softmax mean, as tokens and as maps, at temperatures from the Taylor regime
/// (r·spread ≈ 10⁻⁶) to a near-max one: values against the reference, ∂/∂x and ∂/∂ρ against
/// its central differences.
#[test]
fn lse_values_and_gradients_match_the_reference() {
    let device = flex_f64().autodiff();
    let mut rng = Rng::new(31);
    let r_min = 1e-9;
    // (ρ, value range): r = softplus(ρ) + r_min.
    let cases = [
        (-16.0, (0.0, 0.01)),
        (-1.0, (-1.0, 2.0)),
        (10.0, (-1.0, 2.0)),
        (60.0, (-0.5, 0.5)),
    ];
    for output in [LseOutput::LogSumExp, LseOutput::SoftmaxMean] {
        for (rho, (lo, hi)) in cases {
            let r = reference::lse_temperature(rho, r_min);
            let what = format!("{output:?} r = {r:.3e}");
            let x = inputs(&mut rng, lo, hi);
            let g: Vec<f64> = (0..B * C).map(|_| rng.uniform(-1.0, 1.0)).collect();
            let layer = lse_layer(rho, r_min, output, &device);
            let tokens = tensor(x.clone(), [B, N, C], &device).require_grad();
            let y = layer.forward(PoolingInput::tokens(tokens.clone()).with_mask(bool_mask(
                &VALID.concat(),
                B,
                &device,
            )));
            let expected = lse_reference(&x, r, output);
            assert_close(
                &values(y.clone()),
                &expected,
                1e-11,
                1e-13,
                &format!("{what}: y"),
            );
            let grads = (y * tensor(g.clone(), [B, C], &device)).sum().backward();
            let dx = values(tokens.grad(&grads).unwrap());
            let drho = values(layer.rho.val().grad(&grads).unwrap());

            let loss = |x: &[f64], rho: f64| {
                dot(
                    &lse_reference(x, reference::lse_temperature(rho, r_min), output),
                    &g,
                )
            };
            let h = 1e-6 * (hi - lo);
            let fd_x = reference::central_difference(&|v: &[f64]| loss(v, rho), &x, h);
            let fd_rho = reference::central_difference(&|v: &[f64]| loss(&x, v[0]), &[rho], 1e-4);
            assert_close(&dx, &fd_x, 1e-5, 1e-8, &format!("{what}: dx"));
            assert_close(&drho, &fd_rho, 1e-4, 1e-10, &format!("{what}: dρ"));

            // Maps [B, C, 1, N] of the same values, the prefix masked out instead of skipped.
            let mut map_valid = VALID.concat();
            (0..B).for_each(|b| map_valid[b * N] = false);
            let plain = LseConfig::new()
                .with_r_min(r_min)
                .with_output(output)
                .init(&device);
            let plain = Lse {
                rho: Param::from_tensor(tensor(vec![rho], [1], &device)),
                ..plain
            };
            let maps = tensor(x.clone(), [B, N, C], &device)
                .swap_dims(1, 2)
                .reshape([B, C, 1, N]);
            let y = plain
                .forward(PoolingInput::maps(maps).with_mask(bool_mask(&map_valid, B, &device)));
            assert_close(
                &values(y),
                &expected,
                1e-11,
                1e-13,
                &format!("{what}: maps"),
            );
        }
    }
}

/// `[B·modes·C]` token modes by the reference.
fn modes_reference(x: &[f64], n: usize, valid: &[bool], prefix: usize, modes: &[&str]) -> Vec<f64> {
    let b = x.len() / (n * C);
    (0..b)
        .flat_map(|s| {
            let rows = sample(x, s, n);
            let valid = &valid[s * n..(s + 1) * n];
            modes
                .iter()
                .flat_map(|mode| reference::token_mode(&rows, valid, prefix, mode))
                .collect::<Vec<_>>()
        })
        .collect()
}

const MODES: [(TokenMode, &str); 6] = [
    (TokenMode::WeightedMean, "weighted_mean"),
    (TokenMode::Cls, "cls"),
    (TokenMode::Last, "last"),
    (TokenMode::MeanSqrtLen, "mean_sqrt_len"),
    (TokenMode::Max, "max"),
    (TokenMode::Mean, "mean"),
];

fn token_pooling(prefix: usize) -> TokenPooling {
    TokenPoolingConfig::new(MODES.iter().map(|(m, _)| *m).collect())
        .with_num_prefix_tokens(prefix)
        .init()
}

/// Every mode, concatenated in the listed order, as tokens and maps: values against the
/// reference and ∂/∂x against its central differences.
#[test]
fn token_modes_match_the_reference() {
    let device = flex_f64().autodiff();
    let mut rng = Rng::new(41);
    let names: Vec<&str> = MODES.iter().map(|(_, n)| *n).collect();
    // Sample 1 also starts with padding: Cls must find position 1.
    let mut valid = VALID.concat();
    valid[N] = false;
    let layer = token_pooling(PREFIX);
    for _ in 0..2 {
        let x = inputs(&mut rng, -1.0, 2.0);
        let width = MODES.len() * C;
        let g: Vec<f64> = (0..B * width).map(|_| rng.uniform(-1.0, 1.0)).collect();
        let expected = modes_reference(&x, N, &valid, PREFIX, &names);
        let tokens = tensor(x.clone(), [B, N, C], &device).require_grad();
        let y = layer
            .forward(PoolingInput::tokens(tokens.clone()).with_mask(bool_mask(&valid, B, &device)));
        assert_eq!(y.dims(), [B, width]);
        assert_close(&values(y.clone()), &expected, 1e-13, 1e-14, "modes: y");
        let grads = (y * tensor(g.clone(), [B, width], &device))
            .sum()
            .backward();
        let dx = values(tokens.grad(&grads).unwrap());
        let fd = reference::central_difference(
            &|v: &[f64]| dot(&modes_reference(v, N, &valid, PREFIX, &names), &g),
            &x,
            1e-6,
        );
        assert_close(&dx, &fd, 1e-6, 1e-8, "modes: dx");

        // Maps [B, C, 1, N]: no prefix, so every mode sees all valid cells.
        let maps = tensor(x.clone(), [B, N, C], &device)
            .swap_dims(1, 2)
            .reshape([B, C, 1, N]);
        let y = token_pooling(0)
            .forward(PoolingInput::maps(maps).with_mask(bool_mask(&valid, B, &device)));
        let expected = modes_reference(&x, N, &valid, 0, &names);
        assert_close(&values(y), &expected, 1e-13, 1e-14, "modes on maps: y");
    }
}

/// A pooling layer's forward, boxed.
type Pool<'a> = Box<dyn Fn(PoolingInput) -> Tensor<2> + 'a>;

fn pool_masked(pool: &dyn Fn(PoolingInput) -> Tensor<2>, x: &[f64], valid: &[bool]) -> Vec<f64> {
    let device = flex_f64();
    let n = valid.len();
    let input = PoolingInput::tokens(tensor(x.to_vec(), [1, n, C], &device))
        .with_mask(bool_mask(valid, 1, &device));
    values(pool(input))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Masking equals dropping the tokens, and left and right padding (NaN-filled) give the
    /// same result, for LSE, its softmax mean and every token mode.
    #[test]
    fn masking_equals_dropping_and_the_padding_side_does_not_matter(
        (len, extra) in (1usize..6, 1usize..4),
        seed in 0u64..1000,
        rho in -3.0f64..5.0,
    ) {
        let device = flex_f64();
        let n = len + extra;
        let mut rng = Rng::new(seed);
        let x: Vec<f64> = (0..len * C).map(|_| rng.uniform(-2.0, 2.0)).collect();
        let sides = padded_both_sides(&x, len, n, C, f64::NAN);
        let lse = |output| {
            let layer = LseConfig::new().with_output(output).init(&device);
            Lse { rho: Param::from_tensor(tensor(vec![rho], [1], &device)), ..layer }
        };
        let lse_layers = [lse(LseOutput::LogSumExp), lse(LseOutput::SoftmaxMean)];
        let tokens = token_pooling(0);
        let pools: Vec<(&str, Pool<'_>)> = vec![
            ("lse", Box::new(|i| lse_layers[0].forward(i))),
            ("softmax mean", Box::new(|i| lse_layers[1].forward(i))),
            ("token modes", Box::new(|i| tokens.forward(i))),
        ];
        for (name, pool) in &pools {
            let dropped = values(pool(PoolingInput::tokens(tensor(x.clone(), [1, len, C], &device))));
            for (side, padded, valid) in &sides {
                let pooled = pool_masked(pool.as_ref(), padded, valid);
                assert_close(&pooled, &dropped, 1e-12, 1e-12, &format!("{name}: {side} = dropped"));
            }
        }
    }

    /// LSE tends to the max as r → ∞ (max − ln(N)/r ≤ LSE ≤ max) and to the mean as r → 0
    /// (|LSE − mean − r·var/2| ≤ r²·spread³); mean ≤ softmax mean ≤ max; the softmax mean is
    /// Σ_n (∂LSE/∂x_n) x_n.
    #[test]
    fn lse_limits_and_the_softmax_mean_as_its_gradient(
        n in 1usize..8,
        seed in 0u64..1000,
        rho in -2.0f64..6.0,
    ) {
        let device = flex_f64().autodiff();
        let mut rng = Rng::new(seed);
        let x: Vec<f64> = (0..n * C).map(|_| rng.uniform(-3.0, 3.0)).collect();
        let column = |c: usize| -> Vec<f64> { (0..n).map(|j| x[j * C + c]).collect() };
        let stats: Vec<(f64, f64, f64, f64)> = (0..C).map(|c| {
            let v = column(c);
            let mean = v.iter().sum::<f64>() / n as f64;
            let var = v.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / n as f64;
            let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let min = v.iter().copied().fold(f64::INFINITY, f64::min);
            (mean, var, max, max - min)
        }).collect();
        let pool = |rho: f64, r_min: f64, output| {
            let layer = LseConfig::new().with_r_min(r_min).with_output(output).init(&device);
            Lse { rho: Param::from_tensor(tensor(vec![rho], [1], &device)), ..layer }
        };
        let input = || tensor(x.clone(), [1, n, C], &device);

        let large = 1e5;
        let y = values(pool(large, 1e-4, LseOutput::LogSumExp).forward_tokens(input()));
        for (c, &(_, _, max, _)) in stats.iter().enumerate() {
            prop_assert!(y[c] <= max + 1e-12 && y[c] >= max - (n as f64).ln() / large - 1e-12,
                "r → ∞: {} vs max {max}", y[c]);
        }
        let r = 1e-7;
        let y = values(pool(-60.0, r, LseOutput::LogSumExp).forward_tokens(input()));
        for (c, &(mean, var, _, spread)) in stats.iter().enumerate() {
            let bound = r * r * spread.powi(3) + 1e-14;
            prop_assert!((y[c] - mean - r * var / 2.0).abs() <= bound,
                "r → 0: {} vs mean {mean} + r var/2", y[c]);
        }

        let layer = pool(rho, 1e-4, LseOutput::LogSumExp);
        let tracked = input().require_grad();
        let y = layer.forward_tokens(tracked.clone());
        let lse = values(y.clone());
        let grad = values(tracked.grad(&y.sum().backward()).unwrap());
        let soft = values(pool(rho, 1e-4, LseOutput::SoftmaxMean).forward_tokens(input()));
        for (c, &(mean, _, max, _)) in stats.iter().enumerate() {
            let applied: f64 = (0..n).map(|j| grad[j * C + c] * x[j * C + c]).sum();
            prop_assert!((applied - soft[c]).abs() <= 1e-12 * (1.0 + soft[c].abs()),
                "Σ ∂LSE/∂x · x = {applied}, softmax mean {}", soft[c]);
            prop_assert!(mean - 1e-12 <= soft[c] && soft[c] <= max + 1e-12);
            prop_assert!(mean - 1e-12 <= lse[c] && lse[c] <= max + 1e-12);
        }
    }
}
