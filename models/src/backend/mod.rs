//! The backend abstraction the model is written against.
//!
//! A backend owns device-resident tensors (`Self::Tensor`), prepared linear weights
//! (`Self::Linear`: packed f32 on CPU; later int8 or NPU-resident) and the fixed KV cache
//! (`Self::KvCache`). The model code calls only these methods, so a new backend (the Ascend
//! NPU, with its own memory and int8 storage) plugs in without touching it. Host data crosses
//! the boundary only at the edges: weights at load, token ids and positions in, logits out.
//!
//! Shapes use the BSND convention of the fused ops: `[batch, seq, heads, head_dim]`.

#[cfg(feature = "ascend")]
pub mod ascend;
pub mod cpu;

#[cfg(feature = "ascend")]
pub use ascend::AscendBackend;
pub use cpu::{CpuBackend, CpuLinear};

use crate::model::KvQuant;
use candle_core::{DType, Result, Tensor};

/// What a forward step is: the shapes and per-sequence positions the attention ops need.
#[derive(Debug, Clone)]
pub struct StepPlan<'a> {
    /// Sequences in the batch.
    pub batch: usize,
    /// Tokens per sequence in this step (padded to the longest; 1 in decode).
    pub seq_len: usize,
    /// Position of the first token of this step, per sequence.
    pub start: &'a [usize],
    /// Real (unpadded) tokens of this step, per sequence.
    pub lens: &'a [usize],
}

/// What the attention sub-layer of one decoder layer needs besides its q/k/v projection
/// output, its cache and its output projection.
pub struct AttentionStep<'a, B: Backend> {
    pub plan: &'a StepPlan<'a>,
    /// This step's positions, as uploaded with its other indices (see [`Backend::kv_write`]).
    pub starts: &'a B::Indices,
    /// RoPE tables gathered at this step's positions, `[B, S, D]`.
    pub cos: &'a B::Tensor,
    pub sin: &'a B::Tensor,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Softmax scale of the scores.
    pub scale: f32,
}

/// The attention sub-layer up to its output projection: the q/k/v projection output
/// `[B, S, (nq + 2 nkv) D]` split into heads, RoPE on q and k, the cache write and the
/// attention, `[B, S, nq D]`.
pub fn attention_heads<B: Backend>(
    be: &B,
    qkv: &B::Tensor,
    step: &AttentionStep<'_, B>,
    cache: &mut B::KvCache,
) -> Result<B::Tensor> {
    let (q, k, v) = be.split_qkv(qkv, step.num_heads, step.num_kv_heads, step.head_dim)?;
    let q = be.rope(&q, step.cos, step.sin)?;
    let k = be.rope(&k, step.cos, step.sin)?;
    be.kv_write(cache, &k, &v, step.plan, step.starts)?;
    be.attention(&q, cache, step.plan, step.scale)
}

impl StepPlan<'_> {
    /// True when every sequence feeds exactly one token (the decode regime).
    pub fn is_decode(&self) -> bool {
        self.seq_len == 1
    }
}

/// One linear layer's weights as the model hands them to a backend.
#[derive(Debug, Clone, Copy)]
pub enum LinearWeights<'a> {
    /// Float weight `[N, K]` and bias `[N]` (host tensors).
    Float { weight: &'a Tensor, bias: Option<&'a Tensor> },
    /// W8A16: int8 weight `[N, K]` (row-major) with a per-output-channel symmetric scale,
    /// float activations; `y = x (w_q * scale)^T + bias`.
    Int8Weight { w_q: &'a [i8], out_features: usize, in_features: usize, scale: &'a [f32], bias: Option<&'a Tensor> },
    /// A8W8: int8 weights and static per-tensor int8 activations (see `quant::a8w8`).
    Int8 { linear: &'a crate::quant::a8w8::Int8Linear },
    /// A8W8 with per-token symmetric int8 activations quantized at run time:
    /// `y[m] = (q(x[m]) w_q^T) * scale * s[m] + bias`, `s[m] = max|x[m]| / 127`; with
    /// `hadamard` > 0, `x[m]` is first rotated by the block Hadamard matrix of that block
    /// (`w_q` holds the rotated weights).
    Int8PerToken {
        w_q: &'a [i8],
        out_features: usize,
        in_features: usize,
        scale: &'a [f32],
        bias: Option<&'a Tensor>,
        hadamard: usize,
    },
}

/// A compute backend for the shared llama/qwen2 decoder.
pub trait Backend: Send + Sync + Sized {
    /// A tensor resident on the backend's device.
    type Tensor: Clone + Send + Sync;
    /// A linear layer's weight and bias, prepared once at load.
    type Linear: Send + Sync;
    /// One layer's K and V cache, allocated once for (batch, capacity).
    type KvCache: Send + Sync;
    /// An index list of one step as the backend reads it (token ids, RoPE positions, rows to
    /// keep), produced by [`upload_indices`](Self::upload_indices).
    type Indices: Send + Sync;

    /// Short name for logs and errors (`cpu`, `npu:0`).
    fn name(&self) -> String;
    /// Runs one whole step (`f`; `decode`: one token per sequence) on the thread the backend
    /// computes it best from. Default: the calling thread. The CPU backend moves decode steps onto a
    /// rayon worker, so their many small parallel ops run inside the pool instead of each parking
    /// the caller until it finishes.
    fn run_step<R: Send>(decode: bool, f: impl FnOnce() -> R + Send) -> R {
        let _ = decode;
        f()
    }
    /// The activation dtype.
    fn dtype(&self) -> DType;

    /// Uploads a host tensor (norm weights, embedding and RoPE tables), cast to the backend dtype.
    fn upload(&self, host: &Tensor) -> Result<Self::Tensor>;
    /// Prepares `y = x W^T + b` (packing, repacking or uploading the weights once).
    fn prepare_linear(&self, weights: LinearWeights<'_>) -> Result<Self::Linear>;
    /// Allocates one layer's fixed KV cache `[batch, capacity, kv_heads, head_dim]` (twice):
    /// in the activation dtype, or int8 with per-channel parameters when `quant` is given.
    fn new_kv_cache(
        &self,
        batch: usize,
        capacity: usize,
        kv_heads: usize,
        head_dim: usize,
        quant: Option<&KvQuant>,
    ) -> Result<Self::KvCache>;
    /// Bytes of storage one layer's cache holds (K and V; memory reports).
    fn kv_cache_bytes(&self, cache: &Self::KvCache) -> usize;

    /// Moves a step's host index lists to the device together: a device backend makes one
    /// host-to-device copy per step for all of them.
    fn upload_indices(&self, lists: &[&[u32]]) -> Result<Vec<Self::Indices>>;
    /// Gathers rows of `table` `[V, W]`: `ids` (`batch * seq` values) -> `[batch, seq, W]`.
    fn gather_rows(&self, table: &Self::Tensor, ids: &Self::Indices, batch: usize, seq: usize) -> Result<Self::Tensor>;
    /// Whether [`gather_linear_rows`](Self::gather_linear_rows) can read `w`'s weight rows, so
    /// that a tied int8 lm_head also serves as the embedding table (no float copy kept).
    fn linear_gathers_rows(&self, _w: &Self::Linear) -> bool {
        false
    }
    /// Rows `ids` of `w`'s (dequantized) weight `[N, K]` -> `[batch, seq, K]`; only for a
    /// linear [`linear_gathers_rows`](Self::linear_gathers_rows) accepts.
    fn gather_linear_rows(
        &self,
        _w: &Self::Linear,
        _ids: &Self::Indices,
        _batch: usize,
        _seq: usize,
    ) -> Result<Self::Tensor> {
        candle_core::bail!("{}: this backend cannot read embedding rows from a linear", self.name())
    }
    fn linear(&self, x: &Self::Tensor, w: &Self::Linear) -> Result<Self::Tensor>;
    fn rms_norm(&self, x: &Self::Tensor, gamma: &Self::Tensor, eps: f64) -> Result<Self::Tensor>;
    /// Returns (rms_norm(x + residual), x + residual).
    fn add_rms_norm(
        &self,
        x: &Self::Tensor,
        residual: &Self::Tensor,
        gamma: &Self::Tensor,
        eps: f64,
    ) -> Result<(Self::Tensor, Self::Tensor)>;
    /// Splits the fused q/k/v projection `[B, S, (nq + 2 nkv) * D]` into q, k, v views
    /// `[B, S, heads, D]` without copying where the backend allows it.
    fn split_qkv(
        &self,
        qkv: &Self::Tensor,
        nq: usize,
        nkv: usize,
        head_dim: usize,
    ) -> Result<(Self::Tensor, Self::Tensor, Self::Tensor)>;
    /// Half-rotation RoPE on `[B, S, N, D]` with `cos`/`sin` `[B, S, D]`.
    fn rope(&self, x: &Self::Tensor, cos: &Self::Tensor, sin: &Self::Tensor) -> Result<Self::Tensor>;
    /// Writes this step's k and v into the cache at `plan.start[b]`; `starts` holds the same
    /// positions as uploaded with the step's other indices.
    fn kv_write(
        &self,
        cache: &mut Self::KvCache,
        k: &Self::Tensor,
        v: &Self::Tensor,
        plan: &StepPlan<'_>,
        starts: &Self::Indices,
    ) -> Result<()>;
    /// Fused attention of this step's q over the cache: `[B, S, nq, D]` -> `[B, S, nq * D]`.
    fn attention(
        &self,
        q: &Self::Tensor,
        cache: &Self::KvCache,
        plan: &StepPlan<'_>,
        scale: f32,
    ) -> Result<Self::Tensor>;
    /// The whole attention sub-layer: [`attention_heads`], then the output projection
    /// `o_proj`, `[B, S, H]`.
    fn attention_sublayer(
        &self,
        qkv: &Self::Tensor,
        step: &AttentionStep<'_, Self>,
        cache: &mut Self::KvCache,
        o_proj: &Self::Linear,
    ) -> Result<Self::Tensor> {
        self.linear(&attention_heads(self, qkv, step, cache)?, o_proj)
    }
    /// silu(first half) * second half over the last dimension.
    fn swiglu(&self, x: &Self::Tensor) -> Result<Self::Tensor>;
    /// `linear(swiglu(x), w)` (the MLP's down projection); a backend may fuse the two so the
    /// gated activations are never materialized. Same result as the composition.
    fn swiglu_linear(&self, x: &Self::Tensor, w: &Self::Linear) -> Result<Self::Tensor> {
        self.linear(&self.swiglu(x)?, w)
    }
    /// Prepares the MLP's fused gate/up projection (`[2I, K]`: the gate rows, then the up
    /// rows), which only [`mlp`](Self::mlp) runs: a backend may pack it so that its GEMM
    /// applies SwiGLU in the epilogue. Default: [`prepare_linear`](Self::prepare_linear).
    fn prepare_gate_up(&self, weights: LinearWeights<'_>) -> Result<Self::Linear> {
        self.prepare_linear(weights)
    }
    /// The MLP, `down(swiglu(gate_up(x)))`, with `gate_up` from
    /// [`prepare_gate_up`](Self::prepare_gate_up). Default: [`linear`](Self::linear), then
    /// [`swiglu_linear`](Self::swiglu_linear).
    fn mlp(&self, x: &Self::Tensor, gate_up: &Self::Linear, down: &Self::Linear) -> Result<Self::Tensor> {
        self.swiglu_linear(&self.linear(x, gate_up)?, down)
    }
    /// `(linear(rms_norm(x + residual)), x + residual)`: a block's residual add and pre-norm
    /// feeding its QKV projection; a backend may fuse the norm into the linear's activation
    /// quantization. Default: [`add_rms_norm`](Self::add_rms_norm), then [`linear`](Self::linear).
    fn add_rms_norm_linear(
        &self,
        x: &Self::Tensor,
        residual: &Self::Tensor,
        gamma: &Self::Tensor,
        eps: f64,
        w: &Self::Linear,
    ) -> Result<(Self::Tensor, Self::Tensor)> {
        let (normed, sum) = self.add_rms_norm(x, residual, gamma, eps)?;
        Ok((self.linear(&normed, w)?, sum))
    }
    /// `(mlp(rms_norm(x + residual)), x + residual)`, like
    /// [`add_rms_norm_linear`](Self::add_rms_norm_linear) for the MLP. Default:
    /// [`add_rms_norm`](Self::add_rms_norm), then [`mlp`](Self::mlp).
    fn add_rms_norm_mlp(
        &self,
        x: &Self::Tensor,
        residual: &Self::Tensor,
        gamma: &Self::Tensor,
        eps: f64,
        gate_up: &Self::Linear,
        down: &Self::Linear,
    ) -> Result<(Self::Tensor, Self::Tensor)> {
        let (normed, sum) = self.add_rms_norm(x, residual, gamma, eps)?;
        Ok((self.mlp(&normed, gate_up, down)?, sum))
    }
    /// Picks rows of `x` `[B, S, H]` by their flat index `b * S + s` -> `[rows, 1, H]` (the last
    /// real position of each sequence before the final norm).
    fn select_rows(&self, x: &Self::Tensor, rows: &Self::Indices) -> Result<Self::Tensor>;
    /// Copies a tensor to the host as f32 (the logits at the end of a step).
    fn to_host_f32(&self, x: &Self::Tensor) -> Result<Tensor>;
    /// Bytes of weight a forward through `w` reads (bandwidth accounting).
    fn linear_bytes(&self, w: &Self::Linear) -> usize;
    /// Identity of the cache storage (tests check that decode never reallocates it).
    fn kv_cache_id(&self, cache: &Self::KvCache) -> usize;
}
