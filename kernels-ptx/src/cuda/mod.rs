//! The CUDA device: kernels from `kernels-ptx/device/` (PTX embedded at build time), launched
//! through cudarc.
//!
//! The driver library is loaded at run time (cudarc's `dynamic-loading`), so a binary built
//! without CUDA links no CUDA library: it runs its CPU paths anywhere, and opening a CUDA
//! device without a driver is a clear error ([`CudaDevice::open`]), never a panic.
//!
//! What exists: [`CudaTensor`] (f32, f16 and bf16 device buffers with a shape), upload and
//! download (synchronous, or staged through a pool of pinned buffers on a copy stream),
//! and one launcher per kernel in `ops` (elementwise, activations, softmax, layer norm, group
//! norm with optional SiLU, row gather/scatter), `attention` (dense, masked and ragged; f32
//! and tensor-core flash tiles), `lora` (patch in place, unmerged over a ragged batch) and
//! `gemm` (sgemm, `linear`, `matmul`, conv2d as an implicit GEMM, masked conv over a ragged
//! batch with f32, f16 or bf16 cached maps), with `blas` routing linear layers and convs to
//! cuBLAS when chosen. [`selftest`] checks each against the CPU implementation and times the
//! GEMM-shaped kernels.

mod attention;
mod blas;
mod gemm;
mod lora;
mod ops;
mod pool;
mod ptx;
pub mod selftest;
mod staging;
mod tables;
mod tensor;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use cudarc::driver::{CudaContext, CudaFunction, CudaStream};

pub use attention::{AttentionKernel, CudaAttentionSegment};
pub use blas::GemmBackend;
pub use gemm::{CudaConv2dWeight, CudaMaskedConvSegment};
pub use lora::CudaLoraSegment;
pub use ops::CudaBlendedSegment;
pub use pool::{POOL_BUDGET_BYTES, PooledSlice};
pub use ptx::{KERNELS, ptx_for};
pub use staging::{STAGING_BUDGET_BYTES, Staging};
pub use tables::TABLE_RING_BYTES;
pub use tensor::{CudaTensor, GpuElement};

use crate::{Device, Error, Result};

/// An opened CUDA device: its context, the stream every launch goes to, and the kernels.
pub struct CudaDevice {
    ordinal: usize,
    name: String,
    compute_capability: (i32, i32),
    stream: Arc<CudaStream>,
    /// A second stream for uploads that run beside the compute stream's work (template steps
    /// loaded ahead of need); readers wait for a [`CopyFence`].
    copy: Arc<CudaStream>,
    /// Page-locked buffers the copy stream's uploads go through, reused.
    staging: Arc<staging::StagingPool>,
    /// Where launches' small tables go up, one copy per launch.
    tables: tables::TableRing,
    /// Intermediate tensors' memory, reused without driver calls.
    pool: Arc<pool::DevicePool>,
    functions: HashMap<&'static str, CudaFunction>,
    /// The kernel [`CudaDevice::attention`] runs, as [`AttentionKernel`]'s index.
    attention_kernel: AtomicU8,
    /// The GEMMs of linear layers and convolutions, as [`GemmBackend`]'s index.
    gemm_backend: AtomicU8,
    /// cuBLAS, loaded on first use ([`CudaDevice::set_gemm_backend`]).
    blas: blas::BlasSlot,
    /// Streaming multiprocessors: how many blocks a launch needs to fill the device.
    sm_count: u32,
    /// One counter per output tile of a one-launch split-K product
    /// ([`GemmBackend::KernelsOneLaunch`]), zero between launches (each launch's last block
    /// per tile resets its own). A split product has fewer tiles than `sm_count`.
    split_counters: cudarc::driver::CudaSlice<u32>,
    /// Per-kernel times while profiling ([`CudaDevice::start_profile`]).
    profile: Mutex<Option<Profile>>,
}

/// The point on the copy stream after a set of uploads ([`CudaDevice::fence_copies`]).
pub struct CopyFence(cudarc::driver::CudaEvent);

/// A point on the compute stream with the time the GPU reached it ([`CudaDevice::mark`]):
/// two of them time the kernels queued between them without waiting for either.
pub struct TimingMark(cudarc::driver::CudaEvent);

impl TimingMark {
    /// Milliseconds from `earlier` to this mark on the GPU (waits for both to be reached).
    pub fn ms_since(&self, earlier: &TimingMark) -> Result<f32> {
        earlier
            .0
            .elapsed_ms(&self.0)
            .map_err(driver_err("ms_since"))
    }
}

/// What profiling collects: per kernel, launches and wall time.
struct Profile {
    last: Instant,
    kernels: BTreeMap<&'static str, (u64, f64)>,
}

/// One kernel's share of a profiled stretch of work.
#[derive(Clone, Debug)]
pub struct KernelTime {
    pub kernel: &'static str,
    pub launches: u64,
    /// Wall time from the previous launch's end to this launch's end, summed: the host's
    /// preparation (allocations, uploads, argument checks) plus the kernel itself.
    pub ms: f64,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.describe())
    }
}

/// Whether the CUDA driver library (libcuda) can be loaded on this machine.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the library by its usual names.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Lets the device's stream-ordered memory pool keep freed memory across synchronizations.
/// By default it hands everything back to the driver at each synchronize, and the next step
/// maps it again, allocation by allocation. A device without pools keeps its default.
fn keep_pool_memory(ctx: &CudaContext) {
    use cudarc::driver::sys;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: the context is current on this thread (CudaContext::new binds it); `pool` and
    // `threshold` outlive the calls, and the attribute takes a u64.
    unsafe {
        if sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) == sys::CUresult::CUDA_SUCCESS
        {
            let mut threshold = u64::MAX;
            let _ = sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut threshold as *mut u64).cast(),
            );
        }
    }
}

/// The device addresses of `buffers` (a kernel reading one buffer per segment indexes a
/// table of them), with the guards that keep cudarc's read-after-write ordering on the
/// buffers until the launch that reads them is queued.
pub(crate) fn device_addresses<'a, T: 'a>(
    stream: &'a Arc<CudaStream>,
    buffers: impl IntoIterator<Item = &'a cudarc::driver::CudaSlice<T>>,
) -> (Vec<u64>, Vec<cudarc::driver::SyncOnDrop<'a>>) {
    use cudarc::driver::DevicePtr;
    buffers.into_iter().map(|b| b.device_ptr(stream)).unzip()
}

/// The device addresses of elements `starts` of `buffer` (a kernel reading one block of a
/// stacked buffer per segment indexes a table of them), with the guard that keeps cudarc's
/// read-after-write ordering on the buffer until the launch is queued. Offsets must lie
/// inside the buffer.
pub(crate) fn element_addresses<'a, T: 'a>(
    stream: &'a Arc<CudaStream>,
    buffer: &'a cudarc::driver::CudaSlice<T>,
    starts: impl IntoIterator<Item = usize>,
) -> (Vec<u64>, cudarc::driver::SyncOnDrop<'a>) {
    use cudarc::driver::DevicePtr;
    let (base, guard) = buffer.device_ptr(stream);
    let size = std::mem::size_of::<T>() as u64;
    let addresses = starts
        .into_iter()
        .map(|at| base + at as u64 * size)
        .collect();
    (addresses, guard)
}

pub(crate) fn driver_err(op: &'static str) -> impl Fn(cudarc::driver::DriverError) -> Error {
    move |e| Error::Cuda {
        op,
        message: e.to_string(),
    }
}

impl CudaDevice {
    /// Opens `cuda:ordinal`: checks that a driver exists (cudarc panics on a missing library,
    /// so this comes first), creates the context, picks the PTX for the device's compute
    /// capability and loads every kernel, so a stale or broken PTX file fails here.
    pub fn open(ordinal: usize) -> Result<CudaDevice> {
        let device = Device::Cuda(ordinal).to_string();
        let unavailable = |why: String| Error::DeviceUnavailable(device.clone(), why);
        if !driver_present() {
            return Err(unavailable(
                "no CUDA driver found (libcuda.so could not be loaded): this machine has no \
                 NVIDIA driver; use `--device cpu`"
                    .into(),
            ));
        }
        let count = CudaContext::device_count().map_err(|e| unavailable(e.to_string()))?;
        if ordinal >= count.max(0) as usize {
            return Err(unavailable(format!(
                "the driver reports {count} CUDA device(s)"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| unavailable(e.to_string()))?;
        // SAFETY: every launch and most copies go to one stream, so stream order alone orders
        // them; cudarc's per-buffer events (two created and destroyed per allocation) would
        // only guard against other streams. The one other stream, for uploads ahead of need,
        // is ordered by hand: its readers wait for a `CopyFence`, and its buffers outlive
        // the compute work that reads them (their owners keep them until a synchronising
        // download).
        unsafe { ctx.disable_event_tracking() };
        keep_pool_memory(&ctx);
        let compute_capability = ctx
            .compute_capability()
            .map_err(|e| unavailable(e.to_string()))?;
        let name = ctx.name().unwrap_or_else(|_| "unknown".into());
        let sm_count = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(|e| unavailable(e.to_string()))?
            .max(1) as u32;
        let (_, source) = ptx_for(compute_capability);
        let module = ctx
            .load_module(cudarc::nvrtc::Ptx::from_src(source))
            .map_err(|e| unavailable(format!("loading the kernels' PTX: {e}")))?;
        let mut functions = HashMap::new();
        for &name in KERNELS {
            let f = module.load_function(name).map_err(|e| {
                unavailable(format!(
                    "kernel `{name}` missing from the PTX ({e}); rebuild with tools/ptx-build"
                ))
            })?;
            functions.insert(name, f);
        }
        for name in attention::WIDE_FLASH_KERNELS {
            let bytes = attention::WIDE_FLASH_SHARED_BYTES;
            functions[name]
                .set_attribute(
                    cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    bytes as i32,
                )
                .map_err(|e| {
                    unavailable(format!("raising `{name}`'s shared memory to {bytes} bytes: {e}"))
                })?;
        }
        let copy = ctx
            .new_stream()
            .map_err(|e| unavailable(format!("creating the copy stream: {e}")))?;
        let stream = ctx.default_stream();
        let pool = Arc::new(pool::DevicePool::new(&stream, POOL_BUDGET_BYTES));
        let split_counters = stream
            .alloc_zeros::<u32>(sm_count as usize)
            .map_err(|e| unavailable(format!("allocating the split-K counters: {e}")))?;
        let tables = tables::TableRing::new(&ctx, &stream)
            .map_err(|e| unavailable(format!("allocating the table ring: {e}")))?;
        Ok(CudaDevice {
            ordinal,
            name,
            compute_capability,
            stream,
            copy,
            staging: Arc::new(staging::StagingPool::new(STAGING_BUDGET_BYTES)),
            tables,
            pool,
            functions,
            attention_kernel: AtomicU8::new(AttentionKernel::Flash as u8),
            gemm_backend: AtomicU8::new(GemmBackend::Kernels as u8),
            split_counters,
            blas: blas::BlasSlot::new(),
            sm_count,
            profile: Mutex::new(None),
        })
    }

    /// Opens the device a [`Device`] names; `Device::Cpu` is an error (nothing to open).
    pub fn for_device(device: Device) -> Result<CudaDevice> {
        match device {
            Device::Cuda(n) => CudaDevice::open(n),
            Device::Cpu => Err(Error::DeviceUnavailable(
                device.to_string(),
                "not a CUDA device".into(),
            )),
        }
    }

    /// `cuda:N (name, sm_XY, PTX for sm_80|sm_90)`.
    pub fn describe(&self) -> String {
        let (major, minor) = self.compute_capability;
        let (arch, _) = ptx_for(self.compute_capability);
        format!(
            "cuda:{} ({}, sm_{major}{minor}, PTX for {arch})",
            self.ordinal, self.name
        )
    }

    /// The kernel [`CudaDevice::attention`] runs (for benchmarks comparing the two).
    pub fn attention_kernel(&self) -> AttentionKernel {
        match self.attention_kernel.load(Ordering::Relaxed) {
            k if k == AttentionKernel::Rows as u8 => AttentionKernel::Rows,
            k if k == AttentionKernel::Tiles as u8 => AttentionKernel::Tiles,
            k if k == AttentionKernel::FlashMma as u8 => AttentionKernel::FlashMma,
            k if k == AttentionKernel::FlashMmaBf16 as u8 => AttentionKernel::FlashMmaBf16,
            _ => AttentionKernel::Flash,
        }
    }

    pub fn set_attention_kernel(&self, kernel: AttentionKernel) {
        self.attention_kernel.store(kernel as u8, Ordering::Relaxed);
    }

    pub fn sm_count(&self) -> u32 {
        self.sm_count
    }

    pub fn compute_capability(&self) -> (i32, i32) {
        self.compute_capability
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The stream for uploads beside the compute stream ([`CudaTensor::upload_staged`]).
    pub fn copy_stream(&self) -> &Arc<CudaStream> {
        &self.copy
    }

    /// Pinned bytes the staging pool keeps between uploads (at most
    /// [`STAGING_BUDGET_BYTES`]).
    pub fn staging_free_bytes(&self) -> usize {
        self.staging.free_bytes()
    }

    /// Queues the upload of one launch's tables on the compute stream (see [`tables`]).
    pub(crate) fn upload_tables(
        &self,
        op: &'static str,
        set: &tables::TableSet,
    ) -> Result<tables::Tables<'_>> {
        self.tables.upload(op, set)
    }

    /// `len` elements of `T` from the device's pool (see [`pool`]), for work on the
    /// compute stream.
    ///
    /// # Safety
    /// Nothing may read the elements before a launch queued after this call wrote them.
    pub(crate) unsafe fn alloc_pooled<T>(
        &self,
        op: &'static str,
        len: usize,
    ) -> Result<PooledSlice<T>> {
        // SAFETY: the caller's contract.
        unsafe { self.pool.alloc(op, len) }
    }

    /// Device memory held by the pool for reuse, in bytes.
    pub fn pooled_free_bytes(&self) -> usize {
        self.pool.free_bytes()
    }

    pub(crate) fn staging_pool(&self) -> &Arc<staging::StagingPool> {
        &self.staging
    }

    /// Marks the copies queued on the copy stream so far: the compute stream's work may read
    /// their results once it has waited for this ([`CudaDevice::wait_for`]).
    pub fn fence_copies(&self) -> Result<CopyFence> {
        let event = self
            .copy
            .record_event(None)
            .map_err(driver_err("fence_copies"))?;
        Ok(CopyFence(event))
    }

    /// Marks the compute stream's work queued so far, with timing ([`TimingMark::ms_since`]).
    pub fn mark(&self) -> Result<TimingMark> {
        let event = self
            .stream
            .record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(driver_err("mark"))?;
        Ok(TimingMark(event))
    }

    /// Makes the compute stream's later work wait for the copies before `fence` (the host
    /// does not wait).
    pub fn wait_for(&self, fence: &CopyFence) -> Result<()> {
        self.stream.wait(&fence.0).map_err(driver_err("wait_for"))
    }

    /// Starts profiling: from now on every launch is waited for and its wall time (since the
    /// previous launch ended) charged to its kernel. Slow; for finding where a step's time
    /// goes, not for timing it.
    pub fn start_profile(&self) -> Result<()> {
        self.synchronize()?;
        *self.profile_guard() = Some(Profile {
            last: Instant::now(),
            kernels: BTreeMap::new(),
        });
        Ok(())
    }

    /// Stops profiling; the kernels by total time, largest first.
    pub fn take_profile(&self) -> Vec<KernelTime> {
        let Some(profile) = self.profile_guard().take() else {
            return Vec::new();
        };
        let mut times: Vec<KernelTime> = profile
            .kernels
            .into_iter()
            .map(|(kernel, (launches, seconds))| KernelTime {
                kernel,
                launches,
                ms: seconds * 1e3,
            })
            .collect();
        times.sort_by(|a, b| b.ms.total_cmp(&a.ms));
        times
    }

    fn profile_guard(&self) -> std::sync::MutexGuard<'_, Option<Profile>> {
        // A panic while holding it leaves only statistics behind: keep going.
        self.profile.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A launch's result as this crate's error; while profiling, also waits for it and
    /// charges its time.
    pub(crate) fn launched<T>(
        &self,
        op: &'static str,
        r: std::result::Result<T, cudarc::driver::DriverError>,
    ) -> Result<()> {
        r.map_err(driver_err(op))?;
        let mut guard = self.profile_guard();
        if let Some(p) = guard.as_mut() {
            self.synchronize()?;
            let now = Instant::now();
            let entry = p.kernels.entry(op).or_insert((0, 0.0));
            entry.0 += 1;
            entry.1 += now.duration_since(p.last).as_secs_f64();
            p.last = now;
        }
        Ok(())
    }

    /// Waits for every launch so far (their errors surface here too).
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(driver_err("synchronize"))
    }

    pub(crate) fn function(&self, name: &'static str) -> Result<&CudaFunction> {
        self.functions.get(name).ok_or_else(|| Error::Cuda {
            op: name,
            message: "kernel not loaded".into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a machine without a driver (CI), opening fails with the clear message; on a GPU
    /// machine it opens.
    #[test]
    fn open_reports_a_missing_driver() {
        match CudaDevice::open(0) {
            Ok(dev) => assert!(driver_present(), "{}", dev.describe()),
            Err(e) => {
                if !driver_present() {
                    let msg = e.to_string();
                    assert!(
                        msg.contains("cuda:0") && msg.contains("no CUDA driver"),
                        "{msg}"
                    );
                }
            }
        }
        assert!(CudaDevice::for_device(Device::Cpu).is_err());
    }
}
