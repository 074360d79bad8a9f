//! Shared by the integration tests: locating ascend-sim (never silently skipped: a test that cannot find it
//! fails and prints what was searched), loading it once, and the simulator's test hooks.

#![allow(dead_code)]

use std::sync::OnceLock;

#[allow(unused_imports)]
pub use candle_ascend::testing::{api, device, hooks, sim_path};

/// The generated loader opened directly on the simulator, for tests that call the C API by hand.
pub fn raw() -> &'static candle_ascend::sys::Cann {
    static RAW: OnceLock<candle_ascend::sys::Cann> = OnceLock::new();
    // SAFETY: loads the simulator library built by this workspace; its initialisers only set up Rust statics.
    RAW.get_or_init(|| unsafe { candle_ascend::sys::Cann::new(sim_path()) }.expect("open ascend-sim"))
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
