"""The committed generated code is exactly what protoc makes from the .proto sources."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_generated_code_matches_protos(tmp_path):
    sources = sorted(p.relative_to(ROOT) for p in (ROOT / "protos").rglob("*.proto"))
    assert sources
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        "-I",
        str(ROOT),
        f"--python_out={tmp_path}",
        f"--grpc_python_out={tmp_path}",
        f"--pyi_out={tmp_path}",
    ]
    subprocess.run(cmd + [str(s) for s in sources], check=True, cwd=ROOT)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert generated, "protoc generated nothing"
    for rel in generated:
        committed = ROOT / rel
        assert committed.is_file(), f"{rel} is not committed: run `make protos`"
        assert committed.read_bytes() == (tmp_path / rel).read_bytes(), f"{rel} is stale: run `make protos`"
