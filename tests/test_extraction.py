"""End to end: fusion against hand-fused averages, the gene's inspection API, save/load, bad input."""

import json
import warnings

import pytest
import torch
from tiny_models import FAMILIES, VOCAB, tiny_dense, tiny_moe, tiny_module_list_moe

from unite_hf import (
    CorruptedFileError, GeneFormatError, UniteGene, UnsupportedSourceError, compute_expert_importance,
    extract_universal_knowledge, fuse_block, get_source,
)

CALIBRATION = torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(1))


def hand_fused(model, layer, proj, weights):
    """sum_i w_i W_i, written out with a Python loop over the experts' raw parameters."""
    block = get_source(model).block(layer)
    total = 0
    for i, w in enumerate(weights):
        total = total + float(w) * block.expert(i).projection(proj).detach().double()
    return total


@pytest.fixture(scope="module")
def genes():
    """One full-rank Fisher/Tucker gene per family (and the ModuleList layout)."""
    out = {}
    for family in [*FAMILIES, "module_list"]:
        model = tiny_moe(family) if family != "module_list" else tiny_module_list_moe()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # default rank 512 is clipped to these tiny dimensions
            out[family] = (model, extract_universal_knowledge(model, calibration=CALIBRATION, show_progress=False))
    return out


@pytest.mark.parametrize("family", [*FAMILIES, "module_list"])
def test_full_rank_gene_rebuilds_the_fisher_fused_experts(genes, family):
    model, gene = genes[family]
    source = get_source(model)
    assert gene.moe_layers == source.moe_layers
    assert gene.importance.shape == (len(source.moe_layers), source.num_experts)
    assert gene.importance.dtype == torch.float32
    for row, layer in enumerate(gene.moe_layers):
        fisher = gene.importance[row].double()
        weights = fisher / fisher.sum()
        for proj in ("gate", "up", "down"):
            expected = hand_fused(model, layer, proj, weights)
            got = gene.fused_weight(layer, proj)
            assert got.shape == expected.shape
            torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(KeyError, match="holds no experts"):
        gene.fused_weight(99, "up")


def test_importance_rows_follow_moe_layers_for_deepseek(genes):
    model, gene = genes["deepseek_v3"]
    assert gene.moe_layers == [1, 2]
    reference = compute_expert_importance(model, CALIBRATION, show_progress=False)
    torch.testing.assert_close(gene.importance, reference.fisher.float())
    assert gene.config.dense_layers == [0]
    assert gene.config.shared_experts == ["shared_experts"]


@pytest.mark.parametrize("fusion", ["uniform", "frequency", "fisher_diag"])
def test_other_fusions_match_hand_computation(fusion):
    model = tiny_moe("qwen2_moe")
    importance = compute_expert_importance(model, CALIBRATION, diagonal=True, show_progress=False)
    block = get_source(model).blocks[1]
    fused = fuse_block(block, importance, fusion)
    for proj in ("gate", "up", "down"):
        if fusion == "uniform":
            expected = hand_fused(model, 1, proj, [0.25] * 4)
        elif fusion == "frequency":
            expected = hand_fused(model, 1, proj, importance.frequency[1])
        else:
            diag = importance.fisher_diag[(1, proj)].double()
            stacked = block.stacked(proj).detach().double()
            expected = (diag * stacked).sum(0) / diag.sum(0)
        torch.testing.assert_close(fused[proj][0].double(), expected, rtol=1e-5, atol=1e-6)


def test_zero_importance_falls_back_to_uniform_with_a_warning():
    model = tiny_moe("mixtral")
    importance = compute_expert_importance(model, CALIBRATION, show_progress=False)
    importance.fisher[0] = 0
    with pytest.warns(UserWarning, match="zero importance"):
        fused = fuse_block(get_source(model).blocks[0], importance, "fisher")
    torch.testing.assert_close(fused["up"][0].double(), hand_fused(model, 0, "up", [0.25] * 4), rtol=1e-5, atol=1e-6)


def test_truncated_ranks_and_ablations():
    model = tiny_moe("mixtral")
    for method, rank in (("tucker", (2, 8, 6)), ("cp", 6), ("svd", 6)):
        gene = extract_universal_knowledge(model, calibration=CALIBRATION, decomposition=method, rank=rank,
                                           show_progress=False)
        assert gene.config.decomposition == method
        assert 0 < gene.config.relative_error["up"] < 1
        assert gene.fused_weight(0, "up").shape == (24, 32)
        energy = gene.spectral_energy["up"]["out"]
        assert torch.all(energy[1:] >= energy[:-1] - 1e-6) and abs(float(energy[-1]) - 1) < 1e-5
    assert extract_universal_knowledge(model, calibration=CALIBRATION, rank=(2, 8, 6), show_progress=False).ranks["up"] == (2, 8, 6)


def test_save_load_round_trip_and_provenance(genes, tmp_path):
    model, gene = genes["qwen2_moe"]
    gene.save_pretrained(tmp_path / "gene")
    assert sorted(p.name for p in (tmp_path / "gene").iterdir()) == [
        "README.md", "gene.safetensors", "gene_config.json", "source_weights.safetensors"]
    loaded = UniteGene.from_pretrained(tmp_path / "gene")
    for layer in gene.moe_layers:
        for proj in ("gate", "up", "down"):
            torch.testing.assert_close(loaded.fused_weight(layer, proj), gene.fused_weight(layer, proj), rtol=0, atol=0)
    torch.testing.assert_close(loaded.importance, gene.importance, rtol=0, atol=0)
    torch.testing.assert_close(loaded.frequency, gene.frequency, rtol=0, atol=0)
    config = json.loads((tmp_path / "gene" / "gene_config.json").read_text())
    assert config["source_model_type"] == "qwen2_moe"
    assert config["source_config"]["num_experts"] == 4
    assert (config["num_sequences"], config["seq_len"], config["seed"]) == (4, 12, 0)
    assert config["fusion"] == "fisher" and config["decomposition"] == "tucker"
    assert config["ranks"]["up"] == [3, 24, 32]
    assert config["library_version"]
    assert set(config["files"]) == {"gene.safetensors", "source_weights.safetensors", "README.md"}  # every file
    for name, tensor in model.state_dict().items():
        if name in loaded.source_state_dict:
            torch.testing.assert_close(loaded.source_state_dict[name], tensor, rtol=0, atol=0)
    assert "model.layers.0.mlp.shared_expert.up_proj.weight" in loaded.source_state_dict
    card = (tmp_path / "gene" / "README.md").read_text()
    assert "qwen2_moe" in card and "| up |" in card and "tags:" in card


def _corrupt(path, how):
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[-5] ^= 0xFF
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how,error", [("truncate", "truncated"), ("flip", "SHA-256")])
def test_corrupted_files_are_refused(genes, tmp_path, how, error):
    genes["mixtral"][1].save_pretrained(tmp_path)
    _corrupt(tmp_path / "gene.safetensors", how)
    with pytest.raises(CorruptedFileError, match=error):
        UniteGene.from_pretrained(tmp_path)


def test_unreadable_safetensors_is_a_clear_error(genes, tmp_path):
    genes["mixtral"][1].save_pretrained(tmp_path)
    path = tmp_path / "source_weights.safetensors"
    path.write_bytes(b"\xff" * path.stat().st_size)  # same size, garbage header
    with pytest.raises(CorruptedFileError, match="not a readable safetensors file"):
        UniteGene.from_pretrained(tmp_path, verify_checksums=False)


def test_unknown_format_version_and_missing_config(genes, tmp_path):
    genes["mixtral"][1].save_pretrained(tmp_path)
    config = json.loads((tmp_path / "gene_config.json").read_text())
    (tmp_path / "gene_config.json").write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(GeneFormatError, match="format version 99"):
        UniteGene.from_pretrained(tmp_path)
    (tmp_path / "gene_config.json").unlink()
    with pytest.raises(GeneFormatError, match="gene_config.json is missing"):
        UniteGene.from_pretrained(tmp_path)


def test_interrupted_save_never_leaves_a_gene_that_loads(genes, tmp_path, monkeypatch):
    import unite_hf.gene as gene_module

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("power cut")

    gene_a, gene_b = genes["mixtral"][1], genes["olmoe"][1]
    # a fresh folder: tensors written, crash before the config
    monkeypatch.setattr(gene_module, "atomic_write_json", crash)
    with pytest.raises(KeyboardInterrupt):
        gene_a.save_pretrained(tmp_path / "fresh")
    with pytest.raises(GeneFormatError):
        UniteGene.from_pretrained(tmp_path / "fresh")
    # overwriting an existing gene: the folder is swapped in whole, so the old gene stays, complete
    monkeypatch.undo()
    gene_a.save_pretrained(tmp_path / "existing")
    monkeypatch.setattr(gene_module, "atomic_write_json", crash)
    with pytest.raises(KeyboardInterrupt):
        gene_b.save_pretrained(tmp_path / "existing")
    assert UniteGene.from_pretrained(tmp_path / "existing").config.source_model_type == "mixtral"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp") or ".tmp-" in p.name]


def test_bad_inputs_fail_before_anything_is_written(tmp_path):
    model = tiny_moe("mixtral")
    out = tmp_path / "gene"

    def attempt(**kwargs):
        gene = extract_universal_knowledge(**{"model": model, "calibration": CALIBRATION, "show_progress": False, **kwargs})
        gene.save_pretrained(out)

    with pytest.raises(UnsupportedSourceError, match="dense model"):
        attempt(model=tiny_dense())
    with pytest.raises(ValueError, match="rank"):
        attempt(rank=0)
    with pytest.raises(ValueError, match="exceeds|larger"):
        attempt(rank=1000)
    with pytest.raises(ValueError, match="exceeds|larger"):
        attempt(rank=(3, 8, 33))
    with pytest.raises(ValueError, match="empty"):
        attempt(calibration=[])
    with pytest.raises(ValueError):
        attempt(calibration=CALIBRATION[:0])
    with pytest.raises(ValueError, match="unknown fusion"):
        attempt(fusion="median")
    with pytest.raises(ValueError, match="unknown decomposition"):
        attempt(decomposition="tt")
    with pytest.raises(ValueError, match="vocabulary"):
        attempt(calibration=torch.full((2, 8), VOCAB + 5))
    for bad in (float("nan"), float("inf")):
        broken = tiny_moe("mixtral")
        with torch.no_grad():
            broken.model.layers[1].mlp.experts.down_proj[2, 0, 0] = bad
        with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.experts\.down_proj.*(NaN|Inf)"):
            attempt(model=broken)
    assert not out.exists()


def test_precomputed_importance_skips_calibration():
    model = tiny_moe("granitemoe")
    importance = compute_expert_importance(model, CALIBRATION, show_progress=False)
    gene = extract_universal_knowledge(model, calibration=None, importance=importance, rank=(3, 8, 8), show_progress=False)
    torch.testing.assert_close(gene.importance, importance.fisher.float())
    assert gene.config.calibration == "precomputed importance"


def test_non_gated_source_gives_an_up_down_gene():
    from tiny_models import tiny_nemotron_h

    model = tiny_nemotron_h()
    gene = extract_universal_knowledge(model, calibration=CALIBRATION, show_progress=False)
    assert gene.config.projections == ["up", "down"] and gene.moe_layers == [1, 3]
    weights = gene.importance[1].double() / gene.importance[1].double().sum()
    torch.testing.assert_close(gene.fused_weight(3, "up").double(), hand_fused(model, 3, "up", weights),
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(KeyError, match="unknown projection"):
        gene.fused_weight(3, "gate")


def test_non_finite_importance_is_named_before_fusion():
    model = tiny_moe("mixtral")
    importance = compute_expert_importance(model, CALIBRATION, show_progress=False)
    importance.fisher[1, 2] = float("inf")
    with pytest.raises(ValueError, match="Fisher of layer 1 expert 2 is inf"):
        extract_universal_knowledge(model, importance=importance, show_progress=False)
