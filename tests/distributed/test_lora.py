"""LoRA through peft on the real engine: one 2-rank torchrun per strategy (ddp, ZeRO-2, ZeRO-3
with activation checkpointing) trains adapters on the frozen tiny model; its checkpoint holds the
adapters and their optimizer state only; the exported adapter, loaded by peft on the pretrained
base, gives the trained engine's logits (so the base was not changed), and the merged export
(of the ZeRO-3 run) gives the same; a resumed ZeRO-3 run ends bitwise as the uninterrupted one.
Bad LoRA input fails with exit code 2 before anything trains."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from bigscale.dist.ds_files import load_consolidated_weights, weights_only_loading
from tests.cli import QUICK, bigscale, explain, torchrun, train_rows
from tests.exports import assert_generates_with_cache

pytestmark = pytest.mark.distributed

REPO = Path(__file__).parents[2]
STRATEGIES = ["ddp", "zero2", "zero3"]
ARGS = [
    *QUICK,
    "finetune=lora",
    "finetune.r=4",
    "trainer.max_steps=6",
    "trainer.log_every=1",
    "checkpoint.every_steps=3",
    "checkpoint.keep_last=0",
    "optim.lr=1e-2",
    "optim.warmup_steps=1",
    "eval.exact_match=false",
]
# The adapters inside checkpointed layers still get gradients (input grads enabled).
EXTRA = {"zero3": ["model.gradient_checkpointing=true"]}
FINAL, MIDDLE = "step_00000006", "step_00000003"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, bigscale_home: Path) -> dict[str, Path]:
    """Each strategy's run through the logits probe: training, checkpoints, the adapter export
    and the trained engine's logits of a fixed prompt."""
    work = tmp_path_factory.mktemp("lora")
    out = {}
    for strategy in STRATEGIES:
        run_dir = work / strategy
        args = [f"strategy={strategy}", f"run_dir={run_dir}", *ARGS, *EXTRA.get(strategy, [])]
        proc = torchrun(2, args, REPO, bigscale_home, module="tests.distributed.logits_probe")
        assert proc.returncode == 0, explain(proc)
        out[strategy] = run_dir
    return out


def base_dir(home: Path) -> Path:
    return home / "models" / "tiny-dropout"


def probe_logits(model: torch.nn.Module, run_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(the model's logits, the trained engine's) for the probe's prompt."""
    probe = torch.load(run_dir / "engine_logits.pt", weights_only=True)
    with torch.no_grad():
        logits = model.eval()(input_ids=torch.tensor([probe["input_ids"]])).logits
    return logits, probe["logits"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_adapters_train(runs: dict[str, Path], strategy: str) -> None:
    rows = train_rows(runs[strategy])
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert rows[-1]["loss"] < rows[0]["loss"], rows
    adapter = load_file(runs[strategy] / "export" / "adapter_model.safetensors")
    lora_b = [t for name, t in adapter.items() if "lora_B" in name]
    assert len(lora_b) == 4 * 7  # every linear layer of the 4 blocks, not the LM head
    # lora_B starts at zero: any non-zero value was learned.
    assert all(t.abs().max() > 0 for t in lora_b)


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for value in obj.values() for t in _tensors(value)]
    if isinstance(obj, (list, tuple)):
        return [t for value in obj for t in _tensors(value)]
    return []


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_checkpoint_holds_only_the_adapters(
    runs: dict[str, Path], strategy: str, bigscale_home: Path
) -> None:
    root = runs[strategy] / "checkpoints"
    weights = load_consolidated_weights(root, FINAL)
    assert weights and all("lora_" in name for name in weights), sorted(weights)[:8]
    trained = sum(t.numel() for t in weights.values())
    base = sum(t.numel() for t in load_file(base_dir(bigscale_home) / "model.safetensors").values())
    stored = 0
    with weights_only_loading():
        for path in (root / FINAL).glob("*_states.pt"):
            stored += sum(t.numel() for t in _tensors(torch.load(path, weights_only=True)))
    # At most the adapters in the module, an fp32 copy and Adam's two moments: 4 per trained
    # value. The smallest base weight file alone would exceed the slack.
    assert trained * 2 <= stored <= 4 * trained + 1024, (stored, trained)
    assert 4 * trained < base


def _adapter_logits(run_dir: Path, home: Path) -> torch.Tensor:
    """The exported adapter on the pretrained base gives the trained engine's logits."""
    base = AutoModelForCausalLM.from_pretrained(base_dir(home))
    with_adapter = PeftModel.from_pretrained(base, run_dir / "export")
    logits, engine = probe_logits(with_adapter, run_dir)
    torch.testing.assert_close(logits, engine, atol=1e-5, rtol=1e-5)
    # The adapter carries the generation config beside it.
    assert (run_dir / "export" / "generation_config.json").is_file()
    return logits


@pytest.mark.parametrize("strategy", ["ddp", "zero2"])
def test_exported_adapter_gives_the_engines_logits(
    runs: dict[str, Path], strategy: str, bigscale_home: Path
) -> None:
    _adapter_logits(runs[strategy], bigscale_home)


def test_exported_adapter_and_merged_model_give_the_engines_logits(
    runs: dict[str, Path], bigscale_home: Path
) -> None:
    """ZeRO-3's adapter, and the base with it merged by `bigscale export --merge-lora`. The
    merge runs on one strategy only (each `bigscale export` is a process start-up): it adds the
    same merge to weights read by the code the end-of-training adapter export runs, which the
    test above and this one check for every ZeRO stage's files (test_lora_variants.py merges a
    ZeRO-2 adapter too)."""
    run_dir = runs["zero3"]
    logits = _adapter_logits(run_dir, bigscale_home)

    merged_dir = run_dir / "merged"
    proc = bigscale(
        ["export", str(run_dir), "--out", str(merged_dir), "--merge-lora"],
        cwd=run_dir,
        home=bigscale_home,
    )
    assert proc.returncode == 0, explain(proc)
    assert not (merged_dir / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    merged_logits, _ = probe_logits(merged, run_dir)
    torch.testing.assert_close(merged_logits, logits, atol=1e-5, rtol=1e-5)
    # Inference settings restored, also after ZeRO-3's gradient checkpointing turned the
    # cache off.
    assert_generates_with_cache(merged_dir)


def test_resume_is_exact(runs: dict[str, Path], tmp_path: Path, bigscale_home: Path) -> None:
    """ZeRO-3 from the step-3 checkpoint to step 6: the frozen base comes from the pretrained
    model again, the adapters, optimizer, schedule, data position and RNG from the checkpoint."""
    first = runs["zero3"]
    resumed = tmp_path / "resumed"
    proc = bigscale(
        [
            "train",
            "strategy=zero3",
            "launcher.nproc_per_node=2",
            f"run_dir={resumed}",
            f"resume={first / 'checkpoints' / MIDDLE}",
            *ARGS,
            *EXTRA["zero3"],
        ],
        cwd=tmp_path,
        home=bigscale_home,
    )
    assert proc.returncode == 0, explain(proc)
    expected = {r["step"]: r["loss"] for r in train_rows(first) if r["step"] > 3}
    assert {r["step"]: r["loss"] for r in train_rows(resumed)} == expected
    before = load_consolidated_weights(first / "checkpoints", FINAL)
    after = load_consolidated_weights(resumed / "checkpoints", FINAL)
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert torch.equal(tensor, after[name]), name


def test_targets_that_match_nothing_list_the_layers(tmp_path: Path, bigscale_home: Path) -> None:
    proc = bigscale(
        [
            "train",
            "launcher.nproc_per_node=1",
            f"run_dir={tmp_path / 'run'}",
            *ARGS,
            "finetune.target_modules=[q_proj,qkv]",
        ],
        cwd=tmp_path,
        home=bigscale_home,
    )
    assert proc.returncode == 2, explain(proc)
    assert "Traceback" not in proc.stderr, explain(proc)
    assert "finetune.target_modules: qkv match no module" in proc.stderr, explain(proc)
    assert "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_unknown_method_fails_at_compose_time(tmp_path: Path, bigscale_home: Path) -> None:
    proc = bigscale(["plan", "finetune.method=qlora"], cwd=tmp_path, home=bigscale_home)
    assert proc.returncode == 2, explain(proc)
    assert "finetune.method" in proc.stderr and "full, lora" in proc.stderr, explain(proc)
