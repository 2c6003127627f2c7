//! The activation of a perceptron's hidden layer with inverted dropout, and its closed-form
//! gradient (docs/maths.md §13): what SALAD's feature and score MLPs apply to every token
//! after their first product, at the widest activations of the crate (`[B·N, 512]` twice).
//!
//! For the product h = x·w `[R, H]`, a bias b `[H]` and a drop probability p ∈ [0, 1):
//!
//! ```text
//! y = relu(h + b) ⊙ k / (1 − p)       k_rj ~ Bernoulli(1 − p), k = 1 when p = 0
//! ∂L/∂h = ∂L/∂y ⊙ [y > 0] / (1 − p)    ∂L/∂b = Σ_r ∂L/∂h_r
//! ```
//!
//! y > 0 exactly where the element was kept and h + b was positive (1/(1 − p) ≥ 1 cannot
//! round a positive value to 0), so the backward reads the output and never a stored mask.
//! The product itself stays the backend's matmul, differentiated as such. The composite below
//! is the portable body of the op and the reference its kernels are tested against; it draws
//! k from the device's random numbers, as Burn's `Dropout` does.

use burn::tensor::activation::relu;
use burn::tensor::{Distribution, Tensor};

/// `relu(hidden + bias)` with inverted dropout at probability `drop`, as tensor ops
/// (differentiable by ordinary autodiff).
pub(crate) fn composite_forward(hidden: Tensor<2>, bias: Tensor<1>, drop: f64) -> Tensor<2> {
    let hidden = relu(hidden + bias.unsqueeze());
    if drop == 0.0 {
        return hidden;
    }
    let keep = 1.0 - drop;
    let kept = hidden.random_like(Distribution::Bernoulli(keep));
    hidden * kept * (1.0 / keep)
}

/// (∂L/∂hidden, ∂L/∂bias) of [`composite_forward`] from its output.
pub(crate) fn closed_form_backward(
    output: Tensor<2>,
    grad: Tensor<2>,
    drop: f64,
) -> (Tensor<2>, Tensor<1>) {
    let d_hidden = grad.mask_fill(output.lower_equal_elem(0.0), 0.0) * (1.0 / (1.0 - drop));
    let d_bias = d_hidden.clone().sum_dim(0).squeeze_dim(0);
    (d_hidden, d_bias)
}
