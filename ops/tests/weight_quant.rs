//! W8A16 linear (`WeightQuantLinear`) against its candle-ops reference: every float dtype,
//! decode and prefill row counts, ragged K and N, strided input, with and without offset
//! and bias, on every kernel path this CPU runs and in both activation forms (f32, and int16 split
//! into bytes for the int8 kernels); plus the RTN quantizer's error bound.

use candle_ascend_ops::testing::{FLOAT_DTYPES, Rng, Tolerance, assert_close, assert_close_sum, case_id};
use candle_ascend_ops::weight_quant::KernelPath;
use candle_ascend_ops::{Activations, WeightQuantLinear, rtn_quantize_weight, weight_quant_linear_reference};
use candle_core::{DType, Result, Tensor};

fn random_int8(rng: &mut Rng, len: usize) -> Vec<i8> {
    (0..len).map(|_| (rng.below(255) as i32 - 127) as i8).collect()
}

/// The activation forms a weight can use: int16 only for symmetric weights.
fn forms(with_offset: bool) -> Vec<Activations> {
    if with_offset { vec![Activations::Float] } else { vec![Activations::Float, Activations::Int16] }
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
                for form in forms(with_offset) {
                    let layer = WeightQuantLinear::with_activations(
                        &w_q,
                        (n, k),
                        &scale,
                        offset.as_deref(),
                        bias.as_ref(),
                        form,
                    )?;
                    for dtype in FLOAT_DTYPES {
                        // 1-8 rows: VNNI decode kernel of the int16 form; 9, 16: one AMX block;
                        // 33: three blocks, the last ragged.
                        for m in [1usize, 4, 9, 16, 33] {
                            let x = rng.tensor(&[m, k], -1.0, 1.0, dtype)?;
                            let want = weight_quant_linear_reference(
                                &x,
                                &w_q,
                                (n, k),
                                &scale,
                                offset.as_deref(),
                                bias.as_ref(),
                            )?;
                            for &path in &paths {
                                let got = layer.forward_with(&x, path)?;
                                assert_eq!(got.dtype(), dtype);
                                let extra =
                                    format!("n={n},offset={with_offset},bias={with_bias},path={path:?},{form:?}");
                                let id = case_id("WEIGHT_QUANT_LINEAR", dtype, &[m, k], &extra);
                                let terms = abs_terms(&x, &w_q, (n, k), &scale, offset.as_deref())?;
                                assert_close_sum(&id, &got, &want, &terms, Tolerance::for_dtype(dtype).times(4.0))?;
                            }
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
    for offset in [offset, None] {
        for form in forms(offset.is_some()) {
            let layer =
                WeightQuantLinear::with_activations(&w_q, (n, k), &scale, offset.as_deref(), Some(&bias), form)?;
            for dtype in FLOAT_DTYPES {
                // A narrow of a wider activation: outer strides differ from K.
                let wide = rng.tensor(&[3, 11, 700], -1.0, 1.0, dtype)?;
                let x = wide.narrow(2, 50, k)?;
                let want = weight_quant_linear_reference(&x, &w_q, (n, k), &scale, offset.as_deref(), Some(&bias))?;
                for path in KernelPath::available() {
                    let got = layer.forward_with(&x, path)?;
                    assert_eq!(got.dims(), &[3, 11, n]);
                    let extra = format!("strided,path={path:?},{form:?}");
                    let id = case_id("WEIGHT_QUANT_LINEAR", dtype, &[3, 11, k], &extra);
                    let terms = abs_terms(&x, &w_q, (n, k), &scale, offset.as_deref())?;
                    assert_close_sum(&id, &got, &want, &terms, Tolerance::for_dtype(dtype).times(4.0))?;
                }
            }
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
    let x = rng.tensor(&[40, k], -1.0, 1.0, DType::F32)?;
    for offset in [offset, None] {
        for form in forms(offset.is_some()) {
            let layer = WeightQuantLinear::with_activations(&w_q, (n, k), &scale, offset.as_deref(), None, form)?;
            let batched = layer.forward(&x)?.to_vec2::<f32>()?;
            for r in [0usize, 7, 39] {
                let alone = layer.forward(&x.narrow(0, r, 1)?)?.to_vec2::<f32>()?;
                assert_eq!(alone[0], batched[r], "row {r}, {form:?}");
            }
        }
    }
    Ok(())
}

/// The int16 form sums exactly in integers: every kernel (AMX, VNNI, portable) and every batch
/// split gives bit-identical outputs, and each output is within the activation rounding bound
/// `sum_k |w[n, k] s[n]| * (max|x[t]| / 32767) / 2` of the f64 result (plus f32 epilogue rounding),
/// including rows with a wide dynamic range, an all-zero row, and a NaN row (NaN out).
#[test]
fn int16_activations_are_exact_up_to_their_rounding() -> Result<()> {
    let mut rng = Rng::fresh("weight_quant int16 activations");
    for &(k, n) in &[(40usize, 33usize), (576, 70), (1500, 130)] {
        let w_q = random_int8(&mut rng, n * k);
        let (scale, _) = channel_params(&mut rng, n, false);
        let bias: Vec<f32> = (0..n).map(|_| rng.uniform(-1.0, 1.0)).collect();
        let bias_t = Tensor::new(bias.as_slice(), &candle_core::Device::Cpu)?;
        let layer = WeightQuantLinear::with_activations(&w_q, (n, k), &scale, None, Some(&bias_t), Activations::Int16)?;
        let m = 20;
        let mut x: Vec<f32> = (0..m * k).map(|_| rng.uniform(-1.0, 1.0)).collect();
        for v in &mut x[k..2 * k] {
            *v *= 1e-6; // row 1: tiny values
        }
        x[2 * k] = 3e4; // row 2: one huge value among values near 1
        x[3 * k..4 * k].fill(0.0); // row 3: all zero
        x[4 * k + 5] = f32::NAN; // row 4: a NaN
        let xt = Tensor::from_vec(x.clone(), (m, k), &candle_core::Device::Cpu)?;
        let portable = layer.forward_with(&xt, KernelPath::Portable)?.to_vec2::<f32>()?;
        for path in KernelPath::available() {
            let got = layer.forward_with(&xt, path)?.to_vec2::<f32>()?;
            let halves =
                [layer.forward_with(&xt.narrow(0, 0, 9)?, path)?, layer.forward_with(&xt.narrow(0, 9, 11)?, path)?];
            let split = Tensor::cat(&halves, 0)?.to_vec2::<f32>()?;
            for t in 0..m {
                let same = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same(&got[t], &portable[t]), "[{n},{k}] row {t}: {path:?} differs from portable");
                assert!(same(&got[t], &split[t]), "[{n},{k}] row {t}: {path:?} depends on the batch split");
            }
        }
        for t in 0..m {
            let row = &x[t * k..(t + 1) * k];
            if t == 4 {
                assert!(portable[t].iter().all(|v| v.is_nan()), "a NaN input row gives NaN outputs");
                continue;
            }
            let step = row.iter().fold(0f32, |a, v| a.max(v.abs())) as f64 / 32767.0;
            for c in 0..n {
                let w = &w_q[c * k..(c + 1) * k];
                let exact: f64 = row.iter().zip(w).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() * scale[c] as f64
                    + bias[c] as f64;
                let wabs: f64 = w.iter().map(|&b| (b as f64).abs()).sum::<f64>() * scale[c] as f64;
                let bound = wabs * step / 2.0 + 4.0 * f32::EPSILON as f64 * (exact.abs() + wabs * step * 32767.0 + 1.0);
                let got = portable[t][c] as f64;
                assert!((got - exact).abs() <= bound, "[{n},{k}] row {t} ch {c}: {got} vs {exact} (bound {bound:.3e})");
            }
        }
    }
    let w_q = random_int8(&mut rng, 8 * 32);
    let err = WeightQuantLinear::with_activations(&w_q, (8, 32), &[1e-3; 8], Some(&[0.5; 8]), None, Activations::Int16)
        .unwrap_err()
        .to_string();
    assert!(err.contains("symmetric"), "{err}");
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
    // The float-weight constructor equals quantize-then-new, bit for bit (in this machine's default
    // activation form: int16 where AMX is granted, whose rounding bound is checked in
    // `int16_activations_are_exact_up_to_their_rounding`).
    let x = rng.tensor(&[4, k], -1.0, 1.0, DType::F32)?;
    let a = WeightQuantLinear::from_float(&wt, None)?.forward(&x)?.to_vec2::<f32>()?;
    let b = WeightQuantLinear::new(&q, (n, k), &s, None, None)?.forward(&x)?.to_vec2::<f32>()?;
    assert_eq!(a, b, "from_float differs from rtn_quantize_weight + new");
    // The quantized weights in the f32-activation form against the f32 reference.
    let float_form = WeightQuantLinear::with_activations(&q, (n, k), &s, None, None, Activations::Float)?;
    let b = weight_quant_linear_reference(&x, &q, (n, k), &s, None, None)?;
    assert_close(
        "WEIGHT_QUANT_LINEAR(rtn, f32 activations)",
        &float_form.forward(&x)?,
        &b,
        Tolerance::for_dtype(DType::F32).times(4.0),
    )?;
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
        for form in forms(with_offset) {
            let layer = WeightQuantLinear::with_activations(&w_q, (n, k), &scale, offset.as_deref(), None, form)?;
            let ids: Vec<u32> = (0..9).map(|_| rng.below(n) as u32).chain([0, n as u32 - 1]).collect();
            let rows = layer.dequantize_rows(&ids)?;
            for (i, &r) in ids.iter().enumerate() {
                let r = r as usize;
                for kk in 0..k {
                    let o = offset.as_ref().map_or(0.0, |o| o[r]);
                    let want = (w_q[r * k + kk] as f32 + o) * scale[r];
                    let got = rows[i * k + kk];
                    assert!(
                        (got - want).abs() <= 1e-6 * (1.0 + want.abs()),
                        "[{n},{k}] row {r} col {kk}: {got} vs {want}"
                    );
                }
            }
            let err = layer.dequantize_rows(&[n as u32]).unwrap_err().to_string();
            assert!(err.contains("out of range"), "{err}");
        }
    }
    Ok(())
}
