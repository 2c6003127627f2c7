//! [`PoolingOps`](super::PoolingOps) for each covered backend, one module per backend: what
//! it overrides is what it has kernels for; the rest are the trait's portable defaults.
//!
//! - `flex/`: fused CPU kernels for every op, one file per op;
//! - `cube/`: CubeCL kernels for the generalized mean (forward, backward) and the weighted
//!   sum (forward, weights gradient), one file per op;
//! - `ndarray`: the defaults only;
//! - `autodiff`: one node per op whose backward is the op's closed-form backward.

#[cfg(feature = "autodiff")]
mod autodiff;
#[cfg(feature = "cube")]
mod cube;
#[cfg(feature = "flex")]
mod flex;
#[cfg(feature = "ndarray")]
mod ndarray;

#[cfg(all(test, feature = "autodiff"))]
pub(crate) use autodiff::BACKWARD_CALLS;
