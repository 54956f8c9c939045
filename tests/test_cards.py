"""Model cards and provenance in the usual Hugging Face flows, against the real local HTTP Hub (issue 12,
bugs 2 and 3). Each test names the defect it guards against."""

from __future__ import annotations

import copy
import dataclasses
import re

import pytest
import torch
import transformers
from datasets import Dataset
from huggingface_hub import ModelCard
from hub_server import local_hub  # noqa: F401
from tiny_models import VOCAB, tiny_moe

from unite_hf import (
    UniteForCausalLM, UniteForMultipleChoice, UniteForSequenceClassification, UniteGene, UniteModel,
    extract_universal_knowledge,
)
from unite_hf.cards import PAPER_URL, calibration_dataset_ids, dataset_hub_id, hub_id
from unite_hf.provenance import resolve_source, snapshot_provenance

CALIBRATION = torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def _extracted() -> UniteGene:
    return extract_universal_knowledge(tiny_moe("mixtral"), calibration=CALIBRATION, rank=(3, 8, 8), show_progress=False)


@pytest.fixture
def gene(_extracted) -> UniteGene:
    """A fresh, never saved copy per test (saving and pushing name a gene)."""
    fresh = copy.copy(_extracted)
    fresh.config = dataclasses.replace(_extracted.config)
    return fresh


def _card(local_hub, repo_id: str) -> ModelCard:  # noqa: F811
    return ModelCard(local_hub.file(repo_id, "README.md").decode())


def _assert_unite_card(card: ModelCard, repo_id: str) -> None:
    assert card.text.lstrip().startswith(f"# {repo_id}"), card.text[:200]
    assert f'from_pretrained("{repo_id}")' in card.text
    assert "REPO_ID" not in card.text and "this/repo" not in card.text
    assert PAPER_URL in card.text
    assert {"unite", "learngene"} <= set(card.data.tags)


def test_save_pretrained_push_to_hub_publishes_the_unite_card(local_hub, gene, tmp_path):  # noqa: F811
    """Regression: the card was written after transformers' upload, so the Hub got the empty template."""
    gene.push_to_hub("me/gene")
    model = UniteForSequenceClassification.from_gene("me/gene", num_hidden_layers=2, num_labels=3)
    model.save_pretrained(tmp_path / "local", push_to_hub=True, repo_id="me/pushed")
    card = _card(local_hub, "me/pushed")
    _assert_unite_card(card, "me/pushed")
    assert card.data.base_model == "me/gene"
    assert card.data.pipeline_tag == "text-classification"
    assert (tmp_path / "local" / "README.md").read_text() == local_hub.file("me/pushed", "README.md").decode()
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained("me/pushed")
    assert loaded.config.gene == "me/gene"


def test_push_to_hub_keeps_tags_and_reload_keeps_card_info(local_hub, gene, tmp_path):  # noqa: F811
    """Regression: push_to_hub(tags=...) dropped the tags; a reloaded target lost datasets and model-index."""
    model = UniteForSequenceClassification.from_gene(gene, num_hidden_layers=1, num_labels=2)
    model.set_card_info(datasets=["sst2"], eval_results=[{"dataset_name": "SST-2", "dataset_type": "sst2",
                                                          "dataset_config": "sst2", "metric_type": "accuracy",
                                                          "metric_value": 0.75}])
    model.push_to_hub("me/tagged", tags=["my-tag"])
    card = _card(local_hub, "me/tagged")
    assert "my-tag" in card.data.tags
    assert card.data.datasets == ["nyu-mll/glue"]  # a task name becomes its Hub id
    assert card.data.eval_results[0].dataset_type == "nyu-mll/glue"
    assert card.data.eval_results[0].task_type == "text-classification"

    model.save_pretrained(tmp_path / "saved")
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "saved")
    reloaded.push_to_hub("me/repushed")
    again = _card(local_hub, "me/repushed")
    assert again.data.datasets == ["nyu-mll/glue"]
    assert again.data.eval_results[0].metric_value == 0.75
    assert "model-index" in local_hub.file("me/repushed", "README.md").decode()


def test_gene_name_is_the_gene_not_its_source(local_hub, gene, tmp_path, monkeypatch):  # noqa: F811
    """Regression: config.gene and base_model held the gene's *source* id, and local paths reached base_model."""
    gene.config.source_id = "org/source-moe"  # what a Hub-loaded source records
    unsaved = UniteForCausalLM.from_gene(gene, num_hidden_layers=1)
    assert unsaved.config.gene is None and unsaved.config.gene_source == "org/source-moe"
    gene.save_pretrained(tmp_path / "my-gene")
    from_object = UniteForCausalLM.from_gene(gene, num_hidden_layers=1)
    from_folder = UniteForCausalLM.from_gene(str(tmp_path / "my-gene"), num_hidden_layers=1)
    assert from_object.config.gene == from_folder.config.gene == str(tmp_path / "my-gene")
    from_folder.push_to_hub("me/from-folder")
    card = _card(local_hub, "me/from-folder")
    assert card.data.base_model == "org/source-moe"  # the folder is no Hub id; the source is
    assert str(tmp_path) not in str(card.data.to_dict())
    gene.push_to_hub("me/named-gene")
    assert UniteForCausalLM.from_gene(gene, num_hidden_layers=1).config.gene == "me/named-gene"

    # a gene folder named relatively, the target saved from another folder: the name is no Hub id there
    monkeypatch.chdir(tmp_path)
    relative = UniteForCausalLM.from_gene("my-gene", num_hidden_layers=1)
    assert relative.config.gene == "my-gene"
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    relative.save_pretrained("target")
    reloaded = UniteForCausalLM.from_pretrained("target")
    reloaded.save_pretrained("again")
    assert ModelCard.load("again/README.md").data.base_model == "org/source-moe"


def test_card_metadata_per_head_license_and_datasets(gene, tmp_path):
    heads = {UniteModel: "feature-extraction", UniteForCausalLM: "text-generation",
             UniteForSequenceClassification: "text-classification", UniteForMultipleChoice: "multiple-choice"}
    for cls, tag in heads.items():
        kwargs = {"num_labels": 2} if cls is UniteForSequenceClassification else {}
        model = cls.from_gene(gene, num_hidden_layers=1, **kwargs)
        model.save_pretrained(tmp_path / cls.__name__)
        card = ModelCard.load(tmp_path / cls.__name__ / "README.md")
        assert card.data.pipeline_tag == tag, cls.__name__
        assert card.data.license is None  # the source (built from a config) has none
        assert card.data.base_model is None  # an unsaved gene of a config-built source: nothing to link
    model.set_card_info(license="apache-2.0")
    model.save_pretrained(tmp_path / "licensed")
    assert ModelCard.load(tmp_path / "licensed" / "README.md").data.license == "apache-2.0"
    assert dataset_hub_id("rte") == "nyu-mll/glue" and dataset_hub_id("arc_easy") == "allenai/ai2_arc"
    assert dataset_hub_id("wikitext2") == "Salesforce/wikitext" and dataset_hub_id("me/data") == "me/data"
    assert calibration_dataset_ids("wikitext2 (local: wikitext2/x.txt)") == ["Salesforce/wikitext"]
    assert calibration_dataset_ids("Salesforce/wikitext:wikitext-2-raw-v1[train]") == ["Salesforce/wikitext"]
    assert calibration_dataset_ids("input_ids tensor") == [] and calibration_dataset_ids("/data/x.txt") == []
    assert [hub_id(x) for x in ("org/name", "gpt2", "/abs/path", "./rel", "a/b/c", str(tmp_path))] == [
        "org/name", "gpt2", None, None, None, None]


def test_gene_card_title_repo_id_and_datasets(local_hub, gene):  # noqa: F811
    """Regression: a config-built source titled the card "UNITE gene of `unknown`"; the snippet said this/repo."""
    gene.push_to_hub("me/titled-gene")
    card = _card(local_hub, "me/titled-gene")
    title = card.text.lstrip().splitlines()[0]
    assert "unknown" not in title and "mixtral" in title, title
    assert 'UniteGene.from_pretrained("me/titled-gene")' in card.text and "this/repo" not in card.text
    assert PAPER_URL in card.text
    assert card.data.base_model is None


def test_trainer_push_publishes_base_model_and_tags(local_hub, gene, tmp_path):  # noqa: F811
    """Regression: Trainer's card had no base model and no UNITE tags."""
    gene.push_to_hub("me/trainer-gene")
    model = UniteForSequenceClassification.from_gene("me/trainer-gene", num_hidden_layers=1, num_labels=2)
    assert model.config.name_or_path == "me/trainer-gene" and {"unite", "learngene"} <= set(model.model_tags)
    ids = torch.randint(1, VOCAB, (8, 6), generator=torch.Generator().manual_seed(1))
    train = Dataset.from_dict({"input_ids": ids.tolist(), "labels": [i % 2 for i in range(8)]})
    args = transformers.TrainingArguments(str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=4,
                                          report_to=[], save_strategy="no", push_to_hub=True,
                                          hub_model_id="me/trained", use_cpu=True, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=train)
    trainer.train()
    trainer.push_to_hub()
    card = _card(local_hub, "me/trained")
    assert card.data.base_model == "me/trainer-gene"
    assert {"unite", "learngene", "unite_hf"} <= set(card.data.tags)
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained("me/trained")
    assert loaded.config.gene == "me/trainer-gene"


def test_auto_peft_model_loads_an_adapter_trained_on_a_target(gene, tmp_path):
    """Regression: an adapter trained on a target grown from a gene recorded base_model_name_or_path null."""
    from peft import AutoPeftModelForSequenceClassification, LoraConfig, PeftConfig, get_peft_model

    from unite_hf.training import attention_projection_names

    target = UniteForSequenceClassification.from_gene(gene, num_hidden_layers=2, num_labels=2, pad_token_id=0)
    target.save_pretrained(tmp_path / "target")
    peft_model = get_peft_model(target, LoraConfig(task_type="SEQ_CLS", r=2, init_lora_weights=False,
                                                   target_modules=attention_projection_names(target)))
    peft_model.save_pretrained(tmp_path / "adapter")
    assert PeftConfig.from_pretrained(tmp_path / "adapter").base_model_name_or_path == str(tmp_path / "target")
    ids = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        loaded = AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "adapter")
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected)


def test_source_revision_is_the_commit_sha_and_license_comes_from_the_source(local_hub, tmp_path):  # noqa: F811
    """Regression: source_revision was None ("main" from the CLI): transformers 5 configs have no _commit_hash."""
    source = tiny_moe("mixtral")
    source.push_to_hub("me/tiny-moe")
    ModelCard("---\nlicense: mit\n---\n# tiny\n").push_to_hub("me/tiny-moe")
    sha = local_hub.head("me/tiny-moe")
    assert re.fullmatch(r"[0-9a-f]{40}", sha)

    loaded = transformers.AutoModelForCausalLM.from_pretrained("me/tiny-moe")
    gene = extract_universal_knowledge(loaded, calibration=CALIBRATION, rank=(2, 8, 8), show_progress=False)
    assert gene.config.source_id == "me/tiny-moe"
    assert gene.config.source_revision == sha
    assert gene.config.source_license == "mit"
    gene.save_pretrained(tmp_path / "gene")
    card = ModelCard.load(tmp_path / "gene" / "README.md")
    assert card.data.base_model == "me/tiny-moe" and card.data.license == "mit"
    target = UniteForCausalLM.from_gene(tmp_path / "gene", num_hidden_layers=1)
    target.save_pretrained(tmp_path / "target")
    assert ModelCard.load(tmp_path / "target" / "README.md").data.license == "mit"  # the default: the source's

    # a model loaded from a Hub cache snapshot folder names its repo and commit in the path
    from huggingface_hub import snapshot_download

    folder = snapshot_download("me/tiny-moe")
    assert snapshot_provenance(folder) == ("me/tiny-moe", sha)
    from_folder = extract_universal_knowledge(transformers.AutoModelForCausalLM.from_pretrained(folder),
                                              calibration=CALIBRATION, rank=(2, 8, 8), show_progress=False)
    assert (from_folder.config.source_id, from_folder.config.source_revision) == ("me/tiny-moe", sha)
    # a branch name given on the command line resolves to the sha too
    assert resolve_source("me/tiny-moe", "main").revision == sha
