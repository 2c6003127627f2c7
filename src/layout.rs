//! Where the channels of a `[B, ·, ·]` feature tensor are: the one encoding of that fact,
//! used by the layers, the public transport API and every backend kernel.

/// The layout of a rank-3 feature tensor of B samples, N positions and C channels.
///
/// Feature maps `[B, C, H, W]` are pooled as `[B, C, H·W]` (channels first, no transpose);
/// token sets arrive as `[B, N, C]` (channels last).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Layout {
    /// `[B, C, N]`: flattened feature maps.
    ChannelsFirst,
    /// `[B, N, C]`: token sets.
    ChannelsLast,
}

impl Layout {
    /// The axis that indexes positions: 2 for channels first, 1 for channels last.
    pub fn position_axis(self) -> usize {
        match self {
            Layout::ChannelsFirst => 2,
            Layout::ChannelsLast => 1,
        }
    }

    /// The axis that indexes channels: 1 for channels first, 2 for channels last.
    pub fn channel_axis(self) -> usize {
        3 - self.position_axis()
    }

    /// Whether the channels are the innermost axis.
    pub fn is_channels_last(self) -> bool {
        self == Layout::ChannelsLast
    }

    /// `(batch, positions, channels)` of a tensor with these `dims`.
    pub fn split(self, dims: [usize; 3]) -> (usize, usize, usize) {
        (
            dims[0],
            dims[self.position_axis()],
            dims[self.channel_axis()],
        )
    }

    /// The `dims` of a tensor of this layout with B samples, N positions and C channels.
    pub fn dims(self, batch: usize, positions: usize, channels: usize) -> [usize; 3] {
        match self {
            Layout::ChannelsFirst => [batch, channels, positions],
            Layout::ChannelsLast => [batch, positions, channels],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Layout;

    #[test]
    fn axes_and_dims_agree() {
        for layout in [Layout::ChannelsFirst, Layout::ChannelsLast] {
            let dims = layout.dims(2, 5, 3);
            assert_eq!(layout.split(dims), (2, 5, 3));
            assert_eq!(dims[layout.position_axis()], 5);
            assert_eq!(dims[layout.channel_axis()], 3);
        }
        assert!(Layout::ChannelsLast.is_channels_last());
        assert!(!Layout::ChannelsFirst.is_channels_last());
    }
}
