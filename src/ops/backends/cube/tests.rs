//! Each CubeCL kernel against the portable body it replaces, on the wgpu device (lavapipe
//! without a GPU): with this crate's `fusion` feature through the fusion stream's custom
//! operations, without it directly. Each test also checks that the kernel, not the fallback,
//! ran ([`kernel_runs`]).

use burn::backend::Cube;
use burn::backend::tensor::FloatTensor;
use burn::tensor::{Device, DeviceKind, Tensor, TensorData};

use crate::layout::Layout;
use crate::maths::settings::{TransportSettings, TransportSolver};
use crate::ops::{PoolingOps, SumOver, TransportOutput, portable};

const EPS: f64 = 1e-6;
const TOLERANCE: f64 = 1e-5;

/// Runs `f`, which launches the kernel `id` and reads its result, and asserts the kernel ran:
/// under fusion, that the stream executed its custom operation (each test launches a different
/// kernel, so parallel tests do not count for each other); without, that `Cube`'s primitive is
/// the CubeCL tensor the kernels take.
fn kernel_runs<T>(id: &str, f: impl FnOnce() -> T) -> T {
    #[cfg(feature = "fusion")]
    let before = super::fusion::executed(id);
    #[cfg(not(feature = "fusion"))]
    assert!(
        super::unfused::kernels_apply(),
        "{id}: Cube's primitive is not a CubeTensor"
    );
    let output = f();
    #[cfg(feature = "fusion")]
    assert!(
        super::fusion::executed(id) > before,
        "{id}: the portable fallback ran, not the kernel"
    );
    output
}

fn device() -> Device {
    Device::wgpu(DeviceKind::DefaultDevice)
}

fn primitive<const D: usize>(values: &[f32], shape: [usize; D]) -> FloatTensor<Cube> {
    Tensor::<D>::from_data(TensorData::new(values.to_vec(), shape), &device())
        .try_into_primitive::<Cube>()
        .expect("a wgpu tensor")
}

fn read<const D: usize>(tensor: FloatTensor<Cube>) -> Vec<f32> {
    Tensor::<D>::from_primitive::<Cube>(tensor)
        .into_data()
        .to_vec::<f32>()
        .expect("f32 values")
}

/// A deterministic spread of values in [-0.5, 3), a fifth of them at or below ε.
fn features(len: usize) -> Vec<f32> {
    let mut state = 0x2545_f491_u32;
    (0..len)
        .map(|i| {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            match i % 5 {
                0 => [-0.3, 0.0, 1e-9, EPS as f32][i / 5 % 4],
                _ => (state >> 8) as f32 / (1 << 24) as f32 * 3.5 - 0.5,
            }
        })
        .collect()
}

/// Three samples of 49 positions: all valid; padded positions, one of them holding the
/// largest value of its sample; and only positions whose values are all below ε valid.
fn mask_and_features(
    channels: usize,
    layout: Layout,
) -> (Vec<f32>, Vec<f32>, [usize; 3], [usize; 2]) {
    let (batch, positions) = (3, 49);
    let mut x = features(batch * channels * positions);
    let index = |b: usize, c: usize, n: usize| {
        if layout.is_channels_last() {
            (b * positions + n) * channels + c
        } else {
            (b * channels + c) * positions + n
        }
    };
    let mut mask = vec![1.0f32; batch * positions];
    for n in (0..positions).step_by(3) {
        mask[positions + n] = 0.0;
    }
    for c in 0..channels {
        x[index(1, c, 0)] = 50.0; // padded: must not raise the maximum
    }
    for n in 0..positions {
        let valid = n % 7 == 0;
        mask[2 * positions + n] = if valid { 1.0 } else { 0.0 };
        for c in 0..channels {
            if valid {
                x[index(2, c, n)] = [-1.0, 0.0, 1e-8, 5e-7][(n + c) % 4];
            }
        }
    }
    let shape = if layout.is_channels_last() {
        [batch, positions, channels]
    } else {
        [batch, channels, positions]
    };
    (x, mask, shape, [batch, positions])
}

/// The largest absolute and relative differences; panics past the tolerance or on a
/// non-finite value.
fn compare(label: &str, kernel: &[f32], reference: &[f32]) -> (f64, f64) {
    compare_within(label, kernel, reference, TOLERANCE)
}

/// [`compare`] with `|kernel − portable| ≤ tolerance · max(|portable|, 1)`.
fn compare_within(label: &str, kernel: &[f32], reference: &[f32], tolerance: f64) -> (f64, f64) {
    assert_eq!(kernel.len(), reference.len(), "{label}");
    let (mut worst_abs, mut worst_rel) = (0.0f64, 0.0f64);
    for (i, (&k, &r)) in kernel.iter().zip(reference).enumerate() {
        let (k, r) = (k as f64, r as f64);
        assert!(k.is_finite() && r.is_finite(), "{label}[{i}]: {k} vs {r}");
        let abs = (k - r).abs();
        let rel = abs / r.abs().max(f64::MIN_POSITIVE);
        assert!(
            abs <= tolerance * r.abs().max(1.0),
            "{label}[{i}]: kernel {k}, portable {r}"
        );
        worst_abs = worst_abs.max(abs);
        worst_rel = worst_rel.max(rel);
    }
    eprintln!("{label}: max |Δ| = {worst_abs:e}, max |Δ|/|y| = {worst_rel:e}");
    (worst_abs, worst_rel)
}

#[test]
fn generalized_mean_kernel_matches_portable() {
    let powers = [1.0f32, 3.0, 0.5, 1000.0, 7.5, 2.0];
    for layout in [Layout::ChannelsFirst, Layout::ChannelsLast] {
        let (x, mask, shape, mask_shape) = mask_and_features(powers.len(), layout);
        let inputs = || {
            (
                primitive(&x, shape),
                primitive(&powers, [powers.len()]),
                primitive(&mask, mask_shape),
            )
        };
        let (xs, ps, ms) = inputs();
        let kernel = kernel_runs("burn_pooling::generalized_mean", || {
            read::<2>(<Cube as PoolingOps>::generalized_mean(
                xs, ps, ms, EPS, layout,
            ))
        });
        let (xs, ps, ms) = inputs();
        let reference = read::<2>(portable::generalized_mean::<Cube>(xs, ps, ms, EPS, layout));
        // The all-below-ε sample pools to ε; the padded 50 is not its sample's maximum.
        let near_eps = |y: f32| (y as f64 - EPS).abs() <= TOLERANCE * EPS;
        assert!(kernel[2 * powers.len()..].iter().all(|&y| near_eps(y)));
        assert!(
            kernel[powers.len()..2 * powers.len()]
                .iter()
                .all(|&y| y < 3.0)
        );
        let label = format!("generalized mean ({layout:?})");
        compare(&label, &kernel, &reference);
    }
}

#[test]
fn weighted_sum_kernel_matches_portable() {
    for layout in [Layout::ChannelsFirst, Layout::ChannelsLast] {
        let (x, mask, shape, mask_shape) = mask_and_features(6, layout);
        // Uneven weights, 0 on the padded positions.
        let weights: Vec<f32> = mask
            .iter()
            .enumerate()
            .map(|(i, &m)| m * (1.0 + (i % 7) as f32 / 10.0))
            .collect();
        let kernel = kernel_runs("burn_pooling::weighted_sum", || {
            read::<2>(<Cube as PoolingOps>::weighted_sum(
                primitive(&x, shape),
                primitive(&weights, mask_shape),
                layout,
                SumOver::Positions,
            ))
        });
        let reference = read::<2>(portable::weighted_sum::<Cube>(
            primitive(&x, shape),
            primitive(&weights, mask_shape),
            layout,
            SumOver::Positions,
        ));
        let label = format!("weighted sum ({layout:?})");
        compare(&label, &kernel, &reference);
    }
}
/// A deterministic upstream gradient in [-1, 1).
fn upstream(len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 37 % 101) as f32 / 50.5) - 1.0)
        .collect()
}

#[test]
fn generalized_mean_backward_kernel_matches_portable() {
    let powers = [1.0f32, 3.0, 0.5, 1000.0, 7.5, 2.0];
    let channels = powers.len();
    for layout in [Layout::ChannelsFirst, Layout::ChannelsLast] {
        let (x, mask, shape, mask_shape) = mask_and_features(channels, layout);
        let grad = upstream(shape[0] * channels);
        let output = read::<2>(portable::generalized_mean::<Cube>(
            primitive(&x, shape),
            primitive(&powers, [channels]),
            primitive(&mask, mask_shape),
            EPS,
            layout,
        ));
        let inputs = || {
            (
                primitive(&x, shape),
                primitive(&powers, [channels]),
                primitive(&mask, mask_shape),
                primitive(&output, [shape[0], channels]),
                primitive(&grad, [shape[0], channels]),
            )
        };
        let (xs, ps, ms, ys, gs) = inputs();
        let (kernel_dx, kernel_dp) = kernel_runs("burn_pooling::generalized_mean_backward", || {
            let (dx, dp) =
                <Cube as PoolingOps>::generalized_mean_backward(xs, ps, ms, ys, gs, EPS, layout);
            (read::<3>(dx), read::<1>(dp))
        });
        let (xs, ps, ms, ys, gs) = inputs();
        let (reference_dx, reference_dp) =
            portable::generalized_mean_backward::<Cube>(xs, ps, ms, ys, gs, EPS, layout);
        // Padded positions and values at or below ε get no gradient.
        for (i, (&dx, &v)) in kernel_dx.iter().zip(&x).enumerate() {
            let n = if layout.is_channels_last() {
                i / channels % shape[1]
            } else {
                i % shape[2]
            };
            let b = i / (shape[1] * shape[2]);
            if mask[b * mask_shape[1] + n] == 0.0 || v as f64 <= EPS {
                assert_eq!(dx, 0.0, "dx[{i}] of a padded or clamped value");
            }
        }
        let label = format!("generalized mean backward ({layout:?})");
        compare(
            &format!("{label}: dx"),
            &kernel_dx,
            &read::<3>(reference_dx),
        );
        compare(
            &format!("{label}: dp"),
            &kernel_dp,
            &read::<1>(reference_dp),
        );
    }
}

#[test]
fn weighted_sum_over_channels_kernel_matches_portable() {
    let channels = 6;
    for layout in [Layout::ChannelsFirst, Layout::ChannelsLast] {
        let (x, _, shape, _) = mask_and_features(channels, layout);
        let grad = upstream(shape[0] * channels);
        let run = |kernel: bool| {
            let (xs, gs) = (primitive(&x, shape), primitive(&grad, [shape[0], channels]));
            let over = SumOver::Channels;
            read::<2>(if kernel {
                <Cube as PoolingOps>::weighted_sum(xs, gs, layout, over)
            } else {
                portable::weighted_sum::<Cube>(xs, gs, layout, over)
            })
        };
        let label = format!("weighted sum over channels, the weights' gradient ({layout:?})");
        let kernel = kernel_runs("burn_pooling::weighted_sum", || run(true));
        compare(&label, &kernel, &run(false));
    }
}

/// The user's path: GeM's forward and backward on the wgpu device with autodiff, through the
/// crate's routing, run the generalized mean's kernels (fused: as the stream's custom
/// operations), and agree with the composite differentiated by autodiff.
#[cfg(feature = "autodiff")]
#[test]
fn routed_generalized_mean_runs_the_kernels() {
    use crate::maths::generalized_mean::composite_forward;
    let device = device().autodiff();
    let powers = [3.0f32, 1.5, 2.0];
    let layout = Layout::ChannelsLast;
    // Values away from the clamp (where the composite's derivative of max(x, ε) is a matter
    // of ties), every position valid: the kernels' edge cases are the tests' above.
    let (batch, positions) = (2, 9);
    let shape = [batch, positions, powers.len()];
    let x: Vec<f32> = features(batch * positions * powers.len())
        .iter()
        .map(|v| v.abs() + 0.25)
        .collect();
    let (mask, mask_shape) = (vec![1.0f32; batch * positions], [batch, positions]);
    let gradient = |kernel: bool| {
        let xs = Tensor::<3>::from_data(TensorData::new(x.clone(), shape), &device).require_grad();
        let ps =
            Tensor::<1>::from_data(TensorData::new(powers.to_vec(), [3]), &device).require_grad();
        let ms = Tensor::<2>::from_data(TensorData::new(mask.clone(), mask_shape), &device);
        let y = if kernel {
            let mask = Some(ms.bool());
            crate::ops::routing::generalized_mean(xs.clone(), ps.clone(), mask, EPS, layout)
        } else {
            composite_forward(xs.clone(), ps.clone(), Some(ms), EPS, layout)
        };
        let grads = (y.clone() * y.clone()).sum().backward();
        let values = |t: Tensor<3>| t.into_data().to_vec::<f32>().expect("f32");
        let dx = values(xs.grad(&grads).expect("x is tracked"));
        let dp = ps.grad(&grads).expect("p is tracked");
        (dx, dp.into_data().to_vec::<f32>().expect("f32"))
    };
    let (kernel_dx, kernel_dp) = kernel_runs("burn_pooling::generalized_mean", || {
        kernel_runs("burn_pooling::generalized_mean_backward", || gradient(true))
    });
    let (reference_dx, reference_dp) = gradient(false);
    compare("routed GeM: dx", &kernel_dx, &reference_dx);
    compare("routed GeM: dp", &kernel_dp, &reference_dp);
}

/// GSP's costs `[3, 5, 49]` in [0, 2) and masses `[3, 49]`: uniform; a third of the positions
/// padded (mass 0), the rest uniform; uniform.
fn costs_and_mass() -> (Vec<f32>, [usize; 3], Vec<f32>, [usize; 2]) {
    let (batch, count, positions) = (3, 5, 49);
    let costs = features(batch * count * positions)
        .iter()
        .map(|v| (v + 0.5) / 1.75)
        .collect();
    let mut mass = vec![1.0 / positions as f32; batch * positions];
    let padded: Vec<usize> = (0..positions).filter(|n| n % 3 == 1).collect();
    let valid = (positions - padded.len()) as f32;
    for n in 0..positions {
        mass[positions + n] = if n % 3 == 1 { 0.0 } else { 1.0 / valid };
    }
    (costs, [batch, count, positions], mass, [batch, positions])
}

fn newton(transport_ratio: f64) -> TransportSettings {
    TransportSettings {
        transport_ratio,
        epsilon: 0.2,
        max_iterations: 100,
        tolerance: 1e-6,
        solver: TransportSolver::Newton,
    }
}

fn read_int(tensor: burn::backend::tensor::IntTensor<Cube>) -> Vec<i64> {
    Tensor::<1, burn::tensor::Int>::from_primitive::<Cube>(tensor)
        .into_data()
        .convert::<i64>()
        .to_vec::<i64>()
        .expect("i64 values")
}

/// The solve on the device (μ ≤ ½: Newton from below; μ > ½: from above) against the portable
/// solver, plan and marginals. Both stop once the mass is within the tolerance 10⁻⁶ of μ, so
/// their β differ by at most about 10⁻⁶ / F'(β), and each plan entry (at most 1/N) by about
/// 10⁻⁶ · P_kj: 10⁻⁶ absolute holds that with f32 rounding to spare.
#[test]
fn partial_transport_kernel_matches_portable() {
    let (costs, shape, mass, mass_shape) = costs_and_mass();
    for ratio in [0.3, 0.7] {
        let settings = newton(ratio);
        for output in [TransportOutput::Plan, TransportOutput::Marginals] {
            let run = |kernel: bool| {
                let (cs, ms) = (primitive(&costs, shape), primitive(&mass, mass_shape));
                let (first, plan, iterations, _) = if kernel {
                    <Cube as PoolingOps>::partial_transport(cs, ms, settings, output)
                } else {
                    portable::partial_transport::<Cube>(cs, ms, settings, output)
                };
                let first = match output {
                    TransportOutput::Plan => read::<3>(first),
                    TransportOutput::Marginals => read::<2>(first),
                };
                (first, read::<3>(plan), read_int(iterations))
            };
            let (first, plan, iterations) =
                kernel_runs("burn_pooling::partial_transport", || run(true));
            let (reference_first, reference_plan, reference_iterations) = run(false);
            let label = format!("partial transport (μ = {ratio}, {output:?})");
            compare_within(&format!("{label}: plan"), &plan, &reference_plan, 1e-6);
            compare_within(&format!("{label}: output"), &first, &reference_first, 1e-6);
            // The padded positions get no mass; each sample sends μ.
            let (count, positions) = (shape[1], shape[2]);
            let rows = (count + 1) * positions;
            for n in (1..positions).step_by(3) {
                for k in 0..=count {
                    assert_eq!(plan[rows + k * positions + n], 0.0, "padded position {n}");
                }
            }
            for b in 0..shape[0] {
                let sent: f32 = plan[b * rows + positions..(b + 1) * rows].iter().sum();
                assert!(
                    (sent as f64 - ratio).abs() < 1e-5,
                    "sample {b} sends {sent}"
                );
            }
            assert!(iterations[0] > 0 && iterations[0] < 20, "{iterations:?}");
            assert!(
                iterations[0].abs_diff(reference_iterations[0]) <= 1,
                "{label}: {iterations:?} vs {reference_iterations:?}"
            );
        }
    }
}

fn read_bool(tensor: burn::backend::tensor::BoolTensor<Cube>) -> bool {
    Tensor::<1, burn::tensor::Bool>::from_primitive::<Cube>(tensor).into_scalar::<bool>()
}

/// The kernel's stopping rule: a tolerance below f32's resolution with `max_iterations` =
/// usize::MAX stops at the rounding floor (no wrapping cast to u32, no spin); a
/// NaN cost stops its sample, unconverged, and leaves the others their plan; costs near 1e30
/// still move exactly μ (ℓ anchored), converged.
#[test]
fn partial_transport_kernel_stops_and_says_why() {
    let (costs, shape, mass, mass_shape) = costs_and_mass();
    let (count, positions) = (shape[1], shape[2]);
    let rows = (count + 1) * positions;
    let solve = |costs: &[f32], settings: TransportSettings| {
        let (cs, ms) = (primitive(costs, shape), primitive(&mass, mass_shape));
        kernel_runs("burn_pooling::partial_transport", || {
            let (_, plan, iterations, converged) =
                <Cube as PoolingOps>::partial_transport(cs, ms, settings, TransportOutput::Plan);
            (
                read::<3>(plan),
                read_int(iterations)[0],
                read_bool(converged),
            )
        })
    };
    let sent =
        |plan: &[f32], b: usize| -> f32 { plan[b * rows + positions..(b + 1) * rows].iter().sum() };
    for ratio in [0.3, 0.7] {
        let stuck = TransportSettings {
            max_iterations: usize::MAX,
            tolerance: 1e-30,
            ..newton(ratio)
        };
        // Converged only where the residual happens to be exactly 0; never a spin.
        let (_, iterations, _) = solve(&costs, stuck);
        assert!(iterations < 300, "μ = {ratio}: {iterations}");
        let reachable = TransportSettings {
            max_iterations: usize::MAX,
            ..newton(ratio)
        };
        let (_, _, converged) = solve(&costs, reachable);
        assert!(converged, "μ = {ratio}");

        let mut broken = costs.clone();
        broken[count * positions + 2] = f32::NAN;
        let (plan, iterations, converged) = solve(&broken, newton(ratio));
        assert!(!converged && iterations <= 100, "μ = {ratio}: {iterations}");
        for b in [0, 2] {
            assert!(
                (sent(&plan, b) as f64 - ratio).abs() < 1e-5,
                "μ = {ratio}: sample {b}"
            );
        }

        let huge: Vec<f32> = costs.iter().map(|c| 1e30 * (1.0 + c * 1e-6)).collect();
        let (plan, _, converged) = solve(&huge, newton(ratio));
        for b in 0..shape[0] {
            let right = (sent(&plan, b) as f64 - ratio).abs() < 1e-5;
            assert!(
                right || !converged,
                "μ = {ratio}: sample {b} sends {}",
                sent(&plan, b)
            );
        }
    }
}

/// The implicit backward on the device against the portable one, for an upstream gradient of
/// the plan and of its marginals, at a plan the portable solver computed.
#[test]
fn partial_transport_backward_kernel_matches_portable() {
    let (costs, shape, mass, mass_shape) = costs_and_mass();
    let (batch, count, positions) = (shape[0], shape[1], shape[2]);
    let epsilon = 0.2;
    let (_, plan, _, _) = portable::partial_transport::<Cube>(
        primitive(&costs, shape),
        primitive(&mass, mass_shape),
        newton(0.3),
        TransportOutput::Plan,
    );
    let plan = read::<3>(plan);
    let plan_shape = [batch, count + 1, positions];
    for output in [TransportOutput::Plan, TransportOutput::Marginals] {
        let grad_shape = match output {
            TransportOutput::Plan => vec![batch, count + 1, positions],
            TransportOutput::Marginals => vec![batch, positions + count],
        };
        let grad = upstream(grad_shape.iter().product());
        let run = |kernel: bool| {
            let (ps, ms) = (primitive(&plan, plan_shape), primitive(&mass, mass_shape));
            let gs = match output {
                TransportOutput::Plan => primitive(&grad, [batch, count + 1, positions]),
                TransportOutput::Marginals => primitive(&grad, [batch, positions + count]),
            };
            read::<3>(if kernel {
                <Cube as PoolingOps>::partial_transport_backward(ps, gs, ms, epsilon, output)
            } else {
                portable::partial_transport_backward::<Cube>(ps, gs, ms, epsilon, output)
            })
        };
        let kernel = kernel_runs("burn_pooling::partial_transport_backward", || run(true));
        let label = format!("partial transport backward ({output:?})");
        compare_within(&label, &kernel, &run(false), 1e-6);
    }
}

/// Features of three samples of 49 positions and 6 channels, the first scaled into the unit
/// ball (φ keeps them), the others mostly outside it (φ shrinks them), and 5 prototypes, two
/// inside the ball.
fn features_and_prototypes(layout: Layout) -> (Vec<f32>, [usize; 3], Vec<f32>, [usize; 2]) {
    let (x, _, shape, _) = mask_and_features(6, layout);
    let sample = x.len() / 3;
    let x = x
        .iter()
        .enumerate()
        .map(|(i, &v)| if i < sample { v * 0.05 } else { v })
        .collect();
    let prototypes = features(5 * 6)
        .iter()
        .enumerate()
        .map(|(i, &v)| if i < 12 { v * 0.1 } else { v })
        .collect();
    (x, shape, prototypes, [5, 6])
}

/// The costs (φ-normalisation, matmul, distances) against the portable composite. The costs lie
/// in [0, 2] and none is near 0 here (where the square root would amplify the rounding of
/// ‖a‖² + ‖b‖² − 2a·b): 10⁻⁵ absolute is f32's rounding of these sums with room.
#[test]
fn transport_costs_kernel_matches_portable() {
    for layout in [Layout::ChannelsFirst, Layout::ChannelsLast] {
        let (x, shape, prototypes, prototype_shape) = features_and_prototypes(layout);
        let run = |kernel: bool| {
            let (xs, ps) = (
                primitive(&x, shape),
                primitive(&prototypes, prototype_shape),
            );
            read::<3>(if kernel {
                <Cube as PoolingOps>::transport_costs(xs, ps, layout)
            } else {
                portable::transport_costs::<Cube>(xs, ps, layout)
            })
        };
        let kernel = kernel_runs("burn_pooling::transport_costs", || run(true));
        compare(
            &format!("transport costs ({layout:?})"),
            &kernel,
            &run(false),
        );
    }
}

/// The costs' backward against the portable closed form, both layouts.
#[test]
fn transport_costs_backward_kernel_matches_portable() {
    for layout in [Layout::ChannelsFirst, Layout::ChannelsLast] {
        let (x, shape, prototypes, prototype_shape) = features_and_prototypes(layout);
        let costs_shape = [shape[0], prototype_shape[0], 49];
        let costs = read::<3>(portable::transport_costs::<Cube>(
            primitive(&x, shape),
            primitive(&prototypes, prototype_shape),
            layout,
        ));
        let grad = upstream(costs.len());
        let run = |kernel: bool| {
            let (xs, ps) = (
                primitive(&x, shape),
                primitive(&prototypes, prototype_shape),
            );
            let (cs, gs) = (
                primitive(&costs, costs_shape),
                primitive(&grad, costs_shape),
            );
            let (dx, dp) = if kernel {
                <Cube as PoolingOps>::transport_costs_backward(xs, ps, cs, gs, layout)
            } else {
                portable::transport_costs_backward::<Cube>(xs, ps, cs, gs, layout)
            };
            (read::<3>(dx), read::<2>(dp))
        };
        let (dx, dp) = kernel_runs("burn_pooling::transport_costs_backward", || run(true));
        let (reference_dx, reference_dp) = run(false);
        let label = format!("transport costs backward ({layout:?})");
        compare(&format!("{label}: features"), &dx, &reference_dx);
        compare(&format!("{label}: prototypes"), &dp, &reference_dp);
    }
}

/// The user's path for GSP: the layer's forward and backward on the wgpu device with autodiff
/// run the costs, the solve and their backwards on the device (fused: as the stream's custom
/// operations), and agree with the same layer on Flex (its CPU kernels, another code path).
#[cfg(feature = "autodiff")]
#[test]
fn routed_gsp_runs_the_kernels() {
    use crate::pooling::{Gsp, GspConfig};
    use burn::module::Param;
    let (x, shape, prototypes, prototype_shape) = features_and_prototypes(Layout::ChannelsLast);
    let run = |device: Device| {
        let device = device.autodiff();
        let gsp = GspConfig::new(6).with_num_prototypes(5).init(&device);
        let gsp = Gsp {
            prototypes: Param::from_tensor(Tensor::from_data(
                TensorData::new(prototypes.clone(), prototype_shape),
                &device,
            )),
            ..gsp
        };
        let tokens = Tensor::<3>::from_data(TensorData::new(x.clone(), shape), &device);
        let tokens = tokens.require_grad();
        let y = gsp.forward_tokens(tokens.clone());
        let grads = (y.clone() * y.clone()).sum().backward();
        let values = |t: Tensor<2>| t.into_data().to_vec::<f32>().expect("f32");
        let dx = tokens.grad(&grads).expect("tracked");
        let dp = gsp.prototypes.val().grad(&grads).expect("tracked");
        (
            values(y.inner()),
            dx.into_data().to_vec::<f32>().expect("f32"),
            values(dp),
        )
    };
    let kernels = [
        "burn_pooling::transport_costs",
        "burn_pooling::partial_transport",
        "burn_pooling::partial_transport_backward",
        "burn_pooling::transport_costs_backward",
    ];
    let (y, dx, dp) = kernel_runs(kernels[0], || {
        kernel_runs(kernels[1], || {
            kernel_runs(kernels[2], || kernel_runs(kernels[3], || run(device())))
        })
    });
    let (reference_y, reference_dx, reference_dp) = run(Device::flex());
    compare("routed GSP: y", &y, &reference_y);
    compare("routed GSP: dx", &dx, &reference_dx);
    compare("routed GSP: dp", &dp, &reference_dp);
}

/// Bad input on the device gets the named panics of every backend (the layers' and the public
/// API's checks run before any launch), not a device error.
#[test]
#[should_panic(expected = "Gsp: every mask row needs at least one valid position")]
fn empty_mask_row_panics_by_name_on_the_device() {
    use crate::pooling::{GspConfig, PoolingInput};
    let device = device();
    let gsp = GspConfig::new(6).with_num_prototypes(5).init(&device);
    let tokens = Tensor::<3>::ones([2, 4, 6], &device);
    let valid = [true, true, false, true, false, false, false, false];
    let mask = Tensor::<2, burn::tensor::Bool>::from_bool(
        TensorData::new(valid.to_vec(), [2, 4]),
        &device,
    );
    gsp.forward(PoolingInput::tokens(tokens).with_mask(mask));
}

#[test]
#[should_panic(expected = "transport_costs: channel mismatch")]
fn channel_mismatch_panics_by_name_on_the_device() {
    let device = device();
    let features = Tensor::<3>::ones([2, 6, 4], &device);
    let prototypes = Tensor::<2>::ones([5, 7], &device);
    crate::transport::transport_costs(features, prototypes, Layout::ChannelsFirst);
}

/// B = 0 on the device: every layer gives an empty `[0, C]` (`[0, 2C]` concatenated) for maps
/// and tokens, and the transport API empty results, without launching a kernel on nothing.
#[test]
fn an_empty_batch_gives_empty_results_on_the_device() {
    use crate::pooling::*;
    let device = device();
    let configs = [
        PoolingConfig::Gap(GapConfig::new()),
        PoolingConfig::Gmp(GmpConfig::new()),
        PoolingConfig::GapGmp(GapGmpConfig::new().with_combine(GapGmpCombine::Concat)),
        PoolingConfig::Gem(GemConfig::new()),
        PoolingConfig::GroupGem(GroupGemConfig::new(2)),
        PoolingConfig::Gsp(GspConfig::new(4).with_num_prototypes(3)),
    ];
    for config in configs {
        let pooling = config.init(&device);
        let width = config.output_channels(4);
        let maps = pooling.forward(Tensor::<4>::zeros([0, 4, 3, 2], &device));
        let tokens = pooling.forward(Tensor::<3>::zeros([0, 5, 4], &device));
        assert_eq!(maps.dims(), [0, width], "{}", pooling.name());
        assert_eq!(tokens.into_data().num_elements(), 0, "{}", pooling.name());
    }
    let costs = crate::transport::transport_costs(
        Tensor::<3>::zeros([0, 4, 5], &device),
        Tensor::<2>::ones([3, 4], &device),
        Layout::ChannelsFirst,
    );
    let solved = crate::transport::partial_transport(
        costs,
        Tensor::<2>::zeros([0, 5], &device),
        &newton(0.3),
    );
    assert_eq!(solved.plan.dims(), [0, 4, 5]);
    assert!(solved.converged.into_scalar::<bool>());
}

/// Maps with W = 0 on the device: the layer's named panic, not one inside Burn's `reshape`.
#[test]
#[should_panic(
    expected = "Gem: the input map has no positions to pool: expected H·W > 0, got H = 3, W = 0"
)]
fn an_empty_map_panics_by_name_on_the_device() {
    let device = device();
    crate::pooling::GemConfig::new()
        .init(&device)
        .forward(Tensor::<4>::zeros([2, 4, 3, 0], &device));
}

/// The balanced transport kernel against the portable solve on every case of
/// `test_support::balanced_cases`: plans within 2e-5, exact zeros on the zero masses, the
/// iteration count within one and the same convergence flag.
#[test]
fn balanced_transport_kernel_matches_portable() {
    kernel_runs("burn_pooling::balanced_transport", || {
        crate::test_support::balanced_kernel_matches_portable(&device(), "wgpu")
    });
}
