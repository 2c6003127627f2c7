//! The IDX loader of `examples/fashion_mnist.rs`: small IDX files written here (plain and
//! gzip; a missing file, a bad magic number and a size mismatch each give an error naming the
//! file), and the real Fashion-MNIST files of the Debian package `dataset-fashion-mnist`
//! (which CI installs: the test fails, with the install hint, when they are missing).

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::common::TempDir;
use crate::idx;
use crate::idx::{IdxErrorKind, read_fashion_mnist, read_images, read_labels, read_split};

/// The bytes of an unsigned-byte IDX file with `sizes` and `data`.
fn idx_bytes(sizes: &[u32], data: &[u8]) -> Vec<u8> {
    let mut bytes = vec![0, 0, 0x08, sizes.len() as u8];
    for size in sizes {
        bytes.extend(size.to_be_bytes());
    }
    bytes.extend(data);
    bytes
}

fn write_plain(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).expect("write IDX file");
}

fn write_gzip(path: &Path, bytes: &[u8]) {
    let file = std::fs::File::create(path).expect("create IDX file");
    let mut encoder = flate2::write::GzEncoder::new(file, flate2::Compression::default());
    encoder.write_all(bytes).expect("write gzip");
    encoder.finish().expect("finish gzip");
}

/// Three 2×4 images with pixel `i · 10 + j`, and their labels 7, 0, 9.
fn sample_files(dir: &TempDir, gzip: bool) -> (PathBuf, PathBuf) {
    let pixels: Vec<u8> = (0..3u8)
        .flat_map(|i| (0..8u8).map(move |j| i * 10 + j))
        .collect();
    let suffix = if gzip { ".gz" } else { "" };
    let images = dir.path(&format!("images-idx3-ubyte{suffix}"));
    let labels = dir.path(&format!("labels-idx1-ubyte{suffix}"));
    let write = if gzip { write_gzip } else { write_plain };
    write(&images, &idx_bytes(&[3, 2, 4], &pixels));
    write(&labels, &idx_bytes(&[3], &[7, 0, 9]));
    (images, labels)
}

fn check_sample(images: &Path, labels: &Path) {
    let split = read_split(images, labels, None).expect("read the sample split");
    assert_eq!(split.images.header_count, 3);
    assert_eq!((split.images.rows, split.images.cols), (2, 4));
    assert_eq!(split.images.len(), 3);
    assert_eq!(split.images.image(1), &[10, 11, 12, 13, 14, 15, 16, 17]);
    assert_eq!(split.images.image(2)[7], 27);
    assert_eq!(split.labels, vec![7, 0, 9]);

    // A limit reads only the first items; the header count stays the file's.
    let first = read_images(images, Some(2)).expect("read two images");
    assert_eq!((first.header_count, first.len()), (3, 2));
    assert_eq!(first.pixels[..], split.images.pixels[..16]);
    let labels = read_labels(labels, Some(1)).expect("read one label");
    assert_eq!((labels.header_count, labels.labels), (3, vec![7]));
}

#[test]
fn reads_plain_idx_files() {
    let dir = TempDir::new("idx-plain");
    let (images, labels) = sample_files(&dir, false);
    check_sample(&images, &labels);
}

#[test]
fn reads_gzip_idx_files() {
    let dir = TempDir::new("idx-gzip");
    let (images, labels) = sample_files(&dir, true);
    check_sample(&images, &labels);
    // Detected by content, not by name.
    let renamed = dir.path("images-no-extension");
    std::fs::copy(&images, &renamed).expect("copy");
    assert_eq!(
        read_images(&renamed, None).expect("gzip by content").len(),
        3
    );
}

/// The error's message, which must name the file.
/// Asserts that `error` is of the kind `pattern` and names `path`; returns its message.
macro_rules! assert_error {
    ($error:expr, $pattern:pat, $path:expr) => {{
        let error = $error;
        assert!(matches!(error.kind, $pattern), "{error}");
        message_naming(error, $path)
    }};
}

fn message_naming(error: idx::IdxError, path: &Path) -> String {
    assert_eq!(error.path, path);
    let message = error.to_string();
    assert!(
        message.contains(&path.display().to_string()),
        "the error should name {}: {message}",
        path.display()
    );
    message
}

#[test]
fn missing_file_is_an_error_naming_it() {
    let dir = TempDir::new("idx-missing");
    let path = dir.path("train-images-idx3-ubyte.gz");
    let error = read_images(&path, None).expect_err("a missing file");
    let message = assert_error!(error, IdxErrorKind::Missing, &path);
    assert!(message.contains("no such file"), "{message}");

    // The Fashion-MNIST reader adds the install hint.
    let hint = read_fashion_mnist(dir.root(), "train", Some(10)).expect_err("no data set here");
    assert!(
        hint.contains("apt-get install dataset-fashion-mnist"),
        "{hint}"
    );
    assert!(hint.contains("train-images-idx3-ubyte"), "{hint}");
}

/// A reader of one kind of IDX file, its contents dropped.
type Reader = fn(&Path) -> Result<(), idx::IdxError>;

#[test]
fn bad_files_are_errors_naming_the_file() {
    let dir = TempDir::new("idx-bad");
    let images: Reader = |path| read_images(path, None).map(drop);
    let labels: Reader = |path| read_labels(path, None).map(drop);
    // (file, bytes, reader, the error's kind as `Debug` prints it or its start, its message)
    let cases = [
        // An IDX1 labels file read as images: dimension byte 1, not 3.
        (
            "labels-as-images",
            idx_bytes(&[2], &[1, 2]),
            images,
            "BadMagic { found: 2049, expected: 2051 }",
            "bad magic number",
        ),
        // Not an unsigned-byte file (type 0x0D, floats), and a file too short for a magic.
        (
            "floats",
            vec![0, 0, 0x0D, 1, 0, 0, 0, 0],
            labels,
            "BadMagic",
            "bad magic number",
        ),
        (
            "two-bytes",
            vec![0, 0],
            labels,
            "BadMagic",
            "bad magic number",
        ),
        // Fewer bytes than the header announces: 2 images of 2×2 = 8 bytes, 7 present.
        (
            "short-images",
            idx_bytes(&[2, 2, 2], &[0; 7]),
            images,
            "SizeMismatch { expected: 8, found: 7 }",
            "size mismatch",
        ),
        // More bytes than announced.
        (
            "long-labels",
            idx_bytes(&[3], &[1, 2, 3, 4]),
            labels,
            "SizeMismatch { expected: 3, found: 4 }",
            "size mismatch",
        ),
        // A truncated header.
        (
            "header",
            vec![0, 0, 8, 3, 0, 0, 0, 1, 0, 0],
            images,
            "SizeMismatch",
            "size mismatch",
        ),
    ];
    for gzip in [false, true] {
        let write = if gzip { write_gzip } else { write_plain };
        for (name, bytes, read, kind, says) in &cases {
            let path = dir.path(&format!("{name}{}", if gzip { ".gz" } else { "" }));
            write(&path, bytes);
            let error = read(&path).expect_err(name);
            let shown = format!("{:?}", error.kind);
            assert!(shown.starts_with(kind), "{name}: {shown}, expected {kind}");
            let message = message_naming(error, &path);
            assert!(message.contains(says), "{name}: {message}");
        }
        // The truncated file's first image is complete, so a limit of 1 reads it.
        let short = dir.path(if gzip {
            "short-images.gz"
        } else {
            "short-images"
        });
        assert_eq!(read_images(&short, Some(1)).expect("first image").len(), 1);
    }
}

#[test]
fn count_mismatch_is_an_error_naming_the_labels_file() {
    let dir = TempDir::new("idx-count");
    // Images and labels of different counts: the error names the labels file.
    let images = dir.path("images");
    let labels = dir.path("labels");
    write_plain(&images, &idx_bytes(&[2, 1, 1], &[5, 6]));
    write_plain(&labels, &idx_bytes(&[3], &[0, 1, 2]));
    let error = read_split(&images, &labels, None).expect_err("2 images, 3 labels");
    assert_error!(
        error,
        IdxErrorKind::CountMismatch {
            images: 2,
            labels: 3
        },
        &labels
    );
}

/// The real files. CI installs `dataset-fashion-mnist`; without them this test fails.
#[test]
fn reads_the_real_fashion_mnist_files() {
    let dir = Path::new(idx::DEBIAN_FASHION_MNIST);
    for (split, count) in [("train", 60_000), ("t10k", 10_000)] {
        let data = read_fashion_mnist(dir, split, Some(300))
            .unwrap_or_else(|e| panic!("Fashion-MNIST {split} split: {e}"));
        assert_eq!(data.images.header_count, count, "{split}: image count");
        assert_eq!(data.images.len(), 300, "{split}: images read");
        assert_eq!((data.images.rows, data.images.cols), (28, 28), "{split}");
        assert_eq!(data.labels.len(), 300, "{split}: labels read");
        assert!(data.labels.iter().all(|&l| l < 10), "{split}: labels < 10");
        // 300 images of a shuffled, balanced set show most of the 10 classes, and real pixels.
        let mut seen = [0usize; 10];
        for &label in &data.labels {
            seen[label as usize] += 1;
        }
        assert!(
            seen.iter().filter(|&&n| n > 0).count() >= 8,
            "{split}: {seen:?}"
        );
        let mean = data.images.pixels.iter().map(|&p| p as f64).sum::<f64>()
            / data.images.pixels.len() as f64;
        assert!((40.0..110.0).contains(&mean), "{split}: mean pixel {mean}");
    }
}
