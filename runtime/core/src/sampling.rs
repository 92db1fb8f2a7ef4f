//! Host-side token sampling over one row of logits, and the stop conditions of a request.
//!
//! # The order of operations
//! For every generated token, [`Sampler::sample`] takes the model's raw `f32` logits over
//! the vocabulary and:
//! 1. applies the **repetition penalty** (Hugging Face semantics): for every distinct token
//!    seen in the prompt or the output so far, a positive logit is divided by the penalty
//!    and a negative one multiplied by it;
//! 2. applies the **presence and frequency penalties** (OpenAI semantics) to tokens of the
//!    output only: `logit -= frequency_penalty * count + presence_penalty * (count > 0)`;
//! 3. divides by the **temperature**; temperature 0 means greedy decoding: the argmax of the
//!    penalised logits, the lowest token id winning ties, and no random draw;
//! 4. truncates the candidates: **top-k** (the k highest logits, lower id first on ties),
//!    then **top-p** on the renormalised remainder (the smallest prefix of the
//!    probability-sorted candidates whose mass reaches p), then **min-p** (drop candidates
//!    whose probability is below `min_p` times the most likely one's);
//! 5. draws one candidate with the request's seeded [`Rng`].
//!
//! # Logprobs convention
//! Reported logprobs are the log-softmax of the logits after steps 1–3 (penalties and
//! temperature; under greedy decoding the temperature is taken as 1) over the **whole
//! vocabulary, before truncation**. They describe the distribution the truncation started
//! from, so they always sum (as probabilities) to 1 and do not depend on top-k/top-p/min-p.
//! This is what vLLM reports by default ("processed logits" minus the truncation).
//!
//! # Stop conditions
//! [`FinishReason`] names why a sequence ended; [`StopStringMatcher`] finds stop strings in
//! detokenized text, including strings that arrive split over several tokens, and holds back
//! exactly the text that could still turn out to be the start of a stop string.

use std::collections::{HashMap, HashSet};

/// Invalid sampling parameters, or logits that cannot be sampled from.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SamplingError {
    /// A parameter outside its range; `name` is the OpenAI API's field name.
    #[error("invalid `{name}`: {message}")]
    InvalidParameter { name: &'static str, message: String },
    #[error("the model returned an empty logits row")]
    EmptyLogits,
    #[error("every logit is NaN or -inf: nothing can be sampled")]
    NoValidLogits,
}

/// Everything that controls how one request's tokens are chosen and when it stops.
///
/// The defaults are the OpenAI API's: temperature 1, no truncation, no penalties, no stop
/// strings, no token limit besides the context.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; 0 selects greedy decoding.
    pub temperature: f32,
    /// Keep only the k most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Nucleus sampling mass in (0, 1]; 1 keeps all.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` × the most likely token's probability; 0 is off.
    pub min_p: f32,
    /// Hugging Face repetition penalty (> 0) over prompt and output tokens; 1 is off.
    pub repetition_penalty: f32,
    /// OpenAI presence penalty in [-2, 2], on output tokens.
    pub presence_penalty: f32,
    /// OpenAI frequency penalty in [-2, 2], on output tokens.
    pub frequency_penalty: f32,
    /// Seed of the request's random generator; `None` draws one from the OS.
    pub seed: Option<u64>,
    /// `Some(n)`: report the chosen token's logprob and the `n` most likely alternatives.
    pub logprobs: Option<usize>,
    /// The most tokens to generate; `None` runs up to the context length.
    pub max_tokens: Option<usize>,
    /// Stop strings, matched on the detokenized output; the match itself is not returned.
    pub stop: Vec<String>,
    /// Token ids that end the sequence (in addition to the end-of-sequence ids).
    pub stop_token_ids: Vec<u32>,
    /// Keep generating past end-of-sequence tokens.
    pub ignore_eos: bool,
    /// Leave special tokens out of the detokenized text.
    pub skip_special_tokens: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            logprobs: None,
            max_tokens: None,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            skip_special_tokens: true,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding with otherwise default parameters.
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        }
    }

    /// Whether tokens are chosen by argmax rather than drawn.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// Checks every parameter's range; the error names the offending OpenAI field.
    pub fn validate(&self) -> Result<(), SamplingError> {
        fn invalid(name: &'static str, message: String) -> Result<(), SamplingError> {
            Err(SamplingError::InvalidParameter { name, message })
        }
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return invalid(
                "temperature",
                format!("must be a finite number >= 0, got {}", self.temperature),
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return invalid("top_p", format!("must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return invalid("min_p", format!("must be in [0, 1], got {}", self.min_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return invalid(
                "repetition_penalty",
                format!("must be > 0, got {}", self.repetition_penalty),
            );
        }
        for (name, value) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&value) {
                return invalid(name, format!("must be in [-2, 2], got {value}"));
            }
        }
        if self.max_tokens == Some(0) {
            return invalid("max_tokens", "must be at least 1".into());
        }
        if self.stop.iter().any(String::is_empty) {
            return invalid("stop", "stop strings must not be empty".into());
        }
        Ok(())
    }
}

/// xoshiro256** (Blackman and Vigna, 2018), its state filled by splitmix64 from a 64-bit
/// seed: small, fast, and the same sequence on every platform for the same seed.
#[derive(Clone, Debug)]
pub struct Rng {
    state: [u64; 4],
}

impl Rng {
    pub fn seed_from_u64(seed: u64) -> Rng {
        let mut splitmix = seed;
        let mut next = || {
            splitmix = splitmix.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = splitmix;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Rng {
            state: [next(), next(), next(), next()],
        }
    }

    /// A generator seeded from the process's random hasher keys (different every run).
    pub fn from_entropy() -> Rng {
        use std::hash::{BuildHasher, Hasher};
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default(),
        );
        Rng::seed_from_u64(hasher.finish())
    }

    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.state;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1), with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// One token's log-probability.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
}

/// The chosen token's logprob and the most likely alternatives (see the module docs for the
/// convention).
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprobs {
    pub chosen: TokenLogprob,
    /// The `n` most likely tokens, most likely first (lower id first on ties); the chosen
    /// token appears here only if it is among them.
    pub top: Vec<TokenLogprob>,
}

/// The outcome of one sampling step.
#[derive(Clone, Debug, PartialEq)]
pub struct SampledToken {
    pub token: u32,
    /// Present when the request asked for logprobs.
    pub logprobs: Option<TokenLogprobs>,
}

/// A token that survived truncation, with its renormalised probability.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Candidate {
    pub token: u32,
    pub probability: f64,
}

/// One request's sampling state: its parameters, its random generator, and the tokens that
/// the penalties look at.
#[derive(Clone, Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
    /// Distinct tokens of prompt and output, for the repetition penalty.
    seen: HashSet<u32>,
    /// How often each token occurs in the output, for presence and frequency penalties.
    output_counts: HashMap<u32, u32>,
}

impl Sampler {
    /// Validates `params` and seeds the generator from `params.seed`.
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Result<Sampler, SamplingError> {
        params.validate()?;
        let rng = match params.seed {
            Some(seed) => Rng::seed_from_u64(seed),
            None => Rng::from_entropy(),
        };
        Ok(Sampler {
            seen: prompt.iter().copied().collect(),
            output_counts: HashMap::new(),
            params,
            rng,
        })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Whether the next token is the plain argmax of the raw logits: greedy decoding with no
    /// penalty and no logprobs. A runner may then give the token without the logits (the
    /// model's argmax, made on the device); [`Sampler::accept_argmax`] takes it.
    pub fn takes_plain_argmax(&self) -> bool {
        self.params.is_greedy()
            && self.params.repetition_penalty == 1.0
            && self.params.presence_penalty == 0.0
            && self.params.frequency_penalty == 0.0
            && self.params.logprobs.is_none()
    }

    /// Records `token`, the argmax of the logits computed by the model for a sampler that
    /// [`Sampler::takes_plain_argmax`], as generated: what [`Sampler::sample`] returns for
    /// those logits (but where a logit is NaN: the model's argmax takes NaN as the largest).
    pub fn accept_argmax(&mut self, token: u32) -> SampledToken {
        self.record_output_token(token);
        SampledToken {
            token,
            logprobs: None,
        }
    }

    /// Records `token` as generated (sampled or forced), for the penalties.
    pub fn record_output_token(&mut self, token: u32) {
        self.seen.insert(token);
        *self.output_counts.entry(token).or_insert(0) += 1;
    }

    /// The logits after penalties and temperature (steps 1–3 of the module docs); under
    /// greedy decoding the temperature is left out.
    pub fn processed_logits(&self, logits: &[f32]) -> Vec<f32> {
        let mut processed = logits.to_vec();
        apply_repetition_penalty(
            &mut processed,
            self.params.repetition_penalty,
            self.seen.iter().copied(),
        );
        apply_presence_frequency_penalties(
            &mut processed,
            self.params.presence_penalty,
            self.params.frequency_penalty,
            self.output_counts.iter().map(|(t, c)| (*t, *c)),
        );
        if !self.params.is_greedy() && self.params.temperature != 1.0 {
            let inverse = 1.0 / self.params.temperature;
            processed.iter_mut().for_each(|x| *x *= inverse);
        }
        processed
    }

    /// Chooses the next token from one row of logits and records it as generated.
    pub fn sample(&mut self, logits: &[f32]) -> Result<SampledToken, SamplingError> {
        if logits.is_empty() {
            return Err(SamplingError::EmptyLogits);
        }
        let processed = self.processed_logits(logits);
        let token = if self.params.is_greedy() {
            argmax(&processed).ok_or(SamplingError::NoValidLogits)?
        } else if self.params.top_k == 0 && self.params.top_p >= 1.0 && self.params.min_p <= 0.0 {
            // No truncation: draw from the whole distribution without sorting it.
            draw_untruncated(&processed, self.rng.next_f64()).ok_or(SamplingError::NoValidLogits)?
        } else {
            let candidates = truncated_candidates(
                &processed,
                self.params.top_k,
                self.params.top_p,
                self.params.min_p,
            );
            draw(&candidates, self.rng.next_f64()).ok_or(SamplingError::NoValidLogits)?
        };
        let logprobs = self
            .params
            .logprobs
            .map(|n| token_logprobs(&processed, token, n));
        self.record_output_token(token);
        Ok(SampledToken { token, logprobs })
    }
}

/// The index of the largest logit, the lowest index on ties; NaN never wins. `None` when
/// every logit is NaN or -inf.
pub fn argmax(logits: &[f32]) -> Option<u32> {
    // The largest value first, kept in lanes the compiler vectorizes (NaN never compares
    // greater, so it is never taken), then the first index holding it: a decode step's
    // 32,000 logits in a few microseconds.
    const LANES: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = logits.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (m, &x) in lanes.iter_mut().zip(chunk) {
            *m = if x > *m { x } else { *m };
        }
    }
    let max = lanes
        .iter()
        .chain(rest)
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    if max == f32::NEG_INFINITY {
        return None;
    }
    logits.iter().position(|&x| x == max).map(|i| i as u32)
}

/// Hugging Face's repetition penalty over distinct `tokens`: positive logits are divided by
/// `penalty`, negative ones multiplied. Ids beyond the row are ignored.
pub fn apply_repetition_penalty(
    logits: &mut [f32],
    penalty: f32,
    tokens: impl IntoIterator<Item = u32>,
) {
    if penalty == 1.0 {
        return;
    }
    for token in tokens {
        if let Some(x) = logits.get_mut(token as usize) {
            *x = if *x < 0.0 { *x * penalty } else { *x / penalty };
        }
    }
}

/// OpenAI's presence and frequency penalties from `(token, count in output)` pairs:
/// `logit -= frequency * count + presence * (count > 0)`.
pub fn apply_presence_frequency_penalties(
    logits: &mut [f32],
    presence: f32,
    frequency: f32,
    output_counts: impl IntoIterator<Item = (u32, u32)>,
) {
    if presence == 0.0 && frequency == 0.0 {
        return;
    }
    for (token, count) in output_counts {
        if count == 0 {
            continue;
        }
        if let Some(x) = logits.get_mut(token as usize) {
            *x -= frequency * count as f32 + presence;
        }
    }
}

/// Log-softmax over the whole row, in f64 for accuracy. NaN logits get -inf.
pub fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits
        .iter()
        .copied()
        .filter(|x| !x.is_nan())
        .fold(f32::NEG_INFINITY, f32::max) as f64;
    if max == f64::NEG_INFINITY {
        return vec![f64::NEG_INFINITY; logits.len()];
    }
    let sum: f64 = logits
        .iter()
        .filter(|x| !x.is_nan())
        .map(|&x| (x as f64 - max).exp())
        .sum();
    let log_sum = max + sum.ln();
    logits
        .iter()
        .map(|&x| {
            if x.is_nan() {
                f64::NEG_INFINITY
            } else {
                x as f64 - log_sum
            }
        })
        .collect()
}

/// The logprob of `chosen` and of the `top_n` most likely tokens of `logits`.
pub fn token_logprobs(logits: &[f32], chosen: u32, top_n: usize) -> TokenLogprobs {
    let logprobs = log_softmax(logits);
    let mut order: Vec<u32> = (0..logprobs.len() as u32).collect();
    let by_logprob = |a: &u32, b: &u32| {
        logprobs[*b as usize]
            .total_cmp(&logprobs[*a as usize])
            .then(a.cmp(b))
    };
    let top_n = top_n.min(order.len());
    if top_n > 0 && top_n < order.len() {
        order.select_nth_unstable_by(top_n - 1, by_logprob);
    }
    order.truncate(top_n);
    order.sort_unstable_by(by_logprob);
    let entry = |token: u32| TokenLogprob {
        token,
        logprob: logprobs
            .get(token as usize)
            .copied()
            .unwrap_or(f64::NEG_INFINITY) as f32,
    };
    TokenLogprobs {
        chosen: entry(chosen),
        top: order.into_iter().map(entry).collect(),
    }
}

/// The candidates that survive top-k, then top-p, then min-p (see the module docs), most
/// likely first (lower id first on ties), with probabilities renormalised over the
/// survivors. `top_k == 0`, `top_p >= 1` and `min_p <= 0` disable their step. NaN and -inf
/// logits are never candidates.
pub fn truncated_candidates(
    logits: &[f32],
    top_k: usize,
    top_p: f32,
    min_p: f32,
) -> Vec<Candidate> {
    let mut scored: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .filter(|(_, x)| !x.is_nan() && **x != f32::NEG_INFINITY)
        .map(|(i, x)| (i as u32, *x))
        .collect();
    let by_logit = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if top_k > 0 && top_k < scored.len() {
        scored.select_nth_unstable_by(top_k - 1, by_logit);
        scored.truncate(top_k);
    }
    scored.sort_unstable_by(by_logit);
    let Some(&(first, max)) = scored.first() else {
        return Vec::new();
    };
    if max == f32::INFINITY {
        return vec![Candidate {
            token: first,
            probability: 1.0,
        }];
    }
    let weights: Vec<f64> = scored
        .iter()
        .map(|(_, x)| (*x as f64 - max as f64).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    let mut candidates: Vec<Candidate> = scored
        .iter()
        .zip(&weights)
        .map(|((token, _), w)| Candidate {
            token: *token,
            probability: w / total,
        })
        .collect();
    if top_p < 1.0 {
        let mut mass = 0.0;
        let mut keep = 0;
        for candidate in &candidates {
            if keep > 0 && mass >= top_p as f64 {
                break;
            }
            mass += candidate.probability;
            keep += 1;
        }
        candidates.truncate(keep);
        renormalize(&mut candidates);
    }
    if min_p > 0.0 {
        let threshold = min_p as f64 * candidates[0].probability;
        candidates.retain(|c| c.probability >= threshold);
        renormalize(&mut candidates);
    }
    candidates
}

fn renormalize(candidates: &mut [Candidate]) {
    let total: f64 = candidates.iter().map(|c| c.probability).sum();
    if total > 0.0 {
        candidates.iter_mut().for_each(|c| c.probability /= total);
    }
}

/// Picks the candidate whose cumulative-probability interval holds `uniform` ∈ [0, 1).
fn draw(candidates: &[Candidate], uniform: f64) -> Option<u32> {
    let mut mass = 0.0;
    for candidate in candidates {
        mass += candidate.probability;
        if uniform < mass {
            return Some(candidate.token);
        }
    }
    candidates.last().map(|c| c.token)
}

/// Draws from the softmax of `logits` in token order; NaN and -inf never win.
fn draw_untruncated(logits: &[f32], uniform: f64) -> Option<u32> {
    let valid = |x: f32| !x.is_nan() && x != f32::NEG_INFINITY;
    let max = logits
        .iter()
        .copied()
        .filter(|x| valid(*x))
        .fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return None;
    }
    if max == f32::INFINITY {
        return argmax(logits);
    }
    let weight = |x: f32| {
        if valid(x) {
            (x as f64 - max as f64).exp()
        } else {
            0.0
        }
    };
    let total: f64 = logits.iter().map(|&x| weight(x)).sum();
    let target = uniform * total;
    let mut mass = 0.0;
    let mut last = None;
    for (i, &x) in logits.iter().enumerate() {
        let w = weight(x);
        if w > 0.0 {
            mass += w;
            last = Some(i as u32);
            if target < mass {
                return last;
            }
        }
    }
    last
}

/// Why a sequence stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token (not shown in the text).
    Eos,
    /// One of the request's `stop_token_ids` (not shown in the text).
    StopToken(u32),
    /// One of the request's stop strings (cut from the text).
    StopString(String),
    /// `max_tokens` or the context length was reached.
    Length,
}

impl FinishReason {
    /// The OpenAI API's `finish_reason`: "length" or "stop".
    pub fn openai_name(&self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::Eos | FinishReason::StopToken(_) | FinishReason::StopString(_) => "stop",
        }
    }
}

/// What [`StopStringMatcher::push`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StopStringOutcome {
    /// Text that can be shown now: it can no longer become part of a stop string.
    pub released: String,
    /// The stop string that completed; `released` ends right before it, and everything from
    /// it on is dropped.
    pub matched: Option<String>,
}

/// Finds stop strings in text that arrives in pieces, holding back the shortest tail that
/// could still be the beginning of a stop string.
#[derive(Clone, Debug, Default)]
pub struct StopStringMatcher {
    stops: Vec<String>,
    text: String,
    released: usize,
    stopped: bool,
}

impl StopStringMatcher {
    pub fn new(stops: Vec<String>) -> StopStringMatcher {
        StopStringMatcher {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            ..StopStringMatcher::default()
        }
    }

    /// The text accepted so far (cut before the stop string once one matched).
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Appends `delta`; returns what may be shown and the stop string if one completed.
    /// Nothing is accepted after a match.
    pub fn push(&mut self, delta: &str) -> StopStringOutcome {
        if self.stopped {
            return StopStringOutcome::default();
        }
        let old_len = self.text.len();
        self.text.push_str(delta);
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        // A match that ends in the new text starts at most `longest - 1` bytes before it.
        let mut search_from = old_len.saturating_sub(longest.saturating_sub(1));
        while !self.text.is_char_boundary(search_from) {
            search_from -= 1;
        }
        let earliest = self
            .stops
            .iter()
            .filter_map(|stop| {
                self.text[search_from..]
                    .find(stop.as_str())
                    .map(|at| (search_from + at, stop))
            })
            .min_by_key(|(at, _)| *at);
        if let Some((at, stop)) = earliest {
            let matched = stop.clone();
            // Held-back text never includes the start of a match, so `at >= released`.
            let start = self.released.min(at);
            let released = self.text[start..at].to_string();
            self.text.truncate(at);
            self.released = at;
            self.stopped = true;
            return StopStringOutcome {
                released,
                matched: Some(matched),
            };
        }
        let hold = self.partial_match_len();
        let end = self.text.len() - hold;
        let released = if end > self.released {
            let text = self.text[self.released..end].to_string();
            self.released = end;
            text
        } else {
            String::new()
        };
        StopStringOutcome {
            released,
            matched: None,
        }
    }

    /// Releases the held-back tail (generation ended for another reason).
    pub fn flush(&mut self) -> String {
        let rest = self.text[self.released..].to_string();
        self.released = self.text.len();
        rest
    }

    /// The length of the longest tail of the text that is a proper prefix of a stop string.
    fn partial_match_len(&self) -> usize {
        let mut hold = 0;
        for stop in &self.stops {
            for (k, _) in stop.char_indices().skip(1) {
                if k > hold && self.text.ends_with(&stop[..k]) {
                    hold = k;
                }
            }
        }
        hold
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_state_comes_from_splitmix64() {
        // splitmix64's first outputs for seed 0 (Vigna's reference implementation).
        let rng = Rng::seed_from_u64(0);
        assert_eq!(rng.state[0], 0xE220_A839_7B1D_CDAF);
        assert_eq!(rng.state[1], 0x6E78_9E6A_A1B9_65F4);
        let mut rng = Rng::seed_from_u64(42);
        assert!((0..1000)
            .map(|_| rng.next_f64())
            .all(|u| (0.0..1.0).contains(&u)));
    }

    #[test]
    fn untruncated_draws_follow_the_softmax() {
        let logits = [
            0.5f64.ln() as f32,
            f32::NAN,
            0.25f64.ln() as f32,
            0.25f64.ln() as f32,
        ];
        let mut rng = Rng::seed_from_u64(5);
        let mut counts = [0usize; 4];
        for _ in 0..20_000 {
            counts[draw_untruncated(&logits, rng.next_f64()).unwrap() as usize] += 1;
        }
        assert_eq!(counts[1], 0, "NaN is never drawn");
        let share = |n: usize| n as f64 / 20_000.0;
        assert!((share(counts[0]) - 0.5).abs() < 0.02, "{counts:?}");
        assert!((share(counts[2]) - 0.25).abs() < 0.02, "{counts:?}");
        assert_eq!(draw_untruncated(&[f32::NEG_INFINITY; 3], 0.5), None);
        assert_eq!(draw_untruncated(&[1.0, f32::INFINITY], 0.1), Some(1));
    }
}
