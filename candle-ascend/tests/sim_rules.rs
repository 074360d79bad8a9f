//! Each strict rule of ascend-sim, broken on purpose through the raw C API, must give the documented status code
//! and a recent-error message. These are what make a contract bug in the backend fail a test (mutation basis).

mod common;

use std::ffi::c_void;
use std::ptr::null_mut;

use candle_ascend::sys;

fn f<T>(r: &Result<T, libloading::Error>) -> &T {
    r.as_ref().expect("symbol present in ascend-sim")
}

/// aclInit (repeat tolerated) and the device bound on this thread; returns a fresh stream.
fn setup() -> sys::aclrtStream {
    let api = common::raw();
    // SAFETY: plain calls with valid arguments; the out-pointer lives for the call.
    unsafe {
        let code = f(&api.aclInit)(std::ptr::null());
        assert!(code == 0 || code == sys::ACL_ERROR_REPEAT_INITIALIZE, "aclInit {code}");
        common::recent_error();
        assert_eq!(f(&api.aclrtSetDevice)(0), 0);
        let mut stream: sys::aclrtStream = null_mut();
        assert_eq!(f(&api.aclrtCreateStream)(&mut stream), 0);
        stream
    }
}

fn malloc(bytes: usize) -> *mut c_void {
    let mut p = null_mut();
    // SAFETY: valid out-pointer; the device is bound by setup().
    let code = unsafe { f(&common::raw().aclrtMalloc)(&mut p, bytes, 0) };
    assert_eq!(code, 0, "aclrtMalloc: {}", common::recent_error());
    p
}

/// A contiguous f32 tensor of `n` elements at `data`, offset `offset` elements, storage `storage` elements.
fn tensor(data: *mut c_void, n: i64, offset: i64, storage: i64, dtype: sys::aclDataType) -> *mut sys::aclTensor {
    let (dims, strides, st) = ([n], [1i64], [storage]);
    // SAFETY: the arrays live for the call; nnopbase copies them.
    unsafe {
        f(&common::raw().aclCreateTensor)(
            dims.as_ptr(),
            1,
            dtype,
            strides.as_ptr(),
            offset,
            sys::aclFormat_ACL_FORMAT_ND,
            st.as_ptr(),
            1,
            data,
        )
    }
}

/// Queues a Cast f32 -> f32 of 8 elements from `src` to `dst` on `stream`.
fn launch_cast(src: *mut c_void, dst: *mut c_void, stream: sys::aclrtStream) {
    let api = common::raw();
    let (x, y) = (tensor(src, 8, 0, 8, sys::aclDataType_ACL_FLOAT), tensor(dst, 8, 0, 8, sys::aclDataType_ACL_FLOAT));
    let (mut ws, mut ex) = (0u64, null_mut());
    // SAFETY: live handles from aclCreateTensor; valid out-pointers.
    unsafe {
        assert_eq!(f(&api.aclnnCastGetWorkspaceSize)(x, sys::aclDataType_ACL_FLOAT, y, &mut ws, &mut ex), 0);
        assert_eq!(f(&api.aclnnCast)(null_mut(), 0, ex, stream), 0);
        f(&api.aclDestroyTensor)(x);
        f(&api.aclDestroyTensor)(y);
    }
}

#[test]
fn unaligned_tensor_data_is_rejected() {
    setup();
    let base = malloc(256);
    let unaligned = (base as usize + 4) as *mut c_void;
    let t = tensor(unaligned, 8, 0, 8, sys::aclDataType_ACL_FLOAT);
    assert!(t.is_null(), "aclCreateTensor must return null for unaligned data");
    let msg = common::recent_error();
    assert!(msg.contains("32-byte aligned"), "{msg}");
    // The same view expressed through the offset (elements) is accepted.
    let ok = tensor(base, 8, 1, 64, sys::aclDataType_ACL_FLOAT);
    assert!(!ok.is_null(), "{}", common::recent_error());
    // SAFETY: live handle, destroyed once.
    assert_eq!(unsafe { f(&common::raw().aclDestroyTensor)(ok) }, 0);
}

#[test]
fn tensor_view_outside_its_allocation_is_rejected() {
    setup();
    let base = malloc(64);
    assert!(tensor(base, 32, 0, 32, sys::aclDataType_ACL_FLOAT).is_null(), "128 bytes of storage in 64");
    assert!(common::recent_error().contains("not inside one device allocation"));
    assert!(tensor(base, 8, 4, 8, sys::aclDataType_ACL_FLOAT).is_null(), "view past its storage");
    assert!(common::recent_error().contains("beyond the storage"));
    let mut host = vec![0u64; 16];
    assert!(tensor(host.as_mut_ptr().cast(), 8, 0, 8, sys::aclDataType_ACL_FLOAT).is_null(), "host memory");
}

#[test]
fn device_call_from_an_unbound_thread_fails() {
    setup();
    let code = std::thread::spawn(|| {
        let mut p = null_mut();
        // SAFETY: valid out-pointer; this thread deliberately never called aclrtSetDevice.
        let code = unsafe { f(&common::raw().aclrtMalloc)(&mut p, 64, 0) };
        (code, common::recent_error())
    })
    .join()
    .expect("join");
    assert_eq!(code.0, sys::ACL_ERROR_INVALID_DEVICE);
    assert!(code.1.contains("aclrtSetDevice"), "{}", code.1);
}

#[test]
fn executor_is_single_use() {
    let stream = setup();
    let api = common::raw();
    let (a, b) = (malloc(32), malloc(32));
    let (x, y) = (tensor(a, 8, 0, 8, sys::aclDataType_ACL_FLOAT), tensor(b, 8, 0, 8, sys::aclDataType_ACL_FLOAT));
    let (mut ws, mut ex) = (0u64, null_mut());
    // SAFETY: live handles and valid out-pointers; the second launch reuses a consumed executor on purpose.
    unsafe {
        assert_eq!(f(&api.aclnnCastGetWorkspaceSize)(x, sys::aclDataType_ACL_FLOAT, y, &mut ws, &mut ex), 0);
        assert_eq!(f(&api.aclnnCast)(null_mut(), 0, ex, stream), 0);
        assert_eq!(f(&api.aclnnCast)(null_mut(), 0, ex, stream), sys::ACLNN_ERR_PARAM_INVALID);
        assert!(common::recent_error().contains("single use"));
        f(&api.aclDestroyTensor)(x);
        f(&api.aclDestroyTensor)(y);
        assert_eq!(f(&api.aclrtSynchronizeStream)(stream), 0);
    }
}

#[test]
fn tensor_owned_by_a_list_cannot_be_destroyed() {
    setup();
    let api = common::raw();
    let t = tensor(malloc(32), 8, 0, 8, sys::aclDataType_ACL_FLOAT);
    let members = [t.cast_const()];
    // SAFETY: live handles; the destroys below break the ownership rule on purpose.
    unsafe {
        let list = f(&api.aclCreateTensorList)(members.as_ptr(), 1);
        assert!(!list.is_null());
        assert_eq!(f(&api.aclDestroyTensor)(t), sys::ACLNN_ERR_PARAM_INVALID);
        assert!(common::recent_error().contains("owned by tensor list"));
        assert_eq!(f(&api.aclDestroyTensorList)(list), 0);
        assert_eq!(f(&api.aclDestroyTensorList)(list), sys::ACLNN_ERR_PARAM_INVALID, "double destroy");
        assert_eq!(f(&api.aclDestroyTensor)(t), sys::ACLNN_ERR_PARAM_INVALID, "the list destroyed its member");
    }
}

#[test]
fn host_read_before_stream_sync_fails() {
    let stream = setup();
    let api = common::raw();
    let (src, dst) = (malloc(32), malloc(32));
    let input: Vec<f32> = (0..8).map(|v| v as f32).collect();
    let mut out = vec![0f32; 8];
    // SAFETY: buffers of 32 bytes on both sides; the first D2H read deliberately skips the synchronisation.
    unsafe {
        assert_eq!(f(&api.aclrtMemcpyAsync)(src, 32, input.as_ptr().cast(), 32, 1, stream), 0);
        launch_cast(src, dst, stream);
        let code = f(&api.aclrtMemcpy)(out.as_mut_ptr().cast(), 32, dst, 32, 2);
        assert_eq!(code, sys::ACL_ERROR_INVALID_PARAM);
        assert!(common::recent_error().contains("not been synchronised"));
        assert_eq!(f(&api.aclrtSynchronizeStream)(stream), 0);
        assert_eq!(f(&api.aclrtMemcpy)(out.as_mut_ptr().cast(), 32, dst, 32, 2), 0);
    }
    assert_eq!(out, input);
}

#[test]
fn free_of_memory_used_by_queued_work_fails() {
    let stream = setup();
    let api = common::raw();
    let (src, dst) = (malloc(32), malloc(32));
    launch_cast(src, dst, stream);
    // SAFETY: live allocations; the first free deliberately races the queued kernel.
    unsafe {
        assert_eq!(f(&api.aclrtFree)(src), sys::ACL_ERROR_INVALID_PARAM);
        assert!(common::recent_error().contains("synchronise it first"));
        assert_eq!(f(&api.aclrtSynchronizeStream)(stream), 0);
        assert_eq!(f(&api.aclrtFree)(src), 0);
        assert_eq!(f(&api.aclrtFree)(dst), 0);
        assert_eq!(f(&api.aclrtFree)(dst), sys::ACL_ERROR_INVALID_PARAM, "double free");
    }
}

#[test]
fn memcpy_kind_must_match_the_pointers() {
    setup();
    let dev = malloc(32);
    let host = [0u8; 32];
    // SAFETY: valid ranges; the kind is wrong on purpose (device to host for a host source).
    let code = unsafe { f(&common::raw().aclrtMemcpy)(dev, 32, host.as_ptr().cast(), 32, 2) };
    assert_eq!(code, sys::ACL_ERROR_INVALID_PARAM);
    assert!(common::recent_error().contains("does not match"));
}

#[test]
fn repeat_init_returns_the_documented_code_and_is_tolerated() {
    setup();
    // SAFETY: null config path.
    let code = unsafe { f(&common::raw().aclInit)(std::ptr::null()) };
    assert_eq!(code, sys::ACL_ERROR_REPEAT_INITIALIZE);
    assert!(common::recent_error().contains("already initialised"));
    // The safe runtime initialises again on its own and tolerates the repeat.
    common::device().mem_info().expect("device usable after a repeated aclInit");
}

#[test]
fn operators_reject_shapes_and_dtypes_outside_their_support() {
    setup();
    let api = common::raw();
    let buf = malloc(1024);
    let mk = |dims: &[i64], dtype| tensor_nd(buf, dims, dtype);
    let x = mk(&[2, 8], sys::aclDataType_ACL_FLOAT);
    let g = mk(&[8], sys::aclDataType_ACL_FLOAT);
    let y = mk(&[2, 8], sys::aclDataType_ACL_FLOAT);
    let bad_rstd = mk(&[2], sys::aclDataType_ACL_FLOAT);
    let xi = mk(&[2, 8], sys::aclDataType_ACL_INT32);
    let rstd = mk(&[2, 1], sys::aclDataType_ACL_FLOAT);
    let (mut ws, mut ex) = (0u64, null_mut());
    // SAFETY: live handles and out-pointers; the arguments break the operator's contract on purpose.
    unsafe {
        let code = f(&api.aclnnRmsNormGetWorkspaceSize)(x, g, 1e-6, y, bad_rstd, &mut ws, &mut ex);
        assert_eq!(code, sys::ACLNN_ERR_PARAM_INVALID);
        assert!(common::recent_error().contains("rstd must be f32 [2, 1]"));
        let code = f(&api.aclnnRmsNormGetWorkspaceSize)(xi, g, 1e-6, y, rstd, &mut ws, &mut ex);
        assert_eq!(code, sys::ACLNN_ERR_PARAM_INVALID);
        for t in [x, g, y, bad_rstd, xi, rstd] {
            f(&api.aclDestroyTensor)(t);
        }
    }
}

#[test]
fn events_order_work_across_streams() {
    let first = setup();
    let second = setup();
    let api = common::raw();
    let (src, mid, dst) = (malloc(32), malloc(32), malloc(32));
    let input: Vec<f32> = (10..18).map(|v| v as f32).collect();
    let mut out = vec![0f32; 8];
    let mut event = null_mut();
    // SAFETY: live streams, event and 32-byte buffers; the second stream waits on the event before reading `mid`.
    unsafe {
        assert_eq!(f(&api.aclrtCreateEvent)(&mut event), 0);
        assert_eq!(f(&api.aclrtMemcpyAsync)(src, 32, input.as_ptr().cast(), 32, 1, first), 0);
        launch_cast(src, mid, first);
        assert_eq!(f(&api.aclrtRecordEvent)(event, first), 0);
        assert_eq!(f(&api.aclrtStreamWaitEvent)(second, event), 0);
        launch_cast(mid, dst, second);
        assert_eq!(f(&api.aclrtSynchronizeStream)(second), 0);
        assert_eq!(f(&api.aclrtSynchronizeEvent)(event), 0);
        assert_eq!(f(&api.aclrtMemcpy)(out.as_mut_ptr().cast(), 32, dst, 32, 2), 0);
        assert_eq!(f(&api.aclrtDestroyEvent)(event), 0);
        assert_eq!(f(&api.aclrtDestroyEvent)(event), sys::ACL_ERROR_INVALID_PARAM, "double destroy");
        assert_eq!(f(&api.aclrtSynchronizeStream)(first), 0);
    }
    assert_eq!(out, input);
}

/// A contiguous tensor of `dims` at the start of `data`.
fn tensor_nd(data: *mut c_void, dims: &[i64], dtype: sys::aclDataType) -> *mut sys::aclTensor {
    let mut strides = vec![1i64; dims.len()];
    for i in (0..dims.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * dims[i + 1];
    }
    let storage = [dims.iter().product::<i64>()];
    // SAFETY: the arrays live for the call; nnopbase copies them.
    unsafe {
        f(&common::raw().aclCreateTensor)(
            dims.as_ptr(),
            dims.len() as u64,
            dtype,
            strides.as_ptr(),
            0,
            sys::aclFormat_ACL_FORMAT_ND,
            storage.as_ptr(),
            1,
            data,
        )
    }
}

#[test]
fn fresh_device_memory_is_not_zeroed() {
    setup();
    let dev = malloc(64);
    let mut host = [0u8; 64];
    // SAFETY: 64-byte ranges on both sides; nothing is queued on this memory.
    let code = unsafe { f(&common::raw().aclrtMemcpy)(host.as_mut_ptr().cast(), 64, dev, 64, 2) };
    assert_eq!(code, 0, "{}", common::recent_error());
    assert!(host.iter().all(|&b| b == 0xFF), "fresh memory must hold the poison pattern, got {host:?}");
}

/// Sparse mode 3 needs the compressed 2048 x 2048 mask: none or another shape fails phase 1; a mask of the right
/// shape but the wrong content fails the kernel (reported by the stream synchronisation).
#[test]
fn causal_sparse_modes_need_the_compressed_mask() {
    let stream = setup();
    let api = common::raw();
    let n = 2048usize;
    let (qkv, mask_mem, small_mem) = ([malloc(256), malloc(256), malloc(256), malloc(256)], malloc(n * n), malloc(64));
    let [q, k, v, o] = qkv.map(|p| tensor_nd(p, &[1, 2, 1, 32], sys::aclDataType_ACL_FLOAT));
    // Lower triangle instead of upper: the right shape, the wrong content.
    let wrong: Vec<u8> = (0..n * n).map(|at| u8::from(at % n < at / n)).collect();
    let small = tensor_nd(small_mem, &[2, 2], sys::aclDataType_ACL_UINT8);
    let mask = tensor_nd(mask_mem, &[n as i64, n as i64], sys::aclDataType_ACL_UINT8);
    let layout = c"BSND";
    let mut ws = 0u64;
    let mut phase1 = |m: *mut sys::aclTensor, mode: i64, ex: &mut *mut sys::aclOpExecutor| {
        // SAFETY: live handles, a NUL-terminated layout the callee does not write, valid out-pointers.
        unsafe {
            f(&api.aclnnPromptFlashAttentionV3GetWorkspaceSize)(
                q,
                k,
                v,
                null_mut(),
                m,
                null_mut(),
                null_mut(),
                null_mut(),
                null_mut(),
                null_mut(),
                null_mut(),
                null_mut(),
                1,
                0.2,
                2147483647,
                2147483647,
                layout.as_ptr().cast_mut(),
                1,
                mode,
                2,
                o,
                &mut ws,
                ex,
            )
        }
    };
    let mut ex = null_mut();
    assert_eq!(phase1(null_mut(), 3, &mut ex), sys::ACLNN_ERR_PARAM_INVALID);
    assert!(common::recent_error().contains("compressed"));
    assert_eq!(phase1(small, 3, &mut ex), sys::ACLNN_ERR_PARAM_INVALID);
    assert!(common::recent_error().contains("2048x2048"));
    assert_eq!(phase1(mask, 5, &mut ex), sys::ACLNN_ERR_PARAM_INVALID);
    // SAFETY: buffers of the stated sizes; every launch is followed by a synchronisation before the next check.
    unsafe {
        assert_eq!(f(&api.aclrtMemcpy)(mask_mem, n * n, wrong.as_ptr().cast(), n * n, 1), 0);
        assert_eq!(phase1(mask, 3, &mut ex), 0, "{}", common::recent_error());
        let workspace = malloc(ws as usize);
        assert_eq!(f(&api.aclnnPromptFlashAttentionV3)(workspace, ws, ex, stream), 0, "{}", common::recent_error());
        assert_eq!(f(&api.aclrtSynchronizeStream)(stream), sys::ACLNN_ERR_RUNTIME_ERROR);
        assert!(common::recent_error().contains("1 exactly above the diagonal"));
        for t in [q, k, v, o, small, mask] {
            f(&api.aclDestroyTensor)(t);
        }
    }
}
