//! References of the int8 ops, composed from plain candle ops (float) or plain loops (exact
//! integers). They are the oracles of the tests, not fast paths.

use candle_core::{DType, Device, Result, Tensor, bail};

/// `saturate(round(x * scale + offset))` from candle ops, returned as an **f32 tensor holding
/// integer values** in [-128, 127] (candle has no i8 dtype), same shape as `x`.
/// `round` is candle's (half away from zero, like [`super::quantize`]). NaN inputs are
/// unspecified here (the kernel maps them to 0).
pub fn quantize_reference(x: &Tensor, scale: f32, offset: f32) -> Result<Tensor> {
    let x = x.to_dtype(DType::F32)?;
    // Two separate ops (mul then add, each rounded to f32) as in the kernel: no fused multiply-add.
    let v = ((x * scale as f64)? + offset as f64)?;
    v.round()?.clamp(-128f32, 127f32)
}

/// `y = (x_q @ wq^T + bias_q) * deq_scale` in f64 candle ops, returned as f32 `[..., N]`.
/// `x_q` is `[..., K]` of any dtype holding integer values (e.g. from [`quantize_reference`]),
/// `wq` is `[N, K]` row-major int8, `bias_q` and `deq_scale` are `[N]`.
pub fn quant_matmul_reference(x_q: &Tensor, wq: &[i8], bias_q: &[i32], deq_scale: &[f32]) -> Result<Tensor> {
    let n = bias_q.len();
    let dims = x_q.dims();
    let Some((&k, outer)) = dims.split_last() else {
        bail!("quant_matmul_reference: x_q must have at least one dimension");
    };
    if wq.len() != n * k || deq_scale.len() != n {
        bail!("quant_matmul_reference: wq must be [{n}, {k}] and deq_scale [{n}]");
    }
    let m: usize = outer.iter().product();
    let dev = Device::Cpu;
    let x = x_q.to_dtype(DType::F64)?.reshape((m, k))?;
    let w = Tensor::from_vec(wq.iter().map(|&v| v as f64).collect::<Vec<_>>(), (n, k), &dev)?;
    let b = Tensor::from_vec(bias_q.iter().map(|&v| v as f64).collect::<Vec<_>>(), (1, n), &dev)?;
    let s = Tensor::from_vec(deq_scale.iter().map(|&v| v as f64).collect::<Vec<_>>(), (1, n), &dev)?;
    let y = x.matmul(&w.t()?)?.broadcast_add(&b)?.broadcast_mul(&s)?;
    let mut shape = outer.to_vec();
    shape.push(n);
    y.to_dtype(DType::F32)?.reshape(shape)
}

/// Exact `sum_k x_q[m, k] wq[n, k] + bias_q[n]` in i64 by plain loops (`[m, n]` row-major):
/// the oracle of the integer accumulator tests.
pub fn quant_accumulators_reference(x_q: &[i8], m: usize, k: usize, wq: &[i8], bias_q: &[i32]) -> Vec<i64> {
    let n = bias_q.len();
    let mut out = vec![0i64; m * n];
    for r in 0..m {
        for c in 0..n {
            let dot: i64 =
                x_q[r * k..(r + 1) * k].iter().zip(&wq[c * k..(c + 1) * k]).map(|(&a, &b)| a as i64 * b as i64).sum();
            out[r * n + c] = dot + bias_q[c] as i64;
        }
    }
    out
}
