//! Tests of the int8 ops: exact integer accumulators on every kernel available here, the
//! quantize rounding/saturation policy, and float outputs through `forward` against the
//! candle-op references.

use super::*;
use crate::testing::{FLOAT_DTYPES, Rng, Tolerance, assert_close, case_id};

fn random_i8(rng: &mut Rng, len: usize) -> Vec<i8> {
    (0..len).map(|_| rng.next_u64() as i8).collect()
}

fn random_layer(rng: &mut Rng, n: usize, k: usize) -> (Vec<i8>, Vec<i32>, Vec<f32>) {
    let wq = random_i8(rng, n * k);
    let bias: Vec<i32> = (0..n).map(|_| (rng.next_u64() % 200_001) as i32 - 100_000).collect();
    let deq: Vec<f32> = (0..n).map(|_| rng.uniform(1e-5, 1e-3)).collect();
    (wq, bias, deq)
}

fn check_exact(kernel: QuantKernel, xq: &Int8Matrix, wq: &[i8], bias: &[i32], case: &str) -> Result<()> {
    let layer = QuantLinear::with_kernel(wq, bias, &vec![1.0; bias.len()], kernel)?;
    let got = layer.forward_accumulators(xq)?;
    let want = quant_accumulators_reference(&xq.data, xq.rows, xq.cols, wq, bias);
    for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
        if g as i64 != w {
            bail!("{case}: kernel {} accumulator {i} = {g}, reference {w}", kernel.name());
        }
    }
    Ok(())
}

#[test]
fn accumulators_are_exact_on_every_kernel() -> Result<()> {
    let mut rng = Rng::fresh("quant accumulators");
    let kernels = QuantKernel::available();
    eprintln!("kernels available: {:?}", kernels);
    for kernel in kernels {
        // K = 40 and 576 pad to an odd number of 64-deep blocks (1 and 9): the 16-row AMX
        // tile's even/odd accumulator split has a lone last block there.
        for m in [1, 3, 16, 33, 100] {
            for k in [40, 72, 200, 576, 576 + 8, 1500] {
                for n in [1, 70, 130] {
                    let xq = Int8Matrix { data: random_i8(&mut rng, m * k), rows: m, cols: k };
                    let (wq, bias, _) = random_layer(&mut rng, n, k);
                    check_exact(kernel, &xq, &wq, &bias, &format!("QUANT_ACC(m={m},k={k},n={n})"))?;
                }
            }
        }
    }
    Ok(())
}

#[test]
fn accumulators_at_extreme_values() -> Result<()> {
    let (m, k, n) = (35, 1400, 33);
    for kernel in QuantKernel::available() {
        for (xv, wv) in [(-128i8, -128i8), (-128, 127), (127, -128), (127, 127), (0, -128), (-128, 0)] {
            let xq = Int8Matrix { data: vec![xv; m * k], rows: m, cols: k };
            let wq = vec![wv; n * k];
            for bias in [0, i32::MAX / 4, i32::MIN / 4] {
                check_exact(
                    kernel,
                    &xq,
                    &wq,
                    &vec![bias; n],
                    &format!("QUANT_ACC_EXTREME(x={xv},w={wv},bias={bias})"),
                )?;
            }
        }
        // Decode-sized call too (VNNI GEMV path under `new`).
        let xq = Int8Matrix { data: vec![-128; k], rows: 1, cols: k };
        check_exact(kernel, &xq, &vec![127; n * k], &vec![7; n], "QUANT_ACC_EXTREME(m=1)")?;
    }
    Ok(())
}

#[test]
fn quantize_rounds_half_away_and_saturates() -> Result<()> {
    let cases: [(f32, i8); 18] = [
        (0.5, 1),
        (-0.5, -1),
        (1.5, 2),
        (2.5, 3),
        (-2.5, -3),
        (0.499_999_97, 0),
        (-0.499_999_97, 0),
        (126.5, 127),
        (127.49, 127),
        (127.5, 127),
        (128.0, 127),
        (-128.49, -128),
        (-128.5, -128),
        (-1e9, -128),
        (1e9, 127),
        (f32::INFINITY, 127),
        (f32::NEG_INFINITY, -128),
        (f32::NAN, 0),
    ];
    let x: Vec<f32> = cases.iter().map(|c| c.0).collect();
    let t = Tensor::from_vec(x, (1, cases.len()), &Device::Cpu)?;
    let q = quantize(&t, 1.0, 0.0)?;
    for (i, &(v, want)) in cases.iter().enumerate() {
        if q.data[i] != want {
            bail!("QUANTIZE({v}) = {}, expected {want}", q.data[i]);
        }
    }
    // Offset and scale: x * 2 + 3.
    let t = Tensor::new(&[[-0.25f32, 0.25, -1.75, 70.0, -70.0]], &Device::Cpu)?;
    let q = quantize(&t, 2.0, 3.0)?;
    if q.data != [3, 4, -1, 127, -128] {
        bail!("QUANTIZE(scale=2,offset=3) = {:?}", q.data);
    }
    Ok(())
}

#[test]
fn quantize_matches_reference() -> Result<()> {
    let mut rng = Rng::fresh("quantize");
    for dtype in FLOAT_DTYPES {
        for shape in [&[1usize, 7][..], &[3, 5, 200], &[2, 64, 333]] {
            let x = rng.tensor(shape, -4.0, 4.0, dtype)?;
            let (scale, offset) = (rng.uniform(10.0, 60.0), rng.uniform(-20.0, 20.0).round());
            let got = quantize(&x, scale, offset)?;
            let want = quantize_reference(&x, scale, offset)?.flatten_all()?.to_vec1::<f32>()?;
            let got_f: Vec<f32> = got.data.iter().map(|&v| v as f32).collect();
            if got_f != want || got.rows * got.cols != want.len() {
                bail!("{}: quantize differs from the reference", case_id("QUANTIZE", dtype, shape, ""));
            }
        }
        // Strided: a narrow of a wider activation.
        let wide = rng.tensor(&[4, 300], -2.0, 2.0, dtype)?;
        let x = wide.narrow(1, 17, 250)?;
        let got: Vec<f32> = quantize(&x, 50.0, 1.0)?.data.iter().map(|&v| v as f32).collect();
        let want = quantize_reference(&x, 50.0, 1.0)?.flatten_all()?.to_vec1::<f32>()?;
        if got != want {
            bail!("{}: quantize differs from the reference", case_id("QUANTIZE", dtype, &[4, 250], "strided"));
        }
    }
    Ok(())
}

/// forward (fused quantize + GEMM + epilogue) against quantize_reference + quant_matmul_reference.
#[test]
fn forward_matches_reference() -> Result<()> {
    let mut rng = Rng::fresh("quant_linear forward");
    let (scale, offset) = (40.0f32, -3.0f32);
    for kernel in QuantKernel::available() {
        for dtype in FLOAT_DTYPES {
            for (outer, k, n) in [(&[1usize, 1][..], 576, 70), (&[4], 200, 33), (&[2, 20], 584, 130), (&[100], 72, 1)] {
                let (wq, bias, deq) = random_layer(&mut rng, n, k);
                let layer = QuantLinear::with_kernel(&wq, &bias, &deq, kernel)?;
                let mut shape = outer.to_vec();
                shape.push(k);
                let x = rng.tensor(&shape, -3.0, 3.0, dtype)?;
                let got = layer.forward(&x, scale, offset)?;
                if got.dtype() != dtype {
                    bail!("forward returned {:?} for {:?} input", got.dtype(), dtype);
                }
                let want = quant_matmul_reference(&quantize_reference(&x, scale, offset)?, &wq, &bias, &deq)?;
                let id = case_id("QUANT_LINEAR", dtype, &shape, &format!("n={n},kernel={}", kernel.name()));
                assert_close(&id, &got, &want, Tolerance::for_dtype(dtype).times(2.0))?;
            }
            // Strided input.
            let (wq, bias, deq) = random_layer(&mut rng, 48, 256);
            let layer = QuantLinear::with_kernel(&wq, &bias, &deq, kernel)?;
            let wide = rng.tensor(&[2, 25, 300], -3.0, 3.0, dtype)?;
            let x = wide.narrow(2, 20, 256)?;
            let want = quant_matmul_reference(&quantize_reference(&x, scale, offset)?, &wq, &bias, &deq)?;
            let id = case_id("QUANT_LINEAR", dtype, &[2, 25, 256], &format!("strided,kernel={}", kernel.name()));
            assert_close(&id, &layer.forward(&x, scale, offset)?, &want, Tolerance::for_dtype(dtype).times(2.0))?;
        }
    }
    Ok(())
}

#[test]
fn forward_quantized_matches_reference_and_default_kernel() -> Result<()> {
    let mut rng = Rng::fresh("quant_linear forward_quantized");
    let (m, k, n) = (37, 300, 90);
    let (wq, bias, deq) = random_layer(&mut rng, n, k);
    let xq = Int8Matrix { data: random_i8(&mut rng, m * k), rows: m, cols: k };
    let xt = Tensor::from_vec(xq.data.iter().map(|&v| v as f32).collect::<Vec<_>>(), (m, k), &Device::Cpu)?;
    let want = quant_matmul_reference(&xt, &wq, &bias, &deq)?;
    let layer = QuantLinear::new(&wq, &bias, &deq)?;
    eprintln!("default kernel: {} (decode: {})", layer.kernel_name(), layer.kernel_for_rows(1).name());
    let got = Tensor::from_vec(layer.forward_quantized(&xq)?, (m, n), &Device::Cpu)?;
    assert_close("QUANT_LINEAR_Q(m=37,k=300,n=90)", &got, &want, Tolerance::for_dtype(DType::F32))
}

/// The default layer changes kernel above SMALL_DECODE_ROWS (AMX where granted): every row of a batch on
/// either side of the switch equals the same row run alone, bit for bit (integer sums are exact on every kernel).
#[test]
fn rows_are_bit_identical_alone_and_in_batches_across_the_kernel_switch() -> Result<()> {
    let mut rng = Rng::fresh("quant_linear batch invariance");
    let (k, n) = (584, 70);
    let (wq, bias, deq) = random_layer(&mut rng, n, k);
    let layer = QuantLinear::new(&wq, &bias, &deq)?;
    for m in [SMALL_DECODE_ROWS, SMALL_DECODE_ROWS + 1, 16, 40] {
        eprintln!("m={m}: kernel {}", layer.kernel_for_rows(m).name());
        let xq = Int8Matrix { data: random_i8(&mut rng, m * k), rows: m, cols: k };
        let batched = layer.forward_quantized(&xq)?;
        for r in 0..m {
            let row = Int8Matrix { data: xq.data[r * k..(r + 1) * k].to_vec(), rows: 1, cols: k };
            let alone = layer.forward_quantized(&row)?;
            if alone.iter().map(|v| v.to_bits()).ne(batched[r * n..(r + 1) * n].iter().map(|v| v.to_bits())) {
                bail!("m={m}: row {r} differs between a batch and a call of its own");
            }
        }
    }
    Ok(())
}

#[test]
fn bad_input_is_an_error() -> Result<()> {
    let wq = vec![1i8; 6 * 10];
    if QuantLinear::new(&wq, &[0; 7], &[1.0; 7]).is_ok() {
        bail!("wq not divisible by N was accepted");
    }
    if QuantLinear::new(&wq, &[0; 6], &[1.0; 5]).is_ok() {
        bail!("deq_scale of the wrong length was accepted");
    }
    let layer = QuantLinear::new(&wq, &[0; 6], &[1.0; 6])?;
    let x = Tensor::zeros((2, 11), DType::F32, &Device::Cpu)?;
    if layer.forward(&x, 1.0, 0.0).is_ok() {
        bail!("K mismatch was accepted");
    }
    if layer.forward(&x.to_dtype(DType::U32)?.narrow(1, 0, 10)?, 1.0, 0.0).is_ok() {
        bail!("an integer input was accepted");
    }
    let xq = Int8Matrix { data: vec![0; 9], rows: 1, cols: 9 };
    if layer.forward_accumulators(&xq).is_ok() {
        bail!("quantized K mismatch was accepted");
    }
    Ok(())
}

/// Per-token dynamic quantization against its definition computed here in f64: each row
/// quantized with its own `absmax / 127`, exact integer products, then both scales. Rows of
/// very different magnitudes (token outliers), an all-zero row, every kernel, f32/f16/bf16.
#[test]
fn per_token_forward_matches_its_definition() -> Result<()> {
    let mut rng = Rng::fresh("quant per token");
    for kernel in QuantKernel::available() {
        for dtype in FLOAT_DTYPES {
            for ((m, k, n), rotate) in
                [(1, 200, 70), (7, 576, 33), (40, 1536, 64)].into_iter().flat_map(|s| [(s, false), (s, true)])
            {
                let block = if rotate { crate::quant::hadamard_block(k, 512) } else { 0 };
                let op = if rotate {
                    format!("quant_linear_per_token_hadamard{block}")
                } else {
                    "quant_linear_per_token".into()
                };
                let case = case_id(&op, dtype, &[m, k, n], kernel.name());
                let mut x = rng.tensor(&[m, k], -1.0, 1.0, DType::F32)?;
                // Row magnitudes from 1e-2 to 1e2, and row 0 all zeros when m > 1.
                let gains: Vec<f32> =
                    (0..m).map(|r| if m > 1 && r == 0 { 0.0 } else { 10f32.powf(rng.uniform(-2.0, 2.0)) }).collect();
                x = x.broadcast_mul(&Tensor::from_slice(&gains, (m, 1), &Device::Cpu)?)?.to_dtype(dtype)?;
                let wq = random_i8(&mut rng, n * k);
                let s_w: Vec<f32> = (0..n).map(|_| rng.uniform(1e-3, 1e-2)).collect();
                let mut layer = QuantLinear::with_kernel(&wq, &vec![0; n], &s_w, kernel)?;
                if rotate {
                    layer = layer.with_input_hadamard(block)?;
                }
                let got = layer.forward_per_token(&x)?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
                let mut xs = x.to_dtype(DType::F32)?.to_vec2::<f32>()?;
                if rotate {
                    // The definition rotates the row first (explicit matrix product in the
                    // hadamard module's own tests).
                    xs.iter_mut().for_each(|row| crate::quant::hadamard_row(row, block));
                }
                for r in 0..m {
                    let absmax = xs[r].iter().fold(0f32, |a, v| a.max(v.abs()));
                    let s = if absmax > 0.0 { absmax / 127.0 } else { 1.0 };
                    let xq: Vec<i64> = xs[r].iter().map(|&v| quantize_value(v, 1.0 / s, 0.0) as i64).collect();
                    for c in 0..n {
                        let acc: i64 = (0..k).map(|i| xq[i] * wq[c * k + i] as i64).sum();
                        let want = acc as f64 * s_w[c] as f64 * s as f64;
                        let bound: f64 = (0..k).map(|i| (xq[i] * wq[c * k + i] as i64).abs() as f64).sum::<f64>()
                            * s_w[c] as f64
                            * s as f64;
                        let tol = Tolerance::for_dtype(dtype).relative as f64 * bound.max(1e-30) + 1e-30;
                        let g = got[r][c] as f64;
                        if (g - want).abs() > tol {
                            bail!("{case}: y[{r},{c}] = {g}, definition {want} (tolerance {tol})");
                        }
                    }
                }
                if m > 1 {
                    assert!(got[0].iter().all(|&v| v == 0.0), "{case}: an all-zero row must give zeros");
                }
            }
        }
    }
    Ok(())
}

/// The fused SwiGLU input equals the unfused composition bit for bit: every kernel, dtype,
/// rotation, a strided input, and both the serial and the parallel row split (m * k below and
/// above 64 Ki). Rows of very different magnitudes.
#[test]
fn per_token_swiglu_is_swiglu_then_per_token() -> Result<()> {
    let mut rng = Rng::fresh("quant per token swiglu");
    for kernel in QuantKernel::available() {
        for dtype in FLOAT_DTYPES {
            for ((m, k, n), rotate) in [(3, 200, 40), (50, 1536, 64)].into_iter().flat_map(|s| [(s, false), (s, true)])
            {
                let block = if rotate { crate::quant::hadamard_block(k, 512) } else { 0 };
                let case = case_id(
                    "quant_linear_per_token_swiglu",
                    dtype,
                    &[m, 2 * k, n],
                    &format!("{},hadamard{block}", kernel.name()),
                );
                // Gate and up halves in a wider row (strided rows), gains per row.
                let wide = rng.tensor(&[m, 2 * k + 8], -3.0, 3.0, DType::F32)?;
                let gains: Vec<f32> = (0..m).map(|_| 10f32.powf(rng.uniform(-1.0, 1.0))).collect();
                let wide = wide.broadcast_mul(&Tensor::from_slice(&gains, (m, 1), &Device::Cpu)?)?.to_dtype(dtype)?;
                let x = wide.narrow(1, 4, 2 * k)?;
                let wq = random_i8(&mut rng, n * k);
                let s_w: Vec<f32> = (0..n).map(|_| rng.uniform(1e-3, 1e-2)).collect();
                let mut layer = QuantLinear::with_kernel(&wq, &vec![0; n], &s_w, kernel)?;
                if rotate {
                    layer = layer.with_input_hadamard(block)?;
                }
                let fused = layer.forward_per_token_swiglu(&x)?;
                let composed = layer.forward_per_token(&crate::swiglu(&x)?)?;
                assert_eq!(fused.dims(), composed.dims(), "{case}");
                let (a, b) =
                    (fused.to_dtype(DType::F32)?.flatten_all()?, composed.to_dtype(DType::F32)?.flatten_all()?);
                let (a, b) = (a.to_vec1::<f32>()?, b.to_vec1::<f32>()?);
                if let Some(i) = (0..a.len()).find(|&i| a[i].to_bits() != b[i].to_bits()) {
                    bail!("{case}: element {i}: fused {} vs composed {}", a[i], b[i]);
                }
            }
        }
    }
    let layer = QuantLinear::new(&[1i8; 8], &[0, 0], &[1.0, 1.0])?;
    let err = layer.forward_per_token_swiglu(&Tensor::ones((3, 4), DType::F32, &Device::Cpu)?).unwrap_err().to_string();
    assert!(err.contains("quant_linear_per_token_swiglu") && err.contains("4 features"), "{err}");
    Ok(())
}

#[test]
fn per_token_forward_rejects_a_wrong_width() -> Result<()> {
    let layer = QuantLinear::new(&[1i8; 8], &[0, 0], &[1.0, 1.0])?;
    let err = layer.forward_per_token(&Tensor::ones((3, 5), DType::F32, &Device::Cpu)?).unwrap_err().to_string();
    assert!(err.contains("quant_linear_per_token") && err.contains("5 features"), "{err}");
    Ok(())
}

/// The per-token path's row helpers (AVX-512 where present) against scalar folds: ragged
/// lengths, NaN (ignored), infinities and negative maxima, and f16/bf16 widening.
#[test]
fn absmax_and_widen_match_the_scalar_definitions() -> Result<()> {
    let mut rng = Rng::fresh("quant::row_helpers");
    for len in [0usize, 1, 7, 16, 31, 32, 33, 576, 1000] {
        let mut x: Vec<f32> = (0..len).map(|_| rng.uniform(-3.0, 3.0)).collect();
        let scalar = |x: &[f32]| x.iter().fold(0f32, |a, v| a.max(v.abs()));
        assert_eq!(absmax(&x), scalar(&x), "absmax len {len}");
        if len > 2 {
            let i = rng.below(len);
            x[i] = -7.5;
            assert_eq!(absmax(&x), 7.5, "negative maximum, len {len}");
            x[rng.below(len)] = f32::NAN;
            assert_eq!(absmax(&x), scalar(&x), "NaN ignored, len {len}");
            x[rng.below(len)] = f32::NEG_INFINITY;
            assert_eq!(absmax(&x), f32::INFINITY, "infinity, len {len}");
        }
        for dtype in FLOAT_DTYPES {
            let t = rng.tensor(&[len.max(1)], -4.0, 4.0, dtype)?;
            let want = t.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            let mut got = vec![f32::NAN; want.len()];
            let mut got_max = f32::NAN;
            crate::dispatch_float!(dtype, "widen", T => crate::host::with_slice::<T, _>(&t, "widen", |data, _| {
                widen_row(data, &mut got);
                got_max = absmax(data);
                Ok(())
            }))?;
            assert_eq!(got_max, want.iter().fold(0f32, |a, v| a.max(v.abs())), "absmax of {dtype:?}, len {len}");
            assert_eq!(got, want, "{}", case_id("WIDEN_ROW", dtype, &[len.max(1)], "cpu"));
        }
    }
    Ok(())
}

/// The per-channel quantization of the int8 KV-cache write (AVX-512 where present) against the
/// scalar definition, bit for bit: ragged lengths (masked-off tails), every float dtype, and
/// rounding ties, saturation, infinities and NaN planted among random values.
#[test]
fn per_channel_quantize_matches_the_scalar_definition() -> Result<()> {
    let mut rng = Rng::fresh("quant::per_channel_row");
    let specials = [0.5f32, -0.5, 2.5, -2.5, 127.5, -128.5, 1e9, f32::INFINITY, f32::NEG_INFINITY, f32::NAN];
    for len in [1usize, 7, 16, 20, 33, 64, 128, 200] {
        let scale: Vec<f32> = (0..len).map(|_| rng.uniform(5.0, 60.0)).collect();
        let offset: Vec<f32> = (0..len).map(|_| rng.uniform(-30.0, 30.0).round()).collect();
        for dtype in FLOAT_DTYPES {
            let mut x = rng.tensor(&[len], -4.0, 4.0, DType::F32)?.to_vec1::<f32>()?;
            for (i, &s) in specials.iter().enumerate().take(len / 2) {
                // Ties land exactly on x * scale + offset for scale 1, offset 0 channels.
                let at = (2 * i + 1).min(len - 1);
                x[at] = s;
            }
            let (mut unit_scale, mut zero_offset) = (scale.clone(), offset.clone());
            for i in (1..len).step_by(2) {
                (unit_scale[i], zero_offset[i]) = (1.0, 0.0);
            }
            let t = Tensor::from_vec(x, len, &Device::Cpu)?.to_dtype(dtype)?;
            for (s, o) in [(&scale, &offset), (&unit_scale, &zero_offset)] {
                let (mut got, mut want) = (vec![99i8; len], vec![-99i8; len]);
                crate::dispatch_float!(dtype, "per_channel", T => crate::host::with_slice::<T, _>(&t, "per_channel", |data, _| {
                    quantize_row_per_channel(data, s, o, &mut got);
                    quantize_row_per_channel_scalar(data, s, o, &mut want);
                    Ok(())
                }))?;
                assert_eq!(got, want, "{}", case_id("QUANTIZE_PER_CHANNEL", dtype, &[len], "cpu"));
                assert!(got.iter().any(|&v| v != 0), "len {len}: all zeros");
            }
        }
    }
    Ok(())
}

/// A SwiGLU linear (gate and up packed in channel pairs, SwiGLU in the epilogue) equals
/// `swiglu` of the plain linear's output: bit for bit in f32, to the dtype's rounding in
/// f16/bf16. Every kernel, static and per-token activations (rotated too), decode and
/// prefill row counts (ragged 32-row blocks), non-zero integer biases.
#[test]
fn swiglu_linear_is_swiglu_of_the_plain_linear() -> Result<()> {
    let mut rng = Rng::fresh("quant swiglu linear");
    for kernel in QuantKernel::available() {
        for (m, k, i) in [(1usize, 200usize, 48usize), (5, 96, 32), (16, 576, 64), (40, 320, 96), (100, 1536, 48)] {
            let n = 2 * i;
            let wq = random_i8(&mut rng, n * k);
            let bias: Vec<i32> = (0..n).map(|_| rng.below(4001) as i32 - 2000).collect();
            let deq: Vec<f32> = (0..n).map(|_| rng.uniform(0.5, 2.0) / (40.0 * k as f32)).collect();
            let plain = QuantLinear::with_kernel(&wq, &bias, &deq, kernel)?;
            let gated = QuantLinear::with_kernel_swiglu(&wq, &bias, &deq, kernel)?;
            assert!(gated.is_swiglu() && gated.output_width() == i && gated.out_features() == n);
            let block = crate::quant::hadamard_block(k, 512);
            let (plain_rot, gated_rot) = (
                QuantLinear::with_kernel(&wq, &vec![0; n], &deq, kernel)?.with_input_hadamard(block)?,
                QuantLinear::with_kernel_swiglu(&wq, &vec![0; n], &deq, kernel)?.with_input_hadamard(block)?,
            );
            for dtype in FLOAT_DTYPES {
                let x = rng.tensor(&[m, k], -3.0, 3.0, dtype)?;
                let case = |path: &str| {
                    case_id("quant_linear_swiglu", dtype, &[m, k, n], &format!("{},{path}", kernel.name()))
                };
                let pairs = [
                    ("static", gated.forward(&x, 20.0, 3.0)?, plain.forward(&x.to_dtype(DType::F32)?, 20.0, 3.0)?),
                    (
                        "per_token",
                        gated_rot.forward_per_token(&x)?,
                        plain_rot.forward_per_token(&x.to_dtype(DType::F32)?)?,
                    ),
                ];
                for (path, got, plain_out) in pairs {
                    assert_eq!(got.dims(), &[m, i], "{}", case(path));
                    assert_eq!(got.dtype(), dtype, "{}", case(path));
                    let want = crate::swiglu(&plain_out)?;
                    if dtype == DType::F32 {
                        let (a, b) = (got.flatten_all()?.to_vec1::<f32>()?, want.flatten_all()?.to_vec1::<f32>()?);
                        if let Some(j) = (0..a.len()).find(|&j| a[j].to_bits() != b[j].to_bits()) {
                            bail!("{}: element {j}: gated {} vs swiglu(plain) {}", case(path), a[j], b[j]);
                        }
                        assert!(a.iter().any(|v| v.abs() > 1e-3), "{}: output near zero", case(path));
                    } else {
                        assert_close(&case(path), &got, &want.to_dtype(dtype)?, Tolerance::for_dtype(dtype))?;
                    }
                }
            }
            let xq = Int8Matrix { data: random_i8(&mut rng, m * k), rows: m, cols: k };
            let want = crate::swiglu(&Tensor::from_vec(plain.forward_quantized(&xq)?, (m, n), &Device::Cpu)?)?;
            let got = Tensor::from_vec(gated.forward_quantized(&xq)?, (m, i), &Device::Cpu)?;
            assert_eq!(
                got.flatten_all()?.to_vec1::<f32>()?,
                want.flatten_all()?.to_vec1::<f32>()?,
                "forward_quantized"
            );
            let err = gated.forward_accumulators(&xq).unwrap_err().to_string();
            assert!(err.contains("SwiGLU"), "{err}");
        }
    }
    let err = QuantLinear::new_swiglu(&[1i8; 40 * 4], &[0; 40], &[1.0; 40]).unwrap_err().to_string();
    assert!(err.contains("multiple of 16"), "{err}");
    Ok(())
}

/// The add + RMS norm + quantize front end equals `add_rms_norm` followed by the forward, bit
/// for bit (output and sum): every kernel and dtype, static and per-token (rotated) activations,
/// plain and SwiGLU linears, a strided `x`, serial and parallel row splits.
#[test]
fn add_rms_norm_front_end_is_add_rms_norm_then_forward() -> Result<()> {
    let mut rng = Rng::fresh("quant add_rms_norm front end");
    for kernel in QuantKernel::available() {
        for (m, k, n) in [(3usize, 96usize, 64usize), (130, 576, 96)] {
            let wq = random_i8(&mut rng, n * k);
            let bias: Vec<i32> = (0..n).map(|_| rng.below(401) as i32 - 200).collect();
            let deq: Vec<f32> = (0..n).map(|_| rng.uniform(0.5, 2.0) / (40.0 * k as f32)).collect();
            let block = crate::quant::hadamard_block(k, 512);
            let layers = [
                ("plain", QuantLinear::with_kernel(&wq, &bias, &deq, kernel)?),
                ("swiglu", QuantLinear::with_kernel_swiglu(&wq, &bias, &deq, kernel)?),
                ("rotated", QuantLinear::with_kernel(&wq, &vec![0; n], &deq, kernel)?.with_input_hadamard(block)?),
            ];
            for dtype in FLOAT_DTYPES {
                let wide = rng.tensor(&[m, k + 5], -3.0, 3.0, dtype)?;
                let x = wide.narrow(1, 2, k)?;
                let residual = rng.tensor(&[m, k], -3.0, 3.0, dtype)?;
                let gamma = rng.tensor(&[k], 0.2, 2.0, dtype)?;
                let (normed, sum_ref) = crate::add_rms_norm(&x, &residual, &gamma, 1e-5)?;
                for (name, layer) in &layers {
                    for act in [Some((25.0f32, -2.0f32)), None] {
                        let path = if act.is_some() { "static" } else { "per_token" };
                        let case = case_id(
                            "quant_linear_add_rms_norm",
                            dtype,
                            &[m, k, n],
                            &format!("{},{name},{path}", kernel.name()),
                        );
                        let (y, sum) = layer.forward_add_rms_norm(&x, &residual, &gamma, 1e-5, act)?;
                        let y_ref = match act {
                            Some((s, o)) => layer.forward(&normed, s, o)?,
                            None => layer.forward_per_token(&normed)?,
                        };
                        let bits = |t: &Tensor| -> Result<Vec<u32>> {
                            Ok(t.to_dtype(DType::F32)?
                                .flatten_all()?
                                .to_vec1::<f32>()?
                                .iter()
                                .map(|v| v.to_bits())
                                .collect())
                        };
                        assert_eq!(y.dims(), y_ref.dims(), "{case}");
                        assert_eq!(y.dtype(), dtype, "{case}");
                        if bits(&y)? != bits(&y_ref)? {
                            bail!("{case}: output differs from add_rms_norm + forward");
                        }
                        if bits(&sum)? != bits(&sum_ref)? {
                            bail!("{case}: sum differs from add_rms_norm's");
                        }
                    }
                }
            }
        }
    }
    let layer = QuantLinear::new(&[1i8; 8], &[0, 0], &[1.0, 1.0])?;
    let x = Tensor::ones((3, 5), DType::F32, &Device::Cpu)?;
    let err = layer.forward_add_rms_norm(&x, &x, &Tensor::ones(5, DType::F32, &Device::Cpu)?, 1e-5, None).unwrap_err();
    assert!(err.to_string().contains("5 features"), "{err}");
    let x = Tensor::ones((3, 4), DType::F32, &Device::Cpu)?;
    let err = layer.forward_add_rms_norm(&x, &x, &Tensor::ones(3, DType::F32, &Device::Cpu)?, 1e-5, None).unwrap_err();
    assert!(err.to_string().contains("gamma"), "{err}");
    let err =
        layer.forward_add_rms_norm(&x, &x.narrow(0, 0, 2)?, &Tensor::ones(4, DType::F32, &Device::Cpu)?, 1e-5, None);
    assert!(err.unwrap_err().to_string().contains("residual"));
    Ok(())
}

#[test]
fn warm_weights_walks_every_page_and_stops_when_asked() -> Result<()> {
    // 100 x 576 int8 weights pack to 128 channels x 576 bytes: 72 KiB, 18 pages of 4 KiB.
    let (n, k) = (100, 576);
    let wq: Vec<i8> = (0..n * k).map(|i| (i % 251) as i8).collect();
    let layer = QuantLinear::new(&wq, &vec![0; n], &vec![1.0; n])?;
    let pages = layer.weights.data.as_slice().len().div_ceil(4096);
    assert!(pages > 3);
    let mut asked = 0;
    layer.warm_weights(&mut || {
        asked += 1;
        true
    });
    assert_eq!(asked, pages, "one question per 4 KiB page");
    let mut asked = 0;
    layer.warm_weights(&mut || {
        asked += 1;
        asked < 3
    });
    assert_eq!(asked, 3, "the walk ends at the first `false`");
    Ok(())
}
