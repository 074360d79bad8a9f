//! The int8 operators (aclnnAscendQuantV3, aclnnQuantMatmulV4, aclnnWeightQuantBatchMatmulV2) and the host-side
//! uint64 dequantisation scale of aclnnQuantMatmulV4 (the packing of aclnnTransQuantParamV2, done on the host
//! instead of with an extra operator).

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
    const OP: &str = "aclnnWeightQuantBatchMatmulV2";
    if x.rank() != 2 || w.rank() != 2 || w.dtype() != DType::I8 {
        return Err(Error::ShapeMismatch {
            op: OP,
            expected: "2-D x and int8 (k, n) w".into(),
            got: format!("{x:?}, {w:?}"),
        });
    }
    let device = x.device();
    let y = NpuTensor::uninit(device, x.dtype(), &[x.shape()[0], w.shape()[1]])?;
    let api = device.api();
    let phase1 = op_sym!(api, "WeightQuantBatchMatmulV2", aclnnWeightQuantBatchMatmulV2GetWorkspaceSize)?;
    let launch = op_sym!(api, "WeightQuantBatchMatmulV2", aclnnWeightQuantBatchMatmulV2)?;
    let (xt, wt, st) = (AclTensor::new(x)?, AclTensor::new(w)?, AclTensor::new(scale)?);
    let (ot, bt, yt) = (optional(offset)?, optional(bias)?, AclTensor::new(&y)?);
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
    )?;
    Ok(y)
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
