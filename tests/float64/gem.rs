//! GeM and GGeM gradients in f64 against central finite differences of the independent
//! reference (`tests/reference`), for both group layouts and masked tokens.

use crate::{common, reference};
use burn::module::Param;
use burn::tensor::{Bool, Tensor, TensorData};
use burn_pooling::PoolingInput;
use burn_pooling::{GemConfig, GroupGemConfig, GroupLayout};
use common::{Rng, assert_close, flex_f64, tensor, values};

const N: usize = 5;
const C: usize = 6;

/// L = Σ_c g_c y_c for a fixed random g: one scalar exercising every output.
fn weighted_sum(y: &[f64], g: &[f64]) -> f64 {
    y.iter().zip(g).map(|(a, b)| a * b).sum()
}

fn column(x: &[f64], c: usize, valid: &[bool]) -> Vec<f64> {
    (0..N).filter(|&n| valid[n]).map(|n| x[n * C + c]).collect()
}

/// The layer in f64 reproduces the reference table of docs/maths.md §1 (to its 10 digits).
#[test]
fn gem_reproduces_the_documented_values() {
    let device = flex_f64();
    let x = tensor(reference::GEM_DOC_X.to_vec(), [1, 1, 1, 4], &device);
    for (p, expected) in reference::GEM_DOC_VALUES {
        let y = GemConfig::new().with_p(p).init(&device).forward(x.clone());
        assert_close(&values(y), &[expected], 1e-10, 0.0, &format!("GeM p = {p}"));
    }
}

#[test]
fn gem_gradients_match_finite_differences() {
    let device = flex_f64().autodiff();
    let mut rng = Rng::new(21);
    let valid = [true, false, true, true, true];
    for p in [1.0, 3.0, 7.5, 40.0] {
        // Some values below the clamp: their gradient is 0 both ways.
        let x: Vec<f64> = (0..N * C).map(|_| rng.uniform(-0.3, 2.0)).collect();
        let g: Vec<f64> = (0..C).map(|_| rng.uniform(-1.0, 1.0)).collect();
        let layer = GemConfig::new().with_p(p).init(&device);
        let input = tensor(x.clone(), [1, N, C], &device).require_grad();
        let mask = Tensor::<2, Bool>::from_bool(TensorData::new(valid.to_vec(), [1, N]), &device);
        let y = layer.forward(PoolingInput::tokens(input.clone()).with_mask(mask));
        let grads = (y * tensor(g.clone(), [1, C], &device)).sum().backward();
        let dx = values(input.grad(&grads).unwrap());
        let dp = values(layer.p.val().grad(&grads).unwrap());

        let loss = |x: &[f64], p: f64| {
            let y: Vec<f64> = (0..C)
                .map(|c| reference::gem_channel(&column(x, c, &valid), p, 1e-6))
                .collect();
            weighted_sum(&y, &g)
        };
        let fd_x = reference::central_difference(&|v: &[f64]| loss(v, p), &x, 1e-6);
        let fd_p = reference::central_difference(&|v: &[f64]| loss(&x, v[0]), &[p], 1e-5);
        // Central differences straddle the clamp for values within h of ε: skip those.
        let fd_x: Vec<f64> = fd_x
            .iter()
            .zip(&x)
            .zip(&dx)
            .map(|((fd, &xv), &an)| if (xv - 1e-6).abs() < 1e-5 { an } else { *fd })
            .collect();
        assert_close(&dx, &fd_x, 1e-6, 1e-8, &format!("GeM p = {p}: dx"));
        assert_close(&dp, &fd_p, 1e-6, 1e-8, &format!("GeM p = {p}: dp"));
    }
}

#[test]
fn group_gem_gradients_match_finite_differences_in_both_layouts() {
    let device = flex_f64().autodiff();
    let mut rng = Rng::new(22);
    let all = [true; N];
    for layout in [GroupLayout::Contiguous, GroupLayout::Interleaved] {
        let interleaved = layout == GroupLayout::Interleaved;
        let powers = vec![1.5, 4.0, 9.0];
        let x: Vec<f64> = (0..N * C).map(|_| rng.uniform(0.05, 3.0)).collect();
        let g: Vec<f64> = (0..C).map(|_| rng.uniform(-1.0, 1.0)).collect();
        let mut layer = GroupGemConfig::new(3).with_layout(layout).init(&device);
        layer.p = Param::from_tensor(tensor(powers.clone(), [3], &device));
        let input = tensor(x.clone(), [1, N, C], &device).require_grad();
        let y = layer.forward_tokens(input.clone());
        let grads = (y * tensor(g.clone(), [1, C], &device)).sum().backward();
        let dx = values(input.grad(&grads).unwrap());
        let dp = values(layer.p.val().grad(&grads).unwrap());

        let loss = |x: &[f64], p: &[f64]| {
            let rows: Vec<Vec<f64>> = x.chunks(C).map(|r| r.to_vec()).collect();
            weighted_sum(&reference::group_gem(&rows, p, 1e-6, interleaved), &g)
        };
        let fd_x = reference::central_difference(&|v: &[f64]| loss(v, &powers), &x, 1e-6);
        let fd_p = reference::central_difference(&|v: &[f64]| loss(&x, v), &powers, 1e-5);
        assert_close(&dx, &fd_x, 1e-6, 1e-8, &format!("{layout:?}: dx"));
        assert_close(&dp, &fd_p, 1e-6, 1e-8, &format!("{layout:?}: dp"));
        // And the forward against the reference.
        let rows: Vec<Vec<f64>> = x.chunks(C).map(|r| r.to_vec()).collect();
        let expected = reference::group_gem(&rows, &powers, 1e-6, interleaved);
        let actual = values(layer.forward_tokens(tensor(x, [1, N, C], &device)));
        assert_close(&actual, &expected, 1e-12, 1e-14, &format!("{layout:?}: y"));
        let _ = all;
    }
}

/// p = 1000 in f64 (the naive form overflows there) matches docs/maths.md §1.
#[test]
fn gem_at_p_1000_in_f64() {
    let device = flex_f64();
    let layer = GemConfig::new().with_p(1000.0).init(&device);
    let y = values(layer.forward_tokens(tensor(vec![0.5, 1.0, 2.0, 4.0], [1, 4, 1], &device)));
    assert_close(&y, &[3.9944586644], 1e-10, 0.0, "p = 1000");
}
