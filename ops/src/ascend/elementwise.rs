//! The row-wise ops on the NPU: `rms_norm` (aclnnRmsNorm), `add_rms_norm` (aclnnAddRmsNorm), `rope`
//! (aclnnRotaryPositionEmbedding, half rotation) and `swiglu` (aclnnSwiGlu). Same contracts as the CPU functions
//! of the same name (`crate::norm`, `crate::rope`, `crate::swiglu`): f32, f16 and bf16, computed in f32 by the
//! operators, outputs new contiguous tensors of the input's dtype.
//!
//! Strided inputs go to the operators as views (aclTensor strides and offset), except for SwiGlu, whose
//! documented contract is contiguous input only (cann-facts trap 18): a strided `x` is copied first
//! ([`candle_ascend::aclnn::ops::contiguous`]).

use candle_ascend::aclnn::ops::{self as acl, RotaryMode};
use candle_core::{Result, bail};

use super::{NpuDType, NpuTensor};

fn check_float(op: &str, t: &NpuTensor) -> Result<()> {
    match t.dtype() {
        NpuDType::F32 | NpuDType::F16 | NpuDType::BF16 => Ok(()),
        other => bail!("{op}: dtype {other:?} is not supported (f32, f16, bf16)"),
    }
}

/// The checks shared by both norms: x of rank >= 1, gamma `[H]` of x's dtype, eps finite and >= 0.
fn check_norm(op: &str, x: &NpuTensor, gamma: &NpuTensor, eps: f64) -> Result<()> {
    check_float(op, x)?;
    let Some(&h) = x.shape().last() else {
        bail!("{op}: `x` must have at least one dimension, got a scalar");
    };
    if gamma.shape() != [h] || gamma.dtype() != x.dtype() {
        bail!("{op}: gamma must be [{h}] of {:?}, got {gamma:?}", x.dtype());
    }
    if !eps.is_finite() || eps < 0.0 {
        bail!("{op}: eps must be finite and >= 0, got {eps}");
    }
    Ok(())
}

/// `y = x / sqrt(mean(x^2) + eps) * gamma` over the last dimension of `x` (`[..., H]`, any strides);
/// `gamma` `[H]` of x's dtype. Returns a contiguous tensor of x's shape and dtype.
pub fn rms_norm(x: &NpuTensor, gamma: &NpuTensor, eps: f64) -> Result<NpuTensor> {
    check_norm("rms_norm", x, gamma, eps)?;
    let (y, _rstd) = acl::rms_norm(x, gamma, eps)?;
    Ok(y)
}

/// Returns (rms_norm(x + residual) * gamma, x + residual): `x` and `residual` of one shape `[..., H]` and dtype
/// (any strides), `gamma` `[H]`. Both outputs are contiguous.
pub fn add_rms_norm(
    x: &NpuTensor,
    residual: &NpuTensor,
    gamma: &NpuTensor,
    eps: f64,
) -> Result<(NpuTensor, NpuTensor)> {
    check_norm("add_rms_norm", x, gamma, eps)?;
    if residual.shape() != x.shape() || residual.dtype() != x.dtype() {
        bail!("add_rms_norm: residual {residual:?} must have the shape and dtype of x {x:?}");
    }
    let (y, _rstd, sum) = acl::add_rms_norm(x, residual, gamma, eps)?;
    Ok((y, sum))
}

/// Half-rotation RoPE; x [B,S,N,D] (may be a strided view, e.g. a narrow along the head axis of a fused qkv
/// output), cos/sin [B,S,D]; returns a new contiguous tensor: `x * cos + rotate_half(x) * sin`, with cos/sin
/// taken at `[b, s, :]` and broadcast over the heads.
pub fn rope(x: &NpuTensor, cos: &NpuTensor, sin: &NpuTensor) -> Result<NpuTensor> {
    const OP: &str = "rope";
    check_float(OP, x)?;
    let &[b, s, _n, d] = x.shape() else {
        bail!("{OP}: x must be [B, S, N, D], got {x:?}");
    };
    if d % 2 != 0 {
        bail!("{OP}: the head dim {d} must be even");
    }
    for (name, table) in [("cos", cos), ("sin", sin)] {
        if table.shape() != [b, s, d] || table.dtype() != x.dtype() {
            bail!("{OP}: {name} must be [{b}, {s}, {d}] of {:?}, got {table:?}", x.dtype());
        }
    }
    // The operator takes 4-D tables broadcast over the heads: (B, S, 1, D).
    let table4 = |t: &NpuTensor| -> Result<NpuTensor> { Ok(acl::contiguous(t)?.reshape(&[b, s, 1, d])?) };
    Ok(acl::rotary_position_embedding(x, &table4(cos)?, &table4(sin)?, RotaryMode::Half)?)
}

/// `silu(x[..., :I]) * x[..., I:]` for x `[..., 2I]` (any strides; copied to contiguous first when strided, as
/// aclnnSwiGlu requires). Returns a contiguous `[..., I]` tensor of x's dtype.
pub fn swiglu(x: &NpuTensor) -> Result<NpuTensor> {
    const OP: &str = "swiglu";
    check_float(OP, x)?;
    let Some(&last) = x.shape().last() else {
        bail!("{OP}: x must have at least one dimension, got a scalar");
    };
    if last % 2 != 0 {
        bail!("{OP}: the last dimension {last} must be even");
    }
    let contiguous = acl::contiguous(x)?;
    Ok(acl::swiglu(&contiguous, x.rank() - 1)?)
}
