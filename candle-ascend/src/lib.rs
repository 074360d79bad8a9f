//! candle-ascend: the Ascend NPU backend of this workspace.
//!
//! Layers, bottom up (see DESIGN.md section 3):
//! - [`sys`]: the generated loader for our own CANN header (`include/cann_subset.h`), resolved at run time;
//! - [`loader`]: where CANN is searched for, [`Cann`] (the loaded libraries), status checking;
//! - [`runtime`]: [`AscendDevice`] (init, per-thread binding, stream), the stream-ordered memory pool, [`NpuTensor`];
//! - [`aclnn`]: RAII nnopbase handles, the two-phase call helper, one safe function per operator;
//! - [`testing`]: which CANN tests load (ascend-sim by default) and the device they open.
//!
//! Nothing here needs CANN at build time. Where CANN is absent every entry point returns
//! [`Error::LibraryNotFound`] naming what was searched. ascend-sim (`candle-ascend/sim`) stands in for CANN only
//! when selected with `CANDLE_ASCEND_SIM` or [`Cann::load_sim`].

pub mod aclnn;
pub mod error;
pub mod loader;
pub mod runtime;
pub mod sys;
pub mod testing;

pub use error::{Error, Result};
pub use loader::{Cann, ENV_LIB_DIR, ENV_SIM, LibrarySource};
pub use runtime::device::{AscendDevice, Stream};
pub use runtime::host::{Event, HostStaging, PinnedBuffer};
pub use runtime::pool::{DeviceBuffer, PoolStats};
pub use runtime::tensor::{DType, NpuElement, NpuTensor};

static DROP_ERRORS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static LAST_DROP_ERROR: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// Records an error met while dropping a handle (`Drop` cannot return it and never panics).
pub(crate) fn record_drop_error(result: Result<()>) {
    if let Err(e) = result {
        DROP_ERRORS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        *LAST_DROP_ERROR.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(e.to_string());
    }
}

/// Errors met while dropping handles (streams, buffers, aclTensor...) since the process started, and the last one.
/// Drops never panic; this is how their failures stay visible (tests assert it stays at zero).
pub fn drop_errors() -> (u64, Option<String>) {
    let last = LAST_DROP_ERROR.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    (DROP_ERRORS.load(std::sync::atomic::Ordering::Relaxed), last)
}

/// Whether an NPU can be used: the libraries load (CANN found by the search, or the simulator selected by
/// `CANDLE_ASCEND_SIM`) and report at least one device. Never panics.
pub fn is_available() -> bool {
    Cann::global().and_then(|api| api.device_count()).is_ok_and(|n| n > 0)
}
