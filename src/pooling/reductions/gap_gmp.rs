//! GAP + GMP: the mean and the maximum of the same positions, summed or concatenated.

use burn::config::Config;
use burn::module::Module;
use burn::tensor::Tensor;

use crate::display::one_line_display;
use crate::pooling::input::PoolingInput;

/// How [`GapGmp`] combines the mean and the maximum. Default: the sum.
#[derive(Config, Copy, Debug, PartialEq, Eq)]
pub enum GapGmpCombine {
    /// `y = GAP(x) + GMP(x)`, `[B, C]`: the usual head of metric-learning baselines (e.g.
    /// Proxy-Anchor, Kim et al., CVPR 2020). timm's `avgmax` is half of it.
    Sum,
    /// `y = [GAP(x), GMP(x)]`, `[B, 2C]`: the C means, then the C maxima (timm's
    /// `catavgmax`). Doubles the channels the next layer sees.
    Concat,
}

/// Configuration of [`GapGmp`].
#[derive(Config, Debug)]
pub struct GapGmpConfig {
    /// Sum or concatenation. Default: the sum.
    #[config(default = "GapGmpCombine::Sum")]
    pub combine: GapGmpCombine,
    /// Leading tokens (class token, register tokens) that the token paths skip. Default: 0.
    #[config(default = 0)]
    pub num_prefix_tokens: usize,
}

impl GapGmpConfig {
    /// Creates the [`GapGmp`] layer.
    pub fn init(&self) -> GapGmp {
        GapGmp {
            combine: self.combine,
            num_prefix_tokens: self.num_prefix_tokens,
        }
    }
}

/// Global average and max pooling of the same positions, combined:
///
/// ```text
/// sum:     y_c = (1/N) Σ_n x_{n,c} + max_n x_{n,c}                  c = 1..C
/// concat:  y   = [ (1/N) Σ_n x_{n,1..C} ,  max_n x_{n,1..C} ]        2C channels
/// ```
///
/// Both halves see the same valid positions (the mask and the prefix apply to both), so this
/// is exactly [`Gap`](crate::pooling::Gap) and [`Gmp`](crate::pooling::Gmp) of the same input, summed or
/// concatenated.
///
/// # Shapes
///
/// - input: maps `[B, C, H, W]`, tokens `[B, N, C]`, or a [`PoolingInput`] with a `[B, N]`
///   mask
/// - output: `[B, C]` for [`GapGmpCombine::Sum`], `[B, 2C]` for [`GapGmpCombine::Concat`]
///   (see [`output_channels`](Self::output_channels))
#[derive(Module, Debug)]
#[module(custom_display)]
pub struct GapGmp {
    /// Sum or concatenation.
    #[module(skip)]
    pub combine: GapGmpCombine,
    /// Leading tokens skipped by the token paths.
    pub num_prefix_tokens: usize,
}

one_line_display!(GapGmp, |pool|
    "combine" => format!("{:?}", pool.combine),
    "num_prefix_tokens" => pool.num_prefix_tokens,
);

impl GapGmp {
    /// Pools feature maps `[B, C, H, W]`, a token set `[B, N, C]` (skipping the first
    /// `num_prefix_tokens` tokens) or any [`PoolingInput`] (masked, with its own prefix) into
    /// `[B, C]` (sum) or `[B, 2C]` (concatenation). An empty batch (B = 0) gives an empty
    /// `[0, C]` or `[0, 2C]`.
    ///
    /// # Panics
    ///
    /// If no position is left to pool (N, H or W is 0, or N ≤ the prefix), C = 0, the mask's
    /// shape or device does not match, or a mask row has no valid position.
    pub fn forward(&self, input: impl Into<PoolingInput>) -> Tensor<2> {
        let positions = input.into().resolve("GapGmp", self.num_prefix_tokens);
        if positions.is_empty() {
            let empty = positions.empty();
            return match self.combine {
                GapGmpCombine::Sum => empty,
                // Not `cat`, whose backward fails on empty tensors (Flex).
                GapGmpCombine::Concat => empty.repeat_dim(1, 2),
            };
        }
        let (mean, max) = (positions.clone().mean(), positions.max());
        match self.combine {
            GapGmpCombine::Sum => mean + max,
            GapGmpCombine::Concat => Tensor::cat(vec![mean, max], 1),
        }
    }

    /// [`forward`](Self::forward) for a token set `[B, N, C]`, spelled out.
    pub fn forward_tokens(&self, tokens: Tensor<3>) -> Tensor<2> {
        self.forward(tokens)
    }

    /// The width of the output for inputs of `channels` channels: C for the sum, 2C for the
    /// concatenation.
    pub fn output_channels(&self, channels: usize) -> usize {
        match self.combine {
            GapGmpCombine::Sum => channels,
            GapGmpCombine::Concat => 2 * channels,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Bool, Device, TensorData, Tolerance};

    /// Two masked token sets `[2, 3, 2]`; the padding holds the largest values.
    fn masked_input(device: &Device) -> PoolingInput {
        let tokens = Tensor::<3>::from_floats(
            [
                [[1.0, -10.0], [3.0, -20.0], [100.0, 100.0]],
                [[-5.0, -7.0], [50.0, 50.0], [-6.0, -2.0]],
            ],
            device,
        );
        let mask = Tensor::<2, Bool>::from_bool(
            TensorData::from([[true, true, false], [true, false, true]]),
            device,
        );
        PoolingInput::tokens(tokens).with_mask(mask)
    }

    #[test]
    fn sum_and_concatenation_of_masked_mean_and_max() {
        let device = Device::flex();
        // Means of the valid positions: [2, -15], [-5.5, -4.5]; maxima: [3, -10], [-5, -2].
        let sum = GapGmpConfig::new().init().forward(masked_input(&device));
        sum.into_data().assert_approx_eq::<f32>(
            &TensorData::from([[5.0f32, -25.0], [-10.5, -6.5]]),
            Tolerance::default(),
        );
        let concat = GapGmpConfig::new()
            .with_combine(GapGmpCombine::Concat)
            .init();
        assert_eq!(concat.output_channels(2), 4);
        concat
            .forward(masked_input(&device))
            .into_data()
            .assert_approx_eq::<f32>(
                &TensorData::from([[2.0f32, -15.0, 3.0, -10.0], [-5.5, -4.5, -5.0, -2.0]]),
                Tolerance::default(),
            );
    }

    #[test]
    fn maps_and_prefix_tokens() {
        let device = Device::flex();
        // [B=1, C=2, H=2, W=2]
        let maps = Tensor::<4>::from_floats(
            [[[[1.0, 2.0], [3.0, 6.0]], [[0.0, -4.0], [2.0, 2.0]]]],
            &device,
        );
        GapGmpConfig::new()
            .init()
            .forward(maps.clone())
            .into_data()
            .assert_approx_eq::<f32>(&TensorData::from([[9.0f32, 2.0]]), Tolerance::default());
        // As tokens with the first one a prefix: positions 2, 3, 6 and -4, 2, 2.
        let tokens = maps.reshape([1, 2, 4]).swap_dims(1, 2);
        GapGmpConfig::new()
            .with_num_prefix_tokens(1)
            .init()
            .forward_tokens(tokens)
            .into_data()
            .assert_approx_eq::<f32>(
                &TensorData::from([[11.0f32 / 3.0 + 6.0, 2.0]]),
                Tolerance::default(),
            );
    }

    #[test]
    #[should_panic(expected = "GapGmp: mask shape mismatch: expected [B, N] = [1, 3], got [1, 2]")]
    fn mask_of_wrong_shape_panics() {
        let device = Device::flex();
        let mask = Tensor::<2, Bool>::from_bool(TensorData::from([[true, true]]), &device);
        let input = PoolingInput::tokens(Tensor::ones([1, 3, 2], &device)).with_mask(mask);
        GapGmpConfig::new().init().forward(input);
    }

    #[test]
    fn display_and_json() {
        let pool = GapGmpConfig::new()
            .with_combine(GapGmpCombine::Concat)
            .init();
        assert_eq!(pool.num_params(), 0);
        assert_eq!(
            format!("{pool}"),
            "GapGmp {combine: Concat, num_prefix_tokens: 0}"
        );
        let json = GapGmpConfig::new()
            .with_combine(GapGmpCombine::Concat)
            .to_string();
        let loaded = GapGmpConfig::load_binary(json.as_bytes()).unwrap();
        assert_eq!(loaded.combine, GapGmpCombine::Concat);
    }
}
