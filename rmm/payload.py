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

from pathlib import Path
from typing import Iterator, Literal

import torch

from rmm.adapter import LoraAdapter
from rmm.bundle import BASIS_FILE, FACTORS, ModuleEntry
from rmm.errors import RMMError
from rmm.io import StreamingWriter, open_safetensors, read_tensor
from rmm.merge import basis_specs, stack_factors
from rmm.solver import Moments, solve

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
            r = m.rank
            if kind == "moments":
                specs[f"{m.name}.{f}.s1"] = (torch.float64, (P, r))
                specs[f"{m.name}.{f}.s2"] = (torch.float64, (P, r * (r + 1) // 2))
            elif kind == "sketch":
                specs[f"{m.name}.{f}.mean"] = (torch.float64, (P, r))
                specs[f"{m.name}.{f}.qs"] = (torch.float64, (P, r, _sketch_rank(q, r, n)))
            else:
                specs[f"{m.name}.{f}.x"] = (dtype, (n, P, r))
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
            total = parts[0][factor]
            for part in parts[1:]:
                total = total + part[factor]
            basis = solve(total, m.p)
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
