//! Device memory for emulated launches: host allocations aligned as `cudaMalloc`'s (256
//! bytes), so the kernels' 16-byte vector loads are aligned as on the GPU.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::marker::PhantomData;

pub struct DeviceBuffer<T: Copy> {
    ptr: *mut T,
    len: usize,
    layout: Layout,
    _owns: PhantomData<T>,
}

impl<T: Copy> DeviceBuffer<T> {
    pub fn from_slice(values: &[T]) -> Self {
        let buffer = Self::zeroed(values.len());
        unsafe { std::ptr::copy_nonoverlapping(values.as_ptr(), buffer.ptr, values.len()) };
        buffer
    }

    /// `len` elements of all-zero bytes.
    pub fn zeroed(len: usize) -> Self {
        let bytes = (len * size_of::<T>()).max(1);
        let layout = Layout::from_size_align(bytes, 256).expect("buffer layout");
        let ptr = unsafe { alloc_zeroed(layout) } as *mut T;
        assert!(!ptr.is_null(), "allocating {bytes} bytes");
        DeviceBuffer {
            ptr,
            len,
            layout,
            _owns: PhantomData,
        }
    }

    pub fn ptr(&self) -> *const T {
        self.ptr
    }

    pub fn ptr_mut(&self) -> *mut T {
        self.ptr
    }

    /// The address as a device-pointer table entry (`u64`), as the host launchers pass them.
    pub fn address(&self) -> u64 {
        self.ptr as u64
    }

    pub fn to_vec(&self) -> Vec<T> {
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }.to_vec()
    }
}

impl<T: Copy> Drop for DeviceBuffer<T> {
    fn drop(&mut self) {
        unsafe { dealloc(self.ptr as *mut u8, self.layout) };
    }
}
