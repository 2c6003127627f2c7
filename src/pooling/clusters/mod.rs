//! Cluster aggregators: each output block is a statistic of the positions assigned (softly) to
//! one of K learnable centroids: NetVLAD, OTK, and SALAD's optimal-transport aggregation.

mod kmeans;
mod netvlad;
mod ot_aggregation;
mod otk;

pub use netvlad::{NETVLAD_EPS, NetVlad, NetVladConfig, NetVladVersion};
pub use ot_aggregation::{OtAggregation, OtAggregationConfig, OtAggregationOutput, OtSinkhorn};
pub use otk::{Otk, OtkConfig, OtkOutput};
