"""Fault injection: real processes killed, disks filled and writers raced over one gene folder.

Every run asserts that the path holds, file for file, the complete old gene or the complete new one
(compared by SHA-256 with reference saves, which saving makes reproducible), and that it loads.

One helper process (imports unite_hf once) forks a writer per trial, so a kill is a real ``SIGKILL``
of a process in the middle of ``save_pretrained``: no ``finally`` blocks, no cleanup, like ``kill -9``.
Gene A carries a tokenizer, gene B none: a mix (B's tensors with A's tokenizer) would be seen.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_moe

from unite_hf import UniteGene, extract_universal_knowledge
from unite_hf.io import ArtifactWriteError, clean_stale

CALIBRATION = torch.randint(0, 96, (4, 12), generator=torch.Generator().manual_seed(1))
KILLS = 20  # the probe's count
CONCURRENT_ROUNDS = 20  # two writers per round (the probe ran 40 trials)

# the helper: JSON commands on stdin, JSON replies on stdout
HELPER = r'''
import json, os, resource, signal, sys, time
import torch
torch.set_num_threads(1)
from unite_hf import UniteGene
from unite_hf.io import ArtifactWriteError, clean_stale
genes = {}

def fork_save(gene, path, fsize=None):
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the writer
        os.close(read)
        code, message = 0, ""
        try:
            if fsize is not None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
            genes[gene].save_pretrained(path)
        except ArtifactWriteError as err:
            code, message = 3, str(err)
        except BaseException as err:
            code, message = 4, repr(err)
        os.write(write, message.encode()[:4000])
        os._exit(code)
    os.close(write)
    return pid, read

def finish(pid, read):
    _, status = os.waitpid(pid, 0)
    message = os.read(read, 4096).decode()
    os.close(read)
    killed = os.WIFSIGNALED(status)
    return {"killed": killed, "exit": None if killed else os.WEXITSTATUS(status), "message": message}

for line in sys.stdin:
    cmd = json.loads(line)
    op = cmd["op"]
    if op == "load":
        genes[cmd["name"]] = UniteGene.from_pretrained(cmd["path"])
        genes[cmd["name"]].save_pretrained(cmd["scratch"])  # lazy imports done here, not in every writer
        reply = {"ok": True, "pid": os.getpid()}
    elif op == "save_here":  # in this process: an independent process for the reproducibility check
        genes[cmd["gene"]].save_pretrained(cmd["path"])
        reply = {"ok": True}
    elif op == "save":
        start = time.perf_counter()
        reply = finish(*fork_save(cmd["gene"], cmd["path"], cmd.get("fsize")))
        reply["elapsed"] = time.perf_counter() - start
    elif op == "kill":
        pid, read = fork_save(cmd["gene"], cmd["path"])
        time.sleep(cmd["delay"])
        os.kill(pid, signal.SIGKILL)  # a no-op on a finished writer (it is not reaped yet)
        reply = finish(pid, read)
    elif op == "race":
        writers = [fork_save(gene, cmd["path"]) for gene in cmd["genes"]]
        reply = {"results": [finish(pid, read) for pid, read in writers]}
    print(json.dumps(reply), flush=True)
'''


class Helper:
    """The helper process, driven line by line."""

    def __init__(self, cwd: Path) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", HELPER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True, cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1"})

    def __call__(self, **cmd) -> dict:
        self.process.stdin.write(json.dumps(cmd) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        assert line, "the helper process died"
        return json.loads(line)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def folder_hashes(path: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``path``."""
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def tiny_tokenizer():
    """A word-level tokenizer built here (no download), saved with gene A."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, 96)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]")


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    """Reference saves of gene A (Mixtral, a wide vocabulary so that a save takes some milliseconds,
    with a tokenizer) and gene B (OLMoE, no tokenizer), and the helper process holding both."""
    root = tmp_path_factory.mktemp("refs")
    gene_a = extract_universal_knowledge(tiny_moe("mixtral", vocab_size=8_000), calibration=CALIBRATION,
                                         show_progress=False)
    gene_a.tokenizer = tiny_tokenizer()
    gene_b = extract_universal_knowledge(tiny_moe("olmoe", seed=1), calibration=CALIBRATION, show_progress=False)
    # every save in this module goes to a folder named "gene": the card names the folder it was saved to.
    # References are saves of reloaded genes: a reloaded tokenizer saves two more keys than a fresh one.
    gene_a.save_pretrained(root / "fresh" / "gene")
    gene_a = UniteGene.from_pretrained(root / "fresh" / "gene")
    gene_a.save_pretrained(root / "A" / "gene")
    gene_b.save_pretrained(root / "B" / "gene")
    helper = Helper(root)
    for name in ("A", "B"):
        helper(op="load", name=name, path=str(root / name / "gene"), scratch=str(root / "scratch" / name))
    yield {"A": folder_hashes(root / "A" / "gene"), "B": folder_hashes(root / "B" / "gene"), "helper": helper,
           "genes": (gene_a, gene_b)}
    helper.close()


def which_gene(path: Path, refs: dict) -> str:
    """'A' or 'B' when ``path`` holds exactly that gene, file for file, and it loads; fail otherwise."""
    hashes = folder_hashes(path)
    matches = [name for name in ("A", "B") if hashes == refs[name]]
    assert matches, f"{path} holds neither complete gene: {sorted(hashes)}"
    gene = UniteGene.from_pretrained(path)
    assert (gene.tokenizer is not None) == (matches[0] == "A") and gene.config.source_model_type == (
        "mixtral" if matches[0] == "A" else "olmoe")
    return matches[0]


def leftovers(parent: Path, name: str) -> list[str]:
    """Staged, old or temporary entries of ``parent / name`` still lying around."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}.") and not p.name.endswith(".lock"))


def test_kills_at_random_points_of_a_save_never_lose_the_old_gene(refs, tmp_path):
    helper = refs["helper"]
    path = tmp_path / "gene"
    assert helper(op="save", gene="A", path=str(path))["exit"] == 0
    timing = helper(op="save", gene="B", path=str(path))
    assert timing["exit"] == 0 and which_gene(path, refs) == "B"
    span = 1.5 * timing["elapsed"]  # kill points spread over the whole save and a little after it
    schedule = random.Random(13)
    outcomes = {"old": 0, "new": 0}
    current = "B"
    for _ in range(KILLS):
        new = "A" if current == "B" else "B"
        reply = helper(op="kill", gene=new, path=str(path), delay=schedule.uniform(0, span))
        held = which_gene(path, refs)  # complete A or complete B, never a mix
        assert held in (current, new)
        assert reply["killed"] or held == new  # a writer that finished left the new gene
        outcomes["old" if held == current else "new"] += 1
        current = held
    assert sum(outcomes.values()) == KILLS
    # the next save removes what the killed writers left (their pids are gone)
    assert helper(op="save", gene="A", path=str(path))["exit"] == 0
    assert which_gene(path, refs) == "A" and leftovers(tmp_path, "gene") == []
    print(f"\n{KILLS} kills: old gene kept {outcomes['old']}, new gene complete {outcomes['new']}")


def test_file_size_limit_in_the_writer_keeps_the_old_gene(refs, tmp_path):
    helper = refs["helper"]
    path = tmp_path / "gene"
    helper(op="save", gene="B", path=str(path))
    largest = max((path / name).stat().st_size for name in refs["B"])
    for limit in (0, 4096, largest // 2):  # fails on the first, a middle and the largest file
        reply = helper(op="save", gene="A", path=str(path), fsize=limit)
        assert reply["exit"] == 3, reply  # ArtifactWriteError, raised cleanly
        assert "could not write" in reply["message"] and "\n" not in reply["message"]
        assert which_gene(path, refs) == "B"
        assert leftovers(tmp_path, "gene") == []  # the failed writer removed its staging folder


def _mount_tiny_tmpfs(where: Path, size: str) -> bool:
    where.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    return result.returncode == 0


def test_disk_full_keeps_the_old_gene(refs, tmp_path):
    """ENOSPC on a tiny tmpfs (where one can be mounted: root in a container); skipped otherwise (the
    file-size-limit test above covers the same path with EFBIG)."""
    mount = tmp_path / "small"
    if not _mount_tiny_tmpfs(mount, "1m"):
        pytest.skip("cannot mount a tmpfs here")
    try:
        gene_a, gene_b = refs["genes"]
        gene_b.save_pretrained(mount / "gene")  # B fits; A (8k-token embeddings, 2 MB) does not fit beside it
        with pytest.raises(ArtifactWriteError) as caught:
            gene_a.save_pretrained(mount / "gene")
        assert caught.value.errno == errno.ENOSPC and "No space left" in str(caught.value)
        assert which_gene(mount / "gene", refs) == "B" and leftovers(mount, "gene") == []
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_concurrent_writers_leave_one_complete_gene_and_readers_never_see_a_mix(refs, tmp_path):
    helper = refs["helper"]
    path = tmp_path / "gene"
    helper(op="save", gene="A", path=str(path))
    seen, errors, stop = {"A": 0, "B": 0}, [], threading.Event()

    def reader() -> None:  # loads while the writers swap the folder
        while not stop.is_set():
            try:
                gene = UniteGene.from_pretrained(path)
                seen["A" if gene.config.source_model_type == "mixtral" else "B"] += 1
            except Exception as err:  # noqa: BLE001 - any failure to load is what this test looks for
                errors.append(repr(err))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        finals = []
        for _ in range(CONCURRENT_ROUNDS):
            reply = helper(op="race", genes=["A", "B"], path=str(path))
            assert [r["exit"] for r in reply["results"]] == [0, 0], reply
            finals.append(which_gene(path, refs))
    finally:
        stop.set()
        thread.join()
    assert errors == [] and sum(seen.values()) > 0
    assert leftovers(tmp_path, "gene") == []
    print(f"\n{CONCURRENT_ROUNDS} races: final A {finals.count('A')}, B {finals.count('B')}; "
          f"{sum(seen.values())} concurrent loads, all complete")


def test_same_gene_gives_the_same_bytes_in_another_process(refs, tmp_path):
    gene_a, _ = refs["genes"]
    gene_a.save_pretrained(tmp_path / "here" / "gene")
    refs["helper"](op="save_here", gene="A", path=str(tmp_path / "there" / "gene"))
    assert folder_hashes(tmp_path / "here" / "gene") == folder_hashes(tmp_path / "there" / "gene") == refs["A"]


def test_stale_leftovers_are_cleaned_but_a_live_writers_are_not(refs, tmp_path):
    gene_a, gene_b = refs["genes"]
    path = tmp_path / "gene"
    gene_b.save_pretrained(path)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    try:
        stale = [tmp_path / f".gene.tmp-{dead_pid}-0a1b2c3d", tmp_path / f".gene.{dead_pid}.0a1b2c3d.tmp"]
        live = [tmp_path / f".gene.tmp-{sleeper.pid}-0a1b2c3d", tmp_path / f".gene.{sleeper.pid}.0a1b2c3d.tmp"]
        for folder in (stale[0], live[0]):
            folder.mkdir()
            (folder / "gene.safetensors").write_bytes(b"\0" * 1000)
        for file in (stale[1], live[1]):
            file.write_bytes(b"\0" * 1000)
        legacy = path / ".gene.safetensors.k3j4h5.tmp"  # what older versions left inside the folder
        legacy.write_bytes(b"\0" * 1000)
        gene_a.save_pretrained(path)
        assert which_gene(path, refs) == "A"
        assert not any(p.exists() for p in stale) and all(p.exists() for p in live)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_crash_between_the_two_renames_of_the_fallback_swap_is_undone(refs, tmp_path):
    """Where renameat2(RENAME_EXCHANGE) is missing the swap takes two renames; a kill between them
    leaves the old gene at .gene.old-<pid>-...: the next save (or load through it) puts it back."""
    gene_a, _ = refs["genes"]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gene_a.save_pretrained(tmp_path / "saved" / "gene")
    os.rename(tmp_path / "saved" / "gene", tmp_path / f".gene.old-{int(dead.stdout)}-0a1b2c3d")
    clean_stale(tmp_path / "gene")
    assert which_gene(tmp_path / "gene", refs) == "A"


def test_cli_write_failure_is_one_line_exit_2_and_keeps_the_old_gene(refs, tmp_path):
    """`unite-hf extract` past the file-size limit: no traceback, exit code 2, the old gene intact."""
    source = tmp_path / "src"
    model = tiny_moe("mixtral")
    model.save_pretrained(source)
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(source)
    refs["genes"][1].save_pretrained(tmp_path / "gene")  # the old gene: B
    donor = tmp_path / "donor"  # a gene of this source: its Fisher lets the CLI skip calibration
    extract_universal_knowledge(model, calibration=CALIBRATION, show_progress=False).save_pretrained(donor)
    limit = 20_000  # above the streamed spill files (9 kB), below source_weights.safetensors (about 60 kB)

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = subprocess.run(
        [sys.executable, "-m", "unite_hf.cli", "extract", "--source", str(source), "--importance", str(donor),
         "--out", str(tmp_path / "gene"), "--rank", "2"],
        cwd=tmp_path, capture_output=True, text=True, preexec_fn=limited, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and "could not write" in error_lines[0] and "File too large" in error_lines[0]
    assert which_gene(tmp_path / "gene", refs) == "B"
