"""The chunked loss (``model.loss_chunk_tokens``) against the model's own, side by side.

One forward and backward of a Llama-shaped model with Llama-3's 128,256-word vocabulary (small
layers, so the LM head and the loss dominate, as they do in small models on long sequences), one
micro batch of 1 x 2048 tokens. Each side runs in a fresh subprocess per round, sides
alternating; a subprocess reports the peak memory its steps added over the weights and
gradients, and its median step time (the first step, which pays one-off costs, included: the
memory high-water mark cannot leave it out).

- CPU, fp32: peak memory is the growth of the process's resident high-water mark
  (``ru_maxrss``) over the step, so it includes the allocator's behaviour, not just tensors.
- GPU, bf16: ``torch.cuda.max_memory_allocated`` over the step. Without a GPU the rows say so.

    .venv/bin/python bench/chunked_loss.py
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bigscale.model.chunked_loss import install_chunked_loss

VOCAB, SEQ, CHUNK, ROUNDS, STEPS = 128256, 2048, 256, 3, 3
MIB = 1024**2


def one_side(chunk: int, device: str) -> dict[str, float]:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = LlamaForCausalLM(config).to(device, dtype).train()
    if chunk:
        install_chunked_loss(model, chunk)
    ids = torch.randint(0, VOCAB, (1, SEQ), device=device)

    def step() -> float:
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        model.zero_grad(set_to_none=False)  # the gradients stay allocated between steps
        return float(loss)

    # Gradients allocated before the baseline: what the steps add is activations and the loss.
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    loss = 0.0
    for _ in range(STEPS):
        start = time.perf_counter()
        loss = step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"loss": loss, "step_s": statistics.median(times), "peak_mib": peak / MIB}


def run_side(chunk: int, device: str) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--side", str(chunk), device],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out.splitlines()[-1])


def compare(device: str) -> None:
    results: dict[int, list[dict[str, float]]] = {0: [], CHUNK: []}
    for _ in range(ROUNDS):
        for chunk in results:
            results[chunk].append(run_side(chunk, device))
    full, chunked = (
        {k: statistics.median(r[k] for r in results[c]) for k in ("loss", "step_s", "peak_mib")}
        for c in (0, CHUNK)
    )
    print(f"{device}: vocab {VOCAB}, 1 x {SEQ} tokens, chunk {CHUNK}, median of {ROUNDS} rounds")
    print(f"  loss       full {full['loss']:.6f}  chunked {chunked['loss']:.6f}")
    print(
        f"  peak added full {full['peak_mib']:.0f} MiB  chunked {chunked['peak_mib']:.0f} MiB  "
        f"ratio {chunked['peak_mib'] / full['peak_mib']:.3f}"
    )
    print(
        f"  step time  full {full['step_s'] * 1000:.0f} ms  chunked "
        f"{chunked['step_s'] * 1000:.0f} ms  ratio {chunked['step_s'] / full['step_s']:.3f}"
    )


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--side":
        print(json.dumps(one_side(int(sys.argv[2]), sys.argv[3])))
    else:
        compare("cpu")
        if torch.cuda.is_available():
            compare("cuda")
        else:
            print("cuda: no GPU here; the bf16 rows stay open")
