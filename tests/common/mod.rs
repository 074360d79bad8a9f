//! Shared helpers of the end-to-end tests: the parity check against candle-transformers and
//! access to the real checkpoints (fetched into the cache by CI before the tests run).
#![allow(dead_code)]

use anyhow::{Result, bail, ensure};
use candle_ascend_models::loader::Weights;
use candle_ascend_models::reference::ReferenceModel;
use candle_ascend_models::{CacheConfig, CpuBackend, ModelConfig, Transformer};
use candle_core::{DType, Device, Tensor};

/// Relative logits tolerance of the parity rule.
pub const LOGITS_RTOL: f32 = 1e-4;
/// Relative top-two margin under which a greedy divergence is a near-tie.
pub const NEAR_TIE: f32 = 1e-4;

/// How a greedy comparison ended.
#[derive(Debug, PartialEq)]
pub enum ParityOutcome {
    Identical,
    DivergedAtNearTie { step: usize, margin: f32 },
}

/// `max|a - b| / max|b|` over all elements.
pub fn relative_error(ours: &Tensor, reference: &Tensor) -> Result<f32> {
    let a = ours.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let b = reference.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    ensure!(a.len() == b.len(), "length {} vs {}", a.len(), b.len());
    let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    let scale = b.iter().map(|v| v.abs()).fold(0f32, f32::max);
    Ok(diff / scale.max(f32::MIN_POSITIVE))
}

/// Arg-max and the relative margin between the two largest values.
pub fn top_two(logits: &[f32]) -> (u32, f32) {
    let (mut i1, mut v1, mut v2) = (0usize, f32::NEG_INFINITY, f32::NEG_INFINITY);
    for (i, &v) in logits.iter().enumerate() {
        if v > v1 {
            v2 = v1;
            v1 = v;
            i1 = i;
        } else if v > v2 {
            v2 = v;
        }
    }
    (i1 as u32, (v1 - v2) / v1.abs().max(f32::MIN_POSITIVE))
}

/// Deterministic prompt of `len` ids below `vocab`.
pub fn random_prompt(vocab: usize, len: usize, seed: u64) -> Vec<u32> {
    candle_ascend_models::random::random_token_ids(vocab, len, seed)
}

/// Checks logits and `steps` greedy tokens of our engine against candle-transformers.
pub fn check_parity(
    name: &str,
    cfg: &ModelConfig,
    weights: &Weights,
    prompt: &[u32],
    steps: usize,
) -> Result<ParityOutcome> {
    let cache = CacheConfig { max_batch: 1, max_seq_len: prompt.len() + steps + 1 };
    let mut ours = Transformer::new(CpuBackend::new(DType::F32)?, cfg.clone(), weights, cache)?;
    let mut reference = ReferenceModel::new(cfg, weights.tensors(), DType::F32)?;

    let ids = Tensor::new(prompt, &Device::Cpu)?.unsqueeze(0)?;
    let mut ours_logits = ours.forward(prompt, prompt.len(), &[0], &[prompt.len()])?;
    let mut ref_logits = reference.forward(&ids, 0)?;
    for step in 0..steps {
        let pos = prompt.len() + step;
        let rel = relative_error(&ours_logits, &ref_logits)?;
        ensure!(rel <= LOGITS_RTOL, "{name}: step {step}: logits relative error {rel:.3e} > {LOGITS_RTOL:e}");
        let (ref_tok, margin) = top_two(&ref_logits.flatten_all()?.to_vec1::<f32>()?);
        let (our_tok, _) = top_two(&ours_logits.flatten_all()?.to_vec1::<f32>()?);
        if our_tok != ref_tok {
            if margin < NEAR_TIE {
                return Ok(ParityOutcome::DivergedAtNearTie { step, margin });
            }
            bail!(
                "{name}: greedy token {step} differs: ours {our_tok}, reference {ref_tok} (reference margin {margin:.2e})"
            );
        }
        if step + 1 == steps {
            break;
        }
        ours_logits = ours.forward(&[our_tok], 1, &[pos], &[1])?;
        ref_logits = reference.forward(&Tensor::new(&[[ref_tok]], &Device::Cpu)?, pos)?;
    }
    Ok(ParityOutcome::Identical)
}

/// Path of a known model, fetched into the cache on first use (CI fetches them this way).
pub fn known_model(name: &str) -> std::path::PathBuf {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    match candle_ascend_models::fetch::resolve_model(Some(name), name, None) {
        Ok(path) => path,
        Err(e) => panic!("cannot get model {name}: {e}"),
    }
}
