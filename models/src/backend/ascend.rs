//! The Ascend NPU backend: NPU-resident tensors ([`NpuTensor`]), linears prepared once in NPU
//! memory (f16/bf16/f32 weights, W8A16, A8W8 static or per-token), the fixed KV cache in NPU
//! memory (float or int8), and the fused ops of `candle_ascend_ops::ascend`.
//!
//! Host data crosses the boundary only at the edges: weights at load, one host-to-device copy
//! of a step's index lists (token ids, RoPE positions, rows to keep; see
//! [`Backend::upload_indices`]) and one copy of the logits back, prefill and decode alike: causal
//! masking uses the compressed mask uploaded once when the backend is created, and an int8 cache's
//! decode parameters are uploaded when the cache is allocated. CANN is loaded at run time
//! (`candle_ascend::Cann`); on a machine without it, [`AscendBackend::new`] fails with the list
//! of directories searched.

use super::{Backend, LinearWeights, StepPlan};
use crate::model::KvQuant;
use candle_ascend_ops::KvQuantParams;
use candle_ascend_ops::ascend::attention::CausalMask;
use candle_ascend_ops::ascend::{self as npu, AscendDevice, NpuDType, NpuTensor};
use candle_core::{DType, Result, Tensor, bail};

/// Runs the decoder on one Ascend NPU in f16 (the default), bf16 or f32.
#[derive(Debug, Clone)]
pub struct AscendBackend {
    device: AscendDevice,
    dtype: DType,
    /// The compressed causal mask of every prefill (sparse mode 3), uploaded once.
    causal_mask: CausalMask,
}

impl AscendBackend {
    /// Opens NPU `ordinal` with the process-wide CANN (`CANDLE_ASCEND_SIM` selects ascend-sim).
    pub fn new(ordinal: usize, dtype: DType) -> Result<Self> {
        Self::with_device(AscendDevice::new(ordinal)?, dtype)
    }

    /// Runs on an already opened device (tests open the simulator explicitly).
    pub fn with_device(device: AscendDevice, dtype: DType) -> Result<Self> {
        match dtype {
            DType::F16 | DType::BF16 | DType::F32 => Ok(Self { causal_mask: CausalMask::new(&device)?, device, dtype }),
            other => bail!("npu backend: unsupported activation dtype {other:?} (use f16, bf16 or f32)"),
        }
    }

    pub fn device(&self) -> &AscendDevice {
        &self.device
    }

    fn npu_dtype(&self) -> NpuDType {
        match self.dtype {
            DType::F16 => NpuDType::F16,
            DType::BF16 => NpuDType::BF16,
            _ => NpuDType::F32,
        }
    }
}

/// A prepared linear layer in NPU memory.
#[derive(Debug)]
pub enum AscendLinear {
    /// Float weights in the activation dtype (aclnnMatmul).
    Float(npu::linear::Linear),
    /// int8 weights, float activations (aclnnWeightQuantBatchMatmulV2).
    Int8Weight(npu::quant::WeightQuantLinear),
    /// int8 weights and static per-tensor int8 activations (AscendQuantV3 + QuantMatmulV4).
    Int8(npu::quant::QuantLinear),
    /// int8 weights, per-token int8 activations (DynamicQuant + QuantMatmulV4).
    Int8PerToken(npu::quant::PerTokenQuantLinear),
}

/// One layer's fixed K and V caches in NPU memory, `[batch, capacity, kv_heads, head_dim]` each.
#[derive(Debug)]
pub enum AscendKvCache {
    Float { k: NpuTensor, v: NpuTensor },
    Int8 { k: Box<npu::kv_int8::Int8KvCache>, v: Box<npu::kv_int8::Int8KvCache> },
}

/// One of a step's index lists on the device: a view into the step's single upload (`None`
/// for an empty list).
#[derive(Debug, Clone)]
pub struct NpuIndices(Option<NpuTensor>);

impl NpuIndices {
    fn tensor(&self, what: &str) -> Result<&NpuTensor> {
        self.0.as_ref().ok_or_else(|| candle_core::Error::Msg(format!("npu: empty index list for {what}")))
    }
}

impl Backend for AscendBackend {
    type Tensor = NpuTensor;
    type Linear = AscendLinear;
    type KvCache = AscendKvCache;
    type Indices = NpuIndices;

    fn name(&self) -> String {
        format!("npu:{}", self.device.ordinal())
    }

    fn dtype(&self) -> DType {
        self.dtype
    }

    fn upload(&self, host: &Tensor) -> Result<NpuTensor> {
        Ok(NpuTensor::from_candle(&self.device, &host.to_dtype(self.dtype)?)?)
    }

    fn prepare_linear(&self, weights: LinearWeights<'_>) -> Result<AscendLinear> {
        let (device, dtype) = (&self.device, self.npu_dtype());
        Ok(match weights {
            LinearWeights::Float { weight, bias } => {
                AscendLinear::Float(npu::linear::Linear::new(device, weight, bias, dtype)?)
            }
            LinearWeights::Int8Weight { w_q, out_features, in_features, scale, bias } => AscendLinear::Int8Weight(
                npu::quant::WeightQuantLinear::new(device, w_q, (out_features, in_features), scale, bias, dtype)?,
            ),
            LinearWeights::Int8 { linear: l } => AscendLinear::Int8(npu::quant::QuantLinear::new(
                device,
                &l.w_q,
                (l.out_features, l.in_features),
                &l.bias_q,
                &l.deq_scale,
                l.act_scale,
                l.act_offset,
                dtype,
            )?),
            LinearWeights::Int8PerToken { w_q, out_features, in_features, scale, bias, hadamard } => {
                AscendLinear::Int8PerToken(npu::quant::PerTokenQuantLinear::new(
                    device,
                    w_q,
                    (out_features, in_features),
                    scale,
                    bias,
                    hadamard,
                    dtype,
                )?)
            }
        })
    }

    fn new_kv_cache(
        &self,
        batch: usize,
        capacity: usize,
        kv_heads: usize,
        head_dim: usize,
        quant: Option<&KvQuant>,
    ) -> Result<AscendKvCache> {
        if let Some(q) = quant {
            let new = |p: &KvQuantParams| {
                npu::kv_int8::Int8KvCache::new(&self.device, batch, capacity, kv_heads, head_dim, p)
            };
            let [k, v] = q.params();
            let (k, v) = (new(&k)?, new(&v)?);
            k.prepare_decode(&v, self.npu_dtype())?;
            return Ok(AscendKvCache::Int8 { k: Box::new(k), v: Box::new(v) });
        }
        // Zero-filled once at load on the device (positions past a sequence's length are never read as data).
        let shape = [batch, capacity, kv_heads, head_dim];
        Ok(AscendKvCache::Float {
            k: NpuTensor::zeros(&self.device, self.npu_dtype(), &shape)?,
            v: NpuTensor::zeros(&self.device, self.npu_dtype(), &shape)?,
        })
    }

    fn kv_cache_bytes(&self, cache: &AscendKvCache) -> usize {
        match cache {
            AscendKvCache::Float { k, v } => (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes(),
            AscendKvCache::Int8 { k, v } => k.bytes() + v.bytes(),
        }
    }

    fn upload_indices(&self, lists: &[&[u32]]) -> Result<Vec<NpuIndices>> {
        let total: usize = lists.iter().map(|l| l.len()).sum();
        let mut flat = Vec::with_capacity(total);
        for list in lists {
            for &v in *list {
                flat.push(
                    i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("npu: index {v} exceeds i32")))?,
                );
            }
        }
        if total == 0 {
            return Ok(lists.iter().map(|_| NpuIndices(None)).collect());
        }
        // One host-to-device copy for every list of the step; each list is a view of it.
        let all = NpuTensor::from_slice(&self.device, &flat, &[total])?;
        let mut start = 0;
        let mut out = Vec::with_capacity(lists.len());
        for list in lists {
            out.push(NpuIndices(if list.is_empty() { None } else { Some(all.narrow(0, start, list.len())?) }));
            start += list.len();
        }
        Ok(out)
    }

    fn gather_rows(&self, table: &NpuTensor, ids: &NpuIndices, batch: usize, seq: usize) -> Result<NpuTensor> {
        let ids = ids.tensor("gather_rows")?;
        if ids.elem_count() != batch * seq || table.rank() != 2 {
            bail!(
                "npu gather_rows: {} ids for a [{batch}, {seq}] step from a {:?} table",
                ids.elem_count(),
                table.shape()
            );
        }
        let rows = candle_ascend::aclnn::ops::embedding(table, ids)?;
        Ok(rows.reshape(&[batch, seq, table.shape()[1]])?)
    }

    fn linear_gathers_rows(&self, w: &AscendLinear) -> bool {
        matches!(w, AscendLinear::Int8Weight(_))
    }

    fn gather_linear_rows(&self, w: &AscendLinear, ids: &NpuIndices, batch: usize, seq: usize) -> Result<NpuTensor> {
        let AscendLinear::Int8Weight(l) = w else {
            bail!("npu: embedding rows can only be read from an int8-weight (W8A16) linear");
        };
        let ids = ids.tensor("gather_linear_rows")?;
        if ids.elem_count() != batch * seq {
            bail!("npu gather_linear_rows: {} ids for a [{batch}, {seq}] step", ids.elem_count());
        }
        Ok(l.gather_rows(ids)?.reshape(&[batch, seq, l.in_features()])?)
    }

    fn linear(&self, x: &NpuTensor, w: &AscendLinear) -> Result<NpuTensor> {
        match w {
            AscendLinear::Float(l) => l.forward(x),
            AscendLinear::Int8Weight(l) => l.forward(x),
            AscendLinear::Int8(l) => l.forward(x),
            AscendLinear::Int8PerToken(l) => l.forward(x),
        }
    }

    fn rms_norm(&self, x: &NpuTensor, gamma: &NpuTensor, eps: f64) -> Result<NpuTensor> {
        npu::elementwise::rms_norm(x, gamma, eps)
    }

    fn add_rms_norm(
        &self,
        x: &NpuTensor,
        residual: &NpuTensor,
        gamma: &NpuTensor,
        eps: f64,
    ) -> Result<(NpuTensor, NpuTensor)> {
        npu::elementwise::add_rms_norm(x, residual, gamma, eps)
    }

    fn split_qkv(
        &self,
        qkv: &NpuTensor,
        nq: usize,
        nkv: usize,
        head_dim: usize,
    ) -> Result<(NpuTensor, NpuTensor, NpuTensor)> {
        let &[b, s, _] = qkv.shape() else { bail!("npu split_qkv: expected [B, S, H], got {:?}", qkv.shape()) };
        let heads = qkv.reshape(&[b, s, nq + 2 * nkv, head_dim])?;
        Ok((heads.narrow(2, 0, nq)?, heads.narrow(2, nq, nkv)?, heads.narrow(2, nq + nkv, nkv)?))
    }

    fn rope(&self, x: &NpuTensor, cos: &NpuTensor, sin: &NpuTensor) -> Result<NpuTensor> {
        npu::elementwise::rope(x, cos, sin)
    }

    fn kv_write(
        &self,
        cache: &mut AscendKvCache,
        k: &NpuTensor,
        v: &NpuTensor,
        plan: &StepPlan<'_>,
        starts: &NpuIndices,
    ) -> Result<()> {
        let starts = starts.tensor("kv_write")?;
        match cache {
            AscendKvCache::Float { k: kc, v: vc } => {
                npu::kv_cache::kv_write_at(&kc.narrow(0, 0, plan.batch)?, k, plan.start, starts)?;
                npu::kv_cache::kv_write_at(&vc.narrow(0, 0, plan.batch)?, v, plan.start, starts)
            }
            AscendKvCache::Int8 { k: kc, v: vc } => {
                npu::kv_int8::kv_write_int8_at(kc, k, plan.start, starts)?;
                npu::kv_int8::kv_write_int8_at(vc, v, plan.start, starts)
            }
        }
    }

    fn attention(&self, q: &NpuTensor, cache: &AscendKvCache, plan: &StepPlan<'_>, scale: f32) -> Result<NpuTensor> {
        let &[b, s, nq, d] = q.shape() else { bail!("npu attention: expected q [B, S, N, D], got {:?}", q.shape()) };
        let kv_lens: Vec<usize> = plan.start.iter().zip(plan.lens).map(|(p, l)| p + l).collect();
        let out = match cache {
            AscendKvCache::Float { k, v } => {
                let (k, v) = (k.narrow(0, 0, b)?, v.narrow(0, 0, b)?);
                if plan.is_decode() {
                    npu::attention::decode_attention(q, &k, &v, &kv_lens, scale)?
                } else {
                    npu::attention::prompt_attention(q, &k, &v, &self.causal_mask, plan.start, plan.lens, scale)?
                }
            }
            AscendKvCache::Int8 { k, v } => {
                if plan.is_decode() {
                    npu::kv_int8::decode_attention_int8(q, k, v, &kv_lens, scale)?
                } else {
                    npu::kv_int8::prompt_attention_int8(q, k, v, &self.causal_mask, plan.start, plan.lens, scale)?
                }
            }
        };
        Ok(out.reshape(&[b, s, nq * d])?)
    }

    fn swiglu(&self, x: &NpuTensor) -> Result<NpuTensor> {
        npu::elementwise::swiglu(x)
    }

    fn select_rows(&self, x: &NpuTensor, rows: &NpuIndices) -> Result<NpuTensor> {
        let rows = rows.tensor("select_rows")?;
        let &[b, s, h] = x.shape() else { bail!("npu select_rows: expected [B, S, H], got {:?}", x.shape()) };
        let picked = candle_ascend::aclnn::ops::embedding(&x.reshape(&[b * s, h])?, rows)?;
        Ok(picked.reshape(&[rows.elem_count(), 1, h])?)
    }

    fn to_host_f32(&self, x: &NpuTensor) -> Result<Tensor> {
        x.to_candle()?.to_dtype(DType::F32)
    }

    fn linear_bytes(&self, w: &AscendLinear) -> usize {
        match w {
            AscendLinear::Float(l) => l.weight_bytes(),
            AscendLinear::Int8Weight(l) => l.weight_bytes(),
            AscendLinear::Int8(l) => l.weight_bytes(),
            AscendLinear::Int8PerToken(l) => l.weight_bytes(),
        }
    }

    fn kv_cache_id(&self, cache: &AscendKvCache) -> usize {
        match cache {
            AscendKvCache::Float { k, .. } => k.buffer().as_ptr() as usize,
            AscendKvCache::Int8 { k, .. } => k.storage_id(),
        }
    }
}
