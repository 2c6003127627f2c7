//! A short training run: on sets where half the positions carry the class and half are
//! class-independent nuisance, a few hundred Adam steps on a classification loss move GSP's
//! weight mass onto the informative positions. The prototypes start next to the nuisance.

use crate::common;
use burn::module::{Module, Param};
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};
use burn_pooling::PoolingInput;
use burn_pooling::{Gsp, GspConfig};
use common::Rng;

pub const CLASSES: usize = 4;
const INFORMATIVE: usize = 4;
const NUISANCE: usize = 4;
pub const POSITIONS: usize = INFORMATIVE + NUISANCE;
pub const CHANNELS: usize = 8;
const BATCH: usize = 32;

#[derive(Module, Debug)]
struct Head {
    gsp: Gsp,
    classifier: Param<Tensor<2>>,
}

/// One token set `[N, C]` of `class`, flattened: the informative positions first (the class's
/// direction in channels 0..4, plus noise), then the nuisance (noise in the other channels).
/// Also the data of `learner.rs`.
pub fn token_set(rng: &mut Rng, class: usize) -> Vec<f32> {
    let mut values = Vec::with_capacity(POSITIONS * CHANNELS);
    for position in 0..POSITIONS {
        for channel in 0..CHANNELS {
            let value = if position < INFORMATIVE {
                let signal = if channel == class { 0.8 } else { 0.0 };
                signal + rng.uniform(-0.15, 0.15)
            } else if channel >= CLASSES {
                rng.uniform(-0.9, 0.9)
            } else {
                rng.uniform(-0.15, 0.15)
            };
            values.push(value as f32);
        }
    }
    values
}

/// Tokens `[B, N, C]` (informative positions first) and labels.
fn batch(rng: &mut Rng, device: &Device) -> (Tensor<3>, Tensor<1, Int>) {
    let mut values = Vec::with_capacity(BATCH * POSITIONS * CHANNELS);
    let mut labels = Vec::with_capacity(BATCH);
    for b in 0..BATCH {
        let class = b % CLASSES;
        labels.push(class as i64);
        values.extend(token_set(rng, class));
    }
    (
        Tensor::from_data(
            TensorData::new(values, [BATCH, POSITIONS, CHANNELS]),
            device,
        ),
        Tensor::from_data(TensorData::new(labels, [BATCH]), device),
    )
}

/// Mean share of GSP's weight on the informative positions.
fn informative_share(head: &Head, rng: &mut Rng, device: &Device) -> f32 {
    let (tokens, _) = batch(rng, device);
    let weights = head
        .gsp
        .forward_detailed(PoolingInput::tokens(tokens))
        .weights;
    weights
        .slice([0..BATCH, 0..INFORMATIVE])
        .sum_dim(1)
        .mean()
        .into_scalar()
}

#[test]
fn gsp_learns_to_weight_the_informative_positions() {
    let device = Device::flex().autodiff();
    let mut rng = Rng::new(41);
    let gsp = GspConfig::new(CHANNELS)
        .with_num_prototypes(CLASSES)
        .with_transport_ratio(0.5)
        .with_epsilon(0.05)
        .init(&device);
    // Prototypes among the nuisance: zero in the class channels, random elsewhere.
    let start: Vec<f32> = (0..CLASSES * CHANNELS)
        .map(|i| {
            if i % CHANNELS < CLASSES {
                0.0
            } else {
                rng.uniform(-0.5, 0.5) as f32
            }
        })
        .collect();
    let gsp = Gsp {
        prototypes: Param::from_tensor(Tensor::from_data(
            TensorData::new(start, [CLASSES, CHANNELS]),
            &device,
        )),
        ..gsp
    };
    let mut head = Head {
        gsp,
        classifier: Param::from_tensor(Tensor::zeros([CHANNELS, CLASSES], &device)),
    };
    let before = informative_share(&head, &mut rng, &device);

    let mut optimizer = AdamConfig::new().init();
    let mut last_loss = f32::NAN;
    for _ in 0..300 {
        let (tokens, labels) = batch(&mut rng, &device);
        let logits = head
            .gsp
            .forward_tokens(tokens)
            .matmul(head.classifier.val());
        let loss = log_softmax(logits, 1)
            .gather(1, labels.unsqueeze_dim(1))
            .mean()
            .neg();
        last_loss = loss.clone().into_scalar();
        let grads = GradientsParams::from_grads(loss.backward(), &head);
        head = optimizer.step(0.05, head, grads);
    }
    let after = informative_share(&head, &mut rng, &device);
    println!(
        "informative weight share: {before:.3} before, {after:.3} after; final loss {last_loss:.3}"
    );
    assert!(
        before < 0.5,
        "the start should not favour the informative positions: {before}"
    );
    assert!(
        after > 0.8,
        "training should move the mass: {before} -> {after}"
    );
}
