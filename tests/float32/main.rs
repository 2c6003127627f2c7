//! The tests on the backends' default f32 floats: the bad-input matrix, the backends against
//! each other, records and configs, training (a plain loop, and burn-train's `Learner` on one and two devices),
//! and the examples' retrieval metrics and IDX loader.

#[path = "../common/mod.rs"]
mod common;

mod bad_input;
mod cross_backend;
mod fashion_mnist_idx;
mod learner;
mod records;
mod training;

// The examples' retrieval metrics, with their unit tests (examples' own tests do not run).
#[path = "../../examples/common/retrieval.rs"]
#[allow(dead_code)]
mod retrieval;

// The examples' IDX loader (Fashion-MNIST), with its tests in `fashion_mnist_idx`.
#[path = "../../examples/common/idx.rs"]
mod idx;
