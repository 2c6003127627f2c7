//! OTK in f64: values against the independent reference (`tests/reference`: log-domain
//! Sinkhorn run to a 1e-14 marginal error with plain loops), gradients (input, references)
//! against its central differences, also at a small ε with large inner products (an
//! ill-conditioned plan, ⟨x, z⟩/ε far above 88), and the properties: masking = dropping (left
//! and right padding), identical tokens, the plan's marginals, finite results where the
//! authors' kernel domain overflows.

use crate::{common, reference};
use burn::module::Param;
use burn::tensor::Device;
use burn_pooling::{Otk, OtkConfig, PoolingInput};
use common::{
    Rng, assert_close, bool_mask, dot, flex_f64, max_abs_difference, padded_both_sides, tensor,
    values,
};

const B: usize = 2;
const N: usize = 6;
const C: usize = 3;
const P: usize = 4;
const PREFIX: usize = 1;

/// Valid positions per sample (prefix included); the second sample has padding.
const VALID: [[bool; N]; B] = [[true; N], [true, true, false, true, false, true]];

/// One case: heads, ε, the references `[heads·p·C]` and the range of the inputs.
#[derive(Clone)]
struct Params {
    heads: usize,
    epsilon: f64,
    references: Vec<f64>,
    input_range: f64,
}

impl Params {
    fn random(rng: &mut Rng, heads: usize, epsilon: f64, spread: f64, input_range: f64) -> Self {
        Self {
            heads,
            epsilon,
            references: (0..heads * P * C)
                .map(|_| rng.uniform(-spread, spread))
                .collect(),
            input_range,
        }
    }

    /// The layer with these references, solved to f64's precision.
    fn layer(&self, prefix: usize, device: &Device) -> Otk {
        let layer = OtkConfig::new(C)
            .with_num_references(P)
            .with_heads(self.heads)
            .with_epsilon(self.epsilon)
            .with_max_iterations(100_000)
            .with_tolerance(1e-13)
            .with_num_prefix_tokens(prefix)
            .init(device);
        Otk {
            references: Param::from_tensor(tensor(
                self.references.clone(),
                [self.heads, P, C],
                device,
            )),
            ..layer
        }
    }

    /// `z[h][k][c]` of `references`.
    fn nested(&self, references: &[f64]) -> Vec<Vec<Vec<f64>>> {
        references
            .chunks(P * C)
            .map(|head| head.chunks(C).map(|r| r.to_vec()).collect())
            .collect()
    }

    fn width(&self) -> usize {
        P * self.heads * C
    }
}

/// Sample b's pooled rows `x[n][c]` from `[B, N, C]` values.
fn pooled_rows(x: &[f64], b: usize, valid: &[bool], prefix: usize) -> Vec<Vec<f64>> {
    (prefix..N)
        .filter(|&n| valid[n])
        .map(|n| x[(b * N + n) * C..(b * N + n + 1) * C].to_vec())
        .collect()
}

/// `[B·p·heads·C]` by the reference, with references `z` (flat).
fn reference_batch(params: &Params, z: &[f64], x: &[f64]) -> Vec<f64> {
    let z = params.nested(z);
    (0..B)
        .flat_map(|b| reference::otk(&pooled_rows(x, b, &VALID[b], PREFIX), &z, params.epsilon))
        .collect()
}

/// Random tokens whose prefix and padding hold large values, so that letting them through
/// fails.
fn inputs(rng: &mut Rng, range: f64) -> Vec<f64> {
    let mut x: Vec<f64> = (0..B * N * C).map(|_| rng.uniform(-range, range)).collect();
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

/// One head and three, ε = 0.1 (the default, with the default references' spread) and an
/// ill-conditioned ε = 0.05 with inner products up to ~10 (⟨x, z⟩/ε up to ~200, past the
/// authors' f32 kernel-domain overflow at 88.7).
fn cases(rng: &mut Rng) -> Vec<(String, Params)> {
    vec![
        (
            "1 head, ε = 0.1".into(),
            Params::random(rng, 1, 0.1, 0.5, 1.5),
        ),
        (
            "3 heads, ε = 0.1".into(),
            Params::random(rng, 3, 0.1, 0.5, 1.5),
        ),
        (
            "1 head, ε = 0.5".into(),
            Params::random(rng, 1, 0.5, 1.0, 1.5),
        ),
        (
            "2 heads, ε = 0.05, large ⟨x, z⟩".into(),
            Params::random(rng, 2, 0.05, 2.0, 2.0),
        ),
    ]
}

/// The reference's own check: its log-domain plan equals the kernel-domain one of the
/// balanced-transport tests (`reference::balanced_plan`) where both work.
#[test]
fn otk_reference_log_domain_matches_the_kernel_domain() {
    let mut rng = Rng::new(70);
    let c = rng.matrix(3, 5, -1.0, 1.0);
    let a = [0.5, 1.0, 1.5];
    let b = [0.6; 5];
    for eps in [0.1, 0.5] {
        let log = reference::log_balanced_plan(&c, &a, &b, eps);
        let kernel = reference::balanced_plan(&c, &a, &b, eps);
        assert_close(&log.concat(), &kernel.concat(), 1e-10, 1e-13, "plans");
    }
}

/// Masked tokens with a prefix and masked maps, one and several heads, well- and
/// ill-conditioned: the layer against the reference.
#[test]
fn otk_matches_the_reference() {
    let device = flex_f64();
    let mut rng = Rng::new(71);
    for (what, params) in cases(&mut rng) {
        let mut worst: f64 = 0.0;
        for _ in 0..2 {
            let x = inputs(&mut rng, params.input_range);
            let expected = reference_batch(&params, &params.references, &x);
            let layer = params.layer(PREFIX, &device);
            let out =
                layer.forward_detailed(
                    PoolingInput::tokens(tensor(x.clone(), [B, N, C], &device))
                        .with_mask(bool_mask(&VALID.concat(), B, &device)),
                );
            assert!(out.converged.into_scalar::<bool>(), "{what}: converged");
            assert_eq!(out.embedding.dims(), [B, P, params.heads * C]);
            let y = values(out.embedding);
            worst = worst.max(max_abs_difference(&y, &expected));
            assert_close(&y, &expected, 1e-9, 1e-10, &format!("{what}: tokens"));

            // Maps [B, C, 1, N] of the same values, the prefix masked out instead of skipped.
            let mut map_valid = VALID.concat();
            (0..B).for_each(|b| map_valid[b * N] = false);
            let maps = tensor(x.clone(), [B, N, C], &device)
                .swap_dims(1, 2)
                .reshape([B, C, 1, N]);
            let y = params
                .layer(0, &device)
                .forward(PoolingInput::maps(maps).with_mask(bool_mask(&map_valid, B, &device)));
            assert_eq!(y.dims(), [B, params.width()]);
            let y = values(y);
            worst = worst.max(max_abs_difference(&y, &expected));
            assert_close(&y, &expected, 1e-9, 1e-10, &format!("{what}: maps"));
        }
        println!("OTK vs the f64 reference, {what}: max |error| = {worst:.2e}");
    }
}

/// ∂/∂x and ∂/∂references of Σ g·y against central differences of the reference, on masked
/// tokens with a prefix, well- and ill-conditioned.
#[test]
fn otk_gradients_match_finite_differences() {
    let device = flex_f64().autodiff();
    let mut rng = Rng::new(72);
    for (what, params) in cases(&mut rng) {
        let x = inputs(&mut rng, params.input_range);
        let width = params.width();
        let g: Vec<f64> = (0..B * width).map(|_| rng.uniform(-1.0, 1.0)).collect();
        let layer = params.layer(PREFIX, &device);
        let tokens = tensor(x.clone(), [B, N, C], &device).require_grad();
        let y = layer.forward(PoolingInput::tokens(tokens.clone()).with_mask(bool_mask(
            &VALID.concat(),
            B,
            &device,
        )));
        let grads = (y * tensor(g.clone(), [B, width], &device))
            .sum()
            .backward();
        let loss = |z: &[f64], x: &[f64]| dot(&reference_batch(&params, z, x), &g);
        let h = 1e-6;
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
        let fd = reference::central_difference(&|v: &[f64]| loss(&params.references, v), &x, h);
        let scale = fd.iter().fold(1.0f64, |m, v| m.max(v.abs()));
        let error_x = max_abs_difference(&dx, &fd);
        assert_close(&dx, &fd, 1e-5, 1e-6 * scale, &format!("{what}: dx"));
        let dz = values(layer.references.val().grad(&grads).unwrap());
        let fd = reference::central_difference(&|v: &[f64]| loss(v, &x), &params.references, h);
        let scale = fd.iter().fold(1.0f64, |m, v| m.max(v.abs()));
        let error_z = max_abs_difference(&dz, &fd);
        assert_close(
            &dz,
            &fd,
            1e-5,
            1e-6 * scale,
            &format!("{what}: dreferences"),
        );
        println!(
            "OTK FD, {what}: max |autodiff − FD| dx {error_x:.2e}, dreferences {error_z:.2e} (largest |FD| {scale:.2e})"
        );
    }
}

/// Masking = dropping the tokens (NaN padding, left or right), for one and several heads.
#[test]
fn masking_equals_dropping() {
    let device = flex_f64();
    let mut rng = Rng::new(73);
    for (what, params) in cases(&mut rng) {
        let layer = params.layer(0, &device);
        for len in [1, 3, 5] {
            let x: Vec<f64> = (0..len * C).map(|_| rng.uniform(-1.5, 1.5)).collect();
            let dropped = values(layer.forward_tokens(tensor(x.clone(), [1, len, C], &device)));
            let n = len + 2;
            for (name, padded, valid) in padded_both_sides(&x, len, n, C, f64::NAN) {
                let y = values(
                    layer.forward(
                        PoolingInput::tokens(tensor(padded, [1, n, C], &device))
                            .with_mask(bool_mask(&valid, 1, &device)),
                    ),
                );
                assert_close(
                    &y,
                    &dropped,
                    1e-10,
                    1e-11,
                    &format!("{what} {name} pad {len}"),
                );
            }
        }
    }
}

/// Identical tokens: every plan row is uniform over them (mass 1 each), so every output row
/// is the token itself (times its row mass, 1); and on random tokens the plan's marginals are
/// 1 per reference and p/N_valid per valid position, 0 on padding.
#[test]
fn identical_tokens_and_the_plan_marginals() {
    let device = flex_f64();
    let mut rng = Rng::new(76);
    for (what, params) in cases(&mut rng) {
        let layer = params.layer(0, &device);
        let layer = Otk {
            settings: layer.settings.with_tolerance(1e-10),
            ..layer
        };
        let token: Vec<f64> = (0..C).map(|_| rng.uniform(-2.0, 2.0)).collect();
        let x = token.repeat(5);
        let y = values(layer.forward_tokens(tensor(x, [1, 5, C], &device)));
        let expected = token.repeat(P * params.heads);
        assert_close(&y, &expected, 1e-12, 1e-12, &format!("{what}: identical"));

        let mut x: Vec<f64> = (0..B * N * C)
            .map(|_| rng.uniform(-params.input_range, params.input_range))
            .collect();
        for (i, v) in x.iter_mut().enumerate() {
            if !VALID[i / (N * C)][(i / C) % N] {
                *v = f64::NAN;
            }
        }
        let out = layer.forward_detailed(
            PoolingInput::tokens(tensor(x.clone(), [B, N, C], &device)).with_mask(bool_mask(
                &VALID.concat(),
                B,
                &device,
            )),
        );
        // The rows (renormalised: the last update) are checked exactly, the columns at the
        // tolerance. Sinkhorn's linear rate can be very slow on a near-degenerate plan
        // (small ε, or p = N_valid): Rng::new(74) draws one that neither this solver nor a
        // plain NumPy log-domain Sinkhorn brings below 3e-9 in 2·10⁵ iterations; the
        // ill-conditioned case may stop at its iteration cap, its rows then within 1e-5.
        let converged = out.converged.into_scalar::<bool>();
        let ill_conditioned = params.epsilon < 0.1;
        assert!(converged || ill_conditioned, "{what}: converged");
        let column_tolerance = if converged { 1e-9 } else { 1e-5 };
        let plan = values(out.plan); // [B, heads, p, N]
        for b in 0..B {
            let count = VALID[b].iter().filter(|&&v| v).count() as f64;
            for h in 0..params.heads {
                let at = |k: usize, n: usize| plan[((b * params.heads + h) * P + k) * N + n];
                for k in 0..P {
                    let row: f64 = (0..N).map(|n| at(k, n)).sum();
                    assert!((row - 1.0).abs() < 1e-13, "{what}: row {k} sums to {row}");
                }
                for (n, &valid) in VALID[b].iter().enumerate() {
                    let column: f64 = (0..P).map(|k| at(k, n)).sum();
                    let expected = if valid { P as f64 / count } else { 0.0 };
                    assert!(
                        (column - expected).abs() < column_tolerance,
                        "{what}: column {n} sums to {column}, expected {expected}"
                    );
                }
            }
        }
    }
}

/// Tokens x_j = s + δ_j with a common shift s of size 300: ⟨x, z⟩/ε reaches ~10³, where the
/// authors' kernel exp(⟨x, z⟩/ε) is +∞ even in f64 (past 709) and their plan NaN. The shift
/// adds ⟨s, z_k⟩ to row k of the costs, which no balanced plan sees: the layer gives the
/// finite result of the log-domain reference, equal to the unshifted output plus s, and
/// finite gradients.
#[test]
fn huge_inner_products_give_a_finite_result() {
    let device = flex_f64();
    let mut rng = Rng::new(75);
    let params = Params::random(&mut rng, 2, 0.1, 0.5, 1.5);
    let shift: Vec<f64> = (0..C)
        .map(|_| 300.0 * rng.uniform(-1.0, 1.0).signum())
        .collect();
    let delta: Vec<f64> = (0..B * N * C).map(|_| rng.uniform(-1.5, 1.5)).collect();
    let x: Vec<f64> = delta
        .iter()
        .enumerate()
        .map(|(i, d)| d + shift[i % C])
        .collect();
    let z = params.nested(&params.references);
    let largest = (0..B * N)
        .flat_map(|j| z.concat().into_iter().map(move |zk| (j, zk)))
        .map(|(j, zk)| dot(&x[j * C..(j + 1) * C], &zk) / params.epsilon)
        .fold(0.0, f64::max);
    assert!(largest > 709.8, "{largest}");
    assert!(largest.exp().is_infinite());
    let layer = params.layer(0, &device);
    let y = values(layer.forward_tokens(tensor(x.clone(), [B, N, C], &device)));
    let expected: Vec<f64> = (0..B)
        .flat_map(|b| {
            let rows = (0..N)
                .map(|n| x[(b * N + n) * C..(b * N + n + 1) * C].to_vec())
                .collect::<Vec<_>>();
            reference::otk(&rows, &z, params.epsilon)
        })
        .collect();
    assert!(y.iter().all(|v| v.is_finite()));
    let error = max_abs_difference(&y, &expected);
    assert_close(&y, &expected, 1e-10, 1e-9, "huge ⟨x, z⟩");
    let unshifted = values(layer.forward_tokens(tensor(delta, [B, N, C], &device)));
    let shifted: Vec<f64> = unshifted
        .iter()
        .enumerate()
        .map(|(i, v)| v + shift[i % C])
        .collect();
    assert_close(&y, &shifted, 1e-10, 1e-9, "shift");
    println!("OTK at ⟨x, z⟩/ε up to {largest:.0}: max |error| vs the reference {error:.2e}");

    let device = device.autodiff();
    let layer = params.layer(0, &device);
    let tokens = tensor(x, [B, N, C], &device).require_grad();
    let grads = layer.forward_tokens(tokens.clone()).sum().backward();
    let dx = values(tokens.grad(&grads).unwrap());
    let dz = values(layer.references.val().grad(&grads).unwrap());
    assert!(dx.iter().chain(&dz).all(|v| v.is_finite()));
}
