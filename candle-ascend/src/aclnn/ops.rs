//! One safe function per aclnn operator. Each validates what the Rust side can know (shapes, dtypes), allocates
//! its outputs from the pool, builds the descriptors and calls [`two_phase`]. The operator itself validates the
//! rest in phase 1 and reports it through the error. So far: RmsNorm, AddRmsNorm, Cast, SwiGlu, Matmul, Embedding,
//! ArgMax, InplaceScatterUpdate, RotaryPositionEmbedding, ApplyRotaryPosEmb (and the choice between the two), Add
//! (with [`contiguous`], the strided-to-contiguous copy made through a same-dtype Cast).
//! Operators marked in place write through a shared `&NpuTensor` (a view handle, like a device pointer).

use crate::aclnn::{AclScalar, AclTensor, two_phase};
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

/// A contiguous copy of `x` (or `x` itself, shared, when it already is contiguous). The copy is an aclnnCast to
/// x's own dtype: the ops-math doc of aclnnCast lists non-contiguous `self` as supported for every dtype this
/// backend stores (int4 excepted), and the L2 API makes a strided input contiguous before the kernel. CANN
/// declares no plain copy operator in our subset (aclnnInplaceCopy is not declared), so this is the copy.
pub fn contiguous(x: &NpuTensor) -> Result<NpuTensor> {
    if x.is_contiguous() { Ok(x.clone()) } else { cast(x, x.dtype()) }
}

/// Broadcasting addition (aclnnAdd): `out = self + alpha * other`, `other` broadcast to `self`'s shape (right
/// aligned; each of its dims 1 or equal). One float dtype for both, output in it (a new contiguous tensor).
pub fn add(x: &NpuTensor, other: &NpuTensor, alpha: f32) -> Result<NpuTensor> {
    const OP: &str = "aclnnAdd";
    float_dtype(OP, x)?;
    let (xs, os) = (x.shape(), other.shape());
    let broadcasts = os.len() <= xs.len()
        && os.iter().zip(&xs[xs.len() - os.len()..]).all(|(&o, &d)| o == d || o == 1)
        && other.dtype() == x.dtype();
    if !broadcasts {
        return Err(Error::ShapeMismatch {
            op: OP,
            expected: format!("other of {:?} broadcastable to {xs:?}", x.dtype()),
            got: format!("{other:?}"),
        });
    }
    let device = x.device();
    let out = NpuTensor::uninit(device, x.dtype(), xs)?;
    let api = device.api();
    let phase1 = op_sym!(api, "Add", aclnnAddGetWorkspaceSize)?;
    let launch = op_sym!(api, "Add", aclnnAdd)?;
    let (xt, ot, yt) = (AclTensor::new(x)?, AclTensor::new(other)?, AclTensor::new(&out)?);
    let alpha = AclScalar::f32(api, alpha)?;
    two_phase(
        device,
        OP,
        // SAFETY: the descriptors and the scalar are live for the call; the out-pointers come from two_phase.
        |ws, ex| unsafe { phase1(xt.as_ptr(), ot.as_ptr(), alpha.as_ptr(), yt.as_ptr(), ws, ex) },
        *launch,
    )?;
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

/// aclnnMatmul's `cubeMathType`: how the cube unit treats the inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CubeMathType {
    /// 0: compute in the input dtype (f32 input is not supported this way on 310P / 910).
    KeepDtype = 0,
    /// 1: f32 may run as HF32 (A2/A3) or f16 (310P/910).
    AllowFp32DownPrecision = 1,
    /// 2: compute in f16 (not for bf16).
    UseFp16 = 2,
    /// 3: compute in HF32.
    UseHf32 = 3,
}

/// Matrix product over the last two dims with broadcast batch dims (aclnnMatmul): `a (.., m, k) @ b (.., k, n)`.
/// f16/bf16/f32, one dtype; a transposed view of `b` (an (n, k) weight) is allowed.
pub fn matmul(a: &NpuTensor, b: &NpuTensor, math: CubeMathType) -> Result<NpuTensor> {
    const OP: &str = "aclnnMatmul";
    float_dtype(OP, a)?;
    let (ra, rb) = (a.rank(), b.rank());
    if ra < 2 || rb < 2 || a.shape()[ra - 1] != b.shape()[rb - 2] || a.dtype() != b.dtype() {
        return Err(Error::ShapeMismatch {
            op: OP,
            expected: "(.., m, k) @ (.., k, n) of one dtype".to_string(),
            got: format!("{a:?} @ {b:?}"),
        });
    }
    // Right-aligned broadcast of the batch dims.
    let (ba, bb) = (&a.shape()[..ra - 2], &b.shape()[..rb - 2]);
    let n = ba.len().max(bb.len());
    let dim = |s: &[usize], i: usize| if i + s.len() >= n { s[i + s.len() - n] } else { 1 };
    let mut shape = Vec::with_capacity(n + 2);
    for i in 0..n {
        let (x, y) = (dim(ba, i), dim(bb, i));
        if x != y && x != 1 && y != 1 {
            return Err(Error::ShapeMismatch {
                op: OP,
                expected: "broadcastable batch dims".into(),
                got: format!("{a:?} @ {b:?}"),
            });
        }
        shape.push(x.max(y));
    }
    shape.extend([a.shape()[ra - 2], b.shape()[rb - 1]]);
    let device = a.device();
    let out = NpuTensor::uninit(device, a.dtype(), &shape)?;
    let api = device.api();
    let phase1 = op_sym!(api, "Matmul", aclnnMatmulGetWorkspaceSize)?;
    let launch = op_sym!(api, "Matmul", aclnnMatmul)?;
    let (at, bt, ot) = (AclTensor::new(a)?, AclTensor::new(b)?, AclTensor::new(&out)?);
    let math = math as i8;
    // SAFETY: all descriptors are live for the call; the out-pointers come from two_phase.
    two_phase(device, OP, |ws, ex| unsafe { phase1(at.as_ptr(), bt.as_ptr(), ot.as_ptr(), math, ws, ex) }, *launch)?;
    Ok(out)
}

/// Row gather (aclnnEmbedding): `out[i.., :] = weight[ids[i..], :]`; weight (vocab, dim), ids i32/i64.
/// An id outside the vocabulary is undefined on hardware (the simulator reports it at the next synchronisation).
pub fn embedding(weight: &NpuTensor, ids: &NpuTensor) -> Result<NpuTensor> {
    const OP: &str = "aclnnEmbedding";
    if weight.rank() != 2 {
        return Err(Error::ShapeMismatch { op: OP, expected: "2-D weight".into(), got: format!("{weight:?}") });
    }
    if !matches!(ids.dtype(), DType::I32 | DType::I64) {
        return Err(Error::UnsupportedDtype { op: OP, dtype: format!("ids {:?}", ids.dtype()) });
    }
    let mut shape = ids.shape().to_vec();
    shape.push(weight.shape()[1]);
    let device = weight.device();
    let out = NpuTensor::uninit(device, weight.dtype(), &shape)?;
    let api = device.api();
    let phase1 = op_sym!(api, "Embedding", aclnnEmbeddingGetWorkspaceSize)?;
    let launch = op_sym!(api, "Embedding", aclnnEmbedding)?;
    let (wt, it, ot) = (AclTensor::new(weight)?, AclTensor::new(ids)?, AclTensor::new(&out)?);
    // SAFETY: all descriptors are live for the call; the out-pointers come from two_phase.
    two_phase(device, OP, |ws, ex| unsafe { phase1(wt.as_ptr(), it.as_ptr(), ot.as_ptr(), ws, ex) }, *launch)?;
    Ok(out)
}

/// Index of the maximum along `dim` (aclnnArgMax), as i32; the first index wins a tie.
pub fn argmax(x: &NpuTensor, dim: usize, keepdim: bool) -> Result<NpuTensor> {
    const OP: &str = "aclnnArgMax";
    float_dtype(OP, x)?;
    if dim >= x.rank() {
        return Err(Error::InvalidArgument(format!("{OP}: no dim {dim} in {x:?}")));
    }
    let mut shape = x.shape().to_vec();
    if keepdim {
        shape[dim] = 1;
    } else {
        shape.remove(dim);
    }
    let device = x.device();
    let out = NpuTensor::uninit(device, DType::I32, &shape)?;
    let api = device.api();
    let phase1 = op_sym!(api, "ArgMax", aclnnArgMaxGetWorkspaceSize)?;
    let launch = op_sym!(api, "ArgMax", aclnnArgMax)?;
    let (xt, ot) = (AclTensor::new(x)?, AclTensor::new(&out)?);
    let dim = dim as i64;
    // SAFETY: both descriptors are live for the call; the out-pointers come from two_phase.
    two_phase(device, OP, |ws, ex| unsafe { phase1(xt.as_ptr(), dim, keepdim, ot.as_ptr(), ws, ex) }, *launch)?;
    Ok(out)
}

/// In place (aclnnInplaceScatterUpdate): for each row `i` of dim 0, `data[i, .., indices[i] + j, ..] =
/// updates[i, .., j, ..]` along `axis` (not 0). The KV-cache write at per-sequence positions. indices i32/i64 (B,).
pub fn scatter_update_(data: &NpuTensor, indices: &NpuTensor, updates: &NpuTensor, axis: usize) -> Result<()> {
    const OP: &str = "aclnnInplaceScatterUpdate";
    if axis == 0 || axis >= data.rank() || updates.rank() != data.rank() || indices.shape() != [data.shape()[0]] {
        return Err(Error::ShapeMismatch {
            op: OP,
            expected: format!(
                "axis in 1..{}, updates of rank {}, indices [{}]",
                data.rank(),
                data.rank(),
                data.shape()[0]
            ),
            got: format!("axis {axis}, updates {updates:?}, indices {indices:?}"),
        });
    }
    let device = data.device();
    let api = device.api();
    let phase1 = op_sym!(api, "InplaceScatterUpdate", aclnnInplaceScatterUpdateGetWorkspaceSize)?;
    let launch = op_sym!(api, "InplaceScatterUpdate", aclnnInplaceScatterUpdate)?;
    let (dt, it, ut) = (AclTensor::new(data)?, AclTensor::new(indices)?, AclTensor::new(updates)?);
    let axis = axis as i64;
    // SAFETY: all descriptors are live for the call; the out-pointers come from two_phase.
    two_phase(device, OP, |ws, ex| unsafe { phase1(dt.as_ptr(), it.as_ptr(), ut.as_ptr(), axis, ws, ex) }, *launch)
}

/// Rotation layout of [`rotary_position_embedding`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RotaryMode {
    /// 0: `cat(-x2, x1)` halves (HF llama / qwen2, NeoX).
    Half = 0,
    /// 1: `(-x_odd, x_even)` pairs (GPT-J).
    Interleave = 1,
}

/// `out = x * cos + rotate(x) * sin` (aclnnRotaryPositionEmbedding). x 4-D (e.g. BSND); cos/sin full width D,
/// each leading dim 1 or equal to x's.
pub fn rotary_position_embedding(
    x: &NpuTensor,
    cos: &NpuTensor,
    sin: &NpuTensor,
    mode: RotaryMode,
) -> Result<NpuTensor> {
    const OP: &str = "aclnnRotaryPositionEmbedding";
    float_dtype(OP, x)?;
    if x.rank() != 4 || cos.rank() != 4 || cos.shape() != sin.shape() || cos.shape()[3] != x.shape()[3] {
        return Err(Error::ShapeMismatch {
            op: OP,
            expected: "4-D x with full-width 4-D cos/sin of one shape".into(),
            got: format!("x {x:?}, cos {cos:?}, sin {sin:?}"),
        });
    }
    let device = x.device();
    let out = NpuTensor::uninit(device, x.dtype(), x.shape())?;
    let api = device.api();
    let phase1 = op_sym!(api, "RotaryPositionEmbedding", aclnnRotaryPositionEmbeddingGetWorkspaceSize)?;
    let launch = op_sym!(api, "RotaryPositionEmbedding", aclnnRotaryPositionEmbedding)?;
    let (xt, ct, st, ot) = (AclTensor::new(x)?, AclTensor::new(cos)?, AclTensor::new(sin)?, AclTensor::new(&out)?);
    let mode = mode as i64;
    two_phase(
        device,
        OP,
        // SAFETY: all descriptors are live for the call; the out-pointers come from two_phase.
        |ws, ex| unsafe { phase1(xt.as_ptr(), ct.as_ptr(), st.as_ptr(), mode, ot.as_ptr(), ws, ex) },
        *launch,
    )?;
    Ok(out)
}

/// In place half rotation of q (B, S, Nq, D) and k (B, S, Nk, D) with cos/sin (B, S, 1, D)
/// (aclnnApplyRotaryPosEmb, layout BSND; D 64 or 128).
pub fn apply_rotary_pos_emb_(q: &NpuTensor, k: &NpuTensor, cos: &NpuTensor, sin: &NpuTensor) -> Result<()> {
    const OP: &str = "aclnnApplyRotaryPosEmb";
    let device = q.device();
    let api = device.api();
    let phase1 = op_sym!(api, "ApplyRotaryPosEmb", aclnnApplyRotaryPosEmbGetWorkspaceSize)?;
    let launch = op_sym!(api, "ApplyRotaryPosEmb", aclnnApplyRotaryPosEmb)?;
    let (qt, kt, ct, st) = (AclTensor::new(q)?, AclTensor::new(k)?, AclTensor::new(cos)?, AclTensor::new(sin)?);
    const LAYOUT_BSND: i64 = 1;
    two_phase(
        device,
        OP,
        // SAFETY: all descriptors are live for the call; the out-pointers come from two_phase.
        |ws, ex| unsafe { phase1(qt.as_ptr(), kt.as_ptr(), ct.as_ptr(), st.as_ptr(), LAYOUT_BSND, ws, ex) },
        *launch,
    )
}

/// Half (HF llama / qwen2) RoPE of q and k in BSND with cos/sin (B, S, 1, D): the fused in-place
/// aclnnApplyRotaryPosEmb where the loaded CANN has it and D is 64 or 128, otherwise
/// aclnnRotaryPositionEmbedding (mode 0) on each. Returns the rotated (q, k).
pub fn rope_half(q: &NpuTensor, k: &NpuTensor, cos: &NpuTensor, sin: &NpuTensor) -> Result<(NpuTensor, NpuTensor)> {
    let d = q.shape().last().copied().unwrap_or(0);
    let api = q.device().api();
    let fused =
        api.supports_operator("ApplyRotaryPosEmb") && (d == 64 || d == 128) && q.is_contiguous() && k.is_contiguous();
    if fused {
        apply_rotary_pos_emb_(q, k, cos, sin)?;
        return Ok((q.clone(), k.clone()));
    }
    Ok((
        rotary_position_embedding(q, cos, sin, RotaryMode::Half)?,
        rotary_position_embedding(k, cos, sin, RotaryMode::Half)?,
    ))
}
