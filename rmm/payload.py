"""What a site uploads to a federation, and how a coordinator turns uploads into a basis.

Every upload is a safetensors file (raw little-endian bytes with dtype and shape per tensor; no pickle).
Method "auto" takes two rounds, `spectra` then `curves` (below, after `aggregate`). Under method
"rmm-paper" a site sends one payload holding, per module and factor ("B": rows of lora_B, "A": columns
of lora_A), one of (encoded by `rmm.solver.encode`):

- `moments` (exact, additive): `s1` (P, r) and the upper triangle of `s2` (P, r(r+1)/2), float64;
  `r (r + 3) / 2` numbers per position whatever the site's task count.
- `sketch` (q per position): the site's mean `mean` (P, r) and `qs` (P, r, q) = top-q eigenvectors
  of its centred scatter times the square roots of their eigenvalues, float64. The scatter is
  rebuilt as `qs qs^T`, exact when q >= min(r, n - 1), smaller and lossy below that. q is capped
  at min(r, n - 1), so an exact sketch holds r n numbers per position: the smallest exact upload
  when the site has fewer than (r + 3) / 2 tasks.
- `factors` (exact; only when a site opts in): the folded factors `x` (n, P, r) themselves.

Every kind becomes the same additive `Moments` on the coordinator, so whatever mix of kinds the
sites send, the basis is solved by the same `rmm.solver.solve` as a centralised merge.
"""

from __future__ import annotations

import json
import operator
from contextlib import ExitStack
from functools import partial, reduce
from pathlib import Path
from typing import Iterator, Literal

import torch
from safetensors.torch import save_file

from rmm.adapter import LoraAdapter
from rmm.bundle import ModuleEntry
from rmm.errors import RMMError
from rmm.io import StreamingWriter, open_safetensors, read_tensor, safe_name
from rmm.allocate import allocate, candidate_plans, dw_objective
from rmm.canonical import canonicalize, singular_values
from rmm.plan import PLAN, planned_modules, stack_factors
from rmm.solver import Moments, decode, encode, solve, summary_specs
from rmm import storage
from rmm.storage import FACTORS, Choice

Upload = Literal["moments", "sketch", "factors"]
UPLOADS = ("moments", "sketch", "factors")


def write_payload(
    adapters: list[LoraAdapter],
    modules: list[ModuleEntry],
    file: Path,
    kind: Upload,
    *,
    q: int | None = None,
    canonical: bool = False,
    device: torch.device | None = None,
) -> StreamingWriter:
    """Stream a site's payload for `adapters` to `file`, module by module, computed on `device` (the CPU by default).
    Returns the closed writer (its `numbers` and `bytes` say how much was written)."""
    if kind not in UPLOADS:
        raise RMMError(f"unknown upload kind {kind!r}; expected one of {UPLOADS}")
    n = len(adapters)
    if kind == "sketch" and (q is None or q < 1):
        raise RMMError(f"a sketch upload needs a rank q >= 1, got {q!r}")
    dtype = torch.float32 if kind == "factors" and all(a.dtype != torch.float64 for a in adapters) else torch.float64
    specs = {}
    for m in modules:
        for f, P in zip(FACTORS, (m.out_features, m.in_features)):
            if kind == "factors":
                specs[f"{m.name}.{f}.x"] = (dtype, (n, P, m.rank))
            else:
                specs |= {
                    f"{m.name}.{f}.{suffix}": spec for suffix, spec in summary_specs(P, m.rank, n, kind, q).items()
                }
    writer = StreamingWriter(file, specs, {"kind": kind, "n": str(n), "q": str(q or 0)})
    for m in modules:
        B, A = stack_factors(adapters, m, canonical, device)
        for f, X in zip(FACTORS, (B, A.mT)):
            for suffix, tensor in encode(X, kind, q):
                writer.write(f"{m.name}.{f}.{suffix}", tensor.to(specs[f"{m.name}.{f}.{suffix}"][0]).contiguous())
    writer.close()
    return writer


def read_payload(file: Path, modules: list[ModuleEntry]) -> Iterator[dict[str, Moments]]:
    """Per module (in `modules` order) the payload's moments of each factor, whatever its kind."""
    with open_safetensors(file) as f:
        meta = f.metadata() or {}
        kind, n = meta.get("kind"), int(meta.get("n", "0"))
        if kind not in UPLOADS or n < 1:
            raise RMMError(f"not an RMM payload (kind {kind!r}, n {n})", file=file)
        for m in modules:
            out = {}
            for factor in FACTORS:
                get = lambda suffix: read_tensor(f, file, f"{m.name}.{factor}.{suffix}").to(torch.float64)  # noqa: E731
                try:
                    out[factor] = decode(kind, n, m.rank, get)
                except RuntimeError as e:  # shapes that do not fit the module
                    raise RMMError(f"payload tensors do not fit the module: {e}", file=file, module=m.name) from None
            yield out


def aggregate(
    payloads: list[Path], modules: list[ModuleEntry], file: Path, dtype: torch.dtype = torch.float32
) -> dict[str, dict[str, float]]:
    """Sum every payload's moments per module, solve, and stream the basis to `file`.

    Returns, per module and factor, the share of the centred scatter the basis keeps.
    """
    writer = StreamingWriter(file, storage.basis_specs(modules, dtype), {"format": "pt"})
    readers = [read_payload(p, modules) for p in payloads]
    energy = {}
    for m in modules:
        parts = [next(r) for r in readers]
        energy[m.name] = {}
        for factor in FACTORS:
            basis = solve(reduce(operator.add, (part[factor] for part in parts)), m.p)
            writer.write(f"{m.name}.{factor}.mean", basis.mean.to(dtype))
            writer.write(f"{m.name}.{factor}.basis", basis.vectors.to(dtype))
            spread = basis.eigvals.sum().item()
            energy[m.name][factor] = 1.0 if spread <= 0 else basis.eigvals[:, : m.p].sum().item() / spread
    writer.close()
    return energy


def smallest_exact_numbers(positions: int, rank: int, n: int) -> int:
    """The smallest exact upload of n tasks: min(n r, r (r + 3) / 2) numbers per position."""
    return positions * min(n * rank, rank * (rank + 3) // 2)


# --- method "auto": the allocator in two rounds --------------------------------------------------
#
# Round 1, `spectra` (per module): every task's singular values `S` (n, r) and own rank `ranks` (n,), and
# what each storage kind asks of the site (`StorageKind.spectra`): joint sharing the site's Gram roots `W_out`
# (out, q), `W_in` (in, q) (`rmm.storage.joint.grams`, q = min(side, n r)); per-position sharing an exact
# summary of its raw factors per position, `B.*` and `A.*` (the smaller of the `moments` and the full-rank
# `sketch` for its task count and the module's rank), float64. The coordinator builds each kind's bases from
# them (`StorageKind.bases`: roots side by side give U, V; summed moments the per-position bases). Round 2,
# `curves` (per module): every task's error curve against those bases, per kind that needs one, named by the
# kind (`joint` (n, K + 1), `shared` (n, p + 1)). The coordinator then allocates exactly as `rmm merge` does
# (`write_plan`): the final basis file holds what the plan shares, cut from the bases, and, in its metadata,
# the plan. Truncation stays local: each site cuts its own tasks to the ranks the plan gives them. Task names
# travel in each payload's metadata.


def write_spectra(
    adapters: list[LoraAdapter], modules: list[ModuleEntry], file: Path, device: torch.device | None = None
) -> StreamingWriter:
    """A site's round-1 upload of a method "auto" federation, streamed module by module, computed on `device`."""
    n = len(adapters)
    specs = {}
    for m in modules:
        specs |= {f"{m.name}.{k}": spec for k, spec in _spectra_specs(m, n).items()}
    writer = StreamingWriter(
        file, specs, {"kind": "spectra", "n": str(n), "tasks": json.dumps([a.name for a in adapters])}
    )
    for m in modules:
        raw = stack_factors(adapters, m, canonical=False, device=device)
        canonical = canonicalize(*raw)
        writer.write(f"{m.name}.S", singular_values(canonical[0]))
        writer.write(f"{m.name}.ranks", torch.tensor([a.modules[m.name].rank for a in adapters], dtype=torch.int64))
        for k in storage.KINDS.values():
            for suffix, tensor in k.spectra(m, raw, canonical).items():
                writer.write(f"{m.name}.{suffix}", tensor)
    writer.close()
    return writer


def _spectra_specs(m: ModuleEntry, n: int) -> dict:
    """suffix -> (dtype, shape) of one module's spectra from a site of n tasks."""
    specs = {"S": (torch.float64, (n, m.rank)), "ranks": (torch.int64, (n,))}
    for k in storage.KINDS.values():
        specs |= k.spectra_specs(m, n)
    return specs


def write_bases(spectra: list[Path], modules: list[ModuleEntry], file: Path) -> None:
    """The coordinator, after round 1: what each storage kind builds from the sites' spectra for their curves
    (joint modules' U, V from the sites' roots; per-position bases from their summed moments), float64."""
    per_file = [len(payload_tasks(p)) for p in spectra]
    tasks = [t for p in spectra for t in payload_tasks(p)]
    with ExitStack() as stack:
        files = [stack.enter_context(open_safetensors(p)) for p in spectra]
        shapes, ranks = {}, {}
        for m in modules:
            ranks[m.name] = torch.cat([read_tensor(f, p, f"{m.name}.ranks") for f, p in zip(files, spectra)]).tolist()
            for k in storage.KINDS.values():
                shapes |= {f"{m.name}.{suffix}": spec for suffix, spec in k.bases_specs(m, ranks[m.name]).items()}
        writer = StreamingWriter(file, shapes, {"kind": "bases", "tasks": json.dumps(tasks)})
        for m in modules:
            sites = [(n, partial(_read_module, f, p, m.name)) for f, p, n in zip(files, spectra, per_file)]
            for k in storage.KINDS.values():
                specs = k.bases_specs(m, ranks[m.name])
                for suffix, tensor in k.bases(m, ranks[m.name], sites, specs).items():
                    writer.write(f"{m.name}.{suffix}", tensor)
        writer.close()


def _read_module(f, file: Path, module: str, suffix: str, device: torch.device | None = None) -> torch.Tensor:
    return read_tensor(f, file, f"{module}.{suffix}").to(device=device)


def _shape_of(f, module: str, suffix: str) -> tuple[int, ...]:
    return tuple(f.get_slice(f"{module}.{suffix}").get_shape())


def _curve_widths(f, m: ModuleEntry) -> dict[str, int]:
    """Kind name -> columns of each task's round-2 curve of module `m`, from the bases file `f`."""
    shapes = partial(_shape_of, f, m.name)
    return {name: w for name, k in storage.KINDS.items() if (w := k.curve_width(m, shapes)) is not None}


def write_curves(
    adapters: list[LoraAdapter], modules: list[ModuleEntry], bases: Path, file: Path, device: torch.device | None = None
) -> StreamingWriter:
    """A site's round-2 upload: each task's error curves against the federation's bases, per kind that needs them,
    computed on `device`."""
    n = len(adapters)
    with open_safetensors(bases) as f:
        specs = {}
        for m in modules:
            specs |= {f"{m.name}.{name}": (torch.float64, (n, w)) for name, w in _curve_widths(f, m).items()}
        writer = StreamingWriter(
            file, specs, {"kind": "curves", "n": str(n), "tasks": json.dumps([a.name for a in adapters])}
        )
        for m in modules:
            raw = stack_factors(adapters, m, canonical=False, device=device)
            canonical = canonicalize(*raw)
            for name in _curve_widths(f, m):
                writer.write(
                    f"{m.name}.{name}",
                    storage.KINDS[name].site_curve(
                        m, raw, canonical, partial(_read_module, f, bases, m.name, device=device)
                    ),
                )
    writer.close()
    return writer


def federated_curves(
    spectra: list[Path], curves: list[Path], modules: list[ModuleEntry], bases: Path
) -> tuple[list[str], list[storage.Curves], dict[str, torch.Tensor]]:
    """The coordinator, after round 2: every module's error curves over all tasks, as `rmm.allocate.curves` gives
    them centrally. Also the tasks (in spectra order) and, per module, each task's ||dW||^2."""
    tasks = [t for p in spectra for t in payload_tasks(p)]
    by_task = {t: i for i, t in enumerate(tasks)}
    found, energy = [], {}
    with ExitStack() as stack:
        files = [stack.enter_context(open_safetensors(p)) for p in (*spectra, *curves, bases)]
        spec_files, curve_files, fb = files[: len(spectra)], files[len(spectra) : -1], files[-1]
        order = [by_task[t] for p in curves for t in payload_tasks(p)]  # curve rows, in spectra order
        if sorted(order) != list(range(len(tasks))):
            raise RMMError("the curves do not cover the same tasks as the spectra", file=curves[0] if curves else bases)
        for m in modules:
            S = torch.cat([read_tensor(f, p, f"{m.name}.S").double() for f, p in zip(spec_files, spectra)])
            ranks = torch.cat([read_tensor(f, p, f"{m.name}.ranks") for f, p in zip(spec_files, spectra)]).tolist()
            shapes, kinds = partial(_shape_of, fb, m.name), {}
            for name, k in storage.KINDS.items():
                rows = None
                if k.curve_width(m, shapes) is not None:
                    stacked = torch.cat(
                        [read_tensor(f, p, f"{m.name}.{name}").double() for f, p in zip(curve_files, curves)]
                    )
                    rows = torch.empty_like(stacked)
                    rows[order] = stacked
                kinds[name] = k.federated_curve(S, rows, shapes)
            found.append(storage.Curves(m.out_features, m.in_features, m.rank, tuple(ranks), kinds))
            energy[m.name] = (S * S).sum(-1)
    return tasks, found, energy


def kept_energy(modules: list[ModuleEntry], plan: list[Choice], energy: dict[str, torch.Tensor]) -> dict:
    """Per module, the share of the tasks' summed ||dW||^2 (`energy`, per task) the plan keeps."""
    return {
        m.name: {
            "dW": 1.0 - float((torch.tensor(c.errors) * energy[m.name]).sum() / energy[m.name].sum().clamp_min(1e-300))
        }
        for m, c in zip(modules, plan)
    }


def _plan_tensors(planned: list[ModuleEntry], fb, bases: Path, dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """What a plan shares, module by module in `storage.basis_specs` order, cut from the bases: each is the largest
    size the curves priced, and the plan keeps its head."""
    for m in planned:
        for suffix, (_, shape) in storage.kind(m).basis_specs(m, dtype).items():
            whole = read_tensor(fb, bases, f"{m.name}.{suffix}")
            yield whole[tuple(slice(0, n) for n in shape)].to(dtype).contiguous()


def _plan_json(planned: list[ModuleEntry]) -> str:
    return json.dumps([m.model_dump(mode="json") for m in planned])


def write_plan(
    spectra: list[Path],
    curves: list[Path],
    modules: list[ModuleEntry],
    budget: float,
    bases: Path,
    file: Path,
    dtype: torch.dtype = torch.float32,
) -> tuple[list[ModuleEntry], dict[str, dict[str, float]]]:
    """The coordinator, after round 2: allocate `budget` numbers over every task, as `rmm merge` does,
    and write the final basis (what the plan shares, cut from the bases, in `dtype`; the plan in its metadata).

    Returns the planned modules and, per module, the share of the tasks' summed ||dW||^2 the plan keeps.
    """
    tasks, found, energy = federated_curves(spectra, curves, modules, bases)
    plan = allocate(found, budget)
    planned = planned_modules(modules, plan, tasks)
    specs = storage.basis_specs(planned, dtype)
    writer = StreamingWriter(file, specs, {"format": "pt", PLAN: _plan_json(planned)})
    with open_safetensors(bases) as fb:
        for key, tensor in zip(specs, _plan_tensors(planned, fb, bases, dtype)):
            writer.write(key, tensor)
    writer.close()
    return planned, kept_energy(modules, plan, energy)


# --- method "auto" with calibration: a third round --------------------------------------------------
#
# After round 2 the coordinator writes every candidate plan of the allocator (`rmm.allocate.candidate_plans`) into
# one file (`write_candidates`: tensors "<candidate>/<module>.<suffix>", each candidate's plan in the metadata under
# "rmm.plan/<candidate>"). Each site splits it into the basis files the plans would be (`split_candidates`, the
# bytes `write_plan` writes for that plan), measures each candidate on its own tasks' examples, and uploads only
# the divergence per candidate summed over its tasks (`write_divergences`: one float64 scalar per candidate). The
# coordinator sums them over sites and keeps the least (`rmm.calibrate.chosen`); the final basis is that
# candidate's file, split from the same candidates file.


def write_candidates(
    spectra: list[Path],
    curves: list[Path],
    modules: list[ModuleEntry],
    budget: float,
    bases: Path,
    file: Path,
    dtype: torch.dtype = torch.float32,
) -> dict[str, dict]:
    """The coordinator, after round 2 of a calibrating federation: every candidate plan's basis in one file.

    Returns per candidate (in `candidate_plans` order) its planned modules, the share of ||dW||^2 it keeps per module,
    its stored numbers and its data-free objective."""
    tasks, found, energy = federated_curves(spectra, curves, modules, bases)
    plans = candidate_plans(found, budget)
    planned = {name: planned_modules(modules, plan, tasks) for name, plan in plans.items()}
    specs = {f"{name}/{k}": v for name, p in planned.items() for k, v in storage.basis_specs(p, dtype).items()}
    meta = {"kind": "candidates", "candidates": json.dumps(list(plans)), "dtype": str(dtype).removeprefix("torch.")}
    writer = StreamingWriter(file, specs, meta | {f"{PLAN}/{name}": _plan_json(p) for name, p in planned.items()})
    with open_safetensors(bases) as fb:
        tensors = (t for p in planned.values() for t in _plan_tensors(p, fb, bases, dtype))
        for key, tensor in zip(specs, tensors):
            writer.write(key, tensor)
    writer.close()
    return {
        name: {
            "modules": [m.model_dump(mode="json") for m in planned[name]],
            "energy": kept_energy(modules, plan, energy),
            "numbers": sum(c.cost for c in plan),
            "dw_objective": dw_objective(found, plan),
        }
        for name, plan in plans.items()
    }


def candidate_names(file: Path) -> list[str]:
    """The candidates of a candidates file, in order."""
    return _listed(file, "candidates", "no candidate list in the metadata: not a candidates file")


def split_candidates(file: Path, out_dir: Path, names: list[str] | None = None) -> dict[str, Path]:
    """Each candidate of a candidates file (or only `names`) as its own basis file `out_dir/<candidate>.safetensors`:
    a method-auto basis whose plan is in its metadata, as `write_plan` writes it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    found = {}
    with open_safetensors(file) as f:
        meta = f.metadata() or {}
        dtype = getattr(torch, meta.get("dtype", ""), None)
        if not isinstance(dtype, torch.dtype):
            raise RMMError(f"dtype {meta.get('dtype')!r} is not a torch dtype: not a candidates file", file=file)
        for name in names or candidate_names(file):
            if f"{PLAN}/{name}" not in meta:
                raise RMMError(f"candidate {name!r} has no plan in the metadata", file=file)
            plan = meta[f"{PLAN}/{name}"]
            planned = [ModuleEntry.model_validate(m) for m in json.loads(plan)]
            found[name] = out_dir / f"{safe_name(name)}.safetensors"
            specs = storage.basis_specs(planned, dtype)
            writer = StreamingWriter(found[name], specs, {"format": "pt", PLAN: plan})
            for key in specs:
                writer.write(key, read_tensor(f, file, f"{name}/{key}"))
            writer.close()
    return found


def write_divergences(totals: dict[str, float], tasks: list[str], file: Path) -> None:
    """A site's round-3 upload: per candidate, the divergence summed over its `tasks` (one float64 scalar each)."""
    meta = {"kind": "divergences", "tasks": json.dumps(tasks)}
    save_file({name: torch.tensor(float(x), dtype=torch.float64) for name, x in totals.items()}, file, meta)


def read_divergences(file: Path) -> dict[str, float]:
    with open_safetensors(file) as f:
        return {name: read_tensor(f, file, name).item() for name in f.keys()}


def check_divergences(file: Path, candidates: list[str], allowed: list[str]) -> list[str]:
    """The tasks of a round-3 upload, once it holds exactly one finite number >= 0 per candidate and its tasks are
    distinct tasks of `allowed`."""
    tasks = _site_tasks(file, allowed)
    with open_safetensors(file) as f:
        keys = set(f.keys())
        other = sorted(keys - set(candidates))
        if other:
            raise RMMError(f"{other[0]!r} is not a candidate plan of this federation", file=file)
        for name in candidates:
            if name not in keys:
                raise RMMError(f"missing {name}: give one number per candidate plan", file=file)
            x = read_tensor(f, file, name)
            if x.dim() != 0 or not x.is_floating_point():
                raise RMMError(f"{name} must be one float, not {x.dtype} of shape {tuple(x.shape)}", file=file)
            if not (torch.isfinite(x) and x >= 0):
                raise RMMError(f"{name} must be finite and >= 0, got {x.item()}", file=file)
    return tasks


def payload_tasks(file: Path) -> list[str]:
    """The task names a spectra, curves, bases or divergences file lists in its metadata, in row order."""
    return _listed(file, "tasks", "no task list in the metadata: not a spectra, curves or bases file")


def _listed(file: Path, key: str, missing: str) -> list[str]:
    """The JSON list under `key` in a safetensors file's metadata; `missing` says what the file is not, without it."""
    with open_safetensors(file) as f:
        meta = f.metadata() or {}
    try:
        return json.loads(meta[key])
    except (KeyError, ValueError):
        raise RMMError(missing, file=file) from None


def _site_tasks(file: Path, allowed: list[str]) -> list[str]:
    """The tasks an upload lists, once they are distinct tasks of `allowed` (the site's manifest)."""
    tasks = payload_tasks(file)
    if not tasks or len(set(tasks)) != len(tasks) or any(t not in allowed for t in tasks):
        raise RMMError(f"tasks {tasks} are not distinct tasks of the site's manifest", file=file)
    return tasks


def check_round_payload(
    file: Path, kind: str, modules: list[ModuleEntry], allowed: list[str], bases: Path | None = None
) -> list[str]:
    """The tasks of a spectra or curves payload, once every tensor has the shape and finite values
    `modules` (and, for curves, the `bases`) need and every task is one of `allowed`."""
    tasks = _site_tasks(file, allowed)
    n = len(tasks)
    with ExitStack() as stack:
        f = stack.enter_context(open_safetensors(file))
        fb = stack.enter_context(open_safetensors(bases)) if bases else None
        for m in modules:
            if kind == "spectra":
                shapes = {suffix: shape for suffix, (_, shape) in _spectra_specs(m, n).items()}
            else:
                shapes = {name: (n, w) for name, w in _curve_widths(fb, m).items()}
            for key, shape in shapes.items():
                x = read_tensor(f, file, f"{m.name}.{key}")
                if tuple(x.shape) != shape:
                    raise RMMError(f"{key} has shape {tuple(x.shape)}, not {shape}", file=file, module=m.name)
                if key == "ranks":
                    if x.dtype != torch.int64 or not ((x >= 1) & (x <= m.rank)).all():
                        raise RMMError(f"ranks must be integers from 1 to {m.rank}", file=file, module=m.name)
                elif not x.is_floating_point() or not torch.isfinite(x).all():
                    raise RMMError(f"{key} must hold finite floats", file=file, module=m.name)
    return tasks
