//! Times every layer, forward and forward+backward, at the shapes of
//! `scripts/torch_reference.py` the way that script does (median of repeated runs after a
//! warm-up) and, given its JSON output, prints the ratio table ours / PyTorch. See
//! `scripts/compare_with_pytorch.sh` (CPU) and `scripts/gpu_bundle` (a GPU through wgpu).
//!
//! ```text
//! cargo run --release --example speed_table -- [TORCH.json] [OPTIONS]
//!   --device flex|wgpu        where to run (default flex; wgpu needs `--features wgpu`)
//!   --path kernels|composite|both
//!                             the crate's kernels (default), the portable composites (the
//!                             reference maths as tensor ops under ordinary autodiff, what a
//!                             device without kernels runs), or both side by side
//!   --bandwidth-gbs X         the memory bandwidth to rate GAP's and GeM's forward against
//!   --measure-bandwidth       also measure the device's peak read bandwidth (Burn's probe)
//!   --reps N, --warm N        timed and warm-up runs per op (default 20 and 3; GSP 10 and 2)
//!   --quick                   3 timed runs after 1 warm-up (a dry run)
//!   --masked                  also time each GSP row with a mask (all positions valid): the
//!                             cost of selecting the padding away
//!   --only TEXT               time only the rows whose op name contains TEXT
//!   --memory                  only print the peak resident memory (VmHWM) that one OTK and
//!                             one SALAD forward+backward add (compare `torch_reference.py
//!                             memory`)
//! ```
//!
//! Every timed run ends by reading one value back from the device (the output, or the input's
//! gradient for forward+backward) and waiting for the device, so a GPU's queued work is inside
//! the time.

use std::time::Instant;

use burn::module::Param;
use burn::tensor::{Bool, Device, Distribution, Tensor};
use burn_pooling::OtkConfig;
use burn_pooling::PoolingInput;
use burn_pooling::ops::with_composites;
use burn_pooling::{AttentionPoolConfig, LseConfig, SimPoolConfig};
use burn_pooling::{GapConfig, GapGmpConfig, GemConfig, GmpConfig, GroupGemConfig, Gsp, GspConfig};
use burn_pooling::{NetVladConfig, NetVladVersion};
use burn_pooling::{OtAggregationConfig, OtSinkhorn};

const USAGE: &str = "usage: speed_table [TORCH.json] [--device flex|wgpu] \
[--path kernels|composite|both] [--bandwidth-gbs X] [--measure-bandwidth] [--reps N] \
[--warm N] [--quick] [--masked] [--only TEXT] [--memory]";

/// Which of the crate's two routes runs the layers' ops.
#[derive(Clone, Copy, PartialEq)]
enum Route {
    /// The extension's kernels (`PoolingOps`) with their closed-form backward.
    Kernels,
    /// The portable composites (`burn_pooling::ops::with_composites`).
    Composite,
}

impl Route {
    fn name(self) -> &'static str {
        match self {
            Route::Kernels => "kernels",
            Route::Composite => "composite",
        }
    }

    fn run<R>(self, f: impl FnOnce() -> R) -> R {
        match self {
            Route::Kernels => f(),
            Route::Composite => with_composites(f),
        }
    }
}

struct Options {
    torch: Option<String>,
    device: String,
    routes: Vec<Route>,
    bandwidth_gbs: Option<f64>,
    measure_bandwidth: bool,
    /// (timed, warm-up) runs for the pooling layers, then for GSP.
    runs: [(usize, usize); 2],
    /// Also time GSP with a mask.
    masked: bool,
    /// Only measure SALAD's peak memory.
    memory: bool,
}

/// `--only`: the text an op's name must contain to be timed (set once, in `parse_args`).
static ONLY: std::sync::OnceLock<String> = std::sync::OnceLock::new();

fn fail(message: &str) -> ! {
    eprintln!("speed_table: {message}\n{USAGE}");
    std::process::exit(2)
}

fn parse_args() -> Options {
    let mut options = Options {
        torch: None,
        device: "flex".into(),
        routes: vec![Route::Kernels],
        bandwidth_gbs: None,
        measure_bandwidth: false,
        runs: [(20, 3), (10, 2)],
        masked: false,
        memory: false,
    };
    let (mut reps, mut warm) = (None, None);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |flag: &str| {
            args.next()
                .unwrap_or_else(|| fail(&format!("{flag} needs a value")))
        };
        let count = |flag: &str, text: String| -> usize {
            text.parse()
                .unwrap_or_else(|_| fail(&format!("{flag}: expected a count, got {text:?}")))
        };
        match arg.as_str() {
            "--device" => options.device = value("--device"),
            "--path" => {
                options.routes = match value("--path").as_str() {
                    "kernels" => vec![Route::Kernels],
                    "composite" => vec![Route::Composite],
                    "both" => vec![Route::Kernels, Route::Composite],
                    other => fail(&format!(
                        "--path: expected kernels, composite or both, got {other:?}"
                    )),
                }
            }
            "--bandwidth-gbs" => {
                let text = value("--bandwidth-gbs");
                let gbs: f64 = text.parse().unwrap_or_else(|_| {
                    fail(&format!("--bandwidth-gbs: expected GB/s, got {text:?}"))
                });
                if !gbs.is_finite() || gbs <= 0.0 {
                    fail(&format!(
                        "--bandwidth-gbs: expected a positive GB/s, got {gbs}"
                    ));
                }
                options.bandwidth_gbs = Some(gbs);
            }
            "--measure-bandwidth" => options.measure_bandwidth = true,
            "--reps" => reps = Some(count("--reps", value("--reps")).max(1)),
            "--warm" => warm = Some(count("--warm", value("--warm"))),
            "--quick" => (reps, warm) = (Some(3), Some(1)),
            "--masked" => options.masked = true,
            "--only" => {
                ONLY.set(value("--only")).expect("--only is parsed once");
            }
            "--memory" => options.memory = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0)
            }
            flag if flag.starts_with("--") => fail(&format!("unknown option {flag}")),
            path => options.torch = Some(path.to_string()),
        }
    }
    for runs in &mut options.runs {
        *runs = (reps.unwrap_or(runs.0), warm.unwrap_or(runs.1));
    }
    options
}

/// The device `--device` names.
fn device(name: &str) -> Device {
    match name {
        "flex" => Device::flex(),
        #[cfg(feature = "wgpu")]
        "wgpu" => Device::wgpu(burn::tensor::DeviceKind::DefaultDevice),
        #[cfg(not(feature = "wgpu"))]
        "wgpu" => fail("--device wgpu: this build has no wgpu (build with `--features wgpu`)"),
        other => fail(&format!("--device: expected flex or wgpu, got {other:?}")),
    }
}

/// What runs the layers: the adapter's own name where the device has one (a wgpu adapter),
/// whether it is a card or a software/CPU adapter, and the peak read bandwidth if asked for.
/// Returns that peak in GB/s.
fn describe(device: &Device, measure: bool) -> Option<f64> {
    println!("device: {device:?}");
    #[cfg(feature = "wgpu")]
    if let Some(identity) = device.identity() {
        let kind = match &identity.physical {
            Some(card) => format!("a card, {card:?}"),
            None => "no card: a software rasteriser or CPU adapter".to_string(),
        };
        println!(
            "adapter: {} (kernels compiled for {}; {kind})",
            identity.name, identity.fingerprint
        );
        if measure {
            use burn::tensor::{MemoryAccess, ThroughputKey, ThroughputMode};
            let key = ThroughputKey {
                mode: ThroughputMode::memory(MemoryAccess::Read),
            };
            let stat = device.performance_stats(&[key]).pop();
            match stat.map(|stat| stat.value) {
                Some(Ok(value)) => {
                    let gbs = value.bytes_per_s(&key) / 1e9;
                    println!("measured peak read bandwidth: {gbs:.1} GB/s (Burn's memory probe)");
                    return Some(gbs);
                }
                Some(Err(error)) => println!("measured peak read bandwidth: none ({error})"),
                None => println!("measured peak read bandwidth: none (no cubecl device)"),
            }
        }
        return None;
    }
    if measure {
        println!("measured peak read bandwidth: none (only a wgpu device has Burn's probe)");
    }
    None
}

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

/// Waits for `value`: reads one element back (Flex is eager; on a GPU this flushes the queue up
/// to it), then waits for everything else queued on its device.
fn sync<const D: usize>(value: Tensor<D>) {
    let device = value.device();
    let _ = value
        .flatten::<1>(0, D - 1)
        .slice(0..1)
        .into_scalar::<f32>();
    device
        .sync()
        .unwrap_or_else(|error| panic!("speed_table: device sync failed: {error:?}"));
}

/// Runs the backward of `loss` and waits for the gradient of `input`.
fn backward_sync<const D: usize>(loss: Tensor<1>, input: &Tensor<D>) {
    let grads = loss.backward();
    sync(input.grad(&grads).expect("the input is tracked"));
}

/// One row of the table: an op at one shape, timed on each route.
struct Row {
    op: &'static str,
    torch_op: &'static str,
    shape: String,
    /// Bytes a forward must read at least (the input, once), for the ops rated in GB/s.
    rated_bytes: Option<usize>,
    /// (forward ms, forward+backward ms) per route, in `Options::routes` order.
    times: Vec<(f64, f64)>,
}

impl Row {
    /// Times `forward` and `forward_backward` on each route (median of `reps` after `warm`
    /// runs each), one route after the other.
    fn timed(
        (op, torch_op, shape): (&'static str, &'static str, String),
        routes: &[Route],
        (reps, warm): (usize, usize),
        forward: impl Fn(),
        forward_backward: impl Fn(),
    ) -> Self {
        let skipped = ONLY.get().is_some_and(|only| !op.contains(only.as_str()));
        if !skipped {
            eprintln!("timing {op} {shape}");
        }
        let times = routes
            .iter()
            .filter(|_| !skipped)
            .map(|route| {
                route.run(|| {
                    (
                        median_ms(reps, warm, &forward),
                        median_ms(reps, warm, &forward_backward),
                    )
                })
            })
            .collect();
        Self {
            op,
            torch_op,
            shape,
            rated_bytes: None,
            times,
        }
    }
}

/// SALAD's input, DINOv2 ViT-B/14 tokens of a 224 image with the class token (the global
/// token): `[32, 1 + 256, 768]`, and its layer (m = 64, l = 128, the reference's 3 iterations).
const SALAD_TOKENS: [usize; 3] = [32, 257, 768];

fn salad_config() -> OtAggregationConfig {
    OtAggregationConfig::new(SALAD_TOKENS[2]).with_sinkhorn(OtSinkhorn::Fixed { iterations: 3 })
}

/// The process's peak resident memory (VmHWM) in kB, from /proc/self/status (Linux).
fn peak_rss_kb() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// `--memory`: the peak resident memory that one OTK forward+backward, then one SALAD
/// forward+backward (training, dropout on), adds to the peak before it (the layer and its
/// input allocated), as `torch_reference.py memory` measures PyTorch's. OTK first: the peak
/// only rises. Only meaningful on a CPU device.
fn salad_memory(device: &Device) {
    let train = device.clone().autodiff();
    {
        let (b, n, c, p) = (64, 196, 256, 16);
        let otk = OtkConfig::new(c).with_num_references(p).init(&train);
        let x = Tensor::<3>::random([b, n, c], Distribution::Uniform(0.0, 1.0), &train);
        sync(x.clone());
        let before = peak_rss_kb();
        let x = x.require_grad();
        backward_sync(otk.forward_tokens(x.clone()).sum(), &x);
        if let (Some(before), Some(after)) = (before, peak_rss_kb()) {
            println!(
                "Otk (p = 16, implicit backward) [{b}, {n}, {c}]: one forward+backward adds {:.1} MB (VmHWM over the peak before)",
                (after - before) as f64 * 1024.0 / 1e6
            );
        }
    }
    let layer = salad_config().init(&train);
    let tokens = Tensor::<3>::random(SALAD_TOKENS, Distribution::Normal(0.0, 1.0), &train);
    sync(tokens.clone());
    let before = peak_rss_kb();
    let x = tokens.require_grad();
    backward_sync(layer.forward_tokens(x.clone()).sum(), &x);
    let after = peak_rss_kb();
    match (before, after) {
        (Some(before), Some(after)) => println!(
            "OtAggregation (3 iterations, implicit backward) {SALAD_TOKENS:?} m=64 l=128: one forward+backward adds {:.1} MB (VmHWM over the peak before)",
            (after - before) as f64 * 1024.0 / 1e6
        ),
        _ => println!("OtAggregation: no /proc/self/status VmHWM on this system"),
    }
}

fn main() {
    let options = parse_args();
    let device = device(&options.device);
    if options.memory {
        return salad_memory(&device);
    }
    let measured_peak = describe(&device, options.measure_bandwidth);
    let routes = &options.routes;
    let [runs, gsp_runs] = options.runs;
    let train = device.clone().autodiff();
    device.seed(0);
    let mut rows = Vec::new();

    for (b, n, c) in [(64, 49, 2048), (64, 196, 768)] {
        let side = (n as f64).sqrt() as usize;
        let x = Tensor::<3>::random([b, n, c], Distribution::Uniform(0.0, 1.0), &device);
        let maps = x.clone().swap_dims(1, 2).reshape([b, c, side, side]);
        let maps = Tensor::<4>::from_data(maps.into_data(), &device);
        let maps_t = Tensor::<4>::from_data(maps.to_data(), &train);
        let tokens_t = Tensor::<3>::from_data(x.to_data(), &train);
        let shape = format!("[{b}, {c}, {side}, {side}]");
        let bytes = 4 * b * n * c;

        // A layer over the maps, timed as `op` (its twin on the autodiff device for the backward).
        let mut time_maps =
            |op,
             torch_op,
             rated: bool,
             forward: &dyn Fn(Tensor<4>) -> Tensor<2>,
             train_forward: &dyn Fn(Tensor<4>) -> Tensor<2>| {
                let mut row = Row::timed(
                    (op, torch_op, shape.clone()),
                    routes,
                    runs,
                    || sync(forward(maps.clone())),
                    || {
                        let input = maps_t.clone().require_grad();
                        backward_sync(train_forward(input.clone()).sum(), &input);
                    },
                );
                row.rated_bytes = rated.then_some(bytes);
                rows.push(row);
            };
        let gap = GapConfig::new().init();
        time_maps("GAP", "gap_nchw", true, &|m| gap.forward(m), &|m| {
            gap.forward(m)
        });
        let gmp = GmpConfig::new().init();
        time_maps("GMP", "gmp_nchw", false, &|m| gmp.forward(m), &|m| {
            gmp.forward(m)
        });
        let gap_gmp = GapGmpConfig::new().init();
        time_maps(
            "GAP+GMP",
            "gap_gmp_nchw(sum)",
            false,
            &|m| gap_gmp.forward(m),
            &|m| gap_gmp.forward(m),
        );
        let (gem, gem_t) = (
            GemConfig::new().init(&device),
            GemConfig::new().init(&train),
        );
        time_maps(
            "GeM",
            "gem_nchw(cirtorch)",
            true,
            &|m| gem.forward(m),
            &|m| gem_t.forward(m),
        );

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
            routes,
            runs,
            || sync(ggem.forward_tokens(x.clone())),
            || {
                let input = tokens_t.clone().require_grad();
                backward_sync(ggem_t.forward_tokens(input.clone()).sum(), &input);
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
            routes,
            gsp_runs,
            || sync(gsp.forward_tokens(x.clone())),
            || {
                let input = x_t.clone().require_grad();
                let out = gsp_t.forward_detailed(PoolingInput::tokens(input.clone()));
                backward_sync(out.pooled.sum() + out.attributes.sum(), &input);
            },
        ));
        if options.masked {
            // Every position valid: the layer's result is the unmasked one, and the time
            // difference is the mask's cost (the select that keeps padding out).
            let (mask, mask_t) = (
                Tensor::<2, Bool>::ones([b, n], &device),
                Tensor::<2, Bool>::ones([b, n], &train),
            );
            rows.push(Row::timed(
                (
                    "GSP, masked (all valid)",
                    "gsp_tokens_masked",
                    format!("[{b}, {n}, {d}], K = {k}"),
                ),
                routes,
                gsp_runs,
                || sync(gsp.forward(PoolingInput::tokens(x.clone()).with_mask(mask.clone()))),
                || {
                    let input = x_t.clone().require_grad();
                    let masked = PoolingInput::tokens(input.clone()).with_mask(mask_t.clone());
                    let out = gsp_t.forward_detailed(masked);
                    backward_sync(out.pooled.sum() + out.attributes.sum(), &input);
                },
            ));
        }
    }

    // Attention pooling over a ViT-B/16's token set (196 patches + the class token, all 197
    // pooled on both sides): MAP (8 heads, one latent, its MLP) and SimPool, plain and with
    // γ = 1.25 and β (the ViT setting). The backward reaches the input and every parameter.
    {
        let (b, n, c) = (64, 197, 768);
        let x = Tensor::<3>::random([b, n, c], Distribution::Uniform(-1.0, 1.0), &device);
        let x_t = Tensor::<3>::from_data(x.to_data(), &train);
        let shape = format!("[{b}, {n}, {c}]");
        let map = AttentionPoolConfig::new(c).init(&device);
        let map_t = AttentionPoolConfig::new(c).init(&train);
        rows.push(Row::timed(
            ("MAP", "map_tokens(H=8)", shape.clone()),
            routes,
            runs,
            || sync(map.forward_tokens(x.clone())),
            || {
                let input = x_t.clone().require_grad();
                backward_sync(map_t.forward_tokens(input.clone()).sum(), &input);
            },
        ));
        for (op, torch_op, config) in [
            ("SimPool", "simpool_tokens", SimPoolConfig::new(c)),
            (
                "SimPool, γ = 1.25 + β",
                "simpool_tokens(gamma=1.25+beta)",
                SimPoolConfig::new(c)
                    .with_gamma(Some(1.25))
                    .with_learnable_shift(true),
            ),
        ] {
            let pool = config.init(&device);
            let pool_t = config.init(&train);
            rows.push(Row::timed(
                (op, torch_op, shape.clone()),
                routes,
                runs,
                || sync(pool.forward_tokens(x.clone())),
                || {
                    let input = x_t.clone().require_grad();
                    backward_sync(pool_t.forward_tokens(input.clone()).sum(), &input);
                },
            ));
        }
    }

    // LSE (r = 10, learnable) at GeM's map shapes.
    for (b, n, c) in [(64, 49, 2048), (64, 196, 768)] {
        let side = (n as f64).sqrt() as usize;
        let maps =
            Tensor::<4>::random([b, c, side, side], Distribution::Uniform(0.0, 1.0), &device);
        let maps_t = Tensor::<4>::from_data(maps.to_data(), &train);
        let (lse, lse_t) = (
            LseConfig::new().init(&device),
            LseConfig::new().init(&train),
        );
        let mut row = Row::timed(
            (
                "LSE",
                "lse_nchw(timm)",
                format!("[{b}, {c}, {side}, {side}]"),
            ),
            routes,
            runs,
            || sync(lse.forward(maps.clone())),
            || {
                let input = maps_t.clone().require_grad();
                backward_sync(lse_t.forward(input.clone()).sum(), &input);
            },
        );
        row.rated_bytes = Some(4 * b * n * c);
        rows.push(row);
    }

    // NetVLAD V1 (the authors' experiments) on VGG16 conv5 maps at 224: [32, 512, 14, 14],
    // K = 64, decoupled assignment.
    {
        let (b, c, side, k) = (32, 512, 14, 64);
        let maps =
            Tensor::<4>::random([b, c, side, side], Distribution::Uniform(0.0, 1.0), &device);
        let maps_t = Tensor::<4>::from_data(maps.to_data(), &train);
        let config = NetVladConfig::new(c)
            .with_num_clusters(k)
            .with_version(NetVladVersion::V1);
        device.seed(1);
        let vlad = config.init(&device);
        train.seed(1);
        let vlad_t = config.init(&train);
        rows.push(Row::timed(
            // K is in the op's name: the shape is the input's, as the PyTorch script records it.
            (
                "NetVLAD (K = 64)",
                "netvlad_nchw(v1)",
                format!("[{b}, {c}, {side}, {side}]"),
            ),
            routes,
            runs,
            || sync(vlad.forward(maps.clone())),
            || {
                let input = maps_t.clone().require_grad();
                backward_sync(vlad_t.forward(input.clone()).sum(), &input);
            },
        ));
    }

    // OTK (one head, p = 16, ε = 0.1, the default stopping rule) on 14×14 tokens of width 256:
    // [64, 196, 256], uniform [0, 1) tokens (PyTorch's side runs the authors' 100 unrolled
    // kernel-domain iterations; the inputs keep their kernel finite).
    {
        let (b, n, c, p) = (64, 196, 256, 16);
        let x = Tensor::<3>::random([b, n, c], Distribution::Uniform(0.0, 1.0), &device);
        let x_t = Tensor::<3>::from_data(x.to_data(), &train);
        let config = OtkConfig::new(c).with_num_references(p);
        device.seed(1);
        let otk = config.init(&device);
        train.seed(1);
        let otk_t = config.init(&train);
        let solved = otk.forward_detailed(x.clone());
        eprintln!(
            "OTK [{b}, {n}, {c}], p = {p}: {} Sinkhorn iterations, converged {}",
            solved.iterations.into_scalar::<i64>(),
            solved.converged.into_scalar::<bool>()
        );
        rows.push(Row::timed(
            (
                "OTK (p = 16)",
                "otk_tokens(p=16 100 iterations)",
                format!("[{b}, {n}, {c}]"),
            ),
            routes,
            runs,
            || sync(otk.forward_tokens(x.clone())),
            || {
                let input = x_t.clone().require_grad();
                backward_sync(otk_t.forward_tokens(input.clone()).sum(), &input);
            },
        ));
    }

    // SALAD (OtAggregation, the reference's 3 iterations) on DINOv2 ViT-B/14 tokens with the
    // class token, m = 64, l = 128; forward+backward in training (dropout on).
    {
        let tokens = Tensor::<3>::random(SALAD_TOKENS, Distribution::Normal(0.0, 1.0), &device);
        let tokens_t = Tensor::<3>::from_data(tokens.to_data(), &train);
        device.seed(2);
        let layer = salad_config().init(&device);
        train.seed(2);
        let layer_t = salad_config().init(&train);
        let [b, n, c] = SALAD_TOKENS;
        rows.push(Row::timed(
            (
                "SALAD (m = 64 l = 128 3 iterations)",
                "salad_maps(3 iters unrolled)",
                format!("[{b}, {n}, {c}]"),
            ),
            routes,
            gsp_runs,
            || sync(layer.forward_tokens(tokens.clone())),
            || {
                let input = tokens_t.clone().require_grad();
                backward_sync(layer_t.forward_tokens(input.clone()).sum(), &input);
            },
        ));
    }

    let torch: Option<Vec<(String, f64, f64)>> = options.torch.as_ref().map(|path| {
        let text = std::fs::read_to_string(path)
            .unwrap_or_else(|error| fail(&format!("cannot read the torch JSON {path}: {error}")));
        parse_torch(&text)
    });
    // Rows `--only` skipped have no times.
    rows.retain(|row| !row.times.is_empty());
    print_table(&rows, routes, torch.as_deref());
    print_bandwidth(&rows, routes, options.bandwidth_gbs, measured_peak);
}

/// The ratio table: with one route, the columns `scripts/compare_with_pytorch.sh` has always
/// printed ("ours" = that route); with both, each route's times and its ratios to PyTorch, and
/// the kernels' time over the composites'.
fn print_table(rows: &[Row], routes: &[Route], torch: Option<&[(String, f64, f64)]>) {
    let both = routes.len() == 2;
    let mut header = String::from("| op | shape |");
    if both {
        for route in routes {
            let name = route.name();
            header += &format!(" {name} fwd ms | {name} fwd+bwd ms |");
        }
        header += " torch fwd ms | torch fwd+bwd ms |";
        for route in routes {
            let name = route.name();
            header += &format!(" {name}/torch fwd | {name}/torch fwd+bwd |");
        }
        header += " kernels/composite fwd | kernels/composite fwd+bwd |";
    } else {
        header += " ours fwd ms | ours fwd+bwd ms | torch fwd ms | torch fwd+bwd ms | ratio fwd | ratio fwd+bwd |";
    }
    if routes.len() == 1 {
        println!("path: {}", routes[0].name());
    }
    println!("{header}");
    println!("|{}", "---|".repeat(header.matches(" |").count()));
    let mut used = vec![false; torch.map_or(0, |t| t.len())];
    let ratio = |a: f64, b: f64| format!("{:.2}×", a / b);
    for row in rows {
        let reference = torch.and_then(|t| {
            let i = t
                .iter()
                .enumerate()
                .position(|(i, (op, _, _))| op == row.torch_op && !used[i])?;
            used[i] = true;
            Some((t[i].1, t[i].2))
        });
        let mut line = format!("| {} | {} |", row.op, row.shape);
        for (fwd, fwd_bwd) in &row.times {
            line += &format!(" {fwd:.2} | {fwd_bwd:.2} |");
        }
        match reference {
            Some((tf, tb)) => line += &format!(" {tf:.2} | {tb:.2} |"),
            None => line += " – | – |",
        }
        for (fwd, fwd_bwd) in &row.times {
            match reference {
                Some((tf, tb)) => {
                    line += &format!(" {} | {} |", ratio(*fwd, tf), ratio(*fwd_bwd, tb))
                }
                None => line += " – | – |",
            }
        }
        if both {
            let ((kf, kb), (cf, cb)) = (row.times[0], row.times[1]);
            line += &format!(" {} | {} |", ratio(kf, cf), ratio(kb, cb));
        }
        println!("{line}");
    }
}

/// Achieved bandwidth of the forwards rated in GB/s: the input's bytes (read at least once)
/// over the forward's median time, and its share of the given and the measured bandwidth.
fn print_bandwidth(rows: &[Row], routes: &[Route], given: Option<f64>, measured: Option<f64>) {
    let mut header = String::from("| op | shape | path | MB read | fwd ms | GB/s |");
    if let Some(gbs) = given {
        header += &format!(" of {gbs:.0} GB/s (given) |");
    }
    if let Some(gbs) = measured {
        header += &format!(" of {gbs:.0} GB/s (measured peak read) |");
    }
    println!();
    println!(
        "Achieved bandwidth of the forward (the input's bytes, read once, over the median time):"
    );
    println!("{header}");
    println!("|{}", "---|".repeat(header.matches(" |").count()));
    for row in rows {
        let Some(bytes) = row.rated_bytes else {
            continue;
        };
        for (route, (fwd, _)) in routes.iter().zip(&row.times) {
            let gbs = bytes as f64 / (fwd * 1e-3) / 1e9;
            let mut line = format!(
                "| {} | {} | {} | {:.1} | {:.3} | {:.2} |",
                row.op,
                row.shape,
                route.name(),
                bytes as f64 / 1e6,
                fwd,
                gbs
            );
            for reference in [given, measured].into_iter().flatten() {
                line += &format!(" {:.1} % |", 100.0 * gbs / reference);
            }
            println!("{line}");
        }
    }
}

/// `(op, fwd_ms, fwd_bwd_ms)` in file order from torch_reference.py's JSON (a flat, known
/// layout, read without a JSON crate: an op's name must not hold a comma).
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
