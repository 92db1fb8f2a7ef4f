//! The pass abstraction and the pipeline that runs named passes over every function of a
//! module, verifying the IR after each pass and capturing its text after a chosen one.
//!
//! A [`Pass`] is a name and a function `fn(&mut Function) -> Result<bool, IrError>` that
//! rewrites one function and says whether it changed it. A [`Pipeline`] is a list of steps:
//! a pass run once, or a group of passes repeated, in order, until a whole round changes
//! nothing (bounded by a round count). Each pass runs over every function of the module
//! before the next pass starts, so that the module can be printed between passes.
//!
//! Verification ([`kiln_ir::verify_function`]) runs on the input and after every pass on
//! every function when the crate is built with debug assertions, or when
//! [`RunOptions::verify_each_pass`] asks for it.

use crate::{canonicalize, constfold, cse, dce};
use kiln_ir::{verify_function, Function, IrError, Module};
use std::fmt;

/// One named graph pass.
#[derive(Clone, Copy)]
pub struct Pass {
    /// The name `--print-after` and pipelines refer to.
    pub name: &'static str,
    /// One line on what the pass does.
    pub summary: &'static str,
    /// Rewrites one function; returns whether it changed anything. Never creates invalid IR
    /// from valid IR (the verifier checks that after each pass).
    pub run: fn(&mut Function) -> Result<bool, IrError>,
}

impl fmt::Debug for Pass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pass({})", self.name)
    }
}

/// Every pass this crate defines, in the order of the default pipeline.
pub fn all_passes() -> &'static [Pass] {
    const ALL: &[Pass] = &[canonicalize::PASS, constfold::PASS, cse::PASS, dce::PASS];
    ALL
}

/// The pass called `name`; the error lists the known names.
pub fn pass_by_name(name: &str) -> Result<Pass, OptError> {
    all_passes()
        .iter()
        .copied()
        .find(|p| p.name == name)
        .ok_or_else(|| OptError::UnknownPass {
            name: name.to_string(),
            known: all_passes().iter().map(|p| p.name).collect(),
        })
}

/// The rounds the default pipeline allows its fixed-point group.
pub const DEFAULT_MAX_ROUNDS: usize = 8;

/// The graph-pass pipeline of the compiler: canonicalize, constfold and cse repeated until
/// nothing changes (at most [`DEFAULT_MAX_ROUNDS`] rounds), then dce.
pub fn default_pipeline() -> Pipeline {
    Pipeline::new()
        .repeat_until_fixed_point(
            &[canonicalize::PASS, constfold::PASS, cse::PASS],
            DEFAULT_MAX_ROUNDS,
        )
        .then(dce::PASS)
}

/// Runs the default pipeline over `module` with the default options.
pub fn optimize(module: &mut Module) -> Result<(), OptError> {
    default_pipeline().run(module).map(|_| ())
}

/// One step of a pipeline.
#[derive(Clone, Debug)]
pub enum Step {
    /// The pass runs once.
    Once(Pass),
    /// The passes run in order, round after round, until a round changes nothing or
    /// `max_rounds` rounds have run.
    FixedPoint {
        passes: Vec<Pass>,
        max_rounds: usize,
    },
}

/// An ordered list of passes (see the module doc).
#[derive(Clone, Debug, Default)]
pub struct Pipeline {
    steps: Vec<Step>,
}

/// How [`Pipeline::run_with`] runs.
#[derive(Clone, Copy, Debug, Default)]
pub struct RunOptions<'a> {
    /// Verify the input and every function after every pass even without debug assertions
    /// (with them, verification always runs).
    pub verify_each_pass: bool,
    /// Print the module after the first run of the pass with this name.
    pub print_after: Option<&'a str>,
}

/// What a pipeline run did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunReport {
    /// The module's text after the first run of `print_after`'s pass (`None` when no pass
    /// was named).
    pub printed: Option<String>,
    /// Every pass run in order: its name, the round (1 for a pass run once) and whether it
    /// changed the module.
    pub runs: Vec<PassRun>,
}

/// One run of one pass over a module.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PassRun {
    pub pass: &'static str,
    pub round: usize,
    pub changed: bool,
}

/// An error of the pass pipeline.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum OptError {
    #[error("unknown pass `{name}`; the known passes are: {}", known.join(", "))]
    UnknownPass {
        name: String,
        known: Vec<&'static str>,
    },
    #[error("the IR given to the pass pipeline is invalid: {0}")]
    InvalidInput(IrError),
    #[error("pass {pass} failed on @{function}: {error}")]
    PassFailed {
        pass: &'static str,
        function: String,
        error: IrError,
    },
    #[error("the IR is invalid after pass {pass}: {error}")]
    InvalidAfterPass { pass: &'static str, error: IrError },
}

impl Pipeline {
    /// An empty pipeline.
    pub fn new() -> Pipeline {
        Pipeline::default()
    }

    /// Appends a pass that runs once.
    pub fn then(mut self, pass: Pass) -> Pipeline {
        self.steps.push(Step::Once(pass));
        self
    }

    /// Appends a group of passes repeated until a round changes nothing (at most
    /// `max_rounds` rounds).
    pub fn repeat_until_fixed_point(mut self, passes: &[Pass], max_rounds: usize) -> Pipeline {
        self.steps.push(Step::FixedPoint {
            passes: passes.to_vec(),
            max_rounds,
        });
        self
    }

    /// A pipeline that runs the named passes once each, in order.
    pub fn from_names(names: &[&str]) -> Result<Pipeline, OptError> {
        names
            .iter()
            .try_fold(Pipeline::new(), |p, name| Ok(p.then(pass_by_name(name)?)))
    }

    pub fn steps(&self) -> &[Step] {
        &self.steps
    }

    /// The names of the pipeline's passes, each once, in the order they first run.
    pub fn pass_names(&self) -> Vec<&'static str> {
        let mut names = Vec::new();
        for step in &self.steps {
            let passes = match step {
                Step::Once(pass) => std::slice::from_ref(pass),
                Step::FixedPoint { passes, .. } => passes.as_slice(),
            };
            for pass in passes {
                if !names.contains(&pass.name) {
                    names.push(pass.name);
                }
            }
        }
        names
    }

    /// Runs the pipeline over every function of `module` with the default options.
    pub fn run(&self, module: &mut Module) -> Result<RunReport, OptError> {
        self.run_with(module, &RunOptions::default())
    }

    /// Runs the pipeline over every function of `module`. Fails before touching the module
    /// when `print_after` names no pass of this pipeline.
    pub fn run_with(
        &self,
        module: &mut Module,
        options: &RunOptions<'_>,
    ) -> Result<RunReport, OptError> {
        if let Some(name) = options.print_after {
            let known = self.pass_names();
            if !known.contains(&name) {
                return Err(OptError::UnknownPass {
                    name: name.to_string(),
                    known,
                });
            }
        }
        let mut run = Run {
            module,
            verify: options.verify_each_pass || cfg!(debug_assertions),
            print_after: options.print_after,
            report: RunReport::default(),
        };
        if run.verify {
            for func in &run.module.functions {
                verify_function(func).map_err(OptError::InvalidInput)?;
            }
        }
        for step in &self.steps {
            match step {
                Step::Once(pass) => {
                    run.pass(*pass, 1)?;
                }
                Step::FixedPoint { passes, max_rounds } => {
                    for round in 1..=*max_rounds {
                        let mut changed = false;
                        for pass in passes {
                            changed |= run.pass(*pass, round)?;
                        }
                        if !changed {
                            break;
                        }
                    }
                }
            }
        }
        Ok(run.report)
    }
}

/// The state of one pipeline run.
struct Run<'m, 'o> {
    module: &'m mut Module,
    verify: bool,
    print_after: Option<&'o str>,
    report: RunReport,
}

impl Run<'_, '_> {
    /// Runs `pass` over every function; returns whether it changed any.
    fn pass(&mut self, pass: Pass, round: usize) -> Result<bool, OptError> {
        let mut changed = false;
        for func in &mut self.module.functions {
            changed |= (pass.run)(func).map_err(|error| OptError::PassFailed {
                pass: pass.name,
                function: func.name.clone(),
                error,
            })?;
            if self.verify {
                verify_function(func).map_err(|error| OptError::InvalidAfterPass {
                    pass: pass.name,
                    error,
                })?;
            }
        }
        self.report.runs.push(PassRun {
            pass: pass.name,
            round,
            changed,
        });
        if self.report.printed.is_none() && self.print_after == Some(pass.name) {
            self.report.printed = Some(self.module.to_string());
        }
        Ok(changed)
    }
}
