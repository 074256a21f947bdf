"""The allocator's error curves against dense dW, and its plans against the plain ones."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rmm.allocate import allocate, curves, minimum_ratio
from rmm.canonical import canonicalize
from rmm.errors import RMMError
from rmm.storage import KINDS
from rmm.storage.joint import grams, joint_bases, joint_errors, stacked_roots
from rmm.storage.shared import position_bases, shared_errors
from rmm.storage.truncate import truncation_errors

torch.set_num_threads(1)


def _tasks(seed, T, n_out, n_in, r):
    gen = torch.Generator().manual_seed(seed)
    B = torch.randn(T, n_out, r, generator=gen, dtype=torch.float64)
    A = torch.randn(T, r, n_in, generator=gen, dtype=torch.float64)
    return canonicalize(B, A)


shapes = st.tuples(st.integers(0, 10**6), st.integers(1, 5), st.integers(1, 24), st.integers(1, 24), st.integers(1, 6))


@settings(max_examples=40, deadline=None)
@given(shapes)
def test_error_curves_are_the_dense_relative_errors(shape):
    seed, T, n_out, n_in, r = shape
    B, A = _tasks(seed, T, n_out, n_in, r)
    dW = B @ A
    energy = (dW * dW).sum((-2, -1))
    S = torch.zeros(T, r, dtype=dW.dtype)  # dW's singular values, r of them (zeros past its rank)
    S[:, : min(r, n_out, n_in)] = torch.linalg.svdvals(dW)[:, :r]
    tail = torch.stack([(S[:, k:] ** 2).sum(-1) for k in range(r + 1)], 1) / energy[:, None]
    torch.testing.assert_close(truncation_errors((B * B).sum(-2)), tail)
    U, V = joint_bases(*([X] for X in stacked_roots(B, A)), cap=max(n_out, n_in))
    for k in range(max(U.shape[1], V.shape[1]) + 1):
        Uk, Vk = U[:, :k], V[:, :k]
        dense = ((dW - Uk @ (Uk.T @ dW @ Vk) @ Vk.T) ** 2).sum((-2, -1)) / energy
        torch.testing.assert_close(joint_errors(B, A, U, V)[:, k], dense, atol=1e-9, rtol=1e-7)


@settings(max_examples=20, deadline=None)
@given(shapes)
def test_pooled_roots_give_the_same_bases_as_the_stacked_ones(shape):
    seed, T, n_out, n_in, r = shape
    B, A = _tasks(seed, T, n_out, n_in, r)
    split = max(1, T // 2)
    pooled = [grams(B[:split], A[:split]), grams(B[split:], A[split:])] if T > 1 else [grams(B, A)]
    U1, V1 = joint_bases([p[0] for p in pooled], [p[1] for p in pooled], cap=64)
    U2, V2 = joint_bases(*([X] for X in stacked_roots(B, A)), cap=64)
    # Same projectors wherever the spectrum separates them: compare the errors they give.
    torch.testing.assert_close(joint_errors(B, A, U1, V1), joint_errors(B, A, U2, V2), atol=1e-8, rtol=1e-6)


@settings(max_examples=20, deadline=None)
@given(shapes)
def test_a_sites_pooled_roots_keep_the_gram_in_the_fewest_orthogonal_columns(shape):
    """`grams` (what a site sends): W W^T equal to the stacked roots' X X^T, min(side, T r) columns, orthogonal."""
    seed, T, n_out, n_in, r = shape
    B, A = _tasks(seed, T, n_out, n_in, r)
    for W, X in zip(grams(B, A), stacked_roots(B, A)):
        assert W.shape == (X.shape[0], min(X.shape))
        torch.testing.assert_close(W @ W.T, X @ X.T, atol=1e-10, rtol=1e-9)
        G = W.T @ W
        torch.testing.assert_close(G - torch.diag(torch.diagonal(G)), torch.zeros_like(G), atol=1e-9, rtol=0)


def _stored(m, c, T: int) -> int:
    """What a module's choice stores, counted from the tensors a bundle holds for it (README's table), not its
    `cost`."""
    r = m.rank
    if c.kind == "truncate":  # B (out, k_t) and A (in, k_t) per task
        return sum(c.setting) * (m.n_out + m.n_in)
    if c.kind == "joint":  # U (out, Ku), V (in, Kv) and a Ku x Kv core per task
        return c.setting[0] * m.n_out + c.setting[1] * m.n_in + T * c.setting[0] * c.setting[1]
    return (m.n_out + m.n_in) * (
        r + r * c.setting + T * c.setting
    )  # a mean (r) and a basis (r, p) per position, p per task


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10**6), st.floats(0.05, 1.0))
def test_the_plan_fits_the_budget_and_beats_the_plain_plans(seed, ratio):
    gen = torch.Generator().manual_seed(seed)
    modules, whole, T = [], 0, 4
    for n_out, n_in, r in ((16, 16, 4), (32, 16, 4), (16, 48, 2)):
        ranks = torch.randint(1, r + 1, (T,), generator=gen).tolist()
        B, A = _tasks(seed + n_out + n_in, T, n_out, n_in, r)
        mask = (torch.arange(r)[None, :] < torch.tensor(ranks)[:, None]).double()
        modules.append(curves(B * mask[:, None, :], A * mask[:, :, None], ranks))  # task t of rank ranks[t]
        whole += sum(ranks) * (n_out + n_in)
    try:
        plan = allocate(modules, ratio * whole)
    except RMMError:  # its plan keeps nothing: never so from minimum_ratio on
        assert ratio < minimum_ratio(modules)
        return
    numbers = [_stored(m, c, T) for m, c in zip(modules, plan)]
    assert [c.cost for c in plan] == numbers
    assert 0 < sum(numbers) <= ratio * whole

    def objective(p):
        return sum((m.n_out + m.n_in) * sum(c.errors) for m, c in zip(modules, p))

    for plain in (k.plain(modules, ratio * whole) for k in KINDS.values()):
        if sum(c.cost for c in plain) <= ratio * whole:
            assert objective(plan) <= objective(plain) + 1e-12
    if ratio == 1.0:
        assert objective(plan) < 1e-12


@settings(max_examples=30, deadline=None)
@given(shapes)
def test_per_position_curve_is_the_dense_error_of_the_papers_rebuild(shape):
    seed, T, n_out, n_in, r = shape
    gen = torch.Generator().manual_seed(seed)
    B = torch.randn(T, n_out, r, generator=gen, dtype=torch.float64)  # raw factors: no canonical form
    A = torch.randn(T, r, n_in, generator=gen, dtype=torch.float64)
    bases = position_bases(B, A, [r] * T)
    errors = shared_errors(B, A, bases)
    dW = B @ A
    for p in range(bases[0].p + 1):
        rebuilt = []
        for basis, X in zip(bases, (B, A.mT)):
            U = basis.vectors[..., :p]
            rebuilt.append(
                basis.mean + torch.einsum("prk,tpk->tpr", U, torch.einsum("prk,tpr->tpk", U, X - basis.mean))
            )
        dense = ((rebuilt[0] @ rebuilt[1].mT - dW) ** 2).sum((-2, -1)) / (dW * dW).sum((-2, -1))
        torch.testing.assert_close(errors[:, p], dense, atol=1e-9, rtol=1e-7)
    if bases[0].p == min(r, T - 1):
        assert errors[:, -1].max() < 1e-9  # p = min(r, T - 1) is exact


def _spectrum(seed: int, n: int, q: int, s: torch.Tensor) -> torch.Tensor:
    """An n x q matrix with singular values `s` (zero beyond them)."""
    gen = torch.Generator().manual_seed(seed)
    k = len(s)
    U = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(q, k, generator=gen, dtype=torch.float64)).Q
    return U * s @ V.T


def test_joint_bases_are_the_svds_leading_directions_however_ill_conditioned():
    """The Gram route of `top_left_vectors` against the SVD: orthonormal columns, and each leading set of K columns
    keeps as much of C's energy as the SVD's top K (to 1e-12 of the whole; the joint curve measures this), spanning
    the same directions where they are well resolved (projectors compared), for tall and wide roots, singular values
    down to 1e-14 of the largest, and roots of lower rank than the columns asked for."""
    from rmm.storage.joint import top_left_vectors

    cases = [
        (200, 40, torch.logspace(0, -14, 40, dtype=torch.float64)),  # tall, beyond what the Gram resolves
        (200, 40, torch.logspace(0, -3, 25, dtype=torch.float64)),  # tall, rank 25 of 40
        (30, 90, torch.logspace(0, -10, 30, dtype=torch.float64)),  # wide
        (30, 90, torch.linspace(1, 0.5, 12, dtype=torch.float64)),  # wide, rank 12
    ]
    for seed, (n, q, s) in enumerate(cases):
        C = _spectrum(seed, n, q, s)
        U = top_left_vectors(C, cap=q)
        k = min(n, q)
        assert U.shape == (n, k)
        torch.testing.assert_close(U.T @ U, torch.eye(k, dtype=torch.float64), atol=1e-12, rtol=0)
        Us = torch.linalg.svd(C, full_matrices=False)[0]
        for K in range(1, len(s) + 1):
            kept, best = (U[:, :K].T @ C).square().sum(), (Us[:, :K].T @ C).square().sum()
            assert kept >= best - 1e-12 * s.square().sum(), (seed, K)  # what the joint curve measures
            if s[K - 1] > 1e-3 * s[0]:  # well resolved: the same directions
                P, Ps = U[:, :K] @ U[:, :K].T, Us[:, :K] @ Us[:, :K].T
                assert (P - Ps).abs().max() < 1e-9, (seed, K)
        assert (U[:, : len(s)] @ U[:, : len(s)].T @ C - C).abs().max() < 1e-12  # C's whole range is spanned
