//! `cargo xtask mmlu`: MMLU accuracy of the float model and its quantized twin, side by side in
//! one run (`candle_ascend_models::eval::mmlu` holds the splits, the prompt format and the
//! scoring).
//!
//! Every scored item is appended to `results-cache.jsonl` in the output folder, keyed by the
//! run (model identity, preset, shots, calibration identity) and the item id; a rerun skips the
//! items already there, so an interrupted run resumes where it stopped. At the end the
//! per-subject and average accuracies are written as `results.json` and `results.md`.

use crate::ppl::{QuantArgs, build_models, calibration_sequences, encode, load_model, progress_bar, quant_config};
use anyhow::{Context, Result, bail};
use candle_ascend_models::CacheConfig;
use candle_ascend_models::eval::mmlu::{self, EXEMPLAR_POOL, LETTERS, Mmlu};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct MmluArgs {
    /// Model: a known name, a GGUF file or an HF-format folder.
    #[arg(long, default_value = crate::ppl::DEFAULT_MODEL)]
    pub model: String,
    /// `all`, or comma-separated subject names (`abstract_algebra,astronomy`).
    #[arg(long, default_value = "all")]
    pub subjects: String,
    /// Items scored per subject: the first N of its scored split.
    #[arg(long, default_value_t = 20)]
    pub per_subject: usize,
    /// Exemplars per prompt (the first K items of the subject), 0 to 5.
    #[arg(long, default_value_t = 0)]
    pub shots: usize,
    #[command(flatten)]
    pub quant: QuantArgs,
    /// Output folder (default: target/mmlu/<model>).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// CPU threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Cache folder for fetched models and data.
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,
    /// Print the selection (items, prompt tokens, items already cached) and stop before
    /// building any model.
    #[arg(long)]
    pub dry_run: bool,
}

/// One scored item, as a line of the results cache.
#[derive(Debug, Clone)]
struct Scored {
    id: String,
    subject: String,
    answer: usize,
    float: usize,
    quant: Option<usize>,
    prompt_tokens: usize,
    secs: f64,
}

impl Scored {
    fn to_json(&self, run: &str) -> Value {
        json!({
            "run": run, "id": self.id, "subject": self.subject, "answer": LETTERS[self.answer].to_string(),
            "float": LETTERS[self.float].to_string(), "quant": self.quant.map(|q| LETTERS[q].to_string()),
            "prompt_tokens": self.prompt_tokens, "secs": self.secs,
        })
    }

    /// Parses a cache line of `run`; `None` for other runs and unreadable lines (a line cut by
    /// an interrupted write).
    fn from_line(line: &str, run: &str) -> Option<Self> {
        let v: Value = serde_json::from_str(line).ok()?;
        if v.get("run")?.as_str()? != run {
            return None;
        }
        let letter = |v: &Value| -> Option<usize> {
            let s = v.as_str()?;
            LETTERS.iter().position(|l| s.len() == 1 && s.starts_with(*l))
        };
        Some(Self {
            id: v.get("id")?.as_str()?.to_string(),
            subject: v.get("subject")?.as_str()?.to_string(),
            answer: letter(v.get("answer")?)?,
            float: letter(v.get("float")?)?,
            quant: match v.get("quant")? {
                Value::Null => None,
                q => Some(letter(q)?),
            },
            prompt_tokens: v.get("prompt_tokens")?.as_u64()? as usize,
            secs: v.get("secs")?.as_f64()?,
        })
    }
}

/// Correct answers of one subject.
#[derive(Debug, Default, Clone)]
struct Tally {
    items: usize,
    float: usize,
    quant: usize,
}

impl Tally {
    fn add(&mut self, s: &Scored) {
        self.items += 1;
        self.float += usize::from(s.float == s.answer);
        self.quant += usize::from(s.quant == Some(s.answer));
    }
    fn pct(n: usize, of: usize) -> f64 {
        if of == 0 { 0.0 } else { 100.0 * n as f64 / of as f64 }
    }
    fn float_pct(&self) -> f64 {
        Self::pct(self.float, self.items)
    }
    fn quant_pct(&self) -> f64 {
        Self::pct(self.quant, self.items)
    }
}

fn sanitize(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '_' }).collect()
}

pub fn run(args: MmluArgs) -> Result<()> {
    crate::ppl::set_threads(args.threads)?;
    if args.shots > EXEMPLAR_POOL {
        bail!("--shots must be 0..={EXEMPLAR_POOL} (the exemplar pool of each subject)");
    }
    if args.per_subject == 0 {
        bail!("--per-subject must be at least 1");
    }
    let quant = quant_config(&args.quant.quantize)?;
    let preset = if quant.is_some() { args.quant.quantize.trim().to_ascii_lowercase() } else { "none".into() };
    let data = Mmlu::fetch(args.cache.as_deref()).context("loading MMLU")?;
    let names: Vec<&str> = if args.subjects.trim().eq_ignore_ascii_case("all") {
        Vec::new()
    } else {
        args.subjects.split(',').map(str::trim).filter(|s| !s.is_empty()).collect()
    };
    let subjects = data.select(&names)?;
    let loaded = load_model(&args.model, args.cache.as_deref())?;
    let tokenizer = &loaded.checkpoint.tokenizer;
    let choice_ids = mmlu::choice_token_ids(&tokenizer.tokenizer)?;

    // Every prompt, tokenized up front (the longest one sizes the KV cache).
    let mut work = Vec::new();
    for subject in &subjects {
        for item in subject.scored(Some(args.per_subject)) {
            let ids = encode(tokenizer, &subject.prompt(item, args.shots)?)?;
            work.push((item, ids));
        }
    }
    let calibration =
        calibration_sequences(&args.quant, quant.as_ref(), tokenizer, Some(&data), args.cache.as_deref())?;
    let calib_id = calibration.as_ref().map_or_else(|| "none".to_string(), |c| c.1.clone());
    let run_key = format!("model={};preset={preset};shots={};calib={calib_id}", loaded.identity, args.shots);

    let out = args.out.clone().unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap_or(Path::new("."))
            .join("target")
            .join("mmlu")
            .join(sanitize(&loaded.short_name))
    });
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let cache_path = out.join("results-cache.jsonl");
    let mut done: HashMap<String, Scored> = HashMap::new();
    if let Ok(text) = std::fs::read_to_string(&cache_path) {
        for s in text.lines().filter_map(|l| Scored::from_line(l, &run_key)) {
            done.insert(s.id.clone(), s);
        }
    }
    let todo: Vec<_> = work.iter().filter(|(item, _)| !done.contains_key(&item.id)).collect();
    let cached = work.len() - todo.len();
    eprintln!(
        "{} subjects, {} items ({} from the results cache, {} to score), {}-shot, preset {preset}",
        subjects.len(),
        work.len(),
        cached,
        todo.len(),
        args.shots
    );

    if args.dry_run {
        let tokens: Vec<usize> = work.iter().map(|(_, ids)| ids.len()).collect();
        let total: usize = tokens.iter().sum();
        println!(
            "dry run: {} items, {} to score; prompt tokens: total {total}, mean {:.1}, max {}",
            work.len(),
            todo.len(),
            total as f64 / tokens.len().max(1) as f64,
            tokens.iter().max().unwrap_or(&0)
        );
        return Ok(());
    }
    if !todo.is_empty() {
        let longest = todo.iter().map(|(_, ids)| ids.len()).max().unwrap_or(1);
        let cache = CacheConfig { max_batch: 1, max_seq_len: longest };
        let (mut float, mut quantized) =
            build_models(&loaded.checkpoint, quant.as_ref(), calibration.as_ref().map(|c| c.0.as_slice()), cache)?;
        // The models hold their own copies; the host weights are not needed any more.
        drop(loaded.checkpoint.weights);
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&cache_path)
            .with_context(|| format!("opening {}", cache_path.display()))?;
        // A line cut by an interrupted write must not swallow the next one.
        if std::fs::read(&cache_path).is_ok_and(|b| b.last().is_some_and(|&c| c != b'\n')) {
            writeln!(file)?;
        }
        let bar = progress_bar(todo.len() as u64, "items");
        let mut running = Tally::default();
        for s in done.values() {
            running.add(s);
        }
        let started = Instant::now();
        for (item, ids) in &todo {
            let t = Instant::now();
            let (f, _) = mmlu::predict(&mut float, ids, &choice_ids)?;
            let q = match quantized.as_mut() {
                Some(m) => Some(mmlu::predict(m, ids, &choice_ids)?.0),
                None => None,
            };
            let scored = Scored {
                id: item.id.clone(),
                subject: item.subject.clone(),
                answer: item.answer,
                float: f,
                quant: q,
                prompt_tokens: ids.len(),
                secs: t.elapsed().as_secs_f64(),
            };
            writeln!(file, "{}", scored.to_json(&run_key))
                .with_context(|| format!("writing {}", cache_path.display()))?;
            file.flush()?;
            running.add(&scored);
            done.insert(scored.id.clone(), scored);
            bar.inc(1);
            bar.set_message(match quant {
                Some(_) => format!("float {:.1}% {preset} {:.1}%", running.float_pct(), running.quant_pct()),
                None => format!("float {:.1}%", running.float_pct()),
            });
        }
        bar.finish_and_clear();
        let secs = started.elapsed().as_secs_f64();
        eprintln!("scored {} items in {secs:.1}s ({:.2}s per item, both models)", todo.len(), secs / todo.len() as f64);
    }

    // Per-subject and average accuracy over the selected items.
    let mut rows: Vec<(String, Tally)> = Vec::new();
    for subject in &subjects {
        let mut tally = Tally::default();
        for item in subject.scored(Some(args.per_subject)) {
            let s = done.get(&item.id).with_context(|| format!("item {} was not scored", item.id))?;
            tally.add(s);
        }
        rows.push((subject.name.clone(), tally));
    }
    let n = rows.len() as f64;
    let avg_float = rows.iter().map(|(_, t)| t.float_pct()).sum::<f64>() / n;
    let avg_quant = rows.iter().map(|(_, t)| t.quant_pct()).sum::<f64>() / n;
    let mut overall = Tally::default();
    for (_, t) in &rows {
        overall.items += t.items;
        overall.float += t.float;
        overall.quant += t.quant;
    }
    let secs_per_item = {
        let all: Vec<f64> = work.iter().filter_map(|(i, _)| done.get(&i.id)).map(|s| s.secs).collect();
        all.iter().sum::<f64>() / all.len().max(1) as f64
    };
    let has_quant = quant.is_some();
    let q = |x: f64| if has_quant { json!(x) } else { Value::Null };
    let results = json!({
        "model": loaded.identity,
        "preset": preset,
        "shots": args.shots,
        "per_subject": args.per_subject,
        "calibration": calib_id,
        "items": overall.items,
        "average": { "float": avg_float, "quant": q(avg_quant), "diff": q(avg_quant - avg_float) },
        "overall": { "float": overall.float_pct(), "quant": q(overall.quant_pct()),
                     "diff": q(overall.quant_pct() - overall.float_pct()) },
        "mean_secs_per_item": secs_per_item,
        "subjects": rows.iter().map(|(name, t)| json!({
            "subject": name, "items": t.items, "float": t.float_pct(), "quant": q(t.quant_pct()),
            "diff": q(t.quant_pct() - t.float_pct()),
        })).collect::<Vec<_>>(),
    });
    let json_path = out.join("results.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&results)? + "\n")
        .with_context(|| format!("writing {}", json_path.display()))?;

    let mut md = format!(
        "# MMLU: {}\n\n{}-shot, {} scored items per subject (at most), preset `{preset}`, calibration `{calib_id}`\n\n",
        loaded.identity, args.shots, args.per_subject
    );
    md.push_str(&format!("| subject | items | float % | {preset} % | diff |\n|---|---|---|---|---|\n"));
    let cell = |x: f64, digits: usize| if has_quant { format!("{x:.digits$}") } else { "-".into() };
    let diff = |x: f64, digits: usize| if has_quant { format!("{x:+.digits$}") } else { "-".into() };
    for (name, t) in &rows {
        md.push_str(&format!(
            "| {name} | {} | {:.1} | {} | {} |\n",
            t.items,
            t.float_pct(),
            cell(t.quant_pct(), 1),
            diff(t.quant_pct() - t.float_pct(), 1)
        ));
    }
    md.push_str(&format!(
        "| **average ({} subjects)** | {} | **{avg_float:.2}** | **{}** | **{}** |\n",
        rows.len(),
        overall.items,
        cell(avg_quant, 2),
        diff(avg_quant - avg_float, 2)
    ));
    let md_path = out.join("results.md");
    std::fs::write(&md_path, &md).with_context(|| format!("writing {}", md_path.display()))?;

    println!(
        "average over {} subjects ({} items): float {avg_float:.2}%{}",
        rows.len(),
        overall.items,
        if has_quant {
            format!(", {preset} {avg_quant:.2}%, diff {:+.2} points", avg_quant - avg_float)
        } else {
            String::new()
        }
    );
    println!("mean time per item (all models): {secs_per_item:.2}s");
    println!("wrote {} and {}", json_path.display(), md_path.display());
    Ok(())
}
