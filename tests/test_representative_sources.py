"""tools.sources: upcycled, drop-upcycled and native Mixtral sources, built with tiny budgets on a tiny local text."""

import json
import math
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MixtralForCausalLM

from tolerances import assert_close_eps
from tools.sources import build_drop_upcycled, build_native, build_upcycled, drop_upcycle, gpt2_tokenizer, load_source
from tools.sources.__main__ import main as cli_main
from tools.sources import cache as sources_cache
from tools.sources.cache import REPORT_FILE, BuildOptions, cache_key
from tools.sources.upcycled import upcycle
from unite_hf.calibration import find_local_data_dir

DATA = find_local_data_dir()
pytestmark = pytest.mark.skipif(DATA is None or not (DATA / "tokenizers" / "gpt2_tokenizer.json").is_file(),
                                reason="needs the GPT-2 tokenizer of the shared data folder")
TINY_TRAIN = dict(seq_len=16, batch_size=2, num_held_out=2, num_threads=1, show_progress=False)
TINY_NATIVE = dict(hidden_size=32, num_layers=2, num_heads=2, num_experts=4, top_k=2, intermediate_size=32,
                   learning_rate=3e-3, **TINY_TRAIN)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    rng = random.Random(0)
    words = ("the cat dog bird saw ran near far house tree river old young small big quiet loud "
             "morning evening walked found a little girl boy and then home").split()
    paragraphs = [" ".join(rng.choice(words) for _ in range(60)) + "." for _ in range(40)]
    path = tmp_path_factory.mktemp("text") / "tiny.txt"
    path.write_text("\n\n".join(paragraphs), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer():
    return gpt2_tokenizer(DATA)


@pytest.fixture(scope="module")
def dense(tokenizer):
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # nontrivial norms too, so copying them matters
        for param in model.parameters():
            is_norm = param.dim() == 1
            param.copy_(torch.randn(param.shape, generator=gen) * (0.3 if is_norm else 0.1) + is_norm)
    return model


def _ids(vocab: int, shape=(2, 12)) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(1))


def _assert_reloads(model, folder):
    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert isinstance(reloaded, MixtralForCausalLM)
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_upcycled_before_training_is_the_dense_model(dense, tokenizer, text_file, tmp_path):
    folder = tmp_path / "up0"
    moe = build_upcycled(dense, tokenizer, num_experts=4, top_k=2, noise=0.0, max_steps=0, text_file=text_file,
                         cache_dir=folder, **TINY_TRAIN)
    assert isinstance(moe, MixtralForCausalLM)
    assert moe.config.num_local_experts == 4 and moe.config.intermediate_size == 48
    ids = _ids(dense.config.vocab_size)
    with torch.no_grad():  # independent check: the dense forward itself
        out = dense(ids, output_hidden_states=True)
        # float32 forwards that differ in how the FFN output is summed (top-k weights of copies): k = the
        # reductions along the way (per layer hidden + intermediate, then the head's hidden), each logit
        # a sum of |h| |W_head| terms
        k = dense.config.num_hidden_layers * (dense.config.hidden_size + dense.config.intermediate_size) \
            + dense.config.hidden_size
        head_terms = out.hidden_states[-1].abs() @ dense.lm_head.weight.abs().T
        assert_close_eps(moe(ids).logits, out.logits, k=k, scale=head_terms)
    report = moe.source_report
    assert report.steps == 0 and report.from_cache is False
    for proj in ("gate", "up", "down"):
        assert report.expert_cosine_before["mean"][proj] == pytest.approx(1.0, abs=1e-6)
    assert report.held_out_before["loss"] == pytest.approx(report.held_out_after["loss"], abs=1e-6)
    _assert_reloads(moe, folder)


def test_upcycled_trains_then_loads_from_cache(dense, tokenizer, text_file, tmp_path):
    folder = tmp_path / "up"
    settings = dict(num_experts=4, top_k=2, noise=0.01, max_steps=2, learning_rate=1e-3, text_file=text_file,
                    cache_dir=folder, **TINY_TRAIN)
    moe = build_upcycled(dense, tokenizer, **settings)
    report = moe.source_report
    assert report.steps == 2 and len(report.loss_curve) == 2
    assert report.train_loss_first == report.loss_curve[0] and report.train_loss_last == report.loss_curve[1]
    assert 0.99 < report.expert_cosine_before["mean"]["up"] < 1.0
    saved = json.loads((folder / REPORT_FILE).read_text())
    assert saved["settings_hash"] == report.settings_hash and saved["steps"] == 2
    _assert_reloads(moe, folder)

    weights = folder / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    again = build_upcycled(dense, tokenizer, **settings)
    assert again.source_report.from_cache is True
    assert again.source_report.train_seconds == report.train_seconds
    assert weights.stat().st_mtime_ns == mtime
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left
    with pytest.raises(ValueError, match="other settings"):
        build_upcycled(dense, tokenizer, **{**settings, "seed": 1})


def test_native_trains_from_scratch_and_caches_by_settings_hash(text_file, monkeypatch, tmp_path):
    monkeypatch.setenv("UNITE_HF_CACHE", str(tmp_path))
    model = build_native(max_steps=3, data_dir=DATA, text_file=text_file, **TINY_NATIVE)
    assert isinstance(model, MixtralForCausalLM)
    report = model.source_report
    folder = tmp_path / "sources" / f"native-{report.settings_hash}"
    assert report.path == str(folder.resolve())
    assert report.steps == 3 and report.train_loss_first > report.train_loss_last
    assert report.held_out_after["loss"] < report.held_out_before["loss"]
    for proj in ("gate", "up", "down"):  # independent random inits: nearly orthogonal experts
        assert abs(report.expert_cosine_before["mean"][proj]) < 0.1
    _assert_reloads(model, folder)

    loaded, tok, loaded_report = load_source(folder)
    assert len(tok) == model.config.vocab_size and loaded_report.loss_curve == report.loss_curve
    again = build_native(max_steps=3, data_dir=DATA, text_file=text_file, **TINY_NATIVE)
    assert again.source_report.from_cache and again.source_report.build_seconds == report.build_seconds


def test_cli_builds_a_native_source(text_file, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["native", "--out", str(out), "--data-dir", str(DATA), "--text-file", str(text_file), "--max-steps", "1",
            "--hidden-size", "32", "--num-layers", "1", "--num-heads", "2", "--num-experts", "2",
            "--intermediate-size", "16", "--seq-len", "16", "--batch-size", "2", "--num-held-out", "1", "--no-progress"]
    assert cli_main(args) == 0
    out_text = capsys.readouterr().out
    printed = json.loads(out_text[out_text.rindex('{\n "kind"'):])
    assert printed["kind"] == "native" and printed["path"] == str(out.resolve()) and "loss_curve" not in printed
    assert isinstance(AutoModelForCausalLM.from_pretrained(out), MixtralForCausalLM)
    assert json.loads((out / REPORT_FILE).read_text())["steps"] == 1


# -- reproducible builds ----------------------------------------------------------------------------

def _assert_same_weights(a, b):
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for name, tensor in state_a.items():
        assert tensor.dtype == state_b[name].dtype and torch.equal(tensor, state_b[name]), name


@pytest.mark.parametrize("kind", ["native", "drop_upcycled"])
def test_same_settings_give_bit_identical_builds_whatever_the_callers_threads(kind, dense, tokenizer, text_file,
                                                                              tmp_path):
    def build(folder):
        if kind == "native":
            return build_native(max_steps=3, data_dir=DATA, text_file=text_file, cache_dir=folder, **TINY_NATIVE)
        return build_drop_upcycled(dense, tokenizer, num_experts=4, top_k=2, max_steps=3, learning_rate=1e-3,
                                   text_file=text_file, cache_dir=folder, **TINY_TRAIN)

    ambient = torch.get_num_threads()
    models = []
    for threads in (1, 2):  # the caller's thread count must not matter: the build pins its own
        torch.set_num_threads(threads)
        try:
            models.append(build(tmp_path / f"{kind}{threads}"))
            assert torch.get_num_threads() == threads  # restored after the build
        finally:
            torch.set_num_threads(ambient)
    assert not torch.are_deterministic_algorithms_enabled()  # restored too
    first, second = models
    _assert_same_weights(first, second)
    _assert_same_weights(first, load_source(tmp_path / f"{kind}2")[0])  # and what was saved
    report_a, report_b = first.source_report, second.source_report
    assert report_a.steps == 3 and report_a.reproducible() == report_b.reproducible()
    assert report_a.torch_threads == 1 and report_a.determinism["num_threads"] == 1
    assert report_a.determinism["torch"] == torch.__version__ and report_a.determinism["deterministic_algorithms"]
    assert json.loads((tmp_path / f"{kind}1" / REPORT_FILE).read_text())["determinism"] == report_a.determinism


def test_cache_key_covers_the_thread_count_and_the_environment(monkeypatch):
    settings = dict(hidden_size=32)
    _, digest = cache_key(settings, BuildOptions(num_threads=1))
    assert cache_key(settings, BuildOptions(num_threads=1))[1] == digest
    assert cache_key(settings, BuildOptions(num_threads=2))[1] != digest
    assert cache_key(settings, BuildOptions(num_threads=1, seed=1))[1] != digest
    environment = sources_cache.build_environment()
    for key in ("torch", "transformers", "cpu_capability", "device", "build_version"):
        monkeypatch.setattr(sources_cache, "build_environment", lambda: {**environment, key: "other"})
        assert cache_key(settings, BuildOptions(num_threads=1))[1] != digest, key
    monkeypatch.undo()


# -- drop-upcycling ---------------------------------------------------------------------------------

def _dropped(moe, dense, layer):
    """Per expert, the parent's gate/up/down of that layer and the expert's, and which neurons differ."""
    mlp = dense.model.layers[layer].mlp
    experts = moe.model.layers[layer].mlp.experts
    inter = dense.config.intermediate_size
    parent = {"gate": mlp.gate_proj.weight.detach(), "up": mlp.up_proj.weight.detach(),
              "down": mlp.down_proj.weight.detach()}
    out = []
    for e in range(moe.config.num_local_experts):
        mine = {"gate": experts.gate_up_proj[e, :inter].detach(), "up": experts.gate_up_proj[e, inter:].detach(),
                "down": experts.down_proj[e].detach()}
        differ = {"gate": (mine["gate"] != parent["gate"]).any(dim=1), "up": (mine["up"] != parent["up"]).any(dim=1),
                  "down": (mine["down"] != parent["down"]).any(dim=0)}  # neurons are down's columns
        out.append((parent, mine, differ))
    return out


@pytest.mark.parametrize("drop_ratio", [0.5, 0.25])
def test_drop_upcycle_redraws_each_experts_own_neurons(dense, drop_ratio):
    moe = drop_upcycle(dense, num_experts=4, top_k=2, drop_ratio=drop_ratio, seed=0)
    inter = dense.config.intermediate_size
    num = round(drop_ratio * inter)
    assert num == drop_ratio * inter  # the fixture's width makes the fraction exact
    for layer in range(dense.config.num_hidden_layers):
        masks = []
        for parent, mine, differ in _dropped(moe, dense, layer):
            mask = differ["gate"]
            assert torch.equal(differ["up"], mask) and torch.equal(differ["down"], mask)  # the same neurons
            assert int(mask.sum()) == num  # exactly drop_ratio of the rows
            assert torch.equal(mine["gate"][~mask], parent["gate"][~mask])  # kept: the parent's, bit for bit
            assert torch.equal(mine["up"][~mask], parent["up"][~mask])
            assert torch.equal(mine["down"][:, ~mask], parent["down"][:, ~mask])
            for proj in ("gate", "up", "down"):
                drawn = (mine[proj][mask] if proj != "down" else mine[proj][:, mask]).double()
                std, mean = torch.std_mean(parent[proj].double())
                n = drawn.numel()
                # n draws from N(mean, std): the sample mean's standard error is std / sqrt(n), the
                # sample std's about std / sqrt(2 (n - 1)); 6 standard errors (p < 2e-9 each)
                assert abs(float(drawn.mean() - mean)) < 6 * float(std) / math.sqrt(n), (layer, proj)
                assert abs(float(drawn.std() - std)) < 6 * float(std) / math.sqrt(2 * (n - 1)), (layer, proj)
            masks.append(mask)
        for i in range(len(masks)):  # different experts drop different neurons
            for j in range(i + 1, len(masks)):
                assert not torch.equal(masks[i], masks[j]), (layer, i, j)
    again = drop_upcycle(dense, num_experts=4, top_k=2, drop_ratio=drop_ratio, seed=0)
    _assert_same_weights(moe, again)
    other = drop_upcycle(dense, num_experts=4, top_k=2, drop_ratio=drop_ratio, seed=1)
    assert not torch.equal(_dropped(other, dense, 0)[0][2]["gate"], _dropped(moe, dense, 0)[0][2]["gate"])


def test_drop_upcycle_at_ratio_zero_is_plain_upcycling(dense):
    _assert_same_weights(drop_upcycle(dense, num_experts=3, drop_ratio=0.0, seed=2),
                         upcycle(dense, num_experts=3, noise=0.0, seed=2))
    with pytest.raises(ValueError, match="drop_ratio"):
        drop_upcycle(dense, drop_ratio=1.5)


def test_build_drop_upcycled_reports_diverged_experts_and_the_parent(dense, tokenizer, text_file, tmp_path):
    folder = tmp_path / "drop"
    moe = build_drop_upcycled(dense, tokenizer, num_experts=4, top_k=2, max_steps=2, learning_rate=1e-3,
                              text_file=text_file, cache_dir=folder, **TINY_TRAIN)
    assert isinstance(moe, MixtralForCausalLM) and moe.config.intermediate_size == dense.config.intermediate_size
    report = moe.source_report
    assert report.kind == "drop_upcycled" and report.steps == 2 and report.settings["drop_ratio"] == 0.5
    assert report.extra["dropped_neurons_per_expert"] == dense.config.intermediate_size // 2
    for proj in ("gate", "up", "down"):
        # two experts share the quarter of neurons both kept, so about 0.25 (not 1 as plain upcycling)
        assert 0.1 < report.expert_cosine_before["mean"][proj] < 0.45, proj
    parent = report.extra["held_out_parent"]
    assert set(parent) == {"loss", "perplexity"} and math.isfinite(parent["loss"])
    assert report.held_out_before["loss"] != parent["loss"]  # re-drawn neurons change the function
    _assert_reloads(moe, folder)
    again = build_drop_upcycled(dense, tokenizer, num_experts=4, top_k=2, max_steps=2, learning_rate=1e-3,
                                text_file=text_file, cache_dir=folder, **TINY_TRAIN)
    assert again.source_report.from_cache


def test_cli_builds_a_drop_upcycled_source(dense, tokenizer, text_file, tmp_path, capsys):
    parent = tmp_path / "dense"
    dense.save_pretrained(parent)
    tokenizer.save_pretrained(parent)
    out = tmp_path / "cli"
    args = ["drop_upcycled", "--dense", str(parent), "--out", str(out), "--text-file", str(text_file),
            "--num-experts", "2", "--drop-ratio", "0.25", "--max-steps", "1", "--seq-len", "16", "--batch-size", "2",
            "--num-held-out", "1", "--num-threads", "1", "--no-progress"]
    assert cli_main(args) == 0
    out_text = capsys.readouterr().out
    printed = json.loads(out_text[out_text.rindex('{\n "kind"'):])
    assert printed["kind"] == "drop_upcycled" and printed["settings"]["drop_ratio"] == 0.25
    assert printed["settings"]["num_threads"] == 1 and printed["determinism"]["num_threads"] == 1
    assert isinstance(AutoModelForCausalLM.from_pretrained(out), MixtralForCausalLM)
