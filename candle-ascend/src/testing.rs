//! Test support shared by every crate that runs tests on the Ascend path (candle-ascend's own tests, the op
//! conformance suite in `ops`, the model parity tests): which CANN the tests load and the device they open.
//!
//! By default tests load ascend-sim: `CANDLE_ASCEND_SIM` if set, else `libascend_sim.so` next to the test binary
//! (`target/<profile>/deps`, where cargo puts the cdylib of an `ascend-sim` dev-dependency) or its parent. With
//! `CANDLE_ASCEND_TEST_CANN=1` they load the real CANN found by the default search instead (see the README of
//! candle-ascend). A test that cannot load what it was asked for fails and prints what was searched: it never
//! skips silently.

use std::path::PathBuf;
use std::sync::OnceLock;

use crate::{AscendDevice, Cann, ENV_SIM};

/// Set to `1` to run the tests on the real CANN of the default search instead of ascend-sim.
pub const ENV_TEST_CANN: &str = "CANDLE_ASCEND_TEST_CANN";

/// Where the simulator is looked for, in order.
pub fn sim_candidates() -> Vec<PathBuf> {
    let mut paths = Vec::new();
    if let Some(p) = std::env::var_os(ENV_SIM).filter(|p| !p.is_empty()) {
        paths.push(PathBuf::from(p));
    }
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(2) {
            paths.push(dir.join("libascend_sim.so"));
        }
    }
    paths
}

/// The first simulator candidate that exists; panics listing the candidates otherwise.
pub fn sim_path() -> PathBuf {
    let candidates = sim_candidates();
    match candidates.iter().find(|p| p.is_file()) {
        Some(p) => p.clone(),
        None => panic!(
            "ascend-sim not found; searched: {}. Build it with `cargo build --release -p ascend-sim` or set {ENV_SIM}.",
            candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        ),
    }
}

/// Whether the tests run on real CANN (`CANDLE_ASCEND_TEST_CANN=1`).
pub fn on_real_cann() -> bool {
    std::env::var(ENV_TEST_CANN).is_ok_and(|v| v == "1")
}

/// `ascend-sim` or `cann`: what the tests run on, for case ids and messages.
pub fn backend_label() -> &'static str {
    if on_real_cann() { "cann" } else { "ascend-sim" }
}

/// The libraries the tests use, loaded once per process.
pub fn api() -> &'static Cann {
    static API: OnceLock<&'static Cann> = OnceLock::new();
    API.get_or_init(|| {
        if on_real_cann() {
            Cann::global().unwrap_or_else(|e| panic!("{ENV_TEST_CANN}=1 but CANN does not load: {e}"))
        } else {
            static SIM: OnceLock<Cann> = OnceLock::new();
            SIM.get_or_init(|| Cann::load_sim(&sim_path()).unwrap_or_else(|e| panic!("loading ascend-sim: {e}")))
        }
    })
}

/// Device 0 of [`api`], bound to the calling thread.
pub fn device() -> AscendDevice {
    AscendDevice::with_api(api(), 0).unwrap_or_else(|e| panic!("opening npu:0 on {}: {e}", backend_label()))
}

/// ascend-sim's test hooks (exported next to the CANN symbols, not part of CANN): fault injection and counters.
pub struct Hooks {
    _lib: libloading::Library,
    /// aclrtMalloc fails once more than this many device bytes would be live (`u64::MAX`: no limit).
    pub set_alloc_limit: unsafe extern "C" fn(u64),
    /// Phase 1 of the named operator (e.g. `c"aclnnRmsNorm"`) fails; null clears.
    pub set_failing_op: unsafe extern "C" fn(*const std::ffi::c_char),
    pub live_device_bytes: unsafe extern "C" fn() -> u64,
    pub live_handles: unsafe extern "C" fn() -> u64,
    /// (host-to-device, device-to-host) copies so far, through two out-pointers.
    pub copy_counts: unsafe extern "C" fn(*mut u64, *mut u64),
}

impl Hooks {
    /// Copies made so far: (host-to-device, device-to-host).
    pub fn copies(&self) -> (u64, u64) {
        let (mut h2d, mut d2h) = (0u64, 0u64);
        // SAFETY: both out-pointers are valid u64s; the hook only writes them.
        unsafe { (self.copy_counts)(&mut h2d, &mut d2h) };
        (h2d, d2h)
    }
}

/// The hooks of the simulator the tests load (panics on real CANN: faults are injected only on the simulator).
pub fn hooks() -> &'static Hooks {
    static HOOKS: OnceLock<Hooks> = OnceLock::new();
    assert!(!on_real_cann(), "simulator hooks are not available on real CANN ({ENV_TEST_CANN}=1)");
    HOOKS.get_or_init(|| {
        // SAFETY: the simulator library built by this workspace; its initialisers only set up Rust statics, and the
        // symbols have the signatures declared in sim/src/hooks.rs.
        unsafe {
            let lib = libloading::Library::new(sim_path()).expect("open ascend-sim");
            let set_alloc_limit = *lib.get(b"ascend_sim_set_alloc_limit\0").expect("hook");
            let set_failing_op = *lib.get(b"ascend_sim_set_failing_op\0").expect("hook");
            let live_device_bytes = *lib.get(b"ascend_sim_live_device_bytes\0").expect("hook");
            let live_handles = *lib.get(b"ascend_sim_live_handles\0").expect("hook");
            let copy_counts = *lib.get(b"ascend_sim_copy_counts\0").expect("hook");
            Hooks { _lib: lib, set_alloc_limit, set_failing_op, live_device_bytes, live_handles, copy_counts }
        }
    })
}
