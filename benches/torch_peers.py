"""PyTorch peers for `kiln bench kernels` (compiler/driver/src/bench.rs): the same shapes and dtypes, timed with CUDA
events (warm-up, median), eager and torch.compile. Prints one JSON object.

    python3 benches/torch_peers.py [RUNS]
    python3 benches/torch_peers.py decode   # transformers generate, for `kiln bench decode`
"""

import json
import statistics
import sys

import torch

RUNS = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 50
dev = "cuda"


def timed(fn, *args):
    for _ in range(5):
        fn(*args)
    torch.cuda.synchronize()
    samples = []
    for _ in range(RUNS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args)
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)


def add_rms_norm(x, r, w):
    h = x + r
    hf = h.float()
    n = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-5)
    return h, n.to(h.dtype) * w


def swiglu_act(g, u):
    return torch.nn.functional.silu(g) * u


def rotary(q, cos, sin):
    half = q.shape[-1] // 2
    rot = torch.cat([-q[..., half:], q[..., :half]], dim=-1)
    return q * cos + rot * sin


def linear_chain(x, *weights):
    for w in weights:
        x = torch.nn.functional.linear(x, w)
    return x


def main():
    t = 16384
    bf = torch.bfloat16
    x = torch.randn(256 << 20, device=dev, dtype=bf)
    cases = {
        "copy": (lambda a: a.clone(), (x,), 2 * 2 * x.numel()),
        "add_rms_norm": (add_rms_norm, (torch.randn(t, 4096, device=dev, dtype=bf), torch.randn(t, 4096, device=dev, dtype=bf),
                                        torch.randn(4096, device=dev, dtype=bf)), 4 * t * 4096 * 2 + 4096 * 2),
        "swiglu_act": (swiglu_act, (torch.randn(t, 14336, device=dev, dtype=bf), torch.randn(t, 14336, device=dev, dtype=bf)), 3 * t * 14336 * 2),
    }
    pos = torch.arange(t, device=dev) % 4096
    inv = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, device=dev).float() / 128))
    ang = pos.float()[:, None] * inv[None, :]
    emb = torch.cat([ang, ang], -1)[:, None, :]
    cases["rotary"] = (rotary, (torch.randn(t, 32, 128, device=dev, dtype=bf), emb.cos().to(bf), emb.sin().to(bf)), 2 * t * 32 * 128 * 2 + t * 8)
    # Decode shapes whose weight fits in L2 run as a chain of four weights (as kiln's do).
    for name, m, n, k, chain in [("gemm_4096", 4096, 4096, 4096, 1), ("gemm_8192", 8192, 8192, 8192, 1),
                                 ("gemm_4096x14336", 4096, 14336, 4096, 1), ("decode_m1_4096", 1, 4096, 4096, 4),
                                 ("decode_m16_4096", 16, 4096, 4096, 4), ("decode_m1_14336", 1, 14336, 4096, 1),
                                 ("decode_m16_14336", 16, 14336, 4096, 1)]:
        nbytes = chain * (n * k * 2 if m <= 16 else (m * k + n * k + m * n) * 2)
        weights = [torch.randn(n, k, device=dev, dtype=bf) for _ in range(chain)]
        cases[name] = (linear_chain, (torch.randn(m, k, device=dev, dtype=bf), *weights), nbytes)
    # FP8 e4m3 GEMM with per-tensor scales and bf16 out (kiln's fp8_gemm_8192: scaled_mm of a [M, K]
    # and a weight stored [N, K] row-major); _scaled_mm wants the second operand column-major: b.t().
    m = n = k = 8192
    fp8 = torch.float8_e4m3fn
    a8 = (torch.rand(m, k, device=dev) * 2 - 1).to(fp8)
    b8 = (torch.rand(n, k, device=dev) * 2 - 1).to(fp8)
    scale_a = torch.tensor(0.5, device=dev)
    scale_b = torch.tensor(0.25, device=dev)
    cases["fp8_gemm_8192"] = (lambda a, b, sa, sb: torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb, out_dtype=bf),
                              (a8, b8, scale_a, scale_b), m * k + n * k + m * n * 2)
    # Decode attention: 64 sequences of 4096 tokens, GQA 32/8, D 128 (kiln reads a paged cache;
    # PyTorch a contiguous one, which is the easier case).
    q = torch.randn(64, 32, 1, 128, device=dev, dtype=bf)
    kv = [torch.randn(64, 8, 4096, 128, device=dev, dtype=bf) for _ in range(2)]
    cases["paged_decode"] = (lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True),
                             (q, *kv), 2 * 64 * 4096 * 8 * 128 * 2)
    # Attention prefill: B4 H32 S4096 D128, causal and not, on PyTorch's flash backend; q/k/v
    # in kiln's [B, S, H, D] layout, handed over as [B, H, S, D] views.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def flash(causal):
        def run(q, k, v):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)
        return run
    qkv = [torch.randn(4, 4096, 32, 128, device=dev, dtype=bf) for _ in range(3)]
    for name, causal in [("prefill_causal", True), ("prefill", False)]:
        cases[name] = (flash(causal), tuple(qkv), 4 * 4 * 4096 * 32 * 128 * 2)
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "runs": RUNS, "eager": {}, "compiled": {}}
    for name, (fn, args, nbytes) in cases.items():
        ms = timed(fn, *args)
        out["eager"][name] = {"median_ms": ms, "gb_per_s": nbytes / (ms * 1e-3) / 1e9}
        if name != "copy" and not name.startswith(("gemm", "decode", "paged", "fp8", "prefill")):
            cfn = torch.compile(fn)
            ms = timed(cfn, *args)
            out["compiled"][name] = {"median_ms": ms, "gb_per_s": nbytes / (ms * 1e-3) / 1e9}
    print(json.dumps(out, indent=1))


def decode(prompt=128, new_tokens=128):
    """transformers' greedy generate on the 1.1B Llama shape of `kiln bench decode`, random bf16 weights, batch 1."""
    import time
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=10000.0,
                         max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dev, torch.bfloat16).eval()
    ids = torch.randint(0, 32000, (1, prompt), device=dev)

    def run(n):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1e3

    run(new_tokens)
    prefill_ms = statistics.median(run(1) for _ in range(3))
    total_ms = statistics.median(run(new_tokens) for _ in range(3))
    per_token = (total_ms - prefill_ms) / (new_tokens - 1)
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "transformers": __import__("transformers").__version__, "prompt_tokens": prompt,
                      "new_tokens": new_tokens, "generate_ms": total_ms, "prefill_ms": prefill_ms,
                      "decode_ms_per_token": per_token, "decode_tokens_per_s": 1e3 / per_token}, indent=1))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "decode":
        decode()
    else:
        main()
