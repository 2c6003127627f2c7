//! The tests on the backends' default f32 floats: the backends against each other, records
//! and configs, and training.

#[path = "../common/mod.rs"]
mod common;

mod cross_backend;
mod records;
mod training;

// The examples' retrieval metrics, with their unit tests (examples' own tests do not run).
#[path = "../../examples/common/retrieval.rs"]
#[allow(dead_code)]
mod retrieval;
