//! Generalized sum pooling (GSP): pooling weights from entropy-smoothed partial optimal
//! transport of the (optionally projected) features onto learnable prototypes, and the
//! authors' read-outs of those weights (docs/maths.md §2–§4, §10).

use burn::config::{Config, config_to_json};
use burn::module::{Module, Param};
use burn::nn::Initializer;
use burn::serde::{Deserialize, Serialize};
use burn::tensor::{Bool, Device, Int, Tensor};

use crate::checks;
use crate::display::one_line_display;
use crate::layout::Layout;
use crate::maths::costs::lipschitz_normalize;
use crate::maths::settings::{TransportSettings, TransportSolver};
use crate::ops::routing::{transport_costs, transport_marginals};
use crate::pooling::MIN_POWER;
use crate::pooling::input::{PoolingInput, Positions};
use crate::pooling::reductions::floored_power;

/// The clamp of the generalized-mean read-out, `max(m_j x_jc, 1e-6)`: the authors' value (and
/// [`GemConfig`](crate::pooling::GemConfig)'s default).
pub const GSP_READOUT_EPS: f64 = 1e-6;

/// What [`Gsp`]'s transport weights pool (docs/maths.md §10). With w_j the weights (summing
/// to 1 over the N_valid valid positions), m_j = N_valid · w_j the authors' mixing weights
/// (m ≡ 1 at μ = 1) and A the projection (the identity without one):
///
/// ```text
/// Mean             y = Σ_j w_j F_j = A·(Σ_j w_j x_j)                  F = X·A
/// GeneralizedMean  y = A·g,  g_c = ( (1/N_valid) Σ_j max(m_j x_jc, 1e-6)^p )^(1/p)
/// Max              y = A·(max_j m_j x_jc)_c
/// ```
///
/// Serialises as `"Mean"`, `"GeneralizedMean"` or `"Max"`.
#[derive(Config, Copy, Debug, PartialEq, Eq)]
pub enum GspReadout {
    /// The weighted mean of the (projected) features: the paper's GSP and the authors'
    /// TensorFlow default. The default.
    Mean,
    /// The generalized mean of the re-weighted raw features m_j x_j, with one learnable power
    /// p (the authors' `use_gemp`, their ResNet-50 configuration), then projected. The clamp
    /// at 1e-6 assumes non-negative maps (after a ReLU).
    GeneralizedMean,
    /// The channel maximum of the re-weighted raw features m_j x_j, then projected (the
    /// authors' PyTorch default, `pooling_method = 'gmp'`).
    Max,
}

/// Configuration of [`Gsp`]. Defaults are the reference's for CUB/Cars196 (Gürbüz et al.,
/// ICCV 2023): K = 64, μ = 0.3, γ = 5 (ε = 0.2), 100 iterations, no projection, the mean
/// read-out. The authors' full layer adds a projection (`with_projection(Some(d))`, D = 128 or
/// 512), and the GeM read-out or the max branch.
///
/// Saved and loaded as JSON like any Burn [`Config`]; the fields added with the read-outs
/// (`projection`, `readout`, `readout_p`, `max_branch`) may be missing from a stored config,
/// which then loads with their defaults.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(crate = "burn::serde")]
pub struct GspConfig {
    /// Feature channels C of the input (the prototypes' width without a projection).
    pub channels: usize,
    /// Number of prototypes K. Default: 64 (the reference uses 128 for SOP and In-Shop).
    pub num_prototypes: usize,
    /// Transport ratio μ in [[`MIN_TRANSPORT_RATIO`](crate::transport::MIN_TRANSPORT_RATIO), 1]:
    /// the fraction of the feature mass moved onto the prototypes, i.e. roughly the fraction
    /// of positions kept. μ = 1 is GAP. Default: 0.3.
    pub transport_ratio: f64,
    /// Entropy weight ε ≥ [`MIN_EPSILON`](crate::transport::MIN_EPSILON) (the reference's
    /// `entropy_regularizer_weight` γ is 1/ε). Small ε selects positions hard, large ε tends
    /// to GAP. Default: 0.2 (γ = 5).
    pub epsilon: f64,
    /// Upper bound on solver iterations (at most
    /// [`MAX_SOLVER_ITERATIONS`](crate::transport::MAX_SOLVER_ITERATIONS) run whatever it
    /// says). Default: 100.
    pub max_iterations: usize,
    /// The solver stops once each sample's transported mass is within this of μ.
    /// Default: 1e-6.
    pub tolerance: f64,
    /// The β solver. Default: Newton.
    pub solver: TransportSolver,
    /// Prototype initializer, before [`Gsp::init_prototypes_kcenter`]. Default: Glorot
    /// (Xavier) uniform, as the reference.
    pub initializer: Initializer,
    /// Leading tokens (class token, register tokens) that the token paths skip. Default: 0.
    pub num_prefix_tokens: usize,
    /// Width D of the authors' `feature_transform`, a 1×1 convolution C → D without bias
    /// (a `[C, D]` matrix A, Glorot uniform): the costs, the `[K, D]` prototypes and the
    /// output live in that space. `None`: no projection (A = I, output C). Default: `None`.
    #[serde(default)]
    pub projection: Option<usize>,
    /// What the weights pool: [`GspReadout`]. Default: [`GspReadout::Mean`].
    #[serde(default)]
    pub readout: GspReadout,
    /// Initial learnable power p of the [`GspReadout::GeneralizedMean`] read-out (checked,
    /// ≥ [`MIN_POWER`], whatever the read-out). Default: 3 (the authors').
    #[serde(default = "default_readout_p")]
    pub readout_p: f64,
    /// Adds the projected channel maximum of the raw features, y ← y + A·(max_j x_jc)_c (the
    /// authors' `augment_max_pool`). Default: false.
    #[serde(default)]
    pub max_branch: bool,
}

fn default_readout_p() -> f64 {
    3.0
}

impl Config for GspConfig {}

impl core::fmt::Display for GspConfig {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(&config_to_json(self))
    }
}

// Not derived: Burn's `Config` derive copies the variants' attributes into its serde twin,
// where `#[default]` is unknown.
#[allow(clippy::derivable_impls)]
impl Default for GspReadout {
    fn default() -> Self {
        Self::Mean
    }
}

/// `with_<field>` setters of [`GspConfig`], as Burn's `Config` derive writes them.
macro_rules! setters {
    ($($(#[$doc:meta])* $name:ident => $field:ident: $ty:ty),+ $(,)?) => {
        impl GspConfig {
            $(
                $(#[$doc])*
                pub fn $name(mut self, $field: $ty) -> Self {
                    self.$field = $field;
                    self
                }
            )+
        }
    };
}

setters! {
    /// Sets [`num_prototypes`](GspConfig::num_prototypes).
    with_num_prototypes => num_prototypes: usize,
    /// Sets [`transport_ratio`](GspConfig::transport_ratio).
    with_transport_ratio => transport_ratio: f64,
    /// Sets [`epsilon`](GspConfig::epsilon).
    with_epsilon => epsilon: f64,
    /// Sets [`max_iterations`](GspConfig::max_iterations).
    with_max_iterations => max_iterations: usize,
    /// Sets [`tolerance`](GspConfig::tolerance).
    with_tolerance => tolerance: f64,
    /// Sets [`solver`](GspConfig::solver).
    with_solver => solver: TransportSolver,
    /// Sets [`initializer`](GspConfig::initializer).
    with_initializer => initializer: Initializer,
    /// Sets [`num_prefix_tokens`](GspConfig::num_prefix_tokens).
    with_num_prefix_tokens => num_prefix_tokens: usize,
    /// Sets [`projection`](GspConfig::projection).
    with_projection => projection: Option<usize>,
    /// Sets [`readout`](GspConfig::readout).
    with_readout => readout: GspReadout,
    /// Sets [`readout_p`](GspConfig::readout_p).
    with_readout_p => readout_p: f64,
    /// Sets [`max_branch`](GspConfig::max_branch).
    with_max_branch => max_branch: bool,
}

impl GspConfig {
    /// The config for inputs of `channels` channels, every other field at its default.
    pub fn new(channels: usize) -> Self {
        Self {
            channels,
            num_prototypes: 64,
            transport_ratio: 0.3,
            epsilon: 0.2,
            max_iterations: 100,
            tolerance: 1e-6,
            solver: TransportSolver::Newton,
            initializer: Initializer::XavierUniform { gain: 1.0 },
            num_prefix_tokens: 0,
            projection: None,
            readout: GspReadout::Mean,
            readout_p: default_readout_p(),
            max_branch: false,
        }
    }

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

    /// The width of the layer's output: D with a projection, C without.
    pub fn output_channels(&self) -> usize {
        self.projection.unwrap_or(self.channels)
    }

    /// Creates the [`Gsp`] layer with its `[K, D]` prototypes (`[K, C]` without a projection),
    /// its `[C, D]` projection and its `[1]` read-out power (with the GeM read-out) on
    /// `device`. The prototypes are drawn first, so a seed gives the same prototypes with
    /// or without the new options.
    ///
    /// # Panics
    ///
    /// If `channels`, `num_prototypes` or the `projection` width is 0, a parameter (`[K, D]`,
    /// `[C, D]`) would have more than 2³¹ elements (checked before allocating), μ is outside
    /// [[`MIN_TRANSPORT_RATIO`](crate::transport::MIN_TRANSPORT_RATIO), 1], ε is below
    /// [`MIN_EPSILON`](crate::transport::MIN_EPSILON), `max_iterations` or `tolerance` is
    /// not positive, or `readout_p` is not a finite number ≥ [`MIN_POWER`].
    pub fn init(&self, device: &Device) -> Gsp {
        checks::at_least_one("Gsp", "channels", self.channels);
        checks::at_least_one("Gsp", "num_prototypes", self.num_prototypes);
        let width = match self.projection {
            Some(width) => {
                checks::at_least_one("Gsp", "projection", width);
                checks::parameter_size(
                    "Gsp",
                    &[("channels", self.channels), ("projection", width)],
                );
                checks::parameter_size(
                    "Gsp",
                    &[
                        ("num_prototypes", self.num_prototypes),
                        ("projection", width),
                    ],
                );
                width
            }
            None => {
                checks::parameter_size(
                    "Gsp",
                    &[
                        ("num_prototypes", self.num_prototypes),
                        ("channels", self.channels),
                    ],
                );
                self.channels
            }
        };
        self.settings().validate("Gsp");
        checks::at_least(
            "Gsp",
            "readout_p",
            self.readout_p,
            MIN_POWER,
            "what f32 resolves",
        );
        let prototypes = self.initializer.init_with(
            [self.num_prototypes, width],
            Some(width),
            Some(self.num_prototypes),
            device,
        );
        // The authors' `feature_transform`: Keras' Glorot uniform of a 1×1 convolution, fan in
        // C, fan out D.
        let projection = self.projection.map(|width| {
            Initializer::XavierUniform { gain: 1.0 }.init_with(
                [self.channels, width],
                Some(self.channels),
                Some(width),
                device,
            )
        });
        let readout_p = (self.readout == GspReadout::GeneralizedMean)
            .then(|| Param::from_tensor(Tensor::full([1], self.readout_p, device)));
        Gsp {
            prototypes,
            settings: self.settings(),
            num_prefix_tokens: self.num_prefix_tokens,
            projection,
            readout: self.readout,
            readout_p,
            max_branch: self.max_branch,
        }
    }
}

/// Everything [`Gsp`] computes for a batch.
#[derive(Debug, Clone)]
pub struct GspOutput {
    /// `[B, D]` (`[B, C]` without a projection): the read-out (docs/maths.md §10), y = Σ_n w_n x_n
    /// for the default mean read-out without projection.
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
/// Learning", ICCV 2023), with the authors' projection and read-outs.
///
/// The features x_n (or, with a projection, F_n = x_n·A for a learnable `[C, D]` matrix A, the
/// authors' 1×1 `feature_transform`) are the transport's positions. Each holds mass
/// 1/N. A fraction μ of it is moved onto K learnable prototypes ω by entropy-smoothed optimal
/// transport at cost c_kn = ‖φ(ω_k) − φ(F_n)‖ (φ(v) = v / max(1, ‖v‖)), and each position is
/// pooled with the mass it sent:
///
/// ```text
/// t_n = (1/N) σ(β + ℓ_n),   ℓ_n = logsumexp_k(−c_kn / ε),   Σ_n t_n = μ
/// w_n = t_n / μ,            m_n = N · w_n
/// ```
///
/// and the read-out ([`GspReadout`]; A = I without a projection):
///
/// ```text
/// Mean (default)   y = Σ_n w_n F_n = A·(Σ_n w_n x_n)
/// GeneralizedMean  y = A·g,   g_c = ( (1/N) Σ_n max(m_n x_nc, 1e-6)^p )^(1/p),  p learnable
/// Max              y = A·(max_n m_n x_nc)_c
/// max_branch       y ← y + A·(max_n x_nc)_c
/// ```
///
/// Positions far from every prototype (background, nuisance) keep their mass and get almost no
/// weight. μ = 1, ε → ∞, or identical features give m ≡ 1: the mean read-out is then GAP of F,
/// the GeM read-out GeM(x)·A and the max read-out GMP(x)·A; ε → 0 keeps the μN positions
/// nearest the prototypes; μ → 0 is attention pooling with temperature ε. With a mask, N is the
/// valid count and padded positions have m_n = 0 and take no part in the maximum or in the
/// generalized mean's count.
///
/// Gradients of the solve are analytical (implicit differentiation at the fixed point), so
/// backward memory does not grow with the iterations. The read-outs reuse the crate's
/// generalized-mean kernels and the maximum on the re-weighted features m_n x_n (one
/// elementwise product).
///
/// The weights are summed from the plan (t_n = Σ_k P_kn), so they sum to 1 up to rounding even
/// at tiny μ; φ is computed without overflow for any finite input; padded positions are read
/// as 0 (their content reaches no output and no gradient), and a NaN at a valid position makes
/// its sample's output NaN, never another sample's.
///
/// Initialise the prototypes from data with [`init_prototypes_kcenter`](Self::init_prototypes_kcenter)
/// after a warm-up (over [`project`](Self::project)ed GAP features when projected), and train
/// them with [`ZeroShotLoss`](crate::loss::ZeroShotLoss) on the attributes next to the metric
/// loss.
///
/// # Shapes
///
/// - input: maps `[B, C, H, W]`, tokens `[B, N, C]`, or a [`PoolingInput`] with a `[B, N]` mask
/// - parameters: prototypes `[K, D]`, projection `[C, D]`, read-out power `[1]` (D = C
///   without a projection)
/// - output: `[B, D]` ([`output_width`](Self::output_width))
#[derive(Module, Debug)]
#[module(custom_display)]
pub struct Gsp {
    /// The prototypes ω, `[K, D]` (`[K, C]` without a projection).
    pub prototypes: Param<Tensor<2>>,
    /// μ, ε and the solver's settings.
    #[module(skip)]
    pub settings: TransportSettings,
    /// Leading tokens skipped by the token paths.
    pub num_prefix_tokens: usize,
    /// The projection A, `[C, D]` (F = X·A), or `None` (A = I).
    pub projection: Option<Param<Tensor<2>>>,
    /// What the weights pool.
    #[module(skip)]
    pub readout: GspReadout,
    /// The power p `[1]` of the [`GspReadout::GeneralizedMean`] read-out (`None` with the
    /// other read-outs). Pooled with max(p, [`MIN_POWER`]), straight through, as
    /// [`Gem`](crate::pooling::Gem).
    pub readout_p: Option<Param<Tensor<1>>>,
    /// Whether the projected channel maximum of the raw features is added to the read-out.
    pub max_branch: bool,
}

one_line_display!(Gsp, |gsp|
    "channels" => gsp.input_width(),
    "num_prototypes" => gsp.prototypes.shape().dims::<2>()[0],
    "transport_ratio" => gsp.settings.transport_ratio,
    "epsilon" => gsp.settings.epsilon,
    "solver" => format!("{:?}", gsp.settings.solver),
    "num_prefix_tokens" => gsp.num_prefix_tokens,
    "projection" => format!("{:?}", gsp.projection.as_ref().map(|_| gsp.output_width())),
    "readout" => format!("{:?}", gsp.readout),
    "max_branch" => gsp.max_branch,
);

impl Gsp {
    fn dims(&self) -> [usize; 2] {
        self.prototypes.shape().dims()
    }

    /// The input channels C: the projection's rows, or the prototypes' width.
    fn input_width(&self) -> usize {
        match &self.projection {
            Some(projection) => projection.shape().dims::<2>()[0],
            None => self.dims()[1],
        }
    }

    /// The width of the output and of the space the transport runs in: D with a projection
    /// (the prototypes' width), C without.
    pub fn output_width(&self) -> usize {
        self.dims()[1]
    }

    /// The power p `[1]` of the generalized-mean read-out, `None` with the other read-outs.
    pub fn readout_power(&self) -> Option<Tensor<1>> {
        self.readout_p.as_ref().map(|p| p.val())
    }

    /// Projects pooled features: y·A `[B, D]` for y `[B, C]`, y itself without a projection.
    /// What the warm-up's GAP features go through before
    /// [`init_prototypes_kcenter`](Self::init_prototypes_kcenter) (the authors keep GAP of F =
    /// GAP(x)·A in their memory).
    ///
    /// # Shapes
    ///
    /// - pooled: `[B, C]`
    /// - output: `[B, D]` ([`output_width`](Self::output_width))
    ///
    /// # Panics
    ///
    /// If the width of `pooled` is not C.
    pub fn project(&self, pooled: Tensor<2>) -> Tensor<2> {
        let [_, channels] = pooled.dims();
        let expected = self.input_width();
        assert!(
            channels == expected,
            "Gsp::project: channel mismatch: expected C = {expected}, got {channels}"
        );
        match &self.projection {
            Some(projection) => pooled.matmul(projection.val()),
            None => pooled,
        }
    }

    /// F = X·A `[B, N, D]` (channels last, whatever the input's layout) as one `[B·N, C]·[C, D]`
    /// product: for maps `[B, C, N]`, a batched `Aᵀ·X` would need the `[B, D, C]` gradient of A
    /// (268 MB at `[64, 2048, 7, 7]` → 512) summed over the batch; the transpose copy of X is
    /// far cheaper.
    fn project_positions(&self, positions: &Positions) -> Option<Positions> {
        let projection = self.projection.as_ref()?.val();
        let (batch, count, channels) = positions.dims();
        let [_, width] = projection.dims();
        let features = if positions.layout.is_channels_last() {
            positions.features.clone()
        } else {
            positions.features.clone().swap_dims(1, 2)
        };
        let features = features
            .reshape([batch * count, channels])
            .matmul(projection)
            .reshape([batch, count, width]);
        Some(Positions {
            features,
            layout: Layout::ChannelsLast,
            mask: None,
        })
    }

    fn pool(&self, positions: Positions) -> GspOutput {
        let (batch, count, channels) = positions.dims();
        let [prototypes, width] = self.dims();
        let expected = self.input_width();
        assert!(
            channels == expected,
            "Gsp: channel mismatch: expected C = {expected} ({}), got {channels}",
            if self.projection.is_some() {
                "the projection's rows"
            } else {
                "the prototypes' width"
            }
        );
        // What may have changed since `init` (public fields): host values, no device read.
        assert!(
            prototypes > 0,
            "Gsp: the prototypes [K, C] are empty: expected K > 0, got K = 0"
        );
        if let Some(projection) = &self.projection {
            let [_, projected] = projection.shape().dims();
            assert!(
                projected == width,
                "Gsp: projection width mismatch: the projection [C, D] has D = {projected}, the prototypes [K, D] have D = {width}"
            );
        }
        let power = match self.readout {
            GspReadout::GeneralizedMean => Some(self.readout_power().unwrap_or_else(|| {
                panic!("Gsp: the GeneralizedMean read-out needs `readout_p`, got None (set readout before `init`)")
            })),
            _ => None,
        };
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
                pooled: self.project(positions.empty()),
                iterations: Tensor::zeros([1], &device),
                converged: Tensor::from_data([true], &device),
            };
        }
        let mu = self.settings.transport_ratio;
        // Padding read as 0: its costs, plan entries and gradients stay finite.
        let positions = positions.finite_padding();
        let mass = positions.mean_weights();
        let projected = self.project_positions(&positions);
        let (features, layout) = match &projected {
            Some(projected) => (projected.features.clone(), projected.layout),
            None => (positions.features.clone(), positions.layout),
        };
        let costs = transport_costs(features, self.prototypes.val(), layout);
        let (marginals, (iterations, converged)) = transport_marginals(costs, mass, &self.settings);
        let [_, total] = marginals.dims();
        // w = t / μ with t_j = Σ_k P_kj summed from the plan, not the reference's a − ρ, which
        // cancels at small μ (docs/maths.md §4).
        let weights = marginals.clone().slice([0..batch, 0..count]).div_scalar(mu);
        let attributes = marginals.slice([0..batch, count..total]).div_scalar(mu);
        let pooled = self.read_out(positions, projected, weights.clone(), power);
        GspOutput {
            pooled,
            weights,
            attributes,
            iterations,
            converged,
        }
    }

    /// The read-out (docs/maths.md §10) of finite-padded positions with weights `[B, N]`:
    /// `[B, D]`. `projected` is F = X·A when there is a projection.
    fn read_out(
        &self,
        positions: Positions,
        projected: Option<Positions>,
        weights: Tensor<2>,
        power: Option<Tensor<1>>,
    ) -> Tensor<2> {
        let (_, count, channels) = positions.dims();
        let width = self.output_width();
        // The raw features' max branch, pooled in C space and projected with the read-out.
        let branch = self.max_branch.then(|| positions.clone().max());
        let in_channels = match self.readout {
            GspReadout::Mean => match projected {
                // Σ w F costs N·D per sample, A·(Σ w x) N·C + C·D: the cheaper one.
                Some(projected) if count * width <= count * channels + channels * width => {
                    let pooled = projected.weighted_sum(weights);
                    return match branch {
                        Some(branch) => pooled + self.project(branch),
                        None => pooled,
                    };
                }
                _ => positions.weighted_sum(weights),
            },
            GspReadout::GeneralizedMean | GspReadout::Max => {
                // m_j = N_valid · w_j, folded into the features with one product; padding has
                // w = 0 and is selected away by the reductions anyway.
                let valid = match &positions.mask {
                    Some(mask) => mask.clone().float().sum_dim(1),
                    None => Tensor::full([weights.dims()[0], 1], count as f64, &weights.device()),
                };
                let mixing = (weights * valid).unsqueeze_dim::<3>(positions.layout.channel_axis());
                let scaled = Positions {
                    features: positions.features * mixing,
                    layout: positions.layout,
                    mask: positions.mask,
                };
                match power {
                    Some(p) => {
                        let floored = floored_power(p);
                        scaled.generalized_mean(
                            |channels| floored.expand([channels]),
                            GSP_READOUT_EPS,
                        )
                    }
                    None => scaled.max(),
                }
            }
        };
        let in_channels = match branch {
            Some(branch) => in_channels + branch,
            None => in_channels,
        };
        self.project(in_channels)
    }

    /// Pools feature maps `[B, C, H, W]`, a token set `[B, N, C]` (skipping the first
    /// `num_prefix_tokens` tokens) or any [`PoolingInput`] (masked, with its own prefix) into
    /// `[B, D]` (`[B, C]` without a projection) with the configured read-out. Each valid
    /// position holds mass 1/N_valid. An empty batch (B = 0) gives an empty `[0, D]`.
    ///
    /// # Panics
    ///
    /// If no position is left to pool (N, H or W is 0, or N ≤ the prefix), C = 0, the mask's
    /// shape does not match, a mask row has no valid position, C differs from the layer's
    /// (the projection's rows, or the prototypes' width), the projection's and the
    /// prototypes' widths differ, the GeM read-out has no `readout_p`, the input (or its mask)
    /// is on another device than the prototypes, or [`settings`](Self::settings) (a public
    /// field) was set to an invalid value (checked as in [`GspConfig::init`], on the host: no
    /// device read).
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
    /// - output: pooled `[B, D]` (`[B, C]` without a projection), weights `[B, N]` (N = H·W
    ///   for maps, the tokens after the prefix for token sets), attributes `[B, K]`,
    ///   iterations and converged `[1]`
    pub fn forward_detailed(&self, input: impl Into<PoolingInput>) -> GspOutput {
        self.pool(input.into().resolve("Gsp", self.num_prefix_tokens))
    }

    /// Sets the prototypes to K of the given feature vectors chosen by greedy k-center
    /// (farthest-point) selection in the cost's metric, as the reference does over ~1024 GAP
    /// embeddings collected during a warm-up. With a projection these are projected GAP
    /// features, GAP(x)·A ([`project`](Self::project)), in the D-wide space of the
    /// prototypes. Starts from the first row. The parameter keeps its identity (an optimizer
    /// built before still trains it).
    ///
    /// # Shapes
    ///
    /// - features: `[M, D]` (`[M, C]` without a projection), M ≥ K
    ///
    /// # Panics
    ///
    /// If the width differs from the prototypes' or M < K.
    pub fn init_prototypes_kcenter(self, features: Tensor<2>) -> Self {
        let [count, channels] = features.dims();
        let [prototypes, expected] = self.dims();
        assert!(
            channels == expected,
            "Gsp::init_prototypes_kcenter: channel mismatch: expected {} = {expected} (the prototypes' width), got {channels}",
            if self.projection.is_some() { "D" } else { "C" }
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

    /// The projection's shapes: `[C, D]` A, `[K, D]` prototypes, `[B, D]` output on maps and
    /// tokens, `project` and `output_width`, the read-out power only with the GeM read-out.
    #[test]
    fn a_projected_layer_pools_into_d() {
        let device = Device::flex();
        for readout in [
            GspReadout::Mean,
            GspReadout::GeneralizedMean,
            GspReadout::Max,
        ] {
            let gsp = GspConfig::new(8)
                .with_num_prototypes(4)
                .with_projection(Some(5))
                .with_readout(readout)
                .with_max_branch(true)
                .init(&device);
            assert_eq!(gsp.prototypes.dims(), [4, 5]);
            assert_eq!(gsp.projection.as_ref().unwrap().dims(), [8, 5]);
            assert_eq!(gsp.output_width(), 5);
            assert_eq!(
                gsp.readout_power().map(|p| p.into_scalar::<f32>()),
                (readout == GspReadout::GeneralizedMean).then_some(3.0)
            );
            let maps = Tensor::<4>::random([2, 8, 3, 3], Distribution::Uniform(0.0, 1.0), &device);
            assert_eq!(gsp.forward(maps).dims(), [2, 5]);
            let tokens = Tensor::<3>::random([2, 7, 8], Distribution::Uniform(0.0, 1.0), &device);
            let out = gsp.forward_detailed(tokens);
            assert_eq!(out.pooled.dims(), [2, 5]);
            assert_eq!(out.weights.dims(), [2, 7]);
            assert!(out.converged.into_scalar::<bool>());
            assert_eq!(gsp.project(Tensor::zeros([3, 8], &device)).dims(), [3, 5]);
            let empty = gsp.forward(Tensor::<3>::zeros([0, 7, 8], &device));
            assert_eq!(empty.dims(), [0, 5]);
            // k-center in the projected space: [M, D] features.
            let features = Tensor::<2>::random([6, 5], Distribution::Normal(0.0, 1.0), &device);
            let gsp = gsp.init_prototypes_kcenter(features);
            assert_eq!(gsp.prototypes.dims(), [4, 5]);
        }
        let plain = small(&device);
        let y = Tensor::<2>::ones([2, 8], &device);
        assert_eq!(plain.output_width(), 8);
        assert!(plain.readout_power().is_none());
        plain
            .project(y.clone())
            .into_data()
            .assert_eq(&y.into_data(), true);
    }

    #[test]
    #[should_panic(expected = "Gsp: `projection` must be at least 1, got 0")]
    fn zero_projection_width_panics() {
        GspConfig::new(4)
            .with_projection(Some(0))
            .init(&Device::flex());
    }

    #[test]
    #[should_panic(expected = "Gsp: `readout_p` must be a finite number > 0, got -1")]
    fn negative_readout_power_panics() {
        GspConfig::new(4)
            .with_readout(GspReadout::GeneralizedMean)
            .with_readout_p(-1.0)
            .init(&Device::flex());
    }

    #[test]
    #[should_panic(expected = "Gsp::project: channel mismatch: expected C = 8, got 5")]
    fn project_checks_the_width() {
        let device = Device::flex();
        let gsp = GspConfig::new(8)
            .with_num_prototypes(2)
            .with_projection(Some(5))
            .init(&device);
        gsp.project(Tensor::zeros([1, 5], &device));
    }

    #[test]
    #[should_panic(expected = "Gsp: the GeneralizedMean read-out needs `readout_p`, got None")]
    fn gem_readout_set_after_init_needs_its_power() {
        let device = Device::flex();
        let mut gsp = small(&device);
        gsp.readout = GspReadout::GeneralizedMean;
        gsp.forward_tokens(Tensor::<3>::ones([1, 3, 8], &device));
    }

    /// The new fields round-trip through JSON, and a config stored before they existed loads
    /// with their defaults.
    #[test]
    fn readout_config_json_and_old_json() {
        let config = GspConfig::new(8)
            .with_projection(Some(3))
            .with_readout(GspReadout::GeneralizedMean)
            .with_readout_p(4.5)
            .with_max_branch(true);
        let json = config.to_string();
        assert!(json.contains("\"GeneralizedMean\""), "{json}");
        let loaded = GspConfig::load_binary(json.as_bytes()).unwrap();
        assert_eq!(loaded.to_string(), json);
        assert_eq!(
            (
                loaded.projection,
                loaded.readout,
                loaded.readout_p,
                loaded.max_branch
            ),
            (Some(3), GspReadout::GeneralizedMean, 4.5, true)
        );
        assert_eq!(loaded.output_channels(), 3);
        let old = r#"{"channels": 8, "num_prototypes": 16, "transport_ratio": 0.3,
            "epsilon": 0.2, "max_iterations": 100, "tolerance": 1e-6, "solver": "Newton",
            "initializer": {"XavierUniform": {"gain": 1.0}}, "num_prefix_tokens": 1}"#;
        let loaded = GspConfig::load_binary(old.as_bytes()).unwrap();
        assert_eq!(
            (
                loaded.num_prototypes,
                loaded.projection,
                loaded.readout,
                loaded.readout_p,
                loaded.max_branch
            ),
            (16, None, GspReadout::Mean, 3.0, false)
        );
        assert_eq!(loaded.output_channels(), 8);
    }
}
