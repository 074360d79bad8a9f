//! Generation behaviour on random-weight models: batches of prompts of different lengths give
//! the same greedy tokens as each prompt alone, the decode step never reallocates the KV cache,
//! and requests beyond the cache capacity or the vocabulary are clear errors.

mod common;

use candle_ascend_models::{
    Architecture, CacheConfig, CpuBackend, ModelConfig, ModelError, SamplingConfig, Transformer, generate,
};
use candle_core::DType;

fn small_config(arch: Architecture) -> ModelConfig {
    ModelConfig {
        architecture: arch,
        vocab_size: 300,
        hidden_size: 128,
        intermediate_size: 320,
        num_layers: 3,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 32,
        rms_norm_eps: 1e-6,
        rope_theta: 10_000.0,
        max_position_embeddings: 512,
        tie_word_embeddings: arch == Architecture::Llama,
        attention_bias: arch == Architecture::Qwen2,
        bos_token_id: None,
        eos_token_ids: vec![],
    }
}

fn model(arch: Architecture, max_batch: usize, max_seq_len: usize, dtype: DType) -> Transformer<CpuBackend> {
    let cfg = small_config(arch);
    let weights = candle_ascend_models::random::random_weights(&cfg, 7).unwrap();
    Transformer::new(CpuBackend::new(dtype).unwrap(), cfg, &weights, CacheConfig { max_batch, max_seq_len }).unwrap()
}

#[test]
fn batch_of_three_ragged_prompts_matches_each_alone() {
    for arch in [Architecture::Llama, Architecture::Qwen2] {
        let prompts: Vec<Vec<u32>> =
            [5usize, 23, 12].iter().enumerate().map(|(i, &n)| common::random_prompt(300, n, 100 + i as u64)).collect();
        let cfg = SamplingConfig::greedy(16);
        let mut batched = model(arch, 3, 64, DType::F32);
        let together = generate(&mut batched, &prompts, &cfg, &[], |_, _| {}).unwrap();
        for (i, p) in prompts.iter().enumerate() {
            let mut single = model(arch, 1, 64, DType::F32);
            let alone = generate(&mut single, std::slice::from_ref(p), &cfg, &[], |_, _| {}).unwrap();
            assert_eq!(
                together.tokens[i],
                alone.tokens[0],
                "{arch:?}: prompt {i} (len {}) differs in a batch",
                p.len()
            );
        }
        assert_eq!(together.tokens.iter().map(Vec::len).sum::<usize>(), 48);
    }
}

#[test]
fn decode_writes_the_kv_cache_in_place() {
    let mut m = model(Architecture::Qwen2, 2, 64, DType::F32);
    let id = m.kv_cache_id();
    assert_ne!(id, 0);
    let prompts = vec![common::random_prompt(300, 9, 1), common::random_prompt(300, 4, 2)];
    generate(&mut m, &prompts, &SamplingConfig::greedy(20), &[], |_, _| {}).unwrap();
    assert_eq!(m.kv_cache_id(), id, "the KV cache storage was reallocated during generation");
}

#[test]
fn half_precision_models_track_f32() {
    for dtype in [DType::F16, DType::BF16] {
        let prompt = common::random_prompt(300, 10, 3);
        let mut full = model(Architecture::Llama, 1, 32, DType::F32);
        let mut half = model(Architecture::Llama, 1, 32, dtype);
        let a = full.forward(&prompt, prompt.len(), &[0], &[prompt.len()]).unwrap();
        let b = half.forward(&prompt, prompt.len(), &[0], &[prompt.len()]).unwrap();
        let rel = common::relative_error(&b, &a).unwrap();
        let tol = if dtype == DType::F16 { 1e-2 } else { 5e-2 };
        assert!(rel < tol, "{dtype:?} logits relative error {rel} against f32");
    }
}

#[test]
fn requests_beyond_the_cache_are_rejected() {
    let mut m = model(Architecture::Llama, 1, 16, DType::F32);
    let prompt = common::random_prompt(300, 10, 4);
    let err = generate(&mut m, std::slice::from_ref(&prompt), &SamplingConfig::greedy(7), &[], |_, _| {}).unwrap_err();
    assert!(matches!(err, ModelError::CacheFull { capacity: 16, requested: 17 }), "{err}");
    assert!(err.to_string().contains("16 positions"), "{err}");
    // Exactly at capacity works.
    generate(&mut m, &[prompt], &SamplingConfig::greedy(6), &[], |_, _| {}).unwrap();
    // Bad inputs are errors, not panics.
    assert!(matches!(m.forward(&[1, 2], 2, &[15], &[2]), Err(ModelError::CacheFull { .. })));
    assert!(matches!(m.forward(&[999], 1, &[0], &[1]), Err(ModelError::InvalidInput(_))));
    assert!(matches!(m.forward(&[1, 2], 1, &[0, 0], &[1, 1]), Err(ModelError::InvalidInput(_))));
    assert!(generate(&mut m, &[vec![]], &SamplingConfig::greedy(1), &[], |_, _| {}).is_err());
}

#[test]
fn eos_stops_a_sequence() {
    let mut m = model(Architecture::Llama, 1, 64, DType::F32);
    let prompt = common::random_prompt(300, 6, 5);
    let free = generate(&mut m, std::slice::from_ref(&prompt), &SamplingConfig::greedy(8), &[], |_, _| {}).unwrap();
    let stop = free.tokens[0][3];
    let first = free.tokens[0].iter().position(|&t| t == stop).unwrap();
    let mut m = model(Architecture::Llama, 1, 64, DType::F32);
    let stopped = generate(&mut m, &[prompt], &SamplingConfig::greedy(8), &[stop], |_, _| {}).unwrap();
    assert_eq!(stopped.tokens[0], free.tokens[0][..first].to_vec());
}

#[test]
fn sampling_is_reproducible_for_a_seed() {
    let prompt = common::random_prompt(300, 6, 6);
    let cfg = SamplingConfig { temperature: 0.8, top_k: Some(40), top_p: Some(0.95), seed: 11, max_tokens: 12 };
    let run = || {
        let mut m = model(Architecture::Qwen2, 1, 64, DType::F32);
        generate(&mut m, std::slice::from_ref(&prompt), &cfg, &[], |_, _| {}).unwrap().tokens
    };
    assert_eq!(run(), run());
}

#[test]
fn logits_of_every_position_match_step_by_step_decoding() {
    for arch in [Architecture::Llama, Architecture::Qwen2] {
        let ids = common::random_prompt(300, 9, 41);
        let mut all = model(arch, 1, 32, DType::F32);
        let every = all.forward_all(&ids, ids.len(), &[0], &[ids.len()]).unwrap();
        assert_eq!(every.dims(), &[1, 9, 300]);
        let mut stepwise = model(arch, 1, 32, DType::F32);
        for (i, &id) in ids.iter().enumerate() {
            let one = stepwise.forward(&[id], 1, &[i], &[1]).unwrap().flatten_all().unwrap();
            let row = every.get(0).unwrap().get(i).unwrap();
            let diff = (row - &one).unwrap().abs().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            let scale = one.abs().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            assert!(diff <= 1e-4 * scale.max(1.0), "{arch:?} position {i}: max diff {diff} (scale {scale})");
        }
    }
}
