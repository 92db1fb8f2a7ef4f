//! Every call that the Rust compiler cannot check, in one place: opening the driver library
//! with the dynamic loader (before cudarc may touch it, since cudarc panics when it is
//! missing), and the CUDA driver calls that cudarc's safe API does not cover for us —
//! loading a module with its JIT log, launching a kernel with arguments packed from a
//! manifest, copying between raw regions of device memory, and keeping graphs and handles
//! movable between threads.
//!
//! The rest of the crate is safe code. The invariants the `unsafe` blocks rely on are made
//! structural here: a [`DeviceRegion`] can only be made inside a live allocation, copies
//! check their lengths, and kernel handles keep their module alive. (`lib.rs` allows
//! `unsafe_code`, denied in the rest of the workspace, for this module alone.)

use std::ffi::{c_void, CString};
use std::marker::PhantomData;
use std::ops::Range;
use std::sync::Arc;

use cudarc::driver::sys::{self, CUjit_option, CUresult};
use cudarc::driver::{
    result, CudaContext, CudaGraph, CudaSlice, CudaStream, DevicePtr, DriverError, PinnedHostSlice,
};

use crate::launch::LaunchShape;

/// The driver functions kiln calls, directly or through cudarc. cudarc resolves each one on
/// first use and panics when it is missing, so the probe checks them all up front.
pub(crate) const REQUIRED_DRIVER_SYMBOLS: &[&str] = &[
    "cuInit",
    "cuDriverGetVersion",
    "cuGetErrorName",
    "cuGetErrorString",
    "cuDeviceGetCount",
    "cuDeviceGet",
    "cuDeviceGetName",
    "cuDeviceTotalMem_v2",
    "cuDeviceGetAttribute",
    "cuDevicePrimaryCtxRetain",
    "cuDevicePrimaryCtxRelease_v2",
    "cuCtxGetCurrent",
    "cuCtxSetCurrent",
    "cuCtxSynchronize",
    "cuLaunchKernelEx",
    "cuStreamCreate",
    "cuStreamDestroy_v2",
    "cuStreamSynchronize",
    "cuMemAllocAsync",
    "cuMemAlloc_v2",
    "cuMemFreeAsync",
    "cuMemFree_v2",
    "cuMemsetD8Async",
    "cuMemcpyHtoDAsync_v2",
    "cuMemHostAlloc",
    "cuMemFreeHost",
    "cuMemcpyDtoHAsync_v2",
    "cuMemcpyDtoDAsync_v2",
    "cuMemcpy2DAsync_v2",
    "cuModuleLoadDataEx",
    "cuModuleGetFunction",
    "cuFuncSetAttribute",
    "cuModuleUnload",
    "cuLaunchKernel",
    "cuEventCreate",
    "cuEventRecord",
    "cuEventSynchronize",
    "cuEventElapsedTime_v2",
    "cuEventDestroy_v2",
    "cuStreamBeginCapture_v2",
    "cuStreamEndCapture",
    "cuGraphInstantiateWithFlags",
    "cuGraphLaunch",
    "cuGraphExecDestroy",
    "cuGraphDestroy",
];

/// Opens a shared library by file name or path, returning the loader's message on failure.
pub(crate) fn open_library(name: &str) -> Result<libloading::Library, String> {
    // SAFETY: opening a library runs its initialisers. The only library opened here is the
    // NVIDIA driver library (under the names cudarc itself would open), which is made to be
    // dlopen'ed by every CUDA application; no function is called through this handle.
    unsafe { libloading::Library::new(name) }.map_err(|error| {
        match std::error::Error::source(&error) {
            Some(cause) => format!("{error}: {cause}"),
            None => error.to_string(),
        }
    })
}

/// The names in `symbols` that `library` does not export.
pub(crate) fn missing_symbols(library: &libloading::Library, symbols: &[&str]) -> Vec<String> {
    symbols
        .iter()
        .filter(|symbol| {
            // SAFETY: this only looks the symbol up; the address is never called or read, so
            // the pointer type it is given does not matter.
            let found = unsafe { library.get::<*const c_void>(**symbol) };
            found.is_err()
        })
        .map(|symbol| symbol.to_string())
        .collect()
}

/// `cuDriverGetVersion`: the CUDA version the driver supports, as `1000 * major + 10 * minor`.
pub(crate) fn driver_version() -> Result<i32, DriverError> {
    let mut version = 0i32;
    // SAFETY: the probe checked that libcuda exports the function; it writes one int
    // through a pointer to a live local and needs no initialisation.
    unsafe { sys::cuDriverGetVersion(&mut version) }.result()?;
    Ok(version)
}

/// The name, memory size and one attribute reader of device `ordinal`, without a context.
pub(crate) struct RawDevice(sys::CUdevice);

impl RawDevice {
    pub(crate) fn get(ordinal: usize) -> Result<RawDevice, DriverError> {
        let ordinal =
            i32::try_from(ordinal).map_err(|_| DriverError(CUresult::CUDA_ERROR_INVALID_DEVICE))?;
        result::device::get(ordinal).map(RawDevice)
    }

    pub(crate) fn name(&self) -> Result<String, DriverError> {
        result::device::get_name(self.0)
    }

    pub(crate) fn total_memory(&self) -> Result<usize, DriverError> {
        // SAFETY: `self.0` came from `cuDeviceGet`, as `total_mem` requires.
        unsafe { result::device::total_mem(self.0) }
    }

    pub(crate) fn attribute(&self, attribute: sys::CUdevice_attribute) -> Result<i32, DriverError> {
        // SAFETY: `self.0` came from `cuDeviceGet`, as `get_attribute` requires.
        unsafe { result::device::get_attribute(self.0, attribute) }
    }
}

/// Makes cudarc stop tracking reads and writes of its allocations with events.
///
/// kiln uses one stream per [`CudaContext`] object and orders everything on it, so the
/// events add nothing; worse, waiting on events recorded outside a stream capture breaks
/// CUDA graph capture. Must be called before the first stream or allocation of `ctx`.
pub(crate) fn use_single_stream_ordering(ctx: &CudaContext) {
    // SAFETY: cudarc requires that, without event tracking, the caller orders accesses to
    // each allocation itself. Every allocation, copy, launch and free that kiln makes on
    // this context object goes to its one stream (`CudaDevice::stream`), which orders them.
    unsafe { ctx.disable_event_tracking() };
}

/// The device address of an allocation.
pub(crate) fn address_of(slice: &CudaSlice<u8>, stream: &CudaStream) -> u64 {
    let (address, _no_op_with_tracking_off) = slice.device_ptr(stream);
    address
}

/// A range of bytes inside a live device allocation. It can only be made by
/// [`DeviceRegion::within`], which checks the bounds, and it borrows the allocation, so it
/// never outlives it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct DeviceRegion<'a> {
    address: u64,
    bytes: usize,
    _allocation: PhantomData<&'a CudaSlice<u8>>,
}

impl<'a> DeviceRegion<'a> {
    /// `bytes` bytes at `offset` of `allocation` (whose address is `address`), or `None`
    /// when they do not fit.
    pub(crate) fn within(
        allocation: &'a CudaSlice<u8>,
        address: u64,
        offset: usize,
        bytes: usize,
    ) -> Option<DeviceRegion<'a>> {
        let end = offset.checked_add(bytes)?;
        (end <= allocation.len()).then_some(DeviceRegion {
            address: address.checked_add(offset as u64)?,
            bytes,
            _allocation: PhantomData,
        })
    }

    pub(crate) fn address(&self) -> u64 {
        self.address
    }

    pub(crate) fn len(&self) -> usize {
        self.bytes
    }
}

/// Copies `source` into the start of `destination` (stream-ordered; the host bytes may be
/// dropped when this returns, since the driver stages pageable memory before returning).
pub(crate) fn copy_host_to_device(
    stream: &CudaStream,
    destination: DeviceRegion<'_>,
    source: &[u8],
) -> Result<(), DriverError> {
    if source.len() > destination.bytes {
        return Err(DriverError(CUresult::CUDA_ERROR_INVALID_VALUE));
    }
    if source.is_empty() {
        return Ok(());
    }
    stream.context().bind_to_thread()?;
    // SAFETY: the destination lies inside a live allocation (DeviceRegion's invariant) and
    // holds at least `source.len()` bytes (checked above); the source is a live host slice
    // that the driver reads (into staging memory) before this call returns.
    unsafe { result::memcpy_htod_async(destination.address, source, stream.cu_stream()) }
}

/// Copies the start of `source` into `destination` and waits for the copy to finish.
pub(crate) fn copy_device_to_host(
    stream: &CudaStream,
    destination: &mut [u8],
    source: DeviceRegion<'_>,
) -> Result<(), DriverError> {
    if destination.len() > source.bytes {
        return Err(DriverError(CUresult::CUDA_ERROR_INVALID_VALUE));
    }
    if destination.is_empty() {
        return Ok(());
    }
    stream.context().bind_to_thread()?;
    // SAFETY: the source lies inside a live allocation and holds at least
    // `destination.len()` bytes (checked above); the destination is a live, exclusively
    // borrowed host slice, and the stream is synchronized before the borrow ends, so the
    // driver's write completes while the slice is still ours.
    unsafe { result::memcpy_dtoh_async(destination, source.address, stream.cu_stream()) }?;
    stream.synchronize()
}

/// Page-locked host memory through which a program's inputs go to the device and its
/// outputs come back. Copies from and to page-locked memory are DMA transfers the driver
/// neither stages nor waits for, which makes the small copies of a decode step cheap. Its
/// bytes are rewritten only once the copies reading them are done: after an upload the
/// staging is pending until [`PinnedStaging::finished`] says the stream was synchronized,
/// and the next use synchronizes first if it was not.
#[derive(Default)]
pub(crate) struct PinnedStaging {
    memory: Option<PinnedHostSlice<u8>>,
    /// Whether copies reading `memory` may still be queued on the stream.
    pending: bool,
}

impl std::fmt::Debug for PinnedStaging {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let bytes = self.memory.as_ref().map_or(0, PinnedHostSlice::num_bytes);
        write!(f, "PinnedStaging({bytes} bytes)")
    }
}

/// Each staged copy starts at a multiple of this many bytes.
const STAGING_ALIGN: usize = 256;

impl PinnedStaging {
    /// The stream was synchronized: no copy reads the memory any more.
    pub(crate) fn finished(&mut self) {
        self.pending = false;
    }

    /// The memory, at least `bytes` long (grown to a power of two). With `host_writes`
    /// (the host is about to write it) or a new allocation, once no queued copy uses it;
    /// else at once: copies queued now run after the queued ones, in stream order.
    fn memory(
        &mut self,
        stream: &CudaStream,
        bytes: usize,
        host_writes: bool,
    ) -> Result<&mut [u8], DriverError> {
        let grow = self.memory.as_ref().is_none_or(|m| m.num_bytes() < bytes);
        if self.pending && (host_writes || grow) {
            stream.synchronize()?;
            self.pending = false;
        }
        if grow {
            // Dropping the old memory waits for its (never recorded) event and frees it.
            self.memory = None;
            let size = bytes.next_power_of_two().max(4096);
            // SAFETY: flags 0 asks for ordinary cached page-locked memory; its bytes are
            // uninitialized, and kiln writes every byte of a part before copying it.
            let memory = unsafe { stream.context().alloc_pinned_with_flags::<u8>(size, 0) }?;
            self.memory = Some(memory);
        }
        let memory = self.memory.as_mut().expect("allocated above");
        memory.as_mut_slice()
    }

    /// Copies each part's host bytes to the start of its region (stream-ordered, returning
    /// before the copies are done).
    pub(crate) fn upload(
        &mut self,
        stream: &CudaStream,
        parts: &[(DeviceRegion<'_>, &[u8])],
    ) -> Result<(), DriverError> {
        if parts
            .iter()
            .any(|(region, bytes)| bytes.len() > region.bytes)
        {
            return Err(DriverError(CUresult::CUDA_ERROR_INVALID_VALUE));
        }
        let offsets = staged_offsets(parts.iter().map(|(_, bytes)| bytes.len()));
        let total = offsets.last().copied().unwrap_or(0);
        if total == 0 {
            return Ok(());
        }
        let memory = self.memory(stream, total, true)?;
        for ((_, bytes), window) in parts.iter().zip(offsets.windows(2)) {
            memory[window[0]..window[0] + bytes.len()].copy_from_slice(bytes);
        }
        stream.context().bind_to_thread()?;
        self.pending = true;
        let memory = self.memory.as_ref().expect("allocated above").as_slice()?;
        for ((region, bytes), window) in parts.iter().zip(offsets.windows(2)) {
            if bytes.is_empty() {
                continue;
            }
            let source = &memory[window[0]..window[0] + bytes.len()];
            // SAFETY: the destination lies inside a live allocation and holds at least
            // `source.len()` bytes (checked above); the source is page-locked memory this
            // staging owns, which is neither freed nor rewritten before the stream has
            // finished this copy (`pending`).
            unsafe { result::memcpy_htod_async(region.address, source, stream.cu_stream()) }?;
        }
        Ok(())
    }

    /// Queues copies of the regions into the staging memory behind the work already on
    /// the stream, without waiting: once the stream has been synchronized (and
    /// [`PinnedStaging::finished`] called), [`PinnedStaging::downloaded`] returns their
    /// bytes. A decode step queues its outputs' copies right after its launch, so that one
    /// wait covers both.
    pub(crate) fn queue_download(
        &mut self,
        stream: &CudaStream,
        regions: &[DeviceRegion<'_>],
    ) -> Result<QueuedDownload, DriverError> {
        let offsets = staged_offsets(regions.iter().map(DeviceRegion::len));
        let total = offsets.last().copied().unwrap_or(0);
        let parts: Vec<Range<usize>> = regions
            .iter()
            .zip(&offsets)
            .map(|(region, &offset)| offset..offset + region.bytes)
            .collect();
        if total == 0 {
            return Ok(QueuedDownload { parts });
        }
        let memory = self.memory(stream, total, false)?;
        stream.context().bind_to_thread()?;
        for (region, part) in regions.iter().zip(&parts) {
            if part.is_empty() {
                continue;
            }
            let destination = &mut memory[part.clone()];
            // SAFETY: the source lies inside a live allocation of `region.bytes` bytes; the
            // destination is page-locked memory this staging owns, which is neither freed
            // nor read or written by the host before the stream has finished this copy
            // (`pending`; `downloaded` is called after a synchronize).
            unsafe { result::memcpy_dtoh_async(destination, region.address, stream.cu_stream()) }?;
        }
        self.pending = true;
        Ok(QueuedDownload { parts })
    }

    /// The bytes of a [`PinnedStaging::queue_download`], once the stream has finished it
    /// (an error while copies may still be pending).
    pub(crate) fn downloaded(&self, queued: &QueuedDownload) -> Result<Vec<&[u8]>, DriverError> {
        if queued.parts.iter().all(Range::is_empty) {
            return Ok(queued.parts.iter().map(|_| &[][..]).collect());
        }
        if self.pending {
            return Err(DriverError(CUresult::CUDA_ERROR_NOT_READY));
        }
        let memory = self
            .memory
            .as_ref()
            .expect("allocated by queue_download")
            .as_slice()?;
        Ok(queued
            .parts
            .iter()
            .map(|part| &memory[part.clone()])
            .collect())
    }
}

/// Where [`PinnedStaging::queue_download`] put each region's bytes in the staging memory.
#[derive(Debug)]
pub(crate) struct QueuedDownload {
    parts: Vec<Range<usize>>,
}

/// The staging offsets of parts of `lengths` bytes, each aligned to [`STAGING_ALIGN`],
/// followed by the total.
fn staged_offsets(lengths: impl Iterator<Item = usize>) -> Vec<usize> {
    let mut offsets = vec![0];
    for length in lengths {
        let end = offsets.last().copied().unwrap_or(0) + length;
        offsets.push(end.next_multiple_of(STAGING_ALIGN));
    }
    offsets
}

/// Copies `bytes` bytes from the start of `source` to the start of `destination`
/// (stream-ordered; may be captured into a graph).
pub(crate) fn copy_device_to_device(
    stream: &CudaStream,
    destination: DeviceRegion<'_>,
    source: DeviceRegion<'_>,
    bytes: usize,
) -> Result<(), DriverError> {
    if bytes > destination.bytes || bytes > source.bytes {
        return Err(DriverError(CUresult::CUDA_ERROR_INVALID_VALUE));
    }
    if bytes == 0 {
        return Ok(());
    }
    stream.context().bind_to_thread()?;
    // SAFETY: both regions lie inside live allocations and hold at least `bytes` bytes
    // (checked above); the allocations are freed stream-ordered on this same stream, so
    // they outlive the copy.
    unsafe {
        result::memcpy_dtod_async(
            destination.address,
            source.address,
            bytes,
            stream.cu_stream(),
        )
    }
}

/// Copies `count` elements of `from` bytes each, from the start of `source`, into
/// elements of `to` bytes at the start of `destination`, keeping each element's first
/// (low, on the little-endian devices CUDA runs on) `to` bytes: an `i64` to `i32`
/// narrowing where `to` < `from`, a plain copy where they are equal. Stream-ordered, one
/// strided copy (`cuMemcpy2DAsync`: `count` rows of `to` bytes, source rows `from` bytes
/// apart).
pub(crate) fn copy_narrowing(
    stream: &CudaStream,
    destination: DeviceRegion<'_>,
    source: DeviceRegion<'_>,
    count: usize,
    (from, to): (usize, usize),
) -> Result<(), DriverError> {
    let fits = |region: &DeviceRegion<'_>, size: usize| {
        count.checked_mul(size).is_some_and(|b| b <= region.bytes)
    };
    if to == 0 || to > from || !fits(&source, from) || !fits(&destination, to) {
        return Err(DriverError(CUresult::CUDA_ERROR_INVALID_VALUE));
    }
    if count == 0 {
        return Ok(());
    }
    if to == from {
        return copy_device_to_device(stream, destination, source, count * to);
    }
    let copy = sys::CUDA_MEMCPY2D {
        srcXInBytes: 0,
        srcY: 0,
        srcMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
        srcHost: std::ptr::null(),
        srcDevice: source.address,
        srcArray: std::ptr::null_mut(),
        srcPitch: from,
        dstXInBytes: 0,
        dstY: 0,
        dstMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
        dstHost: std::ptr::null_mut(),
        dstDevice: destination.address,
        dstArray: std::ptr::null_mut(),
        dstPitch: to,
        WidthInBytes: to,
        Height: count,
    };
    stream.context().bind_to_thread()?;
    // SAFETY: both regions lie inside live allocations, the source holds `count` rows of
    // `from` bytes and the destination `count` rows of `to` bytes (checked above); the
    // allocations are freed stream-ordered on this same stream, so they outlive the copy,
    // and the descriptor is read before the call returns.
    unsafe { sys::cuMemcpy2DAsync_v2(&copy, stream.cu_stream()) }.result()
}

/// A loaded `CUmodule`, unloaded on drop.
#[derive(Debug)]
pub(crate) struct LoadedModule {
    handle: sys::CUmodule,
    ctx: Arc<CudaContext>,
}

// SAFETY: a CUmodule handle belongs to a context, not to a thread; every use here binds the
// context to the calling thread first (as cudarc's own `CudaModule`, also Send + Sync, does).
unsafe impl Send for LoadedModule {}
// SAFETY: as above; the driver's module functions used here are thread-safe.
unsafe impl Sync for LoadedModule {}

impl Drop for LoadedModule {
    fn drop(&mut self) {
        self.ctx.record_err(self.ctx.bind_to_thread());
        // SAFETY: the handle came from a successful cuModuleLoadDataEx and is unloaded only
        // here, once; every KernelFunction holds an Arc to this module, so none outlives it.
        self.ctx
            .record_err(unsafe { result::module::unload(self.handle) });
    }
}

/// Why `cuModuleLoadDataEx` failed: the driver's code and the JIT's error log.
pub(crate) struct ModuleLoadFailure {
    pub(crate) error: DriverError,
    pub(crate) jit_log: String,
}

/// Bytes of each JIT log buffer.
const JIT_LOG_BYTES: usize = 16 * 1024;

/// Loads a fatbin, cubin or PTX image with `cuModuleLoadDataEx`, collecting the JIT log.
///
/// The image is copied into 8-byte aligned memory followed by zero bytes, so that fatbin
/// headers are aligned and PTX text is NUL-terminated.
pub(crate) fn load_module(
    ctx: &Arc<CudaContext>,
    image: &[u8],
) -> Result<LoadedModule, ModuleLoadFailure> {
    let no_log = |error| ModuleLoadFailure {
        error,
        jit_log: String::new(),
    };
    ctx.bind_to_thread().map_err(no_log)?;
    let mut aligned = vec![0u64; image.len() / 8 + 2];
    for (word, chunk) in aligned.iter_mut().zip(image.chunks(8)) {
        let mut bytes = [0u8; 8];
        bytes[..chunk.len()].copy_from_slice(chunk);
        *word = u64::from_ne_bytes(bytes);
    }
    let mut error_log = vec![0u8; JIT_LOG_BYTES];
    let mut info_log = vec![0u8; JIT_LOG_BYTES];
    let mut options = [
        CUjit_option::CU_JIT_ERROR_LOG_BUFFER,
        CUjit_option::CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES,
        CUjit_option::CU_JIT_INFO_LOG_BUFFER,
        CUjit_option::CU_JIT_INFO_LOG_BUFFER_SIZE_BYTES,
    ];
    // Sizes are passed in the pointer-sized option values themselves, as the API specifies.
    let mut values: [*mut c_void; 4] = [
        error_log.as_mut_ptr().cast(),
        std::ptr::without_provenance_mut(JIT_LOG_BYTES),
        info_log.as_mut_ptr().cast(),
        std::ptr::without_provenance_mut(JIT_LOG_BYTES),
    ];
    let mut handle: sys::CUmodule = std::ptr::null_mut();
    // SAFETY: the image is a live, aligned buffer that is NUL-terminated past the end of the
    // given bytes; the driver reads it only during this call. The option arrays have 4
    // entries each, the log buffers are live and JIT_LOG_BYTES long as their size options
    // say, and `handle` is a live local the driver writes on success.
    let status = unsafe {
        sys::cuModuleLoadDataEx(
            &mut handle,
            aligned.as_ptr().cast(),
            options.len() as u32,
            options.as_mut_ptr(),
            values.as_mut_ptr(),
        )
    };
    match status.result() {
        Ok(()) => Ok(LoadedModule {
            handle,
            ctx: ctx.clone(),
        }),
        Err(error) => {
            let mut jit_log = log_text(&error_log);
            let info = log_text(&info_log);
            if !info.is_empty() {
                if !jit_log.is_empty() {
                    jit_log.push('\n');
                }
                jit_log.push_str(&info);
            }
            Err(ModuleLoadFailure { error, jit_log })
        }
    }
}

/// The NUL-terminated text at the start of a log buffer.
fn log_text(buffer: &[u8]) -> String {
    let end = buffer.iter().position(|&b| b == 0).unwrap_or(buffer.len());
    String::from_utf8_lossy(&buffer[..end]).trim().to_string()
}

/// A kernel of a loaded module; keeps the module loaded.
#[derive(Debug)]
pub(crate) struct KernelFunction {
    handle: sys::CUfunction,
    module: Arc<LoadedModule>,
}

// SAFETY: a CUfunction handle belongs to its module's context, not to a thread; launches bind
// the context first. The Arc keeps the module (and so the handle) alive.
unsafe impl Send for KernelFunction {}
// SAFETY: as above; cuLaunchKernel may be called on one function from several threads.
unsafe impl Sync for KernelFunction {}

/// Looks up the kernel `name` in `module`.
pub(crate) fn kernel_function(
    module: &Arc<LoadedModule>,
    name: &str,
) -> Result<KernelFunction, DriverError> {
    let name = CString::new(name).map_err(|_| DriverError(CUresult::CUDA_ERROR_INVALID_VALUE))?;
    module.ctx.bind_to_thread()?;
    // SAFETY: the module handle is live (the Arc keeps it loaded) and the name is a valid
    // NUL-terminated string.
    let handle = unsafe { result::module::get_function(module.handle, name) }?;
    Ok(KernelFunction {
        handle,
        module: module.clone(),
    })
}

/// Lets `function` launch with up to `bytes` of dynamic shared memory
/// (`CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES`; without it a launch may pass at most
/// 48 KiB). Fails when the device cannot give a block that much.
pub(crate) fn allow_dynamic_shared(
    function: &KernelFunction,
    bytes: u32,
) -> Result<(), DriverError> {
    let bytes =
        i32::try_from(bytes).map_err(|_| DriverError(CUresult::CUDA_ERROR_INVALID_VALUE))?;
    function.module.ctx.bind_to_thread()?;
    // SAFETY: the function handle is live (its module is held by `function`).
    unsafe {
        result::function::set_function_attribute(
            function.handle,
            sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            bytes,
        )
    }
}

/// One kernel argument by value, in the size of the kernel's PTX parameter.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum ArgValue {
    /// A device address (`.u64`).
    Address(u64),
    I64(i64),
    I32(i32),
    F32(f32),
    /// A predicate as one byte (`.u8`).
    Pred(u8),
}

/// How a launch relates to the kernel before it on the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LaunchOrder {
    /// The kernel starts once everything before it on the stream has finished.
    Serial,
    /// Programmatic dependent launch (compute capability 9.0 and later): the kernel may be
    /// scheduled once every block of the kernel before it has run
    /// `griddepcontrol.launch_dependents`, and its own `griddepcontrol.wait` holds it until
    /// that kernel has finished and its writes are visible. Only for kernels whose PTX waits
    /// before touching memory another kernel writes (kiln's PTX for sm_90a and later).
    DependsOnPrevious,
}

/// Launches `function` on `stream` with `shape` and `args`.
///
/// The caller guarantees that `args` match the kernel's parameters in count, order and size
/// (they are built from the manifest's `ParamLayout`, which the PTX emitter derives from the
/// same kernel) and that every address is inside an allocation that lives until the kernel
/// has run (allocations are freed stream-ordered on this stream).
pub(crate) fn launch(
    stream: &CudaStream,
    function: &KernelFunction,
    shape: &LaunchShape,
    args: &mut [ArgValue],
    order: LaunchOrder,
) -> Result<(), DriverError> {
    function.module.ctx.bind_to_thread()?;
    let mut params: Vec<*mut c_void> = args
        .iter_mut()
        .map(|arg| -> *mut c_void {
            match arg {
                ArgValue::Address(value) => (value as *mut u64).cast(),
                ArgValue::I64(value) => (value as *mut i64).cast(),
                ArgValue::I32(value) => (value as *mut i32).cast(),
                ArgValue::F32(value) => (value as *mut f32).cast(),
                ArgValue::Pred(value) => (value as *mut u8).cast(),
            }
        })
        .collect();
    let [gx, gy, gz] = shape.grid;
    let [bx, by, bz] = shape.block;
    // The function handle is live (its module is held by `function`); `params` has
    // one pointer per kernel parameter, each to a live value of the parameter's size in
    // `args`, which the driver copies before returning (also while capturing a graph); the
    // addresses passed satisfy the caller's guarantee above.
    if order == LaunchOrder::Serial {
        // SAFETY: see above.
        return unsafe {
            result::launch_kernel(
                function.handle,
                (gx, gy, gz),
                (bx, by, bz),
                shape.dynamic_shared_bytes,
                stream.cu_stream(),
                &mut params,
            )
        };
    }
    let mut attribute = sys::CUlaunchAttribute {
        id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
        pad: [0; 4],
        value: sys::CUlaunchAttributeValue { pad: [0; 64] },
    };
    attribute.value.programmaticStreamSerializationAllowed = 1;
    let config = sys::CUlaunchConfig {
        gridDimX: gx,
        gridDimY: gy,
        gridDimZ: gz,
        blockDimX: bx,
        blockDimY: by,
        blockDimZ: bz,
        sharedMemBytes: shape.dynamic_shared_bytes,
        hStream: stream.cu_stream(),
        attrs: &mut attribute,
        numAttrs: 1,
    };
    // SAFETY: see above; `config` and the one attribute it points to live until the call
    // returns, and the driver copies them.
    unsafe {
        sys::cuLaunchKernelEx(
            &config,
            function.handle,
            params.as_mut_ptr(),
            std::ptr::null_mut(),
        )
        .result()
    }
}

/// A captured and instantiated CUDA graph.
///
/// It holds the raw device addresses of the buffers it was captured with: its owner must
/// drop it before any of those buffers is freed or re-allocated.
pub(crate) struct CapturedGraph(CudaGraph);

impl std::fmt::Debug for CapturedGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CapturedGraph")
    }
}

// SAFETY: graph objects must not be used from two threads at once; CapturedGraph is Send
// but not Sync, and its owner (CudaProgram) needs `&mut self` to launch it, so one thread
// at a time uses it. cudarc's CudaGraph binds the context before each call.
unsafe impl Send for CapturedGraph {}

impl CapturedGraph {
    pub(crate) fn new(graph: CudaGraph) -> CapturedGraph {
        CapturedGraph(graph)
    }

    pub(crate) fn launch(&self) -> Result<(), DriverError> {
        self.0.launch()
    }
}

impl std::fmt::Debug for ModuleLoadFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModuleLoadFailure")
            .field("error", &self.error.0)
            .field("jit_log", &self.jit_log)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::{staged_offsets, STAGING_ALIGN};

    #[test]
    fn staged_parts_start_aligned_and_do_not_overlap() {
        let lengths = [4, 0, 1000, 256, 3];
        let offsets = staged_offsets(lengths.iter().copied());
        assert_eq!(offsets.len(), lengths.len() + 1);
        for (i, length) in lengths.iter().enumerate() {
            assert_eq!(offsets[i] % STAGING_ALIGN, 0, "part {i} starts unaligned");
            assert!(
                offsets[i] + length <= offsets[i + 1],
                "part {i} overlaps the next"
            );
        }
        assert_eq!(offsets, vec![0, 256, 256, 1280, 1536, 1792]);
    }
}
