"""Tests for unite_hf.calibration: real GPT-2 tokenizer, real WikiText-2 file, no network."""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from pathlib import Path

import pytest
from conftest import DATA_DIR
import torch

from unite_hf import calibration as calib
from unite_hf.calibration import (
    CORPUS_ALIASES,
    DEFAULT_CALIBRATION,
    CalibrationLoadError,
    CalibrationSet,
    find_local_data_dir,
    load_calibration,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
WIKITEXT = DATA_DIR / "wikitext2" / "wikitext2_raw_test_hf_joined.txt"
TOKENIZER_FILE = DATA_DIR / "tokenizers" / "gpt2_tokenizer.json"
EOS = 50256  # <|endoftext|> in GPT-2

pytestmark = pytest.mark.skipif(
    not (WIKITEXT.is_file() and TOKENIZER_FILE.is_file()),
    reason=f"local data not found under {DATA_DIR} (need wikitext2 file and GPT-2 tokenizer)",
)


# --------------------------------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok():
    """GPT-2 tokenizer with its eos token declared (the bare tokenizer file declares none)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER_FILE), eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def tok_no_eos():
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER_FILE))


def reference_stream(docs: list[str], tokenizer, eos: int | None) -> list[int]:
    """Independent tokenization: each stripped non-empty doc, eos between docs."""
    out: list[int] = []
    kept = [d.strip() for d in docs if d.strip()]
    for i, d in enumerate(kept):
        if i and eos is not None:
            out.append(eos)
        out.extend(tokenizer.encode(d, add_special_tokens=False))
    return out


def wikitext_docs() -> list[str]:
    text = WIKITEXT.read_text(encoding="utf-8").replace("\r\n", "\n")
    return re.split(r"\n\s*?\n", text)


@pytest.fixture(scope="module")
def wiki_stream(tok) -> torch.Tensor:
    return torch.tensor(reference_stream(wikitext_docs(), tok, EOS))


def assert_rows_are_slices(ids: torch.Tensor, stream: torch.Tensor) -> None:
    """Each row of ids equals stream[s : s + T] for some offset s (found by unfold + compare)."""
    T = ids.shape[1]
    windows = stream.unfold(0, T, 1)  # [L - T + 1, T] view
    for row in ids:
        # candidates share the first token; compare those fully
        cand = torch.nonzero(windows[:, 0] == row[0]).flatten()
        assert any(torch.equal(windows[c], row) for c in cand.tolist()), "row is not a slice of the stream"


# --------------------------------------------------------------------------------------------------
# Registry and data dir
# --------------------------------------------------------------------------------------------------
def test_registry_and_default():
    assert DEFAULT_CALIBRATION == "wikitext2"
    hub_id, config, split, local = CORPUS_ALIASES["wikitext2"]
    assert (hub_id, config, split, local) == (
        "Salesforce/wikitext",
        "wikitext-2-raw-v1",
        "train",
        "wikitext2/wikitext2_raw_test_hf_joined.txt",
    )
    assert CORPUS_ALIASES["simplebooks"].local_path == "simplebooks/simplebooks92_valid.txt"
    assert isinstance(CORPUS_ALIASES["wikitext2"], tuple) and CORPUS_ALIASES["wikitext2"][0] == "Salesforce/wikitext"


def test_find_local_data_dir_only_explicit_locations(monkeypatch, tmp_path):
    """data_dir, else $UNITE_HF_DATA_DIR, else nothing: never ../shared/data guessed from the cwd or the package."""
    monkeypatch.delenv("UNITE_HF_DATA_DIR", raising=False)
    monkeypatch.chdir(REPO_ROOT)  # ../shared/data exists from here: it must not be picked up
    assert find_local_data_dir() is None
    assert find_local_data_dir(DATA_DIR) == DATA_DIR
    assert find_local_data_dir(str(tmp_path)) == tmp_path.resolve()
    with pytest.raises(FileNotFoundError, match="missing is not a directory"):
        find_local_data_dir(tmp_path / "missing")
    monkeypatch.setenv("UNITE_HF_DATA_DIR", str(tmp_path))
    assert find_local_data_dir() == tmp_path.resolve()
    assert find_local_data_dir(DATA_DIR) == DATA_DIR  # the argument wins over the variable
    monkeypatch.setenv("UNITE_HF_DATA_DIR", str(tmp_path / "missing"))
    with pytest.warns(UserWarning, match="UNITE_HF_DATA_DIR=.*missing is not a directory"):
        assert find_local_data_dir() is None
    monkeypatch.setenv("UNITE_HF_DATA_DIR", "")
    assert find_local_data_dir() is None


# --------------------------------------------------------------------------------------------------
# Each input kind, with value checks
# --------------------------------------------------------------------------------------------------
def test_alias_wikitext2_local(tok, wiki_stream, monkeypatch):
    monkeypatch.delenv("UNITE_HF_DATA_DIR", raising=False)  # the data_dir argument alone
    cs = load_calibration("wikitext2", tok, num_sequences=16, seq_len=128, seed=0, show_progress=False,
                          data_dir=DATA_DIR)
    assert isinstance(cs, CalibrationSet)
    assert cs.input_ids.shape == (16, 128) and cs.input_ids.dtype == torch.long
    assert cs.num_sequences == len(cs) == 16 and cs.seq_len == 128 and cs.seed == 0
    assert cs.name == "wikitext2 (local: wikitext2/wikitext2_raw_test_hf_joined.txt)"  # no machine-specific path
    assert_rows_are_slices(cs.input_ids, wiki_stream)
    # the stream is the size we expect from the real file (~280k GPT-2 tokens)
    assert 250_000 < wiki_stream.numel() < 320_000


def test_default_is_wikitext2(tok):
    cs = load_calibration(tokenizer=tok, num_sequences=2, seq_len=32, show_progress=False)
    assert cs.name.startswith("wikitext2 (local:")


def test_alias_via_env_data_dir(tok, monkeypatch, tmp_path):
    (tmp_path / "wikitext2").mkdir()
    f = tmp_path / "wikitext2" / "wikitext2_raw_test_hf_joined.txt"
    f.write_text("alpha beta gamma delta\n\nepsilon zeta eta theta iota kappa\n")
    monkeypatch.setenv("UNITE_HF_DATA_DIR", str(tmp_path))
    cs = load_calibration("wikitext2", tok, num_sequences=3, seq_len=4, show_progress=False)
    assert cs.name.startswith("wikitext2 (local:")  # the rows below prove which file was read
    stream = torch.tensor(reference_stream(["alpha beta gamma delta", "epsilon zeta eta theta iota kappa"], tok, EOS))
    assert_rows_are_slices(cs.input_ids, stream)


def test_text_file_exact(tok, tmp_path):
    # CRLF, whitespace-only separator lines, leading/trailing blank lines
    f = tmp_path / "corpus.txt"
    f.write_bytes(b"\r\n  Hello world.\r\nSecond line.\r\n \r\n\r\nAnother document here.\r\n\r\n")
    stream = reference_stream(["Hello world.\nSecond line.", "Another document here."], tok, EOS)
    T = len(stream) - 1
    with pytest.warns(UserWarning, match="overlap"):
        cs = load_calibration(str(f), tok, num_sequences=5, seq_len=T, seed=3, show_progress=False)
    # the file's name, its documents and their hash: never its folder (genes publish this name; issue 22)
    docs = ["Hello world.\nSecond line.", "Another document here."]
    digest = hashlib.sha256(json.dumps(docs, ensure_ascii=False).encode("utf-8")).hexdigest()
    assert cs.name == f"corpus.txt (local file, 2 documents, sha256 {digest})"
    assert str(tmp_path) not in cs.name
    # L = T + 1 -> only offset 0 is possible: every row is exactly stream[:T]
    expected = torch.tensor([stream[:T]] * 5)
    assert torch.equal(cs.input_ids, expected)
    assert EOS in cs.input_ids[0].tolist()


def test_text_file_pathlike_and_no_blank_lines(tok, tmp_path):
    """A file without any blank line is one document per line (LAMBADA's layout), eos between lines."""
    lines = [f"line number {i} of a file without blank lines" for i in range(3000)]
    f = tmp_path / "noblank.txt"
    f.write_text("\n".join(lines) + "\n\n\n")  # trailing blank lines separate nothing
    assert calib._read_text_file(f) == lines
    cs = load_calibration(f, tok, num_sequences=8, seq_len=64, seed=1, show_progress=False)
    assert cs.input_ids.shape == (8, 64)
    stream = torch.tensor(reference_stream(lines, tok, EOS))
    assert all(EOS in row for row in cs.input_ids.tolist())  # 64 tokens always span a line end
    assert_rows_are_slices(cs.input_ids, stream)


def test_one_passage_per_line_file_by_hand(tok, tmp_path):
    """Two lines, no blank line: two documents, so the stream is tok(line 1) + [eos] + tok(line 2)."""
    f = tmp_path / "two.txt"
    f.write_bytes(b"  The cat sat.\r\nA dog ran far away.\r\n")
    stream = (tok.encode("The cat sat.", add_special_tokens=False) + [EOS]
              + tok.encode("A dog ran far away.", add_special_tokens=False))
    assert len(stream) == 4 + 1 + 6  # "The| cat| sat|." and "A| dog| ran| far| away|." (GPT-2)
    cs = load_calibration(f, tok, num_sequences=1, seq_len=len(stream) - 1, show_progress=False)
    assert cs.input_ids.tolist() == [stream[:-1]]


def test_one_corpus_gives_the_same_windows_however_it_is_passed(tok, tmp_path):
    """Real passages (the first 400 of WikiText-2's file, ~30k tokens) as a list, as a file with one per line
    (LAMBADA's layout) and as a blank-line-separated file: the same documents, stream and windows. Before,
    the one-per-line file was one document with no eos between its passages."""
    passages = [d.strip() for d in wikitext_docs() if d.strip()][:400]
    assert all("\n" not in p for p in passages)
    per_line, blank_sep = tmp_path / "per_line.txt", tmp_path / "blank_sep.txt"
    per_line.write_text("\n".join(passages) + "\n", encoding="utf-8")
    blank_sep.write_text("\n\n".join(passages) + "\n", encoding="utf-8")
    kwargs = dict(num_sequences=32, seq_len=128, seed=5, show_progress=False)
    from_list = load_calibration(passages, tok, **kwargs)
    stream = torch.tensor(reference_stream(passages, tok, EOS))
    assert int((stream == EOS).sum()) == 399
    assert_rows_are_slices(from_list.input_ids, stream)
    for path in (per_line, blank_sep):
        assert calib._read_text_file(path) == passages
        assert torch.equal(load_calibration(path, tok, **kwargs).input_ids, from_list.input_ids), path.name


def test_wikitext2_windows_unchanged_by_the_line_rule(tok):
    """WikiText-2's file separates paragraphs with blank lines: its documents are still the blank-line blocks
    (2891), and its windows are bit for bit those of the blank-line-only reader (pinned before the change)."""
    import hashlib

    assert len(calib._read_text_file(WIKITEXT)) == 2891
    cs = load_calibration("wikitext2", tok, num_sequences=64, seq_len=128, seed=0, show_progress=False,
                          data_dir=DATA_DIR)
    assert cs.input_ids[0, :8].tolist() == [1267, 837, 290, 262, 16798, 38468, 15932, 3337]
    assert int(cs.input_ids.sum()) == 46868056
    assert hashlib.sha256(cs.input_ids.numpy().tobytes()).hexdigest() == (
        "1ea080407593219019e122a6a15d9b5b2a342213ada856f8af93487cbacc169a")
    # the tokenized WikiText-2 file has blocks of several lines: still one document per block
    tokenized = DATA_DIR / "wikitext2" / "wikitext2_v1_tokenized_test.txt"
    blocks = [b.strip() for b in re.split(r"\n\s*?\n", tokenized.read_text(encoding="utf-8")) if b.strip()]
    assert calib._read_text_file(tokenized) == blocks and len(blocks) == 1320


def test_list_of_strings_exact(tok):
    docs = ["The cat sat.", "   ", "", "A dog ran far away."]
    stream = reference_stream(docs, tok, EOS)
    assert stream == (
        tok.encode("The cat sat.", add_special_tokens=False) + [EOS] + tok.encode("A dog ran far away.", add_special_tokens=False)
    )
    T = len(stream) - 1
    with pytest.warns(UserWarning, match="overlap"):
        cs = load_calibration(docs, tok, num_sequences=2, seq_len=T, show_progress=False)
    # the documents as read (stripped, empties dropped), by number and hash: never their text (issue 22)
    digest = hashlib.sha256(json.dumps(["The cat sat.", "A dog ran far away."]).encode("utf-8")).hexdigest()
    assert cs.name == f"list of 4 strings (2 documents, sha256 {digest})"
    assert torch.equal(cs.input_ids, torch.tensor([stream[:T]] * 2))


def test_list_without_eos_token(tok_no_eos):
    docs = ["one two three", "four five six"]
    stream = reference_stream(docs, tok_no_eos, None)
    assert len(stream) == 6
    cs = load_calibration(docs, tok_no_eos, num_sequences=1, seq_len=5, show_progress=False)
    assert cs.input_ids.tolist() == [stream[:5]]


def test_list_values_and_seeds(tok):
    docs = [f"Document {i}: " + "some words here and there " * 5 for i in range(40)]
    stream = torch.tensor(reference_stream(docs, tok, EOS))
    a = load_calibration(docs, tok, num_sequences=6, seq_len=20, seed=0, show_progress=False)
    b = load_calibration(docs, tok, num_sequences=6, seq_len=20, seed=0, show_progress=False)
    c = load_calibration(docs, tok, num_sequences=6, seq_len=20, seed=1, show_progress=False)
    assert torch.equal(a.input_ids, b.input_ids)
    assert not torch.equal(a.input_ids, c.input_ids)
    assert_rows_are_slices(a.input_ids, stream)
    assert_rows_are_slices(c.input_ids, stream)
    # offsets follow the documented generator recipe exactly
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, stream.numel() - 20, (6,), generator=g)
    assert torch.equal(a.input_ids, torch.stack([stream[s : s + 20] for s in starts.tolist()]))


def test_wikitext_seeds(tok, wiki_stream):
    a = load_calibration("wikitext2", tok, num_sequences=4, seq_len=64, seed=7, show_progress=False)
    b = load_calibration("wikitext2", tok, num_sequences=4, seq_len=64, seed=7, show_progress=False)
    c = load_calibration("wikitext2", tok, num_sequences=4, seq_len=64, seed=8, show_progress=False)
    assert torch.equal(a.input_ids, b.input_ids) and not torch.equal(a.input_ids, c.input_ids)
    assert_rows_are_slices(c.input_ids, wiki_stream)


def test_dataset_input(tok):
    import datasets

    ds = datasets.Dataset.from_dict(
        {"id": [1, 2, 3, 4], "text": ["First row of text.", "  ", "Second real row.", "Third row, the last."]}
    )
    stream = reference_stream(list(ds["text"]), tok, EOS)
    with pytest.warns(UserWarning, match="overlap"):
        cs = load_calibration(ds, tok, num_sequences=3, seq_len=len(stream) - 1, show_progress=False)
    assert cs.input_ids.shape == (3, len(stream) - 1) and cs.input_ids.dtype == torch.long
    assert torch.equal(cs.input_ids, torch.tensor([stream[:-1]] * 3))
    assert "text" in cs.name


def test_dataset_column_detection(tok):
    import datasets

    ds = datasets.Dataset.from_dict({"label": [0, 1], "sentence": ["Good movie indeed.", "Bad movie."]})
    stream = reference_stream(["Good movie indeed.", "Bad movie."], tok, EOS)
    cs = load_calibration(ds, tok, num_sequences=1, seq_len=len(stream) - 1, show_progress=False)
    assert cs.input_ids.tolist() == [stream[:-1]]
    ambiguous = datasets.Dataset.from_dict({"a": ["x y z"], "b": ["u v w"]})
    with pytest.raises(ValueError, match=r"text_column.*\['a', 'b'\]"):
        load_calibration(ambiguous, tok, num_sequences=1, seq_len=2, show_progress=False)
    cs_b = load_calibration(ambiguous, tok, num_sequences=1, seq_len=2, text_column="b", show_progress=False)
    assert cs_b.input_ids.tolist() == [tok.encode("u v w", add_special_tokens=False)[:2]]
    with pytest.raises(ValueError, match="not a column"):
        load_calibration(ambiguous, tok, num_sequences=1, seq_len=2, text_column="nope", show_progress=False)


def test_jsonl_file(tok, tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text('{"body": "Json line one here."}\n{"body": "Json line two here."}\n')
    stream = reference_stream(["Json line one here.", "Json line two here."], tok, EOS)
    with pytest.warns(UserWarning, match="overlap"):
        cs = load_calibration(f, tok, num_sequences=2, seq_len=len(stream) - 1, show_progress=False)
    assert torch.equal(cs.input_ids, torch.tensor([stream[:-1]] * 2))


def test_tensor_input():
    ids = torch.randint(0, 1000, (5, 7), dtype=torch.int32)
    cs = load_calibration(ids, num_sequences=99, seq_len=3)  # N, T come from the tensor
    assert cs.input_ids.shape == (5, 7) and cs.input_ids.dtype == torch.long
    assert torch.equal(cs.input_ids, ids.long())
    assert cs.name == "input_ids tensor"
    assert [b.shape[0] for b in cs.batches(2)] == [2, 2, 1]
    assert torch.equal(torch.cat(list(cs.batches(2))), cs.input_ids)


def test_tensor_errors(tok):
    with pytest.raises(ValueError, match="integer dtype"):
        load_calibration(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="2D"):
        load_calibration(torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match="non-empty"):
        load_calibration(torch.zeros(0, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="non-empty"):
        load_calibration(torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="negative"):
        load_calibration(torch.tensor([[1, -2]]))
    with pytest.raises(ValueError, match="vocabulary size"):
        load_calibration(torch.tensor([[1, 50257]]), tok)


def test_calibration_set_passthrough_and_batches():
    cs = CalibrationSet(input_ids=torch.arange(20).view(5, 4), name="x", seed=0)
    assert load_calibration(cs) is cs
    batches = list(cs.batches(3))
    assert [b.tolist() for b in batches] == [cs.input_ids[:3].tolist(), cs.input_ids[3:].tolist()]
    assert len(list(cs.batches(10))) == 1
    with pytest.raises(ValueError, match="batch_size"):
        list(cs.batches(0))


# --------------------------------------------------------------------------------------------------
# Errors and warnings
# --------------------------------------------------------------------------------------------------
def test_empty_inputs(tok, tmp_path):
    import datasets

    with pytest.raises(ValueError, match="list is empty"):
        load_calibration([], tok)
    with pytest.raises(ValueError, match="is empty"):
        load_calibration(["", "  \n "], tok, show_progress=False)
    f = tmp_path / "empty.txt"
    f.write_text("\n\n   \n")
    with pytest.raises(ValueError, match="is empty"):
        load_calibration(f, tok, show_progress=False)
    with pytest.raises(ValueError, match="empty"):
        load_calibration(datasets.Dataset.from_dict({"text": []}), tok)
    with pytest.raises(ValueError, match="is empty"):
        load_calibration(datasets.Dataset.from_dict({"text": [" ", ""]}), tok, show_progress=False)


def test_too_few_tokens(tok):
    n = len(tok.encode("a short text", add_special_tokens=False))
    with pytest.raises(ValueError, match=rf"corpus has {n} tokens, need at least {n + 1}"):
        load_calibration(["a short text"], tok, num_sequences=1, seq_len=n, show_progress=False)
    # exactly seq_len + 1 tokens is enough
    load_calibration(["a short text"], tok, num_sequences=1, seq_len=n - 1, show_progress=False)


@pytest.mark.parametrize("kw", [{"num_sequences": 0}, {"num_sequences": -1}, {"seq_len": 0}, {"seq_len": -5}])
def test_bad_sizes(tok, kw):
    name = next(iter(kw))
    with pytest.raises(ValueError, match=f"{name} must be a positive int"):
        load_calibration(["some text here"], tok, show_progress=False, **kw)


def test_tokenizer_required(tmp_path):
    import datasets

    f = tmp_path / "t.txt"
    f.write_text("hello")
    for what in ("wikitext2", str(f), ["hello"], datasets.Dataset.from_dict({"text": ["hello"]})):
        with pytest.raises(ValueError, match="tokenizer is required"):
            load_calibration(what)


@pytest.mark.parametrize("bad", [42, 3.5, {"text": "x"}, None])
def test_unsupported_type(tok, bad):
    with pytest.raises(TypeError, match=type(bad).__name__):
        load_calibration(bad, tok)


def test_missing_paths(tok, tmp_path):
    with pytest.raises(FileNotFoundError):
        load_calibration(tmp_path / "nope.txt", tok)
    with pytest.raises(FileNotFoundError):
        load_calibration(str(tmp_path / "nope.txt"), tok)
    with pytest.raises(ValueError, match="directory"):
        load_calibration(str(tmp_path), tok)


def test_overlap_warning(tok):
    docs = ["word " * 50]
    L = len(reference_stream(docs, tok, EOS))
    with pytest.warns(UserWarning, match="overlap"):
        cs = load_calibration(docs, tok, num_sequences=10, seq_len=20, show_progress=False)
    assert cs.input_ids.shape == (10, 20) and 10 * 20 > L
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_calibration(docs, tok, num_sequences=2, seq_len=20, show_progress=False)


def test_no_max_length_warning(tok, capsys, caplog):
    from transformers import PreTrainedTokenizerFast

    small = PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER_FILE), eos_token="<|endoftext|>", model_max_length=64)
    long_doc = " ".join(f"w{i}" for i in range(2000))
    with caplog.at_level("WARNING"):
        cs = load_calibration([long_doc, long_doc], small, num_sequences=2, seq_len=128, show_progress=False)
    assert cs.input_ids.shape == (2, 128)
    assert "longer than the specified maximum" not in caplog.text + capsys.readouterr().err


def test_unreachable_hub_id(tok, monkeypatch):
    import datasets.config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    try:
        import huggingface_hub.constants as hub_constants

        monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    except ImportError:  # pragma: no cover
        pass
    with pytest.raises(CalibrationLoadError, match=r"nonexistent-user/nonexistent-dataset-xyz.*Hub may be unreachable"):
        load_calibration("nonexistent-user/nonexistent-dataset-xyz", tok, show_progress=False)


def test_alias_hub_fallback_error(tok, monkeypatch, tmp_path):
    """No local copy + offline Hub: the error names the local file it looked for and the env var."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("UNITE_HF_DATA_DIR", str(tmp_path))  # exists, but has no wikitext2 file
    with pytest.raises(CalibrationLoadError, match=r"(?s)Salesforce/wikitext.*wikitext2_raw_test_hf_joined\.txt.*UNITE_HF_DATA_DIR"):
        load_calibration("wikitext2", tok, show_progress=False)
    with pytest.raises(CalibrationLoadError, match=r"only available locally.*UNITE_HF_DATA_DIR"):
        load_calibration("simplebooks", tok, show_progress=False)
    monkeypatch.delenv("UNITE_HF_DATA_DIR")  # no data folder at all, even with ../shared/data beside the cwd
    monkeypatch.chdir(REPO_ROOT)
    with pytest.raises(CalibrationLoadError, match=r"only available locally.*data_dir=.*UNITE_HF_DATA_DIR"):
        load_calibration("simplebooks", tok, show_progress=False)


def test_simplebooks_alias_local(tok):
    cs = load_calibration("simplebooks", tok, num_sequences=4, seq_len=64, show_progress=False)
    assert cs.input_ids.shape == (4, 64) and "simplebooks (local:" in cs.name


def test_stream_matches_reference_exactly(tok, wiki_stream):
    """The whole internal stream (many tokenizer chunks, eos between docs) equals the reference."""
    docs = calib._read_text_file(WIKITEXT)
    assert len(docs) > 2 * calib._TOKENIZE_CHUNK_DOCS  # crosses chunk boundaries
    assert torch.equal(calib._tokenize_documents(docs, tok, show_progress=False), wiki_stream)
    # a huge single document is tokenized in pieces but equals its one-shot tokenization
    big = "\n".join(f"line number {i} of a file without blank lines" for i in range(3000))
    assert len(big) > calib._MAX_DOC_CHARS
    got = calib._tokenize_documents(["first doc", big], tok, show_progress=False)
    want = tok.encode("first doc", add_special_tokens=False) + [EOS] + tok.encode(big, add_special_tokens=False)
    assert got.tolist() == want


def test_progress_bar(tok, capsys):
    load_calibration(["some words here"] * 3, tok, num_sequences=1, seq_len=4, show_progress=True)
    assert "Tokenizing calibration corpus" in capsys.readouterr().err
    load_calibration(["some words here"] * 3, tok, num_sequences=1, seq_len=4, show_progress=False)
    assert "Tokenizing" not in capsys.readouterr().err
