//! A tour of the crate's layers on a tiny synthetic task, on Flex (CPU).
//!
//! Each image is a 6×6 map with 8 channels: a few "object" positions carry a class-specific
//! pattern, the others clutter. We pool with GAP, GeM and GSP and report how well a nearest
//! class-mean classifier separates the pooled vectors; then every other layer of the crate,
//! built from its `PoolingConfig` at its initial parameters (untrained: this shows the API and
//! the output widths, not what training would give); then a gradient reaching GeM's p.
//!
//! Run: `cargo run --release --example pooling_tour`

use burn::tensor::{Device, Distribution, Tensor};
use burn_pooling::{
    AttentionPoolConfig, GapConfig, GapGmpCombine, GapGmpConfig, GemConfig, GmpConfig,
    GroupGemConfig, GspConfig, LseConfig, NetVladConfig, OtAggregationConfig, OtkConfig,
    PoolingConfig, SimPoolConfig, TokenMode, TokenPoolingConfig,
};

const CLASSES: usize = 4;
const PER_CLASS: usize = 16;
const CHANNELS: usize = 8;
const SIDE: usize = 6;

/// Maps `[CLASSES·PER_CLASS, C, SIDE, SIDE]` and their labels.
fn make_data(device: &Device) -> (Tensor<4>, Vec<usize>) {
    let patterns =
        Tensor::<2>::random([CLASSES, CHANNELS], Distribution::Uniform(0.0, 3.0), device);
    let batch = CLASSES * PER_CLASS;
    let clutter = Tensor::<4>::random(
        [batch, CHANNELS, SIDE, SIDE],
        Distribution::Uniform(0.0, 3.0),
        device,
    );
    let labels: Vec<usize> = (0..batch).map(|i| i % CLASSES).collect();
    // The object: the first 6 positions of the first row band.
    let mut maps = clutter;
    for (i, &label) in labels.iter().enumerate() {
        let pattern = patterns
            .clone()
            .slice([label..label + 1, 0..CHANNELS])
            .reshape([1, CHANNELS, 1, 1])
            .expand([1, CHANNELS, 1, SIDE]);
        maps = maps.slice_assign([i..i + 1, 0..CHANNELS, 0..1, 0..SIDE], pattern);
    }
    (maps, labels)
}

/// Fraction of samples whose nearest class mean (cosine) is their own class.
fn nearest_mean_accuracy(pooled: Tensor<2>, labels: &[usize]) -> f64 {
    let [_, width] = pooled.dims();
    let norms = pooled.clone().square().sum_dim(1).sqrt().clamp_min(1e-12);
    let unit = pooled / norms;
    let rows: Vec<Vec<f32>> = unit
        .into_data()
        .try_to_vec::<f32>()
        .unwrap()
        .chunks(width)
        .map(|r| r.to_vec())
        .collect();
    let mut means = vec![vec![0.0f32; width]; CLASSES];
    for (row, &label) in rows.iter().zip(labels) {
        for (m, v) in means[label].iter_mut().zip(row) {
            *m += v;
        }
    }
    let correct = rows
        .iter()
        .zip(labels)
        .filter(|(row, label)| {
            let score = |m: &Vec<f32>| m.iter().zip(row.iter()).map(|(a, b)| a * b).sum::<f32>();
            (0..CLASSES)
                .max_by(|&a, &b| score(&means[a]).total_cmp(&score(&means[b])))
                .unwrap()
                == **label
        })
        .count();
    correct as f64 / labels.len() as f64
}

fn main() {
    let device = Device::flex();
    device.seed(7);
    let (maps, labels) = make_data(&device);

    let gap = GapConfig::new().init();
    let gem = GemConfig::new().init(&device);
    let gsp = GspConfig::new(CHANNELS)
        .with_num_prototypes(4)
        .with_transport_ratio(0.3)
        .init(&device);
    // Prototypes from the data, as the reference does after its warm-up.
    let positions = maps
        .clone()
        .reshape([CLASSES * PER_CLASS, CHANNELS, SIDE * SIDE])
        .swap_dims(1, 2)
        .reshape([CLASSES * PER_CLASS * SIDE * SIDE, CHANNELS]);
    let gsp = gsp.init_prototypes_kcenter(positions);

    println!("layer  nearest-class-mean accuracy");
    println!(
        "GAP    {:.3}",
        nearest_mean_accuracy(gap.forward(maps.clone()), &labels)
    );
    println!(
        "GeM    {:.3}",
        nearest_mean_accuracy(gem.forward(maps.clone()), &labels)
    );
    let detailed = gsp.forward_detailed(maps.clone());
    println!(
        "GSP    {:.3}   ({} solver iterations)",
        nearest_mean_accuracy(detailed.pooled, &labels),
        detailed.iterations.into_scalar::<i64>()
    );
    let object_weight: f32 = detailed
        .weights
        .slice([0..CLASSES * PER_CLASS, 0..SIDE])
        .sum_dim(1)
        .mean()
        .into_scalar();
    println!(
        "GSP puts {:.1} % of its weight on the object's {} of {} positions",
        100.0 * object_weight,
        SIDE,
        SIDE * SIDE
    );

    // Every other layer from its `PoolingConfig` (as a model would read it from JSON), at its
    // initial parameters.
    let others = [
        PoolingConfig::Gmp(GmpConfig::new()),
        PoolingConfig::GapGmp(GapGmpConfig::new().with_combine(GapGmpCombine::Concat)),
        PoolingConfig::GroupGem(GroupGemConfig::new(2)),
        PoolingConfig::Lse(LseConfig::new()),
        PoolingConfig::TokenPooling(TokenPoolingConfig::new(vec![
            TokenMode::Mean,
            TokenMode::Max,
        ])),
        PoolingConfig::AttentionPool(AttentionPoolConfig::new(CHANNELS).with_num_heads(2)),
        PoolingConfig::SimPool(SimPoolConfig::new(CHANNELS)),
        PoolingConfig::NetVlad(NetVladConfig::new(CHANNELS).with_num_clusters(4)),
        PoolingConfig::Otk(OtkConfig::new(CHANNELS).with_num_references(4)),
        PoolingConfig::OtAggregation(
            OtAggregationConfig::new(CHANNELS)
                .with_num_clusters(4)
                .with_cluster_dim(4)
                .with_hidden_dim(16)
                .with_token_dim(None)
                .with_num_prefix_tokens(0),
        ),
    ];
    println!("\nevery other layer, untrained (output width, accuracy):");
    for config in others {
        let pooling = config.init(&device);
        let pooled = pooling.forward(maps.clone());
        println!(
            "{:<14} [B, {:>2}]  {:.3}",
            pooling.name(),
            config.output_channels(CHANNELS),
            nearest_mean_accuracy(pooled, &labels)
        );
    }

    // Gradients reach every learnable parameter on an autodiff device.
    let train = device.clone().autodiff();
    let gem = GemConfig::new().init(&train);
    let maps = Tensor::<4>::from_data(maps.into_data(), &train).require_grad();
    let grads = gem.forward(maps.clone()).sum().backward();
    let dp: f32 = gem.p.val().grad(&grads).unwrap().into_scalar();
    println!("∂(Σ GeM)/∂p = {dp:.4}");
}
