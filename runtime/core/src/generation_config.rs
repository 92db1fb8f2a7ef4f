//! A checkpoint's `generation_config.json`: its end-of-sequence ids and its default
//! sampling parameters.
//!
//! Defaults follow transformers' `generate()`: decoding is greedy unless `do_sample` is
//! true; then the file's `temperature`, `top_k`, `top_p`, `min_p` and
//! `repetition_penalty` apply where present (transformers' implicit `top_k = 50` is not
//! applied: only what the file says counts, as in vLLM).

use crate::sampling::SamplingParams;
use crate::RuntimeError;
use std::path::Path;

/// The fields of `generation_config.json` that kiln uses.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GenerationConfig {
    pub bos_token_id: Option<u32>,
    /// `eos_token_id`, which may be one id or a list.
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    pub do_sample: Option<bool>,
    pub temperature: Option<f32>,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub max_new_tokens: Option<usize>,
}

impl GenerationConfig {
    /// Reads `generation_config.json` from `dir`; without one, takes the token ids from
    /// `config.json`; without either, returns the empty configuration.
    pub fn from_dir(dir: &Path) -> Result<GenerationConfig, RuntimeError> {
        for name in ["generation_config.json", "config.json"] {
            let path = dir.join(name);
            if !path.exists() {
                continue;
            }
            let text = std::fs::read_to_string(&path).map_err(|e| RuntimeError::io(&path, e))?;
            let json: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| RuntimeError::Checkpoint {
                    path: path.clone(),
                    message: e.to_string(),
                })?;
            let mut config = GenerationConfig::from_json(&json);
            if name == "config.json" {
                // config.json's sampling fields are not generation defaults.
                config = GenerationConfig {
                    bos_token_id: config.bos_token_id,
                    eos_token_ids: config.eos_token_ids,
                    pad_token_id: config.pad_token_id,
                    ..GenerationConfig::default()
                };
            }
            return Ok(config);
        }
        Ok(GenerationConfig::default())
    }

    /// Reads the fields from parsed JSON; fields of the wrong type count as absent.
    pub fn from_json(json: &serde_json::Value) -> GenerationConfig {
        let id = |key: &str| json.get(key).and_then(|v| v.as_u64()).map(|v| v as u32);
        let float = |key: &str| json.get(key).and_then(|v| v.as_f64()).map(|v| v as f32);
        let count = |key: &str| json.get(key).and_then(|v| v.as_u64()).map(|v| v as usize);
        let eos_token_ids = match json.get("eos_token_id") {
            Some(serde_json::Value::Array(items)) => items
                .iter()
                .filter_map(|v| v.as_u64())
                .map(|v| v as u32)
                .collect(),
            Some(value) => value.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
            None => Vec::new(),
        };
        GenerationConfig {
            bos_token_id: id("bos_token_id"),
            eos_token_ids,
            pad_token_id: id("pad_token_id"),
            do_sample: json.get("do_sample").and_then(|v| v.as_bool()),
            temperature: float("temperature"),
            top_k: count("top_k"),
            top_p: float("top_p"),
            min_p: float("min_p"),
            repetition_penalty: float("repetition_penalty"),
            max_new_tokens: count("max_new_tokens"),
        }
    }

    /// The default sampling parameters of this checkpoint (see the module docs).
    pub fn sampling_defaults(&self) -> SamplingParams {
        let mut params = SamplingParams::default();
        if self.do_sample != Some(true) {
            params.temperature = 0.0;
        } else if let Some(temperature) = self.temperature {
            params.temperature = temperature;
        }
        if let Some(top_k) = self.top_k {
            params.top_k = top_k;
        }
        if let Some(top_p) = self.top_p {
            params.top_p = top_p;
        }
        if let Some(min_p) = self.min_p {
            params.min_p = min_p;
        }
        if let Some(penalty) = self.repetition_penalty {
            params.repetition_penalty = penalty;
        }
        params.max_tokens = self.max_new_tokens;
        params
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eos_token_id_may_be_an_int_or_a_list() {
        let one = GenerationConfig::from_json(&serde_json::json!({"eos_token_id": 2}));
        assert_eq!(one.eos_token_ids, vec![2]);
        let many = GenerationConfig::from_json(
            &serde_json::json!({"eos_token_id": [128001, 128008, 128009]}),
        );
        assert_eq!(many.eos_token_ids, vec![128001, 128008, 128009]);
    }

    #[test]
    fn defaults_are_greedy_unless_do_sample() {
        let greedy = GenerationConfig::from_json(&serde_json::json!({"temperature": 0.6}));
        assert!(greedy.sampling_defaults().is_greedy());
        let sampled = GenerationConfig::from_json(&serde_json::json!({
            "do_sample": true, "temperature": 0.6, "top_p": 0.9, "top_k": 20,
            "repetition_penalty": 1.05
        }));
        let params = sampled.sampling_defaults();
        assert_eq!(
            (
                params.temperature,
                params.top_p,
                params.top_k,
                params.repetition_penalty
            ),
            (0.6, 0.9, 20, 1.05)
        );
    }
}
