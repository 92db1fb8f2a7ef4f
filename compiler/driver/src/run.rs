//! `kiln run`: lowers a program, binds its params to a checkpoint (or to random weights),
//! parses the inputs, runs an entry function and prints the results; `--generate N` decodes
//! N tokens greedily by feeding the argmax of the last logits back as the next token.

use crate::{lower, ProgramArgs};
use anyhow::{anyhow, bail, Context, Result};
use kiln_ir::{DType, Dim, Tensor};
use kiln_runtime::{Backend, Weights};
use std::path::PathBuf;
use std::process::ExitCode;

/// The model programs shipped with kiln, by the `model_type` of a Hugging Face config.json.
const MODEL_PROGRAMS: &[(&[&str], &str, &str)] = &[
    (
        &["llama", "mistral", "qwen2"],
        "models/llama.kiln",
        include_str!("../../../models/llama.kiln"),
    ),
    (
        &["gpt2"],
        "models/gpt2.kiln",
        include_str!("../../../models/gpt2.kiln"),
    ),
    (
        &["bert"],
        "models/bert.kiln",
        include_str!("../../../models/bert.kiln"),
    ),
];

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
}

pub(crate) fn run(args: RunArgs) -> Result<ExitCode> {
    let config = args
        .config
        .clone()
        .or_else(|| args.model.as_ref().map(|m| m.join("config.json")));
    let (file, _embedded) = match (&args.file, &args.model) {
        (Some(file), _) => (file.clone(), false),
        (None, Some(model)) => {
            let json = crate::read_config(&model.join("config.json"))?;
            let model_type = json
                .get("model_type")
                .and_then(|v| v.as_str())
                .unwrap_or("");
            let Some((_, path, source)) = MODEL_PROGRAMS
                .iter()
                .find(|(types, _, _)| types.contains(&model_type))
            else {
                bail!("no kiln program for model_type `{model_type}`; kiln knows llama, mistral, qwen2, gpt2 and bert");
            };
            // The embedded copy, so the binary works outside the repository too.
            let dir = std::env::temp_dir().join(format!("kiln-{}", std::process::id()));
            std::fs::create_dir_all(&dir)?;
            let file = dir.join(
                PathBuf::from(path)
                    .file_name()
                    .ok_or_else(|| anyhow!("bad path"))?,
            );
            std::fs::write(&file, source)?;
            (file, true)
        }
        (None, None) => bail!("give a program file or --model DIR"),
    };
    let program = ProgramArgs {
        file,
        config,
        param_dtype: args.param_dtype.clone(),
        entries: vec![args.entry.clone()],
    };
    let (ok, lowered) = lower(&program)?;
    let Some(lowered) = lowered.filter(|_| ok) else {
        return Ok(ExitCode::FAILURE);
    };
    let weights = match (&args.random_weights, args.weights.as_ref().or(args.model.as_ref())) {
        (Some(seed), _) => Weights::random(&lowered.params, *seed)?,
        (None, Some(dir)) => Weights::load(dir, &lowered.params)?,
        (None, None) if lowered.params.is_empty() => Weights::default(),
        (None, None) => bail!("this program reads {} checkpoint tensors: give --weights DIR, --model DIR or --random-weights SEED", lowered.params.len()),
    };
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
    let backend = Backend::Interpreter;
    eprintln!(
        "kiln: running `{}` on the {} (no GPU backend in this build yet)",
        args.entry,
        backend.name()
    );
    match args.generate {
        None => {
            let results =
                kiln_runtime::run(backend, &lowered.module, &args.entry, &inputs, &weights)?;
            for (i, r) in results.iter().enumerate() {
                println!("result {i}: {}", summarize(r));
            }
        }
        Some(n) => {
            let generated = generate(backend, &lowered.module, &args.entry, inputs, &weights, n)?;
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

/// Greedy decoding by re-running the whole sequence each step (the interpreter has no KV
/// cache): the first input must be token ids [1, S].
fn generate(
    backend: Backend,
    module: &kiln_ir::Module,
    entry: &str,
    mut inputs: Vec<Tensor>,
    weights: &Weights,
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
    for _ in 0..n {
        inputs[0] = Tensor::from_ints(dtype, &[1, tokens.len()], tokens.clone());
        let results = kiln_runtime::run(backend, module, entry, &inputs, weights)?;
        let logits = &results[0];
        let vocab = *logits
            .shape
            .last()
            .ok_or_else(|| anyhow!("logits have no dims"))?;
        let values = logits.to_f32_vec();
        let last = &values[values.len() - vocab..];
        let mut best = 0;
        for (i, v) in last.iter().enumerate() {
            if *v > last[best] {
                best = i;
            }
        }
        tokens.push(best as i64);
        out.push(best as i64);
    }
    Ok(out)
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
