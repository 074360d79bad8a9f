//! `kernel::allocator::keep_step_buffers`, in a process of its own on the main thread (the checks
//! read glibc's process-wide statistics, and a model's steps allocate from the main arena).
//! `harness = false`: `main` runs the checks and fails by panicking.

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn main() {
    use candle_ascend_ops::kernel::allocator::{AllocatorTuning, keep_step_buffers};
    /// Bytes glibc currently holds in mmapped chunks (all arenas).
    fn mapped_bytes() -> usize {
        // SAFETY: mallinfo2 only reads allocator statistics.
        unsafe { libc::mallinfo2() }.hblkhd
    }
    /// Whether a fresh `len`-byte buffer (written at both ends) was served by a new mapping.
    fn is_mapped(len: usize) -> bool {
        let before = mapped_bytes();
        let mut buf = vec![1u8; len];
        buf[len - 1] = 2;
        let mapped = mapped_bytes() >= before + len;
        assert_eq!(std::hint::black_box(&buf)[len - 1], 2);
        mapped
    }
    const STEP_BUFFER: usize = 20 << 20; // above glibc's default 128 KiB threshold, below 32 MiB
    const BATCH_BUFFER: usize = 48 << 20; // above glibc's 32 MiB ceiling for the threshold

    if std::env::var_os("ALLOCATOR_TEST_CHILD").is_some() {
        // The control: the environment configures malloc, so the call changes nothing and the same
        // buffer is mapped (the checks below are not vacuous).
        assert_eq!(keep_step_buffers(), AllocatorTuning::UserSetting);
        assert!(is_mapped(STEP_BUFFER), "untuned glibc served 20 MiB from the heap");
        println!("control: untuned glibc maps a 20 MiB buffer");
        return;
    }
    let tuning = keep_step_buffers();
    if tuning == AllocatorTuning::UserSetting {
        println!("SKIP allocator checks: malloc thresholds are configured by the environment");
        return;
    }
    assert_eq!(tuning, AllocatorTuning::Applied);
    assert!(!is_mapped(STEP_BUFFER), "a 20 MiB step buffer was mmapped after tuning");
    assert!(!is_mapped(BATCH_BUFFER), "a 48 MiB buffer was mmapped although the heap's padded top holds it");
    assert_eq!(keep_step_buffers(), AllocatorTuning::Applied, "a second call reports the first result");
    println!("tuned: 20 MiB and 48 MiB buffers come from the heap");

    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .env("ALLOCATOR_TEST_CHILD", "1")
        .env("MALLOC_TRIM_THRESHOLD_", "131072") // glibc's default, fixed: no dynamic threshold
        .status()
        .unwrap();
    assert!(status.success(), "the untuned control failed");
    println!("test result: ok. allocator checks passed");
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn main() {
    println!("SKIP allocator checks: not glibc, keep_step_buffers does nothing here");
}
