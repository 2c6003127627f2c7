//! Flex, NdArray and wgpu (lavapipe without a GPU) give the same outputs and gradients for
//! every layer, in f32, within 1e-4 relative + 1e-5 absolute. The GSP gradients use the
//! analytical backward on every backend here (`extension_covers` is asserted).
#![cfg(any(feature = "ndarray", feature = "wgpu"))]

use crate::common;
use burn::module::Param;
use burn::tensor::{Bool, Device, Tensor, TensorData};
use burn_pooling::PoolingInput;
use burn_pooling::loss::{ZeroShotLossConfig, ZeroShotSplit};
use burn_pooling::ops::extension_covers;
use burn_pooling::{
    GapConfig, GemConfig, GroupGemConfig, Gsp, GspConfig, LseConfig, LseOutput, TokenMode,
    TokenPoolingConfig,
};
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
    let modes = vec![
        TokenMode::Cls,
        TokenMode::Last,
        TokenMode::Mean,
        TokenMode::Max,
        TokenMode::MeanSqrtLen,
        TokenMode::WeightedMean,
    ];
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
