"""The speed accounting's arithmetic: PaLM FLOPs per token, the GPU peak table, MFU and the
per-window rates, checked against numbers worked out by hand."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig

from bigscale.metrics import throughput
from bigscale.metrics.throughput import MfuFormula, Window, flops_per_token, peak_tflops
from bigscale.model.shapes import LLAMA_3_2_1B, LLAMA_3_2_1B_PARAMS

LLAMA_1B = LlamaConfig(**LLAMA_3_2_1B)  # 32 heads of 64


def test_flops_per_token_counts_the_tied_lm_head_and_attention() -> None:
    params = LLAMA_3_2_1B_PARAMS
    lm_head = 128256 * 2048
    attention = 12 * 16 * 32 * 64 * 2048
    assert flops_per_token(LLAMA_1B, params, 2048) == 6 * (params + lm_head) + attention
    untied = LlamaConfig(**{**LLAMA_3_2_1B, "tie_word_embeddings": False})
    assert flops_per_token(untied, params, 2048) == 6 * params + attention


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A10G", 70.0),
        ("Some Future GPU", None),
    ],
)
def test_peak_is_looked_up_by_the_most_specific_name(name: str, peak: float | None) -> None:
    assert peak_tflops(name) == peak


def test_mfu_is_achieved_over_peak() -> None:
    mfu = MfuFormula(LLAMA_1B, LLAMA_3_2_1B_PARAMS, 989.0)
    per_token = flops_per_token(LLAMA_1B, LLAMA_3_2_1B_PARAMS, 2048)
    assert mfu(45_000, 2048) == pytest.approx(45_000 * per_token / 989e12)
    assert 0.4 < mfu(45_000, 2048) < 0.6  # the order of magnitude llm-foundry reports


def test_window_rates(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([100.0, 102.0])
    monkeypatch.setattr(throughput.time, "perf_counter", lambda: next(clock))
    w = Window(steps=3, data_s=0.4, compute_s=1.2, optimizer_s=0.2)
    w.add_micro_batch(512)
    w.end_step(real_tokens=9_000, all_tokens=10_000)  # the 4th step
    row = w.row(world_size=2, mfu_of=None)
    assert row["tokens_per_s"] == 5_000 and row["real_tokens_per_s"] == 4_500
    assert row["real_token_share"] == 0.9
    assert row["step_time_s"] == 0.5 and row["data_wait_s"] == pytest.approx(0.1)
    assert row["forward_backward_s"] == pytest.approx(0.3)
    assert row["optimizer_s"] == pytest.approx(0.05)
    assert "mfu" not in row and row["peak_mem_gib"] > 0


def test_window_reports_mfu_per_gpu_on_real_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([0.0, 1.0])
    monkeypatch.setattr(throughput.time, "perf_counter", lambda: next(clock))
    w = Window()
    w.add_micro_batch(2048)
    w.end_step(real_tokens=90_000, all_tokens=100_000)
    seen = {}

    def mfu_of(per_gpu: float, seq_len: float) -> float:
        seen.update(per_gpu=per_gpu, seq_len=seq_len)
        return 0.5

    row = w.row(world_size=8, mfu_of=mfu_of)
    assert row["mfu"] == 0.5 and seen == {"per_gpu": 90_000 / 8, "seq_len": 2048}
