//! What the one-cube-per-sample kernels (GSP's and the balanced transport's) share: the cube's
//! size and the reduction of one value per unit over the cube.

use burn_cubecl::cubecl;
use burn_cubecl::cubecl::prelude::*;

/// The cube's units for a sample whose longer side is `longest`: a power of two (the
/// reductions halve it), at least a warp, at most what every runtime launches, and no more than
/// the sample needs.
pub(super) fn block(longest: usize) -> usize {
    longest.next_power_of_two().clamp(32, 256)
}

/// How [`block_reduce`] combines the units' values.
pub(super) const SUM: u8 = 0;
pub(super) const MAX: u8 = 1;
pub(super) const MIN: u8 = 2;

/// Every unit's `value` combined over the cube ([`SUM`], [`MAX`] or [`MIN`]), seen by every
/// unit.
#[cube]
pub(super) fn block_reduce<F: Float>(value: F, #[comptime] op: u8, #[comptime] block: usize) -> F {
    let unit = UNIT_POS_X as usize;
    let mut shared = Shared::<[F]>::new_slice(block);
    shared[unit] = value;
    sync_cube();
    // A runtime value (the cube's size is `block`): a comptime one cannot change in a loop.
    let mut stride = (CUBE_DIM_X / 2) as usize;
    while stride > 0 {
        if unit < stride {
            let (mine, other) = (shared[unit], shared[unit + stride]);
            if comptime![op == SUM] {
                shared[unit] = mine + other;
            } else if comptime![op == MAX] {
                shared[unit] = mine.max(other);
            } else {
                shared[unit] = mine.min(other);
            }
        }
        sync_cube();
        stride /= 2;
    }
    let combined = shared[0];
    sync_cube();
    combined
}
