"""XPERT consolidation: stacked common experts, Tucker, the gene, targets at two scales, controls, CLI."""

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file
from conftest import needs_data, run_cli, save_with_tokenizer
from tiny_models import COMMON, VOCAB, tiny_moe

from unite_hf import GeneFormatError, UniteForSequenceClassification, UniteGene, extract_universal_knowledge, load_gene
from unite_hf.methods.xpert.analysis import analyze_experts
from unite_hf.methods.xpert import XpertGene, extract_xpert_gene
from unite_hf.layer_map import map_layers
from unite_hf.llama_targets import masa_init
from unite_hf.sources import get_source

DOMAINS = {name: torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(seed))
           for seed, name in enumerate(("news", "books", "science"))}


def _analysis(model, k=2):
    return analyze_experts(model, DOMAINS, k_common=k, show_progress=False)


def _full_rank_gene(model, analysis, strategy="common", k=2):
    with pytest.warns(UserWarning, match="clipped"):  # the default 512 clips to every mode's size: exact
        return extract_xpert_gene(model, analysis=analysis, k=k, strategy=strategy, n_iter_max=5, show_progress=False)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_full_rank_consolidation_rebuilds_every_selected_expert_and_their_weighted_mean(family):
    model = tiny_moe(family)
    analysis = _analysis(model)
    gene = _full_rank_gene(model, analysis)
    source = get_source(model)
    assert gene.selected_experts == [experts[:2] for experts in analysis.common_experts]
    mean_frequency = analysis.frequency.mean(0)
    for row, block in enumerate(source.blocks):
        experts = gene.selected_experts[row]
        weights = mean_frequency[row, experts] / mean_frequency[row, experts].sum()
        for proj in ("gate", "up", "down"):
            for slot, expert in enumerate(experts):
                torch.testing.assert_close(gene.expert_weight(block.layer_idx, slot, proj),
                                           block.expert(expert).projection(proj), atol=1e-4, rtol=0)
            mean = sum(float(w) * block.expert(e).projection(proj) for w, e in zip(weights, experts))
            torch.testing.assert_close(gene.fused_weight(block.layer_idx, proj), mean.detach(), atol=1e-4, rtol=0)


def test_gene_matrix_is_the_common_experts_side_by_side():
    model = tiny_moe("mixtral")
    gene = _full_rank_gene(model, _analysis(model))
    block = get_source(model).blocks[1]
    experts, weights = gene.selected_experts[1], gene.mix_weights[1]
    gate = torch.cat([block.expert(e).gate for e in experts])
    down = torch.cat([block.expert(e).down * float(w) for e, w in zip(experts, weights)], dim=1)
    torch.testing.assert_close(gene.gene_matrix(1, "gate"), gate.detach(), atol=1e-4, rtol=0)
    torch.testing.assert_close(gene.gene_matrix(1, "down"), down.detach(), atol=1e-4, rtol=0)


def test_controls_use_the_same_count_and_ranks():
    model = tiny_moe("olmoe")
    analysis = _analysis(model)
    genes = {s: extract_xpert_gene(model, analysis=analysis, k=2, strategy=s, rank=(6, 8, 8), show_progress=False)
             for s in ("common", "random", "least")}
    # by hand: "least" = the 2 lowest mean frequencies over domains (ties: lower index), least first;
    # "random" = per layer, the first 2 of a randperm from one generator seeded 0, ascending
    mean = analysis.frequency.mean(0).tolist()
    assert genes["least"].selected_experts == [sorted(range(len(row)), key=lambda e: (row[e], e))[:2] for row in mean]
    generator = torch.Generator().manual_seed(0)
    assert genes["random"].selected_experts == [sorted(torch.randperm(analysis.num_experts, generator=generator)[:2].tolist())
                                                for _ in analysis.moe_layers]
    assert genes["common"].selected_experts == [experts[:2] for experts in analysis.common_experts]
    params = {s: sum(t.numel() for t in g.gene_state_dict().values()) for s, g in genes.items()}
    assert len(set(params.values())) == 1
    assert [g.config.method_config["strategy"] for g in genes.values()] == ["common", "random", "least"]
    assert {g.config.fusion for g in genes.values()} == {""}  # no UNITE fusion made them


def test_gene_round_trip_targets_at_two_scales_and_card(tmp_path):
    model = tiny_moe("mixtral")
    gene = extract_xpert_gene(model, analysis=_analysis(model), k=2, rank=(6, 16, 16), show_progress=False,
                              source_id="tiny-mixtral")
    gene.save_pretrained(tmp_path / "gene")
    loaded = load_gene(tmp_path / "gene")
    assert isinstance(loaded, XpertGene) and isinstance(UniteGene.from_pretrained(tmp_path / "gene"), XpertGene)
    assert loaded.analysis().common_experts == gene.analysis().common_experts
    torch.testing.assert_close(loaded.commonality, gene.analysis().commonality.float())
    for proj in ("gate", "up", "down"):
        torch.testing.assert_close(loaded.gene_matrix(2, proj), gene.gene_matrix(2, proj), rtol=0, atol=0)
    card = (tmp_path / "gene" / "README.md").read_text()
    assert "XPERT gene of `tiny-mixtral`" in card and "xpert" in card

    # source width: a UNITE-style target; its factorized FFN at core_init="tucker" is the fused mean expert
    target = UniteForSequenceClassification.from_gene(tmp_path / "gene", num_hidden_layers=3, core_init="tucker",
                                                      num_labels=2)
    ffn = target.model.ffn(1)
    torch.testing.assert_close(ffn.up.dense_weight(ffn.up.bases), gene.fused_weight(1, "up"), atol=1e-5, rtol=0)
    assert target(torch.randint(0, VOCAB, (2, 8))).logits.shape == (2, 2)
    # smaller width: a plain Llama; coupled scaling keeps every target neuron one real neuron of the mixture
    config = transformers.LlamaConfig(**{**COMMON, "hidden_size": 16, "intermediate_size": 40, "num_hidden_layers": 2})
    llama = masa_init(config, loaded)
    mapped = map_layers(3, 2)
    for j, layer in enumerate(llama.model.layers):
        gate, up, down = (loaded.gene_matrix(mapped[j], p).double() for p in ("gate", "up", "down"))  # 48 neurons
        neurons = torch.sort(torch.topk(gate.norm(dim=1) + up.norm(dim=1) + down.norm(dim=0), 40).indices).values
        channels = torch.sort(torch.topk(gate.norm(dim=0) + up.norm(dim=0) + down.norm(dim=1), 16).indices).values
        torch.testing.assert_close(layer.mlp.gate_proj.weight, gate[neurons][:, channels].float())
        torch.testing.assert_close(layer.mlp.up_proj.weight, up[neurons][:, channels].float())
        torch.testing.assert_close(layer.mlp.down_proj.weight, down[channels][:, neurons].float())
    independent = masa_init(config, loaded, scaling="adaptive")
    assert not torch.equal(independent.model.layers[0].mlp.up_proj.weight, llama.model.layers[0].mlp.up_proj.weight)


def test_a_new_xpert_gene_stores_its_commonality_as_such_and_no_fake_fisher(tmp_path):
    model = tiny_moe("mixtral")
    analysis = _analysis(model)
    gene = extract_xpert_gene(model, analysis=analysis, k=2, rank=(6, 16, 16), show_progress=False)
    gene.save_pretrained(tmp_path / "gene")
    stored = load_file(tmp_path / "gene" / "gene.safetensors")
    config = json.loads((tmp_path / "gene" / "gene_config.json").read_text())
    assert "importance.fisher" not in stored and config["fusion"] == "" and config["format_version"] == 3
    # the commonality is the analysis's score (E x the smallest routing share over domains, min_frequency)
    # and the frequency the routing frequency averaged over domains, both as computed from the analysis
    torch.testing.assert_close(stored["importance.commonality"],
                               (analysis.num_experts * analysis.frequency.min(dim=0).values).double())
    torch.testing.assert_close(stored["importance.frequency"], analysis.frequency.mean(dim=0).double())
    loaded = load_gene(tmp_path / "gene")
    with pytest.warns(FutureWarning, match="use gene.commonality"):  # the old accessor still answers
        torch.testing.assert_close(loaded.importance, stored["importance.commonality"].float())
    for statistics in (gene, loaded):
        with pytest.raises(ValueError, match="stores no Fisher"):
            statistics.expert_importance()
    with pytest.raises(ValueError, match="stores no Fisher"):
        extract_universal_knowledge(model, importance=str(tmp_path / "gene"), show_progress=False)


def _write_gene_tensors(folder, tensors, **config_updates):
    """Replace a gene folder's gene.safetensors and config keys by hand, with checksums to match."""
    import hashlib

    from safetensors.torch import save_file

    save_file(tensors, folder / "gene.safetensors", metadata={"format": "pt", "unite_gene_format": "2"})
    config = json.loads((folder / "gene_config.json").read_text())
    data = (folder / "gene.safetensors").read_bytes()
    config["files"]["gene.safetensors"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    config.update(config_updates)
    (folder / "gene_config.json").write_text(json.dumps(config))


def _write_format_2(folder, gene_folder):
    """The gene as unite_hf wrote XPERT genes before format 3, written key by key: the commonality in
    ``importance.fisher``, ``fusion`` "xpert-<strategy>", ``format_version`` 2."""
    import shutil

    shutil.copytree(gene_folder, folder)
    tensors = load_file(folder / "gene.safetensors")
    tensors["importance.fisher"] = tensors.pop("importance.commonality")
    strategy = json.loads((folder / "gene_config.json").read_text())["method_config"]["strategy"]
    _write_gene_tensors(folder, tensors, format_version=2, fusion=f"xpert-{strategy}")


def test_genes_of_the_old_format_still_load_and_save_in_the_new(tmp_path, capsys):
    from unite_hf.cli import main

    model = tiny_moe("mixtral")
    analysis = _analysis(model)
    gene = extract_xpert_gene(model, analysis=analysis, k=2, rank=(6, 16, 16), show_progress=False)
    gene.save_pretrained(tmp_path / "new")
    _write_format_2(tmp_path / "old", tmp_path / "new")
    old = load_gene(tmp_path / "old")
    assert isinstance(old, XpertGene) and old.config.fusion == ""
    torch.testing.assert_close(old.commonality, (analysis.num_experts * analysis.frequency.min(dim=0).values).float())
    with pytest.raises(ValueError, match="stores no Fisher"):  # the commonality is no longer taken for one
        old.expert_importance()
    for proj in ("gate", "up", "down"):
        torch.testing.assert_close(old.gene_matrix(1, proj), gene.gene_matrix(1, proj), rtol=0, atol=0)
    assert main(["info", str(tmp_path / "old")]) == 0  # info names the stored statistics for what they are
    report = json.loads(capsys.readouterr().out)
    assert report["expert_statistics"] == ["commonality", "frequency"] and report["fusion"] is None
    assert report["selection"] == {"strategy": "common", "k": 2, "score": "min_frequency"}
    old.save_pretrained(tmp_path / "resaved")  # a save writes the new format
    stored = load_file(tmp_path / "resaved" / "gene.safetensors")
    assert "importance.fisher" not in stored
    torch.testing.assert_close(stored["importance.commonality"], load_file(tmp_path / "old" / "gene.safetensors")["importance.fisher"])
    assert json.loads((tmp_path / "resaved" / "gene_config.json").read_text())["format_version"] == 3
    # a gene without its commonality is incomplete, in either format, and says which tensor is missing
    for folder, key in ((tmp_path / "old", "importance.fisher"), (tmp_path / "new", "importance.commonality")):
        tensors = load_file(folder / "gene.safetensors")
        del tensors[key]
        _write_gene_tensors(folder, tensors)
        with pytest.raises(GeneFormatError, match=f"tensor '{key}' is missing"):
            load_gene(folder)


def test_bad_input_gets_clear_errors():
    model = tiny_moe("mixtral")
    with pytest.raises(ValueError, match="k=5 is out of range"):
        extract_xpert_gene(model, analysis=_analysis(model), k=5, show_progress=False)
    with pytest.raises(ValueError, match="k_common"):
        analyze_experts(model, DOMAINS, k_common=9, show_progress=False)
    with pytest.warns(UserWarning, match="at least 2"):
        extract_xpert_gene(model, domains={"one": DOMAINS["news"]}, k=2, rank=(6, 8, 8), show_progress=False)
    with pytest.raises(ValueError, match="empty"):
        extract_xpert_gene(model, domains={"a": [], "b": ["some text"]}, k=2, show_progress=False)
    with pytest.raises(ValueError, match="exceeds"):
        extract_xpert_gene(model, analysis=_analysis(model), k=2, rank=(7, 8, 8), show_progress=False)
    other = tiny_moe("mixtral", num_hidden_layers=2)
    with pytest.raises(ValueError, match="covers layers"):
        extract_xpert_gene(other, analysis=_analysis(model), k=2, show_progress=False)


@needs_data
def test_cli_analyze_experts_then_extract_xpert(tmp_path):
    config = transformers.MixtralConfig(**{**COMMON, "vocab_size": 50257}, intermediate_size=24, num_local_experts=4,
                                        num_experts_per_tok=2)
    save_with_tokenizer(transformers.MixtralForCausalLM(config), tmp_path / "src")
    for name, text in (("a", "The cat sat on the mat. " * 40), ("b", "Stocks fell sharply on Monday. " * 40)):
        (tmp_path / f"{name}.txt").write_text(text)
    domains = ["--domain", f"a={tmp_path / 'a.txt'}", "--domain", f"b={tmp_path / 'b.txt'}"]
    result = run_cli("analyze-experts", "--source", str(tmp_path / "src"), *domains, "--num-sequences", "2", "--seq-len",
                     "16", "--out", str(tmp_path / "analysis"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "analysis" / "expert_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = run_cli("extract", "--method", "xpert", "--source", str(tmp_path / "src"), "--analysis",
                     str(tmp_path / "analysis"), "--rank", "6,8,8", "--out", str(tmp_path / "gene"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["method"] == "xpert"
    gene = load_gene(tmp_path / "gene")
    assert isinstance(gene, XpertGene) and gene.config.ranks["up"] == [6, 8, 8]
