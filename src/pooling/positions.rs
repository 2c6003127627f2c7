//! The set of positions a global pooling layer reduces over.
//!
//! Every layer accepts the two layouts of Burn models, CNN feature maps `[B, C, H, W]` and token
//! sets `[B, N, C]`, optionally with prefix tokens to skip and a validity mask. This module turns
//! all of them into one value, [`PositionSet`], so each layer writes its reduction once and the
//! input checks (with their panic messages) live in one place.

use burn::backend::Dispatch;
use burn::tensor::{Bool, Tensor};

use crate::ops::{PoolingOps, extension_covers};

/// Features to pool, in the layout they arrived in (no transpose is made), with an optional
/// validity mask.
#[derive(Debug, Clone)]
pub(crate) struct PositionSet {
    /// `[B, C, N]` for maps (`axis == 2`) or `[B, N, C]` for tokens (`axis == 1`).
    pub features: Tensor<3>,
    /// The axis of `features` that indexes positions.
    pub axis: usize,
    /// `[B, N]`, `true` = valid position. Every row has at least one valid position.
    pub mask: Option<Tensor<2, Bool>>,
}

impl PositionSet {
    /// Flattens a `[B, C, H, W]` map into `[B, C, H·W]`.
    ///
    /// # Panics
    ///
    /// If `H·W == 0` or `C == 0`.
    pub fn from_maps(layer: &str, maps: Tensor<4>) -> Self {
        let [batch, channels, height, width] = maps.dims();
        let positions = height * width;
        assert!(
            positions > 0,
            "{layer}: the input map has no positions to pool: expected H·W > 0, got H = {height}, W = {width}"
        );
        assert!(
            channels > 0,
            "{layer}: the input has no channels: expected C > 0, got C = 0"
        );
        Self {
            features: maps.reshape([batch, channels, positions]),
            axis: 2,
            mask: None,
        }
    }

    /// Takes a `[B, N, C]` token set, dropping the first `prefix` tokens (class or register
    /// tokens) and, if given, the matching columns of `mask`.
    ///
    /// # Panics
    ///
    /// If no token is left after the prefix, if the mask is not `[B, N]`, or if a mask row has
    /// no valid position.
    pub fn from_tokens(
        layer: &str,
        tokens: Tensor<3>,
        prefix: usize,
        mask: Option<Tensor<2, Bool>>,
    ) -> Self {
        let [batch, count, channels] = tokens.dims();
        assert!(
            count > prefix,
            "{layer}: no token left to pool: expected N > num_prefix_tokens, got N = {count}, num_prefix_tokens = {prefix}"
        );
        assert!(
            channels > 0,
            "{layer}: the input has no channels: expected C > 0, got C = 0"
        );
        let mask = mask.map(|mask| {
            let dims = mask.dims();
            assert!(
                dims == [batch, count],
                "{layer}: mask shape mismatch: expected [B, N] = [{batch}, {count}], got {dims:?}"
            );
            let mask = if prefix > 0 {
                mask.slice([0..batch, prefix..count])
            } else {
                mask
            };
            assert_every_row_has_a_valid_position(layer, &mask);
            mask
        });
        let tokens = if prefix > 0 {
            tokens.slice([0..batch, prefix..count, 0..channels])
        } else {
            tokens
        };
        Self {
            features: tokens,
            axis: 1,
            mask,
        }
    }

    /// `[B, C, N]` or `[B, N, C]` dims as `(batch, positions, channels)`.
    pub fn dims(&self) -> (usize, usize, usize) {
        let dims = self.features.dims();
        (dims[0], dims[self.axis], dims[3 - self.axis])
    }

    /// The axis of `features` that indexes channels.
    pub fn channel_axis(&self) -> usize {
        3 - self.axis
    }

    /// The mask as float `[B, N]` (1 valid, 0 padding), all ones when there is none: the form
    /// the backend kernels take.
    pub fn float_mask_or_ones(&self) -> Tensor<2> {
        match &self.mask {
            Some(mask) => mask.clone().float(),
            None => {
                let (batch, positions, _) = self.dims();
                Tensor::ones([batch, positions], &self.features.device())
            }
        }
    }

    /// Global average pooling of the valid positions: `[B, C]`.
    pub fn mean(self) -> Tensor<2> {
        let weights = self.mean_weights();
        self.weighted_sum(weights)
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

    /// Σ_n w_bn x_bn over positions for weights `[B, N]`: `[B, C]`, with the backend's
    /// kernel when the crate's extension covers the device. Padded positions must have
    /// weight 0.
    pub fn weighted_sum(self, weights: Tensor<2>) -> Tensor<2> {
        let axis = self.axis;
        if extension_covers(&self.features.device()) {
            return Tensor::from_dispatch(<Dispatch as PoolingOps>::weighted_sum(
                self.features.into_dispatch(),
                weights.into_dispatch(),
                axis == 1,
            ));
        }
        let weights = weights.unsqueeze_dim::<3>(self.channel_axis());
        (self.features * weights).sum_dim(axis).squeeze_dim(axis)
    }
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
    use burn::tensor::{Device, Distribution, TensorData, Tolerance};

    /// The Flex weighted-sum kernel and both halves of its backward against the composite
    /// form under autodiff, in both layouts, as GAP's masked mean (untracked weights) and
    /// with tracked weights (GSP's pooling).
    #[test]
    fn fused_weighted_sum_matches_composite() {
        let device = Device::flex().autodiff();
        device.seed(2);
        let (b, n, c) = (3, 6, 5);
        let keep: Vec<bool> = (0..b * n).map(|i| i % 3 != 1).collect();
        let mask = Tensor::<2, Bool>::from_bool(TensorData::new(keep, [b, n]), &device);
        let tolerance = Tolerance::rel_abs(1e-5, 1e-6);
        for axis in [1usize, 2] {
            let shape = if axis == 1 { [b, n, c] } else { [b, c, n] };
            let x = Tensor::<3>::random(shape, Distribution::Normal(0.0, 1.0), &device);
            let upstream = Tensor::<2>::random([b, c], Distribution::Normal(0.0, 1.0), &device);
            let free_weights = Tensor::<2>::random([b, n], Distribution::Normal(0.0, 1.0), &device);
            for tracked in [false, true] {
                let fused_x = x.clone().require_grad();
                let set = PositionSet {
                    features: fused_x.clone(),
                    axis,
                    mask: Some(mask.clone()),
                };
                let weights = if tracked {
                    free_weights.clone().require_grad()
                } else {
                    set.mean_weights()
                };
                let fused = set.weighted_sum(weights.clone());
                let grads = (fused.clone() * upstream.clone()).sum().backward();
                let fused_dx = fused_x.grad(&grads).unwrap();
                let fused_dw = weights.grad(&grads);

                let composite_x = x.clone().require_grad();
                let composite_w = weights.clone().detach().require_grad();
                let composite = (composite_x.clone() * composite_w.clone().unsqueeze_dim(3 - axis))
                    .sum_dim(axis)
                    .squeeze_dim::<2>(axis);
                let grads = (composite.clone() * upstream.clone()).sum().backward();
                fused
                    .into_data()
                    .assert_approx_eq::<f32>(&composite.into_data(), tolerance);
                fused_dx.into_data().assert_approx_eq::<f32>(
                    &composite_x.grad(&grads).unwrap().into_data(),
                    tolerance,
                );
                assert_eq!(fused_dw.is_some(), tracked);
                if let Some(dw) = fused_dw {
                    dw.into_data().assert_approx_eq::<f32>(
                        &composite_w.grad(&grads).unwrap().into_data(),
                        tolerance,
                    );
                }
            }
        }
        // The mean weights: 1/valid on valid positions, 0 on padding.
        let set = PositionSet {
            features: Tensor::zeros([b, c, n], &device),
            axis: 2,
            mask: Some(mask),
        };
        let weights = set.mean_weights().into_data().try_to_vec::<f32>().unwrap();
        let expected: Vec<f32> = (0..b * n)
            .map(|i| if i % 3 != 1 { 0.25 } else { 0.0 })
            .collect();
        assert_eq!(weights, expected);
    }
}
