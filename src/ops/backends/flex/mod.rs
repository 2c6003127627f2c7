//! Fused CPU kernels of [`PoolingOps`] for Flex, one file per op, each with its closed-form
//! backward: threads over the batch, plain element-wise loops that the compiler vectorises,
//! matrix products through `gemm` on strided views (no transposed copies), f32 `ln`/`exp` as
//! short polynomials. Every kernel is tested against the portable (composite) body.

mod costs;
mod generalized_mean;
mod product;
mod real;
mod simd;
mod transport;
mod weighted_sum;

use burn::backend::Flex;
use burn::backend::TensorMetadata;
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::tensor::{DType, Element, TensorData};

use crate::ops::PoolingOps;
use crate::transport::TransportSettings;

/// Runs `$body` with the type `$t` bound to the element type of `$dtype` (f32 or f64).
macro_rules! with_float {
    ($dtype:expr, $op:literal, $t:ident => $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $t = f32;
                $body
            }
            DType::F64 => {
                type $t = f64;
                $body
            }
            dtype => panic!("{}: unsupported float dtype {dtype:?}", $op),
        }
    };
}

impl PoolingOps for Flex {
    fn transport_costs(
        features: FloatTensor<Self>,
        prototypes: FloatTensor<Self>,
        channels_last: bool,
    ) -> FloatTensor<Self> {
        let shape = Shape3::of(&features, channels_last);
        let [count, _] = dims2(&prototypes);
        let (features, prototypes) = (features.to_contiguous(), prototypes.to_contiguous());
        with_float!(features.dtype(), "transport costs", T => {
            tensor(
                costs::forward::<T>(view(&features), view(&prototypes), count, shape),
                [shape.batch, count, shape.positions],
            )
        })
    }

    fn transport_costs_backward(
        features: FloatTensor<Self>,
        prototypes: FloatTensor<Self>,
        costs: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        channels_last: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let shape = Shape3::of(&features, channels_last);
        let dims = features.shape().clone();
        let prototype_dims = dims2(&prototypes);
        let [features, prototypes, costs, grad] =
            [features, prototypes, costs, grad].map(|t| t.to_contiguous());
        with_float!(features.dtype(), "transport costs", T => {
            let (d_features, d_prototypes) = costs::backward::<T>(
                view(&features),
                view(&prototypes),
                view(&costs),
                view(&grad),
                prototype_dims[0],
                shape,
            );
            (tensor(d_features, dims.clone()), tensor(d_prototypes, prototype_dims))
        })
    }

    fn partial_transport(
        costs: FloatTensor<Self>,
        mass: FloatTensor<Self>,
        settings: TransportSettings,
    ) -> (FloatTensor<Self>, IntTensor<Self>) {
        let [batch, count, positions] = dims3(&costs);
        let (costs, mass) = (costs.to_contiguous(), mass.to_contiguous());
        let (plan, iterations) = with_float!(costs.dtype(), "partial transport", T => {
            let (plan, iterations) =
                transport::forward::<T>(view(&costs), view(&mass), count, positions, &settings);
            (tensor(plan, [batch, count + 1, positions]), iterations)
        });
        (plan, tensor(vec![iterations as i64], [1]))
    }

    fn partial_transport_backward(
        plan: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        mass: FloatTensor<Self>,
        epsilon: f64,
    ) -> FloatTensor<Self> {
        transport_gradient(plan, grad, mass, epsilon, false)
    }

    fn transport_marginals(
        costs: FloatTensor<Self>,
        mass: FloatTensor<Self>,
        settings: TransportSettings,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, IntTensor<Self>) {
        let (plan, iterations) = Self::partial_transport(costs, mass, settings);
        let [batch, rows, positions] = dims3(&plan);
        let marginals = with_float!(plan.dtype(), "transport marginals", T => {
            tensor(
                transport::marginals::<T>(view(&plan), [rows - 1, positions]),
                [batch, positions + rows - 1],
            )
        });
        (marginals, plan, iterations)
    }

    fn transport_marginals_backward(
        plan: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        mass: FloatTensor<Self>,
        epsilon: f64,
    ) -> FloatTensor<Self> {
        transport_gradient(plan, grad, mass, epsilon, true)
    }

    fn generalized_mean(
        x: FloatTensor<Self>,
        powers: FloatTensor<Self>,
        mask: FloatTensor<Self>,
        eps: f64,
        channels_last: bool,
    ) -> FloatTensor<Self> {
        let shape = Shape3::of(&x, channels_last);
        let (x, powers, mask) = (
            x.to_contiguous(),
            powers.to_contiguous(),
            mask.to_contiguous(),
        );
        with_float!(x.dtype(), "generalized mean", T => {
            tensor(
                generalized_mean::forward::<T>(view(&x), view(&powers), view(&mask), eps, shape),
                [shape.batch, shape.channels],
            )
        })
    }

    fn generalized_mean_backward(
        x: FloatTensor<Self>,
        powers: FloatTensor<Self>,
        mask: FloatTensor<Self>,
        output: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        eps: f64,
        channels_last: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let shape = Shape3::of(&x, channels_last);
        let dims = x.shape().clone();
        let [x, powers, mask, output, grad] =
            [x, powers, mask, output, grad].map(|t| t.to_contiguous());
        with_float!(x.dtype(), "generalized mean", T => {
            let (dx, dp) = generalized_mean::backward::<T>(
                view(&x),
                view(&powers),
                view(&mask),
                view(&output),
                view(&grad),
                eps,
                shape,
            );
            (tensor(dx, dims.clone()), tensor(dp, [shape.channels]))
        })
    }

    fn weighted_sum(
        x: FloatTensor<Self>,
        weights: FloatTensor<Self>,
        channels_last: bool,
    ) -> FloatTensor<Self> {
        let shape = Shape3::of(&x, channels_last);
        let (x, weights) = (x.to_contiguous(), weights.to_contiguous());
        with_float!(x.dtype(), "weighted sum", T => {
            tensor(
                weighted_sum::forward::<T>(view(&x), view(&weights), shape),
                [shape.batch, shape.channels],
            )
        })
    }

    fn weighted_sum_features_backward(
        weights: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        channels_last: bool,
    ) -> FloatTensor<Self> {
        let ([batch, positions], [_, channels]) = (dims2(&weights), dims2(&grad));
        let shape = Shape3 {
            batch,
            positions,
            channels,
            channels_last,
        };
        let dims = if channels_last {
            [batch, positions, channels]
        } else {
            [batch, channels, positions]
        };
        let (weights, grad) = (weights.to_contiguous(), grad.to_contiguous());
        with_float!(grad.dtype(), "weighted sum", T => {
            tensor(
                weighted_sum::features_backward::<T>(view(&weights), view(&grad), shape),
                dims,
            )
        })
    }

    fn weighted_sum_weights_backward(
        x: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        channels_last: bool,
    ) -> FloatTensor<Self> {
        let shape = Shape3::of(&x, channels_last);
        let (x, grad) = (x.to_contiguous(), grad.to_contiguous());
        with_float!(x.dtype(), "weighted sum", T => {
            tensor(
                weighted_sum::weights_backward::<T>(view(&x), view(&grad), shape),
                [shape.batch, shape.positions],
            )
        })
    }
}

/// ∂L/∂costs `[B, K, N]` from the plan `[B, K+1, N]`, the masses and ∂L/∂plan, or
/// ∂L/∂marginals `[B, N + K]` when `marginals`.
fn transport_gradient(
    plan: FlexTensor,
    grad: FlexTensor,
    mass: FlexTensor,
    epsilon: f64,
    marginals: bool,
) -> FlexTensor {
    let [batch, rows, positions] = dims3(&plan);
    let [plan, grad, mass] = [plan, grad, mass].map(|t| t.to_contiguous());
    with_float!(plan.dtype(), "partial transport", T => {
        let kernel = if marginals {
            transport::marginals_backward::<T>
        } else {
            transport::backward::<T>
        };
        tensor(
            kernel(view(&plan), view(&grad), view(&mass), [rows - 1, positions], epsilon),
            [batch, rows - 1, positions],
        )
    })
}

fn dims2(tensor: &FlexTensor) -> [usize; 2] {
    let dims = tensor.shape();
    [dims[0], dims[1]]
}

fn dims3(tensor: &FlexTensor) -> [usize; 3] {
    let dims = tensor.shape();
    [dims[0], dims[1], dims[2]]
}

/// The elements of a contiguous Flex tensor.
fn view<T: Element + bytemuck::Pod>(tensor: &FlexTensor) -> &[T] {
    tensor
        .as_slice::<T>()
        .expect("a contiguous tensor of the kernel's dtype")
}

fn tensor<T: Element, S: Into<burn::tensor::Shape>>(values: Vec<T>, shape: S) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

/// `[B, C, N]` (channels first, one contiguous row per channel) or `[B, N, C]`.
#[derive(Clone, Copy, Debug)]
struct Shape3 {
    batch: usize,
    positions: usize,
    channels: usize,
    channels_last: bool,
}

impl Shape3 {
    fn of(x: &FlexTensor, channels_last: bool) -> Self {
        let dims = x.shape();
        let (positions, channels) = if channels_last {
            (dims[1], dims[2])
        } else {
            (dims[2], dims[1])
        };
        Self {
            batch: dims[0],
            positions,
            channels,
            channels_last,
        }
    }
}
