//! The `Tensor`-level face of the extension, what the layers and the public transport API
//! call: each op runs on [`PoolingOps`] where [`extension_covers`] the device (a kernel with
//! its analytical backward), and as the reference composite, differentiated by ordinary
//! autodiff, elsewhere. This file is the only place that makes that choice. A caller can
//! also ask for the composites on a covered device ([`with_composites`]), to time or check
//! one route against the other on the same device.

use std::cell::Cell;

use burn::backend::Dispatch;
use burn::backend::tensor::FloatTensor;
use burn::tensor::{Bool, Device, Int, Tensor};

use super::{PoolingOps, SumOver, TransportOutput, extension_covers};
use crate::layout::Layout;
use crate::maths::balanced::{BalancedSettings, solve_with_tracked_step};
use crate::maths::costs::composite_costs;
use crate::maths::generalized_mean::composite_forward;
use crate::maths::l2_normalize;
use crate::maths::log_sum_exp::{self, LseOutput};
use crate::maths::marginals::marginals_of;
use crate::maths::newton_step::partial_transport_newton_step;
use crate::maths::relu_dropout;
use crate::maths::settings::TransportSettings;
use crate::maths::weighted_sum;

thread_local! {
    /// Whether this thread is inside [`with_composites`].
    static COMPOSITES_ONLY: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with every op the layers and the transport API call on this thread taking the
/// composite route (the reference maths as tensor ops, differentiated by ordinary autodiff;
/// GSP's solve differentiated through one tracked Newton step), as on a device the extension
/// does not cover, even where it does. Restores the previous choice afterwards, also when `f`
/// panics.
///
/// Not API: what `examples/speed_table.rs --path composite` times against the kernels on the
/// same device. Thread-local, so other threads (and parallel tests) keep the kernels; a
/// backward runs whatever its forward recorded, whenever it is called.
pub fn with_composites<R>(f: impl FnOnce() -> R) -> R {
    /// Puts the previous value back on drop, so a panic in `f` cannot leave the flag set.
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            COMPOSITES_ONLY.with(|only| only.set(self.0));
        }
    }
    let _restore = Restore(COMPOSITES_ONLY.with(|only| only.replace(true)));
    f()
}

/// Whether the ops on `device` take the extension's kernels on this thread: it covers the
/// device and no [`with_composites`] is running.
fn kernels_run_on(device: &Device) -> bool {
    extension_covers(device) && !COMPOSITES_ONLY.with(Cell::get)
}

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
    if kernels_run_on(&costs.device()) {
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
/// the solve ended: the op with its implicit backward where the kernels run on the device,
/// else the solved plan rebuilt with tracked ops whose derivative is the implicit one.
pub(crate) fn balanced_transport(
    costs: Tensor<3>,
    row_mass: Tensor<2>,
    column_mass: Tensor<2>,
    settings: &BalancedSettings,
) -> (Tensor<3>, SolveStatus) {
    if kernels_run_on(&costs.device()) {
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
    if kernels_run_on(&x.device()) {
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

/// LSE (or its softmax mean, as `output` says) `[B, C]` of features in `layout` with
/// temperature `r` `[1]` over the positions where `mask` `[B, N]` is true (all when `None`).
pub(crate) fn log_sum_exp(
    x: Tensor<3>,
    r: Tensor<1>,
    mask: Option<Tensor<2, Bool>>,
    layout: Layout,
    output: LseOutput,
) -> Tensor<2> {
    if !kernels_run_on(&x.device()) {
        return log_sum_exp::composite_forward(x, r, mask, layout, output);
    }
    let mask = match mask {
        Some(mask) => mask.float(),
        None => {
            let (batch, positions, _) = layout.split(x.dims());
            Tensor::ones([batch, positions], &x.device())
        }
    };
    Tensor::from_dispatch(<Dispatch as PoolingOps>::log_sum_exp(
        x.into_dispatch(),
        r.into_dispatch(),
        mask.into_dispatch(),
        layout,
        output,
    ))
}

/// `v / max(‖v‖, eps)` along `axis` (eps = 1e-12; f16: 2.4e-4), overflow-safe: see
/// [`PoolingOps::l2_normalize`].
pub(crate) fn l2_normalize<const D: usize>(v: Tensor<D>, axis: usize) -> Tensor<D> {
    if !kernels_run_on(&v.device()) {
        return l2_normalize::composite_forward(v, axis).0;
    }
    let (output, _) = <Dispatch as PoolingOps>::l2_normalize(v.into_dispatch(), axis);
    Tensor::from_dispatch(output)
}

/// `relu(hidden + bias)` with inverted dropout at probability `drop` (0: none), for the
/// product `hidden` `[R, H]` of a perceptron's first layer and its `bias` `[H]`.
pub(crate) fn bias_relu_dropout(hidden: Tensor<2>, bias: Tensor<1>, drop: f64) -> Tensor<2> {
    if !kernels_run_on(&hidden.device()) {
        return relu_dropout::composite_forward(hidden, bias, drop);
    }
    Tensor::from_dispatch(<Dispatch as PoolingOps>::bias_relu_dropout(
        hidden.into_dispatch(),
        bias.into_dispatch(),
        drop,
    ))
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

/// A two-input op: `kernel` on the primitives where the kernels run on the first input's
/// device ([`kernels_run_on`]), `composite` on the tensors elsewhere.
fn route<const A: usize, const B: usize, const OUT: usize>(
    (a, b, layout): (Tensor<A>, Tensor<B>, Layout),
    kernel: fn(FloatTensor<Dispatch>, FloatTensor<Dispatch>, Layout) -> FloatTensor<Dispatch>,
    composite: fn(Tensor<A>, Tensor<B>, Layout) -> Tensor<OUT>,
) -> Tensor<OUT> {
    if kernels_run_on(&a.device()) {
        Tensor::from_dispatch(kernel(a.into_dispatch(), b.into_dispatch(), layout))
    } else {
        composite(a, b, layout)
    }
}

#[cfg(all(test, feature = "flex", feature = "autodiff"))]
mod tests {
    use super::*;
    use burn::tensor::{Distribution, Tolerance};

    use crate::pooling::{GemConfig, GspConfig};

    #[test]
    fn with_composites_holds_on_this_thread_only_and_restores() {
        let device = Device::flex();
        assert!(kernels_run_on(&device));
        with_composites(|| {
            assert!(!kernels_run_on(&device));
            let elsewhere = device.clone();
            let other_thread = std::thread::spawn(move || kernels_run_on(&elsewhere));
            assert!(other_thread.join().expect("no panic"), "another thread");
            with_composites(|| assert!(!kernels_run_on(&device)));
            assert!(!kernels_run_on(&device), "after a nested call");
        });
        assert!(kernels_run_on(&device), "after the call");
        let panicked = std::panic::catch_unwind(|| with_composites(|| panic!("inside")));
        assert!(panicked.is_err());
        assert!(kernels_run_on(&device), "after a panic inside");
    }

    /// The two routes the speed table times against each other compute the same outputs and
    /// gradients: GSP's pooling, attributes and the gradients of its input and prototypes,
    /// GeM's pooling and the gradients of its input and power.
    #[test]
    fn composite_route_matches_the_kernels_on_a_covered_device() {
        use crate::ops::BACKWARD_CALLS;
        use std::sync::atomic::Ordering;
        let device = Device::flex().autodiff();
        device.seed(19);
        let x = Tensor::<3>::random([3, 7, 8], Distribution::Normal(0.0, 0.5), &device);
        let gsp = GspConfig::new(8).with_num_prototypes(5).init(&device);
        let gem = GemConfig::new().init(&device);
        let run = || {
            let tracked = x.clone().require_grad();
            let out = gsp.forward_detailed(tracked.clone());
            let pooled = gem.forward(tracked.clone().abs());
            let loss = out.pooled.clone().sum()
                + out.attributes.clone().powi_scalar(2).sum()
                + pooled.clone().sum();
            let grads = loss.backward();
            [
                out.pooled,
                out.attributes,
                pooled,
                tracked.grad(&grads).expect("x's gradient").flatten(0, 1),
                gsp.prototypes.val().grad(&grads).expect("ω's gradient"),
                gem.p.val().grad(&grads).expect("p's gradient").unsqueeze(),
            ]
            .map(|t: Tensor<2>| t.into_data())
        };
        let before = BACKWARD_CALLS::TRANSPORT.load(Ordering::SeqCst);
        let kernels = run();
        assert!(BACKWARD_CALLS::TRANSPORT.load(Ordering::SeqCst) > before);
        let composites = with_composites(run);
        let names = ["pooled", "attributes", "GeM", "∂x", "∂ω", "∂p"];
        for ((name, kernel), composite) in names.iter().zip(kernels).zip(composites) {
            println!("{name}");
            kernel.assert_approx_eq::<f32>(&composite, Tolerance::rel_abs(1e-4, 1e-5));
        }
    }
}
