"""`merge`: T adapters -> basis bundle; `revert`: bundle -> PEFT adapters. Streams module by module.

Peak memory of `merge` is one module of all T adapters plus the outputs (basis and coefficients,
smaller than the inputs at any useful storage ratio); `revert` holds one task's adapter.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from datetime import datetime, timezone
from pathlib import Path

import torch
from rich.progress import track
from safetensors.torch import save_file

from rmm import __version__
from rmm.adapter import LoraAdapter, open_adapters, write_adapter
from rmm.bundle import (
    BASIS_FILE,
    FACTORS,
    Manifest,
    MergeOptions,
    ModuleEntry,
    Report,
    Storage,
    TaskEntry,
    checked_file,
    coefficients_file,
    extras_file,
    file_hashes,
    read_manifest,
)
from rmm.allocate import Choice, Curves, allocate, curves, joint_bases, stacked_roots
from rmm.canonical import canonicalize
from rmm.errors import RMMError
from rmm.io import StreamingWriter, atomic_dir, check_output, open_safetensors, read_all, read_tensor, safe_name, sha256_file
from rmm.metrics import frobenius_inner, relative_error
from rmm.solver import Moments, coefficients, energy_kept, reconstruct, solve, storage_numbers


def merge(
    adapter_dirs: list[str | Path],
    out: str | Path,
    options: MergeOptions | None = None,
    *,
    basis: str | Path | None = None,
    progress: bool = True,
    force: bool = False,
) -> Manifest:
    """Build the RMM bundle of `adapter_dirs` in `out`. Nothing is written unless all succeeds.

    With `basis` (a basis file solved elsewhere, e.g. by a federation's coordinator from every
    site's moments) nothing is solved here: the adapters get their coefficients against that basis,
    which is how a site builds the bundle of its own tasks. Same code path otherwise.
    """
    options = options or MergeOptions()
    out = Path(out)
    check_output(out, force, [*adapter_dirs, *([basis] if basis is not None else [])])
    clock = time.perf_counter()
    adapters = open_adapters(adapter_dirs)
    specs = module_specs(adapters)
    if basis is not None:
        basis = Path(basis)
        modules = modules_of_basis(basis, specs, [a.name for a in adapters], options.method)
    elif options.method == "auto":
        modules = allocate_modules(adapters, specs, options.storage_ratio * numbers_original(adapters), progress)
    else:
        modules = plan_modules(specs, len(adapters), numbers_original(adapters), options)
    dtype = storage_dtype(adapters)
    seconds = {"open": time.perf_counter() - clock}

    errors: dict[str, dict[str, float]] = {a.name: {} for a in adapters}
    energy: dict[str, dict[str, float]] = {}
    with atomic_dir(out) as tmp:
        clock = time.perf_counter()
        # Every output shape is known from the module list, so each module's results go to disk as
        # soon as they are solved: memory holds one module of all T adapters, not the whole bundle.
        (tmp / "coefficients").mkdir()
        basis_out = StreamingWriter(tmp / BASIS_FILE, basis_specs(modules, dtype), {"format": "pt"})
        coef_out = {a.name: StreamingWriter(coefficients_file(tmp, a.name), coef_specs(modules, dtype, a.name), {"format": "pt"}) for a in adapters}
        solved = _in_order(partial(_solve_module, adapters, canonical=options.canonicalize, dtype=dtype, basis=basis), modules)
        for mod, (shared, own, captured, err) in track(zip(modules, solved), total=len(modules), description="merging modules", disable=not progress, transient=True):
            for key, tensor in shared.items():
                basis_out.write(f"{mod.name}.{key}", tensor)
            for t, a in enumerate(adapters):
                for key, tensor in own[t].items():
                    coef_out[a.name].write(f"{mod.name}.{key}", tensor)
            energy[mod.name] = captured
            for t, a in enumerate(adapters):
                errors[a.name][mod.name] = err[t]
        for writer in (basis_out, *coef_out.values()):
            writer.close()
        seconds["solve"] = time.perf_counter() - clock

        clock = time.perf_counter()
        for a in adapters:
            if a.extra_keys:
                extras_file(tmp, a.name).parent.mkdir(exist_ok=True)
                save_file(a.load_extras(), str(extras_file(tmp, a.name)), metadata={"format": "pt"})
        seconds["write"] = time.perf_counter() - clock
        written = (basis_out, *coef_out.values())
        original = numbers_original(adapters)
        storage = Storage(
            numbers_stored=sum(w.numbers for w in written),
            numbers_original=original,
            ratio=sum(w.numbers for w in written) / original,
            bytes_stored=sum(w.bytes for w in written),
            bytes_original=sum(a.lora_bytes for a in adapters),
        )
        tasks = [
            TaskEntry(name=a.name, source=str(a.path.resolve()), sha256=a.sha256, dtype=_dtype_name(a.dtype), config=a.config, extras=list(a.extra_keys))
            for a in adapters
        ]
        manifest = Manifest(
            tool_version=__version__,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            options=options,
            storage_dtype=_dtype_name(dtype),
            tasks=tasks,
            modules=modules,
            basis_sha256=sha256_file(basis) if basis is not None else None,
            files=file_hashes(tmp, tasks),
            report=Report(storage=storage, errors=errors, energy=energy, seconds=seconds),
        )
        manifest.write(tmp)
    return manifest


def revert(bundle: str | Path, out: str | Path, tasks: list[str] | None = None, *, progress: bool = True, force: bool = False) -> dict[str, Path]:
    """Rebuild tasks' adapters (all by default) as PEFT directories `out/<task>/`.

    Nothing else in `out` is touched, and an existing `out/<task>` is replaced only with `force`.
    Every file the tasks need is checked first (its sha256, tensors and finite values), so a
    damaged bundle reverts no task at all; each adapter is then written whole or not at all.
    """
    bundle, out = Path(bundle), Path(out)
    manifest = read_manifest(bundle)
    entries = [manifest.task(safe_name(n, file=bundle)) for n in dict.fromkeys(tasks)] if tasks else manifest.tasks
    for entry in entries:
        target = out / entry.name
        check_output(target, force, [bundle])
        if target.resolve().parent != out.resolve():  # a link to elsewhere
            raise RMMError(f"resolves to {target.resolve()}, outside the output directory", file=target)
    dtype = getattr(torch, manifest.storage_dtype)
    basis_path = _checked_tensors(bundle, manifest, bundle / BASIS_FILE, basis_specs(manifest.modules, dtype))
    for entry in entries:
        _checked_tensors(bundle, manifest, coefficients_file(bundle, entry.name), coef_specs(manifest.modules, dtype, entry.name))
        if entry.extras:
            checked_file(bundle, manifest, extras_file(bundle, entry.name))
    written = {}
    with open_safetensors(basis_path) as fb:
        for entry in track(entries, description="reverting tasks", disable=not progress, transient=True):
            coefs = read_all(coefficients_file(bundle, entry.name))
            factors = {}
            for mod in manifest.modules:
                shared = {k: read_tensor(fb, basis_path, f"{mod.name}.{k}") for k in SHARED_KEYS[mod.method]}
                factors[mod.name] = module_factors(mod, shared, {k: coefs[f"{mod.name}.{k}"] for k in OWN_KEYS[mod.method]})
            extras = read_all(extras_file(bundle, entry.name)) if entry.extras else {}
            write_adapter(out / entry.name, entry.config, factors, extras, getattr(torch, entry.dtype))
            written[entry.name] = out / entry.name
    return written


def _checked_tensors(bundle: Path, manifest: Manifest, file: Path, specs: dict) -> Path:
    """A file of the bundle with the recorded sha256, holding exactly the finite tensors of `specs` (shapes from the manifest)."""
    checked_file(bundle, manifest, file)
    with open_safetensors(file) as f:
        keys = set(f.keys())
        if keys != specs.keys():
            raise RMMError(f"holds other tensors than the manifest's modules need ({sorted(keys ^ specs.keys())[0]} differs)", file=file)
        for key, (_, shape) in specs.items():
            x = read_tensor(f, file, key)
            if tuple(x.shape) != shape or not x.is_floating_point():
                raise RMMError(f"{key} is {x.dtype} {tuple(x.shape)}; the manifest needs floats of shape {shape}", file=file)
            if not torch.isfinite(x).all():
                raise RMMError(f"{key} holds NaN or Inf values", file=file)
    return file


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


def module_specs(adapters: list[LoraAdapter]) -> list[ModuleEntry]:
    """Each module's shape and largest rank over the adapters (p left at 0: not planned yet)."""
    return [
        ModuleEntry(name=m, out_features=s.out_features, in_features=s.in_features, rank=max(a.modules[m].rank for a in adapters), p=0)
        for m, s in adapters[0].modules.items()
    ]


def plan_modules(specs: list[ModuleEntry], tasks: int, lora_numbers: int, options: MergeOptions) -> list[ModuleEntry]:
    """The basis size of every module for `tasks` adapters holding `lora_numbers` LoRA numbers."""
    if options.basis_size is not None:
        p = options.basis_size
    else:
        shapes = [(n, m.rank) for m in specs for n in (m.out_features, m.in_features)]
        p = choose_basis_size(options.storage_ratio, shapes, lora_numbers, tasks)
    return [m.model_copy(update={"p": min(p, m.rank, tasks - 1)}) for m in specs]


PLAN = "rmm.plan"  # metadata key of a federation's "auto" basis file: its modules as planned, as JSON


def modules_of_basis(basis: Path, specs: list[ModuleEntry], tasks: list[str], method: str) -> list[ModuleEntry]:
    """The modules of a given basis file (a federation's), checked against the adapters' modules.

    An "auto" basis carries its plan (how each module is stored, every task's ranks) in its metadata;
    a per-position ("rmm-paper") basis gives p by its shapes.
    """
    with open_safetensors(basis) as f:
        meta = f.metadata() or {}
        if (PLAN in meta) != (method == "auto"):
            raise RMMError(f"this basis was built by method {'auto' if PLAN in meta else 'rmm-paper'}; merge against it with that method, not {method}", file=basis)
        if PLAN in meta:
            planned = [ModuleEntry.model_validate(m) for m in json.loads(meta[PLAN])]
            if [m.name for m in planned] != [m.name for m in specs]:
                raise RMMError("the basis' plan covers other modules than the adapters", file=basis)
            for m, spec in zip(planned, specs):
                if (m.out_features, m.in_features) != (spec.out_features, spec.in_features) or m.rank < spec.rank:
                    raise RMMError(f"plan shape {m.out_features}x{m.in_features} rank {m.rank} does not fit the adapters'", file=basis, module=m.name)
                missing = [t for t in tasks if m.method == "truncate" and t not in m.ranks]
                if missing:
                    raise RMMError(f"the basis' plan has no rank for task(s) {missing}", file=basis, module=m.name)
            return [m.model_copy(update={"ranks": {t: m.ranks[t] for t in tasks}}) if m.method == "truncate" else m for m in planned]
        planned = []
        keys = set(f.keys())
        for m in specs:
            key = f"{m.name}.B.basis"
            if key not in keys:
                raise RMMError("the basis has no entry for this module", file=basis, module=m.name)
            n_out, rank, p = f.get_slice(key).get_shape()
            n_in = f.get_slice(f"{m.name}.A.basis").get_shape()[0]
            if (n_out, n_in) != (m.out_features, m.in_features) or rank < m.rank:
                raise RMMError(f"basis shape {n_out}x{n_in} rank {rank} does not fit the adapters' {m.out_features}x{m.in_features} rank {m.rank}", file=basis, module=m.name)
            planned.append(m.model_copy(update={"rank": rank, "p": p}))
    return planned


# What each storage method keeps per module: shared by all tasks (basis file) and per task (coefficients).
SHARED_KEYS = {"shared": ("B.mean", "B.basis", "A.mean", "A.basis"), "truncate": (), "joint": ("U", "V")}
OWN_KEYS = {"shared": ("B", "A"), "truncate": ("B", "A"), "joint": ("M",)}


def module_factors(mod: ModuleEntry, shared: dict, own: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """One task's folded factors (B, A) of one module, float64, from what the bundle stores for it.

    `shared` holds the module's basis tensors and `own` the task's, by the keys of SHARED_KEYS and
    OWN_KEYS without the module prefix.
    """
    x = {k: v.double() for k, v in (shared | own).items()}
    if mod.method == "shared":
        B, A = (reconstruct(x[f"{f}.mean"], x[f"{f}.basis"], x[f]) for f in FACTORS)
        return B, A.mT
    if mod.method == "truncate":
        return x["B"], x["A"].mT
    return x["U"] @ x["M"], x["V"].mT


def _solve_module(adapters: list[LoraAdapter], mod: ModuleEntry, *, canonical: bool, dtype: torch.dtype, basis: Path | None):
    """One module: (basis tensors, each task's tensors, energy kept, each task's dW error), as stored.

    Everything is cast to `dtype` before errors are measured, so the report describes what revert
    rebuilds. Coefficients are fitted to the basis as stored, so a bundle solved here and one whose
    basis came from a coordinator agree to the last bit for the same basis.
    """
    raw = stack_factors(adapters, mod, canonical=False)
    B, A = canonicalize(*raw) if canonical or mod.method != "shared" else raw
    T = len(adapters)
    if mod.method == "truncate":
        shared = {}
        own = [_truncated(a, mod, (raw[0][t], raw[1][t]), (B[t], A[t]), dtype) for t, a in enumerate(adapters)]
    elif mod.method == "joint":
        if basis is None:
            cols, rows = stacked_roots(B, A)
            U, V = joint_bases([cols], [rows], max(mod.size))
        else:
            with open_safetensors(basis) as f:
                U, V = (read_tensor(f, basis, f"{mod.name}.{side}") for side in ("U", "V"))
        shared = {"U": U[:, : mod.size[0]].to(dtype), "V": V[:, : mod.size[1]].to(dtype)}
        U, V = shared["U"].double(), shared["V"].double()
        M = (U.mT @ B) @ (A @ V)  # the best cores for the bases as stored
        own = [{"M": M[t].to(dtype)} for t in range(T)]
    else:
        shared, Cs, captured = {}, {}, {}
        for factor, X in zip(FACTORS, (B, A.mT)):
            if basis is None:
                solution = solve(Moments.of(X), mod.p)
                mean, vectors = solution.mean.to(dtype), solution.vectors.to(dtype)
            else:
                with open_safetensors(basis) as f:
                    mean = read_tensor(f, basis, f"{mod.name}.{factor}.mean").to(dtype)
                    vectors = read_tensor(f, basis, f"{mod.name}.{factor}.basis").to(dtype)
            C = coefficients(mean.double(), vectors.double(), X)
            captured[factor] = energy_kept(X, mean.double(), reconstruct(mean.double(), vectors.double(), C))
            shared |= {f"{factor}.mean": mean, f"{factor}.basis": vectors}
            Cs[factor] = C.to(dtype)
        own = [{f: Cs[f][t] for f in FACTORS} for t in range(T)]
    reverted = [module_factors(mod, shared, own[t]) for t in range(T)]
    errors = [relative_error(B[t], A[t], *reverted[t]).item() for t in range(T)]
    if mod.method != "shared":
        total = float(sum(frobenius_inner(B[t], A[t], B[t], A[t]) for t in range(T)))
        kept = float(sum(frobenius_inner(*reverted[t], *reverted[t]) for t in range(T)))
        captured = {"dW": 1.0 if total <= 0 else min(1.0, kept / total)}
    return shared, own, captured, errors


def _truncated(adapter: LoraAdapter, mod: ModuleEntry, raw: tuple, canonical: tuple, dtype: torch.dtype) -> dict:
    """What a truncated task stores, B (out, k) and A (in, k), from its folded factors, raw and canonical.

    Cut to k below its rank, it keeps its top k canonical directions. Kept whole, it keeps its raw factors
    unrotated, unfolded, with its whole scaling s in A: its own lora_B and s lora_A, the original numbers
    in any dtype whenever s is a power of two (alpha = r, 2 r, ...), so revert rebuilds its dW exactly.
    """
    k = mod.ranks[adapter.name]
    B, A = canonical
    if k >= adapter.modules[mod.name].rank:
        root = math.sqrt(adapter.modules[mod.name].scaling)
        B, A = raw[0] / root, raw[1] * root
    return {"B": B[:, :k].to(dtype), "A": A[:k].mT.to(dtype)}


def allocate_modules(adapters: list[LoraAdapter], specs: list[ModuleEntry], budget: float, progress: bool) -> list[ModuleEntry]:
    """Method "auto": every module's error curves (one pass), then the plan under `budget` numbers."""
    def curves_of(mod: ModuleEntry) -> Curves:
        return curves(*stack_factors(adapters, mod, canonical=False), [a.modules[mod.name].rank for a in adapters])

    found = list(track(_in_order(curves_of, specs), total=len(specs), description="sizing modules", disable=not progress, transient=True))
    return planned_modules(specs, allocate(found, budget), [a.name for a in adapters])


def planned_modules(specs: list[ModuleEntry], plan: list[Choice], tasks: list[str]) -> list[ModuleEntry]:
    """The module entries of an allocation (`rmm.allocate.allocate`) for `tasks`, in their order."""
    how = {
        "truncate": lambda c: {"ranks": dict(zip(tasks, c.ranks))},
        "joint": lambda c: {"size": c.size},
        "shared": lambda c: {"p": c.p},
    }
    return [m.model_copy(update={"method": c.kind, **how[c.kind](c)}) for m, c in zip(specs, plan)]


def _in_order(solve_one, modules: list[ModuleEntry]):
    """Solve modules on a few threads (LAPACK releases the GIL), yielding results in order.

    At most `workers + 1` modules are in flight, so memory stays a few modules of all T adapters.
    """
    workers = max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        for mod in modules:
            pending.append(pool.submit(solve_one, mod))
            if len(pending) > workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def stack_factors(adapters: list[LoraAdapter], mod: ModuleEntry, canonical: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """All tasks' folded factors of one module, zero-padded to its largest rank: (T,out,r), (T,r,in)."""
    Bs, As = [], []
    for a in adapters:
        B, A = a.load_factors(mod.name)
        pad = mod.rank - B.shape[1]
        Bs.append(torch.nn.functional.pad(B, (0, pad)))
        As.append(torch.nn.functional.pad(A, (0, 0, 0, pad)))
    B, A = torch.stack(Bs), torch.stack(As)
    return canonicalize(B, A) if canonical else (B, A)


def basis_specs(modules: list[ModuleEntry], dtype: torch.dtype) -> dict:
    """Name -> (dtype, shape) of every tensor of the basis file."""
    specs = {}
    for m in modules:
        if m.method == "shared":
            for f, n in zip(FACTORS, (m.out_features, m.in_features)):
                specs |= {f"{m.name}.{f}.mean": (dtype, (n, m.rank)), f"{m.name}.{f}.basis": (dtype, (n, m.rank, m.p))}
        elif m.method == "joint":
            specs |= {f"{m.name}.U": (dtype, (m.out_features, m.size[0])), f"{m.name}.V": (dtype, (m.in_features, m.size[1]))}
    return specs


def coef_specs(modules: list[ModuleEntry], dtype: torch.dtype, task: str) -> dict:
    """Name -> (dtype, shape) of every tensor of `task`'s coefficients file."""
    specs = {}
    for m in modules:
        if m.method == "joint":
            specs[f"{m.name}.M"] = (dtype, tuple(m.size))
        else:
            k = m.p if m.method == "shared" else m.ranks[task]
            specs |= {f"{m.name}.{f}": (dtype, (n, k)) for f, n in zip(FACTORS, (m.out_features, m.in_features))}
    return specs


def numbers_original(adapters: list[LoraAdapter]) -> int:
    return sum(a.lora_numbers for a in adapters)


def storage_dtype(adapters: list[LoraAdapter]) -> torch.dtype:
    """The inputs' dtype when they agree; otherwise the widest float, so no input loses precision."""
    dtypes = {a.dtype for a in adapters}
    if len(dtypes) == 1:
        return dtypes.pop()
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
