//! Int8 weights against 16-bit activations on the int8 kernels (the CPU form of W8A16 where AMX
//! is granted).
//!
//! Each activation row is quantized symmetrically to int16 with its own scale
//! `s[t] = max|x[t, :]| / 32767`, `q = round_half_even(x / s)`, and split into a signed high byte
//! and an unsigned low byte, `q = 256 * hi + lo`. Both byte rows run through the int8 kernels
//! against the same packed weights (AMX: `tdpbssd` for the high rows, `tdpbusd` for the low rows,
//! one weight tile load for both), so `sum_k q[k] w[k] = 256 * sum_k hi[k] w[k] + sum_k lo[k] w[k]`
//! is exact in integers. The epilogue is `(256 * hi_acc + lo_acc) * w_scale[n] * s[t] + bias[n]`.
//! The only rounding before the epilogue is the activation's, at most `s / 2` per element
//! (15 bits below the row's maximum: finer than f16 activations for the row's large values).
//!
//! Staged layout: tokens in blocks of `T` (16 on AMX, the tile height; up to 16 otherwise), each
//! block `2T` rows: the high bytes of its tokens, then their low bytes. The kernels see the bytes
//! as they natively read them, and a per-channel bias undoes the encoding:
//! - AMX: high rows signed, low rows unsigned (`tdpbusd`): no correction.
//! - VNNI (`vpdpbusd`, unsigned activations): high rows stored as `hi + 128`, corrected by
//!   `-128 * sum_k w[n, k]`; low rows as they are.
//! - portable (signed activations): low rows stored as `lo - 128`, corrected by
//!   `+128 * sum_k w[n, k]`.

use rayon::prelude::*;

use super::cpu::{self, GemmArgs, OutPtr, Sink};
use super::pack::{self, PackedWeights, StagedActivations};
use super::{QuantKernel, SMALL_DECODE_ROWS, absmax, default_kernels};

/// Tokens per staged block on AMX (one tile of rows per byte plane).
const AMX_TOKENS: usize = 16;

/// Packed int8 weights `[N, K]` for 16-bit activations, with the encoding corrections.
pub(crate) struct SplitInt16Linear {
    weights: PackedWeights,
    /// `-128 * sum_k w[n, k]` (VNNI high rows).
    minus_128_wsum: Vec<i32>,
    /// `128 * sum_k w[n, k]` (portable low rows).
    plus_128_wsum: Vec<i32>,
    zeros: Vec<i32>,
    n: usize,
    k: usize,
}

impl SplitInt16Linear {
    /// Packs `wq` (`[n, k]` row-major int8).
    pub(crate) fn new(wq: &[i8], n: usize, k: usize) -> Self {
        assert_eq!(wq.len(), n * k, "split16: weight is not [n, k]");
        let zeros = vec![0; n];
        // The VNNI shift correction of `QuantLinear`, on a zero bias.
        let minus_128_wsum = pack::fold_shift_into_bias(wq, n, k, &zeros);
        Self {
            weights: pack::pack_weights(wq, n, k),
            plus_128_wsum: minus_128_wsum.iter().map(|s| s.wrapping_neg()).collect(),
            minus_128_wsum,
            zeros,
            n,
            k,
        }
    }

    /// Bytes of packed weights read per forward.
    pub(crate) fn weight_bytes(&self) -> usize {
        self.weights.n_padded * self.weights.k_padded
    }

    /// Weight row `r` as int8 values (`K` of them), read back from the panel layout.
    pub(crate) fn row(&self, r: usize) -> impl Iterator<Item = i8> + '_ {
        assert!(r < self.n, "split16: row {r} out of range");
        self.weights.row(r, self.k)
    }

    /// The kernel for a call of `m` rows: `QuantLinear`'s choice (see `default_kernels`);
    /// `portable` forces the scalar kernel.
    pub(crate) fn kernel_for(m: usize, portable: bool) -> QuantKernel {
        let (prefill, decode) = default_kernels();
        match () {
            _ if portable => QuantKernel::Portable,
            _ if m <= SMALL_DECODE_ROWS => decode,
            _ => prefill,
        }
    }

    /// `out[t, n] = sum_k x[t, k] w[n, k] * w_scale[n] + bias[n]` for `m` f32 rows `x` (through
    /// int16 activations, see the module doc) on `kernel`; `w_scale` and `bias` hold `N` values.
    pub(crate) fn forward(
        &self,
        x: &[f32],
        m: usize,
        out: &mut [f32],
        w_scale: &[f32],
        bias: Option<&[f32]>,
        kernel: QuantKernel,
    ) {
        let (n, k) = (self.n, self.k);
        assert!(x.len() >= m * k && out.len() >= m * n && w_scale.len() >= n && bias.is_none_or(|b| b.len() >= n));
        assert!(kernel.is_available(), "split16: kernel {} not available", kernel.name());
        if m == 0 {
            return;
        }
        let t = if kernel == QuantKernel::Amx { AMX_TOKENS } else { m.min(AMX_TOKENS) };
        let blocks = m.div_ceil(t);
        let mut staged = StagedActivations::new(2 * t * blocks, 2 * t * blocks, self.weights.k_padded);
        let (hi_flip, lo_flip) = match kernel {
            QuantKernel::Vnni => (0x80, 0),
            QuantKernel::Portable => (0, 0x80),
            QuantKernel::Amx => (0, 0),
        };
        let mut row_scale = vec![0f32; m];
        let stride = staged.stride;
        let stage_block = |(b, (dst, scales)): (usize, (&mut [u8], &mut [f32]))| {
            for (i, s) in scales.iter_mut().enumerate() {
                let tok = b * t + i;
                let (hi_rows, lo_rows) = dst.split_at_mut(t * stride);
                *s = split_row(
                    &x[tok * k..(tok + 1) * k],
                    &mut hi_rows[i * stride..i * stride + k],
                    &mut lo_rows[i * stride..i * stride + k],
                    hi_flip,
                    lo_flip,
                );
            }
        };
        let block_bytes = 2 * t * stride;
        if m * k >= 64 * 1024 {
            let planes = staged.data.as_mut_slice().par_chunks_mut(block_bytes);
            planes.zip(row_scale.par_chunks_mut(t)).enumerate().for_each(stage_block);
        } else {
            let planes = staged.data.as_mut_slice().chunks_mut(block_bytes);
            planes.zip(row_scale.chunks_mut(t)).enumerate().for_each(stage_block);
        }
        let (hi_bias, lo_bias) = match kernel {
            QuantKernel::Vnni => (&self.minus_128_wsum, &self.zeros),
            QuantKernel::Portable => (&self.zeros, &self.plus_128_wsum),
            QuantKernel::Amx => (&self.zeros, &self.zeros),
        };
        let sink = Sink::Split16 {
            out: OutPtr(out.as_mut_ptr()),
            tokens_per_block: t,
            tokens: m,
            hi_bias,
            lo_bias,
            w_scale,
            row_scale: &row_scale,
            bias,
        };
        let args = GemmArgs { weights: &self.weights, bias: &[], n, k, kernel };
        cpu::gemm(&staged, &args, sink);
    }
}

/// Quantizes one row to int16 with scale `max|x| / 32767` (round half to even) and writes its
/// high bytes (XOR `hi_flip`) and low bytes (XOR `lo_flip`). Returns the scale: 1 for an
/// all-zero row, NaN when the row holds a NaN or an infinity (its outputs are then NaN, as a
/// float matmul's would be).
fn split_row(x: &[f32], hi: &mut [u8], lo: &mut [u8], hi_flip: u8, lo_flip: u8) -> f32 {
    let max = absmax(x);
    if !max.is_finite() || x.iter().any(|v| v.is_nan()) {
        hi.fill(hi_flip);
        lo.fill(lo_flip);
        return f32::NAN;
    }
    let scale = if max > 0.0 { max / 32767.0 } else { 1.0 };
    let inv = 1.0 / scale;
    // Adding and subtracting 1.5 * 2^23 rounds |v| < 2^22 to the nearest integer, ties to even.
    const ROUND: f32 = 12_582_912.0;
    for ((&v, h), l) in x.iter().zip(hi.iter_mut()).zip(lo.iter_mut()) {
        let r = ((v * inv + ROUND) - ROUND).clamp(-32767.0, 32767.0) as i32;
        *h = ((r >> 8) as u8) ^ hi_flip;
        *l = ((r & 0xff) as u8) ^ lo_flip;
    }
    scale
}
