//! Device memory for the compute stream's intermediate tensors, reused without a driver call.
//!
//! Every op allocates its output, and a UNet step drops hundreds of tensors; through cudarc
//! each is a `cuMemAllocAsync` and a `cuMemFreeAsync`, about 2,200 driver calls in a cached
//! SD1.5 step. The driver's stream-ordered pool already keeps the memory mapped; this keeps
//! the calls away too. A dropped [`PooledSlice`] puts its block on a free list by size, and
//! the next request of that size takes it back.
//!
//! Reuse is safe because every pooled block is allocated, used and returned on the compute
//! stream: a later op that takes a block is queued after every launch that read or wrote it
//! before (the reason cudarc's stream-ordered frees are safe, applied one level up). Uploads
//! on the copy stream do not come from the pool.
//!
//! Free blocks are kept up to a byte budget; beyond it a returned block is freed. A failed
//! allocation frees every free block and tries once more.

use std::collections::HashMap;
use std::mem::ManuallyDrop;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use cudarc::driver::{CudaSlice, CudaStream, LaunchArgs, PushKernelArg, sys};

use super::driver_err;
use crate::Result;

/// Free device memory the pool keeps at most: an SD1.5 step's intermediates (a few hundred
/// MB at a batch of four edits) with room to spare.
pub const POOL_BUDGET_BYTES: usize = 2 << 30;

/// Blocks up to this size are rounded to [`SMALL_STEP`], larger ones to [`LARGE_STEP`], so
/// tensors of nearly equal size share blocks.
const SMALL_LIMIT: usize = 1 << 20;
const SMALL_STEP: usize = 512;
const LARGE_STEP: usize = 2 << 20;

/// The block size serving a request of `bytes`.
fn block_size(bytes: usize) -> usize {
    let bytes = bytes.max(1);
    if bytes <= SMALL_LIMIT {
        bytes.next_multiple_of(SMALL_STEP)
    } else {
        bytes.next_multiple_of(LARGE_STEP)
    }
}

/// Free blocks by size, on the compute stream.
pub(crate) struct DevicePool {
    stream: Arc<CudaStream>,
    state: Mutex<Free>,
    budget_bytes: usize,
}

#[derive(Default)]
struct Free {
    blocks: HashMap<usize, Vec<sys::CUdeviceptr>>,
    bytes: usize,
}

impl DevicePool {
    pub(crate) fn new(stream: &Arc<CudaStream>, budget_bytes: usize) -> DevicePool {
        DevicePool {
            stream: stream.clone(),
            state: Mutex::new(Free::default()),
            budget_bytes,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Free> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `len` elements of `T` whose contents are whatever the block held before (NaN-filled
    /// with `RETOUCH_CUDA_POISON=1`, for checks that outputs are fully written).
    ///
    /// # Safety
    /// Nothing may read the elements before a launch queued after this call wrote them.
    pub(crate) unsafe fn alloc<T>(
        self: &Arc<Self>,
        op: &'static str,
        len: usize,
    ) -> Result<PooledSlice<T>> {
        let Some(bytes) = len.max(1).checked_mul(std::mem::size_of::<T>()) else {
            return crate::error::invalid(op, format!("{len} elements overflow the address space"));
        };
        let size = block_size(bytes);
        let reused = {
            let mut free = self.lock();
            let block = free.blocks.get_mut(&size).and_then(Vec::pop);
            if block.is_some() {
                free.bytes -= size;
            }
            block
        };
        let ptr = match reused {
            Some(ptr) => {
                if poison() {
                    // SAFETY: the block holds `size` bytes, owned by no one else.
                    let filled = unsafe {
                        cudarc::driver::result::memset_d8_async(
                            ptr,
                            0xff,
                            size,
                            self.stream.cu_stream(),
                        )
                    };
                    if let Err(e) = filled {
                        self.give_back(ptr, size);
                        return Err(driver_err(op)(e));
                    }
                }
                ptr
            }
            None => self.fresh(op, size)?,
        };
        // SAFETY: `ptr` is a block of `size >= len * size_of::<T>()` bytes from this
        // stream's allocations, owned by the returned slice alone.
        let slice = unsafe { self.stream.upgrade_device_ptr::<T>(ptr, len.max(1)) };
        Ok(PooledSlice {
            slice: ManuallyDrop::new(slice),
            pool: Some((self.clone(), size)),
        })
    }

    /// A newly allocated block; on failure, frees the pool's blocks and tries again.
    fn fresh(&self, op: &'static str, size: usize) -> Result<sys::CUdeviceptr> {
        // SAFETY: bytes; the caller's contract covers reads.
        let first = unsafe { self.stream.alloc::<u8>(size) };
        let block = match first {
            Ok(block) => block,
            Err(_) => {
                self.release();
                unsafe { self.stream.alloc::<u8>(size) }.map_err(driver_err(op))?
            }
        };
        Ok(block.leak())
    }

    /// Keeps a returned block while the free blocks stay within the budget, else frees it
    /// (stream-ordered, after the work queued so far).
    fn give_back(&self, ptr: sys::CUdeviceptr, size: usize) {
        {
            let mut free = self.lock();
            if free.bytes + size <= self.budget_bytes {
                free.bytes += size;
                free.blocks.entry(size).or_default().push(ptr);
                return;
            }
        }
        self.free_block(ptr);
    }

    /// Frees every free block.
    pub(crate) fn release(&self) {
        let blocks = std::mem::take(&mut *self.lock()).blocks;
        for ptr in blocks.into_values().flatten() {
            self.free_block(ptr);
        }
    }

    /// Bytes held in free blocks.
    pub(crate) fn free_bytes(&self) -> usize {
        self.lock().bytes
    }

    fn free_block(&self, ptr: sys::CUdeviceptr) {
        // SAFETY: a block this pool allocated, owned by no slice; the free is ordered after
        // the work queued on the stream, so launches still reading it finish first.
        let slice = unsafe { self.stream.upgrade_device_ptr::<u8>(ptr, 1) };
        drop(slice);
    }
}

impl Drop for DevicePool {
    fn drop(&mut self) {
        self.release();
    }
}

/// Whether reused blocks are filled with 0xff bytes (`RETOUCH_CUDA_POISON=1`): a fresh
/// block's contents are arbitrary, a reused one's are an earlier tensor's, plausible values
/// that would hide an output a kernel leaves unwritten. The selftest on the emulated driver
/// sets it.
fn poison() -> bool {
    static POISON: OnceLock<bool> = OnceLock::new();
    *POISON.get_or_init(|| std::env::var("RETOUCH_CUDA_POISON").is_ok_and(|v| v == "1"))
}

/// A device buffer that goes back to its pool when dropped (or, made from a plain
/// [`CudaSlice`], is freed as one). Dereferences to the [`CudaSlice`], and is a launch
/// argument as one.
#[derive(Debug)]
pub struct PooledSlice<T> {
    slice: ManuallyDrop<CudaSlice<T>>,
    pool: Option<(Arc<DevicePool>, usize)>,
}

impl<T> From<CudaSlice<T>> for PooledSlice<T> {
    fn from(slice: CudaSlice<T>) -> Self {
        PooledSlice {
            slice: ManuallyDrop::new(slice),
            pool: None,
        }
    }
}

impl<T> Deref for PooledSlice<T> {
    type Target = CudaSlice<T>;
    fn deref(&self) -> &CudaSlice<T> {
        &self.slice
    }
}

impl<T> DerefMut for PooledSlice<T> {
    fn deref_mut(&mut self) -> &mut CudaSlice<T> {
        &mut self.slice
    }
}

impl<T> Drop for PooledSlice<T> {
    fn drop(&mut self) {
        // SAFETY: the slice is taken once, here, and not touched after.
        let slice = unsafe { ManuallyDrop::take(&mut self.slice) };
        match self.pool.take() {
            Some((pool, size)) => pool.give_back(slice.leak(), size),
            None => drop(slice),
        }
    }
}

impl std::fmt::Debug for DevicePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DevicePool({} free bytes)", self.free_bytes())
    }
}

// SAFETY: both push the wrapped slice exactly as cudarc's own impls do.
unsafe impl<'a, 'b: 'a, T> PushKernelArg<&'b PooledSlice<T>> for LaunchArgs<'a> {
    fn arg(&mut self, arg: &'b PooledSlice<T>) -> &mut Self {
        self.arg(&*arg.slice)
    }
}

unsafe impl<'a, 'b: 'a, T> PushKernelArg<&'b mut PooledSlice<T>> for LaunchArgs<'a> {
    fn arg(&mut self, arg: &'b mut PooledSlice<T>) -> &mut Self {
        self.arg(&mut *arg.slice)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearly_equal_sizes_share_a_block_size() {
        assert_eq!(block_size(0), SMALL_STEP);
        assert_eq!(block_size(1), SMALL_STEP);
        assert_eq!(block_size(512), 512);
        assert_eq!(block_size(513), 1024);
        assert_eq!(block_size(SMALL_LIMIT), SMALL_LIMIT);
        assert_eq!(block_size(SMALL_LIMIT + 1), LARGE_STEP);
        // SD1.5's 2x64x64x320 f32 map is 10 MiB exactly; a byte more takes 12.
        assert_eq!(block_size(2 * 64 * 64 * 320 * 4), 10 << 20);
        assert_eq!(block_size((10 << 20) + 1), 12 << 20);
    }
}
