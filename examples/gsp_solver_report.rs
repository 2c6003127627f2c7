//! Measures GSP's transport solver: iterations to convergence per solver and transport ratio,
//! and the peak heap memory of a forward+backward pass as the iteration count grows (it must
//! stay flat: the backward is analytical, no iteration is taped).
//!
//! Run: `cargo run --release --example gsp_solver_report` (add `-- --f64` for the f64 table)

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use burn::tensor::{Device, Distribution, FloatDType, Tensor};
use burn_pooling::GspConfig;
use burn_pooling::PoolingInput;
use burn_pooling::transport::{
    TransportSettings, TransportSolver, partial_transport, transport_costs,
};

/// The system allocator, counting live and peak bytes.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn iterations(device: &Device, mu: f64, solver: TransportSolver, tolerance: f64) -> usize {
    device.seed(3);
    let features = Tensor::<3>::random([64, 49, 512], Distribution::Normal(0.0, 0.1), device);
    let prototypes = Tensor::<2>::random([64, 512], Distribution::Normal(0.0, 0.1), device);
    let costs = transport_costs(features, prototypes, burn_pooling::Layout::ChannelsLast);
    let mass = Tensor::<2>::full([64, 49], 1.0 / 49.0, device);
    let settings = TransportSettings {
        transport_ratio: mu,
        epsilon: 0.2,
        max_iterations: 2000,
        tolerance,
        solver,
    };
    partial_transport(costs, mass, &settings)
        .iterations
        .into_scalar::<i64>() as usize
}

/// Peak heap bytes above the starting level during one forward+backward of GSP at
/// `[64, 49, 512]`, K = 64, with exactly `max_iterations` Sinkhorn iterations (the tolerance is
/// unreachable, and at μ = 0.99 Sinkhorn's β still rises after 100 iterations, so the stall
/// test does not stop it either: every iteration runs).
fn peak_forward_backward(max_iterations: usize) -> usize {
    let device = Device::flex().autodiff();
    device.seed(5);
    let gsp = GspConfig::new(512)
        .with_solver(TransportSolver::Sinkhorn)
        .with_transport_ratio(0.99)
        .with_max_iterations(max_iterations)
        .with_tolerance(1e-30)
        .init(&device);
    let x =
        Tensor::<3>::random([64, 49, 512], Distribution::Normal(0.0, 0.1), &device).require_grad();
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let out = gsp.forward_detailed(PoolingInput::tokens(x.clone()));
    assert_eq!(out.iterations.into_scalar::<i64>() as usize, max_iterations);
    let grads = out.pooled.sum().backward();
    let grad = x.grad(&grads).unwrap();
    assert!(grad.is_finite().all().into_scalar::<bool>());
    PEAK.load(Ordering::Relaxed) - base
}

fn main() {
    println!("iterations to |Σt − μ| ≤ tol, GSP at [64, 49, 512], K = 64, ε = 0.2:");
    println!("| dtype | tol | μ | Newton | Sinkhorn |");
    println!("|---|---|---|---|---|");
    let report = |name: &str, device: &Device, tolerance: f64| {
        for mu in [0.3, 0.9] {
            let newton = iterations(device, mu, TransportSolver::Newton, tolerance);
            let sinkhorn = iterations(device, mu, TransportSolver::Sinkhorn, tolerance);
            println!("| {name} | {tolerance:e} | {mu} | {newton} | {sinkhorn} |");
        }
    };
    if std::env::args().any(|arg| arg == "--f64") {
        // The float dtype of the Flex device is set once, before any use, for the process.
        let mut device = Device::flex();
        device
            .configure(FloatDType::F64)
            .expect("Flex supports f64");
        report("f64", &device, 1e-12);
        return;
    }
    report("f32", &Device::flex(), 1e-6);

    println!();
    println!("peak heap above start, forward+backward, f32, analytical backward:");
    for iterations in [10, 100] {
        let peak = peak_forward_backward(iterations);
        println!(
            "  {iterations:>3} iterations: {:.2} MiB",
            peak as f64 / (1024.0 * 1024.0)
        );
    }
}
