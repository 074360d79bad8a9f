//! AVX-512 access to f32 / f16 / bf16 storage as 16 f32 lanes, and a vector `exp`.
//!
//! Kernels are `#[target_feature(enable = "avx512f,avx512bw,avx512vl")]` functions chosen at
//! run time through an [`Avx512`] token. Inside them the helpers are safe to call and need
//! no bounds logic: the main loop walks a row with `as_chunks::<16>()` and [`load16`] /
//! [`store16`] on whole arrays, then one [`load_partial`] / [`store_partial`] covers the
//! tail through a lane mask (nothing past the end is touched, no scalar epilogue).
//!
//! Conversions round to nearest even, as `half` does: f16 with `vcvtps2ph`, bf16 with
//! integer arithmetic (NaN stays a quiet NaN).

use crate::host::Element;
use half::{bf16, f16};

#[cfg(target_arch = "x86_64")]
pub use x86::*;

/// f32 lanes per vector.
pub const LANES: usize = 16;

/// True when the AVX-512 kernels can run on this CPU (AVX-512 F, BW and VL).
pub fn avx512_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Proof that the CPU runs the AVX-512 kernels (F, BW and VL): only [`Avx512::detect`]
/// makes one, so a kernel entry point that takes it may call `#[target_feature]` code.
#[derive(Debug, Clone, Copy)]
pub struct Avx512(());

impl Avx512 {
    /// The token when this CPU supports the AVX-512 kernels.
    pub fn detect() -> Option<Self> {
        avx512_available().then_some(Self(()))
    }
}

/// A storage element with vector load and store as f32 lanes.
pub trait Lanes: Element {
    /// Loads `n.min(16)` elements from `p` into f32 lanes; lanes past `n` are zero.
    ///
    /// # Safety
    /// The CPU supports AVX-512 F/BW/VL, and `p` is valid for reading `n.min(16)` elements.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load_raw(p: *const Self, n: usize) -> std::arch::x86_64::__m512;

    /// Stores the first `n.min(16)` lanes of `v` to `p`, rounded to the storage type.
    ///
    /// # Safety
    /// The CPU supports AVX-512 F/BW/VL, and `p` is valid for writing `n.min(16)` elements.
    #[cfg(target_arch = "x86_64")]
    unsafe fn store_raw(p: *mut Self, n: usize, v: std::arch::x86_64::__m512);

    /// `v` rounded to the storage precision and widened back (identity for f32).
    ///
    /// # Safety
    /// The CPU supports AVX-512 F/BW/VL.
    #[cfg(target_arch = "x86_64")]
    unsafe fn round(v: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512;
}

#[cfg(not(target_arch = "x86_64"))]
impl Lanes for f32 {}
#[cfg(not(target_arch = "x86_64"))]
impl Lanes for f16 {}
#[cfg(not(target_arch = "x86_64"))]
impl Lanes for bf16 {}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;

    use super::{LANES, Lanes, bf16, f16};

    /// Mask of the first `n` lanes (all 16 for n >= 16).
    #[inline(always)]
    fn mask(n: usize) -> __mmask16 {
        if n >= LANES { 0xffff } else { ((1u32 << n) - 1) as __mmask16 }
    }

    impl Lanes for f32 {
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        unsafe fn load_raw(p: *const Self, n: usize) -> __m512 {
            // SAFETY: the caller guarantees `p` is readable for n.min(16) elements; masked-off
            // lanes are not accessed (no fault).
            unsafe { if n >= LANES { _mm512_loadu_ps(p) } else { _mm512_maskz_loadu_ps(mask(n), p) } }
        }
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        unsafe fn store_raw(p: *mut Self, n: usize, v: __m512) {
            // SAFETY: the caller guarantees `p` is writable for n.min(16) elements; masked-off
            // lanes are not written.
            unsafe { if n >= LANES { _mm512_storeu_ps(p, v) } else { _mm512_mask_storeu_ps(p, mask(n), v) } }
        }
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        unsafe fn round(v: __m512) -> __m512 {
            v
        }
    }

    /// Loads `n.min(16)` 16-bit values from `p` into the 16 lanes of a 256-bit vector.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL; `p` readable for `n.min(16)` 16-bit values.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn load_u16(p: *const u16, n: usize) -> __m256i {
        // SAFETY: forwarded from the caller; masked-off lanes are not accessed.
        unsafe { if n >= LANES { _mm256_loadu_si256(p.cast()) } else { _mm256_maskz_loadu_epi16(mask(n), p.cast()) } }
    }

    /// Stores the first `n.min(16)` 16-bit lanes of `h` to `p`.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL; `p` writable for `n.min(16)` 16-bit values.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn store_u16(p: *mut u16, n: usize, h: __m256i) {
        // SAFETY: forwarded from the caller; masked-off lanes are not written.
        unsafe {
            if n >= LANES { _mm256_storeu_si256(p.cast(), h) } else { _mm256_mask_storeu_epi16(p.cast(), mask(n), h) }
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    fn f32_to_f16(v: __m512) -> __m256i {
        _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v)
    }

    /// f32 -> bf16 bits, round to nearest even; NaN becomes a quiet NaN (as `half` does).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    fn f32_to_bf16(v: __m512) -> __m256i {
        let bits = _mm512_castps_si512(v);
        let high = _mm512_srli_epi32::<16>(bits);
        let lsb = _mm512_and_si512(high, _mm512_set1_epi32(1));
        let bias = _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff));
        let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(bits, bias));
        // NaN lanes: the truncated bits with the quiet bit set (rounding could carry a NaN
        // into infinity).
        let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
        _mm512_cvtepi32_epi16(_mm512_mask_or_epi32(rounded, nan, high, _mm512_set1_epi32(0x40)))
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    fn bf16_to_f32(h: __m256i) -> __m512 {
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
    }

    impl Lanes for f16 {
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        unsafe fn load_raw(p: *const Self, n: usize) -> __m512 {
            // SAFETY: f16 is a 16-bit value with the layout of u16; the caller guarantees `p`
            // is readable for n.min(16) elements.
            _mm512_cvtph_ps(unsafe { load_u16(p.cast(), n) })
        }
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        unsafe fn store_raw(p: *mut Self, n: usize, v: __m512) {
            // SAFETY: f16 has the layout of u16; the caller guarantees `p` is writable for
            // n.min(16) elements.
            unsafe { store_u16(p.cast(), n, f32_to_f16(v)) }
        }
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        unsafe fn round(v: __m512) -> __m512 {
            _mm512_cvtph_ps(f32_to_f16(v))
        }
    }

    impl Lanes for bf16 {
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        unsafe fn load_raw(p: *const Self, n: usize) -> __m512 {
            // SAFETY: bf16 is a 16-bit value with the layout of u16; the caller guarantees
            // `p` is readable for n.min(16) elements.
            bf16_to_f32(unsafe { load_u16(p.cast(), n) })
        }
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        unsafe fn store_raw(p: *mut Self, n: usize, v: __m512) {
            // SAFETY: bf16 has the layout of u16; the caller guarantees `p` is writable for
            // n.min(16) elements.
            unsafe { store_u16(p.cast(), n, f32_to_bf16(v)) }
        }
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        unsafe fn round(v: __m512) -> __m512 {
            bf16_to_f32(f32_to_bf16(v))
        }
    }

    /// Loads 16 elements as f32 lanes.
    ///
    /// # Safety
    /// Safe inside AVX-512 F/BW/VL code; anywhere else, only behind an [`super::Avx512`] token
    /// (the caller's `unsafe` block names it).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub fn load16<T: Lanes>(v: &[T; LANES]) -> __m512 {
        // SAFETY: this function is compiled for AVX-512 F/BW/VL (callers run only after
        // detection), and `v` holds 16 readable elements.
        unsafe { T::load_raw(v.as_ptr(), LANES) }
    }

    /// Stores 16 f32 lanes, rounded to `T`.
    ///
    /// # Safety
    /// Safe inside AVX-512 F/BW/VL code; anywhere else, only behind an [`super::Avx512`] token
    /// (the caller's `unsafe` block names it).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub fn store16<T: Lanes>(out: &mut [MaybeUninit<T>; LANES], v: __m512) {
        // SAFETY: AVX-512 F/BW/VL as for `load16`; `out` holds 16 writable elements and
        // `MaybeUninit<T>` has the layout of `T`.
        unsafe { T::store_raw(out.as_mut_ptr().cast::<T>(), LANES, v) }
    }

    /// Stores 16 f32 lanes into an f32 buffer.
    ///
    /// # Safety
    /// Safe inside AVX-512 F/BW/VL code; anywhere else, only behind an [`super::Avx512`] token
    /// (the caller's `unsafe` block names it).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub fn store16_f32(out: &mut [f32; LANES], v: __m512) {
        // SAFETY: AVX-512 F/BW/VL as for `load16`; `out` holds 16 writable f32.
        unsafe { f32::store_raw(out.as_mut_ptr(), LANES, v) }
    }

    /// Loads the first `s.len().min(16)` elements of `s` (a row tail) as f32 lanes; the other
    /// lanes are zero.
    ///
    /// # Safety
    /// Safe inside AVX-512 F/BW/VL code; anywhere else, only behind an [`super::Avx512`] token
    /// (the caller's `unsafe` block names it).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub fn load_partial<T: Lanes>(s: &[T]) -> __m512 {
        // SAFETY: AVX-512 F/BW/VL as for `load16`; `s` holds `s.len()` readable elements and
        // at most that many are read (lane mask).
        unsafe { T::load_raw(s.as_ptr(), s.len()) }
    }

    /// Stores the first `s.len().min(16)` lanes of `v` to `s` (a row tail).
    ///
    /// # Safety
    /// Safe inside AVX-512 F/BW/VL code; anywhere else, only behind an [`super::Avx512`] token
    /// (the caller's `unsafe` block names it).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub fn store_partial<T: Lanes>(s: &mut [MaybeUninit<T>], v: __m512) {
        // SAFETY: AVX-512 F/BW/VL as for `load16`; at most `s.len()` elements are written
        // (lane mask), and `MaybeUninit<T>` has the layout of `T`.
        unsafe { T::store_raw(s.as_mut_ptr().cast::<T>(), s.len(), v) }
    }

    /// Stores the first `s.len().min(16)` lanes of `v` to an f32 buffer `s`.
    ///
    /// # Safety
    /// Safe inside AVX-512 F/BW/VL code; anywhere else, only behind an [`super::Avx512`] token
    /// (the caller's `unsafe` block names it).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub fn store_partial_f32(s: &mut [f32], v: __m512) {
        // SAFETY: AVX-512 F/BW/VL as for `load16`; at most `s.len()` f32 are written.
        unsafe { f32::store_raw(s.as_mut_ptr(), s.len(), v) }
    }

    /// `v` rounded to the precision of `T` (see [`Lanes::round`]).
    ///
    /// # Safety
    /// Safe inside AVX-512 F/BW/VL code; anywhere else, only behind an [`super::Avx512`] token
    /// (the caller's `unsafe` block names it).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub fn round<T: Lanes>(v: __m512) -> __m512 {
        // SAFETY: this function is compiled for AVX-512 F/BW/VL, which `round` needs.
        unsafe { T::round(v) }
    }

    /// e^x in f32 lanes, relative error below 4e-7 for x in [-87, 88]; overflows to +inf
    /// above ~88.7, underflows to (denormal or) 0 below ~-87.3; NaN stays NaN.
    ///
    /// # Safety
    /// Safe inside AVX-512 F/BW/VL code; anywhere else, only behind an [`super::Avx512`] token
    /// (the caller's `unsafe` block names it).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub fn exp(x: __m512) -> __m512 {
        // min(hi, x) returns x when x is NaN, so NaN propagates (also through `exp_above`).
        exp_above(_mm512_min_ps(_mm512_set1_ps(100.0), x))
    }

    /// [`exp`] for inputs known to be at most 100 (e.g. `-|a|`): one clamp less.
    ///
    /// x = n ln2 + r with |r| <= ln2/2 (ln2 split in two so that n * LN2_HI is exact), e^r by
    /// its degree-6 Taylor polynomial (truncation error < 2e-7 relative), times 2^n with
    /// `vscalefps` (which saturates to inf / 0 on its own).
    ///
    /// # Safety
    /// Safe inside AVX-512 F/BW/VL code; anywhere else, only behind an [`super::Avx512`] token
    /// (the caller's `unsafe` block names it).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub fn exp_above(x: __m512) -> __m512 {
        const LN2_HI: f32 = 0.693_359_4; // 0.693359375: 9 significant bits
        const LN2_LO: f32 = -2.121_944_4e-4;
        // Below -110 the result is 0 anyway; the clamp keeps r small for any input.
        // max(lo, x) returns x when x is NaN.
        let x = _mm512_max_ps(_mm512_set1_ps(-110.0), x);
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
            x,
            _mm512_set1_ps(std::f32::consts::LOG2_E),
        ));
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
        let mut p = _mm512_set1_ps(1.0 / 720.0);
        for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        _mm512_scalef_ps(p, n)
    }

    /// Sum of the 16 lanes.
    ///
    /// # Safety
    /// Safe inside AVX-512 F/BW/VL code; anywhere else, only behind an [`super::Avx512`] token
    /// (the caller's `unsafe` block names it).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub fn sum(v: __m512) -> f32 {
        _mm512_reduce_add_ps(v)
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use std::mem::MaybeUninit;

    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    fn exp_worst_relative_error(lo: f32, hi: f32, steps: usize) -> f64 {
        let mut worst = 0f64;
        let mut out = [0f32; LANES];
        for k in (0..steps).step_by(LANES) {
            let xs: [f32; LANES] = std::array::from_fn(|j| lo + (hi - lo) * ((k + j) as f32 / steps as f32));
            store16_f32(&mut out, exp(load16(&xs)));
            for (x, y) in xs.iter().zip(out) {
                let want = (*x as f64).exp();
                worst = worst.max(((y as f64) - want).abs() / want);
            }
        }
        worst
    }

    #[test]
    fn exp_is_accurate_on_the_silu_range() {
        if !avx512_available() {
            return;
        }
        // SAFETY: AVX-512 F/BW/VL detected just above.
        let worst = unsafe { exp_worst_relative_error(-80.0, 80.0, 1 << 21) };
        eprintln!("simd exp: worst relative error {worst:.2e} on [-80, 80]");
        assert!(worst < 1e-6, "worst relative error {worst:e}");
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    fn roundtrip<T: Lanes>(values: &[f32]) -> Vec<T> {
        let mut out = vec![MaybeUninit::<T>::uninit(); values.len()];
        let (chunks, tail) = values.as_chunks::<LANES>();
        let (out_chunks, out_tail) = out.as_chunks_mut::<LANES>();
        for (c, o) in chunks.iter().zip(out_chunks) {
            store16(o, load16(c));
        }
        store_partial(out_tail, load_partial(tail));
        // SAFETY: the whole chunks and the tail cover every element.
        out.into_iter().map(|v| unsafe { v.assume_init() }).collect()
    }

    #[test]
    fn conversions_match_half() {
        if !avx512_available() {
            return;
        }
        let mut values: Vec<f32> = (0..4000).map(|i| ((i as f32) * 0.7318).sin() * 10f32.powi(i % 11 - 5)).collect();
        values.extend([
            f32::NAN,
            f32::from_bits(0x7f80_0001),
            f32::from_bits(0xff80_0001),
            f32::INFINITY,
            -f32::INFINITY,
            65504.0,
            70000.0,
            1e-8,
            1e-39,
            -3e-40,
            -0.0,
            3.0e38,
        ]);
        // SAFETY: AVX-512 F/BW/VL detected just above.
        let (h, b) = unsafe { (roundtrip::<f16>(&values), roundtrip::<bf16>(&values)) };
        for (k, v) in values.iter().enumerate() {
            let (hh, bb) = (f16::from_f32(*v), bf16::from_f32(*v));
            assert!(h[k].to_bits() == hh.to_bits() || (hh.is_nan() && h[k].is_nan()), "f16 {v}");
            assert!(b[k].to_bits() == bb.to_bits(), "bf16 {v}: {:x} vs {:x}", b[k].to_bits(), bb.to_bits());
        }
        // Widening back is exact.
        // SAFETY: AVX-512 F/BW/VL detected above.
        let (wh, wb) = unsafe { (widen(&h), widen(&b)) };
        for k in 0..values.len() {
            assert!(wh[k].to_bits() == h[k].to_f32().to_bits() || wh[k].is_nan());
            assert!(wb[k].to_bits() == b[k].to_f32().to_bits() || wb[k].is_nan());
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    fn widen<T: Lanes>(values: &[T]) -> Vec<f32> {
        let mut out = vec![0f32; values.len()];
        let (chunks, tail) = values.as_chunks::<LANES>();
        let (out_chunks, out_tail) = out.as_chunks_mut::<LANES>();
        for (c, o) in chunks.iter().zip(out_chunks) {
            store16_f32(o, load16(c));
        }
        store_partial_f32(out_tail, load_partial(tail));
        out
    }
}
