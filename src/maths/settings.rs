//! The parameters of one partial-transport solve.

use burn::config::Config;

use crate::checks;

/// Which iteration finds the scalar dual β of each sample (see [`partial_transport`](crate::transport::partial_transport)).
///
/// Both solve the same fixed point and give the same plan; they differ in speed.
#[derive(Config, Copy, Debug, PartialEq, Eq)]
pub enum TransportSolver {
    /// Safeguarded Newton on β inside its bracket, bisection when a step leaves it. Converges
    /// in a handful of steps for every transport ratio. The default.
    Newton,
    /// The reference algorithm's Sinkhorn-style scaling, in the log domain, with a stopping
    /// test. Converges linearly at a rate ≈ μ: fine at μ = 0.3, slow as μ → 1.
    Sinkhorn,
}

/// Settings of an entropy-smoothed partial transport problem and of its solver.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TransportSettings {
    /// μ, the fraction of the total mass moved onto the prototypes, in (0, 1].
    pub transport_ratio: f64,
    /// ε > 0, the entropy weight (the reference code's γ is 1/ε).
    pub epsilon: f64,
    /// Upper bound on solver iterations.
    pub max_iterations: usize,
    /// The solver stops once every sample's transported mass is within this of μ.
    pub tolerance: f64,
    /// The β iteration.
    pub solver: TransportSolver,
}

impl TransportSettings {
    /// Panics with the name of the first invalid setting and its value.
    pub fn validate(&self, layer: &str) {
        let mu = self.transport_ratio;
        assert!(
            mu > 0.0 && mu <= 1.0,
            "{layer}: `transport_ratio` must be in (0, 1], got {mu}"
        );
        checks::positive(layer, "epsilon", self.epsilon);
        checks::at_least_one(layer, "max_iterations", self.max_iterations);
        checks::positive(layer, "tolerance", self.tolerance);
    }
}
