#!/usr/bin/env bash
# Runs kiln's GPU checks on a machine with an NVIDIA GPU, from test binaries built elsewhere
# (the GPU machine need not have Rust). Build them with scripts/build-gpu-bins.sh, which puts
# them in .carry/; results go to $OUT (default ./gpu-results).
#   - the backend differential tests (every stdlib function and model, CUDA vs interpreter),
#     the serving soak on the GPU (64 concurrent greedy requests, each equal to itself run
#     alone), all-MiniLM-L6-v2's embeddings on the GPU and the CPU against
#     sentence-transformers' (the model from .tools/minilm or KILN_MINILM_DIR; a missing one
#     fails the test) and kiln-cuda's GPU tests, which are #[ignore]d without a GPU:
#     --include-ignored runs them here, and a missing GPU fails them;
#   - compute-sanitizer memcheck and racecheck over the same binaries;
#   - `kiln run` on the tiny checkpoints (greedy tokens equal transformers');
#   - the tensor-core GEMM check (gpu-kernels/tools/gemm_gpu_check.py) and the attention
#     prefill check (gpu-kernels/tools/flash_gpu_check.py) against PyTorch;
#   - the kernel benchmarks beside PyTorch eager and torch.compile;
#   - the decode speed of the 1.1B Llama shape beside transformers' generate;
#   - `kiln bench serve` on the 1.1B Llama shape (random weights): 64 prompts, 128 tokens in,
#     128 out, all at once;
#   - the consensus benchmarks beside PyTorch eager and numpy (`kiln bench consensus`).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-results}
mkdir -p "$OUT"
export KILN_REPO_ROOT=$PWD
status=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/gpu.txt"
git rev-parse HEAD > "$OUT/commit.txt" 2>/dev/null || true
# KILN_SKIP_TESTS=1 runs only the benchmarks (one device call may not fit everything).
if [ "${KILN_SKIP_TESTS:-0}" != 1 ]; then
    for bin in backends serving embeddings cuda-gpu cuda-plans cuda-probe; do
        echo "== $bin" >> "$OUT/tests.log"
        # The embeddings' lowest cosines (and their ptxas report) go into the log.
        show=()
        [ "$bin" = embeddings ] && show=(--nocapture)
        .carry/$bin --include-ignored --test-threads 1 "${show[@]}" >> "$OUT/tests.log" 2>&1 || status=1
    done
    # The README's main command on the GPU: greedy tokens equal transformers'.
    echo "== kiln run on the GPU" >> "$OUT/tests.log"
    python3 scripts/gpu-generate-check.py .carry/kiln >> "$OUT/tests.log" 2>&1 || status=1
    # cuda-gpu's negative tests make failing driver calls on purpose (a garbage image, a missing
    # kernel, an oversized block): API errors are not reported, memory and race errors are.
    # cuda-plans makes no CUDA calls, so it is not run under the sanitizer.
    # --ignored: only the GPU tests (the CPU half of `backends` needs no sanitizer).
    tools="memcheck racecheck"
    [ "${KILN_SKIP_SANITIZER:-0}" = 1 ] && tools=""
    for tool in $tools; do
        for bin in backends cuda-gpu; do
            echo "== $tool $bin" >> "$OUT/sanitizer.log"
            compute-sanitizer --tool "$tool" --report-api-errors no --error-exitcode 3 .carry/$bin --ignored --test-threads 1 >> "$OUT/sanitizer.log" 2>&1 || status=1
        done
    done
    # Tensor-core GEMMs against PyTorch (correctness, then time beside torch.matmul), and the
    # small cases under memcheck and racecheck.
    python3 gpu-kernels/tools/gemm_gpu_check.py .carry/gemm-check > "$OUT/gemm-check.jsonl" 2> "$OUT/gemm-check.err" || status=1
    for tool in $tools; do
        echo "== $tool gemm-check" >> "$OUT/sanitizer.log"
        compute-sanitizer --tool "$tool" --error-exitcode 3 python3 gpu-kernels/tools/gemm_gpu_check.py .carry/gemm-check --small >> "$OUT/sanitizer.log" 2>&1 || status=1
    done
    # Tensor-core attention prefill against PyTorch's SDPA (then timed beside its flash
    # backend), and its small cases under memcheck and racecheck (kiln's kernels only: the
    # sanitizer slows PyTorch's reference kernels a hundredfold).
    python3 gpu-kernels/tools/flash_gpu_check.py .carry/flash-check > "$OUT/flash-check.jsonl" 2> "$OUT/flash-check.err" || status=1
    for tool in $tools; do
        echo "== $tool flash-check" >> "$OUT/sanitizer.log"
        compute-sanitizer --tool "$tool" --kernel-regex kns=flash_attention --error-exitcode 3 python3 gpu-kernels/tools/flash_gpu_check.py .carry/flash-check --small >> "$OUT/sanitizer.log" 2>&1 || status=1
    done
fi
if [ "${KILN_SKIP_BENCH:-0}" != 1 ]; then
    python3 benches/torch_peers.py 50 > "$OUT/torch-bench.json" 2> "$OUT/torch-bench.err" || status=1
    .carry/kiln bench kernels --runs 50 --torch-json "$OUT/torch-bench.json" -o "$OUT/memory-bound.json" \
        > "$OUT/kiln-bench.txt" 2>&1 || status=1
    cat "$OUT/kiln-bench.txt"
    # Decode speed of the 1.1B Llama shape beside transformers' generate.
    python3 benches/torch_peers.py decode > "$OUT/torch-decode.json" 2> "$OUT/torch-decode.err" || status=1
    .carry/kiln bench decode --torch-json "$OUT/torch-decode.json" -o "$OUT/decode.json" \
        > "$OUT/kiln-decode.txt" 2>&1 || status=1
    cat "$OUT/kiln-decode.txt"
    # Serving: the OpenAI-compatible server on the GPU under vLLM's serving benchmark.
    .carry/kiln bench serve --num-prompts 64 --input-len 128 --output-len 128 -o "$OUT/serve.json" \
        > "$OUT/kiln-serve.txt" 2>&1 || status=1
    cat "$OUT/kiln-serve.txt"
    # The consensus kernels (issue 8): RM+ on 10,000 games of 64x64 for 1,000 iterations,
    # cosine similarity 16,384 x 768, the coordinate median of 16 x 134M, beside PyTorch
    # eager on this GPU and numpy on the CPU (same data; value and NashConv compared).
    # Without the peers' JSON (the script failed) kiln's side still runs, without ratios.
    peers=()
    if python3 benches/consensus_peers.py > "$OUT/torch-consensus.json" 2> "$OUT/torch-consensus.err"; then
        peers=(--torch-json "$OUT/torch-consensus.json")
    else
        status=1
    fi
    .carry/kiln bench consensus "${peers[@]}" -o "$OUT/consensus.json" \
        > "$OUT/kiln-consensus.txt" 2>&1 || status=1
    cat "$OUT/kiln-consensus.txt"
fi
grep -E "test result|NOT RUN|FAILED|panicked|tiny-|lowest cosine" "$OUT/tests.log" 2>/dev/null
grep -E "ERROR SUMMARY|== " "$OUT/sanitizer.log" 2>/dev/null
cat "$OUT/gemm-check.jsonl" 2>/dev/null
exit $status
