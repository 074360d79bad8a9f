//! `cargo xtask ppl`: perplexity of the float model and its quantized twin on a held-out text,
//! and their top-1 next-token agreement (`candle_ascend_models::eval::ppl`).
//!
//! Also the set-up shared with `cargo xtask mmlu`: resolving and loading a model, the
//! quantization preset, the calibration sequences (default: the MMLU calibration split) and
//! building the f32 and quantized models from one load of the weights.

use anyhow::{Context, Result, bail};
use candle_ascend_models::eval::{Mmlu, ppl};
use candle_ascend_models::fetch;
use candle_ascend_models::loader::{Checkpoint, TokenizerBundle, load_checkpoint};
use candle_ascend_models::quant::{QuantConfig, QuantDtype, calibrate};
use candle_ascend_models::{CacheConfig, CpuBackend, Transformer};
use candle_core::DType;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Default model of `ppl` and `mmlu`.
pub const DEFAULT_MODEL: &str = "qwen2.5-coder-1.5b-instruct";

#[derive(clap::Args, Debug)]
pub struct PplArgs {
    /// Model: a known name, a GGUF file or an HF-format folder.
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: String,
    /// Text to measure (default: the MMLU held-out split, see candle_ascend_models::eval::mmlu).
    #[arg(long, value_name = "FILE")]
    pub text: Option<PathBuf>,
    /// Tokens of the text measured at most (taken from its start).
    #[arg(long, default_value_t = 4096)]
    pub max_tokens: usize,
    /// Window length in tokens (no context crosses a window).
    #[arg(long, default_value_t = ppl::DEFAULT_WINDOW)]
    pub window: usize,
    #[command(flatten)]
    pub quant: QuantArgs,
    /// Also write the figures as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// CPU threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Cache folder for fetched models and data.
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,
}

/// Quantization flags shared by `ppl` and `mmlu`.
#[derive(clap::Args, Debug)]
pub struct QuantArgs {
    /// Quantization of the compared model: a preset (a8w8c8, a8w8, w8a16, c8), a JSON file
    /// with a `quantization_config` object, or `none` for the float model alone.
    #[arg(long, value_name = "PRESET", default_value = "a8w8c8")]
    pub quantize: String,
    /// Calibration text (default: the MMLU calibration split).
    #[arg(long, value_name = "FILE")]
    pub calib: Option<PathBuf>,
    /// Calibration token budget, taken from the start of the calibration text and cut into
    /// sequences of at most 512 tokens.
    #[arg(long, default_value_t = 4096)]
    pub calib_tokens: usize,
}

/// A loaded checkpoint and a stable identity for result caches.
pub struct Loaded {
    /// `name@<sha256 prefix>` for a known model, `path (N bytes)` otherwise.
    pub identity: String,
    /// Short name for output folders.
    pub short_name: String,
    pub checkpoint: Checkpoint,
}

/// Sets the rayon pool size once, before any model work.
pub fn set_threads(threads: Option<usize>) -> Result<()> {
    if let Some(n) = threads {
        rayon::ThreadPoolBuilder::new().num_threads(n.max(1)).build_global().context("setting up the thread pool")?;
    }
    Ok(())
}

/// Resolves `model` (fetching a known model on first use) and loads it as f32.
pub fn load_model(model: &str, cache: Option<&Path>) -> Result<Loaded> {
    let path = fetch::resolve_model(Some(model), model, cache)?;
    let (identity, short_name) = match fetch::find_known(model) {
        Some(a) => (format!("{}@{}", a.name, &a.sha256[..16]), a.name.to_string()),
        None => {
            let bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            let short = path.file_stem().map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned());
            (format!("{} ({bytes} bytes)", path.display()), short)
        }
    };
    eprintln!("loading {} (f32)", path.display());
    let t = Instant::now();
    let checkpoint = load_checkpoint(&path, DType::F32).with_context(|| format!("loading {}", path.display()))?;
    eprintln!("loaded in {:.1?}", t.elapsed());
    Ok(Loaded { identity, short_name, checkpoint })
}

/// The preset named by `--quantize`; `None` for `none`.
pub fn quant_config(name: &str) -> Result<Option<QuantConfig>> {
    if name.trim().eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    Ok(Some(QuantConfig::from_arg(name).with_context(|| format!("--quantize {name}"))?))
}

/// Token ids of `text` without special tokens.
pub fn encode(tokenizer: &TokenizerBundle, text: &str) -> Result<Vec<u32>> {
    Ok(tokenizer.encode(text)?)
}

/// Calibration sequences and their identity (a hash of the token ids), when `quant` needs
/// calibrated ranges (int8 activations or KV cache). Cutting and checking are the library's
/// (`quant::calibration_sequences`); this only picks the text (`--calib` or the MMLU
/// calibration split, reusing an already fetched `mmlu`).
pub fn calibration_sequences(
    args: &QuantArgs,
    quant: Option<&QuantConfig>,
    tokenizer: &TokenizerBundle,
    mmlu: Option<&Mmlu>,
    cache: Option<&Path>,
) -> Result<Option<(Vec<Vec<u32>>, String)>> {
    let needs = quant.is_some_and(|q| q.activation_dtype == QuantDtype::Int8 || q.kvcache_dtype == QuantDtype::Int8);
    if !needs {
        return Ok(None);
    }
    let text = match (&args.calib, mmlu) {
        (Some(file), _) => {
            std::fs::read_to_string(file).with_context(|| format!("reading calibration text {}", file.display()))?
        }
        (None, Some(m)) => m.calibration_text(),
        (None, None) => Mmlu::fetch(cache)?.calibration_text(),
    };
    let (sequences, _) =
        candle_ascend_models::quant::calibration_sequences(tokenizer, Some(&text), args.calib_tokens, cache)
            .with_context(|| format!("calibration data ({})", calib_source(args)))?;
    let ids: Vec<u32> = sequences.concat();
    let identity = format!("{:016x}-{}", fnv1a(&ids), ids.len());
    eprintln!("calibration: {} tokens of {} in {} sequences", ids.len(), calib_source(args), sequences.len());
    Ok(Some((sequences, identity)))
}

fn calib_source(args: &QuantArgs) -> String {
    args.calib.as_ref().map_or("the MMLU calibration split".to_string(), |f| f.display().to_string())
}

/// The f32 model, and the quantized one when `quant` is given (calibrated on `calibration`).
pub fn build_models(
    checkpoint: &Checkpoint,
    quant: Option<&QuantConfig>,
    calibration: Option<&[Vec<u32>]>,
    cache: CacheConfig,
) -> Result<(Transformer<CpuBackend>, Option<Transformer<CpuBackend>>)> {
    let config = &checkpoint.config;
    let weights = &checkpoint.weights;
    let quantized = match quant {
        Some(q) => {
            let calib = match calibration {
                Some(seqs) => {
                    let t = Instant::now();
                    let c = calibrate(config, weights, seqs).context("calibrating")?;
                    eprintln!("calibrated in {:.1?}", t.elapsed());
                    Some(c)
                }
                None => None,
            };
            let t = Instant::now();
            let model = Transformer::new_calibrated(
                CpuBackend::new(DType::F32)?,
                config.clone(),
                weights,
                cache,
                Some(q),
                calib.as_ref(),
            )
            .with_context(|| format!("building the quantized model ({q})"))?;
            eprintln!("quantized model built in {:.1?}", t.elapsed());
            Some(model)
        }
        None => None,
    };
    let float = Transformer::new(CpuBackend::new(DType::F32)?, config.clone(), weights, cache)?;
    Ok((float, quantized))
}

/// 64-bit FNV-1a of token ids (a stable identity; not cryptographic).
pub fn fnv1a(ids: &[u32]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for id in ids {
        for b in id.to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// A progress bar on stderr (hidden when stderr is not a terminal).
pub fn progress_bar(len: u64, unit: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    let template = format!("{{msg}} [{{wide_bar}}] {{pos}}/{{len}} {unit} ({{elapsed}}, eta {{eta}})");
    if let Ok(style) = ProgressStyle::with_template(&template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

pub fn run(args: PplArgs) -> Result<()> {
    set_threads(args.threads)?;
    let quant = quant_config(&args.quant.quantize)?;
    if args.max_tokens < 2 {
        bail!("--max-tokens must be at least 2");
    }
    let loaded = load_model(&args.model, args.cache.as_deref())?;
    let tokenizer = &loaded.checkpoint.tokenizer;
    let (text, source) = match &args.text {
        Some(file) => (
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?,
            file.display().to_string(),
        ),
        None => (Mmlu::fetch(args.cache.as_deref())?.held_out_text(), "the MMLU held-out split".to_string()),
    };
    let mut ids = encode(tokenizer, &text)?;
    ids.truncate(args.max_tokens);
    eprintln!("text: {} tokens of {source}, windows of {}", ids.len(), args.window);
    let calibration = calibration_sequences(&args.quant, quant.as_ref(), tokenizer, None, args.cache.as_deref())?;
    let cache = CacheConfig { max_batch: 1, max_seq_len: args.window.max(2) };
    let (mut float, quantized) =
        build_models(&loaded.checkpoint, quant.as_ref(), calibration.as_ref().map(|c| c.0.as_slice()), cache)?;
    drop(loaded.checkpoint.weights);
    let bar = progress_bar(ids.len() as u64, "tokens");
    bar.set_message("perplexity");
    let t = Instant::now();
    let preset = args.quant.quantize.to_ascii_lowercase();
    let json = match quantized {
        Some(mut quantized) => {
            let c = ppl::compare_with(&mut float, &mut quantized, &ids, args.window, |n| bar.inc(n as u64))?;
            bar.finish_and_clear();
            println!("model      {}", loaded.identity);
            println!("preset     {preset}");
            println!("tokens     {} (scored predictions, windows of {})", c.tokens, args.window);
            println!("ppl float  {:.4}", c.ppl_float);
            println!("ppl {preset:<6} {:.4}", c.ppl_quant);
            println!("ratio      {:.4} ({:+.2}%)", c.ratio(), (c.ratio() - 1.0) * 100.0);
            println!("agreement  {:.2}% (top-1)", c.agreement * 100.0);
            serde_json::json!({
                "model": loaded.identity, "preset": preset, "text": source, "window": args.window,
                "tokens": c.tokens, "ppl_float": c.ppl_float, "ppl_quant": c.ppl_quant, "ratio": c.ratio(),
                "agreement": c.agreement, "calibration": calibration.as_ref().map(|c| c.1.clone()),
            })
        }
        None => {
            let p = ppl::perplexity_with(&mut float, &ids, args.window, |n| bar.inc(n as u64))?;
            bar.finish_and_clear();
            println!("model      {}", loaded.identity);
            println!("tokens     {} (scored predictions, windows of {})", p.tokens, args.window);
            println!("ppl float  {:.4}", p.ppl);
            serde_json::json!({
                "model": loaded.identity, "preset": "none", "text": source, "window": args.window,
                "tokens": p.tokens, "ppl_float": p.ppl,
            })
        }
    };
    eprintln!("measured in {:.1?}", t.elapsed());
    if let Some(file) = &args.json {
        std::fs::write(file, serde_json::to_string_pretty(&json)? + "\n")
            .with_context(|| format!("writing {}", file.display()))?;
        eprintln!("wrote {}", file.display());
    }
    Ok(())
}
