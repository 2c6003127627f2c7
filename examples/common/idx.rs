//! A reader of IDX files (the format of MNIST and Fashion-MNIST), plain or gzip-compressed.
//!
//! An IDX file is a big-endian header, then the items: two zero bytes, a type code (0x08 for
//! unsigned bytes, the only one read here), the number of dimensions d, then d 32-bit sizes.
//! Images are `idx3` (count, rows, columns), labels `idx1` (count). A file whose first two
//! bytes are gzip's magic (1f 8b) is inflated on the fly, whatever its name.
//!
//! Every error names the file: a missing or unreadable file, a bad magic number (not an
//! unsigned-byte IDX file with the expected number of dimensions), a size mismatch (fewer or
//! more data bytes than the header announces), or image and label files of different counts.
//!
//! Used by `examples/fashion_mnist.rs` and tested by `tests/float32/fashion_mnist_idx.rs`.

#![allow(dead_code)]

use std::fmt;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

/// What went wrong reading one IDX file.
#[derive(Debug)]
pub struct IdxError {
    /// The file.
    pub path: PathBuf,
    /// Why it could not be read.
    pub kind: IdxErrorKind,
}

/// The kinds of [`IdxError`].
#[derive(Debug)]
pub enum IdxErrorKind {
    /// The file does not exist.
    Missing,
    /// Any other I/O or gzip error.
    Io(std::io::Error),
    /// The first four bytes are not `00 00 08 d` with the expected d.
    BadMagic { found: u32, expected: u32 },
    /// The data is shorter or longer than the header's sizes say.
    SizeMismatch { expected: u64, found: u64 },
    /// An images file and a labels file hold different numbers of items.
    CountMismatch { images: usize, labels: usize },
}

impl fmt::Display for IdxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = self.path.display();
        match &self.kind {
            IdxErrorKind::Missing => write!(f, "{path}: no such file"),
            IdxErrorKind::Io(error) => write!(f, "{path}: {error}"),
            IdxErrorKind::BadMagic { found, expected } => write!(
                f,
                "{path}: bad magic number 0x{found:08x}, expected 0x{expected:08x} \
                 (an IDX file of unsigned bytes)"
            ),
            IdxErrorKind::SizeMismatch { expected, found } => write!(
                f,
                "{path}: size mismatch: the header announces {expected} data bytes, \
                 the file holds {found}"
            ),
            IdxErrorKind::CountMismatch { images, labels } => write!(
                f,
                "{path}: size mismatch: {labels} labels for {images} images"
            ),
        }
    }
}

impl std::error::Error for IdxError {}

/// Images of one IDX3 file: `count` images of `rows × cols` bytes, row-major, one after another.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdxImages {
    /// The number of images the header announces (the whole file).
    pub header_count: usize,
    pub rows: usize,
    pub cols: usize,
    /// The pixels of the images read (`len() == read_count() · rows · cols`).
    pub pixels: Vec<u8>,
}

impl IdxImages {
    /// The number of images read (at most `header_count`).
    pub fn len(&self) -> usize {
        self.pixels.len() / (self.rows * self.cols).max(1)
    }

    pub fn is_empty(&self) -> bool {
        self.pixels.is_empty()
    }

    /// The pixels of image `index`.
    pub fn image(&self, index: usize) -> &[u8] {
        let size = self.rows * self.cols;
        &self.pixels[index * size..(index + 1) * size]
    }
}

/// Labels of one IDX1 file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdxLabels {
    /// The number of labels the header announces (the whole file).
    pub header_count: usize,
    /// The labels read.
    pub labels: Vec<u8>,
}

const IDX_UBYTE: u32 = 0x0000_0800;

fn open(path: &Path) -> Result<Box<dyn Read>, IdxError> {
    let error = |kind| IdxError {
        path: path.to_path_buf(),
        kind,
    };
    let file = File::open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            error(IdxErrorKind::Missing)
        } else {
            error(IdxErrorKind::Io(e))
        }
    })?;
    let mut reader = BufReader::new(file);
    let mut magic = [0u8; 2];
    let peeked = {
        use std::io::BufRead;
        let buffer = reader.fill_buf().map_err(|e| error(IdxErrorKind::Io(e)))?;
        let n = buffer.len().min(2);
        magic[..n].copy_from_slice(&buffer[..n]);
        n
    };
    if peeked == 2 && magic == [0x1f, 0x8b] {
        Ok(Box::new(flate2::read::GzDecoder::new(reader)))
    } else {
        Ok(Box::new(reader))
    }
}

/// Reads the header (magic and `dims` sizes), then `limit` items (all when `None`) of
/// `item_bytes(sizes)` bytes each; checks the data length against the header when reading all.
fn read_idx(
    path: &Path,
    dims: u32,
    limit: Option<usize>,
) -> Result<(Vec<usize>, Vec<u8>), IdxError> {
    let error = |kind| IdxError {
        path: path.to_path_buf(),
        kind,
    };
    let io = |e: std::io::Error| error(IdxErrorKind::Io(e));
    let mut reader = open(path)?;
    let header_len = 4 * (1 + dims as usize);
    let mut header = vec![0u8; header_len];
    let got = read_up_to(&mut reader, &mut header).map_err(io)?;
    if got < 4 {
        return Err(error(IdxErrorKind::BadMagic {
            found: be_u32_partial(&header[..got]),
            expected: IDX_UBYTE | dims,
        }));
    }
    let magic = u32::from_be_bytes(header[..4].try_into().expect("4 bytes"));
    if magic != IDX_UBYTE | dims {
        return Err(error(IdxErrorKind::BadMagic {
            found: magic,
            expected: IDX_UBYTE | dims,
        }));
    }
    if got < header_len {
        return Err(error(IdxErrorKind::SizeMismatch {
            expected: header_len as u64,
            found: got as u64,
        }));
    }
    let sizes: Vec<usize> = header[4..]
        .chunks(4)
        .map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")) as usize)
        .collect();
    let count = sizes[0];
    let item: usize = sizes[1..].iter().product();
    let expected = (count as u64) * (item as u64);
    let wanted = limit.map_or(count, |l| l.min(count));
    let mut data = vec![0u8; wanted * item];
    let got = read_up_to(&mut reader, &mut data).map_err(io)?;
    if got < data.len() {
        return Err(error(IdxErrorKind::SizeMismatch {
            expected,
            found: got as u64,
        }));
    }
    if wanted == count {
        // The whole file was asked for: nothing may follow the data.
        let mut extra = 0u64;
        let mut buffer = [0u8; 4096];
        loop {
            let n = reader.read(&mut buffer).map_err(io)?;
            if n == 0 {
                break;
            }
            extra += n as u64;
        }
        if extra > 0 {
            return Err(error(IdxErrorKind::SizeMismatch {
                expected,
                found: expected + extra,
            }));
        }
    }
    Ok((sizes, data))
}

fn be_u32_partial(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0u32, |acc, &b| (acc << 8) | b as u32)
}

/// Fills `buffer` as far as the reader goes; returns the bytes read.
fn read_up_to(reader: &mut dyn Read, buffer: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match reader.read(&mut buffer[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Reads the images of an IDX3 file (`limit`: only the first ones; `None`: all of them, and the
/// file must hold exactly what its header says).
pub fn read_images(path: impl AsRef<Path>, limit: Option<usize>) -> Result<IdxImages, IdxError> {
    let (sizes, pixels) = read_idx(path.as_ref(), 3, limit)?;
    Ok(IdxImages {
        header_count: sizes[0],
        rows: sizes[1],
        cols: sizes[2],
        pixels,
    })
}

/// Reads the labels of an IDX1 file (`limit` as in [`read_images`]).
pub fn read_labels(path: impl AsRef<Path>, limit: Option<usize>) -> Result<IdxLabels, IdxError> {
    let (sizes, labels) = read_idx(path.as_ref(), 1, limit)?;
    Ok(IdxLabels {
        header_count: sizes[0],
        labels,
    })
}

/// One split of an IDX data set: images with their labels.
#[derive(Clone, Debug)]
pub struct IdxSplit {
    pub images: IdxImages,
    pub labels: Vec<u8>,
}

/// Reads `images` and `labels` and checks that their headers announce the same count.
pub fn read_split(
    images: impl AsRef<Path>,
    labels: impl AsRef<Path>,
    limit: Option<usize>,
) -> Result<IdxSplit, IdxError> {
    let image_set = read_images(images.as_ref(), limit)?;
    let label_set = read_labels(labels.as_ref(), limit)?;
    if image_set.header_count != label_set.header_count {
        return Err(IdxError {
            path: labels.as_ref().to_path_buf(),
            kind: IdxErrorKind::CountMismatch {
                images: image_set.header_count,
                labels: label_set.header_count,
            },
        });
    }
    Ok(IdxSplit {
        images: image_set,
        labels: label_set.labels,
    })
}

/// The Debian package's directory (`apt-get install dataset-fashion-mnist`).
pub const DEBIAN_FASHION_MNIST: &str = "/usr/share/datasets/fashion-mnist";

/// The file of `stem` (e.g. `train-images-idx3-ubyte`) in `dir`: `stem.gz` if present, else
/// `stem` (uncompressed), else `stem.gz` (so that the error names the Debian file name).
pub fn find_file(dir: &Path, stem: &str) -> PathBuf {
    let gz = dir.join(format!("{stem}.gz"));
    let plain = dir.join(stem);
    if !gz.exists() && plain.exists() {
        plain
    } else {
        gz
    }
}

/// Reads the `train` or `t10k` split of Fashion-MNIST (or MNIST) from `dir`, with an error
/// that says how to install the Debian package when a file is missing.
pub fn read_fashion_mnist(
    dir: &Path,
    split: &str,
    limit: Option<usize>,
) -> Result<IdxSplit, String> {
    let images = find_file(dir, &format!("{split}-images-idx3-ubyte"));
    let labels = find_file(dir, &format!("{split}-labels-idx1-ubyte"));
    read_split(&images, &labels, limit).map_err(|e| match e.kind {
        IdxErrorKind::Missing => format!(
            "{e}\nFashion-MNIST is not installed in {}: run `apt-get install \
             dataset-fashion-mnist` (Debian), or pass `--data DIR` with the four IDX files",
            dir.display()
        ),
        _ => e.to_string(),
    })
}
