//! What a float dtype resolves: the one table the numerics that adapt to the device's dtype
//! read (the Cholesky pivot floors, LSE's Taylor crossover).

use burn::tensor::DType;

/// The unit roundoff u of a float type: the relative error of one rounding (2⁻²³ for f32,
/// 2⁻⁵² for f64, 2⁻¹⁰ for f16, 2⁻⁷ for bf16). Other dtypes are taken as f32.
pub(crate) fn unit_roundoff(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => f64::EPSILON,
        DType::F16 => 9.765625e-4,
        DType::BF16 => 7.8125e-3,
        _ => f32::EPSILON as f64,
    }
}
