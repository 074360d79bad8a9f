//! Kernel-level tests: every ISA (the portable kernels are only reached by the public entry
//! points on CPUs without AVX-512, or for head dims that are not a multiple of 16) and forced
//! decode chunk splits, each against the f32 reference.

use candle_core::{DType, Result};

use super::cpu::{DecodePlan, decode_attention, decode_plan, prompt_attention};
use super::kernels::Isa;
use super::{decode_attention_reference, prompt_attention_reference, validate_decode, validate_prompt};
use crate::testing::{Rng, Tolerance, assert_close, case_id};

fn isas(head_dim: usize) -> Vec<(&'static str, Isa)> {
    let mut all = vec![("portable", Isa::Portable)];
    let simd = Isa::detect(head_dim);
    if !matches!(simd, Isa::Portable) {
        all.push(("simd", simd));
    }
    all
}

#[test]
fn prompt_attention_every_isa() -> Result<()> {
    let mut rng = Rng::fresh("attention::tests::prompt_attention_every_isa");
    for dtype in [DType::F32, DType::BF16] {
        for (d, heads, kv_heads) in [(64, 9, 3), (48, 4, 2), (20, 2, 1)] {
            let (b, s, t) = (2, 70, 160);
            let (q_start, q_lens) = ([10, 0], [70, 33]);
            let q = rng.tensor(&[b, s, heads, d], -2.0, 2.0, dtype)?;
            let k = rng.tensor(&[b, t, kv_heads, d], -2.0, 2.0, dtype)?;
            let v = rng.tensor(&[b, t, kv_heads, d], -1.0, 1.0, dtype)?;
            let scale = 1.0 / (d as f32).sqrt();
            let reference = prompt_attention_reference(&q, &k, &v, &q_start, &q_lens, scale)?;
            let dims = validate_prompt("test", &q, &k, &v, &q_start, &q_lens, scale)?;
            for (name, isa) in isas(d) {
                let got = prompt_attention(isa, &q, &k, &v, &q_start, &q_lens, scale, &dims)?;
                let id = case_id("PROMPT_ATTENTION", dtype, &[b, s, heads, d], &format!("kv_heads={kv_heads},{name}"));
                assert_close(&id, &got, &reference, Tolerance::for_dtype(dtype))?;
            }
        }
    }
    Ok(())
}

#[test]
fn decode_attention_every_isa_and_chunking() -> Result<()> {
    let mut rng = Rng::fresh("attention::tests::decode_attention_every_isa_and_chunking");
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for (d, heads, kv_heads) in [(64, 14, 2), (128, 4, 4), (40, 6, 3)] {
            let (b, t) = (3, 700);
            let kv_lens = [700, 1, 129];
            let q = rng.tensor(&[b, 1, heads, d], -2.0, 2.0, dtype)?;
            let k = rng.tensor(&[b, t, kv_heads, d], -2.0, 2.0, dtype)?;
            let v = rng.tensor(&[b, t, kv_heads, d], -1.0, 1.0, dtype)?;
            let scale = 1.0 / (d as f32).sqrt();
            let reference = decode_attention_reference(&q, &k, &v, &kv_lens, scale)?;
            let dims = validate_decode("test", &q, &k, &v, &kv_lens, scale)?;
            let plans = [(64, true), (100, false), (usize::MAX, true), (usize::MAX, false)]
                .map(|(chunk, parallel)| Some(DecodePlan { chunk, parallel }));
            for (name, isa) in isas(d) {
                for plan in [None].into_iter().chain(plans) {
                    let got = decode_attention(isa, &q, &k, &v, &kv_lens, scale, &dims, plan)?;
                    let extra = format!("kv_heads={kv_heads},{name},plan={plan:?}");
                    let id = case_id("DECODE_ATTENTION", dtype, &[b, 1, heads, d], &extra);
                    assert_close(&id, &got, &reference, Tolerance::for_dtype(dtype))?;
                }
            }
        }
    }
    Ok(())
}

#[test]
fn decode_plan_splits_only_work_worth_a_thread() -> Result<()> {
    let dims = |b: usize, t: usize| {
        let q = candle_core::Tensor::zeros((b, 1, 9, 64), DType::F32, &candle_core::Device::Cpu)?;
        let kv = candle_core::Tensor::zeros((b, t, 3, 64), DType::F32, &candle_core::Device::Cpu)?;
        validate_decode("test", &q, &kv, &kv, &vec![1; b], 1.0)
    };
    let serial = DecodePlan { chunk: usize::MAX, parallel: false };
    // One thread, or too little work for a second one: whole ranges on the calling thread.
    assert_eq!(decode_plan(&[1500], &dims(1, 1536)?, 1), serial);
    assert_eq!(decode_plan(&[512], &dims(1, 2048)?, 2), serial);
    // B=1 with a long cache: 3 kv heads split into 576-key chunks (8 tasks for 2 threads).
    let long = decode_plan(&[1500], &dims(1, 1536)?, 2);
    assert_eq!(long, DecodePlan { chunk: 576, parallel: true });
    // B=4 x 512 keys: 12 (sequence, kv head) pairs already feed 2 threads; chunks cover them.
    let batch = decode_plan(&[512; 4], &dims(4, 512)?, 2);
    assert!(batch.parallel && batch.chunk >= 512);
    Ok(())
}
