"""PT-SVD extraction: a fully fine-tuned checkpoint -> PEFT LoRA adapter, checked on dW and logits."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file, save_file
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Model,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
)
from transformers.pytorch_utils import Conv1D

from conftest import GPT2_SIZE, LLAMA_SIZE
from rmm.adapter import PREFIX, open_adapter
from rmm.errors import RMMError
from rmm.extract import extract

LLAMA = LLAMA_SIZE | {"pad_token_id": 0}
GPT2 = GPT2_SIZE | {"bos_token_id": 0, "eos_token_id": 0}
TRUE_RANK = 3
LLAMA_LINEARS = [
    f"model.layers.{i}.{m}"
    for i in range(2)
    for m in (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    )
] + ["lm_head"]


def _perturb(model: torch.nn.Module, seed: int, *, norm: bool = False, only=None) -> dict[str, torch.Tensor]:
    """Add a rank-3 delta to every Linear / Conv1D weight (optionally a LayerNorm change too).

    Returns each module's delta in out x in layout (the LoRA layout).
    """
    gen = torch.Generator().manual_seed(seed)
    deltas = {}
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, (torch.nn.Linear, Conv1D)) and (only is None or name.endswith(only)):
                out_f, in_f = mod.weight.shape if isinstance(mod, torch.nn.Linear) else mod.weight.shape[::-1]
                delta = (
                    0.05 * torch.randn(out_f, TRUE_RANK, generator=gen) @ torch.randn(TRUE_RANK, in_f, generator=gen)
                )
                mod.weight += delta if isinstance(mod, torch.nn.Linear) else delta.T
                deltas[name] = delta
        if norm:
            model.model.layers[0].input_layernorm.weight += 0.1
    return deltas


def _lora_dw(out_dir: Path) -> dict[str, torch.Tensor]:
    """Per module name, s * B @ A read straight from the adapter's files (out x in)."""
    config = json.loads((out_dir / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    w = load_file(out_dir / "adapter_model.safetensors")
    return {
        k[len(PREFIX) : -len(".lora_A.weight")]: scale * w[k.replace("lora_A", "lora_B")].double() @ w[k].double()
        for k in w
        if k.endswith(".lora_A.weight")
    }


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: multi-threaded LAPACK calls are slower than one thread on a busy 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


IDS = torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """Base; `ft`: only Linear weights changed (rank 3 each); `ft_norm`: same plus a changed RMSNorm."""
    root = tmp_path_factory.mktemp("extract_llama")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA)).eval()
    model.save_pretrained(root / "base")
    deltas = _perturb(model, seed=1)
    model.save_pretrained(root / "ft")
    model.model.layers[0].input_layernorm.weight.data += 0.1
    model.save_pretrained(root / "ft_norm")
    model.model.layers[0].input_layernorm.weight.data -= 0.1
    return root, model, deltas


def test_llama_exact_when_rank_covers_delta(llama, tmp_path):
    root, ft_model, deltas = llama
    out = tmp_path / "adapter"
    summary = extract(root / "base", root / "ft", rank=TRUE_RANK + 1, out_dir=out, progress=False)

    assert sorted(summary["modules"]) == sorted(LLAMA_LINEARS)
    assert summary["skipped"] == {} and summary["task_type"] == "CAUSAL_LM" and not summary["fan_in_fan_out"]
    for info in summary["modules"].values():
        assert info["rel_error"] < 1e-6 and info["energy_kept"] == pytest.approx(1.0)

    dw = _lora_dw(out)
    assert set(dw) == set(deltas)
    for name, delta in deltas.items():
        torch.testing.assert_close(dw[name], delta.double(), atol=1e-6, rtol=0, msg=name)

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == config["lora_alpha"] == TRUE_RANK + 1
    assert config["target_modules"] == sorted(LLAMA_LINEARS)
    assert config["base_model_name_or_path"] == str(root / "base")
    LoraConfig.from_pretrained(str(out))  # a valid PEFT config
    assert set(open_adapter(out).modules) == {PREFIX + n for n in LLAMA_LINEARS}  # and our own reader agrees

    peft_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(root / "base").eval(), out).eval()
    torch.testing.assert_close(_logits(peft_model, IDS), _logits(ft_model, IDS), atol=1e-4, rtol=0)


def test_sharded_checkpoint_gives_same_adapter(llama, tmp_path):
    root, ft_model, _ = llama
    sharded = tmp_path / "ft_sharded"
    ft_model.save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file() and not (sharded / "model.safetensors").exists()
    extract(root / "base", root / "ft", 4, tmp_path / "a", progress=False)
    extract(root / "base", sharded, 4, tmp_path / "b", progress=True)  # the rich bar, once
    a, b = load_file(tmp_path / "a/adapter_model.safetensors"), load_file(tmp_path / "b/adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gpt2_conv1d_fan_in_fan_out(tmp_path):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**GPT2)).eval()
    model.save_pretrained(tmp_path / "base")
    deltas = _perturb(model, seed=2)
    deltas.pop("lm_head")  # tied to wte: not a stored weight, and its perturbation changed wte...
    with torch.no_grad():  # ...so undo it: only the Conv1D layers differ from the base
        model.lm_head.weight.copy_(GPT2LMHeadModel.from_pretrained(tmp_path / "base").lm_head.weight)
    model.save_pretrained(tmp_path / "ft")
    out = tmp_path / "adapter"
    summary = extract(tmp_path / "base", tmp_path / "ft", rank=TRUE_RANK, out_dir=out, progress=False)

    assert summary["fan_in_fan_out"] and summary["skipped"] == {}
    assert {m["layer"] for m in summary["modules"].values()} == {"Conv1D"}
    assert sorted(summary["modules"]) == sorted(deltas)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and config["task_type"] == "CAUSAL_LM"
    dw = _lora_dw(out)
    for name, delta in deltas.items():  # LoRA layout is out x in although Conv1D stores in x out
        torch.testing.assert_close(dw[name], delta.double(), atol=1e-6, rtol=0, msg=name)

    peft_model = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tmp_path / "base").eval(), out).eval()
    torch.testing.assert_close(_logits(peft_model, IDS), _logits(model, IDS), atol=1e-4, rtol=0)


def test_gpt2_checkpoint_without_base_model_prefix(tmp_path):
    """Hub GPT-2 checkpoints store "h.0..." (saved from GPT2Model); adapters must name "transformer.h.0..."."""
    torch.manual_seed(0)
    model = GPT2Model(GPT2Config(**GPT2)).eval()
    for name in ("base", "ft"):
        if name == "ft":
            _perturb(model, seed=3, only="c_fc")
        model.save_pretrained(tmp_path / name)
        cfg = json.loads((tmp_path / name / "config.json").read_text())
        (tmp_path / name / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"]}))
    assert "h.0.mlp.c_fc.weight" in load_file(tmp_path / "ft/model.safetensors")
    summary = extract(tmp_path / "base", tmp_path / "ft", 3, tmp_path / "adapter", progress=False)
    assert sorted(summary["modules"]) == ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"]

    ft = GPT2LMHeadModel.from_pretrained(tmp_path / "ft").eval()
    peft_model = PeftModel.from_pretrained(
        GPT2LMHeadModel.from_pretrained(tmp_path / "base").eval(), tmp_path / "adapter"
    )
    torch.testing.assert_close(_logits(peft_model.eval(), IDS), _logits(ft, IDS), atol=1e-4, rtol=0)


def test_error_below_true_rank_is_reported_exactly(llama, tmp_path):
    root, _, _ = llama
    out = tmp_path / "adapter"
    summary = extract(root / "base", root / "ft", rank=1, out_dir=out, progress=False)
    base, ft = load_file(root / "base/model.safetensors"), load_file(root / "ft/model.safetensors")
    deltas = {n: ft[n + ".weight"].double() - base[n + ".weight"].double() for n in LLAMA_LINEARS}
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 1

    dw = _lora_dw(out)
    for name, delta in deltas.items():
        info = summary["modules"][name]
        actual = (torch.linalg.matrix_norm(delta - dw[name]) / torch.linalg.matrix_norm(delta)).item()
        s2 = torch.linalg.svdvals(delta).square()
        discarded = math.sqrt(s2[1:].sum().item() / s2.sum().item())
        assert 0.05 < info["rel_error"] < 1  # a real truncation, not a trivial case
        assert info["rel_error"] == pytest.approx(actual, rel=1e-4), name
        assert info["rel_error"] == pytest.approx(discarded, rel=1e-9), name
        assert info["energy_kept"] == pytest.approx(s2[0].item() / s2.sum().item(), rel=1e-9)
        # Eckart-Young: the best rank-1 approximation, i.e. the top singular triple of the delta
        torch.testing.assert_close(torch.linalg.svdvals(dw[name])[0], s2[0].sqrt(), rtol=1e-5, atol=0)


def test_target_modules_and_skipped_norm(llama, tmp_path):
    root, _, _ = llama
    out = tmp_path / "adapter"
    summary = extract(root / "base", root / "ft_norm", 4, out, target_modules=["q_proj", "v_proj"], progress=False)
    want = sorted(f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj"))
    assert sorted(summary["modules"]) == want
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] == want
    assert sorted(_lora_dw(out)) == want
    skipped = summary["skipped"]
    assert "RMSNorm" in skipped["model.layers.0.input_layernorm.weight"]
    assert "target_modules" in skipped["model.layers.0.self_attn.k_proj.weight"]
    assert "model.layers.1.input_layernorm.weight" not in skipped  # unchanged: not reported

    default = extract(root / "base", root / "ft_norm", 4, tmp_path / "all", progress=False)
    assert sorted(default["modules"]) == sorted(LLAMA_LINEARS)
    assert list(default["skipped"]) == ["model.layers.0.input_layernorm.weight"]


def test_unchanged_modules(llama, tmp_path):
    root, _, _ = llama
    with pytest.raises(RMMError, match="none changed"):  # nothing to extract by default
        extract(root / "base", root / "base", 2, tmp_path / "none", progress=False)
    assert not (tmp_path / "none").exists()
    # Asked for explicitly, unchanged modules get zero factors (same module set for every task).
    summary = extract(root / "base", root / "base", 2, tmp_path / "zero", target_modules=["lm_head"], progress=False)
    assert summary["modules"]["lm_head"]["rel_error"] == 0.0
    assert not _lora_dw(tmp_path / "zero")["lm_head"].any()


def test_seq_cls_head_saved_whole(tmp_path):
    """PEFT never puts LoRA on a SEQ_CLS head (it is modules_to_save): the changed head is stored whole."""
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(**LLAMA, num_labels=3)).eval()
    model.save_pretrained(tmp_path / "base")
    _perturb(model, seed=4)
    model.save_pretrained(tmp_path / "ft")
    summary = extract(tmp_path / "base", tmp_path / "ft", 3, tmp_path / "adapter", progress=False)
    assert summary["task_type"] == "SEQ_CLS" and summary["modules_to_save"] == ["score"]
    assert "score" not in summary["modules"]
    base = LlamaForSequenceClassification.from_pretrained(tmp_path / "base").eval()
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter")
    torch.testing.assert_close(_logits(peft_model.eval(), IDS), _logits(model, IDS), atol=1e-4, rtol=0)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_bad_inputs_raise_and_write_nothing(llama, tmp_path):
    root, _, _ = llama
    out = tmp_path / "out"

    def refused(base, ft, match, **kw):
        with pytest.raises(RMMError, match=match) as info:
            extract(base, ft, kw.pop("rank", 2), out, progress=False, **kw)
        assert not out.exists()
        return info.value

    no_cfg = _copy(root / "base", tmp_path / "no_cfg")
    (no_cfg / "config.json").unlink()
    err = refused(no_cfg, root / "ft", "config.json")
    assert str(err.file) == str(no_cfg / "config.json")

    bad_shape = _copy(root / "ft", tmp_path / "bad_shape")
    tensors = load_file(bad_shape / "model.safetensors")
    key = "model.layers.1.self_attn.q_proj.weight"
    tensors[key] = tensors[key][:16].contiguous()
    save_file(tensors, bad_shape / "model.safetensors", metadata={"format": "pt"})
    err = refused(root / "base", bad_shape, "q_proj.weight.*shape")
    assert str(err.file) == str(bad_shape / "model.safetensors")

    missing = _copy(root / "ft", tmp_path / "missing")
    tensors.pop(key)
    save_file(tensors, missing / "model.safetensors", metadata={"format": "pt"})
    refused(root / "base", missing, "q_proj.weight.*missing")

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(root / "ft" / "config.json", pickled)
    torch.save(load_file(root / "ft" / "model.safetensors"), pickled / "pytorch_model.bin")
    err = refused(root / "base", pickled, "pickle")
    assert str(err.file) == str(pickled / "pytorch_model.bin")

    corrupt = _copy(root / "ft", tmp_path / "corrupt")
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 5)
    refused(root / "base", corrupt, "unreadable safetensors")

    refused(root / "base", root / "ft", "matches no module", target_modules=["nope"])
    refused(root / "base", root / "ft", "LlamaRMSNorm", target_modules=["input_layernorm"])
    refused(root / "base", root / "ft", "rank", rank=0)


def test_randomized_svd_path_reports_true_error(monkeypatch):
    """Large matrices use a seeded randomized SVD; its reported error is still the actual one."""
    import rmm.extract as ex

    monkeypatch.setattr(ex, "FULL_SVD_MAX", 100)
    gen = torch.Generator().manual_seed(7)
    U, _ = torch.linalg.qr(torch.randn(300, 40, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(200, 40, generator=gen))
    S = 0.8 ** torch.arange(40.0)  # decaying spectrum, as fine-tuning deltas have
    base = torch.randn(300, 200, generator=gen)
    ft = base + (U * S) @ V.T
    (B, A), info = ex._extract_one(base, ft, 5, "Linear", explicit=False, file="f", module="m")
    again, _ = ex._extract_one(base, ft, 5, "Linear", explicit=False, file="f", module="m")
    assert info["svd"] == "randomized" and B.shape == (300, 5) and A.shape == (5, 200)
    assert torch.equal(again[0], B)  # fixed seed: deterministic
    delta = (ft - base).double()
    actual = (torch.linalg.matrix_norm(delta - B.double() @ A.double()) / torch.linalg.matrix_norm(delta)).item()
    best = math.sqrt(S[5:].square().sum().item() / S.square().sum().item())
    assert info["rel_error"] == pytest.approx(actual, rel=1e-4)
    assert info["rel_error"] == pytest.approx(best, rel=1e-3)  # as good as the exact truncation


def test_cli_extract_then_merge_reverts_the_extracted_adapters(llama, tmp_path, capsys):
    from rmm.cli import main
    from rmm.bundle import MergeOptions
    from rmm.merge import merge, revert

    root, _, deltas = llama
    outs = []
    for ft, rank in (("ft", TRUE_RANK), ("ft_norm", TRUE_RANK - 1)):
        out = tmp_path / f"{ft}_r{rank}"
        assert (
            main(
                [
                    "extract",
                    "--base",
                    str(root / "base"),
                    "--finetuned",
                    str(root / ft),
                    "--rank",
                    str(rank),
                    "--out",
                    str(out),
                    "--json",
                ]
            )
            == 0
        )
        summary = json.loads(capsys.readouterr().out)
        assert summary["r"] == rank and (ft == "ft") == (summary["skipped"] == {})
        outs.append(out)
    merge(outs, tmp_path / "bundle", MergeOptions(basis_size=1), progress=False)
    revert(tmp_path / "bundle", tmp_path / "rev", progress=False)
    for out in outs:  # two tasks: p = 1 = T - 1 reverts exactly, ranks 3 and 2 padded to 3
        want, got = _lora_dw(out), _lora_dw(tmp_path / "rev" / out.name)
        for name in deltas:
            torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_extract_on_cuda_is_the_cpu_extract(llama, tmp_path):
    """`--device cuda`: the same SVDs on the GPU (full and randomized), the same adapter to float64 precision."""
    root, _, _ = llama
    got = extract(root / "base", root / "ft", rank=2, out_dir=tmp_path / "gpu", progress=False, device="cuda")
    want = extract(root / "base", root / "ft", rank=2, out_dir=tmp_path / "cpu", progress=False, device="cpu")
    for name, info in want["modules"].items():
        assert got["modules"][name]["rel_error"] == pytest.approx(info["rel_error"], rel=1e-6, abs=1e-9)
    dw_gpu, dw_cpu = _lora_dw(tmp_path / "gpu"), _lora_dw(tmp_path / "cpu")
    for name, dw in dw_cpu.items():
        torch.testing.assert_close(dw_gpu[name], dw, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is here")
def test_extract_asked_for_cuda_without_a_gpu_refuses_in_one_line(llama, tmp_path):
    root, _, _ = llama
    args = ["extract", "--base", str(root / "base"), "--finetuned", str(root / "ft"), "--rank", "2"]
    done = subprocess.run(
        [sys.executable, "-m", "rmm.cli", *args, "--out", str(tmp_path / "a"), "--device", "cuda"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "no CUDA GPU" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "a").exists()
