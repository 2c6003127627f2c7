//! A differentiable solve of a small symmetric positive-definite system with ordinary tensor
//! ops (Cholesky factor, then two triangular substitutions), so autodiff carries gradients to
//! both sides. Meant for the ridge systems of [`ZeroShotLoss`](super::ZeroShotLoss), whose
//! size is half a batch: O(n) small ops, no explicit inverse.

use burn::tensor::Tensor;

use crate::maths::precision::unit_roundoff;

/// Lower-triangular L with A = L Lᵀ, built column by column.
///
/// Every squared pivot is floored at n·u·max_i A_ii (u the dtype's unit roundoff), the size
/// of the rounding error elimination leaves in it: a matrix that is singular up to that
/// error (a tiny ridge on identical attributes) would otherwise give a pivot of 0, or the
/// square root of a negative rounding error, and NaN. Far below any ridge the loss uses
/// (n·u ≈ 8e-6 for n = 64 in f32, against λ = 0.05), so well-conditioned systems are solved
/// exactly as before.
fn cholesky(a: Tensor<2>) -> Tensor<2> {
    let [n, _] = a.dims();
    let device = a.device();
    let dtype = a.dtype();
    let diagonal = a.clone().detach() * Tensor::<2>::eye(n, &device).cast(dtype);
    let floor = diagonal
        .max()
        .mul_scalar(n as f64 * unit_roundoff(dtype))
        .clamp_min(f64::from(f32::MIN_POSITIVE))
        .reshape([1, 1]);
    let mut columns: Vec<Tensor<2>> = Vec::with_capacity(n);
    for j in 0..n {
        let mut column = a.clone().slice([0..n, j..j + 1]); // [n, 1]
        if j > 0 {
            let previous = Tensor::cat(columns.clone(), 1); // [n, j]
            let row = previous.clone().slice([j..j + 1, 0..j]); // [1, j]
            column = column - previous.matmul(row.transpose());
        }
        let pivot = column
            .clone()
            .slice([j..j + 1, 0..1])
            .max_pair(floor.clone())
            .sqrt(); // [1, 1]
        let below = Tensor::<1>::from_data(
            (0..n)
                .map(|i| if i >= j { 1.0 } else { 0.0 })
                .collect::<Vec<f32>>()
                .as_slice(),
            &device,
        )
        .cast(column.dtype())
        .unsqueeze_dim::<2>(1);
        columns.push(column / pivot * below);
    }
    Tensor::cat(columns, 1)
}

/// Solves L X = B for lower-triangular L, one row at a time.
fn forward_substitution(lower: Tensor<2>, rhs: Tensor<2>) -> Tensor<2> {
    let [n, m] = rhs.dims();
    let mut rows: Vec<Tensor<2>> = Vec::with_capacity(n);
    for i in 0..n {
        let mut row = rhs.clone().slice([i..i + 1, 0..m]);
        if i > 0 {
            let known = Tensor::cat(rows.clone(), 0); // [i, m]
            row = row - lower.clone().slice([i..i + 1, 0..i]).matmul(known);
        }
        rows.push(row / lower.clone().slice([i..i + 1, i..i + 1]));
    }
    Tensor::cat(rows, 0)
}

/// Solves A X = B for symmetric positive-definite A `[n, n]`, B `[n, m]`.
pub(crate) fn solve_spd(a: Tensor<2>, rhs: Tensor<2>) -> Tensor<2> {
    let lower = cholesky(a);
    let y = forward_substitution(lower.clone(), rhs);
    // Lᵀ X = Y is a forward substitution in reversed order.
    let flip_rows = |t: Tensor<2>| t.flip([0]);
    let upper_flipped = lower.transpose().flip([0, 1]); // lower-triangular again
    flip_rows(forward_substitution(upper_flipped, flip_rows(y)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData, Tolerance};

    #[test]
    fn solves_a_known_system() {
        let device = Device::flex();
        let a =
            Tensor::<2>::from_floats([[4.0, 2.0, 0.4], [2.0, 5.0, 1.0], [0.4, 1.0, 3.0]], &device);
        let x = Tensor::<2>::from_floats([[1.0, -1.0], [0.5, 2.0], [-2.0, 0.25]], &device);
        let b = a.clone().matmul(x.clone());
        solve_spd(a, b)
            .into_data()
            .assert_approx_eq::<f32>(&x.into_data(), Tolerance::rel_abs(1e-5, 1e-5));
        let _ = TensorData::from([0.0f32]);
    }

    /// A Gram matrix of identical rows plus a ridge f32 cannot resolve (singular up to
    /// rounding): the floored pivots give a finite solution, on every CPU backend.
    #[test]
    fn a_numerically_singular_system_gives_finite_values() {
        for (name, device) in crate::test_support::cpu_devices() {
            let z = Tensor::<2>::from_floats([[0.2, 0.3, 0.5]; 4], &device);
            let a =
                z.clone().matmul(z.transpose()) + Tensor::<2>::eye(4, &device).mul_scalar(1e-30);
            let rhs = Tensor::<2>::from_floats(
                [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, -1.0]],
                &device,
            );
            let x = solve_spd(a, rhs).into_data().try_to_vec::<f32>().unwrap();
            assert!(x.iter().all(|v| v.is_finite()), "{name}: {x:?}");
        }
    }
}
