//! Transport poolings: the positions are weighted by an entropic optimal-transport plan onto
//! learnable prototypes, solved by the crate's one transport stack ([`crate::transport`]).

mod gsp;

pub use gsp::{GSP_READOUT_EPS, Gsp, GspConfig, GspOutput, GspReadout};
