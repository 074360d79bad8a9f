//! The runtime against ascend-sim: device, memory info, pool reuse and statistics, NpuTensor round trips for every
//! dtype, views, candle conversion, and use from another thread.

mod common;

use candle_ascend::{DType, NpuTensor};
use half::{bf16, f16};

#[test]
fn device_opens_and_reports_memory() {
    let dev = common::device();
    let (free, total) = dev.mem_info().expect("mem info");
    assert!(total > 0 && free <= total);
    assert!(dev.api().is_sim());
    assert_eq!(dev.api().soc_name().as_deref(), Some("AscendSim"));
    assert!(common::api().device_count().expect("count") >= 1);
}

#[test]
fn invalid_ordinal_is_an_error() {
    let err = candle_ascend::AscendDevice::with_api(common::api(), 99).expect_err("no device 99");
    assert!(err.to_string().contains("npu:99"), "{err}");
}

#[test]
fn pool_reuses_blocks_on_the_same_stream_and_counts() {
    let dev = common::device();
    let a = dev.alloc(1000).expect("alloc");
    assert_eq!(a.as_ptr() as usize % 32, 0);
    assert_eq!(a.block_size(), 1024);
    let s = dev.pool_stats();
    assert_eq!((s.live_bytes, s.live_blocks, s.device_allocations), (1024, 1, 1));
    let addr = a.as_ptr();
    drop(a);
    let s = dev.pool_stats();
    assert_eq!((s.live_bytes, s.cached_bytes, s.cached_blocks), (0, 1024, 1));
    let b = dev.alloc(1010).expect("alloc");
    assert_eq!(b.as_ptr(), addr, "a freed block is reused without synchronisation");
    assert_eq!(dev.pool_stats().reuses, 1);
    let c = dev.alloc(4096).expect("alloc");
    assert_eq!(dev.pool_stats().peak_live_bytes, 1024 + 4096);
    drop((b, c));
    dev.trim_pool().expect("trim");
    let s = dev.pool_stats();
    assert_eq!((s.live_bytes, s.cached_bytes), (0, 0));
}

fn round_trip<T: candle_ascend::NpuElement + PartialEq + std::fmt::Debug>(values: Vec<T>) {
    let dev = common::device();
    let n = values.len();
    let t = NpuTensor::from_slice(&dev, &values, &[2, n / 2]).expect("upload");
    assert_eq!(t.dtype(), T::DTYPE);
    assert_eq!(t.to_vec::<T>().expect("download"), values);
}

#[test]
fn round_trips_every_dtype() {
    round_trip::<i8>(vec![-128, -1, 0, 1, 127, 5]);
    round_trip::<u8>(vec![0, 1, 255, 7]);
    round_trip::<i32>(vec![i32::MIN, -1, 0, i32::MAX]);
    round_trip::<i64>(vec![i64::MIN, 0, 1, i64::MAX]);
    round_trip::<u64>(vec![0, 1 << 46, u64::MAX, 3]);
    round_trip::<f16>([0.5f32, -1.0, 65504.0, 1e-3].map(f16::from_f32).to_vec());
    round_trip::<bf16>([0.5f32, -1.0, 3.0e38, 1e-3].map(bf16::from_f32).to_vec());
    round_trip::<f32>(vec![0.0, -0.0, f32::MAX, f32::MIN_POSITIVE, 1.5, -2.25]);
}

#[test]
fn views_read_back_through_strides_and_offset() {
    let dev = common::device();
    let data: Vec<f32> = (0..24).map(|v| v as f32).collect();
    let t = NpuTensor::from_slice(&dev, &data, &[2, 3, 4]).expect("upload");
    let narrowed = t.narrow(2, 1, 2).expect("narrow");
    assert_eq!(narrowed.offset(), 1);
    assert_eq!(narrowed.to_vec::<f32>().expect("read"), vec![1., 2., 5., 6., 9., 10., 13., 14., 17., 18., 21., 22.]);
    let tr = t.narrow(0, 1, 1).and_then(|v| v.transpose(1, 2)).expect("view");
    assert_eq!(tr.shape(), &[1, 4, 3]);
    assert_eq!(tr.to_vec::<f32>().expect("read"), vec![12., 16., 20., 13., 17., 21., 14., 18., 22., 15., 19., 23.]);
    assert!(t.to_vec::<f16>().is_err(), "dtype mismatch is an error");
}

#[test]
fn candle_tensors_round_trip() {
    let dev = common::device();
    let cpu = candle_core::Device::Cpu;
    let x = candle_core::Tensor::arange(0f32, 12., &cpu).and_then(|t| t.reshape((3, 4))).expect("tensor");
    for dtype in [candle_core::DType::F32, candle_core::DType::F16, candle_core::DType::BF16, candle_core::DType::I64] {
        let src = x.to_dtype(dtype).expect("cast");
        let npu = NpuTensor::from_candle(&dev, &src).expect("to npu");
        let back = npu.to_candle().expect("to candle");
        assert_eq!(back.dtype(), dtype);
        assert_eq!(back.dims(), &[3, 4]);
        let diff = (back.to_dtype(candle_core::DType::F32).expect("f32") - &x).and_then(|d| d.abs()?.max_all());
        assert_eq!(diff.and_then(|d| d.to_scalar::<f32>()).expect("diff"), 0.0);
    }
    // Token ids: u32 become the aclnn index type i32; a transposed candle view uploads in logical order.
    let ids = candle_core::Tensor::new(&[[1u32, 2], [3, 4]], &cpu).and_then(|t| t.t()).expect("ids");
    let npu = NpuTensor::from_candle(&dev, &ids).expect("ids to npu");
    assert_eq!(npu.dtype(), DType::I32);
    assert_eq!(npu.to_vec::<i32>().expect("read"), vec![1, 3, 2, 4]);
    let f64t = candle_core::Tensor::new(&[1f64], &cpu).expect("f64");
    assert!(NpuTensor::from_candle(&dev, &f64t).is_err(), "f64 is not an NPU dtype");
}

#[test]
fn a_device_is_usable_from_a_fresh_thread() {
    let dev = common::device();
    let t = NpuTensor::from_slice(&dev, &[1f32, 2., 3., 4.], &[4]).expect("upload");
    // The new thread never called aclrtSetDevice itself: the runtime binds the device on first use.
    let got = std::thread::spawn(move || t.to_vec::<f32>().map_err(|e| e.to_string())).join().expect("join");
    assert_eq!(got, Ok(vec![1., 2., 3., 4.]));
}

#[test]
fn dtype_enum_values_match_the_contract() {
    // cann-facts.md 2.3: a wrong value here would make CANN read the data as another type.
    let expected = [
        (DType::F32, 0),
        (DType::F16, 1),
        (DType::I8, 2),
        (DType::I32, 3),
        (DType::U8, 4),
        (DType::I64, 9),
        (DType::U64, 10),
        (DType::BF16, 27),
    ];
    for (dtype, value) in expected {
        assert_eq!(dtype.acl(), value, "{dtype:?}");
    }
}

#[test]
fn staged_uploads_reuse_one_pinned_buffer() {
    let dev = common::device();
    let mut staging = candle_ascend::HostStaging::new(&dev, 64).expect("staging");
    let a = NpuTensor::uninit(&dev, DType::I32, &[4]).expect("a");
    let b = NpuTensor::uninit(&dev, DType::I32, &[2, 4]).and_then(|t| t.narrow(0, 1, 1)).expect("b view");
    staging.upload(&a, &[1i32, 2, 3, 4]).expect("first upload");
    // The second upload overwrites the staging buffer only after the first copy has completed.
    staging.upload(&b, &[5i32, 6, 7, 8]).expect("second upload");
    assert_eq!(a.to_vec::<i32>().expect("a"), vec![1, 2, 3, 4]);
    assert_eq!(b.to_vec::<i32>().expect("b"), vec![5, 6, 7, 8]);
    assert!(staging.upload(&a, &[1f32; 4]).is_err(), "dtype mismatch");
    assert!(
        staging.upload(&NpuTensor::uninit(&dev, DType::I32, &[32]).expect("big"), &[0i32; 32]).is_err(),
        "capacity"
    );
}
