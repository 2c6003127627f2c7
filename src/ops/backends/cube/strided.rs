//! How the kernels walk their tensors: one unit per element of a `[B, L]` output, reading a
//! line of a `[B, ·, ·]` input (the elements along one axis, the other two fixed) through its
//! strides, so that both layouts and any contiguous or permuted input take the same kernel.

use burn_cubecl::cubecl;
use burn_cubecl::cubecl::prelude::*;

/// The elements along one axis of a tensor, the others fixed: element n is at
/// `start + n · step`.
#[derive(CubeType, Clone, Copy)]
pub(super) struct Strided {
    start: usize,
    step: usize,
}

#[cube]
impl Strided {
    /// The line starting at `start` with elements `step` apart (for an output, which the
    /// constructors below cannot borrow).
    pub fn new(start: usize, step: usize) -> Strided {
        Strided { start, step }
    }

    /// The line of a `[B, ·, ·]` `tensor` along axis `along` through sample `b` and index `i`
    /// of axis `across`.
    pub fn through<F: Float>(
        tensor: &Tensor<F>,
        b: usize,
        i: usize,
        #[comptime] across: usize,
        #[comptime] along: usize,
    ) -> Strided {
        Strided {
            start: b * tensor.stride(0) + i * tensor.stride(across),
            step: tensor.stride(along),
        }
    }

    /// Row `b` of a `[B, L]` tensor.
    pub fn row<F: Float>(tensor: &Tensor<F>, b: usize) -> Strided {
        Strided {
            start: b * tensor.stride(0),
            step: tensor.stride(1),
        }
    }

    /// Where the line's element `n` is.
    pub fn at(&self, n: usize) -> usize {
        self.start + n * self.step
    }
}

/// This unit's (b, i) when there is one unit per element of a `[B, length]` output.
#[cube]
pub(super) fn unit_position(length: usize) -> (usize, usize) {
    (ABSOLUTE_POS / length, ABSOLUTE_POS % length)
}
