//! The module display the layers and the loss share: their settings on one line, e.g.
//! `Gem {p: [1], eps: 0.000001, num_prefix_tokens: 0}`.

use burn::module::DisplaySettings;

/// Display settings that keep a layer's attributes on one line.
pub(crate) fn one_line() -> Option<DisplaySettings> {
    DisplaySettings::new()
        .with_new_line_after_attribute(false)
        .optional()
}
