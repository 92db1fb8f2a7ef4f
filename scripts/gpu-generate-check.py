"""Runs `kiln run --model FIXTURE --generate N` (the README's main command) for each tiny
checkpoint and checks that the greedy tokens equal transformers' (the fixture's
expected.safetensors). On a GPU machine kiln runs the compiled kernels on the GPU.

    python3 scripts/gpu-generate-check.py KILN_BINARY
"""

import subprocess
import sys

from safetensors.numpy import load_file

kiln = sys.argv[1]
failed = False
for fixture in ["tiny-llama", "tiny-qwen2", "tiny-gpt2"]:
    expected = load_file(f"tests/fixtures/{fixture}/expected.safetensors")
    prompt = expected["input_ids"][0].tolist()
    greedy = expected["greedy_ids"].tolist()
    run = subprocess.run(
        [kiln, "run", "--model", f"tests/fixtures/{fixture}", "--input", f"tokens=[{prompt}]",
         "--generate", str(len(greedy))],
        capture_output=True, text=True)
    got = [int(t) for t in run.stdout.split()] if run.returncode == 0 else None
    ok = got == greedy
    failed |= not ok
    backend = [line for line in run.stderr.splitlines() if "running" in line]
    print(f"{fixture}: {'ok' if ok else 'MISMATCH'}; {backend}; got {got}, want {greedy}")
    if run.returncode != 0:
        print(run.stderr)
sys.exit(1 if failed else 0)
