//! `kiln bench consensus`: the consensus benchmarks of CONSENSUS.md on the GPU, timed with
//! CUDA events, on data every peer computes alike (a counter-based hash of each element's
//! index, [`unit`]; `benches/consensus_peers.py` has its twin): `zero_sum_rm_plus` on 10,000
//! random 64×64 games for 1,000 iterations (no early exit) in ms per iteration, once per
//! persistent-loop variant (matrices in registers or in shared memory, and the plan loop
//! without a persistent kernel for reference), beside the same algorithm in PyTorch eager on
//! the GPU and numpy on the CPU, with kiln's value and NashConv compared to the peer's on the
//! first games; `cosine_similarity` of 16,384 × 768 f32 beside torch in f32 (TF32 off, and on
//! for reference), checked against f64 on a few rows; the coordinate median of
//! `robust_aggregate` over 16 × 134,217,728 f32 in GB/s and as a fraction of the copy
//! bandwidth measured in the same run, beside `torch.median(dim=0)`, checked exactly against
//! a CPU median on the first coordinates. Prints a table and writes the JSON (`-o`).

use crate::bench::{read_peers, Gpu};
use anyhow::{bail, Context, Result};
use kiln_cuda::CudaProgram;
use kiln_gpu_kernels::PersistentTuning;
use kiln_ir::Tensor;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub(crate) struct ConsensusBenchArgs {
    /// Games of the solver case.
    #[arg(long, default_value_t = 10_000)]
    games: usize,
    /// Actions of each player (square games).
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// RM+ iterations (every game runs all of them: tol -1).
    #[arg(long, default_value_t = 1000)]
    iters: usize,
    /// Timed runs of each solver variant (each runs all the iterations); the median counts.
    #[arg(long, default_value_t = 3)]
    solver_runs: usize,
    /// Timed runs of the cosine and median cases (after warm-up); the median counts.
    #[arg(long, default_value_t = 20)]
    runs: usize,
    /// Rows N of the cosine similarity case.
    #[arg(long, default_value_t = 16_384)]
    cos_n: usize,
    /// Width D of the cosine similarity case.
    #[arg(long, default_value_t = 768)]
    cos_d: usize,
    /// Workers K of the median case.
    #[arg(long, default_value_t = 16)]
    median_k: usize,
    /// Parameters P of the median case.
    #[arg(long, default_value_t = 134_217_728)]
    median_p: usize,
    /// The largest difference of value and of NashConv from the peer's allowed on the
    /// games compared (payoffs in [0, 1)).
    #[arg(long, default_value_t = 1e-3)]
    agree_tol: f64,
    /// Run only these cases (repeatable): rm_plus, cosine, median.
    #[arg(long = "case", value_name = "NAME")]
    cases: Vec<String>,
    /// The peers' numbers (the JSON `benches/consensus_peers.py` prints, same sizes).
    #[arg(long, value_name = "FILE")]
    torch_json: Option<PathBuf>,
    /// Also write the JSON here.
    #[arg(long, short = 'o', value_name = "FILE")]
    out: Option<PathBuf>,
}

const CASES: [&str; 3] = ["rm_plus", "cosine", "median"];

/// The seeds of the three data sets (as in benches/consensus_peers.py).
const SEED_GAMES: u64 = 1;
const SEED_EMBEDDINGS: u64 = 2;
const SEED_UPDATES: u64 = 3;

/// The solver's tolerance: below any NashConv, so no game finishes early.
const NO_EARLY_EXIT: f32 = -1.0;

/// The benchmark data: a value in [0, 1) for element `index` of data set `seed`, a 32-bit
/// integer hash whose products stay below 2^63 (so numpy and torch int64 compute it alike).
pub(crate) fn unit(index: u64, seed: u64) -> f32 {
    const MASK: u64 = 0xFFFF_FFFF;
    let mut x = (index + seed * 0x9E37_79B1) & MASK;
    x ^= x >> 16;
    x = (x * 0x7FEB_352D) & MASK;
    x ^= x >> 15;
    x = (x * 0x2C1B_3C6D) & MASK;
    x ^= x >> 16;
    (x >> 8) as f32 / 16_777_216.0
}

/// `len` values `map(unit(i, seed))`, drawn on every core.
fn fill(len: usize, seed: u64, map: impl Fn(f32) -> f32 + Sync) -> Vec<f32> {
    let mut data = vec![0f32; len];
    let threads = std::thread::available_parallelism().map_or(4, |n| n.get());
    let chunk = len.div_ceil(threads).max(1 << 16);
    std::thread::scope(|scope| {
        for (c, part) in data.chunks_mut(chunk).enumerate() {
            let map = &map;
            scope.spawn(move || {
                let base = (c * chunk) as u64;
                for (i, v) in part.iter_mut().enumerate() {
                    *v = map(unit(base + i as u64, seed));
                }
            });
        }
    });
    data
}

/// The program timed: one entry per case, the game size, embedding width, worker count and
/// parameter count fixed (as the kernels are compiled for one model; a constant parameter
/// count past 2^31 elements makes the median's kernels index with 64-bit integers), the
/// batch axes symbolic.
fn program(size: usize, width: usize, workers: usize, params: usize) -> String {
    format!(
        "import consensus
fn rm_plus(A: f32[G, {size}, {size}], iters: int, tol: float, check_every: int) ->
        (f32[G, {size}], f32[G, {size}], f32[G], f32[G], f32[G]) {{
    zero_sum_rm_plus(A, iters, tol, check_every)
}}
fn cosine(E: f32[N, {width}]) -> f32[N, N] {{ cosine_similarity(E) }}
fn median(U: f32[{workers}, {params}], w: f32[{workers}]) -> f32[{params}] {{
    robust_aggregate(U, w, \"median\")
}}
"
    )
}

/// The solver variants timed: name, persistent-loop settings.
const VARIANTS: [(&str, PersistentTuning); 4] = [
    (
        "persistent, matrices in registers",
        PersistentTuning {
            enabled: true,
            matrix_registers: true,
            blocks_per_sm: 0,
        },
    ),
    (
        "persistent, matrices in shared memory",
        PersistentTuning {
            enabled: true,
            matrix_registers: false,
            blocks_per_sm: 0,
        },
    ),
    (
        "persistent, matrices in shared memory, registers left to ptxas",
        PersistentTuning {
            enabled: true,
            matrix_registers: false,
            blocks_per_sm: 1,
        },
    ),
    (
        "plan loop (no persistent kernel)",
        PersistentTuning {
            enabled: false,
            matrix_registers: false,
            blocks_per_sm: 0,
        },
    ),
];

/// What kiln measured; [`assemble`] turns it and the peers' JSON into the report.
#[derive(Debug, Default)]
pub(crate) struct Measured {
    pub copy_gb_per_s: f64,
    pub rm_plus: Option<RmPlus>,
    pub cosine: Option<Cosine>,
    pub median: Option<Median>,
}

#[derive(Debug)]
pub(crate) struct RmPlus {
    pub games: usize,
    pub size: usize,
    pub iters: usize,
    /// (variant, kernels launched per solve, median ms of a whole solve).
    pub variants: Vec<(String, usize, f64)>,
    /// The first variant's value and NashConv of every game, and whether every game ran
    /// every iteration.
    pub value: Vec<f64>,
    pub nashconv: Vec<f64>,
    pub all_ran: bool,
    /// The largest difference of value between the variants.
    pub variants_max_diff: f64,
}

#[derive(Debug)]
pub(crate) struct Cosine {
    pub n: usize,
    pub d: usize,
    pub median_ms: f64,
    pub rows_checked: usize,
    pub max_abs_err: f64,
}

#[derive(Debug)]
pub(crate) struct Median {
    pub k: usize,
    pub p: usize,
    pub kernels: usize,
    pub median_ms: f64,
    pub checked: usize,
    pub mismatches: usize,
}

/// Largest |a[i] - b[i]| over the common prefix, with its length.
fn max_diff(a: &[f64], b: &[f64]) -> (f64, usize) {
    let n = a.len().min(b.len());
    let d = a[..n]
        .iter()
        .zip(&b[..n])
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max);
    (d, n)
}

fn numbers(v: &Value) -> Vec<f64> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default()
}

/// The JSON report: the header (device, commit, ...), kiln's numbers, the peers' and the
/// ratios (above 1: kiln is faster), and the list of failed correctness checks.
pub(crate) fn assemble(
    header: Value,
    m: &Measured,
    peers: Option<&Value>,
    agree_tol: f64,
) -> (Value, Vec<String>) {
    let mut out = header;
    let mut failures = Vec::new();
    let null = Value::Null;
    let peers = peers.unwrap_or(&null);
    out["copy_gb_per_s"] = json!(m.copy_gb_per_s);
    if let Some(r) = &m.rm_plus {
        let per_iter: Vec<f64> = r.variants.iter().map(|v| v.2 / r.iters as f64).collect();
        let best = per_iter.iter().copied().fold(f64::INFINITY, f64::min);
        let best_variant = r.variants[per_iter.iter().position(|v| *v == best).unwrap_or(0)]
            .0
            .clone();
        let p = &peers["zero_sum_rm_plus"];
        let same_size = p["games"].as_u64() == Some(r.games as u64)
            && p["m"].as_u64() == Some(r.size as u64)
            && p["iters"].as_u64() == Some(r.iters as u64);
        let peer_ms = |who: &str| p[who]["ms_per_iteration"].as_f64().filter(|_| same_size);
        let (torch, numpy) = (peer_ms("torch_eager"), peer_ms("numpy"));
        // The peer's results on the first games: torch's (same GPU), else numpy's.
        // Each peer's results on the first games (torch's on this GPU, numpy's on the CPU).
        let mut agreement = serde_json::Map::new();
        for (who, key) in [("torch", "torch_check"), ("numpy", "numpy_check")] {
            if !same_size || p[key]["iters"].as_u64() != Some(r.iters as u64) {
                continue;
            }
            let (dv, games) = max_diff(&r.value, &numbers(&p[key]["value"]));
            let (dn, _) = max_diff(&r.nashconv, &numbers(&p[key]["nashconv"]));
            let agree = games > 0 && dv <= agree_tol && dn <= agree_tol;
            if !agree {
                failures.push(format!(
                    "zero_sum_rm_plus: value differs from {who}'s by {dv:e} and NashConv by \
                     {dn:e} on {games} games (tolerance {agree_tol:e})"
                ));
            }
            agreement.insert(
                who.to_string(),
                json!({"games": games, "max_value_diff": dv, "max_nashconv_diff": dn,
                       "tolerance": agree_tol, "agree": agree}),
            );
        }
        let agreement = (!agreement.is_empty()).then_some(Value::Object(agreement));
        if !r.all_ran {
            failures.push("zero_sum_rm_plus: a game finished before the last iteration".into());
        }
        let median_nc = {
            let mut v = r.nashconv.clone();
            v.sort_by(f64::total_cmp);
            v.get(v.len() / 2).copied()
        };
        out["zero_sum_rm_plus"] = json!({
            "games": r.games, "m": r.size, "n": r.size, "iters": r.iters,
            "tol": NO_EARLY_EXIT, "check_every": r.iters, "all_ran_every_iteration": r.all_ran,
            "variants": r.variants.iter().zip(&per_iter).map(|((name, kernels, ms), it)| json!({
                "variant": name, "kernels": kernels, "median_ms": ms, "ms_per_iteration": it,
            })).collect::<Vec<_>>(),
            "variants_max_value_diff": r.variants_max_diff,
            "kiln_ms_per_iteration": best,
            "kiln_variant": best_variant,
            "median_nashconv": median_nc,
            "torch_eager_ms_per_iteration": torch,
            "numpy_ms_per_iteration": numpy,
            "numpy_scaling": p["numpy"]["scaling"],
            "speedup_vs_torch_eager": torch.map(|t| t / best),
            "speedup_vs_numpy": numpy.map(|n| n / best),
            "target_vs_torch_eager": 10.0,
            "target_vs_numpy": 1000.0,
            "meets_targets": torch.zip(numpy).map(|(t, n)| t / best >= 10.0 && n / best >= 1000.0),
            "agreement": agreement,
        });
    }
    if let Some(c) = &m.cosine {
        let p = &peers["cosine_similarity"];
        let same = p["n"].as_u64() == Some(c.n as u64) && p["d"].as_u64() == Some(c.d as u64);
        let peer = |key: &str| p[key]["median_ms"].as_f64().filter(|_| same);
        let (f32_ms, tf32_ms) = (peer("f32"), peer("tf32_on"));
        let flops = 2.0 * (c.n * c.n * c.d) as f64;
        if c.max_abs_err > 1e-5 {
            failures.push(format!(
                "cosine_similarity: |ΔS| {:e} > 1e-5 against f64 on {} rows",
                c.max_abs_err, c.rows_checked
            ));
        }
        out["cosine_similarity"] = json!({
            "n": c.n, "d": c.d, "dtype": "f32 (no TF32)", "median_ms": c.median_ms,
            "tflop_per_s": flops / (c.median_ms * 1e-3) / 1e12,
            "rows_checked_against_f64": c.rows_checked, "max_abs_err": c.max_abs_err,
            "torch_f32_median_ms": f32_ms,
            "torch_tf32_median_ms": tf32_ms,
            "speedup_vs_torch_f32": f32_ms.map(|t| t / c.median_ms),
            "speedup_vs_torch_tf32": tf32_ms.map(|t| t / c.median_ms),
            "torch_precision": "torch_f32: allow_tf32 False (kiln's precision); torch_tf32: True, for reference",
        });
    }
    if let Some(md) = &m.median {
        let p = &peers["coordinate_median"];
        let same = p["k"].as_u64() == Some(md.k as u64) && p["p"].as_u64() == Some(md.p as u64);
        let torch = p["median_ms"].as_f64().filter(|_| same);
        let bytes = ((md.k * md.p + md.p) * 4) as f64;
        let gbs = bytes / (md.median_ms * 1e-3) / 1e9;
        let fraction = gbs / m.copy_gb_per_s;
        if md.mismatches > 0 {
            failures.push(format!(
                "coordinate median: {} of {} coordinates differ from the CPU's",
                md.mismatches, md.checked
            ));
        }
        out["coordinate_median"] = json!({
            "k": md.k, "p": md.p, "elements": md.k * md.p, "bytes": bytes, "kernels": md.kernels,
            "median_ms": md.median_ms, "gb_per_s": gbs, "fraction_of_copy": fraction,
            "target_fraction_of_copy": 0.9, "meets_target": fraction >= 0.9,
            "checked_coordinates": md.checked, "mismatches": md.mismatches,
            "torch_median_ms": torch,
            "torch_gb_per_s": torch.map(|t| bytes / (t * 1e-3) / 1e9),
            "speedup_vs_torch": torch.map(|t| t / md.median_ms),
            "semantics": "kiln: the mean of the two middle values (K even); torch.median: the lower one",
        });
    }
    out["peers"] = peers.clone();
    out["failures"] = json!(failures);
    (out, failures)
}

pub(crate) fn run(args: ConsensusBenchArgs) -> Result<ExitCode> {
    if let Some(unknown) = args.cases.iter().find(|c| !CASES.contains(&c.as_str())) {
        bail!("--case {unknown}: no such case ({})", CASES.join(", "));
    }
    if args.solver_runs == 0 || args.runs == 0 || args.iters == 0 || args.games == 0 {
        bail!("--games, --iters, --runs and --solver-runs must be at least 1");
    }
    let chosen = |name: &str| args.cases.is_empty() || args.cases.iter().any(|c| c == name);
    let peers = read_peers(args.torch_json.as_deref())?;
    let gpu = Gpu::open()?;
    let copy_gb_per_s = gpu.copy_bandwidth(20)?;
    println!("copy: {copy_gb_per_s:.0} GB/s");
    let source = program(args.size, args.cos_d, args.median_k, args.median_p);
    let mut measured = Measured {
        copy_gb_per_s,
        ..Measured::default()
    };
    if chosen("rm_plus") {
        measured.rm_plus = Some(rm_plus(&gpu, &source, &args)?);
    }
    let base = gpu.compile_options();
    let (package, cuda) = gpu.compile_source("bench_consensus.kiln", &source, None, &base)?;
    let kernels = |function: &str| {
        package
            .compiled
            .stats
            .launches
            .iter()
            .filter(|k| k.function == function)
            .count()
    };
    if chosen("cosine") {
        let (n, d) = (args.cos_n, args.cos_d);
        let e = fill(n * d, SEED_EMBEDDINGS, |u| 2.0 * u - 1.0);
        let mut program = CudaProgram::new(cuda.clone(), "cosine")?;
        program.bind_weights(&|_| None)?;
        let inputs = [Tensor::from_f32(&[n, d], e.clone())];
        let s = program.run(&inputs)?.remove(0).to_f32_vec();
        let timing = program.time_launches(&inputs, args.runs)?;
        let rows = 8.min(n);
        let max_abs_err = cosine_error(&e, &s, n, d, rows);
        println!(
            "cosine_similarity {n}x{d}: {:.3} ms, |ΔS| {max_abs_err:.1e} on {rows} rows",
            timing.median_ms
        );
        measured.cosine = Some(Cosine {
            n,
            d,
            median_ms: timing.median_ms,
            rows_checked: rows,
            max_abs_err,
        });
    }
    if chosen("median") {
        let (k, p) = (args.median_k, args.median_p);
        eprintln!(
            "kiln: drawing {:.1} GB of updates",
            (k * p * 4) as f64 / 1e9
        );
        let u = fill(k * p, SEED_UPDATES, |u| u);
        // The first and the last coordinates: the last reach kiln's largest element indices.
        let half = (p / 2).min(1 << 19);
        let columns: Vec<usize> = (0..half).chain(p - half..p).collect();
        let checked = columns.len();
        let want = cpu_median(&u, k, p, &columns);
        let inputs = [
            Tensor::from_f32(&[k, p], u),
            Tensor::from_f32(&[k], vec![1.0; k]),
        ];
        let mut program = CudaProgram::new(cuda.clone(), "median")?;
        program.bind_weights(&|_| None)?;
        let got = program.run(&inputs)?.remove(0).to_f32_vec();
        let mismatches = columns
            .iter()
            .zip(&want)
            .filter(|(c, w)| got[**c] != **w)
            .count();
        let timing = program.time_launches(&inputs, args.runs)?;
        println!(
            "coordinate median {k}x{p}: {:.3} ms, {mismatches} of {checked} coordinates differ from the CPU's",
            timing.median_ms
        );
        measured.median = Some(Median {
            k,
            p,
            kernels: kernels("median"),
            median_ms: timing.median_ms,
            checked,
            mismatches,
        });
    }
    let header = gpu.record(json!({
        "data": "unit(index, seed) of bench_consensus.rs / benches/consensus_peers.py: payoffs in [0, 1), embeddings 2u - 1, updates u",
        "settings": settings(&args),
    }));
    let (out, failures) = assemble(header, &measured, peers.as_ref(), args.agree_tol);
    print_summary(&out);
    if let Some(path) = &args.out {
        std::fs::write(path, serde_json::to_string_pretty(&out)?)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("kiln: wrote {}", path.display());
    }
    for f in &failures {
        eprintln!("kiln bench consensus: CHECK FAILED: {f}");
    }
    Ok(if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The settings of the run, for the report.
fn settings(args: &ConsensusBenchArgs) -> Value {
    json!({
        "games": args.games, "size": args.size, "iters": args.iters, "tol": NO_EARLY_EXIT,
        "solver_runs": args.solver_runs, "runs": args.runs,
        "cos_n": args.cos_n, "cos_d": args.cos_d,
        "median_k": args.median_k, "median_p": args.median_p,
        "agree_tol": args.agree_tol,
        "cases": if args.cases.is_empty() { CASES.map(String::from).to_vec() } else { args.cases.clone() },
        "solver_variants": VARIANTS.iter().map(|(name, t)| json!({
            "variant": name, "persistent": t.enabled, "matrix_registers": t.matrix_registers,
        })).collect::<Vec<_>>(),
        "timing": "CUDA events around whole launches of the entry (inputs already on the GPU), median of the runs",
    })
}

/// Times every solver variant; the first one's results are checked against the peer's.
fn rm_plus(gpu: &Gpu, source: &str, args: &ConsensusBenchArgs) -> Result<RmPlus> {
    let (g, m) = (args.games, args.size);
    let games = fill(g * m * m, SEED_GAMES, |u| u);
    let inputs = [
        Tensor::from_f32(&[g, m, m], games),
        Tensor::from_i64(&[], vec![args.iters as i64]),
        Tensor::from_f32(&[], vec![NO_EARLY_EXIT]),
        Tensor::from_i64(&[], vec![args.iters as i64]),
    ];
    let mut result = RmPlus {
        games: g,
        size: m,
        iters: args.iters,
        variants: Vec::new(),
        value: Vec::new(),
        nashconv: Vec::new(),
        all_ran: true,
        variants_max_diff: 0.0,
    };
    for (name, tuning) in VARIANTS {
        let mut options = gpu.compile_options();
        options.fusion.persistent = tuning;
        let (package, cuda) = gpu.compile_source("bench_consensus.kiln", source, None, &options)?;
        let kernels = package
            .compiled
            .stats
            .launches
            .iter()
            .filter(|k| k.function == "rm_plus")
            .count();
        let mut program = CudaProgram::new(cuda, "rm_plus")?;
        program.bind_weights(&|_| None)?;
        let out = program.run(&inputs)?;
        let (value, nashconv) = (out[2].to_f64_vec(), out[3].to_f64_vec());
        result.all_ran &= out[4].to_f64_vec().iter().all(|u| *u == args.iters as f64);
        if result.value.is_empty() {
            result.value = value;
            result.nashconv = nashconv;
        } else {
            result.variants_max_diff = result
                .variants_max_diff
                .max(max_diff(&result.value, &value).0);
        }
        let timing = program.time_launches(&inputs, args.solver_runs)?;
        println!(
            "zero_sum_rm_plus {g} games {m}x{m}, {} iterations, {name}: {kernels} kernels, \
             {:.4} ms per iteration",
            args.iters,
            timing.median_ms / args.iters as f64
        );
        result
            .variants
            .push((name.to_string(), kernels, timing.median_ms));
    }
    Ok(result)
}

/// The largest |S_ij - f64 cosine| over the first `rows` rows.
fn cosine_error(e: &[f32], s: &[f32], n: usize, d: usize, rows: usize) -> f64 {
    let unit_rows: Vec<Vec<f64>> = (0..n)
        .map(|i| {
            let row = &e[i * d..][..d];
            let norm = (row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() + 1e-12).sqrt();
            row.iter().map(|v| *v as f64 / norm).collect()
        })
        .collect();
    let mut worst = 0f64;
    for i in 0..rows {
        for j in 0..n {
            let want: f64 = unit_rows[i]
                .iter()
                .zip(&unit_rows[j])
                .map(|(a, b)| a * b)
                .sum();
            worst = worst.max((s[i * n + j] as f64 - want).abs());
        }
    }
    worst
}

/// The coordinate median (the mean of the two middle values when K is even) of the
/// coordinates `columns` of `u` [K, P], in f32 as kiln computes it.
fn cpu_median(u: &[f32], k: usize, p: usize, columns: &[usize]) -> Vec<f32> {
    columns
        .iter()
        .map(|&i| {
            let mut column: Vec<f32> = (0..k).map(|r| u[r * p + i]).collect();
            column.sort_by(f32::total_cmp);
            (column[(k - 1) / 2] + column[k / 2]) / 2.0
        })
        .collect()
}

fn print_summary(out: &Value) {
    let show = |v: &Value| v.as_f64().map_or("-".to_string(), |x| format!("{x:.2}"));
    let r = &out["zero_sum_rm_plus"];
    if !r.is_null() {
        println!(
            "zero_sum_rm_plus: kiln {} ms/iteration ({}); torch eager {} ({}x); numpy {} ({}x); \
             agreement {}",
            r["kiln_ms_per_iteration"],
            r["kiln_variant"].as_str().unwrap_or("-"),
            r["torch_eager_ms_per_iteration"],
            show(&r["speedup_vs_torch_eager"]),
            r["numpy_ms_per_iteration"],
            show(&r["speedup_vs_numpy"]),
            r["agreement"]
        );
    }
    let c = &out["cosine_similarity"];
    if !c.is_null() {
        println!(
            "cosine_similarity: kiln {} ms; torch f32 {} ms ({}x), tf32 {} ms ({}x)",
            c["median_ms"],
            c["torch_f32_median_ms"],
            show(&c["speedup_vs_torch_f32"]),
            c["torch_tf32_median_ms"],
            show(&c["speedup_vs_torch_tf32"])
        );
    }
    let m = &out["coordinate_median"];
    if !m.is_null() {
        println!(
            "coordinate median: kiln {} GB/s = {} of copy; torch.median {} GB/s ({}x)",
            show(&m["gb_per_s"]),
            show(&m["fraction_of_copy"]),
            show(&m["torch_gb_per_s"]),
            show(&m["speedup_vs_torch"])
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use std::path::Path;
    use std::process::Command;

    fn repo_root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
    }

    /// `benches/consensus_peers.py ARGS` (numpy from .tools/pyenv, as the test suite's
    /// oracles), its stdout parsed.
    fn peers_script(args: &[&str]) -> Value {
        let root = repo_root();
        let out = Command::new("python3")
            .arg(root.join("benches/consensus_peers.py"))
            .args(args)
            .env("PYTHONPATH", root.join(".tools/pyenv"))
            .output()
            .expect("python3");
        assert!(
            out.status.success(),
            "consensus_peers.py {args:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("the script's JSON")
    }

    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        args: ConsensusBenchArgs,
    }

    #[test]
    fn arguments_parse_with_the_benchmark_sizes_as_defaults() {
        let a = Wrap::try_parse_from(["x"]).expect("defaults").args;
        assert_eq!((a.games, a.size, a.iters), (10_000, 64, 1000));
        assert_eq!((a.cos_n, a.cos_d), (16_384, 768));
        assert_eq!((a.median_k, a.median_p), (16, 134_217_728));
        let a = Wrap::try_parse_from([
            "x",
            "--case",
            "median",
            "--case",
            "rm_plus",
            "--games",
            "8",
            "-o",
            "r.json",
            "--torch-json",
            "t.json",
        ])
        .expect("options")
        .args;
        assert_eq!(a.cases, ["median", "rm_plus"]);
        assert_eq!(a.games, 8);
        assert_eq!(a.out.as_deref(), Some(Path::new("r.json")));
        assert_eq!(a.torch_json.as_deref(), Some(Path::new("t.json")));
        assert!(Wrap::try_parse_from(["x", "--games", "many"]).is_err());
        // And through the whole command line.
        assert!(
            crate::Cli::try_parse_from(["kiln", "bench", "consensus", "--case", "cosine"]).is_ok()
        );
    }

    #[test]
    fn bad_arguments_fail_before_looking_for_a_gpu() {
        let run_with = |argv: &[&str]| {
            let mut all = vec!["x"];
            all.extend_from_slice(argv);
            run(Wrap::try_parse_from(all).expect("parses").args)
                .expect_err("an argument error")
                .to_string()
        };
        assert!(run_with(&["--case", "krum"]).contains("no such case (rm_plus, cosine, median)"));
        assert!(run_with(&["--iters", "0"]).contains("at least 1"));
        let missing = std::env::temp_dir().join("kiln-no-such-peers.json");
        assert!(run_with(&["--torch-json", missing.to_str().unwrap()]).contains("reading"));
        let a = Wrap::try_parse_from(["x", "--case", "median"])
            .unwrap()
            .args;
        let s = settings(&a);
        assert_eq!(s["cases"], json!(["median"]));
        assert_eq!(
            s["solver_variants"].as_array().map(Vec::len),
            Some(VARIANTS.len())
        );
        assert_eq!(s["median_p"], 134_217_728);
    }

    #[test]
    fn the_solver_variants_compile_as_named() {
        let source = program(64, 768, 16, 1 << 20);
        for (name, tuning) in VARIANTS {
            let (parsed, diags) = kiln_lower::Program::load_source("b.kiln", &source, None);
            assert!(!diags.iter().any(|d| d.is_error()));
            let (lowered, diags) =
                kiln_lower::lower(&parsed, None, &kiln_lower::Options::default());
            let lowered = lowered.unwrap_or_else(|| panic!("{}", parsed.sources.render(&diags)));
            let mut options = kiln_driver::pipeline::CompileOptions {
                targets: vec![kiln_ptx::Target::for_compute_capability(9, 0).expect("sm_90a")],
                ..Default::default()
            };
            options.fusion.persistent = tuning;
            let package = kiln_driver::pipeline::compile("b.kiln", lowered, &options, None)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let launches = &package.compiled.stats.launches;
            let persistent = launches
                .iter()
                .any(|k| k.function == "rm_plus" && k.name.contains("persistent_loop"));
            assert_eq!(persistent, tuning.enabled, "{name}");
            for entry in ["cosine", "median"] {
                assert!(launches.iter().any(|k| k.function == entry), "{entry}");
            }
        }
    }

    #[test]
    fn the_data_equal_the_python_peers() {
        let data = peers_script(&["--print-data", "300"]);
        for seed in [SEED_GAMES, SEED_EMBEDDINGS, SEED_UPDATES] {
            let want = numbers(&data[seed.to_string()]);
            assert_eq!(want.len(), 300);
            let got = fill(300, seed, |u| u);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                // Multiples of 2^-24: exact in f32 (JSON's decimal may be off in the last
                // f64 digit, never by an f32 step).
                assert_eq!(*g, *w as f32, "seed {seed}, index {i}");
            }
        }
        assert!(got_spread(&fill(1 << 16, SEED_GAMES, |u| u)));
    }

    /// Values spread over [0, 1): mean near 1/2, every tenth of the range hit.
    fn got_spread(v: &[f32]) -> bool {
        let mean = v.iter().map(|x| *x as f64).sum::<f64>() / v.len() as f64;
        let mut bins = [0usize; 10];
        for x in v {
            bins[(*x * 10.0) as usize] += 1;
        }
        (mean - 0.5).abs() < 0.01 && bins.iter().all(|b| *b > v.len() / 20)
    }

    /// kiln's `zero_sum_rm_plus` (the benchmark's entry, on the graph interpreter) on the
    /// benchmark's data at a tiny size.
    fn kiln_rm_plus(games: usize, size: usize, iters: usize) -> Vec<Tensor> {
        let (program, diags) =
            kiln_lower::Program::load_source("b.kiln", &program(size, 8, 4, 64), None);
        assert!(!diags.iter().any(|d| d.is_error()));
        let options = kiln_lower::Options {
            entries: Some(vec!["rm_plus".into()]),
            ..kiln_lower::Options::default()
        };
        let (lowered, diags) = kiln_lower::lower(&program, None, &options);
        let lowered = lowered.unwrap_or_else(|| panic!("{}", program.sources.render(&diags)));
        let inputs = [
            Tensor::from_f32(
                &[games, size, size],
                fill(games * size * size, SEED_GAMES, |u| u),
            ),
            Tensor::from_i64(&[], vec![iters as i64]),
            Tensor::from_f32(&[], vec![NO_EARLY_EXIT]),
            Tensor::from_i64(&[], vec![iters as i64]),
        ];
        kiln_ir::interpret(&lowered.module.functions[0], &inputs, &kiln_ir::NoParams)
            .expect("interpreter")
    }

    #[test]
    fn the_numpy_peer_runs_the_stdlib_algorithm() {
        let (games, size, iters) = (4, 6, 40);
        let peers = peers_script(&[
            "--numpy-only",
            "--games",
            "4",
            "--size",
            "6",
            "--iters",
            "40",
            "--numpy-games",
            "4",
            "--check-every",
            "40",
        ]);
        let out = kiln_rm_plus(games, size, iters);
        let (value, nashconv) = (out[2].to_f64_vec(), out[3].to_f64_vec());
        assert!(out[4].to_f64_vec().iter().all(|u| *u == iters as f64));
        let check = &peers["zero_sum_rm_plus"]["numpy_check"];
        let (dv, n) = max_diff(&value, &numbers(&check["value"]));
        let (dn, _) = max_diff(&nashconv, &numbers(&check["nashconv"]));
        assert_eq!(n, games);
        // The same operations in f32; only reduction order may differ.
        assert!(dv <= 1e-5 && dn <= 1e-5, "value {dv:e}, NashConv {dn:e}");
        assert!(
            nashconv.iter().all(|nc| *nc > 0.0 && *nc < 0.05),
            "{nashconv:?}"
        );

        // The report from these results and the script's JSON.
        let measured = Measured {
            copy_gb_per_s: 3000.0,
            rm_plus: Some(RmPlus {
                games,
                size,
                iters,
                variants: vec![("a".into(), 11, 2.0), ("b".into(), 11, 1.0)],
                value,
                nashconv,
                all_ran: true,
                variants_max_diff: 0.0,
            }),
            ..Measured::default()
        };
        let (report, failures) = assemble(json!({"device": "test"}), &measured, Some(&peers), 1e-4);
        assert!(failures.is_empty(), "{failures:?}");
        let r = &report["zero_sum_rm_plus"];
        assert_eq!(r["kiln_variant"], "b");
        assert_eq!(r["kiln_ms_per_iteration"].as_f64(), Some(1.0 / 40.0));
        assert_eq!(r["agreement"]["numpy"]["agree"], true);
        assert!(r["agreement"]["torch"].is_null());
        let numpy = r["numpy_ms_per_iteration"].as_f64().expect("numpy's time");
        assert_eq!(r["speedup_vs_numpy"].as_f64(), Some(numpy / (1.0 / 40.0)));
        assert!(r["speedup_vs_torch_eager"].is_null());
        assert_eq!(report["device"], "test");
    }

    #[test]
    fn the_report_has_ratios_and_failed_checks() {
        let peers = json!({
            "zero_sum_rm_plus": {
                "games": 10, "m": 4, "iters": 100,
                "torch_eager": {"ms_per_iteration": 0.5},
                "numpy": {"ms_per_iteration": 50.0, "scaling": "s"},
                "torch_check": {"iters": 100, "value": [0.5, 0.25], "nashconv": [0.01, 0.02]},
            },
            "cosine_similarity": {"n": 16, "d": 8, "f32": {"median_ms": 8.0}, "tf32_on": {"median_ms": 4.0}},
            "coordinate_median": {"k": 4, "p": 1000, "median_ms": 2.0},
        });
        let rm = |value: Vec<f64>| RmPlus {
            games: 10,
            size: 4,
            iters: 100,
            variants: vec![("only".into(), 11, 2.5)],
            value,
            nashconv: vec![0.01, 0.02, 0.5],
            all_ran: true,
            variants_max_diff: 0.0,
        };
        let mut m = Measured {
            copy_gb_per_s: 0.02,
            rm_plus: Some(rm(vec![0.5, 0.25, 0.9])),
            cosine: Some(Cosine {
                n: 16,
                d: 8,
                median_ms: 2.0,
                rows_checked: 8,
                max_abs_err: 1e-7,
            }),
            median: Some(Median {
                k: 4,
                p: 1000,
                kernels: 2,
                median_ms: 1.0,
                checked: 10,
                mismatches: 0,
            }),
        };
        let (r, failures) = assemble(json!({}), &m, Some(&peers), 1e-3);
        assert!(failures.is_empty(), "{failures:?}");
        let z = &r["zero_sum_rm_plus"];
        assert_eq!(z["kiln_ms_per_iteration"].as_f64(), Some(0.025));
        assert_eq!(z["speedup_vs_torch_eager"].as_f64(), Some(20.0));
        assert_eq!(z["speedup_vs_numpy"].as_f64(), Some(2000.0));
        assert_eq!(z["meets_targets"], true);
        assert_eq!(z["agreement"]["torch"]["games"], 2);
        assert_eq!(
            r["cosine_similarity"]["speedup_vs_torch_f32"].as_f64(),
            Some(4.0)
        );
        assert_eq!(
            r["cosine_similarity"]["speedup_vs_torch_tf32"].as_f64(),
            Some(2.0)
        );
        let md = &r["coordinate_median"];
        // (4 × 1000 + 1000) f32 in 1 ms = 0.02 GB/s, all of the copy bandwidth.
        assert!((md["gb_per_s"].as_f64().unwrap() - 0.02).abs() < 1e-12);
        assert_eq!(md["meets_target"], true);
        assert_eq!(md["speedup_vs_torch"].as_f64(), Some(2.0));

        // A disagreeing value, a wrong median and an inaccurate cosine all fail the run.
        m.rm_plus = Some(rm(vec![0.5, 0.26, 0.9]));
        m.median.as_mut().unwrap().mismatches = 3;
        m.cosine.as_mut().unwrap().max_abs_err = 1e-3;
        let (r, failures) = assemble(json!({}), &m, Some(&peers), 1e-3);
        assert_eq!(failures.len(), 3, "{failures:?}");
        assert_eq!(r["failures"].as_array().map(Vec::len), Some(failures.len()));
        assert_eq!(r["zero_sum_rm_plus"]["agreement"]["torch"]["agree"], false);

        // Peers measured at other sizes give no ratios; no peers at all neither.
        m.rm_plus.as_mut().unwrap().iters = 50;
        let (r, _) = assemble(json!({}), &m, Some(&peers), 1e-3);
        assert!(r["zero_sum_rm_plus"]["speedup_vs_torch_eager"].is_null());
        assert!(r["zero_sum_rm_plus"]["agreement"].is_null());
        let (r, _) = assemble(json!({}), &m, None, 1e-3);
        assert!(r["cosine_similarity"]["speedup_vs_torch_f32"].is_null());
        assert!(r["peers"].is_null());
    }
}
