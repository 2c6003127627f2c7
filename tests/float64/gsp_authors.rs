//! GSP as its authors run it (docs/maths.md §10): the projection F = X·A, the mean, GeM and max
//! read-outs and the max branch, in f64 against the independent reference
//! (`reference::gsp_authors`): outputs on maps and tokens, with masks and prefix tokens; the
//! gradients of p, the prototypes, the projection and the input against central differences;
//! the μ = 1 identities and masking = dropping tokens as property tests; and the default config
//! against the pre-change layer.

use crate::{common, reference};
use burn::module::Param;
use burn::tensor::{Bool, Device, Tensor, TensorData};
use burn_pooling::{GapConfig, GemConfig, GmpConfig, Gsp, GspConfig, GspReadout, PoolingInput};
use common::{Rng, assert_close, flex_f64, matrix_tensor, max_abs_difference, tensor, values};
use proptest::prelude::*;
use reference::Readout;

const K: usize = 3;
const N: usize = 6;
const C: usize = 4;
const D: usize = 3;

/// Every read-out with every max-branch setting.
fn variants() -> Vec<(Readout, bool)> {
    let mut out = Vec::new();
    for readout in [Readout::Mean, Readout::GeneralizedMean(2.5), Readout::Max] {
        for branch in [false, true] {
            out.push((readout, branch));
        }
    }
    out
}

fn library_readout(readout: Readout) -> (GspReadout, f64) {
    match readout {
        Readout::Mean => (GspReadout::Mean, 3.0),
        Readout::GeneralizedMean(p) => (GspReadout::GeneralizedMean, p),
        Readout::Max => (GspReadout::Max, 3.0),
    }
}

/// The layer with the given parameters (prototypes K×D, projection C×D or none).
#[allow(clippy::too_many_arguments)]
fn layer(
    prototypes: &[Vec<f64>],
    projection: Option<&[Vec<f64>]>,
    readout: Readout,
    max_branch: bool,
    mu: f64,
    eps: f64,
    prefix: usize,
    device: &Device,
) -> Gsp {
    let (kind, p) = library_readout(readout);
    let layer = GspConfig::new(C)
        .with_num_prototypes(prototypes.len())
        .with_transport_ratio(mu)
        .with_epsilon(eps)
        .with_tolerance(1e-13)
        .with_max_iterations(200)
        .with_projection(projection.map(|a| a[0].len()))
        .with_readout(kind)
        .with_readout_p(p)
        .with_max_branch(max_branch)
        .with_num_prefix_tokens(prefix)
        .init(device);
    Gsp {
        prototypes: Param::from_tensor(matrix_tensor(prototypes, device)),
        projection: projection.map(|a| Param::from_tensor(matrix_tensor(a, device))),
        readout_p: layer
            .readout_p
            .as_ref()
            .map(|_| Param::from_tensor(tensor(vec![p], [1], device))),
        ..layer
    }
}

/// Non-negative features (a ReLU map, as the GeM read-out assumes) with norms on both sides
/// of 1, a projection and prototypes.
struct Sample {
    x: Vec<Vec<Vec<f64>>>,
    projection: Vec<Vec<f64>>,
    prototypes: Vec<Vec<f64>>,
    raw_prototypes: Vec<Vec<f64>>,
}

fn sample(rng: &mut Rng, batch: usize, positions: usize) -> Sample {
    Sample {
        x: (0..batch)
            .map(|_| rng.matrix(positions, C, 0.05, 1.0))
            .collect(),
        projection: rng.matrix(C, D, -0.9, 0.9),
        prototypes: rng.matrix(K, D, -0.8, 0.8),
        raw_prototypes: rng.matrix(K, C, -0.2, 0.9),
    }
}

fn flat(x: &[Vec<Vec<f64>>]) -> Vec<f64> {
    x.iter().flat_map(|m| m.concat()).collect()
}

/// The layer against the oracle on tokens with a prefix token and a mask, and on maps with a
/// mask, for every read-out, with and without the max branch and the projection.
#[test]
fn authors_readouts_match_the_reference_on_maps_and_tokens() {
    let device = flex_f64();
    let mut rng = Rng::new(21);
    let (b, prefix) = (2, 1);
    let masks = [[true; N], [true, false, true, true, false, true]];
    let mut worst = 0.0f64;
    for (mu, eps) in [(0.3, 0.2), (0.7, 0.1)] {
        for projected in [false, true] {
            for (readout, branch) in variants() {
                let s = sample(&mut rng, b, prefix + N);
                let projection = projected.then_some(s.projection.as_slice());
                let prototypes = if projected {
                    &s.prototypes
                } else {
                    &s.raw_prototypes
                };
                let gsp = layer(
                    prototypes, projection, readout, branch, mu, eps, prefix, &device,
                );
                let width = if projected { D } else { C };
                assert_eq!(gsp.output_width(), width);
                // Tokens: prefix token + N, the mask over all N + 1 (the prefix's flag unread).
                let mask_values: Vec<bool> = masks
                    .iter()
                    .flat_map(|m| std::iter::once(false).chain(m.iter().copied()))
                    .collect();
                let mask = Tensor::<2, Bool>::from_bool(
                    TensorData::new(mask_values, [b, prefix + N]),
                    &device,
                );
                let tokens = tensor(flat(&s.x), [b, prefix + N, C], &device);
                let out = gsp.forward_detailed(PoolingInput::tokens(tokens).with_mask(mask));
                // Maps: the same positions after the prefix, [B, C, 2, 3], masked the same.
                let after: Vec<Vec<Vec<f64>>> = s.x.iter().map(|m| m[prefix..].to_vec()).collect();
                let maps = tensor(flat(&after), [b, N, C], &device)
                    .swap_dims(1, 2)
                    .reshape([b, C, 2, 3]);
                let mask =
                    Tensor::<2, Bool>::from_bool(TensorData::new(masks.concat(), [b, N]), &device);
                let map_out = gsp.forward_detailed(PoolingInput::maps(maps).with_mask(mask));
                for (layout, out) in [("tokens", out), ("maps", map_out)] {
                    let pooled = values(out.pooled);
                    let weights = values(out.weights);
                    let attributes = values(out.attributes);
                    for i in 0..b {
                        let expected = reference::gsp_authors(
                            &after[i], &masks[i], projection, prototypes, readout, branch, mu, eps,
                        );
                        let what = format!(
                            "{layout} mu {mu} {readout:?} branch {branch} projected {projected} sample {i}"
                        );
                        let got = &pooled[i * width..(i + 1) * width];
                        worst = worst.max(max_abs_difference(got, &expected.pooled));
                        assert_close(got, &expected.pooled, 1e-9, 1e-11, &format!("{what} y"));
                        assert_close(
                            &weights[i * N..(i + 1) * N],
                            &expected.weights,
                            1e-9,
                            1e-11,
                            &format!("{what} w"),
                        );
                        assert_close(
                            &attributes[i * K..(i + 1) * K],
                            &expected.attributes,
                            1e-9,
                            1e-11,
                            &format!("{what} z"),
                        );
                    }
                }
            }
        }
    }
    println!("max |layer - oracle| over every read-out, layout and mask: {worst:.2e}");
}

/// The default config is the pre-change layer: no projection, no read-out power, the mean
/// read-out, K·C parameters, and the output of the original oracle `reference::gsp`.
#[test]
fn the_default_config_is_the_pre_change_layer() {
    let device = flex_f64();
    let mut rng = Rng::new(22);
    let s = sample(&mut rng, 2, N);
    let config = GspConfig::new(C).with_num_prototypes(K);
    assert_eq!(
        (
            config.projection,
            config.readout,
            config.readout_p,
            config.max_branch
        ),
        (None, GspReadout::Mean, 3.0, false)
    );
    let gsp = Gsp {
        prototypes: Param::from_tensor(matrix_tensor(&s.raw_prototypes, &device)),
        ..config.with_tolerance(1e-13).init(&device)
    };
    assert!(gsp.projection.is_none() && gsp.readout_p.is_none());
    assert_eq!(burn::module::Module::num_params(&gsp), K * C);
    let pooled = values(gsp.forward_tokens(tensor(flat(&s.x), [2, N, C], &device)));
    let mut worst = 0.0f64;
    for i in 0..2 {
        let before = reference::gsp(
            &s.x[i],
            &s.raw_prototypes,
            &reference::uniform_mass(N),
            0.3,
            0.2,
        );
        let got = &pooled[i * C..(i + 1) * C];
        worst = worst.max(max_abs_difference(got, &before.pooled));
        assert_close(got, &before.pooled, 1e-10, 1e-12, "default vs pre-change");
    }
    println!("default config vs the pre-change oracle: max abs error {worst:.2e}");
}

/// A fixed random linear functional of the read-out and the attributes.
fn scalar_loss(pooled: &[f64], attributes: &[f64], gy: &[f64], gz: &[f64]) -> f64 {
    pooled.iter().zip(gy).map(|(a, b)| a * b).sum::<f64>()
        + attributes.iter().zip(gz).map(|(a, b)| a * b).sum::<f64>()
}

fn rows(v: &[f64], width: usize) -> Vec<Vec<f64>> {
    v.chunks(width).map(|r| r.to_vec()).collect()
}

/// ∂L/∂x, ∂L/∂ω, ∂L/∂A and ∂L/∂p of the projected layer (every read-out, with and without the
/// max branch, masked) against central differences of the oracle.
#[test]
fn gradients_of_p_prototypes_projection_and_input_match_finite_differences() {
    let device = flex_f64().autodiff();
    let mut rng = Rng::new(23);
    let valid = [true, true, false, true, true, true];
    let (mu, eps) = (0.3, 0.2);
    for (readout, branch) in variants() {
        let s = sample(&mut rng, 1, N);
        let gy: Vec<f64> = (0..D).map(|_| rng.uniform(-1.0, 1.0)).collect();
        let gz: Vec<f64> = (0..K).map(|_| rng.uniform(-1.0, 1.0)).collect();
        let gsp = layer(
            &s.prototypes,
            Some(&s.projection),
            readout,
            branch,
            mu,
            eps,
            0,
            &device,
        );
        let input = tensor(flat(&s.x), [1, N, C], &device).require_grad();
        let mask = Tensor::<2, Bool>::from_bool(TensorData::new(valid.to_vec(), [1, N]), &device);
        let out = gsp.forward_detailed(PoolingInput::tokens(input.clone()).with_mask(mask));
        let loss = (out.pooled * tensor(gy.clone(), [1, D], &device)).sum()
            + (out.attributes * tensor(gz.clone(), [1, K], &device)).sum();
        let grads = loss.backward();
        let grad_x = values(input.grad(&grads).unwrap());
        let grad_w = values(gsp.prototypes.val().grad(&grads).unwrap());
        let grad_a = values(gsp.projection.as_ref().unwrap().val().grad(&grads).unwrap());

        let loss_of = |x: &[Vec<f64>], w: &[Vec<f64>], a: &[Vec<f64>], readout: Readout| {
            let r = reference::gsp_authors(x, &valid, Some(a), w, readout, branch, mu, eps);
            scalar_loss(&r.pooled, &r.attributes, &gy, &gz)
        };
        let (x, w, a) = (&s.x[0], &s.prototypes, &s.projection);
        let h = 1e-6;
        let fd_x = reference::central_difference(
            &|v: &[f64]| loss_of(&rows(v, C), w, a, readout),
            &x.concat(),
            h,
        );
        let fd_w = reference::central_difference(
            &|v: &[f64]| loss_of(x, &rows(v, D), a, readout),
            &w.concat(),
            h,
        );
        let fd_a = reference::central_difference(
            &|v: &[f64]| loss_of(x, w, &rows(v, D), readout),
            &a.concat(),
            h,
        );
        let mut errors = vec![
            ("x", max_abs_difference(&grad_x, &fd_x)),
            ("prototypes", max_abs_difference(&grad_w, &fd_w)),
            ("projection", max_abs_difference(&grad_a, &fd_a)),
        ];
        // Masked positions get exactly no gradient.
        assert!(grad_x[2 * C..3 * C].iter().all(|&g| g == 0.0), "{grad_x:?}");
        if let Readout::GeneralizedMean(p) = readout {
            let grad_p = values(gsp.readout_p.as_ref().unwrap().val().grad(&grads).unwrap());
            let fd_p = reference::central_difference(
                &|v: &[f64]| loss_of(x, w, a, Readout::GeneralizedMean(v[0])),
                &[p],
                h,
            );
            errors.push(("p", max_abs_difference(&grad_p, &fd_p)));
        }
        let scale = fd_x
            .iter()
            .chain(&fd_w)
            .chain(&fd_a)
            .fold(0.0f64, |m, v| m.max(v.abs()));
        println!(
            "{readout:?} branch {branch}: max |analytical - FD| {errors:?}, scale {scale:.2e}"
        );
        for (what, error) in errors {
            assert!(
                error <= 1e-7 * scale.max(1.0),
                "{readout:?} branch {branch} {what}: {error:e}"
            );
        }
    }
}

/// `[B, N, C]` values in [lo, hi) with the dims, from proptest (N ≥ 2).
fn token_batch(lo: f64, hi: f64) -> impl Strategy<Value = (Vec<f64>, [usize; 3])> {
    (1usize..3, 2usize..7, 1usize..5).prop_flat_map(move |(b, n, c)| {
        prop::collection::vec(lo..hi, b * n * c).prop_map(move |v| (v, [b, n, c]))
    })
}

/// A layer for `c` channels with a random projection to `d` and K = 2 prototypes.
fn random_layer(
    c: usize,
    d: usize,
    readout: GspReadout,
    mu: f64,
    seed: u64,
    device: &Device,
) -> Gsp {
    device.seed(seed);
    GspConfig::new(c)
        .with_num_prototypes(2)
        .with_transport_ratio(mu)
        .with_tolerance(1e-12)
        .with_projection(Some(d))
        .with_readout(readout)
        .with_readout_p(2.0)
        .init(device)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    /// μ = 1 moves all the mass (m ≡ 1): the GeM read-out is GeM(X)·A, the max read-out
    /// GMP(X)·A and the mean read-out GAP(X)·A = GAP(F), on tokens and maps.
    #[test]
    fn at_full_transport_the_readouts_are_the_projected_reductions(
        (x, dims) in token_batch(0.01, 3.0),
        d in 1usize..5,
        seed in 0u64..1000,
    ) {
        let device = flex_f64();
        let [b, n, c] = dims;
        let tokens = tensor(x, dims, &device);
        let maps = tokens.clone().swap_dims(1, 2).reshape([b, c, 1, n]);
        for readout in [GspReadout::Mean, GspReadout::GeneralizedMean, GspReadout::Max] {
            let gsp = random_layer(c, d, readout, 1.0, seed, &device);
            let reduced = match readout {
                GspReadout::Mean => GapConfig::new().init().forward_tokens(tokens.clone()),
                GspReadout::GeneralizedMean => GemConfig::new()
                    .with_p(2.0)
                    .init(&device)
                    .forward_tokens(tokens.clone()),
                GspReadout::Max => GmpConfig::new().init().forward_tokens(tokens.clone()),
            };
            let expected = values(gsp.project(reduced));
            let what = format!("{readout:?} at mu = 1");
            assert_close(&values(gsp.forward_tokens(tokens.clone())), &expected, 1e-10, 1e-12, &what);
            assert_close(&values(gsp.forward(maps.clone())), &expected, 1e-10, 1e-12, &what);
        }
    }

    /// A masked position is a dropped position, for every read-out with the projection and the
    /// max branch: the masked layer equals the layer on each sample's valid tokens alone.
    #[test]
    fn masking_equals_dropping_tokens(
        (x, dims) in token_batch(0.01, 3.0),
        keep in prop::collection::vec(any::<bool>(), 12),
        seed in 0u64..1000,
        branch in any::<bool>(),
    ) {
        let device = flex_f64();
        let [b, n, c] = dims;
        let mut mask: Vec<bool> = keep[..b * n].to_vec();
        for i in 0..b {
            mask[i * n + (seed as usize % n)] = true; // one valid position per row at least
        }
        let tokens = tensor(x.clone(), dims, &device);
        let mask_tensor = Tensor::<2, Bool>::from_bool(TensorData::new(mask.clone(), [b, n]), &device);
        for readout in [GspReadout::Mean, GspReadout::GeneralizedMean, GspReadout::Max] {
            let mut gsp = random_layer(c, 3, readout, 0.4, seed, &device);
            gsp.max_branch = branch;
            let masked = values(gsp.forward(PoolingInput::tokens(tokens.clone()).with_mask(mask_tensor.clone())));
            for i in 0..b {
                let kept: Vec<f64> = (0..n)
                    .filter(|&j| mask[i * n + j])
                    .flat_map(|j| x[(i * n + j) * c..(i * n + j + 1) * c].to_vec())
                    .collect();
                let count = kept.len() / c;
                let alone = values(gsp.forward_tokens(tensor(kept, [1, count, c], &device)));
                assert_close(&masked[i * 3..(i + 1) * 3], &alone, 1e-9, 1e-11, &format!("{readout:?} sample {i}"));
            }
        }
    }
}
