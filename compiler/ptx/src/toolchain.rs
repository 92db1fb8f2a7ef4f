//! Running NVIDIA's offline tools on PTX that kiln wrote: `ptxas` turns PTX into a cubin
//! (with a parsed `-v` resource report), `fatbinary` packs cubins and a PTX fallback into
//! one fatbin that `cuModuleLoadData` accepts.
//!
//! The tools come from the CUDA 13 toolkit, normally the `nvidia-cuda-nvcc` Python wheel
//! (see [`discover`] for the search order). Each run gets its own private temporary
//! directory; nothing here panics, every failure is a [`ToolError`] that says what to do.

pub mod discover;
pub mod report;
mod scratch;

use std::collections::BTreeSet;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

use crate::target::{PtxVersion, Target, TargetError, JIT_PTX_VERSION_CAP};
use discover::{DiscoveryEnv, PtxasSource, INSTALL_HINT, PTXAS_ENV};
use report::PtxasLog;
use scratch::ScratchDir;

/// The first four bytes of every fatbin, read as a little-endian `u32`.
pub const FATBIN_MAGIC: u32 = 0xBA55_ED50;

/// The PTX file name the tools see; ptxas messages refer to it.
const PTX_FILE_NAME: &str = "kernel.ptx";

/// Everything that can go wrong finding or running the tools.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("ptxas was not found; {INSTALL_HINT}\nsearched: {}", .searched.join(", "))]
    PtxasNotFound { searched: Vec<String> },
    #[error("{PTXAS_ENV} is set to `{}`, which is not an executable file; {INSTALL_HINT}", .path.display())]
    BadPtxasOverride { path: PathBuf },
    #[error("fatbinary was not found beside `{}` or on PATH; {INSTALL_HINT}", .ptxas.display())]
    FatbinaryNotFound { ptxas: PathBuf },
    #[error("could not run {tool} (`{}`): {source}", .path.display())]
    Launch {
        tool: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("invalid options: {0}")]
    InvalidOptions(String),
    #[error("ptxas rejected the PTX for {target} ({status}):\n{log}\n{excerpt}")]
    PtxasFailed {
        target: Target,
        status: String,
        /// ptxas's output (stderr, after any stdout).
        log: String,
        /// The PTX around the first line ptxas complained about.
        excerpt: String,
        /// The parsed messages, errors included.
        report: Box<PtxasLog>,
    },
    #[error("fatbinary failed ({status}):\n{log}")]
    FatbinaryFailed { status: String, log: String },
    #[error("{tool} produced unexpected output: {detail}")]
    UnexpectedOutput { tool: &'static str, detail: String },
    #[error("a fatbin needs at least one cubin or a PTX fallback")]
    NoImages,
    #[error("two cubins for {0} in one fatbin")]
    DuplicateCubin(Target),
    #[error("the PTX has no `{directive}` directive")]
    MissingPtxDirective { directive: &'static str },
    #[error("the PTX declares `.target {declared}` but was given as {expected}")]
    PtxTargetMismatch { declared: String, expected: Target },
    #[error(
        "the PTX fallback declares .version {version}, newer than {cap}, the newest the CUDA 13.0 driver JIT accepts"
    )]
    PtxTooNewForJit {
        version: PtxVersion,
        cap: PtxVersion,
    },
    #[error(transparent)]
    Target(#[from] TargetError),
}

/// A tool's version, from `ptxas --version` (`V13.5.37`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ToolVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl fmt::Display for ToolVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// The `.version` and `.target` directives at the top of a PTX module.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PtxHeader {
    pub version: PtxVersion,
    /// The first name after `.target` (`sm_90a`), without options such as `debug`.
    pub target: String,
}

impl PtxHeader {
    /// Reads the first `.version` and `.target` directives, skipping `//` comments.
    pub fn parse(ptx: &str) -> Result<PtxHeader, ToolError> {
        let mut version = None;
        let mut target = None;
        for line in ptx.lines() {
            let code = line.split("//").next().unwrap_or("").trim();
            if let Some(rest) = code.strip_prefix(".version") {
                version.get_or_insert(PtxVersion::parse(rest.trim())?);
            } else if let Some(rest) = code.strip_prefix(".target") {
                let name = rest.split(',').next().unwrap_or("").trim();
                target.get_or_insert_with(|| name.to_string());
            }
            if version.is_some() && target.is_some() {
                break;
            }
        }
        Ok(PtxHeader {
            version: version.ok_or(ToolError::MissingPtxDirective {
                directive: ".version",
            })?,
            target: target.ok_or(ToolError::MissingPtxDirective {
                directive: ".target",
            })?,
        })
    }
}

/// How to run ptxas.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AssembleOptions {
    /// `-O0` ... `-O3`; 3 by default.
    pub optimization_level: u8,
    /// `--maxrregcount=N`: the most registers a thread may use (1 to 255).
    pub max_register_count: Option<u32>,
    /// `-lineinfo`: keep PTX line numbers for profilers.
    pub line_info: bool,
    /// Further ptxas arguments, passed as they are before the input file.
    pub extra_args: Vec<String>,
}

impl Default for AssembleOptions {
    fn default() -> Self {
        AssembleOptions {
            optimization_level: 3,
            max_register_count: None,
            line_info: false,
            extra_args: Vec::new(),
        }
    }
}

impl AssembleOptions {
    fn ptxas_args(&self, target: Target) -> Result<Vec<String>, ToolError> {
        if self.optimization_level > 3 {
            return Err(ToolError::InvalidOptions(format!(
                "optimization level {} is not one of 0, 1, 2, 3",
                self.optimization_level
            )));
        }
        let mut args = vec![
            format!("-arch={}", target.sm_name()),
            format!("-O{}", self.optimization_level),
            "-v".to_string(),
        ];
        if let Some(count) = self.max_register_count {
            if !(1..=255).contains(&count) {
                return Err(ToolError::InvalidOptions(format!(
                    "max_register_count {count} is outside 1..=255"
                )));
            }
            args.push(format!("--maxrregcount={count}"));
        }
        if self.line_info {
            args.push("-lineinfo".to_string());
        }
        args.extend(self.extra_args.iter().cloned());
        Ok(args)
    }
}

/// A cubin with what ptxas said while making it.
#[derive(Clone, Debug)]
pub struct Assembled {
    pub target: Target,
    /// The ELF cubin.
    pub cubin: Vec<u8>,
    /// ptxas's whole `-v` output.
    pub log: String,
    /// The log, parsed: one report per function, and every notice.
    pub report: PtxasLog,
}

/// The ptxas and fatbinary binaries to run.
#[derive(Clone, Debug)]
pub struct Toolchain {
    ptxas: PathBuf,
    fatbinary: Option<PathBuf>,
    source: Option<PtxasSource>,
}

impl Toolchain {
    /// Finds the tools from this process's environment (see [`discover`]).
    pub fn discover() -> Result<Toolchain, ToolError> {
        Toolchain::discover_in(&DiscoveryEnv::from_process())
    }

    /// Finds the tools in the given environment.
    pub fn discover_in(env: &DiscoveryEnv) -> Result<Toolchain, ToolError> {
        let found = discover::find_tools(env)?;
        Ok(Toolchain {
            ptxas: found.ptxas,
            fatbinary: found.fatbinary,
            source: Some(found.source),
        })
    }

    /// Uses the given binaries, unchecked.
    pub fn from_paths(ptxas: impl Into<PathBuf>, fatbinary: Option<PathBuf>) -> Toolchain {
        Toolchain {
            ptxas: ptxas.into(),
            fatbinary,
            source: None,
        }
    }

    pub fn ptxas_path(&self) -> &Path {
        &self.ptxas
    }

    pub fn fatbinary_path(&self) -> Option<&Path> {
        self.fatbinary.as_deref()
    }

    /// Which discovery rule found ptxas; `None` for [`Toolchain::from_paths`].
    pub fn source(&self) -> Option<&PtxasSource> {
        self.source.as_ref()
    }

    /// Runs `ptxas --version` and reads the `V13.5.37` in it.
    pub fn ptxas_version(&self) -> Result<ToolVersion, ToolError> {
        let (status, log) = run_tool("ptxas", &self.ptxas, &["--version".to_string()], None)?;
        let version = log
            .split_whitespace()
            .filter_map(|word| word.strip_prefix('V'))
            .find_map(parse_tool_version);
        match version {
            Some(version) if status.success() => Ok(version),
            _ => Err(ToolError::UnexpectedOutput {
                tool: "ptxas",
                detail: format!("`ptxas --version` ({status}) printed no version:\n{log}"),
            }),
        }
    }

    /// Assembles `ptx` into a cubin for `target` with `ptxas -arch=... -v`.
    ///
    /// On success the result holds the cubin, the full log and the parsed report; when
    /// ptxas rejects the PTX, the error holds its messages and the PTX around the first
    /// line it named.
    pub fn assemble(
        &self,
        ptx: &str,
        target: Target,
        options: &AssembleOptions,
    ) -> Result<Assembled, ToolError> {
        let mut args = options.ptxas_args(target)?;
        let scratch = scratch_dir("ptxas")?;
        let cubin_name = format!("{}.cubin", target.sm_name());
        write_file(&scratch.file(PTX_FILE_NAME), ptx.as_bytes())?;
        args.extend([
            PTX_FILE_NAME.to_string(),
            "-o".to_string(),
            cubin_name.clone(),
        ]);

        let (status, log) = run_tool("ptxas", &self.ptxas, &args, Some(scratch.path()))?;
        let report = PtxasLog::parse(&log);
        if !status.success() {
            let excerpt = ptx_excerpt(ptx, report.first_error_line());
            return Err(ToolError::PtxasFailed {
                target,
                status: status.to_string(),
                log,
                excerpt,
                report: Box::new(report),
            });
        }
        let cubin = read_file(&scratch.file(&cubin_name))?;
        if !cubin.starts_with(b"\x7fELF") {
            return Err(ToolError::UnexpectedOutput {
                tool: "ptxas",
                detail: format!("the cubin for {target} is not an ELF file"),
            });
        }
        Ok(Assembled {
            target,
            cubin,
            log,
            report,
        })
    }

    /// Packs cubins and an optional PTX fallback into one fatbin with `fatbinary`.
    ///
    /// Each cubin is labelled with its target; at most one cubin per target. The PTX
    /// fallback is given with the target its `.target` directive names, and must declare
    /// a `.version` of at most [`JIT_PTX_VERSION_CAP`] so that the driver can JIT it.
    pub fn fatbin<B: AsRef<[u8]>>(
        &self,
        cubins: &[(Target, B)],
        ptx: Option<(&str, Target)>,
    ) -> Result<Vec<u8>, ToolError> {
        let fatbinary = self
            .fatbinary
            .as_deref()
            .ok_or_else(|| ToolError::FatbinaryNotFound {
                ptxas: self.ptxas.clone(),
            })?;
        if cubins.is_empty() && ptx.is_none() {
            return Err(ToolError::NoImages);
        }
        let mut seen = BTreeSet::new();
        for (target, _) in cubins {
            if !seen.insert(*target) {
                return Err(ToolError::DuplicateCubin(*target));
            }
        }
        if let Some((text, target)) = ptx {
            check_jit_fallback(text, target)?;
        }

        let scratch = scratch_dir("fatbinary")?;
        let output_name = "kernels.fatbin";
        let mut args = vec!["--64".to_string(), format!("--create={output_name}")];
        for (target, cubin) in cubins {
            let name = format!("{}.cubin", target.sm_name());
            write_file(&scratch.file(&name), cubin.as_ref())?;
            args.push(format!(
                "--image3=kind=elf,sm={},file={name}",
                target.fatbin_arch()
            ));
        }
        if let Some((text, target)) = ptx {
            let name = format!("{}.ptx", target.sm_name());
            write_file(&scratch.file(&name), text.as_bytes())?;
            args.push(format!(
                "--image3=kind=ptx,sm={},file={name}",
                target.fatbin_arch()
            ));
        }

        let (status, log) = run_tool("fatbinary", fatbinary, &args, Some(scratch.path()))?;
        if !status.success() {
            return Err(ToolError::FatbinaryFailed {
                status: status.to_string(),
                log,
            });
        }
        let fatbin = read_file(&scratch.file(output_name))?;
        let magic = fatbin
            .get(..4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        if magic != Some(FATBIN_MAGIC) {
            return Err(ToolError::UnexpectedOutput {
                tool: "fatbinary",
                detail: format!(
                    "the output does not start with the fatbin magic {FATBIN_MAGIC:#010x}"
                ),
            });
        }
        Ok(fatbin)
    }
}

fn check_jit_fallback(ptx: &str, target: Target) -> Result<(), ToolError> {
    let header = PtxHeader::parse(ptx)?;
    if header.target != target.sm_name() {
        return Err(ToolError::PtxTargetMismatch {
            declared: header.target,
            expected: target,
        });
    }
    if header.version > JIT_PTX_VERSION_CAP {
        return Err(ToolError::PtxTooNewForJit {
            version: header.version,
            cap: JIT_PTX_VERSION_CAP,
        });
    }
    Ok(())
}

fn parse_tool_version(text: &str) -> Option<ToolVersion> {
    let mut parts = text.trim_end_matches(',').split('.');
    let mut next = || parts.next()?.parse::<u32>().ok();
    let version = ToolVersion {
        major: next()?,
        minor: next()?,
        patch: next()?,
    };
    Some(version)
}

/// Runs a tool to completion; returns its exit status and stdout followed by stderr.
fn run_tool(
    tool: &'static str,
    path: &Path,
    args: &[String],
    working_dir: Option<&Path>,
) -> Result<(std::process::ExitStatus, String), ToolError> {
    let mut command = Command::new(path);
    command.args(args).stdin(Stdio::null());
    if let Some(dir) = working_dir {
        command.current_dir(dir);
    }
    let output = command.output().map_err(|source| ToolError::Launch {
        tool,
        path: path.to_path_buf(),
        source,
    })?;
    let mut log = String::from_utf8_lossy(&output.stdout).into_owned();
    log.push_str(&String::from_utf8_lossy(&output.stderr));
    Ok((output.status, log))
}

fn scratch_dir(purpose: &str) -> Result<ScratchDir, ToolError> {
    ScratchDir::new(purpose).map_err(|source| ToolError::Io {
        what: "could not create a temporary directory".to_string(),
        source,
    })
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), ToolError> {
    std::fs::write(path, bytes).map_err(|source| ToolError::Io {
        what: format!("could not write `{}`", path.display()),
        source,
    })
}

fn read_file(path: &Path) -> Result<Vec<u8>, ToolError> {
    std::fs::read(path).map_err(|source| ToolError::Io {
        what: format!("could not read `{}`", path.display()),
        source,
    })
}

/// Lines of `ptx` around `line` (1-based), numbered, the named line marked; the first
/// lines when no line is known.
fn ptx_excerpt(ptx: &str, line: Option<u32>) -> String {
    const CONTEXT: usize = 3;
    const HEAD: usize = 12;
    let lines: Vec<&str> = ptx.lines().collect();
    let (first, last, marked, title) = match line.map(|l| l as usize) {
        Some(marked) if (1..=lines.len()).contains(&marked) => (
            marked.saturating_sub(CONTEXT).max(1),
            (marked + CONTEXT).min(lines.len()),
            Some(marked),
            format!("PTX around line {marked}:"),
        ),
        _ => (
            1,
            HEAD.min(lines.len()),
            None,
            "PTX (first lines):".to_string(),
        ),
    };
    let mut excerpt = title;
    for number in first..=last {
        let marker = if Some(number) == marked { ">" } else { " " };
        excerpt.push_str(&format!("\n{marker}{number:>5} | {}", lines[number - 1]));
    }
    excerpt
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_skips_comments_and_target_options() {
        let ptx = "// generated by kiln\n//.version 1.0\n.version 8.0\n.target sm_90a, debug\n.address_size 64\n";
        assert_eq!(
            PtxHeader::parse(ptx).unwrap(),
            PtxHeader {
                version: PtxVersion::new(8, 0),
                target: "sm_90a".to_string()
            }
        );
        assert!(matches!(
            PtxHeader::parse(".target sm_80\n"),
            Err(ToolError::MissingPtxDirective {
                directive: ".version"
            })
        ));
        assert!(matches!(
            PtxHeader::parse(".version 7.0\n"),
            Err(ToolError::MissingPtxDirective {
                directive: ".target"
            })
        ));
        assert!(matches!(
            PtxHeader::parse(".version seven\n.target sm_80\n"),
            Err(ToolError::Target(TargetError::BadPtxVersion(_)))
        ));
    }

    #[test]
    fn jit_fallback_must_match_its_target_and_the_version_cap() {
        let ptx = |version: &str, target: &str| format!(".version {version}\n.target {target}\n");
        assert!(check_jit_fallback(&ptx("9.0", "sm_80"), Target::Sm80).is_ok());
        assert!(matches!(
            check_jit_fallback(&ptx("9.1", "sm_80"), Target::Sm80),
            Err(ToolError::PtxTooNewForJit { .. })
        ));
        let message = check_jit_fallback(&ptx("7.0", "sm_80"), Target::Sm90a)
            .unwrap_err()
            .to_string();
        assert_eq!(
            message,
            "the PTX declares `.target sm_80` but was given as sm_90a"
        );
    }

    #[test]
    fn options_become_ptxas_arguments() {
        let default = AssembleOptions::default()
            .ptxas_args(Target::Sm90a)
            .unwrap();
        assert_eq!(default, ["-arch=sm_90a", "-O3", "-v"]);
        let custom = AssembleOptions {
            optimization_level: 1,
            max_register_count: Some(128),
            line_info: true,
            extra_args: vec!["--warn-on-spills".to_string()],
        };
        assert_eq!(
            custom.ptxas_args(Target::Sm80).unwrap(),
            [
                "-arch=sm_80",
                "-O1",
                "-v",
                "--maxrregcount=128",
                "-lineinfo",
                "--warn-on-spills"
            ]
        );
        let too_high = AssembleOptions {
            optimization_level: 4,
            ..AssembleOptions::default()
        };
        assert!(matches!(
            too_high.ptxas_args(Target::Sm80),
            Err(ToolError::InvalidOptions(_))
        ));
        let no_registers = AssembleOptions {
            max_register_count: Some(0),
            ..AssembleOptions::default()
        };
        assert!(no_registers.ptxas_args(Target::Sm80).is_err());
    }

    #[test]
    fn excerpt_marks_the_reported_line() {
        let ptx = (1..=20)
            .map(|i| format!("line{i}"))
            .collect::<Vec<_>>()
            .join("\n");
        let excerpt = ptx_excerpt(&ptx, Some(2));
        assert_eq!(
            excerpt,
            "PTX around line 2:\n     1 | line1\n>    2 | line2\n     3 | line3\n     4 | line4\n     5 | line5"
        );
        let head = ptx_excerpt(&ptx, None);
        assert!(head.starts_with("PTX (first lines):\n     1 | line1"));
        assert!(head.ends_with("12 | line12"));
        assert!(ptx_excerpt(&ptx, Some(99)).starts_with("PTX (first lines):"));
        assert_eq!(ptx_excerpt("", Some(1)), "PTX (first lines):");
    }

    #[test]
    fn reads_tool_versions() {
        assert_eq!(
            parse_tool_version("13.5.37"),
            Some(ToolVersion {
                major: 13,
                minor: 5,
                patch: 37
            })
        );
        assert_eq!(parse_tool_version("13.5"), None);
        assert_eq!(parse_tool_version("x"), None);
    }

    #[test]
    fn missing_tools_are_errors_not_panics() {
        let toolchain = Toolchain::from_paths("/nonexistent/kiln/ptxas", None);
        let assembled =
            toolchain.assemble(".version 7.0\n", Target::Sm80, &AssembleOptions::default());
        assert!(matches!(
            assembled,
            Err(ToolError::Launch { tool: "ptxas", .. })
        ));
        let packed = toolchain.fatbin(&[(Target::Sm80, vec![0u8; 4])], None);
        let message = packed.unwrap_err().to_string();
        assert!(message.contains("fatbinary was not found"), "{message}");
        assert!(message.contains("pip install --target .tools/cuda nvidia-cuda-nvcc"));
    }

    #[cfg(unix)]
    mod with_fake_tools {
        use super::*;
        use std::os::unix::fs::PermissionsExt;

        fn fake_tool(dir: &Path, name: &str, script: &str) -> PathBuf {
            let path = dir.join(name);
            std::fs::write(&path, format!("#!/bin/sh\n{script}\n")).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
            path
        }

        #[test]
        fn a_failing_ptxas_gives_its_messages_and_the_ptx_excerpt() {
            let dir = ScratchDir::new("fake-ptxas").unwrap();
            let ptxas = fake_tool(
                dir.path(),
                "ptxas",
                "echo \"ptxas kernel.ptx, line 3; error   : Unknown symbol '%r9'\" >&2\n\
                 echo 'ptxas fatal   : Ptx assembly aborted due to errors' >&2\nexit 255",
            );
            let toolchain = Toolchain::from_paths(ptxas, None);
            let ptx = ".version 7.0\n.target sm_80\nadd.u32 %r2, %r1, %r9;\nret;\n";
            let error = toolchain
                .assemble(ptx, Target::Sm80, &AssembleOptions::default())
                .unwrap_err();
            let message = error.to_string();
            assert!(
                message.contains("ptxas rejected the PTX for sm_80"),
                "{message}"
            );
            assert!(message.contains("Unknown symbol '%r9'"), "{message}");
            assert!(
                message.contains(">    3 | add.u32 %r2, %r1, %r9;"),
                "{message}"
            );
            let ToolError::PtxasFailed { report, .. } = error else {
                panic!("not PtxasFailed: {error:?}")
            };
            assert_eq!(report.first_error_line(), Some(3));
        }

        #[test]
        fn a_ptxas_that_writes_no_elf_is_reported() {
            let dir = ScratchDir::new("fake-ptxas").unwrap();
            // the last argument is the output path
            let ptxas = fake_tool(
                dir.path(),
                "ptxas",
                "for last; do :; done\necho junk > \"$last\"",
            );
            let toolchain = Toolchain::from_paths(ptxas, None);
            let error = toolchain
                .assemble(".version 7.0\n", Target::Sm80, &AssembleOptions::default())
                .unwrap_err();
            assert!(
                matches!(error, ToolError::UnexpectedOutput { tool: "ptxas", .. }),
                "{error:?}"
            );
        }

        #[test]
        fn fatbin_rejects_bad_inputs_before_running_the_tool() {
            let dir = ScratchDir::new("fake-fatbinary").unwrap();
            let never = fake_tool(dir.path(), "fatbinary", "exit 99");
            let toolchain = Toolchain::from_paths("/nonexistent/ptxas", Some(never));
            let none: &[(Target, Vec<u8>)] = &[];
            assert!(matches!(
                toolchain.fatbin(none, None),
                Err(ToolError::NoImages)
            ));
            let twice = [(Target::Sm80, vec![1u8]), (Target::Sm80, vec![2u8])];
            assert!(matches!(
                toolchain.fatbin(&twice, None),
                Err(ToolError::DuplicateCubin(Target::Sm80))
            ));
            let new_ptx = ".version 9.5\n.target sm_80\n";
            assert!(matches!(
                toolchain.fatbin(none, Some((new_ptx, Target::Sm80))),
                Err(ToolError::PtxTooNewForJit { .. })
            ));
            let failed = toolchain.fatbin(&[(Target::Sm80, vec![1u8])], None);
            assert!(
                matches!(failed, Err(ToolError::FatbinaryFailed { .. })),
                "{failed:?}"
            );
        }
    }
}
