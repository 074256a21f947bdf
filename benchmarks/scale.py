#!/usr/bin/env python
"""Scale of `rmm merge`'s default: time, peak memory and bytes read against the floor of reading every adapter once.

Cases (synthetic PEFT LoRA directories, written once to a cache; shared structure plus per-task noise):

- `small-T16`, `small-T128`, `small-T1024`: 4 layers x q,v of 256 x 256, r = 8, float32: many tasks, small modules.
- `1gib`: 32 layers x q,k,v,o of 4096 x 4096, r = 16, T = 16, float32 (the issue's 1 GiB benchmark).
- `r64-T8`: 8 layers x q,k,v,o of 4096 x 4096, r = 64, T = 8, bf16: a few adapters of a high rank (fewer tasks than
  the rank, where the per-position basis comes from a T x T problem, `rmm.solver.basis_of`).
- `7b`: 32 layers x q,k,v,o,gate,up,down at Llama-3-8B's shapes (q, o 4096 x 4096; k, v 1024 x 4096; gate, up
  14336 x 4096; down 4096 x 14336), r = 16, T = 64, bf16: about 5 GiB (`--layers` cuts it down).

Each measurement runs in a fresh spawned process on `--device`: the floor (every adapter file read once and its
LoRA tensors cast to float64, what any merge must do), then `rmm.merge.merge` at storage ratio 0.5 (the default)
with its stage times, its peak RSS above the process's own after imports (VmHWM reset before the merge) and the
bytes it read (every tensor `rmm.adapter` reads, counted). Writes benchmarks/results/scale.{md,json}.

    .venv/bin/python benchmarks/scale.py                      # small cases and a 2-layer 7b-shaped case
    .venv/bin/python benchmarks/scale.py --cases 7b --layers 32   # the full 7B-shaped case (~5 GiB)
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import multiprocessing as mp
import platform
import shutil
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from benchmarks.merge_speed import _peak_rss, _reset_peak_rss, _rss  # noqa: E402

GIB = 1024**3
LLAMA3_8B = {  # module -> (out, in)
    "self_attn.q_proj": (4096, 4096),
    "self_attn.k_proj": (1024, 4096),
    "self_attn.v_proj": (1024, 4096),
    "self_attn.o_proj": (4096, 4096),
    "mlp.gate_proj": (14336, 4096),
    "mlp.up_proj": (14336, 4096),
    "mlp.down_proj": (4096, 14336),
}
SMALL = {"self_attn.q_proj": (256, 256), "self_attn.v_proj": (256, 256)}
ATTENTION = {f"self_attn.{m}_proj": (4096, 4096) for m in "qkvo"}  # merge_speed.py's 1 GiB shape


def cases(names: list[str], layers: int) -> list[dict]:
    found = []
    for name in names:
        if name.startswith("small-T"):
            found.append(dict(name=name, shapes=SMALL, layers=4, tasks=int(name[7:]), rank=8, dtype="float32"))
        elif name == "1gib":
            found.append(dict(name=name, shapes=ATTENTION, layers=32, tasks=16, rank=16, dtype="float32"))
        elif name == "r64-T8":
            found.append(dict(name=name, shapes=ATTENTION, layers=8, tasks=8, rank=64, dtype="bfloat16"))
        elif name == "7b":
            found.append(
                dict(name=f"7b-L{layers}", shapes=LLAMA3_8B, layers=layers, tasks=64, rank=16, dtype="bfloat16")
            )
        else:
            raise SystemExit(f"unknown case {name!r}")
    return found


def write_adapters(case: dict, cache: Path) -> list[Path]:
    """T adapters of the case, written once (a `done` marker makes a half-written cache invisible)."""
    root = cache / f"{case['name']}-T{case['tasks']}-r{case['rank']}-{case['dtype']}"
    names = [f"task{t:04d}" for t in range(case["tasks"])]
    if (root / "done").is_file():
        return [root / n for n in names]
    shutil.rmtree(root, ignore_errors=True)
    dtype, r = getattr(torch, case["dtype"]), case["rank"]
    modules = [f"model.layers.{i}.{m}" for i in range(case["layers"]) for m in case["shapes"]]
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": 2 * r,
        "target_modules": sorted({m.split(".")[-1] for m in case["shapes"]}),
        "base_model_name_or_path": f"synthetic/{case['name']}",
    }
    shared = {}  # per module: one direction set all tasks share, so sharing has something to find
    g = torch.Generator().manual_seed(0)
    for i, m in enumerate(modules):
        out, inp = case["shapes"][m.split(".", 3)[3]]
        shared[m] = (torch.randn(out, r, generator=g), torch.randn(r, inp, generator=g) / inp**0.5)
    for t, name in enumerate(names):
        g = torch.Generator().manual_seed(1000 + t)
        tensors = {}
        for m in modules:
            B0, A0 = shared[m]
            B = (B0 + 0.5 * torch.randn(B0.shape, generator=g)) * 0.01
            A = A0 + 0.5 * torch.randn(A0.shape, generator=g) / A0.shape[1] ** 0.5
            tensors[f"base_model.model.{m}.lora_B.weight"] = B.to(dtype).contiguous()
            tensors[f"base_model.model.{m}.lora_A.weight"] = A.to(dtype).contiguous()
        (root / name).mkdir(parents=True)
        save_file(tensors, str(root / name / "adapter_model.safetensors"), metadata={"format": "pt"})
        (root / name / "adapter_config.json").write_text(json.dumps(config))
    (root / "done").write_text("")
    return [root / n for n in names]


def _child(conn, dirs: list[str], out: str, device: str) -> None:
    """In a fresh process: the floor, then one default merge with its peak RSS and the bytes it read."""
    try:
        import rmm.adapter
        from rmm.bundle import MergeOptions
        from rmm.merge import merge

        clock = time.perf_counter()
        for d in dirs:
            for v in load_file(str(Path(d) / "adapter_model.safetensors"), device="cpu").values():
                v.to(device=device, dtype=torch.float64)
        floor = time.perf_counter() - clock

        read = {"bytes": 0}
        plain = rmm.adapter.read_tensor

        def counted(f, file, key):
            x = plain(f, file, key)
            read["bytes"] += x.numel() * x.element_size()
            return x

        rmm.adapter.read_tensor = counted
        baseline = _rss()
        _reset_peak_rss()
        clock = time.perf_counter()
        manifest = merge([Path(d) for d in dirs], Path(out), MergeOptions(), device=device, progress=False)
        wall = time.perf_counter() - clock
        peak = _peak_rss()[0] or _peak_rss()[1]
        conn.send(
            (
                "ok",
                dict(
                    floor_s=floor,
                    merge_s=wall,
                    stages_s=manifest.report.seconds,
                    peak_rss_above_baseline=peak - baseline,
                    bytes_read=read["bytes"],
                    adapter_bytes=manifest.report.storage.bytes_original,
                    storage_ratio=manifest.report.storage.ratio,
                    allocation={
                        k: sum(m.method == k for m in manifest.modules) for k in ("truncate", "joint", "shared")
                    },
                ),
            )
        )
    except BaseException:  # noqa: BLE001 - everything goes to the parent
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def measure(dirs: list[Path], out: Path, device: str) -> dict:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, [str(d) for d in dirs], str(out), device))
    proc.start()
    child.close()
    status, payload = parent.recv()
    proc.join()
    shutil.rmtree(out, ignore_errors=True)
    if status != "ok":
        raise RuntimeError(payload)
    return payload


def render(results: list[dict], meta: dict) -> str:
    lines = [
        f"`{meta['command']}` on {meta['machine']} ({meta['device']}, torch {meta['torch']})",
        "",
        "| case | tasks | adapters | floor (read + cast) | default merge | merge / floor | sizing / solve | "
        "peak RSS above start | / adapters | bytes read / adapters | allocation (t/j/s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        a = r["allocation"]
        lines.append(
            f"| {r['case']} | {r['tasks']} | {r['adapter_bytes'] / GIB:.3f} GiB | {r['floor_s']:.2f} s | "
            f"{r['merge_s']:.2f} s | {r['merge_s'] / r['floor_s']:.1f}x | "
            f"{r['stages_s'].get('open', 0):.1f} / {r['stages_s'].get('solve', 0):.1f} s | "
            f"{r['peak_rss_above_baseline'] / GIB:.3f} GiB | {r['peak_rss_above_baseline'] / r['adapter_bytes']:.2f} | "
            f"{r['bytes_read'] / r['adapter_bytes']:.2f} | {a['truncate']}/{a['joint']}/{a['shared']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=["small-T16", "small-T128", "small-T1024", "7b"])
    ap.add_argument("--layers", type=int, default=2, help="layers of the 7b-shaped case (32: the whole model)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--cache", type=Path, default=ROOT / ".cache" / "scale")
    ap.add_argument("--results-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    from rmm.device import resolve

    device = str(resolve(args.device))
    results = []
    for case in cases(args.cases, args.layers):
        dirs = write_adapters(case, args.cache)
        r = measure(dirs, args.cache / "out", device)
        results.append({"case": case["name"], "tasks": case["tasks"], **r})
        print(render(results[-1:], {"command": "", "machine": "", "device": device, "torch": ""}), flush=True)
    meta = {
        "command": "python benchmarks/scale.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "device": device,
        "torch": torch.__version__,
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / "scale.md").write_text(render(results, meta))
    (args.results_dir / "scale.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(render(results, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
