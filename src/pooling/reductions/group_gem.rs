//! Group generalized mean (GGeM) pooling: GeM with one learnable power per channel group.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::tensor::{Device, Tensor};

use super::gem::{initial_powers, pool};
use crate::checks;
use crate::display::one_line_display;
use crate::pooling::input::PoolingInput;

/// How channels are assigned to the groups of [`GroupGem`]. Default: contiguous.
#[derive(Config, Copy, Debug, PartialEq, Eq)]
pub enum GroupLayout {
    /// `g(c) = ⌊c / (C/G)⌋`: consecutive channels share a power, as attention heads slice the
    /// embedding. The default, and what Ko et al. describe.
    Contiguous,
    /// `g(c) = c mod G`, as in one published transcription of GGeM. Gives different outputs
    /// than [`Contiguous`](Self::Contiguous) for the same powers.
    Interleaved,
}

/// Configuration of [`GroupGem`]. Defaults follow Ko et al., "Group Generalized Mean Pooling
/// for Vision Transformer" (arXiv 2212.04114).
#[derive(Config, Debug)]
pub struct GroupGemConfig {
    /// Number of channel groups G, usually the number of attention heads (ViT-Ti 3, S 6, B 12,
    /// L 16). The channel count must be divisible by it.
    pub groups: usize,
    /// Initial power of every group (≥ [`MIN_POWER`](crate::pooling::MIN_POWER)). Default: 3.
    #[config(default = 3.0)]
    pub p: f64,
    /// Clamp ε (≥ [`MIN_EPS`](crate::pooling::MIN_EPS)). Default: 1e-6.
    #[config(default = 1e-6)]
    pub eps: f64,
    /// Whether the powers are trained. Default: true.
    #[config(default = true)]
    pub learnable: bool,
    /// Channel-to-group assignment. Default: contiguous.
    #[config(default = "GroupLayout::Contiguous")]
    pub layout: GroupLayout,
    /// Leading tokens (class token, register tokens) that
    /// [`forward_tokens`](GroupGem::forward_tokens) skips. Default: 0; ViTs use 1.
    #[config(default = 0)]
    pub num_prefix_tokens: usize,
}

impl GroupGemConfig {
    /// Creates the [`GroupGem`] layer with its `[groups]` powers on `device`.
    ///
    /// # Panics
    ///
    /// If `groups` is 0 or above 2³¹ (checked before allocating), `p` is not a finite number
    /// ≥ [`MIN_POWER`](crate::pooling::MIN_POWER), or `eps` one ≥ [`MIN_EPS`](crate::pooling::MIN_EPS).
    pub fn init(&self, device: &Device) -> GroupGem {
        checks::at_least_one("GroupGem", "groups", self.groups);
        GroupGem {
            p: initial_powers(
                "GroupGem",
                self.groups,
                self.p,
                self.eps,
                self.learnable,
                device,
            ),
            eps: self.eps,
            layout: self.layout,
            num_prefix_tokens: self.num_prefix_tokens,
        }
    }
}

/// Group generalized mean pooling: channels split into G groups, group g has its own p_g:
///
/// ```text
/// y_c = ( (1/N) Σ_n max(x_{n,c}, ε)^{p_g(c)} )^(1 / p_g(c))
/// ```
///
/// One group is [`Gem`](crate::pooling::Gem); C groups give one power per channel; all p = 1 is GAP
/// (of the clamped values). Stable for large p and clamped channels, like `Gem`. Note the
/// clamp: negative token values all count as ε.
///
/// Training hint: the powers in their own parameter group with a larger learning rate (×10,
/// ×100 for one p per channel) and no weight decay.
#[derive(Module, Debug)]
#[module(custom_display)]
pub struct GroupGem {
    /// The powers, shape `[groups]`.
    pub p: Param<Tensor<1>>,
    /// Clamp ε.
    pub eps: f64,
    /// Channel-to-group assignment.
    #[module(skip)]
    pub layout: GroupLayout,
    /// Leading tokens skipped by the token paths.
    pub num_prefix_tokens: usize,
}

one_line_display!(GroupGem, |ggem|
    "groups" => ggem.groups(),
    "eps" => ggem.eps,
    "layout" => format!("{:?}", ggem.layout),
    "num_prefix_tokens" => ggem.num_prefix_tokens,
);

impl GroupGem {
    /// Number of channel groups.
    pub fn groups(&self) -> usize {
        self.p.shape().dims::<1>()[0]
    }

    /// The power of every channel, `[channels]`, from the groups' powers `p`, laid out by
    /// [`GroupLayout`].
    fn channel_powers(&self, p: Tensor<1>, channels: usize) -> Tensor<1> {
        let groups = self.groups();
        assert!(
            channels.is_multiple_of(groups),
            "GroupGem: channels must be divisible by groups: got C = {channels}, groups = {groups}"
        );
        let per_group = channels / groups;
        match self.layout {
            GroupLayout::Contiguous => p
                .reshape([groups, 1])
                .expand([groups, per_group])
                .reshape([channels]),
            GroupLayout::Interleaved => p
                .reshape([1, groups])
                .expand([per_group, groups])
                .reshape([channels]),
        }
    }

    /// Pools feature maps `[B, C, H, W]`, a token set `[B, N, C]` (skipping the first
    /// `num_prefix_tokens` tokens) or any [`PoolingInput`] (masked, with its own prefix) into
    /// `[B, C]`. C must be divisible by `groups`. Each group pools with max(p_g,
    /// [`MIN_POWER`](crate::pooling::MIN_POWER)) (no device read: a power trained below the floor
    /// pools as the floor, and its gradient still reaches it). An empty batch (B = 0) gives an
    /// empty `[0, C]`.
    ///
    /// # Panics
    ///
    /// If no position is left to pool (N, H or W is 0, or N ≤ the prefix), C = 0, the mask's
    /// shape does not match, a mask row has no valid position, C is not divisible by
    /// `groups`, `eps` was set below [`MIN_EPS`](crate::pooling::MIN_EPS) (or to a non-finite
    /// value), or the input (or its mask) is on another device than `p`.
    pub fn forward(&self, input: impl Into<PoolingInput>) -> Tensor<2> {
        pool(
            "GroupGem",
            input.into(),
            self.num_prefix_tokens,
            &self.p,
            self.eps,
            |p, channels| self.channel_powers(p, channels),
        )
    }

    /// [`forward`](Self::forward) for a token set `[B, N, C]`, spelled out.
    pub fn forward_tokens(&self, tokens: Tensor<3>) -> Tensor<2> {
        self.forward(tokens)
    }
}

#[cfg(test)]
// The reference values are quoted at the precision of their source (docs/maths.md §1).
#[allow(clippy::excessive_precision)]
mod tests {
    use super::*;
    use burn::tensor::{TensorData, Tolerance};

    const TOKENS: [[f32; 4]; 3] = [
        [0.1, 1.0, 2.0, 0.5],
        [0.3, 0.2, 1.5, 2.5],
        [1.2, 0.7, 0.4, 3.0],
    ];

    fn layer(layout: GroupLayout, prefix: usize, device: &Device) -> GroupGem {
        let layer = GroupGemConfig::new(2)
            .with_layout(layout)
            .with_num_prefix_tokens(prefix)
            .init(device);
        let p = Tensor::<1>::from_floats([2.0, 3.0], device);
        GroupGem {
            p: Param::from_tensor(p),
            ..layer
        }
    }

    /// Reference GGeM vectors (docs/maths.md §1): outputs and ∂(Σy)/∂p for both layouts.
    #[test]
    fn reference_values_both_layouts() {
        let device = Device::flex().autodiff();
        for (layout, y, dp) in [
            (
                GroupLayout::Contiguous,
                [0.7164728420f32, 0.7141428429, 1.5622682323, 2.4244037929],
                [0.2143554956f32, 0.1938087099],
            ),
            (
                GroupLayout::Interleaved,
                [0.7164728420, 0.7664985979, 1.4617341300, 2.4244037929],
                [0.2759314705, 0.1564392185],
            ),
        ] {
            let layer = layer(layout, 0, &device);
            let x = Tensor::<3>::from_floats([TOKENS], &device);
            let out = layer.forward_tokens(x);
            out.clone()
                .into_data()
                .assert_approx_eq::<f32>(&TensorData::from([y]), Tolerance::rel_abs(1e-5, 1e-6));
            let grads = out.sum().backward();
            layer
                .p
                .val()
                .grad(&grads)
                .unwrap()
                .into_data()
                .assert_approx_eq::<f32>(&TensorData::from(dp), Tolerance::rel_abs(1e-4, 1e-6));
        }
    }

    /// A class-token row of 9s must be skipped; including it gives the wrong values of the reference vectors.
    #[test]
    fn prefix_token_is_skipped() {
        let device = Device::flex();
        let with_class = Tensor::<3>::from_floats(
            [[[9.0, 9.0, 9.0, 9.0], TOKENS[0], TOKENS[1], TOKENS[2]]],
            &device,
        );
        let right = layer(GroupLayout::Contiguous, 1, &device).forward_tokens(with_class.clone());
        right.into_data().assert_approx_eq::<f32>(
            &TensorData::from([[0.7164728420f32, 0.7141428429, 1.5622682323, 2.4244037929]]),
            Tolerance::rel_abs(1e-5, 1e-6),
        );
        let wrong = layer(GroupLayout::Contiguous, 0, &device).forward_tokens(with_class);
        wrong.into_data().assert_approx_eq::<f32>(
            &TensorData::from([[4.5426f32, 4.5423, 5.6991, 5.7784]]),
            Tolerance::rel_abs(1e-4, 1e-4),
        );
    }

    #[test]
    #[should_panic(
        expected = "GroupGem: channels must be divisible by groups: got C = 10, groups = 3"
    )]
    fn indivisible_channels_panic() {
        let device = Device::flex();
        let layer = GroupGemConfig::new(3).init(&device);
        layer.forward(Tensor::<4>::ones([1, 10, 2, 2], &device));
    }

    /// 2⁴⁰ groups would abort the process in the allocator: a named panic instead.
    #[test]
    #[should_panic(
        expected = "GroupGem: `groups` must be at most 2^31 elements (the size of one parameter tensor), got 1099511627776"
    )]
    fn too_many_groups_panic_before_allocating() {
        GroupGemConfig::new(1 << 40).init(&Device::flex());
    }

    #[test]
    #[should_panic(expected = "GroupGem: `p` must be at least 1e-3 (what f32 resolves), got 1e-50")]
    fn a_power_below_f32_panics() {
        GroupGemConfig::new(2).with_p(1e-50).init(&Device::flex());
    }

    #[test]
    #[should_panic(expected = "GroupGem: `groups` must be at least 1, got 0")]
    fn zero_groups_panic() {
        GroupGemConfig::new(0).init(&Device::flex());
    }

    #[test]
    #[should_panic(
        expected = "GroupGem: no token left to pool: expected N > num_prefix_tokens, got N = 1, num_prefix_tokens = 1"
    )]
    fn only_prefix_tokens_panic() {
        let device = Device::flex();
        let layer = GroupGemConfig::new(1)
            .with_num_prefix_tokens(1)
            .init(&device);
        layer.forward_tokens(Tensor::<3>::ones([1, 1, 4], &device));
    }

    #[test]
    fn display_and_num_params() {
        let layer = GroupGemConfig::new(12).init(&Device::flex());
        assert_eq!(layer.num_params(), 12);
        let shown = format!("{layer}");
        assert!(
            shown.contains("groups: 12") && shown.contains("Contiguous"),
            "{shown}"
        );
    }
}
