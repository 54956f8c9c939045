"""Trainer pushes publish the UNITE model card (issue 12, bug 2), against the real local HTTP Hub: a tiny
target trained by ``UniteTrainer`` with ``push_to_hub=True``, and the README.md that arrives on the server.
A plain ``Trainer`` publishes its own generated card (unite_hf.training.hub says why no model or callback can
change that); test_cards.py checks the gene and tags it still carries."""

from __future__ import annotations

import hashlib
import json
import re

import torch
import transformers
from datasets import Dataset
from huggingface_hub import ModelCard
from hub_server import DUMMY_TOKEN, local_hub  # noqa: F401
from tiny_models import VOCAB, tiny_moe

from unite_hf import UniteForSequenceClassification, extract_universal_knowledge
from unite_hf.cards import PAPER_URL
from unite_hf.training import UniteTrainer


def _target(gene_id: str) -> UniteForSequenceClassification:
    """A target grown from a gene pushed to the local Hub as ``gene_id``."""
    gene = extract_universal_knowledge(tiny_moe("mixtral"), calibration=torch.randint(0, VOCAB, (4, 12)),
                                       rank=(3, 8, 8), show_progress=False)
    gene.push_to_hub(gene_id)
    return UniteForSequenceClassification.from_gene(gene_id, num_hidden_layers=1, num_labels=2, pad_token_id=0)


def _data(seed: int) -> Dataset:
    ids = torch.randint(1, VOCAB, (8, 6), generator=torch.Generator().manual_seed(seed))
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": [i % 2 for i in range(8)]})


def _args(tmp_path, repo_id: str, **kwargs) -> transformers.TrainingArguments:
    return transformers.TrainingArguments(str(tmp_path / "run"), per_device_train_batch_size=4, report_to=[],
                                          push_to_hub=True, hub_model_id=repo_id, use_cpu=True, disable_tqdm=True,
                                          **kwargs)


def _assert_unite_card(text: str, repo_id: str, gene_id: str) -> ModelCard:
    """The card on the server is the UNITE template, filled in, with the UNITE metadata and no token."""
    card = ModelCard(text)
    assert card.text.lstrip().startswith(f"# {repo_id}\n"), card.text[:300]
    assert f"A dense model grown with [UNITE]({PAPER_URL})" in card.text
    # the gene and the commit of its repo it was grown from (issue 22, item 5), with the line that loads it there
    grown = re.search(rf"from the gene\n`{re.escape(gene_id)}` at revision `([0-9a-f]{{40}})`, which was extracted from",
                      card.text)
    assert grown, card.text[:600]
    assert f'UniteGene.from_pretrained("{gene_id}", revision="{grown.group(1)}")' in card.text
    assert "| ranks (r_out, r_in) |" in card.text and "| UNITE FFN layers |" in card.text
    assert f'AutoModelForSequenceClassification.from_pretrained("{repo_id}")' in card.text
    assert card.data.base_model == gene_id
    assert {"unite", "learngene", "unite_hf"} <= set(card.data.tags)
    assert card.data.pipeline_tag == "text-classification"
    assert card.data.library_name == "transformers"
    assert DUMMY_TOKEN not in text and "hf_" not in text
    return card


def _assert_no_token_pushed(local_hub, repo_id: str) -> None:  # noqa: F811
    """The fixture's HF_TOKEN authenticated every push; no file of any commit contains it."""
    for commit in local_hub.history(repo_id):
        leaked = [path for path, content in commit.files.items() if DUMMY_TOKEN.encode() in content]
        assert not leaked, (commit.title, leaked)


def test_trainer_push_to_hub_publishes_the_unite_card_with_the_training_section(local_hub, tmp_path):  # noqa: F811
    """Regression: Trainer.create_model_card replaced the UNITE card with its generated one before the upload."""
    model = _target("me/card-gene")
    model.set_card_info(datasets=["sst2"], license="apache-2.0")
    args = _args(tmp_path, "me/trained-unite", max_steps=2, eval_strategy="steps", eval_steps=1, logging_steps=1,
                 save_strategy="no", learning_rate=3e-4)
    trainer = UniteTrainer(model=model, args=args, train_dataset=_data(1), eval_dataset=_data(2))
    trainer.train()
    trainer.push_to_hub(tags=["my-run"])

    text = local_hub.file("me/trained-unite", "README.md").decode()
    card = _assert_unite_card(text, "me/trained-unite", "me/card-gene")
    assert {"my-run", "generated_from_trainer"} <= set(card.data.tags)
    assert card.data.license == "apache-2.0"
    assert card.data.datasets == ["nyu-mll/glue"]
    # Trainer's own section: its hyperparameters and the results logged while training
    training = card.text.split("\n## Training\n", 1)[1].split("\n## Use\n", 1)[0]
    assert "- learning_rate: 0.0003" in training and "- training_steps: 2" in training
    assert "### Training results" in training and "Validation Loss" in training
    assert f"- Transformers {transformers.__version__}" in training
    assert "This model is a fine-tuned version of" not in card.text  # not Trainer's boilerplate
    assert "More information needed" not in card.text

    files = local_hub.files("me/trained-unite")
    assert {"config.json", "model.safetensors", "modeling_unite.py"} <= set(files)
    _assert_no_token_pushed(local_hub, "me/trained-unite")
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained("me/trained-unite")
    assert loaded.config.gene == "me/card-gene"


def test_checkpoint_pushes_carry_the_unite_card(local_hub, tmp_path):  # noqa: F811
    """Regression: a hub_strategy checkpoint push uploaded output_dir without a card and without the
    modeling code that config.json's auto_map names."""
    model = _target("me/ckpt-gene")
    args = _args(tmp_path, "me/ckpt-unite", max_steps=2, save_strategy="steps", save_steps=1, logging_steps=1,
                 hub_strategy="every_save", hub_always_push=True)
    trainer = UniteTrainer(model=model, args=args, train_dataset=_data(3))
    trainer.train()
    trainer.push_to_hub()  # waits for the checkpoint pushes still running, then pushes the final model

    commits = {commit.title: commit for commit in local_hub.history("me/ckpt-unite")}
    pushed = [title for title in commits if title.startswith("Training in progress")]
    assert sorted(pushed) == ["Training in progress, step 1", "Training in progress, step 2"], list(commits)
    for title in [*pushed, "End of training"]:
        files = commits[title].files
        _assert_unite_card(files["README.md"].decode(), "me/ckpt-unite", "me/ckpt-gene")
        auto_map = json.loads(files["config.json"])["auto_map"]
        assert {name.split(".")[0] + ".py" for name in auto_map.values()} <= set(files), (title, sorted(files))
        assert {"model_structure.py", "model.safetensors"} <= set(files)
    _assert_no_token_pushed(local_hub, "me/ckpt-unite")


def test_create_model_card_without_the_hub_takes_trainer_arguments(tmp_path):
    """create_model_card() called by hand (no push): the UNITE card in output_dir, titled by the folder,
    with Trainer's license and tags arguments."""
    gene = extract_universal_knowledge(tiny_moe("mixtral"), calibration=torch.randint(0, VOCAB, (4, 12)),
                                       rank=(3, 8, 8), show_progress=False)
    model = UniteForSequenceClassification.from_gene(gene, num_hidden_layers=1, num_labels=2, pad_token_id=0)
    model.set_card_info(license="apache-2.0", tags=["recorded"])
    args = transformers.TrainingArguments(str(tmp_path / "local-run"), max_steps=1, per_device_train_batch_size=4,
                                          report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = UniteTrainer(model=model, args=args, train_dataset=_data(5))
    trainer.train()
    trainer.create_model_card(license="mit", tags="by-hand", dataset_tags=["sst2"], language="en")

    card = ModelCard.load(tmp_path / "local-run" / "README.md")
    assert card.text.lstrip().startswith("# local-run\n")
    assert 'from_pretrained("local-run")' in card.text and "A dense model grown with [UNITE]" in card.text
    assert card.data.license == "mit" and card.data.language == ["en"]
    assert {"unite", "recorded", "by-hand", "generated_from_trainer"} <= set(card.data.tags)
    assert card.data.datasets == ["nyu-mll/glue"]
    assert card.data.base_model is None  # an unsaved gene from a config-built source: no Hub id to name
    assert "- training_steps: 1" in card.text


def test_trainer_pushes_carry_no_lock_file(local_hub, tmp_path):  # noqa: F811
    """Regression: each checkpoint save left its filelock ``.checkpoint-N.lock`` in output_dir (and the final
    save ``.run.lock`` beside it), and Trainer's pushes upload output_dir with only ``_*`` and
    ``checkpoint-*`` ignored: the lock files landed on the Hub. Locks now live in the user's lock folder."""
    model = _target("me/lock-gene")
    args = _args(tmp_path, "me/lock-unite", max_steps=2, save_strategy="steps", save_steps=1, logging_steps=1,
                 hub_strategy="every_save", hub_always_push=True)
    trainer = UniteTrainer(model=model, args=args, train_dataset=_data(7))
    trainer.train()
    trainer.push_to_hub()

    history = local_hub.history("me/lock-unite")
    assert len(history) >= 3  # the repo's creation, two checkpoint pushes, the final push
    for commit in history:
        locks = [path for path in commit.files if path.endswith(".lock")]
        assert not locks, (commit.title, locks)
    run = tmp_path / "run"  # output_dir, and the folder that holds it (the hub cache's own locks are elsewhere)
    on_disk = [p.name for p in [*run.rglob("*"), *tmp_path.iterdir()] if p.name.endswith(".lock")]
    assert not on_disk, on_disk


def _files_holding(root, secret: bytes) -> list[str]:
    """Every file under ``root`` whose raw bytes contain ``secret`` (training_args.bin is a pickle, which
    stores strings verbatim: searched as bytes, never unpickled)."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and secret in p.read_bytes())


def test_the_hub_token_of_the_training_arguments_is_never_written(local_hub, tmp_path, monkeypatch):  # noqa: F811
    """Regression: Trainer pickles its arguments, hub_token included, into training_args.bin in every save
    and before every checkpoint push, and uploads it: the token was published with every push. UniteTrainer
    writes the arguments without the token, keeps it in memory for the uploads, and still resumes."""
    token = "hf_trainerargumentstoken0000000000000"
    model = _target("me/token-gene")
    monkeypatch.delenv("HF_TOKEN")  # from here on the server only accepts pushes that carry args.hub_token
    args = _args(tmp_path, "me/token-unite", max_steps=2, save_strategy="steps", save_steps=1, logging_steps=1,
                 hub_strategy="checkpoint", hub_always_push=True, hub_token=token)
    trainer = UniteTrainer(model=model, args=args, train_dataset=_data(8))
    trainer.train()
    trainer.push_to_hub()
    assert trainer.args.hub_token == token  # in memory: what authenticated the pushes

    run = tmp_path / "run"
    saved = sorted(p.relative_to(run).as_posix() for p in run.rglob("training_args.bin"))
    assert saved == ["checkpoint-1/training_args.bin", "checkpoint-2/training_args.bin", "training_args.bin"]
    pushed = [(commit.title, path) for commit in local_hub.history("me/token-unite") for path in commit.files
              if path.endswith("training_args.bin")]
    assert {path for _, path in pushed} == {"training_args.bin", "last-checkpoint/training_args.bin"}, pushed
    for commit in local_hub.history("me/token-unite"):
        leaked = [path for path, content in commit.files.items() if token.encode() in content]
        assert not leaked, (commit.title, leaked)
    assert _files_holding(run, token.encode()) == []
    # the file unpickles as transformers' own class, without unite_hf
    raw = (run / "training_args.bin").read_bytes()
    assert b"transformers.training_args" in raw and b"TrainingArguments" in raw and b"unite_hf" not in raw

    # Trainer's resume reads trainer_state.json, the optimizer and RNG states, not training_args.bin
    resumed = UniteTrainer(model=model, args=_args(tmp_path, "me/token-unite", max_steps=3, save_strategy="steps",
                                                   save_steps=1, logging_steps=1, hub_token=token),
                           train_dataset=_data(8))
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 3
    assert _files_holding(run, token.encode()) == []
    for commit in local_hub.history("me/token-unite"):
        assert not [path for path, content in commit.files.items() if token.encode() in content], commit.title

    # what a plain Trainer does with the same arguments (transformers' behaviour, README "Safety")
    plain = transformers.Trainer(model=model, args=transformers.TrainingArguments(
        str(tmp_path / "plain"), report_to=[], use_cpu=True, hub_token=token))
    plain.save_model()
    assert _files_holding(tmp_path / "plain", token.encode()) == ["training_args.bin"]


def test_checkpoint_pushes_after_a_final_push_publish_matching_checksums(local_hub, tmp_path):  # noqa: F811
    """Regression: a final push fills output_dir with the target and its unite_checksums.json; training on in
    that output_dir, each checkpoint push copied the new weights and config in beside the old checksum file
    and uploaded both, so the Hub's latest revision failed verification on download (from_pretrained raised
    CorruptedFileError). Every pushed revision now downloads, verifies and loads, with the weights pushed."""
    from unite_hf.io import TARGET_CHECKSUMS_NAME

    model = _target("me/sums-gene")
    first = UniteTrainer(model=model, args=_args(tmp_path, "me/sums-unite", max_steps=1, save_strategy="no"),
                         train_dataset=_data(9))
    first.train()
    first.push_to_hub()  # output_dir: the step-1 target with its checksums
    args = _args(tmp_path, "me/sums-unite", max_steps=2, save_strategy="steps", save_steps=1, logging_steps=1,
                 hub_strategy="every_save", hub_always_push=True, learning_rate=1e-2)
    second = UniteTrainer(model=model, args=args, train_dataset=_data(10))
    second.train()  # two checkpoint pushes, no final one: main is the step-2 checkpoint

    run = tmp_path / "run"
    pushed = local_hub.files("me/sums-unite")
    assert pushed["model.safetensors"] == (run / "checkpoint-2" / "model.safetensors").read_bytes()
    sums = json.loads(pushed[TARGET_CHECKSUMS_NAME])["files"]
    for name in ("model.safetensors", "config.json"):
        assert sums[name]["sha256"] == hashlib.sha256(pushed[name]).hexdigest(), name
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained("me/sums-unite")
    torch.testing.assert_close(loaded.state_dict(), second.model.state_dict(), rtol=0, atol=0)
    for commit in local_hub.history("me/sums-unite"):  # every revision that carries weights verifies
        if "model.safetensors" in commit.files:
            transformers.AutoModelForSequenceClassification.from_pretrained("me/sums-unite", revision=commit.oid)
