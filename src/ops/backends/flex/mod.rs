//! Fused CPU kernels of [`PoolingOps`] for Flex, one file per op, each with its closed-form
//! backward: threads over the batch, plain element-wise loops that the compiler vectorises,
//! matrix products through `gemm` on strided views (no transposed copies), f32 `ln`/`exp` as
//! short polynomials. Every kernel is tested against the portable (composite) body.
//!
//! The kernels compute in f32 or f64. Half-precision tensors (f16, bf16) are widened to f32 on
//! the way in and their results narrowed back on the way out, so a Flex device configured for
//! halves runs the same kernels, with f32 accumulation.

mod balanced;
mod costs;
mod generalized_mean;
mod l2_normalize;
mod lse;
mod product;
mod real;
mod relu_dropout;
mod simd;
mod transport;
mod weighted_sum;

use burn::backend::Flex;
use burn::backend::TensorMetadata;
use burn::backend::flex::FlexTensor;
use burn::backend::ops::FloatTensorOps;
use burn::backend::tensor::{BoolTensor, FloatTensor, IntTensor};
use burn::tensor::{DType, Element, FloatDType, TensorData};

use crate::layout::Layout;
use crate::maths::balanced::BalancedSettings;
use crate::maths::l2_normalize as maths_l2;
use crate::maths::log_sum_exp::LseOutput;
use crate::maths::precision::unit_roundoff;
use crate::maths::settings::TransportSettings;
use crate::ops::{PoolingOps, SumOver, TransportOutput};

/// Runs `$body` with the type `$t` bound to the element type of `$dtype` (f32 or f64; the
/// inputs went through [`kernel_input`], so halves arrive as f32).
macro_rules! with_float {
    ($dtype:expr, $op:literal, $t:ident => $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $t = f32;
                $body
            }
            DType::F64 => {
                type $t = f64;
                $body
            }
            dtype => panic!("{}: unsupported float dtype {dtype:?}", $op),
        }
    };
}

/// The primitives of the impl below.
type Float = FloatTensor<Flex>;
type Int = IntTensor<Flex>;
type Bool = BoolTensor<Flex>;

impl PoolingOps for Flex {
    fn transport_costs(features: Float, prototypes: Float, layout: Layout) -> Float {
        let shape = Shape3::of(&features, layout);
        let [count, _] = dims2(&prototypes);
        let dtype = features.dtype();
        let [features, prototypes] = [features, prototypes].map(kernel_input);
        let costs = with_float!(features.dtype(), "transport costs", T => {
            tensor(
                costs::forward::<T>(view(&features), view(&prototypes), count, shape),
                [shape.batch, count, shape.positions],
            )
        });
        kernel_output(costs, dtype)
    }

    fn transport_costs_backward(
        features: Float,
        prototypes: Float,
        costs: Float,
        grad: Float,
        layout: Layout,
    ) -> (Float, Float) {
        let shape = Shape3::of(&features, layout);
        let dims = features.shape().clone();
        let prototype_dims = dims2(&prototypes);
        let (dtype, prototype_dtype) = (features.dtype(), prototypes.dtype());
        let [features, prototypes, costs, grad] =
            [features, prototypes, costs, grad].map(kernel_input);
        let (d_features, d_prototypes) = with_float!(features.dtype(), "transport costs", T => {
            let (d_features, d_prototypes) = costs::backward::<T>(
                view(&features),
                view(&prototypes),
                view(&costs),
                view(&grad),
                prototype_dims[0],
                shape,
            );
            (tensor(d_features, dims.clone()), tensor(d_prototypes, prototype_dims))
        });
        (
            kernel_output(d_features, dtype),
            kernel_output(d_prototypes, prototype_dtype),
        )
    }

    fn partial_transport(
        costs: Float,
        mass: Float,
        settings: TransportSettings,
        output: TransportOutput,
    ) -> (Float, Float, Int, Bool) {
        let dtype = costs.dtype();
        let (plan, iterations, converged) = solve(costs, mass, &settings);
        let first = match output {
            TransportOutput::Plan => plan.clone(),
            TransportOutput::Marginals => {
                let [batch, rows, positions] = dims3(&plan);
                with_float!(plan.dtype(), "transport marginals", T => {
                    tensor(
                        transport::marginals::<T>(view(&plan), [rows - 1, positions]),
                        [batch, positions + rows - 1],
                    )
                })
            }
        };
        (
            kernel_output(first, dtype),
            kernel_output(plan, dtype),
            iterations,
            converged,
        )
    }

    fn partial_transport_backward(
        plan: Float,
        grad: Float,
        mass: Float,
        epsilon: f64,
        output: TransportOutput,
    ) -> Float {
        transport_gradient(plan, grad, mass, epsilon, output)
    }

    fn balanced_transport(
        costs: Float,
        row_mass: Float,
        column_mass: Float,
        settings: BalancedSettings,
    ) -> (Float, Int, Bool) {
        let dims = dims3(&costs);
        let dtype = costs.dtype();
        let [costs, row_mass, column_mass] = [costs, row_mass, column_mass].map(kernel_input);
        let (plan, report) = with_float!(costs.dtype(), "balanced transport", T => {
            let (plan, report) = balanced::forward::<T>(
                view(&costs),
                view(&row_mass),
                view(&column_mass),
                [dims[1], dims[2]],
                &settings,
                unit_roundoff(dtype),
            );
            (tensor(plan, dims), report)
        });
        let iterations = tensor(vec![report.iterations as i64], [1]);
        let converged = FlexTensor::from_data(TensorData::new(vec![report.converged], [1]));
        (kernel_output(plan, dtype), iterations, converged)
    }

    fn balanced_transport_backward(
        plan: Float,
        grad: Float,
        epsilon: f64,
    ) -> (Float, Float, Float) {
        let [batch, rows, columns] = dims3(&plan);
        let dtype = plan.dtype();
        let [plan, grad] = [plan, grad].map(kernel_input);
        let (costs, row_grad, column_grad) = with_float!(plan.dtype(), "balanced transport", T => {
            let (costs, row_grad, column_grad) = balanced::backward::<T>(
                view(&plan),
                view(&grad),
                [rows, columns],
                epsilon,
                unit_roundoff(dtype),
            );
            (
                tensor(costs, [batch, rows, columns]),
                tensor(row_grad, [batch, rows]),
                tensor(column_grad, [batch, columns]),
            )
        });
        (
            kernel_output(costs, dtype),
            kernel_output(row_grad, dtype),
            kernel_output(column_grad, dtype),
        )
    }

    fn generalized_mean(x: Float, powers: Float, mask: Float, eps: f64, layout: Layout) -> Float {
        let shape = Shape3::of(&x, layout);
        let dtype = x.dtype();
        let [x, powers, mask] = [x, powers, mask].map(kernel_input);
        let output = with_float!(x.dtype(), "generalized mean", T => {
            tensor(
                generalized_mean::forward::<T>(view(&x), view(&powers), view(&mask), eps, shape),
                [shape.batch, shape.channels],
            )
        });
        kernel_output(output, dtype)
    }

    fn generalized_mean_backward(
        x: Float,
        powers: Float,
        mask: Float,
        output: Float,
        grad: Float,
        eps: f64,
        layout: Layout,
    ) -> (Float, Float) {
        let shape = Shape3::of(&x, layout);
        let dims = x.shape().clone();
        let (dtype, power_dtype) = (x.dtype(), powers.dtype());
        let [x, powers, mask, output, grad] = [x, powers, mask, output, grad].map(kernel_input);
        let (dx, dp) = with_float!(x.dtype(), "generalized mean", T => {
            let (dx, dp) = generalized_mean::backward::<T>(
                view(&x),
                view(&powers),
                view(&mask),
                view(&output),
                view(&grad),
                eps,
                shape,
            );
            (tensor(dx, dims.clone()), tensor(dp, [shape.channels]))
        });
        (kernel_output(dx, dtype), kernel_output(dp, power_dtype))
    }

    fn log_sum_exp(x: Float, r: Float, mask: Float, layout: Layout, output: LseOutput) -> Float {
        let shape = Shape3::of(&x, layout);
        let dtype = x.dtype();
        let [x, r, mask] = [x, r, mask].map(kernel_input);
        let pooled = with_float!(x.dtype(), "log-sum-exp", T => {
            let r = view::<T>(&r)[0];
            tensor(
                lse::forward::<T>(view(&x), r, view(&mask), output, shape),
                [shape.batch, shape.channels],
            )
        });
        kernel_output(pooled, dtype)
    }

    fn log_sum_exp_backward(
        x: Float,
        r: Float,
        mask: Float,
        output: Float,
        grad: Float,
        layout: Layout,
        kind: LseOutput,
    ) -> (Float, Float) {
        let shape = Shape3::of(&x, layout);
        let dims = x.shape().clone();
        let (dtype, r_dtype) = (x.dtype(), r.dtype());
        let [x, r, mask, output, grad] = [x, r, mask, output, grad].map(kernel_input);
        let (dx, dr) = with_float!(x.dtype(), "log-sum-exp", T => {
            let r = view::<T>(&r)[0];
            let (dx, dr) = lse::backward::<T>(
                view(&x),
                r,
                view(&mask),
                view(&output),
                view(&grad),
                kind,
                shape,
            );
            (tensor(dx, dims.clone()), tensor(vec![dr], [1]))
        });
        (kernel_output(dx, dtype), kernel_output(dr, r_dtype))
    }

    fn l2_normalize(x: Float, axis: usize) -> (Float, Float) {
        let dtype = x.dtype();
        let dims = x.shape().clone();
        let (shape, kept) = maths_l2::around_axis(&dims, axis);
        let eps = maths_l2::eps_for(dtype);
        let x = kernel_input(x);
        let (y, d) = with_float!(x.dtype(), "L2 normalisation", T => {
            let (y, d) = l2_normalize::forward::<T>(view(&x), shape, eps);
            (tensor(y, dims), tensor(d, kept))
        });
        (kernel_output(y, dtype), kernel_output(d, dtype))
    }

    fn l2_normalize_backward(output: Float, denominator: Float, grad: Float, axis: usize) -> Float {
        let dtype = output.dtype();
        let dims = output.shape().clone();
        let (shape, _) = maths_l2::around_axis(&dims, axis);
        let eps = maths_l2::eps_for(dtype);
        let [output, denominator, grad] = [output, denominator, grad].map(kernel_input);
        let dx = with_float!(output.dtype(), "L2 normalisation", T => {
            let dx = l2_normalize::backward::<T>(view(&output), view(&denominator), view(&grad), shape, eps);
            tensor(dx, dims)
        });
        kernel_output(dx, dtype)
    }

    fn bias_relu_dropout(hidden: Float, bias: Float, drop: f64) -> Float {
        let dtype = hidden.dtype();
        let dropout = (drop > 0.0).then(|| relu_dropout::Dropout::new(drop, dropout_key()));
        let [mut hidden, bias] = [hidden, bias].map(kernel_input);
        with_float!(hidden.dtype(), "bias, relu and dropout", T => {
            relu_dropout::forward::<T>(values_mut(&mut hidden), view(&bias), dropout)
        });
        kernel_output(hidden, dtype)
    }

    fn bias_relu_dropout_backward(output: Float, grad: Float, drop: f64) -> (Float, Float) {
        let [_, width] = dims2(&output);
        let dtype = grad.dtype();
        let [output, mut grad] = [output, grad].map(kernel_input);
        let d_bias = with_float!(grad.dtype(), "bias, relu and dropout", T => {
            let sums = relu_dropout::backward::<T>(values_mut(&mut grad), view(&output), width, drop);
            tensor(sums, [width])
        });
        (kernel_output(grad, dtype), kernel_output(d_bias, dtype))
    }

    fn weighted_sum(x: Float, vector: Float, layout: Layout, over: SumOver) -> Float {
        let shape = Shape3::of(&x, layout);
        let dtype = x.dtype();
        let [x, vector] = [x, vector].map(kernel_input);
        let output = with_float!(x.dtype(), "weighted sum", T => {
            let (x, vector) = (view(&x), view(&vector));
            match over {
                SumOver::Positions => tensor(
                    weighted_sum::forward::<T>(x, vector, shape),
                    [shape.batch, shape.channels],
                ),
                SumOver::Channels => tensor(
                    weighted_sum::weights_backward::<T>(x, vector, shape),
                    [shape.batch, shape.positions],
                ),
            }
        });
        kernel_output(output, dtype)
    }

    fn weighted_sum_features_backward(weights: Float, grad: Float, layout: Layout) -> Float {
        let ([batch, positions], [_, channels]) = (dims2(&weights), dims2(&grad));
        let shape = Shape3 {
            batch,
            positions,
            channels,
            layout,
        };
        let dims = layout.dims(batch, positions, channels);
        let dtype = grad.dtype();
        let [weights, grad] = [weights, grad].map(kernel_input);
        let dx = with_float!(grad.dtype(), "weighted sum", T => {
            tensor(
                weighted_sum::features_backward::<T>(view(&weights), view(&grad), shape),
                dims,
            )
        });
        kernel_output(dx, dtype)
    }
}

/// ∂L/∂costs `[B, K, N]` from the plan `[B, K+1, N]`, the masses and the gradient of the
/// solve's `output` (∂L/∂plan, or ∂L/∂marginals `[B, N + K]`).
fn transport_gradient(
    plan: FlexTensor,
    grad: FlexTensor,
    mass: FlexTensor,
    epsilon: f64,
    output: TransportOutput,
) -> FlexTensor {
    let [batch, rows, positions] = dims3(&plan);
    let dtype = plan.dtype();
    let [plan, grad, mass] = [plan, grad, mass].map(kernel_input);
    let gradient = with_float!(plan.dtype(), "partial transport", T => {
        let dims = [rows - 1, positions];
        tensor(
            transport::backward::<T>(view(&plan), view(&grad), view(&mass), dims, epsilon, output),
            [batch, rows - 1, positions],
        )
    });
    kernel_output(gradient, dtype)
}

/// The plan `[B, K+1, N]` in the kernels' dtype, the iteration count and whether the solve
/// converged.
fn solve(
    costs: FlexTensor,
    mass: FlexTensor,
    settings: &TransportSettings,
) -> (FlexTensor, Int, Bool) {
    let [batch, count, positions] = dims3(&costs);
    let [costs, mass] = [costs, mass].map(kernel_input);
    let (plan, report) = with_float!(costs.dtype(), "partial transport", T => {
        let (plan, report) =
            transport::forward::<T>(view(&costs), view(&mass), count, positions, settings);
        (tensor(plan, [batch, count + 1, positions]), report)
    });
    let iterations = tensor(vec![report.iterations as i64], [1]);
    let converged = FlexTensor::from_data(TensorData::new(vec![report.converged], [1]));
    (plan, iterations, converged)
}

/// A 64-bit key for [`relu_dropout::Dropout`], drawn from Flex's random numbers (so
/// `Device::seed` makes a run repeat).
fn dropout_key() -> [u32; 2] {
    let draw = Flex::float_random(
        [2].into(),
        burn::tensor::Distribution::Uniform(0.0, 1.0),
        &Default::default(),
        FloatDType::F64,
    );
    let draw = view::<f64>(&draw);
    [0, 1].map(|i| (draw[i] * 4_294_967_296.0) as u32)
}

/// The elements of a contiguous tensor for writing in place: its own storage when it is the
/// tensor's whole buffer (copied first if shared), else a fresh copy that replaces it.
fn values_mut<T: Element + bytemuck::Pod>(tensor: &mut FlexTensor) -> &mut [T] {
    let whole =
        tensor.layout().contiguous_offsets() == Some((0, tensor.bytes().len() / size_of::<T>()));
    if !whole {
        let copy = view::<T>(tensor).to_vec();
        *tensor = self::tensor(copy, tensor.shape().clone());
    }
    tensor.storage_mut::<T>()
}

/// A contiguous input in a dtype the kernels take: halves are widened to f32.
fn kernel_input(tensor: FlexTensor) -> FlexTensor {
    let tensor = tensor.to_contiguous();
    match tensor.dtype() {
        DType::F16 | DType::BF16 => Flex::float_cast(tensor, FloatDType::F32).to_contiguous(),
        _ => tensor,
    }
}

/// A kernel's output narrowed back to the dtype of the input it belongs to (a no-op for f32
/// and f64).
fn kernel_output(tensor: FlexTensor, dtype: DType) -> FlexTensor {
    if tensor.dtype() == dtype {
        tensor
    } else {
        Flex::float_cast(tensor, FloatDType::from(dtype))
    }
}

fn dims2(tensor: &FlexTensor) -> [usize; 2] {
    let dims = tensor.shape();
    [dims[0], dims[1]]
}

fn dims3(tensor: &FlexTensor) -> [usize; 3] {
    let dims = tensor.shape();
    [dims[0], dims[1], dims[2]]
}

/// The elements of a contiguous Flex tensor.
///
/// # Panics
///
/// If the tensor's dtype is not `T`: an op's float inputs share one dtype (f16 and bf16 may
/// mix with f32, as they are widened to it).
fn view<T: Element + bytemuck::Pod>(tensor: &FlexTensor) -> &[T] {
    match tensor.as_slice::<T>() {
        Some(values) => values,
        None => panic!(
            "burn-pooling's Flex kernels: the op's float inputs must share one dtype, got {:?} \
             where the kernel runs in {:?}",
            tensor.dtype(),
            T::dtype()
        ),
    }
}

fn tensor<T: Element, S: Into<burn::tensor::Shape>>(values: Vec<T>, shape: S) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

/// `[B, C, N]` (channels first, one contiguous row per channel) or `[B, N, C]`.
#[derive(Clone, Copy, Debug)]
struct Shape3 {
    batch: usize,
    positions: usize,
    channels: usize,
    layout: Layout,
}

impl Shape3 {
    /// One sample of N positions and C channels (the kernels' per-sample tests).
    #[cfg(test)]
    fn one_sample(positions: usize, channels: usize, layout: Layout) -> Self {
        Self {
            batch: 1,
            positions,
            channels,
            layout,
        }
    }

    fn of(x: &FlexTensor, layout: Layout) -> Self {
        let dims = dims3(x);
        let (batch, positions, channels) = layout.split(dims);
        Self {
            batch,
            positions,
            channels,
            layout,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maths::settings::TransportSolver;
    use simd::check::values;

    fn f32_tensor(values: Vec<f32>, shape: &[usize]) -> FlexTensor {
        tensor(values, shape.to_vec())
    }

    fn cast(tensor: &FlexTensor, dtype: FloatDType) -> FlexTensor {
        Flex::float_cast(tensor.clone(), dtype)
    }

    /// `half` (a kernel's output on half inputs) is `wide` (its output on those inputs widened
    /// to f32) narrowed to `dtype`, element for element.
    fn narrowed(op: &str, dtype: FloatDType, half: &FlexTensor, wide: &FlexTensor) {
        assert_eq!(half.dtype(), DType::from(dtype), "{op}: output dtype");
        assert_eq!(half.shape(), wide.shape(), "{op}: output shape");
        let expected = cast(&cast(wide, dtype), FloatDType::F32);
        let actual = cast(half, FloatDType::F32);
        let (expected, actual) = (view::<f32>(&expected), view::<f32>(&actual));
        for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
            assert!(a.is_finite(), "{op} ({dtype:?}) at {i}: {a}");
            assert!(
                a.to_bits() == e.to_bits(),
                "{op} ({dtype:?}) at {i}: {a} vs {e}"
            );
        }
    }

    /// f16 and bf16 tensors run every kernel in f32: each op's outputs are finite and are its
    /// f32 outputs on the widened inputs, narrowed back to the inputs' dtype, in both layouts,
    /// with a padded position.
    #[test]
    fn halves_run_the_f32_kernels() {
        let (b, n, c, k) = (2, 7, 5, 3);
        let settings = TransportSettings {
            transport_ratio: 0.3,
            epsilon: 0.2,
            max_iterations: 50,
            tolerance: 1e-6,
            solver: TransportSolver::Newton,
        };
        for (dtype, layout) in [
            (FloatDType::F16, Layout::ChannelsLast),
            (FloatDType::F16, Layout::ChannelsFirst),
            (FloatDType::BF16, Layout::ChannelsLast),
            (FloatDType::BF16, Layout::ChannelsFirst),
        ] {
            let dims = layout.dims(b, n, c);
            // A tensor narrowed to the half dtype, and the same values in f32.
            let pair = |tensor: &FlexTensor| {
                let half = cast(tensor, dtype);
                let wide = cast(&half, FloatDType::F32);
                (half, wide)
            };
            let input = |values: Vec<f32>, shape: &[usize]| pair(&f32_tensor(values, shape));
            let x = input(values(b * n * c, 1, -1.0, 2.0), &dims);
            let positive = input(values(b * n * c, 2, 0.1, 2.0), &dims);
            let prototypes = input(values(k * c, 3, -1.0, 1.0), &[k, c]);
            let mass = input(vec![1.0 / n as f32; b * n], &[b, n]);
            let weights = input(values(b * n, 4, 0.0, 0.3), &[b, n]);
            let powers = input(values(c, 5, 1.0, 4.0), &[c]);
            // Position 2 of every sample padded.
            let keep = (0..b * n)
                .map(|i| if i % n == 2 { 0.0 } else { 1.0 })
                .collect();
            let mask = input(keep, &[b, n]);
            let pooled_grad = input(values(b * c, 6, -1.0, 1.0), &[b, c]);
            let costs_grad = input(values(b * k * n, 7, -1.0, 1.0), &[b, k, n]);
            let plan_grad = input(values(b * (k + 1) * n, 8, -1.0, 1.0), &[b, k + 1, n]);
            let marginals_grad = input(values(b * (n + k), 9, -1.0, 1.0), &[b, n + k]);
            let hidden = input(values(n * c, 10, -1.0, 1.0), &[n, c]);
            let bias = input(values(c, 11, -0.5, 0.5), &[c]);
            let hidden_grad = input(values(n * c, 12, -1.0, 1.0), &[n, c]);

            let run = |half: bool| {
                let pick = |pair: &(FlexTensor, FlexTensor)| {
                    if half { pair.0.clone() } else { pair.1.clone() }
                };
                let mut outputs = Vec::new();
                let costs = Flex::transport_costs(pick(&x), pick(&prototypes), layout);
                // The later ops read the outputs of the half run, widened for f32.
                let costs_in = pair(&costs);
                let (d_x, d_prototypes) = Flex::transport_costs_backward(
                    pick(&x),
                    pick(&prototypes),
                    pick(&costs_in),
                    pick(&costs_grad),
                    layout,
                );
                outputs.extend([
                    ("transport costs".to_string(), costs),
                    ("costs backward: features".to_string(), d_x),
                    ("costs backward: prototypes".to_string(), d_prototypes),
                ]);
                for (output, grad) in [
                    (TransportOutput::Plan, &plan_grad),
                    (TransportOutput::Marginals, &marginals_grad),
                ] {
                    let (first, plan, _, _) =
                        Flex::partial_transport(pick(&costs_in), pick(&mass), settings, output);
                    let plan_in = pair(&plan);
                    let d_costs = Flex::partial_transport_backward(
                        pick(&plan_in),
                        pick(grad),
                        pick(&mass),
                        settings.epsilon,
                        output,
                    );
                    outputs.extend([
                        (format!("partial transport ({output:?})"), first),
                        (format!("partial transport ({output:?}): plan"), plan),
                        (format!("partial transport backward ({output:?})"), d_costs),
                    ]);
                }
                let mean = Flex::generalized_mean(
                    pick(&positive),
                    pick(&powers),
                    pick(&mask),
                    1e-6,
                    layout,
                );
                let (d_positive, d_powers) = Flex::generalized_mean_backward(
                    pick(&positive),
                    pick(&powers),
                    pick(&mask),
                    pick(&pair(&mean)),
                    pick(&pooled_grad),
                    1e-6,
                    layout,
                );
                let sum = Flex::weighted_sum(pick(&x), pick(&weights), layout, SumOver::Positions);
                let d_x_sum = Flex::weighted_sum_features_backward(
                    pick(&weights),
                    pick(&pooled_grad),
                    layout,
                );
                let d_weights =
                    Flex::weighted_sum(pick(&x), pick(&pooled_grad), layout, SumOver::Channels);
                let activated = Flex::bias_relu_dropout(pick(&hidden), pick(&bias), 0.0);
                let (d_hidden, d_bias) = Flex::bias_relu_dropout_backward(
                    pick(&pair(&activated)),
                    pick(&hidden_grad),
                    0.0,
                );
                outputs.extend([
                    ("bias, relu and dropout".to_string(), activated),
                    (
                        "bias, relu and dropout backward: hidden".to_string(),
                        d_hidden,
                    ),
                    ("bias, relu and dropout backward: bias".to_string(), d_bias),
                ]);
                let (normalised, denominators) = Flex::l2_normalize(pick(&x), 1);
                let d_normalised = Flex::l2_normalize_backward(
                    pick(&pair(&normalised)),
                    pick(&pair(&denominators)),
                    pick(&x),
                    1,
                );
                outputs.extend([
                    ("L2 normalisation".to_string(), normalised),
                    ("L2 normalisation: denominators".to_string(), denominators),
                    ("L2 normalisation backward".to_string(), d_normalised),
                ]);
                outputs.extend([
                    ("generalized mean".to_string(), mean),
                    ("generalized mean backward: x".to_string(), d_positive),
                    ("generalized mean backward: powers".to_string(), d_powers),
                    ("weighted sum".to_string(), sum),
                    ("weighted sum backward: features".to_string(), d_x_sum),
                    ("weighted sum backward: weights".to_string(), d_weights),
                ]);
                outputs
            };
            for ((op, half), (_, wide)) in run(true).into_iter().zip(run(false)) {
                narrowed(&op, dtype, &half, &wide);
            }
        }
    }
    /// Mixed dtypes other than half with f32 panic with a message that names them.
    #[test]
    #[should_panic(expected = "must share one dtype, got F32 where the kernel runs in F64")]
    fn mixed_dtypes_panic_naming_them() {
        let x = cast(&f32_tensor(vec![1.0; 6], &[1, 3, 2]), FloatDType::F64);
        let powers = f32_tensor(vec![3.0; 2], &[2]);
        let mask = cast(&f32_tensor(vec![1.0; 3], &[1, 3]), FloatDType::F64);
        Flex::generalized_mean(x, powers, mask, 1e-6, Layout::ChannelsLast);
    }
}
