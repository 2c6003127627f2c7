//! GSP's zero-shot regularisation loss (docs/maths.md §5).

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::Initializer;
use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor};

use super::cholesky::solve_spd;
use crate::checks;
use crate::display::one_line_display;

/// How a batch is split into two class-disjoint halves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ZeroShotSplit {
    /// Even positions vs odd positions (class-interleaved batches).
    Interleaved,
    /// First half vs second half (class-blocked batches).
    Halves,
    /// Explicit sample indices of each half.
    Indices(Vec<usize>, Vec<usize>),
}

impl ZeroShotSplit {
    fn indices(&self, batch: usize) -> (Vec<usize>, Vec<usize>) {
        match self {
            Self::Interleaved => (
                (0..batch).step_by(2).collect(),
                (1..batch).step_by(2).collect(),
            ),
            Self::Halves => ((0..batch / 2).collect(), (batch / 2..batch).collect()),
            Self::Indices(first, second) => (first.clone(), second.clone()),
        }
    }
}

/// Configuration of [`ZeroShotLoss`]. Defaults are the reference's: λ = 0.05, scale 9.5.
#[derive(Config, Debug)]
pub struct ZeroShotLossConfig {
    /// Number of training classes (rows of the class embeddings).
    pub num_classes: usize,
    /// Width D of the class embeddings.
    pub embedding_dim: usize,
    /// Ridge λ of the attribute-to-embedding regression. Default: 0.05.
    #[config(default = 0.05)]
    pub ridge: f64,
    /// Scale s of the logits s·Ŷ Eᵀ. Default: 9.5.
    #[config(default = 9.5)]
    pub logit_scale: f64,
    /// Initializer of the class embeddings. Default: Glorot (Xavier) uniform.
    #[config(default = "Initializer::XavierUniform { gain: 1.0 }")]
    pub initializer: Initializer,
}

impl ZeroShotLossConfig {
    /// Creates the loss with its `[num_classes, embedding_dim]` embeddings on `device`.
    ///
    /// # Panics
    ///
    /// If a size is 0, the embeddings would have more than 2³¹ elements (checked before
    /// allocating), or `ridge` or `logit_scale` is not positive.
    pub fn init(&self, device: &Device) -> ZeroShotLoss {
        checks::at_least_one("ZeroShotLoss", "num_classes", self.num_classes);
        checks::at_least_one("ZeroShotLoss", "embedding_dim", self.embedding_dim);
        checks::parameter_size(
            "ZeroShotLoss",
            &[
                ("num_classes", self.num_classes),
                ("embedding_dim", self.embedding_dim),
            ],
        );
        check_scalars(self.ridge, self.logit_scale);
        ZeroShotLoss {
            embeddings: self.initializer.init_with(
                [self.num_classes, self.embedding_dim],
                Some(self.embedding_dim),
                Some(self.num_classes),
                device,
            ),
            ridge: self.ridge,
            logit_scale: self.logit_scale,
        }
    }
}

/// Panics unless the ridge and the logit scale are finite and positive: checked in `init` and,
/// as they are public fields, in every forward (host values: free).
fn check_scalars(ridge: f64, logit_scale: f64) {
    checks::positive("ZeroShotLoss", "ridge", ridge);
    checks::positive("ZeroShotLoss", "logit_scale", logit_scale);
}

/// Zero-shot regularisation: the attribute vectors z (GSP's mass per prototype) of one half of
/// the batch must predict the class embeddings of the other half's unseen classes.
///
/// For (train, test) = (S₂, S₁) and (S₁, S₂), with Z the train attributes `[n, K]` and
/// Y = E[train labels] `[n, D]`:
///
/// ```text
/// W = Zᵀ (Z Zᵀ + λ I)⁻¹ Y          ridge regression, solved (Cholesky), never inverted
/// logits = s · (Z_test W) Eᵀ
/// loss = mean cross-entropy(logits, test labels)
/// ```
///
/// and the result is the average of the two directions. Gradients reach E and, through z, the
/// transport, the prototypes and the features. The reference weights it 0.1 against 0.9 for
/// the metric loss.
#[derive(Module, Debug)]
#[module(custom_display)]
pub struct ZeroShotLoss {
    /// Class embeddings E, `[num_classes, D]`.
    pub embeddings: Param<Tensor<2>>,
    /// Ridge λ.
    pub ridge: f64,
    /// Logit scale s.
    pub logit_scale: f64,
}

one_line_display!(ZeroShotLoss, |loss|
    "num_classes" => loss.embeddings.shape().dims::<2>()[0],
    "embedding_dim" => loss.embeddings.shape().dims::<2>()[1],
    "ridge" => loss.ridge,
    "logit_scale" => loss.logit_scale,
);

impl ZeroShotLoss {
    /// The loss of a batch.
    ///
    /// # Shapes
    ///
    /// - attributes: `[B, K]` (e.g. [`GspOutput::attributes`](crate::GspOutput))
    /// - labels: `[B]`, class indices below `num_classes`
    /// - output: `[1]`
    ///
    /// # Panics
    ///
    /// If the shapes disagree, there are no attributes (K = 0), a half is empty or has an
    /// index out of range, a label is negative or out of range, the halves share a class,
    /// the inputs are on another device than the embeddings, or `ridge` or `logit_scale`
    /// (public fields) were set to a non-positive value. Reads the labels back from the device
    /// to check.
    pub fn forward(
        &self,
        attributes: Tensor<2>,
        labels: Tensor<1, Int>,
        split: &ZeroShotSplit,
    ) -> Tensor<1> {
        check_scalars(self.ridge, self.logit_scale);
        let [batch, width] = attributes.dims();
        assert!(
            width > 0,
            "ZeroShotLoss: no attributes: expected attributes [B, K] with K > 0, got K = 0"
        );
        let [label_count] = labels.dims();
        assert!(
            label_count == batch,
            "ZeroShotLoss: labels shape mismatch: expected [B] = [{batch}], got [{label_count}]"
        );
        let embeddings_device = self.embeddings.device();
        for (name, device) in [
            ("the attributes", attributes.device()),
            ("the labels", labels.device()),
        ] {
            checks::same_device(
                "ZeroShotLoss",
                [(name, &device), ("the embeddings", &embeddings_device)],
            );
        }
        let [classes, _] = self.embeddings.shape().dims();
        let signed_labels: Vec<i64> = labels.to_data().iter::<i64>().collect();
        if let Some(bad) = signed_labels
            .iter()
            .find(|&&l| l < 0 || l as u64 >= classes as u64)
        {
            panic!(
                "ZeroShotLoss: label {bad} out of range: expected 0 ≤ label < num_classes = {classes}"
            );
        }
        let host_labels: Vec<usize> = signed_labels.iter().map(|&l| l as usize).collect();
        let (first, second) = split.indices(batch);
        for (name, half) in [("first", &first), ("second", &second)] {
            assert!(
                !half.is_empty(),
                "ZeroShotLoss: the {name} half of the split is empty"
            );
            if let Some(bad) = half.iter().find(|&&i| i >= batch) {
                panic!("ZeroShotLoss: split index {bad} out of range: expected < B = {batch}");
            }
        }
        let first_classes: std::collections::BTreeSet<usize> =
            first.iter().map(|&i| host_labels[i]).collect();
        let shared: Vec<usize> = second
            .iter()
            .map(|&i| host_labels[i])
            .filter(|c| first_classes.contains(c))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        assert!(
            shared.is_empty(),
            "ZeroShotLoss: the two halves of the split must be class-disjoint, but both contain classes {shared:?}"
        );

        let device = attributes.device();
        let take = |indices: &[usize]| {
            let indices: Vec<i64> = indices.iter().map(|&i| i as i64).collect();
            let indices = Tensor::<1, Int>::from_data(indices.as_slice(), &device);
            (
                attributes.clone().select(0, indices.clone()),
                labels.clone().select(0, indices),
            )
        };
        let (z1, y1) = take(&first);
        let (z2, y2) = take(&second);
        let a = self.direction(z2.clone(), y2.clone(), z1.clone(), y1.clone());
        let b = self.direction(z1, y1, z2, y2);
        (a + b).div_scalar(2.0)
    }

    /// Trains the ridge map on one half, returns the mean cross-entropy on the other.
    fn direction(
        &self,
        train: Tensor<2>,
        train_labels: Tensor<1, Int>,
        test: Tensor<2>,
        test_labels: Tensor<1, Int>,
    ) -> Tensor<1> {
        let embeddings = self.embeddings.val();
        let [n, _] = train.dims();
        let device = train.device();
        let gram = train.clone().matmul(train.clone().transpose())
            + Tensor::<2>::eye(n, &device).mul_scalar(self.ridge);
        let targets = embeddings.clone().select(0, train_labels); // [n, D]
        let coefficients = solve_spd(gram, targets); // (ZZᵀ + λI)⁻¹ Y
        let predicted = test.matmul(train.transpose()).matmul(coefficients); // Z_test W
        let logits = predicted
            .matmul(embeddings.transpose())
            .mul_scalar(self.logit_scale);
        let log_probs = log_softmax(logits, 1);
        log_probs
            .gather(1, test_labels.unsqueeze_dim(1))
            .mean()
            .neg()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::cpu_devices;

    fn labels(values: &[i64], device: &Device) -> Tensor<1, Int> {
        Tensor::from_data(values, device)
    }

    /// A tiny ridge on identical attributes (a Gram matrix singular up to rounding) gives a
    /// finite loss and finite gradients on every CPU backend (the Cholesky's pivot floor).
    #[test]
    fn a_tiny_ridge_on_identical_attributes_is_finite() {
        for (name, base) in cpu_devices() {
            #[cfg(feature = "autodiff")]
            let device = base.autodiff();
            #[cfg(not(feature = "autodiff"))]
            let device = base;
            let loss = ZeroShotLossConfig::new(4, 3)
                .with_ridge(1e-30)
                .init(&device);
            let attributes =
                Tensor::<2>::from_floats([[0.25, 0.25, 0.5]; 6], &device).require_grad();
            let value = loss.forward(
                attributes.clone(),
                labels(&[0, 1, 2, 3, 0, 1], &device),
                &ZeroShotSplit::Indices(vec![0, 1, 4, 5], vec![2, 3]),
            );
            let values = value.clone().into_data().try_to_vec::<f32>().unwrap();
            assert!(values[0].is_finite(), "{name}: {values:?}");
            #[cfg(feature = "autodiff")]
            {
                let grads = value.backward();
                let grad = attributes.grad(&grads).unwrap();
                let grad = grad.into_data().try_to_vec::<f32>().unwrap();
                assert!(grad.iter().all(|g| g.is_finite()), "{name}: {grad:?}");
            }
        }
    }

    #[test]
    #[should_panic(
        expected = "ZeroShotLoss: no attributes: expected attributes [B, K] with K > 0, got K = 0"
    )]
    fn no_attributes_panic() {
        let device = Device::flex();
        let loss = ZeroShotLossConfig::new(3, 2).init(&device);
        loss.forward(
            Tensor::zeros([4, 0], &device),
            labels(&[0, 1, 2, 0], &device),
            &ZeroShotSplit::Halves,
        );
    }

    #[test]
    #[should_panic(
        expected = "ZeroShotLoss: label -1 out of range: expected 0 ≤ label < num_classes = 3"
    )]
    fn a_negative_label_is_reported_as_such() {
        let device = Device::flex();
        let loss = ZeroShotLossConfig::new(3, 2).init(&device);
        loss.forward(
            Tensor::ones([2, 3], &device),
            labels(&[0, -1], &device),
            &ZeroShotSplit::Halves,
        );
    }

    /// `ridge` and `logit_scale` are public fields: a value set after `init` is checked in
    /// forward.
    #[test]
    #[should_panic(expected = "ZeroShotLoss: `ridge` must be a finite number > 0, got -0.5")]
    fn a_negative_ridge_set_after_init_panics() {
        let device = Device::flex();
        let mut loss = ZeroShotLossConfig::new(3, 2).init(&device);
        loss.ridge = -0.5;
        loss.forward(
            Tensor::ones([2, 3], &device),
            labels(&[0, 1], &device),
            &ZeroShotSplit::Halves,
        );
    }

    /// Embeddings of 2⁴⁰ × 8 would abort the process in the allocator: a named panic instead.
    #[test]
    #[should_panic(
        expected = "ZeroShotLoss: `num_classes` × `embedding_dim` must be at most 2^31 elements"
    )]
    fn too_many_classes_panic_before_allocating() {
        ZeroShotLossConfig::new(1 << 40, 8).init(&Device::flex());
    }

    /// Attributes on another device than the embeddings: a panic naming both devices.
    #[cfg(feature = "ndarray")]
    #[test]
    #[allow(deprecated)] // NdArray is deprecated in Burn 0.22, still supported here.
    #[should_panic(expected = "ZeroShotLoss: device mismatch: the attributes on Device<NdArray")]
    fn a_device_mismatch_names_both_devices() {
        let loss = ZeroShotLossConfig::new(3, 2).init(&Device::flex());
        let device = Device::ndarray();
        loss.forward(
            Tensor::ones([2, 3], &device),
            labels(&[0, 1], &device),
            &ZeroShotSplit::Halves,
        );
    }
}
