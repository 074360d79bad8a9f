//! CPU kernel for `swiglu`: one pass per row, `silu(gate) * up` with the AVX-512 `exp` of
//! [`crate::kernel::simd::exp`] and a refined reciprocal; rows in chunks, in parallel for
//! large inputs.

use std::mem::MaybeUninit;

use candle_core::{Result, Tensor, bail};

use super::SWIGLU;
use crate::host::{Element, tensor_from_vec, with_slice};
use crate::kernel::simd::{Avx512, Lanes};
use crate::kernel::{Rows, assume_init_vec, run_chunks, uninit_vec, units_per_task};

/// Cost of one output element in the units of `kernel::SERIAL_WORK` (about one element of
/// `rms_norm`): measured at ~2x with the vector exp.
const WORK_PER_ELEMENT: usize = 2;

pub(super) fn swiglu<T: Lanes>(x: &Tensor, out_dims: &[usize], isa: Option<Avx512>) -> Result<Tensor> {
    let out = with_slice::<T, _>(x, SWIGLU, |xs, layout| {
        let rows = Rows::new(layout, xs.len(), SWIGLU, "x")?;
        let inner = rows.len / 2;
        // Checked by `super::check`; repeated because the writes below rely on it.
        if rows.len % 2 != 0 || rows.count * inner != out_dims.iter().product::<usize>() {
            bail!("{SWIGLU}: output shape {out_dims:?} does not match the input rows");
        }
        let mut out = uninit_vec::<T>(rows.count * inner);
        run_chunks(&mut out, inner, units_per_task(rows.count, WORK_PER_ELEMENT * inner), |first, chunk| {
            for (k, y) in chunk.chunks_exact_mut(inner).enumerate() {
                let (gate, up) = rows.row(xs, first + k).split_at(inner);
                match isa {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: an `Avx512` token exists only when the CPU supports AVX-512 F/BW/VL.
                    Some(_) => unsafe { avx512::swiglu_row(gate, up, y) },
                    _ => portable::swiglu_row(gate, up, y),
                }
            }
        });
        // SAFETY: each chunk is a whole number of rows of `inner` elements and the row kernels
        // store every element of their row.
        Ok(unsafe { assume_init_vec(out) })
    })?;
    tensor_from_vec(out, out_dims)
}

/// `y[i] = silu(gate[i]) * up[i]` for one row, rounded to `T` exactly as [`swiglu`] stores it
/// (for fused consumers that never materialize the whole output).
pub(crate) fn swiglu_row_into<T: Lanes>(gate: &[T], up: &[T], y: &mut [T], isa: Option<Avx512>) {
    assert!(gate.len() == y.len() && up.len() == y.len());
    // SAFETY: `MaybeUninit<T>` has the layout of `T`, and the kernels only write `y`.
    let y = unsafe { &mut *(y as *mut [T] as *mut [MaybeUninit<T>]) };
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the token exists only when the CPU supports AVX-512 F/BW/VL.
        Some(_) => unsafe { avx512::swiglu_row(gate, up, y) },
        _ => portable::swiglu_row(gate, up, y),
    }
}

/// `silu(a) * b` in f32, as the portable kernel computes it.
pub(crate) fn silu_mul(a: f32, b: f32) -> f32 {
    a / (1.0 + (-a).exp()) * b
}

mod portable {
    use super::*;

    pub(super) fn swiglu_row<T: Element>(gate: &[T], up: &[T], y: &mut [MaybeUninit<T>]) {
        for ((y, a), b) in y.iter_mut().zip(gate).zip(up) {
            y.write(T::from_f32(silu_mul(a.to_f32(), b.to_f32())));
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use std::arch::x86_64::*;

    use super::*;
    use crate::kernel::simd::{LANES, exp_above, load_partial, load16, store_partial, store16};

    /// `silu(a) * b` for 16 lanes.
    ///
    /// `sigmoid(a)` is computed from `t = exp(-|a|)` in (0, 1]: `1 / (1 + t)` for `a >= 0`
    /// and `t / (1 + t)` for `a < 0`, so the denominator stays in (1, 2] for every input
    /// (no overflow, no infinity) and its reciprocal comes from `vrcp14ps` refined by one
    /// Newton step (relative error ~1e-8 before rounding) instead of a slow `vdivps`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(crate) fn swiglu16(a: __m512, b: __m512) -> __m512 {
        let one = _mm512_set1_ps(1.0);
        // -|a|: the sign bit set.
        let minus_abs = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(a), _mm512_set1_epi32(i32::MIN)));
        let t = exp_above(minus_abs);
        let d = _mm512_add_ps(one, t);
        let r = _mm512_rcp14_ps(d);
        let r = _mm512_fmadd_ps(r, _mm512_fnmadd_ps(d, r, one), r);
        let negative = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(a, _mm512_setzero_ps());
        let sigmoid = _mm512_mask_mul_ps(r, negative, r, t);
        _mm512_mul_ps(_mm512_mul_ps(a, sigmoid), b)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) fn swiglu_row<T: Lanes>(gate: &[T], up: &[T], y: &mut [MaybeUninit<T>]) {
        let (gc, gt) = gate.as_chunks::<LANES>();
        let (uc, ut) = up.as_chunks::<LANES>();
        let (yc, yt) = y.as_chunks_mut::<LANES>();
        for ((g, u), y) in gc.iter().zip(uc).zip(yc) {
            store16(y, swiglu16(load16(g), load16(u)));
        }
        if !yt.is_empty() {
            store_partial(yt, swiglu16(load_partial(gt), load_partial(ut)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Rng, Tolerance, assert_close, case_id};
    use candle_core::DType;

    /// Both code paths (portable and AVX-512 when present) against the reference, f32 with a
    /// wide input range (exp accuracy) and an odd inner size (masked tail).
    #[test]
    fn portable_and_simd_paths_match_the_reference() -> Result<()> {
        let mut rng = Rng::fresh("swiglu::cpu");
        for isa in [None, Avx512::detect()] {
            for shape in [[3usize, 2 * 37], [70, 2 * 896]] {
                let x = rng.tensor(&shape, -30.0, 30.0, DType::F32)?;
                let id = case_id("SWIGLU", DType::F32, &shape, if isa.is_some() { "avx512" } else { "portable" });
                let got = swiglu::<f32>(&x, &[shape[0], shape[1] / 2], isa)?;
                assert_close(&id, &got, &super::super::swiglu_reference(&x)?, Tolerance::for_dtype(DType::F32))?;
            }
        }
        Ok(())
    }

    /// Element by element against f64, over the whole range where silu is not 0 or `a`.
    #[test]
    fn simd_silu_is_accurate_per_element() -> Result<()> {
        let Some(isa) = Avx512::detect() else { return Ok(()) };
        let n = 1 << 16;
        let gate: Vec<f32> = (0..n).map(|i| -90.0 + 180.0 * i as f32 / n as f32).collect();
        let x = Tensor::from_vec([gate.clone(), vec![1f32; n]].concat(), (1, 2 * n), &candle_core::Device::Cpu)?;
        let got = swiglu::<f32>(&x, &[1, n], Some(isa))?.flatten_all()?.to_vec1::<f32>()?;
        for (a, y) in gate.iter().zip(got) {
            let a = *a as f64;
            let want = a / (1.0 + (-a).exp());
            let err = (y as f64 - want).abs() / want.abs().max(f64::from(f32::MIN_POSITIVE));
            assert!(err < 1e-6, "silu({a}) = {y}, want {want} (relative error {err:e})");
        }
        Ok(())
    }
}
