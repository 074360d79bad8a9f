//! [`NpuTensor`]: a typed, strided view of a pool block in device memory, and its conversions from and to host
//! data and candle tensors. Shapes, strides and the offset are in elements, outermost first (the aclTensor
//! convention, cann-facts trap 1); the block start is 32-byte aligned and sub-views are expressed by `offset`.

use std::sync::Arc;

use half::{bf16, f16};

use crate::error::{Error, Result};
use crate::loader::sym;
use crate::runtime::device::AscendDevice;
use crate::runtime::pool::DeviceBuffer;
use crate::sys;

/// Element types an [`NpuTensor`] can hold, with their `aclDataType` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    U8,
    I8,
    I32,
    I64,
    U64,
    F16,
    BF16,
    F32,
}

impl DType {
    /// The `aclDataType` enumerator (cann-facts 2.3).
    pub fn acl(self) -> sys::aclDataType {
        match self {
            DType::U8 => sys::aclDataType_ACL_UINT8,
            DType::I8 => sys::aclDataType_ACL_INT8,
            DType::I32 => sys::aclDataType_ACL_INT32,
            DType::I64 => sys::aclDataType_ACL_INT64,
            DType::U64 => sys::aclDataType_ACL_UINT64,
            DType::F16 => sys::aclDataType_ACL_FLOAT16,
            DType::BF16 => sys::aclDataType_ACL_BF16,
            DType::F32 => sys::aclDataType_ACL_FLOAT,
        }
    }

    /// Bytes per element.
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::U8 | DType::I8 => 1,
            DType::F16 | DType::BF16 => 2,
            DType::I32 | DType::F32 => 4,
            DType::I64 | DType::U64 => 8,
        }
    }

    /// The candle dtype with the same representation, if candle has one (it has no i8 and no u64).
    pub fn to_candle(self) -> Option<candle_core::DType> {
        match self {
            DType::U8 => Some(candle_core::DType::U8),
            DType::I32 => Some(candle_core::DType::I32),
            DType::I64 => Some(candle_core::DType::I64),
            DType::F16 => Some(candle_core::DType::F16),
            DType::BF16 => Some(candle_core::DType::BF16),
            DType::F32 => Some(candle_core::DType::F32),
            DType::I8 | DType::U64 => None,
        }
    }
}

/// Host element types that map to a [`DType`].
pub trait NpuElement: Copy + Default + Send + Sync + 'static {
    const DTYPE: DType;
}

macro_rules! npu_element {
    ($($t:ty => $d:ident),*) => { $( impl NpuElement for $t { const DTYPE: DType = DType::$d; } )* };
}
npu_element!(u8 => U8, i8 => I8, i32 => I32, i64 => I64, u64 => U64, f16 => F16, bf16 => BF16, f32 => F32);

/// A strided view of device memory. Cloning shares the buffer (views are cheap).
#[derive(Clone)]
pub struct NpuTensor {
    buffer: Arc<DeviceBuffer>,
    device: AscendDevice,
    dtype: DType,
    shape: Vec<usize>,
    strides: Vec<usize>,
    offset: usize,
}

impl std::fmt::Debug for NpuTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NpuTensor({:?}, {:?}, strides {:?}, offset {})", self.dtype, self.shape, self.strides, self.offset)
    }
}

/// Row-major strides (elements) of a shape.
pub fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    strides
}

fn elem_count(shape: &[usize]) -> usize {
    shape.iter().product()
}

impl NpuTensor {
    /// Allocates an uninitialised contiguous tensor.
    pub fn uninit(device: &AscendDevice, dtype: DType, shape: &[usize]) -> Result<NpuTensor> {
        let bytes = elem_count(shape)
            .checked_mul(dtype.size_in_bytes())
            .ok_or_else(|| Error::InvalidArgument(format!("tensor of shape {shape:?} overflows")))?;
        let buffer = Arc::new(device.alloc(bytes)?);
        let strides = contiguous_strides(shape);
        Ok(NpuTensor { buffer, device: device.clone(), dtype, shape: shape.to_vec(), strides, offset: 0 })
    }

    /// Allocates a contiguous tensor filled with zeros on the device (aclrtMemsetAsync, ordered on the device's
    /// stream; no host-to-device copy). Every dtype's zero is the all-zero bit pattern.
    pub fn zeros(device: &AscendDevice, dtype: DType, shape: &[usize]) -> Result<NpuTensor> {
        let tensor = Self::uninit(device, dtype, shape)?;
        let bytes = elem_count(shape) * dtype.size_in_bytes();
        if bytes > 0 {
            device.bind()?;
            let api = device.api();
            let f = sym!(api.runtime, aclrtMemsetAsync)?;
            // SAFETY: the block holds at least `bytes` bytes (allocated above for this shape); the memset is queued on
            // the device's stream after earlier work that might still use a reused block.
            let code =
                unsafe { f(tensor.buffer.as_ptr(), tensor.buffer.block_size(), 0, bytes, device.stream().raw()) };
            api.check("aclrtMemsetAsync", code)?;
        }
        Ok(tensor)
    }

    /// Copies host data (row-major, `shape`) to a new device tensor, ordered on the device's stream.
    pub fn from_slice<T: NpuElement>(device: &AscendDevice, data: &[T], shape: &[usize]) -> Result<NpuTensor> {
        if data.len() != elem_count(shape) {
            return Err(Error::ShapeMismatch {
                op: "NpuTensor::from_slice",
                expected: format!("{} elements for shape {shape:?}", elem_count(shape)),
                got: format!("{} elements", data.len()),
            });
        }
        let tensor = Self::uninit(device, T::DTYPE, shape)?;
        let bytes = std::mem::size_of_val(data);
        if bytes > 0 {
            device.bind()?;
            let api = device.api();
            let f = sym!(api.runtime, aclrtMemcpyAsync)?;
            // SAFETY: the destination block holds at least `bytes` bytes (allocated above for this shape); the source
            // is a live slice of `bytes` bytes. The source is pageable host memory, for which aclrtMemcpyAsync
            // returns only after the copy is done (cann-facts 2.2), so `data` may be dropped after the call. The copy
            // is ordered after earlier work on the stream that might still use a reused block.
            let code = unsafe {
                f(
                    tensor.buffer.as_ptr(),
                    tensor.buffer.block_size(),
                    data.as_ptr().cast(),
                    bytes,
                    sys::aclrtMemcpyKind_ACL_MEMCPY_HOST_TO_DEVICE,
                    device.stream().raw(),
                )
            };
            api.check("aclrtMemcpyAsync", code)?;
        }
        Ok(tensor)
    }

    /// Copies a candle tensor (any layout, on any device) to the NPU. candle `u32` (token ids) becomes `i32`,
    /// the index type of aclnn, after a range check; `i16`, `f64` and the 8/6/4-bit floats are not supported.
    pub fn from_candle(device: &AscendDevice, tensor: &candle_core::Tensor) -> Result<NpuTensor> {
        use candle_core::DType as C;
        let shape = tensor.dims().to_vec();
        let flat = tensor.flatten_all()?;
        match tensor.dtype() {
            C::U8 => Self::from_slice(device, &flat.to_vec1::<u8>()?, &shape),
            C::I32 => Self::from_slice(device, &flat.to_vec1::<i32>()?, &shape),
            C::I64 => Self::from_slice(device, &flat.to_vec1::<i64>()?, &shape),
            C::F16 => Self::from_slice(device, &flat.to_vec1::<f16>()?, &shape),
            C::BF16 => Self::from_slice(device, &flat.to_vec1::<bf16>()?, &shape),
            C::F32 => Self::from_slice(device, &flat.to_vec1::<f32>()?, &shape),
            C::U32 => {
                let values = flat.to_vec1::<u32>()?;
                let converted = values
                    .iter()
                    .map(|&v| i32::try_from(v))
                    .collect::<std::result::Result<Vec<i32>, _>>()
                    .map_err(|_| Error::InvalidArgument("u32 tensor value exceeds i32::MAX".to_string()))?;
                Self::from_slice(device, &converted, &shape)
            }
            other => Err(Error::UnsupportedDtype { op: "NpuTensor::from_candle", dtype: format!("{other:?}") }),
        }
    }

    /// Copies the tensor to a new CPU candle tensor (synchronises the stream first).
    pub fn to_candle(&self) -> Result<candle_core::Tensor> {
        let cpu = candle_core::Device::Cpu;
        let shape = self.shape.clone();
        let t = match self.dtype {
            DType::U8 => candle_core::Tensor::from_vec(self.to_vec::<u8>()?, shape, &cpu)?,
            DType::I32 => candle_core::Tensor::from_vec(self.to_vec::<i32>()?, shape, &cpu)?,
            DType::I64 => candle_core::Tensor::from_vec(self.to_vec::<i64>()?, shape, &cpu)?,
            DType::F16 => candle_core::Tensor::from_vec(self.to_vec::<f16>()?, shape, &cpu)?,
            DType::BF16 => candle_core::Tensor::from_vec(self.to_vec::<bf16>()?, shape, &cpu)?,
            DType::F32 => candle_core::Tensor::from_vec(self.to_vec::<f32>()?, shape, &cpu)?,
            DType::I8 | DType::U64 => {
                return Err(Error::UnsupportedDtype { op: "NpuTensor::to_candle", dtype: format!("{:?}", self.dtype) });
            }
        };
        Ok(t)
    }

    /// Copies the elements to the host in row-major order of the view. Synchronises the device's stream first
    /// (aclrtMemcpy does not wait for queued work, cann-facts trap 5).
    pub fn to_vec<T: NpuElement>(&self) -> Result<Vec<T>> {
        if T::DTYPE != self.dtype {
            return Err(Error::UnsupportedDtype {
                op: "NpuTensor::to_vec",
                dtype: format!("{:?} requested from a {:?} tensor", T::DTYPE, self.dtype),
            });
        }
        let count = self.elem_count();
        if count == 0 {
            return Ok(Vec::new());
        }
        // The elements of the view lie in [offset, offset + span) of the block.
        let span = 1 + self.shape.iter().zip(&self.strides).map(|(&d, &s)| (d - 1) * s).sum::<usize>();
        let mut storage = vec![T::default(); span];
        let bytes = span * std::mem::size_of::<T>();
        let byte_offset = self.offset * std::mem::size_of::<T>();
        self.device.synchronize()?;
        let api = self.device.api();
        let f = sym!(api.runtime, aclrtMemcpy)?;
        // SAFETY: the destination is a live Vec of `bytes` bytes; the source range [byte_offset, byte_offset+bytes)
        // lies inside the block (checked when the view was made); the stream was synchronised above, so no queued
        // work still writes it.
        let code = unsafe {
            f(
                storage.as_mut_ptr().cast(),
                bytes,
                self.buffer.as_ptr().cast::<u8>().add(byte_offset).cast(),
                bytes,
                sys::aclrtMemcpyKind_ACL_MEMCPY_DEVICE_TO_HOST,
            )
        };
        api.check("aclrtMemcpy", code)?;
        if self.is_contiguous() {
            storage.truncate(count);
            return Ok(storage);
        }
        let mut out = Vec::with_capacity(count);
        let mut index = vec![0usize; self.shape.len()];
        for _ in 0..count {
            let at: usize = index.iter().zip(&self.strides).map(|(i, s)| i * s).sum();
            out.push(storage[at]);
            for d in (0..index.len()).rev() {
                index[d] += 1;
                if index[d] < self.shape[d] {
                    break;
                }
                index[d] = 0;
            }
        }
        Ok(out)
    }

    /// A view of `len` entries of dimension `dim` starting at `start` (no copy; expressed by the offset).
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<NpuTensor> {
        let size = *self.shape.get(dim).ok_or_else(|| Error::InvalidArgument(format!("narrow: no dim {dim}")))?;
        if start.checked_add(len).is_none_or(|end| end > size) {
            return Err(Error::InvalidArgument(format!("narrow: {start}+{len} exceeds {size} on dim {dim}")));
        }
        let mut view = self.clone();
        view.shape[dim] = len;
        view.offset += start * self.strides[dim];
        Ok(view)
    }

    /// A view with dimensions `a` and `b` swapped (no copy).
    pub fn transpose(&self, a: usize, b: usize) -> Result<NpuTensor> {
        if a >= self.rank() || b >= self.rank() {
            return Err(Error::InvalidArgument(format!("transpose({a}, {b}) of a rank-{} tensor", self.rank())));
        }
        let mut view = self.clone();
        view.shape.swap(a, b);
        view.strides.swap(a, b);
        Ok(view)
    }

    /// The same elements with another shape; the tensor must be contiguous.
    pub fn reshape(&self, shape: &[usize]) -> Result<NpuTensor> {
        if !self.is_contiguous() || elem_count(shape) != self.elem_count() {
            return Err(Error::ShapeMismatch {
                op: "NpuTensor::reshape",
                expected: format!("a contiguous tensor of {} elements", elem_count(shape)),
                got: format!("{self:?}"),
            });
        }
        let mut view = self.clone();
        view.shape = shape.to_vec();
        view.strides = contiguous_strides(shape);
        Ok(view)
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    /// Strides in elements, outermost first.
    pub fn strides(&self) -> &[usize] {
        &self.strides
    }
    /// Offset of the first element from the block start, in elements.
    pub fn offset(&self) -> usize {
        self.offset
    }
    pub fn rank(&self) -> usize {
        self.shape.len()
    }
    pub fn elem_count(&self) -> usize {
        elem_count(&self.shape)
    }
    pub fn device(&self) -> &AscendDevice {
        &self.device
    }
    /// The block this view lies in.
    pub fn buffer(&self) -> &DeviceBuffer {
        &self.buffer
    }
    /// Number of elements of the block (the 1-D storage shape given to aclCreateTensor).
    pub fn storage_elems(&self) -> usize {
        self.buffer.len() / self.dtype.size_in_bytes()
    }

    /// Row-major contiguous (the offset may be non-zero).
    pub fn is_contiguous(&self) -> bool {
        let expected = contiguous_strides(&self.shape);
        self.shape.iter().zip(self.strides.iter().zip(&expected)).all(|(&d, (s, e))| d <= 1 || s == e)
    }

    /// Whether two tensors share the same block (used to reject aliasing outputs).
    pub fn same_buffer(&self, other: &NpuTensor) -> bool {
        Arc::ptr_eq(&self.buffer, &other.buffer)
    }

    /// Raw parts for crate-internal callers that need the device address.
    pub(crate) fn data_ptr(&self) -> *mut std::ffi::c_void {
        self.buffer.as_ptr()
    }
}
