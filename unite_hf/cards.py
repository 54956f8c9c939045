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
