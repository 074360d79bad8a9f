//! Prefill attention over int8 KV caches on AMX-BF16 tiles (`tdpbf16ps`, bf16 x bf16 -> f32).
//!
//! Int8 keys and values are exact in bf16 (8 significant bits), so only the operands computed
//! in f32 (the scaled queries and the softmax probabilities) need care: each is split into a
//! bf16 high part and a bf16 low part (`x = hi + lo` to 2^-16 relative), and both parts
//! are multiplied against the same key or value tile. Products of bf16 are exact in f32 and
//! the tiles accumulate in f32, so the result matches the f32 kernels to f32-level rounding
//! while the matrix products run at AMX rates.
//!
//! The work is laid out so that no per-block transpose is needed:
//!
//! - Scores are computed transposed, `S^T = K Q^T`, one 16 keys x 16 query rows tile at a
//!   time: the key tile is a plain block of the packed keys (`[n, D]` bf16, row = key), and
//!   `Q^T` is built once per task as B tiles (pairs of head-dim entries interleaved).
//! - The online softmax then runs down the columns of `S^T`: one AVX-512 vector holds one key's
//!   scores for 16 query rows, so the running max, sum and rescale factor are vectors with no
//!   horizontal reductions, and the probabilities of keys `2k, 2k+1` interleave directly into
//!   the B tile of `P^T`.
//! - Values enter as `O^T = V^T P^T`, with `V^T` packed once per (sequence, kv head) in blocks of
//!   [`KEYS`] keys (`[D, KEYS]` bf16, one A tile per 16 head-dim rows).
//!
//! A span's `O^T` tiles (from the high and the low parts) are stored and folded into an f32
//! accumulator (`acc * corr + o_hi + o_lo`), and the value offset and scale are applied once per
//! output row, as in the f32 drivers (`cpu::KvDequant`). Tasks, packing and the output rows they own come from
//! [`cpu::prompt_tasks`](super::cpu::prompt_tasks).

use std::arch::x86_64::*;
use std::mem::MaybeUninit;

use super::avx512::Avx512;
use super::cpu::{Inputs, PromptTask, prompt_tasks};
use super::kernels::KvElement;
use crate::host::Element;
use crate::kernel::aligned::AlignedVec;
use crate::kernel::amx::{TileSession, bf16_available};
use crate::kernel::simd::Lanes;

/// Keys per block: two 16-key score tiles, and the 32 keys (16 pairs) of one `P^T` B tile.
const KEYS: usize = 32;
/// Query rows per tile (the columns of a score tile).
const COLS: usize = 16;
/// u32 (bf16 pairs) in one 16 x 64-byte tile.
const TILE_WORDS: usize = 256;

/// Proof that AVX-512 F/BW/VL and AMX-BF16 tiles are usable here, for a head dim that is a multiple
/// of 64 (the kernels need a multiple of 32, a tile row of bf16; 64 and 128 are the tested sizes).
#[derive(Debug, Clone, Copy)]
pub(crate) struct AmxBf16 {
    simd: Avx512,
}

impl AmxBf16 {
    pub(crate) fn detect(head_dim: usize) -> Option<Self> {
        let simd_ok = is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512vl");
        if !head_dim.is_multiple_of(64) || !bf16_available() || !simd_ok {
            return None;
        }
        Avx512::detect().map(|simd| Self { simd })
    }
}

/// [`super::prompt_attention_int8`] on AMX tiles; returns the output `[B', S, Nq, D]`.
pub(super) fn prompt_run<T: Element + KvElement + Lanes>(
    amx: AmxBf16,
    inp: &Inputs<'_, T, i8>,
    q_start: &[usize],
    q_lens: &[usize],
) -> Vec<T> {
    prompt_tasks(
        &inp.dims,
        q_start,
        q_lens,
        |b, g, n| pack(amx, inp, b, g, n),
        |packed, task, rows| prompt_task(amx, inp, packed, q_start[task.b], task, rows),
    )
}

/// The keys and values of one (sequence, kv head) as bf16 bits, zero beyond the live keys. Every
/// tile operand of this module is 64-byte aligned ([`AlignedVec`]).
struct PackedKv {
    /// Keys `[n_padded, D]` (`n` rounded up to [`KEYS`]).
    k: AlignedVec<u16>,
    /// Values transposed per block of [`KEYS`] keys: block `j / KEYS` is `[D, KEYS]`.
    vt: AlignedVec<u16>,
}

fn pack<T>(amx: AmxBf16, inp: &Inputs<'_, T, i8>, b: usize, g: usize, n: usize) -> PackedKv {
    let d = inp.dims.head_dim;
    let n_padded = n.next_multiple_of(KEYS);
    let mut k_buf = AlignedVec::zeroed(n_padded * d);
    let mut vt_buf = AlignedVec::zeroed(n_padded * d);
    if n > 0 {
        let (k_rows, v_rows) = (&inp.k[inp.k_view.row(b, 0, g)..], &inp.v[inp.v_view.row(b, 0, g)..]);
        let (k_stride, v_stride) = (inp.k_view.stride_b(), inp.v_view.stride_b());
        assert!(k_rows.len() >= (n - 1) * k_stride + d && v_rows.len() >= (n - 1) * v_stride + d);
        // SAFETY: the token proves AVX-512F/BW; the asserts above bound every row read.
        unsafe {
            pack_keys(amx.simd, k_rows, k_stride, n, d, k_buf.as_mut_slice());
            pack_values(amx.simd, v_rows, v_stride, n, d, vt_buf.as_mut_slice());
        }
    }
    PackedKv { k: k_buf, vt: vt_buf }
}

/// The bf16 bits of 16 int8 values (sign-extended in 32-bit lanes) as 16 u16: exact, an int8
/// value has at most 8 significant bits.
#[target_feature(enable = "avx512f,avx512bw")]
fn bf16_of_i8(x: __m512i) -> __m256i {
    _mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(_mm512_castps_si512(_mm512_cvtepi32_ps(x))))
}

/// Byte `(24 - SHIFT) / 8` of each 32-bit lane of `x`, sign-extended.
#[target_feature(enable = "avx512f")]
fn byte_lanes<const SHIFT: u32>(x: __m512i) -> __m512i {
    _mm512_srai_epi32::<24>(_mm512_slli_epi32::<SHIFT>(x))
}

/// Keys `0..n` (rows of `d` int8 at `stride` apart in `rows`) as bf16 bits into `out`
/// (`[n_padded, d]`, zero beyond `n`).
///
/// # Safety
/// Rows `0..n` must lie in `rows` (`(n - 1) * stride + d` elements) and `d` be a multiple of 16.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn pack_keys(_: Avx512, rows: &[i8], stride: usize, n: usize, d: usize, out: &mut [u16]) {
    assert!(d.is_multiple_of(16) && out.len() >= n * d);
    for j in 0..n {
        for t in (0..d).step_by(16) {
            // SAFETY: 16 bytes of row j (inside `rows` per the caller) and 16 u16 of `out`.
            unsafe {
                let x = _mm512_cvtepi8_epi32(_mm_loadu_si128(rows.as_ptr().add(j * stride + t).cast()));
                let bits = bf16_of_i8(x);
                _mm256_storeu_si256(out.as_mut_ptr().add(j * d + t).cast(), bits);
            }
        }
    }
}

/// Values `0..n` transposed per block of [`KEYS`] keys into `out` (block `j / KEYS` is
/// `[d, KEYS]` bf16 bits, zero beyond `n`): per block and per 4 channels, two gathers read
/// the 4 channel bytes of 16 keys each as one dword, and each channel's byte becomes a
/// 32-key row.
///
/// # Safety
/// As for [`pack_keys`]; `d` a multiple of 4 suffices here.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn pack_values(_: Avx512, rows: &[i8], stride: usize, n: usize, d: usize, out: &mut [u16]) {
    assert!(d.is_multiple_of(16) && out.len() >= n.next_multiple_of(KEYS) * d);
    assert!(i32::try_from(KEYS * stride).is_ok());
    let keys = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    let offsets = _mm512_mullo_epi32(keys, _mm512_set1_epi32(stride as i32));
    for j0 in (0..n).step_by(KEYS) {
        let block = &mut out[j0 * d..][..KEYS * d];
        // Keys of the block that exist, for each half of 16.
        let live = |half: usize| -> __mmask16 {
            let count = n.saturating_sub(j0 + 16 * half).min(16);
            ((1u32 << count) - 1) as __mmask16
        };
        let (live0, live1) = (live(0), live(1));
        for t in (0..d).step_by(4) {
            // SAFETY: the gathers read the dword at channels t..t + 4 (t + 4 <= d) of live keys
            // j0 + i < n only (masked), inside `rows` per the caller.
            let (lo, hi) = unsafe {
                let base = rows.as_ptr().add(j0 * stride + t);
                (
                    _mm512_mask_i32gather_epi32::<1>(_mm512_setzero_si512(), live0, offsets, base.cast()),
                    if live1 != 0 {
                        _mm512_mask_i32gather_epi32::<1>(
                            _mm512_setzero_si512(),
                            live1,
                            offsets,
                            base.add(16 * stride).cast(),
                        )
                    } else {
                        _mm512_setzero_si512()
                    },
                )
            };
            macro_rules! channel {
                ($byte:literal) => {
                    // SAFETY: row t + byte of the block holds KEYS u16.
                    unsafe {
                        let row = block.as_mut_ptr().add((t + $byte) * KEYS);
                        _mm256_storeu_si256(row.cast(), bf16_of_i8(byte_lanes::<{ 24 - 8 * $byte }>(lo)));
                        _mm256_storeu_si256(row.add(16).cast(), bf16_of_i8(byte_lanes::<{ 24 - 8 * $byte }>(hi)));
                    }
                };
            }
            channel!(0);
            channel!(1);
            channel!(2);
            channel!(3);
        }
    }
}

/// The scaled queries (`rows` rows of `D`, zero rows up to a multiple of 16) times log2(e) (the
/// softmax runs in base 2) as B tiles of `Q^T`: for query tile `qt` and head-dim chunk `c` (32
/// entries), the high-part tile starts
/// at `(qt * chunks + c) * 2 * TILE_WORDS` and the low-part tile follows it; word `k * 16 + n`
/// of a tile holds entries `32 c + 2k` (low half) and `32 c + 2k + 1` (high half) of row
/// `16 qt + n`, each the bf16 high or low part of the f32 entry ([`split_bf16_ps`]).
#[target_feature(enable = "avx512f,avx512bw")]
fn query_tiles(_: Avx512, q: &[f32], d: usize) -> AlignedVec<u32> {
    assert!(d.is_multiple_of(32) && q.len().is_multiple_of(COLS * d));
    let chunks = d / 32;
    let tiles = q.len() / (COLS * d);
    let mut tiles_buf = AlignedVec::<u32>::zeroed(tiles * chunks * 2 * TILE_WORDS);
    let out = tiles_buf.as_mut_slice();
    // Word w of the packed row is word 2w + 1 (the bf16 in the high half of f32 lane w) of the
    // two 16-lane halves of the chunk taken together.
    let odd_words: [u16; 32] = std::array::from_fn(|w| (2 * w + 1) as u16);
    // SAFETY: 32 u16.
    let odd_words = unsafe { _mm512_loadu_si512(odd_words.as_ptr().cast()) };
    // Word k of a packed row goes to word row k of the tile, column n.
    let word_rows = tile_rows();
    // Scores in base 2: the softmax takes 2^(s - max) instead of e^(s - max).
    let log2e = _mm512_set1_ps(std::f32::consts::LOG2_E);
    for (r, row) in q.chunks_exact(d).enumerate() {
        let (qt, n) = (r / COLS, r % COLS);
        for c in 0..chunks {
            // SAFETY: entries 32c .. 32c + 32 lie in the row (d is a multiple of 32).
            let (x0, x1) =
                unsafe { (_mm512_loadu_ps(row.as_ptr().add(32 * c)), _mm512_loadu_ps(row.as_ptr().add(32 * c + 16))) };
            let (x0, x1) = (_mm512_mul_ps(x0, log2e), _mm512_mul_ps(x1, log2e));
            let (h0, l0) = split_bf16_ps(x0);
            let (h1, l1) = split_bf16_ps(x1);
            let base = (qt * chunks + c) * 2 * TILE_WORDS + n;
            // SAFETY: the scattered words are base + 16k (k < 16) of the high tile and the same
            // offsets of the low tile after it, all inside `out`.
            unsafe {
                let hi = _mm512_permutex2var_epi16(h0, odd_words, h1);
                let lo = _mm512_permutex2var_epi16(l0, odd_words, l1);
                _mm512_i32scatter_epi32::<4>(out.as_mut_ptr().add(base).cast(), word_rows, hi);
                _mm512_i32scatter_epi32::<4>(out.as_mut_ptr().add(base + TILE_WORDS).cast(), word_rows, lo);
            }
        }
    }
    tiles_buf
}

fn prompt_task<T: Element + KvElement + Lanes>(
    amx: AmxBf16,
    inp: &Inputs<'_, T, i8>,
    packed: &PackedKv,
    start: usize,
    task: &PromptTask,
    mut out_rows: Vec<&mut [MaybeUninit<T>]>,
) {
    let d = inp.dims.head_dim;
    let group = inp.dims.group();
    // Row r is query position i0 + r / group, head g * group + r % group.
    let n_rows = (task.i1 - task.i0) * group;
    let tiles = n_rows.div_ceil(COLS);
    let q = inp.task_queries(amx.simd, task, tiles * COLS);
    // SAFETY: the token proves AVX-512F/BW.
    let q_tiles = unsafe { query_tiles(amx.simd, &q, d) };
    let tile_words = d / 32 * 2 * TILE_WORDS;

    // Keys visible to each column of each query tile (padding columns copy the last real row).
    let mut columns: Vec<Columns> = (0..tiles)
        .map(|qt| Columns::new(std::array::from_fn(|n| start + task.i0 + (qt * COLS + n).min(n_rows - 1) / group + 1)))
        .collect();
    let mut acc = vec![0f32; tiles * d * COLS];

    // SAFETY: an `AmxBf16` exists only after `bf16_available()` returned true.
    let _session = unsafe { TileSession::start() };
    let mut scratch = Scratch::new(d);
    // Spans outside, query tiles inside: a span's keys and values (16 KiB each at D = 64) stay
    // in L1 while every query tile of the task that sees them passes over them.
    let n_keys = columns.iter().map(|c| c.hi_visible()).max().unwrap_or(0);
    for j0 in (0..n_keys).step_by(SPAN) {
        for (qt, cols) in columns.iter_mut().enumerate() {
            if j0 < cols.hi_visible() {
                let q_tile = &q_tiles.as_slice()[qt * tile_words..(qt + 1) * tile_words];
                // SAFETY: the token proves AVX-512F and AMX-BF16 and a session is live.
                unsafe {
                    span_update(
                        amx.simd,
                        packed,
                        d,
                        q_tile,
                        j0,
                        cols,
                        &mut acc[qt * d * COLS..][..d * COLS],
                        &mut scratch,
                    )
                };
            }
        }
    }
    let dq = inp.dequant.expect("the AMX kernel runs over int8 caches");
    let (v_scale, v_offset) = (&dq.v_scale[task.g * d..(task.g + 1) * d], &dq.v_offset[task.g * d..(task.g + 1) * d]);
    for (qt, cols) in columns.iter().enumerate() {
        let tile_acc = &acc[qt * d * COLS..][..d * COLS];
        for n in 0..COLS.min(n_rows - qt * COLS) {
            let r = qt * COLS + n;
            let dst = &mut out_rows[r / group][(r % group) * d..(r % group + 1) * d];
            // SAFETY: the token proves AVX-512F/BW/VL.
            unsafe { store_column(amx.simd, tile_acc, n, 1.0 / cols.l[n], v_scale, v_offset, dst) };
        }
    }
}

/// Lane `i` holds `16 i`: the offsets (in elements) of rows `0..16` of a 16-column tile, for
/// gathers down a column and scatters into one.
#[target_feature(enable = "avx512f")]
fn tile_rows() -> __m512i {
    _mm512_mullo_epi32(
        _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
        _mm512_set1_epi32(COLS as i32),
    )
}

/// `dst[t] = (acc[t * 16 + n] * inv + offset[t]) * scale[t]`: column `n` of a query tile's
/// `O^T`, normalized and dequantized with the value parameters, stored as `T`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn store_column<T: Lanes>(
    _: Avx512,
    acc: &[f32],
    n: usize,
    inv: f32,
    scale: &[f32],
    offset: &[f32],
    dst: &mut [MaybeUninit<T>],
) {
    let d = dst.len();
    assert!(acc.len() == d * COLS && scale.len() == d && offset.len() == d && n < COLS && d.is_multiple_of(16));
    let rows = tile_rows();
    for t0 in (0..d).step_by(16) {
        // SAFETY: the gathered entries are (t0 + i) * 16 + n < d * 16 = acc.len(); the loads
        // and the store cover entries t0 .. t0 + 16 <= d of their slices.
        unsafe {
            let x = _mm512_i32gather_ps::<4>(rows, acc.as_ptr().add(t0 * COLS + n).cast());
            let x = _mm512_fmadd_ps(x, _mm512_set1_ps(inv), _mm512_loadu_ps(offset.as_ptr().add(t0)));
            let y = _mm512_mul_ps(x, _mm512_loadu_ps(scale.as_ptr().add(t0)));
            T::store_raw(dst.as_mut_ptr().add(t0).cast::<T>(), 16, y);
        }
    }
}

/// The online-softmax state of the 16 columns (query rows) of one query tile: how many keys each
/// sees, and its running max (base 2) and sum.
struct Columns {
    visible: [usize; COLS],
    m: [f32; COLS],
    l: [f32; COLS],
}

impl Columns {
    fn new(visible: [usize; COLS]) -> Self {
        Self { visible, m: [f32::NEG_INFINITY; COLS], l: [0.0; COLS] }
    }

    fn hi_visible(&self) -> usize {
        self.visible.iter().copied().max().unwrap_or(0)
    }
}

/// Keys per span: the scores of a span are computed in one run of tile products, its softmax in
/// one pass (the running max and the accumulators are rescaled once per span, not per block),
/// and its values in one run of products. At 128 keys (D = 64) the span's keys and values (16
/// KiB each) and its scores (16 KiB, high and low parts) stay in L1; at 256 the tile products
/// measured twice as slow (operands spilling to L2).
const SPAN: usize = 128;

/// Per-task buffers of [`span_update`].
struct Scratch {
    /// `S^T` of a span, per block of [`KEYS`] keys: `[KEYS, 16]` f32 products with the queries'
    /// high parts, then `[KEYS, 16]` with their low parts.
    s: AlignedVec<f32>,
    /// The `P^T` B tiles of a span: per block of [`KEYS`], the high tile then the low tile.
    p: AlignedVec<u32>,
    /// `O^T` of a span, `[D, 16]` from the probabilities' high parts then `[D, 16]` from their
    /// low parts.
    o: AlignedVec<f32>,
}

impl Scratch {
    fn new(d: usize) -> Self {
        Self {
            s: AlignedVec::zeroed(2 * SPAN * COLS),
            p: AlignedVec::zeroed(SPAN / KEYS * 2 * TILE_WORDS),
            o: AlignedVec::zeroed(2 * d * COLS),
        }
    }
}

/// One query tile over the span of keys from `j0`: scores, online softmax (base 2; the queries
/// carry a factor log2(e)) and values, folded into the tile's `O^T` accumulator `acc`
/// (`[D, 16]`) and its column state.
///
/// # Safety
/// AVX-512F and AMX-BF16 must be usable with a live [`TileSession`] on this thread.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
unsafe fn span_update(
    _: Avx512,
    packed: &PackedKv,
    d: usize,
    q_tile: &[u32],
    j0: usize,
    cols: &mut Columns,
    acc: &mut [f32],
    scratch: &mut Scratch,
) {
    let lo_visible = cols.visible.iter().copied().min().unwrap_or(0);
    let blocks = (cols.hi_visible() - j0).min(SPAN).div_ceil(KEYS);
    let (k, vt) = (packed.k.as_slice(), packed.vt.as_slice());
    assert!(k.len() >= (j0 + blocks * KEYS) * d && vt.len() == k.len());
    assert!(q_tile.len() == d / 32 * 2 * TILE_WORDS && acc.len() == d * COLS && d.is_multiple_of(32));
    let visible_i32: [i32; COLS] = std::array::from_fn(|n| cols.visible[n] as i32);
    // SAFETY: 16 i32 and two arrays of 16 f32.
    let (visible, mut m, mut l) = unsafe {
        (
            _mm512_loadu_si512(visible_i32.as_ptr().cast()),
            _mm512_loadu_ps(cols.m.as_ptr()),
            _mm512_loadu_ps(cols.l.as_ptr()),
        )
    };
    // SAFETY: keys j0 .. j0 + blocks * KEYS lie in the packed keys and values (asserted above);
    // the scratch buffers hold a whole span.
    unsafe { scores(k.as_ptr().add(j0 * d), d, q_tile.as_ptr(), blocks, scratch.s.as_mut_slice()) };
    let (s, p) = (scratch.s.as_slice(), scratch.p.as_mut_slice());
    let corr = softmax_span(s, blocks, j0, lo_visible, visible, &mut m, &mut l, p);
    // SAFETY: as for `scores`.
    unsafe { values(vt.as_ptr().add(j0 * d), d, scratch.p.as_slice(), blocks, scratch.o.as_mut_slice()) };
    let (o_hi, o_lo) = scratch.o.as_slice().split_at(d * COLS);
    for ((a, x), y) in acc.chunks_exact_mut(COLS).zip(o_hi.chunks_exact(COLS)).zip(o_lo.chunks_exact(COLS)) {
        // SAFETY: all three chunks are 16 floats.
        unsafe {
            let o = _mm512_add_ps(_mm512_loadu_ps(x.as_ptr()), _mm512_loadu_ps(y.as_ptr()));
            _mm512_storeu_ps(a.as_mut_ptr(), _mm512_fmadd_ps(_mm512_loadu_ps(a.as_ptr()), corr, o));
        }
    }
    // SAFETY: two arrays of 16 f32.
    unsafe {
        _mm512_storeu_ps(cols.m.as_mut_ptr(), m);
        _mm512_storeu_ps(cols.l.as_mut_ptr(), l);
    }
}

/// `S^T` for the `blocks * 32` keys at `k` against the query tile `q` into `s` (layout in
/// [`Scratch::s`]). Per block, a 2 x 2 outer product of tiles: two key tiles (A) against the
/// query chunk's high and low tiles (B), four independent accumulators, every tile register
/// loaded once per four products.
///
/// # Safety
/// A [`TileSession`] must be live; `k` must point at `blocks * 32` keys of `d` bf16 each (row
/// stride `2 d` bytes) and `q` at the `d / 32` (high, low) B-tile pairs of [`query_tiles`].
#[inline(always)]
unsafe fn scores(k: *const u16, d: usize, q: *const u32, blocks: usize, s: &mut [f32]) {
    assert!(s.len() >= blocks * 2 * KEYS * COLS);
    // SAFETY: every tile load reads 16 rows of 64 bytes inside the ranges the caller
    // guarantees; every store writes a 16 x 16 f32 quarter of the block's part of `s`.
    unsafe {
        for b in 0..blocks {
            std::arch::asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm6",
                "tilezero tmm7",
                options(nostack, nomem)
            );
            for c in 0..d / 32 {
                std::arch::asm!(
                    "tileloadd tmm2, [{ka} + {key} * 1]",
                    "tileloadd tmm3, [{kb} + {key} * 1]",
                    "tileloadd tmm4, [{qh} + {row} * 1]",
                    "tileloadd tmm5, [{ql} + {row} * 1]",
                    "tdpbf16ps tmm0, tmm2, tmm4",
                    "tdpbf16ps tmm1, tmm3, tmm4",
                    "tdpbf16ps tmm6, tmm2, tmm5",
                    "tdpbf16ps tmm7, tmm3, tmm5",
                    ka = in(reg) k.add(b * KEYS * d + c * 32),
                    kb = in(reg) k.add((b * KEYS + 16) * d + c * 32),
                    qh = in(reg) q.add(c * 2 * TILE_WORDS),
                    ql = in(reg) q.add((c * 2 + 1) * TILE_WORDS),
                    key = in(reg) 2 * d,
                    row = in(reg) 64usize,
                    options(nostack, readonly)
                );
            }
            std::arch::asm!(
                "tilestored [{s} + {row} * 1], tmm0",
                "tilestored [{s} + {row} * 1 + 1024], tmm1",
                "tilestored [{s} + {row} * 1 + 2048], tmm6",
                "tilestored [{s} + {row} * 1 + 3072], tmm7",
                s = in(reg) s.as_mut_ptr().add(b * 2 * KEYS * COLS),
                row = in(reg) 64usize,
                options(nostack)
            );
        }
    }
}

/// `O^T` of a span into `o` (layout in [`Scratch::o`]): the transposed values at `vt` (`blocks`
/// blocks of `[D, 32]` bf16) times the probabilities `p` (per block, the high and low B tiles
/// of `P^T`). Two head-dim tiles (A) at a time against the high and low tiles (B): four
/// accumulators over the whole span, every tile register loaded once per four products.
///
/// # Safety
/// A [`TileSession`] must be live; `vt` must point at `blocks * d * 32` bf16.
#[inline(always)]
unsafe fn values(vt: *const u16, d: usize, p: &[u32], blocks: usize, o: &mut [f32]) {
    assert!(o.len() == 2 * d * COLS && d.is_multiple_of(32) && p.len() >= blocks * 2 * TILE_WORDS);
    let (o_hi, o_lo) = o.split_at_mut(d * COLS);
    // SAFETY: the P tiles are 1 KiB blocks of `p` (asserted length); each value tile is 16
    // rows of 64 bytes inside `vt`; each store writes 16 rows of 16 f32 inside `o_hi` or
    // `o_lo` (d * 16 floats each, asserted).
    unsafe {
        for dt in (0..d / 16).step_by(2) {
            std::arch::asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm6",
                "tilezero tmm7",
                options(nostack, nomem)
            );
            for b in 0..blocks {
                std::arch::asm!(
                    "tileloadd tmm2, [{v} + {row} * 1]",
                    "tileloadd tmm3, [{v} + {row} * 1 + 1024]",
                    "tileloadd tmm4, [{ph} + {row} * 1]",
                    "tileloadd tmm5, [{pl} + {row} * 1]",
                    "tdpbf16ps tmm0, tmm2, tmm4",
                    "tdpbf16ps tmm1, tmm3, tmm4",
                    "tdpbf16ps tmm6, tmm2, tmm5",
                    "tdpbf16ps tmm7, tmm3, tmm5",
                    v = in(reg) vt.add(b * KEYS * d + dt * 16 * KEYS),
                    ph = in(reg) p.as_ptr().add(b * 2 * TILE_WORDS),
                    pl = in(reg) p.as_ptr().add((b * 2 + 1) * TILE_WORDS),
                    row = in(reg) 64usize,
                    options(nostack, readonly)
                );
            }
            std::arch::asm!(
                "tilestored [{h} + {row} * 1], tmm0",
                "tilestored [{h} + {row} * 1 + 1024], tmm1",
                "tilestored [{l} + {row} * 1], tmm6",
                "tilestored [{l} + {row} * 1 + 1024], tmm7",
                h = in(reg) o_hi.as_mut_ptr().add(dt * 16 * COLS),
                l = in(reg) o_lo.as_mut_ptr().add(dt * 16 * COLS),
                row = in(reg) 64usize,
                options(nostack)
            );
        }
    }
}

/// Online-softmax update (base 2) of 16 query columns over the span of `blocks * 32` keys from
/// `j0` (scores in `s`, layout in [`Scratch::s`]: a key's score is its high-part product plus
/// its low-part product). Key `j` counts for column `n` iff `j < visible[n]` (checked only from
/// `lo_visible` on, below which every key counts). Updates the running max `m` and sum `l`,
/// writes the probabilities as the high and low B tiles of `P^T` into `p` (zero for keys that
/// do not count), and returns the factor that rescales the columns' accumulators.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
fn softmax_span(
    s: &[f32],
    blocks: usize,
    j0: usize,
    lo_visible: usize,
    visible: __m512i,
    m: &mut __m512,
    l: &mut __m512,
    p: &mut [u32],
) -> __m512 {
    let keys = blocks * KEYS;
    assert!(s.len() >= 2 * keys * COLS && p.len() >= keys * COLS);
    let counts = |jj: usize| -> __mmask16 {
        if j0 + jj >= lo_visible {
            _mm512_cmpgt_epi32_mask(visible, _mm512_set1_epi32((j0 + jj) as i32))
        } else {
            0xffff
        }
    };
    // The score of key jj < keys: its two parts sit at (jj / 32) * 1024 + jj % 32 * 16 and 512
    // after it.
    // SAFETY: both 16-float loads lie inside `s` (asserted length).
    let row = |jj: usize| unsafe {
        let at = s.as_ptr().add((jj / KEYS) * 2 * KEYS * COLS + (jj % KEYS) * COLS);
        _mm512_add_ps(_mm512_loadu_ps(at), _mm512_loadu_ps(at.add(KEYS * COLS)))
    };
    let mut span_max = _mm512_set1_ps(f32::NEG_INFINITY);
    for jj in 0..keys {
        span_max = _mm512_mask_max_ps(span_max, counts(jj), span_max, row(jj));
    }
    let m_new = _mm512_max_ps(*m, span_max);
    // Columns with no key yet keep max -inf; subtracting 0 instead keeps their p at 0, not NaN.
    let no_key = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(m_new, _mm512_set1_ps(f32::NEG_INFINITY));
    let m_safe = _mm512_mask_mov_ps(m_new, no_key, _mm512_setzero_ps());
    let had_key = _mm512_cmp_ps_mask::<_CMP_NEQ_OQ>(*m, _mm512_set1_ps(f32::NEG_INFINITY));
    let corr = exp2_ps(_mm512_sub_ps(*m, m_safe), had_key);
    let mut sum = _mm512_setzero_ps();
    for k in 0..keys / 2 {
        let a = exp2_ps(_mm512_sub_ps(row(2 * k), m_safe), counts(2 * k));
        let b = exp2_ps(_mm512_sub_ps(row(2 * k + 1), m_safe), counts(2 * k + 1));
        sum = _mm512_add_ps(sum, _mm512_add_ps(a, b));
        let (a_hi, a_lo) = split_bf16_ps(a);
        let (b_hi, b_lo) = split_bf16_ps(b);
        // Key pair k sits in block k / 16, word row k % 16 of its high tile and of its low tile.
        let hi = (k / 16 * 2 * TILE_WORDS) + (k % 16) * COLS;
        // SAFETY: word rows of 16 words at `hi` and `hi + TILE_WORDS`, inside `p` (asserted).
        unsafe {
            _mm512_storeu_si512(p.as_mut_ptr().add(hi).cast(), pair_bf16(a_hi, b_hi));
            _mm512_storeu_si512(p.as_mut_ptr().add(hi + TILE_WORDS).cast(), pair_bf16(a_lo, b_lo));
        }
    }
    *l = _mm512_fmadd_ps(*l, corr, sum);
    *m = m_new;
    corr
}

/// `2^x` for lanes in `keep` (0 elsewhere), for `x <= 0` (or -inf): `x = n + r` with
/// `|r| <= 1/2`, a degree-5 polynomial for `2^r` (least squares on Chebyshev nodes, relative
/// error 1.1e-7) and `2^n` applied exactly with `scalef`. Inputs below -126 give `2^-126`-ish
/// values, far below f32 resolution next to the column maximum (`2^0`).
#[target_feature(enable = "avx512f")]
#[allow(clippy::excessive_precision)]
fn exp2_ps(x: __m512, keep: __mmask16) -> __m512 {
    let x = _mm512_max_ps(x, _mm512_set1_ps(-126.0));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x);
    let r = _mm512_sub_ps(x, n);
    let mut y = _mm512_set1_ps(1.340_044_2e-3);
    for c in [9.676_046_7e-3, 5.550_327_2e-2, 2.402_210_7e-1, 6.931_472_1e-1, 1.000_000_1] {
        y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(c));
    }
    _mm512_maskz_scalef_ps(keep, y, n)
}

/// `x = hi + lo` per lane, both parts bf16, each returned as f32 bits with the low 16 bits
/// zero: `hi` is `x` truncated to bf16 (exact remainder `x - hi`, below 2^-7 |x|), `lo` that
/// remainder rounded to bf16 (nearest even), so `|x - hi - lo| <= 2^-16 |x|`. Finite `x`.
#[target_feature(enable = "avx512f")]
fn split_bf16_ps(x: __m512) -> (__m512i, __m512i) {
    let high_half = _mm512_set1_epi32(0xffff_0000_u32 as i32);
    let hi = _mm512_and_si512(_mm512_castps_si512(x), high_half);
    let rest = _mm512_castps_si512(_mm512_sub_ps(x, _mm512_castsi512_ps(hi)));
    // Round to nearest even: add 0x7fff plus the lowest kept bit, then truncate.
    let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(rest), _mm512_set1_epi32(1));
    let rounded = _mm512_add_epi32(_mm512_add_epi32(rest, _mm512_set1_epi32(0x7fff)), lsb);
    (hi, _mm512_and_si512(rounded, high_half))
}

/// The bf16 pairs `(a, b)` of 16 lanes as u32 words: `a`'s bf16 in the low half, `b`'s in the
/// high half (both given as f32 bits with the low 16 bits zero).
#[target_feature(enable = "avx512f")]
fn pair_bf16(a: __m512i, b: __m512i) -> __m512i {
    _mm512_or_si512(_mm512_srli_epi32::<16>(a), b)
}
