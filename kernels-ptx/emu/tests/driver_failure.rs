//! A kernel that fails on the emulated driver (its own process: a failure stays with the
//! driver, as a faulted context does on a GPU). The launch itself succeeds; the failure
//! surfaces at the synchronisation that runs the kernel, and every synchronisation after.
#![cfg(kernel_emu)]

use retouch_kernels_emu::driver::*;
use std::ffi::c_void;
use std::ptr::null_mut;

const SUCCESS: i32 = 0;
const LAUNCH_FAILED: i32 = 719;

/// A module whose PTX declares `softmax_rows_f32(x, out, cols)` (the parser reads entries).
const PTX: &[u8] = b".version 7.8\n.target sm_90\n.visible .entry softmax_rows_f32(\n.param .u64 x,\n.param .u64 out,\n.param .u32 cols\n)\n{\nret;\n}\n\0";

#[test]
fn a_failed_kernel_fails_the_synchronisations_after_it() {
    unsafe {
        let mut module = null_mut();
        assert_eq!(
            cuModuleLoadData(&mut module, PTX.as_ptr() as *const c_void),
            SUCCESS
        );
        let mut function = null_mut();
        assert_eq!(
            cuModuleGetFunction(&mut function, module, c"softmax_rows_f32".as_ptr()),
            SUCCESS
        );
        let cols = 8u32;
        let (mut x, mut out) = (0u64, 0u64);
        assert_eq!(cuMemAlloc_v2(&mut x, 32), SUCCESS);
        assert_eq!(cuMemAlloc_v2(&mut out, 32), SUCCESS);
        let mut stream = null_mut();
        assert_eq!(cuStreamCreate(&mut stream, 0), SUCCESS);
        let mut args = [
            &x as *const u64 as *mut c_void,
            &out as *const u64 as *mut c_void,
            &cols as *const u32 as *mut c_void,
        ];
        // Half a warp: the row reduction's warp shuffles read lanes that do not exist.
        let launched = cuLaunchKernel(
            function,
            1,
            1,
            1,
            16,
            1,
            1,
            64,
            stream,
            args.as_mut_ptr(),
            null_mut(),
        );
        assert_eq!(launched, SUCCESS, "queued, not yet run");
        assert_eq!(cuStreamSynchronize(stream), LAUNCH_FAILED);
        assert_eq!(cuCtxSynchronize(), LAUNCH_FAILED, "the failure stays");
    }
}
