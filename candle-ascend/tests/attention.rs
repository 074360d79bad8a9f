//! Fused attention on ascend-sim against a host reference: prefill with a causal mask, GQA and ragged lengths;
//! decode over a fixed cache with per-sequence lengths, in float and with an int8 cache plus antiquant.

mod common;

use candle_ascend::aclnn::attention::{
    AttentionLayout, AttentionParams, CausalMask, PromptMasking, incre_flash_attention, prompt_flash_attention,
};
use candle_ascend::{DType, NpuTensor};

fn data(n: usize, seed: f32) -> Vec<f32> {
    (0..n).map(|i| (i as f32 * 0.61 + seed).sin()).collect()
}

/// softmax(scale q.k) v over `keys[..len]`.
fn reference(q: &[f32], keys: &[Vec<f32>], values: &[Vec<f32>], scale: f32) -> Vec<f32> {
    let scores: Vec<f32> = keys.iter().map(|k| q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale).collect();
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let w: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
    let total: f32 = w.iter().sum();
    (0..q.len()).map(|e| w.iter().zip(values).map(|(w, v)| w / total * v[e]).sum()).collect()
}

#[test]
fn prefill_causal_gqa_with_ragged_lengths() {
    let dev = common::device();
    let (b, s, nh, nkv, d) = (2, 4, 4, 2, 8);
    let (q, k, v) = (data(b * s * nh * d, 0.1), data(b * s * nkv * d, 0.5), data(b * s * nkv * d, 0.9));
    let mask: Vec<u8> = (0..s * s).map(|i| u8::from(i % s > i / s)).collect(); // 1 above the diagonal
    let up = |x: &[f32], heads: usize| NpuTensor::from_slice(&dev, x, &[b, s, heads, d]).expect("upload");
    let mt = NpuTensor::from_slice(&dev, &mask, &[s, s]).expect("mask");
    let params = AttentionParams { num_heads: nh, num_kv_heads: nkv, scale: 0.35, layout: AttentionLayout::Bsnd };
    let lens = [4i64, 3];
    let out = prompt_flash_attention(
        &up(&q, nh),
        &up(&k, nkv),
        &up(&v, nkv),
        PromptMasking::Full(&mt),
        Some(&lens),
        Some(&lens),
        &params,
    )
    .expect("prompt attention");
    let got = out.to_vec::<f32>().expect("out");
    let idx = |bi: usize, si: usize, n: usize, heads: usize| ((bi * s + si) * heads + n) * d;
    for bi in 0..b {
        for i in 0..lens[bi] as usize {
            for n in 0..nh {
                let g = n / (nh / nkv);
                let keys: Vec<Vec<f32>> = (0..=i).map(|j| k[idx(bi, j, g, nkv)..][..d].to_vec()).collect();
                let values: Vec<Vec<f32>> = (0..=i).map(|j| v[idx(bi, j, g, nkv)..][..d].to_vec()).collect();
                let want = reference(&q[idx(bi, i, n, nh)..][..d], &keys, &values, 0.35);
                common::assert_close(&got[idx(bi, i, n, nh)..][..d], &want, 1e-5, &format!("b{bi} s{i} n{n}"));
            }
        }
    }
}

/// A (B, N, S, D) cache with per-sequence lengths, one query token per sequence (BNSD).
fn decode_case(int8: bool) {
    let dev = common::device();
    let (b, nh, nkv, cap, d) = (2, 4, 2, 8, 8);
    let q = data(b * nh * d, 0.3);
    let lens = [5i64, 8];
    let params = AttentionParams { num_heads: nh, num_kv_heads: nkv, scale: 0.4, layout: AttentionLayout::Bnsd };
    let qt = NpuTensor::from_slice(&dev, &q, &[b, nh, 1, d]).expect("q");
    let kf = data(b * nkv * cap * d, 0.7);
    let vf = data(b * nkv * cap * d, 1.3);
    // Float view of the cache the kernel should see (dequantised for the int8 case).
    let (kd, vd, out) = if int8 {
        // Per channel (2, N, 1, D): row 0 keys, row 1 values; x = (q + offset) * scale.
        let scale: Vec<f32> = (0..2 * nkv * d).map(|i| 0.01 + 0.001 * i as f32).collect();
        let offset: Vec<f32> = (0..2 * nkv * d).map(|i| (i % 5) as f32 - 2.0).collect();
        let quant = |x: &[f32], kind: usize| -> Vec<i8> {
            x.iter()
                .enumerate()
                .map(|(i, &val)| {
                    let c = ((i / (cap * d)) % nkv) * d + i % d;
                    let (s, o) = (scale[kind * nkv * d + c], offset[kind * nkv * d + c]);
                    (val / s - o).round().clamp(-128.0, 127.0) as i8
                })
                .collect()
        };
        let (kq, vq) = (quant(&kf, 0), quant(&vf, 1));
        let deq = |xq: &[i8], kind: usize| -> Vec<f32> {
            xq.iter()
                .enumerate()
                .map(|(i, &val)| {
                    let c = ((i / (cap * d)) % nkv) * d + i % d;
                    (val as f32 + offset[kind * nkv * d + c]) * scale[kind * nkv * d + c]
                })
                .collect()
        };
        let kt = NpuTensor::from_slice(&dev, &kq, &[b, nkv, cap, d]).expect("k");
        let vt = NpuTensor::from_slice(&dev, &vq, &[b, nkv, cap, d]).expect("v");
        let st = NpuTensor::from_slice(&dev, &scale, &[2, nkv, 1, d]).expect("scale");
        let ot = NpuTensor::from_slice(&dev, &offset, &[2, nkv, 1, d]).expect("offset");
        let out = incre_flash_attention(&qt, &kt, &vt, &lens, None, Some((&st, Some(&ot))), &params).expect("decode");
        (deq(&kq, 0), deq(&vq, 1), out)
    } else {
        let kt = NpuTensor::from_slice(&dev, &kf, &[b, nkv, cap, d]).expect("k");
        let vt = NpuTensor::from_slice(&dev, &vf, &[b, nkv, cap, d]).expect("v");
        let out = incre_flash_attention(&qt, &kt, &vt, &lens, None, None, &params).expect("decode");
        (kf.clone(), vf.clone(), out)
    };
    let got = out.to_vec::<f32>().expect("out");
    for bi in 0..b {
        for n in 0..nh {
            let g = n / (nh / nkv);
            let row = |x: &[f32], j: usize| x[((bi * nkv + g) * cap + j) * d..][..d].to_vec();
            let keys: Vec<Vec<f32>> = (0..lens[bi] as usize).map(|j| row(&kd, j)).collect();
            let values: Vec<Vec<f32>> = (0..lens[bi] as usize).map(|j| row(&vd, j)).collect();
            let at = (bi * nh + n) * d;
            let want = reference(&q[at..at + d], &keys, &values, 0.4);
            common::assert_close(&got[at..at + d], &want, 1e-4, &format!("b{bi} n{n} int8={int8}"));
        }
    }
}

#[test]
fn decode_over_a_float_cache_with_per_sequence_lengths() {
    decode_case(false);
}

#[test]
fn decode_over_an_int8_cache_with_antiquant() {
    decode_case(true);
}

#[test]
fn decode_rejects_an_int8_cache_without_antiquant_parameters() {
    let dev = common::device();
    let q = NpuTensor::from_slice(&dev, &[0f32; 8], &[1, 1, 1, 8]).expect("q");
    let k = NpuTensor::from_slice(&dev, &[0i8; 32], &[1, 1, 4, 8]).expect("k");
    let params = AttentionParams { num_heads: 1, num_kv_heads: 1, scale: 1.0, layout: AttentionLayout::Bnsd };
    let err = incre_flash_attention(&q, &k, &k, &[4], None, None, &params).expect_err("int8 without antiquant");
    assert!(err.to_string().contains("antiquantScale"), "{err}");
    assert_eq!(q.dtype(), DType::F32);
}

/// The ops crate's prefill masks padding rows completely and relies on the invalid-row fix (innerPrecise 2, set
/// by the wrapper) to write them as zeros: check that, and that the other rows are unaffected.
#[test]
fn fully_masked_rows_come_out_as_zeros() {
    assert!(common::api().supports_operator("PromptFlashAttentionV3"));
    let dev = common::device();
    let (b, s, t, nh, d) = (2, 3, 5, 2, 8);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.3, |x| x.subsec_nanos() as f32 * 1e-9);
    eprintln!("seed {seed}");
    let (q, k, v) = (data(b * s * nh * d, seed), data(b * t * nh * d, seed + 0.4), data(b * t * nh * d, seed + 0.8));
    // Sequence 0: every row sees keys 0..=i. Sequence 1: row 0 sees keys 0..=2, rows 1 and 2 are padding.
    let mut mask = vec![1u8; b * s * t];
    for i in 0..s {
        mask[i * t..i * t + i + 1].fill(0);
    }
    mask[s * t..s * t + 3].fill(0);
    let qt = NpuTensor::from_slice(&dev, &q, &[b, s, nh, d]).expect("q");
    let kt = NpuTensor::from_slice(&dev, &k, &[b, t, nh, d]).expect("k");
    let vt = NpuTensor::from_slice(&dev, &v, &[b, t, nh, d]).expect("v");
    let mt = NpuTensor::from_slice(&dev, &mask, &[b, s, t]).expect("mask");
    let params = AttentionParams { num_heads: nh, num_kv_heads: nh, scale: 0.25, layout: AttentionLayout::Bsnd };
    let out = prompt_flash_attention(&qt, &kt, &vt, PromptMasking::Full(&mt), None, None, &params).expect("pfa");
    let got = out.to_vec::<f32>().expect("out");
    let row = |bi: usize, i: usize, n: usize| ((bi * s + i) * nh + n) * d;
    for n in 0..nh {
        for i in 1..s {
            assert!(got[row(1, i, n)..][..d].iter().all(|&x| x == 0.0), "padding row {i} head {n} is not zero");
        }
        let keys: Vec<Vec<f32>> = (0..3).map(|j| k[((t + j) * nh + n) * d..][..d].to_vec()).collect();
        let values: Vec<Vec<f32>> = (0..3).map(|j| v[((t + j) * nh + n) * d..][..d].to_vec()).collect();
        let want = reference(&q[row(1, 0, n)..][..d], &keys, &values, 0.25);
        common::assert_close(&got[row(1, 0, n)..][..d], &want, 1e-5, "sequence 1 row 0");
    }
}

/// Sparse mode 3 (rightDownCausal) with the compressed mask: new queries after a cached prefix of a different
/// length per sequence, a ragged batch (padding rows come back as zeros), GQA; the mask is uploaded once.
#[test]
fn right_down_causal_prefill_after_cached_prefixes() {
    let dev = common::device();
    let (b, s, t, nh, nkv, d) = (3, 4, 9, 4, 2, 8);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.7, |x| x.subsec_nanos() as f32 * 1e-9);
    eprintln!("seed {seed}");
    let (q, k, v) = (data(b * s * nh * d, seed), data(b * t * nkv * d, seed + 0.5), data(b * t * nkv * d, seed + 0.9));
    // Sequence b has `prefix[b]` cached tokens and `lens[b]` new ones.
    let (prefix, lens) = ([0usize, 3, 5], [4usize, 2, 1]);
    let mask = CausalMask::new(&dev).expect("mask");
    let qt = NpuTensor::from_slice(&dev, &q, &[b, s, nh, d]).expect("q");
    let kt = NpuTensor::from_slice(&dev, &k, &[b, t, nkv, d]).expect("k");
    let vt = NpuTensor::from_slice(&dev, &v, &[b, t, nkv, d]).expect("v");
    let params = AttentionParams { num_heads: nh, num_kv_heads: nkv, scale: 0.3, layout: AttentionLayout::Bsnd };
    let seq: Vec<i64> = lens.iter().map(|&l| l as i64).collect();
    let kv: Vec<i64> = prefix.iter().zip(&lens).map(|(&p, &l)| (p + l) as i64).collect();
    let out =
        prompt_flash_attention(&qt, &kt, &vt, PromptMasking::RightDownCausal(&mask), Some(&seq), Some(&kv), &params)
            .expect("pfa sparse mode 3");
    let got = out.to_vec::<f32>().expect("out");
    let q_at = |bi: usize, i: usize, n: usize| ((bi * s + i) * nh + n) * d;
    let kv_at = |bi: usize, j: usize, g: usize| ((bi * t + j) * nkv + g) * d;
    for bi in 0..b {
        for n in 0..nh {
            let g = n / (nh / nkv);
            for i in 0..s {
                let row = &got[q_at(bi, i, n)..][..d];
                if i >= lens[bi] {
                    assert!(row.iter().all(|&x| x == 0.0), "padding row {i} of sequence {bi} head {n}: {row:?}");
                    continue;
                }
                let visible = prefix[bi] + i + 1;
                let keys: Vec<Vec<f32>> = (0..visible).map(|j| k[kv_at(bi, j, g)..][..d].to_vec()).collect();
                let values: Vec<Vec<f32>> = (0..visible).map(|j| v[kv_at(bi, j, g)..][..d].to_vec()).collect();
                let want = reference(&q[q_at(bi, i, n)..][..d], &keys, &values, 0.3);
                common::assert_close(row, &want, 1e-5, &format!("b{bi} s{i} n{n}"));
            }
        }
    }
}
