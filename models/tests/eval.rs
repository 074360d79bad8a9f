//! Accuracy tooling: MMLU loading, splits, prompts and scoring on a synthetic file; perplexity
//! and agreement on hand-built logits and tiny random-weight models.

use candle_ascend_models::eval::mmlu::{self, EXEMPLAR_POOL, Mmlu, Split, split_of};
use candle_ascend_models::eval::ppl;
use candle_ascend_models::random::{random_token_ids, random_weights};
use candle_ascend_models::{Architecture, CacheConfig, CpuBackend, ModelConfig, ModelError, Transformer, fetch};
use candle_core::{DType, Device, Tensor};
use std::collections::HashSet;
use std::path::Path;

fn row(subject: &str, n: usize, answer: &str) -> String {
    serde_json::json!({
        "question": format!("  {subject} question {n}?  "),
        "answer_a": format!("{subject} a{n}"),
        "answer_b": format!("{subject} b{n}"),
        "answer_c": format!("{subject} c{n}"),
        "answer_d": format!("{subject} d{n}"),
        "correct_answer": answer,
        "topic": subject,
    })
    .to_string()
}

/// 30 rows of "alpha beta" and 12 of "gamma", interleaved, plus one row without an A-D answer
/// and a blank line.
fn synthetic_jsonl() -> String {
    let letters = ["A", "B", "C", "D"];
    let mut lines = Vec::new();
    let mut gamma = 0;
    for n in 0..30 {
        lines.push(row("alpha beta", n, letters[n % 4]));
        if n % 3 == 1 && gamma < 12 {
            lines.push(row("gamma", gamma, letters[(gamma + 1) % 4]));
            gamma += 1;
        }
        if n == 10 {
            lines.push(row("alpha beta", 999, "answer"));
            lines.push(String::new());
        }
    }
    while gamma < 12 {
        lines.push(row("gamma", gamma, letters[(gamma + 1) % 4]));
        gamma += 1;
    }
    lines.join("\n") + "\n"
}

fn load_synthetic() -> (tempfile::TempDir, Mmlu) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mmlu.jsonl");
    std::fs::write(&path, synthetic_jsonl()).unwrap();
    let data = Mmlu::load(&path).unwrap();
    (dir, data)
}

#[test]
fn mmlu_groups_subjects_in_file_order_and_drops_bad_answers() {
    let (_dir, data) = load_synthetic();
    assert_eq!(data.dropped(), 1);
    let names: Vec<&str> = data.subjects().iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["alpha_beta", "gamma"]);
    let alpha = &data.subjects()[0];
    assert_eq!(alpha.items.len(), 30);
    assert_eq!(alpha.display_name(), "alpha beta");
    assert_eq!(data.len(), 42);
    for (i, item) in alpha.items.iter().enumerate() {
        assert_eq!(item.index, i);
        assert_eq!(item.id, format!("alpha_beta/{i}"));
        assert_eq!(item.question, format!("alpha beta question {i}?"), "fields are trimmed");
        assert_eq!(item.answer, i % 4);
    }
    assert_eq!(data.subject("Alpha Beta").map(|s| s.items.len()), Some(30));
    assert_eq!(data.subject("ALPHA_BETA").map(|s| s.name.as_str()), Some("alpha_beta"));
    let picked = data.select(&["gamma", "alpha beta"]).unwrap();
    assert_eq!(picked.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["gamma", "alpha_beta"]);
    assert_eq!(data.select::<&str>(&[]).unwrap().len(), 2);
    let err = data.select(&["delta"]).unwrap_err();
    assert!(matches!(err, ModelError::InvalidInput(_)) && err.to_string().contains("alpha_beta"), "{err}");
    assert!(data.select(&["gamma", "Gamma"]).is_err());
}

#[test]
fn splits_are_disjoint_complete_and_deterministic() {
    let (_dir, data) = load_synthetic();
    let (_dir2, again) = load_synthetic();
    assert_eq!(data, again);
    assert_eq!(data.calibration_text(), again.calibration_text());
    assert_eq!(data.held_out_text(), again.held_out_text());

    let alpha = data.subject("alpha_beta").unwrap();
    let indices = |split: Split| alpha.split(split).map(|i| i.index).collect::<Vec<_>>();
    assert_eq!(indices(Split::Exemplar), [0, 1, 2, 3, 4]);
    assert_eq!(indices(Split::Calibration), [5, 13, 21, 29]);
    assert_eq!(indices(Split::HeldOut), [9, 17, 25]);
    let scored = indices(Split::Scored);
    assert_eq!(scored.len(), 30 - 5 - 4 - 3);
    assert_eq!(&scored[..5], [6, 7, 8, 10, 11]);

    for subject in data.subjects() {
        let mut seen = HashSet::new();
        for split in [Split::Exemplar, Split::Calibration, Split::HeldOut, Split::Scored] {
            for item in subject.split(split) {
                assert!(seen.insert(item.id.clone()), "{} is in two splits", item.id);
                assert_eq!(split_of(item.index), split);
            }
        }
        assert_eq!(seen.len(), subject.items.len(), "every item is in one split");
    }
}

#[test]
fn per_subject_takes_the_first_scored_items() {
    let (_dir, data) = load_synthetic();
    let gamma = data.subject("gamma").unwrap();
    let all = gamma.scored(None);
    assert_eq!(all.len(), 12 - 5 - 1 - 1);
    let three = gamma.scored(Some(3));
    assert_eq!(three.iter().map(|i| i.index).collect::<Vec<_>>(), [6, 7, 8]);
    assert_eq!(gamma.scored(Some(100)).len(), all.len());
    assert!(all.iter().all(|i| i.index >= EXEMPLAR_POOL && i.split() == Split::Scored));
}

#[test]
fn prompt_format_is_exact_and_exemplars_are_never_scored() {
    let (_dir, data) = load_synthetic();
    let gamma = data.subject("gamma").unwrap();
    let item = gamma.scored(Some(1))[0];
    assert_eq!(item.index, 6);
    let expected = "The following are multiple choice questions (with answers) about gamma.\n\n\
        gamma question 0?\nA. gamma a0\nB. gamma b0\nC. gamma c0\nD. gamma d0\nAnswer: B\n\n\
        gamma question 1?\nA. gamma a1\nB. gamma b1\nC. gamma c1\nD. gamma d1\nAnswer: C\n\n\
        gamma question 6?\nA. gamma a6\nB. gamma b6\nC. gamma c6\nD. gamma d6\nAnswer:";
    assert_eq!(gamma.prompt(item, 2).unwrap(), expected);
    let zero = gamma.prompt(item, 0).unwrap();
    assert_eq!(
        zero,
        "The following are multiple choice questions (with answers) about gamma.\n\n\
         gamma question 6?\nA. gamma a6\nB. gamma b6\nC. gamma c6\nD. gamma d6\nAnswer:"
    );
    // Five shots are the whole pool; more is refused, and an exemplar cannot be its own shot.
    let five = gamma.prompt(item, 5).unwrap();
    for e in gamma.exemplars(5).unwrap() {
        assert!(five.contains(&format!("{}\n", e.question)));
        assert_eq!(e.split(), Split::Exemplar);
    }
    assert!(matches!(gamma.prompt(item, 6), Err(ModelError::InvalidInput(_))));
    assert!(gamma.prompt(&gamma.items[3], 5).is_err());
    let alpha = data.subject("alpha beta").unwrap();
    assert!(alpha.prompt(&alpha.items[6], 0).unwrap().contains("about alpha beta.\n\n"));
}

#[test]
fn calibration_and_held_out_texts_hold_their_split_only_round_robin() {
    let (_dir, data) = load_synthetic();
    let calib = data.calibration_text();
    let held = data.held_out_text();
    for subject in data.subjects() {
        for item in &subject.items {
            let needle = format!("{}\n", item.question);
            assert_eq!(calib.contains(&needle), item.split() == Split::Calibration, "{}", item.id);
            assert_eq!(held.contains(&needle), item.split() == Split::HeldOut, "{}", item.id);
        }
    }
    // Each block is the header and the answered item; blocks alternate between subjects.
    let first = data.subject("alpha_beta").unwrap().split(Split::Calibration).next().unwrap();
    let second = data.subject("gamma").unwrap().split(Split::Calibration).next().unwrap();
    let expected_start = format!(
        "{}{}{}{}",
        mmlu::header("alpha beta"),
        mmlu::format_item(first, true),
        mmlu::header("gamma"),
        mmlu::format_item(second, true)
    );
    assert!(calib.starts_with(&expected_start), "{calib}");
    assert!(mmlu::format_item(first, true).ends_with(&format!("Answer: {}\n\n", first.answer_letter())));
}

#[test]
fn malformed_files_are_reported_with_their_line() {
    let src = Path::new("x.jsonl");
    let good = row("gamma", 0, "A");
    let err = Mmlu::from_jsonl(&format!("{good}\n{{\"question\": 1}}\n"), src).unwrap_err();
    assert!(matches!(err, ModelError::BadFile { .. }) && err.to_string().contains("line 2"), "{err}");
    let err = Mmlu::from_jsonl(&row("gamma", 0, "E"), src).unwrap_err();
    assert!(err.to_string().contains("no MMLU item"), "{err}");
    assert!(matches!(Mmlu::load(Path::new("/nonexistent/mmlu.jsonl")), Err(ModelError::BadFile { .. })));
}

#[test]
fn pick_takes_the_largest_choice_logit() {
    let mut logits = vec![0f32; 10];
    logits[9] = 100.0; // not a choice: ignored
    logits[3] = 2.0;
    logits[5] = 3.0;
    let (best, scores) = mmlu::pick(&logits, &[1, 3, 5, 7]).unwrap();
    assert_eq!((best, scores), (2, [0.0, 2.0, 3.0, 0.0]));
    assert_eq!(mmlu::pick(&[1.0; 8], &[1, 3, 5, 7]).unwrap().0, 0, "ties go to A");
    assert!(mmlu::pick(&logits, &[1, 3, 5, 70]).is_err());
}

#[test]
fn nll_is_a_stable_log_softmax() {
    let uniform = [0.5f32; 4];
    for t in 0..4 {
        assert!((ppl::token_nll(&uniform, t).unwrap() - 4f64.ln()).abs() < 1e-12);
    }
    // Large logits neither overflow nor lose the small probabilities.
    let big = [1000f32, 0.0, -1000.0];
    assert!(ppl::token_nll(&big, 0).unwrap().abs() < 1e-12);
    assert!((ppl::token_nll(&big, 1).unwrap() - 1000.0).abs() < 1e-9);
    assert!((ppl::token_nll(&big, 2).unwrap() - 2000.0).abs() < 1e-9);
    // Against the textbook formula on moderate values.
    let logits = [0.3f32, -1.2, 2.5, 0.0, 1.1];
    let lse = logits.iter().map(|&x| (x as f64).exp()).sum::<f64>().ln();
    for t in 0..5 {
        let expected = lse - logits[t] as f64;
        assert!((ppl::token_nll(&logits, t as u32).unwrap() - expected).abs() < 1e-12);
    }
    assert!(ppl::token_nll(&logits, 5).is_err());
    assert_eq!(ppl::argmax(&[1.0, 3.0, 3.0, -1.0]), 1);
    assert_eq!(ppl::argmax(&[f32::NAN, 0.0, 2.0]), 2);
}

#[test]
fn windows_cut_the_text_without_overlap() {
    let ids: Vec<u32> = (0..10).collect();
    let w = ppl::windows(&ids, 4).unwrap();
    assert_eq!(w, [&ids[0..4], &ids[4..8], &ids[8..10]]);
    let w = ppl::windows(&ids[..9], 4).unwrap();
    assert_eq!(w.len(), 2, "a trailing one-token window predicts nothing");
    assert!(ppl::windows(&ids, 1).is_err());
}

fn tiny_config(tied: bool) -> ModelConfig {
    ModelConfig {
        architecture: Architecture::Qwen2,
        vocab_size: 96,
        hidden_size: 32,
        intermediate_size: 48,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 8,
        rms_norm_eps: 1e-6,
        rope_theta: 10_000.0,
        max_position_embeddings: 256,
        tie_word_embeddings: tied,
        attention_bias: true,
        bos_token_id: None,
        eos_token_ids: vec![],
    }
}

fn tiny_model(config: &ModelConfig, weights: &candle_ascend_models::loader::Weights) -> Transformer<CpuBackend> {
    let cache = CacheConfig { max_batch: 1, max_seq_len: 64 };
    Transformer::new(CpuBackend::new(DType::F32).unwrap(), config.clone(), weights, cache).unwrap()
}

#[test]
fn uniform_logits_have_the_vocabulary_size_as_perplexity() {
    let config = tiny_config(false);
    let mut weights = random_weights(&config, 7).unwrap();
    let zeros = Tensor::zeros((config.vocab_size, config.hidden_size), DType::F32, &Device::Cpu).unwrap();
    weights.insert("lm_head.weight", zeros);
    let mut model = tiny_model(&config, &weights);
    let ids = random_token_ids(config.vocab_size, 100, 3);
    let p = ppl::perplexity(&mut model, &ids, 32).unwrap();
    assert_eq!(p.tokens, 31 + 31 + 31 + 3, "windows of 32, 32, 32 and 4 tokens");
    assert!((p.ppl - config.vocab_size as f64).abs() < 1e-9 * config.vocab_size as f64, "{p:?}");
}

#[test]
fn perplexity_matches_a_manual_computation_per_window() {
    let config = tiny_config(true);
    let weights = random_weights(&config, 11).unwrap();
    let mut model = tiny_model(&config, &weights);
    let ids = random_token_ids(config.vocab_size, 50, 5);
    let p = ppl::perplexity(&mut model, &ids, 20).unwrap();
    assert!(p.ppl.is_finite() && p.ppl > 1.0, "{p:?}");

    let (mut sum, mut count) = (0f64, 0usize);
    for chunk in ids.chunks(20) {
        let logits = model.forward_all(chunk, chunk.len(), &[0], &[chunk.len()]).unwrap();
        let rows = logits.squeeze(0).unwrap().to_vec2::<f32>().unwrap();
        for i in 0..chunk.len() - 1 {
            let lse = rows[i].iter().map(|&x| (x as f64).exp()).sum::<f64>().ln();
            sum += lse - rows[i][chunk[i + 1] as usize] as f64;
            count += 1;
        }
    }
    assert_eq!(p.tokens, count);
    assert!((p.mean_nll - sum / count as f64).abs() < 1e-9, "{} vs {}", p.mean_nll, sum / count as f64);
    assert!((p.ppl - p.mean_nll.exp()).abs() < 1e-12);
}

#[test]
fn the_same_model_twice_agrees_everywhere() {
    let config = tiny_config(true);
    let weights = random_weights(&config, 13).unwrap();
    let mut a = tiny_model(&config, &weights);
    let mut b = tiny_model(&config, &weights);
    let ids = random_token_ids(config.vocab_size, 70, 9);
    let c = ppl::compare(&mut a, &mut b, &ids, 32).unwrap();
    assert_eq!(c.agreement, 1.0);
    assert_eq!(c.ppl_float, c.ppl_quant);
    assert_eq!(c.ratio(), 1.0);
    assert_eq!(c.tokens, 31 + 31 + 5);
    assert_eq!(c.ppl_float, ppl::perplexity(&mut a, &ids, 32).unwrap().ppl);

    // A different model disagrees somewhere.
    let other = random_weights(&config, 14).unwrap();
    let mut d = tiny_model(&config, &other);
    let c = ppl::compare(&mut a, &mut d, &ids, 32).unwrap();
    assert!(c.agreement < 1.0, "{c:?}");
}

#[test]
fn bad_perplexity_requests_are_rejected() {
    let config = tiny_config(true);
    let weights = random_weights(&config, 17).unwrap();
    let mut model = tiny_model(&config, &weights);
    let err = ppl::perplexity(&mut model, &[1, 2, 3], 128).unwrap_err();
    assert!(matches!(err, ModelError::InvalidInput(_)) && err.to_string().contains("KV cache"), "{err}");
    assert!(matches!(ppl::perplexity(&mut model, &[1], 16), Err(ModelError::InvalidInput(_))));
    assert!(matches!(ppl::perplexity(&mut model, &[1, 200], 16), Err(ModelError::InvalidInput(_))));
}

#[test]
fn predict_scores_the_last_position() {
    let config = tiny_config(true);
    let weights = random_weights(&config, 19).unwrap();
    let mut model = tiny_model(&config, &weights);
    let prompt = random_token_ids(config.vocab_size, 12, 2);
    let choices = [10, 20, 30, 40];
    let (best, scores) = mmlu::predict(&mut model, &prompt, &choices).unwrap();
    let all = model.forward_all(&prompt, 12, &[0], &[12]).unwrap().squeeze(0).unwrap().to_vec2::<f32>().unwrap();
    let last = &all[11];
    assert_eq!(scores, choices.map(|c| last[c as usize]));
    assert_eq!(best, mmlu::pick(last, &choices).unwrap().0);
    assert!(mmlu::predict(&mut model, &[], &choices).is_err());
}

/// The real SmolLM2 tokenizer (CI fetches the model): " A" .. " D" are single, distinct tokens.
#[test]
fn real_tokenizer_has_single_token_choices() {
    let artifact = fetch::find_known(fetch::DEFAULT_LLAMA).unwrap();
    let path = fetch::ensure(artifact, &fetch::cache_dir(None)).unwrap();
    let ck = candle_ascend_models::loader::load_checkpoint(&path, DType::F32).unwrap();
    let ids = mmlu::choice_token_ids(&ck.tokenizer.tokenizer).unwrap();
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 4);
    for (id, letter) in ids.iter().zip(mmlu::LETTERS) {
        assert_eq!(ck.tokenizer.tokenizer.decode(&[*id], false).unwrap(), format!(" {letter}"));
    }
}
