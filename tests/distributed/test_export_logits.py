"""The exported model is the trained model: after a real 2-rank ZeRO-3 run, the Hugging Face
directory (streamed from the partitioned checkpoint into several safetensors shards) loads in
transformers and gives the same logits as the trained engine, and a plain ``generate()`` on it
uses the KV cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.cli import QUICK, torchrun
from tests.exports import assert_generates_with_cache

pytestmark = pytest.mark.distributed

REPO = Path(__file__).parents[2]


def test_zero3_export_gives_the_engines_logits(tmp_path: Path, bigscale_home: Path) -> None:
    run_dir = tmp_path / "run"
    overrides = [
        "strategy=zero3",
        f"run_dir={run_dir}",
        *QUICK,
        "trainer.max_steps=8",
        "eval.exact_match=false",
        "export.max_shard_size=1MB",
    ]
    proc = torchrun(2, overrides, REPO, bigscale_home, module="tests.distributed.logits_probe")
    assert proc.returncode == 0, proc.stderr[-6000:]

    export = run_dir / "export"
    index = json.loads((export / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) >= 3, shards  # 3.6 MB of fp32 weights in files of at most 1 MB
    for shard in shards:
        assert (export / shard).stat().st_size <= 1_000_000 + 64 * 1024  # + header

    probe = torch.load(run_dir / "engine_logits.pt", weights_only=True)
    model = AutoModelForCausalLM.from_pretrained(export).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([probe["input_ids"]])).logits
    torch.testing.assert_close(logits, probe["logits"], atol=1e-5, rtol=1e-5)
    assert_generates_with_cache(export)
