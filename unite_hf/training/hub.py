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
  every checkpoint push, with a ``unite_checksums.json`` for the files the push uploads (the one in
  ``output_dir`` was the last final push's, which no longer matched the weights copied in, so that
  downloads failed verification); it first waits for the previous push, which ``hub_always_push`` would
  otherwise leave uploading ``output_dir`` while the next push overwrites its files;
- the trainer's arguments pickle without their tokens: Trainer writes ``training_args.bin`` with
  ``torch.save(self.args)`` in every save and before every checkpoint push, and uploads it, so a
  ``hub_token`` given to ``TrainingArguments`` would be published in every push. The mixin gives
  ``self.args`` a subclass of its own class whose pickle is the original class with ``hub_token`` (every
  ``*_token`` field, as ``TrainingArguments.to_dict`` redacts them) set to ``None``; in memory the token
  stays, and Trainer passes it to each upload. ``copy.copy`` / ``copy.deepcopy`` keep it;
- ``train(resume_from_checkpoint=True)`` resumes from the last complete checkpoint
  (:func:`~unite_hf.training.trainer_utils.last_complete_checkpoint`): a kill during a save leaves the newest
  ``checkpoint-N`` empty or partial (Trainer creates the folder before the model's staged save), and Trainer
  would pick it and fail;
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

import copy
import copyreg
import json
import os
import tempfile
from pathlib import Path

from huggingface_hub import ModelCard
from transformers import Trainer, TrainerCallback
from transformers.dynamic_module_utils import custom_object_save
from transformers.modelcard import TrainingSummary
from transformers.utils import (
    CONFIG_NAME, GENERATION_CONFIG_NAME, SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME,
)

from .. import cards
from ..io import (
    TARGET_CHECKSUMS_NAME, atomic_write_bytes, atomic_write_text, file_record, json_bytes, record_name_problem,
)
from ..modeling_unite import UnitePreTrainedModel
from .trainer_utils import last_complete_checkpoint


def _token_fields(state: dict) -> dict:
    """``state`` with every string ``*_token`` field (``hub_token``) set to None."""
    return {key: None if key.endswith("_token") and isinstance(value, str) else value for key, value in state.items()}


def _reduce_without_tokens(self, protocol):
    """Pickle as the arguments' own class (so ``training_args.bin`` loads without unite_hf), tokens None."""
    return copyreg._reconstructor, (type(self)._unite_pickled_as, object, None), _token_fields(self.__dict__)


def _copy_with_tokens(self):
    clone = object.__new__(type(self))
    clone.__dict__.update(self.__dict__)
    return clone


def _deepcopy_with_tokens(self, memo):
    clone = object.__new__(type(self))
    memo[id(self)] = clone
    clone.__dict__.update(copy.deepcopy(self.__dict__, memo))
    return clone


_TOKENLESS_CLASSES: dict[type, type] = {}


def pickle_without_tokens(args) -> None:
    """Make ``args`` (a ``TrainingArguments``) pickle without its tokens, in place: its class becomes a
    subclass of the same name whose ``__reduce_ex__`` writes the original class with every ``*_token``
    field None. Attribute access, ``dataclasses.replace`` and copies are unchanged (copies keep the token)."""
    cls = type(args)
    if "_unite_pickled_as" in vars(cls):
        return
    if cls not in _TOKENLESS_CLASSES:
        _TOKENLESS_CLASSES[cls] = type(cls.__name__, (cls,), {
            "__qualname__": cls.__qualname__, "__module__": __name__, "_unite_pickled_as": cls,
            "__reduce_ex__": _reduce_without_tokens, "__copy__": _copy_with_tokens,
            "__deepcopy__": _deepcopy_with_tokens,
            "__doc__": f"{cls.__qualname__} that pickles without its tokens (unite_hf.training.hub)."})
    args.__class__ = _TOKENLESS_CLASSES[cls]


def _trainer_copied_files(checkpoint: Path) -> set[str]:
    """The files a checkpoint push copies from ``checkpoint`` into ``output_dir`` (``Trainer._push_from_checkpoint``):
    config, generation config, weights, and the shards their indexes name."""
    names = {CONFIG_NAME, GENERATION_CONFIG_NAME, WEIGHTS_NAME, SAFE_WEIGHTS_NAME}
    for index in (WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_INDEX_NAME):
        if (checkpoint / index).is_file():
            names.add(index)
            names.update(json.loads((checkpoint / index).read_text(encoding="utf-8"))["weight_map"].values())
    return {name for name in names if (checkpoint / name).is_file()}


def _record_pushed_checksums(output_dir: Path, checkpoint: Path | None) -> None:
    """Write ``output_dir``'s :data:`~unite_hf.io.TARGET_CHECKSUMS_NAME` for what the checkpoint push will
    upload: the checkpoint's records of the files Trainer copies from it next, the records of other files
    it recorded that ``output_dir`` already holds byte for byte (the modeling code written here), and the
    card. Without it the push carried whatever checksum file ``output_dir`` held: after a final push, the
    old weights' checksums beside the new weights, which every download then refused. No checkpoint
    known (a hyperparameter-search run folder): a record of nothing, replacing a stale one on the Hub."""
    records: dict[str, dict] = {}
    manifest = checkpoint / TARGET_CHECKSUMS_NAME if checkpoint is not None else None
    if manifest is not None and manifest.is_file():
        copied = _trainer_copied_files(checkpoint)
        for name, record in json.loads(manifest.read_text(encoding="utf-8"))["files"].items():
            if name == "README.md" or record_name_problem(name):
                continue  # the card in output_dir is the trainer's, recorded below; no path outside the folder
            if name in copied or ((output_dir / name).is_file() and file_record(output_dir / name) == record):
                records[name] = record
    elif not (output_dir / TARGET_CHECKSUMS_NAME).exists():
        return  # nothing stale to replace, nothing to vouch for
    if (output_dir / "README.md").is_file():
        records["README.md"] = file_record(output_dir / "README.md")
    atomic_write_bytes(json_bytes({"format_version": 1, "files": records}), output_dir / TARGET_CHECKSUMS_NAME)


class _CardBeforeCheckpointPush(TrainerCallback):
    """Before each push: waits for the previous push (``hub_always_push`` starts one while another still
    uploads ``output_dir``, whose files the next push overwrites: a commit then mixed two steps' files, or
    the second push found nothing changed), then writes the trainer's card, the target's modeling code and,
    for a checkpoint push, the checksum record of the files it uploads to ``output_dir``: a checkpoint push
    uploads that folder with only the weights and config copied in (before the final push, ``save_model``
    and ``create_model_card`` write all of them again)."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def on_push_begin(self, args, state, control, **kwargs):
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        if not state.is_world_process_zero or not isinstance(model, UnitePreTrainedModel):
            return
        finish = getattr(self.trainer, "_finish_current_push", None)
        if finish is not None:
            finish()
        os.makedirs(args.output_dir, exist_ok=True)
        if model.is_remote_code():  # as save_pretrained does: trust_remote_code loads each pushed version
            # staged, then renamed in ("_*": Trainer's uploads skip the staging folder)
            with tempfile.TemporaryDirectory(prefix="_unite_code", dir=args.output_dir) as staging:
                for path in custom_object_save(model, staging, config=model.config):
                    os.replace(path, os.path.join(args.output_dir, os.path.basename(path)))
        self.trainer.create_model_card()
        checkpoint = getattr(self.trainer, "_unite_pushing_checkpoint", None)
        if checkpoint is not None:  # a checkpoint push (the final push saves the target, checksums included)
            checkpoint = Path(checkpoint)
            _record_pushed_checksums(Path(args.output_dir), checkpoint if checkpoint.is_dir() else None)


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
        pickle_without_tokens(self.args)  # training_args.bin is uploaded with every push
        self._unite_pushing_checkpoint = None
        self.add_callback(_CardBeforeCheckpointPush(self))

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """``Trainer.train``; ``resume_from_checkpoint=True`` resumes from the last *complete* checkpoint of
        ``output_dir`` (:func:`~unite_hf.training.trainer_utils.last_complete_checkpoint`), not from a newer one
        that a process killed mid-save left empty or partial, which Trainer would pick and fail on."""
        if resume_from_checkpoint is True:
            found = last_complete_checkpoint(self.args.output_dir)
            if found is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir}): no "
                                 "checkpoint-N folder there holds a trainer_state.json")
            resume_from_checkpoint = found
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _push_from_checkpoint(self, checkpoint_folder, *args, **kwargs):
        # Trainer's checkpoint push; the callback's on_push_begin, which it fires, reads the folder
        self._unite_pushing_checkpoint = checkpoint_folder
        try:
            return super()._push_from_checkpoint(checkpoint_folder, *args, **kwargs)
        finally:
            self._unite_pushing_checkpoint = None

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
