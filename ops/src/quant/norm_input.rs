//! Int8 linears fed by `add_rms_norm` (the QKV and gate/up projections of a pre-norm block):
//! the residual add, the RMS norm and the activation quantization of each row run in one pass
//! while the row is in L1, so the normalized activations are never written out and read back.
//! The int8 GEMM and its epilogue are the linear's usual ones.

use candle_core::{DType, Device, Result, Tensor, bail};

use super::cpu::OutPtr;
use super::{QuantKernel, QuantLinear, RowQuant, quantize_rows, rows_and_cols};
use crate::host::{tensor_from_vec, with_slice};
use crate::kernel::simd::{Avx512, Lanes};
use crate::kernel::{assume_init_vec, uninit_vec};

const OP: &str = "quant_linear_add_rms_norm";

impl QuantLinear {
    /// `(y, s)` with `s = x + residual` and `y` this linear's forward of
    /// `rms_norm(s) * gamma`: with `act = Some((act_scale, act_offset))` the static
    /// [`forward`](Self::forward), with `None` the per-token
    /// [`forward_per_token`](Self::forward_per_token) (rotated when the linear has an input
    /// Hadamard block). Bit-identical to [`crate::add_rms_norm`] followed by that forward.
    ///
    /// `x` and `residual` are `[..., K]` of one shape and dtype (f32, f16 or bf16), `gamma`
    /// `[K]`; `y` is `[..., output_width]` and `s` `[..., K]`, both in `x`'s dtype.
    pub fn forward_add_rms_norm(
        &self,
        x: &Tensor,
        residual: &Tensor,
        gamma: &Tensor,
        eps: f64,
        act: Option<(f32, f32)>,
    ) -> Result<(Tensor, Tensor)> {
        crate::norm::check(OP, x, Some(residual), gamma, eps)?;
        let (m, k) = rows_and_cols(x, OP)?;
        if k != self.in_features {
            bail!("{OP}: input has {k} features, weight expects {}", self.in_features);
        }
        let kernel = self.kernel_for_rows(m);
        let mut staged = self.staging(m, kernel);
        let flip = if kernel == QuantKernel::Vnni { 0x80 } else { 0 };
        let quant = match act {
            Some((scale, offset)) => RowQuant::Static { scale, offset },
            None => RowQuant::PerToken { block: self.input_hadamard },
        };
        let gamma = gamma.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let x = if x.is_contiguous() { x.clone() } else { x.contiguous()? };
        let residual = if residual.is_contiguous() { residual.clone() } else { residual.contiguous()? };
        let isa = Avx512::detect();
        let (sum, scales) = crate::dispatch_float!(x.dtype(), OP, T => norm_and_quantize::<T>(&x, &residual, &gamma, eps as f32, quant, flip, isa, &mut staged))?;
        let row_scale = matches!(quant, RowQuant::PerToken { .. }).then_some(scales.as_slice());
        let y = self.gemm_f32(&staged, kernel, row_scale);
        let mut shape = x.dims()[..x.rank() - 1].to_vec();
        shape.push(self.output_width());
        let y = Tensor::from_vec(y, shape, &Device::Cpu)?;
        let y = if x.dtype() == DType::F32 { y } else { y.to_dtype(x.dtype())? };
        Ok((y, sum))
    }
}

/// Adds, normalizes and quantizes every row of the contiguous `x` and `residual` into
/// `staged`; returns the sum `x + residual` (as `add_rms_norm` stores it) and the per-row
/// scales of [`quantize_rows`].
#[allow(clippy::too_many_arguments)]
fn norm_and_quantize<T: Lanes>(
    x: &Tensor,
    residual: &Tensor,
    gamma: &[f32],
    eps: f32,
    quant: RowQuant,
    flip: u8,
    isa: Option<Avx512>,
    staged: &mut super::StagedActivations,
) -> Result<(Tensor, Vec<f32>)> {
    let (m, k) = rows_and_cols(x, OP)?;
    let mut sum = uninit_vec::<T>(m * k);
    let sum_out = OutPtr(sum.as_mut_ptr());
    let scales = with_slice::<T, _>(x, OP, |xs, x_layout| {
        with_slice::<T, _>(residual, OP, |rs, r_layout| {
            let xs = &xs[x_layout.start_offset()..][..m * k];
            let rs = &rs[r_layout.start_offset()..][..m * k];
            // `buf` receives the normalized row (rounded to `T`, as `add_rms_norm` stores it),
            // which `quantize_rows` quantizes; `sums` is the norm's f32 scratch row.
            let fill = |r: usize, buf: &mut [f32], sums: &mut Vec<f32>| {
                sums.resize(k, 0.0);
                // SAFETY: row r < m of the m x k sum buffer; `quantize_rows` calls the filler
                // once per row, so no two calls write the same row.
                let sum_row = unsafe { std::slice::from_raw_parts_mut(sum_out.add(r * k), k) };
                let rows = r * k..(r + 1) * k;
                let (x_row, r_row) = (&xs[rows.clone()], &rs[rows]);
                crate::norm::add_rms_norm_row_into(x_row, r_row, gamma, eps, buf, sum_row, sums, isa);
            };
            Ok(quantize_rows(m, k, quant, flip, staged, fill))
        })
    })?;
    // SAFETY: `quantize_rows` filled every row 0..m, and each filler call wrote its whole sum row.
    let sum = unsafe { assume_init_vec(sum) };
    Ok((tensor_from_vec(sum, x.dims())?, scales))
}
