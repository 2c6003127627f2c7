//! GSP in f64 against the independent reference in `tests/reference` (bisection solver, scalar
//! loops): outputs, the analytical gradients against central finite differences, and the
//! tracked-Newton-step fallback against the analytical backward.

use crate::{common, reference};
use burn::module::Param;
use burn::tensor::{Bool, Device, Tensor, TensorData};
use burn_pooling::Layout;
use burn_pooling::PoolingInput;
use burn_pooling::transport::fallback::partial_transport_newton_step;
use burn_pooling::transport::{
    TransportSettings, TransportSolver, partial_transport, transport_costs,
};
use burn_pooling::{Gsp, GspConfig};
use common::{
    Rng, assert_close, batch_tensor, flex_f64, matrix_tensor, max_abs_difference, tensor, values,
};

const K: usize = 3;
const N: usize = 6;
const C: usize = 4;

fn layer(
    prototypes: &[Vec<f64>],
    mu: f64,
    eps: f64,
    solver: TransportSolver,
    device: &Device,
) -> Gsp {
    let layer = GspConfig::new(C)
        .with_num_prototypes(K)
        .with_transport_ratio(mu)
        .with_epsilon(eps)
        .with_tolerance(1e-13)
        .with_solver(solver)
        .init(device);
    Gsp {
        prototypes: Param::from_tensor(matrix_tensor(prototypes, device)),
        ..layer
    }
}

/// Features with norms on both sides of 1 so φ's two branches are exercised.
fn sample(rng: &mut Rng) -> (Vec<Vec<Vec<f64>>>, Vec<Vec<f64>>) {
    let x = (0..2).map(|_| rng.matrix(N, C, -0.9, 0.9)).collect();
    let prototypes = rng.matrix(K, C, -0.8, 0.8);
    (x, prototypes)
}

#[test]
fn forward_matches_reference_for_both_solvers_and_masks() {
    let device = flex_f64();
    let mut rng = Rng::new(1);
    let masks = [[true; N], [true, false, true, true, false, true]];
    for (mu, eps) in [(0.3, 0.2), (0.9, 0.1), (0.05, 0.5)] {
        for solver in [TransportSolver::Newton, TransportSolver::Sinkhorn] {
            let (x, prototypes) = sample(&mut rng);
            let gsp = layer(&prototypes, mu, eps, solver, &device).with_max_iterations(
                if solver == TransportSolver::Newton {
                    50
                } else {
                    2000
                },
            );
            let mask =
                Tensor::<2, Bool>::from_bool(TensorData::new(masks.concat(), [2, N]), &device);
            let out = gsp
                .forward_detailed(PoolingInput::tokens(batch_tensor(&x, &device)).with_mask(mask));
            let pooled = values(out.pooled);
            let weights = values(out.weights);
            let attributes = values(out.attributes);
            for b in 0..2 {
                let valid = masks[b].iter().filter(|&&v| v).count() as f64;
                let mass: Vec<f64> = masks[b]
                    .iter()
                    .map(|&v| if v { 1.0 / valid } else { 0.0 })
                    .collect();
                let expected = reference::gsp(&x[b], &prototypes, &mass, mu, eps);
                let what = format!("mu {mu} eps {eps} {solver:?} sample {b}");
                assert_close(
                    &pooled[b * C..(b + 1) * C],
                    &expected.pooled,
                    1e-9,
                    1e-11,
                    &format!("{what} pooled"),
                );
                assert_close(
                    &weights[b * N..(b + 1) * N],
                    &expected.weights,
                    1e-9,
                    1e-11,
                    &format!("{what} weights"),
                );
                assert_close(
                    &attributes[b * K..(b + 1) * K],
                    &expected.attributes,
                    1e-9,
                    1e-11,
                    &format!("{what} attributes"),
                );
            }
        }
    }
}

trait WithIterations {
    fn with_max_iterations(self, iterations: usize) -> Self;
}

impl WithIterations for Gsp {
    fn with_max_iterations(self, iterations: usize) -> Self {
        let settings = TransportSettings {
            max_iterations: iterations,
            ..self.settings
        };
        Gsp { settings, ..self }
    }
}

#[test]
fn map_and_token_layouts_agree() {
    let device = flex_f64();
    let mut rng = Rng::new(2);
    let (x, prototypes) = sample(&mut rng);
    let gsp = layer(&prototypes, 0.3, 0.2, TransportSolver::Newton, &device);
    let tokens = batch_tensor(&x, &device); // [2, N=6, C]
    let maps = tokens.clone().swap_dims(1, 2).reshape([2, C, 2, 3]);
    let a = gsp.forward_detailed(maps);
    let b = gsp.forward_detailed(PoolingInput::tokens(tokens));
    assert_close(&values(a.pooled), &values(b.pooled), 1e-12, 1e-14, "pooled");
    assert_close(
        &values(a.weights),
        &values(b.weights),
        1e-12,
        1e-14,
        "weights",
    );
}

/// A fixed random linear functional of everything GSP outputs.
fn scalar_loss(pooled: &[f64], attributes: &[f64], gy: &[f64], gz: &[f64]) -> f64 {
    pooled.iter().zip(gy).map(|(a, b)| a * b).sum::<f64>()
        + attributes.iter().zip(gz).map(|(a, b)| a * b).sum::<f64>()
}

/// ∂L/∂x and ∂L/∂ω from the analytical backward against central differences of the reference.
#[test]
fn analytical_gradients_match_finite_differences() {
    let device = flex_f64().autodiff();
    let mut rng = Rng::new(3);
    // μ = 1e-3: the weights t / μ, summed from the plan, keep their gradient exact too.
    for (mu, eps) in [(0.3, 0.2), (0.9, 0.2), (0.5, 0.05), (1e-3, 0.2)] {
        let (x, prototypes) = sample(&mut rng);
        let x = vec![x[0].clone()];
        let gy: Vec<f64> = (0..C).map(|_| rng.uniform(-1.0, 1.0)).collect();
        let gz: Vec<f64> = (0..K).map(|_| rng.uniform(-1.0, 1.0)).collect();
        let gsp = layer(&prototypes, mu, eps, TransportSolver::Newton, &device);
        let input = batch_tensor(&x, &device).require_grad();
        let out = gsp.forward_detailed(PoolingInput::tokens(input.clone()));
        let loss = (out.pooled * tensor(gy.clone(), [1, C], &device)).sum()
            + (out.attributes * tensor(gz.clone(), [1, K], &device)).sum();
        let grads = loss.backward();
        let grad_x = values(input.grad(&grads).unwrap());
        let grad_w = values(gsp.prototypes.val().grad(&grads).unwrap());

        let mass = reference::uniform_mass(N);
        let loss_of = |x: &[Vec<f64>], w: &[Vec<f64>]| {
            let r = reference::gsp(x, w, &mass, mu, eps);
            scalar_loss(&r.pooled, &r.attributes, &gy, &gz)
        };
        let flat_x = x[0].concat();
        let fd_x = reference::central_difference(
            &|v: &[f64]| {
                loss_of(
                    &v.chunks(C).map(|r| r.to_vec()).collect::<Vec<_>>(),
                    &prototypes,
                )
            },
            &flat_x,
            1e-6,
        );
        let fd_w = reference::central_difference(
            &|v: &[f64]| loss_of(&x[0], &v.chunks(C).map(|r| r.to_vec()).collect::<Vec<_>>()),
            &prototypes.concat(),
            1e-6,
        );
        let scale = fd_x.iter().chain(&fd_w).fold(0.0f64, |m, v| m.max(v.abs()));
        let err_x = max_abs_difference(&grad_x, &fd_x);
        let err_w = max_abs_difference(&grad_w, &fd_w);
        println!(
            "mu {mu} eps {eps}: max |analytical - FD| = {err_x:.2e} (x), {err_w:.2e} (prototypes), scale {scale:.2e}"
        );
        assert!(
            err_x <= 1e-7 * scale.max(1.0),
            "x: {err_x:e}\n{grad_x:?}\n{fd_x:?}"
        );
        assert!(
            err_w <= 1e-7 * scale.max(1.0),
            "prototypes: {err_w:e}\n{grad_w:?}\n{fd_w:?}"
        );
    }
}

/// The custom backward and the tracked Newton step are two independent routes to the same
/// gradient of the plan with respect to the costs.
#[test]
fn analytical_backward_matches_newton_step_fallback() {
    let device = flex_f64().autodiff();
    let mut rng = Rng::new(4);
    let (x, prototypes) = sample(&mut rng);
    let features = batch_tensor(&x, &device);
    let costs = transport_costs(
        features,
        matrix_tensor(&prototypes, &device),
        Layout::ChannelsLast,
    )
    .detach();
    let mass = tensor(
        [vec![1.0 / 4.0; 4], vec![0.0; 2], vec![1.0 / 6.0; 6]].concat(),
        [2, N],
        &device,
    );
    let upstream = tensor(
        (0..2 * (K + 1) * N)
            .map(|_| rng.uniform(-1.0, 1.0))
            .collect(),
        [2, K + 1, N],
        &device,
    );
    for mu in [0.3, 0.8] {
        let settings = TransportSettings {
            transport_ratio: mu,
            epsilon: 0.1,
            max_iterations: 100,
            tolerance: 1e-13,
            solver: TransportSolver::Newton,
        };
        let gradient = |fallback: bool| {
            let costs = costs.clone().require_grad();
            let plan = if fallback {
                partial_transport_newton_step(costs.clone(), mass.clone(), &settings).0
            } else {
                partial_transport(costs.clone(), mass.clone(), &settings).plan
            };
            let grads = (plan * upstream.clone()).sum().backward();
            values(costs.grad(&grads).unwrap())
        };
        let analytical = gradient(false);
        let fallback = gradient(true);
        assert_close(&analytical, &fallback, 1e-9, 1e-12, &format!("mu {mu}"));
        // Padded positions get no gradient.
        for k in 0..K {
            assert_eq!(analytical[k * N + 4], 0.0);
            assert_eq!(analytical[k * N + 5], 0.0);
        }
    }
}

/// ε → 0: the ≈ μN positions nearest the prototypes get weight 1/(μN), the rest 0 (the LP).
#[test]
fn small_epsilon_approaches_hard_selection() {
    let device = flex_f64();
    // Positions at well separated distances from the single prototype at the origin.
    let n = 10;
    let x: Vec<Vec<f64>> = (0..n)
        .map(|j| vec![0.05 + 0.09 * ((j * 7) % n) as f64, 0.0])
        .collect();
    let prototypes = vec![vec![0.0, 0.0]];
    for mu in [0.3, 0.45] {
        let hard = reference::gsp_hard_selection_weights(&x, &prototypes, mu);
        let mut errors = Vec::new();
        for eps in [0.05, 0.01, 0.002] {
            let layer = GspConfig::new(2)
                .with_num_prototypes(1)
                .with_transport_ratio(mu)
                .with_epsilon(eps)
                .with_tolerance(1e-13)
                .init(&device);
            let layer = Gsp {
                prototypes: Param::from_tensor(matrix_tensor(&prototypes, &device)),
                ..layer
            };
            let w = token_weights(&layer, std::slice::from_ref(&x), &device);
            errors.push(max_abs_difference(&w, &hard));
        }
        println!("mu {mu}: max |w - hard| at eps 0.05, 0.01, 0.002 = {errors:?}");
        assert_shrinks_to_zero(&errors);
    }
}

/// GSP's weights `[B·N]` of a token batch.
fn token_weights(layer: &Gsp, x: &[Vec<Vec<f64>>], device: &Device) -> Vec<f64> {
    let tokens = PoolingInput::tokens(batch_tensor(x, device));
    values(layer.forward_detailed(tokens).weights)
}

/// Errors of a sequence of settings approaching a limit: each smaller, the last below 1e-6.
fn assert_shrinks_to_zero(errors: &[f64]) {
    assert!(errors.windows(2).all(|w| w[0] > w[1]), "{errors:?}");
    assert!(errors[errors.len() - 1] < 1e-6, "{errors:?}");
}

/// μ → 0: w → softmax_j(ℓ_j), attention pooling with temperature ε.
#[test]
fn small_transport_ratio_approaches_attention_pooling() {
    let device = flex_f64();
    let mut rng = Rng::new(5);
    let (x, prototypes) = sample(&mut rng);
    let attention = reference::attention_weights(&x[0], &prototypes, 0.2);
    let mut errors = Vec::new();
    for mu in [1e-2, 1e-4, 1e-6] {
        let gsp = layer(&prototypes, mu, 0.2, TransportSolver::Newton, &device);
        let w = token_weights(&gsp, &x[..1], &device);
        errors.push(max_abs_difference(&w, &attention));
    }
    println!("max |w - attention| at mu 1e-2, 1e-4, 1e-6 = {errors:?}");
    assert_shrinks_to_zero(&errors);
}
