//! AVX-512 VNNI int8 kernel: `vpdpbusd` (u8 x s8 -> i32, four products per lane).
//!
//! Activations are staged shifted to `u8` (`x + 128`); the matching `-128 * sum_k w` sits in
//! the folded bias (see `pack::fold_shift_into_bias`). Products are at most 255 * 128 and four
//! of them fit in i32 easily, and `vpdpbusd` (not the saturating `vpdpbusds`) wraps like the
//! scalar reference, so extreme inputs (-128 / 127 everywhere) stay exact.
//! One register block is `MR` rows x 32 channels (two zmm per row); the weights are loaded
//! once per 4 `k` and broadcast activations are reused across both panels.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::cpu::AccTile;
use super::pack::{PANEL, StagedActivations};

/// Whether the CPU has the instructions of this kernel.
pub(super) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Accumulates `rows` staged (shifted) rows from `r0` against the two panels `w` over
/// `k_groups` groups of 4 `k` into `acc[0..rows]` (overwritten).
///
/// # Safety
/// The CPU must support AVX-512F and AVX-512 VNNI ([`available`]); `x` must hold rows
/// `r0..r0 + rows` with at least `4 * k_groups` bytes each; each panel at least `64 * k_groups`.
#[cfg(target_arch = "x86_64")]
pub(super) unsafe fn tile(
    x: &StagedActivations,
    r0: usize,
    rows: usize,
    w: [&[u8]; 2],
    k_groups: usize,
    acc: &mut AccTile,
) {
    let mut r = 0;
    while r < rows {
        let mr = (rows - r).min(8);
        // SAFETY: forwarded from this function's contract (features, buffer extents).
        unsafe {
            match mr {
                8 => block::<8>(x, r0 + r, w, k_groups, &mut acc[r..]),
                7 => block::<7>(x, r0 + r, w, k_groups, &mut acc[r..]),
                6 => block::<6>(x, r0 + r, w, k_groups, &mut acc[r..]),
                5 => block::<5>(x, r0 + r, w, k_groups, &mut acc[r..]),
                4 => block::<4>(x, r0 + r, w, k_groups, &mut acc[r..]),
                3 => block::<3>(x, r0 + r, w, k_groups, &mut acc[r..]),
                2 => block::<2>(x, r0 + r, w, k_groups, &mut acc[r..]),
                _ => block::<1>(x, r0 + r, w, k_groups, &mut acc[r..]),
            }
        }
        r += mr;
    }
}

/// Stub for other architectures (never called: [`available`] is false).
///
/// # Safety
/// Never sound to call; exists only so the dispatcher compiles everywhere.
#[cfg(not(target_arch = "x86_64"))]
pub(super) unsafe fn tile(_: &StagedActivations, _: usize, _: usize, _: [&[u8]; 2], _: usize, _: &mut AccTile) {
    unreachable!("vnni kernel on a non-x86 target")
}

/// # Safety
/// As [`tile`], for `MR` rows starting at `r0`; `acc` has at least `MR` rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vnni")]
unsafe fn block<const MR: usize>(
    x: &StagedActivations,
    r0: usize,
    w: [&[u8]; 2],
    k_groups: usize,
    acc: &mut [[i32; 32]],
) {
    assert!(w[0].len() >= 64 * k_groups && w[1].len() >= 64 * k_groups && acc.len() >= MR);
    let rows: [&[u8]; MR] = std::array::from_fn(|i| x.row(r0 + i));
    for row in &rows {
        assert!(row.len() >= 4 * k_groups);
    }
    let mut sums = [[_mm512_setzero_si512(); 2]; MR];
    let (w0, w1) = (w[0].as_ptr(), w[1].as_ptr());
    for g in 0..k_groups {
        // SAFETY: g < k_groups and both panels hold 64 * k_groups bytes (asserted above);
        // unaligned loads have no alignment requirement.
        let (b0, b1) =
            unsafe { (_mm512_loadu_si512(w0.add(64 * g).cast()), _mm512_loadu_si512(w1.add(64 * g).cast())) };
        for i in 0..MR {
            // SAFETY: every row holds at least 4 * k_groups bytes (asserted above).
            let a = unsafe { _mm512_set1_epi32(rows[i].as_ptr().add(4 * g).cast::<i32>().read_unaligned()) };
            sums[i][0] = _mm512_dpbusd_epi32(sums[i][0], a, b0);
            sums[i][1] = _mm512_dpbusd_epi32(sums[i][1], a, b1);
        }
    }
    for i in 0..MR {
        // SAFETY: acc[i] is 32 i32 (two 64-byte halves); unaligned stores.
        unsafe {
            _mm512_storeu_si512(acc[i].as_mut_ptr().cast(), sums[i][0]);
            _mm512_storeu_si512(acc[i].as_mut_ptr().add(PANEL).cast(), sums[i][1]);
        }
    }
}
