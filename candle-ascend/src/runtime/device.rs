//! [`AscendDevice`]: one NPU (or simulated one) with its compute stream and memory pool; every method binds the
//! device to the calling thread first, so the handle can be used from any thread (rayon pools included).
//! [`Stream`] owns an `aclrtStream`.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::error::{Error, Result};
use crate::loader::{Cann, sym};
use crate::runtime::pool::{DeviceBuffer, MemoryPool, PoolStats};
use crate::runtime::{bind_device, init};
use crate::sys;

/// An owned `aclrtStream`. Destroyed on drop after a synchronisation (errors on drop are ignored, never panicked).
pub struct Stream {
    api: &'static Cann,
    device: i32,
    raw: sys::aclrtStream,
}

// SAFETY: an aclrtStream is a runtime handle that CANN allows on any thread with the device bound; every use in
// this crate binds the device first, and the handle itself is never dereferenced on the host.
unsafe impl Send for Stream {}
// SAFETY: as for Send; CANN serialises submissions to one stream internally, and we only pass the handle by value.
unsafe impl Sync for Stream {}

impl Stream {
    fn new(api: &'static Cann, device: i32) -> Result<Stream> {
        bind_device(api, device)?;
        let f = sym!(api.runtime, aclrtCreateStream)?;
        let mut raw: sys::aclrtStream = std::ptr::null_mut();
        // SAFETY: `raw` is a valid out-pointer; the device is bound on this thread.
        let code = unsafe { f(&mut raw) };
        api.check("aclrtCreateStream", code)?;
        Ok(Stream { api, device, raw })
    }

    /// The raw handle, for aclnn phase-2 calls and async copies.
    pub fn raw(&self) -> sys::aclrtStream {
        self.raw
    }

    /// Blocks until all work queued on the stream is done.
    pub fn synchronize(&self) -> Result<()> {
        bind_device(self.api, self.device)?;
        let f = sym!(self.api.runtime, aclrtSynchronizeStream)?;
        // SAFETY: `raw` is a live stream created by aclrtCreateStream and not yet destroyed.
        let code = unsafe { f(self.raw) };
        self.api.check("aclrtSynchronizeStream", code)
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if bind_device(self.api, self.device).is_err() {
            return;
        }
        crate::record_drop_error(self.synchronize());
        if let Ok(f) = sym!(self.api.runtime, aclrtDestroyStream) {
            // SAFETY: `raw` is live and destroyed exactly once, here; its queued work has been synchronised.
            let code = unsafe { f(self.raw) };
            crate::record_drop_error(self.api.check("aclrtDestroyStream", code));
        }
    }
}

pub(crate) struct DeviceInner {
    pub(crate) api: &'static Cann,
    pub(crate) id: i32,
    pub(crate) pool: Mutex<MemoryPool>,
    // Declared last: dropped after the pool has released its blocks.
    pub(crate) stream: Stream,
}

impl DeviceInner {
    pub(crate) fn bind(&self) -> Result<()> {
        bind_device(self.api, self.id)
    }

    pub(crate) fn pool(&self) -> MutexGuard<'_, MemoryPool> {
        self.pool.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for DeviceInner {
    fn drop(&mut self) {
        // Cached blocks may still be read by queued work: synchronise, then free them.
        if self.bind().is_ok() && self.stream.synchronize().is_ok() {
            let mut pool = self.pool.lock().unwrap_or_else(PoisonError::into_inner);
            pool.release_cached(self.api);
        }
    }
}

/// One NPU: its ordinal, compute stream and stream-ordered memory pool. Cheap to clone (shared handle).
#[derive(Clone)]
pub struct AscendDevice {
    pub(crate) inner: Arc<DeviceInner>,
}

impl std::fmt::Debug for AscendDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AscendDevice(npu:{})", self.inner.id)
    }
}

impl AscendDevice {
    /// Opens device `ordinal` with the process-wide libraries ([`Cann::global`]).
    pub fn new(ordinal: usize) -> Result<AscendDevice> {
        Self::with_api(Cann::global()?, ordinal)
    }

    /// Opens device `ordinal` with an explicitly loaded library set (e.g. [`Cann::load_sim`]).
    pub fn with_api(api: &'static Cann, ordinal: usize) -> Result<AscendDevice> {
        init(api)?;
        let count = api.device_count()?;
        if ordinal >= count {
            return Err(Error::InvalidDevice { ordinal, count });
        }
        let id = i32::try_from(ordinal).map_err(|_| Error::InvalidDevice { ordinal, count })?;
        let stream = Stream::new(api, id)?;
        let inner = DeviceInner { api, id, pool: Mutex::new(MemoryPool::new()), stream };
        Ok(AscendDevice { inner: Arc::new(inner) })
    }

    /// The device ordinal.
    pub fn ordinal(&self) -> usize {
        self.inner.id as usize
    }

    /// The loaded libraries.
    pub fn api(&self) -> &'static Cann {
        self.inner.api
    }

    /// Binds this device to the calling thread (done by every method; public for code that calls CANN directly).
    pub fn bind(&self) -> Result<()> {
        self.inner.bind()
    }

    /// The compute stream.
    pub fn stream(&self) -> &Stream {
        &self.inner.stream
    }

    /// Waits for all queued work of this device's stream.
    pub fn synchronize(&self) -> Result<()> {
        self.inner.stream.synchronize()
    }

    /// (free, total) device memory in bytes (`aclrtGetMemInfo(ACL_HBM_MEM)`).
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        self.bind()?;
        let f = sym!(self.inner.api.runtime, aclrtGetMemInfo)?;
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: both out-pointers are valid for the call; the device is bound.
        let code = unsafe { f(sys::aclrtMemAttr_ACL_HBM_MEM, &mut free, &mut total) };
        self.inner.api.check("aclrtGetMemInfo", code)?;
        Ok((free, total))
    }

    /// Allocates `bytes` from the pool (stream-ordered: usable by work queued on this device's stream at once).
    pub fn alloc(&self, bytes: usize) -> Result<DeviceBuffer> {
        self.bind()?;
        MemoryPool::alloc(&self.inner, bytes)
    }

    /// Pool statistics.
    pub fn pool_stats(&self) -> PoolStats {
        self.inner.pool().stats()
    }

    /// Synchronises the stream and returns every cached (unused) block to CANN.
    pub fn trim_pool(&self) -> Result<()> {
        self.synchronize()?;
        self.inner.pool().release_cached(self.inner.api);
        Ok(())
    }
}
