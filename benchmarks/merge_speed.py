#!/usr/bin/env python
"""Speed and memory of `rmm.merge.merge`, and its speed against PEFT's `add_weighted_adapter`.

Two parts, one run:

1. **Large shape** (default: 32 layers x {q,k,v,o}_proj of 4096 x 4096, r = 16, T = 16, float32,
   the attention LoRAs of a Llama-2-7B). Synthetic PEFT LoRA directories are written once to a
   cache directory (reused when the spec matches) and merged with a few `MergeOptions`. Every
   measured merge runs in a fresh spawned process, which reports its wall time, the merge's own
   stage times, and its peak RSS during the merge (VmHWM after resetting it through
   /proc/self/clear_refs, so interpreter start-up and imports are not counted; ru_maxrss as a
   fallback). Peak RSS is compared with the total adapter bytes and with one module of all T
   adapters (what a streaming merge has to hold).
2. **Small shape, against PEFT**: a tiny LlamaForCausalLM (hidden 1024, 4 layers) gets T
   adapters through `get_peft_model` + structured random LoRA weights + `save_pretrained`. All T
   are loaded into one PeftModel (`load_adapter`) and `add_weighted_adapter(weights=1/T)` is timed
   with `combination_type="svd"` and `"cat"` (only that call), interleaved round-robin with
   `rmm.merge.merge` on the same directories, in this process. Times are reported as ratios.

Synthetic adapters are not pure noise: at every module, task t has
`B_t = B0 + 0.5 sum_k z_tk B_k + 0.2 N_t` (and the same for A), with B0, B_k shared by all tasks,
z_t a per-task latent of size `--shared-rank`, and N_t task-specific noise; A is scaled like PEFT's
init (1/sqrt(in)) and B to a typical trained magnitude.

Writes a markdown table and a JSON of raw numbers to `benchmarks/results/merge_speed.{md,json}`.

    .venv/bin/python benchmarks/merge_speed.py                          # the default, full size
    .venv/bin/python benchmarks/merge_speed.py --layers 2 --hidden 1024 --tasks 4   # a quick check
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import dataclasses
import gc
import hashlib
import json
import math
import multiprocessing as mp
import platform
import resource
import shlex
import shutil
import statistics
import sys
import tempfile
import threading
import time
import traceback
import warnings
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a source tree that was not installed
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from rmm.io import atomic_dir  # noqa: E402

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
GIB = 1024**3
MIB = 1024**2
# Magnitudes of the synthetic factors (before scaling): shared mean 1, shared directions, noise.
SHARED_DIR_SCALE, NOISE_SCALE, B_SCALE = 0.5, 0.2, 0.01


# ---------------------------------------------------------------------------------------------
# Synthetic adapters
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Spec:
    """What a set of synthetic adapters is; its hash names the cache directory."""

    kind: str  # "safetensors" (written directly) or "peft" (get_peft_model + save_pretrained)
    layers: int
    hidden: int
    tasks: int
    rank: int
    lora_alpha: int
    dtype: str
    shared_rank: int
    seed: int
    version: int = 1  # bump when the generator changes

    @property
    def modules(self) -> list[str]:
        """PEFT key prefixes of a Llama model's attention projections."""
        return [f"base_model.model.model.layers.{i}.self_attn.{p}" for i in range(self.layers) for p in PROJECTIONS]

    @property
    def bytes_per_module(self) -> int:
        """lora_A + lora_B bytes of one module of one adapter (every projection is hidden x hidden)."""
        return self.rank * 2 * self.hidden * DTYPES[self.dtype].itemsize

    @property
    def bytes_per_adapter(self) -> int:
        return self.bytes_per_module * len(self.modules)

    @property
    def bytes_total(self) -> int:
        return self.bytes_per_adapter * self.tasks

    def key(self) -> str:
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
        digest = hashlib.sha256(blob).hexdigest()[:10]
        return f"{self.kind}-L{self.layers}-H{self.hidden}-T{self.tasks}-r{self.rank}-{self.dtype}-{digest}"


def _generator(*key: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], "little") & (2**63 - 1))
    return g


def synthetic_factors(spec: Spec, module_index: int, task: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_B (out x r), lora_A (r x in)) in float32: shared mean + shared directions + noise."""
    n, r, K = spec.hidden, spec.rank, spec.shared_rank
    g = _generator(spec.seed, module_index, -1)  # shared by all tasks at this module
    B0, Bk = torch.randn(n, r, generator=g), torch.randn(K, n, r, generator=g)
    A0, Ak = torch.randn(r, n, generator=g), torch.randn(K, r, n, generator=g)
    z = torch.randn(K, generator=_generator(spec.seed, -1, task))  # the task's latent, all modules
    g = _generator(spec.seed, module_index, task)
    B = B0 + SHARED_DIR_SCALE * torch.einsum("k,knr->nr", z, Bk) + NOISE_SCALE * torch.randn(n, r, generator=g)
    A = A0 + SHARED_DIR_SCALE * torch.einsum("k,krn->rn", z, Ak) + NOISE_SCALE * torch.randn(r, n, generator=g)
    return B * B_SCALE, A / math.sqrt(n)


def lora_config_dict(spec: Spec) -> dict:
    """A complete PEFT LoraConfig dict, as `save_pretrained` writes it."""
    from peft import LoraConfig

    cfg = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.lora_alpha,
        lora_dropout=0.0,
        target_modules=list(PROJECTIONS),
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=f"synthetic/llama-L{spec.layers}-H{spec.hidden}",
    )
    d = cfg.to_dict()
    d["inference_mode"] = True
    return json.loads(json.dumps(d, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))


def task_names(spec: Spec) -> list[str]:
    return [f"task_{t:02d}" for t in range(spec.tasks)]


def _cached(root: Path, spec: Spec) -> list[Path] | None:
    marker = root / "spec.json"
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == dataclasses.asdict(spec):
                dirs = [root / n for n in task_names(spec)]
                if all(
                    (d / "adapter_model.safetensors").is_file() and (d / "adapter_config.json").is_file() for d in dirs
                ):
                    return dirs
        except json.JSONDecodeError:
            pass
    return None


def _write_spec(tmp: Path, spec: Spec) -> None:
    """The marker `_cached` checks, written last inside the directory `atomic_dir` renames into place."""
    (tmp / "spec.json").write_text(json.dumps(dataclasses.asdict(spec), indent=2) + "\n")


def write_safetensors_adapters(spec: Spec, cache: Path, log) -> tuple[list[Path], bool]:
    """T PEFT LoRA directories written with safetensors `save_file`; reused if already there."""
    root = cache / spec.key()
    if (dirs := _cached(root, spec)) is not None:
        return dirs, True
    config = lora_config_dict(spec)
    dtype = DTYPES[spec.dtype]
    with atomic_dir(root) as tmp:
        for t, name in enumerate(task_names(spec)):
            clock = time.perf_counter()
            tensors = {}
            for i, mod in enumerate(spec.modules):
                B, A = synthetic_factors(spec, i, t)
                tensors[f"{mod}.lora_A.weight"] = A.to(dtype).contiguous()
                tensors[f"{mod}.lora_B.weight"] = B.to(dtype).contiguous()
            d = tmp / name
            d.mkdir()
            save_file(tensors, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
            (d / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            log(f"  wrote {name} ({spec.bytes_per_adapter / MIB:.0f} MiB) in {time.perf_counter() - clock:.1f} s")
            del tensors
        _write_spec(tmp, spec)
    return [root / n for n in task_names(spec)], False


def tiny_llama(spec: Spec):
    """A LlamaForCausalLM with square attention projections of size spec.hidden, random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = max(1, spec.hidden // 64)
    config = LlamaConfig(
        hidden_size=spec.hidden,
        intermediate_size=2 * spec.hidden,
        num_hidden_layers=spec.layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        vocab_size=1024,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config).eval()
    model.name_or_path = f"synthetic/tiny-llama-L{spec.layers}-H{spec.hidden}"
    return model


def write_peft_adapters(spec: Spec, cache: Path, log) -> tuple[list[Path], bool]:
    """T adapters made the PEFT way: get_peft_model, set LoRA weights, save_pretrained."""
    from peft import LoraConfig, get_peft_model

    root = cache / spec.key()
    if (dirs := _cached(root, spec)) is not None:
        return dirs, True
    model = get_peft_model(
        tiny_llama(spec),
        LoraConfig(
            r=spec.rank,
            lora_alpha=spec.lora_alpha,
            lora_dropout=0.0,
            target_modules=list(PROJECTIONS),
            task_type="CAUSAL_LM",
        ),
    )
    layers = dict(model.named_modules())
    with atomic_dir(root) as tmp:
        for t, name in enumerate(task_names(spec)):
            with torch.no_grad():
                for i, mod in enumerate(spec.modules):
                    layer = layers[mod]
                    B, A = synthetic_factors(spec, i, t)
                    layer.lora_B["default"].weight.copy_(B)
                    layer.lora_A["default"].weight.copy_(A)
            model.save_pretrained(str(tmp / name))
        _write_spec(tmp, spec)
    log(f"  wrote {spec.tasks} PEFT adapters with save_pretrained to {root}")
    del model, layers
    gc.collect()
    return [root / n for n in task_names(spec)], False


# ---------------------------------------------------------------------------------------------
# Measuring merges
# ---------------------------------------------------------------------------------------------


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _reset_peak_rss() -> bool:
    """Reset VmHWM (Linux >= 4.0) so the next reading is the peak from now on."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss() -> tuple[int | None, int]:
    """(VmHWM in bytes or None, ru_maxrss in bytes) of this process."""
    hwm = None
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) * 1024
    except OSError:
        pass
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return hwm, maxrss * (1 if sys.platform == "darwin" else 1024)


def _options(setting: dict):
    from rmm.bundle import MergeOptions

    return MergeOptions(**setting)


def _merge_once(dirs: list[Path], out: Path, setting: dict) -> dict:
    from rmm.merge import merge

    clock = time.perf_counter()
    manifest = merge(dirs, out, _options(setting), progress=False, force=True)
    wall = time.perf_counter() - clock
    errors = [e for per_task in manifest.report.errors.values() for e in per_task.values()]
    energy = [e for per_mod in manifest.report.energy.values() for e in per_mod.values()]
    return {
        "wall_s": wall,
        "stages_s": dict(manifest.report.seconds),
        "storage_ratio": manifest.report.storage.ratio,
        "bytes_stored": manifest.report.storage.bytes_stored,
        "bytes_original": manifest.report.storage.bytes_original,
        "p": sorted({m.p for m in manifest.modules}),
        "mean_rel_error": statistics.fmean(errors),
        "max_rel_error": max(errors),
        "mean_energy_captured": statistics.fmean(energy),
    }


def _child_merge(conn, dirs: list[str], out: str, setting: dict, threads: int) -> None:
    """Runs in a fresh spawned process: one merge, with its time and peak RSS."""
    try:
        if threads:
            torch.set_num_threads(threads)
        import rmm.merge  # noqa: F401  (import cost is not the merge's)

        gc.collect()
        baseline = _rss()
        reset = _reset_peak_rss()
        trace: list[tuple[float, int]] = []
        done = threading.Event()

        def sample() -> None:  # RSS over the merge, to tell steady growth from a plateau
            start = time.perf_counter()
            while not done.wait(0.1):
                trace.append((round(time.perf_counter() - start, 2), _rss()))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            result = _merge_once([Path(d) for d in dirs], Path(out), setting)
        finally:
            done.set()
            sampler.join()
        hwm, maxrss = _peak_rss()
        step = max(1, len(trace) // 100)  # keep about 100 samples, and the last one
        result.update(
            rss_trace=trace[::step] + trace[-1:] if trace and (len(trace) - 1) % step else trace[::step],
            baseline_rss=baseline,
            peak_rss=hwm if (reset and hwm is not None) else maxrss,
            peak_rss_source="VmHWM after clear_refs"
            if (reset and hwm is not None)
            else "ru_maxrss (includes start-up)",
            ru_maxrss=maxrss,
            threads=torch.get_num_threads(),
        )
        conn.send(("ok", result))
    except BaseException:  # noqa: BLE001 - report anything to the parent
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def merge_in_child(dirs: list[Path], out: Path, setting: dict, threads: int) -> dict:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_merge, args=(child, [str(d) for d in dirs], str(out), setting, threads))
    clock = time.perf_counter()
    proc.start()
    child.close()
    try:
        status, payload = parent.recv()
    except EOFError:
        status, payload = "error", "child died without a result"
    proc.join()
    if status != "ok":
        raise RuntimeError(f"merge in child failed (exit code {proc.exitcode}):\n{payload}")
    payload["process_wall_s"] = time.perf_counter() - clock
    shutil.rmtree(out, ignore_errors=True)
    return payload


def setting_label(setting: dict) -> str:
    parts = []
    if setting.get("basis_size") is not None:
        parts.append(f"p={setting['basis_size']}")
    if setting.get("storage_ratio") is not None:
        parts.append(f"storage_ratio={setting['storage_ratio']}")
    if setting.get("canonicalize"):
        parts.append("canonicalize")
    return " + ".join(parts) or "defaults"


def settings_from_args(args) -> list[dict]:
    canon = {"no": [False], "yes": [True], "both": [False, True]}[args.canonicalize]
    budgets = [{"basis_size": p} for p in args.basis_size] + [{"storage_ratio": s} for s in args.storage_ratio]
    return [{**b, "canonicalize": c} for b in budgets for c in canon]


# ---------------------------------------------------------------------------------------------
# PEFT comparison
# ---------------------------------------------------------------------------------------------


def peft_comparison(
    spec: Spec, dirs: list[Path], settings: list[dict], combos: list[str], repeats: int, work: Path, log
) -> dict:
    from peft import PeftModel

    names = task_names(spec)
    clock = time.perf_counter()
    model = PeftModel.from_pretrained(tiny_llama(spec), str(dirs[0]), adapter_name=names[0])
    for name, d in zip(names[1:], dirs[1:]):
        model.load_adapter(str(d), adapter_name=name)
    load_s = time.perf_counter() - clock
    log(f"  loaded {len(names)} adapters into one PeftModel in {load_s:.1f} s")
    weights = [1.0 / len(names)] * len(names)

    def peft_call(combo: str, i: int) -> float:
        new = f"merged_{combo}_{i}"
        gc.collect()
        start = time.perf_counter()
        model.add_weighted_adapter(adapters=names, weights=weights, adapter_name=new, combination_type=combo)
        took = time.perf_counter() - start
        model.delete_adapter(new)
        return took

    def rmm_call(setting: dict, i: int) -> dict:
        gc.collect()
        out = work / f"bundle-small-{i}"
        result = _merge_once(dirs, out, setting)
        shutil.rmtree(out, ignore_errors=True)
        return result

    # One untimed warm-up of each (first-call costs: imports, allocator, page cache).
    for combo in combos:
        peft_call(combo, -1)
    for s in settings:
        rmm_call(s, -1)
    peft_times = {c: [] for c in combos}
    rmm_runs = {setting_label(s): [] for s in settings}
    for i in range(repeats):  # round-robin, so load from other processes hits all methods alike
        for combo in combos:
            peft_times[combo].append(peft_call(combo, i))
        for s in settings:
            rmm_runs[setting_label(s)].append(rmm_call(s, i))
        log(
            f"  round {i + 1}/{repeats}: "
            + ", ".join(f"peft {c} {peft_times[c][-1]:.2f} s" for c in combos)
            + ", "
            + ", ".join(f"rmm {k} {v[-1]['wall_s']:.2f} s" for k, v in rmm_runs.items())
        )
    model = None  # drop the PeftModel (peft_call's closure holds the name) before the next measurement
    gc.collect()
    return {
        "load_s": load_s,
        "peft_s": peft_times,
        "rmm": rmm_runs,
        "weights": weights,
        "peft_call": "add_weighted_adapter(adapters, weights=[1/T]*T, adapter_name, combination_type=C) "
        "with PEFT's defaults "
        "(svd: svd_rank = max rank, svd_full_matrices=True)",
    }


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def machine_info() -> dict:
    import peft
    import psutil
    import safetensors
    import transformers

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "peft": peft.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "platform": platform.platform(),
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_total_gib": round(psutil.virtual_memory().total / GIB, 1),
        "ram_available_gib": round(psutil.virtual_memory().available / GIB, 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "env": {k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "OMP_", "MKL_", "OPENBLAS_"))},
    }


def fmt_bytes(n: float) -> str:
    if n >= GIB:
        return f"{n / GIB:.2f} GiB"
    return f"{n / MIB:.0f} MiB" if n >= 10 * MIB else f"{n / MIB:.2f} MiB"


def rss_quartiles(run: dict) -> str:
    trace = run.get("rss_trace") or []
    if not trace:
        return "n/a"
    picks = [trace[min(len(trace) - 1, max(0, round(q * len(trace)) - 1))][1] for q in (0.25, 0.5, 0.75, 1.0)]
    return " / ".join(f"{b / GIB:.2f}" for b in picks) + " GiB"


def best(xs: list[float]) -> float:
    return min(xs)


def render(results: dict) -> str:
    lines = [f"Command: `{results['command']}`", ""]
    m = results["machine"]
    lines += [
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, {m['ram_total_gib']} GiB RAM; torch {m['torch']}, "
        f"{m['torch_threads']} torch threads; peft {m['peft']}, transformers {m['transformers']}; "
        f"load average at start {m['load_average']}, at end {results.get('load_average_end')}"
        + (f"; env {m['env']}" if m["env"] else "")
        + ".",
        f"Run: {results['started']}, total wall time {results.get('total_wall_s', float('nan')):.0f} s.",
        "",
    ]
    large = results.get("large")
    if large:
        s = large["spec"]
        lines += [
            f"### rmm.merge, large shape: {s['layers']} layers x {{q,k,v,o}}_proj of {s['hidden']} x {s['hidden']}, "
            f"r = {s['rank']}, T = {s['tasks']}, {s['dtype']}",
            "",
            f"Adapters: {fmt_bytes(large['bytes_total'])} in all ({fmt_bytes(large['bytes_per_adapter'])} each); one "
            "module of all "
            f"T adapters: {fmt_bytes(large['bytes_one_module_all_tasks'])} as stored, "
            f"{fmt_bytes(large['bytes_one_module_all_tasks_f64'])} in float64 (merge works in float64). "
            "Each merge runs in a fresh spawned process; "
            f"{'reused cached' if large['reused'] else 'freshly written'} adapters "
            "(warm page cache). Peak RSS is measured during the merge only (interpreter and imports excluded from "
            "'increase'); times are best of the repeats.",
            "",
            "| setting | p used | merge wall (s) | open / solve / write (s) | storage ratio | bundle tensors "
            "| mean rel. err dW "
            "| peak RSS | increase over baseline | increase / all adapters | increase / one module of all T "
            "| RSS at 25 / 50 / 75 / 100% of the merge |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for label, runs in large["runs"].items():
            r0 = min(runs, key=lambda r: r["wall_s"])
            inc = max(r["peak_rss"] - r["baseline_rss"] for r in runs)
            st = r0["stages_s"]
            lines.append(
                f"| {label} | {','.join(map(str, r0['p']))} | {r0['wall_s']:.1f} | {st.get('open', 0):.1f} / "
                f"{st.get('solve', 0):.1f} / {st.get('write', 0):.1f} "
                f"| {r0['storage_ratio']:.3f} | {fmt_bytes(r0['bytes_stored'])} | {r0['mean_rel_error']:.3g} "
                f"| {fmt_bytes(max(r['peak_rss'] for r in runs))} "
                f"| {fmt_bytes(inc)} | {inc / large['bytes_total']:.2f}x | "
                f"{inc / large['bytes_one_module_all_tasks']:.1f}x "
                f"| {rss_quartiles(r0)} |"
            )
        lines.append("")
    small = results.get("peft")
    if small:
        s = small["spec"]
        combos = list(small["peft_s"])
        lines += [
            f"### rmm.merge vs PEFT add_weighted_adapter: tiny LlamaForCausalLM, {s['layers']} layers x "
            f"{{q,k,v,o}}_proj of "
            f"{s['hidden']} x {s['hidden']}, r = {s['rank']}, T = {s['tasks']}, float32",
            "",
            f"Same adapter directories, same process, {small['repeats']} round-robin rounds after one warm-up; best "
            "of the rounds. "
            "PEFT times only the add_weighted_adapter call on adapters already loaded (weights 1/T); rmm.merge "
            "times the whole call from the directories (open + sha256, solve, write the bundle), with its solve stage "
            "alone in the last column.",
            "",
            "| method | time (s) | " + " | ".join(f"ratio vs PEFT {c}" for c in combos) + " | rmm solve stage (s) |",
            "|---|---:|" + "---:|" * len(combos) + "---:|",
        ]
        peft_best = {c: best(v) for c, v in small["peft_s"].items()}
        for c in combos:
            lines.append(
                f"| PEFT add_weighted_adapter {c} | {peft_best[c]:.3f} | "
                + " | ".join(f"{peft_best[c] / peft_best[o]:.2f}" for o in combos)
                + " | |"
            )
        for label, runs in small["rmm"].items():
            t = best([r["wall_s"] for r in runs])
            solve = best([r["stages_s"].get("solve", float("nan")) for r in runs])
            lines.append(
                f"| rmm.merge {label} | {t:.3f} | "
                + " | ".join(f"{t / peft_best[o]:.2f}" for o in combos)
                + f" | {solve:.3f} |"
            )
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    g = ap.add_argument_group("large shape (rmm.merge speed and peak RSS)")
    g.add_argument("--layers", type=int, default=32, help="decoder layers (4 adapted projections each)")
    g.add_argument("--hidden", type=int, default=4096, help="hidden size; every projection is hidden x hidden")
    g.add_argument("--tasks", type=int, default=16, help="number of adapters T (also used for the PEFT comparison)")
    g.add_argument("--rank", type=int, default=16, help="LoRA rank r (also used for the PEFT comparison)")
    g.add_argument("--lora-alpha", type=int, default=32)
    g.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the large synthetic adapters")
    g.add_argument("--shared-rank", type=int, default=3, help="task latent size K of the shared structure")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--repeats", type=int, default=1, help="merges per setting at the large shape (one fresh process each)"
    )
    g.add_argument("--skip-large", action="store_true")
    s = ap.add_argument_group("merge settings (timed at both shapes)")
    s.add_argument("--basis-size", type=int, nargs="*", default=[4], help="MergeOptions.basis_size values")
    s.add_argument("--storage-ratio", type=float, nargs="*", default=[], help="MergeOptions.storage_ratio values")
    s.add_argument("--canonicalize", choices=["no", "yes", "both"], default="both", help="MergeOptions.canonicalize")
    p = ap.add_argument_group("small shape (against PEFT add_weighted_adapter)")
    p.add_argument("--peft-layers", type=int, default=4)
    p.add_argument("--peft-hidden", type=int, default=1024)
    p.add_argument("--peft-combinations", nargs="+", default=["svd", "cat"])
    p.add_argument("--peft-repeats", type=int, default=3)
    p.add_argument("--skip-peft", action="store_true")
    o = ap.add_argument_group("environment and output")
    o.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for every merge (0: torch's default, one per core). 1 by default: on a shared "
        "machine, multi-threaded small ops wait on descheduled threads and times become noise",
    )
    o.add_argument(
        "--cache-dir",
        type=Path,
        default=ROOT / ".cache" / "benchmarks" / "merge_speed",
        help="where the synthetic adapters are kept (and reused) and bundles are written",
    )
    o.add_argument("--results-dir", type=Path, default=ROOT / "benchmarks" / "results")
    o.add_argument("--no-save", action="store_true", help="print the table only")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    warnings.filterwarnings("ignore", message="Could not find a config file in synthetic/")
    started = time.perf_counter()
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = settings_from_args(args)
    if not settings:
        log("no merge settings: give --basis-size and/or --storage-ratio")
        return 2
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "command": shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv])),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "settings": settings,
        "machine": machine_info(),
    }
    work = Path(tempfile.mkdtemp(prefix="bundles-", dir=args.cache_dir))
    try:
        if not args.skip_large:
            spec = Spec(
                "safetensors",
                args.layers,
                args.hidden,
                args.tasks,
                args.rank,
                args.lora_alpha,
                args.dtype,
                args.shared_rank,
                args.seed,
            )
            bundle_bytes = int(spec.bytes_total * 1.2) + 64 * MIB  # a bundle is smaller than its inputs at p < r
            need = (0 if _cached(args.cache_dir / spec.key(), spec) else spec.bytes_total) + bundle_bytes
            free = shutil.disk_usage(args.cache_dir).free
            log(
                f"large shape: {len(spec.modules)} modules, {fmt_bytes(spec.bytes_total)} of adapters "
                f"({fmt_bytes(spec.bytes_per_adapter)} x {spec.tasks}); needs ~{fmt_bytes(need)} of disk, "
                f"{fmt_bytes(free)} free at {args.cache_dir}"
            )
            if free < need + GIB:
                log(
                    f"not enough free disk at {args.cache_dir}: need ~{fmt_bytes(need + GIB)} (with 1 GiB margin), "
                    "have "
                    f"{fmt_bytes(free)}. Shrink with --layers / --hidden / --tasks, use --dtype bfloat16, or point "
                    "--cache-dir elsewhere."
                )
                return 2
            clock = time.perf_counter()
            dirs, reused = write_safetensors_adapters(spec, args.cache_dir, log)
            write_s = time.perf_counter() - clock
            log(f"  adapters {'reused from' if reused else 'written to'} {dirs[0].parent} ({write_s:.1f} s)")
            runs: dict[str, list[dict]] = {}
            for setting in settings:
                label = setting_label(setting)
                for i in range(args.repeats):
                    r = merge_in_child(dirs, work / "bundle-large", setting, args.threads)
                    runs.setdefault(label, []).append(r)
                    log(
                        f"  rmm.merge {label} [{i + 1}/{args.repeats}]: {r['wall_s']:.1f} s "
                        f"(open {r['stages_s']['open']:.1f}, solve {r['stages_s']['solve']:.1f}, write "
                        f"{r['stages_s']['write']:.1f}), "
                        f"peak RSS {fmt_bytes(r['peak_rss'])} (baseline {fmt_bytes(r['baseline_rss'])})"
                    )
            one_module = spec.bytes_per_module * spec.tasks
            results["large"] = {
                "spec": dataclasses.asdict(spec),
                "adapter_dir": str(dirs[0].parent),
                "reused": reused,
                "write_adapters_s": write_s,
                "bytes_total": spec.bytes_total,
                "bytes_per_adapter": spec.bytes_per_adapter,
                "bytes_one_module_all_tasks": one_module,
                "bytes_one_module_all_tasks_f64": one_module * 8 // DTYPES[spec.dtype].itemsize,
                "runs": runs,
            }
        if not args.skip_peft:
            spec = Spec(
                "peft",
                args.peft_layers,
                args.peft_hidden,
                args.tasks,
                args.rank,
                args.lora_alpha,
                "float32",
                args.shared_rank,
                args.seed,
            )
            log(
                f"PEFT comparison: {len(spec.modules)} modules of {spec.hidden} x {spec.hidden}, T = {spec.tasks}, r "
                f"= {spec.rank}"
            )
            dirs, reused = write_peft_adapters(spec, args.cache_dir, log)
            cmp = peft_comparison(spec, dirs, settings, args.peft_combinations, args.peft_repeats, work, log)
            results["peft"] = {
                "spec": dataclasses.asdict(spec),
                "adapter_dir": str(dirs[0].parent),
                "reused": reused,
                "repeats": args.peft_repeats,
                **cmp,
            }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    results["total_wall_s"] = time.perf_counter() - started
    table = render(results)
    print(table)
    if not args.no_save:
        args.results_dir.mkdir(parents=True, exist_ok=True)
        (args.results_dir / "merge_speed.md").write_text(table + "\n")
        (args.results_dir / "merge_speed.json").write_text(json.dumps(results, indent=2) + "\n")
        log(f"wrote {args.results_dir / 'merge_speed.md'} and merge_speed.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
