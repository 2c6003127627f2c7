//! The kernels' launch without this crate's `fusion` feature: on an unfused `Cube` (its float
//! primitive is the CubeCL tensor) a kernel runs at once. If Burn's fusion is on all the same
//! (another crate of the build enabled it, as a GPU application's default `burn` does), `Cube`
//! is `Fusion<CubeBackend>`, whose lazy tensors are no CubeCL buffers: the ops fall back to the
//! portable bodies, with one warning the first time.

use std::any::{Any, TypeId};
use std::sync::Once;

use burn::backend::Cube;
use burn::backend::tensor::FloatTensor;
use burn_cubecl::tensor::CubeTensor;

use super::kernel::{Kernel, takes};

/// Whether `Cube`'s float primitive is the CubeCL tensor the kernels take (it is not when Burn's
/// `fusion` feature is on).
pub(super) fn kernels_apply() -> bool {
    TypeId::of::<FloatTensor<Cube>>() == TypeId::of::<CubeTensor>()
}

/// `value` as type `T` when it is one (a type-checked identity, no conversion).
fn same_type<S: 'static, T: 'static>(value: S) -> Result<T, S> {
    let mut slot = Some(value);
    match (&mut slot as &mut dyn Any).downcast_mut::<Option<T>>() {
        Some(same) => Ok(same.take().expect("filled above")),
        None => Err(slot.expect("not taken")),
    }
}

static FUSED_FALLBACK: Once = Once::new();

/// The warning of a fused `Cube` without this crate's `fusion` feature, once per process.
fn warn_fused_fallback() {
    FUSED_FALLBACK.call_once(|| {
        eprintln!(
            "burn-pooling: Burn's fusion wraps the Cube backend but burn-pooling was built \
             without its `fusion` feature; its CubeCL kernels fall back to the portable \
             composites (enable `burn-pooling/fusion`)"
        );
    });
}

/// Runs `kernel` on `inputs` when they are CubeCL tensors of one float dtype; hands them back
/// when they are not (a fused backend, mixed dtypes or a dtype the kernels do not take).
pub(super) fn launch<const I: usize, const O: usize>(
    kernel: Kernel,
    inputs: [FloatTensor<Cube>; I],
) -> Result<[FloatTensor<Cube>; O], [FloatTensor<Cube>; I]> {
    if !kernels_apply() {
        warn_fused_fallback();
        return Err(inputs);
    }
    let tensors = inputs.map(|tensor| {
        same_type::<_, CubeTensor>(tensor).unwrap_or_else(|_| unreachable!("kernels_apply"))
    });
    let from_cube = |tensor: CubeTensor| -> FloatTensor<Cube> {
        same_type(tensor).unwrap_or_else(|_| unreachable!("kernels_apply"))
    };
    let dtype = tensors[0].dtype;
    if !takes(dtype) || tensors.iter().any(|tensor| tensor.dtype != dtype) {
        return Err(tensors.map(from_cube));
    }
    let outputs: Vec<_> = kernel
        .run(tensors.into())
        .into_iter()
        .map(from_cube)
        .collect();
    Ok(outputs
        .try_into()
        .unwrap_or_else(|_| unreachable!("one output per declared output")))
}
