"""Output-matched refits (unite_hf.refit) against independent references.

The reference for the ridge core is a dense least-squares solve of the vectorised problem
``y_n = (z_n^T kron A) vec(C)`` in float64 (torch.linalg.lstsq), on routed outputs computed from the
family's own modules by hand and on down inputs computed by the grown target's modules: no code of
unite_hf.refit is used to build it.
"""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import tiny_moe

from unite_hf import UniteForCausalLM, extract_universal_knowledge, load_gene

EPS32 = torch.finfo(torch.float32).eps
CALIBRATION = torch.randint(0, 96, (6, 16), generator=torch.Generator().manual_seed(1))
RANK = (2, 12, 12)


def _gene(model, **options):
    return extract_universal_knowledge(model, calibration=CALIBRATION, rank=RANK, n_iter_max=3, batch_size=3,
                                       show_progress=False, **options)


def _routed_by_hand(family: str, block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The block's routed output: its output minus its shared experts, written out per family."""
    x = x.unsqueeze(0)  # the blocks take (batch, tokens, hidden)
    out = block(x)
    out = out[0] if isinstance(out, tuple) else out
    if family == "qwen2_moe":
        out = out - torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)
    elif family == "deepseek_v3":
        out = out - block.shared_experts(x)
    return out.squeeze(0)


def _block_inputs(model, names: list[str], modules: list[torch.nn.Module] | None = None) -> dict[str, torch.Tensor]:
    """The calibration inputs of the named submodules (or of ``modules``, keyed by ``names``)."""
    captured: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    modules = modules if modules is not None else [model.get_submodule(n) for n in names]
    handles = [m.register_forward_pre_hook(
        lambda module, args, n=n: captured[n].append(args[0].detach())) for n, m in zip(names, modules)]
    with torch.no_grad():
        for batch in CALIBRATION.split(3):
            model(input_ids=batch)
    for handle in handles:
        handle.remove()
    return {n: torch.cat([t.reshape(-1, t.shape[-1]) for t in v]) for n, v in captured.items()}


def _lstsq_core(z: torch.Tensor, a: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """argmin_C sum_n ||t_n - A C z_n||^2 by a dense float64 least-squares solve of the Kronecker system."""
    n, r_in = z.shape
    d, r_out = a.shape
    design = torch.einsum("nj,di->ndij", z.double(), a.double()).reshape(n * d, r_out * r_in)
    solution = torch.linalg.lstsq(design, t.double().reshape(-1, 1), driver="gelsd").solution
    return solution.reshape(r_out, r_in)


def _solution_tolerance(z: torch.Tensor) -> float:
    """Relative error of a least-squares solution whose inputs carry float32 rounding: about
    cond(Z) * eps32 per operation, over a reduction of n tokens (first-order perturbation bound)."""
    singular = torch.linalg.svdvals(z.double())
    return float(singular[0] / singular[-1]) * EPS32 * math.sqrt(z.shape[0]) * 16


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_ridge_core_is_the_least_squares_solution(family):
    model = tiny_moe(family).float()
    plain, refitted = _gene(model), _gene(model, refit="ridge", refit_ridge=0.0)
    target = UniteForCausalLM.from_gene(plain, core_init="tucker").eval()
    blocks = {f"model.layers.{layer}.mlp": layer for layer in plain.moe_layers}
    inputs = _block_inputs(model, list(blocks))
    for row, (name, layer) in enumerate(blocks.items()):
        x = inputs[name]
        with torch.no_grad():
            t = _routed_by_hand(family, model.get_submodule(name), x)
            ffn = target.model.ffn(layer)
            h = ffn.act_fn(ffn.project("gate", x)) * ffn.project("up", x)
            bases = ffn._bases("down")
            z = h @ bases.in_basis
            if ffn.down.bias is not None:
                t = t - ffn.down.bias
        expected = _lstsq_core(z, bases.out_basis, t)
        got = refitted.decompositions["down"].layer_core(row).double()
        error = float(torch.linalg.matrix_norm(got - expected) / torch.linalg.matrix_norm(expected))
        assert error <= _solution_tolerance(z), (family, layer, error)
        # gate, up and the bases are the plain gene's; the refit only moved down's core
        for proj in ("gate", "up"):
            torch.testing.assert_close(refitted.decompositions[proj].layer_core(row),
                                       plain.decompositions[proj].layer_core(row), rtol=0, atol=0)
        assert torch.equal(refitted.decompositions["down"].layer_out_factor(row),
                           plain.decompositions["down"].layer_out_factor(row))


def test_refitted_gene_grows_the_refitted_target_and_records_it(tmp_path):
    """A target at the gene's ranks computes the refitted FFN, whose routed error on the calibration tokens,
    measured with the target's own modules, is the one the gene records; save and load keep both."""
    model = tiny_moe("mixtral").float()
    gene = _gene(model, refit="ridge")
    gene.save_pretrained(tmp_path / "gene")
    loaded = load_gene(tmp_path / "gene")
    assert loaded.recipe.refit == "ridge" and loaded.config.method_config["refit"] == "ridge"
    recorded = loaded.config.method_config["refit_calibration_error"]
    target = UniteForCausalLM.from_gene(loaded, core_init="tucker").eval()
    names = [f"model.layers.{layer}.mlp" for layer in loaded.moe_layers]
    inputs = _block_inputs(model, names)
    for name, layer in zip(names, loaded.moe_layers):
        with torch.no_grad():
            t = _routed_by_hand("mixtral", model.get_submodule(name), inputs[name])
            y = target.model.ffn(layer).routed(inputs[name])
        error = float(torch.linalg.vector_norm(y - t) / torch.linalg.vector_norm(t))
        before, after = recorded[str(layer)]
        assert after < before
        # both in float32 over the layer's tokens: the bound of a float32 sum of n squares
        assert abs(error - after) <= 8 * EPS32 * math.sqrt(t.numel()) * max(error, 1.0), (layer, error, after)


def test_sequential_refit_fits_each_layer_on_the_refitted_model_inputs():
    """With refit_sequential, layer 1 is fitted on what it receives when layer 0 is the refitted FFN: the
    inputs that layer sees inside the full-depth target grown from the gene."""
    model = tiny_moe("mixtral").float()
    gene = _gene(model, refit="ridge", refit_ridge=0.0, refit_sequential=True)
    target = UniteForCausalLM.from_gene(gene, core_init="tucker").eval()
    last = gene.moe_layers[-1]
    x = _block_inputs(target, ["last"], [target.model.ffn(last)])["last"]
    # the target's last layer sees layers before it refitted; fit its down core by hand on those inputs
    with torch.no_grad():
        t = _routed_by_hand("mixtral", model.get_submodule(f"model.layers.{last}.mlp"), x)
        ffn = target.model.ffn(last)
        z = (ffn.act_fn(ffn.project("gate", x)) * ffn.project("up", x)) @ ffn._bases("down").in_basis
    expected = _lstsq_core(z, ffn._bases("down").out_basis, t)
    got = gene.decompositions["down"].layer_core(len(gene.moe_layers) - 1).double()
    error = float(torch.linalg.matrix_norm(got - expected) / torch.linalg.matrix_norm(expected))
    assert error <= _solution_tolerance(z), error
    # and it differs from the one-pass refit, whose inputs come from the untouched source
    parallel = _gene(model, refit="ridge", refit_ridge=0.0)
    assert not torch.allclose(parallel.decompositions["down"].layer_core(len(gene.moe_layers) - 1), got.float())


def test_distill_ends_no_worse_than_its_ridge_start():
    model = tiny_moe("qwen2_moe").float()
    ridge = _gene(model, refit="ridge").config.method_config["refit_calibration_error"]
    distill = _gene(model, refit="distill", refit_steps=60, refit_lr=3e-3).config.method_config["refit_calibration_error"]
    for layer, (before, after) in distill.items():
        assert after <= ridge[layer][1] * (1 + 1e-4), (layer, after, ridge[layer])
    assert any(distill[layer][1] < ridge[layer][1] * 0.99 for layer in distill)  # Adam did move the cores


def test_bad_refit_settings_fail_before_calibration(tmp_path):
    model = tiny_moe("mixtral").float()
    with pytest.raises(ValueError, match="unknown refit 'lasso'"):
        extract_universal_knowledge(model, calibration="/nonexistent/corpus.txt", refit="lasso", show_progress=False)
    with pytest.raises(ValueError, match="refit_ridge must be a finite number"):
        _gene(model, refit="ridge", refit_ridge=float("nan"))
    with pytest.raises(ValueError, match="refit_steps must be an int"):
        _gene(model, refit="distill", refit_steps=-1)
    model.save_pretrained(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="refit are not supported when streaming"):
        extract_universal_knowledge(tmp_path / "ckpt", fusion="uniform", refit="ridge", show_progress=False)
    with pytest.warns(UserWarning, match="refit_steps"):
        _gene(model, refit="ridge", refit_steps=5)


def test_layers_refitted_in_memory_bounded_groups_give_the_one_pass_result():
    """With statistics too large to hold together, layers are refitted in groups, one partial pass each; the
    inputs are the same, so are the cores."""
    model = tiny_moe("mixtral").float()
    one_pass = _gene(model, refit="ridge")
    grouped = _gene(model, refit="ridge", refit_max_memory_gb=1e-9)  # one layer per group
    for proj in ("gate", "up", "down"):
        assert torch.equal(one_pass.decompositions[proj].core, grouped.decompositions[proj].core), proj
