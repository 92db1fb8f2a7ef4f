//! `kiln compile`: prints a stage of the pipeline (the AST, the graph IR before or after
//! the passes or after one pass, the fused kernels and plans, the PTX of one target), the
//! per-kernel statistics, or writes a package directory (PTX, cubins, fatbin, manifest).

use crate::{lower, ProgramArgs};
use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use kiln_driver::pipeline::{self, CompileOptions};
use kiln_ptx::{Target, Toolchain};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub(crate) struct CompileArgs {
    #[command(flatten)]
    program: ProgramArgs,
    /// The stage to print.
    #[arg(long, value_enum, default_value_t = Emit::Opt)]
    emit: Emit,
    /// Print the graph IR right after this pass of the optimization pipeline
    /// (canonicalize, constfold, cse, dce) instead.
    #[arg(long, value_name = "PASS")]
    print_after: Option<String>,
    /// Print, per function and per decoder layer, the kernels, the ops fused into each and
    /// the bytes each must move.
    #[arg(long)]
    stats: bool,
    /// Values of symbolic dims for --stats byte counts, as NAME=VALUE (repeatable).
    #[arg(long = "sym", value_name = "NAME=VALUE")]
    symbols: Vec<String>,
    /// Comma-separated SM targets (sm_80, sm_89, sm_90a, sm_100a, sm_120).
    #[arg(long, default_value = "sm_80,sm_89,sm_90a,sm_100a,sm_120")]
    arch: String,
    /// Write the package (manifest.json, kernels.fatbin, PTX and ptxas logs) to this
    /// directory; needs ptxas (see scripts/install-ptxas.sh).
    #[arg(short = 'o', long = "out")]
    out: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Emit {
    /// The syntax tree of the root file.
    Ast,
    /// The graph IR as lowered, before any pass.
    Ir,
    /// The graph IR after the optimization pipeline.
    Opt,
    /// The fused kernels (kernel IR) and the execution plans.
    Kir,
    /// The PTX of the first --arch target.
    Ptx,
}

fn targets(arch: &str) -> Result<Vec<Target>> {
    arch.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse::<Target>().map_err(anyhow::Error::from))
        .collect()
}

pub(crate) fn run(args: CompileArgs) -> Result<ExitCode> {
    if args.emit == Emit::Ast && args.out.is_none() && !args.stats {
        let source = std::fs::read_to_string(&args.program.file)
            .with_context(|| format!("reading {}", args.program.file.display()))?;
        let mut sources = kiln_syntax::SourceMap::new();
        let id = sources.add(args.program.file.display().to_string(), source.clone());
        let (ast, diags) = kiln_syntax::parse(&source, id);
        eprint!("{}", sources.render(&diags));
        println!("{ast:#?}");
        return Ok(if diags.iter().any(|d| d.is_error()) {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        });
    }
    let (ok, lowered) = lower(&args.program)?;
    let Some(mut lowered) = lowered.filter(|_| ok) else {
        return Ok(ExitCode::FAILURE);
    };
    if let Some(pass) = &args.print_after {
        let options = kiln_opt::RunOptions {
            print_after: Some(pass.as_str()),
            ..Default::default()
        };
        let report = kiln_opt::default_pipeline().run_with(&mut lowered.module, &options)?;
        match report.printed {
            Some(text) => print!("{text}"),
            None => bail!("the pipeline never ran `{pass}`"),
        }
        return Ok(ExitCode::SUCCESS);
    }
    let options = CompileOptions {
        targets: targets(&args.arch)?,
        ..CompileOptions::default()
    };
    if let Some(out) = &args.out {
        let toolchain = Toolchain::discover().context("`kiln compile -o` assembles with ptxas")?;
        let program = args.program.file.display().to_string();
        use kiln_runtime::Progress;
        let mut bars = crate::progress::Bars::stderr();
        let target_names: Vec<&str> = options.targets.iter().map(|t| t.sm_name()).collect();
        bars.spinner(&format!(
            "compiling {program} for {} (fuse, emit PTX, ptxas, fatbin)",
            target_names.join(", ")
        ));
        let package = pipeline::compile(&program, lowered, &options, Some(&toolchain));
        bars.finish();
        let package = package?;
        package.write(out)?;
        let spills: Vec<String> = package
            .manifest
            .resources
            .iter()
            .filter(|r| r.spill_bytes > 0)
            .map(|r| format!("{} on {} ({} bytes)", r.kernel, r.target, r.spill_bytes))
            .collect();
        eprintln!(
            "kiln: wrote {} kernels for {} to {}",
            package.compiled.kernels.len(),
            package.manifest.targets.join(", "),
            out.display()
        );
        if !spills.is_empty() {
            eprintln!("kiln: register spills: {}", spills.join("; "));
        }
        if args.stats {
            print!(
                "{}",
                package.compiled.stats.table(&symbol_values(&args.symbols)?)
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    match args.emit {
        Emit::Ast => unreachable!("handled above"),
        Emit::Ir if !args.stats => print!("{}", lowered.module),
        Emit::Opt if !args.stats => {
            kiln_opt::optimize(&mut lowered.module)?;
            print!("{}", lowered.module);
        }
        _ => {
            let (_, compiled) = pipeline::fuse(lowered, &options)?;
            if args.stats {
                print!("{}", compiled.stats.table(&symbol_values(&args.symbols)?));
            } else if args.emit == Emit::Kir {
                for kernel in &compiled.kernels {
                    println!("{kernel}");
                }
                for plan in &compiled.plans {
                    println!("{plan}");
                }
            } else {
                let target = options
                    .targets
                    .first()
                    .copied()
                    .context("--arch names no target")?;
                let ptx = kiln_ptx::emit_ptx(
                    &compiled.kernels,
                    target,
                    &kiln_ptx::EmitOptions::default(),
                )?;
                print!("{ptx}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn symbol_values(pairs: &[String]) -> Result<BTreeMap<String, u64>> {
    pairs
        .iter()
        .map(|p| {
            let (name, value) = p
                .split_once('=')
                .with_context(|| format!("--sym {p}: expected NAME=VALUE"))?;
            Ok((
                name.to_string(),
                value
                    .parse()
                    .with_context(|| format!("--sym {p}: not a number"))?,
            ))
        })
        .collect()
}
