"""Method configs (issue 14): validated dataclasses, recipes saved in genes, and a CLI generated from them.

The expected defaults below are written out by hand from the papers' settings and the README (not read
from the configs), so a default changed in one place only fails here."""

from __future__ import annotations

import dataclasses
import inspect
import json
import subprocess
import sys

import pytest
import torch
from conftest import needs_data, run_cli, save_with_tokenizer
from hub_server import local_hub  # noqa: F401
from tiny_models import COMMON, VOCAB, tiny_moe

import unite_hf_cli
from unite_hf import (
    MasaExtractionConfig, UniteExtractionConfig, XpertExtractionConfig, extract_masa_gene, extract_universal_knowledge,
    extract_xpert_gene, load_gene,
)
from unite_hf.methods import METHODS, get_method
from unite_hf.methods.config import CONFIG_CLASSES
from unite_hf_cli.extract import config_from_args

CONFIGS = {"unite": UniteExtractionConfig, "masa": MasaExtractionConfig, "xpert": XpertExtractionConfig}
API = {"unite": extract_universal_knowledge, "masa": extract_masa_gene, "xpert": extract_xpert_gene}
CALIBRATION = torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(0))


def _parse(*argv: str):
    """``unite-hf extract *argv`` as the CLI reads it: (config, run inputs)."""
    argv = ["extract", "--source", "src", "--out", "gene", *argv]
    return config_from_args(unite_hf_cli.build_parser(argv).parse_args(argv))


# -- the configs -----------------------------------------------------------------------------------------

def test_every_method_is_registered_with_its_config_gene_class_and_extract_function():
    assert set(METHODS) == set(CONFIGS) and {m: CONFIG_CLASSES[m] for m in CONFIGS} == CONFIGS
    for name, config_class in CONFIGS.items():
        spec = get_method(name)
        assert spec.config_class is config_class and spec.gene_class.method == name
        assert config_class.method == name


def test_every_field_has_help():
    for config_class in CONFIGS.values():
        for field in dataclasses.fields(config_class):
            assert len(field.metadata.get("help", "")) > 10, f"{config_class.__name__}.{field.name}"


def test_defaults_are_the_documented_ones():
    unite, masa, xpert = UniteExtractionConfig(), MasaExtractionConfig(), XpertExtractionConfig()
    assert (unite.num_sequences, unite.seq_len, unite.batch_size, unite.rank) == (128, 512, 8, None)
    assert (unite.fusion, unite.decomposition, unite.fisher_labels, unite.calibration) == ("fisher", "tucker", "empirical", "wikitext2")
    assert (masa.rank, masa.seq_len, masa.tokens, masa.spectral_weight) == (64, 256, 262_144, 0.1)
    assert masa.corpora == ("wikitext2", "simplebooks")
    assert (xpert.num_sequences, xpert.seq_len, xpert.batch_size, xpert.k) == (32, 256, 4, None)  # as analyze-experts
    assert xpert.domains == ("wikitext2", "simplebooks", "openbookqa", "arc_easy", "sst2")


@pytest.mark.parametrize(("config_class", "kwargs", "message"), [
    (UniteExtractionConfig, {"fused_width": 8}, "fused_width applies only to fusion 'concat'"),
    (UniteExtractionConfig, {"rank": (2, 3)}, "three positive ints"),
    (UniteExtractionConfig, {"rank": 0}, "positive int"),
    (UniteExtractionConfig, {"num_sequences": 0}, "num_sequences must be an int >= 1"),
    (UniteExtractionConfig, {"seq_len": True}, "seq_len must be an int"),
    (UniteExtractionConfig, {"fisher_labels": "true"}, "fisher_labels must be one of"),
    (MasaExtractionConfig, {"rank": (8, 8, 8)}, "rank must be a positive int"),
    (MasaExtractionConfig, {"selection": "dense", "num_experts": 2}, "num_experts applies to selection 'frequent'"),
    (MasaExtractionConfig, {"learning_rate": 0.0}, "learning_rate must be a finite number > 0"),
    (MasaExtractionConfig, {"spectral_weight": float("nan")}, "spectral_weight"),
    (XpertExtractionConfig, {"strategy": "best"}, "strategy must be one of"),
    (XpertExtractionConfig, {"domains": []}, "at least one domain"),
])
def test_bad_settings_fail_at_construction_naming_the_field(config_class, kwargs, message):
    with pytest.raises(ValueError, match=message):
        config_class(**kwargs)


def test_concat_takes_a_fused_width_and_recipes_round_trip():
    config = UniteExtractionConfig(fusion="concat", fused_width=8, rank=[2, 4, 4])
    assert config.rank == (2, 4, 4)  # a recipe's list is the API's tuple
    data = config.to_dict()
    assert data["method"] == "unite" and data["rank"] == [2, 4, 4]
    assert json.loads(json.dumps(data)) == data
    assert UniteExtractionConfig.from_dict(data) == config
    import yaml

    assert UniteExtractionConfig.from_dict(yaml.safe_load(config.to_yaml())) == config
    with pytest.raises(ValueError, match="fusion: not an option of method 'masa'"):
        MasaExtractionConfig.from_dict({"fusion": "cp"})
    with pytest.raises(ValueError, match="recipe is for method 'unite', not 'xpert'"):
        XpertExtractionConfig.from_dict(data)


# -- CLI / API parity ------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_cli_defaults_are_the_api_defaults(method):
    config, inputs = _parse("--method", method)
    assert config == CONFIGS[method]() and inputs == {}
    parameters = inspect.signature(API[method]).parameters
    for field in dataclasses.fields(CONFIGS[method]):
        assert parameters[field.name].default == getattr(config, field.name), f"{method} {field.name}"


def test_analyze_experts_takes_xperts_defaults():
    """`unite-hf analyze-experts`, `analyze_experts` and `extract --method xpert` run one routing analysis."""
    from unite_hf import analyze_experts

    argv = ["analyze-experts", "--source", "s", "--out", "o"]
    args = unite_hf_cli.build_parser(argv).parse_args(argv)
    parameters = inspect.signature(analyze_experts).parameters
    for name, expected in {"num_sequences": 32, "seq_len": 256, "seed": 0, "batch_size": 4, "score": "min_frequency"}.items():
        assert getattr(args, name) == parameters[name].default == getattr(XpertExtractionConfig(), name) == expected
    assert parameters["domains"].default == XpertExtractionConfig().domains


def test_the_defaults_the_issue_found_disagreeing():
    """extract --method xpert analysed 128 x 512 tokens (analyze-experts and the API: 32 x 256); --method masa
    used seq_len 512 (the API: 256); --method masa --fusion was accepted, then ignored."""
    xpert, _ = _parse("--method", "xpert")
    assert (xpert.num_sequences, xpert.seq_len) == (32, 256)
    masa, _ = _parse("--method", "masa")
    assert masa.seq_len == 256
    with pytest.raises(ValueError, match="--fusion does not apply to --method masa"):
        _parse("--method", "masa", "--fusion", "uniform")
    with pytest.raises(ValueError, match="--importance does not apply to --method xpert"):
        _parse("--method", "xpert", "--importance", "gene")
    with pytest.raises(ValueError, match="--corpora, --tokens do not apply to --method unite"):
        _parse("--tokens", "5", "--corpora", "a")


def test_cli_options_become_the_config():
    config, inputs = _parse("--rank", "2,4,4", "--fusion", "concat", "--fused-width", "8", "--activation-aware",
                            "--importance", "donor")
    assert config == UniteExtractionConfig(rank=(2, 4, 4), fusion="concat", fused_width=8, activation_aware=True)
    assert inputs == {"importance": "donor"}
    config, inputs = _parse("--method", "xpert", "--domain", "a=x.txt", "--domain", "sst2", "--k-common", "2",
                            "--rank", "3", "--analysis", "dir")
    assert config.domains == {"a": "x.txt", "sst2": "sst2"} and config.k == 2 and config.rank == 3
    assert inputs == {"analysis": "dir"}
    config, _ = _parse("--method", "masa", "--rank", "8", "--corpora", "wikitext2")
    assert config.rank == 8 and config.corpora == ("wikitext2",)
    with pytest.raises(ValueError, match="MASA's rank is one int"):
        _parse("--method", "masa", "--rank", "8,8,8")


def test_a_recipe_file_with_flags_overriding_it(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: xpert\nnum_sequences: 4\nseq_len: 16\nstrategy: least\n")
    config, _ = _parse("--config", str(recipe), "--seq-len", "8")
    assert config == XpertExtractionConfig(num_sequences=4, seq_len=8, strategy="least")
    with pytest.raises(ValueError, match="is a 'xpert' recipe; it does not run with --method masa"):
        _parse("--config", str(recipe), "--method", "masa")
    recipe.write_text("method: unite\ntokens: 5\n")
    with pytest.raises(ValueError, match="tokens: not an option of method 'unite'"):
        _parse("--config", str(recipe))


def test_a_gene_keeps_its_recipe_and_the_recipe_runs_again(tmp_path):
    gene = extract_universal_knowledge(tiny_moe("mixtral"), calibration=CALIBRATION, rank=(2, 4, 4), n_iter_max=3,
                                       fusion="uniform", seed=7, show_progress=False)
    # the token tensor is not recorded (None), but the windows it gave are: 4 x 12, not the unread defaults
    # 128 x 512 (issue 22, item 6: replaying that recipe calibrated on other windows than the provenance says)
    expected = UniteExtractionConfig(calibration=None, num_sequences=4, seq_len=12, rank=(2, 4, 4), n_iter_max=3,
                                     fusion="uniform", seed=7)
    assert gene.recipe == expected
    assert (gene.config.num_sequences, gene.config.seq_len) == (4, 12)  # the provenance says the same
    gene.save_pretrained(tmp_path / "gene")
    loaded = load_gene(tmp_path / "gene")
    assert loaded.recipe == expected
    config_file = str(tmp_path / "gene" / "gene_config.json")
    with pytest.raises(ValueError, match="calibration was given in Python and not recorded; pass --calibration"):
        _parse("--config", config_file)
    config, _ = _parse("--config", config_file, "--calibration", "wikitext2")
    assert config == dataclasses.replace(expected, calibration="wikitext2")
    (tmp_path / "recipe.yaml").write_text(config.to_yaml())
    assert _parse("--config", str(tmp_path / "recipe.yaml"))[0] == config
    old = json.loads((tmp_path / "gene" / "gene_config.json").read_text())
    old.pop("recipe")  # a gene saved before recipes were kept
    (tmp_path / "old_config.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match="saved before genes kept their recipe"):
        _parse("--config", str(tmp_path / "old_config.json"))


def test_calibration_settings_a_run_does_not_read_are_named(tmp_path):
    """Which settings count depends on the inputs (issue 14): with precomputed importance, or streaming from
    a checkpoint, the calibration settings are not read, and a run given any of them says so."""
    import warnings

    model = tiny_moe("mixtral")
    importance = extract_universal_knowledge(model, calibration=CALIBRATION, rank=(2, 4, 4), n_iter_max=2,
                                             show_progress=False).expert_importance()
    with pytest.warns(UserWarning, match=r"num_sequences, seq_len have no effect: the importance is precomputed"):
        extract_universal_knowledge(model, importance=importance, rank=(2, 4, 4), n_iter_max=2, num_sequences=4,
                                    seq_len=12, show_progress=False)
    model.save_pretrained(tmp_path / "src")
    with pytest.warns(UserWarning, match=r"calibration has no effect: the experts stream from a checkpoint"):
        extract_universal_knowledge(tmp_path / "src", calibration=CALIBRATION, fusion="uniform", rank=(2, 4, 4),
                                    n_iter_max=2, show_progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # defaults: nothing to say
        extract_universal_knowledge(model, importance=importance, rank=(2, 4, 4), n_iter_max=2, show_progress=False)
    from unite_hf import analyze_experts

    analysis = analyze_experts(model, {"a": CALIBRATION, "b": CALIBRATION.flip(1)}, num_sequences=4, seq_len=12, show_progress=False)
    with pytest.warns(UserWarning, match=r"seq_len has no effect: the analysis is precomputed"):
        extract_xpert_gene(model, analysis=analysis, k=2, rank=(2, 4, 4), seq_len=12, n_iter_max=2, show_progress=False)


def _word_tokenizer():
    """A word-level tokenizer over the tiny vocabulary (w2 .. w95), built here; unknown words are [UNK]."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[EOS]": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", eos_token="[EOS]")


MARKER = "confidential-draft-7Q"
"""A string in every calibration document: a published file holding it published the text."""


def _documents() -> list[str]:
    return [f"  {MARKER} " + " ".join(f"w{(7 * i + j) % 90 + 2}" for j in range(60)) + "\n" for i in range(30)]


def _published_files(folder) -> dict[str, bytes]:
    from pathlib import Path

    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}


def test_a_gene_publishes_neither_its_calibration_text_nor_local_paths(tmp_path, local_hub, monkeypatch):  # noqa: F811
    """Issue 22, item 7: a list of strings went into gene_config.json's recipe whole (and push_to_hub uploaded
    it); a file put its absolute path into the card and the config. Now: the number of documents, their
    SHA-256 (of the JSON array of the documents as read) and a file's name; the recipe replays a file from
    the folder holding it."""
    import hashlib

    tokenizer, model = _word_tokenizer(), tiny_moe("mixtral")
    docs = _documents()
    digest = hashlib.sha256(json.dumps([d.strip() for d in docs], ensure_ascii=False).encode("utf-8")).hexdigest()
    settings = dict(num_sequences=4, seq_len=16, rank=(2, 4, 4), n_iter_max=2, show_progress=False)
    private = tmp_path / "private-folder"
    private.mkdir()
    (private / "corpus.txt").write_text("\n\n".join(docs), encoding="utf-8")

    listed = extract_universal_knowledge(model, tokenizer, calibration=docs, **settings)
    assert listed.config.calibration == f"list of 30 strings (30 documents, sha256 {digest})"
    assert listed.recipe.calibration is None  # the text is not published, so this recipe cannot replay it
    listed.push_to_hub("me/listed-gene")
    filed = extract_universal_knowledge(model, tokenizer, calibration=str(private / "corpus.txt"), **settings)
    # the same documents, the same hash, whichever way they came
    assert filed.config.calibration == f"corpus.txt (local file, 30 documents, sha256 {digest})"
    assert filed.recipe.calibration == "corpus.txt"
    filed.save_pretrained(tmp_path / "filed")

    published = {**{f"hub:{k}": v for k, v in local_hub.files("me/listed-gene").items()},
                 **_published_files(tmp_path / "filed")}
    for name, data in published.items():
        assert MARKER.encode() not in data and str(tmp_path).encode() not in data and b"private-folder" not in data, name
    assert len(published["hub:gene_config.json"]) < 20_000  # the config, not the corpus (30 x ~250 characters)

    monkeypatch.chdir(private)  # the recipe replays the file from the folder holding it: the same gene
    again = get_method("unite").extract(filed.recipe, model, tokenizer, show_progress=False)
    for proj in ("gate", "up", "down"):
        torch.testing.assert_close(again.fused_weight(0, proj), filed.fused_weight(0, proj), rtol=0, atol=0)


def test_masa_and_xpert_recipes_publish_no_text_nor_paths(tmp_path):
    from tiny_models import tiny_dense

    tokenizer, docs = _word_tokenizer(), _documents()
    private = tmp_path / "private-folder"
    private.mkdir()
    (private / "corpus.txt").write_text("\n\n".join(docs), encoding="utf-8")
    masa_settings = dict(rank=4, tokens=48, seq_len=12, batch_size=2, show_progress=False)
    listed = extract_masa_gene(tiny_dense(), tokenizer, corpora=docs, **masa_settings)
    assert listed.recipe.corpora is None and listed.config.calibration.startswith("list of 30 strings (30 documents")
    filed = extract_masa_gene(tiny_dense(), tokenizer, corpora=[str(private / "corpus.txt")], **masa_settings)
    assert filed.recipe.corpora == ("corpus.txt",) and filed.config.calibration.startswith("corpus.txt (local file")
    xpert = extract_xpert_gene(tiny_moe("mixtral"), tokenizer, domains={"a": docs, "b": str(private / "corpus.txt")},
                               num_sequences=3, seq_len=12, k=2, rank=(2, 4, 4), n_iter_max=2, show_progress=False)
    assert xpert.recipe.domains == {"a": None, "b": "corpus.txt"}
    for name, gene in (("listed", listed), ("filed", filed), ("xpert", xpert)):
        gene.save_pretrained(tmp_path / name)
        for file, data in _published_files(tmp_path / name).items():
            assert MARKER.encode() not in data and b"private-folder" not in data, (name, file)


def test_masa_and_xpert_genes_keep_their_recipes(tmp_path):
    from tiny_models import tiny_dense

    masa = extract_masa_gene(tiny_dense(), corpora=CALIBRATION, rank=4,
                             tokens=CALIBRATION.numel(), seq_len=12, batch_size=2, show_progress=False)
    assert masa.recipe == MasaExtractionConfig(corpora=None, rank=4, tokens=48, seq_len=12, batch_size=2)
    masa.save_pretrained(tmp_path / "masa")
    assert load_gene(tmp_path / "masa").recipe == masa.recipe


@needs_data
def test_cli_runs_a_recipe(tmp_path):
    import transformers

    config = transformers.MixtralConfig(**{**COMMON, "vocab_size": 50257}, intermediate_size=24, num_local_experts=4,
                                        num_experts_per_tok=2)
    save_with_tokenizer(transformers.MixtralForCausalLM(config), tmp_path / "src")
    (tmp_path / "recipe.yaml").write_text("method: unite\nnum_sequences: 2\nseq_len: 16\nrank: [2, 4, 4]\n"
                                          "fusion: frequency\nn_iter_max: 3\n")
    result = run_cli("extract", "--source", str(tmp_path / "src"), "--config", str(tmp_path / "recipe.yaml"),
                     "--num-sequences", "3", "--out", str(tmp_path / "gene"), "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    gene = load_gene(tmp_path / "gene")
    assert gene.recipe == UniteExtractionConfig(num_sequences=3, seq_len=16, rank=(2, 4, 4), fusion="frequency",
                                                n_iter_max=3)
    assert (gene.config.num_sequences, gene.config.seq_len, gene.config.ranks["up"]) == (3, 16, [2, 4, 4])
    result = run_cli("extract", "--source", str(tmp_path / "src"), "--method", "masa", "--fusion", "fisher",
                     "--out", str(tmp_path / "masa"), cwd=tmp_path)
    assert result.returncode == 2 and "--fusion does not apply to --method masa" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "masa").exists()


def test_configs_load_without_torch_and_are_the_librarys_classes():
    """The CLI reads the configs without torch; once unite_hf is imported they are its very classes."""
    script = """
import sys, unite_hf_cli.extract as e
configs = e.method_configs()
assert 'torch' not in sys.modules and 'unite_hf.gene' not in sys.modules, sorted(sys.modules)
import unite_hf
import unite_hf.methods.unite.config as c
assert configs['unite'] is unite_hf.UniteExtractionConfig is c.UniteExtractionConfig
assert configs['masa'] is unite_hf.MasaExtractionConfig
print(sorted(configs))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stdout.strip()) == (0, "['masa', 'unite', 'xpert']"), result.stderr


def test_deprecated_names_still_answer(monkeypatch):
    import importlib

    import unite_hf
    import unite_hf.cli
    import unite_hf.gene

    monkeypatch.delitem(sys.modules, "unite_hf.analysis", raising=False)
    with pytest.warns(FutureWarning, match="unite_hf.analysis moved to unite_hf.methods.xpert.analysis"):
        alias = importlib.import_module("unite_hf.analysis")
    assert alias.analyze_experts is unite_hf.analyze_experts and alias.DEFAULT_DOMAINS == XpertExtractionConfig().domains

    with pytest.warns(FutureWarning, match="EXTRACTORS is deprecated"):
        assert sorted(unite_hf.cli.EXTRACTORS) == ["masa", "unite", "xpert"]
    with pytest.warns(FutureWarning, match="GENE_MODULES is deprecated"):
        assert unite_hf.gene.GENE_MODULES["masa"] == "unite_hf.methods.masa.extract"
