//! The analytical gradient of the transport plan with respect to the costs (docs/maths.md §4).
//!
//! Implicit differentiation of the optimality conditions at the fixed point, so no iteration
//! is replayed and backward memory does not depend on the iteration count. With X = [ρ; P]
//! `[B, K+1, N]`, upstream g = ∂L/∂X and position masses a_j:
//!
//! ```text
//! h    = X ⊙ g,   U_j = Σ_{k=0..K} h_kj,   t_j = Σ_{k=1..K} P_kj
//! λ    = ( Σ_j ρ_j U_j / a_j − Σ_j h_0j ) / ( Σ_j ρ_j t_j / a_j )
//! V_j  = ( U_j + λ ρ_j ) / a_j
//! ∂L/∂c_kj = −(1/ε) ( h_kj − V_j P_kj ),   k = 1..K
//! ```
//!
//! With a_j = 1/N this is the reference's formula (its denominator 1 − μ − N Σ ρ² equals
//! Σ ρ t / a at the exact root; the form read from the plan does not depend on how tightly the
//! solver met Σ t = μ, and has no cancellation). Padded positions (a_j = 0) have X = 0 and drop
//! out. The denominator vanishes as μ → 1 or ε → 0 (where the numerator vanishes too), so it is
//! clamped away from zero.

use burn::tensor::Tensor;

/// Smallest denominator used for λ.
pub(crate) const MIN_DENOMINATOR: f64 = 1e-20;

/// ∂L/∂costs `[B, K, N]` from the saved plan `[B, K+1, N]`, the upstream gradient of the same
/// shape and the position masses `[B, N]`.
pub(crate) fn implicit_cost_gradient(
    plan: Tensor<3>,
    grad: Tensor<3>,
    mass: Tensor<2>,
    epsilon: f64,
) -> Tensor<3> {
    let [batch, rows, positions] = plan.dims();
    let weighted = plan.clone() * grad;
    let column_sums = weighted.clone().sum_dim(1); // U: [B, 1, N]
    let residual = plan.clone().slice([0..batch, 0..1, 0..positions]); // ρ: [B, 1, N]
    let transported = plan.slice([0..batch, 1..rows, 0..positions]); // P: [B, K, N]
    let weighted_residual = weighted.clone().slice([0..batch, 0..1, 0..positions]);
    let weighted_plan = weighted.slice([0..batch, 1..rows, 0..positions]);
    let padding = mass.clone().lower_equal_elem(0.0).unsqueeze_dim(1);
    let inverse_mass = mass.recip().unsqueeze_dim(1).mask_fill(padding, 0.0);

    let numerator = (residual.clone() * column_sums.clone() * inverse_mass.clone()).sum_dim(2)
        - weighted_residual.sum_dim(2);
    // Σ_j ρ_j t_j / a_j (t_j = Σ_k P_kj): the slope Σ a σ(1 − σ) of the mass in β, which is
    // 1 − μ − Σ ρ²/a at the exact root, read from the plan so that neither the solver's
    // tolerance nor cancellation enters.
    let sent = transported.clone().sum_dim(1);
    let denominator = (residual.clone() * sent * inverse_mass.clone())
        .sum_dim(2)
        .clamp_min(MIN_DENOMINATOR);
    let lambda = numerator / denominator; // [B, 1, 1]
    let v = (column_sums + residual * lambda) * inverse_mass; // [B, 1, N]
    (weighted_plan - transported * v).div_scalar(-epsilon)
}
