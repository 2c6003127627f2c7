//! burn-pooling heads trained by burn-train's `Learner`, the pooling chosen by a JSON config.
//!
//! A small CNN (`[B, 1, 28, 28]` → `[B, 32, 7, 7]`), a pooling head built from a
//! [`PoolingConfig`], a linear classifier over the 10 Fashion-MNIST classes. burn-train runs
//! the loop: `Learner::new` + `SupervisedTraining` with data loaders over 10 000 train-split
//! and 1 000 test-split images, `TrainStep` / `InferenceStep` on the model, the loss and
//! accuracy metrics, Adam, 3 epochs. GSP is trained with 0.9 · cross-entropy + 0.1 ·
//! `ZeroShotLoss` over each batch's classes 0–4 vs 5–9.
//!
//! The heads are the JSON of their `PoolingConfig`s, printed before each run; pass your own
//! with `--pooling '<json>'` (e.g. `'{"Gmp": {"num_prefix_tokens": 0}}'`), as a model would
//! read its pooling from a config file.
//!
//! Run: `cargo run --release --example learner` (needs `apt-get install
//! dataset-fashion-mnist`, or `--data DIR` with the four IDX files).

#[path = "common/idx.rs"]
mod idx;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use burn::config::Config;
use burn::data::dataloader::batcher::Batcher;
use burn::data::dataloader::{DataLoader, DataLoaderBuilder};
use burn::data::dataset::InMemDataset;
use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Linear, LinearConfig, PaddingConfig2d};
use burn::optim::AdamConfig;
use burn::tensor::activation::relu;
use burn::tensor::{Device, Int, Tensor, TensorData};
use burn::train::logger::{EvaluationProgressLogger, TrainingProgressLogger};
use burn::train::metric::{AccuracyMetric, LossMetric, MetricDefinition, MetricId, MetricName};
use burn::train::renderer::{
    EvaluationName, MetricState, MetricsRenderer, MetricsRendererEvaluation,
    MetricsRendererTraining,
};
use burn::train::{
    ClassificationOutput, InferenceStep, Learner, SupervisedTraining, TrainOutput, TrainStep,
};
use burn_pooling::loss::{ZeroShotLoss, ZeroShotLossConfig, ZeroShotSplit};
use burn_pooling::{
    GapConfig, GapGmpCombine, GapGmpConfig, GemConfig, GmpConfig, GspConfig, Pooling, PoolingConfig,
};
use indicatif::{ProgressBar, ProgressStyle};

const CLASSES: usize = 10;
const FEATURES: usize = 32;

/// The run: how many images of each split, batches, epochs, Adam's learning rate.
struct Recipe {
    train_images: usize,
    test_images: usize,
    batch: usize,
    epochs: usize,
    learning_rate: f64,
}

const RECIPE: Recipe = Recipe {
    train_images: 10_000,
    test_images: 1_000,
    batch: 64,
    epochs: 3,
    learning_rate: 5e-3,
};

/// Fashion-MNIST's pixel mean and standard deviation (train split, pixels in [0, 1]).
const PIXEL_MEAN_STD: (f32, f32) = (0.286, 0.353);

/// One image (standardized pixels) and its class.
#[derive(Clone, Debug)]
struct Image {
    pixels: Vec<f32>,
    label: usize,
}

#[derive(Clone, Debug)]
struct ImageBatch {
    images: Tensor<4>,
    labels: Tensor<1, Int>,
    /// Classes 0–4 vs 5–9: the class-disjoint halves of `ZeroShotLoss`.
    halves: ZeroShotSplit,
}

#[derive(Clone)]
struct ImageBatcher;

impl Batcher<Image, ImageBatch> for ImageBatcher {
    fn batch(&self, items: Vec<Image>, device: &Device) -> ImageBatch {
        let count = items.len();
        let halves = (0..count).partition(|&i| items[i].label < CLASSES / 2);
        let pixels = items.iter().flat_map(|image| image.pixels.iter().copied());
        let labels = items.iter().map(|image| image.label as i64);
        ImageBatch {
            images: Tensor::from_data(
                TensorData::new(pixels.collect::<Vec<_>>(), [count, 1, 28, 28]),
                device,
            ),
            labels: Tensor::from_data(TensorData::new(labels.collect::<Vec<_>>(), [count]), device),
            halves: ZeroShotSplit::Indices(halves.0, halves.1),
        }
    }
}

#[derive(Module, Debug)]
struct Classifier {
    conv1: Conv2d,
    conv2: Conv2d,
    pooling: Pooling,
    head: Linear,
    /// GSP's zero-shot loss, for a GSP head.
    zero_shot: Option<ZeroShotLoss>,
}

impl Classifier {
    fn new(pooling: &PoolingConfig, device: &Device) -> Self {
        let conv = |from, to| {
            Conv2dConfig::new([from, to], [3, 3])
                .with_stride([2, 2])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .init(device)
        };
        let zero_shot = match pooling {
            PoolingConfig::Gsp(gsp) => {
                Some(ZeroShotLossConfig::new(CLASSES, gsp.num_prototypes).init(device))
            }
            _ => None,
        };
        Self {
            conv1: conv(1, 16),
            conv2: conv(16, FEATURES),
            pooling: pooling.init(device),
            head: LinearConfig::new(pooling.output_channels(FEATURES), CLASSES).init(device),
            zero_shot,
        }
    }

    fn output(&self, batch: ImageBatch) -> ClassificationOutput {
        let maps = relu(self.conv2.forward(relu(self.conv1.forward(batch.images))));
        let (pooled, attributes) = match self.pooling.as_gsp() {
            Some(gsp) => {
                let detailed = gsp.forward_detailed(maps);
                (detailed.pooled, Some(detailed.attributes))
            }
            None => (self.pooling.forward(maps), None),
        };
        let logits = self.head.forward(pooled);
        let device = logits.device();
        let mut loss = CrossEntropyLossConfig::new()
            .init(&device)
            .forward(logits.clone(), batch.labels.clone());
        if let (Some(zero_shot), Some(attributes)) = (&self.zero_shot, attributes) {
            let regulariser = zero_shot.forward(attributes, batch.labels.clone(), &batch.halves);
            loss = loss * 0.9 + regulariser * 0.1;
        }
        ClassificationOutput::new(loss, logits, batch.labels)
    }
}

impl TrainStep for Classifier {
    type Input = ImageBatch;
    type Output = ClassificationOutput;

    fn step(&self, batch: ImageBatch) -> TrainOutput<ClassificationOutput> {
        let output = self.output(batch);
        TrainOutput::new(self, output.loss.backward(), output)
    }
}

impl InferenceStep for Classifier {
    type Input = ImageBatch;
    type Output = ClassificationOutput;

    fn step(&self, batch: ImageBatch) -> ClassificationOutput {
        self.output(batch)
    }
}

/// burn-train's renderer, reduced to a progress bar per split and one line per epoch with
/// each metric's value over the epoch.
#[derive(Default)]
struct EpochLines {
    bar: Option<ProgressBar>,
    names: HashMap<MetricId, MetricName>,
    train: Vec<(MetricId, String)>,
    valid: Vec<(MetricId, String)>,
}

impl EpochLines {
    /// The metrics of a split as `Loss 1.23, Accuracy 45.67 %`.
    fn line(&self, entries: &[(MetricId, String)]) -> String {
        let named = entries.iter().map(|(id, value)| {
            let name = self.names.get(id).map_or("?", |name| name.as_str());
            format!("{name} {value}")
        });
        named.collect::<Vec<_>>().join(", ")
    }
}

/// Keeps the running epoch value of the metric `state` reports (its text reads
/// `epoch <value> - batch <value>`).
fn record(entries: &mut Vec<(MetricId, String)>, state: MetricState) {
    let (MetricState::Generic(entry) | MetricState::Numeric(entry, _)) = state;
    let text = entry.serialized_entry.formatted;
    let epoch = text.split(" - ").next().unwrap_or_default();
    let value = epoch.trim_start_matches("epoch ").to_string();
    match entries.iter_mut().find(|(id, _)| *id == entry.metric_id) {
        Some(old) => old.1 = value,
        None => entries.push((entry.metric_id, value)),
    }
}

impl MetricsRendererTraining for EpochLines {
    fn update_train(&mut self, state: MetricState) {
        record(&mut self.train, state);
    }

    fn update_valid(&mut self, state: MetricState) {
        record(&mut self.valid, state);
    }
}

impl MetricsRendererEvaluation for EpochLines {
    fn update_test(&mut self, _name: EvaluationName, _state: MetricState) {}
}

impl TrainingProgressLogger for EpochLines {
    fn start(&mut self, _epochs: usize, _start: usize, _items: Option<usize>, _: Option<&str>) {}

    fn update_epoch(&mut self, epoch: usize) {
        let (train, valid) = (self.line(&self.train), self.line(&self.valid));
        println!("  epoch {epoch}: train {train} | test {valid}");
    }

    fn start_split(&mut self, split: &str, total_items: usize) {
        let bar = ProgressBar::new(total_items as u64).with_prefix(split.to_string());
        bar.set_style(
            ProgressStyle::default_bar()
                .template("  {prefix:>5} [{bar:30}] {pos}/{len} images ({elapsed})")
                .expect("valid template")
                .progress_chars("=> "),
        );
        self.bar = Some(bar);
    }

    fn update_split(&mut self, items_processed: usize) {
        if let Some(bar) = &self.bar {
            bar.set_position(items_processed as u64);
        }
    }

    fn end_split(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }

    fn end(&mut self) {}

    fn log_event_training(&mut self, _event: String) {}
}

impl EvaluationProgressLogger for EpochLines {
    fn start_global_progress(&mut self, _total_tests: usize) {}
    fn start_test(&mut self, _name: &str, _total_items: usize) {}
    fn update_test_progress(&mut self, _items_processed: usize) {}
    fn end_test(&mut self) {}
    fn end_global_progress(&mut self) {}
    fn log_event_evaluation(&mut self, _event: String) {}
}

impl MetricsRenderer for EpochLines {
    fn manual_close(&mut self) {}
    fn register_metric(&mut self, definition: MetricDefinition) {
        self.names.insert(definition.metric_id, definition.name);
    }
}

fn standardize(pixel: u8) -> f32 {
    let (mean, std) = PIXEL_MEAN_STD;
    (pixel as f32 / 255.0 - mean) / std
}

fn images(data: &std::path::Path, split: &str, limit: usize) -> Vec<Image> {
    let set = idx::read_fashion_mnist(data, split, Some(limit)).unwrap_or_else(|e| exit_with(&e));
    (0..set.images.len())
        .map(|i| Image {
            pixels: set
                .images
                .image(i)
                .iter()
                .map(|&p| standardize(p))
                .collect(),
            label: set.labels[i] as usize,
        })
        .collect()
}

fn loader(
    images: Vec<Image>,
    shuffle: Option<u64>,
    device: &Device,
) -> Arc<dyn DataLoader<ImageBatch>> {
    let builder = DataLoaderBuilder::new(ImageBatcher)
        .batch_size(RECIPE.batch)
        .set_device(device.clone());
    match shuffle {
        Some(seed) => builder.shuffle(seed).build(InMemDataset::new(images)),
        None => builder.build(InMemDataset::new(images)),
    }
}

fn exit_with(message: &str) -> ! {
    eprintln!("{message}");
    std::process::exit(2)
}

fn main() {
    let mut data = PathBuf::from(idx::DEBIAN_FASHION_MNIST);
    let mut heads = vec![
        PoolingConfig::Gap(GapConfig::new()),
        PoolingConfig::Gmp(GmpConfig::new()),
        PoolingConfig::GapGmp(GapGmpConfig::new().with_combine(GapGmpCombine::Concat)),
        PoolingConfig::Gem(GemConfig::new()),
        PoolingConfig::Gsp(GspConfig::new(FEATURES).with_num_prototypes(16)),
    ];
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().expect("a value after the option");
        match arg.as_str() {
            "--data" => data = PathBuf::from(value()),
            "--pooling" => {
                let json = value();
                match PoolingConfig::load_binary(json.as_bytes()) {
                    Ok(config) => heads = vec![config],
                    Err(e) => exit_with(&format!("--pooling: not a PoolingConfig ({e}): {json}")),
                }
            }
            other => exit_with(&format!(
                "unknown option {other}: use --data DIR, --pooling JSON"
            )),
        }
    }
    let train = images(&data, "train", RECIPE.train_images);
    let test = images(&data, "t10k", RECIPE.test_images);
    let device = Device::flex().autodiff();
    println!(
        "Fashion-MNIST, {} train / {} test images, {} epochs of batches of {}, Adam {}",
        train.len(),
        test.len(),
        RECIPE.epochs,
        RECIPE.batch,
        RECIPE.learning_rate
    );
    for pooling in heads {
        println!("{}", pooling.to_string().replace(['\n', ' '], ""));
        device.seed(1);
        let model = Classifier::new(&pooling, &device);
        let directory =
            std::env::temp_dir().join(format!("burn-pooling-learner-{}", std::process::id()));
        let started = Instant::now();
        let result = SupervisedTraining::new(
            &directory,
            loader(train.clone(), Some(1), &device),
            loader(test.clone(), None, &device),
        )
        .metrics((LossMetric::new(), AccuracyMetric::new()))
        .renderer(Box::<EpochLines>::default())
        .with_application_logger(None)
        .num_epochs(RECIPE.epochs)
        .launch(Learner::new(
            model,
            AdamConfig::new().init(),
            RECIPE.learning_rate,
        ));
        if let Some(error) = result.error {
            panic!("training failed: {error}");
        }
        println!(
            "  {} in {:.1} s",
            result.model.pooling.name(),
            started.elapsed().as_secs_f64()
        );
        let _ = std::fs::remove_dir_all(&directory);
    }
}
