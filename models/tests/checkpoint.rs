//! Quantized checkpoints: quantize, save, load and get bit-identical logits; damaged or
//! mismatched checkpoints are clear errors that name what is wrong. Also: quantized decode
//! gives the same logits on one and two threads.

use candle_ascend_models::backend::Backend;
use candle_ascend_models::model::{HostLinear, PreparedModel};
use candle_ascend_models::quant::checkpoint::{self, WEIGHTS_FILE};
use candle_ascend_models::quant::{QuantConfig, calibrate, quantize_model};
use candle_ascend_models::random::{random_token_ids, random_weights};
use candle_ascend_models::{Architecture, CacheConfig, CpuBackend, ModelConfig, ModelError, Transformer};
use candle_core::{DType, Tensor};
use std::path::Path;

fn config(arch: Architecture) -> ModelConfig {
    ModelConfig {
        architecture: arch,
        vocab_size: 200,
        hidden_size: 128,
        intermediate_size: 256,
        num_layers: 3,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 32,
        rms_norm_eps: 1e-6,
        rope_theta: 10_000.0,
        max_position_embeddings: 256,
        tie_word_embeddings: arch == Architecture::Llama,
        attention_bias: arch == Architecture::Qwen2,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
    }
}

fn quantized(arch: Architecture, preset: &str) -> PreparedModel {
    let cfg = config(arch);
    let weights = random_weights(&cfg, 5).unwrap();
    let data: Vec<Vec<u32>> = (0..4).map(|i| random_token_ids(cfg.vocab_size, 40, 50 + i)).collect();
    let calibration = calibrate(&cfg, &weights, &data).unwrap();
    let mut q = QuantConfig::preset(preset).unwrap();
    q.float_layers = vec![1];
    quantize_model(&weights, &cfg, &q, Some(&calibration)).unwrap()
}

/// Logits of a prefill of 9 tokens and 3 decode steps.
fn run(model: &PreparedModel) -> Vec<Tensor> {
    let cache = CacheConfig { max_batch: 1, max_seq_len: 32 };
    let mut m = Transformer::from_prepared(CpuBackend::new(DType::F32).unwrap(), model, cache).unwrap();
    let prompt = random_token_ids(model.config.vocab_size, 9, 77);
    let mut out = vec![m.forward(&prompt, 9, &[0], &[9]).unwrap()];
    for step in 0..3 {
        out.push(m.forward(&[10 + step as u32], 1, &[9 + step], &[1]).unwrap());
    }
    out
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()
}

/// Decode on a two-thread pool runs the CPU backend's attention sub-layer with a helper
/// thread reading `o_proj`'s weights meanwhile (and yielding to the attention's own tasks);
/// the logits must be exactly those of a one-thread pool, where it does not.
#[test]
fn quantized_decode_logits_do_not_depend_on_the_pool_size() {
    for arch in [Architecture::Llama, Architecture::Qwen2] {
        let model = quantized(arch, "a8w8c8");
        let on = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| run(&model))
        };
        let (one, two) = (on(1), on(2));
        for (step, (x, y)) in one.iter().zip(&two).enumerate() {
            assert_eq!(bits(x), bits(y), "{arch:?}: step {step} logits differ between one and two threads");
        }
    }
}

#[test]
fn save_then_load_gives_bit_identical_logits() {
    for (arch, preset) in
        [(Architecture::Llama, "a8w8c8"), (Architecture::Qwen2, "a8w8c8"), (Architecture::Qwen2, "w8a16")]
    {
        let model = quantized(arch, preset);
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("q");
        checkpoint::save(&model, None, &out).unwrap();
        assert!(checkpoint::is_quantized_checkpoint(&out));
        let loaded = checkpoint::load(&out).unwrap();
        assert_eq!(loaded.config, model.config);
        assert_eq!(loaded.quant, model.quant);
        let (a, b) = (run(&model), run(&loaded));
        for (step, (x, y)) in a.iter().zip(&b).enumerate() {
            assert_eq!(bits(x), bits(y), "{arch:?} {preset}: step {step} logits differ after the round trip");
        }
        // No leftovers of the atomic writes.
        let names: Vec<String> =
            std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert!(names.iter().all(|n| !n.ends_with(".partial")), "{names:?}");
    }
}

#[test]
fn the_checkpoint_holds_int8_weights_and_is_much_smaller() {
    let model = quantized(Architecture::Qwen2, "a8w8c8");
    let dir = tempfile::tempdir().unwrap();
    checkpoint::save(&model, None, &dir.path().join("q")).unwrap();
    let bytes = std::fs::read(dir.path().join("q").join(WEIGHTS_FILE)).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let qkv = file.tensor("model.layers.0.self_attn.qkv_proj.weight").unwrap();
    assert_eq!(qkv.dtype(), safetensors::Dtype::I8);
    assert_eq!(qkv.shape(), &[(4 + 2 * 2) * 32, 128]);
    assert_eq!(file.tensor("model.layers.0.self_attn.qkv_proj.quant_bias").unwrap().dtype(), safetensors::Dtype::I32);
    assert_eq!(file.tensor("model.layers.0.self_attn.k_cache.scale").unwrap().shape(), &[2 * 32]);
    // Layer 1 is a float layer: float weights, no scales, no KV parameters.
    assert_eq!(file.tensor("model.layers.1.mlp.down_proj.weight").unwrap().dtype(), safetensors::Dtype::F32);
    assert!(file.tensor("model.layers.1.self_attn.k_cache.scale").is_err());
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("q/config.json")).unwrap()).unwrap();
    assert_eq!(config["quantization_config"]["float_layers"], serde_json::json!([1]));
    assert_eq!(config["quantization_config"]["kvcache_dtype"], "int8");
    // Untied qwen2: its own int8 lm_head, and an int8 embedding table with one scale per row.
    assert_eq!(file.tensor("lm_head.weight").unwrap().dtype(), safetensors::Dtype::I8);
    let embed = file.tensor("model.embed_tokens.weight").unwrap();
    assert_eq!((embed.dtype(), embed.shape()), (safetensors::Dtype::I8, &[model.config.vocab_size, 128][..]));
    let scale = file.tensor("model.embed_tokens.weight_scale").unwrap();
    assert_eq!((scale.dtype(), scale.shape()), (safetensors::Dtype::F32, &[model.config.vocab_size][..]));
}

#[test]
fn a_tied_int8_lm_head_serves_as_the_embedding_table() {
    let model = quantized(Architecture::Llama, "a8w8c8");
    assert!(model.config.tie_word_embeddings);
    assert!(model.embed_tokens.is_none(), "no float table is kept next to a tied int8 lm_head");
    let dir = tempfile::tempdir().unwrap();
    checkpoint::save(&model, None, &dir.path().join("q")).unwrap();
    let bytes = std::fs::read(dir.path().join("q").join(WEIGHTS_FILE)).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert!(file.tensor("model.embed_tokens.weight").is_err());
    assert_eq!(file.tensor("lm_head.weight").unwrap().dtype(), safetensors::Dtype::I8);
    // The rows the model embeds are the dequantized lm_head rows.
    let HostLinear::Int8Weight { w_q, in_features, scale, .. } = &model.lm_head else {
        panic!("lm_head should be int8 weight-only, is {}", model.lm_head.kind());
    };
    let be = CpuBackend::new(DType::F32).unwrap();
    let lm_head = be.prepare_linear(model.lm_head.as_weights()).unwrap();
    assert!(be.linear_gathers_rows(&lm_head));
    let ids = [3u32, 0, 17];
    let rows =
        be.gather_linear_rows(&lm_head, &ids.to_vec(), 1, 3).unwrap().squeeze(0).unwrap().to_vec2::<f32>().unwrap();
    for (row, &id) in rows.iter().zip(&ids) {
        let r = id as usize;
        for (k, v) in row.iter().enumerate() {
            assert_eq!(*v, w_q[r * in_features + k] as f32 * scale[r], "row {r} col {k}");
        }
    }
}

/// Rewrites the checkpoint's weights without `drop` and with `extra` added.
fn rewrite(dir: &Path, drop: &str, extra: Option<(&str, Vec<f32>)>) {
    let path = dir.join(WEIGHTS_FILE);
    let bytes = std::fs::read(&path).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut kept: Vec<(String, safetensors::tensor::TensorView<'_>)> =
        file.tensors().into_iter().filter(|(n, _)| n != drop).collect();
    let extra_bytes: Vec<u8> = extra.as_ref().map_or(vec![], |(_, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect());
    if let Some((name, v)) = &extra {
        kept.push((
            name.to_string(),
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![v.len()], &extra_bytes).unwrap(),
        ));
    }
    let out = safetensors::serialize(kept, None).unwrap();
    std::fs::write(&path, out).unwrap();
}

#[test]
fn damaged_or_mismatched_checkpoints_are_clear_errors() {
    let model = quantized(Architecture::Qwen2, "a8w8c8");
    let root = tempfile::tempdir().unwrap();
    let fresh = |name: &str| {
        let dir = root.path().join(name);
        checkpoint::save(&model, None, &dir).unwrap();
        dir
    };

    // A missing scale names the tensor and why it is needed.
    let dir = fresh("missing-scale");
    rewrite(&dir, "model.layers.2.self_attn.o_proj.deq_scale", None);
    let err = checkpoint::load(&dir).unwrap_err().to_string();
    assert!(err.contains("model.layers.2.self_attn.o_proj.deq_scale") && err.contains("a8w8"), "{err}");
    let dir = fresh("missing-weight-scale");
    rewrite(&dir, "model.layers.0.mlp.down_proj.weight_scale", None);
    let err = checkpoint::load(&dir).unwrap_err().to_string();
    assert!(err.contains("down_proj.weight_scale") && err.contains("per-token"), "{err}");

    // Missing KV parameters.
    let dir = fresh("missing-kv");
    rewrite(&dir, "model.layers.0.self_attn.v_cache.offset", None);
    let err = checkpoint::load(&dir).unwrap_err().to_string();
    assert!(err.contains("v_cache.offset"), "{err}");

    // A leftover tensor the configuration does not use.
    let dir = fresh("leftover");
    rewrite(&dir, "", Some(("model.layers.1.self_attn.k_cache.scale", vec![1.0; 64])));
    let err = checkpoint::load(&dir).unwrap_err().to_string();
    assert!(err.contains("does not match the tensors") && err.contains("layers.1.self_attn.k_cache.scale"), "{err}");

    // A quantization_config that does not match the tensors (layer 0 declared float).
    let dir = fresh("config-mismatch");
    let path = dir.join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config["quantization_config"]["float_layers"] = serde_json::json!([0, 1]);
    std::fs::write(&path, config.to_string()).unwrap();
    let err = checkpoint::load(&dir).unwrap_err().to_string();
    assert!(err.contains("does not match the tensors") && err.contains("model.layers.0"), "{err}");

    // An invalid quantization_config.
    let dir = fresh("bad-config");
    let path = dir.join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config["quantization_config"]["algorithm_args"]["alpha"] = serde_json::json!(3.0);
    std::fs::write(&path, config.to_string()).unwrap();
    let err = checkpoint::load(&dir).unwrap_err().to_string();
    assert!(err.contains("alpha"), "{err}");

    // A truncated weights file.
    let dir = fresh("truncated");
    let path = dir.join(WEIGHTS_FILE);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = checkpoint::load(&dir).unwrap_err();
    assert!(matches!(err, ModelError::BadFile { .. }) && err.to_string().contains("safetensors"), "{err}");

    // Saving never overwrites: a non-empty folder is refused and left as it was.
    let dir = fresh("occupied");
    let before = std::fs::read(dir.join(WEIGHTS_FILE)).unwrap();
    let err = checkpoint::save(&model, None, &dir).unwrap_err().to_string();
    assert!(err.contains("not empty"), "{err}");
    assert_eq!(std::fs::read(dir.join(WEIGHTS_FILE)).unwrap(), before);

    // A float model is not a quantized checkpoint.
    let mut float = model.clone();
    float.quant = None;
    assert!(checkpoint::save(&float, None, &root.path().join("float")).is_err());
}
