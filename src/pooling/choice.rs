//! One config and one module for every layer: the pooling of a model chosen at run time, e.g.
//! from a JSON config file (what timm's `global_pool = "avg" | "max" | ...` does).

use burn::config::Config;
use burn::module::Module;
use burn::tensor::{Device, Tensor};

use super::input::PoolingInput;
use super::{AttentionPool, AttentionPoolConfig, SimPool, SimPoolConfig};
use super::{
    Gap, GapConfig, GapGmp, GapGmpCombine, GapGmpConfig, Gem, GemConfig, Gmp, GmpConfig, GroupGem,
    GroupGemConfig, Gsp, GspConfig, Lse, LseConfig, TokenPooling, TokenPoolingConfig,
};
use super::{NetVlad, NetVladConfig};
use super::{OtAggregation, OtAggregationConfig};
use super::{Otk, OtkConfig};

/// The configuration of any pooling layer of this crate: one variant per layer, holding that
/// layer's config. Serialises as `{"<Variant>": {<the layer's config>}}`.
///
/// ```rust
/// # use burn::config::Config;
/// # use burn::tensor::{Device, Tensor};
/// use burn_pooling::{GemConfig, PoolingConfig};
///
/// let device = Device::flex();
/// let config = PoolingConfig::Gem(GemConfig::new().with_p(4.0));
/// let json = config.to_string(); // {"Gem": {"p": 4.0, ...}}
/// let pooling = PoolingConfig::load_binary(json.as_bytes()).unwrap().init(&device);
/// let maps = Tensor::<4>::ones([2, 16, 7, 7], &device);
/// assert_eq!(pooling.forward(maps).dims(), [2, 16]);
/// ```
#[derive(Config, Debug)]
pub enum PoolingConfig {
    /// Global average pooling, [`Gap`] (timm's `avg`).
    Gap(GapConfig),
    /// Global max pooling, [`Gmp`] (timm's `max`).
    Gmp(GmpConfig),
    /// GAP + GMP, summed or concatenated, [`GapGmp`] (timm's `avgmax` up to a factor 1/2, and
    /// `catavgmax`).
    GapGmp(GapGmpConfig),
    /// Generalized mean pooling, [`Gem`].
    Gem(GemConfig),
    /// Group generalized mean pooling, [`GroupGem`].
    GroupGem(GroupGemConfig),
    /// Generalized sum pooling, [`Gsp`].
    Gsp(GspConfig),
    /// Log-sum-exp pooling or its softmax-weighted mean, [`Lse`] (timm's `LsePlus`).
    Lse(LseConfig),
    /// Token modes concatenated, [`TokenPooling`] (sentence-transformers' `Pooling`).
    TokenPooling(TokenPoolingConfig),
    /// Multi-head attention pooling from learned latents, [`AttentionPool`] (MAP: SigLIP's
    /// head, timm's `AttentionPoolLatent`).
    AttentionPool(AttentionPoolConfig),
    /// Attention pooling with the mean as query, [`SimPool`] (timm's `SimPool1d/2d`).
    SimPool(SimPoolConfig),
    /// NetVLAD, [`NetVlad`]: output K·C.
    NetVlad(NetVladConfig),
    /// The optimal-transport kernel embedding, [`Otk`]: output p·heads·C.
    Otk(OtkConfig),
    /// SALAD's optimal-transport aggregation, [`OtAggregation`]: output m·l (+ the global
    /// token's width).
    OtAggregation(OtAggregationConfig),
}

impl PoolingConfig {
    /// Creates the chosen layer on `device` (the parameter-free layers ignore it).
    ///
    /// # Panics
    ///
    /// As the chosen layer's `init` does on an invalid config.
    pub fn init(&self, device: &Device) -> Pooling {
        match self {
            Self::Gap(config) => Pooling::Gap(config.init()),
            Self::Gmp(config) => Pooling::Gmp(config.init()),
            Self::GapGmp(config) => Pooling::GapGmp(config.init()),
            Self::Gem(config) => Pooling::Gem(config.init(device)),
            Self::GroupGem(config) => Pooling::GroupGem(config.init(device)),
            Self::Gsp(config) => Pooling::Gsp(config.init(device)),
            Self::Lse(config) => Pooling::Lse(config.init(device)),
            Self::TokenPooling(config) => Pooling::TokenPooling(config.init()),
            Self::AttentionPool(config) => Pooling::AttentionPool(config.init(device)),
            Self::SimPool(config) => Pooling::SimPool(config.init(device)),
            Self::NetVlad(config) => Pooling::NetVlad(config.init(device)),
            Self::Otk(config) => Pooling::Otk(config.init(device)),
            Self::OtAggregation(config) => Pooling::OtAggregation(config.init(device)),
        }
    }

    /// The width of the pooled output for inputs of `channels` channels: `channels`, except
    /// for the concatenating [`GapGmp`] (2 · `channels`), [`TokenPooling`] (one block of
    /// `channels` per mode), a projecting [`Gsp`] (its `projection` width D) and [`NetVlad`]
    /// (K · `channels`, whatever its config's `channels` says), [`OtAggregation`] (m·l, plus
    /// its global token's width, whatever `channels` is), and [`Otk`] (p · heads ·
    /// `channels`, likewise). Size the
    /// next layer with it.
    pub fn output_channels(&self, channels: usize) -> usize {
        match self {
            Self::GapGmp(config) if config.combine == GapGmpCombine::Concat => 2 * channels,
            Self::TokenPooling(config) => config.output_channels(channels),
            Self::Gsp(config) => config.projection.unwrap_or(channels),
            Self::NetVlad(config) => config.num_clusters * channels,
            Self::Otk(config) => config.num_references * config.heads * channels,
            Self::OtAggregation(config) => config.output_channels(),
            _ => channels,
        }
    }
}

/// Any pooling layer of this crate, as one [`Module`]: what [`PoolingConfig::init`] gives.
/// It has the layers' entry points, [`forward`](Self::forward) (maps, tokens or a
/// [`PoolingInput`]) and [`forward_tokens`](Self::forward_tokens), and records, loads and
/// trains as the layer it holds.
///
/// # Shapes
///
/// - input: maps `[B, C, H, W]`, tokens `[B, N, C]`, or a [`PoolingInput`] with a `[B, N]`
///   mask
/// - output: `[B, C]`, `[B, 2C]` for a concatenating [`GapGmp`], `[B, modes·C]` for
///   [`TokenPooling`], `[B, D]` for a [`Gsp`] projecting to D, `[B, p·heads·C]` for [`Otk`]
// AttentionPool's seven linear layers make its variant the largest; a model holds one `Pooling`,
// so the size is not worth a Box (which the Module derive would have to see through).
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Pooling {
    /// [`Gap`].
    Gap(Gap),
    /// [`Gmp`].
    Gmp(Gmp),
    /// [`GapGmp`].
    GapGmp(GapGmp),
    /// [`Gem`].
    Gem(Gem),
    /// [`GroupGem`].
    GroupGem(GroupGem),
    /// [`Gsp`].
    Gsp(Gsp),
    /// [`Lse`].
    Lse(Lse),
    /// [`TokenPooling`].
    TokenPooling(TokenPooling),
    /// [`AttentionPool`].
    AttentionPool(AttentionPool),
    /// [`SimPool`].
    SimPool(SimPool),
    /// [`NetVlad`].
    NetVlad(NetVlad),
    /// [`Otk`].
    Otk(Otk),
    /// [`OtAggregation`].
    OtAggregation(OtAggregation),
}

impl Pooling {
    /// Pools feature maps `[B, C, H, W]`, a token set `[B, N, C]` (skipping the layer's
    /// `num_prefix_tokens` tokens) or any [`PoolingInput`] (masked, with its own prefix) with
    /// the layer it holds.
    ///
    /// # Panics
    ///
    /// As that layer's `forward` does.
    pub fn forward(&self, input: impl Into<PoolingInput>) -> Tensor<2> {
        let input = input.into();
        match self {
            Self::Gap(layer) => layer.forward(input),
            Self::Gmp(layer) => layer.forward(input),
            Self::GapGmp(layer) => layer.forward(input),
            Self::Gem(layer) => layer.forward(input),
            Self::GroupGem(layer) => layer.forward(input),
            Self::Gsp(layer) => layer.forward(input),
            Self::Lse(layer) => layer.forward(input),
            Self::TokenPooling(layer) => layer.forward(input),
            Self::AttentionPool(layer) => layer.forward(input),
            Self::SimPool(layer) => layer.forward(input),
            Self::NetVlad(layer) => layer.forward(input),
            Self::Otk(layer) => layer.forward(input),
            Self::OtAggregation(layer) => layer.forward(input),
        }
    }

    /// [`forward`](Self::forward) for a token set `[B, N, C]`, spelled out.
    pub fn forward_tokens(&self, tokens: Tensor<3>) -> Tensor<2> {
        self.forward(tokens)
    }

    /// The [`Gsp`] layer, if this is one: for [`Gsp::forward_detailed`] (the attributes of
    /// [`ZeroShotLoss`](crate::loss::ZeroShotLoss)) and
    /// [`Gsp::init_prototypes_kcenter`].
    pub fn as_gsp(&self) -> Option<&Gsp> {
        match self {
            Self::Gsp(gsp) => Some(gsp),
            _ => None,
        }
    }

    /// The layer's name, as in its `Display`: `"Gap"`, `"Gmp"`, `"GapGmp"`, `"Gem"`,
    /// `"GroupGem"`, `"Gsp"`, `"Lse"`, `"TokenPooling"`, `"AttentionPool"`, `"SimPool"`,
    /// `"NetVlad"`, `"Otk"` or `"OtAggregation"`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Gap(_) => "Gap",
            Self::Gmp(_) => "Gmp",
            Self::GapGmp(_) => "GapGmp",
            Self::Gem(_) => "Gem",
            Self::GroupGem(_) => "GroupGem",
            Self::Gsp(_) => "Gsp",
            Self::Lse(_) => "Lse",
            Self::TokenPooling(_) => "TokenPooling",
            Self::AttentionPool(_) => "AttentionPool",
            Self::SimPool(_) => "SimPool",
            Self::NetVlad(_) => "NetVlad",
            Self::Otk(_) => "Otk",
            Self::OtAggregation(_) => "OtAggregation",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pooling::{LseOutput, TokenMode};
    use burn::tensor::{Bool, Distribution, TensorData, Tolerance};

    /// Every variant, with settings that differ from the defaults where a layer has any.
    fn every_config() -> Vec<PoolingConfig> {
        vec![
            PoolingConfig::Gap(GapConfig::new().with_num_prefix_tokens(1)),
            PoolingConfig::Gmp(GmpConfig::new().with_num_prefix_tokens(1)),
            PoolingConfig::GapGmp(
                GapGmpConfig::new()
                    .with_combine(GapGmpCombine::Concat)
                    .with_num_prefix_tokens(1),
            ),
            PoolingConfig::Gem(GemConfig::new().with_p(2.5).with_num_prefix_tokens(1)),
            PoolingConfig::GroupGem(GroupGemConfig::new(2).with_p(4.0).with_num_prefix_tokens(1)),
            PoolingConfig::Gsp(
                GspConfig::new(4)
                    .with_num_prototypes(3)
                    .with_transport_ratio(0.5)
                    .with_num_prefix_tokens(1),
            ),
            PoolingConfig::Lse(
                LseConfig::new()
                    .with_r(3.0)
                    .with_output(LseOutput::SoftmaxMean)
                    .with_num_prefix_tokens(1),
            ),
            PoolingConfig::TokenPooling(
                TokenPoolingConfig::new(vec![TokenMode::Cls, TokenMode::Last, TokenMode::Mean])
                    .with_num_prefix_tokens(1),
            ),
            PoolingConfig::AttentionPool(
                AttentionPoolConfig::new(4)
                    .with_num_heads(2)
                    .with_latent_len(2)
                    .with_num_prefix_tokens(1),
            ),
            PoolingConfig::SimPool(
                SimPoolConfig::new(4)
                    .with_gamma(Some(2.0))
                    .with_num_prefix_tokens(1),
            ),
            PoolingConfig::NetVlad(
                NetVladConfig::new(4)
                    .with_num_clusters(3)
                    .with_version(crate::pooling::NetVladVersion::V2)
                    .with_alpha(2.0)
                    .with_num_prefix_tokens(1),
            ),
            PoolingConfig::Otk(
                OtkConfig::new(4)
                    .with_num_references(3)
                    .with_heads(2)
                    .with_epsilon(0.5)
                    .with_num_prefix_tokens(1),
            ),
            // m = 1: the test's masked sample keeps 2 tokens after the prefix (N > m).
            PoolingConfig::OtAggregation(
                OtAggregationConfig::new(4)
                    .with_num_clusters(1)
                    .with_cluster_dim(3)
                    .with_hidden_dim(5)
                    .with_token_dim(None)
                    .with_sinkhorn(crate::pooling::OtSinkhorn::Fixed { iterations: 3 }),
            ),
        ]
    }

    /// The layer the config describes, built directly, with the parameters of `pooling` (not
    /// by re-seeding: tests running beside this one draw from the same device generator):
    /// what `Pooling` must agree with.
    fn direct(
        config: &PoolingConfig,
        pooling: &Pooling,
        tokens: Tensor<3>,
        mask: Tensor<2, Bool>,
    ) -> Tensor<2> {
        let device = tokens.device();
        let input = || PoolingInput::tokens(tokens.clone()).with_mask(mask.clone());
        // The config's own layer, holding the parameters `pooling` was initialised with.
        macro_rules! with_parameters {
            ($config:expr, $variant:ident) => {{
                let Pooling::$variant(layer) = pooling else {
                    panic!("{} is not a {}", pooling.name(), stringify!($variant))
                };
                $config
                    .init(&device)
                    .load_record(layer.clone().into_record())
                    .forward(input())
            }};
        }
        match config {
            PoolingConfig::Gap(c) => c.init().forward(input()),
            PoolingConfig::Gmp(c) => c.init().forward(input()),
            PoolingConfig::GapGmp(c) => c.init().forward(input()),
            PoolingConfig::Gem(c) => with_parameters!(c, Gem),
            PoolingConfig::GroupGem(c) => with_parameters!(c, GroupGem),
            PoolingConfig::Gsp(c) => with_parameters!(c, Gsp),
            PoolingConfig::Lse(c) => with_parameters!(c, Lse),
            PoolingConfig::TokenPooling(c) => c.init().forward(input()),
            PoolingConfig::AttentionPool(c) => with_parameters!(c, AttentionPool),
            PoolingConfig::SimPool(c) => with_parameters!(c, SimPool),
            PoolingConfig::NetVlad(c) => with_parameters!(c, NetVlad),
            PoolingConfig::Otk(c) => with_parameters!(c, Otk),
            PoolingConfig::OtAggregation(c) => with_parameters!(c, OtAggregation),
        }
    }

    /// Each config survives a JSON round trip, and the module it gives pools as the layer it
    /// names (with the same parameters), with the layer's prefix and the input's mask.
    #[test]
    fn every_variant_round_trips_and_pools_as_its_layer() {
        let device = Device::flex();
        let names = [
            "Gap",
            "Gmp",
            "GapGmp",
            "Gem",
            "GroupGem",
            "Gsp",
            "Lse",
            "TokenPooling",
            "AttentionPool",
            "SimPool",
            "NetVlad",
            "Otk",
            "OtAggregation",
        ];
        for (config, name) in every_config().into_iter().zip(names) {
            let json = config.to_string();
            assert!(json.contains(&format!("\"{name}\"")), "{json}");
            let loaded = PoolingConfig::load_binary(json.as_bytes()).unwrap();
            assert_eq!(loaded.to_string(), json);

            let tokens = Tensor::<3>::random([2, 5, 4], Distribution::Uniform(0.1, 2.0), &device);
            let mask = Tensor::<2, Bool>::from_bool(
                TensorData::from([[true; 5], [true, true, false, true, false]]),
                &device,
            );
            let pooling = loaded.init(&device);
            assert_eq!(pooling.name(), name);
            assert!(format!("{pooling}").contains(name), "{pooling}");
            let pooled =
                pooling.forward(PoolingInput::tokens(tokens.clone()).with_mask(mask.clone()));
            assert_eq!(pooled.dims(), [2, config.output_channels(4)]);
            pooled.into_data().assert_approx_eq::<f32>(
                &direct(&config, &pooling, tokens.clone(), mask).into_data(),
                Tolerance::default(),
            );
            // forward_tokens = forward of the bare token set.
            pooling
                .forward_tokens(tokens.clone())
                .into_data()
                .assert_approx_eq::<f32>(
                    &pooling.forward(tokens).into_data(),
                    Tolerance::default(),
                );
        }
    }

    #[test]
    fn parameters_and_the_gsp_accessor() {
        let device = Device::flex();
        let counts: Vec<usize> = every_config()
            .iter()
            .map(|config| config.init(&device).num_params())
            .collect();
        // AttentionPool (C = 4, L = 2, hidden 16): latents 8, 4 linears of 20, LN 8, MLP 80 + 68.
        // SimPool: LN 8, two linears of 16. NetVlad (K = 3, C = 4): centroids, assignment, bias.
        assert_eq!(
            counts,
            [
                0,
                0,
                0,
                1,
                2,
                12,
                1,
                0,
                244,
                40,
                3 * 4 + 3 * 4 + 3,
                2 * 3 * 4,
                // OtAggregation (C = 4, hidden 5, l = 3, m = 1): 2·(4·5 + 5) + (5·3 + 3) + (5 + 1) + z.
                50 + 18 + 6 + 1
            ]
        );
        let gsp = PoolingConfig::Gsp(GspConfig::new(4).with_num_prototypes(3)).init(&device);
        assert!(gsp.as_gsp().is_some());
        assert!(
            PoolingConfig::Gap(GapConfig::new())
                .init(&device)
                .as_gsp()
                .is_none()
        );
    }

    /// The panic message of `f`, which must panic.
    fn panic_message(f: impl FnOnce()) -> String {
        let payload =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).expect_err("a panic");
        payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default()
    }

    /// B = 0 on every layer and CPU backend, maps, tokens and masked tokens, with and without
    /// autodiff: an empty `[0, C]` (`[0, 2C]` concatenated), and a backward that gives the
    /// input an empty gradient.
    #[test]
    fn an_empty_batch_gives_an_empty_result_and_gradient() {
        for (backend, base) in crate::test_support::cpu_devices() {
            #[cfg(feature = "autodiff")]
            let devices = [base.clone(), base.autodiff()];
            #[cfg(not(feature = "autodiff"))]
            let devices = [base];
            for device in devices {
                for config in every_config() {
                    let pooling = config.init(&device);
                    let width = config.output_channels(4);
                    let case = format!("{backend} {}", pooling.name());
                    let maps = Tensor::<4>::zeros([0, 4, 3, 2], &device);
                    let tokens = Tensor::<3>::zeros([0, 5, 4], &device);
                    let mask = Tensor::<2, Bool>::empty([0, 5], &device);
                    let inputs = [
                        PoolingInput::maps(maps.clone()),
                        PoolingInput::tokens(tokens.clone()),
                        PoolingInput::tokens(tokens).with_mask(mask),
                    ];
                    for input in inputs {
                        assert_eq!(pooling.forward(input).dims(), [0, width], "{case}");
                    }
                    if device.is_autodiff() {
                        let maps = maps.require_grad();
                        let grads = pooling.forward(maps.clone()).sum().backward();
                        let grad = maps.grad(&grads).expect("a gradient");
                        assert_eq!(grad.dims(), [0, 4, 3, 2], "{case}");
                    }
                }
                let gsp = GspConfig::new(4).with_num_prototypes(3).init(&device);
                let out = gsp.forward_detailed(Tensor::<3>::zeros([0, 5, 4], &device));
                assert_eq!(out.weights.dims(), [0, 5]);
                assert_eq!(out.attributes.dims(), [0, 3]);
                assert!(out.converged.into_scalar::<bool>());
            }
        }
    }

    /// Maps with H or W = 0 and token sets with N = 0 panic naming the layer and the empty
    /// dimension, on every layer and CPU backend, before any tensor op.
    #[test]
    fn empty_positions_panic_naming_the_layer() {
        for (backend, device) in crate::test_support::cpu_devices() {
            for config in every_config() {
                let pooling = config.init(&device);
                let name = pooling.name();
                for (height, width) in [(3, 0), (0, 2)] {
                    let maps = Tensor::<4>::zeros([2, 4, height, width], &device);
                    let message = panic_message(|| {
                        pooling.forward(maps);
                    });
                    let expected = format!(
                        "{name}: the input map has no positions to pool: expected H·W > 0, got H = {height}, W = {width}"
                    );
                    assert_eq!(message, expected, "{backend}");
                }
                let tokens = Tensor::<3>::zeros([2, 0, 4], &device);
                let message = panic_message(|| {
                    pooling.forward(PoolingInput::tokens(tokens).with_prefix_tokens(0));
                });
                assert!(
                    message.starts_with(&format!("{name}: no token left to pool")),
                    "{backend}: {message}"
                );
            }
        }
    }

    /// An input on another device than the layer's parameters (or a mask on another device
    /// than the input) panics naming the layer and both devices.
    #[cfg(feature = "ndarray")]
    #[test]
    #[allow(deprecated)] // NdArray is deprecated in Burn 0.22, still supported here.
    fn a_device_mismatch_names_the_layer_and_both_devices() {
        let (flex, ndarray) = (Device::flex(), Device::ndarray());
        for config in every_config() {
            let pooling = config.init(&flex);
            let name = pooling.name();
            let tokens = Tensor::<3>::ones([2, 5, 4], &flex);
            let mask = Tensor::<2, Bool>::from_data([[true; 5]; 2], &ndarray);
            let message = panic_message(|| {
                pooling.forward(PoolingInput::tokens(tokens).with_mask(mask));
            });
            assert!(
                message.starts_with(&format!(
                    "{name}: device mismatch: the input on Device<Flex"
                )) && message.contains("the mask on Device<NdArray"),
                "{message}"
            );
            if matches!(
                config,
                PoolingConfig::Gem(_)
                    | PoolingConfig::GroupGem(_)
                    | PoolingConfig::Gsp(_)
                    | PoolingConfig::AttentionPool(_)
                    | PoolingConfig::SimPool(_)
                    | PoolingConfig::NetVlad(_)
                    | PoolingConfig::Otk(_)
                    | PoolingConfig::OtAggregation(_)
            ) {
                let tokens = Tensor::<3>::ones([2, 5, 4], &ndarray);
                let message = panic_message(|| {
                    pooling.forward(tokens);
                });
                assert!(
                    message.starts_with(&format!(
                        "{name}: device mismatch: the input on Device<NdArray"
                    )) && message.contains("the parameters on Device<Flex"),
                    "{message}"
                );
            }
        }
    }

    #[test]
    #[should_panic(expected = "Gem: `p` must be a finite number > 0, got -1")]
    fn invalid_config_panics_as_the_layer() {
        PoolingConfig::Gem(GemConfig::new().with_p(-1.0)).init(&Device::flex());
    }

    /// A projecting GSP with a read-out and the max branch through `PoolingConfig`: JSON round
    /// trip, `output_channels` = D, the module pools into D as the layer does; a stored GSP
    /// config without the new fields still loads.
    #[test]
    fn a_projecting_gsp_round_trips_and_pools_into_d() {
        use crate::pooling::GspReadout;
        let device = Device::flex();
        let config = PoolingConfig::Gsp(
            GspConfig::new(4)
                .with_num_prototypes(3)
                .with_projection(Some(6))
                .with_readout(GspReadout::Max)
                .with_max_branch(true),
        );
        let json = config.to_string();
        let loaded = PoolingConfig::load_binary(json.as_bytes()).unwrap();
        assert_eq!(loaded.to_string(), json);
        assert_eq!(loaded.output_channels(4), 6);
        let tokens = Tensor::<3>::random([2, 5, 4], Distribution::Uniform(0.1, 2.0), &device);
        let pooling = loaded.init(&device);
        assert_eq!(pooling.num_params(), 3 * 6 + 4 * 6);
        let pooled = pooling.forward(tokens.clone());
        assert_eq!(pooled.dims(), [2, 6]);
        let (PoolingConfig::Gsp(gsp), Pooling::Gsp(layer)) = (&config, &pooling) else {
            unreachable!()
        };
        // The original config's layer with the loaded module's parameters.
        let direct = gsp.init(&device).load_record(layer.clone().into_record());
        pooled
            .into_data()
            .assert_approx_eq::<f32>(&direct.forward(tokens).into_data(), Tolerance::default());
        let old = r#"{"Gsp": {"channels": 4, "num_prototypes": 3, "transport_ratio": 0.3,
            "epsilon": 0.2, "max_iterations": 100, "tolerance": 1e-6, "solver": "Newton",
            "initializer": {"XavierUniform": {"gain": 1.0}}, "num_prefix_tokens": 0}}"#;
        let old = PoolingConfig::load_binary(old.as_bytes()).unwrap();
        assert_eq!(old.output_channels(4), 4);
        assert_eq!(old.init(&device).num_params(), 12);
    }
}
