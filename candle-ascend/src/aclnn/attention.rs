//! Fused attention: prefill through aclnnPromptFlashAttentionV3 and decode through aclnnIncreFlashAttentionV4
//! (key/value passed as one-tensor lists, int8 KV dequantised inside as `(x + offset) * scale`). Sequence lengths
//! are host arrays baked into the call (cann-facts trap 13); masks are bool/int8/uint8 with 1 = masked out.

use std::ffi::CString;

use crate::aclnn::{AclIntArray, AclTensor, AclTensorList, two_phase};
use crate::error::{Error, Result};
use crate::loader::op_sym;
use crate::runtime::tensor::{DType, NpuTensor};
use crate::sys;

/// Memory layout of q/k/v: batch, sequence, heads, head dim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionLayout {
    /// (B, S, H) with H = N * D.
    Bsh,
    /// (B, S, N, D).
    Bsnd,
    /// (B, N, S, D).
    Bnsd,
}

impl AttentionLayout {
    fn c_name(self) -> Result<CString> {
        let name = match self {
            AttentionLayout::Bsh => "BSH",
            AttentionLayout::Bsnd => "BSND",
            AttentionLayout::Bnsd => "BNSD",
        };
        CString::new(name).map_err(|e| Error::InvalidArgument(e.to_string()))
    }
}

/// Head counts, softmax scale and layout shared by both attention calls.
#[derive(Debug, Clone, Copy)]
pub struct AttentionParams {
    pub num_heads: usize,
    /// Key/value heads (GQA); equal to `num_heads` for plain multi-head attention.
    pub num_kv_heads: usize,
    /// Usually `1 / sqrt(head_dim)`.
    pub scale: f64,
    pub layout: AttentionLayout,
}

fn optional(t: Option<&NpuTensor>) -> Result<Option<AclTensor>> {
    t.map(AclTensor::new).transpose()
}

fn ptr(t: &Option<AclTensor>) -> *mut sys::aclTensor {
    t.as_ref().map_or(std::ptr::null_mut(), AclTensor::as_ptr)
}

fn int_array(q: &NpuTensor, values: Option<&[i64]>) -> Result<Option<AclIntArray>> {
    values.map(|v| AclIntArray::new(q.device().api(), v)).transpose()
}

fn check_float(op: &'static str, q: &NpuTensor) -> Result<()> {
    match q.dtype() {
        DType::F16 | DType::BF16 | DType::F32 => Ok(()),
        other => Err(Error::UnsupportedDtype { op, dtype: format!("{other:?}") }),
    }
}

/// Side of the compressed causal mask of the causal sparse modes (cann-facts trap 12).
pub const COMPRESSED_MASK_SIDE: usize = 2048;

/// The compressed causal mask the causal sparse modes take: `[2048, 2048]` u8, 1 strictly above the diagonal. Its
/// size does not depend on the sequence lengths, so one upload per device serves every prefill.
#[derive(Debug, Clone)]
pub struct CausalMask(NpuTensor);

impl CausalMask {
    /// Builds and uploads the mask (4 MiB, one host-to-device copy).
    pub fn new(device: &crate::AscendDevice) -> Result<CausalMask> {
        let n = COMPRESSED_MASK_SIDE;
        let host: Vec<u8> = (0..n * n).map(|at| u8::from(at % n > at / n)).collect();
        Ok(CausalMask(NpuTensor::from_slice(device, &host, &[n, n])?))
    }

    pub fn tensor(&self) -> &NpuTensor {
        &self.0
    }
}

/// How a prefill call is masked.
#[derive(Debug, Clone, Copy)]
pub enum PromptMasking<'a> {
    /// Sparse mode 0 without a mask: every query row sees every key within the actual lengths.
    Unmasked,
    /// Sparse mode 0 with a full mask (S, Skv) / (B, S, Skv) / (B, 1, S, Skv), 1 = masked out; a fully masked row
    /// yields zeros (innerPrecise 2).
    Full(&'a NpuTensor),
    /// Sparse mode 3 (rightDownCausal) with the compressed mask: query row `i` of sequence `b`, which has
    /// `seq_lens[b]` queries over `kv_lens[b]` keys, sees keys `0 ..= i + kv_lens[b] - seq_lens[b]`: the prefill
    /// of new tokens after a cached prefix, ragged batches included, with no per-step mask.
    RightDownCausal(&'a CausalMask),
}

/// Prefill attention (aclnnPromptFlashAttentionV3): `softmax(scale * q k^T + mask) v` per head, GQA without
/// repeating K/V, masked as `masking` says. `seq_lens` / `kv_lens` are the valid lengths per sequence; output
/// rows past a sequence's query length are zeros (the output is cleared first when some length is short of S:
/// the operator leaves those rows unwritten). The pre/next-token band is left open (the mask decides).
pub fn prompt_flash_attention(
    q: &NpuTensor,
    k: &NpuTensor,
    v: &NpuTensor,
    masking: PromptMasking<'_>,
    seq_lens: Option<&[i64]>,
    kv_lens: Option<&[i64]>,
    params: &AttentionParams,
) -> Result<NpuTensor> {
    const OP: &str = "aclnnPromptFlashAttentionV3";
    check_float(OP, q)?;
    let device = q.device();
    let seq_dim = if params.layout == AttentionLayout::Bnsd { 2 } else { 1 };
    let rows = q.shape().get(seq_dim).copied().unwrap_or(0) as i64;
    let short = seq_lens.is_some_and(|lens| lens.iter().any(|&l| l < rows));
    let out = if short {
        NpuTensor::zeros(device, q.dtype(), q.shape())?
    } else {
        NpuTensor::uninit(device, q.dtype(), q.shape())?
    };
    let api = device.api();
    let phase1 = op_sym!(api, "PromptFlashAttentionV3", aclnnPromptFlashAttentionV3GetWorkspaceSize)?;
    let launch = op_sym!(api, "PromptFlashAttentionV3", aclnnPromptFlashAttentionV3)?;
    let (qt, kt, vt, ot) = (AclTensor::new(q)?, AclTensor::new(k)?, AclTensor::new(v)?, AclTensor::new(&out)?);
    let (mask, sparse_mode) = match masking {
        PromptMasking::Unmasked => (None, 0),
        PromptMasking::Full(m) => (Some(m), 0),
        PromptMasking::RightDownCausal(m) => (Some(m.tensor()), 3),
    };
    let mt = optional(mask)?;
    let (lens, kvl) = (int_array(q, seq_lens)?, int_array(q, kv_lens)?);
    let lens_ptr = lens.as_ref().map_or(std::ptr::null_mut(), AclIntArray::as_ptr);
    let kvl_ptr = kvl.as_ref().map_or(std::ptr::null_mut(), AclIntArray::as_ptr);
    let layout = params.layout.c_name()?;
    let (nh, nkv) = (params.num_heads as i64, params.num_kv_heads as i64);
    let open_band = i64::from(i32::MAX);
    let null = std::ptr::null_mut();
    two_phase(
        device,
        OP,
        // SAFETY: every descriptor, array and the layout string live for the call; absent optional arguments are
        // null; nnopbase does not write through `inputLayout` (declared `char *`). Out-pointers from two_phase.
        |ws, ex| unsafe {
            phase1(
                qt.as_ptr(),
                kt.as_ptr(),
                vt.as_ptr(),
                null,
                ptr(&mt),
                lens_ptr,
                kvl_ptr,
                null,
                null,
                null,
                null,
                null,
                nh,
                params.scale,
                open_band,
                open_band,
                layout.as_ptr().cast_mut(),
                nkv,
                sparse_mode,
                2,
                ot.as_ptr(),
                ws,
                ex,
            )
        },
        *launch,
    )?;
    Ok(out)
}

/// Decode attention (aclnnIncreFlashAttentionV4): one query token per sequence over the fixed cache `k`, `v`
/// (the whole batch, S = cache capacity), attending to the first `kv_lens[b]` positions. An int8 cache comes
/// with `antiquant = (scale, offset)` of the query's dtype, (2, H) for BSH, (2, N, D) for BSND, (2, N, 1, D)
/// for BNSD, row 0 for keys and row 1 for values: `x = (x_int8 + offset) * scale`.
pub fn incre_flash_attention(
    q: &NpuTensor,
    k: &NpuTensor,
    v: &NpuTensor,
    kv_lens: &[i64],
    mask: Option<&NpuTensor>,
    antiquant: Option<(&NpuTensor, Option<&NpuTensor>)>,
    params: &AttentionParams,
) -> Result<NpuTensor> {
    const OP: &str = "aclnnIncreFlashAttentionV4";
    check_float(OP, q)?;
    let device = q.device();
    let api = device.api();
    let out = NpuTensor::uninit(device, q.dtype(), q.shape())?;
    let phase1 = op_sym!(api, "IncreFlashAttentionV4", aclnnIncreFlashAttentionV4GetWorkspaceSize)?;
    let launch = op_sym!(api, "IncreFlashAttentionV4", aclnnIncreFlashAttentionV4)?;
    let (qt, ot, mt) = (AclTensor::new(q)?, AclTensor::new(&out)?, optional(mask)?);
    let keys = AclTensorList::new(api, vec![AclTensor::new(k)?])?;
    let values = AclTensorList::new(api, vec![AclTensor::new(v)?])?;
    let (scale, offset) = match antiquant {
        Some((s, o)) => (Some(AclTensor::new(s)?), optional(o)?),
        None => (None, None),
    };
    let lens = AclIntArray::new(api, kv_lens)?;
    let layout = params.layout.c_name()?;
    let (nh, nkv) = (params.num_heads as i64, params.num_kv_heads as i64);
    let null = std::ptr::null_mut();
    two_phase(
        device,
        OP,
        // SAFETY: every descriptor, list, array and the layout string live for the call; absent optional arguments
        // are null; nnopbase does not write through `inputLayout`. Out-pointers from two_phase.
        |ws, ex| unsafe {
            phase1(
                qt.as_ptr(),
                keys.as_ptr(),
                values.as_ptr(),
                null,
                ptr(&mt),
                lens.as_ptr(),
                null,
                null,
                null,
                null,
                null,
                ptr(&scale),
                ptr(&offset),
                null,
                null,
                nh,
                params.scale,
                layout.as_ptr().cast_mut(),
                nkv,
                0,
                0,
                ot.as_ptr(),
                ws,
                ex,
            )
        },
        *launch,
    )?;
    Ok(out)
}
