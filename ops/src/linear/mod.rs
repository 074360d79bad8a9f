//! Dense linear layer `y = x W^T + b` with weights packed once at load.
//!
//! Contract: `x` is `[..., K]` (f32, f16 or bf16, any outer strides), `W` is `[N, K]`, `b` is
//! `[N]`; `y` is `[..., N]` in `x`'s dtype. Accumulation is f32. The weight is converted to f32
//! and repacked into panels of [`PANEL`] output channels (`panel[k][j] = W[p*PANEL + j, k]`),
//! a layout that serves both regimes with one kernel family:
//! - decode (few rows): a GEMV that streams each panel once at memory speed;
//! - prefill (many rows): a register-blocked GEMM, 6 rows x 32 channels per micro-tile,
//!   K blocked so the active panel slice stays in L1/L2.
//!
//! The f32 reference is [`linear_reference`] (plain candle `matmul`).

mod cpu;
mod reference;

pub use reference::linear_reference;

use crate::host::{Element, map_rows_f32, with_slice};
use candle_core::{DType, Result, Tensor, bail};

/// Output channels per packed panel (two AVX-512 registers of f32).
pub const PANEL: usize = 32;

/// A linear layer's weight (and optional bias) packed for the CPU kernels.
pub struct PackedLinear {
    /// `ceil(N / PANEL)` panels of `K * PANEL` f32, zero-padded past `N`.
    panels: Vec<f32>,
    bias: Option<Vec<f32>>,
    out_features: usize,
    in_features: usize,
}

impl std::fmt::Debug for PackedLinear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedLinear")
            .field("out_features", &self.out_features)
            .field("in_features", &self.in_features)
            .field("bias", &self.bias.is_some())
            .finish()
    }
}

impl PackedLinear {
    /// Packs `w` `[N, K]` (any float dtype, any strides) and `bias` `[N]`.
    pub fn new(w: &Tensor, bias: Option<&Tensor>) -> Result<Self> {
        let (n, k) = w
            .dims2()
            .map_err(|_| candle_core::Error::Msg(format!("linear: weight must be [N, K], got {:?}", w.dims())))?;
        if n == 0 || k == 0 {
            bail!("linear: empty weight {:?}", w.dims());
        }
        let w32 = w.to_dtype(DType::F32)?.contiguous()?;
        let panels = with_slice::<f32, _>(&w32, "linear", |data, layout| {
            let start = layout.start_offset();
            Ok(cpu::pack_panels(&data[start..start + n * k], n, k))
        })?;
        let bias = match bias {
            None => None,
            Some(b) => {
                if b.dims() != [n] {
                    bail!("linear: bias must be [{n}], got {:?}", b.dims());
                }
                Some(b.to_dtype(DType::F32)?.to_vec1::<f32>()?)
            }
        };
        Ok(Self { panels, bias, out_features: n, in_features: k })
    }

    /// Packs the row-wise concatenation of several weights (fused q/k/v or gate/up projections).
    pub fn concat(weights: &[&Tensor], biases: Option<&[&Tensor]>) -> Result<Self> {
        let w = Tensor::cat(weights, 0)?;
        let b = biases.map(|b| Tensor::cat(b, 0)).transpose()?;
        Self::new(&w, b.as_ref())
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// Bytes of packed weight read per forward (bandwidth accounting).
    pub fn weight_bytes(&self) -> usize {
        self.panels.len() * std::mem::size_of::<f32>()
    }

    /// `y = x W^T + b`; `x` is `[..., K]`, `y` is `[..., N]` in `x`'s dtype.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        map_rows_f32(x, self.in_features, self.out_features, "linear", |rows, m, y| {
            cpu::gemm(rows, m, self.in_features, &self.panels, self.out_features, self.bias.as_deref(), y)
        })
    }

    /// Like [`forward`](Self::forward) but writes f32 rows into `out` (`m * N` values):
    /// the allocation-free entry point for callers that own their buffers.
    pub fn forward_f32_into(&self, x: &[f32], m: usize, out: &mut [f32]) -> Result<()> {
        if x.len() != m * self.in_features || out.len() != m * self.out_features {
            bail!("linear: buffer sizes do not match m={m}, K={}, N={}", self.in_features, self.out_features);
        }
        cpu::gemm(x, m, self.in_features, &self.panels, self.out_features, self.bias.as_deref(), out);
        Ok(())
    }
}

/// Converts any float slice to f32 (helper for callers holding f16/bf16 buffers).
pub fn to_f32_vec<T: Element>(src: &[T]) -> Vec<f32> {
    src.iter().map(|v| v.to_f32()).collect()
}
