"""`merge`: T adapters -> basis bundle; `revert`: bundle -> PEFT adapters. Streams module by module.

How each module is stored is its storage kind's business (`rmm.storage`); this is the driver. Peak memory
of `merge` is the few modules of all T adapters in flight (`_in_order`) plus the outputs (basis and
coefficients, smaller than the inputs at any useful storage ratio); `revert` holds one task's adapter.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from rich.progress import track
from safetensors.torch import save_file

from rmm import __version__
from rmm.adapter import LoraAdapter, open_adapters, write_adapter
from rmm.bundle import (
    BASIS_FILE,
    Calibrated,
    Candidate,
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
from rmm.allocate import allocate, candidate_plans, curves, dw_objective
from rmm.calibrate import Calibration, Examples, chosen, divergences, read_examples, summed
from rmm.canonical import canonicalize
from rmm.device import bound_heap, resolve, single_threaded
from rmm.device import workers as device_workers
from rmm.errors import RMMError
from rmm.io import (
    StreamingWriter,
    atomic_dir,
    check_output,
    open_safetensors,
    read_all,
    read_tensor,
    safe_name,
    sha256_file,
)
from rmm.metrics import frobenius_inner, relative_error
from rmm.plan import (
    module_specs,
    modules_of_basis,
    numbers_original,
    plan_modules,
    planned_modules,
    stack_factors,
    storage_dtype,
)
from rmm.storage import Curves, basis_specs, coef_specs, kind, rebuild, rebuild_all

# How a merge computes one function over its modules, yielding the results in module order: `_in_order` (threads
# here, on the merge's device) by default; a caller may spread them elsewhere (e.g. `workers.cluster.ClusterMap`,
# over a Ray cluster's nodes, on the device its nodes have). The function, called as fn(module, device), is a
# picklable `partial` of adapters opened here; where it runs, it reads their files.
ModuleMap = Callable[[Callable[[ModuleEntry, torch.device], Any], list[ModuleEntry], torch.device], Iterable[Any]]


def merge(
    adapter_dirs: list[str | Path],
    out: str | Path,
    options: MergeOptions | None = None,
    *,
    basis: str | Path | None = None,
    calibration: Calibration | None = None,
    device: str | torch.device | None = "auto",
    map_modules: ModuleMap | None = None,
    progress: bool = True,
    force: bool = False,
) -> Manifest:
    """Build the RMM bundle of `adapter_dirs` in `out`. Nothing is written unless all succeeds.

    With `calibration` (method "auto"), the plan is the candidate that changes the tasks' outputs on their own
    examples the least (`rmm.calibrate`), not the one with the least dW error. `device`: where it computes
    (`rmm.device.resolve`: "auto" is CUDA when present); the bundle is the same on every device. `map_modules`:
    where each module's curves and solve are computed (`ModuleMap`; threads here by default).

    With `basis` (a basis file solved elsewhere, e.g. by a federation's coordinator from every
    site's moments) nothing is solved here: the adapters get their coefficients against that basis,
    which is how a site builds the bundle of its own tasks. Same code path otherwise.
    """
    options = options or MergeOptions()
    out = Path(out)
    check_output(out, force, [*adapter_dirs, *([basis] if basis is not None else [])])
    if calibration is not None and (basis is not None or options.method != "auto"):
        raise RMMError("calibration chooses among method auto's plans: give no --basis and keep method auto")
    device, map_modules = resolve(device), map_modules or _in_order
    clock = time.perf_counter()
    adapters = open_adapters(adapter_dirs)
    specs = module_specs(adapters)
    calibrated = None
    if basis is not None:
        basis = Path(basis)
        modules = modules_of_basis(basis, specs, [a.name for a in adapters], options.method)
    elif options.method == "auto":
        budget = options.storage_ratio * numbers_original(adapters)
        modules, calibrated = allocate_modules(adapters, specs, budget, progress, calibration, device, map_modules)
    else:
        modules = plan_modules(specs, len(adapters), numbers_original(adapters), options)
    dtype = storage_dtype(adapters)
    seconds = {"open": time.perf_counter() - clock - (calibrated.seconds["total"] if calibrated else 0.0)}
    if calibrated:
        seconds["calibrate"] = calibrated.seconds["total"]

    errors: dict[str, dict[str, float]] = {a.name: {} for a in adapters}
    energy: dict[str, dict[str, float]] = {}
    with atomic_dir(out) as tmp:
        clock = time.perf_counter()
        # Every output shape is known from the module list, so each module's results go to disk as
        # soon as they are solved: memory holds the modules in flight, not the whole bundle.
        (tmp / "coefficients").mkdir()
        basis_out = StreamingWriter(tmp / BASIS_FILE, basis_specs(modules, dtype), {"format": "pt"})
        coef_out = {
            a.name: StreamingWriter(
                coefficients_file(tmp, a.name), coef_specs(modules, dtype, a.name), {"format": "pt"}
            )
            for a in adapters
        }
        solve = partial(_solve_module, adapters, canonical=options.canonicalize, dtype=dtype, basis=basis)
        solved = map_modules(solve, modules, device)
        for mod, (shared, own, captured, err) in track(
            zip(modules, solved),
            total=len(modules),
            description="merging modules",
            disable=not progress,
            transient=True,
        ):
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
            TaskEntry(
                name=a.name,
                source=str(a.path.resolve()),
                sha256=a.sha256,
                dtype=_dtype_name(a.dtype),
                config=a.config,
                extras=list(a.extra_keys),
            )
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
            report=Report(storage=storage, errors=errors, energy=energy, seconds=seconds, calibration=calibrated),
        )
        manifest.write(tmp)
    return manifest


def revert(
    bundle: str | Path,
    out: str | Path,
    tasks: list[str] | None = None,
    *,
    device: str | torch.device | None = "auto",
    progress: bool = True,
    force: bool = False,
) -> dict[str, Path]:
    """Rebuild tasks' adapters (all by default) as PEFT directories `out/<task>/`.

    Nothing else in `out` is touched, and an existing `out/<task>` is replaced only with `force`.
    Every file the tasks need is checked first (its sha256, tensors and finite values), so a
    damaged bundle reverts no task at all; each adapter is then written whole or not at all.
    """
    bundle, out, device = Path(bundle), Path(out), resolve(device)
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
        _checked_tensors(
            bundle, manifest, coefficients_file(bundle, entry.name), coef_specs(manifest.modules, dtype, entry.name)
        )
        if entry.extras:
            checked_file(bundle, manifest, extras_file(bundle, entry.name))
    written = {}
    with open_safetensors(basis_path) as fb:
        for entry in track(entries, description="reverting tasks", disable=not progress, transient=True):
            coefs = read_all(coefficients_file(bundle, entry.name))
            factors = {}
            for mod in manifest.modules:
                shared = {
                    k: read_tensor(fb, basis_path, f"{mod.name}.{k}").to(device)
                    for k in kind(mod).basis_specs(mod, dtype)
                }
                own = {k: coefs[f"{mod.name}.{k}"].to(device) for k in kind(mod).coef_specs(mod, dtype, entry.name)}
                factors[mod.name] = rebuild(mod, shared, own)
            extras = read_all(extras_file(bundle, entry.name)) if entry.extras else {}
            write_adapter(out / entry.name, entry.config, factors, extras, getattr(torch, entry.dtype))
            written[entry.name] = out / entry.name
    return written


def _checked_tensors(bundle: Path, manifest: Manifest, file: Path, specs: dict) -> Path:
    """A file of the bundle with the recorded sha256, holding exactly the finite tensors of `specs` (shapes from the
    manifest)."""
    checked_file(bundle, manifest, file)
    with open_safetensors(file) as f:
        keys = set(f.keys())
        if keys != specs.keys():
            raise RMMError(
                f"holds other tensors than the manifest's modules need ({sorted(keys ^ specs.keys())[0]} differs)",
                file=file,
            )
        for key, (_, shape) in specs.items():
            x = read_tensor(f, file, key)
            if tuple(x.shape) != shape or not x.is_floating_point():
                raise RMMError(
                    f"{key} is {x.dtype} {tuple(x.shape)}; the manifest needs floats of shape {shape}", file=file
                )
            if not torch.isfinite(x).all():
                raise RMMError(f"{key} holds NaN or Inf values", file=file)
    return file


def _solve_module(
    adapters: list[LoraAdapter],
    mod: ModuleEntry,
    device: torch.device,
    *,
    canonical: bool,
    dtype: torch.dtype,
    basis: Path | None,
):
    """One module: (basis tensors, each task's tensors, energy kept, each task's dW error), as stored.

    Everything is cast to `dtype` before errors are measured, so the report describes what revert
    rebuilds. Coefficients are fitted to the basis as stored, so a bundle solved here and one whose
    basis came from a coordinator agree to the last bit for the same basis.
    """
    how = kind(mod)
    raw = stack_factors(adapters, mod, canonical=False, device=device)
    B, A = canonicalize(*raw) if canonical or how.canonical else raw
    given = None
    if basis is not None:
        with open_safetensors(basis) as f:
            given = {k: read_tensor(f, basis, f"{mod.name}.{k}") for k in how.basis_specs(mod, dtype)}
    shared, own, energy = how.fit(mod, adapters, raw, (B, A), dtype, given)
    reverted = rebuild_all(mod, shared, own)
    errors = relative_error(B, A, *reverted).tolist()
    if energy is None:
        total = float(frobenius_inner(B, A, B, A).sum())
        kept = float(frobenius_inner(*reverted, *reverted).sum())
        energy = {"dW": 1.0 if total <= 0 else min(1.0, kept / total)}
    return shared, own, energy, errors


def allocate_modules(
    adapters: list[LoraAdapter],
    specs: list[ModuleEntry],
    budget: float,
    progress: bool,
    calibration: Calibration | None = None,
    device: torch.device = torch.device("cpu"),
    map_modules: ModuleMap | None = None,
) -> tuple[list[ModuleEntry], Calibrated | None]:
    """Method "auto": every module's error curves (one pass of `map_modules`), then the plan under `budget` numbers
    (here): the least dW error, or, with `calibration`, the candidate plan that costs the tasks' outputs the least."""
    examples = read_examples(calibration, [a.name for a in adapters]) if calibration else None
    found = list(
        track(
            (map_modules or _in_order)(partial(_module_curves, adapters), specs, device),
            total=len(specs),
            description="sizing modules",
            disable=not progress,
            transient=True,
        )
    )
    names = [a.name for a in adapters]
    if calibration is None:
        return planned_modules(specs, allocate(found, budget), names), None
    clock = time.perf_counter()
    plans = candidate_plans(found, budget)
    candidates = {name: planned_modules(specs, plan, names) for name, plan in plans.items()}
    per_task, seconds = candidate_divergences(adapters, candidates, calibration.base, examples, device=device)
    total = summed(per_task)
    original = numbers_original(adapters)
    report = Calibrated(
        **calibration.record(),
        files=examples.files,
        candidates={
            name: Candidate(
                storage_ratio=sum(c.cost for c in plan) / original,
                dw_objective=dw_objective(found, plan),
                divergence=per_task[name],
                total=total[name],
            )
            for name, plan in plans.items()
        },
        chosen=chosen(total),
        seconds=seconds | {"total": time.perf_counter() - clock},
    )
    return candidates[report.chosen], report


def _module_curves(adapters: list[LoraAdapter], mod: ModuleEntry, device: torch.device) -> Curves:
    raw = stack_factors(adapters, mod, canonical=False, device=device)
    return curves(*raw, [a.modules[mod.name].rank for a in adapters])


def candidate_divergences(
    adapters: list[LoraAdapter],
    candidates: dict[str, list[ModuleEntry]],
    base: Path,
    examples: Examples,
    bases: dict[str, Path] | None = None,
    device: str | torch.device | None = "auto",
) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Per candidate plan and task, the divergence of the reverted adapter's outputs from the original's
    (`rmm.calibrate.divergences`), and the seconds spent. With `bases` (each candidate's basis file, as a
    federation's coordinator sends them) nothing is solved here but each task's coefficients."""
    dtype, device = storage_dtype(adapters), resolve(device)
    clock = time.perf_counter()
    reverted = {
        name: reverted_factors(adapters, modules, dtype, bases[name] if bases else None, device)
        for name, modules in candidates.items()
    }
    solve = time.perf_counter() - clock
    per_task, seconds = divergences(adapters, reverted, base, examples, device)
    return per_task, seconds | {"solve": solve}


def reverted_factors(
    adapters: list[LoraAdapter],
    modules: list[ModuleEntry],
    dtype: torch.dtype,
    basis: Path | None = None,
    device: str | torch.device | None = "auto",
) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Each task's folded factors per module as `revert` would rebuild them from a bundle of `modules` stored in
    `dtype` (in the task's own dtype, as revert writes it), with nothing written."""
    found: list[dict] = [{} for _ in adapters]
    device = resolve(device)
    solve = partial(_solve_module, adapters, canonical=False, dtype=dtype, basis=basis)
    for mod, (shared, own, _, _) in zip(modules, _in_order(solve, modules, device)):
        for t, a in enumerate(adapters):
            B, A = rebuild(mod, shared, own[t])
            found[t][mod.name] = (B.to(a.dtype), A.to(a.dtype))
    return found


def _in_order(solve_one, modules: list[ModuleEntry], device: torch.device):
    """Solve modules on a few threads (torch releases the GIL) on `device`, yielding results in order.

    At most `workers + 1` modules are in flight, so memory stays a few modules of all T adapters. On the CPU each
    thread computes on one intra-op thread, so the threads together use the cores and no more (`rmm.device`).
    """
    workers = device_workers(device)
    bound_heap()
    with single_threaded(device), ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        for mod in modules:
            pending.append(pool.submit(solve_one, mod, device))
            if len(pending) > workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
