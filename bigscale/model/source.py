"""Where the model comes from, checked before any rank loads it: a hub id, a local Hugging Face
directory, or the tiny model that bigscale creates in its own folder.

Only a path under ``<BIGSCALE_HOME>/models`` is ever created (``model.create_if_missing``); any
other local path is the user's and must already hold a model, so a typo fails here with the
path named instead of training a freshly created random model."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

from bigscale.config.schema import ModelConfig
from bigscale.errors import ConfigError, ModelError
from bigscale.home import is_within, models_dir

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# The pickled weight files from_pretrained loads (one, or shards); safetensors hold tensors only.
# Other pickles beside them (training_args.bin, optimizer.pt) are never loaded, so not checked.
PICKLED_WEIGHTS = "pytorch_model*.bin"


def looks_local(path: str) -> bool:
    """A hub id is ``org/name``; anything else (absolute, ./, ~, deeper paths) is a local path."""
    return not _HUB_ID.match(path) or Path(path).exists()


def creates_model(m: ModelConfig) -> bool:
    """Whether bigscale creates the tiny model: the preset asks for it and the path is
    bigscale's own (under ``<BIGSCALE_HOME>/models``), never a path the user typed elsewhere."""
    return m.create_if_missing is not None and is_within(m.name_or_path, models_dir())


def check_model_source(m: ModelConfig) -> None:
    """Raise ConfigError naming ``model.name_or_path`` when it cannot be what the ranks load."""
    if m.gguf_file is not None:
        from bigscale.model.gguf import check_gguf

        check_gguf(m)
        return
    path = Path(m.name_or_path).expanduser()
    if creates_model(m):
        if path.is_dir() and any(path.iterdir()) and not (path / "config.json").is_file():
            raise ConfigError(
                f"model.name_or_path={m.name_or_path} is bigscale's tiny-model folder but holds "
                "no config.json (an interrupted or foreign copy); delete it so bigscale "
                "creates the model again"
            )
        return
    if not looks_local(m.name_or_path):
        return  # a hub id; resolved (or not) by from_pretrained in the ranks
    if not path.is_dir():
        preset = ""
        if m.create_if_missing is not None:
            preset = (
                f"; the tiny-model preset (model.create_if_missing) creates a model only under "
                f"{models_dir()}, never at a path of yours"
            )
        raise ConfigError(
            f"model.name_or_path={m.name_or_path} does not exist: give a local directory "
            "holding a Hugging Face model (config.json + weights) or a hub id like "
            f"'Qwen/Qwen2.5-0.5B'{preset}"
        )
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"model.name_or_path={m.name_or_path} is a directory without config.json, so not a "
            "Hugging Face model directory: point it at the folder that holds config.json and the "
            "weights (as save_pretrained writes them)"
        )
    check_pickled_weights(path, m.name_or_path)


def check_pickled_weights(path: Path, key_value: str) -> None:
    """A directory with only pickled weights (no safetensors): the ranks load them with torch's
    weights-only unpickler, which refuses pickles holding anything but tensors and plain data.
    Find that out now, reading only the pickle (``mmap``: tensor data stays on disk)."""
    if any(path.glob("*.safetensors")):
        return  # transformers prefers the safetensors files
    weights = sorted(path.glob(PICKLED_WEIGHTS))
    if not weights:
        return  # no weights at all: from_pretrained names what it looked for
    import torch

    for f in weights:
        try:
            torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as exc:
            raise unsafe_pickle_error(key_value, f, exc) from None
        except RuntimeError:
            # A legacy (pre-zip) file cannot be memory-mapped; the ranks' own load decides.
            continue


def unsafe_pickle_error(key_value: str, file: Path | str, exc: BaseException) -> ModelError:
    # Keep torch's reason (the class it would not load), not its advice to load unsafely.
    reasons = [line.strip() for line in str(exc).splitlines() if "WeightsUnpickler" in line]
    reason = f" ({reasons[0].split('. Please use')[0]})" if reasons else ""
    return ModelError(
        f"model.name_or_path={key_value}: refusing to load {file}: it is a pickle holding more "
        "than tensors, and unpickling it could run arbitrary code, so bigscale loads only "
        "tensors from pickles. Convert it once, in an environment you trust: load the model "
        "with from_pretrained there and save it with save_pretrained(<dir>, "
        f"safe_serialization=True), then set model.name_or_path=<dir> (safetensors){reason}"
    )
