"""Fisher over 2 processes (gloo, CPU) equals the single-process Fisher; device_map="auto" sources work."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from tiny_models import VOCAB, tiny_moe

from unite_hf import compute_expert_importance
from unite_hf.distributed import compute_expert_importance_distributed

CALIBRATION = torch.randint(0, VOCAB, (7, 12), generator=torch.Generator().manual_seed(3))


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = tiny_moe("qwen2_moe")
        importance = compute_expert_importance_distributed(model, CALIBRATION, batch_size=2, diagonal=True,
                                                           show_progress=False)
        tensors = {"fisher": importance.fisher, "frequency": importance.frequency,
                   "num_sequences": torch.tensor(importance.num_sequences)}
        tensors.update({f"diag.{layer}.{proj}": v for (layer, proj), v in importance.fisher_diag.items()})
        save_file(tensors, os.path.join(out_dir, f"rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    reference = compute_expert_importance(tiny_moe("qwen2_moe"), CALIBRATION, diagonal=True, show_progress=False)
    results = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]
    for result in results:
        assert int(result["num_sequences"]) == 7
        torch.testing.assert_close(result["fisher"], reference.fisher, rtol=1e-5, atol=0)
        torch.testing.assert_close(result["frequency"], reference.frequency, rtol=1e-12, atol=0)
        for (layer, proj), value in reference.fisher_diag.items():
            torch.testing.assert_close(result[f"diag.{layer}.{proj}"], value, rtol=1e-5, atol=1e-12)


def test_without_a_process_group_it_is_the_single_process_result():
    model = tiny_moe("mixtral")
    one = compute_expert_importance(model, CALIBRATION, show_progress=False)
    same = compute_expert_importance_distributed(model, CALIBRATION, show_progress=False)
    torch.testing.assert_close(same.fisher, one.fisher)


def test_device_map_auto_source(tmp_path):
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    model = tiny_moe("olmoe")
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="auto", dtype=torch.float32).eval()
    reference = compute_expert_importance(model, CALIBRATION, show_progress=False)
    importance = compute_expert_importance(loaded, CALIBRATION, show_progress=False)
    torch.testing.assert_close(importance.fisher, reference.fisher, rtol=1e-5, atol=0)
