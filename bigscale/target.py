"""What ``bigscale eval | chat | generate`` point at: a run directory, a checkpoint or an export,
turned into a Hugging Face directory and loaded as a model + tokenizer.

A run directory or checkpoint is exported (verified first, see ``bigscale.checkpoint.export``)
into a temporary directory that lives as long as the command; an export is used in place. A LoRA
run gives peft's adapter directory: the base model it names is loaded with the adapter applied,
no merge needed."""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bigscale.config.schema import TrainConfig
from bigscale.errors import BigscaleError, ConfigError

CONFIG = "config.yaml"
ADAPTER_CONFIG = "adapter_config.json"


class TargetError(BigscaleError):
    """A target that is neither a run directory, a checkpoint nor a model directory."""


@dataclass(frozen=True)
class Target:
    model_dir: Path
    """A Hugging Face model directory, or peft's adapter directory for a LoRA run."""
    run_dir: Path | None
    """The run the target belongs to (the directory holding its config.yaml), if any."""
    step: int | None = None
    """The training step of the checkpoint the model comes from, when known."""

    @property
    def adapter_base(self) -> str | None:
        """The base model a LoRA adapter applies to; None for full weights."""
        path = self.model_dir / ADAPTER_CONFIG
        if not path.is_file():
            return None
        return str(json.loads(path.read_text())["base_model_name_or_path"])

    def run_config(self) -> TrainConfig | None:
        return run_config(self.run_dir) if self.run_dir else None


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() or (path / ADAPTER_CONFIG).is_file()


def _owning_run(path: Path) -> Path | None:
    """The nearest directory at or above ``path`` (three levels: run/checkpoints/step) with a
    config.yaml: the run a checkpoint or an export came from."""
    for candidate in [path, *list(path.parents)[:3]]:
        if (candidate / CONFIG).is_file():
            return candidate
    return None


@contextmanager
def resolve(target: Path) -> Iterator[Target]:
    """``target`` as a loadable directory for the duration of the block."""
    target = Path(target).expanduser().resolve()
    if not target.exists():
        raise TargetError(
            f"{target} does not exist: give a run directory, a checkpoint or an export"
        )
    if _is_model_dir(target) and not (target / "manifest.json").is_file():
        run_dir = _owning_run(target)
        yield Target(target, run_dir, _last_step(run_dir) if run_dir else None)
        return
    from bigscale.checkpoint.export import export_checkpoint

    with tempfile.TemporaryDirectory(prefix="bigscale-target-") as tmp:
        out = Path(tmp) / "model"
        found = export_checkpoint(target, out)  # refusals are CheckpointErrors, one line
        for note in found.notes:
            print(f"warning: {note}", file=sys.stderr)
        print(f"using {found.directory}", file=sys.stderr)
        yield Target(out, _owning_run(found.directory), _step(found.tag))


def _step(tag: str) -> int | None:
    from bigscale.checkpoint.select import step_of

    try:
        return step_of(tag)
    except (ValueError, IndexError):
        return None


def _last_step(run_dir: Path) -> int | None:
    """The last step the run logged: where its final export was written."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    steps = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            steps.append(int(json.loads(line).get("step", 0)))
        except (ValueError, TypeError, AttributeError):
            continue
    return max(steps, default=None)


def run_config(run_dir: Path) -> TrainConfig | None:
    """The run's config.yaml as the typed schema, or None when it cannot be read as one (a run
    from another bigscale version): callers then fall back to the model's own settings."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        raw = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.load(run_dir / CONFIG))
        typed = OmegaConf.to_object(raw)
    except (OmegaConfBaseException, OSError, ValueError):
        return None
    return typed if isinstance(typed, TrainConfig) else None


def load_tokenizer(target: Target) -> Any:
    """The target's tokenizer, with the run's ``data.chat_template`` when it has none itself
    (bigscale saves the template into checkpoints, so this only matters for older ones)."""
    from transformers import AutoTokenizer

    from bigscale.data.chat import set_chat_template

    tokenizer = AutoTokenizer.from_pretrained(target.model_dir)
    cfg = target.run_config()
    if not getattr(tokenizer, "chat_template", None) and cfg is not None:
        set_chat_template(tokenizer, cfg.data)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(target: Target, tokenizer: Any, dtype: str = "auto") -> Any:
    """The model in eval mode; a LoRA adapter applied to its base model."""
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    base = target.adapter_base
    source = base or str(target.model_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype)
    except (OSError, ValueError) as exc:
        raise TargetError(f"cannot load the model from {source!r}: {exc}") from None
    if base is not None:
        from peft import PeftModel

        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer))  # as training did before the adapter
        model = PeftModel.from_pretrained(model, str(target.model_dir))
    return model.eval()


def check_dtype(value: str) -> str:
    allowed = ("auto", "float32", "bfloat16", "float16")
    if value not in allowed:
        raise ConfigError(f"--dtype {value}: use one of {', '.join(allowed)}")
    return value
