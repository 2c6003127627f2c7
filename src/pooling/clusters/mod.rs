//! Cluster aggregators: each output block is a statistic of the positions assigned (softly) to
//! one of K learnable centroids: NetVLAD.

mod netvlad;

pub use netvlad::{NETVLAD_EPS, NetVlad, NetVladConfig, NetVladVersion};
