//! f32 references for the norm ops, composed from plain candle ops: the conformance oracle.

use candle_core::{D, DType, Result, Tensor};

use super::{ADD_RMS_NORM, RMS_NORM, check};

/// Reference for [`super::rms_norm`]: same contract, computed with candle ops in f32 and
/// returned in `x`'s dtype.
pub fn rms_norm_reference(x: &Tensor, gamma: &Tensor, eps: f64) -> Result<Tensor> {
    check(RMS_NORM, x, None, gamma, eps)?;
    normalize_f32(&x.to_dtype(DType::F32)?, gamma, eps)?.to_dtype(x.dtype())
}

/// Reference for [`super::add_rms_norm`]: `s = x + residual` in f32 rounded to `x`'s dtype,
/// then the reference RMS norm of the rounded `s`. Returns `(y, s)`.
pub fn add_rms_norm_reference(x: &Tensor, residual: &Tensor, gamma: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    check(ADD_RMS_NORM, x, Some(residual), gamma, eps)?;
    let sum = (x.to_dtype(DType::F32)? + residual.to_dtype(DType::F32)?)?.to_dtype(x.dtype())?;
    let y = normalize_f32(&sum.to_dtype(DType::F32)?, gamma, eps)?.to_dtype(x.dtype())?;
    Ok((y, sum))
}

fn normalize_f32(x: &Tensor, gamma: &Tensor, eps: f64) -> Result<Tensor> {
    let mean_square = x.sqr()?.mean_keepdim(D::Minus1)?;
    let rms = (mean_square + eps)?.sqrt()?;
    x.broadcast_div(&rms)?.broadcast_mul(&gamma.to_dtype(DType::F32)?)
}
