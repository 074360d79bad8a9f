//! HF-format folders: `config.json`, `tokenizer.json`, one or many `*.safetensors` (sharded via
//! `model.safetensors.index.json` or not), chat template from `tokenizer_config.json` or
//! `chat_template.jinja`.

use super::{Checkpoint, TokenizerBundle, Weights, cast_float};
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

const INDEX: &str = "model.safetensors.index.json";

pub(super) fn load_hf_folder(dir: &Path, dtype: DType) -> Result<Checkpoint> {
    let config_text = read_required(dir, "config.json")?;
    let mut config = ModelConfig::from_hf_json(&config_text)?;
    let bundle = load_hf_tokenizer(dir, &config)?;
    config.eos_token_ids = bundle.eos_token_ids.clone();

    let mut tensors = HashMap::new();
    for shard in shard_files(dir)? {
        let _span = tracing::debug_span!("safetensors", shard = %shard.display()).entered();
        let bad = |reason: String| ModelError::BadFile { path: shard.clone(), reason };
        let bytes = std::fs::read(&shard).map_err(|e| bad(e.to_string()))?;
        let loaded = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
            .map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
        drop(bytes);
        for (name, tensor) in loaded {
            let tensor: Tensor = cast_float(tensor, dtype)?;
            if tensors.insert(name.clone(), tensor).is_some() {
                return Err(bad(format!("tensor `{name}` appears in more than one shard")));
            }
        }
    }
    Ok(Checkpoint {
        config,
        weights: Weights::from_tensors(tensors, dir.to_path_buf()),
        tokenizer: bundle,
        source: dir.to_path_buf(),
    })
}

/// The tokenizer of an HF-format folder (`tokenizer.json`, chat template from
/// `tokenizer_config.json` or `chat_template.jinja`), with `config`'s special ids.
pub fn load_hf_tokenizer(dir: &Path, config: &ModelConfig) -> Result<TokenizerBundle> {
    let tokenizer_path = dir.join("tokenizer.json");
    if !tokenizer_path.is_file() {
        return Err(missing(&tokenizer_path));
    }
    let tokenizer = tokenizers::Tokenizer::from_file(&tokenizer_path)
        .map_err(|e| ModelError::BadFile { path: tokenizer_path.clone(), reason: e.to_string() })?;
    Ok(TokenizerBundle::new(tokenizer, chat_template(dir)?, config.bos_token_id, config.eos_token_ids.clone()))
}

fn missing(path: &Path) -> ModelError {
    ModelError::BadFile { path: path.to_path_buf(), reason: "no such file".into() }
}

fn read_required(dir: &Path, name: &str) -> Result<String> {
    let path = dir.join(name);
    if !path.is_file() {
        return Err(missing(&path));
    }
    std::fs::read_to_string(&path).map_err(|e| ModelError::BadFile { path, reason: e.to_string() })
}

/// The shards to load: those the index names (all must exist), else every `*.safetensors`.
fn shard_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index_path = dir.join(INDEX);
    if index_path.is_file() {
        let bad = |reason: String| ModelError::BadFile { path: index_path.clone(), reason };
        let text = std::fs::read_to_string(&index_path).map_err(|e| bad(e.to_string()))?;
        let index: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let map =
            index.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| bad("no `weight_map` object".into()))?;
        let files: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
        if files.is_empty() {
            return Err(bad("`weight_map` names no files".into()));
        }
        let mut out = Vec::new();
        for file in files {
            let path = dir.join(file);
            if file.contains("..") || !path.is_file() {
                return Err(ModelError::BadFile { path, reason: format!("shard listed in {INDEX} is missing") });
            }
            out.push(path);
        }
        return Ok(out);
    }
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    out.sort();
    if out.is_empty() {
        return Err(ModelError::BadFile {
            path: dir.to_path_buf(),
            reason: "the folder has no *.safetensors file".into(),
        });
    }
    Ok(out)
}

/// `chat_template` of `tokenizer_config.json` (a string, or a list of named templates: `default`
/// or the first), else `chat_template.jinja`.
fn chat_template(dir: &Path) -> Result<Option<String>> {
    let config_path = dir.join("tokenizer_config.json");
    if config_path.is_file() {
        let bad = |reason: String| ModelError::BadFile { path: config_path.clone(), reason };
        let text = std::fs::read_to_string(&config_path).map_err(|e| bad(e.to_string()))?;
        let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        match value.get("chat_template") {
            Some(serde_json::Value::String(t)) => return Ok(Some(t.clone())),
            Some(serde_json::Value::Array(list)) => {
                let named = |n: &serde_json::Value| n.get("name").and_then(|x| x.as_str()) == Some("default");
                let pick = list.iter().find(|n| named(n)).or(list.first());
                if let Some(t) = pick.and_then(|n| n.get("template")).and_then(|t| t.as_str()) {
                    return Ok(Some(t.to_string()));
                }
            }
            _ => {}
        }
    }
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        return Ok(Some(std::fs::read_to_string(jinja)?));
    }
    Ok(None)
}
