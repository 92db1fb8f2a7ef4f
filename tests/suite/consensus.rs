//! The consensus kernels of stdlib/consensus.kiln against external oracles: scipy's linprog
//! (zero-sum values), QuantEcon (exact bimatrix and polymatrix equilibria), numpy (robust
//! aggregators, DeGroot replays), pref_voting (voting rules) and f64 computations here
//! (NashConv). Every kernel runs twice, on the graph interpreter and as a compiled plan on
//! the Cranelift CPU backend, and each result is checked against the oracle on its own.
//!
//! The oracles run in `tests/oracles/consensus_oracle.py` with the Python packages that
//! scripts/test.sh installs into `.tools/pyenv`. Equilibria are compared by NashConv (and
//! zero-sum games by their value), never strategy by strategy: equilibria are not unique.
//! Tolerances are absolute on payoffs in [0, 1] (so relative to the payoff range) unless a
//! test says otherwise.

use kiln_ir::{interpret, DType, NoParams, Tensor};
use kiln_tests::{repo_root, Rng};
use serde_json::{json, Value};
use std::process::{Command, Stdio};

/// A consensus entry compiled for both execution paths.
struct Kernel {
    module: kiln_ir::Module,
    executor: kiln_cpu::CpuExecutor,
    compiled: kiln_gpu_kernels::CompiledModule,
}

impl Kernel {
    /// Lowers `entry` of stdlib/consensus.kiln and compiles it for the CPU backend.
    fn new(entry: &str) -> Kernel {
        let path = repo_root().join("stdlib/consensus.kiln");
        let source = std::fs::read_to_string(&path).expect("stdlib");
        Kernel::from_source(&source, entry)
    }

    /// Lowers `entry` of a program next to the stdlib (`import consensus` reaches it) and
    /// compiles it for the CPU backend: concrete shapes select other kernels than the
    /// stdlib's symbolic ones (a constant K sorts in registers).
    fn from_source(source: &str, entry: &str) -> Kernel {
        let path = repo_root().join("stdlib/consensus.kiln");
        let (program, diags) =
            kiln_lower::Program::load_source("consensus.kiln", source, path.parent());
        assert!(!diags.iter().any(|d| d.is_error()), "parse errors");
        let options = kiln_lower::Options {
            entries: Some(vec![entry.to_string()]),
            ..kiln_lower::Options::default()
        };
        let (lowered, diags) = kiln_lower::lower(&program, None, &options);
        let lowered = lowered
            .filter(|_| !diags.iter().any(|d| d.is_error()))
            .unwrap_or_else(|| panic!("{}", program.sources.render(&diags)));
        let mut optimized = lowered.module.clone();
        kiln_opt::optimize(&mut optimized).expect("optimize");
        let compiled =
            kiln_gpu_kernels::compile_module(&optimized, &kiln_gpu_kernels::Options::default())
                .unwrap_or_else(|e| panic!("{entry}: fusion failed: {e}"));
        let executor = kiln_cpu::CpuExecutor::new(&compiled.kernels)
            .unwrap_or_else(|e| panic!("{entry}: {e}"));
        Kernel {
            module: lowered.module,
            executor,
            compiled,
        }
    }

    /// The results on the interpreter and on the CPU backend, labelled.
    fn run(&self, inputs: &[Tensor]) -> Vec<(&'static str, Vec<Tensor>)> {
        let func = &self.module.functions[0];
        let interpreted = interpret(func, inputs, &NoParams)
            .unwrap_or_else(|e| panic!("{}: interpreter: {e}", func.name));
        let compiled = self
            .executor
            .run(&self.compiled.plans[0], inputs, &|_| None)
            .unwrap_or_else(|e| panic!("{}: cpu backend: {e}", func.name));
        vec![("interpreter", interpreted), ("cpu backend", compiled)]
    }
}

/// Runs the Python oracle on `cases` and returns its results, one per case.
fn oracle(cases: Vec<Value>) -> Vec<Value> {
    let root = repo_root();
    let mut child = Command::new("python3")
        .arg(root.join("tests/oracles/consensus_oracle.py"))
        .env("PYTHONPATH", root.join(".tools/pyenv"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 (the oracles need it; scripts/test.sh installs their packages)");
    let request = json!({ "cases": cases }).to_string();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin
            .write_all(request.as_bytes())
            .expect("writing the oracle request");
    }
    let out = child.wait_with_output().expect("oracle");
    assert!(
        out.status.success(),
        "the oracle failed (run scripts/test.sh to install numpy, scipy, quantecon and \
         pref_voting into .tools/pyenv):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reply: Value = serde_json::from_slice(&out.stdout).expect("oracle JSON");
    reply["results"].as_array().expect("results").clone()
}

fn f32_tensor(shape: &[usize], data: &[f64]) -> Tensor {
    Tensor::from_f32(shape, data.iter().map(|x| *x as f32).collect())
}

fn scalar_f32(v: f64) -> Tensor {
    Tensor::from_f32(&[], vec![v as f32])
}

fn scalar_int(v: i64) -> Tensor {
    Tensor::from_ints(DType::I64, &[], vec![v])
}

/// The f32 values a tensor input holds, as f64 (so references see exactly what kiln sees).
fn as_f32(data: &[f64]) -> Vec<f64> {
    data.iter().map(|x| f64::from(*x as f32)).collect()
}

fn to_f64s(v: &Value) -> Vec<f64> {
    match v {
        Value::Array(items) => items.iter().flat_map(to_f64s).collect(),
        Value::Number(n) => vec![n.as_f64().expect("number")],
        other => panic!("not a number array: {other}"),
    }
}

/// `g` games of `m`×`n` as nested JSON arrays.
fn games_json(data: &[f64], g: usize, m: usize, n: usize) -> Value {
    Value::Array(
        (0..g)
            .map(|gi| {
                Value::Array(
                    (0..m)
                        .map(|i| json!(&data[(gi * m + i) * n..][..n]))
                        .collect(),
                )
            })
            .collect(),
    )
}

/// `g` games of `m`×`n` with payoffs uniform in [0, 1].
fn random_games(rng: &mut Rng, g: usize, m: usize, n: usize) -> Vec<f64> {
    (0..g * m * n).map(|_| rng.unit()).collect()
}

// ---------------------------------------------------------------------------------------
// Two-player zero-sum games
// ---------------------------------------------------------------------------------------

#[test]
fn zero_sum_solvers_reach_the_lp_value() {
    let (g, m, n) = (6, 5, 5);
    let mut rng = Rng(31);
    let mut a = random_games(&mut rng, g, m, n);
    // Game 1: matching pennies in [0, 1] (value 1/2), padded with dominated actions.
    for i in 0..m {
        for j in 0..n {
            a[(m + i) * n + j] = match (i, j) {
                (0, 0) | (1, 1) => 1.0,
                (0 | 1, 0 | 1) => 0.0,
                (_, 0 | 1) => 0.0,
                _ => 1.0,
            };
        }
    }
    // Game 0: rock-paper-scissors shifted to [0, 1] (value 1/2, uniform equilibrium).
    let rps = [0.5, 0.0, 1.0, 1.0, 0.5, 0.0, 0.0, 1.0, 0.5];
    for i in 0..3 {
        for j in 0..3 {
            a[i * n + j] = rps[i * 3 + j];
        }
        // A dominated fourth and fifth action for both players.
        for j in 3..n {
            a[i * n + j] = 1.0;
        }
    }
    for i in 3..m {
        for j in 0..n {
            a[i * n + j] = 0.0;
        }
    }
    let a = as_f32(&a);
    let lp = oracle(vec![
        json!({"kind": "lp_value", "A": games_json(&a, g, m, n)}),
    ]);
    let values = to_f64s(&lp[0]["value"]);
    assert!((values[0] - 0.5).abs() < 1e-9, "rps value {}", values[0]);
    assert!(
        (values[1] - 0.5).abs() < 1e-9,
        "matching pennies value {}",
        values[1]
    );
    // The value must be within 1e-4 of the LP's for every method. NashConv: RM+ reaches
    // 1e-4; the last-iterate methods converge linearly but slowly on some games (degenerate
    // ones), so their stated tolerance after 6,000 iterations at η = 2 is 1e-3.
    let iters = 6000;
    for (entry, extra, tol) in [
        ("zero_sum_rm_plus", None, 1e-4),
        ("zero_sum_optimistic_hedge", Some(2.0), 1e-3),
        ("zero_sum_extragradient", Some(2.0), 1e-3),
    ] {
        let kernel = Kernel::new(entry);
        let stop_at = 2e-5;
        let mut inputs = vec![f32_tensor(&[g, m, n], &a), scalar_int(iters)];
        if let Some(eta) = extra {
            inputs.push(scalar_f32(eta));
        }
        inputs.push(scalar_f32(stop_at));
        inputs.push(scalar_int(25));
        for (backend, out) in kernel.run(&inputs) {
            let (x, y) = (out[0].to_f64_vec(), out[1].to_f64_vec());
            let (value, nc, used) = (
                out[2].to_f64_vec(),
                out[3].to_f64_vec(),
                out[4].to_f64_vec(),
            );
            for gi in 0..g {
                let game = &a[gi * m * n..][..m * n];
                let minus: Vec<f64> = game.iter().map(|v| -v).collect();
                let exact_nc =
                    kiln_tests::nashconv_f64(game, &minus, &x[gi * m..][..m], &y[gi * n..][..n]);
                let what = format!("{entry} on the {backend}, game {gi}");
                assert!(exact_nc <= tol, "{what}: NashConv {exact_nc:e} > {tol:e}");
                assert!(
                    (value[gi] - values[gi]).abs() <= 1e-4,
                    "{what}: value {} but the LP says {}",
                    value[gi],
                    values[gi]
                );
                assert!(
                    (nc[gi] - exact_nc).abs() <= 1e-5,
                    "{what}: reported NashConv {} but it is {exact_nc}",
                    nc[gi]
                );
                // A game stops (is masked) exactly when it reached the stopping tolerance at
                // a check; the others run the whole budget.
                let stopped = used[gi] < iters as f64;
                assert_eq!(
                    stopped,
                    nc[gi] <= stop_at,
                    "{what}: used {} iterations",
                    used[gi]
                );
                if stopped {
                    assert_eq!(used[gi] % 25.0, 0.0, "{what}: stopped between checks");
                }
            }
        }
    }
}

#[test]
fn nashconv_agrees_with_an_independent_f64_computation() {
    let (g, m, n) = (4, 6, 3);
    let mut rng = Rng(5);
    let a = as_f32(&rng.signed_vec(g * m * n));
    let b = as_f32(&rng.signed_vec(g * m * n));
    let simplex = |rng: &mut Rng, k: usize| -> Vec<f64> {
        let v: Vec<f64> = (0..k).map(|_| rng.unit() + 0.05).collect();
        let s: f64 = v.iter().sum();
        as_f32(&v.iter().map(|x| x / s).collect::<Vec<_>>())
    };
    let x: Vec<f64> = (0..g).flat_map(|_| simplex(&mut rng, m)).collect();
    let y: Vec<f64> = (0..g).flat_map(|_| simplex(&mut rng, n)).collect();
    let want = oracle(vec![json!({
        "kind": "nashconv",
        "A": games_json(&a, g, m, n),
        "B": games_json(&b, g, m, n),
        "x": x.chunks(m).collect::<Vec<_>>(),
        "y": y.chunks(n).collect::<Vec<_>>(),
    })]);
    let want = to_f64s(&want[0]["nashconv"]);
    let kernel = Kernel::new("nashconv");
    let inputs = [
        f32_tensor(&[g, m, n], &a),
        f32_tensor(&[g, m, n], &b),
        f32_tensor(&[g, m], &x),
        f32_tensor(&[g, n], &y),
    ];
    for (backend, out) in kernel.run(&inputs) {
        let got = out[0].to_f64_vec();
        for gi in 0..g {
            let here = kiln_tests::nashconv_f64(
                &a[gi * m * n..][..m * n],
                &b[gi * m * n..][..m * n],
                &x[gi * m..][..m],
                &y[gi * n..][..n],
            );
            assert!(
                (here - want[gi]).abs() < 1e-12,
                "the two f64 references differ"
            );
            assert!(
                (got[gi] - want[gi]).abs() <= 1e-5,
                "{backend}, game {gi}: {} vs numpy {}",
                got[gi],
                want[gi]
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// General-sum games
// ---------------------------------------------------------------------------------------

/// Battle of the sexes, the prisoner's dilemma (padded to 3×3 with a dominated action) and
/// random 3×3 games: (A, B) for `g` games.
fn general_sum_games(rng: &mut Rng, g: usize) -> (Vec<f64>, Vec<f64>) {
    let bos_a = [3.0, 0.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0];
    let bos_b = [2.0, 0.0, 0.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0];
    // Prisoner's dilemma on actions (cooperate, defect), a third action dominated by both.
    let pd_a = [3.0, 0.0, 1.0, 5.0, 1.0, 1.0, 0.0, 0.0, 0.0];
    let pd_b = [3.0, 5.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0];
    let mut a: Vec<f64> = bos_a.iter().chain(&pd_a).map(|v| v / 5.0).collect();
    let mut b: Vec<f64> = bos_b.iter().chain(&pd_b).map(|v| v / 5.0).collect();
    for _ in 2..g {
        a.extend((0..9).map(|_| rng.unit()));
        b.extend((0..9).map(|_| rng.unit()));
    }
    (as_f32(&a), as_f32(&b))
}

#[test]
fn exact_equilibria_from_quantecon_have_zero_nashconv_and_the_solvers_certify_theirs() {
    let g = 6;
    let mut rng = Rng(77);
    let (a, b) = general_sum_games(&mut rng, g);
    let exact = oracle(vec![json!({
        "kind": "lemke_howson",
        "A": games_json(&a, g, 3, 3),
        "B": games_json(&b, g, 3, 3),
    })]);
    let ex = as_f32(&to_f64s(&exact[0]["x"]));
    let ey = as_f32(&to_f64s(&exact[0]["y"]));
    let kernel = Kernel::new("nashconv");
    let inputs = [
        f32_tensor(&[g, 3, 3], &a),
        f32_tensor(&[g, 3, 3], &b),
        f32_tensor(&[g, 3], &ex),
        f32_tensor(&[g, 3], &ey),
    ];
    for (backend, out) in kernel.run(&inputs) {
        for (gi, nc) in out[0].to_f64_vec().iter().enumerate() {
            assert!(
                nc.abs() <= 1e-5,
                "{backend}: QuantEcon's equilibrium of game {gi} has NashConv {nc}"
            );
        }
    }
    // Battle of the sexes in closed form: both pure equilibria and the mixed one
    // (x = (3/5, 2/5), y = (2/5, 3/5)) have NashConv 0; a miscoordinated profile does not.
    let closed_x = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.6, 0.4, 0.0, 1.0, 0.0, 0.0];
    let closed_y = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.4, 0.6, 0.0, 0.0, 1.0, 0.0];
    let inputs = [
        f32_tensor(&[4, 3, 3], &a[..9].repeat(4)),
        f32_tensor(&[4, 3, 3], &b[..9].repeat(4)),
        f32_tensor(&[4, 3], &closed_x),
        f32_tensor(&[4, 3], &closed_y),
    ];
    for (backend, out) in kernel.run(&inputs) {
        let nc = out[0].to_f64_vec();
        for (i, v) in nc[..3].iter().enumerate() {
            assert!(
                v.abs() <= 1e-6,
                "{backend}: battle of the sexes equilibrium {i}: {v}"
            );
        }
        // Miscoordinated (row plays 0, column plays 1): each gains 2/5 by switching.
        assert!((nc[3] - 0.8).abs() <= 1e-6, "{backend}: {}", nc[3]);
    }
    // The best-effort solvers: their reported NashConv is the true one of what they return,
    // `converged` means NashConv ≤ tol, and the games with pure equilibria are solved.
    let tol = 1e-4;
    for (entry, eta) in [
        ("bimatrix_rm_plus", None),
        ("bimatrix_hedge", Some(1.0)),
        ("bimatrix_optimistic_hedge", Some(1.0)),
    ] {
        let kernel = Kernel::new(entry);
        let mut inputs = vec![
            f32_tensor(&[g, 3, 3], &a),
            f32_tensor(&[g, 3, 3], &b),
            scalar_int(2000),
        ];
        if let Some(eta) = eta {
            inputs.push(scalar_f32(eta));
        }
        inputs.push(scalar_f32(tol));
        inputs.push(scalar_int(10));
        for (backend, out) in kernel.run(&inputs) {
            let (x, y, nc) = (
                out[0].to_f64_vec(),
                out[1].to_f64_vec(),
                out[2].to_f64_vec(),
            );
            let converged = out[3].to_i64_vec();
            for gi in 0..g {
                let what = format!("{entry} on the {backend}, game {gi}");
                let exact_nc = kiln_tests::nashconv_f64(
                    &a[gi * 9..][..9],
                    &b[gi * 9..][..9],
                    &x[gi * 3..][..3],
                    &y[gi * 3..][..3],
                );
                assert!(
                    (nc[gi] - exact_nc).abs() <= 1e-5,
                    "{what}: reports {} but NashConv is {exact_nc}",
                    nc[gi]
                );
                assert_eq!(converged[gi] != 0, nc[gi] <= tol, "{what}: converged flag");
            }
            // Battle of the sexes and the prisoner's dilemma have pure equilibria that
            // every one of these dynamics finds.
            assert!(
                converged[0] != 0 && converged[1] != 0,
                "{entry} on the {backend}: {nc:?}"
            );
            // The dilemma's only equilibrium is defect/defect.
            assert!(
                x[4] > 0.999 && y[4] > 0.999,
                "{entry}: {:?} {:?}",
                &x[3..6],
                &y[3..6]
            );
        }
    }
}

#[test]
fn fictitious_play_cycles_on_shapleys_game_and_converges_on_rock_paper_scissors() {
    // Shapley's game: A = the identity, B = a cyclic permutation; the unique equilibrium is
    // uniform but fictitious play's empirical mixes cycle away from it.
    let shapley_a = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0];
    let shapley_b = [0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0];
    let rps_a = [0.0, -1.0, 1.0, 1.0, 0.0, -1.0, -1.0, 1.0, 0.0];
    let rps_b: Vec<f64> = rps_a.iter().map(|v: &f64| -v).collect();
    let a: Vec<f64> = shapley_a.iter().chain(&rps_a).cloned().collect();
    let b: Vec<f64> = shapley_b.iter().chain(&rps_b).cloned().collect();
    let kernel = Kernel::new("bimatrix_fictitious_play");
    let inputs = [
        f32_tensor(&[2, 3, 3], &a),
        f32_tensor(&[2, 3, 3], &b),
        scalar_int(3000),
    ];
    for (backend, out) in kernel.run(&inputs) {
        let nc = out[2].to_f64_vec();
        assert!(
            nc[0] > 0.1,
            "{backend}: Shapley's game: NashConv {} (fictitious play should cycle)",
            nc[0]
        );
        assert!(
            nc[1] < 0.05,
            "{backend}: rock-paper-scissors: NashConv {} (Robinson: it converges)",
            nc[1]
        );
    }
}

// ---------------------------------------------------------------------------------------
// Robust aggregation
// ---------------------------------------------------------------------------------------

#[test]
fn robust_aggregators_equal_numpy() {
    let (k, p) = (9, 13);
    let (trim, f, m) = (2, 2, 3);
    let mut rng = Rng(11);
    let mut u = as_f32(&rng.signed_vec(k * p));
    // Two outliers, and a repeated value in column 0 (ties).
    for c in 0..p {
        u[7 * p + c] = 40.0 + c as f64;
        u[8 * p + c] = -35.0;
    }
    u[p] = u[0];
    let rows: Vec<&[f64]> = u.chunks(p).collect();
    let want = oracle(vec![
        json!({"kind": "robust", "U": rows, "trim": trim, "f": f, "m": m}),
    ]);
    let want = &want[0];
    let ut = f32_tensor(&[k, p], &u);
    let median = Kernel::new("coordinate_median");
    for (backend, out) in median.run(std::slice::from_ref(&ut)) {
        // Odd K: the median is one of the inputs, so it must be equal exactly.
        // (Compared as f32: the JSON round trip may move an f64 by an ulp.)
        let as_f32s = |v: Vec<f64>| v.iter().map(|x| *x as f32).collect::<Vec<f32>>();
        assert_eq!(
            as_f32s(out[0].to_f64_vec()),
            as_f32s(to_f64s(&want["median"])),
            "{backend} median"
        );
    }
    let trimmed = Kernel::new("trimmed_mean");
    for (backend, out) in trimmed.run(&[ut.clone(), scalar_int(trim)]) {
        let got = out[0].to_f64_vec();
        for (g, w) in got.iter().zip(to_f64s(&want["trimmed_mean"])) {
            assert!(
                (g - w).abs() <= 1e-6 * w.abs().max(1.0),
                "{backend} trimmed mean {g} vs {w}"
            );
        }
    }
    // The same with K a constant: one kernel sorting each coordinate in registers, the
    // median and the trimmed mean computed there.
    let fixed = Kernel::from_source(
        &format!(
            "import consensus
fn both(U: f32[{k}, P]) -> (f32[P], f32[P]) {{ (coordinate_median(U), trimmed_mean(U, {trim})) }}"
        ),
        "both",
    );
    assert!(
        fixed
            .compiled
            .kernels
            .iter()
            .all(|k| k.name.contains("sort9")),
        "the register kernels: {:?}",
        fixed
            .compiled
            .kernels
            .iter()
            .map(|k| &k.name)
            .collect::<Vec<_>>()
    );
    for (backend, out) in fixed.run(std::slice::from_ref(&ut)) {
        let as_f32s = |v: Vec<f64>| v.iter().map(|x| *x as f32).collect::<Vec<f32>>();
        assert_eq!(
            as_f32s(out[0].to_f64_vec()),
            as_f32s(to_f64s(&want["median"])),
            "{backend} median, K constant"
        );
        for (g, w) in out[1]
            .to_f64_vec()
            .iter()
            .zip(to_f64s(&want["trimmed_mean"]))
        {
            assert!(
                (g - w).abs() <= 1e-6 * w.abs().max(1.0),
                "{backend} trimmed mean {g} vs {w}, K constant"
            );
        }
    }
    // A NaN in a coordinate makes its median NaN (np.median); the others stay as they were.
    let mut with_nan = u.clone();
    with_nan[3 * p + 5] = f64::NAN;
    let nan_u = f32_tensor(&[k, p], &with_nan);
    for kernel in [&median, &fixed] {
        for (backend, out) in kernel.run(std::slice::from_ref(&nan_u)) {
            let got = out[0].to_f64_vec();
            let want = to_f64s(&want["median"]);
            for c in 0..p {
                if c == 5 {
                    assert!(
                        got[c].is_nan(),
                        "{backend}: the NaN coordinate's median {}",
                        got[c]
                    );
                } else {
                    assert_eq!(got[c] as f32, want[c] as f32, "{backend}: coordinate {c}");
                }
            }
        }
    }
    let krum = Kernel::new("krum");
    for (backend, out) in krum.run(&[ut.clone(), scalar_int(f as i64)]) {
        assert_eq!(
            out[0].to_i64_vec(),
            vec![want["krum"].as_i64().unwrap()],
            "{backend} krum"
        );
        for (g, w) in out[1]
            .to_f64_vec()
            .iter()
            .zip(to_f64s(&want["krum_scores"]))
        {
            assert!(
                (g - w).abs() <= 1e-5 * w.abs().max(1.0),
                "{backend} krum score {g} vs {w}"
            );
        }
    }
    let multi = Kernel::new("multi_krum");
    for (backend, out) in multi.run(&[ut.clone(), scalar_int(f as i64), scalar_int(m as i64)]) {
        let chosen: Vec<i64> = out[1]
            .to_f64_vec()
            .iter()
            .enumerate()
            .filter(|(_, v)| **v != 0.0)
            .map(|(i, _)| i as i64)
            .collect();
        let want_chosen: Vec<i64> = want["multi_krum_selected"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        assert_eq!(chosen, want_chosen, "{backend} multi-Krum selection");
        for (g, w) in out[0].to_f64_vec().iter().zip(to_f64s(&want["multi_krum"])) {
            assert!(
                (g - w).abs() <= 1e-6 * w.abs().max(1.0),
                "{backend} multi-Krum {g} vs {w}"
            );
        }
    }
}

#[test]
fn weiszfeld_reaches_the_geometric_median_objective() {
    let (k, p) = (8, 5);
    let mut rng = Rng(12);
    let u = as_f32(&rng.signed_vec(k * p));
    let w = as_f32(&(0..k).map(|_| 0.5 + rng.unit()).collect::<Vec<_>>());
    let rows: Vec<&[f64]> = u.chunks(p).collect();
    let want = oracle(vec![json!({"kind": "geometric_median", "U": rows, "w": w})]);
    let best = want[0]["objective"].as_f64().unwrap();
    let kernel = Kernel::new("geometric_median");
    let inputs = [
        f32_tensor(&[k, p], &u),
        f32_tensor(&[k], &w),
        scalar_int(300),
    ];
    for (backend, out) in kernel.run(&inputs) {
        let z = out[0].to_f64_vec();
        let objective: f64 = (0..k)
            .map(|i| {
                let d: f64 = (0..p).map(|c| (u[i * p + c] - z[c]).powi(2)).sum();
                w[i] * d.sqrt()
            })
            .sum();
        let rel = (objective - best) / best;
        assert!(
            rel.abs() <= 1e-6,
            "{backend}: objective {objective} vs the optimum {best} (relative {rel:e})"
        );
        let reported = out[1].to_f64_vec()[0];
        assert!((reported - objective).abs() <= 1e-5 * objective);
    }
}

// ---------------------------------------------------------------------------------------
// Voting
// ---------------------------------------------------------------------------------------

#[test]
fn voting_rules_equal_pref_voting() {
    let (g, v, c) = (5, 9, 4);
    let mut rng = Rng(21);
    let mut positions = Vec::new();
    for _ in 0..g * v {
        // A random strict ranking: a shuffle of the candidates; store each one's position.
        let mut order: Vec<usize> = (0..c).collect();
        for i in (1..c).rev() {
            order.swap(i, rng.below(i + 1));
        }
        let mut pos = vec![0i64; c];
        for (place, cand) in order.iter().enumerate() {
            pos[*cand] = place as i64;
        }
        positions.extend(pos);
    }
    let weights: Vec<i64> = (0..g * v).map(|_| 1 + rng.below(3) as i64).collect();
    let r_json: Vec<Vec<&[i64]>> = positions
        .chunks(v * c)
        .map(|game| game.chunks(c).collect())
        .collect();
    let w_json: Vec<&[i64]> = weights.chunks(v).collect();
    let want = oracle(vec![json!({"kind": "votes", "R": r_json, "w": w_json})]);
    let want = &want[0];
    let kernel = Kernel::new("vote_aggregate");
    let inputs = [
        Tensor::from_ints(DType::I32, &[g, v, c], positions.clone()),
        Tensor::from_f32(&[g, v], weights.iter().map(|w| *w as f32).collect()),
    ];
    for (backend, out) in kernel.run(&inputs) {
        assert_eq!(
            out[0].to_f64_vec(),
            to_f64s(&want["borda"]),
            "{backend} Borda"
        );
        assert_eq!(
            out[1].to_f64_vec(),
            to_f64s(&want["plurality"]),
            "{backend} plurality"
        );
        assert_eq!(
            out[2].to_f64_vec(),
            to_f64s(&want["support"]),
            "{backend} pairwise support"
        );
        let condorcet: Vec<i64> = want["condorcet"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap())
            .collect();
        assert_eq!(out[3].to_i64_vec(), condorcet, "{backend} Condorcet winner");
        assert_eq!(
            out[4].to_f64_vec(),
            to_f64s(&want["copeland"]),
            "{backend} Copeland"
        );
    }
}

// ---------------------------------------------------------------------------------------
// The consensus game and consensus rounds
// ---------------------------------------------------------------------------------------

/// `g` consensus games: S the cosine similarity of random proposals [K, K] (symmetric),
/// P random preferences [N, K].
fn consensus_games(rng: &mut Rng, g: usize, n: usize, k: usize) -> (Vec<f64>, Vec<f64>) {
    let d = 4;
    let mut s = Vec::new();
    for _ in 0..g {
        let e: Vec<f64> = rng.signed_vec(k * d);
        let norm = |i: usize| (0..d).map(|c| e[i * d + c].powi(2)).sum::<f64>().sqrt();
        for i in 0..k {
            for j in 0..k {
                let dot: f64 = (0..d).map(|c| e[i * d + c] * e[j * d + c]).sum();
                s.push(dot / (norm(i) * norm(j)));
            }
        }
    }
    let p: Vec<f64> = (0..g * n * k).map(|_| rng.unit()).collect();
    (as_f32(&s), as_f32(&p))
}

#[test]
fn the_consensus_game_matches_quantecon_and_hedge_reaches_an_equilibrium() {
    let (g, n, k, lam) = (4, 3, 3, 0.5);
    let mut rng = Rng(41);
    let (s, p) = consensus_games(&mut rng, g, n, k);
    let exact = oracle(vec![json!({
        "kind": "polymatrix",
        "S": games_json(&s, g, k, k),
        "P": games_json(&p, g, n, k),
        "lam": lam,
    })]);
    let sigma = as_f32(&to_f64s(&exact[0]["sigma"]));
    let nashconv = Kernel::new("consensus_game_nashconv");
    let inputs = [
        f32_tensor(&[g, k, k], &s),
        f32_tensor(&[g, n, k], &p),
        f32_tensor(&[g, n, k], &sigma),
        scalar_f32(lam),
    ];
    for (backend, out) in nashconv.run(&inputs) {
        for (gi, nc) in out[0].to_f64_vec().iter().enumerate() {
            assert!(
                nc.abs() <= 1e-5,
                "{backend}: QuantEcon's equilibrium of game {gi}: {nc}"
            );
        }
    }
    // A non-equilibrium profile has positive NashConv (the metric is not trivially 0).
    let uniform = vec![1.0 / k as f64; g * n * k];
    let probe = [
        f32_tensor(&[g, k, k], &s),
        f32_tensor(&[g, n, k], &p),
        f32_tensor(&[g, n, k], &uniform),
        scalar_f32(lam),
    ];
    for (backend, out) in nashconv.run(&probe) {
        assert!(out[0].to_f64_vec().iter().all(|nc| *nc > 1e-3), "{backend}");
    }
    let tol = 1e-3;
    for (entry, eta) in [
        ("consensus_game_hedge", Some(2.0)),
        ("consensus_game_optimistic_hedge", Some(2.0)),
        ("consensus_game_replicator", Some(0.5)),
    ] {
        let kernel = Kernel::new(entry);
        let mut inputs = vec![
            f32_tensor(&[g, k, k], &s),
            f32_tensor(&[g, n, k], &p),
            scalar_f32(lam),
            scalar_int(3000),
        ];
        if let Some(eta) = eta {
            inputs.push(scalar_f32(eta));
        }
        for (backend, out) in kernel.run(&inputs) {
            let nc = out[1].to_f64_vec();
            for (gi, v) in nc.iter().enumerate() {
                assert!(
                    *v <= tol,
                    "{entry} on the {backend}, game {gi}: NashConv {v}"
                );
            }
            // The consensus is the proposal with the most support.
            let support = out[3].to_f64_vec();
            let winners = out[2].to_i64_vec();
            for gi in 0..g {
                let row = &support[gi * k..][..k];
                let best = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                assert_eq!(row[winners[gi] as usize], best, "{entry} game {gi}");
            }
        }
    }
}

#[test]
fn consensus_rounds_equal_an_f64_replay() {
    let (g, n, d) = (3, 5, 4);
    let (rounds, tau, alpha, tol) = (60, 0.5, 0.5, 1e-3);
    let mut rng = Rng(51);
    let e = as_f32(&rng.signed_vec(g * n * d));
    let games: Vec<Vec<&[f64]>> = e.chunks(n * d).map(|x| x.chunks(d).collect()).collect();
    let want = oracle(vec![json!({
        "kind": "degroot", "E": games, "tau": tau, "alpha": alpha, "tol": tol, "rounds": rounds,
    })]);
    let want = &want[0];
    let kernel = Kernel::new("consensus_round");
    let inputs = [
        f32_tensor(&[g, n, d], &e),
        scalar_int(rounds),
        scalar_f32(tau),
        scalar_f32(alpha),
        scalar_f32(tol),
    ];
    for (backend, out) in kernel.run(&inputs) {
        for (got, w) in out[0].to_f64_vec().iter().zip(to_f64s(&want["E"])) {
            assert!((got - w).abs() <= 1e-4, "{backend}: E' {got} vs {w}");
        }
        for (got, w) in out[1].to_f64_vec().iter().zip(to_f64s(&want["center"])) {
            assert!((got - w).abs() <= 1e-4, "{backend}: center {got} vs {w}");
        }
        let winners: Vec<i64> = to_f64s(&want["winner"]).iter().map(|v| *v as i64).collect();
        assert_eq!(out[2].to_i64_vec(), winners, "{backend} winners");
        assert_eq!(
            out[3].to_f64_vec(),
            to_f64s(&want["used"]),
            "{backend} rounds used"
        );
    }
}

#[test]
fn fused_scores_select_the_same_winner_as_the_similarity_matrix() {
    let (g, n, d) = (4, 7, 6);
    let mut rng = Rng(61);
    let e = as_f32(&rng.signed_vec(g * n * d));
    let w = as_f32(&(0..g * n).map(|_| rng.unit()).collect::<Vec<_>>());
    // numpy-free reference in f64: the medoid scores from the explicit matrix.
    let mut want_scores = Vec::new();
    let mut want_winner = Vec::new();
    for gi in 0..g {
        let row = |i: usize| &e[(gi * n + i) * d..][..d];
        let norm = |i: usize| (row(i).iter().map(|x| x * x).sum::<f64>() + 1e-12).sqrt();
        let scores: Vec<f64> = (0..n)
            .map(|i| {
                (0..n)
                    .filter(|j| *j != i)
                    .map(|j| {
                        let dot: f64 = (0..d).map(|c| row(i)[c] * row(j)[c]).sum();
                        dot / (norm(i) * norm(j)) * w[gi * n + j]
                    })
                    .sum()
            })
            .collect();
        let mut best = 0;
        for (i, s) in scores.iter().enumerate() {
            if *s > scores[best] {
                best = i;
            }
        }
        want_scores.extend(scores);
        want_winner.push(best as i64);
    }
    let fused = Kernel::new("consensus_scores");
    for (backend, out) in fused.run(&[f32_tensor(&[g, n, d], &e), f32_tensor(&[g, n], &w)]) {
        for (got, want) in out[0].to_f64_vec().iter().zip(&want_scores) {
            assert!(
                (got - want).abs() <= 1e-5,
                "{backend}: score {got} vs {want}"
            );
        }
        assert_eq!(out[1].to_i64_vec(), want_winner, "{backend} winners");
    }
}

#[test]
fn robust_aggregate_dispatches_to_each_rule() {
    let source = "import consensus
        fn by_rule(U: f32[K, P], w: f32[K]) -> (f32[P], f32[P], f32[P], f32[P], f32[P], f32[P]) {
            (robust_aggregate(U, w, \"mean\"), robust_aggregate(U, w, \"median\"),
             robust_aggregate(U, w, \"trimmed_mean\", trim: 1), robust_aggregate(U, w, \"krum\", f: 1),
             robust_aggregate(U, w, \"multi_krum\", f: 1, m: 2),
             robust_aggregate(U, w, \"geometric_median\", iters: 50))
        }";
    let lowered = kiln_tests::compile_source("rules.kiln", source, None, None)
        .unwrap_or_else(|d| panic!("{d}"));
    let (k, p) = (7, 4);
    let mut rng = Rng(71);
    let u = as_f32(&rng.signed_vec(k * p));
    let w = as_f32(&(0..k).map(|_| 0.5 + rng.unit()).collect::<Vec<_>>());
    let (ut, wt) = (f32_tensor(&[k, p], &u), f32_tensor(&[k], &w));
    let got = interpret(
        &lowered.module.functions[0],
        &[ut.clone(), wt.clone()],
        &NoParams,
    )
    .expect("by_rule");
    let first = |entry: &str, inputs: &[Tensor]| Kernel::new(entry).run(inputs)[0].1.clone();
    let krum_index = first("krum", &[ut.clone(), scalar_int(1)])[0].to_i64_vec()[0] as usize;
    let want = [
        first("aggregate_mean", &[ut.clone(), wt.clone()])[0].to_f64_vec(),
        first("coordinate_median", std::slice::from_ref(&ut))[0].to_f64_vec(),
        first("trimmed_mean", &[ut.clone(), scalar_int(1)])[0].to_f64_vec(),
        u[krum_index * p..][..p].to_vec(),
        first("multi_krum", &[ut.clone(), scalar_int(1), scalar_int(2)])[0].to_f64_vec(),
        first(
            "geometric_median",
            &[ut.clone(), wt.clone(), scalar_int(50)],
        )[0]
        .to_f64_vec(),
    ];
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(&g.to_f64_vec(), w, "rule {i}");
    }
}

#[test]
fn small_axis_sort_and_scatter_add() {
    let source = "import consensus
        fn sorted(x: f32[R, K]) -> f32[R, K] { sort_rows(x) }
        fn binned(v: f32[R, I], idx: i64[R, I]) -> f32[R, 4] { scatter_add(v, idx, 4) }";
    let lowered = kiln_tests::compile_source("small_axis.kiln", source, None, None)
        .unwrap_or_else(|d| panic!("{d}"));
    let (r, k) = (3, 6);
    let mut rng = Rng(81);
    let mut x = as_f32(&rng.signed_vec(r * k));
    x[1] = x[0]; // a tie
    let got = interpret(
        lowered.module.function("sorted").expect("sorted"),
        &[f32_tensor(&[r, k], &x)],
        &NoParams,
    )
    .expect("sorted");
    let mut want = Vec::new();
    for row in x.chunks(k) {
        let mut row = row.to_vec();
        row.sort_by(f64::total_cmp);
        want.extend(row);
    }
    assert_eq!(got[0].to_f64_vec(), want);
    let idx: Vec<i64> = (0..r * k).map(|_| rng.below(4) as i64).collect();
    let got = interpret(
        lowered.module.function("binned").expect("binned"),
        &[
            f32_tensor(&[r, k], &x),
            Tensor::from_ints(DType::I64, &[r, k], idx.clone()),
        ],
        &NoParams,
    )
    .expect("binned");
    let mut want = vec![0.0f64; r * 4];
    for (i, (v, c)) in x.iter().zip(&idx).enumerate() {
        want[(i / k) * 4 + *c as usize] += v;
    }
    for (g, w) in got[0].to_f64_vec().iter().zip(&want) {
        assert!((g - w).abs() <= 1e-6, "scatter_add {g} vs {w}");
    }
}

/// Whether `steps` launch a persistent loop kernel (`kernels` names them) anywhere.
fn launches_persistent(steps: &[kiln_kir::Step], kernels: &[kiln_kir::Kernel]) -> bool {
    steps.iter().any(|s| match s {
        kiln_kir::Step::Launch { kernel, .. } => kernels[*kernel].name.contains("persistent_loop"),
        kiln_kir::Step::BySize { small, large, .. } => {
            launches_persistent(small, kernels) || launches_persistent(large, kernels)
        }
        kiln_kir::Step::Loop { body, .. } => launches_persistent(body, kernels),
        kiln_kir::Step::Copy { .. } => false,
    })
}

#[test]
fn the_solver_loops_above_run_as_persistent_kernels() {
    // The games of these tests (at most 64 actions a player) are within the kernel's bound,
    // so the CPU-backend results checked above came from the persistent kernels.
    for entry in [
        "zero_sum_rm_plus",
        "zero_sum_optimistic_hedge",
        "zero_sum_extragradient",
        "bimatrix_rm_plus",
        "bimatrix_hedge",
        "bimatrix_optimistic_hedge",
        "bimatrix_fictitious_play",
        "consensus_game_hedge",
        "consensus_round",
    ] {
        let kernel = Kernel::new(entry);
        let plan = &kernel.compiled.plans[0];
        assert!(
            launches_persistent(&plan.steps, &kernel.compiled.kernels),
            "{entry}:\n{plan}"
        );
    }
}
