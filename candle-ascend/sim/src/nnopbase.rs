//! nnopbase objects: tensors (host descriptors of device memory, validated at creation), tensor lists (which own
//! their tensors), int arrays, scalars, and single-use executors with the shared phase-2 launch.

use std::ffi::c_void;

use crate::codes::*;
use crate::memory::{find, mark};
use crate::state::{State, fail, read_array, require_device, with_state};
use crate::stream::{Job, enqueue};

/// A snapshot of an aclTensor: what a kernel needs (shape, strides and offset in elements, data address).
#[derive(Clone, Debug)]
pub struct TensorDesc {
    pub dtype: i32,
    pub shape: Vec<usize>,
    pub strides: Vec<usize>,
    pub offset: usize,
    pub data: usize,
    /// Bytes from `data` covered by the storage shape.
    pub storage_bytes: usize,
}

impl TensorDesc {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_contiguous(&self) -> bool {
        let mut expected = 1;
        for (&d, &s) in self.shape.iter().zip(&self.strides).rev() {
            if d > 1 && s != expected {
                return false;
            }
            expected *= d;
        }
        true
    }
}

/// Bytes per element of the dtypes the simulator supports.
pub fn dtype_size(dtype: i32) -> Option<usize> {
    match dtype {
        ACL_INT8 | ACL_UINT8 => Some(1),
        ACL_FLOAT16 | ACL_BF16 => Some(2),
        ACL_FLOAT | ACL_INT32 => Some(4),
        ACL_INT64 | ACL_UINT64 => Some(8),
        _ => None,
    }
}

#[allow(clippy::too_many_arguments)] // mirrors the C prototype of aclCreateTensor
fn create_tensor(
    dims: *const i64,
    ndims: u64,
    dtype: i32,
    strides: *const i64,
    offset: i64,
    format: i32,
    storage: *const i64,
    nstorage: u64,
    data: *mut c_void,
) -> Result<TensorDesc, String> {
    let esize = dtype_size(dtype).ok_or(format!("dtype {dtype} is not supported"))?;
    if format != ACL_FORMAT_ND {
        return Err(format!("format {format} is not supported (ND only)"));
    }
    let dims = read_array(dims, ndims).ok_or("viewDims is null")?;
    let strides = read_array(strides, ndims).ok_or("strides is null")?;
    let storage = read_array(storage, nstorage).ok_or("storageDims is null")?;
    if ndims > 8 || dims.iter().chain(&strides).chain(&storage).any(|&v| v < 0) || offset < 0 {
        return Err(format!("bad view: dims {dims:?} strides {strides:?} offset {offset} storage {storage:?}"));
    }
    let data = data as usize;
    if !data.is_multiple_of(32) {
        return Err(format!(
            "tensorData {data:#x} is not 32-byte aligned (express sub-views through the offset, in elements)"
        ));
    }
    let shape: Vec<usize> = dims.iter().map(|&d| d as usize).collect();
    let strides: Vec<usize> = strides.iter().map(|&s| s as usize).collect();
    let storage_elems: usize = storage.iter().map(|&d| d as usize).product();
    let numel: usize = shape.iter().product();
    if numel > 0 {
        let last = offset as usize + shape.iter().zip(&strides).map(|(&d, &s)| (d - 1) * s).sum::<usize>();
        if last >= storage_elems {
            return Err(format!(
                "view (dims {shape:?}, strides {strides:?}, offset {offset}) reaches element {last} beyond the \
                 storage of {storage_elems} elements"
            ));
        }
    }
    let storage_bytes = storage_elems * esize;
    if storage_bytes > 0 {
        let inside = with_state(|s| find(s, data, storage_bytes).is_some_and(|(_, a)| !a.pinned));
        if !inside {
            return Err(format!(
                "tensorData {data:#x} with {storage_bytes} storage bytes is not inside one device allocation"
            ));
        }
    }
    Ok(TensorDesc { dtype, shape, strides, offset: offset as usize, data, storage_bytes })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn aclCreateTensor(
    view_dims: *const i64,
    view_dims_num: u64,
    data_type: i32,
    stride: *const i64,
    offset: i64,
    format: i32,
    storage_dims: *const i64,
    storage_dims_num: u64,
    tensor_data: *mut c_void,
) -> *mut c_void {
    let desc = create_tensor(
        view_dims,
        view_dims_num,
        data_type,
        stride,
        offset,
        format,
        storage_dims,
        storage_dims_num,
        tensor_data,
    );
    match desc {
        Ok(desc) => with_state(|s| {
            let id = s.new_handle();
            s.tensors.insert(id, desc);
            id as *mut c_void
        }),
        Err(e) => {
            fail(ACLNN_ERR_PARAM_INVALID, format!("aclCreateTensor: {e}"));
            std::ptr::null_mut()
        }
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn aclDestroyTensor(tensor: *const c_void) -> i32 {
    let id = tensor as u64;
    with_state(|s| {
        if let Some(list) = s.owned_by_list.get(&id) {
            return fail(
                ACLNN_ERR_PARAM_INVALID,
                format!("aclDestroyTensor: tensor {id:#x} is owned by tensor list {list:#x}; destroy the list only"),
            );
        }
        match s.tensors.remove(&id) {
            Some(_) => ACL_SUCCESS,
            None => {
                fail(ACLNN_ERR_PARAM_INVALID, format!("aclDestroyTensor: unknown tensor {id:#x} (destroyed twice?)"))
            }
        }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn aclCreateScalar(value: *mut c_void, data_type: i32) -> *mut c_void {
    let Some(size) = dtype_size(data_type) else {
        fail(ACLNN_ERR_PARAM_INVALID, format!("aclCreateScalar: dtype {data_type} is not supported"));
        return std::ptr::null_mut();
    };
    let Some(bytes) = read_array(value as *const u8, size as u64).filter(|_| !value.is_null()) else {
        fail(ACLNN_ERR_PARAM_NULLPTR, "aclCreateScalar: null value");
        return std::ptr::null_mut();
    };
    let mut stored = [0u8; 8];
    stored[..size].copy_from_slice(&bytes);
    with_state(|s| {
        let id = s.new_handle();
        s.scalars.insert(id, (data_type, stored));
        id as *mut c_void
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn aclDestroyScalar(scalar: *const c_void) -> i32 {
    with_state(|s| match s.scalars.remove(&(scalar as u64)) {
        Some(_) => ACL_SUCCESS,
        None => fail(ACLNN_ERR_PARAM_INVALID, "aclDestroyScalar: unknown scalar (destroyed twice?)"),
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn aclCreateIntArray(value: *const i64, size: u64) -> *mut c_void {
    let Some(values) = read_array(value, size) else {
        fail(ACLNN_ERR_PARAM_NULLPTR, "aclCreateIntArray: null value");
        return std::ptr::null_mut();
    };
    with_state(|s| {
        let id = s.new_handle();
        s.int_arrays.insert(id, values);
        id as *mut c_void
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn aclDestroyIntArray(array: *const c_void) -> i32 {
    with_state(|s| match s.int_arrays.remove(&(array as u64)) {
        Some(_) => ACL_SUCCESS,
        None => fail(ACLNN_ERR_PARAM_INVALID, "aclDestroyIntArray: unknown array (destroyed twice?)"),
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn aclCreateTensorList(value: *const *const c_void, size: u64) -> *mut c_void {
    let Some(members) = read_array(value, size) else {
        fail(ACLNN_ERR_PARAM_NULLPTR, "aclCreateTensorList: null value");
        return std::ptr::null_mut();
    };
    let ids: Vec<u64> = members.iter().map(|&p| p as u64).collect();
    with_state(|s| {
        for id in &ids {
            if !s.tensors.contains_key(id) || s.owned_by_list.contains_key(id) {
                fail(ACLNN_ERR_PARAM_INVALID, format!("aclCreateTensorList: tensor {id:#x} is unknown or in a list"));
                return std::ptr::null_mut();
            }
        }
        let list = s.new_handle();
        ids.iter().for_each(|&id| {
            s.owned_by_list.insert(id, list);
        });
        s.lists.insert(list, ids);
        list as *mut c_void
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn aclDestroyTensorList(array: *const c_void) -> i32 {
    with_state(|s| match s.lists.remove(&(array as u64)) {
        Some(members) => {
            for id in members {
                s.owned_by_list.remove(&id);
                s.tensors.remove(&id);
            }
            ACL_SUCCESS
        }
        None => fail(ACLNN_ERR_PARAM_INVALID, "aclDestroyTensorList: unknown list (destroyed twice?)"),
    })
}

/// The snapshot of a live tensor handle (`Err` names the argument).
pub fn tensor(s: &State, handle: *const c_void, arg: &str) -> Result<TensorDesc, String> {
    s.tensors.get(&(handle as u64)).cloned().ok_or_else(|| format!("{arg} is null or not a live aclTensor"))
}

/// A queued kernel: the host computation and the device ranges it reads and writes.
pub struct Executor {
    pub op: &'static str,
    pub workspace: u64,
    pub repeatable: bool,
    pub kernel: std::sync::Arc<dyn Fn() -> Result<(), String> + Send + Sync>,
    pub reads: Vec<TensorDesc>,
    pub writes: Vec<TensorDesc>,
}

/// Phase 1 epilogue: fault injection, then the executor handle and workspace size written to the out-pointers.
pub fn finish_phase1(op: &'static str, exec: Result<Executor, String>, ws: *mut u64, out: *mut *mut c_void) -> i32 {
    if let Err(code) = require_device(op) {
        return code;
    }
    if ws.is_null() || out.is_null() {
        return fail(ACLNN_ERR_PARAM_NULLPTR, format!("{op}GetWorkspaceSize: null workspaceSize or executor pointer"));
    }
    if with_state(|s| s.faults.failing_ops.iter().any(|f| f == op)) {
        return fail(ACLNN_ERR_INNER, format!("{op}GetWorkspaceSize: injected failure"));
    }
    match exec {
        Ok(exec) => {
            let workspace = exec.workspace;
            let id = with_state(|s| {
                let id = s.new_handle();
                s.executors.insert(id, exec);
                id
            });
            // SAFETY: both out-pointers are non-null (checked above) and valid per the contract.
            unsafe {
                *ws = workspace;
                *out = id as *mut c_void;
            }
            ACL_SUCCESS
        }
        Err(e) => fail(ACLNN_ERR_PARAM_INVALID, format!("{op}GetWorkspaceSize: {e}")),
    }
}

fn extent(t: &TensorDesc) -> (usize, usize) {
    (t.data, t.storage_bytes)
}

/// Phase 2 of every operator: consumes the executor (unless repeatable), checks the workspace and that every
/// tensor's memory is still allocated, marks the memory for the stream and queues the kernel.
pub fn launch(
    op: &'static str,
    workspace: *mut c_void,
    workspace_size: u64,
    executor: *mut c_void,
    stream: *mut c_void,
) -> i32 {
    if let Err(code) = require_device(op) {
        return code;
    }
    let (id, stream) = (executor as u64, stream as u64);
    let prepared = with_state(|s| {
        let exec = s.executors.get(&id).ok_or_else(|| {
            format!("executor {id:#x} is unknown: executors are single use (phase 2 frees them) unless repeatable")
        })?;
        let (exec_op, needed, repeatable) = (exec.op, exec.workspace, exec.repeatable);
        let (reads, writes, kernel) = (exec.reads.clone(), exec.writes.clone(), std::sync::Arc::clone(&exec.kernel));
        if exec_op != op {
            return Err(format!("executor {id:#x} was made by {exec_op}GetWorkspaceSize"));
        }
        if !s.streams.contains_key(&stream) {
            return Err(format!("unknown stream {stream:#x}"));
        }
        if needed > 0 {
            let ws = workspace as usize;
            if workspace_size < needed || find(s, ws, needed as usize).is_none_or(|(_, a)| a.pinned) {
                return Err(format!(
                    "workspace {ws:#x} ({workspace_size} bytes) is not a device range of the {needed} bytes phase 1 \
                     asked for"
                ));
            }
        }
        if let Some(t) =
            reads.iter().chain(&writes).find(|t| t.storage_bytes > 0 && find(s, t.data, t.storage_bytes).is_none())
        {
            return Err(format!("tensor memory {:#x} was freed before the launch", t.data));
        }
        if !repeatable {
            s.executors.remove(&id);
        }
        reads.iter().map(extent).for_each(|(p, n)| mark(s, p, n, stream, false));
        writes.iter().map(extent).for_each(|(p, n)| mark(s, p, n, stream, true));
        if workspace_size > 0 && !workspace.is_null() {
            mark(s, workspace as usize, workspace_size as usize, stream, true);
        }
        Ok(kernel)
    });
    let kernel = match prepared {
        Ok(k) => k,
        Err(e) => return fail(ACLNN_ERR_PARAM_INVALID, format!("{op}: {e}")),
    };
    let job: Job = Box::new(move || kernel());
    match enqueue(stream, job) {
        Ok(()) => ACL_SUCCESS,
        Err(e) => fail(ACLNN_ERR_RUNTIME_ERROR, format!("{op}: {e}")),
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn aclSetAclOpExecutorRepeatable(executor: *mut c_void) -> i32 {
    with_state(|s| match s.executors.get_mut(&(executor as u64)) {
        Some(e) => {
            e.repeatable = true;
            ACL_SUCCESS
        }
        None => fail(ACLNN_ERR_PARAM_INVALID, "aclSetAclOpExecutorRepeatable: unknown executor"),
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn aclDestroyAclOpExecutor(executor: *mut c_void) -> i32 {
    with_state(|s| match s.executors.remove(&(executor as u64)) {
        Some(_) => ACL_SUCCESS,
        None => fail(ACLNN_ERR_PARAM_INVALID, "aclDestroyAclOpExecutor: unknown executor (used or destroyed already)"),
    })
}
