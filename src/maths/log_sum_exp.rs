//! The log-sum-exp pooling of [`Lse`](crate::Lse) and its softmax-weighted mean, with their
//! closed-form gradients (docs/maths.md §8).
//!
//! Per channel, over the valid positions n (count N), with m = max_n x_n, d_n = x_n − m and
//! e_n = exp(r d_n) (every exponent ≤ 0, and e = 1 at the maximum, so Σ e ≥ 1):
//!
//! ```text
//! LSE:          y = m + ln( Σ_n e_n / N ) / r
//! SoftmaxMean:  y = m + Σ_n s_n d_n,        s_n = e_n / Σ_j e_j
//! ∂LSE/∂x_n = s_n                  ∂LSE/∂r = ( Σ_n s_n d_n − (y − m) ) / r
//! ∂SM/∂x_n  = s_n (1 + r (d_n − (y − m)))    ∂SM/∂r = Σ_n s_n d_n (d_n − (y − m))
//! ```
//!
//! The exact LSE rounds to an error of about u/r (u the unit roundoff), which swamps the
//! result once `r (max − min) → 0`; below the crossover `r (max − min) < 4 u^(1/3)` a channel
//! takes the Taylor form `y = m + mean d + (r/2) var d` (∂y/∂x_n = (1 + r (d_n − mean d)) / N,
//! ∂y/∂r = var d / 2) instead, whose truncation error is then of the same size. The
//! differences d are clamped at the dtype's lowest finite value, so values near the float
//! limits give finite outputs and gradients. Padding is selected away, never multiplied by 0.
//!
//! These composites are the portable bodies of the LSE op and the reference its kernels are
//! tested against.

use burn::config::Config;
use burn::tensor::{Bool, DType, Tensor};

use super::precision::unit_roundoff;
use crate::layout::Layout;

/// What [`Lse`](crate::Lse) outputs. Default: the log-sum-exp itself.
#[derive(Config, Copy, Debug, PartialEq, Eq)]
pub enum LseOutput {
    /// `y_c = (1/r) ln((1/N) Σ_n exp(r x_{n,c}))`: the smooth maximum (timm's `LsePlus`).
    LogSumExp,
    /// `y_c = Σ_n softmax_n(r x_{·,c}) x_{n,c}`: the softmax-weighted mean, which is
    /// `Σ_n (∂LSE_c/∂x_{n,c}) x_{n,c}`, the gradient of the log-sum-exp applied to `x`.
    SoftmaxMean,
}

/// `r (max − min)` below which a channel's LSE takes its Taylor form, for `dtype`.
pub(crate) fn taylor_crossover(dtype: DType) -> f64 {
    4.0 * unit_roundoff(dtype).cbrt()
}

/// The dtype's lowest finite value: where `x − m` is clamped, so that an overflowed difference
/// (−∞) cannot meet a zero weight in the temperature's gradient (0 · ∞ = NaN).
fn lowest(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => f64::MIN,
        DType::F16 => -65504.0,
        DType::BF16 => -3.3895e38,
        _ => f32::MIN as f64,
    }
}

/// The per-channel pieces both directions share, with the positions' axis kept (size 1).
struct Parts {
    /// The features with padding replaced by 0.
    x: Tensor<3>,
    /// m, detached.
    top: Tensor<3>,
    /// d = x − m, clamped, 0 at padding.
    d: Tensor<3>,
    /// e = exp(r d), 0 at padding.
    e: Tensor<3>,
    /// N, the valid count.
    valid: Tensor<3>,
    padding: Option<Tensor<3, Bool>>,
    axis: usize,
}

impl Parts {
    fn new(x: Tensor<3>, r: Tensor<3>, mask: Option<Tensor<2, Bool>>, layout: Layout) -> Self {
        let dims = x.dims();
        let dtype = x.dtype();
        let axis = layout.position_axis();
        let padding: Option<Tensor<3, Bool>> = mask.as_ref().map(|mask| {
            mask.clone()
                .bool_not()
                .unsqueeze_dim::<3>(layout.channel_axis())
                .expand(dims)
        });
        let valid: Tensor<3> = match &mask {
            Some(mask) => mask
                .clone()
                .float()
                .sum_dim(1)
                .unsqueeze_dim::<3>(layout.channel_axis()),
            None => Tensor::full([dims[0], 1, 1], dims[axis] as f64, &x.device()),
        };
        let mut parts = Self {
            x: x.clone(),
            top: x.clone(),
            d: x.clone(),
            e: x,
            valid,
            padding,
            axis,
        };
        // Selection, never multiplication: padding values are replaced, not weighted by 0.
        parts.x = parts.select(parts.x.clone(), 0.0);
        parts.top = parts
            .select(parts.x.clone(), f64::NEG_INFINITY)
            .max_dim(axis)
            .detach();
        let d = (parts.x.clone() - parts.top.clone()).clamp_min(lowest(dtype));
        parts.d = parts.select(d, 0.0);
        parts.e = parts.select((parts.d.clone() * r).exp(), 0.0);
        parts
    }

    fn select(&self, t: Tensor<3>, fill: f64) -> Tensor<3> {
        match &self.padding {
            Some(padding) => t.mask_fill(padding.clone(), fill),
            None => t,
        }
    }

    /// The channels `[B, 1 or C, C or 1]` whose LSE takes the Taylor form.
    fn taylor(&self, r: &Tensor<3>) -> Tensor<3, Bool> {
        let bottom = self
            .select(self.x.clone(), f64::INFINITY)
            .min_dim(self.axis)
            .detach();
        let spread = (self.top.clone() - bottom) * r.clone().detach();
        spread.lower_elem(taylor_crossover(self.x.dtype()))
    }

    /// (mean d, d − mean d at valid positions, var d) of the Taylor channels (zeros fed to
    /// the others, so that nothing non-finite enters an unused branch).
    fn moments(&self, taylor: &Tensor<3, Bool>) -> (Tensor<3>, Tensor<3>, Tensor<3>) {
        let dims = self.d.dims();
        let d = self
            .d
            .clone()
            .mask_fill(taylor.clone().bool_not().expand(dims), 0.0);
        let mean = d.clone().sum_dim(self.axis) / self.valid.clone();
        let deviation = self.select(d - mean.clone(), 0.0);
        let variance =
            (deviation.clone() * deviation.clone()).sum_dim(self.axis) / self.valid.clone();
        (mean, deviation, variance)
    }
}

/// LSE or its softmax mean `[B, C]` of `x` (`[B, C, N]` or `[B, N, C]` as `layout` says) with
/// temperature `r` `[1]` over the positions `mask` `[B, N]` marks valid (all when `None`).
/// Differentiable by autodiff.
pub(crate) fn composite_forward(
    x: Tensor<3>,
    r: Tensor<1>,
    mask: Option<Tensor<2, Bool>>,
    layout: Layout,
    output: LseOutput,
) -> Tensor<2> {
    let (batch, _, channels) = layout.split(x.dims());
    let r3 = r.reshape([1, 1, 1]);
    let parts = Parts::new(x, r3.clone(), mask, layout);
    let axis = parts.axis;
    let pooled = match output {
        LseOutput::SoftmaxMean => {
            parts.top.clone()
                + (parts.e.clone() * parts.d.clone()).sum_dim(axis) / parts.e.clone().sum_dim(axis)
        }
        LseOutput::LogSumExp => {
            let exact = parts.top.clone()
                + (parts.e.clone().sum_dim(axis) / parts.valid.clone()).log() / r3.clone();
            let taylor = parts.taylor(&r3);
            let (mean, _, variance) = parts.moments(&taylor);
            let series = parts.top.clone() + mean + variance * r3.div_scalar(2.0);
            exact.mask_where(taylor, series)
        }
    };
    pooled.reshape([batch, channels])
}

/// (∂L/∂x in `x`'s layout, ∂L/∂r `[1]`) of [`composite_forward`] from its `output` `[B, C]`
/// and ∂L/∂output `grad` `[B, C]`, in closed form (module docs).
pub(crate) fn composite_backward(
    x: Tensor<3>,
    r: Tensor<1>,
    mask: Option<Tensor<2, Bool>>,
    output: Tensor<2>,
    grad: Tensor<2>,
    layout: Layout,
    kind: LseOutput,
) -> (Tensor<3>, Tensor<1>) {
    let (batch, _, channels) = layout.split(x.dims());
    let r3 = r.reshape([1, 1, 1]);
    let parts = Parts::new(x, r3.clone(), mask, layout);
    let axis = parts.axis;
    let as3 = |t: Tensor<2>| t.reshape(layout.dims(batch, 1, channels));
    let (y, g) = (as3(output) - parts.top.clone(), as3(grad));
    let softmax = parts.e.clone() / parts.e.clone().sum_dim(axis);
    let weighted = (softmax.clone() * parts.d.clone()).sum_dim(axis);
    let (dx, dr) = match kind {
        LseOutput::SoftmaxMean => {
            let centred = parts.d.clone() - y;
            // s (d − y) first: s is 0 where d is far below (an overflow of r (d − y) would
            // meet it as 0 · ∞).
            let dx = ((softmax.clone() * centred.clone()) * r3 + softmax.clone()) * g.clone();
            let dr = (softmax * parts.d.clone() * centred).sum_dim(axis) * g;
            (dx, dr)
        }
        LseOutput::LogSumExp => {
            let taylor = parts.taylor(&r3);
            let (_, deviation, variance) = parts.moments(&taylor);
            let exact_dx = softmax * g.clone();
            let exact_dr = (weighted - y) / r3.clone() * g.clone();
            let series_dx = (deviation * r3 + 1.0) / parts.valid.clone() * g.clone();
            let series_dr = variance.div_scalar(2.0) * g;
            let dims = exact_dx.dims();
            let dx = exact_dx.mask_where(taylor.clone().expand(dims), series_dx);
            (dx, exact_dr.mask_where(taylor, series_dr))
        }
    };
    (parts.select(dx, 0.0), dr.sum().reshape([1]))
}
