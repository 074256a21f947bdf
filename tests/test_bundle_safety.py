"""Outputs never destroy inputs, and a crafted or damaged bundle cannot write outside --out or revert wrong weights."""

import hashlib
import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from rmm.bundle import MergeOptions
from rmm.cli import main
from rmm.errors import RMMError
from rmm.merge import merge


def _tree(root):
    """Every file under `root` with the sha256 of its bytes: what must stay unchanged."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


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


# -- reverting a crafted or damaged bundle ---------------------------------------------------------


@pytest.fixture(scope="module")
def merged(adapters, tmp_path_factory):
    """One bundle of three adapters, copied by `bundle` for each test to damage; the paper's method, so its basis is
    not empty."""
    out = tmp_path_factory.mktemp("merged") / "bundle"
    merge(adapters[:3], out, MergeOptions(basis_size=1), progress=False)
    return out


@pytest.fixture
def bundle(merged, tmp_path):
    return shutil.copytree(merged, tmp_path / "bundle")


def _edit_manifest(bundle, fn):
    manifest = json.loads((bundle / "manifest.json").read_text())
    fn(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def _refused(capsys, *argv):
    """Run the CLI; it must exit 2 with one line starting "error:" and no traceback."""
    assert main(list(map(str, argv))) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err, err
    return err


def _rename_task(bundle, old, new):
    """Give task `old` the name `new` in the manifest, and move its coefficient file where that name points."""

    def rename(m):
        for t in m["tasks"]:
            t["name"] = new if t["name"] == old else t["name"]
        for mod in m["modules"]:
            if mod.get("ranks"):
                mod["ranks"][new] = mod["ranks"].pop(old)
        m["report"]["errors"][new] = m["report"]["errors"].pop(old)

    _edit_manifest(bundle, rename)
    target = bundle / "coefficients" / f"{new}.safetensors"
    target.parent.mkdir(parents=True, exist_ok=True)
    (bundle / "coefficients" / f"{old}.safetensors").rename(target)


@pytest.mark.parametrize("kind", ["relative", "absolute"])
def test_revert_never_writes_outside_out_for_a_crafted_task_name(bundle, tmp_path, capsys, kind):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("mine")
    rev = tmp_path / "rev"  # rev/../victim is victim
    name = "../victim" if kind == "relative" else str(victim)
    _rename_task(
        bundle, "task0", name
    )  # its coefficients: bundle/victim.safetensors, or victim.safetensors beside victim/
    err = _refused(capsys, "revert", bundle, "--out", rev, "--task", name)
    assert "manifest.json" in err and "file name" in err
    assert _tree(victim) == {"precious.txt": hashlib.sha256(b"mine").hexdigest()} and not rev.exists()


def test_revert_refuses_an_unsafe_task_argument(bundle, tmp_path, capsys):
    err = _refused(capsys, "revert", bundle, "--out", tmp_path / "rev", "--task", "../task0")
    assert "'../task0'" in err and not (tmp_path / "rev").exists()


def test_revert_keeps_existing_adapters_unless_forced(bundle, inputs, capsys):
    folder = inputs[0].parent
    (folder / "notes.txt").write_text("mine")
    before = _tree(folder)
    err = _refused(capsys, "revert", bundle, "--out", folder)
    assert "--force" in err and str(folder / "task0") in err
    assert _tree(folder) == before
    assert main(["revert", str(bundle), "--out", str(folder), "--task", "task2"]) == 0  # a new task is fine
    assert main(["revert", str(bundle), "--out", str(folder), "--task", "task0", "--force"]) == 0
    after = _tree(folder)
    assert (
        after["task0/adapter_model.safetensors"] != before["task0/adapter_model.safetensors"]
    )  # replaced: a lossy revert
    assert {k: after[k] for k in before if not k.startswith("task0/")} == {
        k: v for k, v in before.items() if not k.startswith("task0/")
    }


def test_revert_into_a_file_or_the_bundle_is_refused(bundle, tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    assert "is a file" in _refused(capsys, "revert", bundle, "--out", tmp_path / "file")
    assert (tmp_path / "file").read_text() == "mine"
    before = _tree(bundle)
    assert "input" in _refused(capsys, "revert", bundle, "--out", bundle / "coefficients", "--force")
    assert _tree(bundle) == before


def _rewrite(file, fn):
    tensors = load_file(file)
    fn(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def _rehash(bundle, file):
    _edit_manifest(
        bundle,
        lambda m: m["files"].update(
            {file.relative_to(bundle).as_posix(): hashlib.sha256(file.read_bytes()).hexdigest()}
        ),
    )


def _damage(bundle, how):
    coefs = bundle / "coefficients"
    if how == "missing":
        (coefs / "task1.safetensors").unlink()
    elif how == "truncated":
        data = (coefs / "task1.safetensors").read_bytes()
        (coefs / "task1.safetensors").write_bytes(data[: len(data) - 64])
    elif how == "swapped":
        (coefs / "task0.safetensors").rename(coefs / "tmp.safetensors")
        (coefs / "task1.safetensors").rename(coefs / "task0.safetensors")
        (coefs / "tmp.safetensors").rename(coefs / "task1.safetensors")
    elif how == "nan":
        _rewrite(coefs / "task1.safetensors", lambda t: t[sorted(t)[-1]].view(-1).__setitem__(0, float("nan")))
        _rehash(bundle, coefs / "task1.safetensors")
    elif how == "basis nan":
        _rewrite(bundle / "basis.safetensors", lambda t: t[sorted(t)[0]].view(-1).__setitem__(0, float("inf")))
        _rehash(bundle, bundle / "basis.safetensors")
    elif how == "wrong shape":
        _rewrite(coefs / "task1.safetensors", lambda t: t.__setitem__(sorted(t)[0], t[sorted(t)[0]][:-1].contiguous()))
        _rehash(bundle, coefs / "task1.safetensors")
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("how", ["missing", "truncated", "swapped", "nan", "basis nan", "wrong shape"])
def test_a_damaged_bundle_reverts_nothing(bundle, tmp_path, capsys, how):
    _damage(bundle, how)
    rev = tmp_path / "rev"
    err = _refused(capsys, "revert", bundle, "--out", rev)
    assert "coefficients/task" in err or "basis" in err
    assert not rev.exists() or list(rev.iterdir()) == []  # not even the undamaged tasks: everything is checked first
