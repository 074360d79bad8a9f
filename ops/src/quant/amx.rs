//! AMX int8 kernel: `tdpbssd` (s8 x s8 -> i32) on 16 x 64-byte tiles.
//!
//! One step is a 2 x 2 block of accumulator tiles (32 rows x 32 channels): tmm0..3 hold C,
//! tmm4/5 two A tiles (16 rows x 64 `k` of activations each, row stride `k_padded`), tmm6/7
//! two B tiles (the packed panels, 16 groups of 4 `k` x 16 channels, stride 64 bytes).
//! Every tile uses the same shape (16 rows x 64 bytes), so one tile configuration serves the
//! whole task. Activations need no shift (signed x signed).
//!
//! Availability, OS permission and the tile configuration come from `crate::kernel::amx`.

use super::cpu::AccTile;
use super::pack::{K_BLOCK, ROW_TILE, StagedActivations};
pub(super) use crate::kernel::amx::TileSession;

/// Whether the CPU has AMX-TILE and AMX-INT8 and the OS granted tile data to this process.
pub(super) fn available() -> bool {
    crate::kernel::amx::int8_available()
}

/// Depth of one K chunk: activations of a 32-row block (32 x chunk bytes, at most 20 KiB) stay
/// in L1 while the weight pairs of a task stream past them from L2.
pub(super) fn k_chunk(k_padded: usize) -> usize {
    const MAX_CHUNK: usize = 640;
    let chunks = k_padded.div_ceil(MAX_CHUNK);
    (k_padded / K_BLOCK).div_ceil(chunks) * K_BLOCK
}

/// Stores accumulator tiles tmm0..3 as the 2 x 2 blocks of a 32 x 32 i32 array at `c`
/// (tmm0: rows 0..16, channels 0..16; tmm1: channels 16..32; tmm2/3: rows 16..32).
///
/// # Safety
/// A [`TileSession`] must be live on this thread and `c` valid for writing 32 x 32 i32.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn store_accumulators(c: *mut i32) {
    // SAFETY: each tilestored writes 16 rows x 64 bytes at a 128-byte stride from its corner,
    // all inside the caller's 32 x 32 i32 array.
    unsafe {
        std::arch::asm!(
            "tilestored [{c00} + {sc} * 1], tmm0",
            "tilestored [{c01} + {sc} * 1], tmm1",
            "tilestored [{c10} + {sc} * 1], tmm2",
            "tilestored [{c11} + {sc} * 1], tmm3",
            c00 = in(reg) c,
            c01 = in(reg) c.add(16),
            c10 = in(reg) c.add(16 * 32),
            c11 = in(reg) c.add(16 * 32 + 16),
            sc = in(reg) 128usize,
            options(nostack)
        );
    }
}

/// Computes the 32 x 32 block of rows `r0..r0 + 32` against the two panels `w` over
/// `k_range` (bounds multiples of 64, within `k_padded`) into `acc`: overwritten when
/// `accumulate` is false, added to when true. With `lower_unsigned`, rows `r0 + 16..r0 + 32`
/// are unsigned bytes (`tdpbusd`; the low bytes of split 16-bit activations).
///
/// # Safety
/// A [`TileSession`] must be live on this thread; `x` must hold rows `r0..r0 + 32` of
/// `x.stride == k_padded` bytes; each panel must hold `16 * k_padded` bytes.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn tile(
    x: &StagedActivations,
    r0: usize,
    w: [&[u8]; 2],
    k_range: std::ops::Range<usize>,
    k_padded: usize,
    acc: &mut AccTile,
    accumulate: bool,
    lower_unsigned: bool,
) {
    assert!(k_padded.is_multiple_of(K_BLOCK) && x.stride == k_padded);
    assert!(k_range.start.is_multiple_of(K_BLOCK) && k_range.end.is_multiple_of(K_BLOCK) && k_range.end <= k_padded);
    assert!(w[0].len() >= 16 * k_padded && w[1].len() >= 16 * k_padded);
    assert!(x.data.as_slice().len() >= (r0 + ROW_TILE) * k_padded);
    let a0 = x.row(r0).as_ptr();
    // SAFETY: rows r0..r0 + 32 exist (asserted above).
    let a1 = unsafe { a0.add(16 * k_padded) };
    let (b0, b1) = (w[0].as_ptr(), w[1].as_ptr());
    let c = acc.as_mut_ptr().cast::<i32>();
    // SAFETY: (whole block) a live TileSession configured every tile as 16 rows x 64 bytes;
    // each tileloadd reads 16 rows of 64 bytes at the given stride, which stay inside the
    // asserted extents (A: rows r0..r0+32, columns kb..kb+64 <= k_padded; B: 1 KiB at kb * 16
    // within a panel of 16 * k_padded bytes; C: 16 rows x 64 bytes at a 128-byte stride
    // inside `acc`, 32 x 32 i32); tilestored writes the same C extents of `acc`.
    unsafe {
        if accumulate {
            std::arch::asm!(
                "tileloadd tmm0, [{c00} + {sc} * 1]",
                "tileloadd tmm1, [{c01} + {sc} * 1]",
                "tileloadd tmm2, [{c10} + {sc} * 1]",
                "tileloadd tmm3, [{c11} + {sc} * 1]",
                c00 = in(reg) c,
                c01 = in(reg) c.add(16),
                c10 = in(reg) c.add(16 * 32),
                c11 = in(reg) c.add(16 * 32 + 16),
                sc = in(reg) 128usize,
                options(nostack, readonly)
            );
        } else {
            std::arch::asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem)
            );
        }
        let mut kb = k_range.start;
        // One 64-deep K block of the 2 x 2 tile block; `$lower` multiplies the second A tile
        // (rows r0 + 16..r0 + 32): `tdpbssd` (signed) or `tdpbusd` (unsigned activations).
        macro_rules! k_block {
            ($lower:literal) => {
                std::arch::asm!(
                    "tileloadd tmm4, [{a0} + {sa} * 1]",
                    "tileloadd tmm6, [{b0} + {sb} * 1]",
                    "tdpbssd tmm0, tmm4, tmm6",
                    "tileloadd tmm7, [{b1} + {sb} * 1]",
                    "tdpbssd tmm1, tmm4, tmm7",
                    "tileloadd tmm5, [{a1} + {sa} * 1]",
                    concat!($lower, " tmm2, tmm5, tmm6"),
                    concat!($lower, " tmm3, tmm5, tmm7"),
                    a0 = in(reg) a0.add(kb),
                    a1 = in(reg) a1.add(kb),
                    b0 = in(reg) b0.add(kb * 16),
                    b1 = in(reg) b1.add(kb * 16),
                    sa = in(reg) k_padded,
                    sb = in(reg) 64usize,
                    options(nostack, readonly)
                )
            };
        }
        while kb < k_range.end {
            if lower_unsigned {
                k_block!("tdpbusd");
            } else {
                k_block!("tdpbssd");
            }
            kb += K_BLOCK;
        }
        store_accumulators(c);
    }
}

/// Computes the 16 x 32 block of rows `r0..r0 + 16` against the two panels `w` over the whole
/// of `k_padded` into rows `0..16` of `acc` (overwritten; rows 16.. are scratch). The decode
/// shape: half the tile products of [`tile`] for a 16-row call. Even and odd 64-deep K blocks
/// go to separate accumulator pairs (tmm0/1 and tmm2/3, summed at the end) so that two
/// independent `tdpbssd` chains per panel keep the unit busy.
///
/// # Safety
/// A [`TileSession`] must be live on this thread; `x` must hold rows `r0..r0 + 16` of
/// `x.stride == k_padded` bytes; each panel must hold `16 * k_padded` bytes.
#[cfg(target_arch = "x86_64")]
pub(super) unsafe fn tile16(x: &StagedActivations, r0: usize, w: [&[u8]; 2], k_padded: usize, acc: &mut AccTile) {
    assert!(k_padded.is_multiple_of(K_BLOCK) && k_padded > 0 && x.stride == k_padded);
    assert!(w[0].len() >= 16 * k_padded && w[1].len() >= 16 * k_padded);
    assert!(x.data.as_slice().len() >= (r0 + 16) * k_padded);
    let a = x.row(r0).as_ptr();
    let (b0, b1) = (w[0].as_ptr(), w[1].as_ptr());
    let c = acc.as_mut_ptr().cast::<i32>();
    // SAFETY: (whole block) a live TileSession configured every tile as 16 rows x 64 bytes;
    // each A load reads rows r0..r0 + 16, columns kb..kb + 64 <= k_padded (asserted extents);
    // each B load 1 KiB at kb * 16 inside a panel of 16 * k_padded bytes; the four stores write
    // 16 rows x 64 bytes at a 128-byte stride: rows 0..16 and 16..32 of `acc` (32 x 32 i32).
    unsafe {
        std::arch::asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
        let mut kb = 0;
        while kb + 2 * K_BLOCK <= k_padded {
            std::arch::asm!(
                "tileloadd tmm4, [{a0} + {sa} * 1]",
                "tileloadd tmm6, [{b00} + {sb} * 1]",
                "tdpbssd tmm0, tmm4, tmm6",
                "tileloadd tmm7, [{b10} + {sb} * 1]",
                "tdpbssd tmm1, tmm4, tmm7",
                "tileloadd tmm5, [{a1} + {sa} * 1]",
                "tileloadd tmm6, [{b01} + {sb} * 1]",
                "tdpbssd tmm2, tmm5, tmm6",
                "tileloadd tmm7, [{b11} + {sb} * 1]",
                "tdpbssd tmm3, tmm5, tmm7",
                a0 = in(reg) a.add(kb),
                a1 = in(reg) a.add(kb + K_BLOCK),
                b00 = in(reg) b0.add(kb * 16),
                b10 = in(reg) b1.add(kb * 16),
                b01 = in(reg) b0.add((kb + K_BLOCK) * 16),
                b11 = in(reg) b1.add((kb + K_BLOCK) * 16),
                sa = in(reg) k_padded,
                sb = in(reg) 64usize,
                options(nostack, readonly)
            );
            kb += 2 * K_BLOCK;
        }
        if kb < k_padded {
            std::arch::asm!(
                "tileloadd tmm4, [{a0} + {sa} * 1]",
                "tileloadd tmm6, [{b00} + {sb} * 1]",
                "tdpbssd tmm0, tmm4, tmm6",
                "tileloadd tmm7, [{b10} + {sb} * 1]",
                "tdpbssd tmm1, tmm4, tmm7",
                a0 = in(reg) a.add(kb),
                b00 = in(reg) b0.add(kb * 16),
                b10 = in(reg) b1.add(kb * 16),
                sa = in(reg) k_padded,
                sb = in(reg) 64usize,
                options(nostack, readonly)
            );
        }
        store_accumulators(c);
    }
    let (even, odd) = acc.split_at_mut(16);
    for (e, o) in even.iter_mut().zip(odd.iter()) {
        for (a, b) in e.iter_mut().zip(o) {
            *a = a.wrapping_add(*b);
        }
    }
}

/// # Safety
/// Never called on other architectures ([`available`] is false there).
#[cfg(not(target_arch = "x86_64"))]
pub(super) unsafe fn tile16(_: &StagedActivations, _: usize, _: [&[u8]; 2], _: usize, _: &mut AccTile) {
    unreachable!("amx kernel on a non-x86 target")
}

/// # Safety
/// Never called on other architectures ([`available`] is false there).
#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn tile(
    _: &StagedActivations,
    _: usize,
    _: [&[u8]; 2],
    _: std::ops::Range<usize>,
    _: usize,
    _: &mut AccTile,
    _: bool,
    _: bool,
) {
    unreachable!("amx kernel on a non-x86 target")
}
