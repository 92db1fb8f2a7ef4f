//! The model programs shipped with kiln, embedded so no source files are needed at run time,
//! and the choice among them by the `model_type` of a Hugging Face config.json.

/// What a model family is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelKind {
    /// Text generation through `forward` (logits at every position).
    Decoder,
    /// Sentence embeddings through `embed`.
    Encoder,
}

/// A model program shipped with kiln.
#[derive(Debug)]
pub struct ModelProgram {
    /// The `model_type` values of config.json it serves.
    pub model_types: &'static [&'static str],
    /// Its path in the repository (`models/llama.kiln`), for diagnostics.
    pub path: &'static str,
    pub source: &'static str,
    pub kind: ModelKind,
    /// The entry function a server runs.
    pub entry: &'static str,
    /// The KV-cached entry over a paged cache, for programs that have one.
    pub step_entry: Option<&'static str>,
}

/// Every shipped program.
pub const MODEL_PROGRAMS: &[ModelProgram] = &[
    ModelProgram {
        model_types: &["llama", "mistral", "qwen2"],
        path: "models/llama.kiln",
        source: include_str!("../../../models/llama.kiln"),
        kind: ModelKind::Decoder,
        entry: "forward",
        step_entry: Some(crate::paged::STEP_ENTRY),
    },
    ModelProgram {
        model_types: &["gpt2"],
        path: "models/gpt2.kiln",
        source: include_str!("../../../models/gpt2.kiln"),
        kind: ModelKind::Decoder,
        entry: "forward",
        step_entry: None,
    },
    ModelProgram {
        model_types: &["bert"],
        path: "models/bert.kiln",
        source: include_str!("../../../models/bert.kiln"),
        kind: ModelKind::Encoder,
        entry: "embed",
        step_entry: None,
    },
];

/// The program for a config.json `model_type`.
pub fn program_for(model_type: &str) -> Option<&'static ModelProgram> {
    MODEL_PROGRAMS
        .iter()
        .find(|p| p.model_types.contains(&model_type))
}

impl ModelProgram {
    /// Lowers the program's entry function against a parsed config.json, with params in
    /// f32; `Err` holds the rendered diagnostics.
    pub fn lower(&self, config: &serde_json::Value) -> Result<kiln_lower::Lowered, String> {
        let (parsed, mut diagnostics) =
            kiln_lower::Program::load_source(self.path, self.source, None);
        let options = kiln_lower::Options {
            param_dtype: kiln_ir::DType::F32,
            entries: Some(vec![self.entry.to_string()]),
        };
        if !diagnostics.iter().any(|d| d.is_error()) {
            let (lowered, mut more) = kiln_lower::lower(&parsed, Some(config), &options);
            diagnostics.append(&mut more);
            if let Some(lowered) = lowered.filter(|_| !diagnostics.iter().any(|d| d.is_error())) {
                return Ok(lowered);
            }
        }
        Err(parsed.sources.render(&diagnostics))
    }
}

/// Every `model_type` kiln knows, for error messages.
pub fn known_model_types() -> Vec<&'static str> {
    MODEL_PROGRAMS
        .iter()
        .flat_map(|p| p.model_types.iter().copied())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_map_to_their_programs() {
        assert_eq!(
            program_for("qwen2").map(|p| p.path),
            Some("models/llama.kiln")
        );
        assert_eq!(
            program_for("bert").map(|p| p.kind),
            Some(ModelKind::Encoder)
        );
        assert!(program_for("t5").is_none());
        assert_eq!(
            known_model_types(),
            ["llama", "mistral", "qwen2", "gpt2", "bert"]
        );
    }
}
