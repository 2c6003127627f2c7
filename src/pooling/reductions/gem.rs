//! Generalized mean (GeM) pooling with a learnable power.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::tensor::{Device, Tensor};

use crate::checks;
use crate::display::one_line_display;
use crate::pooling::input::PoolingInput;

/// The smallest power GeM and GGeM pool with. Below it f32 no longer resolves the mean of
/// exp(p (l − M)) − 1 (about 1e-4 relative error in ln y at p = 1e-3, all of it at 1e-7):
/// `init` refuses a smaller `p`, and a `p` trained below it pools as this value (its gradient
/// still reaches `p`, straight through), with no device read.
pub const MIN_POWER: f64 = 1e-3;

/// The smallest clamp ε: the smallest normal f32. ln ε must be finite in the kernels' float,
/// and GPUs flush subnormal values to 0.
pub const MIN_EPS: f64 = f32::MIN_POSITIVE as f64;

/// Configuration of [`Gem`]. Defaults follow Radenović et al. (TPAMI 2018).
#[derive(Config, Debug)]
pub struct GemConfig {
    /// Initial power p (≥ [`MIN_POWER`]). Default: 3.
    #[config(default = 3.0)]
    pub p: f64,
    /// Clamp ε (≥ [`MIN_EPS`]): values below it are raised to it before the power. Default:
    /// 1e-6.
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
    /// If `p` is not a finite number ≥ [`MIN_POWER`] or `eps` one ≥ [`MIN_EPS`].
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
/// are finite numbers at least [`MIN_POWER`] and [`MIN_EPS`], and `count` is a sane size.
pub(super) fn initial_powers(
    layer: &str,
    count: usize,
    p: f64,
    eps: f64,
    learnable: bool,
    device: &Device,
) -> Param<Tensor<1>> {
    checks::at_least(layer, "p", p, MIN_POWER, "what f32 resolves");
    check_eps(layer, eps);
    checks::parameter_size(layer, &[("groups", count)]);
    Param::from_tensor(Tensor::full([count], p, device)).set_require_grad(learnable)
}

/// Panics, naming `layer`, unless the clamp is a finite number ≥ [`MIN_EPS`]: checked in
/// `init` and, as `eps` is a public field, in every forward (a host value: free).
fn check_eps(layer: &str, eps: f64) {
    checks::at_least(layer, "eps", eps, MIN_EPS, "the smallest normal f32");
}

/// The powers pooled with: max(p, [`MIN_POWER`]) in value, with p's own gradient (straight
/// through), so that a power trained to 0 or below pools as `MIN_POWER` and can still recover.
pub(crate) fn floored_power(p: Tensor<1>) -> Tensor<1> {
    p.clone().detach().clamp_min(MIN_POWER) + (p.clone() - p.detach())
}

/// GeM's and GGeM's forward: checks what may have changed since `init` (ε, the parameters'
/// device), resolves the input, and pools with the powers `powers(p, C)` gives `[C]` for
/// p = max(`p`, [`MIN_POWER`]) (straight through: the gradient of the clamped value reaches
/// `p` unchanged, so a power pushed below the floor can come back). An empty batch gives an
/// empty `[0, C]`.
pub(super) fn pool(
    layer: &str,
    input: PoolingInput,
    num_prefix_tokens: usize,
    p: &Param<Tensor<1>>,
    eps: f64,
    powers: impl FnOnce(Tensor<1>, usize) -> Tensor<1>,
) -> Tensor<2> {
    check_eps(layer, eps);
    let positions = input.resolve(layer, num_prefix_tokens);
    let p = p.val();
    checks::same_device(
        layer,
        [
            ("the input", &positions.features.device()),
            ("the parameters", &p.device()),
        ],
    );
    let (_, _, channels) = positions.dims();
    let powers = powers(floored_power(p), channels);
    if positions.is_empty() {
        return positions.empty();
    }
    positions.generalized_mean(|_| powers, eps)
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
    /// `[B, C]`, with the power max(p, [`MIN_POWER`]) (no device read: a p trained below
    /// the floor pools as the floor, and its gradient still reaches p). An empty batch (B = 0)
    /// gives an empty `[0, C]`.
    ///
    /// # Panics
    ///
    /// If no position is left to pool (N, H or W is 0, or N ≤ the prefix), C = 0, the mask's
    /// shape does not match, a mask row has no valid position, `eps` was set below
    /// [`MIN_EPS`] (or to a non-finite value), or the input (or its mask) is on another device
    /// than `p`.
    pub fn forward(&self, input: impl Into<PoolingInput>) -> Tensor<2> {
        pool(
            "Gem",
            input.into(),
            self.num_prefix_tokens,
            &self.p,
            self.eps,
            |p, channels| p.expand([channels]),
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

    /// A p trained to 0 or below pools as `MIN_POWER`, finite, on every CPU backend, and
    /// its gradient still reaches p (straight through the floor).
    #[test]
    fn a_power_trained_below_the_floor_pools_at_the_floor() {
        for (name, base) in crate::test_support::cpu_devices() {
            let device = base.autodiff();
            let x = Tensor::<3>::from_floats([[[0.5, 2.0], [1.5, 0.25], [3.0, 1.0]]], &device);
            let floor = gem(MIN_POWER, &device).forward_tokens(x.clone());
            for trained in [0.0, -2.0, 1e-9] {
                let mut layer = gem(3.0, &device);
                layer.p = Param::from_tensor(Tensor::from_floats([trained], &device));
                let y = layer.forward_tokens(x.clone());
                y.clone().into_data().assert_approx_eq::<f32>(
                    &floor.clone().into_data(),
                    Tolerance::rel_abs(1e-6, 1e-7),
                );
                let grads = y.sum().backward();
                let gp = layer.p.val().grad(&grads).expect("p's gradient");
                let gp = gp.into_data().try_to_vec::<f32>().unwrap();
                assert!(
                    gp[0].is_finite() && gp[0] != 0.0,
                    "{name}: p = {trained}: {gp:?}"
                );
            }
        }
    }

    /// `eps` is a public field: a value set after `init` that the clamp cannot use panics in
    /// forward, naming it (a host check).
    #[test]
    #[should_panic(expected = "Gem: `eps` must be a finite number > 0, got -0.1")]
    fn a_negative_eps_set_after_init_panics_in_forward() {
        let device = Device::flex();
        let mut layer = gem(3.0, &device);
        layer.eps = -0.1;
        layer.forward_tokens(Tensor::ones([1, 2, 3], &device));
    }

    /// Values that pass an f64 check but vanish in f32 are refused by `init`.
    #[test]
    fn powers_and_clamps_below_f32_panic() {
        let power = std::panic::catch_unwind(|| gem(1e-50, &Device::flex()));
        assert!(power.is_err());
        let clamp =
            std::panic::catch_unwind(|| GemConfig::new().with_eps(1e-40).init(&Device::flex()));
        assert!(clamp.is_err());
    }

    #[test]
    #[should_panic(
        expected = "Gem: `eps` must be at least 1.1754943508222875e-38 (the smallest normal f32), got 1e-40"
    )]
    fn a_subnormal_eps_panics_naming_the_bound() {
        GemConfig::new().with_eps(1e-40).init(&Device::flex());
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
