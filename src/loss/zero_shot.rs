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
    /// If a size is 0 or `ridge` or `logit_scale` is not positive.
    pub fn init(&self, device: &Device) -> ZeroShotLoss {
        checks::at_least_one("ZeroShotLoss", "num_classes", self.num_classes);
        checks::at_least_one("ZeroShotLoss", "embedding_dim", self.embedding_dim);
        checks::positive("ZeroShotLoss", "ridge", self.ridge);
        checks::positive("ZeroShotLoss", "logit_scale", self.logit_scale);
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
    /// If the shapes disagree, a half is empty or has an index out of range, a label is out of
    /// range, or the halves share a class. Reads the labels back from the device to check.
    pub fn forward(
        &self,
        attributes: Tensor<2>,
        labels: Tensor<1, Int>,
        split: &ZeroShotSplit,
    ) -> Tensor<1> {
        let [batch, _] = attributes.dims();
        let [label_count] = labels.dims();
        assert!(
            label_count == batch,
            "ZeroShotLoss: labels shape mismatch: expected [B] = [{batch}], got [{label_count}]"
        );
        let host_labels: Vec<usize> = labels
            .to_data()
            .iter::<i64>()
            .map(|label| label as usize)
            .collect();
        let [classes, _] = self.embeddings.shape().dims();
        if let Some(bad) = host_labels.iter().find(|&&l| l >= classes) {
            panic!("ZeroShotLoss: label {bad} out of range: expected < num_classes = {classes}");
        }
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
