//! AVX-512F kernels. Every function carries `#[target_feature(enable = "avx512f")]`; the
//! [`Avx512`] token, which only exists after run-time detection, is what makes calling
//! them sound. Unsafe is limited to unaligned loads and stores whose bounds are asserted
//! at the top of each function.

use std::arch::x86_64::*;

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use super::kernels::{Kernels, KvElement};

/// Storage elements an AVX-512 kernel loads 16 at a time, widened to f32.
pub(crate) trait Lanes: Copy {
    /// The 16 elements at `p`, as f32.
    ///
    /// # Safety
    /// AVX-512F must be available and `p .. p + 16` readable.
    unsafe fn load16(p: *const Self) -> __m512;
}

impl Lanes for f32 {
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn load16(p: *const Self) -> __m512 {
        // SAFETY: the caller guarantees 16 readable f32 at `p`.
        unsafe { _mm512_loadu_ps(p) }
    }
}

impl Lanes for f16 {
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn load16(p: *const Self) -> __m512 {
        // SAFETY: the caller guarantees 16 readable f16 (32 bytes) at `p`.
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p.cast::<__m256i>())) }
    }
}

impl Lanes for bf16 {
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn load16(p: *const Self) -> __m512 {
        // SAFETY: the caller guarantees 16 readable bf16 (32 bytes) at `p`; a bf16 is the high
        // half of the f32 with the same bits.
        unsafe {
            let bits = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast::<__m256i>()));
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(bits))
        }
    }
}

impl Lanes for i8 {
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn load16(p: *const Self) -> __m512 {
        // SAFETY: the caller guarantees 16 readable i8 (16 bytes) at `p`; sign extension to
        // i32 and the conversion to f32 are exact.
        unsafe { _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p.cast::<__m128i>()))) }
    }
}

/// Proof that the running CPU supports AVX-512F: only [`Avx512::detect`] creates one.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Avx512 {
    _detected: (),
}

impl Avx512 {
    pub(crate) fn detect() -> Option<Self> {
        is_x86_feature_detected!("avx512f").then_some(Self { _detected: () })
    }
}

impl Kernels for Avx512 {
    fn widen_f16(self, src: &[f16], ld: usize, rows: usize, width: usize, dst: &mut [f32]) {
        // SAFETY: the token proves AVX-512F support (see `scores`).
        unsafe { widen::<false>(src.reinterpret_cast(), ld, rows, width, dst) }
    }

    fn widen_bf16(self, src: &[bf16], ld: usize, rows: usize, width: usize, dst: &mut [f32]) {
        // SAFETY: the token proves AVX-512F support (see `scores`).
        unsafe { widen::<true>(src.reinterpret_cast(), ld, rows, width, dst) }
    }

    fn widen_i8(self, src: &[i8], ld: usize, rows: usize, width: usize, dst: &mut [f32]) {
        // SAFETY: the token proves AVX-512F support (see `scores`).
        unsafe { widen_i8(src, ld, rows, width, dst) }
    }

    fn scores(
        self,
        rows: usize,
        q: &[f32],
        d: usize,
        kt: &[f32],
        ldk: usize,
        ncols: usize,
        out: &mut [f32],
        ldo: usize,
    ) {
        // SAFETY: an `Avx512` token exists only after `is_x86_feature_detected!("avx512f")`
        // returned true, so the target feature of the callee is present.
        unsafe {
            match rows {
                1 => scores_tile::<1>(q, d, kt, ldk, ncols, out, ldo),
                2 => scores_tile::<2>(q, d, kt, ldk, ncols, out, ldo),
                3 => scores_tile::<3>(q, d, kt, ldk, ncols, out, ldo),
                4 => scores_tile::<4>(q, d, kt, ldk, ncols, out, ldo),
                _ => unreachable!("score tiles have 1..=4 rows, got {rows}"),
            }
        }
    }

    fn dot<E: KvElement>(
        self,
        rows: usize,
        q: &[f32],
        d: usize,
        k: &[E],
        ldk: usize,
        nkeys: usize,
        out: &mut [f32],
        ldo: usize,
    ) {
        // SAFETY: the token proves AVX-512F support (see `scores`).
        unsafe {
            match (rows, d) {
                (1, 64) => dot_tile::<E, 1, 4>(q, k, ldk, nkeys, out, ldo),
                (2, 64) => dot_tile::<E, 2, 4>(q, k, ldk, nkeys, out, ldo),
                (3, 64) => dot_tile::<E, 3, 4>(q, k, ldk, nkeys, out, ldo),
                (4, 64) => dot_tile::<E, 4, 4>(q, k, ldk, nkeys, out, ldo),
                (1, 128) => dot_tile::<E, 1, 8>(q, k, ldk, nkeys, out, ldo),
                (2, 128) => dot_tile::<E, 2, 8>(q, k, ldk, nkeys, out, ldo),
                (3, 128) => dot_tile::<E, 3, 8>(q, k, ldk, nkeys, out, ldo),
                (4, 128) => dot_tile::<E, 4, 8>(q, k, ldk, nkeys, out, ldo),
                (1, _) => dot_tile_any::<E, 1>(q, d, k, ldk, nkeys, out, ldo),
                (2, _) => dot_tile_any::<E, 2>(q, d, k, ldk, nkeys, out, ldo),
                (3, _) => dot_tile_any::<E, 3>(q, d, k, ldk, nkeys, out, ldo),
                (4, _) => dot_tile_any::<E, 4>(q, d, k, ldk, nkeys, out, ldo),
                _ => unreachable!("dot tiles have 1..=4 rows, got {rows}"),
            }
        }
    }

    fn softmax_rows(
        self,
        rows: usize,
        s: &mut [f32],
        lds: usize,
        live: usize,
        valid: &[usize],
        m: &mut [f32],
        l: &mut [f32],
        corr: &mut [f32],
    ) {
        // SAFETY: the token proves AVX-512F support (see `scores`).
        unsafe {
            match rows {
                1 => softmax_rows::<1>(s, lds, live, valid, m, l, corr),
                2 => softmax_rows::<2>(s, lds, live, valid, m, l, corr),
                3 => softmax_rows::<3>(s, lds, live, valid, m, l, corr),
                4 => softmax_rows::<4>(s, lds, live, valid, m, l, corr),
                _ => unreachable!("softmax tiles have 1..=4 rows, got {rows}"),
            }
        }
    }

    fn pv<E: KvElement>(
        self,
        rows: usize,
        p: &[f32],
        ldp: usize,
        nkeys: usize,
        v: &[E],
        ldv: usize,
        d: usize,
        corr: &[f32],
        acc: &mut [f32],
    ) {
        // SAFETY: the token proves AVX-512F support (see `scores`).
        unsafe {
            match rows {
                1 => pv_tile::<E, 1>(p, ldp, nkeys, v, ldv, d, corr, acc),
                2 => pv_tile::<E, 2>(p, ldp, nkeys, v, ldv, d, corr, acc),
                3 => pv_tile::<E, 3>(p, ldp, nkeys, v, ldv, d, corr, acc),
                4 => pv_tile::<E, 4>(p, ldp, nkeys, v, ldv, d, corr, acc),
                _ => unreachable!("pv tiles have 1..=4 rows, got {rows}"),
            }
        }
    }
}

/// Widens a block of rows of int8 values to f32 (exact).
#[target_feature(enable = "avx512f")]
fn widen_i8(src: &[i8], ld: usize, rows: usize, width: usize, dst: &mut [f32]) {
    assert!(dst.len() >= rows * width);
    assert!(rows == 0 || src.len() >= (rows - 1) * ld + width);
    let full = width / 16 * 16;
    let (sp, dp) = (src.as_ptr(), dst.as_mut_ptr());
    for r in 0..rows {
        for t in (0..full).step_by(16) {
            // SAFETY: t + 16 <= width: r*ld + t + 16 <= src.len() and r*width + t + 16 <=
            // dst.len() (asserted above).
            unsafe { _mm512_storeu_ps(dp.add(r * width + t), i8::load16(sp.add(r * ld + t))) };
        }
        for t in full..width {
            dst[r * width + t] = f32::from(src[r * ld + t]);
        }
    }
}

/// Widens a block of rows of 16-bit float bit patterns to f32: IEEE half with `vcvtph2ps`
/// (`BF16 == false`), or bfloat16 (`BF16 == true`: zero-extend and shift into the high half).
#[target_feature(enable = "avx512f")]
fn widen<const BF16: bool>(src: &[u16], ld: usize, rows: usize, width: usize, dst: &mut [f32]) {
    assert!(dst.len() >= rows * width);
    assert!(rows == 0 || src.len() >= (rows - 1) * ld + width);
    let full = width / 16 * 16;
    let (sp, dp) = (src.as_ptr(), dst.as_mut_ptr());
    for r in 0..rows {
        for t in (0..full).step_by(16) {
            // SAFETY: t + 16 <= width: r*ld + t + 16 <= src.len() and r*width + t + 16 <=
            // dst.len() (asserted above); 16 u16 values are the 32 bytes read.
            unsafe {
                let half = _mm256_loadu_si256(sp.add(r * ld + t).cast::<__m256i>());
                let wide = if BF16 {
                    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(half)))
                } else {
                    _mm512_cvtph_ps(half)
                };
                _mm512_storeu_ps(dp.add(r * width + t), wide);
            }
        }
        for t in full..width {
            let x = src[r * ld + t];
            dst[r * width + t] = if BF16 { bf16::from_bits(x).to_f32() } else { f16::from_bits(x).to_f32() };
        }
    }
}

/// R query rows x `ncols` keys of scores from a transposed key block, 32 keys at a time
/// (2 R accumulators), then 16.
#[target_feature(enable = "avx512f")]
fn scores_tile<const R: usize>(q: &[f32], d: usize, kt: &[f32], ldk: usize, ncols: usize, out: &mut [f32], ldo: usize) {
    assert!(d > 0 && ncols.is_multiple_of(16) && q.len() >= R * d);
    assert!(ncols == 0 || (kt.len() >= (d - 1) * ldk + ncols && out.len() >= (R - 1) * ldo + ncols));
    let (qp, kp, op) = (q.as_ptr(), kt.as_ptr(), out.as_mut_ptr());
    let mut j = 0;
    while j + 32 <= ncols {
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        for t in 0..d {
            // SAFETY: t < d and j + 32 <= ncols, so t*ldk + j + 32 <= (d-1)*ldk + ncols <=
            // kt.len(); r*d + t < R*d <= q.len() (both asserted above).
            unsafe {
                let k0 = _mm512_loadu_ps(kp.add(t * ldk + j));
                let k1 = _mm512_loadu_ps(kp.add(t * ldk + j + 16));
                for (r, a) in acc.iter_mut().enumerate() {
                    let qb = _mm512_set1_ps(*qp.add(r * d + t));
                    a[0] = _mm512_fmadd_ps(qb, k0, a[0]);
                    a[1] = _mm512_fmadd_ps(qb, k1, a[1]);
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            // SAFETY: r*ldo + j + 32 <= (R-1)*ldo + ncols <= out.len() (asserted above).
            unsafe {
                _mm512_storeu_ps(op.add(r * ldo + j), a[0]);
                _mm512_storeu_ps(op.add(r * ldo + j + 16), a[1]);
            }
        }
        j += 32;
    }
    if j < ncols {
        let mut acc = [_mm512_setzero_ps(); R];
        for t in 0..d {
            // SAFETY: j + 16 == ncols here, so t*ldk + j + 16 <= kt.len(); q as above.
            unsafe {
                let k0 = _mm512_loadu_ps(kp.add(t * ldk + j));
                for (r, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(_mm512_set1_ps(*qp.add(r * d + t)), k0, *a);
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            // SAFETY: r*ldo + j + 16 <= (R-1)*ldo + ncols <= out.len().
            unsafe { _mm512_storeu_ps(op.add(r * ldo + j), *a) };
        }
    }
}

/// Scores of R query rows against `nkeys` row-major keys, 16 keys at a time: each key is loaded
/// (and widened from its storage dtype) once for all R rows, each (row, key) partial-sum vector
/// is a chain of `DC` = d / 16 FMAs, and a row's 16 vectors are folded into one vector of 16
/// scores by [`reduce16`] (2 shuffles and 1 add per key instead of a full horizontal sum each).
#[target_feature(enable = "avx512f")]
fn dot_tile<E: Lanes, const R: usize, const DC: usize>(
    q: &[f32],
    k: &[E],
    ldk: usize,
    nkeys: usize,
    out: &mut [f32],
    ldo: usize,
) {
    let d = 16 * DC;
    assert!(q.len() >= R * d);
    assert!(nkeys == 0 || (k.len() >= (nkeys - 1) * ldk + d && out.len() >= (R - 1) * ldo + nkeys));
    let (qp, kp, op) = (q.as_ptr(), k.as_ptr(), out.as_mut_ptr());
    let mut parts = [[_mm512_setzero_ps(); 16]; R];
    for j in (0..nkeys).step_by(16) {
        let count = (nkeys - j).min(16);
        for kk in 0..count {
            let row = (j + kk) * ldk;
            let mut key = [_mm512_setzero_ps(); DC];
            for (c, kv) in key.iter_mut().enumerate() {
                // SAFETY: j + kk < nkeys, so row + 16c + 16 <= (nkeys-1)*ldk + d <= k.len().
                *kv = unsafe { E::load16(kp.add(row + 16 * c)) };
            }
            for (r, rows) in parts.iter_mut().enumerate() {
                let mut acc = _mm512_setzero_ps();
                for (c, kv) in key.iter().enumerate() {
                    // SAFETY: r*d + 16c + 16 <= R*d <= q.len().
                    acc = _mm512_fmadd_ps(unsafe { _mm512_loadu_ps(qp.add(r * d + 16 * c)) }, *kv, acc);
                }
                rows[kk] = acc;
            }
        }
        let mask = lanes_below(count, 0);
        for (r, rows) in parts.iter_mut().enumerate() {
            // Lanes past `count` come from stale vectors and are not stored.
            // SAFETY: only lanes < count are written: r*ldo + j + count <= (R-1)*ldo + nkeys
            // <= out.len().
            unsafe { _mm512_mask_storeu_ps(op.add(r * ldo + j), mask, reduce16(rows)) };
        }
    }
}

/// [`dot_tile`] for any head_dim that is a multiple of 16 (query reloaded from L1).
#[target_feature(enable = "avx512f")]
fn dot_tile_any<E: Lanes, const R: usize>(
    q: &[f32],
    d: usize,
    k: &[E],
    ldk: usize,
    nkeys: usize,
    out: &mut [f32],
    ldo: usize,
) {
    assert!(d.is_multiple_of(16) && q.len() >= R * d);
    assert!(nkeys == 0 || (k.len() >= (nkeys - 1) * ldk + d && out.len() >= (R - 1) * ldo + nkeys));
    let (qp, kp, op) = (q.as_ptr(), k.as_ptr(), out.as_mut_ptr());
    for j in (0..nkeys).step_by(16) {
        let count = (nkeys - j).min(16);
        for r in 0..R {
            let mut parts = [_mm512_setzero_ps(); 16];
            for (kk, part) in parts.iter_mut().enumerate().take(count) {
                let row = (j + kk) * ldk;
                let mut acc = _mm512_setzero_ps();
                for t in (0..d).step_by(16) {
                    // SAFETY: t + 16 <= d: row + t + 16 <= k.len(), r*d + t + 16 <= q.len().
                    acc =
                        unsafe { _mm512_fmadd_ps(_mm512_loadu_ps(qp.add(r * d + t)), E::load16(kp.add(row + t)), acc) };
                }
                *part = acc;
            }
            let mask = lanes_below(count, 0);
            // SAFETY: as in `dot_tile`.
            unsafe { _mm512_mask_storeu_ps(op.add(r * ldo + j), mask, reduce16(&parts)) };
        }
    }
}

/// Lane i of the result is the horizontal sum of `v[i]` (a transposing reduction tree:
/// 30 shuffles and 15 adds for 16 sums).
#[target_feature(enable = "avx512f")]
#[inline]
fn reduce16(v: &[__m512; 16]) -> __m512 {
    // Level 1: pairs (a, b) -> per 128-bit block [a, b, a, b] partial sums.
    let mut l1 = [_mm512_setzero_ps(); 8];
    for (i, x) in l1.iter_mut().enumerate() {
        let (a, b) = (v[2 * i], v[2 * i + 1]);
        *x = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    }
    // Level 2: -> per 128-bit block [a, b, c, d].
    let mut l2 = [_mm512_setzero_ps(); 4];
    for (i, x) in l2.iter_mut().enumerate() {
        let (a, b) = (_mm512_castps_pd(l1[2 * i]), _mm512_castps_pd(l1[2 * i + 1]));
        *x = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    // Levels 3 and 4: sum the four 128-bit blocks, gathering groups of 4 keys per block.
    let lo = fold_blocks(l2[0], l2[1]);
    let hi = fold_blocks(l2[2], l2[3]);
    fold_blocks(lo, hi)
}

/// Blocks [a0+a1, a2+a3, b0+b1, b2+b3] of two vectors' 128-bit blocks a0..a3, b0..b3.
#[target_feature(enable = "avx512f")]
#[inline]
fn fold_blocks(a: __m512, b: __m512) -> __m512 {
    _mm512_add_ps(_mm512_shuffle_f32x4::<0x88>(a, b), _mm512_shuffle_f32x4::<0xDD>(a, b))
}

/// Lanes of 16-column chunk `c` that lie below `limit`.
fn lanes_below(limit: usize, c: usize) -> __mmask16 {
    let n = limit.saturating_sub(16 * c).min(16);
    ((1u32 << n) - 1) as __mmask16
}

/// [`Kernels::softmax_rows`] for R rows at once, so the R max/exp/sum chains interleave.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
fn softmax_rows<const R: usize>(
    s: &mut [f32],
    lds: usize,
    live: usize,
    valid: &[usize],
    m: &mut [f32],
    l: &mut [f32],
    corr: &mut [f32],
) {
    assert!(valid.len() >= R && m.len() >= R && l.len() >= R && corr.len() >= R);
    assert!(live <= lds && s.len() >= (R - 1) * lds + live);
    assert!(valid[..R].iter().all(|&v| v <= live));
    let sp = s.as_mut_ptr();
    let chunks = live.div_ceil(16);
    let mut vmax = [_mm512_set1_ps(f32::NEG_INFINITY); R];
    for c in 0..chunks {
        for (r, vm) in vmax.iter_mut().enumerate() {
            let lanes = lanes_below(valid[r], c);
            // SAFETY: enabled lanes are columns below valid[r] <= live of row r, inside
            // `s` (r*lds + live <= s.len(), asserted above); the others are not accessed.
            let x = unsafe { _mm512_maskz_loadu_ps(lanes, sp.add(r * lds + 16 * c)) };
            *vm = _mm512_mask_max_ps(*vm, lanes, *vm, x);
        }
    }
    let mut m_new = [0f32; R];
    for (r, mn) in m_new.iter_mut().enumerate() {
        *mn = m[r].max(_mm512_reduce_max_ps(vmax[r]));
    }
    let mut vsum = [_mm512_setzero_ps(); R];
    for c in 0..chunks {
        let in_live = lanes_below(live, c);
        for (r, sum) in vsum.iter_mut().enumerate() {
            let lanes = lanes_below(valid[r], c);
            // SAFETY: loads touch columns below valid[r], stores columns below live, of
            // row r: all inside `s` (see above).
            unsafe {
                let ptr = sp.add(r * lds + 16 * c);
                let x = _mm512_maskz_loadu_ps(lanes, ptr);
                let p = _mm512_maskz_mov_ps(lanes, exp_ps(_mm512_sub_ps(x, _mm512_set1_ps(m_new[r]))));
                _mm512_mask_storeu_ps(ptr, in_live, p);
                *sum = _mm512_add_ps(*sum, p);
            }
        }
    }
    for r in 0..R {
        // The running max usually stands after the first blocks: skip the exp then (this
        // also keeps rows with no valid key, m = -inf, at corr = 1).
        corr[r] = if m_new[r] == m[r] { 1.0 } else { (m[r] - m_new[r]).exp() };
        l[r] = l[r] * corr[r] + _mm512_reduce_add_ps(vsum[r]);
        m[r] = m_new[r];
    }
}

/// acc (R rows x d) = acc * corr + P (R x nkeys) V (nkeys x d), 64 columns at a time
/// (4 R accumulators held across the key loop), then 16.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
fn pv_tile<E: Lanes, const R: usize>(
    p: &[f32],
    ldp: usize,
    nkeys: usize,
    v: &[E],
    ldv: usize,
    d: usize,
    corr: &[f32],
    acc: &mut [f32],
) {
    assert!(d.is_multiple_of(16) && corr.len() >= R && acc.len() >= R * d);
    assert!(nkeys == 0 || (p.len() >= (R - 1) * ldp + nkeys && v.len() >= (nkeys - 1) * ldv + d));
    let mut t = 0;
    while t < d {
        if d - t >= 64 {
            pv_columns::<E, R, 4>(p, ldp, nkeys, v, ldv, d, t, corr, acc);
            t += 64;
        } else {
            pv_columns::<E, R, 1>(p, ldp, nkeys, v, ldv, d, t, corr, acc);
            t += 16;
        }
    }
}

/// Columns `t0 .. t0 + 16 C` of [`pv_tile`]; bounds as asserted there, plus t0 + 16C <= d.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
#[inline]
fn pv_columns<E: Lanes, const R: usize, const C: usize>(
    p: &[f32],
    ldp: usize,
    nkeys: usize,
    v: &[E],
    ldv: usize,
    d: usize,
    t0: usize,
    corr: &[f32],
    acc: &mut [f32],
) {
    assert!(t0 + 16 * C <= d && acc.len() >= R * d && corr.len() >= R);
    assert!(nkeys == 0 || (p.len() >= (R - 1) * ldp + nkeys && v.len() >= (nkeys - 1) * ldv + d));
    let (pp, vp, ap) = (p.as_ptr(), v.as_ptr(), acc.as_mut_ptr());
    let mut a = [[_mm512_setzero_ps(); C]; R];
    for (r, row) in a.iter_mut().enumerate() {
        let c = _mm512_set1_ps(corr[r]);
        for (ci, x) in row.iter_mut().enumerate() {
            // SAFETY: r*d + t0 + 16ci + 16 <= r*d + d <= R*d <= acc.len().
            *x = _mm512_mul_ps(unsafe { _mm512_loadu_ps(ap.add(r * d + t0 + 16 * ci)) }, c);
        }
    }
    for j in 0..nkeys {
        let mut vv = [_mm512_setzero_ps(); C];
        for (ci, x) in vv.iter_mut().enumerate() {
            // SAFETY: j*ldv + t0 + 16ci + 16 <= (nkeys-1)*ldv + d <= v.len().
            *x = unsafe { E::load16(vp.add(j * ldv + t0 + 16 * ci)) };
        }
        for (r, row) in a.iter_mut().enumerate() {
            // SAFETY: r*ldp + j < (R-1)*ldp + nkeys <= p.len().
            let pb = _mm512_set1_ps(unsafe { *pp.add(r * ldp + j) });
            for (x, &vc) in row.iter_mut().zip(&vv) {
                *x = _mm512_fmadd_ps(pb, vc, *x);
            }
        }
    }
    for (r, row) in a.iter().enumerate() {
        for (ci, x) in row.iter().enumerate() {
            // SAFETY: as for the loads from `acc` above.
            unsafe { _mm512_storeu_ps(ap.add(r * d + t0 + 16 * ci), *x) };
        }
    }
}

/// e^x for 16 lanes: x = n ln2 + r with |r| <= ln2/2, a degree-6 polynomial for e^r
/// (Cephes expf coefficients, about 1 ulp), and 2^n applied exactly with `scalef`. Inputs
/// above 88 are clamped; results below e^-87 (where f32 turns subnormal) and NaN inputs give 0:
/// subnormal probabilities would cost microcode assists in the P V FMAs and are far below f32
/// resolution next to the row maximum (e^0) anyway.
#[target_feature(enable = "avx512f")]
#[inline]
#[allow(clippy::excessive_precision)]
fn exp_ps(x: __m512) -> __m512 {
    let normal = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, _mm512_set1_ps(-87.0));
    let x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0)), _mm512_set1_ps(88.0));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
        x,
        _mm512_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_375), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
    let mut y = _mm512_set1_ps(1.987_569_15e-4);
    for c in [1.398_199_95e-3, 8.333_451_9e-3, 4.166_579_6e-2, 1.666_666_55e-1, 5.000_000_1e-1] {
        y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(c));
    }
    let y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0)));
    _mm512_maskz_mov_ps(normal, _mm512_scalef_ps(y, n))
}
