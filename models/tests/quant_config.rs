//! The quantization configuration: presets, validation messages, JSON round trips through an
//! HF `config.json`.

use candle_ascend_models::quant::{OutliersSuppression, QuantConfig, QuantConfigError, QuantDtype, QuantMethod};
use serde_json::json;

fn err_text(result: Result<impl std::fmt::Debug, QuantConfigError>) -> String {
    match result {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn presets_have_the_documented_fields() {
    use OutliersSuppression::{None as NoSuppression, Smooth};
    use QuantDtype::{Float, Int8};
    let cases = [
        ("a8w8c8", QuantMethod::SmoothQuant, Int8, Int8, Int8, Smooth),
        ("a8w8", QuantMethod::SmoothQuant, Int8, Int8, Float, Smooth),
        ("w8a16", QuantMethod::Rtn, Int8, Float, Float, NoSuppression),
        ("c8", QuantMethod::Ptq, Float, Float, Int8, NoSuppression),
    ];
    for (name, method, weights, activations, kv, suppression) in cases {
        let c = QuantConfig::preset(name).unwrap();
        assert_eq!(c.quant_method, method, "{name}");
        assert_eq!((c.weight_dtype, c.activation_dtype, c.kvcache_dtype), (weights, activations, kv), "{name}");
        assert_eq!(c.outliers_suppression, suppression, "{name}");
        // With int8 activations the lm_head is converted (to W8A16: its input is not calibrated).
        let float_modules: Vec<String> = if activations == Int8 { vec![] } else { vec!["lm_head".to_string()] };
        assert_eq!(c.modules_to_not_convert, float_modules, "{name}");
        assert!(c.float_layers.is_empty(), "{name}");
        let alpha = c.algorithm_arg_f64("alpha").unwrap();
        assert_eq!(alpha, (suppression == Smooth).then_some(0.8), "{name}");
        let per_token: Vec<String> =
            if activations == Int8 { ["gate_proj", "up_proj", "down_proj"].map(String::from).to_vec() } else { vec![] };
        assert_eq!(c.per_token_modules, per_token, "{name}");
        assert_eq!(c.per_token_hadamard, if activations == Int8 { 512 } else { 0 }, "{name}");
        c.validate().unwrap();
        assert_eq!(c.preset_name(), Some(name));
        assert!(c.to_string().starts_with(&format!("{name}: {}", method.name())), "{c}");
    }
    assert_eq!(QuantConfig::preset(" A8W8C8 ").unwrap(), QuantConfig::preset("a8w8c8").unwrap());
    assert_eq!(
        QuantConfig::preset("a8w8c8").unwrap().to_string(),
        "a8w8c8: smooth_quant, weights int8, activations int8, kv cache int8, outliers smooth (alpha 0.8), \
         float modules [], float layers [], per-token activations [gate_proj, up_proj, down_proj] rotated \
         (Hadamard blocks <= 512)"
    );
}

#[test]
fn preset_names_are_checked() {
    assert_eq!(
        err_text(QuantConfig::preset("")),
        "empty quantization preset name; valid presets: a8w8c8, a8w8, w8a16, c8"
    );
    assert_eq!(
        err_text(QuantConfig::preset("w4a16")),
        "unknown quantization preset `w4a16`; valid presets: a8w8c8, a8w8, w8a16, c8"
    );
}

#[test]
fn invalid_combinations_are_rejected_with_clear_messages() {
    let a8w8c8 = QuantConfig::preset("a8w8c8").unwrap();
    let w8a16 = QuantConfig::preset("w8a16").unwrap();
    let cases: Vec<(QuantConfig, &str)> = vec![
        (
            QuantConfig { weight_dtype: QuantDtype::Float, quant_method: QuantMethod::Ptq, ..a8w8c8.clone() },
            "activation_dtype int8 needs weight_dtype int8",
        ),
        (
            QuantConfig { outliers_suppression: OutliersSuppression::Smooth, ..w8a16.clone() },
            "outliers_suppression `smooth` needs quant_method smooth_quant (or ptq), not rtn",
        ),
        (QuantConfig { activation_dtype: QuantDtype::Int8, ..w8a16.clone() }, "quant_method rtn is weight-only"),
        (
            QuantConfig { kvcache_dtype: QuantDtype::Int8, ..w8a16.clone() },
            "quant_method rtn cannot make an int8 KV cache",
        ),
        (
            QuantConfig { outliers_suppression: OutliersSuppression::None, ..a8w8c8.clone() },
            "quant_method smooth_quant needs outliers_suppression `smooth`",
        ),
        (QuantConfig { weight_dtype: QuantDtype::Float, ..w8a16.clone() }, "the configuration quantizes nothing"),
        (QuantConfig { float_layers: vec![2, 5, 2], ..w8a16.clone() }, "float_layers lists layer 2 more than once"),
        (
            QuantConfig { modules_to_not_convert: vec!["lm_head".into(), " ".into()], ..w8a16.clone() },
            "modules_to_not_convert or per_token_modules has an empty module name",
        ),
    ];
    for (config, message) in cases {
        let text = err_text(config.validate());
        assert!(text.starts_with(message), "`{text}` should start with `{message}`");
    }
    for alpha in [json!(0.0), json!(1.0), json!(-0.2), json!(1.5), json!("half")] {
        let mut c = a8w8c8.clone();
        c.algorithm_args.insert("alpha".into(), alpha.clone());
        assert_eq!(
            err_text(c.validate()),
            format!("algorithm_args.alpha must be a number strictly between 0 and 1, got {alpha}")
        );
    }
    let mut c = a8w8c8.clone();
    c.algorithm_args.insert("alpha".into(), json!(0.85));
    c.validate().unwrap();
    assert_eq!(c.smooth_alpha().unwrap(), 0.85);
}

#[test]
fn float_layers_are_checked_against_the_model() {
    let c = QuantConfig { float_layers: vec![0, 29], ..QuantConfig::preset("a8w8c8").unwrap() };
    c.validate_for(30).unwrap();
    assert_eq!(err_text(c.validate_for(24)), "float_layers lists layer 29, but the model has 24 layers (0..=23)");
    assert!(!c.quantizes_layer(29) && c.quantizes_layer(1));
    assert!(c.to_string().contains("float layers [0, 29], per-token activations [gate_proj"), "{c}");
    assert!(c.to_string().starts_with("custom: "), "{c}");
}

#[test]
fn algorithm_args_have_typed_accessors() {
    let mut c = QuantConfig::preset("a8w8").unwrap();
    c.algorithm_args.insert("calibration_samples".into(), json!(128));
    c.algorithm_args.insert("symmetric".into(), json!(true));
    c.algorithm_args.insert("dataset".into(), json!("wikitext"));
    assert_eq!(c.algorithm_arg_usize("calibration_samples").unwrap(), Some(128));
    assert_eq!(c.algorithm_arg_bool("symmetric").unwrap(), Some(true));
    assert_eq!(c.algorithm_arg_str("dataset").unwrap(), Some("wikitext"));
    assert_eq!(c.algorithm_arg_f64("missing").unwrap(), None);
    assert_eq!(
        err_text(c.algorithm_arg_bool("dataset")),
        "algorithm_args.dataset must be true or false, got \"wikitext\""
    );
    assert_eq!(
        err_text(c.algorithm_arg_usize("symmetric")),
        "algorithm_args.symmetric must be a non-negative integer, got true"
    );
}

#[test]
fn modules_to_not_convert_match_names_and_suffixes() {
    let mut c = QuantConfig::preset("w8a16").unwrap();
    assert!(!c.converts_module("lm_head"));
    assert!(c.converts_module("model.layers.0.mlp.down_proj"));
    c.modules_to_not_convert.push("mlp.down_proj".into());
    assert!(!c.converts_module("model.layers.0.mlp.down_proj"));
    assert!(c.converts_module("model.layers.0.mlp.xdown_proj"));
}

#[test]
fn json_round_trips_through_an_hf_config() {
    let mut hf = json!({
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 576,
        "num_hidden_layers": 30
    });
    assert_eq!(QuantConfig::from_hf_config(&hf).unwrap(), None);
    for name in QuantConfig::PRESETS {
        let mut c = QuantConfig::preset(name).unwrap();
        c.float_layers = vec![0, 1];
        c.write_into_hf_config(&mut hf).unwrap();
        assert_eq!(hf["hidden_size"], 576, "other fields untouched");
        let text = serde_json::to_string_pretty(&hf).unwrap();
        let back = QuantConfig::from_hf_config_str(&text).unwrap().unwrap();
        assert_eq!(back, c, "{name}");
    }
    let a8w8c8 = QuantConfig::preset("a8w8c8").unwrap().to_json();
    assert_eq!(
        a8w8c8,
        json!({
            "quant_method": "smooth_quant",
            "weight_dtype": "int8",
            "activation_dtype": "int8",
            "kvcache_dtype": "int8",
            "outliers_suppression": "smooth",
            "modules_to_not_convert": [],
            "algorithm_args": {"alpha": 0.8},
            "float_layers": [],
            "per_token_modules": ["gate_proj", "up_proj", "down_proj"],
            "per_token_hadamard": 512
        })
    );
}

#[test]
fn json_defaults_nulls_and_unknown_fields() {
    // MindFormers style: only some fields, None for float.
    let hf = json!({"quantization_config": {
        "quant_method": "rtn", "activation_dtype": null, "kvcache_dtype": null, "outliers_suppression": null
    }});
    let c = QuantConfig::from_hf_config(&hf).unwrap().unwrap();
    assert_eq!(c, QuantConfig::preset("w8a16").unwrap());
    assert_eq!(QuantConfig::from_hf_config(&json!({"quantization_config": null})).unwrap(), None);
    // Unknown fields are rejected (see the module docs), naming the field.
    let text = err_text(QuantConfig::from_json(&json!({"quant_method": "rtn", "group_size": 128})));
    assert!(text.contains("unknown field `group_size`"), "{text}");
    let text = err_text(QuantConfig::from_json(&json!({"quant_method": "awq"})));
    assert!(text.contains("unknown variant `awq`"), "{text}");
    let text = err_text(QuantConfig::from_json(&json!({"weight_dtype": "int8"})));
    assert!(text.contains("missing field `quant_method`"), "{text}");
    // Parsing validates.
    let text = err_text(QuantConfig::from_json(&json!({"quant_method": "rtn", "outliers_suppression": "smooth"})));
    assert!(text.starts_with("outliers_suppression `smooth` needs"), "{text}");
    assert!(QuantConfig::from_hf_config_str("{not json").is_err());
    let mut not_object = json!([1, 2]);
    assert!(QuantConfig::preset("c8").unwrap().write_into_hf_config(&mut not_object).is_err());
}

#[test]
fn per_token_modules_need_int8_activations() {
    let mut c = QuantConfig::preset("w8a16").unwrap();
    c.per_token_modules = vec!["down_proj".into()];
    assert!(err_text(c.validate()).contains("per_token_modules needs activation_dtype int8"));
    let a8w8 = QuantConfig::preset("a8w8").unwrap();
    assert!(a8w8.per_token_module("model.layers.3.mlp.down_proj"));
    assert!(a8w8.per_token_module("model.layers.3.mlp.up_proj"));
    assert!(!a8w8.per_token_module("model.layers.3.self_attn.q_proj"));
}

#[test]
fn hadamard_rotation_is_checked() {
    let a8w8c8 = QuantConfig::preset("a8w8c8").unwrap();
    for bad in [1, 3, 48, 1000] {
        let c = QuantConfig { per_token_hadamard: bad, ..a8w8c8.clone() };
        assert_eq!(
            err_text(c.validate()),
            format!("per_token_hadamard must be 0 (off) or a power of two >= 2, got {bad}")
        );
    }
    let c = QuantConfig { per_token_modules: vec![], ..a8w8c8.clone() };
    assert!(err_text(c.validate()).starts_with("per_token_hadamard rotates the inputs of per_token_modules"));
    QuantConfig { per_token_hadamard: 0, ..a8w8c8.clone() }.validate().unwrap();
    QuantConfig { per_token_hadamard: 64, ..a8w8c8 }.validate().unwrap();
    // Absent from JSON: no rotation.
    let c = QuantConfig::from_json(&json!({"quant_method": "smooth_quant", "activation_dtype": "int8",
        "outliers_suppression": "smooth", "per_token_modules": ["down_proj"]}))
    .unwrap();
    assert_eq!(c.per_token_hadamard, 0);
}
