"""Reversible Model Merging of LoRA adapters: a compact basis plus per-task coefficients."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("rmm-federation")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"
