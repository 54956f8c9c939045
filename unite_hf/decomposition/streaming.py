"""Layer-streaming HOOI: the Tucker solver behind both :func:`~unite_hf.decomposition.decompose`
(in memory, ``"tucker"``) and :func:`~unite_hf.decomposition.decompose_streaming` (one layer at a time)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .base import (
    _PROGRESS_LABEL,
    _cumulative_energy,
    _leading_left_singular_vectors,
    _sign_normalise,
    _sorted_eigh,
    _sq_norm,
)


#: Mode dimension up to which a factor update uses the exact Gram + eigh; larger modes use a
#: warm-started block subspace iteration (Rayleigh-Ritz), which costs O(dim * rank) per product
#: instead of O(dim^2) memory and O(dim^3) eigh.
EIGH_LIMIT = 2048
#: Extra columns carried by the subspace iteration (faster convergence past near-equal singular values).
OVERSAMPLE = 32

LayerFn = Callable[[int], torch.Tensor]


class _Layers:
    """Reads layer ``l`` of X through ``layer_fn``: checks shape and finiteness, casts, counts reads."""

    def __init__(self, layer_fn: LayerFn, num_layers: int, shape: tuple[int, int], dtype: torch.dtype,
                 device: torch.device | str | None, bar) -> None:
        self.layer_fn, self.num_layers, self.shape = layer_fn, num_layers, tuple(shape)
        self.dtype, self.device, self.bar = dtype, device, bar
        self.checked: set[int] = set()
        self.reads = 0  # the bar counts passes over the layers: one step per num_layers reads

    def __call__(self, layer: int) -> torch.Tensor:
        x = self.layer_fn(layer)
        if layer not in self.checked:
            label = _PROGRESS_LABEL.get()
            where = f" of {label!r}" if label else ""
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"layer_fn({layer}){where} returned {type(x).__name__}, expected a torch.Tensor")
            if tuple(x.shape) != self.shape:
                raise ValueError(f"layer_fn({layer}){where} returned shape {tuple(x.shape)}, expected {self.shape}")
            if not x.is_floating_point():
                raise TypeError(f"layer_fn({layer}){where} returned dtype {x.dtype}, expected floating point")
            if not torch.isfinite(x).all():
                raise ValueError(f"layer {layer}{where} contains NaN or infinite values")
            self.checked.add(layer)
        x = x.detach().to(device=self.device, dtype=self.dtype)
        self.reads += 1
        if self.bar is not None and self.reads % self.num_layers == 0:
            self.bar.update(1)
        return x


def _left_singular(m: torch.Tensor, mode: int, rank: int, warm: torch.Tensor | None, solver: str,
                   power_iters: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``rank`` left singular vectors of the mode-``mode`` (1 or 2) unfolding of ``m`` (A, B, C),
    and the squared singular values found (all of them for eigh, the top ``rank`` for subspace)."""
    n = m.shape[mode]
    if solver == "eigh" or (solver == "auto" and n <= EIGH_LIMIT) or rank >= n:
        return _leading_left_singular_vectors(m, mode, rank)
    # Operators of M = unfold(m, mode) without forming it: M^T q and M y, one slice of m at a time.
    if mode == 1:
        def mt(q):  # (A, C, k)
            return torch.matmul(m.transpose(1, 2), q)

        def mv(y):
            out = m.new_zeros(n, y.shape[-1])
            for a in range(m.shape[0]):
                out.addmm_(m[a], y[a])
            return out
    else:
        def mt(q):  # (A, B, k)
            return torch.matmul(m, q)

        def mv(y):
            out = m.new_zeros(n, y.shape[-1])
            for a in range(m.shape[0]):
                out.addmm_(m[a].T, y[a])
            return out
    k = min(n, rank + OVERSAMPLE)
    gen = torch.Generator().manual_seed(seed)
    fresh = torch.randn(n, k if warm is None else k - warm.shape[1], generator=gen, dtype=m.dtype).to(m.device)
    q = fresh if warm is None else torch.cat([warm, fresh], dim=1)
    q = torch.linalg.qr(q).Q
    for _ in range(power_iters + (2 if warm is None else 0)):
        q = torch.linalg.qr(mv(mt(q))).Q
    # Rayleigh-Ritz: the best rank-k basis within span(q), ordered by captured energy.
    b = mt(q)  # (A, *, k): q^T M in blocks
    small = torch.einsum("abk,abj->kj", b, b)  # q^T M M^T q, (k, k)
    evals, evecs = _sorted_eigh(small)
    return q @ evecs[:, :rank], evals[:rank]


def _streaming_hooi(
    read_fn: LayerFn,
    num_layers: int,
    shape: tuple[int, int],
    ranks: tuple[int, int, int],
    *,
    n_iter_max: int,
    tol: float,
    init: str,
    solver: str,
    power_iters: int,
    dtype: torch.dtype,
    device: torch.device | str | None,
    show_progress: bool,
    layer_gram: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor], float]:
    """HOOI that only ever holds one layer of X plus the projected tensors X U_in (L, d_out, r_in) and
    U_out^T X (L, r_out, d_in).  Each sweep reads every layer twice (once per projection).

    ``init="hosvd"``: exact truncated HOSVD, from the out/in Gram matrices summed over layers (one
    read of X; costs ``L d_out d_in (d_out + d_in)`` flops) and ``layer_gram`` if given (otherwise
    the layer factor comes from the first projected tensor).  ``init="random"``: a seeded Gaussian
    sketch of the in-mode range (one read, ``2 L d_out d_in r_in`` flops); the out factor is found
    in the first sweep.  Returns (core, U_L, U_out, U_in, spectral_energy, approximate_error).
    """
    n_layers, (d_out, d_in) = num_layers, shape
    r_l, r_out, r_in = ranks
    passes = 1 + 2 * n_iter_max if n_iter_max else 2
    bar = None
    if show_progress:
        from tqdm.auto import tqdm

        # one bar per projection, in passes over the layers (HOOI may converge before the last)
        bar = tqdm(total=passes, desc=f"tucker decomposition {_PROGRESS_LABEL.get()}".strip(), unit="pass", leave=False)
    read = _Layers(read_fn, n_layers, shape, dtype, device, bar)
    exact_energy = init == "hosvd"
    energies: dict[str, torch.Tensor] = {}
    x_sq = 0.0
    u_l = u_out = None
    if init == "hosvd":
        g_out = torch.zeros(d_out, d_out, dtype=dtype, device=device)
        g_in = torch.zeros(d_in, d_in, dtype=dtype, device=device)
        for layer in range(n_layers):
            x = read(layer)
            x_sq += _sq_norm(x)
            g_out.addmm_(x, x.T)
            g_in.addmm_(x.T, x)
        for name, gram, rank, other in (("out", g_out, r_out, n_layers * d_in), ("in", g_in, r_in, n_layers * d_out)):
            evals, evecs = _sorted_eigh(gram)
            energies[name] = _cumulative_energy(evals[: min(gram.shape[0], other)])
            basis = evecs[:, :rank]
            if name == "out":
                u_out = basis
            else:
                u_in = basis
        del g_out, g_in
        if layer_gram is not None:
            evals, evecs = _sorted_eigh(layer_gram.to(dtype))
            energies["layer"] = _cumulative_energy(evals[: min(n_layers, d_out * d_in)])
            u_l = evecs[:, :r_l]
    elif init == "random":
        gen = torch.Generator().manual_seed(0)
        k = min(d_in, r_in + OVERSAMPLE)
        sketch = torch.zeros(d_in, k, dtype=dtype, device=device)
        for layer in range(n_layers):
            x = read(layer)
            x_sq += _sq_norm(x)
            sketch.addmm_(x.T, torch.randn(d_out, k, generator=gen, dtype=dtype).to(device))
        u_in = torch.linalg.qr(sketch).Q[:, :r_in]
        del sketch
    else:
        raise ValueError(f"init must be 'hosvd' or 'random', got {init!r}")
    if x_sq == 0.0:
        raise ValueError(f"tensor{' ' + repr(_PROGRESS_LABEL.get()) if _PROGRESS_LABEL.get() else ''} is all zeros; "
                         "its decomposition is undefined")

    def project_in(u):  # (L, d_out, r_in) = X_l @ U_in for every layer
        z = torch.empty(n_layers, d_out, u.shape[1], dtype=dtype, device=device)
        for layer in range(n_layers):
            torch.matmul(read(layer), u, out=z[layer])
        return z

    def project_out(u):  # (L, r_out, d_in) = U_out^T @ X_l for every layer
        w = torch.empty(n_layers, u.shape[1], d_in, dtype=dtype, device=device)
        for layer in range(n_layers):
            torch.matmul(u.T, read(layer), out=w[layer])
        return w

    def layer_update(t):  # U_L from the (L, r_out, r_in) projection; exact (L x L Gram)
        flat = t.reshape(n_layers, -1)
        evals, evecs = _sorted_eigh(flat @ flat.T)
        return evecs[:, :r_l], evals

    def compress_layers(u, t):  # t x_1 U_L^T; skipped when U_L is square (a rotation changes no subspace)
        return t if u is None or r_l == n_layers else torch.tensordot(u, t, dims=([0], [0]))

    core_norm = None
    core = None
    out_evals = in_evals = layer_evals = None
    for _ in range(n_iter_max):
        z = project_in(u_in)  # (L, d_out, r_in)
        if u_out is not None:
            u_l, layer_evals = layer_update(torch.matmul(u_out.T, z))
        u_out, out_evals = _left_singular(compress_layers(u_l, z), 1, r_out, u_out, solver, power_iters)
        del z
        w = project_out(u_out)  # (L, r_out, d_in)
        if u_l is None:  # random init: the first layer factor, from the projection through U_out and U_in
            u_l, layer_evals = layer_update(torch.matmul(w, u_in))
        y = compress_layers(u_l, w)
        del w
        u_in, in_evals = _left_singular(y, 2, r_in, u_in, solver, power_iters)
        core = torch.matmul(y, u_in)  # (r_L or L, r_out, r_in)
        if r_l == n_layers and u_l is not None:
            core = torch.tensordot(u_l, core, dims=([0], [0]))
        new_norm = float(torch.linalg.vector_norm(core, dtype=torch.float64))
        change = abs(new_norm - core_norm) / max(core_norm, 1e-300) if core_norm is not None else float("inf")
        core_norm = new_norm
        if bar is not None:
            bar.set_postfix(rel_err=f"{math.sqrt(max(0.0, 1.0 - new_norm ** 2 / x_sq)):.4g}", change=f"{change:.1e}")
        if change < tol:
            break
    if core is None:  # n_iter_max == 0: the core of the initial factors
        t = torch.matmul(project_out(u_out), u_in)  # (L, r_out, r_in)
        if u_l is None:
            u_l, layer_evals = layer_update(t)
        core = torch.tensordot(u_l, t, dims=([0], [0]))
    if bar is not None:
        bar.close()

    if not exact_energy or "layer" not in energies:
        # Lower bounds from the projected tensors (exact energies would cost a full Gram of X).
        found = {"layer": layer_evals, "out": out_evals, "in": in_evals}
        for name, evals in found.items():
            if name not in energies or not exact_energy:
                if evals is None:
                    evals = torch.zeros(1, dtype=torch.float64)
                energies[name] = (torch.cumsum(evals.double(), 0) / x_sq).clamp(0.0, 1.0).float()
    approx_error = math.sqrt(max(0.0, 1.0 - _sq_norm(core) / x_sq))
    u_l, s_l = _sign_normalise(u_l)
    u_out, s_out = _sign_normalise(u_out)
    u_in, s_in = _sign_normalise(u_in)
    core = core * s_l[:, None, None] * s_out[None, :, None] * s_in[None, None, :]
    return core, u_l, u_out, u_in, energies, approx_error
