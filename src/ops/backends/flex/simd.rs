//! Wider vectors where the CPU has them. The crate is built for the target's baseline (SSE2 on
//! x86-64), so the exp/ln-heavy per-sample kernels are compiled a second time with AVX2 and FMA
//! enabled (8 f32 lanes instead of 4), and that copy runs when the CPU supports them.

/// `wide_kernel!(fn name<T: Real>(args..) -> R => body)` defines `name`, which runs `body`
/// (an `#[inline(always)]` function with the same arguments) from a copy compiled for AVX2
/// and FMA when the CPU has them (a cached check), else from the baseline build.
macro_rules! wide_kernel {
    ($(#[$meta:meta])* fn $name:ident<T: Real>($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty => $body:ident) => {
        $(#[$meta])*
        #[allow(clippy::too_many_arguments)]
        fn $name<T: Real>($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn wide<T: Real>($($arg: $ty),*) -> $ret {
                    $body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU supports the features `wide` is compiled for.
                    return unsafe { wide($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}

pub(super) use wide_kernel;
