//! Quantized checkpoints: a folder with `config.json` (the model configuration plus its
//! `quantization_config`), `model.safetensors` and the tokenizer (`tokenizer.json`,
//! `tokenizer_config.json` with the chat template).
//!
//! Tensors are stored in the prepared form the model runs (q/k/v and gate/up merged, SmoothQuant
//! already folded), so loading needs no calibration and gives bit-identical logits:
//!
//! | tensor | dtype | when |
//! |---|---|---|
//! | `model.embed_tokens.weight` | float / I8 `[V, H]` | unless tied to an int8 lm_head (read from its rows); I8 when the lm_head has int8 weights |
//! | `model.embed_tokens.weight_scale` | F32 `[V]` | with the I8 table (per-row symmetric) |
//! | `model.norm.weight`, `*_layernorm.weight` | float | always |
//! | `<linear>.weight` | float / I8 `[N, K]` | always |
//! | `<linear>.bias` | float `[N]` | float or W8A16 linear with a bias |
//! | `<linear>.weight_scale` | F32 `[N]` | W8A16, A8W8 per-token |
//! | `<linear>.deq_scale`, `<linear>.quant_bias` | F32 / I32 `[N]` | A8W8 |
//! | `<linear>.input_scale`, `<linear>.input_offset` | F32 `[1]` | A8W8 (`1 / s_x`, zero point) |
//! | `model.layers.N.self_attn.{k,v}_cache.{scale,offset}` | F32 `[Nkv * D]` | int8 KV cache |
//!
//! with `<linear>` one of `model.layers.N.self_attn.qkv_proj`, `model.layers.N.self_attn.o_proj`,
//! `model.layers.N.mlp.gate_up_proj`, `model.layers.N.mlp.down_proj` and `lm_head` (absent when
//! tied to the embedding and float). candle has no I8 dtype: int8 tensors are read as raw bytes
//! with the `safetensors` crate. Loading checks every tensor against what the
//! `quantization_config` implies for its layer (see `prepare::linear_kind`): a missing scale, a
//! tensor of the wrong kind, shape or dtype, or a leftover tensor is an error naming it.

use super::a8w8::Int8Linear;
use super::config::QuantConfig;
use super::prepare::{LinearKind, embedding_kind, int8_kv_cache, linear_kind, lm_head_kind};
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::loader::TokenizerBundle;
use crate::model::{HostLinear, KvQuant, PreparedLayer, PreparedModel};
use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The weights file of a quantized checkpoint.
pub const WEIGHTS_FILE: &str = "model.safetensors";

/// Whether `dir` holds a quantized checkpoint (a `config.json` with a `quantization_config`).
pub fn is_quantized_checkpoint(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .is_some_and(|v| v.get("quantization_config").is_some_and(|q| !q.is_null()))
}

/// Writes `model` (with its tokenizer) as a quantized checkpoint into `dir`, which must not
/// exist or be empty (nothing is overwritten). Files are written under temporary names and
/// renamed once complete.
pub fn save(model: &PreparedModel, tokenizer: Option<&TokenizerBundle>, dir: &Path) -> Result<()> {
    let quant = model.quant.as_ref().ok_or_else(|| {
        ModelError::InvalidInput("a quantized checkpoint needs a quantization_config (the model is float)".into())
    })?;
    if dir.exists() && std::fs::read_dir(dir)?.next().is_some() {
        return Err(ModelError::InvalidInput(format!(
            "{} is not empty; choose a new or empty folder for the quantized checkpoint",
            dir.display()
        )));
    }
    std::fs::create_dir_all(dir)?;
    let mut tensors: Vec<(String, Stored)> = Vec::new();
    let c = &model.config;
    if let Some(embed) = &model.embed_tokens {
        push_linear(&mut tensors, "model.embed_tokens", embed)?;
    }
    tensors.push(("model.norm.weight".into(), Stored::float(&model.final_norm)?));
    let lm_head_tied = c.tie_word_embeddings && matches!(model.lm_head, HostLinear::Float { .. });
    if !lm_head_tied {
        push_linear(&mut tensors, "lm_head", &model.lm_head)?;
    }
    for (i, layer) in model.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        tensors.push((format!("{p}.input_layernorm.weight"), Stored::float(&layer.input_norm)?));
        tensors.push((format!("{p}.post_attention_layernorm.weight"), Stored::float(&layer.post_attention_norm)?));
        for (name, linear) in LINEAR_NAMES.iter().zip(layer.linears()) {
            push_linear(&mut tensors, &format!("{p}.{name}"), linear)?;
        }
        if let Some(kv) = &layer.kv {
            for (name, values) in [
                ("k_cache.scale", &kv.k_scale),
                ("k_cache.offset", &kv.k_offset),
                ("v_cache.scale", &kv.v_scale),
                ("v_cache.offset", &kv.v_offset),
            ] {
                tensors.push((format!("{p}.self_attn.{name}"), Stored::f32(values)));
            }
        }
    }
    let views = tensors
        .iter()
        .map(|(name, s)| Ok((name.clone(), TensorView::new(s.dtype, s.shape.clone(), &s.bytes)?)))
        .collect::<std::result::Result<Vec<_>, safetensors::SafeTensorError>>()
        .map_err(|e| ModelError::InvalidInput(format!("building the safetensors file: {e}")))?;
    let mut metadata = std::collections::HashMap::new();
    metadata.insert("format".to_string(), "pt".to_string());
    metadata.insert("quantization".to_string(), quant.to_string());
    write_atomically(&dir.join(WEIGHTS_FILE), |path| {
        safetensors::serialize_to_file(views, Some(metadata), path)
            .map_err(|e| ModelError::InvalidInput(format!("writing {}: {e}", path.display())))
    })?;

    let mut config = c.to_hf_json();
    quant.write_into_hf_config(&mut config)?;
    let text = serde_json::to_string_pretty(&config).map_err(|e| ModelError::InvalidInput(e.to_string()))?;
    write_atomically(&dir.join("config.json"), |path| Ok(std::fs::write(path, text)?))?;
    if let Some(t) = tokenizer {
        write_atomically(&dir.join("tokenizer.json"), |path| {
            t.tokenizer.save(path, false).map_err(|e| ModelError::Tokenizer(e.to_string()))
        })?;
        let tokenizer_config = serde_json::json!({ "chat_template": t.chat_template });
        let text =
            serde_json::to_string_pretty(&tokenizer_config).map_err(|e| ModelError::InvalidInput(e.to_string()))?;
        write_atomically(&dir.join("tokenizer_config.json"), |path| Ok(std::fs::write(path, text)?))?;
    }
    Ok(())
}

/// Reads a quantized checkpoint written by [`save`] (the tokenizer is loaded by the caller
/// from the same folder, like any HF folder).
pub fn load(dir: &Path) -> Result<PreparedModel> {
    let config_path = dir.join("config.json");
    let bad_config = |reason: String| ModelError::BadFile { path: config_path.clone(), reason };
    let text = std::fs::read_to_string(&config_path).map_err(|e| bad_config(e.to_string()))?;
    let config = ModelConfig::from_hf_json(&text)?;
    let quant = QuantConfig::from_hf_config_str(&text)
        .map_err(|e| bad_config(e.to_string()))?
        .ok_or_else(|| bad_config("no quantization_config: not a quantized checkpoint".into()))?;
    quant.validate_for(config.num_layers).map_err(|e| bad_config(e.to_string()))?;
    let path = dir.join(WEIGHTS_FILE);
    let bytes = std::fs::read(&path).map_err(|e| ModelError::BadFile { path: path.clone(), reason: e.to_string() })?;
    let file = SafeTensors::deserialize(&bytes).map_err(|e| ModelError::BadFile {
        path: path.clone(),
        reason: format!("not a valid safetensors file: {e}"),
    })?;
    let mut reader = Reader { file, path: path.clone(), used: BTreeSet::new(), hadamard: quant.per_token_hadamard };
    let c = &config;
    let (h, d) = (c.hidden_size, c.head_dim);
    let lm_head_kind = lm_head_kind(Some(&quant));
    // Tied to an int8 lm_head, the table is the lm_head's rows and is not stored; untied, it is
    // int8 rows when the lm_head has int8 weights.
    let embed_tokens = match embedding_kind(c, lm_head_kind) {
        None => None,
        Some(kind) => Some(reader.linear("model.embed_tokens", kind, (c.vocab_size, h), false)?),
    };
    let final_norm = reader.float("model.norm.weight", &[h])?;
    let lm_head = match &embed_tokens {
        Some(HostLinear::Float { weight, .. })
            if c.tie_word_embeddings && lm_head_kind == LinearKind::Float && !reader.has("lm_head.weight") =>
        {
            HostLinear::Float { weight: weight.clone(), bias: None }
        }
        _ => reader.linear("lm_head", lm_head_kind, (c.vocab_size, h), false)?,
    };
    let widths = [(c.qkv_width(), h), (h, c.num_heads * d), (2 * c.intermediate_size, h), (h, c.intermediate_size)];
    let modules = |i: usize| {
        let p = format!("model.layers.{i}");
        let names = |m: &[&str]| m.iter().map(|m| format!("{p}.{m}")).collect::<Vec<_>>();
        [
            names(&["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
            names(&["self_attn.o_proj"]),
            names(&["mlp.gate_proj", "mlp.up_proj"]),
            names(&["mlp.down_proj"]),
        ]
    };
    let progress = crate::progress::bar(c.num_layers as u64, "loading", "layers");
    let mut layers = Vec::with_capacity(c.num_layers);
    for i in 0..c.num_layers {
        let p = format!("model.layers.{i}");
        let names = modules(i);
        let mut linear = |m: usize| {
            let bias = m == 0 && c.attention_bias;
            reader.linear(&format!("{p}.{}", LINEAR_NAMES[m]), linear_kind(&quant, Some(i), &names[m]), widths[m], bias)
        };
        let (qkv, o_proj, gate_up, down) = (linear(0)?, linear(1)?, linear(2)?, linear(3)?);
        let channels = c.num_kv_heads * d;
        let kv = if int8_kv_cache(&quant, i) {
            let why = format!("layer {i} has an int8 KV cache under the quantization_config");
            let mut v = |name: &str| reader.f32_vec(&format!("{p}.self_attn.{name}"), channels, &why);
            Some(KvQuant {
                k_scale: v("k_cache.scale")?,
                k_offset: v("k_cache.offset")?,
                v_scale: v("v_cache.scale")?,
                v_offset: v("v_cache.offset")?,
            })
        } else {
            None
        };
        layers.push(PreparedLayer {
            input_norm: reader.float(&format!("{p}.input_layernorm.weight"), &[h])?,
            post_attention_norm: reader.float(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
            qkv,
            o_proj,
            gate_up,
            down,
            kv,
        });
        progress.inc(1);
    }
    progress.finish_and_clear();
    reader.check_all_used()?;
    Ok(PreparedModel { config, quant: Some(quant), embed_tokens, final_norm, lm_head, layers })
}

/// Storage names of the merged linears, in model order.
const LINEAR_NAMES: [&str; 4] = ["self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"];

/// One tensor's bytes, ready for serialization.
struct Stored {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl Stored {
    fn float(t: &Tensor) -> Result<Self> {
        let shape = t.dims().to_vec();
        let flat = t.flatten_all()?;
        let (dtype, bytes) = match t.dtype() {
            DType::F32 => (Dtype::F32, flat.to_vec1::<f32>()?.iter().flat_map(|v| v.to_le_bytes()).collect()),
            DType::F16 => (Dtype::F16, flat.to_vec1::<half::f16>()?.iter().flat_map(|v| v.to_le_bytes()).collect()),
            DType::BF16 => (Dtype::BF16, flat.to_vec1::<half::bf16>()?.iter().flat_map(|v| v.to_le_bytes()).collect()),
            other => {
                return Err(ModelError::InvalidInput(format!("cannot store a {other:?} tensor as a float weight")));
            }
        };
        Ok(Self { dtype, shape, bytes })
    }

    fn f32(values: &[f32]) -> Self {
        Self {
            dtype: Dtype::F32,
            shape: vec![values.len()],
            bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    fn i8(values: &[i8], shape: Vec<usize>) -> Self {
        Self { dtype: Dtype::I8, shape, bytes: values.iter().map(|&v| v as u8).collect() }
    }

    fn i32(values: &[i32]) -> Self {
        Self {
            dtype: Dtype::I32,
            shape: vec![values.len()],
            bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }
}

fn push_linear(out: &mut Vec<(String, Stored)>, name: &str, linear: &HostLinear) -> Result<()> {
    match linear {
        HostLinear::Float { weight, bias } => {
            out.push((format!("{name}.weight"), Stored::float(weight)?));
            if let Some(b) = bias {
                out.push((format!("{name}.bias"), Stored::float(b)?));
            }
        }
        HostLinear::Int8Weight { w_q, out_features, in_features, scale, bias } => {
            out.push((format!("{name}.weight"), Stored::i8(w_q, vec![*out_features, *in_features])));
            out.push((format!("{name}.weight_scale"), Stored::f32(scale)));
            if let Some(b) = bias {
                out.push((format!("{name}.bias"), Stored::float(b)?));
            }
        }
        HostLinear::Int8PerToken { w_q, out_features, in_features, scale, bias, hadamard: _ } => {
            out.push((format!("{name}.weight"), Stored::i8(w_q, vec![*out_features, *in_features])));
            out.push((format!("{name}.weight_scale"), Stored::f32(scale)));
            if let Some(b) = bias {
                out.push((format!("{name}.bias"), Stored::float(b)?));
            }
        }
        HostLinear::Int8(l) => {
            out.push((format!("{name}.weight"), Stored::i8(&l.w_q, vec![l.out_features, l.in_features])));
            out.push((format!("{name}.deq_scale"), Stored::f32(&l.deq_scale)));
            out.push((format!("{name}.quant_bias"), Stored::i32(&l.bias_q)));
            out.push((format!("{name}.input_scale"), Stored::f32(&[l.act_scale])));
            out.push((format!("{name}.input_offset"), Stored::f32(&[l.act_offset])));
        }
    }
    Ok(())
}

/// Writes through `write` into `<path>.partial`, then renames it to `path`.
fn write_atomically(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    if let Err(e) = write(&partial) {
        let _ = std::fs::remove_file(&partial);
        return Err(e);
    }
    std::fs::rename(&partial, path)?;
    Ok(())
}

/// Typed, checked access to the tensors of a checkpoint, remembering which were read.
struct Reader<'a> {
    file: SafeTensors<'a>,
    path: PathBuf,
    used: BTreeSet<String>,
    /// `per_token_hadamard` of the configuration (the stored per-token weights are rotated).
    hadamard: usize,
}

impl Reader<'_> {
    fn has(&self, name: &str) -> bool {
        self.file.names().contains(&name)
    }

    fn view(&mut self, name: &str, why: &str) -> Result<TensorView<'_>> {
        let view = self.file.tensor(name).map_err(|_| ModelError::BadFile {
            path: self.path.clone(),
            reason: format!("missing tensor `{name}` ({why})"),
        })?;
        self.used.insert(name.to_string());
        Ok(view)
    }

    fn check_shape(&self, name: &str, got: &[usize], expected: &[usize]) -> Result<()> {
        if got != expected {
            return Err(ModelError::WeightShape {
                name: name.to_string(),
                expected: expected.to_vec(),
                got: got.to_vec(),
            });
        }
        Ok(())
    }

    fn wrong_dtype(&self, name: &str, got: Dtype, expected: &str) -> ModelError {
        ModelError::BadFile {
            path: self.path.clone(),
            reason: format!("tensor `{name}` is {got:?}, expected {expected}"),
        }
    }

    fn float(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let path = self.path.clone();
        let view = self.view(name, "a float weight")?;
        let dtype = match view.dtype() {
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            other => {
                return Err(ModelError::BadFile {
                    path,
                    reason: format!("tensor `{name}` is {other:?}, expected a float dtype"),
                });
            }
        };
        let got = view.shape().to_vec();
        let data = view.data().to_vec();
        self.check_shape(name, &got, shape)?;
        Ok(Tensor::from_raw_buffer(&data, dtype, shape, &Device::Cpu)?)
    }

    fn bytes_of(&mut self, name: &str, dtype: Dtype, shape: &[usize], why: &str) -> Result<Vec<u8>> {
        let view = self.view(name, why)?;
        let (got_dtype, got_shape, data) = (view.dtype(), view.shape().to_vec(), view.data().to_vec());
        if got_dtype != dtype {
            return Err(self.wrong_dtype(name, got_dtype, &format!("{dtype:?}")));
        }
        self.check_shape(name, &got_shape, shape)?;
        Ok(data)
    }

    fn f32_vec(&mut self, name: &str, len: usize, why: &str) -> Result<Vec<f32>> {
        let bytes = self.bytes_of(name, Dtype::F32, &[len], why)?;
        Ok(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
    }

    fn i32_vec(&mut self, name: &str, len: usize, why: &str) -> Result<Vec<i32>> {
        let bytes = self.bytes_of(name, Dtype::I32, &[len], why)?;
        Ok(bytes.chunks_exact(4).map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
    }

    fn i8_matrix(&mut self, name: &str, (n, k): (usize, usize), why: &str) -> Result<Vec<i8>> {
        Ok(self.bytes_of(name, Dtype::I8, &[n, k], why)?.into_iter().map(|b| b as i8).collect())
    }

    /// The linear `name` in the representation `kind` the configuration implies.
    fn linear(&mut self, name: &str, kind: LinearKind, (n, k): (usize, usize), bias: bool) -> Result<HostLinear> {
        let weight_name = format!("{name}.weight");
        let found = self.file.tensor(&weight_name).map(|v| v.dtype()).ok();
        let stored_int8 = found == Some(Dtype::I8);
        if found.is_some() && stored_int8 != (kind != LinearKind::Float) {
            return Err(ModelError::BadFile {
                path: self.path.clone(),
                reason: format!(
                    "the quantization_config does not match the tensors: `{name}` should be {} but its weight is {:?}",
                    kind.name(),
                    found.unwrap_or(Dtype::F32)
                ),
            });
        }
        let why = format!("{name} is {} under the quantization_config", kind.name());
        let float_bias = |r: &mut Self| -> Result<Option<Tensor>> {
            if bias { Ok(Some(r.float(&format!("{name}.bias"), &[n])?)) } else { Ok(None) }
        };
        Ok(match kind {
            LinearKind::Float => {
                HostLinear::Float { weight: self.float(&weight_name, &[n, k])?, bias: float_bias(self)? }
            }
            LinearKind::W8A16 => HostLinear::Int8Weight {
                w_q: self.i8_matrix(&weight_name, (n, k), &why)?,
                out_features: n,
                in_features: k,
                scale: self.f32_vec(&format!("{name}.weight_scale"), n, &why)?,
                bias: float_bias(self)?,
            },
            LinearKind::A8W8PerToken => HostLinear::Int8PerToken {
                w_q: self.i8_matrix(&weight_name, (n, k), &why)?,
                out_features: n,
                in_features: k,
                scale: self.f32_vec(&format!("{name}.weight_scale"), n, &why)?,
                bias: float_bias(self)?,
                hadamard: super::prepare::hadamard_block_for(self.hadamard, k),
            },
            LinearKind::A8W8 => HostLinear::Int8(Int8Linear {
                w_q: self.i8_matrix(&weight_name, (n, k), &why)?,
                out_features: n,
                in_features: k,
                deq_scale: self.f32_vec(&format!("{name}.deq_scale"), n, &why)?,
                bias_q: self.i32_vec(&format!("{name}.quant_bias"), n, &why)?,
                act_scale: self.f32_vec(&format!("{name}.input_scale"), 1, &why)?[0],
                act_offset: self.f32_vec(&format!("{name}.input_offset"), 1, &why)?[0],
            }),
        })
    }

    /// Every tensor of the file was read: a leftover one means the configuration and the
    /// tensors disagree (e.g. scales for a layer the config keeps in float).
    fn check_all_used(&self) -> Result<()> {
        let names: BTreeMap<&str, ()> = self.file.names().into_iter().map(|n| (n, ())).collect();
        let unused: Vec<&str> = names.keys().copied().filter(|n| !self.used.contains(*n)).collect();
        if unused.is_empty() {
            return Ok(());
        }
        let shown: Vec<&str> = unused.iter().take(5).copied().collect();
        Err(ModelError::BadFile {
            path: self.path.clone(),
            reason: format!(
                "the quantization_config does not match the tensors: {} tensor(s) are not used by it ({}{})",
                unused.len(),
                shown.join(", "),
                if unused.len() > shown.len() { ", ..." } else { "" }
            ),
        })
    }
}
