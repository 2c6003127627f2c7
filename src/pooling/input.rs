//! What a global pooling layer reduces over: the one input type of every layer.
//!
//! Every layer accepts the two layouts of Burn models, CNN feature maps `[B, C, H, W]` and token
//! sets `[B, N, C]`, optionally with prefix tokens to skip and a validity mask. A
//! [`PoolingInput`] says which; each layer resolves it into [`Positions`] (with the checks and
//! their panic messages in one place) and writes its reduction once.

use burn::tensor::{Bool, Tensor};

use crate::checks;
use crate::layout::Layout;
use crate::ops::routing;

/// The input of a pooling layer: feature maps or a token set, with an optional validity mask
/// and, for tokens, leading prefix tokens (class or register tokens) to skip.
///
/// ```rust
/// # use burn::tensor::{Bool, Device, Tensor};
/// # use burn_pooling::{GemConfig, PoolingInput};
/// let device = Device::flex();
/// let gem = GemConfig::new().init(&device);
/// // 1 class token + 4 patch tokens, the last patch of the second set is padding.
/// let tokens = Tensor::<3>::ones([2, 5, 8], &device);
/// let mask = Tensor::<2, Bool>::from_data(
///     [[true; 5], [true, true, true, true, false]],
///     &device,
/// );
/// let input = PoolingInput::tokens(tokens).with_prefix_tokens(1).with_mask(mask);
/// assert_eq!(gem.forward(input).dims(), [2, 8]);
/// ```
///
/// # Shapes
///
/// - maps: `[B, C, H, W]`, pooled over the H·W cells (row-major); a mask is `[B, H·W]`
/// - tokens: `[B, N, C]`; a mask is `[B, N]` (prefix tokens included)
/// - mask: `true` = valid position; every row needs one valid position after the prefix
#[derive(Debug, Clone)]
pub struct PoolingInput {
    /// `[B, C, H·W]` or `[B, N, C]`.
    features: Tensor<3>,
    layout: Layout,
    /// `(H, W)` of maps, for the messages.
    map_size: Option<(usize, usize)>,
    mask: Option<Tensor<2, Bool>>,
    /// `None`: the layer's configured `num_prefix_tokens`.
    prefix_tokens: Option<usize>,
}

impl PoolingInput {
    /// Feature maps `[B, C, H, W]`, pooled over their H·W cells.
    pub fn maps(maps: Tensor<4>) -> Self {
        let [_, _, height, width] = maps.dims();
        Self {
            // Not `reshape`, which refuses empty dimensions: the layer names them.
            features: maps.flatten(2, 3),
            layout: Layout::ChannelsFirst,
            map_size: Some((height, width)),
            mask: None,
            prefix_tokens: None,
        }
    }

    /// A token set `[B, N, C]`.
    pub fn tokens(tokens: Tensor<3>) -> Self {
        Self {
            features: tokens,
            layout: Layout::ChannelsLast,
            map_size: None,
            mask: None,
            prefix_tokens: None,
        }
    }

    /// Pools only the positions where `mask` `[B, N]` (or `[B, H·W]` for maps) is `true`.
    pub fn with_mask(mut self, mask: Tensor<2, Bool>) -> Self {
        self.mask = Some(mask);
        self
    }

    /// Skips the first `count` tokens (class, register tokens) instead of the layer's
    /// configured `num_prefix_tokens`.
    ///
    /// # Panics
    ///
    /// If the input is feature maps, which have no prefix tokens.
    pub fn with_prefix_tokens(mut self, count: usize) -> Self {
        assert!(
            self.map_size.is_none(),
            "PoolingInput: prefix tokens apply to token sets [B, N, C], not to feature maps"
        );
        self.prefix_tokens = Some(count);
        self
    }

    /// The layout the features arrived in.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Checks the input for `layer` and drops the prefix tokens (`default_prefix` unless the
    /// input sets its own).
    ///
    /// # Panics
    ///
    /// If no position is left to pool, C = 0, the mask's shape is not `[B, N]`, the mask is
    /// on another device than the features, or a mask row has no valid position.
    pub(crate) fn resolve(self, layer: &str, default_prefix: usize) -> Positions {
        let Self {
            features,
            layout,
            map_size,
            mask,
            prefix_tokens,
        } = self;
        let (batch, count, channels) = layout.split(features.dims());
        let prefix = match map_size {
            Some((height, width)) => {
                assert!(
                    count > 0,
                    "{layer}: the input map has no positions to pool: expected H·W > 0, got H = {height}, W = {width}"
                );
                0
            }
            None => {
                let prefix = prefix_tokens.unwrap_or(default_prefix);
                assert!(
                    count > prefix,
                    "{layer}: no token left to pool: expected N > num_prefix_tokens, got N = {count}, num_prefix_tokens = {prefix}"
                );
                prefix
            }
        };
        assert!(
            channels > 0,
            "{layer}: the input has no channels: expected C > 0, got C = 0"
        );
        let mask = mask.map(|mask| {
            let dims = mask.dims();
            let name = if map_size.is_some() {
                "[B, H·W]"
            } else {
                "[B, N]"
            };
            assert!(
                dims == [batch, count],
                "{layer}: mask shape mismatch: expected {name} = [{batch}, {count}], got {dims:?}"
            );
            checks::same_device(
                layer,
                [
                    ("the input", &features.device()),
                    ("the mask", &mask.device()),
                ],
            );
            let mask = if prefix > 0 {
                mask.slice([0..batch, prefix..count])
            } else {
                mask
            };
            if batch > 0 {
                assert_every_row_has_a_valid_position(layer, &mask);
            }
            mask
        });
        let features = if prefix > 0 {
            features.slice([0..batch, prefix..count, 0..channels])
        } else {
            features
        };
        Positions {
            features,
            layout,
            mask,
        }
    }
}

impl From<Tensor<4>> for PoolingInput {
    fn from(maps: Tensor<4>) -> Self {
        Self::maps(maps)
    }
}

impl From<Tensor<3>> for PoolingInput {
    fn from(tokens: Tensor<3>) -> Self {
        Self::tokens(tokens)
    }
}

/// A checked [`PoolingInput`]: the features to pool, in the layout they arrived in (no
/// transpose is made), with the prefix dropped and an optional validity mask.
#[derive(Debug, Clone)]
pub(crate) struct Positions {
    /// `[B, C, N]` or `[B, N, C]` as `layout` says. Padded positions hold whatever the input
    /// held there (garbage, NaN, ∞) until [`finite_padding`](Self::finite_padding).
    pub features: Tensor<3>,
    pub layout: Layout,
    /// `[B, N]`, `true` = valid position. Every row has at least one valid position.
    pub mask: Option<Tensor<2, Bool>>,
}

impl Positions {
    /// `(batch, positions, channels)`.
    pub fn dims(&self) -> (usize, usize, usize) {
        self.layout.split(self.features.dims())
    }

    /// Whether the batch is empty (B = 0): the layers then return [`empty`](Self::empty).
    pub fn is_empty(&self) -> bool {
        self.dims().0 == 0
    }

    /// The `[0, C]` result of an empty batch, a sum of the features over their positions, so
    /// that a backward reaches them (with an empty gradient) as it would a full batch.
    pub fn empty(self) -> Tensor<2> {
        let axis = self.layout.position_axis();
        self.features.sum_dim(axis).squeeze_dim(axis)
    }

    /// The same positions with the padded features replaced by 0, with a select: what every
    /// reduction that weighs positions (GAP's mean, GSP's costs and sum) must read, since a
    /// padded NaN or ∞ weighed by 0 is still NaN. The select's gradient is 0 at the padding,
    /// so no gradient reaches it either. One pass over the features, only when there is a
    /// mask; the max and the generalized mean select padding themselves and skip it.
    pub fn finite_padding(self) -> Self {
        let features = match &self.mask {
            Some(mask) => {
                let padding = padding(mask, self.layout, self.features.dims());
                self.features.mask_fill(padding, 0.0)
            }
            None => self.features,
        };
        Self { features, ..self }
    }

    /// Global average pooling of the valid positions: `[B, C]`.
    pub fn mean(self) -> Tensor<2> {
        let positions = self.finite_padding();
        let weights = positions.mean_weights();
        positions.weighted_sum(weights)
    }

    /// Global max pooling of the valid positions: `[B, C]`, `y_c = max_{n valid} x_{n,c}`.
    ///
    /// Padding is filled with −∞ before the max, so it never wins; since every mask row has a
    /// valid position, the result stays finite. The gradient reaches only the winning
    /// position of each channel (padding gets 0). A NaN at a valid position makes its
    /// channel's maximum NaN, as Burn's `max_dim` propagates it on every backend.
    pub fn max(self) -> Tensor<2> {
        let axis = self.layout.position_axis();
        let features = match self.mask {
            Some(mask) => {
                let padding = padding(&mask, self.layout, self.features.dims());
                self.features.mask_fill(padding, f64::NEG_INFINITY)
            }
            None => self.features,
        };
        features.max_dim(axis).squeeze_dim::<2>(axis)
    }

    /// The weights of the mean, `[B, N]`: 1 / (valid positions) on the valid positions, 0 on
    /// padding. GSP's position masses.
    pub fn mean_weights(&self) -> Tensor<2> {
        match &self.mask {
            Some(mask) => {
                let valid = mask.clone().float();
                valid.clone() / valid.sum_dim(1)
            }
            None => {
                let (batch, positions, _) = self.dims();
                Tensor::full(
                    [batch, positions],
                    1.0 / positions as f64,
                    &self.features.device(),
                )
            }
        }
    }

    /// The generalized mean `[B, C]` with clamp `eps` over the valid positions, with one power
    /// per channel: `powers(C)` gives them, `[C]`. Every backend's kernel selects the valid
    /// positions, so padded garbage reaches neither the output nor a gradient.
    pub fn generalized_mean(self, powers: impl FnOnce(usize) -> Tensor<1>, eps: f64) -> Tensor<2> {
        let (_, _, channels) = self.dims();
        let powers = powers(channels);
        routing::generalized_mean(self.features, powers, self.mask, eps, self.layout)
    }

    /// Σ_n w_bn x_bn over positions for weights `[B, N]`: `[B, C]`. Padded positions must have
    /// weight 0, and hold finite values ([`finite_padding`](Self::finite_padding)).
    pub fn weighted_sum(self, weights: Tensor<2>) -> Tensor<2> {
        routing::weighted_sum(self.features, weights, self.layout)
    }
}

/// The padded positions of a mask `[B, N]` (`true` = valid), broadcast to features of `dims`
/// in `layout`.
fn padding(mask: &Tensor<2, Bool>, layout: Layout, dims: [usize; 3]) -> Tensor<3, Bool> {
    mask.clone()
        .bool_not()
        .unsqueeze_dim::<3>(layout.channel_axis())
        .expand(dims)
}

/// Panics (naming the first offending row) if a mask row has no `true`. Reads one small bool
/// tensor back from the device.
fn assert_every_row_has_a_valid_position(layer: &str, mask: &Tensor<2, Bool>) {
    let any = mask.clone().any_dim(1).bool_not().int().into_data();
    let empty_rows = any
        .iter::<i64>()
        .enumerate()
        .filter(|(_, empty)| *empty != 0)
        .map(|(row, _)| row)
        .collect::<Vec<_>>();
    assert!(
        empty_rows.is_empty(),
        "{layer}: every mask row needs at least one valid position (true), got rows {empty_rows:?} with none"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    /// The mean weights: 1/valid on valid positions, 0 on padding.
    #[test]
    fn mean_weights_are_one_over_the_valid_count() {
        let device = Device::flex();
        let (b, n, c) = (3, 6, 5);
        let keep: Vec<bool> = (0..b * n).map(|i| i % 3 != 1).collect();
        let mask = Tensor::<2, Bool>::from_bool(TensorData::new(keep, [b, n]), &device);
        let set = Positions {
            features: Tensor::zeros([b, c, n], &device),
            layout: Layout::ChannelsFirst,
            mask: Some(mask),
        };
        let weights = set.mean_weights().into_data().try_to_vec::<f32>().unwrap();
        let expected: Vec<f32> = (0..b * n)
            .map(|i| if i % 3 != 1 { 0.25 } else { 0.0 })
            .collect();
        assert_eq!(weights, expected);
    }
}
