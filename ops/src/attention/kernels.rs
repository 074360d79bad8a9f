//! Attention micro-kernels on f32 tiles: score tiles, the online-softmax block update and the
//! probability-times-V accumulation. One portable implementation and one AVX-512
//! implementation selected at run time ([`Isa::detect`]); the drivers in `cpu.rs` are generic
//! over [`Kernels`] and monomorphized per ISA.
//!
//! The AVX-512 implementation lives in `avx512.rs`.
//!
//! A tile covers at most 4 query rows (`rows` in 1..=4), so a group of rows' accumulators
//! (4 rows x 64 columns = 16 AVX-512 registers) stays in registers across a whole key block.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

#[cfg(target_arch = "x86_64")]
pub(crate) use super::avx512::Lanes as SimdLoad;

/// Elements the SIMD kernels can load directly (AVX-512 on x86-64; nothing elsewhere).
#[cfg(not(target_arch = "x86_64"))]
pub(crate) trait SimdLoad {}
#[cfg(not(target_arch = "x86_64"))]
impl SimdLoad for f32 {}
#[cfg(not(target_arch = "x86_64"))]
impl SimdLoad for f16 {}
#[cfg(not(target_arch = "x86_64"))]
impl SimdLoad for bf16 {}
#[cfg(not(target_arch = "x86_64"))]
impl SimdLoad for i8 {}

/// Storage elements of q, k and v: the kernels read them directly ([`SimdLoad`]), widen
/// blocks of rows to f32 with [`KvElement::load_f32`], and read f32 storage in place. Besides
/// the float dtypes, `i8` is one: the raw values of an int8 KV cache, widened exactly (the
/// drivers apply the per-channel scale and offset outside the micro-kernels).
pub(crate) trait KvElement: Copy + Send + Sync + SimdLoad + 'static {
    /// The value as f32.
    fn widen(self) -> f32;

    /// `dst[r*width + t] = f32(src[r*ld + t])` for `r < rows`, `t < width`.
    fn load_f32<K: Kernels>(kern: K, src: &[Self], ld: usize, rows: usize, width: usize, dst: &mut [f32]);
}

impl KvElement for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }

    fn load_f32<K: Kernels>(_: K, src: &[Self], ld: usize, rows: usize, width: usize, dst: &mut [f32]) {
        for (r, row) in dst.chunks_exact_mut(width).take(rows).enumerate() {
            row.copy_from_slice(&src[r * ld..r * ld + width]);
        }
    }
}

impl KvElement for f16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }

    fn load_f32<K: Kernels>(kern: K, src: &[Self], ld: usize, rows: usize, width: usize, dst: &mut [f32]) {
        kern.widen_f16(src, ld, rows, width, dst);
    }
}

impl KvElement for bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }

    fn load_f32<K: Kernels>(kern: K, src: &[Self], ld: usize, rows: usize, width: usize, dst: &mut [f32]) {
        kern.widen_bf16(src, ld, rows, width, dst);
    }
}

impl KvElement for i8 {
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from(self)
    }

    fn load_f32<K: Kernels>(kern: K, src: &[Self], ld: usize, rows: usize, width: usize, dst: &mut [f32]) {
        kern.widen_i8(src, ld, rows, width, dst);
    }
}

/// The micro-kernels one ISA provides. All matrices are f32, row-major with explicit strides
/// (`ld*`); `rows` is 1..=4. Panics only on violated internal preconditions (slice bounds).
#[allow(clippy::too_many_arguments)]
pub(crate) trait Kernels: Copy + Send + Sync {
    /// `out[r*ldo + j] = sum_t q[r*d + t] * kt[t*ldk + j]` for `r < rows`, `j < ncols`
    /// (`kt` is a key block transposed to `[d, ncols]`; `ncols` is a multiple of 16).
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
    );

    /// `out[r*ldo + j] = sum_t q[r*d + t] * k[j*ldk + t]` for `r < rows`, `j < nkeys`
    /// (keys in their natural row-major layout and storage dtype, widened on load; used by
    /// decode, where each key is read once).
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
    );

    /// Online-softmax update of a tile of `rows` query rows over one key block. Row `r`'s
    /// scores are `s[r*lds .. r*lds + valid[r]]`, with `valid[r] <= live <= lds`. On return
    /// `s[r*lds + j] = exp(s[r*lds + j] - m_new)` for `j < valid[r]` and `0` for
    /// `valid[r] <= j < live`; `m[r]` becomes `m_new = max(m[r], the row's scores)`, `l[r]`
    /// becomes `l[r] * corr[r] + sum p`, and `corr[r] = exp(m_old - m_new)` is the factor
    /// that rescales the row's accumulator (1 when `valid[r] == 0`: the row is unchanged).
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
    );

    /// `dst[r*width + t] = f32(src[r*ld + t])` for `r < rows`, `t < width` (a block of rows
    /// widened into a dense f32 tile).
    fn widen_f16(self, src: &[f16], ld: usize, rows: usize, width: usize, dst: &mut [f32]);

    /// [`Kernels::widen_f16`] for bf16 storage.
    fn widen_bf16(self, src: &[bf16], ld: usize, rows: usize, width: usize, dst: &mut [f32]);

    /// [`Kernels::widen_f16`] for int8 storage (exact).
    fn widen_i8(self, src: &[i8], ld: usize, rows: usize, width: usize, dst: &mut [f32]);

    /// `acc[r*d + t] = acc[r*d + t] * corr[r] + sum_{j < nkeys} p[r*ldp + j] * v[j*ldv + t]`
    /// (`v` in its storage dtype, widened on load).
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
    );
}

/// The instruction set the kernels run with, chosen once per call.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Isa {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx512(super::avx512::Avx512),
}

impl Isa {
    /// AVX-512 when the CPU has it and `head_dim` is a multiple of 16, else portable.
    pub(crate) fn detect(head_dim: usize) -> Self {
        #[cfg(target_arch = "x86_64")]
        let simd = if head_dim.is_multiple_of(16) { super::avx512::Avx512::detect().map(Isa::Avx512) } else { None };
        #[cfg(not(target_arch = "x86_64"))]
        let simd = {
            let _ = head_dim;
            None
        };
        simd.unwrap_or(Isa::Portable)
    }
}

/// Plain Rust kernels: correct everywhere, written so the compiler can vectorize the
/// axpy-shaped inner loops.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Portable;

impl Kernels for Portable {
    fn widen_f16(self, src: &[f16], ld: usize, rows: usize, width: usize, dst: &mut [f32]) {
        for (r, row) in dst.chunks_exact_mut(width).take(rows).enumerate() {
            src[r * ld..r * ld + width].convert_to_f32_slice(row);
        }
    }

    fn widen_bf16(self, src: &[bf16], ld: usize, rows: usize, width: usize, dst: &mut [f32]) {
        for (r, row) in dst.chunks_exact_mut(width).take(rows).enumerate() {
            src[r * ld..r * ld + width].convert_to_f32_slice(row);
        }
    }

    fn widen_i8(self, src: &[i8], ld: usize, rows: usize, width: usize, dst: &mut [f32]) {
        for (r, row) in dst.chunks_exact_mut(width).take(rows).enumerate() {
            for (o, &x) in row.iter_mut().zip(&src[r * ld..r * ld + width]) {
                *o = f32::from(x);
            }
        }
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
        for r in 0..rows {
            let out_row = &mut out[r * ldo..r * ldo + ncols];
            out_row.fill(0.0);
            for (t, &qv) in q[r * d..(r + 1) * d].iter().enumerate() {
                for (o, &k) in out_row.iter_mut().zip(&kt[t * ldk..t * ldk + ncols]) {
                    *o += qv * k;
                }
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
        for j in 0..nkeys {
            let key = &k[j * ldk..j * ldk + d];
            for r in 0..rows {
                out[r * ldo + j] = dot_portable(&q[r * d..(r + 1) * d], key);
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
        for r in 0..rows {
            corr[r] = softmax_row(&mut s[r * lds..r * lds + live], valid[r], &mut m[r], &mut l[r]);
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
        for r in 0..rows {
            let acc_row = &mut acc[r * d..(r + 1) * d];
            acc_row.iter_mut().for_each(|a| *a *= corr[r]);
            for (j, &pj) in p[r * ldp..r * ldp + nkeys].iter().enumerate() {
                for (a, &x) in acc_row.iter_mut().zip(&v[j * ldv..j * ldv + d]) {
                    *a += pj * x.widen();
                }
            }
        }
    }
}

/// [`Kernels::softmax_rows`] for one row (`s` is the row's `live` scores).
fn softmax_row(s: &mut [f32], valid: usize, m: &mut f32, l: &mut f32) -> f32 {
    if valid == 0 {
        s.fill(0.0);
        return 1.0;
    }
    let (live, dead) = s.split_at_mut(valid);
    dead.fill(0.0);
    let m_new = live.iter().fold(*m, |a, &b| a.max(b));
    let corr = if m_new == *m { 1.0 } else { (*m - m_new).exp() };
    let mut sum = 0f32;
    for x in live.iter_mut() {
        *x = (*x - m_new).exp();
        sum += *x;
    }
    *l = *l * corr + sum;
    *m = m_new;
    corr
}

/// Dot product with 8 independent partial sums (vectorizable without reassociation flags).
fn dot_portable<E: KvElement>(a: &[f32], b: &[E]) -> f32 {
    let mut lanes = [0f32; 8];
    let (a8, a_rest) = a.as_chunks::<8>();
    let (b8, b_rest) = b.as_chunks::<8>();
    for (x, y) in a8.iter().zip(b8) {
        for i in 0..8 {
            lanes[i] += x[i] * y[i].widen();
        }
    }
    let tail: f32 = a_rest.iter().zip(b_rest).map(|(x, y)| x * y.widen()).sum();
    lanes.iter().sum::<f32>() + tail
}
