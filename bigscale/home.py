"""bigscale's own folder for what it generates (the tiny model, the demo task): the one place
that defines it, so the presets, the launcher and the ranks agree on what is bigscale's to write.

A path under it is bigscale's; any other path is the user's, which bigscale reads and never
writes or replaces with something generated."""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "BIGSCALE_HOME"
DEFAULT_HOME = ".cache/bigscale"  # relative to the working directory, like ./outputs


def bigscale_home() -> Path:
    """``$BIGSCALE_HOME``, else ``.cache/bigscale`` in the working directory (absolute)."""
    return Path(os.environ.get(HOME_ENV) or DEFAULT_HOME).expanduser().absolute()


def models_dir() -> Path:
    """Where the tiny model presets create their models."""
    return bigscale_home() / "models"


def data_dir() -> Path:
    """Where the built-in tasks write their data."""
    return bigscale_home() / "data"


def is_within(path: str | os.PathLike[str], folder: Path) -> bool:
    """Whether ``path`` lies strictly inside ``folder`` (symlinks and ``..`` resolved, so a
    link out of the home is not the home's)."""
    resolved = Path(path).expanduser().resolve()
    root = folder.resolve()
    return root in resolved.parents
