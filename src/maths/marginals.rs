//! The marginals of a transport plan, the only part of it GSP's pooling reads: the residual
//! mass ρ_j of each position and the mass Σ_j P_kj sent to each prototype.

use burn::tensor::Tensor;

/// `[B, K+1, N]` plan → `[B, N + K]` marginals: ρ (row 0), then each prototype's row sum.
pub(crate) fn marginals_of(plan: Tensor<3>) -> Tensor<2> {
    let [batch, rows, positions] = plan.dims();
    let residual = plan
        .clone()
        .slice([0..batch, 0..1, 0..positions])
        .reshape([batch, positions]);
    let sent = plan
        .slice([0..batch, 1..rows, 0..positions])
        .sum_dim(2)
        .reshape([batch, rows - 1]);
    Tensor::cat(vec![residual, sent], 1)
}

/// ∂L/∂marginals `[B, N + K]` as the ∂L/∂plan `[B, K+1, N]` it stands for (row 0 from the
/// residual part, each prototype's row constant).
pub(crate) fn marginals_gradient_as_plan_gradient(
    grad: Tensor<2>,
    [batch, rows, positions]: [usize; 3],
) -> Tensor<3> {
    let residual = grad
        .clone()
        .slice([0..batch, 0..positions])
        .unsqueeze_dim::<3>(1);
    let sent = grad
        .slice([0..batch, positions..positions + rows - 1])
        .unsqueeze_dim::<3>(2)
        .expand([batch, rows - 1, positions]);
    Tensor::cat(vec![residual, sent], 1)
}
