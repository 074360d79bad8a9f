//! The int8 operators (aclnnAscendQuantV3, aclnnDynamicQuant, aclnnQuantMatmulV4 with a per-tensor/per-channel or
//! a per-token scale, aclnnWeightQuantBatchMatmulV2), the broadcasting aclnnMul that the int8 paths use for
//! scales, and the host-side uint64 dequantisation scale of aclnnQuantMatmulV4 (the packing of
//! aclnnTransQuantParamV2, done on the host instead of with an extra operator).

use std::ffi::CString;

use crate::aclnn::{AclTensor, two_phase};
use crate::error::{Error, Result};
use crate::loader::op_sym;
use crate::runtime::tensor::{DType, NpuTensor};
use crate::sys;

fn optional(t: Option<&NpuTensor>) -> Result<Option<AclTensor>> {
    t.map(AclTensor::new).transpose()
}

fn ptr(t: &Option<AclTensor>) -> *mut sys::aclTensor {
    t.as_ref().map_or(std::ptr::null_mut(), AclTensor::as_ptr)
}

/// `q = saturate(round(x * scale + offset))` to int8, round half away from zero (aclnnAscendQuantV3, which
/// multiplies; cann-facts trap 9). `scale` / `offset` have x's dtype and shape (1) (per tensor) or
/// (x.shape[axis]) (per channel); `axis` is the last or second-to-last dim.
pub fn ascend_quant(x: &NpuTensor, scale: &NpuTensor, offset: Option<&NpuTensor>, axis: usize) -> Result<NpuTensor> {
    const OP: &str = "aclnnAscendQuantV3";
    if !matches!(x.dtype(), DType::F16 | DType::BF16 | DType::F32) || scale.dtype() != x.dtype() {
        return Err(Error::UnsupportedDtype { op: OP, dtype: format!("x {:?}, scale {:?}", x.dtype(), scale.dtype()) });
    }
    let device = x.device();
    let y = NpuTensor::uninit(device, DType::I8, x.shape())?;
    let api = device.api();
    let phase1 = op_sym!(api, "AscendQuantV3", aclnnAscendQuantV3GetWorkspaceSize)?;
    let launch = op_sym!(api, "AscendQuantV3", aclnnAscendQuantV3)?;
    let (xt, st, ot, yt) = (AclTensor::new(x)?, AclTensor::new(scale)?, optional(offset)?, AclTensor::new(&y)?);
    let round = CString::new("round").map_err(|e| Error::InvalidArgument(e.to_string()))?;
    let axis = i32::try_from(axis).map_err(|_| Error::InvalidArgument(format!("{OP}: axis {axis}")))?;
    two_phase(
        device,
        OP,
        // SAFETY: descriptors and the round-mode string are live for the call; out-pointers from two_phase.
        |ws, ex| unsafe {
            phase1(
                xt.as_ptr(),
                st.as_ptr(),
                ptr(&ot),
                false,
                round.as_ptr(),
                DType::I8.acl(),
                axis,
                yt.as_ptr(),
                ws,
                ex,
            )
        },
        *launch,
    )?;
    Ok(y)
}

/// `y = (x1 @ x2 + bias) * deq_scale[n]`, int8 x int8 -> int32 -> `out_dtype` (aclnnQuantMatmulV4).
/// x1 (m, k) int8; x2 (k, n) int8, or (n, k) with `transpose_x2`; `deq_scale` u64 from [`pack_deq_scales`]
/// (required for f16 output), (1) or (n); `bias` i32 (n).
pub fn quant_matmul(
    x1: &NpuTensor,
    x2: &NpuTensor,
    deq_scale: &NpuTensor,
    bias: Option<&NpuTensor>,
    transpose_x2: bool,
    out_dtype: DType,
) -> Result<NpuTensor> {
    const OP: &str = "aclnnQuantMatmulV4";
    if x1.rank() != 2 || x2.rank() != 2 || x1.dtype() != DType::I8 || x2.dtype() != DType::I8 {
        return Err(Error::ShapeMismatch {
            op: OP,
            expected: "2-D int8 x1 and x2".into(),
            got: format!("{x1:?}, {x2:?}"),
        });
    }
    let n = if transpose_x2 { x2.shape()[0] } else { x2.shape()[1] };
    let device = x1.device();
    let out = NpuTensor::uninit(device, out_dtype, &[x1.shape()[0], n])?;
    let api = device.api();
    let phase1 = op_sym!(api, "QuantMatmulV4", aclnnQuantMatmulV4GetWorkspaceSize)?;
    let launch = op_sym!(api, "QuantMatmulV4", aclnnQuantMatmulV4)?;
    let (at, bt, st) = (AclTensor::new(x1)?, AclTensor::new(x2)?, AclTensor::new(deq_scale)?);
    let (biast, ot) = (optional(bias)?, AclTensor::new(&out)?);
    let null = std::ptr::null_mut();
    two_phase(
        device,
        OP,
        // SAFETY: descriptors are live for the call (null for absent optional tensors); out-pointers from two_phase.
        |ws, ex| unsafe {
            phase1(
                at.as_ptr(),
                bt.as_ptr(),
                st.as_ptr(),
                null,
                null,
                ptr(&biast),
                false,
                transpose_x2,
                ot.as_ptr(),
                ws,
                ex,
            )
        },
        *launch,
    )?;
    Ok(out)
}

/// W8A16: `y = x @ ((w + offset) * scale) + bias` (aclnnWeightQuantBatchMatmulV2). x (m, k) f16/bf16; w (k, n)
/// int8 (an (n, k) weight as its transposed view); scale / offset of x's dtype, (n) per channel
/// (`group_size` 0) or (k / group_size, n) per group; bias (n).
pub fn weight_quant_matmul(
    x: &NpuTensor,
    w: &NpuTensor,
    scale: &NpuTensor,
    offset: Option<&NpuTensor>,
    bias: Option<&NpuTensor>,
    group_size: usize,
) -> Result<NpuTensor> {
    if x.rank() != 2 || w.rank() != 2 {
        return Err(Error::ShapeMismatch {
            op: "aclnnWeightQuantBatchMatmulV2",
            expected: "2-D x and int8 (k, n) w".into(),
            got: format!("{x:?}, {w:?}"),
        });
    }
    let y = NpuTensor::uninit(x.device(), x.dtype(), &[x.shape()[0], w.shape()[1]])?;
    weight_quant_matmul_into(x, w, scale, offset, bias, group_size, &y)?;
    Ok(y)
}

/// [`weight_quant_matmul`] into an existing `y` (m, n) of x's dtype, which may be a strided view (e.g. a column
/// block of a wider output when n is split into chunks of at most 65535, as llama.cpp does).
pub fn weight_quant_matmul_into(
    x: &NpuTensor,
    w: &NpuTensor,
    scale: &NpuTensor,
    offset: Option<&NpuTensor>,
    bias: Option<&NpuTensor>,
    group_size: usize,
    y: &NpuTensor,
) -> Result<()> {
    const OP: &str = "aclnnWeightQuantBatchMatmulV2";
    if x.rank() != 2 || w.rank() != 2 || w.dtype() != DType::I8 {
        return Err(Error::ShapeMismatch {
            op: OP,
            expected: "2-D x and int8 (k, n) w".into(),
            got: format!("{x:?}, {w:?}"),
        });
    }
    if y.shape() != [x.shape()[0], w.shape()[1]] || y.dtype() != x.dtype() {
        return Err(Error::ShapeMismatch {
            op: OP,
            expected: format!("y {:?} [{}, {}]", x.dtype(), x.shape()[0], w.shape()[1]),
            got: format!("{y:?}"),
        });
    }
    let device = x.device();
    let api = device.api();
    let phase1 = op_sym!(api, "WeightQuantBatchMatmulV2", aclnnWeightQuantBatchMatmulV2GetWorkspaceSize)?;
    let launch = op_sym!(api, "WeightQuantBatchMatmulV2", aclnnWeightQuantBatchMatmulV2)?;
    let (xt, wt, st) = (AclTensor::new(x)?, AclTensor::new(w)?, AclTensor::new(scale)?);
    let (ot, bt, yt) = (optional(offset)?, optional(bias)?, AclTensor::new(y)?);
    let group = i32::try_from(group_size).map_err(|_| Error::InvalidArgument(format!("{OP}: group {group_size}")))?;
    let null = std::ptr::null_mut();
    two_phase(
        device,
        OP,
        // SAFETY: descriptors are live for the call (null for absent optional tensors); out-pointers from two_phase.
        |ws, ex| unsafe {
            phase1(xt.as_ptr(), wt.as_ptr(), st.as_ptr(), ptr(&ot), null, null, ptr(&bt), group, yt.as_ptr(), ws, ex)
        },
        *launch,
    )
}

/// Per-token symmetric int8 quantization (aclnnDynamicQuant): per row of `x` (the last dim), `scale = max|x| / 127`
/// and `q = round(x / scale)` (the operator divides; cann-facts trap 9). x f16/bf16, 2-8 D. Returns `(q, scale)`:
/// q int8 of x's shape, scale f32 of x's shape without the last dim. No smooth scales.
pub fn dynamic_quant(x: &NpuTensor) -> Result<(NpuTensor, NpuTensor)> {
    const OP: &str = "aclnnDynamicQuant";
    if !matches!(x.dtype(), DType::F16 | DType::BF16) {
        return Err(Error::UnsupportedDtype { op: OP, dtype: format!("x {:?} (f16/bf16 only)", x.dtype()) });
    }
    if !(2..=8).contains(&x.rank()) {
        return Err(Error::ShapeMismatch { op: OP, expected: "a 2-8 D x".into(), got: format!("{x:?}") });
    }
    let device = x.device();
    let q = NpuTensor::uninit(device, DType::I8, x.shape())?;
    let scale = NpuTensor::uninit(device, DType::F32, &x.shape()[..x.rank() - 1])?;
    let api = device.api();
    let phase1 = op_sym!(api, "DynamicQuant", aclnnDynamicQuantGetWorkspaceSize)?;
    let launch = op_sym!(api, "DynamicQuant", aclnnDynamicQuant)?;
    let (xt, qt, st) = (AclTensor::new(x)?, AclTensor::new(&q)?, AclTensor::new(&scale)?);
    let null = std::ptr::null_mut();
    two_phase(
        device,
        OP,
        // SAFETY: descriptors are live for the call; the absent smooth scales are null; out-pointers from two_phase.
        |ws, ex| unsafe { phase1(xt.as_ptr(), null, qt.as_ptr(), st.as_ptr(), ws, ex) },
        *launch,
    )?;
    Ok((q, scale))
}

/// `y = x1 @ x2 * scale[n] * pertoken[m] (+ bias[n])`, int8 x int8 -> int32 -> `out_dtype` (aclnnQuantMatmulV4
/// with pertokenScale). x1 (m, k) int8; x2 (k, n) int8, or (n, k) with `transpose_x2`; `scale` f32 (1) or (n)
/// (an f32 scale is valid with f16 output only together with a per-token scale, cann-facts trap 10);
/// `pertoken` f32 (m), e.g. the scale output of [`dynamic_quant`]; `bias` f32/bf16 (n), added after the scaling;
/// `out_dtype` f16 or bf16.
pub fn quant_matmul_per_token(
    x1: &NpuTensor,
    x2: &NpuTensor,
    scale: &NpuTensor,
    pertoken: &NpuTensor,
    bias: Option<&NpuTensor>,
    transpose_x2: bool,
    out_dtype: DType,
) -> Result<NpuTensor> {
    const OP: &str = "aclnnQuantMatmulV4";
    if x1.rank() != 2 || x2.rank() != 2 || x1.dtype() != DType::I8 || x2.dtype() != DType::I8 {
        return Err(Error::ShapeMismatch {
            op: OP,
            expected: "2-D int8 x1 and x2".into(),
            got: format!("{x1:?}, {x2:?}"),
        });
    }
    if !matches!(out_dtype, DType::F16 | DType::BF16) || scale.dtype() != DType::F32 || pertoken.dtype() != DType::F32 {
        return Err(Error::UnsupportedDtype {
            op: OP,
            dtype: format!("out {out_dtype:?}, scale {:?}, pertoken {:?}", scale.dtype(), pertoken.dtype()),
        });
    }
    let n = if transpose_x2 { x2.shape()[0] } else { x2.shape()[1] };
    let device = x1.device();
    let out = NpuTensor::uninit(device, out_dtype, &[x1.shape()[0], n])?;
    let api = device.api();
    let phase1 = op_sym!(api, "QuantMatmulV4", aclnnQuantMatmulV4GetWorkspaceSize)?;
    let launch = op_sym!(api, "QuantMatmulV4", aclnnQuantMatmulV4)?;
    let (at, bt, st, pt) =
        (AclTensor::new(x1)?, AclTensor::new(x2)?, AclTensor::new(scale)?, AclTensor::new(pertoken)?);
    let (biast, ot) = (optional(bias)?, AclTensor::new(&out)?);
    let null = std::ptr::null_mut();
    two_phase(
        device,
        OP,
        // SAFETY: descriptors are live for the call (null for absent optional tensors); out-pointers from two_phase.
        |ws, ex| unsafe {
            phase1(
                at.as_ptr(),
                bt.as_ptr(),
                st.as_ptr(),
                null,
                pt.as_ptr(),
                ptr(&biast),
                false,
                transpose_x2,
                ot.as_ptr(),
                ws,
                ex,
            )
        },
        *launch,
    )?;
    Ok(out)
}

/// The broadcast shape of two shapes (right-aligned, each dim equal or 1), if they broadcast.
fn broadcast_shape(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let rank = a.len().max(b.len());
    let dim = |s: &[usize], i: usize| if i + s.len() >= rank { s[i + s.len() - rank] } else { 1 };
    (0..rank)
        .map(|i| match (dim(a, i), dim(b, i)) {
            (x, y) if x == y || y == 1 => Some(x),
            (1, y) => Some(y),
            _ => None,
        })
        .collect()
}

/// Element-wise `out = x * other` with NumPy broadcasting (aclnnMul, cann-facts 2.5): both float, any strides;
/// the result is a new contiguous tensor of the broadcast shape in x's dtype.
pub fn mul(x: &NpuTensor, other: &NpuTensor) -> Result<NpuTensor> {
    const OP: &str = "aclnnMul";
    let float = |d: DType| matches!(d, DType::F16 | DType::BF16 | DType::F32);
    if !float(x.dtype()) || !float(other.dtype()) {
        return Err(Error::UnsupportedDtype { op: OP, dtype: format!("{:?} * {:?}", x.dtype(), other.dtype()) });
    }
    let shape = broadcast_shape(x.shape(), other.shape()).ok_or_else(|| Error::ShapeMismatch {
        op: OP,
        expected: format!("a shape broadcastable with {:?}", x.shape()),
        got: format!("{other:?}"),
    })?;
    let device = x.device();
    let out = NpuTensor::uninit(device, x.dtype(), &shape)?;
    let api = device.api();
    let phase1 = op_sym!(api, "Mul", aclnnMulGetWorkspaceSize)?;
    let launch = op_sym!(api, "Mul", aclnnMul)?;
    let (xt, ot, yt) = (AclTensor::new(x)?, AclTensor::new(other)?, AclTensor::new(&out)?);
    // SAFETY: all descriptors are live for the call; the out-pointers come from two_phase.
    two_phase(device, OP, |ws, ex| unsafe { phase1(xt.as_ptr(), ot.as_ptr(), yt.as_ptr(), ws, ex) }, *launch)?;
    Ok(out)
}

/// Packs an f32 dequant scale into the uint64 form that QuantMatmulV4 needs for an f16 output on A2/A3:
/// `(bits(scale) & 0xFFFFE000) | 1 << 46` (a 19-bit truncation of the float, bit 46 set; no offset).
pub fn pack_deq_scale(scale: f32) -> u64 {
    (u64::from(scale.to_bits()) & 0xFFFF_E000) | (1u64 << 46)
}

/// [`pack_deq_scale`] over a per-channel scale vector.
pub fn pack_deq_scales(scales: &[f32]) -> Vec<u64> {
    scales.iter().map(|&s| pack_deq_scale(s)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_truncated_bits_with_bit_46() {
        let packed = pack_deq_scale(1.0);
        assert_eq!(packed, 0x3F80_0000 | (1 << 46));
        // The low 13 mantissa bits are dropped.
        let s = f32::from_bits(0x3F80_1FFF);
        assert_eq!(pack_deq_scale(s), 0x3F80_0000 | (1 << 46));
        assert_eq!(pack_deq_scales(&[0.5, 2.0]), vec![0x3F00_0000 | (1 << 46), 0x4000_0000 | (1 << 46)]);
    }
}
