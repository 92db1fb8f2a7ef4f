//! `kiln embed`: sentence embeddings of texts with an encoder checkpoint (all-MiniLM-L6-v2
//! and other BERT-family models) through [`kiln_runtime::EmbeddingModel`], the path the
//! server's `/v1/embeddings` takes too, on the GPU when there is one (`--backend` picks:
//! [`kiln_driver::backend::embed_maker`]). Texts come from the command line, or one a line from
//! a file or stdin; each embedding is printed as one line of JSON (`index`, `text`, `tokens`,
//! `embedding`), its numbers as the shortest decimals that read back as the same f32.

use crate::progress::Bars;
use anyhow::{bail, Context, Result};
use kiln_driver::backend::{self, BackendChoice};
use kiln_runtime::EmbeddingModel;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub(crate) struct EmbedArgs {
    /// A Hugging Face encoder directory: config.json, safetensors weights, tokenizer.json.
    #[arg(long)]
    model: PathBuf,
    /// Texts to embed.
    texts: Vec<String>,
    /// Read texts from this file, one a line (`-`: stdin); empty lines are embedded too.
    #[arg(long, value_name = "PATH")]
    file: Option<PathBuf>,
    /// Where the model runs: the GPU if there is one (else the CPU backend, said once), the
    /// GPU, the CPU backend, or the reference interpreter.
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    backend: BackendChoice,
    /// The most padded tokens per batch (1 runs every text alone).
    #[arg(long, value_name = "N", default_value_t = kiln_runtime::embed::DEFAULT_BATCH_TOKENS)]
    batch_tokens: usize,
}

pub(crate) fn run(args: EmbedArgs) -> Result<ExitCode> {
    let mut texts = args.texts.clone();
    if let Some(path) = &args.file {
        texts.extend(read_lines(path)?);
    }
    if texts.is_empty() {
        bail!("nothing to embed: give texts as arguments or --file PATH (- for stdin)");
    }
    let make = backend::embed_maker(args.backend)?;
    let mut bars = Bars::stderr();
    let model = EmbeddingModel::load_on(&args.model, make.as_ref(), &mut bars)
        .with_context(|| format!("loading {}", args.model.display()))?
        .with_batch_tokens(args.batch_tokens);
    drop(bars);
    if model.tokenizer().is_none() {
        bail!(
            "{} has no tokenizer.json: kiln embed needs one to turn text into tokens",
            args.model.display()
        );
    }
    eprintln!(
        "kiln: embedding {} text{} on the {} ({} dimensions, at most {} tokens a text)",
        texts.len(),
        if texts.len() == 1 { "" } else { "s" },
        model.describe(),
        model.dimension(),
        model.max_seq_length()
    );
    let sequences = texts
        .iter()
        .map(|text| model.tokenize(text))
        .collect::<Result<Vec<_>, _>>()?;
    let started = std::time::Instant::now();
    let vectors = model.embed_ids(&sequences)?;
    let tokens: usize = sequences.iter().map(Vec::len).sum();
    eprintln!(
        "kiln: {tokens} tokens embedded in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    let mut stdout = std::io::stdout().lock();
    for (index, ((text, ids), vector)) in texts.iter().zip(&sequences).zip(&vectors).enumerate() {
        let line = format!(
            "{{\"index\":{index},\"text\":{},\"tokens\":{},\"embedding\":[{}]}}",
            serde_json::Value::from(text.as_str()),
            ids.len(),
            // Rust prints the shortest decimal that reads back as the same f32.
            vector
                .iter()
                .map(|v| if v.is_finite() {
                    v.to_string()
                } else {
                    "null".into()
                })
                .collect::<Vec<_>>()
                .join(",")
        );
        writeln!(stdout, "{line}").context("writing to stdout")?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The lines of a file, or of stdin for `-`, without their line endings.
fn read_lines(path: &PathBuf) -> Result<Vec<String>> {
    let reader: Box<dyn BufRead> = if path.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        let file =
            std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
        Box::new(std::io::BufReader::new(file))
    };
    reader
        .lines()
        .map(|line| {
            line.map(|l| l.strip_suffix('\r').map(str::to_string).unwrap_or(l))
                .with_context(|| format!("reading {}", path.display()))
        })
        .collect()
}
