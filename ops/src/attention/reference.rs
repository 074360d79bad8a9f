//! f32 references for the attention ops, composed only of plain candle ops (matmul, exp, max,
//! sum, explicit masks, repeated K/V). Slow and simple on purpose: they are the oracle of the
//! conformance suite.

use candle_core::{D, DType, IndexOp, Result, Tensor};

use super::{validate_decode, validate_prompt};

/// Reference for [`super::prompt_attention`]: same contract, f32 math from candle ops, an
/// explicit additive causal mask per sequence and padding rows multiplied by zero.
pub fn prompt_attention_reference(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    q_start: &[usize],
    q_lens: &[usize],
    scale: f32,
) -> Result<Tensor> {
    let dims = validate_prompt("prompt_attention_reference", q, k_cache, v_cache, q_start, q_lens, scale)?;
    let (s, heads, d) = (dims.q_rows, dims.heads, dims.head_dim);
    let mut outs = Vec::with_capacity(dims.batch);
    for b in 0..dims.batch {
        let (start, len) = (q_start[b], q_lens[b]);
        if len == 0 {
            outs.push(Tensor::zeros((s, heads, d), DType::F32, q.device())?);
            continue;
        }
        let n_keys = start + len;
        let q_b = q.i(b)?.to_dtype(DType::F32)?;
        let k_b = k_cache.i(b)?.narrow(0, 0, n_keys)?.to_dtype(DType::F32)?;
        let v_b = v_cache.i(b)?.narrow(0, 0, n_keys)?.to_dtype(DType::F32)?;
        // Query row i (position start + i) may see key j iff j <= start + i. Padding rows see
        // every key (any finite softmax will do) and are zeroed below.
        let mut bias = vec![0f32; s * n_keys];
        for i in 0..len {
            for j in (start + i + 1)..n_keys {
                bias[i * n_keys + j] = f32::NEG_INFINITY;
            }
        }
        let bias = Tensor::from_vec(bias, (s, n_keys), q.device())?;
        let keep: Vec<f32> = (0..s).map(|i| if i < len { 1.0 } else { 0.0 }).collect();
        let keep = Tensor::from_vec(keep, (s, 1, 1), q.device())?;
        let out = attend(&q_b, &k_b, &v_b, Some(&bias), scale, dims.group())?;
        outs.push(out.broadcast_mul(&keep)?);
    }
    Tensor::stack(&outs, 0)?.to_dtype(dims.dtype)
}

/// Reference for [`super::decode_attention`]: the single query of sequence `b` attends the
/// first `kv_lens[b]` keys, no mask needed.
pub fn decode_attention_reference(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    kv_lens: &[usize],
    scale: f32,
) -> Result<Tensor> {
    let dims = validate_decode("decode_attention_reference", q, k_cache, v_cache, kv_lens, scale)?;
    let mut outs = Vec::with_capacity(dims.batch);
    for (b, &n_keys) in kv_lens.iter().enumerate() {
        let q_b = q.i(b)?.to_dtype(DType::F32)?;
        let k_b = k_cache.i(b)?.narrow(0, 0, n_keys)?.to_dtype(DType::F32)?;
        let v_b = v_cache.i(b)?.narrow(0, 0, n_keys)?.to_dtype(DType::F32)?;
        outs.push(attend(&q_b, &k_b, &v_b, None, scale, dims.group())?);
    }
    Tensor::stack(&outs, 0)?.to_dtype(dims.dtype)
}

/// softmax(scale * q k^T + bias) v for one sequence.
/// q: [S, Nq, D], k/v: [n, Nkv, D], bias: [S, n]; returns [S, Nq, D] (f32).
fn attend(q: &Tensor, k: &Tensor, v: &Tensor, bias: Option<&Tensor>, scale: f32, group: usize) -> Result<Tensor> {
    let q = q.transpose(0, 1)?.contiguous()?; // [Nq, S, D]
    let k = repeat_kv(&k.transpose(0, 1)?, group)?; // [Nq, n, D]
    let v = repeat_kv(&v.transpose(0, 1)?, group)?;
    let scores = q.matmul(&k.t()?.contiguous()?)?.affine(f64::from(scale), 0.0)?; // [Nq, S, n]
    let scores = match bias {
        Some(bias) => scores.broadcast_add(bias)?,
        None => scores,
    };
    let max = scores.max_keepdim(D::Minus1)?;
    let exp = scores.broadcast_sub(&max)?.exp()?;
    let probs = exp.broadcast_div(&exp.sum_keepdim(D::Minus1)?)?;
    probs.matmul(&v)?.transpose(0, 1)?.contiguous()
}

/// [Nkv, n, D] -> [Nkv * group, n, D], each kv head repeated `group` times in place.
fn repeat_kv(x: &Tensor, group: usize) -> Result<Tensor> {
    let (kv_heads, n, d) = x.dims3()?;
    x.contiguous()?.unsqueeze(1)?.broadcast_as((kv_heads, group, n, d))?.contiguous()?.reshape((kv_heads * group, n, d))
}
