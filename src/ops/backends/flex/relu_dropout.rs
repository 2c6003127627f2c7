//! A perceptron's hidden activation with inverted dropout (`maths::relu_dropout`): one pass
//! over the product, in place, and one pass over the gradient that also sums the bias's
//! gradient. Threads split the rows.
//!
//! Burn's `Dropout` on Flex draws every keep decision from one ChaCha stream on one thread
//! (128 ms for SALAD's `[8224, 1024]` activations, more than its largest matrix product).
//! Here the decision of element i is a counter-based hash of i under a 64-bit key drawn from
//! Flex's seeded random numbers: `k_i = [hash(i) < (1 − p)·2³²]`, with the hash two rounds of
//! MurmurHash3's finaliser. Any thread can take any row, the result does not depend on the
//! split, and the mask is never stored: the backward reads the output, positive exactly where
//! an element was kept and active.

use rayon::prelude::*;

use super::real::Real;
use super::simd::wide_kernel;

/// Elements per task: large enough to amortise a task, small enough to spread the rows.
const TASK_ELEMENTS: usize = 1 << 16;

/// The keep decisions of one forward: element i is kept when `hash(i, key) < threshold`, and a
/// kept element is scaled by 1/(1 − p).
#[derive(Clone, Copy, Debug)]
pub(super) struct Dropout {
    pub key: [u32; 2],
    pub threshold: u32,
    /// The drop probability p.
    pub drop: f64,
}

impl Dropout {
    /// Keeps with probability `1 − drop` (`drop` in (0, 1)), to within 2⁻³².
    pub fn new(drop: f64, key: [u32; 2]) -> Self {
        let threshold = ((1.0 - drop) * 4_294_967_296.0).round();
        Self {
            key,
            threshold: threshold.min(u32::MAX as f64) as u32,
            drop,
        }
    }

    /// Whether element `index` is kept.
    #[inline(always)]
    pub fn keeps(self, index: u64) -> bool {
        let low = finalise(index as u32 ^ self.key[0]);
        let high = ((index >> 32) as u32).wrapping_mul(0x9E37_79B9);
        finalise(low ^ high ^ self.key[1]) < self.threshold
    }
}

/// MurmurHash3's 32-bit finaliser: a bijection whose every output bit depends on every input
/// bit.
#[inline(always)]
fn finalise(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85EB_CA6B);
    h ^= h >> 13;
    h = h.wrapping_mul(0xC2B2_AE35);
    h ^ (h >> 16)
}

/// Rows per task for rows of `width` elements.
fn rows_per_task(width: usize) -> usize {
    (TASK_ELEMENTS / width.max(1)).max(1)
}

/// `hidden` `[R, H]` ← `relu(hidden + bias) ⊙ k / (1 − p)` (no dropout when `dropout` is
/// `None`). A NaN stays NaN, dropped or not, as it does through Burn's ReLU and `Dropout`.
pub(super) fn forward<T: Real>(hidden: &mut [T], bias: &[T], dropout: Option<Dropout>) {
    let width = bias.len();
    if width == 0 {
        return;
    }
    let rows = rows_per_task(width);
    hidden
        .par_chunks_mut(rows * width)
        .enumerate()
        .for_each(|(task, block)| {
            let first = (task * rows * width) as u64;
            match dropout {
                None => activate_rows(block, bias),
                Some(dropout) => {
                    let scale = T::from_f64(1.0 / (1.0 - dropout.drop));
                    drop_rows(block, bias, dropout, scale, first)
                }
            }
        });
}

wide_kernel! {
    /// relu(h + b) over whole rows of `block`.
    fn activate_rows_body<T: Real>(block: &mut [T], bias: &[T]) {
        let zero = T::default();
        for row in block.chunks_exact_mut(bias.len()) {
            for (h, &b) in row.iter_mut().zip(bias) {
                let v = *h + b;
                *h = if v <= zero { zero } else { v };
            }
        }
    }
    => activate_rows
}

wide_kernel! {
    /// relu(h + b) ⊙ k / (1 − p) over whole rows of `block`, whose first element is element
    /// `first` of the tensor.
    fn drop_rows_body<T: Real>(block: &mut [T], bias: &[T], dropout: Dropout, scale: T, first: u64) {
        let zero = T::default();
        let width = bias.len();
        for (r, row) in block.chunks_exact_mut(width).enumerate() {
            let start = first + (r * width) as u64;
            for (j, (h, &b)) in row.iter_mut().zip(bias).enumerate() {
                let v = *h + b;
                #[allow(clippy::eq_op)]
                let nan = v != v;
                let kept = dropout.keeps(start + j as u64);
                *h = if v <= zero {
                    zero
                } else if kept {
                    v * scale
                } else if nan {
                    v
                } else {
                    zero
                };
            }
        }
    }
    => drop_rows
}

/// `grad` `[R, H]` ← ∂L/∂h = ∂L/∂y ⊙ [y > 0] / (1 − p) in place, given the output `y`;
/// returns ∂L/∂b `[H]`, the column sums of ∂L/∂h.
pub(super) fn backward<T: Real>(grad: &mut [T], output: &[T], width: usize, drop: f64) -> Vec<T> {
    if width == 0 {
        return Vec::new();
    }
    let rows = rows_per_task(width);
    let scale = T::from_f64(1.0 / (1.0 - drop));
    let partial: Vec<Vec<T>> = grad
        .par_chunks_mut(rows * width)
        .zip(output.par_chunks(rows * width))
        .map(|(grad, output)| {
            let mut sums = vec![T::default(); width];
            gate_rows(grad, output, &mut sums, scale);
            sums
        })
        .collect();
    let mut total = vec![T::default(); width];
    for sums in partial {
        for (t, s) in total.iter_mut().zip(sums) {
            *t += s;
        }
    }
    total
}

wide_kernel! {
    /// ∂L/∂h over whole rows of `grad`, with its column sums added to `sums`.
    fn gate_rows_body<T: Real>(grad: &mut [T], output: &[T], sums: &mut [T], scale: T) {
        let zero = T::default();
        let width = sums.len();
        for (g_row, y_row) in grad.chunks_exact_mut(width).zip(output.chunks_exact(width)) {
            for ((g, &y), s) in g_row.iter_mut().zip(y_row).zip(sums.iter_mut()) {
                let d = if y <= zero { zero } else { *g * scale };
                *g = d;
                *s += d;
            }
        }
    }
    => gate_rows
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The keep decisions of a long run: their frequency is 1 − p within five standard
    /// deviations, for every p, and neighbouring decisions (along a row and across rows of a
    /// power-of-two width) are uncorrelated; another key gives other decisions.
    #[test]
    fn keep_decisions_are_fair_and_independent() {
        let count = 1u64 << 20;
        for drop in [0.1, 0.3, 0.5, 0.9] {
            let dropout = Dropout::new(drop, [0x1234_5678, 0x9ABC_DEF0]);
            let keep = 1.0 - drop;
            let kept: Vec<f64> = (0..count)
                .map(|i| f64::from(u8::from(dropout.keeps(i))))
                .collect();
            let n = count as f64;
            let mean = kept.iter().sum::<f64>() / n;
            let sd = (keep * drop / n).sqrt();
            assert!(
                (mean - keep).abs() < 5.0 * sd,
                "p = {drop}: kept {mean}, expected {keep} ± {sd}"
            );
            for lag in [1usize, 2, 512, 1024] {
                let covariance = kept
                    .iter()
                    .zip(&kept[lag..])
                    .map(|(a, b)| (a - keep) * (b - keep))
                    .sum::<f64>()
                    / (n - lag as f64);
                let correlation = covariance / (keep * drop);
                assert!(
                    correlation.abs() < 5.0 / n.sqrt(),
                    "p = {drop}, lag {lag}: correlation {correlation}"
                );
            }
            let other = Dropout::new(drop, [0x1234_5679, 0x9ABC_DEF0]);
            let same = (0..count)
                .filter(|&i| dropout.keeps(i) == other.keeps(i))
                .count() as f64;
            let expected = keep * keep + drop * drop;
            assert!(
                (same / n - expected).abs() < 5.0 * (expected * (1.0 - expected) / n).sqrt(),
                "p = {drop}: two keys agree on {} of the decisions, expected {expected}",
                same / n
            );
        }
    }

    /// Indices past 2³² get their own decisions: the upper half of the index is hashed too.
    #[test]
    fn indices_past_two_to_the_32_are_not_repeats() {
        let dropout = Dropout::new(0.5, [7, 11]);
        let same = (0..4096u64)
            .filter(|&i| dropout.keeps(i) == dropout.keeps(i + (1 << 32)))
            .count();
        assert!((1700..2400).contains(&same), "{same} of 4096 repeat");
    }

    /// The forward in place and the backward on hand-checked rows, with and without dropout,
    /// split over tasks however the width falls; the AVX2 copy and the baseline build agree.
    #[test]
    fn forward_and_backward_follow_the_formulas() {
        let width = 3;
        let rows = rows_per_task(width) * 2 + 5;
        let bias = [0.5f32, -1.0, 0.0];
        let hidden: Vec<f32> = (0..rows * width)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.5)
            .collect();
        let dropout = Dropout::new(0.3, [3, 5]);
        for with in [None, Some(dropout)] {
            let mut y = hidden.clone();
            forward(&mut y, &bias, with);
            let scale = with.map_or(1.0, |d| 1.0 / (1.0 - d.drop)) as f32;
            for (i, (&y, &h)) in y.iter().zip(&hidden).enumerate() {
                let v = h + bias[i % width];
                let kept = with.is_none_or(|d| d.keeps(i as u64));
                let expected = if v > 0.0 && kept { v * scale } else { 0.0 };
                assert_eq!(y, expected, "element {i}");
            }
            let grad: Vec<f32> = (0..rows * width).map(|i| (i % 7) as f32 - 3.0).collect();
            let mut d = grad.clone();
            let drop = with.map_or(0.0, |d| d.drop);
            let sums = backward(&mut d, &y, width, drop);
            let mut expected_sums = [0.0f32; 3];
            for (i, (&d, (&g, &y))) in d.iter().zip(grad.iter().zip(&y)).enumerate() {
                let expected = if y > 0.0 { g * scale } else { 0.0 };
                assert_eq!(d, expected, "gradient at {i}");
                expected_sums[i % width] += expected;
            }
            for (s, e) in sums.iter().zip(expected_sums) {
                assert!((s - e).abs() <= 1e-4 * e.abs().max(1.0), "{s} vs {e}");
            }
            // The baseline build gives the same bits.
            let mut baseline = hidden.clone();
            match with {
                None => activate_rows_body(&mut baseline, &bias),
                Some(d) => drop_rows_body(&mut baseline, &bias, d, 1.0 / (1.0 - d.drop as f32), 0),
            }
            assert_eq!(baseline, y);
        }
    }

    /// NaN stays NaN, dropped or not; −∞ and 0 give 0; +∞ is +∞ where kept.
    #[test]
    fn non_finite_values_go_through() {
        let bias = [0.0f64; 4];
        let dropout = Dropout::new(0.5, [1, 2]);
        let mut y: Vec<f64> = [f64::NAN, f64::NEG_INFINITY, 0.0, f64::INFINITY].repeat(64);
        forward(&mut y, &bias, Some(dropout));
        for (i, y) in y.iter().enumerate() {
            match i % 4 {
                0 => assert!(y.is_nan()),
                1 | 2 => assert_eq!(*y, 0.0),
                _ => assert!(*y == 0.0 || *y == f64::INFINITY),
            }
        }
    }
}

/// The kernel and its backward against the reference composite and closed form.
#[cfg(all(test, feature = "autodiff"))]
mod against_composite {
    use burn::tensor::{Distribution, Tensor, Tolerance};

    use super::super::simd::check::{assert_same, seeded_autodiff};
    use crate::maths::relu_dropout::{closed_form_backward, composite_forward};
    use crate::ops::routing::bias_relu_dropout;

    /// (output, ∂L/∂hidden, ∂L/∂bias) for L = Σ upstream ⊙ y, on fresh leaves.
    fn run(
        op: impl Fn(Tensor<2>, Tensor<1>) -> Tensor<2>,
        hidden: &Tensor<2>,
        bias: &Tensor<1>,
        upstream: &Tensor<2>,
    ) -> (Tensor<2>, Tensor<2>, Tensor<1>) {
        let hidden = hidden.clone().detach().require_grad();
        let bias = bias.clone().detach().require_grad();
        let y = op(hidden.clone(), bias.clone());
        let grads = (y.clone() * upstream.clone()).sum().backward();
        (y, hidden.grad(&grads).unwrap(), bias.grad(&grads).unwrap())
    }

    /// Without dropout the kernel is the composite under autodiff, output and both gradients.
    /// With p = 0.3 each output is 0 or relu(h + b)/0.7, about 70 % of the active ones are
    /// kept, the gradients are the closed form's from the kernel's own output, and the
    /// decisions repeat under `Device::seed` and change from one call to the next.
    #[test]
    fn fused_kernel_matches_composite_paths() {
        let device = seeded_autodiff(4);
        let (rows, width) = (300, 70);
        let normal = Distribution::Normal(0.0, 1.0);
        let hidden = Tensor::<2>::random([rows, width], normal, &device);
        let bias = Tensor::<1>::random([width], normal, &device);
        let upstream = Tensor::<2>::random([rows, width], normal, &device);
        let tolerance = Tolerance::rel_abs(1e-5, 1e-5);

        let (y, dh, db) = run(
            |h, b| bias_relu_dropout(h, b, 0.0),
            &hidden,
            &bias,
            &upstream,
        );
        let (y_c, dh_c, db_c) = run(
            |h, b| composite_forward(h, b, 0.0),
            &hidden,
            &bias,
            &upstream,
        );
        assert_same(y, y_c, tolerance);
        assert_same(dh, dh_c, tolerance);
        assert_same(db, db_c, tolerance);

        let drop = 0.3;
        device.seed(9);
        let (y, dh, db) = run(
            |h, b| bias_relu_dropout(h, b, drop),
            &hidden,
            &bias,
            &upstream,
        );
        let active = (hidden.clone() + bias.clone().unsqueeze()).clamp_min(0.0);
        let kept = y.clone().greater_elem(0.0);
        let scaled = active.clone() / (1.0 - drop);
        assert_same(
            y.clone(),
            scaled.mask_fill(kept.clone().bool_not(), 0.0),
            tolerance,
        );
        let active_count = active.greater_elem(0.0).int().sum().into_scalar::<i64>() as f64;
        let kept_count = kept.int().sum().into_scalar::<i64>() as f64;
        let sd = (active_count * drop * (1.0 - drop)).sqrt();
        assert!(
            (kept_count - 0.7 * active_count).abs() < 5.0 * sd,
            "kept {kept_count} of {active_count} active elements"
        );
        let (dh_closed, db_closed) =
            closed_form_backward(y.clone().inner(), upstream.clone().inner(), drop);
        assert_same(dh.inner(), dh_closed, tolerance);
        assert_same(db.inner(), db_closed, tolerance);

        device.seed(9);
        let again = bias_relu_dropout(hidden.clone(), bias.clone(), drop);
        assert_same(again.clone(), y, Tolerance::absolute(0.0));
        let next = bias_relu_dropout(hidden, bias, drop);
        let changed = next.not_equal(again).int().sum().into_scalar::<i64>();
        assert!(changed > 0, "two calls drew the same decisions");
    }
}
