//! CPU kernels of the packed linear layer: panel packing, an AVX-512 register-blocked
//! micro-kernel (6 rows x 32 channels, two k-parity accumulator sets), a portable fallback, and
//! the rayon work split.

use super::PANEL;
use crate::kernel::{PanelSplit, for_each_panel_tile};
use rayon::prelude::*;

/// Rows per micro-tile (6 rows x 2 halves x 2 k-parity sets = 24 zmm accumulators).
const MR: usize = 6;
/// K block: a 256 x 32 f32 panel slice (32 KiB) stays in L1 across the row tiles.
const KC: usize = 256;
/// Row block of one prefill task.
const ROW_BLOCK: usize = 16 * MR;
/// Rows up to which the call is treated as decode (split over panels only).
const DECODE_ROWS: usize = 16;

/// Packs `w` (`[n, k]` row-major f32) into 64-byte aligned panels of `PANEL` channels:
/// `panel[p][kk][j] = w[p * PANEL + j][kk]`, zero past `n`. Returns the backing vector
/// (whose first `pad` elements are alignment padding, see [`panels_offset`]).
pub(super) fn pack_panels(w: &[f32], n: usize, k: usize) -> Vec<f32> {
    let num_panels = n.div_ceil(PANEL);
    let panel_len = k * PANEL;
    let mut out = vec![0f32; num_panels * panel_len + 16];
    let off = panels_offset(&out);
    out[off..off + num_panels * panel_len].par_chunks_mut(panel_len).enumerate().for_each(|(p, panel)| {
        for j in 0..PANEL {
            let row = p * PANEL + j;
            if row >= n {
                break;
            }
            let src = &w[row * k..(row + 1) * k];
            for (kk, &v) in src.iter().enumerate() {
                panel[kk * PANEL + j] = v;
            }
        }
    });
    out
}

/// Offset (in elements) of the first 64-byte aligned element of `v`.
pub(super) fn panels_offset(v: &[f32]) -> usize {
    let addr = v.as_ptr() as usize;
    ((64 - addr % 64) % 64) / std::mem::size_of::<f32>()
}

/// Raw output pointer shared by tasks that write disjoint (row, column) tiles.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every task writes a disjoint set of output elements (its own rows x panel columns),
// and the buffer outlives the parallel region (it is borrowed mutably by `gemm`).
unsafe impl Send for OutPtr {}
// SAFETY: as above: no two tasks touch the same element.
unsafe impl Sync for OutPtr {}

/// `y[m, n] = x[m, k] @ W^T + bias` with W in packed panels (as made by `pack_panels`).
pub(super) fn gemm(x: &[f32], m: usize, k: usize, packed: &[f32], n: usize, bias: Option<&[f32]>, y: &mut [f32]) {
    assert!(x.len() >= m * k && y.len() >= m * n, "linear: buffers too small");
    let off = panels_offset(packed);
    let num_panels = n.div_ceil(PANEL);
    let panels = &packed[off..off + num_panels * k * PANEL];
    let out = OutPtr(y.as_mut_ptr());
    let use_avx512 = has_avx512();

    let run_tile = |rows: std::ops::Range<usize>, panel_range: std::ops::Range<usize>| {
        for p in panel_range {
            let panel = &panels[p * k * PANEL..(p + 1) * k * PANEL];
            let cols = PANEL.min(n - p * PANEL);
            let bias_p = bias.map(|b| &b[p * PANEL..p * PANEL + cols]);
            let mut k0 = 0;
            while k0 < k {
                let kc = KC.min(k - k0);
                let mut r = rows.start;
                while r < rows.end {
                    let mr = MR.min(rows.end - r);
                    let tile = Tile {
                        x: &x[r * k + k0..],
                        ldx: k,
                        w: &panel[k0 * PANEL..(k0 + kc) * PANEL],
                        kc,
                        out,
                        y_offset: r * n + p * PANEL,
                        ldy: n,
                        cols,
                        accumulate: k0 > 0,
                        bias: if k0 == 0 { bias_p } else { None },
                    };
                    tile.run(mr, use_avx512);
                    r += mr;
                }
                k0 += kc;
            }
        }
    };

    let split = PanelSplit {
        decode_rows: DECODE_ROWS,
        row_block: ROW_BLOCK,
        // ~256 KiB of f32 weights per prefill task.
        group_panels: 256 * 1024 / (k * PANEL * 4),
        serial: m * n * k < 32 * 1024,
    };
    for_each_panel_tile(m, num_panels, split, run_tile);
}

fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// One micro-tile: up to `MR` rows of x against one panel slice of `kc` depth.
struct Tile<'a> {
    /// x rows start here, row stride `ldx`.
    x: &'a [f32],
    ldx: usize,
    /// `kc * PANEL` packed weights.
    w: &'a [f32],
    kc: usize,
    out: OutPtr,
    y_offset: usize,
    ldy: usize,
    /// Valid output columns in this panel (<= PANEL).
    cols: usize,
    /// Add to the existing output (later K blocks) instead of overwriting.
    accumulate: bool,
    bias: Option<&'a [f32]>,
}

impl Tile<'_> {
    fn run(&self, rows: usize, avx512: bool) {
        debug_assert!((1..=MR).contains(&rows));
        debug_assert!(self.x.len() >= (rows - 1) * self.ldx + self.kc);
        #[cfg(target_arch = "x86_64")]
        if avx512 {
            macro_rules! go {
                ($($r:literal)*) => {
                    match rows {
                        // SAFETY: avx512f was detected at run time; `x` holds `rows` rows of
                        // `kc` values at stride `ldx` (checked above), `w` holds kc*PANEL values,
                        // and the output tile lies inside `y` (rows < m, cols <= n - p*PANEL).
                        $($r => unsafe { avx512::tile::<$r>(self) },)*
                        _ => unreachable!(),
                    }
                };
            }
            go!(1 2 3 4 5 6);
            return;
        }
        let _ = avx512;
        self.run_portable(rows);
    }

    fn run_portable(&self, rows: usize) {
        for r in 0..rows {
            let mut acc = [0f32; PANEL];
            let xr = &self.x[r * self.ldx..r * self.ldx + self.kc];
            for (kk, &xv) in xr.iter().enumerate() {
                let wk = &self.w[kk * PANEL..(kk + 1) * PANEL];
                for j in 0..PANEL {
                    acc[j] += xv * wk[j];
                }
            }
            for (j, &a) in acc.iter().enumerate().take(self.cols) {
                let idx = self.y_offset + r * self.ldy + j;
                // SAFETY: idx addresses this tile's own output element (disjoint per task,
                // inside the m x n buffer).
                unsafe {
                    let dst = self.out.0.add(idx);
                    let base = if self.accumulate { *dst } else { self.bias.map_or(0.0, |b| b[j]) };
                    *dst = base + a;
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{PANEL, Tile};

    /// Prefetch distance in f32 elements of the panel stream (16 k-steps, 2 KiB).
    const PREFETCH_AHEAD: usize = 16 * PANEL;
    use std::arch::x86_64::*;

    /// The register-blocked micro-kernel: `R` rows x 32 channels, f32 FMA.
    ///
    /// # Safety
    /// The CPU supports avx512f; the tile's slices and output region are in bounds as
    /// documented on [`Tile`].
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile<const R: usize>(t: &Tile<'_>) {
        // Two accumulator sets (even and odd k) so the FMA latency chain never binds, even for
        // a single row; every row sums in the same order whatever R is, so a sequence gets
        // bit-identical results alone or in a batch.
        let mut lo = [[_mm512_setzero_ps(); R]; 2];
        let mut hi = [[_mm512_setzero_ps(); R]; 2];
        let x = t.x.as_ptr();
        let w = t.w.as_ptr();
        // One k step into accumulator set `set`.
        // SAFETY: (every call below) kk < kc, so both 16-lane loads lie inside `w`
        // (kc * PANEL values), and x[r * ldx + kk] lies inside the R rows of `x`. A prefetch
        // never faults, and `wrapping_add` keeps its address arithmetic defined past the end.
        let step = |kk: usize, set: usize, lo: &mut [[__m512; R]; 2], hi: &mut [[__m512; R]; 2]| unsafe {
            // Software prefetch ahead of the panel stream: with few rows the loop body is
            // short of memory-level parallelism otherwise.
            let ahead = w.wrapping_add(kk * PANEL + PREFETCH_AHEAD).cast::<i8>();
            _mm_prefetch::<_MM_HINT_T0>(ahead);
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64));
            let w0 = _mm512_loadu_ps(w.add(kk * PANEL));
            let w1 = _mm512_loadu_ps(w.add(kk * PANEL + 16));
            for r in 0..R {
                let xb = _mm512_set1_ps(*x.add(r * t.ldx + kk));
                lo[set][r] = _mm512_fmadd_ps(xb, w0, lo[set][r]);
                hi[set][r] = _mm512_fmadd_ps(xb, w1, hi[set][r]);
            }
        };
        let mut kk = 0;
        while kk + 2 <= t.kc {
            step(kk, 0, &mut lo, &mut hi);
            step(kk + 1, 1, &mut lo, &mut hi);
            kk += 2;
        }
        if kk < t.kc {
            step(kk, 0, &mut lo, &mut hi);
        }
        let lo: [__m512; R] = std::array::from_fn(|r| _mm512_add_ps(lo[0][r], lo[1][r]));
        let hi: [__m512; R] = std::array::from_fn(|r| _mm512_add_ps(hi[0][r], hi[1][r]));
        let valid = t.cols;
        let mask_lo: __mmask16 = if valid >= 16 { 0xFFFF } else { ((1u32 << valid) - 1) as u16 };
        let mask_hi: __mmask16 = if valid >= 32 {
            0xFFFF
        } else if valid <= 16 {
            0
        } else {
            ((1u32 << (valid - 16)) - 1) as u16
        };
        // SAFETY: the bias slice has `cols` values; masked loads read only those lanes.
        let (b_lo, b_hi) = unsafe {
            match t.bias {
                Some(b) => {
                    (_mm512_maskz_loadu_ps(mask_lo, b.as_ptr()), _mm512_maskz_loadu_ps(mask_hi, b.as_ptr().add(16)))
                }
                None => (_mm512_setzero_ps(), _mm512_setzero_ps()),
            }
        };
        for r in 0..R {
            // SAFETY: the masked loads/stores touch only the `cols` valid columns of row r of
            // this tile, which belong to this task alone and lie inside the output buffer.
            unsafe {
                let dst = t.out.0.add(t.y_offset + r * t.ldy);
                let (base_lo, base_hi) = if t.accumulate {
                    (_mm512_maskz_loadu_ps(mask_lo, dst), _mm512_maskz_loadu_ps(mask_hi, dst.add(16)))
                } else {
                    (b_lo, b_hi)
                };
                _mm512_mask_storeu_ps(dst, mask_lo, _mm512_add_ps(base_lo, lo[r]));
                if mask_hi != 0 {
                    _mm512_mask_storeu_ps(dst.add(16), mask_hi, _mm512_add_ps(base_hi, hi[r]));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, bias: Option<&[f32]>) -> Vec<f32> {
        let mut y = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f64;
                for kk in 0..k {
                    s += x[i * k + kk] as f64 * w[j * k + kk] as f64;
                }
                y[i * n + j] = s as f32 + bias.map_or(0.0, |b| b[j]);
            }
        }
        y
    }

    #[test]
    fn gemm_matches_naive_on_ragged_shapes_both_paths() {
        let mut seed = 12345u64;
        let mut rnd = move || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        for &(m, k, n) in &[(1, 7, 5), (3, 300, 33), (12, 256, 64), (13, 513, 70), (100, 64, 97), (1, 1000, 1000)] {
            let x: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
            let w: Vec<f32> = (0..n * k).map(|_| rnd()).collect();
            let b: Vec<f32> = (0..n).map(|_| rnd()).collect();
            let packed = pack_panels(&w, n, k);
            let want = naive(&x, m, k, &w, n, Some(&b));
            let mut y = vec![f32::NAN; m * n];
            gemm(&x, m, k, &packed, n, Some(&b), &mut y);
            let mut y_portable = vec![f32::NAN; m * n];
            let off = panels_offset(&packed);
            let panels = &packed[off..];
            for p in 0..n.div_ceil(PANEL) {
                let panel = &panels[p * k * PANEL..(p + 1) * k * PANEL];
                let mut k0 = 0;
                while k0 < k {
                    let kc = KC.min(k - k0);
                    let mut r = 0;
                    while r < m {
                        let mr = MR.min(m - r);
                        let cols = PANEL.min(n - p * PANEL);
                        Tile {
                            x: &x[r * k + k0..],
                            ldx: k,
                            w: &panel[k0 * PANEL..(k0 + kc) * PANEL],
                            kc,
                            out: OutPtr(y_portable.as_mut_ptr()),
                            y_offset: r * n + p * PANEL,
                            ldy: n,
                            cols,
                            accumulate: k0 > 0,
                            bias: if k0 == 0 { Some(&b[p * PANEL..p * PANEL + cols]) } else { None },
                        }
                        .run_portable(mr);
                        r += mr;
                    }
                    k0 += kc;
                }
            }
            for (i, ((a, c), r)) in y.iter().zip(&y_portable).zip(&want).enumerate() {
                assert!((a - r).abs() <= 1e-4 * (1.0 + r.abs()), "simd m={m} k={k} n={n} at {i}: {a} vs {r}");
                assert!((c - r).abs() <= 1e-4 * (1.0 + r.abs()), "portable m={m} k={k} n={n} at {i}: {c} vs {r}");
            }
        }
    }

    #[test]
    fn a_row_gives_bit_identical_results_alone_or_in_any_batch() {
        let (k, n) = (700, 70);
        let x: Vec<f32> = (0..40 * k).map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0).collect();
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 104_729 % 997) as f32 / 498.0) - 1.0).collect();
        let packed = pack_panels(&w, n, k);
        for m in [3usize, 13, 40] {
            let mut batched = vec![0f32; m * n];
            gemm(&x[..m * k], m, k, &packed, n, None, &mut batched);
            for r in 0..m {
                let mut alone = vec![0f32; n];
                gemm(&x[r * k..(r + 1) * k], 1, k, &packed, n, None, &mut alone);
                assert_eq!(&batched[r * n..(r + 1) * n], &alone[..], "row {r} of a batch of {m}");
            }
        }
    }
}
