//! The int8 KV cache (C8) on the NPU: [`Int8KvCache`] (int8 `[B, C, H, D]` in device memory with its per-channel
//! parameters), quantize-on-write [`kv_write_int8`], and attention over a pair of such caches,
//! [`decode_attention_int8`] and [`prompt_attention_int8`]. Same contracts as `crate::kv_cache::kv_write_int8` and
//! `crate::attention::{decode_attention_int8, prompt_attention_int8}`: channel `c = head * D + d`,
//! `x ~ (x_q + offset[c]) * scale[c]`.
//!
//! - Write: `new` is cast to f32 (aclnnCast, which also makes a strided view contiguous), quantized per channel
//!   by aclnnAscendQuantV3 over its `[B', S, H * D]` view with `scale = 1 / scale[c]` (computed in f32 on the host,
//!   as `KvQuantParams::quantize` does) and `offset = -offset[c]` (the zero point), then scattered into the cache
//!   at `positions[b]` by aclnnInplaceScatterUpdate. Quantizing in f32 makes the bytes equal to the CPU
//!   reference: AscendQuantV3 takes its parameters in x's dtype, and f16 parameters would round `1 / scale`.
//! - Decode: aclnnIncreFlashAttentionV4 on the int8 caches with antiquant scale/offset `(2, H, D)` (BSND: key
//!   parameters first, then value) in the query's dtype, built once per (value cache, dtype) and kept with the key
//!   cache ([`Int8KvCache::prepare_decode`] builds them at load, so no decode step uploads anything).
//! - Prefill: aclnnPromptFlashAttentionV3 has no antiquant, so the needed prefix `[B', L, H, D]` of each cache
//!   (`L = max(q_start[b] + q_lens[b])`) is dequantized on the device into q's dtype, `(Cast(x_q) + offset) *
//!   scale` (aclnnCast, aclnnAdd, aclnnMul; `x_q + offset` is an exact integer in f16/bf16/f32, so only the
//!   product rounds), and the float `prompt_attention` runs over it. Its cost is one pass over the prefix per
//!   prefill, small against the prefill's matmuls.
//!
//! Dtypes: f16, bf16 or f32 for `new` and `q`. The write runs in f32 whatever the dtype. The attention calls pass
//! q's dtype through; the simulator takes all three, while the CANN docs describe the int8-KV antiquant path of
//! IncreFlashAttentionV4 with f16/bf16 queries (f32 queries there are unverified without hardware).

use std::sync::Mutex;

use candle_ascend::aclnn::attention::{AttentionLayout, AttentionParams, incre_flash_attention};
use candle_ascend::aclnn::ops as acl;
use candle_ascend::aclnn::quant as aq;
use candle_core::{Result, bail};

use super::attention::CausalMask;
use super::quant::upload_float;
use super::{AscendDevice, NpuDType, NpuTensor};
use crate::KvQuantParams;

const FLOAT_DTYPES: [NpuDType; 3] = [NpuDType::F32, NpuDType::F16, NpuDType::BF16];

fn check_float(op: &str, t: &NpuTensor) -> Result<()> {
    match t.dtype() {
        NpuDType::F32 | NpuDType::F16 | NpuDType::BF16 => Ok(()),
        other => bail!("{op}: dtype {other:?} is not supported (f32, f16, bf16)"),
    }
}

/// The IFA antiquant parameters of one (key cache, value cache, dtype): scale and offset `(2, H, D)`.
struct Antiquant {
    value_storage: usize,
    dtype: NpuDType,
    scale: NpuTensor,
    offset: NpuTensor,
}

/// One fixed int8 cache `[B, C, H, D]` on the device (zero-filled, never reallocated) with its per-channel
/// parameters (`H * D` channels), kept on the device in the layouts the operators want.
pub struct Int8KvCache {
    /// `[B, C, H, D]` int8.
    data: NpuTensor,
    dims: (usize, usize, usize, usize),
    params: KvQuantParams,
    /// `1 / scale[c]` and `-offset[c]`, f32 `[H * D]`: AscendQuantV3's parameters for the write.
    write_scale: NpuTensor,
    write_offset: NpuTensor,
    /// `(dtype, scale [H, D], offset [H, D])` per float dtype: the prefill dequantization.
    dequant: Vec<(NpuDType, NpuTensor, NpuTensor)>,
    /// Built by `prepare_decode` or on the first decode with a given value cache and dtype (when this is the key cache).
    antiquant: Mutex<Vec<Antiquant>>,
}

impl std::fmt::Debug for Int8KvCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Int8KvCache").field("dims", &self.dims).field("data", &self.data).finish_non_exhaustive()
    }
}

impl Int8KvCache {
    /// A zero-filled cache of `batch` sequences of `capacity` tokens with `kv_heads` heads of `head_dim`. Errors
    /// under the rules of `crate::Int8KvCache::new` (channel count, finite positive scales, finite offsets).
    pub fn new(
        device: &AscendDevice,
        batch: usize,
        capacity: usize,
        kv_heads: usize,
        head_dim: usize,
        params: &KvQuantParams,
    ) -> Result<Self> {
        // The parameter and size rules are the CPU cache's: check them there (on a one-token cache).
        crate::kv_cache::Int8KvCache::new(1, 1, kv_heads, head_dim, params.clone())?;
        let Some(len) = batch.checked_mul(capacity).and_then(|n| n.checked_mul(kv_heads * head_dim)) else {
            bail!("ascend::Int8KvCache::new: a [{batch}, {capacity}, {kv_heads}, {head_dim}] cache overflows");
        };
        if len == 0 {
            bail!("ascend::Int8KvCache::new: an empty [{batch}, {capacity}, {kv_heads}, {head_dim}] cache");
        }
        let data = NpuTensor::zeros(device, NpuDType::I8, &[batch, capacity, kv_heads, head_dim])?;
        let channels = kv_heads * head_dim;
        let inverse: Vec<f32> = params.scale.iter().map(|s| 1.0 / s).collect();
        let zero_point: Vec<f32> = params.offset.iter().map(|o| -o).collect();
        let mut dequant = Vec::with_capacity(FLOAT_DTYPES.len());
        for dtype in FLOAT_DTYPES {
            let scale = upload_float(device, &params.scale, &[kv_heads, head_dim], dtype)?;
            let offset = upload_float(device, &params.offset, &[kv_heads, head_dim], dtype)?;
            dequant.push((dtype, scale, offset));
        }
        Ok(Self {
            data,
            dims: (batch, capacity, kv_heads, head_dim),
            params: params.clone(),
            write_scale: NpuTensor::from_slice(device, &inverse, &[channels])?,
            write_offset: NpuTensor::from_slice(device, &zero_point, &[channels])?,
            dequant,
            antiquant: Mutex::new(Vec::new()),
        })
    }

    /// `(B, C, H, D)`.
    pub fn dims(&self) -> (usize, usize, usize, usize) {
        self.dims
    }

    pub fn params(&self) -> &KvQuantParams {
        &self.params
    }

    /// The int8 storage `[B, C, H, D]` (e.g. to read it back in tests).
    pub fn data(&self) -> &NpuTensor {
        &self.data
    }

    /// Bytes of int8 storage (one per element; the parameters are not counted).
    pub fn bytes(&self) -> usize {
        self.data.elem_count()
    }

    /// Device address of the storage: the same for the life of the cache.
    pub fn storage_id(&self) -> usize {
        self.data.buffer().as_ptr() as usize
    }

    /// The first `batch` sequences, first `len` positions, as a view.
    fn prefix(&self, batch: usize, len: usize) -> Result<NpuTensor> {
        Ok(self.data.narrow(0, 0, batch)?.narrow(1, 0, len)?)
    }

    /// `(x_q + offset) * scale` of the first `batch` sequences and `len` positions, `[batch, len, H, D]` in `dtype`.
    fn dequantize_prefix(&self, batch: usize, len: usize, dtype: NpuDType) -> Result<NpuTensor> {
        let Some((_, scale, offset)) = self.dequant.iter().find(|(d, _, _)| *d == dtype) else {
            bail!("Int8KvCache: no dequantization parameters in {dtype:?}");
        };
        let widened = acl::cast(&self.prefix(batch, len)?, dtype)?;
        let shifted = acl::add(&widened, offset, 1.0)?;
        Ok(aq::mul(&shifted, scale)?)
    }

    /// Uploads the decode attention's antiquant parameters of this key cache and `value` in `dtype` now (at load),
    /// so that no decode step copies them; [`decode_attention_int8`] would otherwise build them on first use.
    pub fn prepare_decode(&self, value: &Int8KvCache, dtype: NpuDType) -> Result<()> {
        self.antiquant_with(value, dtype).map(|_| ())
    }

    /// The IFA antiquant `(scale, offset)` `(2, H, D)` of this key cache and `value`, in `dtype` (built once).
    fn antiquant_with(&self, value: &Int8KvCache, dtype: NpuDType) -> Result<(NpuTensor, NpuTensor)> {
        let mut memo = self.antiquant.lock().map_err(|_| candle_core::Error::Msg("Int8KvCache: poisoned".into()))?;
        let value_storage = value.storage_id();
        if let Some(a) = memo.iter().find(|a| a.value_storage == value_storage && a.dtype == dtype) {
            return Ok((a.scale.clone(), a.offset.clone()));
        }
        let (_, _, heads, dim) = self.dims;
        let stacked = |k: &[f32], v: &[f32]| [k, v].concat();
        let device = self.data.device();
        let scale = upload_float(device, &stacked(&self.params.scale, &value.params.scale), &[2, heads, dim], dtype)?;
        let offset =
            upload_float(device, &stacked(&self.params.offset, &value.params.offset), &[2, heads, dim], dtype)?;
        memo.push(Antiquant { value_storage, dtype, scale: scale.clone(), offset: offset.clone() });
        Ok((scale, offset))
    }
}

/// Quantize-on-write: `cache[b, positions[b] + i] = quantize(new[b, i])` channel by channel
/// (`KvQuantParams::quantize`) for `b < B'`, `i < S`; nothing else changes, the storage does not move.
/// `new` `[B', S, H, D]` (f32, f16 or bf16, any strides), `B' <= B`; `positions` `B'` starts with
/// `positions[b] + S <= C`. The bytes equal `crate::kv_write_int8_reference`. Errors (nothing written) on bad
/// shapes, dtypes or positions.
pub fn kv_write_int8(cache: &Int8KvCache, new: &NpuTensor, positions: &[usize]) -> Result<()> {
    let starts: Vec<i64> = positions.iter().map(|&p| p as i64).collect();
    let starts = NpuTensor::from_slice(cache.data.device(), &starts, &[starts.len()])?;
    kv_write_int8_at(cache, new, positions, &starts)
}

/// [`kv_write_int8`] with the positions already on the device: `device_positions` (i32/i64 `[B']`) holds the
/// values of `positions` (checked on the host), so a step that uploaded them with its other indices makes no
/// further copy.
pub fn kv_write_int8_at(
    cache: &Int8KvCache,
    new: &NpuTensor,
    positions: &[usize],
    device_positions: &NpuTensor,
) -> Result<()> {
    const OP: &str = "ascend::kv_write_int8";
    check_float(OP, new)?;
    let (batch, capacity, heads, dim) = cache.dims;
    let &[new_batch, len, new_heads, new_dim] = new.shape() else {
        bail!("{OP}: new must be [B', S, H, D], got {new:?}");
    };
    if new_batch > batch || (new_heads, new_dim) != (heads, dim) {
        bail!("{OP}: new {:?} must be [B', S, {heads}, {dim}] with B' <= {batch}", new.shape());
    }
    if positions.len() != new_batch {
        bail!("{OP}: {} positions for a batch of {new_batch}", positions.len());
    }
    if let Some((b, &p)) = positions.iter().enumerate().find(|&(_, &p)| p.checked_add(len).is_none_or(|e| e > capacity))
    {
        bail!("{OP}: cache full for sequence {b}: writing {len} tokens at position {p}, capacity is {capacity}");
    }
    if new.same_buffer(&cache.data) {
        bail!("{OP}: new must not share memory with the cache");
    }
    if device_positions.shape() != [new_batch] {
        bail!("{OP}: device positions {:?} for a batch of {new_batch}", device_positions.shape());
    }
    if new_batch == 0 || len == 0 {
        return Ok(());
    }
    let wide = if new.dtype() == NpuDType::F32 { acl::contiguous(new)? } else { acl::cast(new, NpuDType::F32)? };
    let rows = wide.reshape(&[new_batch, len, heads * dim])?;
    let quantized = aq::ascend_quant(&rows, &cache.write_scale, Some(&cache.write_offset), 2)?;
    let quantized = quantized.reshape(&[new_batch, len, heads, dim])?;
    acl::scatter_update_(&cache.data.narrow(0, 0, new_batch)?, device_positions, &quantized, 1)?;
    Ok(())
}

/// Checks q against a pair of caches; returns `(B', S, Nq)`.
fn check_attention(op: &str, q: &NpuTensor, k: &Int8KvCache, v: &Int8KvCache, scale: f32) -> Result<[usize; 3]> {
    check_float(op, q)?;
    if k.dims != v.dims {
        bail!("{op}: v cache dims {:?} differ from k cache dims {:?}", v.dims, k.dims);
    }
    let (batch, _, heads, dim) = k.dims;
    let &[q_batch, q_len, q_heads, q_dim] = q.shape() else {
        bail!("{op}: q must be [B', S, Nq, D], got {q:?}");
    };
    if q_batch == 0 || q_batch > batch || q_dim != dim || q_heads == 0 || q_heads % heads != 0 {
        bail!("{op}: q {:?} must be [B' <= {batch}, S, Nq (a multiple of {heads}), {dim}]", q.shape());
    }
    if !scale.is_finite() {
        bail!("{op}: scale {scale} must be finite");
    }
    Ok([q_batch, q_len, q_heads])
}

/// Decode over int8 caches (aclnnIncreFlashAttentionV4 with antiquant): `q` `[B', 1, Nq, D]` (f32, f16 or bf16,
/// any strides), sequence `b` attends its first `kv_lens[b]` (1..=C) dequantized keys and values; GQA by head
/// index. Returns a new `[B', 1, Nq, D]` in q's dtype.
pub fn decode_attention_int8(
    q: &NpuTensor,
    k: &Int8KvCache,
    v: &Int8KvCache,
    kv_lens: &[usize],
    scale: f32,
) -> Result<NpuTensor> {
    const OP: &str = "ascend::decode_attention_int8";
    let [q_batch, q_len, q_heads] = check_attention(OP, q, k, v, scale)?;
    let (_, capacity, heads, _) = k.dims;
    if q_len != 1 {
        bail!("{OP}: q must hold one token per sequence ([B', 1, Nq, D]), got {:?}", q.shape());
    }
    if kv_lens.len() != q_batch || kv_lens.iter().any(|&l| l == 0 || l > capacity) {
        bail!("{OP}: kv_lens {kv_lens:?} must hold {q_batch} lengths in 1..={capacity}");
    }
    let q = acl::contiguous(q)?;
    let (anti_scale, anti_offset) = k.antiquant_with(v, q.dtype())?;
    let lens: Vec<i64> = kv_lens.iter().map(|&l| l as i64).collect();
    let params = AttentionParams {
        num_heads: q_heads,
        num_kv_heads: heads,
        scale: f64::from(scale),
        layout: AttentionLayout::Bsnd,
    };
    let (keys, values) = (k.prefix(q_batch, capacity)?, v.prefix(q_batch, capacity)?);
    Ok(incre_flash_attention(&q, &keys, &values, &lens, None, Some((&anti_scale, Some(&anti_offset))), &params)?)
}

/// Prefill over int8 caches, the semantics of `crate::prompt_attention_int8`: `q` `[B', S, Nq, D]` (f32, f16 or
/// bf16, any strides), query `i` of sequence `b` at position `q_start[b] + i` attends keys `0 ..= q_start[b] + i`;
/// rows `i >= q_lens[b]` are zeros. The needed cache prefix is dequantized into q's dtype on the device (module
/// docs) and the float `super::attention::prompt_attention` runs over it with the device's compressed causal
/// `mask`. Returns `[B', S, Nq, D]` in q's dtype.
pub fn prompt_attention_int8(
    q: &NpuTensor,
    k: &Int8KvCache,
    v: &Int8KvCache,
    mask: &CausalMask,
    q_start: &[usize],
    q_lens: &[usize],
    scale: f32,
) -> Result<NpuTensor> {
    const OP: &str = "ascend::prompt_attention_int8";
    let [q_batch, q_len, _] = check_attention(OP, q, k, v, scale)?;
    let capacity = k.dims.1;
    if q_start.len() != q_batch || q_lens.len() != q_batch {
        bail!("{OP}: {} starts and {} lengths for a batch of {q_batch}", q_start.len(), q_lens.len());
    }
    let mut needed = 1;
    for (b, (&start, &len)) in q_start.iter().zip(q_lens).enumerate() {
        let end = start.checked_add(len).filter(|&e| len <= q_len && e <= capacity);
        let Some(end) = end else {
            bail!("{OP}: sequence {b}: {len} queries at {start} (S = {q_len}, capacity {capacity})");
        };
        needed = needed.max(end);
    }
    let keys = k.dequantize_prefix(q_batch, needed, q.dtype())?;
    let values = v.dequantize_prefix(q_batch, needed, q.dtype())?;
    super::attention::prompt_attention(q, &keys, &values, mask, q_start, q_lens, scale)
}
