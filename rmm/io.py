"""Safetensors reading with errors that name the file, file hashing, and the rule for names that become paths."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from rmm.errors import RMMError


# Names read from bundles, adapters and sites become file names (coefficients/<task>.safetensors,
# <out>/<task>/): one path component, no separators, no leading dot (no "..", no hidden files),
# printable, at most 128 characters.
_SAFE_NAME = re.compile(r"[A-Za-z0-9_+=@,-][A-Za-z0-9._+=@, -]{0,127}")


def safe_name(name: str, what: str = "task name", *, file: str | Path | None = None) -> str:
    """`name` when it is safe as one path component; otherwise an RMMError naming it and the rule."""
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name):
        raise RMMError(
            f"{what} {name!r} cannot be used as a file name: letters, digits and . _ + = @ , - or space, "
            "not starting with '.' or a space, at most 128 characters",
            file=file,
        )
    return name


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
        raise RMMError(
            f"cannot read tensor {key!r} (missing key, truncated or corrupt file?): {e}", file=file
        ) from None


def read_all(file: Path) -> dict[str, torch.Tensor]:
    with open_safetensors(file) as f:
        return {k: read_tensor(f, file, k) for k in f.keys()}


def tensor_counts(file: Path, keep: Callable[[str], bool] = lambda key: True) -> tuple[int, int]:
    """Numbers and bytes of the tensors of a safetensors file whose key `keep` accepts, read off its header."""
    try:
        with open(file, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        tensors = [v for k, v in header.items() if k != "__metadata__" and keep(k)]
        numbers = sum(math.prod(v["shape"]) for v in tensors)
        return numbers, sum(v["data_offsets"][1] - v["data_offsets"][0] for v in tensors)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise RMMError(f"unreadable safetensors header (missing, truncated or corrupt?): {e}", file=file) from None


def sha256_file(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_output(out: str | Path, force: bool, inputs: Iterable[str | Path] = ()) -> None:
    """Refuse an output that would lose a user's files, before anything is read or written.

    A non-empty output is replaced only when forced; an output that is a file (or lies under one),
    or that contains or lies inside one of `inputs` (resolved: links and ".." included), never is.
    """
    out = Path(out)
    resolved = out.resolve()
    for given in inputs:
        source = Path(given).resolve()
        if resolved.is_relative_to(source) or source.is_relative_to(resolved):
            raise RMMError(
                f"the output and the input {given} contain one another; --force never replaces an input: choose "
                "another output",
                file=out,
            )
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise RMMError(f"{existing} is a file; the output must be a directory", file=out)
    if out.exists() and not force and any(out.iterdir()):
        raise RMMError("output exists and is not empty; pass --force to replace it", file=out)


@contextmanager
def atomic_dir(out: Path, *, keep_existing: bool = False):
    """Yield a fresh temporary directory beside `out`; on success it replaces `out` whole.

    On failure it is removed, so readers see the old `out` or the complete new one, never a mix.
    With `keep_existing` (caches keyed by their content), an `out` that another process finished
    first is kept and the new copy dropped.
    """
    out = Path(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as e:  # read-only or virtual file systems (/proc), no permission, a file in the way
        raise RMMError(f"cannot write here: {e.strerror or e}", file=out) from None
    try:
        yield tmp
        if keep_existing and out.is_dir():
            return
        shutil.rmtree(out, ignore_errors=True)
        try:
            tmp.rename(out)
        except OSError:  # another process renamed its copy in between: keep theirs if asked to
            if not (keep_existing and out.is_dir()):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
}


class StreamingWriter:
    """Writes a safetensors file one tensor at a time, in a declared order.

    The safetensors library saves only whole dicts, which would hold a merge's entire output in
    memory. The format is simple (an 8-byte little-endian header length, a JSON header giving each
    tensor's dtype, shape and byte range, then the raw bytes), so when every shape is known up front
    the header goes first and the data streams after it. Files read back with `safe_open`.

    No file is held open between writes (each write appends and closes), so a merge writing one coefficients
    file per task needs a file handle for one of them at a time, however many tasks it has.
    """

    def __init__(
        self, file: Path, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]], metadata: dict[str, str] | None = None
    ):
        header: dict = {"__metadata__": metadata} if metadata else {}
        offset = 0
        for key, (dtype, shape) in specs.items():
            size = dtype.itemsize * int(torch.Size(shape).numel())
            header[key] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned, as safetensors does
        self._pending = iter(specs.items())
        self._path = Path(file)
        self._path.write_bytes(len(raw).to_bytes(8, "little") + raw)
        self.numbers = self.bytes = 0

    def write(self, key: str, tensor: torch.Tensor) -> None:
        want_key, (dtype, shape) = next(self._pending)
        if (key, tensor.dtype, tuple(tensor.shape)) != (want_key, dtype, tuple(shape)):
            raise ValueError(
                f"expected {want_key} {dtype} {tuple(shape)}, got {key} {tensor.dtype} {tuple(tensor.shape)}"
            )
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        with open(self._path, "ab") as f:
            f.write(memoryview(data))
        self.numbers += tensor.numel()
        self.bytes += data.nbytes

    def close(self) -> None:
        leftover = next(self._pending, None)
        if leftover is not None:
            raise ValueError(f"{leftover[0]} was declared but never written")
