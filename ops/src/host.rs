//! Host-memory plumbing shared by every CPU kernel: typed views of candle CPU tensors,
//! the element trait kernels are generic over, and dtype dispatch.
//!
//! Kernels compute in f32 whatever the storage dtype (f32, f16, bf16): `Element` converts
//! on load and store, so one generic kernel body serves all three.

use candle_core::{CpuStorage, DType, Layout, Result, Storage, Tensor, bail};
use half::{bf16, f16};

/// A storage element a CPU kernel can read and write; arithmetic happens in f32.
pub trait Element: candle_core::WithDType + Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
}

impl Element for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl Element for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}

impl Element for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

/// Runs `$body` with the type alias `$T` bound to the Rust element type of `$dtype`
/// (f32, f16 or bf16); any other dtype is an error naming `$op`.
#[macro_export]
macro_rules! dispatch_float {
    ($dtype:expr, $op:expr, $T:ident => $body:expr) => {
        match $dtype {
            candle_core::DType::F32 => {
                type $T = f32;
                $body
            }
            candle_core::DType::F16 => {
                type $T = half::f16;
                $body
            }
            candle_core::DType::BF16 => {
                type $T = half::bf16;
                $body
            }
            other => Err(candle_core::Error::UnsupportedDTypeForOp(other, $op)),
        }
    };
}

/// Calls `f` with the CPU storage slice of `t` (from element 0 of the storage, not of the
/// view) and its layout. Fails for non-CPU tensors or a dtype other than `T`.
pub fn with_slice<T: Element, R>(
    t: &Tensor,
    op: &'static str,
    f: impl FnOnce(&[T], &Layout) -> Result<R>,
) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => f(cpu.as_slice::<T>()?, layout),
        _ => bail!("{op}: only CPU tensors are supported by the CPU kernel"),
    }
}

/// Mutable access to the typed vector inside a `CpuStorage` (for in-place ops).
pub fn storage_mut<'a, T: Element>(storage: &'a mut CpuStorage, op: &'static str) -> Result<&'a mut [T]> {
    let dtype = candle_core::backend::BackendStorage::dtype(storage);
    let out: Option<&'a mut [T]> = match storage {
        CpuStorage::F32(v) => (T::DTYPE == DType::F32).then(|| cast_slice_mut(v)),
        CpuStorage::F16(v) => (T::DTYPE == DType::F16).then(|| cast_slice_mut(v)),
        CpuStorage::BF16(v) => (T::DTYPE == DType::BF16).then(|| cast_slice_mut(v)),
        _ => None,
    };
    out.ok_or(candle_core::Error::UnsupportedDTypeForOp(dtype, op))
}

fn cast_slice_mut<A: 'static, B: 'static>(v: &mut [A]) -> &mut [B] {
    assert_eq!(std::any::TypeId::of::<A>(), std::any::TypeId::of::<B>());
    // SAFETY: A and B are the same type (checked just above), so the pointer, length and
    // lifetime of the slice are valid for B.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<B>(), v.len()) }
}

/// `x` as an f32 slice when `T` is f32 (lets generic row code skip a widening copy).
pub fn as_f32_slice<T: Element + 'static>(x: &[T]) -> Option<&[f32]> {
    // SAFETY: the TypeId check makes T and f32 the same type, so the pointer, length and
    // lifetime are valid for f32.
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>())
        .then(|| unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<f32>(), x.len()) })
}

/// Typed view of a CPU storage slice for reading inside an in-place op.
pub fn storage_ref<T: Element>(storage: &CpuStorage) -> Result<&[T]> {
    storage.as_slice::<T>()
}

/// Builds a CPU tensor of `shape` from a vector of elements.
pub fn tensor_from_vec<T: Element>(data: Vec<T>, shape: &[usize]) -> Result<Tensor> {
    Tensor::from_vec(data, shape, &candle_core::Device::Cpu)
}

/// Checks that the last dimension of `layout` is contiguous (stride 1) and returns
/// (start_offset, strides). Kernels accept any outer strides, e.g. a `narrow` of a fused
/// projection output.
pub fn rows_layout(layout: &Layout, op: &'static str, name: &str) -> Result<(usize, Vec<usize>)> {
    let stride = layout.stride();
    if let Some(&last) = stride.last()
        && last != 1
        && layout.dims().last().copied().unwrap_or(1) > 1
    {
        bail!("{op}: `{name}` must be contiguous in its last dimension (strides {stride:?})");
    }
    Ok((layout.start_offset(), stride.to_vec()))
}

/// Number of worker threads in the current rayon pool.
pub fn num_threads() -> usize {
    rayon::current_num_threads()
}

/// Runs a row-wise f32 kernel over `x` `[..., in_features]` (any float dtype, any outer
/// strides): `kernel(rows, m, out)` gets `m` contiguous f32 rows and fills `m * out_features`
/// outputs. Returns `[..., out_features]` in `x`'s dtype. The shared front and back of the
/// linear layers.
pub fn map_rows_f32(
    x: &Tensor,
    in_features: usize,
    out_features: usize,
    op: &'static str,
    kernel: impl FnOnce(&[f32], usize, &mut [f32]),
) -> Result<Tensor> {
    let dims = x.dims();
    let Some((&k, outer)) = dims.split_last() else {
        bail!("{op}: input must have at least one dimension");
    };
    if k != in_features {
        bail!("{op}: input has {k} features, weight expects {in_features}");
    }
    let m: usize = outer.iter().product();
    let mut out_shape = outer.to_vec();
    out_shape.push(out_features);
    let x32 = if x.dtype() == DType::F32 { x.contiguous()? } else { x.to_dtype(DType::F32)?.contiguous()? };
    let mut y = vec![0f32; m * out_features];
    with_slice::<f32, _>(&x32, op, |data, layout| {
        let start = layout.start_offset();
        kernel(&data[start..start + m * k], m, &mut y);
        Ok(())
    })?;
    let y = Tensor::from_vec(y, out_shape, &candle_core::Device::Cpu)?;
    if x.dtype() == DType::F32 { Ok(y) } else { y.to_dtype(x.dtype()) }
}
