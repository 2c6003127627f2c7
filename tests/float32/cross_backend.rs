//! Flex, NdArray and wgpu (lavapipe without a GPU) give the same outputs and gradients for
//! every layer, in f32, within 1e-4 relative + 1e-5 absolute. The GSP gradients use the
//! analytical backward on every backend here (`extension_covers` is asserted).
#![cfg(any(feature = "ndarray", feature = "wgpu"))]

use crate::common;
use burn::module::{Module, Param};
use burn::tensor::{Bool, Device, Tensor, TensorData};
use burn_pooling::PoolingInput;
use burn_pooling::loss::{ZeroShotLossConfig, ZeroShotSplit};
use burn_pooling::ops::extension_covers;
use burn_pooling::{
    AttentionPool, AttentionPoolConfig, AttentionPoolOutput, SimPool, SimPoolConfig,
};
use burn_pooling::{
    GapConfig, GapGmpConfig, GemConfig, GmpConfig, GroupGemConfig, Gsp, GspConfig, LseConfig,
    LseOutput, TokenMode, TokenPoolingConfig,
};
use burn_pooling::{NetVlad, NetVladConfig, NetVladVersion};
use burn_pooling::{OtAggregation, OtAggregationConfig, OtSinkhorn};
use burn_pooling::{Otk, OtkConfig};
use common::{Rng, assert_close, values};

fn devices() -> Vec<(&'static str, Device)> {
    let mut devices = vec![("flex", Device::flex())];
    #[cfg(feature = "ndarray")]
    #[allow(deprecated)] // NdArray is deprecated in Burn 0.22, still supported here.
    devices.push(("ndarray", Device::ndarray()));
    #[cfg(feature = "wgpu")]
    devices.push((
        "wgpu",
        Device::wgpu(burn::tensor::DeviceKind::DefaultDevice),
    ));
    devices
}

fn floats<const D: usize>(values: &[f64], shape: [usize; D], device: &Device) -> Tensor<D> {
    let values: Vec<f32> = values.iter().map(|&v| v as f32).collect();
    Tensor::from_data(TensorData::new(values, shape), device)
}

/// Every output and gradient of the layers on one device, flattened and labelled.
fn outcome(device: &Device) -> Vec<(&'static str, Vec<f64>)> {
    let device = device.clone().autodiff();
    let mut rng = Rng::new(11);
    let (b, n, c, k) = (2, 6, 8, 3);
    let x: Vec<f64> = (0..b * n * c).map(|_| rng.uniform(-0.5, 1.5)).collect();
    let prototypes: Vec<f64> = (0..k * c).map(|_| rng.uniform(-0.5, 0.8)).collect();
    let mut out = Vec::new();

    let maps = floats(&x, [b, c, 2, 3], &device).require_grad();
    let y = GapConfig::new().init().forward(maps.clone());
    out.push(("gap y", values(y.clone())));
    let grads = y.sum().backward();
    out.push(("gap dx", values(maps.grad(&grads).unwrap())));

    let gem = GemConfig::new().init(&device);
    let tokens = floats(&x, [b, n, c], &device).require_grad();
    let y = gem.forward_tokens(tokens.clone());
    out.push(("gem y", values(y.clone())));
    let grads = y.sum().backward();
    out.push(("gem dx", values(tokens.grad(&grads).unwrap())));
    out.push(("gem dp", values(gem.p.val().grad(&grads).unwrap())));

    let ggem = GroupGemConfig::new(4)
        .with_num_prefix_tokens(1)
        .init(&device);
    let tokens = floats(&x, [b, n, c], &device).require_grad();
    let mask = Tensor::<2, Bool>::from_bool(
        TensorData::new(
            vec![
                true, true, true, false, true, true, true, true, true, true, true, false,
            ],
            [b, n],
        ),
        &device,
    );
    let y = ggem.forward(PoolingInput::tokens(tokens.clone()).with_mask(mask.clone()));
    out.push(("ggem y", values(y.clone())));
    let grads = y.sum().backward();
    out.push(("ggem dx", values(tokens.grad(&grads).unwrap())));
    out.push(("ggem dp", values(ggem.p.val().grad(&grads).unwrap())));

    // LSE at a near-max, a middle and a Taylor-regime temperature, both outputs, masked with
    // a prefix; the token modes, all six.
    for (r, output, label) in [
        (30.0, LseOutput::LogSumExp, "lse r=30"),
        (2.0, LseOutput::SoftmaxMean, "softmax mean r=2"),
        (1e-3, LseOutput::LogSumExp, "lse r=1e-3"),
    ] {
        let lse = LseConfig::new()
            .with_r(r)
            .with_r_min(1e-6)
            .with_output(output)
            .with_num_prefix_tokens(1)
            .init(&device);
        let tokens = floats(&x, [b, n, c], &device).require_grad();
        let y = lse.forward(PoolingInput::tokens(tokens.clone()).with_mask(mask.clone()));
        out.push((label, values(y.clone())));
        let grads = y.sum().backward();
        out.push((label, values(tokens.grad(&grads).unwrap())));
        out.push((label, values(lse.rho.val().grad(&grads).unwrap())));
    }
    let modes = TokenMode::ALL.to_vec();
    let pool = TokenPoolingConfig::new(modes)
        .with_num_prefix_tokens(1)
        .init();
    let tokens = floats(&x, [b, n, c], &device).require_grad();
    let y = pool.forward(PoolingInput::tokens(tokens.clone()).with_mask(mask.clone()));
    out.push(("token modes y", values(y.clone())));
    let grads = (y.clone() * y).sum().backward();
    out.push(("token modes dx", values(tokens.grad(&grads).unwrap())));

    assert!(extension_covers(&device), "{device:?}");
    let gsp = GspConfig::new(c).with_num_prototypes(k).init(&device);
    let gsp = Gsp {
        prototypes: Param::from_tensor(floats(&prototypes, [k, c], &device)),
        ..gsp
    };
    let maps = floats(&x, [b, c, 2, 3], &device).require_grad();
    let detailed = gsp.forward_detailed(maps.clone());
    out.push(("gsp y", values(detailed.pooled.clone())));
    out.push(("gsp w", values(detailed.weights.clone())));
    let tokens = floats(&x, [b, n, c], &device).require_grad();
    let masked = gsp.forward_detailed(PoolingInput::tokens(tokens.clone()).with_mask(mask));
    out.push(("gsp masked y", values(masked.pooled.clone())));

    let zsr = ZeroShotLossConfig::new(4, 5).init(&device);
    let zsr = burn_pooling::loss::ZeroShotLoss {
        embeddings: Param::from_tensor(floats(
            &(0..20).map(|_| rng.uniform(-1.0, 1.0)).collect::<Vec<_>>(),
            [4, 5],
            &device,
        )),
        ..zsr
    };
    let labels = Tensor::<1, burn::tensor::Int>::from_data([0i64, 1, 2, 3], &device);
    let four = Tensor::cat(
        vec![detailed.attributes.clone(), masked.attributes.clone()],
        0,
    );
    let loss = detailed.pooled.clone().sum()
        + masked.pooled.sum()
        + zsr.forward(four, labels, &ZeroShotSplit::Halves);
    out.push(("loss", values(loss.clone())));
    let grads = loss.backward();
    out.push(("gsp dx maps", values(maps.grad(&grads).unwrap())));
    out.push(("gsp dx tokens", values(tokens.grad(&grads).unwrap())));
    out.push((
        "gsp dprototypes",
        values(gsp.prototypes.val().grad(&grads).unwrap()),
    ));
    out.push((
        "zsr dembeddings",
        values(zsr.embeddings.val().grad(&grads).unwrap()),
    ));

    // NetVLAD, V1 and V2, decoupled and tied, on masked tokens with a prefix and on maps:
    // outputs and the gradients of the input and of every parameter.
    let weights: Vec<f64> = (0..k * c).map(|_| rng.uniform(-1.0, 1.0)).collect();
    let bias: Vec<f64> = (0..k).map(|_| rng.uniform(-0.5, 0.5)).collect();
    let mask = Tensor::<2, Bool>::from_bool(
        TensorData::new(
            vec![
                true, true, true, false, true, true, true, true, false, true, true, false,
            ],
            [b, n],
        ),
        &device,
    );
    for version in [NetVladVersion::V1, NetVladVersion::V2] {
        for decoupled in [true, false] {
            let layer = NetVladConfig::new(c)
                .with_num_clusters(k)
                .with_version(version)
                .with_alpha(3.0)
                .with_decoupled(decoupled)
                .with_num_prefix_tokens(1)
                .init(&device);
            let layer = NetVlad {
                centroids: Param::from_tensor(floats(&prototypes, [k, c], &device)),
                assignment: decoupled
                    .then(|| Param::from_tensor(floats(&weights, [k, c], &device))),
                bias: (decoupled && version == NetVladVersion::V2)
                    .then(|| Param::from_tensor(floats(&bias, [k], &device))),
                ..layer
            };
            let tokens = floats(&x, [b, n, c], &device).require_grad();
            let y = layer.forward(PoolingInput::tokens(tokens.clone()).with_mask(mask.clone()));
            let maps = floats(&x, [b, c, 2, 3], &device).require_grad();
            let z = layer.forward(maps.clone());
            out.push(("netvlad y", values(y.clone())));
            out.push(("netvlad maps y", values(z.clone())));
            let g = floats(
                &(0..b * k * c)
                    .map(|i| ((i * 7) % 5) as f64 - 2.0)
                    .collect::<Vec<_>>(),
                [b, k * c],
                &device,
            );
            let grads = ((y + z) * g).sum().backward();
            out.push(("netvlad dx", values(tokens.grad(&grads).unwrap())));
            out.push(("netvlad dx maps", values(maps.grad(&grads).unwrap())));
            out.push((
                "netvlad dcentroids",
                values(layer.centroids.val().grad(&grads).unwrap()),
            ));
            if let Some(w) = &layer.assignment {
                out.push(("netvlad dw", values(w.val().grad(&grads).unwrap())));
            }
            if let Some(bias) = &layer.bias {
                out.push(("netvlad db", values(bias.val().grad(&grads).unwrap())));
            }
        }
    }
    out
}

#[test]
fn backends_agree_on_outputs_and_gradients() {
    let devices = devices();
    let (_, flex) = &devices[0];
    let expected = outcome(flex);
    for (name, device) in &devices[1..] {
        let actual = outcome(device);
        for ((label, a), (_, e)) in actual.iter().zip(&expected) {
            assert!(a.iter().all(|v| v.is_finite()), "{name} {label}: {a:?}");
            assert_close(a, e, 1e-4, 1e-5, &format!("{name} vs flex: {label}"));
        }
        println!(
            "{name}: {} outputs and gradients agree with flex",
            actual.len()
        );
    }
}

/// A padded token far above every valid one, at a large p (200: (50 / 2)^199 overflows f32):
/// `exp` overflows on it, and a mask
/// multiplying the overflow gives 0·∞ = NaN. Every backend must give it zero gradient, keep
/// the output and the other gradients finite, and agree with Flex.
#[test]
fn padded_outliers_get_zero_gradient_on_every_backend() {
    let (b, n, c) = (2, 5, 4);
    let mut x: Vec<f64> = (0..b * n * c)
        .map(|i| 0.5 + (i % 7) as f64 * 0.25)
        .collect();
    let padded = |i: usize| (i / c).is_multiple_of(n);
    for (i, v) in x.iter_mut().enumerate() {
        if padded(i) {
            *v = 50.0;
        }
    }
    let keep: Vec<bool> = (0..b * n).map(|i| i % n != 0).collect();
    let mut flex: Option<Vec<Vec<f64>>> = None;
    for (name, device) in devices() {
        let device = device.autodiff();
        let gem = GemConfig::new().with_p(200.0).init(&device);
        let tokens = floats(&x, [b, n, c], &device).require_grad();
        let mask = Tensor::<2, Bool>::from_bool(TensorData::new(keep.clone(), [b, n]), &device);
        let y = gem.forward(PoolingInput::tokens(tokens.clone()).with_mask(mask));
        let grads = y.clone().sum().backward();
        let dx = values(tokens.grad(&grads).unwrap());
        let outcome = vec![
            values(y),
            dx.clone(),
            values(gem.p.val().grad(&grads).unwrap()),
        ];
        for (label, v) in ["y", "dx", "dp"].iter().zip(&outcome) {
            assert!(v.iter().all(|v| v.is_finite()), "{name} {label}: {v:?}");
        }
        for (i, &d) in dx.iter().enumerate() {
            assert!(
                !padded(i) || d == 0.0,
                "{name}: dx[{i}] of a padded token is {d}"
            );
        }
        match &flex {
            None => flex = Some(outcome),
            Some(expected) => {
                for ((label, a), e) in ["y", "dx", "dp"].iter().zip(&outcome).zip(expected) {
                    assert_close(a, e, 1e-4, 1e-5, &format!("{name} vs flex: {label}"));
                }
            }
        }
    }
}

/// The layers by name, for the tests below: the output of `tokens` `[B, N, C]` (with `mask`
/// when given) on `device`, or with `maps` of the same values as feature maps `[B, C, 1, N]`
/// (the channels-first kernels), and GSP's prototypes (to read their gradient).
fn pool(
    layer: &str,
    tokens: Tensor<3>,
    maps: bool,
    mask: Option<Tensor<2, Bool>>,
    device: &Device,
) -> (Tensor<2>, Option<Tensor<2>>) {
    let [b, n, c] = tokens.dims();
    let input = if maps {
        PoolingInput::maps(tokens.swap_dims(1, 2).reshape([b, c, 1, n]))
    } else {
        PoolingInput::tokens(tokens)
    };
    let input = match mask {
        Some(mask) => input.with_mask(mask),
        None => input,
    };
    match layer {
        "gap" => (GapConfig::new().init().forward(input), None),
        "gmp" => (GmpConfig::new().init().forward(input), None),
        "gap_gmp" => (GapGmpConfig::new().init().forward(input), None),
        "gem" => (GemConfig::new().init(device).forward(input), None),
        "ggem" => (GroupGemConfig::new(2).init(device).forward(input), None),
        "gsp" => {
            let mut rng = Rng::new(5);
            let prototypes: Vec<f64> = (0..3 * c).map(|_| rng.uniform(-0.6, 0.9)).collect();
            let gsp = Gsp {
                prototypes: Param::from_tensor(floats(&prototypes, [3, c], device)),
                ..GspConfig::new(c).with_num_prototypes(3).init(device)
            };
            (gsp.forward(input), Some(gsp.prototypes.val()))
        }
        other => panic!("unknown layer {other}"),
    }
}

const LAYERS: [&str; 6] = ["gap", "gmp", "gap_gmp", "gem", "ggem", "gsp"];

/// y, ∂L/∂x and (GSP) ∂L/∂prototypes of L = Σ y ⊙ r (r fixed, uneven) for tokens `x`
/// `[B, N, C]` with an optional mask.
fn outputs_and_gradients(
    layer: &str,
    x: &[f64],
    dims: [usize; 3],
    mask: Option<&[bool]>,
    device: &Device,
) -> Vec<Vec<f64>> {
    outputs_and_gradients_of(layer, x, dims, false, mask, device)
}

/// [`outputs_and_gradients`], of the tokens pooled as maps when `maps`.
fn outputs_and_gradients_of(
    layer: &str,
    x: &[f64],
    dims: [usize; 3],
    maps: bool,
    mask: Option<&[bool]>,
    device: &Device,
) -> Vec<Vec<f64>> {
    let device = device.clone().autodiff();
    let tokens = floats(x, dims, &device).require_grad();
    let mask = mask.map(|keep| {
        Tensor::<2, Bool>::from_bool(TensorData::new(keep.to_vec(), [dims[0], dims[1]]), &device)
    });
    let (y, prototypes) = pool(layer, tokens.clone(), maps, mask, &device);
    let [b, width] = y.dims();
    let r: Vec<f64> = (0..b * width).map(|i| 0.5 + (i % 5) as f64 * 0.3).collect();
    let grads = (y.clone() * floats(&r, [b, width], &device))
        .sum()
        .backward();
    let mut out = vec![values(y), values(tokens.grad(&grads).unwrap())];
    if let Some(prototypes) = prototypes {
        out.push(values(prototypes.grad(&grads).unwrap()));
    }
    out
}

/// Issue #20: garbage at padded positions (NaN, ±∞, the largest float) never reaches an output
/// or a gradient, on any layer or backend: the outputs and gradients equal those with 0 there,
/// and the padded positions' gradient is exactly 0. (Before, GAP, GAP+GMP and GSP weighed the
/// padding by 0, and 0·NaN = NaN.)
#[test]
fn padding_garbage_never_leaks() {
    let (b, n, c) = (2, 5, 4);
    let mut rng = Rng::new(21);
    let clean: Vec<f64> = (0..b * n * c).map(|_| rng.uniform(-0.5, 1.5)).collect();
    // Sample 0 pads positions 1 and 4, sample 1 position 0.
    let keep: Vec<bool> = (0..b * n).map(|i| ![1, 4, 5].contains(&i)).collect();
    let padded = |i: usize| !keep[i / c];
    for (name, device) in devices() {
        for (layer, maps) in LAYERS
            .iter()
            .flat_map(|&layer| [(layer, false), (layer, true)])
        {
            let run = |x: &[f64]| {
                outputs_and_gradients_of(layer, x, [b, n, c], maps, Some(&keep), &device)
            };
            let expected = run(&clean);
            for garbage in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 3e38] {
                let x: Vec<f64> = clean
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| if padded(i) { garbage } else { v })
                    .collect();
                let actual = run(&x);
                let layout = if maps { "maps" } else { "tokens" };
                let what = format!("{name} {layer} ({layout}) with {garbage} padding");
                for (part, (a, e)) in ["y", "dx", "dprototypes"]
                    .iter()
                    .zip(actual.iter().zip(&expected))
                {
                    assert!(a.iter().all(|v| v.is_finite()), "{what}: {part} {a:?}");
                    assert_close(a, e, 1e-6, 1e-7, &format!("{what}: {part}"));
                }
                for (i, &d) in actual[1].iter().enumerate() {
                    assert!(!padded(i) || d == 0.0, "{what}: dx[{i}] = {d} at padding");
                }
            }
        }
    }
}

/// Issue #20: φ(v) = v / max(1, ‖v‖) computes the norm without overflow. φ(cv) = φ(v) for v
/// outside the unit ball, so the costs of features scaled by c = 2¹⁰⁰ (squared norms far past
/// f32's range) equal those of the features, and their gradients are 1/c times as large (the
/// prototypes' equal), on every backend. (Before, ‖v‖² = ∞ gave φ = 0.)
#[test]
fn costs_of_huge_features_are_those_of_their_direction() {
    use burn_pooling::Layout;
    use burn_pooling::transport::transport_costs;
    let (b, n, c, k) = (2, 5, 6, 3);
    let scale = 2f64.powi(100);
    let mut rng = Rng::new(8);
    // Norms above 1 (entries in [0.6, 1.6] in absolute value), signs mixed.
    let x: Vec<f64> = (0..b * n * c)
        .map(|i| rng.uniform(0.6, 1.6) * if i % 3 == 0 { -1.0 } else { 1.0 })
        .collect();
    let huge: Vec<f64> = x.iter().map(|v| v * scale).collect();
    let prototypes: Vec<f64> = (0..k * c).map(|_| rng.uniform(-0.7, 0.7)).collect();
    let weights: Vec<f64> = (0..b * k * n).map(|_| rng.uniform(-1.0, 1.0)).collect();
    for (name, device) in devices() {
        let device = device.autodiff();
        for layout in [Layout::ChannelsLast, Layout::ChannelsFirst] {
            let dims = layout.dims(b, n, c);
            let run = |x: &[f64], prototypes: &[f64]| {
                let x = floats(x, dims, &device).require_grad();
                let w = floats(prototypes, [k, c], &device).require_grad();
                let costs = transport_costs(x.clone(), w.clone(), layout);
                let loss = (costs.clone() * floats(&weights, [b, k, n], &device)).sum();
                let grads = loss.backward();
                let (dx, dw) = (x.grad(&grads).unwrap(), w.grad(&grads).unwrap());
                (values(costs), values(dx), values(dw))
            };
            let (costs, dx, dw) = run(&x, &prototypes);
            let (huge_costs, huge_dx, huge_dw) = run(&huge, &prototypes);
            let what = format!("{name} {layout:?}");
            assert_close(&huge_costs, &costs, 1e-5, 1e-6, &format!("{what}: costs"));
            let rescaled: Vec<f64> = huge_dx.iter().map(|d| d * scale).collect();
            assert_close(&rescaled, &dx, 1e-4, 1e-6, &format!("{what}: dx · 2^100"));
            assert_close(&huge_dw, &dw, 1e-4, 1e-6, &format!("{what}: dprototypes"));
            // Huge prototypes are the same points too.
            let huge_prototypes: Vec<f64> = prototypes.iter().map(|v| v * 1e30).collect();
            let (far_costs, _, far_dw) = run(&x, &huge_prototypes);
            // φ of a prototype with norm < 1 is itself, of 1e30 times it its direction: the
            // costs differ, but must be those of the unit directions, and finite.
            let directions: Vec<f64> = prototypes
                .chunks(c)
                .flat_map(|row| {
                    let norm = row.iter().map(|v| v * v).sum::<f64>().sqrt();
                    row.iter().map(move |v| v / norm)
                })
                .collect();
            let (direction_costs, _, _) = run(&x, &directions);
            assert_close(
                &far_costs,
                &direction_costs,
                1e-5,
                1e-6,
                &format!("{what}: costs to huge prototypes"),
            );
            // φ's Jacobian at cω is 1/c times a matrix that does not depend on c once cω is
            // outside the unit ball: 1e30 (rescaled by Flex) and 1e5 (not) agree.
            let near_prototypes: Vec<f64> = prototypes.iter().map(|v| v * 1e5).collect();
            let (_, _, near_dw) = run(&x, &near_prototypes);
            let far: Vec<f64> = far_dw.iter().map(|d| d * 1e30).collect();
            let near: Vec<f64> = near_dw.iter().map(|d| d * 1e5).collect();
            assert_close(
                &far,
                &near,
                1e-4,
                1e-6,
                &format!("{what}: dprototypes · scale"),
            );
        }
    }
}

/// Issue #20: GSP's weights are the transported masses over μ summed from the plan: at
/// μ = 1e-6 they sum to 1 and match their limit μ → 0, the softmax over positions of
/// ℓ_n = logsumexp_k(−c_kn / ε) (attention pooling; off by O(μN) here), computed in f64, on
/// every backend. (a − ρ lost several per cent to cancellation in f32.)
#[test]
fn gsp_weights_at_tiny_transport_ratio_sum_to_one() {
    let (b, n, c, k, epsilon) = (2, 16, 6, 3, 0.2);
    let mut rng = Rng::new(3);
    let x: Vec<f64> = (0..b * n * c).map(|_| rng.uniform(-1.0, 1.0)).collect();
    let prototypes: Vec<f64> = (0..k * c).map(|_| rng.uniform(-0.7, 0.7)).collect();
    let phi = |v: &[f64]| -> Vec<f64> {
        let norm = v.iter().map(|v| v * v).sum::<f64>().sqrt().max(1.0);
        v.iter().map(|v| v / norm).collect()
    };
    let expected: Vec<f64> = x
        .chunks(n * c)
        .flat_map(|sample| {
            let log_mass: Vec<f64> = sample
                .chunks(c)
                .map(|position| {
                    let fx = phi(position);
                    let scores: Vec<f64> = prototypes
                        .chunks(c)
                        .map(|w| {
                            let fw = phi(w);
                            let d2: f64 = fx.iter().zip(&fw).map(|(a, b)| (a - b).powi(2)).sum();
                            -d2.sqrt() / epsilon
                        })
                        .collect();
                    let top = scores.iter().cloned().fold(f64::MIN, f64::max);
                    top + scores.iter().map(|s| (s - top).exp()).sum::<f64>().ln()
                })
                .collect();
            let top = log_mass.iter().cloned().fold(f64::MIN, f64::max);
            let total: f64 = log_mass.iter().map(|l| (l - top).exp()).sum();
            log_mass.into_iter().map(move |l| (l - top).exp() / total)
        })
        .collect();
    for (name, device) in devices() {
        let gsp = GspConfig::new(c)
            .with_num_prototypes(k)
            .with_transport_ratio(1e-6)
            .with_epsilon(epsilon)
            .with_tolerance(1e-12)
            .init(&device);
        let gsp = Gsp {
            prototypes: Param::from_tensor(floats(&prototypes, [k, c], &device)),
            ..gsp
        };
        let weights = values(gsp.forward_detailed(floats(&x, [b, n, c], &device)).weights);
        for (sample, row) in weights.chunks(n).enumerate() {
            let total: f64 = row.iter().sum();
            assert!(
                (total - 1.0).abs() < 1e-5,
                "{name}: sample {sample}'s weights sum to {total}"
            );
        }
        assert_close(&weights, &expected, 1e-4, 1e-8, &format!("{name}: weights"));
    }
}

/// Issue #20: a NaN at a valid position propagates within its sample and channel, never across
/// samples, on every layer and backend: its sample's output is NaN in the NaN's channel (GSP:
/// the whole sample, whose weights all depend on every position), the other sample's output is
/// what it is without the NaN. (Flex's GeM clamped the NaN into ε and returned a finite value.)
#[test]
fn nan_input_propagates_within_its_sample_only() {
    let (b, n, c) = (2, 5, 4);
    let mut rng = Rng::new(13);
    let clean: Vec<f64> = (0..b * n * c).map(|_| rng.uniform(-0.5, 1.5)).collect();
    // Sample 0, channel 1, at the first, a middle or the last position (a maximum folded
    // left to right may skip a NaN unless it comes last).
    for position in [0, 2, n - 1] {
        let poison = f64::NAN;
        let mut x = clean.clone();
        x[position * c + 1] = poison;
        for (name, device) in devices() {
            for (layer, maps) in LAYERS
                .iter()
                .flat_map(|&layer| [(layer, false), (layer, true)])
            {
                let run = |x: &[f64]| {
                    let tokens = floats(x, [b, n, c], &device);
                    values(pool(layer, tokens, maps, None, &device).0)
                };
                let (expected, actual) = (run(&clean), run(&x));
                let width = actual.len() / b;
                let layout = if maps { "maps" } else { "tokens" };
                let what =
                    format!("{name} {layer} ({layout}) with {poison} at valid position {position}");
                assert!(
                    actual[1].is_nan() || actual[..width].iter().all(|v| v.is_nan()),
                    "{what}: sample 0 is {:?}",
                    &actual[..width]
                );
                assert_close(
                    &actual[width..],
                    &expected[width..],
                    0.0,
                    0.0,
                    &format!("{what}: sample 1"),
                );
                if layer != "gsp" {
                    // The other channels of sample 0 keep their values (GAP+GMP concatenates
                    // or sums per channel, so only channel 1's columns are NaN).
                    for (i, (&a, &e)) in actual[..width].iter().zip(&expected[..width]).enumerate()
                    {
                        if i % c != 1 {
                            assert!(
                                a == e || (a - e).abs() <= 1e-6 * e.abs(),
                                "{what}: y[0][{i}] = {a}, expected {e}"
                            );
                        }
                    }
                }
            }
        }
    }
}

/// Issue #20: GeM near the largest f32 is exact (Flex's `exp` saturated at e^88 = 1.65e38)
/// and its gradients are finite (∂y/∂p overflowed to +∞ as g · y), on every backend, against
/// f64 closed forms.
#[test]
fn gem_near_the_largest_float_is_exact_with_finite_gradients() {
    let (n, c, p) = (3, 2, 3.0);
    let x = [3e38, 1e38, 2e38, 3.3e38, 1e38, 3.4e38];
    let f32_x: Vec<f64> = x.iter().map(|&v| v as f32 as f64).collect();
    let r = [0.75, 1.5];
    let mut expected_y = Vec::new();
    let mut expected_dp = 0.0;
    let mut expected_dx = vec![0.0; n * c];
    for ch in 0..c {
        let column: Vec<f64> = (0..n).map(|i| f32_x[i * c + ch]).collect();
        let top = column.iter().cloned().fold(f64::MIN, f64::max);
        let mean: f64 = column.iter().map(|v| (v / top).powf(p)).sum::<f64>() / n as f64;
        let y = top * mean.powf(1.0 / p);
        let weights: Vec<f64> = column.iter().map(|v| (v / top).powf(p)).collect();
        let mean_log = weights
            .iter()
            .zip(&column)
            .map(|(w, v)| w * v.ln())
            .sum::<f64>()
            / weights.iter().sum::<f64>();
        expected_dp += r[ch] * y / p * (mean_log - y.ln());
        for i in 0..n {
            expected_dx[i * c + ch] = r[ch] * (column[i] / y).powf(p - 1.0) / n as f64;
        }
        expected_y.push(y);
    }
    for (name, device) in devices() {
        let device = device.autodiff();
        let gem = GemConfig::new().with_p(p).init(&device);
        let tokens = floats(&x, [1, n, c], &device).require_grad();
        let y = gem.forward_tokens(tokens.clone());
        let grads = (y.clone() * floats(&r, [1, c], &device)).sum().backward();
        let what = format!("{name}: GeM near f32::MAX");
        assert_close(&values(y), &expected_y, 1e-5, 0.0, &format!("{what}: y"));
        let dp = values(gem.p.val().grad(&grads).unwrap());
        assert_close(
            &dp,
            &[expected_dp],
            1e-3,
            1e-3 * expected_dp.abs(),
            &format!("{what}: dp"),
        );
        let dx = values(tokens.grad(&grads).unwrap());
        assert_close(&dx, &expected_dx, 1e-4, 1e-7, &format!("{what}: dx"));
    }
}

/// Issue #20: GSP on features of norm ~1e35 (their squares overflow f32 by 30 orders; the
/// loss's gradient through the weights, ~‖x‖/(με), still fits): finite output and gradients on
/// every backend (the portable φ overflowed and NdArray's gradients were NaN), agreeing with
/// Flex.
#[test]
fn gsp_near_the_largest_float_has_finite_gradients() {
    let (b, n, c) = (2, 5, 4);
    let mut rng = Rng::new(17);
    let x: Vec<f64> = (0..b * n * c).map(|_| rng.uniform(-1e35, 1e35)).collect();
    let mut flex: Option<Vec<Vec<f64>>> = None;
    for (name, device) in devices() {
        let outcome = outputs_and_gradients("gsp", &x, [b, n, c], None, &device);
        for (part, v) in ["y", "dx", "dprototypes"].iter().zip(&outcome) {
            assert!(
                v.iter().all(|v| v.is_finite()),
                "{name} gsp near f32::MAX: {part} {v:?}"
            );
        }
        // The weights and attributes of features up to 3e38 (each a point of the unit sphere
        // to φ): finite, and the prototypes' gradient of a loss of them too.
        let device_t = device.clone().autodiff();
        let huge: Vec<f64> = x.iter().map(|v| v * 3e3).collect();
        let gsp = GspConfig::new(c).with_num_prototypes(3).init(&device_t);
        let detailed = gsp.forward_detailed(floats(&huge, [b, n, c], &device_t));
        let loss = (detailed.weights.clone() * detailed.weights.clone()).sum()
            + (detailed.attributes.clone() * detailed.attributes.clone()).sum();
        let grads = loss.backward();
        let dw = values(gsp.prototypes.val().grad(&grads).unwrap());
        for (part, v) in [
            ("weights", values(detailed.weights)),
            ("attributes", values(detailed.attributes)),
            ("dprototypes", dw),
        ] {
            assert!(
                v.iter().all(|v| v.is_finite()),
                "{name} gsp at 3e38: {part} {v:?}"
            );
        }
        match &flex {
            None => flex = Some(outcome),
            Some(expected) => {
                for ((part, a), e) in ["y", "dx", "dprototypes"]
                    .iter()
                    .zip(&outcome)
                    .zip(expected)
                {
                    assert_close(a, e, 1e-3, 1e-30, &format!("{name} vs flex: gsp {part}"));
                }
            }
        }
    }
}

/// `balanced_transport` with a masked column (NaN costs there) and a dustbin whose cost
/// depends on a learnable score: the plan, the iterations and the gradients of the costs, both
/// masses and the score agree across backends (each through its analytical node).
#[test]
fn balanced_transport_agrees_across_backends() {
    use burn_pooling::transport::{BalancedSettings, Dustbin, balanced_transport};
    let (b, k, n) = (2, 3, 7);
    let mut rng = Rng::new(31);
    let mut costs: Vec<f64> = (0..b * k * n).map(|_| rng.uniform(-1.0, 1.0)).collect();
    let upstream: Vec<f64> = (0..b * (k + 1) * n)
        .map(|_| rng.uniform(-1.0, 1.0))
        .collect();
    // Sample 1, column 5: masked, NaN costs.
    for i in 0..k {
        costs[k * n + i * n + 5] = f64::NAN;
    }
    let total = (n + k) as f64;
    let mut columns = vec![1.0 / total; b * n];
    columns[n + 5] = 0.0;
    // Sample 1 has one column less: its dustbin takes that much less.
    let dustbin_mass = [(n - k) as f64 / total, (n - k - 1) as f64 / total];
    let mut flex: Option<Vec<Vec<f64>>> = None;
    for (name, device) in devices() {
        let device = device.autodiff();
        assert!(extension_covers(&device), "{name}");
        let c = floats(&costs, [b, k, n], &device).require_grad();
        let rows = floats(&[1.0 / total; 6], [b, k], &device).require_grad();
        let cols = floats(&columns, [b, n], &device).require_grad();
        let score = floats(&[0.5], [1], &device).require_grad();
        let bin_cost = floats(
            &(0..b * n).map(|j| (j % 3) as f64).collect::<Vec<_>>(),
            [b, n],
            &device,
        ) - score.clone().reshape([1, 1]);
        let solved = balanced_transport(
            c.clone(),
            rows.clone(),
            cols.clone(),
            Some(Dustbin {
                cost: bin_cost,
                mass: floats(&dustbin_mass, [b], &device),
            }),
            &BalancedSettings::new(0.2),
        );
        assert!(solved.converged.clone().into_scalar::<bool>(), "{name}");
        let grads = (solved.plan.clone() * floats(&upstream, [b, k + 1, n], &device))
            .sum()
            .backward();
        let outcome = vec![
            values(solved.plan),
            values(c.grad(&grads).unwrap()),
            values(rows.grad(&grads).unwrap()),
            values(cols.grad(&grads).unwrap()),
            values(score.grad(&grads).unwrap()),
        ];
        let labels = ["plan", "dC", "da", "db", "dscore"];
        for (label, v) in labels.iter().zip(&outcome) {
            assert!(v.iter().all(|v| v.is_finite()), "{name} {label}: {v:?}");
        }
        match &flex {
            None => flex = Some(outcome),
            Some(expected) => {
                for ((label, a), e) in labels.iter().zip(&outcome).zip(expected) {
                    assert_close(a, e, 1e-3, 1e-5, &format!("{name} vs flex: {label}"));
                }
            }
        }
    }
}

/// GSP as its authors run it, projected (C = 8 → D = 5), with the GeM read-out and the max
/// branch, and with the max read-out, on masked tokens and on maps: every backend's outputs
/// and gradients (input, prototypes, projection, p) agree with Flex's.
#[test]
fn projected_gsp_readouts_agree_across_backends() {
    use burn_pooling::GspReadout;
    let outcome = |device: &Device| -> Vec<(String, Vec<f64>)> {
        let device = device.clone().autodiff();
        let mut rng = Rng::new(12);
        let (b, n, c, d, k) = (2, 6, 8, 5, 3);
        let x: Vec<f64> = (0..b * n * c).map(|_| rng.uniform(0.0, 1.5)).collect();
        let prototypes: Vec<f64> = (0..k * d).map(|_| rng.uniform(-0.5, 0.8)).collect();
        let projection: Vec<f64> = (0..c * d).map(|_| rng.uniform(-0.6, 0.6)).collect();
        let mask = Tensor::<2, Bool>::from_bool(
            TensorData::new(
                vec![
                    true, true, false, true, true, true, true, true, true, true, true, false,
                ],
                [b, n],
            ),
            &device,
        );
        let mut out = Vec::new();
        for (readout, branch) in [
            (GspReadout::GeneralizedMean, true),
            (GspReadout::Max, false),
            (GspReadout::Mean, true),
        ] {
            let gsp = GspConfig::new(c)
                .with_num_prototypes(k)
                .with_projection(Some(d))
                .with_readout(readout)
                .with_readout_p(2.5)
                .with_max_branch(branch)
                .init(&device);
            let gsp = Gsp {
                prototypes: Param::from_tensor(floats(&prototypes, [k, d], &device)),
                projection: Some(Param::from_tensor(floats(&projection, [c, d], &device))),
                ..gsp
            };
            let label = |what: &str| format!("{readout:?} branch {branch}: {what}");
            let tokens = floats(&x, [b, n, c], &device).require_grad();
            let maps = floats(&x, [b, c, 2, 3], &device).require_grad();
            let masked =
                gsp.forward_detailed(PoolingInput::tokens(tokens.clone()).with_mask(mask.clone()));
            let map_out = gsp.forward_detailed(maps.clone());
            out.push((label("y tokens"), values(masked.pooled.clone())));
            out.push((label("y maps"), values(map_out.pooled.clone())));
            out.push((label("w maps"), values(map_out.weights.clone())));
            let loss = (masked.pooled.clone() * masked.pooled).sum()
                + map_out.pooled.sum()
                + masked.attributes.slice([0..b, 0..1]).sum();
            let grads = loss.backward();
            out.push((label("dx tokens"), values(tokens.grad(&grads).unwrap())));
            out.push((label("dx maps"), values(maps.grad(&grads).unwrap())));
            out.push((
                label("dprototypes"),
                values(gsp.prototypes.val().grad(&grads).unwrap()),
            ));
            out.push((
                label("dprojection"),
                values(gsp.projection.as_ref().unwrap().val().grad(&grads).unwrap()),
            ));
            if let Some(p) = gsp.readout_power() {
                out.push((label("dp"), values(p.grad(&grads).unwrap())));
            }
        }
        out
    };
    let devices = devices();
    let (_, flex) = &devices[0];
    let expected = outcome(flex);
    for (name, device) in &devices[1..] {
        let actual = outcome(device);
        assert_eq!(actual.len(), expected.len());
        for ((label, a), (_, e)) in actual.iter().zip(&expected) {
            assert!(a.iter().all(|v| v.is_finite()), "{name} {label}: {a:?}");
            assert_close(a, e, 1e-4, 1e-5, &format!("{name} vs flex: {label}"));
        }
        println!(
            "{name}: {} projected GSP outputs and gradients agree with flex",
            actual.len()
        );
    }
}

/// MAP (two latents, their mean) and SimPool (plain, and γ = 1.25 with the shift β), built
/// once on Flex and forked to each backend, on masked tokens with a prefix and on maps: the
/// outputs and the gradients of the input and of the parameters agree with Flex.
#[test]
fn attention_layers_agree_across_backends() {
    // Tracked parameters, which `fork` keeps tracked on each backend.
    let flex = Device::flex().autodiff();
    let (b, n, c) = (2, 6, 8);
    let mut rng = Rng::new(19);
    let x: Vec<f64> = (0..b * n * c).map(|_| rng.uniform(-0.5, 1.5)).collect();
    let upstream: Vec<f64> = (0..b * c).map(|_| rng.uniform(-1.0, 1.0)).collect();
    let valid = vec![
        true, true, true, false, true, true, true, true, false, true, true, false,
    ];
    let map = AttentionPoolConfig::new(c)
        .with_num_heads(2)
        .with_latent_len(2)
        .with_output(AttentionPoolOutput::MeanLatents)
        .with_num_prefix_tokens(1)
        .init(&flex);
    let plain = SimPoolConfig::new(c)
        .with_qk_bias(true)
        .with_num_prefix_tokens(1)
        .init(&flex);
    let mut powered = SimPoolConfig::new(c)
        .with_gamma(Some(1.25))
        .with_learnable_shift(true)
        .with_num_prefix_tokens(1)
        .init(&flex);
    powered.beta = Some(Param::from_tensor(Tensor::from_data([0.3f32], &flex)));

    let run = |device: &Device| -> Vec<(String, Vec<f64>)> {
        let device = device.clone().autodiff();
        let mut out = Vec::new();
        let inputs = |d: &Device| {
            let tokens = floats(&x, [b, n, c], d).require_grad();
            let mask = Tensor::<2, Bool>::from_bool(TensorData::new(valid.clone(), [b, n]), d);
            let maps = floats(&x, [b, c, 2, 3], d).require_grad();
            (tokens, mask, maps)
        };
        let g = floats(&upstream, [b, c], &device);
        let map = map.clone().fork(&device);
        let (tokens, mask, maps) = inputs(&device);
        let y = map.forward(PoolingInput::tokens(tokens.clone()).with_mask(mask));
        let y_maps = map.forward(maps.clone());
        out.push(("map y".to_string(), values(y.clone())));
        out.push(("map y maps".to_string(), values(y_maps.clone())));
        let grads = ((y + y_maps) * g.clone()).sum().backward();
        let params = |m: &AttentionPool| {
            [
                ("latent", values(m.latent.val().grad(&grads).unwrap())),
                ("key", values(m.key.weight.val().grad(&grads).unwrap())),
                ("value", values(m.value.weight.val().grad(&grads).unwrap())),
                ("fc1", values(m.fc1.weight.val().grad(&grads).unwrap())),
            ]
        };
        out.push(("map dx".to_string(), values(tokens.grad(&grads).unwrap())));
        out.push((
            "map dx maps".to_string(),
            values(maps.grad(&grads).unwrap()),
        ));
        for (name, grad) in params(&map) {
            out.push((format!("map d{name}"), grad));
        }
        for (label, pool) in [("simpool", &plain), ("simpool γ β", &powered)] {
            let pool: SimPool = pool.clone().fork(&device);
            let (tokens, mask, maps) = inputs(&device);
            let y = pool.forward(PoolingInput::tokens(tokens.clone()).with_mask(mask));
            let y_maps = pool.forward(maps.clone());
            out.push((format!("{label} y"), values(y.clone())));
            out.push((format!("{label} y maps"), values(y_maps.clone())));
            let grads = ((y + y_maps) * g.clone()).sum().backward();
            out.push((format!("{label} dx"), values(tokens.grad(&grads).unwrap())));
            out.push((
                format!("{label} dx maps"),
                values(maps.grad(&grads).unwrap()),
            ));
            out.push((
                format!("{label} dW_k"),
                values(pool.key.weight.val().grad(&grads).unwrap()),
            ));
            out.push((
                format!("{label} dLN"),
                values(pool.norm.gamma.val().grad(&grads).unwrap()),
            ));
            if let Some(beta) = &pool.beta {
                out.push((
                    format!("{label} dβ"),
                    values(beta.val().grad(&grads).unwrap()),
                ));
            }
        }
        out
    };
    let devices = devices();
    let expected = run(&devices[0].1);
    for (name, device) in &devices[1..] {
        let actual = run(device);
        assert_eq!(actual.len(), expected.len());
        for ((label, a), (_, e)) in actual.iter().zip(&expected) {
            assert!(a.iter().all(|v| v.is_finite()), "{name} {label}: {a:?}");
            assert_close(a, e, 1e-4, 1e-5, &format!("{name} vs flex: {label}"));
        }
        println!(
            "{name}: {} attention outputs and gradients agree with flex",
            actual.len()
        );
    }
}

/// `balanced_transport`'s kernels (Flex's, wgpu's fused or not) against the composite route on
/// the same device (the portable solve, differentiated through its tracked implicit step) and
/// against Flex, on a batch whose samples have 9, 6 and 3 valid columns (NaN costs at the
/// masked ones), a zero-mass row and ε = 0.1: the plans, the gradients of the costs and of a
/// balanced change of the masses, the iteration counts (within one: the marginal error is
/// rounded differently) and the convergence flags.
#[test]
fn balanced_transport_kernels_agree_with_the_composites() {
    use burn_pooling::ops::with_composites;
    use burn_pooling::transport::{BalancedSettings, balanced_transport};
    let (b, k, n) = (3, 4, 9);
    let mut rng = Rng::new(37);
    let mut costs: Vec<f64> = (0..b * k * n).map(|_| rng.uniform(0.0, 2.0)).collect();
    let upstream: Vec<f64> = (0..b * k * n).map(|_| rng.uniform(-1.0, 1.0)).collect();
    let mut columns = vec![0.0; b * n];
    for s in 0..b {
        let valid = n - 3 * s;
        for j in 0..n {
            if j < valid {
                columns[s * n + j] = 1.0 / valid as f64;
            } else {
                for i in 0..k {
                    costs[(s * k + i) * n + j] = f64::NAN;
                }
            }
        }
    }
    let mut rows = vec![0.25; b * k];
    rows[2 * k..3 * k].copy_from_slice(&[1.0 / 3.0, 0.0, 1.0 / 3.0, 1.0 / 3.0]);
    let settings = BalancedSettings::new(0.1);
    let run = |device: &Device| {
        let c = floats(&costs, [b, k, n], device).require_grad();
        let a = floats(&rows, [b, k], device).require_grad();
        let m = floats(&columns, [b, n], device).require_grad();
        let solved = balanced_transport(c.clone(), a.clone(), m.clone(), None, &settings);
        let iterations = solved.iterations.into_scalar::<i64>();
        let converged = solved.converged.into_scalar::<bool>();
        let grads = (solved.plan.clone() * floats(&upstream, [b, k, n], device))
            .sum()
            .backward();
        // ∂/∂a_i + ∂/∂b_j: what a balanced change of the masses sees (the gauge drops out),
        // over the valid pairs.
        let (da, db) = (
            values(a.grad(&grads).unwrap()),
            values(m.grad(&grads).unwrap()),
        );
        let pairs: Vec<f64> = (0..b * k * n)
            .filter(|&x| rows[x / n] > 0.0 && columns[(x / (k * n)) * n + x % n] > 0.0)
            .map(|x| da[x / n] + db[(x / (k * n)) * n + x % n])
            .collect();
        let outcome = vec![values(solved.plan), values(c.grad(&grads).unwrap()), pairs];
        (outcome, iterations, converged)
    };
    let labels = ["plan", "dC", "da + db"];
    let mut flex: Option<(Vec<Vec<f64>>, i64)> = None;
    for (name, device) in devices() {
        let device = device.autodiff();
        let (kernel, iterations, converged) = run(&device);
        let (composite, composite_iterations, composite_converged) =
            with_composites(|| run(&device));
        assert!(converged && composite_converged, "{name}");
        assert!(
            (iterations - composite_iterations).abs() <= 1,
            "{name}: {iterations} iterations, the composites {composite_iterations}"
        );
        for ((label, a), e) in labels.iter().zip(&kernel).zip(&composite) {
            assert!(a.iter().all(|v| v.is_finite()), "{name} {label}: {a:?}");
            assert_close(
                a,
                e,
                1e-3,
                1e-5,
                &format!("{name} vs its composites: {label}"),
            );
        }
        match &flex {
            None => flex = Some((kernel, iterations)),
            Some((expected, flex_iterations)) => {
                assert!(
                    (iterations - flex_iterations).abs() <= 1,
                    "{name}: iterations"
                );
                for ((label, a), e) in labels.iter().zip(&kernel).zip(expected) {
                    assert_close(a, e, 1e-3, 1e-5, &format!("{name} vs flex: {label}"));
                }
            }
        }
    }
}

/// OTK (two heads of three references, ε = 0.1, the default stopping rule), built once on Flex
/// and forked to each backend, on masked tokens with a prefix and on maps: the outputs and the
/// gradients of the input and of the references agree with Flex (on wgpu with and without
/// fusion, as the build has it).
#[test]
fn otk_agrees_across_backends() {
    let flex = Device::flex().autodiff();
    let (b, n, c, p, heads) = (2, 6, 8, 3, 2);
    let mut rng = Rng::new(23);
    let x: Vec<f64> = (0..b * n * c).map(|_| rng.uniform(-0.5, 1.5)).collect();
    let width = p * heads * c;
    let upstream: Vec<f64> = (0..b * width).map(|_| rng.uniform(-1.0, 1.0)).collect();
    let valid = vec![
        true, true, true, false, true, true, true, true, false, true, true, false,
    ];
    let otk = OtkConfig::new(c)
        .with_num_references(p)
        .with_heads(heads)
        .with_num_prefix_tokens(1)
        .init(&flex);
    let run = |device: &Device| -> Vec<(&'static str, Vec<f64>)> {
        let device = device.clone().autodiff();
        let layer: Otk = otk.clone().fork(&device);
        let tokens = floats(&x, [b, n, c], &device).require_grad();
        let mask = Tensor::<2, Bool>::from_bool(TensorData::new(valid.clone(), [b, n]), &device);
        let maps = floats(&x, [b, c, 2, 3], &device).require_grad();
        let g = floats(&upstream, [b, width], &device);
        let y = layer.forward(PoolingInput::tokens(tokens.clone()).with_mask(mask));
        let y_maps = layer.forward(maps.clone());
        let grads = ((y.clone() + y_maps.clone()) * g).sum().backward();
        vec![
            ("otk y", values(y)),
            ("otk y maps", values(y_maps)),
            ("otk dx", values(tokens.grad(&grads).unwrap())),
            ("otk dx maps", values(maps.grad(&grads).unwrap())),
            (
                "otk dreferences",
                values(layer.references.val().grad(&grads).unwrap()),
            ),
        ]
    };
    let devices = devices();
    let expected = run(&devices[0].1);
    for (name, device) in &devices[1..] {
        let actual = run(device);
        for ((label, a), (_, e)) in actual.iter().zip(&expected) {
            assert!(a.iter().all(|v| v.is_finite()), "{name} {label}: {a:?}");
            assert_close(a, e, 1e-4, 1e-5, &format!("{name} vs flex: {label}"));
        }
        println!(
            "{name}: {} OTK outputs and gradients agree with flex",
            actual.len()
        );
    }
}

/// SALAD's OtAggregation (converged, the fixed 3 iterations, the reference's 3 sweeps), built once on Flex and forked
/// to each backend, dropout off: on masked tokens with the global token (the prefix) and on
/// maps with the global token given apart, the outputs and the gradients of the input and of
/// the parameters agree with Flex.
#[test]
fn ot_aggregation_agrees_across_backends() {
    let flex = Device::flex().autodiff();
    let (b, n, c, m, l, t) = (2, 8, 8, 3, 4, 5);
    let mut rng = Rng::new(23);
    let x: Vec<f64> = (0..b * n * c).map(|_| rng.uniform(-0.5, 1.5)).collect();
    let width = m * l + t;
    let upstream: Vec<f64> = (0..b * width).map(|_| rng.uniform(-1.0, 1.0)).collect();
    // Sample 1 keeps 5 of its 7 tokens after the prefix (> m).
    let valid = vec![
        true, true, true, true, true, true, true, true, true, true, false, true, true, false, true,
        true,
    ];
    let layers = [
        OtSinkhorn::Reference { iterations: 3 },
        OtSinkhorn::Fixed { iterations: 3 },
        OtSinkhorn::Converged {
            max_iterations: 1000,
            tolerance: 1e-6,
        },
    ]
    .map(|sinkhorn| {
        OtAggregationConfig::new(c)
            .with_num_clusters(m)
            .with_cluster_dim(l)
            .with_hidden_dim(6)
            .with_token_dim(Some(t))
            .with_dropout(0.0)
            .with_sinkhorn(sinkhorn)
            .init(&flex)
    });
    let run = |device: &Device| -> Vec<(String, Vec<f64>)> {
        let device = device.clone().autodiff();
        let mut out = Vec::new();
        let g = floats(&upstream, [b, width], &device);
        for layer in &layers {
            let label = format!("{:?}", layer.sinkhorn);
            let layer: OtAggregation = layer.clone().fork(&device);
            let tokens = floats(&x, [b, n, c], &device).require_grad();
            let mask =
                Tensor::<2, Bool>::from_bool(TensorData::new(valid.clone(), [b, n]), &device);
            let y = layer.forward(PoolingInput::tokens(tokens.clone()).with_mask(mask));
            // Maps of the 8 tokens' values (no prefix), the global token given apart.
            let maps = floats(&x, [b, c, 2, 4], &device).require_grad();
            let global = floats(&x[..b * c], [b, c], &device);
            let y_maps = layer.forward_with_global(maps.clone(), global);
            out.push((format!("{label} y"), values(y.clone())));
            out.push((format!("{label} y maps"), values(y_maps.clone())));
            let grads = ((y + y_maps) * g.clone()).sum().backward();
            out.push((format!("{label} dx"), values(tokens.grad(&grads).unwrap())));
            out.push((
                format!("{label} dx maps"),
                values(maps.grad(&grads).unwrap()),
            ));
            for (name, linear) in [
                ("features_hidden", &layer.features_hidden),
                ("features_out", &layer.features_out),
                ("scores_hidden", &layer.scores_hidden),
                ("scores_out", &layer.scores_out),
                ("token_hidden", layer.token_hidden.as_ref().unwrap()),
            ] {
                out.push((
                    format!("{label} d{name}"),
                    values(linear.weight.val().grad(&grads).unwrap()),
                ));
            }
        }
        out
    };
    let devices = devices();
    let expected = run(&devices[0].1);
    for (name, device) in &devices[1..] {
        let actual = run(device);
        assert_eq!(actual.len(), expected.len());
        for ((label, a), (_, e)) in actual.iter().zip(&expected) {
            assert!(a.iter().all(|v| v.is_finite()), "{name} {label}: {a:?}");
            assert_close(a, e, 1e-4, 1e-5, &format!("{name} vs flex: {label}"));
        }
        println!(
            "{name}: {} OtAggregation outputs and gradients agree with flex",
            actual.len()
        );
    }
}
