//! GAP's masked mean and its backward: one read of the input forward, one write of the
//! input-sized gradient backward.

use rayon::prelude::*;

use super::Shape3;
use super::real::{Real, lane_sum};

/// Σ_n m_n x_n / Σ_n m_n per sample and channel: one read of `x`.
pub(super) fn mean_forward<T: Real>(x: &[T], mask: &[T], shape: Shape3) -> Vec<T> {
    let (n, c) = (shape.positions, shape.channels);
    let mut out = vec![T::default(); shape.batch * c];
    out.par_chunks_mut(c).enumerate().for_each(|(b, out)| {
        let x = &x[b * n * c..(b + 1) * n * c];
        let mask = &mask[b * n..(b + 1) * n];
        let count = lane_sum(n, |i| mask[i]);
        if shape.channels_last {
            for (row, &valid) in x.chunks_exact(c).zip(mask) {
                for (o, &v) in out.iter_mut().zip(row) {
                    *o += valid * v;
                }
            }
            out.iter_mut().for_each(|o| *o = *o / count);
        } else {
            for (o, row) in out.iter_mut().zip(x.chunks_exact(n)) {
                *o = lane_sum(n, |i| mask[i] * row[i]) / count;
            }
        }
    });
    out
}

/// ∂L/∂x_n = m_n g / Σ m: one write of the input-sized gradient.
pub(super) fn mean_backward<T: Real>(mask: &[T], grad: &[T], shape: Shape3) -> Vec<T> {
    let (n, c) = (shape.positions, shape.channels);
    let mut dx = vec![T::default(); shape.batch * n * c];
    dx.par_chunks_mut(n * c).enumerate().for_each(|(b, dx)| {
        let mask = &mask[b * n..(b + 1) * n];
        let g = &grad[b * c..(b + 1) * c];
        let count = lane_sum(n, |i| mask[i]);
        if shape.channels_last {
            for (row, &valid) in dx.chunks_exact_mut(c).zip(mask) {
                let weight = valid / count;
                for (d, &g) in row.iter_mut().zip(g) {
                    *d = g * weight;
                }
            }
        } else {
            for (row, &g) in dx.chunks_exact_mut(n).zip(g) {
                let scale = g / count;
                for (d, &valid) in row.iter_mut().zip(mask) {
                    *d = scale * valid;
                }
            }
        }
    });
    dx
}
