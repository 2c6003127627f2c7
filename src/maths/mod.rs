//! The reference maths of every op, written once with the `Tensor` API: the leaf of the crate.
//!
//! Nothing here knows about backends or the extension trait. These functions are
//! - the portable bodies of [`PoolingOps`](crate::ops::PoolingOps) (its default methods wrap
//!   them), which NdArray, and Cube under fusion, run;
//! - the exact paths that ordinary autodiff differentiates on a device the extension does not
//!   cover (for the transport solve: [`newton_step`]);
//! - the references that each backend's kernels are tested against.
//!
//! The derivations are in `docs/maths.md` of the repository; each file's header gives the
//! formulas it implements.

pub(crate) mod balanced;
pub(crate) mod costs;
pub(crate) mod generalized_mean;
pub(crate) mod implicit_backward;
pub(crate) mod l2_normalize;
pub(crate) mod log_sum_exp;
pub(crate) mod marginals;
pub(crate) mod newton_step;
pub(crate) mod precision;
pub(crate) mod relu_dropout;
pub(crate) mod settings;
pub(crate) mod solver;
pub(crate) mod weighted_sum;
