//! `kiln`: the command-line tool. `check` reports every diagnostic of a program; `compile`
//! prints a stage of the pipeline or writes a package; `run` executes a program on a
//! checkpoint (or random weights), optionally decoding greedily; `serve` runs the
//! OpenAI-compatible server of `kiln-server` (on the GPU when there is one); `embed` prints sentence embeddings of texts;
//! `consensus` chooses among proposals by the consensus game of the stdlib; `bench kernels`
//! times the fused kernels on the GPU, `bench consensus` the consensus kernels.

mod bench;
mod bench_consensus;
mod bench_decode;
mod compile;
mod consensus;
mod embed;
mod progress;
mod run;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use kiln_ir::DType;
use kiln_lower::{Options, Program};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "kiln: a kernel compiler and inference runtime for NVIDIA GPUs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Parse and lower a program; print every diagnostic; exit non-zero on errors.
    Check(ProgramArgs),
    /// Compile a program: print a stage (`--emit`), the kernel statistics (`--stats`), or
    /// write a package of PTX, cubins and a manifest (`-o DIR`).
    Compile(compile::CompileArgs),
    /// Run a program's entry function on a checkpoint or on random weights.
    Run(run::RunArgs),
    /// Serve a model over an OpenAI-compatible HTTP API (on the GPU when there is one).
    Serve(ServeCommand),
    /// Benchmarks on the GPU: `kiln bench kernels`, `decode`, `serve`, `consensus`.
    Bench(bench::BenchArgs),
    /// Print sentence embeddings of texts (JSON, one line a text) with an encoder checkpoint.
    Embed(embed::EmbedArgs),
    /// Choose one of several proposals by the consensus game among agents (embeddings or
    /// texts in, the decision as JSON out).
    Consensus(consensus::ConsensusArgs),
}

#[derive(clap::Args)]
struct ServeCommand {
    #[command(flatten)]
    serve: kiln_server::ServeArgs,
    /// Where the model runs: the GPU if there is one (else the CPU backend, said once), the
    /// GPU, the CPU backend, or the reference interpreter.
    #[arg(long, value_enum, default_value_t = kiln_driver::backend::BackendChoice::Auto)]
    backend: kiln_driver::backend::BackendChoice,
}

/// `kiln serve`: the server with the runner of the chosen backend.
fn serve(args: ServeCommand) -> Result<ExitCode> {
    let threads = args.serve.to_config().interpreter_threads;
    let (factory, gpu) = kiln_driver::serve::factory(args.backend, threads)?;
    kiln_server::run_cli_on(args.serve.to_config_for(gpu), factory)?;
    Ok(ExitCode::SUCCESS)
}

#[derive(clap::Args)]
pub(crate) struct ProgramArgs {
    /// The .kiln source file.
    pub(crate) file: PathBuf,
    /// A Hugging Face config.json (or a model directory containing one) for the `config` block.
    #[arg(long)]
    pub(crate) config: Option<PathBuf>,
    /// The dtype of params whose declaration names none.
    #[arg(long, default_value = "f32")]
    pub(crate) param_dtype: String,
    /// Lower only this entry function (repeatable).
    #[arg(long = "entry")]
    pub(crate) entries: Vec<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Run(args) => run::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Serve(args) => serve(args),
        Command::Check(args) => {
            let (ok, _) = lower(&args)?;
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Compile(args) => compile::run(args),
        Command::Embed(args) => embed::run(args),
        Command::Consensus(args) => consensus::run(args),
    }
}

/// Reads a config.json given as a file or as a directory holding one.
pub(crate) fn read_config(path: &Path) -> Result<serde_json::Value> {
    kiln_driver::read_config_json(path)
}

/// Loads and lowers a program, printing its diagnostics to stderr.
pub(crate) fn lower(args: &ProgramArgs) -> Result<(bool, Option<kiln_lower::Lowered>)> {
    lower_from(args, None)
}

/// Like [`lower`]; `embedded` gives the program's text (a program shipped inside the binary,
/// named `args.file`) instead of reading `args.file`.
pub(crate) fn lower_from(
    args: &ProgramArgs,
    embedded: Option<&str>,
) -> Result<(bool, Option<kiln_lower::Lowered>)> {
    let Some(param_dtype) = DType::from_name(&args.param_dtype) else {
        bail!("unknown dtype `{}` for --param-dtype", args.param_dtype);
    };
    let config = args.config.as_deref().map(read_config).transpose()?;
    let (program, mut diags) = match embedded {
        Some(source) => Program::load_source(&args.file.display().to_string(), source, None),
        None => {
            Program::load(&args.file).with_context(|| format!("reading {}", args.file.display()))?
        }
    };
    let options = Options {
        param_dtype,
        entries: (!args.entries.is_empty()).then(|| args.entries.clone()),
    };
    let parse_failed = diags.iter().any(|d| d.is_error());
    let lowered = if parse_failed {
        None
    } else {
        let (lowered, mut more) = kiln_lower::lower(&program, config.as_ref(), &options);
        diags.append(&mut more);
        lowered
    };
    eprint!("{}", program.sources.render(&diags));
    let errors = diags.iter().filter(|d| d.is_error()).count();
    if errors > 0 {
        eprintln!("{errors} error{} found", if errors == 1 { "" } else { "s" });
    }
    Ok((errors == 0, lowered))
}
