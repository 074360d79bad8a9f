//! The int8 operators on ascend-sim against host references: quantize, quant matmul with the packed dequant
//! scale, weight-only int8 matmul (per channel and per group).

mod common;

use candle_ascend::aclnn::quant::{ascend_quant, pack_deq_scales, quant_matmul, weight_quant_matmul};
use candle_ascend::{DType, NpuTensor};
use half::f16;

fn h(v: &[f32]) -> Vec<f16> {
    v.iter().map(|&x| f16::from_f32(x)).collect()
}

#[test]
fn quantize_rounds_half_away_from_zero_and_saturates() {
    let dev = common::device();
    let x = [0.25f32, -0.25, 1.25, 100.0, -100.0, 0.0];
    let xt = NpuTensor::from_slice(&dev, &x, &[2, 3]).expect("x");
    let scale = NpuTensor::from_slice(&dev, &[2.0f32], &[1]).expect("scale");
    let offset = NpuTensor::from_slice(&dev, &[0.0f32], &[1]).expect("offset");
    let q = ascend_quant(&xt, &scale, Some(&offset), 1).expect("quantize");
    assert_eq!(q.dtype(), DType::I8);
    // 0.5 -> 1 and -0.5 -> -1 (away from zero), 2.5 -> 3, saturation at 127 / -128.
    assert_eq!(q.to_vec::<i8>().expect("q"), vec![1, -1, 3, 127, -128, 0]);
    // Per channel along the last dim, with an offset.
    let sc = NpuTensor::from_slice(&dev, &[1.0f32, 10.0, 0.5], &[3]).expect("scales");
    let off = NpuTensor::from_slice(&dev, &[0.0f32, 1.0, -2.0], &[3]).expect("offsets");
    let q = ascend_quant(&xt, &sc, Some(&off), 1).expect("per channel");
    assert_eq!(q.to_vec::<i8>().expect("q"), vec![0, -2, -1, 100, -128, -2]);
}

#[test]
fn quant_matmul_with_packed_scale_and_int32_bias() {
    let dev = common::device();
    let (m, k, n) = (3, 8, 4);
    let x: Vec<i8> = (0..m * k).map(|i| ((i * 7) % 23) as i8 - 11).collect();
    let w: Vec<i8> = (0..n * k).map(|i| ((i * 5) % 19) as i8 - 9).collect(); // (n, k) row-major
    let bias = [10i32, -20, 0, 5];
    let scales = [0.01f32, 0.02, 0.003, 0.5];
    let packed = pack_deq_scales(&scales);
    let xt = NpuTensor::from_slice(&dev, &x, &[m, k]).expect("x");
    let wt = NpuTensor::from_slice(&dev, &w, &[n, k]).expect("w");
    let st = NpuTensor::from_slice(&dev, &packed, &[n]).expect("scale");
    let bt = NpuTensor::from_slice(&dev, &bias, &[n]).expect("bias");
    let want: Vec<f32> = (0..m)
        .flat_map(|r| (0..n).map(move |c| (r, c)))
        .map(|(r, c)| {
            let acc: i32 = (0..k).map(|j| x[r * k + j] as i32 * w[c * k + j] as i32).sum::<i32>() + bias[c];
            // The kernel uses the 19-bit truncated scale of the packing.
            acc as f32 * f32::from_bits(scales[c].to_bits() & 0xFFFF_E000)
        })
        .collect();
    for (x2, transpose) in [(wt.transpose(0, 1).expect("view"), false), (wt.clone(), true)] {
        let y = quant_matmul(&xt, &x2, &st, Some(&bt), transpose, DType::F16).expect("quant matmul");
        let got: Vec<f32> = y.to_vec::<f16>().expect("y").iter().map(|v| v.to_f32()).collect();
        common::assert_close(&got, &want, 1e-3, "quant_matmul");
    }
    // An f32 scale with f16 output is outside the A2 contract (needs the uint64 packing).
    let f32_scale = NpuTensor::from_slice(&dev, &scales, &[n]).expect("f32 scale");
    let err = quant_matmul(&xt, &wt, &f32_scale, None, true, DType::F16).expect_err("f32 scale with f16 out");
    assert!(err.to_string().contains("uint64"), "{err}");
}

#[test]
fn weight_quant_matmul_per_channel_and_per_group() {
    let dev = common::device();
    let (m, k, n) = (2, 64, 3);
    let x: Vec<f32> = (0..m * k).map(|i| ((i as f32) * 0.13).sin()).collect();
    let w: Vec<i8> = (0..k * n).map(|i| ((i * 11) % 31) as i8 - 15).collect(); // (k, n)
    let xt = NpuTensor::from_slice(&dev, &h(&x), &[m, k]).expect("x");
    let wt = NpuTensor::from_slice(&dev, &w, &[k, n]).expect("w");
    let reference = |scale: &dyn Fn(usize, usize) -> f32, offset: &dyn Fn(usize, usize) -> f32, bias: &[f32]| {
        let xr: Vec<f32> = h(&x).iter().map(|v| v.to_f32()).collect();
        (0..m)
            .flat_map(|r| (0..n).map(move |c| (r, c)))
            .map(|(r, c)| {
                (0..k).map(|j| xr[r * k + j] * ((w[j * n + c] as f32 + offset(j, c)) * scale(j, c))).sum::<f32>()
                    + bias[c]
            })
            .collect::<Vec<f32>>()
    };
    // Per channel with offset and bias.
    let (sc, off, bias) = ([0.01f32, 0.02, 0.05], [1.0f32, 0.0, -2.0], [0.5f32, -0.25, 0.0]);
    let st = NpuTensor::from_slice(&dev, &h(&sc), &[n]).expect("scale");
    let ot = NpuTensor::from_slice(&dev, &h(&off), &[n]).expect("offset");
    let bt = NpuTensor::from_slice(&dev, &h(&bias), &[n]).expect("bias");
    let y = weight_quant_matmul(&xt, &wt, &st, Some(&ot), Some(&bt), 0).expect("per channel");
    let want = reference(&|_, c| sc[c], &|_, c| off[c], &bias);
    let got: Vec<f32> = y.to_vec::<f16>().expect("y").iter().map(|v| v.to_f32()).collect();
    common::assert_close(&got, &want, 5e-3, "per channel");
    // Per group of 32 along k: scale (2, n).
    let gs: Vec<f32> = (0..2 * n).map(|i| 0.01 * (i + 1) as f32).collect();
    let gt = NpuTensor::from_slice(&dev, &h(&gs), &[2, n]).expect("group scale");
    let y = weight_quant_matmul(&xt, &wt, &gt, None, None, 32).expect("per group");
    let want = reference(&|j, c| h(&gs)[(j / 32) * n + c].to_f32(), &|_, _| 0.0, &[0.0; 3]);
    let got: Vec<f32> = y.to_vec::<f16>().expect("y").iter().map(|v| v.to_f32()).collect();
    common::assert_close(&got, &want, 5e-3, "per group");
    assert!(weight_quant_matmul(&xt, &wt, &gt, None, None, 16).is_err(), "group size not a multiple of 32");
}
