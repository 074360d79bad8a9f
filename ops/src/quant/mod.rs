//! Int8 quantization (A8W8C8, DESIGN.md section 6) on the CPU: activation quantization and the
//! int8 linear layer `y = (x_q @ wq^T + bias_q) * deq_scale`.
//!
//! Contracts (mirroring aclnnAscendQuantV3 and aclnnQuantMatmulV4):
//! - [`quantize`]: `q = saturate(round(x * scale + offset))` to [-128, 127], per tensor, static.
//!   `x * scale` and `+ offset` are two f32 operations (no fused multiply-add); `round` is half
//!   away from zero (`f32::round`, as CANN's AscendQuant); NaN quantizes to 0, +-inf saturate.
//! - [`QuantLinear`]: weights int8 `[N, K]` per output channel symmetric, `bias_q` i32 `[N]`
//!   (zero-point correction included), `deq_scale` f32 `[N]`. The dot products accumulate in
//!   i32 (wrapping, as the hardware does), the epilogue is `(acc + bias_q) as f32 * deq_scale`.
//!
//! Kernels, chosen at run time (see [`QuantKernel`]): AMX `tdpbssd` tiles for calls of more than
//! [`SMALL_DECODE_ROWS`] rows when the OS grants tile data, AVX-512 VNNI `vpdpbusd` (activations
//! shifted to u8, the shift folded into the bias at load) for smaller decode calls and on CPUs
//! without AMX, and a portable scalar path. All
//! share one packed weight layout (`pack.rs`), built once at load.
//!
//! Fused ends (bit-identical to the compositions they replace): [`QuantLinear::new_swiglu`]
//! packs an MLP's gate and up projections in channel pairs and applies SwiGLU in the epilogue;
//! [`QuantLinear::forward_add_rms_norm`] (`norm_input.rs`) adds the residual, normalizes and
//! quantizes each input row in one pass; [`QuantLinear::forward_per_token_swiglu`] gates,
//! rotates and quantizes the rows of a down projection in one pass.
//!
//! References: [`quantize_reference`], [`quant_matmul_reference`] (candle ops) and
//! [`quant_accumulators_reference`] (exact integers).

mod a16;
mod amx;
mod cpu;
mod hadamard;
mod norm_input;
mod pack;
mod portable;
mod reference;
mod simd;
#[cfg(test)]
mod tests;
mod vnni;

pub(crate) use a16::SplitInt16Linear;
pub use hadamard::{check_hadamard_block, hadamard_block, hadamard_row, hadamard_row_from, hadamard_rows};
pub use reference::{quant_accumulators_reference, quant_matmul_reference, quantize_reference};

use candle_core::{DType, Device, Result, Tensor, bail};
use rayon::prelude::*;

use crate::host::{Element, with_slice};
use cpu::{GemmArgs, OutPtr, Sink};

/// Rows up to which a call runs the decode kernel (AVX-512 VNNI where AMX is the prefill kernel). Above it,
/// AMX pays even at decode sizes: its 32-row tiles are at least a quarter full, and a GEMV-shaped call of 16 rows
/// measured 1.0-1.7x faster on AMX than on VNNI (`quant_bench decode`, 2 threads), 8 rows about even.
pub const SMALL_DECODE_ROWS: usize = 8;
use pack::{PackedWeights, ROW_TILE, StagedActivations};

/// Quantizes one value: `saturate(round(x * scale + offset))`, NaN -> 0.
#[inline(always)]
pub fn quantize_value(x: f32, scale: f32, offset: f32) -> i8 {
    let v = x * scale + offset;
    // Clamping first is exact (the bounds are integers) and keeps the cast in range; then
    // round half away from zero by truncation plus a correction (vectorizes, unlike roundf).
    let c = if v.is_nan() { 0.0 } else { v.clamp(-128.0, 127.0) };
    let t = c as i32;
    let frac = c - t as f32;
    (t + (frac >= 0.5) as i32 - (frac <= -0.5) as i32) as i8
}

/// A row-major int8 matrix (candle has no i8 dtype).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Int8Matrix {
    pub data: Vec<i8>,
    pub rows: usize,
    pub cols: usize,
}

/// Splits `[..., K]` into (rows, K) and checks the last dimension is not empty.
fn rows_and_cols(x: &Tensor, op: &str) -> Result<(usize, usize)> {
    let Some((&k, outer)) = x.dims().split_last() else {
        bail!("{op}: input must have at least one dimension");
    };
    Ok((outer.iter().product(), k))
}

/// Calls `f(r, values, out)` for each row `r` of `x` (`[..., K]`, f32/f16/bf16, any strides;
/// made contiguous first when needed) and its `dst_stride`-byte chunk of `dst`, in parallel.
fn for_each_row<T: Element>(
    x: &Tensor,
    op: &'static str,
    dst: &mut [u8],
    dst_stride: usize,
    f: impl Fn(usize, &[T], &mut [u8]) + Sync,
) -> Result<()> {
    let (m, k) = rows_and_cols(x, op)?;
    let x = if x.is_contiguous() { x.clone() } else { x.contiguous()? };
    with_slice::<T, _>(&x, op, |data, layout| {
        let src = &data[layout.start_offset()..layout.start_offset() + m * k];
        if m * k >= 64 * 1024 {
            dst.par_chunks_mut(dst_stride).take(m).enumerate().for_each(|(r, out)| f(r, &src[r * k..(r + 1) * k], out));
        } else {
            dst.chunks_mut(dst_stride).take(m).enumerate().for_each(|(r, out)| f(r, &src[r * k..(r + 1) * k], out));
        }
        Ok(())
    })
}

/// `dst = src` widened to f32 (AVX-512 where available).
fn widen_row<T: Element>(src: &[T], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if simd::available() {
        // SAFETY: AVX-512F/BW checked just above.
        unsafe { simd::widen_row(src, dst) };
        return;
    }
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.to_f32();
    }
}

/// `max |x[i]|` as f32, NaN ignored (AVX-512 where available).
fn absmax<T: Element>(x: &[T]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd::available() {
        // SAFETY: AVX-512F/BW checked just above.
        return unsafe { simd::absmax(x) };
    }
    x.iter().fold(0f32, |a, v| a.max(v.to_f32().abs()))
}

/// The per-token symmetric scale of a row with maximum magnitude `absmax`: `absmax / 127`, 1
/// for an all-zero or non-finite row.
fn symmetric_scale(absmax: f32) -> f32 {
    if absmax > 0.0 && absmax.is_finite() { absmax / 127.0 } else { 1.0 }
}

/// Per-row symmetric scales `max|x[r, :]| / 127` (1 for an all-zero or non-finite row) of a
/// contiguous `[m, k]` view of `x`, read in place.
fn row_scales<T: Element>(x: &Tensor, m: usize, k: usize) -> Result<Vec<f32>> {
    with_slice::<T, _>(x, "quant_linear_per_token", |data, layout| {
        let src = &data[layout.start_offset()..layout.start_offset() + m * k];
        let scale = |row: &[T]| symmetric_scale(absmax(row));
        Ok(if m * k >= 64 * 1024 {
            src.par_chunks(k.max(1)).take(m).map(scale).collect()
        } else {
            src.chunks(k.max(1)).take(m).map(scale).collect()
        })
    })
}

/// The rotated per-token quantization: each row of the contiguous `[m, k]` view of `x` is
/// rotated by the block Hadamard matrix into an f32 row (f32 input straight from its row,
/// f16/bf16 widened first), then quantized symmetrically with its own scale `max|row| / 127`
/// (returned) into its staged row.
fn rotate_and_quantize_rows<T: Element>(
    x: &Tensor,
    m: usize,
    k: usize,
    block: usize,
    flip: u8,
    staged: &mut StagedActivations,
) -> Result<Vec<f32>> {
    with_slice::<T, _>(x, "quant_linear_per_token", |data, layout| {
        let src = &data[layout.start_offset()..layout.start_offset() + m * k];
        if let Some(src) = crate::host::as_f32_slice(src) {
            // f32 rows are rotated straight from the input (no widening copy first).
            let row =
                |r: usize, buf: &mut [f32], _: &mut Vec<()>| hadamard_row_from(&src[r * k..(r + 1) * k], buf, block);
            return Ok(quantize_rows(m, k, RowQuant::PerToken { block: 0 }, flip, staged, row));
        }
        let row = |r: usize, buf: &mut [f32], _: &mut Vec<()>| widen_row(&src[r * k..(r + 1) * k], buf);
        Ok(quantize_rows(m, k, RowQuant::PerToken { block }, flip, staged, row))
    })
}

/// The fused SwiGLU input of a down projection: row `r` is `swiglu(x[r, :])` (`x` a
/// contiguous `[m, 2k]` view, gate then up), rounded to `T` as [`crate::swiglu`] stores it,
/// then rotated (`block > 1`) and quantized per token like [`rotate_and_quantize_rows`]. The
/// `[m, k]` SwiGLU output is never materialized.
fn swiglu_and_quantize_rows<T: Element + crate::kernel::simd::Lanes>(
    x: &Tensor,
    m: usize,
    k: usize,
    block: usize,
    flip: u8,
    staged: &mut StagedActivations,
) -> Result<Vec<f32>> {
    let isa = crate::kernel::simd::Avx512::detect();
    with_slice::<T, _>(x, "quant_linear_per_token_swiglu", |data, layout| {
        let src = &data[layout.start_offset()..layout.start_offset() + m * 2 * k];
        let row = |r: usize, buf: &mut [f32], row_t: &mut Vec<T>| {
            let (gate, up) = src[r * 2 * k..(r + 1) * 2 * k].split_at(k);
            row_t.resize(k, T::from_f32(0.0));
            crate::swiglu::swiglu_row_into(gate, up, row_t, isa);
            widen_row(row_t, buf);
        };
        Ok(quantize_rows(m, k, RowQuant::PerToken { block }, flip, staged, row))
    })
}

/// How [`quantize_rows`] quantizes each row.
#[derive(Clone, Copy)]
enum RowQuant {
    /// Static per-tensor parameters: `saturate(round(x * scale + offset))`.
    Static { scale: f32, offset: f32 },
    /// Per-token symmetric, after the block Hadamard rotation of `block` when `block > 1`.
    PerToken { block: usize },
}

/// Quantizes `m` rows of `k` values that `fill(r, buf, scratch)` writes as f32 (`scratch` is a
/// per-thread buffer for the filler's own use) into their staged rows. Per token, each row is
/// rotated by the block Hadamard matrix of `block` (when `block > 1`) and quantized with its
/// own scale `max|row| / 127` (returned; 1 for an all-zero or non-finite row); static rows use
/// the given parameters (the returned scales are then all 1 and unused). Rows run in parallel
/// for large inputs.
fn quantize_rows<S: Send>(
    m: usize,
    k: usize,
    quant: RowQuant,
    flip: u8,
    staged: &mut StagedActivations,
    fill: impl Fn(usize, &mut [f32], &mut Vec<S>) + Sync,
) -> Vec<f32> {
    let stride = staged.stride;
    let mut scales = vec![1f32; m];
    let one = |(buf, scratch): &mut (Vec<f32>, Vec<S>), ((r, out), scale): ((usize, &mut [u8]), &mut f32)| {
        buf.resize(k, 0.0);
        fill(r, buf, scratch);
        match quant {
            RowQuant::Static { scale, offset } => pack::quantize_row(buf, scale, offset, flip, out),
            RowQuant::PerToken { block } => {
                if block > 1 {
                    hadamard_row(buf, block);
                }
                *scale = symmetric_scale(absmax(buf));
                pack::quantize_row(buf, 1.0 / *scale, 0.0, flip, out);
            }
        }
    };
    let dst = &mut staged.data.as_mut_slice()[..m * stride];
    if m * k >= 64 * 1024 {
        let rows = dst.par_chunks_mut(stride).enumerate().zip(scales.par_iter_mut());
        rows.for_each_init(|| (Vec::with_capacity(k), Vec::new()), one);
    } else {
        let mut bufs = (Vec::with_capacity(k), Vec::new());
        dst.chunks_mut(stride).enumerate().zip(scales.iter_mut()).for_each(|r| one(&mut bufs, r));
    }
    scales
}

/// `q = saturate(round(x * scale + offset))` of `x` `[..., K]` (f32, f16 or bf16, any outer
/// strides) into an `Int8Matrix` of `prod(...)` rows and `K` columns.
pub fn quantize(x: &Tensor, scale: f32, offset: f32) -> Result<Int8Matrix> {
    let (rows, cols) = rows_and_cols(x, "quantize")?;
    let mut bytes = vec![0u8; rows * cols];
    if cols > 0 {
        crate::dispatch_float!(x.dtype(), "quantize", T => for_each_row::<T>(x, "quantize", &mut bytes, cols, |_, src, out| pack::quantize_row(src, scale, offset, 0, out)))?;
    }
    let data = bytes.into_iter().map(|b| b as i8).collect();
    Ok(Int8Matrix { data, rows, cols })
}

/// `dst[i] = quantize_value(src[i], scale[i], offset[i])` for the common length: per-channel
/// static parameters (the int8 KV-cache write), AVX-512 where available, bit-identical either way.
pub(crate) fn quantize_row_per_channel<T: Element>(src: &[T], scale: &[f32], offset: &[f32], dst: &mut [i8]) {
    #[cfg(target_arch = "x86_64")]
    if simd::available() {
        // SAFETY: AVX-512F/BW checked just above.
        unsafe { simd::quantize_row_per_channel(src, scale, offset, dst) };
        return;
    }
    quantize_row_per_channel_scalar(src, scale, offset, dst);
}

fn quantize_row_per_channel_scalar<T: Element>(src: &[T], scale: &[f32], offset: &[f32], dst: &mut [i8]) {
    for (((o, &x), &s), &z) in dst.iter_mut().zip(src).zip(scale).zip(offset) {
        *o = quantize_value(x.to_f32(), s, z);
    }
}

/// An int8 kernel family of [`QuantLinear`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantKernel {
    /// AMX `tdpbssd` (needs AMX-INT8 and the OS's XTILEDATA permission).
    Amx,
    /// AVX-512 VNNI `vpdpbusd` with u8-shifted activations.
    Vnni,
    /// Plain loops, any CPU.
    Portable,
}

impl QuantKernel {
    pub fn name(self) -> &'static str {
        match self {
            QuantKernel::Amx => "amx",
            QuantKernel::Vnni => "avx512-vnni",
            QuantKernel::Portable => "portable",
        }
    }

    /// Whether this kernel can run on this machine (and process).
    pub fn is_available(self) -> bool {
        match self {
            QuantKernel::Amx => amx::available(),
            QuantKernel::Vnni => vnni::available(),
            QuantKernel::Portable => true,
        }
    }

    /// Every kernel available here, fastest first.
    pub fn available() -> Vec<QuantKernel> {
        [QuantKernel::Amx, QuantKernel::Vnni, QuantKernel::Portable].into_iter().filter(|k| k.is_available()).collect()
    }
}

/// This machine's kernels for (calls above [`SMALL_DECODE_ROWS`] rows, calls up to it): the
/// fastest available, with VNNI taking the small decode calls where AMX is the prefill kernel.
fn default_kernels() -> (QuantKernel, QuantKernel) {
    let prefill = QuantKernel::available().first().copied().unwrap_or(QuantKernel::Portable);
    let decode =
        if prefill == QuantKernel::Amx && QuantKernel::Vnni.is_available() { QuantKernel::Vnni } else { prefill };
    (prefill, decode)
}

/// An int8 linear layer, `y = (quantize(x) @ wq^T + bias_q) * deq_scale`, packed once at load.
pub struct QuantLinear {
    weights: PackedWeights,
    bias_q: Vec<i32>,
    /// `bias_q - 128 * sum_k wq[n, k]`: the bias of the VNNI path (u8-shifted activations).
    bias_shifted: Vec<i32>,
    deq_scale: Vec<f32>,
    out_features: usize,
    in_features: usize,
    /// Kernel for calls with more than [`SMALL_DECODE_ROWS`] rows.
    prefill_kernel: QuantKernel,
    /// Kernel for calls of up to [`SMALL_DECODE_ROWS`] rows.
    decode_kernel: QuantKernel,
    /// Hadamard block of the per-token path's input rotation (0: none); see
    /// [`with_input_hadamard`](Self::with_input_hadamard).
    input_hadamard: usize,
    /// A gated linear ([`new_swiglu`](Self::new_swiglu)): the weights are packed as pairs of 16
    /// gate and 16 up channels, and every forward returns `silu(gate) * up`.
    swiglu: bool,
}

impl std::fmt::Debug for QuantLinear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuantLinear")
            .field("out_features", &self.out_features)
            .field("in_features", &self.in_features)
            .field("prefill_kernel", &self.prefill_kernel)
            .field("decode_kernel", &self.decode_kernel)
            .field("input_hadamard", &self.input_hadamard)
            .field("swiglu", &self.swiglu)
            .finish()
    }
}

impl QuantLinear {
    /// Packs `wq` (`[N, K]` row-major int8, `N = bias_q.len()`) with `bias_q` `[N]` and
    /// `deq_scale` `[N]`, for the fastest kernel of this machine: AMX (VNNI for calls of up to
    /// [`SMALL_DECODE_ROWS`] rows), else VNNI, else portable.
    pub fn new(wq: &[i8], bias_q: &[i32], deq_scale: &[f32]) -> Result<Self> {
        let (prefill, decode) = default_kernels();
        Self::build(wq, bias_q, deq_scale, prefill, decode, false)
    }

    /// The gate and up projections of a SwiGLU MLP as one gated linear: `wq` is `[2I, K]`
    /// (the `I` gate rows, then the `I` up rows, `I` a multiple of 16), `bias_q` and `deq_scale`
    /// `[2I]` in the same order. Every forward returns `silu(gate) * up`, `[..., I]`, computed
    /// in the GEMM's epilogue: the `[..., 2I]` projection is never stored. Equal to
    /// [`swiglu`](crate::swiglu) of the plain linear's f32 output, bit for bit.
    pub fn new_swiglu(wq: &[i8], bias_q: &[i32], deq_scale: &[f32]) -> Result<Self> {
        let (prefill, decode) = default_kernels();
        Self::build(wq, bias_q, deq_scale, prefill, decode, true)
    }

    /// Like [`new`](Self::new) but forces `kernel` for every call (tests, benchmarks); an error
    /// when the kernel is not available here.
    pub fn with_kernel(wq: &[i8], bias_q: &[i32], deq_scale: &[f32], kernel: QuantKernel) -> Result<Self> {
        if !kernel.is_available() {
            bail!("quant_linear: kernel {} is not available on this machine", kernel.name());
        }
        Self::build(wq, bias_q, deq_scale, kernel, kernel, false)
    }

    /// [`new_swiglu`](Self::new_swiglu) with `kernel` forced for every call (tests, benchmarks).
    pub fn with_kernel_swiglu(wq: &[i8], bias_q: &[i32], deq_scale: &[f32], kernel: QuantKernel) -> Result<Self> {
        if !kernel.is_available() {
            bail!("quant_linear: kernel {} is not available on this machine", kernel.name());
        }
        Self::build(wq, bias_q, deq_scale, kernel, kernel, true)
    }

    fn build(
        wq: &[i8],
        bias_q: &[i32],
        deq_scale: &[f32],
        prefill: QuantKernel,
        decode: QuantKernel,
        swiglu: bool,
    ) -> Result<Self> {
        let n = bias_q.len();
        if n == 0 || wq.is_empty() || !wq.len().is_multiple_of(n) {
            bail!("quant_linear: wq has {} values, not a non-empty [N={n}, K] matrix", wq.len());
        }
        if deq_scale.len() != n {
            bail!("quant_linear: deq_scale has {} values, expected N={n}", deq_scale.len());
        }
        let k = wq.len() / n;
        if swiglu {
            if !n.is_multiple_of(pack::PAIR) {
                bail!("quant_linear: a SwiGLU linear needs 2I output channels with I a multiple of 16, got {n}");
            }
            // Packed row j: gate row 16 p + c for pair p = j / 32, c = j % 32 < 16, else the
            // matching up row I + 16 p + (c - 16).
            let half = n / 2;
            let source = |j: usize| {
                let (p, c) = (j / pack::PAIR, j % pack::PAIR);
                if c < 16 { 16 * p + c } else { half + 16 * p + c - 16 }
            };
            let wq: Vec<i8> = (0..n).flat_map(|j| wq[source(j) * k..(source(j) + 1) * k].iter().copied()).collect();
            let bias_q: Vec<i32> = (0..n).map(|j| bias_q[source(j)]).collect();
            let deq_scale: Vec<f32> = (0..n).map(|j| deq_scale[source(j)]).collect();
            let mut linear = Self::build(&wq, &bias_q, &deq_scale, prefill, decode, false)?;
            linear.swiglu = true;
            return Ok(linear);
        }
        Ok(Self {
            weights: pack::pack_weights(wq, n, k),
            bias_q: bias_q.to_vec(),
            bias_shifted: pack::fold_shift_into_bias(wq, n, k, bias_q),
            deq_scale: deq_scale.to_vec(),
            out_features: n,
            in_features: k,
            prefill_kernel: prefill,
            decode_kernel: decode,
            input_hadamard: 0,
            swiglu: false,
        })
    }

    /// Makes [`forward_per_token`](Self::forward_per_token) rotate each input row by the
    /// block-diagonal Hadamard matrix of `block` (see [`hadamard_rows`]) before quantizing it.
    /// The weights given to the constructor must already be the rotated `W H`, so that
    /// `(x H)(W H)^T = x W^T`.
    pub fn with_input_hadamard(mut self, block: usize) -> Result<Self> {
        check_hadamard_block(self.in_features, block)?;
        self.input_hadamard = block;
        Ok(self)
    }

    /// The Hadamard block of the input rotation (0: none).
    pub fn input_hadamard(&self) -> usize {
        self.input_hadamard
    }

    /// Output channels of the weight (`2I` for a SwiGLU linear).
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// Width of a forward's output rows: `out_features`, or `I` for a SwiGLU linear.
    pub fn output_width(&self) -> usize {
        if self.swiglu { self.out_features / 2 } else { self.out_features }
    }

    /// Reads the packed weights into this core's caches, one cache line at a time, the second
    /// half first (the part a helper thread takes in a call's two-way split), then the first;
    /// `keep_going` is asked before every 4 KiB and ends the walk when it returns false. Run
    /// by an idle thread while another does the serial work before this linear's call, so
    /// that the call reads part of its weights from cache instead of memory.
    pub fn warm_weights(&self, keep_going: &mut dyn FnMut() -> bool) {
        let data = self.weights.data.as_slice();
        let half = data.len() / 2 / 4096 * 4096;
        for range in [half..data.len(), 0..half] {
            for page in data[range].chunks(4096) {
                if !keep_going() {
                    return;
                }
                for line in page.chunks(64) {
                    // SAFETY: reading one byte of a live slice.
                    unsafe { std::ptr::read_volatile(line.as_ptr()) };
                }
            }
        }
    }

    /// Whether this is a gated linear ([`new_swiglu`](Self::new_swiglu)).
    pub fn is_swiglu(&self) -> bool {
        self.swiglu
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// The kernel used for prefill-sized calls: "amx", "avx512-vnni" or "portable".
    pub fn kernel_name(&self) -> &'static str {
        self.prefill_kernel.name()
    }

    /// The kernel used for a call with `rows` rows: the decode kernel up to [`SMALL_DECODE_ROWS`] rows, the
    /// prefill kernel above (decode calls of 9 to 16 rows still split over channels, see `cpu::gemm`).
    pub fn kernel_for_rows(&self, rows: usize) -> QuantKernel {
        if rows <= SMALL_DECODE_ROWS { self.decode_kernel } else { self.prefill_kernel }
    }

    /// Bytes of int8 weights read per forward (bandwidth accounting; `N * K`).
    pub fn weight_bytes(&self) -> usize {
        self.out_features * self.in_features
    }

    fn staging(&self, rows: usize, kernel: QuantKernel) -> StagedActivations {
        let rows_padded = match kernel {
            QuantKernel::Amx if rows <= cpu::AMX_DECODE_ROWS => cpu::AMX_DECODE_ROWS,
            QuantKernel::Amx => rows.div_ceil(ROW_TILE) * ROW_TILE,
            _ => rows,
        };
        StagedActivations::new(rows, rows_padded, self.weights.k_padded)
    }

    fn args(&self, kernel: QuantKernel) -> GemmArgs<'_> {
        let bias = if kernel == QuantKernel::Vnni { &self.bias_shifted } else { &self.bias_q };
        GemmArgs { weights: &self.weights, bias, n: self.out_features, k: self.in_features, kernel }
    }

    /// `y = (saturate(round(x * act_scale + act_offset)) @ wq^T + bias_q) * deq_scale`:
    /// `x` is `[..., K]` (f32, f16 or bf16, any outer strides), `y` is `[..., N]` in `x`'s dtype.
    /// Quantization, the int8 GEMM and the dequantizing epilogue run in one call.
    pub fn forward(&self, x: &Tensor, act_scale: f32, act_offset: f32) -> Result<Tensor> {
        let (m, k) = rows_and_cols(x, "quant_linear")?;
        if k != self.in_features {
            bail!("quant_linear: input has {k} features, weight expects {}", self.in_features);
        }
        let kernel = self.kernel_for_rows(m);
        let mut staged = self.staging(m, kernel);
        let flip = if kernel == QuantKernel::Vnni { 0x80 } else { 0 };
        let stride = staged.stride;
        crate::dispatch_float!(x.dtype(), "quant_linear", T => for_each_row::<T>(x, "quant_linear", staged.data.as_mut_slice(), stride, |_, src, out| pack::quantize_row(src, act_scale, act_offset, flip, out)))?;
        let y = self.gemm_f32(&staged, kernel, None);
        let mut shape = x.dims()[..x.rank() - 1].to_vec();
        shape.push(self.output_width());
        let y = Tensor::from_vec(y, shape, &Device::Cpu)?;
        if x.dtype() == DType::F32 { Ok(y) } else { y.to_dtype(x.dtype()) }
    }

    /// Dynamic per-token (per-row) symmetric activations: each row `x[m]` is quantized with
    /// its own scale `s[m] = max|x[m, :]| / 127` (1 for an all-zero row, zero point 0) at run
    /// time, then `y[m, n] = (x_q[m] @ wq[n]^T + bias_q[n]) * deq_scale[n] * s[m]`. Build the
    /// linear with `deq_scale` = the weight scales and a zero `bias_q` for the usual
    /// `y = x W^T`; a float bias is added by the caller. Handles activations whose outliers
    /// move from token to token (e.g. the input of the MLP down projection), where one static
    /// per-tensor range is too coarse. `x` is `[..., K]` (f32, f16 or bf16); `y` `[..., N]` in
    /// `x`'s dtype.
    pub fn forward_per_token(&self, x: &Tensor) -> Result<Tensor> {
        let (m, k) = rows_and_cols(x, "quant_linear_per_token")?;
        if k != self.in_features {
            bail!("quant_linear_per_token: input has {k} features, weight expects {}", self.in_features);
        }
        let kernel = self.kernel_for_rows(m);
        let mut staged = self.staging(m, kernel);
        let flip = if kernel == QuantKernel::Vnni { 0x80 } else { 0 };
        let stride = staged.stride;
        let x = if x.is_contiguous() { x.clone() } else { x.contiguous()? };
        let scales = if self.input_hadamard > 1 {
            let block = self.input_hadamard;
            crate::dispatch_float!(x.dtype(), "quant_linear_per_token", T => rotate_and_quantize_rows::<T>(&x, m, k, block, flip, &mut staged))?
        } else {
            let scales = crate::dispatch_float!(x.dtype(), "quant_linear_per_token", T => row_scales::<T>(&x, m, k))?;
            crate::dispatch_float!(x.dtype(), "quant_linear_per_token", T => for_each_row::<T>(&x, "quant_linear_per_token", staged.data.as_mut_slice(), stride, |r, src, out| pack::quantize_row(src, 1.0 / scales[r], 0.0, flip, out)))?;
            scales
        };
        let y = self.gemm_f32(&staged, kernel, Some(&scales));
        let mut shape = x.dims()[..x.rank() - 1].to_vec();
        shape.push(self.output_width());
        let y = Tensor::from_vec(y, shape, &Device::Cpu)?;
        if x.dtype() == DType::F32 { Ok(y) } else { y.to_dtype(x.dtype()) }
    }

    /// [`forward_per_token`](Self::forward_per_token) of `swiglu(x)` (`x` `[..., 2K]`, gate then
    /// up halves, as [`crate::swiglu`] takes it), without materializing the `[..., K]` SwiGLU
    /// output: each row is gated, rotated and quantized in one pass while it is in L1. Equal to
    /// `forward_per_token(&swiglu(x)?)` bit for bit.
    pub fn forward_per_token_swiglu(&self, x: &Tensor) -> Result<Tensor> {
        const OP: &str = "quant_linear_per_token_swiglu";
        let (m, width) = rows_and_cols(x, OP)?;
        if width != 2 * self.in_features {
            bail!("{OP}: input has {width} features, expected gate and up halves of {} each", self.in_features);
        }
        let k = self.in_features;
        let kernel = self.kernel_for_rows(m);
        let mut staged = self.staging(m, kernel);
        let flip = if kernel == QuantKernel::Vnni { 0x80 } else { 0 };
        let x = if x.is_contiguous() { x.clone() } else { x.contiguous()? };
        let block = self.input_hadamard;
        let scales = crate::dispatch_float!(x.dtype(), OP, T => swiglu_and_quantize_rows::<T>(&x, m, k, block, flip, &mut staged))?;
        let y = self.gemm_f32(&staged, kernel, Some(&scales));
        let mut shape = x.dims()[..x.rank() - 1].to_vec();
        shape.push(self.output_width());
        let y = Tensor::from_vec(y, shape, &Device::Cpu)?;
        if x.dtype() == DType::F32 { Ok(y) } else { y.to_dtype(x.dtype()) }
    }

    /// Runs the GEMM with the f32 epilogue (times `row_scale[m]` when given; SwiGLU for a
    /// gated linear) into a fresh `rows x output_width` vector (not zero-filled first: the GEMM
    /// writes every element).
    fn gemm_f32(&self, staged: &StagedActivations, kernel: QuantKernel, row_scale: Option<&[f32]>) -> Vec<f32> {
        let width = self.output_width();
        let len = staged.rows * width;
        let mut y = Vec::<f32>::with_capacity(len);
        let (out, deq_scale) = (OutPtr(y.as_mut_ptr()), &self.deq_scale);
        let sink = if self.swiglu {
            Sink::SwiGlu { out, deq_scale, row_scale, width }
        } else {
            Sink::F32 { out, deq_scale, row_scale }
        };
        cpu::gemm(staged, &self.args(kernel), sink);
        // SAFETY: `gemm` wrote every element of the `rows x width` output (its tasks cover all
        // rows and all channel pairs, and each block stores all of its valid rows and channels,
        // or for a gated linear the 16 gated columns of each pair), inside the capacity `len`
        // reserved above.
        unsafe { y.set_len(len) };
        y
    }

    fn check_quantized(&self, xq: &Int8Matrix) -> Result<()> {
        if xq.cols != self.in_features || xq.data.len() != xq.rows * xq.cols {
            bail!(
                "quant_linear: input is {}x{} ({} values), weight expects K={}",
                xq.rows,
                xq.cols,
                xq.data.len(),
                self.in_features
            );
        }
        Ok(())
    }

    /// `(xq @ wq^T + bias_q) * deq_scale` for already quantized rows, `[rows, N]` row-major f32
    /// (`[rows, I]` after SwiGLU for a gated linear).
    pub fn forward_quantized(&self, xq: &Int8Matrix) -> Result<Vec<f32>> {
        self.check_quantized(xq)?;
        let kernel = self.kernel_for_rows(xq.rows);
        let mut staged = self.staging(xq.rows, kernel);
        pack::stage_int8(&xq.data, xq.rows, xq.cols, kernel == QuantKernel::Vnni, &mut staged);
        Ok(self.gemm_f32(&staged, kernel, None))
    }

    /// The int32 accumulators before the epilogue, `xq @ wq^T + bias_q` (`[rows, N]` row-major,
    /// wrapping i32 like the hardware): the exact-integer test hook.
    pub fn forward_accumulators(&self, xq: &Int8Matrix) -> Result<Vec<i32>> {
        self.check_quantized(xq)?;
        if self.swiglu {
            bail!("quant_linear: a SwiGLU linear has no raw accumulators (its channels are packed in gate/up pairs)");
        }
        let kernel = self.kernel_for_rows(xq.rows);
        let mut staged = self.staging(xq.rows, kernel);
        pack::stage_int8(&xq.data, xq.rows, xq.cols, kernel == QuantKernel::Vnni, &mut staged);
        let mut acc = vec![0i32; xq.rows * self.out_features];
        cpu::gemm(&staged, &self.args(kernel), Sink::I32 { out: OutPtr(acc.as_mut_ptr()) });
        Ok(acc)
    }
}
