//! Cluster aggregators: each output block is a statistic of the positions assigned (softly) to
//! one of K learnable centroids: NetVLAD, and SALAD's optimal-transport aggregation.

mod netvlad;
mod ot_aggregation;

pub use netvlad::{NETVLAD_EPS, NetVlad, NetVladConfig, NetVladVersion};
pub use ot_aggregation::{OtAggregation, OtAggregationConfig, OtAggregationOutput, OtSinkhorn};
