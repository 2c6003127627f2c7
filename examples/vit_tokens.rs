//! GGeM, GSP, MAP and SimPool as the pooling of a tiny transformer encoder over `[B, N, C]` tokens with a
//! class token and padding masks, compared with the class token itself and masked GAP.
//!
//! The data (generated): each sample is a set of 8–16 tokens (width 16), padded to 16 with
//! garbage. Each class is 3 "part" vectors drawn from a vocabulary of 24; a sample holds its
//! class's 3 parts (with noise) among 5–13 clutter tokens (uniform noise of about the same
//! norm), in random order. The encoder (token projection to 32, a learned class token, 2 pre-norm
//! layers with 4 heads) sees the padding through its `mask_pad`; the pooling sees it through
//! `forward_tokens_masked`:
//!
//! * class token: the encoder's output at position 0.
//! * GAP: `Gap::forward_tokens_masked` over the patch tokens.
//! * GGeM: `GroupGem` with one p per attention head (`groups = 4`) and `num_prefix_tokens = 1`,
//!   over all tokens with the mask (it skips the class token itself).
//! * GSP: `Gsp::forward_tokens_masked` over the patch tokens (GSP has no prefix option, so the
//!   class token is sliced off), 8 prototypes, μ = 0.3.
//! * MAP: `AttentionPool` (SigLIP's head) with 4 heads, one latent and its MLP, over all
//!   tokens with the mask and `num_prefix_tokens = 1`.
//! * SimPool: `SimPool` with the ViT setting γ = 1.25 and the learnable shift β, over all
//!   tokens with the mask and `num_prefix_tokens = 1`.
//!
//! Each head is trained from the same seed with a normalized-softmax proxy loss on the first
//! 16 classes and evaluated zero-shot (Recall@1, MAP@R) on the other 16.
//!
//! Run: `cargo run --release --example vit_tokens`

mod common;

use burn::module::{Module, Param};
use burn::nn::transformer::{
    TransformerEncoder, TransformerEncoderConfig, TransformerEncoderInput,
};
use burn::nn::{Initializer, Linear, LinearConfig};
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::activation::log_softmax;
use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use burn_pooling::PoolingInput;
use burn_pooling::{AttentionPool, AttentionPoolConfig, SimPool, SimPoolConfig};
use burn_pooling::{Gap, GapConfig, GroupGem, GroupGemConfig, Gsp, GspConfig};
use common::Rng;
use common::retrieval::{RetrievalMetrics, evaluate_tensor};
use indicatif::{ProgressBar, ProgressStyle};

const INPUT: usize = 16;
const WIDTH: usize = 32;
const HEADS: usize = 4;
const MAX_TOKENS: usize = 16;
const VOCABULARY: usize = 24;
const PARTS: usize = 3;
const CLASSES: usize = 32;
const TRAIN_CLASSES: usize = CLASSES / 2;
const STEPS: usize = 300;
const CLASSES_PER_BATCH: usize = 8;
const SAMPLES_PER_CLASS: usize = 8;
const TEST_PER_CLASS: usize = 30;

/// The generated task: the vocabulary and each class's parts.
struct Task {
    vocabulary: Vec<Vec<f32>>,
    classes: Vec<Vec<usize>>,
}

impl Task {
    fn new(rng: &mut Rng) -> Self {
        let vocabulary = (0..VOCABULARY)
            .map(|_| {
                let v: Vec<f32> = (0..INPUT).map(|_| rng.uniform(-1.0, 1.0)).collect();
                let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
                v.iter().map(|x| 2.0 * x / norm).collect()
            })
            .collect();
        let classes = (0..CLASSES)
            .map(|_| rng.choose(VOCABULARY, PARTS))
            .collect();
        Self {
            vocabulary,
            classes,
        }
    }

    /// Tokens `[B, MAX_TOKENS, INPUT]` and the validity mask `[B, MAX_TOKENS]` (true = token).
    fn batch(
        &self,
        labels: &[usize],
        rng: &mut Rng,
        device: &Device,
    ) -> (Tensor<3>, Tensor<2, Bool>) {
        let mut values = Vec::with_capacity(labels.len() * MAX_TOKENS * INPUT);
        let mut valid = Vec::with_capacity(labels.len() * MAX_TOKENS);
        for &label in labels {
            let count = 8 + rng.below(MAX_TOKENS - 8 + 1);
            // The class's parts at random positions, clutter elsewhere.
            let order = rng.choose(count, count);
            for &slot in &order {
                match self.classes[label].get(slot) {
                    Some(&part) => values.extend(
                        self.vocabulary[part]
                            .iter()
                            .map(|x| x + rng.uniform(-0.3, 0.3)),
                    ),
                    None => values.extend((0..INPUT).map(|_| rng.uniform(-1.0, 1.0))),
                }
            }
            // Padding: garbage that must not leak into the embedding.
            for _ in count..MAX_TOKENS {
                values.extend((0..INPUT).map(|_| rng.uniform(-5.0, 5.0)));
            }
            valid.extend((0..MAX_TOKENS).map(|position| position < count));
        }
        let batch = labels.len();
        (
            Tensor::from_data(TensorData::new(values, [batch, MAX_TOKENS, INPUT]), device),
            Tensor::from_data(TensorData::new(valid, [batch, MAX_TOKENS]), device),
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Head {
    ClassToken,
    Gap,
    GroupGem,
    Gsp,
    Map,
    SimPool,
}

impl Head {
    fn name(self) -> &'static str {
        match self {
            Self::ClassToken => "class token",
            Self::Gap => "GAP (masked)",
            Self::GroupGem => "GGeM (4 groups)",
            Self::Gsp => "GSP (K = 8)",
            Self::Map => "MAP (4 heads)",
            Self::SimPool => "SimPool (γ = 1.25 + β)",
        }
    }
}

#[derive(Module, Debug)]
struct Model {
    project: Linear,
    class_token: Param<Tensor<3>>,
    encoder: TransformerEncoder,
    gap: Option<Gap>,
    ggem: Option<GroupGem>,
    gsp: Option<Gsp>,
    map: Option<AttentionPool>,
    simpool: Option<SimPool>,
    embed: Linear,
    proxies: Param<Tensor<2>>,
}

impl Model {
    fn new(head: Head, device: &Device) -> Self {
        Self {
            project: LinearConfig::new(INPUT, WIDTH).init(device),
            class_token: Initializer::Normal {
                mean: 0.0,
                std: 0.02,
            }
            .init([1, 1, WIDTH], device),
            encoder: TransformerEncoderConfig::new(WIDTH, 2 * WIDTH, HEADS, 2)
                .with_dropout(0.0)
                .with_norm_first(true)
                .init(device),
            gap: (head == Head::Gap).then(|| GapConfig::new().init()),
            ggem: (head == Head::GroupGem).then(|| {
                GroupGemConfig::new(HEADS)
                    .with_num_prefix_tokens(1)
                    .init(device)
            }),
            gsp: (head == Head::Gsp).then(|| {
                GspConfig::new(WIDTH)
                    .with_num_prototypes(8)
                    .with_transport_ratio(0.3)
                    .init(device)
            }),
            map: (head == Head::Map).then(|| {
                AttentionPoolConfig::new(WIDTH)
                    .with_num_heads(HEADS)
                    .with_num_prefix_tokens(1)
                    .init(device)
            }),
            simpool: (head == Head::SimPool).then(|| {
                SimPoolConfig::new(WIDTH)
                    .with_gamma(Some(1.25))
                    .with_learnable_shift(true)
                    .with_num_prefix_tokens(1)
                    .init(device)
            }),
            embed: LinearConfig::new(WIDTH, WIDTH)
                .with_bias(false)
                .init(device),
            proxies: Initializer::XavierUniform { gain: 1.0 }.init_with(
                [TRAIN_CLASSES, WIDTH],
                Some(WIDTH),
                Some(TRAIN_CLASSES),
                device,
            ),
        }
    }

    /// Embeddings `[B, WIDTH]` of token sets `[B, N, INPUT]` with validity mask `[B, N]`.
    fn forward(&self, tokens: Tensor<3>, valid: Tensor<2, Bool>) -> Tensor<2> {
        let [batch, count, _] = tokens.dims();
        let device = tokens.device();
        let tokens = self.project.forward(tokens);
        let class = self.class_token.val().expand([batch, 1, WIDTH]);
        let tokens = Tensor::cat(vec![class, tokens], 1);
        // [B, 1 + N]: the class token is always valid.
        let valid = Tensor::cat(
            vec![Tensor::<2, Bool>::full([batch, 1], true, &device), valid],
            1,
        );
        // Burn's attention masks the positions where `mask_pad` is true: the padding.
        let out = self
            .encoder
            .forward(TransformerEncoderInput::new(tokens).mask_pad(valid.clone().bool_not()));
        let patches = || out.clone().slice([0..batch, 1..count + 1, 0..WIDTH]);
        let patch_valid = || valid.clone().slice([0..batch, 1..count + 1]);
        let pooled = if let Some(gap) = &self.gap {
            gap.forward(PoolingInput::tokens(patches()).with_mask(patch_valid()))
        } else if let Some(ggem) = &self.ggem {
            ggem.forward(PoolingInput::tokens(out.clone()).with_mask(valid.clone()))
        } else if let Some(gsp) = &self.gsp {
            gsp.forward(PoolingInput::tokens(patches()).with_mask(patch_valid()))
        } else if let Some(map) = &self.map {
            map.forward(PoolingInput::tokens(out.clone()).with_mask(valid.clone()))
        } else if let Some(simpool) = &self.simpool {
            simpool.forward(PoolingInput::tokens(out.clone()).with_mask(valid.clone()))
        } else {
            out.clone().slice([0..batch, 0..1, 0..WIDTH]).squeeze_dim(1)
        };
        self.embed.forward(pooled)
    }
}

fn train(head: Head, task: &Task, device: &Device) -> Model {
    device.seed(3);
    let mut model = Model::new(head, device);
    let mut optimizer = AdamConfig::new().init();
    let mut rng = Rng::new(11);
    let bar = ProgressBar::new(STEPS as u64)
        .with_style(
            ProgressStyle::default_bar()
                .template("{prefix:>15} [{bar:30}] {pos}/{len} {msg} ({elapsed} < {eta})")
                .expect("valid template")
                .progress_chars("=> "),
        )
        .with_prefix(head.name());
    for step in 0..STEPS {
        let labels: Vec<usize> = rng
            .choose(TRAIN_CLASSES, CLASSES_PER_BATCH)
            .into_iter()
            .flat_map(|c| std::iter::repeat_n(c, SAMPLES_PER_CLASS))
            .collect();
        let (tokens, valid) = task.batch(&labels, &mut rng, device);
        let targets = Tensor::<1, Int>::from_data(
            TensorData::new(
                labels.iter().map(|&l| l as i64).collect::<Vec<_>>(),
                [labels.len()],
            ),
            device,
        );
        let embeddings = common::l2_normalize(model.forward(tokens, valid));
        let logits = embeddings
            .matmul(common::l2_normalize(model.proxies.val()).transpose())
            .mul_scalar(16.0);
        let loss = log_softmax(logits, 1)
            .gather(1, targets.unsqueeze_dim(1))
            .mean()
            .neg();
        if step % 20 == 0 {
            bar.set_message(format!("loss {:.3}", loss.clone().into_scalar::<f32>()));
        }
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let lr = 2e-3 * 0.5 * (1.0 + (std::f64::consts::PI * step as f64 / STEPS as f64).cos());
        model = optimizer.step(lr, model, grads);
        bar.inc(1);
    }
    bar.finish();
    model
}

fn evaluate(model: &Model, task: &Task, device: &Device) -> RetrievalMetrics {
    let model = model.valid();
    let plain = device.clone().inner();
    let mut rng = Rng::new(5);
    let labels: Vec<usize> = (TRAIN_CLASSES..CLASSES)
        .flat_map(|c| std::iter::repeat_n(c, TEST_PER_CLASS))
        .collect();
    let (tokens, valid) = task.batch(&labels, &mut rng, &plain);
    evaluate_tensor(model.forward(tokens, valid), &labels)
}

fn main() {
    let device = Device::flex().autodiff();
    let task = Task::new(&mut Rng::new(2024));
    println!(
        "{CLASSES} classes ({TRAIN_CLASSES} train, {} held out), sets of 8–{MAX_TOKENS} tokens + a class token, {STEPS} steps",
        CLASSES - TRAIN_CLASSES
    );
    let mut rows = Vec::new();
    for head in [
        Head::ClassToken,
        Head::Gap,
        Head::GroupGem,
        Head::Gsp,
        Head::Map,
        Head::SimPool,
    ] {
        let model = train(head, &task, &device);
        let metrics = evaluate(&model, &task, &device);
        if let Some(ggem) = &model.ggem {
            let p: Vec<f32> = ggem
                .p
                .val()
                .into_data()
                .convert::<f32>()
                .try_into_vec()
                .unwrap();
            println!("GGeM's learned p per head: {p:.2?}");
        }
        rows.push((head, metrics));
    }
    println!();
    println!(
        "Zero-shot retrieval on {} unseen classes:",
        CLASSES - TRAIN_CLASSES
    );
    println!();
    println!("| pooling | Recall@1 (%) | MAP@R (%) |");
    println!("|---|---:|---:|");
    for (head, metrics) in rows {
        println!(
            "| {} | {:.2} | {:.2} |",
            head.name(),
            100.0 * metrics.recall_at_1,
            100.0 * metrics.map_at_r
        );
    }
}
