//! Load-time weight packing and run-time activation staging shared by every int8 kernel.
//!
//! Packed weight layout (one layout for AMX, VNNI and the portable path): the `N` output
//! channels are padded to a multiple of [`PAIR`] and cut into panels of [`PANEL`] channels;
//! `K` is padded with zeros to a multiple of [`K_BLOCK`]. Inside a panel, 4 consecutive `k` of
//! one channel form a 32-bit group, and the 16 groups of one `k / 4` index form a 64-byte row:
//!
//! `panel[q][k / 4][j][k % 4] = wq[16 q + j][k]`
//!
//! This is exactly AMX's B-tile layout for `tdpbssd` (16 rows of 64 bytes, one tile per 64 `k`)
//! and one zmm register of `vpdpbusd` weights per `k / 4` (16 channels x 4 bytes).

use crate::quant::quantize_value;

/// Output channels per panel: one AMX tile's columns, one zmm of i32 accumulators.
pub(crate) const PANEL: usize = 16;
/// Output channels per kernel step: two panels (the AMX 2x2 tile block, two zmm for VNNI).
pub(crate) const PAIR: usize = 2 * PANEL;
/// `K` is padded to a multiple of one AMX tile's depth (64 int8 values per row).
pub(crate) const K_BLOCK: usize = 64;
/// Rows of activations are padded to a multiple of the AMX 2x2 block height.
pub(crate) const ROW_TILE: usize = 32;

/// A byte buffer whose logical start is 64-byte aligned (AMX tile loads and zmm loads).
pub(crate) type AlignedBytes = crate::kernel::aligned::AlignedVec<u8>;

/// Packed int8 weights in panel layout plus the padded sizes.
pub(crate) struct PackedWeights {
    pub(crate) data: AlignedBytes,
    /// `K` rounded up to [`K_BLOCK`].
    pub(crate) k_padded: usize,
    /// `N` rounded up to [`PAIR`].
    pub(crate) n_padded: usize,
}

impl PackedWeights {
    /// Bytes of one panel (`k_padded * PANEL`).
    pub(crate) fn panel_bytes(&self) -> usize {
        self.k_padded * PANEL
    }

    /// The packed panel `q` (channels `16 q .. 16 q + 16`).
    pub(crate) fn panel(&self, q: usize) -> &[u8] {
        let len = self.panel_bytes();
        &self.data.as_slice()[q * len..(q + 1) * len]
    }

    /// The first `k` values of weight row `r` (channel `r`), read back from its panel.
    pub(crate) fn row(&self, r: usize, k: usize) -> impl Iterator<Item = i8> + '_ {
        let panel = self.panel(r / PANEL);
        (0..k).map(move |kk| panel[offset_in_panel(r % PANEL, kk)] as i8)
    }
}

/// Where `wq[16 q + j][kk]` sits inside panel `q`: `panel[kk / 4][j][kk % 4]`.
#[inline(always)]
fn offset_in_panel(j: usize, kk: usize) -> usize {
    (kk / 4) * 64 + j * 4 + kk % 4
}

/// Packs `wq` (`[n, k]` row-major int8) into the panel layout described in the module doc.
pub(crate) fn pack_weights(wq: &[i8], n: usize, k: usize) -> PackedWeights {
    let k_padded = k.div_ceil(K_BLOCK) * K_BLOCK;
    let n_padded = n.div_ceil(PAIR) * PAIR;
    let mut data = AlignedBytes::zeroed(n_padded * k_padded);
    let panel_len = k_padded * PANEL;
    for (q, panel) in data.as_mut_slice().chunks_exact_mut(panel_len).enumerate() {
        for j in 0..PANEL {
            let row = q * PANEL + j;
            if row >= n {
                break;
            }
            for (kk, &v) in wq[row * k..(row + 1) * k].iter().enumerate() {
                panel[offset_in_panel(j, kk)] = v as u8;
            }
        }
    }
    PackedWeights { data, k_padded, n_padded }
}

/// `-128 * sum_k wq[n, k]` added to `bias_q` for the VNNI path, whose activations are shifted
/// to `u8` (`x + 128`): `sum (x + 128) w = sum x w + 128 sum w`. Computed with wrapping
/// arithmetic like the kernel's i32 accumulators, so `acc + folded bias` equals the exact
/// `sum x w + bias_q` whenever that fits in i32 (modular arithmetic).
pub(crate) fn fold_shift_into_bias(wq: &[i8], n: usize, k: usize, bias_q: &[i32]) -> Vec<i32> {
    (0..n)
        .map(|row| {
            let sum = wq[row * k..(row + 1) * k].iter().fold(0i32, |s, &v| s.wrapping_add(v as i32));
            bias_q[row].wrapping_sub(sum.wrapping_mul(128))
        })
        .collect()
}

/// Activations staged for a kernel: `rows_padded x k_padded` bytes, zero padded, row-major.
/// For the VNNI path every value is stored as `x + 128` (`u8`), else as `i8` bits.
pub(crate) struct StagedActivations {
    pub(crate) data: AlignedBytes,
    pub(crate) rows: usize,
    pub(crate) stride: usize,
}

impl StagedActivations {
    pub(crate) fn new(rows: usize, rows_padded: usize, k_padded: usize) -> Self {
        Self { data: AlignedBytes::zeroed(rows_padded * k_padded), rows, stride: k_padded }
    }

    pub(crate) fn row(&self, r: usize) -> &[u8] {
        &self.data.as_slice()[r * self.stride..(r + 1) * self.stride]
    }
}

/// Copies int8 rows (`rows x k`, row stride `k`) into a staged buffer, flipping the sign bit
/// (`x + 128` as `u8`) when `shift` is set.
pub(crate) fn stage_int8(src: &[i8], rows: usize, k: usize, shift: bool, dst: &mut StagedActivations) {
    let flip = if shift { 0x80u8 } else { 0 };
    let stride = dst.stride;
    for (r, out) in dst.data.as_mut_slice().chunks_exact_mut(stride).take(rows).enumerate() {
        for (o, &v) in out[..k].iter_mut().zip(&src[r * k..(r + 1) * k]) {
            *o = (v as u8) ^ flip;
        }
    }
}

/// Quantizes one row of floats into int8 bits (XOR `flip`, 0 or 0x80 for the VNNI shift).
#[inline]
pub(crate) fn quantize_row<T: crate::host::Element>(src: &[T], scale: f32, offset: f32, flip: u8, dst: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if super::simd::available() {
        // SAFETY: AVX-512F/BW checked just above.
        unsafe { super::simd::quantize_row(src, scale, offset, flip, dst) };
        return;
    }
    for (o, &v) in dst.iter_mut().zip(src) {
        *o = (quantize_value(v.to_f32(), scale, offset) as u8) ^ flip;
    }
}
