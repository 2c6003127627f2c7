//! SimPool: attention pooling whose query is the set's mean (Psomas et al., "Keep It SimPool",
//! ICCV 2023; timm's `SimPool1d`/`SimPool2d`), with its optional power γ and learnable shift β
//! (docs/maths.md §11).

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::activation::softmax;
use burn::tensor::{DType, Device, FloatDType, Tensor};

use super::{channels_last, mask_logits};
use crate::checks;
use crate::display::one_line_display;
use crate::pooling::input::{PoolingInput, Positions};

/// The smallest exponent `γ + β` SimPool's power form uses: a learnable shift β that drives
/// `γ + β` below it pools as this exponent (a clamp: no device read, no panic in training).
pub const SIMPOOL_MIN_EXPONENT: f64 = 0.1;

/// The offset of SimPool's power form, `v − min v + ε` (the reference code's 10⁻⁶).
const SHIFT_EPS: f64 = 1e-6;

/// Configuration of [`SimPool`]. The defaults are the reference code's (billpsomas/simpool
/// `SimPool`, timm's `SimPool1d/2d`): one head, no bias on the projections, no power (γ
/// unset), LayerNorm ε = 10⁻⁶ (the official code's; timm's uses PyTorch's 10⁻⁵). The paper's
/// settings are γ = 2 for CNNs and γ = 1.25 with the learnable shift β for ViTs.
#[derive(Config, Debug)]
pub struct SimPoolConfig {
    /// C, the width of the inputs and of the output.
    pub channels: usize,
    /// γ > 0, the power of the values: `y = (Σ_n a_n u_n^γ)^(1/γ)` with
    /// `u = v − min v + 10⁻⁶`. `None`: the plain form `y = Σ_n a_n v_n`. Default: `None`.
    #[config(default = "None")]
    pub gamma: Option<f64>,
    /// A learnable shift β (initially 0) of the exponent, `γ + β` (needs `gamma`). Default:
    /// false.
    #[config(default = false)]
    pub learnable_shift: bool,
    /// Biases on the query and key projections (timm's `qkv_bias`). Default: false.
    #[config(default = false)]
    pub qk_bias: bool,
    /// The LayerNorm's ε. Default: 1e-6.
    #[config(default = 1e-6)]
    pub norm_eps: f64,
    /// Leading tokens (class token, register tokens) that the token paths skip. Default: 0.
    #[config(default = 0)]
    pub num_prefix_tokens: usize,
}

impl SimPoolConfig {
    /// Creates the [`SimPool`] layer on `device`: the projections as PyTorch's `nn.Linear`
    /// (uniform in ±1/√C, Burn's default), the LayerNorm at weight 1, bias 0, β = 0.
    ///
    /// # Panics
    ///
    /// If `channels` is 0, `gamma` is set but not a finite number ≥ `SIMPOOL_MIN_EXPONENT`,
    /// `learnable_shift` is set without `gamma`, `norm_eps` is not a finite number > 0, or
    /// `channels`² exceeds 2³¹.
    pub fn init(&self, device: &Device) -> SimPool {
        let name = "SimPool";
        checks::at_least_one(name, "channels", self.channels);
        checks::positive(name, "norm_eps", self.norm_eps);
        if let Some(gamma) = self.gamma {
            checks::at_least(
                name,
                "gamma",
                gamma,
                SIMPOOL_MIN_EXPONENT,
                "the exponent's floor",
            );
        }
        assert!(
            !self.learnable_shift || self.gamma.is_some(),
            "SimPool: `learnable_shift` shifts the exponent γ: it needs `gamma`, got gamma = None"
        );
        let c = self.channels;
        checks::parameter_size(name, &[("channels", c), ("channels", c)]);
        let linear = || LinearConfig::new(c, c).with_bias(self.qk_bias).init(device);
        SimPool {
            norm: LayerNormConfig::new(c)
                .with_epsilon(self.norm_eps)
                .init(device),
            query: linear(),
            key: linear(),
            gamma: self.gamma,
            beta: self
                .learnable_shift
                .then(|| Param::from_tensor(Tensor::zeros([1], device))),
            num_prefix_tokens: self.num_prefix_tokens,
            norm_eps: self.norm_eps,
        }
    }
}

/// SimPool over the valid positions `x_n` of each sample (one head):
///
/// ```text
/// q = W_q x̄ + b_q,     x̄ = Σ_n m_n x_n / Σ_n m_n        the masked mean (not normalised)
/// v_n = LN(x_n),       k_n = W_k v_n + b_k               no value projection
/// a_n = softmax_n( q · k_n / √C )                       over the valid n (padding: −∞)
/// y = Σ_n a_n v_n                                      (γ unset)
/// y = ( Σ_n a_n u_n^p )^(1/p),  u_n = v_n − min_{j valid} v_j + 10⁻⁶,  p = γ + β
/// ```
///
/// with the minimum per sample and per channel over the valid positions. The official code
/// takes one minimum over the whole batch (and every channel), so there a sample's output
/// depends on the other samples of the batch; timm's takes it per channel but over padding
/// too. With γ = 1 (β = 0) the power form is the plain form shifted per channel by
/// `10⁻⁶ − min v`: the shift is not undone, as in the reference code.
///
/// The key projection folds into the query (`q·k_n = (W_kᵀ q)·v_n + q·b_k`), so no `[B, N, C]`
/// key tensor is formed (docs/maths.md §11). The key bias only adds a constant to the logits:
/// it has no effect on y and a zero gradient.
///
/// Padding is selected away (the features set to 0 through a select, the logits to −∞, the
/// padded `u` to 1 before its logarithm), so NaN or ±∞ there never reaches the output or the
/// gradients. With f16 or bf16 inputs the power form runs in f32 (ε = 10⁻⁶ is subnormal in
/// f16, where `u^p` underflows and its backward meets 0 · ∞). A mask row with no valid token
/// panics by name (timm's layer has no mask; given all-masked logits it returns NaN). Inputs near the float limits overflow the mean's
/// projection, as they would any linear layer.
///
/// ```rust
/// # use burn::tensor::{Device, Tensor};
/// # use burn_pooling::SimPoolConfig;
/// let device = Device::flex();
/// // The paper's CNN setting, γ = 2, on a ResNet's last maps.
/// let simpool = SimPoolConfig::new(32).with_gamma(Some(2.0)).init(&device);
/// let maps = Tensor::<4>::ones([2, 32, 7, 7], &device);
/// assert_eq!(simpool.forward(maps).dims(), [2, 32]);
/// ```
///
/// # Shapes
///
/// - input: maps `[B, C, H, W]`, tokens `[B, N, C]`, or a [`PoolingInput`] with a `[B, N]`
///   mask
/// - query, key: `[C, C]`; norm: `[C]`; beta: `[1]`
/// - output: `[B, C]`
#[derive(Module, Debug)]
#[module(custom_display)]
pub struct SimPool {
    /// The LayerNorm of the positions (keys' input and values).
    pub norm: LayerNorm,
    /// W_q, b_q.
    pub query: Linear,
    /// W_k, b_k.
    pub key: Linear,
    /// γ, the power of the values (`None`: the plain form).
    pub gamma: Option<f64>,
    /// β, the learnable shift of the exponent `γ + β`, `[1]`.
    pub beta: Option<Param<Tensor<1>>>,
    /// Leading tokens skipped by the token paths.
    pub num_prefix_tokens: usize,
    /// The LayerNorm's ε (the plain form computes the normalisation in closed form).
    pub norm_eps: f64,
}

one_line_display!(SimPool, |pool|
    "channels" => pool.channels(),
    "gamma" => format!("{:?}", pool.gamma),
    "learnable_shift" => pool.beta.is_some(),
    "num_prefix_tokens" => pool.num_prefix_tokens,
);

impl SimPool {
    /// C, the width of the inputs and of the output.
    pub fn channels(&self) -> usize {
        self.norm.gamma.dims()[0]
    }

    /// The exponent `p = max(γ + β, SIMPOOL_MIN_EXPONENT)`, `[1]` (tracked: its gradient
    /// reaches β), or `None` for the plain form.
    pub fn exponent(&self) -> Option<Tensor<1>> {
        let gamma = self.gamma?;
        let device = self.norm.gamma.device();
        Some(match &self.beta {
            Some(beta) => beta.val().add_scalar(gamma).clamp_min(SIMPOOL_MIN_EXPONENT),
            None => Tensor::full([1], gamma.max(SIMPOOL_MIN_EXPONENT), &device),
        })
    }

    /// Pools feature maps `[B, C, H, W]`, a token set `[B, N, C]` (skipping the first
    /// `num_prefix_tokens` tokens) or any [`PoolingInput`] (masked, with its own prefix) into
    /// `[B, C]`.
    ///
    /// # Panics
    ///
    /// If no position is left to pool, the mask's shape does not match, a mask row has no
    /// valid position, the input's C differs from the layer's, `gamma` was set to a value
    /// that is not a finite number ≥ `SIMPOOL_MIN_EXPONENT`, or the parameters are on another
    /// device than the input.
    pub fn forward(&self, input: impl Into<PoolingInput>) -> Tensor<2> {
        let positions = input.into().resolve("SimPool", self.num_prefix_tokens);
        let (_, _, channels) = positions.dims();
        let expected = self.channels();
        assert!(
            channels == expected,
            "SimPool: channel mismatch: expected C = {expected} (`channels`, the LayerNorm's width), got {channels}"
        );
        if let Some(gamma) = self.gamma {
            checks::at_least(
                "SimPool",
                "gamma",
                gamma,
                SIMPOOL_MIN_EXPONENT,
                "the exponent's floor",
            );
        }
        checks::same_device(
            "SimPool",
            [
                ("the input", &positions.features.device()),
                ("the parameters", &self.norm.gamma.device()),
            ],
        );
        if positions.is_empty() {
            // An empty `[0, C]` that a backward still reaches.
            return positions.empty();
        }
        self.pool(positions.finite_padding())
    }

    /// [`forward`](Self::forward) for a token set `[B, N, C]`, spelled out.
    pub fn forward_tokens(&self, tokens: Tensor<3>) -> Tensor<2> {
        self.forward(tokens)
    }

    /// docs/maths.md §11, on checked positions with finite padding.
    fn pool(&self, positions: Positions) -> Tensor<2> {
        let dtype = positions.features.dtype();
        if self.gamma.is_none() && matches!(dtype, DType::F32 | DType::F64) {
            return self.plain(positions);
        }
        let (batch, count, channels) = positions.dims();
        let scale = (channels as f64).powf(-0.5);
        let mean = positions.clone().weighted_sum(positions.mean_weights());
        let Positions {
            features,
            layout,
            mask,
        } = positions;
        let v = self.norm.forward(channels_last(features, layout));
        let q = self.query.forward(mean);
        // (W_k q) / √C: k_n = v_n W_k + b_k in Burn's row layout, so q·k_n = v_n·(q W_kᵀ) + q·b_k.
        let folded = q
            .clone()
            .matmul(self.key.weight.val().transpose())
            .mul_scalar(scale);
        let logits = v
            .clone()
            .matmul(folded.reshape([batch, channels, 1]))
            .reshape([batch, 1, count]);
        let logits = match &self.key.bias {
            Some(bias) => {
                let constant = (q * bias.val().reshape([1, channels]))
                    .sum_dim(1)
                    .mul_scalar(scale);
                logits + constant.reshape([batch, 1, 1])
            }
            None => logits,
        };
        let weights = softmax(mask_logits(logits, mask.as_ref()), 2);
        let Some(p) = self.exponent() else {
            return weights.matmul(v).reshape([batch, channels]);
        };
        // The power form: u = v − min_valid v + ε, y = (Σ a u^p)^(1/p) as exp/ln (u ≥ ε > 0),
        // in f32 for half-precision inputs: ε = 10⁻⁶ is subnormal in f16, u^p underflows there
        // and ∂ ln u = 1/u overflows, 0 · ∞ in the backward.
        let dtype = v.dtype();
        let half = matches!(dtype, DType::F16 | DType::BF16);
        let widen = |t: Tensor<3>| if half { t.cast(FloatDType::F32) } else { t };
        let (v, weights) = (widen(v), widen(weights));
        let padding = mask.map(|mask| {
            mask.bool_not()
                .reshape([batch, count, 1])
                .expand([batch, count, channels])
        });
        let select = |t: Tensor<3>, fill: f64| match &padding {
            Some(padding) => t.mask_fill(padding.clone(), fill),
            None => t,
        };
        let low = select(v.clone(), f64::INFINITY).min_dim(1);
        let u = select((v - low).add_scalar(SHIFT_EPS), 1.0);
        let p = widen(p.reshape([1, 1, 1]));
        let powered = (u.log() * p.clone()).exp();
        let mean = weights.matmul(powered);
        let y = (mean.log() / p).exp().reshape([batch, channels]);
        if half {
            y.cast(FloatDType::from(dtype))
        } else {
            y
        }
    }
}

impl SimPool {
    /// The plain form without forming LN(x): with x̂_n = (x_n − μ_n)/σ_n the normalised
    /// position (μ_n, σ_n² its mean and biased variance over the channels, plus ε),
    /// `v_n = γ ⊙ x̂_n + β`, so that (docs/maths.md §11)
    ///
    /// ```text
    /// q·k_n = (γ ⊙ W_kᵀq)·(x_n − μ_n) / σ_n + (a constant per sample: no effect)
    /// y     = γ ⊙ Σ_n (a_n / σ_n) (x_n − μ_n) + β          (Σ_n a_n = 1)
    /// ```
    ///
    /// Two matrix-vector products over the centred positions replace the LayerNorm's
    /// element-wise passes and their backward (the centring is kept: E[x²] − μ² would cancel).
    /// For f32 and f64; half-precision inputs take the LayerNorm route, which widens.
    fn plain(&self, positions: Positions) -> Tensor<2> {
        let (batch, count, channels) = positions.dims();
        let scale = (channels as f64).powf(-0.5);
        let mean = positions.clone().weighted_sum(positions.mean_weights());
        let Positions {
            features,
            layout,
            mask,
        } = positions;
        let x = channels_last(features, layout);
        let centred = x.clone() - x.mean_dim(2);
        let variance = (centred.clone() * centred.clone()).mean_dim(2);
        let inverse_sigma = variance.add_scalar(self.norm_eps).sqrt().recip();
        let gain = self.norm.gamma.val().reshape([1, channels]);
        let folded = self
            .query
            .forward(mean)
            .matmul(self.key.weight.val().transpose())
            .mul_scalar(scale)
            * gain.clone();
        let logits = (centred.clone().matmul(folded.reshape([batch, channels, 1]))
            * inverse_sigma.clone())
        .reshape([batch, 1, count]);
        let weights = softmax(mask_logits(logits, mask.as_ref()), 2);
        let scaled = weights * inverse_sigma.reshape([batch, 1, count]);
        let y = scaled.matmul(centred).reshape([batch, channels]) * gain;
        match &self.norm.beta {
            Some(beta) => y + beta.val().reshape([1, channels]),
            None => y,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[should_panic(expected = "SimPool: `learnable_shift` shifts the exponent γ: it needs `gamma`")]
    fn a_shift_needs_gamma() {
        SimPoolConfig::new(4)
            .with_learnable_shift(true)
            .init(&Device::flex());
    }

    #[test]
    #[should_panic(
        expected = "SimPool: `gamma` must be at least 1e-1 (the exponent's floor), got 5e-2"
    )]
    fn gamma_below_the_floor_panics() {
        SimPoolConfig::new(4)
            .with_gamma(Some(0.05))
            .init(&Device::flex());
    }

    #[test]
    fn display_and_json() {
        let device = Device::flex();
        let config = SimPoolConfig::new(8)
            .with_gamma(Some(1.25))
            .with_learnable_shift(true);
        let pool = config.init(&device);
        assert_eq!(pool.num_params(), 2 * 8 + 2 * 64 + 1);
        assert!(
            format!("{pool}").starts_with("SimPool {channels: 8, gamma: Some(1.25)"),
            "{pool}"
        );
        let loaded = SimPoolConfig::load_binary(config.to_string().as_bytes()).unwrap();
        assert_eq!(loaded.gamma, Some(1.25));
        assert!(loaded.learnable_shift);
        let y = pool.forward(Tensor::<4>::ones([3, 8, 2, 2], &device));
        assert_eq!(y.dims(), [3, 8]);
    }
}
