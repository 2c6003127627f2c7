//! The marginals of a transport plan, the only part of it GSP's pooling reads: the mass
//! t_j = Σ_k P_kj each position sends and the mass Σ_j P_kj each prototype receives.
//!
//! GSP's weights are t_j / μ. They are summed from the plan directly, not taken as a_j − ρ_j:
//! at small μ the residual ρ_j is a_j up to a relative μ, and the difference of the two keeps
//! only the rounding of a_j (in f32 at μ = 10⁻⁶, weights off by several per cent that no
//! longer sum to 1). The gradient is the same either way at the fixed point, where
//! ρ_j + t_j = a_j (docs/maths.md §4).

use burn::tensor::Tensor;

/// `[B, K+1, N]` plan → `[B, N + K]` marginals: each position's transported mass (the sum of
/// its column over the prototypes' rows 1..=K), then each prototype's row sum.
pub(crate) fn marginals_of(plan: Tensor<3>) -> Tensor<2> {
    let [batch, rows, positions] = plan.dims();
    let transported = plan.slice([0..batch, 1..rows, 0..positions]);
    let sent = transported.clone().sum_dim(1).reshape([batch, positions]);
    let received = transported.sum_dim(2).reshape([batch, rows - 1]);
    Tensor::cat(vec![sent, received], 1)
}

/// ∂L/∂marginals `[B, N + K]` as the ∂L/∂plan `[B, K+1, N]` it stands for: 0 on the residual
/// row, g_j + g_k on P_kj (position j's sent mass and prototype k's received mass).
pub(crate) fn marginals_gradient_as_plan_gradient(
    grad: Tensor<2>,
    [batch, rows, positions]: [usize; 3],
) -> Tensor<3> {
    let count = rows - 1;
    let sent = grad
        .clone()
        .slice([0..batch, 0..positions])
        .unsqueeze_dim::<3>(1)
        .expand([batch, count, positions]);
    let received = grad
        .slice([0..batch, positions..positions + count])
        .unsqueeze_dim::<3>(2)
        .expand([batch, count, positions]);
    let residual = Tensor::zeros([batch, 1, positions], &sent.device());
    Tensor::cat(vec![residual, sent + received], 1)
}
