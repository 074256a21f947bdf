"""Shared fixtures: tiny base models built from configs and real PEFT adapters saved by PEFT."""

from __future__ import annotations

import json
import os
import zlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()
torch.set_num_threads(min(2, os.cpu_count() or 1))

LLAMA_SIZE = dict(  # the tiny models every test builds (test_extract adds its special tokens)
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=32,
)
GPT2_SIZE = dict(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32)
LLAMA = LlamaConfig(**LLAMA_SIZE)
GPT2 = GPT2Config(**GPT2_SIZE)


def _save_base(cls, config, path: Path) -> Path:
    torch.manual_seed(0)
    cls(config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def llama_base(tmp_path_factory) -> Path:
    return _save_base(LlamaForCausalLM, LLAMA, tmp_path_factory.mktemp("llama_base"))


@pytest.fixture(scope="session")
def gpt2_base(tmp_path_factory) -> Path:
    return _save_base(GPT2LMHeadModel, GPT2, tmp_path_factory.mktemp("gpt2_base"))


def load_base(base: Path):
    cls = GPT2LMHeadModel if "gpt2" in base.name else LlamaForCausalLM
    return cls.from_pretrained(base).eval()


def make_adapter(base: Path, out: Path, *, seed: int, shared: float = 0.0, **lora) -> Path:
    """A real PEFT LoRA adapter: PEFT builds and saves it; its weights are random (B too, not 0).

    `shared` scales a component common to all adapters (seeded by parameter name), so that tasks
    share structure as fine-tunes of one base do.
    """
    lora.setdefault("r", 4)
    lora.setdefault("lora_alpha", 8)
    lora.setdefault("target_modules", ["q_proj", "v_proj", "down_proj"])
    model = get_peft_model(load_base(base), LoraConfig(**lora))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
                common = torch.Generator().manual_seed(zlib.crc32(name.encode()))
                p.add_(torch.randn(p.shape, generator=common) * shared)
    model.save_pretrained(out)
    return out


def file_deltas(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """dW per module straight from an adapter's files, float64: (lora_alpha / r) lora_B lora_A. An answer computed
    apart from rmm's adapter reading, for adapters without rslora or rank / alpha patterns."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert not config.get("rank_pattern") and not config.get("alpha_pattern") and not config.get("use_rslora")
    w = {k: v.double() for k, v in load_file(adapter_dir / "adapter_model.safetensors").items()}
    s = config["lora_alpha"] / config["r"]
    return {
        k.removesuffix(".lora_A.weight"): s * w[k.replace("lora_A", "lora_B")] @ w[k]
        for k in w
        if k.endswith(".lora_A.weight")
    }


@pytest.fixture(scope="session")
def adapters(llama_base, tmp_path_factory) -> list[Path]:
    """Five rank-4 adapters on the tiny Llama, saved by PEFT."""
    root = tmp_path_factory.mktemp("adapters")
    return [make_adapter(llama_base, root / f"task{t}", seed=t) for t in range(5)]


@pytest.fixture(scope="session")
def ray_cluster():
    """One embedded Ray for the whole session (ray.init costs seconds)."""
    import ray

    from workers.site import ensure_ray

    ensure_ray()
    yield ray
    ray.shutdown()
