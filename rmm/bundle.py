"""The basis bundle on disk: what it holds, and the typed manifest that describes it.

    BUNDLE/
      manifest.json                  tasks, modules (how each is stored), options, input hashes, report
      basis.safetensors              what the tasks share, per module
      coefficients/<task>.safetensors  what each task keeps on its own, per module
      extras/<task>.safetensors      the task's non-LoRA tensors (modules_to_save), untouched

A module is stored one of three ways (`ModuleEntry.method`):
  shared    per-position basis (the paper's RMM): basis "<module>.B.mean" (out, r), "<module>.B.basis"
            (out, r, p), same for A (in, ...); coefficients "<module>.B" (out, p), "<module>.A" (in, p)
  truncate  no sharing: coefficients "<module>.B" (out, k_t), "<module>.A" (in, k_t), k_t = ranks[task]
  joint     basis "<module>.U" (out, Ku), "<module>.V" (in, Kv); coefficients "<module>.M" (Ku, Kv);
            dW_t = U M_t V^T

Reverting one task reads the basis (one module at a time) and that task's two small files only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from rmm.errors import RMMError

FORMAT = "rmm-bundle/1"
MANIFEST = "manifest.json"
BASIS_FILE = "basis.safetensors"
FACTORS = ("B", "A")  # B positions are rows of lora_B, A positions are columns of lora_A


def coefficients_file(bundle: Path, task: str) -> Path:
    return bundle / "coefficients" / f"{task}.safetensors"


def extras_file(bundle: Path, task: str) -> Path:
    return bundle / "extras" / f"{task}.safetensors"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MergeOptions(_Strict):
    """How to merge. The default: method "auto" at half the storage.

    "auto" spends the storage budget per module on per-task rank truncation or joint sharing
    (`rmm.allocate`); "rmm-paper" is the paper's per-position basis, sized by basis_size or
    storage_ratio, optionally on canonicalised factors. A basis size or canonicalize implies it.
    """

    method: Literal["auto", "rmm-paper"] | None = None
    basis_size: int | None = None
    storage_ratio: float | None = None
    canonicalize: bool = False

    @model_validator(mode="after")
    def _one_budget(self) -> "MergeOptions":
        paper_only = self.basis_size is not None or self.canonicalize
        if self.method is None:
            self.method = "rmm-paper" if paper_only else "auto"
        if self.method == "auto" and paper_only:
            raise ValueError("basis_size and canonicalize apply to method rmm-paper; method auto takes a storage_ratio")
        if self.basis_size is not None and self.storage_ratio is not None:
            raise ValueError("give either basis_size or storage_ratio, not both")
        if self.basis_size is None and self.storage_ratio is None:
            self.storage_ratio = 0.5
        if self.basis_size is not None and self.basis_size < 0:
            raise ValueError("basis_size must be >= 0")
        if self.storage_ratio is not None and not 0 < self.storage_ratio:
            raise ValueError("storage_ratio must be > 0")
        return self


class TaskEntry(_Strict):
    name: str
    source: str
    sha256: str  # of adapter_model.safetensors
    dtype: str  # the original LoRA weights' dtype, restored on revert
    config: dict  # the original adapter_config.json
    extras: list[str]  # non-LoRA tensor keys carried through


class ModuleEntry(_Strict):
    name: str  # key prefix, e.g. "base_model.model.model.layers.0.self_attn.q_proj"
    out_features: int
    in_features: int
    rank: int  # largest rank over tasks; lower ranks are zero-padded after folding scaling
    p: int  # basis size of a "shared" module (0 otherwise)
    method: Literal["shared", "truncate", "joint"] = "shared"
    ranks: dict[str, int] | None = None  # "truncate": task -> the rank it keeps
    size: tuple[int, int] | None = None  # "joint": (Ku, Kv) shared directions on the out and in sides


class Storage(_Strict):
    numbers_stored: int  # counted from the tensors written (basis, means, coefficients)
    numbers_original: int  # LoRA numbers of all T input adapters, at their own ranks
    ratio: float  # numbers_stored / numbers_original
    bytes_stored: int  # tensor bytes of basis + coefficients (headers excluded)
    bytes_original: int  # tensor bytes of the inputs' LoRA weights


class Report(_Strict):
    storage: Storage
    # task -> module -> ||dW - dW_reverted||_F / ||dW||_F, from what was stored
    errors: dict[str, dict[str, float]]
    # module -> factor ("B"/"A") -> share of the tasks' spread around the mean the basis keeps
    # ("shared" modules); module -> {"dW": share of the tasks' summed ||dW||^2 kept} otherwise
    energy: dict[str, dict[str, float]]
    seconds: dict[str, float]


class Manifest(_Strict):
    format: Literal["rmm-bundle/1"] = FORMAT
    tool_version: str
    created: str
    options: MergeOptions
    scaling: str = "folded: dW = B @ A with sqrt(scaling) in each factor; reverted adapters have lora_alpha == r"
    storage_dtype: str
    tasks: list[TaskEntry]
    modules: list[ModuleEntry]
    basis_sha256: str | None = None  # set when the basis was given (a federation's), not solved here
    report: Report

    def task(self, name: str) -> TaskEntry:
        for t in self.tasks:
            if t.name == name:
                return t
        raise RMMError(f"no task {name!r} in this bundle; it has {[t.name for t in self.tasks]}")

    def write(self, bundle: Path) -> None:
        (bundle / MANIFEST).write_text(self.model_dump_json(indent=2) + "\n")


def read_manifest(bundle: str | Path) -> Manifest:
    file = Path(bundle) / MANIFEST
    if not file.is_file():
        raise RMMError(f"no {MANIFEST}: not an RMM bundle", file=bundle)
    try:
        return Manifest.model_validate(json.loads(file.read_text()))
    except (json.JSONDecodeError, ValidationError) as e:
        raise RMMError(f"invalid manifest: {e}", file=file) from None
