#!/usr/bin/env bash
# Installs ptxas and fatbinary (CUDA 13, from the nvidia-cuda-nvcc wheel) into .tools/cuda,
# or into the directory given as the first argument; does nothing when they already work.
# Prints the line that points kiln at them on stdout (messages go to stderr), so
#     eval "$(scripts/install-ptxas.sh)"
# installs and exports in one step. KILN_CUDA_NVCC_SPEC overrides the pip requirement.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${1:-$root/.tools/cuda}"
spec="${KILN_CUDA_NVCC_SPEC:-nvidia-cuda-nvcc>=13.0,<14}"

tools_work() {
    local bin
    for bin in "$dest/nvidia/cu13/bin" "$dest/nvidia/cuda_nvcc/bin"; do
        if [ -x "$bin/ptxas" ] && [ -x "$bin/fatbinary" ] && "$bin/ptxas" --version >/dev/null 2>&1; then
            echo "$bin"
            return 0
        fi
    done
    return 1
}

if bin="$(tools_work)"; then
    echo "ptxas already installed in $bin" >&2
else
    if ! python3 -m pip --version >/dev/null 2>&1; then
        echo "error: python3 -m pip is not available (apt-get install python3-pip)" >&2
        exit 1
    fi
    echo "installing $spec into $dest" >&2
    mkdir -p "$dest"
    PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1 \
        python3 -m pip install --quiet --upgrade --target "$dest" "$spec" >&2
    if ! bin="$(tools_work)"; then
        echo "error: installed $spec into $dest but found no working ptxas and fatbinary there" >&2
        exit 1
    fi
    echo "installed ptxas into $bin" >&2
fi
"$bin/ptxas" --version | tail -n 2 >&2
echo "export KILN_CUDA_WHEEL_DIR=$dest"
