//! Generalized sum pooling (GSP): pooling weights from entropy-smoothed partial optimal
//! transport of the features onto learnable prototypes.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::Initializer;
use burn::tensor::{Bool, Device, Int, Tensor};

use crate::checks;
use crate::display::one_line_display;
use crate::maths::costs::lipschitz_normalize;
use crate::maths::settings::{TransportSettings, TransportSolver};
use crate::ops::routing::{transport_costs, transport_marginals};
use crate::pooling::input::{PoolingInput, Positions};

/// Configuration of [`Gsp`]. Defaults are the reference's for CUB/Cars196 (Gürbüz et al.,
/// ICCV 2023): K = 64, μ = 0.3, γ = 5 (ε = 0.2), 100 iterations.
#[derive(Config, Debug)]
pub struct GspConfig {
    /// Feature channels C (the prototypes' width).
    pub channels: usize,
    /// Number of prototypes K. Default: 64 (the reference uses 128 for SOP and In-Shop).
    #[config(default = 64)]
    pub num_prototypes: usize,
    /// Transport ratio μ in [[`MIN_TRANSPORT_RATIO`](crate::transport::MIN_TRANSPORT_RATIO), 1]:
    /// the fraction of the feature mass moved onto the prototypes, i.e. roughly the fraction
    /// of positions kept. μ = 1 is GAP. Default: 0.3.
    #[config(default = 0.3)]
    pub transport_ratio: f64,
    /// Entropy weight ε ≥ [`MIN_EPSILON`](crate::transport::MIN_EPSILON) (the reference's
    /// `entropy_regularizer_weight` γ is 1/ε). Small ε selects positions hard, large ε tends
    /// to GAP. Default: 0.2 (γ = 5).
    #[config(default = 0.2)]
    pub epsilon: f64,
    /// Upper bound on solver iterations (at most
    /// [`MAX_SOLVER_ITERATIONS`](crate::transport::MAX_SOLVER_ITERATIONS) run whatever it
    /// says). Default: 100.
    #[config(default = 100)]
    pub max_iterations: usize,
    /// The solver stops once each sample's transported mass is within this of μ.
    /// Default: 1e-6.
    #[config(default = 1e-6)]
    pub tolerance: f64,
    /// The β solver. Default: Newton.
    #[config(default = "TransportSolver::Newton")]
    pub solver: TransportSolver,
    /// Prototype initializer, before [`Gsp::init_prototypes_kcenter`]. Default: Glorot
    /// (Xavier) uniform, as the reference.
    #[config(default = "Initializer::XavierUniform { gain: 1.0 }")]
    pub initializer: Initializer,
    /// Leading tokens (class token, register tokens) that the token paths skip. Default: 0.
    #[config(default = 0)]
    pub num_prefix_tokens: usize,
}

impl GspConfig {
    /// The transport settings this config gives the layer.
    pub fn settings(&self) -> TransportSettings {
        TransportSettings {
            transport_ratio: self.transport_ratio,
            epsilon: self.epsilon,
            max_iterations: self.max_iterations,
            tolerance: self.tolerance,
            solver: self.solver,
        }
    }

    /// Creates the [`Gsp`] layer with its `[K, C]` prototypes on `device`.
    ///
    /// # Panics
    ///
    /// If `channels` or `num_prototypes` is 0, the prototypes `[K, C]` would have more than
    /// 2³¹ elements (checked before allocating), μ is outside
    /// [[`MIN_TRANSPORT_RATIO`](crate::transport::MIN_TRANSPORT_RATIO), 1], ε is below
    /// [`MIN_EPSILON`](crate::transport::MIN_EPSILON), or `max_iterations` or `tolerance` is
    /// not positive.
    pub fn init(&self, device: &Device) -> Gsp {
        checks::at_least_one("Gsp", "channels", self.channels);
        checks::at_least_one("Gsp", "num_prototypes", self.num_prototypes);
        checks::parameter_size(
            "Gsp",
            &[
                ("num_prototypes", self.num_prototypes),
                ("channels", self.channels),
            ],
        );
        self.settings().validate("Gsp");
        let prototypes = self.initializer.init_with(
            [self.num_prototypes, self.channels],
            Some(self.channels),
            Some(self.num_prototypes),
            device,
        );
        Gsp {
            prototypes,
            settings: self.settings(),
            num_prefix_tokens: self.num_prefix_tokens,
        }
    }
}

/// Everything [`Gsp`] computes for a batch.
#[derive(Debug, Clone)]
pub struct GspOutput {
    /// `[B, C]`: y = Σ_n w_n x_n.
    pub pooled: Tensor<2>,
    /// `[B, N]`: pooling weights w_n ≥ 0, rows sum to 1 (0 at padded positions). For maps, N
    /// runs over H·W in row-major order.
    pub weights: Tensor<2>,
    /// `[B, K]`: mass per prototype z_k = Σ_n P_kn / μ, rows sum to 1 (the input of
    /// [`ZeroShotLoss`](crate::loss::ZeroShotLoss)).
    pub attributes: Tensor<2>,
    /// `[1]`: solver iterations run for this batch (the most over its samples). A tensor, so
    /// that a forward never waits for the device unless this is read.
    pub iterations: Tensor<1, Int>,
    /// `[1]`: whether every sample's transported mass met the tolerance. False when a solve
    /// used its `max_iterations`, stalled at the float's rounding floor (a tolerance below
    /// what the float resolves) or met a NaN (a non-finite input): see
    /// [`TransportSettings`].
    pub converged: Tensor<1, Bool>,
}

/// Generalized sum pooling (Gürbüz, Şener, Alatan, "Generalized Sum Pooling for Metric
/// Learning", ICCV 2023).
///
/// Each position holds mass 1/N. A fraction μ of it is moved onto K learnable prototypes ω by
/// entropy-smoothed optimal transport at cost c_kn = ‖φ(ω_k) − φ(x_n)‖ (φ(v) = v / max(1, ‖v‖)),
/// and each position is pooled with the mass it sent:
///
/// ```text
/// t_n = (1/N) σ(β + ℓ_n),   ℓ_n = logsumexp_k(−c_kn / ε),   Σ_n t_n = μ
/// w_n = t_n / μ,            y = Σ_n w_n x_n
/// ```
///
/// Positions far from every prototype (background, nuisance) keep their mass and get almost no
/// weight. μ = 1, ε → ∞, or identical features give GAP exactly; ε → 0 keeps the μN positions
/// nearest the prototypes; μ → 0 is attention pooling with temperature ε.
///
/// Gradients of the solve are analytical (implicit differentiation at the fixed point), so
/// backward memory does not grow with the iterations.
///
/// The weights are summed from the plan (t_n = Σ_k P_kn), so they sum to 1 up to rounding even
/// at tiny μ; φ is computed without overflow for any finite input; padded positions are read
/// as 0 (their content reaches no output and no gradient), and a NaN at a valid position makes
/// its sample's output NaN, never another sample's.
///
/// Initialise the prototypes from data with [`init_prototypes_kcenter`](Self::init_prototypes_kcenter)
/// after a warm-up, and train them with [`ZeroShotLoss`](crate::loss::ZeroShotLoss) on the
/// attributes next to the metric loss.
#[derive(Module, Debug)]
#[module(custom_display)]
pub struct Gsp {
    /// The prototypes ω, `[K, C]`.
    pub prototypes: Param<Tensor<2>>,
    /// μ, ε and the solver's settings.
    #[module(skip)]
    pub settings: TransportSettings,
    /// Leading tokens skipped by the token paths.
    pub num_prefix_tokens: usize,
}

one_line_display!(Gsp, |gsp|
    "channels" => gsp.prototypes.shape().dims::<2>()[1],
    "num_prototypes" => gsp.prototypes.shape().dims::<2>()[0],
    "transport_ratio" => gsp.settings.transport_ratio,
    "epsilon" => gsp.settings.epsilon,
    "solver" => format!("{:?}", gsp.settings.solver),
    "num_prefix_tokens" => gsp.num_prefix_tokens,
);

impl Gsp {
    fn dims(&self) -> [usize; 2] {
        self.prototypes.shape().dims()
    }

    fn pool(&self, positions: Positions) -> GspOutput {
        let (batch, count, channels) = positions.dims();
        let [prototypes, expected] = self.dims();
        assert!(
            channels == expected,
            "Gsp: channel mismatch: expected C = {expected} (the prototypes' width), got {channels}"
        );
        // What may have changed since `init` (public fields): host values, no device read.
        assert!(
            prototypes > 0,
            "Gsp: the prototypes [K, C] are empty: expected K > 0, got K = 0"
        );
        self.settings.validate("Gsp");
        let device = positions.features.device();
        checks::same_device(
            "Gsp",
            [
                ("the input", &device),
                ("the parameters", &self.prototypes.device()),
            ],
        );
        if positions.is_empty() {
            let empty = |width| Tensor::empty([0, width], &device);
            return GspOutput {
                weights: empty(count),
                attributes: empty(prototypes),
                pooled: positions.empty(),
                iterations: Tensor::zeros([1], &device),
                converged: Tensor::from_data([true], &device),
            };
        }
        let mu = self.settings.transport_ratio;
        // Padding read as 0: its costs, plan entries and gradients stay finite.
        let positions = positions.finite_padding();
        let mass = positions.mean_weights();
        let costs = transport_costs(
            positions.features.clone(),
            self.prototypes.val(),
            positions.layout,
        );
        let (marginals, (iterations, converged)) = transport_marginals(costs, mass, &self.settings);
        let [_, width] = marginals.dims();
        // w = t / μ with t_j = Σ_k P_kj summed from the plan, not the reference's a − ρ, which
        // cancels at small μ (docs/maths.md §4).
        let weights = marginals.clone().slice([0..batch, 0..count]).div_scalar(mu);
        let attributes = marginals.slice([0..batch, count..width]).div_scalar(mu);
        let pooled = positions.weighted_sum(weights.clone());
        GspOutput {
            pooled,
            weights,
            attributes,
            iterations,
            converged,
        }
    }

    /// Pools feature maps `[B, C, H, W]`, a token set `[B, N, C]` (skipping the first
    /// `num_prefix_tokens` tokens) or any [`PoolingInput`] (masked, with its own prefix) into
    /// `[B, C]`. Each valid position holds mass 1/N_valid. An empty batch (B = 0) gives an
    /// empty `[0, C]`.
    ///
    /// # Panics
    ///
    /// If no position is left to pool (N, H or W is 0, or N ≤ the prefix), C = 0, the mask's
    /// shape does not match, a mask row has no valid position, C differs from the prototypes'
    /// width, the input (or its mask) is on another device than the prototypes, or
    /// [`settings`](Self::settings) (a public field) was set to an invalid value (checked as
    /// in [`GspConfig::init`], on the host: no device read).
    pub fn forward(&self, input: impl Into<PoolingInput>) -> Tensor<2> {
        self.forward_detailed(input).pooled
    }

    /// [`forward`](Self::forward) for a token set `[B, N, C]`, spelled out.
    pub fn forward_tokens(&self, tokens: Tensor<3>) -> Tensor<2> {
        self.forward(tokens)
    }

    /// [`forward`](Self::forward) with the pooling weights, the attributes and
    /// the solver's iteration count.
    ///
    /// # Shapes
    ///
    /// - output: pooled `[B, C]`, weights `[B, N]` (N = H·W for maps, the tokens after the
    ///   prefix for token sets), attributes `[B, K]`, iterations and converged `[1]`
    pub fn forward_detailed(&self, input: impl Into<PoolingInput>) -> GspOutput {
        self.pool(input.into().resolve("Gsp", self.num_prefix_tokens))
    }

    /// Sets the prototypes to K of the given feature vectors chosen by greedy k-center
    /// (farthest-point) selection in the cost's metric, as the reference does over ~1024 GAP
    /// embeddings collected during a warm-up. Starts from the first row. The parameter keeps
    /// its identity (an optimizer built before still trains it).
    ///
    /// # Shapes
    ///
    /// - features: `[M, C]`, M ≥ K
    ///
    /// # Panics
    ///
    /// If C differs from the prototypes' width or M < K.
    pub fn init_prototypes_kcenter(self, features: Tensor<2>) -> Self {
        let [count, channels] = features.dims();
        let [prototypes, expected] = self.dims();
        assert!(
            channels == expected,
            "Gsp::init_prototypes_kcenter: channel mismatch: expected C = {expected}, got {channels}"
        );
        assert!(
            count >= prototypes,
            "Gsp::init_prototypes_kcenter: need at least K = {prototypes} feature vectors, got {count}"
        );
        let features = features.detach();
        let normalized = lipschitz_normalize(features.clone(), 1);
        let distance_to = |row: usize| {
            let center = normalized.clone().slice([row..row + 1, 0..channels]);
            (normalized.clone() - center)
                .square()
                .sum_dim(1)
                .squeeze_dim::<1>(1)
        };
        let mut chosen = vec![0usize];
        let mut nearest = distance_to(0);
        while chosen.len() < prototypes {
            let next = nearest.clone().argmax(0).into_scalar::<i64>() as usize;
            chosen.push(next);
            nearest = nearest.min_pair(distance_to(next));
        }
        let device = features.device();
        let indices: Vec<i64> = chosen.iter().map(|&i| i as i64).collect();
        let indices = Tensor::<1, Int>::from_data(indices.as_slice(), &device);
        let centers = features.select(0, indices);
        let prototypes = self.prototypes.map(|old| {
            let centers = centers.to_device(&old.device());
            if old.is_require_grad() {
                centers.require_grad()
            } else {
                centers
            }
        });
        Self { prototypes, ..self }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Distribution, TensorData, Tolerance};

    fn small(device: &Device) -> Gsp {
        GspConfig::new(8).with_num_prototypes(4).init(device)
    }

    /// On an autodiff Flex device the gradient comes from the analytical backward node, not
    /// from the fallback's tracked Newton step.
    #[cfg(feature = "autodiff")]
    #[test]
    fn custom_backward_runs_on_autodiff_flex() {
        use crate::ops::BACKWARD_CALLS;
        use std::sync::atomic::Ordering;
        let device = Device::flex().autodiff();
        let gsp = small(&device);
        let x =
            Tensor::<3>::random([2, 5, 8], Distribution::Normal(0.0, 1.0), &device).require_grad();
        let before = BACKWARD_CALLS::TRANSPORT.load(Ordering::SeqCst);
        let grads = gsp.forward_tokens(x.clone()).sum().backward();
        assert!(BACKWARD_CALLS::TRANSPORT.load(Ordering::SeqCst) > before);
        assert!(crate::ops::extension_covers(&device));
        let grad = x.grad(&grads).unwrap();
        assert!(grad.is_finite().all().into_scalar::<bool>());
        assert!(gsp.prototypes.val().grad(&grads).is_some());
    }

    #[test]
    fn weights_and_attributes_are_distributions() {
        let device = Device::flex();
        let gsp = small(&device);
        let x = Tensor::<4>::random([3, 8, 4, 4], Distribution::Normal(0.0, 2.0), &device);
        let out = gsp.forward_detailed(x);
        let iterations = out.iterations.into_scalar::<i64>();
        assert!(iterations > 0 && iterations < 20, "{iterations}");
        assert!(out.converged.into_scalar::<bool>());
        assert!(
            out.weights
                .clone()
                .greater_equal_elem(0.0)
                .all()
                .into_scalar::<bool>()
        );
        out.weights.sum_dim(1).into_data().assert_approx_eq::<f32>(
            &TensorData::from([[1.0f32], [1.0], [1.0]]),
            Tolerance::default(),
        );
        out.attributes
            .sum_dim(1)
            .into_data()
            .assert_approx_eq::<f32>(
                &TensorData::from([[1.0f32], [1.0], [1.0]]),
                Tolerance::default(),
            );
    }

    /// The reference's pitfall 5: the prototypes must stay the same parameter.
    #[test]
    fn kcenter_picks_far_apart_rows_and_keeps_the_parameter() {
        let device = Device::flex();
        let gsp = GspConfig::new(2).with_num_prototypes(3).init(&device);
        let id = gsp.prototypes.id;
        let features = Tensor::<2>::from_floats(
            [
                [0.0, 0.0],
                [0.01, 0.0],
                [0.5, 0.0],
                [0.0, 0.5],
                [0.49, 0.01],
            ],
            &device,
        );
        let gsp = gsp.init_prototypes_kcenter(features);
        assert_eq!(gsp.prototypes.id, id);
        gsp.prototypes.val().into_data().assert_approx_eq::<f32>(
            &TensorData::from([[0.0f32, 0.0], [0.5, 0.0], [0.0, 0.5]]),
            Tolerance::default(),
        );
    }

    #[test]
    #[should_panic(expected = "Gsp: `transport_ratio` must be in (0, 1], got 1.5")]
    fn transport_ratio_above_one_panics() {
        GspConfig::new(4)
            .with_transport_ratio(1.5)
            .init(&Device::flex());
    }

    #[test]
    #[should_panic(expected = "Gsp: `epsilon` must be a finite number > 0, got 0")]
    fn zero_epsilon_panics() {
        GspConfig::new(4).with_epsilon(0.0).init(&Device::flex());
    }

    #[test]
    #[should_panic(
        expected = "Gsp: channel mismatch: expected C = 8 (the prototypes' width), got 6"
    )]
    fn channel_mismatch_panics() {
        let device = Device::flex();
        small(&device).forward_tokens(Tensor::<3>::ones([1, 3, 6], &device));
    }

    /// 2⁴⁰ prototypes would abort the process in the allocator: a named panic instead.
    #[test]
    #[should_panic(
        expected = "Gsp: `num_prototypes` × `channels` must be at most 2^31 elements (the size of one parameter tensor), got 1099511627776 × 8"
    )]
    fn too_many_prototypes_panic_before_allocating() {
        GspConfig::new(8)
            .with_num_prototypes(1 << 40)
            .init(&Device::flex());
    }

    /// `settings` is a public field: values set after `init` that break the solve panic in
    /// forward, naming the setting (a host check, no device read).
    #[test]
    fn invalid_settings_set_after_init_panic_in_forward() {
        let device = Device::flex();
        type Change = fn(&mut TransportSettings);
        let cases: [(Change, &str); 4] = [
            (
                |s| s.transport_ratio = 0.0,
                "Gsp: `transport_ratio` must be in (0, 1], got 0",
            ),
            (
                |s| s.epsilon = -0.2,
                "Gsp: `epsilon` must be a finite number > 0, got -0.2",
            ),
            (
                |s| s.max_iterations = 0,
                "Gsp: `max_iterations` must be at least 1, got 0",
            ),
            (
                |s| s.epsilon = 1e-40,
                "Gsp: `epsilon` must be at least 1e-30",
            ),
        ];
        for (change, expected) in cases {
            let mut gsp = small(&device);
            change(&mut gsp.settings);
            let x = Tensor::<3>::ones([1, 3, 8], &device);
            let forward = std::panic::AssertUnwindSafe(move || gsp.forward_tokens(x));
            let panic = std::panic::catch_unwind(forward).unwrap_err();
            let message = panic.downcast_ref::<String>().cloned().unwrap_or_default();
            assert!(message.starts_with(expected), "{message}");
        }
    }

    /// `converged` says whether the tolerance was met, whatever `max_iterations` is (no
    /// wrapping cast above i64::MAX), and is false for a NaN input, whose solve returns at
    /// once even with a huge budget; a tolerance no float resolves returns too. On every CPU
    /// backend, guarded against hangs.
    #[test]
    fn converged_says_whether_the_tolerance_was_met() {
        use crate::test_support::{cpu_devices, within_seconds};
        for (name, device) in cpu_devices() {
            for solver in [TransportSolver::Newton, TransportSolver::Sinkhorn] {
                let run = move |device: Device, settings: fn(&mut TransportSettings), nan: bool| {
                    within_seconds(20, "Gsp::forward_detailed", move || {
                        let mut gsp = small(&device);
                        gsp.settings.solver = solver;
                        settings(&mut gsp.settings);
                        device.seed(4);
                        let x =
                            Tensor::<3>::random([2, 6, 8], Distribution::Normal(0.0, 1.0), &device);
                        let x = if nan {
                            let poison = Tensor::<3>::from_floats([[[f32::NAN; 8]]], &device);
                            x.slice_assign([0..1, 2..3, 0..8], poison)
                        } else {
                            x
                        };
                        let out = gsp.forward_detailed(x);
                        (
                            out.converged.into_scalar::<bool>(),
                            out.iterations.into_scalar::<i64>(),
                            out.weights.into_data().try_to_vec::<f32>().unwrap(),
                        )
                    })
                };
                let (converged, _, _) =
                    run(device.clone(), |s| s.max_iterations = usize::MAX, false);
                assert!(converged, "{name} {solver:?}: max_iterations = usize::MAX");
                let (converged, _, _) = run(device.clone(), |s| s.max_iterations = 1 << 63, false);
                assert!(converged, "{name} {solver:?}: max_iterations = 2^63");
                let (converged, iterations, weights) =
                    run(device.clone(), |s| s.max_iterations = usize::MAX, true);
                assert!(
                    iterations < 100,
                    "{name} {solver:?}: NaN input, {iterations}"
                );
                // A NaN that reaches the weights is never reported as converged; the other
                // sample keeps its weights.
                let poisoned = weights[..6].iter().any(|w| w.is_nan());
                assert!(!(poisoned && converged), "{name} {solver:?}: NaN input");
                assert!(
                    weights[6..].iter().all(|w| w.is_finite()),
                    "{name} {solver:?}"
                );
                let (_, iterations, _) = run(
                    device.clone(),
                    |s| {
                        s.max_iterations = usize::MAX;
                        s.tolerance = 1e-300;
                    },
                    false,
                );
                assert!(iterations < 1000, "{name} {solver:?}: {iterations}");
            }
        }
    }

    #[test]
    fn display_and_config_json() {
        let device = Device::flex();
        let gsp = small(&device);
        assert_eq!(gsp.num_params(), 32);
        let shown = format!("{gsp}");
        assert!(
            shown.contains("num_prototypes: 4") && shown.contains("Newton"),
            "{shown}"
        );
        let config = GspConfig::new(8).with_solver(TransportSolver::Sinkhorn);
        let loaded = GspConfig::load_binary(config.to_string().as_bytes()).unwrap();
        assert_eq!(loaded.solver, TransportSolver::Sinkhorn);
        assert_eq!(loaded.num_prototypes, 64);
    }
}
