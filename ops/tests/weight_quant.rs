//! W8A16 linear (`WeightQuantLinear`) against its candle-ops reference: every float dtype,
//! decode and prefill row counts, ragged K and N, strided input, with and without offset
//! and bias, on every kernel path this CPU runs; plus the RTN quantizer's error bound.

use candle_ascend_ops::testing::{FLOAT_DTYPES, Rng, Tolerance, assert_close, assert_close_sum, case_id};
use candle_ascend_ops::weight_quant::KernelPath;
use candle_ascend_ops::{WeightQuantLinear, rtn_quantize_weight, weight_quant_linear_reference};
use candle_core::{DType, Result, Tensor};

fn random_int8(rng: &mut Rng, len: usize) -> Vec<i8> {
    (0..len).map(|_| (rng.below(255) as i32 - 127) as i8).collect()
}

fn channel_params(rng: &mut Rng, n: usize, with_offset: bool) -> (Vec<f32>, Option<Vec<f32>>) {
    let scale: Vec<f32> = (0..n).map(|_| rng.uniform(0.001, 0.01)).collect();
    let offset = with_offset.then(|| (0..n).map(|_| rng.uniform(-8.0, 8.0)).collect());
    (scale, offset)
}

#[test]
fn matches_reference_over_dtypes_shapes_offsets_and_paths() -> Result<()> {
    let mut rng = Rng::fresh("weight_quant_linear");
    let paths = KernelPath::available();
    for &(k, n) in &[(72usize, 1usize), (576, 70), (1000, 130), (72, 130), (1000, 1)] {
        for with_offset in [false, true] {
            for with_bias in [false, true] {
                let w_q = random_int8(&mut rng, n * k);
                let (scale, offset) = channel_params(&mut rng, n, with_offset);
                let bias = if with_bias { Some(rng.tensor(&[n], -1.0, 1.0, DType::F32)?) } else { None };
                let layer = WeightQuantLinear::new(&w_q, (n, k), &scale, offset.as_deref(), bias.as_ref())?;
                for dtype in FLOAT_DTYPES {
                    for m in [1usize, 4, 33] {
                        let x = rng.tensor(&[m, k], -1.0, 1.0, dtype)?;
                        let want =
                            weight_quant_linear_reference(&x, &w_q, (n, k), &scale, offset.as_deref(), bias.as_ref())?;
                        for &path in &paths {
                            let got = layer.forward_with(&x, path)?;
                            assert_eq!(got.dtype(), dtype);
                            let extra = format!("n={n},offset={with_offset},bias={with_bias},path={path:?}");
                            let id = case_id("WEIGHT_QUANT_LINEAR", dtype, &[m, k], &extra);
                            let terms = abs_terms(&x, &w_q, (n, k), &scale, offset.as_deref())?;
                            assert_close_sum(&id, &got, &want, &terms, Tolerance::for_dtype(dtype).times(4.0))?;
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

#[test]
fn strided_and_batched_inputs() -> Result<()> {
    let mut rng = Rng::fresh("weight_quant_linear_strided");
    let (k, n) = (576, 70);
    let w_q = random_int8(&mut rng, n * k);
    let (scale, offset) = channel_params(&mut rng, n, true);
    let bias = rng.tensor(&[n], -1.0, 1.0, DType::F32)?;
    let layer = WeightQuantLinear::new(&w_q, (n, k), &scale, offset.as_deref(), Some(&bias))?;
    for dtype in FLOAT_DTYPES {
        // A narrow of a wider activation: outer strides differ from K.
        let wide = rng.tensor(&[3, 11, 700], -1.0, 1.0, dtype)?;
        let x = wide.narrow(2, 50, k)?;
        let want = weight_quant_linear_reference(&x, &w_q, (n, k), &scale, offset.as_deref(), Some(&bias))?;
        for path in KernelPath::available() {
            let got = layer.forward_with(&x, path)?;
            assert_eq!(got.dims(), &[3, 11, n]);
            let id = case_id("WEIGHT_QUANT_LINEAR", dtype, &[3, 11, k], &format!("strided,path={path:?}"));
            let terms = abs_terms(&x, &w_q, (n, k), &scale, offset.as_deref())?;
            assert_close_sum(&id, &got, &want, &terms, Tolerance::for_dtype(dtype).times(4.0))?;
        }
    }
    Ok(())
}

#[test]
fn simd_and_portable_paths_agree_closely() -> Result<()> {
    let mut rng = Rng::fresh("weight_quant_linear_paths");
    let (m, k, n) = (40, 1000, 130);
    let w_q = random_int8(&mut rng, n * k);
    let (scale, offset) = channel_params(&mut rng, n, true);
    let layer = WeightQuantLinear::new(&w_q, (n, k), &scale, offset.as_deref(), None)?;
    let x = rng.tensor(&[m, k], -1.0, 1.0, DType::F32)?;
    let portable = layer.forward_with(&x, KernelPath::Portable)?;
    let auto = layer.forward(&x)?;
    assert_close("WEIGHT_QUANT_LINEAR(portable vs auto)", &auto, &portable, Tolerance::for_dtype(DType::F32))?;
    Ok(())
}

#[test]
fn a_row_gives_identical_results_alone_or_in_a_batch() -> Result<()> {
    let mut rng = Rng::seeded(3);
    let (k, n) = (700, 70);
    let w_q = random_int8(&mut rng, n * k);
    let (scale, offset) = channel_params(&mut rng, n, true);
    let layer = WeightQuantLinear::new(&w_q, (n, k), &scale, offset.as_deref(), None)?;
    let x = rng.tensor(&[40, k], -1.0, 1.0, DType::F32)?;
    let batched = layer.forward(&x)?.to_vec2::<f32>()?;
    for r in [0usize, 7, 39] {
        let alone = layer.forward(&x.narrow(0, r, 1)?)?.to_vec2::<f32>()?;
        assert_eq!(alone[0], batched[r], "row {r}");
    }
    Ok(())
}

#[test]
fn rtn_round_trip_is_within_half_a_step() -> Result<()> {
    let mut rng = Rng::fresh("rtn_quantize_weight");
    let (n, k) = (70, 300);
    let mut w = rng.tensor(&[n, k], -0.5, 0.5, DType::F32)?.to_vec2::<f32>()?;
    w[3].iter_mut().for_each(|v| *v = 0.0); // an all-zero channel
    w[5][7] = 40.0; // an outlier channel
    let wt = Tensor::new(w.clone(), &candle_core::Device::Cpu)?;
    let (q, s) = rtn_quantize_weight(&wt)?;
    assert_eq!((q.len(), s.len()), (n * k, n));
    assert_eq!(s[3], 0.0);
    assert!(q.iter().all(|&v| v != i8::MIN), "symmetric range is [-127, 127]");
    for (r, row) in w.iter().enumerate() {
        let max = row.iter().fold(0f32, |a, v| a.max(v.abs()));
        assert!((s[r] - max / 127.0).abs() <= f32::EPSILON * s[r]);
        for (c, &v) in row.iter().enumerate() {
            let deq = f32::from(q[r * k + c]) * s[r];
            let err = (v - deq).abs();
            assert!(err <= s[r] * 0.5 * (1.0 + 1e-5) + 1e-12, "W[{r},{c}] = {v}: dequantized {deq}, step {}", s[r]);
        }
    }
    // The float-weight constructor equals quantize-then-new.
    let x = rng.tensor(&[4, k], -1.0, 1.0, DType::F32)?;
    let a = WeightQuantLinear::from_float(&wt, None)?.forward(&x)?;
    let b = weight_quant_linear_reference(&x, &q, (n, k), &s, None, None)?;
    assert_close("WEIGHT_QUANT_LINEAR(from_float)", &a, &b, Tolerance::for_dtype(DType::F32).times(4.0))?;
    Ok(())
}

#[test]
fn bad_inputs_are_errors() -> Result<()> {
    let w_q = vec![1i8; 6 * 8];
    let scale = vec![0.1f32; 6];
    assert!(WeightQuantLinear::new(&w_q, (6, 7), &scale, None, None).is_err());
    assert!(WeightQuantLinear::new(&w_q, (6, 8), &scale[..5], None, None).is_err());
    assert!(WeightQuantLinear::new(&w_q, (6, 8), &scale, Some(&[0.0; 4]), None).is_err());
    assert!(WeightQuantLinear::new(&w_q, (6, 8), &[f32::NAN; 6], None, None).is_err());
    let bad_bias = Tensor::zeros(5, DType::F32, &candle_core::Device::Cpu)?;
    assert!(WeightQuantLinear::new(&w_q, (6, 8), &scale, None, Some(&bad_bias)).is_err());
    let layer = WeightQuantLinear::new(&w_q, (6, 8), &scale, None, None)?;
    let x = Tensor::zeros((2, 9), DType::F32, &candle_core::Device::Cpu)?;
    assert!(layer.forward(&x).is_err());
    let nonfinite = Tensor::new(&[[1f32, f32::INFINITY]], &candle_core::Device::Cpu)?;
    assert!(rtn_quantize_weight(&nonfinite).is_err());
    assert!(rtn_quantize_weight(&Tensor::zeros(3, DType::F32, &candle_core::Device::Cpu)?).is_err());
    Ok(())
}

/// `sum_k |x_k| |(w_q + o) s|` per output: the scale of a dot product's rounding error.
fn abs_terms(x: &Tensor, w_q: &[i8], (n, k): (usize, usize), scale: &[f32], offset: Option<&[f32]>) -> Result<Tensor> {
    let w: Vec<f32> =
        (0..n * k).map(|i| ((w_q[i] as f32 + offset.map_or(0.0, |o| o[i / k])) * scale[i / k]).abs()).collect();
    let w = Tensor::from_vec(w, (n, k), &candle_core::Device::Cpu)?;
    candle_ascend_ops::linear_reference(&x.abs()?, &w, None)
}

#[test]
fn dequantized_rows_are_the_weight_rows() -> Result<()> {
    let mut rng = Rng::fresh("weight_quant dequantize_rows");
    for (n, k, with_offset) in [(70, 33, false), (32, 576, true), (5, 1, true)] {
        let w_q = random_int8(&mut rng, n * k);
        let (scale, offset) = channel_params(&mut rng, n, with_offset);
        let layer = WeightQuantLinear::new(&w_q, (n, k), &scale, offset.as_deref(), None)?;
        let ids: Vec<u32> = (0..9).map(|_| rng.below(n) as u32).chain([0, n as u32 - 1]).collect();
        let rows = layer.dequantize_rows(&ids)?;
        for (i, &r) in ids.iter().enumerate() {
            let r = r as usize;
            for kk in 0..k {
                let o = offset.as_ref().map_or(0.0, |o| o[r]);
                let want = (w_q[r * k + kk] as f32 + o) * scale[r];
                let got = rows[i * k + kk];
                assert!((got - want).abs() <= 1e-6 * (1.0 + want.abs()), "[{n},{k}] row {r} col {kk}: {got} vs {want}");
            }
        }
        let err = layer.dequantize_rows(&[n as u32]).unwrap_err().to_string();
        assert!(err.contains("out of range"), "{err}");
    }
    Ok(())
}
