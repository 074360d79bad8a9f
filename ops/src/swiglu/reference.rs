//! f32 reference for `swiglu`, composed from plain candle ops: the conformance oracle.

use candle_core::{D, DType, Result, Tensor};

use super::check;

/// Reference for [`super::swiglu`]: `a / (1 + exp(-a)) * b` in f32 with `a`, `b` the two
/// halves of the last dimension, returned contiguous in `x`'s dtype.
pub fn swiglu_reference(x: &Tensor) -> Result<Tensor> {
    check(x)?;
    let xf = x.to_dtype(DType::F32)?;
    let inner = xf.dim(D::Minus1)? / 2;
    let gate = xf.narrow(D::Minus1, 0, inner)?;
    let up = xf.narrow(D::Minus1, inner, inner)?;
    let silu = (&gate / (gate.neg()?.exp()? + 1.0)?)?;
    (silu * up)?.to_dtype(x.dtype())?.contiguous()
}
