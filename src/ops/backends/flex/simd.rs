//! Wider vectors where the CPU has them. The crate is built for the target's baseline (SSE2 on
//! x86-64), so the exp/ln-heavy per-sample kernels are compiled a second time with AVX2 and FMA
//! enabled (8 f32 lanes instead of 4), and that copy runs when the CPU supports them.

/// `wide_kernel! { fn body<T: Real>(args..) -> R { .. } => name }` defines the kernel `body`
/// (always inlined) and `name`, which runs `body` from a copy compiled for AVX2 and FMA when
/// the CPU has them (a cached check), else from the baseline build.
macro_rules! wide_kernel {
    (
        $(#[$meta:meta])*
        fn $body:ident<T: Real>($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $block:block
        => $name:ident
    ) => {
        $(#[$meta])*
        #[inline(always)]
        #[allow(clippy::too_many_arguments)]
        fn $body<T: Real>($($arg: $ty),*) $(-> $ret)? $block

        #[doc = concat!("[`", stringify!($body), "`], with wider vectors where the CPU has them.")]
        #[allow(clippy::too_many_arguments)]
        fn $name<T: Real>($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn wide<T: Real>($($arg: $ty),*) $(-> $ret)? {
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

/// Test inputs and comparisons for the per-kernel checks that the AVX2 copy and the baseline
/// build agree (the other tests run only the copy this machine picks).
#[cfg(test)]
pub(super) mod check {
    #[cfg(feature = "autodiff")]
    use burn::tensor::{Device, Tensor, Tolerance};

    /// A Flex device with autodiff, its random numbers seeded with `seed`.
    #[cfg(feature = "autodiff")]
    pub fn seeded_autodiff(seed: u64) -> Device {
        let device = Device::flex().autodiff();
        device.seed(seed);
        device
    }

    /// Panics unless two tensors agree within `tolerance` (as f32).
    #[cfg(feature = "autodiff")]
    pub fn assert_same<const D: usize>(a: Tensor<D>, b: Tensor<D>, tolerance: Tolerance<f32>) {
        a.into_data()
            .assert_approx_eq::<f32>(&b.into_data(), tolerance);
    }

    /// `pool`'s output `[B, C]` and, for L = Σ upstream ⊙ y, ∂L/∂x and ∂L/∂second (when
    /// `track_second`), on fresh leaves of `x` and `second`: what a kernel and its composite
    /// are compared on.
    #[cfg(feature = "autodiff")]
    pub fn output_and_gradients<const D: usize>(
        pool: impl Fn(Tensor<3>, Tensor<D>) -> Tensor<2>,
        x: &Tensor<3>,
        second: &Tensor<D>,
        track_second: bool,
        upstream: &Tensor<2>,
    ) -> (Tensor<2>, Tensor<3>, Option<Tensor<D>>) {
        let x = x.clone().detach().require_grad();
        let second = second.clone().detach();
        let second = if track_second {
            second.require_grad()
        } else {
            second
        };
        let y = pool(x.clone(), second.clone());
        let grads = (y.clone() * upstream.clone()).sum().backward();
        (y, x.grad(&grads).unwrap(), second.grad(&grads))
    }

    /// Panics unless the value at padded position 2 of every sample does not matter to `run`
    /// (x `[2, 6, 3]` in `layout`, as the kernel reads it, to (output, ∂L/∂x, the other
    /// gradient)): 50, NaN or ±∞ there leave the output and the other gradient unchanged and
    /// get exactly zero ∂L/∂x. The kernels select padding away, they never multiply it by 0.
    pub fn padded_values_do_not_matter(
        what: &str,
        layout: crate::layout::Layout,
        run: impl Fn(&[f64]) -> (Vec<f64>, Vec<f64>, Vec<f64>),
    ) {
        let (batch, n, c) = PADDED_SHAPE;
        let position = |i: usize| {
            if layout.is_channels_last() {
                i / c % n
            } else {
                i % n
            }
        };
        let plain: Vec<f64> = (0..batch * n * c)
            .map(|i| 0.5 + (i % 5) as f64 * 0.3)
            .collect();
        let (y, dx, other) = run(&plain);
        for garbage in [50.0, f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let outlier: Vec<f64> = plain
                .iter()
                .enumerate()
                .map(|(i, &v)| if position(i) == PADDED { garbage } else { v })
                .collect();
            let (y_outlier, dx_outlier, other_outlier) = run(&outlier);
            assert_eq!(y, y_outlier, "{what} {layout:?}, {garbage}: y");
            assert_eq!(
                other, other_outlier,
                "{what} {layout:?}, {garbage}: the other gradient"
            );
            for (i, (&d, &d_outlier)) in dx.iter().zip(&dx_outlier).enumerate() {
                let expected = if position(i) == PADDED { 0.0 } else { d };
                assert_eq!(d_outlier, expected, "{what} {layout:?}, {garbage}: dx[{i}]");
            }
        }
    }

    /// (B, N, C) of [`padded_values_do_not_matter`]'s input.
    pub const PADDED_SHAPE: (usize, usize, usize) = (2, 6, 3);
    /// Its padded position.
    pub const PADDED: usize = 2;

    /// The mask `[B, N]` of [`padded_values_do_not_matter`]'s input.
    pub fn padded_mask() -> Vec<f64> {
        let (batch, n, _) = PADDED_SHAPE;
        (0..batch * n)
            .map(|i| if i % n == PADDED { 0.0 } else { 1.0 })
            .collect()
    }

    /// The masked batch the kernels are checked against their composites on: x `[3, 7, 5]`
    /// in `layout`, uniform in [lo, hi), with 50 at sample 0's position 3 (padded: far above
    /// every valid value, where an unselected exp or power would overflow); the mask `[3, 7]`
    /// (every fourth position padded); and upstream weights `[3, 5]` for L = Σ weights ⊙ y.
    #[cfg(feature = "autodiff")]
    pub fn masked_batch(
        device: &Device,
        layout: crate::layout::Layout,
        (lo, hi): (f64, f64),
    ) -> (Tensor<3>, Tensor<2, burn::tensor::Bool>, Tensor<2>) {
        use burn::tensor::{Distribution, TensorData};
        let (b, n, c) = (3, 7, 5);
        let x = Tensor::<3>::random(layout.dims(b, n, c), Distribution::Uniform(lo, hi), device);
        let x = if layout.is_channels_last() {
            x.slice_fill([0..1, 3..4, 0..c], 50.0)
        } else {
            x.slice_fill([0..1, 0..c, 3..4], 50.0)
        };
        let keep: Vec<bool> = (0..b * n).map(|i| i % 4 != 3).collect();
        let mask =
            Tensor::<2, burn::tensor::Bool>::from_bool(TensorData::new(keep, [b, n]), device);
        let weights = Tensor::<2>::random([b, c], Distribution::Uniform(-1.0, 1.0), device);
        (x, mask, weights)
    }

    /// `len` values in [lo, hi) from a fixed linear congruential sequence.
    pub fn values(len: usize, seed: u32, lo: f32, hi: f32) -> Vec<f32> {
        let mut state = seed.wrapping_mul(747_796_405).wrapping_add(1);
        (0..len)
            .map(|_| {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                lo + (hi - lo) * (state >> 8) as f32 / (1u32 << 24) as f32
            })
            .collect()
    }

    /// Panics unless `a` and `b` agree to 1e-5 relative (1e-6 absolute), naming the place.
    pub fn agree(what: &str, a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len(), "{what}: lengths");
        for (i, (&a, &b)) in a.iter().zip(b).enumerate() {
            assert!(
                (a - b).abs() <= 1e-6 + 1e-5 * b.abs(),
                "{what}[{i}]: wide {a} vs baseline {b}"
            );
        }
    }
}
