//! Fused attention over a fixed KV cache: [`prompt_attention`] (prefill, causal, ragged batches)
//! and [`decode_attention`] (one new token per sequence).
//!
//! Both follow FlashAttention (Dao et al., 2022): scores are produced a small tile at a time and
//! folded into the output with an online softmax (running max and running sum in f32), so no
//! `S x T` score matrix is ever materialized. Grouped-query attention (Ainslie et al., 2023) is
//! handled by indexing: query head `h` reads kv head `h / (Nq / Nkv)`, and all query heads of one
//! kv group are processed together so each K/V tile is loaded once for the whole group. Decode
//! splits long key ranges into chunks whose partial (max, sum, accumulator) triples are merged at
//! the end (flash-decoding), so a single sequence still keeps every core busy.
//!
//! Layout is BSND throughout: `q` is `[B, S, Nq, D]`, the caches are `[B, T, Nkv, D]` with
//! `T` the cache capacity. The Ascend counterparts are aclnnPromptFlashAttentionV3 and
//! aclnnIncreFlashAttentionV4 (see DESIGN.md section 4).
//!
//! Files: `reference.rs` is the f32 oracle built from plain candle ops; `cpu.rs` holds the
//! drivers (tiling, threading, dtype handling); `kernels.rs` the micro-kernel trait, the ISA
//! selection and the portable kernels; `avx512.rs` the AVX-512 kernels (selected at run
//! time); `tests.rs` kernel-level tests of every ISA. `int8.rs` holds the variants over int8
//! KV caches ([`prompt_attention_int8`], [`decode_attention_int8`]), which run the same
//! drivers and micro-kernels on the raw int8 values (tested in `int8_tests.rs`), except that
//! prefill over int8 caches runs on AMX-BF16 tiles where the OS grants them (`amx.rs`).

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(not(target_arch = "x86_64"))]
mod amx {
    //! AMX exists only on x86-64; elsewhere the prefill over int8 caches never selects it.
    use super::cpu::Inputs;

    /// Never constructed off x86-64.
    #[derive(Debug, Clone, Copy)]
    pub(crate) enum AmxBf16 {}

    impl AmxBf16 {
        pub(crate) fn detect(_: usize) -> Option<Self> {
            None
        }
    }

    pub(super) fn prompt_run<T>(amx: AmxBf16, _: &Inputs<'_, T, i8>, _: &[usize], _: &[usize]) -> Vec<T> {
        match amx {}
    }
}
#[cfg(target_arch = "x86_64")]
mod avx512;
mod cpu;
mod int8;
#[cfg(test)]
mod int8_tests;
mod kernels;
mod reference;
#[cfg(test)]
mod tests;

pub use int8::{
    PromptInt8Kernel, decode_attention_int8, decode_attention_int8_reference, prompt_attention_int8,
    prompt_attention_int8_reference, prompt_attention_int8_with,
};
pub use reference::{decode_attention_reference, prompt_attention_reference};

use candle_core::{DType, Result, Tensor, bail};

/// Causal attention of a block of new queries over the keys already in a fixed KV cache.
///
/// - `q`: `[B, S, Nq, D]`, contiguous in its last dimension; outer strides are arbitrary (a
///   `narrow` of a fused qkv projection output is accepted as is).
/// - `k_cache`, `v_cache`: `[B, T, Nkv, D]`, same shape, contiguous in the last dimension
///   (normally fully contiguous); `T` is the cache capacity. The keys of the new queries must
///   already be written (see `kv_write`).
/// - `Nq % Nkv == 0`; query head `h` attends with kv head `h / (Nq / Nkv)` (GQA, no repeated K/V).
/// - Query `i` of sequence `b` sits at position `q_start[b] + i` and attends keys
///   `0 ..= q_start[b] + i`: `out[b, i, h] = softmax_j(scale * q[b,i,h] . k[b,j,g]) v[b,j,g]`.
/// - Rows `i >= q_lens[b]` are padding and come out as exact zeros. Requires `q_lens[b] <= S` and
///   `q_start[b] + q_lens[b] <= T`.
/// - q, k and v share one dtype (f32, f16 or bf16); the math is f32 with f32 accumulation; the
///   output is `[B, S, Nq, D]`, contiguous, in q's dtype.
///
/// Bad shapes, lengths, dtypes or a non-finite `scale` return an error. CPU tensors only.
pub fn prompt_attention(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    q_start: &[usize],
    q_lens: &[usize],
    scale: f32,
) -> Result<Tensor> {
    let dims = validate_prompt("prompt_attention", q, k_cache, v_cache, q_start, q_lens, scale)?;
    cpu::prompt_attention(kernels::Isa::detect(dims.head_dim), q, k_cache, v_cache, q_start, q_lens, scale, &dims)
}

/// Attention of one new query token per sequence over the first `kv_lens[b]` entries of a fixed
/// KV cache (the decode step).
///
/// - `q`: `[B, 1, Nq, D]`, contiguous in its last dimension, outer strides arbitrary.
/// - `k_cache`, `v_cache`: `[B, T, Nkv, D]` as in [`prompt_attention`]; `Nq % Nkv == 0` (GQA).
/// - Sequence `b` attends keys `0 .. kv_lens[b]`, with `1 <= kv_lens[b] <= T` (the new token's
///   own key is the last one): `out[b, 0, h] = softmax_j(scale * q[b,0,h] . k[b,j,g]) v[b,j,g]`.
/// - dtype, precision and output as in [`prompt_attention`]; output `[B, 1, Nq, D]`.
///
/// The caches are read in place, in their storage dtype. Work is split into (sequence,
/// kv head, key chunk) tasks, about 4 per rayon thread, so even B = 1 keeps every core busy;
/// the chunks' partial (max, sum, accumulator) triples are merged exactly (the result does
/// not depend on the split beyond f32 rounding). Calls too small to pay for a thread handoff
/// (under ~512K multiply-adds, e.g. B = 1 with 9 heads of 64 over fewer than ~900 keys) run
/// on the calling thread. Nothing is allocated in proportion to `T` or `kv_lens`: per-task
/// scratch of a key tile of scores plus one partial per task.
pub fn decode_attention(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    kv_lens: &[usize],
    scale: f32,
) -> Result<Tensor> {
    let dims = validate_decode("decode_attention", q, k_cache, v_cache, kv_lens, scale)?;
    cpu::decode_attention(kernels::Isa::detect(dims.head_dim), q, k_cache, v_cache, kv_lens, scale, &dims, None)
}

/// Validated sizes shared by both ops.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AttentionDims {
    pub batch: usize,
    /// Query rows per sequence (`S`; 1 for decode).
    pub q_rows: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// KV cache capacity `T`.
    pub capacity: usize,
    pub dtype: DType,
}

impl AttentionDims {
    /// Query heads per kv head.
    pub fn group(&self) -> usize {
        self.heads / self.kv_heads
    }
}

fn validate_common(op: &'static str, q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> Result<AttentionDims> {
    let dtype = q.dtype();
    if k.dtype() != dtype || v.dtype() != dtype {
        bail!("{op}: q, k_cache and v_cache must share one dtype, got {dtype:?}, {:?}, {:?}", k.dtype(), v.dtype());
    }
    let &[k_batch, capacity, kv_heads, k_dim] = k.dims() else {
        bail!("{op}: k_cache must be [B, T, Nkv, D], got shape {:?}", k.dims());
    };
    if v.dims() != k.dims() {
        bail!("{op}: v_cache shape {:?} differs from k_cache shape {:?}", v.dims(), k.dims());
    }
    attention_dims(op, q, [k_batch, capacity, kv_heads, k_dim], false, scale)
}

/// Checks q (dtype, shape) against cache dims `[B, T, Nkv, D]` and the scale. With
/// `batch_prefix` q may cover only the first `B' <= B` sequences of the caches.
pub(crate) fn attention_dims(
    op: &'static str,
    q: &Tensor,
    kv: [usize; 4],
    batch_prefix: bool,
    scale: f32,
) -> Result<AttentionDims> {
    let dtype = q.dtype();
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
        return Err(candle_core::Error::UnsupportedDTypeForOp(dtype, op));
    }
    let &[batch, q_rows, heads, head_dim] = q.dims() else {
        bail!("{op}: q must be [B, S, Nq, D], got shape {:?}", q.dims());
    };
    let [k_batch, capacity, kv_heads, k_dim] = kv;
    let batch_ok = if batch_prefix { batch <= k_batch } else { batch == k_batch };
    if !batch_ok || k_dim != head_dim {
        let rule = if batch_prefix { "B' <= B" } else { "B" };
        bail!("{op}: k_cache [B, T, Nkv, D] = {kv:?} does not match q [B', S, Nq, D] = {:?} ({rule}, D)", q.dims());
    }
    if kv_heads == 0 || heads % kv_heads != 0 {
        bail!("{op}: the query head count {heads} must be a positive multiple of the kv head count {kv_heads}");
    }
    if !scale.is_finite() {
        bail!("{op}: scale must be finite, got {scale}");
    }
    Ok(AttentionDims { batch, q_rows, heads, kv_heads, head_dim, capacity, dtype })
}

pub(crate) fn validate_prompt(
    op: &'static str,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    q_start: &[usize],
    q_lens: &[usize],
    scale: f32,
) -> Result<AttentionDims> {
    let dims = validate_common(op, q, k, v, scale)?;
    check_prompt_lengths(op, &dims, q_start, q_lens)?;
    Ok(dims)
}

/// The `q_start` / `q_lens` rules of [`prompt_attention`].
pub(crate) fn check_prompt_lengths(
    op: &'static str,
    dims: &AttentionDims,
    q_start: &[usize],
    q_lens: &[usize],
) -> Result<()> {
    if q_start.len() != dims.batch || q_lens.len() != dims.batch {
        bail!(
            "{op}: q_start ({}) and q_lens ({}) need one entry per sequence (B = {})",
            q_start.len(),
            q_lens.len(),
            dims.batch
        );
    }
    for (b, (&start, &len)) in q_start.iter().zip(q_lens).enumerate() {
        if len > dims.q_rows {
            bail!("{op}: q_lens[{b}] = {len} exceeds the {} query rows of q", dims.q_rows);
        }
        if start.checked_add(len).is_none_or(|end| end > dims.capacity) {
            bail!(
                "{op}: sequence {b} needs keys up to q_start + q_len = {start} + {len}, beyond the cache capacity {}",
                dims.capacity
            );
        }
    }
    Ok(())
}

pub(crate) fn validate_decode(
    op: &'static str,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    kv_lens: &[usize],
    scale: f32,
) -> Result<AttentionDims> {
    let dims = validate_common(op, q, k, v, scale)?;
    if dims.q_rows != 1 {
        bail!("{op}: q must hold one query token per sequence ([B, 1, Nq, D]), got shape {:?}", q.dims());
    }
    check_decode_lengths(op, &dims, kv_lens)?;
    Ok(dims)
}

/// The `kv_lens` rules of [`decode_attention`].
pub(crate) fn check_decode_lengths(op: &'static str, dims: &AttentionDims, kv_lens: &[usize]) -> Result<()> {
    if kv_lens.len() != dims.batch {
        bail!("{op}: kv_lens ({}) needs one entry per sequence (B = {})", kv_lens.len(), dims.batch);
    }
    for (b, &len) in kv_lens.iter().enumerate() {
        if len == 0 || len > dims.capacity {
            bail!("{op}: kv_lens[{b}] = {len} must be in 1..={} (the cache capacity)", dims.capacity);
        }
    }
    Ok(())
}
