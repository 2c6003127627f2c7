//! Global average pooling, the baseline every other layer here generalises.

use burn::config::Config;
use burn::module::Module;
use burn::tensor::Tensor;

use crate::display::one_line_display;
use crate::pooling::input::PoolingInput;

/// Configuration of [`Gap`].
#[derive(Config, Debug)]
pub struct GapConfig {
    /// Leading tokens (class token, register tokens) that the token paths skip. Default: 0.
    #[config(default = 0)]
    pub num_prefix_tokens: usize,
}

impl GapConfig {
    /// Creates the [`Gap`] layer.
    pub fn init(&self) -> Gap {
        Gap {
            num_prefix_tokens: self.num_prefix_tokens,
        }
    }
}

/// Global average pooling: `y_c = (1/N) Σ_n x_{n,c}`.
///
/// The mean over the N = H·W positions of a map or the N tokens of a set (over the valid ones
/// only, when masked: padding is selected away, so whatever it holds, NaN included, reaches
/// neither the output nor a gradient). [`Gem`](crate::pooling::Gem) with p = 1 and [`Gsp`](crate::pooling::Gsp) with
/// `transport_ratio = 1` reduce to it.
#[derive(Module, Debug, Default)]
#[module(custom_display)]
pub struct Gap {
    /// Leading tokens skipped by the token paths.
    pub num_prefix_tokens: usize,
}

one_line_display!(Gap, |gap| "num_prefix_tokens" => gap.num_prefix_tokens);

impl Gap {
    /// Pools feature maps `[B, C, H, W]`, a token set `[B, N, C]` (skipping the first
    /// `num_prefix_tokens` tokens) or any [`PoolingInput`] (masked, with its own prefix) into
    /// `[B, C]`. An empty batch (B = 0) gives an empty `[0, C]`.
    ///
    /// # Panics
    ///
    /// If no position is left to pool (N, H or W is 0, or N ≤ the prefix), C = 0, the mask's
    /// shape or device does not match, or a mask row has no valid position.
    pub fn forward(&self, input: impl Into<PoolingInput>) -> Tensor<2> {
        let positions = input.into().resolve("Gap", self.num_prefix_tokens);
        if positions.is_empty() {
            return positions.empty();
        }
        positions.mean()
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
    fn maps_and_tokens_average_positions() {
        let device = Device::flex();
        let gap = GapConfig::new().init();
        // [B=1, C=2, H=1, W=3]
        let maps = Tensor::<4>::from_floats([[[[1.0, 2.0, 6.0]], [[0.0, -3.0, 3.0]]]], &device);
        let expected = TensorData::from([[3.0f32, 0.0]]);
        gap.forward(maps.clone())
            .into_data()
            .assert_approx_eq::<f32>(&expected, Tolerance::default());
        let tokens = maps.reshape([1, 2, 3]).swap_dims(1, 2);
        gap.forward_tokens(tokens)
            .into_data()
            .assert_approx_eq::<f32>(&expected, Tolerance::default());
    }

    #[test]
    fn masked_tokens_average_valid_positions_only() {
        let device = Device::flex();
        let tokens =
            Tensor::<3>::from_floats([[[1.0, 10.0], [3.0, 20.0], [100.0, 100.0]]], &device);
        let mask = Tensor::<2, Bool>::from_bool(TensorData::from([[true, true, false]]), &device);
        GapConfig::new()
            .init()
            .forward(PoolingInput::tokens(tokens).with_mask(mask))
            .into_data()
            .assert_approx_eq::<f32>(&TensorData::from([[2.0f32, 15.0]]), Tolerance::default());
    }

    #[test]
    #[should_panic(expected = "Gap: mask shape mismatch: expected [B, N] = [1, 3], got [1, 2]")]
    fn mask_of_wrong_shape_panics() {
        pool_masked([1, 3, 2], TensorData::from([[true, true]]));
    }

    /// GAP of ones `[B, N, C]` with a mask of the given values.
    fn pool_masked(dims: [usize; 3], mask: TensorData) -> Tensor<2> {
        let device = Device::flex();
        let mask = Tensor::<2, Bool>::from_bool(mask, &device);
        let input = PoolingInput::tokens(Tensor::ones(dims, &device)).with_mask(mask);
        GapConfig::new().init().forward(input)
    }

    #[test]
    #[should_panic(
        expected = "Gap: every mask row needs at least one valid position (true), got rows [1] with none"
    )]
    fn empty_mask_row_panics() {
        pool_masked([2, 2, 2], TensorData::from([[true, false], [false, false]]));
    }

    #[test]
    #[should_panic(
        expected = "Gap: the input map has no positions to pool: expected H·W > 0, got H = 0, W = 4"
    )]
    fn empty_map_panics() {
        let device = Device::flex();
        GapConfig::new()
            .init()
            .forward(Tensor::<4>::zeros([1, 2, 0, 4], &device));
    }

    #[test]
    fn display_and_json() {
        let gap = GapConfig::new().init();
        assert_eq!(gap.num_params(), 0);
        let shown = format!("{gap}");
        assert!(
            shown.starts_with("Gap") && shown.contains("num_prefix_tokens: 0"),
            "{shown}"
        );
        let json = GapConfig::new().to_string();
        assert!(GapConfig::load_binary(json.as_bytes()).is_ok());
    }
}
