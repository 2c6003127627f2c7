//! Entropy-smoothed partial optimal transport with a free target marginal, the engine of
//! [`Gsp`](crate::pooling::Gsp) (gsp.md §4–6).
//!
//! Per sample, position j holds mass a_j (1/N, or 0 for padding); a fraction μ of the total is
//! moved onto K prototypes at cost c `[K, N]`, with entropy weight ε:
//!
//! ```text
//! minimise  Σ c P + ε Σ P (ln P − 1) + ε Σ ρ (ln ρ − 1)
//! s.t.      ρ_j + Σ_k P_kj = a_j,   Σ P = μ,   P, ρ ≥ 0
//! ```
//!
//! The layout of the module:
//! - [`settings`](TransportSettings): μ, ε and the solver's settings;
//! - `costs`: φ-normalised distances between features and prototypes;
//! - `solver`: the forward solve (Newton or Sinkhorn on the scalar dual β);
//! - `implicit_backward`: the closed-form gradient at the fixed point;
//! - [`PoolingOps`], the crate's backend-extension trait, carries
//!   both (its autodiff implementation records the analytical backward);
//! - `fallback`: one tracked Newton step, for backends the extension does not cover.

mod costs;
mod fallback;
pub(crate) mod implicit_backward;
mod settings;
pub(crate) mod solver;

use burn::backend::Dispatch;
use burn::tensor::{Int, Tensor};

pub use costs::{lipschitz_normalize, transport_costs};
pub use fallback::partial_transport_newton_step;
pub use settings::{TransportSettings, TransportSolver};

use crate::ops::PoolingOps;
pub use crate::ops::extension_covers;

/// A solved transport problem.
#[derive(Debug, Clone)]
pub struct TransportPlan {
    /// `[B, K+1, N]`: row 0 is the residual mass ρ of each position, rows 1..=K the plan P.
    pub plan: Tensor<3>,
    /// `[1]`: solver iterations run (the maximum over the batch).
    pub iterations: Tensor<1, Int>,
}

/// Solves the partial transport problem, with the analytical backward when the backend is
/// covered by [`PoolingOps`] (Flex, NdArray, wgpu and their autodiff devices, as enabled by
/// this crate's features), else with [`partial_transport_newton_step`].
///
/// # Shapes
///
/// - costs: `[B, K, N]`
/// - mass: `[B, N]`, each row sums to 1; 0 marks a padded position
/// - output plan: `[B, K+1, N]`
pub fn partial_transport(
    costs: Tensor<3>,
    mass: Tensor<2>,
    settings: &TransportSettings,
) -> TransportPlan {
    if extension_covers(&costs.device()) {
        let (plan, iterations) = <Dispatch as PoolingOps>::partial_transport(
            costs.into_dispatch(),
            mass.into_dispatch(),
            *settings,
        );
        TransportPlan {
            plan: Tensor::from_dispatch(plan),
            iterations: Tensor::from_dispatch(iterations),
        }
    } else {
        partial_transport_newton_step(costs, mass, settings)
    }
}
