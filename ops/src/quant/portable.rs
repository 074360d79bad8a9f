//! Portable int8 kernel: plain loops over the packed panel layout (signed x signed, no shift).
//! The fallback for machines without AVX-512 VNNI and the cross-check of the SIMD paths.

use super::cpu::AccTile;
use super::pack::{PANEL, StagedActivations};

/// Accumulates `rows` staged rows from `r0` against the two panels `w` (i8 bits) over
/// `k_groups` groups of 4 `k` into `acc[0..rows]` (overwritten).
pub(super) fn tile(x: &StagedActivations, r0: usize, rows: usize, w: [&[u8]; 2], k_groups: usize, acc: &mut AccTile) {
    for (r, acc_row) in acc.iter_mut().enumerate().take(rows) {
        let xr = x.row(r0 + r);
        for (h, panel) in w.iter().enumerate() {
            let mut sums = [0i32; PANEL];
            for g in 0..k_groups {
                let xg = &xr[4 * g..4 * g + 4];
                let wg = &panel[64 * g..64 * g + 64];
                for (j, s) in sums.iter_mut().enumerate() {
                    let mut d = 0i32;
                    for t in 0..4 {
                        d += (xg[t] as i8 as i32) * (wg[4 * j + t] as i8 as i32);
                    }
                    *s = s.wrapping_add(d);
                }
            }
            acc_row[h * PANEL..(h + 1) * PANEL].copy_from_slice(&sums);
        }
    }
}
