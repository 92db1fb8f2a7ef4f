//! Text in and out of token ids for the server: the model directory's `tokenizer.json` (with its
//! chat template) when it has one, else a byte-level fallback (token id = byte value) for
//! checkpoints shipped without a tokenizer, such as the test fixtures.
//!
//! The fallback encodes text as its UTF-8 bytes and decodes ids below 256 back to bytes; ids
//! from 256 up (a model's special tokens) decode to nothing. It has no chat template, so chat
//! requests to such a model are refused with a 400 that says so.

use kiln_runtime::{ChatMessage, IncrementalDecoder, Tokenizer, TokenizerError};

/// How the served model's text becomes token ids and back.
#[derive(Clone, Debug)]
pub enum TextCodec {
    /// A Hugging Face tokenizer (tokenizer.json, tokenizer_config.json, chat template).
    Tokenizer(Tokenizer),
    /// One token per byte; `vocab_size` is the model's (at least 256 for any text to encode).
    Bytes {
        /// The model's vocabulary size.
        vocab_size: usize,
    },
}

impl TextCodec {
    /// A short description for the startup log.
    pub fn describe(&self) -> String {
        match self {
            TextCodec::Tokenizer(tokenizer) => {
                format!("tokenizer.json ({} tokens)", tokenizer.vocab_size())
            }
            TextCodec::Bytes { .. } => {
                "byte-level fallback (no tokenizer.json: token id = byte value)".into()
            }
        }
    }

    /// Encodes a completion prompt, adding the special tokens the tokenizer asks for.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        match self {
            TextCodec::Tokenizer(tokenizer) => tokenizer.encode(text, true),
            TextCodec::Bytes { vocab_size } => text
                .bytes()
                .map(|byte| {
                    let id = u32::from(byte);
                    if (id as usize) < *vocab_size {
                        Ok(id)
                    } else {
                        Err(TokenizerError::Encode(format!(
                            "byte {byte:#04x} is outside this model's {vocab_size}-token vocabulary"
                        )))
                    }
                })
                .collect(),
        }
    }

    /// Whether chat requests can be served (the model has a chat template).
    pub fn has_chat_template(&self) -> bool {
        match self {
            TextCodec::Tokenizer(tokenizer) => tokenizer.chat_template("default").is_some(),
            TextCodec::Bytes { .. } => false,
        }
    }

    /// Renders `messages` with the chat template (generation prompt added) and encodes them.
    pub fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, TokenizerError> {
        match self {
            TextCodec::Tokenizer(tokenizer) => tokenizer.encode_chat(messages, true),
            TextCodec::Bytes { .. } => Err(TokenizerError::NoChatTemplate),
        }
    }

    /// The text of one token on its own (for logprobs).
    pub fn token_text(&self, id: u32) -> String {
        match self {
            TextCodec::Tokenizer(tokenizer) => tokenizer
                .decode(&[id], false)
                .unwrap_or_else(|_| format!("<token {id}>")),
            TextCodec::Bytes { .. } => match u8::try_from(id) {
                Ok(byte) => String::from_utf8_lossy(&[byte]).into_owned(),
                Err(_) => String::new(),
            },
        }
    }

    /// The raw bytes of one token (OpenAI's `bytes` field of chat logprobs).
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        match self {
            TextCodec::Tokenizer(_) => self.token_text(id).into_bytes(),
            TextCodec::Bytes { .. } => u8::try_from(id).map(|b| vec![b]).unwrap_or_default(),
        }
    }

    /// The end-of-sequence id the tokenizer names, if any.
    pub fn eos_token_id(&self) -> Option<u32> {
        match self {
            TextCodec::Tokenizer(tokenizer) => tokenizer.eos_token_id(),
            TextCodec::Bytes { .. } => None,
        }
    }

    /// The longest sequence tokenizer_config.json allows, if it says.
    pub fn model_max_length(&self) -> Option<usize> {
        match self {
            TextCodec::Tokenizer(tokenizer) => tokenizer.config().model_max_length,
            TextCodec::Bytes { .. } => None,
        }
    }

    /// A streaming decoder for the tokens generated after `prompt`.
    pub fn stream_decoder(&self, prompt: &[u32], skip_special_tokens: bool) -> StreamDecoder {
        match self {
            TextCodec::Tokenizer(tokenizer) => {
                StreamDecoder::Tokenizer(tokenizer.incremental_decoder(prompt, skip_special_tokens))
            }
            TextCodec::Bytes { .. } => StreamDecoder::Bytes(ByteDecoder::default()),
        }
    }
}

/// Turns generated ids into text deltas that never split a character.
#[derive(Debug, Clone)]
pub enum StreamDecoder {
    /// The tokenizer's incremental decoder.
    Tokenizer(IncrementalDecoder),
    /// UTF-8 reassembly of byte tokens.
    Bytes(ByteDecoder),
}

impl StreamDecoder {
    /// Adds a token; returns the text that became complete (possibly empty).
    pub fn push(&mut self, token: u32) -> Result<String, TokenizerError> {
        match self {
            StreamDecoder::Tokenizer(decoder) => decoder.push(token),
            StreamDecoder::Bytes(decoder) => Ok(decoder.push(token)),
        }
    }

    /// Releases whatever is held back (an incomplete character comes out as U+FFFD).
    pub fn finish(&mut self) -> Result<String, TokenizerError> {
        match self {
            StreamDecoder::Tokenizer(decoder) => decoder.finish(),
            StreamDecoder::Bytes(decoder) => Ok(decoder.finish()),
        }
    }
}

/// Reassembles UTF-8 from one-byte tokens, holding back an incomplete character.
#[derive(Debug, Clone, Default)]
pub struct ByteDecoder {
    pending: Vec<u8>,
}

impl ByteDecoder {
    /// Adds a byte token (ids from 256 up are special and produce no text).
    pub fn push(&mut self, token: u32) -> String {
        let Ok(byte) = u8::try_from(token) else {
            return String::new();
        };
        self.pending.push(byte);
        let mut text = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(valid) => {
                    text.push_str(valid);
                    self.pending.clear();
                    return text;
                }
                Err(error) => {
                    let valid_up_to = error.valid_up_to();
                    text.push_str(
                        std::str::from_utf8(&self.pending[..valid_up_to])
                            .expect("checked valid prefix"),
                    );
                    match error.error_len() {
                        // Invalid bytes, not just an unfinished character: replace and go on.
                        Some(invalid) => {
                            text.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid_up_to + invalid);
                        }
                        None => {
                            self.pending.drain(..valid_up_to);
                            return text;
                        }
                    }
                }
            }
        }
    }

    /// Releases held-back bytes (lossily).
    pub fn finish(&mut self) -> String {
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_decoder_never_splits_a_character() {
        let mut decoder = ByteDecoder::default();
        let bytes = "aé€".as_bytes();
        let pieces: Vec<String> = bytes.iter().map(|&b| decoder.push(u32::from(b))).collect();
        assert_eq!(pieces, ["a", "", "é", "", "", "€"]);
        assert_eq!(decoder.finish(), "");
    }

    #[test]
    fn byte_decoder_replaces_invalid_bytes_and_flushes_the_rest() {
        let mut decoder = ByteDecoder::default();
        assert_eq!(decoder.push(0xff), "\u{fffd}");
        assert_eq!(decoder.push(u32::from(b'x')), "x");
        assert_eq!(decoder.push(0xe2), "");
        assert_eq!(decoder.push(300), "");
        assert_eq!(decoder.finish(), "\u{fffd}");
    }

    #[test]
    fn byte_codec_round_trips_text() {
        let codec = TextCodec::Bytes { vocab_size: 256 };
        let ids = codec.encode("hi ✓").unwrap();
        assert_eq!(ids.len(), "hi ✓".len());
        let mut decoder = codec.stream_decoder(&[], true);
        let text: String = ids.iter().map(|&id| decoder.push(id).unwrap()).collect();
        assert_eq!(text, "hi ✓");
        assert!(TextCodec::Bytes { vocab_size: 128 }.encode("✓").is_err());
    }
}
