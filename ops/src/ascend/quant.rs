//! The int8 linears and activation quantization on the NPU, same contracts as the CPU ones
//! (`crate::quant`, `crate::weight_quant`, DESIGN.md section 6):
//!
//! | here | CPU contract | operators |
//! |---|---|---|
//! | [`quantize`] | `crate::quantize` | aclnnAscendQuantV3 (per tensor, multiplies: cann-facts trap 9) |
//! | [`QuantLinear`] (A8W8, static per-tensor activations) | `crate::QuantLinear::forward` | AscendQuantV3 + aclnnQuantMatmulV4 (uint64 packed or f32 deq scale) |
//! | [`PerTokenQuantLinear`] (A8W8, dynamic per-token activations, optional Hadamard rotation) | `crate::QuantLinear::forward_per_token` (+ `with_input_hadamard`) | aclnnMatmul (rotation), aclnnDynamicQuant, aclnnQuantMatmulV4 with pertokenScale, aclnnAdd (bias) |
//! | [`WeightQuantLinear`] (W8A16) | `crate::WeightQuantLinear` | aclnnWeightQuantBatchMatmulV2 |
//!
//! Weights (`[N, K]` int8 row-major) are uploaded once and passed to the matmuls as `(K, N)` transposed views
//! (`transposeX2` for QuantMatmulV4).
//!
//! Supported dtypes (what the operators allow, cann-facts 2.5):
//! - activations `x` may be f32, f16 or bf16 everywhere; where an operator does not take x's dtype, x is first
//!   cast (aclnnCast) to the layer's dtype.
//! - output dtype of [`QuantLinear`] and [`PerTokenQuantLinear`]: f16 or bf16 (QuantMatmulV4 has no f32 output);
//!   f16 with a static scale uses the uint64 packed deq scale (19-bit truncated float, trap 10), bf16 the f32 one.
//! - [`WeightQuantLinear`]: f16 or bf16 (WeightQuantBatchMatmulV2 takes f16/bf16 x only; its scale has x's dtype).
//! - [`quantize`] keeps the f32 contract exactly: AscendQuantV3 takes scale and offset in x's dtype, so when they
//!   are not exactly representable there x is cast to f32 first and the result equals `crate::quantize` bit for
//!   bit (the simulator computes `x * scale + offset` as two f32 operations, as the CPU does).

use candle_ascend::aclnn::ops::{self as acl, CubeMathType};
use candle_ascend::aclnn::quant as aq;
use candle_core::{Result, bail};
use half::{bf16, f16};

use super::{AscendDevice, NpuDType, NpuTensor};

fn check_float(op: &str, t: &NpuTensor) -> Result<()> {
    match t.dtype() {
        NpuDType::F32 | NpuDType::F16 | NpuDType::BF16 => Ok(()),
        other => bail!("{op}: dtype {other:?} is not supported (f32, f16, bf16)"),
    }
}

/// Whether `v` survives the round trip through `dtype` unchanged.
fn representable(v: f32, dtype: NpuDType) -> bool {
    match dtype {
        NpuDType::F16 => f16::from_f32(v).to_f32() == v,
        NpuDType::BF16 => bf16::from_f32(v).to_f32() == v,
        _ => true,
    }
}

/// A host f32 slice uploaded as a device tensor of `dtype` (f32, f16 or bf16).
pub(super) fn upload_float(
    device: &AscendDevice,
    values: &[f32],
    shape: &[usize],
    dtype: NpuDType,
) -> Result<NpuTensor> {
    Ok(match dtype {
        NpuDType::F16 => {
            NpuTensor::from_slice(device, &values.iter().map(|&v| f16::from_f32(v)).collect::<Vec<_>>(), shape)?
        }
        NpuDType::BF16 => {
            NpuTensor::from_slice(device, &values.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>(), shape)?
        }
        NpuDType::F32 => NpuTensor::from_slice(device, values, shape)?,
        other => bail!("upload_float: {other:?} is not a float dtype"),
    })
}

/// `x` converted to `dtype` and made contiguous (shared when it already is both).
fn contiguous_in(x: &NpuTensor, dtype: NpuDType) -> Result<NpuTensor> {
    Ok(if x.dtype() == dtype { acl::contiguous(x)? } else { acl::cast(x, dtype)? })
}

/// `(rows, K)` of `x` `[..., K]`, checking K and that there is something to compute.
fn rows_of(op: &str, x: &NpuTensor, k: usize) -> Result<usize> {
    check_float(op, x)?;
    let Some((&last, outer)) = x.shape().split_last() else {
        bail!("{op}: x must have at least one dimension, got a scalar");
    };
    if last != k {
        bail!("{op}: x has {last} features, the weight expects K = {k}");
    }
    let rows: usize = outer.iter().product();
    if rows == 0 {
        bail!("{op}: x {:?} has no rows", x.shape());
    }
    Ok(rows)
}

/// The output shape `[..., N]` of an input `[..., K]`.
fn out_shape(x: &NpuTensor, n: usize) -> Vec<usize> {
    let mut shape = x.shape().to_vec();
    if let Some(last) = shape.last_mut() {
        *last = n;
    }
    shape
}

/// Checks `w_q` against `(N, K)` and that the matmul dims fit.
/// `w_q` holds a non-empty `[N, K]` matrix and `scale` one value per output channel.
fn check_weight(op: &str, w_q: &[i8], (n, k): (usize, usize), scale: &[f32]) -> Result<()> {
    if n == 0 || k == 0 || n.checked_mul(k) != Some(w_q.len()) {
        bail!("{op}: w_q has {} values, not a non-empty [N={n}, K={k}] matrix", w_q.len());
    }
    if scale.len() != n {
        bail!("{op}: scale has {} values, expected N = {n}", scale.len());
    }
    Ok(())
}

/// A float bias `[N]` (host candle tensor, any float dtype) uploaded in `dtype`.
fn upload_bias(
    op: &str,
    device: &AscendDevice,
    bias: &candle_core::Tensor,
    n: usize,
    dtype: NpuDType,
) -> Result<NpuTensor> {
    if bias.dims() != [n] {
        bail!("{op}: bias must be [{n}], got {:?}", bias.dims());
    }
    let values = bias.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?;
    upload_float(device, &values, &[n], dtype)
}

/// Static per-tensor activation quantization, `q = saturate(round(x * scale + offset))`, with its parameters
/// uploaded once per dtype in which they are exact (f32 always).
#[derive(Debug)]
struct StaticActivationQuant {
    scale: f32,
    offset: f32,
    /// `(dtype, scale [1], offset [1])` for each float dtype that holds both values exactly.
    params: Vec<(NpuDType, NpuTensor, NpuTensor)>,
}

impl StaticActivationQuant {
    fn new(device: &AscendDevice, scale: f32, offset: f32) -> Result<Self> {
        if !scale.is_finite() || !offset.is_finite() {
            bail!("quantize: scale {scale} and offset {offset} must be finite");
        }
        let mut params = Vec::with_capacity(3);
        for dtype in [NpuDType::F32, NpuDType::F16, NpuDType::BF16] {
            if representable(scale, dtype) && representable(offset, dtype) {
                params.push((
                    dtype,
                    upload_float(device, &[scale], &[1], dtype)?,
                    upload_float(device, &[offset], &[1], dtype)?,
                ));
            }
        }
        Ok(Self { scale, offset, params })
    }

    /// Quantizes `x` (`[..., K]`, any float dtype and strides) into a new contiguous int8 tensor of its shape:
    /// in x's dtype when the parameters are exact there, else on an f32 copy of x.
    fn quantize(&self, x: &NpuTensor) -> Result<NpuTensor> {
        check_float("quantize", x)?;
        if x.rank() == 0 {
            bail!("quantize: x must have at least one dimension");
        }
        let axis = x.rank() - 1;
        if let Some((_, s, o)) = self.params.iter().find(|(d, _, _)| *d == x.dtype()) {
            return Ok(aq::ascend_quant(x, s, Some(o), axis)?);
        }
        let x32 = acl::cast(x, NpuDType::F32)?;
        let (_, s, o) = self.params.iter().find(|(d, _, _)| *d == NpuDType::F32).ok_or_else(|| {
            candle_core::Error::Msg(format!("quantize: no f32 parameters for {} / {}", self.scale, self.offset))
        })?;
        Ok(aq::ascend_quant(&x32, s, Some(o), axis)?)
    }
}

/// Static per-tensor quantization (aclnnAscendQuantV3): `q = saturate(round(x * scale + offset))`, round half
/// away from zero, of `x` `[...]` (f32, f16 or bf16, any strides) into a new contiguous int8 tensor of x's shape.
/// Equal to `crate::quantize` element for element (see the module docs for the f32 fallback).
pub fn quantize(x: &NpuTensor, scale: f32, offset: f32) -> Result<NpuTensor> {
    StaticActivationQuant::new(x.device(), scale, offset)?.quantize(x)
}

/// A8W8 with static per-tensor activations (DESIGN.md section 6):
/// `y = (quantize(x, act_scale, act_offset) @ w_q^T + bias_q) * deq_scale[n]`, output in the layer's dtype.
#[derive(Debug)]
pub struct QuantLinear {
    /// `[N, K]` int8.
    weight: NpuTensor,
    /// `[N]` i32.
    bias_q: NpuTensor,
    /// `[N]`: uint64 packed (f16 output) or f32 (bf16 output).
    deq_scale: NpuTensor,
    activation: StaticActivationQuant,
    dtype: NpuDType,
    out_features: usize,
    in_features: usize,
}

impl QuantLinear {
    /// Uploads `w_q` (`[N, K]` row-major, `shape = (N, K)`), `bias_q` `[N]` and `deq_scale` `[N]` (packed for
    /// QuantMatmulV4 when `dtype` is f16); `act_scale = 1 / s_x`, `act_offset = z` (the static activation
    /// quantization). `dtype` (the output) must be f16 or bf16.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        device: &AscendDevice,
        w_q: &[i8],
        shape: (usize, usize),
        bias_q: &[i32],
        deq_scale: &[f32],
        act_scale: f32,
        act_offset: f32,
        dtype: NpuDType,
    ) -> Result<Self> {
        const OP: &str = "ascend::QuantLinear";
        check_weight(OP, w_q, shape, deq_scale)?;
        let (n, k) = shape;
        if bias_q.len() != n {
            bail!("{OP}: bias_q has {} values, expected N = {n}", bias_q.len());
        }
        let deq_scale = match dtype {
            NpuDType::F16 => NpuTensor::from_slice(device, &aq::pack_deq_scales(deq_scale), &[n])?,
            NpuDType::BF16 => NpuTensor::from_slice(device, deq_scale, &[n])?,
            other => bail!("{OP}: output dtype {other:?} is not supported (QuantMatmulV4 gives f16 or bf16)"),
        };
        Ok(Self {
            weight: NpuTensor::from_slice(device, w_q, &[n, k])?,
            bias_q: NpuTensor::from_slice(device, bias_q, &[n])?,
            deq_scale,
            activation: StaticActivationQuant::new(device, act_scale, act_offset)?,
            dtype,
            out_features: n,
            in_features: k,
        })
    }

    /// `x` `[..., K]` (f32, f16 or bf16, any strides) -> `[..., N]` in the layer's dtype.
    pub fn forward(&self, x: &NpuTensor) -> Result<NpuTensor> {
        let rows = rows_of("ascend::QuantLinear::forward", x, self.in_features)?;
        let q = self.activation.quantize(x)?.reshape(&[rows, self.in_features])?;
        let y = aq::quant_matmul(&q, &self.weight, &self.deq_scale, Some(&self.bias_q), true, self.dtype)?;
        Ok(y.reshape(&out_shape(x, self.out_features))?)
    }

    /// Bytes of int8 weights read per forward (`N * K`).
    pub fn weight_bytes(&self) -> usize {
        self.out_features * self.in_features
    }
}

/// A8W8 with per-token symmetric activations quantized at run time: optional block Hadamard rotation of the input
/// rows, aclnnDynamicQuant (`s[m] = max|x[m, :]| / 127`), aclnnQuantMatmulV4 with `scale` per output channel
/// and the per-token scales, then the float bias. The contract of `crate::QuantLinear::forward_per_token` with
/// `deq_scale = scale`, a zero `bias_q` (and `with_input_hadamard(hadamard)` when `hadamard > 0`), plus `bias`.
#[derive(Debug)]
pub struct PerTokenQuantLinear {
    /// `[N, K]` int8 (already the rotated `W H` with a Hadamard block).
    weight: NpuTensor,
    /// `[N]` f32.
    scale: NpuTensor,
    /// `[N]` in the layer's dtype.
    bias: Option<NpuTensor>,
    /// The block size and the normalized Sylvester Hadamard matrix `(b, b)` in the layer's dtype.
    hadamard: Option<(usize, NpuTensor)>,
    dtype: NpuDType,
    out_features: usize,
    in_features: usize,
}

/// The normalized Sylvester Hadamard matrix of order `block` (a power of two), row-major: entry `(i, j)` is
/// `(-1)^popcount(i & j) / sqrt(block)`. Symmetric, so `x H` rotates each block of a row exactly as
/// `crate::hadamard_rows` does.
fn hadamard_matrix(block: usize) -> Vec<f32> {
    let norm = 1.0 / (block as f32).sqrt();
    (0..block * block)
        .map(|at| {
            let (i, j) = (at / block, at % block);
            if (i & j).count_ones() % 2 == 0 { norm } else { -norm }
        })
        .collect()
}

impl PerTokenQuantLinear {
    /// Uploads `w_q` (`[N, K]`, `shape = (N, K)`), the per-output-channel weight `scale` `[N]`, the optional float
    /// `bias` `[N]` (host tensor, any float dtype) and, for `hadamard > 0` (a power of two >= 2 dividing K), the
    /// `(hadamard, hadamard)` rotation. `dtype` (the output) must be f16 or bf16 (aclnnDynamicQuant takes f16/bf16).
    pub fn new(
        device: &AscendDevice,
        w_q: &[i8],
        shape: (usize, usize),
        scale: &[f32],
        bias: Option<&candle_core::Tensor>,
        hadamard: usize,
        dtype: NpuDType,
    ) -> Result<Self> {
        const OP: &str = "ascend::PerTokenQuantLinear";
        check_weight(OP, w_q, shape, scale)?;
        let (n, k) = shape;
        if !matches!(dtype, NpuDType::F16 | NpuDType::BF16) {
            bail!("{OP}: dtype {dtype:?} is not supported (f16 or bf16: DynamicQuant and QuantMatmulV4)");
        }
        let hadamard = if hadamard > 0 {
            crate::quant::check_hadamard_block(k, hadamard)?;
            Some((hadamard, upload_float(device, &hadamard_matrix(hadamard), &[hadamard, hadamard], dtype)?))
        } else {
            None
        };
        Ok(Self {
            weight: NpuTensor::from_slice(device, w_q, &[n, k])?,
            scale: NpuTensor::from_slice(device, scale, &[n])?,
            bias: bias.map(|b| upload_bias(OP, device, b, n, dtype)).transpose()?,
            hadamard,
            dtype,
            out_features: n,
            in_features: k,
        })
    }

    /// `x` `[..., K]` (f32, f16 or bf16, any strides; cast to the layer's dtype first) -> `[..., N]` in the
    /// layer's dtype.
    pub fn forward(&self, x: &NpuTensor) -> Result<NpuTensor> {
        let (n, k) = (self.out_features, self.in_features);
        let rows = rows_of("ascend::PerTokenQuantLinear::forward", x, k)?;
        let x2 = contiguous_in(x, self.dtype)?.reshape(&[rows, k])?;
        let x2 = match &self.hadamard {
            Some((block, h)) => {
                let blocks = x2.reshape(&[rows * k / block, *block])?;
                acl::matmul(&blocks, h, CubeMathType::KeepDtype)?.reshape(&[rows, k])?
            }
            None => x2,
        };
        let (q, token_scale) = aq::dynamic_quant(&x2)?;
        let y = aq::quant_matmul_per_token(&q, &self.weight, &self.scale, &token_scale, None, true, self.dtype)?;
        let y = match &self.bias {
            Some(b) => acl::add(&y, b, 1.0)?,
            None => y,
        };
        Ok(y.reshape(&out_shape(x, n))?)
    }

    /// Bytes of int8 weights read per forward (`N * K`).
    pub fn weight_bytes(&self) -> usize {
        self.out_features * self.in_features
    }
}

/// The most output channels (and input features) one WeightQuantBatchMatmulV2 call takes (cann-facts trap 11).
const WQBMM_MAX_DIM: usize = 65535;

/// W8A16: `y = x @ (w_q * scale[n])^T + bias` (aclnnWeightQuantBatchMatmulV2, per-channel antiquant, no offset).
/// N above 65535 (an lm_head) runs as column blocks written into one output.
#[derive(Debug)]
pub struct WeightQuantLinear {
    /// `[N, K]` int8.
    weight: NpuTensor,
    /// `[N]` in the layer's dtype (the operator takes the antiquant scale in x's dtype).
    scale: NpuTensor,
    /// `[N]`: the layer's dtype for f16, f32 for bf16 (what the operator documents).
    bias: Option<NpuTensor>,
    dtype: NpuDType,
    out_features: usize,
    in_features: usize,
}

impl WeightQuantLinear {
    /// Uploads `w_q` (`[N, K]`, `shape = (N, K)`, K <= 65535), the per-channel `scale` `[N]` and the optional
    /// `bias` `[N]`. `dtype` must be f16 or bf16.
    pub fn new(
        device: &AscendDevice,
        w_q: &[i8],
        shape: (usize, usize),
        scale: &[f32],
        bias: Option<&candle_core::Tensor>,
        dtype: NpuDType,
    ) -> Result<Self> {
        const OP: &str = "ascend::WeightQuantLinear";
        check_weight(OP, w_q, shape, scale)?;
        let (n, k) = shape;
        if k > WQBMM_MAX_DIM {
            bail!("{OP}: K = {k} exceeds {WQBMM_MAX_DIM} (WeightQuantBatchMatmulV2)");
        }
        let bias_dtype = match dtype {
            NpuDType::F16 => NpuDType::F16,
            NpuDType::BF16 => NpuDType::F32,
            other => bail!("{OP}: dtype {other:?} is not supported (WeightQuantBatchMatmulV2 takes f16 or bf16)"),
        };
        Ok(Self {
            weight: NpuTensor::from_slice(device, w_q, &[n, k])?,
            scale: upload_float(device, scale, &[n], dtype)?,
            bias: bias.map(|b| upload_bias(OP, device, b, n, bias_dtype)).transpose()?,
            dtype,
            out_features: n,
            in_features: k,
        })
    }

    /// `x` `[..., K]` (f32, f16 or bf16, any strides; cast to the layer's dtype first) -> `[..., N]` in the
    /// layer's dtype.
    pub fn forward(&self, x: &NpuTensor) -> Result<NpuTensor> {
        let (n, k) = (self.out_features, self.in_features);
        let rows = rows_of("ascend::WeightQuantLinear::forward", x, k)?;
        let x2 = contiguous_in(x, self.dtype)?.reshape(&[rows, k])?;
        let y = NpuTensor::uninit(x.device(), self.dtype, &[rows, n])?;
        let mut start = 0;
        while start < n {
            let len = WQBMM_MAX_DIM.min(n - start);
            let whole = len == n;
            let weight = if whole { self.weight.clone() } else { self.weight.narrow(0, start, len)? };
            let scale = if whole { self.scale.clone() } else { self.scale.narrow(0, start, len)? };
            let bias = self.bias.as_ref().map(|b| if whole { Ok(b.clone()) } else { b.narrow(0, start, len) });
            let bias = bias.transpose()?;
            let out = if whole { y.clone() } else { y.narrow(1, start, len)? };
            aq::weight_quant_matmul_into(&x2, &weight.transpose(0, 1)?, &scale, None, bias.as_ref(), 0, &out)?;
            start += len;
        }
        Ok(y.reshape(&out_shape(x, n))?)
    }

    /// Bytes of int8 weights read per forward (`N * K`).
    pub fn weight_bytes(&self) -> usize {
        self.out_features * self.in_features
    }

    /// Rows `ids` (i32/i64 `[M]` on the device) of the dequantized weight, `w_q[id, :] * scale[id]` -> `[M, K]`
    /// in the layer's dtype: a tied int8 lm_head read as the embedding table (aclnnEmbedding of the int8 rows and
    /// of the scales, aclnnCast, aclnnMul).
    pub fn gather_rows(&self, ids: &NpuTensor) -> Result<NpuTensor> {
        let rows = candle_ascend::aclnn::ops::embedding(&self.weight, ids)?;
        let rows = candle_ascend::aclnn::ops::cast(&rows, self.dtype)?;
        let scale = candle_ascend::aclnn::ops::embedding(&self.scale.reshape(&[self.out_features, 1])?, ids)?;
        Ok(aq::mul(&rows, &scale)?)
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }
}
