//! The int8 operators on ascend-sim against host references: quantize, per-token dynamic quantization, quant
//! matmul with the packed dequant scale and with a per-token scale, weight-only int8 matmul (per channel, per
//! group, into a strided output block), and the broadcasting multiply.

mod common;

use candle_ascend::aclnn::quant::{
    ascend_quant, dynamic_quant, mul, pack_deq_scales, quant_matmul, quant_matmul_per_token, weight_quant_matmul,
    weight_quant_matmul_into,
};
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

#[test]
fn dynamic_quant_is_per_row_symmetric() {
    let dev = common::device();
    // Row 0 ordinary, row 1 all zeros (scale 0; quantizes to zeros), row 2 with a tie at half a step.
    let x = [0.5f32, -1.0, 0.25, 2.0, 0.0, 0.0, 0.0, 0.0, 127.0, 0.5, -63.5, -127.0];
    let xt = NpuTensor::from_slice(&dev, &h(&x), &[3, 4]).expect("x");
    let (q, scale) = dynamic_quant(&xt).expect("dynamic quant");
    assert_eq!((q.dtype(), q.shape()), (DType::I8, &[3usize, 4][..]));
    assert_eq!((scale.dtype(), scale.shape()), (DType::F32, &[3usize][..]));
    let scale = scale.to_vec::<f32>().expect("scale");
    assert_eq!(scale, vec![2.0 / 127.0, 0.0, 1.0]);
    let want: Vec<i8> = x[..4].iter().map(|&v| (v / (2.0f32 / 127.0)).round() as i8).collect();
    let q = q.to_vec::<i8>().expect("q");
    assert_eq!(&q[..4], &want[..]);
    assert_eq!(&q[4..], &[0, 0, 0, 0, 127, 1, -64, -127]);
    // f32 input is outside the operator's contract.
    let x32 = NpuTensor::from_slice(&dev, &x, &[3, 4]).expect("x32");
    assert!(dynamic_quant(&x32).is_err());
}

#[test]
fn quant_matmul_with_per_token_scale_and_float_bias() {
    let dev = common::device();
    let (m, k, n) = (3, 16, 5);
    let x: Vec<i8> = (0..m * k).map(|i| ((i * 7) % 23) as i8 - 11).collect();
    let w: Vec<i8> = (0..n * k).map(|i| ((i * 5) % 19) as i8 - 9).collect(); // (n, k)
    let scales = [0.01f32, 0.02, 0.003, 0.5, 0.07];
    let token = [0.5f32, 2.0, 0.125];
    let bias = [0.25f32, -1.0, 0.0, 3.0, -0.5];
    let xt = NpuTensor::from_slice(&dev, &x, &[m, k]).expect("x");
    let wt = NpuTensor::from_slice(&dev, &w, &[n, k]).expect("w");
    let st = NpuTensor::from_slice(&dev, &scales, &[n]).expect("scale");
    let pt = NpuTensor::from_slice(&dev, &token, &[m]).expect("pertoken");
    let bt = NpuTensor::from_slice(&dev, &bias, &[n]).expect("bias");
    let want = |with_bias: bool| -> Vec<f32> {
        (0..m)
            .flat_map(|r| (0..n).map(move |c| (r, c)))
            .map(|(r, c)| {
                let acc: i32 = (0..k).map(|j| x[r * k + j] as i32 * w[c * k + j] as i32).sum();
                acc as f32 * scales[c] * token[r] + if with_bias { bias[c] } else { 0.0 }
            })
            .collect()
    };
    for (out_dtype, tol) in [(DType::F16, 1e-3), (DType::BF16, 8e-3)] {
        for with_bias in [false, true] {
            let b = with_bias.then_some(&bt);
            let y = quant_matmul_per_token(&xt, &wt, &st, &pt, b, true, out_dtype).expect("per-token matmul");
            let got: Vec<f32> = match out_dtype {
                DType::F16 => y.to_vec::<f16>().expect("y").iter().map(|v| v.to_f32()).collect(),
                _ => y.to_vec::<half::bf16>().expect("y").iter().map(|v| v.to_f32()).collect(),
            };
            common::assert_close(&got, &want(with_bias), tol, &format!("per-token {out_dtype:?} bias={with_bias}"));
        }
    }
    // The per-token scale must be f32 (m); an int32 bias is not the per-token form.
    let bad_token = NpuTensor::from_slice(&dev, &token[..2], &[2]).expect("short pertoken");
    assert!(quant_matmul_per_token(&xt, &wt, &st, &bad_token, None, true, DType::F16).is_err());
    let int_bias = NpuTensor::from_slice(&dev, &[1i32; 5], &[n]).expect("int bias");
    assert!(quant_matmul_per_token(&xt, &wt, &st, &pt, Some(&int_bias), true, DType::F16).is_err());
    assert!(quant_matmul_per_token(&xt, &wt, &st, &pt, None, true, DType::F32).is_err(), "no f32 output");
}

#[test]
fn weight_quant_matmul_into_a_column_block() {
    let dev = common::device();
    let (m, k, n) = (2, 32, 3);
    let x: Vec<f32> = (0..m * k).map(|i| ((i as f32) * 0.37).cos()).collect();
    let w: Vec<i8> = (0..k * n).map(|i| ((i * 13) % 29) as i8 - 14).collect(); // (k, n)
    let sc = [0.02f32, 0.01, 0.04];
    let xt = NpuTensor::from_slice(&dev, &h(&x), &[m, k]).expect("x");
    let wt = NpuTensor::from_slice(&dev, &w, &[k, n]).expect("w");
    let st = NpuTensor::from_slice(&dev, &h(&sc), &[n]).expect("scale");
    // Columns 2..5 of a (m, 7) output; the others keep their values.
    let wide = NpuTensor::from_slice(&dev, &h(&[9.0; 14]), &[m, 7]).expect("out");
    let block = wide.narrow(1, 2, n).expect("block");
    weight_quant_matmul_into(&xt, &wt, &st, None, None, 0, &block).expect("into block");
    let got: Vec<f32> = wide.to_vec::<f16>().expect("out").iter().map(|v| v.to_f32()).collect();
    let xr: Vec<f32> = h(&x).iter().map(|v| v.to_f32()).collect();
    for r in 0..m {
        for c in 0..7 {
            let want = if (2..5).contains(&c) {
                let j = c - 2;
                (0..k).map(|i| xr[r * k + i] * w[i * n + j] as f32 * h(&sc)[j].to_f32()).sum::<f32>()
            } else {
                9.0
            };
            let g = got[r * 7 + c];
            assert!((g - want).abs() <= 5e-3 * (1.0 + want.abs()), "[{r}, {c}]: got {g}, want {want}");
        }
    }
    let wrong = wide.narrow(1, 0, 2).expect("too narrow");
    assert!(weight_quant_matmul_into(&xt, &wt, &st, None, None, 0, &wrong).is_err());
}

#[test]
fn mul_broadcasts_and_mixes_float_dtypes() {
    let dev = common::device();
    let a: Vec<f32> = (0..24).map(|i| i as f32 * 0.5 - 3.0).collect();
    let b = [2.0f32, -1.0, 0.25];
    let at = NpuTensor::from_slice(&dev, &a, &[2, 3, 4]).expect("a");
    let bt = NpuTensor::from_slice(&dev, &b, &[3, 1]).expect("b");
    let y = mul(&at, &bt).expect("mul");
    assert_eq!(y.shape(), &[2, 3, 4]);
    let want: Vec<f32> = (0..24).map(|i| a[i] * b[(i / 4) % 3]).collect();
    assert_eq!(y.to_vec::<f32>().expect("y"), want);
    // f16 times an f32 broadcast row, output in the first operand's dtype; a strided (transposed) operand.
    let ah = NpuTensor::from_slice(&dev, &h(&a[..12]), &[4, 3]).expect("ah").transpose(0, 1).expect("view");
    let row = NpuTensor::from_slice(&dev, &[1.0f32, 2.0, 3.0, 4.0], &[4]).expect("row");
    let y = mul(&ah, &row).expect("mixed mul");
    assert_eq!((y.dtype(), y.shape()), (DType::F16, &[3usize, 4][..]));
    let got: Vec<f32> = y.to_vec::<f16>().expect("y").iter().map(|v| v.to_f32()).collect();
    let want: Vec<f32> = (0..12).map(|i| a[(i % 4) * 3 + i / 4] * (1 + i % 4) as f32).collect();
    assert_eq!(got, want);
    let bad = NpuTensor::from_slice(&dev, &[1.0f32; 5], &[5]).expect("bad");
    assert!(mul(&at, &bad).is_err(), "shapes that do not broadcast");
}
