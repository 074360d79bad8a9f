//! The int8 ops on the NPU (`candle_ascend_ops::ascend::{quant, kv_int8}`) against the CPU references of the
//! same contracts, on ascend-sim (or real CANN with `CANDLE_ASCEND_TEST_CANN=1`): fresh random non-zero inputs
//! (the seed is printed; `OPS_TEST_SEED` replays it), decode and prefill shapes, ragged batches, strided input
//! views, f16 / bf16 / f32 activations.
//!
//! Exact equality where the integer math is exact (the quantize output, the int8 cache contents). Float outputs
//! are compared with the relative metric of `testing::assert_close` (`max|got - ref| / max|ref|`); the bounds
//! below come from the rounding each path adds, and the worst errors measured on ascend-sim over several seeds
//! (in brackets) sit well inside them:
//! - static A8W8 ([`TOL_STATIC`]): identical int8 operands and exact int32 sums; the f16 epilogue uses the
//!   uint64-packed deq scale (10 mantissa bits, < 2^-10) and rounds to f16 (2^-11): f16 3e-3 [1.1e-3]; bf16 output
//!   rounding (2^-8): 1.6e-2 [3.5e-3].
//! - per-token A8W8 ([`TOL_PER_TOKEN`]): DynamicQuant takes f16/bf16 input, so the (rotated) activations are
//!   rounded to the layer dtype before quantization where the CPU quantizes the f32 rotation, and it divides by the
//!   row scale where the CPU multiplies by the inverse: some int8 activations differ by one step. f16 1.5e-2
//!   [5.3e-3 with a Hadamard rotation, 3.3e-4 without], bf16 4e-2 [1.2e-2, 2.6e-3].
//! - W8A16 ([`TOL_WEIGHT_ONLY`]): the antiquant scale is held in x's dtype (f16 2^-11, bf16 2^-8) and x is cast
//!   to it: f16 4e-3 [7.5e-4], bf16 2e-2 [6.4e-3].
//! - attention ([`TOL_ATTENTION`]): decode dequantizes with parameters in q's dtype, prefill dequantizes the
//!   cache into q's dtype: f32 1e-5 [3.3e-7], f16 4e-3 [9.7e-4], bf16 3e-2 [7.1e-3].

#![cfg(feature = "ascend")]

use candle_ascend_ops::ascend::attention::CausalMask;
use candle_ascend_ops::ascend::kv_int8::{self as npu_kv, Int8KvCache as NpuKvCache};
use candle_ascend_ops::ascend::quant as npu_quant;
use candle_ascend_ops::ascend::{AscendDevice, NpuDType, NpuTensor};
use candle_ascend_ops::testing::{Rng, Tolerance, assert_close, case_id, random_kv_params};
use candle_ascend_ops::{self as ops, Int8KvCache, KvQuantParams};
use candle_core::{DType, Device, Result, Tensor, bail};

fn device() -> AscendDevice {
    candle_ascend::testing::device()
}

fn npu_dtype(dtype: DType) -> NpuDType {
    match dtype {
        DType::F16 => NpuDType::F16,
        DType::BF16 => NpuDType::BF16,
        _ => NpuDType::F32,
    }
}

fn tol(dtype: DType, f16: f32, bf16: f32, f32: f32) -> Tolerance {
    Tolerance {
        relative: match dtype {
            DType::F16 => f16,
            DType::BF16 => bf16,
            _ => f32,
        },
    }
}

#[allow(non_snake_case)]
fn TOL_STATIC(dtype: DType) -> Tolerance {
    tol(dtype, 3e-3, 1.6e-2, 3e-3)
}
#[allow(non_snake_case)]
fn TOL_PER_TOKEN(dtype: DType) -> Tolerance {
    tol(dtype, 1.5e-2, 4e-2, 1.5e-2)
}
#[allow(non_snake_case)]
fn TOL_WEIGHT_ONLY(dtype: DType) -> Tolerance {
    tol(dtype, 4e-3, 2e-2, 4e-3)
}
#[allow(non_snake_case)]
fn TOL_ATTENTION(dtype: DType) -> Tolerance {
    tol(dtype, 4e-3, 3e-2, 1e-5)
}

/// The measured relative error (the metric of `assert_close`), printed with the case id for the record.
fn measured(id: &str, got: &Tensor, reference: &Tensor) -> Result<f32> {
    let got = got.to_dtype(DType::F32)?.flatten_all()?;
    let reference = reference.to_dtype(DType::F32)?.flatten_all()?;
    let worst = (&got - &reference)?.abs()?.max(0)?.to_scalar::<f32>()?;
    let scale = reference.abs()?.max(0)?.to_scalar::<f32>()?.max(f32::MIN_POSITIVE);
    let rel = worst / scale;
    eprintln!("{id}: relative error {rel:.3e}");
    Ok(rel)
}

/// Compares and records; fails with the case id and the measured error.
fn check(id: &str, got: &NpuTensor, reference: &Tensor, tolerance: Tolerance) -> Result<()> {
    let got = got.to_candle()?;
    measured(id, &got, reference)?;
    assert_close(id, &got, reference, tolerance)
}

/// A host tensor `[.., K]` and the same values on the device; with `strided`, both are the same narrow of a wider
/// tensor (the device one a strided view).
fn activation(
    rng: &mut Rng,
    dev: &AscendDevice,
    shape: &[usize],
    dtype: DType,
    strided: bool,
) -> Result<(Tensor, NpuTensor)> {
    let last = shape.len() - 1;
    if strided {
        let mut wide = shape.to_vec();
        wide[last] += 24;
        let host = rng.tensor(&wide, -4.0, 4.0, dtype)?;
        let npu = NpuTensor::from_candle(dev, &host)?.narrow(last, 8, shape[last])?;
        Ok((host.narrow(last, 8, shape[last])?, npu))
    } else {
        let host = rng.tensor(shape, -4.0, 4.0, dtype)?;
        let npu = NpuTensor::from_candle(dev, &host)?;
        Ok((host, npu))
    }
}

fn random_i8(rng: &mut Rng, len: usize) -> Vec<i8> {
    (0..len).map(|_| (rng.below(255) as i32 - 127) as i8).collect()
}

fn strided_label(strided: bool) -> &'static str {
    if strided { ",strided" } else { "" }
}

const ACTIVATION_DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

#[test]
fn quantize_equals_the_cpu_bytes() -> Result<()> {
    let dev = device();
    let mut rng = Rng::fresh("ascend_int8::quantize_equals_the_cpu_bytes");
    for dtype in ACTIVATION_DTYPES {
        for (shape, strided) in [(vec![3, 64], false), (vec![2, 5, 96], true), (vec![1, 1, 40], false)] {
            // A scale that no half type holds exactly (the f32 fallback) and one that they do (the native path).
            let random_scale = rng.uniform(45.0, 60.0);
            for (scale, offset) in [(random_scale, rng.uniform(-6.0, 6.0).round()), (64.0, -3.0)] {
                let id = case_id(
                    "ASCEND_QUANTIZE",
                    dtype,
                    &shape,
                    &format!("scale={scale},offset={offset}{}", strided_label(strided)),
                );
                let (host, npu) = activation(&mut rng, &dev, &shape, dtype, strided)?;
                let got = npu_quant::quantize(&npu, scale, offset)?;
                if got.shape() != shape.as_slice() || got.dtype() != NpuDType::I8 {
                    bail!("{id}: got {got:?}");
                }
                let got = got.to_vec::<i8>()?;
                let cpu = ops::quantize(&host, scale, offset)?;
                let reference: Vec<i8> = ops::quantize_reference(&host, scale, offset)?
                    .flatten_all()?
                    .to_vec1::<f32>()?
                    .iter()
                    .map(|&v| v as i8)
                    .collect();
                if got != cpu.data || got != reference {
                    let at = got.iter().zip(&reference).position(|(a, b)| a != b).unwrap_or(0);
                    bail!("{id}: differs from the CPU bytes (first at flat index {at})");
                }
                if !got.iter().any(|&q| q == 127 || q == -128) || got.iter().all(|&q| q == 0) {
                    bail!("{id}: the inputs did not exercise saturation or were all zero");
                }
                eprintln!("{id}: exact");
            }
        }
    }
    Ok(())
}

#[test]
fn static_quant_linear_matches_the_reference() -> Result<()> {
    let dev = device();
    let mut rng = Rng::fresh("ascend_int8::static_quant_linear_matches_the_reference");
    let (n, k) = (48, 128);
    for out_dtype in [DType::F16, DType::BF16] {
        let w_q = random_i8(&mut rng, n * k);
        let bias_q: Vec<i32> = (0..n).map(|_| rng.below(20001) as i32 - 10000).collect();
        let deq_scale: Vec<f32> = (0..n).map(|_| rng.uniform(2e-4, 2e-3)).collect();
        let (act_scale, act_offset) = (127.0 / rng.uniform(3.5, 4.5), rng.uniform(-5.0, 5.0).round());
        let layer = npu_quant::QuantLinear::new(
            &dev,
            &w_q,
            (n, k),
            &bias_q,
            &deq_scale,
            act_scale,
            act_offset,
            npu_dtype(out_dtype),
        )?;
        assert_eq!(layer.weight_bytes(), n * k);
        for x_dtype in ACTIVATION_DTYPES {
            for (shape, strided) in [(vec![1, 1, k], false), (vec![2, 7, k], false), (vec![3, 5, k], true)] {
                let id = case_id(
                    "ASCEND_QUANT_LINEAR",
                    x_dtype,
                    &shape,
                    &format!("out={}{}", out_dtype.as_str(), strided_label(strided)),
                );
                let (host, npu) = activation(&mut rng, &dev, &shape, x_dtype, strided)?;
                let got = layer.forward(&npu)?;
                if got.dtype() != npu_dtype(out_dtype) || got.shape() != [&shape[..2], &[n]].concat().as_slice() {
                    bail!("{id}: got {got:?}");
                }
                let x_q = ops::quantize_reference(&host, act_scale, act_offset)?;
                let reference = ops::quant_matmul_reference(&x_q, &w_q, &bias_q, &deq_scale)?;
                check(&id, &got, &reference, TOL_STATIC(out_dtype))?;
                // The CPU layer of the same contract agrees as well.
                let cpu = ops::QuantLinear::new(&w_q, &bias_q, &deq_scale)?.forward(&host, act_scale, act_offset)?;
                check(
                    &format!("{id}/vs-cpu-layer"),
                    &got,
                    &cpu.to_dtype(DType::F32)?,
                    TOL_STATIC(out_dtype).times(2.0),
                )?;
            }
        }
    }
    Ok(())
}

#[test]
fn per_token_quant_linear_matches_the_cpu_layer() -> Result<()> {
    let dev = device();
    let mut rng = Rng::fresh("ascend_int8::per_token_quant_linear_matches_the_cpu_layer");
    let (n, k) = (40, 128);
    for dtype in [DType::F16, DType::BF16] {
        for hadamard in [0, 32, 128] {
            for with_bias in [false, true] {
                let w_q = random_i8(&mut rng, n * k);
                let scale: Vec<f32> = (0..n).map(|_| rng.uniform(1e-3, 1e-2)).collect();
                let bias = if with_bias { Some(rng.tensor(&[n], -1.0, 1.0, DType::F32)?) } else { None };
                let layer = npu_quant::PerTokenQuantLinear::new(
                    &dev,
                    &w_q,
                    (n, k),
                    &scale,
                    bias.as_ref(),
                    hadamard,
                    npu_dtype(dtype),
                )?;
                assert_eq!(layer.weight_bytes(), n * k);
                let mut cpu = ops::QuantLinear::new(&w_q, &vec![0; n], &scale)?;
                if hadamard > 0 {
                    cpu = cpu.with_input_hadamard(hadamard)?;
                }
                for x_dtype in [DType::F32, dtype] {
                    for (shape, strided) in [(vec![1, 1, k], false), (vec![3, 5, k], false), (vec![2, 3, k], true)] {
                        let extra = format!(
                            "out={},hadamard={hadamard},bias={with_bias}{}",
                            dtype.as_str(),
                            strided_label(strided)
                        );
                        let id = case_id("ASCEND_PER_TOKEN_LINEAR", x_dtype, &shape, &extra);
                        // Outlier channels, which the per-token scale (and the rotation) must absorb.
                        let host = rng.tensor(&shape, -4.0, 4.0, x_dtype)?;
                        let host = host.broadcast_mul(&outlier_gains(k)?.to_dtype(x_dtype)?)?;
                        let npu =
                            if strided { widen_and_narrow(&dev, &host)? } else { NpuTensor::from_candle(&dev, &host)? };
                        let got = layer.forward(&npu)?;
                        if got.dtype() != npu_dtype(dtype) || got.shape() != [&shape[..2], &[n]].concat().as_slice() {
                            bail!("{id}: got {got:?}");
                        }
                        // The NPU layer casts x to its dtype first: give the CPU layer the same values.
                        let mut reference = cpu.forward_per_token(&host.to_dtype(dtype)?)?.to_dtype(DType::F32)?;
                        if let Some(b) = &bias {
                            reference = reference.broadcast_add(b)?;
                        }
                        check(&id, &got, &reference, TOL_PER_TOKEN(dtype))?;
                    }
                }
            }
        }
    }
    Ok(())
}

/// Gains `[K]`: 1 except a few channels at 12 (activation outliers).
fn outlier_gains(k: usize) -> Result<Tensor> {
    let gains: Vec<f32> = (0..k).map(|c| if c % 37 == 5 { 12.0 } else { 1.0 }).collect();
    Tensor::from_vec(gains, k, &Device::Cpu)
}

/// `host` on the device as a strided view (a narrow of a wider tensor holding it).
fn widen_and_narrow(dev: &AscendDevice, host: &Tensor) -> Result<NpuTensor> {
    let last = host.rank() - 1;
    let k = host.dims()[last];
    let pad = Tensor::zeros(&[&host.dims()[..last], &[8]].concat()[..], host.dtype(), &Device::Cpu)?;
    let wide = Tensor::cat(&[&pad, host, &pad], last)?;
    Ok(NpuTensor::from_candle(dev, &wide)?.narrow(last, 8, k)?)
}

#[test]
fn weight_quant_linear_matches_the_reference() -> Result<()> {
    let dev = device();
    let mut rng = Rng::fresh("ascend_int8::weight_quant_linear_matches_the_reference");
    // (N, K): an ordinary projection and an lm_head wider than one WeightQuantBatchMatmulV2 call (65535).
    for (n, k, shapes) in [
        (48, 96, vec![(vec![1, 1, 96], false), (vec![2, 9, 96], false), (vec![3, 4, 96], true)]),
        (65_535 + 97, 32, vec![(vec![2, 1, 32], false)]),
    ] {
        for dtype in [DType::F16, DType::BF16] {
            for with_bias in [false, true] {
                let w_q = random_i8(&mut rng, n * k);
                let scale: Vec<f32> = (0..n).map(|_| rng.uniform(1e-3, 2e-2)).collect();
                let bias = if with_bias { Some(rng.tensor(&[n], -0.5, 0.5, DType::F32)?) } else { None };
                let layer =
                    npu_quant::WeightQuantLinear::new(&dev, &w_q, (n, k), &scale, bias.as_ref(), npu_dtype(dtype))?;
                assert_eq!(layer.weight_bytes(), n * k);
                for x_dtype in ACTIVATION_DTYPES {
                    for (shape, strided) in &shapes {
                        let extra = format!("out={},N={n},bias={with_bias}{}", dtype.as_str(), strided_label(*strided));
                        let id = case_id("ASCEND_WEIGHT_QUANT_LINEAR", x_dtype, shape, &extra);
                        let (host, npu) = activation(&mut rng, &dev, shape, x_dtype, *strided)?;
                        let got = layer.forward(&npu)?;
                        if got.dtype() != npu_dtype(dtype) || got.shape() != [&shape[..2], &[n]].concat().as_slice() {
                            bail!("{id}: got {got:?}");
                        }
                        let reference = ops::weight_quant_linear_reference(
                            &host.to_dtype(DType::F32)?,
                            &w_q,
                            (n, k),
                            &scale,
                            None,
                            bias.as_ref(),
                        )?;
                        check(&id, &got, &reference, TOL_WEIGHT_ONLY(dtype))?;
                    }
                }
            }
        }
    }
    Ok(())
}

/// A CPU int8 cache and an NPU one with the same parameters (`params`, or random ones), both filled with the same random contents
/// (checked equal).
fn filled_caches(
    rng: &mut Rng,
    dev: &AscendDevice,
    (batch, capacity, heads, dim): (usize, usize, usize, usize),
    params: Option<&KvQuantParams>,
    id: &str,
) -> Result<(Int8KvCache, NpuKvCache)> {
    let params = match params {
        Some(p) => p.clone(),
        None => random_kv_params(rng, heads * dim)?,
    };
    let params = &params;
    let mut cpu = Int8KvCache::new(batch, capacity, heads, dim, params.clone())?;
    let npu = NpuKvCache::new(dev, batch, capacity, heads, dim, params)?;
    let fill = rng.tensor(&[batch, capacity, heads, dim], -3.5, 3.5, DType::F32)?;
    ops::kv_write_int8(&mut cpu, &fill, &vec![0; batch])?;
    npu_kv::kv_write_int8(&npu, &NpuTensor::from_candle(dev, &fill)?, &vec![0; batch])?;
    if npu.data().to_vec::<i8>()? != cpu.data() {
        bail!("{id}: the filled caches differ");
    }
    Ok((cpu, npu))
}

#[test]
fn kv_write_int8_equals_the_cpu_bytes() -> Result<()> {
    let dev = device();
    let mut rng = Rng::fresh("ascend_int8::kv_write_int8_equals_the_cpu_bytes");
    for dtype in ACTIVATION_DTYPES {
        for (heads, dim) in [(2, 64), (3, 32)] {
            // (cache batch, capacity, B', S, strided): decode into a batch prefix, a prefill, a strided narrow of
            // a fused qkv output, a write filling a whole sequence.
            for (batch, capacity, new_batch, len, strided) in
                [(4, 40, 3, 1, false), (2, 48, 2, 17, false), (3, 32, 2, 7, true), (2, 16, 1, 16, false)]
            {
                let extra = format!("H={heads},B={batch},C={capacity}{}", strided_label(strided));
                let id = case_id("ASCEND_KV_WRITE_INT8", dtype, &[new_batch, len, heads, dim], &extra);
                let params = random_kv_params(&mut rng, heads * dim)?;
                let (cpu, npu) = filled_caches(&mut rng, &dev, (batch, capacity, heads, dim), Some(&params), &id)?;
                let (new_host, new_npu) = if strided {
                    let wide = rng.tensor(&[new_batch, len, 3 * heads + 1, dim], -3.5, 3.5, dtype)?;
                    let npu = NpuTensor::from_candle(&dev, &wide)?.narrow(2, heads + 1, heads)?;
                    (wide.narrow(2, heads + 1, heads)?, npu)
                } else {
                    let host = rng.tensor(&[new_batch, len, heads, dim], -3.5, 3.5, dtype)?;
                    let npu = NpuTensor::from_candle(&dev, &host)?;
                    (host, npu)
                };
                let positions: Vec<usize> = (0..new_batch).map(|_| rng.below(capacity - len + 1)).collect();
                let expected = ops::kv_write_int8_reference(&cpu, &new_host, &positions)?;
                let before = npu.storage_id();
                npu_kv::kv_write_int8(&npu, &new_npu, &positions)?;
                assert_eq!(npu.storage_id(), before, "{id}: the storage moved");
                assert_eq!(npu.bytes(), batch * capacity * heads * dim, "{id}: bytes");
                let got = npu.data().to_vec::<i8>()?;
                if got != expected.data() {
                    let at = got.iter().zip(expected.data()).position(|(a, b)| a != b).unwrap_or(0);
                    bail!("{id}: positions {positions:?}: first difference at flat index {at}");
                }
                eprintln!("{id}: exact, positions {positions:?}");
            }
        }
    }
    Ok(())
}

/// `(Nq, Nkv, D)`: grouped-query and plain multi-head attention.
const HEAD_CASES: [(usize, usize, usize); 2] = [(4, 2, 64), (3, 3, 32)];

/// q `[b, s, nq, d]` on the host and the device; with `strided`, a narrow over the head axis of a wider tensor.
fn query(
    rng: &mut Rng,
    dev: &AscendDevice,
    shape: [usize; 4],
    dtype: DType,
    strided: bool,
) -> Result<(Tensor, NpuTensor)> {
    let [b, s, nq, d] = shape;
    if strided {
        let wide = rng.tensor(&[b, s, nq + 2, d], -1.5, 1.5, dtype)?;
        Ok((wide.narrow(2, 1, nq)?, NpuTensor::from_candle(dev, &wide)?.narrow(2, 1, nq)?))
    } else {
        let host = rng.tensor(&[b, s, nq, d], -1.5, 1.5, dtype)?;
        let npu = NpuTensor::from_candle(dev, &host)?;
        Ok((host, npu))
    }
}

#[test]
fn decode_attention_int8_matches_the_reference() -> Result<()> {
    let dev = device();
    let mut rng = Rng::fresh("ascend_int8::decode_attention_int8_matches_the_reference");
    for dtype in ACTIVATION_DTYPES {
        for (nq, nkv, d) in HEAD_CASES {
            // (cache batch, capacity, B', strided q)
            for (batch, capacity, q_batch, strided) in [(3, 40, 3, false), (4, 24, 2, true)] {
                let kv_lens: Vec<usize> =
                    (0..q_batch).map(|b| if b == 0 { capacity } else { 1 + rng.below(capacity) }).collect();
                let extra = format!("Nkv={nkv},C={capacity},kv_lens={kv_lens:?}{}", strided_label(strided));
                let id = case_id("ASCEND_DECODE_ATTENTION_INT8", dtype, &[q_batch, 1, nq, d], &extra);
                let dims = (batch, capacity, nkv, d);
                let (k_cpu, k_npu) = filled_caches(&mut rng, &dev, dims, None, &id)?;
                let (v_cpu, v_npu) = filled_caches(&mut rng, &dev, dims, None, &id)?;
                let (q_host, q_npu) = query(&mut rng, &dev, [q_batch, 1, nq, d], dtype, strided)?;
                let scale = 1.0 / (d as f32).sqrt();
                let got = npu_kv::decode_attention_int8(&q_npu, &k_npu, &v_npu, &kv_lens, scale)?;
                let reference = ops::decode_attention_int8_reference(&q_host, &k_cpu, &v_cpu, &kv_lens, scale)?;
                check(&id, &got, &reference.to_dtype(DType::F32)?, TOL_ATTENTION(dtype))?;
                // A second call reuses the antiquant parameters built by the first.
                let again = npu_kv::decode_attention_int8(&q_npu, &k_npu, &v_npu, &kv_lens, scale)?;
                let flat = |t: &NpuTensor| -> Result<Vec<f32>> {
                    t.to_candle()?.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()
                };
                if flat(&again)? != flat(&got)? {
                    bail!("{id}: a repeated call differs");
                }
            }
        }
    }
    Ok(())
}

/// (cache batch, capacity, S, q_start, q_lens, strided q).
type PromptCase = (usize, usize, usize, Vec<usize>, Vec<usize>, bool);

#[test]
fn prompt_attention_int8_matches_the_reference() -> Result<()> {
    let dev = device();
    let mut rng = Rng::fresh("ascend_int8::prompt_attention_int8_matches_the_reference");
    let mask = CausalMask::new(&dev)?;
    for dtype in ACTIVATION_DTYPES {
        for (nq, nkv, d) in HEAD_CASES {
            // (cache batch, capacity, S, q_start, q_lens, strided q): a ragged first prefill, a chunked prefill
            // after cached prefixes on a batch prefix of the cache, one sequence.
            let cases: [PromptCase; 3] = [
                (2, 32, 7, vec![0, 0], vec![7, 4], false),
                (3, 40, 5, vec![9, 30], vec![5, 2], true),
                (1, 16, 16, vec![0], vec![16], false),
            ];
            for (batch, capacity, s, q_start, q_lens, strided) in cases {
                let q_batch = q_start.len();
                let extra =
                    format!("Nkv={nkv},C={capacity},q_start={q_start:?},q_lens={q_lens:?}{}", strided_label(strided));
                let id = case_id("ASCEND_PROMPT_ATTENTION_INT8", dtype, &[q_batch, s, nq, d], &extra);
                let dims = (batch, capacity, nkv, d);
                let (k_cpu, k_npu) = filled_caches(&mut rng, &dev, dims, None, &id)?;
                let (v_cpu, v_npu) = filled_caches(&mut rng, &dev, dims, None, &id)?;
                let (q_host, q_npu) = query(&mut rng, &dev, [q_batch, s, nq, d], dtype, strided)?;
                let scale = 1.0 / (d as f32).sqrt();
                let got = npu_kv::prompt_attention_int8(&q_npu, &k_npu, &v_npu, &mask, &q_start, &q_lens, scale)?;
                let reference =
                    ops::prompt_attention_int8_reference(&q_host, &k_cpu, &v_cpu, &q_start, &q_lens, scale)?;
                check(&id, &got, &reference.to_dtype(DType::F32)?, TOL_ATTENTION(dtype))?;
                // Padding rows are exact zeros.
                for (b, &len) in q_lens.iter().enumerate() {
                    if len < s {
                        let pad = got.to_candle()?.narrow(0, b, 1)?.narrow(1, len, s - len)?.to_dtype(DType::F32)?;
                        if pad.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()? != 0.0 {
                            bail!("{id}: padding rows of sequence {b} are not zero");
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

#[test]
fn bad_input_is_rejected() -> Result<()> {
    let dev = device();
    let mut rng = Rng::fresh("ascend_int8::bad_input_is_rejected");
    let w = random_i8(&mut rng, 8 * 32);
    let f32_out = npu_quant::QuantLinear::new(&dev, &w, (8, 32), &[0; 8], &[1e-3; 8], 10.0, 0.0, NpuDType::F32);
    assert!(f32_out.is_err(), "QuantMatmulV4 has no f32 output");
    assert!(npu_quant::QuantLinear::new(&dev, &w, (8, 31), &[0; 8], &[1e-3; 8], 10.0, 0.0, NpuDType::F16).is_err());
    assert!(npu_quant::PerTokenQuantLinear::new(&dev, &w, (8, 32), &[1e-3; 8], None, 24, NpuDType::F16).is_err());
    assert!(npu_quant::WeightQuantLinear::new(&dev, &w, (8, 32), &[1e-3; 7], None, NpuDType::F16).is_err());
    let layer = npu_quant::WeightQuantLinear::new(&dev, &w, (8, 32), &[1e-3; 8], None, NpuDType::F16)?;
    let (_, x) = activation(&mut rng, &dev, &[2, 16], DType::F16, false)?;
    assert!(layer.forward(&x).is_err(), "K mismatch");

    let params = random_kv_params(&mut rng, 2 * 8)?;
    let cache = NpuKvCache::new(&dev, 2, 8, 2, 8, &params)?;
    assert!(NpuKvCache::new(&dev, 2, 8, 2, 4, &params).is_err(), "channel count");
    let new = NpuTensor::from_candle(&dev, &rng.tensor(&[2, 3, 2, 8], -1.0, 1.0, DType::F32)?)?;
    let err = npu_kv::kv_write_int8(&cache, &new, &[0, 6]).expect_err("past the capacity").to_string();
    assert!(err.contains("cache full"), "{err}");
    assert!(npu_kv::kv_write_int8(&cache, &new, &[0]).is_err(), "positions count");
    assert!(cache.data().to_vec::<i8>()?.iter().all(|&q| q == 0), "a rejected write wrote");
    let q = NpuTensor::from_candle(&dev, &rng.tensor(&[2, 1, 4, 8], -1.0, 1.0, DType::F16)?)?;
    assert!(npu_kv::decode_attention_int8(&q, &cache, &cache, &[0, 1], 0.3).is_err(), "kv_len 0");
    assert!(npu_kv::decode_attention_int8(&q, &cache, &cache, &[9, 1], 0.3).is_err(), "kv_len past C");
    let mask = CausalMask::new(&dev)?;
    assert!(npu_kv::prompt_attention_int8(&q, &cache, &cache, &mask, &[8, 0], &[1, 1], 0.3).is_err(), "past C");
    Ok(())
}
