//! Loading the served model: config.json's `model_type` picks the kiln program
//! (`kiln_runtime::models`, the table `kiln run` uses too), the program is lowered against
//! config.json, the checkpoint's tensors are bound, and the tokenizer (or the byte-level fallback), end-of-sequence ids, sampling
//! defaults, context length and KV-cache shape are read from the directory. An encoder also
//! gets its [`EmbeddingModel`] on the executor the runner factory's embedding maker builds
//! (the compiled CPU plan unless `kiln serve` runs on the GPU), whose tokenizer (truncating at
//! `max_seq_length` as sentence-transformers does) is the server's codec.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_kvcache::KvCacheShape;
use kiln_lower::{Options, Program};
use kiln_runtime::embed::EmbedExecutorMaker;
use kiln_runtime::models::{self, ModelKind};
use kiln_runtime::{
    EmbedBackend, EmbeddingModel, GenerationConfig, NoProgress, Tokenizer, Weights,
};

use crate::codec::TextCodec;
use crate::error::ServerError;

/// A loaded model: the lowered program with its weights, and everything about the checkpoint
/// the server needs.
#[derive(Debug)]
pub struct LoadedModel {
    /// The model directory.
    pub dir: PathBuf,
    /// config.json's `model_type`.
    pub model_type: String,
    /// Decoder or encoder.
    pub kind: ModelKind,
    /// The program the model runs (`models/llama.kiln`, ...).
    pub program_path: &'static str,
    /// The lowered program (one entry function).
    pub module: Arc<kiln_ir::Module>,
    /// The entry function the server runs (`forward` or `embed`).
    pub entry: &'static str,
    /// The program's KV-cached `step` entry alone, for decoders that have one.
    pub step_module: Option<Arc<kiln_ir::Module>>,
    /// The checkpoint's tensors, converted to the program's dtypes.
    pub weights: Arc<Weights>,
    /// The program's params and the checkpoint tensors they bind (for compiling a package).
    pub params: Vec<kiln_lower::ParamBinding>,
    /// Text to ids and back.
    pub codec: TextCodec,
    /// Ids that end a sequence unless `ignore_eos`.
    pub eos_token_ids: Vec<u32>,
    /// generation_config.json (token ids and sampling defaults).
    pub generation_config: GenerationConfig,
    /// The longest sequence the model takes.
    pub context_len: usize,
    /// Vocabulary size (the logits' width).
    pub vocab_size: usize,
    /// Hidden size (an encoder's embedding width).
    pub hidden_size: usize,
    /// What one token's KV takes, for sizing the cache.
    pub kv_shape: KvCacheShape,
    /// For encoders: the embedding path `kiln embed` takes too.
    pub embedding: Option<EmbeddingModel>,
}

impl LoadedModel {
    /// Loads the model in `dir` (see the module docs) with f32 weights.
    pub fn load(dir: &Path) -> Result<LoadedModel, ServerError> {
        LoadedModel::load_as(dir, kiln_ir::DType::F32, None)
    }

    /// Loads the model in `dir` with weights of `param_dtype`; with `random_weights`, weights
    /// drawn from that seed instead of the checkpoint's (then `dir` needs only config.json).
    /// An encoder's embeddings run on the compiled CPU plan.
    pub fn load_as(
        dir: &Path,
        param_dtype: kiln_ir::DType,
        random_weights: Option<u64>,
    ) -> Result<LoadedModel, ServerError> {
        let cpu = EmbedBackend::Cpu.maker();
        LoadedModel::load_with(dir, param_dtype, random_weights, cpu.as_ref())
    }

    /// Like [`LoadedModel::load_as`], an encoder's embeddings running on the executor
    /// `embed_on` builds (a runner factory's `embedding_maker`).
    pub fn load_with(
        dir: &Path,
        param_dtype: kiln_ir::DType,
        random_weights: Option<u64>,
        embed_on: &EmbedExecutorMaker,
    ) -> Result<LoadedModel, ServerError> {
        let config_path = dir.join("config.json");
        let config = read_json(&config_path)?;
        let model_type = config
            .get("model_type")
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string();
        let program =
            models::program_for(&model_type).ok_or_else(|| ServerError::UnknownModelType {
                path: config_path.clone(),
                model_type: model_type.clone(),
            })?;
        let (parsed, mut diagnostics) = Program::load_source(program.path, program.source, None);
        let options = Options {
            param_dtype,
            entries: Some(
                std::iter::once(program.entry)
                    .chain(program.step_entry)
                    .map(str::to_string)
                    .collect(),
            ),
        };
        let lowered = if diagnostics.iter().any(|d| d.is_error()) {
            None
        } else {
            let (lowered, mut more) = kiln_lower::lower(&parsed, Some(&config), &options);
            diagnostics.append(&mut more);
            lowered
        };
        let lowered = match lowered {
            Some(lowered) if !diagnostics.iter().any(|d| d.is_error()) => lowered,
            _ => {
                return Err(ServerError::Lowering {
                    program: program.path.to_string(),
                    dir: dir.to_path_buf(),
                    diagnostics: parsed.sources.render(&diagnostics),
                })
            }
        };
        let weights = match random_weights {
            Some(seed) => Weights::random(&lowered.params, seed)?,
            None => Weights::load(dir, &lowered.params)?,
        };
        let int = |keys: &[&str]| {
            keys.iter()
                .find_map(|key| config.get(*key).and_then(|v| v.as_u64()))
                .map(|v| v as usize)
        };
        let missing = |what: &str| ServerError::ModelDir {
            path: dir.to_path_buf(),
            message: format!("config.json has no {what}"),
        };
        let vocab_size = int(&["vocab_size"]).ok_or_else(|| missing("vocab_size"))?;
        let hidden_size =
            int(&["hidden_size", "n_embd"]).ok_or_else(|| missing("hidden_size (or n_embd)"))?;
        let num_layers = int(&["num_hidden_layers", "n_layer"])
            .ok_or_else(|| missing("num_hidden_layers (or n_layer)"))?;
        let num_heads = int(&["num_attention_heads", "n_head"])
            .ok_or_else(|| missing("num_attention_heads (or n_head)"))?;
        let num_kv_heads = int(&["num_key_value_heads"]).unwrap_or(num_heads);
        let head_dim = int(&["head_dim"]).unwrap_or(hidden_size / num_heads.max(1));
        // The served entry and the KV-cached step entry, each a module of its own.
        let mut functions = lowered.module.functions;
        let step_module = program.step_entry.and_then(|step| {
            let at = functions.iter().position(|f| f.name == step)?;
            Some(Arc::new(kiln_ir::Module {
                functions: vec![functions.remove(at)],
            }))
        });
        let module = Arc::new(kiln_ir::Module { functions });
        // The step entry's cache dtype (the model's); the interpreter keeps activations in f32.
        let cache_dtype_bytes = step_module
            .as_ref()
            .and_then(|step| {
                let func = step.functions.first()?;
                let cache = *func.params().get(6)?;
                Some(func.ty(cache).dtype.size_bytes())
            })
            .unwrap_or(4);
        let weights = Arc::new(weights);
        let embedding = match program.kind {
            ModelKind::Encoder => Some(EmbeddingModel::from_parts(
                dir,
                kiln_lower::Lowered {
                    module: (*module).clone(),
                    config: lowered.config.clone(),
                    params: lowered.params.clone(),
                },
                Arc::clone(&weights),
                program.entry,
                embed_on,
                &mut NoProgress,
            )?),
            ModelKind::Decoder => None,
        };
        let tokenizer = match &embedding {
            Some(embedding) => embedding.tokenizer().cloned(),
            None if dir.join("tokenizer.json").is_file() => Some(Tokenizer::from_dir(dir)?),
            None => None,
        };
        let codec = match tokenizer {
            Some(tokenizer) => TextCodec::Tokenizer(tokenizer),
            None => TextCodec::Bytes { vocab_size },
        };
        let context_len = int(&["max_position_embeddings", "n_positions"])
            .or_else(|| codec.model_max_length())
            .ok_or_else(|| missing("max_position_embeddings (or n_positions)"))?;
        let generation_config = GenerationConfig::from_dir(dir)?;
        let mut eos_token_ids = generation_config.eos_token_ids.clone();
        if let Some(eos) = codec.eos_token_id() {
            if !eos_token_ids.contains(&eos) {
                eos_token_ids.push(eos);
            }
        }
        Ok(LoadedModel {
            dir: dir.to_path_buf(),
            model_type,
            kind: program.kind,
            program_path: program.path,
            module,
            step_module,
            entry: program.entry,
            weights,
            params: lowered.params,
            codec,
            eos_token_ids,
            generation_config,
            context_len,
            vocab_size,
            hidden_size,
            kv_shape: KvCacheShape {
                num_layers,
                num_kv_heads,
                head_dim,
                dtype_bytes: cache_dtype_bytes,
            },
            embedding,
        })
    }

    /// The name clients use when none is configured: the directory's own name.
    pub fn default_name(&self) -> String {
        self.dir
            .canonicalize()
            .unwrap_or_else(|_| self.dir.clone())
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_else(|| self.model_type.clone())
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value, ServerError> {
    let text = std::fs::read_to_string(path).map_err(|e| ServerError::ModelDir {
        path: path.parent().unwrap_or(path).to_path_buf(),
        message: format!("reading {}: {e}", path.display()),
    })?;
    serde_json::from_str(&text).map_err(|e| ServerError::ModelDir {
        path: path.parent().unwrap_or(path).to_path_buf(),
        message: format!("parsing {}: {e}", path.display()),
    })
}
