"""Targets go to a real HTTP Hub server on 127.0.0.1: push, load by repo id, remote code, card."""

import json
import os
import subprocess
import sys

import torch
import transformers
from hub_server import local_hub  # noqa: F401
from tiny_models import VOCAB, tiny_moe

from unite_hf import UniteForSequenceClassification, extract_universal_knowledge


def test_push_load_and_card(local_hub, tmp_path):  # noqa: F811
    gene = extract_universal_knowledge(tiny_moe("mixtral"), calibration=torch.randint(0, VOCAB, (4, 12)),
                                       rank=(3, 8, 8), show_progress=False)
    gene.push_to_hub("me/mixtral-gene")
    model = UniteForSequenceClassification.from_gene("me/mixtral-gene", num_hidden_layers=2, rank=6, num_labels=4,
                                                     pad_token_id=0)
    assert model.config.gene == "me/mixtral-gene"
    model.set_card_info(datasets=["allenai/ai2_arc"], eval_results=[
        {"dataset_name": "ARC-Easy", "dataset_type": "allenai/ai2_arc", "metric_type": "accuracy", "metric_value": 0.5}])
    model.push_to_hub("me/arc-unite")
    assert {"config.json", "model.safetensors", "modeling_unite.py", "configuration_unite.py", "README.md"} <= set(
        local_hub.files("me/arc-unite"))

    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained("me/arc-unite")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=0, atol=0)

    from huggingface_hub import ModelCard

    card = ModelCard.load("me/arc-unite")
    assert {"unite", "learngene"} <= set(card.data.tags)
    assert card.data.base_model == ["me/mixtral-gene"] or "me/mixtral-gene" in card.data.base_model
    assert card.data.datasets == ["allenai/ai2_arc"]
    assert card.data.eval_results[0].metric_value == 0.5

    # a fresh interpreter without unite_hf loads it from the Hub with trust_remote_code
    script = (
        "import sys, json, torch\n"
        "sys.modules['unite_hf'] = None\n"
        "from transformers import AutoModelForSequenceClassification\n"
        "m = AutoModelForSequenceClassification.from_pretrained('me/arc-unite', trust_remote_code=True)\n"
        f"print(json.dumps(m(input_ids=torch.tensor({ids.tolist()})).logits.tolist()))\n"
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    torch.testing.assert_close(torch.tensor(json.loads(result.stdout.strip().splitlines()[-1])), expected,
                               rtol=1e-5, atol=1e-5)


def test_pushing_a_second_version_of_a_target_replaces_the_first(local_hub):  # noqa: F811
    gene = extract_universal_knowledge(tiny_moe("mixtral"), calibration=torch.randint(0, VOCAB, (4, 12)),
                                       rank=(3, 8, 8), show_progress=False)
    first = UniteForSequenceClassification.from_gene(gene, num_hidden_layers=1, rank=4, num_labels=2)
    second = UniteForSequenceClassification.from_gene(gene, num_hidden_layers=2, rank=6, num_labels=2)
    first.push_to_hub("me/re-target")
    second.push_to_hub("me/re-target")
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained("me/re-target")
    assert loaded.config.num_hidden_layers == 2 and loaded.config.ranks["up"] == [6, 6]


def test_a_target_grown_from_a_gene_revision_records_that_commit(local_hub, tmp_path):  # noqa: F811
    """from_gene("me/g", revision="v1") records the commit v1 resolved to (as genes record their source's), and
    the card names it with the line that loads that gene; before, only "me/g" was kept, i.e. main's gene."""
    from huggingface_hub import HfApi

    from unite_hf import UniteForCausalLM, UniteGene

    calibration = torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(0))
    first = extract_universal_knowledge(tiny_moe("mixtral"), calibration=calibration, rank=(3, 8, 8), show_progress=False)
    second = extract_universal_knowledge(tiny_moe("mixtral"), calibration=calibration, rank=(2, 6, 6), show_progress=False)
    first.push_to_hub("me/gene-rev")
    v1 = local_hub.head("me/gene-rev")
    assert first.revision == v1  # a pushed gene knows its commit
    HfApi().create_tag("me/gene-rev", tag="v1")
    second.push_to_hub("me/gene-rev")
    main = local_hub.head("me/gene-rev")
    assert main != v1

    model = UniteForCausalLM.from_gene("me/gene-rev", revision="v1", num_hidden_layers=2, core_init="tucker")
    assert (model.config.gene, model.config.gene_revision) == ("me/gene-rev", v1)
    assert model.config.ranks["up"] == [8, 8]  # v1's gene indeed (main's has rank 6)
    loaded = UniteGene.from_pretrained("me/gene-rev", revision="v1")
    assert loaded.revision == v1 and UniteForCausalLM.from_gene(loaded, num_hidden_layers=1).config.gene_revision == v1
    assert UniteForCausalLM.from_gene("me/gene-rev", num_hidden_layers=1).config.gene_revision == main
    first.save_pretrained(tmp_path / "gene")  # a folder has no commit
    assert first.revision is None
    assert UniteForCausalLM.from_gene(str(tmp_path / "gene"), num_hidden_layers=1).config.gene_revision is None

    model.save_pretrained(tmp_path / "target")
    assert transformers.AutoConfig.from_pretrained(tmp_path / "target").gene_revision == v1
    card = (tmp_path / "target" / "README.md").read_text(encoding="utf-8")
    snippet = f'UniteGene.from_pretrained("me/gene-rev", revision="{v1}")'
    assert f"at revision `{v1}`" in card and snippet in card
    named = UniteGene.from_pretrained("me/gene-rev", revision=v1)  # the card's line: the gene grown from
    torch.testing.assert_close(named.fused_weight(0, "up"), first.fused_weight(0, "up"), rtol=0, atol=0)


def _word_tokenizer():
    """A word-level tokenizer over the tiny vocabulary (w2 .. w95, [EOS] = 1), built here."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "[EOS]": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", eos_token="[EOS]")


def _greedy(model, ids: torch.Tensor, steps: int) -> list[int]:
    """Greedy decoding by hand: the argmax of the last position's logits, appended, ``steps`` times."""
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0].tolist()


def _generated(source: str, prompt: str, steps: int) -> list[int]:
    generator = transformers.pipeline("text-generation", model=source)
    return generator(prompt, max_new_tokens=steps, do_sample=False, return_tensors=True)[0]["generated_token_ids"]


def test_the_gene_tokenizer_is_saved_and_pushed_with_the_target(local_hub, tmp_path):  # noqa: F811
    """Issue 22, item 8: a gene holds its tokenizer, but a target grown from it was saved without one, so
    pipeline("text-generation", model=folder) failed. The target's save and push write it, inside the save's
    checksum record; Trainer-style saves of another tokenizer over it and saves without one keep working."""
    import hashlib

    from unite_hf import UniteForCausalLM

    tokenizer = _word_tokenizer()
    gene = extract_universal_knowledge(tiny_moe("mixtral"), tokenizer, calibration=torch.randint(2, VOCAB, (4, 12)),
                                       rank=(3, 8, 8), show_progress=False)
    gene.save_pretrained(tmp_path / "gene")
    model = UniteForCausalLM.from_gene(str(tmp_path / "gene"), num_hidden_layers=2, core_init="tucker")
    model.save_pretrained(tmp_path / "target")
    record = json.loads((tmp_path / "target" / "unite_checksums.json").read_text(encoding="utf-8"))["files"]
    for name in ("tokenizer.json", "tokenizer_config.json"):  # in the record, as written
        data = (tmp_path / "target" / name).read_bytes()
        assert record[name] == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    prompt, steps = "w5 w9 w13 w40", 4
    expected = _greedy(model, torch.tensor([tokenizer(prompt)["input_ids"]]), steps)
    for source in (str(tmp_path / "target"), "me/generating-target"):
        if source.startswith("me/"):
            model.push_to_hub(source)
            assert {"tokenizer.json", "tokenizer_config.json"} <= set(local_hub.files(source))
            assert "tokenizer.json" in json.loads(local_hub.file(source, "unite_checksums.json"))["files"]
        out = _generated(source, prompt, steps)
        # greedy stops early only at the eos token
        assert out == expected[:len(out)] and (len(out) == len(expected) or out[-1] == tokenizer.eos_token_id)
    model.save_pretrained(tmp_path / "pushed", push_to_hub=True, repo_id="me/saved-and-pushed")
    assert "tokenizer.json" in local_hub.files("me/saved-and-pushed")

    # Trainer saves its processing_class over the model's tokenizer: the target still loads (a tokenizer is
    # recorded, not checked: from_pretrained does not read it), and a save without a tokenizer keeps the folder's
    changed = transformers.AutoTokenizer.from_pretrained(tmp_path / "target")
    changed.pad_token = "[EOS]"
    changed.save_pretrained(tmp_path / "target")
    reloaded = UniteForCausalLM.from_pretrained(tmp_path / "target")
    assert reloaded.tokenizer is None
    reloaded.save_pretrained(tmp_path / "target")
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "target").pad_token == "[EOS]"
    reloaded.push_to_hub("me/generating-target")  # and a push without one keeps the repo's
    assert "tokenizer.json" in local_hub.files("me/generating-target")
    assert _generated("me/generating-target", prompt, steps) == _generated(str(tmp_path / "target"), prompt, steps)

    # a real Trainer checkpoint: the model's save writes the gene's tokenizer, then Trainer its processing_class
    ids = torch.randint(2, VOCAB, (4, 8), generator=torch.Generator().manual_seed(0))
    train = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(str(tmp_path / "run"), max_steps=1, save_steps=1, per_device_train_batch_size=2,
                                          report_to=[], use_cpu=True)
    transformers.Trainer(model=model, args=args, train_dataset=train, processing_class=changed).train()
    checkpoint = tmp_path / "run" / "checkpoint-1"
    assert transformers.AutoTokenizer.from_pretrained(checkpoint).pad_token == "[EOS]"  # Trainer's, over the gene's
    trained = UniteForCausalLM.from_pretrained(checkpoint)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(trained.state_dict()[name], tensor, rtol=0, atol=0)
