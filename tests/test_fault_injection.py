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
from hub_server import local_hub  # noqa: F401
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


# -- read-only file systems and names too long (issue 21, item 13) ----------------------------------------

def test_a_read_only_file_system_gives_one_clear_error_for_genes_and_targets(refs, tmp_path):
    """Regression: on a read-only file system the cleanup of the staging folder failed too (unlinking even a
    missing name gives EROFS), and its bare OSError, naming the hidden staging folder, replaced the
    ArtifactWriteError. A tmpfs holding gene B and a target is remounted read-only: both saves fail with one
    line that names the destination, and both folders keep their content."""
    from unite_hf import UniteForCausalLM

    gene_a, gene_b = refs["genes"]
    mount = tmp_path / "ro"
    if not _mount_tiny_tmpfs(mount, "8m"):
        pytest.skip("cannot mount a tmpfs here (the name-too-long test covers the same cleanup path)")
    try:
        target = UniteForCausalLM.from_gene(gene_b, num_hidden_layers=1, rank=4)
        gene_b.save_pretrained(mount / "gene")
        target.save_pretrained(mount / "target")
        before = folder_hashes(mount / "target")
        assert subprocess.run(["mount", "-o", "remount,ro", str(mount)], capture_output=True).returncode == 0
        for save, path in ((gene_a.save_pretrained, mount / "gene"), (target.save_pretrained, mount / "target")):
            with pytest.raises(ArtifactWriteError) as caught:
                save(path)
            message = str(caught.value)
            assert caught.value.errno == errno.EROFS and "Read-only file system" in message, message
            assert str(path) in message and ".tmp-" not in message and "\n" not in message
        assert which_gene(mount / "gene", refs) == "B" and folder_hashes(mount / "target") == before
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_name_too_long_for_the_staged_sibling_is_refused_before_anything_is_written(refs, tmp_path):
    """Regression: a 245-byte name passed check_gene_destination, so `unite-hf extract` failed only after the
    whole extraction, with a bare OSError that named the staging folder .{name}.tmp-{pid}-{token} (22 bytes
    longer than the name, past the file system's 255). Names are checked before anything is looked up or
    written, by the CLI before the source is looked at."""
    from unite_hf import UniteForCausalLM
    from unite_hf.gene import check_gene_destination

    gene_a, _ = refs["genes"]
    target = UniteForCausalLM.from_gene(gene_a, num_hidden_layers=1, rank=4)
    work = tmp_path / "work"
    work.mkdir()
    for path in (work / ("g" * 245), work / ("d" * 300) / "gene"):
        for attempt in (check_gene_destination, gene_a.save_pretrained, target.save_pretrained):
            with pytest.raises(ArtifactWriteError, match="bytes") as caught:
                attempt(path)
            message = str(caught.value)
            assert caught.value.errno == errno.ENAMETOOLONG and "\n" not in message and ".tmp-" not in message
    assert list(work.iterdir()) == []
    result = subprocess.run(
        [sys.executable, "-m", "unite_hf.cli", "extract", "--source", str(tmp_path / "no-such-model"),
         "--out", str(work / ("g" * 245))], cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "names of up to" in result.stderr and "no-such-model" not in result.stderr


# -- a Trainer killed while it swaps a checkpoint in (issue 21, item 14) ------------------------------------

TRAINER_STEPS, TRAINER_SAVE_EVERY = 6, 2

# trains a saved target with UniteTrainer, saving every 2 steps; the fault: a SIGKILL of this process at
# the moment a UNITE target swaps the staged folder of checkpoint-{kill_at} in (Trainer made the empty
# checkpoint-N folder before the model's save, and the staged copy lies beside it)
TRAINER_KILLED = r'''
import os, signal, sys, torch
torch.set_num_threads(1)
import unite_hf.io as io
from unite_hf import UniteForCausalLM
from unite_hf.training import UniteTrainer
from transformers import TrainingArguments
target, output_dir, kill_at, steps, every = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
swap = io._swap_in

def swap_or_die(staging, path):
    if path.name == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    swap(staging, path)

io._swap_in = swap_or_die
g = torch.Generator().manual_seed(0)
ids = (torch.randint(3, 90, (32, 1), generator=g) + torch.arange(8)) % 93 + 3
rows = [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": i.clone()} for i in ids]
args = TrainingArguments(output_dir=output_dir, max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-3,
                         save_strategy="steps", save_steps=every, report_to="none", use_cpu=True, disable_tqdm=True,
                         logging_strategy="no", seed=0, dataloader_num_workers=0)
UniteTrainer(model=UniteForCausalLM.from_pretrained(target), args=args, train_dataset=rows).train()
'''


def _counting_rows() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    ids = (torch.randint(3, 90, (32, 1), generator=g) + torch.arange(8)) % 93 + 3
    return [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": i.clone()} for i in ids]


def test_a_trainer_killed_while_swapping_a_checkpoint_in_resumes_from_the_last_complete_one(refs, tmp_path):
    """Regression: a SIGKILL of Trainer mid-checkpoint left an empty checkpoint-N/ beside the staged
    .checkpoint-N.tmp-... (1 kill in 4 at random points), and resume_from_checkpoint=True then picked it and
    failed ("Can't find a valid checkpoint"). A real Trainer process is killed as checkpoint-4 is swapped in;
    UniteTrainer resumes from checkpoint-2, the last complete one, and trains to the end (a plain Trainer,
    the control, still picks the empty folder); the next save of checkpoint-4 removes the staged leftover."""
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_utils import get_last_checkpoint

    from unite_hf import UniteForCausalLM
    from unite_hf.training import UniteTrainer

    target = UniteForCausalLM.from_gene(refs["genes"][1], num_hidden_layers=1, rank=4)
    target.save_pretrained(tmp_path / "target")
    out = tmp_path / "run"
    killed = subprocess.run([sys.executable, "-c", TRAINER_KILLED, str(tmp_path / "target"), str(out), "checkpoint-4",
                             str(TRAINER_STEPS), str(TRAINER_SAVE_EVERY)], capture_output=True, text=True, timeout=600,
                            cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert (out / "checkpoint-2" / "trainer_state.json").is_file() and list((out / "checkpoint-4").iterdir()) == []
    assert leftovers(out, "checkpoint-4"), sorted(p.name for p in out.iterdir())  # the staged copy, never swapped
    assert get_last_checkpoint(str(out)) == str(out / "checkpoint-4")  # what Trainer resumes from

    class Steps(TrainerCallback):
        def __init__(self):
            self.seen = []

        def on_step_end(self, args, state, control, **kwargs):
            self.seen.append(state.global_step)

    def trainer(cls, steps):
        args = TrainingArguments(output_dir=str(out), max_steps=TRAINER_STEPS, per_device_train_batch_size=4,
                                 learning_rate=1e-3, save_strategy="steps", save_steps=TRAINER_SAVE_EVERY,
                                 report_to="none", use_cpu=True, disable_tqdm=True, logging_strategy="no", seed=0,
                                 dataloader_num_workers=0)
        return cls(model=UniteForCausalLM.from_pretrained(tmp_path / "target"), args=args,
                   train_dataset=_counting_rows(), callbacks=[steps])

    with pytest.raises(Exception, match="checkpoint"):  # the control: Trainer resumes from the empty folder
        trainer(Trainer, Steps()).train(resume_from_checkpoint=True)
    steps = Steps()
    resumed = trainer(UniteTrainer, steps)
    resumed.train(resume_from_checkpoint=True)
    assert steps.seen == [3, 4, 5, 6] and resumed.state.global_step == TRAINER_STEPS
    assert (out / "checkpoint-4" / "trainer_state.json").is_file() and leftovers(out, "checkpoint-4") == []
    assert UniteForCausalLM.from_pretrained(out / "checkpoint-6").config.num_hidden_layers == 1


# -- pushes killed mid-way (issue 21, item 16) --------------------------------------------------------------

PUSH_KILLS = 10

# loads the genes once, then forks a pusher per command (a SIGKILL of it is a real kill -9 mid-push)
PUSHER = r'''
import json, os, signal, sys, time
import torch
torch.set_num_threads(1)
from unite_hf import UniteGene
import huggingface_hub  # imported here, not in every pusher
genes = {name: UniteGene.from_pretrained(path) for name, path in json.loads(sys.argv[1]).items()}
genes["A"].save_pretrained(sys.argv[2])  # the save path's lazy imports, done once
print("ready", flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            genes[cmd["gene"]].push_to_hub(cmd["repo"])
        except BaseException as err:
            os.write(2, repr(err).encode()[:2000])
            code = 4
        os._exit(code)
    if cmd.get("delay") is not None:
        time.sleep(cmd["delay"])
        os.kill(pid, signal.SIGKILL)  # a no-op on a finished pusher (not reaped yet)
    _, status = os.waitpid(pid, 0)
    killed = os.WIFSIGNALED(status)
    print(json.dumps({"killed": killed, "exit": None if killed else os.WEXITSTATUS(status), "pid": pid,
                      "elapsed": time.perf_counter() - start}), flush=True)
'''


def _staged_files(temp: Path) -> list[str]:
    return sorted(p.relative_to(temp).as_posix() for p in temp.rglob("*") if p.is_file())


def test_kills_during_pushes_leave_one_whole_gene_on_the_repo_and_no_copy_behind(refs, local_hub, tmp_path):
    """Regression: a SIGKILL during push_to_hub left the whole saved gene in $TMPDIR (8 kills in 10), never
    removed. Pushes stage in $TMPDIR/unite_hf-pushes-<uid>/.push.tmp-<pid>-<token>: what a killed push
    leaves, the next push (or save) removes. Each kill leaves the repo holding the old or the new gene,
    whole (one commit per push)."""
    import hashlib as _hashlib

    gene_a, gene_b = refs["genes"]
    paths = {"A": str(tmp_path / "A" / "gene"), "B": str(tmp_path / "B" / "gene")}
    gene_a.save_pretrained(paths["A"])
    gene_b.save_pretrained(paths["B"])
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {**os.environ, "TMPDIR": str(temp), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    pusher = subprocess.Popen([sys.executable, "-c", PUSHER, json.dumps(paths), str(tmp_path / "scratch" / "gene")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=tmp_path)

    def push(gene: str, delay: float | None = None) -> dict:
        pusher.stdin.write(json.dumps({"gene": gene, "repo": "me/gene", "delay": delay}) + "\n")
        pusher.stdin.flush()
        line = pusher.stdout.readline()
        assert line, "the pusher process died"
        return json.loads(line)

    def repo() -> dict[str, str]:
        return {name: _hashlib.sha256(data).hexdigest() for name, data in local_hub.files("me/gene").items()}

    try:
        assert pusher.stdout.readline().strip() == "ready"
        assert push("A")["exit"] == 0
        refs_on_hub = {"A": repo()}
        timing = push("B")
        assert timing["exit"] == 0
        refs_on_hub["B"] = repo()
        assert _staged_files(temp) == []
        span = 1.5 * timing["elapsed"]
        schedule, outcomes, copies_left, current = random.Random(21), {"old": 0, "new": 0}, 0, "B"
        for _ in range(PUSH_KILLS):
            new = "A" if current == "B" else "B"
            reply = push(new, delay=schedule.uniform(0, span))
            held = [name for name, files in refs_on_hub.items() if files == repo()]
            assert held in (["A"], ["B"]), sorted(local_hub.files("me/gene"))  # one gene, whole
            assert reply["killed"] or held == [new]
            outcomes["old" if held == [current] else "new"] += 1
            current = held[0]
            copies_left += bool(_staged_files(temp))  # what this kill left, until the next push
        assert push(current)["exit"] == 0  # the next push removes what the killed ones left
        assert _staged_files(temp) == [], _staged_files(temp)[:10]
    finally:
        pusher.stdin.close()
        pusher.wait(timeout=60)
    print(f"\n{PUSH_KILLS} kills during pushes: repo kept the old gene {outcomes['old']}, got the new one "
          f"{outcomes['new']}; a killed push left its staged copy {copies_left} times, removed by the next push")


def test_a_target_push_and_a_folder_save_remove_what_killed_pushes_left(refs, local_hub, tmp_path, monkeypatch):
    import tempfile

    from unite_hf import UniteForCausalLM

    gene_a, gene_b = refs["genes"]
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    monkeypatch.setattr(tempfile, "tempdir", None)  # tempfile reads TMPDIR again
    pushes = tmp_path / "tmp" / f"unite_hf-pushes-{os.getuid()}"
    pushes.mkdir(parents=True, mode=0o700)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)

    def left_by(pid: int) -> Path:
        folder = pushes / f".push.tmp-{pid}-0a1b2c3d"
        (folder / "gene").mkdir(parents=True)
        (folder / "gene" / "gene.safetensors").write_bytes(b"\0" * 1000)
        return folder

    try:
        dead_copy, live_copy = left_by(dead), left_by(sleeper.pid)
        UniteForCausalLM.from_gene(gene_a, num_hidden_layers=1, rank=4).push_to_hub("me/target")
        assert not dead_copy.exists() and sorted(pushes.iterdir()) == [live_copy]  # its own staging went too
        dead_copy = left_by(dead)
        gene_b.save_pretrained(tmp_path / "gene")
        assert not dead_copy.exists() and live_copy.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


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


# -- targets: a reader loading while another process saves (issue 21, item 4) ---------------------------

TARGET_RACE_SECONDS = 12  # the reader's loop; the writer saves A and B alternately meanwhile

# the writer: loads target A (1 layer) and B (2 layers), saves each once as the reference, then saves them
# alternately into one folder until told to stop
TARGET_WRITER = r'''
import os, sys, torch
torch.set_num_threads(1)
from unite_hf import UniteForCausalLM
grown_a, grown_b, a, b, path, stop = sys.argv[1:7]
models = [UniteForCausalLM.from_pretrained(grown) for grown in (grown_a, grown_b)]
for model, ref in zip(models, (a, b)):
    model.save_pretrained(ref)
models[0].save_pretrained(path)
print("ready", flush=True)
saves = 1
while not os.path.exists(stop):
    models[saves % 2].save_pretrained(path)
    saves += 1
print(saves, flush=True)
'''

# the reader: loads the folder in a loop; each load must equal A or B exactly (config and every tensor)
TARGET_READER = r'''
import json, sys, time, torch
torch.set_num_threads(1)
import unite_hf
import transformers
from unite_hf import UniteForCausalLM
transformers.logging.set_verbosity_error()  # a mixed load shows only as a warning: the counts tell
a, b, path, seconds = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])

def fingerprint(model):
    config = {k: v for k, v in model.config.to_dict().items() if k != "_name_or_path"}
    return config, model.state_dict()

refs = {name: fingerprint(UniteForCausalLM.from_pretrained(ref)) for name, ref in (("A", a), ("B", b))}

def same(left, right):
    return left[0] == right[0] and left[1].keys() == right[1].keys() and all(
        torch.equal(left[1][k], right[1][k]) for k in left[1])

counts, errors, deadline = {"A": 0, "B": 0, "mixed": 0, "error": 0}, [], time.monotonic() + seconds
while time.monotonic() < deadline:
    try:
        loaded = fingerprint(UniteForCausalLM.from_pretrained(path))
    except Exception as err:
        counts["error"] += 1
        errors.append(f"{type(err).__name__}: {err}"[:300])
        continue
    matches = [name for name, ref in refs.items() if same(loaded, ref)]
    counts[matches[0] if matches else "mixed"] += 1
print(json.dumps({"counts": counts, "errors": sorted(set(errors))}), flush=True)
'''


@pytest.fixture(scope="module")
def gene_for_targets():
    return extract_universal_knowledge(tiny_moe("mixtral"), calibration=CALIBRATION, show_progress=False)


@pytest.mark.parametrize("locks", ["shared", "separate"])
def test_a_target_loaded_while_another_process_saves_it_is_whole_or_a_clear_error(gene_for_targets, tmp_path, locks):
    """Regression: 271 of 897 loads got one save's config with the other save's weights (layers re-initialised
    at random, only transformers' warning). A writer process saves target A (1 layer) and B (2 layers)
    alternately into one folder, back to back, while a reader process loads it in a loop: every load equals A
    or B exactly. With the writer's lock folder shared (same user, same host) the last attempt of a load holds
    the write lock, so no load fails; with separate lock folders (a writer of another user) a load may fail,
    with the error that names the folder changing, and never returns a mix."""
    from unite_hf.io import LOCK_DIR_ENV

    from unite_hf import UniteForCausalLM

    grown = [tmp_path / "grown" / name for name in ("A", "B")]
    for folder, layers in zip(grown, (1, 2)):
        UniteForCausalLM.from_gene(gene_for_targets, num_hidden_layers=layers, rank=4).save_pretrained(folder)
    path, stop = tmp_path / "race" / "target", tmp_path / "stop"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    writer_env = env if locks == "shared" else {**env, LOCK_DIR_ENV: str(tmp_path / "writer-locks")}
    refs = [str(tmp_path / "A" / "target"), str(tmp_path / "B" / "target")]  # saved by the writer: same names
    log = open(tmp_path / "writer.log", "w")  # noqa: SIM115 - the writer's progress bars, not a pipe it could fill
    writer = subprocess.Popen([sys.executable, "-c", TARGET_WRITER, *map(str, grown), *refs, str(path), str(stop)],
                              stdout=subprocess.PIPE, stderr=log, text=True, env=writer_env, cwd=tmp_path)
    try:
        assert writer.stdout.readline().strip() == "ready", (tmp_path / "writer.log").read_text()[-3000:]
        reader = subprocess.run([sys.executable, "-c", TARGET_READER, *refs, str(path), str(TARGET_RACE_SECONDS)],
                                capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    finally:
        stop.touch()
        saves = writer.communicate(timeout=120)[0].strip()
        log.close()
    assert writer.returncode == 0 and reader.returncode == 0, reader.stderr[-3000:]
    result = json.loads(reader.stdout.strip().splitlines()[-1])
    counts = result["counts"]
    print(f"\ntarget race, {locks} locks: {saves} saves, {sum(counts.values())} loads: {counts}; "
          f"errors: {result['errors']}")
    assert counts["mixed"] == 0 and counts["A"] > 0 and counts["B"] > 0, result
    assert all("kept changing while it was loaded" in error for error in result["errors"]), result
    if locks == "shared":
        assert counts["error"] == 0, result
    # the folder holds A or B file for file, and no leftovers
    assert folder_hashes(path) in (folder_hashes(tmp_path / "A" / "target"), folder_hashes(tmp_path / "B" / "target"))
    assert leftovers(path.parent, "target") == []
