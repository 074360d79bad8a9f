//! # candle-ascend-llm
//!
//! Run llama and qwen2 checkpoints with candle: a fixed KV cache, fused attention and fused
//! norms, on the CPU today and on Ascend NPUs through the same API (`npu:N`) as that backend
//! lands. Applications keep exchanging ordinary host `candle_core::Tensor`s: token ids in,
//! logits out.
//!
//! ```no_run
//! use candle_ascend_llm::{Model, ModelOptions, SamplingConfig};
//!
//! # fn main() -> anyhow::Result<()> {
//! // A GGUF file or an HF folder; `candle_ascend_llm::fetch` resolves known model names.
//! let path = candle_ascend_llm::fetch::resolve_model(None, "smollm2-135m-instruct", None)?;
//! let mut model = Model::load(&path, "cpu", ModelOptions::default())?;
//! let answer = model.chat("What is the capital of France?", &SamplingConfig::greedy(16))?;
//! println!("{answer}");
//! # Ok(()) }
//! ```
//!
//! The runnable example of this API, on a small random-weight model, is the doc test of
//! [`Model::from_weights`].

use anyhow::{Context, Result, bail};
#[cfg(feature = "ascend")]
use candle_ascend_models::backend::AscendBackend;
use candle_ascend_models::backend::CpuBackend;
use candle_ascend_models::loader::{Checkpoint, TokenizerBundle, Weights, load_checkpoint, load_hf_tokenizer};
pub use candle_ascend_models::quant::QuantConfig;
use candle_ascend_models::quant::{
    Calibration, DEFAULT_CALIBRATION_TOKENS, QuantDtype, calibrate, calibration_sequences, checkpoint,
};
pub use candle_ascend_models::random::random_weights;
pub use candle_ascend_models::{
    Architecture, CacheConfig, GenerationOutput, ModelConfig, SamplingConfig, chat, fetch, loader,
};
use candle_ascend_models::{Transformer, generate};
pub use candle_core::DType;
use candle_core::Tensor;
use std::path::Path;
use std::str::FromStr;

/// Where a model runs, parsed from `cpu`, `npu:N` or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    /// Ascend NPU number N.
    Npu(usize),
    /// NVIDIA GPU number N.
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim().to_ascii_lowercase();
        let index = |rest: &str| -> Result<usize> {
            rest.parse().with_context(|| format!("device `{s}`: `{rest}` is not a device number"))
        };
        match s.split_once(':') {
            None if s == "cpu" => Ok(Self::Cpu),
            None if s == "npu" => Ok(Self::Npu(0)),
            None if s == "cuda" => Ok(Self::Cuda(0)),
            Some(("npu", n)) => Ok(Self::Npu(index(n)?)),
            Some(("cuda", n)) => Ok(Self::Cuda(index(n)?)),
            _ => bail!("unknown device `{s}` (expected cpu, npu:N or cuda:N)"),
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::Npu(n) => write!(f, "npu:{n}"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Load-time choices.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ModelOptions {
    /// Weights and activations dtype; `None` takes the device's default (f32 on the CPU, f16 on
    /// an NPU). f32, f16 and bf16 run on both.
    pub dtype: Option<DType>,
    /// Capacity of the fixed KV cache.
    pub cache: CacheConfig,
    /// Quantization applied at load (e.g. `QuantConfig::preset("a8w8c8")`); `None` keeps
    /// floats. A quantized checkpoint folder (see `cargo xtask quantize`) needs none: it is
    /// loaded as saved.
    pub quantize: Option<QuantConfig>,
    /// Calibration text for schemes with int8 activations or KV cache (`a8w8c8`, `a8w8`, `c8`):
    /// its first 4096 tokens run through the float model in sequences of at most 512 tokens
    /// before quantizing. `None` uses the MMLU calibration split (fetched on first use).
    pub calibration_text: Option<String>,
}

// One engine per loaded model: the size of the enum does not matter.
#[allow(clippy::large_enum_variant)]
enum Engine {
    Cpu(Transformer<CpuBackend>),
    #[cfg(feature = "ascend")]
    Npu(Box<Transformer<AscendBackend>>),
}

/// Runs `$body` with `$m` bound to the engine's transformer (`&` or `&mut`, whatever its backend).
macro_rules! with_engine {
    (&$engine:expr, $m:ident => $body:expr) => {
        match &$engine {
            Engine::Cpu($m) => $body,
            #[cfg(feature = "ascend")]
            Engine::Npu(boxed) => {
                let $m = &**boxed;
                $body
            }
        }
    };
    (&mut $engine:expr, $m:ident => $body:expr) => {
        match &mut $engine {
            Engine::Cpu($m) => $body,
            #[cfg(feature = "ascend")]
            Engine::Npu(boxed) => {
                let $m = &mut **boxed;
                $body
            }
        }
    };
}

impl DeviceSpec {
    /// The dtype a model runs in on this device when none is asked for.
    pub fn default_dtype(self) -> DType {
        match self {
            DeviceSpec::Cpu => DType::F32,
            DeviceSpec::Npu(_) | DeviceSpec::Cuda(_) => DType::F16,
        }
    }
}

/// A loaded causal LM with its tokenizer, on one device.
pub struct Model {
    engine: Engine,
    tokenizer: Option<TokenizerBundle>,
    device: DeviceSpec,
}

impl Model {
    /// Loads a GGUF file or an HF-format folder onto `device` (`"cpu"`, `"npu:0"`, ...).
    pub fn load(path: &Path, device: &str, options: ModelOptions) -> Result<Self> {
        let device: DeviceSpec = device.parse()?;
        check_device(device)?;
        if path.is_dir() && checkpoint::is_quantized_checkpoint(path) {
            return Self::load_quantized(path, device, options);
        }
        let dtype = options.dtype.unwrap_or(device.default_dtype());
        let Checkpoint { config, weights, tokenizer, .. } =
            load_checkpoint(path, dtype).with_context(|| format!("loading {}", path.display()))?;
        let needs_calibration = options
            .quantize
            .as_ref()
            .is_some_and(|q| q.activation_dtype == QuantDtype::Int8 || q.kvcache_dtype == QuantDtype::Int8);
        let calibration = if needs_calibration {
            let (sequences, _source) = calibration_sequences(
                &tokenizer,
                options.calibration_text.as_deref(),
                DEFAULT_CALIBRATION_TOKENS,
                None,
            )?;
            Some(calibrate(&config, &weights, &sequences).context("calibrating")?)
        } else {
            None
        };
        let mut model = Self::build(config, &weights, device, options, calibration.as_ref())?;
        model.tokenizer = Some(tokenizer);
        Ok(model)
    }

    /// A quantized checkpoint folder: weights, scales and KV parameters as saved, no calibration.
    fn load_quantized(path: &Path, device: DeviceSpec, options: ModelOptions) -> Result<Self> {
        if let Some(q) = &options.quantize {
            bail!(
                "{} is already a quantized checkpoint; load it without a quantization preset (asked: {q})",
                path.display()
            );
        }
        let prepared = checkpoint::load(path).with_context(|| format!("loading {}", path.display()))?;
        let tokenizer = load_hf_tokenizer(path, &prepared.config)?;
        let dtype = options.dtype.unwrap_or(device.default_dtype());
        let engine = match device {
            DeviceSpec::Cpu => {
                Engine::Cpu(Transformer::from_prepared(CpuBackend::new(dtype)?, &prepared, options.cache)?)
            }
            #[cfg(feature = "ascend")]
            DeviceSpec::Npu(n) => Engine::Npu(Box::new(Transformer::from_prepared(
                AscendBackend::new(n, dtype)?,
                &prepared,
                options.cache,
            )?)),
            other => bail!("device {other} is not available in this build"),
        };
        Ok(Self { engine, tokenizer: Some(tokenizer), device })
    }

    /// Builds a model from HF-named host weights (no tokenizer).
    ///
    /// ```
    /// use candle_ascend_llm::{Architecture, DeviceSpec, Model, ModelConfig, ModelOptions};
    /// use candle_core::{Device, Tensor};
    ///
    /// # fn main() -> anyhow::Result<()> {
    /// let config = ModelConfig {
    ///     architecture: Architecture::Qwen2, vocab_size: 64, hidden_size: 32, intermediate_size: 48,
    ///     num_layers: 2, num_heads: 4, num_kv_heads: 2, head_dim: 8, rms_norm_eps: 1e-6,
    ///     rope_theta: 10_000.0, max_position_embeddings: 128, tie_word_embeddings: true,
    ///     attention_bias: true, bos_token_id: None, eos_token_ids: vec![],
    /// };
    /// let weights = candle_ascend_llm::random_weights(&config, 42)?;
    /// let mut model = Model::from_weights(config, &weights, DeviceSpec::Cpu, ModelOptions::default())?;
    /// let ids = Tensor::new(&[[1u32, 5, 9]], &Device::Cpu)?;
    /// let logits = model.forward(&ids, &[0])?; // host tensor [batch, vocab]
    /// assert_eq!(logits.dims(), &[1, 64]);
    /// let next = model.forward(&Tensor::new(&[[7u32]], &Device::Cpu)?, &[3])?;
    /// assert_eq!(next.dims(), &[1, 64]);
    /// # Ok(()) }
    /// ```
    pub fn from_weights(
        config: ModelConfig,
        weights: &Weights,
        device: DeviceSpec,
        options: ModelOptions,
    ) -> Result<Self> {
        Self::build(config, weights, device, options, None)
    }

    fn build(
        config: ModelConfig,
        weights: &Weights,
        device: DeviceSpec,
        options: ModelOptions,
        calibration: Option<&Calibration>,
    ) -> Result<Self> {
        check_device(device)?;
        let dtype = options.dtype.unwrap_or(device.default_dtype());
        let quant = options.quantize.as_ref();
        let engine = match device {
            DeviceSpec::Cpu => Engine::Cpu(Transformer::new_calibrated(
                CpuBackend::new(dtype)?,
                config,
                weights,
                options.cache,
                quant,
                calibration,
            )?),
            #[cfg(feature = "ascend")]
            DeviceSpec::Npu(n) => Engine::Npu(Box::new(Transformer::new_calibrated(
                AscendBackend::new(n, dtype)?,
                config,
                weights,
                options.cache,
                quant,
                calibration,
            )?)),
            other => bail!("device {other} is not available in this build"),
        };
        Ok(Self { engine, tokenizer: None, device })
    }

    pub fn device(&self) -> DeviceSpec {
        self.device
    }

    pub fn config(&self) -> &ModelConfig {
        with_engine!(&self.engine, m => m.config())
    }

    /// The tokenizer and chat template of a model loaded from a checkpoint.
    pub fn tokenizer(&self) -> Option<&TokenizerBundle> {
        self.tokenizer.as_ref()
    }

    /// One forward step: `ids` is a host `[batch, seq]` u32 tensor, `positions[b]` the
    /// position of sequence b's first token (its earlier tokens must be in the cache: 0 for a
    /// new prompt, the current length in decode). Returns host f32 logits `[batch, vocab]` at
    /// the last position of each sequence.
    pub fn forward(&mut self, ids: &Tensor, positions: &[usize]) -> Result<Tensor> {
        let (batch, seq) = ids.dims2().context("ids must be a [batch, seq] tensor")?;
        if positions.len() != batch {
            bail!("{} positions for a batch of {batch}", positions.len());
        }
        let flat = ids.to_dtype(DType::U32)?.flatten_all()?.to_vec1::<u32>()?;
        let lens = vec![seq; batch];
        Ok(with_engine!(&mut self.engine, m => m.forward(&flat, seq, positions, &lens)?))
    }

    /// Generates from already tokenized prompts (one batch), streaming tokens to `on_token`.
    pub fn generate_tokens(
        &mut self,
        prompts: &[Vec<u32>],
        sampling: &SamplingConfig,
        on_token: impl FnMut(usize, u32),
    ) -> Result<GenerationOutput> {
        let eos = self.tokenizer.as_ref().map(|t| t.eos_token_ids.clone()).unwrap_or_default();
        Ok(with_engine!(&mut self.engine, m => generate(m, prompts, sampling, &eos, on_token)?))
    }

    /// Tokenizes `prompt` as-is (no chat template) and generates; returns the new text.
    pub fn generate(&mut self, prompt: &str, sampling: &SamplingConfig) -> Result<String> {
        let ids = self.encode(prompt)?;
        let out = self.generate_tokens(&[ids], sampling, |_, _| {})?;
        self.decode(&out.tokens[0])
    }

    /// Wraps `user` in the model's chat template and generates the assistant's answer.
    pub fn chat(&mut self, user: &str, sampling: &SamplingConfig) -> Result<String> {
        let bundle = self.tokenizer.as_ref().context("this model has no tokenizer")?;
        let prompt = chat::format_chat(bundle, user)?;
        self.generate(&prompt, sampling)
    }

    /// Token ids of `text` (special tokens such as `<|im_start|>` are recognised).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let bundle = self.tokenizer.as_ref().context("this model has no tokenizer")?;
        let enc = bundle.tokenizer.encode(text, false).map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids` (special tokens skipped).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let bundle = self.tokenizer.as_ref().context("this model has no tokenizer")?;
        bundle.tokenizer.decode(ids, true).map_err(|e| anyhow::anyhow!("tokenizer: {e}"))
    }
}

fn check_device(device: DeviceSpec) -> Result<()> {
    match device {
        DeviceSpec::Cpu => Ok(()),
        #[cfg(feature = "ascend")]
        DeviceSpec::Npu(n) => {
            // Fails here, before any weight is read, with the directories searched for CANN.
            let count = candle_ascend_models::candle_ascend::Cann::global()
                .and_then(|api| api.device_count())
                .with_context(|| {
                    format!(
                        "device {device}: CANN is not usable (install CANN or set ASCEND_TOOLKIT_HOME; to try the NPU \
                         path without hardware, point CANDLE_ASCEND_SIM at ascend-sim's libascend_sim.so)"
                    )
                })?;
            if n >= count {
                bail!("device {device} does not exist ({count} NPU(s) found)");
            }
            Ok(())
        }
        #[cfg(not(feature = "ascend"))]
        DeviceSpec::Npu(_) => {
            bail!("device {device}: this build has no Ascend support (rebuild with `--features ascend`)")
        }
        DeviceSpec::Cuda(_) => bail!("device {device}: CUDA is not supported by this build"),
    }
}

/// Sets the number of CPU threads the kernels use (default: all cores). Call once, before
/// loading a model; later calls return an error.
pub fn set_threads(threads: usize) -> Result<()> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .build_global()
        .context("the thread pool is already running")
}
