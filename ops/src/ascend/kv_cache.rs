//! `kv_write` on the NPU: the float KV cache written in place at per-sequence positions through
//! aclnnInplaceScatterUpdate along the sequence axis (axis 1 of `[B, C, H, D]`), the same contract as
//! `crate::kv_cache::kv_write`. Positions are checked on the host first, so nothing is written on bad input.

use candle_ascend::aclnn::ops as acl;
use candle_core::{Result, bail};

use super::{NpuDType, NpuTensor};

/// cache [B,C,H,D] written in place (it may be a batch-prefix view of a larger cache: cache.narrow(0,0,b)), new
/// [B,S,H,D] (maybe strided): cache[b, positions[b]+i] = new[b,i]. f32, f16 or bf16, one dtype; every
/// `positions[b] + S <= C`; `new` must not share memory with `cache`.
pub fn kv_write(cache: &NpuTensor, new: &NpuTensor, positions: &[usize]) -> Result<()> {
    let indices: Vec<i64> = positions.iter().map(|&p| p as i64).collect();
    let indices = NpuTensor::from_slice(cache.device(), &indices, &[indices.len()])?;
    kv_write_at(cache, new, positions, &indices)
}

/// [`kv_write`] with the positions already on the device: `device_positions` (i32/i64 `[B]`) holds the values of
/// `positions` (which are checked on the host), so a step that uploaded them with its other indices makes no
/// further copy.
pub fn kv_write_at(
    cache: &NpuTensor,
    new: &NpuTensor,
    positions: &[usize],
    device_positions: &NpuTensor,
) -> Result<()> {
    const OP: &str = "kv_write";
    if !matches!(cache.dtype(), NpuDType::F32 | NpuDType::F16 | NpuDType::BF16) || new.dtype() != cache.dtype() {
        bail!("{OP}: cache and new must share one float dtype, got {:?} and {:?}", cache.dtype(), new.dtype());
    }
    let &[batch, capacity, heads, dim] = cache.shape() else {
        bail!("{OP}: cache must be [B, C, H, D], got {cache:?}");
    };
    let &[new_batch, len, new_heads, new_dim] = new.shape() else {
        bail!("{OP}: new must be [B, S, H, D], got {new:?}");
    };
    if (new_batch, new_heads, new_dim) != (batch, heads, dim) {
        bail!("{OP}: new {:?} does not match cache {:?} (B, H, D)", new.shape(), cache.shape());
    }
    if positions.len() != batch {
        bail!("{OP}: {} positions for {batch} sequences", positions.len());
    }
    if let Some((b, &p)) = positions.iter().enumerate().find(|&(_, &p)| p.checked_add(len).is_none_or(|e| e > capacity))
    {
        bail!("{OP}: sequence {b} writes {len} tokens at {p}, past the cache capacity {capacity}");
    }
    if new.same_buffer(cache) {
        bail!("{OP}: new must not share memory with the cache");
    }
    if device_positions.shape() != [batch] {
        bail!("{OP}: device positions {:?} for {batch} sequences", device_positions.shape());
    }
    if len == 0 {
        return Ok(());
    }
    acl::scatter_update_(cache, device_positions, new, 1)?;
    Ok(())
}
