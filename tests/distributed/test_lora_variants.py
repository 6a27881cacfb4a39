"""DoRA and rsLoRA (peft's variants, ``finetune.use_dora`` / ``finetune.use_rslora``) train on
2 ranks, and both exports (the adapter, and the base with it merged) give the trained engine's
logits: the magnitude vectors and the sqrt(r) scaling survive the checkpoint and the export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.cli import bigscale, explain, torchrun, train_rows
from tests.distributed.test_lora import ARGS, REPO, base_dir, probe_logits

pytestmark = pytest.mark.distributed


def test_dora_with_rslora_trains_and_exports(tmp_path: Path, bigscale_home: Path) -> None:
    run_dir = tmp_path / "dora"
    args = ["strategy=zero2", f"run_dir={run_dir}", *ARGS]
    args += ["finetune.use_dora=true", "finetune.use_rslora=true", "checkpoint.every_steps=0"]
    proc = torchrun(2, args, REPO, bigscale_home, module="tests.distributed.logits_probe")
    assert proc.returncode == 0, explain(proc)
    rows = train_rows(run_dir)
    assert rows[-1]["loss"] < rows[0]["loss"], rows

    export = run_dir / "export"
    config = json.loads((export / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["use_rslora"] is True
    adapter = load_file(export / "adapter_model.safetensors")
    magnitudes = [n for n in adapter if "lora_magnitude_vector" in n]
    assert len(magnitudes) == 4 * 7, sorted(adapter)[:8]  # one per adapted layer

    base = AutoModelForCausalLM.from_pretrained(base_dir(bigscale_home))
    logits, engine = probe_logits(PeftModel.from_pretrained(base, export), run_dir)
    torch.testing.assert_close(logits, engine, atol=1e-5, rtol=1e-5)

    merged_dir = tmp_path / "merged"
    done = bigscale(["export", str(run_dir), "--out", str(merged_dir), "--merge-lora"],
                    cwd=tmp_path, home=bigscale_home)  # fmt: skip
    assert done.returncode == 0, explain(done)
    merged_logits, _ = probe_logits(AutoModelForCausalLM.from_pretrained(merged_dir), run_dir)
    torch.testing.assert_close(merged_logits, engine, atol=1e-5, rtol=1e-5)
