//! Generalized mean (GeM) pooling with a learnable power.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::tensor::{Device, Tensor};

use super::input::PoolingInput;
use crate::checks;
use crate::display::one_line_display;

/// Configuration of [`Gem`]. Defaults follow Radenović et al. (TPAMI 2018).
#[derive(Config, Debug)]
pub struct GemConfig {
    /// Initial power p (> 0). Default: 3.
    #[config(default = 3.0)]
    pub p: f64,
    /// Clamp ε (> 0): values below it are raised to it before the power. Default: 1e-6.
    #[config(default = 1e-6)]
    pub eps: f64,
    /// Whether p is trained. Default: true.
    #[config(default = true)]
    pub learnable: bool,
    /// Leading tokens (class token, register tokens) that the token paths skip. Default: 0.
    #[config(default = 0)]
    pub num_prefix_tokens: usize,
}

impl GemConfig {
    /// Creates the [`Gem`] layer with `p` on `device`.
    ///
    /// # Panics
    ///
    /// If `p` or `eps` is not a finite positive number.
    pub fn init(&self, device: &Device) -> Gem {
        Gem {
            p: initial_powers("Gem", 1, self.p, self.eps, self.learnable, device),
            eps: self.eps,
            num_prefix_tokens: self.num_prefix_tokens,
        }
    }
}

/// `count` copies of the initial power `p` as a parameter, trained when `learnable`: GeM's
/// one power and GGeM's one per group. Panics, naming `layer`, unless `p` and the clamp `eps`
/// are finite positive numbers.
pub(super) fn initial_powers(
    layer: &str,
    count: usize,
    p: f64,
    eps: f64,
    learnable: bool,
    device: &Device,
) -> Param<Tensor<1>> {
    checks::positive(layer, "p", p);
    checks::positive(layer, "eps", eps);
    Param::from_tensor(Tensor::full([count], p, device)).set_require_grad(learnable)
}

/// Generalized mean pooling:
///
/// ```text
/// y_c = ( (1/N) Σ_n max(x_{n,c}, ε)^p )^(1/p)
/// ```
///
/// p = 1 is the mean (of the clamped values), p → ∞ the max; for p ≥ 1,
/// mean ≤ GeM ≤ max, and GeM(αx) = α·GeM(x) for α > 0.
///
/// The clamp discards every value below ε: harmless after a ReLU (CNN maps), but significant
/// for signed features such as ViT tokens, where negative channels all count as ε.
///
/// Computed in a max-normalised log form (docs/maths.md §1), so p up to
/// 1000 and channels entirely at or below ε give finite outputs and finite gradients in f32,
/// and values up to the largest float are pooled exactly. A NaN (or +∞) at a valid position
/// makes its channel's output NaN on every backend; whatever padding holds is never read.
///
/// Training hint from the paper: put `p` in its own parameter group with a 10× learning rate
/// and no weight decay.
#[derive(Module, Debug)]
#[module(custom_display)]
pub struct Gem {
    /// The power p, shape `[1]`.
    pub p: Param<Tensor<1>>,
    /// Clamp ε.
    pub eps: f64,
    /// Leading tokens skipped by the token paths.
    pub num_prefix_tokens: usize,
}

one_line_display!(Gem, |gem|
    "eps" => gem.eps,
    "num_prefix_tokens" => gem.num_prefix_tokens,
);

impl Gem {
    /// Pools feature maps `[B, C, H, W]`, a token set `[B, N, C]` (skipping the first
    /// `num_prefix_tokens` tokens) or any [`PoolingInput`] (masked, with its own prefix) into
    /// `[B, C]`.
    ///
    /// # Panics
    ///
    /// If no position is left to pool, the mask's shape does not match, or a mask row has no
    /// valid position.
    pub fn forward(&self, input: impl Into<PoolingInput>) -> Tensor<2> {
        let positions = input.into().resolve("Gem", self.num_prefix_tokens);
        positions.generalized_mean(|channels| self.p.val().expand([channels]), self.eps)
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

    fn one_channel(values: &[f32], device: &Device) -> Tensor<4> {
        Tensor::<1>::from_floats(values, device).reshape([1, 1, 1, values.len()])
    }

    fn gem(p: f64, device: &Device) -> Gem {
        GemConfig::new().with_p(p).init(device)
    }

    /// Reference values (docs/maths.md §1): ∂y/∂p and ∂y/∂x at p = 3, and the signed-input vector.
    #[test]
    fn reference_gradients() {
        let device = Device::flex().autodiff();
        let layer = gem(3.0, &device);
        let x = one_channel(&[0.5, 1.0, 2.0, 4.0], &device).require_grad();
        let grads = layer.forward(x.clone()).sum().backward();
        x.grad(&grads)
            .unwrap()
            .reshape([4])
            .into_data()
            .assert_approx_eq::<f32>(
                &TensorData::from([0.0090062243f32, 0.0360248972, 0.1440995888, 0.5763983552]),
                Tolerance::rel_abs(1e-5, 1e-7),
            );
        layer
            .p
            .val()
            .grad(&grads)
            .unwrap()
            .into_data()
            .assert_approx_eq::<f32>(
                &TensorData::from([0.2804015527f32]),
                Tolerance::rel_abs(1e-5, 1e-7),
            );

        let x = one_channel(&[-1.0, 0.5, 2.0], &device).require_grad();
        let y = layer.forward(x.clone());
        y.clone().into_data().assert_approx_eq::<f32>(
            &TensorData::from([[1.3939077679f32]]),
            Tolerance::rel_abs(1e-6, 1e-7),
        );
        let grads = y.sum().backward();
        x.grad(&grads)
            .unwrap()
            .reshape([3])
            .into_data()
            .assert_approx_eq::<f32>(
                &TensorData::from([0.0f32, 0.0428894698, 0.6862315165]),
                Tolerance::rel_abs(1e-5, 1e-7),
            );
    }

    /// p = 1000, and a channel entirely at or below ε, stay finite in f32 (the naive form gives
    /// inf and NaN gradients).
    #[test]
    fn extreme_powers_and_clamped_channels_are_finite() {
        let device = Device::flex().autodiff();
        for p in [8.0, 100.0, 1000.0] {
            let layer = gem(p, &device);
            // channel 0: ordinary values up to 50; channel 1: all below ε.
            let x = Tensor::<3>::from_floats([[[0.5, -2.0], [50.0, 1e-9], [3.0, 0.0]]], &device)
                .require_grad();
            let y = layer.forward_tokens(x.clone());
            let values = y.clone().into_data().try_to_vec::<f32>().unwrap();
            assert!(values.iter().all(|v| v.is_finite()), "p = {p}: {values:?}");
            assert!(
                (values[1] - 1e-6).abs() < 1e-9,
                "clamped channel pools to ε: {values:?}"
            );
            let grads = y.sum().backward();
            let gx = x
                .grad(&grads)
                .unwrap()
                .into_data()
                .try_to_vec::<f32>()
                .unwrap();
            let gp = layer
                .p
                .val()
                .grad(&grads)
                .unwrap()
                .into_data()
                .try_to_vec::<f32>()
                .unwrap();
            assert!(
                gx.iter().chain(&gp).all(|v| v.is_finite()),
                "p = {p}: {gx:?} {gp:?}"
            );
        }
    }

    #[test]
    fn frozen_power_gets_no_gradient() {
        let device = Device::flex().autodiff();
        let layer = GemConfig::new().with_learnable(false).init(&device);
        let x = one_channel(&[1.0, 2.0], &device).require_grad();
        let grads = layer.forward(x).sum().backward();
        assert!(layer.p.val().grad(&grads).is_none());
    }

    #[test]
    #[should_panic(expected = "Gem: `p` must be a finite number > 0, got 0")]
    fn non_positive_power_panics() {
        gem(0.0, &Device::flex());
    }

    #[test]
    #[should_panic(expected = "Gem: `eps` must be a finite number > 0, got -0.001")]
    fn non_positive_eps_panics() {
        GemConfig::new().with_eps(-1e-3).init(&Device::flex());
    }

    #[test]
    #[should_panic(
        expected = "Gem: no token left to pool: expected N > num_prefix_tokens, got N = 0"
    )]
    fn empty_token_set_panics() {
        let device = Device::flex();
        gem(3.0, &device).forward_tokens(Tensor::<3>::zeros([2, 0, 4], &device));
    }

    #[test]
    fn display_and_num_params() {
        let layer = gem(3.0, &Device::flex());
        assert_eq!(layer.num_params(), 1);
        assert!(
            format!("{layer}").starts_with("Gem {eps: 0.000001"),
            "{layer}"
        );
    }
}
