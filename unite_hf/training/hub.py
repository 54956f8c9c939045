"""The UNITE model card in ``transformers.Trainer``'s Hub pushes.

A plain ``Trainer`` cannot publish it, and nothing a model or a callback provides changes that:
``Trainer.push_to_hub`` fires ``on_push_begin`` (the only push event), then runs ``save_model`` (the
target's ``save_pretrained`` writes the UNITE card to ``output_dir/README.md``), then
``create_model_card``, which overwrites that file with the card of ``TrainingSummary`` (it keeps only
the existing card's ``tags``, and hands the folder back to the model only when the card's
``library_name`` is ``peft``), then ``upload_folder(output_dir)``. Checkpoint pushes
(``hub_strategy``) upload ``output_dir`` as it is, without any card. ``Trainer.create_model_card`` is
the extension point Trainer subclasses use for their own cards (TRL's trainers do the same), so:

- :class:`UniteCardMixin` overrides it: it writes the UNITE card, with the metadata of Trainer's card
  (tags, datasets, license, ``model-index``) and its training hyperparameters and results as a
  "Training" section;
- it also registers a callback whose ``on_push_begin`` writes that card, and the target's modeling
  code (which checkpoint pushes leave out, so that ``trust_remote_code`` could not load them), before
  every checkpoint push;
- :class:`UniteTrainer` is ``Trainer`` with the mixin; put the mixin first in your own subclass of
  ``Trainer`` (or of a trainer built on it) to combine them.

Example::

    from transformers import TrainingArguments
    from unite_hf.training import UniteTrainer

    trainer = UniteTrainer(model=target, args=TrainingArguments("out", push_to_hub=True, hub_model_id="me/arc-unite"),
                           train_dataset=train)
    trainer.train()
    trainer.push_to_hub()      # the Hub gets the UNITE card, with the training section

Models that are not UNITE targets (a peft model wrapping one included) keep Trainer's own card.
"""

from __future__ import annotations

import os
import tempfile

from huggingface_hub import ModelCard
from transformers import Trainer, TrainerCallback
from transformers.dynamic_module_utils import custom_object_save
from transformers.modelcard import TrainingSummary

from .. import cards
from ..io import atomic_write_text
from ..modeling_unite import UnitePreTrainedModel


class _CardBeforeCheckpointPush(TrainerCallback):
    """Writes the trainer's card and the target's modeling code to ``output_dir`` before each push: a
    checkpoint push uploads that folder with only the weights and config copied in (before the final
    push, ``save_model`` and ``create_model_card`` write both again)."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def on_push_begin(self, args, state, control, **kwargs):
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        if not state.is_world_process_zero or not isinstance(model, UnitePreTrainedModel):
            return
        os.makedirs(args.output_dir, exist_ok=True)
        if model.is_remote_code():  # as save_pretrained does: trust_remote_code loads each pushed version
            # staged, then renamed in: the previous push may still be uploading the folder ("_*" it skips)
            with tempfile.TemporaryDirectory(prefix="_unite_code", dir=args.output_dir) as staging:
                for path in custom_object_save(model, staging, config=model.config):
                    os.replace(path, os.path.join(args.output_dir, os.path.basename(path)))
        self.trainer.create_model_card()


class UniteCardMixin:
    """A ``transformers.Trainer`` mixin whose model card is the UNITE card (see the module docstring).

    ``create_model_card(**kwargs)`` takes Trainer's keyword arguments: ``license`` overrides the
    target's recorded license; ``tags`` and ``dataset_tags`` are added to the card's (with the tags of
    the card already in ``output_dir``, as Trainer does); ``language`` and the ``model-index`` that
    ``tasks`` and ``dataset_tags`` give are kept. The title and the loading snippet name the Hub repo
    (``hub_model_id``, else ``output_dir``'s name), not ``model_name``, and ``base_model`` is the
    gene's, not ``finetuned_from``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.add_callback(_CardBeforeCheckpointPush(self))

    def create_model_card(self, **kwargs) -> None:
        model = self.accelerator.unwrap_model(self.model)
        if not isinstance(model, UnitePreTrainedModel):
            return super().create_model_card(**kwargs)
        if not self.is_world_process_zero():
            return None
        path = os.path.join(self.args.output_dir, "README.md")
        tags = kwargs.pop("tags", None)
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        if os.path.exists(path):
            tags += ModelCard.load(path).data.tags or []
        # the target's license, given to Trainer's summary, also spares it a Hub lookup per push
        license = kwargs.pop("license", None) or (model.config.card_info or {}).get("license")
        # Trainer's card is rendered in memory, never written: a checkpoint push still uploading in
        # the background reads README.md, which only ever holds a whole UNITE card
        summary = cards.trainer_card_parts(TrainingSummary.from_trainer(self, license=license, tags=tags,
                                                                         **kwargs).to_model_card())
        output_name = os.path.basename(os.path.normpath(self.args.output_dir))
        repo_id = self.hub_model_id or self.args.hub_model_id or output_name
        card = cards.target_card(model, repo_id, summary["tags"], license=license or summary["license"],
                                 datasets=summary["datasets"], eval_results=summary["eval_results"],
                                 training=summary["training"], language=summary["language"])
        atomic_write_text(card, path)
        return None


class UniteTrainer(UniteCardMixin, Trainer):
    """``transformers.Trainer`` whose Hub pushes (``push_to_hub()`` and ``hub_strategy`` checkpoint
    pushes) and ``create_model_card()`` publish the UNITE model card, with Trainer's training section."""
