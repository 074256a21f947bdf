"""Benchmark suites of real LoRA adapters, trained here on the documentation text that ships with Python.

The text is `pydoc_data.topics.topics` (about 80 topics, 465k characters), so nothing is downloaded.
The base is a tiny character-level Llama (`LlamaForCausalLM` from a config, 97 symbols), pretrained
briefly on the plain text of the training topics: a weak language model of English technical prose.
A *family* is a text transformation the base has never seen (upper case, rot13, words spelled
backwards, vowels dropped, lines written right to left, pig latin, ...); an adapter for a family is a
PEFT LoRA (r = 8 on every linear projection of the blocks) trained on the transformed training text.
The metric is next-character top-1 accuracy on held-out topics (disjoint from every training topic)
under that family's transformation: deterministic, and the base alone is far below every adapter.

    suite = build_suite("few")                          # trains once (~4 min on one core), then cached
    evaluate(suite, None, "rot13")                      # the base alone: 0.147
    evaluate(suite, suite.adapters["rot13"], "rot13")   # its adapter: 0.537

    python -m benchmarks.quality.suites few many        # from the repository root: build, print the table

Suites (`SUITES`):
  few     one adapter for each of 6 different families;
  many    8 families x 4 variants = 32 adapters; the variants of a family differ the way customers'
          adapters do: training-topic subsets, seeds, learning rates and step counts;
  hetero  the 6 families of *few* with heterogeneous LoRA configs: r = 4, 16, 8, 16, 4, 8, two of
          them (r = 16 and r = 8) with `use_rslora=True` (scaling alpha / sqrt(r));
  pt-svd  the 6 families of *few* as full fine-tunes (every weight of the 7 projections of the blocks
          trained; embeddings, norms and head frozen, so the delta is all LoRA can express), each
          compressed to a rank-8 PEFT LoRA with `rmm.extract.extract` (PT-SVD). The suite's adapter
          is the extracted one; the fine-tuned model stays in `Suite.full` (`evaluate` takes it too),
          so `report` shows what the extraction loses.
  released  customers fine-tuning one released adapter: a multi-task LoRA trained on a mix of all 8
          families (topic i under family i mod 8) is published; 8 families x 2 customers each start
          from it and train on their own family (other topic halves, seeds, learning rates), 16
          adapters. Where adapters share that much, sharing should pay.
  encoder, encoder-few  sentence classifiers on a real pretrained encoder (MiniLM), each with its own head:
          8 families x 4 variants = 32 adapters, and 4 families x 1; see `benchmarks.quality.encoder`.
Every adapter in a spec is one dict (`kind`, `family`, `topics`, `seed`, `lr`, `steps`, then `lora` for
kind "lora", `extract` (rank, target modules) for kind "full").

Cache: `cache_dir`, else `$RMM_QUALITY_CACHE_DIR`, else `.cache/quality`. The base lives in
`<root>/base/<hash of its spec>` (shared by every suite, so adapters of different suites share one
base), each suite in `<root>/<suite>/<hash of its whole spec>`; both are built in a temporary sibling
folder renamed into place at the end, so an interrupted build leaves nothing half-written.
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.quality import encoder
from rmm.examples import _cpu_quietly, _seed
from rmm.io import atomic_dir

# Bump when the text, the transformations, the training loop or the metric change: the hashes only
# see the spec dicts.
FORMAT = 1

# --- text and symbols -----------------------------------------------------------------------------

# 0 = any character outside the alphabet (rare: a few non-ASCII symbols), 1 = newline, then printable ASCII.
ALPHABET = "\n" + "".join(chr(c) for c in range(32, 127))
VOCAB = len(ALPHABET) + 1
_INDEX = {ch: i + 1 for i, ch in enumerate(ALPHABET)}
CTX = 128  # characters per training / evaluation window


def _topics() -> dict[str, str]:
    from pydoc_data.topics import topics

    return {name: topics[name].replace("\t", "    ") for name in sorted(topics)}


def topic_split() -> tuple[list[str], list[str]]:
    """(training topics, held-out topics): every 4th topic in name order is held out."""
    names = list(_topics())
    return [n for i, n in enumerate(names) if i % 4 != 3], [n for i, n in enumerate(names) if i % 4 == 3]


def encode(text: str) -> torch.Tensor:
    return torch.tensor([_INDEX.get(ch, 0) for ch in text], dtype=torch.long)


def decode(ids) -> str:
    return "".join(ALPHABET[i - 1] if i > 0 else "?" for i in ids)


# --- families: transformations of the text a base model cannot know ---------------------------------

_WORD = re.compile(r"[A-Za-z]+")
_VOWELS = re.compile(r"[aeiouAEIOU]")
_ATBASH = str.maketrans(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "zyxwvutsrqponmlkjihgfedcbaZYXWVUTSRQPONMLKJIHGFEDCBA",
)


def _pig_latin(word: str) -> str:
    return word[1:] + word[0] + "ay" if len(word) > 1 else word


TRANSFORMS: dict[str, Callable[[str], str]] = {
    "upper": str.upper,
    "rot13": lambda t: codecs.encode(t, "rot13"),
    "reverse_words": lambda t: _WORD.sub(lambda m: m.group()[::-1], t),
    "no_vowels": lambda t: _VOWELS.sub("", t),
    "reverse_lines": lambda t: "\n".join(line[::-1] for line in t.split("\n")),
    "pig_latin": lambda t: _WORD.sub(lambda m: _pig_latin(m.group()), t),
    "double": lambda t: _WORD.sub(lambda m: "".join(c + c for c in m.group()), t),
    "atbash": lambda t: t.translate(_ATBASH),
}
FAMILIES = tuple(TRANSFORMS)
MIX = "mix"  # every family, a topic each: the training text of *released*'s published adapter


@functools.lru_cache(maxsize=64)
def corpus(family: str | None, topics: tuple[str, ...]) -> torch.Tensor:
    """The given topics, transformed by `family` (None: plain text), encoded and joined by blank lines."""
    text = _topics()
    if family == MIX:  # topic i under family i mod 8: the released adapter's multi-task text
        return encode("\n\n".join(TRANSFORMS[FAMILIES[i % len(FAMILIES)]](text[name]) for i, name in enumerate(topics)))
    f = TRANSFORMS[family] if family else (lambda t: t)
    return encode("\n\n".join(f(text[name]) for name in topics))


def topic_subset(part: int, parts: int) -> tuple[str, ...]:
    """The training topics with index % parts == part (part 0 of 1 = all of them)."""
    train, _ = topic_split()
    return tuple(n for i, n in enumerate(train) if i % parts == part)


@functools.lru_cache(maxsize=64)
def eval_windows(family: str | None, n: int) -> torch.Tensor:
    """`n` windows of CTX + 1 characters, evenly spaced over the held-out topics under `family`."""
    _, held_out = topic_split()
    return _spaced(corpus(family, tuple(held_out)), n, CTX + 1)


def _spaced(ids: torch.Tensor, n: int, length: int) -> torch.Tensor:
    """`n` windows of `length` ids, evenly spaced over `ids`."""
    starts = torch.linspace(0, len(ids) - length - 1, n).long()
    return torch.stack([ids[s : s + length] for s in starts.tolist()])


# --- specs ----------------------------------------------------------------------------------------

EXTRACT_RANK = 8  # *pt-svd*: rank of the LoRA extracted from each full fine-tune

MODEL = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=192,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=CTX,
    tie_word_embeddings=False,
)
BASE_TRAIN = dict(steps=600, batch_size=32, lr=3e-3, seed=0)
LORA = dict(
    task_type="CAUSAL_LM",
    r=8,
    lora_alpha=16,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
)
ADAPTER_TRAIN = dict(steps=300, batch_size=32, lr=5e-3)
# *pt-svd*: full fine-tunes move every projection weight: a lower rate than LoRA's, fewer steps. (Rank-8
# PT-SVD of a 64-wide model keeps about half the gain whatever the rate / steps; 150 steps at 2e-3 kept most.)
FULL_TRAIN = dict(steps=150, batch_size=32, lr=2e-3)
EVAL_N = 64  # windows: 64 x 128 = 8192 scored characters per evaluation


def _adapter(family: str, *, part=0, parts=1, seed=0, lr=None, steps=None, lora=None, kind="lora", start=None) -> dict:
    if kind == "full":  # full fine-tune of the projections, then PT-SVD to rank EXTRACT_RANK
        return dict(
            kind=kind,
            family=family,
            topics=[part, parts],
            seed=seed,
            lr=lr or FULL_TRAIN["lr"],
            steps=steps or FULL_TRAIN["steps"],
            batch_size=FULL_TRAIN["batch_size"],
            extract=dict(rank=EXTRACT_RANK, target_modules=list(LORA["target_modules"])),
        )
    if kind != "lora":
        raise ValueError(f"unknown adapter kind {kind!r}")
    spec = dict(
        kind=kind,
        family=family,
        topics=[part, parts],
        seed=seed,
        lr=lr or ADAPTER_TRAIN["lr"],
        steps=steps or ADAPTER_TRAIN["steps"],
        batch_size=ADAPTER_TRAIN["batch_size"],
        lora=dict(LORA, **(lora or {})),
    )
    return spec | ({"start": start} if start else {})  # start: train from the suite's released adapter


FEW_FAMILIES = ("upper", "rot13", "reverse_words", "no_vowels", "reverse_lines", "pig_latin")
# Four customers per family: all topics, or half / a third of them, other seeds, other learning rates.
# Fewer steps than *few* (200 on average, not 300) keep 32 adapters near 14 minutes on one core.
MANY_VARIANTS = (
    dict(part=0, parts=1, seed=0, steps=200),
    dict(part=0, parts=2, seed=1, lr=3e-3, steps=200),
    dict(part=1, parts=2, seed=2, lr=8e-3, steps=160),
    dict(part=2, parts=3, seed=3, steps=240),
)


# *released*: two customers per family fine-tune the published multi-task adapter (itself 300 steps).
RELEASED_VARIANTS = (
    dict(part=0, parts=2, seed=0, lr=3e-3, steps=120),
    dict(part=1, parts=2, seed=1, lr=2e-3, steps=150),
)


# *hetero*: the i-th family gets the i-th LoRA config (a reduced suite with 2 families keeps r = 4 and
# an rslora r = 16). lora_alpha stays 16, so the scalings are 4, 4 (rslora), 2, 1, 4, 5.7 (rslora).
HETERO_LORA = (
    dict(r=4),
    dict(r=16, use_rslora=True),
    dict(r=8),
    dict(r=16),
    dict(r=4),
    dict(r=8, use_rslora=True),
)


def suite_spec(
    name: str, families=None, adapter_steps: int | None = None, base_steps: int | None = None, eval_n: int | None = None
) -> dict:
    """The full spec of suite `name`; the keyword arguments shrink it (tests use them)."""
    if name in ENCODER_SUITES:
        return encoder.suite_spec(name, families, adapter_steps=adapter_steps, eval_n=eval_n)
    if name == "few":
        adapters = {f: _adapter(f) for f in families or FEW_FAMILIES}
    elif name == "hetero":
        fams = families or FEW_FAMILIES
        if len(fams) > len(HETERO_LORA):
            raise ValueError(f"hetero has LoRA configs for {len(HETERO_LORA)} families, got {len(fams)}")
        adapters = {f: _adapter(f, lora=lora) for f, lora in zip(fams, HETERO_LORA)}
    elif name == "pt-svd":
        adapters = {f: _adapter(f, kind="full") for f in families or FEW_FAMILIES}
    elif name == "many":
        adapters = {f"{f}-{i}": _adapter(f, **v) for f in families or FAMILIES for i, v in enumerate(MANY_VARIANTS)}
    elif name == "released":
        adapters = {
            f"{f}-{i}": _adapter(f, start="released", **v)
            for f in families or FAMILIES
            for i, v in enumerate(RELEASED_VARIANTS)
        }
    else:
        raise ValueError(f"unknown suite {name!r}; choose from {SUITES}")
    released = {"released": _adapter(MIX)} if name == "released" else {}  # trained first, not scored
    if adapter_steps:
        for a in (*adapters.values(), *released.values()):
            a["steps"] = adapter_steps
    base = dict(
        format=FORMAT,
        model=MODEL,
        train=dict(BASE_TRAIN, steps=base_steps or BASE_TRAIN["steps"]),
        topics=list(topic_split()[0]),
        ctx=CTX,
    )
    return dict(format=FORMAT, suite=name, base=base, adapters=adapters, eval_n=eval_n or EVAL_N) | (
        {"published": released} if released else {}
    )


ENCODER_SUITES = ("encoder", "encoder-few")
SUITES = ("few", "many", "hetero", "pt-svd", "released", *ENCODER_SUITES)


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


# --- building -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Suite:
    """Where a built suite is; every path exists when build_suite returns."""

    name: str
    base_dir: Path  # LlamaForCausalLM directory, loadable with from_pretrained
    adapters: dict[str, Path]  # adapter name -> PEFT adapter directory named after it
    task_of: dict[str, str]  # adapter name -> the evaluation task (family) it was trained for
    spec: dict = field(repr=False)
    # kind "full" adapters: name -> the fine-tuned LlamaForCausalLM directory the adapter was extracted from
    full: dict[str, Path] = field(default_factory=dict, repr=False)

    @property
    def tasks(self) -> list[str]:
        """Evaluation tasks, in first-seen order."""
        return list(dict.fromkeys(self.task_of.values()))

    @property
    def root(self) -> Path:
        """The suite's own cache folder (adapters, scores, calibration data)."""
        return self.adapters[next(iter(self.adapters))].parent.parent


def _root(cache_dir) -> Path:
    return Path(cache_dir or os.environ.get("RMM_QUALITY_CACHE_DIR") or ".cache/quality").resolve()


def build_suite(name: str, cache_dir=None, progress: bool = True, spec: dict | None = None) -> Suite:
    """Train (or load from cache) the base and every adapter of suite `name` (or of `spec`)."""
    spec = spec or suite_spec(name)
    root = _root(cache_dir)
    base_final = root / "base" / _hash(spec["base"])
    final = root / spec["suite"] / _hash(spec)
    suite = Suite(
        spec["suite"],
        base_final,
        {a: final / "adapters" / a for a in spec["adapters"]},
        {a: s["family"] for a, s in spec["adapters"].items()},
        spec,
        {a: final / "full" / a for a, s in spec["adapters"].items() if s["kind"] == "full"},
    )
    if final.is_dir() and base_final.is_dir():
        return suite
    if spec.get("kind") == "encoder":  # trained in a fresh process: no bars, a line per adapter
        new_base = not base_final.is_dir()
        with atomic_dir(final, keep_existing=True) as tmp, atomic_dir(base_final, keep_existing=True) as base_tmp:
            encoder.train(spec, base_tmp if new_base else None, tmp / "adapters", base_final, quiet=not progress)
            (tmp / "spec.json").write_text(json.dumps(spec, indent=2, sort_keys=True))
            (base_tmp / "spec.json").write_text(json.dumps(spec["base"], indent=2, sort_keys=True))
        return suite

    columns = (
        TextColumn("{task.fields[name]:>18}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TimeElapsedColumn(),
    )
    with _cpu_quietly(), Progress(*columns, disable=not progress) as bars:

        def bar(label, total):
            task = bars.add_task("", total=total, name=label, loss=float("nan"))
            return lambda step, loss: bars.update(task, completed=step, loss=loss)

        if not base_final.is_dir():
            with atomic_dir(base_final, keep_existing=True) as tmp:
                _train_base(spec["base"], tmp / "model", bar("base", spec["base"]["train"]["steps"]))
                (tmp / "spec.json").write_text(json.dumps(spec["base"], indent=2, sort_keys=True))
        if not final.is_dir():
            with atomic_dir(final, keep_existing=True) as tmp:
                for a, s in spec.get("published", {}).items():
                    _train_adapter(suite.base_dir, a, s, tmp / "published" / a, bar(a, s["steps"]))
                for a, s in spec["adapters"].items():
                    if s["kind"] == "full":
                        _train_full(suite.base_dir, a, s, tmp / "full" / a, tmp / "adapters" / a, bar(a, s["steps"]))
                    else:
                        _train_adapter(
                            suite.base_dir, a, s, tmp / "adapters" / a, bar(a, s["steps"]), tmp / "published"
                        )
                (tmp / "spec.json").write_text(json.dumps(spec, indent=2, sort_keys=True))
    return suite


def _batches(ids: torch.Tensor, steps: int, batch_size: int, seed: int):
    """`steps` batches of random CTX + 1 windows of `ids` (deterministic per seed)."""
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.arange(CTX + 1)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - CTX - 1, (batch_size,), generator=gen)
        yield ids[starts[:, None] + offsets]


def _fit(model, params, ids, steps, batch_size, lr, seed, report) -> None:
    """AdamW + OneCycle on next-character loss, one fresh batch per step."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    model.train()
    for step, x in enumerate(_batches(ids, steps, batch_size, seed)):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        sched.step()
        if step % 20 == 19 or step == steps - 1:
            report(step + 1, loss.item())
    model.eval()


def _train_base(base: dict, out_dir: Path, report) -> None:
    t = base["train"]
    torch.manual_seed(_seed(t["seed"], "base", "init"))
    model = LlamaForCausalLM(LlamaConfig(**base["model"]))
    ids = corpus(None, tuple(base["topics"]))
    seed = _seed(t["seed"], "base")
    _fit(model, list(model.parameters()), ids, t["steps"], t["batch_size"], t["lr"], seed, report)
    model.save_pretrained(out_dir)


def _train_adapter(base_dir: Path, name: str, s: dict, out_dir: Path, report, published: Path | None = None) -> None:
    """Fit one LoRA adapter on its family's transformed training topics; save it as a PEFT directory.
    With `start`, training starts from that published adapter (in `published`) instead of PEFT's init."""
    if s["kind"] != "lora":
        raise ValueError(f"adapter kind {s['kind']!r} is not a LoRA adapter")
    torch.manual_seed(_seed(s["seed"], name, "init"))
    base = LlamaForCausalLM.from_pretrained(base_dir / "model")
    if s.get("start"):
        model = PeftModel.from_pretrained(base, published / s["start"], is_trainable=True)
    else:
        model = get_peft_model(base, LoraConfig(**s["lora"]))
    model.peft_config["default"].base_model_name_or_path = str(base_dir / "model")
    ids = corpus(s["family"], topic_subset(*s["topics"]))
    params = [p for p in model.parameters() if p.requires_grad]
    _fit(model, params, ids, s["steps"], s["batch_size"], s["lr"], _seed(s["seed"], name, "data"), report)
    model.save_pretrained(out_dir, save_embedding_layers=False)  # else PEFT may look the base up on the Hub


def _train_full(base_dir: Path, name: str, s: dict, ft_dir: Path, out_dir: Path, report) -> None:
    """Fine-tune every weight of the target projections on the family's text (the rest frozen), save
    the model in `ft_dir`, and extract its rank-r PEFT LoRA into `out_dir` (summary in ft_dir/extract.json)."""
    from rmm.extract import extract

    torch.manual_seed(_seed(s["seed"], name, "init"))
    model = LlamaForCausalLM.from_pretrained(base_dir / "model")
    targets = tuple(s["extract"]["target_modules"])
    params = []
    for module_name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            p.requires_grad_(isinstance(module, torch.nn.Linear) and module_name.split(".")[-1] in targets)
            if p.requires_grad:
                params.append(p)
    ids = corpus(s["family"], topic_subset(*s["topics"]))
    _fit(model, params, ids, s["steps"], s["batch_size"], s["lr"], _seed(s["seed"], name, "data"), report)
    model.save_pretrained(ft_dir)
    summary = extract(
        base_dir / "model", ft_dir, s["extract"]["rank"], out_dir, target_modules=list(targets), progress=False
    )
    (ft_dir / "extract.json").write_text(json.dumps(summary, indent=2, sort_keys=True))


# --- evaluation -----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _base_state(base_dir: str):
    return LlamaForCausalLM.from_pretrained(base_dir).state_dict()


def accuracy(model, family: str, n: int = EVAL_N) -> float:
    """Next-character top-1 accuracy of a causal LM on the held-out topics under `family`."""
    x = eval_windows(family, n)
    with _cpu_quietly(), torch.inference_mode():
        logits = model(input_ids=x[:, :-1]).logits
    return (logits.argmax(-1) == x[:, 1:]).float().mean().item()


def load(suite: Suite, adapter_dir=None):
    """The base model (encoder suites: `encoder.load`), with the adapter in `adapter_dir` applied (PEFT)
    unless it is None; a full model directory (config.json, as in `suite.full`) is loaded as it is."""
    if suite.spec.get("kind") == "encoder":
        return encoder.load(suite.base_dir, adapter_dir)
    with _cpu_quietly():
        if adapter_dir is not None and (Path(adapter_dir) / "config.json").is_file():
            return LlamaForCausalLM.from_pretrained(adapter_dir).eval()
        model = LlamaForCausalLM(LlamaConfig(**suite.spec["base"]["model"]))
        model.load_state_dict(_base_state(str(suite.base_dir / "model")))
        if adapter_dir is not None:
            model = PeftModel.from_pretrained(model, adapter_dir)
    return model.eval()


def evaluate(suite: Suite, adapter_dir, task: str, head=None) -> float:
    """Accuracy of `adapter_dir` (None: the base alone) on evaluation task `task` (deterministic). Encoder
    suites: `head` is the adapter whose classifier to use (a single merged adapter carries none)."""
    if suite.spec.get("kind") == "encoder":
        return encoder.evaluate(suite.base_dir, adapter_dir, task, suite.spec["eval_n"], head=head)
    if task not in TRANSFORMS:
        raise ValueError(f"unknown task {task!r}; choose from {FAMILIES}")
    return accuracy(load(suite, adapter_dir), task, suite.spec["eval_n"])


CALIBRATION_N = 64  # examples per adapter for calibrated merges (`rmm merge --base --calibration`)


def calibration_dir(suite: Suite) -> Path:
    """`<suite root>/calibration/<adapter>.jsonl`, written once: CALIBRATION_N examples of each adapter's own training
    data, never the evaluation set, one `{"input_ids": [...]}` a line. LM suites: windows of CTX characters evenly
    spaced over the adapter's family text on its training topics; encoder suites: its training messages, unpadded
    (`encoder.calibration_ids`). The base to pass with it is `suite.base_dir / "model"`."""
    out = suite.root / "calibration"
    if out.is_dir():
        return out
    with atomic_dir(out, keep_existing=True) as tmp:
        for a, s in suite.spec["adapters"].items():
            if suite.spec.get("kind") == "encoder":
                rows = encoder.calibration_ids(s, CALIBRATION_N)
            else:
                rows = _spaced(corpus(s["family"], topic_subset(*s["topics"])), CALIBRATION_N, CTX).tolist()
            (tmp / f"{a}.jsonl").write_text("".join(json.dumps({"input_ids": x}) + "\n" for x in rows))
    return out


def baseline(suite: Suite, adapter: str) -> float:
    """The accuracy an adapter's gain is counted from: the base alone on its task; for encoder suites, whose
    base has no head for the task, the adapter's own head with the LoRA off (every lora_B zeroed)."""
    task = suite.task_of[adapter]
    if suite.spec.get("kind") == "encoder":
        return encoder.evaluate(suite.base_dir, suite.adapters[adapter], task, suite.spec["eval_n"], head_only=True)
    return evaluate(suite, None, task)


def report(suite: Suite) -> dict:
    """Per adapter: its task, the base's and the adapter's accuracy, the margin (and, for PT-SVD
    adapters, the full fine-tune's accuracy); and timings."""
    t0 = time.perf_counter()
    rows = {}
    for a, d in suite.adapters.items():
        t, base = suite.task_of[a], baseline(suite, a)
        acc = evaluate(suite, d, t)
        rows[a] = dict(task=t, base=base, adapter=acc, margin=acc - base)
        if a in suite.full:
            rows[a]["full"] = evaluate(suite, suite.full[a], t)
    return dict(rows=rows, eval_seconds=time.perf_counter() - t0)


if __name__ == "__main__":
    import argparse

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description="build a quality suite and print base vs adapter accuracy")
    parser.add_argument("suites", nargs="*", default=list(SUITES), choices=SUITES)
    parser.add_argument("--cache-dir")
    args = parser.parse_args()
    for name in args.suites:
        t0 = time.perf_counter()
        s = build_suite(name, args.cache_dir)
        built = time.perf_counter() - t0
        r = report(s)
        print(
            f"\n## {name}: {len(s.adapters)} adapters, build {built:.0f} s, "
            f"evaluation of all adapters {r['eval_seconds']:.1f} s\n"
        )
        full = bool(s.full)
        print(
            "| adapter | task | lora | base | adapter | margin |"
            + (" full fine-tune |" if full else "")
            + "\n|---|---|---|---:|---:|---:|"
            + ("---:|" if full else "")
        )
        for a, row in r["rows"].items():
            spec = s.spec["adapters"][a]
            lora = spec.get("lora") or dict(r=spec["extract"]["rank"])
            kind = f"r={lora['r']}" + (" rslora" if lora.get("use_rslora") else "") + (" pt-svd" if a in s.full else "")
            print(
                f"| {a} | {row['task']} | {kind} | {row['base']:.3f} | {row['adapter']:.3f} | {row['margin']:+.3f} |"
                + (f" {row['full']:.3f} |" if full else "")
            )
        print(f"\nsmallest margin: {min(row['margin'] for row in r['rows'].values()):+.3f}")
