//! The token modes of sentence-transformers' `Pooling` (cls, last token, mean, max, mean over
//! √length, the SGPT weighted mean), masked, concatenated in the order they are listed
//! (docs/maths.md §9).

use burn::config::Config;
use burn::module::Module;
use burn::tensor::{Bool, Int, Tensor};

use crate::display::one_line_display;
use crate::layout::Layout;
use crate::pooling::input::{PoolingInput, Positions};

/// One reduction of [`TokenPooling`]. Each gives a `[B, C]` block.
#[derive(Config, Copy, Debug, PartialEq, Eq)]
pub enum TokenMode {
    /// The first valid token of the whole sequence, prefix tokens included: the class token
    /// of a ViT or BERT (`num_prefix_tokens` is not skipped here), the first real token under
    /// left padding (sentence-transformers returns the pad embedding there).
    Cls,
    /// The last valid token after the prefix, whatever the padding side (decoder LLMs).
    Last,
    /// The mean of the valid tokens after the prefix, `Σ_n m_n x_n / Σ_n m_n`.
    Mean,
    /// The channel-wise maximum of the valid tokens after the prefix.
    Max,
    /// `Σ_n m_n x_n / √(Σ_n m_n)`: the mean times √L (sentence-transformers'
    /// `mean_sqrt_len_tokens`).
    MeanSqrtLen,
    /// SGPT's position-weighted mean: the l-th valid token after the prefix (l = 1..L, in
    /// order) has weight `l / (L(L+1)/2)`.
    WeightedMean,
}

impl TokenMode {
    /// Every mode, in declaration order.
    pub const ALL: [TokenMode; 6] = [
        Self::Cls,
        Self::Last,
        Self::Mean,
        Self::Max,
        Self::MeanSqrtLen,
        Self::WeightedMean,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::Cls => "Cls",
            Self::Last => "Last",
            Self::Mean => "Mean",
            Self::Max => "Max",
            Self::MeanSqrtLen => "MeanSqrtLen",
            Self::WeightedMean => "WeightedMean",
        }
    }
}

/// Configuration of [`TokenPooling`]: the modes, in the order of the output blocks.
#[derive(Config, Debug)]
pub struct TokenPoolingConfig {
    /// The modes, each once; the output is their `[B, C]` blocks concatenated in this order.
    pub modes: Vec<TokenMode>,
    /// Leading tokens (class token, register tokens) that every mode but
    /// [`TokenMode::Cls`] skips. Default: 0.
    #[config(default = 0)]
    pub num_prefix_tokens: usize,
}

impl TokenPoolingConfig {
    /// Creates the [`TokenPooling`] layer.
    ///
    /// # Panics
    ///
    /// If `modes` is empty or lists a mode twice.
    pub fn init(&self) -> TokenPooling {
        assert!(
            !self.modes.is_empty(),
            "TokenPooling: `modes` must list at least one mode, got []"
        );
        for (i, mode) in self.modes.iter().enumerate() {
            assert!(
                !self.modes[..i].contains(mode),
                "TokenPooling: `modes` must list each mode once, got {mode:?} twice in {:?}",
                self.modes
            );
        }
        TokenPooling {
            modes: self.modes.clone(),
            num_prefix_tokens: self.num_prefix_tokens,
        }
    }

    /// The output width for inputs of `channels` channels: `modes.len() · channels`.
    pub fn output_channels(&self, channels: usize) -> usize {
        self.modes.len() * channels
    }
}

/// The token modes of sentence-transformers, masked, concatenated:
///
/// ```text
/// Cls:           y = x_{first valid n}           (prefix included)
/// Last:          y = x_{last valid n}
/// Mean:          y = Σ_n m_n x_n / L                        L = Σ_n m_n
/// Max:           y_c = max_{n valid} x_{n,c}
/// MeanSqrtLen:   y = Σ_n m_n x_n / √L
/// WeightedMean:  y = Σ_n m_n l_n x_n / (L(L+1)/2)           l_n = Σ_{j ≤ n} m_j
/// ```
///
/// with `m` the validity mask after the prefix (all ones without a mask). The output is the
/// blocks of `modes` in their listed order: `[y_{modes[0]}, y_{modes[1]}, ...]`.
///
/// Every mode but `Cls` pools after the first `num_prefix_tokens` tokens; `Cls` reads the first
/// valid token of the whole sequence, which is the class token when there is one (prefix
/// tokens are the leading positions, so use them with right padding; under left padding set
/// `num_prefix_tokens = 0`: `Cls` then still finds the first real token). On maps, `Cls` and
/// `Last` take the first and last valid cell in row-major order.
///
/// Padding is selected away (never multiplied by 0): NaN or ±∞ there never reaches the output
/// or the gradients. The sums divide each term by L (or the weight total) before adding, so
/// values near the float limits do not overflow in the means.
///
/// # Shapes
///
/// - input: maps `[B, C, H, W]`, tokens `[B, N, C]`, or a [`PoolingInput`] with a `[B, N]`
///   mask
/// - output: `[B, modes.len() · C]`
#[derive(Module, Debug)]
#[module(custom_display)]
pub struct TokenPooling {
    /// The modes, in output order.
    #[module(skip)]
    pub modes: Vec<TokenMode>,
    /// Leading tokens skipped by every mode but `Cls`.
    pub num_prefix_tokens: usize,
}

one_line_display!(TokenPooling, |pool|
    "modes" => pool.modes.iter().map(|m| m.name()).collect::<Vec<_>>().join("+"),
    "num_prefix_tokens" => pool.num_prefix_tokens,
);

impl TokenPooling {
    /// The output width for inputs of `channels` channels: `modes.len() · channels`.
    pub fn output_channels(&self, channels: usize) -> usize {
        self.modes.len() * channels
    }

    /// Pools feature maps `[B, C, H, W]`, a token set `[B, N, C]` or any [`PoolingInput`]
    /// (masked, with its own prefix) into `[B, modes.len() · C]`.
    ///
    /// # Panics
    ///
    /// If no position is left to pool after the prefix, the mask's shape does not match, or a
    /// mask row has no valid position after the prefix.
    pub fn forward(&self, input: impl Into<PoolingInput>) -> Tensor<2> {
        let input = input.into();
        let whole = (self.modes.contains(&TokenMode::Cls)).then(|| {
            if input.layout().is_channels_last() {
                input.clone().with_prefix_tokens(0)
            } else {
                input.clone()
            }
        });
        let positions = input.resolve("TokenPooling", self.num_prefix_tokens);
        if positions.is_empty() {
            // An empty `[0, modes·C]` that a backward still reaches.
            return positions.empty().repeat_dim(1, self.modes.len());
        }
        let whole = whole.map(|whole| whole.resolve("TokenPooling", 0));
        let blocks = self
            .modes
            .iter()
            .map(|mode| match mode {
                TokenMode::Cls => pick(whole.clone().expect("resolved for Cls"), true),
                TokenMode::Last => pick(positions.clone(), false),
                TokenMode::Max => positions.clone().max(),
                TokenMode::Mean => weighted(&positions, Weights::Mean),
                TokenMode::MeanSqrtLen => weighted(&positions, Weights::MeanSqrtLen),
                TokenMode::WeightedMean => weighted(&positions, Weights::Rank),
            })
            .collect::<Vec<_>>();
        Tensor::cat(blocks, 1)
    }

    /// [`forward`](Self::forward) for a token set `[B, N, C]`, spelled out.
    pub fn forward_tokens(&self, tokens: Tensor<3>) -> Tensor<2> {
        self.forward(tokens)
    }
}

/// The first (`first`) or last valid position of each sample, `[B, C]`, by a gather: the
/// other positions get no gradient and their values are never read.
fn pick(positions: Positions, first: bool) -> Tensor<2> {
    let (batch, count, channels) = positions.dims();
    let device = positions.features.device();
    let index: Tensor<2, Int> = match &positions.mask {
        Some(mask) => {
            let order = Tensor::<1, Int>::arange(0..count as i64, &device)
                .unsqueeze::<2>()
                .expand([batch, count]);
            let padding = mask.clone().bool_not();
            if first {
                order.mask_fill(padding, count as i64).min_dim(1)
            } else {
                order.mask_fill(padding, -1).max_dim(1)
            }
        }
        None => {
            let at = if first { 0 } else { count as i64 - 1 };
            Tensor::<2, Int>::full([batch, 1], at, &device)
        }
    };
    let index = index.unsqueeze_dim::<3>(2);
    match positions.layout {
        Layout::ChannelsLast => positions
            .features
            .gather(1, index.expand([batch, 1, channels]))
            .reshape([batch, channels]),
        Layout::ChannelsFirst => positions
            .features
            .gather(2, index.reshape([batch, 1, 1]).expand([batch, channels, 1]))
            .reshape([batch, channels]),
    }
}

/// The linear modes' weights over the positions.
#[derive(Clone, Copy)]
enum Weights {
    /// 1/L.
    Mean,
    /// 1/√L.
    MeanSqrtLen,
    /// l / (L(L+1)/2), l the rank of the valid position.
    Rank,
}

/// Σ_n w_n x_n over the valid positions, `[B, C]`, with padding selected to 0 first.
fn weighted(positions: &Positions, weights: Weights) -> Tensor<2> {
    let (batch, count, channels) = positions.dims();
    let device = positions.features.device();
    let layout = positions.layout;
    let valid: Tensor<2> = match &positions.mask {
        Some(mask) => mask.clone().float(),
        None => Tensor::ones([batch, count], &device),
    };
    let length = valid.clone().sum_dim(1);
    let w = match weights {
        Weights::Mean => valid / length,
        Weights::MeanSqrtLen => valid / length.sqrt(),
        Weights::Rank => {
            let rank = valid.clone().cumsum(1) * valid;
            let total = length.clone() * (length + 1.0) / 2.0;
            rank / total
        }
    };
    let w = w.unsqueeze_dim::<3>(layout.channel_axis());
    let x = match &positions.mask {
        Some(mask) => {
            let padding: Tensor<3, Bool> = mask
                .clone()
                .bool_not()
                .unsqueeze_dim::<3>(layout.channel_axis())
                .expand(positions.features.dims());
            positions.features.clone().mask_fill(padding, 0.0)
        }
        None => positions.features.clone(),
    };
    let axis = layout.position_axis();
    (x * w).sum_dim(axis).reshape([batch, channels])
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData, Tolerance};

    fn all_modes() -> Vec<TokenMode> {
        TokenMode::ALL.to_vec()
    }

    /// One channel, tokens [p, 1, 2, 4, pad] with a prefix p = 9 and NaN padding.
    #[test]
    fn every_mode_on_a_small_example() {
        let device = Device::flex();
        let x = Tensor::<3>::from_floats([[[9.0], [1.0], [2.0], [4.0], [f32::NAN]]], &device);
        let mask = Tensor::<2, Bool>::from_bool(
            TensorData::from([[true, true, true, true, false]]),
            &device,
        );
        let pool = TokenPoolingConfig::new(all_modes())
            .with_num_prefix_tokens(1)
            .init();
        let y = pool.forward(PoolingInput::tokens(x).with_mask(mask));
        let mean = 7.0f32 / 3.0;
        let expected = [
            9.0,
            4.0,
            mean,
            4.0,
            7.0 / 3f32.sqrt(),
            (1.0 + 2.0 * 2.0 + 3.0 * 4.0) / 6.0,
        ];
        y.into_data()
            .assert_approx_eq::<f32>(&TensorData::from([expected]), Tolerance::default());
    }

    #[test]
    #[should_panic(expected = "TokenPooling: `modes` must list at least one mode, got []")]
    fn empty_modes_panic() {
        TokenPoolingConfig::new(vec![]).init();
    }

    #[test]
    #[should_panic(expected = "TokenPooling: `modes` must list each mode once, got Mean twice")]
    fn repeated_mode_panics() {
        TokenPoolingConfig::new(vec![TokenMode::Mean, TokenMode::Cls, TokenMode::Mean]).init();
    }

    #[test]
    fn display_and_json() {
        let config = TokenPoolingConfig::new(vec![TokenMode::Cls, TokenMode::WeightedMean]);
        let pool = config.init();
        assert_eq!(pool.num_params(), 0);
        assert_eq!(
            format!("{pool}"),
            "TokenPooling {modes: Cls+WeightedMean, num_prefix_tokens: 0}"
        );
        let loaded = TokenPoolingConfig::load_binary(config.to_string().as_bytes()).unwrap();
        assert_eq!(loaded.modes, config.modes);
        assert_eq!(loaded.output_channels(5), 10);
    }
}
