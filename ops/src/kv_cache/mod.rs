//! Writing new keys / values into a fixed, preallocated KV cache in place, at a separate
//! position per sequence (ragged batches). Maps to aclnnInplaceScatterUpdate.
//!
//! Float caches are candle tensors written by [`kv_write`]; the int8 cache (C8) is the plain
//! struct [`Int8KvCache`] written by [`kv_write_int8`] (quantize-on-write, `int8.rs`).

mod cpu;
mod int8;
mod reference;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, InplaceOp2, Layout, Result, Tensor, bail};

use crate::dispatch_float;
use crate::host::{storage_mut, storage_ref};

pub use int8::{Int8KvCache, KvQuantParams, kv_write_int8, kv_write_int8_reference};
pub use reference::kv_write_reference;

const KV_WRITE: &str = "kv_write";

/// Writes `new` into `cache` in place: `cache[b, positions[b] + i] = new[b, i]` for every
/// `i < S`; nothing else in `cache` changes.
///
/// - `cache`: `[B, Smax, Nkv, D]`, contiguous (the fixed cache, allocated once). It keeps its
///   storage: no allocation proportional to the cache happens, and every tensor sharing the
///   storage sees the update.
/// - `new`: `[B, S, Nkv, D]`, contiguous in the last dimension with any outer strides (e.g.
///   a `narrow` of the fused QKV projection output); must not share storage with `cache`.
/// - `positions`: `B` start positions, each with `positions[b] + S <= Smax`.
/// - dtype: f32, f16 or bf16, the same for both; copied exactly.
///
/// Errors (nothing is written) on a shape, dtype or device mismatch and on a write past the
/// end of the cache. CPU tensors only.
pub fn kv_write(cache: &Tensor, new: &Tensor, positions: &[usize]) -> Result<()> {
    check(cache, new, positions)?;
    if new.elem_count() == 0 {
        return Ok(());
    }
    cache.inplace_op2(new, &KvWrite { positions })
}

/// The in-place op: `cache` is the destination storage, `new` the source.
struct KvWrite<'a> {
    positions: &'a [usize],
}

impl InplaceOp2 for KvWrite<'_> {
    fn name(&self) -> &'static str {
        KV_WRITE
    }

    fn cpu_fwd(
        &self,
        cache: &mut CpuStorage,
        cache_layout: &Layout,
        new: &CpuStorage,
        new_layout: &Layout,
    ) -> Result<()> {
        if cache.dtype() != new.dtype() {
            bail!("{KV_WRITE}: `new` has dtype {:?} but `cache` has {:?}", new.dtype(), cache.dtype());
        }
        dispatch_float!(cache.dtype(), KV_WRITE, T => {
            let new = storage_ref::<T>(new)?;
            let cache = storage_mut::<T>(cache, KV_WRITE)?;
            cpu::kv_write::<T>(cache, cache_layout, new, new_layout, self.positions)
        })
    }
}

/// Validates the contract shared by the kernel and the reference.
pub(crate) fn check(cache: &Tensor, new: &Tensor, positions: &[usize]) -> Result<()> {
    let &[batch, capacity, kv_heads, head_dim] = cache.dims() else {
        bail!("{KV_WRITE}: `cache` must be [B, Smax, Nkv, D], got shape {:?}", cache.dims());
    };
    let &[new_batch, len, new_heads, new_dim] = new.dims() else {
        bail!("{KV_WRITE}: `new` must be [B, S, Nkv, D], got shape {:?}", new.dims());
    };
    if (new_batch, new_heads, new_dim) != (batch, kv_heads, head_dim) {
        bail!("{KV_WRITE}: `new` {:?} must match `cache` {:?} in B, Nkv and D", new.dims(), cache.dims());
    }
    if positions.len() != batch {
        bail!("{KV_WRITE}: {} positions given for a batch of {batch}", positions.len());
    }
    for (b, &p) in positions.iter().enumerate() {
        if p.checked_add(len).is_none_or(|end| end > capacity) {
            bail!(
                "{KV_WRITE}: cache full for sequence {b}: writing {len} tokens at position {p} needs {}, capacity is {capacity}",
                p.saturating_add(len)
            );
        }
    }
    if !matches!(cache.dtype(), DType::F32 | DType::F16 | DType::BF16) {
        return Err(candle_core::Error::UnsupportedDTypeForOp(cache.dtype(), KV_WRITE));
    }
    if new.dtype() != cache.dtype() {
        bail!("{KV_WRITE}: `new` has dtype {:?} but `cache` has {:?}", new.dtype(), cache.dtype());
    }
    if !cache.is_contiguous() {
        bail!("{KV_WRITE}: `cache` must be contiguous (strides {:?})", cache.stride());
    }
    for (name, t) in [("cache", cache), ("new", new)] {
        if !t.device().is_cpu() {
            bail!("{KV_WRITE}: only CPU tensors are supported, `{name}` is on {:?}", t.device().location());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Storage};

    fn storage_address(t: &Tensor) -> Result<usize> {
        let (storage, _) = t.storage_and_layout();
        match &*storage {
            Storage::Cpu(cpu) => Ok(cpu.as_slice::<half::f16>()?.as_ptr() as usize),
            _ => bail!("not a CPU tensor"),
        }
    }

    #[test]
    fn writes_in_place_into_the_same_allocation() -> Result<()> {
        let cache = Tensor::zeros((2, 16, 2, 8), DType::F16, &Device::Cpu)?;
        let alias = cache.clone();
        let before = storage_address(&cache)?;
        let qkv = Tensor::ones((2, 3, 6, 8), DType::F16, &Device::Cpu)?;
        kv_write(&cache, &qkv.narrow(2, 4, 2)?, &[0, 13])?;
        assert_eq!(storage_address(&cache)?, before);
        // The clone shares the storage, so it sees the write.
        let sums = alias.to_dtype(DType::F32)?.sum((2, 3))?.to_vec2::<f32>()?;
        assert_eq!(sums[0][..4], [16.0, 16.0, 16.0, 0.0]);
        assert_eq!(sums[1][12..], [0.0, 16.0, 16.0, 16.0]);
        Ok(())
    }

    #[test]
    fn rejects_bad_input_without_writing() -> Result<()> {
        let cache = Tensor::zeros((2, 8, 2, 4), DType::F32, &Device::Cpu)?;
        let new = Tensor::ones((2, 3, 2, 4), DType::F32, &Device::Cpu)?;
        let err = kv_write(&cache, &new, &[0, 6]).unwrap_err().to_string();
        assert!(err.contains("kv_write") && err.contains("cache full"), "{err}");
        assert!(kv_write(&cache, &new, &[0, usize::MAX]).is_err());
        assert!(kv_write(&cache, &new, &[0]).is_err());
        assert!(kv_write(&cache, &new.to_dtype(DType::BF16)?, &[0, 0]).is_err());
        assert!(kv_write(&cache, &new.narrow(2, 0, 1)?, &[0, 0]).is_err());
        assert!(kv_write(&cache.transpose(1, 2)?, &new.transpose(1, 2)?, &[0, 0]).is_err());
        assert!(kv_write(&cache, &cache.narrow(1, 0, 3)?, &[4, 4]).is_err(), "aliased source");
        assert_eq!(cache.sum_all()?.to_scalar::<f32>()?, 0.0);
        Ok(())
    }
}
