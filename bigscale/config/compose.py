"""Compose a run's configuration from ``conf/`` with Hydra, then turn it into typed objects.

The compose API is used instead of ``@hydra.main`` so that the launcher and every rank build the
configuration the same way, and so Hydra creates no per-process output directories: the run
directory is bigscale's own (decided once by the launcher)."""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from bigscale.config.redact import (
    redact,
    redact_text,
    remember_env_values,
    secret_env_names,
)
from bigscale.config.schema import TrainConfig
from bigscale.errors import ConfigError
from bigscale.home import bigscale_home

SCHEMA_NAME = "train_schema"
DEFAULT_EXPERIMENT = "demo"
# Overrides that name the model or the data a run trains: with one of them and no experiment=,
# the run is the user's own, and the demo experiment (its model, data, tuning, test set and
# metric) is left out. Other model.* and data.* keys (data.max_length, ...) tune the demo.
_SOURCE_GROUPS = ("model", "data")
_SOURCE_KEYS = ("model.name_or_path", "model.gguf_file", "data.path", "data.mixture")


def demo_left_out(overrides: list[str]) -> str | None:
    """The override that leaves the default ``experiment=demo`` out, or None when it applies.
    Decided here, at composition, so the launcher, the plan and every rank (also under a user's
    own torchrun) agree."""
    keys = [o.lstrip("+~").split("=", 1)[0] for o in overrides]
    if any(k.split("@", 1)[0] == "experiment" for k in keys):
        return None  # an experiment the user named applies whatever else is set
    for key, text in zip(keys, overrides, strict=True):
        if key.split("@", 1)[0] in _SOURCE_GROUPS or key in _SOURCE_KEYS:
            return text
    return None


def with_default_experiment(overrides: list[str]) -> list[str]:
    """``overrides`` plus ``experiment=none`` when they name a model or data of their own."""
    return [*overrides, "experiment=none"] if demo_left_out(overrides) else list(overrides)


def config_dir() -> Path:
    """``conf/`` next to the package (a source checkout), or ``$BIGSCALE_CONFIG_DIR``."""
    env = os.environ.get("BIGSCALE_CONFIG_DIR")
    if env:
        return Path(env).resolve()
    return (Path(__file__).resolve().parents[2] / "conf").resolve()


def _register_schema() -> None:
    ConfigStore.instance().store(name=SCHEMA_NAME, node=TrainConfig)
    # The presets name bigscale's own folder as ${bigscale_home:}, so YAML and code share one
    # definition of it (bigscale.home).
    OmegaConf.register_new_resolver("bigscale_home", lambda: str(bigscale_home()), replace=True)


def compose_raw(overrides: list[str], conf_dir: Path | None = None) -> DictConfig:
    """Hydra composition only: defaults list, group choices and overrides, checked against the
    schema. Raises ConfigError naming the offending key."""
    _register_schema()
    GlobalHydra.instance().clear()
    directory = conf_dir or config_dir()
    if not (directory / "train.yaml").is_file():
        raise ConfigError(
            f"no train.yaml in config directory {directory}; set BIGSCALE_CONFIG_DIR to the "
            "folder holding bigscale's conf/"
        )
    try:
        with initialize_config_dir(config_dir=str(directory), version_base="1.3"):
            cfg = compose(
                config_name="train", overrides=with_default_experiment(keyword_keys(overrides))
            )
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        raise ConfigError(_explain(exc)) from None
    finally:
        GlobalHydra.instance().clear()
    _remember_env_values(cfg)
    return cfg


KEYWORD_KEYS = {"checkpoint.async": "checkpoint.async_"}
"""Keys users type whose last part is a Python keyword, and the schema field behind each."""


def keyword_keys(overrides: list[str]) -> list[str]:
    """``checkpoint.async=false`` as the schema spells it (``checkpoint.async_``)."""
    out = []
    for item in overrides:
        key, sep, value = item.partition("=")
        prefix = key[: len(key) - len(key.lstrip("+~"))]
        name = KEYWORD_KEYS.get(key[len(prefix) :])
        out.append(f"{prefix}{name}{sep}{value}" if name and sep else item)
    return out


def _remember_env_values(cfg: DictConfig) -> None:
    """Tell the redactor which values came from secret ``${oc.env:...}`` interpolations: after
    resolution nothing marks them, so the raw nodes are inspected here, before it."""
    keys: list[str] = []
    values: list[str] = []

    def walk(node: object, path: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{path}.{k}" if path else str(k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}.{i}")
        elif isinstance(node, str) and (names := secret_env_names(node)):
            keys.append(path)
            values.extend(os.environ[n] for n in names if os.environ.get(n))
            try:
                resolved = OmegaConf.select(cfg, path, throw_on_missing=False)
            except OmegaConfBaseException:
                return  # an unset variable without default: to_typed reports it
            if isinstance(resolved, str):
                values.append(resolved)

    walk(OmegaConf.to_container(cfg, resolve=False), "")
    remember_env_values(keys, values)


def to_typed(cfg: DictConfig) -> TrainConfig:
    """Resolve interpolations and build the dataclasses (missing required values fail here)."""
    try:
        typed = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        raise ConfigError(_explain(exc)) from None
    assert isinstance(typed, TrainConfig)
    return typed


def compose_config(overrides: list[str], conf_dir: Path | None = None) -> TrainConfig:
    raw = compose_raw(overrides, conf_dir)
    _check_own_run_complete(raw, overrides)
    return to_typed(raw)


def _check_own_run_complete(raw: DictConfig, overrides: list[str]) -> None:
    """A run of the user's own (the demo left out) names both its model and its data."""
    named = demo_left_out(overrides)
    if named is None:
        return
    missing = [
        f"{group}.{key}"
        for group, key in (("model", "name_or_path"), ("data", "path"))
        if OmegaConf.is_missing(raw[group], key)
    ]
    if not missing:
        return
    hints = {
        "model.name_or_path": "model=<preset: conf/model/*.yaml> or model.name_or_path=<hub id "
        "or directory>",
        "data.path": "data=<preset: text_files, sft_files, chat_files, alpaca_files, ...> "
        "data.path=<your files>",
    }
    raise ConfigError(
        f"{' and '.join(missing)} not set: your run names its own model or data ({named}), so "
        f"the demo experiment's are left out; give {'; '.join(hints[k] for k in missing)} "
        "(or experiment=demo to train the demo with your changes)"
    )


def _explain(exc: BaseException) -> str:
    """One readable message; for an unknown key, the closest valid names."""
    text = str(exc).strip()
    cause = exc.__cause__ or exc.__context__
    if cause is not None and str(cause).strip() and str(cause).strip() not in text:
        text = f"{text}\n{str(cause).strip()}"
    text = _strip_noise(text)
    key = getattr(exc, "full_key", None) or getattr(cause, "full_key", None)
    hint = _suggest(key) if key else ""
    # A value that failed to convert is quoted in the message; it may be a secret from the env.
    return redact_text(f"invalid configuration: {text}{hint}")


def _strip_noise(text: str) -> str:
    """Drop OmegaConf/Hydra lines that say nothing to a user (types, search path, '+' hints:
    appending a key the schema lacks is refused anyway)."""
    noise = ("reference_type=", "object_type=", "To append to your config", "Config search path")
    kept: list[str] = []
    for line in text.splitlines():
        if line.strip().startswith(noise[-1]):
            break
        if not line.strip().startswith(noise[:-1]):
            kept.append(line)
    return "\n".join(kept).strip()


def _suggest(full_key: str) -> str:
    parts = full_key.split(".")
    node: object = OmegaConf.structured(TrainConfig)
    for part in parts[:-1]:
        if not isinstance(node, DictConfig) or part not in node:
            return ""
        node = node[part]
    if not isinstance(node, DictConfig):
        return ""
    valid = [str(k) for k in node]
    close = difflib.get_close_matches(parts[-1], valid, n=3)
    if parts[-1] in valid:
        return ""
    where = ".".join(parts[:-1]) or "the top level"
    options = f"did you mean {', '.join(close)}? " if close else ""
    return f"\n{options}Valid keys under {where}: {', '.join(valid)}"


def to_plain_dict(cfg: TrainConfig) -> dict:
    """Plain, YAML/JSON-ready values (enums as strings) for config.yaml and W&B."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)


def to_redacted_dict(cfg: TrainConfig) -> dict:
    """``to_plain_dict`` with secrets replaced: what config.yaml holds and W&B receives."""
    return redact(to_plain_dict(cfg))


def to_yaml(cfg: TrainConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(to_redacted_dict(cfg)))
