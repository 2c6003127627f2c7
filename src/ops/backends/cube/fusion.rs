//! The kernels' launch with this crate's `fusion` feature: `Cube` is `Fusion<CubeBackend>`, and
//! each kernel is registered with the fusion stream as a custom operation (a [`CustomOpIr`]
//! naming its inputs, its outputs' shapes and dtypes and its host parameters as scalars, so
//! that the stream's graph cache tells launches apart), whose [`Operation::execute`] takes the
//! inner `CubeBackend` handles and runs [`Kernel::run`] on them. The stream keeps the kernel
//! lazy like any other op: it runs when the stream flushes, between the fused element-wise
//! blocks around it.

use burn::backend::Cube;
use burn::backend::fusion::custom::{
    CustomOpIr, HandleContainer, Operation, OperationIr, OperationOutput, StreamId, TensorIr,
};
use burn::backend::fusion::{ExecutionError, FusionBackend, FusionRuntime};
use burn::backend::tensor::FloatTensor;
use burn_cubecl::CubeBackend;

use super::kernel::{Kernel, takes};

type Runtime = <CubeBackend as FusionBackend>::FusionRuntime;

/// The ids of the custom operations the fusion stream has executed, in order: what shows the
/// kernel, not the portable fallback, ran under fusion.
#[cfg(test)]
static EXECUTED: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());

/// How many times the fusion stream has executed the custom operation `id`.
#[cfg(test)]
pub(super) fn executed(id: &str) -> usize {
    let executed = EXECUTED.lock().expect("no test panics holding it");
    executed.iter().filter(|&&ran| ran == id).count()
}

/// A registered kernel: its description in the stream and what to launch.
#[derive(Debug)]
struct CustomKernel {
    desc: CustomOpIr,
    kernel: Kernel,
}

impl Operation<Runtime> for CustomKernel {
    fn execute(
        &self,
        handles: &mut HandleContainer<<Runtime as FusionRuntime>::FusionHandle>,
    ) -> Result<(), ExecutionError> {
        #[cfg(test)]
        EXECUTED
            .lock()
            .expect("no test panics holding it")
            .push(self.kernel.id());
        let inputs = self
            .desc
            .inputs
            .iter()
            .map(|input| handles.get_float_tensor::<CubeBackend>(input))
            .collect();
        let outputs = self.kernel.run(inputs);
        for (output, tensor) in self.desc.outputs.iter().zip(outputs) {
            handles.register_float_tensor::<CubeBackend>(&output.id, tensor);
        }
        Ok(())
    }
}

/// Registers `kernel` on `inputs` (of one float dtype) with their fusion stream and returns its
/// lazy outputs; hands the inputs back on mixed dtypes or a dtype the kernels do not take.
pub(super) fn launch<const I: usize, const O: usize>(
    kernel: Kernel,
    inputs: [FloatTensor<Cube>; I],
) -> Result<[FloatTensor<Cube>; O], [FloatTensor<Cube>; I]> {
    let dtype = inputs[0].dtype;
    if !takes(dtype) || inputs.iter().any(|tensor| tensor.dtype != dtype) {
        return Err(inputs);
    }
    let client = inputs[0].client.clone();
    let shapes: Vec<_> = inputs.iter().map(|tensor| &tensor.shape).collect();
    let outputs: Vec<TensorIr> = kernel
        .output_shapes(&shapes)
        .into_iter()
        .map(|shape| TensorIr::uninit(client.create_empty_handle(), shape, dtype))
        .collect();
    let inputs = inputs.map(|tensor| tensor.into_ir());
    let desc = CustomOpIr::with_scalars(kernel.id(), &inputs, &outputs, kernel.scalars());
    Ok(client
        .register(
            StreamId::current(),
            OperationIr::Custom(desc.clone()),
            CustomKernel { desc, kernel },
        )
        .outputs())
}
