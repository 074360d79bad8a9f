//! The aclnn layer: RAII handles over nnopbase objects built from [`NpuTensor`] views ([`AclTensor`],
//! [`AclTensorList`], which owns its members, [`AclIntArray`], [`AclScalar`]), the one helper through which every
//! two-phase operator call goes ([`two_phase`]: phase 1, workspace from the stream-ordered pool, phase 2 on the
//! device's stream), and the safe operator functions ([`ops`], [`quant`], [`attention`]).

pub mod attention;
pub mod ops;
pub mod quant;

use crate::error::{Error, Result};
use crate::loader::{Cann, op_sym, sym};
use crate::runtime::device::AscendDevice;
use crate::runtime::tensor::NpuTensor;
use crate::sys;

/// An `aclTensor` describing an [`NpuTensor`] view; destroyed on drop (host-side descriptor only: dropping it
/// after phase 2 has been queued is fine, the kernel does not read it).
pub struct AclTensor {
    api: &'static Cann,
    raw: *mut sys::aclTensor,
}

impl AclTensor {
    /// Describes `t`: view dims and strides (elements, outermost first), offset in elements, ND format, a 1-D
    /// storage shape covering the whole block, and the block start as data (32-byte aligned by the pool).
    pub fn new(t: &NpuTensor) -> Result<AclTensor> {
        let api = t.device().api();
        let to_i64 = |v: usize| i64::try_from(v).map_err(|_| Error::InvalidArgument(format!("{v} exceeds i64")));
        let dims = t.shape().iter().map(|&d| to_i64(d)).collect::<Result<Vec<_>>>()?;
        let strides = t.strides().iter().map(|&s| to_i64(s)).collect::<Result<Vec<_>>>()?;
        let storage = [to_i64(t.storage_elems())?];
        let offset = to_i64(t.offset())?;
        let f = sym!(api.nnopbase, aclCreateTensor)?;
        // SAFETY: dims/strides live for the call and have `rank` entries; storage has one; the data pointer is the
        // start of a live pool block that `t` keeps alive; nnopbase copies the arrays.
        let raw = unsafe {
            f(
                dims.as_ptr(),
                dims.len() as u64,
                t.dtype().acl(),
                strides.as_ptr(),
                offset,
                sys::aclFormat_ACL_FORMAT_ND,
                storage.as_ptr(),
                1,
                t.data_ptr(),
            )
        };
        if raw.is_null() {
            return Err(Error::NullHandle { call: "aclCreateTensor", message: api.recent_error_message() });
        }
        Ok(AclTensor { api, raw })
    }

    pub fn as_ptr(&self) -> *mut sys::aclTensor {
        self.raw
    }
}

impl Drop for AclTensor {
    fn drop(&mut self) {
        if let Ok(f) = sym!(self.api.nnopbase, aclDestroyTensor) {
            // SAFETY: `raw` was created by aclCreateTensor, is not owned by a list (see AclTensorList::new, which
            // forgets the AclTensors it takes) and is destroyed exactly once.
            let code = unsafe { f(self.raw) };
            crate::record_drop_error(self.api.check("aclDestroyTensor", code));
        }
    }
}

/// An `aclTensorList`. It owns its member tensors: only the list is destroyed (cann-facts trap 3).
pub struct AclTensorList {
    api: &'static Cann,
    raw: *mut sys::aclTensorList,
}

impl AclTensorList {
    /// Takes ownership of `tensors`; they are destroyed with the list.
    pub fn new(api: &'static Cann, tensors: Vec<AclTensor>) -> Result<AclTensorList> {
        let ptrs: Vec<*const sys::aclTensor> = tensors.iter().map(|t| t.raw.cast_const()).collect();
        let f = sym!(api.nnopbase, aclCreateTensorList)?;
        // SAFETY: `ptrs` holds live aclTensor handles and lives for the call.
        let raw = unsafe { f(ptrs.as_ptr(), ptrs.len() as u64) };
        if raw.is_null() {
            // The list was not made: the AclTensors still own their handles and destroy them when dropped here.
            return Err(Error::NullHandle { call: "aclCreateTensorList", message: api.recent_error_message() });
        }
        // The list now owns the handles: forget the Rust owners so they are not destroyed twice.
        tensors.into_iter().for_each(std::mem::forget);
        Ok(AclTensorList { api, raw })
    }

    pub fn as_ptr(&self) -> *mut sys::aclTensorList {
        self.raw
    }
}

impl Drop for AclTensorList {
    fn drop(&mut self) {
        if let Ok(f) = sym!(self.api.nnopbase, aclDestroyTensorList) {
            // SAFETY: `raw` came from aclCreateTensorList and is destroyed once; it destroys its members.
            let code = unsafe { f(self.raw) };
            crate::record_drop_error(self.api.check("aclDestroyTensorList", code));
        }
    }
}

/// An `aclIntArray` (a host array copied by nnopbase at creation).
pub struct AclIntArray {
    api: &'static Cann,
    raw: *mut sys::aclIntArray,
}

impl AclIntArray {
    pub fn new(api: &'static Cann, values: &[i64]) -> Result<AclIntArray> {
        let f = sym!(api.nnopbase, aclCreateIntArray)?;
        // SAFETY: `values` is a live slice of `len` i64 values; nnopbase copies it.
        let raw = unsafe { f(values.as_ptr(), values.len() as u64) };
        if raw.is_null() {
            return Err(Error::NullHandle { call: "aclCreateIntArray", message: api.recent_error_message() });
        }
        Ok(AclIntArray { api, raw })
    }

    pub fn as_ptr(&self) -> *mut sys::aclIntArray {
        self.raw
    }
}

impl Drop for AclIntArray {
    fn drop(&mut self) {
        if let Ok(f) = sym!(self.api.nnopbase, aclDestroyIntArray) {
            // SAFETY: created by aclCreateIntArray, destroyed once.
            let code = unsafe { f(self.raw) };
            crate::record_drop_error(self.api.check("aclDestroyIntArray", code));
        }
    }
}

/// An `aclScalar` holding an f32 value (nnopbase copies the host value at creation, cann-facts 2.4).
pub struct AclScalar {
    api: &'static Cann,
    raw: *mut sys::aclScalar,
}

impl AclScalar {
    /// An f32 (`ACL_FLOAT`) scalar.
    pub fn f32(api: &'static Cann, value: f32) -> Result<AclScalar> {
        let f = sym!(api.nnopbase, aclCreateScalar)?;
        let mut value = value;
        // SAFETY: `value` is a live f32 for the call and ACL_FLOAT names its type; nnopbase copies it.
        let raw = unsafe { f((&raw mut value).cast(), sys::aclDataType_ACL_FLOAT) };
        if raw.is_null() {
            return Err(Error::NullHandle { call: "aclCreateScalar", message: api.recent_error_message() });
        }
        Ok(AclScalar { api, raw })
    }

    pub fn as_ptr(&self) -> *mut sys::aclScalar {
        self.raw
    }
}

impl Drop for AclScalar {
    fn drop(&mut self) {
        if let Ok(f) = sym!(self.api.nnopbase, aclDestroyScalar) {
            // SAFETY: created by aclCreateScalar, destroyed once.
            let code = unsafe { f(self.raw) };
            crate::record_drop_error(self.api.check("aclDestroyScalar", code));
        }
    }
}

/// The phase-2 signature shared by every aclnn operator.
pub(crate) type LaunchFn = unsafe extern "C" fn(
    workspace: *mut std::ffi::c_void,
    workspace_size: u64,
    executor: *mut sys::aclOpExecutor,
    stream: sys::aclrtStream,
) -> sys::aclnnStatus;

/// Runs one operator: `phase1(&mut workspace_size, &mut executor)` (the caller's call of
/// `aclnnXxxGetWorkspaceSize`, returning its status), a workspace from the pool, then `launch` on the device's
/// stream. The workspace goes back to the pool right after the launch: stream order keeps it valid for the kernel.
pub(crate) fn two_phase(
    device: &AscendDevice,
    name: &'static str,
    phase1: impl FnOnce(&mut u64, &mut *mut sys::aclOpExecutor) -> sys::aclnnStatus,
    launch: LaunchFn,
) -> Result<()> {
    device.bind()?;
    let api = device.api();
    let mut workspace_size = 0u64;
    let mut executor: *mut sys::aclOpExecutor = std::ptr::null_mut();
    let code = phase1(&mut workspace_size, &mut executor);
    api.check(name, code)?;
    if executor.is_null() {
        return Err(Error::NullHandle { call: name, message: "phase 1 returned no executor".to_string() });
    }
    let workspace = if workspace_size > 0 {
        let bytes = usize::try_from(workspace_size)
            .map_err(|_| Error::InvalidArgument(format!("{name}: workspace of {workspace_size} bytes")))?;
        match device.alloc(bytes) {
            Ok(buffer) => Some(buffer),
            Err(e) => {
                // The executor was never launched: destroy it so it does not leak.
                if let Ok(destroy) = sym!(api.nnopbase, aclDestroyAclOpExecutor) {
                    // SAFETY: `executor` came from phase 1, was not launched and is destroyed once.
                    let _ = unsafe { destroy(executor) };
                }
                return Err(e);
            }
        }
    } else {
        None
    };
    let ws_ptr = workspace.as_ref().map_or(std::ptr::null_mut(), |b| b.as_ptr());
    // SAFETY: the executor comes from phase 1 and is used once (phase 2 frees it); the workspace holds at least
    // `workspace_size` bytes and stays valid for every later user of its block by stream order; the stream is live.
    let code = unsafe { launch(ws_ptr, workspace_size, executor, device.stream().raw()) };
    api.check(name, code)
}

/// Whether both phases of operator `op` (e.g. "RmsNorm") resolve in the loaded libraries.
pub(crate) fn operator_symbols_present(api: &Cann, op: &str) -> bool {
    macro_rules! check {
        ($($name:literal => $p1:ident, $p2:ident;)*) => {
            match op {
                $( $name => op_sym!(api, $name, $p1).is_ok() && op_sym!(api, $name, $p2).is_ok(), )*
                _ => false,
            }
        };
    }
    check! {
        "RmsNorm" => aclnnRmsNormGetWorkspaceSize, aclnnRmsNorm;
        "AddRmsNorm" => aclnnAddRmsNormGetWorkspaceSize, aclnnAddRmsNorm;
        "ApplyRotaryPosEmb" => aclnnApplyRotaryPosEmbGetWorkspaceSize, aclnnApplyRotaryPosEmb;
        "RotaryPositionEmbedding" => aclnnRotaryPositionEmbeddingGetWorkspaceSize, aclnnRotaryPositionEmbedding;
        "InplaceScatterUpdate" => aclnnInplaceScatterUpdateGetWorkspaceSize, aclnnInplaceScatterUpdate;
        "PromptFlashAttentionV3" => aclnnPromptFlashAttentionV3GetWorkspaceSize, aclnnPromptFlashAttentionV3;
        "IncreFlashAttentionV4" => aclnnIncreFlashAttentionV4GetWorkspaceSize, aclnnIncreFlashAttentionV4;
        "FusedInferAttentionScoreV2" => aclnnFusedInferAttentionScoreV2GetWorkspaceSize, aclnnFusedInferAttentionScoreV2;
        "AscendQuantV3" => aclnnAscendQuantV3GetWorkspaceSize, aclnnAscendQuantV3;
        "QuantMatmulV4" => aclnnQuantMatmulV4GetWorkspaceSize, aclnnQuantMatmulV4;
        "WeightQuantBatchMatmulV2" => aclnnWeightQuantBatchMatmulV2GetWorkspaceSize, aclnnWeightQuantBatchMatmulV2;
        "SwiGlu" => aclnnSwiGluGetWorkspaceSize, aclnnSwiGlu;
        "Embedding" => aclnnEmbeddingGetWorkspaceSize, aclnnEmbedding;
        "Matmul" => aclnnMatmulGetWorkspaceSize, aclnnMatmul;
        "Cast" => aclnnCastGetWorkspaceSize, aclnnCast;
        "ArgMax" => aclnnArgMaxGetWorkspaceSize, aclnnArgMax;
        "Add" => aclnnAddGetWorkspaceSize, aclnnAdd;
    }
}
