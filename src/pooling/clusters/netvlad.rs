//! NetVLAD: soft-assignment of the positions to K learnable centroids and the sum of their
//! residuals per centroid, intra- and globally L2-normalised (docs/maths.md §12).
//!
//! Arandjelović, Gronat, Torii, Pajdla, Sivic, "NetVLAD: CNN architecture for weakly
//! supervised place recognition", CVPR 2016 (the authors' MATLAB `Relja/netvlad`, and the
//! PyTorch port `Nanne/pytorch-NetVlad`).

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::Initializer;
use burn::tensor::activation::softmax;
use burn::tensor::{DType, Device, Tensor};

use crate::checks;
use crate::display::one_line_display;
use crate::layout::Layout;
use crate::ops::routing::l2_normalize;
use crate::pooling::input::{PoolingInput, Positions};

use super::kmeans::{kmeans, squared_distances};

/// The clamp of every L2 normalisation of [`NetVlad`]: `v / max(‖v‖, 1e-12)` (PyTorch's
/// `F.normalize` default, the PyTorch port's).
pub const NETVLAD_EPS: f64 = crate::maths::l2_normalize::L2_EPS;

/// Which NetVLAD [`NetVlad`] computes. Default: [`V1`](Self::V1).
///
/// V1 is the default because every experiment of the paper and of the authors' code ran it
/// (`vlad` rather than `vladv2` in `Relja/netvlad`) and it is the PyTorch port's default
/// (`vladv2=False`); its normalised inputs also make it insensitive to the scale of the
/// features.
#[derive(Config, Copy, Debug, PartialEq, Eq)]
pub enum NetVladVersion {
    /// The authors' experiments: each position is L2-normalised first (x̂ = x / max(‖x‖, eps)),
    /// and the assignment has no bias: `a_k = softmax_k(w_kᵀ x̂)`, initialised (and, when tied,
    /// kept) at `w_k = α ĉ_k` (ĉ_k = c_k / ‖c_k‖), `b_k = 0` fixed.
    V1,
    /// The paper's formulation: the raw positions, `a_k = softmax_k(w_kᵀ x + b_k)` initialised
    /// (and, when tied, kept) at `w_k = 2α c_k`, `b_k = −α‖c_k‖²`, i.e.
    /// `a_k = softmax_k(−α‖x − c_k‖²)`.
    V2,
}

/// Configuration of [`NetVlad`]. Defaults are the paper's: K = 64 clusters, V1, α = 100 (the
/// PyTorch port's default before [`NetVlad::init_from_descriptors`] sets α from data), the
/// assignment decoupled from the centroids.
#[derive(Config, Debug)]
pub struct NetVladConfig {
    /// Feature channels C of the input.
    pub channels: usize,
    /// Number of clusters K. Default: 64.
    #[config(default = 64)]
    pub num_clusters: usize,
    /// V1 (the authors' experiments) or V2 (the paper's formulation). Default: V1.
    #[config(default = "NetVladVersion::V1")]
    pub version: NetVladVersion,
    /// The assignment's sharpness α (> 0): how the assignment is initialised from the
    /// centroids, and, when not `decoupled`, how it is computed from them at every forward.
    /// [`NetVlad::init_from_descriptors`] replaces it by the data's. Default: 100.
    #[config(default = 100.0)]
    pub alpha: f64,
    /// Whether the assignment `w` (and V2's bias `b`) are parameters of their own, initialised
    /// from the centroids and α and then trained apart from them, as in the paper and both
    /// reference codes. `false` ties them to the centroids at every forward (`w = 2α c`,
    /// `b = −α‖c‖²` for V2, `w = α ĉ` for V1), with α fixed. Default: true.
    #[config(default = true)]
    pub decoupled: bool,
    /// The centroids' initializer, before [`NetVlad::init_from_descriptors`]. Default: uniform
    /// on [0, 1) (the PyTorch port's `torch.rand`).
    #[config(default = "Initializer::Uniform { min: 0.0, max: 1.0 }")]
    pub initializer: Initializer,
    /// Leading tokens (class token, register tokens) that the token paths skip. Default: 0.
    #[config(default = 0)]
    pub num_prefix_tokens: usize,
}

impl NetVladConfig {
    /// The width of the layer's output: K·C.
    pub fn output_channels(&self) -> usize {
        self.num_clusters * self.channels
    }

    /// Creates the [`NetVlad`] layer on `device`: centroids `[K, C]` from the initializer and,
    /// when decoupled, the assignment `[K, C]` (and V2's bias `[K]`) computed from them and α.
    ///
    /// # Panics
    ///
    /// If `channels` or `num_clusters` is 0, `[K, C]` would have more than 2³¹ elements
    /// (checked before allocating), or `alpha` is not a finite number > 0.
    pub fn init(&self, device: &Device) -> NetVlad {
        checks::at_least_one("NetVlad", "channels", self.channels);
        checks::at_least_one("NetVlad", "num_clusters", self.num_clusters);
        checks::parameter_size(
            "NetVlad",
            &[
                ("num_clusters", self.num_clusters),
                ("channels", self.channels),
            ],
        );
        checks::positive("NetVlad", "alpha", self.alpha);
        let centroids = self.initializer.init_with(
            [self.num_clusters, self.channels],
            Some(self.channels),
            Some(self.num_clusters),
            device,
        );
        let (assignment, bias) = if self.decoupled {
            let (weights, bias) =
                tied_assignment(centroids.val().detach(), self.alpha, self.version);
            (
                Some(Param::from_tensor(weights.detach())),
                bias.map(|bias| Param::from_tensor(bias.detach())),
            )
        } else {
            (None, None)
        };
        NetVlad {
            centroids,
            assignment,
            bias,
            alpha: self.alpha,
            version: self.version,
            num_prefix_tokens: self.num_prefix_tokens,
        }
    }
}

/// NetVLAD pooling (Arandjelović et al., CVPR 2016) over the valid positions x_j:
///
/// ```text
/// x_j ← x_j / max(‖x_j‖, eps)                              (V1 only)
/// a_kj = softmax_k(w_kᵀ x_j + b_k)                          (masked positions: a_kj = 0)
/// V_k  = Σ_j a_kj (x_j − c_k) = Σ_j a_kj x_j − (Σ_j a_kj) c_k
/// V_k ← V_k / max(‖V_k‖, eps)                               (intra-normalisation)
/// y    = v / max(‖v‖, eps),   v = (V_1, …, V_K) flattened  (eps = 1e-12)
/// ```
///
/// `V_k` is computed as two reductions, one batched matmul `A·X` (`[K, N]·[N, C]`) and the
/// masses `Σ_j a_kj` times the centroids: never the `[K, N, C]` residuals.
///
/// **Parameters.** The centroids c `[K, C]` are always learnable. Decoupled (the default, as
/// in the paper and both reference codes) the assignment w `[K, C]` is a parameter of its own,
/// and so is V2's bias b `[K]` (V1 has b = 0 fixed: no bias parameter); they start at
/// `w = 2α c, b = −α‖c‖²` (V2) or `w = α ĉ` (V1) and then train apart from c. Tied
/// (`assignment = None`) they are recomputed from c and the fixed α at every forward, so
/// V2 is exactly `a_k = softmax_k(−α‖x − c_k‖²)`. α is a host value, never trained.
///
/// **Output order.** Cluster-major: output index `k·C + c` holds channel c of cluster k (the
/// PyTorch port's `vlad.view(B, -1)` of `[B, K, C]`). The authors' MATLAB code stores `[C, K]`
/// column-major, i.e. index `c·K + k`: reshape this output to `[B, K, C]`, swap the last two
/// axes and flatten to get theirs.
///
/// **Shared machinery.** V2's assignment is GSP's softmax over prototypes with a
/// squared-distance cost `α‖x − c_k‖²` (ε = 1/α) instead of GSP's φ-normalised distance. The
/// crate's costs op (`ops::routing::transport_costs`, `maths::costs`) only has GSP's cost and
/// feeds the partial-transport solve, not a plain softmax, so sharing it would take a new
/// squared-distance cost op (its composite, autodiff node and Flex/Cube kernels) and a softmax
/// read-out of it; the assignment uses Burn tensor ops instead (portable: every backend, with
/// autodiff), which cost one `[B, K, N]` logits tensor. The three L2 normalisations are the
/// crate's `l2_normalize` op (a Flex kernel with a closed-form backward; docs/maths.md §12).
///
/// **Robustness.** Padding is read as 0 and gets a_kj = 0, so its content reaches no output
/// and no gradient. V2 divides each sample by s = max(1, max_j |x_j|) (detached) before the
/// reductions, which the intra-normalisation cancels, and clamps its logits to the finite
/// range, so features up to the float's limit give finite outputs; every L2 normalisation
/// divides its vector by max(1, its largest |entry|) first, for the same reason. A NaN at a valid
/// position makes its own sample's output NaN, never another sample's.
///
/// Initialise from data with [`init_from_descriptors`](Self::init_from_descriptors) (k-means of
/// sampled descriptors, then α from their distances).
///
/// # Shapes
///
/// - input: maps `[B, C, H, W]`, tokens `[B, N, C]`, or a [`PoolingInput`] with a `[B, N]` mask
/// - parameters: centroids `[K, C]`, assignment `[K, C]` (decoupled), bias `[K]` (decoupled V2)
/// - logits and assignment: `[B, K, N]`; V: `[B, K, C]`
/// - output: `[B, K·C]`, cluster-major
#[derive(Module, Debug)]
#[module(custom_display)]
pub struct NetVlad {
    /// The centroids c, `[K, C]`.
    pub centroids: Param<Tensor<2>>,
    /// The assignment weights w, `[K, C]`; `None`: tied to the centroids (`2α c` for V2,
    /// `α ĉ` for V1).
    pub assignment: Option<Param<Tensor<2>>>,
    /// The assignment bias b, `[K]`; `None`: 0 (V1), or tied to the centroids (`−α‖c‖²`,
    /// V2 without `assignment`).
    pub bias: Option<Param<Tensor<1>>>,
    /// The sharpness α (> 0) the assignment was initialised with, or is tied to.
    pub alpha: f64,
    /// V1 or V2.
    #[module(skip)]
    pub version: NetVladVersion,
    /// Leading tokens skipped by the token paths.
    pub num_prefix_tokens: usize,
}

one_line_display!(NetVlad, |vlad|
    "num_clusters" => vlad.dims()[0],
    "channels" => vlad.dims()[1],
    "version" => format!("{:?}", vlad.version),
    "alpha" => vlad.alpha,
    "decoupled" => vlad.assignment.is_some(),
    "num_prefix_tokens" => vlad.num_prefix_tokens,
);

/// The dtype's largest finite value: where V2's logits are clamped.
fn largest(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => f64::MAX,
        DType::F16 => 65504.0,
        DType::BF16 => 3.3895e38,
        _ => f32::MAX as f64,
    }
}

/// The assignment tied to centroids `[K, C]` and α: `(w, b)` = `(2α c, −α‖c‖²)` for V2,
/// `(α ĉ, None)` for V1.
fn tied_assignment(
    centroids: Tensor<2>,
    alpha: f64,
    version: NetVladVersion,
) -> (Tensor<2>, Option<Tensor<1>>) {
    match version {
        NetVladVersion::V1 => (l2_normalize(centroids, 1).mul_scalar(alpha), None),
        NetVladVersion::V2 => {
            let bias = centroids.clone().square().sum_dim(1).mul_scalar(-alpha);
            (centroids.mul_scalar(2.0 * alpha), Some(bias.squeeze_dim(1)))
        }
    }
}

impl NetVlad {
    /// `[K, C]`.
    fn dims(&self) -> [usize; 2] {
        self.centroids.shape().dims()
    }

    /// The assignment `(w [K, C], b [K])` this forward uses (tracked: gradients reach the
    /// parameters they come from); `b = None` is 0.
    pub fn assignment_weights(&self) -> (Tensor<2>, Option<Tensor<1>>) {
        match &self.assignment {
            Some(weights) => (weights.val(), self.bias.as_ref().map(|b| b.val())),
            None => {
                let (weights, tied) =
                    tied_assignment(self.centroids.val(), self.alpha, self.version);
                let bias = match &self.bias {
                    Some(bias) => Some(bias.val()),
                    None => tied,
                };
                (weights, bias)
            }
        }
    }

    /// Pools feature maps `[B, C, H, W]`, a token set `[B, N, C]` (skipping the first
    /// `num_prefix_tokens` tokens) or any [`PoolingInput`] (masked, with its own prefix) into
    /// `[B, K·C]` (cluster-major). An empty batch (B = 0) gives an empty `[0, K·C]`.
    ///
    /// # Panics
    ///
    /// If no position is left to pool (N, H or W is 0, or N ≤ the prefix), C = 0, the mask's
    /// shape does not match, a mask row has no valid position, the input's C differs from the
    /// centroids' width, the centroids are empty (K = 0), the assignment is not `[K, C]` or the
    /// bias not `[K]`, `alpha` is not a finite number > 0, or the input (or its mask) is on
    /// another device than the parameters.
    pub fn forward(&self, input: impl Into<PoolingInput>) -> Tensor<2> {
        let positions = input.into().resolve("NetVlad", self.num_prefix_tokens);
        self.pool(positions)
    }

    /// [`forward`](Self::forward) for a token set `[B, N, C]`, spelled out.
    pub fn forward_tokens(&self, tokens: Tensor<3>) -> Tensor<2> {
        self.forward(tokens)
    }

    /// Initialises the layer from sampled descriptors, as the authors do (k-means of ~50 000
    /// descriptors, 100 per training image, 100 iterations): sets the centroids to their
    /// k-means centres, α from their distances, and (decoupled) the assignment and bias to
    /// the tied values of those centroids and α. The parameters keep their identity (an
    /// optimizer built before still trains them). Everything runs detached, on the
    /// descriptors' device.
    ///
    /// - **Data.** V2 clusters the descriptors as given; V1 L2-normalises them first (the
    ///   layer's own input normalisation), and keeps the centres as plain means of unit
    ///   vectors (not renormalised; its assignment uses ĉ).
    /// - **Seeding.** Deterministic greedy farthest-point: the first descriptor, then each
    ///   next centre the descriptor farthest (squared Euclidean) from the centres so far (ties
    ///   to the lowest index). No random state: the same descriptors give the same layer.
    /// - **Lloyd.** At most `iterations` rounds of assign-to-nearest / mean, stopped early
    ///   when no assignment changes (one host read per round); a cluster left empty keeps its
    ///   centre.
    /// - **α from distances** (so that the top-1/top-2 assignment ratio is 100 on average, in
    ///   the log domain: mean ln(a₁/a₂) = ln 100), with d₁ ≤ d₂ each descriptor's two nearest
    ///   centres: V2 `α = −ln 0.01 / mean(d₂² − d₁²)`, V1
    ///   `α = −ln 0.01 / mean(top1 − top2 of ĉ_kᵀ x̂)`. The popular PyTorch port
    ///   (Nanne/pytorch-NetVlad) computes V2's α from the squared neighbour *indices*
    ///   returned by its k-NN search instead of the squared distances (and over each
    ///   centroid's two nearest descriptors, with `b = −α‖c‖`, unsquared); this initialiser
    ///   uses each descriptor's squared distances and `b = −α‖c‖²`, as the paper defines
    ///   them. With K = 1 there is no second centre and α is left as it is.
    ///
    /// # Shapes
    ///
    /// - descriptors: `[M, C]`, M ≥ K
    ///
    /// # Panics
    ///
    /// If the width differs from the centroids', M < K, or the descriptors give no positive
    /// mean gap between the two nearest centres (all duplicates: α would be infinite).
    pub fn init_from_descriptors(self, descriptors: Tensor<2>, iterations: usize) -> Self {
        let [count, channels] = descriptors.dims();
        let [clusters, width] = self.dims();
        assert!(
            channels == width,
            "NetVlad::init_from_descriptors: channel mismatch: expected C = {width} (the centroids' width), got {channels}"
        );
        assert!(
            count >= clusters,
            "NetVlad::init_from_descriptors: need at least K = {clusters} descriptors, got {count}"
        );
        let descriptors = descriptors.detach();
        let data = match self.version {
            NetVladVersion::V1 => l2_normalize(descriptors, 1),
            NetVladVersion::V2 => descriptors,
        };
        let centres = kmeans(data.clone(), clusters, iterations, false);
        let alpha = if clusters < 2 {
            self.alpha
        } else {
            let scores = match self.version {
                // −d² (larger is nearer): the gap of the two largest is d₂² − d₁².
                NetVladVersion::V2 => squared_distances(data, centres.clone()).neg(),
                NetVladVersion::V1 => data.matmul(l2_normalize(centres.clone(), 1).transpose()),
            };
            let top = scores.topk(2, 1);
            let [_, two] = top.dims();
            debug_assert_eq!(two, 2);
            let gap = (top.clone().slice([0..count, 0..1]) - top.slice([0..count, 1..2]))
                .mean()
                .into_scalar::<f64>();
            let alpha = -(0.01f64).ln() / gap;
            assert!(
                alpha.is_finite() && alpha > 0.0,
                "NetVlad::init_from_descriptors: the descriptors do not separate the centroids: expected a positive mean gap between each descriptor's two nearest centroids, got {gap:e} (α would be {alpha:e})"
            );
            alpha
        };
        let replace = |param: Param<Tensor<2>>, new: Tensor<2>| {
            param.map(|old| {
                let new = new.detach().to_device(&old.device());
                if old.is_require_grad() {
                    new.require_grad()
                } else {
                    new
                }
            })
        };
        let (weights, bias) = tied_assignment(centres.clone(), alpha, self.version);
        let assignment = self.assignment.map(|param| replace(param, weights));
        let bias = match (self.bias, bias) {
            (Some(param), Some(new)) => Some(param.map(|old| {
                let new = new.detach().to_device(&old.device());
                if old.is_require_grad() {
                    new.require_grad()
                } else {
                    new
                }
            })),
            (old, _) => old,
        };
        Self {
            centroids: replace(self.centroids, centres),
            assignment,
            bias,
            alpha,
            ..self
        }
    }

    /// Checks what may have changed since `init` (public fields): host values only.
    fn check(&self, channels: usize) {
        let [clusters, width] = self.dims();
        assert!(
            clusters > 0,
            "NetVlad: the centroids [K, C] are empty: expected K > 0, got K = 0"
        );
        assert!(
            channels == width,
            "NetVlad: channel mismatch: expected C = {width} (the centroids' width), got {channels}"
        );
        if let Some(weights) = &self.assignment {
            let dims: [usize; 2] = weights.shape().dims();
            assert!(
                dims == [clusters, width],
                "NetVlad: assignment shape mismatch: expected [K, C] = [{clusters}, {width}], got {dims:?}"
            );
        }
        if let Some(bias) = &self.bias {
            let dims: [usize; 1] = bias.shape().dims();
            assert!(
                dims == [clusters],
                "NetVlad: bias shape mismatch: expected [K] = [{clusters}], got {dims:?}"
            );
        }
        checks::positive("NetVlad", "alpha", self.alpha);
    }

    fn pool(&self, positions: Positions) -> Tensor<2> {
        let (batch, count, channels) = positions.dims();
        self.check(channels);
        let [clusters, _] = self.dims();
        checks::same_device(
            "NetVlad",
            [
                ("the input", &positions.features.device()),
                ("the parameters", &self.centroids.device()),
            ],
        );
        if positions.is_empty() {
            // An empty `[0, K·C]` that a backward still reaches.
            return positions.empty().repeat_dim(1, clusters);
        }
        let positions = positions.finite_padding();
        let Positions {
            features,
            layout,
            mask,
        } = positions;
        let dtype = features.dtype();
        let (features, scale) = match self.version {
            NetVladVersion::V1 => (l2_normalize(features, layout.channel_axis()), None),
            NetVladVersion::V2 => {
                // s = max(1, max_j |x_j|) per sample: V / s is intra-normalised to the same
                // blocks, and cannot overflow.
                let scale = features
                    .clone()
                    .abs()
                    .flatten::<2>(1, 2)
                    .max_dim(1)
                    .clamp_min(1.0)
                    .detach()
                    .unsqueeze_dim::<3>(2);
                (features / scale.clone(), Some(scale))
            }
        };
        let (weights, bias) = self.assignment_weights();
        // Logits [B, K, N] of the scaled features, then rescaled: w·x = s (w·x / s).
        let logits = match layout {
            Layout::ChannelsLast => features
                .clone()
                .matmul(weights.transpose().unsqueeze_dim::<3>(0))
                .swap_dims(1, 2),
            Layout::ChannelsFirst => weights.unsqueeze_dim::<3>(0).matmul(features.clone()),
        };
        let logits = match &scale {
            Some(scale) => logits * scale.clone(),
            None => logits,
        };
        let logits = match bias {
            Some(bias) => logits + bias.reshape([1, clusters, 1]),
            None => logits,
        };
        let logits = match &scale {
            // Overflowed logits (features near the float's limit) become the largest finite
            // ones: the softmax stays defined (a hard assignment).
            Some(_) => {
                let top = largest(dtype);
                logits.clamp(-top, top)
            }
            None => logits,
        };
        let assignment = softmax(logits, 1);
        let assignment = match mask {
            Some(mask) => assignment.mask_fill(
                mask.bool_not()
                    .unsqueeze_dim::<3>(1)
                    .expand([batch, clusters, count]),
                0.0,
            ),
            None => assignment,
        };
        // The two reductions: Σ_j a_kj x_j [B, K, C] (a batched matmul) and the masses
        // Σ_j a_kj [B, K, 1] times the centroids.
        let mass = assignment.clone().sum_dim(2);
        let tokens = match layout {
            Layout::ChannelsLast => features,
            Layout::ChannelsFirst => features.swap_dims(1, 2),
        };
        let weighted = assignment.matmul(tokens);
        let centroids = self.centroids.val().unsqueeze_dim::<3>(0);
        let shifted = match scale {
            Some(scale) => mass * centroids / scale,
            None => mass * centroids,
        };
        // Both normalisations scale first, so that ‖V_k‖² cannot overflow (up to N², f16).
        let residuals = l2_normalize(weighted - shifted, 2);
        let flat = residuals.reshape([batch, clusters * channels]);
        l2_normalize(flat, 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Distribution, TensorData, Tolerance};

    #[test]
    fn output_is_k_times_c_and_unit_norm() {
        let device = Device::flex();
        for version in [NetVladVersion::V1, NetVladVersion::V2] {
            let layer = NetVladConfig::new(8)
                .with_num_clusters(5)
                .with_version(version)
                .init(&device);
            let maps = Tensor::<4>::random([3, 8, 2, 3], Distribution::Normal(0.0, 1.0), &device);
            let y = layer.forward(maps);
            assert_eq!(y.dims(), [3, 40]);
            y.square().sum_dim(1).into_data().assert_approx_eq::<f32>(
                &TensorData::from([[1.0f32], [1.0], [1.0]]),
                Tolerance::default(),
            );
        }
    }

    #[test]
    #[should_panic(
        expected = "NetVlad: channel mismatch: expected C = 8 (the centroids' width), got 6"
    )]
    fn channel_mismatch_panics() {
        let device = Device::flex();
        let layer = NetVladConfig::new(8).with_num_clusters(2).init(&device);
        layer.forward_tokens(Tensor::<3>::ones([1, 4, 6], &device));
    }

    #[test]
    #[should_panic(expected = "NetVlad: `num_clusters` must be at least 1, got 0")]
    fn zero_clusters_panics() {
        NetVladConfig::new(8)
            .with_num_clusters(0)
            .init(&Device::flex());
    }

    #[test]
    #[should_panic(
        expected = "NetVlad::init_from_descriptors: need at least K = 4 descriptors, got 3"
    )]
    fn too_few_descriptors_panic() {
        let device = Device::flex();
        NetVladConfig::new(2)
            .with_num_clusters(4)
            .init(&device)
            .init_from_descriptors(Tensor::<2>::ones([3, 2], &device), 10);
    }

    #[test]
    #[should_panic(
        expected = "NetVlad::init_from_descriptors: the descriptors do not separate the centroids"
    )]
    fn duplicate_descriptors_panic() {
        let device = Device::flex();
        NetVladConfig::new(2)
            .with_num_clusters(2)
            .with_version(NetVladVersion::V2)
            .init(&device)
            .init_from_descriptors(Tensor::<2>::ones([5, 2], &device), 10);
    }

    /// Parameter counts of each variant, the parameters' identity across the initialiser,
    /// the display, and the JSON round trip.
    #[test]
    fn parameters_display_and_json() {
        let device = Device::flex();
        let config = NetVladConfig::new(3).with_num_clusters(2);
        assert_eq!(config.init(&device).num_params(), 12);
        let v2 = config.clone().with_version(NetVladVersion::V2);
        let layer = v2.init(&device);
        assert_eq!(layer.num_params(), 14);
        assert_eq!(
            v2.clone().with_decoupled(false).init(&device).num_params(),
            6
        );
        let ids = (
            layer.centroids.id,
            layer.assignment.as_ref().unwrap().id,
            layer.bias.as_ref().unwrap().id,
        );
        let descriptors = Tensor::<2>::from_floats(
            [
                [0.0, 0.0, 0.0],
                [0.1, 0.0, 0.0],
                [5.0, 5.0, 0.0],
                [5.0, 5.1, 0.0],
            ],
            &device,
        );
        let layer = layer.init_from_descriptors(descriptors, 10);
        assert_eq!(
            ids,
            (
                layer.centroids.id,
                layer.assignment.as_ref().unwrap().id,
                layer.bias.as_ref().unwrap().id,
            )
        );
        assert!(
            format!("{layer}").starts_with("NetVlad {num_clusters: 2, channels: 3, version: V2"),
            "{layer}"
        );
        let json = v2.to_string();
        let loaded = NetVladConfig::load_binary(json.as_bytes()).unwrap();
        assert_eq!(loaded.version, NetVladVersion::V2);
        assert_eq!(loaded.to_string(), json);
    }
}
