//! The quantization configuration: MindFormers' `quantization_config` fields plus our
//! `float_layers`, stored as the `quantization_config` object of an HF `config.json`.
//!
//! ```json
//! "quantization_config": {
//!   "quant_method": "smooth_quant", "weight_dtype": "int8", "activation_dtype": "int8",
//!   "kvcache_dtype": "int8", "outliers_suppression": "smooth",
//!   "modules_to_not_convert": [], "algorithm_args": {"alpha": 0.8}, "float_layers": [],
//!   "per_token_modules": ["gate_proj", "up_proj", "down_proj"], "per_token_hadamard": 512
//! }
//! ```
//!
//! `float_layers`, `per_token_modules` and `per_token_hadamard` are this engine's additions.
//! The lm_head, when converted (not in `modules_to_not_convert`), always gets int8 weights with
//! float activations (W8A16): its input range is not calibrated.
//!
//! Missing fields take the defaults of [`QuantConfig`]'s fields; `null` dtypes mean float and
//! a `null` outlier suppression means none (MindFormers writes `None` for "not quantized").
//! Unknown fields are **rejected**, not preserved: a field this engine does not implement
//! (a MindFormers option for another algorithm, or a typo) would otherwise be ignored
//! silently and the model would run with a quantization other than the one written down.
//! `algorithm_args` is the one open-ended object: it is kept as given and read through
//! typed accessors.

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};
use std::fmt;

/// The algorithm that produced (or will produce) the quantized weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuantMethod {
    /// Round-to-nearest weights, no calibration: weight-only (W8A16).
    Rtn,
    /// SmoothQuant: outliers migrated from activations into weights, then static int8
    /// activations calibrated on sample prompts.
    SmoothQuant,
    /// Generic post-training quantization with calibration (e.g. int8 KV cache only).
    Ptq,
}

impl QuantMethod {
    pub fn name(self) -> &'static str {
        match self {
            Self::Rtn => "rtn",
            Self::SmoothQuant => "smooth_quant",
            Self::Ptq => "ptq",
        }
    }
}

/// The storage type of weights, activations or KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuantDtype {
    Int8,
    /// Not quantized: the model's float dtype.
    #[default]
    Float,
}

impl QuantDtype {
    pub fn name(self) -> &'static str {
        match self {
            Self::Int8 => "int8",
            Self::Float => "float",
        }
    }
}

/// How activation outliers are handled before quantization.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutliersSuppression {
    #[default]
    None,
    /// SmoothQuant per-input-channel smoothing, folded into the preceding norm and weights.
    Smooth,
}

/// Errors of a quantization configuration; each message names the offending field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum QuantConfigError {
    #[error("empty quantization preset name; valid presets: {valid}", valid = QuantConfig::PRESETS.join(", "))]
    EmptyPresetName,
    #[error("unknown quantization preset `{0}`; valid presets: {valid}", valid = QuantConfig::PRESETS.join(", "))]
    UnknownPreset(String),
    #[error(
        "activation_dtype int8 needs weight_dtype int8 (int8 x int8 matmul); \
         float weights with int8 activations are not supported"
    )]
    ActivationsWithoutWeights,
    #[error(
        "outliers_suppression `smooth` needs quant_method smooth_quant (or ptq), not rtn: \
         smoothing factors come from calibrated activation ranges"
    )]
    SmoothWithRtn,
    #[error("quant_method smooth_quant needs outliers_suppression `smooth`")]
    SmoothQuantWithoutSmoothing,
    #[error(
        "quant_method rtn is weight-only: activation_dtype int8 needs calibrated scales \
         (use quant_method smooth_quant or ptq)"
    )]
    RtnActivations,
    #[error(
        "quant_method rtn cannot make an int8 KV cache: its scales are calibrated \
         (use quant_method smooth_quant or ptq)"
    )]
    RtnKvCache,
    #[error("the configuration quantizes nothing: weight_dtype, activation_dtype and kvcache_dtype are all float")]
    NothingQuantized,
    #[error("algorithm_args.alpha must be a number strictly between 0 and 1, got {0}")]
    Alpha(String),
    #[error("algorithm_args.{name} must be {expected}, got {got}")]
    AlgorithmArg { name: String, expected: &'static str, got: String },
    #[error("float_layers lists layer {layer}, but the model has {num_layers} layers (0..={})", num_layers.saturating_sub(1))]
    FloatLayerOutOfRange { layer: usize, num_layers: usize },
    #[error("float_layers lists layer {0} more than once")]
    DuplicateFloatLayer(usize),
    #[error("per_token_modules needs activation_dtype int8 (it chooses how int8 activations are quantized)")]
    PerTokenWithoutActivations,
    #[error("per_token_hadamard must be 0 (off) or a power of two >= 2, got {0}")]
    HadamardBlock(usize),
    #[error("per_token_hadamard rotates the inputs of per_token_modules, and that list is empty")]
    HadamardWithoutPerToken,
    #[error("modules_to_not_convert or per_token_modules has an empty module name")]
    EmptyModuleName,
    #[error("invalid quantization_config: {0}")]
    Json(String),
}

impl From<QuantConfigError> for crate::error::ModelError {
    fn from(e: QuantConfigError) -> Self {
        crate::error::ModelError::UnsupportedConfig(e.to_string())
    }
}

/// The quantization of a model (see the module docs for the JSON form).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuantConfig {
    pub quant_method: QuantMethod,
    /// Linear weights (default int8).
    #[serde(default = "int8", deserialize_with = "dtype_or_null")]
    pub weight_dtype: QuantDtype,
    /// Inputs of the quantized linears (default float).
    #[serde(default, deserialize_with = "dtype_or_null")]
    pub activation_dtype: QuantDtype,
    /// KV cache (default float).
    #[serde(default, deserialize_with = "dtype_or_null")]
    pub kvcache_dtype: QuantDtype,
    #[serde(default, deserialize_with = "suppression_or_null")]
    pub outliers_suppression: OutliersSuppression,
    /// Modules kept in float, matched by name or by last path component (default `lm_head`).
    #[serde(default = "default_modules_to_not_convert")]
    pub modules_to_not_convert: Vec<String>,
    /// Algorithm parameters, e.g. `{"alpha": 0.5}` for SmoothQuant.
    #[serde(default)]
    pub algorithm_args: Map<String, Value>,
    /// Decoder layers kept entirely in float (all their linears and KV cache).
    #[serde(default)]
    pub float_layers: Vec<usize>,
    /// Modules (matched like `modules_to_not_convert`) whose int8 activations are quantized
    /// per token at run time (symmetric, `max|x_row| / 127`) instead of with the static
    /// per-tensor parameters: inputs whose outliers move from token to token, like the MLP
    /// down projection's. Needs int8 activations.
    #[serde(default)]
    pub per_token_modules: Vec<String>,
    /// Largest block of the Hadamard rotation applied to the per-token modules' inputs and
    /// weights (`x W^T = (x H)(W H)^T`, H block diagonal; per linear the block is the largest
    /// power of two at most this dividing its input width); 0 = no rotation. Spreads the few
    /// huge channels of a token over a block so that its int8 scale fits the rest.
    #[serde(default)]
    pub per_token_hadamard: usize,
}

fn int8() -> QuantDtype {
    QuantDtype::Int8
}

fn default_modules_to_not_convert() -> Vec<String> {
    vec!["lm_head".to_string()]
}

fn dtype_or_null<'de, D: Deserializer<'de>>(d: D) -> Result<QuantDtype, D::Error> {
    Ok(Option::<QuantDtype>::deserialize(d)?.unwrap_or(QuantDtype::Float))
}

fn suppression_or_null<'de, D: Deserializer<'de>>(d: D) -> Result<OutliersSuppression, D::Error> {
    Ok(Option::<OutliersSuppression>::deserialize(d)?.unwrap_or(OutliersSuppression::None))
}

/// The presets' `per_token_hadamard` (measured on SmolLM2 with per-token down_proj: top-1
/// agreement 93.3% unrotated, 94.3% with blocks of 64, 94.6% with 512).
pub const DEFAULT_PER_TOKEN_HADAMARD: usize = 512;

/// SmoothQuant's migration strength when `algorithm_args` has no `alpha`.
pub const DEFAULT_SMOOTH_ALPHA: f64 = 0.8;

impl QuantConfig {
    /// Names accepted by [`preset`](Self::preset).
    pub const PRESETS: [&'static str; 4] = ["a8w8c8", "a8w8", "w8a16", "c8"];

    /// A named configuration (case-insensitive):
    /// - `a8w8c8`: smooth_quant, int8 weights, activations and KV cache; attention linears
    ///   with static per-tensor activations after smoothing (alpha 0.8); the MLP linears with
    ///   per-token activations rotated by Hadamard blocks of up to 512; lm_head int8
    ///   weight-only;
    /// - `a8w8`: the same with a float KV cache;
    /// - `w8a16`: rtn, int8 weights only (lm_head float, MindFormers' default);
    /// - `c8`: ptq, int8 KV cache only, float linears.
    pub fn preset(name: &str) -> Result<Self, QuantConfigError> {
        let key = name.trim().to_ascii_lowercase();
        let base = Self {
            quant_method: QuantMethod::SmoothQuant,
            weight_dtype: QuantDtype::Int8,
            activation_dtype: QuantDtype::Int8,
            kvcache_dtype: QuantDtype::Int8,
            outliers_suppression: OutliersSuppression::Smooth,
            modules_to_not_convert: Vec::new(),
            algorithm_args: Map::from_iter([("alpha".to_string(), Value::from(DEFAULT_SMOOTH_ALPHA))]),
            float_layers: Vec::new(),
            per_token_modules: ["gate_proj", "up_proj", "down_proj"].map(String::from).to_vec(),
            per_token_hadamard: DEFAULT_PER_TOKEN_HADAMARD,
        };
        match key.as_str() {
            "" => Err(QuantConfigError::EmptyPresetName),
            "a8w8c8" => Ok(base),
            "a8w8" => Ok(Self { kvcache_dtype: QuantDtype::Float, ..base }),
            "w8a16" => Ok(Self {
                quant_method: QuantMethod::Rtn,
                activation_dtype: QuantDtype::Float,
                kvcache_dtype: QuantDtype::Float,
                outliers_suppression: OutliersSuppression::None,
                modules_to_not_convert: default_modules_to_not_convert(),
                algorithm_args: Map::new(),
                per_token_modules: Vec::new(),
                per_token_hadamard: 0,
                ..base
            }),
            "c8" => Ok(Self {
                quant_method: QuantMethod::Ptq,
                weight_dtype: QuantDtype::Float,
                activation_dtype: QuantDtype::Float,
                outliers_suppression: OutliersSuppression::None,
                modules_to_not_convert: default_modules_to_not_convert(),
                algorithm_args: Map::new(),
                per_token_modules: Vec::new(),
                per_token_hadamard: 0,
                ..base
            }),
            _ => Err(QuantConfigError::UnknownPreset(name.to_string())),
        }
    }

    /// A command-line `--quantize` value: a preset name, or the path of a JSON file holding a
    /// `quantization_config` object (or a whole HF `config.json` with one), for configurations
    /// no preset covers (say, a preset with `float_layers` or another `alpha`).
    pub fn from_arg(arg: &str) -> Result<Self, QuantConfigError> {
        let path = std::path::Path::new(arg.trim());
        let looks_like_file = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("json"));
        if !looks_like_file {
            return Self::preset(arg);
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| QuantConfigError::Json(format!("reading {}: {e}", path.display())))?;
        let value: Value =
            serde_json::from_str(&text).map_err(|e| QuantConfigError::Json(format!("{}: {e}", path.display())))?;
        let object = value.get("quantization_config").unwrap_or(&value);
        Self::from_json(object).map_err(|e| match e {
            QuantConfigError::Json(m) => QuantConfigError::Json(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    /// The preset this configuration equals, if any.
    pub fn preset_name(&self) -> Option<&'static str> {
        Self::PRESETS.into_iter().find(|name| Self::preset(name).is_ok_and(|p| &p == self))
    }

    /// Rejects combinations this engine cannot run (see [`QuantConfigError`]).
    pub fn validate(&self) -> Result<(), QuantConfigError> {
        let int8 = |d: QuantDtype| d == QuantDtype::Int8;
        if self.activation_dtype == QuantDtype::Int8 && !int8(self.weight_dtype) {
            return Err(QuantConfigError::ActivationsWithoutWeights);
        }
        if !int8(self.weight_dtype) && !int8(self.activation_dtype) && !int8(self.kvcache_dtype) {
            return Err(QuantConfigError::NothingQuantized);
        }
        let smooth = self.outliers_suppression == OutliersSuppression::Smooth;
        match self.quant_method {
            QuantMethod::Rtn if smooth => return Err(QuantConfigError::SmoothWithRtn),
            QuantMethod::Rtn if int8(self.activation_dtype) => return Err(QuantConfigError::RtnActivations),
            QuantMethod::Rtn if int8(self.kvcache_dtype) => return Err(QuantConfigError::RtnKvCache),
            QuantMethod::SmoothQuant if !smooth => return Err(QuantConfigError::SmoothQuantWithoutSmoothing),
            _ => {}
        }
        if let Some(alpha) = self.algorithm_args.get("alpha") {
            match alpha.as_f64() {
                Some(a) if a > 0.0 && a < 1.0 => {}
                _ => return Err(QuantConfigError::Alpha(alpha.to_string())),
            }
        }
        if !self.per_token_modules.is_empty() && self.activation_dtype != QuantDtype::Int8 {
            return Err(QuantConfigError::PerTokenWithoutActivations);
        }
        if self.per_token_hadamard != 0 && (self.per_token_hadamard < 2 || !self.per_token_hadamard.is_power_of_two()) {
            return Err(QuantConfigError::HadamardBlock(self.per_token_hadamard));
        }
        if self.per_token_hadamard != 0 && self.per_token_modules.is_empty() {
            return Err(QuantConfigError::HadamardWithoutPerToken);
        }
        if self.modules_to_not_convert.iter().chain(&self.per_token_modules).any(|m| m.trim().is_empty()) {
            return Err(QuantConfigError::EmptyModuleName);
        }
        let mut seen = std::collections::BTreeSet::new();
        if let Some(&dup) = self.float_layers.iter().find(|&&l| !seen.insert(l)) {
            return Err(QuantConfigError::DuplicateFloatLayer(dup));
        }
        Ok(())
    }

    /// [`validate`](Self::validate) plus checks against a model with `num_layers` decoder layers.
    pub fn validate_for(&self, num_layers: usize) -> Result<(), QuantConfigError> {
        self.validate()?;
        if let Some(&layer) = self.float_layers.iter().find(|&&l| l >= num_layers) {
            return Err(QuantConfigError::FloatLayerOutOfRange { layer, num_layers });
        }
        Ok(())
    }

    /// SmoothQuant's alpha: `algorithm_args.alpha`, or [`DEFAULT_SMOOTH_ALPHA`] when absent.
    pub fn smooth_alpha(&self) -> Result<f64, QuantConfigError> {
        Ok(self.algorithm_arg_f64("alpha")?.unwrap_or(DEFAULT_SMOOTH_ALPHA))
    }

    /// `algorithm_args[name]` as a number; `None` when absent, an error when not a number.
    pub fn algorithm_arg_f64(&self, name: &str) -> Result<Option<f64>, QuantConfigError> {
        self.algorithm_arg(name, "a number", Value::as_f64)
    }

    /// `algorithm_args[name]` as a non-negative integer.
    pub fn algorithm_arg_usize(&self, name: &str) -> Result<Option<usize>, QuantConfigError> {
        self.algorithm_arg(name, "a non-negative integer", |v| v.as_u64().and_then(|u| usize::try_from(u).ok()))
    }

    /// `algorithm_args[name]` as a boolean.
    pub fn algorithm_arg_bool(&self, name: &str) -> Result<Option<bool>, QuantConfigError> {
        self.algorithm_arg(name, "true or false", Value::as_bool)
    }

    /// `algorithm_args[name]` as a string.
    pub fn algorithm_arg_str(&self, name: &str) -> Result<Option<&str>, QuantConfigError> {
        self.algorithm_arg(name, "a string", Value::as_str)
    }

    fn algorithm_arg<'a, T>(
        &'a self,
        name: &str,
        expected: &'static str,
        read: impl FnOnce(&'a Value) -> Option<T>,
    ) -> Result<Option<T>, QuantConfigError> {
        match self.algorithm_args.get(name) {
            None => Ok(None),
            Some(v) => read(v).map(Some).ok_or_else(|| QuantConfigError::AlgorithmArg {
                name: name.to_string(),
                expected,
                got: v.to_string(),
            }),
        }
    }

    /// Whether decoder layer `layer` is quantized (not listed in `float_layers`).
    pub fn quantizes_layer(&self, layer: usize) -> bool {
        !self.float_layers.contains(&layer)
    }

    /// Whether module `name` (e.g. `lm_head` or `model.layers.3.mlp.down_proj`) is converted:
    /// false when an entry of `modules_to_not_convert` equals the name, or equals one of its
    /// dot-separated suffixes (`down_proj` or `mlp.down_proj` both keep it in float).
    pub fn converts_module(&self, name: &str) -> bool {
        !matches_any(&self.modules_to_not_convert, name)
    }

    /// Whether module `name`'s int8 activations are quantized per token (`per_token_modules`,
    /// matched like [`converts_module`](Self::converts_module)).
    pub fn per_token_module(&self, name: &str) -> bool {
        matches_any(&self.per_token_modules, name)
    }

    /// Parses and validates a `quantization_config` object.
    pub fn from_json(value: &Value) -> Result<Self, QuantConfigError> {
        let config: Self = serde_json::from_value(value.clone()).map_err(|e| QuantConfigError::Json(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Reads the `quantization_config` of an HF `config.json` (parsed); `None` when absent or
    /// `null` (a float model).
    pub fn from_hf_config(config: &Value) -> Result<Option<Self>, QuantConfigError> {
        match config.get("quantization_config") {
            None | Some(Value::Null) => Ok(None),
            Some(v) => Self::from_json(v).map(Some),
        }
    }

    /// Like [`from_hf_config`](Self::from_hf_config) on the text of a `config.json`.
    pub fn from_hf_config_str(text: &str) -> Result<Option<Self>, QuantConfigError> {
        let value: Value = serde_json::from_str(text).map_err(|e| QuantConfigError::Json(e.to_string()))?;
        Self::from_hf_config(&value)
    }

    /// The `quantization_config` object (every field written, defaults included).
    pub fn to_json(&self) -> Value {
        // Serializing plain enums, strings, numbers and a JSON map cannot fail.
        serde_json::to_value(self).unwrap_or(Value::Null)
    }

    /// Sets (or replaces) `quantization_config` in an HF `config.json` object, leaving its
    /// other fields alone.
    pub fn write_into_hf_config(&self, config: &mut Value) -> Result<(), QuantConfigError> {
        match config.as_object_mut() {
            Some(obj) => {
                obj.insert("quantization_config".to_string(), self.to_json());
                Ok(())
            }
            None => Err(QuantConfigError::Json("config.json must be a JSON object".to_string())),
        }
    }
}

/// Whether an entry of `patterns` equals `name` or one of its dot-separated suffixes.
fn matches_any(patterns: &[String], name: &str) -> bool {
    patterns.iter().any(|m| name == m || name.strip_suffix(m.as_str()).is_some_and(|head| head.ends_with('.')))
}

/// One line, e.g. `a8w8c8: smooth_quant, weights int8, activations int8, kv cache int8,
/// outliers smooth (alpha 0.8), float modules [lm_head], float layers []`.
impl fmt::Display for QuantConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.preset_name().unwrap_or("custom"), self.quant_method.name())?;
        write!(
            f,
            ", weights {}, activations {}, kv cache {}",
            self.weight_dtype.name(),
            self.activation_dtype.name(),
            self.kvcache_dtype.name()
        )?;
        match self.outliers_suppression {
            OutliersSuppression::None => write!(f, ", outliers none")?,
            OutliersSuppression::Smooth => match self.smooth_alpha() {
                Ok(alpha) => write!(f, ", outliers smooth (alpha {alpha})")?,
                Err(_) => write!(f, ", outliers smooth (alpha invalid)")?,
            },
        }
        write!(f, ", float modules [{}]", self.modules_to_not_convert.join(", "))?;
        let layers: Vec<String> = self.float_layers.iter().map(|l| l.to_string()).collect();
        write!(f, ", float layers [{}]", layers.join(", "))?;
        if !self.per_token_modules.is_empty() {
            write!(f, ", per-token activations [{}]", self.per_token_modules.join(", "))?;
        }
        if self.per_token_hadamard != 0 {
            write!(f, " rotated (Hadamard blocks <= {})", self.per_token_hadamard)?;
        }
        Ok(())
    }
}
