"""Every refused input gets a one-line RMMError naming the file (and module) and why; nothing is written."""

import json
import shutil

import pytest
from peft import IA3Config, LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from conftest import LLAMA, load_base, make_adapter
from rmm.cli import main
from rmm.errors import RMMError
from rmm.merge import merge


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_config(path, **changes):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def _edit_weights(path, fn):
    file = path / "adapter_model.safetensors"
    tensors = load_file(file)
    fn(tensors)
    save_file(tensors, file)


def _peft_variant(base, out, config):
    get_peft_model(load_base(base), config).save_pretrained(out)
    return out


def _bad(name, llama_base, good, root):
    """Build the bad adapter called `name`; returns (adapter list, expected fragment of the message)."""
    bad = root / "bad"
    if name == "dora":
        return [good, _peft_variant(llama_base, bad, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True))], "DoRA"
    if name == "lora_bias":
        return [good, _peft_variant(llama_base, bad, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], lora_bias=True))], "lora_bias"
    if name == "ia3":
        return [good, _peft_variant(llama_base, bad, IA3Config(target_modules=["q_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]))], "only LORA"
    if name == "pickle":
        model = get_peft_model(load_base(llama_base), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
        model.save_pretrained(bad, safe_serialization=False)
        return [good, bad], "pickle"
    if name == "base_model":
        _edit_config(_copy(good, bad), base_model_name_or_path="some/other-model")
        return [good, bad], "base model"
    if name == "module_set":
        return [good, make_adapter(llama_base, bad, seed=1, target_modules=["q_proj", "v_proj"])], "module set differs"
    if name == "shape":
        other = LLAMA.to_dict() | {"intermediate_size": 40}
        from transformers import LlamaConfig, LlamaForCausalLM

        LlamaForCausalLM(LlamaConfig(**other)).save_pretrained(root / "other_base")
        make_adapter(root / "other_base", bad, seed=1)
        _edit_config(bad, base_model_name_or_path=json.loads((good / "adapter_config.json").read_text())["base_model_name_or_path"])
        return [good, bad], "shape"
    if name == "nan":
        _edit_weights(_copy(good, bad), lambda t: t[next(k for k in t if "lora_B" in k)].__setitem__((0, 0), float("nan")))
        return [good, bad], "NaN"
    if name == "inf":
        _edit_weights(_copy(good, bad), lambda t: t[next(k for k in sorted(t) if "lora_A" in k)].__setitem__((1, 2), float("inf")))
        return [good, bad], "NaN or Inf"
    if name == "truncated":
        file = _copy(good, bad) / "adapter_model.safetensors"
        file.write_bytes(file.read_bytes()[:-100])
        return [good, bad], "truncated"
    if name == "corrupt":
        (_copy(good, bad) / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
        return [good, bad], "corrupt"
    if name == "duplicate":
        return [good, _copy(good, root / "elsewhere" / good.name)], "duplicate task name"
    if name == "rank_mismatch":
        _edit_config(_copy(good, bad), r=8)
        return [good, bad], "rank mismatch"
    if name == "not_adapter":
        bad.mkdir()
        return [good, bad], "adapter_config.json"
    raise AssertionError(name)


CASES = ["dora", "lora_bias", "ia3", "pickle", "base_model", "module_set", "shape", "nan", "inf", "truncated", "corrupt", "duplicate", "rank_mismatch", "not_adapter"]


@pytest.mark.parametrize("case", CASES)
def test_refused_with_a_clear_error_and_nothing_written(case, llama_base, adapters, tmp_path):
    inputs, fragment = _bad(case, llama_base, adapters[0], tmp_path)
    out = tmp_path / "out" / "bundle"
    out.parent.mkdir()
    with pytest.raises(RMMError) as err:
        merge(inputs, out, progress=False)
    message = str(err.value)
    assert fragment in message, message
    assert "\n" not in message
    assert str(err.value.file).startswith(str(inputs[1] if case != "duplicate" else inputs[0].parent.parent))
    assert list(out.parent.iterdir()) == []  # no bundle, no temp dir


def test_nan_error_names_the_module(llama_base, adapters, tmp_path):
    inputs, _ = _bad("nan", llama_base, adapters[0], tmp_path)
    with pytest.raises(RMMError) as err:
        merge(inputs, tmp_path / "bundle", progress=False)
    assert err.value.module and err.value.module.endswith("_proj")


def test_cli_prints_one_line_and_exits_2(llama_base, adapters, tmp_path, capsys):
    inputs, _ = _bad("pickle", llama_base, adapters[0], tmp_path)
    assert main(["merge", *map(str, inputs), "--out", str(tmp_path / "bundle")]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "pickle" in err and "Traceback" not in err
    assert not (tmp_path / "bundle").exists()


def test_existing_output_is_kept_unless_forced(adapters, tmp_path):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(RMMError, match="--force"):
        merge(adapters, out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    merge(adapters, out, progress=False, force=True)
    assert not (out / "keep.txt").exists() and (out / "manifest.json").is_file()


def test_bad_options_are_refused(adapters, tmp_path, capsys):
    assert main(["merge", *map(str, adapters), "--out", str(tmp_path / "b"), "--method", "rmm-paper", "--storage-ratio", "0.01"]) == 2
    assert "below the minimum" in capsys.readouterr().err
    assert main(["merge", *map(str, adapters), "--out", str(tmp_path / "b"), "--method", "auto", "--basis-size", "2"]) == 2
    assert "apply to method rmm-paper" in capsys.readouterr().err
    assert main(["merge", *map(str, adapters), "--out", str(tmp_path / "b"), "--basis-size", "-1"]) == 2
    assert not (tmp_path / "b").exists()
