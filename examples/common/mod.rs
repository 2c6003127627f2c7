//! Shared by the `metric_learning`, `gsp_heatmap` and `fashion_mnist` examples: a generated
//! image set of objects on cluttered backgrounds, a small CNN with a pluggable global pooling
//! head, a custom training loop over any labelled image set (proxy metric loss, plus
//! `ZeroShotLoss` for GSP) and zero-shot evaluation.
//!
//! The loop is written out rather than run by burn-train's `Learner` because GSP's recipe
//! changes the model mid-training (it pools as GAP for a warm-up, then its prototypes are set
//! by k-center), which reads most plainly as a loop.

#![allow(dead_code)]

pub mod retrieval;

use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, Initializer, Linear, LinearConfig, PaddingConfig2d};
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::activation::{log_softmax, relu};
use burn::tensor::{Device, Int, Tensor, TensorData};
use burn_pooling::loss::{ZeroShotLoss, ZeroShotLossConfig, ZeroShotSplit};
use burn_pooling::{
    GapConfig, GapGmp, GapGmpConfig, Gem, GemConfig, Gmp, GmpConfig, GroupGem, GroupGemConfig, Gsp,
    GspConfig, GspReadout, OtAggregation, OtAggregationConfig, Otk, OtkConfig,
};
use indicatif::{ProgressBar, ProgressStyle};
use retrieval::{RetrievalMetrics, evaluate_tensor};

// ---------------------------------------------------------------------------------------------
// Deterministic RNG (SplitMix64): the data does not depend on any backend's generator.

/// A small deterministic random number generator (SplitMix64).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    pub fn uniform(&mut self, low: f32, high: f32) -> f32 {
        low + (high - low) * self.unit()
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// `count` distinct values of `0..n`, in random order.
    pub fn choose(&mut self, n: usize, count: usize) -> Vec<usize> {
        let mut all: Vec<usize> = (0..n).collect();
        for i in 0..count {
            let j = i + self.below(n - i);
            all.swap(i, j);
        }
        all.truncate(count);
        all
    }
}

// ---------------------------------------------------------------------------------------------
// The data: objects made of 4 glyphs in a 2×2 grid, on a background of scattered glyphs.

/// Image side in pixels (grayscale).
pub const SIDE: usize = 32;
/// Glyph side in pixels.
const GLYPH: usize = 5;
/// Object side: two glyphs and a one-pixel gap.
const OBJECT: usize = 2 * GLYPH + 1;
/// Clutter glyphs per image.
const CLUTTER: std::ops::RangeInclusive<usize> = 7..=10;

/// The glyph vocabulary, 5×5 masks. Objects and clutter are drawn from the same vocabulary,
/// so no single position tells object from clutter: only the 2×2 arrangement does.
const GLYPHS: [[&str; GLYPH]; 8] = [
    [".....", ".....", "#####", ".....", "....."],
    ["..#..", "..#..", "..#..", "..#..", "..#.."],
    ["#....", ".#...", "..#..", "...#.", "....#"],
    ["....#", "...#.", "..#..", ".#...", "#...."],
    ["..#..", "..#..", "#####", "..#..", "..#.."],
    ["#...#", ".#.#.", "..#..", ".#.#.", "#...#"],
    ["#####", "#...#", "#...#", "#...#", "#####"],
    [".....", ".###.", ".###.", ".###.", "....."],
];

/// The classes: each is 4 glyph indices (top-left, top-right, bottom-left, bottom-right).
#[derive(Clone, Debug)]
pub struct ObjectSet {
    pub classes: Vec<[usize; 4]>,
}

impl ObjectSet {
    /// `count` distinct glyph arrangements drawn with `seed`.
    pub fn new(count: usize, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let all = GLYPHS.len().pow(4);
        let classes = rng
            .choose(all, count)
            .into_iter()
            .map(|code| {
                let g = GLYPHS.len();
                [
                    code % g,
                    (code / g) % g,
                    (code / g / g) % g,
                    (code / g / g / g) % g,
                ]
            })
            .collect();
        Self { classes }
    }

    pub fn len(&self) -> usize {
        self.classes.len()
    }
}

fn draw_glyph(image: &mut [f32], glyph: usize, top: usize, left: usize, intensity: f32) {
    for (r, row) in GLYPHS[glyph].iter().enumerate() {
        for (c, ch) in row.bytes().enumerate() {
            if ch == b'#' {
                let (y, x) = (top + r, left + c);
                if y < SIDE && x < SIDE {
                    let pixel = &mut image[y * SIDE + x];
                    *pixel = pixel.max(intensity);
                }
            }
        }
    }
}

/// One `SIDE×SIDE` image of `class`, and the object's top-left corner.
pub fn render(objects: &ObjectSet, class: usize, rng: &mut Rng) -> (Vec<f32>, (usize, usize)) {
    let mut image: Vec<f32> = (0..SIDE * SIDE).map(|_| rng.uniform(0.0, 0.2)).collect();
    let clutter = CLUTTER.start() + rng.below(CLUTTER.end() - CLUTTER.start() + 1);
    for _ in 0..clutter {
        let glyph = rng.below(GLYPHS.len());
        let (top, left) = (rng.below(SIDE - GLYPH + 1), rng.below(SIDE - GLYPH + 1));
        draw_glyph(&mut image, glyph, top, left, rng.uniform(0.6, 1.0));
    }
    // The object goes last, on a cleared patch (one pixel of margin), fully visible.
    let (top, left) = (rng.below(SIDE - OBJECT + 1), rng.below(SIDE - OBJECT + 1));
    for y in top.saturating_sub(1)..(top + OBJECT + 1).min(SIDE) {
        for x in left.saturating_sub(1)..(left + OBJECT + 1).min(SIDE) {
            image[y * SIDE + x] = rng.uniform(0.0, 0.2);
        }
    }
    for (i, &glyph) in objects.classes[class].iter().enumerate() {
        let (dy, dx) = ((i / 2) * (GLYPH + 1), (i % 2) * (GLYPH + 1));
        draw_glyph(
            &mut image,
            glyph,
            top + dy,
            left + dx,
            rng.uniform(0.6, 1.0),
        );
    }
    (image, (top, left))
}

/// A batch `[B, 1, SIDE, SIDE]` of the given classes.
pub fn images(objects: &ObjectSet, classes: &[usize], rng: &mut Rng, device: &Device) -> Tensor<4> {
    let mut values = Vec::with_capacity(classes.len() * SIDE * SIDE);
    for &class in classes {
        values.extend(render(objects, class, rng).0);
    }
    Tensor::from_data(
        TensorData::new(values, [classes.len(), 1, SIDE, SIDE]),
        device,
    )
}

/// The zero-shot split: the first half of the classes trains, the second half is held out.
pub struct Split {
    pub objects: ObjectSet,
    pub train_classes: usize,
    pub test_classes: usize,
}

impl Split {
    pub fn new(classes: usize, seed: u64) -> Self {
        Self {
            objects: ObjectSet::new(classes, seed),
            train_classes: classes / 2,
            test_classes: classes - classes / 2,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The model.

/// Which global pooling the head uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pooling {
    Gap,
    Gmp,
    /// GAP + GMP, summed.
    GapGmp,
    Gem,
    Ggem,
    /// GSP (trained with `ZeroShotLoss`) as its authors run it: the projection first, the
    /// transport in the projected space, then `readout`, plus the projected GMP when
    /// `max_branch`.
    Gsp {
        readout: GspReadout,
        max_branch: bool,
    },
    /// SALAD-style optimal-transport aggregation ([`OtAggregation`]) at this example's scale:
    /// [`SALAD_CLUSTERS`] clusters of [`SALAD_CLUSTER_DIM`] channels, no global token.
    Salad,
    /// The optimal-transport kernel embedding ([`Otk`]) with [`OTK_REFERENCES`] references.
    Otk,
}

impl Pooling {
    /// GSP with the paper's weighted mean and no max branch.
    pub const GSP: Pooling = Pooling::Gsp {
        readout: GspReadout::Mean,
        max_branch: false,
    };
    /// The heads `metric_learning` and `gsp_heatmap` compare.
    pub const ALL: [Pooling; 4] = [Pooling::Gap, Pooling::Gem, Pooling::Ggem, Pooling::GSP];
    /// Every head, in table order: the reductions, then GSP with each read-out and with the
    /// max branch.
    pub const EVERY: [Pooling; 9] = [
        Pooling::Gap,
        Pooling::Gmp,
        Pooling::GapGmp,
        Pooling::Gem,
        Pooling::Ggem,
        Pooling::GSP,
        Pooling::Gsp {
            readout: GspReadout::GeneralizedMean,
            max_branch: false,
        },
        Pooling::Gsp {
            readout: GspReadout::Max,
            max_branch: false,
        },
        Pooling::Gsp {
            readout: GspReadout::Mean,
            max_branch: true,
        },
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Gap => "GAP",
            Self::Gmp => "GMP",
            Self::GapGmp => "GAP+GMP",
            Self::Gem => "GeM",
            Self::Ggem => "GGeM",
            Self::Salad => "SALAD (OT aggregation)",
            Self::Otk => "OTK",
            Self::Gsp {
                readout,
                max_branch,
            } => match (readout, max_branch) {
                (GspReadout::Mean, false) => "GSP mean",
                (GspReadout::GeneralizedMean, false) => "GSP GeM",
                (GspReadout::Max, false) => "GSP max",
                (GspReadout::Mean, true) => "GSP mean + max branch",
                (GspReadout::GeneralizedMean, true) => "GSP GeM + max branch",
                (GspReadout::Max, true) => "GSP max + max branch",
            },
        }
    }

    /// The option's spelling of each head, for `--heads`.
    pub const NAMES: &'static str = "gap, gmp, gapgmp, gem, ggem, gsp, gsp-gem, gsp-max, gsp-mean-max (the max branch), salad, otk";

    pub fn parse(text: &str) -> Result<Self, String> {
        let gsp = |readout, max_branch| Self::Gsp {
            readout,
            max_branch,
        };
        match text.to_ascii_lowercase().as_str() {
            "gap" => Ok(Self::Gap),
            "gmp" => Ok(Self::Gmp),
            "gapgmp" | "gap+gmp" => Ok(Self::GapGmp),
            "gem" => Ok(Self::Gem),
            "ggem" => Ok(Self::Ggem),
            "salad" | "ot-aggregation" => Ok(Self::Salad),
            "otk" => Ok(Self::Otk),
            "gsp" | "gsp-mean" => Ok(Self::GSP),
            "gsp-gem" => Ok(gsp(GspReadout::GeneralizedMean, false)),
            "gsp-max" => Ok(gsp(GspReadout::Max, false)),
            "gsp-mean-max" => Ok(gsp(GspReadout::Mean, true)),
            "gsp-gem-max" => Ok(gsp(GspReadout::GeneralizedMean, true)),
            "gsp-max-max" => Ok(gsp(GspReadout::Max, true)),
            other => Err(format!("unknown head `{other}` ({})", Self::NAMES)),
        }
    }

    /// The config of this head's GSP layer from the shared GSP settings `base` (channels
    /// [`FEATURES`]): the head's read-out and max branch, projected to [`EMBEDDING`]. `None`
    /// for the other heads.
    pub fn gsp_config(self, base: &GspConfig) -> Option<GspConfig> {
        match self {
            Self::Gsp {
                readout,
                max_branch,
            } => Some(
                base.clone()
                    .with_projection(Some(EMBEDDING))
                    .with_readout(readout)
                    .with_max_branch(max_branch),
            ),
            _ => None,
        }
    }

    /// Whether this head is GSP (trained with its warm-up and `ZeroShotLoss`).
    pub fn is_gsp(self) -> bool {
        matches!(self, Self::Gsp { .. })
    }
}

/// Feature channels of the backbone's last map.
pub const FEATURES: usize = 64;
/// Embedding width.
pub const EMBEDDING: usize = 64;
/// Side of the backbone's last map on the generated images (`SIDE / 4`).
pub const MAP_SIDE: usize = SIDE / 4;
/// Channel groups of GGeM (8 channels each).
pub const GGEM_GROUPS: usize = 8;
/// SALAD's clusters m at this scale (the paper: 64 over 256+ tokens; here 49 positions, and
/// SALAD needs m < N).
pub const SALAD_CLUSTERS: usize = 16;
/// SALAD's channels l per cluster (the paper: 128 from 768 or 1536 channels; here 64).
pub const SALAD_CLUSTER_DIM: usize = 16;
/// SALAD's hidden width (the paper: 512 from 768+ channels; here 64 channels).
pub const SALAD_HIDDEN: usize = 128;
/// OTK's references p (the paper's default is also small: p of a few to 64).
pub const OTK_REFERENCES: usize = 4;

/// The SALAD head's config: [`SALAD_CLUSTERS`] × [`SALAD_CLUSTER_DIM`] out of [`FEATURES`]
/// channels, no global token, the reference's dropout, dustbin and ε.
pub fn salad_config() -> OtAggregationConfig {
    OtAggregationConfig::new(FEATURES)
        .with_num_clusters(SALAD_CLUSTERS)
        .with_cluster_dim(SALAD_CLUSTER_DIM)
        .with_hidden_dim(SALAD_HIDDEN)
        .with_token_dim(None)
        .with_num_prefix_tokens(0)
}

/// The OTK head's config: [`OTK_REFERENCES`] references over [`FEATURES`] channels, one head,
/// the paper's ε = 0.1, flattened.
pub fn otk_config() -> OtkConfig {
    OtkConfig::new(FEATURES).with_num_references(OTK_REFERENCES)
}

/// What the backbone is fed and how much it downsamples.
#[derive(Clone, Copy, Debug)]
pub struct BackboneConfig {
    /// Pixel mean and standard deviation of the data (pixels in [0, 1]): inputs are
    /// standardised with them.
    pub pixel_mean: f32,
    pub pixel_std: f32,
    /// The side of the last map is the image side divided by this: 4 (default), 2 or 8.
    pub downsample: usize,
}

impl BackboneConfig {
    /// The generated glyph images: pixel mean ≈ 0.16, 8×8 maps.
    pub const GLYPHS: Self = Self {
        pixel_mean: 0.16,
        pixel_std: 1.0 / 3.0,
        downsample: 4,
    };
}

/// A 4-layer CNN with batch norm: `[B, 1, S, S]` → `[B, 64, S/d, S/d]` (non-negative), d the
/// config's `downsample`.
#[derive(Module, Debug)]
pub struct Backbone {
    conv1: Conv2d,
    norm1: BatchNorm,
    conv2: Conv2d,
    norm2: BatchNorm,
    conv3: Conv2d,
    norm3: BatchNorm,
    conv4: Conv2d,
    norm4: BatchNorm,
    pixel_mean: f32,
    pixel_std: f32,
}

impl Backbone {
    pub fn new(config: &BackboneConfig, device: &Device) -> Self {
        assert!(
            matches!(config.downsample, 2 | 4 | 8),
            "Backbone: `downsample` must be 2, 4 or 8, got {}",
            config.downsample
        );
        let conv = |input: usize, output: usize, stride: usize| {
            Conv2dConfig::new([input, output], [3, 3])
                .with_stride([stride, stride])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .with_bias(false)
                .init(device)
        };
        let norm = |channels: usize| BatchNormConfig::new(channels).init(device);
        Self {
            // Downsampling by 8 strides the first convolution too (large, cluttered canvases).
            conv1: conv(
                1,
                16,
                config.downsample / 4 + usize::from(config.downsample < 4),
            ),
            norm1: norm(16),
            conv2: conv(16, 32, 2),
            norm2: norm(32),
            conv3: conv(32, FEATURES, config.downsample.min(4) / 2),
            norm3: norm(FEATURES),
            conv4: conv(FEATURES, FEATURES, 1),
            norm4: norm(FEATURES),
            pixel_mean: config.pixel_mean,
            pixel_std: config.pixel_std,
        }
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let x = (x - self.pixel_mean) / self.pixel_std;
        let x = relu(self.norm1.forward(self.conv1.forward(x)));
        let x = relu(self.norm2.forward(self.conv2.forward(x)));
        let x = relu(self.norm3.forward(self.conv3.forward(x)));
        relu(self.norm4.forward(self.conv4.forward(x)))
    }
}

/// Backbone, global pooling (GAP when no head layer is set), linear embedding. GSP heads have
/// no separate embedding: GSP's own projection is the embedding (the authors' layer).
#[derive(Module, Debug)]
pub struct Net {
    pub backbone: Backbone,
    pub embed: Option<Linear>,
    pub gmp: Option<Gmp>,
    pub gap_gmp: Option<GapGmp>,
    pub gem: Option<Gem>,
    pub ggem: Option<GroupGem>,
    pub gsp: Option<Gsp>,
    pub salad: Option<OtAggregation>,
    pub otk: Option<Otk>,
}

/// What a forward pass returns.
pub struct Embedded {
    /// `[B, EMBEDDING]`, not normalized.
    pub embeddings: Tensor<2>,
    /// What GSP's k-center memory keeps during the warm-up: the GAP-pooled features, projected
    /// by GSP's projection for GSP heads (then the same as `embeddings`).
    pub pooled: Tensor<2>,
    /// GSP's attributes `[B, K]` and weights `[B, H·W]`, when GSP pooled.
    pub gsp: Option<(Tensor<2>, Tensor<2>)>,
}

impl Net {
    /// The network for `pooling`; `gsp` sets GSP's hyper-parameters (its channels are
    /// [`FEATURES`]; the head's read-out, max branch and an [`EMBEDDING`]-wide projection are
    /// set here).
    pub fn new(
        pooling: Pooling,
        backbone: &BackboneConfig,
        gsp: &GspConfig,
        device: &Device,
    ) -> Self {
        // Backbone and embedding first: the same initialisation for every head of a seed.
        let backbone = Backbone::new(backbone, device);
        let embed = LinearConfig::new(FEATURES, EMBEDDING)
            .with_bias(false)
            .init(device);
        // The cluster aggregators output m·l or p·C channels: their embedding is wider (and
        // drawn after the shared one, so that the backbone's initialisation stays the same).
        let wide_embed = |width: usize| {
            LinearConfig::new(width, EMBEDDING)
                .with_bias(false)
                .init(device)
        };
        let (salad, otk) = (salad_config(), otk_config());
        let embed = match pooling {
            Pooling::Salad => wide_embed(salad.output_channels()),
            Pooling::Otk => wide_embed(otk.output_channels()),
            _ => embed,
        };
        let gsp = pooling.gsp_config(gsp).map(|config| {
            let mut layer = config.init(device);
            // GSP's projection starts as the other heads' embedding ([C, D] both).
            layer.projection = Some(Param::from_tensor(embed.weight.val()));
            layer
        });
        Self {
            backbone,
            embed: gsp.is_none().then_some(embed),
            gmp: (pooling == Pooling::Gmp).then(|| GmpConfig::new().init()),
            gap_gmp: (pooling == Pooling::GapGmp).then(|| GapGmpConfig::new().init()),
            gem: (pooling == Pooling::Gem).then(|| GemConfig::new().init(device)),
            ggem: (pooling == Pooling::Ggem).then(|| GroupGemConfig::new(GGEM_GROUPS).init(device)),
            gsp,
            salad: (pooling == Pooling::Salad).then(|| salad.init(device)),
            otk: (pooling == Pooling::Otk).then(|| otk.init(device)),
        }
    }

    /// Embeds a batch; `as_gap` pools with the mean even when a head layer is set (GSP's
    /// warm-up: then GSP's projection embeds the mean).
    pub fn forward(&self, images: Tensor<4>, as_gap: bool) -> Embedded {
        let maps = self.backbone.forward(images);
        let gap = || GapConfig::new().init().forward(maps.clone());
        let (pooled, gsp) = if let Some(gsp) = &self.gsp {
            if as_gap {
                (gsp.project(gap()), None)
            } else {
                let out = gsp.forward_detailed(maps.clone());
                (out.pooled, Some((out.attributes, out.weights)))
            }
        } else if as_gap {
            (gap(), None)
        } else if let Some(gmp) = &self.gmp {
            (gmp.forward(maps.clone()), None)
        } else if let Some(gap_gmp) = &self.gap_gmp {
            (gap_gmp.forward(maps.clone()), None)
        } else if let Some(gem) = &self.gem {
            (gem.forward(maps.clone()), None)
        } else if let Some(ggem) = &self.ggem {
            (ggem.forward(maps.clone()), None)
        } else if let Some(salad) = &self.salad {
            (salad.forward(maps.clone()), None)
        } else if let Some(otk) = &self.otk {
            (otk.forward(maps.clone()), None)
        } else {
            (gap(), None)
        };
        let embeddings = match &self.embed {
            Some(embed) => embed.forward(pooled.clone()),
            None => pooled.clone(),
        };
        Embedded {
            embeddings,
            pooled,
            gsp,
        }
    }
}

/// Each row scaled to unit length (cosine similarity as a dot product).
pub fn l2_normalize(x: Tensor<2>) -> Tensor<2> {
    let norm = x.clone().square().sum_dim(1).sqrt().clamp_min(1e-12);
    x / norm
}

/// Everything the optimizer trains: the net, the loss's class proxies, GSP's ZSR embeddings.
#[derive(Module, Debug)]
pub struct Trainee {
    pub net: Net,
    pub proxies: Param<Tensor<2>>,
    pub zsr: Option<ZeroShotLoss>,
}

// ---------------------------------------------------------------------------------------------
// Training.

/// A labelled image set the training loop draws class-blocked batches from.
pub trait ClassImages {
    /// The number of (training) classes, labelled `0..classes()`.
    fn classes(&self) -> usize;
    /// One image of each label of `labels` (in order), `[B, 1, S, S]` in [0, 1].
    fn batch(&self, labels: &[usize], rng: &mut Rng, device: &Device) -> Tensor<4>;
}

/// The training classes of a generated [`Split`]: each call renders fresh images.
impl ClassImages for Split {
    fn classes(&self) -> usize {
        self.train_classes
    }

    fn batch(&self, labels: &[usize], rng: &mut Rng, device: &Device) -> Tensor<4> {
        images(&self.objects, labels, rng, device)
    }
}

/// The training protocol (identical for every head).
#[derive(Clone, Debug)]
pub struct Protocol {
    pub steps: usize,
    /// Classes per batch (even: the two halves of the batch are class-disjoint for ZSR).
    pub classes_per_batch: usize,
    pub samples_per_class: usize,
    pub learning_rate: f64,
    /// Normalized-softmax scale.
    pub scale: f64,
    /// GSP only: steps it pools as GAP first.
    pub gsp_warmup: usize,
    /// GSP only: set the prototypes by greedy k-center over the last ~1024 GAP-pooled features
    /// when the warm-up ends (else they keep their initialisation).
    pub gsp_kcenter: bool,
    /// Weight of ZSR in the GSP loss: (1 − w)·metric + w·ZSR.
    pub zsr_weight: f64,
    /// Seeds the device (initialisation) and the batch sampler.
    pub seed: u64,
}

impl Protocol {
    /// The examples' recipe: 16 classes × 4 images per batch, Adam at 2e-3, a cosine scale of
    /// 16, GSP pooling as GAP for the first eighth of the steps, then k-center, 0.1 · ZSR,
    /// seed 42.
    pub fn recipe(steps: usize) -> Self {
        Self {
            steps,
            classes_per_batch: 16,
            samples_per_class: 4,
            learning_rate: 2e-3,
            scale: 16.0,
            gsp_warmup: steps / 8,
            gsp_kcenter: true,
            zsr_weight: 0.1,
            seed: 42,
        }
    }
}

/// A progress bar for `steps` training steps.
pub fn progress_bar(steps: usize) -> ProgressBar {
    ProgressBar::new(steps as u64).with_style(
        ProgressStyle::default_bar()
            .template("[{bar:30}] {pos}/{len} steps, {msg} ({elapsed} < {eta})")
            .expect("valid template")
            .progress_chars("=> "),
    )
}

/// Trains `pooling` on class-blocked batches of `data` and returns the trained net and its
/// final mean loss. Every head of a seed starts from the same backbone, embedding and proxies
/// and sees the same batches. The bar advances one tick per step, its message starting with
/// `label`.
pub fn train(
    pooling: Pooling,
    model: (&BackboneConfig, &GspConfig),
    data: &impl ClassImages,
    protocol: &Protocol,
    (bar, label): (&ProgressBar, &str),
    device: &Device,
) -> (Net, f32) {
    let classes = data.classes();
    device.seed(protocol.seed);
    let net = Net::new(pooling, model.0, model.1, device);
    let proxies = Initializer::XavierUniform { gain: 1.0 }.init_with(
        [classes, EMBEDDING],
        Some(EMBEDDING),
        Some(classes),
        device,
    );
    let zsr = (pooling.is_gsp()).then(|| ZeroShotLossConfig::new(classes, EMBEDDING).init(device));
    let mut trainee = Trainee { net, proxies, zsr };
    let mut optimizer = AdamConfig::new().init();
    let mut rng = Rng::new(protocol.seed);
    let warmup = if pooling.is_gsp() {
        protocol.gsp_warmup.min(protocol.steps)
    } else {
        0
    };
    let batch_size = protocol.classes_per_batch * protocol.samples_per_class;
    // The reference's memory of ~1024 GAP-pooled features (the last batches of the warm-up).
    let memory_batches = 1024usize.div_ceil(batch_size);
    let mut memory: Vec<Tensor<2>> = Vec::new();
    let mut recent = Vec::new();
    let mut last_mean = f32::NAN;
    for step in 0..protocol.steps {
        // Class-blocked: classes_per_batch distinct classes, samples_per_class images each.
        let labels: Vec<usize> = rng
            .choose(classes, protocol.classes_per_batch)
            .into_iter()
            .flat_map(|c| std::iter::repeat_n(c, protocol.samples_per_class))
            .collect();
        let batch = data.batch(&labels, &mut rng, device);
        let label_values: Vec<i64> = labels.iter().map(|&l| l as i64).collect();
        let label_tensor = Tensor::<1, Int>::from_data(label_values.as_slice(), device);

        let warming_up = step < warmup;
        let out = trainee.net.forward(batch, warming_up);
        if warming_up && protocol.gsp_kcenter && step + memory_batches >= warmup {
            memory.push(out.pooled.clone().detach());
        }
        let embeddings = l2_normalize(out.embeddings);
        let proxies = l2_normalize(trainee.proxies.val());
        let logits = embeddings
            .matmul(proxies.transpose())
            .mul_scalar(protocol.scale);
        let metric = log_softmax(logits, 1)
            .gather(1, label_tensor.clone().unsqueeze_dim(1))
            .mean()
            .neg();
        let loss = match (&trainee.zsr, out.gsp) {
            (Some(zsr), Some((attributes, _))) => {
                let half = batch_size / 2;
                debug_assert!(labels[..half].iter().all(|l| !labels[half..].contains(l)));
                let regulariser = zsr.forward(attributes, label_tensor, &ZeroShotSplit::Halves);
                metric.mul_scalar(1.0 - protocol.zsr_weight)
                    + regulariser.mul_scalar(protocol.zsr_weight)
            }
            _ => metric,
        };
        recent.push(loss.clone().into_scalar::<f32>());
        let grads = GradientsParams::from_grads(loss.backward(), &trainee);
        // Cosine decay.
        let progress = step as f64 / protocol.steps as f64;
        let lr = protocol.learning_rate * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        trainee = optimizer.step(lr, trainee, grads);

        if step + 1 == warmup && protocol.gsp_kcenter {
            // Warm-up over: prototypes by greedy k-center over the memory (docs/maths.md §6).
            let features = Tensor::cat(std::mem::take(&mut memory), 0);
            let gsp = trainee.net.gsp.take().expect("GSP head");
            trainee.net.gsp = Some(gsp.init_prototypes_kcenter(features));
        }
        if recent.len() == 20 || step + 1 == protocol.steps {
            last_mean = recent.iter().sum::<f32>() / recent.len() as f32;
            recent.clear();
        }
        bar.set_message(format!("{label} loss {last_mean:.3}"));
        bar.inc(1);
    }
    (trainee.net, last_mean)
}

/// Zero-shot evaluation: `per_class` generated images of every held-out class.
pub fn evaluate_zero_shot(
    net: &Net,
    split: &Split,
    per_class: usize,
    seed: u64,
    device: &Device,
) -> RetrievalMetrics {
    let net = net.valid();
    let mut rng = Rng::new(seed);
    let labels: Vec<usize> = (0..split.test_classes)
        .flat_map(|c| std::iter::repeat_n(c, per_class))
        .collect();
    let mut chunks = Vec::new();
    for chunk in labels.chunks(100) {
        let classes: Vec<usize> = chunk.iter().map(|&c| split.train_classes + c).collect();
        let batch = images(&split.objects, &classes, &mut rng, &device.clone().inner());
        chunks.push(net.forward(batch, false).embeddings);
    }
    evaluate_tensor(Tensor::cat(chunks, 0), &labels)
}
