//! Fault injection and leak checks on ascend-sim: every injected fault surfaces as an error from the public API,
//! with no panic, no leaked pool block or nnopbase handle, and the next request works. The tests in this file
//! change process-wide simulator settings, so they take a lock and run one at a time.

mod common;

use std::sync::Mutex;

use candle_ascend::aclnn::{AclTensor, AclTensorList, ops};
use candle_ascend::{Error, NpuTensor};

static SERIAL: Mutex<()> = Mutex::new(());

fn acl_code(e: &Error) -> Option<i32> {
    match e {
        Error::Acl { code, .. } => Some(*code),
        _ => None,
    }
}

#[test]
fn allocation_failure_is_an_error_and_the_next_request_works() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dev = common::device();
    let hooks = common::hooks();
    // SAFETY: hook with a plain integer argument.
    unsafe { (hooks.set_alloc_limit)((hooks.live_device_bytes)() + 4096) };
    let small = dev.alloc(1024).expect("within the limit");
    let err = dev.alloc(1 << 20).expect_err("beyond the limit");
    // SAFETY: as above; removes the limit.
    unsafe { (hooks.set_alloc_limit)(u64::MAX) };
    assert_eq!(acl_code(&err), Some(candle_ascend::sys::ACL_ERROR_BAD_ALLOC), "{err}");
    assert!(err.to_string().contains("out of device memory"), "the recent-error message is carried: {err}");
    drop(small);
    let s = dev.pool_stats();
    assert_eq!((s.live_bytes, s.live_blocks), (0, 0), "no leaked block");
    dev.alloc(1 << 20).expect("the next request works");
}

#[test]
fn pool_frees_its_cache_and_retries_when_memory_runs_out() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dev = common::device();
    let hooks = common::hooks();
    drop(dev.alloc(64 << 10).expect("cached block"));
    assert_eq!(dev.pool_stats().cached_blocks, 1);
    // SAFETY: plain integer argument.
    unsafe { (hooks.set_alloc_limit)((hooks.live_device_bytes)() + (40 << 10)) };
    // 100 KiB does not fit beside the cached 64 KiB block (40 KiB of headroom) but fits once the cache is freed.
    let result = dev.alloc(100 << 10);
    // SAFETY: as above.
    unsafe { (hooks.set_alloc_limit)(u64::MAX) };
    let big = result.expect("served after releasing the cache");
    assert_eq!(dev.pool_stats().cached_blocks, 0);
    drop(big);
}

#[test]
fn injected_operator_failure_surfaces_without_leaks() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dev = common::device();
    let hooks = common::hooks();
    let x = NpuTensor::from_slice(&dev, &[1f32; 16], &[2, 8]).expect("x");
    let g = NpuTensor::from_slice(&dev, &[1f32; 8], &[8]).expect("g");
    // SAFETY: plain counter.
    let handles_before = unsafe { (hooks.live_handles)() };
    // SAFETY: a NUL-terminated static name.
    unsafe { (hooks.set_failing_op)(c"aclnnRmsNorm".as_ptr()) };
    let err = ops::rms_norm(&x, &g, 1e-6).expect_err("injected failure");
    // SAFETY: null clears the injection.
    unsafe { (hooks.set_failing_op)(std::ptr::null()) };
    assert_eq!(acl_code(&err), Some(candle_ascend::sys::ACLNN_ERR_INNER), "{err}");
    assert!(err.to_string().contains("injected failure"), "{err}");
    // SAFETY: plain counter.
    assert_eq!(unsafe { (hooks.live_handles)() }, handles_before, "no leaked aclTensor or executor");
    let (y, _) = ops::rms_norm(&x, &g, 1e-6).expect("the next request works");
    assert_eq!(y.to_vec::<f32>().expect("y").len(), 16);
    drop((x, g, y));
    assert_eq!(dev.pool_stats().live_bytes, 0, "no leaked pool block");
    assert_eq!(candle_ascend::drop_errors().0, 0, "{:?}", candle_ascend::drop_errors().1);
}

#[test]
fn tensor_list_owns_its_members() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dev = common::device();
    let hooks = common::hooks();
    let x = NpuTensor::from_slice(&dev, &[0f32; 8], &[8]).expect("x");
    // SAFETY: plain counter.
    let before = unsafe { (hooks.live_handles)() };
    let members = vec![AclTensor::new(&x).expect("t0"), AclTensor::new(&x).expect("t1")];
    let list = AclTensorList::new(dev.api(), members).expect("list");
    // SAFETY: plain counter.
    assert_eq!(unsafe { (hooks.live_handles)() }, before + 3);
    drop(list);
    // SAFETY: plain counter.
    assert_eq!(unsafe { (hooks.live_handles)() }, before, "the list destroyed its members");
    assert_eq!(candle_ascend::drop_errors().0, 0, "no double destroy: {:?}", candle_ascend::drop_errors().1);
}
