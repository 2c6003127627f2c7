//! Property tests of the identities in docs/maths.md §1 and docs/maths.md §3, in f64 on Flex.

use crate::{common, reference};
use burn::module::Param;
use burn::tensor::{Bool, Device, Tensor, TensorData};
use burn_pooling::PoolingInput;
use burn_pooling::transport::{TransportSettings, TransportSolver, partial_transport};
use burn_pooling::{GapConfig, GemConfig, GroupGemConfig, Gsp, GspConfig};
use common::{assert_close, flex_f64, tensor, values};
use proptest::prelude::*;

/// `[B, N, C]` values in [lo, hi) with the dims, from proptest.
fn token_batch(lo: f64, hi: f64) -> impl Strategy<Value = (Vec<f64>, [usize; 3])> {
    (1usize..3, 1usize..7, 1usize..5).prop_flat_map(move |(b, n, c)| {
        prop::collection::vec(lo..hi, b * n * c).prop_map(move |v| (v, [b, n, c]))
    })
}

fn gsp_layer(prototypes: Vec<f64>, k: usize, c: usize, mu: f64, eps: f64, device: &Device) -> Gsp {
    let layer = GspConfig::new(c)
        .with_num_prototypes(k)
        .with_transport_ratio(mu)
        .with_epsilon(eps)
        .with_tolerance(1e-12)
        .init(device);
    Gsp {
        prototypes: Param::from_tensor(tensor(prototypes, [k, c], device)),
        ..layer
    }
}

fn settings(mu: f64, eps: f64) -> TransportSettings {
    TransportSettings {
        transport_ratio: mu,
        epsilon: eps,
        max_iterations: 100,
        tolerance: 1e-12,
        solver: TransportSolver::Newton,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn gem_with_p_one_is_gap_on_positive_input((x, dims) in token_batch(0.01, 5.0)) {
        let device = flex_f64();
        let x = tensor(x, dims, &device);
        let gem = GemConfig::new().with_p(1.0).init(&device).forward_tokens(x.clone());
        let gap = GapConfig::new().init().forward_tokens(x);
        assert_close(&values(gem), &values(gap), 1e-12, 1e-14, "GeM(p=1) vs GAP");
    }

    #[test]
    fn mean_le_gem_le_max((x, dims) in token_batch(-1.0, 5.0), p in 1.0f64..50.0) {
        let device = flex_f64();
        let x = tensor(x, dims, &device).clamp_min(1e-6);
        let gem = values(GemConfig::new().with_p(p).init(&device).forward_tokens(x.clone()));
        let mean = values(x.clone().mean_dim(1));
        let max = values(x.max_dim(1));
        for i in 0..gem.len() {
            prop_assert!(mean[i] <= gem[i] * (1.0 + 1e-12) && gem[i] <= max[i] * (1.0 + 1e-12),
                "{} <= {} <= {}", mean[i], gem[i], max[i]);
        }
    }

    #[test]
    fn gem_is_positively_homogeneous((x, dims) in token_batch(0.1, 5.0), p in 0.5f64..20.0, alpha in 0.1f64..10.0) {
        let device = flex_f64();
        let x = tensor(x, dims, &device);
        let gem = GemConfig::new().with_p(p).init(&device);
        let scaled = values(gem.forward_tokens(x.clone().mul_scalar(alpha)));
        let expected: Vec<f64> = values(gem.forward_tokens(x)).iter().map(|v| v * alpha).collect();
        assert_close(&scaled, &expected, 1e-11, 1e-14, "GeM(αx) vs αGeM(x)");
    }

    #[test]
    fn group_gem_with_one_group_is_gem((x, dims) in token_batch(-1.0, 4.0), p in 0.5f64..30.0) {
        let device = flex_f64();
        let x = tensor(x, dims, &device);
        let ggem = GroupGemConfig::new(1).with_p(p).init(&device).forward_tokens(x.clone());
        let gem = GemConfig::new().with_p(p).init(&device).forward_tokens(x);
        assert_close(&values(ggem), &values(gem), 1e-13, 1e-15, "GGeM(G=1) vs GeM");
    }

    #[test]
    fn group_gem_with_c_groups_is_per_channel_gem(
        (x, dims) in token_batch(0.0, 4.0),
        powers in prop::collection::vec(0.5f64..20.0, 4),
        interleaved in any::<bool>(),
    ) {
        let device = flex_f64();
        let [b, n, c] = dims;
        let layout = if interleaved { burn_pooling::GroupLayout::Interleaved } else { burn_pooling::GroupLayout::Contiguous };
        let mut ggem = GroupGemConfig::new(c).with_layout(layout).init(&device);
        ggem.p = Param::from_tensor(tensor(powers[..c].to_vec(), [c], &device));
        let out = values(ggem.forward_tokens(tensor(x.clone(), dims, &device)));
        for bi in 0..b {
            for ci in 0..c {
                let channel: Vec<f64> = (0..n).map(|ni| x[(bi * n + ni) * c + ci]).collect();
                let expected = reference::gem_channel(&channel, powers[ci], 1e-6);
                assert_close(&[out[bi * c + ci]], &[expected], 1e-11, 1e-14, "per-channel GeM");
            }
        }
    }

    #[test]
    fn masked_pooling_is_pooling_of_the_valid_subset(
        (x, dims) in token_batch(-1.0, 3.0),
        keep in prop::collection::vec(any::<bool>(), 6),
        p in 1.0f64..8.0,
    ) {
        let device = flex_f64();
        let [b, n, c] = dims;
        let mut keep = keep[..n].to_vec();
        keep[0] = true; // at least one valid position
        let valid: Vec<usize> = (0..n).filter(|&i| keep[i]).collect();
        let subset: Vec<f64> = (0..b)
            .flat_map(|bi| valid.iter().flat_map(move |&ni| (0..c).map(move |ci| (bi, ni, ci))))
            .map(|(bi, ni, ci)| x[(bi * n + ni) * c + ci])
            .collect();
        let full = tensor(x, dims, &device);
        let subset = tensor(subset, [b, valid.len(), c], &device);
        let mask = Tensor::<2, Bool>::from_bool(TensorData::new(keep.repeat(b), [b, n]), &device);

        let gap = GapConfig::new().init();
        assert_close(&values(gap.forward(PoolingInput::tokens(full.clone()).with_mask(mask.clone()))),
            &values(gap.forward_tokens(subset.clone())), 1e-12, 1e-14, "GAP");
        let gem = GemConfig::new().with_p(p).init(&device);
        assert_close(&values(gem.forward(PoolingInput::tokens(full.clone()).with_mask(mask.clone()))),
            &values(gem.forward_tokens(subset.clone())), 1e-12, 1e-14, "GeM");
        let ggem = GroupGemConfig::new(1).with_p(p).init(&device);
        assert_close(&values(ggem.forward(PoolingInput::tokens(full.clone()).with_mask(mask.clone()))),
            &values(ggem.forward_tokens(subset.clone())), 1e-12, 1e-14, "GGeM");
        let gsp = gsp_layer(vec![0.3; 2 * c], 2, c, 0.4, 0.2, &device);
        assert_close(&values(gsp.forward(PoolingInput::tokens(full).with_mask(mask))),
            &values(gsp.forward_tokens(subset)), 1e-9, 1e-11, "GSP");
    }

    #[test]
    fn map_and_token_paths_agree((x, dims) in token_batch(-1.0, 3.0), p in 1.0f64..8.0) {
        let device = flex_f64();
        let [b, n, c] = dims;
        let tokens = tensor(x, dims, &device);
        let maps = tokens.clone().swap_dims(1, 2).reshape([b, c, 1, n]);
        let gem = GemConfig::new().with_p(p).init(&device);
        assert_close(&values(gem.forward(maps.clone())), &values(gem.forward_tokens(tokens.clone())), 1e-12, 1e-14, "GeM");
        let gap = GapConfig::new().init();
        assert_close(&values(gap.forward(maps.clone())), &values(gap.forward_tokens(tokens.clone())), 1e-12, 1e-14, "GAP");
        let ggem = GroupGemConfig::new(c).with_p(p).init(&device);
        assert_close(&values(ggem.forward(maps.clone())), &values(ggem.forward_tokens(tokens.clone())), 1e-12, 1e-14, "GGeM");
        let gsp = gsp_layer(vec![0.2; 3 * c], 3, c, 0.3, 0.2, &device);
        assert_close(&values(gsp.forward(maps)), &values(gsp.forward_tokens(tokens)), 1e-10, 1e-12, "GSP");
    }

    /// μ = 1 (exactly, and 1 − 1e-6) transports everything: GSP is GAP.
    #[test]
    fn gsp_with_full_transport_is_gap((x, dims) in token_batch(-2.0, 2.0), protos in prop::collection::vec(-1.0f64..1.0, 12)) {
        let device = flex_f64();
        let [_, _, c] = dims;
        let x = tensor(x, dims, &device);
        let gap = values(GapConfig::new().init().forward_tokens(x.clone()));
        let exact = gsp_layer(protos[..3 * c].to_vec(), 3, c, 1.0, 0.2, &device);
        assert_close(&values(exact.forward_tokens(x.clone())), &gap, 1e-12, 1e-12, "μ = 1");
        let near = gsp_layer(protos[..3 * c].to_vec(), 3, c, 1.0 - 1e-6, 0.2, &device);
        assert_close(&values(near.forward_tokens(x)), &gap, 1e-5, 1e-5, "μ = 1 − 1e-6");
    }

    /// ε → ∞ and identical features also give GAP.
    #[test]
    fn gsp_is_gap_for_huge_epsilon_and_for_identical_features(
        (x, dims) in token_batch(-2.0, 2.0),
        protos in prop::collection::vec(-1.0f64..1.0, 12),
        mu in 0.05f64..0.95,
    ) {
        let device = flex_f64();
        let [b, n, c] = dims;
        let x = tensor(x, dims, &device);
        let protos = protos[..3 * c].to_vec();
        let gap = values(GapConfig::new().init().forward_tokens(x.clone()));
        let flat = gsp_layer(protos.clone(), 3, c, mu, 1e7, &device);
        assert_close(&values(flat.forward_tokens(x.clone())), &gap, 1e-6, 1e-6, "ε = 1e7");
        let same = x.slice([0..b, 0..1, 0..c]).expand([b, n, c]);
        let gap = values(GapConfig::new().init().forward_tokens(same.clone()));
        let gsp = gsp_layer(protos, 3, c, mu, 0.2, &device);
        assert_close(&values(gsp.forward_tokens(same)), &gap, 1e-12, 1e-12, "identical features");
    }

    /// Permuting positions permutes the weights and leaves the output unchanged.
    #[test]
    fn gsp_is_permutation_invariant((x, dims) in token_batch(-2.0, 2.0), protos in prop::collection::vec(-1.0f64..1.0, 12), shift in 1usize..6) {
        let device = flex_f64();
        let [b, n, c] = dims;
        let gsp = gsp_layer(protos[..3 * c].to_vec(), 3, c, 0.3, 0.2, &device);
        let x = tensor(x, dims, &device);
        let rolled = x.clone().roll_dim(shift as i64, 1);
        let a = gsp.forward_detailed(PoolingInput::tokens(x));
        let r = gsp.forward_detailed(PoolingInput::tokens(rolled));
        assert_close(&values(r.pooled), &values(a.pooled), 1e-10, 1e-12, "pooled");
        assert_close(&values(r.weights), &values(a.weights.roll_dim(shift as i64, 1)), 1e-10, 1e-12, "weights");
        let _ = (b, n);
    }

    /// On random costs: the constraints hold and a constant added to all costs changes nothing.
    #[test]
    fn transport_constraints_hold_and_cost_shift_is_invisible(
        costs in prop::collection::vec(0.0f64..2.0, 2 * 3 * 5),
        mu in 0.01f64..0.99,
        eps in 0.02f64..2.0,
        shift in -3.0f64..3.0,
    ) {
        let device = flex_f64();
        let costs = tensor(costs, [2, 3, 5], &device);
        let mass = Tensor::<2>::full([2, 5], 0.2, &device);
        let plan = partial_transport(costs.clone(), mass.clone(), &settings(mu, eps)).plan;
        let shifted = partial_transport(costs.add_scalar(shift), mass, &settings(mu, eps)).plan;
        assert_close(&values(shifted), &values(plan.clone()), 1e-9, 1e-12, "shifted costs");
        let v = values(plan);
        for b in 0..2 {
            let at = |k: usize, j: usize| v[(b * 4 + k) * 5 + j];
            let transported: f64 = (1..4).flat_map(|k| (0..5).map(move |j| (k, j))).map(|(k, j)| at(k, j)).sum();
            assert_close(&[transported], &[mu], 1e-10, 1e-12, "Σ P = μ");
            for j in 0..5 {
                let column: f64 = (0..4).map(|k| at(k, j)).sum();
                assert_close(&[column], &[0.2], 1e-12, 1e-14, "ρ + Σ_k P = a");
                prop_assert!((0..4).all(|k| at(k, j) >= 0.0));
            }
        }
    }

    #[test]
    fn gsp_weights_and_attributes_are_distributions((x, dims) in token_batch(-3.0, 3.0), protos in prop::collection::vec(-1.0f64..1.0, 12), mu in 0.01f64..1.0, eps in 0.01f64..1.0) {
        let device = flex_f64();
        let [b, _, c] = dims;
        let gsp = gsp_layer(protos[..3 * c].to_vec(), 3, c, mu, eps, &device);
        let out = gsp.forward_detailed(PoolingInput::tokens(tensor(x, dims, &device)));
        prop_assert!(values(out.weights.clone()).iter().all(|&w| w >= 0.0));
        assert_close(&values(out.weights.sum_dim(1)), &vec![1.0; b], 1e-10, 1e-12, "Σ w");
        assert_close(&values(out.attributes.sum_dim(1)), &vec![1.0; b], 1e-10, 1e-12, "Σ z");
    }

    /// With `num_prefix_tokens = 1` every layer ignores the first token entirely.
    #[test]
    fn every_layer_skips_prefix_tokens((x, dims) in token_batch(-1.0, 3.0), class_token in -50.0f64..50.0) {
        let device = flex_f64();
        let [b, n, c] = dims;
        let patches = tensor(x, dims, &device);
        let with_class = Tensor::cat(vec![Tensor::full([b, 1, c], class_token, &device), patches.clone()], 1);
        let gap = GapConfig::new().with_num_prefix_tokens(1).init();
        assert_close(&values(gap.forward_tokens(with_class.clone())), &values(GapConfig::new().init().forward_tokens(patches.clone())), 1e-12, 1e-14, "GAP");
        let gem = GemConfig::new().with_num_prefix_tokens(1).init(&device);
        assert_close(&values(gem.forward_tokens(with_class.clone())), &values(GemConfig::new().init(&device).forward_tokens(patches.clone())), 1e-12, 1e-14, "GeM");
        let ggem = GroupGemConfig::new(c).with_num_prefix_tokens(1).init(&device);
        assert_close(&values(ggem.forward_tokens(with_class.clone())), &values(GroupGemConfig::new(c).init(&device).forward_tokens(patches.clone())), 1e-12, 1e-14, "GGeM");
        let gsp = gsp_layer(vec![0.25; 2 * c], 2, c, 0.3, 0.2, &device);
        let gsp_prefixed = Gsp { num_prefix_tokens: 1, ..gsp_layer(vec![0.25; 2 * c], 2, c, 0.3, 0.2, &device) };
        let mask = Tensor::<2, Bool>::from_bool(TensorData::new(vec![true; b * (n + 1)], [b, n + 1]), &device);
        assert_close(&values(gsp_prefixed.forward(PoolingInput::tokens(with_class).with_mask(mask))), &values(gsp.forward_tokens(patches)), 1e-10, 1e-12, "GSP");
    }
}
