//! Pinned host memory and events, and [`HostStaging`]: the per-step upload path (token ids, positions) that copies
//! through a pinned buffer so the host-to-device copy is truly asynchronous (from pageable memory CANN copies
//! synchronously, cann-facts 2.2). An event recorded after each copy keeps the host from overwriting the staging
//! buffer while the previous copy may still read it.

use crate::error::{Error, Result};
use crate::loader::{Cann, sym};
use crate::runtime::bind_device;
use crate::runtime::device::{AscendDevice, Stream};
use crate::runtime::tensor::{NpuElement, NpuTensor};
use crate::sys;

/// An owned `aclrtEvent`.
pub struct Event {
    api: &'static Cann,
    device: i32,
    raw: sys::aclrtEvent,
}

// SAFETY: an event is a runtime handle usable from any thread with the device bound (done before every call).
unsafe impl Send for Event {}

impl Event {
    pub fn new(device: &AscendDevice) -> Result<Event> {
        device.bind()?;
        let api = device.api();
        let f = sym!(api.runtime, aclrtCreateEvent)?;
        let mut raw: sys::aclrtEvent = std::ptr::null_mut();
        // SAFETY: valid out-pointer; the device is bound.
        let code = unsafe { f(&mut raw) };
        api.check("aclrtCreateEvent", code)?;
        Ok(Event { api, device: device.ordinal() as i32, raw })
    }

    /// Marks the current end of `stream`'s queue.
    pub fn record(&self, stream: &Stream) -> Result<()> {
        bind_device(self.api, self.device)?;
        let f = sym!(self.api.runtime, aclrtRecordEvent)?;
        // SAFETY: both handles are live.
        let code = unsafe { f(self.raw, stream.raw()) };
        self.api.check("aclrtRecordEvent", code)
    }

    /// Blocks until the work before the last record is done.
    pub fn synchronize(&self) -> Result<()> {
        bind_device(self.api, self.device)?;
        let f = sym!(self.api.runtime, aclrtSynchronizeEvent)?;
        // SAFETY: live handle.
        let code = unsafe { f(self.raw) };
        self.api.check("aclrtSynchronizeEvent", code)
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        if bind_device(self.api, self.device).is_err() {
            return;
        }
        if let Ok(f) = sym!(self.api.runtime, aclrtDestroyEvent) {
            // SAFETY: live handle, destroyed once.
            let code = unsafe { f(self.raw) };
            crate::record_drop_error(self.api.check("aclrtDestroyEvent", code));
        }
    }
}

/// Page-locked host memory (`aclrtMallocHost`), freed on drop.
pub struct PinnedBuffer {
    api: &'static Cann,
    device: i32,
    ptr: *mut std::ffi::c_void,
    len: usize,
}

// SAFETY: plain host memory owned by this value; CANN calls on it bind the device first.
unsafe impl Send for PinnedBuffer {}

impl PinnedBuffer {
    pub fn new(device: &AscendDevice, len: usize) -> Result<PinnedBuffer> {
        device.bind()?;
        let api = device.api();
        let f = sym!(api.runtime, aclrtMallocHost)?;
        let mut ptr = std::ptr::null_mut();
        // SAFETY: valid out-pointer; len > 0 (max(1)).
        let code = unsafe { f(&mut ptr, len.max(1)) };
        api.check("aclrtMallocHost", code)?;
        Ok(PinnedBuffer { api, device: device.ordinal() as i32, ptr, len: len.max(1) })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_ptr(&self) -> *mut std::ffi::c_void {
        self.ptr
    }
}

impl Drop for PinnedBuffer {
    fn drop(&mut self) {
        if bind_device(self.api, self.device).is_err() {
            return;
        }
        if let Ok(f) = sym!(self.api.runtime, aclrtFreeHost) {
            // SAFETY: allocated by aclrtMallocHost and freed once; HostStaging synchronises its event before drop.
            let code = unsafe { f(self.ptr) };
            crate::record_drop_error(self.api.check("aclrtFreeHost", code));
        }
    }
}

/// A pinned staging buffer for small, frequent uploads, reused across steps.
pub struct HostStaging {
    device: AscendDevice,
    buffer: PinnedBuffer,
    copied: Event,
    in_flight: bool,
}

impl HostStaging {
    /// A staging buffer of `capacity` bytes for `device`.
    pub fn new(device: &AscendDevice, capacity: usize) -> Result<HostStaging> {
        Ok(HostStaging {
            device: device.clone(),
            buffer: PinnedBuffer::new(device, capacity)?,
            copied: Event::new(device)?,
            in_flight: false,
        })
    }

    /// Queues a copy of `data` into the contiguous tensor `dst` on the device's stream; returns without waiting
    /// for it. Waits first for the previous copy out of the staging buffer, if any.
    pub fn upload<T: NpuElement>(&mut self, dst: &NpuTensor, data: &[T]) -> Result<()> {
        let bytes = std::mem::size_of_val(data);
        if T::DTYPE != dst.dtype() || data.len() != dst.elem_count() || !dst.is_contiguous() {
            return Err(Error::ShapeMismatch {
                op: "HostStaging::upload",
                expected: format!("{} contiguous {:?} elements", dst.elem_count(), dst.dtype()),
                got: format!("{} {:?} elements into {dst:?}", data.len(), T::DTYPE),
            });
        }
        if bytes > self.buffer.len() {
            return Err(Error::InvalidArgument(format!(
                "{bytes} bytes exceed the staging capacity {}",
                self.buffer.len()
            )));
        }
        if bytes == 0 {
            return Ok(());
        }
        if self.in_flight {
            self.copied.synchronize()?;
            self.in_flight = false;
        }
        // SAFETY: the staging buffer holds at least `bytes` bytes and no queued copy reads it any more (the event
        // of the previous copy was synchronised above); `data` is a live slice of `bytes` bytes.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr().cast::<u8>(), self.buffer.as_ptr().cast::<u8>(), bytes) };
        self.device.bind()?;
        let api = self.device.api();
        let f = sym!(api.runtime, aclrtMemcpyAsync)?;
        let byte_offset = dst.offset() * dst.dtype().size_in_bytes();
        let room = dst.buffer().len() - byte_offset;
        // SAFETY: the destination range [offset, offset + bytes) lies in dst's block (contiguous view of
        // data.len() elements); the source is pinned memory that stays untouched until the event below completes.
        let code = unsafe {
            f(
                dst.buffer().as_ptr().cast::<u8>().add(byte_offset).cast(),
                room,
                self.buffer.as_ptr(),
                bytes,
                sys::aclrtMemcpyKind_ACL_MEMCPY_HOST_TO_DEVICE,
                self.device.stream().raw(),
            )
        };
        api.check("aclrtMemcpyAsync", code)?;
        self.copied.record(self.device.stream())?;
        self.in_flight = true;
        Ok(())
    }
}

impl Drop for HostStaging {
    fn drop(&mut self) {
        if self.in_flight {
            crate::record_drop_error(self.copied.synchronize());
        }
    }
}
