//! Test hooks exported next to the CANN symbols (prefix `ascend_sim_`): fault injection at run time and counters
//! that let tests check for leaks. Not part of CANN; candle-ascend never calls them.

use std::ffi::{CStr, c_char};

use crate::state::with_state;

/// aclrtMalloc fails with ACL_ERROR_BAD_ALLOC once more than `bytes` device bytes would be live;
/// `u64::MAX` removes the limit.
#[unsafe(no_mangle)]
pub extern "C" fn ascend_sim_set_alloc_limit(bytes: u64) {
    with_state(|s| s.faults.alloc_limit = (bytes != u64::MAX).then_some(bytes as usize));
}

/// Phase 1 of operator `name` (e.g. "aclnnRmsNorm") fails with ACLNN_ERR_INNER; null clears all.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ascend_sim_set_failing_op(name: *const c_char) {
    let name = if name.is_null() {
        None
    } else {
        // SAFETY: non-null, NUL-terminated per the hook's contract.
        Some(unsafe { CStr::from_ptr(name) }.to_string_lossy().into_owned())
    };
    with_state(|s| s.faults.failing_ops = name.into_iter().collect());
}

/// Device bytes currently allocated (aclrtMalloc minus aclrtFree).
#[unsafe(no_mangle)]
pub extern "C" fn ascend_sim_live_device_bytes() -> u64 {
    with_state(|s| s.live_device_bytes as u64)
}

/// Live nnopbase handles: tensors, tensor lists, int arrays, scalars and executors.
#[unsafe(no_mangle)]
pub extern "C" fn ascend_sim_live_handles() -> u64 {
    with_state(|s| s.live_handles() as u64)
}

/// Host-to-device and device-to-host copies made so far (aclrtMemcpy and aclrtMemcpyAsync), written through the
/// two out-pointers (either may be null).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ascend_sim_copy_counts(host_to_device: *mut u64, device_to_host: *mut u64) {
    let c = with_state(|s| s.copies);
    if !host_to_device.is_null() {
        // SAFETY: non-null, points to a writable u64 per the hook's contract.
        unsafe { *host_to_device = c.host_to_device };
    }
    if !device_to_host.is_null() {
        // SAFETY: as above.
        unsafe { *device_to_host = c.device_to_host };
    }
}
