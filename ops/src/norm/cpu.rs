//! CPU kernels for `rms_norm` and `add_rms_norm`.
//!
//! Per row: one pass sums the squares (f32, several accumulators), a second scales by
//! `1/rms * gamma`. Rows run in chunks, in parallel for large inputs. `gamma` is widened to
//! f32 once per call. `add_rms_norm` keeps the rounded sum of its row in an f32 scratch row,
//! so the second pass reads it from L1 instead of re-adding and re-rounding.

use std::mem::MaybeUninit;

use candle_core::{DType, Result, Tensor, bail};

use super::{ADD_RMS_NORM, RMS_NORM};
use crate::host::{Element, tensor_from_vec, with_slice};
use crate::kernel::simd::{Avx512, Lanes};
use crate::kernel::{Rows, assume_init_vec, run_chunks, run_chunks2, uninit_vec, units_per_task};

/// Inputs of one chunk of rows.
struct Task<'a, T> {
    x: &'a [T],
    x_rows: &'a Rows,
    gamma: &'a [f32],
    eps: f32,
    /// Index of the first row of the chunk.
    first: usize,
}

pub(super) fn rms_norm<T: Lanes>(x: &Tensor, gamma: &Tensor, eps: f32, isa: Option<Avx512>) -> Result<Tensor> {
    let gamma = gamma.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let out = with_slice::<T, _>(x, RMS_NORM, |xs, layout| {
        let rows = Rows::new(layout, xs.len(), RMS_NORM, "x")?;
        let h = rows.len;
        // Checked by `super::check`; repeated because the writes below rely on it.
        if gamma.len() != h {
            bail!("{RMS_NORM}: `gamma` has {} elements for rows of {h}", gamma.len());
        }
        let mut out = uninit_vec::<T>(rows.count * h);
        run_chunks(&mut out, h, units_per_task(rows.count, 2 * h), |first, y| {
            let task = Task { x: xs, x_rows: &rows, gamma: &gamma, eps, first };
            match isa {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: an `Avx512` token exists only when the CPU supports AVX-512 F/BW/VL.
                Some(_) => unsafe { avx512::rms_norm_rows(&task, y) },
                _ => portable::rms_norm_rows(&task, y),
            }
        });
        // SAFETY: every chunk is a whole number of rows of `h` elements and the row kernels
        // store all `h` elements of each row (the vector loops cover the tail with a mask).
        Ok(unsafe { assume_init_vec(out) })
    })?;
    tensor_from_vec(out, x.dims())
}

pub(super) fn add_rms_norm<T: Lanes>(
    x: &Tensor,
    residual: &Tensor,
    gamma: &Tensor,
    eps: f32,
    isa: Option<Avx512>,
) -> Result<(Tensor, Tensor)> {
    let gamma = gamma.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let (y, s) = with_slice::<T, _>(x, ADD_RMS_NORM, |xs, x_layout| {
        with_slice::<T, _>(residual, ADD_RMS_NORM, |rs, r_layout| {
            let x_rows = Rows::new(x_layout, xs.len(), ADD_RMS_NORM, "x")?;
            let r_rows = Rows::new(r_layout, rs.len(), ADD_RMS_NORM, "residual")?;
            let h = x_rows.len;
            // Checked by `super::check`; repeated because the writes below rely on it.
            if gamma.len() != h || r_rows.len != h || r_rows.count != x_rows.count {
                bail!("{ADD_RMS_NORM}: `x`, `residual` and `gamma` disagree on the shape");
            }
            let mut y = uninit_vec::<T>(x_rows.count * h);
            let mut s = uninit_vec::<T>(x_rows.count * h);
            let per_task = units_per_task(x_rows.count, 3 * h);
            run_chunks2(&mut y, h, &mut s, h, per_task, |first, y, s| {
                let task = Task { x: xs, x_rows: &x_rows, gamma: &gamma, eps, first };
                let residual = (rs, &r_rows);
                let mut scratch = vec![0f32; h];
                match isa {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: an `Avx512` token exists only when the CPU supports AVX-512 F/BW/VL.
                    Some(_) => unsafe { avx512::add_rms_norm_rows(&task, residual, y, s, &mut scratch) },
                    _ => portable::add_rms_norm_rows(&task, residual, y, s, &mut scratch),
                }
            });
            // SAFETY: the chunks of `y` and `s` are whole rows and the row kernels store every
            // element of every row of both.
            Ok(unsafe { (assume_init_vec(y), assume_init_vec(s)) })
        })
    })?;
    Ok((tensor_from_vec(y, x.dims())?, tensor_from_vec(s, x.dims())?))
}

/// One row of [`add_rms_norm`] for fused consumers that never materialize the whole output:
/// writes `s = x + r` (as `T`) and `y = rms_norm(s) * gamma` as f32 holding the values rounded
/// to `T`, both exactly as `add_rms_norm` stores them. `scratch` holds at least one row of f32.
#[allow(clippy::too_many_arguments)]
pub(crate) fn add_rms_norm_row_into<T: Lanes>(
    x: &[T],
    r: &[T],
    gamma: &[f32],
    eps: f32,
    y: &mut [f32],
    s: &mut [MaybeUninit<T>],
    scratch: &mut [f32],
    isa: Option<Avx512>,
) {
    let h = gamma.len();
    assert!(x.len() == h && r.len() == h && y.len() == h && s.len() == h && scratch.len() >= h);
    let scratch = &mut scratch[..h];
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: an `Avx512` token exists only when the CPU supports AVX-512 F/BW/VL.
        Some(_) => unsafe {
            let inv = avx512::add_row(x, r, eps, s, scratch);
            avx512::scale_row_rounded::<T>(scratch, inv, gamma, y);
        },
        _ => {
            let inv = portable::add_row(x, r, eps, s, scratch);
            for ((y, sf), g) in y.iter_mut().zip(scratch.iter()).zip(gamma) {
                *y = T::from_f32(sf * inv * g).to_f32();
            }
        }
    }
}

#[inline]
fn inv_rms(sum_squares: f32, h: usize, eps: f32) -> f32 {
    1.0 / (sum_squares / h as f32 + eps).sqrt()
}

/// Scalar kernels for CPUs without AVX-512 (written so that the compiler can vectorize).
mod portable {
    use super::*;

    fn sum_squares(x: impl Iterator<Item = f32>) -> f32 {
        let mut acc = [0f32; 8];
        for (i, v) in x.enumerate() {
            acc[i % 8] += v * v;
        }
        acc.iter().sum()
    }

    pub(super) fn rms_norm_rows<T: Element>(t: &Task<'_, T>, out: &mut [MaybeUninit<T>]) {
        let h = t.gamma.len();
        for (k, y) in out.chunks_exact_mut(h).enumerate() {
            let x = t.x_rows.row(t.x, t.first + k);
            let inv = inv_rms(sum_squares(x.iter().map(|v| v.to_f32())), h, t.eps);
            for ((y, x), g) in y.iter_mut().zip(x).zip(t.gamma) {
                y.write(T::from_f32(x.to_f32() * inv * g));
            }
        }
    }

    pub(super) fn add_rms_norm_rows<T: Element>(
        t: &Task<'_, T>,
        (rs, r_rows): (&[T], &Rows),
        y_out: &mut [MaybeUninit<T>],
        s_out: &mut [MaybeUninit<T>],
        scratch: &mut [f32],
    ) {
        let h = t.gamma.len();
        for (k, (y, s)) in y_out.chunks_exact_mut(h).zip(s_out.chunks_exact_mut(h)).enumerate() {
            let (x, r) = (t.x_rows.row(t.x, t.first + k), r_rows.row(rs, t.first + k));
            add_rms_norm_row(x, r, t.gamma, t.eps, y, s, scratch);
        }
    }

    fn add_rms_norm_row<T: Element>(
        x: &[T],
        r: &[T],
        gamma: &[f32],
        eps: f32,
        y: &mut [MaybeUninit<T>],
        s: &mut [MaybeUninit<T>],
        scratch: &mut [f32],
    ) {
        let inv = add_row(x, r, eps, s, scratch);
        for ((y, sf), g) in y.iter_mut().zip(scratch.iter()).zip(gamma) {
            y.write(T::from_f32(sf * inv * g));
        }
    }

    /// The first pass of a row: `s = x + r` rounded to `T` (also kept in `scratch` as f32);
    /// returns `1 / rms(s)`.
    pub(super) fn add_row<T: Element>(
        x: &[T],
        r: &[T],
        eps: f32,
        s: &mut [MaybeUninit<T>],
        scratch: &mut [f32],
    ) -> f32 {
        for (((s, sf), x), r) in s.iter_mut().zip(scratch.iter_mut()).zip(x).zip(r) {
            let sum = T::from_f32(x.to_f32() + r.to_f32());
            s.write(sum);
            *sf = sum.to_f32();
        }
        inv_rms(sum_squares(scratch.iter().copied()), scratch.len(), eps)
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::*;
    use crate::kernel::simd::{
        LANES, load_partial, load16, round, store_partial, store_partial_f32, store16, store16_f32, sum,
    };

    /// Sum of squares of a row, two accumulators.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    fn sum_squares<T: Lanes>(x: &[T]) -> f32 {
        let (chunks, tail) = x.as_chunks::<LANES>();
        let (mut a0, mut a1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let mut pairs = chunks.chunks_exact(2);
        for pair in &mut pairs {
            let (v0, v1) = (load16(&pair[0]), load16(&pair[1]));
            a0 = _mm512_fmadd_ps(v0, v0, a0);
            a1 = _mm512_fmadd_ps(v1, v1, a1);
        }
        for c in pairs.remainder() {
            let v = load16(c);
            a0 = _mm512_fmadd_ps(v, v, a0);
        }
        let v = load_partial(tail);
        a1 = _mm512_fmadd_ps(v, v, a1);
        sum(_mm512_add_ps(a0, a1))
    }

    /// `y = x * inv * gamma` over one row.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    fn scale_row<S: Lanes, T: Lanes>(x: &[S], inv: f32, gamma: &[f32], y: &mut [MaybeUninit<T>]) {
        let inv = _mm512_set1_ps(inv);
        let (xc, xt) = x.as_chunks::<LANES>();
        let (gc, gt) = gamma.as_chunks::<LANES>();
        let (yc, yt) = y.as_chunks_mut::<LANES>();
        for ((x, g), y) in xc.iter().zip(gc).zip(yc) {
            store16(y, _mm512_mul_ps(_mm512_mul_ps(load16(x), inv), load16(g)));
        }
        if !yt.is_empty() {
            store_partial(yt, _mm512_mul_ps(_mm512_mul_ps(load_partial(xt), inv), load_partial(gt)));
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) fn rms_norm_rows<T: Lanes>(t: &Task<'_, T>, out: &mut [MaybeUninit<T>]) {
        let h = t.gamma.len();
        for (k, y) in out.chunks_exact_mut(h).enumerate() {
            let x = t.x_rows.row(t.x, t.first + k);
            scale_row(x, inv_rms(sum_squares(x), h, t.eps), t.gamma, y);
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) fn add_rms_norm_rows<T: Lanes>(
        t: &Task<'_, T>,
        (rs, r_rows): (&[T], &Rows),
        y_out: &mut [MaybeUninit<T>],
        s_out: &mut [MaybeUninit<T>],
        scratch: &mut [f32],
    ) {
        let h = t.gamma.len();
        for (k, (y, s)) in y_out.chunks_exact_mut(h).zip(s_out.chunks_exact_mut(h)).enumerate() {
            let (x, r) = (t.x_rows.row(t.x, t.first + k), r_rows.row(rs, t.first + k));
            add_rms_norm_row(x, r, t.gamma, t.eps, y, s, scratch);
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    fn add_rms_norm_row<T: Lanes>(
        x: &[T],
        r: &[T],
        gamma: &[f32],
        eps: f32,
        y: &mut [MaybeUninit<T>],
        s: &mut [MaybeUninit<T>],
        scratch: &mut [f32],
    ) {
        let inv = add_row(x, r, eps, s, scratch);
        scale_row(scratch, inv, gamma, y);
    }

    /// `y = round_T(x * inv * gamma)` over one row, kept as f32 (the values `scale_row` would
    /// store as `T`, widened back).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) fn scale_row_rounded<T: Lanes>(x: &[f32], inv: f32, gamma: &[f32], y: &mut [f32]) {
        let inv = _mm512_set1_ps(inv);
        let (xc, xt) = x.as_chunks::<LANES>();
        let (gc, gt) = gamma.as_chunks::<LANES>();
        let (yc, yt) = y.as_chunks_mut::<LANES>();
        for ((x, g), y) in xc.iter().zip(gc).zip(yc) {
            let v = round::<T>(_mm512_mul_ps(_mm512_mul_ps(load16(x), inv), load16(g)));
            store16_f32(y, v);
        }
        if !yt.is_empty() {
            let v = round::<T>(_mm512_mul_ps(_mm512_mul_ps(load_partial(xt), inv), load_partial(gt)));
            store_partial_f32(yt, v);
        }
    }

    /// The first pass of a row: `s = x + r` rounded to `T` (also kept in `scratch` as f32);
    /// returns `1 / rms(s)`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) fn add_row<T: Lanes>(x: &[T], r: &[T], eps: f32, s: &mut [MaybeUninit<T>], scratch: &mut [f32]) -> f32 {
        let (xc, xt) = x.as_chunks::<LANES>();
        let (rc, rt) = r.as_chunks::<LANES>();
        let (sc, st) = s.as_chunks_mut::<LANES>();
        let (fc, ft) = scratch.as_chunks_mut::<LANES>();
        let mut acc = _mm512_setzero_ps();
        for (((x, r), s), f) in xc.iter().zip(rc).zip(sc).zip(fc) {
            let v = round::<T>(_mm512_add_ps(load16(x), load16(r)));
            store16(s, v);
            store16_f32(f, v);
            acc = _mm512_fmadd_ps(v, v, acc);
        }
        if !st.is_empty() {
            let v = round::<T>(_mm512_add_ps(load_partial(xt), load_partial(rt)));
            store_partial(st, v);
            store_partial_f32(ft, v);
            acc = _mm512_fmadd_ps(v, v, acc);
        }
        inv_rms(sum(acc), scratch.len(), eps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Rng, Tolerance, assert_close, case_id};

    /// Both code paths (portable and AVX-512 when present) against the reference.
    #[test]
    fn portable_and_simd_paths_match_the_reference() -> Result<()> {
        let mut rng = Rng::fresh("norm::cpu");
        for isa in [None, Avx512::detect()] {
            for shape in [[3usize, 5, 72], [2, 3, 896]] {
                let dtype = DType::BF16;
                let x = rng.tensor(&shape, -2.0, 2.0, dtype)?;
                let r = rng.tensor(&shape, -2.0, 2.0, dtype)?;
                let g = rng.tensor(&shape[2..], 0.5, 1.5, dtype)?;
                let id = case_id("RMS_NORM", dtype, &shape, if isa.is_some() { "avx512" } else { "portable" });
                let got = rms_norm::<half::bf16>(&x, &g, 1e-6, isa)?;
                assert_close(&id, &got, &super::super::rms_norm_reference(&x, &g, 1e-6)?, Tolerance::for_dtype(dtype))?;
                let (y, s) = add_rms_norm::<half::bf16>(&x, &r, &g, 1e-6, isa)?;
                let (y_ref, s_ref) = super::super::add_rms_norm_reference(&x, &r, &g, 1e-6)?;
                assert_close(&id, &s, &s_ref, Tolerance { relative: 0.0 })?;
                assert_close(&id, &y, &y_ref, Tolerance::for_dtype(dtype))?;
            }
        }
        Ok(())
    }
}
