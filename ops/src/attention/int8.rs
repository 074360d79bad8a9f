//! Attention over int8 KV caches (C8, DESIGN.md section 6): [`prompt_attention_int8`] and
//! [`decode_attention_int8`], plus their references.
//!
//! The caches hold raw int8 values with per-channel parameters, `x = (x_q + offset) * scale`
//! (see `kv_cache::KvQuantParams`). The kernels never dequantize a cache: the query is
//! pre-scaled by the key scales, scores are taken on the keys widened from int8 to f32 (the key
//! offsets add a constant per query row, which cancels in the softmax), P V accumulates the raw
//! int8 values in f32, and the value offset and scale are applied once per output row. The
//! drivers, tiling, threading and micro-kernels are those of the float caches (`cpu.rs`), with
//! `i8` as the cache element type: decode reads 1 byte per cached element instead of 2 (f16).

use candle_core::{DType, Result, Tensor, bail};

use super::amx::AmxBf16;
use super::kernels::Isa;
use super::{AttentionDims, attention_dims, check_decode_lengths, check_prompt_lengths, cpu};
use crate::kv_cache::Int8KvCache;

/// [`super::prompt_attention`] with the keys and values in int8 caches.
///
/// - `q`: `[B', S, Nq, D]`, f32, f16 or bf16, contiguous in its last dimension with any outer
///   strides; `B'` may be below the caches' batch `B` (the step uses the first `B'` sequences).
/// - `k`, `v`: int8 caches of the same dims `[B, T, Nkv, D]`, with their own parameters;
///   `Nq % Nkv == 0`. The keys of the new queries must already be written (`kv_write_int8`).
/// - `q_start`, `q_lens` (`B'` entries each), causality, padding rows (exact zeros) and the
///   scale as in [`super::prompt_attention`]; the attended keys and values are the dequantized
///   cache entries `(x_q + offset[c]) * scale[c]`.
/// - The math is f32 with f32 accumulation; the output is `[B', S, Nq, D]`, contiguous, in q's
///   dtype.
///
/// Bad shapes, lengths, dtypes or a non-finite `scale` return an error. CPU tensors only.
pub fn prompt_attention_int8(
    q: &Tensor,
    k: &Int8KvCache,
    v: &Int8KvCache,
    q_start: &[usize],
    q_lens: &[usize],
    scale: f32,
) -> Result<Tensor> {
    let kernel = PromptInt8Kernel::available(k.dims().3)[0];
    prompt_attention_int8_with(kernel, q, k, v, q_start, q_lens, scale)
}

/// A kernel family of [`prompt_attention_int8`]; the op picks the first of
/// [`PromptInt8Kernel::available`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptInt8Kernel {
    /// AMX-BF16 tiles (`tdpbf16ps`) with split high/low bf16 queries and probabilities (needs
    /// AMX-BF16, AVX-512 F/BW/VL, the OS's XTILEDATA permission and a head dim that is a multiple of
    /// 64).
    AmxBf16,
    /// The f32 micro-kernels of the float caches on this CPU's SIMD (AVX-512F, head dim a
    /// multiple of 16).
    Simd,
    /// Plain loops, any CPU.
    Portable,
}

impl PromptInt8Kernel {
    pub fn name(self) -> &'static str {
        match self {
            PromptInt8Kernel::AmxBf16 => "amx-bf16",
            PromptInt8Kernel::Simd => "simd",
            PromptInt8Kernel::Portable => "portable",
        }
    }

    /// Whether this kernel can run here for heads of `head_dim`.
    pub fn is_available(self, head_dim: usize) -> bool {
        self.resolve(head_dim).is_some()
    }

    /// What the drivers run for this kernel (micro-kernel ISA, AMX token), or `None` when it
    /// cannot run here for heads of `head_dim`.
    fn resolve(self, head_dim: usize) -> Option<(Isa, Option<AmxBf16>)> {
        match self {
            PromptInt8Kernel::AmxBf16 => AmxBf16::detect(head_dim).map(|amx| (Isa::detect(head_dim), Some(amx))),
            PromptInt8Kernel::Simd => {
                let isa = Isa::detect(head_dim);
                (!matches!(isa, Isa::Portable)).then_some((isa, None))
            }
            PromptInt8Kernel::Portable => Some((Isa::Portable, None)),
        }
    }

    /// Every kernel available here for heads of `head_dim`, fastest first (never empty).
    pub fn available(head_dim: usize) -> Vec<PromptInt8Kernel> {
        [PromptInt8Kernel::AmxBf16, PromptInt8Kernel::Simd, PromptInt8Kernel::Portable]
            .into_iter()
            .filter(|k| k.is_available(head_dim))
            .collect()
    }
}

/// [`prompt_attention_int8`] on a chosen kernel family (benchmarks and tests); an error if
/// `kernel` is not available here.
pub fn prompt_attention_int8_with(
    kernel: PromptInt8Kernel,
    q: &Tensor,
    k: &Int8KvCache,
    v: &Int8KvCache,
    q_start: &[usize],
    q_lens: &[usize],
    scale: f32,
) -> Result<Tensor> {
    const OP: &str = "prompt_attention_int8";
    let dims = validate(OP, q, k, v, scale)?;
    check_prompt_lengths(OP, &dims, q_start, q_lens)?;
    let d = dims.head_dim;
    let Some((isa, amx)) = kernel.resolve(d) else {
        bail!("{OP}: kernel {} is not available on this machine for head_dim {d}", kernel.name());
    };
    cpu::prompt_attention_int8(isa, amx, q, k, v, q_start, q_lens, scale, &dims)
}

/// [`super::decode_attention`] with the keys and values in int8 caches.
///
/// - `q`: `[B', 1, Nq, D]` (contiguous last dimension, any outer strides), `B' <= B`.
/// - `k`, `v`: int8 caches `[B, T, Nkv, D]`; sequence `b < B'` attends its first `kv_lens[b]`
///   dequantized keys and values, `1 <= kv_lens[b] <= T`.
/// - dtype, precision and output as in [`prompt_attention_int8`]; output `[B', 1, Nq, D]`.
///
/// Threading and the flash-decoding split are those of [`super::decode_attention`]; the
/// caches are read in place, one byte per element.
pub fn decode_attention_int8(
    q: &Tensor,
    k: &Int8KvCache,
    v: &Int8KvCache,
    kv_lens: &[usize],
    scale: f32,
) -> Result<Tensor> {
    const OP: &str = "decode_attention_int8";
    let dims = validate_decode(OP, q, k, v, scale)?;
    check_decode_lengths(OP, &dims, kv_lens)?;
    cpu::decode_attention_int8(Isa::detect(dims.head_dim), q, k, v, kv_lens, scale, &dims, None)
}

/// Reference for [`prompt_attention_int8`]: the first `B'` sequences of both caches
/// dequantized to f32 ([`Int8KvCache::dequantize`]), q converted to f32, then
/// [`super::prompt_attention_reference`]; the output is cast to q's dtype.
pub fn prompt_attention_int8_reference(
    q: &Tensor,
    k: &Int8KvCache,
    v: &Int8KvCache,
    q_start: &[usize],
    q_lens: &[usize],
    scale: f32,
) -> Result<Tensor> {
    const OP: &str = "prompt_attention_int8_reference";
    let dims = validate(OP, q, k, v, scale)?;
    check_prompt_lengths(OP, &dims, q_start, q_lens)?;
    let (k, v) = dequantized_prefix(k, v, dims.batch)?;
    super::prompt_attention_reference(&q.to_dtype(DType::F32)?, &k, &v, q_start, q_lens, scale)?.to_dtype(dims.dtype)
}

/// Reference for [`decode_attention_int8`], built like [`prompt_attention_int8_reference`].
pub fn decode_attention_int8_reference(
    q: &Tensor,
    k: &Int8KvCache,
    v: &Int8KvCache,
    kv_lens: &[usize],
    scale: f32,
) -> Result<Tensor> {
    const OP: &str = "decode_attention_int8_reference";
    let dims = validate_decode(OP, q, k, v, scale)?;
    check_decode_lengths(OP, &dims, kv_lens)?;
    let (k, v) = dequantized_prefix(k, v, dims.batch)?;
    super::decode_attention_reference(&q.to_dtype(DType::F32)?, &k, &v, kv_lens, scale)?.to_dtype(dims.dtype)
}

/// The first `batch` sequences of both caches as f32 tensors.
fn dequantized_prefix(k: &Int8KvCache, v: &Int8KvCache, batch: usize) -> Result<(Tensor, Tensor)> {
    Ok((k.dequantize()?.narrow(0, 0, batch)?, v.dequantize()?.narrow(0, 0, batch)?))
}

/// Shapes, dtype and scale (the length rules are checked by the callers).
pub(super) fn validate(
    op: &'static str,
    q: &Tensor,
    k: &Int8KvCache,
    v: &Int8KvCache,
    scale: f32,
) -> Result<AttentionDims> {
    if k.dims() != v.dims() {
        bail!("{op}: v cache dims {:?} differ from k cache dims {:?}", v.dims(), k.dims());
    }
    let (b, t, n, d) = k.dims();
    let dims = attention_dims(op, q, [b, t, n, d], true, scale)?;
    if !q.device().is_cpu() {
        bail!("{op}: only CPU tensors are supported, `q` is on {:?}", q.device().location());
    }
    Ok(dims)
}

pub(super) fn validate_decode(
    op: &'static str,
    q: &Tensor,
    k: &Int8KvCache,
    v: &Int8KvCache,
    scale: f32,
) -> Result<AttentionDims> {
    let dims = validate(op, q, k, v, scale)?;
    if dims.q_rows != 1 {
        bail!("{op}: q must hold one query token per sequence ([B, 1, Nq, D]), got shape {:?}", q.dims());
    }
    Ok(dims)
}
