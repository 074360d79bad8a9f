//! Keeps the large, short-lived buffers of a forward step in the process heap.
//!
//! Every op of a step returns a fresh candle tensor: a prefill of 512 tokens allocates and frees
//! buffers of several MiB per layer (activations, MLP intermediates, attention scores). glibc
//! serves requests above its mmap threshold with fresh `mmap`s and returns freed heap tops to the
//! kernel above its trim threshold, so each such buffer costs a page fault per 4 KiB touched,
//! page zeroing by the kernel and an `munmap` (measured: about a quarter of an int8 prefill's
//! time in the kernel). [`keep_step_buffers`] raises both thresholds once per process so freed
//! buffers are reused from the heap: the process keeps its peak working set, like any caching
//! allocator. glibc caps the mmap threshold at 32 MiB; larger buffers (a batched prefill's MLP
//! activations) come from the heap's free top, which a 256 MiB top pad keeps large.
//!
//! A user who sets either threshold (`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`, or
//! `GLIBC_TUNABLES` naming `mmap_threshold` or `trim_threshold`) keeps their setting.

/// The mmap threshold set: glibc's largest accepted value (`DEFAULT_MMAP_THRESHOLD_MAX` on 64-bit).
pub const MMAP_THRESHOLD: usize = 32 << 20;

/// Extra heap space requested whenever the heap grows (address space only: pages are touched,
/// and counted in the resident set, when used). Buffers above [`MMAP_THRESHOLD`] are served from
/// that free top of the heap when it is large enough, instead of a fresh mapping.
pub const TOP_PAD: usize = 256 << 20;

/// What [`keep_step_buffers`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllocatorTuning {
    /// Thresholds raised (this call or an earlier one).
    Applied,
    /// The user configured glibc's malloc through the environment; left as it is.
    UserSetting,
    /// Not glibc (another libc, or another OS): nothing to do.
    Unsupported,
}

/// Raises glibc's mmap threshold to [`MMAP_THRESHOLD`], its trim threshold to 1 GiB and its top
/// pad to [`TOP_PAD`], once per process (later calls return the first result). Called when a CPU
/// model backend is built.
pub fn keep_step_buffers() -> AllocatorTuning {
    static RESULT: std::sync::OnceLock<AllocatorTuning> = std::sync::OnceLock::new();
    *RESULT.get_or_init(|| {
        let user_set =
            ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"].iter().any(|name| std::env::var_os(name).is_some())
                || std::env::var("GLIBC_TUNABLES")
                    .is_ok_and(|t| t.contains("mmap_threshold") || t.contains("trim_threshold"));
        if user_set { AllocatorTuning::UserSetting } else { apply() }
    })
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn apply() -> AllocatorTuning {
    const TRIM_THRESHOLD: libc::c_int = 1 << 30;
    // SAFETY: mallopt only changes the allocator's parameters; the values are in the ranges
    // glibc accepts (it returns 0, changing nothing, otherwise).
    let ok = unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
            && libc::mallopt(libc::M_TOP_PAD, TOP_PAD as libc::c_int) == 1
    };
    if ok { AllocatorTuning::Applied } else { AllocatorTuning::Unsupported }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn apply() -> AllocatorTuning {
    AllocatorTuning::Unsupported
}
