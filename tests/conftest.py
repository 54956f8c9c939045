"""Shared test settings, and the helpers of the tests that run the ``unite-hf`` command line.

Helpers live here rather than in one test module so that no test module imports another
(``from conftest import run_cli``: ``tests/`` is on ``sys.path`` as it is for ``tiny_models``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from tiny_models import COMMON

from unite_hf.calibration import DATA_DIR_ENV, find_local_data_dir


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: minutes, not seconds; deselect with -m 'not slow'")
    # transformers' own markers, on the common tests test_transformers_common.py runs (registered in
    # transformers' conftest, which its sdist's tests do not bring along)
    for marker in ("accelerate_tests", "flash_attn_test", "flash_attn_3_test", "flash_attn_4_test", "torch_compile_test"):
        config.addinivalue_line("markers", f"{marker}: transformers' marker of the same name (its common tests)")


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models: one thread avoids oversubscribing the 2-core machine (several times faster here)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True, scope="session")
def _session_lock_dir(tmp_path_factory):
    """Folder-write locks (unite_hf.io.lock_dir) in a folder of this session, inherited by the processes
    tests start, rather than one file per temporary folder in the user's cache."""
    from unite_hf.io import LOCK_DIR_ENV

    previous = os.environ.get(LOCK_DIR_ENV)
    os.environ[LOCK_DIR_ENV] = str(tmp_path_factory.mktemp("unite-locks"))
    yield
    if previous is None:
        os.environ.pop(LOCK_DIR_ENV, None)
    else:
        os.environ[LOCK_DIR_ENV] = previous


# -- the command line -----------------------------------------------------------------------------

def _test_data_dir() -> Path | None:
    """The suite's data folder: ``$UNITE_HF_DATA_DIR`` when set, else the shared data folder beside this
    checkout (``../shared/data`` from the repository root, where the README's machines keep it)."""
    if os.environ.get(DATA_DIR_ENV):
        return find_local_data_dir()
    beside = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
    return beside.resolve() if beside.is_dir() else None


DATA = _test_data_dir()
"""The local data folder (WikiText-2, task files, the GPT-2 tokenizer), or None: tests that need it skip."""
DATA_DIR = DATA if DATA is not None else Path(__file__).resolve().parent.parent.parent / "shared" / "data"
"""DATA, or where it would be: for tests that name files inside it and skip when they are missing."""
if DATA is not None:
    # The library reads data only from data_dir= or $UNITE_HF_DATA_DIR (never a guess from the cwd): the
    # suite names its folder once, here, for every test and every CLI subprocess it starts.
    os.environ[DATA_DIR_ENV] = str(DATA)
needs_data = pytest.mark.skipif(DATA is None, reason="no data folder ($UNITE_HF_DATA_DIR or ../shared/data beside the checkout)")


def run_cli(*args: str, cwd: str | os.PathLike) -> subprocess.CompletedProcess:
    """``python -m unite_hf.cli *args`` in a subprocess, offline, with the data folder passed explicitly."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", DATA_DIR_ENV: str(DATA) if DATA else ""}
    return subprocess.run([sys.executable, "-m", "unite_hf.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def save_with_tokenizer(model: transformers.PreTrainedModel, path: Path) -> None:
    """Save ``model`` with the local GPT-2 tokenizer beside it, so the CLI can load both from ``path``."""
    model.save_pretrained(path)
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(DATA / "tokenizers/gpt2_tokenizer.json"),
                                                     eos_token="<|endoftext|>")
    tokenizer.save_pretrained(path)


def extract_tiny_mixtral_gene(tmp_path: Path) -> subprocess.CompletedProcess:
    """A tiny Mixtral with the GPT-2 tokenizer saved to tmp_path/src, and `unite-hf extract` run on it into
    tmp_path/gene (rank 3,8,8, WikiText-2); asserts the command succeeded."""
    config = transformers.MixtralConfig(**{**COMMON, "vocab_size": 50257}, intermediate_size=24, num_local_experts=4,
                                        num_experts_per_tok=2)
    save_with_tokenizer(transformers.MixtralForCausalLM(config), tmp_path / "src")
    result = run_cli("extract", "--source", str(tmp_path / "src"), "--calibration", "wikitext2", "--num-sequences", "4",
                     "--seq-len", "16", "--rank", "3,8,8", "--out", str(tmp_path / "gene"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return result
