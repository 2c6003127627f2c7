//! Zero-shot retrieval on real images: Fashion-MNIST, every pooling head over several seeds.
//!
//! The protocol of the GSP paper: train on the train-split images of some classes, evaluate
//! Recall@1, Recall@4 and MAP@R (cosine similarity, `examples/common/retrieval.rs`) on the
//! test-split images of the *other* classes, which the network never saw.
//!
//! The data: Fashion-MNIST (Xiao, Rasul, Vollgraf 2017; MIT), 60 000 + 10 000 grayscale 28×28
//! images of 10 classes, from the Debian package `dataset-fashion-mnist`
//! (`/usr/share/datasets/fashion-mnist/`, gzip-compressed IDX files, read by
//! `examples/common/idx.rs`). Classes: 0 T-shirt/top, 1 trouser, 2 pullover, 3 dress, 4 coat,
//! 5 sandal, 6 shirt, 7 sneaker, 8 bag, 9 ankle boot. The default split trains on 0–4 (30 000
//! images) and evaluates on the 5 000 test images of 5–9.
//!
//! The model and recipe (one for every head, untuned, taken from `metric_learning`): a 4-layer
//! CNN with batch norm (`[B, 1, 28, 28]` → `[B, 64, 7, 7]`, or 14×14 with `--map-side 14`),
//! the pooling, a linear embedding (64); a normalized-softmax proxy loss (cosine logits,
//! scale 16), Adam at 2·10⁻³ with cosine decay, class-blocked batches of 64 images (4 classes
//! × 16 with 5 training classes). Every head of a seed starts from the same backbone,
//! embedding and proxies, and sees the same batches. Heads:
//!
//! * GAP: the mean.
//! * GMP: the maximum.
//! * GAP+GMP: their sum.
//! * GeM: learnable p (initially 3).
//! * GGeM: 8 groups of 8 channels, one learnable p each (initially 3).
//! * GSP as its authors run it, with each read-out (mean, GeM, max) and the mean with the max
//!   branch: the 1×1 projection C → 64 is the embedding (it starts as the other heads'
//!   embedding), the transport runs in the projected space; K = 16 prototypes, μ = 0.3,
//!   ε = 0.05 (the `metric_learning` settings), loss 0.9·metric + 0.1·`ZeroShotLoss` over the
//!   batch's two class-disjoint halves; it pools as projected GAP for the first eighth of the
//!   steps, then its prototypes are set by greedy k-center over the last 1024 projected
//!   GAP-pooled features (the training recipe of docs/maths.md §6).
//!
//! Run: `cargo run --release --example fashion_mnist` (defaults: `--train-classes 0,1,2,3,4
//! --seeds 1,2,3 --steps 500`); `--help` lists the options, including GSP's ablations.

mod common;
#[path = "common/idx.rs"]
mod idx;

use std::path::PathBuf;
use std::time::Instant;

use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};
use burn_pooling::GspConfig;
use common::{
    BackboneConfig, ClassImages, FEATURES, Net, Pooling, Protocol, Rng, progress_bar, train,
};
use indicatif::ProgressBar;

/// Images per training batch.
const BATCH: usize = 64;
/// Fashion-MNIST's pixel mean and standard deviation (of the train split, in [0, 1]).
const PIXEL_MEAN: f32 = 0.286;
const PIXEL_STD: f32 = 0.353;
const CLASS_NAMES: [&str; 10] = [
    "T-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
];

// ---------------------------------------------------------------------------------------------
// Retrieval metrics (`examples/common/retrieval.rs`).

/// Recall@1, Recall@4 and MAP@R of a set of embeddings.
#[derive(Clone, Copy, Debug)]
struct Metrics {
    recall_at_1: f64,
    recall_at_4: f64,
    map_at_r: f64,
}

fn retrieval_metrics(embeddings: Tensor<2>, labels: &[usize]) -> Metrics {
    use common::retrieval::{evaluate, recall_at_k, tensor_rows};
    let rows = tensor_rows(embeddings);
    let both = evaluate(&rows, labels);
    Metrics {
        recall_at_1: both.recall_at_1,
        recall_at_4: recall_at_k(&rows, labels, 4),
        map_at_r: both.map_at_r,
    }
}

// ---------------------------------------------------------------------------------------------
// GSP's settings.

/// GSP's hyper-parameters as the options give them.
#[derive(Clone, Debug)]
struct GspSettings {
    prototypes: usize,
    ratio: f64,
    epsilon: f64,
    /// Set the prototypes by k-center after the warm-up (else keep their Glorot init).
    kcenter: bool,
    /// Fraction of the steps GSP pools as GAP first.
    warmup: f64,
    zsr_weight: f64,
}

impl GspSettings {
    fn config(&self) -> GspConfig {
        GspConfig::new(FEATURES)
            .with_num_prototypes(self.prototypes)
            .with_transport_ratio(self.ratio)
            .with_epsilon(self.epsilon)
    }
}

// ---------------------------------------------------------------------------------------------
// The data.

/// Images of some classes, as bytes, with their labels (indices into the class list).
struct Subset {
    side: usize,
    pixels: Vec<u8>,
    labels: Vec<usize>,
    /// The image indices of each class.
    by_class: Vec<Vec<usize>>,
    /// Cluttered images only: where each garment lies, one flag per pixel (above 10 % grey
    /// in the garment itself, whatever the clutter drew there). `None`: the garment is every
    /// pixel above 10 % grey.
    garment: Option<Vec<bool>>,
    /// Cluttered images only: where a patch drew a pixel above 10 % grey.
    clutter: Option<Vec<bool>>,
}

/// How `--canvas`, `--clutter` and `--patch` put nuisance into the images (cluttered MNIST,
/// Mnih et al. 2014).
#[derive(Clone, Copy, Debug)]
struct Clutter {
    /// Side S of the canvas (28: the plain images).
    canvas: usize,
    /// Patches M per image.
    patches: usize,
    /// Side P of a patch.
    patch: usize,
}

impl Clutter {
    fn is_plain(&self) -> bool {
        self.canvas == 28 && self.patches == 0
    }
}

impl Subset {
    fn new(split: &idx::IdxSplit, classes: &[usize]) -> Self {
        let side = split.images.rows;
        let mut subset = Self {
            side,
            pixels: Vec::new(),
            labels: Vec::new(),
            by_class: vec![Vec::new(); classes.len()],
            garment: None,
            clutter: None,
        };
        for (i, &label) in split.labels.iter().enumerate() {
            if let Some(c) = classes.iter().position(|&c| c == label as usize) {
                subset.by_class[c].push(subset.labels.len());
                subset.labels.push(c);
                subset.pixels.extend_from_slice(split.images.image(i));
            }
        }
        subset
    }

    fn len(&self) -> usize {
        self.labels.len()
    }

    /// The same images, cluttered: each garment at a uniformly random place on a black
    /// `canvas`×`canvas` image, then `patches` squares of `patch`×`patch` pixels cut at random
    /// places from random *other* images of this subset, pasted at random places and blended by
    /// maximum. Patches come from the same subset so that training images never show a
    /// held-out class.
    fn cluttered(&self, clutter: Clutter, rng: &mut Rng) -> Self {
        let (side, canvas, patch) = (self.side, clutter.canvas, clutter.patch);
        let (size, canvas_size) = (side * side, canvas * canvas);
        let mut pixels = vec![0u8; self.len() * canvas_size];
        let mut garment = vec![false; self.len() * canvas_size];
        let mut clutter_mask = vec![false; self.len() * canvas_size];
        for (i, ((image, mask), clutter_mask)) in pixels
            .chunks_exact_mut(canvas_size)
            .zip(garment.chunks_exact_mut(canvas_size))
            .zip(clutter_mask.chunks_exact_mut(canvas_size))
            .enumerate()
        {
            let source = &self.pixels[i * size..][..size];
            let (top, left) = (rng.below(canvas - side + 1), rng.below(canvas - side + 1));
            for y in 0..side {
                for x in 0..side {
                    let value = source[y * side + x];
                    image[(top + y) * canvas + left + x] = value;
                    mask[(top + y) * canvas + left + x] = value > 25;
                }
            }
            for _ in 0..clutter.patches {
                let other = (i + 1 + rng.below(self.len() - 1)) % self.len();
                let other = &self.pixels[other * size..][..size];
                let (cut_y, cut_x) = (rng.below(side - patch + 1), rng.below(side - patch + 1));
                let (at_y, at_x) = (rng.below(canvas - patch + 1), rng.below(canvas - patch + 1));
                for y in 0..patch {
                    for x in 0..patch {
                        let value = other[(cut_y + y) * side + cut_x + x];
                        let at = (at_y + y) * canvas + at_x + x;
                        image[at] = image[at].max(value);
                        clutter_mask[at] |= value > 25;
                    }
                }
            }
        }
        Self {
            side: canvas,
            pixels,
            labels: self.labels.clone(),
            by_class: self.by_class.clone(),
            garment: Some(garment),
            clutter: Some(clutter_mask),
        }
    }

    /// What map cell `cell` of image `image` shows, on a `map_side`² map: the garment
    /// (any of its pixels), else clutter (any patch pixel), else nothing.
    fn cell_content(&self, image: usize, cell: usize, map_side: usize) -> CellContent {
        let pool = self.side / map_side;
        let (cy, cx) = (cell / map_side, cell % map_side);
        let pixels = (0..pool * pool).map(|k| {
            let (y, x) = (cy * pool + k / pool, cx * pool + k % pool);
            image * self.side * self.side + y * self.side + x
        });
        let mut content = CellContent::Empty;
        for index in pixels {
            if self.is_garment_pixel(index) {
                return CellContent::Garment;
            }
            if self.clutter.as_ref().is_some_and(|mask| mask[index]) {
                content = CellContent::Clutter;
            }
        }
        content
    }

    /// Whether pixel `index` (over the whole subset) belongs to a garment.
    fn is_garment_pixel(&self, index: usize) -> bool {
        match &self.garment {
            Some(mask) => mask[index],
            None => self.pixels[index] > 25,
        }
    }

    /// The images `indices` as a `[B, 1, side, side]` batch in [0, 1].
    fn images(&self, indices: &[usize], device: &Device) -> Tensor<4> {
        let size = self.side * self.side;
        let values: Vec<f32> = indices
            .iter()
            .flat_map(|&i| self.pixels[i * size..(i + 1) * size].iter())
            .map(|&p| p as f32 / 255.0)
            .collect();
        Tensor::from_data(
            TensorData::new(values, [indices.len(), 1, self.side, self.side]),
            device,
        )
    }
}

/// Training batches: for each label, an image of that class drawn at random.
impl ClassImages for Subset {
    fn classes(&self) -> usize {
        self.by_class.len()
    }

    fn batch(&self, labels: &[usize], rng: &mut Rng, device: &Device) -> Tensor<4> {
        let indices: Vec<usize> = labels
            .iter()
            .map(|&c| self.by_class[c][rng.below(self.by_class[c].len())])
            .collect();
        self.images(&indices, device)
    }
}

// ---------------------------------------------------------------------------------------------
// Evaluation.

/// What a map cell shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CellContent {
    Garment = 0,
    Clutter = 1,
    Empty = 2,
}

/// Where GSP's pooling weights go over a test set.
#[derive(Clone, Copy, Debug, Default)]
struct Placement {
    /// Mean share of an image's weight on its garment, clutter and empty cells.
    weight: [f64; 3],
    /// Mean share of an image's pooled vector that comes from each kind of cell: cell j
    /// contributes w_j ‖F_j‖ (F the projected features GSP transports), shares of Σ_j w_j ‖F_j‖.
    /// Unlike the weight, this sees that a cell whose features project to nearly zero adds
    /// nothing however much weight it holds.
    contribution: [f64; 3],
    /// Share of the cells of each kind.
    cells: [f64; 3],
    /// Mean effective number of pooled positions, 1 / Σ w², as a fraction of the map (1:
    /// uniform weights, as GAP; μ: an even spread over a μ share of the cells).
    effective: f64,
}

/// What an evaluation measures.
struct Evaluation {
    metrics: Metrics,
    /// GSP only: where its weights go.
    gsp_placement: Option<Placement>,
}

/// Embeds every image of `test` (a held-out class set) and measures retrieval.
fn evaluate(net: &Net, test: &Subset, device: &Device) -> Evaluation {
    let net = net.valid();
    let device = device.clone().inner();
    let all: Vec<usize> = (0..test.len()).collect();
    let mut chunks = Vec::new();
    let mut placement = Placement::default();
    let mut cells = 0usize;
    for indices in all.chunks(500) {
        let batch = test.images(indices, &device);
        // ‖F_j‖ per position for GSP heads: the backbone again, then GSP's projection.
        let norms: Option<Vec<f32>> = net.gsp.as_ref().map(|gsp| {
            let maps = net.backbone.forward(batch.clone());
            let [b, c, h, w] = maps.dims();
            let positions = maps
                .reshape([b, c, h * w])
                .swap_dims(1, 2)
                .reshape([b * h * w, c]);
            let projected = gsp.project(positions);
            projected
                .square()
                .sum_dim(1)
                .sqrt()
                .into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .expect("f32")
        });
        let out = net.forward(batch, false);
        if let (Some((_, weights)), Some(norms)) = (out.gsp, norms) {
            let [_, n] = weights.dims();
            let weights: Vec<f32> = weights
                .into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .expect("f32");
            let map_side = (n as f64).sqrt().round() as usize;
            for (row, &image) in indices.iter().enumerate() {
                let row_weights = &weights[row * n..][..n];
                let row_norms = &norms[row * n..][..n];
                let total: f64 = row_weights
                    .iter()
                    .zip(row_norms)
                    .map(|(&w, &f)| w as f64 * f as f64)
                    .sum();
                for (cell, (&weight, &norm)) in row_weights.iter().zip(row_norms).enumerate() {
                    let content = test.cell_content(image, cell, map_side) as usize;
                    placement.weight[content] += weight as f64;
                    placement.contribution[content] += weight as f64 * norm as f64 / total;
                    placement.cells[content] += 1.0;
                }
                let squares: f64 = row_weights.iter().map(|&w| (w as f64).powi(2)).sum();
                placement.effective += 1.0 / (squares * n as f64);
                cells += n;
            }
        }
        chunks.push(out.embeddings);
    }
    let metrics = retrieval_metrics(Tensor::cat(chunks, 0), &test.labels);
    let gsp_placement = (cells > 0).then(|| {
        let images = test.len() as f64;
        Placement {
            weight: placement.weight.map(|w| w / images),
            contribution: placement.contribution.map(|c| c / images),
            cells: placement.cells.map(|c| c / cells as f64),
            effective: placement.effective / images,
        }
    });
    Evaluation {
        metrics,
        gsp_placement,
    }
}

// ---------------------------------------------------------------------------------------------
// Options.

struct Options {
    data: PathBuf,
    train_classes: Vec<usize>,
    seeds: Vec<u64>,
    steps: usize,
    heads: Vec<Pooling>,
    /// The backbone's map side; `None`: the canvas side / 4.
    map_side: Option<usize>,
    clutter: Clutter,
    gsp: GspSettings,
}

const USAGE: &str = "\
usage: fashion_mnist [options]
  --train-classes LIST   training classes, e.g. 0,1,2,3,4 (default); the others are evaluated
  --seeds LIST           seeds, e.g. 1,2,3 (default)
  --steps N              training steps per head and seed (default 500)
  --data DIR             the IDX files (default /usr/share/datasets/fashion-mnist)
  --heads LIST           among gap,gmp,gapgmp,gem,ggem,gsp,gsp-gem,gsp-max,gsp-mean-max
                         (GSP with the mean, GeM or max read-out, or the mean and the max
                         branch; default: these nine), salad, otk (the cluster aggregators)
  --map-side S           the backbone's map side: the canvas side / 2, / 4 (default) or / 8
Clutter (cluttered MNIST, Mnih et al. 2014; defaults: the plain images):
  --canvas S             each garment at a random place on an S×S black canvas (28)
  --clutter M            M patches per image, cut from other images of the split (0)
  --patch P              the patches' side (12)
  --cluttered            the cluttered benchmark: --canvas 56 --clutter 6 --patch 12
                         --map-side 7 --steps 400 (set other options after it)
GSP ablations (defaults are the recipe's):
  --gsp-prototypes K     number of prototypes (16)
  --gsp-ratio MU         transport ratio mu (0.3)
  --gsp-epsilon EPS      entropy smoothing epsilon (0.05)
  --gsp-init I           kcenter (default: k-center after the GAP warm-up) or random
                         (the Glorot-uniform prototypes, still after the warm-up)
  --gsp-warmup F         fraction of the steps GSP pools as GAP first (0.125)
  --zsr-weight W         weight of ZeroShotLoss, (1 - W) metric + W ZSR (0.1)";

fn parse_list<T: std::str::FromStr>(option: &str, text: &str) -> Result<Vec<T>, String> {
    text.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| {
            s.trim()
                .parse()
                .map_err(|_| format!("{option}: cannot parse `{s}` in `{text}`"))
        })
        .collect()
}

fn parse_value<T: std::str::FromStr>(option: &str, text: &str) -> Result<T, String> {
    text.parse()
        .map_err(|_| format!("{option}: cannot parse `{text}`"))
}

fn parse_options() -> Result<Options, String> {
    let mut options = Options {
        data: PathBuf::from(idx::DEBIAN_FASHION_MNIST),
        train_classes: vec![0, 1, 2, 3, 4],
        seeds: vec![1, 2, 3],
        steps: 500,
        heads: Pooling::EVERY.to_vec(),
        map_side: None,
        clutter: Clutter {
            canvas: 28,
            patches: 0,
            patch: 12,
        },
        gsp: GspSettings {
            prototypes: 16,
            ratio: 0.3,
            epsilon: 0.05,
            kcenter: true,
            warmup: 0.125,
            zsr_weight: 0.1,
        },
    };
    let mut args = std::env::args().skip(1);
    while let Some(option) = args.next() {
        if option == "--help" || option == "-h" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        if option == "--cluttered" {
            options.clutter = CLUTTERED;
            options.map_side = Some(CLUTTERED_MAP_SIDE);
            options.steps = CLUTTERED_STEPS;
            continue;
        }
        let value = args
            .next()
            .ok_or_else(|| format!("{option} needs a value\n{USAGE}"))?;
        let o = option.as_str();
        match o {
            "--train-classes" => options.train_classes = parse_list(o, &value)?,
            "--seeds" => options.seeds = parse_list(o, &value)?,
            "--steps" => options.steps = parse_value(o, &value)?,
            "--data" => options.data = PathBuf::from(value),
            "--heads" => {
                options.heads = value
                    .split(',')
                    .map(Pooling::parse)
                    .collect::<Result<_, _>>()?
            }
            "--map-side" => options.map_side = Some(parse_value(o, &value)?),
            "--canvas" => options.clutter.canvas = parse_value(o, &value)?,
            "--clutter" => options.clutter.patches = parse_value(o, &value)?,
            "--patch" => options.clutter.patch = parse_value(o, &value)?,
            "--gsp-prototypes" => options.gsp.prototypes = parse_value(o, &value)?,
            "--gsp-ratio" => options.gsp.ratio = parse_value(o, &value)?,
            "--gsp-epsilon" => options.gsp.epsilon = parse_value(o, &value)?,
            "--gsp-init" => {
                options.gsp.kcenter = match value.as_str() {
                    "kcenter" => true,
                    "random" => false,
                    other => return Err(format!("--gsp-init: `{other}` (kcenter or random)")),
                }
            }
            "--gsp-warmup" => options.gsp.warmup = parse_value(o, &value)?,
            "--zsr-weight" => options.gsp.zsr_weight = parse_value(o, &value)?,
            _ => return Err(format!("unknown option `{option}`\n{USAGE}")),
        }
    }
    let classes = &mut options.train_classes;
    classes.sort_unstable();
    classes.dedup();
    if let Some(bad) = classes.iter().find(|&&c| c >= 10) {
        return Err(format!("--train-classes: class {bad} out of range 0..=9"));
    }
    if classes.len() < 2 || classes.len() > 8 {
        return Err(format!(
            "--train-classes: need 2 to 8 training classes (a proxy loss needs two, \
             retrieval needs two held out), got {classes:?}"
        ));
    }
    if options.seeds.is_empty() || options.heads.is_empty() || options.steps == 0 {
        return Err("--seeds, --heads and --steps must not be empty or zero".into());
    }
    let clutter = options.clutter;
    if clutter.canvas < 28 {
        return Err(format!("--canvas: at least 28, got {}", clutter.canvas));
    }
    if clutter.patch == 0 || clutter.patch > 28 {
        return Err(format!("--patch: 1 to 28, got {}", clutter.patch));
    }
    let map_side = options.map_side.unwrap_or(clutter.canvas / 4);
    if map_side == 0
        || !clutter.canvas.is_multiple_of(map_side)
        || ![2, 4, 8].contains(&(clutter.canvas / map_side))
    {
        return Err(format!(
            "--map-side: the canvas side ({}) / 2, / 4 or / 8, got {map_side}",
            clutter.canvas
        ));
    }
    options.map_side = Some(map_side);
    if !(0.0..1.0).contains(&options.gsp.warmup) {
        return Err("--gsp-warmup: a fraction in [0, 1)".into());
    }
    if options.gsp.kcenter && options.heads.iter().any(|h| h.is_gsp()) {
        let warmup = (options.steps as f64 * options.gsp.warmup).round() as usize;
        if warmup == 0 {
            return Err(
                "k-center needs a warm-up of at least one step: raise --gsp-warmup \
                        or use --gsp-init random"
                    .into(),
            );
        }
    }
    Ok(options)
}

/// `--cluttered`: a 56×56 canvas, 6 patches of 12×12. The garment covers about a quarter of
/// the canvas and the patches another ~25 % of it, each a recognisable part of another
/// garment. The backbone downsamples by 8 (7×7 maps, one cell per 8×8 pixels) and trains 400
/// steps so that every head × 3 seeds fits 20 minutes on 2 cores.
const CLUTTERED: Clutter = Clutter {
    canvas: 56,
    patches: 6,
    patch: 12,
};
const CLUTTERED_MAP_SIDE: usize = 7;
const CLUTTERED_STEPS: usize = 400;

// ---------------------------------------------------------------------------------------------

/// Mean and sample standard deviation (0 for a single value).
fn mean_std(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    if values.len() < 2 {
        return (mean, 0.0);
    }
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

fn main() {
    let options = parse_options().unwrap_or_else(|e| {
        eprintln!("error: {e}");
        std::process::exit(2);
    });
    let start = Instant::now();
    let load = |split: &str| {
        idx::read_fashion_mnist(&options.data, split, None).unwrap_or_else(|e| {
            eprintln!("error: {e}");
            std::process::exit(1);
        })
    };
    let (train_split, test_split) = (load("train"), load("t10k"));
    let test_classes: Vec<usize> = (0..10)
        .filter(|c| !options.train_classes.contains(c))
        .collect();
    let train_set = Subset::new(&train_split, &options.train_classes);
    let test_set = Subset::new(&test_split, &test_classes);
    drop((train_split, test_split));
    let names = |classes: &[usize]| {
        classes
            .iter()
            .map(|&c| format!("{c} {}", CLASS_NAMES[c]))
            .collect::<Vec<_>>()
            .join(", ")
    };

    // The batch: an even number of classes (ZSR's two class-disjoint halves), 64 images.
    let classes_per_batch = (options.train_classes.len().min(8)) / 2 * 2;
    let protocol = Protocol {
        steps: options.steps,
        classes_per_batch,
        samples_per_class: BATCH / classes_per_batch,
        learning_rate: 2e-3,
        scale: 16.0,
        gsp_warmup: (options.steps as f64 * options.gsp.warmup).round() as usize,
        gsp_kcenter: options.gsp.kcenter,
        zsr_weight: options.gsp.zsr_weight,
        seed: 0,
    };
    let backbone = BackboneConfig {
        pixel_mean: PIXEL_MEAN,
        pixel_std: PIXEL_STD,
        downsample: options.clutter.canvas / options.map_side.expect("resolved"),
    };
    let gsp_config = options.gsp.config();
    let map_side = options.map_side.expect("resolved");
    println!(
        "Fashion-MNIST zero-shot: train on {} ({} train-split images), evaluate on {} ({} \
         test-split images)",
        names(&options.train_classes),
        train_set.len(),
        names(&test_classes),
        test_set.len()
    );
    println!(
        "{} images: {} steps of {} classes × {} images, {}×{} maps, seeds {:?}; GSP: K = {}, μ = {}, \
         ε = {}, {} init, warm-up {} steps, ZSR weight {}",
        if options.clutter.is_plain() {
            "plain 28×28".to_string()
        } else {
            format!(
                "cluttered {0}×{0} (garment at a random place, {1} patches of {2}×{2})",
                options.clutter.canvas, options.clutter.patches, options.clutter.patch
            )
        },
        protocol.steps,
        protocol.classes_per_batch,
        protocol.samples_per_class,
        map_side,
        map_side,
        options.seeds,
        options.gsp.prototypes,
        options.gsp.ratio,
        options.gsp.epsilon,
        if protocol.gsp_kcenter {
            "k-center"
        } else {
            "random (Glorot)"
        },
        protocol.gsp_warmup,
        protocol.zsr_weight,
    );
    if test_classes.len() < 2 {
        println!("note: a single held-out class makes retrieval trivial (every item is relevant)");
    }

    let device = Device::flex().autodiff();
    let runs = options.seeds.len() * options.heads.len();
    let bar: ProgressBar = progress_bar(runs * protocol.steps);
    // rows[0] is the untrained network, then one row per head; each holds one entry per seed.
    let mut names_rows = vec!["untrained CNN + GAP".to_string()];
    names_rows.extend(options.heads.iter().map(|h| h.name().to_string()));
    let mut results: Vec<Vec<Metrics>> = vec![Vec::new(); names_rows.len()];
    // GSP heads only: where each seed's weights went, by row.
    let mut placements: Vec<Vec<Placement>> = vec![Vec::new(); names_rows.len()];
    for &seed in &options.seeds {
        device.seed(seed);
        // Cluttered images: generated once per seed, the same for every head.
        let cluttered = (!options.clutter.is_plain()).then(|| {
            let mut rng = Rng::new(seed ^ 0xC1u64);
            (
                train_set.cluttered(options.clutter, &mut rng),
                test_set.cluttered(options.clutter, &mut rng),
            )
        });
        let (train_set, test_set) = match &cluttered {
            Some((train, test)) => (train, test),
            None => (&train_set, &test_set),
        };
        let untrained = Net::new(Pooling::Gap, &backbone, &gsp_config, &device);
        let began = Instant::now();
        results[0].push(evaluate(&untrained, test_set, &device).metrics);
        let evaluation_seconds = began.elapsed().as_secs_f64();
        if seed == options.seeds[0] {
            println!("(one evaluation: {evaluation_seconds:.1} s)");
        }
        for (row, &head) in options.heads.iter().enumerate() {
            let began = Instant::now();
            let protocol = Protocol {
                seed,
                ..protocol.clone()
            };
            let label = format!("seed {seed} {}", head.name());
            let model = (&backbone, &gsp_config);
            let (net, loss) = train(head, model, train_set, &protocol, (&bar, &label), &device);
            let evaluation = evaluate(&net, test_set, &device);
            let m = evaluation.metrics;
            let mut line = format!(
                "seed {seed} {:<21} R@1 {:5.2}  R@4 {:5.2}  MAP@R {:5.2}  (loss {loss:.3}, {:.0} s)",
                head.name(),
                100.0 * m.recall_at_1,
                100.0 * m.recall_at_4,
                100.0 * m.map_at_r,
                began.elapsed().as_secs_f64()
            );
            if let Some(gem) = &net.gem {
                let p: f32 = gem.p.val().into_scalar();
                line += &format!("  p = {p:.2}");
            }
            if let Some(ggem) = &net.ggem {
                let p: Vec<f32> = ggem
                    .p
                    .val()
                    .into_data()
                    .convert::<f32>()
                    .try_into_vec::<f32>()
                    .unwrap_or_default();
                let p: Vec<String> = p.iter().map(|v| format!("{v:.1}")).collect();
                line += &format!("  p = [{}]", p.join(" "));
            }
            if let Some(p) = net.gsp.as_ref().and_then(|gsp| gsp.readout_power()) {
                let p: f32 = p.into_scalar();
                line += &format!("  read-out p = {p:.2}");
            }
            if let Some(placement) = evaluation.gsp_placement {
                let [garment, clutter, empty] = placement.weight.map(|w| 100.0 * w);
                let [from_garment, from_clutter, from_empty] =
                    placement.contribution.map(|c| 100.0 * c);
                let [garment_cells, clutter_cells, empty_cells] =
                    placement.cells.map(|c| 100.0 * c);
                line += &format!(
                    "  weight on garment/clutter/empty cells {garment:.1}/{clutter:.1}/{empty:.1} % \
                     (cells {garment_cells:.1}/{clutter_cells:.1}/{empty_cells:.1} %), effective \
                     positions {:.1} % of the map; pooled vector from garment/clutter/empty cells \
                     {from_garment:.1}/{from_clutter:.1}/{from_empty:.1} %",
                    100.0 * placement.effective
                );
                placements[row + 1].push(placement);
            }
            // Above the bar on a terminal; plain lines when the bar is hidden (a pipe).
            if bar.is_hidden() {
                println!("{line}");
            } else {
                bar.println(line);
            }
            results[row + 1].push(m);
        }
    }
    bar.finish_and_clear();

    println!();
    println!(
        "Zero-shot retrieval on the {} test images of classes {:?}, mean ± std over seeds {:?} \
         ({} steps):",
        test_set.len(),
        test_classes,
        options.seeds,
        protocol.steps
    );
    println!();
    println!("| head | Recall@1 (%) | Recall@4 (%) | MAP@R (%) |");
    println!("|---|---:|---:|---:|");
    let cell = |values: Vec<f64>| {
        let (mean, std) = mean_std(&values);
        format!("{:.2} ± {:.2}", 100.0 * mean, 100.0 * std)
    };
    for (name, seeds) in names_rows.iter().zip(&results) {
        println!(
            "| {name} | {} | {} | {} |",
            cell(seeds.iter().map(|m| m.recall_at_1).collect()),
            cell(seeds.iter().map(|m| m.recall_at_4).collect()),
            cell(seeds.iter().map(|m| m.map_at_r).collect()),
        );
    }
    if let Some(gap) = options.heads.iter().position(|&h| h == Pooling::Gap) {
        // Paired by seed: both heads start from the same weights and see the same batches.
        println!();
        println!("Paired differences to GAP (points, mean ± std over the seeds):");
        let gap = &results[gap + 1];
        for (row, &head) in options.heads.iter().enumerate() {
            if head == Pooling::Gap {
                continue;
            }
            let seeds = &results[row + 1];
            let diff = |metric: fn(&Metrics) -> f64| {
                let d: Vec<f64> = seeds
                    .iter()
                    .zip(gap)
                    .map(|(a, b)| metric(a) - metric(b))
                    .collect();
                let (mean, std) = mean_std(&d);
                format!("{:+.2} ± {:.2}", 100.0 * mean, 100.0 * std)
            };
            println!(
                "  {:<21} Recall@1 {}  Recall@4 {}  MAP@R {}",
                head.name(),
                diff(|m| m.recall_at_1),
                diff(|m| m.recall_at_4),
                diff(|m| m.map_at_r)
            );
        }
    }
    if placements.iter().any(|p| !p.is_empty()) {
        println!();
        println!(
            "Where GSP's weights go (mean ± std over the seeds, %): a cell is the garment's when \
             any garment pixel is above 10 % grey, else clutter when a patch pixel is, else empty"
        );
        println!();
        println!(
            "| head | weight on garment cells | on clutter cells | on empty cells | effective \
             positions | pooled vector from garment cells | from clutter cells | from empty cells |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|");
        let first = placements
            .iter()
            .find(|p| !p.is_empty())
            .expect("a GSP row");
        let share =
            |seeds: &[Placement], kind: usize| cell(seeds.iter().map(|p| p.cells[kind]).collect());
        println!(
            "| (share of such cells) | {} | {} | {} | | | | |",
            share(first, 0),
            share(first, 1),
            share(first, 2)
        );
        for (name, seeds) in names_rows.iter().zip(&placements) {
            if seeds.is_empty() {
                continue;
            }
            let weight = |kind: usize| cell(seeds.iter().map(|p| p.weight[kind]).collect());
            let from = |kind: usize| cell(seeds.iter().map(|p| p.contribution[kind]).collect());
            println!(
                "| {name} | {} | {} | {} | {} | {} | {} | {} |",
                weight(0),
                weight(1),
                weight(2),
                cell(seeds.iter().map(|p| p.effective).collect()),
                from(0),
                from(1),
                from(2)
            );
        }
    }
    println!();
    println!("Wall time: {:.0} s", start.elapsed().as_secs_f64());
}
