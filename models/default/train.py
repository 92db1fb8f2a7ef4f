"""Trains kiln's default model: a small Llama on the Python documentation corpus.

Run on a machine with PyTorch, transformers and tokenizers (one GPU: a few minutes):
    python3 models/default/train.py .corpus/corpus.txt OUT_DIR
OUT_DIR receives a standard Hugging Face model directory (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json, generation_config.json) and training.json (losses).
"""

import json
import math
import os
import sys
import time

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

VOCAB = 4096
CONTEXT = 256
SEED = 1234


def train_tokenizer(corpus_path):
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>", "<|user|>", "<|assistant|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train([corpus_path], trainer)
    return tok


def main():
    corpus_path, out_dir = sys.argv[1], sys.argv[2]
    torch.manual_seed(SEED)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = train_tokenizer(corpus_path)
    text = open(corpus_path, encoding="utf-8").read()
    docs = text.split("\n\n\n")
    ids = []
    eot = tok.token_to_id("<|endoftext|>")
    for chunk in [text[i:i + 1_000_000] for i in range(0, len(text), 1_000_000)]:
        ids.extend(tok.encode(chunk).ids)
    ids.append(eot)
    data = torch.tensor(ids, dtype=torch.long)
    split = int(len(data) * 0.98)
    train_data, val_data = data[:split], data[split:]
    print(f"{len(docs)} docs, {len(data)} tokens", flush=True)

    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=768, num_hidden_layers=6,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=CONTEXT,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
        bos_token_id=eot, eos_token_id=eot,
    )
    model = transformers.LlamaForCausalLM(config).to(device)
    params = sum(p.numel() for p in model.parameters())
    print(f"{params / 1e6:.2f}M parameters", flush=True)
    # The corpus is small (1.5M tokens): validation loss bottoms out near 1,000 steps.
    steps, batch, lr = 1000, 64, 2e-3
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(SEED)

    def batch_of(src):
        starts = torch.randint(0, len(src) - CONTEXT - 1, (batch,), generator=gen)
        x = torch.stack([src[s:s + CONTEXT] for s in starts]).to(device)
        y = torch.stack([src[s + 1:s + CONTEXT + 1] for s in starts]).to(device)
        return x, y

    losses = []
    started = time.time()
    model.train()
    for step in range(steps):
        warm = min(1.0, (step + 1) / 200)
        for g in opt.param_groups:
            g["lr"] = lr * warm * 0.5 * (1 + math.cos(math.pi * step / steps))
        x, y = batch_of(train_data)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.float().view(-1, VOCAB), y.view(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            model.eval()
            with torch.no_grad():
                vx, vy = batch_of(val_data)
                vloss = torch.nn.functional.cross_entropy(model(input_ids=vx).logits.float().view(-1, VOCAB), vy.view(-1)).item()
            model.train()
            losses.append({"step": step, "train_loss": loss.item(), "val_loss": vloss, "seconds": time.time() - started})
            print(losses[-1], flush=True)

    model.eval()
    os.makedirs(out_dir, exist_ok=True)
    model = model.to(torch.bfloat16).cpu()
    model.save_pretrained(out_dir, safe_serialization=True)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        pad_token="<|endoftext|>", model_max_length=CONTEXT,
    )
    fast.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}\n"
        "{% elif m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}<|endoftext|>\n"
        "{% else %}{{ m['content'] }}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    fast.save_pretrained(out_dir)
    sample_ids = tok.encode("The for statement").ids
    with torch.no_grad():
        out = model.float().generate(torch.tensor([sample_ids]), max_new_tokens=40, do_sample=False)
    sample = tok.decode(out[0].tolist())
    print("sample:", repr(sample))
    with open(os.path.join(out_dir, "training.json"), "w") as f:
        json.dump({"parameters": params, "tokens": len(data), "steps": steps, "batch": batch,
                   "context": CONTEXT, "losses": losses, "greedy_sample": sample,
                   "torch": torch.__version__, "transformers": transformers.__version__}, f, indent=1)


if __name__ == "__main__":
    main()
