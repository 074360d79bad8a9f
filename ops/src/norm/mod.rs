//! RMS normalization (Zhang & Sennrich, 2019, "Root Mean Square Layer Normalization"), alone
//! and fused with the residual add that precedes it in a pre-norm transformer block, as in
//! HF transformers' `LlamaRMSNorm` / `Qwen2RMSNorm`. Maps to aclnnRmsNorm / aclnnAddRmsNorm.

mod cpu;
mod reference;

pub(crate) use cpu::add_rms_norm_row_into;

use candle_core::{DType, Result, Tensor, bail};

use crate::dispatch_float;
use crate::kernel::simd::Avx512;

pub use reference::{add_rms_norm_reference, rms_norm_reference};

const RMS_NORM: &str = "rms_norm";
const ADD_RMS_NORM: &str = "add_rms_norm";

/// RMS normalization over the last dimension: `y = x / sqrt(mean(x^2) + eps) * gamma`.
///
/// - `x`: `[..., H]`, rank >= 1, contiguous in the last dimension; the outer dimensions may
///   have any strides (e.g. a `narrow` of a wider tensor).
/// - `gamma`: `[H]`, any layout.
/// - `eps`: finite, >= 0.
/// - dtype: f32, f16 or bf16, the same for both inputs; computed in f32.
///
/// Returns a contiguous tensor of `x`'s shape and dtype. CPU tensors only.
pub fn rms_norm(x: &Tensor, gamma: &Tensor, eps: f64) -> Result<Tensor> {
    check(RMS_NORM, x, None, gamma, eps)?;
    if x.elem_count() == 0 {
        return Tensor::zeros(x.shape(), x.dtype(), x.device());
    }
    let isa = Avx512::detect();
    dispatch_float!(x.dtype(), RMS_NORM, T => cpu::rms_norm::<T>(x, gamma, eps as f32, isa))
}

/// Residual add fused with RMS normalization: `s = x + residual`, rounded to the storage
/// dtype (as the NPU stores it), then `y = rms_norm(s, gamma, eps)` computed from the rounded
/// `s`. Returns `(y, s)`: `y` feeds the next sublayer, `s` is the new residual stream.
///
/// - `x`, `residual`: `[..., H]`, the same shape, each contiguous in the last dimension with
///   any outer strides.
/// - `gamma`: `[H]`; `eps`: finite, >= 0.
/// - dtype: f32, f16 or bf16, the same for all inputs; computed in f32.
///
/// Both outputs are contiguous, with `x`'s shape and dtype. CPU tensors only.
pub fn add_rms_norm(x: &Tensor, residual: &Tensor, gamma: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    check(ADD_RMS_NORM, x, Some(residual), gamma, eps)?;
    if x.elem_count() == 0 {
        let empty = Tensor::zeros(x.shape(), x.dtype(), x.device())?;
        return Ok((empty.clone(), empty));
    }
    let isa = Avx512::detect();
    dispatch_float!(x.dtype(), ADD_RMS_NORM, T => cpu::add_rms_norm::<T>(x, residual, gamma, eps as f32, isa))
}

/// Validates the contract shared by the kernels and the references.
pub(crate) fn check(op: &'static str, x: &Tensor, residual: Option<&Tensor>, gamma: &Tensor, eps: f64) -> Result<()> {
    let Some(&h) = x.dims().last() else {
        bail!("{op}: `x` must have at least one dimension, got a scalar");
    };
    if !matches!(x.dtype(), DType::F32 | DType::F16 | DType::BF16) {
        return Err(candle_core::Error::UnsupportedDTypeForOp(x.dtype(), op));
    }
    if gamma.dims() != [h] {
        bail!("{op}: `gamma` must have shape [{h}] (the last dimension of `x` {:?}), got {:?}", x.dims(), gamma.dims());
    }
    let mut others = vec![("gamma", gamma)];
    if let Some(r) = residual {
        if r.dims() != x.dims() {
            bail!("{op}: `residual` must have the shape of `x` {:?}, got {:?}", x.dims(), r.dims());
        }
        others.push(("residual", r));
    }
    for (name, t) in others {
        if t.dtype() != x.dtype() {
            bail!(
                "{op}: `{name}` has dtype {:?} but `x` has {:?}; all inputs must share one dtype",
                t.dtype(),
                x.dtype()
            );
        }
    }
    for t in [Some(x), residual, Some(gamma)].into_iter().flatten() {
        if !t.device().is_cpu() {
            bail!("{op}: only CPU tensors are supported, got a tensor on {:?}", t.device().location());
        }
    }
    if !(eps.is_finite() && eps >= 0.0) {
        bail!("{op}: `eps` must be finite and >= 0, got {eps}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn rejects_bad_input_without_panicking() -> Result<()> {
        let x = Tensor::ones((2, 8), DType::F32, &Device::Cpu)?;
        let g = Tensor::ones(8, DType::F32, &Device::Cpu)?;
        assert!(rms_norm(&x, &Tensor::ones(7, DType::F32, &Device::Cpu)?, 1e-6).is_err());
        assert!(rms_norm(&x, &g.to_dtype(DType::F16)?, 1e-6).is_err());
        assert!(rms_norm(&x.to_dtype(DType::U32)?, &g.to_dtype(DType::U32)?, 1e-6).is_err());
        assert!(rms_norm(&Tensor::new(1f32, &Device::Cpu)?, &g, 1e-6).is_err());
        assert!(rms_norm(&x, &g, f64::NAN).is_err());
        assert!(rms_norm(&x.t()?, &Tensor::ones(2, DType::F32, &Device::Cpu)?, 1e-6).is_err());
        assert!(add_rms_norm(&x, &x.narrow(1, 0, 4)?, &g, 1e-6).is_err());
        let err = add_rms_norm(&x, &x.to_dtype(DType::BF16)?, &g, 1e-6).unwrap_err().to_string();
        assert!(err.contains("add_rms_norm"), "{err}");
        Ok(())
    }

    #[test]
    fn empty_rows_give_an_empty_output() -> Result<()> {
        let x = Tensor::zeros((0, 8), DType::F16, &Device::Cpu)?;
        let g = Tensor::ones(8, DType::F16, &Device::Cpu)?;
        assert_eq!(rms_norm(&x, &g, 1e-6)?.dims(), [0, 8]);
        assert_eq!(add_rms_norm(&x, &x, &g, 1e-6)?.1.dims(), [0, 8]);
        Ok(())
    }
}
