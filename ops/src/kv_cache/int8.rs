//! The int8 KV cache (C8, DESIGN.md section 6): per-channel asymmetric quantization
//! parameters ([`KvQuantParams`]), the fixed int8 cache itself ([`Int8KvCache`]) and the
//! quantize-on-write op [`kv_write_int8`] with its oracle [`kv_write_int8_reference`].
//!
//! A channel is one (kv head, dim) pair, `c = head * D + d`, so a cache of `Nkv` heads of `D`
//! has `Nkv * D` channels. A value is stored as `x_q` with `x ~ (x_q + offset[c]) * scale[c]`
//! (`offset = -zero_point`); the attention ops dequantize inside their kernels (see
//! `attention::int8`). candle has no i8 dtype, so the cache is a plain Rust struct over a
//! `Vec<i8>`, not a candle tensor.

use candle_core::{DType, Device, Result, Tensor, bail};
use rayon::prelude::*;

use crate::host::with_slice;
use crate::kernel::{Rows, units_per_task};
use crate::quant::{quantize_row_per_channel, quantize_value};

const KV_WRITE_INT8: &str = "kv_write_int8";

/// Per-channel asymmetric int8 parameters: `x ~ (x_q + offset[c]) * scale[c]`, with
/// `offset[c] = -zero_point[c]` (an integer in -127..=128 when built by [`Self::from_range`]).
#[derive(Debug, Clone, PartialEq)]
pub struct KvQuantParams {
    pub scale: Vec<f32>,
    pub offset: Vec<f32>,
}

impl KvQuantParams {
    /// Parameters from calibrated per-channel ranges `min[c] ..= max[c]`.
    ///
    /// The range is first widened to include 0 (`lo = min(min, 0)`, `hi = max(max, 0)`), so
    /// zero is always representable exactly. Then `scale = (hi - lo) / 255`, the zero point is
    /// `z = round(-128 - lo / scale)` clamped to -128..=127, and `offset = -z`: `lo` quantizes
    /// to -128 and `hi` to 126 or 127 (the zero point is rounded), each within half a step.
    /// A dead channel (`hi == lo == 0`, or a range so small that `1 / scale` overflows) gets
    /// `scale = 1, offset = 0`: its zeros stay exactly zero and quantize to 0, so they add
    /// nothing to the attention kernels' sums (which run on the raw int8 values).
    ///
    /// Errors when `min` and `max` differ in length or hold a non-finite value, or when
    /// `min[c] > max[c]`.
    pub fn from_range(min: &[f32], max: &[f32]) -> Result<Self> {
        if min.len() != max.len() {
            bail!("KvQuantParams::from_range: {} minima but {} maxima", min.len(), max.len());
        }
        let mut scale = Vec::with_capacity(min.len());
        let mut offset = Vec::with_capacity(min.len());
        for (c, (&lo, &hi)) in min.iter().zip(max).enumerate() {
            if !lo.is_finite() || !hi.is_finite() {
                bail!("KvQuantParams::from_range: channel {c} has a non-finite range {lo} ..= {hi}");
            }
            if lo > hi {
                bail!("KvQuantParams::from_range: channel {c} has min {lo} > max {hi}");
            }
            let (lo, hi) = (lo.min(0.0), hi.max(0.0));
            let s = (hi - lo) / 255.0;
            if s > 0.0 && (1.0 / s).is_finite() {
                let z = (-128.0 - lo / s).round().clamp(-128.0, 127.0);
                scale.push(s);
                offset.push(-z);
            } else {
                scale.push(1.0);
                offset.push(0.0);
            }
        }
        Ok(Self { scale, offset })
    }

    /// Number of channels (`Nkv * D` for a cache).
    pub fn channels(&self) -> usize {
        self.scale.len()
    }

    /// Quantizes `x` for channel `c`; the one rule shared by the kernels, the references and
    /// the device paths:
    ///
    /// `x_q = sat_i8(round_half_away_from_zero(x * inv - offset[c]))` with `inv = 1 / scale[c]`
    /// computed in f32, the product and the difference two separately rounded f32 operations
    /// (no fused multiply-add), `sat_i8` clamping to -128..=127; NaN quantizes to 0 and +-inf
    /// saturate. This is [`quantize_value`]`(x, 1 / scale[c], -offset[c])`.
    ///
    /// Panics if `c >= self.channels()`.
    #[inline]
    pub fn quantize(&self, c: usize, x: f32) -> i8 {
        quantize_value(x, 1.0 / self.scale[c], -self.offset[c])
    }

    /// `(q + offset[c]) * scale[c]` in f32. Panics if `c >= self.channels()`.
    #[inline]
    pub fn dequantize(&self, c: usize, q: i8) -> f32 {
        (f32::from(q) + self.offset[c]) * self.scale[c]
    }

    /// Lengths agree, scales are finite and positive with a finite inverse, offsets finite.
    fn check(&self, op: &str) -> Result<()> {
        if self.scale.len() != self.offset.len() {
            bail!("{op}: {} scales but {} offsets", self.scale.len(), self.offset.len());
        }
        for (c, (&s, &o)) in self.scale.iter().zip(&self.offset).enumerate() {
            if !(s > 0.0 && s.is_finite() && (1.0 / s).is_finite() && o.is_finite()) {
                bail!("{op}: channel {c} has an invalid scale {s} or offset {o}");
            }
        }
        Ok(())
    }
}

/// One fixed int8 cache `[B, T, Nkv, D]` (row-major, allocated once) and its per-channel
/// parameters (`Nkv * D` channels). Written by [`kv_write_int8`], read by the int8 attention
/// ops; the storage never moves after [`Int8KvCache::new`].
#[derive(Debug, Clone)]
pub struct Int8KvCache {
    data: Vec<i8>,
    dims: (usize, usize, usize, usize),
    params: KvQuantParams,
}

impl Int8KvCache {
    /// A zero-filled cache of `batch` sequences of `capacity` tokens. Errors when
    /// `params.channels() != kv_heads * head_dim`, when a scale is not finite and positive or
    /// an offset not finite, or when the size overflows.
    pub fn new(batch: usize, capacity: usize, kv_heads: usize, head_dim: usize, params: KvQuantParams) -> Result<Self> {
        const OP: &str = "Int8KvCache::new";
        params.check(OP)?;
        let Some(channels) = kv_heads.checked_mul(head_dim) else {
            bail!("{OP}: kv_heads {kv_heads} x head_dim {head_dim} overflows");
        };
        if params.channels() != channels {
            bail!(
                "{OP}: {} quantization channels for Nkv * D = {kv_heads} * {head_dim} = {channels}",
                params.channels()
            );
        }
        let Some(len) = batch.checked_mul(capacity).and_then(|n| n.checked_mul(channels)) else {
            bail!("{OP}: a [{batch}, {capacity}, {kv_heads}, {head_dim}] cache overflows");
        };
        Ok(Self { data: vec![0; len], dims: (batch, capacity, kv_heads, head_dim), params })
    }

    /// `(B, T, Nkv, D)`.
    pub fn dims(&self) -> (usize, usize, usize, usize) {
        self.dims
    }

    pub fn params(&self) -> &KvQuantParams {
        &self.params
    }

    /// The int8 storage, `[B, T, Nkv, D]` row-major.
    pub fn data(&self) -> &[i8] {
        &self.data
    }

    /// Bytes of int8 storage (one per element; the parameters are not counted).
    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    /// Address of the storage: stays the same for the life of the cache (no reallocation).
    pub fn storage_id(&self) -> usize {
        self.data.as_ptr() as usize
    }

    /// The whole cache dequantized to an f32 tensor `[B, T, Nkv, D]` (for references and
    /// tests: allocates 4 bytes per element).
    pub fn dequantize(&self) -> Result<Tensor> {
        let channels = self.params.channels().max(1);
        let values: Vec<f32> =
            self.data.iter().enumerate().map(|(i, &q)| self.params.dequantize(i % channels, q)).collect();
        let (b, t, n, d) = self.dims;
        Tensor::from_vec(values, (b, t, n, d), &Device::Cpu)
    }
}

/// Quantize-on-write: `cache[b, positions[b] + i] = quantize(new[b, i])` (channel by channel,
/// [`KvQuantParams::quantize`]) for every `b < B'` and `i < S`; nothing else changes.
///
/// - `new`: `[B', S, Nkv, D]` with `B' <= B` (a step may use only the first `B'` sequences of a
///   cache allocated for the largest batch), f32, f16 or bf16, contiguous in the last
///   dimension with any outer strides (e.g. a `narrow` of a fused qkv output). CPU only.
/// - `positions`: `B'` start positions, each with `positions[b] + S <= T`.
///
/// The result is exact (integers): the same bytes as [`kv_write_int8_reference`]. Errors
/// (nothing is written) on a shape, dtype, device or positions-count mismatch and on a write
/// past the end of the cache. The storage is written in place, never reallocated.
pub fn kv_write_int8(cache: &mut Int8KvCache, new: &Tensor, positions: &[usize]) -> Result<()> {
    let len = check_write(KV_WRITE_INT8, cache, new, positions)?;
    if new.elem_count() == 0 {
        return Ok(());
    }
    let params = &cache.params;
    let inv: Vec<f32> = params.scale.iter().map(|s| 1.0 / s).collect();
    let zero: Vec<f32> = params.offset.iter().map(|o| -o).collect();
    let (_, capacity, kv_heads, head_dim) = cache.dims;
    let data = &mut cache.data;
    crate::dispatch_float!(new.dtype(), KV_WRITE_INT8, T => with_slice::<T, _>(new, KV_WRITE_INT8, |src, layout| {
        let rows = Rows::new(layout, src.len(), KV_WRITE_INT8, "new")?;
        let token = kv_heads * head_dim;
        let mut targets = Vec::with_capacity(positions.len());
        for (b, (seq, &p)) in data.chunks_exact_mut(capacity * token).zip(positions).enumerate() {
            // In range: checked by `check_write`.
            targets.push((b, &mut seq[p * token..(p + len) * token]));
        }
        let write = |b: usize, first: usize, dst: &mut [i8]| {
            for (k, dst_token) in dst.chunks_exact_mut(token).enumerate() {
                let row = (b * len + first + k) * kv_heads;
                for (n, dst_head) in dst_token.chunks_exact_mut(head_dim).enumerate() {
                    let c = n * head_dim..(n + 1) * head_dim;
                    quantize_row_per_channel::<T>(rows.row(src, row + n), &inv[c.clone()], &zero[c], dst_head);
                }
            }
        };
        let units = positions.len() * len;
        let per_task = units_per_task(units, token);
        if per_task >= units {
            for (b, dst) in targets {
                write(b, 0, dst);
            }
        } else {
            targets.into_par_iter().for_each(|(b, dst)| {
                dst.par_chunks_mut(per_task * token).enumerate().for_each(|(i, chunk)| write(b, i * per_task, chunk));
            });
        }
        Ok(())
    }))
}

/// Reference for [`kv_write_int8`]: returns an updated copy of `cache`, written one element at
/// a time with [`KvQuantParams::quantize`] from `new` converted to f32 by candle.
pub fn kv_write_int8_reference(cache: &Int8KvCache, new: &Tensor, positions: &[usize]) -> Result<Int8KvCache> {
    let len = check_write("kv_write_int8_reference", cache, new, positions)?;
    let (_, capacity, kv_heads, head_dim) = cache.dims;
    let channels = kv_heads * head_dim;
    let values = new.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let mut out = cache.clone();
    for (b, &p) in positions.iter().enumerate() {
        for i in 0..len {
            for c in 0..channels {
                let x = values[(b * len + i) * channels + c];
                out.data[(b * capacity + p + i) * channels + c] = out.params.quantize(c, x);
            }
        }
    }
    Ok(out)
}

/// Validates a write; returns `S`.
fn check_write(op: &str, cache: &Int8KvCache, new: &Tensor, positions: &[usize]) -> Result<usize> {
    let (batch, capacity, kv_heads, head_dim) = cache.dims;
    let &[new_batch, len, new_heads, new_dim] = new.dims() else {
        bail!("{op}: `new` must be [B, S, Nkv, D], got shape {:?}", new.dims());
    };
    if new_batch > batch || (new_heads, new_dim) != (kv_heads, head_dim) {
        bail!(
            "{op}: `new` {:?} must be [B', S, Nkv, D] with B' <= B for a cache [B, T, Nkv, D] = {:?}",
            new.dims(),
            [batch, capacity, kv_heads, head_dim]
        );
    }
    if positions.len() != new_batch {
        bail!("{op}: {} positions given for a batch of {new_batch}", positions.len());
    }
    for (b, &p) in positions.iter().enumerate() {
        if p.checked_add(len).is_none_or(|end| end > capacity) {
            bail!(
                "{op}: cache full for sequence {b}: writing {len} tokens at position {p} needs {}, capacity is {capacity}",
                p.saturating_add(len)
            );
        }
    }
    if !matches!(new.dtype(), DType::F32 | DType::F16 | DType::BF16) {
        return Err(candle_core::Error::UnsupportedDTypeForOp(new.dtype(), KV_WRITE_INT8));
    }
    if !new.device().is_cpu() {
        bail!("{op}: only CPU tensors are supported, `new` is on {:?}", new.device().location());
    }
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Rng, case_id, random_kv_params};

    #[test]
    fn params_from_range_cover_the_range() -> Result<()> {
        let p = KvQuantParams::from_range(&[-1.0, 0.5, 0.0, -3.0], &[1.0, 2.0, 0.0, -1.0])?;
        assert_eq!(p.channels(), 4);
        // Zero is exact in every channel, the ends of the range map to the int8 ends.
        for c in 0..4 {
            assert_eq!(p.dequantize(c, p.quantize(c, 0.0)), 0.0, "channel {c}");
        }
        assert_eq!(p.quantize(0, -1.0), -128);
        assert!(p.quantize(0, 1.0) >= 126);
        assert_eq!(p.quantize(1, 0.0), -128);
        assert!(p.quantize(1, 2.0) >= 126);
        assert_eq!(p.quantize(3, -3.0), -128);
        assert_eq!(p.quantize(3, 0.0), 127);
        assert_eq!((p.scale[2], p.offset[2]), (1.0, 0.0), "dead channel");
        assert_eq!(p.quantize(2, 0.0), 0);
        // Saturation, NaN and infinities.
        assert_eq!(p.quantize(0, 100.0), 127);
        assert_eq!(p.quantize(0, f32::NEG_INFINITY), -128);
        assert_eq!(p.quantize(0, f32::NAN), 0);
        // Round trip within half a step over the whole calibrated range.
        let mut rng = Rng::fresh("kv_cache::int8::params_from_range_cover_the_range");
        for (c, lo, hi) in [(0, -1.0, 1.0), (1, 0.0, 2.0), (3, -3.0, 0.0)] {
            for x in [lo, hi].into_iter().chain((0..1000).map(|_| rng.uniform(lo, hi))) {
                let err = (p.dequantize(c, p.quantize(c, x)) - x).abs();
                assert!(err <= 0.5 * p.scale[c] * 1.001, "channel {c}, x = {x}: error {err}");
            }
        }
        assert!(KvQuantParams::from_range(&[0.0], &[1.0, 2.0]).is_err());
        assert!(KvQuantParams::from_range(&[f32::NAN], &[1.0]).is_err());
        assert!(KvQuantParams::from_range(&[0.0], &[f32::INFINITY]).is_err());
        assert!(KvQuantParams::from_range(&[1.0], &[0.0]).is_err());
        Ok(())
    }

    #[test]
    fn write_matches_reference_exactly() -> Result<()> {
        let mut rng = Rng::fresh("kv_cache::int8::write_matches_reference_exactly");
        for dtype in crate::testing::FLOAT_DTYPES {
            for (kv_heads, d) in [(2, 64), (3, 128), (1, 20)] {
                // (cache batch, capacity, B', S, strided): decode into a prefix, a ragged
                // prefill large enough to run in parallel, a strided narrow of a fused qkv.
                for (batch, capacity, new_batch, len, strided) in
                    [(4, 40, 3, 1, false), (2, 300, 2, 150, false), (3, 64, 2, 7, true), (2, 16, 1, 16, false)]
                {
                    let extra = format!("kv_heads={kv_heads},B={batch},T={capacity},strided={strided}");
                    let id = case_id("KV_WRITE_INT8", dtype, &[new_batch, len, kv_heads, d], &extra);
                    eprintln!("{id}");
                    let params = random_kv_params(&mut rng, kv_heads * d)?;
                    let mut cache = Int8KvCache::new(batch, capacity, kv_heads, d, params)?;
                    // Earlier contents, so that untouched rows are checked too.
                    let fill = rng.tensor(&[batch, capacity, kv_heads, d], -3.0, 3.0, DType::F32)?;
                    kv_write_int8(&mut cache, &fill, &vec![0; batch])?;
                    let new = if strided {
                        let wide = rng.tensor(&[new_batch, len, 3 * kv_heads + 1, d], -3.5, 3.5, dtype)?;
                        wide.narrow(2, kv_heads + 1, kv_heads)?
                    } else {
                        rng.tensor(&[new_batch, len, kv_heads, d], -3.5, 3.5, dtype)?
                    };
                    let positions: Vec<usize> = (0..new_batch).map(|_| rng.below(capacity - len + 1)).collect();
                    let expected = kv_write_int8_reference(&cache, &new, &positions)?;
                    let before = cache.storage_id();
                    kv_write_int8(&mut cache, &new, &positions)?;
                    assert_eq!(cache.storage_id(), before, "{id}: reallocated");
                    if cache.data() != expected.data() {
                        let at = cache.data().iter().zip(expected.data()).position(|(a, b)| a != b).unwrap_or(0);
                        bail!("{id}: positions {positions:?}: first difference at flat index {at}");
                    }
                    assert!(cache.data().iter().any(|&x| x != 0), "{id}: all zeros");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn write_rejects_bad_input_without_writing() -> Result<()> {
        let mut rng = Rng::seeded(3);
        let params = random_kv_params(&mut rng, 2 * 8)?;
        let mut cache = Int8KvCache::new(2, 8, 2, 8, params.clone())?;
        let new = rng.tensor(&[2, 3, 2, 8], -1.0, 1.0, DType::F32)?;
        let err = kv_write_int8(&mut cache, &new, &[0, 6]).unwrap_err().to_string();
        assert!(err.contains(KV_WRITE_INT8) && err.contains("cache full"), "{err}");
        assert!(kv_write_int8(&mut cache, &new, &[0, usize::MAX]).is_err());
        assert!(kv_write_int8(&mut cache, &new, &[0]).is_err(), "positions count");
        assert!(kv_write_int8(&mut cache, &new.narrow(2, 0, 1)?, &[0, 0]).is_err(), "Nkv");
        assert!(kv_write_int8(&mut cache, &new.narrow(3, 0, 4)?, &[0, 0]).is_err(), "D");
        let three = rng.tensor(&[3, 1, 2, 8], -1.0, 1.0, DType::F32)?;
        assert!(kv_write_int8(&mut cache, &three, &[0, 0, 0]).is_err(), "B' > B");
        assert!(kv_write_int8(&mut cache, &new.to_dtype(DType::I64)?, &[0, 0]).is_err(), "dtype");
        assert!(kv_write_int8(&mut cache, &new.transpose(2, 3)?, &[0, 0]).is_err(), "layout");
        assert!(kv_write_int8(&mut cache, &new.flatten_all()?, &[0, 0]).is_err(), "rank");
        assert!(cache.data().iter().all(|&x| x == 0));
        assert!(kv_write_int8_reference(&cache, &new, &[0, 6]).is_err());
        // Parameters that do not fit the cache.
        assert!(Int8KvCache::new(2, 8, 2, 4, params.clone()).is_err());
        assert!(Int8KvCache::new(2, 8, 4, 8, params.clone()).is_err());
        let bad = KvQuantParams { scale: vec![0.0; 16], offset: vec![0.0; 16] };
        assert!(Int8KvCache::new(2, 8, 2, 8, bad).is_err());
        let short = KvQuantParams { scale: vec![1.0; 16], offset: vec![0.0; 15] };
        assert!(Int8KvCache::new(2, 8, 2, 8, short).is_err());
        assert!(Int8KvCache::new(usize::MAX, 8, 2, 8, params).is_err());
        Ok(())
    }
}
