"""No hidden global state: what importing unite_hf and running its functions leaves behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from tiny_models import VOCAB, tiny_dense, tiny_moe

from unite_hf import compute_expert_importance
from unite_hf.importance import PROBE_IMPLEMENTATION

CALIBRATION = torch.randint(0, VOCAB, (3, 10), generator=torch.Generator().manual_seed(3))


def test_importing_unite_hf_registers_no_experts_implementation():
    code = ("import json, unite_hf; from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS; "
            f"print(json.dumps({PROBE_IMPLEMENTATION!r} in ALL_EXPERTS_FUNCTIONS))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) is False


def test_the_fisher_probe_switches_experts_through_set_experts_implementation(monkeypatch):
    model = tiny_moe("qwen3_moe")  # fused 3D experts behind @use_experts_implementation
    before = model.config._experts_implementation
    calls = []
    original = type(model).set_experts_implementation
    monkeypatch.setattr(type(model), "set_experts_implementation",
                        lambda self, name: calls.append(name) or original(self, name))
    reference = compute_expert_importance(model, CALIBRATION, show_progress=False)
    assert calls == [PROBE_IMPLEMENTATION, before]  # in, then back
    assert model.config._experts_implementation == before
    # the model runs with its own implementation again, and a second pass gives the same scores
    again = compute_expert_importance(model, CALIBRATION, show_progress=False)
    torch.testing.assert_close(again.fisher, reference.fisher, rtol=0, atol=0)


def test_library_functions_leave_the_global_torch_generator_alone():
    from unite_hf.methods.masa import extract_masa_gene

    moe, dense, dense_again = tiny_moe("mixtral"), tiny_dense(), tiny_dense()  # (the builders seed globally)
    masa = dict(corpora=CALIBRATION, rank=4, tokens=40, seq_len=10, batch_size=2, show_progress=False)
    torch.manual_seed(1234)
    expected = torch.rand(3)  # what the caller's stream gives next, untouched
    torch.manual_seed(1234)
    compute_expert_importance(moe, CALIBRATION, labels="sampled", show_progress=False)
    gene = extract_masa_gene(dense, **masa)
    assert torch.equal(torch.rand(3), expected)
    torch.manual_seed(99)  # and the result does not depend on the caller's global state: only on `seed`
    other = extract_masa_gene(dense_again, **masa)
    for key, matrix in gene.gene_state_dict().items():
        torch.testing.assert_close(other.gene_state_dict()[key], matrix, rtol=0, atol=0)


def test_seeded_scopes_the_global_generator():
    from unite_hf.seeding import seeded, seeded_by_argument

    @seeded_by_argument
    def draw(n: int, seed: int = 0) -> torch.Tensor:
        return torch.randn(n)

    torch.manual_seed(5)
    expected = torch.rand(2)
    torch.manual_seed(5)
    with seeded(0):
        first = torch.randn(4)
    assert torch.equal(draw(4), first) and torch.equal(draw(4, seed=0), first)  # reproducible from the seed
    assert not torch.equal(draw(4, seed=1), first)
    assert torch.equal(torch.rand(2), expected)  # the caller's stream is where it was


def test_extraction_filters_only_the_rank_clipping_warning(monkeypatch):
    """Other warnings raised inside a decomposition reach the caller (no blanket simplefilter)."""
    import unite_hf.methods.unite.extract as unite_method  # where the extraction looks decompose up
    from unite_hf import extract_universal_knowledge

    original = unite_method.decompose

    def noisy(*args, **kwargs):
        warnings.warn("a warning from inside the decomposition", RuntimeWarning)
        return original(*args, **kwargs)

    monkeypatch.setattr(unite_method, "decompose", noisy)
    model = tiny_moe("mixtral")
    with pytest.warns(RuntimeWarning, match="from inside the decomposition"):
        extract_universal_knowledge(model, calibration=CALIBRATION, rank=(2, 4, 4), n_iter_max=2, show_progress=False)


def test_demo_does_not_write_the_environment(monkeypatch, tmp_path):
    """run_demo passes its data folder down instead of exporting $UNITE_HF_DATA_DIR."""
    import tools.demo as demo

    monkeypatch.delenv("UNITE_HF_DATA_DIR", raising=False)
    seen = {}

    def stop(data_dir):
        seen["data_dir"] = data_dir
        raise KeyboardInterrupt  # far enough: the data folder is resolved and passed on

    monkeypatch.setattr(demo, "_tiny_source", stop)
    with pytest.raises(KeyboardInterrupt):
        demo.run_demo(tmp_path / "out", data_dir=tmp_path, tiny=True)
    assert seen["data_dir"] == tmp_path.resolve()
    assert "UNITE_HF_DATA_DIR" not in os.environ
