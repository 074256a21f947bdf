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
