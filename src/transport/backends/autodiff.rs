//! [`TransportOps`] for `Autodiff<B, C>`: the solve runs on the inner backend with no tape, and
//! one node with the closed-form backward is recorded. Its saved state is the plan and the
//! masses, whatever the number of iterations.

use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{AutodiffBackend, Backend};

use crate::transport::ops::TransportOps;
use crate::transport::settings::TransportSettings;

#[cfg(test)]
pub(crate) static IMPLICIT_BACKWARD_CALLS: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(0);

/// The autodiff node of one transport solve.
#[derive(Debug)]
struct ImplicitTransportBackward;

impl<B: Backend + TransportOps> Backward<B, 1> for ImplicitTransportBackward {
    /// Plan `[B, K+1, N]`, masses `[B, N]`, μ, ε.
    type State = (FloatTensor<B>, FloatTensor<B>, f64, f64);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        #[cfg(test)]
        IMPLICIT_BACKWARD_CALLS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let (plan, mass, transport_ratio, epsilon) = ops.state;
        let [costs] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        if let Some(costs) = costs {
            let cost_grad =
                B::partial_transport_backward(plan, grad, mass, transport_ratio, epsilon);
            grads.register::<B>(costs.id, cost_grad);
        }
    }
}

impl<B: Backend + TransportOps, C: CheckpointStrategy> TransportOps for Autodiff<B, C> {
    fn partial_transport(
        costs: FloatTensor<Self>,
        mass: FloatTensor<Self>,
        settings: TransportSettings,
    ) -> (FloatTensor<Self>, IntTensor<Self>) {
        let costs_node = costs.node();
        let mass = mass.into_primitive();
        let (plan, iterations) =
            B::partial_transport(costs.into_primitive(), mass.clone(), settings);
        let plan = match ImplicitTransportBackward
            .prepare::<C>([costs_node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(
                (
                    plan.clone(),
                    mass,
                    settings.transport_ratio,
                    settings.epsilon,
                ),
                plan,
            ),
            OpsKind::UnTracked(prep) => prep.finish(plan),
        };
        (plan, iterations)
    }

    /// First-order only: the backward is computed on the inner backend and not recorded.
    fn partial_transport_backward(
        plan: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        mass: FloatTensor<Self>,
        transport_ratio: f64,
        epsilon: f64,
    ) -> FloatTensor<Self> {
        <Self as AutodiffBackend>::from_inner(B::partial_transport_backward(
            plan.into_primitive(),
            grad.into_primitive(),
            mass.into_primitive(),
            transport_ratio,
            epsilon,
        ))
    }
}
