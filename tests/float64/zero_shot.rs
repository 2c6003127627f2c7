//! ZeroShotLoss: a value by hand, gradients against f64 finite differences of the independent
//! reference, and its input checks.

use crate::{common, reference};
use burn::module::Param;
use burn::tensor::{Int, Tensor};
use burn_pooling::loss::{ZeroShotLoss, ZeroShotLossConfig, ZeroShotSplit};
use common::{Rng, assert_close, flex_f64, tensor, values};

fn loss_with(
    embeddings: Vec<f64>,
    classes: usize,
    dim: usize,
    device: &burn::tensor::Device,
) -> ZeroShotLoss {
    let loss = ZeroShotLossConfig::new(classes, dim).init(device);
    ZeroShotLoss {
        embeddings: Param::from_tensor(tensor(embeddings, [classes, dim], device)),
        ..loss
    }
}

/// K = D = 1, one sample per half, E = [[1], [−1]], z = 1 for both:
/// each direction's ridge weight is ±1/(1 + λ), the logits ±s/(1 + λ), so the loss is
/// ln(1 + exp(2s/(1 + λ))) = 18.0952381 for s = 9.5, λ = 0.05.
#[test]
fn tiny_case_by_hand() {
    let device = flex_f64();
    let loss = loss_with(vec![1.0, -1.0], 2, 1, &device);
    let z = tensor(vec![1.0, 1.0], [2, 1], &device);
    let labels = Tensor::<1, Int>::from_data([0i64, 1], &device);
    let value = values(loss.forward(z, labels, &ZeroShotSplit::Halves));
    let by_hand = (1.0f64 + (2.0f64 * 9.5 / 1.05).exp()).ln();
    assert_close(&value, &[by_hand], 1e-12, 0.0, "loss");
    assert!((by_hand - 18.0952381).abs() < 1e-7);
}

#[test]
fn value_and_gradients_match_reference() {
    let device = flex_f64().autodiff();
    let mut rng = Rng::new(31);
    let (batch, k, classes, dim) = (6, 4, 6, 3);
    // Interleaved split: even samples classes 0, 1, 2; odd samples 3, 4, 5.
    let labels_host = [0usize, 3, 1, 4, 2, 5];
    let z: Vec<f64> = (0..batch * k).map(|_| rng.uniform(0.0, 0.5)).collect();
    let e: Vec<f64> = (0..classes * dim).map(|_| rng.uniform(-1.0, 1.0)).collect();
    let loss = loss_with(e.clone(), classes, dim, &device);
    let attributes = tensor(z.clone(), [batch, k], &device).require_grad();
    let labels: Vec<i64> = labels_host.iter().map(|&l| l as i64).collect();
    let labels = Tensor::<1, Int>::from_data(labels.as_slice(), &device);
    let value = loss.forward(attributes.clone(), labels, &ZeroShotSplit::Interleaved);
    let grads = value.clone().backward();
    let dz = values(attributes.grad(&grads).unwrap());
    let de = values(loss.embeddings.val().grad(&grads).unwrap());

    let reference = |z: &[f64], e: &[f64]| {
        let rows = |v: &[f64], w: usize| v.chunks(w).map(|r| r.to_vec()).collect::<Vec<_>>();
        let z = rows(z, k);
        let even: Vec<Vec<f64>> = z.iter().step_by(2).cloned().collect();
        let odd: Vec<Vec<f64>> = z.iter().skip(1).step_by(2).cloned().collect();
        let even_labels: Vec<usize> = labels_host.iter().step_by(2).copied().collect();
        let odd_labels: Vec<usize> = labels_host.iter().skip(1).step_by(2).copied().collect();
        let halves = [
            reference::Half::new(&even, &even_labels),
            reference::Half::new(&odd, &odd_labels),
        ];
        reference::zero_shot_loss(halves, &rows(e, dim), 0.05, 9.5)
    };
    assert_close(&values(value), &[reference(&z, &e)], 1e-10, 1e-12, "loss");
    let fd_z = reference::central_difference(&|v: &[f64]| reference(v, &e), &z, 1e-6);
    let fd_e = reference::central_difference(&|v: &[f64]| reference(&z, v), &e, 1e-6);
    assert_close(&dz, &fd_z, 1e-6, 1e-8, "∂/∂attributes");
    assert_close(&de, &fd_e, 1e-6, 1e-8, "∂/∂embeddings");
}

#[test]
#[should_panic(
    expected = "ZeroShotLoss: the two halves of the split must be class-disjoint, but both contain classes [1]"
)]
fn overlapping_split_panics() {
    let device = flex_f64();
    let loss = ZeroShotLossConfig::new(3, 2).init(&device);
    let labels = Tensor::<1, Int>::from_data([0i64, 1, 1, 2], &device);
    loss.forward(
        Tensor::ones([4, 3], &device),
        labels,
        &ZeroShotSplit::Halves,
    );
}

#[test]
#[should_panic(
    expected = "ZeroShotLoss: label 7 out of range: expected 0 ≤ label < num_classes = 3"
)]
fn label_out_of_range_panics() {
    let device = flex_f64();
    let loss = ZeroShotLossConfig::new(3, 2).init(&device);
    let labels = Tensor::<1, Int>::from_data([0i64, 7], &device);
    loss.forward(
        Tensor::ones([2, 3], &device),
        labels,
        &ZeroShotSplit::Halves,
    );
}
