//! Streams and events. Each stream is a worker thread that runs queued jobs in order, asynchronously to the host;
//! synchronising waits for the queue to drain and clears the stream's unsynchronised marks on memory.

use std::sync::mpsc::{Sender, channel};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;

use crate::codes::*;
use crate::state::{fail, require_device, status, with_state};

pub type Job = Box<dyn FnOnce() -> Result<(), String> + Send>;

#[derive(Default)]
struct Progress {
    queued: u64,
    done: u64,
    /// First failure of a job since the last synchronisation.
    error: Option<String>,
}

#[derive(Default)]
pub struct Shared {
    progress: Mutex<Progress>,
    changed: Condvar,
}

pub struct StreamHandle {
    sender: Option<Sender<Job>>,
    shared: Arc<Shared>,
    worker: Option<JoinHandle<()>>,
}

impl StreamHandle {
    fn spawn() -> StreamHandle {
        let (sender, receiver) = channel::<Job>();
        let shared = Arc::new(Shared::default());
        let worker_shared = Arc::clone(&shared);
        let worker = std::thread::spawn(move || {
            while let Ok(job) = receiver.recv() {
                let result = job();
                let mut p = worker_shared.progress.lock().unwrap_or_else(PoisonError::into_inner);
                p.done += 1;
                if let Err(e) = result {
                    p.error.get_or_insert(e);
                }
                worker_shared.changed.notify_all();
            }
        });
        StreamHandle { sender: Some(sender), shared, worker: Some(worker) }
    }
}

/// Queues `job` on stream `id`. Err(message) if the stream does not exist.
pub fn enqueue(id: u64, job: Job) -> Result<(), String> {
    with_state(|s| {
        let handle = s.streams.get(&id).ok_or_else(|| format!("unknown stream {id:#x}"))?;
        let sender = handle.sender.as_ref().ok_or("stream is being destroyed")?;
        handle.shared.progress.lock().unwrap_or_else(PoisonError::into_inner).queued += 1;
        sender.send(job).map_err(|_| "stream worker is gone".to_string())
    })
}

/// Waits for every job queued so far on `shared`; returns the first job failure.
fn drain(shared: &Shared) -> Result<(), String> {
    let mut p = shared.progress.lock().unwrap_or_else(PoisonError::into_inner);
    while p.done < p.queued {
        p = shared.changed.wait(p).unwrap_or_else(PoisonError::into_inner);
    }
    p.error.take().map_or(Ok(()), Err)
}

/// Synchronises stream `id`: waits, then clears its marks on memory.
pub fn synchronize(id: u64) -> i32 {
    let Some(shared) = with_state(|s| s.streams.get(&id).map(|h| Arc::clone(&h.shared))) else {
        return fail(ACL_ERROR_INVALID_PARAM, format!("aclrtSynchronizeStream: unknown stream {id:#x}"));
    };
    let result = drain(&shared);
    with_state(|s| s.allocations.values_mut().for_each(|a| a.clear_stream(id)));
    match result {
        Ok(()) => ACL_SUCCESS,
        Err(e) => fail(ACLNN_ERR_RUNTIME_ERROR, format!("a task on stream {id:#x} failed: {e}")),
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn aclrtCreateStream(stream: *mut *mut std::ffi::c_void) -> i32 {
    status((|| {
        require_device("aclrtCreateStream")?;
        if stream.is_null() {
            return Err(fail(ACL_ERROR_INVALID_PARAM, "aclrtCreateStream: null out-pointer"));
        }
        let id = with_state(|s| {
            let id = s.new_handle();
            s.streams.insert(id, StreamHandle::spawn());
            id
        });
        // SAFETY: `stream` is a non-null out-pointer per the contract.
        unsafe { *stream = id as *mut std::ffi::c_void };
        Ok(())
    })())
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn aclrtSynchronizeStream(stream: *mut std::ffi::c_void) -> i32 {
    if let Err(code) = require_device("aclrtSynchronizeStream") {
        return code;
    }
    synchronize(stream as u64)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn aclrtDestroyStream(stream: *mut std::ffi::c_void) -> i32 {
    if let Err(code) = require_device("aclrtDestroyStream") {
        return code;
    }
    let id = stream as u64;
    let Some(mut handle) = with_state(|s| s.streams.remove(&id)) else {
        return fail(ACL_ERROR_INVALID_PARAM, format!("aclrtDestroyStream: unknown stream {id:#x}"));
    };
    let _ = drain(&handle.shared);
    handle.sender = None;
    if let Some(worker) = handle.worker.take() {
        let _ = worker.join();
    }
    with_state(|s| s.allocations.values_mut().for_each(|a| a.clear_stream(id)));
    ACL_SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn aclrtSynchronizeDevice() -> i32 {
    if let Err(code) = require_device("aclrtSynchronizeDevice") {
        return code;
    }
    let ids: Vec<u64> = with_state(|s| s.streams.keys().copied().collect());
    for id in ids {
        let code = synchronize(id);
        if code != ACL_SUCCESS {
            return code;
        }
    }
    ACL_SUCCESS
}

/// (records queued, records reached by their stream), with a condition variable signalled on progress.
type EventProgress = Arc<(Mutex<(u64, u64)>, Condvar)>;

/// An event: how many records were queued and how many have been reached by their stream.
#[derive(Default)]
pub struct EventState {
    progress: EventProgress,
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn aclrtCreateEvent(event: *mut *mut std::ffi::c_void) -> i32 {
    status((|| {
        require_device("aclrtCreateEvent")?;
        if event.is_null() {
            return Err(fail(ACL_ERROR_INVALID_PARAM, "aclrtCreateEvent: null out-pointer"));
        }
        let id = with_state(|s| {
            let id = s.new_handle();
            s.events.insert(id, EventState::default());
            id
        });
        // SAFETY: non-null out-pointer per the contract.
        unsafe { *event = id as *mut std::ffi::c_void };
        Ok(())
    })())
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn aclrtDestroyEvent(event: *mut std::ffi::c_void) -> i32 {
    status((|| {
        require_device("aclrtDestroyEvent")?;
        match with_state(|s| s.events.remove(&(event as u64))) {
            Some(_) => Ok(()),
            None => Err(fail(ACL_ERROR_INVALID_PARAM, "aclrtDestroyEvent: unknown event (destroyed twice?)")),
        }
    })())
}

fn event_progress(event: u64, call: &str) -> Result<EventProgress, i32> {
    with_state(|s| s.events.get(&event).map(|e| Arc::clone(&e.progress)))
        .ok_or_else(|| fail(ACL_ERROR_INVALID_PARAM, format!("{call}: unknown event {event:#x}")))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn aclrtRecordEvent(event: *mut std::ffi::c_void, stream: *mut std::ffi::c_void) -> i32 {
    status((|| {
        require_device("aclrtRecordEvent")?;
        let progress = event_progress(event as u64, "aclrtRecordEvent")?;
        let target = {
            let mut p = progress.0.lock().unwrap_or_else(PoisonError::into_inner);
            p.0 += 1;
            p.0
        };
        let job: Job = Box::new(move || {
            let mut p = progress.0.lock().unwrap_or_else(PoisonError::into_inner);
            p.1 = p.1.max(target);
            progress.1.notify_all();
            Ok(())
        });
        enqueue(stream as u64, job).map_err(|e| fail(ACL_ERROR_INVALID_PARAM, format!("aclrtRecordEvent: {e}")))
    })())
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn aclrtStreamWaitEvent(stream: *mut std::ffi::c_void, event: *mut std::ffi::c_void) -> i32 {
    status((|| {
        require_device("aclrtStreamWaitEvent")?;
        let progress = event_progress(event as u64, "aclrtStreamWaitEvent")?;
        let target = progress.0.lock().unwrap_or_else(PoisonError::into_inner).0;
        let job: Job = Box::new(move || {
            let mut p = progress.0.lock().unwrap_or_else(PoisonError::into_inner);
            while p.1 < target {
                p = progress.1.wait(p).unwrap_or_else(PoisonError::into_inner);
            }
            Ok(())
        });
        enqueue(stream as u64, job).map_err(|e| fail(ACL_ERROR_INVALID_PARAM, format!("aclrtStreamWaitEvent: {e}")))
    })())
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn aclrtSynchronizeEvent(event: *mut std::ffi::c_void) -> i32 {
    status((|| {
        require_device("aclrtSynchronizeEvent")?;
        let progress = event_progress(event as u64, "aclrtSynchronizeEvent")?;
        let mut p = progress.0.lock().unwrap_or_else(PoisonError::into_inner);
        while p.1 < p.0 {
            p = progress.1.wait(p).unwrap_or_else(PoisonError::into_inner);
        }
        Ok(())
    })())
}

/// Waits until stream `id` has run everything queued so far, without clearing its marks (used by copies that
/// return only when done).
pub fn wait_idle(id: u64) -> Result<(), String> {
    let shared = with_state(|s| s.streams.get(&id).map(|h| Arc::clone(&h.shared))).ok_or("unknown stream")?;
    drain(&shared)
}
