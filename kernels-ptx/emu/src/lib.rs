//! Retouch's GPU kernels run on the CPU: the sources of `kernels-ptx/device/` compiled for the
//! host, with the hardware primitives (`intrinsics`) supplied by a SIMT emulator (`simt`).
//! Every thread of a block is a coroutine; `__syncthreads`, warp shuffles and the warp-wide
//! tensor-core `mma.sync` are rendezvous between them, with the operand layouts of the PTX
//! ISA. The crate also builds as a stand-in CUDA driver (`driver`). This checks a kernel's
//! index math, tiling, barriers and fragment layouts element by element against plain
//! references without a GPU (`tests/`); not the code the NVPTX backend generates, nor its
//! speed: `retouch selftest --device cuda:0` does that on a GPU.
//!
//! Needs a nightly compiler (the kernels use `f16` and `repr(simd)`); on stable the crate is
//! empty. `.ci/run` runs its tests with `cargo +nightly test -p retouch-kernels-emu`.

#![cfg_attr(
    kernel_emu,
    feature(f16, repr_simd),
    allow(internal_features, incomplete_features)
)]

// The device modules sit at the crate root, as in the device crate, so their `crate::` paths
// resolve; `intrinsics` and `prelude` are the host's.
#[cfg(kernel_emu)]
#[allow(dead_code)]
pub mod intrinsics;
#[cfg(kernel_emu)]
#[allow(dead_code, unused_imports)]
pub mod prelude;
#[cfg(kernel_emu)]
include!(concat!(env!("OUT_DIR"), "/modules.rs"));

#[cfg(kernel_emu)]
pub mod buffer;
#[cfg(kernel_emu)]
pub mod driver;
#[cfg(kernel_emu)]
pub mod simt;
#[cfg(kernel_emu)]
pub mod streams;

/// Kernel entries by name, for launches that name a kernel (as the driver API's do).
#[cfg(kernel_emu)]
pub mod entries {
    use std::ffi::c_void;

    /// One kernel: its parameter count and a call reading each parameter from the pointer
    /// at the same index (the driver API's `kernelParams`).
    #[derive(Clone, Copy)]
    pub struct Entry {
        pub params: usize,
        /// Each parameter's size in bytes, as the PTX declares it.
        pub sizes: &'static [usize],
        pub call: unsafe fn(&[*mut c_void]),
    }

    /// Parameter `i`, typed as the kernel declares it.
    ///
    /// # Safety
    /// `p[i]` points to a value of the kernel's `i`-th parameter type.
    unsafe fn arg<T: Copy>(p: &[*mut c_void], i: usize) -> T {
        unsafe { *(p[i] as *const T) }
    }

    include!(concat!(env!("OUT_DIR"), "/entries.rs"));
}
