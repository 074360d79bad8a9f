//! Fused attention over the float KV cache on the NPU, the same contracts as `crate::prompt_attention` and
//! `crate::decode_attention`:
//!
//! - prefill through aclnnPromptFlashAttentionV3 (layout BSND) in sparse mode 3 (rightDownCausal) with the
//!   compressed 2048x2048 causal mask ([`CausalMask`], uploaded once per device) and per-sequence lengths:
//!   `actualSeqLengths = q_lens`, `actualSeqLengthsKv = q_start + q_lens`, so query `i` of sequence `b` sees keys
//!   `0 ..= q_start[b] + i` with no per-step mask (cann-facts trap 12). Rows past `q_lens[b]` are zeros (the
//!   wrapper clears the output first in a ragged step);
//! - decode through aclnnIncreFlashAttentionV4 over the whole cache with `kv_lens` as actualSeqLengths.
//!
//! GQA is handled by the operators (numKeyValueHeads). Everything the contract rejects is checked on the host
//! before any device work.

pub use candle_ascend::aclnn::attention::CausalMask;
use candle_ascend::aclnn::attention::{
    AttentionLayout, AttentionParams, PromptMasking, incre_flash_attention, prompt_flash_attention,
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

/// Causal attention of a block of new queries over a fixed KV cache: q `[B, S, Nq, D]` (any strides), caches
/// `[B, T, Nkv, D]`; query `i` of sequence `b` sits at `q_start[b] + i` and sees keys `0 ..= q_start[b] + i`;
/// rows `i >= q_lens[b]` are exact zeros. Requires `q_lens[b] <= S`, `q_start[b] + q_lens[b] <= T`. Output
/// `[B, S, Nq, D]` contiguous in q's dtype. `mask` is the device's compressed causal mask, uploaded once
/// ([`CausalMask::new`]) and shared by every call: the step itself makes no host-to-device copy.
pub fn prompt_attention(
    q: &NpuTensor,
    k_cache: &NpuTensor,
    v_cache: &NpuTensor,
    mask: &CausalMask,
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
    let mut kv_lens = Vec::with_capacity(dims.batch);
    for (b, (&start, &len)) in q_start.iter().zip(q_lens).enumerate() {
        if len > dims.q_rows {
            bail!("{OP}: q_lens[{b}] = {len} exceeds the {} query rows of q", dims.q_rows);
        }
        match start.checked_add(len).filter(|&end| end <= dims.capacity) {
            Some(end) => kv_lens.push(end as i64),
            None => bail!(
                "{OP}: sequence {b} needs keys up to {start} + {len}, beyond the cache capacity {}",
                dims.capacity
            ),
        }
    }
    if mask.tensor().device().ordinal() != q.device().ordinal() {
        bail!("{OP}: the causal mask is on {:?}, q on {:?}", mask.tensor().device(), q.device());
    }
    let seq_lens: Vec<i64> = q_lens.iter().map(|&l| l as i64).collect();
    let masking = PromptMasking::RightDownCausal(mask);
    Ok(prompt_flash_attention(q, k_cache, v_cache, masking, Some(&seq_lens), Some(&kv_lens), &params(&dims, scale))?)
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
