//! The CPU backend: candle CPU tensors, packed f32 linears, and the fused CPU kernels of
//! `candle-ascend-ops`.

use std::sync::atomic::{AtomicBool, Ordering};

use super::{AttentionStep, Backend, LinearWeights, StepPlan, attention_heads};
use crate::model::KvQuant;
use candle_ascend_ops as ops;
use candle_core::{DType, Device, Result, Tensor, bail};

/// Runs the decoder on the host CPU in f32 (default), f16 or bf16.
#[derive(Debug, Clone)]
pub struct CpuBackend {
    dtype: DType,
}

impl CpuBackend {
    /// A CPU backend computing in `dtype`. Also keeps large step buffers in the process heap
    /// (`ops::kernel::allocator::keep_step_buffers`: no page faults for per-step activations).
    pub fn new(dtype: DType) -> Result<Self> {
        ops::kernel::allocator::keep_step_buffers();
        match dtype {
            DType::F32 | DType::F16 | DType::BF16 => Ok(Self { dtype }),
            other => bail!("cpu backend: unsupported activation dtype {other:?} (use f32, f16 or bf16)"),
        }
    }
}

/// A prepared linear layer on the CPU.
#[derive(Debug)]
pub enum CpuLinear {
    /// f32 weights packed in panels.
    Float(ops::PackedLinear),
    /// int8 weights, float activations (W8A16).
    Int8Weight(ops::WeightQuantLinear),
    /// int8 weights and activations (A8W8) with the static activation parameters.
    Int8 { linear: ops::QuantLinear, act_scale: f32, act_offset: f32 },
    /// int8 weights, per-token int8 activations quantized at run time, float bias.
    Int8PerToken { linear: ops::QuantLinear, bias: Option<Tensor> },
}

impl CpuLinear {
    /// Whether this is a gated gate/up projection from `prepare_gate_up` (its forward returns
    /// `silu(gate) * up`, so only `mlp` may run it).
    pub fn is_gated(&self) -> bool {
        match self {
            CpuLinear::Int8 { linear, .. } | CpuLinear::Int8PerToken { linear, .. } => linear.is_swiglu(),
            _ => false,
        }
    }
}

/// Errors for a gated gate/up projection from `prepare_gate_up` outside `mlp` (its forward
/// returns `silu(gate) * up`, not the projection).
fn reject_gated(w: &CpuLinear) -> Result<()> {
    if w.is_gated() {
        bail!("cpu: a gated gate/up projection (prepare_gate_up) only runs inside mlp");
    }
    Ok(())
}

/// The int8 linear of per-token activations: `w_q` `[N, K]`, per-channel `scale`, input rotation
/// by Hadamard blocks of `hadamard` (0: none); with `swiglu` packed as a gated gate/up projection.
fn per_token_linear(
    w_q: &[i8],
    (out_features, in_features): (usize, usize),
    scale: &[f32],
    hadamard: usize,
    swiglu: bool,
) -> Result<ops::QuantLinear> {
    if w_q.len() != out_features * in_features {
        bail!("int8 weight has {} values for [{out_features}, {in_features}]", w_q.len());
    }
    let zero_bias = vec![0; out_features];
    let linear = if swiglu {
        ops::QuantLinear::new_swiglu(w_q, &zero_bias, scale)?
    } else {
        ops::QuantLinear::new(w_q, &zero_bias, scale)?
    };
    if hadamard > 0 { linear.with_input_hadamard(hadamard) } else { Ok(linear) }
}

/// `(w(rms_norm(x + residual)), x + residual)` through the fused add + norm + quantize front
/// end of an int8-activation linear (`QuantLinear::forward_add_rms_norm`, bit-identical to the
/// composition); `None` for other linears.
fn int8_norm_front(
    x: &Tensor,
    residual: &Tensor,
    gamma: &Tensor,
    eps: f64,
    w: &CpuLinear,
) -> Result<Option<(Tensor, Tensor)>> {
    Ok(match w {
        CpuLinear::Int8 { linear, act_scale, act_offset } => {
            Some(linear.forward_add_rms_norm(x, residual, gamma, eps, Some((*act_scale, *act_offset)))?)
        }
        CpuLinear::Int8PerToken { linear, bias } => {
            let (y, sum) = linear.forward_add_rms_norm(x, residual, gamma, eps, None)?;
            Some((add_bias(y, bias.as_ref())?, sum))
        }
        _ => None,
    })
}

/// One layer's fixed K and V caches, `[batch, capacity, kv_heads, head_dim]` each.
#[derive(Debug)]
pub enum CpuKvCache {
    /// In the activation dtype (candle tensors).
    Float { k: Tensor, v: Tensor },
    /// int8 with per-channel asymmetric parameters (C8), quantized on write.
    Int8 { k: ops::Int8KvCache, v: ops::Int8KvCache },
}

/// `y + bias` broadcast over the rows, or `y` without a bias.
fn add_bias(y: Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    match bias {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

impl Backend for CpuBackend {
    type Tensor = Tensor;
    type Linear = CpuLinear;
    type KvCache = CpuKvCache;
    type Indices = Vec<u32>;

    fn name(&self) -> String {
        "cpu".into()
    }

    /// Decode steps run on a rayon worker: from any other thread, each parallel op hands its tasks
    /// to the pool and puts the caller to sleep until they finish (a context switch per op, over a
    /// hundred per decode step; measured: 10x fewer context switches in `xtask bench`, SmolLM2
    /// a8w8c8 batch-1 decode 116 -> 118-148 tokens/s). Prefill steps stay on the calling thread:
    /// their activations (tens of MiB) come from glibc's main heap there (see
    /// `ops::kernel::allocator`), while a worker thread's arena maps buffers of that size afresh.
    fn run_step<R: Send>(decode: bool, f: impl FnOnce() -> R + Send) -> R {
        if !decode || rayon::current_thread_index().is_some() { f() } else { rayon::join(f, || ()).0 }
    }

    fn dtype(&self) -> DType {
        self.dtype
    }

    fn upload(&self, host: &Tensor) -> Result<Tensor> {
        host.to_device(&Device::Cpu)?.to_dtype(self.dtype)?.contiguous()
    }

    fn prepare_linear(&self, weights: LinearWeights<'_>) -> Result<CpuLinear> {
        Ok(match weights {
            LinearWeights::Float { weight, bias } => CpuLinear::Float(ops::PackedLinear::new(weight, bias)?),
            LinearWeights::Int8Weight { w_q, out_features, in_features, scale, bias } => {
                CpuLinear::Int8Weight(ops::WeightQuantLinear::new(w_q, (out_features, in_features), scale, None, bias)?)
            }
            LinearWeights::Int8 { linear } => CpuLinear::Int8 {
                linear: ops::QuantLinear::new(&linear.w_q, &linear.bias_q, &linear.deq_scale)?,
                act_scale: linear.act_scale,
                act_offset: linear.act_offset,
            },
            LinearWeights::Int8PerToken { w_q, out_features, in_features, scale, bias, hadamard } => {
                let linear = per_token_linear(w_q, (out_features, in_features), scale, hadamard, false)?;
                CpuLinear::Int8PerToken { linear, bias: bias.map(|b| b.to_dtype(self.dtype)).transpose()? }
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
    ) -> Result<CpuKvCache> {
        if let Some(q) = quant {
            let [k, v] = q.params();
            return Ok(CpuKvCache::Int8 {
                k: ops::Int8KvCache::new(batch, capacity, kv_heads, head_dim, k)?,
                v: ops::Int8KvCache::new(batch, capacity, kv_heads, head_dim, v)?,
            });
        }
        let shape = (batch, capacity, kv_heads, head_dim);
        Ok(CpuKvCache::Float {
            k: Tensor::zeros(shape, self.dtype, &Device::Cpu)?,
            v: Tensor::zeros(shape, self.dtype, &Device::Cpu)?,
        })
    }

    fn kv_cache_bytes(&self, cache: &CpuKvCache) -> usize {
        match cache {
            CpuKvCache::Float { k, v } => (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes(),
            CpuKvCache::Int8 { k, v } => k.bytes() + v.bytes(),
        }
    }

    fn upload_indices(&self, lists: &[&[u32]]) -> Result<Vec<Vec<u32>>> {
        Ok(lists.iter().map(|l| l.to_vec()).collect())
    }

    fn gather_rows(&self, table: &Tensor, ids: &Vec<u32>, batch: usize, seq: usize) -> Result<Tensor> {
        if ids.len() != batch * seq {
            bail!("gather_rows: {} ids for a [{batch}, {seq}] step", ids.len());
        }
        let rows = table.dim(0)?;
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= rows) {
            bail!("token id {bad} is outside the vocabulary of {rows} entries");
        }
        let idx = Tensor::from_slice(ids, ids.len(), &Device::Cpu)?;
        table.index_select(&idx, 0)?.reshape((batch, seq, table.dim(1)?))
    }

    fn linear_gathers_rows(&self, w: &CpuLinear) -> bool {
        matches!(w, CpuLinear::Int8Weight(_))
    }

    fn gather_linear_rows(&self, w: &CpuLinear, ids: &Vec<u32>, batch: usize, seq: usize) -> Result<Tensor> {
        let CpuLinear::Int8Weight(l) = w else {
            bail!("cpu: embedding rows can only be read from an int8-weight (W8A16) linear");
        };
        if ids.len() != batch * seq {
            bail!("cpu: {} ids for batch {batch} x seq {seq}", ids.len());
        }
        let rows = l.dequantize_rows(ids)?;
        Tensor::from_vec(rows, (batch, seq, l.in_features()), &Device::Cpu)?.to_dtype(self.dtype)
    }

    fn linear(&self, x: &Tensor, w: &CpuLinear) -> Result<Tensor> {
        reject_gated(w)?;
        match w {
            CpuLinear::Float(l) => l.forward(x),
            CpuLinear::Int8Weight(l) => l.forward(x),
            CpuLinear::Int8 { linear, act_scale, act_offset } => linear.forward(x, *act_scale, *act_offset),
            CpuLinear::Int8PerToken { linear, bias } => add_bias(linear.forward_per_token(x)?, bias.as_ref()),
        }
    }

    fn rms_norm(&self, x: &Tensor, gamma: &Tensor, eps: f64) -> Result<Tensor> {
        ops::rms_norm(x, gamma, eps)
    }

    fn add_rms_norm(&self, x: &Tensor, residual: &Tensor, gamma: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
        ops::add_rms_norm(x, residual, gamma, eps)
    }

    fn split_qkv(&self, qkv: &Tensor, nq: usize, nkv: usize, head_dim: usize) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, s, _) = qkv.dims3()?;
        let heads = qkv.reshape((b, s, nq + 2 * nkv, head_dim))?;
        Ok((heads.narrow(2, 0, nq)?, heads.narrow(2, nq, nkv)?, heads.narrow(2, nq + nkv, nkv)?))
    }

    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        ops::rope(x, cos, sin)
    }

    fn kv_write(
        &self,
        cache: &mut CpuKvCache,
        k: &Tensor,
        v: &Tensor,
        plan: &StepPlan<'_>,
        _starts: &Vec<u32>,
    ) -> Result<()> {
        match cache {
            CpuKvCache::Float { k: kc, v: vc } => {
                ops::kv_write(&batch_view(kc, plan.batch)?, k, plan.start)?;
                ops::kv_write(&batch_view(vc, plan.batch)?, v, plan.start)
            }
            CpuKvCache::Int8 { k: kc, v: vc } => {
                ops::kv_write_int8(kc, k, plan.start)?;
                ops::kv_write_int8(vc, v, plan.start)
            }
        }
    }

    fn attention(&self, q: &Tensor, cache: &CpuKvCache, plan: &StepPlan<'_>, scale: f32) -> Result<Tensor> {
        let (b, s, nq, d) = q.dims4()?;
        let kv_lens: Vec<usize> = plan.start.iter().zip(plan.lens).map(|(p, l)| p + l).collect();
        let out = match cache {
            CpuKvCache::Float { k, v } => {
                let (k_cache, v_cache) = (batch_view(k, b)?, batch_view(v, b)?);
                if plan.is_decode() {
                    ops::decode_attention(q, &k_cache, &v_cache, &kv_lens, scale)?
                } else {
                    ops::prompt_attention(q, &k_cache, &v_cache, plan.start, plan.lens, scale)?
                }
            }
            CpuKvCache::Int8 { k, v } => {
                if plan.is_decode() {
                    ops::decode_attention_int8(q, k, v, &kv_lens, scale)?
                } else {
                    ops::prompt_attention_int8(q, k, v, plan.start, plan.lens, scale)?
                }
            }
        };
        out.reshape((b, s, nq * d))
    }

    /// In decode, with an int8 `o_proj` and a second pool thread, that thread pulls `o_proj`'s
    /// weights into its caches while the calling thread runs the (serial) RoPE, cache write and
    /// attention; it stops as soon as the attention is done. The projection then reads part of
    /// its weights from cache instead of memory (SmolLM2-135M a8w8c8, batch 1: 3-5% off the
    /// step time, steps with and without it interleaved).
    fn attention_sublayer(
        &self,
        qkv: &Tensor,
        step: &AttentionStep<'_, Self>,
        cache: &mut CpuKvCache,
        o_proj: &CpuLinear,
    ) -> Result<Tensor> {
        let int8 = match o_proj {
            CpuLinear::Int8 { linear, .. } | CpuLinear::Int8PerToken { linear, .. } => Some(linear),
            _ => None,
        };
        let Some(linear) = int8.filter(|_| step.plan.is_decode() && rayon::current_num_threads() > 1) else {
            return self.linear(&attention_heads(self, qkv, step, cache)?, o_proj);
        };
        let done = AtomicBool::new(false);
        let (attn, ()) = rayon::join(
            || {
                let attn = attention_heads(self, qkv, step, cache);
                done.store(true, Ordering::Relaxed);
                attn
            },
            // Not stolen before the attention finished: the caller runs it, and the walk ends
            // at its first question (`done` is already set).
            || {
                let mut pages = 0usize;
                linear.warm_weights(&mut || {
                    // Every 32 KiB, run any task the attention left for the pool (a long or
                    // batched decode attention is parallel).
                    pages += 1;
                    if pages.is_multiple_of(8) {
                        rayon::yield_now();
                    }
                    !done.load(Ordering::Relaxed)
                });
            },
        );
        self.linear(&attn?, o_proj)
    }

    fn swiglu(&self, x: &Tensor) -> Result<Tensor> {
        ops::swiglu(x)
    }

    /// Per-token int8 down projections gate, rotate and quantize each row in one pass
    /// (`QuantLinear::forward_per_token_swiglu`, bit-identical to the composition).
    fn swiglu_linear(&self, x: &Tensor, w: &CpuLinear) -> Result<Tensor> {
        match w {
            CpuLinear::Int8PerToken { linear, bias } => add_bias(linear.forward_per_token_swiglu(x)?, bias.as_ref()),
            _ => self.linear(&ops::swiglu(x)?, w),
        }
    }

    /// Int8 gate/up projections without a float bias and with `I` a multiple of 16 are packed
    /// as SwiGLU linears (`QuantLinear::new_swiglu`): the gate and up channels of each pair
    /// meet in the GEMM's epilogue, and only the `[.., I]` gated activations are written.
    fn prepare_gate_up(&self, weights: LinearWeights<'_>) -> Result<CpuLinear> {
        let gated = |n: usize| n.is_multiple_of(32);
        Ok(match weights {
            LinearWeights::Int8 { linear } if gated(linear.bias_q.len()) => CpuLinear::Int8 {
                linear: ops::QuantLinear::new_swiglu(&linear.w_q, &linear.bias_q, &linear.deq_scale)?,
                act_scale: linear.act_scale,
                act_offset: linear.act_offset,
            },
            LinearWeights::Int8PerToken { w_q, out_features, in_features, scale, bias: None, hadamard }
                if gated(out_features) =>
            {
                let linear = per_token_linear(w_q, (out_features, in_features), scale, hadamard, true)?;
                CpuLinear::Int8PerToken { linear, bias: None }
            }
            other => self.prepare_linear(other)?,
        })
    }

    fn add_rms_norm_linear(
        &self,
        x: &Tensor,
        residual: &Tensor,
        gamma: &Tensor,
        eps: f64,
        w: &CpuLinear,
    ) -> Result<(Tensor, Tensor)> {
        reject_gated(w)?;
        match int8_norm_front(x, residual, gamma, eps, w)? {
            Some(fused) => Ok(fused),
            None => {
                let (normed, sum) = self.add_rms_norm(x, residual, gamma, eps)?;
                Ok((self.linear(&normed, w)?, sum))
            }
        }
    }

    fn add_rms_norm_mlp(
        &self,
        x: &Tensor,
        residual: &Tensor,
        gamma: &Tensor,
        eps: f64,
        gate_up: &CpuLinear,
        down: &CpuLinear,
    ) -> Result<(Tensor, Tensor)> {
        match int8_norm_front(x, residual, gamma, eps, gate_up)? {
            Some((gated, sum)) if gate_up.is_gated() => Ok((self.linear(&gated, down)?, sum)),
            Some((projected, sum)) => Ok((self.swiglu_linear(&projected, down)?, sum)),
            None => {
                let (normed, sum) = self.add_rms_norm(x, residual, gamma, eps)?;
                Ok((self.mlp(&normed, gate_up, down)?, sum))
            }
        }
    }

    fn mlp(&self, x: &Tensor, gate_up: &CpuLinear, down: &CpuLinear) -> Result<Tensor> {
        let gated = match gate_up {
            CpuLinear::Int8 { linear, act_scale, act_offset } if linear.is_swiglu() => {
                linear.forward(x, *act_scale, *act_offset)?
            }
            CpuLinear::Int8PerToken { linear, bias: None } if linear.is_swiglu() => linear.forward_per_token(x)?,
            _ => return self.swiglu_linear(&self.linear(x, gate_up)?, down),
        };
        self.linear(&gated, down)
    }

    fn select_rows(&self, x: &Tensor, rows: &Vec<u32>) -> Result<Tensor> {
        let (b, s, h) = x.dims3()?;
        if let Some(bad) = rows.iter().find(|&&r| r as usize >= b * s) {
            bail!("select_rows: row {bad} is outside a [{b}, {s}, _] tensor");
        }
        let idx = Tensor::from_slice(rows, rows.len(), &Device::Cpu)?;
        x.reshape((b * s, h))?.index_select(&idx, 0)?.reshape((rows.len(), 1, h))
    }

    fn to_host_f32(&self, x: &Tensor) -> Result<Tensor> {
        x.to_dtype(DType::F32)
    }

    fn linear_bytes(&self, w: &CpuLinear) -> usize {
        match w {
            CpuLinear::Float(l) => l.weight_bytes(),
            CpuLinear::Int8Weight(l) => l.weight_bytes(),
            CpuLinear::Int8 { linear, .. } | CpuLinear::Int8PerToken { linear, .. } => linear.weight_bytes(),
        }
    }

    fn kv_cache_id(&self, cache: &CpuKvCache) -> usize {
        use candle_core::{CpuStorage, Storage};
        let k = match cache {
            CpuKvCache::Float { k, .. } => k,
            CpuKvCache::Int8 { k, .. } => return k.storage_id(),
        };
        let (storage, _) = k.storage_and_layout();
        match &*storage {
            Storage::Cpu(CpuStorage::F32(v)) => v.as_ptr() as usize,
            Storage::Cpu(CpuStorage::F16(v)) => v.as_ptr() as usize,
            Storage::Cpu(CpuStorage::BF16(v)) => v.as_ptr() as usize,
            _ => 0,
        }
    }
}

/// The first `batch` sequences of a cache (a contiguous prefix view, same storage).
fn batch_view(cache: &Tensor, batch: usize) -> Result<Tensor> {
    if cache.dim(0)? == batch { Ok(cache.clone()) } else { cache.narrow(0, 0, batch) }
}
