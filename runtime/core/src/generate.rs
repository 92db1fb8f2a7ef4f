//! Text generation: a [`Generator`] drives a model ("the last position's logits for a batch
//! of token sequences") with a [`Sampler`], the stop conditions and incremental
//! detokenization per request, and yields one [`GenerationEvent`] per generated token.
//!
//! The model is anything implementing [`LogitsModel`], closures
//! `FnMut(&[Vec<i64>]) -> Result<Vec<Vec<f32>>, RuntimeError>` included, so the reference
//! [`ProgramLogits`] over any [`Executor`] (interpreter, CPU or GPU plans) plug in the same way.
//! Without a KV cache each step passes every request's whole sequence (prompt + output).
//!
//! Per step and request: sample a token; an end-of-sequence id (unless `ignore_eos`) or a
//! `stop_token_ids` entry ends the request without adding text; otherwise the token is
//! detokenized and the text passed through the stop-string matcher, which releases what can
//! be shown and ends the request when a stop string completes (the string is cut). Then
//! `max_tokens` and the context length end it with [`FinishReason::Length`]. When a request
//! ends, all held-back text is released in its last event, so the events' texts concatenate
//! to the request's final text.

use crate::sampling::{
    FinishReason, SampledToken, Sampler, SamplingError, SamplingParams, StopStringMatcher,
    TokenLogprobs,
};
use crate::tokenizer::{IncrementalDecoder, Tokenizer, TokenizerError};
use crate::{Executor, RuntimeError};
use kiln_ir::{DType, Tensor};
use std::collections::{BTreeMap, VecDeque};

/// What can stop a generation.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("model: {0}")]
    Model(#[from] RuntimeError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Sampling(#[from] SamplingError),
    #[error("the model returned {returned} logits rows for {expected} sequences")]
    BatchMismatch { expected: usize, returned: usize },
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("the prompt has {prompt} tokens, but the context holds {context} (nothing left to generate)")]
    PromptTooLong { prompt: usize, context: usize },
}

/// A model seen from the generator: the logits of the last position of each sequence.
pub trait LogitsModel {
    fn last_logits(&mut self, sequences: &[Vec<i64>]) -> Result<Vec<Vec<f32>>, RuntimeError>;
    /// Each sequence's greedy next token (the argmax of its last logits, the lowest id on
    /// ties), made by the model itself without the logits, or `None` where the model
    /// cannot make it (the generator then asks for the logits). The generator asks when
    /// every request takes the plain argmax (`Sampler::takes_plain_argmax`): a KV-cached
    /// model on the GPU copies back a token a sequence instead of its logits.
    fn last_greedy(&mut self, sequences: &[Vec<i64>]) -> Option<Result<Vec<u32>, RuntimeError>> {
        let _ = sequences;
        None
    }
}

impl<F> LogitsModel for F
where
    F: FnMut(&[Vec<i64>]) -> Result<Vec<Vec<f32>>, RuntimeError>,
{
    fn last_logits(&mut self, sequences: &[Vec<i64>]) -> Result<Vec<Vec<f32>>, RuntimeError> {
        self(sequences)
    }
}

/// A lowered program's entry `tokens: int[B, S] -> logits: float[B, S, V]` run by an
/// [`Executor`], as a [`LogitsModel`]. Sequences of equal length share one run.
pub struct ProgramLogits<'a> {
    executor: &'a mut dyn Executor,
    entry: String,
    token_dtype: DType,
}

impl<'a> ProgramLogits<'a> {
    /// Checks that `entry` takes one integer tensor of rank 2 and returns a rank-3 tensor.
    pub fn new(
        executor: &'a mut dyn Executor,
        entry: &str,
    ) -> Result<ProgramLogits<'a>, RuntimeError> {
        let func = executor
            .module()
            .function(entry)
            .ok_or_else(|| RuntimeError::Input(format!("no entry function `{entry}`")))?;
        let (params, results) = (func.params(), func.results());
        let shape_error = || {
            RuntimeError::Input(format!(
                "`{entry}` must map token ids int[B, S] to logits float[B, S, vocab] to generate text"
            ))
        };
        let [tokens] = params else {
            return Err(shape_error());
        };
        let tokens_ty = func.ty(*tokens);
        let logits_ok = results
            .first()
            .is_some_and(|r| func.ty(*r).shape.0.len() == 3 && func.ty(*r).dtype.is_float());
        if !tokens_ty.dtype.is_int() || tokens_ty.shape.0.len() != 2 || !logits_ok {
            return Err(shape_error());
        }
        let token_dtype = tokens_ty.dtype;
        Ok(ProgramLogits {
            executor,
            entry: entry.to_string(),
            token_dtype,
        })
    }
}

impl LogitsModel for ProgramLogits<'_> {
    fn last_logits(&mut self, sequences: &[Vec<i64>]) -> Result<Vec<Vec<f32>>, RuntimeError> {
        let mut by_length: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (i, sequence) in sequences.iter().enumerate() {
            by_length.entry(sequence.len()).or_default().push(i);
        }
        let mut rows = vec![Vec::new(); sequences.len()];
        for (length, members) in by_length {
            let ids: Vec<i64> = members
                .iter()
                .flat_map(|&i| sequences[i].iter().copied())
                .collect();
            let tokens = Tensor::from_ints(self.token_dtype, &[members.len(), length], ids);
            let results = self.executor.run(&self.entry, &[tokens])?;
            let logits = results
                .first()
                .ok_or_else(|| RuntimeError::Input(format!("`{}` returned nothing", self.entry)))?;
            let vocab = *logits.shape.last().unwrap_or(&0);
            let values = logits.to_f32_vec();
            for (b, &i) in members.iter().enumerate() {
                let end = (b * length + length) * vocab;
                rows[i] = values[end - vocab..end].to_vec();
            }
        }
        Ok(rows)
    }
}

/// Identifies a request within one [`Generator`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestId(pub u64);

/// One generated token of one request.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationEvent {
    pub request: RequestId,
    pub token: u32,
    /// Text released by this token; empty while a character or a possible stop string is
    /// incomplete, and the whole held-back rest in a request's last event.
    pub text: String,
    /// Present when the request asked for logprobs.
    pub logprobs: Option<TokenLogprobs>,
    /// Set on the request's last event.
    pub finish: Option<FinishReason>,
}

/// A finished request, collected.
#[derive(Clone, Debug, PartialEq)]
pub struct Completion {
    pub prompt_tokens: usize,
    /// Every generated token, the final end-of-sequence or stop token included.
    pub token_ids: Vec<u32>,
    pub text: String,
    pub logprobs: Vec<TokenLogprobs>,
    pub finish_reason: FinishReason,
}

struct Request {
    id: RequestId,
    /// Prompt and output tokens: the sequence the model sees next.
    sequence: Vec<i64>,
    prompt_len: usize,
    sampler: Sampler,
    decoder: IncrementalDecoder,
    stops: StopStringMatcher,
    max_tokens: Option<usize>,
}

/// Runs requests to completion on a [`LogitsModel`], one token per request per step.
pub struct Generator<M> {
    model: M,
    tokenizer: Tokenizer,
    eos_token_ids: Vec<u32>,
    max_sequence_len: Option<usize>,
    active: Vec<Request>,
    next_id: u64,
}

impl<M: LogitsModel> Generator<M> {
    /// A generator whose end-of-sequence ids are the tokenizer's EOS token (see
    /// [`Generator::with_eos_token_ids`] to add `generation_config.json`'s).
    pub fn new(model: M, tokenizer: Tokenizer) -> Generator<M> {
        let eos_token_ids = tokenizer.eos_token_id().into_iter().collect();
        Generator {
            model,
            tokenizer,
            eos_token_ids,
            max_sequence_len: None,
            active: Vec::new(),
            next_id: 0,
        }
    }

    /// Adds `ids` to the end-of-sequence ids.
    pub fn with_eos_token_ids(mut self, ids: impl IntoIterator<Item = u32>) -> Generator<M> {
        for id in ids {
            if !self.eos_token_ids.contains(&id) {
                self.eos_token_ids.push(id);
            }
        }
        self
    }

    /// Ends requests with [`FinishReason::Length`] when prompt + output reach `len` tokens.
    pub fn with_max_sequence_len(mut self, len: usize) -> Generator<M> {
        self.max_sequence_len = Some(len);
        self
    }

    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Queues a request; it takes part from the next step on.
    pub fn add_request(
        &mut self,
        prompt: &[u32],
        params: SamplingParams,
    ) -> Result<RequestId, GenerateError> {
        if prompt.is_empty() {
            return Err(GenerateError::EmptyPrompt);
        }
        if let Some(context) = self.max_sequence_len {
            if prompt.len() >= context {
                return Err(GenerateError::PromptTooLong {
                    prompt: prompt.len(),
                    context,
                });
            }
        }
        let sampler = Sampler::new(params, prompt)?;
        let params = sampler.params();
        let id = RequestId(self.next_id);
        self.next_id += 1;
        self.active.push(Request {
            id,
            sequence: prompt.iter().map(|&t| i64::from(t)).collect(),
            prompt_len: prompt.len(),
            decoder: self
                .tokenizer
                .incremental_decoder(prompt, params.skip_special_tokens),
            stops: StopStringMatcher::new(params.stop.clone()),
            max_tokens: params.max_tokens,
            sampler,
        });
        Ok(id)
    }

    /// Whether any request is still generating.
    pub fn has_unfinished(&self) -> bool {
        !self.active.is_empty()
    }

    /// Drops a request without finishing it (a client went away).
    pub fn abort(&mut self, id: RequestId) -> bool {
        let before = self.active.len();
        self.active.retain(|r| r.id != id);
        self.active.len() != before
    }

    /// Runs the model once over every active request and returns one event per request.
    pub fn step(&mut self) -> Result<Vec<GenerationEvent>, GenerateError> {
        if self.active.is_empty() {
            return Ok(Vec::new());
        }
        let sequences: Vec<Vec<i64>> = self.active.iter().map(|r| r.sequence.clone()).collect();
        let mismatch = |returned: usize| GenerateError::BatchMismatch {
            expected: sequences.len(),
            returned,
        };
        let plain_argmax = self.active.iter().all(|r| r.sampler.takes_plain_argmax());
        let greedy = match plain_argmax {
            true => self.model.last_greedy(&sequences).transpose()?,
            false => None,
        };
        let mut sampled = Vec::with_capacity(sequences.len());
        if let Some(tokens) = greedy {
            if tokens.len() != sequences.len() {
                return Err(mismatch(tokens.len()));
            }
            for (request, token) in self.active.iter_mut().zip(tokens) {
                sampled.push(request.sampler.accept_argmax(token));
            }
        } else {
            let rows = self.model.last_logits(&sequences)?;
            if rows.len() != sequences.len() {
                return Err(mismatch(rows.len()));
            }
            for (request, row) in self.active.iter_mut().zip(&rows) {
                sampled.push(request.sampler.sample(row)?);
            }
        }
        let mut events = Vec::with_capacity(sampled.len());
        for (request, sampled) in self.active.iter_mut().zip(sampled) {
            events.push(advance(
                request,
                sampled,
                &self.eos_token_ids,
                self.max_sequence_len,
            )?);
        }
        self.active.retain(|r| {
            !events
                .iter()
                .any(|e| e.request == r.id && e.finish.is_some())
        });
        Ok(events)
    }

    /// The events of all active requests as an iterator, stepping the model as needed.
    pub fn events(&mut self) -> Events<'_, M> {
        Events {
            generator: self,
            pending: VecDeque::new(),
            failed: false,
        }
    }

    /// Generates for one prompt until it finishes, calling `on_event` for every event
    /// (other active requests' included), and returns the collected result.
    pub fn complete(
        &mut self,
        prompt: &[u32],
        params: SamplingParams,
        mut on_event: impl FnMut(&GenerationEvent),
    ) -> Result<Completion, GenerateError> {
        let id = self.add_request(prompt, params)?;
        let mut token_ids = Vec::new();
        let mut text = String::new();
        let mut logprobs = Vec::new();
        loop {
            for event in self.step()? {
                on_event(&event);
                if event.request != id {
                    continue;
                }
                token_ids.push(event.token);
                text.push_str(&event.text);
                logprobs.extend(event.logprobs);
                if let Some(finish_reason) = event.finish {
                    return Ok(Completion {
                        prompt_tokens: prompt.len(),
                        token_ids,
                        text,
                        logprobs,
                        finish_reason,
                    });
                }
            }
        }
    }
}

/// Adds the token sampled for `request` and applies the stop conditions.
fn advance(
    request: &mut Request,
    sampled: SampledToken,
    eos_token_ids: &[u32],
    max_sequence_len: Option<usize>,
) -> Result<GenerationEvent, GenerateError> {
    let token = sampled.token;
    request.sequence.push(i64::from(token));
    let generated = request.sequence.len() - request.prompt_len;
    let params = request.sampler.params();
    let mut finish = if !params.ignore_eos && eos_token_ids.contains(&token) {
        Some(FinishReason::Eos)
    } else if params.stop_token_ids.contains(&token) {
        Some(FinishReason::StopToken(token))
    } else {
        None
    };
    let mut text = String::new();
    if finish.is_none() {
        let delta = request.decoder.push(token)?;
        let outcome = request.stops.push(&delta);
        text = outcome.released;
        finish = outcome.matched.map(FinishReason::StopString);
    }
    if finish.is_none()
        && (request.max_tokens.is_some_and(|max| generated >= max)
            || max_sequence_len.is_some_and(|max| request.sequence.len() >= max))
    {
        finish = Some(FinishReason::Length);
    }
    if let Some(reason) = &finish {
        if !matches!(reason, FinishReason::StopString(_)) {
            // Release the held-back text; a stop string can still complete in it.
            let outcome = request.stops.push(&request.decoder.finish()?);
            text.push_str(&outcome.released);
            match outcome.matched {
                Some(stop) => finish = Some(FinishReason::StopString(stop)),
                None => text.push_str(&request.stops.flush()),
            }
        }
    }
    Ok(GenerationEvent {
        request: request.id,
        token,
        text,
        logprobs: sampled.logprobs,
        finish,
    })
}

/// An iterator over a [`Generator`]'s events; it ends when no request is active, and after
/// the first error.
pub struct Events<'g, M> {
    generator: &'g mut Generator<M>,
    pending: VecDeque<GenerationEvent>,
    failed: bool,
}

impl<M: LogitsModel> Iterator for Events<'_, M> {
    type Item = Result<GenerationEvent, GenerateError>;

    fn next(&mut self) -> Option<Self::Item> {
        while self.pending.is_empty() {
            if self.failed || !self.generator.has_unfinished() {
                return None;
            }
            match self.generator.step() {
                Ok(events) => self.pending.extend(events),
                Err(e) => {
                    self.failed = true;
                    return Some(Err(e));
                }
            }
        }
        self.pending.pop_front().map(Ok)
    }
}
