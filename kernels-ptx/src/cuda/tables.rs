//! The small tables a launch reads beside its tensors (segment offsets, row maps, address
//! tables), uploaded through one page-locked ring: one asynchronous copy per launch, no
//! device allocation.
//!
//! Uploading each table on its own costs a device allocation, a copy from pageable memory
//! (which the driver stages itself and may make wait for the stream) and a free: a cached
//! UNet step made about 700 of each. Here a launcher packs its tables into a [`TableSet`] and
//! [`TableRing::upload`] writes them into the next free stretch of a page-locked buffer and
//! copies that stretch, on the compute stream, to the same offset of a device buffer.
//!
//! The ring is cut into chunks; a set never straddles two. Reuse is safe because every copy
//! and every launch reading the tables goes to the one compute stream:
//! - The host bytes of a chunk are rewritten only after an event recorded when the ring
//!   last left that chunk has completed, so every copy out of them has run.
//! - The device bytes of a chunk are rewritten only once no [`Tables`] handle into it is
//!   alive. A launcher drops its handle after queueing its launch, so the next copy into the
//!   chunk is queued after every launch that reads it.
//!
//! A set larger than a chunk, or a chunk whose handles are still held (another thread
//! between its upload and its launch), gets a device buffer of its own instead.

use std::sync::{Arc, Mutex, MutexGuard};

use cudarc::driver::{CudaContext, CudaEvent, CudaSlice, CudaStream, DevicePtr, PinnedHostSlice};

use super::driver_err;
use crate::Result;

/// Bytes of the ring (host and device each). The largest set of an SD1.5 step, a 64x64
/// masked conv's row maps, is about 190 KB for four edits (8 segments) and 750 KB for
/// sixteen: within one chunk (1 MiB).
pub const TABLE_RING_BYTES: usize = 8 << 20;

/// Chunks of the ring.
const CHUNKS: usize = 8;

/// Every table starts at a multiple of this (the widest element a kernel reads is 8 bytes;
/// 16 keeps vector loads possible).
const TABLE_ALIGN: usize = 16;

/// The tables of one launch: where each goes in the packed upload, borrowed until it is
/// written straight into the ring's page-locked bytes (no copy in between).
#[derive(Default)]
pub(crate) struct TableSet<'a> {
    parts: Vec<(usize, &'a [u8])>,
    len: usize,
}

/// Where one table sits in its [`TableSet`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TableSlot(usize);

impl<'a> TableSet<'a> {
    /// Places `values` at the next aligned offset.
    pub(crate) fn push<T: bytemuck::Pod>(&mut self, values: &'a [T]) -> TableSlot {
        let at = self.len.next_multiple_of(TABLE_ALIGN);
        let bytes: &'a [u8] = bytemuck::cast_slice(values);
        self.parts.push((at, bytes));
        self.len = at + bytes.len();
        TableSlot(at)
    }

    /// Bytes to upload, padded to the alignment (at least one alignment unit).
    fn padded_len(&self) -> usize {
        self.len.next_multiple_of(TABLE_ALIGN).max(TABLE_ALIGN)
    }

    /// Writes the packed tables into `out` (`padded_len` bytes); padding is zeroed.
    fn write_to(&self, out: &mut [u8]) {
        let mut end = 0;
        for &(at, bytes) in &self.parts {
            out[end..at].fill(0);
            out[at..at + bytes.len()].copy_from_slice(bytes);
            end = at + bytes.len();
        }
        out[end..].fill(0);
    }
}

/// A [`TableSet`] in device memory. Keep it until the launches reading it are queued.
pub(crate) struct Tables<'a> {
    base: u64,
    place: Place<'a>,
}

enum Place<'a> {
    /// In the ring's chunk; dropping the handle releases the chunk's device bytes.
    Ring(&'a TableRing, usize),
    /// In a device buffer of its own, freed (stream-ordered) with the handle.
    Own { _buffer: CudaSlice<u8> },
}

impl Tables<'_> {
    /// The device address of the table in `slot` (a kernel's pointer argument).
    pub(crate) fn address(&self, slot: TableSlot) -> u64 {
        self.base + slot.0 as u64
    }
}

impl Drop for Tables<'_> {
    fn drop(&mut self) {
        if let Place::Ring(ring, chunk) = self.place {
            ring.lock().chunks[chunk].readers -= 1;
        }
    }
}

/// The ring: a page-locked host buffer, a device buffer of the same size, and where the next
/// set goes.
pub(crate) struct TableRing {
    stream: Arc<CudaStream>,
    device_base: u64,
    state: Mutex<RingState>,
}

struct RingState {
    /// Owns the page-locked bytes `host_bytes` points at.
    _host: PinnedHostSlice<u8>,
    /// The page-locked bytes, taken once: cudarc's accessors synchronise an event on every
    /// call, a driver call per upload that the ring's own chunk events make needless.
    host_bytes: *mut u8,
    device: CudaSlice<u8>,
    cursor: Cursor,
    chunks: Vec<Chunk>,
}

// SAFETY: `host_bytes` points into `_host`, which is Send, and is only used under the ring's
// lock.
unsafe impl Send for RingState {}

#[derive(Default)]
struct Chunk {
    /// Recorded on the stream when the ring last moved past this chunk: once complete, no
    /// copy reads its host bytes.
    left: Option<CudaEvent>,
    /// Live [`Tables`] handles into this chunk.
    readers: usize,
}

impl TableRing {
    /// Pins the host buffer and allocates the device buffer, for uploads on `stream`.
    pub(crate) fn new(ctx: &Arc<CudaContext>, stream: &Arc<CudaStream>) -> Result<TableRing> {
        let err = driver_err("table ring");
        // SAFETY: u8 has no invalid bit patterns; bytes are written before a copy reads them.
        let mut host = unsafe { ctx.alloc_pinned::<u8>(TABLE_RING_BYTES) }.map_err(&err)?;
        let host_bytes = host.as_mut_ptr().map_err(&err)?;
        // SAFETY: as above; a launch reads only bytes a copy queued before it wrote.
        let device = unsafe { stream.alloc::<u8>(TABLE_RING_BYTES) }.map_err(&err)?;
        let device_base = device.device_ptr(stream).0;
        Ok(TableRing {
            stream: stream.clone(),
            device_base,
            state: Mutex::new(RingState {
                _host: host,
                host_bytes,
                device,
                cursor: Cursor::default(),
                chunks: (0..CHUNKS).map(|_| Chunk::default()).collect(),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, RingState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues the copy of `set` on the stream and returns where its tables are.
    pub(crate) fn upload(&self, op: &'static str, set: &TableSet) -> Result<Tables<'_>> {
        let err = driver_err(op);
        let len = set.padded_len();
        let mut guard = self.lock();
        let state = &mut *guard;
        match state.cursor.place(len) {
            Placement::Here => {}
            Placement::TooLarge => {
                drop(guard);
                return self.upload_own(op, set);
            }
            Placement::Next { leaving, entering } => {
                if state.chunks[entering].readers > 0 {
                    drop(guard);
                    return self.upload_own(op, set);
                }
                let left = self.stream.record_event(None).map_err(&err)?;
                state.chunks[leaving].left = Some(left);
                if let Some(event) = state.chunks[entering].left.take() {
                    event.synchronize().map_err(&err)?;
                }
                state.cursor = Cursor {
                    chunk: entering,
                    used: 0,
                };
            }
        }
        let chunk = state.cursor.chunk;
        let at = chunk * CHUNK_BYTES + state.cursor.used;
        // SAFETY: `at + len` is within the ring's `TABLE_RING_BYTES` (the cursor keeps a set
        // inside its chunk), `_host` keeps the bytes alive, the lock makes this the only
        // writer, and no queued copy still reads them (the chunk's event above).
        let host = unsafe { std::slice::from_raw_parts_mut(state.host_bytes.add(at), len) };
        set.write_to(host);
        let mut device = state.device.slice_mut(at..at + len);
        self.stream.memcpy_htod(&*host, &mut device).map_err(&err)?;
        state.cursor.used += len;
        state.chunks[chunk].readers += 1;
        Ok(Tables {
            base: self.device_base + at as u64,
            place: Place::Ring(self, chunk),
        })
    }

    /// `set` in a device buffer of its own.
    fn upload_own(&self, op: &'static str, set: &TableSet) -> Result<Tables<'_>> {
        let mut bytes = vec![0; set.padded_len()];
        set.write_to(&mut bytes);
        let buffer = self.stream.clone_htod(&bytes).map_err(driver_err(op))?;
        let base = buffer.device_ptr(&self.stream).0;
        Ok(Tables {
            base,
            place: Place::Own { _buffer: buffer },
        })
    }
}

impl Drop for TableRing {
    fn drop(&mut self) {
        // The pinned bytes are freed next: no copy may still read them. A failed wait means
        // the context is broken and the copies are void anyway.
        let _ = self.stream.synchronize();
    }
}

pub(crate) const CHUNK_BYTES: usize = TABLE_RING_BYTES / CHUNKS;

/// The next free byte: `used` bytes into `chunk`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Cursor {
    chunk: usize,
    used: usize,
}

/// Where a set of `len` bytes goes from a [`Cursor`].
#[derive(Debug, PartialEq, Eq)]
enum Placement {
    /// In the current chunk, at the cursor.
    Here,
    /// At the start of the next chunk (the ring leaves the current one).
    Next { leaving: usize, entering: usize },
    /// Larger than a chunk: not in the ring.
    TooLarge,
}

impl Cursor {
    fn place(self, len: usize) -> Placement {
        if len > CHUNK_BYTES {
            Placement::TooLarge
        } else if self.used + len <= CHUNK_BYTES {
            Placement::Here
        } else {
            Placement::Next {
                leaving: self.chunk,
                entering: (self.chunk + 1) % CHUNKS,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_start_aligned_and_keep_their_bytes() {
        let (a, b, c, d) = ([1u32, 2, 3], [u64::MAX], [0u32; 0], [7.5f32]);
        let mut set = TableSet::default();
        let slots = [set.push(&a), set.push(&b), set.push(&c), set.push(&d)];
        assert_eq!(slots.map(|s| s.0), [0, 16, 32, 32]);
        assert_eq!(set.padded_len(), 48);
        let mut out = [0xaa; 48];
        set.write_to(&mut out);
        assert_eq!(&out[..12], bytemuck::cast_slice::<u32, u8>(&a));
        assert_eq!(&out[12..16], &[0; 4]);
        assert_eq!(&out[16..24], &[0xff; 8]);
        assert_eq!(&out[32..36], &7.5f32.to_ne_bytes());
        assert_eq!(&out[36..], &[0; 12]);
        assert_eq!(TableSet::default().padded_len(), TABLE_ALIGN);
    }

    #[test]
    fn a_set_goes_at_the_cursor_or_at_the_next_chunk_and_the_ring_wraps() {
        let start = Cursor::default();
        assert_eq!(start.place(TABLE_ALIGN), Placement::Here);
        assert_eq!(start.place(CHUNK_BYTES), Placement::Here);
        assert_eq!(start.place(CHUNK_BYTES + 1), Placement::TooLarge);
        let nearly_full = Cursor {
            chunk: 2,
            used: CHUNK_BYTES - 32,
        };
        assert_eq!(nearly_full.place(32), Placement::Here);
        assert_eq!(
            nearly_full.place(48),
            Placement::Next {
                leaving: 2,
                entering: 3
            }
        );
        let last = Cursor {
            chunk: CHUNKS - 1,
            used: CHUNK_BYTES,
        };
        assert_eq!(
            last.place(TABLE_ALIGN),
            Placement::Next {
                leaving: CHUNKS - 1,
                entering: 0
            }
        );
    }
}
