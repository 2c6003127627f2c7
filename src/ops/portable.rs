//! The default bodies of [`PoolingOps`](super::PoolingOps): the reference maths of
//! [`crate::maths`] on the backend's primitives, through its [`TensorBridge`]. Cube's kernels
//! also fall back to them when Burn's fusion wraps the backend.

use burn::backend::TensorMetadata;
use burn::backend::tensor::{BoolTensor, FloatTensor, IntTensor};
use burn::tensor::Shape;

use super::{SumOver, TensorBridge, TransportOutput};
use crate::layout::Layout;
use crate::maths::balanced::{self, BalancedSettings};
use crate::maths::costs::{composite_costs, costs_gradient};
use crate::maths::generalized_mean::{composite_backward, composite_forward};
use crate::maths::implicit_backward::implicit_cost_gradient;
use crate::maths::l2_normalize;
use crate::maths::log_sum_exp::{self, LseOutput};
use crate::maths::marginals::{marginals_gradient_as_plan_gradient, marginals_of};
use crate::maths::relu_dropout;
use crate::maths::settings::TransportSettings;
use crate::maths::solver::{report_tensors, solve};
use crate::maths::weighted_sum;

pub(crate) fn transport_costs<B: TensorBridge>(
    features: FloatTensor<B>,
    prototypes: FloatTensor<B>,
    layout: Layout,
) -> FloatTensor<B> {
    B::unwrap(composite_costs(
        B::wrap(features),
        B::wrap(prototypes),
        layout,
    ))
}

pub(crate) fn transport_costs_backward<B: TensorBridge>(
    features: FloatTensor<B>,
    prototypes: FloatTensor<B>,
    costs: FloatTensor<B>,
    grad: FloatTensor<B>,
    layout: Layout,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let (features, prototypes) = (B::wrap(features), B::wrap(prototypes));
    let (d_features, d_prototypes) =
        costs_gradient(features, prototypes, B::wrap(costs), B::wrap(grad), layout);
    (B::unwrap(d_features), B::unwrap(d_prototypes))
}

pub(crate) fn partial_transport<B: TensorBridge>(
    costs: FloatTensor<B>,
    mass: FloatTensor<B>,
    settings: TransportSettings,
    output: TransportOutput,
) -> (FloatTensor<B>, FloatTensor<B>, IntTensor<B>, BoolTensor<B>) {
    let costs = B::wrap::<3>(costs);
    let device = costs.device();
    let (plan, report) = solve(costs, B::wrap(mass), &settings);
    let first = match output {
        TransportOutput::Plan => B::unwrap(plan.clone()),
        TransportOutput::Marginals => B::unwrap(marginals_of(plan.clone())),
    };
    let (iterations, converged) = report_tensors(report, &device);
    (
        first,
        B::unwrap(plan),
        B::unwrap_int(iterations),
        B::unwrap_bool(converged),
    )
}

pub(crate) fn partial_transport_backward<B: TensorBridge>(
    plan: FloatTensor<B>,
    grad: FloatTensor<B>,
    mass: FloatTensor<B>,
    epsilon: f64,
    output: TransportOutput,
) -> FloatTensor<B> {
    let plan = B::wrap::<3>(plan);
    let grad = match output {
        TransportOutput::Plan => B::wrap(grad),
        TransportOutput::Marginals => {
            marginals_gradient_as_plan_gradient(B::wrap(grad), plan.dims())
        }
    };
    B::unwrap(implicit_cost_gradient(plan, grad, B::wrap(mass), epsilon))
}

pub(crate) fn balanced_transport<B: TensorBridge>(
    costs: FloatTensor<B>,
    row_mass: FloatTensor<B>,
    column_mass: FloatTensor<B>,
    settings: BalancedSettings,
) -> (FloatTensor<B>, IntTensor<B>, BoolTensor<B>) {
    let costs = B::wrap::<3>(costs);
    let device = costs.device();
    let (plan, report) = balanced::solve(costs, B::wrap(row_mass), B::wrap(column_mass), &settings);
    let (iterations, converged) = report_tensors(report, &device);
    (
        B::unwrap(plan),
        B::unwrap_int(iterations),
        B::unwrap_bool(converged),
    )
}

pub(crate) fn balanced_transport_backward<B: TensorBridge>(
    plan: FloatTensor<B>,
    grad: FloatTensor<B>,
    epsilon: f64,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    let (costs, rows, columns) =
        balanced::implicit_gradients(B::wrap(plan), B::wrap(grad), epsilon);
    (B::unwrap(costs), B::unwrap(rows), B::unwrap(columns))
}

pub(crate) fn generalized_mean<B: TensorBridge>(
    x: FloatTensor<B>,
    powers: FloatTensor<B>,
    mask: FloatTensor<B>,
    eps: f64,
    layout: Layout,
) -> FloatTensor<B> {
    let (x, powers, mask) = (B::wrap(x), B::wrap(powers), B::wrap(mask));
    B::unwrap(composite_forward(x, powers, Some(mask), eps, layout))
}

pub(crate) fn generalized_mean_backward<B: TensorBridge>(
    x: FloatTensor<B>,
    powers: FloatTensor<B>,
    mask: FloatTensor<B>,
    output: FloatTensor<B>,
    grad: FloatTensor<B>,
    eps: f64,
    layout: Layout,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let (x, powers, mask) = (B::wrap(x), B::wrap(powers), B::wrap(mask));
    let (output, grad) = (B::wrap(output), B::wrap(grad));
    let (dx, dp) = composite_backward(x, powers, mask, output, grad, eps, layout);
    (B::unwrap(dx), B::unwrap(dp))
}

pub(crate) fn log_sum_exp<B: TensorBridge>(
    x: FloatTensor<B>,
    r: FloatTensor<B>,
    mask: FloatTensor<B>,
    layout: Layout,
    output: LseOutput,
) -> FloatTensor<B> {
    let mask = B::wrap::<2>(mask).greater_elem(0.5);
    B::unwrap(log_sum_exp::composite_forward(
        B::wrap(x),
        B::wrap(r),
        Some(mask),
        layout,
        output,
    ))
}

pub(crate) fn log_sum_exp_backward<B: TensorBridge>(
    x: FloatTensor<B>,
    r: FloatTensor<B>,
    mask: FloatTensor<B>,
    output: FloatTensor<B>,
    grad: FloatTensor<B>,
    layout: Layout,
    kind: LseOutput,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let mask = B::wrap::<2>(mask).greater_elem(0.5);
    let (dx, dr) = log_sum_exp::composite_backward(
        B::wrap(x),
        B::wrap(r),
        Some(mask),
        B::wrap(output),
        B::wrap(grad),
        layout,
        kind,
    );
    (B::unwrap(dx), B::unwrap(dr))
}

pub(crate) fn weighted_sum<B: TensorBridge>(
    x: FloatTensor<B>,
    vector: FloatTensor<B>,
    layout: Layout,
    over: SumOver,
) -> FloatTensor<B> {
    let (x, vector) = (B::wrap(x), B::wrap(vector));
    B::unwrap(match over {
        SumOver::Positions => weighted_sum::weighted_sum(x, vector, layout),
        SumOver::Channels => weighted_sum::weighted_sum_weights_backward(x, vector, layout),
    })
}

pub(crate) fn weighted_sum_features_backward<B: TensorBridge>(
    weights: FloatTensor<B>,
    grad: FloatTensor<B>,
    layout: Layout,
) -> FloatTensor<B> {
    B::unwrap(weighted_sum::weighted_sum_features_backward(
        B::wrap(weights),
        B::wrap(grad),
        layout,
    ))
}

pub(crate) fn bias_relu_dropout<B: TensorBridge>(
    hidden: FloatTensor<B>,
    bias: FloatTensor<B>,
    drop: f64,
) -> FloatTensor<B> {
    B::unwrap(relu_dropout::composite_forward(
        B::wrap(hidden),
        B::wrap(bias),
        drop,
    ))
}

pub(crate) fn bias_relu_dropout_backward<B: TensorBridge>(
    output: FloatTensor<B>,
    grad: FloatTensor<B>,
    drop: f64,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let (d_hidden, d_bias) =
        relu_dropout::closed_form_backward(B::wrap(output), B::wrap(grad), drop);
    (B::unwrap(d_hidden), B::unwrap(d_bias))
}

pub(crate) fn l2_normalize<B: TensorBridge>(
    x: FloatTensor<B>,
    axis: usize,
) -> (FloatTensor<B>, FloatTensor<B>) {
    // The bridge only speaks fixed ranks: the rank-3 view with `axis` in the middle.
    let dims = x.shape();
    let (view, kept) = l2_normalize::around_axis(&dims, axis);
    let x = B::wrap::<3>(B::float_reshape(x, Shape::new(view)));
    let (y, d) = l2_normalize::composite_forward(x, 1);
    (
        B::float_reshape(B::unwrap(y), dims),
        B::float_reshape(B::unwrap(d), kept),
    )
}

pub(crate) fn l2_normalize_backward<B: TensorBridge>(
    output: FloatTensor<B>,
    denominator: FloatTensor<B>,
    grad: FloatTensor<B>,
    axis: usize,
) -> FloatTensor<B> {
    let dims = output.shape();
    let (view, _) = l2_normalize::around_axis(&dims, axis);
    let [outer, _, inner] = view;
    let wrap = |t: FloatTensor<B>, shape: Shape| B::wrap::<3>(B::float_reshape(t, shape));
    let dx = l2_normalize::closed_form_backward(
        wrap(output, Shape::new(view)),
        wrap(denominator, Shape::new([outer, 1, inner])),
        wrap(grad, Shape::new(view)),
        1,
    );
    B::float_reshape(B::unwrap(dx), dims)
}
