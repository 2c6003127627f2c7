//! The configuration checks every layer and the loss run in `init` (and again in `forward` for
//! what may change after it: public fields, settings): each panic names the type, the
//! parameter, what it must be and the value it got. All of them read host values only.

use burn::tensor::Device;

/// The most elements a parameter tensor of the crate may have (`[K, C]` prototypes, `[G]`
/// powers, `[classes, D]` class embeddings): 2³¹, 8 GiB in f32. Far above any pooling layer's
/// need, and the limit of the 32-bit indices GPU kernels use; a larger request is a mistake
/// that would otherwise abort the process in the allocator instead of panicking.
pub(crate) const MAX_PARAMETER_ELEMENTS: usize = 1 << 31;

/// Panics unless `value` is a finite number > 0.
pub(crate) fn positive(owner: &str, name: &str, value: f64) {
    assert!(
        value.is_finite() && value > 0.0,
        "{owner}: `{name}` must be a finite number > 0, got {value}"
    );
}

/// Panics unless `value` is a finite number ≥ `minimum` (> 0), the smallest value the
/// computation resolves in f32: `why` says what breaks below it.
pub(crate) fn at_least(owner: &str, name: &str, value: f64, minimum: f64, why: &str) {
    positive(owner, name, value);
    assert!(
        value >= minimum,
        "{owner}: `{name}` must be at least {minimum:e} ({why}), got {value:e}"
    );
}

/// Panics unless `value` (a size or a count) is at least 1.
pub(crate) fn at_least_one(owner: &str, name: &str, value: usize) {
    assert!(value > 0, "{owner}: `{name}` must be at least 1, got 0");
}

/// Panics unless a parameter of the given named dimensions has at most
/// [`MAX_PARAMETER_ELEMENTS`] elements: checked before allocating it.
pub(crate) fn parameter_size(owner: &str, dims: &[(&str, usize)]) {
    let product = dims
        .iter()
        .try_fold(1usize, |total, &(_, size)| total.checked_mul(size));
    if product.is_none_or(|elements| elements > MAX_PARAMETER_ELEMENTS) {
        let names = dims
            .iter()
            .map(|(name, _)| format!("`{name}`"))
            .collect::<Vec<_>>()
            .join(" × ");
        let values = dims
            .iter()
            .map(|(_, size)| size.to_string())
            .collect::<Vec<_>>()
            .join(" × ");
        panic!(
            "{owner}: {names} must be at most 2^31 elements (the size of one parameter tensor), got {values}"
        );
    }
}

/// Panics unless two tensors (named `first` and `second`) are on the same device, naming both
/// devices: `[("the input", ..), ("the parameters", ..)]`.
pub(crate) fn same_device(owner: &str, [(first, a), (second, b)]: [(&str, &Device); 2]) {
    assert!(
        a == b,
        "{owner}: device mismatch: {first} on {a:?}, {second} on {b:?}: move one of them (`Tensor::to_device`, `Module::to_device`)"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_size_accepts_up_to_the_bound() {
        parameter_size("T", &[("a", 1 << 16), ("b", 1 << 15)]);
    }

    #[test]
    #[should_panic(
        expected = "T: `a` × `b` must be at most 2^31 elements (the size of one parameter tensor), got 1099511627776 × 8"
    )]
    fn parameter_size_rejects_more() {
        parameter_size("T", &[("a", 1 << 40), ("b", 8)]);
    }

    #[test]
    #[should_panic(expected = "got 18446744073709551615 × 18446744073709551615")]
    fn parameter_size_rejects_an_overflowing_product() {
        parameter_size("T", &[("a", usize::MAX), ("b", usize::MAX)]);
    }

    #[test]
    #[should_panic(expected = "T: `p` must be at least 1e-3 (what f32 resolves), got 1e-50")]
    fn at_least_names_the_bound() {
        at_least("T", "p", 1e-50, 1e-3, "what f32 resolves");
    }
}
