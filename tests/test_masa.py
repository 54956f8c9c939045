"""MASA: f_c / f_d, the closed-form start, alignment on real activations, adaptive scaling, Llama targets."""

import json
import math
import os
import shutil

import pytest
import torch
import transformers
from hub_server import local_hub  # noqa: F401
from conftest import DATA, needs_data, run_cli, save_with_tokenizer
from tiny_models import COMMON, VOCAB, tiny_dense, tiny_moe

from unite_hf import GeneFormatError, UniteGene, UnsupportedSourceError, load_gene
from unite_hf.methods.masa import (
    MasaGene, _dense_units, _spectral_loss, effective_weight, extract_masa_gene, fold_input, kronecker_init,
    masa_forward, pooling_matrix, unfold_output,
)
from unite_hf.layer_map import map_layers
from unite_hf.llama_targets import llama_target_config, masa_init, truncate_or_pad
from unite_hf.methods.masa.scaling import adaptive_scale

IDS = torch.randint(0, VOCAB, (8, 16), generator=torch.Generator().manual_seed(0))


def _extract(model, **kwargs):
    options = dict(corpora=IDS, rank=8, tokens=IDS.numel(), seq_len=16, batch_size=4, show_progress=False)
    return extract_masa_gene(model, **{**options, **kwargs})


# -- f_c and f_d -----------------------------------------------------------------------------------------

def _hand_weight(matrix, d_out, d_in):
    """(P ⊗ M)[:d_out, :d_in] entry by entry, with P from the pooling rule written out by hand."""
    r = matrix.shape[0]
    n, m = math.ceil(d_in / r), math.ceil(d_out / r)
    weight = torch.zeros(d_out, d_in, dtype=torch.float64)
    for i in range(m):
        lo, hi = math.floor(i * n / m), math.ceil((i + 1) * n / m)
        for j in range(lo, hi):
            for a in range(r):
                for b in range(r):
                    if i * r + a < d_out and j * r + b < d_in:
                        weight[i * r + a, j * r + b] = matrix[a, b] / (hi - lo)
    return weight


@pytest.mark.parametrize("d_out, d_in", [(7, 10), (13, 5), (8, 8), (3, 11)])
def test_fold_and_unfold_are_the_documented_structured_weight(d_out, d_in):
    torch.manual_seed(0)
    matrix = torch.randn(4, 4, dtype=torch.float64)
    x = torch.randn(5, d_in, dtype=torch.float64)
    reference = _hand_weight(matrix, d_out, d_in)
    torch.testing.assert_close(effective_weight(matrix, d_out, d_in), reference)
    torch.testing.assert_close(masa_forward(matrix, x, d_out), x @ reference.T)


def test_fold_pads_with_zeros_and_unfold_keeps_d_out():
    x = torch.arange(1.0, 11.0)
    chunks = fold_input(x, 4)
    assert chunks.shape == (3, 4)
    assert chunks[2].tolist() == [9.0, 10.0, 0.0, 0.0]
    assert unfold_output(chunks, 12).tolist() == x.tolist() + [0.0, 0.0]  # n = m: identity layout
    assert unfold_output(chunks, 5).shape == (5,)
    torch.testing.assert_close(pooling_matrix(3, 2), torch.tensor([[0.5, 0.5, 0], [0, 0.5, 0.5]], dtype=torch.float64))


def test_kronecker_init_is_the_least_squares_optimum():
    torch.manual_seed(1)
    d_out, d_in, r = 10, 7, 3
    weight = torch.randn(d_out, d_in, dtype=torch.float64)
    # brute force: the structured weight is linear in M; solve the least-squares problem over vec(M)
    design = torch.stack([effective_weight(torch.eye(r * r, dtype=torch.float64)[k].reshape(r, r), d_out, d_in).flatten()
                          for k in range(r * r)], dim=1)
    solution = torch.linalg.lstsq(design, weight.flatten()).solution.reshape(r, r)
    torch.testing.assert_close(kronecker_init(weight, r), solution)


def test_spectral_loss_by_hand_and_guarded_at_zero():
    torch.manual_seed(2)
    matrix = torch.randn(5, 5, dtype=torch.float64)
    target = torch.rand(5, dtype=torch.float64).add(0.5).log()
    expected = ((target - torch.tensor(sorted(torch.linalg.svdvals(matrix).tolist(), reverse=True),
                                      dtype=torch.float64).log()) ** 2).mean()
    torch.testing.assert_close(_spectral_loss(matrix, target), expected)
    zero = torch.zeros(4, 4, requires_grad=True)
    loss = _spectral_loss(zero, torch.zeros(4))
    assert torch.isfinite(loss)


# -- adaptive scaling ------------------------------------------------------------------------------------

@pytest.mark.parametrize("p, q", [(3, 5), (9, 4), (4, 13), (17, 2), (6, 6), (9, 13), (2, 3)])
def test_adaptive_scaling_is_the_svd_rule(p, q):
    torch.manual_seed(3)
    matrix = torch.randn(6, 6, dtype=torch.float64)
    scaled = adaptive_scale(matrix, p, q)
    assert scaled.weight.shape == (p, q)
    # the reference, straight from the issue: SVD, score rows of U Σ and V Σ, keep or duplicate, U_p Σ V_q^T
    u, sigma, vh = torch.linalg.svd(matrix)
    row_rank = torch.argsort((u * sigma).norm(dim=1), descending=True)
    col_rank = torch.argsort((vh.T * sigma).norm(dim=1), descending=True)

    def pick(rank, size):
        if size <= 6:
            return torch.sort(rank[:size]).values
        return torch.cat([torch.arange(6), rank.repeat(3)[: size - 6]])

    rows, cols = pick(row_rank, p), pick(col_rank, q)
    assert scaled.rows.tolist() == rows.tolist() and scaled.cols.tolist() == cols.tolist()
    torch.testing.assert_close(scaled.weight, (u[rows] * sigma) @ vh[:, cols])  # Σ in the middle, unchanged
    torch.testing.assert_close(scaled.singular_values, sigma)
    if (p, q) == (6, 6):
        torch.testing.assert_close(scaled.weight, matrix)


def test_truncate_or_pad_and_bad_sizes():
    matrix = torch.arange(16.0).reshape(4, 4)
    out = truncate_or_pad(matrix, 2, 6).weight
    assert out[:, :4].tolist() == matrix[:2].tolist() and out[:, 4:].abs().sum() == 0
    with pytest.raises(ValueError, match="at least 1"):
        adaptive_scale(matrix, 0, 3)
    with pytest.raises(ValueError, match="at least 1"):
        truncate_or_pad(matrix, 3, 0)


def test_the_old_scaling_module_forwards_every_name_with_a_future_warning(monkeypatch):
    """unite_hf.scaling was split (Llama targets: core; adaptive scaling: MASA's folder; coupled: XPERT's):
    every name it had still answers from the old path, the same object as at its new home."""
    import importlib
    import sys

    import unite_hf
    import unite_hf.layer_map
    import unite_hf.llama_targets as core
    from unite_hf.methods.masa import scaling as masa_scaling
    from unite_hf.methods.xpert import scaling as xpert_scaling

    monkeypatch.delitem(sys.modules, "unite_hf.scaling", raising=False)
    with pytest.warns(FutureWarning, match="unite_hf.scaling was split"):
        old = importlib.import_module("unite_hf.scaling")
    assert old.adaptive_scale is masa_scaling.adaptive_scale is unite_hf.adaptive_scale
    assert old.masa_init is core.masa_init is unite_hf.masa_init
    assert old.llama_target_config is core.llama_target_config and old.truncate_or_pad is core.truncate_or_pad
    assert old.map_layers is unite_hf.layer_map.map_layers and old.LLAMA_FFN is core.LLAMA_FFN
    assert old.FFN_SCALINGS is core.FFN_SCALINGS and old.ScaledMatrix is core.ScaledMatrix
    assert old._scale_coupled is xpert_scaling.coupled_scale and old._scaled_indices is core.ranked_indices
    assert sorted(old.SCALINGS) == ["adaptive", "coupled", "truncate"]  # each method registered its own
    with pytest.raises(AttributeError):
        old.no_such_name


def test_layer_mapping_rule():
    assert map_layers(30, 4) == [0, 10, 19, 29]
    assert map_layers(3, 5) == [0, 1, 1, 2, 2]  # halves round up: a uniform stretch
    assert map_layers(5, 9) == [0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert map_layers(7, 1) == [0]


# -- alignment on real activations -----------------------------------------------------------------------

@pytest.mark.parametrize("mlp_bias", [False, True])
def test_hooked_inputs_are_what_reaches_each_projection(mlp_bias):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**COMMON, "intermediate_size": 24},
                                                                   mlp_bias=mlp_bias)).eval()
    if mlp_bias:
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, torch.nn.Linear) and module.bias is not None:
                    module.bias.normal_(0, 0.5)
    seen = {}
    mlp = model.model.layers[1].mlp
    handles = [mlp.register_forward_pre_hook(lambda m, a: seen.__setitem__("h", a[0])),
               mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("down", a[0]))]
    model(IDS[:2])
    for handle in handles:
        handle.remove()
    unit = next(u for u in _dense_units(model) if u.layer == 1)
    inputs = unit.inputs(seen["h"].reshape(-1, 32))
    torch.testing.assert_close(inputs["down"], seen["down"].reshape(-1, 24))
    torch.testing.assert_close(inputs["gate"], seen["h"].reshape(-1, 32))


def test_planted_kronecker_weights_are_recovered_with_zero_losses():
    model = tiny_dense()
    torch.manual_seed(4)
    planted = {}
    with torch.no_grad():
        for idx, layer in enumerate(model.model.layers):
            for proj, linear in (("gate", layer.mlp.gate_proj), ("up", layer.mlp.up_proj), ("down", layer.mlp.down_proj)):
                matrix = torch.randn(8, 8) * 0.3
                linear.weight.copy_(effective_weight(matrix, *linear.weight.shape))
                planted[(idx, proj)] = matrix
    gene = _extract(model, spectral_weight=0.0, learning_rate=1e-4)
    for (idx, proj), matrix in planted.items():
        torch.testing.assert_close(gene.gene_matrix(idx, proj), matrix, atol=2e-3, rtol=0)
    assert max(gene.config.method_config["final_output_error"].values()) < 1e-4


def _output_error(model, matrices, ids):
    """Relative output error of ``matrices`` on the activations of ``ids``, recomputed independently."""
    captured = {}
    units = _dense_units(model)
    handles = [u.module.register_forward_pre_hook(lambda m, a, layer=u.layer: captured.__setitem__(layer, a[0]))
               for u in units]
    with torch.no_grad():
        model(ids)
    for handle in handles:
        handle.remove()
    total = 0.0
    for unit in units:
        for proj, x in unit.inputs(captured[unit.layer].reshape(-1, 32)).items():
            target = x @ unit.weights[proj].T
            approx = x @ effective_weight(matrices[(unit.layer, "mlp", proj)], *target.shape[-1:], x.shape[-1]).T
            total += ((target - approx).square().sum() / target.square().sum()).item()
    return total


def test_alignment_lowers_the_output_error_below_the_closed_form_start():
    model = tiny_dense()
    ids = torch.randint(0, VOCAB, (32, 16), generator=torch.Generator().manual_seed(5))
    gene = _extract(model, spectral_weight=0.0, learning_rate=3e-3, corpora=ids, tokens=ids.numel())
    start = {(u.layer, "mlp", proj): kronecker_init(w, 8) for u in _dense_units(model) for proj, w in u.weights.items()}
    assert _output_error(model, gene.matrices, ids) < 0.99 * _output_error(model, start, ids)


def test_spectral_term_pulls_the_spectrum_towards_the_source():
    model = tiny_dense()
    off = _extract(model, spectral_weight=0.0, learning_rate=3e-3)
    on = _extract(model, spectral_weight=10.0, learning_rate=3e-3)

    def gap(gene):
        return sum(_spectral_loss(gene.matrices[k], gene.spectra[k].log()).item() for k in gene.matrices)

    assert gap(on) < gap(off)


def test_moe_sources_frequent_and_shared_experts():
    from unite_hf import compute_routing_frequency

    mixtral = tiny_moe("mixtral")
    gene = _extract(mixtral, num_experts=2)
    frequency = compute_routing_frequency(mixtral, IDS[:, :16], batch_size=4, show_progress=False)
    for row, layer in enumerate(gene.matrix_layers):
        units = gene.units(layer)
        top = set(torch.topk(frequency[row], 2).indices.tolist())
        assert {int(name.removeprefix("expert")) for name in units} == top
        assert sum(units.values()) == pytest.approx(1.0)
        mixed = sum(w * gene.matrices[(layer, unit, "up")] for unit, w in units.items())
        torch.testing.assert_close(gene.gene_matrix(layer, "up"), mixed)
    shared = _extract(tiny_moe("qwen2_moe"))
    assert shared.config.method_config["selection"] == "shared"
    assert set(shared.units(0)) == {"shared_expert"}


# -- bad input -------------------------------------------------------------------------------------------

def test_bad_input_gets_clear_errors():
    model = tiny_dense()
    with pytest.raises(ValueError, match="larger than the source's smallest FFN dimension"):
        _extract(model, rank=64)
    with pytest.raises(UnsupportedSourceError, match="no FFN weights of the kind 'shared'"):
        _extract(tiny_moe("mixtral"), selection="shared")
    with pytest.raises(UnsupportedSourceError, match="dense model"):
        _extract(model, selection="frequent")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        _extract(model)
    with pytest.raises(ValueError, match="hidden_size must be at least 1"):
        llama_target_config(model.config, hidden_size=0)
    with pytest.raises(ValueError, match="must be at least 1"):
        masa_init(transformers.LlamaConfig(**{**COMMON, "intermediate_size": 0}), _extract(tiny_dense()))
    from unite_hf.training.finetune import build_llama_causal_lm

    for bad in ({"width": 0}, {"layers": 0}, {"intermediate_size": 0}):
        with pytest.raises(ValueError, match="must be at least 1"):
            build_llama_causal_lm(_extract(tiny_dense()), **bad)


# -- the gene and its targets ----------------------------------------------------------------------------

def test_gene_round_trip_card_and_method_dispatch(tmp_path):
    gene = _extract(tiny_dense(), source_id="tiny-llama")
    gene.save_pretrained(tmp_path / "gene")
    config = json.loads((tmp_path / "gene" / "gene_config.json").read_text())
    assert config["method"] == "masa" and config["method_config"]["rank"] == 8
    assert config["format_version"] == 2  # older unite_hf versions refuse it with "upgrade"
    umask = os.umask(0)
    os.umask(umask)
    for name in ("gene_config.json", "gene.safetensors", "README.md"):  # atomic writes keep normal permissions
        assert (tmp_path / "gene" / name).stat().st_mode & 0o777 == 0o666 & ~umask
    loaded = load_gene(tmp_path / "gene")
    assert isinstance(loaded, MasaGene) and isinstance(MasaGene.from_pretrained(tmp_path / "gene"), MasaGene)
    for key, matrix in gene.matrices.items():
        torch.testing.assert_close(loaded.matrices[key], matrix, rtol=0, atol=0)
    assert "MASA gene of `tiny-llama`" in (tmp_path / "gene" / "README.md").read_text()
    with pytest.raises(GeneFormatError, match="holds a 'masa' gene"):
        UniteGene.from_pretrained(tmp_path / "gene")
    raw = (tmp_path / "gene" / "gene.safetensors").read_bytes()
    (tmp_path / "gene" / "gene.safetensors").write_bytes(raw[:-8])
    with pytest.raises(Exception, match="truncated"):
        load_gene(tmp_path / "gene")


def test_masa_genes_record_no_fisher_fusion_or_decomposition(tmp_path, capsys):
    """Regression (issue 14): MASA genes wrote GeneConfig's UNITE defaults, fusion "fisher", decomposition
    "tucker", fisher_labels "empirical" (and 25 HOOI iterations), none of which MASA does, and
    ``unite-hf info`` reported them. Genes saved so still load, read and report as MASA, and save anew."""
    import dataclasses

    from unite_hf.cli import main
    from unite_hf.methods.masa.config import NOT_MASA

    def info(path) -> dict:
        assert main(["info", str(path)]) == 0
        return json.loads(capsys.readouterr().out)

    unite_fields = {"fisher_labels": "empirical", "fusion": "fisher", "decomposition": "tucker", "n_iter_max": 25}
    assert NOT_MASA == {"fisher_labels": "none", "fusion": "", "decomposition": "", "n_iter_max": 0}
    gene = _extract(tiny_dense(), source_id="tiny-llama")
    assert {key: getattr(gene.config, key) for key in NOT_MASA} == NOT_MASA
    gene.save_pretrained(tmp_path / "gene")
    written = json.loads((tmp_path / "gene" / "gene_config.json").read_text())
    assert {key: written[key] for key in NOT_MASA} == NOT_MASA
    report = info(tmp_path / "gene")
    assert report["method"] == "masa" and report["fusion"] is None and report["decomposition"] is None
    assert report["calibration"]["fisher_labels"] == "none" and report["expert_statistics"] == []

    old = dataclasses.replace(gene.config, **unite_fields)  # what the previous version wrote
    shutil.copytree(tmp_path / "gene", tmp_path / "old")  # the config is not among its own file records
    (tmp_path / "old" / "gene_config.json").write_text(json.dumps({**written, **unite_fields}))
    assert json.loads((tmp_path / "old" / "gene_config.json").read_text())["fusion"] == old.fusion == "fisher"
    loaded = load_gene(tmp_path / "old")
    assert isinstance(loaded, MasaGene) and {key: getattr(loaded.config, key) for key in NOT_MASA} == NOT_MASA
    for key, matrix in gene.matrices.items():
        torch.testing.assert_close(loaded.matrices[key], matrix, rtol=0, atol=0)
    assert {key: info(tmp_path / "old")[key] for key in ("fusion", "decomposition", "calibration")} == {
        key: report[key] for key in ("fusion", "decomposition", "calibration")}
    loaded.save_pretrained(tmp_path / "resaved")
    resaved = json.loads((tmp_path / "resaved" / "gene_config.json").read_text())
    assert {key: resaved[key] for key in NOT_MASA} == NOT_MASA


def test_masa_init_fills_only_the_ffns_of_a_plain_llama_of_another_shape(tmp_path):
    gene = _extract(tiny_dense())
    config = transformers.LlamaConfig(**{**COMMON, "hidden_size": 24, "intermediate_size": 36, "num_hidden_layers": 5,
                                         "num_attention_heads": 4, "num_key_value_heads": 2})
    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(config)
    torch.manual_seed(0)
    target = masa_init(config, gene)
    mapped = map_layers(3, 5)
    for j, layer in enumerate(target.model.layers):
        for proj, name in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
            weight = getattr(layer.mlp, name).weight
            expected = adaptive_scale(gene.gene_matrix(mapped[j], proj), *weight.shape).weight
            torch.testing.assert_close(weight, expected)
    for name, tensor in reference.state_dict().items():
        if ".mlp." not in name:
            torch.testing.assert_close(target.state_dict()[name], tensor, rtol=0, atol=0)
    target.save_pretrained(tmp_path / "llama")
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "llama")  # no custom code
    assert type(plain) is transformers.LlamaForCausalLM
    torch.testing.assert_close(plain(IDS[:1]).logits, target(IDS[:1]).logits)


def test_masa_gene_goes_to_the_hub_and_back(local_hub):  # noqa: F811
    gene = _extract(tiny_dense())
    gene.push_to_hub("me/masa-gene")
    loaded = load_gene("me/masa-gene")
    assert isinstance(loaded, MasaGene)
    torch.testing.assert_close(loaded.gene_matrix(2, "down"), gene.gene_matrix(2, "down"), rtol=0, atol=0)


@needs_data
def test_cli_extract_masa_then_finetune_a_llama_target_with_pretraining(tmp_path):
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**COMMON, "vocab_size": 50257}, intermediate_size=24))
    save_with_tokenizer(model, tmp_path / "dense")
    result = run_cli("extract", "--method", "masa", "--source", str(tmp_path / "dense"), "--rank", "8", "--tokens", "512",
                     "--seq-len", "32", "--batch-size", "4", "--out", str(tmp_path / "gene"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["method"] == "masa"
    gene = load_gene(tmp_path / "gene")
    assert gene.config.method_config["tokens"] == 512 and "mix(" in gene.config.calibration
    result = run_cli("finetune", "--model", str(tmp_path / "gene"), "--task", "sst2", "--init", "masa", "--width", "16",
                     "--layers", "2", "--pretrain-tokens", "256", "--epochs", "1", "--max-train-examples", "16",
                     "--max-eval-examples", "8", "--max-length", "32", "--output", str(tmp_path / "run"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["width"] == 16 and summary["layers"] == 2 and summary["pretrain"]["tokens"] == 256
    plain = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "model")
    assert type(plain) is transformers.LlamaForSequenceClassification
