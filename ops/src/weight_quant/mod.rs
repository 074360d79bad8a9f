//! W8A16 linear layer: int8 weights, float activations (CANN `aclnnWeightQuantBatchMatmulV2`).
//!
//! Contract: `y = x @ ((w_q + offset) * scale)^T + bias`, with
//! - `w_q` int8 `[N, K]`, quantized per output channel: `scale` `[N]` f32 and an optional
//!   `offset` `[N]` f32 (absent = symmetric quantization, offset 0);
//! - `x` `[..., K]` in f32, f16 or bf16 (any outer strides; copied to contiguous f32 rows);
//! - `bias` `[N]` (any float dtype, kept in f32);
//! - `y` `[..., N]` in `x`'s dtype, accumulated in f32.
//!
//! The int8 weight is repacked once at load into panels of [`PANEL`] output channels
//! contiguous over k (`panel[k][j] = w_q[p*PANEL + j, k]`, as in [`crate::linear`]) and
//! widened to f32 in registers by the kernel, so a decode step reads one byte per weight.
//! Scale and offset are applied once per output channel in the epilogue:
//! `sum_k x[k] * (w[k] + o) * s = s * (sum_k x[k] * w[k] + o * sum_k x[k])`.
//!
//! On CPUs with int8 kernels (AMX tiles or AVX-512 VNNI), symmetric weights default to
//! [`Activations::Int16`] instead: the weight is packed in the int8 kernels' layout and each
//! activation row is quantized to int16 at run time and multiplied exactly in integers
//! (`quant::a16`); the result then differs from the f32 form by the activation rounding alone
//! (at most `max|x[t]| / 65534` per element).
//!
//! [`rtn_quantize_weight`] makes symmetric per-channel weights from a float matrix
//! (round-to-nearest); [`weight_quant_linear_reference`] is the f32 oracle from candle ops.

mod cpu;
mod reference;

pub use reference::weight_quant_linear_reference;

use crate::host::map_rows_f32;
use candle_core::{DType, Result, Tensor, bail};

/// Output channels per packed panel (two AVX-512 registers of f32 after widening).
pub const PANEL: usize = 32;

/// The kernel family a forward call runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelPath {
    /// Scalar Rust, any CPU.
    Portable,
    /// AVX-512F micro-kernels (x86-64, detected at run time).
    Avx512,
}

impl KernelPath {
    /// The fastest path this CPU supports (what [`WeightQuantLinear::forward`] uses).
    pub fn detect() -> Self {
        if cpu::has_avx512() { Self::Avx512 } else { Self::Portable }
    }

    /// Every path this CPU can run (the portable one always).
    pub fn available() -> Vec<Self> {
        let mut paths = vec![Self::Portable];
        if cpu::has_avx512() {
            paths.push(Self::Avx512);
        }
        paths
    }
}

/// How a [`WeightQuantLinear`] treats its float activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activations {
    /// f32 arithmetic: the int8 weights are widened to f32 in registers (FMA kernels).
    Float,
    /// Per-row symmetric int16 (`max|x| / 32767`), split into bytes for the int8 kernels (AMX
    /// where granted; see `quant::a16`): exact integer sums, symmetric weights only.
    Int16,
}

impl Activations {
    /// The default for symmetric weights on this machine: `Int16` where an int8 kernel runs
    /// (AMX: `tdpbssd`/`tdpbusd` beat f32 FMA from 9 rows up and match it on bandwidth-bound
    /// GEMVs; AVX-512 VNNI without AMX: two `vpdpbusd` per 64 products still beat widened-f32
    /// FMA, SmolLM2's lm_head at 16 rows 6.3 -> 3.3 ms, see `weight_quant_bench`), else `Float`.
    pub fn detect() -> Self {
        if crate::QuantKernel::Amx.is_available() || crate::QuantKernel::Vnni.is_available() {
            Self::Int16
        } else {
            Self::Float
        }
    }
}

/// The packed weight of one [`Activations`] form.
enum Packing {
    /// `ceil(N / PANEL)` panels of `K * PANEL` int8, zero past `N`, 64-byte aligned at `offset`.
    Float { panels: Vec<i8>, offset: usize },
    /// The int8 kernels' panel layout.
    Int16(crate::quant::SplitInt16Linear),
}

/// An int8 weight (per-channel scale, optional offset) and optional bias, packed for the CPU.
pub struct WeightQuantLinear {
    packing: Packing,
    /// Per output channel, padded with zeros to a multiple of [`PANEL`].
    scale: Vec<f32>,
    /// `scale * offset` per output channel (padded); `None` for symmetric weights.
    scaled_offset: Option<Vec<f32>>,
    /// Bias per output channel (padded).
    bias: Option<Vec<f32>>,
    out_features: usize,
    in_features: usize,
}

impl std::fmt::Debug for WeightQuantLinear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeightQuantLinear")
            .field("out_features", &self.out_features)
            .field("in_features", &self.in_features)
            .field("offset", &self.scaled_offset.is_some())
            .field("bias", &self.bias.is_some())
            .field("activations", &self.activations())
            .finish()
    }
}

fn padded(values: &[f32], n: usize) -> Vec<f32> {
    let mut v = values.to_vec();
    v.resize(n.div_ceil(PANEL) * PANEL, 0.0);
    v
}

impl WeightQuantLinear {
    /// Packs `w_q` (`[n, k]` row-major int8), `scale` `[n]`, `offset` `[n]` and `bias` `[n]`
    /// for this machine's default [`Activations`] (`Float` for asymmetric weights).
    pub fn new(
        w_q: &[i8],
        (n, k): (usize, usize),
        scale: &[f32],
        offset: Option<&[f32]>,
        bias: Option<&Tensor>,
    ) -> Result<Self> {
        let activations = if offset.is_some() { Activations::Float } else { Activations::detect() };
        Self::with_activations(w_q, (n, k), scale, offset, bias, activations)
    }

    /// Like [`new`](Self::new) with a chosen activation form (tests, benchmarks); `Int16` needs
    /// symmetric weights (no offset).
    pub fn with_activations(
        w_q: &[i8],
        (n, k): (usize, usize),
        scale: &[f32],
        offset: Option<&[f32]>,
        bias: Option<&Tensor>,
        activations: Activations,
    ) -> Result<Self> {
        if n == 0 || k == 0 {
            bail!("weight_quant_linear: empty weight [{n}, {k}]");
        }
        if w_q.len() != n * k {
            bail!("weight_quant_linear: weight has {} values, shape [{n}, {k}] needs {}", w_q.len(), n * k);
        }
        if scale.len() != n {
            bail!("weight_quant_linear: scale must have {n} values (one per output channel), got {}", scale.len());
        }
        if let Some(o) = offset
            && o.len() != n
        {
            bail!("weight_quant_linear: offset must have {n} values (one per output channel), got {}", o.len());
        }
        if scale.iter().chain(offset.unwrap_or(&[])).any(|v| !v.is_finite()) {
            bail!("weight_quant_linear: scale and offset must be finite");
        }
        let bias = match bias {
            None => None,
            Some(b) => {
                if b.dims() != [n] {
                    bail!("weight_quant_linear: bias must be [{n}], got {:?}", b.dims());
                }
                Some(padded(&b.to_dtype(DType::F32)?.to_vec1::<f32>()?, n))
            }
        };
        let packing = match activations {
            Activations::Float => {
                let (panels, offset) = cpu::pack_panels(w_q, n, k);
                Packing::Float { panels, offset }
            }
            Activations::Int16 if offset.is_some() => {
                bail!("weight_quant_linear: int16 activations need symmetric weights (no offset)")
            }
            Activations::Int16 => Packing::Int16(crate::quant::SplitInt16Linear::new(w_q, n, k)),
        };
        let scaled_offset = offset.map(|o| {
            let so: Vec<f32> = o.iter().zip(scale).map(|(o, s)| o * s).collect();
            padded(&so, n)
        });
        Ok(Self { packing, scale: padded(scale, n), scaled_offset, bias, out_features: n, in_features: k })
    }

    /// Quantizes a float weight `[N, K]` with [`rtn_quantize_weight`] and packs it.
    pub fn from_float(w: &Tensor, bias: Option<&Tensor>) -> Result<Self> {
        let (n, k) = w.dims2()?;
        let (w_q, scale) = rtn_quantize_weight(w)?;
        Self::new(&w_q, (n, k), &scale, None, bias)
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// The activation form this layer computes with.
    pub fn activations(&self) -> Activations {
        match self.packing {
            Packing::Float { .. } => Activations::Float,
            Packing::Int16(_) => Activations::Int16,
        }
    }

    /// The dequantized rows `(w_q[r] + offset[r]) * scale[r]` for each `r` of `rows`, as
    /// `rows.len() x K` row-major f32: an embedding lookup in a tied lm_head's int8 weight
    /// (so a tied model needs no second, float copy of the table).
    pub fn dequantize_rows(&self, rows: &[u32]) -> Result<Vec<f32>> {
        let k = self.in_features;
        let mut out = vec![0f32; rows.len() * k];
        for (dst, &r) in out.chunks_exact_mut(k).zip(rows) {
            let r = r as usize;
            if r >= self.out_features {
                bail!("weight_quant_linear: row {r} out of range (N = {})", self.out_features);
            }
            let (scale, shift) = (self.scale[r], self.scaled_offset.as_ref().map_or(0.0, |o| o[r]));
            match &self.packing {
                Packing::Float { panels, offset } => {
                    let (p, j) = (r / PANEL, r % PANEL);
                    let panel = &panels[offset + p * k * PANEL..][..k * PANEL];
                    for (kk, d) in dst.iter_mut().enumerate() {
                        *d = panel[kk * PANEL + j] as f32 * scale + shift;
                    }
                }
                Packing::Int16(linear) => {
                    for (d, w) in dst.iter_mut().zip(linear.row(r)) {
                        *d = w as f32 * scale + shift;
                    }
                }
            }
        }
        Ok(out)
    }

    /// Bytes of packed weight read per forward (bandwidth accounting; scales excluded).
    pub fn weight_bytes(&self) -> usize {
        match &self.packing {
            Packing::Float { .. } => self.out_features.div_ceil(PANEL) * PANEL * self.in_features,
            Packing::Int16(linear) => linear.weight_bytes(),
        }
    }

    /// `y = x @ ((w_q + offset) * scale)^T + bias` on the fastest available kernel.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, KernelPath::detect())
    }

    /// Like [`forward`](Self::forward) on a chosen kernel path (tests and benchmarks);
    /// an error if this CPU cannot run it.
    pub fn forward_with(&self, x: &Tensor, path: KernelPath) -> Result<Tensor> {
        if path == KernelPath::Avx512 && !cpu::has_avx512() {
            bail!("weight_quant_linear: this CPU has no AVX-512F");
        }
        map_rows_f32(x, self.in_features, self.out_features, "weight_quant_linear", |rows, m, y| {
            self.run(rows, m, y, path)
        })
    }

    /// Writes f32 rows `x` (`m * K` values) into `out` (`m * N` values) without allocating
    /// (except the `m` row sums of an asymmetric weight).
    pub fn forward_f32_into(&self, x: &[f32], m: usize, out: &mut [f32]) -> Result<()> {
        if x.len() != m * self.in_features || out.len() != m * self.out_features {
            bail!(
                "weight_quant_linear: buffer sizes do not match m={m}, K={}, N={}",
                self.in_features,
                self.out_features
            );
        }
        self.run(x, m, out, KernelPath::detect());
        Ok(())
    }

    fn run(&self, x: &[f32], m: usize, y: &mut [f32], path: KernelPath) {
        let k = self.in_features;
        let (panels, offset) = match &self.packing {
            Packing::Float { panels, offset } => (panels, *offset),
            Packing::Int16(linear) => {
                let kernel = crate::quant::SplitInt16Linear::kernel_for(m, path == KernelPath::Portable);
                linear.forward(x, m, y, &self.scale, self.bias.as_deref(), kernel);
                return;
            }
        };
        let panels = &panels[offset..offset + self.weight_bytes()];
        let row_sums: Option<Vec<f32>> =
            self.scaled_offset.as_ref().map(|_| x.chunks_exact(k).map(|row| row.iter().sum()).collect());
        let epilogue = cpu::Epilogue {
            scale: &self.scale,
            scaled_offset: self.scaled_offset.as_deref(),
            row_sums: row_sums.as_deref(),
            bias: self.bias.as_deref(),
        };
        cpu::gemm(x, m, k, panels, self.out_features, &epilogue, y, path == KernelPath::Avx512);
    }
}

/// Symmetric per-output-channel round-to-nearest quantization of `w` `[N, K]` (any float
/// dtype): `s[n] = max_k |W[n, k]| / 127`, `q[n, k] = clamp(round(W[n, k] / s[n]), -127, 127)`
/// where `round` is half away from zero (`f32::round`). A row of zeros gets `s = 0` and
/// `q = 0`. Then `|W - q * s| <= s / 2` element-wise. Returns (`q` row-major, `s`).
pub fn rtn_quantize_weight(w: &Tensor) -> Result<(Vec<i8>, Vec<f32>)> {
    let (n, k) = w.dims2().map_err(|_| {
        candle_core::Error::Msg(format!("rtn_quantize_weight: weight must be [N, K], got {:?}", w.dims()))
    })?;
    let rows = w.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let mut q = Vec::with_capacity(n * k);
    let mut scales = Vec::with_capacity(n);
    for (r, row) in rows.iter().enumerate() {
        if row.iter().any(|v| !v.is_finite()) {
            bail!("rtn_quantize_weight: row {r} has a non-finite value");
        }
        let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
        let s = max / 127.0;
        scales.push(s);
        if s == 0.0 {
            q.extend(std::iter::repeat_n(0i8, k));
            continue;
        }
        q.extend(row.iter().map(|v| (v / s).round().clamp(-127.0, 127.0) as i8));
    }
    Ok((q, scales))
}
