//! The bad-input matrix: every layer, on every backend configuration this build has (Flex,
//! NdArray, wgpu — fused when the crate's `fusion` feature is on — each with and without
//! autodiff), against bad shapes, bad configs, values changed after `init`, values at the float
//! limits, and NaN/Inf at valid and at masked positions.
//!
//! Each case expects one of two things:
//! - a panic whose message names the layer and the parameter (every fragment listed), or
//! - a normal return whose values pass the case's check: finite and equal to a reference
//!   (an f64 oracle, the same layer on the padding-free input, or a scaling identity), or the
//!   documented propagation of a non-finite input within its own sample.
//!
//! Each case runs on its own thread under a time limit, so a hang is reported, not waited for;
//! cases that could abort the process (allocation-sized parameters) run in a child process.
//! The test prints the matrix's outcome counts and fails on any case that did not meet its
//! expectation. When a layer joins the crate, it joins `LAYERS` (and its own config cases).
#![allow(clippy::type_complexity)]

use std::panic::{self, AssertUnwindSafe};
use std::sync::Once;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use burn::module::Param;
use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use burn_pooling::GspReadout;
use burn_pooling::loss::{ZeroShotLossConfig, ZeroShotSplit};
use burn_pooling::transport::{
    BalancedSettings, TransportSettings, TransportSolver, balanced_transport, lipschitz_normalize,
    partial_transport,
};
use burn_pooling::{AttentionPoolConfig, SimPoolConfig};
use burn_pooling::{
    GapConfig, GapGmpConfig, GemConfig, GmpConfig, GroupGemConfig, Gsp, GspConfig, LseConfig,
    MIN_POWER, Pooling, PoolingConfig, PoolingInput, TokenMode, TokenPoolingConfig,
};
use burn_pooling::{NetVlad, NetVladConfig, NetVladVersion};
use burn_pooling::{OtAggregation, OtAggregationConfig, OtSinkhorn};
use burn_pooling::{Otk, OtkConfig};

use crate::common::Rng;

/// How long one case may take before it counts as a hang: 60 s (lavapipe compiles each kernel
/// on first use, so the first wgpu cases are slow), or `BURN_POOLING_BAD_INPUT_SECONDS`.
fn time_limit() -> Duration {
    let seconds = std::env::var("BURN_POOLING_BAD_INPUT_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    Duration::from_secs(seconds)
}

/// The name of the case threads, whose panics the hook keeps quiet.
const CASE_THREAD: &str = "bad-input-case";

/// Channels of every generated input (GroupGem uses 2 groups of 2).
const C: usize = 4;

// ---------------------------------------------------------------------------------------------
// Devices and layers
// ---------------------------------------------------------------------------------------------

/// Every backend configuration of this build, each with and without autodiff.
fn backends() -> Vec<(String, Device)> {
    let mut plain = vec![("flex".to_string(), Device::flex())];
    #[cfg(feature = "ndarray")]
    #[allow(deprecated)] // NdArray is deprecated in Burn 0.22, still supported here.
    plain.push(("ndarray".to_string(), Device::ndarray()));
    #[cfg(feature = "wgpu")]
    plain.push((
        if cfg!(feature = "fusion") {
            "wgpu-fused".to_string()
        } else {
            "wgpu".to_string()
        },
        Device::wgpu(burn::tensor::DeviceKind::DefaultDevice),
    ));
    let mut all = Vec::new();
    for (name, device) in plain {
        all.push((format!("{name}+autodiff"), device.clone().autodiff()));
        all.push((name, device));
    }
    all
}

/// The layers under test, by the name their panics use.
const LAYERS: [&str; 13] = [
    "Gap",
    "Gmp",
    "GapGmp",
    "Gem",
    "GroupGem",
    "Gsp",
    "Lse",
    "TokenPooling",
    "AttentionPool",
    "SimPool",
    "NetVlad",
    "Otk",
    "OtAggregation",
];

/// TokenPooling's modes here: every mode, `Cls` first (its block reads the prefix token, by
/// design, so the skipped-prefix case checks it apart).
const TOKEN_MODES: [TokenMode; 6] = TokenMode::ALL;

/// A layer with C = 4 channels (GroupGem: 2 groups; Gsp: K = 3), its default settings
/// otherwise, through the one config type users store.
fn layer(name: &str, device: &Device) -> Pooling {
    config(name).init(device)
}

fn config(name: &str) -> PoolingConfig {
    match name {
        "Gap" => PoolingConfig::Gap(GapConfig::new()),
        "Gmp" => PoolingConfig::Gmp(GmpConfig::new()),
        "GapGmp" => PoolingConfig::GapGmp(GapGmpConfig::new()),
        "Gem" => PoolingConfig::Gem(GemConfig::new()),
        "GroupGem" => PoolingConfig::GroupGem(GroupGemConfig::new(2)),
        "Gsp" => PoolingConfig::Gsp(GspConfig::new(C).with_num_prototypes(3)),
        "Lse" => PoolingConfig::Lse(LseConfig::new()),
        "TokenPooling" => {
            PoolingConfig::TokenPooling(TokenPoolingConfig::new(TOKEN_MODES.to_vec()))
        }
        // 2 heads of 2 channels; SimPool with its power form and learnable shift (the ViT
        // setting), the path with a minimum, a logarithm and a power.
        "AttentionPool" => {
            PoolingConfig::AttentionPool(AttentionPoolConfig::new(C).with_num_heads(2))
        }
        "SimPool" => PoolingConfig::SimPool(
            SimPoolConfig::new(C)
                .with_gamma(Some(1.25))
                .with_learnable_shift(true),
        ),
        "NetVlad" => PoolingConfig::NetVlad(NetVladConfig::new(C).with_num_clusters(3)),
        // 2 heads of 3 references (random ±1/√3): the identity oracle is in `otk_cases`.
        "Otk" => PoolingConfig::Otk(OtkConfig::new(C).with_num_references(3).with_heads(2)),
        // m = 2 < the 3 valid tokens of the padding cases; no global token and no prefix (the
        // matrix's inputs have none); dropout off, so that a masked forward and its
        // padding-free reference draw no different masks on autodiff devices.
        "OtAggregation" => PoolingConfig::OtAggregation(ot_aggregation_config()),
        other => panic!("bad_input: unknown layer {other}"),
    }
}

/// The f64 oracle of the reductions (GroupGem's powers all start at Gem's p = 3, so they share
/// it); `None` for Gsp, whose references are identities instead. `rows[b]` holds the valid
/// positions of sample b, each `[C]`.
fn oracle(name: &str, rows: &[Vec<Vec<f64>>]) -> Option<Vec<f64>> {
    let mean =
        |set: &Vec<Vec<f64>>, c: usize| set.iter().map(|x| x[c]).sum::<f64>() / set.len() as f64;
    let max =
        |set: &Vec<Vec<f64>>, c: usize| set.iter().map(|x| x[c]).fold(f64::NEG_INFINITY, f64::max);
    let gem = |set: &Vec<Vec<f64>>, c: usize| {
        // Scaled by the largest clamped value so that x³ cannot overflow f64 either.
        let clamped: Vec<f64> = set.iter().map(|x| x[c].max(1e-6)).collect();
        let top = clamped.iter().cloned().fold(0.0, f64::max);
        let mean = clamped.iter().map(|v| (v / top).powi(3)).sum::<f64>() / clamped.len() as f64;
        top * mean.cbrt()
    };
    let per_channel = |f: &dyn Fn(&Vec<Vec<f64>>, usize) -> f64| -> Vec<f64> {
        rows.iter()
            .flat_map(|set| (0..C).map(|c| f(set, c)).collect::<Vec<_>>())
            .collect()
    };
    match name {
        "Gap" => Some(per_channel(&mean)),
        "Gmp" => Some(per_channel(&max)),
        "GapGmp" => Some(per_channel(&|set, c| mean(set, c) + max(set, c))),
        "Gem" | "GroupGem" => Some(per_channel(&gem)),
        // LSE at its initial r = 10, in f64 (x − m cannot overflow there).
        "Lse" => Some(per_channel(&|set, c| {
            let m = max(set, c);
            let sum: f64 = set.iter().map(|x| (10.0 * (x[c] - m)).exp()).sum();
            m + (sum / set.len() as f64).ln() / 10.0
        })),
        // The blocks of TOKEN_MODES in order; `rows` holds no prefix here.
        "TokenPooling" => Some(
            rows.iter()
                .flat_map(|set| {
                    let len = set.len() as f64;
                    let linear = |c: usize, w: &dyn Fn(usize) -> f64| -> f64 {
                        set.iter().enumerate().map(|(l, x)| w(l) * x[c]).sum()
                    };
                    let mut out = Vec::new();
                    out.extend_from_slice(&set[0]);
                    out.extend_from_slice(&set[set.len() - 1]);
                    out.extend((0..C).map(|c| linear(c, &|_| 1.0 / len)));
                    out.extend((0..C).map(|c| max(set, c)));
                    out.extend((0..C).map(|c| linear(c, &|_| 1.0 / len.sqrt())));
                    let total = len * (len + 1.0) / 2.0;
                    out.extend((0..C).map(|c| linear(c, &|l| (l + 1) as f64 / total)));
                    out
                })
                .collect(),
        ),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Tensors
// ---------------------------------------------------------------------------------------------

fn floats<const D: usize>(values: &[f64], shape: [usize; D], device: &Device) -> Tensor<D> {
    let values: Vec<f32> = values.iter().map(|&v| v as f32).collect();
    Tensor::from_data(TensorData::new(values, shape), device)
}

fn bools(values: &[bool], shape: [usize; 2], device: &Device) -> Tensor<2, Bool> {
    Tensor::from_bool(TensorData::new(values.to_vec(), shape), device)
}

/// The one value of a `[1]` flag (read as an integer: backends store booleans differently).
fn read_bool(t: Tensor<1, Bool>) -> bool {
    t.int().into_data().convert::<i64>().iter::<i64>().next() != Some(0)
}

fn read<const D: usize>(t: Tensor<D>) -> Vec<f64> {
    t.into_data()
        .convert::<f64>()
        .try_to_vec::<f64>()
        .expect("f64 values")
}

/// `B × N × C` token values in [lo, hi), seeded.
fn tokens_values(seed: u64, (b, n): (usize, usize), (lo, hi): (f64, f64)) -> Vec<f64> {
    let mut rng = Rng::new(seed);
    (0..b * n * C).map(|_| rng.uniform(lo, hi)).collect()
}

/// Sample `b`'s positions `n` with `keep[b·N + n]`, from `[B, N, C]` values.
fn valid_rows(values: &[f64], n: usize, keep: &[bool]) -> Vec<Vec<Vec<f64>>> {
    let b = values.len() / (n * C);
    (0..b)
        .map(|s| {
            (0..n)
                .filter(|&j| keep[s * n + j])
                .map(|j| values[(s * n + j) * C..(s * n + j + 1) * C].to_vec())
                .collect()
        })
        .collect()
}

/// Compares `actual` with `expected`, every value finite, within `rtol` (relative) and 1e-6
/// (absolute).
fn close(what: &str, actual: &[f64], expected: &[f64], rtol: f64) -> Result<(), String> {
    if actual.len() != expected.len() {
        return Err(format!(
            "{what}: {} values, expected {}",
            actual.len(),
            expected.len()
        ));
    }
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        if !a.is_finite() || (a - e).abs() > 1e-6 + rtol * e.abs() {
            return Err(format!("{what}[{i}] = {a}, expected {e} (rtol {rtol})"));
        }
    }
    Ok(())
}

fn all_finite(what: &str, values: &[f64]) -> Result<(), String> {
    match values.iter().position(|v| !v.is_finite()) {
        Some(i) => Err(format!("{what}[{i}] = {} is not finite", values[i])),
        None => Ok(()),
    }
}

/// The same layer on each sample's valid positions alone (no mask): what a masked forward
/// must equal, since padding must not reach the output.
fn dropped_reference(layer: &Pooling, rows: &[Vec<Vec<f64>>], device: &Device) -> Vec<f64> {
    rows.iter()
        .flat_map(|set| {
            let flat: Vec<f64> = set.concat();
            read(layer.forward_tokens(floats(&flat, [1, set.len(), C], device)))
        })
        .collect()
}

/// Forward (+ backward on an autodiff device) of tokens `[B, N, C]` with an optional mask:
/// the output, and the input's gradient of `Σ y / max(1, max |y|)` where the device tracks
/// gradients.
fn forward_tokens(
    layer: &Pooling,
    values: &[f64],
    (b, n): (usize, usize),
    mask: Option<&[bool]>,
    device: &Device,
) -> (Vec<f64>, Option<Vec<f64>>) {
    let tracked = device.is_autodiff();
    let mut x = floats(values, [b, n, C], device);
    if tracked {
        x = x.require_grad();
    }
    let mut input = PoolingInput::tokens(x.clone());
    if let Some(mask) = mask {
        input = input.with_mask(bools(mask, [b, n], device));
    }
    let y = layer.forward(input);
    let out = read(y.clone());
    // A loss of order 1 (as a normalised embedding gives): Σ y itself overflows f32 when the
    // outputs are near f32::MAX, and its gradient is then the loss's overflow, not the layer's.
    let largest = out.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    let grad = tracked.then(|| {
        let grads = y.div_scalar(largest).sum().backward();
        read(x.grad(&grads).expect("the input's gradient"))
    });
    (out, grad)
}

// ---------------------------------------------------------------------------------------------
// Cases
// ---------------------------------------------------------------------------------------------

type Check = Box<dyn FnOnce() -> Result<(), String> + Send>;

struct Case {
    name: String,
    /// `Some(fragments)`: the case must panic with every fragment in its message.
    panics_with: Option<Vec<String>>,
    check: Check,
    /// Run in a child process: the defect it guards against aborts the process.
    isolate: bool,
}

impl Case {
    fn returns(name: String, check: impl FnOnce() -> Result<(), String> + Send + 'static) -> Self {
        Self {
            name,
            panics_with: None,
            check: Box::new(check),
            isolate: false,
        }
    }

    fn panics(name: String, fragments: &[&str], run: impl FnOnce() + Send + 'static) -> Self {
        Self {
            name,
            panics_with: Some(fragments.iter().map(|f| f.to_string()).collect()),
            check: Box::new(move || {
                run();
                Ok(())
            }),
            isolate: false,
        }
    }

    fn isolated(mut self) -> Self {
        self.isolate = true;
        self
    }
}

/// The shape cases of one layer on one device.
fn shape_cases(name: &'static str, (backend, device): &(String, Device), cases: &mut Vec<Case>) {
    let tag = |what: &str| format!("{name}/{backend}/{what}");
    let d = device.clone();
    let run_maps = move |dims: [usize; 4]| {
        let d = d.clone();
        move || {
            let maps = Tensor::<4>::ones(dims, &d);
            let _ = read(layer(name, &d).forward(maps));
        }
    };
    cases.push(Case::panics(
        tag("maps C = 0"),
        &[name, "C"],
        run_maps([2, 0, 3, 3]),
    ));
    cases.push(Case::panics(
        tag("maps H = 0"),
        &[name, "H = 0"],
        run_maps([2, C, 0, 3]),
    ));
    cases.push(Case::panics(
        tag("maps W = 0"),
        &[name, "W = 0"],
        run_maps([2, C, 3, 0]),
    ));
    let d = device.clone();
    cases.push(Case::panics(
        tag("tokens N = num_prefix_tokens"),
        &[name, "num_prefix_tokens"],
        move || {
            let tokens = Tensor::<3>::ones([2, 2, C], &d);
            let input = PoolingInput::tokens(tokens).with_prefix_tokens(2);
            let _ = read(layer(name, &d).forward(input));
        },
    ));
    let d = device.clone();
    cases.push(Case::panics(
        tag("mask of the wrong shape"),
        &[name, "mask", "[2, 5]"],
        move || {
            let tokens = Tensor::<3>::ones([2, 5, C], &d);
            let mask = Tensor::<2, Bool>::ones([2, 4], &d);
            let _ = read(layer(name, &d).forward(PoolingInput::tokens(tokens).with_mask(mask)));
        },
    ));
    let d = device.clone();
    cases.push(Case::panics(
        tag("mask row without a valid position"),
        &[name, "valid position", "[1]"],
        move || {
            let tokens = Tensor::<3>::ones([2, 3, C], &d);
            let mask = bools(&[true, false, true, false, false, false], [2, 3], &d);
            let _ = read(layer(name, &d).forward(PoolingInput::tokens(tokens).with_mask(mask)));
        },
    ));
    let d = device.clone();
    cases.push(Case::panics(
        tag("mask row empty after the prefix"),
        &[name, "valid position"],
        move || {
            let tokens = Tensor::<3>::ones([2, 3, C], &d);
            let mask = bools(&[true, true, true, true, false, false], [2, 3], &d);
            let input = PoolingInput::tokens(tokens)
                .with_mask(mask)
                .with_prefix_tokens(1);
            let _ = read(layer(name, &d).forward(input));
        },
    ));
    let d = device.clone();
    cases.push(Case::returns(tag("maps B = 0 gives [0, C']"), move || {
        let pooling = layer(name, &d);
        let y = pooling.forward(Tensor::<4>::ones([0, C, 2, 2], &d));
        let expected = [0, config(name).output_channels(C)];
        (y.dims() == expected)
            .then_some(())
            .ok_or(format!("dims {:?}, expected {expected:?}", y.dims()))
    }));
    let d = device.clone();
    cases.push(Case::returns(
        tag("masked tokens B = 0 gives [0, C']"),
        move || {
            let pooling = layer(name, &d);
            let tokens = Tensor::<3>::ones([0, 5, C], &d);
            let mask = Tensor::<2, Bool>::ones([0, 5], &d);
            let y = pooling.forward(PoolingInput::tokens(tokens).with_mask(mask));
            let expected = [0, config(name).output_channels(C)];
            (y.dims() == expected)
                .then_some(())
                .ok_or(format!("dims {:?}, expected {expected:?}", y.dims()))
        },
    ));
    if matches!(
        name,
        "Gsp" | "GroupGem" | "AttentionPool" | "SimPool" | "NetVlad" | "Otk"
    ) {
        let d = device.clone();
        let what = if name == "GroupGem" { "groups" } else { "C" };
        cases.push(Case::panics(
            tag("channels that do not fit the layer"),
            &[name, what],
            move || {
                let tokens = Tensor::<3>::ones([2, 3, C + 1], &d);
                let _ = read(layer(name, &d).forward_tokens(tokens));
            },
        ));
    }
}

/// Padding: NaN, ±Inf and f32::MAX at masked positions (and in a skipped prefix token) never
/// reach the output or the input's gradient.
fn padding_cases(name: &'static str, (backend, device): &(String, Device), cases: &mut Vec<Case>) {
    let (b, n) = (2, 5);
    // Sample 0 keeps positions 0, 2, 3; sample 1 keeps 0..=3.
    let keep = [
        true, false, true, true, false, true, true, true, true, false,
    ];
    for (garbage_name, garbage) in [
        ("NaN", f64::NAN),
        ("+Inf", f64::INFINITY),
        ("-Inf", f64::NEG_INFINITY),
        ("f32::MAX", f32::MAX as f64),
    ] {
        let d = device.clone();
        cases.push(Case::returns(
            format!("{name}/{backend}/{garbage_name} at masked positions"),
            move || {
                let mut values = tokens_values(3, (b, n), (0.1, 1.0));
                let rows = valid_rows(&values, n, &keep);
                for (i, v) in values.iter_mut().enumerate() {
                    if !keep[i / C] {
                        *v = garbage;
                    }
                }
                let pooling = layer(name, &d);
                let (out, grad) = forward_tokens(&pooling, &values, (b, n), Some(&keep), &d);
                let reference = dropped_reference(&pooling, &rows, &d);
                close("output vs the padding-free input", &out, &reference, 2e-4)?;
                if let Some(grad) = grad {
                    all_finite("input gradient", &grad)?;
                    if let Some(i) = (0..grad.len()).find(|&i| !keep[i / C] && grad[i] != 0.0) {
                        return Err(format!(
                            "input gradient at masked element {i} = {}",
                            grad[i]
                        ));
                    }
                }
                Ok(())
            },
        ));
    }
    let d = device.clone();
    cases.push(Case::returns(
        format!("{name}/{backend}/NaN in a skipped prefix token"),
        move || {
            let mut values = tokens_values(4, (b, n), (0.1, 1.0));
            let keep_all = [false, true, true, true, true, false, true, true, true, true];
            let rows = valid_rows(&values, n, &keep_all);
            values[..C].fill(f64::NAN);
            values[n * C..(n + 1) * C].fill(f64::NAN);
            let pooling = layer(name, &d);
            let x = floats(&values, [b, n, C], &d);
            let mut out = read(pooling.forward(PoolingInput::tokens(x).with_prefix_tokens(1)));
            let mut reference = dropped_reference(&pooling, &rows, &d);
            if name == "TokenPooling" {
                // `Cls` (each sample's first block) is the class token, the prefix: NaN here.
                let width = out.len() / b;
                let cls: Vec<usize> = (0..b).flat_map(|s| s * width..s * width + C).collect();
                if let Some(&i) = cls.iter().find(|&&i| !out[i].is_nan()) {
                    return Err(format!("Cls output {i} = {} is not the NaN prefix", out[i]));
                }
                let keep = |v: &[f64]| -> Vec<f64> {
                    (0..v.len())
                        .filter(|i| !cls.contains(i))
                        .map(|i| v[i])
                        .collect()
                };
                (out, reference) = (keep(&out), keep(&reference));
            }
            close("output", &out, &reference, 2e-4)
        },
    ));
    let d = device.clone();
    cases.push(Case::returns(
        format!("{name}/{backend}/NaN at masked map cells"),
        move || {
            // [2, C, 2, 3] maps; the mask drops cell 4 of sample 0 and cells 0, 5 of sample 1.
            let cells = 6;
            let keep = [
                true, true, true, true, false, true, false, true, true, true, true, false,
            ];
            let tokens = tokens_values(5, (b, cells), (0.1, 1.0));
            let rows = valid_rows(&tokens, cells, &keep);
            let mut maps = vec![0.0; tokens.len()];
            for s in 0..b {
                for j in 0..cells {
                    for c in 0..C {
                        let v = if keep[s * cells + j] {
                            tokens[(s * cells + j) * C + c]
                        } else {
                            f64::NAN
                        };
                        maps[(s * C + c) * cells + j] = v;
                    }
                }
            }
            let pooling = layer(name, &d);
            let input = PoolingInput::maps(floats(&maps, [b, C, 2, 3], &d)).with_mask(bools(
                &keep,
                [b, cells],
                &d,
            ));
            let out = read(pooling.forward(input));
            close(
                "output",
                &out,
                &dropped_reference(&pooling, &rows, &d),
                2e-4,
            )
        },
    ));
}

/// Non-finite values at *valid* positions propagate within their sample and never reach
/// another sample; values at the float limits give the f64 oracle's result.
fn value_cases(name: &'static str, (backend, device): &(String, Device), cases: &mut Vec<Case>) {
    let (b, n) = (2, 5);
    for (bad_name, bad) in [("NaN", f64::NAN), ("+Inf", f64::INFINITY)] {
        let d = device.clone();
        cases.push(Case::returns(
            format!("{name}/{backend}/{bad_name} at a valid position stays in its sample"),
            move || {
                let mut values = tokens_values(6, (b, n), (0.1, 1.0));
                let rows = valid_rows(&values, n, &[true; 10]);
                values[(n + 2) * C + 1] = bad; // sample 1, position 2, channel 1
                let pooling = layer(name, &d);
                let (out, grad) = forward_tokens(&pooling, &values, (b, n), None, &d);
                let width = out.len() / b;
                let alone = dropped_reference(&pooling, &rows[..1], &d);
                close("sample 0's output", &out[..width], &alone, 2e-4)?;
                if bad.is_nan() && out[width..].iter().all(|v| v.is_finite()) {
                    return Err(format!(
                        "sample 1's output {:?} hides the NaN of its input",
                        &out[width..]
                    ));
                }
                if let Some(grad) = grad {
                    all_finite("sample 0's input gradient", &grad[..n * C])?;
                }
                Ok(())
            },
        ));
    }
    for (range_name, range, seed) in [
        ("values near f32::MAX", (1e37, 3.0e38), 7),
        ("values near f32's smallest normal", (1e-38, 1e-37), 8),
        ("values of mixed sign near f32::MAX", (-3.0e38, 3.0e38), 9),
    ] {
        let d = device.clone();
        cases.push(Case::returns(
            format!("{name}/{backend}/{range_name}"),
            move || {
                let values = tokens_values(seed, (b, n), range);
                // The oracle sees the f32 values the device sees.
                let values: Vec<f64> = values.iter().map(|&v| v as f32 as f64).collect();
                let pooling = layer(name, &d);
                let (out, grad) = forward_tokens(&pooling, &values, (b, n), None, &d);
                if matches!(name, "AttentionPool" | "SimPool" | "OtAggregation") && range.1 > 1e30 {
                    // Their linear projections (and SimPool's LayerNorm) overflow f32 at these
                    // values, as any linear layer does (their rustdoc says so): what is checked
                    // here is that they return, without a panic or a hang. "One sample huge,
                    // one tiny" checks that the overflow stays in its sample.
                    return Ok(());
                }
                let rows = valid_rows(&values, n, &[true; 10]);
                match oracle(name, &rows) {
                    // GapGmp's sum can overflow f32 legitimately: compare where the oracle fits.
                    Some(reference) if reference.iter().all(|r| r.abs() <= f32::MAX as f64) => {
                        close("output vs the f64 oracle", &out, &reference, 1e-4)?
                    }
                    Some(_) => {}
                    None => all_finite("output", &out)?,
                }
                if let Some(grad) = grad {
                    all_finite("input gradient", &grad)?;
                }
                Ok(())
            },
        ));
    }
    let d = device.clone();
    cases.push(Case::returns(
        format!("{name}/{backend}/one sample huge, one tiny"),
        move || {
            let mut values = tokens_values(10, (b, n), (1e37, 1e38));
            values[n * C..].iter_mut().for_each(|v| *v *= 1e-75);
            let values: Vec<f64> = values.iter().map(|&v| v as f32 as f64).collect();
            let pooling = layer(name, &d);
            let (out, _) = forward_tokens(&pooling, &values, (b, n), None, &d);
            let rows = valid_rows(&values, n, &[true; 10]);
            if name == "OtAggregation" {
                // Its MLPs overflow f32 on the huge sample, as any linear layer does: the tiny
                // sample must not see it.
                let width = out.len() / b;
                let alone = dropped_reference(&pooling, &rows[1..], &d);
                return close("the tiny sample vs alone", &out[width..], &alone, 2e-4);
            }
            match oracle(name, &rows) {
                Some(reference) => close("output vs the f64 oracle", &out, &reference, 1e-4),
                None => close(
                    "output vs each sample alone",
                    &out,
                    &dropped_reference(&pooling, &rows, &d),
                    2e-4,
                ),
            }
        },
    ));
}

/// Configs that `init` must refuse, and values changed after `init` that `forward` must
/// refuse, each naming the layer and the parameter.
fn config_cases((backend, device): &(String, Device), cases: &mut Vec<Case>) {
    let tag = |what: &str| format!("{what}/{backend}");
    let tokens = |d: &Device| Tensor::<3>::ones([2, 3, C], d);
    macro_rules! refuses_init {
        ($what:expr, [$($fragment:expr),*], $config:expr) => {{
            let d = device.clone();
            cases.push(Case::panics(tag($what), &[$($fragment),*], move || {
                let pooling = $config.init(&d);
                let _ = read(pooling.forward_tokens(tokens(&d)));
            }));
        }};
    }
    for p in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e-50] {
        refuses_init!(
            &format!("Gem p = {p}"),
            ["Gem", "p"],
            GemConfig::new().with_p(p)
        );
        refuses_init!(
            &format!("GroupGem p = {p}"),
            ["GroupGem", "p"],
            GroupGemConfig::new(2).with_p(p)
        );
    }
    for eps in [0.0, -1e-6, f64::NAN] {
        refuses_init!(
            &format!("Gem eps = {eps}"),
            ["Gem", "eps"],
            GemConfig::new().with_eps(eps)
        );
        refuses_init!(
            &format!("GroupGem eps = {eps}"),
            ["GroupGem", "eps"],
            GroupGemConfig::new(2).with_eps(eps)
        );
    }
    refuses_init!(
        "GroupGem groups = 0",
        ["GroupGem", "groups"],
        GroupGemConfig::new(0)
    );
    for r in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e-5] {
        refuses_init!(
            &format!("Lse r = {r}"),
            ["Lse", "r"],
            LseConfig::new().with_r(r)
        );
    }
    for r_min in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        refuses_init!(
            &format!("Lse r_min = {r_min}"),
            ["Lse", "r_min"],
            LseConfig::new().with_r_min(r_min)
        );
    }
    {
        let d = device.clone();
        cases.push(Case::panics(
            tag("TokenPooling modes = []"),
            &["TokenPooling", "modes"],
            move || {
                let pooling = PoolingConfig::TokenPooling(TokenPoolingConfig::new(vec![]));
                let _ = read(pooling.init(&d).forward_tokens(tokens(&d)));
            },
        ));
        let d = device.clone();
        cases.push(Case::panics(
            tag("TokenPooling modes listing Last twice"),
            &["TokenPooling", "modes", "Last"],
            move || {
                let modes = vec![TokenMode::Last, TokenMode::Mean, TokenMode::Last];
                let pooling = PoolingConfig::TokenPooling(TokenPoolingConfig::new(modes));
                let _ = read(pooling.init(&d).forward_tokens(tokens(&d)));
            },
        ));
    }
    let gsp = || GspConfig::new(C).with_num_prototypes(3);
    refuses_init!("Gsp channels = 0", ["Gsp", "channels"], GspConfig::new(0));
    refuses_init!(
        "Gsp num_prototypes = 0",
        ["Gsp", "num_prototypes"],
        gsp().with_num_prototypes(0)
    );
    for mu in [0.0, -0.5, 1.5, f64::NAN, 1e-40] {
        refuses_init!(
            &format!("Gsp transport_ratio = {mu}"),
            ["Gsp", "transport_ratio"],
            gsp().with_transport_ratio(mu)
        );
    }
    for epsilon in [0.0, -0.2, f64::NAN, f64::INFINITY, 1e-40] {
        refuses_init!(
            &format!("Gsp epsilon = {epsilon}"),
            ["Gsp", "epsilon"],
            gsp().with_epsilon(epsilon)
        );
    }
    refuses_init!(
        "Gsp max_iterations = 0",
        ["Gsp", "max_iterations"],
        gsp().with_max_iterations(0)
    );
    for tolerance in [0.0, -1e-6, f64::NAN] {
        refuses_init!(
            &format!("Gsp tolerance = {tolerance}"),
            ["Gsp", "tolerance"],
            gsp().with_tolerance(tolerance)
        );
    }

    // The attention layers (C = 4).
    let map = || AttentionPoolConfig::new(C).with_num_heads(2);
    refuses_init!(
        "AttentionPool channels = 0",
        ["AttentionPool", "channels"],
        AttentionPoolConfig::new(0)
    );
    refuses_init!(
        "AttentionPool num_heads = 0",
        ["AttentionPool", "num_heads"],
        map().with_num_heads(0)
    );
    refuses_init!(
        "AttentionPool num_heads = 3 with C = 4",
        ["AttentionPool", "num_heads", "channels = 4"],
        map().with_num_heads(3)
    );
    refuses_init!(
        "AttentionPool latent_len = 0",
        ["AttentionPool", "latent_len"],
        map().with_latent_len(0)
    );
    for ratio in [0.0, -1.0, f64::NAN, f64::INFINITY, 0.1] {
        refuses_init!(
            &format!("AttentionPool mlp_ratio = {ratio}"),
            ["AttentionPool", "mlp_ratio"],
            map().with_mlp_ratio(ratio)
        );
    }
    for eps in [0.0, f64::NAN] {
        refuses_init!(
            &format!("AttentionPool norm_eps = {eps}"),
            ["AttentionPool", "norm_eps"],
            map().with_norm_eps(eps)
        );
        refuses_init!(
            &format!("SimPool norm_eps = {eps}"),
            ["SimPool", "norm_eps"],
            SimPoolConfig::new(C).with_norm_eps(eps)
        );
    }
    refuses_init!(
        "SimPool channels = 0",
        ["SimPool", "channels"],
        SimPoolConfig::new(0)
    );
    for gamma in [0.0, -1.0, f64::NAN, f64::INFINITY, 0.01] {
        refuses_init!(
            &format!("SimPool gamma = {gamma}"),
            ["SimPool", "gamma"],
            SimPoolConfig::new(C).with_gamma(Some(gamma))
        );
    }
    refuses_init!(
        "SimPool learnable_shift without gamma",
        ["SimPool", "learnable_shift", "gamma"],
        SimPoolConfig::new(C).with_learnable_shift(true)
    );
    for (what, fragment, run) in [
        (
            "AttentionPool num_heads set to 3 after init",
            ["AttentionPool", "num_heads"],
            (|d: &Device| {
                let mut pool = AttentionPoolConfig::new(C).with_num_heads(2).init(d);
                pool.num_heads = 3;
                let _ = read(pool.forward_tokens(Tensor::<3>::ones([2, 3, C], d)));
            }) as fn(&Device),
        ),
        (
            "SimPool gamma set to NaN after init",
            ["SimPool", "gamma"],
            |d| {
                let mut pool = SimPoolConfig::new(C).with_gamma(Some(2.0)).init(d);
                pool.gamma = Some(f64::NAN);
                let _ = read(pool.forward_tokens(Tensor::<3>::ones([2, 3, C], d)));
            },
        ),
    ] {
        let d = device.clone();
        cases.push(Case::panics(tag(what), &fragment, move || run(&d)));
    }
    let d = device.clone();
    cases.push(Case::returns(
        tag("SimPool β trained to -5 pools at the exponent floor"),
        move || {
            let mut shifted = SimPoolConfig::new(C)
                .with_gamma(Some(1.25))
                .with_learnable_shift(true)
                .init(&d);
            shifted.beta = Some(Param::from_tensor(Tensor::<1>::from_data([-5.0f32], &d)));
            let floor = burn_pooling::SimPool {
                gamma: Some(burn_pooling::SIMPOOL_MIN_EXPONENT),
                beta: None,
                ..shifted.clone()
            };
            let x = floats(&tokens_values(18, (2, 3), (-1.0, 1.0)), [2, 3, C], &d);
            let a = read(shifted.forward_tokens(x.clone()));
            close("γ + β = -3.75", &a, &read(floor.forward_tokens(x)), 1e-5)
        },
    ));

    // Allocation-sized parameters: a named panic before any allocation, not an abort.
    for (what, config) in [
        (
            "Gsp num_prototypes = 2^40",
            gsp().with_num_prototypes(1 << 40),
        ),
        ("Gsp channels = 2^40", GspConfig::new(1 << 40)),
        (
            "Gsp K·C = 2^62",
            GspConfig::new(1 << 31).with_num_prototypes(1 << 31),
        ),
    ] {
        let d = device.clone();
        let fragment = if what.contains("channels") {
            "channels"
        } else {
            "num_prototypes"
        };
        cases.push(
            Case::panics(tag(what), &["Gsp", fragment], move || {
                let _ = config.init(&d);
            })
            .isolated(),
        );
    }
    for (what, layer, fragment, config) in [
        (
            "AttentionPool channels = 2^40",
            "AttentionPool",
            "channels",
            PoolingConfig::AttentionPool(AttentionPoolConfig::new(1 << 40)),
        ),
        (
            "AttentionPool latent_len = 2^40",
            "AttentionPool",
            "latent_len",
            PoolingConfig::AttentionPool(
                AttentionPoolConfig::new(C)
                    .with_num_heads(2)
                    .with_latent_len(1 << 40),
            ),
        ),
        (
            "SimPool channels = 2^40",
            "SimPool",
            "channels",
            PoolingConfig::SimPool(SimPoolConfig::new(1 << 40)),
        ),
    ] {
        let d = device.clone();
        cases.push(
            Case::panics(tag(what), &[layer, fragment], move || {
                let _ = config.init(&d);
            })
            .isolated(),
        );
    }

    // Values changed after `init`. A power trained to 0 or below pools as MIN_POWER (a clamp,
    // no device read); a NaN power is not hidden.
    let powered = |p: f64, d: &Device| {
        let x = floats(&tokens_values(17, (2, 3), (0.1, 1.0)), [2, 3, C], d);
        let mut gem = GemConfig::new().init(d);
        gem.p = Param::from_tensor(Tensor::<1>::from_data([p as f32], d));
        let mut ggem = GroupGemConfig::new(2).init(d);
        ggem.p = Param::from_tensor(Tensor::<1>::from_data([3.0, p as f32], d));
        (
            read(gem.forward_tokens(x.clone())),
            read(ggem.forward_tokens(x)),
        )
    };
    for p in [0.0, -2.0] {
        let d = device.clone();
        cases.push(Case::returns(
            tag(&format!(
                "Gem and GroupGem p set to {p} after init pool as MIN_POWER"
            )),
            move || {
                let (gem, ggem) = powered(p, &d);
                let (gem_floor, ggem_floor) = powered(MIN_POWER, &d);
                close("Gem", &gem, &gem_floor, 1e-5)?;
                close("GroupGem", &ggem, &ggem_floor, 1e-5)
            },
        ));
    }
    let d = device.clone();
    cases.push(Case::returns(
        tag("Gem and GroupGem p set to NaN after init give NaN"),
        move || {
            let (gem, ggem) = powered(f64::NAN, &d);
            if gem.iter().any(|v| v.is_finite()) || ggem.iter().all(|v| v.is_finite()) {
                return Err(format!(
                    "a NaN power is hidden: Gem {gem:?}, GroupGem {ggem:?}"
                ));
            }
            Ok(())
        },
    ));
    let d = device.clone();
    cases.push(Case::panics(
        tag("Gem eps set to -1 after init"),
        &["Gem", "eps"],
        move || {
            let mut gem = GemConfig::new().init(&d);
            gem.eps = -1.0;
            let _ = read(gem.forward_tokens(tokens(&d)));
        },
    ));
    let d = device.clone();
    cases.push(Case::panics(
        tag("GroupGem eps set to NaN after init"),
        &["GroupGem", "eps"],
        move || {
            let mut ggem = GroupGemConfig::new(2).init(&d);
            ggem.eps = f64::NAN;
            let _ = read(ggem.forward_tokens(tokens(&d)));
        },
    ));
    for (what, fragment, change) in [
        (
            "transport_ratio set to 0",
            "transport_ratio",
            (|s: &mut TransportSettings| s.transport_ratio = 0.0) as fn(&mut TransportSettings),
        ),
        ("transport_ratio set to 2", "transport_ratio", |s| {
            s.transport_ratio = 2.0
        }),
        ("epsilon set to -0.2", "epsilon", |s| s.epsilon = -0.2),
        ("epsilon set to 0", "epsilon", |s| s.epsilon = 0.0),
        ("max_iterations set to 0", "max_iterations", |s| {
            s.max_iterations = 0
        }),
        ("tolerance set to NaN", "tolerance", |s| {
            s.tolerance = f64::NAN
        }),
    ] {
        let d = device.clone();
        cases.push(Case::panics(
            tag(&format!("Gsp {what} after init")),
            &["Gsp", fragment],
            move || {
                let mut gsp = gsp().init(&d);
                change(&mut gsp.settings);
                let _ = read(gsp.forward_tokens(tokens(&d)));
            },
        ));
    }
}

/// GSP's own extremes: solvers that must return, weights that must sum to 1, φ at the float
/// limit, the convergence flag.
fn gsp_cases((backend, device): &(String, Device), cases: &mut Vec<Case>) {
    let tag = |what: &str| format!("Gsp/{backend}/{what}");
    let (b, n) = (2, 6);
    let detailed = move |gsp: &Gsp, values: &[f64], d: &Device| {
        let out = gsp.forward_detailed(PoolingInput::tokens(floats(values, [b, n, C], d)));
        let converged = read_bool(out.converged);
        (read(out.pooled), read(out.weights), converged)
    };
    let weight_sums = move |weights: &[f64]| -> Result<(), String> {
        for (s, row) in weights.chunks(n).enumerate() {
            let sum: f64 = row.iter().sum();
            if (sum - 1.0).abs() > 1e-3 || row.iter().any(|w| !w.is_finite() || *w < -1e-6) {
                return Err(format!("weights of sample {s} sum to {sum}: {row:?}"));
            }
        }
        Ok(())
    };
    for solver in [TransportSolver::Newton, TransportSolver::Sinkhorn] {
        for (what, epsilon) in [("ε = 0.2", 0.2), ("ε = 1e-3", 1e-3)] {
            let d = device.clone();
            cases.push(
                Case::returns(
                    tag(&format!(
                        "{solver:?}, {what}, tolerance 1e-30, max_iterations 10^12 returns"
                    )),
                    move || {
                        let gsp = GspConfig::new(C)
                            .with_num_prototypes(3)
                            .with_solver(solver)
                            .with_epsilon(epsilon)
                            .with_tolerance(1e-30)
                            .with_max_iterations(1_000_000_000_000)
                            .init(&d);
                        let values = tokens_values(11, (b, n), (-1.0, 1.0));
                        let (pooled, weights, _) = detailed(&gsp, &values, &d);
                        all_finite("pooled", &pooled)?;
                        weight_sums(&weights)
                    },
                )
                .isolated(),
            );
        }
        let d = device.clone();
        cases.push(
            Case::returns(
                tag(&format!(
                    "{solver:?}, NaN features, max_iterations 10^12 returns"
                )),
                move || {
                    let gsp = GspConfig::new(C)
                        .with_num_prototypes(3)
                        .with_solver(solver)
                        .with_max_iterations(1_000_000_000_000)
                        .init(&d);
                    let mut values = tokens_values(12, (b, n), (-1.0, 1.0));
                    values[n * C..].fill(f64::NAN);
                    let (pooled, weights, converged) = detailed(&gsp, &values, &d);
                    all_finite("sample 0's pooled", &pooled[..C])?;
                    weight_sums(&weights[..n])?;
                    if converged {
                        return Err("converged = true with a NaN sample".into());
                    }
                    Ok(())
                },
            )
            .isolated(),
        );
        let d = device.clone();
        cases.push(
            Case::returns(
                tag(&format!(
                    "{solver:?}, max_iterations = usize::MAX converges"
                )),
                move || {
                    let gsp = GspConfig::new(C)
                        .with_num_prototypes(3)
                        .with_solver(solver)
                        .with_tolerance(1e-4)
                        .with_max_iterations(usize::MAX)
                        .init(&d);
                    let values = tokens_values(13, (b, n), (-1.0, 1.0));
                    let (_, weights, converged) = detailed(&gsp, &values, &d);
                    weight_sums(&weights)?;
                    converged
                        .then_some(())
                        .ok_or("converged = false".to_string())
                },
            )
            .isolated(),
        );
    }
    for mu in [1e-6, 1e-4] {
        let d = device.clone();
        cases.push(Case::returns(
            tag(&format!("μ = {mu}: weights sum to 1")),
            move || {
                let gsp = GspConfig::new(C)
                    .with_num_prototypes(3)
                    .with_transport_ratio(mu)
                    .init(&d);
                let values = tokens_values(14, (b, n), (-1.0, 1.0));
                let (pooled, weights, _) = detailed(&gsp, &values, &d);
                all_finite("pooled", &pooled)?;
                weight_sums(&weights)
            },
        ));
    }
    for scale in [1e20, 1e30] {
        let d = device.clone();
        cases.push(Case::returns(
            tag(&format!("features ×{scale:e} pool as ×1, scaled (φ)")),
            move || {
                // Every ‖x_n‖ ≥ 1, so φ(s·x) = φ(x) and GSP(s·x) = s·GSP(x).
                let values: Vec<f64> = tokens_values(15, (b, n), (1.0, 2.0));
                let gsp = GspConfig::new(C).with_num_prototypes(3).init(&d);
                let scaled: Vec<f64> = values.iter().map(|v| v * scale).collect();
                let (pooled, _, _) = detailed(&gsp, &values, &d);
                let (big, _, _) = detailed(&gsp, &scaled, &d);
                let big: Vec<f64> = big.iter().map(|v| v / scale).collect();
                close("GSP(s·x)/s vs GSP(x)", &big, &pooled, 1e-3)
            },
        ));
    }
    gsp_readout_cases(backend, device, cases);
}

/// The public transport API and the zero-shot loss.
fn api_cases((backend, device): &(String, Device), cases: &mut Vec<Case>) {
    let tag = |what: &str| format!("{what}/{backend}");
    let settings = || TransportSettings {
        transport_ratio: 0.3,
        epsilon: 0.2,
        max_iterations: 100,
        tolerance: 1e-6,
        solver: TransportSolver::Newton,
    };
    for (what, k, n, fragment) in [("K = 0", 0, 4, "K"), ("N = 0", 3, 0, "N")] {
        let d = device.clone();
        cases.push(Case::panics(
            tag(&format!("partial_transport {what}")),
            &["partial_transport", fragment],
            move || {
                let costs = Tensor::<3>::ones([2, k, n], &d);
                let mass = Tensor::<2>::ones([2, n], &d).div_scalar(n.max(1) as f64);
                let _ = read(partial_transport(costs, mass, &settings()).plan);
            },
        ));
    }
    for cost in [1e30, 1e38] {
        let d = device.clone();
        cases.push(Case::returns(
            tag(&format!(
                "partial_transport costs near {cost:e} move μ or say they did not converge"
            )),
            move || {
                let (k, n) = (3, 4);
                let mut rng = Rng::new(16);
                let values: Vec<f64> = (0..2 * k * n)
                    .map(|_| cost * rng.uniform(0.5, 1.0))
                    .collect();
                let costs = floats(&values, [2, k, n], &d);
                let mass = Tensor::<2>::ones([2, n], &d).div_scalar(n as f64);
                let solved = partial_transport(costs, mass, &settings());
                if !read_bool(solved.converged) {
                    return Ok(()); // flagged: the plan may be off, and the caller is told
                }
                let plan = read(solved.plan);
                all_finite("plan", &plan)?;
                for s in 0..2 {
                    let moved: f64 = plan[s * (k + 1) * n + n..(s + 1) * (k + 1) * n]
                        .iter()
                        .sum();
                    if (moved - 0.3).abs() > 1e-3 {
                        return Err(format!("sample {s} moved {moved}, expected μ = 0.3"));
                    }
                }
                Ok(())
            },
        ));
    }
    balanced_cases(backend, device, cases);
    let d = device.clone();
    cases.push(Case::returns(
        tag("lipschitz_normalize([3e38, 0]) = [1, 0]"),
        move || {
            let v = floats(&[3e38, 0.0, 1e20, 1e20], [2, 2], &d);
            let out = read(lipschitz_normalize(v, 1));
            close(
                "φ",
                &out,
                &[
                    1.0,
                    0.0,
                    std::f64::consts::FRAC_1_SQRT_2,
                    std::f64::consts::FRAC_1_SQRT_2,
                ],
                1e-5,
            )
        },
    ));
    let d = device.clone();
    cases.push(Case::returns(
        tag("ZeroShotLoss, ridge 1e-30, identical attributes: finite"),
        move || {
            let loss = ZeroShotLossConfig::new(4, 3).with_ridge(1e-30).init(&d);
            let attributes = Tensor::<2>::ones([4, 3], &d).div_scalar(3.0);
            let labels = Tensor::<1, Int>::from_data([0, 1, 2, 3], &d);
            let split = ZeroShotSplit::Indices(vec![0, 1], vec![2, 3]);
            all_finite("loss", &read(loss.forward(attributes, labels, &split)))
        },
    ));
    let d = device.clone();
    cases.push(Case::panics(
        tag("ZeroShotLoss, K = 0 attributes"),
        &["ZeroShotLoss", "K"],
        move || {
            let loss = ZeroShotLossConfig::new(4, 3).init(&d);
            let attributes = Tensor::<2>::ones([4, 0], &d);
            let labels = Tensor::<1, Int>::from_data([0, 1, 2, 3], &d);
            let split = ZeroShotSplit::Indices(vec![0, 1], vec![2, 3]);
            let _ = read(loss.forward(attributes, labels, &split));
        },
    ));
    let d = device.clone();
    cases.push(Case::panics(
        tag("ZeroShotLoss, label -1"),
        &["ZeroShotLoss", "-1"],
        move || {
            let loss = ZeroShotLossConfig::new(4, 3).init(&d);
            let attributes = Tensor::<2>::ones([4, 3], &d).div_scalar(3.0);
            let labels = Tensor::<1, Int>::from_data([0, 1, -1, 3], &d);
            let split = ZeroShotSplit::Indices(vec![0, 1], vec![2, 3]);
            let _ = read(loss.forward(attributes, labels, &split));
        },
    ));
}

/// `balanced_transport`: empty sides, unbalanced, negative or NaN masses, a bad ε or shape
/// (named panics); costs near the float limit (a finite plan, converged only with the right
/// marginals); NaN costs in a masked column (no leak).
fn balanced_cases(backend: &str, device: &Device, cases: &mut Vec<Case>) {
    let tag = |what: &str| format!("balanced_transport {what}/{backend}");
    let uniform = |d: &Device, b: usize, len: usize| {
        Tensor::<2>::ones([b, len], d).div_scalar(len.max(1) as f64)
    };
    for (what, k, n, fragment) in [("K = 0", 0, 4, "K = 0"), ("N = 0", 3, 0, "N = 0")] {
        let d = device.clone();
        cases.push(Case::panics(
            tag(what),
            &["balanced_transport", fragment],
            move || {
                let costs = Tensor::<3>::ones([2, k, n], &d);
                let solved = balanced_transport(
                    costs,
                    uniform(&d, 2, k),
                    uniform(&d, 2, n),
                    None,
                    &BalancedSettings::new(0.1),
                );
                let _ = read(solved.plan);
            },
        ));
    }
    let masses: [(&str, [f64; 3], [f64; 4], &[&str]); 3] = [
        (
            "unequal masses",
            [0.2, 0.3, 0.5],
            [0.25, 0.25, 0.25, 0.5],
            &["Σ row_mass", "Σ column_mass", "1.25"],
        ),
        (
            "a negative mass",
            [0.6, -0.1, 0.5],
            [0.25; 4],
            &["non-negative", "-0.1"],
        ),
        (
            "a NaN mass",
            [0.5, f64::NAN, 0.5],
            [0.25; 4],
            &["non-negative", "NaN"],
        ),
    ];
    for (what, rows, columns, fragments) in masses {
        let d = device.clone();
        let mut expected = vec!["balanced_transport"];
        expected.extend_from_slice(fragments);
        cases.push(Case::panics(tag(what), &expected, move || {
            let solved = balanced_transport(
                Tensor::<3>::ones([1, 3, 4], &d),
                floats(&rows, [1, 3], &d),
                floats(&columns, [1, 4], &d),
                None,
                &BalancedSettings::new(0.1),
            );
            let _ = read(solved.plan);
        }));
    }
    for epsilon in [0.0, -1.0, f64::NAN] {
        let d = device.clone();
        cases.push(Case::panics(
            tag(&format!("ε = {epsilon}")),
            &["balanced_transport", "epsilon", &format!("{epsilon}")],
            move || {
                let solved = balanced_transport(
                    Tensor::<3>::ones([1, 3, 4], &d),
                    uniform(&d, 1, 3),
                    uniform(&d, 1, 4),
                    None,
                    &BalancedSettings::new(epsilon),
                );
                let _ = read(solved.plan);
            },
        ));
    }
    let d = device.clone();
    cases.push(Case::panics(
        tag("row_mass [1, 2] for K = 3"),
        &["balanced_transport", "row_mass", "[1, 3]", "[1, 2]"],
        move || {
            let solved = balanced_transport(
                Tensor::<3>::ones([1, 3, 4], &d),
                uniform(&d, 1, 2),
                uniform(&d, 1, 4),
                None,
                &BalancedSettings::new(0.1),
            );
            let _ = read(solved.plan);
        },
    ));
    for cost in [1e30, 1e38] {
        let d = device.clone();
        cases.push(Case::returns(
            tag(&format!(
                "costs near {cost:e}: finite, right marginals or not converged"
            )),
            move || {
                let (k, n) = (3, 4);
                let mut rng = Rng::new(23);
                let values: Vec<f64> = (0..2 * k * n)
                    .map(|_| cost * rng.uniform(0.5, 1.0))
                    .collect();
                let solved = balanced_transport(
                    floats(&values, [2, k, n], &d),
                    uniform(&d, 2, k),
                    uniform(&d, 2, n),
                    None,
                    &BalancedSettings::new(0.1).with_max_iterations(usize::MAX),
                );
                let plan = read(solved.plan);
                all_finite("plan", &plan)?;
                if !read_bool(solved.converged) {
                    return Ok(());
                }
                for s in 0..2 {
                    let sample = &plan[s * k * n..(s + 1) * k * n];
                    for i in 0..k {
                        let row: f64 = sample[i * n..(i + 1) * n].iter().sum();
                        if (row - 1.0 / k as f64).abs() > 1e-4 {
                            return Err(format!("sample {s} row {i} sums to {row}, converged"));
                        }
                    }
                }
                Ok(())
            },
        ));
    }
    let d = device.clone();
    cases.push(Case::returns(
        tag("NaN costs in a masked column do not leak"),
        move || {
            let (k, n) = (3, 5);
            let mut rng = Rng::new(29);
            let mut values: Vec<f64> = (0..k * n).map(|_| rng.uniform(0.0, 1.0)).collect();
            let clean = values.clone();
            for i in 0..k {
                values[i * n + 2] = f64::NAN;
            }
            let columns = [0.25, 0.25, 0.0, 0.25, 0.25];
            let solve = |values: &[f64]| {
                let solved = balanced_transport(
                    floats(values, [1, k, n], &d),
                    uniform(&d, 1, k),
                    floats(&columns, [1, n], &d),
                    None,
                    &BalancedSettings::new(0.1),
                );
                (read(solved.plan), read_bool(solved.converged))
            };
            let (plan, converged) = solve(&values);
            let (reference, _) = solve(&clean);
            all_finite("plan", &plan)?;
            if !converged {
                return Err("not converged".into());
            }
            if (0..k).any(|i| plan[i * n + 2] != 0.0) {
                return Err(format!("the masked column is not 0: {plan:?}"));
            }
            close("plan", &plan, &reference, 1e-5)
        },
    ));
}

/// A layer whose parameters live on another device than its input: a named panic.
fn device_cases(devices: &[(String, Device)], cases: &mut Vec<Case>) {
    let plain: Vec<&(String, Device)> = devices
        .iter()
        .filter(|(name, _)| !name.contains('+'))
        .collect();
    for pair in plain.windows(2) {
        let ((a, da), (b, db)) = (pair[0].clone(), pair[1].clone());
        for name in [
            "Gem",
            "GroupGem",
            "Gsp",
            "Lse",
            "AttentionPool",
            "SimPool",
            "NetVlad",
            "Otk",
            "OtAggregation",
        ] {
            let (da, db) = (da.clone(), db.clone());
            cases.push(Case::panics(
                format!("{name}/params on {a}, input on {b}"),
                &[name, "device"],
                move || {
                    let pooling = layer(name, &da);
                    let _ = read(pooling.forward_tokens(Tensor::<3>::ones([2, 3, C], &db)));
                },
            ));
        }
    }
}

fn all_cases() -> Vec<Case> {
    let devices = backends();
    let mut cases = Vec::new();
    for backend in &devices {
        for name in LAYERS {
            shape_cases(name, backend, &mut cases);
            padding_cases(name, backend, &mut cases);
            value_cases(name, backend, &mut cases);
        }
        config_cases(backend, &mut cases);
        gsp_cases(backend, &mut cases);
        api_cases(backend, &mut cases);
        netvlad_cases(backend, &mut cases);
        otk_cases(backend, &mut cases);
        ot_aggregation_cases(backend, &mut cases);
    }
    device_cases(&devices, &mut cases);
    cases
}

// ---------------------------------------------------------------------------------------------
// The runner
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    Pass,
    NoPanic,
    PanicWithoutItsCause,
    UnexpectedPanic,
    WrongValue,
    Hang,
    Abort,
}

fn message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "<non-string panic>".into())
}

/// Keeps the case threads' expected panics off the test output; other threads' panics print.
fn quiet_case_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let default = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if std::thread::current().name() != Some(CASE_THREAD) {
                default(info);
            }
        }));
    });
}

/// Runs one case's check on its own thread under the time limit.
fn run_in_thread(case: Case) -> (Outcome, String) {
    let (sender, receiver) = mpsc::channel();
    let check = case.check;
    std::thread::Builder::new()
        .name(CASE_THREAD.into())
        .spawn(move || {
            let result = panic::catch_unwind(AssertUnwindSafe(check));
            let _ = sender.send(result.map_err(|payload| message(payload.as_ref())));
        })
        .expect("spawn a case thread");
    match (receiver.recv_timeout(time_limit()), case.panics_with) {
        (Err(_), _) => (
            Outcome::Hang,
            format!("no return within {:?}", time_limit()),
        ),
        (Ok(Ok(Ok(()))), None) => (Outcome::Pass, String::new()),
        (Ok(Ok(Err(why))), None) => (Outcome::WrongValue, why),
        (Ok(Ok(_)), Some(fragments)) => (
            Outcome::NoPanic,
            format!("expected a panic naming {fragments:?}"),
        ),
        (Ok(Err(text)), None) => (Outcome::UnexpectedPanic, text),
        (Ok(Err(text)), Some(fragments)) => {
            if fragments.iter().all(|f| text.contains(f.as_str())) {
                (Outcome::Pass, String::new())
            } else {
                (
                    Outcome::PanicWithoutItsCause,
                    format!("{text:?} does not name all of {fragments:?}"),
                )
            }
        }
    }
}

/// The environment variable that makes `bad_input_matrix`, in a child process, run the one
/// case it names.
const ISOLATED: &str = "BURN_POOLING_BAD_INPUT_CASE";

/// Runs a case in a child process (this test binary's `bad_input_matrix`, told which case by
/// the environment), so that an abort is seen and a hang is killed.
fn run_in_child(name: &str) -> (Outcome, String) {
    static CHILDREN: AtomicUsize = AtomicUsize::new(0);
    let log = std::env::temp_dir().join(format!(
        "burn-pooling-bad-input-{}-{}.log",
        std::process::id(),
        CHILDREN.fetch_add(1, Ordering::Relaxed)
    ));
    let mut child = std::process::Command::new(std::env::current_exe().expect("the test binary"))
        .args([
            "bad_input::bad_input_matrix",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ISOLATED, name)
        .stdout(std::fs::File::create(&log).expect("a log file for the child"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run the test binary");
    // The child has its own limit per case; this one also covers its start.
    let limit = time_limit() + Duration::from_secs(30);
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the child") {
            break Some(status);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    let Some(status) = status else {
        return (
            Outcome::Hang,
            format!("the child process ran past {limit:?}"),
        );
    };
    match stdout
        .lines()
        .find_map(|line| line.split_once("bad-input outcome: ").map(|(_, rest)| rest))
    {
        Some(line) => {
            let (outcome, why) = line.split_once(" | ").unwrap_or((line, ""));
            let outcome = match outcome {
                "Pass" => Outcome::Pass,
                "NoPanic" => Outcome::NoPanic,
                "PanicWithoutItsCause" => Outcome::PanicWithoutItsCause,
                "UnexpectedPanic" => Outcome::UnexpectedPanic,
                "WrongValue" => Outcome::WrongValue,
                _ => Outcome::Hang,
            };
            (outcome, why.to_string())
        }
        None => (
            Outcome::Abort,
            format!("the child process ended with {status} and no outcome"),
        ),
    }
}

/// The child process's part: runs the case named by the environment and prints its outcome.
fn run_isolated(name: &str) {
    let case = all_cases()
        .into_iter()
        .find(|case| case.name == name)
        .unwrap_or_else(|| panic!("no bad-input case named {name}"));
    let (outcome, why) = run_in_thread(case);
    // On a line of its own: the harness prints the test name before it.
    println!("\nbad-input outcome: {outcome:?} | {why}");
}

#[test]
fn bad_input_matrix() {
    quiet_case_panics();
    if let Ok(name) = std::env::var(ISOLATED) {
        return run_isolated(&name);
    }
    // `BURN_POOLING_BAD_INPUT_FILTER=OtAggregation` runs only the cases whose name contains it.
    let filter = std::env::var("BURN_POOLING_BAD_INPUT_FILTER").unwrap_or_default();
    let cases: Vec<Case> = all_cases()
        .into_iter()
        .filter(|case| case.name.contains(&filter))
        .collect();
    let total = cases.len();
    let mut results: Vec<(String, Outcome, String)> = Vec::with_capacity(total);
    for case in cases {
        let name = case.name.clone();
        let (outcome, why) = if case.isolate {
            run_in_child(&name)
        } else {
            run_in_thread(case)
        };
        results.push((name, outcome, why));
    }
    let mut counts = std::collections::BTreeMap::new();
    for (_, outcome, _) in &results {
        *counts.entry(*outcome).or_insert(0usize) += 1;
    }
    println!("bad-input matrix: {total} cases: {counts:?}");
    let failures: Vec<String> = results
        .iter()
        .filter(|(_, outcome, _)| *outcome != Outcome::Pass)
        .map(|(name, outcome, why)| format!("  {outcome:?}: {name}: {why}"))
        .collect();
    for line in &failures {
        println!("{line}");
    }
    assert!(
        failures.is_empty(),
        "{} of {total} bad-input cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// GSP as its authors run it (a `[C, 3]` projection, the GeM and max read-outs, the max
/// branch): its config rows (projection width 0 or allocation-sized, read-out power p ≤ 0), a
/// read-out changed after `init`, a power trained to 0, padding garbage and NaN at a valid
/// position, and a channel mismatch.
fn gsp_readout_cases(backend: &str, device: &Device, cases: &mut Vec<Case>) {
    let tag = |what: &str| format!("Gsp/{backend}/{what}");
    let tokens = |d: &Device| Tensor::<3>::ones([2, 3, C], d);
    let projected = |readout: GspReadout| {
        GspConfig::new(C)
            .with_num_prototypes(3)
            .with_projection(Some(3))
            .with_readout(readout)
            .with_max_branch(true)
    };
    let d = device.clone();
    cases.push(Case::panics(
        tag("projection = 0"),
        &["Gsp", "projection"],
        move || {
            let gsp = projected(GspReadout::Mean)
                .with_projection(Some(0))
                .init(&d);
            let _ = read(gsp.forward_tokens(tokens(&d)));
        },
    ));
    let d = device.clone();
    cases.push(
        Case::panics(
            tag("projection = 2^40"),
            &["Gsp", "projection"],
            move || {
                let _ = projected(GspReadout::Mean)
                    .with_projection(Some(1 << 40))
                    .init(&d);
            },
        )
        .isolated(),
    );
    for p in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e-50] {
        let d = device.clone();
        cases.push(Case::panics(
            tag(&format!("readout_p = {p}")),
            &["Gsp", "readout_p"],
            move || {
                let gsp = projected(GspReadout::GeneralizedMean)
                    .with_readout_p(p)
                    .init(&d);
                let _ = read(gsp.forward_tokens(tokens(&d)));
            },
        ));
    }
    let d = device.clone();
    cases.push(Case::panics(
        tag("readout set to GeneralizedMean after init"),
        &["Gsp", "GeneralizedMean", "readout_p"],
        move || {
            let mut gsp = projected(GspReadout::Mean).init(&d);
            gsp.readout = GspReadout::GeneralizedMean;
            let _ = read(gsp.forward_tokens(tokens(&d)));
        },
    ));
    let d = device.clone();
    cases.push(Case::panics(
        tag("projected, C = 3 input for C = 4"),
        &["Gsp", "channel mismatch", "projection"],
        move || {
            let gsp = projected(GspReadout::Max).init(&d);
            let _ = read(gsp.forward_tokens(Tensor::<3>::ones([2, 5, 3], &d)));
        },
    ));
    // A power trained to 0 or below pools as MIN_POWER, as Gem's does.
    for p in [0.0, -2.0] {
        let d = device.clone();
        cases.push(Case::returns(
            tag(&format!(
                "readout_p set to {p} after init pools as MIN_POWER"
            )),
            move || {
                let x = floats(&tokens_values(31, (2, 5), (0.1, 1.0)), [2, 5, C], &d);
                let gsp = projected(GspReadout::GeneralizedMean).init(&d);
                let with = |p: f64| {
                    let mut gsp = gsp.clone();
                    gsp.readout_p =
                        Some(Param::from_tensor(Tensor::<1>::from_data([p as f32], &d)));
                    read(gsp.forward_tokens(x.clone()))
                };
                close("GSP GeM read-out", &with(p), &with(MIN_POWER), 1e-5)
            },
        ));
    }
    for readout in [GspReadout::GeneralizedMean, GspReadout::Max] {
        let (b, n) = (2, 5);
        let keep = [
            true, false, true, true, false, true, true, true, true, false,
        ];
        for (garbage_name, garbage) in [("NaN", f64::NAN), ("+Inf", f64::INFINITY)] {
            let d = device.clone();
            cases.push(Case::returns(
                tag(&format!(
                    "projected {readout:?} + max branch, {garbage_name} at masked positions"
                )),
                move || {
                    let mut values = tokens_values(32, (b, n), (0.1, 1.0));
                    let rows = valid_rows(&values, n, &keep);
                    for (i, v) in values.iter_mut().enumerate() {
                        if !keep[i / C] {
                            *v = garbage;
                        }
                    }
                    let pooling = Pooling::Gsp(projected(readout).init(&d));
                    let (out, grad) = forward_tokens(&pooling, &values, (b, n), Some(&keep), &d);
                    let reference: Vec<f64> = rows
                        .iter()
                        .flat_map(|set| {
                            let x = floats(&set.concat(), [1, set.len(), C], &d);
                            read(pooling.forward_tokens(x))
                        })
                        .collect();
                    close("output vs the padding-free input", &out, &reference, 2e-4)?;
                    if let Some(grad) = grad {
                        all_finite("input gradient", &grad)?;
                        if let Some(i) = (0..grad.len()).find(|&i| !keep[i / C] && grad[i] != 0.0) {
                            return Err(format!(
                                "input gradient at masked element {i} = {}",
                                grad[i]
                            ));
                        }
                    }
                    Ok(())
                },
            ));
        }
        let d = device.clone();
        cases.push(Case::returns(
            tag(&format!(
                "projected {readout:?}: NaN at a valid position stays in its sample"
            )),
            move || {
                let mut values = tokens_values(33, (b, n), (0.1, 1.0));
                values[C..2 * C].fill(f64::NAN);
                let gsp = projected(readout).init(&d);
                let out = read(gsp.forward_tokens(floats(&values, [b, n, C], &d)));
                if out[..3].iter().all(|v| v.is_finite()) {
                    return Err(format!("sample 0 hides its NaN: {out:?}"));
                }
                all_finite("sample 1", &out[3..])
            },
        ));
    }
}

/// NetVLAD's own cases: configs `init` refuses, values changed after `init`, and V2 (the
/// matrix's `NetVlad` is V1) on padding garbage and at the float limits.
fn netvlad_cases((backend, device): &(String, Device), cases: &mut Vec<Case>) {
    let tag = |what: &str| format!("NetVlad/{backend}/{what}");
    let tokens = |d: &Device| Tensor::<3>::ones([2, 3, C], d);
    let small = || NetVladConfig::new(C).with_num_clusters(3);
    let mut refuses = |what: &str, fragment: &'static str, config: NetVladConfig| {
        let d = device.clone();
        cases.push(Case::panics(tag(what), &["NetVlad", fragment], move || {
            let _ = read(config.init(&d).forward_tokens(tokens(&d)));
        }));
    };
    refuses(
        "num_clusters = 0",
        "num_clusters",
        small().with_num_clusters(0),
    );
    refuses("channels = 0", "channels", NetVladConfig::new(0));
    for alpha in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        refuses(
            &format!("alpha = {alpha}"),
            "alpha",
            small().with_alpha(alpha),
        );
    }
    let d = device.clone();
    cases.push(
        Case::panics(
            tag("K·C = 2^62"),
            &["NetVlad", "num_clusters"],
            move || {
                let _ = NetVladConfig::new(1 << 31)
                    .with_num_clusters(1 << 31)
                    .init(&d);
            },
        )
        .isolated(),
    );
    // Values changed after `init`.
    let changed = |what: &str, fragments: &[&str], edit: fn(NetVlad, &Device) -> NetVlad| {
        let d = device.clone();
        Case::panics(tag(what), fragments, move || {
            let layer = edit(small().init(&d), &d);
            let _ = read(layer.forward_tokens(tokens(&d)));
        })
    };
    cases.push(changed(
        "centroids set to [0, C]",
        &["NetVlad", "K = 0"],
        |layer, d| NetVlad {
            centroids: Param::from_tensor(Tensor::<2>::zeros([0, C], d)),
            ..layer
        },
    ));
    cases.push(changed(
        "assignment set to [3, C + 1]",
        &["NetVlad", "assignment", "[3, 4]"],
        |layer, d| NetVlad {
            assignment: Some(Param::from_tensor(Tensor::<2>::zeros([3, C + 1], d))),
            ..layer
        },
    ));
    cases.push(changed(
        "bias set to [2]",
        &["NetVlad", "bias", "[3]"],
        |layer, d| NetVlad {
            bias: Some(Param::from_tensor(Tensor::<1>::zeros([2], d))),
            ..layer
        },
    ));
    cases.push(changed(
        "alpha set to NaN",
        &["NetVlad", "alpha"],
        |layer, _| NetVlad {
            alpha: f64::NAN,
            ..layer
        },
    ));
    // V2 (decoupled and tied): padding garbage never leaks, and values at the float limits
    // give finite outputs and gradients.
    let (b, n) = (2, 5);
    let keep = [
        true, false, true, true, false, true, true, true, true, false,
    ];
    for decoupled in [true, false] {
        let v2 = move |d: &Device| {
            Pooling::NetVlad(
                small()
                    .with_version(NetVladVersion::V2)
                    .with_alpha(2.0)
                    .with_decoupled(decoupled)
                    .init(d),
            )
        };
        for (garbage_name, garbage) in [("NaN", f64::NAN), ("f32::MAX", f32::MAX as f64)] {
            let d = device.clone();
            cases.push(Case::returns(
                tag(&format!(
                    "V2 decoupled = {decoupled}: {garbage_name} at masked positions"
                )),
                move || {
                    let mut values = tokens_values(3, (b, n), (0.1, 1.0));
                    let rows = valid_rows(&values, n, &keep);
                    for (i, v) in values.iter_mut().enumerate() {
                        if !keep[i / C] {
                            *v = garbage;
                        }
                    }
                    let pooling = v2(&d);
                    let (out, grad) = forward_tokens(&pooling, &values, (b, n), Some(&keep), &d);
                    close(
                        "output vs the padding-free input",
                        &out,
                        &dropped_reference(&pooling, &rows, &d),
                        2e-4,
                    )?;
                    if let Some(grad) = grad {
                        all_finite("input gradient", &grad)?;
                        if let Some(i) = (0..grad.len()).find(|&i| !keep[i / C] && grad[i] != 0.0) {
                            return Err(format!("input gradient at masked element {i}"));
                        }
                    }
                    Ok(())
                },
            ));
        }
        for (range_name, range, seed) in [
            ("values near f32::MAX", (1e37, 3.0e38), 7),
            ("values of mixed sign near f32::MAX", (-3.0e38, 3.0e38), 9),
            ("values near f32's smallest normal", (1e-38, 1e-37), 8),
        ] {
            let d = device.clone();
            cases.push(Case::returns(
                tag(&format!("V2 decoupled = {decoupled}: {range_name}")),
                move || {
                    let values = tokens_values(seed, (b, n), range);
                    let pooling = v2(&d);
                    let (out, grad) = forward_tokens(&pooling, &values, (b, n), None, &d);
                    all_finite("output", &out)?;
                    let norms: Vec<f64> = out
                        .chunks(out.len() / b)
                        .map(|y| y.iter().map(|v| v * v).sum::<f64>().sqrt())
                        .collect();
                    close("‖y‖ per sample", &norms, &[1.0; 2], 1e-4)?;
                    if let Some(grad) = grad {
                        all_finite("input gradient", &grad)?;
                    }
                    Ok(())
                },
            ));
        }
    }
}

/// OTK's own cases: configs `init` refuses, values changed after `init`, and its identity
/// oracle at the float limits: equal references see equal costs, so every plan row is uniform
/// (1/N per valid position) and every output block is the mean of the valid positions.
fn otk_cases((backend, device): &(String, Device), cases: &mut Vec<Case>) {
    let tag = |what: &str| format!("Otk/{backend}/{what}");
    let tokens = |d: &Device| Tensor::<3>::ones([2, 3, C], d);
    let small = || OtkConfig::new(C).with_num_references(3);
    let mut refuses = |what: &str, fragment: &'static str, config: OtkConfig| {
        let d = device.clone();
        cases.push(Case::panics(tag(what), &["Otk", fragment], move || {
            let _ = read(config.init(&d).forward_tokens(tokens(&d)));
        }));
    };
    refuses("channels = 0", "channels", OtkConfig::new(0));
    refuses(
        "num_references = 0",
        "num_references",
        small().with_num_references(0),
    );
    refuses("heads = 0", "heads", small().with_heads(0));
    for epsilon in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e-40] {
        refuses(
            &format!("epsilon = {epsilon}"),
            "epsilon",
            small().with_epsilon(epsilon),
        );
    }
    refuses(
        "max_iterations = 0",
        "max_iterations",
        small().with_max_iterations(0),
    );
    for tolerance in [0.0, f64::NAN] {
        refuses(
            &format!("tolerance = {tolerance}"),
            "tolerance",
            small().with_tolerance(tolerance),
        );
    }
    let d = device.clone();
    cases.push(
        Case::panics(
            tag("heads·p·C = 2^62"),
            &["Otk", "num_references"],
            move || {
                let _ = OtkConfig::new(1 << 31)
                    .with_num_references(1 << 31)
                    .init(&d);
            },
        )
        .isolated(),
    );
    // Values changed after `init`.
    let changed = |what: &str, fragments: &[&str], edit: fn(Otk, &Device) -> Otk| {
        let d = device.clone();
        Case::panics(tag(what), fragments, move || {
            let layer = edit(small().init(&d), &d);
            let _ = read(layer.forward_tokens(tokens(&d)));
        })
    };
    cases.push(changed(
        "references set to [1, 0, C]",
        &["Otk", "p = 0"],
        |layer, d| Otk {
            references: Param::from_tensor(Tensor::<3>::zeros([1, 0, C], d)),
            ..layer
        },
    ));
    cases.push(changed(
        "references set to [1, 3, C + 1]",
        &["Otk", "channel mismatch", "C = 5"],
        |layer, d| Otk {
            references: Param::from_tensor(Tensor::<3>::zeros([1, 3, C + 1], d)),
            ..layer
        },
    ));
    cases.push(changed(
        "epsilon set to NaN",
        &["Otk", "epsilon"],
        |layer, _| Otk {
            settings: BalancedSettings {
                epsilon: f64::NAN,
                ..layer.settings
            },
            ..layer
        },
    ));
    // Equal references: the output is p copies of the mean of the valid positions, masked
    // garbage included, at the float limits too.
    let (b, n) = (2, 5);
    let keep = [
        true, false, true, true, false, true, true, true, true, false,
    ];
    let equal = move |d: &Device| {
        Pooling::Otk(
            small()
                .with_heads(2)
                .with_initializer(Some(burn::nn::Initializer::Constant { value: 0.3 }))
                .init(d),
        )
    };
    let means = |rows: &[Vec<Vec<f64>>]| -> Vec<f64> {
        rows.iter()
            .flat_map(|set| {
                let mean: Vec<f64> = (0..C)
                    .map(|c| set.iter().map(|x| x[c]).sum::<f64>() / set.len() as f64)
                    .collect();
                mean.repeat(3 * 2)
            })
            .collect()
    };
    for (range_name, range, seed, garbage) in [
        ("values in (0.1, 1), NaN padding", (0.1, 1.0), 3, f64::NAN),
        (
            "values near f32::MAX, +Inf padding",
            (1e37, 3.0e38),
            7,
            f64::INFINITY,
        ),
        (
            "values of mixed sign near f32::MAX",
            (-3.0e38, 3.0e38),
            9,
            f64::NAN,
        ),
        (
            "values near f32's smallest normal",
            (1e-38, 1e-37),
            8,
            f64::NAN,
        ),
    ] {
        let d = device.clone();
        cases.push(Case::returns(
            tag(&format!("equal references = the mean: {range_name}")),
            move || {
                let values = tokens_values(seed, (b, n), range);
                let mut values: Vec<f64> = values.iter().map(|&v| v as f32 as f64).collect();
                let rows = valid_rows(&values, n, &keep);
                for (i, v) in values.iter_mut().enumerate() {
                    if !keep[i / C] {
                        *v = garbage;
                    }
                }
                let pooling = equal(&d);
                let (out, grad) = forward_tokens(&pooling, &values, (b, n), Some(&keep), &d);
                close("output vs the mean", &out, &means(&rows), 1e-4)?;
                if let Some(grad) = grad {
                    all_finite("input gradient", &grad)?;
                    if let Some(i) = (0..grad.len()).find(|&i| !keep[i / C] && grad[i] != 0.0) {
                        return Err(format!("input gradient at masked element {i}"));
                    }
                }
                Ok(())
            },
        ));
    }
}

/// The matrix's OtAggregation: C = 4, m = 2, l = 3, hidden 8, no global token, no prefix,
/// dropout off.
fn ot_aggregation_config() -> OtAggregationConfig {
    OtAggregationConfig::new(C)
        .with_num_clusters(2)
        .with_cluster_dim(3)
        .with_hidden_dim(8)
        .with_token_dim(None)
        .with_dropout(0.0)
        .with_num_prefix_tokens(0)
}

/// OtAggregation's own cases: configs `init` refuses, values changed after `init`, too few
/// valid tokens for the clusters, the global token's inputs, and the fixed setting and the
/// global token on padding garbage.
fn ot_aggregation_cases((backend, device): &(String, Device), cases: &mut Vec<Case>) {
    let tag = |what: &str| format!("OtAggregation/{backend}/{what}");
    let tokens = |d: &Device| Tensor::<3>::ones([2, 5, C], d);
    let small = ot_aggregation_config;
    let mut refuses = |what: &str, fragment: &'static str, config: OtAggregationConfig| {
        let d = device.clone();
        cases.push(Case::panics(
            tag(what),
            &["OtAggregation", fragment],
            move || {
                let _ = read(config.init(&d).forward_tokens(tokens(&d)));
            },
        ));
    };
    refuses(
        "channels = 0",
        "channels",
        OtAggregationConfig {
            channels: 0,
            ..small()
        },
    );
    refuses(
        "num_clusters = 0",
        "num_clusters",
        small().with_num_clusters(0),
    );
    refuses(
        "cluster_dim = 0",
        "cluster_dim",
        small().with_cluster_dim(0),
    );
    refuses("hidden_dim = 0", "hidden_dim", small().with_hidden_dim(0));
    refuses(
        "token_dim = 0",
        "token_dim",
        small().with_token_dim(Some(0)),
    );
    for p in [1.0, -0.1, f64::NAN] {
        refuses(
            &format!("dropout = {p}"),
            "dropout",
            small().with_dropout(p),
        );
    }
    for z in [f64::NAN, f64::INFINITY] {
        refuses(
            &format!("dustbin_score = {z}"),
            "dustbin_score",
            small().with_dustbin_score(z),
        );
    }
    for eps in [0.0, -1.0, f64::NAN] {
        refuses(
            &format!("epsilon = {eps}"),
            "epsilon",
            small().with_epsilon(eps),
        );
    }
    refuses(
        "fixed iterations = 0",
        "iterations",
        small().with_sinkhorn(OtSinkhorn::Fixed { iterations: 0 }),
    );
    refuses(
        "reference iterations = 0",
        "iterations",
        small().with_sinkhorn(OtSinkhorn::Reference { iterations: 0 }),
    );
    refuses(
        "tolerance = 0",
        "tolerance",
        small().with_sinkhorn(OtSinkhorn::Converged {
            max_iterations: 10,
            tolerance: 0.0,
        }),
    );
    refuses(
        "5 tokens for 5 clusters",
        "N > m = 5",
        small().with_num_clusters(5),
    );
    let d = device.clone();
    cases.push(
        Case::panics(
            tag("C·hidden = 2^62"),
            &["OtAggregation", "hidden_dim"],
            move || {
                let config = OtAggregationConfig {
                    channels: 1 << 31,
                    ..small()
                };
                let _ = config.with_hidden_dim(1 << 31).init(&d);
            },
        )
        .isolated(),
    );
    let d = device.clone();
    cases.push(Case::panics(
        tag("a masked sample with N = m valid tokens"),
        &["OtAggregation", "N = 2 in sample 1"],
        move || {
            let mask = bools(
                &[
                    true, true, true, true, true, true, false, true, false, false,
                ],
                [2, 5],
                &d,
            );
            let input = PoolingInput::tokens(tokens(&d)).with_mask(mask);
            let _ = read(small().init(&d).forward(input));
        },
    ));
    let d = device.clone();
    cases.push(Case::panics(
        tag("maps with a global token"),
        &["OtAggregation", "global token", "feature maps"],
        move || {
            let layer = small().with_token_dim(Some(3)).init(&d);
            let _ = read(layer.forward(Tensor::<4>::ones([2, C, 2, 3], &d)));
        },
    ));
    let d = device.clone();
    cases.push(Case::panics(
        tag("a global token of the wrong shape"),
        &["OtAggregation", "global token", "[2, 4]"],
        move || {
            let layer = small().with_token_dim(Some(3)).init(&d);
            let global = Tensor::<2>::ones([2, C + 1], &d);
            let _ = read(layer.forward_with_global(tokens(&d), global));
        },
    ));
    // Values changed after `init`.
    let changed = |what: &str, fragments: &[&str], edit: fn(OtAggregation) -> OtAggregation| {
        let d = device.clone();
        Case::panics(tag(what), fragments, move || {
            let layer = edit(small().init(&d));
            let _ = read(layer.forward_tokens(tokens(&d)));
        })
    };
    cases.push(changed(
        "scores_out swapped for features_out",
        &["OtAggregation", "scores_out"],
        |layer| OtAggregation {
            scores_out: layer.features_hidden.clone(),
            ..layer
        },
    ));
    cases.push(changed(
        "epsilon set to NaN",
        &["OtAggregation", "epsilon"],
        |layer| OtAggregation {
            epsilon: f64::NAN,
            ..layer
        },
    ));
    cases.push(changed(
        "sinkhorn set to 0 iterations",
        &["OtAggregation", "iterations"],
        |layer| OtAggregation {
            sinkhorn: OtSinkhorn::Fixed { iterations: 0 },
            ..layer
        },
    ));
    // The fixed setting, and the global token (the prefix), on padding garbage: the masked
    // forward equals the padding-free one, with finite gradients that miss the padding.
    let (b, n) = (2, 5);
    let keep = [true, true, true, true, false, true, true, false, true, true];
    let converged = small().sinkhorn;
    for (what, global, sinkhorn) in [
        (
            "fixed 3 iterations",
            false,
            OtSinkhorn::Fixed { iterations: 3 },
        ),
        (
            "the reference's 3 sweeps",
            false,
            OtSinkhorn::Reference { iterations: 3 },
        ),
        ("global token", true, converged),
    ] {
        for (garbage_name, garbage) in [("NaN", f64::NAN), ("f32::MAX", f32::MAX as f64)] {
            let d = device.clone();
            cases.push(Case::returns(
                tag(&format!("{what}: {garbage_name} at masked positions")),
                move || {
                    let mut values = tokens_values(3, (b, n), (0.1, 1.0));
                    let rows = valid_rows(&values, n, &keep);
                    for (i, v) in values.iter_mut().enumerate() {
                        if !keep[i / C] {
                            *v = garbage;
                        }
                    }
                    let config = if global {
                        small().with_token_dim(Some(3)).with_num_prefix_tokens(1)
                    } else {
                        small().with_sinkhorn(sinkhorn)
                    };
                    let pooling = Pooling::OtAggregation(config.init(&d));
                    let (out, grad) = forward_tokens(&pooling, &values, (b, n), Some(&keep), &d);
                    close(
                        "output vs the padding-free input",
                        &out,
                        &dropped_reference(&pooling, &rows, &d),
                        2e-4,
                    )?;
                    if let Some(grad) = grad {
                        all_finite("input gradient", &grad)?;
                        if let Some(i) = (0..grad.len()).find(|&i| !keep[i / C] && grad[i] != 0.0) {
                            return Err(format!("input gradient at masked element {i}"));
                        }
                    }
                    Ok(())
                },
            ));
        }
    }
}
