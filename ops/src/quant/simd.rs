//! AVX-512 helpers around the int8 kernels: activation quantization (16 values per step) and
//! the dequantizing epilogue (16 channels per step). Both fall back to the scalar code in
//! `pack.rs` / `cpu.rs` on CPUs without AVX-512F, and compute bit-identical results to it.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use crate::host::Element;
use candle_core::DType;

/// Whether the AVX-512 helpers can run (AVX-512F and BW for the byte stores).
pub(super) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bw")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Loads 16 elements of `T` (f32, f16 or bf16) as f32.
///
/// # Safety
/// AVX-512F must be available and `p` valid for reading 16 elements.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn load16<T: Element>(p: *const T) -> __m512 {
    // SAFETY: forwarded from the caller (16 readable elements, AVX-512F present); the dtype
    // match selects the load matching T's layout (checked through T::DTYPE).
    unsafe {
        match T::DTYPE {
            DType::F16 => _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())),
            DType::BF16 => {
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast()))))
            }
            _ => _mm512_loadu_ps(p.cast()),
        }
    }
}

/// `dst[i] = quantize_value(src[i], scale, offset) as u8 ^ flip` for the common length.
///
/// # Safety
/// [`available`] must be true.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
pub(super) unsafe fn quantize_row<T: Element>(src: &[T], scale: f32, offset: f32, flip: u8, dst: &mut [u8]) {
    let len = src.len().min(dst.len());
    let (vs, vo) = (_mm512_set1_ps(scale), _mm512_set1_ps(offset));
    let vflip = _mm_set1_epi8(flip as i8);
    let mut i = 0;
    while i + 16 <= len {
        // SAFETY: i + 16 <= len, so 16 elements are readable from src and writable in dst.
        unsafe {
            let v = _mm512_add_ps(_mm512_mul_ps(load16(src.as_ptr().add(i)), vs), vo);
            let bytes = _mm_xor_si128(quantize16(v), vflip);
            _mm_storeu_si128(dst.as_mut_ptr().add(i).cast(), bytes);
        }
        i += 16;
    }
    for (o, &v) in dst[i..len].iter_mut().zip(&src[i..len]) {
        *o = (super::quantize_value(v.to_f32(), scale, offset) as u8) ^ flip;
    }
}

/// `dst[i] = quantize_value(src[i], scale[i], offset[i])` for the common length: per-channel
/// parameters (the int8 KV-cache write).
///
/// # Safety
/// [`available`] must be true.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
pub(super) unsafe fn quantize_row_per_channel<T: Element>(src: &[T], scale: &[f32], offset: &[f32], dst: &mut [i8]) {
    let len = src.len().min(dst.len()).min(scale.len()).min(offset.len());
    let mut i = 0;
    while i + 16 <= len {
        // SAFETY: i + 16 <= len, so 16 elements are readable from src, scale and offset and
        // writable in dst.
        unsafe {
            let vs = _mm512_loadu_ps(scale.as_ptr().add(i));
            let vo = _mm512_loadu_ps(offset.as_ptr().add(i));
            let v = _mm512_add_ps(_mm512_mul_ps(load16(src.as_ptr().add(i)), vs), vo);
            _mm_storeu_si128(dst.as_mut_ptr().add(i).cast(), quantize16(v));
        }
        i += 16;
    }
    for (((o, &v), &s), &z) in dst[i..len].iter_mut().zip(&src[i..len]).zip(&scale[i..len]).zip(&offset[i..len]) {
        *o = super::quantize_value(v.to_f32(), s, z);
    }
}

/// `saturate(round(v))` of 16 lanes as int8 bytes, exactly as [`super::quantize_value`] after
/// its multiply and add: NaN -> 0, clamped to [-128, 127], half away from zero.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn quantize16(v: __m512) -> __m128i {
    let (lo, hi) = (_mm512_set1_ps(-128.0), _mm512_set1_ps(127.0));
    let (half, one) = (_mm512_set1_ps(0.5), _mm512_set1_ps(1.0));
    let ordered = _mm512_cmp_ps_mask::<_CMP_ORD_Q>(v, v);
    let c = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
    let t = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(c);
    let frac = _mm512_sub_ps(c, t);
    let up = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(frac, half);
    let down = _mm512_cmp_ps_mask::<_CMP_LE_OQ>(frac, _mm512_sub_ps(_mm512_setzero_ps(), half));
    let r = _mm512_mask_sub_ps(_mm512_mask_add_ps(t, up, t, one), down, t, one);
    _mm512_cvtepi32_epi8(_mm512_maskz_cvttps_epi32(ordered, r))
}

/// One accumulator row of a block as every f32 epilogue dequantizes it: `(acc + bias) as f32 *
/// deq`, then `* row_scale` when given (two multiplications, never fused), 32 channels as two
/// vectors.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
fn dequantize_row(row: &[i32; 32], bias: [__m512i; 2], deq: [__m512; 2], row_scale: Option<f32>) -> [__m512; 2] {
    std::array::from_fn(|h| {
        // SAFETY: `row` holds 32 i32, so lanes 16h..16h + 16 are readable.
        let a = unsafe { _mm512_loadu_si512(row.as_ptr().add(16 * h).cast()) };
        let y = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(a, bias[h])), deq[h]);
        match row_scale {
            Some(rs) => _mm512_mul_ps(y, _mm512_set1_ps(rs)),
            None => y,
        }
    })
}

/// The SwiGLU epilogue of a gated linear's block (see `QuantLinear::new_swiglu`): channels
/// 0..16 of `acc` are gate channels and 16..32 the matching up channels; for the first `rows`
/// rows, `out[r * ldy + c] = silu(g) * u` for `c < 16`, where `g` and `u` are dequantized
/// exactly as [`dequantize_block`] does (so the result equals `swiglu` of its output).
///
/// # Safety
/// `bias` and `deq` hold 32 values, `row_scale` (when given) `rows`; `out` must be valid for
/// writing 16 f32 at `out + r * ldy` for every `r < rows`, and no other thread may access
/// those elements during the call.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn dequantize_swiglu_block(
    _: crate::kernel::simd::Avx512,
    acc: &[[i32; 32]],
    rows: usize,
    bias: &[i32],
    deq: &[f32],
    row_scale: Option<&[f32]>,
    out: *mut f32,
    ldy: usize,
) {
    assert!(rows <= acc.len() && bias.len() >= 32 && deq.len() >= 32);
    assert!(row_scale.is_none_or(|s| s.len() >= rows));
    // SAFETY: 32 values of `bias` and `deq` (asserted).
    let (b0, b1, s0, s1) = unsafe {
        (
            _mm512_loadu_si512(bias.as_ptr().cast()),
            _mm512_loadu_si512(bias.as_ptr().add(16).cast()),
            _mm512_loadu_ps(deq.as_ptr()),
            _mm512_loadu_ps(deq.as_ptr().add(16)),
        )
    };
    for (r, row) in acc.iter().enumerate().take(rows) {
        // SAFETY: `row` is 32 i32; the store writes the 16 f32 of output row r that the caller
        // guarantees writable and exclusively ours.
        unsafe {
            let [gate, up] = dequantize_row(row, [b0, b1], [s0, s1], row_scale.map(|s| s[r]));
            _mm512_storeu_ps(out.add(r * ldy), crate::swiglu::swiglu16(gate, up));
        }
    }
}

/// Dequantizes the first `rows` rows of a block: `out[r * ldy + c] = (acc[r][c] + bias[c]) as
/// f32 * deq[c]` for `c < cols` (at most 32).
///
/// # Safety
/// [`available`] must be true; `bias` and `deq` hold at least `cols` values; `out` must be
/// valid for writing `cols` f32 at `out + r * ldy` for every `r < rows`, and no other thread
/// may access those elements during the call.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn dequantize_block(
    acc: &[[i32; 32]],
    rows: usize,
    bias: &[i32],
    deq: &[f32],
    row_scale: Option<&[f32]>,
    out: *mut f32,
    ldy: usize,
    cols: usize,
) {
    assert!(cols <= 32 && rows <= acc.len() && bias.len() >= cols && deq.len() >= cols);
    assert!(row_scale.is_none_or(|s| s.len() >= rows));
    let mask_of = |c: usize| -> __mmask16 { if cols - c >= 16 { 0xffff } else { (1u16 << (cols - c)) - 1 } };
    let (m0, m1) = (mask_of(0), if cols > 16 { mask_of(16) } else { 0 });
    // SAFETY: the masks limit the loads to indices < cols of `bias` and `deq`.
    let (b0, b1, s0, s1) = unsafe {
        (
            _mm512_maskz_loadu_epi32(m0, bias.as_ptr()),
            _mm512_maskz_loadu_epi32(m1, bias.as_ptr().add(16)),
            _mm512_maskz_loadu_ps(m0, deq.as_ptr()),
            _mm512_maskz_loadu_ps(m1, deq.as_ptr().add(16)),
        )
    };
    for (r, row) in acc.iter().enumerate().take(rows) {
        // SAFETY: `row` is 32 i32; the stores are masked to columns < cols of output row r,
        // which the caller guarantees writable and exclusively ours.
        unsafe {
            let dst = out.add(r * ldy);
            let [y0, y1] = dequantize_row(row, [b0, b1], [s0, s1], row_scale.map(|s| s[r]));
            _mm512_mask_storeu_ps(dst, m0, y0);
            _mm512_mask_storeu_ps(dst.add(16), m1, y1);
        }
    }
}

/// `dst[i] = src[i] as f32` for the common length (the per-token path's working copy).
///
/// # Safety
/// [`available`] must be true.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
pub(super) unsafe fn widen_row<T: Element>(src: &[T], dst: &mut [f32]) {
    let len = src.len().min(dst.len());
    let mut i = 0;
    while i + 16 <= len {
        // SAFETY: i + 16 <= len: 16 elements readable from src and writable in dst.
        unsafe { _mm512_storeu_ps(dst.as_mut_ptr().add(i), load16(src.as_ptr().add(i))) };
        i += 16;
    }
    for (d, s) in dst[i..len].iter_mut().zip(&src[i..len]) {
        *d = s.to_f32();
    }
}

/// `max |x[i]|` of f32 / f16 / bf16 values ignoring NaN (0 for an empty or all-NaN row), like
/// `x.iter().fold(0.0, |a, v| a.max(v.to_f32().abs()))`.
///
/// # Safety
/// [`available`] must be true.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
pub(super) unsafe fn absmax<T: Element>(x: &[T]) -> f32 {
    let (mut a0, mut a1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    // MAXPS returns its second operand when either is NaN: with the accumulator second, NaN
    // lanes leave it unchanged (f32::max ignores NaN the same way).
    let mut i = 0;
    while i + 32 <= x.len() {
        // SAFETY: i + 32 <= len: 32 elements readable.
        unsafe {
            a0 = _mm512_max_ps(_mm512_abs_ps(load16(x.as_ptr().add(i))), a0);
            a1 = _mm512_max_ps(_mm512_abs_ps(load16(x.as_ptr().add(i + 16))), a1);
        }
        i += 32;
    }
    if i + 16 <= x.len() {
        // SAFETY: i + 16 <= len: 16 elements readable.
        a0 = _mm512_max_ps(_mm512_abs_ps(unsafe { load16(x.as_ptr().add(i)) }), a0);
        i += 16;
    }
    let m = _mm512_reduce_max_ps(_mm512_max_ps(a0, a1));
    x[i..].iter().fold(m, |a, v| a.max(v.to_f32().abs()))
}
