//! NetVLAD in f64: values against the independent reference (`tests/reference`, the residual
//! form with plain loops), gradients (input, centroids, assignment, bias) against its central
//! differences, and the properties: masking = dropping, the normalisations, the hard-assignment
//! limit of V2, and the initialiser on planted clusters.

use crate::{common, reference};
use burn::module::Param;
use burn::tensor::Device;
use burn_pooling::{NetVlad, NetVladConfig, NetVladVersion, PoolingInput};
use common::{
    Rng, assert_close, bool_mask, dot, flex_f64, max_abs_difference, padded_both_sides, tensor,
    values,
};

const B: usize = 2;
const N: usize = 6;
const C: usize = 3;
const K: usize = 4;
const PREFIX: usize = 1;

/// Valid positions per sample (prefix included); the second sample has padding.
const VALID: [[bool; N]; B] = [[true; N], [true, true, false, true, false, true]];

fn rows(flat: &[f64], width: usize) -> Vec<Vec<f64>> {
    flat.chunks(width).map(|r| r.to_vec()).collect()
}

/// The parameters of one case: centroids, assignment and bias (`None`: tied / zero).
#[derive(Clone)]
struct Params {
    version: NetVladVersion,
    alpha: f64,
    centroids: Vec<f64>,
    weights: Option<Vec<f64>>,
    bias: Option<Vec<f64>>,
}

impl Params {
    fn random(rng: &mut Rng, version: NetVladVersion, decoupled: bool) -> Self {
        let centroids: Vec<f64> = (0..K * C).map(|_| rng.uniform(-1.0, 1.0)).collect();
        let (weights, bias) = if decoupled {
            let w = (0..K * C).map(|_| rng.uniform(-2.0, 2.0)).collect();
            let b = (version == NetVladVersion::V2)
                .then(|| (0..K).map(|_| rng.uniform(-1.0, 1.0)).collect());
            (Some(w), b)
        } else {
            (None, None)
        };
        Self {
            version,
            alpha: 1.7,
            centroids,
            weights,
            bias,
        }
    }

    fn layer(&self, prefix: usize, device: &Device) -> NetVlad {
        let layer = NetVladConfig::new(C)
            .with_num_clusters(K)
            .with_version(self.version)
            .with_alpha(self.alpha)
            .with_decoupled(self.weights.is_some())
            .with_num_prefix_tokens(prefix)
            .init(device);
        NetVlad {
            centroids: Param::from_tensor(tensor(self.centroids.clone(), [K, C], device)),
            assignment: self
                .weights
                .as_ref()
                .map(|w| Param::from_tensor(tensor(w.clone(), [K, C], device))),
            bias: self
                .bias
                .as_ref()
                .map(|b| Param::from_tensor(tensor(b.clone(), [K], device))),
            ..layer
        }
    }

    /// The reference of one sample's valid rows.
    fn reference(&self, x: &[Vec<f64>]) -> Vec<f64> {
        let centroids = rows(&self.centroids, C);
        let v2 = self.version == NetVladVersion::V2;
        let (w, b) = match &self.weights {
            Some(w) => (
                rows(w, C),
                self.bias.clone().unwrap_or_else(|| vec![0.0; K]),
            ),
            None => reference::netvlad_tied(&centroids, self.alpha, v2),
        };
        reference::netvlad(x, &centroids, &w, &b, !v2)
    }
}

/// Sample b's rows `x[n][c]` from `[B, N, C]` values, the pooled ones only.
fn pooled_rows(x: &[f64], b: usize, valid: &[bool], prefix: usize) -> Vec<Vec<f64>> {
    (prefix..N)
        .filter(|&n| valid[n])
        .map(|n| x[(b * N + n) * C..(b * N + n + 1) * C].to_vec())
        .collect()
}

/// `[B·K·C]` by the reference.
fn reference_batch(params: &Params, x: &[f64]) -> Vec<f64> {
    (0..B)
        .flat_map(|b| params.reference(&pooled_rows(x, b, &VALID[b], PREFIX)))
        .collect()
}

/// Random tokens whose prefix and padding hold large values, so that letting them through
/// fails.
fn inputs(rng: &mut Rng) -> Vec<f64> {
    let mut x: Vec<f64> = (0..B * N * C).map(|_| rng.uniform(-1.5, 1.5)).collect();
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

fn cases(rng: &mut Rng) -> Vec<(String, Params)> {
    let mut out = Vec::new();
    for version in [NetVladVersion::V1, NetVladVersion::V2] {
        for decoupled in [true, false] {
            let what = format!("{version:?} decoupled = {decoupled}");
            out.push((what, Params::random(rng, version, decoupled)));
        }
    }
    out
}

/// V1 and V2, decoupled and tied, masked tokens with a prefix and masked maps: the layer
/// against the reference.
#[test]
fn netvlad_matches_the_reference() {
    let device = flex_f64();
    let mut rng = Rng::new(57);
    let mut worst: f64 = 0.0;
    for (what, params) in cases(&mut rng) {
        for _ in 0..3 {
            let x = inputs(&mut rng);
            let expected = reference_batch(&params, &x);
            let layer = params.layer(PREFIX, &device);
            let y =
                layer.forward(
                    PoolingInput::tokens(tensor(x.clone(), [B, N, C], &device))
                        .with_mask(bool_mask(&VALID.concat(), B, &device)),
                );
            assert_eq!(y.dims(), [B, K * C]);
            let y = values(y);
            worst = worst.max(max_abs_difference(&y, &expected));
            assert_close(&y, &expected, 1e-12, 1e-13, &format!("{what}: tokens"));

            // Maps [B, C, 1, N] of the same values, the prefix masked out instead of skipped.
            let mut map_valid = VALID.concat();
            (0..B).for_each(|b| map_valid[b * N] = false);
            let maps = tensor(x.clone(), [B, N, C], &device)
                .swap_dims(1, 2)
                .reshape([B, C, 1, N]);
            let y = params
                .layer(0, &device)
                .forward(PoolingInput::maps(maps).with_mask(bool_mask(&map_valid, B, &device)));
            let y = values(y);
            worst = worst.max(max_abs_difference(&y, &expected));
            assert_close(&y, &expected, 1e-12, 1e-13, &format!("{what}: maps"));
        }
    }
    println!("NetVLAD vs the f64 reference: max |error| = {worst:.2e}");
}

/// ∂/∂x, ∂/∂centroids, ∂/∂w and ∂/∂b of Σ g·y against central differences of the reference,
/// for V1 and V2, decoupled and tied, on masked tokens with a prefix.
#[test]
fn netvlad_gradients_match_finite_differences() {
    let device = flex_f64().autodiff();
    let mut rng = Rng::new(58);
    let mut worst: Vec<(String, f64)> = Vec::new();
    for (what, params) in cases(&mut rng) {
        let x = inputs(&mut rng);
        let g: Vec<f64> = (0..B * K * C).map(|_| rng.uniform(-1.0, 1.0)).collect();
        let layer = params.layer(PREFIX, &device);
        let tokens = tensor(x.clone(), [B, N, C], &device).require_grad();
        let y = layer.forward(PoolingInput::tokens(tokens.clone()).with_mask(bool_mask(
            &VALID.concat(),
            B,
            &device,
        )));
        let grads = (y * tensor(g.clone(), [B, K * C], &device))
            .sum()
            .backward();
        let loss = |p: &Params, x: &[f64]| dot(&reference_batch(p, x), &g);
        let h = 1e-6;
        let mut check = |name: &str, got: Vec<f64>, fd: Vec<f64>| {
            let error = max_abs_difference(&got, &fd);
            assert_close(&got, &fd, 1e-6, 1e-8, &format!("{what}: {name}"));
            worst.push((format!("{what} {name}"), error));
        };
        let dx = values(tokens.grad(&grads).unwrap());
        for (i, d) in dx.iter().enumerate() {
            let (b, n) = (i / (N * C), (i / C) % N);
            if n < PREFIX || !VALID[b][n] {
                assert_eq!(
                    *d, 0.0,
                    "{what}: the gradient at padded or prefix element {i}"
                );
            }
        }
        let fd = reference::central_difference(&|v: &[f64]| loss(&params, v), &x, h);
        check("dx", dx, fd);
        let dc = values(layer.centroids.val().grad(&grads).unwrap());
        let fd = reference::central_difference(
            &|v: &[f64]| {
                let p = Params {
                    centroids: v.to_vec(),
                    ..params.clone()
                };
                loss(&p, &x)
            },
            &params.centroids,
            h,
        );
        check("dcentroids", dc, fd);
        if let Some(w) = &params.weights {
            let dw = values(
                layer
                    .assignment
                    .as_ref()
                    .unwrap()
                    .val()
                    .grad(&grads)
                    .unwrap(),
            );
            let fd = reference::central_difference(
                &|v: &[f64]| {
                    let p = Params {
                        weights: Some(v.to_vec()),
                        ..params.clone()
                    };
                    loss(&p, &x)
                },
                w,
                h,
            );
            check("dw", dw, fd);
        }
        if let Some(b) = &params.bias {
            let db = values(layer.bias.as_ref().unwrap().val().grad(&grads).unwrap());
            let fd = reference::central_difference(
                &|v: &[f64]| {
                    let p = Params {
                        bias: Some(v.to_vec()),
                        ..params.clone()
                    };
                    loss(&p, &x)
                },
                b,
                h,
            );
            check("db", db, fd);
        }
    }
    for (what, error) in &worst {
        println!("NetVLAD FD: {what}: max |autodiff − FD| = {error:.2e}");
    }
}

/// Masking = dropping the tokens (NaN padding, left or right); the output has unit norm and
/// each cluster block is intra-normalised first (every block's norm is 1/√K).
#[test]
fn masking_equals_dropping_and_the_output_is_normalised() {
    let device = flex_f64();
    let mut rng = Rng::new(59);
    for (what, params) in cases(&mut rng) {
        let layer = params.layer(0, &device);
        for len in [1, 3, 5] {
            let x: Vec<f64> = (0..len * C).map(|_| rng.uniform(-2.0, 2.0)).collect();
            let dropped = values(layer.forward_tokens(tensor(x.clone(), [1, len, C], &device)));
            let n = len + 2;
            for (name, padded, valid) in padded_both_sides(&x, len, n, C, f64::NAN) {
                let y = values(
                    layer.forward(
                        PoolingInput::tokens(tensor(padded, [1, n, C], &device))
                            .with_mask(bool_mask(&valid, 1, &device)),
                    ),
                );
                assert_close(&y, &dropped, 1e-13, 1e-14, &format!("{what} {name} pad"));
            }
            let total: f64 = dropped.iter().map(|v| v * v).sum::<f64>().sqrt();
            assert!((total - 1.0).abs() < 1e-13, "{what}: ‖y‖ = {total}");
            for k in 0..K {
                let block: f64 = dropped[k * C..(k + 1) * C]
                    .iter()
                    .map(|v| v * v)
                    .sum::<f64>()
                    .sqrt();
                assert!(
                    (block - 1.0 / (K as f64).sqrt()).abs() < 1e-13,
                    "{what}: block {k} has norm {block}, expected 1/√K"
                );
            }
        }
    }
}

/// Tied V2 with a large α assigns each position to its nearest centroid: the output equals the
/// explicit nearest-centroid residuals, intra- and globally normalised.
#[test]
fn v2_with_a_large_alpha_assigns_hard() {
    let device = flex_f64();
    let mut rng = Rng::new(60);
    let n = 12;
    for alpha in [1e6, 1e8] {
        let params = Params {
            alpha,
            ..Params::random(&mut rng, NetVladVersion::V2, false)
        };
        let x: Vec<f64> = (0..n * C).map(|_| rng.uniform(-1.5, 1.5)).collect();
        let y = values(params.layer(0, &device).forward_tokens(tensor(
            x.clone(),
            [1, n, C],
            &device,
        )));
        let centroids = rows(&params.centroids, C);
        let mut v = vec![vec![0.0; C]; K];
        for xj in rows(&x, C) {
            let distance = |c: &Vec<f64>| xj.iter().zip(c).map(|(a, b)| (a - b).powi(2)).sum();
            let d: Vec<f64> = centroids.iter().map(distance).collect();
            let nearest = (0..K).min_by(|&a, &b| d[a].total_cmp(&d[b])).unwrap();
            for c in 0..C {
                v[nearest][c] += xj[c] - centroids[nearest][c];
            }
        }
        let unit = |v: &[f64]| -> Vec<f64> {
            let n = v.iter().map(|a| a * a).sum::<f64>().sqrt().max(1e-12);
            v.iter().map(|a| a / n).collect()
        };
        let flat: Vec<f64> = v.iter().flat_map(|vk| unit(vk)).collect();
        let expected = unit(&flat);
        let error = max_abs_difference(&y, &expected);
        println!("NetVLAD V2 α = {alpha:e}: max |y − hard assignment| = {error:.2e}");
        assert!(error < 1e-9, "α = {alpha}: {error}");
    }
}

/// Planted, well-separated clusters: `init_from_descriptors` recovers their centres, and α
/// gives a mean log top-1/top-2 assignment ratio of ln 100 on its data (V2: distances, V1:
/// cosines of the normalised descriptors).
#[test]
fn the_initialiser_recovers_planted_clusters_and_sets_alpha() {
    let device = flex_f64();
    let mut rng = Rng::new(61);
    let planted: Vec<Vec<f64>> = vec![
        vec![4.0, 0.0, 0.0],
        vec![0.0, 4.0, 0.0],
        vec![0.0, 0.0, 4.0],
        vec![-4.0, -4.0, 0.0],
    ];
    let per = 60;
    let mut data = Vec::new();
    // Interleaved, so that the seeding's first row is no special one.
    for _ in 0..per {
        for centre in &planted {
            data.extend(centre.iter().map(|c| c + rng.uniform(-0.4, 0.4)));
        }
    }
    let m = per * K;
    for version in [NetVladVersion::V2, NetVladVersion::V1] {
        let layer = NetVladConfig::new(C)
            .with_num_clusters(K)
            .with_version(version)
            .init(&device);
        let id = layer.centroids.id;
        let layer = layer.init_from_descriptors(tensor(data.clone(), [m, C], &device), 100);
        assert_eq!(layer.centroids.id, id, "the centroids keep their identity");
        let centroids = rows(&values(layer.centroids.val()), C);
        let v1 = version == NetVladVersion::V1;
        let unit = |v: &[f64]| -> Vec<f64> {
            let n = v.iter().map(|a| a * a).sum::<f64>().sqrt();
            v.iter().map(|a| a / n).collect()
        };
        for centre in &planted {
            let target = if v1 { unit(centre) } else { centre.clone() };
            let nearest = centroids
                .iter()
                .map(|c| {
                    let c = if v1 { unit(c) } else { c.clone() };
                    max_abs_difference(&c, &target)
                })
                .fold(f64::INFINITY, f64::min);
            let bound = if v1 { 0.05 } else { 0.1 };
            assert!(
                nearest < bound,
                "{version:?}: planted centre {centre:?} not recovered: {centroids:?}"
            );
        }
        // The mean of ln(a₁/a₂) under the layer's own initial assignment is ln 100.
        let w = rows(&values(layer.assignment.as_ref().unwrap().val()), C);
        let b = match &layer.bias {
            Some(b) => values(b.val()),
            None => vec![0.0; K],
        };
        let mut total = 0.0;
        for x in rows(&data, C) {
            let x = if v1 { unit(&x) } else { x };
            let mut logits: Vec<f64> = (0..K).map(|k| dot(&w[k], &x) + b[k]).collect();
            logits.sort_by(|a, c| c.total_cmp(a));
            total += logits[0] - logits[1];
        }
        let mean = total / m as f64;
        println!(
            "NetVLAD {version:?} init: α = {:.4}, mean ln(a1/a2) = {mean:.12} (ln 100 = {:.12})",
            layer.alpha,
            100f64.ln()
        );
        assert!((mean - 100f64.ln()).abs() < 1e-9, "{version:?}: {mean}");
    }
}

/// The reference itself on hand-computed cases: one cluster gives (x̄ − c)/‖x̄ − c‖ summed over
/// the positions; V1 normalises the positions first.
#[test]
fn the_reference_on_hand_cases() {
    let x = vec![vec![3.0, 0.0], vec![1.0, 2.0]];
    let c = vec![vec![1.0, 1.0]];
    // Σ_j (x_j − c) = (2, −1) + (0, 1) = (2, 0) → (1, 0).
    let y = reference::netvlad(&x, &c, &[vec![0.5, -0.5]], &[0.3], false);
    assert_close(&y, &[1.0, 0.0], 1e-15, 0.0, "K = 1");
    // V1: x̂ = (1, 0), (1, 2)/√5; Σ_j (x̂_j − c) = (1 + 1/√5 − 2, 2/√5 − 2).
    let y = reference::netvlad(&x, &c, &[vec![0.0, 0.0]], &[0.0], true);
    let v = [1.0 + 1.0 / 5f64.sqrt() - 2.0, 2.0 / 5f64.sqrt() - 2.0];
    let n = (v[0] * v[0] + v[1] * v[1]).sqrt();
    assert_close(&y, &[v[0] / n, v[1] / n], 1e-15, 0.0, "K = 1, V1");
    // Two clusters with zero weights: a = 1/2 each; V_k = ½ Σ_j x_j − c_k.
    let c = vec![vec![0.0, 0.0], vec![2.0, 2.0]];
    let w = vec![vec![0.0; 2]; 2];
    let y = reference::netvlad(&x, &c, &w, &[0.0, 0.0], false);
    // V_1 = (2, 1) → (2, 1)/√5, V_2 = (2, 1) − (4, 4)/2... = (0, −1) → (0, −1); then /√2.
    let s = 1.0 / 2f64.sqrt();
    let r5 = 5f64.sqrt();
    assert_close(
        &y,
        &[2.0 / r5 * s, 1.0 / r5 * s, 0.0, -s],
        1e-15,
        1e-16,
        "K = 2, uniform assignment",
    );
}
