"""The storage kinds, one file each, and what merge, revert, inspect and a federation ask of them by module.

    base.py      `StorageKind`: what a kind answers for (its tensors, numbers, fit, rebuild, error curve)
    truncate.py  no sharing: each task keeps its top k_t directions
    joint.py     shared U, V per module, a small core per task
    shared.py    the paper's per-position basis

A new kind is one file beside these plus one line in `KINDS`; the manifest's schema (`rmm.bundle`) takes its
name and its checks from here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from rmm.storage.base import FACTORS, Choice, Curves, Specs, StorageKind
from rmm.storage.joint import Joint
from rmm.storage.shared import Shared
from rmm.storage.truncate import Truncate

if TYPE_CHECKING:
    from rmm.bundle import ModuleEntry

# In this order the allocator breaks ties between equally good options.
KINDS: dict[str, StorageKind] = {
    "truncate": Truncate(),
    "joint": Joint(),
    "shared": Shared(),
}

__all__ = [
    "FACTORS",
    "KINDS",
    "Choice",
    "Curves",
    "StorageKind",
    "basis_specs",
    "coef_specs",
    "kind",
    "rebuild",
    "rebuild_all",
]


def kind(mod: ModuleEntry) -> StorageKind:
    return KINDS[mod.method]


def basis_specs(modules: list[ModuleEntry], dtype: torch.dtype) -> Specs:
    """Name -> (dtype, shape) of every tensor of the basis file."""
    return {f"{m.name}.{k}": spec for m in modules for k, spec in kind(m).basis_specs(m, dtype).items()}


def coef_specs(modules: list[ModuleEntry], dtype: torch.dtype, task: str) -> Specs:
    """Name -> (dtype, shape) of every tensor of `task`'s coefficients file."""
    return {f"{m.name}.{k}": spec for m in modules for k, spec in kind(m).coef_specs(m, dtype, task).items()}


def rebuild(mod: ModuleEntry, shared: dict, own: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """One task's folded factors (B, A) of one module, float64, from its basis tensors `shared` and its own
    tensors `own` (by suffix)."""
    return kind(mod).rebuild(mod, {k: v.double() for k, v in (shared | own).items()})


def rebuild_all(mod: ModuleEntry, shared: dict, own: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every task's folded factors of one module at once, (T, out, k) and (T, k, in) (or one (k, in) all share),
    float64. Where the tasks'
    own tensors are alike in shape they are stacked and rebuilt in one call (a kind's `rebuild` works over a leading
    task dimension); else each task is rebuilt and its factors zero-padded to the widest rank (same dW)."""
    if all(x[k].shape == own[0][k].shape for x in own for k in own[0]):
        return rebuild(mod, shared, {k: torch.stack([x[k] for x in own]) for k in own[0]})
    found = [rebuild(mod, shared, x) for x in own]
    k = max(B.shape[1] for B, _ in found)
    B = torch.stack([torch.nn.functional.pad(B, (0, k - B.shape[1])) for B, _ in found])
    A = torch.stack([torch.nn.functional.pad(A, (0, 0, 0, k - A.shape[0])) for _, A in found])
    return B, A
