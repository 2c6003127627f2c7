//! burn-train with burn-pooling heads: a `Learner` (`SupervisedTraining`, `TrainStep` /
//! `InferenceStep`, data loaders, a loss metric) trains a small token classifier whose pooling
//! comes from a [`PoolingConfig`], and burn-train's multi-device strategy equals the
//! single-device computation it stands for.
//!
//! The data are the sets of `training.rs`: half the tokens carry the class, half are
//! class-independent nuisance.

use std::sync::Arc;

use crate::common::{Rng, TempDir};
use crate::training::{CHANNELS, CLASSES, POSITIONS as TOKENS, token_set};
use burn::data::dataloader::batcher::Batcher;
use burn::data::dataloader::{DataLoader, DataLoaderBuilder};
use burn::data::dataset::InMemDataset;
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamConfig, ModuleOptimizer};
use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};
use burn::train::metric::LossMetric;
use burn::train::{
    ClassificationOutput, ExecutionStrategy, InferenceStep, Learner, SupervisedTraining,
    TrainOutput, TrainStep, TrainingStrategy,
};
use burn_pooling::loss::{ZeroShotLoss, ZeroShotLossConfig, ZeroShotSplit};
use burn_pooling::{GemConfig, GspConfig, Pooling, PoolingConfig};

/// One token set `[TOKENS, CHANNELS]` and its class.
#[derive(Clone, Debug)]
struct Item {
    tokens: Vec<f32>,
    label: usize,
}

/// `count` items, classes in turn (item i has class i mod 4), so that every batch of a
/// multiple of 4 items holds every class.
fn items(count: usize, seed: u64) -> Vec<Item> {
    let mut rng = Rng::new(seed);
    (0..count)
        .map(|i| Item {
            tokens: token_set(&mut rng, i % CLASSES),
            label: i % CLASSES,
        })
        .collect()
}

/// A batch: tokens `[B, N, C]`, labels `[B]`, and the two class-disjoint halves of
/// `ZeroShotLoss` (classes 0, 1 vs 2, 3).
#[derive(Clone, Debug)]
struct Batch {
    tokens: Tensor<3>,
    labels: Tensor<1, Int>,
    halves: ZeroShotSplit,
}

#[derive(Clone, Default)]
struct TokenBatcher;

impl Batcher<Item, Batch> for TokenBatcher {
    fn batch(&self, items: Vec<Item>, device: &Device) -> Batch {
        let count = items.len();
        let (first, second): (Vec<usize>, Vec<usize>) =
            (0..count).partition(|&i| items[i].label < CLASSES / 2);
        let tokens: Vec<f32> = items.iter().flat_map(|item| item.tokens.clone()).collect();
        let labels: Vec<i64> = items.iter().map(|item| item.label as i64).collect();
        Batch {
            tokens: Tensor::from_data(TensorData::new(tokens, [count, TOKENS, CHANNELS]), device),
            labels: Tensor::from_data(TensorData::new(labels, [count]), device),
            halves: ZeroShotSplit::Indices(first, second),
        }
    }
}

/// Pooling, a linear classifier, and for GSP the zero-shot loss on its attributes.
#[derive(Module, Debug)]
struct Net {
    pooling: Pooling,
    classifier: Linear,
    zero_shot: Option<ZeroShotLoss>,
    /// The loss sums the samples' cross-entropies instead of averaging them: a sum over a
    /// batch split across devices is the sum of the devices' sums.
    sum_over_batch: bool,
}

impl Net {
    fn new(
        pooling: &PoolingConfig,
        zero_shot: bool,
        sum_over_batch: bool,
        device: &Device,
    ) -> Self {
        let zero_shot = zero_shot.then(|| {
            let PoolingConfig::Gsp(gsp) = pooling else {
                panic!("ZeroShotLoss trains GSP's attributes")
            };
            ZeroShotLossConfig::new(CLASSES, gsp.num_prototypes).init(device)
        });
        Self {
            pooling: pooling.init(device),
            classifier: LinearConfig::new(pooling.output_channels(CHANNELS), CLASSES).init(device),
            zero_shot,
            sum_over_batch,
        }
    }

    /// Cross-entropy (mean or sum over the batch), plus 0.1 · `ZeroShotLoss` when there is one.
    fn classify(&self, batch: Batch) -> ClassificationOutput {
        let (pooled, attributes) = match self.pooling.as_gsp() {
            Some(gsp) => {
                let out = gsp.forward_detailed(batch.tokens);
                (out.pooled, Some(out.attributes))
            }
            None => (self.pooling.forward_tokens(batch.tokens), None),
        };
        let logits = self.classifier.forward(pooled);
        let per_sample = cross_entropy(logits.clone(), batch.labels.clone());
        let mut loss = if self.sum_over_batch {
            per_sample.sum()
        } else {
            per_sample.mean()
        };
        if let (Some(zero_shot), Some(attributes)) = (&self.zero_shot, attributes) {
            loss = loss.mul_scalar(0.9)
                + zero_shot
                    .forward(attributes, batch.labels.clone(), &batch.halves)
                    .mul_scalar(0.1);
        }
        ClassificationOutput::new(loss, logits, batch.labels)
    }
}

/// −log softmax(logits)[label] per sample, `[B]`.
fn cross_entropy(logits: Tensor<2>, labels: Tensor<1, Int>) -> Tensor<1> {
    let one_hot = labels.one_hot(CLASSES).float();
    (log_softmax(logits, 1) * one_hot)
        .sum_dim(1)
        .squeeze_dim::<1>(1)
        .neg()
}

impl TrainStep for Net {
    type Input = Batch;
    type Output = ClassificationOutput;

    fn step(&self, batch: Batch) -> TrainOutput<ClassificationOutput> {
        let output = self.classify(batch);
        TrainOutput::new(self, output.loss.backward(), output)
    }
}

impl InferenceStep for Net {
    type Input = Batch;
    type Output = ClassificationOutput;

    fn step(&self, batch: Batch) -> ClassificationOutput {
        self.classify(batch)
    }
}

fn loader(items: Vec<Item>, batch_size: usize, device: &Device) -> Arc<dyn DataLoader<Batch>> {
    DataLoaderBuilder::new(TokenBatcher)
        .batch_size(batch_size)
        .set_device(device.clone())
        .build(InMemDataset::new(items))
}

/// A burn-train run: `SupervisedTraining` over `train` and `valid` in batches of `batch_size`
/// for `epochs` epochs, the loss metric on both splits, logs in a temporary directory
/// (removed afterwards).
struct Fit<'a> {
    name: &'a str,
    train: &'a [Item],
    valid: &'a [Item],
    batch_size: usize,
    epochs: usize,
}

impl Fit<'_> {
    /// Trains `net` with `optimizer` at learning rate `lr` on `strategy` (one device, the
    /// net's, when `None`), checks that the loss metric was logged for both splits, and
    /// returns the trained net.
    fn run(
        &self,
        net: Net,
        optimizer: ModuleOptimizer,
        lr: f64,
        strategy: Option<ExecutionStrategy>,
    ) -> Net {
        let directory = TempDir::new(self.name);
        let device = net.devices()[0].clone();
        let mut training = SupervisedTraining::new(
            directory.root(),
            loader(self.train.to_vec(), self.batch_size, &device),
            loader(self.valid.to_vec(), self.batch_size, &device),
        )
        .metric_train_numeric(LossMetric::new())
        .metric_valid_numeric(LossMetric::new())
        .with_application_logger(None)
        .num_epochs(self.epochs);
        if let Some(strategy) = strategy {
            training = training.with_training_strategy(TrainingStrategy::Default(strategy));
        }
        let result = training.launch(Learner::new(net, optimizer, lr));
        assert!(result.error.is_none(), "{}: {:?}", self.name, result.error);
        for split in ["train", "valid"] {
            let epoch = format!("epoch-{}", self.epochs);
            let log = directory.path(split).join(epoch).join("Loss.log");
            assert!(log.exists(), "{}: no {}", self.name, log.display());
        }
        result.model
    }
}

/// A tensor's values.
fn flat<const D: usize>(tensor: Tensor<D>) -> Vec<f32> {
    tensor.into_data().try_to_vec::<f32>().unwrap()
}

/// The pooling's parameter (GeM's p, GSP's prototypes) flattened.
fn pooling_parameter(net: &Net) -> Vec<f32> {
    match &net.pooling {
        Pooling::Gem(gem) => flat(gem.p.val()),
        Pooling::Gsp(gsp) => flat(gsp.prototypes.val()),
        other => panic!("no parameter in {}", other.name()),
    }
}

/// Mean cross-entropy of `net` over `items` (one batch, no autodiff).
fn mean_cross_entropy(net: &Net, items: &[Item]) -> f32 {
    let device = Device::flex();
    let net = net.valid();
    let batch = TokenBatcher.batch(items.to_vec(), &device);
    let pooled = net.pooling.forward_tokens(batch.tokens);
    cross_entropy(net.classifier.forward(pooled), batch.labels)
        .mean()
        .into_scalar()
}

fn largest_difference(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The heads of both tests: GeM (p = 3), and GSP with one prototype per class.
fn gem_and_gsp() -> [(&'static str, PoolingConfig); 2] {
    let gsp = GspConfig::new(CHANNELS)
        .with_num_prototypes(CLASSES)
        .with_transport_ratio(0.5)
        .with_epsilon(0.1);
    [
        ("gem", PoolingConfig::Gem(GemConfig::new())),
        ("gsp", PoolingConfig::Gsp(gsp)),
    ]
}

/// GeM and GSP + `ZeroShotLoss` heads trained by burn-train's `Learner` (Adam, 6 epochs of 16
/// batches of 8, loss metric on both splits): the mean cross-entropy over the training set
/// falls to below half, and the powers, prototypes and class embeddings moved.
#[test]
fn learner_trains_gem_and_gsp_with_zero_shot_loss() {
    let device = Device::flex().autodiff();
    let train = items(128, 3);
    let valid = items(32, 4);
    for (name, pooling) in gem_and_gsp() {
        device.seed(11);
        // GSP with its zero-shot loss.
        let zero_shot = matches!(pooling, PoolingConfig::Gsp(_));
        let net = Net::new(&pooling, zero_shot, false, &device);
        let before = mean_cross_entropy(&net, &train);
        let fit = Fit {
            name: &format!("learner-{name}"),
            train: &train,
            valid: &valid,
            batch_size: 8,
            epochs: 6,
        };
        let trained = fit.run(net.clone(), AdamConfig::new().init(), 2e-2, None);
        let after = mean_cross_entropy(&trained, &train);
        println!("Learner, {name}: mean cross-entropy {before:.4} -> {after:.4}");
        assert!(
            after < 0.5 * before,
            "{name}: the loss did not fall enough: {before} -> {after}"
        );
        let moved = largest_difference(&pooling_parameter(&net), &pooling_parameter(&trained));
        assert!(
            moved > 1e-3,
            "{name}: the pooling's parameter did not change ({moved})"
        );
        if let (Some(initial), Some(learned)) = (&net.zero_shot, &trained.zero_shot) {
            let initial = flat(initial.embeddings.val());
            let moved = largest_difference(&initial, &flat(learned.embeddings.val()));
            assert!(
                moved > 1e-3,
                "{name}: the class embeddings did not change ({moved})"
            );
        }
    }
}

/// The multi-device test needs two distinct devices: Flex has one, so Flex and NdArray.
#[cfg(feature = "ndarray")]
mod multi_device {
    use super::*;
    use burn::optim::{GradientsParams, SgdConfig};
    use burn::train::MultiDeviceOptim;

    /// Every parameter of the net flattened, pooling first.
    fn parameters(net: &Net) -> Vec<f32> {
        let mut values = pooling_parameter(net);
        values.extend(flat(net.classifier.weight.val()));
        values.extend(flat(net.classifier.bias.as_ref().unwrap().val()));
        values
    }

    /// burn-train's `ExecutionStrategy::MultiDevice` on Flex and NdArray (one worker each, the
    /// optimizer on Flex) against the single-device computation it stands for.
    ///
    /// burn-train splits the training set into one contiguous slice per device (items 0..32 and
    /// 32..64 here), each worker computes the gradients of its own batch of 8, and the main
    /// device **sums** them before one optimizer step. With a loss that sums over the batch, that
    /// is the gradient of the sum over the 16 items of both batches, so the reference is a plain
    /// loop on Flex alone over batches of 16 (items 8t..8t+8 and 32+8t..32+8t+8), with the same
    /// SGD steps. SGD keeps the comparison linear in the gradients (Adam's first steps are
    /// ±lr whatever the gradient's size, which would amplify float noise).
    ///
    /// The two runs differ only in rounding: NdArray runs the portable composites, Flex its fused
    /// kernels, f32 both. After 8 steps every parameter must agree within 1e-6 absolute (they are
    /// O(0.1–3); measured: 1.5e-8 for GeM, 3.0e-8 for GSP), while training moved them by up to
    /// 6–8e-2: averaging instead of summing the devices' gradients, or pairing other items,
    /// would be off by about 1e-2.
    #[test]
    fn multi_device_training_equals_the_summed_single_device_steps() {
        const PER_DEVICE: usize = 8;
        const HALF: usize = 32;
        const EPOCHS: usize = 2;
        const LR: f64 = 5e-3;
        let flex = Device::flex().autodiff();
        let train = items(2 * HALF, 5);
        let valid = items(8, 6);
        for (name, pooling) in gem_and_gsp() {
            flex.seed(13);
            let initial = Net::new(&pooling, false, true, &flex);

            let fit = Fit {
                name: &format!("multi-device-{name}"),
                train: &train,
                valid: &valid,
                batch_size: PER_DEVICE,
                epochs: EPOCHS,
            };
            #[allow(deprecated)] // NdArray is deprecated in Burn 0.22, still supported here.
            let devices = vec![Device::flex(), Device::ndarray()];
            let strategy =
                ExecutionStrategy::MultiDevice(devices, MultiDeviceOptim::OptimMainDevice);
            let trained = fit.run(initial.clone(), SgdConfig::new().init(), LR, Some(strategy));
            let multi = parameters(&trained);

            // The reference: one device, both devices' batches at once, the summed loss.
            let mut net = initial.clone();
            let mut optimizer = SgdConfig::new().init();
            for _ in 0..EPOCHS {
                for step in 0..HALF / PER_DEVICE {
                    let first = step * PER_DEVICE..(step + 1) * PER_DEVICE;
                    let second = HALF + step * PER_DEVICE..HALF + (step + 1) * PER_DEVICE;
                    let batch: Vec<Item> =
                        train[first].iter().chain(&train[second]).cloned().collect();
                    let loss = net.classify(TokenBatcher.batch(batch, &flex)).loss;
                    let grads = GradientsParams::from_grads(loss.backward(), &net);
                    net = optimizer.step(LR, net, grads);
                }
            }
            let single = parameters(&net);

            let error = largest_difference(&multi, &single);
            let moved = largest_difference(&parameters(&initial), &single);
            println!(
                "MultiDevice [Flex, NdArray] vs one device, {name}: largest parameter difference \
                 {error:.3e} (the parameters moved by up to {moved:.3e})"
            );
            assert!(
                moved > 1e-2,
                "{name}: training barely moved the parameters ({moved})"
            );
            assert!(
                error < 1e-6,
                "{name}: multi-device differs from single-device by {error}"
            );
        }
    }
}
