//! `kiln run`: lowers a program, binds its params to a checkpoint (or to random weights),
//! parses the inputs, runs an entry function on the chosen backend (the GPU when there is
//! one, else the compiled kernels on the CPU) and prints the results; `--generate N` decodes
//! N tokens greedily by feeding the argmax of the last logits back as the next token.
//! `--prompt TEXT` generates text instead: the model directory's tokenizer encodes the
//! prompt (through its chat template with `--chat`), [`kiln_runtime::Generator`] samples
//! with the given parameters (the checkpoint's generation_config.json supplies the
//! defaults), and the text streams to stdout as it is produced. Programs with a `step`
//! entry (models/llama.kiln) generate through it with a paged KV cache, computing only each
//! step's new token.

use crate::{lower_from, ProgramArgs};
use anyhow::{anyhow, bail, Context, Result};
use kiln_driver::backend::{self, BackendChoice};
use kiln_ir::{DType, Dim, Tensor};
use kiln_runtime::{
    ChatMessage, Executor, GenerationConfig, Generator, LogitsModel, PagedLogits, ProgramLogits,
    RuntimeError, SamplingParams, Tokenizer, Weights, STEP_ENTRY,
};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

#[derive(clap::Args)]
pub(crate) struct RunArgs {
    /// The .kiln program; omit it with --model to use the program for the model's family.
    file: Option<PathBuf>,
    /// A Hugging Face model directory: config.json plus safetensors weights.
    #[arg(long)]
    model: Option<PathBuf>,
    /// A config.json (defaults to the one in --model).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Directory (or file) of safetensors weights (defaults to --model).
    #[arg(long, conflicts_with = "random_weights")]
    weights: Option<PathBuf>,
    /// Use random weights drawn from this seed instead of a checkpoint.
    #[arg(long)]
    random_weights: Option<u64>,
    /// The entry function to run.
    #[arg(long, default_value = "forward")]
    entry: String,
    /// An input as NAME=JSON, e.g. tokens='[[1, 2, 3]]' (nested arrays give the shape).
    #[arg(long = "input", value_name = "NAME=JSON")]
    inputs: Vec<String>,
    /// Greedy decoding: append the argmax of the last position's logits N times.
    #[arg(long, value_name = "N")]
    generate: Option<usize>,
    /// The dtype of params whose declaration names none.
    #[arg(long, default_value = "f32")]
    param_dtype: String,
    /// Where to run: the GPU when there is one, else the CPU backend (auto); or a given one.
    #[arg(long, value_enum, default_value = "auto")]
    backend: BackendChoice,
    #[command(flatten)]
    text: TextArgs,
}

/// Text generation from a prompt (`--prompt`), with the model directory's tokenizer.
#[derive(clap::Args)]
struct TextArgs {
    /// Generate text from this prompt, streaming it to stdout (needs --model).
    #[arg(long, requires = "model", conflicts_with_all = ["inputs", "generate"])]
    prompt: Option<String>,
    /// Wrap the prompt in the model's chat template as a user message.
    #[arg(long, requires = "prompt")]
    chat: bool,
    /// A system message before the prompt (with --chat).
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// The most tokens to generate (default: generation_config.json's max_new_tokens, else
    /// the rest of the context).
    #[arg(long, value_name = "N")]
    max_tokens: Option<usize>,
    /// Sampling temperature; 0 is greedy (the default unless generation_config.json sets
    /// do_sample).
    #[arg(long, value_name = "T")]
    temperature: Option<f32>,
    /// Sample among the K most likely tokens only (0: all).
    #[arg(long, value_name = "K")]
    top_k: Option<usize>,
    /// Nucleus sampling: the smallest set of tokens holding probability P.
    #[arg(long, value_name = "P")]
    top_p: Option<f32>,
    /// Drop tokens less likely than P times the most likely one.
    #[arg(long, value_name = "P")]
    min_p: Option<f32>,
    /// Hugging Face repetition penalty over prompt and output tokens (1: off).
    #[arg(long, value_name = "X")]
    repetition_penalty: Option<f32>,
    /// OpenAI presence penalty in [-2, 2].
    #[arg(long, value_name = "X")]
    presence_penalty: Option<f32>,
    /// OpenAI frequency penalty in [-2, 2].
    #[arg(long, value_name = "X")]
    frequency_penalty: Option<f32>,
    /// Seed of the sampler: the same seed gives the same text.
    #[arg(long, value_name = "S")]
    seed: Option<u64>,
    /// Stop before this string (repeatable); it is not printed.
    #[arg(long = "stop", value_name = "STR")]
    stop: Vec<String>,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
}

pub(crate) fn run(args: RunArgs) -> Result<ExitCode> {
    // Check the tokenizer and the sampling parameters before the slow part.
    let text_generation = match (&args.text.prompt, &args.model) {
        (Some(_), Some(model_dir)) => {
            let tokenizer = Tokenizer::from_dir(model_dir)?;
            let generation_config = GenerationConfig::from_dir(model_dir)?;
            let params = sampling_params(&generation_config, &args.text);
            params.validate()?;
            Some((tokenizer, generation_config, params))
        }
        _ => None,
    };
    let config = args
        .config
        .clone()
        .or_else(|| args.model.as_ref().map(|m| m.join("config.json")));
    let (file, embedded) = match (&args.file, &args.model) {
        (Some(file), _) => (file.clone(), None),
        (None, Some(model)) => {
            let json = crate::read_config(&model.join("config.json"))?;
            let model_type = json
                .get("model_type")
                .and_then(|v| v.as_str())
                .unwrap_or("");
            let Some(kiln_runtime::models::ModelProgram { path, source, .. }) =
                kiln_runtime::models::program_for(model_type)
            else {
                bail!(
                    "no kiln program for model_type `{model_type}`; kiln knows {}",
                    kiln_runtime::models::known_model_types().join(", ")
                );
            };
            // The copy embedded in the binary, so it works outside the repository too.
            (PathBuf::from(path), Some(*source))
        }
        (None, None) => bail!("give a program file or --model DIR"),
    };
    let program = ProgramArgs {
        file,
        config,
        param_dtype: args.param_dtype.clone(),
        entries: vec![args.entry.clone()],
    };
    let (ok, lowered) = lower_from(&program, embedded)?;
    let Some(lowered) = lowered.filter(|_| ok) else {
        return Ok(ExitCode::FAILURE);
    };
    let weights = match (&args.random_weights, args.weights.as_ref().or(args.model.as_ref())) {
        (Some(seed), _) => Weights::random(&lowered.params, *seed)?,
        (None, Some(dir)) => {
            eprintln!("kiln: reading the checkpoint in {}", dir.display());
            Weights::load_with_progress(dir, &lowered.params, &mut crate::progress::Bars::stderr())?
        }
        (None, None) if lowered.params.is_empty() => Weights::default(),
        (None, None) => bail!("this program reads {} checkpoint tensors: give --weights DIR, --model DIR or --random-weights SEED", lowered.params.len()),
    };
    if let (Some(prompt), Some(model_dir), Some((tokenizer, generation_config, params))) =
        (&args.text.prompt, &args.model, text_generation)
    {
        // Programs with a KV-cached `step` entry generate through it, unless another entry
        // was asked for.
        let cached = args.entry == "forward" && lowered.module.function(STEP_ENTRY).is_some();
        let mut executor = executor_for(&args, lowered, weights)?;
        let request = TextRequest {
            prompt,
            chat: args.text.chat,
            system: args.text.system.as_deref(),
            params,
        };
        let context = context_length(model_dir, &tokenizer)?;
        if cached {
            let executor = executor.as_mut();
            generate_text(tokenizer, context, &generation_config, request, |longest| {
                let blocks = longest.div_ceil(CACHE_BLOCK_TOKENS);
                let model = PagedLogits::new(executor, blocks, CACHE_BLOCK_TOKENS, longest)?;
                eprintln!(
                    "kiln: generating with `{STEP_ENTRY}` on the {} (KV cache: {blocks} blocks of \
                     {CACHE_BLOCK_TOKENS} tokens)",
                    model.describe()
                );
                Ok(model)
            })?;
        } else {
            eprintln!(
                "kiln: generating with `{}` on the {} (no KV cache: every step re-runs the whole sequence)",
                args.entry,
                executor.describe()
            );
            let model = ProgramLogits::new(executor.as_mut(), &args.entry)?;
            generate_text(tokenizer, context, &generation_config, request, |_| {
                Ok(model)
            })?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let func = lowered
        .module
        .function(&args.entry)
        .ok_or_else(|| anyhow!("no entry `{}`", args.entry))?;
    let mut inputs = Vec::new();
    for (i, param) in func.params().iter().enumerate() {
        let name = func.names[param.0 as usize]
            .clone()
            .unwrap_or_else(|| format!("#{i}"));
        let ty = func.ty(*param);
        let text = args
            .inputs
            .iter()
            .find_map(|s| s.strip_prefix(&format!("{name}=")))
            .ok_or_else(|| anyhow!("missing input `{name}` ({ty}): pass --input {name}=JSON"))?;
        inputs.push(parse_input(&name, text, ty.dtype, &ty.shape.0)?);
    }
    let mut executor = executor_for(&args, lowered, weights)?;
    eprintln!(
        "kiln: running `{}` on the {}",
        args.entry,
        executor.describe()
    );
    match args.generate {
        None => {
            let results = executor.run(&args.entry, &inputs)?;
            for (i, r) in results.iter().enumerate() {
                println!("result {i}: {}", summarize(r));
            }
        }
        Some(n) => {
            let generated = generate(executor.as_mut(), &args.entry, inputs, n)?;
            println!(
                "{}",
                generated
                    .iter()
                    .map(i64::to_string)
                    .collect::<Vec<_>>()
                    .join(" ")
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The executor `--backend` asks for, over the lowered program and its weights.
fn executor_for(
    args: &RunArgs,
    lowered: kiln_lower::Lowered,
    weights: Weights,
) -> Result<Box<dyn Executor>> {
    let name = args
        .file
        .as_ref()
        .or(args.model.as_ref())
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    Ok(backend::executor(
        &name,
        lowered,
        Arc::new(weights),
        args.backend,
        &mut crate::progress::Bars::stderr(),
    )?)
}

/// Tokens a KV-cache block holds.
const CACHE_BLOCK_TOKENS: usize = 16;
/// The most new tokens when neither --max-tokens nor the model's context bounds them.
const DEFAULT_MAX_NEW_TOKENS: usize = 4096;

/// What `--prompt` asks for.
struct TextRequest<'a> {
    prompt: &'a str,
    chat: bool,
    system: Option<&'a str>,
    params: SamplingParams,
}

/// Encodes the prompt with `tokenizer`, generates with the model `make_model` gives for
/// sequences of at most the given number of tokens, and streams the text to stdout; a
/// summary goes to stderr.
fn generate_text<M: LogitsModel>(
    tokenizer: Tokenizer,
    context: Option<usize>,
    generation_config: &GenerationConfig,
    request: TextRequest<'_>,
    make_model: impl FnOnce(usize) -> Result<M, RuntimeError>,
) -> Result<()> {
    let prompt_ids = if request.chat {
        let mut messages = Vec::new();
        if let Some(system) = request.system {
            messages.push(ChatMessage::new("system", system));
        }
        messages.push(ChatMessage::new("user", request.prompt));
        tokenizer.encode_chat(&messages, true)?
    } else {
        tokenizer.encode(request.prompt, true)?
    };
    let longest = match (request.params.max_tokens, context) {
        (Some(n), Some(context)) => (prompt_ids.len() + n).min(context),
        (Some(n), None) => prompt_ids.len() + n,
        (None, Some(context)) => context,
        (None, None) => prompt_ids.len() + DEFAULT_MAX_NEW_TOKENS,
    };
    let model = make_model(longest.max(prompt_ids.len() + 1))?;
    let mut generator = Generator::new(model, tokenizer)
        .with_eos_token_ids(generation_config.eos_token_ids.iter().copied());
    if let Some(context) = context {
        generator = generator.with_max_sequence_len(context);
    }
    let started = std::time::Instant::now();
    let mut stdout = std::io::stdout().lock();
    let mut write_error = None;
    let completion = generator.complete(&prompt_ids, request.params, |event| {
        if write_error.is_none() {
            if let Err(e) = write!(stdout, "{}", event.text).and_then(|()| stdout.flush()) {
                write_error = Some(e);
            }
        }
    })?;
    if let Some(e) = write_error {
        return Err(e).context("writing to stdout");
    }
    writeln!(stdout)?;
    let seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "kiln: {} prompt tokens, {} generated in {:.2} s ({:.2} tokens/s), finish reason: {:?}",
        completion.prompt_tokens,
        completion.token_ids.len(),
        seconds,
        completion.token_ids.len() as f64 / seconds.max(1e-9),
        completion.finish_reason
    );
    Ok(())
}

/// The checkpoint's defaults (generation_config.json) overridden by the command line.
fn sampling_params(generation_config: &GenerationConfig, text_args: &TextArgs) -> SamplingParams {
    let mut params = generation_config.sampling_defaults();
    let overrides = [
        (&mut params.temperature, text_args.temperature),
        (&mut params.top_p, text_args.top_p),
        (&mut params.min_p, text_args.min_p),
        (&mut params.repetition_penalty, text_args.repetition_penalty),
        (&mut params.presence_penalty, text_args.presence_penalty),
        (&mut params.frequency_penalty, text_args.frequency_penalty),
    ];
    for (field, value) in overrides {
        if let Some(value) = value {
            *field = value;
        }
    }
    if let Some(top_k) = text_args.top_k {
        params.top_k = top_k;
    }
    if text_args.max_tokens.is_some() {
        params.max_tokens = text_args.max_tokens;
    }
    params.seed = text_args.seed;
    params.stop = text_args.stop.clone();
    params.ignore_eos = text_args.ignore_eos;
    params
}

/// The longest sequence the model takes: config.json's max_position_embeddings (or
/// n_positions), else tokenizer_config.json's model_max_length.
fn context_length(model_dir: &Path, tokenizer: &Tokenizer) -> Result<Option<usize>> {
    let config = crate::read_config(model_dir)?;
    let from_config = ["max_position_embeddings", "n_positions"]
        .iter()
        .find_map(|key| config.get(*key).and_then(|v| v.as_u64()))
        .map(|n| n as usize);
    Ok(from_config.or(tokenizer.config().model_max_length))
}

/// Greedy decoding: the first input must be token ids [1, S]. Through the program's
/// KV-cached `step` entry when it has one, else by re-running the whole sequence each step.
fn generate(
    executor: &mut dyn Executor,
    entry: &str,
    mut inputs: Vec<Tensor>,
    n: usize,
) -> Result<Vec<i64>> {
    let Some(first) = inputs.first() else {
        bail!("--generate needs a token input")
    };
    if first.shape.len() != 2 || first.shape[0] != 1 || first.dtype.is_float() {
        bail!(
            "--generate needs integer token ids of shape [1, S], found {}",
            first.ty()
        );
    }
    let mut tokens = first.to_i64_vec();
    let dtype = first.dtype;
    let mut out = Vec::new();
    // Programs with a KV-cached `step` entry decode through it, one new token a step.
    if entry == "forward" && inputs.len() == 1 && executor.module().function(STEP_ENTRY).is_some() {
        let longest = tokens.len() + n;
        let blocks = longest.div_ceil(CACHE_BLOCK_TOKENS);
        let mut model = PagedLogits::new(executor, blocks, CACHE_BLOCK_TOKENS, longest)?;
        for _ in 0..n {
            // The step's own argmax (the first of equal logits): a token comes back, not
            // the logits.
            let next = model
                .last_greedy(std::slice::from_ref(&tokens))
                .ok_or_else(|| anyhow!("the KV-cached step gives no greedy tokens"))??;
            let best = i64::from(
                *next
                    .first()
                    .ok_or_else(|| anyhow!("the step returned no token"))?,
            );
            tokens.push(best);
            out.push(best);
        }
        return Ok(out);
    }
    for _ in 0..n {
        inputs[0] = Tensor::from_ints(dtype, &[1, tokens.len()], tokens.clone());
        let results = executor.run(entry, &inputs)?;
        let logits = &results[0];
        let vocab = *logits
            .shape
            .last()
            .ok_or_else(|| anyhow!("logits have no dims"))?;
        let values = logits.to_f32_vec();
        let best = argmax(&values[values.len() - vocab..]);
        tokens.push(best as i64);
        out.push(best as i64);
    }
    Ok(out)
}

/// The index of the largest value (the first of equal ones).
fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best
}

/// Parses a JSON array (nested for more dims) into a tensor of `dtype`, checking constant dims.
fn parse_input(name: &str, text: &str, dtype: DType, dims: &[Dim]) -> Result<Tensor> {
    let json: serde_json::Value =
        serde_json::from_str(text).with_context(|| format!("input `{name}` is not valid JSON"))?;
    let mut shape = Vec::new();
    let mut node = &json;
    while let Some(items) = node.as_array() {
        shape.push(items.len());
        match items.first() {
            Some(first) => node = first,
            None => break,
        }
    }
    let mut flat = Vec::new();
    flatten(&json, 0, &shape, &mut flat)
        .with_context(|| format!("input `{name}`: arrays must be rectangular numbers"))?;
    if shape.len() != dims.len()
        || dims
            .iter()
            .zip(&shape)
            .any(|(d, n)| d.as_const().is_some_and(|c| c as usize != *n))
    {
        bail!(
            "input `{name}` has shape {shape:?} but the program expects {}",
            kiln_ir::Shape(dims.to_vec())
        );
    }
    Ok(if dtype.is_float() {
        Tensor::from_floats(dtype, &shape, flat.iter().map(|v| *v as f32).collect())
    } else if dtype == DType::Bool {
        Tensor::from_bool(&shape, flat.iter().map(|v| *v != 0.0).collect())
    } else {
        Tensor::from_ints(dtype, &shape, flat.iter().map(|v| *v as i64).collect())
    })
}

fn flatten(v: &serde_json::Value, depth: usize, shape: &[usize], out: &mut Vec<f64>) -> Result<()> {
    match v {
        serde_json::Value::Array(items) if depth < shape.len() && items.len() == shape[depth] => {
            items
                .iter()
                .try_for_each(|item| flatten(item, depth + 1, shape, out))
        }
        serde_json::Value::Number(n) if depth == shape.len() => {
            out.push(n.as_f64().ok_or_else(|| anyhow!("bad number"))?);
            Ok(())
        }
        serde_json::Value::Bool(b) if depth == shape.len() => {
            out.push(f64::from(u8::from(*b)));
            Ok(())
        }
        _ => bail!("ragged or non-numeric array"),
    }
}

/// One line per result: type, and the leading values.
fn summarize(t: &Tensor) -> String {
    let values = t.to_f64_vec();
    let shown: Vec<String> = values.iter().take(8).map(|v| format!("{v:.6}")).collect();
    format!(
        "{} [{}{}]",
        t.ty(),
        shown.join(", "),
        if values.len() > 8 { ", ..." } else { "" }
    )
}
