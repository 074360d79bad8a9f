//! Process state of the simulator: initialisation, the per-thread device binding, the per-thread recent-error
//! message, fault settings, and the registries of every live handle (one lock, taken briefly).

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::ffi::{CString, c_char};
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::codes::*;
use crate::memory::Allocation;
use crate::nnopbase::{Executor, TensorDesc};
use crate::stream::{EventState, StreamHandle};

/// Number of simulated devices (`ASCEND_SIM_DEVICE_COUNT`, default 1).
pub fn device_count() -> u32 {
    std::env::var("ASCEND_SIM_DEVICE_COUNT").ok().and_then(|v| v.parse().ok()).unwrap_or(1)
}

/// Simulated device memory capacity in bytes (`ASCEND_SIM_MEMORY_BYTES`, default 8 GiB).
pub fn memory_capacity() -> usize {
    std::env::var("ASCEND_SIM_MEMORY_BYTES").ok().and_then(|v| v.parse().ok()).unwrap_or(8 << 30)
}

#[derive(Default)]
pub struct Faults {
    /// aclrtMalloc fails once live device bytes would exceed this.
    pub alloc_limit: Option<usize>,
    /// Operators (e.g. "aclnnRmsNorm") whose phase 1 fails.
    pub failing_ops: Vec<String>,
}

#[derive(Default)]
pub struct State {
    pub initialized: bool,
    next_id: u64,
    pub allocations: BTreeMap<usize, Allocation>,
    pub live_device_bytes: usize,
    pub streams: HashMap<u64, StreamHandle>,
    pub events: HashMap<u64, EventState>,
    pub tensors: HashMap<u64, TensorDesc>,
    /// Tensor id -> id of the list that owns it.
    pub owned_by_list: HashMap<u64, u64>,
    pub lists: HashMap<u64, Vec<u64>>,
    pub int_arrays: HashMap<u64, Vec<i64>>,
    pub scalars: HashMap<u64, (i32, [u8; 8])>,
    pub executors: HashMap<u64, Executor>,
    pub faults: Faults,
    /// Successful host-to-device and device-to-host copies (aclrtMemcpy and aclrtMemcpyAsync), for tests that
    /// count the copies of a step.
    pub copies: CopyCounts,
}

/// Copies counted by direction.
#[derive(Debug, Default, Clone, Copy)]
pub struct CopyCounts {
    pub host_to_device: u64,
    pub device_to_host: u64,
}

impl CopyCounts {
    /// Counts one copy from `src_on_device` to `dst_on_device`.
    pub fn count(&mut self, src_on_device: bool, dst_on_device: bool) {
        match (src_on_device, dst_on_device) {
            (false, true) => self.host_to_device += 1,
            (true, false) => self.device_to_host += 1,
            _ => {}
        }
    }
}

impl State {
    /// A fresh handle value: never reused, so a stale handle is always detected. Values look like aligned
    /// pointers (multiples of 16) far from real memory.
    pub fn new_handle(&mut self) -> u64 {
        self.next_id += 1;
        0x5151_0000_0000 + self.next_id * 16
    }

    pub fn live_handles(&self) -> usize {
        self.tensors.len() + self.lists.len() + self.int_arrays.len() + self.scalars.len() + self.executors.len()
    }
}

static STATE: Mutex<Option<State>> = Mutex::new(None);

/// Runs `f` with the state locked (created on first use). The lock is never held while waiting on a stream.
pub fn with_state<R>(f: impl FnOnce(&mut State) -> R) -> R {
    let mut guard: MutexGuard<'_, Option<State>> = STATE.lock().unwrap_or_else(PoisonError::into_inner);
    f(guard.get_or_insert_with(State::default))
}

thread_local! {
    static BOUND_DEVICE: Cell<Option<i32>> = const { Cell::new(None) };
    static PENDING_ERROR: RefCell<Option<CString>> = const { RefCell::new(None) };
    static RETURNED_ERROR: RefCell<Option<CString>> = const { RefCell::new(None) };
}

/// Records `message` as this thread's recent error and returns `code`.
pub fn fail(code: i32, message: impl Into<String>) -> i32 {
    let text = format!("ascend-sim: {}", message.into()).replace('\0', " ");
    let c = CString::new(text).unwrap_or_default();
    PENDING_ERROR.with(|e| *e.borrow_mut() = Some(c));
    code
}

/// aclGetRecentErrMsg: returns and clears the message; the pointer stays valid until the next call.
pub fn take_recent_error() -> *const c_char {
    let pending = PENDING_ERROR.with(|e| e.borrow_mut().take());
    RETURNED_ERROR.with(|r| {
        let mut r = r.borrow_mut();
        *r = pending;
        r.as_ref().map_or(std::ptr::null(), |c| c.as_ptr())
    })
}

pub fn bind(device: i32) {
    BOUND_DEVICE.with(|b| b.set(Some(device)));
}

pub fn unbind() {
    BOUND_DEVICE.with(|b| b.set(None));
}

pub fn bound_device() -> Option<i32> {
    BOUND_DEVICE.with(Cell::get)
}

/// `Err(code)` unless aclInit was called.
pub fn require_init(call: &str) -> Result<(), i32> {
    if with_state(|s| s.initialized) {
        Ok(())
    } else {
        Err(fail(ACL_ERROR_UNINITIALIZE, format!("{call}: aclInit has not been called")))
    }
}

/// `Err(code)` unless aclInit was called and this thread bound a device with aclrtSetDevice.
pub fn require_device(call: &str) -> Result<(), i32> {
    require_init(call)?;
    if bound_device().is_some() {
        Ok(())
    } else {
        Err(fail(
            ACL_ERROR_INVALID_DEVICE,
            format!("{call}: no device is bound on this thread (call aclrtSetDevice on every thread that uses one)"),
        ))
    }
}

/// Turns a `Result<(), code>` into the status to return.
pub fn status(r: Result<(), i32>) -> i32 {
    match r {
        Ok(()) => ACL_SUCCESS,
        Err(code) => code,
    }
}

/// Copies `n` elements from a C pointer (null with n > 0 is an error reported by the caller).
pub fn read_array<T: Copy>(ptr: *const T, n: u64) -> Option<Vec<T>> {
    if n == 0 {
        return Some(Vec::new());
    }
    if ptr.is_null() || n > (1 << 32) {
        return None;
    }
    // SAFETY: the caller passes a pointer to at least `n` elements per the C contract of the entry point.
    Some(unsafe { std::slice::from_raw_parts(ptr, n as usize) }.to_vec())
}
