//! KV-cached generation through `PagedLogits`: models/default's compiled `step` (on the CPU
//! plans) gives the logits its `forward` gives on the interpreter while sequences come, grow
//! and go; the blocks of a finished sequence serve the next one; a full cache is an error that
//! leaves the model usable.

use kiln_runtime::{CpuPlans, Interpreter, LogitsModel, NoProgress, PagedLogits, ProgramLogits};
use kiln_runtime::{RuntimeError, Weights};
use std::cell::Cell;
use std::path::PathBuf;
use std::sync::Arc;

fn default_model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/default")
}

/// models/default's program lowered with both entries, and its weights.
fn program() -> (kiln_ir::Module, Arc<Weights>) {
    let dir = default_model();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let program = kiln_runtime::models::program_for("llama").expect("llama");
    let (parsed, diagnostics) =
        kiln_lower::Program::load_source(program.path, program.source, None);
    assert!(diagnostics.iter().all(|d| !d.is_error()));
    let options = kiln_lower::Options {
        param_dtype: kiln_ir::DType::F32,
        entries: Some(vec!["forward".into(), "step".into()]),
    };
    let (lowered, diagnostics) = kiln_lower::lower(&parsed, Some(&config), &options);
    assert!(diagnostics.iter().all(|d| !d.is_error()));
    let lowered = lowered.expect("lowers");
    let weights = Weights::load(&dir, &lowered.params).expect("weights");
    (lowered.module, Arc::new(weights))
}

fn assert_rows_close(got: &[Vec<f32>], want: &[Vec<f32>], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (g, w) in got.iter().zip(want) {
        let scale = w.iter().fold(0f32, |m, x| m.max(x.abs()));
        let err = g.iter().zip(w).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            err <= 1e-4 * scale,
            "{what}: max error {err} (scale {scale})"
        );
    }
}

#[test]
fn paged_logits_equal_forward_as_sequences_come_and_go() {
    let (module, weights) = program();
    let mut reference = Interpreter::new(module.clone(), weights.clone());
    let mut reference = ProgramLogits::new(&mut reference, "forward").expect("forward");
    let mut plans = CpuPlans::compile(module, weights, &mut NoProgress).expect("compiles");
    // 6 blocks of 16: two sequences of up to 48 tokens.
    let mut paged = PagedLogits::new(&mut plans, 6, 16, 48).expect("step entry");
    let a: Vec<i64> = (0..24).map(|i| (i * 37 + 11) % 500).collect();
    let b: Vec<i64> = (0..35).map(|i| (i * 53 + 7) % 500).collect();
    let c: Vec<i64> = (0..40).map(|i| (i * 29 + 3) % 500).collect();
    let mut check = |seqs: &[Vec<i64>], what: &str| {
        let got = paged.last_logits(seqs).expect("paged step");
        let want = reference.last_logits(seqs).expect("forward");
        assert_rows_close(&got, &want, what);
    };
    check(&[a[..20].to_vec(), b[..30].to_vec()], "two prefills");
    check(
        &[a[..21].to_vec(), b[..31].to_vec()],
        "one decode step each",
    );
    // b grows by several tokens at once (a chunk), a is gone: its blocks are free again.
    check(&[b[..35].to_vec()], "a chunk of b alone");
    // c needs 3 blocks: only possible with a's blocks back.
    check(
        &[b[..35].to_vec(), c.clone()],
        "b and a new sequence in a's blocks",
    );
}

#[test]
fn a_full_cache_is_an_error_that_leaves_the_model_usable() {
    let (module, weights) = program();
    let mut plans = CpuPlans::compile(module, weights, &mut NoProgress).expect("compiles");
    let mut paged = PagedLogits::new(&mut plans, 2, 16, 32).expect("step entry");
    let long: Vec<i64> = (0..30).collect();
    let other: Vec<i64> = (100..120).collect();
    let err = paged
        .last_logits(&[long.clone(), other.clone()])
        .expect_err("4 blocks do not fit in 2");
    assert!(
        matches!(&err, RuntimeError::Input(m) if m.contains("all in use")),
        "{err}"
    );
    // Nothing leaked: the long sequence alone still fits.
    paged
        .last_logits(&[long])
        .expect("fits after the failed step");
    assert!(paged.describe().contains("Cranelift"));
}

#[test]
fn the_steps_greedy_tokens_are_the_argmax_of_its_logits() {
    use kiln_runtime::{Executor, PagedModel, StepSequence, STEP_ENTRY};
    let (module, weights) = program();
    let mut plans = CpuPlans::compile(module, weights, &mut NoProgress).expect("compiles");
    let table: Vec<u32> = (0..3).collect();
    let other: Vec<u32> = (3..6).collect();
    let a: Vec<u32> = (0..40).map(|i| (i * 37 + 11) % 500).collect();
    let b: Vec<u32> = (0..25).map(|i| (i * 53 + 7) % 500).collect();
    // Two models over the same blocks, one reading logits and one greedy tokens: each step
    // writes the same cache values, so both see the same cache.
    let module = plans.module().clone();
    let mut by_logits = PagedModel::new(&module, STEP_ENTRY, 6, 16, 48).expect("step entry");
    let mut greedy = PagedModel::new(&module, STEP_ENTRY, 6, 16, 48).expect("step entry");
    // (tokens, cached) of a and of b: prefills, one decode step each, chunks of 9 and 4.
    for ((a_len, a_cached), (b_len, b_cached)) in [
        ((30, 0), (20, 0)),
        ((31, 30), (21, 20)),
        ((40, 31), (25, 21)),
    ] {
        let batch = [
            StepSequence {
                tokens: &a[..a_len],
                cached: a_cached,
                blocks: &table,
            },
            StepSequence {
                tokens: &b[..b_len],
                cached: b_cached,
                blocks: &other,
            },
        ];
        let logits = by_logits.step(&mut plans, &batch).expect("step");
        let tokens = greedy.step_greedy(&mut plans, &batch).expect("greedy step");
        let want: Vec<u32> = logits
            .iter()
            .map(|row| kiln_runtime::sampling::argmax(row).expect("a finite logit"))
            .collect();
        assert_eq!(tokens, want, "step of {a_len} and {b_len} tokens");
    }
}

/// A [`PagedLogits`] that counts the calls of each kind and offers the greedy tokens only
/// when `offer_greedy`.
struct Counting<'m, 'e> {
    inner: &'m mut PagedLogits<'e>,
    offer_greedy: bool,
    logits: &'m Cell<usize>,
    greedy: &'m Cell<usize>,
}

impl LogitsModel for Counting<'_, '_> {
    fn last_logits(&mut self, sequences: &[Vec<i64>]) -> Result<Vec<Vec<f32>>, RuntimeError> {
        self.logits.set(self.logits.get() + 1);
        self.inner.last_logits(sequences)
    }

    fn last_greedy(&mut self, sequences: &[Vec<i64>]) -> Option<Result<Vec<u32>, RuntimeError>> {
        if !self.offer_greedy {
            return None;
        }
        self.greedy.set(self.greedy.get() + 1);
        self.inner.last_greedy(sequences)
    }
}

#[test]
fn greedy_generation_takes_the_steps_tokens_and_equals_the_logits_path() {
    use kiln_runtime::{Generator, SamplingParams, Tokenizer};
    let (module, weights) = program();
    let mut plans = CpuPlans::compile(module, weights, &mut NoProgress).expect("compiles");
    let tokenizer = Tokenizer::from_dir(&default_model()).expect("tokenizer");
    let prompt: Vec<u32> = (0..9).map(|i| (i * 41 + 5) % 500).collect();
    let greedy = SamplingParams {
        max_tokens: Some(12),
        ignore_eos: true,
        ..SamplingParams::greedy()
    };
    let mut generate = |offer_greedy: bool, params: &SamplingParams| {
        let mut paged = PagedLogits::new(&mut plans, 4, 16, 48).expect("step entry");
        let (logits, greedy) = (Cell::new(0), Cell::new(0));
        let counting = Counting {
            inner: &mut paged,
            offer_greedy,
            logits: &logits,
            greedy: &greedy,
        };
        let mut generator = Generator::new(counting, tokenizer.clone());
        let completion = generator
            .complete(&prompt, params.clone(), |_| {})
            .expect("generates");
        (completion.token_ids, logits.get(), greedy.get())
    };
    // Every step of a greedy request takes the step's own argmax, no logits.
    let (tokens, logits, steps) = generate(true, &greedy);
    assert_eq!((tokens.len(), logits, steps), (12, 0, 12));
    let (want, logits, steps) = generate(false, &greedy);
    assert_eq!((logits, steps), (12, 0));
    assert_eq!(
        tokens, want,
        "the step's argmax is the host's argmax of its logits"
    );
    // A sampled request needs the logits even where the model offers the tokens.
    let sampled = SamplingParams {
        temperature: 0.8,
        seed: Some(3),
        ..greedy.clone()
    };
    let (_, logits, steps) = generate(true, &sampled);
    assert_eq!((logits, steps), (12, 0));
}
