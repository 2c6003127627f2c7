//! Self-check of the `f64` reference oracle in `tests/reference/mod.rs`: the test vectors of
//! `docs/maths.md` §1, the closed-form gradients against central differences, the GSP mass
//! constraints, optimality conditions and limits of `docs/maths.md` §3, the implicit backward
//! of §4 against central differences, and the ZSR loss of §5 against hand computations.
//!
//! Tolerances (all `f64`):
//! * doc test vectors printed with 10 decimals: `1e-9` absolute (class-token vector, 4
//!   decimals: `6e-5`);
//! * gradient checks against central differences: max error `<= 1e-7 ·` max |gradient|
//!   (plus `1e-12` absolute for all-zero gradients);
//! * GSP constraints: `1e-13` on sums of O(1) quantities, `1e-15` per position;
//! * GSP limits: μ = 1 − 1e-9 vs GAP `1e-8`; ε = 1e6 vs GAP `1e-5`; identical features
//!   `1e-14`; ε = 0.005 vs hard selection `1e-9`; μ = 1e-6 vs attention `1e-5`;
//! * ZSR hand computations: `1e-12` relative.

#![allow(clippy::needless_range_loop)] // index loops mirror the formulas

use crate::common::max_abs_difference;
use crate::reference;
use reference::*;

// ---------------------------------------------------------------------------------------------
// Test helpers
// ---------------------------------------------------------------------------------------------

/// xorshift64* generator: deterministic, no crates.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [0, 1).
    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }

    fn vector(&mut self, n: usize, lo: f64, hi: f64) -> Vec<f64> {
        (0..n).map(|_| self.range(lo, hi)).collect()
    }

    fn matrix(&mut self, rows: usize, cols: usize, lo: f64, hi: f64) -> Vec<Vec<f64>> {
        (0..rows).map(|_| self.vector(cols, lo, hi)).collect()
    }

    /// Random masses summing to 1, with the listed positions masked out (mass 0).
    fn masses(&mut self, n: usize, masked: &[usize]) -> Vec<f64> {
        let mut a: Vec<f64> = (0..n)
            .map(|j| {
                if masked.contains(&j) {
                    0.0
                } else {
                    self.range(0.2, 1.0)
                }
            })
            .collect();
        let s: f64 = a.iter().sum();
        for v in &mut a {
            *v /= s;
        }
        a
    }
}

fn assert_close(actual: f64, expected: f64, tol: f64, what: &str) {
    assert!(
        actual.is_finite() && (actual - expected).abs() <= tol,
        "{what}: got {actual:.15e}, expected {expected:.15e} (|diff| = {:.3e} > tol {tol:.1e})",
        (actual - expected).abs()
    );
}

fn assert_vec_close(actual: &[f64], expected: &[f64], tol: f64, what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    for i in 0..actual.len() {
        assert_close(actual[i], expected[i], tol, &format!("{what}[{i}]"));
    }
}

fn max_abs(v: &[f64]) -> f64 {
    v.iter().fold(0.0, |m, &a| m.max(a.abs()))
}

/// Gradient check: `max |analytic − numeric| <= rtol · max |numeric| + 1e-12`.
fn assert_grad_close(analytic: &[f64], numeric: &[f64], rtol: f64, what: &str) {
    assert_eq!(analytic.len(), numeric.len(), "{what}: length");
    let scale = max_abs(numeric);
    let err = max_abs_difference(analytic, numeric);
    assert!(
        analytic.iter().all(|a| a.is_finite()) && err <= rtol * scale + 1e-12,
        "{what}: max error {err:.3e} vs scale {scale:.3e} (rtol {rtol:.1e})\n\
         analytic {analytic:?}\nnumeric  {numeric:?}"
    );
}

fn flatten(m: &[Vec<f64>]) -> Vec<f64> {
    m.iter().flat_map(|r| r.iter().copied()).collect()
}

fn unflatten(v: &[f64], rows: usize, cols: usize) -> Vec<Vec<f64>> {
    assert_eq!(v.len(), rows * cols);
    (0..rows)
        .map(|r| v[r * cols..(r + 1) * cols].to_vec())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// GAP / GeM (docs/maths.md §1)
// ---------------------------------------------------------------------------------------------

#[test]
fn gap_hand_computed() {
    let x = vec![vec![1.0, 2.0], vec![3.0, 4.0], vec![5.0, 9.0]];
    assert_vec_close(&gap(&x), &[3.0, 5.0], 1e-15, "gap");
}

#[test]
fn gem_doc_values() {
    for (p, y) in GEM_DOC_VALUES {
        assert_close(
            gem_channel(&GEM_DOC_X, p, GEM_EPS),
            y,
            1e-9,
            &format!("GeM p={p}"),
        );
    }
}

#[test]
fn gem_doc_gradients_at_p3() {
    let (dx, dp) = gem_channel_grad(&GEM_DOC_X, 3.0, GEM_EPS);
    assert_close(dp, 0.2804015527, 1e-9, "dy/dp");
    assert_vec_close(
        &dx,
        &[0.0090062243, 0.0360248972, 0.1440995888, 0.5763983552],
        1e-9,
        "dy/dx",
    );
}

#[test]
fn gem_doc_signed_input() {
    let x = [-1.0, 0.5, 2.0];
    assert_close(gem_channel(&x, 3.0, GEM_EPS), 1.3939077679, 1e-9, "y");
    let (dx, _) = gem_channel_grad(&x, 3.0, GEM_EPS);
    assert_vec_close(&dx, &[0.0, 0.0428894698, 0.6862315165], 1e-9, "dy/dx");
    assert_eq!(
        dx[0], 0.0,
        "clamped entry must have an exactly zero gradient"
    );
}

#[test]
fn gem_properties() {
    let mut rng = Rng::new(11);
    for _ in 0..50 {
        let n = 1 + (rng.next_u64() % 9) as usize;
        let x = rng.vector(n, 0.01, 5.0);
        let mean = x.iter().sum::<f64>() / n as f64;
        let max = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        assert_close(
            gem_channel(&x, 1.0, GEM_EPS),
            mean,
            1e-13,
            "p=1 is the mean",
        );
        for p in [1.5, 3.0, 7.0, 50.0] {
            let y = gem_channel(&x, p, GEM_EPS);
            assert!(mean - 1e-12 <= y && y <= max + 1e-12, "mean <= GeM <= max");
            let scaled: Vec<f64> = x.iter().map(|v| 3.5 * v).collect();
            assert_close(
                gem_channel(&scaled, p, GEM_EPS),
                3.5 * y,
                1e-12 * y,
                "homogeneity",
            );
        }
        // p -> infinity -> max
        assert_close(
            gem_channel(&x, 1e6, GEM_EPS),
            max,
            1e-5 * max,
            "p->inf is max",
        );
    }
}

#[test]
fn gem_stable_extremes() {
    // Every value at or below the clamp: y = eps, finite gradients (dy/dx = 0, dy/dp = 0).
    let x = [-1.0, 0.0, 1e-7];
    for p in [3.0, 50.0, 1000.0] {
        assert_close(gem_channel(&x, p, GEM_EPS), GEM_EPS, 1e-18, "all clamped");
        let (dx, dp) = gem_channel_grad(&x, p, GEM_EPS);
        assert!(dx.iter().all(|&d| d == 0.0));
        assert!(dp.is_finite() && dp.abs() < 1e-18, "dp = {dp}");
    }
    // Huge values and p: no overflow.
    let big = [1e300, 2e300, 5e299];
    let y = gem_channel(&big, 1000.0, GEM_EPS);
    assert!(y.is_finite() && (1e300..=2e300).contains(&y));
    let (dx, dp) = gem_channel_grad(&big, 1000.0, GEM_EPS);
    assert!(dx.iter().all(|d| d.is_finite()) && dp.is_finite());
}

#[test]
fn gem_gradients_match_central_differences() {
    let mut rng = Rng::new(12);
    for case in 0..40 {
        let n = 1 + (rng.next_u64() % 8) as usize;
        // Keep values away from the clamp kink so that x ± h stays on one side.
        let x: Vec<f64> = (0..n)
            .map(|_| {
                loop {
                    let v = rng.range(-1.0, 3.0);
                    if v.abs() > 0.05 {
                        break v;
                    }
                }
            })
            .collect();
        let p = rng.range(0.5, 8.0);
        let (dx, dp) = gem_channel_grad(&x, p, GEM_EPS);
        let num_dx = central_difference(&|v: &[f64]| gem_channel(v, p, GEM_EPS), &x, 1e-6);
        assert_grad_close(&dx, &num_dx, 1e-7, &format!("case {case}: dy/dx"));
        // h = 1e-4: y can be ~1e4 times dy/dp, so a smaller h loses the difference to rounding.
        let num_dp = central_difference(&|q: &[f64]| gem_channel(&x, q[0], GEM_EPS), &[p], 1e-4);
        assert_grad_close(&[dp], &num_dp, 1e-7, &format!("case {case}: dy/dp"));
    }
}

// ---------------------------------------------------------------------------------------------
// GGeM (docs/maths.md §1)
// ---------------------------------------------------------------------------------------------

fn doc_tokens() -> Vec<Vec<f64>> {
    vec![
        vec![0.1, 1.0, 2.0, 0.5],
        vec![0.3, 0.2, 1.5, 2.5],
        vec![1.2, 0.7, 0.4, 3.0],
    ]
}

/// ∂(Σ_c y_c)/∂p_g from the closed form of [`gem_channel_grad`].
fn ggem_dp_closed_form(x: &[Vec<f64>], p: &[f64], interleaved: bool) -> Vec<f64> {
    let c = x[0].len();
    let mut dp = vec![0.0; p.len()];
    for ch in 0..c {
        let g = group_of(ch, c, p.len(), interleaved);
        let col: Vec<f64> = x.iter().map(|r| r[ch]).collect();
        dp[g] += gem_channel_grad(&col, p[g], GEM_EPS).1;
    }
    dp
}

fn check_ggem_layout(interleaved: bool, y_doc: &[f64], dp_doc: &[f64]) {
    let x = doc_tokens();
    let p = [2.0, 3.0];
    assert_vec_close(&group_gem(&x, &p, GEM_EPS, interleaved), y_doc, 1e-9, "y");
    let loss = |q: &[f64]| group_gem(&x, q, GEM_EPS, interleaved).iter().sum::<f64>();
    let dp_num = central_difference(&loss, &p, 1e-5);
    assert_vec_close(&dp_num, dp_doc, 1e-8, "dL/dp (central differences)");
    let dp_cf = ggem_dp_closed_form(&x, &p, interleaved);
    assert_vec_close(&dp_cf, dp_doc, 1e-9, "dL/dp (closed form)");
}

#[test]
fn ggem_doc_contiguous() {
    check_ggem_layout(
        false,
        &[0.7164728420, 0.7141428429, 1.5622682323, 2.4244037929],
        &[0.2143554956, 0.1938087099],
    );
}

#[test]
fn ggem_doc_interleaved() {
    check_ggem_layout(
        true,
        &[0.7164728420, 0.7664985979, 1.4617341300, 2.4244037929],
        &[0.2759314705, 0.1564392185],
    );
}

#[test]
fn ggem_doc_class_token_negative() {
    let mut x = vec![vec![9.0; 4]];
    x.extend(doc_tokens());
    let wrong = group_gem(&x, &[2.0, 3.0], GEM_EPS, false);
    assert_vec_close(
        &wrong,
        &[4.5426, 4.5423, 5.6991, 5.7784],
        6e-5,
        "with class token",
    );
    let right = group_gem(&doc_tokens(), &[2.0, 3.0], GEM_EPS, false);
    assert!((wrong[0] - right[0]).abs() > 1.0);
}

#[test]
fn ggem_special_cases() {
    let mut rng = Rng::new(13);
    let x = rng.matrix(5, 6, 0.05, 3.0);
    // G = 1 is GeM.
    let y1 = group_gem(&x, &[2.5], GEM_EPS, false);
    for ch in 0..6 {
        let col: Vec<f64> = x.iter().map(|r| r[ch]).collect();
        assert_close(y1[ch], gem_channel(&col, 2.5, GEM_EPS), 1e-15, "G=1");
    }
    // G = C: one p per channel, both layouts agree.
    let p: Vec<f64> = (0..6).map(|i| 1.0 + i as f64).collect();
    let a = group_gem(&x, &p, GEM_EPS, false);
    let b = group_gem(&x, &p, GEM_EPS, true);
    assert_vec_close(&a, &b, 0.0, "G=C layouts");
    // All p = 1 is GAP (positive inputs).
    assert_vec_close(
        &group_gem(&x, &[1.0; 3], GEM_EPS, true),
        &gap(&x),
        1e-14,
        "p=1",
    );
    // Layout mapping.
    assert_eq!(
        (0..6).map(|c| group_of(c, 6, 3, false)).collect::<Vec<_>>(),
        [0, 0, 1, 1, 2, 2]
    );
    assert_eq!(
        (0..6).map(|c| group_of(c, 6, 3, true)).collect::<Vec<_>>(),
        [0, 1, 2, 0, 1, 2]
    );
}

// ---------------------------------------------------------------------------------------------
// GSP forward (docs/maths.md §2–3)
// ---------------------------------------------------------------------------------------------

#[test]
fn gsp_costs_hand_computed() {
    // φ(3,4) = (0.6,0.8); φ(0.1,0.2) = itself; φ(0,0.5) = itself; φ(0,−2) = (0,−1).
    let x = vec![vec![3.0, 4.0], vec![0.1, 0.2]];
    let w = vec![vec![0.0, 0.5], vec![0.0, -2.0]];
    let c = gsp_costs(&x, &w);
    assert_vec_close(&c[0], &[0.45f64.sqrt(), 0.1f64.sqrt()], 1e-15, "c[0]");
    assert_vec_close(&c[1], &[3.6f64.sqrt(), 1.45f64.sqrt()], 1e-15, "c[1]");
}

struct Config {
    n: usize,
    k: usize,
    c: usize,
    mu: f64,
    epsilon: f64,
    /// None: uniform masses; Some(masked): random masses with these positions at 0.
    masses: Option<Vec<usize>>,
}

fn configs() -> Vec<Config> {
    let cfg = |n, k, c, mu, epsilon, masses| Config {
        n,
        k,
        c,
        mu,
        epsilon,
        masses,
    };
    vec![
        cfg(7, 3, 4, 0.3, 0.2, None),
        cfg(10, 5, 6, 0.9, 0.05, None),
        cfg(6, 4, 3, 0.5, 1e-3, None),
        cfg(9, 2, 5, 0.3, 0.2, Some(vec![])),
        cfg(8, 3, 4, 0.7, 0.1, Some(vec![1, 6])),
        cfg(5, 1, 2, 0.99, 0.5, None),
        cfg(12, 4, 4, 1e-3, 0.2, Some(vec![0])),
        cfg(16, 8, 8, 0.3, 2e-3, Some(vec![3, 4, 5])),
    ]
}

fn instance(rng: &mut Rng, cfg: &Config) -> (Vec<Vec<f64>>, Vec<Vec<f64>>, Vec<f64>) {
    let x = rng.matrix(cfg.n, cfg.c, -2.0, 2.0); // some norms > 1: φ normalises them
    let w = rng.matrix(cfg.k, cfg.c, -1.5, 1.5);
    let a = match &cfg.masses {
        None => uniform_mass(cfg.n),
        Some(masked) => rng.masses(cfg.n, masked),
    };
    (x, w, a)
}

#[test]
fn gsp_mass_constraints_and_optimality() {
    let mut rng = Rng::new(21);
    for (ci, cfg) in configs().iter().enumerate() {
        let (x, w, a) = instance(&mut rng, cfg);
        let r = gsp(&x, &w, &a, cfg.mu, cfg.epsilon);
        let tag = format!("config {ci}");
        assert!(r.beta.is_finite(), "{tag}: beta");
        for row in &r.costs {
            assert!(row.iter().all(|&c| (0.0..=2.0 + 1e-12).contains(&c)));
        }
        assert_close(r.weights.iter().sum(), 1.0, 1e-13, &format!("{tag}: Σw"));
        assert_close(r.attributes.iter().sum(), 1.0, 1e-13, &format!("{tag}: Σz"));
        let total: f64 = r.plan.iter().flatten().sum();
        assert_close(total, cfg.mu, 1e-13, &format!("{tag}: ΣP"));
        for j in 0..cfg.n {
            let col: f64 = (0..cfg.k).map(|k| r.plan[k][j]).sum();
            assert_close(r.residual[j] + col, a[j], 1e-15, &format!("{tag}: ρ+ΣP"));
            assert!(r.weights[j] >= 0.0 && r.residual[j] >= 0.0);
            assert!((0..cfg.k).all(|k| r.plan[k][j] >= 0.0 && r.plan[k][j].is_finite()));
            if a[j] == 0.0 {
                assert_eq!(r.weights[j], 0.0, "{tag}: masked weight");
            }
        }
        // β solves Σ_j a_j σ(β + ℓ_j) = μ (ℓ recomputed here).
        let mut s = 0.0;
        for j in 0..cfg.n {
            let col: Vec<f64> = (0..cfg.k).map(|k| -r.costs[k][j] / cfg.epsilon).collect();
            if a[j] > 0.0 {
                s += a[j] * sigmoid(r.beta + logsumexp(&col));
            }
        }
        assert_close(s, cfg.mu, 1e-14, &format!("{tag}: β equation"));
        // First-order optimality of §4: c_kj/ε + ln P_kj − ln ρ_j is the same constant (β)
        // for every (k, j), which makes every feasible mass move first-order neutral.
        for j in 0..cfg.n {
            for k in 0..cfg.k {
                let (p, rho) = (r.plan[k][j], r.residual[j]);
                if p > 1e-250 && rho > 1e-250 {
                    let q = r.costs[k][j] / cfg.epsilon + p.ln() - rho.ln();
                    let tol = 1e-12 * r.beta.abs().max(r.costs[k][j] / cfg.epsilon).max(1.0);
                    assert_close(q, r.beta, tol, &format!("{tag}: stationarity"));
                }
            }
        }
        // Pooled output is the w-weighted sum, inside the box of the active features.
        for ch in 0..cfg.c {
            let expect: f64 = (0..cfg.n).map(|j| r.weights[j] * x[j][ch]).sum();
            assert_close(r.pooled[ch], expect, 1e-14, &format!("{tag}: pooled"));
            let active = (0..cfg.n).filter(|&j| a[j] > 0.0);
            let lo = active
                .clone()
                .map(|j| x[j][ch])
                .fold(f64::INFINITY, f64::min);
            let hi = active.map(|j| x[j][ch]).fold(f64::NEG_INFINITY, f64::max);
            assert!(lo - 1e-12 <= r.pooled[ch] && r.pooled[ch] <= hi + 1e-12);
        }
    }
}

#[test]
fn gsp_objective_is_minimal_among_feasible_perturbations() {
    // Direct check of §4 without the closed form: moving mass δ between any two entries of
    // [ρ; P] while keeping the constraints can only increase the objective.
    let objective = |c: &[Vec<f64>], p: &[Vec<f64>], rho: &[f64], eps: f64| -> f64 {
        let xlogx = |v: f64| if v > 0.0 { v * (v.ln() - 1.0) } else { 0.0 };
        let mut f = 0.0;
        for k in 0..c.len() {
            for j in 0..rho.len() {
                f += c[k][j] * p[k][j] + eps * xlogx(p[k][j]);
            }
        }
        f + eps * rho.iter().map(|&r| xlogx(r)).sum::<f64>()
    };
    let mut rng = Rng::new(22);
    let (n, k, eps, mu) = (5, 3, 0.3, 0.4);
    let c = rng.matrix(k, n, 0.0, 2.0);
    let a = rng.masses(n, &[]);
    let r = gsp_from_costs(&c, &a, mu, eps);
    let f0 = objective(&c, &r.plan, &r.residual, eps);
    let delta = 1e-4;
    for j1 in 0..n {
        for k1 in 0..k {
            for j2 in 0..n {
                for k2 in 0..k {
                    if (j1, k1) == (j2, k2) {
                        continue;
                    }
                    // P[k1][j1] -= δ, ρ[j1] += δ, P[k2][j2] += δ, ρ[j2] -= δ.
                    let mut p = r.plan.clone();
                    let mut rho = r.residual.clone();
                    p[k1][j1] -= delta;
                    rho[j1] += delta;
                    p[k2][j2] += delta;
                    rho[j2] -= delta;
                    let f = objective(&c, &p, &rho, eps);
                    assert!(f > f0, "objective decreased: {f} < {f0}");
                }
            }
        }
    }
}

/// A random GSP case from `seed`: features `[n, c]` in [−2, 2] and prototypes `[k, c]` in
/// [−1, 1], with the generator for more.
fn gsp_case(seed: u64, n: usize, c: usize, k: usize) -> (Rng, Vec<Vec<f64>>, Vec<Vec<f64>>) {
    let mut rng = Rng::new(seed);
    let x = rng.matrix(n, c, -2.0, 2.0);
    let w = rng.matrix(k, c, -1.0, 1.0);
    (rng, x, w)
}

/// GSP's weights and pooled vector, each within `tol`.
fn assert_weights_and_pooled(r: &GspReference, weights: &[f64], pooled: &[f64], tol: f64) {
    assert_vec_close(&r.weights, weights, tol, "weights");
    assert_vec_close(&r.pooled, pooled, tol, "pooled");
}

#[test]
fn gsp_mu_near_one_is_gap() {
    let (mut rng, x, w) = gsp_case(23, 6, 4, 3);
    let a = uniform_mass(6);
    let r = gsp(&x, &w, &a, 1.0 - 1e-9, 0.2);
    assert_weights_and_pooled(&r, &a, &gap(&x), 1e-8);
    let exact = gsp(&x, &w, &a, 1.0, 0.2);
    assert_vec_close(&exact.pooled, &gap(&x), 1e-15, "μ = 1 exactly");
    // With masses: the mass-weighted mean.
    let m = rng.masses(6, &[2]);
    let r = gsp(&x, &w, &m, 1.0 - 1e-9, 0.2);
    assert_vec_close(&r.weights, &m, 1e-8, "masked weights");
}

#[test]
fn gsp_large_epsilon_is_gap() {
    let (_, x, w) = gsp_case(24, 7, 5, 4);
    for mu in [0.1, 0.3, 0.8] {
        let r = gsp(&x, &w, &uniform_mass(7), mu, 1e6);
        assert_weights_and_pooled(&r, &uniform_mass(7), &gap(&x), 1e-5);
    }
}

#[test]
fn gsp_identical_features_is_gap() {
    let mut rng = Rng::new(25);
    let row = rng.vector(4, -2.0, 2.0);
    let x = vec![row.clone(); 6];
    let w = rng.matrix(3, 4, -1.0, 1.0);
    for (mu, eps) in [(0.3, 0.2), (0.9, 1e-3), (1e-4, 0.05)] {
        let r = gsp(&x, &w, &uniform_mass(6), mu, eps);
        assert_weights_and_pooled(&r, &uniform_mass(6), &row, 1e-14);
    }
}

#[test]
fn gsp_invariances() {
    let (_, x, w) = gsp_case(26, 6, 3, 2);
    let a = uniform_mass(6);
    let r = gsp(&x, &w, &a, 0.4, 0.15);
    // A constant added to all costs.
    let shifted: Vec<Vec<f64>> = r
        .costs
        .iter()
        .map(|row| row.iter().map(|c| c + 0.37).collect())
        .collect();
    let s = gsp_from_costs(&shifted, &a, 0.4, 0.15);
    assert_vec_close(&s.weights, &r.weights, 1e-13, "cost shift: weights");
    assert_vec_close(
        &flatten(&s.plan),
        &flatten(&r.plan),
        1e-13,
        "cost shift: plan",
    );
    // Permuting positions permutes w and leaves y unchanged.
    let perm = [3, 0, 5, 1, 4, 2];
    let xp: Vec<Vec<f64>> = perm.iter().map(|&j| x[j].clone()).collect();
    let rp = gsp(&xp, &w, &a, 0.4, 0.15);
    let wp: Vec<f64> = perm.iter().map(|&j| r.weights[j]).collect();
    assert_vec_close(&rp.weights, &wp, 1e-14, "permutation: weights");
    assert_vec_close(&rp.pooled, &r.pooled, 1e-14, "permutation: pooled");
}

#[test]
fn gsp_small_epsilon_is_hard_selection() {
    let w = vec![vec![1.0, 0.0], vec![0.0, 1.0]];
    // Nearest-prototype distances 0.8, 0.05, √2, 0.55, 0.3 (the third has norm 3: φ maps it
    // to (−1, 0)); sorted gaps >= 0.25, and every second-nearest prototype >= 0.22 farther.
    let x = vec![
        vec![0.0, 0.2],
        vec![0.95, 0.0],
        vec![-3.0, 0.0],
        vec![0.45, 0.0],
        vec![0.0, 0.7],
    ];
    let costs = gsp_costs(&x, &w);
    let mut d: Vec<f64> = (0..5).map(|j| costs[0][j].min(costs[1][j])).collect();
    for j in 0..5 {
        let gap2 = (costs[0][j] - costs[1][j]).abs();
        assert!(gap2 >= 0.2, "second prototype too close at {j}");
    }
    d.sort_by(|a, b| a.partial_cmp(b).unwrap());
    assert!(
        d.windows(2).all(|p| p[1] - p[0] >= 0.2),
        "distances not separated"
    );

    let expected_mu05 = [0.0, 0.4, 0.0, 0.2, 0.4]; // 2.5 positions: 2 full, 1 half
    let hard = gsp_hard_selection_weights(&x, &w, 0.5);
    assert_vec_close(&hard, &expected_mu05, 1e-15, "hard selection μ=0.5");
    for mu in [0.5, 0.3, 0.4, 0.9] {
        let hard = gsp_hard_selection_weights(&x, &w, mu);
        assert_close(hard.iter().sum(), 1.0, 1e-15, "hard Σw");
        let soft = gsp(&x, &w, &uniform_mass(5), mu, 0.005);
        assert_vec_close(
            &soft.weights,
            &hard,
            1e-9,
            &format!("ε=0.005 vs hard, μ={mu}"),
        );
    }
}

#[test]
fn gsp_small_mu_is_attention() {
    let mut rng = Rng::new(27);
    let x = rng.matrix(8, 4, -2.0, 2.0);
    let w = rng.matrix(3, 4, -1.0, 1.0);
    for eps in [0.2, 0.05] {
        let att = attention_weights(&x, &w, eps);
        assert_close(att.iter().sum(), 1.0, 1e-14, "attention Σ");
        let r = gsp(&x, &w, &uniform_mass(8), 1e-6, eps);
        assert_vec_close(
            &r.weights,
            &att,
            1e-5,
            &format!("μ=1e-6 vs attention, ε={eps}"),
        );
    }
}

// ---------------------------------------------------------------------------------------------
// GSP implicit backward (docs/maths.md §4)
// ---------------------------------------------------------------------------------------------

/// `L(c) = Σ_{k=0..K} Σ_j G_kj X_kj(c)`, `X = [ρ; P]`.
fn transport_loss(costs: &[Vec<f64>], g: &[Vec<f64>], a: &[f64], mu: f64, eps: f64) -> f64 {
    let x = gsp_from_costs(costs, a, mu, eps).plan_with_residual();
    let mut l = 0.0;
    for k in 0..x.len() {
        for j in 0..a.len() {
            l += g[k][j] * x[k][j];
        }
    }
    l
}

#[test]
fn gsp_implicit_backward_matches_central_differences() {
    let mut rng = Rng::new(31);
    // (N, K, μ, ε, masked positions or None for uniform masses)
    type Case = (usize, usize, f64, f64, Option<Vec<usize>>);
    let cases: Vec<Case> = vec![
        (6, 3, 0.3, 0.2, None),
        (7, 4, 0.9, 0.05, Some(vec![])),
        (8, 2, 0.5, 0.1, Some(vec![2, 5])),
        (5, 3, 0.01, 0.5, None),
        (9, 3, 0.6, 0.2, Some(vec![0, 8])),
    ];
    for (ci, (n, k, mu, eps, masked)) in cases.into_iter().enumerate() {
        let a = match &masked {
            None => uniform_mass(n),
            Some(m) => rng.masses(n, m),
        };
        let costs = rng.matrix(k, n, 0.0, 2.0);
        let g = rng.matrix(k + 1, n, -1.0, 1.0);
        let r = gsp_from_costs(&costs, &a, mu, eps);
        let analytic = gsp_implicit_backward(&r.plan_with_residual(), &g, &a, mu, eps);
        let f = |c: &[f64]| transport_loss(&unflatten(c, k, n), &g, &a, mu, eps);
        // h = 1e-4·ε balances truncation ((h/ε)² relative) against rounding (L can be much
        // larger than its gradient when μ is small).
        let numeric = central_difference(&f, &flatten(&costs), 1e-4 * eps);
        assert_grad_close(&flatten(&analytic), &numeric, 1e-7, &format!("case {ci}"));
        for j in 0..n {
            if a[j] == 0.0 {
                for kk in 0..k {
                    assert_eq!(analytic[kk][j], 0.0, "masked position gradient");
                    assert_eq!(numeric[kk * n + j], 0.0, "masked position numeric");
                }
            }
        }
    }
}

#[test]
fn gsp_implicit_backward_uniform_is_doc_formula() {
    // The doc's formula transcribed literally (uniform masses 1/N), against the general one.
    let mut rng = Rng::new(32);
    let (n, k, mu, eps) = (7, 3, 0.35, 0.15);
    let costs = rng.matrix(k, n, 0.0, 2.0);
    let g = rng.matrix(k + 1, n, -1.0, 1.0);
    let x = gsp_from_costs(&costs, &uniform_mass(n), mu, eps).plan_with_residual();
    let nf = n as f64;
    let h: Vec<Vec<f64>> = (0..=k)
        .map(|kk| (0..n).map(|j| x[kk][j] * g[kk][j]).collect())
        .collect();
    let u: Vec<f64> = (0..n).map(|j| (0..=k).map(|kk| h[kk][j]).sum()).collect();
    let sum_h0: f64 = h[0].iter().sum();
    let sum_u_rho: f64 = (0..n).map(|j| u[j] * x[0][j]).sum();
    let sum_rho2: f64 = x[0].iter().map(|r| r * r).sum();
    let lambda = -(sum_h0 - nf * sum_u_rho) / (1.0 - mu - nf * sum_rho2);
    let v: Vec<f64> = (0..n).map(|j| nf * (u[j] + lambda * x[0][j])).collect();
    let doc: Vec<f64> = (1..=k)
        .flat_map(|kk| {
            let (h, x, v) = (&h, &x, &v);
            (0..n).map(move |j| -(h[kk][j] - v[j] * x[kk][j]) / eps)
        })
        .collect();
    let ours = flatten(&gsp_implicit_backward(&x, &g, &uniform_mass(n), mu, eps));
    assert_grad_close(&ours, &doc, 1e-12, "doc formula");
}

// ---------------------------------------------------------------------------------------------
// ZSR (docs/maths.md §5)
// ---------------------------------------------------------------------------------------------

fn ce(logits: &[f64], label: usize) -> f64 {
    let m = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    m + logits.iter().map(|l| (l - m).exp()).sum::<f64>().ln() - logits[label]
}

fn embeddings3() -> Vec<Vec<f64>> {
    vec![vec![1.0, -0.5], vec![0.3, 0.9], vec![-0.4, 0.6]]
}

#[test]
fn zsr_one_sample_per_half_by_hand() {
    // n = 1 per half: ZZᵀ + λ is the scalar ‖z_train‖² + λ, W = z_trainᵀ y / (‖z‖² + λ).
    let e = embeddings3();
    let (z1, z2) = ([0.2, 0.8], [0.7, 0.3]);
    let (l1, l2) = (0usize, 2usize);
    let (lam, s) = (ZSR_LAMBDA, ZSR_SCALE);
    let z12 = z1[0] * z2[0] + z1[1] * z2[1]; // 0.38
    let r_a = z12 / (z2[0] * z2[0] + z2[1] * z2[1] + lam); // train half 2, test half 1
    let r_b = z12 / (z1[0] * z1[0] + z1[1] * z1[1] + lam); // train half 1, test half 2
    let dot = |p: &[f64], q: &[f64]| p[0] * q[0] + p[1] * q[1];
    let logits_a: Vec<f64> = e.iter().map(|c| s * r_a * dot(&e[l2], c)).collect();
    let logits_b: Vec<f64> = e.iter().map(|c| s * r_b * dot(&e[l1], c)).collect();
    let hand = 0.5 * (ce(&logits_a, l1) + ce(&logits_b, l2));
    // The same value computed independently in Python (float64).
    assert_close(hand, 8.54135734412007, 1e-12, "hand vs python");
    let ours = zero_shot_loss(
        [
            Half::new(&[z1.to_vec()], &[l1]),
            Half::new(&[z2.to_vec()], &[l2]),
        ],
        &e,
        lam,
        s,
    );
    assert_close(ours, hand, 1e-12 * hand, "zsr n=1");
    // Direction a alone (Python: 7.438515097636651).
    let a = zero_shot_loss_direction(
        Half::new(&[z2.to_vec()], &[l2]),
        Half::new(&[z1.to_vec()], &[l1]),
        &e,
        lam,
        s,
    );
    assert_close(a, 7.438515097636651, 1e-12 * a, "direction a");
}

/// A random ZSR case: class embeddings `[classes, dim]` in [−1, 1], and two halves of
/// attributes `[n1, k]`, `[n2, k]` in [`low`, 1].
fn zsr_case(
    seed: u64,
    [classes, dim]: [usize; 2],
    [n1, n2, k]: [usize; 3],
    low: f64,
) -> [Vec<Vec<f64>>; 3] {
    let mut rng = Rng::new(seed);
    let e = rng.matrix(classes, dim, -1.0, 1.0);
    let z1 = rng.matrix(n1, k, low, 1.0);
    let z2 = rng.matrix(n2, k, low, 1.0);
    [e, z1, z2]
}

#[test]
fn zsr_one_prototype_primal_form() {
    // K = 1: Zᵀ(ZZᵀ+λI)⁻¹Y = (ZᵀZ+λ)⁻¹ZᵀY, a scalar division. Unequal halves (3 and 2).
    let [e, z1, z2] = zsr_case(41, [5, 3], [3, 2, 1], 0.1);
    let (lab1, lab2) = (vec![0, 2, 1], vec![4, 3]);
    let (lam, s) = (ZSR_LAMBDA, ZSR_SCALE);
    let direction = |ztr: &[Vec<f64>], ltr: &[usize], zte: &[Vec<f64>], lte: &[usize]| {
        let denom: f64 = ztr.iter().map(|z| z[0] * z[0]).sum::<f64>() + lam;
        let w: Vec<f64> = (0..3)
            .map(|d| {
                (0..ztr.len())
                    .map(|i| ztr[i][0] * e[ltr[i]][d])
                    .sum::<f64>()
                    / denom
            })
            .collect();
        let mut total = 0.0;
        for t in 0..zte.len() {
            let logits: Vec<f64> = e
                .iter()
                .map(|c| s * zte[t][0] * (w[0] * c[0] + w[1] * c[1] + w[2] * c[2]))
                .collect();
            total += ce(&logits, lte[t]);
        }
        total / zte.len() as f64
    };
    let hand = 0.5 * (direction(&z2, &lab2, &z1, &lab1) + direction(&z1, &lab1, &z2, &lab2));
    let ours = zero_shot_loss([Half::new(&z1, &lab1), Half::new(&z2, &lab2)], &e, lam, s);
    assert_close(ours, hand, 1e-12 * hand, "zsr K=1");
    // Swapping the halves gives the same loss (it averages both directions).
    let swapped = zero_shot_loss([Half::new(&z2, &lab2), Half::new(&z1, &lab1)], &e, lam, s);
    assert_close(swapped, ours, 1e-14 * ours, "swap symmetry");
}

#[test]
fn zsr_two_samples_explicit_inverse() {
    // n = 2 per half, K = 3: (ZZᵀ+λI)⁻¹ by the explicit 2×2 inverse formula.
    let [e, z1, z2] = zsr_case(42, [4, 2], [2, 2, 3], 0.0);
    let (lab1, lab2) = ([0usize, 1], [2usize, 3]);
    let (lam, s) = (0.1, 4.0);
    let dot3 = |p: &[f64], q: &[f64]| p[0] * q[0] + p[1] * q[1] + p[2] * q[2];
    let direction = |ztr: &[Vec<f64>], ltr: &[usize], zte: &[Vec<f64>], lte: &[usize]| {
        let (a, b, d) = (
            dot3(&ztr[0], &ztr[0]) + lam,
            dot3(&ztr[0], &ztr[1]),
            dot3(&ztr[1], &ztr[1]) + lam,
        );
        let det = a * d - b * b;
        let inv = [[d / det, -b / det], [-b / det, a / det]];
        let mut total = 0.0;
        for t in 0..2 {
            // ŷ = z_test Zᵀ (ZZᵀ+λI)⁻¹ Y: kernel row κ_i = ⟨z_test, z_i⟩.
            let kappa = [dot3(&zte[t], &ztr[0]), dot3(&zte[t], &ztr[1])];
            let coef = [
                kappa[0] * inv[0][0] + kappa[1] * inv[1][0],
                kappa[0] * inv[0][1] + kappa[1] * inv[1][1],
            ];
            let yhat: Vec<f64> = (0..2)
                .map(|dd| coef[0] * e[ltr[0]][dd] + coef[1] * e[ltr[1]][dd])
                .collect();
            let logits: Vec<f64> = e
                .iter()
                .map(|c| s * (yhat[0] * c[0] + yhat[1] * c[1]))
                .collect();
            total += ce(&logits, lte[t]);
        }
        total / 2.0
    };
    let hand = 0.5 * (direction(&z2, &lab2, &z1, &lab1) + direction(&z1, &lab1, &z2, &lab2));
    let ours = zero_shot_loss([Half::new(&z1, &lab1), Half::new(&z2, &lab2)], &e, lam, s);
    assert_close(ours, hand, 1e-12 * hand, "zsr n=2");
}

#[test]
fn cholesky_solves_spd_systems() {
    let mut rng = Rng::new(43);
    let n = 6;
    let m = rng.matrix(n, n, -1.0, 1.0);
    let mut a = vec![vec![0.0; n]; n];
    for i in 0..n {
        for j in 0..n {
            a[i][j] =
                (0..n).map(|p| m[i][p] * m[j][p]).sum::<f64>() + if i == j { 0.5 } else { 0.0 };
        }
    }
    let b = rng.matrix(n, 3, -1.0, 1.0);
    let x = cholesky_solve(&cholesky(&a), &b);
    for i in 0..n {
        for c in 0..3 {
            let ax: f64 = (0..n).map(|p| a[i][p] * x[p][c]).sum();
            assert_close(ax, b[i][c], 1e-12, "A x = b");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Finite differences
// ---------------------------------------------------------------------------------------------

#[test]
fn central_difference_on_known_function() {
    let f = |v: &[f64]| v[0] * v[0] * v[1] + v[2].sin();
    let x = [1.3, -0.7, 0.4];
    let g = central_difference(&f, &x, 1e-5);
    let exact = [2.0 * x[0] * x[1], x[0] * x[0], x[2].cos()];
    assert_vec_close(&g, &exact, 1e-9, "central difference");
}

// ---------------------------------------------------------------------------------------------
// Attention pooling (docs/maths.md §11)
// ---------------------------------------------------------------------------------------------

/// erf against tabulated values (Abramowitz & Stegun 7.1, 16 digits), its symmetry and its
/// limit; the exact GELU at ±1.
#[test]
fn erf_and_gelu_on_known_values() {
    use crate::reference::{erf, gelu};
    #[allow(clippy::excessive_precision)]
    for (x, value) in [
        (0.1, 0.1124629160182849),
        (0.5, 0.5204998778130465),
        (1.0, 0.8427007929497149),
        (2.0, 0.9953222650189527),
        (3.5, 0.9999992569016276),
    ] {
        assert_close(erf(x), value, 1e-15, "erf");
        assert_close(erf(-x), -value, 1e-15, "erf is odd");
    }
    assert_eq!(erf(7.0), 1.0);
    assert_close(gelu(1.0), 0.8413447460685429, 1e-15, "GELU(1) = Φ(1)");
    assert_close(gelu(-1.0), -0.15865525393145707, 1e-15, "GELU(−1) = −Φ(−1)");
}

/// MAP of one token: every weight is 1, so the output is `o + MLP(LN(o))` with
/// `o = W_o (W_v x + b_v) + b_o`, whatever the latents and keys.
#[test]
fn map_of_one_token_is_its_projected_value() {
    use crate::reference::{MAP_FIELDS, MapParams, gelu, layer_norm, linear_row, map_pool};
    let (c, hidden) = (4, 6);
    let mut rng = Rng::new(5);
    let sizes = [
        2 * c,
        c * c,
        c,
        c * c,
        c,
        c * c,
        c,
        c * c,
        c,
        c,
        c,
        c * hidden,
        hidden,
        hidden * c,
        c,
    ];
    let fields: Vec<Vec<f64>> = sizes
        .iter()
        .map(|&len| (0..len).map(|_| rng.range(-1.0, 1.0)).collect())
        .collect();
    assert_eq!(fields.len(), MAP_FIELDS.len());
    let p = MapParams {
        channels: c,
        heads: 2,
        latents: 2,
        hidden,
        eps: 1e-6,
        norm: true,
        mean_latents: true,
        fields,
    };
    let x: Vec<f64> = (0..c).map(|_| rng.range(-1.0, 1.0)).collect();
    let v = linear_row(&x, p.field("wv"), Some(p.field("bv")));
    let o = linear_row(&v, p.field("wo"), Some(p.field("bo")));
    let h: Vec<f64> = linear_row(
        &layer_norm(&o, p.field("ln_g"), p.field("ln_b"), 1e-6),
        p.field("w1"),
        Some(p.field("b1")),
    )
    .into_iter()
    .map(gelu)
    .collect();
    let mlp = linear_row(&h, p.field("w2"), Some(p.field("b2")));
    let expected: Vec<f64> = (0..c).map(|j| o[j] + mlp[j]).collect();
    assert_vec_close(&map_pool(&[x], &p), &expected, 1e-14, "MAP of one token");
}
