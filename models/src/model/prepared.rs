//! The host form a decoder is built from: every linear already in the representation its
//! backend will run (float, W8A16 or A8W8), norms with any SmoothQuant folding applied, and the
//! int8 KV-cache parameters of each layer. Quantization (`quant::prepare`) and quantized
//! checkpoints (`quant::checkpoint`) produce this form; [`Transformer`](super::Transformer)
//! uploads it.

use super::HostLayer;
use crate::backend::LinearWeights;
use crate::quant::a8w8::Int8Linear;
use candle_core::Tensor;

/// One linear layer on the host, as the backend will run it.
#[derive(Debug, Clone)]
pub enum HostLinear {
    /// Float weight `[N, K]` and optional bias `[N]`.
    Float { weight: Tensor, bias: Option<Tensor> },
    /// W8A16: int8 weight `[N, K]` row-major, per-output-channel scale, float bias.
    Int8Weight { w_q: Vec<i8>, out_features: usize, in_features: usize, scale: Vec<f32>, bias: Option<Tensor> },
    /// A8W8: int8 weights and static int8 activations.
    Int8(Int8Linear),
    /// A8W8 with per-token activations quantized at run time: int8 weight `[N, K]`,
    /// per-output-channel symmetric scale, float bias; with `hadamard` > 0 the weight rows
    /// are the rotated `W H` and inputs are rotated by the same block Hadamard matrix.
    Int8PerToken {
        w_q: Vec<i8>,
        out_features: usize,
        in_features: usize,
        scale: Vec<f32>,
        bias: Option<Tensor>,
        hadamard: usize,
    },
}

impl HostLinear {
    /// The weights in the form [`Backend::prepare_linear`](crate::backend::Backend::prepare_linear) takes.
    pub fn as_weights(&self) -> LinearWeights<'_> {
        match self {
            Self::Float { weight, bias } => LinearWeights::Float { weight, bias: bias.as_ref() },
            Self::Int8Weight { w_q, out_features, in_features, scale, bias } => LinearWeights::Int8Weight {
                w_q,
                out_features: *out_features,
                in_features: *in_features,
                scale,
                bias: bias.as_ref(),
            },
            Self::Int8(linear) => LinearWeights::Int8 { linear },
            Self::Int8PerToken { w_q, out_features, in_features, scale, bias, hadamard } => {
                LinearWeights::Int8PerToken {
                    w_q,
                    out_features: *out_features,
                    in_features: *in_features,
                    scale,
                    bias: bias.as_ref(),
                    hadamard: *hadamard,
                }
            }
        }
    }

    /// `(out_features, in_features)`.
    pub fn dims(&self) -> candle_core::Result<(usize, usize)> {
        match self {
            Self::Float { weight, .. } => weight.dims2(),
            Self::Int8Weight { out_features, in_features, .. }
            | Self::Int8PerToken { out_features, in_features, .. } => Ok((*out_features, *in_features)),
            Self::Int8(l) => Ok((l.out_features, l.in_features)),
        }
    }

    /// A short name of the representation (`float`, `w8a16`, `a8w8`).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Float { .. } => "float",
            Self::Int8Weight { .. } => "w8a16",
            Self::Int8(_) => "a8w8",
            Self::Int8PerToken { .. } => "a8w8 per-token",
        }
    }
}

/// Per-channel asymmetric int8 parameters of one layer's K and V caches (channel
/// `c = kv_head * head_dim + d`): `x = (x_q + offset[c]) * scale[c]`.
#[derive(Debug, Clone, PartialEq)]
pub struct KvQuant {
    pub k_scale: Vec<f32>,
    pub k_offset: Vec<f32>,
    pub v_scale: Vec<f32>,
    pub v_offset: Vec<f32>,
}

impl KvQuant {
    /// Channels (`num_kv_heads * head_dim`).
    pub fn channels(&self) -> usize {
        self.k_scale.len()
    }

    /// The K and V parameters in the form the int8 cache ops take.
    pub fn params(&self) -> [candle_ascend_ops::KvQuantParams; 2] {
        let params = |scale: &[f32], offset: &[f32]| candle_ascend_ops::KvQuantParams {
            scale: scale.to_vec(),
            offset: offset.to_vec(),
        };
        [params(&self.k_scale, &self.k_offset), params(&self.v_scale, &self.v_offset)]
    }
}

/// One decoder layer ready for upload.
#[derive(Debug, Clone)]
pub struct PreparedLayer {
    pub input_norm: Tensor,
    /// q, k and v merged (`[(nq + 2 nkv) * D, H]`).
    pub qkv: HostLinear,
    pub o_proj: HostLinear,
    pub post_attention_norm: Tensor,
    /// gate and up merged (`[2 I, H]`).
    pub gate_up: HostLinear,
    pub down: HostLinear,
    /// int8 KV-cache parameters; `None` for a float cache.
    pub kv: Option<KvQuant>,
}

impl PreparedLayer {
    /// The float layer as loaded.
    pub fn float(host: HostLayer) -> Self {
        Self {
            input_norm: host.input_norm,
            qkv: HostLinear::Float { weight: host.qkv_w, bias: host.qkv_b },
            o_proj: HostLinear::Float { weight: host.o_w, bias: None },
            post_attention_norm: host.post_attention_norm,
            gate_up: HostLinear::Float { weight: host.gate_up_w, bias: None },
            down: HostLinear::Float { weight: host.down_w, bias: None },
            kv: None,
        }
    }

    /// The four linears in model order: [qkv, o_proj, gate_up, down].
    pub fn linears(&self) -> [&HostLinear; 4] {
        [&self.qkv, &self.o_proj, &self.gate_up, &self.down]
    }
}

/// A whole decoder in prepared host form (what a quantized checkpoint holds).
#[derive(Debug, Clone)]
pub struct PreparedModel {
    pub config: crate::config::ModelConfig,
    /// The quantization that produced it (`None`: float).
    pub quant: Option<crate::quant::QuantConfig>,
    /// The embedding table `[vocab, hidden]`: float, or int8 rows with a per-row scale
    /// ([`HostLinear::Int8Weight`], when the lm_head has int8 weights); `None` for a tied model
    /// whose int8 lm_head serves as the table.
    pub embed_tokens: Option<HostLinear>,
    pub final_norm: Tensor,
    pub lm_head: HostLinear,
    pub layers: Vec<PreparedLayer>,
}
