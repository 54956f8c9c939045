"""The LM probe (benchmarks/bench_lm_probe.py) end to end on the tiny random source, with every init; the
oracle is the source cut to the target's depth, checked against the plain source's own forward pass."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from conftest import needs_data

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
DEPTH, SEQ_LEN, WINDOWS = 2, 16, 2


def _load(name: str):
    sys.path.insert(0, str(BENCHMARKS))  # the probe imports bench_retention for the tiny source
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def probe():
    return _load("bench_lm_probe")


@pytest.fixture(scope="module")
def tiny_source(probe):
    model, tokenizer, _ = probe._resolve_source("moefied", None, tiny=True)
    return model.float().eval(), tokenizer


@pytest.fixture(scope="module")
def result(probe, tmp_path_factory):
    out = tmp_path_factory.mktemp("lm_probe")
    return probe.main(["--tiny", "--depths", str(DEPTH), "--steps", "2", "--select-steps", "1", "--eval-steps", "0", "2",
                       "--seeds", "0", "1", "--lr-grid", "1e-3", "3e-3", "--rank", "16", "--fisher-sequences", "2",
                       "--refit-sequences", "4", "--calib-seq-len", "16", "--seq-len", str(SEQ_LEN), "--train-windows",
                       "8", "--dev-windows", str(WINDOWS), "--held-out-windows", str(WINDOWS), "--threads", "1",
                       "--json", str(out / "probe.json"), "--markdown", str(out / "LM_PROBE.md")]) | {"out": out}


def _loss_through_layers(model, ids: torch.Tensor, layers: int) -> float:
    """The plain source's loss with its output read after decoder layer ``layers`` (a hook), then its own
    final norm and LM head: what a source cut to that depth computes, without cutting anything."""
    captured = {}
    decoder = model.get_decoder()
    handle = decoder.layers[layers - 1].register_forward_hook(
        lambda module, args, output: captured.__setitem__("h", output[0] if isinstance(output, tuple) else output))
    try:
        with torch.no_grad():
            model(input_ids=ids)
            logits = model.lm_head(decoder.norm(captured["h"])).float()
    finally:
        handle.remove()
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()


@needs_data
def test_probe_runs_every_init_end_to_end(result, probe):
    summary = result["summary"][str(DEPTH)]
    assert set(summary) == set(probe.INITS)
    for init, per in summary.items():
        assert set(per) == {0, 2} and all(cell["n"] == 2 for cell in per.values()), init
        assert all(torch.isfinite(torch.tensor(cell["mean"])) for cell in per.values())
        assert set(result["grid"][str(DEPTH)][init]["dev"]) == {1e-3, 3e-3}
        assert result["chosen_learning_rate"][str(DEPTH)][init] in (1e-3, 3e-3)
    # seed 0 ran once per rate (the winner went on), seed 1 once at the chosen rate
    assert len(result["runs"]) == len(probe.INITS) * 3
    params = {init: result["grid"][str(DEPTH)][init]["ffn_parameters"] for init in probe.INITS}
    assert params["oracle"] > max(v for k, v in params.items() if k != "oracle")  # every expert of every kept layer
    verdict = result["verdicts"][str(DEPTH)]
    assert verdict["refit_vs_copy"]["step"] == verdict["oracle_vs_copy"]["step"] == 2
    text = (result["out"] / "LM_PROBE.md").read_text()
    assert "| oracle |" in text and "| refit |" in text and "standard errors" in text
    assert text == probe.write_markdown([probe.json.loads((result["out"] / "probe.json").read_text())],
                                        str(result["out"] / "again.md"))  # --report-only renders the same


@needs_data
def test_oracle_at_step_zero_is_the_source_cut_to_that_depth(result, probe, tiny_source):
    model, tokenizer = tiny_source
    splits, _ = probe.probe_splits(tokenizer, train_windows=8, dev_windows=WINDOWS, held_out_windows=WINDOWS,
                                   seq_len=SEQ_LEN)
    expected = _loss_through_layers(model, splits["held_out"], DEPTH)
    got = result["summary"][str(DEPTH)]["oracle"][0]
    tokens = splits["held_out"].numel()
    assert got["se"] == 0  # no seed enters before training
    assert got["mean"] == pytest.approx(expected, rel=tokens * torch.finfo(torch.float32).eps)


@needs_data
def test_truncated_source_keeps_the_first_layers_and_leaves_the_source_alone(probe, tiny_source):
    model, tokenizer = tiny_source
    ids = torch.randint(0, len(tokenizer), (2, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    full = len(model.get_decoder().layers)
    with torch.no_grad():
        whole = model(input_ids=ids, labels=ids).loss.item()
        assert probe.mean_loss(probe.truncated_source(model, full), ids, 2) == pytest.approx(whole, rel=1e-6)
        cut = probe.truncated_source(model, 1)
        assert len(cut.get_decoder().layers) == cut.config.num_hidden_layers == 1
        assert probe.mean_loss(cut, ids, 2) == pytest.approx(_loss_through_layers(model, ids, 1),
                                                             rel=ids.numel() * torch.finfo(torch.float32).eps)
    assert len(model.get_decoder().layers) == model.config.num_hidden_layers == full
    with pytest.raises(ValueError, match="decoder layers"):
        probe.truncated_source(model, full + 1)


@needs_data
def test_probe_splits_are_disjoint_documents_of_one_corpus(probe, tiny_source):
    _, tokenizer = tiny_source
    splits, notes = probe.probe_splits(tokenizer, train_windows=64, dev_windows=4, held_out_windows=4, seq_len=SEQ_LEN)
    assert {k: tuple(v.shape) for k, v in splits.items()} == {"train": (64, SEQ_LEN), "dev": (4, SEQ_LEN),
                                                             "held_out": (4, SEQ_LEN)}
    ranges = [tuple(int(x) for x in notes[name].split(" (")[0].removeprefix("documents ").split(".."))
              for name in ("train", "dev", "held_out")]
    assert ranges[0][0] == 0 and ranges[0][1] + 1 == ranges[1][0] and ranges[1][1] + 1 == ranges[2][0]
    assert ranges[2][1] + 1 == notes["documents"]
    held = {tuple(w.tolist()) for w in torch.cat([splits["dev"], splits["held_out"]])}
    assert not held & {tuple(w.tolist()) for w in splits["train"]}
