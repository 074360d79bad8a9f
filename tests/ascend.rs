//! The NPU path end to end: llama and qwen2 on the Ascend backend (ascend-sim by default, real
//! CANN with `CANDLE_ASCEND_TEST_CANN=1`) against the CPU path at the same dtype.
//!
//! - random-weight models, ragged batches: logits within the dtype's tolerance, greedy tokens
//!   identical (a divergence only at a near-tie);
//! - the real checkpoints: 16 greedy tokens identical to the CPU f16 path, logits within f16
//!   tolerance; A8W8C8 on the NPU within the A8W8C8 issue's tolerance of the float model (top-1
//!   agreement >= 95%, perplexity within 3%, same calibration: 4,096 tokens of the MMLU split);
//! - one host-to-device copy (the step's indices) and one device-to-host copy (logits) per
//!   step, prefill (first and chunked) and decode, float and A8W8C8, the KV cache never
//!   reallocated;
//! - injected faults surface as errors, leave no leak and the next request works;
//! - without CANN, `npu:0` fails naming the directories searched.
#![cfg(feature = "ascend")]

mod common;

use anyhow::{Result, bail, ensure};
use candle_ascend_llm::{Architecture, CacheConfig, ModelConfig, QuantConfig};
use candle_ascend_models::candle_ascend::testing;
use candle_ascend_models::eval::Mmlu;
use candle_ascend_models::loader::{Weights, load_checkpoint};
use candle_ascend_models::quant::{DEFAULT_CALIBRATION_TOKENS, calibrate, calibration_sequences};
use candle_ascend_models::{AscendBackend, Backend, CpuBackend, Transformer};
use candle_core::DType;
use common::{known_model, relative_error, top_two};

/// Logits tolerance (max|npu - cpu| / max|cpu|) between two paths storing activations in `dtype`.
/// Held-out tokens scored by the A8W8C8 test (ascend-sim computes on the host: a few minutes for this many).
const HELD_OUT_TOKENS: usize = 400;

fn logits_tolerance(dtype: DType) -> f32 {
    match dtype {
        DType::F32 => 1e-4,
        DType::F16 => 2e-2,
        _ => 8e-2,
    }
}

/// Relative top-two margin under which two paths at `dtype` may pick different tokens.
fn near_tie(dtype: DType) -> f32 {
    match dtype {
        DType::F32 => 1e-4,
        _ => 1e-2,
    }
}

/// Tests of this file share one simulated device and its fault switches: they run one at a time.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn npu(dtype: DType) -> AscendBackend {
    AscendBackend::with_device(testing::device(), dtype).unwrap()
}

fn tiny_config(arch: Architecture) -> ModelConfig {
    ModelConfig {
        architecture: arch,
        vocab_size: 300,
        hidden_size: 64,
        intermediate_size: 96,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 16,
        rms_norm_eps: 1e-6,
        rope_theta: 10_000.0,
        max_position_embeddings: 256,
        tie_word_embeddings: arch == Architecture::Llama,
        attention_bias: arch == Architecture::Qwen2,
        bos_token_id: None,
        eos_token_ids: vec![],
    }
}

/// Runs both models greedily from the same prompts (right-padded batch), comparing every
/// step's logits and tokens; the CPU path's tokens drive both. Returns the tokens.
fn compare_greedy<A: Backend, B: Backend>(
    name: &str,
    cpu: &mut Transformer<A>,
    npu: &mut Transformer<B>,
    prompts: &[Vec<u32>],
    steps: usize,
    dtype: DType,
) -> Result<Vec<Vec<u32>>> {
    let batch = prompts.len();
    let seq = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = vec![0u32; batch * seq];
    for (b, p) in prompts.iter().enumerate() {
        ids[b * seq..b * seq + p.len()].copy_from_slice(p);
    }
    let lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
    let mut start = vec![0usize; batch];
    let mut cpu_logits = cpu.forward(&ids, seq, &start, &lens)?;
    let mut npu_logits = npu.forward(&ids, seq, &start, &lens)?;
    let mut tokens = vec![Vec::new(); batch];
    for step in 0..steps {
        let rel = relative_error(&npu_logits, &cpu_logits)?;
        ensure!(rel <= logits_tolerance(dtype), "{name}: step {step}: logits relative error {rel:.3e}");
        let mut next = Vec::with_capacity(batch);
        for b in 0..batch {
            let (want, margin) = top_two(&cpu_logits.get(b)?.to_vec1::<f32>()?);
            let (got, _) = top_two(&npu_logits.get(b)?.to_vec1::<f32>()?);
            if got != want && margin >= near_tie(dtype) {
                bail!("{name}: sequence {b}, token {step}: npu {got}, cpu {want} (cpu margin {margin:.2e})");
            }
            if got != want {
                eprintln!(
                    "{name}: sequence {b} diverged at token {step} at a near-tie (margin {margin:.2e}): accepted"
                );
                return Ok(tokens);
            }
            tokens[b].push(want);
            next.push(want);
        }
        if step + 1 == steps {
            break;
        }
        for (s, l) in start.iter_mut().zip(&lens) {
            *s = if step == 0 { *l } else { *s + 1 };
        }
        cpu_logits = cpu.forward(&next, 1, &start, &vec![1; batch])?;
        npu_logits = npu.forward(&next, 1, &start, &vec![1; batch])?;
    }
    Ok(tokens)
}

#[test]
fn random_models_match_the_cpu_path_in_f16_and_f32() {
    let _serial = serial();
    for arch in [Architecture::Llama, Architecture::Qwen2] {
        let config = tiny_config(arch);
        let weights = candle_ascend_llm::random_weights(&config, 7).unwrap();
        let prompts = vec![common::random_prompt(300, 11, 1), common::random_prompt(300, 5, 2)];
        for dtype in [DType::F16, DType::F32] {
            let cache = CacheConfig { max_batch: 2, max_seq_len: 32 };
            let mut cpu = Transformer::new(CpuBackend::new(dtype).unwrap(), config.clone(), &weights, cache).unwrap();
            let mut dev = Transformer::new(npu(dtype), config.clone(), &weights, cache).unwrap();
            let name = format!("{arch:?} {dtype:?}");
            let tokens = compare_greedy(&name, &mut cpu, &mut dev, &prompts, 10, dtype).unwrap();
            assert!(tokens.iter().all(|t| !t.is_empty()), "{name}: no token compared");
        }
    }
}

/// Runs a prefill, a chunked prefill after the cached prefix and four decode steps, asserting that each makes
/// one host-to-device copy (the step's indices) and one device-to-host copy (the logits), and that the KV cache
/// is never reallocated.
fn assert_one_copy_each_way_per_step<B: Backend>(what: &str, m: &mut Transformer<B>) {
    let cache_id = m.kv_cache_id();
    let hooks = testing::hooks();
    let prompts = [common::random_prompt(300, 6, 3), common::random_prompt(300, 6, 4)];
    let chunk = [common::random_prompt(300, 3, 5), common::random_prompt(300, 3, 6)];
    /// (name, ids, S, starts, lengths) of one step.
    type Step = (String, Vec<u32>, usize, [usize; 2], [usize; 2]);
    let mut steps: Vec<Step> = vec![
        ("prefill".into(), prompts.concat(), 6, [0, 0], [6, 4]),
        ("chunked prefill".into(), chunk.concat(), 3, [6, 4], [3, 2]),
    ];
    for step in 0..4 {
        steps.push((format!("decode step {step}"), vec![5, 6], 1, [9 + step, 6 + step], [1, 1]));
    }
    for (name, ids, seq, start, lens) in steps {
        let before = hooks.copies();
        m.forward(&ids, seq, &start, &lens).unwrap();
        let after = hooks.copies();
        assert_eq!(
            (after.0 - before.0, after.1 - before.1),
            (1, 1),
            "{what}, {name}: (host-to-device, device-to-host) copies"
        );
    }
    assert_eq!(m.kv_cache_id(), cache_id, "{what}: the KV cache storage was reallocated");
}

#[test]
fn every_step_copies_the_indices_in_and_the_logits_out_once() {
    let _serial = serial();
    if testing::on_real_cann() {
        eprintln!("SKIPPED on real CANN: copies are counted by the simulator's hooks");
        return;
    }
    let config = tiny_config(Architecture::Qwen2);
    let weights = candle_ascend_llm::random_weights(&config, 9).unwrap();
    let cache = CacheConfig { max_batch: 2, max_seq_len: 32 };
    let mut float = Transformer::new(npu(DType::F16), config.clone(), &weights, cache).unwrap();
    assert_one_copy_each_way_per_step("f16", &mut float);
    // A8W8C8: static int8 activations and the int8 KV cache (prefill dequantizes the prefix on the device).
    let sequences: Vec<Vec<u32>> = (0..4).map(|i| common::random_prompt(300, 24, 20 + i)).collect();
    let calibration = calibrate(&config, &weights, &sequences).unwrap();
    let quant = QuantConfig::preset("a8w8c8").unwrap();
    let mut int8 =
        Transformer::new_calibrated(npu(DType::F16), config, &weights, cache, Some(&quant), Some(&calibration))
            .unwrap();
    assert_one_copy_each_way_per_step("a8w8c8", &mut int8);
}

/// The chat prompt of the sanity fact, tokenized for `path`'s model.
fn capital_prompt(
    path: &std::path::Path,
) -> (ModelConfig, Weights, Vec<u32>, candle_ascend_llm::loader::TokenizerBundle) {
    let ckpt = load_checkpoint(path, DType::F16).unwrap();
    let text = candle_ascend_models::chat::format_chat(&ckpt.tokenizer, "What is the capital of France?").unwrap();
    let prompt = ckpt.tokenizer.tokenizer.encode(text, false).unwrap().get_ids().to_vec();
    (ckpt.config, ckpt.weights, prompt, ckpt.tokenizer)
}

#[test]
fn real_models_on_the_npu_match_the_cpu_path_in_f16() {
    let _serial = serial();
    for name in ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"] {
        let (config, weights, prompt, tokenizer) = capital_prompt(&known_model(name));
        let cache = CacheConfig { max_batch: 1, max_seq_len: prompt.len() + 17 };
        let mut cpu = Transformer::new(CpuBackend::new(DType::F16).unwrap(), config.clone(), &weights, cache).unwrap();
        let mut dev = Transformer::new(npu(DType::F16), config.clone(), &weights, cache).unwrap();
        let tokens = compare_greedy(name, &mut cpu, &mut dev, &[prompt], 16, DType::F16).unwrap();
        let answer = tokenizer.tokenizer.decode(&tokens[0], true).unwrap();
        eprintln!("{name} on {}: {answer:?}", testing::backend_label());
        assert!(answer.contains("Paris"), "{name} on the NPU answered {answer:?}");
    }
}

/// `ckpt` quantized with `quant` and `calibration` on `backend`.
fn quantize_on<B: Backend>(
    backend: B,
    ckpt: &candle_ascend_models::loader::Checkpoint,
    quant: &QuantConfig,
    calibration: &candle_ascend_models::quant::Calibration,
    cache: CacheConfig,
) -> Transformer<B> {
    Transformer::new_calibrated(backend, ckpt.config.clone(), &ckpt.weights, cache, Some(quant), Some(calibration))
        .unwrap()
}

/// Perplexity of `ids[1..]` under the logits of positions `0..n-1`.
fn perplexity(logits: &[Vec<f32>], ids: &[u32]) -> f64 {
    let mut nll = 0.0f64;
    for (row, &next) in logits.iter().zip(&ids[1..]) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let log_sum = row.iter().map(|&v| ((v - max) as f64).exp()).sum::<f64>().ln() + max as f64;
        nll += log_sum - row[next as usize] as f64;
    }
    (nll / (ids.len() - 1) as f64).exp()
}

/// A8W8C8 on the NPU against the float model, with issue 3's setting: calibrated on 4,096 tokens of the MMLU
/// calibration split, evaluated on held-out text (the start of the MMLU held-out split, disjoint from it).
#[test]
fn a8w8c8_on_the_npu_tracks_the_float_model() {
    let _serial = serial();
    let name = "smollm2-135m-instruct";
    let path = known_model(name);
    let ckpt = load_checkpoint(&path, DType::F32).unwrap();
    let (sequences, source) = calibration_sequences(&ckpt.tokenizer, None, DEFAULT_CALIBRATION_TOKENS, None).unwrap();
    let calibration = calibrate(&ckpt.config, &ckpt.weights, &sequences).unwrap();
    let quant = QuantConfig::preset("a8w8c8").unwrap();
    let held_out = Mmlu::fetch(None).unwrap().held_out_text();
    let mut ids = ckpt.tokenizer.tokenizer.encode(held_out, false).unwrap().get_ids().to_vec();
    ids.truncate(HELD_OUT_TOKENS);
    let cache = CacheConfig { max_batch: 1, max_seq_len: ids.len() + 1 };
    let mut float =
        Transformer::new(CpuBackend::new(DType::F32).unwrap(), ckpt.config.clone(), &ckpt.weights, cache).unwrap();
    let mut quantized = quantize_on(npu(DType::F16), &ckpt, &quant, &calibration, cache);
    let mut cpu_quantized = quantize_on(CpuBackend::new(DType::F32).unwrap(), &ckpt, &quant, &calibration, cache);
    let n = ids.len();
    // Logits of positions 0..n-1 (each predicts the next id).
    let rows = |t: candle_core::Tensor| -> Vec<Vec<f32>> {
        let mut all = t.squeeze(0).unwrap().to_vec2::<f32>().unwrap();
        all.truncate(n - 1);
        all
    };
    let want = rows(float.forward_all(&ids, n, &[0], &[n]).unwrap());
    let got = rows(quantized.forward_all(&ids, n, &[0], &[n]).unwrap());
    let cpu_q = rows(cpu_quantized.forward_all(&ids, n, &[0], &[n]).unwrap());
    let same = |a: &[Vec<f32>], b: &[Vec<f32>]| a.iter().zip(b).filter(|(x, y)| top_two(x).0 == top_two(y).0).count();
    let (agree, cpu_agree, npu_cpu) = (same(&want, &got), same(&want, &cpu_q), same(&got, &cpu_q));
    let pct = |k: usize| 100.0 * k as f64 / (n - 1) as f64;
    let (ppl_float, ppl_npu, ppl_cpu) = (perplexity(&want, &ids), perplexity(&got, &ids), perplexity(&cpu_q, &ids));
    eprintln!(
        "{name} a8w8c8 (calibration: {source}), {} held-out predictions: top-1 agreement npu vs float {:.1}%, cpu vs \
         float {:.1}%, npu vs cpu a8w8c8 {:.1}%; perplexity float {ppl_float:.3}, npu a8w8c8 {ppl_npu:.3}, cpu a8w8c8 \
         {ppl_cpu:.3} ({})",
        n - 1,
        pct(agree),
        pct(cpu_agree),
        pct(npu_cpu),
        testing::backend_label()
    );
    // Issue 3's tolerance, on the NPU: top-1 agreement with float at least 95%, perplexity within 3%.
    assert!(pct(agree) >= 95.0, "npu a8w8c8 agrees with float on {agree}/{} predictions", n - 1);
    assert!((ppl_npu / ppl_float - 1.0).abs() <= 0.03, "npu a8w8c8 perplexity {ppl_npu:.3} vs float {ppl_float:.3}");
    // And it runs the CPU's quantized model (f16 activations around the same int8 weights).
    assert!(pct(npu_cpu) >= 95.0, "npu and cpu a8w8c8 pick the same token on only {npu_cpu}/{} positions", n - 1);
}

#[test]
fn injected_faults_surface_as_errors_and_the_next_request_works() {
    let _serial = serial();
    if testing::on_real_cann() {
        eprintln!("SKIPPED on real CANN: faults are injected by the simulator's hooks");
        return;
    }
    let hooks = testing::hooks();
    let config = tiny_config(Architecture::Llama);
    let weights = candle_ascend_llm::random_weights(&config, 11).unwrap();
    let cache = CacheConfig { max_batch: 1, max_seq_len: 32 };
    let device = testing::device();
    let live_before = device.pool_stats();

    // Out of device memory while loading the weights: an error naming the allocation, nothing leaked.
    let backend = AscendBackend::with_device(device.clone(), DType::F16).unwrap();
    // SAFETY: simulator hooks taking and returning plain values.
    let live = unsafe { (hooks.live_device_bytes)() };
    // SAFETY: as above.
    unsafe { (hooks.set_alloc_limit)(live + 64 * 1024) };
    let loaded = Transformer::new(backend, config.clone(), &weights, cache);
    // SAFETY: as above (lifted before any assertion, so that a failure here does not starve the other tests).
    unsafe { (hooks.set_alloc_limit)(u64::MAX) };
    let err = loaded.err().expect("loading past the allocation limit must fail");
    assert!(err.to_string().contains("aclrtMalloc"), "unexpected error: {err}");
    device.trim_pool().unwrap();

    // An operator failing mid-step: the step errors, the next step works and matches a clean run.
    let mut m =
        Transformer::new(AscendBackend::with_device(device.clone(), DType::F16).unwrap(), config, &weights, cache)
            .unwrap();
    let prompt = common::random_prompt(300, 7, 5);
    let clean = m.forward(&prompt, 7, &[0], &[7]).unwrap();
    // SAFETY: a NUL-terminated static string; the hook copies it.
    unsafe { (hooks.set_failing_op)(c"aclnnRmsNorm".as_ptr()) };
    let err = m.forward(&prompt, 7, &[0], &[7]).unwrap_err();
    // SAFETY: null clears the failing operator.
    unsafe { (hooks.set_failing_op)(std::ptr::null()) };
    assert!(err.to_string().contains("aclnnRmsNorm"), "unexpected error: {err}");
    let again = m.forward(&prompt, 7, &[0], &[7]).unwrap();
    assert_eq!(relative_error(&again, &clean).unwrap(), 0.0, "the step after a fault differs from a clean one");

    // Out of device memory in the middle of a step (the pool's cache trimmed so that the step must allocate).
    device.trim_pool().unwrap();
    // SAFETY: simulator hooks taking and returning plain values.
    let live = unsafe { (hooks.live_device_bytes)() };
    // SAFETY: as above.
    unsafe { (hooks.set_alloc_limit)(live + 4096) };
    let stepped = m.forward(&prompt, 7, &[0], &[7]);
    // SAFETY: as above.
    unsafe { (hooks.set_alloc_limit)(u64::MAX) };
    let err = stepped.expect_err("a step past the allocation limit must fail");
    assert!(err.to_string().contains("aclrtMalloc"), "unexpected error: {err}");
    let again = m.forward(&prompt, 7, &[0], &[7]).unwrap();
    assert_eq!(relative_error(&again, &clean).unwrap(), 0.0, "the step after a failed allocation differs");
    drop(m);
    device.trim_pool().unwrap();
    assert_eq!(device.pool_stats().live_bytes, live_before.live_bytes, "device memory leaked after the faults");
}

#[test]
fn npu_without_cann_names_what_was_searched() {
    let _serial = serial();
    // The default loader in a child process with no simulator selected and an empty toolkit root.
    if std::env::var_os("CANDLE_ASCEND_TEST_CHILD").is_some() {
        let err = candle_ascend_llm::Model::load(&known_model("smollm2-135m-instruct"), "npu:0", Default::default())
            .err()
            .expect("npu:0 without CANN must fail");
        let msg = format!("{err:#}");
        assert!(msg.contains("searched") && msg.contains("/nowhere/lib64"), "unexpected error: {msg}");
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "npu_without_cann_names_what_was_searched", "--nocapture"])
        .env("CANDLE_ASCEND_TEST_CHILD", "1")
        .env_remove("CANDLE_ASCEND_SIM")
        .env_remove("CANDLE_ASCEND_CANN_LIB_DIR")
        .env_remove("ASCEND_HOME_PATH")
        .env("ASCEND_TOOLKIT_HOME", "/nowhere")
        .output()
        .unwrap();
    assert!(out.status.success(), "child failed:\n{}", String::from_utf8_lossy(&out.stdout));
}
