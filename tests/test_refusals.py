"""Every refused input gets a one-line RMMError naming the file (and module) and why; nothing is written."""

import json
import shutil

import pytest
import torch
from peft import IA3Config, LoraConfig, get_peft_model
from peft.tuners.lora.config import BdLoraConfig, KasaConfig, VeloraConfig
from safetensors.torch import load_file, save_file

from conftest import LLAMA, load_base, make_adapter
from rmm.cli import main
from rmm.errors import RMMError
from rmm.adapter import open_adapter
from rmm.bundle import MergeOptions
from rmm.merge import merge, revert


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
        return [
            good,
            _peft_variant(
                llama_base, bad, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True)
            ),
        ], "DoRA"
    if name == "lora_bias":
        return [
            good,
            _peft_variant(
                llama_base, bad, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], lora_bias=True)
            ),
        ], "lora_bias"
    if name == "kasa":
        return [
            good,
            _peft_variant(llama_base, bad, LoraConfig(r=4, target_modules=TARGETS, kasa_config=KasaConfig())),
        ], "KaSA adapters (kasa_config)"
    if name == "kasa_tensors":  # its config says nothing: the lora_diag tensors alone are refused
        _edit_config(
            _peft_variant(llama_base, bad, LoraConfig(r=4, target_modules=TARGETS, kasa_config=KasaConfig())),
            kasa_config=None,
        )
        return [good, bad], "'lora_diag'"
    if name == "bdlora":
        bd = BdLoraConfig(target_modules_bd_a=["q_proj", "v_proj"], target_modules_bd_b=["down_proj"], nblocks=2)
        return [
            good,
            _peft_variant(llama_base, bad, LoraConfig(r=4, target_modules=TARGETS, use_bdlora=bd)),
        ], "BD-LoRA adapters (use_bdlora)"
    if name in VARIANT_FIELDS:
        _edit_config(_copy(good, bad), **{name: VARIANT_FIELDS[name]})
        return [good, bad], name
    if name == "ia3":
        return [
            good,
            _peft_variant(
                llama_base,
                bad,
                IA3Config(target_modules=["q_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
            ),
        ], "only LORA"
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
        _edit_config(
            bad,
            base_model_name_or_path=json.loads((good / "adapter_config.json").read_text())["base_model_name_or_path"],
        )
        return [good, bad], "shape"
    if name == "nan":
        _edit_weights(
            _copy(good, bad), lambda t: t[next(k for k in t if "lora_B" in k)].__setitem__((0, 0), float("nan"))
        )
        return [good, bad], "NaN"
    if name == "inf":
        _edit_weights(
            _copy(good, bad), lambda t: t[next(k for k in sorted(t) if "lora_A" in k)].__setitem__((1, 2), float("inf"))
        )
        return [good, bad], "NaN or Inf"
    if name == "truncated":
        file = _copy(good, bad) / "adapter_model.safetensors"
        file.write_bytes(file.read_bytes()[:-100])
        return [good, bad], "truncated"
    if name == "corrupt":
        (_copy(good, bad) / "adapter_model.safetensors").write_bytes(
            b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!"
        )
        return [good, bad], "corrupt"
    if name == "duplicate":
        return [good, _copy(good, root / "elsewhere" / good.name)], "duplicate task name"
    if name == "rank_mismatch":
        _edit_config(_copy(good, bad), r=8)
        return [good, bad], "rank mismatch"
    if name == "unsafe_name":  # the directory name becomes the task's file names
        return [good, _copy(good, root / "task:1")], "cannot be used as a file name"
    if name == "not_adapter":
        bad.mkdir()
        return [good, bad], "adapter_config.json"
    raise AssertionError(name)


TARGETS = ["q_proj", "v_proj", "down_proj"]
# Config fields of LoRA variants rmm does not model, set as PEFT would save them; one rmm has never heard of.
VARIANT_FIELDS = {
    "use_qalora": True,
    "monteclora_config": {"monteclora_n": 8},
    "arrow_config": {"top_k": 3},
    "target_parameters": ["mlp.experts.gate_up_proj"],
    "layer_replication": [[0, 2], [1, 2]],
    "megatron_config": {"tensor_model_parallel_size": 2},
    "use_future_variant": True,
}
CASES = [
    "kasa",
    "kasa_tensors",
    "bdlora",
    *VARIANT_FIELDS,
    "dora",
    "lora_bias",
    "ia3",
    "pickle",
    "base_model",
    "module_set",
    "shape",
    "nan",
    "inf",
    "truncated",
    "corrupt",
    "duplicate",
    "rank_mismatch",
    "unsafe_name",
    "not_adapter",
]


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
    assert (
        main(
            [
                "merge",
                *map(str, adapters),
                "--out",
                str(tmp_path / "b"),
                "--method",
                "rmm-paper",
                "--storage-ratio",
                "0.01",
            ]
        )
        == 2
    )
    assert "below the minimum" in capsys.readouterr().err
    assert (
        main(["merge", *map(str, adapters), "--out", str(tmp_path / "b"), "--method", "auto", "--basis-size", "2"]) == 2
    )
    assert "apply to method rmm-paper" in capsys.readouterr().err
    assert main(["merge", *map(str, adapters), "--out", str(tmp_path / "b"), "--basis-size", "-1"]) == 2
    assert not (tmp_path / "b").exists()


@pytest.fixture(scope="module")
def merged(adapters, tmp_path_factory):
    out = tmp_path_factory.mktemp("merged") / "bundle"
    merge(adapters[:2], out, progress=False)
    return out


def _manifest(bundle, fn):
    m = json.loads((bundle / "manifest.json").read_text())
    fn(m)
    (bundle / "manifest.json").write_text(json.dumps(m))


def _cli_case(case, adapters, bundle, tmp):
    """The argv of one bad command line, after damaging `bundle` (a copy) or copies of adapters as it needs."""
    ins = [str(a) for a in adapters[:2]]

    def config(**changes):
        bad = _copy(adapters[1], tmp / "bad")
        _edit_config(bad, **changes)
        return ["merge", ins[0], str(bad), "--out", str(tmp / "out")]

    if case == "out unwritable":
        return ["merge", *ins, "--out", "/sys/rmm-test-bundle"]
    if case == "out under /proc":
        return ["merge", *ins, "--out", "/proc/rmm-test-bundle"]
    if case == "out is a file":
        (tmp / "file").write_text("mine")
        return ["merge", *ins, "--out", str(tmp / "file"), "--force"]
    if case in ("storage ratio inf", "storage ratio nan"):
        return ["merge", *ins, "--out", str(tmp / "out"), "--storage-ratio", case.split()[-1]]
    if case == "negative lora_alpha":
        return config(lora_alpha=-8)
    if case == "negative alpha_pattern":
        return config(alpha_pattern={"q_proj": -4})
    if case == "bad rank_pattern regex":
        return config(rank_pattern={"q_proj[": 4})
    if case == "lora_alpha a string":
        return config(lora_alpha="8")
    if case == "inspect: coefficients deleted":
        (bundle / "coefficients" / "task1.safetensors").unlink()
    elif case == "inspect: basis deleted":
        (bundle / "basis.safetensors").unlink()
    elif case == "inspect: energy missing":
        _manifest(bundle, lambda m: m["report"]["energy"].pop(next(iter(m["report"]["energy"]))))
    elif case == "inspect: numbers_original 0":
        _manifest(bundle, lambda m: m["report"]["storage"].update(numbers_original=0))
    elif case == "inspect: JSON nested too deep":
        (bundle / "manifest.json").write_text("[" * 100_000)
    elif case == "inspect: old format":
        _manifest(bundle, lambda m: m.update(format="rmm-bundle/1"))
    elif case == "revert: into a file":
        (tmp / "file").write_text("mine")
        return ["revert", str(bundle), "--out", str(tmp / "file")]
    elif case == "revert: bogus dtype":
        _manifest(bundle, lambda m: m["tasks"][0].update(dtype="nn"))
        return ["revert", str(bundle), "--out", str(tmp / "rev")]
    else:
        raise AssertionError(case)
    return ["inspect", str(bundle)]


CLI_CASES = [
    "out unwritable",
    "out under /proc",
    "out is a file",
    "storage ratio inf",
    "storage ratio nan",
    "negative lora_alpha",
    "negative alpha_pattern",
    "bad rank_pattern regex",
    "lora_alpha a string",
    "inspect: coefficients deleted",
    "inspect: basis deleted",
    "inspect: energy missing",
    "inspect: numbers_original 0",
    "inspect: JSON nested too deep",
    "inspect: old format",
    "revert: into a file",
    "revert: bogus dtype",
]


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_refuses_in_one_line(case, adapters, merged, tmp_path, capsys):
    bundle = shutil.copytree(merged, tmp_path / "bundle")
    argv = _cli_case(case, adapters, bundle, tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "Traceback" not in err and "\n" not in err, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "rev").exists()
    if (tmp_path / "file").exists():
        assert (tmp_path / "file").read_text() == "mine"


@pytest.mark.parametrize("field", ["init_lora_weights", "loftq_config", "alora_invocation_tokens", "velora_config"])
def test_variants_that_keep_the_update_merge_and_revert(field, llama_base, adapters, tmp_path):
    """Initialisation, training-only and gating options leave the saved B @ A meaning s * B @ A: merged, reverted
    exactly."""
    other = tmp_path / "other"
    if field == "velora_config":  # saves a lora_velora_embed tensor per module, carried as an extra
        model = get_peft_model(
            load_base(llama_base), LoraConfig(r=4, target_modules=TARGETS, velora_config=VeloraConfig(num_groups=4))
        )
        model(torch.zeros(1, 4, dtype=torch.long))
        model.save_pretrained(other)
    else:
        value = {
            "init_lora_weights": "pissa",
            "loftq_config": {"loftq_bits": 4, "loftq_iter": 1},
            "alora_invocation_tokens": [5, 7],
        }[field]
        _edit_config(_copy(adapters[1], other), **{field: value})
    merge([adapters[0], other], tmp_path / "bundle", MergeOptions(storage_ratio=1.0), progress=False)
    revert(tmp_path / "bundle", tmp_path / "rev", progress=False)
    got, want = open_adapter(tmp_path / "rev" / "other"), open_adapter(other)
    assert json.loads((tmp_path / "rev" / "other" / "adapter_config.json").read_text())[field] == want.config[field]
    for m in want.modules:
        (B, A), (B0, A0) = got.load_factors(m), want.load_factors(m)
        assert torch.allclose(B @ A, B0 @ A0, atol=1e-5)
