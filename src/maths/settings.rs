//! The parameters of one partial-transport solve.

use burn::config::Config;

use crate::checks;

/// The most iterations any transport solve runs, whatever `max_iterations` asks: a hard cap
/// behind the stall tests, so that no setting can make a solve spin. Newton needs a handful;
/// Sinkhorn at μ = 0.999 needs about 14 000 for a tolerance of 1e-6.
pub const MAX_SOLVER_ITERATIONS: usize = 100_000;

/// The smallest transport ratio μ: the smallest normal f32 (the solvers and the layer's weights
/// t/μ compute in the tensors' float type).
pub const MIN_TRANSPORT_RATIO: f64 = f32::MIN_POSITIVE as f64;

/// The smallest entropy weight ε: below it c/ε leaves f32's range for costs of a few units
/// (GSP's are at most 2).
pub const MIN_EPSILON: f64 = 1e-30;

/// How many consecutive iterations a solver may make no progress before it stops, unconverged:
/// Newton's bracket not shrinking, Sinkhorn's β not rising (both are monotone in exact
/// arithmetic, so a stall means the float's rounding floor).
pub(crate) const STALL_PATIENCE: usize = 3;

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
///
/// Every solver stops at the first of: each sample's transported mass within `tolerance` of μ
/// (converged); `max_iterations` (or [`MAX_SOLVER_ITERATIONS`]) iterations; no progress for a
/// few iterations (the float cannot resolve the tolerance); a NaN (non-finite input). Only
/// the first counts as converged.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TransportSettings {
    /// μ, the fraction of the total mass moved onto the prototypes, in
    /// [[`MIN_TRANSPORT_RATIO`], 1].
    pub transport_ratio: f64,
    /// ε ≥ [`MIN_EPSILON`], the entropy weight (the reference code's γ is 1/ε).
    pub epsilon: f64,
    /// Upper bound on solver iterations (at least 1; above [`MAX_SOLVER_ITERATIONS`], that
    /// is the bound).
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
        checks::at_least(
            layer,
            "transport_ratio",
            mu,
            MIN_TRANSPORT_RATIO,
            "the smallest normal f32",
        );
        checks::at_least(
            layer,
            "epsilon",
            self.epsilon,
            MIN_EPSILON,
            "below it c/ε leaves f32's range",
        );
        checks::at_least_one(layer, "max_iterations", self.max_iterations);
        checks::positive(layer, "tolerance", self.tolerance);
    }

    /// The iterations a solve may run: `max_iterations`, at most [`MAX_SOLVER_ITERATIONS`].
    pub(crate) fn iteration_cap(&self) -> usize {
        self.max_iterations.min(MAX_SOLVER_ITERATIONS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> TransportSettings {
        TransportSettings {
            transport_ratio: 0.3,
            epsilon: 0.2,
            max_iterations: 100,
            tolerance: 1e-6,
            solver: TransportSolver::Newton,
        }
    }

    #[test]
    fn the_cap_bounds_max_iterations() {
        assert_eq!(settings().iteration_cap(), 100);
        let huge = TransportSettings {
            max_iterations: usize::MAX,
            ..settings()
        };
        assert_eq!(huge.iteration_cap(), MAX_SOLVER_ITERATIONS);
    }

    #[test]
    #[should_panic(
        expected = "L: `transport_ratio` must be at least 1.1754943508222875e-38 (the smallest normal f32), got 1e-40"
    )]
    fn a_transport_ratio_below_f32_panics() {
        TransportSettings {
            transport_ratio: 1e-40,
            ..settings()
        }
        .validate("L");
    }

    #[test]
    #[should_panic(expected = "L: `epsilon` must be at least 1e-30")]
    fn an_epsilon_below_f32_panics() {
        TransportSettings {
            epsilon: 1e-40,
            ..settings()
        }
        .validate("L");
    }
}
