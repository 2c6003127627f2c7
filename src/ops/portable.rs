//! Backend-independent bodies of [`PoolingOps`](super::PoolingOps), written with the `Tensor`
//! API on the backend's primitives.

use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Backend, DispatchKindConversion, DispatchTensor};
use burn::tensor::Tensor;

use crate::pooling::generalized_mean::{composite_backward, composite_forward};
use crate::transport::TransportSettings;
use crate::transport::costs::{composite_costs, costs_gradient};
use crate::transport::implicit_backward::implicit_cost_gradient;
use crate::transport::marginals::{marginals_gradient_as_plan_gradient, marginals_of};
use crate::transport::solver::{iterations_tensor, solve};

fn wrap<B: Backend, const D: usize>(primitive: FloatTensor<B>) -> Tensor<D>
where
    DispatchTensor: DispatchKindConversion<B>,
{
    Tensor::from_primitive::<B>(primitive)
}

fn unwrap<B: Backend, const D: usize>(tensor: Tensor<D>) -> FloatTensor<B>
where
    DispatchTensor: DispatchKindConversion<B>,
{
    tensor
        .try_into_primitive::<B>()
        .expect("the result lives on the backend it was computed on")
}

#[cfg_attr(not(any(feature = "ndarray", feature = "wgpu")), allow(dead_code))]
pub fn partial_transport<B: Backend>(
    costs: FloatTensor<B>,
    mass: FloatTensor<B>,
    settings: TransportSettings,
) -> (FloatTensor<B>, IntTensor<B>)
where
    DispatchTensor: DispatchKindConversion<B>,
{
    let costs: Tensor<3> = wrap::<B, 3>(costs);
    let device = costs.device();
    let (plan, iterations) = solve(costs, wrap::<B, 2>(mass), &settings);
    let iterations = iterations_tensor(iterations, &device)
        .try_into_primitive::<B>()
        .expect("the result lives on the backend it was computed on");
    (unwrap::<B, 3>(plan), iterations)
}

#[cfg_attr(not(any(feature = "ndarray", feature = "wgpu")), allow(dead_code))]
pub fn partial_transport_backward<B: Backend>(
    plan: FloatTensor<B>,
    grad: FloatTensor<B>,
    mass: FloatTensor<B>,
    epsilon: f64,
) -> FloatTensor<B>
where
    DispatchTensor: DispatchKindConversion<B>,
{
    unwrap::<B, 3>(implicit_cost_gradient(
        wrap::<B, 3>(plan),
        wrap::<B, 3>(grad),
        wrap::<B, 2>(mass),
        epsilon,
    ))
}

#[cfg_attr(not(any(feature = "ndarray", feature = "wgpu")), allow(dead_code))]
pub fn transport_marginals<B: Backend>(
    costs: FloatTensor<B>,
    mass: FloatTensor<B>,
    settings: TransportSettings,
) -> (FloatTensor<B>, FloatTensor<B>, IntTensor<B>)
where
    DispatchTensor: DispatchKindConversion<B>,
{
    let (plan, iterations) = partial_transport::<B>(costs, mass, settings);
    let marginals = marginals_of(wrap::<B, 3>(plan.clone()));
    (unwrap::<B, 2>(marginals), plan, iterations)
}

#[cfg_attr(not(any(feature = "ndarray", feature = "wgpu")), allow(dead_code))]
pub fn transport_marginals_backward<B: Backend>(
    plan: FloatTensor<B>,
    grad: FloatTensor<B>,
    mass: FloatTensor<B>,
    epsilon: f64,
) -> FloatTensor<B>
where
    DispatchTensor: DispatchKindConversion<B>,
{
    let plan = wrap::<B, 3>(plan);
    let grad = marginals_gradient_as_plan_gradient(wrap::<B, 2>(grad), plan.dims());
    unwrap::<B, 3>(implicit_cost_gradient(
        plan,
        grad,
        wrap::<B, 2>(mass),
        epsilon,
    ))
}

// Used by the backends without a fused kernel: NdArray, and Cube under Burn's `fusion` feature
// (the reference of Cube's kernels in their tests).
#[cfg_attr(not(any(feature = "ndarray", feature = "wgpu")), allow(dead_code))]
pub fn transport_costs<B: Backend>(
    features: FloatTensor<B>,
    prototypes: FloatTensor<B>,
    channels_last: bool,
) -> FloatTensor<B>
where
    DispatchTensor: DispatchKindConversion<B>,
{
    unwrap::<B, 3>(composite_costs(
        wrap::<B, 3>(features),
        wrap::<B, 2>(prototypes),
        if channels_last { 2 } else { 1 },
    ))
}

#[cfg_attr(not(any(feature = "ndarray", feature = "wgpu")), allow(dead_code))]
pub fn transport_costs_backward<B: Backend>(
    features: FloatTensor<B>,
    prototypes: FloatTensor<B>,
    costs: FloatTensor<B>,
    grad: FloatTensor<B>,
    channels_last: bool,
) -> (FloatTensor<B>, FloatTensor<B>)
where
    DispatchTensor: DispatchKindConversion<B>,
{
    let (features, prototypes) = costs_gradient(
        wrap::<B, 3>(features),
        wrap::<B, 2>(prototypes),
        wrap::<B, 3>(costs),
        wrap::<B, 3>(grad),
        if channels_last { 2 } else { 1 },
    );
    (unwrap::<B, 3>(features), unwrap::<B, 2>(prototypes))
}

#[cfg_attr(not(any(feature = "ndarray", feature = "wgpu")), allow(dead_code))]
pub fn generalized_mean<B: Backend>(
    x: FloatTensor<B>,
    powers: FloatTensor<B>,
    mask: FloatTensor<B>,
    eps: f64,
    channels_last: bool,
) -> FloatTensor<B>
where
    DispatchTensor: DispatchKindConversion<B>,
{
    unwrap::<B, 2>(composite_forward(
        wrap::<B, 3>(x),
        wrap::<B, 1>(powers),
        Some(wrap::<B, 2>(mask)),
        eps,
        if channels_last { 1 } else { 2 },
    ))
}

#[cfg_attr(not(any(feature = "ndarray", feature = "wgpu")), allow(dead_code))]
pub fn generalized_mean_backward<B: Backend>(
    x: FloatTensor<B>,
    powers: FloatTensor<B>,
    mask: FloatTensor<B>,
    output: FloatTensor<B>,
    grad: FloatTensor<B>,
    eps: f64,
    channels_last: bool,
) -> (FloatTensor<B>, FloatTensor<B>)
where
    DispatchTensor: DispatchKindConversion<B>,
{
    let (dx, dp) = composite_backward(
        wrap::<B, 3>(x),
        wrap::<B, 1>(powers),
        wrap::<B, 2>(mask),
        wrap::<B, 2>(output),
        wrap::<B, 2>(grad),
        eps,
        if channels_last { 1 } else { 2 },
    );
    (unwrap::<B, 3>(dx), unwrap::<B, 1>(dp))
}

#[cfg_attr(not(any(feature = "ndarray", feature = "wgpu")), allow(dead_code))]
pub fn weighted_sum<B: Backend>(
    x: FloatTensor<B>,
    weights: FloatTensor<B>,
    channels_last: bool,
) -> FloatTensor<B>
where
    DispatchTensor: DispatchKindConversion<B>,
{
    let axis = if channels_last { 1 } else { 2 };
    let weights = wrap::<B, 2>(weights).unsqueeze_dim::<3>(3 - axis);
    unwrap::<B, 2>((wrap::<B, 3>(x) * weights).sum_dim(axis).squeeze_dim(axis))
}

#[cfg_attr(not(any(feature = "ndarray", feature = "wgpu")), allow(dead_code))]
pub fn weighted_sum_features_backward<B: Backend>(
    weights: FloatTensor<B>,
    grad: FloatTensor<B>,
    channels_last: bool,
) -> FloatTensor<B>
where
    DispatchTensor: DispatchKindConversion<B>,
{
    let axis = if channels_last { 1 } else { 2 };
    let weights = wrap::<B, 2>(weights).unsqueeze_dim::<3>(3 - axis);
    unwrap::<B, 3>(wrap::<B, 2>(grad).unsqueeze_dim::<3>(axis) * weights)
}

#[cfg_attr(not(any(feature = "ndarray", feature = "wgpu")), allow(dead_code))]
pub fn weighted_sum_weights_backward<B: Backend>(
    x: FloatTensor<B>,
    grad: FloatTensor<B>,
    channels_last: bool,
) -> FloatTensor<B>
where
    DispatchTensor: DispatchKindConversion<B>,
{
    let axis = if channels_last { 1 } else { 2 };
    let channel_axis = 3 - axis;
    let grad = wrap::<B, 2>(grad).unsqueeze_dim::<3>(axis);
    unwrap::<B, 2>(
        (wrap::<B, 3>(x) * grad)
            .sum_dim(channel_axis)
            .squeeze_dim(channel_axis),
    )
}
