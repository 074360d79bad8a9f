//! Checkpoint loading: a GGUF file or an HF-format folder becomes one [`Checkpoint`] of float CPU
//! tensors with HF names, a [`ModelConfig`] and a [`TokenizerBundle`].
//!
//! GGUF weights are dequantized (the "float model" of DESIGN.md section 7), llama.cpp's q/k row
//! permutation is undone for llama checkpoints, and names are mapped to the HF convention:
//!
//! | HF name | GGUF name |
//! |---|---|
//! | `model.embed_tokens.weight` | `token_embd.weight` |
//! | `model.layers.{i}.input_layernorm.weight` | `blk.{i}.attn_norm.weight` |
//! | `model.layers.{i}.self_attn.{q,k,v}_proj.{weight,bias}` | `blk.{i}.attn_{q,k,v}.{weight,bias}` |
//! | `model.layers.{i}.self_attn.o_proj.weight` | `blk.{i}.attn_output.weight` |
//! | `model.layers.{i}.post_attention_layernorm.weight` | `blk.{i}.ffn_norm.weight` |
//! | `model.layers.{i}.mlp.{gate,up,down}_proj.weight` | `blk.{i}.ffn_{gate,up,down}.weight` |
//! | `model.norm.weight` | `output_norm.weight` |
//! | `lm_head.weight` (absent when tied) | `output.weight` |
//!
//! Every tensor's shape is checked against the configuration before a checkpoint is returned,
//! so a model never starts with a wrong-shaped weight.

mod gguf;
mod hf;
pub use hf::load_hf_tokenizer;
mod tokenizer;

pub use gguf::{config_from_gguf, hf_name_for_gguf, permute_qk_like_llama_cpp, unpermute_qk};
pub use tokenizer::{TokenizerBundle, tokenizer_from_gguf};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use candle_core::{DType, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// A loaded checkpoint: configuration, float weights, tokenizer.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub config: ModelConfig,
    pub weights: Weights,
    pub tokenizer: TokenizerBundle,
    /// The GGUF file or HF folder it came from.
    pub source: PathBuf,
}

/// HF-named CPU tensors of one checkpoint.
#[derive(Debug, Clone)]
pub struct Weights {
    tensors: HashMap<String, Tensor>,
    source: PathBuf,
}

impl Weights {
    /// Wraps tensors already named the HF way (tests build random weights this way).
    pub fn from_tensors(tensors: HashMap<String, Tensor>, source: PathBuf) -> Self {
        Self { tensors, source }
    }

    /// The tensor called `name`, or [`ModelError::MissingWeight`].
    pub fn get(&self, name: &str) -> Result<Tensor> {
        self.tensors
            .get(name)
            .cloned()
            .ok_or_else(|| ModelError::MissingWeight { name: name.to_string(), path: self.source.clone() })
    }

    /// The tensor called `name`, checked to have exactly `shape` ([`ModelError::WeightShape`]).
    pub fn get_with_shape(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let tensor = self.get(name)?;
        if tensor.dims() != shape {
            return Err(ModelError::WeightShape {
                name: name.to_string(),
                expected: shape.to_vec(),
                got: tensor.dims().to_vec(),
            });
        }
        Ok(tensor)
    }

    /// All tensors by HF name.
    pub fn tensors(&self) -> &HashMap<String, Tensor> {
        &self.tensors
    }

    /// The tensors by HF name, consuming the set.
    pub fn into_tensors(self) -> HashMap<String, Tensor> {
        self.tensors
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.tensors.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Where the tensors came from (used in error messages).
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// Adds or replaces a tensor, returning the previous one.
    pub fn insert(&mut self, name: impl Into<String>, tensor: Tensor) -> Option<Tensor> {
        self.tensors.insert(name.into(), tensor)
    }

    /// Takes a tensor out (frees its memory once the caller drops it).
    pub fn remove(&mut self, name: &str) -> Option<Tensor> {
        self.tensors.remove(name)
    }

    /// Checks every tensor the architecture needs against `config` ([`expected_shapes`]).
    pub fn check(&self, config: &ModelConfig) -> Result<()> {
        for (name, shape) in expected_shapes(config) {
            self.get_with_shape(&name, &shape)?;
        }
        // A tied checkpoint may still carry its own lm_head; it must fit too.
        if config.tie_word_embeddings && self.contains(LM_HEAD) {
            self.get_with_shape(LM_HEAD, &[config.vocab_size, config.hidden_size])?;
        }
        Ok(())
    }
}

const LM_HEAD: &str = "lm_head.weight";

/// Every tensor `config` requires, with its shape (`[out, in]` for projections).
pub fn expected_shapes(config: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let h = config.hidden_size;
    let q = config.num_heads * config.head_dim;
    let kv = config.num_kv_heads * config.head_dim;
    let ff = config.intermediate_size;
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![config.vocab_size, h])];
    for i in 0..config.num_layers {
        let p = format!("model.layers.{i}");
        out.push((format!("{p}.input_layernorm.weight"), vec![h]));
        out.push((format!("{p}.self_attn.q_proj.weight"), vec![q, h]));
        out.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, h]));
        out.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, h]));
        if config.attention_bias {
            out.push((format!("{p}.self_attn.q_proj.bias"), vec![q]));
            out.push((format!("{p}.self_attn.k_proj.bias"), vec![kv]));
            out.push((format!("{p}.self_attn.v_proj.bias"), vec![kv]));
        }
        out.push((format!("{p}.self_attn.o_proj.weight"), vec![h, q]));
        out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        out.push((format!("{p}.mlp.gate_proj.weight"), vec![ff, h]));
        out.push((format!("{p}.mlp.up_proj.weight"), vec![ff, h]));
        out.push((format!("{p}.mlp.down_proj.weight"), vec![h, ff]));
    }
    out.push(("model.norm.weight".to_string(), vec![h]));
    if !config.tie_word_embeddings {
        out.push((LM_HEAD.to_string(), vec![config.vocab_size, h]));
    }
    out
}

/// Loads a GGUF file or an HF-format folder (config.json, tokenizer.json, *.safetensors) as
/// CPU tensors in `dtype` (f32, f16 or bf16), checking every shape against the configuration.
pub fn load_checkpoint(path: &Path, dtype: DType) -> Result<Checkpoint> {
    let _span = tracing::info_span!("load_checkpoint", path = %path.display(), ?dtype).entered();
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
        return Err(ModelError::UnsupportedConfig(format!("weights load as f32, f16 or bf16, not {dtype:?}")));
    }
    let checkpoint = if path.is_dir() {
        hf::load_hf_folder(path, dtype)?
    } else if path.is_file() {
        gguf::load_gguf(path, dtype)?
    } else {
        return Err(ModelError::BadFile { path: path.to_path_buf(), reason: "no such file or folder".into() });
    };
    checkpoint.config.validate()?;
    checkpoint.weights.check(&checkpoint.config)?;
    tracing::info!(
        tensors = checkpoint.weights.len(),
        architecture = checkpoint.config.architecture.name(),
        "checkpoint loaded"
    );
    Ok(checkpoint)
}

/// Casts float tensors to `dtype`; other dtypes are left alone.
fn cast_float(tensor: Tensor, dtype: DType) -> Result<Tensor> {
    Ok(match tensor.dtype() {
        DType::F16 | DType::BF16 | DType::F32 | DType::F64 if tensor.dtype() != dtype => tensor.to_dtype(dtype)?,
        _ => tensor,
    })
}
