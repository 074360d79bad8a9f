//! The stream-ordered caching memory pool of a device, and [`DeviceBuffer`], the RAII owner of one pool block.
//!
//! Blocks are whole `aclrtMalloc` allocations (start 64-B aligned by CANN), sized in multiples of 32 bytes. A freed
//! block goes back to the cache at once, without synchronisation: all work of a device runs on its one stream, in
//! order, so a later user of the block is queued after every earlier one (the design of ggml-cann's pools).
//! Memory goes back to CANN (`aclrtFree`, which does not wait for queued work) only after a stream synchronisation:
//! on [`crate::AscendDevice::trim_pool`], when an allocation fails (then the allocation is retried once), and
//! when the device is dropped.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::loader::{Cann, sym};
use crate::runtime::device::DeviceInner;
use crate::sys;

/// Alignment and size granularity of pool blocks (aclnn tensor data must be 32-B aligned).
pub const BLOCK_ALIGN: usize = 32;

/// Pool counters, in bytes of whole blocks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Bytes of blocks handed out and not yet dropped.
    pub live_bytes: usize,
    /// Number of blocks handed out and not yet dropped.
    pub live_blocks: usize,
    /// Bytes of blocks kept for reuse.
    pub cached_bytes: usize,
    /// Number of blocks kept for reuse.
    pub cached_blocks: usize,
    /// Highest `live_bytes` seen.
    pub peak_live_bytes: usize,
    /// Calls to `aclrtMalloc` that succeeded.
    pub device_allocations: usize,
    /// Allocations served from the cache.
    pub reuses: usize,
}

/// The cache of free blocks (size -> addresses) and the counters. Owned by a device behind a mutex.
pub struct MemoryPool {
    cached: BTreeMap<usize, Vec<usize>>,
    stats: PoolStats,
}

impl MemoryPool {
    pub(crate) fn new() -> MemoryPool {
        MemoryPool { cached: BTreeMap::new(), stats: PoolStats::default() }
    }

    pub(crate) fn stats(&self) -> PoolStats {
        self.stats
    }

    /// A cached block of at least `block` bytes and at most twice that (so small requests do not pin big blocks).
    fn take_cached(&mut self, block: usize) -> Option<(usize, usize)> {
        let max = block.saturating_mul(2);
        let (&size, addrs) = self.cached.range_mut(block..=max).next()?;
        let addr = addrs.pop()?;
        if addrs.is_empty() {
            self.cached.remove(&size);
        }
        self.stats.cached_bytes -= size;
        self.stats.cached_blocks -= 1;
        Some((addr, size))
    }

    fn mark_live(&mut self, size: usize) {
        self.stats.live_bytes += size;
        self.stats.live_blocks += 1;
        self.stats.peak_live_bytes = self.stats.peak_live_bytes.max(self.stats.live_bytes);
    }

    /// Frees every cached block. The caller has synchronised the stream (aclrtFree does not wait for queued work).
    pub(crate) fn release_cached(&mut self, api: &Cann) {
        let Ok(free) = sym!(api.runtime, aclrtFree) else { return };
        for (size, addrs) in std::mem::take(&mut self.cached) {
            for addr in addrs {
                // SAFETY: `addr` came from aclrtMalloc, is owned by the cache alone (no DeviceBuffer refers to it),
                // and the stream that used it has been synchronised by the caller.
                let code = unsafe { free(addr as *mut std::ffi::c_void) };
                crate::record_drop_error(api.check("aclrtFree", code));
                self.stats.cached_bytes -= size;
                self.stats.cached_blocks -= 1;
            }
        }
    }

    fn device_malloc(api: &Cann, size: usize) -> Result<usize> {
        let f = sym!(api.runtime, aclrtMalloc)?;
        let mut ptr: *mut std::ffi::c_void = std::ptr::null_mut();
        // SAFETY: `ptr` is a valid out-pointer; size > 0; the caller bound the device on this thread.
        let code = unsafe { f(&mut ptr, size, sys::aclrtMemMallocPolicy_ACL_MEM_MALLOC_HUGE_FIRST) };
        api.check("aclrtMalloc", code)?;
        if ptr.is_null() || !(ptr as usize).is_multiple_of(BLOCK_ALIGN) {
            return Err(Error::InvalidArgument(format!("aclrtMalloc returned a misaligned pointer {ptr:?}")));
        }
        Ok(ptr as usize)
    }

    /// Allocates a block of at least `bytes` for `device` (the device is bound on the calling thread).
    pub(crate) fn alloc(device: &Arc<DeviceInner>, bytes: usize) -> Result<DeviceBuffer> {
        let block = bytes
            .max(1)
            .div_ceil(BLOCK_ALIGN)
            .checked_mul(BLOCK_ALIGN)
            .ok_or_else(|| Error::InvalidArgument(format!("allocation of {bytes} bytes overflows")))?;
        let api = device.api;
        let mut pool = device.pool();
        if let Some((addr, size)) = pool.take_cached(block) {
            pool.stats.reuses += 1;
            pool.mark_live(size);
            return Ok(DeviceBuffer { addr, len: bytes, block: size, device: Arc::clone(device) });
        }
        let addr = match Self::device_malloc(api, block) {
            Ok(addr) => addr,
            Err(first) if pool.stats.cached_blocks > 0 => {
                // Out of memory with blocks cached: give them back (after the stream is done with them), retry.
                device.stream.synchronize()?;
                pool.release_cached(api);
                Self::device_malloc(api, block).map_err(|_| first)?
            }
            Err(e) => return Err(e),
        };
        pool.stats.device_allocations += 1;
        pool.mark_live(block);
        Ok(DeviceBuffer { addr, len: bytes, block, device: Arc::clone(device) })
    }

    fn give_back(&mut self, addr: usize, block: usize) {
        self.stats.live_bytes -= block;
        self.stats.live_blocks -= 1;
        self.stats.cached_bytes += block;
        self.stats.cached_blocks += 1;
        self.cached.entry(block).or_default().push(addr);
    }
}

/// One block of device memory from the pool; returned to the pool's cache on drop (stream-ordered, no sync).
pub struct DeviceBuffer {
    addr: usize,
    len: usize,
    block: usize,
    device: Arc<DeviceInner>,
}

impl std::fmt::Debug for DeviceBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceBuffer({:#x}, {} bytes)", self.addr, self.len)
    }
}

impl DeviceBuffer {
    /// The device address (32-byte aligned).
    pub fn as_ptr(&self) -> *mut std::ffi::c_void {
        self.addr as *mut std::ffi::c_void
    }

    /// Requested length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the requested length is zero.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Size of the underlying block (>= len).
    pub fn block_size(&self) -> usize {
        self.block
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        self.device.pool().give_back(self.addr, self.block);
    }
}
