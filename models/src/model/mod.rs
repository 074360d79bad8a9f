//! The llama / qwen2 decoder, written once over [`Backend`].
//!
//! Follows the HF `modeling_llama.py` / `modeling_qwen2.py` structure (pre-norm decoder,
//! GQA attention with half-rotation RoPE, SwiGLU MLP) and the reference NPU adaptations:
//! - a fixed KV cache per layer, allocated once for (max_batch, max_seq_len) and written in
//!   place at per-sequence positions (no concatenation, no reallocation);
//! - RoPE tables computed once at load and gathered once per forward, shared by all layers;
//! - q/k/v merged into one projection and gate/up into one, at load;
//! - Add+RMSNorm fusion carrying the residual between sub-blocks and layers;
//! - fused prompt attention (prefill) and decode attention, GQA inside the kernel;
//! - prefill computes logits only at the last real position of each sequence;
//! - batches of prompts of different lengths (right-padded, each with its own position).
//!
//! llama and qwen2 differ only in configuration (q/k/v bias, rope theta, tied embeddings).

mod layer;
mod prepared;
mod rope;

pub use layer::HostLayer;
pub use prepared::{HostLinear, KvQuant, PreparedLayer, PreparedModel};

pub use rope::rope_tables;

use crate::backend::{AttentionStep, Backend, StepPlan};
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::loader::Weights;
use crate::quant::prepare::{check_plan, prepare_embedding_and_lm_head, prepare_layer};
use crate::quant::{Calibration, QuantConfig};
use candle_core::Tensor;

/// Capacity of the fixed KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheConfig {
    /// Sequences that can be decoded together.
    pub max_batch: usize,
    /// Positions per sequence (prompt + generated tokens).
    pub max_seq_len: usize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self { max_batch: 1, max_seq_len: 2048 }
    }
}

struct DecoderLayer<B: Backend> {
    input_norm: B::Tensor,
    qkv: B::Linear,
    o_proj: B::Linear,
    post_attention_norm: B::Tensor,
    gate_up: B::Linear,
    down: B::Linear,
}

/// Where the embedding rows of a step come from.
enum Embedding<B: Backend> {
    /// A float table.
    Table(B::Tensor),
    /// int8 rows with a per-row scale, held as a W8A16 linear (untied models with int8 weights).
    Int8Rows(B::Linear),
    /// The rows of the int8 lm_head (tied models with int8 weights).
    LmHead,
}

/// A llama / qwen2 causal LM resident on backend `B`, with its fixed KV cache.
pub struct Transformer<B: Backend> {
    backend: B,
    config: ModelConfig,
    cache_config: CacheConfig,
    /// Where a step's embedding rows come from (see [`Self::from_layers`]).
    embed_tokens: Embedding<B>,
    rope_cos: B::Tensor,
    rope_sin: B::Tensor,
    layers: Vec<DecoderLayer<B>>,
    final_norm: B::Tensor,
    lm_head: B::Linear,
    kv_caches: Vec<B::KvCache>,
}

impl<B: Backend> Transformer<B> {
    /// Builds the model from HF-named host weights: merges q/k/v and gate/up, prepares every
    /// linear on the backend, computes the RoPE tables and allocates the KV cache.
    pub fn new(backend: B, config: ModelConfig, weights: &Weights, cache_config: CacheConfig) -> Result<Self> {
        Self::new_quantized(backend, config, weights, cache_config, None)
    }

    /// Like [`new`](Self::new), quantizing at load what `quant` asks for without calibration
    /// data: int8 weights with float activations and KV cache (W8A16, round-to-nearest per
    /// output channel, the `w8a16` preset), honouring `float_layers` and
    /// `modules_to_not_convert`. Configurations with int8 activations or KV cache need
    /// [`new_calibrated`](Self::new_calibrated).
    pub fn new_quantized(
        backend: B,
        config: ModelConfig,
        weights: &Weights,
        cache_config: CacheConfig,
        quant: Option<&QuantConfig>,
    ) -> Result<Self> {
        Self::new_calibrated(backend, config, weights, cache_config, quant, None)
    }

    /// Like [`new_quantized`](Self::new_quantized) with calibrated ranges, which int8
    /// activations (A8W8) and the int8 KV cache (C8) need: SmoothQuant scales are folded into
    /// the norm gammas and the producing weights, each converted linear gets int8 weights,
    /// static activation parameters and the zero-point-correcting int32 bias, and each
    /// quantized layer's cache stores int8 with per-channel parameters (see `quant::prepare`).
    /// Layers are quantized and uploaded one at a time, so the host holds one extra layer.
    pub fn new_calibrated(
        backend: B,
        config: ModelConfig,
        weights: &Weights,
        cache_config: CacheConfig,
        quant: Option<&QuantConfig>,
        calibration: Option<&Calibration>,
    ) -> Result<Self> {
        if let Some(q) = quant {
            check_plan(q, &config, calibration)?;
        }
        config.validate()?;
        let c = &config;
        let (embed, lm_head) = prepare_embedding_and_lm_head(weights, c, quant)?;
        let final_norm = weights.get_with_shape("model.norm.weight", &[c.hidden_size])?;
        let layers = (0..c.num_layers).map(|i| prepare_layer(weights, c, i, quant, calibration));
        Self::from_layers(backend, config.clone(), cache_config, embed.as_ref(), &final_norm, &lm_head, layers)
    }

    /// Builds the model from a prepared (possibly quantized) host model, e.g. a quantized
    /// checkpoint.
    pub fn from_prepared(backend: B, model: &PreparedModel, cache_config: CacheConfig) -> Result<Self> {
        let layers = model.layers.iter().cloned().map(Ok);
        Self::from_layers(
            backend,
            model.config.clone(),
            cache_config,
            model.embed_tokens.as_ref(),
            &model.final_norm,
            &model.lm_head,
            layers,
        )
    }

    /// Uploads the embedding, norms and lm_head, then each prepared layer as it comes
    /// (dropping its host form), computes the RoPE tables and allocates the KV cache. The
    /// embedding table is float or int8 rows (W8A16 form, read row by row); a tied model whose
    /// lm_head the backend can read rows from (int8 weights) keeps no separate table:
    /// `embed_tokens` is then ignored and may be `None`.
    pub fn from_layers(
        backend: B,
        config: ModelConfig,
        cache_config: CacheConfig,
        embed_tokens: Option<&HostLinear>,
        final_norm: &Tensor,
        lm_head: &HostLinear,
        layers: impl IntoIterator<Item = Result<PreparedLayer>>,
    ) -> Result<Self> {
        let _span = tracing::info_span!("load", backend = %backend.name(), layers = config.num_layers).entered();
        config.validate()?;
        if cache_config.max_batch == 0 || cache_config.max_seq_len == 0 {
            return Err(ModelError::InvalidInput("max_batch and max_seq_len must be positive".into()));
        }
        let c = &config;
        let (h, d) = (c.hidden_size, c.head_dim);
        let mut uploaded = Vec::with_capacity(c.num_layers);
        let mut kv_caches = Vec::with_capacity(c.num_layers);
        for layer in layers {
            let layer = layer?;
            kv_caches.push(backend.new_kv_cache(
                cache_config.max_batch,
                cache_config.max_seq_len,
                c.num_kv_heads,
                d,
                layer.kv.as_ref(),
            )?);
            uploaded.push(DecoderLayer {
                input_norm: backend.upload(&layer.input_norm)?,
                qkv: backend.prepare_linear(layer.qkv.as_weights())?,
                o_proj: backend.prepare_linear(layer.o_proj.as_weights())?,
                post_attention_norm: backend.upload(&layer.post_attention_norm)?,
                gate_up: backend.prepare_gate_up(layer.gate_up.as_weights())?,
                down: backend.prepare_linear(layer.down.as_weights())?,
            });
        }
        if uploaded.len() != c.num_layers {
            return Err(ModelError::InvalidInput(format!(
                "{} decoder layers given for a model of {}",
                uploaded.len(),
                c.num_layers
            )));
        }
        let embed_dims = embed_tokens.map(HostLinear::dims).transpose()?;
        if lm_head.dims()? != (c.vocab_size, h) || embed_dims.is_some_and(|e| e != (c.vocab_size, h)) {
            return Err(ModelError::InvalidInput(format!(
                "embedding {embed_dims:?} / lm_head {:?} do not match vocab {} x hidden {h}",
                lm_head.dims()?,
                c.vocab_size
            )));
        }
        let lm_head = backend.prepare_linear(lm_head.as_weights())?;
        let embed_tokens = match embed_tokens {
            _ if c.tie_word_embeddings && backend.linear_gathers_rows(&lm_head) => Embedding::LmHead,
            Some(HostLinear::Float { weight, .. }) => Embedding::Table(backend.upload(weight)?),
            Some(int8 @ HostLinear::Int8Weight { .. }) => {
                let rows = backend.prepare_linear(int8.as_weights())?;
                if !backend.linear_gathers_rows(&rows) {
                    return Err(ModelError::InvalidInput(format!(
                        "the {} backend cannot read embedding rows from an int8 table",
                        backend.name()
                    )));
                }
                Embedding::Int8Rows(rows)
            }
            Some(other) => {
                return Err(ModelError::InvalidInput(format!(
                    "an embedding table must be float or int8 weights (w8a16), not {}",
                    other.kind()
                )));
            }
            None => {
                return Err(ModelError::InvalidInput(
                    "no embedding table, and the lm_head cannot stand in for it (untied, or not int8 weights)".into(),
                ));
            }
        };
        let (cos, sin) = rope_tables(d, cache_config.max_seq_len, c.rope_theta)?;
        Ok(Self {
            embed_tokens,
            rope_cos: backend.upload(&cos)?,
            rope_sin: backend.upload(&sin)?,
            final_norm: backend.upload(final_norm)?,
            lm_head,
            layers: uploaded,
            kv_caches,
            backend,
            config,
            cache_config,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn cache_config(&self) -> CacheConfig {
        self.cache_config
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Weight bytes one decode step reads: every linear once (embedding rows are negligible).
    pub fn weight_bytes_per_token(&self) -> usize {
        let be = &self.backend;
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                be.linear_bytes(&l.qkv)
                    + be.linear_bytes(&l.o_proj)
                    + be.linear_bytes(&l.gate_up)
                    + be.linear_bytes(&l.down)
            })
            .sum();
        layers + be.linear_bytes(&self.lm_head)
    }

    /// Bytes of weights held: every linear ([`Self::weight_bytes_per_token`]) plus the embedding
    /// table (none when a tied int8 lm_head serves as it; norms and RoPE tables are not counted).
    pub fn resident_weight_bytes(&self) -> usize {
        let table = match &self.embed_tokens {
            Embedding::Table(_) => {
                self.config.vocab_size * self.config.hidden_size * self.backend.dtype().size_in_bytes()
            }
            Embedding::Int8Rows(rows) => self.backend.linear_bytes(rows),
            Embedding::LmHead => 0,
        };
        self.weight_bytes_per_token() + table
    }

    /// Bytes the KV cache of every layer holds (memory reports).
    pub fn kv_cache_bytes(&self) -> usize {
        self.kv_caches.iter().map(|c| self.backend.kv_cache_bytes(c)).sum()
    }

    /// Identity of the first layer's cache storage (stable across steps: nothing reallocates).
    pub fn kv_cache_id(&self) -> usize {
        self.kv_caches.first().map_or(0, |c| self.backend.kv_cache_id(c))
    }

    /// Runs one step and returns host f32 logits `[batch, vocab]` at the last real position of
    /// each sequence.
    ///
    /// `ids` holds `batch * seq_len` token ids, row-major, each row right-padded past
    /// `lens[b]`; sequence `b`'s first token sits at position `start[b]` and its earlier
    /// positions must already be in the cache. Prefill is `start = 0`; decode is `seq_len = 1`
    /// with `start[b]` the number of tokens the sequence already holds.
    pub fn forward(&mut self, ids: &[u32], seq_len: usize, start: &[usize], lens: &[usize]) -> Result<Tensor> {
        B::run_step(seq_len == 1, || {
            let (hidden, residual) = self.run_layers(ids, seq_len, start, lens, true)?;
            self.logits(&hidden, &residual, start.len(), 1)
        })
    }

    /// Like [`forward`](Self::forward) but returns the logits of every position,
    /// `[batch, seq_len, vocab]` (perplexity and agreement measurements); rows past `lens[b]`
    /// are padding and hold unspecified values.
    pub fn forward_all(&mut self, ids: &[u32], seq_len: usize, start: &[usize], lens: &[usize]) -> Result<Tensor> {
        B::run_step(seq_len == 1, || {
            let (hidden, residual) = self.run_layers(ids, seq_len, start, lens, false)?;
            self.logits(&hidden, &residual, start.len(), seq_len)
        })
    }

    /// Final norm and lm_head over `[batch, seq, H]`, to host f32 `[batch, vocab]` (seq = 1) or
    /// `[batch, seq, vocab]`.
    fn logits(&self, hidden: &B::Tensor, residual: &B::Tensor, batch: usize, seq: usize) -> Result<Tensor> {
        let be = &self.backend;
        let (normed, _) = be.add_rms_norm(hidden, residual, &self.final_norm, self.config.rms_norm_eps)?;
        let logits = be.to_host_f32(&be.linear(&normed, &self.lm_head)?)?;
        let vocab = self.config.vocab_size;
        Ok(if seq == 1 { logits.reshape((batch, vocab))? } else { logits.reshape((batch, seq, vocab))? })
    }

    /// Embedding and every decoder layer; returns the last layer's MLP output and the residual
    /// stream `[batch, seq_len, H]` (their sum is the final hidden state), or with `last_only`
    /// just the last real position of each sequence, `[batch, 1, H]`.
    fn run_layers(
        &mut self,
        ids: &[u32],
        seq_len: usize,
        start: &[usize],
        lens: &[usize],
        last_only: bool,
    ) -> Result<(B::Tensor, B::Tensor)> {
        let batch = start.len();
        let plan = StepPlan { batch, seq_len, start, lens };
        self.check_step(ids, &plan)?;
        let _span = if plan.is_decode() {
            tracing::debug_span!("decode", batch).entered()
        } else {
            tracing::debug_span!("prefill", batch, seq_len).entered()
        };
        let c = &self.config;
        let be = &self.backend;
        let (nq, nkv, d) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let scale = 1.0 / (d as f32).sqrt();
        let eps = c.rms_norm_eps;

        // Positions of every (sequence, token) slot; padded slots are clamped into the table
        // (their outputs are never read).
        let last_pos = self.cache_config.max_seq_len - 1;
        let positions: Vec<u32> =
            (0..batch).flat_map(|b| (0..seq_len).map(move |i| (start[b] + i).min(last_pos) as u32)).collect();
        // The flat row of each sequence's last real token (prefill keeps only those rows).
        let pick_rows = last_only && seq_len > 1;
        let last_rows: Vec<u32> = if pick_rows {
            lens.iter().enumerate().map(|(b, &l)| (b * seq_len + l - 1) as u32).collect()
        } else {
            vec![]
        };
        // All of the step's indices reach the device in one copy.
        let starts: Vec<u32> = start.iter().map(|&s| s as u32).collect();
        let mut indices = be.upload_indices(&[ids, &positions, &last_rows, &starts])?.into_iter();
        let (Some(ids), Some(positions), Some(last_rows), Some(starts)) =
            (indices.next(), indices.next(), indices.next(), indices.next())
        else {
            return Err(ModelError::InvalidInput("backend returned fewer index lists than uploaded".into()));
        };
        let cos = be.gather_rows(&self.rope_cos, &positions, batch, seq_len)?;
        let sin = be.gather_rows(&self.rope_sin, &positions, batch, seq_len)?;

        let mut residual = match &self.embed_tokens {
            Embedding::Table(table) => be.gather_rows(table, &ids, batch, seq_len)?,
            Embedding::Int8Rows(rows) => be.gather_linear_rows(rows, &ids, batch, seq_len)?,
            Embedding::LmHead => be.gather_linear_rows(&self.lm_head, &ids, batch, seq_len)?,
        };
        let step = AttentionStep {
            plan: &plan,
            starts: &starts,
            cos: &cos,
            sin: &sin,
            num_heads: nq,
            num_kv_heads: nkv,
            head_dim: d,
            scale,
        };
        // The previous layer's MLP output, added to the residual stream by the next pre-norm
        // (fused with the projection after it where the backend can).
        let mut mlp_out: Option<B::Tensor> = None;
        for (layer, cache) in self.layers.iter().zip(self.kv_caches.iter_mut()) {
            let qkv = match mlp_out.take() {
                None => be.linear(&be.rms_norm(&residual, &layer.input_norm, eps)?, &layer.qkv)?,
                Some(prev) => {
                    let (qkv, sum) = be.add_rms_norm_linear(&prev, &residual, &layer.input_norm, eps, &layer.qkv)?;
                    residual = sum;
                    qkv
                }
            };
            let attn_out = be.attention_sublayer(&qkv, &step, cache, &layer.o_proj)?;
            let (out, sum) = be.add_rms_norm_mlp(
                &attn_out,
                &residual,
                &layer.post_attention_norm,
                eps,
                &layer.gate_up,
                &layer.down,
            )?;
            residual = sum;
            mlp_out = Some(out);
        }
        let Some(hidden) = mlp_out else {
            return Err(ModelError::InvalidInput("the model has no decoder layers".into()));
        };
        if pick_rows {
            return Ok((be.select_rows(&hidden, &last_rows)?, be.select_rows(&residual, &last_rows)?));
        }
        Ok((hidden, residual))
    }

    fn check_step(&self, ids: &[u32], plan: &StepPlan<'_>) -> Result<()> {
        let bad = |m: String| Err(ModelError::InvalidInput(m));
        let (batch, seq_len) = (plan.batch, plan.seq_len);
        if batch == 0 || seq_len == 0 {
            return bad("a step needs at least one sequence and one token".into());
        }
        if batch > self.cache_config.max_batch {
            return bad(format!("batch of {batch} exceeds the cache's max_batch {}", self.cache_config.max_batch));
        }
        if plan.lens.len() != batch || ids.len() != batch * seq_len {
            return bad(format!(
                "{} ids, {} lens and {} starts do not describe a [{batch}, {seq_len}] step",
                ids.len(),
                plan.lens.len(),
                batch
            ));
        }
        if let Some(l) = plan.lens.iter().find(|&&l| l == 0 || l > seq_len) {
            return bad(format!("sequence length {l} is outside 1..={seq_len}"));
        }
        let capacity = self.cache_config.max_seq_len;
        if let Some(requested) = plan.start.iter().map(|s| s + seq_len).find(|&end| end > capacity) {
            return Err(ModelError::CacheFull { capacity, requested });
        }
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= self.config.vocab_size) {
            return bad(format!("token id {id} is outside the vocabulary of {}", self.config.vocab_size));
        }
        Ok(())
    }
}

/// The lm_head weight: its own, or the embedding when tied.
pub fn lm_head_weight(weights: &Weights, c: &ModelConfig, embed: &Tensor) -> Result<Tensor> {
    if c.tie_word_embeddings {
        return Ok(embed.clone());
    }
    if !weights.contains("lm_head.weight") {
        return Err(ModelError::MissingWeight { name: "lm_head.weight".into(), path: weights.source().to_path_buf() });
    }
    weights.get_with_shape("lm_head.weight", &[c.vocab_size, c.hidden_size])
}
