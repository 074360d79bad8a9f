//! Tests of the attention ops over int8 KV caches: every ISA and forced decode splits against
//! the reference (dequantized caches + the float reference), batch prefixes, bad input, and
//! the accuracy of int8 caches against float caches holding the same unquantized K/V.

use candle_core::{DType, IndexOp, Result, Tensor, bail};

use super::PromptInt8Kernel;
use super::check_decode_lengths;
use super::cpu::{self, DecodePlan};
use super::int8::validate_decode;
use super::kernels::Isa;
use crate::kv_cache::{Int8KvCache, KvQuantParams, kv_write_int8};
use crate::testing::{FLOAT_DTYPES, Rng, Tolerance, assert_close, case_id, random_kv_params};
use crate::{
    decode_attention, decode_attention_int8, decode_attention_int8_reference, prompt_attention, prompt_attention_int8,
    prompt_attention_int8_reference, prompt_attention_int8_with,
};

/// (Nq, Nkv): GQA ratios 1, 3 and 7.
const HEAD_LAYOUTS: [(usize, usize); 3] = [(4, 4), (9, 3), (14, 2)];

fn isas(head_dim: usize) -> Vec<(&'static str, Isa)> {
    let mut all = vec![("portable", Isa::Portable)];
    let simd = Isa::detect(head_dim);
    if !matches!(simd, Isa::Portable) {
        all.push(("simd", simd));
    }
    all
}

/// The prefill kernels available here, with a visible skip line for the AMX one when it is not.
fn prompt_kernels(head_dim: usize) -> Vec<PromptInt8Kernel> {
    let all = PromptInt8Kernel::available(head_dim);
    if !all.contains(&PromptInt8Kernel::AmxBf16) {
        eprintln!("SKIP amx-bf16 prefill kernel at head_dim {head_dim}: AMX-BF16 not available on this machine");
    }
    all
}

/// K and V int8 caches `[batch, capacity, kv_heads, d]` with random parameters, filled with
/// random values (some outside the calibrated range, so saturation is exercised too).
fn filled_caches(rng: &mut Rng, batch: usize, capacity: usize, kv_heads: usize, d: usize) -> Result<[Int8KvCache; 2]> {
    let mut out = Vec::with_capacity(2);
    for (lo, hi) in [(-3.2, 3.2), (-1.5, 1.5)] {
        let mut cache = Int8KvCache::new(batch, capacity, kv_heads, d, random_kv_params(rng, kv_heads * d)?)?;
        let x = rng.tensor(&[batch, capacity, kv_heads, d], lo, hi, DType::F32)?;
        kv_write_int8(&mut cache, &x, &vec![0; batch])?;
        out.push(cache);
    }
    let [k, v]: [Int8KvCache; 2] = out.try_into().map_err(|_| candle_core::Error::Msg("two caches".into()))?;
    Ok([k, v])
}

/// Kernel and reference both attend the same dequantized values in f32; they differ by the
/// f32 rounding of the score sums and by the output's storage rounding. The kernel sums
/// `(q s_k) x_q` over raw int8 values: in a one-sided channel (offset near +-128) `|x_q|` is
/// up to ~255 steps larger than the dequantized value's `|x_q + offset|`, so a score carries
/// the rounding of a sum a few times larger than the reference's (the extra term is the
/// per-row constant that cancels in the softmax). Four times the float ops' tolerance.
fn tolerance(dtype: DType) -> Tolerance {
    Tolerance::for_dtype(dtype).times(4.0)
}

fn list(xs: &[usize]) -> String {
    xs.iter().map(|x| x.to_string()).collect::<Vec<_>>().join("/")
}

/// (cache batch, capacity, S, q_start, q_lens, strided q).
type PromptCase = (usize, usize, usize, &'static [usize], &'static [usize], bool);

#[test]
fn prompt_int8_every_isa_matches_reference() -> Result<()> {
    let mut rng = Rng::fresh("attention::int8_tests::prompt_int8_every_isa_matches_reference");
    for dtype in FLOAT_DTYPES {
        for d in [64, 128] {
            for (heads, kv_heads) in HEAD_LAYOUTS {
                // A fresh ragged prefill on a batch prefix, then chunked prefill (q_start > 0)
                // over several key blocks, and a whole 512-token prefill.
                let cases: [PromptCase; 3] = [
                    (3, 64, 20, &[0, 0], &[20, 7], false),
                    (2, 200, 70, &[10, 130], &[70, 33], true),
                    (2, 512, 512, &[0, 0], &[512, 300], false),
                ];
                for (batch, capacity, s, q_start, q_lens, strided) in cases {
                    let b = q_lens.len();
                    let [k, v] = filled_caches(&mut rng, batch, capacity, kv_heads, d)?;
                    let q = if strided {
                        let wide = rng.tensor(&[b, s, heads + 2 * kv_heads, d], -2.0, 2.0, dtype)?;
                        wide.narrow(2, kv_heads, heads)?
                    } else {
                        rng.tensor(&[b, s, heads, d], -2.0, 2.0, dtype)?
                    };
                    let scale = 1.0 / (d as f32).sqrt();
                    let reference = prompt_attention_int8_reference(&q, &k, &v, q_start, q_lens, scale)?;
                    for kernel in prompt_kernels(d) {
                        let extra = format!(
                            "kv_heads={kv_heads},B={batch},T={capacity},q_start={},q_lens={},strided={strided},{}",
                            list(q_start),
                            list(q_lens),
                            kernel.name()
                        );
                        let id = case_id("PROMPT_ATTENTION_INT8", dtype, &[b, s, heads, d], &extra);
                        eprintln!("{id}");
                        let got = prompt_attention_int8_with(kernel, &q, &k, &v, q_start, q_lens, scale)?;
                        if got.dtype() != dtype {
                            bail!("{id}: output dtype {:?}", got.dtype());
                        }
                        assert_close(&id, &got, &reference, tolerance(dtype))?;
                        // Padding rows are exact zeros.
                        let pad = got.i((1, q_lens[1]..))?.to_dtype(DType::F32)?.abs()?.sum_all()?;
                        assert_eq!(pad.to_scalar::<f32>()?, 0.0, "{id}: padding rows");
                    }
                    let public = prompt_attention_int8(&q, &k, &v, q_start, q_lens, scale)?;
                    assert_close("PROMPT_ATTENTION_INT8(public)", &public, &reference, tolerance(dtype))?;
                }
            }
        }
    }
    Ok(())
}

#[test]
fn decode_int8_every_isa_and_chunking_matches_reference() -> Result<()> {
    let mut rng = Rng::fresh("attention::int8_tests::decode_int8_every_isa_and_chunking_matches_reference");
    for dtype in FLOAT_DTYPES {
        for d in [64, 128] {
            for (heads, kv_heads) in HEAD_LAYOUTS {
                // Cache batch 4, a step over its first 3 sequences; one long enough for the
                // default plan to split it into key chunks (flash-decoding).
                let (batch, capacity) = (4, 1300);
                let kv_lens = [1300, 1, 517];
                let b = kv_lens.len();
                let [k, v] = filled_caches(&mut rng, batch, capacity, kv_heads, d)?;
                let q = rng.tensor(&[b, 1, heads + kv_heads, d], -2.0, 2.0, dtype)?.narrow(2, 0, heads)?;
                let scale = 1.0 / (d as f32).sqrt();
                let reference = decode_attention_int8_reference(&q, &k, &v, &kv_lens, scale)?;
                let dims = validate_decode("test", &q, &k, &v, scale)?;
                check_decode_lengths("test", &dims, &kv_lens)?;
                let plans = [(64, true), (320, false), (usize::MAX, true)]
                    .map(|(chunk, parallel)| Some(DecodePlan { chunk, parallel }));
                for (name, isa) in isas(d) {
                    for plan in [None].into_iter().chain(plans) {
                        let extra = format!(
                            "kv_heads={kv_heads},B={batch},T={capacity},kv_lens=1300/1/517,{name},plan={plan:?}"
                        );
                        let id = case_id("DECODE_ATTENTION_INT8", dtype, &[b, 1, heads, d], &extra);
                        eprintln!("{id}");
                        let got = cpu::decode_attention_int8(isa, &q, &k, &v, &kv_lens, scale, &dims, plan)?;
                        if got.dtype() != dtype {
                            bail!("{id}: output dtype {:?}", got.dtype());
                        }
                        assert_close(&id, &got, &reference, tolerance(dtype))?;
                    }
                }
                let public = decode_attention_int8(&q, &k, &v, &kv_lens, scale)?;
                assert_close("DECODE_ATTENTION_INT8(public)", &public, &reference, tolerance(dtype))?;
            }
        }
    }
    Ok(())
}

/// Per-channel (min, max) of `x` `[B, T, Nkv, D]` over its first `lens[b]` tokens.
fn calibrate(x: &Tensor, lens: &[usize]) -> Result<KvQuantParams> {
    let (_, _, n, d) = x.dims4()?;
    let mut min = vec![f32::INFINITY; n * d];
    let mut max = vec![f32::NEG_INFINITY; n * d];
    for (b, &len) in lens.iter().enumerate() {
        let rows = x.i(b)?.narrow(0, 0, len)?.reshape((len, n * d))?.to_vec2::<f32>()?;
        for row in rows {
            for (c, &v) in row.iter().enumerate() {
                min[c] = min[c].min(v);
                max[c] = max[c].max(v);
            }
        }
    }
    KvQuantParams::from_range(&min, &max)
}

/// Worst-case error of int8-cache attention against float-cache attention, for K/V inside
/// their calibrated ranges (so every element is off by at most half a step, `s/2`):
/// a score moves by at most `delta = scale * max_row sum_t |q_t| s_k,t / 2`, so each softmax
/// weight by a factor within `e^(+-2 delta)` after renormalization, which moves a convex
/// combination of values by at most `max|v| (e^(2 delta) - 1)`; the values themselves are off
/// by at most `max_c s_v,c / 2`. Plus a little f32 slack.
fn error_bound(q: &Tensor, k: &KvQuantParams, v: &KvQuantParams, v_max: f32, scale: f32) -> Result<f32> {
    let (b, s, heads, d) = q.dims4()?;
    let kv_heads = k.channels() / d;
    let group = heads / kv_heads;
    let rows = q.to_dtype(DType::F32)?.reshape((b * s * heads, d))?.to_vec2::<f32>()?;
    let mut delta = 0f32;
    for (r, row) in rows.iter().enumerate() {
        let g = (r % heads) / group;
        let sum: f32 = row.iter().zip(&k.scale[g * d..(g + 1) * d]).map(|(x, s)| x.abs() * s / 2.0).sum();
        delta = delta.max(scale * sum);
    }
    let v_step = v.scale.iter().fold(0f32, |m, &s| m.max(s / 2.0));
    Ok(v_max * ((2.0 * delta).exp() - 1.0) + v_step + 1e-5)
}

#[test]
fn int8_cache_is_close_to_float_cache() -> Result<()> {
    let mut rng = Rng::fresh("attention::int8_tests::int8_cache_is_close_to_float_cache");
    for (heads, kv_heads, d) in [(9, 3, 64), (14, 2, 64), (4, 4, 128)] {
        let (b, capacity) = (2, 1100);
        let k = rng.tensor(&[b, capacity, kv_heads, d], -2.0, 2.0, DType::F32)?;
        let v = rng.tensor(&[b, capacity, kv_heads, d], -1.0, 1.0, DType::F32)?;
        let kv_lens = [1100, 300];
        let (kp, vp) = (calibrate(&k, &kv_lens)?, calibrate(&v, &kv_lens)?);
        let mut k8 = Int8KvCache::new(b, capacity, kv_heads, d, kp.clone())?;
        let mut v8 = Int8KvCache::new(b, capacity, kv_heads, d, vp.clone())?;
        kv_write_int8(&mut k8, &k, &[0, 0])?;
        kv_write_int8(&mut v8, &v, &[0, 0])?;
        let scale = 1.0 / (d as f32).sqrt();
        let v_max = v.abs()?.max_all()?.to_scalar::<f32>()?;

        let q = rng.tensor(&[b, 1, heads, d], -2.0, 2.0, DType::F32)?;
        let exact = decode_attention(&q, &k, &v, &kv_lens, scale)?;
        let int8 = decode_attention_int8(&q, &k8, &v8, &kv_lens, scale)?;
        let bound = error_bound(&q, &kp, &vp, v_max, scale)?;
        compare(
            &case_id("DECODE_ATTENTION_INT8_VS_FLOAT", DType::F32, &[b, 1, heads, d], ""),
            &int8,
            &exact,
            bound,
            &vp,
        )?;

        let (s, q_start, q_lens) = (40, [1060, 200], [40, 25]);
        let q = rng.tensor(&[b, s, heads, d], -2.0, 2.0, DType::F32)?;
        let exact = prompt_attention(&q, &k, &v, &q_start, &q_lens, scale)?;
        let int8 = prompt_attention_int8(&q, &k8, &v8, &q_start, &q_lens, scale)?;
        let bound = error_bound(&q, &kp, &vp, v_max, scale)?;
        compare(
            &case_id("PROMPT_ATTENTION_INT8_VS_FLOAT", DType::F32, &[b, s, heads, d], ""),
            &int8,
            &exact,
            bound,
            &vp,
        )?;
    }
    Ok(())
}

/// Max absolute difference within `bound` (the rigorous worst case), and the RMS difference
/// within the RMS error of rounding one value, `max_c s_v,c / sqrt(12)`: an output averages
/// many independently rounded values (weights summing to 1) under scores perturbed by
/// independent key rounding, so its typical error stays below one value's (measured 5-6x
/// below for these sizes). The worst case is loose (it assumes every rounding error lines
/// up); the RMS check is what catches a systematic mistake such as a value offset off by one
/// step.
fn compare(id: &str, got: &Tensor, exact: &Tensor, bound: f32, v: &KvQuantParams) -> Result<()> {
    let diff = (got - exact)?;
    let max = diff.abs()?.max_all()?.to_scalar::<f32>()?;
    let rms = diff.sqr()?.mean_all()?.to_scalar::<f32>()?.sqrt();
    let rms_bound = v.scale.iter().fold(0f32, |m, &s| m.max(s)) / 12f32.sqrt();
    eprintln!("{id}: max |int8 - float| = {max:.2e} (bound {bound:.2e}), rms = {rms:.2e} (bound {rms_bound:.2e})");
    if !(max <= bound && rms <= rms_bound) {
        bail!("{id}: max error {max:.3e} (bound {bound:.3e}), rms {rms:.3e} (bound {rms_bound:.3e})");
    }
    Ok(())
}

#[test]
fn int8_attention_rejects_bad_input() -> Result<()> {
    let mut rng = Rng::seeded(5);
    let [k, v] = filled_caches(&mut rng, 2, 8, 2, 64)?;
    let q = rng.tensor(&[2, 4, 4, 64], -1.0, 1.0, DType::F32)?;
    let q1 = q.narrow(1, 0, 1)?;
    let id = |what: &str| case_id("ATTENTION_INT8", DType::F32, &[2, 4, 4, 64], what);
    prompt_attention_int8(&q, &k, &v, &[0, 4], &[4, 4], 0.125)?;
    decode_attention_int8(&q1, &k, &v, &[1, 8], 0.125)?;
    let checks: [(&str, Result<Tensor>); 12] = [
        ("q_start+q_len>T", prompt_attention_int8(&q, &k, &v, &[0, 5], &[4, 4], 0.125)),
        ("q_len>S", prompt_attention_int8(&q, &k, &v, &[0, 0], &[4, 5], 0.125)),
        ("lengths!=B'", prompt_attention_int8(&q, &k, &v, &[0], &[4], 0.125)),
        ("scale=nan", prompt_attention_int8(&q, &k, &v, &[0, 0], &[4, 4], f32::NAN)),
        ("kv_len=0", decode_attention_int8(&q1, &k, &v, &[0, 8], 0.125)),
        ("kv_len>T", decode_attention_int8(&q1, &k, &v, &[1, 9], 0.125)),
        ("decode S=4", decode_attention_int8(&q, &k, &v, &[1, 8], 0.125)),
        ("B'>B", decode_attention_int8(&Tensor::cat(&[&q1, &q1], 0)?, &k, &v, &[1; 4], 0.125)),
        ("Nq%Nkv!=0", decode_attention_int8(&q1.narrow(2, 0, 3)?, &k, &v, &[1, 8], 0.125)),
        ("head_dim", decode_attention_int8(&q1.narrow(3, 0, 32)?, &k, &v, &[1, 8], 0.125)),
        ("dtype", decode_attention_int8(&q1.to_dtype(DType::I64)?, &k, &v, &[1, 8], 0.125)),
        ("k_v_dims", {
            let [_, v_short] = filled_caches(&mut rng, 2, 7, 2, 64)?;
            decode_attention_int8(&q1, &k, &v_short, &[1, 7], 0.125)
        }),
    ];
    for (what, result) in checks {
        if result.is_ok() {
            bail!("{}: bad input accepted", id(what));
        }
    }
    // A batch prefix is fine and equals the full-batch result's first rows.
    let full = decode_attention_int8(&q1, &k, &v, &[3, 8], 0.125)?;
    let prefix = decode_attention_int8(&q1.narrow(0, 0, 1)?, &k, &v, &[3], 0.125)?;
    assert_close(&id("prefix"), &prefix, &full.narrow(0, 0, 1)?, Tolerance::for_dtype(DType::F32))
}
