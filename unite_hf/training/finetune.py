"""Fine-tune a target on a task with ``transformers.Trainer``: the engine of ``unite-hf finetune``,
the benchmarks and the demo.

Three initialisations of the *same* target architecture, so that comparisons isolate the weights:

- ``"unite"``: grown from the gene (``from_gene``: copied embeddings, attention and norms; FFN bases
  from the gene; cores per ``core_init``, random by default as in the paper);
- ``"random"``: every weight random (the paper's baseline);
- ``"copy-only"``: the copied embeddings, attention and norms, but random FFN weights (bases, cores,
  shared experts and dense MLPs). The ablation the paper lacks: it isolates what the gene's FFN
  bases add on top of simply copying the rest of the source.

Genes with gene matrices (MASA, and XPERT's consolidated cores) also grow plain **Llama targets** of
any width (``width=``, the hidden size; a MASA gene always does): ``"masa"`` fills the FFNs through
:func:`unite_hf.llama_targets.masa_init` and ``"random"`` is the same Llama config with every weight
random. Their embeddings and attention are random either way, so ``pretrain_tokens`` runs a short
continued pretraining (:mod:`unite_hf.training.pretrain`) on local text before the task.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..seeding import seeded, seeded_by_argument

if TYPE_CHECKING:  # pragma: no cover - the tasks package imports datasets: kept out of this module's import
    from .tasks.schema import TaskSpec

INITS: tuple[str, ...] = ("unite", "random", "copy-only", "masa")
LLAMA_INITS: tuple[str, ...] = ("masa", "random")
FORMATS: tuple[str, ...] = ("classification", "multiple_choice")


def _head_class(fmt: str):
    from ..modeling_unite import UniteForMultipleChoice, UniteForSequenceClassification

    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    return UniteForSequenceClassification if fmt == "classification" else UniteForMultipleChoice


def _is_gene(model: Any) -> bool:
    from ..gene import CONFIG_NAME, Gene

    if isinstance(model, Gene):
        return True
    if not isinstance(model, (str, os.PathLike)):
        return False
    if Path(model).exists():
        return (Path(model) / CONFIG_NAME).is_file()
    from ..cards import hub_id

    if hub_id(model) is None:
        return False
    from huggingface_hub import hf_hub_download

    try:  # a Hub repo holds a gene when it has a gene config (downloaded once; load_gene reuses the cache)
        hf_hub_download(str(model), CONFIG_NAME)
    except Exception:  # noqa: BLE001 - missing file, missing repo, offline: not a gene; from_pretrained says why
        return False
    return True


FFN_SLOT_NAMES = ("mlp", "feed_forward", "block_sparse_moe", "mixer")


def _reinit_ffns(model: nn.Module, seed: int) -> None:
    """Random FFN weights (UNITE FFNs with their bases and shared experts, and dense MLP layers);
    embeddings, attention and norms keep their copied values."""
    from ..modeling_unite import UniteBases, UniteFactorizedLinear, UniteFFN, _core_std, decoder_layers

    std = model.config.initializer_range
    generator = torch.Generator().manual_seed(seed)
    base = getattr(model, model.base_model_prefix)
    with torch.no_grad():
        for layer in decoder_layers(base.backbone):
            for name, child in layer.named_children():
                if not (isinstance(child, UniteFFN) or name in FFN_SLOT_NAMES):
                    continue
                for module in child.modules():
                    if isinstance(module, UniteBases):
                        _orthogonal_bases(module, generator)
                    elif isinstance(module, UniteFactorizedLinear):
                        module.core.normal_(0, _core_std(std, module.d_out, module.d_in, module.core), generator=generator)
                    elif isinstance(module, UniteFFN) and module.shared_cores is not None:
                        for proj, core in module.shared_cores.items():
                            linear = getattr(module, proj)
                            core.normal_(0, _core_std(std, linear.d_out, linear.d_in, core), generator=generator)
                    elif isinstance(module, nn.Linear):
                        module.weight.normal_(0, std, generator=generator)
        if getattr(base, "unite_bases", None) is not None:  # tied bases live outside the layers
            for bases in base.unite_bases.values():
                _orthogonal_bases(bases, generator)


def _orthogonal_bases(bases: nn.Module, generator: torch.Generator) -> None:
    for basis in (bases.out_basis, bases.in_basis):
        if basis is not None:  # None: a full-rank side folded into the core
            nn.init.orthogonal_(basis, generator=generator)


@seeded_by_argument  # random heads, cores and inits from `seed`; the caller's global RNG state is left as it was
def build_model(model: Any, task_data, *, fmt: str = "classification", init: str = "unite",
                layers: int | None = None, rank: int | None = None, seed: int = 0, pad_token_id: int | None = None,
                width: int | None = None, intermediate_size: int | None = None, scaling: str | None = None,
                tokenizer: Any = None, pretrain: dict[str, Any] | None = None,
                **from_gene_kwargs: Any) -> nn.Module:
    """A task model: grown from a gene (any ``init``) or loaded from a saved target or Llama checkpoint
    (``init="unite"``, the default, meaning "as saved")."""
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    head_kwargs: dict[str, Any] = {"pad_token_id": pad_token_id}
    if fmt == "classification":
        head_kwargs.update(num_labels=task_data.num_choices, id2label=task_data.id2label, label2id=task_data.label2id)
    if not _is_gene(model):
        if init != "unite" or layers is not None or rank is not None or width is not None:
            raise ValueError("--init/--layers/--rank/--width apply when growing from a gene; a saved model is "
                             "fine-tuned as it is.")
        return _saved_model_class(model, fmt).from_pretrained(model, **head_kwargs)
    from ..gene import UniteGene, load_gene

    gene = load_gene(model)
    if not isinstance(gene, UniteGene) and init == "unite":
        init = "masa"  # "grown from the gene" is MASA's scaling for a gene of plain matrices
    if width is not None or init == "masa" or not isinstance(gene, UniteGene):
        return _llama_target(gene, fmt, init=init, layers=layers, width=width, intermediate_size=intermediate_size,
                             scaling=scaling, seed=seed, tokenizer=tokenizer, pretrain=pretrain, head_kwargs=head_kwargs)
    cls = _head_class(fmt)
    target = cls.from_gene(gene, num_hidden_layers=layers, rank=rank, **from_gene_kwargs, **head_kwargs)
    if init == "random":
        with seeded(seed):  # the same draws as a fresh start from `seed`, whatever from_gene drew above
            return cls(target.config)
    if init == "copy-only":
        _reinit_ffns(target, seed)
    return target


def _saved_model_class(path: Any, fmt: str):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    if AutoConfig.from_pretrained(path).model_type == "unite":
        return _head_class(fmt)
    if fmt != "classification":
        raise ValueError(f"format {fmt!r} needs a UNITE target; plain checkpoints are fine-tuned as classifiers")
    return AutoModelForSequenceClassification


def _llama_target(gene, fmt: str, *, init: str, layers: int | None, width: int | None, intermediate_size: int | None,
                  scaling: str | None, seed: int, tokenizer: Any, pretrain: dict[str, Any] | None,
                  head_kwargs: dict[str, Any]) -> nn.Module:
    """A plain Llama classifier of the given width, FFNs from the gene (``masa``) or random, after an
    optional continued pretraining of its causal-LM form (``pretrain``: kwargs of
    :func:`~unite_hf.training.pretrain.continued_pretraining`; the summary is added to it)."""
    from transformers import LlamaForSequenceClassification

    if init not in LLAMA_INITS:
        raise ValueError(f"a Llama target from a {gene.method} gene takes init {LLAMA_INITS}, got {init!r}")
    if fmt != "classification":
        raise ValueError("Llama targets are fine-tuned as k-way classifiers (transformers has no LlamaForMultipleChoice); "
                         "use format='classification'")
    causal_lm = build_llama_causal_lm(gene, init=init, layers=layers, width=width,
                                      intermediate_size=intermediate_size, scaling=scaling, seed=seed)
    config = causal_lm.config
    if pretrain:
        from .pretrain import continued_pretraining

        pretrain.update(continued_pretraining(causal_lm, tokenizer, seed=seed, **pretrain))
    head_config = config.to_dict()
    head_config.update({k: v for k, v in head_kwargs.items() if v is not None})
    head_config.pop("model_type", None)
    target = LlamaForSequenceClassification(type(config)(**head_config))
    missing = target.model.load_state_dict(causal_lm.model.state_dict())
    if missing.missing_keys or missing.unexpected_keys:
        raise RuntimeError(f"could not move the pretrained body into the classifier: {missing}")
    return target


@seeded_by_argument  # LlamaForCausalLM's weight init draws from torch's global generator: scoped to `seed`
def build_llama_causal_lm(gene, *, init: str = "masa", layers: int | None = None, width: int | None = None,
                          intermediate_size: int | None = None, scaling: str | None = None, seed: int = 0) -> nn.Module:
    """A ``LlamaForCausalLM`` of the given width and depth (defaults: the source's hidden size and the
    gene's depth) with the source's vocabulary; FFNs from the gene's matrices (``init="masa"``) or random."""
    from transformers import LlamaForCausalLM

    from ..gene import load_gene
    from ..llama_targets import llama_target_config, masa_init

    if init not in LLAMA_INITS:
        raise ValueError(f"a Llama target takes init {LLAMA_INITS}, got {init!r}")
    gene = load_gene(gene)
    if not hasattr(gene, "gene_matrix"):
        raise ValueError(f"a {gene.method} gene has no gene matrices to scale to a Llama width")
    config = llama_target_config(gene.config.source_config,
                                 hidden_size=gene.config.hidden_size if width is None else width,
                                 intermediate_size=intermediate_size,
                                 num_hidden_layers=len(gene.matrix_layers) if layers is None else layers)
    causal_lm = LlamaForCausalLM(config)
    if init == "masa":
        masa_init(causal_lm, gene, scaling=scaling)
    return causal_lm


def _final_epoch_scored_once():
    """A Trainer callback: no evaluation at the end of the last epoch; the final prediction pass that
    :func:`finetune` runs next scores the same weights (an identical pass, run once instead of twice)."""
    from transformers import TrainerCallback

    class FinalEpochScoredOnce(TrainerCallback):
        def on_epoch_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                control.should_evaluate = False
            return control

    return FinalEpochScoredOnce()


def _tokenizer_for(model: Any, tokenizer: Any):
    from transformers import AutoTokenizer

    if tokenizer is None:
        gene_tokenizer = getattr(model, "tokenizer", None)
        if gene_tokenizer is not None:
            tokenizer = gene_tokenizer
        elif isinstance(model, (str, os.PathLike)) and (Path(model) / "tokenizer_config.json").is_file():
            tokenizer = str(model)
        else:
            raise ValueError("no tokenizer: pass tokenizer= (--tokenizer), or save one with the gene or target")
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # last-token pooling reads attention_mask, not pad ids
    return tokenizer


def finetune(
    model: Any,
    task: str | TaskSpec,
    *,
    tokenizer: Any = None,
    data_dir: str | os.PathLike | None = None,
    output_dir: str | os.PathLike = "runs/finetune",
    fmt: str = "classification",
    init: str = "unite",
    layers: int | None = None,
    rank: int | None = None,
    epochs: float = 3,
    train_fraction: float = 1.0,
    seed: int = 0,
    learning_rate: float = 2e-4,
    batch_size: int = 16,
    max_length: int = 128,
    max_train_examples: int | None = None,
    max_eval_examples: int | None = None,
    eval_split: str = "validation",
    show_progress: bool = True,
    width: int | None = None,
    intermediate_size: int | None = None,
    scaling: str | None = None,
    pretrain_tokens: int = 0,
    push_to_hub: str | None = None,
    eval_every_epoch: bool = True,
    **from_gene_kwargs: Any,
) -> dict[str, Any]:
    """Fine-tune ``model`` (a gene, a saved target or a Llama checkpoint) on ``task``; returns a
    JSON-able summary with the final eval accuracy and the accuracy after each epoch.

    ``width``, ``intermediate_size``, ``scaling`` and ``pretrain_tokens`` shape Llama targets grown
    from gene matrices (see the module docstring); ``pretrain_tokens`` of local text (simplebooks and
    wikitext2, mixed) are trained as a causal LM before the task. ``push_to_hub`` (a repo id) uploads
    the fine-tuned model (a UNITE target with its card, naming the task's dataset and accuracy) and
    the tokenizer; the summary then holds ``"hub": repo_id``. ``task`` is what
    :func:`~unite_hf.training.tasks.load_task` takes, a registry name or a :class:`TaskSpec` (registered
    or not); the summary, ``result.json``, the card and the Hub commit name it by ``spec.name``, and an
    unknown name fails before anything is loaded or built. ``eval_split`` picks the scored split
    (``"test"`` for ARC and OpenBookQA, whose test files carry labels); the summary's ``correct`` lists
    each scored example's outcome (1/0) in a fixed order, for paired intervals between runs.

    The eval split is scored after each epoch (``accuracy_per_epoch``); the last epoch's score is the
    final prediction pass, not a second pass over the same weights. ``eval_every_epoch=False`` scores
    only the final model, once (``accuracy_per_epoch`` then holds that one score): the same final
    accuracy and outcomes, without the passes over large eval files that only a curve reads."""
    from ..progress import progress_enabled

    show_progress = progress_enabled(show_progress)  # off with HF_HUB_DISABLE_PROGRESS_BARS / TQDM_DISABLE
    from transformers import Trainer, TrainingArguments, set_seed

    from .tasks import TaskDataCollator, get_task_spec, load_task, tokenize_task
    from ..io import save_model_folder
    from .trainer_utils import compute_accuracy, correct_per_example

    started = time.perf_counter()
    spec = get_task_spec(task)  # a name or a TaskSpec, as load_task takes; unknown names fail here
    task = spec.name  # what the summary, result.json, the card and the Hub commit record (JSON-able)
    set_seed(seed)
    train = load_task(spec, "train", data_dir, seed=seed, train_fraction=train_fraction)
    dev = load_task(spec, eval_split, data_dir, seed=seed)
    if max_train_examples is not None and len(train.dataset) > max_train_examples:
        train.dataset = train.dataset.shuffle(seed=seed).select(range(max_train_examples))
    if max_eval_examples is not None and len(dev.dataset) > max_eval_examples:
        dev.dataset = dev.dataset.shuffle(seed=0).select(range(max_eval_examples))  # same eval rows for every seed
    tokenizer = _tokenizer_for(model, tokenizer)
    # Tokenised before the model is built, so that bad data fails before any pretraining; what was cut to fit
    # max_length (and any item whose answer part alone is longer) is added to train.notes / dev.notes, which
    # the summary's "notes" and result.json carry
    train_tok = tokenize_task(train, tokenizer, format=fmt, max_length=max_length)
    dev_tok = tokenize_task(dev, tokenizer, format=fmt, max_length=max_length)
    pretrain = ({"tokens": pretrain_tokens, "output_dir": Path(output_dir) / "pretrain", "show_progress": show_progress,
                 "data_dir": data_dir} if pretrain_tokens else None)
    target = build_model(model, train, fmt=fmt, init=init, layers=layers, rank=rank, seed=seed,
                         pad_token_id=tokenizer.pad_token_id, width=width, intermediate_size=intermediate_size,
                         scaling=scaling, tokenizer=tokenizer, pretrain=pretrain, **from_gene_kwargs)
    args = TrainingArguments(
        output_dir=str(output_dir), num_train_epochs=epochs, learning_rate=learning_rate,
        per_device_train_batch_size=batch_size, per_device_eval_batch_size=batch_size,
        eval_strategy="epoch" if eval_every_epoch else "no",
        save_strategy="no", logging_strategy="epoch", report_to=[], seed=seed, data_seed=seed,
        disable_tqdm=not show_progress, warmup_steps=0.06, lr_scheduler_type="linear", weight_decay=0.01,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = Trainer(model=target, args=args, train_dataset=train_tok, eval_dataset=dev_tok,
                      processing_class=tokenizer, data_collator=TaskDataCollator(tokenizer),
                      compute_metrics=compute_accuracy, callbacks=[_final_epoch_scored_once()])
    trainer.train()
    per_epoch = [round(entry["eval_accuracy"], 6) for entry in trainer.state.log_history if "eval_accuracy" in entry]
    # predict, not evaluate: the same metrics, plus each example's outcome for paired comparisons; it is
    # also the last epoch's score (that epoch's own evaluation was skipped: same weights, same pass)
    prediction = trainer.predict(dev_tok, metric_key_prefix="eval")
    final = prediction.metrics
    per_epoch.append(round(float(final["eval_accuracy"]), 6))
    correct = correct_per_example(prediction.predictions, prediction.label_ids)
    if hasattr(target, "set_card_info"):  # UNITE targets write their own card; plain Llama ones are plain
        hub = train.spec.hub[0] if train.spec.hub else None  # the card names datasets by Hub id
        result = {"dataset_name": train.spec.pretty_name, "dataset_type": hub.path if hub else task,
                  "metric_type": "accuracy", "metric_value": float(final["eval_accuracy"]), "dataset_split": eval_split}
        if hub is not None and hub.name:
            result["dataset_config"] = hub.name
        target.set_card_info(datasets=[hub.path if hub else task], eval_results=[result])
    save_model_folder(Path(output_dir) / "model", target, tokenizer)  # all or nothing, UNITE or Llama
    if push_to_hub:
        target.push_to_hub(push_to_hub, commit_message=f"Fine-tuned on {task} with unite_hf")
        tokenizer.push_to_hub(push_to_hub, commit_message="Upload tokenizer")
    text_config = getattr(target.config, "text_config", None) or target.config
    summary = {
        "task": task, "format": fmt, "init": init, "seed": seed, "layers": text_config.num_hidden_layers,
        "ranks": getattr(target.config, "ranks", None), "width": text_config.hidden_size,
        "pretrain": {k: v for k, v in (pretrain or {}).items() if k not in ("output_dir", "show_progress", "data_dir")} or None,
        "train_examples": len(train.dataset), "eval_examples": len(dev.dataset),
        "train_fraction": train_fraction, "epochs": epochs, "accuracy": round(float(final["eval_accuracy"]), 6),
        "accuracy_per_epoch": per_epoch, "chance": round(1 / max(train.num_choices, 1), 4),
        "eval_split": eval_split, "correct": correct,
        "parameters": sum(p.numel() for p in target.parameters()), "notes": list(train.notes) + list(dev.notes),
        "seconds": round(time.perf_counter() - started, 1),
    }
    if push_to_hub:
        summary["hub"] = push_to_hub
    if not math.isfinite(summary["accuracy"]):
        raise RuntimeError(f"fine-tuning produced a non-finite accuracy: {summary}")
    (Path(output_dir) / "result.json").write_text(json.dumps(summary, indent=2))
    return summary
