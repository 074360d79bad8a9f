//! The rayon work split, the per-kernel block loops and the dequantizing epilogue.
//!
//! Decode (<= 16 rows, VNNI or AMX): tasks are runs of channel pairs, all rows each (a GEMV streaming the
//! packed weights once). Prefill: tasks are one 32-row block x a group of pairs (~256 KiB of
//! weights, shared through L2 by consecutive tasks); AMX additionally cuts K into chunks of at
//! most 640 so the block's activations stay in L1 (see `amx::k_chunk`).

use rayon::prelude::*;

use super::pack::{PAIR, PackedWeights, ROW_TILE, StagedActivations};
use super::{QuantKernel, amx, portable, vnni};

/// Integer accumulators of one block: up to 32 rows x 32 channels.
pub(crate) type AccTile = [[i32; PAIR]; ROW_TILE];

/// Rows up to which a call is treated as decode: split over channels only (a GEMV streaming the
/// packed weights once, on VNNI up to `SMALL_DECODE_ROWS` rows and on the 16-row AMX tile above).
pub(crate) const DECODE_ROWS: usize = 16;
/// Rows up to which an AMX call uses the 16-row tile ([`amx::tile16`]) instead of 32-row blocks.
pub(crate) const AMX_DECODE_ROWS: usize = 16;
/// Decode calls are cut into this many contiguous channel ranges per thread: each task streams
/// its weights in one run, and the spare task per thread still lets an idle thread take over a
/// slowed one's second half. Measured on a SmolLM2-shaped pass of batch-1 GEMVs over 134 MB
/// (`quant_bench stream`, 2 threads, medians of 5 interleaved runs): 1.19x the read probe's
/// time with 2 tasks per thread against 1.28x with 8 (more, shorter runs restart the
/// prefetchers and add steals).
const DECODE_TASKS_PER_THREAD: usize = 2;
/// Rows of one prefill task: one 32-row block, whose activations (32 x K bytes) stay in L1
/// while the task streams its group of weight pairs from L2 (measured faster than taller row
/// blocks, where activations and weights evict each other from L1).
const ROW_BLOCK: usize = ROW_TILE;

/// Where the epilogue writes: dequantized f32, or raw `acc + bias_q` (for exact tests).
#[derive(Clone, Copy)]
pub(crate) enum Sink<'a> {
    /// `(acc + bias) as f32 * deq_scale[n]`, then `* row_scale[m]` when given (per-token
    /// activation scales, applied in the same pass).
    F32 {
        out: OutPtr<f32>,
        deq_scale: &'a [f32],
        row_scale: Option<&'a [f32]>,
    },
    /// A gated linear (`QuantLinear::new_swiglu`): each pair is 16 gate channels then the 16
    /// matching up channels; both are dequantized as for `F32`, then `silu(gate) * up` goes to
    /// column `n0 / 2 + c` of an output `width` (= N / 2) columns wide.
    SwiGlu {
        out: OutPtr<f32>,
        deq_scale: &'a [f32],
        row_scale: Option<&'a [f32]>,
        width: usize,
    },
    I32 {
        out: OutPtr<i32>,
    },
    /// 16-bit activations split into bytes (see `a16`): staged rows come in blocks of
    /// `2 * tokens_per_block`, the high bytes of the block's tokens then their low bytes, and
    /// `out[t, n] = ((hi + hi_bias[n]) * 256 + (lo + lo_bias[n])) as f32 * w_scale[n] *
    /// row_scale[t] + bias[n]` for the `tokens` real tokens.
    Split16 {
        out: OutPtr<f32>,
        tokens_per_block: usize,
        tokens: usize,
        hi_bias: &'a [i32],
        lo_bias: &'a [i32],
        w_scale: &'a [f32],
        row_scale: &'a [f32],
        bias: Option<&'a [f32]>,
    },
}

/// Raw output pointer shared by tasks that write disjoint (row, channel) blocks.
#[derive(Clone, Copy)]
pub(crate) struct OutPtr<T>(pub(crate) *mut T);
// SAFETY: every task writes a disjoint set of output elements (its own rows x channel pairs),
// and the buffer outlives the parallel region (it is borrowed mutably by the caller of `gemm`).
unsafe impl<T> Send for OutPtr<T> {}
// SAFETY: as above: no two tasks touch the same element.
unsafe impl<T> Sync for OutPtr<T> {}

impl<T> OutPtr<T> {
    /// The pointer `offset` elements on (a method, so that closures capture the whole
    /// `Sync` wrapper rather than its raw pointer field).
    ///
    /// # Safety
    /// As for `pointer::add`: the result must stay inside the caller's buffer.
    pub(crate) unsafe fn add(self, offset: usize) -> *mut T {
        // SAFETY: forwarded to the caller.
        unsafe { self.0.add(offset) }
    }
}

/// Everything a kernel call needs besides the activations.
pub(crate) struct GemmArgs<'a> {
    pub(crate) weights: &'a PackedWeights,
    /// The kernel's bias: `bias_q`, or the shift-folded bias for VNNI.
    pub(crate) bias: &'a [i32],
    pub(crate) n: usize,
    pub(crate) k: usize,
    pub(crate) kernel: QuantKernel,
}

/// Computes `out[m, n] = epilogue(sum_k x[m, k] wq[n, k] + bias[n])` for the `x.rows` staged
/// rows (staged for `args.kernel`). `out` must hold `x.rows * n` elements.
pub(crate) fn gemm(x: &StagedActivations, args: &GemmArgs<'_>, sink: Sink<'_>) {
    let m = x.rows;
    let pairs = args.weights.n_padded / PAIR;
    let threads = rayon::current_num_threads().max(1);
    let run = |rows: std::ops::Range<usize>, pair_range: std::ops::Range<usize>| {
        run_block(x, args, sink, rows, pair_range);
    };
    if m <= DECODE_ROWS {
        let chunk = pairs.div_ceil(threads * DECODE_TASKS_PER_THREAD).max(1);
        let tasks = pairs.div_ceil(chunk);
        if tasks <= 1 || m * args.n * args.k < 64 * 1024 {
            run(0..m, 0..pairs);
        } else {
            (0..tasks).into_par_iter().for_each(|t| run(0..m, t * chunk..((t + 1) * chunk).min(pairs)));
        }
    } else {
        // Prefill: tasks of ROW_BLOCK rows x a group of pairs (~256 KiB of packed weights, kept
        // in L2 across consecutive tasks: the row block index varies fastest).
        let group = (256 * 1024 / (args.weights.k_padded * PAIR)).clamp(1, pairs);
        let row_blocks = m.div_ceil(ROW_BLOCK);
        let groups = pairs.div_ceil(group);
        (0..row_blocks * groups).into_par_iter().for_each(|t| {
            let (g, rb) = (t / row_blocks, t % row_blocks);
            let r0 = rb * ROW_BLOCK;
            run(r0..(r0 + ROW_BLOCK).min(m), g * group..((g + 1) * group).min(pairs));
        });
    }
}

/// One task: every 32-row block of `rows` against every channel pair of `pair_range`.
fn run_block(
    x: &StagedActivations,
    args: &GemmArgs<'_>,
    sink: Sink<'_>,
    rows: std::ops::Range<usize>,
    pair_range: std::ops::Range<usize>,
) {
    let w = args.weights;
    let k_groups = args.k.div_ceil(4);
    let mut acc: AccTile = [[0; PAIR]; ROW_TILE];
    let _session = match args.kernel {
        // SAFETY: the AMX kernel is selected only when `amx::available()` (checked in
        // `QuantLinear::with_kernel`).
        QuantKernel::Amx => Some(unsafe { amx::TileSession::start() }),
        _ => None,
    };
    // Split 16-bit activations: the second 16 rows of every 32-row block are unsigned low bytes.
    let split = matches!(sink, Sink::Split16 { .. });
    if args.kernel == QuantKernel::Amx && rows.len() <= AMX_DECODE_ROWS && !split {
        // Decode: one 16-row tile pair per channel pair over the whole K (16 x K activation
        // bytes stay in L1 while the weights stream past once).
        for p in pair_range {
            let panels = [w.panel(2 * p), w.panel(2 * p + 1)];
            // SAFETY: a TileSession is live (above); AMX staging pads calls of up to 16 rows
            // to 16 rows and longer ones to a multiple of 32 (rows.start is a multiple of 32
            // then), so rows rows.start..rows.start + 16 exist at stride k_padded; panels hold
            // 16 * k_padded bytes.
            unsafe { amx::tile16(x, rows.start, panels, w.k_padded, &mut acc) };
            store(&acc, rows.len(), rows.start, p * PAIR, args, sink);
        }
        return;
    }
    if args.kernel == QuantKernel::Amx {
        // K chunks outermost (per 32-row block): the block's activation chunk stays in L1
        // while every pair of the task streams past it; partial sums wait in `accs`.
        let chunk = amx::k_chunk(w.k_padded);
        // One accumulator block per pair only when partial sums must survive across chunks.
        let multi_chunk = chunk < w.k_padded;
        let mut accs: Vec<AccTile> = vec![[[0; PAIR]; ROW_TILE]; if multi_chunk { pair_range.len() } else { 1 }];
        let mut r0 = rows.start;
        while r0 < rows.end {
            let mr = ROW_TILE.min(rows.end - r0);
            let mut k0 = 0;
            while k0 < w.k_padded {
                let k1 = (k0 + chunk).min(w.k_padded);
                for (i, p) in pair_range.clone().enumerate() {
                    let acc = &mut accs[if multi_chunk { i } else { 0 }];
                    let panels = [w.panel(2 * p), w.panel(2 * p + 1)];
                    // SAFETY: a TileSession is live (above); staging for AMX pads rows to a
                    // multiple of ROW_TILE with stride k_padded; panels hold 16 * k_padded
                    // bytes; k0 and k1 are multiples of 64 within k_padded.
                    unsafe { amx::tile(x, r0, panels, k0..k1, w.k_padded, acc, k0 > 0, split) };
                    if k1 == w.k_padded {
                        // Last chunk: dequantize while the block is still in L1.
                        store(acc, mr, r0, p * PAIR, args, sink);
                    }
                }
                k0 = k1;
            }
            r0 += mr;
        }
        return;
    }
    for p in pair_range {
        let panels = [w.panel(2 * p), w.panel(2 * p + 1)];
        let mut r0 = rows.start;
        while r0 < rows.end {
            let mr = ROW_TILE.min(rows.end - r0);
            match args.kernel {
                // SAFETY: VNNI is selected only when `vnni::available()`; rows r0..r0+mr exist
                // with k_padded >= 4 * k_groups bytes, panels hold 64 * k_groups bytes.
                QuantKernel::Vnni => unsafe { vnni::tile(x, r0, mr, panels, k_groups, &mut acc) },
                _ => portable::tile(x, r0, mr, panels, k_groups, &mut acc),
            }
            store(&acc, mr, r0, p * PAIR, args, sink);
            r0 += mr;
        }
    }
}

/// One accumulator as every f32 epilogue dequantizes it: `(acc + bias) as f32 * deq`, then
/// `* row_scale` when given (the AVX-512 `simd::dequantize_row` computes the same).
fn dequantize_value(acc: i32, bias: i32, deq: f32, row_scale: Option<f32>) -> f32 {
    let y = acc.wrapping_add(bias) as f32 * deq;
    row_scale.map_or(y, |s| y * s)
}

/// Writes `mr` rows of a block to the output (valid channels only), adding the bias and,
/// for the f32 sink, multiplying by `deq_scale` (and the row's scale when given).
fn store(acc: &AccTile, mr: usize, r0: usize, n0: usize, args: &GemmArgs<'_>, sink: Sink<'_>) {
    let n = args.n;
    let cols = PAIR.min(n - n0);
    match sink {
        Sink::Split16 { out, tokens_per_block, tokens, hi_bias, lo_bias, w_scale, row_scale, bias } => {
            let t = tokens_per_block;
            assert!(mr == 2 * t && r0.is_multiple_of(2 * t), "split16: blocks of {} staged rows", 2 * t);
            // Block r0 / (2t) holds tokens from (r0 / 2t) * t = r0 / 2.
            let t0 = r0 / 2;
            let valid = t.min(tokens - t0);
            let ch = n0..n0 + cols;
            let (hb, lb, ws) = (&hi_bias[ch.clone()], &lo_bias[ch.clone()], &w_scale[ch.clone()]);
            let fb = bias.map(|b| &b[ch]);
            for i in 0..valid {
                let (hi, lo, rs) = (&acc[i], &acc[t + i], row_scale[t0 + i]);
                // SAFETY: token t0 + i < tokens and channels n0..n0 + cols <= n lie inside the
                // tokens x n output, and this task is the only writer of this block.
                let dst = unsafe { std::slice::from_raw_parts_mut(out.0.add((t0 + i) * n + n0), cols) };
                for c in 0..cols {
                    let v = hi[c].wrapping_add(hb[c]) as f32 * 256.0 + lo[c].wrapping_add(lb[c]) as f32;
                    let y = v * (ws[c] * rs);
                    dst[c] = match fb {
                        Some(b) => y + b[c],
                        None => y,
                    };
                }
            }
        }
        Sink::F32 { out, deq_scale, row_scale } => {
            let (bias, deq) = (&args.bias[n0..n0 + cols], &deq_scale[n0..n0 + cols]);
            let row_scale = row_scale.map(|s| &s[r0..r0 + mr]);
            #[cfg(target_arch = "x86_64")]
            if super::simd::available() {
                // SAFETY: AVX-512 checked just above; rows r0..r0 + mr < m and channels
                // n0..n0 + cols <= n lie inside the m x n output, and this task is the only
                // writer of this (rows, pair) block; row_scale holds mr values.
                unsafe {
                    super::simd::dequantize_block(acc, mr, bias, deq, row_scale, out.0.add(r0 * n + n0), n, cols)
                };
                return;
            }
            for (r, acc_row) in acc.iter().enumerate().take(mr) {
                // SAFETY: as above (row r0 + r, channels n0..n0 + cols, exclusive).
                let dst = unsafe { std::slice::from_raw_parts_mut(out.0.add((r0 + r) * n + n0), cols) };
                for c in 0..cols {
                    dst[c] = dequantize_value(acc_row[c], bias[c], deq[c], row_scale.map(|s| s[r]));
                }
            }
        }
        Sink::SwiGlu { out, deq_scale, row_scale, width } => {
            assert!(cols == PAIR, "swiglu sink: gated linears have whole channel pairs");
            let (bias, deq) = (&args.bias[n0..n0 + PAIR], &deq_scale[n0..n0 + PAIR]);
            let row_scale = row_scale.map(|s| &s[r0..r0 + mr]);
            let half = PAIR / 2;
            // SAFETY: rows r0..r0 + mr < m and columns n0 / 2..n0 / 2 + 16 <= width lie inside
            // the m x width output; this task is the only writer of this (rows, pair) block.
            let dst = unsafe { out.add(r0 * width + n0 / 2) };
            #[cfg(target_arch = "x86_64")]
            if let Some(isa) = crate::kernel::simd::Avx512::detect() {
                // SAFETY: as above; bias and deq hold 32 values, row_scale mr.
                unsafe { super::simd::dequantize_swiglu_block(isa, acc, mr, bias, deq, row_scale, dst, width) };
                return;
            }
            for (r, acc_row) in acc.iter().enumerate().take(mr) {
                // SAFETY: as above (row r0 + r, 16 columns, exclusive).
                let dst = unsafe { std::slice::from_raw_parts_mut(dst.add(r * width), half) };
                let dequant = |c: usize| dequantize_value(acc_row[c], bias[c], deq[c], row_scale.map(|s| s[r]));
                for (c, y) in dst.iter_mut().enumerate() {
                    *y = crate::swiglu::silu_mul(dequant(c), dequant(half + c));
                }
            }
        }
        Sink::I32 { out } => {
            let bias = &args.bias[n0..n0 + cols];
            for (r, acc_row) in acc.iter().enumerate().take(mr) {
                // SAFETY: as above (row r0 + r, channels n0..n0 + cols, exclusive).
                let dst = unsafe { std::slice::from_raw_parts_mut(out.0.add((r0 + r) * n + n0), cols) };
                for c in 0..cols {
                    dst[c] = acc_row[c].wrapping_add(bias[c]);
                }
            }
        }
    }
}
