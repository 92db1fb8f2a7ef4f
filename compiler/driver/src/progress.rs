//! Progress bars on stderr (indicatif) for the long steps of the command line — loading a
//! checkpoint, compiling kernels — drawn only when stderr is a terminal; a one-line summary
//! of each step is printed either way.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use kiln_runtime::{Progress, ProgressUnit};
use std::io::IsTerminal;
use std::time::Instant;

/// [`Progress`] drawn as indicatif bars.
pub(crate) struct Bars {
    visible: bool,
    bar: Option<ProgressBar>,
    what: String,
    total: u64,
    unit: ProgressUnit,
    started: Instant,
}

impl Bars {
    /// Bars on stderr, hidden unless stderr is a terminal.
    pub(crate) fn stderr() -> Bars {
        Bars {
            visible: std::io::stderr().is_terminal(),
            bar: None,
            what: String::new(),
            total: 0,
            unit: ProgressUnit::Items,
            started: Instant::now(),
        }
    }

    /// A spinner for a step of unknown length; `finish` ends it.
    pub(crate) fn spinner(&mut self, what: &str) {
        self.start(what, 0, ProgressUnit::Items);
    }
}

impl Progress for Bars {
    fn start(&mut self, what: &str, total: u64, unit: ProgressUnit) {
        self.finish();
        let target = if self.visible {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        let (bar, template) = match (total, unit) {
            (0, _) => (ProgressBar::new_spinner(), "{spinner} {msg} {elapsed}"),
            (n, ProgressUnit::Bytes) => (
                ProgressBar::new(n),
                "{msg} [{bar:24}] {binary_bytes}/{binary_total_bytes} {eta}",
            ),
            (n, ProgressUnit::Items) => (
                ProgressBar::new(n),
                "{msg} [{bar:24}] {pos}/{len} {elapsed}",
            ),
        };
        if let Ok(style) = ProgressStyle::with_template(template) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_draw_target(target);
        bar.set_message(format!("kiln: {what}"));
        if total == 0 {
            bar.enable_steady_tick(std::time::Duration::from_millis(120));
        }
        self.bar = Some(bar);
        self.what = what.to_string();
        self.total = total;
        self.unit = unit;
        self.started = Instant::now();
    }

    fn advance(&mut self, done: u64) {
        if let Some(bar) = &self.bar {
            bar.set_position(done);
        }
    }

    fn finish(&mut self) {
        let Some(bar) = self.bar.take() else { return };
        bar.finish_and_clear();
        let seconds = self.started.elapsed().as_secs_f64();
        match self.unit {
            ProgressUnit::Bytes => eprintln!(
                "kiln: {}: {:.1} MiB in {seconds:.2} s",
                self.what,
                self.total as f64 / (1u64 << 20) as f64
            ),
            ProgressUnit::Items => eprintln!("kiln: {} in {seconds:.2} s", self.what),
        }
    }
}

impl Drop for Bars {
    fn drop(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}
