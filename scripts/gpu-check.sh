#!/usr/bin/env bash
# Runs kiln's GPU checks on a machine with an NVIDIA GPU, from test binaries built elsewhere
# (the GPU machine need not have Rust). Build them with scripts/build-gpu-bins.sh, which puts
# them in .carry/; results go to $OUT (default ./gpu-results).
#   - the backend differential tests (every stdlib function and model, CUDA vs interpreter)
#     and kiln-cuda's GPU tests, with KILN_REQUIRE_GPU=1 so a missing GPU fails;
#   - compute-sanitizer memcheck and racecheck over the same binaries;
#   - the tensor-core GEMM check (gpu-kernels/tools/gemm_gpu_check.py) against PyTorch;
#   - the kernel benchmarks beside PyTorch eager and torch.compile.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-results}
mkdir -p "$OUT"
export KILN_REPO_ROOT=$PWD KILN_REQUIRE_GPU=1
status=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/gpu.txt"
git rev-parse HEAD > "$OUT/commit.txt" 2>/dev/null || true
for bin in backends cuda-gpu cuda-plans cuda-probe; do
    echo "== $bin" >> "$OUT/tests.log"
    .carry/$bin --test-threads 1 >> "$OUT/tests.log" 2>&1 || status=1
done
# cuda-gpu's negative tests make failing driver calls on purpose (a garbage image, a missing
# kernel, an oversized block): API errors are not reported, memory and race errors are.
# cuda-plans makes no CUDA calls, so it is not run under the sanitizer.
for tool in memcheck racecheck; do
    for bin in backends cuda-gpu; do
        echo "== $tool $bin" >> "$OUT/sanitizer.log"
        compute-sanitizer --tool "$tool" --report-api-errors no --error-exitcode 3 .carry/$bin --test-threads 1 >> "$OUT/sanitizer.log" 2>&1 || status=1
    done
done
# Tensor-core GEMMs against PyTorch (correctness, then time beside torch.matmul), and the
# small cases under memcheck and racecheck.
python3 gpu-kernels/tools/gemm_gpu_check.py .carry/gemm-check > "$OUT/gemm-check.jsonl" 2> "$OUT/gemm-check.err" || status=1
for tool in memcheck racecheck; do
    echo "== $tool gemm-check" >> "$OUT/sanitizer.log"
    compute-sanitizer --tool "$tool" --error-exitcode 3 python3 gpu-kernels/tools/gemm_gpu_check.py .carry/gemm-check --small >> "$OUT/sanitizer.log" 2>&1 || status=1
done
if [ "${KILN_SKIP_BENCH:-0}" != 1 ]; then
    .carry/gpu_kernels 50 > "$OUT/kiln-bench.json" 2> "$OUT/kiln-bench.err" || status=1
    python3 benches/torch_peers.py 50 > "$OUT/torch-bench.json" 2> "$OUT/torch-bench.err" || status=1
fi
grep -E "test result|NOT RUN|FAILED|panicked" "$OUT/tests.log"
grep -E "ERROR SUMMARY|== " "$OUT/sanitizer.log"
cat "$OUT/gemm-check.jsonl"
exit $status
