//! MAP, multi-head attention pooling with learned latent queries: SigLIP's pooling head,
//! timm's `AttentionPoolLatent` (docs/maths.md §11).

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::activation::softmax;
use burn::tensor::{Device, Distribution, Tensor};

use super::{channels_last, mask_logits};
use crate::checks;
use crate::display::one_line_display;
use crate::pooling::input::{PoolingInput, Positions};

/// What [`AttentionPool`] outputs from its L latents. Default: the first latent.
#[derive(Config, Copy, Debug, PartialEq, Eq)]
pub enum AttentionPoolOutput {
    /// `y = y_0`, the first latent's output (timm's `pool_type = 'token'`).
    FirstLatent,
    /// `y = (1/L) Σ_l y_l`, the mean of the latents' outputs (timm's `pool_type = 'avg'`).
    MeanLatents,
}

/// Configuration of [`AttentionPool`]. The defaults are timm's `AttentionPoolLatent` with the
/// LayerNorm SigLIP's heads give it (`norm_layer`; timm's bare default is no norm).
#[derive(Config, Debug)]
pub struct AttentionPoolConfig {
    /// C, the width of the inputs and of the output.
    pub channels: usize,
    /// Attention heads; must divide `channels`. Default: 8.
    #[config(default = 8)]
    pub num_heads: usize,
    /// L, the number of learned latent queries. Default: 1.
    #[config(default = 1)]
    pub latent_len: usize,
    /// The MLP's hidden width is `⌊channels · mlp_ratio⌋`. Default: 4.
    #[config(default = 4.0)]
    pub mlp_ratio: f64,
    /// Biases on the query, key and value projections (timm's `qkv_bias`). Default: true.
    #[config(default = true)]
    pub qkv_bias: bool,
    /// A LayerNorm before the MLP, `y = o + MLP(LN(o))` (SigLIP); `false` gives
    /// `y = o + MLP(o)`, timm's bare default. Default: true.
    #[config(default = true)]
    pub norm: bool,
    /// The LayerNorm's ε. Default: 1e-6 (timm's ViTs and SigLIP).
    #[config(default = 1e-6)]
    pub norm_eps: f64,
    /// The first latent's output or the mean over the latents. Default: the first.
    #[config(default = "AttentionPoolOutput::FirstLatent")]
    pub output: AttentionPoolOutput,
    /// Leading tokens (class token, register tokens) that the token paths skip. Default: 0.
    #[config(default = 0)]
    pub num_prefix_tokens: usize,
}

impl AttentionPoolConfig {
    /// The MLP's hidden width, `⌊channels · mlp_ratio⌋`.
    pub fn hidden(&self) -> usize {
        (self.channels as f64 * self.mlp_ratio) as usize
    }

    /// Creates the [`AttentionPool`] layer on `device`: the latents trunc-normal with standard
    /// deviation C^(−1/2) (cut at ±2σ, as timm's `trunc_normal_tf_`), the linear layers as
    /// PyTorch's `nn.Linear` (uniform in ±1/√fan_in, Burn's default), the LayerNorm at γ = 1,
    /// β = 0.
    ///
    /// # Panics
    ///
    /// If `channels`, `num_heads` or `latent_len` is 0, `num_heads` does not divide `channels`,
    /// `mlp_ratio` is not a finite number > 0 or gives a hidden width of 0, `norm_eps` is not a
    /// finite number > 0, or a parameter would exceed 2³¹ elements.
    pub fn init(&self, device: &Device) -> AttentionPool {
        let name = "AttentionPool";
        checks::at_least_one(name, "channels", self.channels);
        checks::at_least_one(name, "latent_len", self.latent_len);
        check_heads(self.channels, self.num_heads);
        checks::positive(name, "mlp_ratio", self.mlp_ratio);
        checks::positive(name, "norm_eps", self.norm_eps);
        let hidden = self.hidden();
        assert!(
            hidden > 0,
            "AttentionPool: `channels` · `mlp_ratio` must give a hidden width of at least 1, got {} · {} = {hidden}",
            self.channels,
            self.mlp_ratio
        );
        let c = self.channels;
        checks::parameter_size(name, &[("latent_len", self.latent_len), ("channels", c)]);
        checks::parameter_size(name, &[("channels", c), ("channels", c)]);
        checks::parameter_size(name, &[("channels", c), ("hidden", hidden)]);
        let linear = |d_in: usize, d_out: usize, bias: bool| {
            LinearConfig::new(d_in, d_out).with_bias(bias).init(device)
        };
        AttentionPool {
            latent: Param::from_tensor(truncated_normal(
                [self.latent_len, c],
                (c as f64).powf(-0.5),
                device,
            )),
            query: linear(c, c, self.qkv_bias),
            key: linear(c, c, self.qkv_bias),
            value: linear(c, c, self.qkv_bias),
            projection: linear(c, c, true),
            norm: self.norm.then(|| {
                LayerNormConfig::new(c)
                    .with_epsilon(self.norm_eps)
                    .init(device)
            }),
            fc1: linear(c, hidden, true),
            fc2: linear(hidden, c, true),
            num_heads: self.num_heads,
            output: self.output,
            num_prefix_tokens: self.num_prefix_tokens,
        }
    }
}

/// Panics unless `num_heads` ≥ 1 divides `channels`.
fn check_heads(channels: usize, num_heads: usize) {
    checks::at_least_one("AttentionPool", "num_heads", num_heads);
    assert!(
        channels.is_multiple_of(num_heads),
        "AttentionPool: `channels` must be divisible by `num_heads`, got channels = {channels}, num_heads = {num_heads}"
    );
}

/// `N(0, std²)` cut at ±2σ: out-of-range draws are drawn again (8 rounds leave a draw out of
/// range with probability 0.0455⁸ ≈ 2·10⁻¹¹, which is then clamped).
fn truncated_normal(shape: [usize; 2], std: f64, device: &Device) -> Tensor<2> {
    let draw = || Tensor::<2>::random(shape, Distribution::Normal(0.0, 1.0), device);
    let mut values = draw();
    for _ in 0..8 {
        let outside = values.clone().abs().greater_elem(2.0);
        values = values.mask_where(outside, draw());
    }
    values.clamp(-2.0, 2.0).mul_scalar(std)
}

/// Multi-head attention pooling with L learned latent queries (MAP; SigLIP's head, timm's
/// `AttentionPoolLatent`), over the valid positions `x_n` of each sample:
///
/// ```text
/// q_l = W_q ℓ_l + b_q                                  ℓ: [L, C] learned latents
/// k_n = W_k x_n + b_k,   v_n = W_v x_n + b_v            split into H heads of D = C/H
/// a_{h,l,n} = softmax_n( q_{h,l} · k_{h,n} / √D )      over the valid n (padding: −∞)
/// o_l = W_o [Σ_n a_{h,l,n} v_{h,n}]_h + b_o             the heads concatenated
/// y_l = o_l + W_2 GELU(W_1 LN(o_l) + b_1) + b_2         (LN: identity if `norm` is off)
/// y   = y_0  (FirstLatent)   or   (1/L) Σ_l y_l  (MeanLatents)
/// ```
///
/// No key or value tensor of the positions is formed: `q·k_n = (W_kᵀ q)·x_n + q·b_k` and, as
/// the weights sum to 1, `Σ_n a_n v_n = W_v (Σ_n a_n x_n) + b_v`; the per-position cost is
/// O(N·C·H·L) instead of the O(N·C²) of projecting every position (docs/maths.md §11). The
/// values are those of the formula above (exactly, up to rounding). The key bias only adds a
/// constant per head and latent to the logits: it has no effect on y and a zero gradient.
///
/// Padding is selected away (the features set to 0 through a select, the logits to −∞), so
/// NaN or ±∞ there never reaches the output or the gradients. A mask row with no valid token
/// panics by name (timm's layer, given such a mask, returns NaN). Inputs near the float
/// limits overflow the linear projections, as they would any linear layer.
///
/// The parameters map onto timm's: `latent` (timm's `latent[0]`), `query` (`q`), `key` and
/// `value` (the two halves of `kv`: rows `0..C` and `C..2C` of its weight), `projection`
/// (`proj`), `norm`, `fc1` and `fc2` (`mlp.fc1`, `mlp.fc2`); Burn's `Linear` stores the
/// transpose of PyTorch's weight.
///
/// ```rust
/// # use burn::tensor::{Bool, Device, Tensor};
/// # use burn_pooling::{AttentionPoolConfig, PoolingInput};
/// let device = Device::flex();
/// // A ViT's class token + 16 patch tokens of width 64; the class token is skipped.
/// let map = AttentionPoolConfig::new(64).with_num_prefix_tokens(1).init(&device);
/// let tokens = Tensor::<3>::ones([2, 17, 64], &device);
/// let mask = Tensor::<2, Bool>::from_data([[true; 17], [true; 17]], &device);
/// assert_eq!(map.forward(PoolingInput::tokens(tokens).with_mask(mask)).dims(), [2, 64]);
/// ```
///
/// # Shapes
///
/// - input: maps `[B, C, H, W]`, tokens `[B, N, C]`, or a [`PoolingInput`] with a `[B, N]`
///   mask
/// - latent: `[L, C]`; query, key, value, projection: `[C, C]`; fc1: `[C, ⌊C·ratio⌋]`
/// - output: `[B, C]`
#[derive(Module, Debug)]
#[module(custom_display)]
pub struct AttentionPool {
    /// ℓ, the learned latent queries, `[L, C]`.
    pub latent: Param<Tensor<2>>,
    /// W_q, b_q.
    pub query: Linear,
    /// W_k, b_k.
    pub key: Linear,
    /// W_v, b_v.
    pub value: Linear,
    /// W_o, b_o: the output projection of the attention.
    pub projection: Linear,
    /// The LayerNorm before the MLP (`None`: identity).
    pub norm: Option<LayerNorm>,
    /// W_1, b_1: the MLP's first layer.
    pub fc1: Linear,
    /// W_2, b_2: the MLP's second layer.
    pub fc2: Linear,
    /// H, the attention heads.
    pub num_heads: usize,
    /// The first latent's output or the mean over the latents.
    #[module(skip)]
    pub output: AttentionPoolOutput,
    /// Leading tokens skipped by the token paths.
    pub num_prefix_tokens: usize,
}

one_line_display!(AttentionPool, |pool|
    "channels" => pool.channels(),
    "num_heads" => pool.num_heads,
    "latent_len" => pool.latent.dims()[0],
    "output" => format!("{:?}", pool.output),
    "num_prefix_tokens" => pool.num_prefix_tokens,
);

impl AttentionPool {
    /// C, the width of the inputs and of the output.
    pub fn channels(&self) -> usize {
        self.latent.dims()[1]
    }

    /// Pools feature maps `[B, C, H, W]`, a token set `[B, N, C]` (skipping the first
    /// `num_prefix_tokens` tokens) or any [`PoolingInput`] (masked, with its own prefix) into
    /// `[B, C]`.
    ///
    /// # Panics
    ///
    /// If no position is left to pool, the mask's shape does not match, a mask row has no
    /// valid position, the input's C differs from the layer's, `num_heads` was set to a value
    /// that does not divide C, or the parameters are on another device than the input.
    pub fn forward(&self, input: impl Into<PoolingInput>) -> Tensor<2> {
        let positions = input
            .into()
            .resolve("AttentionPool", self.num_prefix_tokens);
        let (_, _, channels) = positions.dims();
        let expected = self.channels();
        assert!(
            channels == expected,
            "AttentionPool: channel mismatch: expected C = {expected} (`channels`, the latents' width), got {channels}"
        );
        check_heads(channels, self.num_heads);
        checks::same_device(
            "AttentionPool",
            [
                ("the input", &positions.features.device()),
                ("the parameters", &self.latent.device()),
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
        let (batch, count, channels) = positions.dims();
        let Positions {
            features,
            layout,
            mask,
        } = positions;
        let heads = self.num_heads;
        let dim = channels / heads;
        let [latents, _] = self.latent.dims();
        let queries = heads * latents;
        let scale = (dim as f64).powf(-0.5);

        // The queries, [H, L, D], and the key projection folded into them: the rows
        // (W_k,h q_{h,l}) / √D of [H·L, C], and the key bias's constant q_{h,l}·b_k,h / √D.
        let q = self
            .query
            .forward(self.latent.val())
            .reshape([latents, heads, dim])
            .swap_dims(0, 1);
        let key_heads = self
            .key
            .weight
            .val()
            .reshape([channels, heads, dim])
            .swap_dims(0, 1);
        let folded = key_heads
            .matmul(q.clone().swap_dims(1, 2))
            .swap_dims(1, 2)
            .reshape([queries, channels])
            .mul_scalar(scale);

        // Logits [B, H·L, N]: one product of the positions with the folded queries.
        let x = channels_last(features, layout);
        let logits = x
            .clone()
            .reshape([batch * count, channels])
            .matmul(folded.transpose())
            .reshape([batch, count, queries])
            .swap_dims(1, 2);
        let logits = match &self.key.bias {
            Some(bias) => {
                let constant = (q * bias.val().reshape([heads, 1, dim]))
                    .sum_dim(2)
                    .reshape([1, queries, 1])
                    .mul_scalar(scale);
                logits + constant
            }
            None => logits,
        };
        let weights = softmax(mask_logits(logits, mask.as_ref()), 2);

        // Σ_n a_n x_n per head and latent, [B, H·L, C], then W_v per head after the sum.
        let pooled = weights.matmul(x);
        let value_heads = self
            .value
            .weight
            .val()
            .reshape([channels, heads, dim])
            .swap_dims(0, 1);
        let attended = pooled
            .reshape([batch, heads, latents, channels])
            .swap_dims(0, 1)
            .reshape([heads, batch * latents, channels])
            .matmul(value_heads)
            .reshape([heads, batch, latents, dim])
            .permute([1, 2, 0, 3])
            .reshape([batch, latents, channels]);
        let attended = match &self.value.bias {
            Some(bias) => attended + bias.val().reshape([1, 1, channels]),
            None => attended,
        };

        let o = self.projection.forward(attended);
        let normed = match &self.norm {
            Some(norm) => norm.forward(o.clone()),
            None => o.clone(),
        };
        let y = o + self.fc2.forward(gelu(self.fc1.forward(normed)));
        match self.output {
            AttentionPoolOutput::FirstLatent => y
                .slice([0..batch, 0..1, 0..channels])
                .reshape([batch, channels]),
            AttentionPoolOutput::MeanLatents => y.mean_dim(1).reshape([batch, channels]),
        }
    }
}

/// The exact GELU, `x Φ(x) = x (1 + erf(x/√2)) / 2`, from `erf`, whose backward is the exact
/// `(2/√π) e^(−u²)` on every backend. Burn's `gelu` has an approximate backward on NdArray and
/// wgpu (|Δ GELU'| up to 8.7·10⁻⁴ at x = −2 in f32, where Flex's is within 10⁻⁷), which showed
/// as a 3·10⁻⁴ relative disagreement of the MLP's gradients between backends.
fn gelu(x: Tensor<3>) -> Tensor<3> {
    let half = x.clone().mul_scalar(0.5);
    half.clone() + half * x.mul_scalar(std::f64::consts::FRAC_1_SQRT_2).erf()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latents_are_truncated_at_two_sigma() {
        let device = Device::flex();
        let pool = AttentionPoolConfig::new(64)
            .with_latent_len(16)
            .init(&device);
        let values = pool
            .latent
            .val()
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .unwrap();
        let std = 64f32.powf(-0.5);
        assert!(values.iter().all(|v| v.abs() <= 2.0 * std + 1e-6));
        let spread = (values.iter().map(|v| v * v).sum::<f32>() / values.len() as f32).sqrt();
        // A normal cut at ±2σ has standard deviation 0.88σ.
        assert!((spread / std - 0.88).abs() < 0.1, "{spread} vs {std}");
    }

    #[test]
    #[should_panic(
        expected = "AttentionPool: `channels` must be divisible by `num_heads`, got channels = 12, num_heads = 8"
    )]
    fn heads_must_divide_the_channels() {
        AttentionPoolConfig::new(12).init(&Device::flex());
    }

    #[test]
    #[should_panic(expected = "AttentionPool: `num_heads` must be at least 1, got 0")]
    fn heads_set_to_zero_after_init_panic() {
        let device = Device::flex();
        let mut pool = AttentionPoolConfig::new(8).init(&device);
        pool.num_heads = 0;
        pool.forward(Tensor::<3>::ones([1, 2, 8], &device));
    }

    #[test]
    #[should_panic(
        expected = "AttentionPool: channel mismatch: expected C = 8 (`channels`, the latents' width), got 6"
    )]
    fn channel_mismatch_panics() {
        let device = Device::flex();
        let pool = AttentionPoolConfig::new(8).init(&device);
        pool.forward(Tensor::<3>::ones([1, 2, 6], &device));
    }

    #[test]
    fn display_and_json() {
        let device = Device::flex();
        let config = AttentionPoolConfig::new(16)
            .with_num_heads(4)
            .with_latent_len(2)
            .with_output(AttentionPoolOutput::MeanLatents);
        let pool = config.init(&device);
        let hidden = 64;
        let linear = 16 * 16 + 16;
        let expected = 2 * 16 + 4 * linear + 2 * 16 + (16 * hidden + hidden) + (hidden * 16 + 16);
        assert_eq!(pool.num_params(), expected);
        assert!(
            format!("{pool}").starts_with("AttentionPool {channels: 16, num_heads: 4"),
            "{pool}"
        );
        let loaded = AttentionPoolConfig::load_binary(config.to_string().as_bytes()).unwrap();
        assert_eq!(loaded.output, AttentionPoolOutput::MeanLatents);
        assert_eq!(loaded.latent_len, 2);
        let y = pool.forward(Tensor::<4>::ones([3, 16, 2, 2], &device));
        assert_eq!(y.dims(), [3, 16]);
    }
}
