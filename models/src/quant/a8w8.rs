//! A8W8 parameters from float weights and calibrated input ranges (DESIGN.md section 6):
//! SmoothQuant migration scales, per-output-channel symmetric int8 weights, static
//! per-tensor asymmetric activation parameters and the int32 bias carrying the zero point.

use super::calibrate::ChannelRange;
use crate::config::ModelConfig;
use crate::model::HostLayer;
use candle_core::{DType, Result, Tensor};

/// One A8W8 linear: `y = (q(x) @ w_q^T + bias_q) * deq_scale`, `q(x) = round(x * act_scale +
/// act_offset)` saturated to int8.
#[derive(Debug, Clone, PartialEq)]
pub struct Int8Linear {
    pub w_q: Vec<i8>,
    pub out_features: usize,
    pub in_features: usize,
    pub deq_scale: Vec<f32>,
    pub bias_q: Vec<i32>,
    /// `1 / s_x`.
    pub act_scale: f32,
    /// The zero point z.
    pub act_offset: f32,
}

/// Static per-tensor asymmetric parameters `(s_x, z)` for inputs in `[min, max]` (the range
/// is widened to include 0 so that zero is exact).
pub fn activation_params(min: f32, max: f32) -> (f32, f32) {
    let (lo, hi) = (min.min(0.0), max.max(0.0));
    let s_x = ((hi - lo) / 255.0).max(f32::MIN_POSITIVE * 1e6);
    let z = (-128.0 - lo / s_x).round().clamp(-128.0, 127.0);
    (s_x, z)
}

/// Quantizes `weight` `[N, K]` (per output channel, symmetric) for inputs in `[x_min, x_max]`.
pub fn quantize_linear(weight: &Tensor, bias: Option<&Tensor>, x_min: f32, x_max: f32) -> Result<Int8Linear> {
    let (n, k) = weight.dims2()?;
    let w = weight.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let bias = bias.map(|b| b.to_dtype(DType::F32)?.to_vec1::<f32>()).transpose()?;
    let (s_x, z) = activation_params(x_min, x_max);
    let mut w_q = vec![0i8; n * k];
    let mut deq_scale = vec![0f32; n];
    let mut bias_q = vec![0i32; n];
    for r in 0..n {
        let row = &w[r * k..(r + 1) * k];
        let absmax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
        let s_w = if absmax > 0.0 { absmax / 127.0 } else { 1.0 };
        let mut sum_q = 0i64;
        for (dst, &v) in w_q[r * k..(r + 1) * k].iter_mut().zip(row) {
            let q = (v / s_w).round().clamp(-127.0, 127.0) as i8;
            sum_q += q as i64;
            *dst = q;
        }
        let deq = s_x * s_w;
        deq_scale[r] = deq;
        let b = bias.as_ref().map_or(0.0, |b| b[r]);
        let corrected = -(z as i64) * sum_q + (b / deq).round() as i64;
        bias_q[r] = corrected.clamp(i32::MIN as i64, i32::MAX as i64) as i32;
    }
    Ok(Int8Linear { w_q, out_features: n, in_features: k, deq_scale, bias_q, act_scale: 1.0 / s_x, act_offset: z })
}

/// SmoothQuant migration scales `s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)` for a consumer
/// weight `[N, K]` (column maxima over N), clamped to `[1e-5, 1e5]`; 1 where a channel is dead.
pub fn smooth_scales(x_absmax: &[f32], weight: &Tensor, alpha: f64) -> Result<Vec<f32>> {
    let w_absmax = weight.to_dtype(DType::F32)?.abs()?.max(0)?.to_vec1::<f32>()?;
    Ok(smooth_from_maxima(x_absmax, &w_absmax, alpha))
}

/// [`smooth_scales`] from precomputed column maxima.
pub fn smooth_from_maxima(x_absmax: &[f32], w_absmax: &[f32], alpha: f64) -> Vec<f32> {
    x_absmax
        .iter()
        .zip(w_absmax)
        .map(|(&x, &w)| {
            if x <= 0.0 || w <= 0.0 {
                return 1.0;
            }
            let s = (x as f64).powf(alpha) / (w as f64).powf(1.0 - alpha);
            (s as f32).clamp(1e-5, 1e5)
        })
        .collect()
}

/// Per linear the per-tensor input range (A8W8 linears only), and the v-row divisor.
pub type FoldedRanges = ([Option<(f32, f32)>; 4], Option<Vec<f32>>);

/// Folds SmoothQuant migration scales (when `alpha` is given) into a layer's host weights and
/// returns the per-tensor input range of each linear that runs A8W8 (`a8w8[m]`), in the order
/// [qkv, o_proj, gate_up, down]:
/// - qkv and gate_up: `gamma_j /= s_j` in the preceding RMSNorm, `W[:, j] *= s_j`;
/// - o_proj: the v rows (and v bias) that produce input channel j are divided by s (one scale
///   per v row, shared by the query heads of a GQA group), `W_o[:, j] *= s_j`;
/// - down: the up rows are divided by s (silu(gate) * up is linear in up), `W_down[:, j] *= s_j`.
///
/// The float model is unchanged up to rounding; only the int8 ranges move. Also returns the
/// divisor applied to each v row (`Nkv * D`, when o_proj was smoothed): the values written to
/// the KV cache are divided by it, so their calibrated ranges must be too.
pub fn fold_layer(
    layer: &mut HostLayer,
    ranges: &[ChannelRange; 4],
    c: &ModelConfig,
    alpha: Option<f64>,
    a8w8: [bool; 4],
) -> Result<FoldedRanges> {
    let mut out = [None; 4];
    let mut v_divisor = None;
    let (nq, nkv, d, inter) = (c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size);
    if a8w8[0] {
        out[0] = Some(match alpha {
            Some(a) => {
                let s = smooth_scales(&ranges[0].absmax(), &layer.qkv_w, a)?;
                layer.input_norm = divide(&layer.input_norm, &s)?;
                layer.qkv_w = scale_cols(&layer.qkv_w, &s)?;
                ranges[0].tensor_range(Some(&s))
            }
            None => ranges[0].tensor_range(None),
        });
    }
    if a8w8[1] {
        out[1] = Some(match alpha {
            Some(a) => {
                let group = nq / nkv;
                let x_max = ranges[1].absmax();
                let w_max = layer.o_w.to_dtype(DType::F32)?.abs()?.max(0)?.to_vec1::<f32>()?;
                // One scale per v row: the maxima over the query heads sharing it.
                let (mut xv, mut wv) = (vec![0f32; nkv * d], vec![0f32; nkv * d]);
                for h in 0..nq {
                    for dd in 0..d {
                        let (j, r) = (h * d + dd, (h / group) * d + dd);
                        xv[r] = xv[r].max(x_max[j]);
                        wv[r] = wv[r].max(w_max[j]);
                    }
                }
                let s_v = smooth_from_maxima(&xv, &wv, a);
                let s_o: Vec<f32> = (0..nq * d).map(|j| s_v[(j / d / group) * d + j % d]).collect();
                let mut rows = vec![1f32; (nq + 2 * nkv) * d];
                for (r, s) in s_v.iter().enumerate() {
                    rows[(nq + nkv) * d + r] = 1.0 / s;
                }
                layer.qkv_w = scale_rows(&layer.qkv_w, &rows)?;
                if let Some(b) = &layer.qkv_b {
                    layer.qkv_b = Some(scale(b, &rows)?);
                }
                layer.o_w = scale_cols(&layer.o_w, &s_o)?;
                v_divisor = Some(s_v.clone());
                ranges[1].tensor_range(Some(&s_o))
            }
            None => ranges[1].tensor_range(None),
        });
    }
    if a8w8[2] {
        out[2] = Some(match alpha {
            Some(a) => {
                let s = smooth_scales(&ranges[2].absmax(), &layer.gate_up_w, a)?;
                layer.post_attention_norm = divide(&layer.post_attention_norm, &s)?;
                layer.gate_up_w = scale_cols(&layer.gate_up_w, &s)?;
                ranges[2].tensor_range(Some(&s))
            }
            None => ranges[2].tensor_range(None),
        });
    }
    if a8w8[3] {
        out[3] = Some(match alpha {
            Some(a) => {
                let s = smooth_scales(&ranges[3].absmax(), &layer.down_w, a)?;
                let rows: Vec<f32> = (0..2 * inter).map(|r| if r < inter { 1.0 } else { 1.0 / s[r - inter] }).collect();
                layer.gate_up_w = scale_rows(&layer.gate_up_w, &rows)?;
                layer.down_w = scale_cols(&layer.down_w, &s)?;
                ranges[3].tensor_range(Some(&s))
            }
            None => ranges[3].tensor_range(None),
        });
    }
    Ok((out, v_divisor))
}

fn vector_like(t: &Tensor, v: &[f32]) -> Result<Tensor> {
    Tensor::from_slice(v, v.len(), t.device())?.to_dtype(t.dtype())
}

/// `t / s` elementwise (a norm gamma).
fn divide(t: &Tensor, s: &[f32]) -> Result<Tensor> {
    t.div(&vector_like(t, s)?)
}

/// `t * s` elementwise (a bias).
fn scale(t: &Tensor, s: &[f32]) -> Result<Tensor> {
    t.mul(&vector_like(t, s)?)
}

/// `W[:, j] *= s[j]`.
fn scale_cols(w: &Tensor, s: &[f32]) -> Result<Tensor> {
    w.broadcast_mul(&vector_like(w, s)?.unsqueeze(0)?)
}

/// `W[r, :] *= s[r]`.
fn scale_rows(w: &Tensor, s: &[f32]) -> Result<Tensor> {
    w.broadcast_mul(&vector_like(w, s)?.unsqueeze(1)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn zero_is_exact_and_the_range_maps_onto_int8() {
        let (s, z) = activation_params(-1.0, 3.0);
        assert_eq!((0.0f32 / s + z).round(), z);
        assert!(((-1.0f32 / s + z).round() - -128.0).abs() <= 1.0);
        assert!(((3.0f32 / s + z).round() - 127.0).abs() <= 1.0);
    }

    #[test]
    fn int8_linear_reproduces_the_float_product() -> Result<()> {
        let w = Tensor::new(&[[0.5f32, -1.0, 0.25], [2.0, 0.0, -0.5]], &Device::Cpu)?;
        let b = Tensor::new(&[0.1f32, -0.2], &Device::Cpu)?;
        let q = quantize_linear(&w, Some(&b), -1.0, 2.0)?;
        let x = [0.3f32, -0.7, 1.9];
        for r in 0..2 {
            let mut acc = q.bias_q[r] as i64;
            for (kk, &xv) in x.iter().enumerate() {
                let xq = (xv * q.act_scale + q.act_offset).round().clamp(-128.0, 127.0) as i64;
                acc += xq * q.w_q[r * 3 + kk] as i64;
            }
            let y = acc as f32 * q.deq_scale[r];
            let row = w.get(r)?.to_vec1::<f32>()?;
            let want: f32 = (0..3).map(|kk| x[kk] * row[kk]).sum::<f32>() + b.to_vec1::<f32>()?[r];
            assert!((y - want).abs() < 0.03, "row {r}: {y} vs {want}");
        }
        Ok(())
    }

    #[test]
    fn smoothing_balances_activation_and_weight_maxima() {
        let s = smooth_from_maxima(&[100.0, 1.0, 0.0], &[1.0, 4.0, 2.0], 0.5);
        assert!((s[0] - 10.0).abs() < 1e-4 && (s[1] - 0.5).abs() < 1e-6 && s[2] == 1.0);
    }
}
