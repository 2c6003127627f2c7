//! The `Tensor`-level face of the extension, what the layers and the public transport API
//! call: each op runs on [`PoolingOps`] where [`extension_covers`] the device (a kernel with
//! its analytical backward), and as the reference composite, differentiated by ordinary
//! autodiff, elsewhere. This file is the only place that makes that choice.

use burn::backend::Dispatch;
use burn::backend::tensor::FloatTensor;
use burn::tensor::{Bool, Int, Tensor};

use super::{PoolingOps, SumOver, TransportOutput, extension_covers};
use crate::layout::Layout;
use crate::maths::balanced::{BalancedSettings, solve_with_tracked_step};
use crate::maths::costs::composite_costs;
use crate::maths::generalized_mean::composite_forward;
use crate::maths::marginals::marginals_of;
use crate::maths::newton_step::partial_transport_newton_step;
use crate::maths::settings::TransportSettings;
use crate::maths::weighted_sum;

/// GSP's costs `[B, K, N]` of features `[B, C, N]` or `[B, N, C]` and prototypes `[K, C]`.
pub(crate) fn transport_costs(
    features: Tensor<3>,
    prototypes: Tensor<2>,
    layout: Layout,
) -> Tensor<3> {
    route(
        (features, prototypes, layout),
        <Dispatch as PoolingOps>::transport_costs,
        composite_costs,
    )
}

/// How a transport solve ended: the iterations run `[1]` (the most over the samples) and
/// whether every sample converged `[1]`.
pub(crate) type SolveStatus = (Tensor<1, Int>, Tensor<1, Bool>);

/// The plan `[B, K+1, N]` and how the solve ended.
pub(crate) fn partial_transport(
    costs: Tensor<3>,
    mass: Tensor<2>,
    settings: &TransportSettings,
) -> (Tensor<3>, SolveStatus) {
    solve(costs, mass, settings, TransportOutput::Plan, |plan| plan)
}

/// The marginals `[B, N + K]` (the mass each position sends, then the mass each prototype
/// receives) and how the solve ended: all GSP's pooling reads of the plan.
pub(crate) fn transport_marginals(
    costs: Tensor<3>,
    mass: Tensor<2>,
    settings: &TransportSettings,
) -> (Tensor<2>, SolveStatus) {
    solve(
        costs,
        mass,
        settings,
        TransportOutput::Marginals,
        marginals_of,
    )
}

/// The solve behind both: the extension returns `output` itself; the tracked Newton step
/// returns the plan, which `from_plan` turns into `output`.
fn solve<const D: usize>(
    costs: Tensor<3>,
    mass: Tensor<2>,
    settings: &TransportSettings,
    output: TransportOutput,
    from_plan: impl FnOnce(Tensor<3>) -> Tensor<D>,
) -> (Tensor<D>, SolveStatus) {
    if extension_covers(&costs.device()) {
        let (first, _plan, iterations, converged) = <Dispatch as PoolingOps>::partial_transport(
            costs.into_dispatch(),
            mass.into_dispatch(),
            *settings,
            output,
        );
        (
            Tensor::from_dispatch(first),
            (
                Tensor::from_dispatch(iterations),
                Tensor::from_dispatch(converged),
            ),
        )
    } else {
        let (plan, iterations, converged) = partial_transport_newton_step(costs, mass, settings);
        (from_plan(plan), (iterations, converged))
    }
}

/// The balanced plan `[B, K', N]` of costs `[B, K', N]` and masses `[B, K']`, `[B, N]`, and how
/// the solve ended: the op with its implicit backward where the extension covers the device,
/// else the solved plan rebuilt with tracked ops whose derivative is the implicit one.
pub(crate) fn balanced_transport(
    costs: Tensor<3>,
    row_mass: Tensor<2>,
    column_mass: Tensor<2>,
    settings: &BalancedSettings,
) -> (Tensor<3>, SolveStatus) {
    if extension_covers(&costs.device()) {
        let (plan, iterations, converged) = <Dispatch as PoolingOps>::balanced_transport(
            costs.into_dispatch(),
            row_mass.into_dispatch(),
            column_mass.into_dispatch(),
            *settings,
        );
        (
            Tensor::from_dispatch(plan),
            (
                Tensor::from_dispatch(iterations),
                Tensor::from_dispatch(converged),
            ),
        )
    } else {
        let (plan, iterations, converged) =
            solve_with_tracked_step(costs, row_mass, column_mass, settings);
        (plan, (iterations, converged))
    }
}

/// The generalized mean `[B, C]` of features in `layout` with powers `[C]` over the positions
/// where the layer's `mask` `[B, N]` is true (all of them when it is `None`).
pub(crate) fn generalized_mean(
    x: Tensor<3>,
    powers: Tensor<1>,
    mask: Option<Tensor<2, Bool>>,
    eps: f64,
    layout: Layout,
) -> Tensor<2> {
    // Both paths weigh the positions by a float mask (1 valid, 0 padding).
    let mask = mask.map(|mask| mask.float());
    if extension_covers(&x.device()) {
        let mask = mask.unwrap_or_else(|| {
            let (batch, positions, _) = layout.split(x.dims());
            Tensor::ones([batch, positions], &x.device())
        });
        Tensor::from_dispatch(<Dispatch as PoolingOps>::generalized_mean(
            x.into_dispatch(),
            powers.into_dispatch(),
            mask.into_dispatch(),
            eps,
            layout,
        ))
    } else {
        composite_forward(x, powers, mask, eps, layout)
    }
}

/// Σ_n w_bn x_bn `[B, C]` for features in `layout` and weights `[B, N]`.
pub(crate) fn weighted_sum(x: Tensor<3>, weights: Tensor<2>, layout: Layout) -> Tensor<2> {
    route(
        (x, weights, layout),
        |x, weights, layout| {
            <Dispatch as PoolingOps>::weighted_sum(x, weights, layout, SumOver::Positions)
        },
        weighted_sum::weighted_sum,
    )
}

/// A two-input op: `kernel` on the primitives where the extension covers the first input's
/// device, `composite` on the tensors elsewhere.
fn route<const A: usize, const B: usize, const OUT: usize>(
    (a, b, layout): (Tensor<A>, Tensor<B>, Layout),
    kernel: fn(FloatTensor<Dispatch>, FloatTensor<Dispatch>, Layout) -> FloatTensor<Dispatch>,
    composite: fn(Tensor<A>, Tensor<B>, Layout) -> Tensor<OUT>,
) -> Tensor<OUT> {
    if extension_covers(&a.device()) {
        Tensor::from_dispatch(kernel(a.into_dispatch(), b.into_dispatch(), layout))
    } else {
        composite(a, b, layout)
    }
}
