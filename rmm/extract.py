"""Post-training SVD (PT-SVD): a fully fine-tuned checkpoint becomes a PEFT LoRA adapter.

For every adapted layer (`nn.Linear`, or transformers' `Conv1D`, whose weight is stored in x out)
the weight delta `ft - base` is truncated to rank k by SVD, the way mergekit-extract-lora does it:
`B = U_k sqrt(S_k)`, `A = sqrt(S_k) V_k^T`, written with `lora_alpha == r` (scaling 1) through
`rmm.adapter.write_adapter`, so `dW = B @ A`. The relative Frobenius error of each truncation is
`||delta - B A|| / ||delta|| = sqrt(sum of discarded S^2 / sum S^2)` and is reported per module.

Layer types come from the model skeleton built from the base `config.json` on the meta device (no
weights are materialised). Both checkpoints are streamed one tensor at a time through safetensors;
pickle (`.bin`) checkpoints are refused. Changed tensors that LoRA cannot express (norms, biases,
embeddings) are reported, not failed on. For classification / QA architectures the task head that
PEFT itself keeps as `modules_to_save` (PEFT never puts LoRA on it) is stored whole as an extra.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch

from rmm.adapter import PREFIX, write_adapter
from rmm.device import resolve
from rmm.errors import RMMError
from rmm.io import open_safetensors, read_tensor

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
_PICKLE = ("pytorch_model.bin", "pytorch_model.bin.index.json")
# Exact (LAPACK) SVD below this smallest side; randomized SVD above it when rank is small.
FULL_SVD_MAX = 1024
_SEED = 0
_SMALL = 1 << 16  # matrices up to this many entries are decomposed on one thread
_WRITE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Heads PEFT wraps as `modules_to_save` (and excludes from LoRA) for these task types.
_TASK_HEADS = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}


def extract(
    base_dir: str | Path,
    finetuned_dir: str | Path,
    rank: int,
    out_dir: str | Path,
    target_modules: list[str] | None = None,
    progress: bool = True,
    device: str | torch.device | None = "auto",
) -> dict:
    """Extract a rank-`rank` PEFT LoRA adapter from `finetuned_dir` relative to `base_dir`.

    `target_modules` (PEFT list semantics: a module name equal to an entry or ending in "." + entry)
    selects the Linear / Conv1D modules to extract, changed or not (unchanged ones get zero factors,
    so every task extracted with the same list has the same module set); by default every Linear /
    Conv1D whose weight changed is extracted. `device`: where the SVDs run (`rmm.device.resolve`; auto: a CUDA
    GPU when torch sees one), one module's delta at a time. Every input is checked before anything is written; a
    refused run raises RMMError and leaves no output.

    Returns a summary: `modules` (per module name: layer type, shape out x in, rank, `rel_error`
    = ||delta - B A||_F / ||delta||_F, `energy_kept` = 1 - rel_error^2, SVD method), `skipped`
    (changed tensors that LoRA cannot express -> reason), `modules_to_save` (task heads stored whole)
    and the adapter's `r`, `dtype`, `task_type` and `fan_in_fan_out`.
    """
    base_dir, finetuned_dir, out_dir, device = Path(base_dir), Path(finetuned_dir), Path(out_dir), resolve(device)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise RMMError(f"rank must be a positive integer, got {rank!r}")
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    if target_modules is not None:
        target_modules = list(target_modules)
        if not target_modules or not all(isinstance(t, str) and t for t in target_modules):
            raise RMMError(f"target_modules must be a non-empty list of module names, got {target_modules!r}")
    if out_dir.exists() and not out_dir.is_dir():
        raise RMMError("output path exists and is not a directory", file=out_dir)
    for d in (base_dir, finetuned_dir):
        if d.is_dir() and out_dir.resolve() == d.resolve():
            raise RMMError("output directory must differ from the input checkpoints", file=out_dir)

    base = _Checkpoint(base_dir)
    ft = _Checkpoint(finetuned_dir)
    config, model = _skeleton(base)
    _check_same_model(base, ft)
    _check_same_tensors(base, ft)

    task_type = _task_type(config)
    plan = _Plan(model, base, task_type, target_modules)

    modules: dict[str, dict] = {}
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    skipped: dict[str, str] = {}
    head_tensors: dict[str, dict[str, torch.Tensor]] = {}  # head root -> {adapter key: ft tensor}
    changed_heads: set[str] = set()
    dtypes: set[torch.dtype] = set()

    with contextlib.ExitStack() as stack:
        files = sorted(set(base.files.values()) | set(ft.files.values()))
        handles = {file: stack.enter_context(open_safetensors(file)) for file in files}
        keys = sorted(base.files)
        advance = stack.enter_context(_progress(len(keys), progress))
        for key in keys:
            advance(key)
            b = read_tensor(handles[base.files[key]], base.files[key], key)
            f = read_tensor(handles[ft.files[key]], ft.files[key], key)
            target = plan.targets.get(key)
            if target is not None:
                name, layer = target
                if b.dtype not in _WRITE_DTYPES or f.dtype not in _WRITE_DTYPES:
                    raise RMMError(
                        f"weight dtypes {b.dtype} / {f.dtype} are not plain floating point (quantized checkpoint?); "
                        "extract from unquantized checkpoints",
                        file=ft.files[key],
                        module=name,
                    )
                result = _extract_one(
                    b,
                    f,
                    rank,
                    layer,
                    explicit=target_modules is not None,
                    file=ft.files[key],
                    module=name,
                    device=device,
                )
                if result is not None:
                    factors[PREFIX + name], modules[name] = result
                    dtypes.add(b.dtype)
                continue
            head = plan.head_of.get(key)
            if head is not None:
                head_tensors.setdefault(head, {})[PREFIX + plan.model_name[key]] = f
                if _changed(b, f):
                    changed_heads.add(head)
                continue
            if _changed(b, f):
                skipped[key] = plan.skip_reason(key)
            del b, f

    if not factors:
        raise RMMError(
            "no Linear / Conv1D weight to extract: none changed" + (" among target_modules" if target_modules else ""),
            file=ft.path,
        )
    extras = {k: v for head in sorted(changed_heads) for k, v in head_tensors[head].items()}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    fan_in_fan_out = any(m["layer"] == "Conv1D" for m in modules.values())
    adapter_config = _lora_config(
        r=max(m["rank"] for m in modules.values()),
        target_modules=sorted(modules),
        fan_in_fan_out=fan_in_fan_out,
        task_type=task_type,
        base_model_name_or_path=str(base_dir),
        modules_to_save=sorted({plan.head_root_name[h] for h in changed_heads}) or None,
    )
    write_adapter(out_dir, adapter_config, factors, extras, dtype)
    return {
        "base": str(base_dir),
        "finetuned": str(finetuned_dir),
        "out_dir": str(out_dir),
        "r": adapter_config["r"],
        "dtype": str(dtype).removeprefix("torch."),
        "task_type": task_type,
        "fan_in_fan_out": fan_in_fan_out,
        "modules": {name: modules[name] for name in sorted(modules)},
        "max_rel_error": max(m["rel_error"] for m in modules.values()),
        "modules_to_save": adapter_config["modules_to_save"] or [],
        "skipped": skipped,
    }


# --------------------------------------------------------------------------------------------
# Checkpoint discovery and checks (headers only)


class _Checkpoint:
    """A Hugging Face checkpoint directory: config file and, per tensor key, its file/shape/dtype."""

    def __init__(self, path: Path):
        self.path = path
        if not path.is_dir():
            raise RMMError("not a directory (expected a Hugging Face model directory)", file=path)
        self.config_file = path / CONFIG
        if not self.config_file.is_file():
            raise RMMError(f"no {CONFIG}: not a Hugging Face model directory", file=self.config_file)
        try:
            self.config_json = json.loads(self.config_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RMMError(f"invalid JSON ({e})", file=self.config_file) from None
        if not isinstance(self.config_json, dict):
            raise RMMError("expected a JSON object", file=self.config_file)
        self.files: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        index, single = path / INDEX, path / WEIGHTS
        if single.is_file():  # transformers' own order: the single file first, then the index
            self._read_header(single, None)
        elif index.is_file():
            self._read_index(index)
        else:
            pickles = [path / p for p in _PICKLE if (path / p).is_file()] or sorted(path.glob("*.bin"))
            if pickles:
                raise RMMError(
                    "only a pickle checkpoint is present; pickle is never loaded here. Re-save the model with "
                    "save_pretrained(..., safe_serialization=True) to get model.safetensors",
                    file=pickles[0],
                )
            raise RMMError(f"no {WEIGHTS} or {INDEX} found", file=path)
        if not self.files:
            raise RMMError("checkpoint holds no tensors", file=single if single.is_file() else index)

    def _read_index(self, index: Path) -> None:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            assert isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AssertionError):
            raise RMMError(
                "invalid index: expected JSON with a 'weight_map' of tensor name -> shard file", file=index
            ) from None
        by_file: dict[str, list[str]] = {}
        for key, shard in weight_map.items():
            by_file.setdefault(shard, []).append(key)
        for shard, keys in sorted(by_file.items()):
            file = self.path / shard
            if not file.is_file():
                raise RMMError(f"shard listed in {INDEX} is missing", file=file)
            self._read_header(file, keys)

    def _read_header(self, file: Path, keys: list[str] | None) -> None:
        with open_safetensors(file) as f:
            present = set(f.keys())
            for key in sorted(present) if keys is None else keys:
                if key not in present:
                    raise RMMError(f"tensor {key!r} listed in {INDEX} is not in this shard", file=file)
                self.files[key] = file
                self.shapes[key] = tuple(f.get_slice(key).get_shape())


def _skeleton(base: _Checkpoint):
    """The base config and its model on the meta device (module types, no weights)."""
    import transformers
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(base.path))
    except Exception as e:  # unknown model_type, bad values, ...: all mean "cannot read this config"
        raise RMMError(f"cannot load the model config: {e}", file=base.config_file) from None
    archs = getattr(config, "architectures", None) or []
    if not archs:
        raise RMMError("config has no 'architectures' entry; cannot tell the model class", file=base.config_file)
    cls = getattr(transformers, archs[0], None)
    if cls is None or not hasattr(cls, "_from_config"):
        raise RMMError(f"architecture {archs[0]!r} is not a transformers model class", file=base.config_file)
    try:
        with torch.device("meta"):
            model = cls._from_config(config)
    except Exception as e:
        raise RMMError(f"cannot build {archs[0]} from this config: {e}", file=base.config_file) from None
    return config, model


def _check_same_model(base: _Checkpoint, ft: _Checkpoint) -> None:
    b, f = base.config_json.get("model_type"), ft.config_json.get("model_type")
    if b is not None and f is not None and b != f:
        raise RMMError(f"model_type {f!r} differs from the base's {b!r}", file=ft.config_file)


def _check_same_tensors(base: _Checkpoint, ft: _Checkpoint) -> None:
    for key in sorted(set(base.files) - set(ft.files)):
        raise RMMError(f"tensor {key!r} of the base checkpoint is missing from the fine-tuned one", file=ft.path)
    for key in sorted(set(ft.files) - set(base.files)):
        raise RMMError(f"tensor {key!r} is not in the base checkpoint", file=ft.files[key])
    for key in sorted(base.files):
        if base.shapes[key] != ft.shapes[key]:
            raise RMMError(
                f"tensor {key!r} has shape {list(ft.shapes[key])}, base has {list(base.shapes[key])}",
                file=ft.files[key],
            )


# --------------------------------------------------------------------------------------------
# What to extract


class _Plan:
    """Maps checkpoint keys to model names and decides which become LoRA, head extras or reports."""

    def __init__(self, model: torch.nn.Module, base: _Checkpoint, task_type: str | None, target_modules):
        from transformers.pytorch_utils import Conv1D

        params = dict(model.named_parameters(remove_duplicate=False))
        prefix = getattr(model, "base_model_prefix", "") or ""
        # Checkpoint key -> model parameter name (checkpoints saved from the bare base model omit
        # the `base_model_prefix`, e.g. GPT-2's "h.0.attn..." for "transformer.h.0.attn...").
        self.model_name: dict[str, str] = {}
        for key in base.files:
            if key in params:
                self.model_name[key] = key
            elif prefix and f"{prefix}.{key}" in params:
                self.model_name[key] = f"{prefix}.{key}"
        if not self.model_name:
            raise RMMError(
                f"no tensor name in the checkpoint matches the model that {CONFIG} describes", file=base.path
            )
        ckpt_key = {v: k for k, v in self.model_name.items()}
        for key, name in self.model_name.items():
            want = tuple(params[name].shape)
            if base.shapes[key] != want:
                raise RMMError(
                    f"tensor {key!r} has shape {list(base.shapes[key])} but {CONFIG} gives {list(want)}",
                    file=base.files[key],
                )

        modules = dict(model.named_modules(remove_duplicate=False))
        self.owner = {name: modules[name.rpartition(".")[0]] for name in params}
        heads = _TASK_HEADS.get(task_type or "", ())
        head_roots = [n for n in modules if n and any(n.endswith(h) for h in heads)]
        head_roots = [n for n in head_roots if not any(n.startswith(o + ".") for o in head_roots)]
        self.head_root_name = {n: n.rpartition(".")[2] for n in head_roots}
        self.head_of: dict[str, str] = {}
        for key, name in self.model_name.items():
            for root in head_roots:
                if name.startswith(root + "."):
                    self.head_of[key] = root

        adaptable = {
            n: "Conv1D" if isinstance(m, Conv1D) else "Linear"
            for n, m in modules.items()
            if isinstance(m, (torch.nn.Linear, Conv1D))
        }
        adaptable = {n: t for n, t in adaptable.items() if not any(n == r or n.startswith(r + ".") for r in head_roots)}
        if target_modules is not None:
            for entry in target_modules:
                hits = [n for n in modules if n and _peft_match(n, entry)]
                if not any(n in adaptable or any(n == r or n.startswith(r + ".") for r in head_roots) for n in hits):
                    kinds = sorted({type(modules[n]).__name__ for n in hits})
                    what = (
                        f"only {', '.join(kinds)} modules, which LoRA extraction does not support"
                        if hits
                        else "no module"
                    )
                    raise RMMError(
                        f"target module {entry!r} matches {what}; expected Linear or Conv1D", file=base.config_file
                    )
            selected = {n: t for n, t in adaptable.items() if any(_peft_match(n, e) for e in target_modules)}
        else:
            selected = adaptable
        self.targets: dict[str, tuple[str, str]] = {}  # checkpoint key -> (module name, layer type)
        self.unselected: set[str] = set()
        for name, layer in adaptable.items():
            key = ckpt_key.get(name + ".weight")
            if key is None:
                if target_modules is not None and name in selected:
                    raise RMMError(
                        f"the weight of target module {name!r} is not stored in the checkpoint (tied to another "
                        "weight?)",
                        file=base.path,
                    )
                continue
            if name in selected:
                self.targets[key] = (name, layer)
            else:
                self.unselected.add(key)

    def skip_reason(self, key: str) -> str:
        if key in self.unselected:
            return "Linear weight not in target_modules"
        name = self.model_name.get(key)
        if name is None:
            return "not a parameter of the model built from config.json"
        kind = type(self.owner[name]).__name__
        return f"{kind}.{name.rpartition('.')[2]} changed; LoRA cannot express it"


def _peft_match(name: str, entry: str) -> bool:
    """PEFT's rule for a list of target module names."""
    return name == entry or name.endswith("." + entry)


def _task_type(config) -> str | None:
    arch = config.architectures[0]
    if arch.endswith("ForCausalLM"):
        return "CAUSAL_LM"
    if arch.endswith("LMHeadModel"):  # GPT-2 family naming
        return "SEQ_2_SEQ_LM" if getattr(config, "is_encoder_decoder", False) else "CAUSAL_LM"
    if arch.endswith("ForConditionalGeneration") and getattr(config, "is_encoder_decoder", False):
        return "SEQ_2_SEQ_LM"
    if arch.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if arch.endswith("ForTokenClassification"):
        return "TOKEN_CLS"
    if arch.endswith("ForQuestionAnswering"):
        return "QUESTION_ANS"
    return None


def _lora_config(**kwargs) -> dict:
    """A full PEFT LoraConfig as a JSON-serialisable dict (sets sorted, enums as strings)."""
    from peft import LoraConfig

    def plain(value):
        if isinstance(value, (set, frozenset)):
            return sorted(plain(v) for v in value)
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, str):  # str-based enums (PeftType, TaskType) -> their value
            return str(value.value) if hasattr(value, "value") else value
        return value

    config = plain(LoraConfig(lora_alpha=kwargs["r"], **kwargs).to_dict())
    json.dumps(config)  # fail here, not half-way through writing, if PEFT adds something odd
    return config


# --------------------------------------------------------------------------------------------
# The SVD


def _extract_one(base_w, ft_w, rank, layer, *, explicit, file, module, device=torch.device("cpu")):
    """(B, A) and the module's report, or None for an unchanged weight that was not asked for; computed on
    `device`."""
    shape = tuple(base_w.shape)
    if len(shape) != 2:
        raise RMMError(f"expected a 2-D weight, got shape {list(shape)}", file=file, module=module)
    m, n = shape[::-1] if layer == "Conv1D" else shape  # Conv1D stores in x out
    d = min(m, n)
    k = min(rank, d)
    q = min(d, k + max(10, k // 2))
    randomized = d > FULL_SVD_MAX and 4 * q <= d
    work = torch.float32 if randomized else torch.float64
    delta = ft_w.to(device, work) - base_w.to(device, work)
    if layer == "Conv1D":
        delta = delta.T
    if not torch.isfinite(delta).all():
        raise RMMError("weight delta contains NaN or Inf values", file=file, module=module)
    norm = torch.linalg.matrix_norm(delta.double() if randomized else delta).item()
    if norm == 0.0:
        if not explicit:
            return None
        B, A = torch.zeros(m, k, dtype=work, device=device), torch.zeros(k, n, dtype=work, device=device)
        rel, kept = 0.0, 1.0
    elif randomized:
        with torch.random.fork_rng(devices=[delta.device] if delta.is_cuda else []):  # seeded, caller's RNG kept
            torch.manual_seed(_SEED)
            U, S, V = torch.svd_lowrank(delta, q=q, niter=4)
        U, S, V = U[:, :k], S[:k], V[:, :k]
        residual = delta - (U * S) @ V.T
        rel = torch.linalg.matrix_norm(residual.double()).item() / norm
        kept = 1.0 - rel * rel
        B, A = _split(U, S, V.T)
    else:
        with _threads(1 if m * n <= _SMALL else None):
            U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        energy = S.square()
        total = energy.sum().item()
        rel, kept = math.sqrt(energy[k:].sum().item() / total), energy[:k].sum().item() / total
        B, A = _split(U[:, :k], S[:k], Vh[:k])
    report = {
        "layer": layer,
        "shape": [m, n],
        "rank": k,
        "rel_error": rel,
        "energy_kept": kept,
        "delta_norm": norm,
        "svd": "randomized" if randomized else "full",
    }
    return (B.contiguous(), A.contiguous()), report


@contextlib.contextmanager
def _threads(n: int | None):
    """Run with `n` intra-op threads (None: unchanged). A multi-threaded LAPACK SVD of a tiny
    matrix costs ~0.5 s instead of ~0.3 ms when the other cores are busy (threads wait on each other)."""
    before = torch.get_num_threads()
    if n is not None and n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def _split(U, S, Vh):
    """B = U sqrt(S), A = sqrt(S) Vh, each pair's sign fixed (largest |U| entry positive)."""
    pivot = U.gather(0, U.abs().argmax(dim=0, keepdim=True))
    sign = torch.where(pivot < 0, -1.0, 1.0).to(U.dtype)
    root = S.clamp_min(0).sqrt()
    scale = sign * root
    return U * scale, Vh * scale.reshape(-1, 1)


def _changed(b: torch.Tensor, f: torch.Tensor) -> bool:
    if b.dtype == f.dtype:
        return not torch.equal(b, f)
    if b.is_floating_point() and f.is_floating_point():
        return not torch.equal(b.double(), f.double())
    return True


@contextlib.contextmanager
def _progress(total: int, enabled: bool):
    """A rich progress bar over tensors; yields `advance(key)`."""
    if not enabled:
        yield lambda key: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("[bold]extract[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[key]}", style="dim"),
    )
    with Progress(*columns) as bar:
        task = bar.add_task("extract", total=total, key="")
        yield lambda key: bar.update(task, advance=1, key=key)
