//! [`PoolingOps`](super::PoolingOps) for each covered backend, one module per backend: what
//! it overrides is what it has kernels for; the rest are the trait's portable defaults.
//!
//! - `flex/`: fused CPU kernels for every op, one file per op;
//! - `cube/`: CubeCL kernels (every CubeCL runtime; custom ops of the fusion stream under the
//!   `fusion` feature) for GSP's costs and transport solve, the balanced transport solve, the
//!   generalized mean and the weighted sum, with their backwards but the balanced transport's
//!   and the weighted sum's features gradient (the log-sum-exp, the L2 normalisation and the
//!   hidden activation keep their portable bodies);
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
