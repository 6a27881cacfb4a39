"""A model directory holding only pickled weights: a pickle of plain tensors loads, one with any
other object is refused for safety, in the launcher's check and in the rank's load alike, with
the way to convert it to safetensors and without torch's advice to load it unsafely."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bigscale.config.compose import compose_config
from bigscale.config.schema import Precision, TinyModelSpec
from bigscale.errors import ModelError
from bigscale.model.source import check_model_source
from bigscale.model.tiny import create_tiny_model


class NotATensor:
    """Any class outside torch's weights-only allowlist: unpickling it could run its code."""


def pickled_model(directory: Path, extra: object | None) -> Path:
    spec = TinyModelSpec(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
    create_tiny_model(directory, spec)
    weights = load_file(directory / "model.safetensors")
    (directory / "model.safetensors").unlink()
    if extra is not None:
        weights["extra"] = extra
    torch.save(weights, directory / "pytorch_model.bin")
    return directory


def model_cfg(directory: Path):
    return compose_config([f"model.name_or_path={directory}", "data=arithmetic"])


def assert_refused_for_safety(message: str, directory: Path) -> None:
    assert f"model.name_or_path={directory}" in message
    assert "could run arbitrary code" in message
    assert "safe_serialization=True" in message
    assert "NotATensor" in message  # torch's reason, kept
    assert "weights_only=False" not in message and "trust the source" not in message


def test_launcher_check_refuses_an_unsafe_pickle(tmp_path: Path) -> None:
    directory = pickled_model(tmp_path / "m", NotATensor())
    with pytest.raises(ModelError) as err:
        check_model_source(model_cfg(directory).model)
    assert_refused_for_safety(str(err.value), directory)
    assert "pytorch_model.bin" in str(err.value)


def test_launcher_check_accepts_a_pickle_of_tensors(tmp_path: Path) -> None:
    check_model_source(model_cfg(pickled_model(tmp_path / "m", None)).model)


def test_rank_load_maps_the_refusal(tmp_path: Path) -> None:
    from bigscale.model.load import load_model, load_tokenizer

    directory = pickled_model(tmp_path / "m", NotATensor())
    cfg = model_cfg(directory).model
    with pytest.raises(ModelError) as err:
        load_model(cfg, Precision.fp32, load_tokenizer(cfg))
    assert_refused_for_safety(str(err.value), directory)


def test_pickles_from_pretrained_never_loads_are_not_checked(tmp_path: Path) -> None:
    """A trainer's training_args.bin (a pickled object) beside tensor-only weights is fine."""
    directory = pickled_model(tmp_path / "m", None)
    torch.save({"args": NotATensor()}, directory / "training_args.bin")
    check_model_source(model_cfg(directory).model)
