"""Tests for unite_hf.training.tasks: the real local task files, Hub-schema datasets built by hand, the
real GPT-2 tokenizer, no network (the Hub loader is monkeypatched)."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
from conftest import DATA_DIR
import torch
from datasets import ClassLabel, Dataset, Features, Sequence, Value

from unite_hf.training import tasks as T
from unite_hf.training.tasks import (
    DERIVED_SPLIT_SEED,
    TASKS,
    TaskData,
    TaskDataCollator,
    TaskLoadError,
    format_classification_text,
    format_multiple_choice_texts,
    get_task_spec,
    load_task,
    normalize_dataset,
    tokenize_task,
)

TOKENIZER_FILE = DATA_DIR / "tokenizers" / "gpt2_tokenizer.json"

needs_data = pytest.mark.skipif(not (DATA_DIR / "arc_easy").is_dir(),
                                reason=f"local task data not found under {DATA_DIR}")
needs_tokenizer = pytest.mark.skipif(not TOKENIZER_FILE.is_file(), reason=f"{TOKENIZER_FILE} not found")


def local(name: str, split: str, **kwargs) -> TaskData:
    return load_task(name, split, DATA_DIR, source="local", **kwargs)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER_FILE), eos_token="<|endoftext|>")
    tok.pad_token = tok.eos_token
    return tok


# -- registry and argument errors ------------------------------------------------------------------
def test_registry_lists_the_nine_tasks_and_aliases():
    assert set(TASKS) == {"arc_easy", "arc_challenge", "openbookqa", "piqa", "hellaswag", "winogrande", "rte",
                          "boolq", "sst2"}
    assert get_task_spec("ARC-Easy").name == "arc_easy"
    assert get_task_spec("obqa").name == "openbookqa"
    assert get_task_spec("GLUE-RTE").name == "rte"
    assert get_task_spec("SST-2").name == "sst2"
    assert {n: s.num_choices for n, s in TASKS.items()} == {
        "arc_easy": 5, "arc_challenge": 5, "openbookqa": 4, "piqa": 2, "hellaswag": 4, "winogrande": 2, "rte": 2,
        "boolq": 2, "sst2": 2}
    assert not any(spec.hub_only for spec in TASKS.values())  # HellaSwag and Winogrande read local files too


def test_unknown_task_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown task 'squad'.*arc_challenge, arc_easy, boolq"):
        load_task("squad")


@pytest.mark.parametrize("fraction", [0, 0.0, -0.1, 1.5, 2])
def test_train_fraction_out_of_range(fraction):
    with pytest.raises(ValueError, match=r"train_fraction must be in \(0, 1\]"):
        load_task("arc_easy", "train", DATA_DIR, train_fraction=fraction)


def test_bad_split_and_source():
    with pytest.raises(ValueError, match="unknown split"):
        load_task("arc_easy", "dev")
    with pytest.raises(ValueError, match="source must be"):
        load_task("arc_easy", source="web")


# -- local files, checked against the raw files -----------------------------------------------------
@needs_data
def test_arc_easy_first_train_record_by_hand():
    task = local("arc_easy", "train")
    assert len(task) == 2251 and task.source == "local" and task.split == "train"
    assert task.origin.endswith("arc_easy/ARC-Easy-Train.jsonl")
    assert task.dataset[0] == {
        "id": "Mercury_7220990",
        "context": "Which factor will most likely cause a person to develop a fever?",
        "choices": ["a leg muscle relaxing after exercise", "a bacterial population in the bloodstream",
                    "several viral particles on the skin", "carbohydrates being digested in the stomach"],
        "label": 1,  # answerKey "B"
    }
    assert task.num_choices == 5 and task.id2label == {0: "A", 1: "B", 2: "C", 3: "D", 4: "E"}
    # the dataset mixes 3-, 4- and 5-choice items and says so
    assert any("2241 have 4, 6 have 3, 4 have 5" in note for note in task.notes)


@needs_data
def test_arc_numeric_labels_and_odd_choice_counts():
    by_id = {ex["id"]: ex for ex in local("arc_easy", "train").dataset}
    numeric = by_id["NYSEDREGENTS_2006_8_10"]  # labels "1"-"4", answerKey "3"
    assert numeric["context"] == "Rocks are classified as igneous, metamorphic, or sedimentary according to"
    assert numeric["choices"] == ["their color", "their shape", "how they formed", "the minerals they contain"]
    assert numeric["label"] == 2
    three_numeric = by_id["NYSEDREGENTS_2006_8_37"]  # labels "1"-"3", answerKey "3"
    assert three_numeric["choices"] == ["beneficial, only", "harmful, only", "beneficial or harmful"]
    assert three_numeric["label"] == 2
    three = by_id["WASL_2003_5_9"]  # 3 choices A-C, answerKey "A"
    assert len(three["choices"]) == 3 and three["label"] == 0
    five = by_id["TIMSS_1995_8_Q14"]  # 5 choices A-E, answerKey "E"
    assert five["choices"][4] == "a compound" and five["label"] == 4


@needs_data
@pytest.mark.parametrize("name, folder, files", [
    ("arc_easy", "arc_easy", {"train": "ARC-Easy-Train.jsonl", "validation": "ARC-Easy-Dev.jsonl",
                              "test": "ARC-Easy-Test.jsonl"}),
    ("arc_challenge", "arc_challenge", {"train": "ARC-Challenge-Train.jsonl", "validation": "ARC-Challenge-Dev.jsonl",
                                        "test": "ARC-Challenge-Test.jsonl"}),
    ("openbookqa", "openbookqa", {"train": "train.jsonl", "validation": "dev.jsonl", "test": "test.jsonl"}),
])
def test_ai2_every_record_matches_raw_file(name, folder, files):
    """Every normalised row against its raw line: stem, choice texts, and answerKey's position."""
    for split, file_name in files.items():
        raw = read_jsonl(DATA_DIR / folder / file_name)
        rows = local(name, split).dataset
        assert len(rows) == len(raw)
        for ex, rec in zip(rows, raw):
            keys = [c["label"] for c in rec["question"]["choices"]]
            assert ex["id"] == rec["id"]
            assert ex["context"] == rec["question"]["stem"].strip()
            assert ex["choices"] == [c["text"].strip() for c in rec["question"]["choices"]]
            assert keys[ex["label"]] == rec["answerKey"]


@needs_data
def test_piqa_labels_line_by_line_and_seeded_split():
    raw = read_jsonl(DATA_DIR / "piqa" / "valid.jsonl")
    labels = (DATA_DIR / "piqa" / "valid-labels.lst").read_text().split()
    assert len(raw) == len(labels) == 1838
    train, val = local("piqa", "train"), local("piqa", "validation")
    assert (len(train), len(val)) == (1470, 368)
    # the note the CLI prints says that the split was carved, with which seed
    for part in (train, val):
        assert any("no train split" in n and f"fixed seed {DERIVED_SPLIT_SEED}" in n and "1470" in n
                   and "368" in n for n in part.notes)
    # ids are row numbers of valid.jsonl: each row carries the label on the same line of valid-labels.lst
    for ex in list(train.dataset) + list(val.dataset):
        row = int(ex["id"])
        assert ex["context"] == raw[row]["goal"].strip()
        assert ex["choices"] == [raw[row]["sol1"].strip(), raw[row]["sol2"].strip()]
        assert ex["label"] == int(labels[row])
    train_ids, val_ids = set(train.dataset["id"]), set(val.dataset["id"])
    assert not train_ids & val_ids and train_ids | val_ids == {str(i) for i in range(1838)}
    # deterministic, and independent of the subsampling seed
    assert list(local("piqa", "validation", seed=7).dataset["id"]) == list(val.dataset["id"])
    with pytest.raises(FileNotFoundError, match=r"no local 'test' split.*available: train, validation"):
        local("piqa", "test")


@needs_data
def test_boolq_string_labels_and_seeded_split():
    raw = read_jsonl(DATA_DIR / "boolq" / "val.jsonl")
    assert {r["label"] for r in raw} == {"true", "false"}  # strings in this copy, not JSON booleans
    train, val = local("boolq", "train"), local("boolq", "validation")
    assert (len(train), len(val)) == (2616, 654)
    train_ids, val_ids = set(train.dataset["id"]), set(val.dataset["id"])
    assert not train_ids & val_ids and train_ids | val_ids == {str(r["idx"]) for r in raw}
    first = next(ex for ex in val.dataset if ex["id"] == "0")
    assert first["context"].startswith("Passage: Ethanol fuel -- All biomass goes through")
    assert first["context"].endswith("\nQuestion: does ethanol take more energy make that produces?")
    assert first["choices"] == ["no", "yes"] and first["label"] == 0  # "false"
    by_idx = {str(r["idx"]): r["label"] for r in raw}
    assert all(ex["label"] == (by_idx[ex["id"]] == "true") for ex in train.dataset)
    assert train.label_names == ("no", "yes")


@needs_data
def test_rte_label_mapping_and_quotes():
    train, dev = local("rte", "train"), local("rte", "validation")
    assert (len(train), len(dev)) == (2490, 277)
    assert train.dataset[0] == {
        "id": "0",
        "context": "Premise: No Weapons of Mass Destruction Found in Iraq Yet.\n"
                   "Hypothesis: Weapons of Mass Destruction Found in Iraq.",
        "choices": ["entailment", "not_entailment"],
        "label": 1,  # not_entailment, as in GLUE's ClassLabel
    }
    assert train.dataset[1]["label"] == 0  # entailment
    # a row with bare double quotes: tsv read without quote processing, fields intact
    row = next(ex for ex in train.dataset if ex["id"] == "12")
    assert 'said it found "extensive" additional damage' in row["context"]
    assert row["context"].endswith("Hypothesis: Valero Energy Corp. produces 250,000 barrels per day.")
    assert sum(list(train.dataset["label"])) == 1241  # not_entailment rows in train.tsv
    assert train.id2label == {0: "entailment", 1: "not_entailment"}


@needs_data
def test_sst2_counts_and_crlf_test_file():
    train = local("sst2", "train")
    assert len(train) == 67349
    assert train.dataset[0]["context"] == "hide new secretions from the parental units"
    assert sum(train.dataset.with_format("arrow")["label"].to_pylist()) == 37569  # positives
    assert len(local("sst2", "validation")) == 872
    test = local("sst2", "test")  # test_labeled.tsv has CRLF line ends
    assert len(test) == 1821 and test.dataset[0] == {
        "id": "0", "context": "uneasy mishmash of styles and genres .", "choices": ["negative", "positive"],
        "label": 0}
    assert set(test.dataset["label"]) == {0, 1}


@needs_data
def test_train_fraction_sizes_nested_and_seeded():
    full = local("arc_easy", "train")
    sizes = {f: len(local("arc_easy", "train", train_fraction=f, seed=1)) for f in (0.1, 0.25, 0.5, 1.0)}
    assert sizes == {0.1: 225, 0.25: 563, 0.5: 1126, 1.0: 2251}
    small = set(local("arc_easy", "train", train_fraction=0.1, seed=1).dataset["id"])
    half = local("arc_easy", "train", train_fraction=0.5, seed=1)
    assert small < set(half.dataset["id"]) <= set(full.dataset["id"])  # nested: a curve only adds data
    assert any("using 1126 of 2251" in n and "seed 1" in n for n in half.notes)
    assert set(local("arc_easy", "train", train_fraction=0.1, seed=2).dataset["id"]) != small
    assert list(local("arc_easy", "train", train_fraction=0.1, seed=1).dataset["id"]) == sorted(
        small, key=list(full.dataset["id"]).index)  # deterministic, file order kept
    # only the train split is subsampled
    assert len(local("arc_easy", "validation", train_fraction=0.1)) == 570
    # a carved train split is subsampled after carving
    assert len(local("piqa", "train", train_fraction=0.5)) == 735


# -- Winogrande and HellaSwag from their release files ---------------------------------------------
@needs_data
def test_winogrande_release_files_line_by_line():
    """train_xs.jsonl (the only training size here) and dev.jsonl, each row against its raw line and the
    label on the same line of the release's *-labels.lst. Before, Winogrande was Hub-only."""
    folder = DATA_DIR / "winogrande"
    for split, stem, n in (("train", "train_xs", 160), ("validation", "dev", 1267)):
        raw = read_jsonl(folder / f"{stem}.jsonl")
        labels = (folder / f"{stem}-labels.lst").read_text().split()
        task = local("winogrande", split)
        assert len(task) == len(raw) == len(labels) == n and task.origin.endswith(f"winogrande/{stem}.jsonl")
        for ex, rec, label in zip(task.dataset, raw, labels):
            assert ex["id"] == rec["qID"] and ex["context"] == rec["sentence"]
            assert ex["choices"] == [rec["option1"], rec["option2"]] and ex["label"] == int(label) - 1
    first = local("winogrande", "validation").dataset[0]
    assert first == {"id": "3FCO4VKOZ4BJQ6IFC0VAIBK4KTWE7U-2",
                     "context": "Sarah was a much better surgeon than Maria so _ always got the easier cases.",
                     "choices": ["Sarah", "Maria"], "label": 1}  # answer "2"
    assert local("winogrande", "validation").notes == []
    train = local("winogrande", "train")
    assert any("read from train_xs.jsonl (160 rows), not from train_xl.jsonl" in n and "winogrande_xl" in n
               for n in train.notes)
    with pytest.raises(FileNotFoundError, match=r"no local 'test' split.*test.jsonl\); available: train, validation"):
        local("winogrande", "test")


def test_winogrande_labels_files_and_training_sizes(tmp_path):
    """The largest training size present is read; *-labels.lst fills a missing answer, must agree with a
    given one and must have one line per record; test.jsonl (no answers, no labels file) is unlabelled."""
    folder = tmp_path / "winogrande"
    folder.mkdir()
    rows = [{"qID": f"q{i}", "sentence": f"Ann met Bo and _ waved {i}.", "option1": "Ann", "option2": "Bo"}
            for i in range(3)]

    def write(stem, answers, labels=None):
        (folder / f"{stem}.jsonl").write_text("".join(json.dumps({**r, **({"answer": a} if a else {})}) + "\n"
                                                      for r, a in zip(rows, answers)))
        if labels is not None:
            (folder / f"{stem}-labels.lst").write_text("".join(f"{x}\n" for x in labels))

    write("train_xs", ["1", "1", "1"])
    write("train_s", ["", "", ""], ["2", "1", "2"])  # answers only in the labels file
    write("dev", ["1", "2", "1"], ["1", "2", "1"])
    write("test", ["", "", ""])
    train = load_task("winogrande", "train", tmp_path, source="local")
    assert train.origin.endswith("train_s.jsonl") and list(train.dataset["label"]) == [1, 0, 1]
    assert any("read from train_s.jsonl (3 rows), not from train_xl.jsonl" in n for n in train.notes)
    assert list(load_task("winogrande", "validation", tmp_path, source="local").dataset["label"]) == [0, 1, 0]
    test = load_task("winogrande", "test", tmp_path, source="local")
    assert list(test.dataset["label"]) == [-1, -1, -1] and any("3 of 3 rows have no label" in n for n in test.notes)
    (folder / "dev-labels.lst").write_text("1\n1\n1\n")
    with pytest.raises(ValueError, match=r"dev.jsonl: record 2 \(qID q1\) has answer '2' but line 2 of dev-labels.lst"):
        load_task("winogrande", "validation", tmp_path, source="local")
    (folder / "dev-labels.lst").write_text("1\n2\n")
    with pytest.raises(ValueError, match="has 3 records but .*dev-labels.lst has 2 labels"):
        load_task("winogrande", "validation", tmp_path, source="local")
    (folder / "dev.jsonl").write_text(json.dumps({**rows[0], "sentence": "No blank here.", "answer": "1"}) + "\n")
    (folder / "dev-labels.lst").unlink()
    with pytest.raises(ValueError, match="has 0 '_' blanks, expected exactly one"):
        load_task("winogrande", "validation", tmp_path, source="local")


@needs_data
def test_hellaswag_partial_train_file_split_with_fixed_seed():
    """The only HellaSwag file here is the first 3368 rows of the release's train file: train and validation
    are carved from it with the fixed seed (80/20, as PIQA's and BoolQ's validation files), and the notes say
    so and name the file and the split its rows belong to. Before, HellaSwag was Hub-only."""
    raw = read_jsonl(DATA_DIR / "hellaswag" / "hellaswag_train_first3368.jsonl")
    assert len(raw) == 3368 and {r["split"] for r in raw} == {"train"}
    by_ind = {str(r["ind"]): r for r in raw}
    train, val = local("hellaswag", "train"), local("hellaswag", "validation")
    assert (len(train), len(val)) == (2694, 674)  # 674 = round(0.2 * 3368)
    train_ids, val_ids = set(train.dataset["id"]), set(val.dataset["id"])
    assert not train_ids & val_ids and train_ids | val_ids == set(by_ind)
    for ex in list(train.dataset) + list(val.dataset):
        rec = by_ind[ex["id"]]
        assert ex["context"] == rec["ctx"] and ex["choices"] == rec["endings"] and ex["label"] == rec["label"]
    for part in (train, val):
        assert any("no validation split" in n and f"fixed seed {DERIVED_SPLIT_SEED}" in n and "2694" in n
                   and "674" in n and "the train split" in n for n in part.notes)
        assert any("read from hellaswag_train_first3368.jsonl (3368 rows; every row's 'split' field says 'train')"
                   in n and "not from hellaswag_train.jsonl" in n for n in part.notes)
    assert list(local("hellaswag", "validation", seed=5).dataset["id"]) == list(val.dataset["id"])
    with pytest.raises(FileNotFoundError, match=r"no local 'test' split.*hellaswag_test.jsonl"):
        local("hellaswag", "test")


def test_hellaswag_release_files_and_their_split_field(tmp_path):
    """With the release's hellaswag_train.jsonl and hellaswag_val.jsonl nothing is carved and nothing noted;
    a file whose rows say another split, and two files for one pattern, are errors."""
    folder = tmp_path / "hellaswag"
    folder.mkdir()

    def rows(split, n):
        return "".join(json.dumps({"ind": i, "ctx": f"ctx {i}", "endings": ["a", "b", "c", "d"], "label": i % 4,
                                   "split": split}) + "\n" for i in range(n))

    (folder / "hellaswag_train.jsonl").write_text(rows("train", 5))
    (folder / "hellaswag_val.jsonl").write_text(rows("val", 3))
    train = load_task("hellaswag", "train", tmp_path, source="local")
    val = load_task("hellaswag", "validation", tmp_path, source="local")
    assert (len(train), len(val), train.notes, val.notes) == (5, 3, [], [])
    assert list(val.dataset["label"]) == [0, 1, 2]
    (folder / "hellaswag_val.jsonl").write_text(rows("train", 3))
    with pytest.raises(ValueError, match=r"hellaswag_val.jsonl is read as the validation split, but its rows' 'split' "
                                         r"field says 'train' \(3 rows\)"):
        load_task("hellaswag", "validation", tmp_path, source="local")
    (folder / "hellaswag_train.jsonl").unlink()
    (folder / "hellaswag_val.jsonl").unlink()
    (folder / "hellaswag_train_first3.jsonl").write_text(rows("train", 3))
    (folder / "hellaswag_train_first4.jsonl").write_text(rows("train", 4))
    with pytest.raises(ValueError, match=r"'hellaswag_train_first\*.jsonl' matches 2 files"):
        load_task("hellaswag", "train", tmp_path, source="local")


def test_a_data_folder_without_the_task_is_named(tmp_path, monkeypatch):
    """A data folder given without winogrande/ or hellaswag/: source='local' names the files looked for;
    'auto' falling back to the Hub says so in the notes (it used to skip the folder without a word)."""
    with pytest.raises(FileNotFoundError) as info:
        load_task("winogrande", "train", tmp_path, source="local")
    assert str(tmp_path / "winogrande" / "train_xl.jsonl") in str(info.value) and "train_xs.jsonl" in str(info.value)
    with pytest.raises(FileNotFoundError, match=r"hellaswag/hellaswag_train.jsonl \(or hellaswag_train_first\*"):
        load_task("hellaswag", "validation", tmp_path, source="local")

    monkeypatch.setattr(datasets, "load_dataset", lambda path, name=None, split=None, **kw: HUB_CASES["winogrande"][0])
    wino = load_task("winogrande", "validation", tmp_path)
    assert wino.source == "hub" and wino.origin == "hub:allenai/winogrande/winogrande_xl[validation]"
    assert any(f"not read from the data folder {tmp_path.resolve()}" in n and "dev.jsonl not found" in n
               and "read from the Hub instead" in n for n in wino.notes)

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(TaskLoadError, match=r"(?s)hellaswag_train.jsonl.*not found.*Falling back to the Hub failed"):
        load_task("hellaswag", "validation", tmp_path)


@needs_data
@needs_tokenizer
def test_winogrande_multiple_choice_fills_the_blank(tokenizer):
    """Each of the two sequences is the sentence with one option in place of '_'; the classification format
    keeps the blank and enumerates the options. A cut removes words before the blank, never the option or
    the rest of the sentence."""
    val = local("winogrande", "validation")
    first = TaskData(val.name, val.split, val.dataset.select([0]), val.spec, val.source, val.origin)
    mc = tokenize_task(first, tokenizer, "multiple_choice", max_length=64)
    assert [tokenizer.decode(x) for x in mc[0]["input_ids"]] == [
        "Sarah was a much better surgeon than Maria so Sarah always got the easier cases.",
        "Sarah was a much better surgeon than Maria so Maria always got the easier cases."]
    assert mc[0]["labels"] == 1
    assert format_multiple_choice_texts(first.dataset[0], blank="_")[1].endswith("so Maria always got the easier cases.")
    cls = tokenize_task(first, tokenizer, "classification", max_length=64)
    assert tokenizer.decode(cls[0]["input_ids"]) == (
        "Sarah was a much better surgeon than Maria so _ always got the easier cases.\nA. Sarah\nB. Maria\nAnswer:")
    # "Sarah| was| a| much| better| surgeon| than| Maria| so" + " Sarah| always| got| the| easier| cases|." = 9 + 7
    assert [len(x) for x in mc[0]["input_ids"]] == [16, 16]
    short = tokenize_task(first, tokenizer, "multiple_choice", max_length=12)
    assert [tokenizer.decode(x) for x in short[0]["input_ids"]] == [
        " better surgeon than Maria so Sarah always got the easier cases.",  # 16 - 12 = 4 cut: "Sarah was a much"
        " better surgeon than Maria so Maria always got the easier cases."]
    # a bare Dataset carries no spec: blank= asks for the substitution
    bare = tokenize_task(first.dataset, tokenizer, "multiple_choice", 64, blank="_")
    assert bare["input_ids"] == mc["input_ids"]
    assert tokenizer.decode(tokenize_task(first.dataset, tokenizer, "multiple_choice", 64)[0]["input_ids"][0]).endswith(
        "_ always got the easier cases.\nAnswer: Sarah")


# -- missing and empty data --------------------------------------------------------------------------
def test_missing_local_files_name_the_path(tmp_path, monkeypatch):
    monkeypatch.delenv("UNITE_HF_DATA_DIR", raising=False)
    with pytest.raises(FileNotFoundError) as info:
        load_task("arc_easy", "train", tmp_path, source="local")
    message = str(info.value)
    assert str(tmp_path / "arc_easy" / "ARC-Easy-Train.jsonl") in message
    assert "UNITE_HF_DATA_DIR" in message and "source='hub'" in message and "allenai/ai2_arc" in message
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        load_task("arc_easy", "train", tmp_path / "nope")


def test_hub_only_tasks_offline(monkeypatch):
    """A spec without a local folder (a user's Hub-only task) is read from the Hub only, and says so."""
    import dataclasses

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    hub_only = dataclasses.replace(TASKS["winogrande"], local_dir=None, local_files={})
    assert hub_only.hub_only
    with pytest.raises(FileNotFoundError, match="Winogrande has no local copy.*Hub only.*allenai/winogrande"):
        load_task(hub_only, "validation", source="local")
    with pytest.raises(TaskLoadError, match=r"(?s)Winogrande.*Hub-only.*allenai/winogrande \(winogrande_xl\).*reach"):
        load_task(hub_only, "validation")


@needs_data
def test_auto_falls_back_to_hub_and_reports_both(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(TaskLoadError) as info:
        load_task("rte", "train", tmp_path)
    assert str(tmp_path / "rte" / "train.tsv") in str(info.value) and "no network" in str(info.value)


def test_env_var_data_dir_and_empty_file(tmp_path, monkeypatch):
    folder = tmp_path / "sst2"
    folder.mkdir()
    (folder / "train.tsv").write_text("sentence\tlabel\na fine film \t1\ndull\t0\n")
    (folder / "dev.tsv").write_text("sentence\tlabel\n")
    monkeypatch.setenv("UNITE_HF_DATA_DIR", str(tmp_path))
    task = load_task("sst2", "train", source="local")
    assert list(task.dataset["context"]) == ["a fine film", "dull"] and list(task.dataset["label"]) == [1, 0]
    assert list(load_task("sst2", "train", folder, source="local").dataset["label"]) == [1, 0]  # the task folder itself
    with pytest.raises(ValueError, match=r"dev.tsv holds no records"):
        load_task("sst2", "validation", source="local")
    (folder / "dev.tsv").write_text("sentence\tlabel\ntoo\tmany\tfields\n")
    with pytest.raises(ValueError, match=r"dev.tsv:2: 3 fields"):
        load_task("sst2", "validation", source="local")


# -- the Hub schemas ---------------------------------------------------------------------------------
_AI2_CHOICES = Sequence({"text": Value("string"), "label": Value("string")})

HUB_CASES = {
    "arc_easy": (
        Dataset.from_dict({
            "id": ["Mercury_7175875", "NYSEDREGENTS_2006_8_10"],
            "question": [("An astronomer observes that a planet rotates faster after a meteorite impact. Which is the "
                          "most likely effect of this increase in rotation?"),
                         "Rocks are classified as igneous, metamorphic, or sedimentary according to"],
            "choices": [{"text": ["Planetary density will decrease.", "Planetary years will become longer.",
                                  "Planetary days will become shorter.", "Planetary gravity will become stronger."],
                         "label": ["A", "B", "C", "D"]},
                        {"text": ["their color", "their shape", "how they formed"], "label": ["1", "2", "3"]}],
            "answerKey": ["C", "3"],
        }, features=Features({"id": Value("string"), "question": Value("string"), "choices": _AI2_CHOICES,
                              "answerKey": Value("string")})),
        [{"id": "Mercury_7175875",
          "context": "An astronomer observes that a planet rotates faster after a meteorite impact. Which is the most "
                     "likely effect of this increase in rotation?",
          "choices": ["Planetary density will decrease.", "Planetary years will become longer.",
                      "Planetary days will become shorter.", "Planetary gravity will become stronger."], "label": 2},
         {"id": "NYSEDREGENTS_2006_8_10",
          "context": "Rocks are classified as igneous, metamorphic, or sedimentary according to",
          "choices": ["their color", "their shape", "how they formed"], "label": 2}],
    ),
    "openbookqa": (
        Dataset.from_dict({
            "id": ["7-980"], "question_stem": ["The sun is responsible for"],
            "choices": [{"text": ["puppies learning new tricks", "children growing up and getting old",
                                  "flowers wilting in a vase", "plants sprouting, blooming and wilting"],
                         "label": ["A", "B", "C", "D"]}],
            "answerKey": ["D"],
        }, features=Features({"id": Value("string"), "question_stem": Value("string"), "choices": _AI2_CHOICES,
                              "answerKey": Value("string")})),
        [{"id": "7-980", "context": "The sun is responsible for",
          "choices": ["puppies learning new tricks", "children growing up and getting old",
                      "flowers wilting in a vase", "plants sprouting, blooming and wilting"], "label": 3}],
    ),
    "piqa": (
        Dataset.from_dict({
            "goal": ["Make outdoor pillow.", "dresser"],
            "sol1": ["Blow into tin can and tie with rubber band.", "replace drawer with bobby pin "],
            "sol2": ["Blow into trash bag and tie with rubber band.", "finish, woodgrain with  bobby pin "],
            "label": [1, -1],  # -1: the Hub's unlabelled test split
        }, features=Features({"goal": Value("string"), "sol1": Value("string"), "sol2": Value("string"),
                              "label": ClassLabel(names=["0", "1"])})),
        [{"id": "0", "context": "Make outdoor pillow.", "choices": ["Blow into tin can and tie with rubber band.",
                                                                    "Blow into trash bag and tie with rubber band."],
          "label": 1},
         {"id": "1", "context": "dresser",
          "choices": ["replace drawer with bobby pin", "finish, woodgrain with  bobby pin"], "label": -1}],
    ),
    "hellaswag": (
        Dataset.from_dict({
            "ind": [24, 92],
            "activity_label": ["Roof shingle removal", "Clean and jerk"],
            "ctx_a": ["A man is sitting on a roof.", "A lady walks to a barbell."],
            "ctx_b": ["he", "she"],
            "ctx": ["A man is sitting on a roof. he", ""],  # second row: ctx missing, rebuilt from ctx_a + ctx_b
            "endings": [["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                         "is holding a rubik's cube.", "starts pulling up roofing on a roof."],
                        ["bends down and grabs the pole.", "swings and lands in her arms.",
                         "pulls a rope attached to the barbell.", "pulls the barbell forward."]],
            "source_id": ["activitynet~v_-JhWjGDPHMY", "activitynet~v_-lJS58hyo1c"],
            "split": ["val", "val"], "split_type": ["zeroshot", "zeroshot"],
            "label": ["3", "0"],
        }, features=Features({"ind": Value("int32"), "activity_label": Value("string"), "ctx_a": Value("string"),
                              "ctx_b": Value("string"), "ctx": Value("string"), "endings": Sequence(Value("string")),
                              "source_id": Value("string"), "split": Value("string"),
                              "split_type": Value("string"), "label": Value("string")})),
        [{"id": "24", "context": "A man is sitting on a roof. he",
          "choices": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                      "is holding a rubik's cube.", "starts pulling up roofing on a roof."], "label": 3},
         {"id": "92", "context": "A lady walks to a barbell. she",
          "choices": ["bends down and grabs the pole.", "swings and lands in her arms.",
                      "pulls a rope attached to the barbell.", "pulls the barbell forward."], "label": 0}],
    ),
    "winogrande": (
        Dataset.from_dict({
            "sentence": ["Sarah was a much better surgeon than Maria so _ always got the harder cases.",
                         "Sarah was a much better surgeon than Maria so _ always got the easier cases.",
                         "The trophy doesn't fit into the brown suitcase because the _ is too large."],
            "option1": ["Sarah", "Sarah", "trophy"], "option2": ["Maria", "Maria", "suitcase"],
            "answer": ["1", "2", ""],  # "": the Hub's unlabelled test split
        }, features=Features({"sentence": Value("string"), "option1": Value("string"), "option2": Value("string"),
                              "answer": Value("string")})),
        [{"id": "0", "context": "Sarah was a much better surgeon than Maria so _ always got the harder cases.",
          "choices": ["Sarah", "Maria"], "label": 0},
         {"id": "1", "context": "Sarah was a much better surgeon than Maria so _ always got the easier cases.",
          "choices": ["Sarah", "Maria"], "label": 1},
         {"id": "2", "context": "The trophy doesn't fit into the brown suitcase because the _ is too large.",
          "choices": ["trophy", "suitcase"], "label": -1}],
    ),
    "rte": (
        Dataset.from_dict({
            "sentence1": ["No Weapons of Mass Destruction Found in Iraq Yet.",
                          "A place of sorrow, after Pope John Paul II died, became a place of celebration."],
            "sentence2": ["Weapons of Mass Destruction Found in Iraq.",
                          "Pope Benedict XVI is the new leader of the Roman Catholic Church."],
            "label": [1, 0], "idx": [0, 1],
        }, features=Features({"sentence1": Value("string"), "sentence2": Value("string"),
                              "label": ClassLabel(names=["entailment", "not_entailment"]), "idx": Value("int32")})),
        [{"id": "0", "context": "Premise: No Weapons of Mass Destruction Found in Iraq Yet.\n"
                                "Hypothesis: Weapons of Mass Destruction Found in Iraq.",
          "choices": ["entailment", "not_entailment"], "label": 1},
         {"id": "1", "context": "Premise: A place of sorrow, after Pope John Paul II died, became a place of "
                                "celebration.\nHypothesis: Pope Benedict XVI is the new leader of the Roman Catholic "
                                "Church.",
          "choices": ["entailment", "not_entailment"], "label": 0}],
    ),
    "boolq": (  # google/boolq: the label is a bool called "answer"
        Dataset.from_dict({
            "question": ["do iran and afghanistan speak the same language",
                         "is windows movie maker part of windows essentials"],
            "answer": [True, False],
            "passage": ["Persian language -- Persian is spoken in Iran and Afghanistan.",
                        "Windows Movie Maker -- a discontinued video editing software."],
        }, features=Features({"question": Value("string"), "answer": Value("bool"), "passage": Value("string")})),
        [{"id": "0", "context": "Passage: Persian language -- Persian is spoken in Iran and Afghanistan.\n"
                                "Question: do iran and afghanistan speak the same language?",
          "choices": ["no", "yes"], "label": 1},
         {"id": "1", "context": "Passage: Windows Movie Maker -- a discontinued video editing software.\n"
                                "Question: is windows movie maker part of windows essentials?",
          "choices": ["no", "yes"], "label": 0}],
    ),
    "sst2": (
        Dataset.from_dict({
            "sentence": ["hide new secretions from the parental units ",
                         "it 's a charming and often affecting journey . "],
            "label": [0, 1], "idx": [0, 1],
        }, features=Features({"sentence": Value("string"), "label": ClassLabel(names=["negative", "positive"]),
                              "idx": Value("int32")})),
        [{"id": "0", "context": "hide new secretions from the parental units", "choices": ["negative", "positive"],
          "label": 0},
         {"id": "1", "context": "it 's a charming and often affecting journey .", "choices": ["negative", "positive"],
          "label": 1}],
    ),
}
HUB_CASES["arc_challenge"] = HUB_CASES["arc_easy"]

SUPER_GLUE_BOOLQ = Dataset.from_dict(
    {"question": ["do iran and afghanistan speak the same language"],
     "passage": ["Persian language -- Persian is spoken in Iran and Afghanistan."], "idx": [7], "label": [1]},
    features=Features({"question": Value("string"), "passage": Value("string"), "idx": Value("int32"),
                       "label": ClassLabel(names=["False", "True"])}))


@pytest.mark.parametrize("name", sorted(TASKS))
def test_hub_schema_normalises(name):
    raw, expected = HUB_CASES[name]
    out = normalize_dataset(name, raw)
    assert out.features == T.EXAMPLE_FEATURES
    assert out.to_list() == expected


def test_super_glue_boolq_schema():
    assert normalize_dataset("boolq", SUPER_GLUE_BOOLQ).to_list() == [{
        "id": "7", "context": "Passage: Persian language -- Persian is spoken in Iran and Afghanistan.\n"
                              "Question: do iran and afghanistan speak the same language?",
        "choices": ["no", "yes"], "label": 1}]


def test_hub_path_is_load_dataset_plus_normalise(monkeypatch):
    """load_task(source="hub") = datasets.load_dataset(<id>, <config>, split=...) + normalize_dataset; the next
    Hub id is tried when one fails (ybisk/piqa is a script dataset that recent `datasets` refuses)."""
    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        if path == "ybisk/piqa":
            raise RuntimeError("Dataset scripts are no longer supported")
        return {"allenai/ai2_arc": HUB_CASES["arc_easy"][0], "baber/piqa": HUB_CASES["piqa"][0],
                "Rowan/hellaswag": HUB_CASES["hellaswag"][0], "allenai/winogrande": HUB_CASES["winogrande"][0],
                "nyu-mll/glue": HUB_CASES[name][0] if name in ("rte", "sst2") else None,
                "google/boolq": HUB_CASES["boolq"][0]}[path]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    task = load_task("arc_challenge", "validation", source="hub")
    assert calls == [("allenai/ai2_arc", "ARC-Challenge", "validation")]
    assert task.source == "hub" and task.origin == "hub:allenai/ai2_arc/ARC-Challenge[validation]"
    assert task.dataset.to_list() == HUB_CASES["arc_easy"][1]

    calls.clear()
    piqa = load_task("piqa", "test", source="hub")
    assert calls == [("ybisk/piqa", None, "test"), ("baber/piqa", None, "test")]
    assert any("read from baber/piqa" in n and "scripts are no longer supported" in n for n in piqa.notes)
    assert any("1 of 2 rows have no label" in n for n in piqa.notes)

    # with no data folder, source="auto" goes to the Hub (HellaSwag and Winogrande as every other task)
    calls.clear()
    monkeypatch.delenv("UNITE_HF_DATA_DIR", raising=False)
    hellaswag = load_task("hellaswag", "validation", train_fraction=0.5)
    assert calls == [("Rowan/hellaswag", None, "validation")] and len(hellaswag) == 2 and hellaswag.notes == []
    wino = load_task("winogrande", "train", train_fraction=0.5, seed=0)
    assert calls[-1] == ("allenai/winogrande", "winogrande_xl", "train") and len(wino) == 2


# -- tokenisation and collation ----------------------------------------------------------------------
@needs_data
@needs_tokenizer
def test_classification_format_decodes_to_the_enumerated_prompt(tokenizer):
    task = local("arc_easy", "train")
    tok = tokenize_task(task, tokenizer, "classification", max_length=128)
    assert tok.column_names == ["input_ids", "attention_mask", "labels"] and len(tok) == 2251
    expected = ("Which factor will most likely cause a person to develop a fever?\n"
                "A. a leg muscle relaxing after exercise\n"
                "B. a bacterial population in the bloodstream\n"
                "C. several viral particles on the skin\n"
                "D. carbohydrates being digested in the stomach\n"
                "Answer:")
    assert format_classification_text(task.dataset[0]) == expected
    assert tokenizer.decode(tok[0]["input_ids"]) == expected and tok[0]["labels"] == 1
    assert tok[0]["attention_mask"] == [1] * len(tok[0]["input_ids"])
    # a 3-choice item enumerates only its 3 choices
    i = list(task.dataset["id"]).index("WASL_2003_5_9")
    assert tokenizer.decode(tok[i]["input_ids"]).endswith("\nC. A candle that is burning\nAnswer:")


@needs_data
@needs_tokenizer
def test_multiple_choice_format_pads_choices_to_k(tokenizer):
    task = local("arc_easy", "train")
    sub = TaskData(task.name, task.split, task.dataset.select([0, list(task.dataset["id"]).index("TIMSS_1995_8_Q14"),
                                                               list(task.dataset["id"]).index("WASL_2003_5_9")]),
                   task.spec, task.source, task.origin)
    tok = tokenize_task(sub, tokenizer, "multiple_choice", max_length=128)
    stem = "Which factor will most likely cause a person to develop a fever?"
    assert [tokenizer.decode(ids) for ids in tok[0]["input_ids"]] == [
        f"{stem}\nAnswer: a leg muscle relaxing after exercise",
        f"{stem}\nAnswer: a bacterial population in the bloodstream",
        f"{stem}\nAnswer: several viral particles on the skin",
        f"{stem}\nAnswer: carbohydrates being digested in the stomach",
        f"{stem}\nAnswer:",  # padding choice (ARC has k=5)
    ]
    assert [len(row) for row in tok["input_ids"]] == [5, 5, 5]
    assert tokenizer.decode(tok[1]["input_ids"][4]).endswith("\nAnswer: a compound") and tok[1]["labels"] == 4
    assert [tokenizer.decode(x).rsplit("\n", 1)[1] for x in tok[2]["input_ids"]][3:] == ["Answer:", "Answer:"]
    assert format_multiple_choice_texts(sub.dataset[2], 5)[3] == "Which object below is gaining stored energy?\nAnswer:"
    # asking for k=4 drops the 5-choice item instead of padding
    assert len(tokenize_task(sub, tokenizer, "multiple_choice", 128, num_choices=4)) == 2


@needs_data
@needs_tokenizer
def test_long_contexts_are_cut_from_the_left_keeping_question_and_answers(tokenizer):
    val = local("boolq", "validation")
    first = val.dataset.select([list(val.dataset["id"]).index("0")])
    cls = tokenize_task(first, tokenizer, "classification", max_length=64)
    text = tokenizer.decode(cls[0]["input_ids"])
    assert len(cls[0]["input_ids"]) <= 64
    assert text.endswith("than producing gasoline.\nQuestion: does ethanol take more energy make that produces?"
                         "\nA. no\nB. yes\nAnswer:")
    assert first[0]["context"].endswith(text[: -len("\nA. no\nB. yes\nAnswer:")])  # a clean suffix of the context
    right_rows = tokenize_task(first, tokenizer, "classification", 64, truncation_side="right")
    right = tokenizer.decode(right_rows[0]["input_ids"])
    assert right.startswith("Passage: Ethanol fuel --") and right.endswith("\nA. no\nB. yes\nAnswer:")
    mc = tokenize_task(first, tokenizer, "multiple_choice", max_length=32)
    a, b = (tokenizer.decode(x) for x in mc[0]["input_ids"])
    assert all(len(x) <= 32 for x in mc[0]["input_ids"])
    assert a.endswith("\nAnswer: no") and b.endswith("\nAnswer: yes") and a[: -2] == b[: -3]  # same context cut
    whole = tokenize_task(val, tokenizer, "classification", max_length=96)
    assert max(map(len, whole["input_ids"])) <= 96


@needs_tokenizer
def test_cuts_are_counted_in_the_notes_by_hand(tokenizer):
    """"one| two| three| four| five| six" (6 GPT-2 tokens) + "\\n|A|.| yes|\\n|B|.| no|\\n|Answer|:" (11) = 17:
    at max_length=15 two context tokens go; at 11 the whole context; at 10 the answer part cannot fit."""
    data = Dataset.from_dict({"id": ["0"], "context": ["one two three four five six"], "choices": [["yes", "no"]],
                              "label": [0]}, features=T.EXAMPLE_FEATURES)
    task = TaskData("boolq", "validation", data, TASKS["boolq"], "local", "by hand")
    tok = tokenize_task(task, tokenizer, "classification", max_length=15)
    assert tokenizer.decode(tok[0]["input_ids"]) == " three four five six\nA. yes\nB. no\nAnswer:"
    assert task.notes == ["BoolQ validation (classification, max_length=15): 1 of 1 items were cut to fit, their "
                          "context losing 2 tokens (mean 2.0, 2 in all) at the left. The answer part is never cut; "
                          "max_length=17 would keep every item whole."]
    tokenize_task(task, tokenizer, "classification", max_length=15)
    assert len(task.notes) == 1  # the same note is not added twice
    tok = tokenize_task(task, tokenizer, "classification", max_length=11)
    assert tokenizer.decode(tok[0]["input_ids"]) == "\nA. yes\nB. no\nAnswer:"
    assert "losing 6 tokens" in task.notes[-1] and "1 of them lost their whole context" in task.notes[-1]
    # at 10 not even the answer part fits: it is kept whole anyway (11 tokens), and the notes say so
    tok = tokenize_task(task, tokenizer, "classification", max_length=10)
    assert tokenizer.decode(tok[0]["input_ids"]) == "\nA. yes\nB. no\nAnswer:" and len(tok[0]["input_ids"]) == 11
    assert task.notes[-1] == ("BoolQ validation (classification, max_length=10): for 1 of 1 items the answer part (the "
                              "enumerated choices and the final 'Answer:') alone is longer than max_length, up to 11 "
                              "tokens. It is never cut, so these items are their answer part alone, without any "
                              "context, and longer than max_length. Use max_length >= 11 to keep them within it, or "
                              "format='multiple_choice' (one choice per sequence).")
    right = tokenize_task(data, tokenizer, "classification", 15, truncation_side="right")  # a bare Dataset: logged
    assert tokenizer.decode(right[0]["input_ids"]) == "one two three four\nA. yes\nB. no\nAnswer:"


@needs_data
@needs_tokenizer
def test_hellaswag_choices_and_answer_are_never_cut(tokenizer):
    """At max_length=128, 252 of the 2694 HellaSwag train items here are too long, and for 44 of them the four
    endings plus "Answer:" alone take more than 128 GPT-2 tokens. Before, those 44 lost their context and were
    cut inside ending D, "Answer:" gone, without a word. Now every sequence ends with its whole answer part and
    begins inside its context, the 44 are their answer part alone, and the notes count exactly the cut items,
    their lost tokens and the 44."""
    train = local("hellaswag", "train")
    suffixes = ["".join(f"\n{'ABCD'[i]}. {e}" for i, e in enumerate(ex["choices"])) + "\nAnswer:" for ex in train.dataset]
    suffix_lengths = [len(ids) for ids in tokenizer(suffixes)["input_ids"]]
    full_lengths = [len(ids) for ids in tokenizer([ex["context"] + s for ex, s in zip(train.dataset, suffixes)])["input_ids"]]
    over = [n for n in suffix_lengths if n > 128]
    assert (len(over), max(over)) == (44, 182)

    rows = tokenize_task(train, tokenizer, "classification", max_length=128)
    cuts, lost_all = [], 0
    for ex, suffix, n_suffix, ids in zip(train.dataset, suffixes, suffix_lengths, rows["input_ids"]):
        text = tokenizer.decode(ids)
        assert text.endswith(suffix)  # the four endings and "Answer:", whole
        assert len(ids) <= 128 or (len(ids) == n_suffix > 128 and text == suffix)
        kept = text[: len(text) - len(suffix)]
        assert ex["context"].endswith(kept)
        if kept != ex["context"]:
            cuts.append(len(tokenizer.encode(ex["context"])) - len(tokenizer.encode(kept)))
            lost_all += not kept.strip()
    assert len(cuts) == sum(1 for n in full_lengths if n > 128) == 252
    assert lost_all == sum(1 for n in suffix_lengths if n >= 128)  # no room left for even one context token
    assert (f"HellaSwag train (classification, max_length=128): 252 of 2694 items were cut to fit, their context "
            f"losing {min(cuts)}-{max(cuts)} tokens (mean {sum(cuts) / 252:.1f}, {sum(cuts)} in all) at the left; "
            f"{lost_all} of them lost their whole context. The answer part is never cut; "
            f"max_length={max(full_lengths)} would keep every item whole.") in train.notes
    assert any(n.startswith("HellaSwag train (classification, max_length=128): for 44 of 2694 items the answer part")
               and "up to 182 tokens" in n and "max_length >= 182" in n for n in train.notes)
    # one ending per sequence: the multiple-choice format holds HellaSwag at 128
    mc = tokenize_task(local("hellaswag", "validation"), tokenizer, "multiple_choice", max_length=128)
    assert max(len(x) for row in mc["input_ids"] for x in row) <= 128


@needs_data
@needs_tokenizer
@pytest.mark.parametrize("side", ["right", "left"])
def test_collator_pads_both_formats_for_last_token_pooling(tokenizer, side):
    tokenizer.padding_side = side
    try:
        task = local("openbookqa", "validation")
        task.dataset = task.dataset.select(range(4))
        collator = TaskDataCollator(tokenizer)
        answer_colon = tokenizer.encode(":")[0]
        for fmt in ("classification", "multiple_choice"):
            rows = tokenize_task(task, tokenizer, fmt, max_length=128)
            batch = collator([rows[i] for i in range(4)])
            ids, mask = batch["input_ids"], batch["attention_mask"]
            assert batch["labels"].tolist() == list(task.dataset["label"]) and batch["labels"].dtype == torch.long
            flat_rows = [r for row in rows["input_ids"] for r in row] if fmt == "multiple_choice" else rows["input_ids"]
            longest = max(map(len, flat_rows))
            assert ids.shape == ((4, 4, longest) if fmt == "multiple_choice" else (4, longest))
            flat_ids, flat_mask = ids.reshape(-1, longest), mask.reshape(-1, longest)
            for seq, m, orig in zip(flat_ids, flat_mask, flat_rows):
                n = len(orig)
                assert int(m.sum()) == n
                real = seq[:n] if side == "right" else seq[longest - n:]
                pads = seq[n:] if side == "right" else seq[: longest - n]
                assert real.tolist() == orig and set(pads.tolist()) <= {tokenizer.pad_token_id}
            # last-token pooling as the models do it: the last real token, whatever the padding side
            positions = torch.arange(longest)
            last = (positions * flat_mask).argmax(-1)
            picked = flat_ids[torch.arange(len(flat_ids)), last]
            if fmt == "classification":
                assert (picked == answer_colon).all()  # every prompt ends on "Answer:"
            else:
                assert picked.tolist() == [r[-1] for r in flat_rows]
        padded8 = TaskDataCollator(tokenizer, pad_to_multiple_of=8)([rows[0], rows[1]])
        assert padded8["input_ids"].shape[-1] % 8 == 0
    finally:
        tokenizer.padding_side = "right"


@needs_tokenizer
def test_collator_errors(tokenizer):
    from transformers import PreTrainedTokenizerFast

    bare = PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER_FILE), eos_token="<|endoftext|>")
    with pytest.raises(ValueError, match="no pad token"):
        TaskDataCollator(bare)([{"input_ids": [1, 2], "labels": 0}])
    with pytest.raises(ValueError, match="different numbers of choices"):
        TaskDataCollator(tokenizer)([{"input_ids": [[1], [2]], "labels": 0}, {"input_ids": [[1]], "labels": 0}])
    with pytest.raises(ValueError, match="format must be"):
        tokenize_task(normalize_dataset("sst2", HUB_CASES["sst2"][0]), tokenizer, "seq2seq")


@needs_tokenizer
def test_hub_schema_examples_tokenise(tokenizer):
    """The Hub path feeds the same tokeniser: HellaSwag in both formats, from its Hub schema."""
    data = normalize_dataset("hellaswag", HUB_CASES["hellaswag"][0])
    cls = tokenize_task(data, tokenizer, "classification", 64)
    assert tokenizer.decode(cls[0]["input_ids"]) == (
        "A man is sitting on a roof. he\nA. is using wrap to wrap a pair of skis.\nB. is ripping level tiles off.\n"
        "C. is holding a rubik's cube.\nD. starts pulling up roofing on a roof.\nAnswer:")
    mc = tokenize_task(data, tokenizer, "multiple_choice", 64)
    assert tokenizer.decode(mc[1]["input_ids"][3]) == (
        "A lady walks to a barbell. she\nAnswer: pulls the barbell forward.")
    batch = TaskDataCollator(tokenizer)(list(mc))
    assert batch["input_ids"].shape[:2] == (2, 4) and batch["labels"].tolist() == [3, 0]


def test_piqa_official_train_file_is_used_when_present(tmp_path):
    """With PIQA's full release (train.jsonl + train-labels.lst) nothing is carved; a label count that does not
    match the jsonl is an error, not a silent misalignment."""
    folder = tmp_path / "piqa"
    folder.mkdir()
    rows = [{"goal": f"goal {i}", "sol1": "a", "sol2": "b"} for i in range(3)]
    for stem in ("train", "valid"):
        (folder / f"{stem}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (folder / f"{stem}-labels.lst").write_text("1\n0\n1\n")
    train = load_task("piqa", "train", tmp_path, source="local")
    val = load_task("piqa", "validation", tmp_path, source="local")
    assert len(train) == len(val) == 3 and train.notes == [] and list(val.dataset["label"]) == [1, 0, 1]
    (folder / "valid-labels.lst").write_text("1\n0\n")
    with pytest.raises(ValueError, match="has 3 records but .*valid-labels.lst has 2 labels"):
        load_task("piqa", "validation", tmp_path, source="local")
