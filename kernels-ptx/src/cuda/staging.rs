//! Page-locked staging buffers for uploads on the copy stream, reused across uploads.
//!
//! A DMA copy runs beside the compute stream only from page-locked memory, and pinning is
//! slow (the driver maps every page; milliseconds per 100 MB) and a scarce resource. So the
//! device keeps a pool: an upload takes the smallest free buffer that fits (or pins a new one
//! of the next power-of-two size), fills it, queues the copy and records an event; dropping
//! its [`Staging`] handle gives the buffer back. A buffer is rewritten only after its last
//! copy's event completed, and freed only after that too. Free buffers are kept up to a byte
//! budget; beyond it a returned buffer is freed.

use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaEvent, PinnedHostSlice};

use super::driver_err;
use crate::Result;

/// Pinned bytes the pool keeps while unused: two SD1.5 template steps (about 250 MB each,
/// f16) in flight at once fit.
pub const STAGING_BUDGET_BYTES: usize = 640 << 20;

/// Smallest buffer pinned: small tensors (group statistics) share one size.
const MIN_BUFFER_BYTES: usize = 64 << 10;

/// One pinned buffer and the event after its last copy (None before its first).
pub(crate) struct PinnedBuffer {
    bytes: PinnedHostSlice<u8>,
    copied: Option<CudaEvent>,
}

impl PinnedBuffer {
    pub(crate) fn capacity(&self) -> usize {
        self.bytes.len()
    }

    /// Blocks until the last copy out of this buffer finished.
    fn wait(&self) -> Result<()> {
        match &self.copied {
            Some(event) => event.synchronize().map_err(driver_err("staging")),
            None => Ok(()),
        }
    }

    /// The first `len` bytes, for writing (the last copy out of them has finished).
    pub(crate) fn bytes_mut(&mut self, len: usize) -> Result<&mut [u8]> {
        self.wait()?;
        let all = self.bytes.as_mut_slice().map_err(driver_err("staging"))?;
        Ok(&mut all[..len])
    }

    /// Marks a copy out of this buffer as queued; `event` was recorded after it.
    pub(crate) fn copied(&mut self, event: CudaEvent) {
        self.copied = Some(event);
    }
}

impl Drop for PinnedBuffer {
    fn drop(&mut self) {
        // Freeing pinned memory under an in-flight DMA would corrupt the copy; a failed wait
        // means the context is broken and the copy is void anyway.
        let _ = self.wait();
    }
}

pub(crate) struct StagingPool {
    free: Mutex<Vec<PinnedBuffer>>,
    budget_bytes: usize,
}

impl StagingPool {
    pub(crate) fn new(budget_bytes: usize) -> StagingPool {
        StagingPool {
            free: Mutex::new(Vec::new()),
            budget_bytes,
        }
    }

    /// A buffer of at least `bytes`: the smallest free one that fits, preferring one whose
    /// last copy is done, else a newly pinned one.
    pub(crate) fn take(&self, ctx: &Arc<CudaContext>, bytes: usize) -> Result<PinnedBuffer> {
        let reused = {
            let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
            let candidates = free.iter().map(|b| {
                let idle = b.copied.as_ref().is_none_or(CudaEvent::is_complete);
                (b.capacity(), idle)
            });
            pick(candidates, bytes).map(|i| free.swap_remove(i))
        };
        if let Some(buffer) = reused {
            return Ok(buffer);
        }
        let capacity = size_class(bytes);
        // SAFETY: u8 has no invalid bit patterns; the bytes are written before a copy reads
        // them (`bytes_mut`).
        let pinned = unsafe { ctx.alloc_pinned::<u8>(capacity) }.map_err(driver_err("staging"))?;
        Ok(PinnedBuffer {
            bytes: pinned,
            copied: None,
        })
    }

    /// Keeps `buffer` for later uploads while the free buffers stay within the budget;
    /// otherwise frees it (after its copy).
    pub(crate) fn give_back(&self, buffer: PinnedBuffer) {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        let held: usize = free.iter().map(PinnedBuffer::capacity).sum();
        if keeps(held, buffer.capacity(), self.budget_bytes) {
            free.push(buffer);
            return;
        }
        // Freed after the lock: its drop waits for the copy.
        drop(free);
        drop(buffer);
    }

    /// Pinned bytes held by free buffers.
    pub(crate) fn free_bytes(&self) -> usize {
        let free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        free.iter().map(PinnedBuffer::capacity).sum()
    }
}

/// Which free buffer serves `bytes`, from each one's (capacity, last copy done): the
/// smallest that fits among those whose copy is done, else the smallest that fits.
fn pick(free: impl Iterator<Item = (usize, bool)>, bytes: usize) -> Option<usize> {
    free.enumerate()
        .filter(|(_, (capacity, _))| *capacity >= bytes)
        .min_by_key(|(_, (capacity, idle))| (!idle, *capacity))
        .map(|(i, _)| i)
}

/// Whether a returned buffer of `capacity` stays, with `held` bytes already kept.
fn keeps(held: usize, capacity: usize, budget: usize) -> bool {
    held + capacity <= budget
}

/// The capacity pinned for an upload of `bytes`: the next power of two, at least
/// [`MIN_BUFFER_BYTES`], so buffers serve uploads of similar sizes.
fn size_class(bytes: usize) -> usize {
    bytes.next_power_of_two().max(MIN_BUFFER_BYTES)
}

/// The staging buffer of one upload ([`super::CudaTensor::upload_staged`]); dropping it
/// returns the buffer to the device's pool, which reuses or frees it only once the copy
/// finished.
pub struct Staging {
    buffer: Option<(PinnedBuffer, Arc<StagingPool>)>,
}

impl Staging {
    pub(crate) fn none() -> Staging {
        Staging { buffer: None }
    }

    pub(crate) fn pooled(buffer: PinnedBuffer, pool: Arc<StagingPool>) -> Staging {
        Staging {
            buffer: Some((buffer, pool)),
        }
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if let Some((buffer, pool)) = self.buffer.take() {
            pool.give_back(buffer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_smallest_finished_buffer_that_fits_is_reused() {
        let free = [
            (1 << 20, true),
            (256 << 10, false),
            (512 << 10, true),
            (64 << 10, true),
        ];
        // 200 KiB: 256 KiB fits best but its copy is still running; 512 KiB is free.
        assert_eq!(pick(free.into_iter(), 200 << 10), Some(2));
        // Nothing finished fits: wait for the running one rather than pin more.
        assert_eq!(pick([(256 << 10, false)].into_iter(), 200 << 10), Some(0));
        assert_eq!(pick(free.into_iter(), 64 << 10), Some(3));
        assert_eq!(pick(free.into_iter(), (1 << 20) + 1), None);
        assert_eq!(pick(std::iter::empty(), 1), None);
    }

    #[test]
    fn buffers_come_in_power_of_two_sizes_and_stay_within_the_budget() {
        assert_eq!(size_class(1), MIN_BUFFER_BYTES);
        assert_eq!(size_class(MIN_BUFFER_BYTES + 1), 2 * MIN_BUFFER_BYTES);
        assert_eq!(size_class(250_000_000), 256 << 20);
        assert!(keeps(0, 256 << 20, STAGING_BUDGET_BYTES));
        assert!(keeps(256 << 20, 256 << 20, STAGING_BUDGET_BYTES));
        assert!(!keeps(512 << 20, 256 << 20, STAGING_BUDGET_BYTES));
    }
}
