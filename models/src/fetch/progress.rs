//! Status lines and progress bars for fetching.
//!
//! One-line status messages always go to stderr (unless quiet); bars are drawn only when stderr is
//! a terminal, so logs in CI stay readable.

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::time::Duration;

#[derive(Debug, Clone, Copy)]
pub(crate) struct Reporter {
    quiet: bool,
    bars: bool,
}

impl Reporter {
    pub(crate) fn new(quiet: bool) -> Self {
        Self { quiet, bars: !quiet && std::io::stderr().is_terminal() }
    }

    /// Prints one status line to stderr.
    pub(crate) fn status(&self, message: &str) {
        if !self.quiet {
            eprintln!("[fetch] {message}");
        }
        tracing::info!(target: "candle_ascend_models::fetch", "{message}");
    }

    /// A byte-counting bar of `len` bytes (hidden when stderr is not a terminal).
    pub(crate) fn bytes(&self, len: u64, message: String) -> ProgressBar {
        if !self.bars {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::new(len);
        if let Ok(style) =
            ProgressStyle::with_template("{msg:18} [{wide_bar}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
        {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(message);
        bar
    }

    /// A spinner for work of unknown length (pip downloads).
    pub(crate) fn spinner(&self, message: String) -> ProgressBar {
        if !self.bars {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::new_spinner();
        if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} ({elapsed})") {
            bar.set_style(style);
        }
        bar.set_message(message);
        bar.enable_steady_tick(Duration::from_millis(120));
        bar
    }
}
