//! `cargo xtask quantize`: calibrate a float checkpoint, quantize it with a preset and write a
//! quantized checkpoint folder (see `candle_ascend_models::quant::checkpoint`) that loads with
//! no calibration: `cargo run --release --example llama2 -- --model DIR`.

use anyhow::{Context, Result, bail};
use candle_ascend_models::fetch;
use candle_ascend_models::loader::load_checkpoint;
use candle_ascend_models::quant::{
    DEFAULT_CALIBRATION_TOKENS, QuantConfig, QuantDtype, calibrate, calibration_sequences, checkpoint, fallback,
    quantize_model,
};
use candle_core::DType;
use clap::Args;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args)]
pub struct QuantizeArgs {
    /// A known model name, a GGUF file or an HF folder.
    #[arg(long)]
    model: String,
    /// a8w8c8, a8w8, w8a16 or c8, or a JSON file with a `quantization_config` object.
    #[arg(long, default_value = "a8w8c8")]
    preset: String,
    /// SmoothQuant migration strength (0 < alpha < 1).
    #[arg(long)]
    alpha: Option<f64>,
    /// Calibration text file (default: the MMLU calibration split).
    #[arg(long, value_name = "FILE")]
    calib: Option<PathBuf>,
    /// Calibration token budget.
    #[arg(long, default_value_t = DEFAULT_CALIBRATION_TOKENS)]
    calib_tokens: usize,
    /// Mean KL divergence (nats per token, float vs quantized next-token distributions on held
    /// calibration tokens) the automatic fallback layers must reach; 0 disables the search.
    #[arg(long, default_value_t = fallback::DEFAULT_BUDGET)]
    fallback_budget: f64,
    /// At most this many decoder layers are kept in float by the search.
    #[arg(long)]
    max_fallback_layers: Option<usize>,
    /// Output folder (must not exist or be empty).
    #[arg(long)]
    out: PathBuf,
    /// Model cache folder.
    #[arg(long)]
    cache: Option<PathBuf>,
}

pub fn run(args: QuantizeArgs) -> Result<()> {
    let mut quant = QuantConfig::from_arg(&args.preset)?;
    if let Some(alpha) = args.alpha {
        quant.algorithm_args.insert("alpha".into(), serde_json::Value::from(alpha));
        quant.validate().context("--alpha")?;
    }
    if args.out.exists() && std::fs::read_dir(&args.out)?.next().is_some() {
        bail!("--out {} is not empty; choose a new or empty folder", args.out.display());
    }
    let path = fetch::resolve_model(Some(&args.model), &args.model, args.cache.as_deref())?;
    let t = Instant::now();
    let ckpt = load_checkpoint(&path, DType::F32).with_context(|| format!("loading {}", path.display()))?;
    eprintln!("loaded {} in {:.1?}", path.display(), t.elapsed());
    let needs_calibration = quant.activation_dtype == QuantDtype::Int8 || quant.kvcache_dtype == QuantDtype::Int8;
    let calibration = if needs_calibration {
        let text = match &args.calib {
            Some(f) => Some(std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?),
            None => None,
        };
        let (sequences, source) =
            calibration_sequences(&ckpt.tokenizer, text.as_deref(), args.calib_tokens, args.cache.as_deref())?;
        eprintln!("calibrating on {source}");
        let t = Instant::now();
        let calibration = calibrate(&ckpt.config, &ckpt.weights, &sequences)?;
        eprintln!("calibrated in {:.1?}", t.elapsed());
        if args.fallback_budget > 0.0 && quant.activation_dtype == QuantDtype::Int8 {
            let t = Instant::now();
            let options = fallback::Options {
                budget: args.fallback_budget,
                max_layers: args.max_fallback_layers.unwrap_or(ckpt.config.num_layers / 4),
            };
            let report = fallback::choose_fallback_layers(
                &ckpt.config,
                &ckpt.weights,
                &quant,
                &calibration,
                &sequences,
                &options,
            )?;
            eprintln!("{report}");
            eprintln!("fallback search in {:.1?}", t.elapsed());
            quant.float_layers = report.chosen.clone();
        }
        Some(calibration)
    } else {
        None
    };
    let t = Instant::now();
    let model = quantize_model(&ckpt.weights, &ckpt.config, &quant, calibration.as_ref())?;
    checkpoint::save(&model, Some(&ckpt.tokenizer), &args.out)?;
    let bytes = std::fs::metadata(args.out.join(checkpoint::WEIGHTS_FILE))?.len();
    eprintln!(
        "wrote {} ({:.1} MB of tensors) in {:.1?}\nquantization: {quant}",
        args.out.display(),
        bytes as f64 / 1e6,
        t.elapsed()
    );
    Ok(())
}
