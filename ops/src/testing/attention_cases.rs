//! Conformance cases for `prompt_attention` and `decode_attention`: every float dtype, head
//! dims 64 and 128, GQA ratios 1, 3 and 7, ragged batches, continuation over a cache that
//! already holds earlier keys, strided q (a narrow of a fused qkv output), decode lengths from
//! 1 to 1500 keys, and bad input that must be rejected with an error.

use candle_core::{DType, IndexOp, Result, Tensor, bail};

use super::{FLOAT_DTYPES, OpBackend, Rng, Tolerance, assert_close, case_id};

/// (Nq, Nkv): plain multi-head, SmolLM2's 9/3 and Qwen2.5-0.5B's 14/2.
const HEAD_LAYOUTS: [(usize, usize); 3] = [(4, 4), (9, 3), (14, 2)];
const HEAD_DIMS: [usize; 2] = [64, 128];

pub fn prompt_attention(backend: &dyn OpBackend) -> Result<()> {
    let mut rng = Rng::fresh("PROMPT_ATTENTION");
    for dtype in FLOAT_DTYPES {
        for d in HEAD_DIMS {
            for (heads, kv_heads) in HEAD_LAYOUTS {
                let shape = Heads { d, heads, kv_heads };
                // Fresh prompts of different lengths in one batch.
                prompt_case(backend, &mut rng, dtype, shape, 32, 17, &[0, 0, 0], &[5, 17, 1], false)?;
                // Continuation: each cache already holds earlier keys; q is strided.
                prompt_case(backend, &mut rng, dtype, shape, 96, 17, &[3, 40, 0], &[5, 17, 1], true)?;
                // Several query and key blocks, one empty sequence, cache filled to capacity.
                prompt_case(backend, &mut rng, dtype, shape, 250, 100, &[150, 5, 0], &[100, 0, 64], false)?;
            }
        }
    }
    prompt_errors(backend)
}

pub fn decode_attention(backend: &dyn OpBackend) -> Result<()> {
    let mut rng = Rng::fresh("DECODE_ATTENTION");
    for dtype in FLOAT_DTYPES {
        for d in HEAD_DIMS {
            for (heads, kv_heads) in HEAD_LAYOUTS {
                let shape = Heads { d, heads, kv_heads };
                decode_case(backend, &mut rng, dtype, shape, 320, &[1, 37, 300], false)?;
                decode_case(backend, &mut rng, dtype, shape, 320, &[300, 1, 37], true)?;
                // Long enough for the key range to be split into chunks and merged.
                decode_case(backend, &mut rng, dtype, shape, 1536, &[1500, 9], false)?;
            }
        }
    }
    decode_errors(backend)
}

#[derive(Debug, Clone, Copy)]
struct Heads {
    d: usize,
    heads: usize,
    kv_heads: usize,
}

/// q `[B, S, Nq, D]`, contiguous or (when `strided`) `narrow(2, 1, Nq)` of a wider
/// `[B, S, Nq + 2 Nkv, D]` tensor: a nonzero start offset and outer strides of the fused width.
/// Values in [-2, 2] so that with scale 1/sqrt(D) the softmax is far from uniform.
fn query(rng: &mut Rng, dtype: DType, b: usize, s: usize, h: Heads, strided: bool) -> Result<Tensor> {
    if strided {
        rng.tensor(&[b, s, h.heads + 2 * h.kv_heads, h.d], -2.0, 2.0, dtype)?.narrow(2, 1, h.heads)
    } else {
        rng.tensor(&[b, s, h.heads, h.d], -2.0, 2.0, dtype)
    }
}

fn caches(rng: &mut Rng, dtype: DType, b: usize, capacity: usize, h: Heads) -> Result<(Tensor, Tensor)> {
    let k = rng.tensor(&[b, capacity, h.kv_heads, h.d], -2.0, 2.0, dtype)?;
    let v = rng.tensor(&[b, capacity, h.kv_heads, h.d], -1.0, 1.0, dtype)?;
    Ok((k, v))
}

fn list(xs: &[usize]) -> String {
    xs.iter().map(|x| x.to_string()).collect::<Vec<_>>().join("/")
}

#[allow(clippy::too_many_arguments)]
fn prompt_case(
    backend: &dyn OpBackend,
    rng: &mut Rng,
    dtype: DType,
    h: Heads,
    capacity: usize,
    s: usize,
    q_start: &[usize],
    q_lens: &[usize],
    strided: bool,
) -> Result<()> {
    let b = q_lens.len();
    let id = case_id(
        "PROMPT_ATTENTION",
        dtype,
        &[b, s, h.heads, h.d],
        &format!(
            "kv_heads={},T={capacity},q_start={},q_lens={}{}",
            h.kv_heads,
            list(q_start),
            list(q_lens),
            if strided { ",strided" } else { "" }
        ),
    );
    let q = query(rng, dtype, b, s, h, strided)?;
    let (k, v) = caches(rng, dtype, b, capacity, h)?;
    let scale = 1.0 / (h.d as f32).sqrt();
    let got = backend.prompt_attention(&q, &k, &v, q_start, q_lens, scale)?;
    let reference = crate::prompt_attention_reference(&q, &k, &v, q_start, q_lens, scale)?;
    if got.dtype() != dtype {
        bail!("{id}: output dtype {:?}, expected {dtype:?}", got.dtype());
    }
    assert_close(&id, &got, &reference, Tolerance::for_dtype(dtype))?;
    for (bi, &len) in q_lens.iter().enumerate() {
        if len < s {
            let padding = got.i(bi)?.narrow(0, len, s - len)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            if let Some(x) = padding.iter().find(|x| **x != 0.0) {
                bail!("{id}: padding row of sequence {bi} holds {x}, expected exact zeros");
            }
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn decode_case(
    backend: &dyn OpBackend,
    rng: &mut Rng,
    dtype: DType,
    h: Heads,
    capacity: usize,
    kv_lens: &[usize],
    strided: bool,
) -> Result<()> {
    let b = kv_lens.len();
    let id = case_id(
        "DECODE_ATTENTION",
        dtype,
        &[b, 1, h.heads, h.d],
        &format!(
            "kv_heads={},T={capacity},kv_lens={}{}",
            h.kv_heads,
            list(kv_lens),
            if strided { ",strided" } else { "" }
        ),
    );
    let q = query(rng, dtype, b, 1, h, strided)?;
    let (k, v) = caches(rng, dtype, b, capacity, h)?;
    let scale = 1.0 / (h.d as f32).sqrt();
    let got = backend.decode_attention(&q, &k, &v, kv_lens, scale)?;
    let reference = crate::decode_attention_reference(&q, &k, &v, kv_lens, scale)?;
    if got.dtype() != dtype {
        bail!("{id}: output dtype {:?}, expected {dtype:?}", got.dtype());
    }
    assert_close(&id, &got, &reference, Tolerance::for_dtype(dtype))
}

fn expect_err(id: &str, result: Result<Tensor>) -> Result<()> {
    match result {
        Ok(t) => bail!("{id}: bad input accepted (returned shape {:?}), expected an error", t.dims()),
        Err(_) => Ok(()),
    }
}

fn prompt_errors(backend: &dyn OpBackend) -> Result<()> {
    let mut rng = Rng::seeded(7);
    let h = Heads { d: 64, heads: 4, kv_heads: 2 };
    let q = query(&mut rng, DType::F32, 2, 4, h, false)?;
    let (k, v) = caches(&mut rng, DType::F32, 2, 8, h)?;
    let id = |what: &str| case_id("PROMPT_ATTENTION", DType::F32, &[2, 4, 4, 64], what);
    backend.prompt_attention(&q, &k, &v, &[0, 4], &[4, 4], 0.125)?;
    expect_err(&id("q_start+q_len>T"), backend.prompt_attention(&q, &k, &v, &[0, 5], &[4, 4], 0.125))?;
    expect_err(&id("q_len>S"), backend.prompt_attention(&q, &k, &v, &[0, 0], &[4, 5], 0.125))?;
    expect_err(&id("lengths!=B"), backend.prompt_attention(&q, &k, &v, &[0], &[4], 0.125))?;
    expect_err(&id("scale=nan"), backend.prompt_attention(&q, &k, &v, &[0, 0], &[4, 4], f32::NAN))?;
    let q5 = query(&mut rng, DType::F32, 2, 4, Heads { heads: 5, ..h }, false)?;
    expect_err(&id("Nq%Nkv!=0"), backend.prompt_attention(&q5, &k, &v, &[0, 0], &[4, 4], 0.125))?;
    let k16 = k.to_dtype(DType::F16)?;
    expect_err(&id("dtype_mismatch"), backend.prompt_attention(&q, &k16, &v, &[0, 0], &[4, 4], 0.125))?;
    let v_short = v.narrow(1, 0, 7)?;
    expect_err(&id("k_v_shape_mismatch"), backend.prompt_attention(&q, &k, &v_short, &[0, 0], &[4, 4], 0.125))?;
    let k_d32 = k.narrow(3, 0, 32)?.contiguous()?;
    expect_err(&id("head_dim_mismatch"), backend.prompt_attention(&q, &k_d32, &k_d32, &[0, 0], &[4, 4], 0.125))?;
    expect_err(&id("rank3"), backend.prompt_attention(&q.i(0)?, &k, &v, &[0, 0], &[4, 4], 0.125))
}

fn decode_errors(backend: &dyn OpBackend) -> Result<()> {
    let mut rng = Rng::seeded(11);
    let h = Heads { d: 64, heads: 4, kv_heads: 2 };
    let q = query(&mut rng, DType::F32, 2, 1, h, false)?;
    let (k, v) = caches(&mut rng, DType::F32, 2, 8, h)?;
    let id = |what: &str| case_id("DECODE_ATTENTION", DType::F32, &[2, 1, 4, 64], what);
    backend.decode_attention(&q, &k, &v, &[1, 8], 0.125)?;
    expect_err(&id("kv_len=0"), backend.decode_attention(&q, &k, &v, &[0, 8], 0.125))?;
    expect_err(&id("kv_len>T"), backend.decode_attention(&q, &k, &v, &[1, 9], 0.125))?;
    expect_err(&id("kv_lens!=B"), backend.decode_attention(&q, &k, &v, &[1, 2, 3], 0.125))?;
    let q2 = query(&mut rng, DType::F32, 2, 2, h, false)?;
    expect_err(&id("S=2"), backend.decode_attention(&q2, &k, &v, &[1, 8], 0.125))?;
    let q5 = query(&mut rng, DType::F32, 2, 1, Heads { heads: 5, ..h }, false)?;
    expect_err(&id("Nq%Nkv!=0"), backend.decode_attention(&q5, &k, &v, &[1, 8], 0.125))?;
    let q16 = q.to_dtype(DType::BF16)?;
    expect_err(&id("dtype_mismatch"), backend.decode_attention(&q16, &k, &v, &[1, 8], 0.125))?;
    expect_err(&id("scale=inf"), backend.decode_attention(&q, &k, &v, &[1, 8], f32::INFINITY))
}
