//! candle-transformers' own llama and qwen2 models on the same host weights: the oracle of
//! the parity tests and the baseline of `cargo xtask bench`.

use crate::config::{Architecture, ModelConfig};
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::{llama, qwen2};
use std::collections::HashMap;

/// A candle-transformers model with its own (growing) KV cache.
pub enum ReferenceModel {
    Llama { model: Box<llama::Llama>, cache: llama::Cache, config: llama::Config, dtype: DType },
    Qwen2(qwen2::ModelForCausalLM),
}

impl ReferenceModel {
    /// Builds the candle-transformers model for `config` from HF-named tensors (`dtype`).
    pub fn new(config: &ModelConfig, tensors: &HashMap<String, Tensor>, dtype: DType) -> Result<Self> {
        let vb = VarBuilder::from_tensors(tensors.clone(), dtype, &Device::Cpu);
        Ok(match config.architecture {
            Architecture::Llama => {
                let cfg = config.to_candle_llama();
                let cache = llama::Cache::new(true, dtype, &cfg, &Device::Cpu)?;
                Self::Llama { model: Box::new(llama::Llama::load(vb, &cfg)?), cache, config: cfg, dtype }
            }
            Architecture::Qwen2 => Self::Qwen2(qwen2::ModelForCausalLM::new(&config.to_candle_qwen2(), vb)?),
        })
    }

    /// Logits `[batch, vocab]` (f32) at the last position of `ids` `[batch, seq]`, whose first
    /// token sits at `offset` (the tokens before it are in the model's cache).
    pub fn forward(&mut self, ids: &Tensor, offset: usize) -> Result<Tensor> {
        match self {
            Self::Llama { model, cache, .. } => model.forward(ids, offset, cache)?.to_dtype(DType::F32),
            Self::Qwen2(model) => {
                let logits = model.forward(ids, offset)?;
                let (b, _, v) = logits.dims3()?;
                logits.reshape((b, v))?.to_dtype(DType::F32)
            }
        }
    }

    /// Empties the KV cache (a new prompt starts at offset 0).
    pub fn reset(&mut self) -> Result<()> {
        match self {
            Self::Llama { cache, config, dtype, .. } => *cache = llama::Cache::new(true, *dtype, config, &Device::Cpu)?,
            Self::Qwen2(model) => model.clear_kv_cache(),
        }
        Ok(())
    }
}
