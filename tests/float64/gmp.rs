//! GMP and GAP + GMP in f64 against an independent computation: plain loops over the valid
//! positions for the values, the one-hot gradient of the maximum, and central differences of
//! those loops (the maximum is differentiable away from ties, which random inputs avoid).

use crate::{common, reference};
use burn::tensor::{Bool, Tensor, TensorData};
use burn_pooling::{GapGmpCombine, GapGmpConfig, GmpConfig, PoolingInput};
use common::{Rng, assert_close, dot, flex_f64, tensor, values};

const B: usize = 2;
const N: usize = 6;
const C: usize = 5;
const PREFIX: usize = 1;

/// Valid positions per sample (prefix included); the second sample has padding.
const VALID: [[bool; N]; B] = [[true; N], [true, true, false, true, false, true]];

/// The pooled positions of sample `b`: after the prefix, valid only.
fn pooled_positions(b: usize) -> Vec<usize> {
    (PREFIX..N).filter(|&n| VALID[b][n]).collect()
}

/// `x` as `[B][N][C]` flattened: the value at (b, n, c).
fn at(x: &[f64], b: usize, n: usize, c: usize) -> f64 {
    x[(b * N + n) * C + c]
}

/// `[B·C]` maxima over the pooled positions, by a loop.
fn max_reference(x: &[f64]) -> Vec<f64> {
    (0..B)
        .flat_map(|b| {
            (0..C).map(move |c| {
                pooled_positions(b)
                    .into_iter()
                    .map(|n| at(x, b, n, c))
                    .fold(f64::NEG_INFINITY, f64::max)
            })
        })
        .collect()
}

/// `[B·C]` means over the pooled positions, by a loop.
fn mean_reference(x: &[f64]) -> Vec<f64> {
    (0..B)
        .flat_map(|b| {
            (0..C).map(move |c| {
                let positions = pooled_positions(b);
                positions.iter().map(|&n| at(x, b, n, c)).sum::<f64>() / positions.len() as f64
            })
        })
        .collect()
}

/// The analytical gradient of Σ g_bc · max_n x_bnc: g_bc at each channel's winning position.
fn max_gradient_reference(x: &[f64], g: &[f64]) -> Vec<f64> {
    let mut grad = vec![0.0; x.len()];
    for b in 0..B {
        for c in 0..C {
            let winner = pooled_positions(b)
                .into_iter()
                .max_by(|&i, &j| at(x, b, i, c).total_cmp(&at(x, b, j, c)))
                .unwrap();
            grad[(b * N + winner) * C + c] = g[b * C + c];
        }
    }
    grad
}

/// Random tokens where the padded and the prefix positions hold the largest values, so that a
/// layer that let them through would fail.
fn inputs(rng: &mut Rng) -> (Vec<f64>, Vec<f64>) {
    let mut x: Vec<f64> = (0..B * N * C).map(|_| rng.uniform(-2.0, 1.0)).collect();
    for b in 0..B {
        for n in 0..N {
            if n < PREFIX || !VALID[b][n] {
                for c in 0..C {
                    x[(b * N + n) * C + c] = 5.0 + rng.uniform(0.0, 1.0);
                }
            }
        }
    }
    let g = (0..B * C).map(|_| rng.uniform(-1.0, 1.0)).collect();
    (x, g)
}

fn mask(device: &burn::tensor::Device) -> Tensor<2, Bool> {
    Tensor::<2, Bool>::from_bool(TensorData::new(VALID.concat(), [B, N]), device)
}

/// The values of `pool` on `x` `[B, N, C]` and the gradient of Σ g · y with respect to `x`
/// (`pool` gets the tracked tensor, and may reshape it into maps).
fn pooled_and_gradient(
    x: &[f64],
    g: &[f64],
    pool: impl Fn(Tensor<3>) -> Tensor<2>,
) -> (Vec<f64>, Vec<f64>) {
    let device = flex_f64().autodiff();
    let tokens = tensor(x.to_vec(), [B, N, C], &device).require_grad();
    let y = pool(tokens.clone());
    let shape = y.dims();
    let grads = (y.clone() * tensor(g.to_vec(), shape, &device))
        .sum()
        .backward();
    (values(y), values(tokens.grad(&grads).unwrap()))
}

/// GMP's values and input gradient, as tokens `[B, N, C]` and as maps `[B, C, 1, N]` (the
/// other layout), against the loops, the one-hot gradient and central differences.
#[test]
fn gmp_values_and_gradients_match_the_reference() {
    let device = flex_f64().autodiff();
    let mut rng = Rng::new(5);
    let gmp = GmpConfig::new().with_num_prefix_tokens(PREFIX).init();
    // Maps have no prefix: the prefix position is masked out instead.
    let mut map_mask = VALID.concat();
    for b in 0..B {
        map_mask[b * N] = false;
    }
    let map_mask = Tensor::<2, Bool>::from_bool(TensorData::new(map_mask, [B, N]), &device);
    for _ in 0..3 {
        let (x, g) = inputs(&mut rng);
        let expected = max_reference(&x);
        let expected_grad = max_gradient_reference(&x, &g);
        let fd = reference::central_difference(&|v: &[f64]| dot(&max_reference(v), &g), &x, 1e-6);
        assert_close(
            &expected_grad,
            &fd,
            1e-6,
            1e-8,
            "GMP: one-hot gradient vs differences",
        );

        // Tokens (the layer's prefix, the input's mask), and maps [B, C, 1, N] of the same
        // values.
        let from_tokens =
            |tokens: Tensor<3>| gmp.forward(PoolingInput::tokens(tokens).with_mask(mask(&device)));
        let from_maps = |tokens: Tensor<3>| {
            let maps = tokens.swap_dims(1, 2).reshape([B, C, 1, N]);
            let input = PoolingInput::maps(maps).with_mask(map_mask.clone());
            GmpConfig::new().init().forward(input)
        };
        let pools: [(&str, &dyn Fn(Tensor<3>) -> Tensor<2>); 2] =
            [("tokens", &from_tokens), ("maps", &from_maps)];
        for (input, pool) in pools {
            let (y, dx) = pooled_and_gradient(&x, &g, pool);
            assert_close(&y, &expected, 1e-12, 1e-12, &format!("GMP {input}: values"));
            assert_close(
                &dx,
                &expected_grad,
                1e-12,
                1e-12,
                &format!("GMP {input}: dx"),
            );
        }
    }
}

/// GAP + GMP, sum and concatenation: values and input gradients against the loops and
/// central differences.
#[test]
fn gap_gmp_values_and_gradients_match_the_reference() {
    let device = flex_f64().autodiff();
    let mut rng = Rng::new(9);
    let (x, g) = inputs(&mut rng);
    for combine in [GapGmpCombine::Sum, GapGmpCombine::Concat] {
        let layer = GapGmpConfig::new()
            .with_combine(combine)
            .with_num_prefix_tokens(PREFIX)
            .init();
        let width = layer.output_channels(C);
        let g: Vec<f64> = (0..B * width)
            .map(|i| g[i % g.len()] - 0.1 * i as f64)
            .collect();
        let combined = |x: &[f64]| -> Vec<f64> {
            let (mean, max) = (mean_reference(x), max_reference(x));
            (0..B)
                .flat_map(|b| {
                    let (mean, max) = (&mean[b * C..(b + 1) * C], &max[b * C..(b + 1) * C]);
                    match combine {
                        GapGmpCombine::Sum => mean.iter().zip(max).map(|(a, m)| a + m).collect(),
                        GapGmpCombine::Concat => [mean, max].concat(),
                    }
                })
                .collect()
        };
        let (y, dx) = pooled_and_gradient(&x, &g, |tokens| {
            layer.forward(PoolingInput::tokens(tokens).with_mask(mask(&device)))
        });
        let expected = combined(&x);
        assert_eq!((y.len(), expected.len()), (B * width, B * width));
        assert_close(
            &y,
            &expected,
            1e-12,
            1e-12,
            &format!("GapGmp {combine:?}: values"),
        );
        let fd = reference::central_difference(&|v: &[f64]| dot(&combined(v), &g), &x, 1e-6);
        assert_close(&dx, &fd, 1e-6, 1e-8, &format!("GapGmp {combine:?}: dx"));
    }
}
