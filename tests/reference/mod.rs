//! Independent plain-Rust `f64` reference implementation (test oracle) of the poolings in
//! `burn-pooling`: GAP, GeM, GGeM, GSP (forward, limits, implicit backward), the balanced
//! entropic plan and the zero-shot regularisation loss. Written from the maths notes (`docs/maths.md`) only: std only,
//! scalar loops, clarity over speed. The β of GSP is found by plain bisection so that it does
//! not share a solver with the library (which uses Newton / Sinkhorn).
//!
//! Conventions: token sets are `x[n][c]` (N×C), prototypes `omega[k][c]` (K×C), costs and
//! plans `[k][n]` (K×N).
//!
//! Include from an integration test with `mod reference;`. Checked by
//! `tests/reference_selfcheck.rs`.

#![allow(dead_code)]
#![allow(clippy::needless_range_loop)]

/// The GeM clamp of the docs.
pub const GEM_EPS: f64 = 1e-6;
/// The input of the GeM reference table (docs/maths.md §1): one channel of four positions.
pub const GEM_DOC_X: [f64; 4] = [0.5, 1.0, 2.0, 4.0];
/// The GeM reference table (docs/maths.md §1): (p, GeM_p(GEM_DOC_X)), quoted to 10 digits.
#[allow(clippy::excessive_precision)]
pub const GEM_DOC_VALUES: [(f64, f64); 7] = [
    (1.0, 1.875),
    (2.0, 2.3048861143),
    (3.0, 2.6343206076),
    (4.0, 2.8744219306),
    (8.0, 3.3652316555),
    (100.0, 3.9449308180),
    (1000.0, 3.9944586644),
];
/// The ZSR ridge weight of the reference (docs/maths.md §5).
pub const ZSR_LAMBDA: f64 = 0.05;
/// The ZSR logit scale of the reference (docs/maths.md §5).
pub const ZSR_SCALE: f64 = 9.5;

// ---------------------------------------------------------------------------------------------
// Small numeric helpers
// ---------------------------------------------------------------------------------------------

/// `ln Σ exp(v_i)`, stable (max-shifted). Returns −∞ for an empty slice or all −∞.
pub fn logsumexp(v: &[f64]) -> f64 {
    let m = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if m == f64::NEG_INFINITY {
        return m;
    }
    let mut s = 0.0;
    for &a in v {
        s += (a - m).exp();
    }
    m + s.ln()
}

/// `softmax(v)`, stable.
pub fn softmax(v: &[f64]) -> Vec<f64> {
    let l = logsumexp(v);
    v.iter().map(|&a| (a - l).exp()).collect()
}

/// Logistic sigmoid, stable for any finite `u` (never evaluates `exp` of a positive number).
pub fn sigmoid(u: f64) -> f64 {
    if u >= 0.0 {
        1.0 / (1.0 + (-u).exp())
    } else {
        let e = u.exp();
        e / (1.0 + e)
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let mut s = 0.0;
    for i in 0..a.len() {
        s += a[i] * b[i];
    }
    s
}

fn norm(a: &[f64]) -> f64 {
    dot(a, a).sqrt()
}

/// Column `c` of an N×C token matrix.
fn column(x: &[Vec<f64>], c: usize) -> Vec<f64> {
    x.iter().map(|row| row[c]).collect()
}

fn check_rectangular(x: &[Vec<f64>]) -> (usize, usize) {
    assert!(!x.is_empty(), "empty matrix");
    let cols = x[0].len();
    for row in x {
        assert_eq!(row.len(), cols, "ragged matrix");
    }
    (x.len(), cols)
}

// ---------------------------------------------------------------------------------------------
// GAP, GeM, GGeM (docs/maths.md §1)
// ---------------------------------------------------------------------------------------------

/// Global average pooling over tokens: `x` is N×C, returns the C channel means.
pub fn gap(x: &[Vec<f64>]) -> Vec<f64> {
    let (n, c) = check_rectangular(x);
    let mut out = vec![0.0; c];
    for row in x {
        for ch in 0..c {
            out[ch] += row[ch];
        }
    }
    for v in &mut out {
        *v /= n as f64;
    }
    out
}

/// GeM of one channel, `( (1/N) Σ_n max(x_n, eps)^p )^(1/p)`, in the stable log-domain form
/// of docs/maths.md §1: `ln y = ln m + (1/p) ln( (1/N) Σ exp(p (ln x_n − ln m)) )`, `m = max_n x_n`
/// (after the clamp). Requires `p > 0`, `eps > 0`.
pub fn gem_channel(values: &[f64], p: f64, eps: f64) -> f64 {
    gem_channel_ln(values, p, eps).exp()
}

/// `ln` of [`gem_channel`].
pub fn gem_channel_ln(values: &[f64], p: f64, eps: f64) -> f64 {
    assert!(!values.is_empty());
    assert!(p > 0.0 && eps > 0.0);
    let logs: Vec<f64> = values.iter().map(|&v| v.max(eps).ln()).collect();
    let ln_m = logs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut s = 0.0;
    for &l in &logs {
        s += (p * (l - ln_m)).exp();
    }
    let mean = s / values.len() as f64; // in [1/N, 1]: the max term contributes exp(0) = 1
    ln_m + mean.ln() / p
}

/// Closed-form gradients of [`gem_channel`] (docs/maths.md §1):
/// `∂y/∂x_n = (1/N) y^(1−p) x_n^(p−1) = (1/N) exp((p−1)(ln x_n − ln y))` where `x_n > eps`,
/// `0` where the clamp is active (`x_n <= eps`);
/// `∂y/∂p = (y/p) (Σ_n x_n^p ln x_n / Σ_n x_n^p − ln y)`, with the clamped values `eps`
/// (they still contribute their constant `eps^p`), the ratio computed as a softmax-weighted
/// mean of `ln x_n`. Returns `(dy/dx, dy/dp)`.
pub fn gem_channel_grad(values: &[f64], p: f64, eps: f64) -> (Vec<f64>, f64) {
    let n = values.len() as f64;
    let ln_y = gem_channel_ln(values, p, eps);
    let y = ln_y.exp();
    let logs: Vec<f64> = values.iter().map(|&v| v.max(eps).ln()).collect();
    let dx: Vec<f64> = values
        .iter()
        .zip(&logs)
        .map(|(&v, &l)| {
            if v > eps {
                ((p - 1.0) * (l - ln_y)).exp() / n
            } else {
                0.0
            }
        })
        .collect();
    let scaled: Vec<f64> = logs.iter().map(|&l| p * l).collect();
    let w = softmax(&scaled); // x_n^p / Σ x^p
    let mut mean_log = 0.0;
    for i in 0..logs.len() {
        mean_log += w[i] * logs[i];
    }
    let dp = (y / p) * (mean_log - ln_y);
    (dx, dp)
}

/// Group of channel `c` among `channels` channels split into `groups` groups:
/// contiguous `c / (C/G)` or interleaved `c mod G`.
pub fn group_of(c: usize, channels: usize, groups: usize, interleaved: bool) -> usize {
    assert!(
        groups > 0 && channels.is_multiple_of(groups),
        "C must be divisible by G"
    );
    if interleaved {
        c % groups
    } else {
        c / (channels / groups)
    }
}

/// GGeM over tokens: `x` is N×C, one exponent per group (`p.len() = G`, `C % G == 0`);
/// channel `c` uses `p[g(c)]` with `g` from [`group_of`]. Returns C values.
pub fn group_gem(x: &[Vec<f64>], p: &[f64], eps: f64, interleaved: bool) -> Vec<f64> {
    let (_, c) = check_rectangular(x);
    let g = p.len();
    (0..c)
        .map(|ch| gem_channel(&column(x, ch), p[group_of(ch, c, g, interleaved)], eps))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// GSP (docs/maths.md §2–4)
// ---------------------------------------------------------------------------------------------

/// `φ(v) = v / max(1, ‖v‖₂)`.
pub fn phi(v: &[f64]) -> Vec<f64> {
    let s = norm(v).max(1.0);
    v.iter().map(|&a| a / s).collect()
}

/// Costs `c[k][j] = ‖φ(ω_k) − φ(x_j)‖₂` (not squared), K×N.
pub fn gsp_costs(x: &[Vec<f64>], prototypes: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let (_, c) = check_rectangular(x);
    let (_, c2) = check_rectangular(prototypes);
    assert_eq!(c, c2, "features and prototypes must have the same width");
    let px: Vec<Vec<f64>> = x.iter().map(|v| phi(v)).collect();
    let pw: Vec<Vec<f64>> = prototypes.iter().map(|v| phi(v)).collect();
    pw.iter()
        .map(|w| {
            px.iter()
                .map(|v| {
                    let d: Vec<f64> = w.iter().zip(v).map(|(a, b)| a - b).collect();
                    norm(&d)
                })
                .collect()
        })
        .collect()
}

/// `ℓ_j = logsumexp_k(−c_kj / ε)` for every position.
pub fn gsp_log_kernel(costs: &[Vec<f64>], epsilon: f64) -> Vec<f64> {
    let (k, n) = check_rectangular(costs);
    (0..n)
        .map(|j| {
            let col: Vec<f64> = (0..k).map(|kk| -costs[kk][j] / epsilon).collect();
            logsumexp(&col)
        })
        .collect()
}

/// Output of the GSP reference for one sample.
#[derive(Clone, Debug)]
pub struct GspReference {
    /// `y = Σ_j w_j x_j`, length C. Empty when produced by [`gsp_from_costs`].
    pub pooled: Vec<f64>,
    /// `w_j = t_j / μ`, length N.
    pub weights: Vec<f64>,
    /// `z_k = Σ_j P_kj / μ`, length K.
    pub attributes: Vec<f64>,
    /// `ρ_j = a_j − t_j` (computed as `a_j σ(−(β+ℓ_j))`, no cancellation), length N.
    pub residual: Vec<f64>,
    /// `P_kj = t_j softmax_k(−c_·j/ε)_k`, K×N.
    pub plan: Vec<Vec<f64>>,
    /// The root of `Σ_j a_j σ(β+ℓ_j) = μ` (`+∞` for `μ = 1`).
    pub beta: f64,
    /// The costs used, K×N.
    pub costs: Vec<Vec<f64>>,
}

impl GspReference {
    /// `X = [ρ; P]`, (K+1)×N with row 0 = ρ (the layout of docs/maths.md §4).
    pub fn plan_with_residual(&self) -> Vec<Vec<f64>> {
        let mut out = vec![self.residual.clone()];
        out.extend(self.plan.iter().cloned());
        out
    }
}

/// Solves the entropic partial transport of docs/maths.md §3 for a given K×N cost matrix with
/// general position masses `mass[j] = a_j >= 0` (`Σ a_j = 1`; uniform `1/N` is the doc's
/// case, `0` masks a position out). Solution: `t_j = a_j σ(β+ℓ_j)`, `P_kj = t_j
/// softmax_k(−c_kj/ε)`, `ρ_j = a_j − t_j`, β the root of `Σ_j a_j σ(β+ℓ_j) = μ`, found by
/// plain bisection on the bracket `[logit μ − max ℓ − 1, logit μ − min ℓ + 1]` (ℓ over
/// positions with `a_j > 0`) until the interval is `< 1e-15·max(1,|β|)` or 200 steps
/// (internally in the variable `β + max ℓ`, for precision when ε is small).
/// For `μ > 1/2` the equivalent residual form `Σ_j a_j σ(−(β+ℓ_j)) = 1 − μ` is bisected
/// (better conditioned near `μ = 1`). `μ = 1` exactly gives `β = +∞`, `t = a`, `ρ = 0`.
/// `pooled` is left empty (no features here); [`gsp`] fills it.
pub fn gsp_from_costs(costs: &[Vec<f64>], mass: &[f64], mu: f64, epsilon: f64) -> GspReference {
    let (k, n) = check_rectangular(costs);
    assert_eq!(mass.len(), n, "one mass per position");
    assert!(mu > 0.0 && mu <= 1.0, "0 < mu <= 1");
    assert!(epsilon > 0.0);
    for &a in mass {
        assert!(a >= 0.0 && a.is_finite(), "masses must be >= 0");
    }
    let active: Vec<usize> = (0..n).filter(|&j| mass[j] > 0.0).collect();
    assert!(!active.is_empty(), "at least one position must have mass");
    let ell = gsp_log_kernel(costs, epsilon);

    // Work with ℓ shifted by its largest active value (β' = β + ℓ_ref, u_j = β' + (ℓ_j −
    // ℓ_ref)): the same root, but β' stays O(1) for the positions that carry the transport,
    // so no absolute precision is lost when ℓ is large (ε small).
    let ell_ref = active
        .iter()
        .map(|&j| ell[j])
        .fold(f64::NEG_INFINITY, f64::max);
    let shifted: Vec<f64> = ell.iter().map(|&l| l - ell_ref).collect();

    let beta_shifted = if mu == 1.0 {
        f64::INFINITY
    } else {
        // Increasing function of β' whose root is the solution.
        let f = |b: f64| -> f64 {
            if mu <= 0.5 {
                let mut s = 0.0;
                for &j in &active {
                    s += mass[j] * sigmoid(b + shifted[j]);
                }
                s - mu
            } else {
                let mut s = 0.0;
                for &j in &active {
                    s += mass[j] * sigmoid(-(b + shifted[j]));
                }
                (1.0 - mu) - s
            }
        };
        let logit_mu = mu.ln() - (1.0 - mu).ln();
        let min_shifted = active
            .iter()
            .map(|&j| shifted[j])
            .fold(f64::INFINITY, f64::min);
        // Safe in exact arithmetic when Σa = 1: [logit μ − max ℓ, logit μ − min ℓ], widened
        // by 1 on both sides; widened further if rounding says otherwise.
        let mut lo = logit_mu - 1.0;
        let mut hi = logit_mu - min_shifted + 1.0;
        let mut guard = 0;
        while f(lo) > 0.0 && guard < 100 {
            lo -= lo.abs().max(1.0);
            guard += 1;
        }
        while f(hi) < 0.0 && guard < 200 {
            hi += hi.abs().max(1.0);
            guard += 1;
        }
        for _ in 0..200 {
            let mid = 0.5 * (lo + hi);
            if hi - lo < 1e-15 * mid.abs().max(1.0) || mid <= lo || mid >= hi {
                break;
            }
            if f(mid) < 0.0 {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        0.5 * (lo + hi)
    };
    let beta = beta_shifted - ell_ref;

    let mut t = vec![0.0; n];
    let mut residual = vec![0.0; n];
    for &j in &active {
        if beta_shifted == f64::INFINITY {
            t[j] = mass[j];
            residual[j] = 0.0;
        } else {
            let u = beta_shifted + shifted[j];
            t[j] = mass[j] * sigmoid(u);
            residual[j] = mass[j] * sigmoid(-u);
        }
    }
    let mut plan = vec![vec![0.0; n]; k];
    for j in 0..n {
        for kk in 0..k {
            let s = (-costs[kk][j] / epsilon - ell[j]).exp(); // softmax_k
            plan[kk][j] = t[j] * s;
        }
    }
    let weights: Vec<f64> = t.iter().map(|&v| v / mu).collect();
    let attributes: Vec<f64> = plan
        .iter()
        .map(|row| row.iter().sum::<f64>() / mu)
        .collect();
    GspReference {
        pooled: Vec::new(),
        weights,
        attributes,
        residual,
        plan,
        beta,
        costs: costs.to_vec(),
    }
}

/// GSP forward for one sample (docs/maths.md §2–3): `x` N×C features, `prototypes` K×C, `mass` the N
/// position masses (`Σ = 1`, `0` = masked out; uniform `1/N` is the doc's case), transport
/// ratio `mu` in (0, 1], entropy weight `epsilon > 0` (the reference's γ is `1/ε`).
/// Costs from [`gsp_costs`], transport from [`gsp_from_costs`], `pooled = Σ_j w_j x_j` on the
/// unnormalised features.
pub fn gsp(
    x: &[Vec<f64>],
    prototypes: &[Vec<f64>],
    mass: &[f64],
    mu: f64,
    epsilon: f64,
) -> GspReference {
    let (_, c) = check_rectangular(x);
    let costs = gsp_costs(x, prototypes);
    let mut out = gsp_from_costs(&costs, mass, mu, epsilon);
    let mut pooled = vec![0.0; c];
    for j in 0..x.len() {
        for ch in 0..c {
            pooled[ch] += out.weights[j] * x[j][ch];
        }
    }
    out.pooled = pooled;
    out
}

/// Uniform masses `1/N`.
pub fn uniform_mass(n: usize) -> Vec<f64> {
    vec![1.0 / n as f64; n]
}

/// The ε → 0 limit of GSP with uniform masses (docs/maths.md §3): with `d_j = min_k c_kj`, positions
/// in ascending `d_j` order get weight `1/(μN)` each until the mass μ is used up (the last one
/// partially), the rest 0. Assumes no ties.
pub fn gsp_hard_selection_weights(x: &[Vec<f64>], prototypes: &[Vec<f64>], mu: f64) -> Vec<f64> {
    let costs = gsp_costs(x, prototypes);
    let (k, n) = check_rectangular(&costs);
    let d: Vec<f64> = (0..n)
        .map(|j| (0..k).map(|kk| costs[kk][j]).fold(f64::INFINITY, f64::min))
        .collect();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| d[a].partial_cmp(&d[b]).unwrap());
    let per_position = 1.0 / n as f64;
    let mut remaining = mu;
    let mut w = vec![0.0; n];
    for j in order {
        if remaining <= 0.0 {
            break;
        }
        let take = per_position.min(remaining);
        w[j] = take / mu;
        remaining -= take;
    }
    w
}

/// The μ → 0 limit of GSP with uniform masses (docs/maths.md §3): `softmax_j(ℓ_j)`,
/// `ℓ_j = logsumexp_k(−c_kj/ε)`.
pub fn attention_weights(x: &[Vec<f64>], prototypes: &[Vec<f64>], epsilon: f64) -> Vec<f64> {
    let costs = gsp_costs(x, prototypes);
    softmax(&gsp_log_kernel(&costs, epsilon))
}

/// Analytical backward of the transport (docs/maths.md §4) generalised to masses `a_j`.
/// Inputs: `X = [ρ; P]` (K+1)×N (row 0 = ρ), upstream `g = ∂L/∂X` (K+1)×N. With `h = X ⊙ g`,
/// `U_j = Σ_{k=0..K} h_kj`,
/// `λ = (Σ_j ρ_j U_j / a_j − Σ_j h_0j) / ((1−μ) − Σ_j ρ_j²/a_j)`,
/// `V_j = (U_j + λ ρ_j)/a_j`, returns `∂L/∂c_kj = −(1/ε)(h_kj − V_j P_kj)` (K×N, rows
/// k = 1..K of X). Terms with `a_j = 0` are omitted (their gradient is 0). With `a_j = 1/N`
/// this is the doc's formula. The denominator is not clamped (the oracle is exact; it is
/// singular only at μ = 1 or ε → 0).
pub fn gsp_implicit_backward(
    plan_with_residual: &[Vec<f64>],
    g: &[Vec<f64>],
    mass: &[f64],
    mu: f64,
    epsilon: f64,
) -> Vec<Vec<f64>> {
    let (k1, n) = check_rectangular(plan_with_residual);
    let (gk, gn) = check_rectangular(g);
    assert_eq!((gk, gn), (k1, n), "g must have the shape of X");
    assert_eq!(mass.len(), n);
    let x = plan_with_residual;
    let rho = &x[0];
    let mut h = vec![vec![0.0; n]; k1];
    for kk in 0..k1 {
        for j in 0..n {
            h[kk][j] = x[kk][j] * g[kk][j];
        }
    }
    let mut u = vec![0.0; n];
    for j in 0..n {
        for kk in 0..k1 {
            u[j] += h[kk][j];
        }
    }
    let mut num = 0.0;
    let mut den = 1.0 - mu;
    for j in 0..n {
        num -= h[0][j];
        if mass[j] > 0.0 {
            num += rho[j] * u[j] / mass[j];
            den -= rho[j] * rho[j] / mass[j];
        }
    }
    let lambda = num / den;
    let mut grad = vec![vec![0.0; n]; k1 - 1];
    for j in 0..n {
        if mass[j] <= 0.0 {
            continue;
        }
        let v = (u[j] + lambda * rho[j]) / mass[j];
        for kk in 1..k1 {
            grad[kk - 1][j] = -(h[kk][j] - v * x[kk][j]) / epsilon;
        }
    }
    grad
}

// ---------------------------------------------------------------------------------------------
// Zero-shot regularisation loss (docs/maths.md §5)
// ---------------------------------------------------------------------------------------------

/// Cholesky factor `L` (lower triangular, `A = L Lᵀ`) of a symmetric positive-definite matrix.
pub fn cholesky(a: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let (n, m) = check_rectangular(a);
    assert_eq!(n, m, "square matrix");
    let mut l = vec![vec![0.0; n]; n];
    for i in 0..n {
        for j in 0..=i {
            let mut s = a[i][j];
            for p in 0..j {
                s -= l[i][p] * l[j][p];
            }
            if i == j {
                assert!(s > 0.0, "matrix not positive definite");
                l[i][i] = s.sqrt();
            } else {
                l[i][j] = s / l[j][j];
            }
        }
    }
    l
}

/// Solves `A X = B` given the Cholesky factor `L` of `A` (forward then back substitution,
/// column by column). `B` is n×D.
pub fn cholesky_solve(l: &[Vec<f64>], b: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let n = l.len();
    let (bn, d) = check_rectangular(b);
    assert_eq!(bn, n);
    let mut x = vec![vec![0.0; d]; n];
    for col in 0..d {
        // L y = b
        let mut y = vec![0.0; n];
        for i in 0..n {
            let mut s = b[i][col];
            for p in 0..i {
                s -= l[i][p] * y[p];
            }
            y[i] = s / l[i][i];
        }
        // Lᵀ x = y
        for i in (0..n).rev() {
            let mut s = y[i];
            for p in (i + 1)..n {
                s -= l[p][i] * x[p][col];
            }
            x[i][col] = s / l[i][i];
        }
    }
    x
}

/// One half of a ZSR batch: attributes `z` (n×K) and their class labels.
#[derive(Clone, Copy, Debug)]
pub struct Half<'a> {
    pub z: &'a [Vec<f64>],
    pub labels: &'a [usize],
}

impl<'a> Half<'a> {
    pub fn new(z: &'a [Vec<f64>], labels: &'a [usize]) -> Self {
        Self { z, labels }
    }
}

/// One ZSR direction: ridge `W = Zᵀ(ZZᵀ + λI)⁻¹Y` (K×D) fitted on the train half
/// (`Y = E[train labels]`, solved by Cholesky), `Ŷ = Z_test W`, `logits = scale · Ŷ Eᵀ`,
/// returns the mean cross-entropy (stable log-softmax) over the test rows.
pub fn zero_shot_loss_direction(
    train: Half<'_>,
    test: Half<'_>,
    embeddings: &[Vec<f64>],
    lambda: f64,
    scale: f64,
) -> f64 {
    let (z_train, labels_train, z_test, labels_test) = (train.z, train.labels, test.z, test.labels);
    let (n, k) = check_rectangular(z_train);
    let (nt, kt) = check_rectangular(z_test);
    assert_eq!(k, kt);
    assert_eq!(labels_train.len(), n);
    assert_eq!(labels_test.len(), nt);
    let (classes, d) = check_rectangular(embeddings);
    // A = Z Zᵀ + λ I
    let mut a = vec![vec![0.0; n]; n];
    for i in 0..n {
        for j in 0..n {
            a[i][j] = dot(&z_train[i], &z_train[j]) + if i == j { lambda } else { 0.0 };
        }
    }
    let y: Vec<Vec<f64>> = labels_train
        .iter()
        .map(|&c| {
            assert!(c < classes);
            embeddings[c].clone()
        })
        .collect();
    let m = cholesky_solve(&cholesky(&a), &y); // (ZZᵀ + λI)⁻¹ Y, n×D
    let mut w = vec![vec![0.0; d]; k];
    for kk in 0..k {
        for dd in 0..d {
            for i in 0..n {
                w[kk][dd] += z_train[i][kk] * m[i][dd];
            }
        }
    }
    let mut total = 0.0;
    for t in 0..nt {
        let mut yhat = vec![0.0; d];
        for dd in 0..d {
            for kk in 0..k {
                yhat[dd] += z_test[t][kk] * w[kk][dd];
            }
        }
        let logits: Vec<f64> = embeddings.iter().map(|e| scale * dot(&yhat, e)).collect();
        let label = labels_test[t];
        assert!(label < classes);
        total += logsumexp(&logits) - logits[label];
    }
    total / nt as f64
}

/// ZSR loss (docs/maths.md §5) for two class-disjoint halves `[first, second]` and class
/// embeddings `embeddings` (num_classes×D): `loss_a` = [`zero_shot_loss_direction`] trained on
/// the second half, tested on the first; `loss_b` = the other way round; returns exactly
/// `(loss_a + loss_b) / 2`. This equals the mean over all test rows of both directions only when
/// the halves have the same size. Disjointness of the halves' classes is not checked.
pub fn zero_shot_loss(
    halves: [Half<'_>; 2],
    embeddings: &[Vec<f64>],
    lambda: f64,
    scale: f64,
) -> f64 {
    let [first, second] = halves;
    let loss_a = zero_shot_loss_direction(second, first, embeddings, lambda, scale);
    let loss_b = zero_shot_loss_direction(first, second, embeddings, lambda, scale);
    0.5 * (loss_a + loss_b)
}

// ---------------------------------------------------------------------------------------------
// Balanced entropic transport (docs/maths.md §7)
// ---------------------------------------------------------------------------------------------

/// The balanced entropic plan `[k][n]` for costs `c[k][n]`, row masses `a` and column masses `b`
/// (Σa = Σb; zero masses allowed), by the plain (kernel-domain) Sinkhorn scaling
/// u = a ⊘ (K s), s = b ⊘ (Kᵀ u) with K = exp(−c/ε), run until the row error is below 1e-15
/// (or 200 000 sweeps). Costs where a mass is zero are never read. Needs max c/ε ≲ 700.
pub fn balanced_plan(c: &[Vec<f64>], a: &[f64], b: &[f64], eps: f64) -> Vec<Vec<f64>> {
    let (k, n) = (a.len(), b.len());
    let kernel: Vec<Vec<f64>> = (0..k)
        .map(|i| {
            (0..n)
                .map(|j| {
                    if a[i] > 0.0 && b[j] > 0.0 {
                        (-c[i][j] / eps).exp()
                    } else {
                        0.0
                    }
                })
                .collect()
        })
        .collect();
    let mut u = vec![1.0; k];
    let mut s = vec![1.0; n];
    for _ in 0..200_000 {
        for j in 0..n {
            let t: f64 = (0..k).map(|i| kernel[i][j] * u[i]).sum();
            s[j] = if b[j] > 0.0 { b[j] / t } else { 0.0 };
        }
        let mut error = 0.0;
        for i in 0..k {
            let t: f64 = (0..n).map(|j| kernel[i][j] * s[j]).sum();
            error += (u[i] * t - a[i]).abs();
            u[i] = if a[i] > 0.0 { a[i] / t } else { 0.0 };
        }
        if error < 1e-15 {
            break;
        }
    }
    (0..k)
        .map(|i| (0..n).map(|j| u[i] * kernel[i][j] * s[j]).collect())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// LSE and the token modes (docs/maths.md §8, §9)
// ---------------------------------------------------------------------------------------------

/// LSE of one channel's valid values at temperature `r > 0`:
/// `m + (1/r) ln((1/N) Σ exp(r (x_n − m)))`, written as `m + ln_1p(mean(exp_m1(r (x_n − m)))) / r`,
/// accurate for every r > 0 (the terms of the mean share one sign, nothing cancels), so it
/// needs no Taylor switch.
pub fn lse_channel(values: &[f64], r: f64) -> f64 {
    let m = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mean = values.iter().map(|&v| (r * (v - m)).exp_m1()).sum::<f64>() / values.len() as f64;
    m + mean.ln_1p() / r
}

/// The softmax-weighted mean of one channel's valid values: `Σ softmax(r x)_n x_n`.
pub fn softmax_mean_channel(values: &[f64], r: f64) -> f64 {
    let scaled: Vec<f64> = values.iter().map(|&v| r * v).collect();
    softmax(&scaled)
        .iter()
        .zip(values)
        .map(|(s, v)| s * v)
        .sum()
}

/// `softplus(ρ) + r_min`, LSE's temperature from its parameter.
pub fn lse_temperature(rho: f64, r_min: f64) -> f64 {
    let softplus = if rho > 0.0 {
        rho + (-rho).exp().ln_1p()
    } else {
        rho.exp().ln_1p()
    };
    softplus + r_min
}

/// The token modes of one sample, `x[n][c]` with `valid[n]` and `prefix` leading tokens:
/// `mode` is one of "cls", "last", "mean", "max", "mean_sqrt_len", "weighted_mean". Cls is the
/// first valid token of the whole sequence; the others use the valid tokens after the prefix.
pub fn token_mode(x: &[Vec<f64>], valid: &[bool], prefix: usize, mode: &str) -> Vec<f64> {
    let channels = x[0].len();
    if mode == "cls" {
        let first = valid.iter().position(|&v| v).expect("a valid token");
        return x[first].clone();
    }
    let kept: Vec<&Vec<f64>> = (prefix..x.len())
        .filter(|&n| valid[n])
        .map(|n| &x[n])
        .collect();
    let length = kept.len() as f64;
    let weighted = |weight: &dyn Fn(usize) -> f64| -> Vec<f64> {
        (0..channels)
            .map(|c| kept.iter().enumerate().map(|(l, t)| weight(l) * t[c]).sum())
            .collect()
    };
    match mode {
        "last" => kept.last().expect("a valid token").to_vec(),
        "max" => (0..channels)
            .map(|c| kept.iter().map(|t| t[c]).fold(f64::NEG_INFINITY, f64::max))
            .collect(),
        "mean" => weighted(&|_| 1.0 / length),
        "mean_sqrt_len" => weighted(&|_| 1.0 / length.sqrt()),
        "weighted_mean" => weighted(&|l| (l + 1) as f64 / (length * (length + 1.0) / 2.0)),
        other => panic!("token_mode: unknown mode {other}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Finite differences
// ---------------------------------------------------------------------------------------------

/// Gradient of `f` at `x` by central differences, `(f(x + h e_i) − f(x − h e_i)) / (2h)`.
pub fn central_difference(f: &dyn Fn(&[f64]) -> f64, x: &[f64], h: f64) -> Vec<f64> {
    let mut xp = x.to_vec();
    let mut grad = vec![0.0; x.len()];
    for i in 0..x.len() {
        xp[i] = x[i] + h;
        let fp = f(&xp);
        xp[i] = x[i] - h;
        let fm = f(&xp);
        xp[i] = x[i];
        grad[i] = (fp - fm) / (2.0 * h);
    }
    grad
}

// ---------------------------------------------------------------------------------------------
// GSP as its authors run it: projection and read-outs (docs/maths.md §10)
// ---------------------------------------------------------------------------------------------

/// What the GSP weights pool, with the GeM read-out's power.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Readout {
    /// `Σ_j w_j F_j`.
    Mean,
    /// `A·g`, `g_c = ((1/N_valid) Σ_valid max(m_j x_jc, 1e-6)^p)^(1/p)`.
    GeneralizedMean(f64),
    /// `A·(max_valid m_j x_jc)`.
    Max,
}

/// `v·A` for a row `v` of width C and `A` C×D.
pub fn project_vector(v: &[f64], a: &[Vec<f64>]) -> Vec<f64> {
    let (c, d) = check_rectangular(a);
    assert_eq!(v.len(), c, "v·A: widths");
    (0..d)
        .map(|dd| (0..c).map(|cc| v[cc] * a[cc][dd]).sum())
        .collect()
}

/// `X·A` row by row: N×C times C×D.
pub fn project_rows(x: &[Vec<f64>], a: &[Vec<f64>]) -> Vec<Vec<f64>> {
    x.iter().map(|row| project_vector(row, a)).collect()
}

/// The authors' GSP for one sample (docs/maths.md §10): `x` N×C raw features, `valid` which
/// positions count (masses `1/N_valid`, 0 elsewhere: the values of invalid rows are never
/// read), `projection` C×D (`None`: the identity), `prototypes` K×D. The transport runs on
/// F = X·A ([`gsp`] on F with those masses); with `w` its weights and `m_j = N_valid w_j`:
///
/// - Mean: `y = Σ_valid w_j F_j`;
/// - GeneralizedMean(p): `y = g·A`, `g_c = GeM_p` (clamp 1e-6) of `m_j x_jc` over the valid j;
/// - Max: `y = (max_valid m_j x_jc)_c · A`;
/// - `max_branch`: `y += (max_valid x_jc)_c · A`.
///
/// Returns the transport outputs with `pooled` replaced by this read-out (width D, or C).
#[allow(clippy::too_many_arguments)]
pub fn gsp_authors(
    x: &[Vec<f64>],
    valid: &[bool],
    projection: Option<&[Vec<f64>]>,
    prototypes: &[Vec<f64>],
    readout: Readout,
    max_branch: bool,
    mu: f64,
    epsilon: f64,
) -> GspReference {
    let (n, c) = check_rectangular(x);
    assert_eq!(valid.len(), n, "one validity flag per position");
    let kept: Vec<usize> = (0..n).filter(|&j| valid[j]).collect();
    assert!(!kept.is_empty(), "at least one valid position");
    let n_valid = kept.len() as f64;
    // Invalid rows are never read: zeros stand in for them.
    let clean: Vec<Vec<f64>> = (0..n)
        .map(|j| if valid[j] { x[j].clone() } else { vec![0.0; c] })
        .collect();
    let identity: Vec<Vec<f64>> = (0..c)
        .map(|i| (0..c).map(|j| if i == j { 1.0 } else { 0.0 }).collect())
        .collect();
    let a: &[Vec<f64>] = projection.unwrap_or(&identity);
    let features = project_rows(&clean, a);
    let mass: Vec<f64> = valid
        .iter()
        .map(|&v| if v { 1.0 / n_valid } else { 0.0 })
        .collect();
    let mut out = gsp(&features, prototypes, &mass, mu, epsilon);
    let w = out.weights.clone();
    let mixed = |ch: usize| -> Vec<f64> {
        kept.iter()
            .map(|&j| n_valid * w[j] * clean[j][ch])
            .collect()
    };
    let maximum = |v: Vec<f64>| v.into_iter().fold(f64::NEG_INFINITY, f64::max);
    let mut pooled = match readout {
        Readout::Mean => {
            let d = features[0].len();
            (0..d)
                .map(|dd| kept.iter().map(|&j| w[j] * features[j][dd]).sum())
                .collect()
        }
        Readout::GeneralizedMean(p) => {
            let g: Vec<f64> = (0..c)
                .map(|ch| gem_channel(&mixed(ch), p, GEM_EPS))
                .collect();
            project_vector(&g, a)
        }
        Readout::Max => {
            let g: Vec<f64> = (0..c).map(|ch| maximum(mixed(ch))).collect();
            project_vector(&g, a)
        }
    };
    if max_branch {
        let g: Vec<f64> = (0..c)
            .map(|ch| maximum(kept.iter().map(|&j| clean[j][ch]).collect()))
            .collect();
        for (y, b) in pooled.iter_mut().zip(project_vector(&g, a)) {
            *y += b;
        }
    }
    out.pooled = pooled;
    out
}

// ---------------------------------------------------------------------------------------------
// Attention pooling: MAP and SimPool (docs/maths.md §11)
// ---------------------------------------------------------------------------------------------

/// `y = x W + b` for one row: `w` is `[d_in][d_out]` flattened row-major (Burn's `Linear`).
pub fn linear_row(x: &[f64], w: &[f64], b: Option<&[f64]>) -> Vec<f64> {
    let d_in = x.len();
    let d_out = w.len() / d_in;
    assert_eq!(d_in * d_out, w.len(), "linear_row: weight size");
    (0..d_out)
        .map(|o| {
            let mut s = b.map_or(0.0, |b| b[o]);
            for i in 0..d_in {
                s += x[i] * w[i * d_out + o];
            }
            s
        })
        .collect()
}

/// LayerNorm of one row: `(x − mean) / √(var + eps) · g + b`, the biased variance.
pub fn layer_norm(x: &[f64], g: &[f64], b: &[f64], eps: f64) -> Vec<f64> {
    let n = x.len() as f64;
    let mean = x.iter().sum::<f64>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
    let inv = 1.0 / (var + eps).sqrt();
    (0..x.len())
        .map(|i| (x[i] - mean) * inv * g[i] + b[i])
        .collect()
}

/// erf by its everywhere-convergent series of positive terms,
/// `erf(x) = (2/√π) e^(−x²) Σ_k 2^k x^(2k+1) / (1·3·…·(2k+1))` (no cancellation); ±1 beyond
/// |x| = 6, where erf is 1 to f64.
pub fn erf(x: f64) -> f64 {
    if x.abs() > 6.0 {
        return x.signum();
    }
    let mut term = x;
    let mut sum = x;
    let mut k = 0.0;
    while term.abs() > 1e-17 * sum.abs() {
        k += 1.0;
        term *= 2.0 * x * x / (2.0 * k + 1.0);
        sum += term;
    }
    2.0 / std::f64::consts::PI.sqrt() * (-x * x).exp() * sum
}

/// The exact GELU, `x Φ(x) = x (1 + erf(x/√2)) / 2`.
pub fn gelu(x: f64) -> f64 {
    0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2))
}

/// The names of MAP's parameter fields, in `MapParams::fields` order.
pub const MAP_FIELDS: [&str; 15] = [
    "latent", "wq", "bq", "wk", "bk", "wv", "bv", "wo", "bo", "ln_g", "ln_b", "w1", "b1", "w2",
    "b2",
];

/// MAP's parameters: each field of `MAP_FIELDS` flattened row-major (latent `[L][C]`, weights
/// `[d_in][d_out]`).
#[derive(Clone, Debug)]
pub struct MapParams {
    pub channels: usize,
    pub heads: usize,
    pub latents: usize,
    pub hidden: usize,
    pub eps: f64,
    /// Whether the LayerNorm before the MLP is on.
    pub norm: bool,
    /// The mean of the latents' outputs instead of the first.
    pub mean_latents: bool,
    pub fields: Vec<Vec<f64>>,
}

impl MapParams {
    pub fn field(&self, name: &str) -> &[f64] {
        let i = MAP_FIELDS.iter().position(|f| *f == name).expect("a field");
        &self.fields[i]
    }
}

/// MAP of one sample's valid tokens `x[n][c]`, the textbook way: every key and value
/// projected, per head `softmax(q·k/√D)`, the weighted values, the output projection, then
/// `y = o + MLP(LN(o))`.
pub fn map_pool(x: &[Vec<f64>], p: &MapParams) -> Vec<f64> {
    let (c, h, l) = (p.channels, p.heads, p.latents);
    let d = c / h;
    let keys: Vec<Vec<f64>> = x
        .iter()
        .map(|t| linear_row(t, p.field("wk"), Some(p.field("bk"))))
        .collect();
    let values: Vec<Vec<f64>> = x
        .iter()
        .map(|t| linear_row(t, p.field("wv"), Some(p.field("bv"))))
        .collect();
    let mut outputs = Vec::new();
    for latent in 0..l {
        let row = &p.field("latent")[latent * c..(latent + 1) * c];
        let q = linear_row(row, p.field("wq"), Some(p.field("bq")));
        let mut attended = vec![0.0; c];
        for head in 0..h {
            let logits: Vec<f64> = keys
                .iter()
                .map(|k| {
                    (head * d..(head + 1) * d).map(|j| q[j] * k[j]).sum::<f64>() / (d as f64).sqrt()
                })
                .collect();
            let a = softmax(&logits);
            for j in head * d..(head + 1) * d {
                attended[j] = (0..x.len()).map(|n| a[n] * values[n][j]).sum();
            }
        }
        let o = linear_row(&attended, p.field("wo"), Some(p.field("bo")));
        let normed = if p.norm {
            layer_norm(&o, p.field("ln_g"), p.field("ln_b"), p.eps)
        } else {
            o.clone()
        };
        let hidden: Vec<f64> = linear_row(&normed, p.field("w1"), Some(p.field("b1")))
            .into_iter()
            .map(gelu)
            .collect();
        let mlp = linear_row(&hidden, p.field("w2"), Some(p.field("b2")));
        outputs.push((0..c).map(|j| o[j] + mlp[j]).collect::<Vec<f64>>());
    }
    if p.mean_latents {
        (0..c)
            .map(|j| outputs.iter().map(|y| y[j]).sum::<f64>() / l as f64)
            .collect()
    } else {
        outputs[0].clone()
    }
}

/// The names of SimPool's parameter fields, in `SimPoolParams::fields` order (`beta`: `[1]`).
pub const SIMPOOL_FIELDS: [&str; 7] = ["ln_g", "ln_b", "wq", "bq", "wk", "bk", "beta"];

/// SimPool's parameters.
#[derive(Clone, Debug)]
pub struct SimPoolParams {
    pub eps: f64,
    /// γ; `None`: the plain form.
    pub gamma: Option<f64>,
    /// Whether β shifts the exponent (`γ + β`).
    pub shift: bool,
    pub fields: Vec<Vec<f64>>,
}

impl SimPoolParams {
    pub fn field(&self, name: &str) -> &[f64] {
        let i = SIMPOOL_FIELDS
            .iter()
            .position(|f| *f == name)
            .expect("a field");
        &self.fields[i]
    }
}

/// SimPool of one sample's valid tokens `x[n][c]`: the query from the mean, keys `W_k LN(x)`,
/// values `LN(x)`, one head with scale `1/√C`; with γ the power form with the minimum per
/// channel over these tokens.
pub fn simpool(x: &[Vec<f64>], p: &SimPoolParams) -> Vec<f64> {
    let c = x[0].len();
    let mean: Vec<f64> = (0..c)
        .map(|j| x.iter().map(|t| t[j]).sum::<f64>() / x.len() as f64)
        .collect();
    let q = linear_row(&mean, p.field("wq"), Some(p.field("bq")));
    let v: Vec<Vec<f64>> = x
        .iter()
        .map(|t| layer_norm(t, p.field("ln_g"), p.field("ln_b"), p.eps))
        .collect();
    let logits: Vec<f64> = v
        .iter()
        .map(|vn| {
            let k = linear_row(vn, p.field("wk"), Some(p.field("bk")));
            dot(&q, &k) / (c as f64).sqrt()
        })
        .collect();
    let a = softmax(&logits);
    match p.gamma {
        None => (0..c)
            .map(|j| (0..v.len()).map(|n| a[n] * v[n][j]).sum())
            .collect(),
        Some(gamma) => {
            let exponent = if p.shift {
                gamma + p.field("beta")[0]
            } else {
                gamma
            };
            (0..c)
                .map(|j| {
                    let low = v.iter().map(|vn| vn[j]).fold(f64::INFINITY, f64::min);
                    let s: f64 = (0..v.len())
                        .map(|n| a[n] * (v[n][j] - low + 1e-6).powf(exponent))
                        .sum();
                    s.powf(1.0 / exponent)
                })
                .collect()
        }
    }
}

// ---------------------------------------------------------------------------------------------
// NetVLAD (docs/maths.md §12)
// ---------------------------------------------------------------------------------------------

/// The L2 clamp of NetVLAD: `v / max(‖v‖, 1e-12)`.
pub const NETVLAD_EPS: f64 = 1e-12;

fn netvlad_unit(v: &[f64]) -> Vec<f64> {
    let n = norm(v).max(NETVLAD_EPS);
    v.iter().map(|a| a / n).collect()
}

/// The assignment tied to `centroids` (K×C) and α: V2 `w_k = 2α c_k`, `b_k = −α‖c_k‖²`;
/// V1 `w_k = α c_k / ‖c_k‖`, `b_k = 0`.
pub fn netvlad_tied(centroids: &[Vec<f64>], alpha: f64, v2: bool) -> (Vec<Vec<f64>>, Vec<f64>) {
    centroids
        .iter()
        .map(|c| {
            if v2 {
                (
                    c.iter().map(|a| 2.0 * alpha * a).collect(),
                    -alpha * dot(c, c),
                )
            } else {
                (netvlad_unit(c).iter().map(|a| alpha * a).collect(), 0.0)
            }
        })
        .unzip()
}

/// NetVLAD of one sample's valid positions `x` (N×C), plain loops, in the residual form:
/// x_j ← x_j/max(‖x_j‖, eps) when `normalize_input` (V1); a_kj = softmax_k(w_kᵀ x_j + b_k);
/// V_k = Σ_j a_kj (x_j − c_k); V_k ← V_k / max(‖V_k‖, eps); the K·C vector, cluster-major
/// (index k·C + c), divided by max(its norm, eps).
pub fn netvlad(
    x: &[Vec<f64>],
    centroids: &[Vec<f64>],
    w: &[Vec<f64>],
    b: &[f64],
    normalize_input: bool,
) -> Vec<f64> {
    let (_, c) = check_rectangular(x);
    let k = centroids.len();
    let rows: Vec<Vec<f64>> = if normalize_input {
        x.iter().map(|r| netvlad_unit(r)).collect()
    } else {
        x.to_vec()
    };
    let mut v = vec![vec![0.0; c]; k];
    for xj in &rows {
        let logits: Vec<f64> = (0..k).map(|kk| dot(&w[kk], xj) + b[kk]).collect();
        let a = softmax(&logits);
        for kk in 0..k {
            for ch in 0..c {
                v[kk][ch] += a[kk] * (xj[ch] - centroids[kk][ch]);
            }
        }
    }
    let flat: Vec<f64> = v.iter().flat_map(|vk| netvlad_unit(vk)).collect();
    netvlad_unit(&flat)
}

// ---------------------------------------------------------------------------------------------
// OTK (docs/maths.md §14)
// ---------------------------------------------------------------------------------------------

/// The balanced entropic plan `[k][n]` for costs `c[k][n]`, row masses `a` and column masses
/// `b` (Σa = Σb, all positive), by Sinkhorn on the log-domain potentials: u_i = ln a_i −
/// lse_j(v_j − c_ij/ε), v_j = ln b_j − lse_i(u_i − c_ij/ε), alternated until the relative row
/// error Σ_i |Σ_j P_ij − a_i| / Σa is below 1e-14, or has not reached a new minimum in 1000
/// sweeps (f64's rounding floor, for potentials of large magnitude), or 2 000 000 sweeps. No
/// exp of a cost is ever formed, so any finite c/ε works (unlike [`balanced_plan`], which
/// needs c/ε ≲ 700).
pub fn log_balanced_plan(c: &[Vec<f64>], a: &[f64], b: &[f64], eps: f64) -> Vec<Vec<f64>> {
    let (k, n) = (a.len(), b.len());
    let total: f64 = a.iter().sum();
    let mut u = vec![0.0; k];
    let mut v = vec![0.0; n];
    let entry = |u: &[f64], v: &[f64], i: usize, j: usize| u[i] + v[j] - c[i][j] / eps;
    let (mut best, mut since_best) = (f64::INFINITY, 0);
    for _ in 0..2_000_000 {
        for i in 0..k {
            let terms: Vec<f64> = (0..n).map(|j| v[j] - c[i][j] / eps).collect();
            u[i] = a[i].ln() - logsumexp(&terms);
        }
        for j in 0..n {
            let terms: Vec<f64> = (0..k).map(|i| u[i] - c[i][j] / eps).collect();
            v[j] = b[j].ln() - logsumexp(&terms);
        }
        let error: f64 = (0..k)
            .map(|i| {
                let row: f64 = (0..n).map(|j| entry(&u, &v, i, j).exp()).sum();
                (row - a[i]).abs()
            })
            .sum();
        if error <= 1e-14 * total {
            break;
        }
        if error < best {
            (best, since_best) = (error, 0);
        } else {
            since_best += 1;
            if since_best >= 1000 {
                break;
            }
        }
    }
    (0..k)
        .map(|i| (0..n).map(|j| entry(&u, &v, i, j).exp()).collect())
        .collect()
}

/// OTK's plan for one head: references `z[k][c]` (p of them) against one sample's valid
/// positions `x[n][c]`: costs −⟨x_j, z_k⟩, reference masses 1, position masses p/N.
pub fn otk_plan(x: &[Vec<f64>], z: &[Vec<f64>], eps: f64) -> Vec<Vec<f64>> {
    let (p, n) = (z.len(), x.len());
    let costs: Vec<Vec<f64>> = z
        .iter()
        .map(|zk| {
            x.iter()
                .map(|xj| -xj.iter().zip(zk).map(|(a, b)| a * b).sum::<f64>())
                .collect()
        })
        .collect();
    log_balanced_plan(&costs, &vec![1.0; p], &vec![p as f64 / n as f64; n], eps)
}

/// OTK of one sample's valid positions `x[n][c]` with references `z[h][k][c]`: per head the
/// plan of [`otk_plan`] and out_hk = Σ_j P_kj x_j; flattened reference-major, then head, then
/// channel (index k·H·C + h·C + c), the authors' `[p, heads·C]` embedding row by row.
pub fn otk(x: &[Vec<f64>], z: &[Vec<Vec<f64>>], eps: f64) -> Vec<f64> {
    let (heads, p, channels) = (z.len(), z[0].len(), x[0].len());
    let mut out = vec![0.0; p * heads * channels];
    for (h, zh) in z.iter().enumerate() {
        let plan = otk_plan(x, zh, eps);
        for k in 0..p {
            for (j, xj) in x.iter().enumerate() {
                for c in 0..channels {
                    out[k * heads * channels + h * channels + c] += plan[k][j] * xj[c];
                }
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// SALAD's optimal-transport aggregation (docs/maths.md §13)
// ---------------------------------------------------------------------------------------------

/// One linear layer `(w[in][out], b[out])`: y = xᵀw + b.
pub type SaladLinear = (Vec<Vec<f64>>, Vec<f64>);

/// The weights of one SALAD layer.
#[derive(Clone, Debug)]
pub struct SaladParams {
    pub features_hidden: SaladLinear,
    pub features_out: SaladLinear,
    pub scores_hidden: SaladLinear,
    pub scores_out: SaladLinear,
    /// The global token's two layers, or `None`.
    pub token: Option<(SaladLinear, SaladLinear)>,
    /// The dustbin score z.
    pub dustbin: f64,
    /// ε.
    pub epsilon: f64,
}

/// How the SALAD oracle runs Sinkhorn.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SaladIterations {
    /// From v = 0, row update first, until the row error is below 1e-15 (or 100 000 sweeps).
    Converged,
    /// The reference's T sweeps (row then column update) from v = 0 (SuperGlue's
    /// `log_sinkhorn_iterations`).
    Reference(usize),
    /// The crate's T iterations (docs/maths.md §7, §13): −C/ε anchored per row (its largest
    /// entry subtracted), u = 0, one column update, then T sweeps (row then column update).
    Crate(usize),
}

/// `xᵀ w + b` for `w[in][out]`.
fn affine(x: &[f64], (w, b): &(Vec<Vec<f64>>, Vec<f64>)) -> Vec<f64> {
    (0..b.len())
        .map(|o| b[o] + (0..x.len()).map(|i| x[i] * w[i][o]).sum::<f64>())
        .collect()
}

/// Two linear layers with a ReLU between them.
pub fn salad_mlp(
    x: &[f64],
    first: &(Vec<Vec<f64>>, Vec<f64>),
    second: &(Vec<Vec<f64>>, Vec<f64>),
) -> Vec<f64> {
    let hidden: Vec<f64> = affine(x, first).into_iter().map(|h| h.max(0.0)).collect();
    affine(&hidden, second)
}

/// `v / max(‖v‖, 1e-12)`.
pub fn salad_unit(v: &[f64]) -> Vec<f64> {
    let n = norm(v).max(1e-12);
    v.iter().map(|a| a / n).collect()
}

/// The balanced plan `[m+1][n]` (unscaled, the dustbin row last) of scores `s[k][j]` (m×n)
/// and dustbin score z: log-domain Sinkhorn on κ = s/ε (κ_{m+1,j} = z/ε) with row masses
/// 1/(n+m) (clusters) and (n−m)/(n+m) (dustbin), column masses 1/(n+m).
pub fn salad_plan(s: &[Vec<f64>], z: f64, eps: f64, iterations: SaladIterations) -> Vec<Vec<f64>> {
    let (m, n) = (s.len(), s[0].len());
    let total = (n + m) as f64;
    let mut kappa: Vec<Vec<f64>> = s
        .iter()
        .map(|row| row.iter().map(|v| v / eps).collect())
        .collect();
    kappa.push(vec![z / eps; n]);
    let mut log_a = vec![-total.ln(); m + 1];
    log_a[m] = ((n - m) as f64).ln() - total.ln();
    let log_b = -total.ln();
    let row = |v: &[f64], kappa: &[Vec<f64>]| -> Vec<f64> {
        (0..=m)
            .map(|i| {
                let t: Vec<f64> = (0..n).map(|j| kappa[i][j] + v[j]).collect();
                log_a[i] - logsumexp(&t)
            })
            .collect()
    };
    let column = |u: &[f64], kappa: &[Vec<f64>]| -> Vec<f64> {
        (0..n)
            .map(|j| {
                let t: Vec<f64> = (0..=m).map(|i| kappa[i][j] + u[i]).collect();
                log_b - logsumexp(&t)
            })
            .collect()
    };
    let plan = |u: &[f64], v: &[f64], kappa: &[Vec<f64>]| -> Vec<Vec<f64>> {
        (0..=m)
            .map(|i| (0..n).map(|j| (kappa[i][j] + u[i] + v[j]).exp()).collect())
            .collect()
    };
    match iterations {
        SaladIterations::Reference(steps) => {
            let mut v = vec![0.0; n];
            let mut u = vec![0.0; m + 1];
            for _ in 0..steps {
                u = row(&v, &kappa);
                v = column(&u, &kappa);
            }
            plan(&u, &v, &kappa)
        }
        SaladIterations::Crate(steps) => {
            for r in kappa.iter_mut() {
                let top = r.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                r.iter_mut().for_each(|v| *v -= top);
            }
            let mut u = vec![0.0; m + 1];
            let mut v = column(&u, &kappa);
            for _ in 0..steps {
                u = row(&v, &kappa);
                v = column(&u, &kappa);
            }
            plan(&u, &v, &kappa)
        }
        SaladIterations::Converged => {
            let mut v = vec![0.0; n];
            for _ in 0..100_000 {
                let u = row(&v, &kappa);
                v = column(&u, &kappa);
                let p = plan(&u, &v, &kappa);
                let error: f64 = (0..=m)
                    .map(|i| (p[i].iter().sum::<f64>() - log_a[i].exp()).abs())
                    .sum();
                if error < 1e-15 {
                    return p;
                }
            }
            plan(&row(&v, &kappa), &v, &kappa)
        }
    }
}

/// SALAD for one sample: `x` its valid tokens `[n][C]`, `global` its global token `[C]`
/// (with `params.token`). The output: the normalised global vector first (if any), then the
/// cluster vectors l-major (index i·m + k), the whole L2-normalised.
pub fn salad(
    x: &[Vec<f64>],
    global: Option<&[f64]>,
    params: &SaladParams,
    iterations: SaladIterations,
) -> Vec<f64> {
    salad_with(x, global, params, &|s: &[Vec<f64>]| {
        salad_plan(s, params.dustbin, params.epsilon, iterations)
    })
}

/// A plan `[m+1][n]` from the scores `s[k][j]`.
pub type SaladPlanOf<'a> = dyn Fn(&[Vec<f64>]) -> Vec<Vec<f64>> + 'a;

/// [`salad`] with the plan `[m+1][n]` (unscaled, the dustbin row last) given by `plan_of` from
/// the scores `s[k][j]`.
pub fn salad_with(
    x: &[Vec<f64>],
    global: Option<&[f64]>,
    params: &SaladParams,
    plan_of: &SaladPlanOf<'_>,
) -> Vec<f64> {
    let features: Vec<Vec<f64>> = x
        .iter()
        .map(|t| salad_mlp(t, &params.features_hidden, &params.features_out))
        .collect();
    let scores: Vec<Vec<f64>> = x
        .iter()
        .map(|t| salad_mlp(t, &params.scores_hidden, &params.scores_out))
        .collect();
    let (n, m, l) = (x.len(), scores[0].len(), features[0].len());
    // s[k][j]
    let s: Vec<Vec<f64>> = (0..m)
        .map(|k| (0..n).map(|j| scores[j][k]).collect())
        .collect();
    let plan = plan_of(&s);
    let scale = (n + m) as f64;
    let clusters: Vec<Vec<f64>> = (0..m)
        .map(|k| {
            let v: Vec<f64> = (0..l)
                .map(|i| (0..n).map(|j| scale * plan[k][j] * features[j][i]).sum())
                .collect();
            salad_unit(&v)
        })
        .collect();
    let mut out = Vec::new();
    if let (Some(g), Some((first, second))) = (global, &params.token) {
        out.extend(salad_unit(&salad_mlp(g, first, second)));
    }
    for i in 0..l {
        for k in 0..m {
            out.push(clusters[k][i]);
        }
    }
    salad_unit(&out)
}
