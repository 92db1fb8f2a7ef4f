//! The HTTP surface on axum: routes, API-key check, body parsing that maps every rejection to
//! an OpenAI 400, the generation handlers (JSON and server-sent events), embeddings,
//! consensus decisions, models, health and metrics.
//!
//! Streaming follows OpenAI's format: `data: {chunk}` events and a final `data: [DONE]`. A
//! chunk is sent only when a choice has text to show or finishes, so no chunk with empty
//! content precedes the first real token; logprobs of tokens whose text is still held back
//! ride on the next chunk. With `stream_options.include_usage` every chunk has `"usage": null`
//! and a last chunk with no choices carries the token counts.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use kiln_runtime::sampling::{FinishReason, TokenLogprobs};
use kiln_runtime::GenerationConfig;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tokio::sync::Semaphore;

use crate::codec::TextCodec;
use crate::engine::{EngineFailure, EngineHandle, RequestEvent, RequestStream, SubmitError};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::protocol::{
    chat_logprobs_json, completion_logprobs_json, finish_json, parse_prompts, plan_generation,
    usage_json, ChatRequest, CompletionRequest, ConsensusRequestBody, EmbeddingRequest,
    GenerationPlan, ValidationContext,
};
use crate::runner::Embedder;
use kiln_runtime::models::ModelKind;

/// Everything the handlers share.
#[derive(Debug)]
pub(crate) struct AppState {
    pub(crate) model_name: String,
    pub(crate) model_root: String,
    pub(crate) model_type: String,
    pub(crate) kind: ModelKind,
    pub(crate) codec: TextCodec,
    pub(crate) generation_config: GenerationConfig,
    pub(crate) max_model_len: usize,
    pub(crate) vocab_size: usize,
    pub(crate) max_num_seqs: usize,
    pub(crate) priority_scheduling: bool,
    pub(crate) engine: Option<EngineHandle>,
    pub(crate) embedder: Option<Embedder>,
    pub(crate) embedding_slots: Semaphore,
    /// Where consensus requests run (one at a time: the solver keeps its compiled programs).
    pub(crate) consensus: Arc<std::sync::Mutex<kiln_runtime::consensus::ConsensusSolver>>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) api_keys: Vec<String>,
    pub(crate) created: u64,
    pub(crate) next_response_id: AtomicU64,
}

impl AppState {
    fn validation_context(&self) -> ValidationContext<'_> {
        ValidationContext {
            codec: &self.codec,
            generation_config: &self.generation_config,
            max_model_len: self.max_model_len,
            vocab_size: self.vocab_size,
            max_num_seqs: self.max_num_seqs,
            priority_scheduling: self.priority_scheduling,
        }
    }

    /// 404 unless `model` is absent or names the served model.
    fn check_model(&self, model: Option<&str>) -> Result<(), ApiError> {
        match model {
            Some(name) if name != self.model_name => Err(ApiError::model_not_found(name)),
            _ => Ok(()),
        }
    }

    /// The engine, or a 400 when the model is an encoder.
    fn generation_engine(&self) -> Result<&EngineHandle, ApiError> {
        match (&self.engine, self.kind) {
            (Some(engine), ModelKind::Decoder) => Ok(engine),
            _ => Err(ApiError::invalid_request(format!(
                "`{}` is an embedding model (model_type {}): it serves /v1/embeddings only",
                self.model_name, self.model_type
            ))
            .with_param("model")),
        }
    }

    fn new_response_id(&self, prefix: &str) -> String {
        let serial = self.next_response_id.fetch_add(1, Ordering::Relaxed);
        format!("{prefix}-{:x}{serial:06x}", self.created)
    }
}

/// The router over `state`.
pub(crate) fn router(state: Arc<AppState>) -> Router {
    let api = Router::new()
        .route("/v1/models", get(list_models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/consensus", post(consensus))
        .route_layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            require_api_key,
        ));
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .merge(api)
        .fallback(route_not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Compares without an early exit, so timing tells nothing about a key's prefix.
fn same_key(presented: &[u8], key: &[u8]) -> bool {
    presented.len() == key.len()
        && presented
            .iter()
            .zip(key)
            .fold(0u8, |diff, (a, b)| diff | (a ^ b))
            == 0
}

async fn require_api_key(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    if state.api_keys.is_empty() {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::trim);
    match presented {
        None => ApiError::unauthorized("missing API key: send it as `Authorization: Bearer <key>`")
            .into_response(),
        Some(key)
            if state
                .api_keys
                .iter()
                .any(|k| same_key(key.as_bytes(), k.as_bytes())) =>
        {
            next.run(request).await
        }
        Some(_) => ApiError::unauthorized("incorrect API key").into_response(),
    }
}

async fn route_not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::route_not_found(method.as_str(), uri.path())
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        ..ApiError::invalid_request(format!(
            "{} does not accept {}",
            uri.path(),
            method.as_str()
        ))
    }
}

/// Parses a JSON body whatever its content type; every failure is an OpenAI 400 (or 413
/// for a body over the size limit).
fn parse_body<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let bytes = body.map_err(|rejection| {
        let status = rejection.status();
        let error = ApiError::invalid_request(format!("reading the request body: {rejection}"));
        ApiError { status, ..error }
    })?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::invalid_request(
            "the request body is empty; send a JSON object",
        ));
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::invalid_request(format!("invalid JSON body: {e}")))
}

fn respond(result: Result<Response, ApiError>) -> Response {
    result.unwrap_or_else(IntoResponse::into_response)
}

async fn health(State(state): State<Arc<AppState>>) -> Response {
    match &state.engine {
        Some(engine) if !engine.is_alive() => {
            ApiError::unavailable("the engine thread has stopped").into_response()
        }
        _ => Json(json!({})).into_response(),
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        state.metrics.render(),
    )
        .into_response()
}

async fn list_models(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": state.model_name,
            "object": "model",
            "created": state.created,
            "owned_by": "kiln",
            "root": state.model_root,
            "parent": null,
            "max_model_len": state.max_model_len,
        }],
    }))
}

/// Which response format a generation answers in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Endpoint {
    Completion,
    Chat,
}

/// `id`, `created` and `model` of a response.
#[derive(Clone, Debug)]
struct ResponseMeta {
    id: String,
    created: u64,
    model: String,
}

async fn completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    respond(completions_inner(&state, body).await)
}

async fn completions_inner(
    state: &Arc<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request: CompletionRequest = parse_body(body)?;
    state.check_model(request.sampling.model.as_deref())?;
    let engine = state.generation_engine()?;
    let context = state.validation_context();
    let prompts = parse_prompts(request.prompt.as_ref(), "prompt", &context)?;
    let max_tokens = request.sampling.max_tokens.map(|v| (v, "max_tokens"));
    let logprobs = request
        .logprobs
        .map(|k| usize::try_from(k).unwrap_or(usize::MAX));
    let plan = plan_generation(
        prompts,
        "prompt",
        &request.sampling,
        max_tokens,
        logprobs,
        &context,
    )?;
    generate(state, engine, plan, Endpoint::Completion).await
}

async fn chat_completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    respond(chat_inner(&state, body).await)
}

async fn chat_inner(
    state: &Arc<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request: ChatRequest = parse_body(body)?;
    state.check_model(request.sampling.model.as_deref())?;
    let engine = state.generation_engine()?;
    let messages = request
        .messages
        .as_deref()
        .filter(|messages| !messages.is_empty())
        .ok_or_else(|| {
            ApiError::invalid_param("messages", "`messages` must be a non-empty list")
        })?;
    if !state.codec.has_chat_template() {
        return Err(ApiError::invalid_request(format!(
            "`{}` has no chat template (no chat_template.jinja and no `chat_template` in \
             tokenizer_config.json), so chat requests cannot be rendered; use /v1/completions",
            state.model_name
        )));
    }
    let prompt = state
        .codec
        .encode_chat(messages)
        .map_err(|e| ApiError::invalid_param("messages", e.to_string()))?;
    let max_tokens = request
        .max_completion_tokens
        .map(|v| (v, "max_completion_tokens"))
        .or(request.sampling.max_tokens.map(|v| (v, "max_tokens")));
    if request.top_logprobs.is_some_and(|k| k > 0) && request.logprobs != Some(true) {
        return Err(ApiError::invalid_param(
            "top_logprobs",
            "`top_logprobs` needs `logprobs: true`",
        ));
    }
    let logprobs = (request.logprobs == Some(true)).then(|| {
        request
            .top_logprobs
            .map_or(0, |k| usize::try_from(k).unwrap_or(usize::MAX))
    });
    let context = state.validation_context();
    let plan = plan_generation(
        vec![prompt],
        "messages",
        &request.sampling,
        max_tokens,
        logprobs,
        &context,
    )?;
    generate(state, engine, plan, Endpoint::Chat).await
}

/// The HTTP answer for an engine failure: the scheduler's refusals are the request's fault
/// (400, or 429 for a full queue); model failures are the server's (500).
fn failure_error(failure: EngineFailure) -> ApiError {
    match failure {
        EngineFailure::Rejected(kiln_scheduler::SchedulerError::QueueFull { limit }) => {
            ApiError::queue_full(limit)
        }
        EngineFailure::Rejected(error) if error.is_invalid_request() => {
            ApiError::invalid_request(error.to_string())
        }
        EngineFailure::ShuttingDown => ApiError::unavailable(failure.to_string()),
        other => ApiError::internal(other.to_string()),
    }
}

/// Submits the plan and answers as JSON or as a stream.
async fn generate(
    state: &Arc<AppState>,
    engine: &EngineHandle,
    plan: GenerationPlan,
    endpoint: Endpoint,
) -> Result<Response, ApiError> {
    let stream = engine
        .submit(plan.requests.clone())
        .map_err(|error| match error {
            SubmitError::QueueFull { limit } => ApiError::queue_full(limit),
            SubmitError::Stopped => ApiError::unavailable("the engine is not running"),
        })?;
    let meta = ResponseMeta {
        id: state.new_response_id(match endpoint {
            Endpoint::Completion => "cmpl",
            Endpoint::Chat => "chatcmpl",
        }),
        created: unix_now(),
        model: state.model_name.clone(),
    };
    if plan.stream {
        return Ok(stream_response(state, stream, plan, meta, endpoint));
    }
    let choices = collect(stream, &plan).await?;
    Ok(Json(complete_json(state, &plan, &meta, endpoint, &choices)).into_response())
}

/// One choice of a non-streamed answer.
#[derive(Debug, Default)]
struct CollectedChoice {
    text: String,
    num_tokens: usize,
    logprobs: Vec<(u32, TokenLogprobs)>,
    finish: Option<FinishReason>,
}

async fn collect(
    mut stream: RequestStream,
    plan: &GenerationPlan,
) -> Result<Vec<CollectedChoice>, ApiError> {
    let mut choices: Vec<CollectedChoice> = (0..plan.num_choices())
        .map(|_| CollectedChoice::default())
        .collect();
    let mut finished = 0;
    while finished < choices.len() {
        match stream.next().await {
            Some(RequestEvent::Token(event)) => {
                let choice = &mut choices[event.prompt_index * plan.n + event.sample_index];
                choice.text.push_str(&event.text);
                choice.num_tokens += 1;
                if let Some(logprobs) = event.logprobs {
                    choice.logprobs.push((event.token_id, logprobs));
                }
                if event.finish.is_some() {
                    choice.finish = event.finish;
                    finished += 1;
                }
            }
            Some(RequestEvent::Failed { failure, .. }) => return Err(failure_error(failure)),
            None => {
                return Err(ApiError::internal(
                    "the engine stopped before the request finished",
                ))
            }
        }
    }
    Ok(choices)
}

fn complete_json(
    state: &AppState,
    plan: &GenerationPlan,
    meta: &ResponseMeta,
    endpoint: Endpoint,
    choices: &[CollectedChoice],
) -> Value {
    let completion_tokens: usize = choices.iter().map(|c| c.num_tokens).sum();
    let choices: Vec<Value> = choices
        .iter()
        .enumerate()
        .map(|(index, choice)| {
            let (finish_reason, stop_reason) = finish_json(choice.finish.as_ref());
            match endpoint {
                Endpoint::Completion => json!({
                    "index": index,
                    "text": choice.text,
                    "logprobs": plan.logprobs.map(|_| completion_logprobs_json(&state.codec, &choice.logprobs, 0, plan.tokens_as_ids)),
                    "finish_reason": finish_reason,
                    "stop_reason": stop_reason,
                }),
                Endpoint::Chat => json!({
                    "index": index,
                    "message": {"role": "assistant", "content": choice.text},
                    "logprobs": plan.logprobs.map(|_| chat_logprobs_json(&state.codec, &choice.logprobs, plan.tokens_as_ids)),
                    "finish_reason": finish_reason,
                    "stop_reason": stop_reason,
                }),
            }
        })
        .collect();
    json!({
        "id": meta.id,
        "object": match endpoint {
            Endpoint::Completion => "text_completion",
            Endpoint::Chat => "chat.completion",
        },
        "created": meta.created,
        "model": meta.model,
        "choices": choices,
        "usage": usage_json(plan.prompt_tokens(), completion_tokens),
    })
}

/// Per-choice state of a streamed answer.
#[derive(Debug, Default)]
struct StreamChoice {
    role_sent: bool,
    text_len: usize,
    num_tokens: usize,
    held_logprobs: Vec<(u32, TokenLogprobs)>,
}

/// A streamed answer in progress: events in, SSE frames out.
struct EventStream {
    events: RequestStream,
    codec: TextCodec,
    meta: ResponseMeta,
    endpoint: Endpoint,
    n: usize,
    logprobs: bool,
    tokens_as_ids: bool,
    include_usage: bool,
    prompt_tokens: usize,
    choices: Vec<StreamChoice>,
    finished: usize,
    frames: VecDeque<Bytes>,
    done: bool,
}

impl EventStream {
    fn frame(&mut self, value: &Value) {
        self.frames
            .push_back(Bytes::from(format!("data: {value}\n\n")));
    }

    fn chunk(&mut self, choice: Value) -> Value {
        let mut chunk = json!({
            "id": self.meta.id,
            "object": match self.endpoint {
                Endpoint::Completion => "text_completion",
                Endpoint::Chat => "chat.completion.chunk",
            },
            "created": self.meta.created,
            "model": self.meta.model,
            "choices": [choice],
        });
        if self.include_usage {
            chunk["usage"] = Value::Null;
        }
        chunk
    }

    /// Turns one engine event into frames; sets `done` after the last.
    fn on_event(&mut self, event: Option<RequestEvent>) {
        let event = match event {
            Some(RequestEvent::Token(event)) => event,
            Some(RequestEvent::Failed { failure, .. }) => {
                return self.fail(failure_error(failure));
            }
            None => {
                return self.fail(ApiError::internal(
                    "the engine stopped before the request finished",
                ))
            }
        };
        let index = event.prompt_index * self.n + event.sample_index;
        let Some(choice) = self.choices.get_mut(index) else {
            return;
        };
        choice.num_tokens += 1;
        if let Some(logprobs) = event.logprobs {
            choice.held_logprobs.push((event.token_id, logprobs));
        }
        if event.text.is_empty() && event.finish.is_none() {
            return;
        }
        let logprobs = std::mem::take(&mut choice.held_logprobs);
        let offset = choice.text_len;
        choice.text_len += event.text.len();
        let first = !std::mem::replace(&mut choice.role_sent, true);
        let (finish_reason, stop_reason) = finish_json(event.finish.as_ref());
        let body = match self.endpoint {
            Endpoint::Completion => json!({
                "index": index,
                "text": event.text,
                "logprobs": self.logprobs.then(|| completion_logprobs_json(&self.codec, &logprobs, offset, self.tokens_as_ids)),
                "finish_reason": finish_reason,
                "stop_reason": stop_reason,
            }),
            Endpoint::Chat => {
                let mut delta = serde_json::Map::new();
                if first {
                    delta.insert("role".into(), json!("assistant"));
                }
                if !event.text.is_empty() {
                    delta.insert("content".into(), json!(event.text));
                }
                json!({
                    "index": index,
                    "delta": delta,
                    "logprobs": self.logprobs.then(|| chat_logprobs_json(&self.codec, &logprobs, self.tokens_as_ids)),
                    "finish_reason": finish_reason,
                    "stop_reason": stop_reason,
                })
            }
        };
        let chunk = self.chunk(body);
        self.frame(&chunk);
        if event.finish.is_some() {
            self.finished += 1;
            if self.finished == self.choices.len() {
                self.finish();
            }
        }
    }

    fn finish(&mut self) {
        if self.include_usage {
            let completion_tokens = self.choices.iter().map(|c| c.num_tokens).sum();
            let chunk = json!({
                "id": self.meta.id,
                "object": match self.endpoint {
                    Endpoint::Completion => "text_completion",
                    Endpoint::Chat => "chat.completion.chunk",
                },
                "created": self.meta.created,
                "model": self.meta.model,
                "choices": [],
                "usage": usage_json(self.prompt_tokens, completion_tokens),
            });
            self.frame(&chunk);
        }
        self.frames
            .push_back(Bytes::from_static(b"data: [DONE]\n\n"));
        self.done = true;
    }

    fn fail(&mut self, error: ApiError) {
        let body = error.body();
        self.frame(&body);
        self.frames
            .push_back(Bytes::from_static(b"data: [DONE]\n\n"));
        self.done = true;
    }
}

fn stream_response(
    state: &AppState,
    events: RequestStream,
    plan: GenerationPlan,
    meta: ResponseMeta,
    endpoint: Endpoint,
) -> Response {
    let stream = EventStream {
        events,
        codec: state.codec.clone(),
        meta,
        endpoint,
        n: plan.n,
        logprobs: plan.logprobs.is_some(),
        tokens_as_ids: plan.tokens_as_ids,
        include_usage: plan.include_usage,
        prompt_tokens: plan.prompt_tokens(),
        choices: (0..plan.num_choices())
            .map(|_| StreamChoice::default())
            .collect(),
        finished: 0,
        frames: VecDeque::new(),
        done: false,
    };
    // Dropping the body (the client went away) drops the RequestStream, which aborts the
    // request in the engine and frees its blocks.
    let body = futures_util::stream::unfold(stream, |mut stream| async move {
        loop {
            if let Some(frame) = stream.frames.pop_front() {
                return Some((Ok::<Bytes, Infallible>(frame), stream));
            }
            if stream.done {
                return None;
            }
            let event = stream.events.next().await;
            stream.on_event(event);
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(body))
        .unwrap_or_else(|e| ApiError::internal(e.to_string()).into_response())
}

async fn embeddings(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    respond(embeddings_inner(&state, body).await)
}

async fn embeddings_inner(
    state: &Arc<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request: EmbeddingRequest = parse_body(body)?;
    state.check_model(request.model.as_deref())?;
    let Some(embedder) = served_encoder(state) else {
        return Err(ApiError::invalid_request(format!(
            "`{}` is a text-generation model (model_type {}): it serves /v1/completions \
             and /v1/chat/completions; /v1/embeddings needs an encoder model such as bert",
            state.model_name, state.model_type
        ))
        .with_param("model"));
    };
    let base64 = match request.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::invalid_param(
                "encoding_format",
                format!("`encoding_format` must be `float` or `base64`, got `{other}`"),
            ))
        }
    };
    let context = state.validation_context();
    let inputs = parse_prompts(request.input.as_ref(), "input", &context)?;
    for input in &inputs {
        if input.is_empty() {
            return Err(ApiError::invalid_param("input", "an input is empty"));
        }
        // An encoder generates nothing, so the whole context is the input's.
        if input.len() > state.max_model_len {
            return Err(ApiError::invalid_param(
                "input",
                format!(
                    "an input is {} tokens long, but this model takes at most {} \
                     (max_model_len)",
                    input.len(),
                    state.max_model_len
                ),
            )
            .with_code("context_length_exceeded"));
        }
    }
    let prompt_tokens: usize = inputs.iter().map(Vec::len).sum();
    let vectors = on_embedding_slot(state, "embedding", move || embedder.embed(&inputs)).await?;
    let data: Vec<Value> = vectors
        .iter()
        .enumerate()
        .map(|(index, vector)| {
            let embedding = if base64 {
                json!(base64_f32(vector))
            } else {
                json!(vector)
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    Ok(Json(json!({
        "object": "list",
        "data": data,
        "model": state.model_name,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }))
    .into_response())
}

/// The served model's embedder, when it is an encoder.
fn served_encoder(state: &AppState) -> Option<Embedder> {
    match (&state.embedder, state.kind) {
        (Some(embedder), ModelKind::Encoder) => Some(embedder.clone()),
        _ => None,
    }
}

/// Runs blocking `work` (named `what` in errors) on a thread of its own while holding one of
/// the embedding slots, which bound how many such jobs run at once.
async fn on_embedding_slot<T, E>(
    state: &AppState,
    what: &str,
    work: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, ApiError>
where
    T: Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    let _slot = state
        .embedding_slots
        .acquire()
        .await
        .map_err(|_| ApiError::unavailable("the server is shutting down"))?;
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError::internal(format!("the {what} task failed: {e}")))?
        .map_err(|e| ApiError::internal(e.to_string()))
}

/// Little-endian f32 bytes in standard base64 (OpenAI's `encoding_format: base64`).
fn base64_f32(values: &[f32]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for group in bytes.chunks(3) {
        let b = [
            group[0],
            *group.get(1).unwrap_or(&0),
            *group.get(2).unwrap_or(&0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= group.len() {
                out.push(char::from(ALPHABET[(n >> shift & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The most proposals, agents and iterations one consensus request may ask for (the game runs
/// on the interpreter, and the work grows with their product).
const CONSENSUS_MAX_PROPOSALS: usize = 256;
const CONSENSUS_MAX_AGENTS: usize = 256;
const CONSENSUS_MAX_ITERATIONS: usize = 100_000;

async fn consensus(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    respond(consensus_inner(&state, body).await)
}

async fn consensus_inner(
    state: &Arc<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    use kiln_runtime::consensus::{ConsensusRequest, Method};
    let request: ConsensusRequestBody = parse_body(body)?;
    state.check_model(request.model.as_deref())?;
    let method = match request.method.as_deref() {
        None => Method::Hedge,
        Some(name) => Method::from_name(name).ok_or_else(|| {
            ApiError::invalid_param(
                "method",
                format!("unknown method `{name}`; kiln knows {}", Method::names()),
            )
        })?,
    };
    let iterations = request.iterations.unwrap_or(200);
    if !(1..=CONSENSUS_MAX_ITERATIONS).contains(&iterations) {
        return Err(ApiError::invalid_param(
            "iterations",
            format!(
                "`iterations` must be between 1 and {CONSENSUS_MAX_ITERATIONS}, got {iterations}"
            ),
        ));
    }
    let (texts, embeddings) = match (&request.proposals, request.embeddings) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid_request(
                "give the proposals either as `proposals` (texts) or as `embeddings`, not both",
            ))
        }
        (None, None) => {
            return Err(ApiError::invalid_request(
                "`proposals` (texts) or `embeddings` is required",
            )
            .with_param("proposals"))
        }
        (None, Some(embeddings)) => (None, embeddings),
        (Some(value), None) => {
            let Some(embedder) = served_encoder(state) else {
                return Err(ApiError::invalid_param(
                    "proposals",
                    format!(
                        "`{}` is not an embedding model, so it cannot embed texts: send \
                         `embeddings`, or serve an encoder such as bert",
                        state.model_name
                    ),
                ));
            };
            let context = state.validation_context();
            let inputs = parse_prompts(Some(value), "proposals", &context)?;
            if inputs.len() > CONSENSUS_MAX_PROPOSALS {
                return Err(ApiError::invalid_param(
                    "proposals",
                    format!(
                        "at most {CONSENSUS_MAX_PROPOSALS} proposals, got {}",
                        inputs.len()
                    ),
                ));
            }
            for input in &inputs {
                if input.is_empty() || input.len() > state.max_model_len {
                    return Err(ApiError::invalid_param(
                        "proposals",
                        format!(
                            "every proposal must be 1 to {} tokens long (max_model_len)",
                            state.max_model_len
                        ),
                    ));
                }
            }
            let vectors =
                on_embedding_slot(state, "embedding", move || embedder.embed(&inputs)).await?;
            (value.as_array().cloned(), vectors)
        }
    };
    if embeddings.len() > CONSENSUS_MAX_PROPOSALS {
        return Err(ApiError::invalid_param(
            "embeddings",
            format!(
                "at most {CONSENSUS_MAX_PROPOSALS} proposals, got {}",
                embeddings.len()
            ),
        ));
    }
    if request
        .preferences
        .as_ref()
        .is_some_and(|p| p.len() > CONSENSUS_MAX_AGENTS)
    {
        return Err(ApiError::invalid_param(
            "preferences",
            format!("at most {CONSENSUS_MAX_AGENTS} agents"),
        ));
    }
    let consensus_request = ConsensusRequest {
        embeddings,
        preferences: request.preferences,
        lambda: request.lambda.unwrap_or(1.0),
        iterations,
        eta: request.eta.unwrap_or(0.5),
        method,
    };
    consensus_request
        .validate()
        .map_err(ApiError::invalid_request)?;
    let solver = Arc::clone(&state.consensus);
    let decision = on_embedding_slot(state, "consensus", move || {
        // A panic while deciding poisons the lock; the solver holds only compiled programs,
        // so the next request may use it.
        let mut solver = solver
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        solver.decide(&consensus_request)
    })
    .await?;
    let mut out = decision.to_json(request.include_similarity);
    out["object"] = json!("consensus");
    out["model"] = json!(state.model_name);
    out["method"] = json!(method.name());
    if let Some(texts) = texts {
        if let Some(text) = texts.get(decision.winner) {
            out["winner_text"] = text.clone();
        }
    }
    Ok(Json(out).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_standard_alphabet() {
        // 1.0f32 = 00 00 80 3f
        assert_eq!(base64_f32(&[1.0]), "AACAPw==");
        assert_eq!(base64_f32(&[]), "");
    }

    #[test]
    fn keys_compare_exactly() {
        assert!(same_key(b"secret", b"secret"));
        assert!(!same_key(b"secret", b"secreT"));
        assert!(!same_key(b"secret", b"secret2"));
    }
}
