//! From float host weights, a configuration and calibration data to the prepared (quantized)
//! form of each layer: which linears run A8W8, W8A16 or float, SmoothQuant folding, and the
//! int8 KV-cache parameters. The decision rules live here and nowhere else.

use super::a8w8::{fold_layer, quantize_linear};
use super::calibrate::{Calibration, ChannelRange};
use super::config::{OutliersSuppression, QuantConfig, QuantDtype};
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::loader::Weights;
use crate::model::{HostLayer, HostLinear, KvQuant, PreparedLayer, PreparedModel};
use candle_core::Tensor;

/// Checks that `quant` can be applied to a model of `config` with the calibration given.
pub fn check_plan(quant: &QuantConfig, config: &ModelConfig, calibration: Option<&Calibration>) -> Result<()> {
    quant.validate_for(config.num_layers)?;
    let needs_calibration = quant.activation_dtype == QuantDtype::Int8 || quant.kvcache_dtype == QuantDtype::Int8;
    match calibration {
        None if needs_calibration => Err(ModelError::UnsupportedConfig(format!(
            "quantization `{quant}`: int8 activations and the int8 KV cache need calibrated ranges; \
             calibrate first (--calib FILE, or the default calibration data)"
        ))),
        Some(c) if needs_calibration && c.layers.len() != config.num_layers => Err(ModelError::UnsupportedConfig(
            format!("the calibration covers {} layers, the model has {}", c.layers.len(), config.num_layers),
        )),
        _ => Ok(()),
    }
}

/// Layer `index` of `weights` in the form `quant` asks for (float when `quant` is `None`).
pub fn prepare_layer(
    weights: &Weights,
    config: &ModelConfig,
    index: usize,
    quant: Option<&QuantConfig>,
    calibration: Option<&Calibration>,
) -> Result<PreparedLayer> {
    match quant {
        None => Ok(PreparedLayer::float(HostLayer::load(weights, config, index)?)),
        Some(q) => fold(weights, config, index, q, calibration)?.quantize(q),
    }
}

/// Layer `index` quantized as `quant` asks, together with the same layer in float after the
/// SmoothQuant folding (norm gammas and weights rescaled, numerically the float layer): the
/// pair the fallback search compares linear by linear on the same inputs.
pub fn prepare_layer_pair(
    weights: &Weights,
    config: &ModelConfig,
    index: usize,
    quant: &QuantConfig,
    calibration: Option<&Calibration>,
) -> Result<(PreparedLayer, PreparedLayer)> {
    let folded = fold(weights, config, index, quant, calibration)?;
    let float = PreparedLayer::float(folded.host.clone());
    Ok((folded.quantize(quant)?, float))
}

/// A layer after SmoothQuant folding, with what quantizing it needs.
struct Folded {
    host: HostLayer,
    names: [Vec<String>; 4],
    /// Per-tensor input range of each linear that runs A8W8.
    ranges: [Option<(f32, f32)>; 4],
    kv: Option<KvQuant>,
}

fn fold(
    weights: &Weights,
    config: &ModelConfig,
    index: usize,
    q: &QuantConfig,
    calibration: Option<&Calibration>,
) -> Result<Folded> {
    let mut host = HostLayer::load(weights, config, index)?;
    let names = host.module_names();
    let a8w8: [bool; 4] = std::array::from_fn(|m| uses_int8_activations(q, index, &names[m]));
    let calib =
        |what: &str| calibration.ok_or_else(|| ModelError::UnsupportedConfig(format!("{what} need calibration data")));
    let mut ranges: [Option<(f32, f32)>; 4] = [None; 4];
    let mut v_divisor = None;
    if a8w8.iter().any(|&b| b) {
        let layer_ranges = &calib("int8 activations")?.layers[index];
        let alpha = match q.outliers_suppression {
            OutliersSuppression::Smooth => Some(q.smooth_alpha()?),
            OutliersSuppression::None => None,
        };
        (ranges, v_divisor) = fold_layer(&mut host, layer_ranges, config, alpha, a8w8)?;
    }
    let kv = if int8_kv_cache(q, index) {
        let c = calib("the int8 KV cache")?;
        let [k, v] = c.kv.get(index).ok_or_else(|| {
            ModelError::UnsupportedConfig(format!("the calibration has no K/V ranges for layer {index}"))
        })?;
        // SmoothQuant divided the v rows (and so the cached values) by `v_divisor`.
        let v = match &v_divisor {
            Some(d) => ChannelRange {
                min: v.min.iter().zip(d).map(|(m, s)| m / s).collect(),
                max: v.max.iter().zip(d).map(|(m, s)| m / s).collect(),
            },
            None => v.clone(),
        };
        Some(kv_quant(k, &v)?)
    } else {
        None
    };
    Ok(Folded { host, names, ranges, kv })
}

impl Folded {
    fn quantize(self, q: &QuantConfig) -> Result<PreparedLayer> {
        let Self { host, names, ranges, kv } = self;
        let index = host.index;
        let linear = |m: usize, weight: Tensor, bias: Option<Tensor>| {
            prepare_linear(q, Some(index), &names[m], weight, bias, ranges[m])
        };
        Ok(PreparedLayer {
            qkv: linear(0, host.qkv_w, host.qkv_b)?,
            o_proj: linear(1, host.o_w, None)?,
            gate_up: linear(2, host.gate_up_w, None)?,
            down: linear(3, host.down_w, None)?,
            input_norm: host.input_norm,
            post_attention_norm: host.post_attention_norm,
            kv,
        })
    }
}

/// How the lm_head runs under `quant` (float without one).
pub fn lm_head_kind(quant: Option<&QuantConfig>) -> LinearKind {
    quant.map_or(LinearKind::Float, |q| linear_kind(q, None, &["lm_head".to_string()]))
}

/// The embedding table (see [`embedding_kind`]; `None` when the lm_head's rows serve as it) and the
/// lm_head of `weights` in the forms `quant` asks for.
pub fn prepare_embedding_and_lm_head(
    weights: &Weights,
    c: &ModelConfig,
    quant: Option<&QuantConfig>,
) -> Result<(Option<HostLinear>, HostLinear)> {
    let table = weights.get_with_shape("model.embed_tokens.weight", &[c.vocab_size, c.hidden_size])?;
    let lm_head = prepare_lm_head(crate::model::lm_head_weight(weights, c, &table)?, quant)?;
    let embed = embedding_kind(c, lm_head_kind(quant)).map(|kind| prepare_embedding(table, kind)).transpose()?;
    Ok((embed, lm_head))
}

/// The lm_head in the form `quant` asks for (int8 weights only when `lm_head` is not in
/// `modules_to_not_convert`; never int8 activations: its input range is not calibrated).
pub fn prepare_lm_head(weight: Tensor, quant: Option<&QuantConfig>) -> Result<HostLinear> {
    match quant {
        None => Ok(HostLinear::Float { weight, bias: None }),
        Some(q) => prepare_linear(q, None, &["lm_head".to_string()], weight, None, None),
    }
}

/// Per-channel int8 parameters of a layer's K and V caches from their calibrated ranges
/// (`candle_ascend_ops::KvQuantParams::from_range`: asymmetric, `offset = -zero_point`).
pub fn kv_quant(k: &ChannelRange, v: &ChannelRange) -> Result<KvQuant> {
    let k = candle_ascend_ops::KvQuantParams::from_range(&k.min, &k.max)?;
    let v = candle_ascend_ops::KvQuantParams::from_range(&v.min, &v.max)?;
    Ok(KvQuant { k_scale: k.scale, k_offset: k.offset, v_scale: v.scale, v_offset: v.offset })
}

/// How one (possibly merged) linear runs under a configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinearKind {
    Float,
    /// int8 weights, float activations.
    W8A16,
    /// int8 weights and static per-tensor int8 activations.
    A8W8,
    /// int8 weights and per-token int8 activations quantized at run time.
    A8W8PerToken,
}

impl LinearKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Float => "float",
            Self::W8A16 => "w8a16",
            Self::A8W8 => "a8w8",
            Self::A8W8PerToken => "a8w8 per-token",
        }
    }
}

/// The rule for the linear merging `modules` in decoder layer `layer` (`None`: lm_head): float
/// when the layer is a float layer or any merged module is in `modules_to_not_convert`;
/// otherwise A8W8 when activations are int8 in a decoder layer (lm_head's input range is not
/// calibrated, so it never runs A8W8), W8A16 when only weights are int8.
pub fn linear_kind(q: &QuantConfig, layer: Option<usize>, modules: &[String]) -> LinearKind {
    let converted = q.weight_dtype == QuantDtype::Int8
        && layer.is_none_or(|l| q.quantizes_layer(l))
        && modules.iter().all(|m| q.converts_module(m));
    match converted {
        false => LinearKind::Float,
        true if layer.is_some() && q.activation_dtype == QuantDtype::Int8 => {
            if modules.iter().any(|m| q.per_token_module(m)) { LinearKind::A8W8PerToken } else { LinearKind::A8W8 }
        }
        true => LinearKind::W8A16,
    }
}

/// Whether decoder layer `layer`'s cache is int8.
pub fn int8_kv_cache(q: &QuantConfig, layer: usize) -> bool {
    q.kvcache_dtype == QuantDtype::Int8 && q.quantizes_layer(layer)
}

/// Whether the linear gets a static range (and SmoothQuant folding). Per-token inputs get
/// neither: smoothing them was measured (alpha 0.2..0.8: SmolLM2 top-1 agreement -1.0..+0.8
/// points, no trend).
fn uses_int8_activations(q: &QuantConfig, layer: usize, modules: &[String]) -> bool {
    linear_kind(q, Some(layer), modules) == LinearKind::A8W8
}

/// One (possibly merged) linear in the form [`linear_kind`] gives; A8W8 takes the calibrated
/// per-tensor `input_range` (after folding).
fn prepare_linear(
    q: &QuantConfig,
    layer: Option<usize>,
    modules: &[String],
    weight: Tensor,
    bias: Option<Tensor>,
    input_range: Option<(f32, f32)>,
) -> Result<HostLinear> {
    match (linear_kind(q, layer, modules), input_range) {
        (LinearKind::Float, _) => Ok(HostLinear::Float { weight, bias }),
        (LinearKind::A8W8, Some((lo, hi))) => Ok(HostLinear::Int8(quantize_linear(&weight, bias.as_ref(), lo, hi)?)),
        (LinearKind::A8W8, None) => Err(ModelError::UnsupportedConfig(format!(
            "{}: int8 activations need a calibrated input range",
            modules.join("+")
        ))),
        (LinearKind::W8A16, _) => {
            let (out_features, in_features) = weight.dims2()?;
            let (w_q, scale) = candle_ascend_ops::rtn_quantize_weight(&weight)?;
            Ok(HostLinear::Int8Weight { w_q, out_features, in_features, scale, bias })
        }
        (LinearKind::A8W8PerToken, _) => {
            let (out_features, in_features) = weight.dims2()?;
            let hadamard = hadamard_block_for(q.per_token_hadamard, in_features);
            let weight = match hadamard {
                0 => weight,
                block => {
                    let mut rows = weight.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                    candle_ascend_ops::hadamard_rows(&mut rows, in_features, block)?;
                    Tensor::from_vec(rows, (out_features, in_features), weight.device())?
                }
            };
            let (w_q, scale) = candle_ascend_ops::rtn_quantize_weight(&weight)?;
            Ok(HostLinear::Int8PerToken { w_q, out_features, in_features, scale, bias, hadamard })
        }
    }
}

/// The whole model in prepared form (e.g. to save as a quantized checkpoint).
pub fn quantize_model(
    weights: &Weights,
    config: &ModelConfig,
    quant: &QuantConfig,
    calibration: Option<&Calibration>,
) -> Result<PreparedModel> {
    check_plan(quant, config, calibration)?;
    config.validate()?;
    let c = config;
    let (embed_tokens, lm_head) = prepare_embedding_and_lm_head(weights, c, Some(quant))?;
    let layers = (0..c.num_layers)
        .map(|i| prepare_layer(weights, c, i, Some(quant), calibration))
        .collect::<Result<Vec<_>>>()?;
    Ok(PreparedModel {
        config: c.clone(),
        quant: Some(quant.clone()),
        embed_tokens,
        final_norm: weights.get_with_shape("model.norm.weight", &[c.hidden_size])?,
        lm_head,
        layers,
    })
}

/// How the embedding table is held next to an lm_head of `lm_head_kind`: `None` when the lm_head's
/// rows serve as the table ([`embedding_from_lm_head`]); int8 rows with a per-row scale (W8A16)
/// when the lm_head has int8 weights (an untied model would otherwise keep the largest tensor of
/// a small model in f32); else float.
pub fn embedding_kind(c: &ModelConfig, lm_head_kind: LinearKind) -> Option<LinearKind> {
    match lm_head_kind {
        _ if embedding_from_lm_head(c, lm_head_kind) => None,
        LinearKind::Float => Some(LinearKind::Float),
        _ => Some(LinearKind::W8A16),
    }
}

/// The embedding table `[vocab, hidden]` in the form `kind` (float, or per-row symmetric int8 rows
/// by the lm_head's round-to-nearest weight quantizer).
pub fn prepare_embedding(table: Tensor, kind: LinearKind) -> Result<HostLinear> {
    match kind {
        LinearKind::Float => Ok(HostLinear::Float { weight: table, bias: None }),
        _ => {
            let (out_features, in_features) = table.dims2()?;
            let (w_q, scale) = candle_ascend_ops::rtn_quantize_weight(&table)?;
            Ok(HostLinear::Int8Weight { w_q, out_features, in_features, scale, bias: None })
        }
    }
}

/// Whether the lm_head, in the form `lm_head_kind`, also serves as the embedding table (tied
/// embeddings, int8 weights: the rows are read from it), so that a prepared model and its
/// checkpoint hold no float table.
pub fn embedding_from_lm_head(c: &ModelConfig, lm_head_kind: LinearKind) -> bool {
    c.tie_word_embeddings && lm_head_kind == LinearKind::W8A16
}

/// The Hadamard block of a per-token linear with `in_features` inputs under a configuration's
/// `per_token_hadamard` (the largest power of two at most that dividing `in_features`; 0 when
/// rotation is off or no block of at least 2 fits).
pub fn hadamard_block_for(per_token_hadamard: usize, in_features: usize) -> usize {
    match per_token_hadamard {
        0 => 0,
        max => match candle_ascend_ops::hadamard_block(in_features, max) {
            1 => 0,
            b => b,
        },
    }
}
