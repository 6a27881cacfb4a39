"""bf16 against fp32 on this CPU: the matmuls of SmolLM2-135M (hidden 576, MLP 1536, 2048 tokens
of a micro batch) and one forward and backward of a 4-layer model of its widths, sides
alternating, median of 3 each.

Why ``trainer.precision=auto`` is fp32 on CPU and the demo experiments ask for auto: a CPU
without bf16 matrix units (AVX-512 or Arm BF16) emulates bf16, and on such a CPU the default job
ran so slowly that CI killed it after 25 minutes."""

from __future__ import annotations

import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bigscale.config.validate import cpu_has_bf16_units

TOKENS, HIDDEN, MLP = 2048, 576, 1536


def _median_seconds(fn, repeats: int = 3) -> float:
    fn()  # warm-up: oneDNN picks and caches its kernels
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_seconds(dtype: torch.dtype) -> float:
    a = torch.randn(TOKENS, HIDDEN, dtype=dtype)
    b = torch.randn(HIDDEN, MLP, dtype=dtype)
    return _median_seconds(lambda: a @ b)


def step_seconds(dtype: torch.dtype) -> float:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=4096,
        hidden_size=HIDDEN,
        intermediate_size=MLP,
        num_hidden_layers=4,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=512,
    )
    model = LlamaForCausalLM(config).to(dtype)
    ids = torch.randint(0, config.vocab_size, (4, 256))

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()

    return _median_seconds(step)


def main() -> None:
    units = cpu_has_bf16_units()
    print(
        f"CPU reports bf16 matrix units (oneDNN): {units}; torch threads {torch.get_num_threads()}"
    )
    for name, measure in (("matmul", matmul_seconds), ("forward+backward", step_seconds)):
        fp32, bf16 = [], []
        for _ in range(2):
            fp32.append(measure(torch.float32))
            bf16.append(measure(torch.bfloat16))
        f, b = statistics.median(fp32), statistics.median(bf16)
        print(f"{name}: fp32 {1000 * f:.1f} ms, bf16 {1000 * b:.1f} ms")
        print(f"{name} bf16 / fp32: {b / f:.2f} x")


if __name__ == "__main__":
    main()
