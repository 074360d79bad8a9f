//! Block-diagonal Walsh-Hadamard rotation of activation rows and weight rows.
//!
//! For an orthonormal `H` (`H H^T = I`), `x W^T = (x H)(W H)^T`: rotating both the input rows
//! and the weight rows of a linear leaves its float result unchanged, while the rotated input
//! spreads a few outlier channels over a whole block, so a per-token int8 scale no longer has
//! to cover one huge channel at the expense of all the others. `H` here is block diagonal:
//! Sylvester Hadamard blocks of size `block` (a power of two dividing `K`), scaled by
//! `1 / sqrt(block)`. The transform runs in place in `block * log2(block)` additions per row.

use candle_core::{Result, bail};

/// The largest power of two that divides `k` and is at most `max_block` (1 when `k` is odd).
pub fn hadamard_block(k: usize, max_block: usize) -> usize {
    let mut b = 1;
    while b * 2 <= max_block && k.is_multiple_of(b * 2) {
        b *= 2;
    }
    b
}

/// Checks that `block` is a power of two of at least 2 dividing `k`.
pub fn check_hadamard_block(k: usize, block: usize) -> Result<()> {
    if block < 2 || !block.is_power_of_two() || !k.is_multiple_of(block) {
        bail!("hadamard: block {block} must be a power of two >= 2 dividing K={k}");
    }
    Ok(())
}

/// Rotates every `block`-long slice of `row` by the normalized Sylvester Hadamard matrix
/// (`row` length a multiple of `block`, `block` a power of two). AVX-512 when available and
/// `block >= 16` (the same butterflies in another order of additions: equal up to rounding).
pub fn hadamard_row(row: &mut [f32], block: usize) {
    #[cfg(target_arch = "x86_64")]
    if block >= 16 && super::simd::available() {
        // SAFETY: AVX-512F checked just above; `block` is a power of two >= 16, so every
        // chunk is a whole number of 16-lane vectors; the source is the row itself.
        unsafe { avx512::hadamard_from(row.as_ptr(), row, block) };
        return;
    }
    hadamard_row_scalar(row, block);
}

/// `dst = src` rotated like [`hadamard_row`] (bit-identical to copying, then rotating in
/// place), without a separate copy pass on the AVX-512 path.
pub fn hadamard_row_from(src: &[f32], dst: &mut [f32], block: usize) {
    assert_eq!(src.len(), dst.len(), "hadamard_row_from: source and destination lengths differ");
    #[cfg(target_arch = "x86_64")]
    if block >= 16 && super::simd::available() {
        // SAFETY: AVX-512F checked just above; `src` holds `dst.len()` floats.
        unsafe { avx512::hadamard_from(src.as_ptr(), dst, block) };
        return;
    }
    dst.copy_from_slice(src);
    hadamard_row_scalar(dst, block);
}

fn hadamard_row_scalar(row: &mut [f32], block: usize) {
    let norm = 1.0 / (block as f32).sqrt();
    for chunk in row.chunks_exact_mut(block) {
        let mut h = 1;
        while h < block {
            for start in (0..block).step_by(2 * h) {
                let (lo, hi) = chunk[start..start + 2 * h].split_at_mut(h);
                for (a, b) in lo.iter_mut().zip(hi.iter_mut()) {
                    let (x, y) = (*a, *b);
                    *a = x + y;
                    *b = x - y;
                }
            }
            h *= 2;
        }
        chunk.iter_mut().for_each(|v| *v *= norm);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// Stages h = 1, 2, 4, 8 inside one 16-lane vector: lane i takes `v[i] + v[i ^ h]` when
    /// bit h of i is clear, `v[i ^ h] - v[i]` when it is set.
    #[target_feature(enable = "avx512f")]
    fn in_register(mut v: __m512) -> __m512 {
        let lanes = |h: i32| {
            let i: [i32; 16] = std::array::from_fn(|l| l as i32 ^ h);
            i
        };
        for h in [1, 2, 4, 8] {
            let idx = lanes(h);
            // SAFETY: `idx` is a 16-element array (64 readable bytes).
            let swapped = _mm512_permutexvar_ps(unsafe { _mm512_loadu_si512(idx.as_ptr().cast()) }, v);
            let high: __mmask16 = (0..16u16).filter(|l| l & h as u16 != 0).fold(0, |m, l| m | 1 << l);
            let sum = _mm512_add_ps(v, swapped);
            v = _mm512_mask_sub_ps(sum, high, swapped, v);
        }
        v
    }

    /// Rotates `src` (`row.len()` floats, possibly `row` itself) into `row`.
    ///
    /// # Safety
    /// AVX-512F must be available; `block` a power of two >= 16; `src` readable for
    /// `row.len()` floats (it may alias `row`: each vector is read before it is written).
    ///
    /// The in-register stages run in one pass over the block (reading `src`); the stages
    /// across vectors run two at a time (radix 4: four vectors loaded, two butterfly levels,
    /// four stored), and the normalization rides on the last pass's stores.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn hadamard_from(src: *const f32, row: &mut [f32], block: usize) {
        let norm = _mm512_set1_ps(1.0 / (block as f32).sqrt());
        let one = _mm512_set1_ps(1.0);
        let vecs = block / 16;
        // Cross-vector stages h = 1, 2, 4, .. < vecs, in passes of two (one when odd).
        let stages = vecs.trailing_zeros() as usize;
        for (c, chunk) in row.chunks_exact_mut(block).enumerate() {
            let p = chunk.as_mut_ptr();
            // SAFETY: chunk c of the source, `block` floats inside its `row.len()`.
            let from = unsafe { src.add(c * block) };
            // Vector indices below stay below `vecs`, so every 16-float load or store lies
            // inside `chunk` (`block` floats).
            let first_scale = if stages == 0 { norm } else { one };
            for v in 0..vecs {
                // SAFETY: see above (vector v < vecs of this chunk).
                unsafe {
                    let x = in_register(_mm512_loadu_ps(from.add(16 * v)));
                    _mm512_storeu_ps(p.add(16 * v), _mm512_mul_ps(x, first_scale));
                }
            }
            let mut done = 0;
            while done < stages {
                let h = 1 << done;
                let scale = if done + 2 >= stages { norm } else { one };
                if stages - done == 1 {
                    for start in (0..vecs).step_by(2 * h) {
                        for v in start..start + h {
                            // SAFETY: v + h < start + 2h <= vecs: both vectors lie in the chunk.
                            unsafe {
                                let a = _mm512_loadu_ps(p.add(16 * v));
                                let b = _mm512_loadu_ps(p.add(16 * (v + h)));
                                _mm512_storeu_ps(p.add(16 * v), _mm512_mul_ps(_mm512_add_ps(a, b), scale));
                                _mm512_storeu_ps(p.add(16 * (v + h)), _mm512_mul_ps(_mm512_sub_ps(a, b), scale));
                            }
                        }
                    }
                    done += 1;
                } else {
                    for start in (0..vecs).step_by(4 * h) {
                        for v in start..start + h {
                            // SAFETY: v + 3h < start + 4h <= vecs: all four vectors lie in
                            // the chunk.
                            unsafe {
                                let a = _mm512_loadu_ps(p.add(16 * v));
                                let b = _mm512_loadu_ps(p.add(16 * (v + h)));
                                let c = _mm512_loadu_ps(p.add(16 * (v + 2 * h)));
                                let d = _mm512_loadu_ps(p.add(16 * (v + 3 * h)));
                                let (ab0, ab1) = (_mm512_add_ps(a, b), _mm512_sub_ps(a, b));
                                let (cd0, cd1) = (_mm512_add_ps(c, d), _mm512_sub_ps(c, d));
                                let out = [
                                    (v, _mm512_add_ps(ab0, cd0)),
                                    (v + h, _mm512_add_ps(ab1, cd1)),
                                    (v + 2 * h, _mm512_sub_ps(ab0, cd0)),
                                    (v + 3 * h, _mm512_sub_ps(ab1, cd1)),
                                ];
                                for (at, x) in out {
                                    _mm512_storeu_ps(p.add(16 * at), _mm512_mul_ps(x, scale));
                                }
                            }
                        }
                    }
                    done += 2;
                }
            }
        }
    }
}

/// Rotates each `k`-long row of `data` (row-major) like [`hadamard_row`]: the weight side of
/// the rotation (`W H`), applied once when a linear is prepared.
pub fn hadamard_rows(data: &mut [f32], k: usize, block: usize) -> Result<()> {
    check_hadamard_block(k, block)?;
    if !data.len().is_multiple_of(k) {
        bail!("hadamard: {} values are not rows of K={k}", data.len());
    }
    data.chunks_exact_mut(k).for_each(|row| hadamard_row(row, block));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Rng;

    /// The explicit normalized Sylvester matrix: `H[i][j] = (-1)^popcount(i & j) / sqrt(b)`.
    fn matrix(b: usize) -> Vec<f32> {
        let norm = 1.0 / (b as f32).sqrt();
        (0..b * b).map(|ij| if ((ij / b) & (ij % b)).count_ones() % 2 == 1 { -norm } else { norm }).collect()
    }

    #[test]
    fn block_is_the_largest_power_of_two_dividing_k() {
        assert_eq!(hadamard_block(1536, 512), 512);
        assert_eq!(hadamard_block(4864, 512), 256);
        assert_eq!(hadamard_block(8960, 512), 256);
        assert_eq!(hadamard_block(96, 512), 32);
        assert_eq!(hadamard_block(7, 512), 1);
        assert!(check_hadamard_block(1536, 512).is_ok());
        assert!(check_hadamard_block(1536, 1024).is_err());
        assert!(check_hadamard_block(96, 48).is_err());
        assert!(check_hadamard_block(96, 1).is_err());
    }

    #[test]
    fn fast_transform_matches_the_matrix_product_per_block() {
        let mut rng = Rng::fresh("hadamard fast vs matrix");
        for (k, block) in [(8, 2), (48, 16), (1536, 512), (320, 64)] {
            let x: Vec<f32> = (0..3 * k).map(|_| rng.uniform(-2.0, 2.0)).collect();
            let mut fast = x.clone();
            hadamard_rows(&mut fast, k, block).unwrap();
            let h = matrix(block);
            for (r, row) in x.chunks(k).enumerate() {
                for (c0, chunk) in row.chunks(block).enumerate() {
                    for j in 0..block {
                        let want: f32 = (0..block).map(|i| chunk[i] * h[i * block + j]).sum();
                        let got = fast[r * k + c0 * block + j];
                        assert!((got - want).abs() <= 1e-4 * (1.0 + want.abs()), "k={k} b={block} r={r} j={j}");
                    }
                }
            }
        }
    }

    #[test]
    fn vector_and_scalar_transforms_agree() {
        let mut rng = Rng::fresh("hadamard simd vs scalar");
        for (k, block) in [(1536, 512), (64, 16), (4864, 256), (96, 32), (576, 64), (384, 128), (2048, 1024)] {
            let x: Vec<f32> = (0..2 * k).map(|_| rng.uniform(-3.0, 3.0)).collect();
            let (mut fast, mut slow) = (x.clone(), x.clone());
            hadamard_row(&mut fast, block);
            hadamard_row_scalar(&mut slow, block);
            let mut from = vec![f32::NAN; x.len()];
            hadamard_row_from(&x, &mut from, block);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&from), bits(&fast), "k={k} block={block}: out of place differs from in place");
            for (i, (a, b)) in fast.iter().zip(&slow).enumerate() {
                assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "k={k} block={block} [{i}]: {a} vs {b}");
            }
        }
    }

    #[test]
    fn rotating_input_and_weight_keeps_the_dot_product_and_spreads_an_outlier() {
        let mut rng = Rng::fresh("hadamard rotation");
        let (k, block) = (256, 64);
        let mut x: Vec<f32> = (0..k).map(|_| rng.uniform(-1.0, 1.0)).collect();
        x[3] = 200.0;
        let w: Vec<f32> = (0..k).map(|_| rng.uniform(-1.0, 1.0)).collect();
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(p, q)| p * q).sum::<f32>();
        let (mut xr, mut wr) = (x.clone(), w.clone());
        hadamard_rows(&mut xr, k, block).unwrap();
        hadamard_rows(&mut wr, k, block).unwrap();
        assert!((dot(&x, &w) - dot(&xr, &wr)).abs() < 1e-2, "{} vs {}", dot(&x, &w), dot(&xr, &wr));
        let max = |v: &[f32]| v.iter().fold(0f32, |m, a| m.max(a.abs()));
        assert!(max(&xr) < max(&x) / 4.0, "outlier not spread: {} vs {}", max(&xr), max(&x));
        assert!(hadamard_rows(&mut xr[..k - 1], k, block).is_err());
    }
}
