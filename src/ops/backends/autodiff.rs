//! [`PoolingOps`] for `Autodiff<B, C>`: each forward runs on the inner backend with no tape,
//! and one node with the closed-form backward is recorded. The transport nodes save the plan
//! (and GSP's the masses), whatever the number of solver iterations; the cost node saves its inputs
//! and output, not the normalised features.
//!
//! The backward ops keep their default bodies here: the nodes call them on the inner backend,
//! and called on autodiff tensors the composites are themselves differentiable.

use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, NodeGuard, Ops, OpsKind};
use burn::backend::tensor::{BoolTensor, FloatTensor, IntTensor};
use burn::backend::{AutodiffBackend, Backend, DispatchKindConversion, DispatchTensor};

use crate::layout::Layout;
use crate::maths::balanced::BalancedSettings;
use crate::maths::log_sum_exp::LseOutput;
use crate::maths::settings::TransportSettings;
use crate::ops::{PoolingOps, SumOver, TransportOutput};

/// How often each analytical backward ran (tests check that it, not a fallback, was used).
#[cfg(test)]
pub(crate) mod counters {
    use std::sync::atomic::AtomicUsize;
    pub static COSTS: AtomicUsize = AtomicUsize::new(0);
    pub static TRANSPORT: AtomicUsize = AtomicUsize::new(0);
    pub static GENERALIZED_MEAN: AtomicUsize = AtomicUsize::new(0);
    pub static BALANCED: AtomicUsize = AtomicUsize::new(0);
    pub static LOG_SUM_EXP: AtomicUsize = AtomicUsize::new(0);
}
#[cfg(test)]
pub(crate) use counters as BACKWARD_CALLS;

#[cfg(test)]
fn count(counter: &std::sync::atomic::AtomicUsize) {
    counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
}

/// The autodiff node of one transport solve, whose output is the plan or its marginals.
#[derive(Debug)]
struct TransportBackward(TransportOutput);

impl<B: Backend + PoolingOps> Backward<B, 1> for TransportBackward {
    /// Plan `[B, K+1, N]`, masses `[B, N]`, ε.
    type State = (FloatTensor<B>, FloatTensor<B>, f64);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        #[cfg(test)]
        count(&counters::TRANSPORT);
        let (plan, mass, epsilon) = ops.state;
        let [costs] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        if let Some(costs) = costs {
            let cost_grad = B::partial_transport_backward(plan, grad, mass, epsilon, self.0);
            grads.register::<B>(costs.id, cost_grad);
        }
    }
}

/// The autodiff node of one balanced transport solve, over the costs and both masses.
#[derive(Debug)]
struct BalancedBackward;

impl<B: Backend + PoolingOps> Backward<B, 3> for BalancedBackward {
    /// Plan `[B, K', N]`, ε: all the implicit backward reads.
    type State = (FloatTensor<B>, f64);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        #[cfg(test)]
        count(&counters::BALANCED);
        let (plan, epsilon) = ops.state;
        let [costs, rows, columns] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (d_costs, d_rows, d_columns) = B::balanced_transport_backward(plan, grad, epsilon);
        for (node, gradient) in [(costs, d_costs), (rows, d_rows), (columns, d_columns)] {
            if let Some(node) = node {
                grads.register::<B>(node.id, gradient);
            }
        }
    }
}

/// The autodiff node of one cost matrix.
#[derive(Debug)]
struct CostsBackward;

impl<B: Backend + PoolingOps> Backward<B, 2> for CostsBackward {
    /// Features, prototypes, costs, layout.
    type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, Layout);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        #[cfg(test)]
        count(&counters::COSTS);
        let (features, prototypes, costs, layout) = ops.state;
        let [features_node, prototypes_node] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (d_features, d_prototypes) =
            B::transport_costs_backward(features, prototypes, costs, grad, layout);
        if let Some(node) = features_node {
            grads.register::<B>(node.id, d_features);
        }
        if let Some(node) = prototypes_node {
            grads.register::<B>(node.id, d_prototypes);
        }
    }
}

/// The autodiff node of one generalized mean.
#[derive(Debug)]
struct GeneralizedMeanBackward;

impl<B: Backend + PoolingOps> Backward<B, 2> for GeneralizedMeanBackward {
    /// x, powers, mask, output, ε, layout.
    type State = (
        FloatTensor<B>,
        FloatTensor<B>,
        FloatTensor<B>,
        FloatTensor<B>,
        f64,
        Layout,
    );

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        #[cfg(test)]
        count(&counters::GENERALIZED_MEAN);
        let (x, powers, mask, output, eps, layout) = ops.state;
        let [x_node, powers_node] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (dx, dp) = B::generalized_mean_backward(x, powers, mask, output, grad, eps, layout);
        if let Some(node) = x_node {
            grads.register::<B>(node.id, dx);
        }
        if let Some(node) = powers_node {
            grads.register::<B>(node.id, dp);
        }
    }
}

/// The autodiff node of one log-sum-exp pooling.
#[derive(Debug)]
struct LogSumExpBackward;

impl<B: Backend + PoolingOps> Backward<B, 2> for LogSumExpBackward {
    /// x, r, mask, output, layout, what the output is.
    type State = (
        FloatTensor<B>,
        FloatTensor<B>,
        FloatTensor<B>,
        FloatTensor<B>,
        Layout,
        LseOutput,
    );

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        #[cfg(test)]
        count(&counters::LOG_SUM_EXP);
        let (x, r, mask, output, layout, kind) = ops.state;
        let [x_node, r_node] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (dx, dr) = B::log_sum_exp_backward(x, r, mask, output, grad, layout, kind);
        if let Some(node) = x_node {
            grads.register::<B>(node.id, dx);
        }
        if let Some(node) = r_node {
            grads.register::<B>(node.id, dr);
        }
    }
}

/// The autodiff node of one L2 normalisation: its backward reads the output and the
/// denominators.
#[derive(Debug)]
struct L2NormalizeBackward;

impl<B: Backend + PoolingOps> Backward<B, 1> for L2NormalizeBackward {
    /// The output, the denominators, the axis.
    type State = (FloatTensor<B>, FloatTensor<B>, usize);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (output, denominator, axis) = ops.state;
        let grad = grads.consume::<B>(&ops.node);
        let [node] = ops.parents;
        if let Some(node) = node {
            let dx = B::l2_normalize_backward(output, denominator, grad, axis);
            grads.register::<B>(node.id, dx);
        }
    }
}

/// The autodiff node of one hidden activation with dropout: its backward reads the output
/// only (the positive outputs are where the gradient passes).
#[derive(Debug)]
struct BiasReluDropoutBackward;

impl<B: Backend + PoolingOps> Backward<B, 2> for BiasReluDropoutBackward {
    /// The output, the drop probability.
    type State = (FloatTensor<B>, f64);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (output, drop) = ops.state;
        let [hidden_node, bias_node] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (d_hidden, d_bias) = B::bias_relu_dropout_backward(output, grad, drop);
        if let Some(node) = hidden_node {
            grads.register::<B>(node.id, d_hidden);
        }
        if let Some(node) = bias_node {
            grads.register::<B>(node.id, d_bias);
        }
    }
}

/// The autodiff node of one weighted sum: each gradient is computed only if its input is
/// tracked (GAP's weights never are). The two sums are each other's transpose: the vector's
/// gradient is the sum over the other axis, the features' one the outer product of the
/// positions' weights `[B, N]` with the channels' vector `[B, C]`.
#[derive(Debug)]
struct WeightedSumBackward(SumOver);

impl<B: Backend + PoolingOps> Backward<B, 2> for WeightedSumBackward {
    /// x (kept only if the vector is tracked), the vector (kept only if x is tracked),
    /// layout: GAP's node does not hold on to its input.
    type State = (Option<FloatTensor<B>>, Option<FloatTensor<B>>, Layout);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (x, vector, layout) = ops.state;
        let [x_node, vector_node] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        if let (Some(node), Some(x)) = (vector_node, x) {
            let other = match self.0 {
                SumOver::Positions => SumOver::Channels,
                SumOver::Channels => SumOver::Positions,
            };
            let d_vector = B::weighted_sum(x, grad.clone(), layout, other);
            grads.register::<B>(node.id, d_vector);
        }
        if let (Some(node), Some(vector)) = (x_node, vector) {
            let (weights, channels) = match self.0 {
                SumOver::Positions => (vector, grad),
                SumOver::Channels => (grad, vector),
            };
            let dx = B::weighted_sum_features_backward(weights, channels, layout);
            grads.register::<B>(node.id, dx);
        }
    }
}

/// A float primitive of the autodiff backend.
type Tracked<B, C> = FloatTensor<Autodiff<B, C>>;

/// `output` as an autodiff tensor, recorded as `node` over `parents` when one of them is
/// tracked, with the state `state(&output)` builds (only then: an untracked call keeps no
/// extra handle on anything).
fn record<B: Backend, C: CheckpointStrategy, N: Backward<B, P>, const P: usize>(
    node: N,
    parents: [NodeGuard; P],
    output: FloatTensor<B>,
    state: impl FnOnce(&FloatTensor<B>) -> N::State,
) -> Tracked<B, C> {
    match node.prepare::<C>(parents).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish(state(&output), output),
        OpsKind::UnTracked(prep) => prep.finish(output),
    }
}

impl<B: Backend + PoolingOps, C: CheckpointStrategy> PoolingOps for Autodiff<B, C>
where
    DispatchTensor: DispatchKindConversion<Self>,
{
    fn transport_costs(
        features: Tracked<B, C>,
        prototypes: Tracked<B, C>,
        layout: Layout,
    ) -> Tracked<B, C> {
        let parents = [features.node(), prototypes.node()];
        let (features, prototypes) = (features.into_primitive(), prototypes.into_primitive());
        let costs = B::transport_costs(features.clone(), prototypes.clone(), layout);
        let state = |costs: &FloatTensor<B>| (features, prototypes, costs.clone(), layout);
        record::<B, C, _, 2>(CostsBackward, parents, costs, state)
    }

    fn partial_transport(
        costs: Tracked<B, C>,
        mass: Tracked<B, C>,
        settings: TransportSettings,
        output: TransportOutput,
    ) -> (Tracked<B, C>, Tracked<B, C>, IntTensor<B>, BoolTensor<B>) {
        let costs_node = costs.node();
        let mass = mass.into_primitive();
        let (first, plan, iterations, converged) =
            B::partial_transport(costs.into_primitive(), mass.clone(), settings, output);
        let state = |_: &FloatTensor<B>| (plan.clone(), mass, settings.epsilon);
        let first = record::<B, C, _, 1>(TransportBackward(output), [costs_node], first, state);
        (
            first,
            <Self as AutodiffBackend>::from_inner(plan),
            iterations,
            converged,
        )
    }

    fn balanced_transport(
        costs: Tracked<B, C>,
        row_mass: Tracked<B, C>,
        column_mass: Tracked<B, C>,
        settings: BalancedSettings,
    ) -> (Tracked<B, C>, IntTensor<B>, BoolTensor<B>) {
        let parents = [costs.node(), row_mass.node(), column_mass.node()];
        let (plan, iterations, converged) = B::balanced_transport(
            costs.into_primitive(),
            row_mass.into_primitive(),
            column_mass.into_primitive(),
            settings,
        );
        let state = |plan: &FloatTensor<B>| (plan.clone(), settings.epsilon);
        let plan = record::<B, C, _, 3>(BalancedBackward, parents, plan, state);
        (plan, iterations, converged)
    }

    fn generalized_mean(
        x: Tracked<B, C>,
        powers: Tracked<B, C>,
        mask: Tracked<B, C>,
        eps: f64,
        layout: Layout,
    ) -> Tracked<B, C> {
        let parents = [x.node(), powers.node()];
        let (x, powers, mask) = (
            x.into_primitive(),
            powers.into_primitive(),
            mask.into_primitive(),
        );
        let output = B::generalized_mean(x.clone(), powers.clone(), mask.clone(), eps, layout);
        let state = |output: &FloatTensor<B>| (x, powers, mask, output.clone(), eps, layout);
        record::<B, C, _, 2>(GeneralizedMeanBackward, parents, output, state)
    }

    fn log_sum_exp(
        x: Tracked<B, C>,
        r: Tracked<B, C>,
        mask: Tracked<B, C>,
        layout: Layout,
        output: LseOutput,
    ) -> Tracked<B, C> {
        let parents = [x.node(), r.node()];
        let (x, r, mask) = (
            x.into_primitive(),
            r.into_primitive(),
            mask.into_primitive(),
        );
        let pooled = B::log_sum_exp(x.clone(), r.clone(), mask.clone(), layout, output);
        let state = |pooled: &FloatTensor<B>| (x, r, mask, pooled.clone(), layout, output);
        record::<B, C, _, 2>(LogSumExpBackward, parents, pooled, state)
    }

    fn l2_normalize(x: Tracked<B, C>, axis: usize) -> (Tracked<B, C>, Tracked<B, C>) {
        let parents = [x.node()];
        let (output, denominator) = B::l2_normalize(x.into_primitive(), axis);
        let state = |output: &FloatTensor<B>| (output.clone(), denominator.clone(), axis);
        let output = record::<B, C, _, 1>(L2NormalizeBackward, parents, output, state);
        (output, <Self as AutodiffBackend>::from_inner(denominator))
    }

    fn bias_relu_dropout(hidden: Tracked<B, C>, bias: Tracked<B, C>, drop: f64) -> Tracked<B, C> {
        let parents = [hidden.node(), bias.node()];
        let output = B::bias_relu_dropout(hidden.into_primitive(), bias.into_primitive(), drop);
        let state = |output: &FloatTensor<B>| (output.clone(), drop);
        record::<B, C, _, 2>(BiasReluDropoutBackward, parents, output, state)
    }

    fn weighted_sum(
        x: Tracked<B, C>,
        vector: Tracked<B, C>,
        layout: Layout,
        over: SumOver,
    ) -> Tracked<B, C> {
        let parents = [x.node(), vector.node()];
        let (x_tracked, vector_tracked) = (x.is_tracked(), vector.is_tracked());
        let (x, vector) = (x.into_primitive(), vector.into_primitive());
        let output = B::weighted_sum(x.clone(), vector.clone(), layout, over);
        // Each gradient reads the other input: keep only what a tracked input needs.
        let state = |_: &FloatTensor<B>| {
            let x = vector_tracked.then_some(x);
            (x, x_tracked.then_some(vector), layout)
        };
        record::<B, C, _, 2>(WeightedSumBackward(over), parents, output, state)
    }
}
