//! Finding `ptxas` and `fatbinary` on this machine.
//!
//! ptxas is looked for in this order, the first hit wins:
//! 1. `KILN_PTXAS`: the path of a ptxas binary (an error if it names no executable file);
//! 2. the directories of `PATH`;
//! 3. an installed `nvidia-cuda-nvcc` wheel: under `KILN_CUDA_WHEEL_DIR` (a
//!    `pip install --target DIR` directory), then under each Python site-packages
//!    directory (asked of `python3` once per process); in each, `nvidia/cu13/bin/ptxas`
//!    and, for older wheels, `nvidia/cuda_nvcc/bin/ptxas`;
//! 4. `.tools/cuda` (where `scripts/install-ptxas.sh` installs the wheel) in the current
//!    directory or one of its ancestors, so tests run from a checkout find it.
//!
//! fatbinary is looked for next to the ptxas found (also next to its resolved path when
//! ptxas is a symlink), then on `PATH`. Discovery reads the process environment only in
//! [`DiscoveryEnv::from_process`]; everything else takes a [`DiscoveryEnv`], so the order
//! can be tested with fake tools.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use super::ToolError;

/// The environment variable naming a ptxas binary; it overrides every other place.
pub const PTXAS_ENV: &str = "KILN_PTXAS";
/// The environment variable naming a `pip install --target` directory of the wheel.
pub const CUDA_WHEEL_DIR_ENV: &str = "KILN_CUDA_WHEEL_DIR";
/// Where `scripts/install-ptxas.sh` installs the wheel, relative to the checkout.
pub const WORKSPACE_TOOLS_DIR: &str = ".tools/cuda";

/// Where the wheel keeps its binaries, newest layout first.
const WHEEL_BIN_DIRS: [&str; 2] = ["nvidia/cu13/bin", "nvidia/cuda_nvcc/bin"];

/// How to get ptxas, for error messages.
pub const INSTALL_HINT: &str = "\
install the CUDA 13 ptxas and fatbinary from the nvidia-cuda-nvcc wheel:
    pip install --target .tools/cuda nvidia-cuda-nvcc
    export KILN_CUDA_WHEEL_DIR=$PWD/.tools/cuda
(scripts/install-ptxas.sh does both), or set KILN_PTXAS to the path of a ptxas binary";

/// Which rule of the search order found ptxas.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PtxasSource {
    /// `KILN_PTXAS`.
    EnvOverride,
    /// A directory of `PATH`.
    SearchPath,
    /// The wheel under `KILN_CUDA_WHEEL_DIR`.
    WheelDir,
    /// The wheel in a Python site-packages directory.
    SitePackages,
    /// The wheel in `.tools/cuda` of the current directory or an ancestor.
    WorkspaceTools,
}

/// Where the Python site-packages directories come from.
#[derive(Clone, Debug)]
pub enum SitePackages {
    /// Ask `python3` (once per process; the answer is cached).
    AskPython,
    /// These directories.
    Dirs(Vec<PathBuf>),
}

/// The inputs of the search: the environment variables it reads and the places it
/// looks, so tests can point it at fake tools.
#[derive(Clone, Debug)]
pub struct DiscoveryEnv {
    /// The value of `KILN_PTXAS`.
    pub ptxas_override: Option<PathBuf>,
    /// The value of `PATH`.
    pub search_path: Option<OsString>,
    /// The value of `KILN_CUDA_WHEEL_DIR`.
    pub wheel_dir: Option<PathBuf>,
    pub site_packages: SitePackages,
    /// Where to start looking for `.tools/cuda` (walking up); `None` skips that rule.
    pub workspace_start: Option<PathBuf>,
}

impl DiscoveryEnv {
    /// The environment of this process: its variables, Python's site-packages, and the
    /// current directory.
    pub fn from_process() -> DiscoveryEnv {
        let non_empty = |name: &str| std::env::var_os(name).filter(|value| !value.is_empty());
        DiscoveryEnv {
            ptxas_override: non_empty(PTXAS_ENV).map(PathBuf::from),
            search_path: non_empty("PATH"),
            wheel_dir: non_empty(CUDA_WHEEL_DIR_ENV).map(PathBuf::from),
            site_packages: SitePackages::AskPython,
            workspace_start: std::env::current_dir().ok(),
        }
    }

    /// An environment in which nothing is found: a base for tests.
    pub fn empty() -> DiscoveryEnv {
        DiscoveryEnv {
            ptxas_override: None,
            search_path: None,
            wheel_dir: None,
            site_packages: SitePackages::Dirs(Vec::new()),
            workspace_start: None,
        }
    }
}

/// The outcome of a successful search.
#[derive(Clone, Debug)]
pub(crate) struct FoundTools {
    pub(crate) ptxas: PathBuf,
    pub(crate) source: PtxasSource,
    pub(crate) fatbinary: Option<PathBuf>,
}

pub(crate) fn find_tools(env: &DiscoveryEnv) -> Result<FoundTools, ToolError> {
    let (ptxas, source) = find_ptxas(env)?;
    let fatbinary = find_fatbinary(&ptxas, env.search_path.as_ref());
    Ok(FoundTools {
        ptxas,
        source,
        fatbinary,
    })
}

fn find_ptxas(env: &DiscoveryEnv) -> Result<(PathBuf, PtxasSource), ToolError> {
    let ptxas_name = executable_name("ptxas");
    if let Some(path) = &env.ptxas_override {
        if is_executable_file(path) {
            return Ok((path.clone(), PtxasSource::EnvOverride));
        }
        return Err(ToolError::BadPtxasOverride { path: path.clone() });
    }

    let mut searched = Vec::new();
    if let Some(found) = find_on_path(&ptxas_name, env.search_path.as_ref()) {
        return Ok((found, PtxasSource::SearchPath));
    }
    searched.push("PATH".to_string());

    let wheel_roots: Vec<(PathBuf, PtxasSource)> = env
        .wheel_dir
        .iter()
        .map(|dir| (dir.clone(), PtxasSource::WheelDir))
        .chain(
            site_packages(&env.site_packages)
                .into_iter()
                .map(|dir| (dir, PtxasSource::SitePackages)),
        )
        .chain(
            workspace_tool_dirs(env.workspace_start.as_deref())
                .map(|dir| (dir, PtxasSource::WorkspaceTools)),
        )
        .collect();
    for (root, source) in wheel_roots {
        for bin_dir in WHEEL_BIN_DIRS {
            let candidate = root.join(bin_dir).join(&ptxas_name);
            if is_executable_file(&candidate) {
                return Ok((candidate, source));
            }
            searched.push(candidate.display().to_string());
        }
    }
    Err(ToolError::PtxasNotFound { searched })
}

fn find_fatbinary(ptxas: &Path, search_path: Option<&OsString>) -> Option<PathBuf> {
    let name = executable_name("fatbinary");
    let beside = |ptxas: &Path| ptxas.parent().map(|dir| dir.join(&name));
    let resolved = std::fs::canonicalize(ptxas).ok();
    beside(ptxas)
        .into_iter()
        .chain(resolved.as_deref().and_then(beside))
        .find(|candidate| is_executable_file(candidate))
        .or_else(|| find_on_path(&name, search_path))
}

fn find_on_path(name: &str, search_path: Option<&OsString>) -> Option<PathBuf> {
    let search_path = search_path?;
    std::env::split_paths(search_path)
        .filter(|dir| !dir.as_os_str().is_empty())
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable_file(candidate))
}

/// `.tools/cuda` in `start` and each of its ancestors, nearest first.
fn workspace_tool_dirs(start: Option<&Path>) -> impl Iterator<Item = PathBuf> + '_ {
    start
        .into_iter()
        .flat_map(Path::ancestors)
        .map(|dir| dir.join(WORKSPACE_TOOLS_DIR))
}

fn site_packages(source: &SitePackages) -> Vec<PathBuf> {
    match source {
        SitePackages::Dirs(dirs) => dirs.clone(),
        SitePackages::AskPython => python_site_packages().to_vec(),
    }
}

/// Python's site-packages directories and the other directories of `sys.path` (where
/// `PYTHONPATH` installs live), asked once per process. Empty when there is no
/// `python3` or it fails.
fn python_site_packages() -> &'static [PathBuf] {
    static CACHE: OnceLock<Vec<PathBuf>> = OnceLock::new();
    CACHE.get_or_init(|| {
        const SCRIPT: &str = "\
import site, sys
dirs = []
try:
    dirs += list(site.getsitepackages())
except Exception:
    pass
try:
    dirs.append(site.getusersitepackages())
except Exception:
    pass
dirs += sys.path
print('\\n'.join(d for d in dirs if d))
";
        let output = Command::new("python3")
            .arg("-c")
            .arg(SCRIPT)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output();
        let Ok(output) = output else {
            return Vec::new();
        };
        if !output.status.success() {
            return Vec::new();
        }
        let mut dirs: Vec<PathBuf> = Vec::new();
        for line in String::from_utf8_lossy(&output.stdout).lines() {
            let dir = PathBuf::from(line.trim());
            if dir.is_absolute() && dir.is_dir() && !dirs.contains(&dir) {
                dirs.push(dir);
            }
        }
        dirs
    })
}

fn executable_name(tool: &str) -> String {
    format!("{tool}{}", std::env::consts::EXE_SUFFIX)
}

fn is_executable_file(path: &Path) -> bool {
    let Ok(metadata) = std::fs::metadata(path) else {
        return false;
    };
    if !metadata.is_file() {
        return false;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        metadata.permissions().mode() & 0o111 != 0
    }
    #[cfg(not(unix))]
    {
        true
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use crate::toolchain::scratch::ScratchDir;
    use std::os::unix::fs::PermissionsExt;

    /// Writes an executable shell script at `dir/relative` (making parent directories).
    fn fake_tool(dir: &Path, relative: &str) -> PathBuf {
        let path = dir.join(relative);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, "#!/bin/sh\necho fake\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    struct Layout {
        _scratch: ScratchDir,
        override_ptxas: PathBuf,
        path_dir: PathBuf,
        wheel_dir: PathBuf,
        site_dir: PathBuf,
        workspace: PathBuf,
    }

    /// One fake ptxas in each place discovery looks.
    fn every_place_has_a_ptxas() -> Layout {
        let scratch = ScratchDir::new("discover-test").unwrap();
        let root = scratch.path().to_path_buf();
        let override_ptxas = fake_tool(&root, "override/my-ptxas");
        let path_dir = root.join("bin");
        fake_tool(&path_dir, "ptxas");
        let wheel_dir = root.join("wheel");
        fake_tool(&wheel_dir, "nvidia/cu13/bin/ptxas");
        let site_dir = root.join("site-packages");
        fake_tool(&site_dir, "nvidia/cuda_nvcc/bin/ptxas");
        let workspace = root.join("checkout");
        fake_tool(&workspace, ".tools/cuda/nvidia/cu13/bin/ptxas");
        std::fs::create_dir_all(workspace.join("compiler/ptx")).unwrap();
        Layout {
            _scratch: scratch,
            override_ptxas,
            path_dir,
            wheel_dir,
            site_dir,
            workspace,
        }
    }

    fn env_for(layout: &Layout) -> DiscoveryEnv {
        DiscoveryEnv {
            ptxas_override: Some(layout.override_ptxas.clone()),
            search_path: Some(std::env::join_paths([&layout.path_dir]).unwrap()),
            wheel_dir: Some(layout.wheel_dir.clone()),
            site_packages: SitePackages::Dirs(vec![layout.site_dir.clone()]),
            workspace_start: Some(layout.workspace.join("compiler/ptx")),
        }
    }

    #[test]
    fn search_order_is_override_path_wheel_dir_site_packages_workspace() {
        let layout = every_place_has_a_ptxas();
        let mut env = env_for(&layout);
        let mut seen = Vec::new();
        while let Ok(found) = find_tools(&env) {
            seen.push((found.source.clone(), found.ptxas.clone()));
            match found.source {
                PtxasSource::EnvOverride => env.ptxas_override = None,
                PtxasSource::SearchPath => env.search_path = None,
                PtxasSource::WheelDir => env.wheel_dir = None,
                PtxasSource::SitePackages => env.site_packages = SitePackages::Dirs(vec![]),
                PtxasSource::WorkspaceTools => env.workspace_start = None,
            }
        }
        assert_eq!(
            seen,
            [
                (PtxasSource::EnvOverride, layout.override_ptxas.clone()),
                (PtxasSource::SearchPath, layout.path_dir.join("ptxas")),
                (
                    PtxasSource::WheelDir,
                    layout.wheel_dir.join("nvidia/cu13/bin/ptxas")
                ),
                (
                    PtxasSource::SitePackages,
                    layout.site_dir.join("nvidia/cuda_nvcc/bin/ptxas")
                ),
                (
                    PtxasSource::WorkspaceTools,
                    layout.workspace.join(".tools/cuda/nvidia/cu13/bin/ptxas")
                ),
            ]
        );
    }

    #[test]
    fn newer_wheel_layout_wins_within_one_directory() {
        let scratch = ScratchDir::new("discover-test").unwrap();
        fake_tool(scratch.path(), "nvidia/cuda_nvcc/bin/ptxas");
        let newer = fake_tool(scratch.path(), "nvidia/cu13/bin/ptxas");
        let env = DiscoveryEnv {
            wheel_dir: Some(scratch.path().to_path_buf()),
            ..DiscoveryEnv::empty()
        };
        assert_eq!(find_tools(&env).unwrap().ptxas, newer);
    }

    #[test]
    fn a_non_executable_or_missing_file_is_skipped() {
        let scratch = ScratchDir::new("discover-test").unwrap();
        let bin = scratch.path().join("bin");
        std::fs::create_dir_all(bin.join("ptxas")).unwrap(); // a directory, not a file
        let other = scratch.path().join("other");
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(other.join("ptxas"), "not executable").unwrap();
        let real = fake_tool(scratch.path(), "third/ptxas");
        let env = DiscoveryEnv {
            search_path: Some(
                std::env::join_paths([&bin, &other, &real.parent().unwrap().to_path_buf()])
                    .unwrap(),
            ),
            ..DiscoveryEnv::empty()
        };
        assert_eq!(find_tools(&env).unwrap().ptxas, real);
    }

    #[test]
    fn a_bad_override_is_an_error_not_a_fallback() {
        let layout = every_place_has_a_ptxas();
        let mut env = env_for(&layout);
        env.ptxas_override = Some(layout.path_dir.join("no-such-ptxas"));
        let error = find_tools(&env).unwrap_err();
        assert!(
            matches!(error, ToolError::BadPtxasOverride { .. }),
            "{error:?}"
        );
        let message = error.to_string();
        assert!(message.contains("KILN_PTXAS"), "{message}");
        assert!(message.contains("no-such-ptxas"), "{message}");
    }

    #[test]
    fn fatbinary_beside_ptxas_wins_over_path() {
        let scratch = ScratchDir::new("discover-test").unwrap();
        let wheel = scratch.path().join("wheel");
        fake_tool(&wheel, "nvidia/cu13/bin/ptxas");
        let beside = fake_tool(&wheel, "nvidia/cu13/bin/fatbinary");
        let path_dir = scratch.path().join("bin");
        let on_path = fake_tool(&path_dir, "fatbinary");
        let mut env = DiscoveryEnv {
            search_path: Some(std::env::join_paths([&path_dir]).unwrap()),
            wheel_dir: Some(wheel.clone()),
            ..DiscoveryEnv::empty()
        };
        assert_eq!(find_tools(&env).unwrap().fatbinary, Some(beside.clone()));
        std::fs::remove_file(&beside).unwrap();
        assert_eq!(find_tools(&env).unwrap().fatbinary, Some(on_path));
        env.search_path = None;
        assert_eq!(find_tools(&env).unwrap().fatbinary, None);
    }

    #[test]
    fn fatbinary_is_found_beside_the_target_of_a_ptxas_symlink() {
        let scratch = ScratchDir::new("discover-test").unwrap();
        let real_ptxas = fake_tool(scratch.path(), "cuda/bin/ptxas");
        let real_fatbinary = fake_tool(scratch.path(), "cuda/bin/fatbinary");
        let link_dir = scratch.path().join("links");
        std::fs::create_dir_all(&link_dir).unwrap();
        std::os::unix::fs::symlink(&real_ptxas, link_dir.join("ptxas")).unwrap();
        let env = DiscoveryEnv {
            search_path: Some(std::env::join_paths([&link_dir]).unwrap()),
            ..DiscoveryEnv::empty()
        };
        let found = find_tools(&env).unwrap();
        assert_eq!(found.ptxas, link_dir.join("ptxas"));
        let fatbinary = found.fatbinary.unwrap();
        assert_eq!(
            std::fs::canonicalize(fatbinary).unwrap(),
            std::fs::canonicalize(real_fatbinary).unwrap()
        );
    }

    #[test]
    fn nothing_found_says_how_to_install() {
        let scratch = ScratchDir::new("discover-test").unwrap();
        let env = DiscoveryEnv {
            wheel_dir: Some(scratch.path().join("empty-wheel")),
            ..DiscoveryEnv::empty()
        };
        let error = find_tools(&env).unwrap_err();
        let message = error.to_string();
        for expected in [
            "pip install --target .tools/cuda nvidia-cuda-nvcc",
            "export KILN_CUDA_WHEEL_DIR=$PWD/.tools/cuda",
            "KILN_PTXAS",
            "empty-wheel/nvidia/cu13/bin/ptxas",
        ] {
            assert!(
                message.contains(expected),
                "{expected:?} missing from:\n{message}"
            );
        }
    }
}
