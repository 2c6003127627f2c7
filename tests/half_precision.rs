//! Every layer on a Flex device configured for f16 (its own test process: a device's dtype is
//! set once per process). Flex's kernels widen halves to f32 and narrow the results back, so
//! outputs and gradients stay f16, are finite, and match the f64 reference (closed forms, or
//! central differences for GSP) on the same f16-rounded inputs within half precision,
//! including a padded token far above the valid ones.

mod common;
mod reference;

use std::sync::Once;

use burn::module::Param;
use burn::tensor::{Bool, DType, Device, FloatDType, Tensor, TensorData};
use burn_pooling::PoolingInput;
use burn_pooling::{AttentionPoolConfig, SimPoolConfig};
use burn_pooling::{
    GapConfig, GemConfig, GroupGemConfig, GroupLayout, GspConfig, LseConfig, TokenMode,
    TokenPoolingConfig,
};
use common::{Rng, assert_close, tensor, values};

const B: usize = 2;
const N: usize = 12;
const C: usize = 8;
/// f16 keeps 11 significant bits (an ulp is ≤ 1e-3 relative): a few ulps of the reference.
const RTOL: f64 = 4e-3;

fn flex_f16() -> Device {
    static CONFIGURE: Once = Once::new();
    common::flex_with(FloatDType::F16, &CONFIGURE)
}

/// A random `[B, N, C]` f16 input and its values after rounding to f16.
fn input(rng: &mut Rng, lo: f64, hi: f64, device: &Device) -> (Tensor<3>, Vec<f64>) {
    let raw: Vec<f64> = (0..B * N * C).map(|_| rng.uniform(lo, hi)).collect();
    let x = tensor(raw, [B, N, C], device);
    assert_eq!(
        x.dtype(),
        DType::F16,
        "the configured device makes f16 tensors"
    );
    let rounded = values(x.clone());
    (x.require_grad(), rounded)
}

/// Sample b's rows `[N][C]`.
fn rows(x: &[f64], b: usize) -> Vec<Vec<f64>> {
    x[b * N * C..(b + 1) * N * C]
        .chunks(C)
        .map(|r| r.to_vec())
        .collect()
}

/// Sample b's channel c.
fn channel(x: &[f64], b: usize, c: usize) -> Vec<f64> {
    (0..N).map(|n| x[(b * N + n) * C + c]).collect()
}

/// The gradient of a half-precision run: f16, finite.
fn half_gradient<const D: usize>(t: Tensor<D>, what: &str) -> Vec<f64> {
    assert_eq!(t.dtype(), DType::F16, "{what}: gradient dtype");
    let v = values(t);
    assert!(
        v.iter().all(|g| g.is_finite()),
        "{what}: non-finite gradient"
    );
    v
}

#[test]
fn gap_and_gem_in_f16_match_the_f64_reference() {
    let device = flex_f16().autodiff();
    let mut rng = Rng::new(61);
    let (x, xs) = input(&mut rng, 0.05, 3.0, &device);

    let gap = GapConfig::new().init().forward_tokens(x.clone());
    let expected: Vec<f64> = (0..B).flat_map(|b| reference::gap(&rows(&xs, b))).collect();
    assert_eq!(gap.dtype(), DType::F16);
    let grads = gap.clone().sum().backward();
    let dx = half_gradient(x.grad(&grads).unwrap(), "GAP dx");
    assert_close(&values(gap), &expected, RTOL, 1e-3, "GAP");
    assert_close(&dx, &vec![1.0 / N as f64; B * N * C], RTOL, 0.0, "GAP dx");

    let p = 3.0;
    let gem = GemConfig::new().with_p(p).init(&device);
    let y = gem.forward_tokens(x.clone());
    assert_eq!(y.dtype(), DType::F16);
    let grads = y.clone().sum().backward();
    let dx = half_gradient(x.grad(&grads).unwrap(), "GeM dx");
    let dp = half_gradient(gem.p.val().grad(&grads).unwrap(), "GeM dp");
    let (mut expected_y, mut expected_dx, mut expected_dp) = (vec![], vec![0.0; B * N * C], 0.0);
    for b in 0..B {
        for c in 0..C {
            let column = channel(&xs, b, c);
            expected_y.push(reference::gem_channel(&column, p, 1e-6));
            let (d, d_p) = reference::gem_channel_grad(&column, p, 1e-6);
            for (n, d) in d.into_iter().enumerate() {
                expected_dx[(b * N + n) * C + c] = d;
            }
            expected_dp += d_p;
        }
    }
    assert_close(&values(y), &expected_y, RTOL, 1e-3, "GeM y");
    assert_close(&dx, &expected_dx, 1e-2, 1e-3, "GeM dx");
    assert_close(&dp, &[expected_dp], 1e-2, 1e-3, "GeM dp");
}

/// GGeM with one padded token far above the valid ones (its power overflows f32 at p = 40):
/// forward, ∂L/∂x (zero on the padding) and ∂L/∂p against the closed forms on the valid tokens.
#[test]
fn masked_group_gem_in_f16_matches_the_f64_reference() {
    let device = flex_f16().autodiff();
    let mut rng = Rng::new(62);
    let padded = 3;
    let raw: Vec<f64> = (0..B * N * C)
        .map(|i| {
            if i / C % N == padded {
                50.0
            } else {
                rng.uniform(0.05, 3.0)
            }
        })
        .collect();
    let x = tensor(raw, [B, N, C], &device);
    let xs = values(x.clone());
    let x = x.require_grad();
    let keep: Vec<bool> = (0..B * N).map(|i| i % N != padded).collect();
    let mask = Tensor::<2, Bool>::from_bool(TensorData::new(keep, [B, N]), &device);
    let (groups, powers) = (2, [1.5, 40.0]);
    let mut layer = GroupGemConfig::new(groups)
        .with_layout(GroupLayout::Interleaved)
        .init(&device);
    layer.p = Param::from_tensor(tensor(powers.to_vec(), [groups], &device));
    let y = layer.forward(PoolingInput::tokens(x.clone()).with_mask(mask));
    let grads = y.clone().sum().backward();
    let dx = half_gradient(x.grad(&grads).unwrap(), "GGeM dx");
    let dp = half_gradient(layer.p.val().grad(&grads).unwrap(), "GGeM dp");

    let (mut expected_y, mut expected_dx, mut expected_dp) =
        (vec![], vec![0.0; B * N * C], vec![0.0; groups]);
    for b in 0..B {
        for c in 0..C {
            let group = reference::group_of(c, C, groups, true);
            let valid: Vec<usize> = (0..N).filter(|&n| n != padded).collect();
            let column: Vec<f64> = valid.iter().map(|&n| xs[(b * N + n) * C + c]).collect();
            expected_y.push(reference::gem_channel(&column, powers[group], 1e-6));
            let (d, d_p) = reference::gem_channel_grad(&column, powers[group], 1e-6);
            for (&n, d) in valid.iter().zip(d) {
                expected_dx[(b * N + n) * C + c] = d;
            }
            expected_dp[group] += d_p;
        }
    }
    assert_close(&values(y), &expected_y, RTOL, 1e-3, "GGeM y");
    // ∂y/∂x at p = 40 carries p times the rounding of ln x.
    assert_close(&dx, &expected_dx, 3e-2, 1e-3, "GGeM dx");
    assert_close(&dp, &expected_dp, 3e-2, 1e-3, "GGeM dp");
}

/// GSP's forward against the reference, and its analytical gradient against central
/// differences of the f64 reference at the f16-rounded point.
#[test]
fn gsp_in_f16_matches_the_f64_reference() {
    let device = flex_f16().autodiff();
    let mut rng = Rng::new(63);
    let k = 4;
    let (x, xs) = input(&mut rng, -1.0, 1.0, &device);
    let prototype_values: Vec<f64> = (0..k * C).map(|_| rng.uniform(-1.0, 1.0)).collect();
    let mut gsp = GspConfig::new(C).with_num_prototypes(k).init(&device);
    gsp.prototypes = Param::from_tensor(tensor(prototype_values, [k, C], &device));
    let prototypes: Vec<Vec<f64>> = values(gsp.prototypes.val())
        .chunks(C)
        .map(|r| r.to_vec())
        .collect();
    let (mu, epsilon) = (gsp.settings.transport_ratio, gsp.settings.epsilon);

    let gy: Vec<f64> = (0..B * C).map(|_| rng.uniform(-1.0, 1.0)).collect();
    let y = gsp.forward_tokens(x.clone());
    assert_eq!(y.dtype(), DType::F16);
    let grads = (y.clone() * tensor(gy.clone(), [B, C], &device))
        .sum()
        .backward();
    let dx = half_gradient(x.grad(&grads).unwrap(), "GSP dx");
    let dprototypes = half_gradient(gsp.prototypes.val().grad(&grads).unwrap(), "GSP dw");

    let mass = reference::uniform_mass(N);
    let mut expected_y = vec![];
    let mut expected_dx = vec![];
    for b in 0..B {
        let sample = rows(&xs, b);
        expected_y.extend(reference::gsp(&sample, &prototypes, &mass, mu, epsilon).pooled);
        let g = &gy[b * C..(b + 1) * C];
        let loss = |v: &[f64]| {
            let v: Vec<Vec<f64>> = v.chunks(C).map(|r| r.to_vec()).collect();
            let pooled = reference::gsp(&v, &prototypes, &mass, mu, epsilon).pooled;
            pooled.iter().zip(g).map(|(a, b)| a * b).sum::<f64>()
        };
        expected_dx.extend(reference::central_difference(&loss, &sample.concat(), 1e-6));
    }
    assert_close(&values(y), &expected_y, RTOL, 2e-3, "GSP pooled");
    let scale = expected_dx.iter().fold(0.0f64, |m, g| m.max(g.abs()));
    assert_close(&dx, &expected_dx, 2e-2, 5e-3 * scale, "GSP dx");

    let loss_of_prototypes = |w: &[f64]| {
        let w: Vec<Vec<f64>> = w.chunks(C).map(|r| r.to_vec()).collect();
        (0..B)
            .map(|b| {
                let pooled = reference::gsp(&rows(&xs, b), &w, &mass, mu, epsilon).pooled;
                let g = &gy[b * C..(b + 1) * C];
                pooled.iter().zip(g).map(|(a, b)| a * b).sum::<f64>()
            })
            .sum::<f64>()
    };
    let expected_dw =
        reference::central_difference(&loss_of_prototypes, &prototypes.concat(), 1e-6);
    let scale = expected_dw.iter().fold(0.0f64, |m, g| m.max(g.abs()));
    assert_close(&dprototypes, &expected_dw, 2e-2, 5e-3 * scale, "GSP dw");
}

/// LSE (r = 10, and r = 0.01 where its channels take the Taylor form) and the token modes in
/// f16, with a padded token at 60000 (near f16's max; exp(r·x) of it overflows): f16 outputs,
/// finite gradients that are zero on the padding, and the f64 reference on the valid tokens.
#[test]
fn lse_and_token_modes_in_f16_match_the_f64_reference() {
    let device = flex_f16().autodiff();
    let mut rng = Rng::new(67);
    let mut raw: Vec<f64> = (0..B * N * C).map(|_| rng.uniform(-2.0, 2.0)).collect();
    raw[(N + 3) * C..(N + 4) * C].fill(60000.0); // sample 1, token 3: padding
    let x = tensor(raw, [B, N, C], &device).require_grad();
    let xs = values(x.clone());
    let keep: Vec<bool> = (0..B * N).map(|i| i != N + 3).collect();
    let mask = Tensor::<2, Bool>::from_bool(TensorData::new(keep.clone(), [B, N]), &device);
    let valid = |b: usize, c: usize| -> Vec<f64> {
        (0..N)
            .filter(|&n| keep[b * N + n])
            .map(|n| xs[(b * N + n) * C + c])
            .collect()
    };
    for r in [10.0, 0.01] {
        let lse = LseConfig::new().with_r(r).init(&device);
        let y = lse.forward(PoolingInput::tokens(x.clone()).with_mask(mask.clone()));
        assert_eq!(y.dtype(), DType::F16);
        let grads = y.clone().sum().backward();
        let dx = half_gradient(x.grad(&grads).unwrap(), "LSE dx");
        half_gradient(lse.rho.val().grad(&grads).unwrap(), "LSE dρ");
        assert!(dx[(N + 3) * C..(N + 4) * C].iter().all(|&g| g == 0.0));
        let expected: Vec<f64> = (0..B)
            .flat_map(|b| (0..C).map(move |c| (b, c)))
            .map(|(b, c)| reference::lse_channel(&valid(b, c), r))
            .collect();
        assert_close(&values(y), &expected, RTOL, 4e-3, &format!("LSE r = {r}"));
    }
    let modes = vec![
        TokenMode::Last,
        TokenMode::MeanSqrtLen,
        TokenMode::WeightedMean,
    ];
    let pool = TokenPoolingConfig::new(modes).init();
    let y = pool.forward(PoolingInput::tokens(x.clone()).with_mask(mask));
    assert_eq!(y.dtype(), DType::F16);
    let grads = y.clone().sum().backward();
    let dx = half_gradient(x.grad(&grads).unwrap(), "modes dx");
    assert!(dx[(N + 3) * C..(N + 4) * C].iter().all(|&g| g == 0.0));
    let expected: Vec<f64> = (0..B)
        .flat_map(|b| {
            let sample: Vec<Vec<f64>> = rows(&xs, b);
            let valid: Vec<bool> = keep[b * N..(b + 1) * N].to_vec();
            ["last", "mean_sqrt_len", "weighted_mean"]
                .into_iter()
                .flat_map(move |m| reference::token_mode(&sample, &valid, 0, m))
                .collect::<Vec<_>>()
        })
        .collect();
    assert_close(&values(y), &expected, 1e-2, 1e-2, "token modes");
}

/// MAP and SimPool (γ = 1.25 with β) in f16 with one padded token at 60000 (whose logit would
/// overflow f16): −∞ masking gives it zero weight and zero gradient, and the outputs match
/// the f64 reference on the f16 parameters and inputs; the gradients stay f16 and finite.
#[test]
fn attention_pooling_in_f16_masks_with_minus_infinity() {
    let device = flex_f16().autodiff();
    let mut rng = Rng::new(71);
    let mut raw: Vec<f64> = (0..B * N * C).map(|_| rng.uniform(-2.0, 2.0)).collect();
    raw[(N + 3) * C..(N + 4) * C].fill(60000.0); // sample 1, token 3: padding
    let x = tensor(raw, [B, N, C], &device).require_grad();
    let xs = values(x.clone());
    let keep: Vec<bool> = (0..B * N).map(|i| i != N + 3).collect();
    let mask = Tensor::<2, Bool>::from_bool(TensorData::new(keep.clone(), [B, N]), &device);
    let valid_rows = |b: usize| -> Vec<Vec<f64>> {
        rows(&xs, b)
            .into_iter()
            .enumerate()
            .filter(|(n, _)| keep[b * N + n])
            .map(|(_, r)| r)
            .collect()
    };
    let input = || PoolingInput::tokens(x.clone()).with_mask(mask.clone());
    let linear = |l: &burn::nn::Linear| {
        vec![
            values(l.weight.val()),
            l.bias.as_ref().map_or(vec![0.0; C], |b| values(b.val())),
        ]
    };

    let map = AttentionPoolConfig::new(C).with_num_heads(2).init(&device);
    let y = map.forward(input());
    assert_eq!(y.dtype(), DType::F16);
    let grads = y.clone().sum().backward();
    let dx = half_gradient(x.grad(&grads).unwrap(), "MAP dx");
    assert!(dx[(N + 3) * C..(N + 4) * C].iter().all(|&g| g == 0.0));
    let norm = map.norm.as_ref().unwrap();
    let mut fields = vec![values(map.latent.val())];
    for l in [&map.query, &map.key, &map.value, &map.projection] {
        fields.extend(linear(l));
    }
    fields.push(values(norm.gamma.val()));
    fields.push(values(norm.beta.as_ref().unwrap().val()));
    fields.push(values(map.fc1.weight.val()));
    fields.push(values(map.fc1.bias.as_ref().unwrap().val()));
    fields.push(values(map.fc2.weight.val()));
    fields.push(values(map.fc2.bias.as_ref().unwrap().val()));
    let params = reference::MapParams {
        channels: C,
        heads: 2,
        latents: 1,
        hidden: 4 * C,
        eps: 1e-6,
        norm: true,
        mean_latents: false,
        fields,
    };
    let expected: Vec<f64> = (0..B)
        .flat_map(|b| reference::map_pool(&valid_rows(b), &params))
        .collect();
    assert_close(&values(y), &expected, 2e-2, 2e-2, "MAP");

    let sim = SimPoolConfig::new(C)
        .with_gamma(Some(1.25))
        .with_learnable_shift(true)
        .init(&device);
    let y = sim.forward(input());
    assert_eq!(y.dtype(), DType::F16);
    let grads = y.clone().sum().backward();
    let dx = half_gradient(x.grad(&grads).unwrap(), "SimPool dx");
    half_gradient(
        sim.beta.as_ref().unwrap().val().grad(&grads).unwrap(),
        "SimPool dβ",
    );
    assert!(dx[(N + 3) * C..(N + 4) * C].iter().all(|&g| g == 0.0));
    let mut fields = vec![
        values(sim.norm.gamma.val()),
        values(sim.norm.beta.as_ref().unwrap().val()),
    ];
    fields.extend(linear(&sim.query));
    fields.extend(linear(&sim.key));
    fields.push(vec![0.0]);
    let params = reference::SimPoolParams {
        eps: 1e-6,
        gamma: Some(1.25),
        shift: true,
        fields,
    };
    let expected: Vec<f64> = (0..B)
        .flat_map(|b| reference::simpool(&valid_rows(b), &params))
        .collect();
    assert_close(&values(y), &expected, 2e-2, 2e-2, "SimPool");
}

/// NetVLAD V1 and V2 in f16 on masked tokens with a padded token far above the valid ones:
/// f16 outputs and gradients, finite, zero gradient at the padding, and the f64 reference on
/// the f16-rounded inputs and parameters.
#[test]
fn netvlad_in_half_precision() {
    use burn_pooling::{NetVlad, NetVladConfig, NetVladVersion};
    let device = flex_f16().autodiff();
    let k = 4;
    let mut rng = Rng::new(71);
    let mut raw: Vec<f64> = (0..B * N * C).map(|_| rng.uniform(-1.0, 1.0)).collect();
    raw[(N + 3) * C..(N + 4) * C].fill(60000.0); // sample 1, token 3: padding
    let x = tensor(raw, [B, N, C], &device).require_grad();
    let xs = values(x.clone());
    let keep: Vec<bool> = (0..B * N).map(|i| i != N + 3).collect();
    let mask = Tensor::<2, Bool>::from_bool(TensorData::new(keep.clone(), [B, N]), &device);
    for version in [NetVladVersion::V1, NetVladVersion::V2] {
        let v2 = version == NetVladVersion::V2;
        let half = |v: Vec<f64>, shape: [usize; 2]| tensor(v, shape, &device);
        let centroids = half((0..k * C).map(|_| rng.uniform(-0.5, 0.5)).collect(), [k, C]);
        let weights = half((0..k * C).map(|_| rng.uniform(-2.0, 2.0)).collect(), [k, C]);
        let bias: Vec<f64> = (0..k).map(|_| rng.uniform(-0.5, 0.5)).collect();
        let bias = tensor(bias, [k], &device);
        let layer = NetVladConfig::new(C)
            .with_num_clusters(k)
            .with_version(version)
            .init(&device);
        let layer = NetVlad {
            centroids: Param::from_tensor(centroids.clone()),
            assignment: Some(Param::from_tensor(weights.clone())),
            bias: v2.then(|| Param::from_tensor(bias.clone())),
            ..layer
        };
        let y = layer.forward(PoolingInput::tokens(x.clone()).with_mask(mask.clone()));
        assert_eq!(y.dtype(), DType::F16);
        let grads = y.clone().sum().backward();
        let dx = half_gradient(x.grad(&grads).unwrap(), "NetVLAD dx");
        half_gradient(layer.centroids.val().grad(&grads).unwrap(), "NetVLAD dc");
        assert!(dx[(N + 3) * C..(N + 4) * C].iter().all(|&g| g == 0.0));
        let matrix =
            |t: Tensor<2>| -> Vec<Vec<f64>> { values(t).chunks(C).map(|r| r.to_vec()).collect() };
        let (c, w) = (matrix(centroids), matrix(weights));
        let b = if v2 { values(bias) } else { vec![0.0; k] };
        let expected: Vec<f64> = (0..B)
            .flat_map(|s| {
                let valid: Vec<Vec<f64>> = rows(&xs, s)
                    .into_iter()
                    .enumerate()
                    .filter(|(n, _)| keep[s * N + n])
                    .map(|(_, r)| r)
                    .collect();
                reference::netvlad(&valid, &c, &w, &b, !v2)
            })
            .collect();
        let got = values(y);
        let error = common::max_abs_difference(&got, &expected);
        println!("NetVLAD {version:?} f16: max |y − f64 reference| = {error:.2e}");
        assert_close(&got, &expected, RTOL, 2e-3, &format!("NetVLAD {version:?}"));
    }
}

/// OTK (two heads of three references, ε = 0.1) in f16 on masked tokens with a padded token
/// far above the valid ones: an f16 output and gradients, finite, zero gradient at the
/// padding, and the f64 reference on the f16-rounded inputs and references (the solve to a
/// 1e-3 tolerance, which f16 reaches).
#[test]
fn otk_in_half_precision() {
    use burn_pooling::{Otk, OtkConfig};
    let device = flex_f16().autodiff();
    let (p, heads) = (3, 2);
    let mut rng = Rng::new(73);
    let mut raw: Vec<f64> = (0..B * N * C).map(|_| rng.uniform(-1.0, 1.0)).collect();
    raw[(N + 3) * C..(N + 4) * C].fill(60000.0); // sample 1, token 3: padding
    let x = tensor(raw, [B, N, C], &device).require_grad();
    let xs = values(x.clone());
    let keep: Vec<bool> = (0..B * N).map(|i| i != N + 3).collect();
    let mask = Tensor::<2, Bool>::from_bool(TensorData::new(keep.clone(), [B, N]), &device);
    let z = tensor(
        (0..heads * p * C).map(|_| rng.uniform(-0.5, 0.5)).collect(),
        [heads, p, C],
        &device,
    );
    let layer = OtkConfig::new(C)
        .with_num_references(p)
        .with_heads(heads)
        .with_tolerance(1e-3)
        .init(&device);
    let layer = Otk {
        references: Param::from_tensor(z.clone()),
        ..layer
    };
    let y = layer.forward(PoolingInput::tokens(x.clone()).with_mask(mask));
    assert_eq!(y.dtype(), DType::F16);
    let grads = y.clone().sum().backward();
    let dx = half_gradient(x.grad(&grads).unwrap(), "OTK dx");
    half_gradient(layer.references.val().grad(&grads).unwrap(), "OTK dz");
    assert!(dx[(N + 3) * C..(N + 4) * C].iter().all(|&g| g == 0.0));
    let nested: Vec<Vec<Vec<f64>>> = values(z)
        .chunks(p * C)
        .map(|head| head.chunks(C).map(|r| r.to_vec()).collect())
        .collect();
    let expected: Vec<f64> = (0..B)
        .flat_map(|s| {
            let valid: Vec<Vec<f64>> = rows(&xs, s)
                .into_iter()
                .enumerate()
                .filter(|(n, _)| keep[s * N + n])
                .map(|(_, r)| r)
                .collect();
            reference::otk(&valid, &nested, 0.1)
        })
        .collect();
    let got = values(y);
    let error = common::max_abs_difference(&got, &expected);
    println!("OTK f16: max |y − f64 reference| = {error:.2e}");
    assert_close(&got, &expected, RTOL, 5e-3, "OTK");
}

/// SALAD's OtAggregation in f16 (m = 3, l = 4, no global token, dropout off) on masked tokens
/// with a padded token far above the valid ones: f16 outputs and gradients, finite, zero
/// gradient at the padding, and the f64 reference on the f16-rounded inputs and parameters.
#[test]
fn ot_aggregation_in_half_precision() {
    use burn::nn::Linear;
    use burn_pooling::{OtAggregation, OtAggregationConfig, OtSinkhorn};
    use reference::{SaladIterations, SaladParams};
    let device = flex_f16().autodiff();
    let (m, l, hidden) = (3, 4, 6);
    let mut rng = Rng::new(73);
    let mut raw: Vec<f64> = (0..B * N * C).map(|_| rng.uniform(-1.0, 1.0)).collect();
    raw[(N + 3) * C..(N + 4) * C].fill(60000.0); // sample 1, token 3: padding
    let x = tensor(raw, [B, N, C], &device).require_grad();
    let xs = values(x.clone());
    let keep: Vec<bool> = (0..B * N).map(|i| i != N + 3).collect();
    let mask = Tensor::<2, Bool>::from_bool(TensorData::new(keep.clone(), [B, N]), &device);
    // Each layer as f16 tensors and as their f16-rounded values for the reference.
    let mut linear = |d_in: usize, d_out: usize| {
        let w = tensor(
            (0..d_in * d_out).map(|_| rng.uniform(-0.8, 0.8)).collect(),
            [d_in, d_out],
            &device,
        );
        let b = tensor(
            (0..d_out).map(|_| rng.uniform(-0.3, 0.3)).collect(),
            [d_out],
            &device,
        );
        let rounded = (
            values(w.clone())
                .chunks(d_out)
                .map(|r| r.to_vec())
                .collect::<Vec<_>>(),
            values(b.clone()),
        );
        let layer = Linear {
            weight: Param::from_tensor(w),
            bias: Some(Param::from_tensor(b)),
        };
        (layer, rounded)
    };
    let (fh, fh_r) = linear(C, hidden);
    let (fo, fo_r) = linear(hidden, l);
    let (sh, sh_r) = linear(C, hidden);
    let (so, so_r) = linear(hidden, m);
    let layer = OtAggregationConfig::new(C)
        .with_num_clusters(m)
        .with_cluster_dim(l)
        .with_hidden_dim(hidden)
        .with_token_dim(None)
        .with_dropout(0.0)
        .with_num_prefix_tokens(0)
        .with_sinkhorn(OtSinkhorn::Converged {
            max_iterations: 200,
            tolerance: 1e-3,
        })
        .init(&device);
    let layer = OtAggregation {
        features_hidden: fh,
        features_out: fo,
        scores_hidden: sh,
        scores_out: so,
        ..layer
    };
    let y = layer.forward(PoolingInput::tokens(x.clone()).with_mask(mask));
    assert_eq!(y.dtype(), DType::F16);
    let grads = y.clone().sum().backward();
    let dx = half_gradient(x.grad(&grads).unwrap(), "OtAggregation dx");
    half_gradient(
        layer.scores_hidden.weight.val().grad(&grads).unwrap(),
        "OtAggregation dW_s1",
    );
    assert!(dx[(N + 3) * C..(N + 4) * C].iter().all(|&g| g == 0.0));
    let params = SaladParams {
        features_hidden: fh_r,
        features_out: fo_r,
        scores_hidden: sh_r,
        scores_out: so_r,
        token: None,
        dustbin: 1.0,
        epsilon: 1.0,
    };
    let expected: Vec<f64> = (0..B)
        .flat_map(|s| {
            let valid: Vec<Vec<f64>> = rows(&xs, s)
                .into_iter()
                .enumerate()
                .filter(|(n, _)| keep[s * N + n])
                .map(|(_, r)| r)
                .collect();
            reference::salad(&valid, None, &params, SaladIterations::Converged)
        })
        .collect();
    let got = values(y);
    let error = common::max_abs_difference(&got, &expected);
    println!("OtAggregation f16: max |y − f64 reference| = {error:.2e}");
    assert_close(&got, &expected, RTOL, 2e-3, "OtAggregation");
}
