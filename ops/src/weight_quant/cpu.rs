//! CPU kernels of the W8A16 linear layer: int8 panel packing, an AVX-512 micro-kernel that
//! widens int8 to f32 in registers (6 rows x 32 channels, two k-parity accumulator sets,
//! software prefetch), a portable fallback, and the rayon work split (the same shape as
//! [`crate::linear`]'s f32 kernels).
//!
//! Decode streams the int8 panels straight through the kernel (one byte per weight read).
//! Prefill row blocks first widen each panel K-block once into an f32 scratch slice shared by
//! all the block's row tiles, so the compute-bound loop runs at the f32 kernel's rate; the
//! widened values are exact, so both forms give bit-identical sums.

use super::PANEL;
use crate::kernel::{PanelSplit, for_each_panel_tile};
use rayon::prelude::*;

/// Rows per micro-tile (6 rows x 2 halves x 2 k-parity sets = 24 zmm accumulators).
const MR: usize = 6;
/// K block: a 256 x 32 panel slice (8 KiB int8, 32 KiB widened to f32) stays in L1 across
/// the row tiles. The same for both forms, so every row sums in the same order.
const KC: usize = 256;
/// Row counts above which a task widens its panel slices to f32 first.
const WIDEN_ROWS: usize = 2 * MR;
/// Row block of one prefill task.
const ROW_BLOCK: usize = 16 * MR;
/// Rows up to which the call is treated as decode (split over panels only).
const DECODE_ROWS: usize = 16;

/// Packs `w` (`[n, k]` row-major int8) into panels of `PANEL` channels:
/// `panel[p][kk][j] = w[p * PANEL + j][kk]`, zero past `n`. Returns the backing vector and the
/// offset of its first 64-byte aligned byte, where the panels start.
pub(super) fn pack_panels(w: &[i8], n: usize, k: usize) -> (Vec<i8>, usize) {
    let num_panels = n.div_ceil(PANEL);
    let panel_len = k * PANEL;
    let mut out = vec![0i8; num_panels * panel_len + 64];
    let off = (64 - out.as_ptr() as usize % 64) % 64;
    out[off..off + num_panels * panel_len].par_chunks_mut(panel_len).enumerate().for_each(|(p, panel)| {
        for j in 0..PANEL.min(n - p * PANEL) {
            let row = p * PANEL + j;
            for (kk, &v) in w[row * k..(row + 1) * k].iter().enumerate() {
                panel[kk * PANEL + j] = v;
            }
        }
    });
    (out, off)
}

pub(super) fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Per-channel terms applied after the integer-weight dot products:
/// `y[r, j] = bias[j] + scaled_offset[j] * row_sums[r] + scale[j] * sum_k x[r, k] * w_q[j, k]`.
/// Channel slices are padded to a multiple of `PANEL`.
pub(super) struct Epilogue<'a> {
    pub scale: &'a [f32],
    pub scaled_offset: Option<&'a [f32]>,
    /// `sum_k x[r, k]` per row; present exactly when `scaled_offset` is.
    pub row_sums: Option<&'a [f32]>,
    pub bias: Option<&'a [f32]>,
}

/// Raw output pointer shared by tasks that write disjoint (row, column) tiles.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every task writes a disjoint set of output elements (its own rows x panel columns),
// and the buffer outlives the parallel region (it is borrowed mutably by `gemm`).
unsafe impl Send for OutPtr {}
// SAFETY: as above: no two tasks touch the same element.
unsafe impl Sync for OutPtr {}

/// `y[m, n] = x[m, k] @ ((w_q + o) * s)^T + bias` with `w_q` in packed panels.
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm(
    x: &[f32],
    m: usize,
    k: usize,
    panels: &[i8],
    n: usize,
    epi: &Epilogue<'_>,
    y: &mut [f32],
    avx512: bool,
) {
    let num_panels = n.div_ceil(PANEL);
    assert!(x.len() >= m * k && y.len() >= m * n, "weight_quant_linear: buffers too small");
    assert!(panels.len() >= num_panels * k * PANEL && epi.scale.len() >= num_panels * PANEL);
    assert!(epi.row_sums.is_none_or(|s| s.len() >= m) && epi.scaled_offset.is_some() == epi.row_sums.is_some());
    let out = OutPtr(y.as_mut_ptr());
    let avx512 = avx512 && has_avx512();

    let run_tile = |rows: std::ops::Range<usize>, panel_range: std::ops::Range<usize>| {
        // The f32 scratch starts on a 64-byte boundary so that no zmm load splits a line.
        let mut scratch = if rows.len() > WIDEN_ROWS { vec![0f32; KC * PANEL + 16] } else { Vec::new() };
        let align = if scratch.is_empty() { 0 } else { (64 - scratch.as_ptr() as usize % 64) % 64 / 4 };
        let widened = &mut scratch[align..];
        for p in panel_range {
            let panel = &panels[p * k * PANEL..(p + 1) * k * PANEL];
            let ch = p * PANEL..(p + 1) * PANEL;
            let mut k0 = 0;
            while k0 < k {
                let kc = KC.min(k - k0);
                let int8 = &panel[k0 * PANEL..(k0 + kc) * PANEL];
                let w = if widened.is_empty() {
                    PanelSlice::Int8(int8)
                } else {
                    let dst = &mut widened[..kc * PANEL];
                    widen(int8, dst, avx512);
                    PanelSlice::F32(dst)
                };
                let mut r = rows.start;
                while r < rows.end {
                    let mr = MR.min(rows.end - r);
                    let tile = Tile {
                        x: &x[r * k + k0..],
                        ldx: k,
                        w,
                        kc,
                        out,
                        y_offset: r * n + p * PANEL,
                        ldy: n,
                        cols: PANEL.min(n - p * PANEL),
                        first: k0 == 0,
                        scale: &epi.scale[ch.clone()],
                        scaled_offset: epi.scaled_offset.map(|so| &so[ch.clone()]),
                        row_sums: epi.row_sums.map(|s| &s[r..r + mr]),
                        bias: epi.bias.map(|b| &b[ch.clone()]),
                    };
                    tile.run(mr, avx512);
                    r += mr;
                }
                k0 += kc;
            }
        }
    };

    let split = PanelSplit {
        decode_rows: DECODE_ROWS,
        row_block: ROW_BLOCK,
        // ~128 KiB of int8 weights per prefill task.
        group_panels: 128 * 1024 / (k * PANEL),
        serial: m * n * k < 32 * 1024,
    };
    for_each_panel_tile(m, num_panels, split, run_tile);
}

/// `dst[i] = src[i] as f32` (exact) for equal-length slices.
fn widen(src: &[i8], dst: &mut [f32], avx512: bool) {
    assert_eq!(src.len(), dst.len());
    #[cfg(target_arch = "x86_64")]
    if avx512 {
        // SAFETY: `avx512` is only true when avx512f was detected at run time; the lengths
        // are equal (asserted above).
        unsafe { avx512::widen(src, dst) };
        return;
    }
    let _ = avx512;
    for (d, &v) in dst.iter_mut().zip(src) {
        *d = f32::from(v);
    }
}

/// `kc * PANEL` weights of one panel K-block: packed int8, or the same values widened to f32.
#[derive(Clone, Copy)]
enum PanelSlice<'a> {
    Int8(&'a [i8]),
    F32(&'a [f32]),
}

impl PanelSlice<'_> {
    fn len(self) -> usize {
        match self {
            Self::Int8(w) => w.len(),
            Self::F32(w) => w.len(),
        }
    }

    #[inline(always)]
    fn get(self, i: usize) -> f32 {
        match self {
            Self::Int8(w) => f32::from(w[i]),
            Self::F32(w) => w[i],
        }
    }
}

/// One micro-tile: up to `MR` rows of x against one panel slice of `kc` depth.
struct Tile<'a> {
    /// x rows start here, row stride `ldx`.
    x: &'a [f32],
    ldx: usize,
    /// `kc * PANEL` packed weights.
    w: PanelSlice<'a>,
    kc: usize,
    out: OutPtr,
    y_offset: usize,
    ldy: usize,
    /// Valid output columns in this panel (<= PANEL).
    cols: usize,
    /// First K block: start from the bias/offset terms instead of the existing output.
    first: bool,
    /// `PANEL` values each (padded).
    scale: &'a [f32],
    scaled_offset: Option<&'a [f32]>,
    /// One per row of the tile.
    row_sums: Option<&'a [f32]>,
    bias: Option<&'a [f32]>,
}

impl Tile<'_> {
    fn run(&self, rows: usize, avx512: bool) {
        // Checked in release builds too (once per tile): the kernels' SAFETY rests on them.
        assert!((1..=MR).contains(&rows) && self.x.len() >= (rows - 1) * self.ldx + self.kc);
        assert!(self.w.len() == self.kc * PANEL && self.scale.len() == PANEL);
        assert!(self.row_sums.is_none_or(|s| s.len() >= rows) && self.cols <= PANEL);
        assert!([self.scaled_offset, self.bias].iter().all(|v| v.is_none_or(|v| v.len() == PANEL)));
        #[cfg(target_arch = "x86_64")]
        if avx512 {
            macro_rules! go {
                ($($r:literal)*) => {
                    match rows {
                        // SAFETY: `avx512` is only true when avx512f was detected at run time
                        // (`gemm` re-checks); `x` holds `rows` rows of `kc` values at stride
                        // `ldx`, `w` holds kc*PANEL bytes, the channel slices hold PANEL values,
                        // `row_sums` holds `rows` values, and the output tile lies inside `y`.
                        $($r => unsafe {
                            match self.w {
                                PanelSlice::Int8(w) => avx512::tile::<$r, true>(self, w.as_ptr(), std::ptr::null()),
                                PanelSlice::F32(w) => avx512::tile::<$r, false>(self, std::ptr::null(), w.as_ptr()),
                            }
                        },)*
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
                for (j, a) in acc.iter_mut().enumerate() {
                    *a += xv * self.w.get(kk * PANEL + j);
                }
            }
            let row_sum = self.row_sums.map_or(0.0, |s| s[r]);
            for (j, &a) in acc.iter().enumerate().take(self.cols) {
                let idx = self.y_offset + r * self.ldy + j;
                // SAFETY: idx addresses this tile's own output element (disjoint per task,
                // inside the m x n buffer).
                unsafe {
                    let dst = self.out.0.add(idx);
                    let base = if self.first {
                        self.bias.map_or(0.0, |b| b[j]) + self.scaled_offset.map_or(0.0, |so| so[j] * row_sum)
                    } else {
                        *dst
                    };
                    *dst = base + self.scale[j] * a;
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{PANEL, Tile};
    use std::arch::x86_64::*;

    /// `dst[i] = src[i] as f32`, 16 lanes at a time.
    ///
    /// # Safety
    /// The CPU supports avx512f and `src.len() == dst.len()`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn widen(src: &[i8], dst: &mut [f32]) {
        let chunks = src.len() / 16;
        for c in 0..chunks {
            // SAFETY: c * 16 + 16 <= len for both slices.
            unsafe {
                let v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(src.as_ptr().add(c * 16).cast())));
                _mm512_storeu_ps(dst.as_mut_ptr().add(c * 16), v);
            }
        }
        for i in chunks * 16..src.len() {
            dst[i] = f32::from(src[i]);
        }
    }

    /// Prefetch distance in bytes of the int8 panel stream (64 k-steps, 2 KiB).
    const PREFETCH_AHEAD: usize = 64 * PANEL;

    /// The register-blocked micro-kernel: `R` rows x 32 channels, FMA; the weights come from
    /// `w8` (int8, widened in registers) when `INT8`, else from `wf` (f32).
    ///
    /// # Safety
    /// The CPU supports avx512f; the tile's slices and output region are in bounds as
    /// documented on [`Tile`] and checked in `Tile::run`; the weight pointer of the chosen
    /// form points at the tile's `kc * PANEL` weights.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile<const R: usize, const INT8: bool>(t: &Tile<'_>, w8: *const i8, wf: *const f32) {
        // Two accumulator sets (even and odd k) so the FMA latency chain never binds, even
        // for one row; each row sums in the same order whatever R is, so a sequence gets
        // bit-identical results alone or in a batch.
        let mut lo = [[_mm512_setzero_ps(); R]; 2];
        let mut hi = [[_mm512_setzero_ps(); R]; 2];
        let x = t.x.as_ptr();
        // One k step into accumulator set `set`.
        // SAFETY: (every call below) kk < kc, so the two 16-lane loads lie inside the
        // weights (kc * PANEL values), and x[r * ldx + kk] lies inside the R rows of `x`.
        let step = |kk: usize, set: usize, lo: &mut [[__m512; R]; 2], hi: &mut [[__m512; R]; 2]| unsafe {
            let (w0, w1) = if INT8 {
                let p = w8.add(kk * PANEL);
                (
                    _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p.cast()))),
                    _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p.add(16).cast()))),
                )
            } else {
                let p = wf.add(kk * PANEL);
                (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)))
            };
            for r in 0..R {
                let xb = _mm512_set1_ps(*x.add(r * t.ldx + kk));
                lo[set][r] = _mm512_fmadd_ps(xb, w0, lo[set][r]);
                hi[set][r] = _mm512_fmadd_ps(xb, w1, hi[set][r]);
            }
        };
        let mut kk = 0;
        while kk + 2 <= t.kc {
            // One 64-byte line holds two k steps: prefetch it once per pair. A prefetch never
            // faults, and `wrapping_add` keeps the address arithmetic defined past the end.
            // The f32 form is a scratch slice already in cache.
            if INT8 {
                _mm_prefetch::<_MM_HINT_T0>(w8.wrapping_add(kk * PANEL + PREFETCH_AHEAD));
            }
            step(kk, 0, &mut lo, &mut hi);
            step(kk + 1, 1, &mut lo, &mut hi);
            kk += 2;
        }
        if kk < t.kc {
            step(kk, 0, &mut lo, &mut hi);
        }
        let valid = t.cols;
        let mask_lo: __mmask16 = if valid >= 16 { 0xFFFF } else { ((1u32 << valid) - 1) as u16 };
        let mask_hi: __mmask16 = if valid >= 32 {
            0xFFFF
        } else if valid <= 16 {
            0
        } else {
            ((1u32 << (valid - 16)) - 1) as u16
        };
        // SAFETY: the channel slices hold PANEL (32) values each (padded), so the full
        // 16-lane loads at 0 and 16 are in bounds.
        let (s_lo, s_hi, b_lo, b_hi, so_lo, so_hi) = unsafe {
            let load = |v: Option<&[f32]>| match v {
                Some(v) => (_mm512_loadu_ps(v.as_ptr()), _mm512_loadu_ps(v.as_ptr().add(16))),
                None => (_mm512_setzero_ps(), _mm512_setzero_ps()),
            };
            let (s_lo, s_hi) = load(Some(t.scale));
            let (b_lo, b_hi) = load(t.bias);
            let (so_lo, so_hi) = load(t.scaled_offset);
            (s_lo, s_hi, b_lo, b_hi, so_lo, so_hi)
        };
        for r in 0..R {
            let acc_lo = _mm512_add_ps(lo[0][r], lo[1][r]);
            let acc_hi = _mm512_add_ps(hi[0][r], hi[1][r]);
            // SAFETY: the masked loads/stores touch only the `cols` valid columns of row r of
            // this tile, which belong to this task alone and lie inside the output buffer;
            // `row_sums` holds R values.
            unsafe {
                let dst = t.out.0.add(t.y_offset + r * t.ldy);
                let (base_lo, base_hi) = if t.first {
                    let rs = _mm512_set1_ps(t.row_sums.map_or(0.0, |s| *s.get_unchecked(r)));
                    (_mm512_fmadd_ps(so_lo, rs, b_lo), _mm512_fmadd_ps(so_hi, rs, b_hi))
                } else {
                    (_mm512_maskz_loadu_ps(mask_lo, dst), _mm512_maskz_loadu_ps(mask_hi, dst.add(16)))
                };
                _mm512_mask_storeu_ps(dst, mask_lo, _mm512_fmadd_ps(s_lo, acc_lo, base_lo));
                if mask_hi != 0 {
                    _mm512_mask_storeu_ps(dst.add(16), mask_hi, _mm512_fmadd_ps(s_hi, acc_hi, base_hi));
                }
            }
        }
    }
}
