//! The OpenAI wire format: request bodies (unknown fields ignored), their validation into
//! engine requests, and the JSON of responses and stream chunks.
//!
//! Validation happens here, before anything reaches the engine, so every bad input is a 400
//! with the offending field named: an empty or too long prompt, prompt + `max_tokens` over the
//! context, out-of-range sampling parameters, token ids outside the vocabulary, `n` beyond the
//! sequence cap, `priority` without priority scheduling.

use kiln_runtime::sampling::{FinishReason, SamplingParams, TokenLogprob, TokenLogprobs};
use kiln_runtime::{ChatMessage, GenerationConfig, SamplingError};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::codec::TextCodec;
use crate::engine::GenerationRequest;
use crate::error::ApiError;

/// The most alternatives `logprobs` / `top_logprobs` may ask for.
pub const MAX_LOGPROBS: usize = 20;

/// `stream_options`.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct StreamOptions {
    /// Add a last chunk with the token counts.
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// Sampling fields shared by completions and chat.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct SamplingFields {
    /// Most tokens to generate per choice; unset means up to the context.
    pub max_tokens: Option<u64>,
    /// Softmax temperature; 0 is greedy.
    pub temperature: Option<f32>,
    /// Nucleus mass.
    pub top_p: Option<f32>,
    /// Keep the k most likely tokens; 0 or -1 keeps all.
    pub top_k: Option<i64>,
    /// Drop tokens below min_p × the most likely one's probability.
    pub min_p: Option<f32>,
    /// OpenAI presence penalty.
    pub presence_penalty: Option<f32>,
    /// OpenAI frequency penalty.
    pub frequency_penalty: Option<f32>,
    /// Hugging Face repetition penalty.
    pub repetition_penalty: Option<f32>,
    /// Seed of the sampler.
    pub seed: Option<i64>,
    /// A stop string or a list of them.
    pub stop: Option<Value>,
    /// Token ids that end a choice.
    pub stop_token_ids: Option<Vec<u32>>,
    /// Generate past end-of-sequence tokens.
    pub ignore_eos: Option<bool>,
    /// Leave special tokens out of the text (default true).
    pub skip_special_tokens: Option<bool>,
    /// Choices per prompt.
    pub n: Option<u64>,
    /// Lower runs first (priority scheduling only).
    pub priority: Option<i32>,
    /// Stream the answer as server-sent events.
    pub stream: Option<bool>,
    /// Streaming options.
    pub stream_options: Option<StreamOptions>,
    /// The model to use.
    pub model: Option<String>,
    /// vLLM's extension: logprobs name tokens as `token_id:N` instead of their text.
    pub return_tokens_as_token_ids: Option<bool>,
}

/// `POST /v1/completions`.
#[derive(Clone, Debug, Deserialize)]
pub struct CompletionRequest {
    /// A string, a list of strings, a list of token ids, or a list of token-id lists.
    pub prompt: Option<Value>,
    /// Report the chosen token's logprob and this many alternatives.
    pub logprobs: Option<u64>,
    /// Everything else.
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

/// `POST /v1/chat/completions`.
#[derive(Clone, Debug, Deserialize)]
pub struct ChatRequest {
    /// The conversation.
    pub messages: Option<Vec<ChatMessage>>,
    /// Newer name of `max_tokens`; wins when both are given.
    pub max_completion_tokens: Option<u64>,
    /// Report logprobs of the chosen tokens.
    pub logprobs: Option<bool>,
    /// Alternatives per token (needs `logprobs: true`).
    pub top_logprobs: Option<u64>,
    /// Everything else.
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

/// `POST /v1/embeddings`.
#[derive(Clone, Debug, Deserialize)]
pub struct EmbeddingRequest {
    /// A string, a list of strings, a list of token ids, or a list of token-id lists.
    pub input: Option<Value>,
    /// The model to use.
    pub model: Option<String>,
    /// `float` (default) or `base64`.
    pub encoding_format: Option<String>,
}

/// What the server knows when validating a request.
#[derive(Debug)]
pub struct ValidationContext<'a> {
    /// The served model's tokenizer.
    pub codec: &'a TextCodec,
    /// The checkpoint's sampling defaults.
    pub generation_config: &'a GenerationConfig,
    /// The longest sequence served.
    pub max_model_len: usize,
    /// Vocabulary size (token ids must be below it).
    pub vocab_size: usize,
    /// Most sequences running at once (bounds `n`).
    pub max_num_seqs: usize,
    /// Whether `priority` is honoured.
    pub priority_scheduling: bool,
}

/// A validated generation request: one engine request per prompt, and how to answer.
#[derive(Clone, Debug)]
pub struct GenerationPlan {
    /// One per prompt.
    pub requests: Vec<GenerationRequest>,
    /// Choices per prompt.
    pub n: usize,
    /// Answer with server-sent events.
    pub stream: bool,
    /// Add a usage chunk at the end of the stream.
    pub include_usage: bool,
    /// Logprobs asked for (alternatives per token).
    pub logprobs: Option<usize>,
    /// Name tokens in logprobs as `token_id:N`.
    pub tokens_as_ids: bool,
}

impl GenerationPlan {
    /// Prompt tokens over all prompts (each counted once, whatever `n`).
    pub fn prompt_tokens(&self) -> usize {
        self.requests.iter().map(|r| r.prompt_token_ids.len()).sum()
    }

    /// Choices in the answer.
    pub fn num_choices(&self) -> usize {
        self.requests.len() * self.n
    }
}

/// Reads the prompts of `prompt` / `input`: a string, a list of strings, a list of token ids,
/// or a list of such lists.
pub fn parse_prompts(
    value: Option<&Value>,
    field: &str,
    context: &ValidationContext<'_>,
) -> Result<Vec<Vec<u32>>, ApiError> {
    let value =
        value.ok_or_else(|| ApiError::invalid_param(field, format!("`{field}` is required")))?;
    let encode = |text: &str| {
        context
            .codec
            .encode(text)
            .map_err(|e| ApiError::invalid_param(field, e.to_string()))
    };
    let token_list = |items: &[Value]| -> Result<Vec<u32>, ApiError> {
        items
            .iter()
            .map(|item| {
                item.as_u64()
                    .filter(|&id| (id as usize) < context.vocab_size)
                    .map(|id| id as u32)
                    .ok_or_else(|| {
                        ApiError::invalid_param(
                            field,
                            format!(
                                "token ids must be integers in [0, {}), found {item}",
                                context.vocab_size
                            ),
                        )
                    })
            })
            .collect()
    };
    let shape_error = || {
        ApiError::invalid_param(
            field,
            format!(
                "`{field}` must be a string, a list of strings, a list of token ids or a list \
                 of token-id lists"
            ),
        )
    };
    let prompts = match value {
        Value::String(text) => vec![encode(text)?],
        Value::Array(items) if items.is_empty() => {
            return Err(ApiError::invalid_param(
                field,
                format!("`{field}` is empty"),
            ))
        }
        Value::Array(items) => match &items[0] {
            Value::String(_) => items
                .iter()
                .map(|item| item.as_str().ok_or_else(shape_error).and_then(encode))
                .collect::<Result<_, _>>()?,
            Value::Number(_) => vec![token_list(items)?],
            Value::Array(_) => items
                .iter()
                .map(|item| {
                    item.as_array()
                        .ok_or_else(shape_error)
                        .and_then(|ids| token_list(ids))
                })
                .collect::<Result<_, _>>()?,
            _ => return Err(shape_error()),
        },
        _ => return Err(shape_error()),
    };
    Ok(prompts)
}

/// Checks a prompt's length against the context (`field` names it in errors).
pub fn check_prompt_length(
    prompt: &[u32],
    field: &str,
    max_model_len: usize,
) -> Result<(), ApiError> {
    if prompt.is_empty() {
        return Err(ApiError::invalid_param(field, "the prompt is empty"));
    }
    if prompt.len() >= max_model_len {
        return Err(ApiError::invalid_param(
            field,
            format!(
                "the prompt is {} tokens long, but this model's context is {max_model_len} \
                 tokens (max_model_len), which leaves no room to generate; shorten the prompt",
                prompt.len()
            ),
        )
        .with_code("context_length_exceeded"));
    }
    Ok(())
}

/// Validates the fields shared by completions and chat and builds the plan for `prompts`.
pub fn plan_generation(
    prompts: Vec<Vec<u32>>,
    prompt_field: &str,
    fields: &SamplingFields,
    max_tokens: Option<(u64, &str)>,
    logprobs: Option<usize>,
    context: &ValidationContext<'_>,
) -> Result<GenerationPlan, ApiError> {
    let n = fields.n.unwrap_or(1);
    if n == 0 || n > context.max_num_seqs as u64 {
        return Err(ApiError::invalid_param(
            "n",
            format!(
                "`n` must be between 1 and {} (max_num_seqs), got {n}",
                context.max_num_seqs
            ),
        ));
    }
    let priority = fields.priority.unwrap_or(0);
    if priority != 0 && !context.priority_scheduling {
        return Err(ApiError::invalid_param(
            "priority",
            "`priority` needs priority scheduling; start the server with --scheduling-policy \
             priority",
        ));
    }
    if logprobs.is_some_and(|k| k > MAX_LOGPROBS) {
        return Err(ApiError::invalid_param(
            "logprobs",
            format!("at most {MAX_LOGPROBS} logprobs per token can be returned"),
        ));
    }
    let mut params = sampling_defaults(context.generation_config);
    let overrides = [
        (&mut params.temperature, fields.temperature),
        (&mut params.top_p, fields.top_p),
        (&mut params.min_p, fields.min_p),
        (&mut params.presence_penalty, fields.presence_penalty),
        (&mut params.frequency_penalty, fields.frequency_penalty),
        (&mut params.repetition_penalty, fields.repetition_penalty),
    ];
    for (slot, value) in overrides {
        if let Some(value) = value {
            *slot = value;
        }
    }
    if let Some(top_k) = fields.top_k {
        if top_k < -1 {
            return Err(ApiError::invalid_param(
                "top_k",
                format!("`top_k` must be -1 or 0 (all tokens) or positive, got {top_k}"),
            ));
        }
        params.top_k = top_k.max(0) as usize;
    }
    params.seed = fields.seed.map(|seed| seed as u64);
    params.stop = parse_stop(fields.stop.as_ref())?;
    params.stop_token_ids = fields.stop_token_ids.clone().unwrap_or_default();
    params.ignore_eos = fields.ignore_eos.unwrap_or(false);
    params.skip_special_tokens = fields.skip_special_tokens.unwrap_or(true);
    params.logprobs = logprobs;
    params.max_tokens = match max_tokens {
        Some((0, field)) => {
            return Err(ApiError::invalid_param(
                field,
                format!("`{field}` must be at least 1"),
            ))
        }
        Some((value, _)) => Some(usize::try_from(value).unwrap_or(usize::MAX)),
        None => None,
    };
    params.validate().map_err(|error| match &error {
        SamplingError::InvalidParameter { name, .. } => {
            ApiError::invalid_param(name, error.to_string())
        }
        _ => ApiError::invalid_request(error.to_string()),
    })?;
    let mut requests = Vec::with_capacity(prompts.len());
    for prompt in prompts {
        check_prompt_length(&prompt, prompt_field, context.max_model_len)?;
        let room = context.max_model_len - prompt.len();
        let max_tokens = match (params.max_tokens, max_tokens) {
            (Some(asked), Some((_, field))) if asked > room => {
                return Err(ApiError::invalid_param(
                    field,
                    format!(
                        "this model's context is {} tokens (max_model_len); the prompt is {} \
                         tokens and `{field}` asks for {asked} more; lower `{field}` to at most \
                         {room}",
                        context.max_model_len,
                        prompt.len()
                    ),
                )
                .with_code("context_length_exceeded"));
            }
            (Some(asked), _) => asked,
            (None, _) => room,
        };
        let mut request_params = params.clone();
        request_params.max_tokens = Some(max_tokens);
        requests.push(GenerationRequest {
            prompt_token_ids: prompt,
            params: request_params,
            max_tokens,
            n: n as usize,
            priority,
        });
    }
    let stream = fields.stream.unwrap_or(false);
    let include_usage = fields
        .stream_options
        .as_ref()
        .and_then(|options| options.include_usage)
        .unwrap_or(false);
    if fields.stream_options.is_some() && !stream {
        return Err(ApiError::invalid_param(
            "stream_options",
            "`stream_options` is only allowed with `stream: true`",
        ));
    }
    Ok(GenerationPlan {
        requests,
        n: n as usize,
        stream,
        include_usage,
        logprobs,
        tokens_as_ids: fields.return_tokens_as_token_ids.unwrap_or(false),
    })
}

/// The checkpoint's sampling defaults, as vLLM applies generation_config.json: the keys the
/// file sets replace the OpenAI defaults (temperature 1, no truncation), nothing else.
pub fn sampling_defaults(config: &GenerationConfig) -> SamplingParams {
    let mut params = SamplingParams::default();
    if let Some(temperature) = config.temperature {
        params.temperature = temperature;
    }
    if let Some(top_k) = config.top_k {
        params.top_k = top_k;
    }
    if let Some(top_p) = config.top_p {
        params.top_p = top_p;
    }
    if let Some(min_p) = config.min_p {
        params.min_p = min_p;
    }
    if let Some(penalty) = config.repetition_penalty {
        params.repetition_penalty = penalty;
    }
    params
}

/// `stop`: a string or a list of strings (null or absent: none).
fn parse_stop(value: Option<&Value>) -> Result<Vec<String>, ApiError> {
    let invalid =
        || ApiError::invalid_param("stop", "`stop` must be a string or a list of strings");
    match value {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(stop)) => Ok(vec![stop.clone()]),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| item.as_str().map(str::to_string).ok_or_else(invalid))
            .collect(),
        Some(_) => Err(invalid()),
    }
}

/// `usage`.
pub fn usage_json(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    })
}

/// `finish_reason` and vLLM's `stop_reason` (the stop string or token id that matched).
pub fn finish_json(finish: Option<&FinishReason>) -> (Value, Value) {
    match finish {
        None => (Value::Null, Value::Null),
        Some(reason) => {
            let stop_reason = match reason {
                FinishReason::StopString(stop) => json!(stop),
                FinishReason::StopToken(token) => json!(token),
                FinishReason::Eos | FinishReason::Length => Value::Null,
            };
            (json!(reason.openai_name()), stop_reason)
        }
    }
}

/// A logprob as JSON: -inf (a token the sampler ruled out) becomes -9999, as in vLLM.
fn logprob_value(logprob: f32) -> f64 {
    if logprob.is_finite() {
        f64::from(logprob)
    } else {
        -9999.0
    }
}

/// How a token is named in logprobs: its text, or `token_id:N` when asked.
fn token_label(codec: &TextCodec, token: u32, as_id: bool) -> String {
    if as_id {
        format!("token_id:{token}")
    } else {
        codec.token_text(token)
    }
}

/// Chat `logprobs.content` entries for `tokens`.
pub fn chat_logprobs_json(
    codec: &TextCodec,
    tokens: &[(u32, TokenLogprobs)],
    as_ids: bool,
) -> Value {
    let entry = |logprob: &TokenLogprob| {
        json!({
            "token": token_label(codec, logprob.token, as_ids),
            "logprob": logprob_value(logprob.logprob),
            "bytes": codec.token_bytes(logprob.token),
        })
    };
    let content: Vec<Value> = tokens
        .iter()
        .map(|(_, logprobs)| {
            let mut value = entry(&logprobs.chosen);
            value["top_logprobs"] = logprobs.top.iter().map(entry).collect();
            value
        })
        .collect();
    json!({ "content": content })
}

/// Completions `logprobs` (the legacy format) for `tokens`; offsets start at `offset`.
pub fn completion_logprobs_json(
    codec: &TextCodec,
    tokens: &[(u32, TokenLogprobs)],
    mut offset: usize,
    as_ids: bool,
) -> Value {
    let mut texts = Vec::with_capacity(tokens.len());
    let mut token_logprobs = Vec::with_capacity(tokens.len());
    let mut top_logprobs = Vec::with_capacity(tokens.len());
    let mut text_offset = Vec::with_capacity(tokens.len());
    for (token, logprobs) in tokens {
        text_offset.push(offset);
        offset += codec.token_text(*token).len();
        texts.push(token_label(codec, *token, as_ids));
        token_logprobs.push(logprob_value(logprobs.chosen.logprob));
        // Tokens whose text is the same (partial characters) share a key: keep the likeliest.
        let mut top = serde_json::Map::new();
        for alt in &logprobs.top {
            top.entry(token_label(codec, alt.token, as_ids))
                .or_insert_with(|| json!(logprob_value(alt.logprob)));
        }
        top_logprobs.push(Value::Object(top));
    }
    json!({
        "tokens": texts,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": text_offset,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context<'a>(codec: &'a TextCodec, config: &'a GenerationConfig) -> ValidationContext<'a> {
        ValidationContext {
            codec,
            generation_config: config,
            max_model_len: 16,
            vocab_size: 256,
            max_num_seqs: 4,
            priority_scheduling: false,
        }
    }

    #[test]
    fn prompts_come_in_four_shapes() {
        let codec = TextCodec::Bytes { vocab_size: 256 };
        let config = GenerationConfig::default();
        let ctx = context(&codec, &config);
        let parse = |v: Value| parse_prompts(Some(&v), "prompt", &ctx);
        assert_eq!(parse(json!("ab")).unwrap(), vec![vec![97, 98]]);
        assert_eq!(parse(json!(["a", "b"])).unwrap(), vec![vec![97], vec![98]]);
        assert_eq!(parse(json!([1, 2])).unwrap(), vec![vec![1, 2]]);
        assert_eq!(
            parse(json!([[1], [2, 3]])).unwrap(),
            vec![vec![1], vec![2, 3]]
        );
        assert!(parse(json!([300])).is_err());
        assert!(parse(json!([-1])).is_err());
        assert!(parse(json!({"a": 1})).is_err());
        assert!(parse(json!([])).is_err());
    }

    #[test]
    fn max_tokens_defaults_to_the_rest_of_the_context_and_is_checked() {
        let codec = TextCodec::Bytes { vocab_size: 256 };
        let config = GenerationConfig::default();
        let ctx = context(&codec, &config);
        let fields = SamplingFields::default();
        let plan = plan_generation(vec![vec![1; 6]], "prompt", &fields, None, None, &ctx).unwrap();
        assert_eq!(plan.requests[0].max_tokens, 10);
        let over = plan_generation(
            vec![vec![1; 6]],
            "prompt",
            &fields,
            Some((11, "max_tokens")),
            None,
            &ctx,
        )
        .unwrap_err();
        assert_eq!(over.detail.param.as_deref(), Some("max_tokens"));
        let too_long =
            plan_generation(vec![vec![1; 16]], "prompt", &fields, None, None, &ctx).unwrap_err();
        assert_eq!(too_long.detail.param.as_deref(), Some("prompt"));
    }

    #[test]
    fn bad_sampling_values_name_their_field() {
        let codec = TextCodec::Bytes { vocab_size: 256 };
        let config = GenerationConfig::default();
        let ctx = context(&codec, &config);
        let fields = SamplingFields {
            top_p: Some(1.5),
            ..SamplingFields::default()
        };
        let error =
            plan_generation(vec![vec![1]], "prompt", &fields, None, None, &ctx).unwrap_err();
        assert_eq!(error.detail.param.as_deref(), Some("top_p"));
        let fields = SamplingFields {
            priority: Some(3),
            ..SamplingFields::default()
        };
        let error =
            plan_generation(vec![vec![1]], "prompt", &fields, None, None, &ctx).unwrap_err();
        assert_eq!(error.detail.param.as_deref(), Some("priority"));
    }
}

/// `POST /v1/consensus` (docs/consensus.md): proposals as texts (embedded by the served
/// encoder) or as embeddings, optional agents' preferences, and how the game is played.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsensusRequestBody {
    /// The model to use (only checked against the served one).
    pub model: Option<String>,
    /// Proposals as texts: a list of strings (or of token-id lists); needs an encoder model.
    pub proposals: Option<Value>,
    /// Proposals as embeddings [K][D].
    pub embeddings: Option<Vec<Vec<f32>>>,
    /// Agents' preferences [N][K]; default: each proposal is one agent's, who prefers
    /// proposals similar to its own.
    pub preferences: Option<Vec<Vec<f32>>>,
    /// `hedge` (default), `optimistic_hedge`, `replicator` or `fictitious_play`.
    pub method: Option<String>,
    /// λ, the weight of agreeing with the others (default 1).
    pub lambda: Option<f32>,
    /// Iterations of the dynamics (default 200, at most 100000).
    pub iterations: Option<usize>,
    /// Step size (default 0.5).
    pub eta: Option<f32>,
    /// Include the K×K cosine similarity matrix in the response.
    #[serde(default)]
    pub include_similarity: bool,
}
