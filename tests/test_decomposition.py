"""Tests for unite_hf.decomposition, checked against independent references (tensorly, torch SVDs)."""

from __future__ import annotations

import math
import warnings

import pytest
import tensorly as tl
import torch
from safetensors.torch import load_file, save_file
from tensorly.decomposition import tucker as tl_tucker
from tolerances import assert_close_eps, eps_tolerance

from unite_hf.decomposition import (
    DECOMPOSITIONS,
    DEFAULT_RANK,
    MODES,
    Decomposition,
    decompose,
    decompose_streaming,
    input_weight_from_moment,
    register_decomposition,
    resolve_ranks,
)


# ---------------------------------------------------------------------------------------------
# helpers (independent of the module's own linear algebra)
# ---------------------------------------------------------------------------------------------


def _orth(n: int, r: int, gen: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64)).Q


def exact_tucker(shape, ranks, seed=0, dtype=torch.float32):
    """X = G x1 A x2 B x3 C with orthonormal A, B, C and a Gaussian core."""
    gen = torch.Generator().manual_seed(seed)
    core = torch.randn(*ranks, generator=gen, dtype=torch.float64)
    a, b, c = (_orth(n, r, gen) for n, r in zip(shape, ranks))
    return torch.einsum("kab,lk,ia,jb->lij", core, a, b, c).to(dtype)


def unfold(x: torch.Tensor, mode: int) -> torch.Tensor:
    """Kolda-style mode-n unfolding, written independently of the module."""
    return torch.movedim(x, mode, 0).reshape(x.shape[mode], -1)


def rel_err(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    x, x_hat = x.double(), x_hat.double()
    return float(torch.linalg.norm(x - x_hat) / torch.linalg.norm(x))


def tensorly_tucker_error(x: torch.Tensor, ranks, n_iter_max: int) -> float:
    with tl.backend_context("pytorch"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Trying to compute SVD with n_eigenvecs=")
        core, factors = tl_tucker(x, rank=list(ranks), n_iter_max=n_iter_max, init="svd")
        return rel_err(x, tl.tucker_to_tensor((core, factors)))


def projector(u: torch.Tensor) -> torch.Tensor:
    u = u.double()
    return u @ u.T


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    """The tensors here are tiny; with other jobs on a 2-core box, OpenMP spin-waiting made this
    file 5x slower with 2 threads than with 1.  Restored afterwards for other test modules."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def low_rank_plus_noise() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    x = exact_tucker((6, 48, 40), (6, 12, 10), seed=1)
    return x + 0.05 * x.std() * torch.randn(x.shape, generator=gen)


# ---------------------------------------------------------------------------------------------
# tucker
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "shape", "ranks"),
    [("low_rank_plus_noise", (6, 48, 40), (6, 12, 10)), ("gaussian", (5, 32, 24), (3, 8, 8))],
)
def test_tucker_error_matches_tensorly(case, shape, ranks, low_rank_plus_noise):
    if case == "gaussian":
        x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    else:
        x = low_rank_plus_noise
    ours = decompose(x, "tucker", ranks, n_iter_max=25)
    ref = tensorly_tucker_error(x, ranks, n_iter_max=25)
    assert ours.relative_error <= 1.01 * ref, (ours.relative_error, ref)
    # The reported error is the real one.
    assert ours.relative_error == pytest.approx(rel_err(x, ours.reconstruct()), rel=1e-4)
    assert ours.ranks == ranks and ours.core.shape == ranks


@pytest.mark.parametrize(
    ("shape", "ranks"),
    [
        ((6, 20, 16), (3, 5, 4)),
        ((4, 24, 24), (4, 24, 24)),  # full rank
        ((2, 50, 3), (2, 5, 3)),  # d_out > L * d_in: Gram on the column side, U from M V + QR
    ],
)
def test_exact_tucker_recovery_and_layer_reconstruction(shape, ranks):
    x = exact_tucker(shape, ranks, seed=3)
    dec = decompose(x, "tucker", ranks)
    exact = eps_tolerance(torch.float32, k=x.numel(), scale=1.0)  # float32 X, factors and products over it
    assert dec.relative_error < exact
    assert rel_err(x, dec.reconstruct()) < exact
    assert dec.shared_bases
    full = dec.reconstruct()
    # U G_l V^T with orthonormal factors: each entry sums terms of magnitude at most ||G||_F, over
    # r_L + r_out + r_in products
    chain, scale = sum(ranks), float(torch.linalg.vector_norm(dec.core))
    for layer in range(shape[0]):
        g_l = sum(dec.layer_factor[layer, k] * dec.core[k] for k in range(ranks[0]))
        by_hand = dec.out_factor @ g_l @ dec.in_factor.T
        assert_close_eps(dec.layer_core(layer), g_l, k=chain, scale=scale)
        assert_close_eps(dec.reconstruct_layer(layer), full[layer], k=chain, scale=scale)
        assert_close_eps(dec.reconstruct_layer(layer), by_hand, k=chain, scale=scale)
        assert dec.layer_out_factor(layer) is dec.out_factor
        assert dec.layer_in_factor(layer) is dec.in_factor
    assert_close_eps(dec.reconstruct_layer(-1), full[-1], k=chain, scale=scale)
    with pytest.raises(IndexError):
        dec.reconstruct_layer(shape[0])


def test_tucker_factors_orthonormal_signed_and_deterministic(low_rank_plus_noise):
    x = low_rank_plus_noise
    dec = decompose(x, "tucker", (4, 12, 10))
    for factor in (dec.layer_factor, dec.out_factor, dec.in_factor):
        assert factor.dtype == torch.float32
        eye = torch.eye(factor.shape[1])
        assert_close_eps(factor.T @ factor, eye, k=factor.numel())  # gamma_(m n): Householder QR, Higham 19.3
        # Sign convention: the largest-|entry| of every column is positive.
        idx = factor.abs().argmax(dim=0)
        assert (factor[idx, torch.arange(factor.shape[1])] > 0).all()
    again = decompose(x.clone(), "tucker", (4, 12, 10))
    for attr in ("core", "layer_factor", "out_factor", "in_factor"):
        assert torch.equal(getattr(dec, attr), getattr(again, attr))
    # Core is the projection of X on the factors (optimal core for orthonormal factors).
    core_ref = torch.einsum("lij,lk,ia,jb->kab", x.double(), *(f.double() for f in
                            (dec.layer_factor, dec.out_factor, dec.in_factor)))
    torch.testing.assert_close(dec.core.double(), core_ref, rtol=1e-4, atol=1e-4)


def test_hosvd_initialisation_spans_leading_singular_subspaces(low_rank_plus_noise):
    """n_iter_max=0 returns the truncated HOSVD: compare subspaces with full SVDs of unfoldings."""
    x = low_rank_plus_noise
    ranks = (3, 7, 5)
    dec = decompose(x, "tucker", ranks, n_iter_max=0)
    for mode, (factor, r) in enumerate(zip((dec.layer_factor, dec.out_factor, dec.in_factor), ranks)):
        u_ref = torch.linalg.svd(unfold(x.double(), mode), full_matrices=False).U[:, :r]
        torch.testing.assert_close(projector(factor), projector(u_ref), atol=1e-4, rtol=0)
    # HOOI can only improve on HOSVD.
    assert decompose(x, "tucker", ranks).relative_error <= dec.relative_error + 1e-7


def test_tucker_rank_above_product_of_other_ranks():
    """r_out > r_L * r_in: HOOI's projected unfolding is rank deficient, basis must be completed."""
    x = torch.randn(2, 30, 2, generator=torch.Generator().manual_seed(4))
    dec = decompose(x, "tucker", (1, 4, 2))
    assert_close_eps(dec.out_factor.T @ dec.out_factor, torch.eye(4), k=dec.out_factor.numel())
    assert dec.relative_error == pytest.approx(rel_err(x, dec.reconstruct()), rel=1e-4)
    assert dec.relative_error <= tensorly_tucker_error(x, (1, 4, 2), 25) * 1.01


def test_float64_input_and_low_precision_input():
    x64 = exact_tucker((4, 16, 12), (2, 4, 3), seed=5, dtype=torch.float64)
    dec = decompose(x64, "tucker", (2, 4, 3))
    assert dec.core.dtype == dec.out_factor.dtype == torch.float32
    assert dec.relative_error < 1e-7  # computed in float64
    x16 = x64.to(torch.bfloat16)
    dec16 = decompose(x16, "tucker", (2, 4, 3))  # computed in float32
    assert dec16.out_factor.dtype == torch.float32
    ref = decompose(x16.float(), "tucker", (2, 4, 3))
    assert torch.equal(dec16.out_factor, ref.out_factor) and dec16.relative_error == ref.relative_error
    assert dec16.relative_error < 1e-2  # bf16 rounding makes X only approximately low rank


def test_show_progress_runs(low_rank_plus_noise, capsys):
    for method in ("tucker", "cp", "svd"):
        dec = decompose(low_rank_plus_noise, method, 4, n_iter_max=3, show_progress=True, name="gate")
        assert math.isfinite(dec.relative_error)
    # tol=0 with a progress callback used to trip a tensorly 0.10 UnboundLocalError.
    decompose(low_rank_plus_noise, "cp", 3, n_iter_max=2, tol=0.0, show_progress=True)
    assert "gate" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# spectral energy
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["tucker", "cp", "svd"])
def test_spectral_energy_matches_svdvals_of_unfoldings(method, low_rank_plus_noise):
    x = low_rank_plus_noise
    dec = decompose(x, method, 6, n_iter_max=5)
    assert set(dec.spectral_energy) == set(MODES)
    for mode, name in enumerate(MODES):
        s = torch.linalg.svdvals(unfold(x.double(), mode))
        ref = torch.cumsum(s**2, 0) / (s**2).sum()
        energy = dec.spectral_energy[name]
        assert energy.dtype == torch.float32
        assert energy.shape == (min(x.shape[mode], x.numel() // x.shape[mode]),)
        assert (energy[1:] >= energy[:-1]).all()
        # from the float32 Gram of the unfolding (x.numel() / x.shape[mode] columns summed), then cumulated
        k = x.numel() // x.shape[mode]
        assert energy[-1].item() == pytest.approx(1.0, abs=eps_tolerance(torch.float32, k=energy.numel(), scale=1.0))
        assert_close_eps(energy, ref, k=k, scale=1.0)
    retained = dec.retained_energy()
    for name, r in zip(MODES, dec.ranks):
        energy = dec.spectral_energy[name]
        assert retained[name] == pytest.approx(float(energy[min(r, energy.numel()) - 1]))


def test_tucker_error_bounded_by_discarded_energy(low_rank_plus_noise):
    """Classical HOSVD bound: err^2 <= sum over modes of the discarded energy fractions."""
    x = low_rank_plus_noise
    dec = decompose(x, "tucker", (4, 8, 6))
    discarded = sum(1.0 - v for v in dec.retained_energy().values())
    assert dec.relative_error**2 <= discarded + 1e-6


# ---------------------------------------------------------------------------------------------
# cp
# ---------------------------------------------------------------------------------------------


def exact_cp(shape, rank, seed=0):
    gen = torch.Generator().manual_seed(seed)
    factors = [torch.randn(n, rank, generator=gen, dtype=torch.float64) for n in shape]
    weights = torch.linspace(3.0, 1.0, rank, dtype=torch.float64)
    with tl.backend_context("pytorch"):
        return tl.cp_to_tensor((weights, factors)).float()


def test_cp_recovers_exact_cp_tensor_and_matches_cp_to_tensor():
    backend_before = tl.get_backend()
    x = exact_cp((6, 20, 16), 4, seed=6)
    dec = decompose(x, "cp", 4, n_iter_max=200, tol=1e-10)
    assert tl.get_backend() == backend_before  # global tensorly state restored
    assert dec.ranks == (4, 4, 4) and dec.relative_error < 1e-3
    lam = torch.diagonal(torch.diagonal(dec.core, dim1=0, dim2=1), dim1=0, dim2=1)
    # Superdiagonal core, non-negative sorted weights, unit-norm columns.
    assert torch.count_nonzero(dec.core) == torch.count_nonzero(lam)
    assert (lam >= 0).all() and (lam[1:] <= lam[:-1]).all()
    for f in (dec.layer_factor, dec.out_factor, dec.in_factor):
        torch.testing.assert_close(torch.linalg.norm(f, dim=0), torch.ones(4), atol=1e-5, rtol=0)
    with tl.backend_context("pytorch"):
        ref = tl.cp_to_tensor((lam, [dec.layer_factor, dec.out_factor, dec.in_factor]))
    torch.testing.assert_close(dec.reconstruct(), ref, rtol=1e-4, atol=1e-5)
    for layer in range(x.shape[0]):
        torch.testing.assert_close(dec.reconstruct_layer(layer), ref[layer], rtol=1e-4, atol=1e-5)
    assert dec.relative_error == pytest.approx(rel_err(x, ref), rel=1e-3, abs=1e-6)


def test_cp_rank_may_exceed_layers_but_not_matrix_dims(low_rank_plus_noise):
    x = low_rank_plus_noise  # (6, 48, 40)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # tensorly's R > L init warning is expected and silenced
        dec = decompose(x, "cp", 8, n_iter_max=5)
    assert dec.ranks == (8, 8, 8) and dec.layer_factor.shape == (6, 8)
    assert dec.relative_error == pytest.approx(rel_err(x, dec.reconstruct()), rel=1e-4)
    with pytest.raises(ValueError, match=r"rank 41 for mode 'in' exceeds its dimension 40"):
        decompose(x, "cp", 41)
    with pytest.raises(ValueError, match="single rank"):
        decompose(x, "cp", (6, 8, 8))


# ---------------------------------------------------------------------------------------------
# svd
# ---------------------------------------------------------------------------------------------


def test_svd_is_per_layer_eckart_young(low_rank_plus_noise):
    x = low_rank_plus_noise
    r = 7
    dec = decompose(x, "svd", r)
    assert not dec.shared_bases and dec.ranks == (6, r, r)
    assert dec.out_factor.shape == (6, 48, r) and dec.in_factor.shape == (6, 40, r)
    torch.testing.assert_close(dec.layer_factor, torch.eye(6))
    tail = 0.0
    for layer in range(x.shape[0]):
        u, s, vh = torch.linalg.svd(x[layer].double(), full_matrices=False)
        best = u[:, :r] @ torch.diag(s[:r]) @ vh[:r]
        # a float32 SVD is exact for X_l + E, |E| ~ k eps s_1 (k = the longer side, 48): singular values
        # move by at most |E| (Weyl), the rank-r fit by up to (1 + s_1 / (s_r - s_{r+1})) |E| (Wedin)
        assert_close_eps(dec.reconstruct_layer(layer), best, k=48, scale=float(s[0] * (1 + s[0] / (s[r - 1] - s[r]))))
        assert_close_eps(torch.diagonal(dec.layer_core(layer)), s[:r], k=48, scale=float(s[0]))
        out = dec.layer_out_factor(layer)
        assert_close_eps(out.T @ out, torch.eye(r), k=out.numel())
        tail += float((s[r:] ** 2).sum())
    expected = math.sqrt(tail) / float(torch.linalg.norm(x.double()))
    assert dec.relative_error == pytest.approx(expected, rel=1e-5)
    assert_close_eps(dec.reconstruct()[2], dec.reconstruct_layer(2), k=r, scale=float(dec.layer_core(2).norm()))
    with pytest.raises(ValueError, match=r"svd .*\(L=6, r, r\)"):
        decompose(x, "svd", (5, r, r))


# ---------------------------------------------------------------------------------------------
# rank rules and input validation
# ---------------------------------------------------------------------------------------------


def test_default_rank_is_clipped_with_warning():
    assert DEFAULT_RANK == 512
    x = torch.randn(3, 16, 12)
    with pytest.warns(UserWarning) as record:
        dec = decompose(x, name="up")
    messages = sorted(str(w.message) for w in record)
    assert messages == [
        "default rank 512 exceeds the in dimension 12 of 'up'; clipped the in rank to 12",
        "default rank 512 exceeds the out dimension 16 of 'up'; clipped the out rank to 16",
    ]
    assert dec.ranks == (3, 16, 12)
    assert dec.relative_error < eps_tolerance(torch.float32, k=x.numel(), scale=1.0)  # full ranks reproduce X
    with pytest.warns(UserWarning, match="clipped svd rank to 12"):
        assert resolve_ranks((3, 16, 12), "svd", None) == (3, 12, 12)
    with pytest.warns(UserWarning, match="clipped cp rank to 12"):
        assert resolve_ranks((3, 16, 12), "cp", None) == (12, 12, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_ranks((3, 600, 700), "tucker", None) == (3, 512, 512)


def test_explicit_rank_rules():
    shape = (4, 16, 12)
    assert resolve_ranks(shape, "tucker", 5) == (4, 5, 5)
    assert resolve_ranks(shape, "tucker", (2, 16, 12)) == (2, 16, 12)
    assert resolve_ranks(shape, "svd", 12) == (4, 12, 12)
    assert resolve_ranks(shape, "cp", 10) == (10, 10, 10)
    with pytest.raises(ValueError, match=r"rank 13 for mode 'in' exceeds its dimension 12"):
        resolve_ranks(shape, "tucker", 13)
    with pytest.raises(ValueError, match=r"rank 5 for mode 'layer' exceeds its dimension 4"):
        resolve_ranks(shape, "tucker", (5, 2, 2))
    with pytest.raises(ValueError, match=r"rank 17 for mode 'out' exceeds its dimension 16"):
        decompose(torch.randn(shape), "tucker", (4, 17, 2))
    with pytest.raises(ValueError, match=r"mode 'out' must be positive, got 0"):
        resolve_ranks(shape, "tucker", 0)
    with pytest.raises(ValueError, match=r"mode 'in' must be positive, got -1"):
        resolve_ranks(shape, "tucker", (1, 2, -1))
    with pytest.raises(ValueError, match="rank tuple"):
        resolve_ranks(shape, "tucker", (1, 2))
    for bad in (2.0, "8", True):
        with pytest.raises(TypeError):
            resolve_ranks(shape, "tucker", bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        resolve_ranks(shape, "tucker", (1, 2.5, 2))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("bad", "exc", "match"),
    [
        (torch.tensor([[[1.0, float("nan")]]]), ValueError, "NaN"),
        (torch.tensor([[[1.0, float("inf")]]]), ValueError, "infinite"),
        (torch.tensor([[[1.0, float("-inf")]]]), ValueError, "infinite"),
        (torch.randn(4, 5), ValueError, "3D"),
        (torch.zeros(0, 4, 5), ValueError, "empty"),
        (torch.zeros(2, 4, 5), ValueError, "all zeros"),
        (torch.ones(2, 4, 5, dtype=torch.int64), TypeError, "floating"),
    ],
)
def test_input_validation(bad, exc, match):
    with pytest.raises(exc, match=match):
        decompose(bad, "tucker", 1)


def test_unknown_method_lists_registered():
    with pytest.raises(ValueError, match=r"unknown decomposition method 'pca'.*'cp'.*'svd'.*'tucker'"):
        decompose(torch.randn(2, 3, 4), "pca")
    with pytest.raises(ValueError, match="registered"):
        resolve_ranks((2, 3, 4), "pca", 1)


def test_register_decomposition_adds_a_method():
    calls = {}

    @register_decomposition("_test_identity_tucker")
    def _fn(tensor, ranks, *, n_iter_max, tol, show_progress):
        calls["args"] = (ranks, n_iter_max, tol, show_progress)
        return DECOMPOSITIONS["tucker"](tensor, ranks, n_iter_max=n_iter_max, tol=tol, show_progress=False)

    try:
        x = torch.randn(3, 6, 5)
        dec = decompose(x, "_test_identity_tucker", 2, n_iter_max=3, tol=1e-3)
        assert calls["args"] == ((3, 2, 2), 3, 1e-3, False) and dec.ranks == (3, 2, 2)
        with pytest.raises(ValueError, match="already registered"):
            register_decomposition("_test_identity_tucker")(lambda *a, **k: None)
    finally:
        DECOMPOSITIONS.pop("_test_identity_tucker", None)


# ---------------------------------------------------------------------------------------------
# serialisation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["tucker", "cp", "svd"])
def test_state_dict_round_trip_through_safetensors(method, low_rank_plus_noise, tmp_path):
    dec = decompose(low_rank_plus_noise, method, 5, n_iter_max=5)
    tensors = dec.state_dict("layers.gate")
    expected_keys = {f"layers.gate.{k}" for k in ("core", "layer_factor", "out_factor", "in_factor")}
    expected_keys |= {f"layers.gate.spectral_energy.{m}" for m in MODES}
    assert set(tensors) == expected_keys
    path = tmp_path / "gene.safetensors"
    save_file(tensors, str(path))
    loaded = Decomposition.from_state_dict(load_file(str(path)), "layers.gate", method, dec.relative_error)
    assert loaded.method == method and loaded.ranks == dec.ranks
    assert loaded.shared_bases == dec.shared_bases and loaded.relative_error == dec.relative_error
    assert torch.equal(loaded.reconstruct(), dec.reconstruct())
    assert loaded.retained_energy() == dec.retained_energy()
    with pytest.raises(KeyError, match="layers.up.core"):
        Decomposition.from_state_dict(tensors, "layers.up", method, 0.0)


# -- tucker_hidden: bases shared along the hidden axis only ------------------------------------------------

@pytest.mark.parametrize("hidden_mode", ["in", "out"])
def test_tucker_hidden_at_full_hidden_rank_is_the_per_layer_truncated_svd(hidden_mode):
    """With U_h spanning the whole hidden axis, the best fit is each layer's own rank-r SVD (Eckart-Young)."""
    x = torch.randn(3, 10, 7, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    if hidden_mode == "out":
        x = x.transpose(1, 2).contiguous()  # (3, 7, 10): hidden axis 7 is the out axis
    hidden = x.shape[2] if hidden_mode == "in" else x.shape[1]
    ranks = (3, 4, hidden) if hidden_mode == "in" else (3, hidden, 4)
    dec = decompose(x, "tucker_hidden", ranks, hidden_mode=hidden_mode)
    residual = sum(float((torch.linalg.svdvals(x[layer])[4:] ** 2).sum()) for layer in range(3))
    assert dec.relative_error == pytest.approx(math.sqrt(residual / float((x ** 2).sum())), rel=1e-9)
    for layer in range(3):  # every rebuilt layer is that layer's best rank-4 approximation
        u, s, vh = torch.linalg.svd(x[layer], full_matrices=False)
        torch.testing.assert_close(dec.reconstruct_layer(layer).double(), u[:, :4] @ torch.diag(s[:4]) @ vh[:4], rtol=1e-5, atol=1e-5)
    assert (dec.shared_in, dec.shared_out) == ((True, False) if hidden_mode == "in" else (False, True))


def test_tucker_hidden_at_full_neuron_rank_is_the_pca_projection_of_the_hidden_axis():
    """With every neuron kept, the fit is X_l U U^T with U the top eigenvectors of sum_l X_l^T X_l."""
    x = torch.randn(4, 5, 9, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    dec = decompose(x, "tucker_hidden", (4, 5, 6), hidden_mode="in")
    evals, evecs = torch.linalg.eigh(sum(x[layer].T @ x[layer] for layer in range(4)))
    u = evecs[:, -6:]
    expected = x @ u @ u.T
    torch.testing.assert_close(dec.reconstruct().double(), expected, rtol=1e-5, atol=1e-5)
    # the shared basis spans the same subspace as the hand-computed one
    torch.testing.assert_close(dec.in_factor @ dec.in_factor.T, (u @ u.T).float(), rtol=1e-5, atol=1e-5)


def test_tucker_hidden_is_exact_at_full_rank_and_beats_tucker_on_unaligned_neurons():
    """Layers whose neurons are permuted copies share nothing along the neuron axis: tucker_hidden keeps them."""
    g = torch.Generator().manual_seed(6)
    base = torch.randn(12, 6, generator=g)
    x = torch.stack([base[torch.randperm(12, generator=g)] for _ in range(5)])  # same rows, shuffled per layer
    assert decompose(x, "tucker_hidden", (5, 6, 6), hidden_mode="in").relative_error < eps_tolerance(
        torch.float32, k=x.numel(), scale=1.0)
    hidden = decompose(x, "tucker_hidden", (5, 4, 4), hidden_mode="in").relative_error
    tucker = decompose(x, "tucker", (5, 4, 4)).relative_error
    assert hidden < tucker


def test_tucker_hidden_refuses_bad_input():
    x = torch.randn(3, 8, 4)
    with pytest.raises(ValueError, match="hidden_mode"):
        decompose(x, "tucker_hidden", (3, 4, 4))
    with pytest.raises(ValueError, match="r_L = L"):
        decompose(x, "tucker_hidden", (2, 4, 4), hidden_mode="in")
    # a neuron-axis rank above the hidden one completes the basis: still orthonormal, the fit of rank 2
    wide = decompose(x.double(), "tucker_hidden", (3, 4, 2), hidden_mode="in")
    narrow = decompose(x.double(), "tucker_hidden", (3, 2, 2), hidden_mode="in")
    assert wide.relative_error == pytest.approx(narrow.relative_error, rel=1e-6)
    assert_close_eps(wide.out_factor[0].T @ wide.out_factor[0], torch.eye(4), k=wide.out_factor[0].numel())
    with pytest.raises(ValueError, match="does not stream"):
        decompose_streaming(x.__getitem__, 3, (8, 4), "tucker_hidden", (3, 4, 4))


# -- activation-aware bases -----------------------------------------------------------------------------

def test_activation_aware_svd_is_the_weighted_eckart_young_fit():
    """Per layer: the best rank-r W_hat under ||(W - W_hat) S|| is SVD_r(W S) S^{-1} (computed by hand)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 9, 6, generator=g, dtype=torch.float64)
    inputs = torch.randn(3, 200, 6, generator=g, dtype=torch.float64) * torch.tensor([5.0, 3, 1, 0.5, 0.2, 0.1])
    moment = inputs.transpose(1, 2) @ inputs / 200
    weight = input_weight_from_moment(moment)
    torch.testing.assert_close(weight @ weight, moment)  # a square root of the moment
    dec = decompose(x, "svd", (3, 2, 2), input_weight=weight)
    plain = decompose(x, "svd", (3, 2, 2))
    for layer in range(3):
        u, s, vh = torch.linalg.svd(x[layer] @ weight[layer])
        expected = u[:, :2] @ torch.diag(s[:2]) @ vh[:2] @ torch.linalg.inv(weight[layer])
        torch.testing.assert_close(dec.reconstruct_layer(layer).double(), expected, rtol=1e-4, atol=1e-4)
        # better on the inputs, worse (or equal) on the weights
        on_inputs = lambda d: float(((x[layer] - d.reconstruct_layer(layer).double()) @ inputs[layer].T).norm())  # noqa: E731
        assert on_inputs(dec) <= on_inputs(plain) + 1e-6
    assert dec.relative_error >= plain.relative_error - 1e-9


def test_activation_aware_with_identity_weight_changes_nothing_and_refuses_bad_weights():
    x = torch.randn(3, 8, 5, generator=torch.Generator().manual_seed(8))
    for method, options in (("tucker", {}), ("tucker_hidden", {"hidden_mode": "in"})):
        weighted = decompose(x, method, (3, 4, 4), input_weight=torch.eye(5), **options)
        plain = decompose(x, method, (3, 4, 4), **options)
        torch.testing.assert_close(weighted.reconstruct(), plain.reconstruct(), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="shares one input factor"):
        decompose(x, "tucker", (3, 4, 4), input_weight=torch.eye(5).expand(3, 5, 5))
    with pytest.raises(ValueError, match="input_weight must be"):
        decompose(x, "tucker", (3, 4, 4), input_weight=torch.eye(4))
    # tucker_hidden's down (hidden axis = out) has a per-layer input factor: a per-layer weight fits
    decompose(x, "tucker_hidden", (3, 4, 4), hidden_mode="out", input_weight=torch.eye(5).expand(3, 5, 5))
