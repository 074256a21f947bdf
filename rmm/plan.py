"""How each module of a merge is stored: its shape, and the storage kind and size the options give it.

`module_specs` reads the shapes off the adapters; method "rmm-paper" then gives every module one basis size
(`plan_modules`), method "auto" the allocator's choices (`planned_modules`, from `rmm.allocate`), and a merge
against a basis solved elsewhere takes the plan that basis carries (`modules_of_basis`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rmm.adapter import LoraAdapter
from rmm.bundle import MergeOptions, ModuleEntry
from rmm.canonical import canonicalize
from rmm.errors import RMMError
from rmm.io import open_safetensors
from rmm.solver import storage_numbers
from rmm.storage import KINDS, Choice, kind

PLAN = "rmm.plan"  # metadata key of a federation's "auto" basis file: its modules as planned, as JSON


def module_specs(adapters: list[LoraAdapter]) -> list[ModuleEntry]:
    """Each module's shape and largest rank over the adapters (p left at 0: not planned yet)."""
    return [
        ModuleEntry(
            name=m,
            out_features=s.out_features,
            in_features=s.in_features,
            p=0,
            rank=max(a.modules[m].rank for a in adapters),
        )
        for m, s in adapters[0].modules.items()
    ]


def numbers_original(adapters: list[LoraAdapter]) -> int:
    return sum(a.lora_numbers for a in adapters)


def storage_dtype(adapters: list[LoraAdapter]) -> torch.dtype:
    """The inputs' dtype when they agree; otherwise the widest float, so no input loses precision."""
    dtypes = {a.dtype for a in adapters}
    if len(dtypes) == 1:
        return dtypes.pop()
    return torch.float64 if torch.float64 in dtypes else torch.float32


def stack_factors(
    adapters: list[LoraAdapter], mod: ModuleEntry, canonical: bool, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """All tasks' folded factors of one module on `device`, zero-padded to its largest rank: (T,out,r), (T,r,in)."""
    T, r = len(adapters), mod.rank
    B = torch.zeros(T, mod.out_features, r, dtype=torch.float64, device=device)
    A = torch.zeros(T, r, mod.in_features, dtype=torch.float64, device=device)
    for t, a in enumerate(adapters):  # filled in place: one task's factors at a time besides the stack
        Bt, At = a.load_factors(mod.name, device)
        B[t, :, : Bt.shape[1]], A[t, : At.shape[0]] = Bt, At
        del Bt, At
    return canonicalize(B, A) if canonical else (B, A)


def choose_basis_size(storage_ratio: float, shapes: list[tuple[int, int]], numbers_original: int, tasks: int) -> int:
    """Largest p whose storage, summed over modules, fits `storage_ratio` of the originals.

    `shapes` are (positions, rank) per factor of every module; p is capped per module at what
    can carry information (rank, and T - 1 centred directions).
    """
    budget = storage_ratio * numbers_original
    for p in range(max(r for _, r in shapes), -1, -1):
        if sum(storage_numbers(n, r, tasks, min(p, r, tasks - 1)) for n, r in shapes) <= budget:
            return p
    minimum = sum(storage_numbers(n, r, tasks, 0) for n, r in shapes) / numbers_original
    raise RMMError(f"storage ratio {storage_ratio} is below the minimum {minimum:.4f} (the means alone, p = 0)")


def plan_modules(specs: list[ModuleEntry], tasks: int, lora_numbers: int, options: MergeOptions) -> list[ModuleEntry]:
    """Method "rmm-paper": the basis size of every module for `tasks` adapters holding `lora_numbers` LoRA numbers."""
    if options.basis_size is not None:
        p = options.basis_size
    else:
        shapes = [(n, m.rank) for m in specs for n in (m.out_features, m.in_features)]
        p = choose_basis_size(options.storage_ratio, shapes, lora_numbers, tasks)
    return [m.model_copy(update={"p": min(p, m.rank, tasks - 1)}) for m in specs]


def planned_modules(specs: list[ModuleEntry], plan: list[Choice], tasks: list[str]) -> list[ModuleEntry]:
    """The module entries of an allocation (`rmm.allocate.allocate`) for `tasks`, in their order."""
    return [KINDS[c.kind].planned(m, c, tasks) for m, c in zip(specs, plan)]


def modules_of_basis(basis: Path, specs: list[ModuleEntry], tasks: list[str], method: str) -> list[ModuleEntry]:
    """The modules of a given basis file (a federation's), checked against the adapters' modules.

    An "auto" basis carries its plan (how each module is stored, every task's ranks) in its metadata;
    a per-position ("rmm-paper") basis gives p by its shapes.
    """
    with open_safetensors(basis) as f:
        meta = f.metadata() or {}
        if (PLAN in meta) != (method == "auto"):
            built = "auto" if PLAN in meta else "rmm-paper"
            raise RMMError(
                f"this basis was built by method {built}; merge against it with that method, not {method}", file=basis
            )
        if PLAN in meta:
            planned = [ModuleEntry.model_validate(m) for m in json.loads(meta[PLAN])]
            if [m.name for m in planned] != [m.name for m in specs]:
                raise RMMError("the basis' plan covers other modules than the adapters", file=basis)
            mine = []
            for m, spec in zip(planned, specs):
                if (m.out_features, m.in_features) != (spec.out_features, spec.in_features) or m.rank < spec.rank:
                    shape = f"{m.out_features}x{m.in_features} rank {m.rank}"
                    raise RMMError(f"plan shape {shape} does not fit the adapters'", file=basis, module=m.name)
                try:
                    mine.append(kind(m).for_tasks(m, tasks))
                except RMMError as e:
                    raise RMMError(e.reason, file=basis, module=e.module) from None
            return mine
        planned = []
        keys = set(f.keys())
        for m in specs:
            key = f"{m.name}.B.basis"
            if key not in keys:
                raise RMMError("the basis has no entry for this module", file=basis, module=m.name)
            n_out, rank, p = f.get_slice(key).get_shape()
            n_in = f.get_slice(f"{m.name}.A.basis").get_shape()[0]
            if (n_out, n_in) != (m.out_features, m.in_features) or rank < m.rank:
                raise RMMError(
                    f"basis shape {n_out}x{n_in} rank {rank} does not fit the adapters' "
                    f"{m.out_features}x{m.in_features} rank {m.rank}",
                    file=basis,
                    module=m.name,
                )
            planned.append(m.model_copy(update={"rank": rank, "p": p}))
    return planned
