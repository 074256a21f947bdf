"""What a site uploads to a federation, and how a coordinator turns uploads into a basis.

A payload is a safetensors file (raw little-endian bytes with dtype and shape per tensor; no
pickle) holding, per module and factor ("B": rows of lora_B, "A": columns of lora_A), one of:

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
from functools import reduce
from pathlib import Path
from typing import Iterator, Literal

import torch

from rmm.adapter import LoraAdapter
from rmm.bundle import FACTORS, ModuleEntry
from rmm.errors import RMMError
from rmm.io import StreamingWriter, open_safetensors, read_tensor
from rmm.allocate import Curves, allocate, grams, joint_bases, joint_cap, joint_errors, shared_cap, shared_errors, singular_values, truncation_errors
from rmm.canonical import canonicalize
from rmm.merge import PLAN, basis_specs, planned_modules, stack_factors
from rmm.solver import Basis, Moments, solve

Kind = Literal["moments", "sketch", "factors"]
KINDS = ("moments", "sketch", "factors")


def write_payload(
    adapters: list[LoraAdapter], modules: list[ModuleEntry], file: Path, kind: Kind, *, q: int | None = None, canonical: bool = False
) -> StreamingWriter:
    """Stream a site's payload for `adapters` to `file`, module by module. Returns the closed writer
    (its `numbers` and `bytes` say how much was written)."""
    if kind not in KINDS:
        raise RMMError(f"unknown upload kind {kind!r}; expected one of {KINDS}")
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
                specs |= {f"{m.name}.{f}.{suffix}": spec for suffix, spec in _summary_specs(P, m.rank, n, kind, q).items()}
    writer = StreamingWriter(file, specs, {"kind": kind, "n": str(n), "q": str(q or 0)})
    for m in modules:
        B, A = stack_factors(adapters, m, canonical)
        for f, X in zip(FACTORS, (B, A.mT)):
            for suffix, tensor in _encode(X, kind, q):
                writer.write(f"{m.name}.{f}.{suffix}", tensor.to(specs[f"{m.name}.{f}.{suffix}"][0]).contiguous())
    writer.close()
    return writer


def read_payload(file: Path, modules: list[ModuleEntry]) -> Iterator[dict[str, Moments]]:
    """Per module (in `modules` order) the payload's moments of each factor, whatever its kind."""
    with open_safetensors(file) as f:
        meta = f.metadata() or {}
        kind, n = meta.get("kind"), int(meta.get("n", "0"))
        if kind not in KINDS or n < 1:
            raise RMMError(f"not an RMM payload (kind {kind!r}, n {n})", file=file)
        for m in modules:
            out = {}
            for factor in FACTORS:
                get = lambda suffix: read_tensor(f, file, f"{m.name}.{factor}.{suffix}").to(torch.float64)  # noqa: E731
                try:
                    out[factor] = _decode(kind, n, m.rank, get)
                except RuntimeError as e:  # shapes that do not fit the module
                    raise RMMError(f"payload tensors do not fit the module: {e}", file=file, module=m.name) from None
            yield out


def aggregate(payloads: list[Path], modules: list[ModuleEntry], file: Path, dtype: torch.dtype = torch.float32) -> dict[str, dict[str, float]]:
    """Sum every payload's moments per module, solve, and stream the basis to `file`.

    Returns, per module and factor, the share of the centred scatter the basis keeps.
    """
    writer = StreamingWriter(file, basis_specs(modules, dtype), {"format": "pt"})
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
    """DESIGN's smallest exact upload: min(n r, r (r + 3) / 2) numbers per position."""
    return positions * min(n * rank, rank * (rank + 3) // 2)


def _encode(X: torch.Tensor, kind: str, q: int | None):
    if kind == "factors":
        return [("x", X)]
    if kind == "moments":
        m = Moments.of(X)
        rows, cols = torch.triu_indices(X.shape[-1], X.shape[-1])
        return [("s1", m.s1), ("s2", m.s2[:, rows, cols])]
    mean = X.to(torch.float64).mean(0)
    centred = (X.to(torch.float64) - mean).transpose(0, 1)  # (P, n, r)
    evals, evecs = torch.linalg.eigh(centred.mT @ centred)  # ascending
    k = _sketch_rank(q, X.shape[-1], X.shape[0])
    top = evals[..., evals.shape[-1] - k :].clamp_min(0).sqrt()
    return [("mean", mean), ("qs", evecs[..., evecs.shape[-1] - k :] * top.unsqueeze(-2))]


def _summary_specs(P: int, r: int, n: int, kind: str, q: int | None) -> dict:
    """suffix -> (dtype, shape) of one factor's `moments` or `sketch` for n tasks at P positions of rank r."""
    if kind == "moments":
        return {"s1": (torch.float64, (P, r)), "s2": (torch.float64, (P, r * (r + 1) // 2))}
    return {"mean": (torch.float64, (P, r)), "qs": (torch.float64, (P, r, _sketch_rank(q, r, n)))}


def _smallest_exact(n: int, r: int) -> tuple[str, int | None]:
    """The exact per-position summary with the fewest numbers for n tasks of rank r: a full-rank
    sketch (r n per position) below (r + 3) / 2 tasks, else the moments (r (r + 3) / 2)."""
    return ("sketch", max(1, n - 1)) if n * r < r * (r + 3) // 2 else ("moments", None)


def _sketch_rank(q: int, r: int, n: int) -> int:
    """n centred vectors span at most n - 1 directions: more columns would only carry zeros."""
    return min(q, r, n - 1)


def _decode(kind: str, n: int, r: int, get) -> Moments:
    if kind == "factors":
        return Moments.of(get("x"))
    if kind == "moments":
        packed = get("s2")
        rows, cols = torch.triu_indices(r, r)
        s2 = torch.zeros(packed.shape[0], r, r, dtype=torch.float64)
        s2[:, rows, cols] = packed
        s2[:, cols, rows] = packed
        return Moments(n, get("s1"), s2)
    mean, qs = get("mean"), get("qs")
    return Moments(n, n * mean, qs @ qs.mT + n * mean[:, :, None] * mean[:, None, :])


# --- method "auto": the allocator in two rounds --------------------------------------------------
#
# Round 1, `spectra` (per module): every task's singular values `S` (n, r) and own rank `ranks` (n,),
# the site's Gram roots `W_out` (out, q), `W_in` (in, q) (`rmm.allocate.grams`, q = min(side, n r)),
# and an exact summary of its raw factors per position, `B.*` and `A.*` (the smaller of the `moments`
# and the full-rank `sketch` kinds for its task count and the module's rank), float64.
# The coordinator sets all sites' roots side by side and sums the moments: the joint bases U, V and the
# per-position bases (`bases`). Round 2, `curves` (per module): every task's error curves against
# those bases, `joint` (n, K + 1) and `shared` (n, p + 1). The coordinator then allocates exactly as
# `rmm merge` does (`write_plan`): the final basis file holds what the plan shares (U and V of joint
# modules, mean and basis of per-position ones) and, in its metadata, the plan. Truncation stays local:
# each site cuts its own tasks to the ranks the plan gives them. Task names travel in each payload's metadata.


def write_spectra(adapters: list[LoraAdapter], modules: list[ModuleEntry], file: Path) -> StreamingWriter:
    """A site's round-1 upload of a method "auto" federation, streamed module by module."""
    n = len(adapters)
    specs = {}
    for m in modules:
        specs[f"{m.name}.S"] = (torch.float64, (n, m.rank))
        specs[f"{m.name}.ranks"] = (torch.int64, (n,))
        specs[f"{m.name}.W_out"] = (torch.float64, (m.out_features, min(m.out_features, n * m.rank)))
        specs[f"{m.name}.W_in"] = (torch.float64, (m.in_features, min(m.in_features, n * m.rank)))
        for f, P in zip(FACTORS, (m.out_features, m.in_features)):
            specs |= {f"{m.name}.{f}.{suffix}": spec for suffix, spec in _summary_specs(P, m.rank, n, *_smallest_exact(n, m.rank)).items()}
    writer = StreamingWriter(file, specs, {"kind": "spectra", "n": str(n), "tasks": json.dumps([a.name for a in adapters])})
    for m in modules:
        raw = stack_factors(adapters, m, canonical=False)
        B, A = canonicalize(*raw)
        W_out, W_in = grams(B, A)
        writer.write(f"{m.name}.S", singular_values(B))
        writer.write(f"{m.name}.ranks", torch.tensor([a.modules[m.name].rank for a in adapters], dtype=torch.int64))
        writer.write(f"{m.name}.W_out", W_out.contiguous())
        writer.write(f"{m.name}.W_in", W_in.contiguous())
        for f, X in zip(FACTORS, (raw[0], raw[1].mT)):
            for suffix, tensor in _encode(X, *_smallest_exact(n, m.rank)):
                writer.write(f"{m.name}.{f}.{suffix}", tensor.contiguous())
    writer.close()
    return writer


def write_bases(spectra: list[Path], modules: list[ModuleEntry], file: Path) -> None:
    """The coordinator, after round 1: every module's joint bases U, V from the sites' roots and its
    per-position bases (mean and basis per factor, p up to `shared_cap`) from their summed moments; float64."""
    per_file = [len(payload_tasks(p)) for p in spectra]
    tasks = [t for p in spectra for t in payload_tasks(p)]
    T, caps = len(tasks), {}
    with ExitStack() as stack:
        files = [stack.enter_context(open_safetensors(p)) for p in spectra]
        shapes = {}
        for m in modules:
            ranks = torch.cat([read_tensor(f, p, f"{m.name}.ranks") for f, p in zip(files, spectra)]).tolist()
            caps[m.name] = joint_cap(m.out_features, m.in_features, ranks)
            for side, size in (("U", m.out_features), ("V", m.in_features)):
                shapes[f"{m.name}.{side}"] = (torch.float64, (size, min(caps[m.name], size, T * m.rank)))
            shapes |= basis_specs([m.model_copy(update={"method": "shared", "p": shared_cap(m.rank, ranks)})], torch.float64)
        writer = StreamingWriter(file, shapes, {"kind": "bases", "tasks": json.dumps(tasks)})
        for m in modules:
            roots = {side: [read_tensor(f, p, f"{m.name}.{side}").double() for f, p in zip(files, spectra)] for side in ("W_out", "W_in")}
            U, V = joint_bases(roots["W_out"], roots["W_in"], caps[m.name])
            writer.write(f"{m.name}.U", U.contiguous())
            writer.write(f"{m.name}.V", V.contiguous())
            for factor in FACTORS:
                total = reduce(operator.add, (
                    _decode(_smallest_exact(n, m.rank)[0], n, m.rank, lambda suffix: read_tensor(f, p, f"{m.name}.{factor}.{suffix}").double())  # noqa: B023
                    for f, p, n in zip(files, spectra, per_file)
                ))
                basis = solve(total, shapes[f"{m.name}.{factor}.basis"][1][2])
                writer.write(f"{m.name}.{factor}.mean", basis.mean.contiguous())
                writer.write(f"{m.name}.{factor}.basis", basis.vectors.contiguous())
        writer.close()


def write_curves(adapters: list[LoraAdapter], modules: list[ModuleEntry], bases: Path, file: Path) -> StreamingWriter:
    """A site's round-2 upload: each task's joint and per-position error curves against the federation's bases."""
    n = len(adapters)
    with open_safetensors(bases) as f:
        specs = {}
        for m in modules:
            specs[f"{m.name}.joint"] = (torch.float64, (n, max(f.get_slice(f"{m.name}.{s}").get_shape()[1] for s in ("U", "V")) + 1))
            specs[f"{m.name}.shared"] = (torch.float64, (n, f.get_slice(f"{m.name}.B.basis").get_shape()[2] + 1))
        writer = StreamingWriter(file, specs, {"kind": "curves", "n": str(n), "tasks": json.dumps([a.name for a in adapters])})
        for m in modules:
            raw = stack_factors(adapters, m, canonical=False)
            per_position = tuple(
                Basis(read_tensor(f, bases, f"{m.name}.{x}.mean").double(), read_tensor(f, bases, f"{m.name}.{x}.basis").double(), torch.empty(0))
                for x in FACTORS
            )
            B, A = canonicalize(*raw)
            U, V = (read_tensor(f, bases, f"{m.name}.{s}").double() for s in ("U", "V"))
            writer.write(f"{m.name}.joint", joint_errors(B, A, U, V))
            writer.write(f"{m.name}.shared", shared_errors(*raw, per_position))
    writer.close()
    return writer


def write_plan(spectra: list[Path], curves: list[Path], modules: list[ModuleEntry], budget: float, bases: Path, file: Path,
               dtype: torch.dtype = torch.float32) -> tuple[list[ModuleEntry], dict[str, dict[str, float]]]:
    """The coordinator, after round 2: allocate `budget` numbers over every task, as `rmm merge` does,
    and write the final basis (joint modules' U, V in `dtype`; the plan in its metadata).

    Returns the planned modules and, per module, the share of the tasks' summed ||dW||^2 the plan keeps.
    """
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
            per_task = {}
            for key in ("joint", "shared"):
                rows = torch.cat([read_tensor(f, p, f"{m.name}.{key}").double() for f, p in zip(curve_files, curves)])
                per_task[key] = torch.empty_like(rows)
                per_task[key][order] = rows
            sides = tuple(fb.get_slice(f"{m.name}.{s}").get_shape()[1] for s in ("U", "V"))
            found.append(Curves(m.out_features, m.in_features, tuple(ranks), truncation_errors(S), per_task["joint"], sides, per_task["shared"]))
            energy[m.name] = (S * S).sum(-1)
        plan = allocate(found, budget)
        planned = planned_modules(modules, plan, tasks)
        writer = StreamingWriter(file, basis_specs(planned, dtype), {"format": "pt", PLAN: json.dumps([m.model_dump(mode="json") for m in planned])})
        for m in planned:
            if m.method == "joint":
                writer.write(f"{m.name}.U", read_tensor(fb, bases, f"{m.name}.U")[:, : m.size[0]].to(dtype).contiguous())
                writer.write(f"{m.name}.V", read_tensor(fb, bases, f"{m.name}.V")[:, : m.size[1]].to(dtype).contiguous())
            elif m.method == "shared":
                for x in FACTORS:
                    writer.write(f"{m.name}.{x}.mean", read_tensor(fb, bases, f"{m.name}.{x}.mean").to(dtype).contiguous())
                    writer.write(f"{m.name}.{x}.basis", read_tensor(fb, bases, f"{m.name}.{x}.basis")[..., : m.p].to(dtype).contiguous())
        writer.close()
    kept = {m.name: {"dW": 1.0 - float((torch.tensor(c.errors) * energy[m.name]).sum() / energy[m.name].sum().clamp_min(1e-300))} for m, c in zip(modules, plan)}
    return planned, kept


def payload_tasks(file: Path) -> list[str]:
    """The task names a spectra, curves or bases file lists in its metadata, in row order."""
    with open_safetensors(file) as f:
        meta = f.metadata() or {}
    try:
        return json.loads(meta["tasks"])
    except (KeyError, ValueError):
        raise RMMError("no task list in the metadata: not a spectra, curves or bases file", file=file) from None


def check_round_payload(file: Path, kind: str, modules: list[ModuleEntry], allowed: list[str], bases: Path | None = None) -> list[str]:
    """The tasks of a spectra or curves payload, once every tensor has the shape and finite values
    `modules` (and, for curves, the `bases`) need and every task is one of `allowed`."""
    tasks = payload_tasks(file)
    n = len(tasks)
    if not tasks or len(set(tasks)) != n or any(t not in allowed for t in tasks):
        raise RMMError(f"tasks {tasks} are not distinct tasks of the site's manifest", file=file)
    with ExitStack() as stack:
        f = stack.enter_context(open_safetensors(file))
        fb = stack.enter_context(open_safetensors(bases)) if bases else None
        for m in modules:
            if kind == "spectra":
                shapes = {"S": (n, m.rank), "ranks": (n,), "W_out": (m.out_features, min(m.out_features, n * m.rank)),
                          "W_in": (m.in_features, min(m.in_features, n * m.rank))}
                for x, P in zip(FACTORS, (m.out_features, m.in_features)):
                    shapes |= {f"{x}.{suffix}": shape for suffix, (_, shape) in _summary_specs(P, m.rank, n, *_smallest_exact(n, m.rank)).items()}
            else:
                shapes = {"joint": (n, max(fb.get_slice(f"{m.name}.{s}").get_shape()[1] for s in ("U", "V")) + 1),
                          "shared": (n, fb.get_slice(f"{m.name}.B.basis").get_shape()[2] + 1)}
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
