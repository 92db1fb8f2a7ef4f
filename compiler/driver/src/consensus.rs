//! `kiln consensus`: one consensus decision among agents' proposals, given as embeddings (a
//! JSON array [K][D] or a 2-d .npy file of f32/f64) or as texts embedded by an encoder model
//! directory; prints the decision as JSON (docs/consensus.md describes every field).

use anyhow::{bail, Context, Result};
use kiln_runtime::consensus::{ConsensusRequest, Method};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(clap::Args)]
pub(crate) struct ConsensusArgs {
    /// Proposal embeddings: a JSON file holding [[...], ...] (K rows of width D) or a 2-d
    /// .npy file (f32 or f64, C order).
    #[arg(long, conflicts_with_all = ["texts", "texts_file"])]
    embeddings: Option<PathBuf>,
    /// A proposal as text (repeatable); needs --model.
    #[arg(long = "text", value_name = "TEXT", requires = "model")]
    texts: Vec<String>,
    /// A file of proposals, one text per line; needs --model.
    #[arg(long, requires = "model")]
    texts_file: Option<PathBuf>,
    /// An encoder model directory (config.json, safetensors weights, tokenizer.json), e.g.
    /// all-MiniLM-L6-v2, that embeds the texts.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Agents' preferences: a JSON file holding [N][K] (agent i's value for proposal k).
    /// Without it each proposal is one agent's, who prefers proposals like its own.
    #[arg(long)]
    preferences: Option<PathBuf>,
    /// How the consensus game is played: hedge, optimistic_hedge, replicator or
    /// fictitious_play.
    #[arg(long, default_value = "hedge")]
    method: String,
    /// λ: the weight of agreeing with the other agents against one's own preferences.
    #[arg(long, default_value_t = 1.0)]
    lambda: f32,
    /// Iterations of the dynamics.
    #[arg(long, default_value_t = 200)]
    iterations: usize,
    /// Step size of hedge, optimistic_hedge and replicator.
    #[arg(long, default_value_t = 0.5)]
    eta: f32,
    /// Include the K×K cosine similarity matrix in the output.
    #[arg(long)]
    similarity: bool,
    /// Where the texts' embeddings, the similarity and the game run: the GPU if there is one
    /// (else the CPU backend, said once), the GPU, the CPU backend, or the reference
    /// interpreter.
    #[arg(long, value_enum, default_value_t = kiln_driver::backend::BackendChoice::Auto)]
    backend: kiln_driver::backend::BackendChoice,
}

pub(crate) fn run(args: ConsensusArgs) -> Result<ExitCode> {
    let Some(method) = Method::from_name(&args.method) else {
        bail!(
            "unknown method `{}`; kiln knows {}",
            args.method,
            Method::names()
        );
    };
    let mut texts = args.texts.clone();
    if let Some(path) = &args.texts_file {
        let content =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        texts.extend(
            content
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(str::to_string),
        );
    }
    // Auto resolved once, so that a missing GPU is reported once.
    let backend = kiln_driver::backend::resolve(args.backend);
    let embeddings = match (&args.embeddings, &args.model) {
        (Some(path), _) => read_embeddings(path)?,
        (None, Some(model)) if !texts.is_empty() => {
            let make = kiln_driver::backend::embed_maker(backend)?;
            kiln_runtime::EmbeddingModel::load_on(
                model,
                make.as_ref(),
                &mut kiln_runtime::NoProgress,
            )?
            .embed_texts(&texts)?
        }
        _ => {
            bail!("give the proposals: --embeddings FILE, or --text/--texts-file with --model DIR")
        }
    };
    let preferences = args
        .preferences
        .as_deref()
        .map(|p| read_matrix_json(p, "preferences"))
        .transpose()?;
    let request = ConsensusRequest {
        embeddings,
        preferences,
        lambda: args.lambda,
        iterations: args.iterations,
        eta: args.eta,
        method,
    };
    if let Err(message) = request.validate() {
        bail!("{message}");
    }
    let mut solver = kiln_driver::backend::consensus_solver(backend)?;
    let decision = solver.decide(&request)?;
    let mut out = decision.to_json(args.similarity);
    if !texts.is_empty() && args.embeddings.is_none() {
        out["winner_text"] = serde_json::Value::String(texts[decision.winner].clone());
    }
    out["method"] = serde_json::Value::String(method.name().to_string());
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(ExitCode::SUCCESS)
}

/// Reads embeddings from a .npy file (by extension) or a JSON file.
fn read_embeddings(path: &Path) -> Result<Vec<Vec<f32>>> {
    if path.extension().is_some_and(|e| e == "npy") {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        read_npy(&bytes).with_context(|| format!("{}", path.display()))
    } else {
        read_matrix_json(path, "embeddings")
    }
}

/// A rectangular JSON array of numbers [R][C].
fn read_matrix_json(path: &Path, what: &str) -> Result<Vec<Vec<f32>>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let Some(rows) = json.as_array() else {
        bail!("{}: {what} must be an array of rows", path.display());
    };
    rows.iter()
        .enumerate()
        .map(|(i, row)| {
            let Some(items) = row.as_array() else {
                bail!("{}: {what} row {i} is not an array", path.display());
            };
            items
                .iter()
                .map(|v| {
                    v.as_f64().map(|x| x as f32).with_context(|| {
                        format!("{}: {what} row {i} holds a non-number", path.display())
                    })
                })
                .collect()
        })
        .collect()
}

/// A 2-d little-endian f32 or f64 array in C order from the bytes of a .npy file (format
/// versions 1 to 3).
fn read_npy(bytes: &[u8]) -> Result<Vec<Vec<f32>>> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        bail!("not a .npy file");
    }
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => bail!("unsupported .npy version {v}"),
    };
    let header = bytes
        .get(start..start + header_len)
        .context("truncated .npy header")?;
    let header = std::str::from_utf8(header).context(".npy header is not text")?;
    let field = |key: &str| -> Result<&str> {
        let at = header
            .find(&format!("'{key}'"))
            .with_context(|| format!(".npy header lacks '{key}'"))?;
        let rest = &header[at + key.len() + 2..];
        let colon = rest.find(':').context("bad .npy header")?;
        Ok(rest[colon + 1..].trim_start())
    };
    let descr = field("descr")?;
    let width = if descr.starts_with("'<f4'") {
        4
    } else if descr.starts_with("'<f8'") {
        8
    } else {
        bail!("the .npy dtype must be little-endian f32 or f64, found {descr}");
    };
    if field("fortran_order")?.starts_with("True") {
        bail!("the .npy array must be in C order");
    }
    let shape_text = field("shape")?;
    let close = shape_text.find(')').context("bad .npy shape")?;
    let dims: Vec<usize> = shape_text[1..close]
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().context("bad .npy shape"))
        .collect::<Result<_>>()?;
    let [rows, cols] = dims[..] else {
        bail!("the .npy array must be 2-d [K, D], found shape {dims:?}");
    };
    let data = &bytes[start + header_len..];
    let needed = rows
        .checked_mul(cols)
        .and_then(|n| n.checked_mul(width))
        .context("the .npy shape is too large")?;
    if data.len() < needed {
        bail!(
            "the .npy data is truncated: {} bytes for shape {dims:?}",
            data.len()
        );
    }
    let values: Vec<f32> = data[..needed]
        .chunks(width)
        .map(|c| match c {
            [a, b, c, d] => f32::from_le_bytes([*a, *b, *c, *d]),
            _ => {
                let mut eight = [0u8; 8];
                eight.copy_from_slice(c);
                f64::from_le_bytes(eight) as f32
            }
        })
        .collect();
    Ok(values.chunks(cols.max(1)).map(<[f32]>::to_vec).collect())
}
