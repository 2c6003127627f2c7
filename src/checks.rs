//! The configuration checks every layer and the loss run in `init`: each panic names the type,
//! the parameter, what it must be and the value it got.

/// Panics unless `value` is a finite number > 0.
pub(crate) fn positive(owner: &str, name: &str, value: f64) {
    assert!(
        value.is_finite() && value > 0.0,
        "{owner}: `{name}` must be a finite number > 0, got {value}"
    );
}

/// Panics unless `value` (a size or a count) is at least 1.
pub(crate) fn at_least_one(owner: &str, name: &str, value: usize) {
    assert!(value > 0, "{owner}: `{name}` must be at least 1, got 0");
}
