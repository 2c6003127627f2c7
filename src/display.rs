//! The module display the layers and the loss share: their settings on one line, e.g.
//! `Gem {eps: 0.000001, num_prefix_tokens: 0, params: 1}`.

/// Implements `ModuleDisplay` for `$module`, showing each `name => value` (computed from
/// `$this`, the module) on one line.
macro_rules! one_line_display {
    ($module:ty, |$this:ident| $($name:literal => $value:expr),+ $(,)?) => {
        impl burn::module::ModuleDisplay for $module {
            fn custom_settings(&self) -> Option<burn::module::DisplaySettings> {
                burn::module::DisplaySettings::new()
                    .with_new_line_after_attribute(false)
                    .optional()
            }

            fn custom_content(
                &self,
                content: burn::module::Content,
            ) -> Option<burn::module::Content> {
                let $this = self;
                content$(.add($name, &$value))+.optional()
            }
        }
    };
}

pub(crate) use one_line_display;
