//! Errors: [`ServerError`] for everything that stops the server from starting or running, and
//! [`ApiError`], the OpenAI-shaped JSON error (`{"error": {"message", "type", "param",
//! "code"}}`) every failed HTTP request answers with.

use std::net::SocketAddr;
use std::path::PathBuf;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// What can stop `kiln serve` from starting, or end it.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// No model directory was given and the default one was not found.
    #[error(
        "no --model given and the default model directory `models/default` was not found \
         (looked in: {}); pass --model DIR",
        .searched.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    DefaultModelMissing {
        /// Every directory that was tried.
        searched: Vec<PathBuf>,
    },
    /// The model directory given does not exist or has no config.json.
    #[error("model directory {path}: {message}")]
    ModelDir {
        /// The directory.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// config.json names a model family kiln has no program for.
    #[error(
        "{path}: no kiln program for model_type `{model_type}`; kiln serves llama, mistral, \
         qwen2, gpt2 (text generation) and bert (embeddings)"
    )]
    UnknownModelType {
        /// The config.json.
        path: PathBuf,
        /// Its `model_type`.
        model_type: String,
    },
    /// The model program did not lower against the checkpoint's config.json.
    #[error("lowering {program} for {dir}:\n{diagnostics}")]
    Lowering {
        /// The program (e.g. `models/llama.kiln`).
        program: String,
        /// The model directory.
        dir: PathBuf,
        /// The rendered diagnostics.
        diagnostics: String,
    },
    /// Loading or running the checkpoint failed.
    #[error(transparent)]
    Runtime(#[from] kiln_runtime::RuntimeError),
    /// The tokenizer files could not be loaded.
    #[error(transparent)]
    Tokenizer(#[from] kiln_runtime::TokenizerError),
    /// An encoder could not be prepared for embeddings.
    #[error(transparent)]
    Embedding(#[from] kiln_runtime::EmbedError),
    /// A KV-cache sizing problem, in particular `max_model_len` not fitting the cache.
    #[error(transparent)]
    KvCache(#[from] kiln_kvcache::KvCacheError),
    /// The KV cache sized from the memory budget cannot hold one `max_model_len` sequence.
    #[error("refusing to start: {check}. {hint}")]
    KvCacheTooSmall {
        /// The sizing check's error, naming both token counts.
        check: kiln_kvcache::KvCacheError,
        /// How the budget was computed and which flag changes it.
        hint: String,
    },
    /// The scheduler refused its configuration.
    #[error(transparent)]
    Scheduler(#[from] kiln_scheduler::SchedulerError),
    /// A command-line or configuration value is unusable.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// The API key file could not be read.
    #[error("reading the API key file {path}: {source}")]
    ApiKeyFile {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The listening socket could not be opened.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The HTTP server failed while running.
    #[error("serving on {addr}: {source}")]
    Serve {
        /// The address served on.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The engine thread could not be started or panicked.
    #[error("engine thread: {0}")]
    Engine(String),
}

/// The body of an OpenAI error response.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ErrorDetail {
    /// What went wrong, for a person.
    pub message: String,
    /// The error class (`invalid_request_error`, ...).
    #[serde(rename = "type")]
    pub kind: String,
    /// The request field at fault, when there is one.
    pub param: Option<String>,
    /// A machine-readable code, when there is one.
    pub code: Option<String>,
}

/// An HTTP error in OpenAI's shape, with its status.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// The JSON error object.
    pub detail: ErrorDetail,
}

impl ApiError {
    fn new(status: StatusCode, kind: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            detail: ErrorDetail {
                message: message.into(),
                kind: kind.to_string(),
                param: None,
                code: None,
            },
        }
    }

    /// 400: the request body or one of its fields is invalid.
    pub fn invalid_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 400 naming the field at fault.
    pub fn invalid_param(param: &str, message: impl Into<String>) -> ApiError {
        ApiError::invalid_request(message).with_param(param)
    }

    /// 401: the API key is missing or wrong.
    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "invalid_request_error", message)
            .with_code("invalid_api_key")
    }

    /// 404: no such model.
    pub fn model_not_found(model: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("The model `{model}` does not exist."),
        )
        .with_param("model")
        .with_code("model_not_found")
    }

    /// 404: no such route.
    pub fn route_not_found(method: &str, path: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("Invalid URL ({method} {path})"),
        )
        .with_code("unknown_url")
    }

    /// 429: the waiting queue is full; retry later.
    pub fn queue_full(limit: usize) -> ApiError {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_exceeded",
            format!("the server's waiting queue is full ({limit} requests); retry later"),
        )
        .with_code("rate_limit_exceeded")
    }

    /// 503: the server cannot take requests (shutting down, or the engine stopped).
    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            message,
        )
    }

    /// 500: a fault of the server, never of the request.
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", message)
    }

    /// The same error with `param` set.
    pub fn with_param(mut self, param: &str) -> ApiError {
        self.detail.param = Some(param.to_string());
        self
    }

    /// The same error with `code` set.
    pub fn with_code(mut self, code: &str) -> ApiError {
        self.detail.code = Some(code.to_string());
        self
    }

    /// The JSON body, `{"error": {...}}`.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({ "error": self.detail })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}
