//! One safe function per aclnn operator. Each validates what the Rust side can know (shapes, dtypes), allocates
//! its outputs from the pool, builds the descriptors and calls [`two_phase`]. The operator itself validates the
//! rest in phase 1 and reports it through the error. So far: RmsNorm, AddRmsNorm, Cast, SwiGlu.

use crate::aclnn::{AclTensor, two_phase};
use crate::error::{Error, Result};
use crate::loader::op_sym;
use crate::runtime::tensor::{DType, NpuTensor};

fn float_dtype(op: &'static str, t: &NpuTensor) -> Result<()> {
    match t.dtype() {
        DType::F16 | DType::BF16 | DType::F32 => Ok(()),
        other => Err(Error::UnsupportedDtype { op, dtype: format!("{other:?}") }),
    }
}

/// Shape of rstd: x's shape with the dims covered by gamma set to 1.
fn rstd_shape(op: &'static str, x: &NpuTensor, gamma: &NpuTensor) -> Result<Vec<usize>> {
    let (xs, gs) = (x.shape(), gamma.shape());
    if gs.is_empty() || gs.len() > xs.len() || xs[xs.len() - gs.len()..] != *gs {
        return Err(Error::ShapeMismatch {
            op,
            expected: format!("gamma equal to trailing dims of x {xs:?}"),
            got: format!("{gs:?}"),
        });
    }
    let mut shape = xs.to_vec();
    let n = shape.len();
    shape[n - gs.len()..].iter_mut().for_each(|d| *d = 1);
    Ok(shape)
}

/// RMSNorm: `y = x / sqrt(mean(x^2) + eps) * gamma` over the trailing dims covered by `gamma`
/// (aclnnRmsNorm). x f16/bf16/f32, gamma the same dtype or f32. Returns `(y, rstd)`, rstd f32 with the normalised
/// dims set to 1.
pub fn rms_norm(x: &NpuTensor, gamma: &NpuTensor, eps: f64) -> Result<(NpuTensor, NpuTensor)> {
    const OP: &str = "aclnnRmsNorm";
    float_dtype(OP, x)?;
    let device = x.device();
    let rstd_shape = rstd_shape(OP, x, gamma)?;
    let y = NpuTensor::uninit(device, x.dtype(), x.shape())?;
    let rstd = NpuTensor::uninit(device, DType::F32, &rstd_shape)?;
    let api = device.api();
    let phase1 = op_sym!(api, "RmsNorm", aclnnRmsNormGetWorkspaceSize)?;
    let launch = op_sym!(api, "RmsNorm", aclnnRmsNorm)?;
    let (xt, gt, yt, rt) = (AclTensor::new(x)?, AclTensor::new(gamma)?, AclTensor::new(&y)?, AclTensor::new(&rstd)?);
    two_phase(
        device,
        OP,
        // SAFETY: all descriptors are live for the call; the out-pointers come from two_phase.
        |ws, ex| unsafe { phase1(xt.as_ptr(), gt.as_ptr(), eps, yt.as_ptr(), rt.as_ptr(), ws, ex) },
        *launch,
    )?;
    Ok((y, rstd))
}

/// Add + RMSNorm: `s = x1 + x2`, `y = rms_norm(s) * gamma` (aclnnAddRmsNorm). x1, x2 same shape and dtype (no
/// broadcast), gamma the same dtype. Returns `(y, rstd, s)`.
pub fn add_rms_norm(
    x1: &NpuTensor,
    x2: &NpuTensor,
    gamma: &NpuTensor,
    eps: f64,
) -> Result<(NpuTensor, NpuTensor, NpuTensor)> {
    const OP: &str = "aclnnAddRmsNorm";
    float_dtype(OP, x1)?;
    if x1.shape() != x2.shape() || x1.dtype() != x2.dtype() {
        return Err(Error::ShapeMismatch {
            op: OP,
            expected: format!("x2 {:?} {:?}", x1.dtype(), x1.shape()),
            got: format!("{:?} {:?}", x2.dtype(), x2.shape()),
        });
    }
    let device = x1.device();
    let rstd_shape = rstd_shape(OP, x1, gamma)?;
    let y = NpuTensor::uninit(device, x1.dtype(), x1.shape())?;
    let rstd = NpuTensor::uninit(device, DType::F32, &rstd_shape)?;
    let sum = NpuTensor::uninit(device, x1.dtype(), x1.shape())?;
    let api = device.api();
    let phase1 = op_sym!(api, "AddRmsNorm", aclnnAddRmsNormGetWorkspaceSize)?;
    let launch = op_sym!(api, "AddRmsNorm", aclnnAddRmsNorm)?;
    let (a, b, g) = (AclTensor::new(x1)?, AclTensor::new(x2)?, AclTensor::new(gamma)?);
    let (yt, rt, st) = (AclTensor::new(&y)?, AclTensor::new(&rstd)?, AclTensor::new(&sum)?);
    two_phase(
        device,
        OP,
        // SAFETY: all descriptors are live for the call; the out-pointers come from two_phase.
        |ws, ex| unsafe {
            phase1(a.as_ptr(), b.as_ptr(), g.as_ptr(), eps, yt.as_ptr(), rt.as_ptr(), st.as_ptr(), ws, ex)
        },
        *launch,
    )?;
    Ok((y, rstd, sum))
}

/// Element-wise dtype conversion (aclnnCast) into a new contiguous tensor.
pub fn cast(x: &NpuTensor, dtype: DType) -> Result<NpuTensor> {
    const OP: &str = "aclnnCast";
    let device = x.device();
    let out = NpuTensor::uninit(device, dtype, x.shape())?;
    let api = device.api();
    let phase1 = op_sym!(api, "Cast", aclnnCastGetWorkspaceSize)?;
    let launch = op_sym!(api, "Cast", aclnnCast)?;
    let (xt, ot) = (AclTensor::new(x)?, AclTensor::new(&out)?);
    // SAFETY: both descriptors are live for the call; the out-pointers come from two_phase.
    two_phase(device, OP, |ws, ex| unsafe { phase1(xt.as_ptr(), dtype.acl(), ot.as_ptr(), ws, ex) }, *launch)?;
    Ok(out)
}

/// SwiGLU: `silu(a) * b` where `a` is the first and `b` the second half of `x` along `dim` (aclnnSwiGlu). `x` must
/// be contiguous and its `dim` even.
pub fn swiglu(x: &NpuTensor, dim: usize) -> Result<NpuTensor> {
    const OP: &str = "aclnnSwiGlu";
    float_dtype(OP, x)?;
    let size = *x.shape().get(dim).ok_or_else(|| Error::InvalidArgument(format!("{OP}: no dim {dim}")))?;
    if size % 2 != 0 || !x.is_contiguous() {
        return Err(Error::ShapeMismatch {
            op: OP,
            expected: format!("a contiguous tensor with an even dim {dim}"),
            got: format!("{x:?}"),
        });
    }
    let mut out_shape = x.shape().to_vec();
    out_shape[dim] /= 2;
    let device = x.device();
    let out = NpuTensor::uninit(device, x.dtype(), &out_shape)?;
    let api = device.api();
    let phase1 = op_sym!(api, "SwiGlu", aclnnSwiGluGetWorkspaceSize)?;
    let launch = op_sym!(api, "SwiGlu", aclnnSwiGlu)?;
    let (xt, ot) = (AclTensor::new(x)?, AclTensor::new(&out)?);
    let dim = dim as i64;
    // SAFETY: both descriptors are live for the call; the out-pointers come from two_phase.
    two_phase(device, OP, |ws, ex| unsafe { phase1(xt.as_ptr(), dim, ot.as_ptr(), ws, ex) }, *launch)?;
    Ok(out)
}
