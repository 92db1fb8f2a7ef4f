//! One GPU as kiln uses it: a CUDA context and the one stream that orders everything kiln
//! does on it (copies, launches, frees, graph capture), plus device buffers and tensors.
//! A [`CudaDevice`] is only made after [`probe_device`](crate::probe::probe_device) has
//! found a working driver and device, so cudarc is never touched without a driver.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use kiln_ir::{DType, Tensor};

use crate::error::CudaError;
use crate::ffi::{self, DeviceRegion};
use crate::probe::{probe_device, DeviceInfo};

/// A GPU: context, stream and what the probe found. Cheap to clone (clones share the
/// context and the stream).
#[derive(Clone, Debug)]
pub struct CudaDevice {
    context: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    info: DeviceInfo,
}

impl CudaDevice {
    /// Opens device `ordinal` (its primary context and a new stream), after probing it.
    pub fn new(ordinal: usize) -> Result<CudaDevice, CudaError> {
        let info = probe_device(ordinal)?;
        let context = CudaContext::new(ordinal).map_err(|error| {
            CudaError::driver(
                format!("creating a context on CUDA device {ordinal}"),
                error,
            )
        })?;
        ffi::use_single_stream_ordering(&context);
        let stream = context.new_stream().map_err(|error| {
            CudaError::driver(format!("creating a stream on CUDA device {ordinal}"), error)
        })?;
        Ok(CudaDevice {
            context,
            stream,
            info,
        })
    }

    /// What the probe found about this device.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// Waits until everything queued on this device's stream has run; reports a kernel
    /// fault from earlier asynchronous work here.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.stream.synchronize().map_err(|error| {
            CudaError::driver(
                format!("waiting for CUDA device {}", self.info.ordinal),
                error,
            )
        })
    }

    /// Free and total bytes of device memory, as the driver reports them now.
    pub fn memory_info(&self) -> Result<(u64, u64), CudaError> {
        let (free, total) = self.context.mem_get_info().map_err(|error| {
            CudaError::driver(
                format!("reading the memory of CUDA device {}", self.info.ordinal),
                error,
            )
        })?;
        Ok((free as u64, total as u64))
    }

    /// A zeroed buffer of `bytes` bytes.
    pub fn alloc(&self, bytes: usize) -> Result<DeviceBuffer, CudaError> {
        // The driver refuses zero-byte allocations; a 1-byte one stands in for them.
        let slice = self
            .stream
            .alloc_zeros::<u8>(bytes.max(1))
            .map_err(|error| {
                CudaError::driver(format!("allocating {bytes} bytes of device memory"), error)
            })?;
        let address = ffi::address_of(&slice, &self.stream);
        Ok(DeviceBuffer {
            slice,
            address,
            bytes,
        })
    }

    /// Copies `bytes` into the start of `buffer`.
    pub fn write(&self, buffer: &DeviceBuffer, bytes: &[u8]) -> Result<(), CudaError> {
        let region = self.region_of(buffer, 0, bytes.len(), "writing")?;
        ffi::copy_host_to_device(&self.stream, region, bytes).map_err(|error| {
            CudaError::driver(
                format!("copying {} bytes to the device", bytes.len()),
                error,
            )
        })
    }

    /// The whole contents of `buffer` (waits for earlier work on the stream).
    pub fn read(&self, buffer: &DeviceBuffer) -> Result<Vec<u8>, CudaError> {
        let region = self.region_of(buffer, 0, buffer.len(), "reading")?;
        self.read_region(region)
    }

    /// A tensor copied to the device.
    pub fn upload(&self, tensor: &Tensor) -> Result<DeviceTensor, CudaError> {
        let bytes = tensor.to_le_bytes();
        let buffer = self.alloc(bytes.len())?;
        self.write(&buffer, &bytes)?;
        Ok(DeviceTensor {
            buffer,
            dtype: tensor.dtype,
            shape: tensor.shape.clone(),
        })
    }

    /// A tensor of `dtype` and `shape`, all zeros, on the device.
    pub fn zeros(&self, dtype: DType, shape: &[usize]) -> Result<DeviceTensor, CudaError> {
        let bytes = shape.iter().product::<usize>() * dtype.size_bytes();
        Ok(DeviceTensor {
            buffer: self.alloc(bytes)?,
            dtype,
            shape: shape.to_vec(),
        })
    }

    /// A device tensor copied back to the host.
    pub fn download(&self, tensor: &DeviceTensor) -> Result<Tensor, CudaError> {
        let bytes = self.read(&tensor.buffer)?;
        Ok(host_tensor(tensor.dtype, &tensor.shape, &bytes))
    }

    pub(crate) fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub(crate) fn context(&self) -> &Arc<CudaContext> {
        &self.context
    }

    /// Whether `buffer` was allocated on this device's stream.
    pub(crate) fn owns(&self, buffer: &DeviceBuffer) -> bool {
        Arc::ptr_eq(buffer.slice.stream(), &self.stream)
    }

    /// Bytes `offset..offset + bytes` of `buffer`, checked.
    pub(crate) fn region_of<'a>(
        &self,
        buffer: &'a DeviceBuffer,
        offset: usize,
        bytes: usize,
        doing: &str,
    ) -> Result<DeviceRegion<'a>, CudaError> {
        buffer
            .region(offset, bytes)
            .ok_or_else(|| CudaError::OutOfBounds {
                detail: format!(
                    "{doing} {bytes} bytes at offset {offset} of a buffer of {} bytes",
                    buffer.len()
                ),
            })
    }

    /// The bytes of `region` (waits for earlier work on the stream).
    pub(crate) fn read_region(&self, region: DeviceRegion<'_>) -> Result<Vec<u8>, CudaError> {
        let mut bytes = vec![0u8; region.len()];
        ffi::copy_device_to_host(&self.stream, &mut bytes, region).map_err(|error| {
            CudaError::driver(
                format!("copying {} bytes from the device", bytes.len()),
                error,
            )
        })?;
        Ok(bytes)
    }
}

/// A tensor from the bytes of a device buffer laid out as `dtype`/`shape`.
pub(crate) fn host_tensor(dtype: DType, shape: &[usize], bytes: &[u8]) -> Tensor {
    match Tensor::from_le_bytes(dtype, shape, bytes) {
        Ok(tensor) => tensor,
        // Callers size `bytes` from the same dtype and shape, so the length always fits.
        Err(error) => unreachable!("device bytes do not fit {dtype} {shape:?}: {error}"),
    }
}

/// Device memory owned by kiln, freed (stream-ordered) on drop.
#[derive(Debug)]
pub struct DeviceBuffer {
    slice: CudaSlice<u8>,
    address: u64,
    bytes: usize,
}

impl DeviceBuffer {
    /// Bytes the buffer was asked for.
    pub fn len(&self) -> usize {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    /// The device address of the first byte.
    pub fn address(&self) -> u64 {
        self.address
    }

    /// Bytes `offset..offset + bytes`, or `None` when they are not all inside.
    pub(crate) fn region(&self, offset: usize, bytes: usize) -> Option<DeviceRegion<'_>> {
        if offset.checked_add(bytes)? > self.bytes {
            return None;
        }
        DeviceRegion::within(&self.slice, self.address, offset, bytes)
    }
}

/// A tensor in device memory: a buffer of exactly its dtype's size times its element
/// count, with that dtype and shape.
#[derive(Debug)]
pub struct DeviceTensor {
    buffer: DeviceBuffer,
    dtype: DType,
    shape: Vec<usize>,
}

impl DeviceTensor {
    pub fn buffer(&self) -> &DeviceBuffer {
        &self.buffer
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
}
