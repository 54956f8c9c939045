"""Streaming: extraction from checkpoint folders (both on-disk expert layouts) equals in-memory
extraction, and the layer-streaming Tucker and SVD reach tensorly's HOOI and the dense per-layer SVD."""

import json
import warnings

import pytest
import torch
import tensorly as tl
from safetensors import safe_open
from safetensors.torch import save_file
from tensorly.decomposition import tucker as tl_tucker
from tiny_models import VOCAB, tiny_moe
from tolerances import assert_close_eps, eps_tolerance

from unite_hf import (
    compute_expert_importance,
    extract_universal_knowledge,
    get_source,
)
from unite_hf.decomposition import decompose_streaming
from unite_hf.sources.checkpoint import CheckpointError, MoECheckpoint

CALIBRATION = torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(1))


def _extract(model_or_path, importance, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # default rank clipped to the tiny dimensions
        return extract_universal_knowledge(model_or_path, importance=importance, show_progress=False, **kwargs)


def _assert_same_gene(streamed, reference, model):
    assert streamed.moe_layers == reference.moe_layers
    assert streamed.config.source_layout == reference.config.source_layout
    assert streamed.config.ranks == reference.config.ranks
    torch.testing.assert_close(streamed.importance, reference.importance)
    for layer in reference.moe_layers:
        for proj in reference.config.projections:
            torch.testing.assert_close(streamed.fused_weight(layer, proj), reference.fused_weight(layer, proj),
                                       rtol=1e-4, atol=1e-5)
    assert streamed.source_state_dict.keys() == reference.source_state_dict.keys()
    for name, tensor in reference.source_state_dict.items():
        assert torch.equal(streamed.source_state_dict[name], tensor), name
    for proj, bias in reference.fused_biases.items():
        torch.testing.assert_close(streamed.fused_biases[proj], bias)


@pytest.mark.parametrize("family, shard", [("mixtral", None), ("qwen2_moe", "20KB"), ("granitemoe", None),
                                           ("deepseek_v3", None)])
def test_checkpoint_written_by_save_pretrained_gives_the_in_memory_gene(tmp_path, family, shard):
    model = tiny_moe(family)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(tmp_path, **kwargs)
    with safe_open(next(tmp_path.glob("*.safetensors")), "pt") as f:
        keys = list(f.keys())
    if shard:
        assert (tmp_path / "model.safetensors.index.json").is_file()
    if family in ("mixtral", "qwen2_moe"):  # transformers 5 writes the legacy per-expert keys
        assert any(".experts.0." in k for k in json.loads((tmp_path / "model.safetensors.index.json").read_text())
                   ["weight_map"]) if shard else any(".experts.0." in k for k in keys)
    importance = compute_expert_importance(model, CALIBRATION, show_progress=False)
    reference = _extract(model, importance)
    streamed = _extract(tmp_path, importance)
    _assert_same_gene(streamed, reference, model)
    assert streamed.config.calibration == "precomputed importance"


def test_hand_written_fused_layout_checkpoint(tmp_path):
    """Fused 3D experts on disk (``mlp.experts.gate_up_proj`` (E, 2I, H), ``down_proj``), read one slice at a time."""
    model = tiny_moe("qwen3_moe")
    model.config.save_pretrained(tmp_path)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    half = sorted(state)[: len(state) // 2]
    save_file({k: state[k] for k in half}, str(tmp_path / "a.safetensors"))
    save_file({k: v for k, v in state.items() if k not in half}, str(tmp_path / "b.safetensors"))
    importance = compute_expert_importance(model, CALIBRATION, show_progress=False)
    with MoECheckpoint(tmp_path) as checkpoint:
        assert checkpoint.blocks[0].layout == "checkpoint:fused_3d"
        block = get_source(model).blocks[1]
        torch.testing.assert_close(checkpoint.blocks[1].expert(2).gate, block.expert(2).gate.detach())
        torch.testing.assert_close(checkpoint.blocks[1].expert(2).down, block.expert(2).down.detach())
    _assert_same_gene(_extract(tmp_path, importance), _extract(model, importance), model)


def test_uniform_fusion_needs_no_importance_and_others_do(tmp_path):
    model = tiny_moe("olmoe")
    model.save_pretrained(tmp_path)
    gene = _extract(tmp_path, None, fusion="uniform")
    block = get_source(model).blocks[0]
    expected = sum(block.expert(i).up.detach().double() for i in range(4)) / 4
    torch.testing.assert_close(gene.fused_weight(0, "up").double(), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="needs precomputed importance"):
        _extract(tmp_path, None)
    wrong = compute_expert_importance(tiny_moe("deepseek_v3"), CALIBRATION, show_progress=False)
    with pytest.raises(ValueError, match="importance covers layers"):
        _extract(tmp_path, wrong)


def test_bad_checkpoint_folders(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        MoECheckpoint(tmp_path)
    model = tiny_moe("mixtral")
    model.config.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="pickle checkpoints are not read"):
        MoECheckpoint(tmp_path)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if "experts.down_proj" not in k}
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing fused expert tensors"):
        MoECheckpoint(tmp_path)
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        _extract(str(tmp_path / "nope"), None)


# -- layer-streaming Tucker ----------------------------------------------------------------------

def _low_rank_plus_noise(shape=(6, 40, 32), seed=0):
    g = torch.Generator().manual_seed(seed)
    L, O, I = shape
    u, v = torch.randn(O, 10, generator=g), torch.randn(I, 10, generator=g)
    return torch.stack([u @ torch.randn(10, 10, generator=g) @ v.T for _ in range(L)]) + 0.05 * torch.randn(shape, generator=g)


def _tensorly_tucker(x: torch.Tensor, ranks, n_iter_max: int) -> torch.Tensor:
    """Tensorly's HOOI (HOSVD init, float64): the independent reference the streamed Tucker must reach."""
    with tl.backend_context("pytorch"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Trying to compute SVD with n_eigenvecs=")
        core, factors = tl_tucker(x.double(), rank=list(ranks), n_iter_max=n_iter_max, init="svd", tol=0)
        return tl.tucker_to_tensor((core, factors))


def _mode_energies(x: torch.Tensor, mode: int) -> torch.Tensor:
    """Cumulative energy of the mode-n unfolding's singular values, from a dense SVD."""
    s2 = torch.linalg.svdvals(torch.movedim(x.double(), mode, 0).reshape(x.shape[mode], -1)) ** 2
    return (torch.cumsum(s2, 0) / s2.sum()).float()


@pytest.mark.parametrize("ranks", [(6, 8, 6), (3, 7, 5), (6, 10, 10), (3, 10, 10)])
def test_streaming_tucker_matches_tensorly(ranks):
    x = _low_rank_plus_noise()
    reference = _tensorly_tucker(x, ranks, n_iter_max=10)
    reads = []
    streamed = decompose_streaming(lambda l: reads.append(l) or x[l], 6, (40, 32), "tucker", ranks, n_iter_max=10)
    expected_error = float(torch.linalg.vector_norm(x.double() - reference) / torch.linalg.vector_norm(x.double()))
    # the streamed error comes from ||X||^2 - ||G||^2 in float32: G's k = 40 + 32 + 6 chained sums err by
    # k eps ||X||^2, and sqrt(1 - ||G||^2 / ||X||^2) turns that into k eps / (2 e) (e the error itself)
    tolerance = eps_tolerance(torch.float32, k=78, scale=0.5 / expected_error)
    assert abs(streamed.relative_error - expected_error) <= tolerance
    if min(ranks[1:]) >= 10:  # ranks hold the rank-10 signal: one optimum, so the tensors themselves agree
        # (factors from float32 products and eigensolvers of the unfoldings: k = the longest side, |X|_F)
        assert_close_eps(streamed.reconstruct(), reference, k=40, scale=float(torch.linalg.vector_norm(x)))
    # (cut below the signal, the optimum is near-degenerate: equal errors, subspaces that may differ)
    for mode, axis in (("out", 1), ("in", 2)):  # exact energies: singular values of the dense unfoldings
        # (from the float32 Gram of the unfolding, summed over the x.numel() / x.shape[axis] columns)
        assert_close_eps(streamed.spectral_energy[mode], _mode_energies(x, axis), k=x.numel() // x.shape[axis],
                         scale=1.0)
    assert len(reads) <= 6 * (1 + 2 * 10)  # one read of X for the init, two per sweep


def test_streaming_subspace_solver_and_random_init_reach_the_hooi_error():
    x = _low_rank_plus_noise((5, 60, 50), seed=2)
    reference = _tensorly_tucker(x, (5, 10, 10), n_iter_max=20)
    reference_error = float(torch.linalg.vector_norm(x.double() - reference) / torch.linalg.vector_norm(x.double()))
    streamed = decompose_streaming(lambda l: x[l], 5, (60, 50), "tucker", (5, 10, 10), n_iter_max=20,
                                   init="random", solver="subspace")
    assert streamed.relative_error <= reference_error * 1.01
    exact = float(torch.linalg.vector_norm(x - streamed.reconstruct()) / torch.linalg.vector_norm(x))
    # the ||X||^2 - ||G||^2 identity, in float32: k eps / (2 e), k = 60 + 50 + 5 chained sums (above)
    assert abs(streamed.relative_error - exact) <= eps_tolerance(torch.float32, k=115, scale=0.5 / exact)
    for factor in (streamed.out_factor, streamed.in_factor, streamed.layer_factor):
        # float32 orthogonalisation: |Q^T Q - I| <= gamma_(m n) (Householder QR, Higham 19.3)
        assert_close_eps(factor.T @ factor, torch.eye(factor.shape[1]), k=factor.numel(), scale=1.0)


def test_streaming_other_methods_and_bad_layers():
    x = _low_rank_plus_noise()
    svd = decompose_streaming(lambda l: x[l], 6, (40, 32), "svd", 4)
    tail = 0.0
    for layer in range(6):  # per layer, the Eckart-Young best rank-4 fit from a dense SVD
        u, s, vh = torch.linalg.svd(x[layer].double(), full_matrices=False)
        # a float32 SVD is exact for X_l + E, |E| ~ k eps s_1 (k = the longer side), and the rank-4 cut
        # amplifies E by up to 1 + s_1 / (s_4 - s_5) (Wedin)
        assert_close_eps(svd.reconstruct_layer(layer), u[:, :4] @ torch.diag(s[:4]) @ vh[:4], k=40,
                         scale=float(s[0] * (1 + s[0] / (s[3] - s[4]))))
        tail += float((s[4:] ** 2).sum())
    assert svd.relative_error == pytest.approx((tail / float((x.double() ** 2).sum())) ** 0.5, rel=1e-5)
    with pytest.raises(ValueError, match=r"returned shape \(40, 31\)"):
        decompose_streaming(lambda l: x[l, :, :31], 6, (40, 32), "tucker", 4)
    bad = x.clone()
    bad[3, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="layer 3 contains NaN"):
        decompose_streaming(lambda l: bad[l], 6, (40, 32), "tucker", 4)
    with pytest.raises(ValueError, match="init must be"):
        decompose_streaming(lambda l: x[l], 6, (40, 32), "tucker", 4, init="svd")
    with pytest.raises(ValueError, match="all zeros"):
        decompose_streaming(lambda l: torch.zeros(40, 32), 6, (40, 32), "tucker", 4)
