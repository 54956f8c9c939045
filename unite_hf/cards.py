"""Model cards for genes and targets, rendered from the templates in ``model_cards/``.

Card metadata follows the Hub's rules: ``base_model`` holds Hub repo ids only (never local paths),
``datasets`` holds Hub dataset ids (a unite_hf task or corpus name such as ``sst2`` or
``wikitext2`` is mapped to its Hub id), ``pipeline_tag`` follows the target's head and ``license``
defaults to the source's.
"""

from __future__ import annotations

import os
import re
from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

PAPER_URL = "https://openreview.net/forum?id=WnW0zndglL"
"""UNITE: Universal kNowledge Integration from Task-specific Experts (ICLR 2026), on OpenReview."""

# Hub pipeline tag of each target head (UniteModel: hidden states)
PIPELINE_TAGS = {
    "UniteForCausalLM": "text-generation",
    "UniteForSequenceClassification": "text-classification",
    "UniteForMultipleChoice": "multiple-choice",
    "UniteModel": "feature-extraction",
}

_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")


def hub_id(name: str | os.PathLike | None) -> str | None:
    """``name`` if it is a Hub repo id (``org/name`` or ``name``), ``None`` for a local path or nothing.

    A string that names an existing local folder or file, or looks like a path (absolute, ``./``,
    ``~``, more than one ``/``, a backslash), is a path, never a Hub id."""
    if not name:
        return None
    text = str(name)
    if os.path.exists(text) or text.startswith((".", "~")) or os.path.isabs(text) or "\\" in text:
        return None
    if not _REPO_ID.match(text) or "--" in text or ".." in text or text.endswith((".git", ".")):
        return None
    return text


def dataset_hub_id(name: str) -> str:
    """The Hub dataset id of a unite_hf task (``sst2`` -> ``nyu-mll/glue``), a calibration corpus
    (``wikitext2`` or its description -> ``Salesforce/wikitext``) or an id given as is."""
    from .calibration import CORPUS_ALIASES
    from .training.tasks import TASKS

    key = name.split(" ", 1)[0]
    if key in TASKS and TASKS[key].hub:
        return TASKS[key].hub[0].path
    alias = CORPUS_ALIASES.get(key)
    if alias is not None and alias.hub_id:
        return alias.hub_id
    return name


def calibration_dataset_ids(calibration: str) -> list[str]:
    """Hub dataset ids behind a gene's calibration description (``CalibrationSet.name``):
    ``"wikitext2 (local: ...)"`` and ``"Salesforce/wikitext:wikitext-2-raw-v1[train]"`` both give
    ``["Salesforce/wikitext"]``; a local file, a list of strings or a tensor give ``[]``."""
    names = [part.strip() for part in calibration.split("+")] if calibration else []
    ids = []
    for name in names:
        mapped = dataset_hub_id(name)
        if mapped != name:
            ids.append(mapped)
            continue
        match = re.match(r"^([\w.-]+/[\w.-]+)(?:[:\[]|$)", name)
        if match and hub_id(match.group(1)):
            ids.append(match.group(1))
    return list(dict.fromkeys(ids))


def render_card(template: str, card_data: dict[str, Any], **variables: Any) -> str:
    """Render ``model_cards/<template>`` with huggingface_hub's ModelCard (YAML metadata + Jinja); an
    absolute path is used as it is (a method folder may ship its own card template)."""
    template_path = Path(template) if Path(template).is_absolute() else resources.files("unite_hf") / "model_cards" / template
    data = ModelCardData(**{k: v for k, v in card_data.items() if v is not None})
    card = ModelCard.from_template(data, template_str=template_path.read_text(encoding="utf-8"), paper_url=PAPER_URL,
                                   **variables)
    return str(card)


_FROM_CONFIG = object()  # render_target_card's base_model when the caller has none recorded


def render_target_card(model, repo_id: str | None = None, datasets: list[str] | None = None,
                       eval_results: list[dict] | None = None, license: str | None = None,
                       tags: list[str] | None = None, base_model: str | None | object = _FROM_CONFIG,
                       training: str | None = None, language: list[str] | None = None) -> str:
    """The card of a UNITE target.

    Args:
        model: a ``UniteFor*`` model.
        repo_id: where the card goes (a Hub repo id, or a folder name); it titles the card and fills
            the loading snippet.
        datasets: the datasets it was tuned on (task names and corpus aliases become Hub ids).
        eval_results: ``{"dataset_name", "dataset_type", "metric_type", "metric_value"}`` dicts
            (optionally ``dataset_config``, ``dataset_split``, ``task_type``; ``task_type`` defaults
            to the head's pipeline tag).
        license: the card's license (the caller resolves the default: the source's).
        tags: extra tags beside ``unite``, ``learngene`` and ``unite_hf``.
        base_model: the Hub id recorded when the target was grown (``config.card_info``); without
            it, the gene's Hub id, else the gene source's Hub id, else absent. The Hub's ``base_model``
            holds repo ids only, so the gene's revision (``config.gene_revision``, the commit it was grown
            from) is named in the card's text, with the line that loads the gene at that commit.
        training: Markdown for a "Training" section (hyperparameters and results from ``Trainer``).
        language: the card's languages (``Trainer.create_model_card(language=)``).
    """
    from huggingface_hub import EvalResult

    from ._version import __version__
    from .configuration_unite import UNITE_MODEL_TAGS

    config = model.config
    architecture = type(model).__name__
    pipeline_tag = PIPELINE_TAGS.get(architecture)
    model_name = repo_id or f"unite-{architecture}"
    eval_results = [dict(row) for row in eval_results or []]
    for row in eval_results:
        row.setdefault("task_type", pipeline_tag or "text-classification")
        if row.get("dataset_type"):
            row["dataset_type"] = dataset_hub_id(row["dataset_type"])
    results = [EvalResult(**row) for row in eval_results]
    if base_model is _FROM_CONFIG:
        base_model = hub_id(config.gene) or hub_id(config.gene_source)
    all_tags = list(dict.fromkeys([*UNITE_MODEL_TAGS, *(getattr(model, "model_tags", None) or []), *(tags or [])]))
    card_data = {
        "library_name": "transformers",
        "language": language or None,
        "license": license,
        "pipeline_tag": pipeline_tag,
        "tags": all_tags,
        "base_model": base_model,
        "datasets": list(dict.fromkeys(dataset_hub_id(d) for d in datasets)) if datasets else None,
        "model_name": model_name if results else None,
        "eval_results": results or None,
    }
    eval_rows = "\n".join(f"| {r.get('dataset_name', r.get('dataset_type'))} | {r['metric_type']} | {r['metric_value']:.4f} |"
                          for r in eval_results)
    auto_class = getattr(type(model), "_auto_class", None) or "AutoModel"
    return render_card(
        "target.md", card_data, model_name=model_name, model_id=repo_id or "path/to/this/model",
        gene=config.gene or "an unsaved gene", gene_source=config.gene_source or "a model built from a config",
        gene_revision=getattr(config, "gene_revision", None), gene_hub_id=hub_id(config.gene),
        architecture=architecture, family=config.text_config.model_type,
        num_layers=config.text_config.num_hidden_layers, source_layers=config.source_layers,
        ffn_layers=config.ffn_layers, ranks=config.ranks, core_init=config.core_init,
        layer_selection=config.layer_selection, tie_bases=config.tie_bases, shared_experts=config.shared_experts,
        parameters=f"{sum(p.numel() for p in model.parameters()):,}", eval_rows=eval_rows, auto_class=auto_class,
        library_version=__version__, training=training,
    )


def target_card(model, repo_id: str | None, tags: list[str] | None = None, *, license: str | None = None,
                datasets: list[str] = (), eval_results: list[dict] = (), training: str | None = None,
                language: list[str] | None = None) -> str:
    """The card of a UNITE target from what ``config.card_info`` records (``set_card_info``, the gene's
    license and ``base_model``), with ``tags``, ``datasets`` and ``eval_results`` added to the recorded
    ones and ``license`` overriding the recorded license."""
    info = dict(model.config.card_info or {})
    return render_target_card(
        model, repo_id=repo_id, datasets=[*(info.get("datasets") or []), *datasets] or None,
        eval_results=[*(info.get("eval_results") or []), *eval_results], license=license or info.get("license"),
        tags=[*(info.get("tags") or []), *(tags or [])], training=training, language=language,
        **{key: info[key] for key in ("base_model",) if key in info})


_TRAINER_RESULTS = re.compile(r"^It achieves the following results on the evaluation set:\n(?:- .*\n?)+", re.M)
_TRAINER_PROCEDURE = "\n## Training procedure\n"


def trainer_card_parts(text: str) -> dict[str, Any]:
    """What ``transformers.Trainer.create_model_card`` wrote that a UNITE card keeps: the metadata
    (``tags``, ``datasets``, ``license``, ``language``, the ``model-index`` as ``eval_results`` dicts) and, as
    ``training``, the evaluation results line and everything under its "Training procedure" heading
    (hyperparameters, results table, framework versions: ``###`` headings, under the card's "Training")."""
    card = ModelCard(text)
    data = card.data
    results = [{key: value for key, value in vars(row).items() if value is not None}
               for row in data.eval_results or []]
    sections = []
    evaluation = _TRAINER_RESULTS.search(card.text)
    if evaluation:
        sections.append(evaluation.group(0).strip())
    if _TRAINER_PROCEDURE in card.text:
        procedure = card.text.split(_TRAINER_PROCEDURE, 1)[1].strip()
        sections.append(procedure)
    language = [data.language] if isinstance(data.language, str) else data.language
    return {"tags": list(data.tags or []), "datasets": list(data.datasets or []), "license": data.license,
            "language": language, "eval_results": results, "training": "\n\n".join(sections) or None}
