//! Fused attention over the float KV cache on the NPU, the same contracts as `crate::prompt_attention` and
//! `crate::decode_attention`:
//!
//! - prefill through aclnnPromptFlashAttentionV3 (layout BSND, sparse mode 0): the causal and key-padding rules
//!   of every sequence (query `i` of sequence `b` sees keys `0 ..= q_start[b] + i`; rows `i >= q_lens[b]` see
//!   none) are one host-built mask `[B, S, T]` (u8, 1 = masked out, cann-facts trap 12), uploaded per call.
//!   Padding rows are fully masked and come out as zeros through the invalid-row fix (innerPrecise 2);
//! - decode through aclnnIncreFlashAttentionV4 over the whole cache with `kv_lens` as actualSeqLengths.
//!
//! GQA is handled by the operators (numKeyValueHeads). Everything the contract rejects is checked on the host
//! before any device work.

use candle_ascend::aclnn::attention::{
    AttentionLayout, AttentionParams, incre_flash_attention, prompt_flash_attention,
};
use candle_core::{Result, bail};

use super::{NpuDType, NpuTensor};

/// Validated sizes shared by both ops.
struct Dims {
    batch: usize,
    q_rows: usize,
    heads: usize,
    kv_heads: usize,
    capacity: usize,
}

/// q `[B, S, Nq, D]`, caches `[B, T, Nkv, D]` of one float dtype, `Nq % Nkv == 0`, a finite scale.
fn check(op: &str, q: &NpuTensor, k: &NpuTensor, v: &NpuTensor, scale: f32) -> Result<Dims> {
    let dtype = q.dtype();
    if !matches!(dtype, NpuDType::F32 | NpuDType::F16 | NpuDType::BF16) {
        bail!("{op}: dtype {dtype:?} is not supported (f32, f16, bf16)");
    }
    if k.dtype() != dtype || v.dtype() != dtype {
        bail!("{op}: q, k_cache and v_cache must share one dtype, got {dtype:?}, {:?}, {:?}", k.dtype(), v.dtype());
    }
    let &[batch, q_rows, heads, head_dim] = q.shape() else {
        bail!("{op}: q must be [B, S, Nq, D], got {q:?}");
    };
    let &[k_batch, capacity, kv_heads, k_dim] = k.shape() else {
        bail!("{op}: k_cache must be [B, T, Nkv, D], got {k:?}");
    };
    if v.shape() != k.shape() {
        bail!("{op}: v_cache shape {:?} differs from k_cache shape {:?}", v.shape(), k.shape());
    }
    if k_batch != batch || k_dim != head_dim {
        bail!("{op}: k_cache {:?} does not match q {:?} (B, D)", k.shape(), q.shape());
    }
    if kv_heads == 0 || heads % kv_heads != 0 {
        bail!("{op}: the query head count {heads} must be a positive multiple of the kv head count {kv_heads}");
    }
    if !scale.is_finite() {
        bail!("{op}: scale must be finite, got {scale}");
    }
    Ok(Dims { batch, q_rows, heads, kv_heads, capacity })
}

fn params(dims: &Dims, scale: f32) -> AttentionParams {
    AttentionParams {
        num_heads: dims.heads,
        num_kv_heads: dims.kv_heads,
        scale: f64::from(scale),
        layout: AttentionLayout::Bsnd,
    }
}

/// The prefill mask `[B, S, T]`, 1 = masked out: key `j` is visible to query row `i` of sequence `b` iff
/// `i < q_lens[b]` and `j <= q_start[b] + i`.
fn prompt_mask(dims: &Dims, q_start: &[usize], q_lens: &[usize]) -> Vec<u8> {
    let (s, t) = (dims.q_rows, dims.capacity);
    let mut mask = vec![1u8; dims.batch * s * t];
    for (b, (&start, &len)) in q_start.iter().zip(q_lens).enumerate() {
        for i in 0..len {
            let row = &mut mask[(b * s + i) * t..][..t];
            row[..=start + i].fill(0);
        }
    }
    mask
}

/// Causal attention of a block of new queries over a fixed KV cache: q `[B, S, Nq, D]` (any strides), caches
/// `[B, T, Nkv, D]`; query `i` of sequence `b` sits at `q_start[b] + i` and sees keys `0 ..= q_start[b] + i`;
/// rows `i >= q_lens[b]` are exact zeros. Requires `q_lens[b] <= S`, `q_start[b] + q_lens[b] <= T`. Output
/// `[B, S, Nq, D]` contiguous in q's dtype.
pub fn prompt_attention(
    q: &NpuTensor,
    k_cache: &NpuTensor,
    v_cache: &NpuTensor,
    q_start: &[usize],
    q_lens: &[usize],
    scale: f32,
) -> Result<NpuTensor> {
    const OP: &str = "prompt_attention";
    let dims = check(OP, q, k_cache, v_cache, scale)?;
    if q_start.len() != dims.batch || q_lens.len() != dims.batch {
        bail!(
            "{OP}: q_start ({}) and q_lens ({}) need one entry per sequence (B = {})",
            q_start.len(),
            q_lens.len(),
            dims.batch
        );
    }
    for (b, (&start, &len)) in q_start.iter().zip(q_lens).enumerate() {
        if len > dims.q_rows {
            bail!("{OP}: q_lens[{b}] = {len} exceeds the {} query rows of q", dims.q_rows);
        }
        if start.checked_add(len).is_none_or(|end| end > dims.capacity) {
            bail!("{OP}: sequence {b} needs keys up to {start} + {len}, beyond the cache capacity {}", dims.capacity);
        }
    }
    let mask = prompt_mask(&dims, q_start, q_lens);
    let mask = NpuTensor::from_slice(q.device(), &mask, &[dims.batch, dims.q_rows, dims.capacity])?;
    Ok(prompt_flash_attention(q, k_cache, v_cache, Some(&mask), None, None, &params(&dims, scale))?)
}

/// One query token per sequence over the first `kv_lens[b]` keys of the fixed cache (`1 <= kv_lens[b] <= T`):
/// q `[B, 1, Nq, D]` (any strides), caches `[B, T, Nkv, D]`. Output `[B, 1, Nq, D]` contiguous in q's dtype.
pub fn decode_attention(
    q: &NpuTensor,
    k_cache: &NpuTensor,
    v_cache: &NpuTensor,
    kv_lens: &[usize],
    scale: f32,
) -> Result<NpuTensor> {
    const OP: &str = "decode_attention";
    let dims = check(OP, q, k_cache, v_cache, scale)?;
    if dims.q_rows != 1 {
        bail!("{OP}: q must hold one token per sequence, got S = {}", dims.q_rows);
    }
    if kv_lens.len() != dims.batch {
        bail!("{OP}: {} kv_lens for {} sequences", kv_lens.len(), dims.batch);
    }
    if let Some((b, &len)) = kv_lens.iter().enumerate().find(|&(_, &l)| l == 0 || l > dims.capacity) {
        bail!("{OP}: kv_lens[{b}] = {len} must be in 1..={}", dims.capacity);
    }
    let lens: Vec<i64> = kv_lens.iter().map(|&l| l as i64).collect();
    Ok(incre_flash_attention(q, k_cache, v_cache, &lens, None, None, &params(&dims, scale))?)
}
