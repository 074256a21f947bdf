"""Calibration: what a candidate plan costs each task, measured on the task's own examples.

No data-free error measure ranks storage plans by task quality on every kind of adapter set (dW error prefers
truncation where joint sharing keeps more accuracy, and the opposite elsewhere), so when the user gives the base
model and a few examples per task, each candidate plan (`rmm.allocate.candidate_plans`) is scored by what it does to
the tasks' outputs: the KL divergence from the original adapter's output distribution (next token, class, or
token class) to the reverted candidate's, averaged over the task's examples and positions. The plan with the
smallest sum over tasks wins.

Data: `DIR/<task>.jsonl`, one example per line, `{"input_ids": [...]}` or `{"text": "..."}` (tokenised by the base
model's tokenizer); `DIR/default.jsonl` serves tasks without their own file. Every position attends (no padding):
examples of one length run as one batch.

Cost: per task, one base model load and one forward pass over its examples for the original and for each
candidate; the candidates' reverted factors of every task are held in memory at the adapters' dtype.
"""

from __future__ import annotations

import copy
import json
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from rmm.adapter import LoraAdapter
from rmm.errors import RMMError, first_line
from rmm.io import safe_name, sha256_file

DEFAULT_FILE = "default.jsonl"
EXAMPLES = 64  # per task by default: enough to rank plans, a few forward passes
# task_type -> the transformers auto class whose logits are a distribution per example (SEQ_CLS) or per position
AUTO_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
}

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module key prefix -> folded (B, A), dW = B @ A


class _Example(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input_ids: list[int] | None = None
    text: str | None = None


@dataclass(frozen=True)
class Calibration:
    """What the user gives: the base model directory, the examples' directory and how many examples per task."""

    base: Path
    data: Path
    examples: int = EXAMPLES

    def record(self) -> dict:
        return {"base": str(self.base.resolve()), "data": str(self.data.resolve()), "examples": self.examples}


@dataclass(frozen=True)
class Examples:
    """Each task's examples (token ids), read and checked up front, and the sha256 of the file they came from."""

    ids: dict[str, list[list[int]]]
    files: dict[str, str]


def read_examples(calibration: Calibration, tasks: list[str]) -> Examples:
    """The first `calibration.examples` examples of each task (see the module's doc), tokenised if given as text."""
    base, data, examples = Path(calibration.base), Path(calibration.data), calibration.examples
    if not (base / "config.json").is_file():
        raise RMMError("not a transformers model directory (no config.json)", file=base)
    if not data.is_dir():
        raise RMMError("the calibration data must be a directory of <task>.jsonl files", file=data)
    if examples < 1:
        raise RMMError(f"calibration needs at least one example per task, got {examples}")
    tokenizer = None
    found, files = {}, {}
    for task in tasks:
        file = data / f"{safe_name(task)}.jsonl"
        if not file.is_file():
            file = data / DEFAULT_FILE
        if not file.is_file():
            raise RMMError(f"no examples for task {task!r}: add {task}.jsonl or {DEFAULT_FILE}", file=data)
        rows = []
        for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
            if len(rows) == examples:
                break
            if not line.strip():
                continue
            try:
                row = _Example.model_validate_json(line)
            except ValidationError as e:
                raise RMMError(f"line {number}: {e.errors()[0]['msg']}", file=file) from None
            if (row.input_ids is None) == (row.text is None):
                raise RMMError(f"line {number}: give exactly one of input_ids and text", file=file)
            if row.text is not None:
                tokenizer = tokenizer or _tokenizer(base, file)
                row.input_ids = tokenizer(row.text)["input_ids"]
            if not row.input_ids or min(row.input_ids) < 0:
                raise RMMError(f"line {number}: input_ids must be a non-empty list of token ids >= 0", file=file)
            rows.append(row.input_ids)
        if not rows:
            raise RMMError(f"no examples for task {task!r}", file=file)
        found[task], files[task] = rows, sha256_file(file)
    return Examples(found, files)


def _tokenizer(base: Path, file: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(base)
    except (OSError, ValueError) as e:
        raise RMMError(
            f"text examples need the base model's tokenizer, which did not load ({first_line(e)})", file=file
        ) from None


def divergences(
    adapters: list[LoraAdapter],
    candidates: dict[str, list[Factors]],
    base: Path,
    examples: Examples,
    device: torch.device = torch.device("cpu"),
) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Per candidate and task: the mean KL(original || candidate) of the task's output distributions over its
    examples, the models run on `device`. `candidates[name][t]` is task t's reverted factors under that plan.
    Also the seconds spent."""
    clock = time.perf_counter()
    seconds = defaultdict(float)
    found: dict[str, dict[str, float]] = {name: {} for name in candidates}
    bases: dict[tuple, torch.nn.Module] = {}
    for t, a in enumerate(adapters):
        start = time.perf_counter()
        model = _load(a, Path(base), bases).to(device)
        batches = _batches(examples.ids[a.name])
        seconds["load"] += time.perf_counter() - start
        start = time.perf_counter()
        reference = [_log_probs(model, x) for x in batches]
        seconds["forward"] += time.perf_counter() - start
        for name, factors in candidates.items():
            start = time.perf_counter()
            _set_factors(model, factors[t], a)
            kl = [_kl(ref, _log_probs(model, x)) for ref, x in zip(reference, batches)]
            found[name][a.name] = float(sum(k.sum() for k in kl) / sum(k.numel() for k in kl))
            seconds["forward"] += time.perf_counter() - start
    seconds["total"] = time.perf_counter() - clock
    return found, dict(seconds)


def _load(adapter: LoraAdapter, base: Path, bases: dict) -> torch.nn.Module:
    """The base for the adapter's task type (a copy of one loaded once per type and head size), the adapter on it."""
    import transformers
    from peft import PeftModel

    task_type = adapter.config.get("task_type")
    if task_type is None:  # PEFT applies such an adapter to the base model as it is: its own class and head
        architectures = json.loads((base / "config.json").read_text()).get("architectures") or [None]
        if not hasattr(transformers, str(architectures[0])):
            raise RMMError("the adapter has no task_type and the base's config.json names no architecture", file=base)
    elif task_type not in AUTO_CLASSES:
        raise RMMError(
            f"calibration measures task types {', '.join(AUTO_CLASSES)} (or none: the base's own head); this "
            f"adapter's is {task_type!r}",
            file=adapter.path,
        )
    key: tuple = (task_type,)
    kwargs = {}
    if task_type in ("SEQ_CLS", "TOKEN_CLS"):  # the head the adapter saves (modules_to_save) sizes the base's
        heads = [v for k, v in sorted(adapter.load_extras().items()) if k.endswith("weight") and v.dim() == 2]
        if heads:
            # the adapter's head replaces the base's, which may have another number of labels
            kwargs |= {"num_labels": heads[-1].shape[0], "ignore_mismatched_sizes": True}
            key += (heads[-1].shape[0],)
    if key not in bases:
        try:
            cls = getattr(transformers, AUTO_CLASSES[task_type] if task_type else architectures[0])
            bases[key] = cls.from_pretrained(base, **kwargs).eval()
        except (OSError, ValueError, RuntimeError) as e:
            raise RMMError(f"the base model did not load for {task_type} ({first_line(e)})", file=base) from None
    try:
        model = PeftModel.from_pretrained(copy.deepcopy(bases[key]), adapter.path)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise RMMError(
            f"PEFT did not load the adapter onto the base at {base} ({first_line(e)})", file=adapter.path
        ) from None
    return model.eval()


def _set_factors(model: torch.nn.Module, factors: Factors, adapter: LoraAdapter) -> None:
    """Put a candidate's folded factors in place of the adapter's LoRA, as a reverted adapter holds them (scaling 1,
    the adapter's dtype), at whatever rank the candidate has."""
    for prefix, (B, A) in factors.items():
        layer = model.get_submodule(prefix)
        name = model.active_adapter
        old = layer.lora_A[name].weight
        down = torch.nn.Linear(A.shape[1], A.shape[0], bias=False, dtype=old.dtype, device=old.device)
        up = torch.nn.Linear(B.shape[1], B.shape[0], bias=False, dtype=old.dtype, device=old.device)
        with torch.no_grad():
            down.weight.copy_(A.to(adapter.dtype))
            up.weight.copy_(B.to(adapter.dtype))
        layer.lora_A[name], layer.lora_B[name], layer.scaling[name] = down, up, 1.0


def _batches(examples: list[list[int]]) -> list[torch.Tensor]:
    """Examples of one length stacked into one batch each, so that no position needs padding."""
    by_length = defaultdict(list)
    for ids in examples:
        by_length[len(ids)].append(ids)
    return [torch.tensor(rows) for _, rows in sorted(by_length.items())]


def _log_probs(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    with torch.inference_mode():
        logits = model(input_ids=ids.to(device), attention_mask=torch.ones_like(ids, device=device)).logits
    return torch.log_softmax(logits.double(), dim=-1)


def _kl(reference: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
    """KL(reference || candidate) per distribution (the last dimension holds the log probabilities)."""
    return (reference.exp() * (reference - candidate)).sum(-1)


def chosen(total: dict[str, float]) -> str:
    """The candidate with the smallest summed divergence; ties go to the earlier candidate."""
    return min(total, key=lambda name: (total[name], list(total).index(name)))


def summed(per_task: dict[str, dict[str, float]]) -> dict[str, float]:
    """Per candidate, the divergence summed over tasks (in task order)."""
    return {name: float(sum(by_task.values())) for name, by_task in per_task.items()}
