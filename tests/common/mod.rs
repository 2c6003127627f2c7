//! Helpers shared by the integration tests: f64 devices, conversions between tensors and
//! nested vectors, a deterministic generator.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Once;

use burn::tensor::{Bool, Device, FloatDType, Tensor, TensorData};

/// The Flex device with f64 floats (configured once per test process).
pub fn flex_f64() -> Device {
    static CONFIGURE: Once = Once::new();
    flex_with(FloatDType::F64, &CONFIGURE)
}

/// The Flex device with `dtype` floats, configured the first time `once` runs (a device's
/// float dtype holds for the whole process).
pub fn flex_with(dtype: FloatDType, once: &Once) -> Device {
    let mut device = Device::flex();
    once.call_once(|| {
        device
            .configure(dtype)
            .unwrap_or_else(|err| panic!("Flex accepts {dtype:?} as its float dtype: {err:?}"))
    });
    device
}

/// xorshift64*: reproducible inputs without a crate.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// Uniform in [lo, hi).
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let bits = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11;
        lo + (hi - lo) * (bits as f64 / (1u64 << 53) as f64)
    }

    pub fn matrix(&mut self, rows: usize, cols: usize, lo: f64, hi: f64) -> Vec<Vec<f64>> {
        (0..rows)
            .map(|_| (0..cols).map(|_| self.uniform(lo, hi)).collect())
            .collect()
    }
}

/// Exact f64 input (no round trip through f32).
pub fn tensor<const D: usize>(values: Vec<f64>, shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::from_data(TensorData::new(values, shape), device)
}

/// `[rows][cols]` → `[rows, cols]`.
pub fn matrix_tensor(rows: &[Vec<f64>], device: &Device) -> Tensor<2> {
    let shape = [rows.len(), rows[0].len()];
    tensor(rows.concat(), shape, device)
}

/// `[B][N][C]` → `[B, N, C]`.
pub fn batch_tensor(batch: &[Vec<Vec<f64>>], device: &Device) -> Tensor<3> {
    let shape = [batch.len(), batch[0].len(), batch[0][0].len()];
    let values = batch.iter().flat_map(|m| m.concat()).collect();
    tensor(values, shape, device)
}

pub fn values<const D: usize>(t: Tensor<D>) -> Vec<f64> {
    t.into_data().try_to_vec_as::<f64>().unwrap()
}

/// Largest |a − b| / (atol + rtol·|b|); ≤ 1 means within tolerance.
/// max_i |a_i − b_i|.
pub fn max_abs_difference(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "max_abs_difference: lengths");
    a.iter().zip(b).fold(0.0, |m, (x, y)| m.max((x - y).abs()))
}

pub fn assert_close(actual: &[f64], expected: &[f64], rtol: f64, atol: f64, what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        assert!(
            (a - e).abs() <= atol + rtol * e.abs(),
            "{what}[{i}]: got {a}, expected {e} (rtol {rtol}, atol {atol})"
        );
    }
}

/// A fresh directory under the system's temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// `burn-pooling-{name}-{pid}`, emptied if it exists.
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("burn-pooling-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        Self(dir)
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.0
    }

    /// `file` inside the directory.
    pub fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The `[b, N]` mask of `valid` (b rows of N flags, row-major; true = valid).
pub fn bool_mask(valid: &[bool], b: usize, device: &Device) -> Tensor<2, Bool> {
    Tensor::from_bool(
        TensorData::new(valid.to_vec(), [b, valid.len() / b]),
        device,
    )
}

/// The dot product of two equally long slices.
pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// `x`, `len` tokens of `channels` values, padded with `fill` to `n` tokens on the right and
/// on the left: `[("right", values, valid), ("left", values, valid)]`, the `[1, n, channels]`
/// inputs and `[1, n]` masks of the masking-equals-dropping tests.
pub fn padded_both_sides(
    x: &[f64],
    len: usize,
    n: usize,
    channels: usize,
    fill: f64,
) -> [(&'static str, Vec<f64>, Vec<bool>); 2] {
    let pad = vec![fill; (n - len) * channels];
    let x = &x[..len * channels];
    [
        (
            "right",
            [x, &pad[..]].concat(),
            (0..n).map(|j| j < len).collect(),
        ),
        (
            "left",
            [&pad[..], x].concat(),
            (0..n).map(|j| j >= n - len).collect(),
        ),
    ]
}
