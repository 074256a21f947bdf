"""Scale: thousands of adapters under a small open-file limit."""

import resource
import shutil
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from conftest import file_deltas, load_base

TASKS = 2000
FILES = 256  # the open-file limit the merge and revert run under


@pytest.fixture(scope="module")
def many(llama_base, tmp_path_factory):
    """2,000 adapters: one saved by PEFT, the others its files with other weights (the same keys and config)."""
    root = tmp_path_factory.mktemp("many")
    first = root / "t0000"
    get_peft_model(load_base(llama_base), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(first)
    keys = load_file(first / "adapter_model.safetensors")
    g = torch.Generator().manual_seed(0)
    dirs = [first]
    for t in range(1, TASKS):
        d = root / f"t{t:04d}"
        d.mkdir()
        shutil.copy(first / "adapter_config.json", d)
        save_file({k: torch.randn(v.shape, generator=g) for k, v in keys.items()}, d / "adapter_model.safetensors")
        dirs.append(d)
    save_file({k: torch.randn(v.shape, generator=g) for k, v in keys.items()}, first / "adapter_model.safetensors")
    return dirs


def _limited(argv: list[str]) -> subprocess.CompletedProcess:
    def limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (FILES, FILES))

    return subprocess.run(
        [sys.executable, "-m", "rmm.cli", *argv], capture_output=True, text=True, preexec_fn=limit, timeout=600
    )


def test_two_thousand_adapters_merge_and_revert_under_256_open_files(many, tmp_path):
    merged = _limited(["merge", *map(str, many), "--out", str(tmp_path / "bundle"), "--storage-ratio", "1"])
    assert merged.returncode == 0, merged.stderr[-2000:]
    reverted = _limited(["revert", str(tmp_path / "bundle"), "--out", str(tmp_path / "rev")])
    assert reverted.returncode == 0, reverted.stderr[-2000:]
    assert len(list((tmp_path / "rev").iterdir())) == TASKS
    for d in many[:: TASKS // 7]:
        want, got = file_deltas(d), file_deltas(tmp_path / "rev" / d.name)
        assert want.keys() == got.keys()
        for k in want:
            assert torch.allclose(got[k], want[k], rtol=0, atol=1e-6 * want[k].abs().max())
