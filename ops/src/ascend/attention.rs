//! Fused attention over the float KV cache on the NPU, the same contracts as `crate::prompt_attention` and
//! `crate::decode_attention`:
//!
//! - prefill through aclnnPromptFlashAttentionV3 (layout BSND, sparse mode 0): the causal and key-padding rules
//!   of every sequence (query `i` of sequence `b` sees keys `0 ..= q_start[b] + i`; rows `i >= q_lens[b]` see
//!   none) are one host-built mask `[B, S, T]` (u8, 1 = masked out, cann-facts trap 12), a [`PromptMask`]
//!   uploaded once per step and shared by the layers.
//!   Padding rows are fully masked and come out as zeros through the invalid-row fix (innerPrecise 2);
//! - decode through aclnnIncreFlashAttentionV4 over the whole cache with `kv_lens` as actualSeqLengths.
//!
//! GQA is handled by the operators (numKeyValueHeads). Everything the contract rejects is checked on the host
//! before any device work.

use candle_ascend::aclnn::attention::{
    AttentionLayout, AttentionParams, incre_flash_attention, prompt_flash_attention,
};
use candle_core::{Result, bail};

use super::{AscendDevice, NpuDType, NpuTensor};

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

/// The prefill mask of one step, `[B, S, T]` on the device (u8, 1 = masked out): key `j` is visible to query
/// row `i` of sequence `b` iff `i < q_lens[b]` and `j <= q_start[b] + i`. Built once per step and shared by every
/// layer's [`prompt_attention_masked`] (one upload per step instead of one per layer).
#[derive(Debug, Clone)]
pub struct PromptMask {
    mask: NpuTensor,
    q_rows: usize,
    capacity: usize,
    q_start: Vec<usize>,
    q_lens: Vec<usize>,
}

impl PromptMask {
    /// Builds and uploads the mask of `B = q_start.len()` sequences of `q_rows` query rows over a cache of
    /// `capacity` positions. Requires `q_lens[b] <= q_rows` and `q_start[b] + q_lens[b] <= capacity`.
    pub fn new(
        device: &AscendDevice,
        q_rows: usize,
        capacity: usize,
        q_start: &[usize],
        q_lens: &[usize],
    ) -> Result<Self> {
        const OP: &str = "prompt_attention";
        if q_start.len() != q_lens.len() || q_start.is_empty() {
            bail!("{OP}: q_start ({}) and q_lens ({}) need one entry per sequence", q_start.len(), q_lens.len());
        }
        for (b, (&start, &len)) in q_start.iter().zip(q_lens).enumerate() {
            if len > q_rows {
                bail!("{OP}: q_lens[{b}] = {len} exceeds the {q_rows} query rows of q");
            }
            if start.checked_add(len).is_none_or(|end| end > capacity) {
                bail!("{OP}: sequence {b} needs keys up to {start} + {len}, beyond the cache capacity {capacity}");
            }
        }
        let batch = q_start.len();
        let mut host = vec![1u8; batch * q_rows * capacity];
        for (b, (&start, &len)) in q_start.iter().zip(q_lens).enumerate() {
            for i in 0..len {
                host[(b * q_rows + i) * capacity..][..=start + i].fill(0);
            }
        }
        let mask = NpuTensor::from_slice(device, &host, &[batch, q_rows, capacity])?;
        Ok(Self { mask, q_rows, capacity, q_start: q_start.to_vec(), q_lens: q_lens.to_vec() })
    }

    /// Whether this mask describes the step `(q_rows, capacity, q_start, q_lens)`.
    pub fn matches(&self, q_rows: usize, capacity: usize, q_start: &[usize], q_lens: &[usize]) -> bool {
        self.q_rows == q_rows && self.capacity == capacity && self.q_start == q_start && self.q_lens == q_lens
    }
}

/// Causal attention of a block of new queries over a fixed KV cache: q `[B, S, Nq, D]` (any strides), caches
/// `[B, T, Nkv, D]`; query `i` of sequence `b` sits at `q_start[b] + i` and sees keys `0 ..= q_start[b] + i`;
/// rows `i >= q_lens[b]` are exact zeros. Requires `q_lens[b] <= S`, `q_start[b] + q_lens[b] <= T`. Output
/// `[B, S, Nq, D]` contiguous in q's dtype. Builds the step's [`PromptMask`]; a caller running many layers over
/// one step builds it once and calls [`prompt_attention_masked`].
pub fn prompt_attention(
    q: &NpuTensor,
    k_cache: &NpuTensor,
    v_cache: &NpuTensor,
    q_start: &[usize],
    q_lens: &[usize],
    scale: f32,
) -> Result<NpuTensor> {
    let dims = check("prompt_attention", q, k_cache, v_cache, scale)?;
    if q_start.len() != dims.batch || q_lens.len() != dims.batch {
        bail!(
            "prompt_attention: q_start ({}) and q_lens ({}) need one entry per sequence (B = {})",
            q_start.len(),
            q_lens.len(),
            dims.batch
        );
    }
    let mask = PromptMask::new(q.device(), dims.q_rows, dims.capacity, q_start, q_lens)?;
    prompt_attention_masked(q, k_cache, v_cache, &mask, scale)
}

/// [`prompt_attention`] with the step's mask already on the device.
pub fn prompt_attention_masked(
    q: &NpuTensor,
    k_cache: &NpuTensor,
    v_cache: &NpuTensor,
    mask: &PromptMask,
    scale: f32,
) -> Result<NpuTensor> {
    const OP: &str = "prompt_attention";
    let dims = check(OP, q, k_cache, v_cache, scale)?;
    if mask.q_start.len() != dims.batch || mask.q_rows != dims.q_rows || mask.capacity != dims.capacity {
        bail!(
            "{OP}: the mask is for {} sequences of {} rows over {} positions, q/cache are {:?} / {:?}",
            mask.q_start.len(),
            mask.q_rows,
            mask.capacity,
            q.shape(),
            k_cache.shape()
        );
    }
    Ok(prompt_flash_attention(q, k_cache, v_cache, Some(&mask.mask), None, None, &params(&dims, scale))?)
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
