//! How far long steps have got (loading a checkpoint's tensors, compiling a program's
//! kernels): the library reports through [`Progress`]; the command line draws bars from it,
//! everything else passes [`NoProgress`].

/// What a step counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgressUnit {
    /// Bytes (checkpoint tensors).
    Bytes,
    /// Items (kernels, passes).
    Items,
}

/// Receives the progress of long steps. A step is `start`ed, `advance`d any number of times
/// and `finish`ed; steps never nest.
pub trait Progress {
    /// A step called `what` begins; `total` units of `unit` are to be done (0: unknown).
    fn start(&mut self, what: &str, total: u64, unit: ProgressUnit);
    /// `done` units of the current step are done (a running count, not an increment).
    fn advance(&mut self, done: u64);
    /// The current step is over.
    fn finish(&mut self);
}

/// Progress that goes nowhere.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&mut self, _what: &str, _total: u64, _unit: ProgressUnit) {}
    fn advance(&mut self, _done: u64) {}
    fn finish(&mut self) {}
}
