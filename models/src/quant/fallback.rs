//! Automatic fallback layers: which decoder layers to keep in float so that the quantized
//! model stays within an error budget. (The reference adaptations pick `FLOAT_LAYERS` by hand.)
//!
//! 1. **Rank.** The float model runs over the calibration sequences on a comparing backend:
//!    every quantized linear of every layer is run on the very input its float twin sees (after
//!    SmoothQuant folding, so the inputs are those of the quantized model) and the relative
//!    squared error `||y_q - y||^2 / ||y||^2` is accumulated; keys and values are quantized and
//!    dequantized with the layer's cache parameters, likewise. A layer's error is the sum over
//!    its four linears and its K and V.
//! 2. **Search.** With the worst `j` layers in float (`j = 0, 1, 2, 3, 4, 6, 8, 12, ...` up to
//!    the limit), the quantized model is built and its next-token distributions on the first
//!    [`EVAL_TOKENS`] calibration tokens are compared with the float model's: the mean KL
//!    divergence `KL(float || quantized)` in nats per token. The first `j` within the budget is
//!    chosen; if none is, the trial with the lowest divergence is taken and the report says the
//!    budget was not met.
//!
//! Deterministic for given weights, configuration and calibration data.

use super::calibrate::Calibration;
use super::config::QuantConfig;
use super::prepare::prepare_layer_pair;
use crate::backend::{Backend, CpuBackend, CpuLinear, LinearWeights, StepPlan, cpu::CpuKvCache};
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::loader::Weights;
use crate::model::{CacheConfig, KvQuant, Transformer, lm_head_weight};
use candle_core::{DType, Tensor};
use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex};

/// Default budget: mean KL divergence per token (nats).
pub const DEFAULT_BUDGET: f64 = 0.02;
/// Calibration tokens the end-to-end comparison runs over.
pub const EVAL_TOKENS: usize = 512;

/// Search limits.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Mean KL divergence per token to reach.
    pub budget: f64,
    /// Most layers kept in float.
    pub max_layers: usize,
}

/// What the search measured and chose.
#[derive(Debug, Clone, PartialEq)]
pub struct FallbackReport {
    /// Per decoder layer: summed relative squared error of its quantized linears and cache.
    pub layer_errors: Vec<f64>,
    /// Each trial: the layers kept in float and the mean KL divergence measured.
    pub trials: Vec<(Vec<usize>, f64)>,
    /// The layers to keep in float (sorted), added to the configuration's own `float_layers`.
    pub chosen: Vec<usize>,
    pub budget: f64,
    /// Whether the chosen set is within the budget.
    pub met: bool,
}

impl fmt::Display for FallbackReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut ranked: Vec<(usize, f64)> = self.layer_errors.iter().copied().enumerate().collect();
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
        let worst: Vec<String> = ranked.iter().take(5).map(|(l, e)| format!("{l} ({e:.2e})")).collect();
        writeln!(f, "fallback search: worst layers {}", worst.join(", "))?;
        for (layers, kl) in &self.trials {
            writeln!(f, "  float layers {layers:?}: mean KL {kl:.4} nats/token")?;
        }
        let verdict = if self.met { "within" } else { "NOT within (best trial taken)" };
        write!(f, "  chosen float layers {:?}: {verdict} the budget of {} nats/token", self.chosen, self.budget)
    }
}

/// Runs the search (see the module docs) for `quant` over `sequences` (the calibration data).
pub fn choose_fallback_layers(
    config: &ModelConfig,
    weights: &Weights,
    quant: &QuantConfig,
    calibration: &Calibration,
    sequences: &[Vec<u32>],
    options: &Options,
) -> Result<FallbackReport> {
    let eval = eval_windows(sequences);
    if eval.is_empty() {
        return Err(ModelError::InvalidInput("the fallback search needs calibration tokens".into()));
    }
    let longest = sequences.iter().map(Vec::len).max().unwrap_or(1).max(1);
    let cache = CacheConfig { max_batch: 1, max_seq_len: longest };
    let layer_errors = rank_layers(config, weights, quant, calibration, sequences, cache)?;

    let mut float = Transformer::new(CpuBackend::new(DType::F32)?, config.clone(), weights, cache)?;
    let reference: Vec<Tensor> =
        eval.iter().map(|w| log_softmax_rows(&logits_of(&mut float, w)?)).collect::<Result<_>>()?;
    drop(float);

    let mut order: Vec<usize> = (0..config.num_layers).filter(|&l| quant.quantizes_layer(l)).collect();
    order.sort_by(|&a, &b| layer_errors[b].total_cmp(&layer_errors[a]).then(a.cmp(&b)));
    let limit = options.max_layers.min(order.len());
    let mut counts: Vec<usize> = [0usize, 1, 2, 3, 4].into_iter().take_while(|&j| j <= limit).collect();
    let mut j = 6;
    while j < limit {
        counts.push(j);
        j = j * 3 / 2;
    }
    if counts.last() != Some(&limit) {
        counts.push(limit);
    }
    let progress = crate::progress::bar(counts.len() as u64, "fallback search", "trials");
    let mut trials = Vec::new();
    let mut chosen = None;
    for &count in &counts {
        let mut layers: Vec<usize> = order[..count].to_vec();
        layers.sort_unstable();
        let mut trial = quant.clone();
        trial.float_layers.extend(&layers);
        trial.float_layers.sort_unstable();
        let mut model = Transformer::new_calibrated(
            CpuBackend::new(DType::F32)?,
            config.clone(),
            weights,
            cache,
            Some(&trial),
            Some(calibration),
        )?;
        let mut kl_sum = 0.0;
        let mut tokens = 0usize;
        for (w, float_logp) in eval.iter().zip(&reference) {
            let q = log_softmax_rows(&logits_of(&mut model, w)?)?;
            kl_sum += kl_sum_rows(float_logp, &q)?;
            tokens += w.len();
        }
        let kl = kl_sum / tokens as f64;
        trials.push((layers.clone(), kl));
        progress.inc(1);
        if kl <= options.budget {
            chosen = Some(layers);
            break;
        }
    }
    progress.finish_and_clear();
    let met = chosen.is_some();
    // Budget not met: the trial with the lowest error (more float layers do not always help:
    // the ranking is per layer, the errors of neighbouring layers interact).
    let chosen = chosen
        .unwrap_or_else(|| trials.iter().min_by(|a, b| a.1.total_cmp(&b.1)).map(|t| t.0.clone()).unwrap_or_default());
    Ok(FallbackReport { layer_errors, trials, chosen, budget: options.budget, met })
}

/// The first [`EVAL_TOKENS`] tokens of the calibration data, as whole-or-cut sequences.
fn eval_windows(sequences: &[Vec<u32>]) -> Vec<Vec<u32>> {
    let mut left = EVAL_TOKENS;
    let mut out = Vec::new();
    for s in sequences {
        if left == 0 {
            break;
        }
        let take = s.len().min(left);
        if take >= 2 {
            out.push(s[..take].to_vec());
        }
        left -= take;
    }
    out
}

fn logits_of<B: Backend>(model: &mut Transformer<B>, ids: &[u32]) -> Result<Tensor> {
    Ok(model.forward_all(ids, ids.len(), &[0], &[ids.len()])?.squeeze(0)?)
}

/// Row-wise log-softmax of `[T, V]` f32 logits.
fn log_softmax_rows(logits: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::ops::log_softmax(logits, candle_core::D::Minus1)?)
}

/// Sum over rows of `KL(p || q)` given row-wise log-probabilities.
fn kl_sum_rows(log_p: &Tensor, log_q: &Tensor) -> Result<f64> {
    let p = log_p.exp()?;
    let kl = (p * (log_p - log_q)?)?.sum_all()?.to_scalar::<f32>()?;
    Ok(kl as f64)
}

/// Per-layer quantization error on the calibration data (step 1 of the module docs).
fn rank_layers(
    config: &ModelConfig,
    weights: &Weights,
    quant: &QuantConfig,
    calibration: &Calibration,
    sequences: &[Vec<u32>],
    cache: CacheConfig,
) -> Result<Vec<f64>> {
    let inner = CpuBackend::new(DType::F32)?;
    let pending = Arc::new(Mutex::new(Pending::default()));
    let backend = Comparing {
        inner: inner.clone(),
        pending: pending.clone(),
        next_id: std::sync::atomic::AtomicUsize::new(0),
        linear_errors: Mutex::new(Vec::new()),
        kv_errors: Mutex::new(Vec::new()),
    };
    let c = config;
    let embed = weights.get_with_shape("model.embed_tokens.weight", &[c.vocab_size, c.hidden_size])?;
    let lm_head = crate::model::HostLinear::Float { weight: lm_head_weight(weights, c, &embed)?, bias: None };
    let final_norm = weights.get_with_shape("model.norm.weight", &[c.hidden_size])?;
    let layers = (0..c.num_layers).map(|i| {
        let (quantized, float) = prepare_layer_pair(weights, c, i, quant, Some(calibration))?;
        let mut p = pending.lock().map_err(|_| poisoned())?;
        for l in quantized.linears() {
            let prepared = match l {
                crate::model::HostLinear::Float { .. } => None,
                other => Some(inner.prepare_linear(other.as_weights())?),
            };
            p.linears.push_back((i, prepared));
        }
        p.kv.push_back((i, quantized.kv.clone()));
        Ok(float)
    });
    let embed = crate::model::HostLinear::Float { weight: embed, bias: None };
    let mut model = Transformer::from_layers(backend, c.clone(), cache, Some(&embed), &final_norm, &lm_head, layers)?;
    let progress = crate::progress::bar(sequences.len() as u64, "ranking layers", "sequences");
    for s in sequences.iter().filter(|s| !s.is_empty()) {
        model.forward(s, s.len(), &[0], &[s.len()])?;
        progress.inc(1);
    }
    progress.finish_and_clear();
    let be = model.backend();
    let mut errors = vec![0f64; c.num_layers];
    for (layer, err, reference) in be.linear_errors.lock().map_err(|_| poisoned())?.iter().flatten() {
        errors[*layer] += err / reference.max(f64::MIN_POSITIVE);
    }
    for (layer, err, reference) in be.kv_errors.lock().map_err(|_| poisoned())?.iter().flatten() {
        errors[*layer] += err / reference.max(f64::MIN_POSITIVE);
    }
    Ok(errors)
}

fn poisoned() -> ModelError {
    ModelError::InvalidInput("fallback search state poisoned".into())
}

/// Per id: (layer, sum of squared differences, sum of squared float values).
type ErrorSums = Mutex<Vec<Option<(usize, f64, f64)>>>;

/// Quantized twins waiting for their float linear / cache to be prepared, in model order.
#[derive(Default)]
struct Pending {
    linears: VecDeque<(usize, Option<CpuLinear>)>,
    kv: VecDeque<(usize, Option<KvQuant>)>,
}

/// Runs the float model and, beside every linear and cache write, its quantized twin.
struct Comparing {
    inner: CpuBackend,
    pending: Arc<Mutex<Pending>>,
    next_id: std::sync::atomic::AtomicUsize,
    /// Per linear id: (layer, sum of squared differences, sum of squared float outputs).
    linear_errors: ErrorSums,
    /// Per cache id and K/V: the same for quantize-dequantize of what is written.
    kv_errors: ErrorSums,
}

/// A prepared float linear with its id and quantized twin.
struct TwinLinear {
    id: usize,
    layer: Option<usize>,
    float: CpuLinear,
    quantized: Option<CpuLinear>,
}

fn sq_diff(a: &Tensor, b: &Tensor) -> candle_core::Result<(f64, f64)> {
    let a32 = a.to_dtype(DType::F32)?;
    let d = (&a32 - b.to_dtype(DType::F32)?)?.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    let r = a32.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    Ok((d, r))
}

fn lock_err() -> candle_core::Error {
    candle_core::Error::Msg("fallback search state poisoned".into())
}

impl Comparing {
    fn record(slot: &ErrorSums, id: usize, layer: usize, d: f64, r: f64) -> candle_core::Result<()> {
        let mut v = slot.lock().map_err(|_| lock_err())?;
        if v.len() <= id {
            v.resize(id + 1, None);
        }
        let e = v[id].get_or_insert((layer, 0.0, 0.0));
        e.1 += d;
        e.2 += r;
        Ok(())
    }

    /// Quantize-dequantize `x` `[B, S, Nkv, D]` per channel with `(scale, offset)`.
    fn fake_quant(x: &Tensor, scale: &[f32], offset: &[f32]) -> candle_core::Result<Tensor> {
        let params = candle_ascend_ops::KvQuantParams { scale: scale.to_vec(), offset: offset.to_vec() };
        let channels = params.channels();
        let values = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let out: Vec<f32> = values
            .iter()
            .enumerate()
            .map(|(i, &v)| params.dequantize(i % channels, params.quantize(i % channels, v)))
            .collect();
        Tensor::from_vec(out, x.dims(), x.device())
    }
}

impl Backend for Comparing {
    type Linear = TwinLinear;
    type KvCache = (usize, Option<KvQuant>, CpuKvCache);

    super::delegate_to_inner_cpu!();

    fn name(&self) -> String {
        "cpu (fallback search)".into()
    }
    fn prepare_linear(&self, weights: LinearWeights<'_>) -> candle_core::Result<TwinLinear> {
        let id = self.next_id.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let (layer, quantized) = match self.pending.lock().map_err(|_| lock_err())?.linears.pop_front() {
            Some((layer, q)) => (Some(layer), q),
            None => (None, None),
        };
        Ok(TwinLinear { id, layer, float: self.inner.prepare_linear(weights)?, quantized })
    }
    fn new_kv_cache(
        &self,
        batch: usize,
        capacity: usize,
        kv_heads: usize,
        head_dim: usize,
        _quant: Option<&KvQuant>,
    ) -> candle_core::Result<Self::KvCache> {
        let (layer, kv) = self.pending.lock().map_err(|_| lock_err())?.kv.pop_front().unwrap_or((usize::MAX, None));
        Ok((layer, kv, self.inner.new_kv_cache(batch, capacity, kv_heads, head_dim, None)?))
    }
    fn kv_cache_bytes(&self, c: &Self::KvCache) -> usize {
        self.inner.kv_cache_bytes(&c.2)
    }
    fn linear(&self, x: &Tensor, w: &TwinLinear) -> candle_core::Result<Tensor> {
        let y = self.inner.linear(x, &w.float)?;
        if let (Some(q), Some(layer)) = (&w.quantized, w.layer) {
            let (d, r) = sq_diff(&y, &self.inner.linear(x, q)?)?;
            Self::record(&self.linear_errors, w.id, layer, d, r)?;
        }
        Ok(y)
    }
    fn kv_write(
        &self,
        c: &mut Self::KvCache,
        k: &Tensor,
        v: &Tensor,
        plan: &StepPlan<'_>,
        starts: &Vec<u32>,
    ) -> candle_core::Result<()> {
        if let Some(kv) = &c.1 {
            let (dk, rk) = sq_diff(k, &Self::fake_quant(k, &kv.k_scale, &kv.k_offset)?)?;
            let (dv, rv) = sq_diff(v, &Self::fake_quant(v, &kv.v_scale, &kv.v_offset)?)?;
            Self::record(&self.kv_errors, 2 * c.0, c.0, dk, rk)?;
            Self::record(&self.kv_errors, 2 * c.0 + 1, c.0, dv, rv)?;
        }
        self.inner.kv_write(&mut c.2, k, v, plan, starts)
    }
    fn attention(&self, q: &Tensor, c: &Self::KvCache, plan: &StepPlan<'_>, scale: f32) -> candle_core::Result<Tensor> {
        self.inner.attention(q, &c.2, plan, scale)
    }
    fn linear_bytes(&self, w: &TwinLinear) -> usize {
        self.inner.linear_bytes(&w.float)
    }
    fn kv_cache_id(&self, c: &Self::KvCache) -> usize {
        self.inner.kv_cache_id(&c.2)
    }
}
