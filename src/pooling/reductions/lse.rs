//! Log-sum-exp (LSE) pooling with a learnable, positive temperature, and its softmax-weighted
//! mean (docs/maths.md §8).

use burn::config::Config;
use burn::module::{Module, Param};
use burn::tensor::activation::softplus;
use burn::tensor::{Device, Tensor};

use crate::checks;
use crate::display::one_line_display;
pub use crate::maths::log_sum_exp::LseOutput;
use crate::ops::routing;
use crate::pooling::input::{PoolingInput, Positions};

/// Configuration of [`Lse`]. The temperature is stored as `ρ` with `r = softplus(ρ) + r_min`,
/// so that training keeps it above `r_min > 0` whatever the step.
#[derive(Config, Debug)]
pub struct LseConfig {
    /// Initial temperature r (> `r_min`). Default: 10 (timm's `LsePlus`).
    #[config(default = 10.0)]
    pub r: f64,
    /// The floor of the temperature (> 0): `r = softplus(ρ) + r_min`. Default: 1e-4.
    #[config(default = 1e-4)]
    pub r_min: f64,
    /// Whether the temperature is trained. Default: true.
    #[config(default = true)]
    pub learnable: bool,
    /// The log-sum-exp or its softmax-weighted mean. Default: the log-sum-exp.
    #[config(default = "LseOutput::LogSumExp")]
    pub output: LseOutput,
    /// Leading tokens (class token, register tokens) that the token paths skip. Default: 0.
    #[config(default = 0)]
    pub num_prefix_tokens: usize,
}

impl LseConfig {
    /// Creates the [`Lse`] layer on `device`, with `ρ = softplus⁻¹(r − r_min)`.
    ///
    /// # Panics
    ///
    /// If `r_min` is not a finite number > 0, or `r` is not a finite number > `r_min`.
    pub fn init(&self, device: &Device) -> Lse {
        checks::positive("Lse", "r_min", self.r_min);
        assert!(
            self.r.is_finite() && self.r > self.r_min,
            "Lse: `r` must be a finite number > r_min = {}, got {}",
            self.r_min,
            self.r
        );
        let excess = self.r - self.r_min;
        // softplus⁻¹(v) = v + ln(1 − e^(−v)), exact for large v where ln(e^v − 1) overflows.
        let rho = excess + (-(-excess).exp_m1()).ln();
        Lse {
            rho: Param::from_tensor(Tensor::full([1], rho, device))
                .set_require_grad(self.learnable),
            r_min: self.r_min,
            output: self.output,
            num_prefix_tokens: self.num_prefix_tokens,
        }
    }
}

/// Log-sum-exp pooling over the valid positions, with `r = softplus(ρ) + r_min`:
///
/// ```text
/// LSE:          y_c = m_c + (1/r) ln( (1/N) Σ_n exp(r (x_{n,c} − m_c)) ),   m_c = max_n x_{n,c}
/// SoftmaxMean:  y_c = Σ_n s_{n,c} x_{n,c},   s_{n,c} = exp(r x_{n,c}) / Σ_j exp(r x_{j,c})
/// ```
///
/// mean ≤ LSE ≤ max; LSE → max as r → ∞ and → the mean as r → 0 (its Taylor form,
/// `mean + (r/2)·variance`, docs/maths.md §8); ∂y_c/∂x_{n,c} = s_{n,c}, the softmax weights.
///
/// The exact form rounds to an error of about ε/r (ε the dtype's epsilon), which swamps the
/// result as `r·(max − min) → 0`; below the crossover `r·(max − min) < 4 ε^(1/3)` of a channel
/// (0.02 in f32, 2.4·10⁻⁵ in f64) that channel takes the Taylor form instead, whose truncation
/// error is then of the same size. The differences `x − m` are clamped at the dtype's lowest
/// finite value, so values near the float limits give finite outputs and finite gradients.
///
/// Padding is selected away (never multiplied by 0), so NaN or ±∞ there never reaches the
/// output or the gradients.
///
/// # Shapes
///
/// - input: maps `[B, C, H, W]`, tokens `[B, N, C]`, or a [`PoolingInput`] with a `[B, N]`
///   mask
/// - output: `[B, C]`
#[derive(Module, Debug)]
#[module(custom_display)]
pub struct Lse {
    /// `ρ`, shape `[1]`: the temperature is `softplus(ρ) + r_min`.
    pub rho: Param<Tensor<1>>,
    /// The floor of the temperature.
    pub r_min: f64,
    /// The log-sum-exp or its softmax-weighted mean.
    #[module(skip)]
    pub output: LseOutput,
    /// Leading tokens skipped by the token paths.
    pub num_prefix_tokens: usize,
}

one_line_display!(Lse, |lse|
    "output" => format!("{:?}", lse.output),
    "r_min" => lse.r_min,
    "num_prefix_tokens" => lse.num_prefix_tokens,
);

impl Lse {
    /// The temperature `r = softplus(ρ) + r_min`, `[1]` (tracked: its gradient reaches ρ).
    pub fn temperature(&self) -> Tensor<1> {
        softplus(self.rho.val(), 1.0).add_scalar(self.r_min)
    }

    /// Pools feature maps `[B, C, H, W]`, a token set `[B, N, C]` (skipping the first
    /// `num_prefix_tokens` tokens) or any [`PoolingInput`] (masked, with its own prefix) into
    /// `[B, C]`.
    ///
    /// # Panics
    ///
    /// If no position is left to pool, the mask's shape does not match, a mask row has no
    /// valid position, or ρ is on another device than the input.
    pub fn forward(&self, input: impl Into<PoolingInput>) -> Tensor<2> {
        let positions = input.into().resolve("Lse", self.num_prefix_tokens);
        checks::same_device(
            "Lse",
            [
                ("the input", &positions.features.device()),
                ("the temperature", &self.rho.device()),
            ],
        );
        if positions.is_empty() {
            // An empty `[0, C]` that a backward still reaches.
            return positions.empty();
        }
        let Positions {
            features,
            layout,
            mask,
        } = positions;
        routing::log_sum_exp(features, self.temperature(), mask, layout, self.output)
    }

    /// [`forward`](Self::forward) for a token set `[B, N, C]`, spelled out.
    pub fn forward_tokens(&self, tokens: Tensor<3>) -> Tensor<2> {
        self.forward(tokens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Bool, TensorData, Tolerance};

    fn values(t: Tensor<2>) -> Vec<f32> {
        t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
    }

    #[test]
    fn initial_temperature_is_the_configured_one() {
        let device = Device::flex();
        for r in [1e-3, 0.5, 10.0, 200.0] {
            let lse = LseConfig::new().with_r(r).init(&device);
            let t = lse.temperature().into_scalar::<f32>() as f64;
            assert!((t - r).abs() <= 1e-5 * r + 1e-7, "r = {r}: got {t}");
        }
    }

    /// One channel [0, 1, 2]: LSE at r = 1 is ln((1 + e + e²)/3), between the mean and the max.
    #[test]
    fn documented_value_and_bounds() {
        let device = Device::flex();
        let lse = LseConfig::new().with_r(1.0).init(&device);
        let x = Tensor::<3>::from_floats([[[0.0], [1.0], [2.0]]], &device);
        let expected = ((1.0 + 1f64.exp() + 2f64.exp()) / 3.0).ln() as f32;
        lse.forward_tokens(x.clone())
            .into_data()
            .assert_approx_eq::<f32>(&TensorData::from([[expected]]), Tolerance::default());
        let soft = LseConfig::new()
            .with_r(1.0)
            .with_output(LseOutput::SoftmaxMean)
            .init(&device)
            .forward_tokens(x);
        let z = 1.0 + 1f64.exp() + 2f64.exp();
        let expected = ((1f64.exp() + 2.0 * 2f64.exp()) / z) as f32;
        soft.into_data()
            .assert_approx_eq::<f32>(&TensorData::from([[expected]]), Tolerance::default());
    }

    /// NaN and +∞ at masked positions, and the extreme temperatures, give finite values and
    /// finite gradients for x and ρ.
    #[test]
    fn masked_and_extreme_inputs_keep_gradients_finite() {
        let device = Device::flex().autodiff();
        for r in [2e-4, 0.05, 10.0, 1e4] {
            for output in [LseOutput::LogSumExp, LseOutput::SoftmaxMean] {
                let lse = LseConfig::new().with_r(r).with_output(output).init(&device);
                let x = Tensor::<3>::from_floats(
                    [[[1.0, -3.0e38], [f32::NAN, f32::INFINITY], [0.5, 3.0e38]]],
                    &device,
                )
                .require_grad();
                let mask =
                    Tensor::<2, Bool>::from_bool(TensorData::from([[true, false, true]]), &device);
                let y = lse.forward(PoolingInput::tokens(x.clone()).with_mask(mask));
                let out = values(y.clone());
                assert!(out.iter().all(|v| v.is_finite()), "r = {r}: {out:?}");
                let grads = y.sum().backward();
                let gx = x
                    .grad(&grads)
                    .unwrap()
                    .into_data()
                    .try_to_vec::<f32>()
                    .unwrap();
                let gr = lse.rho.val().grad(&grads).unwrap().into_data();
                let gr = gr.try_to_vec::<f32>().unwrap();
                assert!(
                    gx.iter().chain(&gr).all(|v| v.is_finite()),
                    "r = {r} {output:?}: {gx:?} {gr:?}"
                );
                assert_eq!((gx[2], gx[3]), (0.0, 0.0), "padding gets no gradient");
            }
        }
    }

    #[test]
    #[should_panic(expected = "Lse: `r` must be a finite number > r_min = 0.0001, got 0")]
    fn non_positive_temperature_panics() {
        LseConfig::new().with_r(0.0).init(&Device::flex());
    }

    #[test]
    #[should_panic(expected = "Lse: `r_min` must be a finite number > 0, got NaN")]
    fn nan_floor_panics() {
        LseConfig::new().with_r_min(f64::NAN).init(&Device::flex());
    }

    #[test]
    fn display_and_json() {
        let lse = LseConfig::new().init(&Device::flex());
        assert_eq!(lse.num_params(), 1);
        assert!(
            format!("{lse}").starts_with("Lse {output: LogSumExp"),
            "{lse}"
        );
        let json = LseConfig::new()
            .with_output(LseOutput::SoftmaxMean)
            .to_string();
        let loaded = LseConfig::load_binary(json.as_bytes()).unwrap();
        assert_eq!(loaded.output, LseOutput::SoftmaxMean);
    }
}
