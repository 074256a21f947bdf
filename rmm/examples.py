"""Small but real LoRA adapters for demos and tests.

A tiny Llama classifier with random weights is the base model; each task in `TASKS` is a
binary classification of synthetic token sequences, and gets its own PEFT LoRA adapter
(plus its own classifier head, carried as `modules_to_save`). Everything trains on CPU in
about a minute and a half and is cached on disk, keyed by a hash of the spec, so later runs load at once.

Training is reproducible to the byte on any x86-64 machine: it runs in a fresh process
(`python -m rmm.examples`) on one thread, with fixed seeds and data order, deterministic algorithms,
and the CPU kernels pinned (`PORTABLE_KERNELS`): with the kernels torch and MKL pick for the
machine's CPU, AVX2 and AVX-512 round differently and 400 steps amplify it into other adapters.

    ex = build_examples()                       # trains once, then cached
    evaluate(ex.base_dir, ex.adapters["late_a"], "late_a")                   # ~1.0
    evaluate(ex.base_dir, ex.adapters["late_a"], "late_a", head_only=True)   # ~0.5
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import subprocess
import sys
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForSequenceClassification
from transformers.utils import logging as hf_logging

from rmm.io import atomic_dir

# Bump when the data generators or the training loop change: the hash below only sees the dicts.
FORMAT = 2  # 2: trained in a fresh process on portable kernels

# Token ids: 0 pads (never used, sequences have one length), 1 is a final "CLS" token whose
# hidden state the classifier reads (Llama pools the last non-pad token, and with causal
# attention only the last position sees the whole sequence). Symbols are 2..VOCAB-1.
VOCAB, LENGTH, PAD, CLS = 24, 12, 0, 1
SYMBOLS = list(range(2, VOCAB))
A, B = SYMBOLS[0], SYMBOLS[1]  # the two "special" symbols some tasks are about
HIGH = SYMBOLS[len(SYMBOLS) // 2 :]  # upper half of the symbols
LOW = SYMBOLS[: len(SYMBOLS) // 2]

MODEL = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=64,
    pad_token_id=PAD,
    num_labels=2,
)
LORA = dict(
    task_type="SEQ_CLS",
    r=8,
    lora_alpha=16,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
)  # SEQ_CLS makes PEFT train and save each task's own classifier head ("score") as modules_to_save
# One fresh batch per step (no epochs). OneCycle (warm-up, then anneal) converges reliably in few steps.
TRAIN = dict(steps=400, batch_size=32, lr=3e-3, seed=0)
EVAL_N = 1000
# Set before torch starts (so for the training process): ATen's portable kernels and MKL's reproducible mode
# instead of the fastest ones for this CPU, whose rounding differs between CPUs; OpenMP on one thread.
PORTABLE_KERNELS = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "OMP_NUM_THREADS": "1"}


# --- tasks: each sampler returns LENGTH symbols whose true label is `label` -------------------
# Both classes are built to look alike on the surface (e.g. both contain A, or A and B), so the
# label depends on the relation the task names, not on a shortcut a random base already exposes.
# Tasks that need a previous-token head (bigram "A B", "symbol after A") were tried and dropped:
# whether 400 steps find that head on a random base is a lottery over seeds.


def _majority(rng: random.Random, label: int) -> list[int]:
    """A occurs more often than B."""
    hi, lo = sorted(rng.sample(range(1, 6), 2), reverse=True)
    na, nb = (hi, lo) if label else (lo, hi)
    x = [A] * na + [B] * nb + [rng.choice(SYMBOLS[2:]) for _ in range(LENGTH - na - nb)]
    rng.shuffle(x)
    return x


def _contains(rng: random.Random, label: int) -> list[int]:
    """A occurs somewhere."""
    x = [rng.choice(SYMBOLS[1:]) for _ in range(LENGTH)]
    if label:
        x[rng.randrange(LENGTH)] = A
    return x


def _many_a(rng: random.Random, label: int) -> list[int]:
    """A occurs at least 3 times (negatives have it 1 or 2 times)."""
    k = rng.choice([3, 4, 5] if label else [1, 2])
    x = [A] * k + [rng.choice(SYMBOLS[1:]) for _ in range(LENGTH - k)]
    rng.shuffle(x)
    return x


def _first_high(rng: random.Random, label: int) -> list[int]:
    """The first symbol is in the upper half."""
    return [rng.choice(HIGH if label else LOW)] + [rng.choice(SYMBOLS) for _ in range(LENGTH - 1)]


def _late_a(rng: random.Random, label: int) -> list[int]:
    """A occurs once, in the second half."""
    x = [rng.choice(SYMBOLS[1:]) for _ in range(LENGTH)]
    half = LENGTH // 2
    x[rng.randrange(half, LENGTH) if label else rng.randrange(0, half)] = A
    return x


def _a_before_b(rng: random.Random, label: int) -> list[int]:
    """A and B occur once each; A comes first."""
    x = [rng.choice(SYMBOLS[2:]) for _ in range(LENGTH)]
    i, j = sorted(rng.sample(range(LENGTH), 2))
    x[i], x[j] = (A, B) if label else (B, A)
    return x


def _high_majority(rng: random.Random, label: int) -> list[int]:
    """More than half of the symbols are in the upper half."""
    k = rng.randrange(LENGTH // 2 + 1, LENGTH + 1) if label else rng.randrange(0, LENGTH // 2 + 1)
    x = [rng.choice(HIGH) for _ in range(k)] + [rng.choice(LOW) for _ in range(LENGTH - k)]
    rng.shuffle(x)
    return x


def _front_heavy(rng: random.Random, label: int) -> list[int]:
    """The first half has more upper-half symbols than the second half (never a tie)."""
    while True:
        x = [rng.choice(SYMBOLS) for _ in range(LENGTH)]
        front, back = (sum(s in HIGH for s in part) for part in (x[: LENGTH // 2], x[LENGTH // 2 :]))
        if front != back and (front > back) == bool(label):
            return x


_SAMPLERS = {
    f.__name__[1:]: f
    for f in (_majority, _contains, _many_a, _first_high, _late_a, _a_before_b, _high_majority, _front_heavy)
}
TASKS = tuple(_SAMPLERS)  # task names, in training order


def _seed(*parts) -> int:
    """A stable integer seed from any parts (Python's hash() of str is salted per process)."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:4], "big")


def dataset(task: str, n: int, split: str = "eval", seed: int = TRAIN["seed"]) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` sequences (CLS appended) and labels for `task`, exactly balanced, deterministic per split."""
    rng = random.Random(_seed(seed, task, split))
    labels = [i % 2 for i in range(n)]
    rng.shuffle(labels)
    x = [_SAMPLERS[task](rng, y) + [CLS] for y in labels]
    return torch.tensor(x), torch.tensor(labels)


# --- building ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Examples:
    """Where the cached example models are; every path exists when build_examples returns."""

    base_dir: Path  # base model directory, loadable with from_pretrained
    adapters: dict[str, Path]  # task -> PEFT adapter directory named after the task


@contextlib.contextmanager
def _cpu_quietly(threads: int = 1):
    """Run torch on one thread, without transformers' loading bars or a known PEFT deprecation.

    One thread, on purpose: these matmuls are too small to gain from a second one, and on a
    shared 2-core machine a second OpenMP thread spin-waits and makes training 10-50x slower.
    """
    before, bars = torch.get_num_threads(), hf_logging.is_progress_bar_enabled()
    torch.set_num_threads(min(threads, before))
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
            yield
    finally:
        torch.set_num_threads(before)
        if bars:
            hf_logging.enable_progress_bar()


def build_examples(
    cache_dir: str | Path | None = None, tasks: Iterable[str] | None = None, progress: bool = True
) -> Examples:
    """Train (or load from cache) the base model and one adapter per task.

    The cache lives in `cache_dir`, else `$RMM_CACHE_DIR`, else `.cache/examples`, in a subfolder
    named by a hash of the whole spec. Training happens in a temporary sibling folder that is
    renamed into place at the end, so an interrupted run never leaves a half-written cache.
    """
    tasks = list(TASKS if tasks is None else tasks)
    if unknown := set(tasks) - set(TASKS):
        raise ValueError(f"unknown tasks {sorted(unknown)}; choose from {TASKS}")
    root = Path(cache_dir or os.environ.get("RMM_CACHE_DIR") or ".cache/examples").resolve()
    spec = dict(format=FORMAT, vocab=VOCAB, length=LENGTH, model=MODEL, lora=LORA, train=TRAIN, tasks=tasks)
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    final = root / key
    examples = Examples(final / "base", {t: final / "adapters" / t for t in tasks})
    if final.is_dir():
        return examples

    with atomic_dir(final, keep_existing=True) as tmp:
        _train_all(tmp, examples.base_dir, spec, progress)
        (tmp / "spec.json").write_text(json.dumps(spec, indent=2, sort_keys=True))
    return examples


def _train_all(tmp: Path, final_base_dir: Path, spec: dict, progress: bool) -> None:
    """Train the base and every task's adapter of `spec` into `tmp`, in a fresh process with `PORTABLE_KERNELS`."""
    argv = [sys.executable, "-m", "rmm.examples", str(tmp), str(final_base_dir), json.dumps(spec)] + (
        [] if progress else ["--quiet"]
    )
    subprocess.run(argv, env=os.environ | PORTABLE_KERNELS, check=True)


def _main(argv: list[str]) -> None:
    """The training process of `_train_all`: TMP FINAL_BASE_DIR SPEC_JSON [--quiet]."""
    tmp, final_base_dir, spec = Path(argv[0]), Path(argv[1]), json.loads(argv[2])
    torch.use_deterministic_algorithms(True)
    with _cpu_quietly():
        torch.manual_seed(spec["train"]["seed"])
        LlamaForSequenceClassification(LlamaConfig(**spec["model"])).save_pretrained(tmp / "base")
        columns = (
            TextColumn("{task.fields[name]:>14}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.3f}"),
            TimeElapsedColumn(),
        )
        with Progress(*columns, disable="--quiet" in argv) as bars:
            for task in spec["tasks"]:
                bar = bars.add_task("", total=spec["train"]["steps"], name=task, loss=float("nan"))
                _train(
                    tmp / "base",
                    task,
                    tmp / "adapters" / task,
                    final_base_dir,
                    spec,
                    lambda step, loss: bars.update(bar, completed=step, loss=loss),
                )


def _train(base_dir: Path, task: str, out_dir: Path, final_base_dir: Path, spec: dict, report) -> None:
    """Fit one LoRA adapter (and its head) on `task`; save it as a PEFT directory."""
    train = spec["train"]
    torch.manual_seed(_seed(train["seed"], task, "init"))  # LoRA init and head init
    model = get_peft_model(AutoModelForSequenceClassification.from_pretrained(base_dir), LoraConfig(**spec["lora"]))
    # Point the adapter at where the base will live after the rename, not at the temp folder.
    model.peft_config["default"].base_model_name_or_path = str(final_base_dir)
    steps, bs = train["steps"], train["batch_size"]
    x, y = dataset(task, steps * bs, split="train", seed=train["seed"])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=train["lr"], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, train["lr"], total_steps=steps, pct_start=0.1)
    model.train()
    for step in range(steps):
        batch = slice(step * bs, (step + 1) * bs)
        loss = model(input_ids=x[batch], labels=y[batch]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        if step % 20 == 19 or step == steps - 1:
            report(step + 1, loss.item())
    model.save_pretrained(out_dir, save_embedding_layers=False)  # else PEFT may look the base up on the Hub


# --- evaluation --------------------------------------------------------------------------------


def evaluate(base_dir, adapter_dir, task: str, n: int = EVAL_N, head_only: bool = False) -> float:
    """Accuracy of the adapter on the held-out set of `task` (deterministic).

    `head_only=True` zeroes every lora_B first (so dW = 0) while keeping the trained classifier
    head: the gap to the full accuracy is what the LoRA weights themselves contribute.
    """
    with _cpu_quietly(), torch.inference_mode():
        base = AutoModelForSequenceClassification.from_pretrained(base_dir)
        model = PeftModel.from_pretrained(base, adapter_dir).eval()
        if head_only:
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.zero_()
        x, y = dataset(task, n, split="eval")
        return (model(input_ids=x).logits.argmax(-1) == y).float().mean().item()


if __name__ == "__main__":
    _main(sys.argv[1:])
