//! Random-weight checkpoints for tests, doc examples and benchmarks of arbitrary shapes.

use crate::config::ModelConfig;
use crate::loader::Weights;
use candle_core::{DType, Device, Result, Tensor};
use std::collections::HashMap;

/// HF-named f32 weights for `config`, deterministic for a given seed. Scales follow the
/// usual 1/sqrt(fan_in) initialization so activations stay well-conditioned over many layers;
/// norm gammas are near 1 and biases small but nonzero.
pub fn random_weights(config: &ModelConfig, seed: u64) -> Result<Weights> {
    let mut state = seed ^ 0x6a09_e667_f3bc_c908;
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    };
    let mut tensor = |shape: &[usize], center: f32, spread: f32| -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|_| center + spread * next()).collect();
        Tensor::from_vec(data, shape, &Device::Cpu)
    };
    let c = config;
    let (h, d, i) = (c.hidden_size, c.head_dim, c.intermediate_size);
    let lin = |fan_in: usize| (3.0 / fan_in as f32).sqrt();
    let mut map = HashMap::new();
    map.insert("model.embed_tokens.weight".to_string(), tensor(&[c.vocab_size, h], 0.0, 1.0)?);
    for l in 0..c.num_layers {
        let p = format!("model.layers.{l}");
        map.insert(format!("{p}.input_layernorm.weight"), tensor(&[h], 1.0, 0.2)?);
        map.insert(format!("{p}.post_attention_layernorm.weight"), tensor(&[h], 1.0, 0.2)?);
        map.insert(format!("{p}.self_attn.q_proj.weight"), tensor(&[c.num_heads * d, h], 0.0, lin(h))?);
        map.insert(format!("{p}.self_attn.k_proj.weight"), tensor(&[c.num_kv_heads * d, h], 0.0, lin(h))?);
        map.insert(format!("{p}.self_attn.v_proj.weight"), tensor(&[c.num_kv_heads * d, h], 0.0, lin(h))?);
        map.insert(format!("{p}.self_attn.o_proj.weight"), tensor(&[h, c.num_heads * d], 0.0, lin(c.num_heads * d))?);
        if c.attention_bias {
            map.insert(format!("{p}.self_attn.q_proj.bias"), tensor(&[c.num_heads * d], 0.0, 0.1)?);
            map.insert(format!("{p}.self_attn.k_proj.bias"), tensor(&[c.num_kv_heads * d], 0.0, 0.1)?);
            map.insert(format!("{p}.self_attn.v_proj.bias"), tensor(&[c.num_kv_heads * d], 0.0, 0.1)?);
        }
        map.insert(format!("{p}.mlp.gate_proj.weight"), tensor(&[i, h], 0.0, lin(h))?);
        map.insert(format!("{p}.mlp.up_proj.weight"), tensor(&[i, h], 0.0, lin(h))?);
        map.insert(format!("{p}.mlp.down_proj.weight"), tensor(&[h, i], 0.0, lin(i))?);
    }
    map.insert("model.norm.weight".to_string(), tensor(&[h], 1.0, 0.2)?);
    if !c.tie_word_embeddings {
        map.insert("lm_head.weight".to_string(), tensor(&[c.vocab_size, h], 0.0, lin(h))?);
    }
    let _ = DType::F32;
    Ok(Weights::from_tensors(map, std::path::PathBuf::from("<random>")))
}

/// `n` deterministic pseudo-random token ids below `vocab` (xorshift64), for tests and
/// benchmarks that need prompts of a given length.
pub fn random_token_ids(vocab: usize, n: usize, seed: u64) -> Vec<u32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % vocab.max(1) as u64) as u32
        })
        .collect()
}
