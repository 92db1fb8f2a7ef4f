//! Host-side text generation as a specification: the tokenizer of models/default round-trips
//! text and streams it without splitting characters, its chat template renders string and
//! multi-part content, the sampler keeps exactly the expected candidates and applies the
//! penalties as documented, seeds reproduce, and the generator honours eos, stop tokens,
//! stop strings split over tokens, and max_tokens.

use kiln_runtime::chat::{ChatMessage, MessageContent};
use kiln_runtime::generate::{GenerationEvent, Generator};
use kiln_runtime::sampling::{
    self, FinishReason, Sampler, SamplingParams, StopStringMatcher, StopStringOutcome,
};
use kiln_runtime::{GenerationConfig, RuntimeError, Tokenizer};
use std::path::PathBuf;

fn default_model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/default")
}

fn tokenizer() -> Tokenizer {
    Tokenizer::from_dir(&default_model()).expect("models/default has a tokenizer")
}

const MULTIBYTE_TEXT: &str =
    "naïve café — 日本語のテキスト, emoji 🙂🚀 and ünïcödé: «déjà vu» ∑ x² ≠ ∞.";

// ---------------------------------------------------------------- tokenizer

#[test]
fn encode_then_decode_returns_the_text() {
    let tok = tokenizer();
    for text in [
        "The for statement is executed, the first line of the\nvariable.",
        "def f(x):\n    return x ** 2  # squares\n",
        MULTIBYTE_TEXT,
    ] {
        let ids = tok.encode(text, true).unwrap();
        assert!(!ids.is_empty());
        assert_eq!(tok.decode(&ids, true).unwrap(), text);
    }
}

#[test]
fn special_tokens_come_from_tokenizer_config() {
    let tok = tokenizer();
    assert_eq!(tok.bos_token_id(), Some(0));
    assert_eq!(tok.eos_token_id(), Some(0));
    assert_eq!(tok.token_to_id("<|user|>"), Some(1));
    assert_eq!(tok.token_to_id("<|assistant|>"), Some(2));
    assert!(tok.is_special(0) && tok.is_special(1) && !tok.is_special(100));
    assert_eq!(tok.config().model_max_length, Some(256));
    let text = "<|user|>hello<|endoftext|>";
    let ids = tok.encode(text, false).unwrap();
    assert_eq!(ids.first(), Some(&1), "special tokens encode as one id");
    assert_eq!(ids.last(), Some(&0));
    assert_eq!(tok.decode(&ids, false).unwrap(), text);
    assert_eq!(tok.decode(&ids, true).unwrap(), "hello");
    // The post-processor adds nothing and tokenizer_config.json does not ask for BOS.
    assert_eq!(
        tok.encode("hello", true).unwrap(),
        tok.encode("hello", false).unwrap()
    );
}

/// Streams `ids` through an incremental decoder, checking each delta, and returns them.
fn stream(tok: &Tokenizer, prompt: &[u32], ids: &[u32]) -> Vec<String> {
    let mut decoder = tok.incremental_decoder(prompt, true);
    let mut deltas: Vec<String> = ids.iter().map(|&id| decoder.push(id).unwrap()).collect();
    deltas.push(decoder.finish().unwrap());
    for delta in &deltas {
        assert!(
            !delta.contains(char::REPLACEMENT_CHARACTER),
            "a delta holds a split character: {delta:?}"
        );
    }
    deltas
}

#[test]
fn incremental_detokenization_never_splits_a_character() {
    let tok = tokenizer();
    let ids = tok.encode(MULTIBYTE_TEXT, false).unwrap();
    // The test means something only if some characters span several tokens.
    assert!(
        ids.iter().any(|&id| tok
            .decode(&[id], true)
            .unwrap()
            .contains(char::REPLACEMENT_CHARACTER)),
        "no token of the text is a partial character"
    );
    let deltas = stream(&tok, &[], &ids);
    assert!(
        deltas.iter().any(String::is_empty),
        "partial characters are held back"
    );
    assert_eq!(deltas.concat(), tok.decode(&ids, true).unwrap());
    assert_eq!(deltas.concat(), MULTIBYTE_TEXT);

    // With a prompt for context, the deltas are exactly the text after the prompt.
    let prompt = tok.encode("Über: ", false).unwrap();
    let deltas = stream(&tok, &prompt, &ids);
    assert_eq!(deltas.concat(), MULTIBYTE_TEXT);
}

#[test]
fn incremental_detokenization_flushes_an_incomplete_tail() {
    let tok = tokenizer();
    let ids = tok.encode("x 🚀", false).unwrap();
    let cut = &ids[..ids.len() - 1];
    let mut decoder = tok.incremental_decoder(&[], true);
    let mut text: String = cut.iter().map(|&id| decoder.push(id).unwrap()).collect();
    assert!(!text.contains(char::REPLACEMENT_CHARACTER));
    text.push_str(&decoder.finish().unwrap());
    assert_eq!(
        text,
        tok.decode(cut, true).unwrap(),
        "finish releases the rest"
    );
}

// ---------------------------------------------------------------- chat template

#[test]
fn chat_template_renders_string_content() {
    let tok = tokenizer();
    let messages = [
        ChatMessage::new("system", "You are terse."),
        ChatMessage::new("user", "Hi"),
        ChatMessage::new("assistant", "Hello"),
        ChatMessage::new("user", "Part one\nPart two"),
    ];
    // Rendered by Python's jinja2 with transformers' settings.
    let expected = "You are terse.\n<|user|>Hi\n<|assistant|>Hello<|endoftext|>\n<|user|>Part one\nPart two\n<|assistant|>";
    assert_eq!(tok.apply_chat_template(&messages, true).unwrap(), expected);
    let without_prompt = tok.apply_chat_template(&messages, false).unwrap();
    assert_eq!(
        without_prompt,
        expected.strip_suffix("<|assistant|>").unwrap()
    );
    let ids = tok.encode_chat(&messages, true).unwrap();
    assert_eq!(ids.last(), Some(&2), "ends with <|assistant|>");
}

#[test]
fn chat_template_joins_text_parts() {
    let tok = tokenizer();
    let messages: Vec<ChatMessage> = serde_json::from_value(serde_json::json!([
        {"role": "user", "content": [
            {"type": "text", "text": "Part one"},
            {"type": "text", "text": "Part two"}
        ]}
    ]))
    .unwrap();
    assert!(matches!(
        messages[0].content,
        Some(MessageContent::Parts(ref parts)) if parts.len() == 2
    ));
    assert_eq!(
        tok.apply_chat_template(&messages, true).unwrap(),
        "<|user|>Part one\nPart two\n<|assistant|>"
    );
    let image: Vec<ChatMessage> = serde_json::from_value(serde_json::json!([
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
    ]))
    .unwrap();
    let err = tok.apply_chat_template(&image, true).unwrap_err();
    assert!(err.to_string().contains("image_url"), "{err}");
}

#[test]
fn chat_template_can_come_from_tokenizer_config() {
    let dir = std::env::temp_dir().join(format!("kiln-chat-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        default_model().join("tokenizer.json"),
        dir.join("tokenizer.json"),
    )
    .unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::json!({
            "bos_token": {"content": "<|endoftext|>", "special": true},
            "eos_token": "<|endoftext|>",
            "add_bos_token": true,
            "chat_template": [
                {"name": "tool_use", "template": "tools"},
                {"name": "default", "template": "{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}{% endfor %}"}
            ]
        })
        .to_string(),
    )
    .unwrap();
    let tok = Tokenizer::from_dir(&dir).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(tok.chat_template_names(), ["default", "tool_use"]);
    let text = tok
        .apply_chat_template(&[ChatMessage::new("user", "hi")], true)
        .unwrap();
    assert_eq!(text, "<|endoftext|>[user] hi");
    assert_eq!(
        tok.encode("hi", true).unwrap()[0],
        0,
        "add_bos_token adds BOS"
    );
    assert_eq!(
        tok.encode_chat(&[ChatMessage::new("user", "hi")], true)
            .unwrap()[..2],
        [0, tok.encode("[", false).unwrap()[0]],
        "the template's BOS is not doubled"
    );
}

#[test]
fn generation_config_of_the_default_model() {
    let config = GenerationConfig::from_dir(&default_model()).unwrap();
    assert_eq!(config.eos_token_ids, vec![0]);
    assert!(config.sampling_defaults().is_greedy());
}

// ---------------------------------------------------------------- sampling

/// Logits whose softmax is `probabilities`.
fn logits_of(probabilities: &[f64]) -> Vec<f32> {
    probabilities.iter().map(|p| p.ln() as f32).collect()
}

fn kept(logits: &[f32], top_k: usize, top_p: f32, min_p: f32) -> Vec<u32> {
    let candidates = sampling::truncated_candidates(logits, top_k, top_p, min_p);
    let total: f64 = candidates.iter().map(|c| c.probability).sum();
    assert!((total - 1.0).abs() < 1e-9, "renormalised: {total}");
    candidates.iter().map(|c| c.token).collect()
}

#[test]
fn greedy_is_argmax_with_the_lowest_index_on_ties() {
    let logits = [1.0, 3.0, f32::NAN, 3.0, 2.0];
    assert_eq!(sampling::argmax(&logits), Some(1));
    let mut sampler = Sampler::new(SamplingParams::greedy(), &[]).unwrap();
    assert_eq!(sampler.sample(&logits).unwrap().token, 1);
    let row: Vec<f32> = (0..100).map(|i| ((i * 37) % 101) as f32 * 0.1).collect();
    let best = (0..100).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap() as u32;
    assert_eq!(sampler.sample(&row).unwrap().token, best);
}

#[test]
fn top_k_keeps_the_k_highest() {
    let logits = [1.0, 4.0, 3.0, 2.0, 4.0];
    assert_eq!(kept(&logits, 2, 1.0, 0.0), [1, 4]);
    assert_eq!(kept(&logits, 1, 1.0, 0.0), [1], "lower id first on ties");
    assert_eq!(kept(&logits, 3, 1.0, 0.0), [1, 4, 2]);
    assert_eq!(kept(&logits, 0, 1.0, 0.0), [1, 4, 2, 3, 0], "0 keeps all");
    assert_eq!(kept(&logits, 9, 1.0, 0.0).len(), 5);
}

#[test]
fn top_p_keeps_the_smallest_set_reaching_p() {
    let logits = logits_of(&[0.1, 0.5, 0.15, 0.25]);
    assert_eq!(kept(&logits, 0, 0.45, 0.0), [1]);
    assert_eq!(kept(&logits, 0, 0.7, 0.0), [1, 3]);
    assert_eq!(kept(&logits, 0, 0.8, 0.0), [1, 3, 2]);
    assert_eq!(kept(&logits, 0, 0.95, 0.0), [1, 3, 2, 0]);
    // After top-k=3 the mass is renormalised: 0.5/0.9, 0.25/0.9, 0.15/0.9.
    assert_eq!(kept(&logits, 3, 0.6, 0.0), [1, 3]);
    assert_eq!(kept(&logits, 3, 0.85, 0.0), [1, 3, 2]);
}

#[test]
fn min_p_drops_tokens_below_a_fraction_of_the_best() {
    let logits = logits_of(&[0.1, 0.5, 0.15, 0.25]);
    assert_eq!(kept(&logits, 0, 1.0, 0.25), [1, 3, 2]); // threshold 0.125
    assert_eq!(kept(&logits, 0, 1.0, 0.4), [1, 3]); // threshold 0.2
    assert_eq!(kept(&logits, 0, 1.0, 1.0), [1]);
    assert_eq!(kept(&logits, 0, 1.0, 0.1), [1, 3, 2, 0]);
}

#[test]
fn sampling_only_draws_kept_candidates() {
    let logits = logits_of(&[0.1, 0.5, 0.15, 0.25]);
    let params = SamplingParams {
        top_k: 2,
        seed: Some(1),
        ..SamplingParams::default()
    };
    let mut sampler = Sampler::new(params, &[]).unwrap();
    let drawn: std::collections::BTreeSet<u32> = (0..200)
        .map(|_| sampler.sample(&logits).unwrap().token)
        .collect();
    assert_eq!(drawn.into_iter().collect::<Vec<_>>(), [1, 3]);
}

#[test]
fn repetition_penalty_divides_positive_and_multiplies_negative_logits() {
    let params = SamplingParams {
        repetition_penalty: 2.0,
        ..SamplingParams::greedy()
    };
    // Token 0 appears twice in the prompt: it is penalised once.
    let mut sampler = Sampler::new(params, &[0, 1, 0]).unwrap();
    let logits = [2.0, -2.0, 1.0, 0.5];
    assert_eq!(sampler.processed_logits(&logits), [1.0, -4.0, 1.0, 0.5]);
    sampler.record_output_token(3);
    assert_eq!(sampler.processed_logits(&logits), [1.0, -4.0, 1.0, 0.25]);
}

#[test]
fn presence_and_frequency_penalties_count_output_tokens_only() {
    let params = SamplingParams {
        presence_penalty: 0.25,
        frequency_penalty: 0.5,
        ..SamplingParams::greedy()
    };
    let mut sampler = Sampler::new(params, &[0]).unwrap();
    for token in [2, 2, 3] {
        sampler.record_output_token(token);
    }
    let logits = [2.0, 1.0, 1.0, 0.5];
    // 2: 1 - (0.5 * 2 + 0.25); 3: 0.5 - (0.5 * 1 + 0.25); the prompt's 0 is untouched.
    assert_eq!(sampler.processed_logits(&logits), [2.0, 1.0, -0.25, -0.25]);
}

#[test]
fn temperature_divides_the_logits() {
    let params = SamplingParams {
        temperature: 0.5,
        ..SamplingParams::default()
    };
    let sampler = Sampler::new(params, &[]).unwrap();
    assert_eq!(sampler.processed_logits(&[1.0, -3.0]), [2.0, -6.0]);
}

fn sample_sequence(seed: u64) -> Vec<u32> {
    let params = SamplingParams {
        temperature: 0.8,
        top_p: 0.95,
        seed: Some(seed),
        ..SamplingParams::default()
    };
    let mut sampler = Sampler::new(params, &[]).unwrap();
    (0..32)
        .map(|step| {
            let row: Vec<f32> = (0..64)
                .map(|i| (((i * 7 + step * 3) % 13) as f32) * 0.3)
                .collect();
            sampler.sample(&row).unwrap().token
        })
        .collect()
}

#[test]
fn the_same_seed_gives_the_same_tokens() {
    assert_eq!(sample_sequence(7), sample_sequence(7));
    assert_ne!(sample_sequence(7), sample_sequence(8));
}

#[test]
fn logprobs_are_a_full_distribution_before_truncation() {
    let logits: Vec<f32> = (0..50)
        .map(|i| ((i * 17) % 23) as f32 * 0.25 - 2.0)
        .collect();
    let params = SamplingParams {
        temperature: 0.7,
        top_k: 1,
        logprobs: Some(5),
        seed: Some(3),
        ..SamplingParams::default()
    };
    let mut sampler = Sampler::new(params, &[]).unwrap();
    let processed = sampler.processed_logits(&logits);
    let full = sampling::log_softmax(&processed);
    let total: f64 = full.iter().map(|l| l.exp()).sum();
    assert!((total - 1.0).abs() < 1e-9, "exp(logprobs) sums to {total}");
    let sampled = sampler.sample(&logits).unwrap();
    let logprobs = sampled.logprobs.expect("asked for logprobs");
    assert_eq!(logprobs.chosen.token, sampled.token);
    assert!((logprobs.chosen.logprob as f64 - full[sampled.token as usize]).abs() < 1e-6);
    assert!(
        logprobs.chosen.logprob < 0.0,
        "top-k = 1 truncates, but logprobs are taken before truncation"
    );
    assert_eq!(logprobs.top.len(), 5);
    assert_eq!(
        logprobs.top[0].token, sampled.token,
        "top-1 is the only candidate"
    );
    assert!(logprobs
        .top
        .windows(2)
        .all(|w| w[0].logprob >= w[1].logprob));
}

#[test]
fn invalid_parameters_are_rejected_with_their_name() {
    for (params, name) in [
        (
            SamplingParams {
                temperature: -1.0,
                ..Default::default()
            },
            "temperature",
        ),
        (
            SamplingParams {
                top_p: 0.0,
                ..Default::default()
            },
            "top_p",
        ),
        (
            SamplingParams {
                min_p: 1.5,
                ..Default::default()
            },
            "min_p",
        ),
        (
            SamplingParams {
                repetition_penalty: 0.0,
                ..Default::default()
            },
            "repetition_penalty",
        ),
        (
            SamplingParams {
                presence_penalty: 3.0,
                ..Default::default()
            },
            "presence_penalty",
        ),
        (
            SamplingParams {
                max_tokens: Some(0),
                ..Default::default()
            },
            "max_tokens",
        ),
    ] {
        let err = Sampler::new(params, &[]).unwrap_err();
        assert!(err.to_string().contains(name), "{err}");
    }
}

// ---------------------------------------------------------------- stop strings

#[test]
fn stop_string_matcher_holds_back_possible_starts() {
    let mut matcher = StopStringMatcher::new(vec!["END".into()]);
    let released = |text: &str| StopStringOutcome {
        released: text.into(),
        matched: None,
    };
    assert_eq!(matcher.push("abc E"), released("abc "));
    assert_eq!(matcher.push("N"), released(""));
    assert_eq!(
        matcher.push("Dxyz"),
        StopStringOutcome {
            released: String::new(),
            matched: Some("END".into())
        }
    );
    assert_eq!(matcher.text(), "abc ");
    assert_eq!(matcher.push("more"), StopStringOutcome::default());

    let mut matcher = StopStringMatcher::new(vec!["END".into(), "\n\n".into()]);
    assert_eq!(matcher.push("E"), released(""));
    assert_eq!(
        matcher.push("Nx\n"),
        released("ENx"),
        "a false start is released"
    );
    assert_eq!(matcher.flush(), "\n");
}

// ---------------------------------------------------------------- generator

/// A model that emits `script` token by token after a prompt of `prompt_len` tokens.
fn scripted_model(
    script: Vec<u32>,
    prompt_len: usize,
) -> impl FnMut(&[Vec<i64>]) -> Result<Vec<Vec<f32>>, RuntimeError> {
    move |sequences: &[Vec<i64>]| {
        Ok(sequences
            .iter()
            .map(|sequence| {
                let mut row = vec![0.0f32; 4096];
                let next = script[(sequence.len() - prompt_len) % script.len()];
                row[next as usize] = 30.0;
                row
            })
            .collect())
    }
}

fn run_script(
    text: &str,
    append: &[u32],
    params: SamplingParams,
) -> (String, Vec<GenerationEvent>) {
    let tok = tokenizer();
    let prompt = tok.encode("Prompt:", false).unwrap();
    let mut script = tok.encode(text, false).unwrap();
    script.extend_from_slice(append);
    let mut generator = Generator::new(scripted_model(script, prompt.len()), tok);
    let mut events = Vec::new();
    let completion = generator
        .complete(&prompt, params, |e| events.push(e.clone()))
        .unwrap();
    let streamed: String = events.iter().map(|e| e.text.as_str()).collect();
    assert_eq!(
        streamed, completion.text,
        "the events add up to the completion"
    );
    assert_eq!(completion.token_ids.len(), events.len());
    assert_eq!(
        events.last().unwrap().finish,
        Some(completion.finish_reason.clone())
    );
    assert!(events[..events.len() - 1]
        .iter()
        .all(|e| e.finish.is_none()));
    (completion.text, events)
}

#[test]
fn generation_ends_at_eos_without_showing_it() {
    let (text, events) = run_script(MULTIBYTE_TEXT, &[0, 5, 6], SamplingParams::greedy());
    assert_eq!(text, MULTIBYTE_TEXT);
    assert_eq!(events.last().unwrap().token, 0);
    assert_eq!(events.last().unwrap().finish, Some(FinishReason::Eos));
    assert!(events
        .iter()
        .all(|e| !e.text.contains(char::REPLACEMENT_CHARACTER)));
}

#[test]
fn ignore_eos_runs_to_max_tokens() {
    let tok = tokenizer();
    let ids = tok.encode("abc", false).unwrap();
    let params = SamplingParams {
        ignore_eos: true,
        max_tokens: Some(ids.len() + 3),
        ..SamplingParams::greedy()
    };
    let (text, events) = run_script("abc", &[0], params);
    assert_eq!(events.len(), ids.len() + 3);
    assert_eq!(events.last().unwrap().finish, Some(FinishReason::Length));
    assert!(text.starts_with("abcabc"), "{text:?}");
}

#[test]
fn stop_token_ids_end_generation() {
    let tok = tokenizer();
    let stop = tok.encode("!", false).unwrap()[0];
    let params = SamplingParams {
        stop_token_ids: vec![stop],
        ..SamplingParams::greedy()
    };
    let (text, events) = run_script("Hello world! Goodbye", &[0], params);
    assert_eq!(text, "Hello world");
    assert_eq!(
        events.last().unwrap().finish,
        Some(FinishReason::StopToken(stop))
    );
}

#[test]
fn stop_strings_split_across_tokens_are_caught_and_trimmed() {
    let tok = tokenizer();
    let text = "The value of the variable is printed. Then the loop ends.";
    let stop = "printed. Then";
    let ids = tok.encode(text, false).unwrap();
    let pieces: Vec<String> = ids
        .iter()
        .map(|&id| tok.decode(&[id], true).unwrap())
        .collect();
    assert!(
        !pieces.iter().any(|p| p.contains(stop)),
        "the stop string spans several tokens: {pieces:?}"
    );
    let params = SamplingParams {
        stop: vec![stop.into(), "never".into()],
        ..SamplingParams::greedy()
    };
    let (generated, events) = run_script(text, &[0], params);
    assert_eq!(generated, "The value of the variable is ");
    assert_eq!(
        events.last().unwrap().finish,
        Some(FinishReason::StopString(stop.into()))
    );
    assert!(events.len() < ids.len(), "generation stopped early");
    // The start of the stop string was held back, never streamed.
    assert!(events.iter().all(|e| !e.text.contains("print")));
}

#[test]
fn max_tokens_ends_with_length() {
    let params = SamplingParams {
        max_tokens: Some(3),
        ..SamplingParams::greedy()
    };
    let (_, events) = run_script("one two three four five six", &[0], params);
    assert_eq!(events.len(), 3);
    assert_eq!(events[2].finish, Some(FinishReason::Length));
}

#[test]
fn requests_are_batched_and_finish_independently() {
    let tok = tokenizer();
    let prompt = tok.encode("Prompt:", false).unwrap();
    let script = tok.encode(" alpha beta gamma delta", false).unwrap();
    let mut batch_sizes = Vec::new();
    let mut model = scripted_model(script, prompt.len());
    let recording = |sequences: &[Vec<i64>]| {
        batch_sizes.push(sequences.len());
        model(sequences)
    };
    let mut generator = Generator::new(recording, tok).with_max_sequence_len(prompt.len() + 4);
    let short = generator
        .add_request(
            &prompt,
            SamplingParams {
                max_tokens: Some(2),
                ..SamplingParams::greedy()
            },
        )
        .unwrap();
    let long = generator
        .add_request(&prompt, SamplingParams::greedy())
        .unwrap();
    let events: Vec<GenerationEvent> = generator.events().map(Result::unwrap).collect();
    let finish = |id| {
        events
            .iter()
            .find(|e| e.request == id && e.finish.is_some())
            .unwrap()
    };
    assert_eq!(finish(short).finish, Some(FinishReason::Length));
    assert_eq!(
        finish(long).finish,
        Some(FinishReason::Length),
        "the context is full"
    );
    assert_eq!(events.iter().filter(|e| e.request == long).count(), 4);
    drop(generator);
    assert_eq!(batch_sizes, [2, 2, 1, 1]);
}
