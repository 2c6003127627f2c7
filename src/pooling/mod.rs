//! Learnable global pooling layers: `[B, C, H, W]` maps or `[B, N, C]` token sets to `[B, C]`
//! (`[B, D]` for a projecting GSP, `[B, K·C]` for NetVLAD, `[B, p·heads·C]` for OTK, `[B, m·l (+256)]`
//! for OtAggregation).
//!
//! | layer | pools with | parameters |
//! |---|---|---|
//! | [`Gap`] | the mean | none |
//! | [`Gmp`] | the maximum (MAC) | none |
//! | [`GapGmp`] | the mean and the maximum, summed or concatenated | none |
//! | [`Gem`] | the generalized (power) mean | one power `p` |
//! | [`GroupGem`] | the generalized mean, one `p` per channel group | `p: [groups]` |
//! | [`Gsp`] | weights from partial optimal transport onto prototypes; optional projection, mean / GeM / max read-out, max branch | `prototypes: [K, D]`, projection `[C, D]`, read-out `p` |
//! | [`Lse`] | the log-sum-exp (smooth max) or its softmax-weighted mean | temperature `r` |
//! | [`TokenPooling`] | token modes: cls, last, mean, max, mean·√L, SGPT weights | none |
//! | [`AttentionPool`] | multi-head attention from learned latents, then an MLP (MAP) | latents, projections, MLP |
//! | [`SimPool`] | attention from the mean as query, optional power γ | LayerNorm, `W_q`, `W_k`, β |
//! | [`NetVlad`] | soft-assigned residuals to K centroids, intra- and globally L2-normalised | centroids, assignment `[K, C]`, bias `[K]` |
//! | [`Otk`] | p references per head each take unit mass from the positions by balanced entropic transport and pool what they took | references `[heads, p, C]` |
//! | [`OtAggregation`] | SALAD: MLP features transported onto m clusters and a dustbin (balanced Sinkhorn), per-cluster and global L2, optional global token | three MLPs, dustbin score |
//!
//! Every layer has `forward(maps)`, `forward_tokens(tokens)` and `forward(input)` for a
//! [`PoolingInput`] (maps or tokens, with a mask, with prefix tokens). [`PoolingConfig`] and
//! [`Pooling`] are one config and one module for all of them, to choose the pooling at run
//! time.
//!
//! The layers live in families, one folder each: `reductions` (per-channel reductions),
//! `transport` (weights from optimal transport onto prototypes), `attention` (attention
//! weights from a query), `clusters` (statistics of the positions softly assigned to learnable
//! centroids).

mod attention;
mod choice;
mod clusters;
mod input;
mod reductions;
mod transport;

pub use attention::{
    AttentionPool, AttentionPoolConfig, AttentionPoolOutput, SIMPOOL_MIN_EXPONENT, SimPool,
    SimPoolConfig,
};
pub use choice::{Pooling, PoolingConfig};
pub use clusters::{NETVLAD_EPS, NetVlad, NetVladConfig, NetVladVersion};
pub use clusters::{OtAggregation, OtAggregationConfig, OtAggregationOutput, OtSinkhorn};
pub use clusters::{Otk, OtkConfig, OtkOutput};
pub use input::PoolingInput;
pub use reductions::{
    Gap, GapConfig, GapGmp, GapGmpCombine, GapGmpConfig, Gem, GemConfig, Gmp, GmpConfig, GroupGem,
    GroupGemConfig, GroupLayout, Lse, LseConfig, LseOutput, MIN_EPS, MIN_POWER, TokenMode,
    TokenPooling, TokenPoolingConfig,
};
pub use transport::{GSP_READOUT_EPS, GspReadout};
pub use transport::{Gsp, GspConfig, GspOutput};
