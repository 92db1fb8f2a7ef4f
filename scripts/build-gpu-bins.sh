#!/usr/bin/env bash
# Builds the GPU test and benchmark binaries (release) into .carry/ for scripts/gpu-check.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --release --no-run -p kiln-tests --test backends
cargo test --release --no-run -p kiln-tests --test serving
cargo test --release --no-run -p kiln-tests --test embeddings
cargo test --release --no-run -p kiln-cuda
cargo build --release -p kiln-cli --bin kiln
rm -rf .carry && mkdir -p .carry
release=${CARGO_TARGET_DIR:-target}/release
newest() { ls -t "$release/deps/" | grep -E "^$1-[0-9a-f]+$" | head -1; }
cp "$release/deps/$(newest backends)" .carry/backends
cp "$release/deps/$(newest serving)" .carry/serving
cp "$release/deps/$(newest embeddings)" .carry/embeddings
for t in gpu plans probe; do cp "$release/deps/$(newest $t)" ".carry/cuda-$t"; done
cp "$release/kiln" .carry/
strip .carry/*
# The tensor-core GEMM check (PTX and launch parameters; data is made on the GPU machine).
KILN_GEMM_CHECK_DIR=$PWD/.carry/gemm-check cargo test -p kiln-gpu-kernels --test mma_gemm_ptxas export_gemm_gpu_check -- --ignored
# The tensor-core attention prefill check (PTX and launch parameters, for tools/flash_gpu_check.py).
KILN_FLASH_CHECK_DIR=$PWD/.carry/flash-check cargo test -p kiln-gpu-kernels --test flash_attention export_flash_gpu_check -- --ignored
