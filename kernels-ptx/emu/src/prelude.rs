//! The host's stand-ins for the device prelude's intrinsics (the device crate has no `core`;
//! here `core` is present, so only the names the kernels import need defining).

pub use core::mem::transmute;

#[inline(always)]
pub fn sqrtf32(x: f32) -> f32 {
    x.sqrt()
}
#[inline(always)]
pub fn fmaf32(a: f32, b: f32, c: f32) -> f32 {
    a.mul_add(b, c)
}
#[inline(always)]
pub fn exp2f32(x: f32) -> f32 {
    x.exp2()
}
#[inline(always)]
pub fn maximum_number_nsz_f32(a: f32, b: f32) -> f32 {
    a.max(b)
}
#[inline(always)]
pub fn minimum_number_nsz_f32(a: f32, b: f32) -> f32 {
    a.min(b)
}
#[inline(always)]
pub fn fabs(x: f32) -> f32 {
    x.abs()
}

/// The launch's dynamic shared memory, shared by the block's threads.
#[inline(always)]
pub fn gpu_launch_sized_workgroup_mem<T>() -> *mut T {
    crate::simt::shared_memory() as *mut T
}

pub fn trap() -> ! {
    crate::intrinsics::trap();
    unreachable!()
}
