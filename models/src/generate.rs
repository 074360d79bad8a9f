//! Token generation over a [`Transformer`]: batched prefill of prompts of different lengths,
//! then a decode loop with per-sequence sampling (candle-transformers' `LogitsProcessor`),
//! eos handling, streaming callbacks and timing.

use crate::backend::Backend;
use crate::error::{ModelError, Result};
use crate::model::Transformer;
use candle_core::IndexOp;
use candle_transformers::generation::{LogitsProcessor, Sampling};
use std::time::{Duration, Instant};

/// How tokens are picked.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingConfig {
    /// 0 (or below) means greedy arg-max.
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub seed: u64,
    /// New tokens per sequence at most.
    pub max_tokens: usize,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self { temperature: 0.0, top_k: None, top_p: None, seed: 299_792_458, max_tokens: 128 }
    }
}

impl SamplingConfig {
    /// Greedy decoding of `max_tokens` tokens.
    pub fn greedy(max_tokens: usize) -> Self {
        Self { max_tokens, ..Self::default() }
    }

    fn sampling(&self) -> Sampling {
        if self.temperature <= 0.0 {
            return Sampling::ArgMax;
        }
        let temperature = self.temperature;
        match (self.top_k, self.top_p) {
            (None, None) => Sampling::All { temperature },
            (Some(k), None) => Sampling::TopK { k, temperature },
            (None, Some(p)) => Sampling::TopP { p, temperature },
            (Some(k), Some(p)) => Sampling::TopKThenTopP { k, p, temperature },
        }
    }
}

/// What a generation produced and how long it took.
#[derive(Debug, Clone, Default)]
pub struct GenerationOutput {
    /// New tokens per sequence (eos excluded).
    pub tokens: Vec<Vec<u32>>,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub prefill_time: Duration,
    pub decode_time: Duration,
    /// Decode steps run (each step produces one token per live sequence).
    pub decode_steps: usize,
}

impl GenerationOutput {
    /// Prompt tokens processed per second in prefill.
    pub fn prefill_tokens_per_sec(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_time.as_secs_f64().max(1e-9)
    }

    /// Tokens produced per second by the decode loop (all sequences together).
    pub fn decode_tokens_per_sec(&self) -> f64 {
        let decoded = self.generated_tokens.saturating_sub(self.tokens.len());
        decoded as f64 / self.decode_time.as_secs_f64().max(1e-9)
    }

    /// The one-line timing summary the examples print on stderr.
    pub fn summary(&self) -> String {
        format!(
            "prefill: {} tokens in {:.2?} ({:.1} tokens/s) | decode: {} tokens in {:.2?} ({:.1} tokens/s, batch {})",
            self.prompt_tokens,
            self.prefill_time,
            self.prefill_tokens_per_sec(),
            self.generated_tokens.saturating_sub(self.tokens.len()),
            self.decode_time,
            self.decode_tokens_per_sec(),
            self.tokens.len()
        )
    }
}

/// Generates up to `cfg.max_tokens` tokens for every prompt, as one batch.
///
/// `on_token(sequence, token)` is called as each token is produced (for streaming). A
/// sequence stops at any id in `eos`; the batch stops when all have stopped.
pub fn generate<B: Backend>(
    model: &mut Transformer<B>,
    prompts: &[Vec<u32>],
    cfg: &SamplingConfig,
    eos: &[u32],
    mut on_token: impl FnMut(usize, u32),
) -> Result<GenerationOutput> {
    let batch = prompts.len();
    if batch == 0 {
        return Err(ModelError::InvalidInput("no prompt to generate from".into()));
    }
    if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
        return Err(ModelError::InvalidInput(format!("prompt {i} is empty")));
    }
    let lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
    let seq_len = *lens.iter().max().unwrap_or(&1);
    let capacity = model.cache_config().max_seq_len;
    let requested = seq_len + cfg.max_tokens;
    if requested > capacity {
        return Err(ModelError::CacheFull { capacity, requested });
    }
    let mut ids = vec![0u32; batch * seq_len];
    for (b, p) in prompts.iter().enumerate() {
        ids[b * seq_len..b * seq_len + p.len()].copy_from_slice(p);
    }
    let mut processors: Vec<LogitsProcessor> =
        (0..batch).map(|b| LogitsProcessor::from_sampling(cfg.seed.wrapping_add(b as u64), cfg.sampling())).collect();
    let mut out =
        GenerationOutput { tokens: vec![Vec::new(); batch], prompt_tokens: lens.iter().sum(), ..Default::default() };
    if cfg.max_tokens == 0 {
        return Ok(out);
    }

    let t0 = Instant::now();
    let zeros = vec![0usize; batch];
    let logits = model.forward(&ids, seq_len, &zeros, &lens)?;
    let mut live = vec![true; batch];
    let mut next = sample_all(&logits, &mut processors, &live)?;
    out.prefill_time = t0.elapsed();

    let mut positions = lens.clone();
    let ones = vec![1usize; batch];
    let t1 = Instant::now();
    for step in 0..cfg.max_tokens {
        for b in 0..batch {
            if !live[b] {
                continue;
            }
            if eos.contains(&next[b]) {
                live[b] = false;
                continue;
            }
            out.tokens[b].push(next[b]);
            out.generated_tokens += 1;
            on_token(b, next[b]);
        }
        if step + 1 == cfg.max_tokens || !live.iter().any(|&l| l) {
            break;
        }
        // Finished sequences keep a slot in the batch (fixed cache layout) and feed their
        // last token; their outputs are ignored.
        let logits = model.forward(&next, 1, &positions, &ones)?;
        out.decode_steps += 1;
        for p in positions.iter_mut() {
            *p += 1;
        }
        next = sample_all(&logits, &mut processors, &live)?;
    }
    out.decode_time = t1.elapsed();
    Ok(out)
}

fn sample_all(logits: &candle_core::Tensor, processors: &mut [LogitsProcessor], live: &[bool]) -> Result<Vec<u32>> {
    let mut next = Vec::with_capacity(processors.len());
    for (b, proc) in processors.iter_mut().enumerate() {
        next.push(if live[b] { proc.sample(&logits.i(b)?)? } else { 0 });
    }
    Ok(next)
}
