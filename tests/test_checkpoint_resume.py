"""Trainer checkpoints of UNITE targets, for every family the library grows targets from (issue 22, 1.1).

``Trainer`` puts a checkpoint's weights back with a plain ``model.load_state_dict`` (``resume_from_checkpoint``,
``load_best_model_at_end``), without transformers' key conversion. A target's checkpoint must therefore hold
its weights under their in-memory names. Mixtral's conversion mapping renames ``block_sparse_moe`` to ``mlp``
on load and back on save; the UNITE FFN, which sits at ``mlp``, was saved as ``block_sparse_moe`` and every
one of its tensors was silently left out on resume (one warning line; training went on from the initial FFN).

Each test runs real ``Trainer`` runs on a tiny causal LM target (2 layers, rank 8) with one thread, so runs
are deterministic and the checks are exact (``torch.equal``, not a tolerance).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import FAMILIES, VOCAB, tiny_moe
from transformers import Trainer, TrainerCallback, TrainingArguments

from unite_hf import UniteForCausalLM, extract_universal_knowledge

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SEQ_LEN = 10
STEPS, SAVE_EVERY = 6, 2  # checkpoints (and evaluations) at steps 2, 4 and 6


@pytest.fixture(scope="module")
def genes():
    made = {}

    def gene(family: str):
        if family not in made:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                calibration = torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(1))
                made[family] = extract_universal_knowledge(tiny_moe(family), calibration=calibration, show_progress=False)
        return made[family]

    return gene


def grow(gene) -> UniteForCausalLM:
    torch.manual_seed(0)  # the random cores
    return UniteForCausalLM.from_gene(gene, num_hidden_layers=2, rank=8, pad_token_id=0)


def counting_rows(n: int, seed: int) -> list[dict]:
    """Each token is the previous one plus one (within tokens 3..VOCAB-1): learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    ids = (torch.randint(0, VOCAB - 3, (n, 1), generator=g) + torch.arange(SEQ_LEN)) % (VOCAB - 3) + 3
    return [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": i.clone()} for i in ids]


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_same_weights(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    assert actual.keys() == expected.keys()
    diffs = {n: (actual[n] - expected[n]).abs().max().item() for n in expected if not torch.equal(actual[n], expected[n])}
    assert not diffs, f"{what}: {len(diffs)} of {len(expected)} tensors differ, max diff {max(diffs.values()):.3g}: {sorted(diffs)[:4]}"


class WeightsAtSave(TrainerCallback):
    """The model's weights at every checkpoint, by step (taken in memory, not read back from the file)."""

    def __init__(self) -> None:
        self.at_step: dict[int, dict[str, torch.Tensor]] = {}

    def on_save(self, args, state, control, model=None, **kwargs):
        self.at_step[state.global_step] = weights(model)


def run(model, output_dir, resume_from=None) -> tuple[Trainer, WeightsAtSave]:
    """Train ``STEPS`` steps, saving and evaluating every ``SAVE_EVERY``, then load the best checkpoint.

    The metric picks the *earliest* checkpoint as the best, so loading it at the end visibly changes the
    weights (a metric from the losses could pick the last one, whose weights the model holds anyway)."""
    saved = WeightsAtSave()
    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=STEPS, per_device_train_batch_size=8, per_device_eval_batch_size=16,
        learning_rate=1e-2, logging_steps=1, eval_strategy="steps", eval_steps=SAVE_EVERY, save_strategy="steps",
        save_steps=SAVE_EVERY, load_best_model_at_end=True, metric_for_best_model="step", greater_is_better=False,
        report_to="none", use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=counting_rows(64, seed=0),
                      eval_dataset=counting_rows(16, seed=1), callbacks=[saved],
                      compute_metrics=lambda _: {"step": trainer.state.global_step})
    trainer.train(resume_from_checkpoint=resume_from)
    return trainer, saved


@pytest.mark.parametrize("family", list(FAMILIES))
def test_resume_and_load_best_model_restore_every_weight_exactly(genes, family, tmp_path):
    """Run A trains uninterrupted; run B starts from the same initial weights and resumes from A's step-2
    checkpoint. B's weights at step 6 must equal A's bit for bit, and with ``load_best_model_at_end`` both
    end on the step-2 checkpoint's weights, exactly."""
    initial = grow(genes(family))
    start = weights(initial)
    trainer_a, saved_a = run(copy.deepcopy(initial), tmp_path / "a")
    assert sorted(saved_a.at_step) == [2, 4, 6]
    assert trainer_a.state.best_model_checkpoint == str(tmp_path / "a" / "checkpoint-2")
    # the runs train every tensor (else the checks below could pass on untouched weights)
    assert all(not torch.equal(saved_a.at_step[2][n], start[n]) for n in start)
    assert all(not torch.equal(saved_a.at_step[6][n], saved_a.at_step[2][n]) for n in start)

    # a checkpoint holds the weights under the names Trainer's load_state_dict looks for
    tensors = load_file(tmp_path / "a" / "checkpoint-2" / "model.safetensors")
    assert set(tensors) == set(initial.state_dict())
    assert_same_weights({n: tensors[n] for n in start}, saved_a.at_step[2], "checkpoint-2 on disk")

    assert_same_weights(weights(trainer_a.model), saved_a.at_step[2], "A after load_best_model_at_end")

    trainer_b, saved_b = run(copy.deepcopy(initial), tmp_path / "b", resume_from=str(tmp_path / "a" / "checkpoint-2"))
    assert sorted(saved_b.at_step) == [4, 6] and trainer_b.state.global_step == STEPS
    assert_same_weights(saved_b.at_step[6], saved_a.at_step[6], "resumed run B vs uninterrupted run A at step 6")
    assert_same_weights(weights(trainer_b.model), saved_a.at_step[2], "B after load_best_model_at_end")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_targets_saved_under_the_legacy_names_still_load(genes, family, tmp_path):
    """Targets saved before the fix hold Mixtral's FFN as ``block_sparse_moe`` (transformers' reversed key
    mapping, ``save_original_format=True``): ``from_pretrained`` still renames them back, exactly, and a
    re-save writes the in-memory names."""
    model = grow(genes(family))
    model.save_pretrained(tmp_path / "legacy", save_original_format=True)
    legacy_names = set(load_file(tmp_path / "legacy" / "model.safetensors"))
    if family == "mixtral":
        assert any(".block_sparse_moe." in n for n in legacy_names)
    loaded = UniteForCausalLM.from_pretrained(tmp_path / "legacy")
    assert_same_weights(weights(loaded), weights(model), "loaded from the legacy names")
    loaded.save_pretrained(tmp_path / "resaved")
    assert set(load_file(tmp_path / "resaved" / "model.safetensors")) <= set(model.state_dict())
