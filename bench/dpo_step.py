"""A DPO step against an SFT step on the same chosen + rejected tokens, on one process.

Both run one forward and backward over the same padded batch of 2n sequences (n pairs, chosen
rows then rejected rows) through bigscale's own code: SFT through the model's loss, DPO through
``bigscale.train.objectives.sequence_logps`` and ``bigscale.train.losses.dpo`` with the
reference log-probs precomputed (as the reference pass leaves them), then one AdamW update.
Sides alternate, median of the timed steps each; the ratio DPO / SFT is printed (the issue's
bar: at most 1.05x).

    PYTHONPATH=. python bench/dpo_step.py [--layers 8 --hidden 512 --pairs 8 --length 256]
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bigscale.data.chat import IGNORE_INDEX
from bigscale.train import losses
from bigscale.train.objectives import sequence_logps


def _batch(pairs: int, length: int, vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2 * pairs, length), generator=g)
    labels = ids.clone()
    labels[:, : length // 4] = IGNORE_INDEX  # the prompt
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


class _Engine:
    """What ``sequence_logps`` asks of bigscale's engine: a device and the model's outputs."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.device = model, torch.device("cpu")

    def outputs(self, batch: dict[str, torch.Tensor], **extra: object) -> SimpleNamespace:
        args = {**batch, **extra, "use_cache": False}
        return self.model(**args)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    a = parser.parse_args()
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=a.hidden,
        intermediate_size=3 * a.hidden,
        num_hidden_layers=a.layers,
        num_attention_heads=max(1, a.hidden // 64),
        vocab_size=8192,
        max_position_embeddings=a.length,
    )
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    batch = _batch(a.pairs, a.length, config.vocab_size)
    engine = _Engine(model)
    ref = -torch.rand(2 * a.pairs) * 100

    def sft() -> None:
        model(**batch, use_cache=False).loss.backward()

    def dpo() -> None:
        logps, _ = sequence_logps(engine, batch, chunk_tokens=0)
        chosen, rejected = logps.chunk(2)
        ref_c, ref_r = ref.chunk(2)
        losses.dpo(chosen, rejected, ref_c, ref_r, beta=0.1).losses.mean().backward()

    times: dict[str, list[float]] = {"sft": [], "dpo": []}
    for i in range(2 * (a.steps + 1)):
        name, step = (("sft", sft), ("dpo", dpo))[i % 2]
        start = time.perf_counter()
        step()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 2:  # the first of each side warms up
            times[name].append(time.perf_counter() - start)
    s, d = statistics.median(times["sft"]), statistics.median(times["dpo"])
    tokens = 2 * a.pairs * a.length
    print(f"{tokens} tokens per step ({a.pairs} pairs x 2 x {a.length})")
    print(f"SFT step {1000 * s:.0f} ms, DPO step {1000 * d:.0f} ms")
    print(f"ratio DPO / SFT {d / s:.3f}x")


if __name__ == "__main__":
    main()
