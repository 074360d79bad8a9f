//! f32 reference for `rope`, composed from plain candle ops: the conformance oracle.

use candle_core::{D, DType, Result, Tensor};

use super::check;

/// Reference for [`super::rope`]: `x * cos + rotate_half(x) * sin` in f32 with
/// `rotate_half(x) = cat(-x[.., h..], x[.., ..h])`, returned contiguous in `x`'s dtype.
pub fn rope_reference(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    check(x, cos, sin)?;
    let xf = x.to_dtype(DType::F32)?;
    let half = xf.dim(D::Minus1)? / 2;
    let rotated =
        Tensor::cat(&[&xf.narrow(D::Minus1, half, half)?.neg()?, &xf.narrow(D::Minus1, 0, half)?], D::Minus1)?;
    // [B, S, D] -> [B, S, 1, D], broadcast over the heads.
    let cos = cos.to_dtype(DType::F32)?.unsqueeze(2)?;
    let sin = sin.to_dtype(DType::F32)?.unsqueeze(2)?;
    let out = (xf.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?)?;
    out.to_dtype(x.dtype())?.contiguous()
}
