//! Criterion benchmarks of every layer, forward and forward+backward, at the shapes of the
//! PyTorch reference (`scripts/torch_reference.py`): ResNet-50 maps `[64, 2048, 7, 7]`,
//! ViT-B/16 tokens `[64, 196, 768]`, and GSP heads `[64, 49, 512]` (K = 64) and
//! `[128, 49, 128]` (K = 128). Throughput is the input's bytes.
//!
//! `cargo bench` runs them on Flex; `cargo bench --features wgpu` adds the wgpu device.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

use burn::tensor::{Device, Distribution, Tensor};
use burn_pooling::GspReadout;
use burn_pooling::OtkConfig;
use burn_pooling::PoolingInput;
use burn_pooling::{AttentionPoolConfig, SimPoolConfig};
use burn_pooling::{GapConfig, GemConfig, GroupGemConfig, GspConfig, LseConfig};
use burn_pooling::{NetVladConfig, NetVladVersion};
use burn_pooling::{OtAggregationConfig, OtSinkhorn};

fn devices() -> Vec<(&'static str, Device)> {
    #[allow(unused_mut)]
    let mut devices = vec![("flex", Device::flex())];
    #[cfg(feature = "wgpu")]
    devices.push((
        "wgpu",
        Device::wgpu(burn::tensor::DeviceKind::DefaultDevice),
    ));
    devices
}

/// Waits for the result (a no-op on Flex, a sync on a GPU).
fn sync(t: Tensor<2>) {
    let _ = t.slice([0..1, 0..1]).into_scalar::<f32>();
}

/// Runs the backward of `loss` and waits for the gradient of `input` (on a GPU the backward
/// is only queued until something is read).
fn backward_sync<const D: usize>(loss: Tensor<1>, input: &Tensor<D>) {
    let grads = loss.backward();
    let grad = input.grad(&grads).expect("the input is tracked");
    let _ = grad.flatten::<1>(0, D - 1).slice(0..1).into_scalar::<f32>();
}

fn bytes(shape: &[usize]) -> Throughput {
    Throughput::Bytes(4 * shape.iter().product::<usize>() as u64)
}

fn maps_and_tokens(c: &mut Criterion) {
    for (name, device) in devices() {
        let train = device.clone().autodiff();
        let (b, ch, side) = (64, 2048, 7);
        let maps = Tensor::<4>::random(
            [b, ch, side, side],
            Distribution::Uniform(0.0, 1.0),
            &device,
        );
        let maps_t = Tensor::<4>::from_data(maps.to_data(), &train);
        let mut group = c.benchmark_group(format!("maps [64, 2048, 7, 7] {name}"));
        group.throughput(bytes(&[b, ch, side, side]));
        group.sample_size(20);
        let gap = GapConfig::new().init();
        group.bench_function("GAP forward", |bench| {
            bench.iter(|| sync(gap.forward(maps.clone())))
        });
        let gem = GemConfig::new().init(&device);
        group.bench_function("GeM forward", |bench| {
            bench.iter(|| sync(gem.forward(maps.clone())))
        });
        let gem_t = GemConfig::new().init(&train);
        group.bench_function("GeM forward+backward", |bench| {
            bench.iter(|| {
                let x = maps_t.clone().require_grad();
                backward_sync(gem_t.forward(x.clone()).sum(), &x)
            })
        });
        // LSE at GeM's shape (timm's LsePlus2d on ResNet-50 maps): the exact and the series
        // branch are both evaluated, so this is its full cost.
        let lse = LseConfig::new().init(&device);
        group.bench_function("LSE forward", |bench| {
            bench.iter(|| sync(lse.forward(maps.clone())))
        });
        let lse_t = LseConfig::new().init(&train);
        group.bench_function("LSE forward+backward", |bench| {
            bench.iter(|| {
                let x = maps_t.clone().require_grad();
                backward_sync(lse_t.forward(x.clone()).sum(), &x)
            })
        });
        group.finish();

        let (b, n, ch) = (64, 196, 768);
        let tokens = Tensor::<3>::random([b, n, ch], Distribution::Uniform(0.0, 1.0), &device);
        let tokens_t = Tensor::<3>::from_data(tokens.to_data(), &train);
        let mut group = c.benchmark_group(format!("tokens [64, 196, 768] {name}"));
        group.throughput(bytes(&[b, n, ch]));
        group.sample_size(10);
        let ggem = GroupGemConfig::new(12).init(&device);
        group.bench_function("GGeM(12) forward", |bench| {
            bench.iter(|| sync(ggem.forward_tokens(tokens.clone())))
        });
        let ggem_t = GroupGemConfig::new(12).init(&train);
        group.bench_function("GGeM(12) forward+backward", |bench| {
            bench.iter(|| {
                let x = tokens_t.clone().require_grad();
                backward_sync(ggem_t.forward_tokens(x.clone()).sum(), &x)
            })
        });
        group.finish();
    }
}

fn gsp(c: &mut Criterion) {
    for (name, device) in devices() {
        let train = device.clone().autodiff();
        let mut group = c.benchmark_group(format!("GSP {name}"));
        group.sample_size(10);
        for (b, n, d, k) in [(64, 49, 512, 64), (128, 49, 128, 128)] {
            let x = Tensor::<3>::random([b, n, d], Distribution::Normal(0.0, 0.1), &device);
            let x_t = Tensor::<3>::from_data(x.to_data(), &train);
            let label = format!("[{b}, {n}, {d}] K={k}");
            group.throughput(bytes(&[b, n, d]));
            let layer = GspConfig::new(d).with_num_prototypes(k).init(&device);
            group.bench_with_input(BenchmarkId::new("forward", &label), &x, |bench, x| {
                bench.iter(|| sync(layer.forward_tokens(x.clone())))
            });
            let layer_t = GspConfig::new(d).with_num_prototypes(k).init(&train);
            group.bench_with_input(
                BenchmarkId::new("forward+backward", &label),
                &x_t,
                |bench, x| {
                    bench.iter(|| {
                        let x = x.clone().require_grad();
                        let out = layer_t.forward_detailed(PoolingInput::tokens(x.clone()));
                        backward_sync(out.pooled.sum() + out.attributes.sum(), &x)
                    })
                },
            );
        }
        group.finish();
    }
}

/// MAP and SimPool (γ = 1.25 + β) over a ViT-B/16's 197 tokens.
fn attention(c: &mut Criterion) {
    for (name, device) in devices() {
        let train = device.clone().autodiff();
        let (b, n, ch) = (64, 197, 768);
        let tokens = Tensor::<3>::random([b, n, ch], Distribution::Uniform(-1.0, 1.0), &device);
        let tokens_t = Tensor::<3>::from_data(tokens.to_data(), &train);
        let mut group = c.benchmark_group(format!("attention [64, 197, 768] {name}"));
        group.throughput(bytes(&[b, n, ch]));
        group.sample_size(10);
        let map = AttentionPoolConfig::new(ch).init(&device);
        group.bench_function("MAP forward", |bench| {
            bench.iter(|| sync(map.forward_tokens(tokens.clone())))
        });
        let map_t = AttentionPoolConfig::new(ch).init(&train);
        group.bench_function("MAP forward+backward", |bench| {
            bench.iter(|| {
                let x = tokens_t.clone().require_grad();
                backward_sync(map_t.forward_tokens(x.clone()).sum(), &x)
            })
        });
        let config = SimPoolConfig::new(ch)
            .with_gamma(Some(1.25))
            .with_learnable_shift(true);
        let sim = config.init(&device);
        group.bench_function("SimPool(γ) forward", |bench| {
            bench.iter(|| sync(sim.forward_tokens(tokens.clone())))
        });
        let sim_t = config.init(&train);
        group.bench_function("SimPool(γ) forward+backward", |bench| {
            bench.iter(|| {
                let x = tokens_t.clone().require_grad();
                backward_sync(sim_t.forward_tokens(x.clone()).sum(), &x)
            })
        });
        group.finish();
    }
}

/// NetVLAD V1 on VGG16 conv5 maps at 224, `[32, 512, 14, 14]`, K = 64 (the paper's setting).
fn netvlad(c: &mut Criterion) {
    for (name, device) in devices() {
        let train = device.clone().autodiff();
        let (b, ch, side, k) = (32, 512, 14, 64);
        let maps = Tensor::<4>::random(
            [b, ch, side, side],
            Distribution::Uniform(0.0, 1.0),
            &device,
        );
        let maps_t = Tensor::<4>::from_data(maps.to_data(), &train);
        let config = NetVladConfig::new(ch)
            .with_num_clusters(k)
            .with_version(NetVladVersion::V1);
        let mut group = c.benchmark_group(format!("NetVLAD [32, 512, 14, 14] K=64 {name}"));
        group.throughput(bytes(&[b, ch, side, side]));
        group.sample_size(10);
        let layer = config.init(&device);
        group.bench_function("forward", |bench| {
            bench.iter(|| sync(layer.forward(maps.clone())))
        });
        let layer_t = config.init(&train);
        group.bench_function("forward+backward", |bench| {
            bench.iter(|| {
                let x = maps_t.clone().require_grad();
                backward_sync(layer_t.forward(x.clone()).sum(), &x)
            })
        });
        group.finish();
    }
}

/// OTK on 14×14 tokens of width 256, `[64, 196, 256]`, one head, p = 16, ε = 0.1 (the
/// default stopping rule): forward, and forward+backward to the input.
fn otk(c: &mut Criterion) {
    for (name, device) in devices() {
        let train = device.clone().autodiff();
        let (b, n, ch, p) = (64, 196, 256, 16);
        let tokens = Tensor::<3>::random([b, n, ch], Distribution::Uniform(0.0, 1.0), &device);
        let tokens_t = Tensor::<3>::from_data(tokens.to_data(), &train);
        let config = OtkConfig::new(ch).with_num_references(p);
        let mut group = c.benchmark_group(format!("OTK [64, 196, 256] p=16 {name}"));
        group.throughput(bytes(&[b, n, ch]));
        group.sample_size(10);
        let layer = config.init(&device);
        group.bench_function("forward", |bench| {
            bench.iter(|| sync(layer.forward_tokens(tokens.clone())))
        });
        let layer_t = config.init(&train);
        group.bench_function("forward+backward", |bench| {
            bench.iter(|| {
                let x = tokens_t.clone().require_grad();
                backward_sync(layer_t.forward_tokens(x.clone()).sum(), &x)
            })
        });
        group.finish();
    }
}

criterion_group!(
    benches,
    maps_and_tokens,
    gsp,
    gsp_readouts,
    attention,
    netvlad,
    balanced,
    otk,
    ot_aggregation
);
criterion_main!(benches);

/// GSP's read-outs (docs/maths.md §10), forward and forward+backward (the read-out and the
/// attributes in the loss, waiting for the prototypes' gradient), K = 64: without a
/// projection on the GSP head's tokens `[64, 49, 512]`, where they differ only by their
/// reduction, and as the authors' ResNet-50 layer, maps `[64, 2048, 7, 7]` projected to
/// D = 512. The last row adds the max branch to the GeM read-out.
fn gsp_readouts(c: &mut Criterion) {
    let readouts = [
        ("mean", GspReadout::Mean, false),
        ("GeM", GspReadout::GeneralizedMean, false),
        ("max", GspReadout::Max, false),
        ("GeM+max branch", GspReadout::GeneralizedMean, true),
    ];
    // (label, the input's shape, channels, projection)
    let shapes: [(&str, &[usize], usize, Option<usize>); 2] = [
        ("tokens [64, 49, 512]", &[64, 49, 512], 512, None),
        (
            "maps [64, 2048, 7, 7] D=512",
            &[64, 2048, 7, 7],
            2048,
            Some(512),
        ),
    ];
    let input = |shape: &[usize], device: &Device| -> PoolingInput {
        let uniform = Distribution::Uniform(0.0, 1.0);
        match *shape {
            [b, n, c] => PoolingInput::tokens(Tensor::<3>::random([b, n, c], uniform, device)),
            [b, c, h, w] => PoolingInput::maps(Tensor::<4>::random([b, c, h, w], uniform, device)),
            _ => unreachable!(),
        }
    };
    for (name, device) in devices() {
        let train = device.clone().autodiff();
        let mut group = c.benchmark_group(format!("GSP read-outs {name}"));
        group.sample_size(10);
        for (label, shape, channels, projection) in shapes {
            let (x, x_t) = (input(shape, &device), input(shape, &train));
            group.throughput(bytes(shape));
            for (readout_name, readout, branch) in readouts {
                let config = GspConfig::new(channels)
                    .with_num_prototypes(64)
                    .with_projection(projection)
                    .with_readout(readout)
                    .with_max_branch(branch);
                let id = format!("{label} {readout_name}");
                let layer = config.init(&device);
                group.bench_function(BenchmarkId::new("forward", &id), |bench| {
                    bench.iter(|| sync(layer.forward(x.clone())))
                });
                let layer_t = config.init(&train);
                group.bench_function(BenchmarkId::new("forward+backward", &id), |bench| {
                    bench.iter(|| {
                        let out = layer_t.forward_detailed(x_t.clone());
                        let grads = (out.pooled.sum() + out.attributes.sum()).backward();
                        let grad = layer_t.prototypes.val().grad(&grads).expect("tracked");
                        let _ = grad.slice([0..1, 0..1]).into_scalar::<f32>();
                    })
                });
            }
        }
        group.finish();
    }
}

/// `transport::balanced_transport`, forward and forward+backward (waiting for the costs'
/// gradient): SALAD's shape, K = 64 clusters and a dustbin over N = 256 positions at ε = 1 (unit
/// column masses, the dustbin taking N − K), and OTK's, K = 16 over N = 196 at ε = 0.1
/// (uniform masses). Throughput is the costs' bytes.
fn balanced(c: &mut Criterion) {
    use burn_pooling::transport::{BalancedSettings, Dustbin, balanced_transport};
    for (name, device) in devices() {
        let train = device.clone().autodiff();
        let mut group = c.benchmark_group(format!("balanced transport {name}"));
        group.sample_size(10);
        for (b, k, n, epsilon, dustbin) in [(32, 64, 256, 1.0, true), (64, 16, 196, 0.1, false)] {
            let label = format!(
                "[{b}, {k}{}, {n}] eps={epsilon}",
                if dustbin { "+1" } else { "" }
            );
            group.throughput(bytes(&[b, k, n]));
            let settings = BalancedSettings::new(epsilon);
            let problem = |device: &Device| {
                let costs = Tensor::<3>::random([b, k, n], Distribution::Uniform(0.0, 2.0), device);
                let (rows, columns, bin) = if dustbin {
                    let bin = Dustbin {
                        cost: Tensor::<2>::full([b, n], 1.0, device),
                        mass: Tensor::<1>::full([b], (n - k) as f64, device),
                    };
                    let rows = Tensor::<2>::ones([b, k], device);
                    (rows, Tensor::<2>::ones([b, n], device), Some(bin))
                } else {
                    let rows = Tensor::<2>::full([b, k], 1.0 / k as f64, device);
                    (
                        rows,
                        Tensor::<2>::full([b, n], 1.0 / n as f64, device),
                        None,
                    )
                };
                (costs, rows, columns, bin)
            };
            let (costs, rows, columns, bin) = problem(&device);
            group.bench_function(BenchmarkId::new("forward", &label), |bench| {
                bench.iter(|| {
                    let solved = balanced_transport(
                        costs.clone(),
                        rows.clone(),
                        columns.clone(),
                        bin.clone(),
                        &settings,
                    );
                    sync(solved.plan.sum_dim(2).flatten(1, 2));
                })
            });
            let (costs, rows, columns, bin) = problem(&train);
            let weights = Tensor::<3>::random(
                [b, k + usize::from(dustbin), n],
                Distribution::Uniform(-1.0, 1.0),
                &train,
            );
            group.bench_function(BenchmarkId::new("forward+backward", &label), |bench| {
                bench.iter(|| {
                    let costs = costs.clone().require_grad();
                    let solved = balanced_transport(
                        costs.clone(),
                        rows.clone(),
                        columns.clone(),
                        bin.clone(),
                        &settings,
                    );
                    backward_sync((solved.plan * weights.clone()).sum(), &costs)
                })
            });
        }
        group.finish();
    }
}

/// SALAD's OtAggregation on DINOv2 ViT-B/14 tokens of a 224 image, `[32, 1 + 256, 768]` (the
/// class token is the global token), m = 64, l = 128: the fixed 3 iterations, the reference's
/// own 3 sweeps and the converged setting; forward+backward in training (dropout on), waiting for the input's
/// gradient.
fn ot_aggregation(c: &mut Criterion) {
    for (name, device) in devices() {
        let train = device.clone().autodiff();
        let (b, n, ch) = (32, 257, 768);
        let tokens = Tensor::<3>::random([b, n, ch], Distribution::Normal(0.0, 1.0), &device);
        let tokens_t = Tensor::<3>::from_data(tokens.to_data(), &train);
        let mut group = c.benchmark_group(format!("SALAD [32, 257, 768] m=64 {name}"));
        group.throughput(bytes(&[b, n, ch]));
        group.sample_size(10);
        for (label, sinkhorn) in [
            ("3 iterations", OtSinkhorn::Fixed { iterations: 3 }),
            (
                "the reference's 3 sweeps",
                OtSinkhorn::Reference { iterations: 3 },
            ),
            (
                "converged",
                OtSinkhorn::Converged {
                    max_iterations: 1000,
                    tolerance: 1e-6,
                },
            ),
        ] {
            let config = OtAggregationConfig::new(ch).with_sinkhorn(sinkhorn);
            let layer = config.init(&device);
            group.bench_function(BenchmarkId::new("forward", label), |bench| {
                bench.iter(|| sync(layer.forward_tokens(tokens.clone())))
            });
            let layer_t = config.init(&train);
            group.bench_function(BenchmarkId::new("forward+backward", label), |bench| {
                bench.iter(|| {
                    let x = tokens_t.clone().require_grad();
                    backward_sync(layer_t.forward_tokens(x.clone()).sum(), &x)
                })
            });
        }
        group.finish();
    }
}
