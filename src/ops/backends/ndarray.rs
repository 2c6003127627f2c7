//! NdArray runs every op through the trait's portable defaults.

impl crate::ops::PoolingOps for burn::backend::NdArray {}
