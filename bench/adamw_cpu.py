"""Fused vs per-tensor AdamW on the CPU: one optimizer update of a 61.5M-element fp32 tensor
(the size of the flat partition ZeRO-2 updates for the 61.5M-parameter model of the other
benchmarks on one rank), sides alternating, median of 5 updates each.

bigscale's default (``optim.fused: null``) is the fused kernel on CPU as on CUDA; this is the
measurement behind that choice."""

from __future__ import annotations

import statistics
import time

import torch

NUMEL = 61_500_000


def median_update_ms(fused: bool, updates: int = 5) -> float:
    param = torch.nn.Parameter(torch.randn(NUMEL))
    param.grad = torch.randn_like(param)
    opt = torch.optim.AdamW([param], lr=1e-4, betas=(0.9, 0.95), fused=fused or None)
    opt.step()  # allocates the moments; not timed
    times = []
    for _ in range(updates):
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    torch.manual_seed(0)
    results: dict[bool, list[float]] = {False: [], True: []}
    for fused in (False, True, False, True):
        results[fused].append(median_update_ms(fused))
    plain, fused = statistics.median(results[False]), statistics.median(results[True])
    print(f"per-tensor AdamW {plain:.0f} ms, fused AdamW {fused:.0f} ms")
    print(f"ratio {plain / fused:.2f}x")


if __name__ == "__main__":
    main()
