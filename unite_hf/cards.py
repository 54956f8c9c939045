"""Model cards for genes and targets, rendered from the templates in ``model_cards/``."""

from __future__ import annotations

from importlib import resources
from typing import Any

from huggingface_hub import ModelCard, ModelCardData


def render_card(template: str, card_data: dict[str, Any], **variables: Any) -> str:
    """Render ``model_cards/<template>`` with huggingface_hub's ModelCard (YAML metadata + Jinja)."""
    template_path = resources.files("unite_hf") / "model_cards" / template
    data = ModelCardData(**{k: v for k, v in card_data.items() if v is not None})
    card = ModelCard.from_template(data, template_str=template_path.read_text(encoding="utf-8"), **variables)
    return str(card)


def render_target_card(model, datasets: list[str] | None = None, eval_results: list[dict] | None = None) -> str:
    """The card of a UNITE target: ``base_model`` is the gene and its source, tags ``unite`` and
    ``learngene``, the datasets it was tuned on and its eval results (``{"dataset_name",
    "dataset_type", "task_type", "metric_type", "metric_value"}`` dicts)."""
    from huggingface_hub import EvalResult

    from . import __version__

    config = model.config
    model_name = getattr(config, "_name_or_path", "") or f"unite-{type(model).__name__}"
    eval_results = eval_results or []
    results = [EvalResult(**{"task_type": "text-classification", **row}) for row in eval_results]
    base_models = [m for m in (config.gene, config.gene_source) if m]
    card_data = {
        "library_name": "transformers",
        "tags": ["unite", "learngene", "unite_hf"],
        "base_model": base_models or None,
        "datasets": datasets or None,
        "model_name": model_name if results else None,
        "eval_results": results or None,
    }
    eval_rows = "\n".join(f"| {r.get('dataset_name', r.get('dataset_type'))} | {r['metric_type']} | {r['metric_value']:.4f} |"
                          for r in eval_results)
    auto_class = getattr(type(model), "_auto_class", None) or "AutoModel"
    return render_card(
        "target.md", card_data, model_name=model_name, gene=config.gene or "unknown",
        gene_source=config.gene_source or "unknown", architecture=type(model).__name__,
        family=config.text_config.model_type, num_layers=config.text_config.num_hidden_layers,
        source_layers=config.source_layers, ffn_layers=config.ffn_layers, ranks=config.ranks,
        core_init=config.core_init, layer_selection=config.layer_selection, tie_bases=config.tie_bases,
        shared_experts=config.shared_experts, parameters=f"{sum(p.numel() for p in model.parameters()):,}",
        eval_rows=eval_rows, auto_class=auto_class, library_version=__version__,
    )
