//! `kiln bench decode`: decode speed on the GPU of a Llama-shaped model with random bf16
//! weights (by default the 1.1B shape of BASELINES.md: hidden 2048, 16 layers, 32 query and
//! 8 key/value heads, ffn 8192, vocab 32000), batch 1, through models/llama.kiln's KV-cached
//! `step` entry: one prefill step over the prompt, then one step per new token (greedy: the
//! step's argmax, made on the device, is all that is copied back). Reports the time per
//! decoded token and its fraction of the weight-streaming limit (the bytes of every weight a
//! decode step reads, divided by the copy bandwidth measured in the same run), and with
//! `benches/torch_peers.py decode` output, transformers' `generate` on the same shapes. The
//! last decode step is also replayed on the device alone (CUDA events around its graph), which
//! splits a token's time into the GPU's share and the host's.
//!
//! Decode steps overlap the host's work with the device's: each step is submitted before the
//! one before it is collected, its token taken from that step's greedy token on the device
//! (`PagedModel::submit_greedy`, chained), so the host prepares, copies and launches step
//! n + 1 while the GPU computes step n. `--sync-steps` waits for each token first (the
//! host's share then adds to every token).

use crate::bench::{read_peers, Gpu};
use anyhow::{anyhow, Context, Result};
use kiln_ir::DType;
use kiln_runtime::{CudaPlans, Executor, PagedModel, StepSequence, Weights, STEP_ENTRY};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

#[derive(clap::Args)]
pub(crate) struct DecodeArgs {
    /// Prompt tokens (one prefill step).
    #[arg(long, default_value_t = 128)]
    prompt: usize,
    /// New tokens generated (the first from the prefill step, the rest one step each).
    #[arg(long, default_value_t = 128)]
    new_tokens: usize,
    /// The model's config.json (default: the 1.1B Llama shape).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// transformers' numbers for the same shapes (`benches/torch_peers.py decode`).
    #[arg(long, value_name = "FILE")]
    torch_json: Option<PathBuf>,
    /// Wait for each step's token before submitting the next one (no overlap of the host's
    /// work with the device's).
    #[arg(long)]
    sync_steps: bool,
    /// Also write the JSON here.
    #[arg(long, short = 'o', value_name = "FILE")]
    out: Option<PathBuf>,
}

use kiln_driver::bench_serve::LLAMA_1B;

const BLOCK_TOKENS: usize = 16;

/// Replays of the last decode step timed on the device alone.
const GPU_STEP_RUNS: usize = 50;

pub(crate) fn run(args: DecodeArgs) -> Result<ExitCode> {
    if args.prompt == 0 || args.new_tokens < 2 {
        anyhow::bail!("--prompt must be at least 1 and --new-tokens at least 2");
    }
    let config: serde_json::Value = match &args.config {
        Some(path) => serde_json::from_str(
            &std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?,
        )?,
        None => serde_json::from_str(LLAMA_1B)?,
    };
    let gpu = Gpu::open()?;
    let copy_gbs = gpu.copy_bandwidth(20)?;
    let program = kiln_runtime::models::program_for("llama").expect("the llama program");
    let (parsed, diags) = kiln_lower::Program::load_source(program.path, program.source, None);
    let options = kiln_lower::Options {
        param_dtype: DType::BF16,
        entries: Some(vec![STEP_ENTRY.to_string()]),
    };
    let (lowered, more) = kiln_lower::lower(&parsed, Some(&config), &options);
    let lowered = lowered
        .filter(|_| !diags.iter().chain(&more).any(|d| d.is_error()))
        .ok_or_else(|| anyhow!("{}", parsed.sources.render(&more)))?;
    eprintln!("kiln: drawing random weights");
    let weights = Weights::random(&lowered.params, 1)?;
    // A decode step reads every weight but the embedding table, of which it reads one row.
    let embed_bytes = weights
        .get("model.embed_tokens.weight")
        .map_or(0, |t| t.numel() * 2);
    let weight_bytes = weights.bytes() - embed_bytes;
    let params: usize = lowered
        .params
        .iter()
        .map(|p| {
            p.ty.shape
                .0
                .iter()
                .filter_map(|d| d.as_const())
                .product::<u64>() as usize
        })
        .sum();
    eprintln!("kiln: compiling for {}", gpu.target.sm_name());
    let module = lowered.module.clone();
    let mut compile_options = gpu.compile_options();
    crate::bench::apply_tuning(&mut compile_options)?;
    let (_, cuda) = gpu.compile_lowered("llama.kiln", lowered, &compile_options)?;
    let mut plans = CudaPlans::new(module, cuda, Arc::new(weights));
    let longest = args.prompt + args.new_tokens;
    let blocks = longest.div_ceil(BLOCK_TOKENS);
    let mut model = PagedModel::new(plans.module(), STEP_ENTRY, blocks, BLOCK_TOKENS, longest)?;
    let table: Vec<u32> = (0..blocks as u32).collect();
    let vocab = config["vocab_size"].as_u64().unwrap_or(32000) as u32;
    let prompt: Vec<u32> = (0..args.prompt as u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 7) % vocab)
        .collect();
    // The first run uploads the weights and captures the graphs; the second is timed.
    let mut timed = None;
    for _ in 0..2 {
        let mut tokens = prompt.clone();
        let start = Instant::now();
        let next = model.step_greedy(
            &mut plans,
            &[StepSequence {
                tokens: &tokens,
                cached: 0,
                blocks: &table,
            }],
        )?;
        tokens.push(next[0]);
        plans.reset_kept_run_times(STEP_ENTRY)?;
        let prefilled = Instant::now();
        if args.sync_steps {
            while tokens.len() < longest {
                let next = model.step_greedy(
                    &mut plans,
                    &[StepSequence {
                        tokens: &tokens,
                        cached: tokens.len() - 1,
                        blocks: &table,
                    }],
                )?;
                tokens.push(next[0]);
            }
        } else {
            decode_overlapped(&mut model, &mut plans, &mut tokens, longest, &table)?;
        }
        let end = Instant::now();
        timed = Some((
            (prefilled - start).as_secs_f64() * 1e3,
            (end - prefilled).as_secs_f64() * 1e3,
        ));
    }
    let (prefill_ms, decode_ms) = timed.expect("two runs");
    let host = plans.kept_run_times(STEP_ENTRY)?;
    let per_token_us = |d: std::time::Duration| d.as_secs_f64() * 1e6 / host.runs.max(1) as f64;
    let decode_steps = args.new_tokens - 1;
    let ms_per_token = decode_ms / decode_steps as f64;
    // The last decode step replayed on the device alone: the GPU's share of a token, the
    // rest being the host's (input copies, launching, copying the greedy tokens back).
    let gpu_step = plans.time_last_kept_run(STEP_ENTRY, GPU_STEP_RUNS)?;
    let limit_ms = weight_bytes as f64 / (copy_gbs * 1e9) * 1e3;
    let torch = read_peers(args.torch_json.as_deref())?;
    let torch_ms = torch
        .as_ref()
        .and_then(|t| t["decode_ms_per_token"].as_f64());
    println!(
        "decode: {params} params, {:.2} GB of weights read a token; copy {copy_gbs:.0} GB/s -> \
         limit {limit_ms:.3} ms/token",
        weight_bytes as f64 / 1e9
    );
    println!(
        "kiln: prefill {} tokens {prefill_ms:.2} ms; decode {ms_per_token:.3} ms/token = {:.1} \
         tokens/s = {:.0}% of the weight-streaming limit",
        args.prompt,
        1e3 / ms_per_token,
        100.0 * limit_ms / ms_per_token
    );
    println!(
        "kiln: the last decode step on the GPU alone {:.3} ms (median of {GPU_STEP_RUNS} \
         replays, {:.3}-{:.3}); the host's share of a token {:.3} ms",
        gpu_step.median_ms,
        gpu_step.min_ms,
        gpu_step.max_ms,
        ms_per_token - gpu_step.median_ms
    );
    println!(
        "kiln: a decode step's host phases (us a token): prepare {:.1}, upload {:.1}, launch \
         {:.1}, wait {:.1}, read back {:.1}",
        per_token_us(host.prepare),
        per_token_us(host.upload),
        per_token_us(host.launch),
        per_token_us(host.wait),
        per_token_us(host.read)
    );
    if let Some(t) = torch_ms {
        println!(
            "transformers generate: {t:.3} ms/token ({:.1} tokens/s); kiln is {:.2}x",
            1e3 / t,
            t / ms_per_token
        );
    }
    let out = gpu.record(serde_json::json!({
        "steps_overlapped": !args.sync_steps,
        "config": config,
        "params": params,
        "dtype": "bf16",
        "batch": 1,
        "prompt_tokens": args.prompt,
        "new_tokens": args.new_tokens,
        "weight_bytes_per_token": weight_bytes,
        "copy_gb_per_s": copy_gbs,
        "weight_streaming_limit_ms_per_token": limit_ms,
        "kiln": {
            "prefill_ms": prefill_ms,
            "decode_ms_per_token": ms_per_token,
            "decode_tokens_per_s": 1e3 / ms_per_token,
            "fraction_of_weight_streaming_limit": limit_ms / ms_per_token,
            "end_to_end_tokens_per_s": args.new_tokens as f64 / ((prefill_ms + decode_ms) / 1e3),
            "gpu_ms_last_decode_step": gpu_step.median_ms,
            "gpu_fraction_of_weight_streaming_limit": limit_ms / gpu_step.median_ms,
            "host_ms_per_token": ms_per_token - gpu_step.median_ms,
            "host_us_per_token": {
                "prepare": per_token_us(host.prepare),
                "upload": per_token_us(host.upload),
                "launch": per_token_us(host.launch),
                "wait": per_token_us(host.wait),
                "read_back": per_token_us(host.read),
            },
        },
        "transformers": torch,
        "speedup_vs_transformers": torch_ms.map(|t| t / ms_per_token),
    }));
    if let Some(path) = &args.out {
        std::fs::write(path, serde_json::to_string_pretty(&out)?)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("kiln: wrote {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// Decodes greedily until `tokens` holds `longest` tokens, each step submitted before the one
/// before it is collected: a step's token is the greedy token of the step before, taken on
/// the device, and stands in `tokens` as a placeholder until that step is collected.
fn decode_overlapped(
    model: &mut PagedModel,
    plans: &mut CudaPlans,
    tokens: &mut Vec<u32>,
    longest: usize,
    table: &[u32],
) -> Result<()> {
    /// Any id: a chained step's new token is not read from the host.
    const PLACEHOLDER: u32 = 0;
    let mut next_known = tokens.len();
    let mut chained = false;
    while tokens.len() < longest {
        let batch = [StepSequence {
            tokens,
            cached: tokens.len() - 1,
            blocks: table,
        }];
        model.submit_greedy(plans, &batch, chained)?;
        if chained {
            tokens[next_known] = model.collect_greedy(plans)?[0];
            next_known += 1;
        }
        tokens.push(PLACEHOLDER);
        chained = true;
    }
    if chained {
        tokens[next_known] = model.collect_greedy(plans)?[0];
    }
    Ok(())
}
