"""The storage kinds' registry behind the manifest's schema, and each kind's number formula against its tensors."""

import math

import pytest
import torch
from pydantic import ValidationError

from rmm.bundle import ModuleEntry
from rmm.storage import KINDS, basis_specs, coef_specs

TASKS = ["a", "b", "c"]


@pytest.mark.parametrize(
    ("entry", "refusal"),
    [
        ({"method": "truncate"}, "truncate without its ranks"),
        ({"method": "joint"}, "joint without its size"),
        ({"method": "dense"}, "'truncate', 'joint' or 'shared'"),
    ],
)
def test_the_manifest_refuses_an_entry_its_kind_cannot_store(entry, refusal):
    """The schema takes its kinds' names and checks from the registry."""
    with pytest.raises(ValidationError, match=refusal):
        ModuleEntry(name="m", out_features=7, in_features=11, rank=4, p=0, **entry)


@pytest.mark.parametrize(
    "entry",
    [
        {"method": "shared", "p": 2},
        {"method": "shared", "p": 0},
        {"method": "truncate", "ranks": {"a": 1, "b": 4, "c": 0}},
        {"method": "joint", "size": (3, 5)},
    ],
)
def test_stored_numbers_are_the_tensors_the_bundle_holds(entry):
    """The formula `inspect` prints beside the count on disk, against the shapes merge writes."""
    mod = ModuleEntry(name="m", out_features=7, in_features=11, rank=4, **({"p": 0} | entry))
    held = sum(math.prod(shape) for _, shape in basis_specs([mod], torch.float32).values())
    held += sum(math.prod(shape) for t in TASKS for _, shape in coef_specs([mod], torch.float32, t).values())
    assert KINDS[mod.method].stored_numbers(mod, len(TASKS)) == held


def test_joint_curve_measured_a_few_tasks_at_a_time_is_the_dense_one(monkeypatch):
    """The joint curve forms the tasks' cores a chunk of tasks at a time (memory); chunks of 3 tasks of 7 give what
    dense dW gives: task t's error at size K is 1 - ||U_K^T dW_t V_K||^2 / ||dW_t||^2."""
    from rmm.canonical import canonicalize
    from rmm.storage import joint

    g = torch.Generator().manual_seed(0)
    B, A = (
        torch.randn(7, 12, 3, generator=g, dtype=torch.float64),
        torch.randn(7, 3, 10, generator=g, dtype=torch.float64),
    )
    Bc, Ac = canonicalize(B, A)
    U, V = joint.joint_bases(*([X] for X in joint.stacked_roots(Bc, Ac)), 8)
    monkeypatch.setattr(joint, "CHUNK", 3 * U.shape[1] * V.shape[1])
    got = joint.joint_errors(Bc, Ac, U, V)
    dW = B @ A
    for K in range(U.shape[1] + 1):
        kept = (U[:, :K].mT @ dW @ V[:, :K]).square().sum((-2, -1)) / dW.square().sum((-2, -1))
        assert torch.allclose(got[:, K], 1 - kept, atol=1e-12)


def test_shared_curve_measured_a_few_tasks_at_a_time_is_the_dense_one(monkeypatch):
    """The per-position curve rebuilds a chunk of tasks at a time (memory); chunks of 2 tasks of 5 give what dense
    dW gives for each basis size p, every position keeping its mean and top p basis vectors."""
    from rmm.solver import Moments, solve
    from rmm.storage import shared

    g = torch.Generator().manual_seed(1)
    B, A = (
        torch.randn(5, 9, 3, generator=g, dtype=torch.float64),
        torch.randn(5, 3, 7, generator=g, dtype=torch.float64),
    )
    bases = shared.position_bases(B, A, [3] * 5)
    monkeypatch.setattr(shared, "CHUNK", 2 * (9 + 7) * 3)
    got = shared.shared_errors(B, A, bases)
    for p in range(bases[0].p + 1):
        fits = []
        for X in (B, A.mT):
            b = solve(Moments.of(X), p)
            U = b.vectors[..., :p]  # (P, r, p)
            fits.append(b.mean + torch.einsum("prk,tpk->tpr", U, torch.einsum("prk,tpr->tpk", U, X - b.mean)))
        dW, fit = B @ A, fits[0] @ fits[1].mT
        want = (dW - fit).square().sum((-2, -1)) / dW.square().sum((-2, -1))
        assert torch.allclose(got[:, p], want, atol=1e-10)
