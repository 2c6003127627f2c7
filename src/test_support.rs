//! Helpers of the crate's unit tests: the CPU devices the backend-independent checks run on, and
//! a guard that turns a hang into a failure.

use std::sync::mpsc;
use std::time::Duration;

use burn::tensor::Device;

/// The CPU devices of this build: Flex (fused kernels) and NdArray (the portable bodies).
#[allow(deprecated)] // NdArray is deprecated in Burn 0.22, still supported here.
pub(crate) fn cpu_devices() -> Vec<(&'static str, Device)> {
    vec![
        #[cfg(feature = "flex")]
        ("Flex", Device::flex()),
        #[cfg(feature = "ndarray")]
        ("NdArray", Device::ndarray()),
    ]
}

/// Runs `work` on its own thread and returns its result, failing the test if it takes more
/// than `seconds` (the thread is left behind: a hang cannot be interrupted) and re-raising
/// its panic if it panics.
pub(crate) fn within_seconds<T: Send + 'static>(
    seconds: u64,
    what: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (sender, receiver) = mpsc::channel();
    let handle = std::thread::spawn(move || {
        let _ = sender.send(work());
    });
    match receiver.recv_timeout(Duration::from_secs(seconds)) {
        Ok(value) => value,
        Err(mpsc::RecvTimeoutError::Disconnected) => match handle.join() {
            Err(panic) => std::panic::resume_unwind(panic),
            Ok(()) => unreachable!("the thread sends before it ends"),
        },
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("{what} did not return within {seconds} s (hangs)")
        }
    }
}

/// One balanced transport problem of the kernels' checks against the portable solve.
#[cfg(any(feature = "flex", feature = "cube"))]
pub(crate) struct BalancedCase {
    pub name: &'static str,
    /// `[B, K', N]`.
    pub costs: burn::tensor::Tensor<3>,
    /// `[B, K']`.
    pub rows: burn::tensor::Tensor<2>,
    /// `[B, N]`.
    pub columns: burn::tensor::Tensor<2>,
    pub settings: crate::maths::balanced::BalancedSettings,
}

/// The balanced transport problems every kernel of the solve is checked on against the portable
/// body, on `device`: random costs with and without a dustbin row, masked columns (NaN and ∞
/// costs there), a zero-mass row, costs near 1e30, a small ε, the iteration cap reached, B = 1,
/// both sides longer than a cube of 256 units (K' > N), and a batch whose samples have
/// different numbers of valid columns.
#[cfg(any(feature = "flex", feature = "cube"))]
pub(crate) fn balanced_cases(device: &Device) -> Vec<BalancedCase> {
    use crate::maths::balanced::BalancedSettings;
    use burn::tensor::Tensor;
    let values = |len: usize, seed: usize, lo: f32, hi: f32| -> Vec<f32> {
        (0..len)
            .map(|i| {
                let x = (i * i * 37 + i * 11 + seed * 101 + seed * seed * 7) % 1009;
                lo + (hi - lo) * x as f32 / 1008.0
            })
            .collect()
    };
    let tensor3 = |v: Vec<f32>, shape: [usize; 3]| {
        Tensor::<1>::from_floats(v.as_slice(), device).reshape(shape)
    };
    let tensor2 = |v: Vec<f32>, shape: [usize; 2]| {
        Tensor::<1>::from_floats(v.as_slice(), device).reshape(shape)
    };
    let uniform = |b: usize, n: usize| tensor2(vec![1.0 / n as f32; b * n], [b, n]);
    let mut cases = Vec::new();
    let (b, k, n) = (3, 4, 9);
    let random = tensor3(values(b * k * n, 1, 0.0, 2.0), [b, k, n]);
    cases.push(BalancedCase {
        name: "random",
        costs: random.clone(),
        rows: uniform(b, k),
        columns: uniform(b, n),
        settings: BalancedSettings::new(0.5),
    });
    // A dustbin: a last row of constant cost taking N − K of the N unit column masses.
    let (k_bin, n_bin) = (3, 10);
    let mut dustbin = values(2 * (k_bin + 1) * n_bin, 2, 0.0, 3.0);
    let mut row_values = Vec::new();
    for sample in 0..2 {
        for j in 0..n_bin {
            dustbin[(sample * (k_bin + 1) + k_bin) * n_bin + j] = 1.5;
        }
        row_values.extend([1.0; 3]);
        row_values.push((n_bin - k_bin) as f32);
    }
    cases.push(BalancedCase {
        name: "dustbin",
        costs: tensor3(dustbin, [2, k_bin + 1, n_bin]),
        rows: tensor2(row_values, [2, k_bin + 1]),
        columns: tensor2(vec![1.0; 2 * n_bin], [2, n_bin]),
        settings: BalancedSettings::new(1.0),
    });
    // Masked columns with NaN and ∞ costs there, and a zero-mass row.
    let mut masked = values(b * k * n, 3, 0.0, 1.0);
    let mut column_values = vec![1.0 / n as f32; b * n];
    for sample in 0..b {
        column_values[sample * n + 2] = 0.0;
        column_values[sample * n + 5] = 2.0 / n as f32;
        for i in 0..k {
            masked[(sample * k + i) * n + 2] = if i % 2 == 0 { f32::NAN } else { f32::INFINITY };
        }
    }
    cases.push(BalancedCase {
        name: "masked columns",
        costs: tensor3(masked.clone(), [b, k, n]),
        rows: uniform(b, k),
        columns: tensor2(column_values.clone(), [b, n]),
        settings: BalancedSettings::new(0.3),
    });
    let mut row_values = vec![1.0 / (k - 1) as f32; b * k];
    for sample in 0..b {
        row_values[sample * k + 1] = 0.0;
        masked[(sample * k + 1) * n] = f32::NAN;
    }
    cases.push(BalancedCase {
        name: "zero-mass row",
        costs: tensor3(masked, [b, k, n]),
        rows: tensor2(row_values, [b, k]),
        columns: tensor2(column_values, [b, n]),
        settings: BalancedSettings::new(0.3),
    });
    cases.push(BalancedCase {
        name: "huge costs",
        costs: random.clone().mul_scalar(1e30),
        rows: uniform(b, k),
        columns: uniform(b, n),
        settings: BalancedSettings::new(1.0).with_max_iterations(50),
    });
    cases.push(BalancedCase {
        name: "small epsilon",
        costs: random.clone().narrow(0, 0, 1),
        rows: uniform(1, k),
        columns: uniform(1, n),
        settings: BalancedSettings::new(0.02).with_tolerance(1e-5),
    });
    cases.push(BalancedCase {
        name: "cap reached",
        costs: random.clone(),
        rows: uniform(b, k),
        columns: uniform(b, n),
        settings: BalancedSettings::new(0.05).with_max_iterations(3),
    });
    cases.push(BalancedCase {
        name: "one sample",
        costs: tensor3(values(5 * 7, 4, -1.0, 1.0), [1, 5, 7]),
        rows: tensor2(vec![0.1, 0.3, 0.2, 0.25, 0.15], [1, 5]),
        columns: uniform(1, 7),
        settings: BalancedSettings::new(0.2),
    });
    // Valid columns 9, 6 and 3.
    let column_values: Vec<f32> = (0..b * n)
        .map(|i| {
            let valid = n - 3 * (i / n);
            if i % n < valid {
                1.0 / valid as f32
            } else {
                0.0
            }
        })
        .collect();
    // Both sides longer than a cube of 256 units (each unit takes several rows and columns),
    // K' > N, and a masked column.
    let (k_long, n_long) = (270, 260);
    let mut long_columns = vec![1.0 / (n_long - 1) as f32; 2 * n_long];
    long_columns[n_long + 7] = 0.0;
    long_columns[7] = 0.0;
    cases.push(BalancedCase {
        name: "longer than a cube",
        costs: tensor3(
            values(2 * k_long * n_long, 5, 0.0, 1.0),
            [2, k_long, n_long],
        ),
        rows: uniform(2, k_long),
        columns: tensor2(long_columns, [2, n_long]),
        settings: BalancedSettings::new(0.02),
    });
    cases.push(BalancedCase {
        name: "different valid counts",
        costs: random,
        rows: uniform(b, k),
        columns: tensor2(column_values, [b, n]),
        settings: BalancedSettings::new(0.1),
    });
    cases
}

/// Panics unless the balanced transport op on `device` (its kernel) agrees with the portable
/// solve on the same device on every case of [`balanced_cases`]: the plan within 2e-5 (NaN
/// where it is NaN, and exactly 0 on the zero masses), the iteration count within one and the
/// same convergence flag.
#[cfg(any(feature = "flex", feature = "cube"))]
pub(crate) fn balanced_kernel_matches_portable(device: &Device, label: &str) {
    use crate::maths::balanced;
    let read = |t: burn::tensor::Tensor<3>| -> Vec<f32> {
        t.into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .expect("f32 values")
    };
    for case in balanced_cases(device) {
        let name = case.name;
        let (expected, report) = balanced::solve(
            case.costs.clone(),
            case.rows.clone(),
            case.columns.clone(),
            &case.settings,
        );
        let (plan, (iterations, converged)) = crate::ops::routing::balanced_transport(
            case.costs.clone(),
            case.rows.clone(),
            case.columns.clone(),
            &case.settings,
        );
        let iterations = iterations.into_scalar::<i64>() as usize;
        let converged = converged.into_scalar::<bool>();
        let [_, _, n] = plan.dims();
        let empty_columns: Vec<bool> = case
            .columns
            .clone()
            .into_data()
            .convert::<f32>()
            .iter::<f32>()
            .map(|m| m <= 0.0)
            .collect();
        let (plan, expected) = (read(plan), read(expected));
        let mut worst = 0.0f32;
        for (index, (&got, &want)) in plan.iter().zip(&expected).enumerate() {
            if want.is_nan() {
                assert!(got.is_nan(), "{label}, {name}: {got} at {index} where NaN");
                continue;
            }
            let column = (index / (plan.len() / empty_columns.len() * n)) * n + index % n;
            if empty_columns[column] {
                assert_eq!(got, 0.0, "{label}, {name}: at the masked column of {index}");
            }
            worst = worst.max((got - want).abs());
        }
        eprintln!(
            "{label}, {name}: max |plan − portable| = {worst:e}, iterations {iterations} vs \
             {}, converged {converged} vs {}",
            report.iterations, report.converged
        );
        assert!(worst <= 2e-5, "{label}, {name}: plans differ by {worst}");
        // The marginal error is rounded differently (the kernels accumulate in f64): where it
        // meets the tolerance within that rounding, the two may stop one iteration apart. A
        // solve that ends unconverged before its cap (stalled, or its potentials unmoved)
        // ends where rounding decides, and the kernels' samples stop on their own, not with
        // the batch: there only the outcome is compared.
        let stalled =
            !converged && !report.converged && report.iterations < case.settings.iteration_cap();
        assert!(
            stalled || iterations.abs_diff(report.iterations) <= 1,
            "{label}, {name}: {iterations} iterations, the portable solve {}",
            report.iterations
        );
        assert_eq!(converged, report.converged, "{label}, {name}: converged");
    }
}

/// Panics unless the balanced transport's backward op on `device` (its kernel) agrees with
/// `maths::balanced::implicit_gradients` (the portable body) on the plans of every case of
/// [`balanced_cases`], as solved (K' < N) and transposed (K' > N), with zero-mass rows and
/// columns: ∂L/∂C within 1e-3 of its largest entry, and ∂L/∂a_i + ∂L/∂b_j where P_ij > 1e-6
/// (the masses' gradients are fixed up to the gauge (+t, −t), which the two may fix apart).
/// Prints the measured errors.
#[cfg(any(feature = "flex", feature = "cube"))]
pub(crate) fn balanced_backward_matches_portable(device: &Device, label: &str) {
    use crate::maths::balanced::{implicit_gradients, solve};
    use crate::ops::PoolingOps;
    use burn::backend::Dispatch;
    use burn::tensor::{Distribution, Tensor};
    device.seed(11);
    let read = |t: Tensor<3>| t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
    let pairs = |a: Tensor<2>, b: Tensor<2>| read(a.unsqueeze_dim::<3>(2) + b.unsqueeze_dim(1));
    for case in balanced_cases(device) {
        let (plan, _) = solve(case.costs, case.rows, case.columns, &case.settings);
        for plan in [plan.clone(), plan.swap_dims(1, 2)] {
            let grad = Tensor::<3>::random(plan.dims(), Distribution::Uniform(-1.0, 1.0), device);
            let epsilon = case.settings.epsilon;
            let (dc, da, db) = implicit_gradients(plan.clone(), grad.clone(), epsilon);
            let (kc, ka, kb) = <Dispatch as PoolingOps>::balanced_transport_backward(
                plan.clone().into_dispatch(),
                grad.into_dispatch(),
                epsilon,
            );
            let (kc, ka, kb) = (
                Tensor::<3>::from_dispatch(kc),
                Tensor::<2>::from_dispatch(ka),
                Tensor::<2>::from_dispatch(kb),
            );
            let scale = read(dc.clone()).iter().fold(1.0f32, |m, v| m.max(v.abs()));
            let worst = |a: Vec<f32>, b: Vec<f32>| {
                a.iter()
                    .zip(&b)
                    .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()))
            };
            let cost_error = worst(read(kc), read(dc)) / scale;
            // Pairs the plan connects: where its support splits into blocks (costs of 1e30),
            // each block has its own gauge, and only x_i + y_j inside one is fixed.
            let support = read(plan.clone());
            let connected = |v: Vec<f32>| -> Vec<f32> {
                v.iter()
                    .zip(&support)
                    .map(|(&v, &p)| if p > 1e-6 { v } else { 0.0 })
                    .collect()
            };
            let mass_error = worst(connected(pairs(ka, kb)), connected(pairs(da, db))) / scale;
            let name = case.name;
            eprintln!(
                "{label}, {name} {:?}: dC {cost_error:e}, da + db {mass_error:e}",
                plan.dims()
            );
            assert!(
                cost_error < 1e-3,
                "{label}, {name}: dC differs by {cost_error} (relative)"
            );
            assert!(
                mass_error < 1e-3,
                "{label}, {name}: da + db differ by {mass_error}"
            );
        }
    }
}
