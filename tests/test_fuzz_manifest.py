"""Malformed manifests (random mutations of valid ones) never crash revert or inspect, and never write outside --out."""

import copy
import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rmm.bundle import MergeOptions
from rmm.errors import RMMError
from rmm.merge import merge, revert
from rmm.summary import inspect_bundle

# Values a crafted or damaged manifest may hold anywhere: wrong types, path-like names, extreme numbers,
# bogus dtypes and methods. "{root}" becomes the example's temporary folder (an absolute path a name may aim at).
BAD = [
    None,
    True,
    0,
    -1,
    -(2**63),
    2**64,
    10**30,
    1e308,
    float("nan"),
    float("inf"),
    -0.5,
    "",
    " ",
    ".",
    "..",
    "../victim",
    "a/b",
    "{root}/victim",
    "task0",
    "nn",
    "float128",
    "int8",
    "joint",
    "truncate",
    "shared",
    "rmm-bundle/1",
    [],
    [1, 2],
    {},
    {"task0": 1},
]


@pytest.fixture(scope="module")
def bundles(adapters, tmp_path_factory):
    """A bundle stored per task (auto at this ratio truncates) and one stored per position (rmm-paper), with a head."""
    root = tmp_path_factory.mktemp("fuzz")
    merge(adapters[:3], root / "auto", MergeOptions(storage_ratio=0.5), progress=False)
    merge(adapters[:3], root / "paper", MergeOptions(basis_size=1), progress=False)
    return root


def _paths(x, prefix=()):
    """Every location in a JSON tree, as key/index tuples."""
    yield prefix
    items = x.items() if isinstance(x, dict) else enumerate(x) if isinstance(x, list) else ()
    for k, v in items:
        yield from _paths(v, (*prefix, k))


def _mutate(manifest, path, op, value):
    *parent_path, last = path or (None,)
    parent = manifest
    for k in parent_path:
        parent = parent[k]
    if not path:
        return value  # the whole manifest replaced
    if op == "delete":
        del parent[last]
    elif op == "rename" and isinstance(parent, dict):
        parent[str(value)] = parent.pop(last)
    else:
        parent[last] = value
    return manifest


def _tree(root):
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_malformed_manifests_are_refused_or_harmless(bundles, data):
    kind = data.draw(st.sampled_from(["auto", "paper"]))
    valid = json.loads((bundles / kind / "manifest.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        bundle = shutil.copytree(bundles / kind, root / "bundle")
        (root / "victim").mkdir()
        (root / "victim" / "precious.txt").write_text("mine")
        manifest = copy.deepcopy(valid)
        for _ in range(data.draw(st.integers(1, 3))):
            path = data.draw(st.sampled_from(list(_paths(manifest))))
            value = copy.deepcopy(data.draw(st.sampled_from(BAD)))  # BAD's lists and dicts stay as they are
            value = value.replace("{root}", tmp) if isinstance(value, str) else value
            manifest = _mutate(manifest, path, data.draw(st.sampled_from(["set", "delete", "rename"])), value)
        (bundle / "manifest.json").write_text(json.dumps(manifest))
        before = _tree(root)
        for run in (lambda: inspect_bundle(bundle), lambda: revert(bundle, root / "out", progress=False)):
            try:
                run()
            except RMMError as e:
                assert "\n" not in str(e)
        after = _tree(root)
        assert {k: v for k, v in after.items() if not k.startswith("out")} == before
