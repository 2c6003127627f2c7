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
