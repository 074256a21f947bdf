"""Outputs never destroy inputs, and a crafted or damaged bundle cannot write outside --out or revert wrong weights."""

import hashlib
import shutil

import pytest

from rmm.errors import RMMError
from rmm.merge import merge


def _tree(root):
    """Every file under `root` with the sha256 of its bytes: what must stay unchanged."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def inputs(adapters, tmp_path):
    """Copies of two adapters in their own folder, so a test may point an output at them."""
    root = tmp_path / "inputs"
    return [shutil.copytree(a, root / a.name) for a in adapters[:2]]


@pytest.mark.parametrize("where", ["first input", "inputs' parent", "inside an input"])
def test_merge_force_never_replaces_an_input(inputs, where):
    out = {"first input": inputs[0], "inputs' parent": inputs[0].parent, "inside an input": inputs[1] / "bundle"}[where]
    before = _tree(inputs[0].parent)
    with pytest.raises(RMMError, match="input"):
        merge(inputs, out, progress=False, force=True)
    assert _tree(inputs[0].parent) == before


def test_baseline_force_never_replaces_an_input(inputs):
    from rmm.baselines import run

    before = _tree(inputs[0].parent)
    with pytest.raises(RMMError, match="input"):
        run("truncate", inputs, inputs[0].parent, force=True)
    assert _tree(inputs[0].parent) == before
