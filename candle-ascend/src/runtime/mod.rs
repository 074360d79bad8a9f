//! The safe runtime over the loader: process initialisation (`aclInit` once, tolerating the repeat code),
//! per-thread device binding, the device and its stream ([`device`]), the stream-ordered memory pool ([`pool`]),
//! pinned host memory, events and the staged upload path ([`host`]), and
//! NPU tensors with their conversions from and to candle ([`tensor`]).

pub mod device;
pub mod host;
pub mod pool;
pub mod tensor;

use std::cell::Cell;
use std::sync::{Mutex, PoisonError};

use crate::error::Result;
use crate::loader::{Cann, sym};
use crate::sys;

/// Calls `aclInit(NULL)` once per process and loaded library set. A repeat returns `ACL_ERROR_REPEAT_INITIALIZE`
/// (100002) on 8.x, which means "already initialised" and is accepted (cann-facts trap 7).
pub(crate) fn init(api: &Cann) -> Result<()> {
    // Keyed by the address of the loaded `Cann`, so a second library set (tests) initialises too.
    static DONE: Mutex<Vec<usize>> = Mutex::new(Vec::new());
    let key = api as *const Cann as usize;
    let mut done = DONE.lock().unwrap_or_else(PoisonError::into_inner);
    if done.contains(&key) {
        return Ok(());
    }
    let f = sym!(api.runtime, aclInit)?;
    // SAFETY: a null config path is documented as "no configuration file".
    let code = unsafe { f(std::ptr::null()) };
    if code != sys::ACL_ERROR_REPEAT_INITIALIZE {
        api.check("aclInit", code)?;
    } else {
        // Consume the message of the tolerated repeat so it is not reported with a later failure.
        let _ = api.recent_error_message();
    }
    done.push(key);
    Ok(())
}

thread_local! {
    /// The device bound to this OS thread (aclrtSetDevice is per thread, cann-facts trap 6).
    static BOUND_DEVICE: Cell<Option<(usize, i32)>> = const { Cell::new(None) };
}

/// Binds `device` to the calling thread unless it already is (for this loaded library set).
pub(crate) fn bind_device(api: &Cann, device: i32) -> Result<()> {
    let key = (api as *const Cann as usize, device);
    if BOUND_DEVICE.with(Cell::get) == Some(key) {
        return Ok(());
    }
    let f = sym!(api.runtime, aclrtSetDevice)?;
    // SAFETY: plain integer argument.
    let code = unsafe { f(device) };
    api.check("aclrtSetDevice", code)?;
    BOUND_DEVICE.with(|b| b.set(Some(key)));
    Ok(())
}
