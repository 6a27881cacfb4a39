"""Versions of the packages a run depends on, recorded in every checkpoint."""

from __future__ import annotations

import functools
from importlib.metadata import PackageNotFoundError, version

PACKAGES = ("bigscale", "torch", "deepspeed", "transformers", "datasets", "accelerate")


def package_versions() -> dict[str, str]:
    return dict(_installed())


# Read once per process: the trainer builds a checkpoint's metadata after every step, and the
# metadata lookups cost about 3 ms, a few percent of a small model's step.
@functools.cache
def _installed() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out
