//! CPU kernel for `rope`.
//!
//! Work is cut by position `(b, s)`: the `N` heads of one position share one row of `cos`
//! and `sin`, widened to f32 once into scratch rows, and their output rows are contiguous.
//! Positions run in chunks, in parallel for large inputs.

use std::mem::MaybeUninit;

use candle_core::{Result, Tensor, bail};

use super::ROPE;
use crate::host::{Element, tensor_from_vec, with_slice};
use crate::kernel::simd::{Avx512, Lanes};
use crate::kernel::{Rows, assume_init_vec, run_chunks, uninit_vec, units_per_task};

/// Inputs of one chunk of positions.
struct Task<'a, T> {
    x: &'a [T],
    /// Rows of `x`: `B * S * N` rows of `D`.
    x_rows: &'a Rows,
    cos: &'a [T],
    sin: &'a [T],
    /// Rows of `cos` and `sin`: `B * S` rows of `D`.
    cos_rows: &'a Rows,
    sin_rows: &'a Rows,
    heads: usize,
    /// Index of the first position `b * S + s` of the chunk.
    first: usize,
}

pub(super) fn rope<T: Lanes>(x: &Tensor, cos: &Tensor, sin: &Tensor, isa: Option<Avx512>) -> Result<Tensor> {
    let heads = x.dims()[2];
    let out = with_slice::<T, _>(x, ROPE, |xs, x_layout| {
        with_slice::<T, _>(cos, ROPE, |cs, c_layout| {
            with_slice::<T, _>(sin, ROPE, |ss, s_layout| {
                let x_rows = Rows::new(x_layout, xs.len(), ROPE, "x")?;
                let cos_rows = Rows::new(c_layout, cs.len(), ROPE, "cos")?;
                let sin_rows = Rows::new(s_layout, ss.len(), ROPE, "sin")?;
                let (d, positions) = (x_rows.len, cos_rows.count);
                // Checked by `super::check`; repeated because the writes below rely on it.
                if d % 2 != 0
                    || cos_rows.len != d
                    || sin_rows.len != d
                    || sin_rows.count != positions
                    || x_rows.count != positions * heads
                {
                    bail!("{ROPE}: `x`, `cos` and `sin` disagree on the shape");
                }
                let mut out = uninit_vec::<T>(x_rows.count * d);
                let per_task = units_per_task(positions, heads * d + d);
                run_chunks(&mut out, heads * d, per_task, |first, chunk| {
                    let task = Task {
                        x: xs,
                        x_rows: &x_rows,
                        cos: cs,
                        sin: ss,
                        cos_rows: &cos_rows,
                        sin_rows: &sin_rows,
                        heads,
                        first,
                    };
                    let (mut cos_f, mut sin_f) = (vec![0f32; d], vec![0f32; d]);
                    match isa {
                        #[cfg(target_arch = "x86_64")]
                        // SAFETY: an `Avx512` token exists only when the CPU supports AVX-512 F/BW/VL.
                        Some(_) => unsafe { avx512::rope_positions(&task, chunk, &mut cos_f, &mut sin_f) },
                        _ => portable::rope_positions(&task, chunk, &mut cos_f, &mut sin_f),
                    }
                });
                // SAFETY: each chunk is a whole number of positions of `heads * d` elements and
                // the kernels store all `d` elements of every head row of every position.
                Ok(unsafe { assume_init_vec(out) })
            })
        })
    })?;
    tensor_from_vec(out, x.dims())
}

mod portable {
    use super::*;

    pub(super) fn rope_positions<T: Element>(
        t: &Task<'_, T>,
        out: &mut [MaybeUninit<T>],
        cos_f: &mut [f32],
        sin_f: &mut [f32],
    ) {
        let d = cos_f.len();
        let h = d / 2;
        for (k, position) in out.chunks_exact_mut(t.heads * d).enumerate() {
            let p = t.first + k;
            for (f, v) in cos_f.iter_mut().zip(t.cos_rows.row(t.cos, p)) {
                *f = v.to_f32();
            }
            for (f, v) in sin_f.iter_mut().zip(t.sin_rows.row(t.sin, p)) {
                *f = v.to_f32();
            }
            for (n, y) in position.chunks_exact_mut(d).enumerate() {
                let x = t.x_rows.row(t.x, p * t.heads + n);
                for i in 0..h {
                    let (a, b) = (x[i].to_f32(), x[i + h].to_f32());
                    y[i].write(T::from_f32(a * cos_f[i] - b * sin_f[i]));
                    y[i + h].write(T::from_f32(b * cos_f[i + h] + a * sin_f[i + h]));
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::*;
    use crate::kernel::simd::{LANES, load_partial, load16, store_partial, store_partial_f32, store16, store16_f32};

    /// Widens one row to f32.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    fn widen<T: Lanes>(src: &[T], dst: &mut [f32]) {
        let (sc, st) = src.as_chunks::<LANES>();
        let (dc, dt) = dst.as_chunks_mut::<LANES>();
        for (s, d) in sc.iter().zip(dc) {
            store16_f32(d, load16(s));
        }
        store_partial_f32(dt, load_partial(st));
    }

    /// The two rotated halves from `a = x[i]`, `b = x[i + h]` and the table at `i`, `i + h`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    fn rotate(a: __m512, b: __m512, c1: __m512, c2: __m512, s1: __m512, s2: __m512) -> (__m512, __m512) {
        (_mm512_fmsub_ps(a, c1, _mm512_mul_ps(b, s1)), _mm512_fmadd_ps(b, c2, _mm512_mul_ps(a, s2)))
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) fn rope_positions<T: Lanes>(
        t: &Task<'_, T>,
        out: &mut [MaybeUninit<T>],
        cos_f: &mut [f32],
        sin_f: &mut [f32],
    ) {
        let d = cos_f.len();
        let h = d / 2;
        for (k, position) in out.chunks_exact_mut(t.heads * d).enumerate() {
            let p = t.first + k;
            widen(t.cos_rows.row(t.cos, p), cos_f);
            widen(t.sin_rows.row(t.sin, p), sin_f);
            let ((c1, c1t), (c2, c2t)) = (cos_f[..h].as_chunks::<LANES>(), cos_f[h..].as_chunks::<LANES>());
            let ((s1, s1t), (s2, s2t)) = (sin_f[..h].as_chunks::<LANES>(), sin_f[h..].as_chunks::<LANES>());
            for (n, y) in position.chunks_exact_mut(d).enumerate() {
                let x = t.x_rows.row(t.x, p * t.heads + n);
                let ((x1, x1t), (x2, x2t)) = (x[..h].as_chunks::<LANES>(), x[h..].as_chunks::<LANES>());
                let (y1, y2) = y.split_at_mut(h);
                let ((y1, y1t), (y2, y2t)) = (y1.as_chunks_mut::<LANES>(), y2.as_chunks_mut::<LANES>());
                let table = c1.iter().zip(c2).zip(s1.iter().zip(s2));
                for (((a, b), ((c1, c2), (s1, s2))), (y1, y2)) in
                    x1.iter().zip(x2).zip(table).zip(y1.iter_mut().zip(y2))
                {
                    let (lo, hi) = rotate(load16(a), load16(b), load16(c1), load16(c2), load16(s1), load16(s2));
                    store16(y1, lo);
                    store16(y2, hi);
                }
                if !y1t.is_empty() {
                    let (c1, c2, s1, s2) = (load_partial(c1t), load_partial(c2t), load_partial(s1t), load_partial(s2t));
                    let (lo, hi) = rotate(load_partial(x1t), load_partial(x2t), c1, c2, s1, s2);
                    store_partial(y1t, lo);
                    store_partial(y2t, hi);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Rng, Tolerance, assert_close, case_id};
    use candle_core::DType;

    /// Both code paths (portable and AVX-512 when present) against the reference, with a
    /// head dimension whose half is not a multiple of 16 (masked tails).
    #[test]
    fn portable_and_simd_paths_match_the_reference() -> Result<()> {
        let mut rng = Rng::fresh("rope::cpu");
        for isa in [None, Avx512::detect()] {
            for (shape, d) in [([2usize, 3, 5], 40usize), ([1, 70, 14], 64)] {
                let dtype = DType::F16;
                let full = rng.tensor(&[shape[0], shape[1], shape[2] + 3, d], -2.0, 2.0, dtype)?;
                let x = full.narrow(2, 2, shape[2])?;
                let cos = rng.tensor(&[shape[0], shape[1], d], -1.0, 1.0, dtype)?;
                let sin = rng.tensor(&[shape[0], shape[1], d], -1.0, 1.0, dtype)?;
                let id = case_id("ROPE", dtype, x.dims(), if isa.is_some() { "avx512" } else { "portable" });
                let got = rope::<half::f16>(&x, &cos, &sin, isa)?;
                assert_close(&id, &got, &super::super::rope_reference(&x, &cos, &sin)?, Tolerance::for_dtype(dtype))?;
            }
        }
        Ok(())
    }
}
