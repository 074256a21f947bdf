"""What a storage kind is: how one module of a bundle is stored, fitted, rebuilt and priced.

A kind (one file each beside this one, registered in `rmm.storage.KINDS`) answers for the modules the
manifest says it stores (`ModuleEntry.method` is its name): the tensors it keeps in the basis file (shared
by all tasks) and in each task's coefficients file, keyed "<module>.<suffix>"; how many numbers that is;
how to fit them to the tasks' factors and rebuild a task's (B, A) from them; and, for the allocator of
method "auto" (`rmm.allocate`), its error curve, its best option at a price per stored number and its plain
plan, centrally and in a federation's two rounds (`rmm.payload`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

if TYPE_CHECKING:
    from rmm.adapter import LoraAdapter
    from rmm.bundle import ModuleEntry

FACTORS = ("B", "A")  # B positions are rows of lora_B, A positions are columns of lora_A
Specs = dict[str, tuple[torch.dtype, tuple[int, ...]]]  # suffix -> (dtype, shape)
Factors = tuple[torch.Tensor, torch.Tensor]  # all tasks' (B, A) of one module: (T, out, r), (T, r, in)
Read = Callable[[str], torch.Tensor]  # suffix -> tensor of one module, from a file
Shape = Callable[[str], tuple[int, ...]]  # suffix -> shape of a tensor of one module, from a file


@dataclass(frozen=True)
class Curves:
    """One module's options for the allocator: every kind's error curve (relative squared dW error per task
    of each of its options; `StorageKind.curve`), by kind name."""

    n_out: int
    n_in: int
    rank: int  # the module's padded rank r
    ranks: tuple[int, ...]  # each task's own rank at this module (the factors are zero-padded beyond)
    kinds: dict[str, Any]

    @property
    def numbers(self) -> int:
        """What the tasks hold at this module, kept whole."""
        return sum(self.ranks) * (self.n_out + self.n_in)


@dataclass(frozen=True)
class Choice:
    """What one module keeps: a kind and its setting (per-task ranks, a joint size (Ku, Kv), a basis size p)."""

    kind: str
    setting: Any
    cost: int  # numbers stored
    errors: list[float]  # relative squared dW error per task, as planned


class StorageKind(ABC):
    name: str
    # Fitted to the canonical factors (`rmm.canonical`); else to the raw ones, unless the merge canonicalises.
    canonical: bool

    # --- the bundle ---------------------------------------------------------------------------------

    def check(self, mod: ModuleEntry) -> None:
        """Raise ValueError if the manifest's entry lacks what this kind needs (`ModuleEntry` validates with it)."""

    def check_tasks(self, mod: ModuleEntry, tasks: list[str]) -> None:
        """Raise ValueError if the entry does not fit the manifest's tasks (`Manifest` validates with it)."""

    @abstractmethod
    def basis_specs(self, mod: ModuleEntry, dtype: torch.dtype) -> Specs:
        """What the module keeps in the basis file, shared by all tasks."""

    @abstractmethod
    def coef_specs(self, mod: ModuleEntry, dtype: torch.dtype, task: str) -> Specs:
        """What `task` keeps on its own in its coefficients file."""

    @abstractmethod
    def stored_numbers(self, mod: ModuleEntry, tasks: int) -> int:
        """The numbers the module stores for `tasks` tasks, by formula."""

    @abstractmethod
    def describe(self, mod: ModuleEntry) -> str:
        """How the module is stored, in a few characters ("p=2", "truncate 3-5", "joint 8x8")."""

    def basis_size(self, mod: ModuleEntry) -> int | None:
        """The per-position basis size p, for a kind that has one."""
        return None

    def for_tasks(self, mod: ModuleEntry, tasks: list[str]) -> ModuleEntry:
        """The module as a site holding only `tasks` stores it under a federation's plan."""
        return mod

    @abstractmethod
    def fit(
        self,
        mod: ModuleEntry,
        adapters: list[LoraAdapter],
        raw: Factors,
        factors: Factors,
        dtype: torch.dtype,
        given: dict[str, torch.Tensor] | None,
    ) -> tuple[dict, list[dict], dict[str, float] | None]:
        """(basis tensors, each task's tensors, energy kept) of the module, in `dtype`, from the tasks' `raw`
        factors and the `factors` it fits (canonical or raw). With `given` (the basis tensors of a basis file solved
        elsewhere) only the tasks' tensors are fitted. Energy None: the share of the tasks' summed ||dW||^2 kept."""

    @abstractmethod
    def rebuild(self, mod: ModuleEntry, x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """One task's folded (B, A) from its basis and own tensors `x` (by suffix, float64)."""

    # --- the allocator (method "auto") ----------------------------------------------------------------

    @abstractmethod
    def curve(self, raw: Factors, canonical: Factors, ranks: list[int]) -> Any:
        """The module's error curve, centrally, from all tasks' raw and canonical factors and their own ranks."""

    @abstractmethod
    def choose(self, c: Curves, price: float) -> tuple[torch.Tensor, Choice]:
        """The best option at `price` per number, and its objective (out + in) x summed errors + price x cost."""

    @abstractmethod
    def plain(self, modules: list[Curves], budget: float) -> list[Choice]:
        """This kind alone on every module at the same storage ratio: a candidate plan."""

    @abstractmethod
    def planned(self, mod: ModuleEntry, choice: Choice, tasks: list[str]) -> ModuleEntry:
        """The module entry of `choice` for `tasks`."""

    def keeps_something_from(self, c: Curves) -> float | None:
        """The module's storage ratio from which this kind's plain plan surely keeps something, if it promises that."""
        return None

    # --- method "auto" in a federation: round 1 (spectra), the coordinator's bases, round 2 (curves) ---

    def spectra_specs(self, mod: ModuleEntry, n: int) -> Specs:
        """What a site of `n` tasks sends in round 1 besides their singular values and ranks."""
        return {}

    def spectra(self, mod: ModuleEntry, raw: Factors, canonical: Factors) -> dict[str, torch.Tensor]:
        return {}

    def bases_specs(self, mod: ModuleEntry, ranks: list[int]) -> Specs:
        """What the coordinator builds from the spectra of the tasks of `ranks`, for the sites' curves."""
        return {}

    def bases(self, mod: ModuleEntry, ranks: list[int], sites: list[tuple[int, Read]], specs: Specs) -> dict:
        """Those tensors (of `specs`, by suffix), from each site's task count and spectra."""
        return {}

    def curve_width(self, mod: ModuleEntry, bases: Shape) -> int | None:
        """Columns of each task's round-2 curve, given the shapes of the coordinator's bases; None: it sends none."""
        return None

    def site_curve(self, mod: ModuleEntry, raw: Factors, canonical: Factors, bases: Read) -> torch.Tensor | None:
        """Each task's round-2 curve (n, `curve_width`) against the coordinator's bases."""
        return None

    @abstractmethod
    def federated_curve(self, S: torch.Tensor, rows: torch.Tensor | None, bases: Shape) -> Any:
        """The module's curve on the coordinator, from every task's singular values `S`, its round-2 `rows` (task
        order of the spectra) and the shapes of its bases."""
