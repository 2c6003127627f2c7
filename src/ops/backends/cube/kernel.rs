//! The crate's CubeCL kernels as one table on CubeCL tensors: [`Kernel`] names a kernel and its
//! host parameters, [`Kernel::run`] launches it. The unfused `Cube` runs it directly
//! (`unfused.rs`); the fused one registers it with the fusion stream as a custom operation whose
//! `execute` runs it on the inner `CubeBackend` handles (`fusion.rs`). Either way the launch code
//! is this one.

use burn::backend::ops::FloatTensorOps;
use burn::tensor::{DType, Shape};
use burn_cubecl::CubeBackend;
use burn_cubecl::tensor::CubeTensor;

use super::balanced::launch_balanced_transport;
use super::costs::{launch_costs, launch_costs_backward};
use super::generalized_mean::{launch_generalized_mean, launch_generalized_mean_backward};
use super::transport::{launch_partial_transport, launch_partial_transport_backward};
use super::weighted_sum::launch_contraction;
use crate::layout::Layout;
use crate::maths::balanced::BalancedSettings;
use crate::maths::settings::TransportSettings;
use crate::ops::SumOver;

/// One of the crate's CubeCL kernels with its host parameters (what the fusion graph keys on,
/// besides the tensors). Every input and output is a float tensor of the inputs' one dtype.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Kernel {
    /// inputs `[x, powers, mask]` → `[y]`.
    GeneralizedMean { eps: f64, layout: Layout },
    /// inputs `[x, powers, mask, output, grad]` → `[dx, dp]`.
    GeneralizedMeanBackward { eps: f64, layout: Layout },
    /// inputs `[x, vector]` → `[y]` (`[B, C]` over the positions, `[B, N]` over the channels).
    WeightedSum { layout: Layout, over: SumOver },
    /// inputs `[features, prototypes]` → `[costs]`.
    TransportCosts { layout: Layout },
    /// inputs `[features, prototypes, costs, grad]` → `[∂L/∂features, ∂L/∂prototypes]`.
    TransportCostsBackward { layout: Layout },
    /// inputs `[costs, mass]` → `[plan, iterations per sample]` (Newton, μ < 1).
    PartialTransport { settings: TransportSettings },
    /// inputs `[plan, grad, mass]` → `[∂L/∂costs]`, `grad` of the plan or of its marginals.
    PartialTransportBackward { epsilon: f64, marginals: bool },
    /// inputs `[costs, row_mass, column_mass]` → `[plan, iterations per sample]`.
    BalancedTransport { settings: BalancedSettings },
}

/// Whether the kernels take tensors of `dtype`, the float types they are compiled for: a launch
/// with another falls back to the portable body before anything reaches the device.
pub(super) fn takes(dtype: DType) -> bool {
    matches!(
        dtype,
        DType::F64 | DType::F32 | DType::Flex32 | DType::F16 | DType::BF16
    )
}

impl Kernel {
    /// The custom operation's name in the fusion graph.
    #[cfg_attr(not(feature = "fusion"), allow(dead_code))]
    pub(super) fn id(self) -> &'static str {
        match self {
            Self::GeneralizedMean { .. } => "burn_pooling::generalized_mean",
            Self::GeneralizedMeanBackward { .. } => "burn_pooling::generalized_mean_backward",
            Self::WeightedSum { .. } => "burn_pooling::weighted_sum",
            Self::TransportCosts { .. } => "burn_pooling::transport_costs",
            Self::TransportCostsBackward { .. } => "burn_pooling::transport_costs_backward",
            Self::PartialTransport { .. } => "burn_pooling::partial_transport",
            Self::PartialTransportBackward { .. } => "burn_pooling::partial_transport_backward",
            Self::BalancedTransport { .. } => "burn_pooling::balanced_transport",
        }
    }

    /// The host parameters as the fusion graph's scalars, so that its cache tells launches
    /// with different parameters apart.
    #[cfg(feature = "fusion")]
    pub(super) fn scalars(self) -> Vec<burn::backend::fusion::custom::ScalarIr> {
        use burn::backend::fusion::custom::ScalarIr::{Bool, Float, UInt};
        match self {
            Self::GeneralizedMean { eps, layout }
            | Self::GeneralizedMeanBackward { eps, layout } => {
                vec![Bool(layout.is_channels_last()), Float(eps)]
            }
            Self::WeightedSum { layout, over } => vec![
                Bool(layout.is_channels_last()),
                Bool(over == SumOver::Channels),
            ],
            Self::TransportCosts { layout } | Self::TransportCostsBackward { layout } => {
                vec![Bool(layout.is_channels_last())]
            }
            Self::PartialTransport { settings } => vec![
                Float(settings.transport_ratio),
                Float(settings.epsilon),
                UInt(settings.max_iterations as u64),
                Float(settings.tolerance),
            ],
            Self::PartialTransportBackward { epsilon, marginals } => {
                vec![Float(epsilon), Bool(marginals)]
            }
            Self::BalancedTransport { settings } => vec![
                Float(settings.epsilon),
                UInt(settings.max_iterations as u64),
                Float(settings.tolerance),
            ],
        }
    }

    /// The shapes of the outputs given the shapes of the inputs: what the fusion stream must
    /// know before the kernel runs.
    #[cfg_attr(not(feature = "fusion"), allow(dead_code))]
    pub(super) fn output_shapes(self, inputs: &[&Shape]) -> Vec<Shape> {
        let first = inputs[0];
        let pooled = |axis: usize| Shape::new([first[0], first[axis]]);
        match self {
            Self::GeneralizedMean { layout, .. } => vec![pooled(layout.channel_axis())],
            Self::WeightedSum { layout, over } => vec![pooled(kept_and_summed(layout, over).0)],
            Self::GeneralizedMeanBackward { layout, .. } => {
                vec![first.clone(), Shape::new([first[layout.channel_axis()]])]
            }
            Self::TransportCosts { layout } => {
                let positions = first[layout.position_axis()];
                vec![Shape::new([first[0], inputs[1][0], positions])]
            }
            Self::TransportCostsBackward { .. } => vec![first.clone(), inputs[1].clone()],
            Self::PartialTransport { .. } => vec![
                Shape::new([first[0], first[1] + 1, first[2]]),
                Shape::new([first[0]]),
            ],
            Self::PartialTransportBackward { .. } => {
                vec![Shape::new([first[0], first[1] - 1, first[2]])]
            }
            Self::BalancedTransport { .. } => vec![first.clone(), Shape::new([first[0]])],
        }
    }

    /// Launches the kernel on `inputs` (of one float dtype, in the order of the variant's
    /// comment) and returns its outputs.
    pub(super) fn run(self, inputs: Vec<CubeTensor>) -> Vec<CubeTensor> {
        let mut inputs = inputs.into_iter();
        let mut next = || inputs.next().expect("one input per operand of the kernel");
        match self {
            Self::GeneralizedMean { eps, layout } => {
                let (x, powers, mask) = (next(), next(), next());
                vec![launch_generalized_mean(x, powers, mask, eps, layout)]
            }
            Self::GeneralizedMeanBackward { eps, layout } => {
                let (x, powers, mask, output, grad) = (next(), next(), next(), next(), next());
                let channels = powers.meta.shape()[0];
                let (dx, dp_per_sample) =
                    launch_generalized_mean_backward(x, powers, mask, output, grad, eps, layout);
                // ∂L/∂p sums the samples' terms: a `[B, C]` → `[C]` reduction.
                let dp = CubeBackend::float_sum_dim(dp_per_sample, 0);
                vec![dx, CubeBackend::float_reshape(dp, Shape::new([channels]))]
            }
            Self::WeightedSum { layout, over } => {
                let (x, vector) = (next(), next());
                let (kept, summed) = kept_and_summed(layout, over);
                vec![launch_contraction(x, vector, kept, summed)]
            }
            Self::TransportCosts { layout } => {
                let (features, prototypes) = (next(), next());
                vec![launch_costs(features, prototypes, layout)]
            }
            Self::TransportCostsBackward { layout } => {
                let (features, prototypes, costs, grad) = (next(), next(), next(), next());
                let (features, prototypes) =
                    launch_costs_backward(features, prototypes, costs, grad, layout);
                vec![features, prototypes]
            }
            Self::PartialTransport { settings } => {
                let (costs, mass) = (next(), next());
                let (plan, iterations) = launch_partial_transport(costs, mass, settings);
                vec![plan, iterations]
            }
            Self::PartialTransportBackward { epsilon, marginals } => {
                let (plan, grad, mass) = (next(), next(), next());
                vec![launch_partial_transport_backward(
                    plan, grad, mass, epsilon, marginals,
                )]
            }
            Self::BalancedTransport { settings } => {
                let (costs, row_mass, column_mass) = (next(), next(), next());
                let (plan, iterations) =
                    launch_balanced_transport(costs, row_mass, column_mass, settings);
                vec![plan, iterations]
            }
        }
    }
}

/// The axes of `x` that a weighted sum over `over` keeps and sums.
fn kept_and_summed(layout: Layout, over: SumOver) -> (usize, usize) {
    match over {
        SumOver::Positions => (layout.channel_axis(), layout.position_axis()),
        SumOver::Channels => (layout.position_axis(), layout.channel_axis()),
    }
}
