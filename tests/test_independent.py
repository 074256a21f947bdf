"""rmm's figures against answers computed another way: dense dW and per-position SVDs in the test, PEFT's own
pattern lookup, and a federation's curves against the centralised merge's report."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer

from conftest import load_base, make_adapter
from rmm.adapter import lora_scaling, open_adapter
from rmm.allocate import curves
from rmm.bundle import MergeOptions
from rmm.merge import merge, module_specs
from rmm.payload import payload_tasks, write_bases, write_curves, write_spectra
from rmm.io import open_safetensors
from rmm.solver import Moments, coefficients, reconstruct, solve


def _best_fit(X: torch.Tensor, p: int) -> torch.Tensor:
    """Best rank-p fit of the centred task vectors, one position at a time: X (T, P, r), by SVD (Eckart-Young)."""
    out = torch.empty_like(X)
    for i in range(X.shape[1]):
        mu = X[:, i].mean(0)
        U, S, Vh = torch.linalg.svd(X[:, i] - mu, full_matrices=False)
        out[:, i] = mu + (U[:, :p] * S[:p]) @ Vh[:p]
    return out


def _raw_factors(seed: int, ranks: list[int], n_out: int, n_in: int):
    """Raw factors (T, out, r), (T, r, in) of tasks of `ranks`, zero-padded to the largest."""
    gen = torch.Generator().manual_seed(seed)
    r = max(ranks)
    mask = (torch.arange(r)[None] < torch.tensor(ranks)[:, None]).double()
    B = torch.randn(len(ranks), n_out, r, generator=gen, dtype=torch.float64) * mask[:, None, :]
    A = torch.randn(len(ranks), r, n_in, generator=gen, dtype=torch.float64) * mask[:, :, None]
    return B, A


def test_solver_basis_is_best_first(seed=3):
    """Any leading columns of the basis are the best fit of their size, as the per-position SVD gives."""
    X = torch.randn(7, 5, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    basis = solve(Moments.of(X), 3)
    for k in range(4):
        U = basis.vectors[..., :k]
        fit = reconstruct(basis.mean, U, coefficients(basis.mean, U, X))
        torch.testing.assert_close(fit, _best_fit(X, k), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_curves_are_the_dense_errors_of_svds_done_here(seed):
    """Every error curve of a module against dense dW: truncation against each dW's singular values, joint sharing
    against `1 - ||U^T dW V||^2 / ||dW||^2` with U, V the top singular vectors of the tasks' dW set side by side,
    per-position sharing against the per-position SVD's rebuild."""
    ranks = [6, 6, 4, 6, 2, 6, 6, 6]
    B, A = _raw_factors(seed, ranks, 12, 10)
    c = curves(B, A, ranks)
    dW = B @ A
    energy = (dW * dW).sum((-2, -1))

    S = torch.zeros(len(ranks), 6, dtype=torch.float64)
    S[:, :6] = torch.linalg.svdvals(dW)[:, :6]
    tail = torch.stack([(S[:, k:] ** 2).sum(-1) for k in range(7)], 1) / energy[:, None]
    torch.testing.assert_close(c.kinds["truncate"], tail, rtol=1e-7, atol=1e-10)

    U = torch.linalg.svd(torch.cat(list(dW), dim=1))[0]  # of sum_t dW_t dW_t^T
    V = torch.linalg.svd(torch.cat(list(dW.mT), dim=1))[0]  # of sum_t dW_t^T dW_t
    assert c.kinds["joint"].errors.shape[1] > 3
    for K in range(c.kinds["joint"].errors.shape[1]):
        Uk, Vk = U[:, : min(K, c.kinds["joint"].sides[0])], V[:, : min(K, c.kinds["joint"].sides[1])]
        kept = ((Uk.T @ dW @ Vk) ** 2).sum((-2, -1))
        torch.testing.assert_close(c.kinds["joint"].errors[:, K], 1 - kept / energy, rtol=1e-7, atol=1e-9)

    assert c.kinds["shared"].shape[1] == 3  # p = 0, 1, 2: the cap (42 - 6) // (6 + 8)
    for p in range(c.kinds["shared"].shape[1]):
        rebuilt = _best_fit(B, p) @ _best_fit(A.mT, p).mT
        torch.testing.assert_close(
            c.kinds["shared"][:, p], ((rebuilt - dW) ** 2).sum((-2, -1)) / energy, rtol=1e-7, atol=1e-9
        )


# Pattern keys at, and short of, a dot boundary. PEFT's own layers say which apply: "proj", "_proj" and
# "attn.q_proj" are suffixes of module names but not at a dot, so PEFT applies none of them.
RANK_PATTERN = {"proj": 2, "attn.q_proj": 3, "self_attn.v_proj": 6, r"layers\.1\.mlp\.down_proj": 5}
ALPHA_PATTERN = {"_proj": 5, "mlp.down_proj": 16, "q_proj": 12}


@pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys did not match")  # PEFT: they do not apply
def test_pattern_keys_match_as_peft_matches_them(llama_base, tmp_path):
    config = dict(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern=RANK_PATTERN,
        alpha_pattern=ALPHA_PATTERN,
    )
    model = get_peft_model(load_base(llama_base), LoraConfig(**config))
    peft = {n: (m.r["default"], m.scaling["default"]) for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert len(peft) == 6
    for name, (r, scaling) in peft.items():
        assert lora_scaling(config, name.removeprefix("base_model.model.")) == (r, pytest.approx(scaling)), name
    # The reference does tell the boundary apart: q_proj keeps the default rank, v_proj and down_proj do not.
    ranks = {(n.rsplit(".", 1)[1], r) for n, (r, _) in peft.items()}
    assert ranks == {("q_proj", 4), ("v_proj", 6), ("down_proj", 4), ("down_proj", 5)}

    path = make_adapter(llama_base, tmp_path / "patterns", seed=5, **config)
    opened = open_adapter(path)
    assert opened.modules.keys() == peft.keys()
    for name, spec in opened.modules.items():
        assert (spec.rank, spec.scaling) == (peft[name][0], pytest.approx(peft[name][1])), name
    # Folded factors of the saved adapter against PEFT's dW of the same adapter loaded back.
    loaded = PeftModel.from_pretrained(load_base(llama_base), path)
    deltas = {n: m.get_delta_weight("default").double() for n, m in loaded.named_modules() if isinstance(m, LoraLayer)}
    for name in opened.modules:
        B, A = opened.load_factors(name)
        torch.testing.assert_close(B @ A, deltas[name], rtol=1e-6, atol=1e-7)


@pytest.fixture(scope="module")
def mixed(llama_base, tmp_path_factory):
    """Seven adapters of ranks 2, 4 and 6 sharing some structure."""
    root = tmp_path_factory.mktemp("mixed")
    return [make_adapter(llama_base, root / f"m{i}", seed=90 + i, shared=0.6, r=2 + 2 * (i % 3)) for i in range(7)]


@pytest.fixture(scope="module")
def alike(llama_base, tmp_path_factory):
    """Eight adapters that are one common update (in their raw factors) plus a little of their own."""
    root = tmp_path_factory.mktemp("alike")
    return [make_adapter(llama_base, root / f"a{i}", seed=40 + i, shared=0.95) for i in range(8)]


@pytest.mark.parametrize("inputs, ratio, kinds", [("mixed", 0.35, {"joint"}), ("alike", 0.15, {"joint", "shared"})])
def test_federated_curves_give_the_centralised_reports_errors(request, tmp_path, inputs, ratio, kinds):
    """Each site's round-2 curve rows, read at the size the centralised merge planned, are the squared dW errors
    the centralised merge measured on its stored bundle."""
    paths = request.getfixturevalue(inputs)
    central = merge(paths, tmp_path / "central", MergeOptions(storage_ratio=ratio), progress=False)
    assert {m.method for m in central.modules} == kinds
    adapters = [open_adapter(p) for p in paths]
    modules = module_specs(adapters)
    shards = [adapters[:2], adapters[2:3], adapters[3:]]
    spectra = [tmp_path / f"s{i}.safetensors" for i in range(3)]
    for shard, file in zip(shards, spectra):
        write_spectra(shard, modules, file)
    write_bases(spectra, modules, tmp_path / "bases.safetensors")
    checked = 0
    for i, shard in enumerate(shards):
        file = tmp_path / f"c{i}.safetensors"
        write_curves(shard, modules, tmp_path / "bases.safetensors", file)
        with open_safetensors(file) as f:
            for m in central.modules:
                if m.method == "truncate":
                    continue  # truncation curves never leave the site
                column = max(m.size) if m.method == "joint" else m.p
                rows = f.get_tensor(f"{m.name}.{'joint' if m.method == 'joint' else 'shared'}")[:, column]
                for task, err in zip(payload_tasks(file), rows.tolist()):
                    want = central.report.errors[task][m.name] ** 2
                    assert err == pytest.approx(want, rel=1e-4, abs=1e-7), (task, m.name)
                    checked += 1
    assert checked == len(paths) * len(central.modules)
