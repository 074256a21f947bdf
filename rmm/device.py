"""Where `rmm` computes: `--device auto|cpu|cuda`, and how many threads it may use there.

Every function in `rmm/` computes on the device of the tensors it is given (factors are read straight onto the
chosen device) and in float64 on both devices: the solves are small (r x r per position, (T r)-wide SVDs per
module), so float64 costs little, and it is what keeps a kept-whole task exact and a federated merge equal to the
centralised one. Results are moved to the CPU only to be written.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import torch

from rmm.errors import RMMError

DEVICES = ("auto", "cpu", "cuda")


def resolve(name: str | torch.device | None) -> torch.device:
    """The device `name` asks for: "auto" (or None) is CUDA when torch sees a GPU, else the CPU."""
    if isinstance(name, torch.device):
        return name
    name = name or "auto"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RMMError(f"unknown device {name!r}; use one of {', '.join(DEVICES)}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RMMError(f"device {name!r} asked for, but torch sees no CUDA GPU here; use --device cpu or auto")
    if device.type not in ("cpu", "cuda"):
        raise RMMError(f"unknown device {name!r}; use one of {', '.join(DEVICES)}")
    return device


def to_cpu(x):
    """`x` with every tensor in it (nested in dicts, lists, tuples, named tuples) moved to the CPU: results are
    written, and the allocator's scalar bisection run, there."""
    if isinstance(x, torch.Tensor):
        return x.cpu()
    if isinstance(x, dict):
        return {k: to_cpu(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        moved = [to_cpu(v) for v in x]
        return type(x)(*moved) if hasattr(x, "_fields") else type(x)(moved)
    return x


def workers(device: torch.device) -> int:
    """Modules solved at once. On the CPU one per core, each on one intra-op thread (`single_threaded`), so
    threads x intra-op threads never exceed the cores; on a GPU two, so that one module's reads overlap
    another's kernels."""
    if device.type == "cuda":
        return 2
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


@contextmanager
def single_threaded(device: torch.device) -> Iterator[None]:
    """On the CPU, torch's intra-op threads set to 1 for the duration (restored after): the module-level
    threads are the parallelism, and LAPACK on the small per-module problems gains little from more."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _libc():
    """glibc, if this process runs on it (for `release_memory`); None elsewhere."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _libc()


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def bound_heap() -> None:
    """Serve every block of 4 MiB or more (a module's stacked factors, its bases) by mmap, returned to the system
    when freed. glibc otherwise raises that threshold after the first such block is freed and serves the next ones
    from per-thread arenas, which fragment as modules of one shape come and go on several threads: the resident size
    of a merge drifted up by about 5 MiB per module (1.2x the adapters' bytes on a 1 GiB merge) instead of staying
    at the few modules in flight. Process-wide and lasting, and harmless: small blocks are unaffected."""
    if _LIBC is not None:
        _LIBC.mallopt(M_MMAP_THRESHOLD, 4 << 20)
