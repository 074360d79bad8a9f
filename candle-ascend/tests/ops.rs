//! The first aclnn operators through the safe layer on ascend-sim, against host references in f32.

mod common;

use candle_ascend::aclnn::ops;
use candle_ascend::{DType, NpuTensor};
use half::f16;

fn rms_reference(x: &[f32], gamma: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let cols = gamma.len();
    let mut y = Vec::new();
    let mut rstd = Vec::new();
    for row in x.chunks(cols) {
        let r = 1.0 / (row.iter().map(|v| v * v).sum::<f32>() / cols as f32 + eps).sqrt();
        y.extend(row.iter().zip(gamma).map(|(v, g)| v * r * g));
        rstd.push(r);
    }
    (y, rstd)
}

fn data(n: usize, seed: f32) -> Vec<f32> {
    (0..n).map(|i| (i as f32 * 0.37 + seed).sin() * 2.0).collect()
}

#[test]
fn rms_norm_f32_matches_reference() {
    let dev = common::device();
    let (x, g) = (data(2 * 3 * 16, 0.1), data(16, 0.7));
    let xt = NpuTensor::from_slice(&dev, &x, &[2, 3, 16]).expect("x");
    let gt = NpuTensor::from_slice(&dev, &g, &[16]).expect("gamma");
    let (y, rstd) = ops::rms_norm(&xt, &gt, 1e-6).expect("rms_norm");
    assert_eq!(rstd.shape(), &[2, 3, 1]);
    let (want_y, want_r) = rms_reference(&x, &g, 1e-6);
    common::assert_close(&y.to_vec::<f32>().expect("y"), &want_y, 1e-5, "y");
    common::assert_close(&rstd.to_vec::<f32>().expect("rstd"), &want_r, 1e-5, "rstd");
}

#[test]
fn rms_norm_f16_with_strided_rows() {
    let dev = common::device();
    // Rows 1..3 of a (4, 32) tensor: a view with a non-zero offset (the data pointer stays the block start).
    let x: Vec<f32> = data(4 * 32, 0.3);
    let xh: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
    let g: Vec<f16> = data(32, 0.9).iter().map(|&v| f16::from_f32(v)).collect();
    let xt = NpuTensor::from_slice(&dev, &xh, &[4, 32]).and_then(|t| t.narrow(0, 1, 2)).expect("x");
    let gt = NpuTensor::from_slice(&dev, &g, &[32]).expect("gamma");
    let (y, _) = ops::rms_norm(&xt, &gt, 1e-5).expect("rms_norm");
    let xr: Vec<f32> = xh[32..96].iter().map(|v| v.to_f32()).collect();
    let gr: Vec<f32> = g.iter().map(|v| v.to_f32()).collect();
    let (want, _) = rms_reference(&xr, &gr, 1e-5);
    let got: Vec<f32> = y.to_vec::<f16>().expect("y").iter().map(|v| v.to_f32()).collect();
    common::assert_close(&got, &want, 2e-3, "y f16");
}

#[test]
fn add_rms_norm_returns_sum_and_norm() {
    let dev = common::device();
    let (a, b, g) = (data(3 * 8, 0.2), data(3 * 8, 1.1), data(8, 0.5));
    let at = NpuTensor::from_slice(&dev, &a, &[3, 8]).expect("a");
    let bt = NpuTensor::from_slice(&dev, &b, &[3, 8]).expect("b");
    let gt = NpuTensor::from_slice(&dev, &g, &[8]).expect("g");
    let (y, rstd, sum) = ops::add_rms_norm(&at, &bt, &gt, 1e-6).expect("add_rms_norm");
    let want_sum: Vec<f32> = a.iter().zip(&b).map(|(p, q)| p + q).collect();
    let (want_y, want_r) = rms_reference(&want_sum, &g, 1e-6);
    common::assert_close(&sum.to_vec::<f32>().expect("sum"), &want_sum, 1e-6, "sum");
    common::assert_close(&y.to_vec::<f32>().expect("y"), &want_y, 1e-5, "y");
    common::assert_close(&rstd.to_vec::<f32>().expect("rstd"), &want_r, 1e-5, "rstd");
    let bad = NpuTensor::from_slice(&dev, &a[..16], &[2, 8]).expect("short");
    assert!(ops::add_rms_norm(&at, &bad, &gt, 1e-6).is_err(), "shape mismatch is rejected");
}

#[test]
fn cast_between_float_and_int_types() {
    let dev = common::device();
    let x = [1.5f32, -2.75, 3.0, 100.25];
    let xt = NpuTensor::from_slice(&dev, &x, &[4]).expect("x");
    let h = ops::cast(&xt, DType::F16).expect("to f16");
    let back = ops::cast(&h, DType::F32).expect("to f32");
    assert_eq!(back.to_vec::<f32>().expect("read"), x.to_vec());
    let i = ops::cast(&xt, DType::I32).expect("to i32");
    assert_eq!(i.to_vec::<i32>().expect("read"), vec![1, -2, 3, 100]);
}

#[test]
fn swiglu_gates_with_the_first_half() {
    let dev = common::device();
    let x = data(2 * 8, 0.4);
    let xt = NpuTensor::from_slice(&dev, &x, &[2, 8]).expect("x");
    let out = ops::swiglu(&xt, 1).expect("swiglu");
    assert_eq!(out.shape(), &[2, 4]);
    let silu = |v: f32| v / (1.0 + (-v).exp());
    let want: Vec<f32> =
        (0..2).flat_map(|r| (0..4).map(move |j| (r, j))).map(|(r, j)| silu(x[r * 8 + j]) * x[r * 8 + 4 + j]).collect();
    common::assert_close(&out.to_vec::<f32>().expect("out"), &want, 1e-5, "swiglu");
    let odd = NpuTensor::from_slice(&dev, &x[..6], &[2, 3]).expect("odd");
    assert!(ops::swiglu(&odd, 1).is_err(), "odd split dim is rejected");
    let strided = xt.transpose(0, 1).expect("t");
    assert!(ops::swiglu(&strided, 0).is_err(), "non-contiguous input is rejected");
}

#[test]
fn operator_support_is_reported_from_symbols() {
    let api = common::api();
    for op in ["RmsNorm", "AddRmsNorm", "Cast", "SwiGlu"] {
        assert!(api.supports_operator(op), "{op}");
    }
    // Declared but not (yet) implemented by the simulator: unsupported, not a crash.
    assert!(!api.supports_operator("IncreFlashAttentionV4"));
    assert!(!api.supports_operator("NoSuchOp"));
}
