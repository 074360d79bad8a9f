//! Device and pinned host memory (host allocations, 64-byte aligned), copies and memset, memory info, and the
//! hazard marks: which streams have queued writes to (and uses of) each allocation since their last
//! synchronisation.

use std::alloc::Layout;
use std::collections::HashSet;
use std::ffi::c_void;

use crate::codes::*;
use crate::state::{State, fail, memory_capacity, require_device, status, with_state};
use crate::stream::{Job, enqueue};

pub struct Allocation {
    pub size: usize,
    layout: Layout,
    pub pinned: bool,
    /// Streams with queued work writing this allocation, not yet synchronised.
    pub written_by: HashSet<u64>,
    /// Streams with queued work reading or writing this allocation, not yet synchronised.
    pub used_by: HashSet<u64>,
}

impl Allocation {
    pub fn clear_stream(&mut self, stream: u64) {
        self.written_by.remove(&stream);
        self.used_by.remove(&stream);
    }
}

/// The allocation containing `[ptr, ptr + len)`, as (base, allocation).
pub fn find(state: &mut State, ptr: usize, len: usize) -> Option<(usize, &mut Allocation)> {
    let (&base, alloc) = state.allocations.range_mut(..=ptr).next_back()?;
    (ptr.checked_add(len)? <= base + alloc.size.max(1)).then_some((base, alloc))
}

/// Marks device memory as used (and written) by queued work of `stream`.
pub fn mark(state: &mut State, ptr: usize, len: usize, stream: u64, write: bool) {
    if let Some((_, a)) = find(state, ptr, len) {
        a.used_by.insert(stream);
        if write {
            a.written_by.insert(stream);
        }
    }
}

/// The byte fresh device and pinned host allocations are filled with.
pub const POISON: u8 = 0xFF;

fn allocate(size: usize, pinned: bool) -> Result<usize, i32> {
    let layout = Layout::from_size_align(size.div_ceil(32) * 32, 64)
        .map_err(|_| fail(ACL_ERROR_INVALID_PARAM, format!("cannot allocate {size} bytes")))?;
    // SAFETY: the layout has a non-zero size (size > 0 is checked by the callers).
    let ptr = unsafe { std::alloc::alloc(layout) };
    if ptr.is_null() {
        return Err(fail(ACL_ERROR_BAD_ALLOC, format!("host allocation of {size} bytes failed")));
    }
    // Fresh memory is not zeroed by CANN: fill it with a pattern no computation should rely on (all bits set:
    // NaN in every float dtype, -1 in the signed integers).
    // SAFETY: `ptr` is a fresh allocation of `layout.size()` bytes.
    unsafe { std::ptr::write_bytes(ptr, POISON, layout.size()) };
    let alloc = Allocation { size, layout, pinned, written_by: HashSet::new(), used_by: HashSet::new() };
    with_state(|s| {
        s.allocations.insert(ptr as usize, alloc);
        if !pinned {
            s.live_device_bytes += size;
        }
    });
    Ok(ptr as usize)
}

fn release(ptr: usize, pinned: bool, call: &str) -> Result<(), i32> {
    let alloc = with_state(|s| {
        let a = s.allocations.get(&ptr).ok_or_else(|| format!("{ptr:#x} is not the start of a live allocation"))?;
        if a.pinned != pinned {
            return Err(format!("{ptr:#x} is {} memory", if a.pinned { "pinned host" } else { "device" }));
        }
        if !a.used_by.is_empty() {
            return Err(format!(
                "{ptr:#x} is still used by queued work of stream(s) {:x?}; aclrtFree does not wait for the stream, \
                 synchronise it first",
                a.used_by
            ));
        }
        let a = s.allocations.remove(&ptr).ok_or("vanished")?;
        if !pinned {
            s.live_device_bytes -= a.size;
        }
        Ok(a)
    })
    .map_err(|e: String| fail(ACL_ERROR_INVALID_PARAM, format!("{call}: {e}")))?;
    // SAFETY: `ptr` was returned by alloc with this layout and was just removed from the registry.
    unsafe { std::alloc::dealloc(ptr as *mut u8, alloc.layout) };
    Ok(())
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn aclrtMalloc(dev_ptr: *mut *mut c_void, size: usize, _policy: u32) -> i32 {
    status((|| {
        require_device("aclrtMalloc")?;
        if dev_ptr.is_null() || size == 0 {
            return Err(fail(ACL_ERROR_INVALID_PARAM, "aclrtMalloc: null out-pointer or size 0"));
        }
        let (live, limit) = with_state(|s| (s.live_device_bytes, s.faults.alloc_limit));
        let capacity = limit.unwrap_or(usize::MAX).min(memory_capacity());
        if live.saturating_add(size) > capacity {
            return Err(fail(
                ACL_ERROR_BAD_ALLOC,
                format!("aclrtMalloc: out of device memory ({size} bytes requested, {live} of {capacity} in use)"),
            ));
        }
        let ptr = allocate(size, false)?;
        // SAFETY: non-null out-pointer per the contract.
        unsafe { *dev_ptr = ptr as *mut c_void };
        Ok(())
    })())
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn aclrtFree(dev_ptr: *mut c_void) -> i32 {
    status(require_device("aclrtFree").and_then(|()| release(dev_ptr as usize, false, "aclrtFree")))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn aclrtMallocHost(host_ptr: *mut *mut c_void, size: usize) -> i32 {
    status((|| {
        require_device("aclrtMallocHost")?;
        if host_ptr.is_null() || size == 0 {
            return Err(fail(ACL_ERROR_INVALID_PARAM, "aclrtMallocHost: null out-pointer or size 0"));
        }
        let ptr = allocate(size, true)?;
        // SAFETY: non-null out-pointer per the contract.
        unsafe { *host_ptr = ptr as *mut c_void };
        Ok(())
    })())
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn aclrtFreeHost(host_ptr: *mut c_void) -> i32 {
    status(require_device("aclrtFreeHost").and_then(|()| release(host_ptr as usize, true, "aclrtFreeHost")))
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Place {
    Device,
    Pinned,
    Pageable,
}

fn place(s: &mut State, ptr: usize, len: usize) -> Place {
    match find(s, ptr, len) {
        Some((_, a)) if a.pinned => Place::Pinned,
        Some(_) => Place::Device,
        None => Place::Pageable,
    }
}

/// Checks the copy kind against where the pointers are (8.x honours `kind`; a mismatch is a caller bug).
fn check_kind(call: &str, kind: u32, src: Place, dst: Place) -> Result<(), i32> {
    let host = |p: Place| p != Place::Device;
    let ok = match kind {
        ACL_MEMCPY_HOST_TO_HOST => host(src) && host(dst),
        ACL_MEMCPY_HOST_TO_DEVICE => host(src) && dst == Place::Device,
        ACL_MEMCPY_DEVICE_TO_HOST => src == Place::Device && host(dst),
        ACL_MEMCPY_DEVICE_TO_DEVICE => src == Place::Device && dst == Place::Device,
        ACL_MEMCPY_DEFAULT => true,
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(fail(
            ACL_ERROR_INVALID_PARAM,
            format!("{call}: kind {kind} does not match source {src:?} / destination {dst:?}"),
        ))
    }
}

fn raw_copy(dst: usize, src: usize, count: usize) {
    // SAFETY: both ranges were checked to lie in live allocations or are caller-provided host buffers of at least
    // `count` bytes (C contract); std::ptr::copy tolerates overlap.
    unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, count) };
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn aclrtMemcpy(
    dst: *mut c_void,
    dest_max: usize,
    src: *const c_void,
    count: usize,
    kind: u32,
) -> i32 {
    status((|| {
        require_device("aclrtMemcpy")?;
        if count > dest_max || (count > 0 && (dst.is_null() || src.is_null())) {
            return Err(fail(ACL_ERROR_INVALID_PARAM, "aclrtMemcpy: null pointer or count > destMax"));
        }
        let (src, dst) = (src as usize, dst as usize);
        with_state(|s| {
            let (sp, dp) = (place(s, src, count), place(s, dst, count));
            check_kind("aclrtMemcpy", kind, sp, dp)?;
            if let Some((base, a)) = find(s, src, count).filter(|_| sp == Place::Device)
                && !a.written_by.is_empty()
            {
                return Err(fail(
                    ACL_ERROR_INVALID_PARAM,
                    format!(
                        "aclrtMemcpy: host read of device memory {base:#x} written by queued work of stream(s) \
                             {:x?} that has not been synchronised (aclrtMemcpy does not wait; call \
                             aclrtSynchronizeStream first)",
                        a.written_by
                    ),
                ));
            }
            if let Some((base, a)) = find(s, dst, count).filter(|_| dp == Place::Device)
                && !a.used_by.is_empty()
            {
                return Err(fail(
                    ACL_ERROR_INVALID_PARAM,
                    format!(
                        "aclrtMemcpy: synchronous write to device memory {base:#x} still used by queued work of \
                             stream(s) {:x?}; synchronise first or copy with aclrtMemcpyAsync on that stream",
                        a.used_by
                    ),
                ));
            }
            s.copies.count(sp == Place::Device, dp == Place::Device);
            Ok(())
        })?;
        raw_copy(dst, src, count);
        Ok(())
    })())
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn aclrtMemcpyAsync(
    dst: *mut c_void,
    dest_max: usize,
    src: *const c_void,
    count: usize,
    kind: u32,
    stream: *mut c_void,
) -> i32 {
    status((|| {
        require_device("aclrtMemcpyAsync")?;
        if count > dest_max || (count > 0 && (dst.is_null() || src.is_null())) {
            return Err(fail(ACL_ERROR_INVALID_PARAM, "aclrtMemcpyAsync: null pointer or count > destMax"));
        }
        let (src, dst, stream) = (src as usize, dst as usize, stream as u64);
        let (sp, dp) = with_state(|s| {
            let (sp, dp) = (place(s, src, count), place(s, dst, count));
            check_kind("aclrtMemcpyAsync", kind, sp, dp)?;
            if !s.streams.contains_key(&stream) {
                return Err(fail(ACL_ERROR_INVALID_PARAM, format!("aclrtMemcpyAsync: unknown stream {stream:#x}")));
            }
            mark(s, src, count, stream, false);
            mark(s, dst, count, stream, true);
            s.copies.count(sp == Place::Device, dp == Place::Device);
            Ok((sp, dp))
        })?;
        let job: Job = if sp == Place::Pageable {
            // Pageable source: the data is taken now (the call behaves synchronously for the host buffer).
            let staged = read_host(src, count);
            Box::new(move || {
                // SAFETY: `dst` lies in a live allocation (kept alive: aclrtFree rejects memory with queued users).
                unsafe { std::ptr::copy_nonoverlapping(staged.as_ptr(), dst as *mut u8, count) };
                Ok(())
            })
        } else {
            Box::new(move || {
                raw_copy(dst, src, count);
                Ok(())
            })
        };
        enqueue(stream, job).map_err(|e| fail(ACL_ERROR_INVALID_PARAM, format!("aclrtMemcpyAsync: {e}")))?;
        if dp == Place::Pageable {
            // Pageable destination: returns only once the copy (and so all earlier work of the stream) is done.
            crate::stream::wait_idle(stream).map_err(|e| fail(ACLNN_ERR_RUNTIME_ERROR, e))?;
        }
        Ok(())
    })())
}

fn read_host(ptr: usize, count: usize) -> Vec<u8> {
    // SAFETY: the caller passes a readable host buffer of `count` bytes (C contract).
    unsafe { std::slice::from_raw_parts(ptr as *const u8, count) }.to_vec()
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn aclrtMemsetAsync(
    dev_ptr: *mut c_void,
    max_count: usize,
    value: i32,
    count: usize,
    stream: *mut c_void,
) -> i32 {
    status((|| {
        require_device("aclrtMemsetAsync")?;
        let (ptr, stream) = (dev_ptr as usize, stream as u64);
        with_state(|s| {
            if count > max_count || find(s, ptr, count).is_none() {
                return Err(fail(ACL_ERROR_INVALID_PARAM, "aclrtMemsetAsync: range outside a device allocation"));
            }
            mark(s, ptr, count, stream, true);
            Ok(())
        })?;
        let job: Job = Box::new(move || {
            // SAFETY: the range lies in a live allocation that cannot be freed while queued work uses it.
            unsafe { std::ptr::write_bytes(ptr as *mut u8, value as u8, count) };
            Ok(())
        });
        enqueue(stream, job).map_err(|e| fail(ACL_ERROR_INVALID_PARAM, format!("aclrtMemsetAsync: {e}")))
    })())
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn aclrtGetMemInfo(_attr: u32, free: *mut usize, total: *mut usize) -> i32 {
    status((|| {
        require_device("aclrtGetMemInfo")?;
        if free.is_null() || total.is_null() {
            return Err(fail(ACL_ERROR_INVALID_PARAM, "aclrtGetMemInfo: null out-pointer"));
        }
        let (live, limit) = with_state(|s| (s.live_device_bytes, s.faults.alloc_limit));
        let capacity = limit.unwrap_or(usize::MAX).min(memory_capacity());
        // SAFETY: both out-pointers are non-null per the check above and valid per the contract.
        unsafe {
            *free = capacity.saturating_sub(live);
            *total = capacity;
        }
        Ok(())
    })())
}
