//! Which positions does GSP keep? Trains the `metric_learning` example's CNN with a GSP head
//! (shorter), saves and reloads it through Burn records and its config through JSON, then
//! renders GSP's pooling weights over held-out images as a PNG: for each image the input (the
//! object's true box in green) and the weights as a heat overlay.
//!
//! Run: `cargo run --release --example gsp_heatmap -- docs/gsp_heatmap.png`
//! (the path defaults to `gsp_heatmap.png`; `STEPS=..` changes the training length).

mod common;

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;

use burn::config::Config;
use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};
use burn_pooling::GspConfig;
use common::{BackboneConfig, MAP_SIDE, Net, Pooling, Protocol, Rng, SIDE, Split};

const CLASSES: usize = 48;
const SHOWN: usize = 8;
const PER_ROW: usize = 4;
/// Output pixels per input pixel.
const ZOOM: usize = 4;

fn main() {
    let output = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "gsp_heatmap.png".to_string());
    let steps = std::env::var("STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let device = Device::flex().autodiff();
    let split = Split::new(CLASSES, 2023);
    let protocol = Protocol::recipe(steps);
    let config = GspConfig::new(common::FEATURES)
        .with_num_prototypes(16)
        .with_transport_ratio(0.3)
        .with_epsilon(0.05);
    let bar = common::progress_bar(protocol.steps);
    let model = (&BackboneConfig::GLYPHS, &config);
    let (trained, _) = common::train(
        Pooling::GSP,
        model,
        &split,
        &protocol,
        (&bar, "GSP"),
        &device,
    );
    bar.finish_and_clear();

    // Save the trained network (burnpack record) and GSP's config (JSON), then rebuild both
    // from disk on a plain (inference) device.
    let dir = std::env::temp_dir().join(format!("burn-pooling-gsp-heatmap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create the temp dir");
    // Save the validation snapshot: `valid()` first folds the batch-norm running statistics
    // updated during training into the module (recording the training module directly would
    // store stale ones).
    let trained = trained.valid();
    trained
        .clone()
        .save_file(dir.join("net.bpk"))
        .expect("save the record");
    trained
        .gsp
        .clone()
        .expect("GSP head")
        .save_file(dir.join("gsp.bpk"))
        .expect("save GSP's record");
    // The head's own config: the shared settings with its projection and read-out.
    let head_config = Pooling::GSP.gsp_config(&config).expect("a GSP head");
    head_config
        .save(dir.join("gsp.json"))
        .expect("save the config");
    let plain = device.clone().inner();
    let loaded_config = GspConfig::load(dir.join("gsp.json")).expect("load the config");
    let net = Net::new(Pooling::GSP, &BackboneConfig::GLYPHS, &config, &plain)
        .load_file(dir.join("net.bpk"));
    let gsp_alone = loaded_config.init(&plain).load_file(dir.join("gsp.bpk"));
    println!(
        "saved and reloaded through {}: net.bpk ({} parameters), gsp.bpk, gsp.json",
        dir.display(),
        net.num_params()
    );

    // Held-out classes, fresh images.
    let mut rng = Rng::new(99);
    let mut pixels = Vec::new();
    let mut boxes = Vec::new();
    for i in 0..SHOWN {
        let class = split.train_classes + (i * split.test_classes) / SHOWN;
        let (image, corner) = common::render(&split.objects, class, &mut rng);
        pixels.extend(image);
        boxes.push(corner);
    }
    let batch = Tensor::<4>::from_data(
        TensorData::new(pixels.clone(), [SHOWN, 1, SIDE, SIDE]),
        &plain,
    );
    let maps = net.backbone.forward(batch);
    let weights = net
        .gsp
        .as_ref()
        .expect("GSP head")
        .forward_detailed(maps.clone())
        .weights;
    // The reloaded standalone layer gives the same weights as the reloaded network's.
    let maps_again = maps.clone();
    let again = gsp_alone.forward_detailed(maps).weights;
    let difference: f32 = (weights.clone() - again).abs().max().into_scalar();
    assert!(difference < 1e-5, "reloaded GSP differs by {difference}");
    // ... and the same as the trained one.
    let reference = trained;
    let batch = Tensor::<4>::from_data(
        TensorData::new(pixels.clone(), [SHOWN, 1, SIDE, SIDE]),
        &plain,
    );
    let original_maps = reference.backbone.forward(batch);
    let map_difference: f32 = (maps_again - original_maps.clone())
        .abs()
        .max()
        .into_scalar();
    let original = reference
        .gsp
        .as_ref()
        .unwrap()
        .forward_detailed(original_maps)
        .weights;
    let difference: f32 = (weights.clone() - original).abs().max().into_scalar();
    assert!(
        map_difference < 1e-4 && difference < 1e-5,
        "the reloaded net differs from the trained one: maps by {map_difference}, weights by {difference}"
    );
    // Only now: loaded records read their tensors from the file lazily.
    let _ = std::fs::remove_dir_all(&dir);

    let weights: Vec<f32> = weights.into_data().convert::<f32>().try_into_vec().unwrap();
    let cells = MAP_SIDE * MAP_SIDE;
    let mut on_object = 0.0;
    let mut object_cells = 0;
    for (i, &(top, left)) in boxes.iter().enumerate() {
        for cell in 0..cells {
            if cell_on_object(cell, top, left) {
                on_object += weights[i * cells + cell];
                object_cells += 1;
            }
        }
    }
    println!(
        "GSP puts {:.1} % of its weight on the map cells that overlap the object ({:.1} % of the cells)",
        100.0 * on_object / SHOWN as f32,
        100.0 * object_cells as f32 / (SHOWN * cells) as f32
    );

    write_png(&output, &pixels, &weights, &boxes);
    println!("wrote {output}");
}

/// Does map cell `cell` (a 4×4 pixel block) overlap the object box at (top, left)?
fn cell_on_object(cell: usize, top: usize, left: usize) -> bool {
    let stride = SIDE / MAP_SIDE;
    let (y, x) = ((cell / MAP_SIDE) * stride, (cell % MAP_SIDE) * stride);
    let object = 11;
    y < top + object && top < y + stride && x < left + object && left < x + stride
}

/// A black → red → yellow → white colour map over `[0, 1]`.
fn heat(t: f32) -> [f32; 3] {
    let t = t.clamp(0.0, 1.0);
    [
        (3.0 * t).min(1.0),
        (3.0 * t - 1.0).clamp(0.0, 1.0),
        (3.0 * t - 2.0).clamp(0.0, 1.0),
    ]
}

/// Bilinear sample of an `n×n` map at continuous coordinates (cell centres at i + 0.5).
fn bilinear(map: &[f32], n: usize, y: f32, x: f32) -> f32 {
    let fy = (y - 0.5).clamp(0.0, (n - 1) as f32);
    let fx = (x - 0.5).clamp(0.0, (n - 1) as f32);
    let (y0, x0) = (fy.floor() as usize, fx.floor() as usize);
    let (y1, x1) = ((y0 + 1).min(n - 1), (x0 + 1).min(n - 1));
    let (ty, tx) = (fy - y0 as f32, fx - x0 as f32);
    let at = |y: usize, x: usize| map[y * n + x];
    (1.0 - ty) * ((1.0 - tx) * at(y0, x0) + tx * at(y0, x1))
        + ty * ((1.0 - tx) * at(y1, x0) + tx * at(y1, x1))
}

fn write_png(path: impl AsRef<Path>, pixels: &[f32], weights: &[f32], boxes: &[(usize, usize)]) {
    let tile = SIDE * ZOOM;
    let gap = 4;
    let pair = 2 * tile + gap;
    let rows = SHOWN.div_ceil(PER_ROW);
    let width = PER_ROW * pair + (PER_ROW - 1) * 3 * gap;
    let height = rows * tile + (rows - 1) * 3 * gap;
    let mut rgb = vec![255u8; width * height * 3];
    let cells = MAP_SIDE * MAP_SIDE;
    for i in 0..SHOWN {
        let (ox, oy) = (
            (i % PER_ROW) * (pair + 3 * gap),
            (i / PER_ROW) * (tile + 3 * gap),
        );
        let image = &pixels[i * SIDE * SIDE..(i + 1) * SIDE * SIDE];
        let map = &weights[i * cells..(i + 1) * cells];
        let peak = map.iter().copied().fold(f32::MIN, f32::max).max(1e-12);
        let (top, left) = boxes[i];
        for py in 0..tile {
            for px in 0..tile {
                let (y, x) = (py / ZOOM, px / ZOOM);
                let gray = image[y * SIDE + x];
                // Input, the object's box outline in green.
                let on_box = {
                    let (by0, bx0) = (top * ZOOM, left * ZOOM);
                    let (by1, bx1) = ((top + 11) * ZOOM - 1, (left + 11) * ZOOM - 1);
                    (py == by0 || py == by1) && (bx0..=bx1).contains(&px)
                        || (px == bx0 || px == bx1) && (by0..=by1).contains(&py)
                };
                let input = if on_box { [0.1, 0.9, 0.2] } else { [gray; 3] };
                // Overlay: the image dimmed, plus the weights' heat.
                let scale = (SIDE as f32) / (MAP_SIDE as f32);
                let w = bilinear(
                    map,
                    MAP_SIDE,
                    (py as f32 + 0.5) / ZOOM as f32 / scale,
                    (px as f32 + 0.5) / ZOOM as f32 / scale,
                ) / peak;
                // Low weight: the image, dimmed; high weight: hot colours.
                let h = heat(0.35 + 0.65 * w);
                let overlay = [0, 1, 2].map(|c| (1.0 - w) * 0.6 * gray + w * h[c]);
                for (offset, colour) in [(0, input), (tile + gap, overlay)] {
                    let at = ((oy + py) * width + ox + offset + px) * 3;
                    for c in 0..3 {
                        rgb[at + c] = (colour[c].clamp(0.0, 1.0) * 255.0).round() as u8;
                    }
                }
            }
        }
    }
    let file = File::create(path).expect("create the PNG file");
    let mut encoder = png::Encoder::new(BufWriter::new(file), width as u32, height as u32);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_compression(png::Compression::High);
    let mut writer = encoder.write_header().expect("PNG header");
    writer.write_image_data(&rgb).expect("PNG data");
}
