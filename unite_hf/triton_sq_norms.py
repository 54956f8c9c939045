"""A fused Triton kernel for the Fisher's per-group squared gradient norms (issue 15).

For token groups ``n`` (consecutive rows of ``x`` and ``grad``) it computes ``||G_n.T @ X_n||_F^2``
without ever writing the ``(out, in)`` gradient of a group to memory: each program multiplies one
``(BLOCK_OUT, BLOCK_IN)`` tile of one group's gradient over the group's rows (bf16 inputs, float32
accumulation on the tensor cores), squares it in float32 and adds the tile's sum to the group's norm.
The grouped GEMM it replaces (:func:`unite_hf.importance._grouped_direct_sq_norms`) wrote every
group's gradient out in bf16 (2.9 GB a call at Mixtral-like widths) and read it back for the norm;
here the squares are also taken before any rounding to bf16.

Triton is imported lazily: it ships with CUDA builds of torch, and the library never needs it on a
CPU. :func:`available` says whether the kernel can run on a tensor's device.
"""

from __future__ import annotations

import functools
import os

import torch


@functools.cache
def _triton_ok() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ImportError:
        return False
    return True


def available(x: torch.Tensor) -> bool:
    """Whether :func:`grouped_sq_norms` runs for rows like ``x``: Triton importable, a CUDA tensor."""
    return x.device.type == "cuda" and _triton_ok()


@functools.cache
def _kernel(autotune: bool = True):
    """The jitted kernel; with ``autotune`` wrapped in Triton's autotuner over a few tile shapes (keyed
    by the widths), otherwise bare, for Triton's CPU interpreter (``TRITON_INTERPRET=1``), which the
    autotuner's GPU benchmarker cannot run under."""
    import triton
    import triton.language as tl

    @triton.jit
    def grouped_sq_norms_kernel(x_ptr, g_ptr, bounds_ptr, norms_ptr, d_in, d_out,
                                FLOAT32_ROWS: tl.constexpr, BLOCK_OUT: tl.constexpr, BLOCK_IN: tl.constexpr,
                                BLOCK_ROWS: tl.constexpr):
        tile, group = tl.program_id(0), tl.program_id(1)
        tiles_in = tl.cdiv(d_in, BLOCK_IN)
        out_idx = (tile // tiles_in) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
        in_idx = (tile % tiles_in) * BLOCK_IN + tl.arange(0, BLOCK_IN)
        start = tl.load(bounds_ptr + group)
        end = tl.load(bounds_ptr + group + 1)
        acc = tl.zeros((BLOCK_OUT, BLOCK_IN), dtype=tl.float32)
        for row0 in range(start, end, BLOCK_ROWS):
            rows = row0 + tl.arange(0, BLOCK_ROWS)
            in_rows = rows < end
            g = tl.load(g_ptr + rows[:, None] * d_out + out_idx[None, :],
                        mask=in_rows[:, None] & (out_idx[None, :] < d_out), other=0.0)
            x = tl.load(x_ptr + rows[:, None] * d_in + in_idx[None, :],
                        mask=in_rows[:, None] & (in_idx[None, :] < d_in), other=0.0)
            if FLOAT32_ROWS:  # (BLOCK_OUT, BLOCK_IN) += g.T @ x, float32 accumulation; float32 rows not rounded to TF32
                acc = tl.dot(tl.trans(g), x, acc, input_precision="ieee")
            else:
                acc = tl.dot(tl.trans(g), x, acc)
        tl.atomic_add(norms_ptr + group, tl.sum(acc * acc))

    if not autotune:
        return grouped_sq_norms_kernel
    configs = [triton.Config({"BLOCK_OUT": bo, "BLOCK_IN": bi, "BLOCK_ROWS": br}, num_warps=w, num_stages=s)
               for bo, bi, br, w, s in ((128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
                                        (128, 128, 32, 4, 4))]
    return triton.autotune(configs=configs, key=["d_in", "d_out"], reset_to_zero=["norms_ptr"])(grouped_sq_norms_kernel)


def grouped_sq_norms(x: torch.Tensor, grad: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``||G_n.T @ X_n||_F^2`` per group of consecutive rows (``counts`` rows each, a device tensor; empty
    groups allowed) as ``(groups,)`` float32. ``x``: ``(rows, in)``, ``grad``: ``(rows, out)``, bf16 or
    fp16 (what the Fisher passes) or float32 (IEEE products, no TF32), on a CUDA device. No host sync."""
    import triton

    x, grad = x.contiguous(), grad.contiguous()
    bounds = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=x.device)
    bounds[1:] = torch.cumsum(counts, 0)
    norms = torch.zeros(counts.numel(), dtype=torch.float32, device=x.device)
    d_in, d_out = x.shape[1], grad.shape[1]
    float32_rows = x.dtype == torch.float32
    if os.environ.get("TRITON_INTERPRET") == "1":  # Triton's CPU interpreter: fixed small tiles
        blocks = {"BLOCK_OUT": 32, "BLOCK_IN": 32, "BLOCK_ROWS": 16}
        grid = (triton.cdiv(d_out, 32) * triton.cdiv(d_in, 32), counts.numel())
        _kernel(autotune=False)[grid](x, grad, bounds, norms, d_in, d_out, float32_rows, **blocks)
        return norms

    def grid(meta):
        return (triton.cdiv(d_out, meta["BLOCK_OUT"]) * triton.cdiv(d_in, meta["BLOCK_IN"]), counts.numel())

    _kernel()[grid](x, grad, bounds, norms, d_in, d_out, float32_rows)
    return norms
