"""Versions of the packages a run depends on, recorded in every checkpoint."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

PACKAGES = ("bigscale", "torch", "deepspeed", "transformers", "datasets", "accelerate")


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out
