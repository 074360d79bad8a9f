//! Process and device calls: aclInit / aclFinalize, the recent-error message, version and SoC name, device
//! count, and the per-thread device binding.

use std::ffi::c_char;

use crate::codes::*;
use crate::state::{
    bind, bound_device, device_count, fail, require_init, status, take_recent_error, unbind, with_state,
};

/// Reads the fault settings of the environment (at aclInit).
fn faults_from_env() -> crate::state::Faults {
    crate::state::Faults {
        alloc_limit: std::env::var("ASCEND_SIM_FAIL_ALLOC_AFTER").ok().and_then(|v| v.parse().ok()),
        failing_ops: std::env::var("ASCEND_SIM_FAIL_OP")
            .map(|v| v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect())
            .unwrap_or_default(),
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn aclInit(_config_path: *const c_char) -> i32 {
    let repeat = with_state(|s| {
        if s.initialized {
            return true;
        }
        s.initialized = true;
        s.faults = faults_from_env();
        false
    });
    if repeat { fail(ACL_ERROR_REPEAT_INITIALIZE, "aclInit: already initialised in this process") } else { ACL_SUCCESS }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn aclFinalize() -> i32 {
    let was = with_state(|s| std::mem::replace(&mut s.initialized, false));
    if was { ACL_SUCCESS } else { fail(ACL_ERROR_REPEAT_FINALIZE, "aclFinalize: not initialised") }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn aclGetRecentErrMsg() -> *const c_char {
    take_recent_error()
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn aclrtGetVersion(major: *mut i32, minor: *mut i32, patch: *mut i32) -> i32 {
    if major.is_null() || minor.is_null() || patch.is_null() {
        return fail(ACL_ERROR_INVALID_PARAM, "aclrtGetVersion: null out-pointer");
    }
    // SAFETY: non-null out-pointers per the check and the contract.
    unsafe {
        *major = 0;
        *minor = 1;
        *patch = 0;
    }
    ACL_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn aclrtGetSocName() -> *const c_char {
    c"AscendSim".as_ptr()
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn aclrtGetDeviceCount(count: *mut u32) -> i32 {
    status((|| {
        require_init("aclrtGetDeviceCount")?;
        if count.is_null() {
            return Err(fail(ACL_ERROR_INVALID_PARAM, "aclrtGetDeviceCount: null out-pointer"));
        }
        // SAFETY: non-null out-pointer.
        unsafe { *count = device_count() };
        Ok(())
    })())
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn aclrtSetDevice(device: i32) -> i32 {
    status((|| {
        require_init("aclrtSetDevice")?;
        if device < 0 || device as u32 >= device_count() {
            return Err(fail(ACL_ERROR_INVALID_DEVICE, format!("aclrtSetDevice: no device {device}")));
        }
        bind(device);
        Ok(())
    })())
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn aclrtResetDevice(device: i32) -> i32 {
    status((|| {
        require_init("aclrtResetDevice")?;
        if bound_device() != Some(device) {
            return Err(fail(ACL_ERROR_INVALID_DEVICE, format!("aclrtResetDevice: device {device} is not bound")));
        }
        unbind();
        Ok(())
    })())
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn aclrtGetDevice(device: *mut i32) -> i32 {
    status((|| {
        require_init("aclrtGetDevice")?;
        let bound = bound_device().ok_or_else(|| fail(ACL_ERROR_INVALID_DEVICE, "aclrtGetDevice: no device bound"))?;
        if device.is_null() {
            return Err(fail(ACL_ERROR_INVALID_PARAM, "aclrtGetDevice: null out-pointer"));
        }
        // SAFETY: non-null out-pointer.
        unsafe { *device = bound };
        Ok(())
    })())
}
