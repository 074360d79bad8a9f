//! Shared by the integration tests: locating ascend-sim (never silently skipped: a test that cannot find it
//! fails and prints what was searched), loading it once, and the simulator's test hooks.

#![allow(dead_code)]

use std::sync::OnceLock;


pub use candle_ascend::testing::{api, device, sim_path};

/// The generated loader opened directly on the simulator, for tests that call the C API by hand.
pub fn raw() -> &'static candle_ascend::sys::Cann {
    static RAW: OnceLock<candle_ascend::sys::Cann> = OnceLock::new();
    // SAFETY: loads the simulator library built by this workspace; its initialisers only set up Rust statics.
    RAW.get_or_init(|| unsafe { candle_ascend::sys::Cann::new(sim_path()) }.expect("open ascend-sim"))
}

/// The simulator's test hooks (not part of CANN).
pub struct Hooks {
    _lib: libloading::Library,
    pub set_alloc_limit: unsafe extern "C" fn(u64),
    pub set_failing_op: unsafe extern "C" fn(*const std::ffi::c_char),
    pub live_device_bytes: unsafe extern "C" fn() -> u64,
    pub live_handles: unsafe extern "C" fn() -> u64,
}

pub fn hooks() -> &'static Hooks {
    static HOOKS: OnceLock<Hooks> = OnceLock::new();
    HOOKS.get_or_init(|| {
        // SAFETY: the simulator library (see `raw`); the symbols have the signatures declared in sim/src/hooks.rs.
        unsafe {
            let lib = libloading::Library::new(sim_path()).expect("open ascend-sim");
            let set_alloc_limit = *lib.get(b"ascend_sim_set_alloc_limit\0").expect("hook");
            let set_failing_op = *lib.get(b"ascend_sim_set_failing_op\0").expect("hook");
            let live_device_bytes = *lib.get(b"ascend_sim_live_device_bytes\0").expect("hook");
            let live_handles = *lib.get(b"ascend_sim_live_handles\0").expect("hook");
            Hooks { _lib: lib, set_alloc_limit, set_failing_op, live_device_bytes, live_handles }
        }
    })
}

/// The recent error message of this thread, through the raw loader.
pub fn recent_error() -> String {
    let f = raw().aclGetRecentErrMsg.as_ref().expect("aclGetRecentErrMsg");
    // SAFETY: no arguments; returns null or a NUL-terminated string valid until the next call.
    let p = unsafe { f() };
    if p.is_null() {
        String::new()
    } else {
        // SAFETY: non-null and NUL-terminated, copied at once.
        unsafe { std::ffi::CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

/// Asserts that two float slices agree within `tol` (absolute plus relative to the magnitude).
pub fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * (1.0 + w.abs()), "{what}[{i}]: got {g}, want {w}");
    }
}
