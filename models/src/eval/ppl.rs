//! Perplexity and top-1 next-token agreement over a tokenized text.
//!
//! The token ids are cut into consecutive, non-overlapping windows of at most `window` tokens
//! ([`windows`]); each window runs as one prefill from position 0 with
//! [`Transformer::forward_all`], and every position but a window's last predicts the next token
//! of the same window (a window of n tokens scores n - 1 predictions; a trailing window of one
//! token scores none and is skipped). No context crosses a window boundary.
//!
//! - Negative log-likelihood per prediction in f64 through a numerically stable log-softmax
//!   (the row maximum is subtracted before exponentiating); `ppl = exp(mean NLL)`.
//! - Agreement: the fraction of predictions where the argmax of the quantized model's logits
//!   equals the float model's (first index on a tie), both models run on the same windows.

use crate::backend::Backend;
use crate::error::{ModelError, Result};
use crate::model::Transformer;
use rayon::prelude::*;

/// Default window: 512 tokens.
pub const DEFAULT_WINDOW: usize = 512;

/// Perplexity of one model over a text.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Perplexity {
    /// Predictions scored.
    pub tokens: usize,
    /// Mean negative log-likelihood (nats) per prediction.
    pub mean_nll: f64,
    /// `exp(mean_nll)`.
    pub ppl: f64,
}

/// A float model and its quantized twin over the same windows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Comparison {
    /// Predictions scored (per model).
    pub tokens: usize,
    pub ppl_float: f64,
    pub ppl_quant: f64,
    /// Fraction of predictions whose top-1 token is the same for both models.
    pub agreement: f64,
}

impl Comparison {
    /// `ppl_quant / ppl_float`.
    pub fn ratio(&self) -> f64 {
        self.ppl_quant / self.ppl_float
    }
}

/// `-ln softmax(logits)[target]` in f64, stable for large logits (`-inf` entries are fine).
pub fn token_nll(logits: &[f32], target: u32) -> Result<f64> {
    let t = *logits.get(target as usize).ok_or_else(|| {
        ModelError::InvalidInput(format!("target token {target} is outside the {} logits", logits.len()))
    })? as f64;
    let max = logits.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
    let sum: f64 = logits.iter().map(|&x| (x as f64 - max).exp()).sum();
    Ok(-(t - max - sum.ln()))
}

/// Index of the largest logit (the first on a tie; NaN never wins).
pub fn argmax(logits: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] || (logits[best].is_nan() && !x.is_nan()) {
            best = i;
        }
    }
    best
}

/// `ids` cut into consecutive windows of at most `window` tokens, dropping a trailing window of
/// a single token (it predicts nothing). `window` must be at least 2.
pub fn windows(ids: &[u32], window: usize) -> Result<Vec<&[u32]>> {
    if window < 2 {
        return Err(ModelError::InvalidInput(format!("a perplexity window needs at least 2 tokens, got {window}")));
    }
    Ok(ids.chunks(window).filter(|w| w.len() >= 2).collect())
}

/// Per-prediction NLL and argmax of one window (predictions 0..len-1).
struct WindowScores {
    nll: Vec<f64>,
    top1: Vec<u32>,
}

fn score_window<B: Backend>(model: &mut Transformer<B>, w: &[u32]) -> Result<WindowScores> {
    let n = w.len();
    let logits = model.forward_all(w, n, &[0], &[n])?;
    let vocab = model.config().vocab_size;
    let flat = logits.flatten_all()?.to_vec1::<f32>()?;
    let rows: Vec<(f64, u32)> = flat
        .par_chunks_exact(vocab)
        .take(n - 1)
        .zip(w[1..].par_iter())
        .map(|(row, &target)| Ok((token_nll(row, target)?, argmax(row) as u32)))
        .collect::<Result<_>>()?;
    let (nll, top1) = rows.into_iter().unzip();
    Ok(WindowScores { nll, top1 })
}

/// Checks the request and returns its windows.
fn plan<'a, B: Backend>(model: &Transformer<B>, ids: &'a [u32], window: usize) -> Result<Vec<&'a [u32]>> {
    let capacity = model.cache_config().max_seq_len;
    if window > capacity {
        return Err(ModelError::InvalidInput(format!(
            "a window of {window} tokens does not fit the model's KV cache of {capacity} positions; \
             build the model with max_seq_len >= {window} or use a smaller window"
        )));
    }
    let out = windows(ids, window)?;
    if out.is_empty() {
        return Err(ModelError::InvalidInput(format!("perplexity needs at least 2 tokens of text, got {}", ids.len())));
    }
    Ok(out)
}

fn finish(nll_sum: f64, tokens: usize) -> Perplexity {
    let mean_nll = nll_sum / tokens as f64;
    Perplexity { tokens, mean_nll, ppl: mean_nll.exp() }
}

/// Perplexity of `model` over `ids` in windows of at most `window` tokens (see the module doc).
pub fn perplexity<B: Backend>(model: &mut Transformer<B>, ids: &[u32], window: usize) -> Result<Perplexity> {
    perplexity_with(model, ids, window, |_| {})
}

/// [`perplexity`], calling `on_window(tokens_in_window)` after each window (progress bars).
pub fn perplexity_with<B: Backend>(
    model: &mut Transformer<B>,
    ids: &[u32],
    window: usize,
    mut on_window: impl FnMut(usize),
) -> Result<Perplexity> {
    let (mut nll_sum, mut tokens) = (0f64, 0usize);
    for w in plan(model, ids, window)? {
        let scores = score_window(model, w)?;
        nll_sum += scores.nll.iter().sum::<f64>();
        tokens += scores.nll.len();
        on_window(w.len());
    }
    Ok(finish(nll_sum, tokens))
}

/// Perplexity of a float model and its quantized twin and their top-1 agreement over the
/// same windows of `ids` (see the module doc).
pub fn compare<B: Backend>(
    float: &mut Transformer<B>,
    quant: &mut Transformer<B>,
    ids: &[u32],
    window: usize,
) -> Result<Comparison> {
    compare_with(float, quant, ids, window, |_| {})
}

/// [`compare`], calling `on_window(tokens_in_window)` after each window (progress bars).
pub fn compare_with<B: Backend>(
    float: &mut Transformer<B>,
    quant: &mut Transformer<B>,
    ids: &[u32],
    window: usize,
    mut on_window: impl FnMut(usize),
) -> Result<Comparison> {
    if float.config().vocab_size != quant.config().vocab_size {
        return Err(ModelError::InvalidInput(format!(
            "the models have different vocabularies ({} and {})",
            float.config().vocab_size,
            quant.config().vocab_size
        )));
    }
    let windows = plan(float, ids, window)?;
    plan(quant, ids, window)?;
    let (mut nll_float, mut nll_quant, mut agree, mut tokens) = (0f64, 0f64, 0usize, 0usize);
    for w in windows {
        let f = score_window(float, w)?;
        let q = score_window(quant, w)?;
        nll_float += f.nll.iter().sum::<f64>();
        nll_quant += q.nll.iter().sum::<f64>();
        agree += f.top1.iter().zip(&q.top1).filter(|(a, b)| a == b).count();
        tokens += f.nll.len();
        on_window(w.len());
    }
    Ok(Comparison {
        tokens,
        ppl_float: finish(nll_float, tokens).ppl,
        ppl_quant: finish(nll_quant, tokens).ppl,
        agreement: agree as f64 / tokens as f64,
    })
}
