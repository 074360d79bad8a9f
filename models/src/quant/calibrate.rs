//! Calibration: run the float model over calibration sequences and record, for the input of
//! every linear layer and for the keys and values written to every layer's cache, the
//! per-channel minimum and maximum. SmoothQuant's migration scales, the static per-tensor
//! asymmetric activation parameters and the per-channel int8 KV-cache parameters (DESIGN.md
//! section 6) are derived from these ranges.
//!
//! The model code is not touched: [`calibrate`] runs it on an observing backend that wraps the
//! CPU backend and looks at every linear input on its way through.

use crate::backend::{Backend, CpuBackend, CpuLinear, LinearWeights, StepPlan, cpu::CpuKvCache};
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::loader::Weights;
use crate::model::{CacheConfig, KvQuant, Transformer};
use candle_core::{DType, Tensor};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Per-channel range of one linear input.
#[derive(Debug, Clone, PartialEq)]
pub struct ChannelRange {
    pub min: Vec<f32>,
    pub max: Vec<f32>,
}

impl ChannelRange {
    fn new(channels: usize) -> Self {
        Self { min: vec![f32::INFINITY; channels], max: vec![f32::NEG_INFINITY; channels] }
    }

    /// max |x_j| per channel.
    pub fn absmax(&self) -> Vec<f32> {
        self.min.iter().zip(&self.max).map(|(a, b)| a.abs().max(b.abs())).collect()
    }

    /// Per-tensor (min, max) of the input after dividing channel j by `divisor[j]` (> 0).
    pub fn tensor_range(&self, divisor: Option<&[f32]>) -> (f32, f32) {
        let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
        for j in 0..self.min.len() {
            let d = divisor.map_or(1.0, |d| d[j]);
            lo = lo.min(self.min[j] / d);
            hi = hi.max(self.max[j] / d);
        }
        (lo, hi)
    }

    fn update(&mut self, x: &Tensor) -> candle_core::Result<()> {
        let k = self.min.len();
        let values = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        for row in values.chunks_exact(k) {
            for ((lo, hi), &v) in self.min.iter_mut().zip(self.max.iter_mut()).zip(row) {
                *lo = lo.min(v);
                *hi = hi.max(v);
            }
        }
        Ok(())
    }
}

/// Ranges of every linear input of a model.
#[derive(Debug, Clone, PartialEq)]
pub struct Calibration {
    /// Per decoder layer: inputs of [qkv, o_proj, gate_up, down].
    pub layers: Vec<[ChannelRange; 4]>,
    /// Per decoder layer: [K (after RoPE), V] as written to the cache, per channel
    /// `kv_head * head_dim + d`.
    pub kv: Vec<[ChannelRange; 2]>,
    /// Tokens the statistics were collected over.
    pub tokens: usize,
}

/// Runs the f32 model over `sequences` (token ids, each run as one prefill) and collects the
/// input range of every decoder linear. Deterministic for given weights and sequences.
pub fn calibrate(config: &ModelConfig, weights: &Weights, sequences: &[Vec<u32>]) -> Result<Calibration> {
    let tokens: usize = sequences.iter().map(Vec::len).sum();
    if sequences.is_empty() || tokens < 16 {
        return Err(ModelError::InvalidInput(format!(
            "calibration needs at least 16 tokens of data, got {tokens} in {} sequences",
            sequences.len()
        )));
    }
    let longest = sequences.iter().map(Vec::len).max().unwrap_or(1);
    let observer = Observer {
        inner: CpuBackend::new(DType::F32)?,
        next_id: AtomicUsize::new(0),
        next_cache: AtomicUsize::new(0),
        ranges: Mutex::new(Vec::new()),
        kv_ranges: Mutex::new(Vec::new()),
    };
    let cache = CacheConfig { max_batch: 1, max_seq_len: longest };
    let mut model = Transformer::new(observer, config.clone(), weights, cache)?;
    let progress = crate::progress::bar(tokens as u64, "calibrating", "tokens");
    for seq in sequences.iter().filter(|s| !s.is_empty()) {
        model.forward(seq, seq.len(), &[0], &[seq.len()])?;
        progress.inc(seq.len() as u64);
    }
    progress.finish_and_clear();
    let poisoned = || ModelError::InvalidInput("calibration state poisoned".into());
    let ranges = model.backend().ranges.lock().map_err(|_| poisoned())?;
    let kv_ranges = model.backend().kv_ranges.lock().map_err(|_| poisoned())?;
    let mut layers = Vec::with_capacity(config.num_layers);
    let mut kv = Vec::with_capacity(config.num_layers);
    for l in 0..config.num_layers {
        let take = |i: usize| {
            ranges.get(4 * l + i).and_then(|r| r.clone()).ok_or_else(|| {
                ModelError::InvalidInput(format!("calibration saw no input for linear {i} of layer {l}"))
            })
        };
        layers.push([take(0)?, take(1)?, take(2)?, take(3)?]);
        let pair = kv_ranges
            .get(l)
            .and_then(|p| p.clone())
            .ok_or_else(|| ModelError::InvalidInput(format!("calibration saw no keys or values for layer {l}")))?;
        kv.push(pair);
    }
    Ok(Calibration { layers, kv, tokens })
}

/// The CPU backend, recording the per-channel range of every linear input (linears are
/// numbered in the order the model prepares them) and of the keys and values written to each
/// layer's cache (caches numbered in allocation order, one per layer).
struct Observer {
    inner: CpuBackend,
    next_id: AtomicUsize,
    next_cache: AtomicUsize,
    ranges: Mutex<Vec<Option<ChannelRange>>>,
    kv_ranges: Mutex<Vec<Option<[ChannelRange; 2]>>>,
}

impl Backend for Observer {
    type Linear = (usize, CpuLinear);
    type KvCache = (usize, CpuKvCache);

    super::delegate_to_inner_cpu!();

    fn name(&self) -> String {
        "cpu (calibrating)".into()
    }
    fn prepare_linear(&self, weights: LinearWeights<'_>) -> candle_core::Result<Self::Linear> {
        Ok((self.next_id.fetch_add(1, Ordering::SeqCst), self.inner.prepare_linear(weights)?))
    }
    fn new_kv_cache(
        &self,
        batch: usize,
        capacity: usize,
        kv_heads: usize,
        head_dim: usize,
        quant: Option<&KvQuant>,
    ) -> candle_core::Result<Self::KvCache> {
        let id = self.next_cache.fetch_add(1, Ordering::SeqCst);
        Ok((id, self.inner.new_kv_cache(batch, capacity, kv_heads, head_dim, quant)?))
    }
    fn kv_cache_bytes(&self, c: &Self::KvCache) -> usize {
        self.inner.kv_cache_bytes(&c.1)
    }
    fn linear(&self, x: &Tensor, w: &Self::Linear) -> candle_core::Result<Tensor> {
        {
            let mut ranges =
                self.ranges.lock().map_err(|_| candle_core::Error::Msg("calibration state poisoned".into()))?;
            if ranges.len() <= w.0 {
                ranges.resize(w.0 + 1, None);
            }
            let k = *x.dims().last().unwrap_or(&0);
            ranges[w.0].get_or_insert_with(|| ChannelRange::new(k)).update(x)?;
        }
        self.inner.linear(x, &w.1)
    }
    fn kv_write(
        &self,
        c: &mut Self::KvCache,
        k: &Tensor,
        v: &Tensor,
        plan: &StepPlan<'_>,
        starts: &Vec<u32>,
    ) -> candle_core::Result<()> {
        {
            let mut ranges =
                self.kv_ranges.lock().map_err(|_| candle_core::Error::Msg("calibration state poisoned".into()))?;
            if ranges.len() <= c.0 {
                ranges.resize(c.0 + 1, None);
            }
            let channels = k.dim(2)? * k.dim(3)?;
            let pair = ranges[c.0].get_or_insert_with(|| [ChannelRange::new(channels), ChannelRange::new(channels)]);
            pair[0].update(k)?;
            pair[1].update(v)?;
        }
        self.inner.kv_write(&mut c.1, k, v, plan, starts)
    }
    fn attention(&self, q: &Tensor, c: &Self::KvCache, plan: &StepPlan<'_>, scale: f32) -> candle_core::Result<Tensor> {
        self.inner.attention(q, &c.1, plan, scale)
    }
    fn linear_bytes(&self, w: &Self::Linear) -> usize {
        self.inner.linear_bytes(&w.1)
    }
    fn kv_cache_id(&self, c: &Self::KvCache) -> usize {
        self.inner.kv_cache_id(&c.1)
    }
}

/// Length of the sequences calibration text is cut into (each runs as one prefill).
pub const CALIBRATION_SEQ_LEN: usize = 512;
/// Calibration tokens used when the caller gives no budget.
pub const DEFAULT_CALIBRATION_TOKENS: usize = 4096;

/// Calibration token sequences from `text` (the first `max_tokens` tokens, cut into sequences
/// of [`CALIBRATION_SEQ_LEN`]), or, when `text` is `None`, from the MMLU calibration split
/// (`eval::mmlu`, fetched into the cache on first use; disjoint from the held-out text and the
/// scored items). Returns the sequences and a description of their source. Errors when the
/// text gives fewer than 16 tokens.
pub fn calibration_sequences(
    tokenizer: &crate::loader::TokenizerBundle,
    text: Option<&str>,
    max_tokens: usize,
    cache: Option<&std::path::Path>,
) -> Result<(Vec<Vec<u32>>, String)> {
    let (ids, source) = match text {
        Some(t) => (tokenizer.encode(t)?, "the given calibration text".to_string()),
        None => {
            let mmlu = crate::eval::mmlu::Mmlu::fetch(cache).map_err(|e| {
                ModelError::Fetch(format!(
                    "the default calibration data (the MMLU calibration split) is unavailable: {e}; \
                     give a calibration text file instead (--calib FILE)"
                ))
            })?;
            (tokenizer.encode(&mmlu.calibration_text())?, "the MMLU calibration split".to_string())
        }
    };
    let ids = &ids[..ids.len().min(max_tokens)];
    if ids.len() < 16 {
        return Err(ModelError::InvalidInput(format!(
            "the calibration data ({source}) gives {} tokens; calibration needs at least 16",
            ids.len()
        )));
    }
    let sequences: Vec<Vec<u32>> = ids.chunks(CALIBRATION_SEQ_LEN).map(<[u32]>::to_vec).collect();
    Ok((sequences, format!("{} tokens of {source}", ids.len())))
}
