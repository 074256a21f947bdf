"""Safetensors reading with errors that name the file, and file hashing."""

from __future__ import annotations

import hashlib
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from rmm.errors import RMMError


def open_safetensors(file: Path):
    """`safe_open` that turns a missing, truncated or corrupt file into an RMMError naming it."""
    try:
        return safe_open(str(file), framework="pt")
    except (SafetensorError, OSError) as e:
        raise RMMError(f"unreadable safetensors file (missing, truncated or corrupt?): {e}", file=file) from None


def read_tensor(f, file: Path, key: str) -> torch.Tensor:
    """One tensor from an open safetensors file; a missing key or short file is an RMMError."""
    try:
        return f.get_tensor(key)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise RMMError(f"cannot read tensor {key!r} (missing key, truncated or corrupt file?): {e}", file=file) from None


def read_all(file: Path) -> dict[str, torch.Tensor]:
    with open_safetensors(file) as f:
        return {k: read_tensor(f, file, k) for k in f.keys()}


def sha256_file(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextmanager
def atomic_dir(out: Path):
    """Yield a fresh temporary directory beside `out`; on success it replaces `out` whole.

    On failure it is removed, so readers see the old `out` or the complete new one, never a mix.
    """
    out = Path(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
