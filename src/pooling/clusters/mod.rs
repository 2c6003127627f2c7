//! Cluster aggregators: each output block is a statistic of the positions assigned (softly) to
//! one of K learnable centroids: NetVLAD, OTK.

mod kmeans;
mod netvlad;
mod otk;

pub use netvlad::{NETVLAD_EPS, NetVlad, NetVladConfig, NetVladVersion};
pub use otk::{Otk, OtkConfig, OtkOutput};
