//! Strided matrix products on slices, through the `gemm` crate (the one Flex's matmul uses),
//! so the fused kernels read operands in whatever layout they have and write results in the
//! layout they need, without transposed copies.

use super::real::Real;

/// A matrix inside a slice: element (i, j) is at `i·row_stride + j·column_stride`.
#[derive(Clone, Copy)]
pub(super) struct Strided<'a, T> {
    pub data: &'a [T],
    pub row_stride: usize,
    pub column_stride: usize,
}

impl<'a, T> Strided<'a, T> {
    /// A row-major matrix with `columns` columns.
    pub fn rows(data: &'a [T], columns: usize) -> Self {
        Self {
            data,
            row_stride: columns,
            column_stride: 1,
        }
    }

    /// The transpose of a row-major matrix with `columns` columns.
    pub fn transposed(data: &'a [T], columns: usize) -> Self {
        Self {
            data,
            row_stride: 1,
            column_stride: columns,
        }
    }
}

/// Panics unless every element of an `rows × columns` matrix with these strides is in `len`.
fn check_extent(len: usize, rows: usize, columns: usize, row_stride: usize, column_stride: usize) {
    if rows > 0 && columns > 0 {
        let last = (rows - 1)
            .checked_mul(row_stride)
            .and_then(|r| {
                (columns - 1)
                    .checked_mul(column_stride)
                    .and_then(|c| r.checked_add(c))
            })
            .expect("matrix product: the matrix's extent overflows usize");
        assert!(
            last < len,
            "matrix product: a {rows}×{columns} matrix with strides ({row_stride}, {column_stride}) needs {} elements, the slice has {len}",
            last + 1
        );
    }
}

/// `out = (accumulate ? out : 0) + scale · lhs · rhs` for `lhs` `[m, k]`, `rhs` `[k, n]` and
/// `out` `[m, n]` with strides `(out_row_stride, out_column_stride)`, on the calling thread.
#[allow(clippy::too_many_arguments)]
pub(super) fn product<T: Real>(
    [m, n, k]: [usize; 3],
    out: &mut [T],
    (out_row_stride, out_column_stride): (usize, usize),
    accumulate: bool,
    lhs: Strided<T>,
    rhs: Strided<T>,
    scale: T,
) {
    check_extent(out.len(), m, n, out_row_stride, out_column_stride);
    check_extent(lhs.data.len(), m, k, lhs.row_stride, lhs.column_stride);
    check_extent(rhs.data.len(), k, n, rhs.row_stride, rhs.column_stride);
    if m == 0 || n == 0 {
        return;
    }
    let keep = if accumulate {
        T::from_f64(1.0)
    } else {
        T::default()
    };
    // SAFETY: every index the product touches is inside its slice (checked above), `out` is
    // exclusively borrowed, and gemm dispatches on `T` being f32 or f64 (`Real`'s types).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            out_column_stride as isize,
            out_row_stride as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.column_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr(),
            rhs.column_stride as isize,
            rhs.row_stride as isize,
            keep,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}
