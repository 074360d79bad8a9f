//! Quantization at load on random-weight models (W8A16, A8W8, A8W8C8, C8): close to the float
//! model, honouring float layers and the modules kept in float, with a quarter of the weight
//! bytes and half the f16 KV-cache bytes; schemes missing their calibration are clear errors.

mod common;

use candle_ascend_models::quant::{QuantConfig, calibrate};
use candle_ascend_models::{Architecture, CacheConfig, CpuBackend, ModelConfig, ModelError, Transformer};
use candle_core::DType;

fn config() -> ModelConfig {
    ModelConfig {
        architecture: Architecture::Qwen2,
        vocab_size: 256,
        hidden_size: 256,
        intermediate_size: 512,
        num_layers: 3,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 64,
        rms_norm_eps: 1e-6,
        rope_theta: 1_000_000.0,
        max_position_embeddings: 256,
        tie_word_embeddings: false,
        attention_bias: true,
        bos_token_id: None,
        eos_token_ids: vec![],
    }
}

fn build(quant: Option<&QuantConfig>) -> Result<Transformer<CpuBackend>, ModelError> {
    let cfg = config();
    let weights = candle_ascend_models::random::random_weights(&cfg, 21)?;
    let cache = CacheConfig { max_batch: 1, max_seq_len: 64 };
    Transformer::new_quantized(CpuBackend::new(DType::F32)?, cfg, &weights, cache, quant)
}

#[test]
fn w8a16_tracks_the_float_model_with_a_quarter_of_the_bytes() {
    let mut float = build(None).unwrap();
    let w8a16 = QuantConfig::preset("w8a16").unwrap();
    let mut quant = build(Some(&w8a16)).unwrap();
    let prompt = common::random_prompt(256, 12, 9);
    let a = float.forward(&prompt, prompt.len(), &[0], &[prompt.len()]).unwrap();
    let b = quant.forward(&prompt, prompt.len(), &[0], &[prompt.len()]).unwrap();
    let rel = common::relative_error(&b, &a).unwrap();
    assert!(rel > 0.0 && rel < 2e-2, "W8A16 logits relative error {rel}");
    let (top_float, _) = common::top_two(&a.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    let (top_quant, _) = common::top_two(&b.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    assert_eq!(top_float, top_quant);
    // lm_head stays f32 (modules_to_not_convert); every decoder linear is int8.
    let lm_head = 256 * 256 * 4;
    let (fb, qb) = (float.weight_bytes_per_token() - lm_head, quant.weight_bytes_per_token() - lm_head);
    assert!(qb * 4 <= fb + fb / 50, "int8 decoder weights {qb} B vs f32 {fb} B");
}

/// An untied model whose lm_head has int8 weights keeps its embedding table as int8 rows too (one
/// scale per row): every weight it holds is at most 30% of the f32 model's, and it still tracks it.
#[test]
fn an_untied_model_with_an_int8_lm_head_holds_an_int8_embedding_table() {
    let mut float = build(None).unwrap();
    let mut all_int8 = QuantConfig::preset("w8a16").unwrap();
    all_int8.modules_to_not_convert.clear();
    let mut quant = build(Some(&all_int8)).unwrap();
    let (fb, qb) = (float.resident_weight_bytes(), quant.resident_weight_bytes());
    assert_eq!(fb - float.weight_bytes_per_token(), 256 * 256 * 4, "the f32 table is counted");
    assert_eq!(qb - quant.weight_bytes_per_token(), 256 * 256, "int8 rows (the per-row scales are not counted)");
    assert!(qb * 10 <= fb * 3, "held weights {qb} B vs f32 {fb} B");
    let prompt = common::random_prompt(256, 12, 5);
    let a = float.forward(&prompt, prompt.len(), &[0], &[prompt.len()]).unwrap();
    let b = quant.forward(&prompt, prompt.len(), &[0], &[prompt.len()]).unwrap();
    let rel = common::relative_error(&b, &a).unwrap();
    assert!(rel > 0.0 && rel < 2e-2, "logits relative error {rel}");
    let (top_float, _) = common::top_two(&a.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    let (top_quant, _) = common::top_two(&b.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    assert_eq!(top_float, top_quant);
}

#[test]
fn float_layers_and_unconverted_modules_stay_exact() {
    let mut float = build(None).unwrap();
    let mut all_float = QuantConfig::preset("w8a16").unwrap();
    all_float.float_layers = vec![0, 1, 2];
    let mut kept = build(Some(&all_float)).unwrap();
    let prompt = common::random_prompt(256, 7, 3);
    let a = float.forward(&prompt, prompt.len(), &[0], &[prompt.len()]).unwrap();
    let b = kept.forward(&prompt, prompt.len(), &[0], &[prompt.len()]).unwrap();
    assert_eq!(common::relative_error(&b, &a).unwrap(), 0.0, "float layers must run the float kernels");

    let mut no_mlp = QuantConfig::preset("w8a16").unwrap();
    no_mlp.modules_to_not_convert = vec!["lm_head".into(), "mlp.down_proj".into(), "gate_proj".into()];
    let partial = build(Some(&no_mlp)).unwrap();
    let full = build(Some(&QuantConfig::preset("w8a16").unwrap())).unwrap();
    assert!(partial.weight_bytes_per_token() > full.weight_bytes_per_token());
    assert!(partial.weight_bytes_per_token() < float.weight_bytes_per_token());
}

#[test]
fn a8w8_with_calibration_tracks_the_float_model() {
    let cfg = config();
    let weights = candle_ascend_models::random::random_weights(&cfg, 21).unwrap();
    let calib_data: Vec<Vec<u32>> = (0..4).map(|i| common::random_prompt(256, 48, 100 + i)).collect();
    let calibration = calibrate(&cfg, &weights, &calib_data).unwrap();
    assert_eq!(calibration.layers.len(), 3);
    assert_eq!(calibration.tokens, 4 * 48);
    let prompt = common::random_prompt(256, 12, 9);
    let mut float = build(None).unwrap();
    let reference = float.forward(&prompt, prompt.len(), &[0], &[prompt.len()]).unwrap();
    let mut ptq = QuantConfig::preset("a8w8").unwrap();
    for (name, q) in [
        ("a8w8 (smooth_quant)", QuantConfig::preset("a8w8").unwrap()),
        ("a8w8 without smoothing", {
            ptq.quant_method = candle_ascend_models::quant::QuantMethod::Ptq;
            ptq.outliers_suppression = candle_ascend_models::quant::OutliersSuppression::None;
            ptq.clone()
        }),
    ] {
        let cache = CacheConfig { max_batch: 1, max_seq_len: 64 };
        let mut m = Transformer::new_calibrated(
            CpuBackend::new(DType::F32).unwrap(),
            cfg.clone(),
            &weights,
            cache,
            Some(&q),
            Some(&calibration),
        )
        .unwrap();
        let got = m.forward(&prompt, prompt.len(), &[0], &[prompt.len()]).unwrap();
        let rel = common::relative_error(&got, &reference).unwrap();
        eprintln!("{name}: logits relative error {rel:.3e} against f32");
        assert!(rel > 0.0 && rel < 0.1, "{name}: logits relative error {rel}");
        let (a, _) = common::top_two(&got.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        let (b, _) = common::top_two(&reference.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        assert_eq!(a, b, "{name}: top-1 differs from float");
        // int8 weights: at most ~30% of the f32 decoder bytes (lm_head kept in f32 excluded).
        let lm_head = 256 * 256 * 4;
        assert!((m.weight_bytes_per_token() - lm_head) * 10 <= (float.weight_bytes_per_token() - lm_head) * 3);
    }
}

#[test]
fn calibration_rejects_too_little_data() {
    let cfg = config();
    let weights = candle_ascend_models::random::random_weights(&cfg, 21).unwrap();
    assert!(calibrate(&cfg, &weights, &[]).is_err());
    let err = calibrate(&cfg, &weights, &[vec![1, 2, 3]]).unwrap_err();
    assert!(err.to_string().contains("at least 16 tokens"), "{err}");
}

#[test]
fn schemes_needing_calibration_or_bad_layers_are_rejected() {
    for preset in ["a8w8c8", "a8w8", "c8"] {
        let err = build(Some(&QuantConfig::preset(preset).unwrap())).err().expect("must need calibration");
        assert!(err.to_string().contains("calibrat"), "{preset}: {err}");
    }
    let mut bad = QuantConfig::preset("w8a16").unwrap();
    bad.float_layers = vec![7];
    let err = build(Some(&bad)).err().expect("float layer 7 of 3 must be rejected");
    assert!(matches!(err, ModelError::UnsupportedConfig(_)), "{err}");
}

#[test]
fn an_empty_modules_to_not_convert_quantizes_lm_head_too() {
    let mut all = QuantConfig::preset("w8a16").unwrap();
    all.modules_to_not_convert.clear();
    let everything = build(Some(&all)).unwrap();
    let default = build(Some(&QuantConfig::preset("w8a16").unwrap())).unwrap();
    // lm_head (256 x 256) goes from f32 to int8 weights.
    assert!(everything.weight_bytes_per_token() + 3 * 256 * 256 <= default.weight_bytes_per_token() + 256 * 64);
}

/// A model quantized with `preset`, calibrated on 16 random prompts of 48 tokens. (A random
/// model's keys and values have no per-channel structure, so values outside the calibrated
/// ranges are common and clipped; more data keeps that small.)
fn calibrated(preset: &str, dtype: DType) -> Transformer<CpuBackend> {
    let cfg = config();
    let weights = candle_ascend_models::random::random_weights(&cfg, 21).unwrap();
    let calib_data: Vec<Vec<u32>> = (0..16).map(|i| common::random_prompt(256, 48, 100 + i)).collect();
    let calibration = calibrate(&cfg, &weights, &calib_data).unwrap();
    assert_eq!(calibration.kv.len(), 3);
    let cache = CacheConfig { max_batch: 2, max_seq_len: 64 };
    let q = QuantConfig::preset(preset).unwrap();
    Transformer::new_calibrated(CpuBackend::new(dtype).unwrap(), cfg, &weights, cache, Some(&q), Some(&calibration))
        .unwrap()
}

#[test]
fn int8_kv_cache_tracks_the_float_model_through_prefill_and_decode() {
    let cfg = config();
    let weights = candle_ascend_models::random::random_weights(&cfg, 21).unwrap();
    let cache = CacheConfig { max_batch: 2, max_seq_len: 64 };
    let mut float = Transformer::new(CpuBackend::new(DType::F32).unwrap(), cfg, &weights, cache).unwrap();
    for (preset, limit) in [("c8", 0.05), ("a8w8c8", 0.1)] {
        let mut quant = calibrated(preset, DType::F32);
        // A ragged batch: prefill, then three decode steps, compared at every step.
        let prompts = [common::random_prompt(256, 10, 5), common::random_prompt(256, 6, 6)];
        let mut ids = vec![0u32; 20];
        ids[..10].copy_from_slice(&prompts[0]);
        ids[10..16].copy_from_slice(&prompts[1]);
        let (mut start, lens) = (vec![0usize, 0], vec![10usize, 6]);
        let a = float.forward(&ids, 10, &start, &lens).unwrap();
        let b = quant.forward(&ids, 10, &start, &lens).unwrap();
        let mut worst = common::relative_error(&b, &a).unwrap();
        eprintln!("{preset} prefill: {worst:.3e}");
        start = lens.clone();
        for step in 0..3u32 {
            let next = [7 + step, 40 + step];
            let a = float.forward(&next, 1, &start, &[1, 1]).unwrap();
            let b = quant.forward(&next, 1, &start, &[1, 1]).unwrap();
            let e = common::relative_error(&b, &a).unwrap();
            eprintln!("{preset} step {step}: {e:.3e}");
            worst = worst.max(e);
            start.iter_mut().for_each(|s| *s += 1);
        }
        eprintln!("{preset}: worst logits relative error {worst:.3e} over prefill + 3 decode steps");
        assert!(worst > 0.0 && worst < limit, "{preset}: logits relative error {worst}");
    }
}

#[test]
fn int8_kv_cache_is_half_of_an_f16_cache() {
    let f16 = {
        let cfg = config();
        let weights = candle_ascend_models::random::random_weights(&cfg, 21).unwrap();
        let cache = CacheConfig { max_batch: 2, max_seq_len: 64 };
        Transformer::new(CpuBackend::new(DType::F16).unwrap(), cfg, &weights, cache).unwrap()
    };
    let c8 = calibrated("a8w8c8", DType::F32);
    // 3 layers x (K + V) x [2, 64, 2, 64] elements.
    assert_eq!(f16.kv_cache_bytes(), 3 * 2 * 2 * 64 * 2 * 64 * 2);
    assert_eq!(c8.kv_cache_bytes() * 2, f16.kv_cache_bytes());
}
