//! SALAD-style optimal-transport aggregation: per-token features and cluster scores from two
//! MLPs, a balanced entropic transport of the tokens onto m clusters and a dustbin, the
//! transported features summed per cluster and L2-normalised, with an optional global token
//! (docs/maths.md §13).
//!
//! Izquierdo, Civera, "Optimal Transport Aggregation for Visual Place Recognition", CVPR 2024
//! (the authors' `serizba/salad`, `models/aggregators/salad.py`).

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig, Linear, LinearConfig};
use burn::tensor::activation::relu;
use burn::tensor::{Bool, Device, Int, Tensor};

use crate::checks;
use crate::display::one_line_display;
use crate::layout::Layout;
use crate::ops::routing::{self, l2_normalize};
use crate::pooling::input::{PoolingInput, Positions};
use crate::transport::{BalancedPlan, BalancedSettings, Dustbin, balanced_transport};

/// How [`OtAggregation`] runs Sinkhorn's iterations. Default: `Converged` with at most 1000
/// iterations and a tolerance of 1e-6.
///
/// Both settings get the implicit gradient of docs/maths.md §7 at the plan the forward
/// returns, computed with that plan's actual row and column sums: never the gradient of the
/// unrolled iterations.
#[derive(Config, Copy, Debug, PartialEq)]
pub enum OtSinkhorn {
    /// Iterate until every sample's relative row error ‖P𝟙 − a‖₁ / Σa is at most
    /// `tolerance`, or `max_iterations` ran. The plan is then the entropic optimum (for the
    /// tolerance), and the implicit gradient is the exact gradient of the layer's output.
    Converged {
        /// Upper bound on the iterations (at least 1).
        max_iterations: usize,
        /// The relative row error at which the solve stops (> 0).
        tolerance: f64,
    },
    /// A fixed budget of iterations, as the reference runs (3 there), for speed or to stay
    /// close to a ported checkpoint. The forward is this crate's solver
    /// ([`balanced_transport`]) stopped after `iterations` row updates: it starts from u = 0
    /// with a column update (on costs anchored per row), then alternates row and column
    /// updates, so it runs one column update more than the reference, which starts from v = 0
    /// with a row update. Its plan is therefore a half-step further along the same iteration,
    /// not the reference's plan bit for bit (docs/maths.md §13 quantifies it; for that, see
    /// [`Reference`](Self::Reference)). The solve may stop before the budget if the plan is
    /// exact already (uniform scores) or stalls.
    ///
    /// **Gradient.** The implicit gradient at this unconverged plan P, computed from P and its
    /// actual sums r = P𝟙, c = Pᵀ𝟙 (the gradient of the entropic problem whose marginals are
    /// P's own sums), not the gradient of the unrolled iterations that the reference's
    /// autograd takes. The two agree as the iterations converge; the implicit one is the
    /// closer to the converged gradient, and its memory does not grow with the iterations.
    Fixed {
        /// The number of row updates (at least 1). The reference: 3.
        iterations: usize,
    },
    /// The reference's forward bit for bit: its `iterations` sweeps (3 there) from v = 0, row
    /// update first (SuperGlue's `log_sinkhorn_iterations`), run detached with tensor ops, so
    /// that a ported checkpoint gives the reference's descriptor. For the gradient, the crate's
    /// solver then solves, to a tolerance of 1e-6 (at most 1000 iterations), the problem whose
    /// marginals are that plan's own row and column sums: its solution is that plan, and its
    /// backward is the implicit gradient at it (docs/maths.md §7, §13), the same as
    /// [`Fixed`](Self::Fixed)'s at its own plan. The output's value is the reference's plan
    /// exactly; the converged solve costs what [`Converged`](Self::Converged) costs.
    Reference {
        /// The reference's sweeps (at least 1). The reference: 3.
        iterations: usize,
    },
}

impl OtSinkhorn {
    /// The solver settings for entropy `epsilon`.
    fn settings(self, epsilon: f64) -> BalancedSettings {
        match self {
            Self::Converged {
                max_iterations,
                tolerance,
            } => BalancedSettings {
                epsilon,
                max_iterations,
                tolerance,
            },
            // A tolerance no plan meets unless it is exact: the solve runs its budget.
            Self::Fixed { iterations } => BalancedSettings {
                epsilon,
                max_iterations: iterations,
                tolerance: f64::MIN_POSITIVE,
            },
            // The gradient's solve, of the reference plan's own marginals.
            Self::Reference { .. } => BalancedSettings {
                epsilon,
                max_iterations: 1000,
                tolerance: 1e-6,
            },
        }
    }

    /// Panics naming the invalid setting.
    fn validate(self, epsilon: f64) {
        match self {
            Self::Converged {
                max_iterations,
                tolerance,
            } => {
                checks::at_least_one("OtAggregation", "sinkhorn.max_iterations", max_iterations);
                checks::positive("OtAggregation", "sinkhorn.tolerance", tolerance);
            }
            Self::Fixed { iterations } | Self::Reference { iterations } => {
                checks::at_least_one("OtAggregation", "sinkhorn.iterations", iterations)
            }
        }
        self.settings(epsilon).validate("OtAggregation");
    }
}

/// Configuration of [`OtAggregation`]. Defaults are the reference's (`SALAD.__init__` and its
/// call): m = 64 clusters of l = 128 channels, hidden width 512, a global token of 256,
/// dropout 0.3, dustbin score 1, ε = 1; the Sinkhorn iterations run to convergence (the
/// reference's fixed 3 are [`OtSinkhorn::Fixed`]). The global token is the first prefix token,
/// so the default skips one prefix token (DINOv2's class token); with register tokens, set
/// `num_prefix_tokens` to 5.
#[derive(Config, Debug)]
pub struct OtAggregationConfig {
    /// Feature channels C of the input (DINOv2 ViT-B: 768; the reference's default 1536 is
    /// ViT-g).
    pub channels: usize,
    /// Number of clusters m. Default: 64.
    #[config(default = 64)]
    pub num_clusters: usize,
    /// Channels l of each cluster's vector. Default: 128.
    #[config(default = 128)]
    pub cluster_dim: usize,
    /// Hidden width of the three MLPs. Default: 512.
    #[config(default = 512)]
    pub hidden_dim: usize,
    /// Width of the global token's vector, or `None` for no global token. Default: 256.
    #[config(default = "Some(256)")]
    pub token_dim: Option<usize>,
    /// Dropout probability after the first layer of the feature and score MLPs (the
    /// reference's place: before their ReLU, equivalently after it), in [0, 1). Active only
    /// on an autodiff device, in training. Default: 0.3.
    #[config(default = 0.3)]
    pub dropout: f64,
    /// Initial dustbin score z. Default: 1.
    #[config(default = 1.0)]
    pub dustbin_score: f64,
    /// Entropy weight ε of the transport (the reference: 1). Default: 1.
    #[config(default = 1.0)]
    pub epsilon: f64,
    /// Converged or fixed iterations. Default: converged (at most 1000, tolerance 1e-6).
    #[config(default = "OtSinkhorn::Converged { max_iterations: 1000, tolerance: 1e-6 }")]
    pub sinkhorn: OtSinkhorn,
    /// Leading tokens (class token, register tokens) that the token paths skip; the first is
    /// the global token when `token_dim` is set. Default: 1.
    #[config(default = 1)]
    pub num_prefix_tokens: usize,
}

impl OtAggregationConfig {
    /// The width of the layer's output: m·l, plus the global token's width.
    pub fn output_channels(&self) -> usize {
        self.num_clusters * self.cluster_dim + self.token_dim.unwrap_or(0)
    }

    /// Creates the [`OtAggregation`] layer on `device`: the linear layers as PyTorch's
    /// `nn.Linear` and 1×1 `nn.Conv2d` (uniform in ±1/√fan_in, Burn's default), the dustbin
    /// score at `dustbin_score`.
    ///
    /// # Panics
    ///
    /// If `channels`, `num_clusters`, `cluster_dim`, `hidden_dim` or the `token_dim` width is
    /// 0, a weight would have more than 2³¹ elements, `dropout` is not in [0, 1),
    /// `dustbin_score` is not finite, ε is below
    /// [`MIN_EPSILON`](crate::transport::MIN_EPSILON), or a `sinkhorn` setting is 0.
    pub fn init(&self, device: &Device) -> OtAggregation {
        const NAME: &str = "OtAggregation";
        checks::at_least_one(NAME, "channels", self.channels);
        checks::at_least_one(NAME, "num_clusters", self.num_clusters);
        checks::at_least_one(NAME, "cluster_dim", self.cluster_dim);
        checks::at_least_one(NAME, "hidden_dim", self.hidden_dim);
        if let Some(width) = self.token_dim {
            checks::at_least_one(NAME, "token_dim", width);
            checks::parameter_size(
                NAME,
                &[("hidden_dim", self.hidden_dim), ("token_dim", width)],
            );
        }
        let (c, h) = (self.channels, self.hidden_dim);
        checks::parameter_size(NAME, &[("channels", c), ("hidden_dim", h)]);
        checks::parameter_size(
            NAME,
            &[("hidden_dim", h), ("cluster_dim", self.cluster_dim)],
        );
        checks::parameter_size(
            NAME,
            &[("hidden_dim", h), ("num_clusters", self.num_clusters)],
        );
        check_dropout(self.dropout);
        assert!(
            self.dustbin_score.is_finite(),
            "OtAggregation: `dustbin_score` must be finite, got {}",
            self.dustbin_score
        );
        self.sinkhorn.validate(self.epsilon);
        let linear = |d_in: usize, d_out: usize| LinearConfig::new(d_in, d_out).init(device);
        OtAggregation {
            features_hidden: linear(c, h),
            features_out: linear(h, self.cluster_dim),
            scores_hidden: linear(c, h),
            scores_out: linear(h, self.num_clusters),
            token_hidden: self.token_dim.map(|_| linear(c, h)),
            token_out: self.token_dim.map(|width| linear(h, width)),
            dustbin: Param::from_tensor(Tensor::full([1], self.dustbin_score, device)),
            dropout: DropoutConfig::new(self.dropout).init(),
            epsilon: self.epsilon,
            sinkhorn: self.sinkhorn,
            num_prefix_tokens: self.num_prefix_tokens,
        }
    }
}

fn check_dropout(prob: f64) {
    assert!(
        prob.is_finite() && (0.0..1.0).contains(&prob),
        "OtAggregation: `dropout` must be in [0, 1), got {prob}"
    );
}

/// Everything [`OtAggregation`] computes for a batch.
#[derive(Debug, Clone)]
pub struct OtAggregationOutput {
    /// `[B, m·l]` or `[B, T + m·l]`: the descriptor ([`OtAggregation::forward`]).
    pub pooled: Tensor<2>,
    /// `[B, m+1, N]`: the transport plan P as solved (unscaled; the dustbin row last): row
    /// sums 1/(N+m) per cluster and (N−m)/(N+m) for the dustbin at convergence, column sums
    /// 1/(N+m) (0 at masked positions). For maps, N runs over H·W in row-major order.
    pub plan: Tensor<3>,
    /// `[1]`: solver iterations run (the most over the batch).
    pub iterations: Tensor<1, Int>,
    /// `[1]`: whether every sample's row error met the tolerance (always false for
    /// [`OtSinkhorn::Fixed`] unless the plan is exact; for [`OtSinkhorn::Reference`], whether
    /// the gradient's solve of the plan's own marginals converged).
    pub converged: Tensor<1, Bool>,
}

/// SALAD's optimal-transport aggregation (Izquierdo & Civera, CVPR 2024) over the valid
/// tokens x_j (j = 1..N, N the sample's valid count) and an optional global token g₀:
///
/// ```text
/// f_j = W_f2 · ReLU(drop(W_f1 x_j + b_f1)) + b_f2          [l]   per-token features
/// s_j = W_s2 · ReLU(drop(W_s1 x_j + b_s1)) + b_s2          [m]   cluster scores
/// P   = argmin ⟨C, P⟩ + ε Σ P (ln P − 1)  s.t.  P𝟙 = a, Pᵀ𝟙 = b     over m+1 rows × N columns
///       C_kj = −s_jk (k ≤ m),  C_{m+1,j} = −z              z the learnable dustbin score
///       a_k = 1/(N+m),  a_{m+1} = (N−m)/(N+m),  b_j = 1/(N+m)  (0 at masked tokens)
/// P̃   = (N+m) · P, dustbin row dropped                      [m, N]
/// V_k = Σ_j P̃_kj f_j,   V_k ← V_k / max(‖V_k‖, eps)          [l] per cluster
/// t   = W_g2 · ReLU(W_g1 g₀ + b_g1) + b_g2,  t ← t / max(‖t‖, eps)      (with a global token)
/// y   = v / max(‖v‖, eps),   v = (t, V flattened l-major)              eps = 1e-12
/// ```
///
/// Each first layer of the feature and score MLPs is one `[B·N, C]·[C, 512]` product,
/// channels last, followed by one pass that adds the bias and applies ReLU and dropout (in
/// place on Flex, the keep decisions hashed from the element's index, no mask stored: the
/// backward reads the output; docs/maths.md §13). `V` is one batched matmul
/// `[m, N]·[N, l]` per sample, never the reference's broadcast `[l, m, N]` product.
///
/// **Output order** (the reference's, so that a ported checkpoint gives the same
/// descriptor): the global token's t first (index 0..256), then the cluster part flattened
/// l-major with the cluster index fastest: output index `T + i·m + k` holds channel i of
/// cluster k (T = 256 with a global token, 0 without), as the reference's
/// `normalize(V, dim=1).flatten(1)` of `[B, l, m]`.
///
/// **Porting the reference's weights.** `cluster_features.0` / `.3` → `features_hidden` /
/// `features_out`, `score.0` / `.3` → `scores_hidden` / `scores_out`, `token_features.0` /
/// `.2` → `token_hidden` / `token_out`, `dust_bin` → `dustbin` (shape `[1]`); a Conv2d weight
/// `[out, in, 1, 1]` is Burn's Linear weight `[in, out]` after squeezing and transposing.
///
/// **Gradients.** The transport's gradient is implicit (docs/maths.md §7): backward memory is a
/// few `[B, m+1, N]` plans whatever the iteration count; see [`OtSinkhorn`] for the fixed
/// settings ([`OtSinkhorn::Reference`] reproduces the reference's 3-sweep forward exactly). The dustbin score z and the last score layer's bias b_s2 each add a constant to a
/// whole row of the costs, which the row potential absorbs: the plan does not depend on them
/// and their gradients are 0 (up to rounding), as in the reference. They are kept as
/// parameters so that the reference's checkpoints load.
///
/// **Masks and padding.** Padding is read as 0 and has column mass 0: its plan column is
/// exactly 0, so its content reaches no output and no gradient, and each sample uses its own N.
/// The global token is token 0 of the input (the first prefix token); the mask is not read
/// there.
///
/// **Limits.** Each sample needs N > m valid tokens (the dustbin's mass (N−m)/(N+m) must be
/// positive; the reference gives NaN otherwise): a named panic. The MLPs are ordinary linear
/// layers: inputs near f32's largest value overflow them, as in any linear layer.
///
/// # Shapes
///
/// - input: maps `[B, C, H, W]`, tokens `[B, N, C]`, or a [`PoolingInput`] with a `[B, N]`
///   mask; with a global token, tokens with at least one prefix token (or maps with
///   [`forward_with_global`](Self::forward_with_global))
/// - parameters: the linear layers `[C, 512]`, `[512, l]`, `[C, 512]`, `[512, m]` (and
///   `[C, 512]`, `[512, 256]` for the global token), with biases; dustbin `[1]`
/// - features `[B, N, l]`, scores and plan `[B, m(+1), N]`, V `[B, m, l]`
/// - output: `[B, m·l]` or `[B, 256 + m·l]` (8448 at the defaults)
#[derive(Module, Debug)]
#[module(custom_display)]
pub struct OtAggregation {
    /// The feature MLP's first layer, C → hidden (`cluster_features.0`).
    pub features_hidden: Linear,
    /// The feature MLP's second layer, hidden → l (`cluster_features.3`).
    pub features_out: Linear,
    /// The score MLP's first layer, C → hidden (`score.0`).
    pub scores_hidden: Linear,
    /// The score MLP's second layer, hidden → m (`score.3`). Its bias gets a zero gradient.
    pub scores_out: Linear,
    /// The global token MLP's first layer, C → hidden (`token_features.0`), or `None`.
    pub token_hidden: Option<Linear>,
    /// The global token MLP's second layer, hidden → 256 (`token_features.2`), or `None`.
    pub token_out: Option<Linear>,
    /// The dustbin score z, `[1]` (`dust_bin`). Its gradient is 0.
    pub dustbin: Param<Tensor<1>>,
    /// The dropout of the feature and score MLPs: its probability and training flag, which
    /// the fused activation follows as Burn's `Dropout` would (active only in training on an
    /// autodiff device).
    pub dropout: Dropout,
    /// The entropy weight ε.
    pub epsilon: f64,
    /// Converged or fixed iterations.
    #[module(skip)]
    pub sinkhorn: OtSinkhorn,
    /// Leading tokens skipped by the token paths; the first is the global token.
    pub num_prefix_tokens: usize,
}

one_line_display!(OtAggregation, |layer|
    "channels" => layer.channels(),
    "num_clusters" => layer.num_clusters(),
    "cluster_dim" => layer.cluster_dim(),
    "token_dim" => format!("{:?}", layer.token_dim()),
    "epsilon" => layer.epsilon,
    "sinkhorn" => format!("{:?}", layer.sinkhorn),
    "num_prefix_tokens" => layer.num_prefix_tokens,
);

/// The output dims `[d_in, d_out]` of a linear layer.
fn dims(linear: &Linear) -> [usize; 2] {
    linear.weight.shape().dims()
}

impl OtAggregation {
    /// C.
    fn channels(&self) -> usize {
        dims(&self.features_hidden)[0]
    }

    /// m.
    fn num_clusters(&self) -> usize {
        dims(&self.scores_out)[1]
    }

    /// l.
    fn cluster_dim(&self) -> usize {
        dims(&self.features_out)[1]
    }

    /// The global token's width, `None` without one.
    pub fn token_dim(&self) -> Option<usize> {
        self.token_out.as_ref().map(|layer| dims(layer)[1])
    }

    /// The output width: m·l, plus the global token's width.
    pub fn output_width(&self) -> usize {
        self.num_clusters() * self.cluster_dim() + self.token_dim().unwrap_or(0)
    }

    /// Pools feature maps `[B, C, H, W]`, a token set `[B, N, C]` (skipping the first
    /// `num_prefix_tokens` tokens, the first of which is the global token when the layer has
    /// one) or any [`PoolingInput`] (masked, with its own prefix) into `[B, m·l]`
    /// (`[B, 256 + m·l]` with the global token; the order is [`OtAggregation`]'s). An empty
    /// batch (B = 0) gives an empty `[0, width]`.
    ///
    /// # Panics
    ///
    /// If no position is left to pool (N, H or W is 0, or N ≤ the prefix), C = 0, the mask's
    /// shape does not match, a mask row has no valid position, a sample has N ≤ m valid
    /// positions, C differs from the layer's, the layer has a global token and the input is
    /// feature maps or has no prefix token, the parameters' shapes disagree, a setting
    /// changed after `init` is invalid, or the input (or its mask) is on another device than
    /// the parameters.
    pub fn forward(&self, input: impl Into<PoolingInput>) -> Tensor<2> {
        self.forward_detailed(input).pooled
    }

    /// [`forward`](Self::forward) with the transport plan and the solver's iteration count.
    ///
    /// # Shapes
    ///
    /// - output: pooled `[B, width]`, plan `[B, m+1, N]` (N the positions after the prefix,
    ///   H·W for maps), iterations and converged `[1]`
    pub fn forward_detailed(&self, input: impl Into<PoolingInput>) -> OtAggregationOutput {
        let input = input.into();
        let whole = (self.token_dim().is_some() && input.layout().is_channels_last())
            .then(|| input.clone().with_prefix_tokens(0));
        let positions = input.resolve("OtAggregation", self.num_prefix_tokens);
        let global = match self.token_dim() {
            None => None,
            Some(width) => {
                let Some(whole) = whole else {
                    panic!(
                        "OtAggregation: the global token (token_dim = Some({width})) is the first prefix token of a token set, got feature maps: use `forward_with_global`, or set token_dim to None"
                    )
                };
                let (batch, count, channels) = positions.dims();
                let whole = whole.resolve("OtAggregation", 0);
                let (_, total, _) = whole.dims();
                assert!(
                    total > count,
                    "OtAggregation: the global token (token_dim = Some({width})) is the first prefix token: expected num_prefix_tokens ≥ 1, got 0 (set token_dim to None to pool without it)"
                );
                Some(
                    whole
                        .features
                        .slice([0..batch, 0..1, 0..channels])
                        .reshape([batch, channels]),
                )
            }
        };
        self.pool(positions, global)
    }

    /// [`forward`](Self::forward) for a token set `[B, N, C]`, spelled out.
    pub fn forward_tokens(&self, tokens: Tensor<3>) -> Tensor<2> {
        self.forward(tokens)
    }

    /// Pools `input` (maps, tokens or a [`PoolingInput`], its prefix skipped as in
    /// [`forward`](Self::forward)) with `global` `[B, C]` as the global token: the
    /// reference's `forward((maps, token))`.
    ///
    /// # Panics
    ///
    /// As [`forward`](Self::forward), and if the layer has no global token MLP or `global` is
    /// not `[B, C]`.
    pub fn forward_with_global(
        &self,
        input: impl Into<PoolingInput>,
        global: Tensor<2>,
    ) -> Tensor<2> {
        self.forward_detailed_with_global(input, global).pooled
    }

    /// [`forward_with_global`](Self::forward_with_global) with the plan, as
    /// [`forward_detailed`](Self::forward_detailed).
    pub fn forward_detailed_with_global(
        &self,
        input: impl Into<PoolingInput>,
        global: Tensor<2>,
    ) -> OtAggregationOutput {
        assert!(
            self.token_dim().is_some(),
            "OtAggregation: `forward_with_global` needs the global token MLP: expected token_dim = Some(width), got None"
        );
        let positions = input
            .into()
            .resolve("OtAggregation", self.num_prefix_tokens);
        let (batch, _, channels) = positions.dims();
        let dims = global.dims();
        assert!(
            dims == [batch, channels],
            "OtAggregation: global token shape mismatch: expected [B, C] = [{batch}, {channels}], got {dims:?}"
        );
        checks::same_device(
            "OtAggregation",
            [
                ("the input", &positions.features.device()),
                ("the global token", &global.device()),
            ],
        );
        self.pool(positions, Some(global))
    }

    /// Checks what may have changed since `init` (public fields): host values only.
    fn check(&self, channels: usize) {
        let [width, hidden] = dims(&self.features_hidden);
        assert!(
            channels == width,
            "OtAggregation: channel mismatch: expected C = {width} (the first layers' inputs), got {channels}"
        );
        let expect = |what: &str, actual: [usize; 2], expected: [usize; 2]| {
            assert!(
                actual == expected,
                "OtAggregation: `{what}` weight shape mismatch: expected {expected:?}, got {actual:?}"
            );
        };
        let [_, clusters] = dims(&self.scores_out);
        let [_, cluster_dim] = dims(&self.features_out);
        assert!(
            clusters > 0 && cluster_dim > 0,
            "OtAggregation: empty clusters: expected m, l > 0, got m = {clusters}, l = {cluster_dim}"
        );
        expect("scores_hidden", dims(&self.scores_hidden), [width, hidden]);
        expect(
            "features_out",
            dims(&self.features_out),
            [hidden, cluster_dim],
        );
        expect("scores_out", dims(&self.scores_out), [hidden, clusters]);
        match (&self.token_hidden, &self.token_out) {
            (Some(first), Some(second)) => {
                let [_, token_hidden] = dims(first);
                expect("token_hidden", dims(first), [width, token_hidden]);
                expect("token_out", dims(second), [token_hidden, dims(second)[1]]);
            }
            (None, None) => {}
            _ => panic!(
                "OtAggregation: `token_hidden` and `token_out` must both be set or both be None"
            ),
        }
        let dustbin: [usize; 1] = self.dustbin.shape().dims();
        assert!(
            dustbin == [1],
            "OtAggregation: `dustbin` shape mismatch: expected [1], got {dustbin:?}"
        );
        check_dropout(self.dropout.prob);
        self.sinkhorn.validate(self.epsilon);
    }

    fn pool(&self, positions: Positions, global: Option<Tensor<2>>) -> OtAggregationOutput {
        let (batch, count, channels) = positions.dims();
        self.check(channels);
        let device = positions.features.device();
        checks::same_device(
            "OtAggregation",
            [
                ("the input", &device),
                ("the parameters", &self.dustbin.device()),
            ],
        );
        let width = self.output_width();
        if positions.is_empty() {
            let clusters = self.num_clusters();
            return OtAggregationOutput {
                plan: Tensor::empty([0, clusters + 1, count], &device),
                // An empty `[0, width]` that a backward still reaches.
                pooled: positions.empty().sum_dim(1).repeat_dim(1, width),
                iterations: Tensor::zeros([1], &device),
                converged: Tensor::from_data([true], &device),
            };
        }
        let clusters = self.num_clusters();
        let valid = self.valid_counts(&positions);
        let positions = positions.finite_padding();
        let Positions {
            features,
            layout,
            mask,
        } = positions;
        // Channels last [B·N, C].
        let tokens = match layout {
            Layout::ChannelsLast => features,
            Layout::ChannelsFirst => features.swap_dims(1, 2),
        }
        .reshape([batch * count, channels]);
        let drop = self.active_dropout(&device);
        // Each MLP's first layer: Burn's product, then bias, ReLU and dropout in one pass
        // (`routing::bias_relu_dropout`: on Flex in place, with no stored mask).
        let hidden = |layer: &Linear| {
            let product = tokens.clone().matmul(layer.weight.val());
            let bias = match &layer.bias {
                Some(bias) => bias.val(),
                None => Tensor::zeros([dims(layer)[1]], &device),
            };
            routing::bias_relu_dropout(product, bias, drop)
        };
        let cluster_features = self
            .features_out
            .forward(hidden(&self.features_hidden))
            .reshape([batch, count, self.cluster_dim()]);
        let scores = self
            .scores_out
            .forward(hidden(&self.scores_hidden))
            .reshape([batch, count, clusters]);
        let (plan, solved) = self.transport(scores, valid, mask);
        // V [B, m, l]: one batched matmul; each cluster's vector normalised, then l-major.
        let aggregated = l2_normalize(plan.matmul(cluster_features), 2);
        let flat = aggregated
            .swap_dims(1, 2)
            .reshape([batch, self.cluster_dim() * clusters]);
        let whole = match (global, &self.token_hidden, &self.token_out) {
            (Some(global), Some(first), Some(second)) => {
                let token = second.forward(relu(first.forward(global)));
                Tensor::cat(vec![l2_normalize(token, 1), flat], 1)
            }
            _ => flat,
        };
        OtAggregationOutput {
            pooled: l2_normalize(whole, 1),
            plan: solved.plan,
            iterations: solved.iterations,
            converged: solved.converged,
        }
    }

    /// The drop probability this forward applies: the configured one where Burn's `Dropout`
    /// would apply it (training flag set, on an autodiff device), else 0.
    fn active_dropout(&self, device: &Device) -> f64 {
        let dropout = &self.dropout;
        if dropout.training.is_enabled() && device.is_autodiff() {
            dropout.prob
        } else {
            0.0
        }
    }

    /// Each sample's valid count N `[B, 1]` (on the device), checked N > m on the host (one
    /// read of `[B]` with a mask).
    fn valid_counts(&self, positions: &Positions) -> Tensor<2> {
        let (batch, count, _) = positions.dims();
        let clusters = self.num_clusters();
        let device = positions.features.device();
        match &positions.mask {
            None => {
                assert!(
                    count > clusters,
                    "OtAggregation: each sample needs more valid positions than clusters (the dustbin's mass (N−m)/(N+m) must be positive): expected N > m = {clusters}, got N = {count}"
                );
                Tensor::full([batch, 1], count as f64, &device)
            }
            Some(mask) => {
                let counts = mask.clone().int().sum_dim(1);
                let host = counts.clone().into_data().convert::<i64>();
                if let Some((sample, n)) = host
                    .iter::<i64>()
                    .enumerate()
                    .find(|&(_, n)| n <= clusters as i64)
                {
                    panic!(
                        "OtAggregation: each sample needs more valid positions than clusters (the dustbin's mass (N−m)/(N+m) must be positive): expected N > m = {clusters}, got N = {n} in sample {sample}"
                    );
                }
                counts.float()
            }
        }
    }

    /// The scaled plan P̃ = (N+m)·P without the dustbin row, `[B, m, N]`, from the scores
    /// `[B, N, m]`, and the solve.
    fn transport(
        &self,
        scores: Tensor<3>,
        valid: Tensor<2>,
        mask: Option<Tensor<2, Bool>>,
    ) -> (Tensor<3>, BalancedPlan) {
        let [batch, count, clusters] = scores.dims();
        let total = valid.clone() + clusters as f64; // N + m, [B, 1]
        let share = total.clone().recip(); // 1/(N+m)
        let row_mass = share.clone().expand([batch, clusters]);
        let column_mass = match mask {
            Some(mask) => mask.float() * share.clone(),
            None => share.clone().expand([batch, count]),
        };
        let dustbin = Dustbin {
            cost: self
                .dustbin
                .val()
                .neg()
                .reshape([1, 1])
                .expand([batch, count]),
            mass: ((valid - clusters as f64) * share).reshape([batch]),
        };
        let costs = scores.neg().swap_dims(1, 2);
        let solved = match self.sinkhorn {
            OtSinkhorn::Reference { iterations } => {
                let [rows, columns] = [row_mass.clone(), column_mass.clone()];
                let bin = dustbin.clone();
                let exact = self.reference_sweeps(costs.clone(), rows, columns, bin, iterations);
                // Its own marginals: the plan the converged solve below returns (to the
                // tolerance), whose backward is the implicit gradient at it.
                let sums = exact.clone().sum_dim(2).reshape([batch, clusters + 1]);
                let own = Dustbin {
                    mass: sums
                        .clone()
                        .slice([0..batch, clusters..clusters + 1])
                        .reshape([batch]),
                    ..dustbin
                };
                let solved = balanced_transport(
                    costs,
                    sums.slice([0..batch, 0..clusters]),
                    column_mass,
                    Some(own),
                    &self.sinkhorn.settings(self.epsilon),
                );
                let tracked = solved.plan.clone();
                BalancedPlan {
                    plan: exact + (tracked.clone() - tracked.detach()),
                    ..solved
                }
            }
            _ => balanced_transport(
                costs,
                row_mass,
                column_mass,
                Some(dustbin),
                &self.sinkhorn.settings(self.epsilon),
            ),
        };
        let scaled = solved.plan.clone().slice([0..batch, 0..clusters, 0..count])
            * total.unsqueeze_dim::<3>(2);
        (scaled, solved)
    }

    /// The reference's `iterations` sweeps (SuperGlue's `log_sinkhorn_iterations`), detached:
    /// κ = −C/ε, v = 0 (−∞ at masked columns), then u ← ln a − logsumexp_j(κ + v),
    /// v ← ln b − logsumexp_i(κ + u), and the plan exp(κ + u + v) `[B, m+1, N]`.
    fn reference_sweeps(
        &self,
        costs: Tensor<3>,
        row_mass: Tensor<2>,
        column_mass: Tensor<2>,
        dustbin: Dustbin,
        iterations: usize,
    ) -> Tensor<3> {
        let [batch, _, count] = costs.dims();
        let costs = Tensor::cat(vec![costs, dustbin.cost.unsqueeze_dim(1)], 1).detach();
        let dims = costs.dims();
        let rows = Tensor::cat(vec![row_mass, dustbin.mass.unsqueeze_dim(1)], 1)
            .detach()
            .unsqueeze_dim::<3>(2);
        let columns = column_mass.detach().unsqueeze_dim::<3>(1);
        let masked = columns.clone().lower_equal_elem(0.0);
        let kernel = costs
            .mask_fill(masked.clone().expand(dims), 0.0)
            .div_scalar(-self.epsilon);
        let log_rows = rows.log();
        let log_columns = columns
            .clamp_min(0.0)
            .log()
            .mask_fill(masked.clone(), f64::NEG_INFINITY);
        // logsumexp over `dim` of lines that hold at least one finite entry.
        let logsumexp = |x: Tensor<3>, dim: usize| {
            let shift = x.clone().max_dim(dim);
            (x - shift.clone()).exp().sum_dim(dim).log() + shift
        };
        let mut v = Tensor::<3>::zeros([batch, 1, count], &kernel.device())
            .mask_fill(masked.clone(), f64::NEG_INFINITY);
        let mut u = log_rows.clone();
        for _ in 0..iterations {
            u = log_rows.clone() - logsumexp(kernel.clone() + v.clone(), 2);
            v = (log_columns.clone() - logsumexp(kernel.clone() + u.clone(), 1))
                .mask_fill(masked.clone(), f64::NEG_INFINITY);
        }
        (kernel + u + v).exp()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Distribution, TensorData, Tolerance};

    fn small() -> OtAggregationConfig {
        OtAggregationConfig::new(6)
            .with_num_clusters(3)
            .with_cluster_dim(4)
            .with_hidden_dim(8)
            .with_token_dim(Some(5))
    }

    #[test]
    fn output_is_unit_norm_with_the_reference_width() {
        let device = Device::flex();
        let layer = small().init(&device);
        let tokens = Tensor::<3>::random([2, 9, 6], Distribution::Normal(0.0, 1.0), &device);
        let y = layer.forward(tokens);
        assert_eq!(y.dims(), [2, 5 + 12]);
        y.square()
            .sum_dim(1)
            .into_data()
            .assert_approx_eq::<f32>(&TensorData::from([[1.0f32], [1.0]]), Tolerance::default());
        assert_eq!(OtAggregationConfig::new(768).output_channels(), 8448);
    }

    #[test]
    #[should_panic(
        expected = "OtAggregation: each sample needs more valid positions than clusters (the dustbin's mass (N−m)/(N+m) must be positive): expected N > m = 3, got N = 3"
    )]
    fn too_few_tokens_panic() {
        let device = Device::flex();
        let layer = small().with_token_dim(None).init(&device);
        layer.forward_tokens(Tensor::<3>::ones([1, 4, 6], &device));
    }

    #[test]
    #[should_panic(
        expected = "OtAggregation: the global token (token_dim = Some(5)) is the first prefix token of a token set, got feature maps"
    )]
    fn maps_with_a_global_token_panic() {
        let device = Device::flex();
        small()
            .init(&device)
            .forward(Tensor::<4>::ones([1, 6, 3, 3], &device));
    }

    #[test]
    #[should_panic(
        expected = "OtAggregation: the global token (token_dim = Some(5)) is the first prefix token: expected num_prefix_tokens ≥ 1, got 0"
    )]
    fn tokens_without_a_prefix_panic_with_a_global_token() {
        let device = Device::flex();
        small()
            .with_num_prefix_tokens(0)
            .init(&device)
            .forward_tokens(Tensor::<3>::ones([1, 6, 6], &device));
    }

    #[test]
    #[should_panic(expected = "OtAggregation: `dropout` must be in [0, 1), got 1")]
    fn dropout_of_one_panics() {
        small().with_dropout(1.0).init(&Device::flex());
    }

    #[test]
    #[should_panic(expected = "OtAggregation: `sinkhorn.iterations` must be at least 1, got 0")]
    fn zero_fixed_iterations_panic() {
        small()
            .with_sinkhorn(OtSinkhorn::Fixed { iterations: 0 })
            .init(&Device::flex());
    }

    /// Parameter count, display, JSON round trip (with the fixed setting).
    #[test]
    fn parameters_display_and_json() {
        let device = Device::flex();
        let config = small().with_sinkhorn(OtSinkhorn::Fixed { iterations: 3 });
        let layer = config.init(&device);
        // (6·8 + 8) ·3 + (8·4 + 4) + (8·3 + 3) + (8·5 + 5) + 1
        assert_eq!(layer.num_params(), 56 * 3 + 36 + 27 + 45 + 1);
        assert!(
            format!("{layer}").starts_with(
                "OtAggregation {channels: 6, num_clusters: 3, cluster_dim: 4, token_dim: Some(5)"
            ),
            "{layer}"
        );
        let json = config.to_string();
        let loaded = OtAggregationConfig::load_binary(json.as_bytes()).unwrap();
        assert_eq!(loaded.sinkhorn, OtSinkhorn::Fixed { iterations: 3 });
        assert_eq!(loaded.to_string(), json);
    }
}
