"""The per-position solver against a direct per-position SVD, over shapes, ranks and basis sizes."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rmm.canonical import canonicalize
from rmm.solver import Moments, basis_of, coefficients, reconstruct, solve, storage_numbers, storage_ratio

shapes = st.tuples(
    st.integers(1, 12),  # tasks T
    st.integers(1, 9),  # positions P
    st.integers(1, 8),  # rank r
    st.integers(0, 8),  # basis size p (capped at r)
    st.integers(0, 2**31 - 1),  # seed
)


def _data(T, P, r, seed):
    return torch.randn(T, P, r, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _svd_reference(X, p):
    """Best rank-p fit of the centred task vectors, one position at a time (Eckart-Young)."""
    out = torch.empty_like(X)
    for i in range(X.shape[1]):
        x = X[:, i, :].T  # (r, T)
        mu = x.mean(1, keepdim=True)
        U, S, Vh = torch.linalg.svd(x - mu, full_matrices=False)
        out[:, i, :] = (mu + U[:, :p] @ torch.diag(S[:p]) @ Vh[:p]).T
    return out


def _fit(X, p):
    """Solve from X's moments and reconstruct X: (basis, fit)."""
    basis = solve(Moments.of(X), p)
    return basis, reconstruct(basis.mean, basis.vectors, coefficients(basis.mean, basis.vectors, X))


@settings(max_examples=60, deadline=None)
@given(shapes)
def test_moments_path_equals_direct_svd(shape):
    T, P, r, p, seed = shape
    p = min(p, r)
    X = _data(T, P, r, seed)
    _, fit = _fit(X, p)
    torch.testing.assert_close(fit, _svd_reference(X, p), rtol=1e-7, atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 7), st.integers(1, 9), st.integers(2, 24), st.integers(0, 8), st.integers(0, 2**31 - 1))
def test_few_tasks_basis_from_the_vectors_equals_the_moments_one(T, P, r, p, seed):
    """With fewer tasks than the rank, `basis_of` solves a T x T problem per position: the same mean, spectrum and
    fit as the moments' r x r eigh and the per-position SVD, and orthonormal vectors."""
    p = min(p, r, max(T - 1, 0))
    X = _data(T, P, r, seed)
    if seed % 3 == 0:  # tasks that agree in some directions: a centred rank below T - 1
        X[: T // 2] = X[0]
    got, want = basis_of(X, p), solve(Moments.of(X), p)
    torch.testing.assert_close(got.mean, want.mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(got.eigvals, want.eigvals, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(
        got.vectors.mT @ got.vectors, torch.eye(p, dtype=X.dtype).expand(P, p, p), atol=1e-12, rtol=0
    )
    fit = reconstruct(got.mean, got.vectors, coefficients(got.mean, got.vectors, X))
    torch.testing.assert_close(fit, _svd_reference(X, p), rtol=1e-7, atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(shapes)
def test_error_per_position_equals_discarded_eigen_energy(shape):
    T, P, r, p, seed = shape
    p = min(p, r)
    X = _data(T, P, r, seed)
    basis, fit = _fit(X, p)
    error = ((X - fit) ** 2).sum((0, 2))  # per position, summed over tasks
    torch.testing.assert_close(error, basis.eigvals[:, p:].sum(1), rtol=1e-7, atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(shapes)
def test_full_basis_is_exact(shape):
    T, P, r, _, seed = shape
    X = _data(T, P, r, seed)
    _, fit = _fit(X, min(r, T - 1))
    torch.testing.assert_close(fit, X, rtol=1e-9, atol=1e-10)


@settings(max_examples=40, deadline=None)
@given(shapes, st.integers(1, 11))
def test_moments_are_additive(shape, split):
    T, P, r, _, seed = shape
    X = _data(T, P, r, seed)
    k = min(split, T)
    parts = Moments.of(X[:k]) + Moments.of(X[k:]) if k < T else Moments.of(X)
    whole = Moments.of(X)
    assert parts.n == whole.n
    torch.testing.assert_close(parts.s1, whole.s1)
    torch.testing.assert_close(parts.s2, whole.s2)


def test_basis_signs_are_deterministic():
    X = _data(6, 5, 4, 1)
    a, b = solve(Moments.of(X), 3), solve(Moments.of(X.flip(0)), 3)
    torch.testing.assert_close(a.vectors, b.vectors)
    pivot = torch.gather(a.vectors, 1, a.vectors.abs().argmax(1, keepdim=True))
    assert (pivot > 0).all()


def test_storage_formula_matches_design_examples():
    # DESIGN: r=16, T=8: p=1 31%, p=2 50%, p=3 69%.
    assert [round(storage_ratio(16, 8, p), 2) for p in (1, 2, 3)] == [0.31, 0.5, 0.69]
    assert storage_numbers(10, 16, 8, 2) == round(storage_ratio(16, 8, 2) * 10 * 16 * 8)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(1, 20), st.integers(1, 20), st.integers(0, 2**31 - 1))
def test_canonical_form_keeps_dW_and_removes_the_gauge(r, n_out, n_in, seed):
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(n_out, r, generator=g, dtype=torch.float64)
    A = torch.randn(r, n_in, generator=g, dtype=torch.float64)
    R = torch.randn(r, r, generator=g, dtype=torch.float64) + 3 * torch.eye(r, dtype=torch.float64)
    Bc, Ac = canonicalize(B, A)
    assert Bc.shape == B.shape and Ac.shape == A.shape
    torch.testing.assert_close(Bc @ Ac, B @ A)
    Bg, Ag = canonicalize(B @ torch.linalg.inv(R), R @ A)  # same dW, other gauge
    torch.testing.assert_close(Bg @ Ag, B @ A)
    # Singular values are distinct almost surely, so the canonical factors agree up to tolerance.
    S = torch.linalg.svdvals(B @ A)[: min(r, n_out, n_in)]
    if S.numel() < 2 or ((S[:-1] - S[1:]).min() > 1e-3 * S[0] and S[-1] > 1e-3 * S[0]):
        torch.testing.assert_close(Bg, Bc, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(Ag, Ac, rtol=1e-5, atol=1e-7)
