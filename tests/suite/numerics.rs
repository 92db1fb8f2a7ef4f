//! Numerics of the reference interpreter: every stdlib function against values computed
//! independently here (plain f64 loops), and the model programs against Hugging Face
//! transformers' outputs on tiny random-weight checkpoints (tests/fixtures, made by
//! tests/fixtures/make_fixtures.py).
//!
//! Tolerances: f32 programs are compared by relative error max|a - b| / max|b| ≤ 1e-4
//! against transformers (float32 on the CPU) and ≤ 1e-5 against the f64 references here.

use kiln_ir::{interpret, DType, NoParams, Tensor};
use kiln_tests::{compile_source, load_safetensors, read_json, rel_err, repo_root, Rng};
use std::collections::BTreeMap;

fn f32_tensor(shape: &[usize], data: &[f64]) -> Tensor {
    Tensor::from_f32(shape, data.iter().map(|x| *x as f32).collect())
}

/// Compiles `source`, runs entry `entry` on `inputs`, returns its results.
fn run(source: &str, entry: &str, inputs: &[Tensor]) -> Vec<Tensor> {
    let lowered = compile_source("test.kiln", source, None, None).unwrap_or_else(|d| panic!("{d}"));
    let func = lowered
        .module
        .function(entry)
        .unwrap_or_else(|| panic!("no entry {entry}"));
    interpret(func, inputs, &NoParams).unwrap_or_else(|e| panic!("{entry}: {e}"))
}

fn assert_close(what: &str, got: &Tensor, want: &[f64], tol: f64) {
    let got = got.to_f64_vec();
    let err = rel_err(&got, want);
    assert!(
        err <= tol,
        "{what}: relative error {err:e} > {tol:e}\n got {:?}\nwant {:?}",
        &got[..got.len().min(8)],
        &want[..want.len().min(8)]
    );
}

// ---------------------------------------------------------------------------------------
// stdlib/nn.kiln
// ---------------------------------------------------------------------------------------

#[test]
fn rms_norm_and_layer_norm() {
    let (rows, d) = (5, 12);
    let mut rng = Rng(1);
    let x = rng.signed_vec(rows * d);
    let w = rng.signed_vec(d);
    let b = rng.signed_vec(d);
    let src = "import nn
        fn rms(x: f32[R, 12], w: f32[12]) -> f32[R, 12] { rms_norm(x, w, 1e-5) }
        fn ln(x: f32[R, 12], w: f32[12], b: f32[12]) -> f32[R, 12] { layer_norm(x, w, b, 1e-5) }";
    let mut want_rms = Vec::new();
    let mut want_ln = Vec::new();
    for r in 0..rows {
        let row = &x[r * d..(r + 1) * d];
        let ms = row.iter().map(|v| v * v).sum::<f64>() / d as f64;
        let mean = row.iter().sum::<f64>() / d as f64;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / d as f64;
        for i in 0..d {
            want_rms.push(row[i] / (ms + 1e-5).sqrt() * w[i]);
            want_ln.push((row[i] - mean) / (var + 1e-5).sqrt() * w[i] + b[i]);
        }
    }
    let xt = f32_tensor(&[rows, d], &x);
    let out = run(src, "rms", &[xt.clone(), f32_tensor(&[d], &w)]);
    assert_close("rms_norm", &out[0], &want_rms, 1e-5);
    let out = run(src, "ln", &[xt, f32_tensor(&[d], &w), f32_tensor(&[d], &b)]);
    assert_close("layer_norm", &out[0], &want_ln, 1e-5);
}

#[test]
fn activations() {
    let mut rng = Rng(2);
    let x: Vec<f64> = rng.signed_vec(64).iter().map(|v| v * 4.0).collect();
    let src = "import nn
        fn a(x: f32[N]) -> (f32[N], f32[N], f32[N]) { (gelu(x), gelu_tanh(x), silu(x)) }";
    let out = run(src, "a", &[f32_tensor(&[64], &x)]);
    let erf = |v: f64| libm_erf(v);
    let gelu: Vec<f64> = x
        .iter()
        .map(|v| 0.5 * v * (1.0 + erf(v / 2f64.sqrt())))
        .collect();
    let k = (2.0 / std::f64::consts::PI).sqrt();
    let gelu_tanh: Vec<f64> = x
        .iter()
        .map(|v| 0.5 * v * (1.0 + (k * (v + 0.044715 * v * v * v)).tanh()))
        .collect();
    let silu: Vec<f64> = x.iter().map(|v| v / (1.0 + (-v).exp())).collect();
    assert_close("gelu", &out[0], &gelu, 1e-5);
    assert_close("gelu_tanh", &out[1], &gelu_tanh, 1e-5);
    assert_close("silu", &out[2], &silu, 1e-5);
}

/// erf by its Taylor series (|x| ≤ 4 here), independent of the interpreter's libm.
fn libm_erf(x: f64) -> f64 {
    let mut sum = 0.0;
    let mut term = x;
    for n in 0..200 {
        sum += term / (2 * n + 1) as f64;
        term *= -x * x / (n + 1) as f64;
    }
    2.0 / std::f64::consts::PI.sqrt() * sum
}

#[test]
fn softmax_logsumexp_and_linear() {
    let mut rng = Rng(3);
    let (r, c) = (3, 7);
    let x: Vec<f64> = rng.signed_vec(r * c).iter().map(|v| v * 10.0).collect();
    let src = "import nn
        fn s(x: f32[3, 7]) -> (f32[3, 7], f32[3]) { (softmax(x, axis: -1), logsumexp(x, axis: -1)) }
        fn l(x: f32[2, 3, 4], w: f32[5, 4], b: f32[5]) -> f32[2, 3, 5] { linear_bias(x, w, b) }";
    let out = run(src, "s", &[f32_tensor(&[r, c], &x)]);
    let mut sm = Vec::new();
    let mut lse = Vec::new();
    for i in 0..r {
        let row = &x[i * c..(i + 1) * c];
        let m = row.iter().cloned().fold(f64::MIN, f64::max);
        let z: f64 = row.iter().map(|v| (v - m).exp()).sum();
        sm.extend(row.iter().map(|v| (v - m).exp() / z));
        lse.push(m + z.ln());
    }
    assert_close("softmax", &out[0], &sm, 1e-5);
    assert_close("logsumexp", &out[1], &lse, 1e-5);

    let xs = rng.signed_vec(24);
    let w = rng.signed_vec(20);
    let b = rng.signed_vec(5);
    let out = run(
        src,
        "l",
        &[
            f32_tensor(&[2, 3, 4], &xs),
            f32_tensor(&[5, 4], &w),
            f32_tensor(&[5], &b),
        ],
    );
    let mut want = Vec::new();
    for row in xs.chunks(4) {
        for n in 0..5 {
            want.push((0..4).map(|k| row[k] * w[n * 4 + k]).sum::<f64>() + b[n]);
        }
    }
    assert_close("linear_bias", &out[0], &want, 1e-5);
}

#[test]
fn swiglu_and_embedding() {
    let mut rng = Rng(4);
    let (t, k, f) = (3, 4, 6);
    let x = rng.signed_vec(t * k);
    let gate = rng.signed_vec(f * k);
    let up = rng.signed_vec(f * k);
    let down = rng.signed_vec(k * f);
    let src = "import nn
        fn m(x: f32[3, 4], g: f32[6, 4], u: f32[6, 4], d: f32[4, 6]) -> f32[3, 4] { swiglu(x, g, u, d) }
        fn e(table: f32[5, 3], ids: i32[2, 2]) -> f32[2, 2, 3] { embedding(table, ids) }";
    let out = run(
        src,
        "m",
        &[
            f32_tensor(&[t, k], &x),
            f32_tensor(&[f, k], &gate),
            f32_tensor(&[f, k], &up),
            f32_tensor(&[k, f], &down),
        ],
    );
    let mut want = Vec::new();
    for row in x.chunks(k) {
        let hidden: Vec<f64> = (0..f)
            .map(|j| {
                let g: f64 = (0..k).map(|i| row[i] * gate[j * k + i]).sum();
                let u: f64 = (0..k).map(|i| row[i] * up[j * k + i]).sum();
                g / (1.0 + (-g).exp()) * u
            })
            .collect();
        want.extend((0..k).map(|o| (0..f).map(|j| hidden[j] * down[o * f + j]).sum::<f64>()));
    }
    assert_close("swiglu", &out[0], &want, 1e-5);

    let table: Vec<f64> = rng
        .signed_vec(15)
        .iter()
        .map(|x| f64::from(*x as f32))
        .collect();
    let ids = [4, 0, 2, 2];
    let out = run(
        src,
        "e",
        &[
            f32_tensor(&[5, 3], &table),
            Tensor::from_ints(DType::I32, &[2, 2], ids.to_vec()),
        ],
    );
    let want: Vec<f64> = ids
        .iter()
        .flat_map(|i| table[*i as usize * 3..*i as usize * 3 + 3].to_vec())
        .collect();
    assert_close("embedding", &out[0], &want, 0.0);
}

/// Rotary embedding reference: `pairs(i)` gives the two dims rotated by frequency i.
fn rope_reference(
    x: &[f64],
    s: usize,
    h: usize,
    d: usize,
    inv: &[f64],
    interleaved: bool,
) -> Vec<f64> {
    let mut out = x.to_vec();
    for p in 0..s {
        for head in 0..h {
            let base = (p * h + head) * d;
            for (i, freq) in inv.iter().enumerate().take(d / 2) {
                let (a, b) = if interleaved {
                    (2 * i, 2 * i + 1)
                } else {
                    (i, i + d / 2)
                };
                let angle = p as f64 * freq;
                let (xa, xb) = (x[base + a], x[base + b]);
                out[base + a] = xa * angle.cos() - xb * angle.sin();
                out[base + b] = xb * angle.cos() + xa * angle.sin();
            }
        }
    }
    out
}

fn inv_freq(d: usize, theta: f64) -> Vec<f64> {
    (0..d / 2)
        .map(|i| 1.0 / theta.powf(2.0 * i as f64 / d as f64))
        .collect()
}

#[test]
fn rope_styles_and_scalings() {
    let (s, h, d) = (6, 2, 8);
    let mut rng = Rng(5);
    let x = rng.signed_vec(s * h * d);
    let src = "import nn
        fn half(x: f32[6, 2, 8], pos: i64[6]) -> f32[6, 2, 8] { rope(x, pos, 10000.0) }
        fn inter(x: f32[6, 2, 8], pos: i64[6]) -> f32[6, 2, 8] { rope_interleaved(x, pos, 10000.0) }
        fn lin(x: f32[6, 2, 8], pos: i64[6]) -> f32[6, 2, 8] { rope(x, pos, 10000.0, scaling: \"linear\", factor: 4.0) }
        fn l3(x: f32[6, 2, 8], pos: i64[6]) -> f32[6, 2, 8] {
            rope(x, pos, 10000.0, scaling: \"llama3\", factor: 8.0, low_freq_factor: 1.0,
                 high_freq_factor: 4.0, original_max_position: 64)
        }";
    let pos = Tensor::from_ints(DType::I64, &[s], (0..s as i64).collect());
    let xt = f32_tensor(&[s, h, d], &x);
    let base = inv_freq(d, 10000.0);
    let out = run(src, "half", &[xt.clone(), pos.clone()]);
    assert_close(
        "rope half-split",
        &out[0],
        &rope_reference(&x, s, h, d, &base, false),
        1e-5,
    );
    let out = run(src, "inter", &[xt.clone(), pos.clone()]);
    assert_close(
        "rope interleaved",
        &out[0],
        &rope_reference(&x, s, h, d, &base, true),
        1e-5,
    );
    let lin: Vec<f64> = base.iter().map(|f| f / 4.0).collect();
    let out = run(src, "lin", &[xt.clone(), pos.clone()]);
    assert_close(
        "rope linear scaling",
        &out[0],
        &rope_reference(&x, s, h, d, &lin, false),
        1e-5,
    );
    // Llama 3 scaling: wavelengths above 64 are divided by 8, below 16 kept, blended between.
    let l3: Vec<f64> = base
        .iter()
        .map(|f| {
            let wavelen = 2.0 * std::f64::consts::PI / f;
            if wavelen < 16.0 {
                *f
            } else if wavelen > 64.0 {
                f / 8.0
            } else {
                let smooth = (64.0 / wavelen - 1.0) / (4.0 - 1.0);
                (1.0 - smooth) * f / 8.0 + smooth * f
            }
        })
        .collect();
    assert!(
        l3.iter().zip(&base).any(|(a, b)| a != b) && l3.iter().zip(&base).any(|(a, b)| a == b),
        "the test frequencies must cover both bands"
    );
    let out = run(src, "l3", &[xt, pos]);
    assert_close(
        "rope llama3 scaling",
        &out[0],
        &rope_reference(&x, s, h, d, &l3, false),
        1e-5,
    );
}

#[test]
fn attention_causal_gqa_and_padding() {
    let (b, s, h, kv, d) = (2, 5, 4, 2, 3);
    let mut rng = Rng(6);
    let q = rng.signed_vec(b * s * h * d);
    let k = rng.signed_vec(b * s * kv * d);
    let v = rng.signed_vec(b * s * kv * d);
    let src = "import nn
        fn causal(q: f32[2, 5, 4, 3], k: f32[2, 5, 2, 3], v: f32[2, 5, 2, 3]) -> f32[2, 5, 4, 3] { attention(q, k, v, causal: true) }
        fn padded(q: f32[2, 5, 4, 3], k: f32[2, 5, 2, 3], v: f32[2, 5, 2, 3], keep: i32[2, 5]) -> f32[2, 5, 4, 3] { attention_padded(q, k, v, keep) }";
    let keep = [1, 1, 1, 1, 1, 1, 1, 0, 0, 0];
    let reference = |allowed: &dyn Fn(usize, usize, usize) -> bool| {
        let mut out = vec![0.0; b * s * h * d];
        for bi in 0..b {
            for hi in 0..h {
                let g = hi / (h / kv);
                for i in 0..s {
                    let qv = &q[((bi * s + i) * h + hi) * d..][..d];
                    let scores: Vec<f64> = (0..s)
                        .map(|j| {
                            let kv_ = &k[((bi * s + j) * kv + g) * d..][..d];
                            if allowed(bi, i, j) {
                                (0..d).map(|c| qv[c] * kv_[c]).sum::<f64>() / (d as f64).sqrt()
                            } else {
                                f64::NEG_INFINITY
                            }
                        })
                        .collect();
                    let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = scores.iter().map(|x| (x - m).exp()).sum();
                    for c in 0..d {
                        out[((bi * s + i) * h + hi) * d + c] = (0..s)
                            .map(|j| (scores[j] - m).exp() / z * v[((bi * s + j) * kv + g) * d + c])
                            .sum();
                    }
                }
            }
        }
        out
    };
    let inputs = [
        f32_tensor(&[b, s, h, d], &q),
        f32_tensor(&[b, s, kv, d], &k),
        f32_tensor(&[b, s, kv, d], &v),
    ];
    let out = run(src, "causal", &inputs);
    assert_close(
        "causal GQA attention",
        &out[0],
        &reference(&|_, i, j| j <= i),
        1e-5,
    );
    let mut with_mask = inputs.to_vec();
    with_mask.push(Tensor::from_ints(DType::I32, &[b, s], keep.to_vec()));
    let out = run(src, "padded", &with_mask);
    assert_close(
        "padded attention",
        &out[0],
        &reference(&|bi, _, j| keep[bi * s + j] != 0),
        1e-5,
    );
}

// ---------------------------------------------------------------------------------------
// stdlib/consensus.kiln
// ---------------------------------------------------------------------------------------

const CONSENSUS: &str = "import consensus
    fn cos(x: f32[G, N, D]) -> f32[G, N, N] { cosine_similarity(x) }
    fn dist(x: f32[G, N, D]) -> f32[G, N, N] { pairwise_sq_dist(x) }";

#[test]
fn similarity_and_distances() {
    let (g, n, d) = (2, 4, 5);
    let mut rng = Rng(7);
    let x = rng.signed_vec(g * n * d);
    let out = run(CONSENSUS, "cos", &[f32_tensor(&[g, n, d], &x)]);
    let out2 = run(CONSENSUS, "dist", &[f32_tensor(&[g, n, d], &x)]);
    let mut cos = Vec::new();
    let mut dist = Vec::new();
    for gi in 0..g {
        let row = |i: usize| &x[(gi * n + i) * d..][..d];
        for i in 0..n {
            for j in 0..n {
                let dot: f64 = (0..d).map(|c| row(i)[c] * row(j)[c]).sum();
                let ni: f64 = (0..d).map(|c| row(i)[c] * row(i)[c]).sum::<f64>() + 1e-12;
                let nj: f64 = (0..d).map(|c| row(j)[c] * row(j)[c]).sum::<f64>() + 1e-12;
                cos.push(dot / (ni.sqrt() * nj.sqrt()));
                dist.push((0..d).map(|c| (row(i)[c] - row(j)[c]).powi(2)).sum());
            }
        }
    }
    assert_close("cosine_similarity", &out[0], &cos, 1e-5);
    assert_close("pairwise_sq_dist", &out2[0], &dist, 1e-5);
}

/// Row payoffs A and column payoffs B of classic 2-player games, as [M, N] row-major.
fn rps() -> (Vec<f64>, Vec<f64>) {
    let a = vec![0.0, -1.0, 1.0, 1.0, 0.0, -1.0, -1.0, 1.0, 0.0];
    let b = a.iter().map(|x| -x).collect();
    (a, b)
}

#[test]
fn nashconv_matches_an_f64_computation() {
    let source =
        std::fs::read_to_string(repo_root().join("stdlib/consensus.kiln")).expect("stdlib");
    let mut rng = Rng(8);
    let (g, m, n) = (3, 4, 5);
    let a = rng.signed_vec(g * m * n);
    let b = rng.signed_vec(g * m * n);
    let mut x = Vec::new();
    let mut y = Vec::new();
    for _ in 0..g {
        let xs: Vec<f64> = (0..m).map(|_| rng.signed().abs() + 0.1).collect();
        let ys: Vec<f64> = (0..n).map(|_| rng.signed().abs() + 0.1).collect();
        let (sx, sy): (f64, f64) = (xs.iter().sum(), ys.iter().sum());
        x.extend(xs.iter().map(|v| v / sx));
        y.extend(ys.iter().map(|v| v / sy));
    }
    let out = run(
        &source,
        "nashconv",
        &[
            f32_tensor(&[g, m, n], &a),
            f32_tensor(&[g, m, n], &b),
            f32_tensor(&[g, m], &x),
            f32_tensor(&[g, n], &y),
        ],
    );
    let want: Vec<f64> = (0..g)
        .map(|gi| {
            kiln_tests::nashconv_f64(
                &a[gi * m * n..][..m * n],
                &b[gi * m * n..][..m * n],
                &x[gi * m..][..m],
                &y[gi * n..][..n],
            )
        })
        .collect();
    assert_close("nashconv", &out[0], &want, 1e-5);
}

#[test]
fn regret_matching_plus_solves_rock_paper_scissors_and_a_dominance_game() {
    let source =
        std::fs::read_to_string(repo_root().join("stdlib/consensus.kiln")).expect("stdlib");
    // Game 0: rock-paper-scissors (uniform equilibrium, value 0). Game 1: prisoner's dilemma
    // (defect/defect is the unique equilibrium, a pure one).
    let (rps_a, rps_b) = rps();
    let pd_a = vec![3.0, 0.0, 0.0, 5.0, 1.0, 0.0, 0.0, 0.0, 0.0];
    let pd_b = vec![3.0, 5.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0];
    // Pad the 2x2 dilemma to 3x3 with a strictly dominated third action (payoff -10).
    let pad = |p: &[f64]| -> Vec<f64> {
        let mut out = vec![-10.0; 9];
        out[0] = p[0];
        out[1] = p[1];
        out[3] = p[3];
        out[4] = p[4];
        out
    };
    let a: Vec<f64> = rps_a.iter().cloned().chain(pad(&pd_a)).collect();
    let b: Vec<f64> = rps_b.iter().cloned().chain(pad(&pd_b)).collect();
    let iters = Tensor::from_ints(DType::I64, &[], vec![2000]);
    let out = run(
        &source,
        "regret_matching_plus",
        &[
            f32_tensor(&[2, 3, 3], &a),
            f32_tensor(&[2, 3, 3], &b),
            iters,
        ],
    );
    let (x, y) = (out[0].to_f64_vec(), out[1].to_f64_vec());
    for gi in 0..2 {
        let nc = kiln_tests::nashconv_f64(
            &a[gi * 9..][..9],
            &b[gi * 9..][..9],
            &x[gi * 3..][..3],
            &y[gi * 3..][..3],
        );
        assert!(
            nc < 1e-2,
            "game {gi}: NashConv {nc} after 2000 iterations, strategies {x:?} {y:?}"
        );
    }
    // The dilemma's equilibrium is pure: defect (action 1) for both.
    assert!(
        x[4] > 0.99 && y[4] > 0.99,
        "prisoner's dilemma: {x:?} {y:?}"
    );
}

#[test]
fn consensus_support_picks_the_central_proposal() {
    let source =
        std::fs::read_to_string(repo_root().join("stdlib/consensus.kiln")).expect("stdlib");
    // Four agents; proposals 0, 1, 2 are close to each other, 3 is far: the medoid among the
    // first three wins. Proposals 1 and 2 are mirror images around 0, so 0 is central.
    let e = vec![1.0, 0.0, 0.0, 0.9, 0.1, 0.0, 0.9, -0.1, 0.0, -1.0, 0.0, 1.0];
    let w = vec![1.0, 1.0, 1.0, 1.0];
    let out = run(
        &source,
        "consensus_support",
        &[f32_tensor(&[1, 4, 3], &e), f32_tensor(&[1, 4], &w)],
    );
    assert_eq!(out[0].to_i64_vec(), vec![0]);
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    let support: Vec<f64> = (0..4)
        .map(|i| {
            let (p, q) = (&e[i * 3..][..3], &e[..3]);
            (0..3).map(|c| p[c] * q[c]).sum::<f64>() / (norm(p) * norm(q))
        })
        .collect();
    assert_close("support", &out[1], &support, 1e-5);
}

// ---------------------------------------------------------------------------------------
// Model programs against transformers
// ---------------------------------------------------------------------------------------

/// Runs a model program's entry on a fixture's checkpoint.
fn run_model(program: &str, fixture: &str, entry: &str, inputs: &[Tensor]) -> Vec<Tensor> {
    let dir = repo_root().join("tests/fixtures").join(fixture);
    let config = read_json(&dir.join("config.json"));
    let path = repo_root().join(program);
    let source = std::fs::read_to_string(&path).expect("model source");
    let lowered = compile_source(program, &source, path.parent(), Some(&config))
        .unwrap_or_else(|d| panic!("{d}"));
    let weights: BTreeMap<String, Tensor> = load_safetensors(&dir.join("model.safetensors"));
    for binding in &lowered.params {
        assert!(
            weights.contains_key(&binding.checkpoint_name),
            "{fixture}: the checkpoint lacks {}",
            binding.checkpoint_name
        );
    }
    let func = lowered.module.function(entry).expect("entry");
    interpret(func, inputs, &weights).unwrap_or_else(|e| panic!("{fixture}: {e}"))
}

fn expected(fixture: &str) -> BTreeMap<String, Tensor> {
    load_safetensors(
        &repo_root()
            .join("tests/fixtures")
            .join(fixture)
            .join("expected.safetensors"),
    )
}

fn decoder_matches_transformers(program: &str, fixture: &str) {
    let exp = expected(fixture);
    let ids = exp["input_ids"].cast(DType::I32);
    let out = run_model(program, fixture, "forward", &[ids]);
    assert_eq!(out[0].shape, exp["logits"].shape);
    assert_close(
        &format!("{fixture} logits"),
        &out[0],
        &exp["logits"].to_f64_vec(),
        1e-4,
    );
}

#[test]
fn llama_matches_transformers() {
    decoder_matches_transformers("models/llama.kiln", "tiny-llama");
}

#[test]
fn qwen2_matches_transformers() {
    decoder_matches_transformers("models/llama.kiln", "tiny-qwen2");
}

#[test]
fn gpt2_matches_transformers() {
    decoder_matches_transformers("models/gpt2.kiln", "tiny-gpt2");
}

#[test]
fn bert_matches_transformers() {
    let exp = expected("tiny-bert");
    let ids = exp["input_ids"].cast(DType::I32);
    let mask = exp["attention_mask"].cast(DType::I32);
    let out = run_model(
        "models/bert.kiln",
        "tiny-bert",
        "forward",
        &[ids.clone(), mask.clone()],
    );
    // Padded positions' hidden states are not meaningful outputs; compare real tokens only.
    let hidden = exp["last_hidden_state"].to_f64_vec();
    let got = out[0].to_f64_vec();
    let keep = mask.to_i64_vec();
    let d = 64;
    let (g, w): (Vec<f64>, Vec<f64>) = (0..keep.len())
        .filter(|i| keep[*i] != 0)
        .flat_map(|i| (0..d).map(move |c| i * d + c))
        .map(|i| (got[i], hidden[i]))
        .unzip();
    assert_close(
        "bert last_hidden_state",
        &Tensor::from_f32(&[g.len()], g.iter().map(|x| *x as f32).collect()),
        &w,
        1e-4,
    );
    let out = run_model("models/bert.kiln", "tiny-bert", "embed", &[ids, mask]);
    let pooled = exp["mean_pooled"].to_f64_vec();
    let mut want = Vec::new();
    for row in pooled.chunks(d) {
        let n = row.iter().map(|x| x * x).sum::<f64>().sqrt();
        want.extend(row.iter().map(|x| x / n));
    }
    assert_close("bert sentence embedding", &out[0], &want, 1e-4);
}

// ---------------------------------------------------------------------------------------
// The KV-cached step entry against transformers
// ---------------------------------------------------------------------------------------

/// Runs llama.kiln's `step` entry over a paged cache on `executor`, feeding a fixture's two
/// sequences in uneven chunks (prefill 3 and 5 tokens, then chunks of 2 and 1, then one
/// token a step) through small scattered blocks, and checks every step's last-token logits
/// against transformers' logits at those positions.
fn step_matches_transformers(fixture: &str, executor: &mut dyn kiln_runtime::Executor) {
    use kiln_runtime::{PagedModel, StepSequence};
    let exp = expected(fixture);
    let ids: Vec<u32> = exp["input_ids"]
        .to_i64_vec()
        .iter()
        .map(|&t| t as u32)
        .collect();
    let [batch, len] = exp["input_ids"].shape[..] else {
        panic!("input_ids of rank 2")
    };
    let want = exp["logits"].to_f64_vec();
    let vocab = exp["logits"].shape[2];
    let block_size = 4;
    // Non-contiguous, interleaved blocks (3 per sequence hold 11 tokens).
    let blocks: [Vec<u32>; 2] = [vec![5, 2, 7], vec![0, 6, 3]];
    let mut model =
        PagedModel::new(executor.module(), "step", 8, block_size, 12).expect("step entry");
    // Tokens each sequence holds after each step: uneven prefill chunks, then decoding;
    // the second sequence finishes first, so the last steps run the first one alone.
    let schedules: [Vec<usize>; 2] = [
        [3, 5, 6].into_iter().chain(7..=len).collect(),
        [5, 6].into_iter().chain(7..=len).collect(),
    ];
    assert_eq!(batch, 2, "{fixture}: two sequences");
    let steps = schedules.iter().map(Vec::len).max().unwrap_or(0);
    let mut done = [0usize; 2];
    for step in 0..steps {
        let active: Vec<usize> = (0..batch).filter(|&b| step < schedules[b].len()).collect();
        let seqs: Vec<StepSequence<'_>> = active
            .iter()
            .map(|&b| StepSequence {
                tokens: &ids[b * len..b * len + schedules[b][step]],
                cached: done[b],
                blocks: &blocks[b],
            })
            .collect();
        let rows = model
            .step(&mut *executor, &seqs)
            .unwrap_or_else(|e| panic!("{fixture}: {e}"));
        for (row, &b) in rows.iter().zip(&active) {
            let upto = schedules[b][step];
            let at = (b * len + upto - 1) * vocab;
            let got: Vec<f64> = row.iter().map(|&x| f64::from(x)).collect();
            let err = rel_err(&got, &want[at..at + vocab]);
            assert!(
                err <= 1e-4,
                "{fixture} on {}: sequence {b} at position {}: relative error {err:e}",
                executor.describe(),
                upto - 1
            );
            done[b] = upto;
        }
    }
}

/// The lowered llama program and its weights for a fixture.
fn llama_program(fixture: &str) -> (kiln_ir::Module, std::sync::Arc<kiln_runtime::Weights>) {
    let dir = repo_root().join("tests/fixtures").join(fixture);
    let mut config = read_json(&dir.join("config.json"));
    // Blocks of 4 tokens, so the fixtures' sequences span several.
    config["kv_block_size"] = serde_json::json!(4);
    let path = repo_root().join("models/llama.kiln");
    let source = std::fs::read_to_string(&path).expect("model source");
    let lowered = compile_source("llama.kiln", &source, path.parent(), Some(&config))
        .unwrap_or_else(|d| panic!("{d}"));
    let weights = kiln_runtime::Weights::load(&dir, &lowered.params).expect("weights");
    (lowered.module, std::sync::Arc::new(weights))
}

#[test]
fn llama_step_with_paged_cache_matches_transformers_on_the_interpreter() {
    for fixture in ["tiny-llama", "tiny-qwen2"] {
        let (module, weights) = llama_program(fixture);
        let mut executor = kiln_runtime::Interpreter::new(module, weights);
        step_matches_transformers(fixture, &mut executor);
    }
}

#[test]
fn llama_step_with_paged_cache_matches_transformers_on_the_cpu_backend() {
    for fixture in ["tiny-llama", "tiny-qwen2"] {
        let (module, weights) = llama_program(fixture);
        let mut executor =
            kiln_runtime::CpuPlans::compile(module, weights, &mut kiln_runtime::NoProgress)
                .expect("compile");
        step_matches_transformers(fixture, &mut executor);
    }
}
