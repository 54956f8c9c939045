"""What is written and read back: validated loading, target checksums, cheap checks first, atomic folders.

Inconsistent genes are made the hard way: the tensors or the config are rewritten and the checksums
recomputed, so that only validation (not the SHA-256 check) can refuse them. Each must fail inside
``from_pretrained`` with :class:`GeneFormatError`, before any model is built.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from hub_server import local_hub  # noqa: F401
from test_fault_injection import folder_hashes, tiny_tokenizer
from tiny_models import VOCAB, tiny_config, tiny_moe

from unite_hf import CorruptedFileError, GeneConfig, GeneFormatError, UniteForCausalLM, UniteGene, extract_universal_knowledge
from unite_hf.gene import check_gene_destination
from unite_hf.io import (
    LOCK_DIR_ENV, TARGET_CHECKSUMS_NAME, ArtifactWriteError, file_record, lock_dir, lock_path, write_folder_atomically,
)

CALIBRATION = torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def gene() -> UniteGene:
    return extract_universal_knowledge(tiny_moe("mixtral"), calibration=CALIBRATION, show_progress=False)


@pytest.fixture
def saved(gene, tmp_path) -> Path:
    gene.save_pretrained(tmp_path / "gene")
    return tmp_path / "gene"


def _config(path: Path) -> dict:
    return json.loads((path / "gene_config.json").read_text())


def _write_config(path: Path, config) -> None:
    (path / "gene_config.json").write_text(json.dumps(config))


def _rewrite_tensors(path: Path, file: str, change) -> None:
    """Apply ``change(tensors)`` to a safetensors file of the gene and record its new checksum."""
    tensors = load_file(path / file)
    change(tensors)
    save_file(tensors, path / file)
    config = _config(path)
    config["files"][file] = file_record(path / file)
    _write_config(path, config)


def _nan_core(t):
    t["ffn.up.core"][0, 0, 0] = float("nan")


def _int_core(t):
    t["ffn.up.core"] = t["ffn.up.core"].round().to(torch.int64)


def _short_layer_factor(t):
    t["ffn.gate.layer_factor"] = t["ffn.gate.layer_factor"][:-1]


def _wide_fisher(t):
    t["importance.fisher"] = torch.cat([t["importance.fisher"], t["importance.fisher"][:, :1]], dim=1)


def _narrow_out_factor(t):
    t["ffn.down.out_factor"] = t["ffn.down.out_factor"][1:]


def _inf_source_weight(t):
    t["model.embed_tokens.weight"][0, 0] = float("inf")


def _stowaways(t):
    t["ffn.up.extra"] = torch.zeros(2)
    t["stowaway"] = torch.ones(3)


TENSOR_CASES = {
    "NaN in a core": (_nan_core, "NaN"),
    "int64 core": (_int_core, "torch.int64"),
    "layer_factor shape": (_short_layer_factor, "layer_factor"),
    "fisher shape": (_wide_fisher, "importance.fisher"),
    "out_factor shape": (_narrow_out_factor, "out_factor"),
    "unknown tensors": (_stowaways, r"does not have: \['ffn.up.extra', 'stowaway'\]"),  # issue 21, item 11
}


@pytest.mark.parametrize("case", sorted(TENSOR_CASES))
def test_inconsistent_tensors_under_valid_checksums_are_refused(saved, case):
    change, message = TENSOR_CASES[case]
    _rewrite_tensors(saved, "gene.safetensors", change)
    with pytest.raises(GeneFormatError, match=message):
        UniteGene.from_pretrained(saved)


def test_non_finite_source_weight_is_refused(saved):
    _rewrite_tensors(saved, "source_weights.safetensors", _inf_source_weight)
    with pytest.raises(GeneFormatError, match="embed_tokens.*NaN or Inf"):
        UniteGene.from_pretrained(saved)


CONFIG_CASES = {
    "a list instead of an object": (lambda c: [c], "must hold a JSON object"),
    "missing sha256": (lambda c: {**c, "files": {**c["files"], "gene.safetensors": {"size": 10}}}, "sha256"),
    "format_version true": (lambda c: {**c, "format_version": True}, "format version True"),
    "moe_layers as a string": (lambda c: {**c, "moe_layers": "0,1,2"}, "'moe_layers' must be a list"),
    "num_layers three": (lambda c: {**c, "num_layers": "three"}, "'num_layers' must be an integer"),
    "missing source_config": (lambda c: {k: v for k, v in c.items() if k != "source_config"}, "source_config"),
    "empty source_config": (lambda c: {**c, "source_config": {}}, "source_config is empty"),
    "ranks as a string": (lambda c: {**c, "ranks": "3,24,32"}, "'ranks' must be a JSON object"),
    "a rank that is not an int": (lambda c: {**c, "ranks": {**c["ranks"], "up": [3, "24", 32]}}, "'ranks' holds"),
    "moe_layers past num_layers": (lambda c: {**c, "moe_layers": [0, 1, 7]}, "below num_layers"),
    "ranks disagree with the core": (lambda c: {**c, "ranks": {**c["ranks"], "up": [2, 24, 32]}}, "ffn.up.core"),
    "has_bias as a string": (lambda c: {**c, "has_bias": "no"}, "'has_bias' must be true or false"),
    "files as a list": (lambda c: {**c, "files": list(c["files"])}, "'files' must be a JSON object"),
    # issue 21, item 12: source_config against the gene and its weights (from_gene allocated by it)
    "source vocab_size past the embedding": (lambda c: _source(c, vocab_size=200_000_000), "embedding"),
    "source num_hidden_layers 1e7": (lambda c: _source(c, num_hidden_layers=10_000_000), "num_layers is 3"),
    "source layers beyond the weights": (lambda c: {**_source(c, num_hidden_layers=4), "num_layers": 4},
                                         "holds the weights of layers 0..2"),
    "negative source hidden_size": (lambda c: _source(c, hidden_size=-32), r"'hidden_size'\] must be a positive"),
    "source hidden_size off the gene's": (lambda c: _source(c, hidden_size=64), "gene's hidden_size is 32"),
    "no projections": (lambda c: {**c, "projections": []}, "projections must name"),  # issue 21, item 17
}


def _source(config: dict, **changes) -> dict:
    return {**config, "source_config": {**config["source_config"], **changes}}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_config_of_the_wrong_shape_or_type_is_refused(saved, case):
    change, message = CONFIG_CASES[case]
    _write_config(saved, change(_config(saved)))
    with pytest.raises(GeneFormatError, match=message):
        UniteGene.from_pretrained(saved)


def test_missing_source_config_fails_at_load_not_in_from_gene(saved):
    """The probe measured 43 s and 12 GB in from_gene before a size mismatch: the gene's own load now
    refuses it, so from_gene fails with that same error before building any model."""
    config = _config(saved)
    del config["source_config"]
    _write_config(saved, config)
    with pytest.raises(GeneFormatError, match="source_config") as at_load:
        UniteGene.from_pretrained(saved)
    with pytest.raises(GeneFormatError) as in_from_gene:
        UniteForCausalLM.from_gene(saved)
    assert str(in_from_gene.value) == str(at_load.value)


def test_unknown_config_keys_warn_and_are_named(saved, gene):
    _write_config(saved, {**_config(saved), "moe_layer": [0], "new_feature": 1})
    with pytest.warns(UserWarning, match=r"\['moe_layer', 'new_feature'\]"):
        loaded = UniteGene.from_pretrained(saved)
    assert loaded.moe_layers == gene.moe_layers
    with pytest.warns(UserWarning, match="does not know"):
        GeneConfig.from_dict({**gene.config.to_dict(), "typo": 1})


def test_a_tokenizer_left_from_another_gene_is_refused(saved, tmp_path):
    """Every file is recorded: a file beside them that the config does not vouch for is a mix."""
    (saved / "tokenizer.json").write_text("{}")
    with pytest.raises(GeneFormatError, match="does not record.*tokenizer.json"):
        UniteGene.from_pretrained(saved)


@pytest.fixture
def saved_with_tokenizer(gene, tmp_path) -> Path:
    gene.tokenizer = tiny_tokenizer()
    try:
        gene.save_pretrained(tmp_path / "gene")
    finally:
        gene.tokenizer = None
    return tmp_path / "gene"


def test_every_file_is_checksummed_and_a_changed_tokenizer_file_is_refused(saved_with_tokenizer, tmp_path):
    config = _config(tmp_path / "gene")
    on_disk = {p.name for p in (tmp_path / "gene").iterdir()} - {"gene_config.json"}
    assert set(config["files"]) == on_disk and "tokenizer.json" in on_disk
    for name, record in config["files"].items():  # an independent hash of each file
        assert record["sha256"] == hashlib.sha256((tmp_path / "gene" / name).read_bytes()).hexdigest()
    tokenizer_config = tmp_path / "gene" / "tokenizer_config.json"
    tokenizer_config.write_text(tokenizer_config.read_text().replace("[UNK]", "[UNX]"))
    with pytest.raises(CorruptedFileError, match="tokenizer_config.json"):
        UniteGene.from_pretrained(tmp_path / "gene")


def test_saving_a_gene_without_tokenizer_over_one_with_removes_the_old_tokenizer(gene, saved_with_tokenizer,
                                                                                 tmp_path):
    assert (tmp_path / "gene" / "tokenizer.json").exists()
    gene.save_pretrained(tmp_path / "gene")
    assert sorted(p.name for p in (tmp_path / "gene").iterdir()) == [
        "README.md", "gene.safetensors", "gene_config.json", "source_weights.safetensors"]
    assert UniteGene.from_pretrained(tmp_path / "gene").tokenizer is None


def test_safetensors_headers_and_json_are_written_sorted(saved):
    for name in ("gene.safetensors", "source_weights.safetensors"):
        data = (saved / name).read_bytes()
        (length,) = struct.unpack("<Q", data[:8])
        header = data[8:8 + length].decode().rstrip(" ")
        assert header == json.dumps(json.loads(header), sort_keys=True, separators=(",", ":"))
        assert load_file(saved / name)  # still a valid file
    text = (saved / "gene_config.json").read_text()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"


def test_a_folder_with_foreign_files_is_not_replaced(gene, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("years of work")
    with pytest.raises(ArtifactWriteError, match="not part of this artifact.*thesis.tex"):
        gene.save_pretrained(tmp_path / "mine")
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "years of work"
    with pytest.raises(ArtifactWriteError, match="thesis.tex"):
        check_gene_destination(tmp_path / "mine")


def test_an_existing_file_is_not_a_destination(gene, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArtifactWriteError, match="not a folder"):
        gene.save_pretrained(tmp_path / "file")
    with pytest.raises(ArtifactWriteError, match="not a folder"):
        check_gene_destination(tmp_path / "file")
    assert (tmp_path / "file").read_text() == "x"


def test_write_folder_atomically_leaves_the_old_folder_on_any_exception(tmp_path):
    def good(folder: Path) -> None:
        (folder / "a").write_text("old")

    def bad(folder: Path) -> None:
        (folder / "a").write_text("new")
        raise RuntimeError("half way")

    write_folder_atomically(tmp_path / "out", good)
    with pytest.raises(RuntimeError):
        write_folder_atomically(tmp_path / "out", bad)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["a"] and (tmp_path / "out" / "a").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_saving_leaves_no_lock_file_in_or_beside_the_folder(gene, target, tmp_path, monkeypatch):
    """Regression: every save left its filelock ``.{name}.lock`` beside the folder, where an upload of the
    parent folder picked it up (Trainer pushes output_dir, which holds checkpoint-N folders). The lock
    lives in the user's lock folder, one per folder path, whatever name the path is given by."""
    locks = tmp_path / "locks"
    monkeypatch.setenv(LOCK_DIR_ENV, str(locks))
    model, _ = target
    parent = tmp_path / "out"
    gene.save_pretrained(parent / "gene")
    model.save_pretrained(parent / "target")
    model.save_pretrained(parent / "target")  # over an existing target: hard-links, swap
    assert sorted(p.name for p in parent.iterdir()) == ["gene", "target"]
    assert not [p for p in parent.rglob("*") if p.name.endswith(".lock")]
    assert sorted(p.name.rsplit("-", 1)[0] for p in locks.iterdir()) == ["gene", "target"]
    (tmp_path / "link").symlink_to(parent)  # one folder, two names: one lock
    assert lock_path(tmp_path / "link" / "gene") == lock_path(parent / "gene") == lock_path(parent / "x" / ".." / "gene")
    assert lock_path(parent / "gene") != lock_path(parent / "target")
    (parent / ".gene.lock").touch()  # left by unite_hf before the lock folder: removed by the next save
    gene.save_pretrained(parent / "gene")
    assert sorted(p.name for p in parent.iterdir()) == ["gene", "target"]

    monkeypatch.delenv(LOCK_DIR_ENV)  # the default: the user's cache (the password database's home, not $HOME)
    monkeypatch.setenv("HOME", str(tmp_path / "elsewhere"))
    import pwd

    assert lock_dir() == Path(pwd.getpwuid(os.getuid()).pw_dir) / ".cache" / "unite_hf" / "locks"
    assert lock_dir().is_dir() and not (tmp_path / "elsewhere").exists()


# -- targets --------------------------------------------------------------------------------------------

@pytest.fixture
def target(gene, tmp_path):
    model = UniteForCausalLM.from_gene(gene, num_hidden_layers=1, rank=4)
    model.save_pretrained(tmp_path / "target")
    return model, tmp_path / "target"


def test_target_checksums_are_recorded_and_a_flipped_byte_is_refused(target):
    _, path = target
    records = json.loads((path / TARGET_CHECKSUMS_NAME).read_text())["files"]
    assert {"config.json", "model.safetensors", "modeling_unite.py", "README.md"} <= set(records)
    for name, record in records.items():
        assert record["sha256"] == hashlib.sha256((path / name).read_bytes()).hexdigest()
    transformers.AutoModelForCausalLM.from_pretrained(path)  # loads while intact
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01  # one bit of one weight: safetensors itself would load it
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptedFileError, match="model.safetensors does not match"):
        transformers.AutoModelForCausalLM.from_pretrained(path)
    with pytest.raises(CorruptedFileError):
        UniteForCausalLM.from_pretrained(path)


def test_target_overwrite_is_atomic_keeps_foreign_files_and_drops_stale_shards(target, gene, tmp_path):
    model, path = target
    (path / "tokenizer.json").write_text("{}")  # saved beside the model by the user
    (path / "train.py").write_text("# the user's script")
    (path / "checkpoint-10").mkdir()
    (path / "checkpoint-10" / "trainer_state.json").write_text("{}")
    (path / "model-00002-of-00002.safetensors").write_bytes(b"stale shard")
    bigger = UniteForCausalLM.from_gene(gene, num_hidden_layers=2, rank=4)
    bigger.save_pretrained(path)
    names = {p.name for p in path.iterdir()}
    assert {"tokenizer.json", "train.py", "checkpoint-10"} <= names and "model-00002-of-00002.safetensors" not in names
    assert (path / "checkpoint-10" / "trainer_state.json").read_text() == "{}"
    loaded = UniteForCausalLM.from_pretrained(path)
    assert loaded.config.num_hidden_layers == 2


def test_a_failed_target_save_keeps_the_old_target(target, monkeypatch):
    model, path = target
    before = {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()}

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", fail)  # the inner save, not ours
    with pytest.raises(OSError):
        model.save_pretrained(path)
    assert {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()} == before


# -- cheap checks before the expensive ones -----------------------------------------------------------------

def _extract_with(method: str, model, seq_len: int = 16):
    """Each method's extractor on token windows of ``seq_len`` (what the checks judge: the windows' real
    length, since a short text gives shorter windows than asked for)."""
    from unite_hf import extract_masa_gene, extract_xpert_gene

    ids = torch.randint(0, VOCAB, (4, seq_len), generator=torch.Generator().manual_seed(0))
    if method == "unite":
        return extract_universal_knowledge(model, calibration=ids, show_progress=False)
    if method == "masa":
        return extract_masa_gene(model, None, ids, rank=4, seq_len=seq_len, tokens=4 * seq_len, show_progress=False)
    return extract_xpert_gene(model, None, {"a": ids, "b": ids}, seq_len=seq_len, num_sequences=4, show_progress=False)


@pytest.mark.parametrize("method", ["unite", "masa", "xpert"])
def test_a_model_on_the_meta_device_is_refused_before_calibration(method):
    with torch.device("meta"):  # a model built without weights
        model = transformers.MixtralForCausalLM(tiny_config("mixtral"))
    with pytest.raises(ValueError, match="meta device"):
        _extract_with(method, model)


@pytest.mark.parametrize("method", ["unite", "masa", "xpert"])
def test_seq_len_above_max_position_embeddings_is_refused(method):
    model = tiny_moe("mixtral")  # max_position_embeddings 128
    with pytest.raises(ValueError, match="max_position_embeddings=128"):
        _extract_with(method, model, seq_len=129)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "unite_hf.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_cli_refuses_an_out_that_is_a_file_before_loading_anything(tmp_path):
    """The source does not even exist: the --out check comes first, so it is what fails."""
    (tmp_path / "taken").write_text("x")
    result = _cli("extract", "--source", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "taken"),
                  cwd=tmp_path)
    assert result.returncode == 2 and "not a folder" in result.stderr and "Traceback" not in result.stderr
    assert "no-such-model" not in result.stderr  # failed before the source was looked at


def test_a_read_only_destination_is_refused_by_the_check_the_cli_runs_first(tmp_path):
    read_only = tmp_path / "ro"
    read_only.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(read_only)],
                             capture_output=True).returncode == 0
    if not mounted:
        if os.geteuid() == 0:
            pytest.skip("root ignores permissions and no read-only tmpfs can be mounted here")
        read_only.chmod(0o555)
    try:
        with pytest.raises(ArtifactWriteError, match="Read-only file system" if mounted else "Permission denied"):
            check_gene_destination(read_only / "gene")
    finally:
        if mounted:
            subprocess.run(["umount", str(read_only)], check=False)
        else:
            read_only.chmod(0o755)


def test_saving_into_the_current_folder_follows_it_to_the_new_folder(target, gene, monkeypatch):
    """The folder is replaced, so a process working inside it is moved into the new one."""
    _, path = target
    (path / "notes.txt").write_text("kept")
    monkeypatch.chdir(path)
    UniteForCausalLM.from_gene(gene, num_hidden_layers=2, rank=4).save_pretrained(".")
    assert Path.cwd() == path.resolve() and Path("notes.txt").read_text() == "kept"
    assert UniteForCausalLM.from_pretrained(".").config.num_hidden_layers == 2


def test_an_expert_analysis_folder_is_replaced_whole_and_keeps_other_files(tmp_path):
    from unite_hf.methods.xpert.analysis import ANALYSIS_FILE, HEATMAP_FILE, ExpertAnalysis, analyze_experts

    model = tiny_moe("mixtral")
    domains = {"a": CALIBRATION[:2], "b": CALIBRATION[2:]}
    analysis = analyze_experts(model, domains=domains, show_progress=False)
    (tmp_path / "analysis").mkdir()
    (tmp_path / "analysis" / "notes.txt").write_text("kept")
    analysis.save(tmp_path / "analysis")
    assert sorted(p.name for p in (tmp_path / "analysis").iterdir()) == sorted([ANALYSIS_FILE, HEATMAP_FILE, "notes.txt"])
    assert ExpertAnalysis.load(tmp_path / "analysis").to_dict() == analysis.to_dict()


def test_a_hub_target_is_verified_after_download(gene, local_hub, tmp_path):  # noqa: F811
    """push_to_hub records the checksums too; a byte flipped in the local cache is refused."""
    model = UniteForCausalLM.from_gene(gene, num_hidden_layers=1, rank=4)
    model.push_to_hub("me/target")
    assert TARGET_CHECKSUMS_NAME in local_hub.files("me/target")
    transformers.AutoModelForCausalLM.from_pretrained("me/target")  # downloads, verifies, loads
    from huggingface_hub import hf_hub_download

    blob = Path(hf_hub_download("me/target", "model.safetensors")).resolve()
    data = bytearray(blob.read_bytes())
    data[-3] ^= 0x01
    blob.write_bytes(bytes(data))
    with pytest.raises(CorruptedFileError, match="model.safetensors does not match"):
        transformers.AutoModelForCausalLM.from_pretrained("me/target")


def test_the_two_rename_swap_where_renameat2_is_missing(gene, saved_with_tokenizer, monkeypatch):
    """Other systems lack RENAME_EXCHANGE: the old folder is renamed aside, the new one in, the old removed."""
    import unite_hf.io as io

    monkeypatch.setattr(io, "_exchange", lambda a, b: False)  # what a system without renameat2 reports
    gene.save_pretrained(saved_with_tokenizer)
    assert sorted(p.name for p in saved_with_tokenizer.iterdir()) == [
        "README.md", "gene.safetensors", "gene_config.json", "source_weights.safetensors"]
    assert sorted(p.name for p in saved_with_tokenizer.parent.iterdir()) == ["gene"]


def _folder_digests(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}


def test_plain_model_folders_are_replaced_whole_or_not_at_all(tmp_path):
    """save_model_folder (finetune's model/, the bench's Llama bases, moefy's output): a plain transformers
    model and its tokenizer replace the folder in one swap; a failure half-way leaves the old files
    byte for byte; files that are not the model's stay."""
    from unite_hf.io import save_model_folder

    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    old, new = transformers.LlamaForCausalLM(config), transformers.LlamaForCausalLM(config)
    tokenizer = tiny_tokenizer()
    folder = tmp_path / "model"
    save_model_folder(folder, old, tokenizer)
    (folder / "notes.txt").write_text("mine")
    before = _folder_digests(folder)
    assert "model.safetensors" in before and any(name.startswith("tokenizer") for name in before)

    class Broken:  # the tokenizer fails after the model's weights were written to the staging folder
        def save_pretrained(self, path):
            raise OSError(28, "No space left on device")

    with pytest.raises(ArtifactWriteError, match="previous content is unchanged"):
        save_model_folder(folder, new, Broken())
    assert _folder_digests(folder) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging, no lock left

    save_model_folder(folder, new, tokenizer)
    after = _folder_digests(folder)
    assert after["notes.txt"] == before["notes.txt"] and after["model.safetensors"] != before["model.safetensors"]
    reloaded = transformers.LlamaForCausalLM.from_pretrained(folder)
    for name, tensor in new.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], tensor)


# -- what a save or a push may replace (issue 21) -----------------------------------------------------

USER_FILES = {"adapter_model.safetensors": b"the user's adapter", "embeddings.safetensors": b"the user's embeddings",
              "modeling_mine.py": b"# the user's model\n", "configuration_mine.py": b"# the user's config\n",
              "notes.txt": b"the user's notes\n"}


def _user_folder(path: Path, readme: str | None = "# the user's readme\n") -> Path:
    path.mkdir()
    for name, data in USER_FILES.items():
        (path / name).write_bytes(data)
    if readme is not None:
        (path / "README.md").write_text(readme)
    return path


def _tiny_llama(seed: int = 0):
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config)


def test_a_target_save_keeps_the_users_files_in_its_destination(gene, tmp_path):
    """Regression: every ``*.safetensors``, ``modeling_*.py``, ``configuration_*.py`` and README.md counted as the
    target's own, so a target saved into the user's folder left only notes.txt. A save replaces what the previous
    save recorded, what it writes itself (its card is README.md) and weights under transformers' checkpoint names."""
    folder = _user_folder(tmp_path / "mine")
    UniteForCausalLM.from_gene(gene, num_hidden_layers=1, rank=4).save_pretrained(folder)
    assert {name: (folder / name).read_bytes() for name in USER_FILES} == USER_FILES
    assert "unite" in (folder / "README.md").read_text()  # the card: a name the save writes
    assert UniteForCausalLM.from_pretrained(folder).config.num_hidden_layers == 1

    # what the previous save recorded is its own, replaced even where the next save does not write it
    record = json.loads((folder / TARGET_CHECKSUMS_NAME).read_text())
    (folder / "written_by_an_earlier_save.json").write_text("{}")
    record["files"]["written_by_an_earlier_save.json"] = file_record(folder / "written_by_an_earlier_save.json")
    (folder / TARGET_CHECKSUMS_NAME).write_text(json.dumps(record))
    UniteForCausalLM.from_gene(gene, num_hidden_layers=2, rank=4).save_pretrained(folder)
    assert not (folder / "written_by_an_earlier_save.json").exists()
    assert {name: (folder / name).read_bytes() for name in USER_FILES} == USER_FILES
    assert UniteForCausalLM.from_pretrained(folder).config.num_hidden_layers == 2


def test_a_plain_model_save_keeps_the_users_files_in_its_destination(tmp_path):
    """save_model_folder (finetune, moefy, the bench) had the same rule: the user's README stays too, since a
    plain transformers save writes none; a stale shard under transformers' names does not."""
    from unite_hf.io import save_model_folder

    folder = _user_folder(tmp_path / "mine")
    (folder / "model-00002-of-00002.safetensors").write_bytes(b"a stale shard")
    model = _tiny_llama()
    save_model_folder(folder, model, tiny_tokenizer())
    assert {name: (folder / name).read_bytes() for name in USER_FILES} == USER_FILES
    assert (folder / "README.md").read_text() == "# the user's readme\n"
    assert not (folder / "model-00002-of-00002.safetensors").exists()
    reloaded = transformers.LlamaForCausalLM.from_pretrained(folder)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], tensor)


def test_a_target_save_into_a_gene_or_an_adapter_is_refused_before_writing(gene, saved, tmp_path):
    """Regression: saving a target into a gene folder deleted gene.safetensors and source_weights.safetensors.
    A folder holding another artifact is refused, whole, before the model is written."""
    from unite_hf.io import save_model_folder

    adapter = _user_folder(tmp_path / "adapter", readme=None)
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    before = {path: folder_hashes(path) for path in (saved, adapter)}
    model = UniteForCausalLM.from_gene(gene, num_hidden_layers=1, rank=4)
    with pytest.raises(ArtifactWriteError, match="gene_config.json"):
        model.save_pretrained(saved)
    with pytest.raises(ArtifactWriteError, match="adapter_config.json"):
        model.save_pretrained(adapter)
    with pytest.raises(ArtifactWriteError, match="gene_config.json"):
        save_model_folder(saved, _tiny_llama())
    assert {path: folder_hashes(path) for path in (saved, adapter)} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "gene"]  # no staging folder left
    assert UniteGene.from_pretrained(saved).config.files == gene.config.files


def test_a_folder_with_only_gene_like_names_is_not_a_gene_to_replace(gene, tmp_path):
    """Regression: ``unite-hf extract --out`` (and a gene save) replaced a folder holding only a tokenizer and a
    README, since those names can be a gene's. Only a folder with a valid gene_config.json is a gene."""
    folder = tmp_path / "tokenizer"
    tiny_tokenizer().save_pretrained(folder)
    (folder / "README.md").write_text("# the user's tokenizer\n")
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in folder.iterdir()}
    before = folder_hashes(folder)
    with pytest.raises(ArtifactWriteError, match="not part of this artifact.*README.md"):
        check_gene_destination(folder)
    with pytest.raises(ArtifactWriteError, match="README.md"):
        gene.save_pretrained(folder)
    result = _cli("extract", "--source", str(tmp_path / "no-such-model"), "--out", str(folder), cwd=tmp_path)
    assert result.returncode == 2 and "README.md" in result.stderr and "Traceback" not in result.stderr
    assert folder_hashes(folder) == before
    (folder / "gene_config.json").write_text("not json")  # an unreadable config does not make it a gene
    with pytest.raises(ArtifactWriteError, match="README.md"):
        check_gene_destination(folder)


def _ids_and_logits(model) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.arange(12).reshape(2, 6) % VOCAB
    with torch.no_grad():
        return ids, model(input_ids=ids).logits


def test_repushing_a_gene_without_its_tokenizer_leaves_a_loadable_repo(gene, local_hub):  # noqa: F811
    """Regression: a push deleted nothing, so a gene pushed with a tokenizer, then without, left the old tokenizer
    on the repo: every load failed ("holds files that gene_config.json does not record") and pushing again did
    not help. A push deletes, in its one commit, every file of the repo the gene lacks (.gitattributes stays)."""
    from unite_hf import load_gene

    gene.tokenizer = tiny_tokenizer()
    try:
        gene.push_to_hub("me/gene")
    finally:
        gene.tokenizer = None
    assert "tokenizer.json" in local_hub.files("me/gene")
    attributes = local_hub.file("me/gene", ".gitattributes") + b"*.gguf filter=lfs diff=lfs merge=lfs -text\n"
    local_hub.commit("me/gene", {".gitattributes": attributes, "notes.txt": "added on the Hub"})
    commits = len(local_hub.history("me/gene"))
    gene.push_to_hub("me/gene")
    assert len(local_hub.history("me/gene")) == commits + 1  # the deletes and the uploads: one commit
    files = local_hub.files("me/gene")
    assert sorted(files) == [".gitattributes", "README.md", "gene.safetensors", "gene_config.json",
                             "source_weights.safetensors"]
    assert files[".gitattributes"] == attributes
    loaded = load_gene("me/gene")
    assert loaded.tokenizer is None and loaded.config.files == gene.config.files


def test_a_push_into_a_repo_of_another_artifact_is_refused_before_saving(gene, local_hub, tmp_path):  # noqa: F811
    """The Hub side of the folder rule: a gene is not pushed over a model repo, nor a target over a gene or an
    adapter repo (the push would delete it); the repo keeps its head, and nothing is saved first."""
    model = UniteForCausalLM.from_gene(gene, num_hidden_layers=1, rank=4)
    model.push_to_hub("me/a-target")
    gene.push_to_hub("me/a-gene")
    local_hub.create_repo("me/an-adapter")
    local_hub.commit("me/an-adapter", {"adapter_config.json": "{}", "adapter_model.safetensors": b"x"})
    heads = {repo: local_hub.head(repo) for repo in ("me/a-target", "me/a-gene", "me/an-adapter")}
    with pytest.raises(ArtifactWriteError, match="config.json"):
        gene.push_to_hub("me/a-target")
    with pytest.raises(ArtifactWriteError, match="gene_config.json"):
        model.push_to_hub("me/a-gene")
    with pytest.raises(ArtifactWriteError, match="adapter_config.json"):
        model.push_to_hub("me/an-adapter")
    with pytest.raises(ArtifactWriteError, match="gene_config.json"):
        model.save_pretrained(tmp_path / "local", push_to_hub=True, repo_id="me/a-gene")
    assert not (tmp_path / "local").exists()
    assert {repo: local_hub.head(repo) for repo in heads} == heads


def test_repushing_a_target_sharded_replaces_the_unsharded_weights(gene, local_hub, tmp_path):  # noqa: F811
    """Regression: a target pushed unsharded, then sharded, kept the old model.safetensors on the repo, and
    from_pretrained(repo) loaded the old weights without an error. A target push deletes what the previous push
    recorded and weights under transformers' checkpoint names; other files of the repo (a tokenizer, notes) stay."""
    first = UniteForCausalLM.from_gene(gene, num_hidden_layers=1, rank=4)
    first.push_to_hub("me/target")
    local_hub.commit("me/target", {"tokenizer.json": "{}", "notes.txt": "mine"})
    second = UniteForCausalLM.from_gene(gene, num_hidden_layers=1, rank=4)
    with torch.no_grad():
        for parameter in second.parameters():
            parameter.add_(0.25)
    ids, expected = _ids_and_logits(second)
    commits = len(local_hub.history("me/target"))
    second.push_to_hub("me/target", max_shard_size="20KB")
    assert len(local_hub.history("me/target")) == commits + 1
    files = local_hub.files("me/target")
    assert "model.safetensors.index.json" in files and "model.safetensors" not in files
    assert files["tokenizer.json"] == b"{}" and files["notes.txt"] == b"mine"
    loaded = UniteForCausalLM.from_pretrained("me/target")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=0, atol=0)

    # and back, through save_pretrained(push_to_hub=True): the shards and their index go
    first.save_pretrained(tmp_path / "local", push_to_hub=True, repo_id="me/target")
    files = local_hub.files("me/target")
    assert "model.safetensors" in files and not [name for name in files if name.startswith("model-")]
    assert "model.safetensors.index.json" not in files and files["notes.txt"] == b"mine"
    _, expected = _ids_and_logits(first)
    loaded = UniteForCausalLM.from_pretrained("me/target")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=0, atol=0)


def test_a_mixed_gene_names_the_fix_that_works(gene, saved, local_hub):  # noqa: F811
    """The load error's advice is true: a folder's leftover tokenizer goes with the next save (a file of the
    user's must be moved out first, since a save refuses it); a repo's goes with the next push (before, a push
    deleted nothing, so the advice "save the gene again" could not repair a Hub gene)."""
    (saved / "tokenizer.json").write_text("{}")
    with pytest.raises(GeneFormatError, match="Save the gene again: a save replaces them"):
        UniteGene.from_pretrained(saved)
    (saved / "thesis.tex").write_text("years of work")
    with pytest.raises(GeneFormatError, match=r"\['thesis.tex'\] are not a gene's files: move them out"):
        UniteGene.from_pretrained(saved)
    (saved / "thesis.tex").unlink()
    gene.save_pretrained(saved)
    assert UniteGene.from_pretrained(saved).tokenizer is None

    gene.push_to_hub("me/mixed")
    local_hub.commit("me/mixed", {"tokenizer.json": "{}"})  # what a push of an older unite_hf left behind
    with pytest.raises(GeneFormatError, match="Hub repo me/mixed.*Push the gene again"):
        UniteGene.from_pretrained("me/mixed")
    gene.push_to_hub("me/mixed")
    assert "tokenizer.json" not in local_hub.files("me/mixed")
    assert UniteGene.from_pretrained("me/mixed").tokenizer is None


# -- hostile records, configs and documents (issue 21, items 9-17) --------------------------------------------

def _outside_record(folder: Path, how: str, secret: Path) -> str:
    """A record name that reaches ``secret``, a file outside ``folder``."""
    if how == "absolute":
        return str(secret)
    if how == "dot-dot":
        return os.path.relpath(secret, folder)
    (folder / "notes.txt").symlink_to(secret)  # a link inside the folder to a file outside it
    return "notes.txt"


def _answers_about_outside_file(folder: Path, secret: Path, record_it, load) -> set[str]:
    """The errors of ``load()`` with the outside file recorded with its true record, with a wrong size, and
    once it is gone: the same refusal each time, saying nothing about the file (issue 21, item 9)."""
    messages = set()
    for record in (file_record(secret), {**file_record(secret), "size": 5}, None):
        if record is None:
            secret.unlink()
            record = {"size": 5, "sha256": "0" * 64}
        record_it(record)
        with pytest.raises((GeneFormatError, CorruptedFileError), match="names a file inside the") as caught:
            load()
        messages.add(str(caught.value))
    return messages


@pytest.mark.parametrize("how", ["absolute", "dot-dot", "symlink"])
def test_a_gene_record_of_a_file_outside_the_folder_is_refused_without_reading_it(saved, tmp_path, how):
    """Regression: a record of /etc/passwd with its SHA-256 loaded, and a wrong size made the error a file-size
    oracle (/etc/shadow is 631 bytes). A record names a plain file inside the folder; anything else is refused
    from the name (or the link) alone, with one answer whatever lies at the path."""
    secret = tmp_path / "secret.txt"
    secret.write_text("the secret\n")
    name, config = _outside_record(saved, how, secret), _config(saved)

    def record_it(record):
        config["files"][name] = record
        _write_config(saved, config)

    messages = _answers_about_outside_file(saved, secret, record_it, lambda: UniteGene.from_pretrained(saved))
    (message,) = messages
    assert not any(word in message for word in ("bytes", "missing", "SHA-256")), message


@pytest.mark.parametrize("how", ["absolute", "dot-dot", "symlink"])
def test_a_target_record_of_a_file_outside_the_folder_is_refused_without_reading_it(target, tmp_path, how):
    _, path = target
    secret = tmp_path / "secret.txt"
    secret.write_text("the secret\n")
    name, manifest = _outside_record(path, how, secret), path / TARGET_CHECKSUMS_NAME
    records = json.loads(manifest.read_text())

    def record_it(record):
        records["files"][name] = record
        manifest.write_text(json.dumps(records))

    messages = _answers_about_outside_file(path, secret, record_it, lambda: UniteForCausalLM.from_pretrained(path))
    (message,) = messages
    assert not any(word in message for word in ("bytes", "missing", "SHA-256")), message


def test_a_gene_that_records_its_files_but_the_card_is_not_read_as_a_legacy_gene(saved_with_tokenizer):
    """Regression: dropping README.md from the ``files`` record switched the legacy mode on, which checks only
    the weights, and an unrecorded tokenizer file then loaded unchecked. Legacy is only a gene recording its
    two weight files and nothing else (what unite_hf wrote before it recorded every file)."""
    path = saved_with_tokenizer
    config = _config(path)
    del config["files"]["README.md"], config["files"]["tokenizer_config.json"]
    _write_config(path, config)
    tokenizer_config = path / "tokenizer_config.json"
    tokenizer_config.write_text(tokenizer_config.read_text().replace("[UNK]", "[UNX]"))
    with pytest.raises(GeneFormatError, match=r"does not record: \['README.md', 'tokenizer_config.json'\]"):
        UniteGene.from_pretrained(path)


def test_a_legacy_gene_loads_and_says_that_its_tokenizer_is_unchecked(saved_with_tokenizer):
    path = saved_with_tokenizer
    config = _config(path)
    config["files"] = {name: config["files"][name] for name in ("gene.safetensors", "source_weights.safetensors")}
    _write_config(path, config)
    with pytest.warns(UserWarning, match=r"tokenizer files \[.*'tokenizer_config.json'.*\] are loaded unchecked"):
        loaded = UniteGene.from_pretrained(path)
    assert loaded.tokenizer is not None


@pytest.mark.parametrize("key, value", [("vocab_size", 200_000_000), ("num_hidden_layers", 10_000_000),
                                        ("hidden_size", -32)])
def test_from_gene_refuses_a_source_config_the_weights_disagree_with_before_allocating(saved, key, value):
    """Regression: vocab_size 2e8 made from_gene allocate 25.6 GB, num_hidden_layers 1e7 ran 342 s into
    std::bad_alloc, a negative hidden_size gave a raw torch error. The gene's load compares source_config
    with the gene and source_weights.safetensors: from_gene fails with that one line, at once."""
    config = _config(saved)
    config["source_config"][key] = value
    _write_config(saved, config)
    with pytest.raises(GeneFormatError, match=f"source_config.*{key}") as caught:  # raised by the load, before any
        UniteForCausalLM.from_gene(saved, num_hidden_layers=1, rank=4)        # target is built
    assert "\n" not in str(caught.value)


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_deeply_nested_configs_and_checksum_records_are_one_line_errors(saved, target, tmp_path):
    """Regression: RecursionError tracebacks. Nested past what json's parser takes (100k levels) or past what
    unite_hf reads (100 levels, below what transformers' config copies recurse into): one error each."""
    original = (saved / "gene_config.json").read_text()
    for depth, message in ((100_000, "too deeply to read"), (500, "more than 100 levels")):
        (saved / "gene_config.json").write_text(original.replace('"source_config": {', '"deep": ' + _nested(depth)
                                                                 + ', "source_config": {', 1))
        with pytest.raises(GeneFormatError, match=message) as caught:
            UniteGene.from_pretrained(saved)
        assert "\n" not in str(caught.value)
        try:  # the save's check reads the config too: a gene to replace, or not a gene, never a RecursionError
            check_gene_destination(saved)
        except ArtifactWriteError as err:
            assert "not part of this artifact" in str(err)
    _, path = target
    (path / TARGET_CHECKSUMS_NAME).write_text('{"format_version": 1, "files": ' + _nested(100_000) + "}")
    with pytest.raises(CorruptedFileError, match="not a valid checksum record"):
        UniteForCausalLM.from_pretrained(path)


def _one_line_exit_2(result: subprocess.CompletedProcess, *expected: str) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and all(text in errors[0] for text in expected), result.stderr[-3000:]
    return errors[0]


def test_hostile_recipes_are_one_line_exit_2_before_the_source_is_looked_at(tmp_path):
    """Regression: a deeply nested recipe gave a RecursionError traceback, a list-of-lists calibration a
    TypeError traceback once the source had loaded. The source here does not exist: the recipe's error comes first."""
    recipes = {
        "deep.yaml": ("calibration: " + _nested(100_000) + "\n", "too deeply"),
        "nested.yaml": ("calibration: " + "[" * 150 + "a" + "]" * 150 + "\n", "more than 100 levels"),
        "lists.yaml": ("calibration: [[1, 2, 3], [4, 5, 6]]\n", "calibration is a list holding a list"),
        "aliases.yaml": ("a: &a [x, x]\nb: &b [*a, *a]\ncalibration: [*b, *b]\n", "repeats a list"),
    }
    for name, (text, message) in recipes.items():
        (tmp_path / name).write_text(text)
        result = _cli("extract", "--config", str(tmp_path / name), "--source", str(tmp_path / "no-such-model"),
                      "--out", str(tmp_path / "gene"), cwd=tmp_path)
        line = _one_line_exit_2(result, message)
        assert "no-such-model" not in line, (name, line)


def test_unite_hf_info_on_a_hostile_gene_is_one_line_exit_2(saved, tmp_path):
    """Regression: a safetensors header length of 2**62 gave a MemoryError, a header that is a JSON list an
    AttributeError, both with exit code 1."""
    original = (saved / "gene.safetensors").read_bytes()
    for header, message in ((struct.pack("<Q", 2 ** 62) + b"{}", "header length"),
                            (struct.pack("<Q", 2) + b"[]", "not an object"),
                            (struct.pack("<Q", 21) + b'{"a": {"shape": "x"}}', "no shape")):
        (saved / "gene.safetensors").write_bytes(header)
        _one_line_exit_2(_cli("info", str(saved), cwd=tmp_path), "gene.safetensors", message)
    (saved / "gene.safetensors").write_bytes(original)
    for config, message in (("[]", "must hold a JSON object"), (_nested(100_000), "too deeply"),
                            ('{"files": [1, 2]}', "does not hold a readable gene")):
        (saved / "gene_config.json").write_text(config)
        _one_line_exit_2(_cli("info", str(saved), cwd=tmp_path), message)


# -- targets: a load reads what the save recorded, or fails (issue 21, items 5-8) -----------------------------

def _shifted(model, by: float = 0.25):
    """``model`` with every parameter moved by ``by``: other weights of the same shapes."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(by)
    return model


def _record(path: Path) -> dict:
    return json.loads((path / TARGET_CHECKSUMS_NAME).read_text())


def _flip_a_weight_bit(path: Path) -> None:
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-3] ^= 0x01  # one bit of one weight: safetensors itself loads it
    (path / "model.safetensors").write_bytes(bytes(data))


def _same_weights(model, other) -> bool:
    theirs = other.state_dict()
    return all(torch.equal(tensor, theirs[name]) for name, tensor in model.state_dict().items())


def test_an_unrecorded_model_safetensors_beside_the_shards_is_refused(gene, tmp_path):
    """Regression: transformers prefers model.safetensors to shards, so a stray one beside a sharded target
    loaded in its place, unverified. verify=False still loads it (with a warning): what was refused."""
    sharded = UniteForCausalLM.from_gene(gene, num_hidden_layers=1, rank=4)
    sharded.save_pretrained(tmp_path / "target", max_shard_size="20KB")
    assert "model.safetensors.index.json" in _record(tmp_path / "target")["files"]
    stray = _shifted(UniteForCausalLM.from_gene(gene, num_hidden_layers=1, rank=4))
    stray.save_pretrained(tmp_path / "stray")
    (tmp_path / "target" / "model.safetensors").write_bytes((tmp_path / "stray" / "model.safetensors").read_bytes())
    for cls in (UniteForCausalLM, transformers.AutoModelForCausalLM):
        with pytest.raises(CorruptedFileError, match=r"holds \['model.safetensors'\], which its unite_checksums.json "
                                                     r"does not record.*save the target again"):
            cls.from_pretrained(tmp_path / "target")
    with pytest.warns(UserWarning, match="verify=False"):
        assert _same_weights(UniteForCausalLM.from_pretrained(tmp_path / "target", verify=False), stray)
    sharded.save_pretrained(tmp_path / "target")  # the advice holds: the save replaces it
    assert _same_weights(UniteForCausalLM.from_pretrained(tmp_path / "target"), sharded)


@pytest.mark.parametrize("where", ["beside the weights", "in place of the weights"])
def test_an_unrecorded_pytorch_model_bin_is_refused(target, where):
    """Regression: a pytorch_model.bin put in place of the weights (their record removed with them) loaded."""
    model, path = target
    torch.save({name: tensor + 0.25 for name, tensor in model.state_dict().items()}, path / "pytorch_model.bin")
    if where == "in place of the weights":
        (path / "model.safetensors").unlink()
        record = _record(path)
        del record["files"]["model.safetensors"]
        (path / TARGET_CHECKSUMS_NAME).write_text(json.dumps(record))
    with pytest.raises(CorruptedFileError, match=r"holds \['pytorch_model.bin'\], which its unite_checksums.json"):
        transformers.AutoModelForCausalLM.from_pretrained(path)


RECORD_CASES = {  # what happened to unite_checksums.json -> what the refusal says
    "deleted": (lambda record: None, 'model_type "unite"\\) without its unite_checksums.json.*verify=False'),
    "emptied": (lambda record: {**record, "files": {}},
                r"\['config.json', 'configuration_unite.py', 'generation_config.json', 'model.safetensors', "
                r"'model_structure.py', 'modeling_unite.py'\], which its unite_checksums.json does not record"),
    "thinned": (lambda record: {**record, "files": {k: v for k, v in record["files"].items() if k != "model.safetensors"}},
                r"holds \['model.safetensors'\], which"),
    "format_version 999": (lambda record: {**record, "format_version": 999}, "format_version 999.*upgrade unite_hf"),
}


@pytest.mark.parametrize("case", sorted(RECORD_CASES))
def test_corrupted_target_weights_are_refused_whatever_became_of_the_record(target, case):
    """Regression: a flipped weight bit loaded silently once the record was deleted, emptied, thinned or had an
    unknown format_version."""
    from unite_hf.io import TargetFormatError

    model, path = target
    change, message = RECORD_CASES[case]
    _flip_a_weight_bit(path)
    record = change(_record(path))
    if record is None:
        (path / TARGET_CHECKSUMS_NAME).unlink()
    else:
        (path / TARGET_CHECKSUMS_NAME).write_text(json.dumps(record))
    error = TargetFormatError if case == "format_version 999" else CorruptedFileError
    for cls in (UniteForCausalLM, transformers.AutoModelForCausalLM):
        with pytest.raises(error, match=message):
            cls.from_pretrained(path)


def test_verify_false_loads_a_target_that_lost_its_record_with_a_warning(target):
    model, path = target
    (path / TARGET_CHECKSUMS_NAME).unlink()
    with pytest.warns(UserWarning, match="loaded without checking its files"):
        loaded = transformers.AutoModelForCausalLM.from_pretrained(path, verify=False)
    assert _same_weights(loaded, model)
    loaded.save_pretrained(path)  # a save records it again
    assert _same_weights(UniteForCausalLM.from_pretrained(path), model)


def test_a_hub_target_without_its_record_or_with_stray_weights_is_refused(gene, local_hub):  # noqa: F811
    model = UniteForCausalLM.from_gene(gene, num_hidden_layers=1, rank=4)
    model.push_to_hub("me/unrecorded", max_shard_size="20KB")
    stray = _shifted(UniteForCausalLM.from_gene(gene, num_hidden_layers=1, rank=4))
    stray.push_to_hub("me/stray")
    local_hub.commit("me/unrecorded", {"model.safetensors": local_hub.file("me/stray", "model.safetensors")})
    with pytest.raises(CorruptedFileError, match=r"the Hub repo me/unrecorded mixes two pushes: push the target again"):
        UniteForCausalLM.from_pretrained("me/unrecorded")
    local_hub.commit("me/unrecorded", deletions=[TARGET_CHECKSUMS_NAME])
    with pytest.raises(CorruptedFileError, match="the Hub repo me/unrecorded holds a UNITE target"):
        UniteForCausalLM.from_pretrained("me/unrecorded")
    with pytest.warns(UserWarning, match="verify=False"):
        assert _same_weights(UniteForCausalLM.from_pretrained("me/unrecorded", verify=False), stray)


def test_saves_of_a_target_into_folders_of_one_name_give_the_same_bytes(gene, tmp_path):
    """Regression: the card was titled with the hidden staging folder (`# .target.tmp-21743-773be006`, also in
    its from_pretrained snippet), so README.md and unite_checksums.json changed with every save. Saved twice,
    over itself, and through save_model_folder (finetune's path: a staging folder inside another one)."""
    from unite_hf.io import save_model_folder

    model = UniteForCausalLM.from_gene(gene, num_hidden_layers=1, rank=4)
    model.save_pretrained(tmp_path / "a" / "target")
    model.save_pretrained(tmp_path / "b" / "target")
    model.save_pretrained(tmp_path / "b" / "target")
    save_model_folder(tmp_path / "c" / "target", model)
    card = (tmp_path / "a" / "target" / "README.md").read_text()
    assert "\n# target\n" in card and 'from_pretrained("target")' in card and ".tmp-" not in card
    assert folder_hashes(tmp_path / "a" / "target") == folder_hashes(tmp_path / "b" / "target") == \
        folder_hashes(tmp_path / "c" / "target")


SOURCE_CONFIG_CASES = {  # a change of source_config -> the field the refusal names
    "NaN rms_norm_eps": (lambda s: {**s, "rms_norm_eps": float("nan")}, r"source_config\['rms_norm_eps'\] is nan"),
    "Inf rms_norm_eps": (lambda s: {**s, "rms_norm_eps": float("inf")}, r"source_config\['rms_norm_eps'\] is inf"),
    "zero rms_norm_eps": (lambda s: {**s, "rms_norm_eps": 0.0}, r"source_config\['rms_norm_eps'\] is 0.0, outside \(0, 1\)"),
    "rms_norm_eps of 10": (lambda s: {**s, "rms_norm_eps": 10.0}, r"source_config\['rms_norm_eps'\] is 10.0"),
    "negative rope_theta": (lambda s: {**s, "rope_parameters": {**s["rope_parameters"], "rope_theta": -1.0}},
                            r"source_config\['rope_parameters'\]\['rope_theta'\] is -1.0"),
    "NaN initializer_range": (lambda s: {**s, "initializer_range": float("nan")}, "'initializer_range'"),
    "dropout of 2": (lambda s: {**s, "attention_dropout": 2.0}, r"'attention_dropout'\] is 2.0, outside \[0, 1\]"),
    "Inf in a list": (lambda s: {**s, "rope_parameters": {**s["rope_parameters"], "short_factor": [1.0, float("inf")]}},
                      r"\['short_factor'\]\[1\] is inf"),
    "NaN of an unknown key": (lambda s: {**s, "new_scale": float("nan")}, r"\['new_scale'\] is nan"),
}


@pytest.mark.parametrize("case", sorted(SOURCE_CONFIG_CASES))
def test_a_non_finite_or_out_of_range_number_in_source_config_is_refused(saved, case):
    """Regression: a NaN rms_norm_eps in the gene's source_config grew a target that output NaN."""
    change, message = SOURCE_CONFIG_CASES[case]
    config = _config(saved)
    config["source_config"] = change(config["source_config"])
    _write_config(saved, config)  # json writes NaN and Infinity, and reads them back
    with pytest.raises(GeneFormatError, match=message):
        UniteGene.from_pretrained(saved)
    with pytest.raises(GeneFormatError, match=message):
        UniteForCausalLM.from_gene(saved, num_hidden_layers=1, rank=4)
