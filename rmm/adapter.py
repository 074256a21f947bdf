"""Read and write PEFT LoRA directories, one module at a time.

A PEFT LoRA directory holds `adapter_config.json` and `adapter_model.safetensors`. Each adapted
Linear has `<prefix>.lora_A.weight` (r x in) and `<prefix>.lora_B.weight` (out x r); its update is
`dW = s * B @ A` with `s = alpha / r` (or `alpha / sqrt(r)` with rslora), where r and alpha may be
overridden per module by `rank_pattern` / `alpha_pattern`. We fold `sqrt(s)` into each factor so the
rest of the code works on plain factors with `dW = B @ A`, and write adapters back with
`lora_alpha == r` (s = 1), which PEFT and vLLM load as they are.

Everything else in the weights file (`modules_to_save` copies such as classifier heads) is an
*extra*: carried per task, untouched.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from safetensors.torch import save_file

from rmm.errors import RMMError
from rmm.io import atomic_dir, open_safetensors, read_tensor, safe_name, sha256_file

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PEFT's key prefix in front of the base model's module names
_A, _B = ".lora_A.weight", ".lora_B.weight"
# Tensors of a LoRA variant whose update is not `s * B @ A`, refused by name; any other "lora_*" tensor besides
# lora_A / lora_B weights is refused too, as a variant rmm does not know.
_REFUSED_KEYS = {
    "lora_magnitude_vector": "DoRA adapters (use_dora) are not supported: their update is not s * B @ A",
    "lora_B.bias": "adapters with lora_bias are not supported: their update is not s * B @ A",
    "lora_embedding_": "LoRA on embedding layers is not supported yet; target Linear layers only",
}
# Per-module tensors that do not enter the update: VeLoRA's projection for the backward pass. Carried as extras.
_TRAINING_ONLY = {"lora_velora_embed"}
# adapter_config fields (PEFT 0.21's LoraConfig) that change the update, or what it applies to, in ways rmm does not
# model: refused by name when set to anything but PEFT's default (None, False or empty).
_REFUSED_FIELDS = {
    "use_dora": _REFUSED_KEYS["lora_magnitude_vector"],
    "lora_bias": _REFUSED_KEYS["lora_B.bias"],
    "kasa_config": "KaSA adapters (kasa_config) are not supported: their update is s * B diag(d) A, not s * B @ A",
    "use_bdlora": "BD-LoRA adapters (use_bdlora) are not supported: "
    "their factors are block-diagonal over sharded layers",
    "use_qalora": "QA-LoRA adapters (use_qalora) are not supported: their lora_A acts on group-pooled inputs",
    "monteclora_config": "MonteCLoRA adapters (monteclora_config) are not supported: "
    "their factors are sampled around the saved ones",
    "arrow_config": "Arrow adapters (arrow_config) are not supported: they route each token among several LoRA experts",
    "target_parameters": "LoRA on parameters (target_parameters) is not supported; target Linear layers only",
    "layer_replication": "adapters on replicated layers (layer_replication) are not supported",
    "megatron_config": "adapters on Megatron parallel layers (megatron_config) are not supported: "
    "their factors may be saved sharded",
}
# The other fields PEFT writes: metadata, which modules (and extras) are trained, initialisation (LoftQ, EVA, CorDA,
# LoRA-GA, PiSSA, ...), training only (dropout, VeLoRA) or when the update applies (aLoRA). The saved B and A keep
# meaning s * B @ A, and revert writes each task's own config back. Fields not listed anywhere are refused when set.
# (r, lora_alpha and the patterns are typed by _Scaling.)
_KNOWN_FIELDS = {
    "task_type",
    "peft_type",
    "auto_mapping",
    "peft_version",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "r",
    "lora_alpha",
    "use_rslora",
    "rank_pattern",
    "alpha_pattern",
    "fan_in_fan_out",
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "modules_to_save",
    "bias",
    "trainable_token_indices",
    "ensure_weight_tying",
    "lora_dropout",
    "init_lora_weights",
    "loftq_config",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    "velora_config",
    "alora_invocation_tokens",
    "megatron_core",
    "qalora_group_size",
    "runtime_config",
}


PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class _Scaling(BaseModel):
    """The config fields that give each module's rank and scaling, typed strictly (the others are checked above)."""

    model_config = ConfigDict(extra="ignore", strict=True)
    r: PositiveInt
    lora_alpha: PositiveFloat = 8  # PEFT's default
    use_rslora: bool = False
    rank_pattern: dict[str, PositiveInt] | None = None
    alpha_pattern: dict[str, PositiveFloat] | None = None

    @field_validator("rank_pattern", "alpha_pattern")
    @classmethod
    def _regexes(cls, patterns: dict | None) -> dict | None:
        for key in patterns or {}:
            try:
                re.compile(key)
            except re.error as e:
                raise ValueError(f"{key!r} is not a regular expression ({e})") from None
        return patterns


@dataclass(frozen=True)
class ModuleSpec:
    """Shape and scaling of one adapted Linear in one adapter."""

    rank: int
    out_features: int
    in_features: int
    scaling: float


@dataclass(frozen=True)
class LoraAdapter:
    """An opened (not loaded) PEFT LoRA directory: config, module specs and the extra keys."""

    path: Path
    name: str
    config: dict
    modules: dict[str, ModuleSpec]  # key prefix (e.g. "base_model.model.x.q_proj") -> spec
    extra_keys: tuple[str, ...]
    dtype: torch.dtype
    sha256: str

    @property
    def weights_file(self) -> Path:
        return self.path / WEIGHTS_FILE

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def lora_numbers(self) -> int:
        """Numbers in its lora_A / lora_B tensors, at its own ranks (what storage ratios compare to)."""
        return sum(s.rank * (s.out_features + s.in_features) for s in self.modules.values())

    @property
    def lora_bytes(self) -> int:
        return self.lora_numbers * self.dtype.itemsize

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.config.get("fan_in_fan_out", False))

    def load_factors(self, module: str, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A) of one module in float64 on `device` (the CPU by default) with sqrt(scaling) folded into each:
        dW = B @ A."""
        with open_safetensors(self.weights_file) as f:
            B = read_tensor(f, self.weights_file, module + _B).to(device=device, dtype=torch.float64)
            A = read_tensor(f, self.weights_file, module + _A).to(device=device, dtype=torch.float64)
        for factor, t in (("lora_B", B), ("lora_A", A)):
            if not torch.isfinite(t).all():
                raise RMMError(f"{factor} contains NaN or Inf values", file=self.weights_file, module=module)
        root = math.sqrt(self.modules[module].scaling)
        return B * root, A * root

    def load_extras(self) -> dict[str, torch.Tensor]:
        """The non-LoRA tensors (e.g. `modules_to_save` heads), exactly as stored."""
        with open_safetensors(self.weights_file) as f:
            return {k: read_tensor(f, self.weights_file, k) for k in self.extra_keys}


def module_name(key_prefix: str) -> str:
    """The base model's module name, as PEFT matches rank_pattern / alpha_pattern against it."""
    return key_prefix[len(PREFIX) :] if key_prefix.startswith(PREFIX) else key_prefix


def pattern_value(patterns: dict, name: str, default):
    """PEFT's rule: the first pattern key `k` with `re.match(rf"(.*\\.)?({k})$", name)` wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def lora_scaling(config: dict, name: str) -> tuple[int, float]:
    """(rank, scaling) that PEFT gives module `name` under `config`."""
    r = pattern_value(config.get("rank_pattern") or {}, name, config["r"])
    alpha = pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", 8))  # PEFT's default
    scale = alpha / math.sqrt(r) if config.get("use_rslora", False) else alpha / r
    return int(r), float(scale)


def open_adapter(path: str | Path) -> LoraAdapter:
    """Read an adapter's config and weight header and check it is a plain LoRA we can merge.

    Only the safetensors header is parsed here; tensors are read later, one module at a time.
    """
    path = Path(path)
    config = _read_config(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        if (path / "adapter_model.bin").is_file():
            raise RMMError(
                "only a pickle adapter_model.bin is present; pickle is never loaded here. "
                "Re-save the adapter with save_pretrained(..., safe_serialization=True)",
                file=path,
            )
        raise RMMError(f"no {WEIGHTS_FILE} found", file=path)
    with open_safetensors(weights) as f:
        header = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}

    for key in header:
        for marker, reason in _REFUSED_KEYS.items():
            if marker in key:
                raise RMMError(reason, file=weights, module=key)
        unknown = [
            part
            for part in key.split(".")
            if part.startswith("lora_") and part not in ("lora_A", "lora_B", *_TRAINING_ONLY)
        ]
        if unknown:
            raise RMMError(
                f"tensor {unknown[0]!r} is not part of a plain LoRA (a variant rmm does not model); only lora_A and "
                "lora_B are",
                file=weights,
                module=key,
            )
    prefixes = sorted(
        {k[: -len(_A)] for k in header if k.endswith(_A)} | {k[: -len(_B)] for k in header if k.endswith(_B)}
    )
    if not prefixes:
        raise RMMError("no lora_A / lora_B weights found", file=weights)

    modules = {}
    for prefix in prefixes:
        if prefix + _A not in header or prefix + _B not in header:
            missing = "lora_A" if prefix + _A not in header else "lora_B"
            raise RMMError(f"{missing} weight is missing", file=weights, module=prefix)
        (a_shape, _), (b_shape, _) = header[prefix + _A], header[prefix + _B]
        if len(a_shape) != 2 or len(b_shape) != 2:
            raise RMMError(
                f"only Linear LoRA is supported, got lora_A {a_shape}, lora_B {b_shape}", file=weights, module=prefix
            )
        (r_a, n_in), (n_out, r_b) = a_shape, b_shape
        rank, scaling = lora_scaling(config, module_name(prefix))
        if not r_a == r_b == rank:
            raise RMMError(
                f"rank mismatch: lora_A has {r_a} rows, lora_B {r_b} columns, config gives r={rank}",
                file=weights,
                module=prefix,
            )
        modules[prefix] = ModuleSpec(rank, n_out, n_in, scaling)

    lora_keys = {p + s for p in prefixes for s in (_A, _B)}
    dtypes = {header[k][1] for k in lora_keys}
    if len(dtypes) != 1:
        raise RMMError(f"LoRA weights mix dtypes {sorted(dtypes)}", file=weights)
    dtype = _DTYPES.get(dtypes.pop())
    if dtype is None:
        raise RMMError(f"unsupported LoRA weight dtype; expected one of {sorted(_DTYPES)}", file=weights)
    return LoraAdapter(
        path=path,
        name=safe_name(path.resolve().name, file=path),  # the task's file names in a bundle
        config=config,
        modules=modules,
        extra_keys=tuple(k for k in header if k not in lora_keys),
        dtype=dtype,
        sha256=sha256_file(weights),
    )


def open_adapters(paths: list[str | Path]) -> list[LoraAdapter]:
    """Open a set of adapters that will share one model space, refusing any that cannot."""
    adapters = [open_adapter(p) for p in paths]
    check_compatible(adapters)
    return adapters


def check_compatible(adapters: list[LoraAdapter]) -> None:
    """Refuse a set of adapters that cannot share one model space, naming the first culprit."""
    if not adapters:
        raise RMMError("no adapters given")
    seen: dict[str, Path] = {}
    for a in adapters:
        if a.name in seen:
            raise RMMError(
                f"duplicate task name {a.name!r} (also {seen[a.name]}); task names are directory names", file=a.path
            )
        seen[a.name] = a.path
    ref = adapters[0]
    for a in adapters[1:]:
        if a.base_model != ref.base_model:
            raise RMMError(
                f"base model {a.base_model!r} differs from {ref.base_model!r} of {ref.path}", file=a.path / CONFIG_FILE
            )
        if a.fan_in_fan_out != ref.fan_in_fan_out:
            raise RMMError(f"fan_in_fan_out differs from {ref.path}", file=a.path / CONFIG_FILE)
        for m in sorted(set(ref.modules) ^ set(a.modules)):
            has, lacks = (ref, a) if m in ref.modules else (a, ref)
            raise RMMError(
                f"module set differs: present in {has.path} but not in {lacks.path}", file=a.weights_file, module=m
            )
        for m, spec in a.modules.items():
            want = ref.modules[m]
            if (spec.out_features, spec.in_features) != (want.out_features, want.in_features):
                raise RMMError(
                    f"shape {spec.out_features}x{spec.in_features} differs from "
                    f"{want.out_features}x{want.in_features} in {ref.path}",
                    file=a.weights_file,
                    module=m,
                )


def write_adapter(
    out_dir: Path,
    config: dict,
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    extras: dict[str, torch.Tensor],
    dtype: torch.dtype,
) -> None:
    """Write a PEFT LoRA directory from folded factors (dW = B @ A), with `lora_alpha == r`.

    Modules of lower rank are zero-padded to the largest one, so the config needs no rank_pattern
    (which vLLM does not read). The directory is written beside `out_dir` and renamed into place,
    so a failure never leaves a half-written adapter.
    """
    if not factors:
        raise RMMError("no LoRA modules to write", file=out_dir)
    rank = max(1, *(B.shape[1] for B, _ in factors.values()))  # PEFT needs r >= 1, even if every module was dropped
    tensors = {}
    for prefix, (B, A) in factors.items():
        if B.shape[1] != A.shape[0]:
            raise RMMError(f"lora_B has {B.shape[1]} columns but lora_A {A.shape[0]} rows", file=out_dir, module=prefix)
        pad = rank - B.shape[1]
        tensors[prefix + _B] = torch.nn.functional.pad(B, (0, pad)).to("cpu", dtype).contiguous()
        tensors[prefix + _A] = torch.nn.functional.pad(A, (0, 0, 0, pad)).to("cpu", dtype).contiguous()
    tensors.update({k: v.contiguous() for k, v in extras.items()})
    config = {**config, "r": rank, "lora_alpha": rank, "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {}}
    with atomic_dir(out_dir) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def delta_weight(B: torch.Tensor, A: torch.Tensor, fan_in_fan_out: bool = False) -> torch.Tensor:
    """dW in the layer's weight layout (transposed for a Conv1D layer, which PEFT always treats as
    fan_in_fan_out, whatever the config says; a Linear never is).

    Materialises out x in: for tests and small modules only; metrics use `rmm.metrics` instead.
    """
    dW = B @ A
    return dW.T if fan_in_fan_out else dW


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def _read_config(path: Path) -> dict:
    cfg_file = path / CONFIG_FILE
    if not path.is_dir():
        raise RMMError("not a directory (expected a PEFT adapter directory)", file=path)
    if not cfg_file.is_file():
        raise RMMError(f"no {CONFIG_FILE}: not a PEFT adapter directory", file=path)
    try:
        config = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RMMError(f"invalid JSON ({e})", file=cfg_file) from None
    if not isinstance(config, dict):
        raise RMMError("expected a JSON object", file=cfg_file)
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise RMMError(f"peft_type is {config.get('peft_type')!r}; only LORA adapters can be merged", file=cfg_file)
    for field, value in config.items():
        if field not in _KNOWN_FIELDS and value not in (None, False, {}, []):  # PEFT's defaults of its optional fields
            unknown = f"unknown field {field!r} = {value!r:.60}: rmm cannot tell whether it changes the update"
            raise RMMError(_REFUSED_FIELDS.get(field, unknown), file=cfg_file)
    try:
        _Scaling.model_validate(config)
    except ValidationError as e:
        error = e.errors()[0]
        raise RMMError(
            f"{'.'.join(map(str, error['loc']))!r}: {error['msg']} (got {error['input']!r:.60})", file=cfg_file
        ) from None
    return config
