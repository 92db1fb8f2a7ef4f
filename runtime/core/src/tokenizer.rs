//! Text in and out of a Hugging Face model directory: `tokenizer.json` through the
//! `tokenizers` crate, the special tokens and options of `tokenizer_config.json`, the chat
//! template (see [`crate::chat`]), and incremental detokenization for streaming.
//!
//! # Special tokens when encoding
//! `tokenizer.json`'s post-processor decides what `encode(text, true)` adds (Llama 3 and
//! most recent checkpoints put the BOS token there). `tokenizer_config.json`'s
//! `add_bos_token: true` / `add_eos_token: true` are honoured on top of it: the token is
//! added when the post-processor did not already add it. Text rendered by a chat template
//! already carries its special tokens and is encoded without adding any, as transformers'
//! `apply_chat_template` does.
//!
//! # Incremental detokenization
//! [`IncrementalDecoder`] turns a growing sequence of ids into text deltas. It decodes a
//! small window twice — from `prefix_offset` to the last emitted token, and from
//! `prefix_offset` to the newest one — and emits the difference once it is non-empty and
//! does not end in U+FFFD (the replacement character the byte-level decoders produce for an
//! incomplete UTF-8 sequence). Decoding the window rather than the single token keeps
//! context-dependent decoders right (SentencePiece's leading-space handling), and holding
//! back incomplete characters guarantees no delta ever splits a character. Concatenated,
//! the deltas equal the full decode.

use crate::chat::{ChatMessage, ChatTemplate, RenderOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What can go wrong with tokenizer files, encoding, decoding and chat templates.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Load { path: PathBuf, message: String },
    #[error("encoding text: {0}")]
    Encode(String),
    #[error("decoding token ids: {0}")]
    Decode(String),
    #[error("this model has no chat template (no chat_template.jinja and no `chat_template` in tokenizer_config.json)")]
    NoChatTemplate,
    #[error("chat template: {0}")]
    ChatTemplate(String),
    #[error("chat message: {0}")]
    Message(String),
}

/// A special token named by `tokenizer_config.json`, with its id when the vocabulary has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecialToken {
    pub text: String,
    pub id: Option<u32>,
}

/// The settings of `tokenizer_config.json` that matter when running a model.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TokenizerConfig {
    pub bos_token: Option<SpecialToken>,
    pub eos_token: Option<SpecialToken>,
    pub pad_token: Option<SpecialToken>,
    pub unk_token: Option<SpecialToken>,
    /// `Some(true)`: make sure encoded text starts with BOS; `None`: as the post-processor does.
    pub add_bos_token: Option<bool>,
    /// `Some(true)`: make sure encoded text ends with EOS.
    pub add_eos_token: Option<bool>,
    /// The longest sequence the model takes; absent or Hugging Face's "very large" sentinel
    /// reads as `None`.
    pub model_max_length: Option<usize>,
}

struct TokenizerInner {
    tokenizer: tokenizers::Tokenizer,
    config: TokenizerConfig,
    chat_templates: Arc<Vec<(String, ChatTemplate)>>,
}

/// A loaded tokenizer with its configuration and chat templates. Cloning is cheap (shared).
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<TokenizerInner>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("config", &self.inner.config)
            .field(
                "chat_templates",
                &self
                    .inner
                    .chat_templates
                    .iter()
                    .map(|(name, _)| name.as_str())
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json` from `dir`, plus `tokenizer_config.json` and the chat template
    /// (`chat_template.jinja`, `chat_template.json`, or `tokenizer_config.json`'s
    /// `chat_template`) when present.
    pub fn from_dir(dir: &Path) -> Result<Tokenizer, TokenizerError> {
        let tokenizer_json = dir.join("tokenizer.json");
        if !tokenizer_json.exists() {
            return Err(TokenizerError::Load {
                path: tokenizer_json,
                message: "not found: kiln reads Hugging Face fast-tokenizer files (tokenizer.json)"
                    .into(),
            });
        }
        let tokenizer = load_tokenizer_json(&tokenizer_json)?;
        let config_path = dir.join("tokenizer_config.json");
        let config_json = if config_path.exists() {
            Some(read_json(&config_path)?)
        } else {
            None
        };
        let config = config_json
            .as_ref()
            .map(|json| TokenizerConfig::from_json(json, &tokenizer))
            .unwrap_or_default();
        let chat_templates = find_chat_templates(dir, config_json.as_ref())?;
        Ok(Tokenizer {
            inner: Arc::new(TokenizerInner {
                tokenizer,
                config,
                chat_templates: Arc::new(chat_templates),
            }),
        })
    }

    /// Loads a bare `tokenizer.json` with the given configuration and no chat template.
    pub fn from_file(path: &Path, config: TokenizerConfig) -> Result<Tokenizer, TokenizerError> {
        Ok(Tokenizer {
            inner: Arc::new(TokenizerInner {
                tokenizer: load_tokenizer_json(path)?,
                config,
                chat_templates: Arc::default(),
            }),
        })
    }

    pub fn config(&self) -> &TokenizerConfig {
        &self.inner.config
    }

    /// A copy that truncates every encoded text (special tokens included) to at most
    /// `max_length` tokens, dropping tokens from the end as Hugging Face's `longest_first`
    /// truncation does for a single text; `None` turns truncation off. This replaces the
    /// `truncation` section of tokenizer.json.
    pub fn with_truncation(&self, max_length: Option<usize>) -> Result<Tokenizer, TokenizerError> {
        let mut tokenizer = self.inner.tokenizer.clone();
        let params = max_length.map(|max_length| tokenizers::TruncationParams {
            direction: tokenizers::TruncationDirection::Right,
            max_length,
            strategy: tokenizers::TruncationStrategy::LongestFirst,
            stride: 0,
        });
        tokenizer
            .with_truncation(params)
            .map_err(|e| TokenizerError::Encode(format!("setting truncation: {e}")))?;
        Ok(Tokenizer {
            inner: Arc::new(TokenizerInner {
                tokenizer,
                config: self.inner.config.clone(),
                chat_templates: self.inner.chat_templates.clone(),
            }),
        })
    }

    /// The vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.tokenizer.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.tokenizer.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.tokenizer.id_to_token(id)
    }

    /// Whether `id` is an added token marked special (skipped by `decode(.., true)`).
    pub fn is_special(&self, id: u32) -> bool {
        self.inner
            .tokenizer
            .get_added_tokens_decoder()
            .get(&id)
            .is_some_and(|t| t.special)
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        self.inner.config.bos_token.as_ref().and_then(|t| t.id)
    }

    pub fn eos_token_id(&self) -> Option<u32> {
        self.inner.config.eos_token.as_ref().and_then(|t| t.id)
    }

    /// Encodes `text`; with `add_special_tokens`, adds what the post-processor and
    /// `add_bos_token`/`add_eos_token` ask for (see the module docs).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        let encoding = self
            .inner
            .tokenizer
            .encode_fast(text, add_special_tokens)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        let mut ids = encoding.get_ids().to_vec();
        if add_special_tokens {
            let config = &self.inner.config;
            if config.add_bos_token == Some(true) {
                if let Some(bos) = self.bos_token_id() {
                    if ids.first() != Some(&bos) {
                        ids.insert(0, bos);
                    }
                }
            }
            if config.add_eos_token == Some(true) {
                if let Some(eos) = self.eos_token_id() {
                    if ids.last() != Some(&eos) {
                        ids.push(eos);
                    }
                }
            }
        }
        Ok(ids)
    }

    /// Decodes `ids` to text, leaving special tokens out when `skip_special_tokens`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        self.inner
            .tokenizer
            .decode(ids, skip_special_tokens)
            .map_err(|e| TokenizerError::Decode(e.to_string()))
    }

    /// A streaming decoder for the tokens that follow `prompt` (whose last few tokens give
    /// context to the first delta, so a leading space is not lost).
    pub fn incremental_decoder(
        &self,
        prompt: &[u32],
        skip_special_tokens: bool,
    ) -> IncrementalDecoder {
        IncrementalDecoder::new(self.clone(), prompt, skip_special_tokens)
    }

    /// The names of the chat templates, the default one (named "default") first.
    pub fn chat_template_names(&self) -> Vec<&str> {
        self.inner
            .chat_templates
            .iter()
            .map(|(name, _)| name.as_str())
            .collect()
    }

    /// The chat template called `name` ("default" for the main one).
    pub fn chat_template(&self, name: &str) -> Option<&ChatTemplate> {
        self.inner
            .chat_templates
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t)
    }

    /// Renders `messages` with the default chat template, `bos_token` and `eos_token` (and
    /// `pad_token`/`unk_token`) filled in from `tokenizer_config.json`.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        let template = self
            .chat_template("default")
            .ok_or(TokenizerError::NoChatTemplate)?;
        template.render(messages, &self.render_options(add_generation_prompt))
    }

    /// Render options carrying this tokenizer's special tokens.
    pub fn render_options(&self, add_generation_prompt: bool) -> RenderOptions {
        let text = |t: &Option<SpecialToken>| t.as_ref().map(|t| t.text.clone());
        let config = &self.inner.config;
        RenderOptions {
            add_generation_prompt,
            bos_token: text(&config.bos_token),
            eos_token: text(&config.eos_token),
            pad_token: text(&config.pad_token),
            unk_token: text(&config.unk_token),
            extra: serde_json::Map::new(),
        }
    }

    /// Encodes the rendered chat `messages` (without adding special tokens: the template
    /// writes them).
    pub fn encode_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>, TokenizerError> {
        let text = self.apply_chat_template(messages, add_generation_prompt)?;
        self.encode(&text, false)
    }
}

impl TokenizerConfig {
    /// Reads the fields kiln uses from a parsed `tokenizer_config.json`, resolving the
    /// special tokens' ids in `tokenizer`.
    pub fn from_json(
        json: &serde_json::Value,
        tokenizer: &tokenizers::Tokenizer,
    ) -> TokenizerConfig {
        let special = |key: &str| {
            let value = json.get(key)?;
            // A plain string, or an AddedToken object {"content": ..., ...}.
            let text = value
                .as_str()
                .or_else(|| value.get("content").and_then(|c| c.as_str()))?
                .to_string();
            let id = tokenizer.token_to_id(&text);
            Some(SpecialToken { text, id })
        };
        // transformers writes int(1e30) when a tokenizer has no length limit.
        let model_max_length = json
            .get("model_max_length")
            .and_then(|v| v.as_u64().or_else(|| v.as_f64().map(|f| f as u64)))
            .filter(|n| *n < 1_000_000_000_000)
            .map(|n| n as usize);
        TokenizerConfig {
            bos_token: special("bos_token"),
            eos_token: special("eos_token"),
            pad_token: special("pad_token"),
            unk_token: special("unk_token"),
            add_bos_token: json.get("add_bos_token").and_then(|v| v.as_bool()),
            add_eos_token: json.get("add_eos_token").and_then(|v| v.as_bool()),
            model_max_length,
        }
    }
}

/// Loads a tokenizer.json without its `padding` section: kiln encodes one sequence at a time
/// and pads batches itself (all-MiniLM-L6-v2's file pads every text to 128 tokens).
fn load_tokenizer_json(path: &Path) -> Result<tokenizers::Tokenizer, TokenizerError> {
    let mut tokenizer =
        tokenizers::Tokenizer::from_file(path).map_err(|e| TokenizerError::Load {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    tokenizer.with_padding(None);
    Ok(tokenizer)
}

fn read_json(path: &Path) -> Result<serde_json::Value, TokenizerError> {
    let text = std::fs::read_to_string(path).map_err(|source| TokenizerError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| TokenizerError::Load {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// The chat templates of a model directory, by name, "default" first. Precedence as in
/// transformers: `chat_template.jinja`, then `chat_template.json`, then the
/// `chat_template` field of `tokenizer_config.json` (a string, or a list of
/// `{"name", "template"}`).
fn find_chat_templates(
    dir: &Path,
    config: Option<&serde_json::Value>,
) -> Result<Vec<(String, ChatTemplate)>, TokenizerError> {
    let compile = |name: &str, source: &str, path: &Path| {
        ChatTemplate::new(source).map_err(|e| TokenizerError::Load {
            path: path.to_path_buf(),
            message: format!("chat template `{name}`: {e}"),
        })
    };
    let jinja = dir.join("chat_template.jinja");
    if jinja.exists() {
        let source = std::fs::read_to_string(&jinja).map_err(|source| TokenizerError::Io {
            path: jinja.clone(),
            source,
        })?;
        return Ok(vec![(
            "default".into(),
            compile("default", &source, &jinja)?,
        )]);
    }
    let json_file = dir.join("chat_template.json");
    let (field, path) = if json_file.exists() {
        (
            read_json(&json_file)?.get("chat_template").cloned(),
            json_file,
        )
    } else {
        (
            config.and_then(|c| c.get("chat_template")).cloned(),
            dir.join("tokenizer_config.json"),
        )
    };
    let mut templates = Vec::new();
    match field {
        Some(serde_json::Value::String(source)) => {
            templates.push(("default".to_string(), compile("default", &source, &path)?));
        }
        Some(serde_json::Value::Array(items)) => {
            for item in items {
                let (Some(name), Some(source)) = (
                    item.get("name").and_then(|v| v.as_str()),
                    item.get("template").and_then(|v| v.as_str()),
                ) else {
                    return Err(TokenizerError::Load {
                        path,
                        message: "`chat_template` list entries need `name` and `template`".into(),
                    });
                };
                templates.push((name.to_string(), compile(name, source, &path)?));
            }
            templates.sort_by_key(|(name, _)| name != "default");
        }
        _ => {}
    }
    Ok(templates)
}

/// How many prompt tokens give the first generated tokens their decoding context.
const PROMPT_CONTEXT_TOKENS: usize = 5;

/// Streaming detokenization of a growing token sequence (see the module docs).
#[derive(Debug, Clone)]
pub struct IncrementalDecoder {
    tokenizer: Tokenizer,
    skip_special_tokens: bool,
    /// Context tokens and the generated tokens not yet folded away.
    ids: Vec<u32>,
    /// Start of the decode window.
    prefix_offset: usize,
    /// End of the tokens whose text has been emitted.
    read_offset: usize,
}

impl IncrementalDecoder {
    /// A decoder whose first deltas are decoded in the context of `prompt`'s last tokens.
    pub fn new(
        tokenizer: Tokenizer,
        prompt: &[u32],
        skip_special_tokens: bool,
    ) -> IncrementalDecoder {
        let mut context = prompt[prompt.len().saturating_sub(PROMPT_CONTEXT_TOKENS)..].to_vec();
        // A context that ends inside a character would garble the first delta.
        let clean = tokenizer
            .decode(&context, skip_special_tokens)
            .is_ok_and(|text| !text.ends_with(char::REPLACEMENT_CHARACTER));
        if !clean {
            context.clear();
        }
        let read_offset = context.len();
        IncrementalDecoder {
            tokenizer,
            skip_special_tokens,
            ids: context,
            prefix_offset: 0,
            read_offset,
        }
    }

    /// Adds `token` and returns the text that became complete (possibly empty).
    pub fn push(&mut self, token: u32) -> Result<String, TokenizerError> {
        self.ids.push(token);
        self.emit(false)
    }

    /// Returns whatever text is still held back (an incomplete character at the very end
    /// comes out as U+FFFD, as in a full decode).
    pub fn finish(&mut self) -> Result<String, TokenizerError> {
        self.emit(true)
    }

    fn emit(&mut self, final_flush: bool) -> Result<String, TokenizerError> {
        let window = &self.ids[self.prefix_offset..];
        let prefix_text = self.tokenizer.decode(
            &window[..self.read_offset - self.prefix_offset],
            self.skip_special_tokens,
        )?;
        let new_text = self.tokenizer.decode(window, self.skip_special_tokens)?;
        let complete = final_flush || !new_text.ends_with(char::REPLACEMENT_CHARACTER);
        if new_text.len() <= prefix_text.len() || !complete {
            return Ok(String::new());
        }
        let Some(delta) = new_text
            .strip_prefix(prefix_text.as_str())
            .or_else(|| new_text.get(prefix_text.len()..))
        else {
            return Ok(String::new());
        };
        let delta = delta.to_string();
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        // Fold away tokens no window needs any more.
        if self.prefix_offset > 0 {
            self.ids.drain(..self.prefix_offset);
            self.read_offset -= self.prefix_offset;
            self.prefix_offset = 0;
        }
        Ok(delta)
    }
}
