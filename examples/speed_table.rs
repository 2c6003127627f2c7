//! Times every layer at the shapes of `../shared/bench/torch_reference.py` the way that script
//! does (median of repeated runs after a warm-up) and, given its JSON output, prints the ratio
//! table ours / PyTorch. See `scripts/compare_with_pytorch.sh`.
//!
//! Run: `cargo run --release --example speed_table [-- torch.json]`

use std::time::Instant;

use burn::module::Param;
use burn::tensor::{Device, Distribution, Tensor};
use burn_pooling::PoolingInput;
use burn_pooling::{GapConfig, GemConfig, GroupGemConfig, Gsp, GspConfig};

/// Median wall time in milliseconds of `f` over `reps` runs after `warm` runs.
fn median_ms(reps: usize, warm: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..warm {
        f();
    }
    let mut times: Vec<f64> = (0..reps)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// Forces the computation (Flex is eager, but reading one value also syncs a GPU).
fn sync(t: Tensor<2>) {
    let _ = t.slice([0..1, 0..1]).into_scalar::<f32>();
}

struct Row {
    op: &'static str,
    torch_op: &'static str,
    shape: String,
    fwd: f64,
    fwd_bwd: f64,
}

impl Row {
    /// Times `forward` and `forward_backward` (median of `reps` after `warm` runs each).
    fn timed(
        (op, torch_op, shape): (&'static str, &'static str, String),
        (reps, warm): (usize, usize),
        forward: impl FnMut(),
        forward_backward: impl FnMut(),
    ) -> Self {
        Self {
            op,
            torch_op,
            shape,
            fwd: median_ms(reps, warm, forward),
            fwd_bwd: median_ms(reps, warm, forward_backward),
        }
    }
}

fn main() {
    let device = Device::flex();
    let train = device.clone().autodiff();
    device.seed(0);
    let mut rows = Vec::new();

    for (name, (b, n, c)) in [
        ("resnet50_7x7", (64, 49, 2048)),
        ("vit_b16_224", (64, 196, 768)),
    ] {
        let side = (n as f64).sqrt() as usize;
        let x = Tensor::<3>::random([b, n, c], Distribution::Uniform(0.0, 1.0), &device);
        let maps = x.clone().swap_dims(1, 2).reshape([b, c, side, side]);
        let maps = Tensor::<4>::from_data(maps.into_data(), &device);
        let maps_t = Tensor::<4>::from_data(maps.to_data(), &train);
        let tokens_t = Tensor::<3>::from_data(x.to_data(), &train);
        let shape = format!("[{b}, {c}, {side}, {side}]");
        let _ = name;

        // A layer over the maps, timed as `op` (its twin on the autodiff device for the backward).
        let mut time_maps =
            |op,
             torch_op,
             forward: &dyn Fn(Tensor<4>) -> Tensor<2>,
             train_forward: &dyn Fn(Tensor<4>) -> Tensor<2>| {
                rows.push(Row::timed(
                    (op, torch_op, shape.clone()),
                    (20, 3),
                    || sync(forward(maps.clone())),
                    || {
                        let _ = train_forward(maps_t.clone().require_grad())
                            .sum()
                            .backward();
                    },
                ))
            };
        let gap = GapConfig::new().init();
        time_maps("GAP", "gap_nchw", &|m| gap.forward(m), &|m| gap.forward(m));
        let (gem, gem_t) = (
            GemConfig::new().init(&device),
            GemConfig::new().init(&train),
        );
        time_maps("GeM", "gem_nchw(cirtorch)", &|m| gem.forward(m), &|m| {
            gem_t.forward(m)
        });

        let groups = if c % 12 == 0 { 12 } else { 16 };
        let ggem = GroupGemConfig::new(groups).init(&device);
        let ggem_t = GroupGemConfig::new(groups).init(&train);
        let torch_op = if groups == 12 {
            "ggem_tokens(G=12)"
        } else {
            "ggem_tokens(G=16)"
        };
        rows.push(Row::timed(
            ("GGeM", torch_op, format!("[{b}, {n}, {c}]")),
            (20, 3),
            || sync(ggem.forward_tokens(x.clone())),
            || {
                let t = tokens_t.clone().require_grad();
                let _ = ggem_t.forward_tokens(t).sum().backward();
            },
        ));
    }

    for (b, n, d, k) in [(64, 49, 512, 64), (128, 49, 128, 128), (64, 196, 768, 64)] {
        let x = Tensor::<3>::random([b, n, d], Distribution::Normal(0.0, 0.1), &device);
        let protos = Tensor::<2>::random([k, d], Distribution::Normal(0.0, 0.1), &device);
        let make = |device: &Device| {
            let gsp = GspConfig::new(d).with_num_prototypes(k).init(device);
            Gsp {
                prototypes: Param::from_tensor(Tensor::from_data(protos.to_data(), device)),
                ..gsp
            }
        };
        let gsp = make(&device);
        let gsp_t = make(&train);
        let x_t = Tensor::<3>::from_data(x.to_data(), &train);
        rows.push(Row::timed(
            (
                "GSP",
                "gsp_tokens(analytic bwd)",
                format!("[{b}, {n}, {d}], K = {k}"),
            ),
            (10, 2),
            || sync(gsp.forward_tokens(x.clone())),
            || {
                let t = x_t.clone().require_grad();
                let out = gsp_t.forward_detailed(PoolingInput::tokens(t));
                let _ = (out.pooled.sum() + out.attributes.sum()).backward();
            },
        ));
    }

    let torch: Option<Vec<(String, f64, f64)>> = std::env::args().nth(1).map(|path| {
        let text = std::fs::read_to_string(&path).expect("readable torch JSON");
        parse_torch(&text)
    });
    println!(
        "| op | shape | ours fwd ms | ours fwd+bwd ms | torch fwd ms | torch fwd+bwd ms | ratio fwd | ratio fwd+bwd |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut used = vec![false; torch.as_ref().map_or(0, |t| t.len())];
    for row in &rows {
        let reference = torch.as_ref().and_then(|t| {
            let i = t
                .iter()
                .enumerate()
                .position(|(i, (op, _, _))| op == row.torch_op && !used[i])?;
            used[i] = true;
            Some((t[i].1, t[i].2))
        });
        match reference {
            Some((tf, tb)) => println!(
                "| {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2}× | {:.2}× |",
                row.op,
                row.shape,
                row.fwd,
                row.fwd_bwd,
                tf,
                tb,
                row.fwd / tf,
                row.fwd_bwd / tb
            ),
            None => println!(
                "| {} | {} | {:.2} | {:.2} | – | – | – | – |",
                row.op, row.shape, row.fwd, row.fwd_bwd
            ),
        }
    }
}

/// `(op, fwd_ms, fwd_bwd_ms)` in file order from torch_reference.py's JSON (a flat, known
/// layout, read without a JSON crate).
fn parse_torch(text: &str) -> Vec<(String, f64, f64)> {
    let field = |chunk: &str, key: &str| -> Option<String> {
        let start = chunk.find(&format!("\"{key}\""))? + key.len() + 3;
        let rest = chunk[start..].trim_start_matches([' ', ':']);
        let end = rest.find([',', '}', '\n']).unwrap_or(rest.len());
        Some(rest[..end].trim().trim_matches('"').to_string())
    };
    text.split("\"op\"")
        .skip(1)
        .filter_map(|chunk| {
            let chunk = format!("\"op\"{chunk}");
            Some((
                field(&chunk, "op")?,
                field(&chunk, "fwd_ms")?.parse().ok()?,
                field(&chunk, "fwd_bwd_ms")?.parse().ok()?,
            ))
        })
        .collect()
}
