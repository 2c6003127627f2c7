//! [`PoolingOps`] for the CubeCL backend (`Cube`: every CubeCL runtime, wgpu, CUDA, ROCm,
//! Vulkan, Metal, WebGPU and CubeCL's CPU runtime), every op as CubeCL kernels but the
//! weighted sum's features gradient (one broadcast product), the log-sum-exp (its portable
//! body: the composite of `maths::log_sum_exp` and its closed-form backward) and the balanced
//! transport's backward (its portable body: the N·K'² assembly as tensor ops, the K'×K'
//! Cholesky on the host):
//!
//! - GSP's costs and their backward (`costs.rs`): the φ-normalisation, the distances and the
//!   gradient's element-wise parts as kernels, the products as matmuls;
//! - GSP's transport solve and its implicit backward (`transport.rs`): one cube per sample,
//!   Newton on the dual β to the tolerance with no host read (Sinkhorn and μ = 1 keep the
//!   portable body);
//! - the balanced transport solve (`balanced.rs`): one cube per sample, the portable
//!   log-domain Sinkhorn with its masks, bounds and stopping rule, no host read;
//! - the generalized mean of GeM/GGeM and its backward (`generalized_mean.rs`) and the weighted
//!   sum of GAP and GSP and its weights' gradient (`weighted_sum.rs`): one unit per (b, c) (or
//!   per (b, n)) looping over the other axis through the input's strides, so both layouts take
//!   the same kernel; the portable bodies run these as a chain of element-wise kernels and
//!   reductions with several `[B, C, N]` intermediates, a kernel reads the input once or
//!   twice and writes only its result.
//!
//! The kernels are generic over the float type (the floor ε is raised to the dtype's smallest
//! normal value); inputs of mixed dtypes, or of a dtype they do not take, get the portable
//! bodies.
//!
//! Burn's `fusion` (a default of a GPU application's `burn`) makes `Cube` `Fusion<CubeBackend>`.
//! With this crate's `fusion` feature each kernel is then a custom operation of the fusion
//! stream (`fusion.rs`); without it a fused `Cube` falls back to the portable bodies and warns
//! once (`unfused.rs`). The kernels themselves are one table on CubeCL tensors (`kernel.rs`),
//! and the impl below is written once for both.

mod balanced;
mod costs;
mod cube_block;
#[cfg(feature = "fusion")]
mod fusion;
mod generalized_mean;
mod kernel;
mod strided;
mod tensors;
#[cfg(all(test, feature = "wgpu"))]
mod tests;
mod transport;
#[cfg(not(feature = "fusion"))]
mod unfused;
mod weighted_sum;

use burn::backend::Cube;
use burn::backend::tensor::{BoolTensor, FloatTensor, IntTensor};

#[cfg(feature = "fusion")]
use fusion::launch;
use kernel::Kernel;
#[cfg(not(feature = "fusion"))]
use unfused::launch;

use crate::layout::Layout;
use crate::maths::balanced::BalancedSettings;
use crate::maths::marginals::marginals_of;
use crate::maths::settings::{TransportSettings, TransportSolver};
use crate::ops::{PoolingOps, SumOver, TensorBridge, TransportOutput, portable};

/// The float primitive of the impl below.
type Float = FloatTensor<Cube>;

impl PoolingOps for Cube {
    fn transport_costs(features: Float, prototypes: Float, layout: Layout) -> Float {
        match launch(Kernel::TransportCosts { layout }, [features, prototypes]) {
            Ok([costs]) => costs,
            Err([features, prototypes]) => {
                portable::transport_costs::<Self>(features, prototypes, layout)
            }
        }
    }

    fn transport_costs_backward(
        features: Float,
        prototypes: Float,
        costs: Float,
        grad: Float,
        layout: Layout,
    ) -> (Float, Float) {
        let kernel = Kernel::TransportCostsBackward { layout };
        match launch(kernel, [features, prototypes, costs, grad]) {
            Ok([features, prototypes]) => (features, prototypes),
            Err([features, prototypes, costs, grad]) => portable::transport_costs_backward::<Self>(
                features, prototypes, costs, grad, layout,
            ),
        }
    }

    fn partial_transport(
        costs: Float,
        mass: Float,
        settings: TransportSettings,
        output: TransportOutput,
    ) -> (Float, Float, IntTensor<Self>, BoolTensor<Self>) {
        // The kernel runs Newton for μ < 1; the Sinkhorn iteration and full transport (β = ∞,
        // no iteration) keep the portable body.
        let (costs, mass) =
            if settings.solver == TransportSolver::Newton && settings.transport_ratio < 1.0 {
                match launch(Kernel::PartialTransport { settings }, [costs, mass]) {
                    Ok([plan, iterations]) => {
                        let first = match output {
                            TransportOutput::Plan => plan.clone(),
                            TransportOutput::Marginals => {
                                Self::unwrap(marginals_of(Self::wrap(plan.clone())))
                            }
                        };
                        let (iterations, converged) = batch_report(iterations);
                        return (first, plan, iterations, converged);
                    }
                    Err([costs, mass]) => (costs, mass),
                }
            } else {
                (costs, mass)
            };
        portable::partial_transport::<Self>(costs, mass, settings, output)
    }

    fn partial_transport_backward(
        plan: Float,
        grad: Float,
        mass: Float,
        epsilon: f64,
        output: TransportOutput,
    ) -> Float {
        let marginals = output == TransportOutput::Marginals;
        let kernel = Kernel::PartialTransportBackward { epsilon, marginals };
        match launch(kernel, [plan, grad, mass]) {
            Ok([costs_gradient]) => costs_gradient,
            Err([plan, grad, mass]) => {
                portable::partial_transport_backward::<Self>(plan, grad, mass, epsilon, output)
            }
        }
    }

    fn balanced_transport(
        costs: Float,
        row_mass: Float,
        column_mass: Float,
        settings: BalancedSettings,
    ) -> (Float, IntTensor<Self>, BoolTensor<Self>) {
        let kernel = Kernel::BalancedTransport { settings };
        match launch(kernel, [costs, row_mass, column_mass]) {
            Ok([plan, iterations]) => {
                let (iterations, converged) = batch_report(iterations);
                (plan, iterations, converged)
            }
            Err([costs, row_mass, column_mass]) => {
                portable::balanced_transport::<Self>(costs, row_mass, column_mass, settings)
            }
        }
    }

    fn generalized_mean(x: Float, powers: Float, mask: Float, eps: f64, layout: Layout) -> Float {
        match launch(Kernel::GeneralizedMean { eps, layout }, [x, powers, mask]) {
            Ok([y]) => y,
            Err([x, powers, mask]) => {
                portable::generalized_mean::<Self>(x, powers, mask, eps, layout)
            }
        }
    }

    fn generalized_mean_backward(
        x: Float,
        powers: Float,
        mask: Float,
        output: Float,
        grad: Float,
        eps: f64,
        layout: Layout,
    ) -> (Float, Float) {
        let kernel = Kernel::GeneralizedMeanBackward { eps, layout };
        match launch(kernel, [x, powers, mask, output, grad]) {
            Ok([dx, dp]) => (dx, dp),
            Err([x, powers, mask, output, grad]) => portable::generalized_mean_backward::<Self>(
                x, powers, mask, output, grad, eps, layout,
            ),
        }
    }

    fn weighted_sum(x: Float, vector: Float, layout: Layout, over: SumOver) -> Float {
        match launch(Kernel::WeightedSum { layout, over }, [x, vector]) {
            Ok([y]) => y,
            Err([x, vector]) => portable::weighted_sum::<Self>(x, vector, layout, over),
        }
    }
}

/// The batch's report from a solve kernel's per-sample counts `[B]` (each sample's count c, or
/// −(c + 1) where it did not converge): the largest count over the samples `[1]`, as the
/// portable solvers report it, and whether all converged `[1]`.
fn batch_report(encoded: Float) -> (IntTensor<Cube>, BoolTensor<Cube>) {
    let encoded = Cube::wrap::<1>(encoded);
    let failed = encoded.clone().lower_elem(0.0);
    let counts = encoded
        .clone()
        .mask_where(failed, encoded.clone().neg().sub_scalar(1.0));
    let iterations = counts.max().int();
    let converged = encoded.greater_equal_elem(0.0).all();
    (Cube::unwrap_int(iterations), Cube::unwrap_bool(converged))
}
