//! GGUF checkpoints: configuration from metadata, dequantized weights under HF names.

use super::tokenizer::{as_int, tokenizer_from_gguf};
use super::{Checkpoint, TokenizerBundle, Weights, cast_float};
use crate::config::{Architecture, ModelConfig};
use crate::error::{ModelError, Result};
use candle_core::quantized::gguf_file::{Content, TensorInfo, Value};
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

pub(super) fn load_gguf(path: &Path, dtype: DType) -> Result<Checkpoint> {
    let bad = |reason: String| ModelError::BadFile { path: path.to_path_buf(), reason };
    let file = File::open(path).map_err(|e| bad(e.to_string()))?;
    let content = Content::read(&mut BufReader::new(file)).map_err(|e| bad(format!("not a valid GGUF file: {e}")))?;
    let tokenizer = tokenizer_from_gguf(&content.metadata)?;
    let config = config_from_gguf(&content.metadata, &content.tensor_infos, &tokenizer)?;
    let weights = read_weights(path, &content, &config, dtype)?;
    Ok(Checkpoint { config, weights, tokenizer, source: path.to_path_buf() })
}

/// The HF name of a GGUF tensor, or `None` for tensors the decoder does not use.
pub fn hf_name_for_gguf(name: &str) -> Option<String> {
    match name {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = rest.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    let hf = match module {
        "attn_norm" => "input_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_norm" => "post_attention_layernorm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// The model configuration from GGUF metadata (`{arch}.*` keys) and the tensor list.
pub fn config_from_gguf(
    metadata: &HashMap<String, Value>,
    tensors: &HashMap<String, TensorInfo>,
    tokenizer: &TokenizerBundle,
) -> Result<ModelConfig> {
    let unsupported = |m: String| ModelError::UnsupportedConfig(format!("GGUF: {m}"));
    let arch_name = metadata
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .ok_or_else(|| unsupported("no general.architecture".into()))?;
    let architecture = Architecture::parse(arch_name)?;
    let key = |k: &str| format!("{arch_name}.{k}");
    let int = |k: &str| -> Result<Option<usize>> {
        match metadata.get(&key(k)) {
            None => Ok(None),
            Some(v) => as_int(v)
                .and_then(|i| usize::try_from(i).ok())
                .map(Some)
                .ok_or_else(|| unsupported(format!("{} is {v:?}, expected a non-negative integer", key(k)))),
        }
    };
    let required = |k: &str| int(k)?.ok_or_else(|| unsupported(format!("metadata has no {}", key(k))));
    let float = |k: &str| -> Option<f64> {
        match metadata.get(&key(k))? {
            Value::F32(v) => Some(*v as f64),
            Value::F64(v) => Some(*v),
            other => as_int(other).map(|i| i as f64),
        }
    };

    let hidden_size = required("embedding_length")?;
    let num_heads = required("attention.head_count")?;
    let num_kv_heads = int("attention.head_count_kv")?.unwrap_or(num_heads);
    let head_dim = match int("attention.key_length")? {
        Some(d) => d,
        None if num_heads > 0 => hidden_size / num_heads,
        None => 0,
    };
    if let Some(rope_dim) = int("rope.dimension_count")?.filter(|&d| d != head_dim) {
        return Err(unsupported(format!("partial rotary embeddings (rope dims {rope_dim} of head_dim {head_dim})")));
    }
    if let Some(kind) = metadata.get(&key("rope.scaling.type")).and_then(|v| v.to_string().ok()) {
        let factor = float("rope.scaling.factor").unwrap_or(1.0);
        if kind != "none" && !(kind == "linear" && factor == 1.0) {
            return Err(unsupported(format!("rope scaling `{kind}` (factor {factor})")));
        }
    }
    if tensors.contains_key("rope_freqs.weight") {
        return Err(unsupported("llama3-style rope frequency factors (rope_freqs.weight)".into()));
    }
    let config = ModelConfig {
        architecture,
        // One embedding row per entry of the token list (duplicates included).
        vocab_size: match metadata.get("tokenizer.ggml.tokens") {
            Some(Value::Array(tokens)) => tokens.len(),
            _ => tokenizer.tokenizer.get_vocab_size(false),
        },
        hidden_size,
        intermediate_size: required("feed_forward_length")?,
        num_layers: required("block_count")?,
        num_heads,
        num_kv_heads,
        head_dim,
        rms_norm_eps: float("attention.layer_norm_rms_epsilon")
            .ok_or_else(|| unsupported(format!("metadata has no {}", key("attention.layer_norm_rms_epsilon"))))?,
        rope_theta: float("rope.freq_base").unwrap_or(10_000.0),
        max_position_embeddings: int("context_length")?.unwrap_or(4096),
        tie_word_embeddings: !tensors.contains_key("output.weight"),
        attention_bias: tensors.contains_key("blk.0.attn_q.bias"),
        bos_token_id: tokenizer.bos_token_id,
        eos_token_ids: tokenizer.eos_token_ids.clone(),
    };
    config.validate()?;
    Ok(config)
}

fn read_weights(path: &Path, content: &Content, config: &ModelConfig, dtype: DType) -> Result<Weights> {
    let bad = |reason: String| ModelError::BadFile { path: path.to_path_buf(), reason };
    let mut names: Vec<(&String, &TensorInfo)> = content.tensor_infos.iter().collect();
    names.sort_by_key(|(_, info)| info.offset);
    let mut wanted = Vec::new();
    for (name, info) in names {
        match hf_name_for_gguf(name) {
            Some(hf) => wanted.push((name.as_str(), hf, info)),
            None => tracing::warn!("ignoring GGUF tensor `{name}` (not used by the decoder)"),
        }
    }
    // llama.cpp permutes q/k rows of llama checkpoints for interleaved RoPE; undo it so the
    // weights match HF's half-rotation convention. Qwen2 GGUFs are not permuted.
    let permuted = config.architecture == Architecture::Llama;
    let tensors = wanted
        .par_iter()
        .map(|(name, hf, info)| -> Result<(String, Tensor)> {
            let mut file = File::open(path).map_err(|e| bad(e.to_string()))?;
            let qtensor = info
                .read(&mut file, content.tensor_data_offset, &Device::Cpu)
                .map_err(|e| bad(format!("tensor `{name}`: {e}")))?;
            let mut tensor = qtensor.dequantize(&Device::Cpu)?;
            drop(qtensor);
            if permuted {
                if hf.contains("self_attn.q_proj.") {
                    tensor = unpermute_named(tensor, config.num_heads, config, hf)?;
                } else if hf.contains("self_attn.k_proj.") {
                    tensor = unpermute_named(tensor, config.num_kv_heads, config, hf)?;
                }
            }
            Ok((hf.clone(), cast_float(tensor, dtype)?))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut map = HashMap::with_capacity(tensors.len());
    for (name, tensor) in tensors {
        if map.insert(name.clone(), tensor).is_some() {
            return Err(bad(format!("two GGUF tensors map to `{name}`")));
        }
    }
    Ok(Weights::from_tensors(map, path.to_path_buf()))
}

/// Checks the row count against the configuration before undoing the permutation, so a bad
/// tensor reports its expected shape instead of a reshape failure.
fn unpermute_named(tensor: Tensor, heads: usize, config: &ModelConfig, name: &str) -> Result<Tensor> {
    let rows = heads * config.head_dim;
    let expected = if name.ends_with(".bias") { vec![rows] } else { vec![rows, config.hidden_size] };
    if tensor.dims() != expected.as_slice() {
        return Err(ModelError::WeightShape { name: name.to_string(), expected, got: tensor.dims().to_vec() });
    }
    unpermute_qk(&tensor, heads)
}

/// Undoes llama.cpp's q/k row permutation: per head, rows were reordered from the HF half layout
/// `[x_0..x_{d/2}, y_0..y_{d/2}]` to interleaved pairs `[x_0, y_0, x_1, y_1, ...]`. Viewing the
/// rows as `(heads, head_dim/2, 2, ...)` and swapping the middle axes restores HF order. Works for
/// weights `(heads*head_dim, in)` and biases `(heads*head_dim,)`; `heads` is the KV head count
/// for `k_proj`.
pub fn unpermute_qk(weight: &Tensor, heads: usize) -> Result<Tensor> {
    swap_row_halves(weight, heads, false)
}

/// llama.cpp's converter permutation (HF -> GGUF order), the inverse of [`unpermute_qk`]; used to
/// build test checkpoints.
pub fn permute_qk_like_llama_cpp(weight: &Tensor, heads: usize) -> Result<Tensor> {
    swap_row_halves(weight, heads, true)
}

fn swap_row_halves(weight: &Tensor, heads: usize, to_gguf: bool) -> Result<Tensor> {
    let dims = weight.dims().to_vec();
    let rows = dims.first().copied().unwrap_or(0);
    if heads == 0 || !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2) {
        return Err(ModelError::InvalidInput(format!("cannot split {rows} rows into {heads} heads of even size")));
    }
    let half = rows / heads / 2;
    let tail: Vec<usize> = dims[1..].to_vec();
    // GGUF order groups rows as (heads, half, 2); HF order as (heads, 2, half).
    let (a, b) = if to_gguf { (2, half) } else { (half, 2) };
    let mut view = vec![heads, a, b];
    view.extend_from_slice(&tail);
    Ok(weight.reshape(view)?.transpose(1, 2)?.contiguous()?.reshape(dims)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_gguf_names() {
        let cases = [
            ("token_embd.weight", "model.embed_tokens.weight"),
            ("output.weight", "lm_head.weight"),
            ("output_norm.weight", "model.norm.weight"),
            ("blk.3.attn_q.bias", "model.layers.3.self_attn.q_proj.bias"),
            ("blk.12.attn_output.weight", "model.layers.12.self_attn.o_proj.weight"),
            ("blk.0.ffn_norm.weight", "model.layers.0.post_attention_layernorm.weight"),
            ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight"),
        ];
        for (gguf, hf) in cases {
            assert_eq!(hf_name_for_gguf(gguf).as_deref(), Some(hf));
        }
        assert_eq!(hf_name_for_gguf("rope_freqs.weight"), None);
        assert_eq!(hf_name_for_gguf("blk.x.attn_q.weight"), None);
    }

    /// The converter's permutation written as an explicit index map: GGUF row
    /// `h*d + 2*i + j` holds HF row `h*d + j*d/2 + i`.
    #[test]
    fn unpermute_inverts_llama_cpp_rows() -> Result<()> {
        let (heads, head_dim, cols) = (3usize, 8usize, 5usize);
        let rows = heads * head_dim;
        let hf: Vec<f32> = (0..rows * cols).map(|v| v as f32 * 0.5 - 7.0).collect();
        let mut gguf = vec![0f32; rows * cols];
        for h in 0..heads {
            for i in 0..head_dim / 2 {
                for j in 0..2 {
                    let dst = h * head_dim + 2 * i + j;
                    let src = h * head_dim + j * head_dim / 2 + i;
                    gguf[dst * cols..(dst + 1) * cols].copy_from_slice(&hf[src * cols..(src + 1) * cols]);
                }
            }
        }
        let hf_t = Tensor::from_vec(hf.clone(), (rows, cols), &Device::Cpu)?;
        let gguf_t = Tensor::from_vec(gguf, (rows, cols), &Device::Cpu)?;
        let permuted = permute_qk_like_llama_cpp(&hf_t, heads)?;
        assert_eq!(permuted.flatten_all()?.to_vec1::<f32>()?, gguf_t.flatten_all()?.to_vec1::<f32>()?);
        let back = unpermute_qk(&gguf_t, heads)?;
        assert_eq!(back.flatten_all()?.to_vec1::<f32>()?, hf);
        // Biases: one value per row.
        let bias = Tensor::arange(0f32, rows as f32, &Device::Cpu)?;
        let round_trip = unpermute_qk(&permute_qk_like_llama_cpp(&bias, heads)?, heads)?;
        assert_eq!(round_trip.to_vec1::<f32>()?, bias.to_vec1::<f32>()?);
        assert!(unpermute_qk(&bias, 5).is_err());
        Ok(())
    }
}
