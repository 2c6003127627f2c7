//! Global max pooling (GMP, "MAC" in image retrieval): the other parameter-free baseline.

use burn::config::Config;
use burn::module::Module;
use burn::tensor::Tensor;

use crate::display::one_line_display;
use crate::pooling::input::PoolingInput;

/// Configuration of [`Gmp`]: only the prefix to skip, the maximum has no parameter.
#[derive(Config, Debug)]
pub struct GmpConfig {
    /// Class or register tokens at the start of a token set, never pooled. Default: 0.
    #[config(default = 0)]
    pub num_prefix_tokens: usize,
}

impl GmpConfig {
    /// Creates the [`Gmp`] layer.
    pub fn init(&self) -> Gmp {
        Gmp {
            num_prefix_tokens: self.num_prefix_tokens,
        }
    }
}

/// Global max pooling: `y_c = max_n x_{n,c}`.
///
/// The channel-wise maximum over the N = H·W positions of a map or the N tokens of a set (over
/// the valid ones only, when masked: padding never wins, whatever its values). Called MAC
/// (maximum activations of convolutions) in image retrieval (Tolias, Sicre, Jégou, ICLR 2016);
/// it is the p → ∞ limit of [`Gem`](crate::pooling::Gem).
///
/// The gradient of each output channel goes to its winning position only (the first one on
/// ties, as the backend's `max_dim` picks it); every other position, padding included, gets 0.
///
/// A NaN at a valid position makes its channel's output NaN (Burn's `max_dim` propagates it on
/// Flex, NdArray and Cube wherever it sits in the row); NaN or ∞ in padding never reaches the
/// output.
///
/// # Shapes
///
/// - input: maps `[B, C, H, W]`, tokens `[B, N, C]`, or a [`PoolingInput`] with a `[B, N]`
///   mask
/// - output: `[B, C]`
#[derive(Module, Debug, Default)]
#[module(custom_display)]
pub struct Gmp {
    /// Class or register tokens at the start of a token set, never pooled.
    pub num_prefix_tokens: usize,
}

one_line_display!(Gmp, |gmp| "num_prefix_tokens" => gmp.num_prefix_tokens);

impl Gmp {
    /// The channel maxima `[B, C]` of feature maps `[B, C, H, W]`, of a token set `[B, N, C]`
    /// after its first `num_prefix_tokens` tokens, or of a [`PoolingInput`] (its mask's valid
    /// positions only, its own prefix count if it sets one). An empty batch (B = 0) gives an
    /// empty `[0, C]`.
    ///
    /// # Panics
    ///
    /// With the layer's name, if no position is left to pool (N, H or W is 0, or N ≤ the
    /// prefix), C = 0, the mask is not `[B, N]` or not on the input's device, or a mask row
    /// has no valid position (an all-padding row has no maximum).
    pub fn forward(&self, input: impl Into<PoolingInput>) -> Tensor<2> {
        let positions = input.into().resolve("Gmp", self.num_prefix_tokens);
        if positions.is_empty() {
            return positions.empty();
        }
        positions.max()
    }

    /// [`forward`](Self::forward) for a token set `[B, N, C]`, spelled out.
    pub fn forward_tokens(&self, tokens: Tensor<3>) -> Tensor<2> {
        self.forward(tokens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Bool, Device, TensorData, Tolerance};

    #[test]
    fn maps_and_tokens_take_the_channel_maximum() {
        let device = Device::flex();
        let gmp = GmpConfig::new().init();
        // [B=1, C=2, H=1, W=3]
        let maps = Tensor::<4>::from_floats([[[[1.0, 2.0, 6.0]], [[0.0, -3.0, -1.0]]]], &device);
        let expected = TensorData::from([[6.0f32, 0.0]]);
        gmp.forward(maps.clone())
            .into_data()
            .assert_approx_eq::<f32>(&expected, Tolerance::default());
        let tokens = maps.reshape([1, 2, 3]).swap_dims(1, 2);
        gmp.forward_tokens(tokens)
            .into_data()
            .assert_approx_eq::<f32>(&expected, Tolerance::default());
    }

    /// Padding holds the largest values and still never wins; an all-negative valid row stays
    /// negative (no −∞, no 0 from the fill).
    #[test]
    fn masked_positions_never_win() {
        let device = Device::flex();
        let tokens = Tensor::<3>::from_floats(
            [
                [[1.0, -10.0], [3.0, -20.0], [100.0, 100.0]],
                [[-5.0, -7.0], [50.0, 50.0], [-6.0, -2.0]],
            ],
            &device,
        );
        let mask = Tensor::<2, Bool>::from_bool(
            TensorData::from([[true, true, false], [true, false, true]]),
            &device,
        );
        let pooled = GmpConfig::new()
            .init()
            .forward(PoolingInput::tokens(tokens.clone()).with_mask(mask.clone()));
        pooled.into_data().assert_approx_eq::<f32>(
            &TensorData::from([[3.0f32, -10.0], [-5.0, -2.0]]),
            Tolerance::default(),
        );
        // The same with maps: [B, C, H·W] with the mask over H·W.
        let maps = tokens.swap_dims(1, 2).reshape([2, 2, 1, 3]);
        GmpConfig::new()
            .init()
            .forward(PoolingInput::maps(maps).with_mask(mask))
            .into_data()
            .assert_approx_eq::<f32>(
                &TensorData::from([[3.0f32, -10.0], [-5.0, -2.0]]),
                Tolerance::default(),
            );
    }

    #[test]
    fn prefix_tokens_are_skipped() {
        let device = Device::flex();
        let tokens = Tensor::<3>::from_floats([[[9.0, 9.0], [1.0, 2.0], [0.5, 4.0]]], &device);
        let gmp = GmpConfig::new().with_num_prefix_tokens(1).init();
        gmp.forward_tokens(tokens.clone())
            .into_data()
            .assert_approx_eq::<f32>(&TensorData::from([[1.0f32, 4.0]]), Tolerance::default());
        // The input's own prefix overrides the layer's.
        gmp.forward(PoolingInput::tokens(tokens).with_prefix_tokens(0))
            .into_data()
            .assert_approx_eq::<f32>(&TensorData::from([[9.0f32, 9.0]]), Tolerance::default());
    }

    #[test]
    #[should_panic(
        expected = "Gmp: every mask row needs at least one valid position (true), got rows [0] with none"
    )]
    fn empty_mask_row_panics() {
        let device = Device::flex();
        let mask = Tensor::<2, Bool>::from_bool(
            TensorData::from([[false, false], [true, false]]),
            &device,
        );
        let input = PoolingInput::tokens(Tensor::ones([2, 2, 3], &device)).with_mask(mask);
        GmpConfig::new().init().forward(input);
    }

    #[test]
    #[should_panic(
        expected = "Gmp: no token left to pool: expected N > num_prefix_tokens, got N = 1, num_prefix_tokens = 1"
    )]
    fn only_prefix_tokens_panic() {
        let device = Device::flex();
        GmpConfig::new()
            .with_num_prefix_tokens(1)
            .init()
            .forward_tokens(Tensor::<3>::ones([1, 1, 3], &device));
    }

    #[test]
    fn display_and_json() {
        let gmp = GmpConfig::new().init();
        assert_eq!(gmp.num_params(), 0);
        assert_eq!(format!("{gmp}"), "Gmp {num_prefix_tokens: 0}");
        let json = GmpConfig::new().with_num_prefix_tokens(2).to_string();
        let loaded = GmpConfig::load_binary(json.as_bytes()).unwrap();
        assert_eq!(loaded.num_prefix_tokens, 2);
    }
}
