//! Parameters round-trip through Burn records (burnpack files), configs through JSON.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::tensor::{Device, Tensor, TensorData};
use burn_pooling::loss::ZeroShotLossConfig;
use burn_pooling::transport::TransportSolver;
use burn_pooling::{GemConfig, GroupGemConfig, GroupLayout, GspConfig};

use crate::common::TempDir;

fn same(a: Tensor<1>, b: Tensor<1>) {
    a.into_data().assert_eq(&b.into_data(), true);
}

#[test]
fn parameters_round_trip_through_burnpack() {
    let dir = TempDir::new("records-burnpack");
    let device = Device::flex();

    let mut gem = GemConfig::new().init(&device);
    gem.p = Param::from_tensor(Tensor::from_floats([4.25], &device));
    let saved = gem.p.val();
    gem.save_file(dir.path("gem.bpk")).unwrap();
    let loaded = GemConfig::new()
        .init(&device)
        .load_file(dir.path("gem.bpk"));
    same(loaded.p.val(), saved);

    let mut ggem = GroupGemConfig::new(3).init(&device);
    ggem.p = Param::from_tensor(Tensor::from_floats([1.5, 2.5, 6.0], &device));
    let saved = ggem.p.val();
    ggem.save_file(dir.path("ggem.bpk")).unwrap();
    let loaded = GroupGemConfig::new(3)
        .init(&device)
        .load_file(dir.path("ggem.bpk"));
    same(loaded.p.val(), saved);

    let gsp = GspConfig::new(5).with_num_prototypes(3).init(&device);
    let saved = gsp.prototypes.val().reshape([15]);
    gsp.save_file(dir.path("gsp.bpk")).unwrap();
    let loaded = GspConfig::new(5)
        .with_num_prototypes(3)
        .init(&device)
        .load_file(dir.path("gsp.bpk"));
    same(loaded.prototypes.val().reshape([15]), saved);

    let zsr = ZeroShotLossConfig::new(4, 2).init(&device);
    let saved = zsr.embeddings.val().reshape([8]);
    zsr.save_file(dir.path("zsr.bpk")).unwrap();
    let loaded = ZeroShotLossConfig::new(4, 2)
        .init(&device)
        .load_file(dir.path("zsr.bpk"));
    same(loaded.embeddings.val().reshape([8]), saved);
}

#[test]
fn configs_round_trip_through_json() {
    let dir = TempDir::new("records-json");
    let gem = GemConfig::new()
        .with_p(2.5)
        .with_eps(1e-5)
        .with_learnable(false);
    gem.save(dir.path("gem.json")).unwrap();
    let back = GemConfig::load(dir.path("gem.json")).unwrap();
    assert_eq!((back.p, back.eps, back.learnable), (2.5, 1e-5, false));

    let ggem = GroupGemConfig::new(12)
        .with_layout(GroupLayout::Interleaved)
        .with_num_prefix_tokens(1);
    ggem.save(dir.path("ggem.json")).unwrap();
    let back = GroupGemConfig::load(dir.path("ggem.json")).unwrap();
    assert_eq!(back.groups, 12);
    assert_eq!(back.layout, GroupLayout::Interleaved);
    assert_eq!(back.num_prefix_tokens, 1);

    let gsp = GspConfig::new(512)
        .with_num_prototypes(128)
        .with_transport_ratio(0.4)
        .with_epsilon(2.0)
        .with_solver(TransportSolver::Sinkhorn);
    gsp.save(dir.path("gsp.json")).unwrap();
    let back = GspConfig::load(dir.path("gsp.json")).unwrap();
    assert_eq!((back.channels, back.num_prototypes), (512, 128));
    assert_eq!((back.transport_ratio, back.epsilon), (0.4, 2.0));
    assert_eq!(back.solver, TransportSolver::Sinkhorn);
    assert_eq!((back.max_iterations, back.tolerance), (100, 1e-6));

    let zsr = ZeroShotLossConfig::new(100, 128).with_ridge(0.1);
    let back = ZeroShotLossConfig::load_binary(zsr.to_string().as_bytes()).unwrap();
    assert_eq!(
        (
            back.num_classes,
            back.embedding_dim,
            back.ridge,
            back.logit_scale
        ),
        (100, 128, 0.1, 9.5)
    );
    let _ = TensorData::from([0.0f32]);
}

/// A `Pooling` saves and loads as the layer it holds: its `PoolingConfig` through JSON, its
/// parameters through burnpack, and the reloaded module pools the same.
#[test]
fn pooling_round_trips_through_json_and_burnpack() {
    use burn_pooling::{PoolingConfig, PoolingInput};
    let dir = TempDir::new("records-pooling");
    let device = Device::flex();
    let config = PoolingConfig::Gsp(GspConfig::new(4).with_num_prototypes(3));
    std::fs::write(dir.path("pooling.json"), config.to_string()).unwrap();
    device.seed(1);
    let pooling = config.init(&device);
    pooling.clone().save_file(dir.path("pooling.bpk")).unwrap();

    let loaded_config = PoolingConfig::load(dir.path("pooling.json")).unwrap();
    device.seed(2); // other prototypes, until the record replaces them
    let fresh = loaded_config.init(&device);
    let tokens = Tensor::<3>::from_data(
        TensorData::new(
            (0..24).map(|i| (i as f32 * 0.37).sin()).collect(),
            [2, 3, 4],
        ),
        &device,
    );
    let before = fresh.forward(PoolingInput::tokens(tokens.clone()));
    let loaded = fresh.load_file(dir.path("pooling.bpk"));
    let (expected, got) = (pooling.forward(tokens.clone()), loaded.forward(tokens));
    got.clone()
        .into_data()
        .assert_eq(&expected.into_data(), true);
    assert!(
        before.sub(got).abs().max().into_scalar::<f32>() > 1e-4,
        "the record should have changed the prototypes"
    );
}

/// MAP (two latents, its optional LayerNorm on) and SimPool (with β) save and load through
/// burnpack inside a `Pooling`: a fresh layer from another seed pools as the saved one once
/// the record is loaded, β included.
#[test]
fn attention_layers_round_trip_through_burnpack() {
    use burn_pooling::{AttentionPoolConfig, PoolingConfig, PoolingInput, SimPoolConfig};
    let dir = TempDir::new("records-attention");
    let device = Device::flex();
    let tokens = Tensor::<3>::from_data(
        TensorData::new(
            (0..48).map(|i| (i as f32 * 0.37).sin()).collect(),
            [2, 3, 8],
        ),
        &device,
    );
    for (name, config) in [
        (
            "map",
            PoolingConfig::AttentionPool(
                AttentionPoolConfig::new(8)
                    .with_num_heads(2)
                    .with_latent_len(2),
            ),
        ),
        (
            "simpool",
            PoolingConfig::SimPool(
                SimPoolConfig::new(8)
                    .with_gamma(Some(1.25))
                    .with_learnable_shift(true),
            ),
        ),
    ] {
        device.seed(1);
        let mut pooling = config.init(&device);
        if let burn_pooling::Pooling::SimPool(pool) = &mut pooling {
            pool.beta = Some(Param::from_tensor(Tensor::from_floats([0.4], &device)));
        }
        let path = dir.path(&format!("{name}.bpk"));
        pooling.clone().save_file(&path).unwrap();
        device.seed(2);
        let fresh = config.init(&device);
        let before = fresh.forward(PoolingInput::tokens(tokens.clone()));
        let loaded = fresh.load_file(&path);
        let (expected, got) = (
            pooling.forward(tokens.clone()),
            loaded.forward(tokens.clone()),
        );
        got.clone()
            .into_data()
            .assert_eq(&expected.into_data(), true);
        assert!(
            before.sub(got).abs().max().into_scalar::<f32>() > 1e-4,
            "{name}: the record should have changed the parameters"
        );
    }
}
