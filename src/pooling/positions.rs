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

    /// The mask as a float `0/1` tensor that broadcasts against `features`.
    pub fn float_mask(&self) -> Option<Tensor<3>> {
        self.mask
            .as_ref()
            .map(|mask| mask.clone().float().unsqueeze_dim(self.channel_axis()))
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

    /// Number of valid positions per sample, shaped to broadcast against a keep-dim reduction of
    /// `features` over positions (`[B, 1, 1]`), or `None` when every position is valid.
    pub fn valid_counts(&self) -> Option<Tensor<3>> {
        self.mask
            .as_ref()
            .map(|mask| mask.clone().float().sum_dim(1).unsqueeze_dim(2))
    }

    /// Global average pooling of the valid positions: `[B, C]`, with the backend's kernel when
    /// the crate's extension covers the device.
    pub fn mean(self) -> Tensor<2> {
        let axis = self.axis;
        let device = self.features.device();
        if extension_covers(&device) {
            let mask = self.float_mask_or_ones();
            return Tensor::from_dispatch(<Dispatch as PoolingOps>::masked_mean(
                self.features.into_dispatch(),
                mask.into_dispatch(),
                axis == 1,
            ));
        }
        match (self.float_mask(), self.valid_counts()) {
            (Some(mask), Some(counts)) => (self.features * mask).sum_dim(axis).div(counts),
            _ => self.features.mean_dim(axis),
        }
        .squeeze_dim(axis)
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

    /// The Flex masked-mean kernel and its backward against the composite form under
    /// autodiff, in both layouts.
    #[test]
    fn fused_mean_matches_composite() {
        let device = Device::flex().autodiff();
        device.seed(2);
        let (b, n, c) = (3, 6, 5);
        let keep: Vec<bool> = (0..b * n).map(|i| i % 3 != 1).collect();
        let mask = Tensor::<2, Bool>::from_bool(TensorData::new(keep, [b, n]), &device);
        for axis in [1usize, 2] {
            let shape = if axis == 1 { [b, n, c] } else { [b, c, n] };
            let x = Tensor::<3>::random(shape, Distribution::Normal(0.0, 1.0), &device);
            let weights = Tensor::<2>::random([b, c], Distribution::Normal(0.0, 1.0), &device);
            let fused_x = x.clone().require_grad();
            let set = PositionSet {
                features: fused_x.clone(),
                axis,
                mask: Some(mask.clone()),
            };
            let fused = set.mean();
            let grads = (fused.clone() * weights.clone()).sum().backward();
            let fused_grad = fused_x.grad(&grads).unwrap();

            let composite_x = x.require_grad();
            let float_mask = mask.clone().float().unsqueeze_dim::<3>(3 - axis);
            let composite = (composite_x.clone() * float_mask.clone())
                .sum_dim(axis)
                .div(float_mask.sum_dim(axis))
                .squeeze_dim::<2>(axis);
            let grads = (composite.clone() * weights).sum().backward();
            let tolerance = Tolerance::rel_abs(1e-5, 1e-6);
            fused
                .into_data()
                .assert_approx_eq::<f32>(&composite.into_data(), tolerance);
            fused_grad
                .into_data()
                .assert_approx_eq::<f32>(&composite_x.grad(&grads).unwrap().into_data(), tolerance);
        }
    }
}
