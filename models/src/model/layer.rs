//! One decoder layer's host weights, merged the way the model runs them (q/k/v into one
//! projection, gate/up into one), before they are prepared on a backend. Quantization
//! (SmoothQuant folding) edits this form.

use crate::config::ModelConfig;
use crate::error::Result;
use crate::loader::Weights;
use candle_core::Tensor;

/// Host f32/f16/bf16 weights of decoder layer `index`.
#[derive(Debug, Clone)]
pub struct HostLayer {
    pub index: usize,
    pub input_norm: Tensor,
    /// `[(nq + 2 nkv) * D, H]`: q rows, then k rows, then v rows.
    pub qkv_w: Tensor,
    pub qkv_b: Option<Tensor>,
    pub o_w: Tensor,
    pub post_attention_norm: Tensor,
    /// `[2 I, H]`: gate rows, then up rows.
    pub gate_up_w: Tensor,
    pub down_w: Tensor,
}

impl HostLayer {
    /// Reads and merges layer `i`, checking every shape against the configuration.
    pub fn load(weights: &Weights, c: &ModelConfig, i: usize) -> Result<Self> {
        let (h, d) = (c.hidden_size, c.head_dim);
        let p = format!("model.layers.{i}");
        let w = |name: &str, shape: &[usize]| weights.get_with_shape(&format!("{p}.{name}"), shape);
        let q = w("self_attn.q_proj.weight", &[c.num_heads * d, h])?;
        let k = w("self_attn.k_proj.weight", &[c.num_kv_heads * d, h])?;
        let v = w("self_attn.v_proj.weight", &[c.num_kv_heads * d, h])?;
        let qkv_b = if c.attention_bias {
            let qb = w("self_attn.q_proj.bias", &[c.num_heads * d])?;
            let kb = w("self_attn.k_proj.bias", &[c.num_kv_heads * d])?;
            let vb = w("self_attn.v_proj.bias", &[c.num_kv_heads * d])?;
            Some(Tensor::cat(&[&qb, &kb, &vb], 0)?)
        } else {
            None
        };
        let gate = w("mlp.gate_proj.weight", &[c.intermediate_size, h])?;
        let up = w("mlp.up_proj.weight", &[c.intermediate_size, h])?;
        Ok(Self {
            index: i,
            input_norm: w("input_layernorm.weight", &[h])?,
            qkv_w: Tensor::cat(&[&q, &k, &v], 0)?,
            qkv_b,
            o_w: w("self_attn.o_proj.weight", &[h, c.num_heads * d])?,
            post_attention_norm: w("post_attention_layernorm.weight", &[h])?,
            gate_up_w: Tensor::cat(&[&gate, &up], 0)?,
            down_w: w("mlp.down_proj.weight", &[h, c.intermediate_size])?,
        })
    }

    /// HF module names merged into each linear: [qkv, o_proj, gate_up, down].
    pub fn module_names(&self) -> [Vec<String>; 4] {
        let p = format!("model.layers.{}", self.index);
        let names = |m: &[&str]| m.iter().map(|m| format!("{p}.{m}")).collect::<Vec<_>>();
        [
            names(&["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
            names(&["self_attn.o_proj"]),
            names(&["mlp.gate_proj", "mlp.up_proj"]),
            names(&["mlp.down_proj"]),
        ]
    }
}
