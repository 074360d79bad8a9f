//! `cargo xtask bench`: prefill and decode throughput of our engine against a baseline on the
//! same f32 weights (candle-transformers' own llama / qwen2, or our engine unquantized),
//! interleaved in one run, reported as medians with their spread (min..max) and the ratio of
//! medians; then, per model, the decode bandwidth floor and the batch scaling of decode, each as
//! the median of per-repetition ratios (every repetition measures the floor and each batch size
//! back to back, so each ratio pairs measurements taken close together on a drifting machine).

use anyhow::{Context, Result};
use candle_ascend_models::fetch;
use candle_ascend_models::loader::load_checkpoint;
use candle_ascend_models::quant::{QuantConfig, QuantDtype, calibrate};
use candle_ascend_models::reference::ReferenceModel;
use candle_ascend_models::{CacheConfig, CpuBackend, Transformer};
use candle_core::{DType, Device, Tensor};
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Known model names (default: both example models).
    #[arg(long, value_delimiter = ',')]
    pub models: Vec<String>,
    /// Cache folder for fetched models.
    #[arg(long)]
    pub cache: Option<std::path::PathBuf>,
    /// Repetitions of every measurement (interleaved engine / reference).
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Prompt length of the prefill measurement.
    #[arg(long, default_value_t = 512)]
    pub prompt_len: usize,
    /// Decode steps per decode measurement (after a 64-token prompt).
    #[arg(long, default_value_t = 32)]
    pub decode_steps: usize,
    /// Batch sizes to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    pub batches: Vec<usize>,
    /// Skip the baseline (our engine only).
    #[arg(long)]
    pub no_reference: bool,
    /// What our engine is compared with, interleaved: `candle` (candle-transformers' llama / qwen2,
    /// f32) or `f32` (our own engine, unquantized; the baseline of the A8W8C8 speed targets).
    #[arg(long, default_value = "candle", value_parser = ["candle", "f32"])]
    pub baseline: String,
    /// Quantize our engine at load with a preset (e.g. w8a16) or a quantization_config JSON
    /// file; the baseline stays f32.
    #[arg(long, value_name = "PRESET")]
    pub quantize: Option<String>,
    /// Calibration text for presets with int8 activations or KV cache (default: the MMLU calibration split).
    #[arg(long, value_name = "FILE")]
    pub calib: Option<std::path::PathBuf>,
    /// Run a busy process on one core during the measurements (shared-machine behaviour).
    #[arg(long)]
    pub contend: bool,
}

/// Samples of one metric, in tokens/s.
#[derive(Default)]
struct Samples(Vec<f64>);

impl Samples {
    fn median(&self) -> f64 {
        let mut v = self.0.clone();
        v.sort_by(f64::total_cmp);
        if v.is_empty() { f64::NAN } else { v[v.len() / 2] }
    }
    /// `min..max` (one decimal for tokens/s, two below 10 for ratios).
    fn spread(&self) -> String {
        let min = self.0.iter().copied().fold(f64::INFINITY, f64::min);
        let max = self.0.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        if max < 10.0 { format!("{min:.2}..{max:.2}") } else { format!("{min:.1}..{max:.1}") }
    }
}

/// `num[i] / den[i]` for each repetition `i` (both measured in repetition `i`); empty without `den`.
fn paired_ratios(num: &Samples, den: Option<&[f64]>) -> Samples {
    Samples(den.map_or(Vec::new(), |d| num.0.iter().zip(d).map(|(n, d)| n / d).collect()))
}

struct Row {
    model: String,
    metric: String,
    ours: Samples,
    reference: Samples,
}

impl Row {
    fn new(model: &str, metric: String) -> Self {
        Self { model: model.to_string(), metric, ours: Samples::default(), reference: Samples::default() }
    }
}

/// Per model: the batch-1 bandwidth floor and the decode scaling, per repetition.
struct Floor {
    model: String,
    /// Weight and KV-cache bytes read per batch-1 decode step, and weight bytes held.
    weight_bytes: usize,
    kv_bytes: usize,
    held: usize,
    /// Floor in tokens/s at batch 1, one per repetition.
    floor: Samples,
    /// Batch-1 decode tokens/s per repetition (when batch 1 was measured).
    b1: Option<Vec<f64>>,
    /// For each batch above 1: its aggregate decode over batch 1's, per repetition.
    batch_ratios: Vec<(usize, Samples)>,
}

/// A busy-looping child process, killed on drop.
struct Contender(std::process::Child);

impl Contender {
    fn start() -> Result<Self> {
        let child = std::process::Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .spawn()
            .context("starting the contending process")?;
        Ok(Self(child))
    }
}

impl Drop for Contender {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Read bandwidth in GB/s over a buffer of `bytes` (the model's weight bytes per decode step,
/// so the working set and its cache behaviour match decode): all pool threads summing
/// disjoint slices, median of 5 passes after one warm-up pass.
fn read_bandwidth_gbs(bytes: usize) -> f64 {
    let buf = vec![1f32; bytes / 4];
    let pass = || {
        let t = Instant::now();
        std::hint::black_box(candle_ascend_ops::kernel::stream::stream_sum(&buf));
        (buf.len() * 4) as f64 / t.elapsed().as_secs_f64() / 1e9
    };
    pass();
    let mut s = Samples((0..5).map(|_| pass()).collect());
    s.0.sort_by(f64::total_cmp);
    s.median()
}

/// The engine our engine is measured against.
enum Baseline {
    Candle(Box<ReferenceModel>),
    OursF32(Box<Transformer<CpuBackend>>),
}

impl Baseline {
    /// Prefill of `batch` prompts of `len` tokens (`ids` row-major), in tokens/s.
    fn prefill(&mut self, ids: &[u32], batch: usize, len: usize) -> Result<f64> {
        match self {
            Baseline::Candle(r) => {
                r.reset()?;
                let x = Tensor::from_slice(ids, (batch, len), &Device::Cpu)?;
                let t = Instant::now();
                r.forward(&x, 0)?;
                Ok((batch * len) as f64 / t.elapsed().as_secs_f64())
            }
            Baseline::OursF32(m) => prefill_tps(m, ids, batch, len),
        }
    }

    /// Greedy decode of `steps` tokens per sequence after the prompts `short` (`batch` x `plen`).
    fn decode(&mut self, short: &[u32], batch: usize, plen: usize, steps: usize) -> Result<f64> {
        match self {
            Baseline::Candle(r) => {
                r.reset()?;
                let x = Tensor::from_slice(short, (batch, plen), &Device::Cpu)?;
                r.forward(&x, 0)?;
                let mut next = vec![1u32; batch];
                let t = Instant::now();
                for step in 0..steps {
                    let x = Tensor::from_slice(&next, (batch, 1), &Device::Cpu)?;
                    let logits = r.forward(&x, plen + step)?;
                    next = logits.argmax(1)?.to_vec1::<u32>()?;
                }
                Ok((batch * steps) as f64 / t.elapsed().as_secs_f64())
            }
            Baseline::OursF32(m) => decode_tps(m, short, batch, plen, steps),
        }
    }
}

/// Our engine's prefill of `batch` prompts of `len` tokens, in tokens/s.
fn prefill_tps(m: &mut Transformer<CpuBackend>, ids: &[u32], batch: usize, len: usize) -> Result<f64> {
    let t = Instant::now();
    m.forward(ids, len, &vec![0; batch], &vec![len; batch])?;
    Ok((batch * len) as f64 / t.elapsed().as_secs_f64())
}

/// Our engine's greedy decode of `steps` tokens per sequence after the prompts `short`, in tokens/s.
fn decode_tps(m: &mut Transformer<CpuBackend>, short: &[u32], batch: usize, plen: usize, steps: usize) -> Result<f64> {
    m.forward(short, plen, &vec![0; batch], &vec![plen; batch])?;
    let ones = vec![1usize; batch];
    let mut next = vec![1u32; batch];
    let t = Instant::now();
    for step in 0..steps {
        let logits = m.forward(&next, 1, &vec![plen + step; batch], &ones)?;
        next = logits.argmax(1)?.to_vec1::<u32>()?;
    }
    Ok((batch * steps) as f64 / t.elapsed().as_secs_f64())
}

fn prompt(vocab: usize, batch: usize, len: usize, seed: u64) -> Vec<u32> {
    candle_ascend_models::random::random_token_ids(vocab, batch * len, seed)
}

pub fn run(args: BenchArgs) -> Result<()> {
    let models = if args.models.is_empty() {
        vec!["smollm2-135m-instruct".to_string(), "qwen2.5-coder-0.5b-instruct".to_string()]
    } else {
        args.models.clone()
    };
    let _contender = if args.contend { Some(Contender::start()?) } else { None };
    eprintln!(
        "threads: {} (rayon pool){}",
        rayon::current_num_threads(),
        if args.contend { ", with a busy process competing" } else { "" }
    );
    let mut floors = Vec::new();
    let mut rows: Vec<Row> = Vec::new();
    for name in &models {
        let path = fetch::resolve_model(Some(name), name, args.cache.as_deref())?;
        let ckpt = load_checkpoint(&path, DType::F32)?;
        let cfg = ckpt.config.clone();
        let max_batch = args.batches.iter().copied().max().unwrap_or(1);
        let cap = CacheConfig { max_batch, max_seq_len: (args.prompt_len + 1).max(64 + args.decode_steps + 1) };
        let quant = args.quantize.as_deref().map(QuantConfig::from_arg).transpose()?;
        let needs_calibration = quant
            .as_ref()
            .is_some_and(|q| q.activation_dtype == QuantDtype::Int8 || q.kvcache_dtype == QuantDtype::Int8);
        let calibration = if needs_calibration {
            let text = match &args.calib {
                Some(file) => {
                    Some(std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?)
                }
                None => None,
            };
            let (chunks, source) = candle_ascend_models::quant::calibration_sequences(
                &ckpt.tokenizer,
                text.as_deref(),
                candle_ascend_models::quant::DEFAULT_CALIBRATION_TOKENS,
                args.cache.as_deref(),
            )?;
            eprintln!("calibrating on {source}");
            Some(calibrate(&cfg, &ckpt.weights, &chunks)?)
        } else {
            None
        };
        let mut ours = Transformer::new_calibrated(
            CpuBackend::new(DType::F32)?,
            cfg.clone(),
            &ckpt.weights,
            cap,
            quant.as_ref(),
            calibration.as_ref(),
        )?;
        let mut reference = match (args.no_reference, args.baseline.as_str()) {
            (true, _) => None,
            (false, "f32") => Some(Baseline::OursF32(Box::new(Transformer::new(
                CpuBackend::new(DType::F32)?,
                cfg.clone(),
                &ckpt.weights,
                cap,
            )?))),
            (false, _) => {
                Some(Baseline::Candle(Box::new(ReferenceModel::new(&cfg, ckpt.weights.tensors(), DType::F32)?)))
            }
        };
        drop(ckpt);
        // Bytes a batch-1 decode step reads: every weight once, plus the K and V of the cached
        // positions (on average the 64-token prompt and half the decode steps).
        let weight_bytes = ours.weight_bytes_per_token();
        let kv_per_position = ours.kv_cache_bytes() / (cap.max_batch * cap.max_seq_len);
        let kv_bytes = kv_per_position * (64.min(args.prompt_len) + args.decode_steps / 2);
        let bytes = weight_bytes + kv_bytes;
        // Every repetition measures the bandwidth floor and each batch size back to back, so the
        // ratios below pair measurements taken minutes apart at most (this machine's speed drifts).
        let mut prefill_rows: Vec<Row> =
            args.batches.iter().map(|&b| Row::new(name, format!("prefill {b}x{}", args.prompt_len))).collect();
        let mut decode_rows: Vec<Row> =
            args.batches.iter().map(|&b| Row::new(name, format!("decode batch {b}"))).collect();
        let mut floor = Samples::default();
        for rep in 0..args.reps + 1 {
            let warmup = rep == 0;
            let bandwidth = read_bandwidth_gbs(bytes);
            if !warmup {
                eprintln!("  {name} rep {rep}: read bandwidth over {:.0} MB {bandwidth:.1} GB/s", bytes as f64 / 1e6);
                floor.0.push(bandwidth * 1e9 / bytes as f64);
            }
            for (i, &batch) in args.batches.iter().enumerate() {
                let ids = prompt(cfg.vocab_size, batch, args.prompt_len, 17 + rep as u64);
                let ours_tps = prefill_tps(&mut ours, &ids, batch, args.prompt_len)?;
                let ref_tps = reference.as_mut().map(|r| r.prefill(&ids, batch, args.prompt_len)).transpose()?;
                // Decode after a 64-token prompt.
                let plen = 64.min(args.prompt_len);
                let short: Vec<u32> =
                    (0..batch).flat_map(|b| ids[b * args.prompt_len..b * args.prompt_len + plen].to_vec()).collect();
                let ours_dec = decode_tps(&mut ours, &short, batch, plen, args.decode_steps)?;
                let ref_dec =
                    reference.as_mut().map(|r| r.decode(&short, batch, plen, args.decode_steps)).transpose()?;
                if warmup {
                    continue;
                }
                prefill_rows[i].ours.0.push(ours_tps);
                decode_rows[i].ours.0.push(ours_dec);
                if let (Some(p), Some(d)) = (ref_tps, ref_dec) {
                    prefill_rows[i].reference.0.push(p);
                    decode_rows[i].reference.0.push(d);
                }
                let base = match (ref_tps, ref_dec) {
                    (Some(p), Some(d)) => format!(" (baseline: prefill {p:.1}, decode {d:.1})"),
                    _ => String::new(),
                };
                eprintln!(
                    "  {name} batch {batch} rep {rep}: prefill {ours_tps:.1} tok/s, decode {ours_dec:.1} tok/s{base}"
                );
            }
        }
        let b1 = args.batches.iter().position(|&b| b == 1).map(|i| decode_rows[i].ours.0.clone());
        floors.push(Floor {
            model: name.clone(),
            weight_bytes,
            kv_bytes,
            held: ours.resident_weight_bytes(),
            floor,
            batch_ratios: args
                .batches
                .iter()
                .zip(&decode_rows)
                .filter(|(b, _)| **b > 1)
                .map(|(&b, row)| (b, paired_ratios(&row.ours, b1.as_deref())))
                .collect(),
            b1,
        });
        for (p, d) in prefill_rows.into_iter().zip(decode_rows) {
            rows.push(p);
            rows.push(d);
        }
    }
    let ours_label = args.quantize.as_deref().map_or("ours f32".to_string(), |q| format!("ours {q}"));
    let baseline_label = if args.baseline == "f32" { "ours f32" } else { "candle-transformers f32" };
    println!("\n| model | metric | {ours_label} tokens/s (median, min..max) | {baseline_label} tokens/s | ratio |");
    println!("|---|---|---|---|---|");
    for r in &rows {
        let ours = format!("{:.1} ({})", r.ours.median(), r.ours.spread());
        let (reference, ratio) = if r.reference.0.is_empty() {
            ("not measured".to_string(), "-".to_string())
        } else {
            let refm = r.reference.median();
            (format!("{refm:.1} ({})", r.reference.spread()), format!("{:.2}x", r.ours.median() / refm))
        };
        println!("| {} | {} | {ours} | {reference} | {ratio} |", r.model, r.metric);
    }
    println!();
    for f in floors {
        println!(
            "{}: {:.0} MB of weights held; {:.1} MB of weights + {:.2} MB of KV cache read per batch-1 decode step; \
             bandwidth floor (those bytes over the read bandwidth of a buffer that size, measured in every \
             repetition) {:.1} tokens/s ({})",
            f.model,
            f.held as f64 / 1e6,
            f.weight_bytes as f64 / 1e6,
            f.kv_bytes as f64 / 1e6,
            f.floor.median(),
            f.floor.spread()
        );
        if let Some(b1) = &f.b1 {
            // Step time over the floor's step time, per repetition: floor / decode.
            let ratios = paired_ratios(&f.floor, Some(b1));
            println!(
                "{}: decode batch 1 at {:.2}x the bandwidth floor's step time (median of per-repetition ratios, {})",
                f.model,
                ratios.median(),
                ratios.spread()
            );
        }
        for (batch, ratios) in &f.batch_ratios {
            if !ratios.0.is_empty() {
                println!(
                    "{}: decode batch {batch} aggregate {:.2}x batch 1 (median of per-repetition ratios, {})",
                    f.model,
                    ratios.median(),
                    ratios.spread()
                );
            }
        }
    }
    Ok(())
}
