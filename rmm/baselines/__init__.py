"""A registry of merging baselines, run on the same PEFT adapters as RMM.

Adding a method is one function plus one registration line:

    @register("ta-dw", "single", "Task Arithmetic on dW, re-factorised to rank r by truncated SVD")
    def ta_dw(B, A, ctx, *, rank=None): ...

Two kinds of method:

* ``single``: T adapters -> ONE merged adapter, written to ``out_dir/merged/``. The function
  gets one module at a time: the tasks' folded factors ``B`` (T, out, r) and ``A`` (T, r, in)
  (``dW_t = B[t] @ A[t]``, lower ranks zero-padded) and a :class:`ModuleContext`, and returns the
  merged module's ``(B, A)``. The runner streams modules, writes the adapter with
  :func:`rmm.adapter.write_adapter` (``lora_alpha == r``) and counts what was written.
* ``reversible``: T adapters -> one adapter per task, ``out_dir/<task>/``. The function gets the
  opened adapters and ``out_dir`` and returns a partial summary (``numbers_stored``, ``adapters``,
  optional ``errors``).

Task weights of single methods (params ``weights``: one per task, or ``scale``: the same for all)
follow PEFT's ``add_weighted_adapter``: a weight multiplies the task's dW (split as sqrt on each
factor for the factor-wise methods). Each method declares its default (``1/T`` for the linear
methods, i.e. the average; ``1`` for TIES, whose disjoint mean already averages).
"""

from __future__ import annotations

import inspect
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch

from rmm.adapter import _A, _B, WEIGHTS_FILE, LoraAdapter, open_adapters, write_adapter
from rmm.errors import RMMError
from rmm.io import check_output, tensor_counts
from rmm.plan import module_specs, numbers_original, stack_factors, storage_dtype

Kind = Literal["single", "reversible"]
SINGLE_DIR = "merged"
SUMMARY_FILE = "summary.json"


@dataclass(frozen=True)
class Method:
    fn: Callable
    kind: Kind
    description: str
    default_scale: str = "1/T"  # single methods: "1/T" (average) or "1"

    @property
    def params(self) -> dict[str, object]:
        """The method's own parameters and their defaults (keyword-only arguments of fn)."""
        sig = inspect.signature(self.fn)
        return {n: p.default for n, p in sig.parameters.items() if p.kind is p.KEYWORD_ONLY}


METHODS: dict[str, Method] = {}


def register(name: str, kind: Kind, description: str, *, default_scale: str = "1/T"):
    """Decorator: add `fn` to METHODS under `name`."""
    if kind not in ("single", "reversible"):
        raise ValueError(f"kind must be 'single' or 'reversible', got {kind!r}")
    if default_scale not in ("1/T", "1"):
        raise ValueError(f"default_scale must be '1/T' or '1', got {default_scale!r}")

    def deco(fn):
        if name in METHODS:
            raise ValueError(f"method {name!r} is already registered")
        METHODS[name] = Method(fn, kind, description, default_scale)
        return fn

    return deco


@dataclass
class ModuleContext:
    """What a single method knows about the module it merges besides the factors."""

    name: str  # key prefix of the module
    index: int  # position in the module list (seeds random methods per module)
    rank: int  # largest input rank of this module (the default output rank)
    out_features: int
    in_features: int
    weights: torch.Tensor  # (T,) float64 task weights, resolved from `weights` / `scale`
    extra: dict = field(default_factory=dict)


def run(name: str, adapter_dirs: list[str | Path], out_dir: str | Path, *, force: bool = False, **params) -> dict:
    """Run baseline `name` on `adapter_dirs`, writing PEFT adapter dir(s) under `out_dir`.

    Returns (and writes to ``out_dir/summary.json``) a summary: method, kind, params as resolved,
    tasks, the adapters written, numbers stored (counted from the LoRA tensors written, or the
    bundle's), numbers of the T originals, storage ratio, seconds, and per-task dW errors where a
    method reverts tasks.
    """
    if name not in METHODS:
        raise RMMError(f"unknown method {name!r}; known: {sorted(METHODS)}")
    method = METHODS[name]
    out_dir = Path(out_dir)
    check_output(out_dir, force, adapter_dirs)
    clock = time.perf_counter()
    adapters = open_adapters(adapter_dirs)
    T = len(adapters)

    if method.kind == "single":
        weights, scale = params.pop("weights", None), params.pop("scale", None)
        resolved = _resolve_params(name, method, params)
        w = _task_weights(T, weights, scale, method.default_scale)
        part = _run_single(method, adapters, out_dir, w, resolved)
        resolved = {"weights": w.tolist(), **resolved}
    else:
        resolved = _resolve_params(name, method, params)
        out_dir.mkdir(parents=True, exist_ok=True)
        part = method.fn(adapters, out_dir, **resolved)

    original = numbers_original(adapters)
    summary = {
        "method": name,
        "kind": method.kind,
        "description": method.description,
        "params": resolved,
        "tasks": [a.name for a in adapters],
        "adapters": {k: str(v) for k, v in part["adapters"].items()},
        "numbers_stored": int(part["numbers_stored"]),
        "numbers_original": int(original),
        "storage_ratio": part["numbers_stored"] / original,
        "seconds": time.perf_counter() - clock,
    }
    for key in ("errors", "extras_dropped", "bundle", "plan"):
        if key in part:
            summary[key] = str(part[key]) if key == "bundle" else part[key]
    (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def lora_numbers(adapter_dir: str | Path) -> int:
    """Numbers in the lora_A / lora_B tensors of a written adapter (extras not counted)."""
    return tensor_counts(Path(adapter_dir) / WEIGHTS_FILE, lambda k: k.endswith(_A) or k.endswith(_B))[0]


def _resolve_params(name: str, method: Method, params: dict) -> dict:
    known = method.params
    unknown = sorted(set(params) - set(known))
    if unknown:
        extra = ["weights", "scale"] if method.kind == "single" else []
        raise RMMError(f"method {name!r} has no parameter(s) {unknown}; it takes {sorted(known) + extra}")
    return {**known, **params}


def _task_weights(T: int, weights, scale, default_scale: str) -> torch.Tensor:
    if weights is not None and scale is not None:
        raise RMMError("give either weights (one per task) or scale (the same for all), not both")
    if weights is not None:
        w = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
        if w.numel() != T:
            raise RMMError(f"{w.numel()} weights given for {T} adapters")
    else:
        s = scale if scale is not None else (1.0 / T if default_scale == "1/T" else 1.0)
        w = torch.full((T,), float(s), dtype=torch.float64)
    if not torch.isfinite(w).all():
        raise RMMError("weights must be finite")
    return w


def _run_single(method: Method, adapters: list[LoraAdapter], out_dir: Path, w: torch.Tensor, params: dict) -> dict:
    factors = {}
    for i, mod in enumerate(module_specs(adapters)):  # one module of all T adapters in memory
        B, A = stack_factors(adapters, mod, canonical=False)
        ctx = ModuleContext(mod.name, i, mod.rank, mod.out_features, mod.in_features, w)
        Bm, Am = method.fn(B, A, ctx, **params)
        if not (torch.isfinite(Bm).all() and torch.isfinite(Am).all()):
            raise RMMError("the merge produced NaN or Inf values", module=mod.name)
        factors[mod.name] = (Bm, Am)
    out = out_dir / SINGLE_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    # Config of the first adapter (write_adapter resets r, lora_alpha and the patterns). Extras such
    # as task-specific classifier heads cannot be merged meaningfully: they are dropped and listed.
    write_adapter(out, adapters[0].config, factors, {}, storage_dtype(adapters))
    dropped = sorted({k for a in adapters for k in a.extra_keys})
    part = {"adapters": {SINGLE_DIR: out}, "numbers_stored": lora_numbers(out)}
    if dropped:
        part["extras_dropped"] = dropped
    return part


from rmm.baselines import reversible, share, single  # noqa: E402,F401  (register the built-in methods)
