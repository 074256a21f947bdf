"""The basis bundle on disk: what it holds, and the typed manifest that describes it.

    BUNDLE/
      manifest.json                  tasks, modules (how each is stored), options, the sha256 of the inputs and
                                     of every file below, report
      basis.safetensors              what the tasks share, per module
      coefficients/<task>.safetensors  what each task keeps on its own, per module
      extras/<task>.safetensors      the task's non-LoRA tensors (modules_to_save), untouched

A module is stored one of three ways (`ModuleEntry.method`, a storage kind of `rmm.storage`):
  shared    per-position basis (the paper's RMM): basis "<module>.B.mean" (out, r), "<module>.B.basis"
            (out, r, p), same for A (in, ...); coefficients "<module>.B" (out, p), "<module>.A" (in, p)
  truncate  no sharing: coefficients "<module>.B" (out, k_t), "<module>.A" (in, k_t), k_t = ranks[task]
  joint     basis "<module>.U" (out, Ku), "<module>.V" (in, Kv); coefficients "<module>.M" (Ku, Kv);
            dW_t = U M_t V^T

Reverting one task reads the basis (one module at a time) and that task's two small files only.
Bundles are shared artefacts: every name that becomes a path is checked when the manifest is read,
and every file is checked against its recorded sha256 before it is used.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rmm.errors import RMMError
from rmm.io import safe_name, sha256_file
from rmm.storage import KINDS

FORMAT = "rmm-bundle/2"  # 2: the sha256 of every file (`files`)
MANIFEST = "manifest.json"
BASIS_FILE = "basis.safetensors"


def coefficients_file(bundle: Path, task: str) -> Path:
    return bundle / "coefficients" / f"{task}.safetensors"


def extras_file(bundle: Path, task: str) -> Path:
    return bundle / "extras" / f"{task}.safetensors"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MergeOptions(_Strict):
    """How to merge. The default: method "auto" at half the storage.

    "auto" spends the storage budget per module on whichever storage kind (`rmm.storage`: per-task
    rank truncation, joint sharing, per-position sharing) removes the most dW error (`rmm.allocate`);
    "rmm-paper" is the paper's per-position basis on every module, sized by basis_size or
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
        if self.storage_ratio is not None and not (0 < self.storage_ratio and math.isfinite(self.storage_ratio)):
            raise ValueError("storage_ratio must be a finite number > 0")
        return self


DType = Literal["float64", "float32", "float16", "bfloat16"]
Count = Annotated[int, Field(ge=0)]
Positive = Annotated[int, Field(gt=0)]


class TaskEntry(_Strict):
    name: str  # its files: coefficients/<name>.safetensors, extras/<name>.safetensors; reverted as <out>/<name>/
    source: str
    sha256: str  # of adapter_model.safetensors
    dtype: DType  # the original LoRA weights' dtype, restored on revert
    config: dict  # the original adapter_config.json
    extras: list[str]  # non-LoRA tensor keys carried through

    @field_validator("name")
    @classmethod
    def _file_name(cls, name: str) -> str:
        return safe_name(name)


class ModuleEntry(_Strict):
    name: str  # key prefix, e.g. "base_model.model.model.layers.0.self_attn.q_proj"
    out_features: Positive
    in_features: Positive
    rank: Positive  # largest rank over tasks; lower ranks are zero-padded after folding scaling
    p: Count  # basis size of a "shared" module (0 otherwise)
    method: Literal[tuple(KINDS)] = "shared"  # its storage kind, by its name in the registry
    ranks: dict[str, Count] | None = None  # "truncate": task -> the rank it keeps
    size: tuple[Count, Count] | None = None  # "joint": (Ku, Kv) shared directions on the out and in sides

    @model_validator(mode="after")
    def _described(self) -> "ModuleEntry":
        KINDS[self.method].check(self)
        return self


class Storage(_Strict):
    numbers_stored: Count  # counted from the tensors written (basis, means, coefficients)
    numbers_original: Positive  # LoRA numbers of all T input adapters, at their own ranks
    ratio: float  # numbers_stored / numbers_original
    bytes_stored: Count  # tensor bytes of basis + coefficients (headers excluded)
    bytes_original: Positive  # tensor bytes of the inputs' LoRA weights


class Candidate(_Strict):
    """One plan calibration weighed (`rmm.calibrate`): its storage, its data-free objective and what it cost each
    task (mean KL divergence of the output distributions from the original adapter's)."""

    storage_ratio: float
    dw_objective: float
    divergence: dict[str, float]
    total: float


class Calibrated(_Strict):
    """How calibration chose the plan: its inputs (the base, the data, the examples per task and their files'
    sha256), every candidate and the one kept."""

    base: str
    data: str
    examples: int
    files: dict[str, str]
    candidates: dict[str, Candidate]
    chosen: str
    seconds: dict[str, float]


class Report(_Strict):
    storage: Storage
    # task -> module -> ||dW - dW_reverted||_F / ||dW||_F, from what was stored
    errors: dict[str, dict[str, float]]
    # module -> factor ("B"/"A") -> share of the tasks' spread around the mean the basis keeps
    # ("shared" modules); module -> {"dW": share of the tasks' summed ||dW||^2 kept} otherwise
    energy: dict[str, dict[str, float]]
    seconds: dict[str, float]
    calibration: Calibrated | None = None  # set when calibration chose the plan


class Manifest(_Strict):
    format: Literal["rmm-bundle/2"] = FORMAT
    tool_version: str
    created: str
    options: MergeOptions
    scaling: str = "folded: dW = B @ A with sqrt(scaling) in each factor; reverted adapters have lora_alpha == r"
    storage_dtype: DType  # of the basis and coefficients
    tasks: list[TaskEntry] = Field(min_length=1)
    modules: list[ModuleEntry] = Field(min_length=1)
    basis_sha256: str | None = None  # set when the basis was given (a federation's), not solved here
    files: dict[str, str]  # sha256 of every file of `bundle_files`, by its path in the bundle
    report: Report

    @model_validator(mode="after")
    def _consistent(self) -> "Manifest":
        names = [t.name for t in self.tasks]
        for what, seen in (("task", names), ("module", [m.name for m in self.modules])):
            twice = next((n for n, count in Counter(seen).items() if count > 1), None)
            if twice is not None:
                raise ValueError(f"{what} {twice!r} is listed twice")
        for m in self.modules:
            KINDS[m.method].check_tasks(m, names)
            if m.name not in self.report.energy:
                raise ValueError(f"report.energy has no entry for module {m.name!r}")
        missing = [f for f in bundle_files(self.tasks) if f not in self.files]
        if missing:
            raise ValueError(f"files records no sha256 for {missing[0]}")
        return self

    def task(self, name: str) -> TaskEntry:
        for t in self.tasks:
            if t.name == name:
                return t
        raise RMMError(f"no task {name!r} in this bundle; it has {[t.name for t in self.tasks]}")

    def write(self, bundle: Path) -> None:
        (bundle / MANIFEST).write_text(self.model_dump_json(indent=2) + "\n")


def bundle_files(tasks: list[TaskEntry]) -> list[str]:
    """The bundle's data files, by their paths in it: the basis, then each task's coefficients and extras."""
    files = [Path(BASIS_FILE)]
    for t in tasks:
        files += [coefficients_file(Path(), t.name)] + ([extras_file(Path(), t.name)] if t.extras else [])
    return [f.as_posix() for f in files]


def file_hashes(bundle: Path, tasks: list[TaskEntry]) -> dict[str, str]:
    """`Manifest.files` of a bundle whose files are written."""
    return {f: sha256_file(bundle / f) for f in bundle_files(tasks)}


def checked_file(bundle: Path, manifest: Manifest, file: Path) -> Path:
    """`file` of the bundle, once its bytes are those the manifest recorded: nothing damaged or swapped is used."""
    if not file.is_file():
        raise RMMError("missing from the bundle", file=file)
    if sha256_file(file) != manifest.files[file.relative_to(bundle).as_posix()]:
        raise RMMError(
            "sha256 differs from the manifest's: the file was damaged or replaced; copy the bundle again", file=file
        )
    return file


def read_manifest(bundle: str | Path) -> Manifest:
    """The bundle's manifest, checked: a crafted one is refused before any of its names is used."""
    file = Path(bundle) / MANIFEST
    if not file.is_file():
        raise RMMError(f"no {MANIFEST}: not an RMM bundle", file=bundle)
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON or UTF-8, an int of over 4300 digits
        raise RMMError(f"unreadable JSON ({e})", file=file) from None
    if isinstance(data, dict) and data.get("format") != FORMAT:
        raise RMMError(
            f"bundle format {data.get('format')!r} is not {FORMAT!r}: merge the adapters again with this rmm", file=file
        )
    try:
        return Manifest.model_validate(data)
    except ValidationError as e:
        error = e.errors()[0]
        where = f" at {'.'.join(map(str, error['loc']))!r}" if error["loc"] else ""
        raise RMMError(f"invalid manifest{where}: {error['msg']}", file=file) from None
