//! The emulated driver's own behaviour, through its C entry points as cudarc calls them:
//! a launch by name runs the kernel on device memory, and launches the hardware refuses
//! (oversized blocks, dynamic shared memory past the function's limit) are refused.
#![cfg(kernel_emu)]

use retouch_kernels_emu::driver::*;
use std::ffi::c_void;
use std::ptr::null_mut;

const SUCCESS: i32 = 0;
const INVALID_VALUE: i32 = 1;
const NOT_FOUND: i32 = 500;

/// The entries of a module whose PTX declares `relu_f32` (the parser reads `.entry` names).
const PTX: &[u8] = b".version 7.8\n.target sm_90\n.visible .entry relu_f32(\n.param .u64 x,\n.param .u64 out,\n.param .u32 n\n)\n{\nret;\n}\n\0";

struct Relu {
    function: *mut c_void,
    x: u64,
    out: u64,
    n: u32,
}

impl Relu {
    fn new(values: &[f32]) -> Relu {
        unsafe {
            let mut module = null_mut();
            assert_eq!(
                cuModuleLoadData(&mut module, PTX.as_ptr() as *const c_void),
                SUCCESS
            );
            let mut missing = null_mut();
            assert_eq!(
                cuModuleGetFunction(&mut missing, module, c"silu_f32".as_ptr()),
                NOT_FOUND
            );
            let mut function = null_mut();
            assert_eq!(
                cuModuleGetFunction(&mut function, module, c"relu_f32".as_ptr()),
                SUCCESS
            );
            let bytes = std::mem::size_of_val(values);
            let (mut x, mut out) = (0u64, 0u64);
            assert_eq!(cuMemAlloc_v2(&mut x, bytes), SUCCESS);
            assert_eq!(cuMemAlloc_v2(&mut out, bytes), SUCCESS);
            assert_eq!(
                cuMemcpyHtoD_v2(x, values.as_ptr() as *const c_void, bytes),
                SUCCESS
            );
            Relu {
                function,
                x,
                out,
                n: values.len() as u32,
            }
        }
    }

    fn launch(&self, grid: u32, block: u32, shared: u32) -> i32 {
        let mut args = [
            &self.x as *const u64 as *mut c_void,
            &self.out as *const u64 as *mut c_void,
            &self.n as *const u32 as *mut c_void,
        ];
        unsafe {
            cuLaunchKernel(
                self.function,
                grid,
                1,
                1,
                block,
                1,
                1,
                shared,
                null_mut(),
                args.as_mut_ptr(),
                null_mut(),
            )
        }
    }

    fn output(&self) -> Vec<f32> {
        let mut out = vec![0.0f32; self.n as usize];
        let bytes = std::mem::size_of_val(out.as_slice());
        assert_eq!(
            unsafe { cuMemcpyDtoH_v2(out.as_mut_ptr() as *mut c_void, self.out, bytes) },
            SUCCESS
        );
        out
    }
}

#[test]
fn a_launch_by_name_runs_the_kernel_on_device_memory() {
    let values: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.5) * 0.25).collect();
    let relu = Relu::new(&values);
    // Fresh device memory reads as NaN until written.
    assert!(relu.output().iter().all(|v| v.is_nan()));
    assert_eq!(relu.launch(2, 128, 0), SUCCESS);
    let want: Vec<f32> = values.iter().map(|v| v.max(0.0)).collect();
    assert_eq!(relu.output(), want);
}

#[test]
fn launches_the_hardware_refuses_are_refused() {
    let relu = Relu::new(&[1.0, -2.0, 3.0]);
    assert_eq!(relu.launch(1, 2048, 0), INVALID_VALUE);
    assert_eq!(relu.launch(0, 32, 0), INVALID_VALUE);
    // Past the default 48 KiB of dynamic shared memory, until the function opts in.
    assert_eq!(relu.launch(1, 32, 64 * 1024), INVALID_VALUE);
    const MAX_DYNAMIC_SHARED_SIZE_BYTES: i32 = 8;
    unsafe {
        assert_eq!(
            cuFuncSetAttribute(relu.function, MAX_DYNAMIC_SHARED_SIZE_BYTES, 300 * 1024),
            INVALID_VALUE
        );
        assert_eq!(
            cuFuncSetAttribute(relu.function, MAX_DYNAMIC_SHARED_SIZE_BYTES, 64 * 1024),
            SUCCESS
        );
    }
    assert_eq!(relu.launch(1, 32, 64 * 1024), SUCCESS);
    assert_eq!(relu.output(), [1.0, 0.0, 3.0]);
}
