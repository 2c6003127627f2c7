//! OTK, the optimal-transport kernel embedding: each of p learnable references takes a unit of
//! mass from the positions by entropic balanced transport, and pools the positions it took
//! (docs/maths.md §14).
//!
//! Mialon, Chen, d'Aspremont, Mairal, "A Trainable Optimal Transport Embedding for Feature
//! Aggregation and its Relationship to Attention", ICLR 2021 (the authors' PyTorch code,
//! `claying/OTK`, `otk/layers.py` `OTKernel` and `otk/sinkhorn.py`).

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::Initializer;
use burn::tensor::{Bool, DType, Device, Int, Tensor};

use super::kmeans::kmeans;
use crate::checks;
use crate::display::one_line_display;
use crate::layout::Layout;
use crate::maths::balanced::POTENTIAL_BOUND;
use crate::ops::routing::l2_normalize;
use crate::pooling::input::{PoolingInput, Positions};
use crate::transport::{BalancedSettings, balanced_transport};

/// Configuration of [`Otk`]. Defaults are the authors' `OTKernel` where it has one (one head,
/// ε = 0.1, references uniform on ±1/√p); p = 16 references (the reference code has no
/// default; its `SeqAttention` model's is 1), and the solver's stopping rule (the reference runs a
/// fixed 100 iterations, see [`max_iterations`](Self::max_iterations)).
#[derive(Config, Debug)]
pub struct OtkConfig {
    /// Feature channels C of the input.
    pub channels: usize,
    /// Number of references p per head (the reference's `out_size`). Default: 16.
    #[config(default = 16)]
    pub num_references: usize,
    /// Number of heads, each with its own p references (the reference's `heads`). Default: 1.
    #[config(default = 1)]
    pub heads: usize,
    /// The entropy ε of the transport (costs −⟨x, z⟩). Default: 0.1 (the reference's).
    #[config(default = 0.1)]
    pub epsilon: f64,
    /// Upper bound on the Sinkhorn iterations (one reference update and one position update
    /// each, as one iteration of the reference's loop). Default: 1000. The reference always
    /// runs exactly 100 (`max_iter = 100`) and unrolls them through autograd; this layer stops
    /// at the tolerance (tens to hundreds of iterations at ε = 0.1) and
    /// differentiates the solution implicitly, so the bound only caps ill-conditioned inputs
    /// (see [`tolerance`](Self::tolerance) for typical counts).
    #[config(default = 1000)]
    pub max_iterations: usize,
    /// The solve stops once every (sample, head)'s relative marginal error
    /// ‖P𝟙 − 𝟙‖₁ / p is at most this. Default: 1e-6 (the crate's balanced default; f32
    /// reaches it: on `[64, 196, 256]` uniform [0, 1) tokens with the default references, 75
    /// iterations (45 for 1e-4, 60 for 1e-5); on standard normal tokens, whose ⟨x, z⟩ spread
    /// 1.7× wider and have both signs, 649). The output is then within about the tolerance (relative) of the
    /// exact plan's.
    #[config(default = 1e-6)]
    pub tolerance: f64,
    /// The references' initializer, before [`Otk::init_from_tokens`]. `None`: uniform on
    /// [−1/√p, 1/√p] (the reference's `reset_parameter`). Default: `None`.
    #[config(default = "None")]
    pub initializer: Option<Initializer>,
    /// Leading tokens (class token, register tokens) that the token paths skip. Default: 0.
    #[config(default = 0)]
    pub num_prefix_tokens: usize,
}

impl OtkConfig {
    /// The width of the layer's flattened output: p·heads·C.
    pub fn output_channels(&self) -> usize {
        self.num_references * self.heads * self.channels
    }

    /// The solver settings the config describes.
    pub fn settings(&self) -> BalancedSettings {
        BalancedSettings::new(self.epsilon)
            .with_max_iterations(self.max_iterations)
            .with_tolerance(self.tolerance)
    }

    /// Creates the [`Otk`] layer on `device`: references `[heads, p, C]` from the initializer.
    ///
    /// # Panics
    ///
    /// If `channels`, `num_references` or `heads` is 0, `[heads, p, C]` would have more than
    /// 2³¹ elements (checked before allocating), `epsilon` is below
    /// [`MIN_EPSILON`](crate::transport::MIN_EPSILON) (or not finite), `max_iterations` is 0
    /// or `tolerance` is not a finite number > 0.
    pub fn init(&self, device: &Device) -> Otk {
        checks::at_least_one("Otk", "channels", self.channels);
        checks::at_least_one("Otk", "num_references", self.num_references);
        checks::at_least_one("Otk", "heads", self.heads);
        checks::parameter_size(
            "Otk",
            &[
                ("heads", self.heads),
                ("num_references", self.num_references),
                ("channels", self.channels),
            ],
        );
        let settings = self.settings();
        settings.validate("Otk");
        let bound = 1.0 / (self.num_references as f64).sqrt();
        let initializer = self.initializer.clone().unwrap_or(Initializer::Uniform {
            min: -bound,
            max: bound,
        });
        let references = initializer.init_with(
            [self.heads, self.num_references, self.channels],
            Some(self.channels),
            Some(self.num_references),
            device,
        );
        Otk {
            references,
            settings,
            num_prefix_tokens: self.num_prefix_tokens,
        }
    }
}

/// What [`Otk::forward_detailed`] returns.
#[derive(Debug, Clone)]
pub struct OtkOutput {
    /// `[B, p, heads·C]`: row k holds head h's pooled positions at columns `h·C..(h+1)·C`.
    pub embedding: Tensor<3>,
    /// `[B, heads, p, N]`: the transport plans that pool (rows sum to 1, columns to p/N_valid
    /// within the tolerance, zero on masked positions).
    pub plan: Tensor<4>,
    /// `[1]`: solver iterations run (the maximum over the batch and heads).
    pub iterations: Tensor<1, Int>,
    /// `[1]`: whether every (sample, head) met the tolerance (see
    /// [`BalancedPlan::converged`](crate::transport::BalancedPlan::converged)).
    pub converged: Tensor<1, Bool>,
}

/// OTK pooling (Mialon et al., ICLR 2021) over the valid positions x_j (N_valid of them), with
/// references z_hk `[heads, p, C]`, per head h:
///
/// ```text
/// C_kj = −⟨x_j, z_hk⟩                                       (costs)
/// P = argmin ⟨C, P⟩ + ε Σ P (ln P − 1)
///     s.t. Σ_j P_kj = 1 (each reference),  Σ_k P_kj = p / N_valid (each valid position),
///          P_kj = 0 at masked positions
/// out_k = Σ_j P_kj x_j                                      (one batched matmul P·X)
/// y[b, k, h·C + c] = out_k,c of head h
/// ```
///
/// Each reference's output is a convex combination of the positions (its plan row sums to
/// 1), so the output is in the features' units. The costs are computed with each head's
/// references centred, z_k − z̄ (z̄ their mean): that shifts column j of the costs by
/// ⟨x_j, z̄⟩, which changes no balanced plan, and keeps the costs small when the references
/// share a component. The plan that pools is the solver's with its rows renormalised (one more
/// row update: the reference code's last update is also the rows'). The transport is
/// [`balanced_transport`](crate::transport::balanced_transport): log-domain Sinkhorn stopped at
/// the [`tolerance`](OtkConfig::tolerance), differentiated implicitly (no unrolling: backward
/// memory a few plans, whatever the iteration count).
///
/// **Against the reference code.** The authors' `OTKernel` computes the same plan in the
/// kernel domain, K = exp(⟨x, z⟩/ε), unrolling a fixed 100 Sinkhorn iterations through
/// autograd (memory ∝ iterations); exp overflows f32 once ⟨x, z⟩/ε > 88.7 (inf/inf = NaN), which
/// the log domain does not. Their loop's last update fixes the references' masses (1), and so
/// does this layer's renormalisation of the rows: converged, both are the same plan. Their output has no other scaling:
/// `bmm(P, X)` reshaped to `[B, p, heads·C]` (reference-major, then head, then channel), as
/// here, and their classifiers flatten it to `[B, p·heads·C]` in that order, as
/// [`forward`](Otk::forward) does. The paper writes the embedding with plan marginals 1/N and
/// 1/p times √p: the code's (and this layer's) output is √p times the paper's formula.
///
/// **Robustness.** Padding is read as 0 and has zero mass, so its content reaches no output
/// and no gradient. The inner products are computed on x / s, s = max(1, max_j |x_j|) per
/// sample (detached), then scaled back and clamped to ±ε·min(the float's largest value,
/// f32::MAX/4)/2 (where the solver's −C/ε saturates anyway), so features up to the float's
/// limit give a finite plan (and an output that is a convex combination of them). A NaN at a valid position makes its own
/// sample's output NaN, never another sample's.
///
/// Initialise from data with [`init_from_tokens`](Self::init_from_tokens) (spherical
/// k-means, the reference's `unsup_train` for one head).
///
/// # Shapes
///
/// - input: maps `[B, C, H, W]`, tokens `[B, N, C]`, or a [`PoolingInput`] with a `[B, N]` mask
/// - parameters: references `[heads, p, C]`
/// - costs and plan: `[B·heads, p, N]`
/// - output: [`forward`](Self::forward) `[B, p·heads·C]` (index `k·heads·C + h·C + c`),
///   [`forward_embedding`](Self::forward_embedding) `[B, p, heads·C]`
#[derive(Module, Debug)]
#[module(custom_display)]
pub struct Otk {
    /// The references z, `[heads, p, C]`.
    pub references: Param<Tensor<3>>,
    /// ε and the solver's stopping rule.
    #[module(skip)]
    pub settings: BalancedSettings,
    /// Leading tokens skipped by the token paths.
    pub num_prefix_tokens: usize,
}

one_line_display!(Otk, |otk|
    "channels" => otk.dims()[2],
    "num_references" => otk.dims()[1],
    "heads" => otk.dims()[0],
    "epsilon" => otk.settings.epsilon,
    "max_iterations" => otk.settings.max_iterations,
    "tolerance" => otk.settings.tolerance,
    "num_prefix_tokens" => otk.num_prefix_tokens,
);

impl Otk {
    /// `[heads, p, C]`.
    fn dims(&self) -> [usize; 3] {
        self.references.shape().dims()
    }

    /// Pools feature maps `[B, C, H, W]`, a token set `[B, N, C]` (skipping the first
    /// `num_prefix_tokens` tokens) or any [`PoolingInput`] (masked, with its own prefix) into
    /// `[B, p·heads·C]`: the [`forward_embedding`](Self::forward_embedding) flattened
    /// (reference-major, then head, then channel). An empty batch (B = 0) gives `[0, p·heads·C]`.
    ///
    /// # Panics
    ///
    /// If no position is left to pool (N, H or W is 0, or N ≤ the prefix), C = 0, the mask's
    /// shape does not match, a mask row has no valid position, the input's C differs from the
    /// references' width, the references are empty (heads or p = 0), a setting is invalid, or
    /// the input (or its mask) is on another device than the references.
    pub fn forward(&self, input: impl Into<PoolingInput>) -> Tensor<2> {
        let embedding = self.forward_embedding(input);
        let [batch, references, width] = embedding.dims();
        embedding.reshape([batch, references * width])
    }

    /// [`forward`](Self::forward) for a token set `[B, N, C]`, spelled out.
    pub fn forward_tokens(&self, tokens: Tensor<3>) -> Tensor<2> {
        self.forward(tokens)
    }

    /// The embedding `[B, p, heads·C]` (the reference's `OTKernel` output for a token set),
    /// before flattening. Panics as [`forward`](Self::forward).
    pub fn forward_embedding(&self, input: impl Into<PoolingInput>) -> Tensor<3> {
        self.forward_detailed(input).embedding
    }

    /// The embedding with the plans and the solver's report. Panics as
    /// [`forward`](Self::forward).
    pub fn forward_detailed(&self, input: impl Into<PoolingInput>) -> OtkOutput {
        let positions = input.into().resolve("Otk", self.num_prefix_tokens);
        self.pool(positions)
    }

    /// Initialises the references from sample tokens by spherical k-means, per head, as the
    /// authors' `unsup_train` does for one head: the tokens are L2-normalised, then
    /// deterministic greedy farthest-point seeding (the first token, then each next centre the
    /// token of smallest largest cosine to the centres so far) and at most `iterations` Lloyd
    /// rounds on the sphere (assign to the largest cosine, centre = normalised mean), stopped
    /// early when no assignment changes. The references are the unit centres. No random
    /// state: the same tokens give the same layer. The parameter keeps its identity (an
    /// optimizer built before still trains it); everything runs detached, on the tokens'
    /// device.
    ///
    /// With several heads the tokens are split into `heads` contiguous, equal shares (the
    /// last `M mod heads` unused) and head h is the k-means of share h: pass tokens of
    /// different images in order and each head learns from its own images. (The reference
    /// runs a Wasserstein k-means over whole token sets there, grouping the sets into heads
    /// and running spherical k-means in each group; equal contiguous shares are its
    /// deterministic stand-in.)
    ///
    /// # Shapes
    ///
    /// - tokens: `[M, C]`, M ≥ heads·p
    ///
    /// # Panics
    ///
    /// If the width differs from the references', or M < heads·p.
    pub fn init_from_tokens(self, tokens: Tensor<2>, iterations: usize) -> Self {
        let [count, channels] = tokens.dims();
        let [heads, references, width] = self.dims();
        assert!(
            channels == width,
            "Otk::init_from_tokens: channel mismatch: expected C = {width} (the references' width), got {channels}"
        );
        assert!(
            count >= heads * references,
            "Otk::init_from_tokens: need at least heads·p = {} tokens, got {count}",
            heads * references
        );
        let data = l2_normalize(tokens.detach(), 1);
        let share = count / heads;
        let centres = (0..heads)
            .map(|head| {
                let rows = data
                    .clone()
                    .slice([head * share..(head + 1) * share, 0..channels]);
                kmeans(rows, references, iterations, true).unsqueeze_dim::<3>(0)
            })
            .collect::<Vec<_>>();
        let centres = Tensor::cat(centres, 0);
        let references = self.references.map(|old| {
            let new = centres.to_device(&old.device());
            if old.is_require_grad() {
                new.require_grad()
            } else {
                new
            }
        });
        Self { references, ..self }
    }

    /// Checks what may have changed since `init` (public fields): host values only.
    fn check(&self, channels: usize) {
        let [heads, references, width] = self.dims();
        assert!(
            heads > 0 && references > 0,
            "Otk: the references [heads, p, C] are empty: expected heads, p > 0, got heads = {heads}, p = {references}"
        );
        assert!(
            channels == width,
            "Otk: channel mismatch: expected C = {width} (the references' width), got {channels}"
        );
        self.settings.validate("Otk");
    }

    fn pool(&self, positions: Positions) -> OtkOutput {
        let (batch, count, channels) = positions.dims();
        self.check(channels);
        let [heads, references, _] = self.dims();
        checks::same_device(
            "Otk",
            [
                ("the input", &positions.features.device()),
                ("the parameters", &self.references.device()),
            ],
        );
        let device = positions.features.device();
        if positions.is_empty() {
            // An empty result that a backward still reaches.
            let empty = positions.empty().repeat_dim(1, heads); // [0, heads·C]
            let embedding = empty.unsqueeze_dim::<3>(1).repeat_dim(1, references);
            return OtkOutput {
                embedding,
                plan: Tensor::empty([0, heads, references, count], &device),
                iterations: Tensor::zeros([1], &device),
                converged: Tensor::from_data([true], &device),
            };
        }
        let positions = positions.finite_padding();
        // Column masses p/N_valid (0 on padding), one row per (sample, head).
        let masses = positions.mean_weights().mul_scalar(references as f64);
        let Positions {
            features, layout, ..
        } = positions;
        let dtype = features.dtype();
        // ⟨x_j, z_hk⟩ on x / s, s = max(1, max_j |x_j|) per sample (detached): the matmul
        // cannot overflow (nor make inf − inf); scaled back, then clamped where −C/ε stays finite.
        let scale = features
            .clone()
            .abs()
            .flatten::<2>(1, 2)
            .max_dim(1)
            .clamp_min(1.0)
            .detach()
            .unsqueeze_dim::<3>(2); // [B, 1, 1]
        // Each head's references centred (z_k − z̄): a cost shift per column, −⟨x_j, z̄⟩, that
        // no balanced plan sees, and that keeps the costs small when the references share a
        // component (equal references give zero costs, exactly the uniform plan).
        let centred = {
            let z = self.references.val();
            z.clone() - z.mean_dim(1)
        };
        let flat = centred.reshape([1, heads * references, channels]);
        let scaled = features / scale.clone();
        let dots = match layout {
            Layout::ChannelsLast => flat.matmul(scaled.clone().swap_dims(1, 2)),
            Layout::ChannelsFirst => flat.matmul(scaled.clone()),
        }; // [B, heads·p, N]
        let bound = cost_bound(dtype, self.settings.epsilon);
        let costs = (dots * scale.clone()).neg().clamp(-bound, bound).reshape([
            batch * heads,
            references,
            count,
        ]);
        let row_mass = Tensor::ones([batch * heads, references], &device);
        let column_mass = masses
            .unsqueeze_dim::<3>(1)
            .repeat_dim(1, heads)
            .reshape([batch * heads, count]);
        let solved = balanced_transport(costs, row_mass, column_mass, None, &self.settings);
        // One more row update, P_kj / Σ_j P_kj: the solver's last update is the positions'
        // (columns exact), the reference code's the references' (rows exact, 1). At the fixed
        // point it changes nothing, gradient included (a row-constant change of ∂L/∂P has no
        // effect through the implicit backward); near the float's limits it keeps each output
        // a convex combination of the positions, computed on x / s so that it cannot overflow.
        let rows = solved.plan.clone().sum_dim(2).clamp_min(ROW_FLOOR);
        let plan = (solved.plan / rows).reshape([batch, heads * references, count]);
        let tokens = match layout {
            Layout::ChannelsLast => scaled,
            Layout::ChannelsFirst => scaled.swap_dims(1, 2),
        };
        let pooled = plan.clone().matmul(tokens) * scale; // [B, heads·p, C]
        let embedding = pooled
            .reshape([batch, heads, references, channels])
            .swap_dims(1, 2)
            .reshape([batch, references, heads * channels]);
        OtkOutput {
            embedding,
            plan: plan.reshape([batch, heads, references, count]),
            iterations: solved.iterations,
            converged: solved.converged,
        }
    }
}

/// The floor of a plan row's sum before it is normalised: a row that underflowed to 0 pools 0.
const ROW_FLOOR: f64 = 1e-30;

/// Where the costs are clamped: ε/2 times the smaller of the dtype's largest finite value and
/// the solver's bound on −C/ε ([`POTENTIAL_BOUND`]), so that −C/ε and its row anchor stay
/// finite (the solver bounds them there anyway; a cost beyond it only saturates).
fn cost_bound(dtype: DType, epsilon: f64) -> f64 {
    let largest = match dtype {
        DType::F64 => f64::MAX,
        DType::F16 => 65504.0,
        DType::BF16 => 3.3895e38,
        _ => f32::MAX as f64,
    };
    largest.min(POTENTIAL_BOUND) * epsilon / 2.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Distribution, TensorData, Tolerance};

    #[test]
    fn output_shapes_and_plan_marginals() {
        let device = Device::flex();
        let layer = OtkConfig::new(6)
            .with_num_references(3)
            .with_heads(2)
            .init(&device);
        let tokens = Tensor::<3>::random([2, 5, 6], Distribution::Normal(0.0, 1.0), &device);
        assert_eq!(layer.forward(tokens.clone()).dims(), [2, 36]);
        let maps = Tensor::<4>::random([2, 6, 2, 3], Distribution::Normal(0.0, 1.0), &device);
        assert_eq!(layer.forward_embedding(maps).dims(), [2, 3, 12]);
        let out = layer.forward_detailed(tokens);
        assert!(out.converged.into_scalar::<bool>());
        out.plan
            .clone()
            .sum_dim(3)
            .into_data()
            .assert_approx_eq::<f32>(
                &TensorData::from([[[[1.0f32]; 3]; 2]; 2]),
                Tolerance::absolute(1e-3),
            );
        out.plan.sum_dim(2).into_data().assert_approx_eq::<f32>(
            &TensorData::from([[[[0.6f32; 5]]; 2]; 2]),
            Tolerance::absolute(1e-3),
        );
    }

    #[test]
    #[should_panic(
        expected = "Otk: channel mismatch: expected C = 8 (the references' width), got 6"
    )]
    fn channel_mismatch_panics() {
        let device = Device::flex();
        let layer = OtkConfig::new(8).with_num_references(2).init(&device);
        layer.forward_tokens(Tensor::<3>::ones([1, 4, 6], &device));
    }

    #[test]
    #[should_panic(expected = "Otk: `heads` must be at least 1, got 0")]
    fn zero_heads_panics() {
        OtkConfig::new(8).with_heads(0).init(&Device::flex());
    }

    #[test]
    #[should_panic(expected = "Otk: `epsilon` must be a finite number > 0, got 0")]
    fn zero_epsilon_panics() {
        OtkConfig::new(8).with_epsilon(0.0).init(&Device::flex());
    }

    #[test]
    #[should_panic(expected = "Otk::init_from_tokens: need at least heads·p = 4 tokens, got 3")]
    fn too_few_tokens_panic() {
        let device = Device::flex();
        OtkConfig::new(2)
            .with_num_references(2)
            .with_heads(2)
            .init(&device)
            .init_from_tokens(Tensor::<2>::ones([3, 2], &device), 10);
    }

    /// The default initialiser's range, spherical k-means on two clear directions per head,
    /// the parameter's identity, the display and the JSON round trip.
    #[test]
    fn initialisers_display_and_json() {
        let device = Device::flex();
        let config = OtkConfig::new(3).with_num_references(4);
        let layer = config.init(&device);
        assert_eq!(layer.num_params(), 12);
        let bound = layer.references.val().abs().max().into_scalar::<f32>();
        assert!(bound <= 0.5, "{bound}");
        let config = config.with_num_references(2).with_heads(2);
        let layer = config.init(&device);
        let id = layer.references.id;
        let tokens = Tensor::<2>::from_floats(
            [
                // head 0's share: around +x and +y
                [2.0, 0.1, 0.0],
                [3.0, -0.1, 0.0],
                [0.0, 1.0, 0.1],
                [0.1, 4.0, -0.1],
                // head 1's share: around −x and +z
                [-1.0, 0.0, 0.0],
                [-2.0, 0.0, 0.1],
                [0.0, 0.0, 5.0],
                [0.1, 0.0, 1.0],
            ],
            &device,
        );
        let layer = layer.init_from_tokens(tokens, 10);
        assert_eq!(layer.references.id, id);
        let z = layer.references.val();
        assert_eq!(z.dims(), [2, 2, 3]);
        // Unit references, each the direction of its cluster.
        z.clone()
            .square()
            .sum_dim(2)
            .into_data()
            .assert_approx_eq::<f32>(
                &TensorData::from([[[1.0f32], [1.0]], [[1.0], [1.0]]]),
                Tolerance::absolute(1e-5),
            );
        let signs = z
            .clone()
            .greater_elem(0.9)
            .int()
            .sum_dim(2)
            .sum()
            .into_scalar::<i64>();
        let negative = z.lower_elem(-0.9).int().sum().into_scalar::<i64>();
        assert_eq!((signs, negative), (3, 1));
        assert!(
            format!("{layer}").starts_with("Otk {channels: 3, num_references: 2, heads: 2"),
            "{layer}"
        );
        let json = config.to_string();
        let loaded = OtkConfig::load_binary(json.as_bytes()).unwrap();
        assert_eq!(loaded.to_string(), json);
        assert_eq!(loaded.output_channels(), 12);
    }
}
