"""tools.sources: upcycled and native Mixtral sources, built with tiny budgets on a tiny local text."""

import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MixtralForCausalLM

from tolerances import assert_close_eps
from tools.sources import build_native, build_upcycled, gpt2_tokenizer, load_source
from tools.sources.__main__ import main as cli_main
from tools.sources.cache import REPORT_FILE
from unite_hf.calibration import find_local_data_dir

DATA = find_local_data_dir()
pytestmark = pytest.mark.skipif(DATA is None or not (DATA / "tokenizers" / "gpt2_tokenizer.json").is_file(),
                                reason="needs the GPT-2 tokenizer of the shared data folder")
TINY_TRAIN = dict(seq_len=16, batch_size=2, num_held_out=2, show_progress=False)
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
