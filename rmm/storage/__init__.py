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

__all__ = ["FACTORS", "KINDS", "Choice", "Curves", "StorageKind", "basis_specs", "coef_specs", "kind", "rebuild"]


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
