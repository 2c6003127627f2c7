//! Attention pooling (MAP and SimPool) in f64: values against the independent reference
//! (`tests/reference`, which projects every key and value the textbook way), gradients for the
//! input and every parameter against its central differences, and properties (masking =
//! dropping the tokens, the padding side, SimPool's γ = 1 as its plain form shifted).

use crate::{common, reference};
use burn::module::Param;
use burn::nn::{LayerNorm, Linear};
use burn::tensor::Gradients;
use burn::tensor::{Device, Tensor};
use burn_pooling::{
    AttentionPool, AttentionPoolConfig, AttentionPoolOutput, PoolingInput, SimPool, SimPoolConfig,
};
use common::{
    Rng, assert_close, bool_mask, dot, flex_f64, max_abs_difference, padded_both_sides, tensor,
    values,
};
use proptest::prelude::*;
use reference::{MAP_FIELDS, MapParams, SIMPOOL_FIELDS, SimPoolParams};

const B: usize = 2;
const N: usize = 6;
const C: usize = 8;
const HEADS: usize = 2;
const PREFIX: usize = 1;

/// Valid positions per sample (prefix included); the second sample has padding.
const VALID: [[bool; N]; B] = [[true; N], [true, true, false, true, false, true]];

/// Random tokens `[B, N, C]` whose prefix and padding hold large values, so that letting them
/// through fails.
fn inputs(rng: &mut Rng) -> Vec<f64> {
    let mut x: Vec<f64> = (0..B * N * C).map(|_| rng.uniform(-1.0, 2.0)).collect();
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

/// Sample b's valid rows after the prefix, `[n][c]`.
fn valid_rows(x: &[f64], b: usize) -> Vec<Vec<f64>> {
    (PREFIX..N)
        .filter(|&n| VALID[b][n])
        .map(|n| x[(b * N + n) * C..(b * N + n + 1) * C].to_vec())
        .collect()
}

/// The same values as maps `[B, C, 1, N]` with the prefix masked out instead of skipped.
fn as_maps(x: &[f64], device: &Device) -> PoolingInput {
    let mut valid = VALID.concat();
    (0..B).for_each(|b| valid[b * N] = false);
    let maps = tensor(x.to_vec(), [B, N, C], device)
        .swap_dims(1, 2)
        .reshape([B, C, 1, N]);
    PoolingInput::maps(maps).with_mask(bool_mask(&valid, B, device))
}

fn masked_tokens(x: Tensor<3>, device: &Device) -> PoolingInput {
    PoolingInput::tokens(x).with_mask(bool_mask(&VALID.concat(), B, device))
}

fn linear(w: &[f64], b: Option<&[f64]>, device: &Device) -> Linear {
    let d_out = b.map_or(C, |b| b.len());
    let d_in = w.len() / d_out;
    Linear {
        weight: Param::from_tensor(tensor(w.to_vec(), [d_in, d_out], device)),
        bias: b.map(|b| Param::from_tensor(tensor(b.to_vec(), [b.len()], device))),
    }
}

fn set_norm(norm: &mut LayerNorm, g: &[f64], b: &[f64], device: &Device) {
    norm.gamma = Param::from_tensor(tensor(g.to_vec(), [g.len()], device));
    norm.beta = Some(Param::from_tensor(tensor(b.to_vec(), [b.len()], device)));
}

fn grad<const D: usize>(param: &Param<Tensor<D>>, grads: &Gradients) -> Vec<f64> {
    values(param.val().grad(grads).expect("a parameter gradient"))
}

fn linear_grads(layer: &Linear, grads: &Gradients) -> [Vec<f64>; 2] {
    [
        grad(&layer.weight, grads),
        grad(layer.bias.as_ref().expect("a bias"), grads),
    ]
}

// ---------------------------------------------------------------------------------------------
// MAP
// ---------------------------------------------------------------------------------------------

fn map_params(rng: &mut Rng, latents: usize, norm: bool, mean_latents: bool) -> MapParams {
    let hidden = 4 * C;
    let w = 1.0 / (C as f64).sqrt();
    let mut uniform = |len: usize, lo: f64, hi: f64| -> Vec<f64> {
        (0..len).map(|_| rng.uniform(lo, hi)).collect()
    };
    let fields = vec![
        uniform(latents * C, -1.0, 1.0),
        uniform(C * C, -w, w),
        uniform(C, -w, w),
        uniform(C * C, -w, w),
        uniform(C, -w, w),
        uniform(C * C, -w, w),
        uniform(C, -w, w),
        uniform(C * C, -w, w),
        uniform(C, -w, w),
        uniform(C, 0.5, 1.5),
        uniform(C, -0.5, 0.5),
        uniform(C * hidden, -w, w),
        uniform(hidden, -w, w),
        uniform(hidden * C, -0.2, 0.2),
        uniform(C, -w, w),
    ];
    MapParams {
        channels: C,
        heads: HEADS,
        latents,
        hidden,
        eps: 1e-6,
        norm,
        mean_latents,
        fields,
    }
}

fn map_layer(p: &MapParams, prefix: usize, device: &Device) -> AttentionPool {
    let output = if p.mean_latents {
        AttentionPoolOutput::MeanLatents
    } else {
        AttentionPoolOutput::FirstLatent
    };
    let base = AttentionPoolConfig::new(C)
        .with_num_heads(p.heads)
        .with_latent_len(p.latents)
        .with_norm(p.norm)
        .with_norm_eps(p.eps)
        .with_output(output)
        .with_num_prefix_tokens(prefix)
        .init(device);
    let f = |name: &str| p.field(name);
    let mut norm = base.norm;
    if let Some(norm) = &mut norm {
        set_norm(norm, f("ln_g"), f("ln_b"), device);
    }
    AttentionPool {
        latent: Param::from_tensor(tensor(f("latent").to_vec(), [p.latents, C], device)),
        query: linear(f("wq"), Some(f("bq")), device),
        key: linear(f("wk"), Some(f("bk")), device),
        value: linear(f("wv"), Some(f("bv")), device),
        projection: linear(f("wo"), Some(f("bo")), device),
        norm,
        fc1: linear(f("w1"), Some(f("b1")), device),
        fc2: linear(f("w2"), Some(f("b2")), device),
        ..base
    }
}

/// The layer's parameter gradients in `MAP_FIELDS` order (LayerNorm's: zeros when it is off).
fn map_grads(pool: &AttentionPool, grads: &Gradients) -> Vec<Vec<f64>> {
    let [wq, bq] = linear_grads(&pool.query, grads);
    let [wk, bk] = linear_grads(&pool.key, grads);
    let [wv, bv] = linear_grads(&pool.value, grads);
    let [wo, bo] = linear_grads(&pool.projection, grads);
    let [w1, b1] = linear_grads(&pool.fc1, grads);
    let [w2, b2] = linear_grads(&pool.fc2, grads);
    let (ln_g, ln_b) = match &pool.norm {
        Some(norm) => (
            grad(&norm.gamma, grads),
            grad(norm.beta.as_ref().unwrap(), grads),
        ),
        None => (vec![0.0; C], vec![0.0; C]),
    };
    vec![
        grad(&pool.latent, grads),
        wq,
        bq,
        wk,
        bk,
        wv,
        bv,
        wo,
        bo,
        ln_g,
        ln_b,
        w1,
        b1,
        w2,
        b2,
    ]
}

fn map_reference(x: &[f64], p: &MapParams) -> Vec<f64> {
    (0..B)
        .flat_map(|b| reference::map_pool(&valid_rows(x, b), p))
        .collect()
}

/// MAP with one and two latents (first latent and mean), with and without its LayerNorm, as
/// masked tokens with a prefix and as masked maps: values against the reference, ∂/∂x and
/// ∂/∂(every parameter) against its central differences.
#[test]
fn map_values_and_gradients_match_the_reference() {
    let device = flex_f64().autodiff();
    let mut rng = Rng::new(23);
    let (mut worst_y, mut worst_dx, mut worst_dp) = (0.0f64, 0.0f64, 0.0f64);
    for (latents, norm, mean_latents) in [(1, true, false), (3, true, true), (2, false, false)] {
        let what = format!("L = {latents}, norm {norm}, mean {mean_latents}");
        let p = map_params(&mut rng, latents, norm, mean_latents);
        let x = inputs(&mut rng);
        let g: Vec<f64> = (0..B * C).map(|_| rng.uniform(-1.0, 1.0)).collect();
        let pool = map_layer(&p, PREFIX, &device);
        let tokens = tensor(x.clone(), [B, N, C], &device).require_grad();
        let y = pool.forward(masked_tokens(tokens.clone(), &device));
        let expected = map_reference(&x, &p);
        let out = values(y.clone());
        worst_y = worst_y.max(max_abs_difference(&out, &expected));
        assert_close(&out, &expected, 1e-12, 1e-12, &format!("{what}: y"));

        let grads = (y * tensor(g.clone(), [B, C], &device)).sum().backward();
        let dx = values(tokens.grad(&grads).unwrap());
        let loss = |x: &[f64], p: &MapParams| dot(&map_reference(x, p), &g);
        let fd = reference::central_difference(&|v: &[f64]| loss(v, &p), &x, 1e-5);
        worst_dx = worst_dx.max(max_abs_difference(&dx, &fd));
        assert_close(&dx, &fd, 1e-6, 1e-8, &format!("{what}: dx"));
        for ((name, field), actual) in MAP_FIELDS
            .iter()
            .zip(&p.fields)
            .zip(map_grads(&pool, &grads))
        {
            if !norm && name.starts_with("ln") {
                continue;
            }
            let i = MAP_FIELDS.iter().position(|f| f == name).unwrap();
            let fd = reference::central_difference(
                &|v: &[f64]| {
                    let mut q = p.clone();
                    q.fields[i] = v.to_vec();
                    loss(&x, &q)
                },
                field,
                1e-5,
            );
            worst_dp = worst_dp.max(max_abs_difference(&actual, &fd));
            assert_close(&actual, &fd, 1e-6, 1e-8, &format!("{what}: d{name}"));
        }

        let plain = map_layer(&p, 0, &device);
        let y = plain.forward(as_maps(&x, &device));
        assert_close(
            &values(y),
            &expected,
            1e-12,
            1e-12,
            &format!("{what}: maps"),
        );
    }
    eprintln!(
        "MAP vs the f64 reference: max |Δy| = {worst_y:.1e}, max |Δ∂x| (FD) = {worst_dx:.1e}, max |Δ∂θ| (FD) = {worst_dp:.1e}"
    );
}

// ---------------------------------------------------------------------------------------------
// SimPool
// ---------------------------------------------------------------------------------------------

fn simpool_params(
    rng: &mut Rng,
    gamma: Option<f64>,
    shift: Option<f64>,
    bias: bool,
) -> SimPoolParams {
    let w = 1.0 / (C as f64).sqrt();
    let mut uniform = |len: usize, lo: f64, hi: f64| -> Vec<f64> {
        (0..len).map(|_| rng.uniform(lo, hi)).collect()
    };
    let bias_of = |v: Vec<f64>| if bias { v } else { vec![0.0; C] };
    let fields = vec![
        uniform(C, 0.5, 1.5),
        uniform(C, -0.5, 0.5),
        uniform(C * C, -2.0 * w, 2.0 * w),
        bias_of(uniform(C, -w, w)),
        uniform(C * C, -2.0 * w, 2.0 * w),
        bias_of(uniform(C, -w, w)),
        vec![shift.unwrap_or(0.0)],
    ];
    SimPoolParams {
        eps: 1e-6,
        gamma,
        shift: shift.is_some(),
        fields,
    }
}

fn simpool_layer(p: &SimPoolParams, bias: bool, prefix: usize, device: &Device) -> SimPool {
    let base = SimPoolConfig::new(C)
        .with_gamma(p.gamma)
        .with_learnable_shift(p.shift)
        .with_qk_bias(bias)
        .with_num_prefix_tokens(prefix)
        .init(device);
    let f = |name: &str| p.field(name);
    let mut norm = base.norm;
    set_norm(&mut norm, f("ln_g"), f("ln_b"), device);
    SimPool {
        norm,
        query: linear(f("wq"), bias.then(|| f("bq")), device),
        key: linear(f("wk"), bias.then(|| f("bk")), device),
        beta: p
            .shift
            .then(|| Param::from_tensor(tensor(f("beta").to_vec(), [1], device))),
        ..base
    }
}

/// The layer's parameter gradients by `SIMPOOL_FIELDS` name (absent ones left out).
fn simpool_grads(pool: &SimPool, grads: &Gradients) -> Vec<(&'static str, Vec<f64>)> {
    let mut out = vec![
        ("ln_g", grad(&pool.norm.gamma, grads)),
        ("ln_b", grad(pool.norm.beta.as_ref().unwrap(), grads)),
        ("wq", grad(&pool.query.weight, grads)),
        ("wk", grad(&pool.key.weight, grads)),
    ];
    if let Some(b) = &pool.query.bias {
        out.push(("bq", grad(b, grads)));
    }
    if let Some(b) = &pool.key.bias {
        out.push(("bk", grad(b, grads)));
    }
    if let Some(beta) = &pool.beta {
        out.push(("beta", grad(beta, grads)));
    }
    out
}

fn simpool_reference(x: &[f64], p: &SimPoolParams) -> Vec<f64> {
    (0..B)
        .flat_map(|b| reference::simpool(&valid_rows(x, b), p))
        .collect()
}

/// SimPool plain, with γ = 2 and biases, and with γ = 1.25 and a learnable shift β = 0.2, as
/// masked tokens with a prefix and as masked maps: values against the reference, ∂/∂x and
/// ∂/∂(every parameter, β included) against its central differences.
#[test]
fn simpool_values_and_gradients_match_the_reference() {
    let device = flex_f64().autodiff();
    let mut rng = Rng::new(29);
    let (mut worst_y, mut worst_dx, mut worst_dp) = (0.0f64, 0.0f64, 0.0f64);
    for (gamma, shift, bias) in [
        (None, None, false),
        (Some(2.0), None, true),
        (Some(1.25), Some(0.2), false),
    ] {
        let what = format!("γ {gamma:?}, β {shift:?}, bias {bias}");
        let p = simpool_params(&mut rng, gamma, shift, bias);
        let x = inputs(&mut rng);
        let g: Vec<f64> = (0..B * C).map(|_| rng.uniform(-1.0, 1.0)).collect();
        let pool = simpool_layer(&p, bias, PREFIX, &device);
        let tokens = tensor(x.clone(), [B, N, C], &device).require_grad();
        let y = pool.forward(masked_tokens(tokens.clone(), &device));
        let expected = simpool_reference(&x, &p);
        let out = values(y.clone());
        worst_y = worst_y.max(max_abs_difference(&out, &expected));
        assert_close(&out, &expected, 1e-12, 1e-12, &format!("{what}: y"));

        let grads = (y * tensor(g.clone(), [B, C], &device)).sum().backward();
        let dx = values(tokens.grad(&grads).unwrap());
        let loss = |x: &[f64], p: &SimPoolParams| dot(&simpool_reference(x, p), &g);
        let fd = reference::central_difference(&|v: &[f64]| loss(v, &p), &x, 1e-5);
        worst_dx = worst_dx.max(max_abs_difference(&dx, &fd));
        assert_close(&dx, &fd, 1e-6, 1e-8, &format!("{what}: dx"));
        for (name, actual) in simpool_grads(&pool, &grads) {
            let i = SIMPOOL_FIELDS.iter().position(|f| *f == name).unwrap();
            let fd = reference::central_difference(
                &|v: &[f64]| {
                    let mut q = p.clone();
                    q.fields[i] = v.to_vec();
                    loss(&x, &q)
                },
                &p.fields[i],
                1e-5,
            );
            worst_dp = worst_dp.max(max_abs_difference(&actual, &fd));
            assert_close(&actual, &fd, 1e-6, 1e-8, &format!("{what}: d{name}"));
        }

        let plain = simpool_layer(&p, bias, 0, &device);
        let y = plain.forward(as_maps(&x, &device));
        assert_close(
            &values(y),
            &expected,
            1e-12,
            1e-12,
            &format!("{what}: maps"),
        );
    }
    eprintln!(
        "SimPool vs the f64 reference: max |Δy| = {worst_y:.1e}, max |Δ∂x| (FD) = {worst_dx:.1e}, max |Δ∂θ| (FD) = {worst_dp:.1e}"
    );
}

/// With γ = 1 and no shift, SimPool's power form is its plain form shifted per channel by
/// `10⁻⁶ − min_valid LN(x)` (the reference code does not undo the shift).
#[test]
fn simpool_gamma_one_is_the_plain_form_shifted() {
    let device = flex_f64();
    let mut rng = Rng::new(37);
    let p = simpool_params(&mut rng, Some(1.0), None, true);
    let x = inputs(&mut rng);
    let powered = values(
        simpool_layer(&p, true, PREFIX, &device).forward(masked_tokens(
            tensor(x.clone(), [B, N, C], &device),
            &device,
        )),
    );
    let plain_params = SimPoolParams {
        gamma: None,
        ..p.clone()
    };
    let plain = values(
        simpool_layer(&plain_params, true, PREFIX, &device).forward(masked_tokens(
            tensor(x.clone(), [B, N, C], &device),
            &device,
        )),
    );
    let shifted: Vec<f64> = (0..B)
        .flat_map(|b| {
            let normed: Vec<Vec<f64>> = valid_rows(&x, b)
                .iter()
                .map(|t| reference::layer_norm(t, p.field("ln_g"), p.field("ln_b"), p.eps))
                .collect();
            (0..C)
                .map(|c| {
                    let low = normed.iter().map(|v| v[c]).fold(f64::INFINITY, f64::min);
                    plain[b * C + c] - low + 1e-6
                })
                .collect::<Vec<_>>()
        })
        .collect();
    assert_close(
        &powered,
        &shifted,
        1e-12,
        1e-12,
        "γ = 1 vs plain − min + 1e-6",
    );
}

// ---------------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------------

/// A pooling layer's forward, boxed.
type Pool<'a> = Box<dyn Fn(PoolingInput) -> Tensor<2> + 'a>;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    /// Masking equals dropping the tokens, and left and right padding (NaN-filled) give the
    /// same result, for MAP (first latent and mean of two) and SimPool (plain and γ with β).
    #[test]
    fn attention_masking_equals_dropping_and_the_padding_side_does_not_matter(
        (len, extra) in (1usize..6, 1usize..4),
        seed in 0u64..1000,
    ) {
        let device = flex_f64();
        let n = len + extra;
        let mut rng = Rng::new(seed);
        let x: Vec<f64> = (0..len * C).map(|_| rng.uniform(-2.0, 2.0)).collect();
        let maps = [
            map_layer(&map_params(&mut rng, 1, true, false), 0, &device),
            map_layer(&map_params(&mut rng, 2, true, true), 0, &device),
        ];
        let sims = [
            simpool_layer(&simpool_params(&mut rng, None, None, true), true, 0, &device),
            simpool_layer(&simpool_params(&mut rng, Some(2.0), Some(-0.3), false), false, 0, &device),
        ];
        let pools: Vec<(&str, Pool<'_>)> = vec![
            ("MAP", Box::new(|i| maps[0].forward(i))),
            ("MAP mean of 2 latents", Box::new(|i| maps[1].forward(i))),
            ("SimPool", Box::new(|i| sims[0].forward(i))),
            ("SimPool γ + β", Box::new(|i| sims[1].forward(i))),
        ];
        for (name, pool) in &pools {
            let dropped = values(pool(PoolingInput::tokens(tensor(x.clone(), [1, len, C], &device))));
            for (side, values_padded, valid) in padded_both_sides(&x, len, n, C, f64::NAN) {
                let input = PoolingInput::tokens(tensor(values_padded, [1, n, C], &device))
                    .with_mask(bool_mask(&valid, 1, &device));
                let y = values(pool(input));
                assert_close(&y, &dropped, 1e-12, 1e-12, &format!("{name}: {side} padding = dropped"));
            }
        }
    }
}
