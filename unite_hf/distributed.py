"""Expert importance over several processes or GPUs: each rank takes a shard of the calibration
sequences, and the Fisher / routing / diagonal-Fisher sums are all-reduced.

Launch one process per device with ``torchrun --nproc_per_node N script.py`` (or ``accelerate
launch``), initialise the process group (gloo on CPU, NCCL on GPUs), load the source on each rank
(or with ``device_map="auto"`` for one model spread over several GPUs in a single process), and call::

    import torch.distributed as dist
    from unite_hf.distributed import compute_expert_importance_distributed

    dist.init_process_group("nccl")            # "gloo" on CPU
    importance = compute_expert_importance_distributed(model, calibration, batch_size=8)

Every rank gets the same :class:`~unite_hf.importance.ExpertImportance`; with empirical labels it
equals the single-process result up to float64 summation order (the Fisher is a sum over sequences
and each sequence's term does not depend on its batch). With ``labels="sampled"`` each rank draws from
its own seeded generator (``seed + rank``), so results depend on the number of processes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .calibration import CalibrationSet
from .importance import ExpertImportance, compute_expert_importance


def _reduce_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    device = _reduce_device()
    buffer = tensor.to(device=device, copy=True)
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    return buffer.cpu()


def compute_expert_importance_distributed(
    model: nn.Module, calibration: CalibrationSet | torch.Tensor, *, seed: int = 0, **kwargs
) -> ExpertImportance:
    """:func:`~unite_hf.importance.compute_expert_importance` on this rank's shard (sequences
    ``rank, rank + world, ...``), all-reduced. Falls back to one process when no process group is
    initialised. ``kwargs`` are those of ``compute_expert_importance``."""
    if not (dist.is_available() and dist.is_initialized()):
        return compute_expert_importance(model, calibration, seed=seed, **kwargs)
    rank, world = dist.get_rank(), dist.get_world_size()
    input_ids = calibration.input_ids if isinstance(calibration, CalibrationSet) else calibration
    if input_ids.ndim != 2 or input_ids.shape[0] < world:
        raise ValueError(f"calibration of shape {tuple(input_ids.shape)} has fewer sequences than the {world} processes")
    if kwargs.get("show_progress", True) and rank != 0:
        kwargs["show_progress"] = False  # one progress bar, on rank 0
    local = compute_expert_importance(model, input_ids[rank::world], seed=seed + rank, **kwargs)
    num_sequences = int(_all_reduce(torch.tensor([local.num_sequences], dtype=torch.float64)).item())
    fisher = _all_reduce(local.fisher * local.num_sequences) / num_sequences
    routed = _all_reduce(local.routed)
    result = ExpertImportance(
        moe_layers=local.moe_layers,
        fisher=fisher,
        frequency=routed / routed.sum(dim=1, keepdim=True).clamp_min(1),
        num_sequences=num_sequences,
        labels=local.labels,
        routed=routed,
    )
    for table in ("fisher_diag", "fisher_diag_bias"):
        values = getattr(local, table)
        if values is not None:
            setattr(result, table, {key: (_all_reduce(v.double() * local.num_sequences) / num_sequences).to(v.dtype)
                                    for key, v in sorted(values.items())})
    return result
