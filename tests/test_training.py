"""Fine-tuning UNITE targets for real: transformers.Trainer on every head, checkpoints and resume,
gradient checkpointing, the shipped accuracy metric through ``evaluate``, peft LoRA, and the
"cores only" mode (paper Theorem A.1).

Everything runs on tiny targets (hidden 32, 2 layers, rank 8) grown from tiny random MoEs, on
synthetic token data with a rule the model can learn in a few steps, so accuracy must rise well
above chance. No mocks: every run is a real ``Trainer.train()``.
"""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path

import evaluate
import numpy as np
import pytest
import torch
from setuptools import find_packages
from tiny_models import VOCAB, tiny_moe
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import (
    AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, PreTrainedTokenizerFast, Trainer,
    TrainingArguments,
)

import unite_hf
from unite_hf import (
    UniteForCausalLM, UniteForMultipleChoice, UniteForSequenceClassification, UniteModel, extract_universal_knowledge,
)
from unite_hf.modeling_unite import UniteFactorizedLinear, _core_std, decoder_layers
from unite_hf.training import (
    ACCURACY_METRIC_PATH, argmax_logits, attention_projection_names, compute_accuracy, compute_token_accuracy,
    core_parameters, head_parameters, load_accuracy_metric, set_trainable,
)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

NUM_LABELS = 3
SEQ_LEN = 10


# -- genes, targets and data ------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these models are tiny, and on a busy 2-core machine a second thread spinning
    on every small op made a training step 200x slower (1.7 s instead of 7 ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _gene(family: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return extract_universal_knowledge(tiny_moe(family), calibration=torch.randint(0, VOCAB, (4, 12)),
                                           show_progress=False)


@pytest.fixture(scope="module")
def gene():
    """Qwen2-MoE: attention biases and a gated shared expert, so 'everything else' is not just attention."""
    return _gene("qwen2_moe")


def grow(cls, gene, seed: int = 0, **kwargs):
    """A 2-layer rank-8 target; random cores (the paper's default) drawn after seeding, so reproducible."""
    torch.manual_seed(seed)
    if cls is UniteForSequenceClassification:
        kwargs.setdefault("num_labels", NUM_LABELS)
    return cls.from_gene(gene, num_hidden_layers=2, rank=8, pad_token_id=0, **kwargs)


def classification_rows(n: int, seed: int) -> list[dict]:
    """Random tokens; the last token is one of two keywords of the label's class (tokens 3..8)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, NUM_LABELS, (n,), generator=g)
    ids = torch.randint(9, VOCAB, (n, SEQ_LEN), generator=g)
    ids[:, -1] = 3 + 2 * labels + torch.randint(0, 2, (n,), generator=g)
    return [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": y} for i, y in zip(ids, labels)]


RIGHT_TOKENS = torch.tensor([3, 5, 7, 9, 11, 13, 15, 17])
WRONG_TOKENS = torch.tensor([4, 6, 8, 10, 12, 14, 16, 18])


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny vocabulary ("t0" .. "t95"; "t0" pads, as pad_token_id=0)."""
    vocab = {f"t{i}": i for i in range(VOCAB)}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="t1"))
    tokenizer.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="t0", unk_token="t1")


def classification_texts(tokenizer, n: int, seed: int) -> list[dict]:
    """The same rule as classification_rows, as texts of 4 to 12 words tokenized one by one: batches need
    padding, so the classifier must pool each sequence's last real token."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        label = int(torch.randint(0, NUM_LABELS, (1,), generator=g))
        length = int(torch.randint(4, 13, (1,), generator=g))
        words = torch.randint(9, VOCAB, (length,), generator=g)
        words[-1] = 3 + 2 * label + int(torch.randint(0, 2, (1,), generator=g))
        rows.append({**tokenizer(" ".join(f"t{w}" for w in words.tolist())), "labels": label})
    return rows


def multiple_choice_rows(n: int, seed: int, choices: int = 3) -> list[dict]:
    """Each choice is random tokens; the right one ends in one of 8 'right' tokens, the others in 'wrong' ones."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, choices, (n,), generator=g)
    ids = torch.randint(19, VOCAB, (n, choices, SEQ_LEN), generator=g)
    ids[:, :, -1] = WRONG_TOKENS[torch.randint(0, 8, (n, choices), generator=g)]
    ids[torch.arange(n), labels, -1] = RIGHT_TOKENS[torch.randint(0, 8, (n,), generator=g)]
    return [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": y} for i, y in zip(ids, labels)]


def causal_lm_rows(n: int, seed: int) -> list[dict]:
    """Counting sequences: each token is the previous one plus one (within tokens 3..VOCAB-1)."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB - 3, (n, 1), generator=g)
    ids = (start + torch.arange(SEQ_LEN)) % (VOCAB - 3) + 3
    return [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": i.clone()} for i in ids]


def training_args(output_dir: Path, **overrides) -> TrainingArguments:
    """Small, deterministic CPU runs: no reporting, no progress bars, no checkpoints unless asked."""
    defaults = {
        "per_device_train_batch_size": 16, "per_device_eval_batch_size": 64, "learning_rate": 1e-2, "max_steps": 12,
        "logging_steps": 1, "eval_strategy": "no", "save_strategy": "no", "report_to": "none", "use_cpu": True,
        "disable_tqdm": True, "seed": 0, "dataloader_num_workers": 0,
    }
    return TrainingArguments(output_dir=str(output_dir), **{**defaults, **overrides})


def train_losses(trainer: Trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def hand_accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    return float((predictions == labels).sum()) / len(labels)


# -- the shipped metric ---------------------------------------------------------------------------

def test_accuracy_metric_is_a_local_evaluate_module_that_ships_with_the_package():
    package_dir = Path(unite_hf.__file__).resolve().parent
    assert Path(ACCURACY_METRIC_PATH).is_relative_to(package_dir)
    # evaluate.load by folder and by file, no Hub: both give the Metric subclass with the same results
    by_folder = evaluate.load(ACCURACY_METRIC_PATH, keep_in_memory=True)
    by_file = evaluate.load(str(Path(ACCURACY_METRIC_PATH) / "accuracy.py"), keep_in_memory=True)
    assert isinstance(by_folder, evaluate.Metric) and type(by_folder).__name__ == "Accuracy"
    assert load_accuracy_metric() is load_accuracy_metric()  # loaded once per process

    rng = np.random.default_rng(0)
    predictions, references = rng.integers(0, 4, 200), rng.integers(0, 4, 200)
    expected = hand_accuracy(predictions, references)
    assert by_folder.compute(predictions=predictions, references=references)["accuracy"] == pytest.approx(expected)
    assert by_file.compute(predictions=predictions, references=references)["accuracy"] == pytest.approx(expected)
    assert by_folder.compute(predictions=[0, 1, 1, 2], references=[0, 1, 2, 2], normalize=False) == {"accuracy": 3}
    weighted = by_folder.compute(predictions=[0, 1], references=[0, 0], sample_weight=[3.0, 1.0])
    assert weighted["accuracy"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="empty"):
        by_folder.compute(predictions=[], references=[])

    # setuptools ships the metric script: its folder is a package under the pyproject's include pattern
    assert "unite_hf.training.metrics.accuracy" in find_packages(str(package_dir.parent), include=["unite_hf*"])


def test_compute_metrics_helpers_equal_hand_computed_accuracy():
    rng = np.random.default_rng(1)
    logits, labels = rng.normal(size=(50, 4)), rng.integers(0, 4, 50)
    assert compute_accuracy((logits, labels))["accuracy"] == pytest.approx(hand_accuracy(logits.argmax(-1), labels))
    # a model output with extra tensors arrives as a tuple; ids pass through as they are
    assert compute_accuracy(((logits, np.zeros(3)), labels)) == compute_accuracy((logits.argmax(-1), labels))

    lm_logits, lm_labels = rng.normal(size=(4, 6, 10)), rng.integers(0, 10, (4, 6))
    lm_labels[0, :3] = -100  # prompt positions are not scored
    ids = argmax_logits(torch.from_numpy(lm_logits), None).numpy()
    keep = lm_labels[:, 1:] != -100
    expected = hand_accuracy(ids[:, :-1][keep], lm_labels[:, 1:][keep])  # prediction at t scores label t + 1
    assert compute_token_accuracy((lm_logits, lm_labels))["accuracy"] == pytest.approx(expected)
    assert compute_token_accuracy((ids, lm_labels))["accuracy"] == pytest.approx(expected)


# -- Trainer on every head ------------------------------------------------------------------------

def test_trainer_fine_tunes_sequence_classifier_with_eval_accuracy(gene, tmp_path):
    """Tokenized texts of different lengths: Trainer pads them with the processing_class's collator."""
    tokenizer = tiny_tokenizer()
    model = grow(UniteForSequenceClassification, gene)
    train, dev = classification_texts(tokenizer, 192, seed=0), classification_texts(tokenizer, 96, seed=1)
    args = training_args(tmp_path, eval_strategy="steps", eval_steps=12)
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=dev, processing_class=tokenizer,
                      compute_metrics=compute_accuracy)
    assert isinstance(trainer.data_collator, DataCollatorWithPadding)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()

    losses = train_losses(trainer)
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3])
    assert after["eval_loss"] < before["eval_loss"]
    assert after["eval_accuracy"] >= 0.9 > before["eval_accuracy"] + 0.3  # chance is 1/3
    # the metric Trainer reported is the plain accuracy of the model's predictions
    output = trainer.predict(dev)
    assert output.metrics["test_accuracy"] == pytest.approx(after["eval_accuracy"])
    labels = np.array([row["labels"] for row in dev])
    assert after["eval_accuracy"] == pytest.approx(hand_accuracy(output.predictions.argmax(-1), labels))
    assert any("eval_accuracy" in entry for entry in trainer.state.log_history[:-1])  # eval_strategy ran in train
    # padding does not change a prediction: each dev row alone gives the same class as in its padded batch
    model.eval()
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([row["input_ids"]])).logits.argmax(-1).item() for row in dev[:16]]
    assert alone == output.predictions[:16].argmax(-1).tolist()


def test_trainer_fine_tunes_multiple_choice(gene, tmp_path):
    model = grow(UniteForMultipleChoice, gene)
    train, dev = multiple_choice_rows(192, seed=0), multiple_choice_rows(96, seed=1)
    trainer = Trainer(model=model, args=training_args(tmp_path), train_dataset=train, eval_dataset=dev,
                      compute_metrics=compute_accuracy)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()

    losses = train_losses(trainer)
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3])
    assert after["eval_loss"] < 0.5 * before["eval_loss"]
    assert after["eval_accuracy"] >= 0.9 and after["eval_accuracy"] > before["eval_accuracy"]  # chance is 1/3
    output = trainer.predict(dev)
    assert output.predictions.shape == (96, 3)
    labels = np.array([row["labels"].item() for row in dev])
    assert after["eval_accuracy"] == pytest.approx(hand_accuracy(output.predictions.argmax(-1), labels))


def test_trainer_fine_tunes_causal_lm_with_token_accuracy(gene, tmp_path):
    model = grow(UniteForCausalLM, gene)
    train, dev = causal_lm_rows(192, seed=0), causal_lm_rows(32, seed=1)
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=16), train_dataset=train, eval_dataset=dev,
                      compute_metrics=compute_token_accuracy, preprocess_logits_for_metrics=argmax_logits)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()

    assert after["eval_loss"] < 0.7 * before["eval_loss"]
    assert after["eval_accuracy"] > before["eval_accuracy"] + 0.2
    # hand-computed next-token accuracy from the model's own logits
    ids = torch.stack([row["input_ids"] for row in dev])
    model.eval()
    with torch.no_grad():
        predicted = model(input_ids=ids).logits.argmax(-1)
    expected = (predicted[:, :-1] == ids[:, 1:]).float().mean().item()
    assert after["eval_accuracy"] == pytest.approx(expected)


@pytest.mark.parametrize("cls", [UniteForSequenceClassification, UniteForMultipleChoice, UniteForCausalLM])
def test_gradient_accumulation_matches_one_big_batch(gene, cls, tmp_path):
    """One SGD step (no clipping) on 8 rows: 2 micro-batches of 4 must equal 1 batch of 8."""
    rows = {UniteForSequenceClassification: classification_rows, UniteForMultipleChoice: multiple_choice_rows,
            UniteForCausalLM: causal_lm_rows}[cls](8, seed=0)
    initial = grow(cls, gene)
    results = {}
    for accumulation, batch_size in ((1, 8), (2, 4)):
        model = copy.deepcopy(initial)
        args = training_args(tmp_path / str(accumulation), max_steps=1, per_device_train_batch_size=batch_size,
                             gradient_accumulation_steps=accumulation, optim="sgd", max_grad_norm=0.0, learning_rate=0.1)
        trainer = Trainer(model=model, args=args, train_dataset=rows)
        trainer.train()
        results[accumulation] = snapshot(model), train_losses(trainer)
    assert results[2][1] == pytest.approx(results[1][1], rel=1e-5)
    for name, value in results[1][0].items():
        torch.testing.assert_close(results[2][0][name], value, rtol=0, atol=1e-6, msg=name)


def test_random_core_init_gives_a_finite_model_that_trains(gene, tmp_path):
    """The paper's default (random cores): cores drawn at the documented scale, finite loss, and it trains."""
    model = grow(UniteForSequenceClassification, gene, core_init="random")
    # the documented scale, written out: std * sqrt(d_out * d_in / (r_out * r_in)), so that the rebuilt
    # U_out G U_in^T has the entry std of a dense init (orthonormal bases keep the Frobenius norm)
    assert _core_std(0.02, 48, 40, torch.empty(12, 10)) == pytest.approx(0.02 * 4.0, rel=1e-12)
    standardised = []
    for module in model.modules():
        if isinstance(module, UniteFactorizedLinear):
            r_out, r_in = module.core.shape
            expected = model.config.initializer_range * math.sqrt(module.d_out * module.d_in / (r_out * r_in))
            assert torch.isfinite(module.core).all()
            standardised.append(module.core.detach().flatten().double() / expected)
    pooled = torch.cat(standardised)  # all cores together, in units of their own expected std: N(0, 1)
    assert len(standardised) == len(core_parameters(model)) and pooled.numel() > 300  # a 4-sigma band of about 14% on the std
    assert abs(pooled.std().item() - 1.0) < 4 / math.sqrt(2 * pooled.numel()), pooled.std()
    assert abs(pooled.mean().item()) < 4 / math.sqrt(pooled.numel())
    trainer = Trainer(model=model, args=training_args(tmp_path), train_dataset=classification_rows(192, seed=0))
    trainer.train()
    losses = train_losses(trainer)
    assert all(math.isfinite(x) for x in losses) and np.mean(losses[-3:]) < np.mean(losses[:3])


# -- checkpoints ----------------------------------------------------------------------------------

def test_resume_from_checkpoint_reproduces_the_uninterrupted_run(gene, tmp_path):
    """Run A trains 8 steps and saves at step 4. Run B starts from the initial weights, resumes from A's
    step-4 checkpoint (weights, optimizer, scheduler, RNG, data order) and must end where A ended."""
    initial = grow(UniteForSequenceClassification, gene)
    train = classification_rows(128, seed=0)
    args = {"max_steps": 8, "save_strategy": "steps", "save_steps": 4, "learning_rate": 3e-3}

    run_a = Trainer(model=copy.deepcopy(initial), args=training_args(tmp_path / "a", **args), train_dataset=train,
                    processing_class=tiny_tokenizer())
    run_a.train()
    checkpoint = tmp_path / "a" / "checkpoint-4"
    assert (checkpoint / "model.safetensors").is_file() and (checkpoint / "optimizer.pt").is_file()
    assert AutoTokenizer.from_pretrained(checkpoint)("t5 t7")["input_ids"] == [5, 7]  # the processing_class too

    run_b = Trainer(model=copy.deepcopy(initial), args=training_args(tmp_path / "b", **args), train_dataset=train)
    run_b.train(resume_from_checkpoint=str(checkpoint))
    assert run_b.state.global_step == 8
    # the history of steps 1-4 came from the checkpoint; steps 5-8 are new and match run A's
    assert [e["step"] for e in run_b.state.log_history if "loss" in e] == list(range(1, 9))
    assert train_losses(run_b) == pytest.approx(train_losses(run_a), abs=1e-6)
    final_a, final_b = snapshot(run_a.model), snapshot(run_b.model)
    start = snapshot(initial)
    assert any(not torch.equal(final_a[n], start[n]) for n in start)
    for name in final_a:
        torch.testing.assert_close(final_b[name], final_a[name], rtol=0, atol=1e-6, msg=name)

    # a checkpoint is a normal saved target: it loads through the Auto classes after `import unite_hf`
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "a" / "checkpoint-8")
    assert isinstance(loaded, UniteForSequenceClassification)
    ids = torch.stack([row["input_ids"] for row in train[:8]])
    run_a.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, run_a.model(input_ids=ids).logits)


# -- gradient checkpointing -----------------------------------------------------------------------

def _checkpointing_run(model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor], int, int]:
    """Loss, gradients, how many decoder-layer submodules ran again in the backward pass, and how many
    tensors autograd kept outside activation checkpoints (an outer saved-tensor hook sees only those)."""
    in_backward, recomputed, kept = [False], [], []
    layers = decoder_layers(model.model.backbone)
    hooks = [module.register_forward_hook(lambda *_: recomputed.append(1) if in_backward[0] else None)
             for module in layers.modules()]
    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(1) or t, lambda t: t):
        loss = model(**batch).loss
    in_backward[0] = True
    loss.backward()
    for hook in hooks:
        hook.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, len(recomputed), len(kept)


@pytest.mark.parametrize("cls", [UniteForSequenceClassification, UniteForMultipleChoice, UniteForCausalLM])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(gene, cls):
    model = grow(cls, gene).train()  # dropout is 0 in these configs: train mode is deterministic
    rows = {UniteForSequenceClassification: classification_rows, UniteForMultipleChoice: multiple_choice_rows,
            UniteForCausalLM: causal_lm_rows}[cls](8, seed=0)
    batch = {key: torch.stack([row[key] for row in rows]) for key in rows[0]}

    loss, grads, recomputed, kept = _checkpointing_run(model, batch)
    model.gradient_checkpointing_enable()  # what Trainer(gradient_checkpointing=True) calls
    assert model.is_gradient_checkpointing
    loss_ckpt, grads_ckpt, recomputed_ckpt, kept_ckpt = _checkpointing_run(model, batch)

    # checkpointing is really on: the layers ran again in the backward pass, and their activations
    # (UNITE FFNs included) were not kept by the forward pass
    assert recomputed == 0 < recomputed_ckpt
    assert kept_ckpt < kept / 3
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=1e-5)
    assert grads_ckpt.keys() == grads.keys() == {n for n, p in model.named_parameters()}
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=0, atol=1e-5, msg=name)


# -- what trains ----------------------------------------------------------------------------------

def test_cores_only_training_changes_only_cores_and_head(gene, tmp_path):
    """Theorem A.1's hypothesis class: bases (tied here, one set for all layers), embeddings, attention,
    norms and shared experts stay bit-identical; the cores and the task head move. Run with gradient
    checkpointing on: with the embeddings frozen, reentrant checkpointing would silently stop the
    cores' gradients."""
    model = grow(UniteForSequenceClassification, gene, tie_bases=True)
    breakdown = model.unite_parameter_breakdown()
    trainable = set_trainable(model, "cores")
    assert trainable == breakdown["cores"] + breakdown["head"] == sum(p.numel() for p in model.parameters()
                                                                      if p.requires_grad)
    cores, head = set(core_parameters(model)), set(head_parameters(model))
    assert len(cores) == 2 * 3 and head == {"score.weight"}  # 2 layers x (gate, up, down)
    assert any(name.startswith("model.unite_bases.") for name in snapshot(model))

    before = snapshot(model)
    train, dev = classification_rows(192, seed=0), classification_rows(96, seed=1)
    args = training_args(tmp_path, gradient_checkpointing=True)
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=dev, compute_metrics=compute_accuracy)
    trainer.train()
    assert model.is_gradient_checkpointing
    after = snapshot(model)

    for name in before:
        if name in cores or name in head:
            assert not torch.equal(after[name], before[name]), f"{name} did not train"
        else:
            assert torch.equal(after[name], before[name]), f"{name} changed in cores-only mode"
    losses = train_losses(trainer)
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    assert trainer.evaluate()["eval_accuracy"] > 0.6  # chance is 1/3


def test_set_trainable_modes(gene):
    model = grow(UniteForSequenceClassification, gene)
    total = sum(p.numel() for p in model.parameters())
    assert set_trainable(model, "heads") == NUM_LABELS * 32
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["score.weight"]
    assert set_trainable(model, "all") == total
    with pytest.raises(ValueError, match="unknown trainable mode 'bases'.*'all', 'cores', 'heads'"):
        set_trainable(model, "bases")

    lm = grow(UniteForCausalLM, gene)
    assert set_trainable(lm, "cores") == lm.unite_parameter_breakdown()["cores"] + VOCAB * 32  # + untied lm_head
    with pytest.raises(ValueError, match="no task head"):
        set_trainable(lm.model, "cores")
    assert isinstance(lm.model, UniteModel)
    with pytest.raises(TypeError, match="UNITE target"):
        set_trainable(torch.nn.Linear(2, 2), "all")


# -- peft -----------------------------------------------------------------------------------------

def test_attention_projection_names_follow_the_family(gene):
    assert attention_projection_names(grow(UniteForCausalLM, gene)) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    mla = attention_projection_names(grow(UniteForCausalLM, _gene("deepseek_v3")))
    assert {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"} <= set(mla)
    assert not {"gate", "up", "down", "gate_proj", "up_proj", "down_proj"} & set(mla)  # FFNs are not attention


def test_lora_trains_merges_and_saves_a_classifier(gene, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    base = grow(UniteForSequenceClassification, gene)
    initial_base = snapshot(base)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS")
    peft_model = get_peft_model(base, config)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    lora = {n for n in trainable if ".lora_A." in n or ".lora_B." in n}
    assert len(lora) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    # SEQ_CLS adds the new score head as a module to save; nothing else trains
    assert trainable - lora == {"base_model.model.score.modules_to_save.default.weight"}
    before = snapshot(peft_model)

    train, dev = classification_rows(192, seed=0), classification_rows(96, seed=1)
    trainer = Trainer(model=peft_model, args=training_args(tmp_path / "run"), train_dataset=train, eval_dataset=dev,
                      compute_metrics=compute_accuracy)
    trainer.train()
    after = snapshot(peft_model)
    for name in before:
        changed = not torch.equal(after[name], before[name])
        assert changed == (name in trainable), name
    assert trainer.evaluate()["eval_accuracy"] > 0.6

    ids = torch.stack([row["input_ids"] for row in dev[:16]])
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    # the adapter saves alone and reloads onto a fresh copy of the same target
    peft_model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    fresh = grow(UniteForSequenceClassification, gene)
    assert all(torch.equal(p, initial_base[n]) for n, p in fresh.named_parameters())
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=0, atol=1e-5)

    # merged: a plain UNITE target again, same outputs, saved and loaded through the Auto classes
    merged = peft_model.merge_and_unload()
    assert isinstance(merged, UniteForSequenceClassification)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=0, atol=1e-5)
    merged.save_pretrained(tmp_path / "merged")
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=0, atol=1e-5)


def test_lora_on_deepseek_mla_causal_lm_trains_only_lora():
    from peft import LoraConfig, get_peft_model

    model = grow(UniteForCausalLM, _gene("deepseek_v3"))
    assert model.config.ffn_layers == [1]  # layer 0 is DeepSeek's dense first layer
    config = LoraConfig(r=4, target_modules=["q_b_proj", "kv_b_proj"], task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 2 * 2

    rows = causal_lm_rows(16, seed=0)
    batch = {key: torch.stack([row[key] for row in rows]) for key in rows[0]}
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = peft_model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] and all(math.isfinite(x) for x in losses)

    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(input_ids=batch["input_ids"]).logits
        merged = peft_model.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=batch["input_ids"]).logits, expected, rtol=0, atol=1e-5)
