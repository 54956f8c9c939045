"""What both source builders share: the on-disk cache, the report, the text windows, training and metrics.

A source is built once into a folder named ``<kind>-<hash of its settings>`` (under
``~/.cache/unite_hf/sources`` unless ``cache_dir`` names the folder), written with
``save_pretrained`` (safetensors) together with its tokenizer and ``source_report.json``. The build
happens in a temporary sibling folder that is renamed into place only when complete, so a crash or a
concurrent build never leaves a half-written source under the final name.

**Reproducible builds.** The same settings give bit-identical weights (and the same report but for
its timings and folder). Every generator is seeded from ``seed`` (weights, noise, windows, Trainer's
``seed``/``data_seed``; no dataloader workers, no dropout draws left unseeded). What remains is float
summation order: CPU kernels split their sums by thread, so the weights depend on the thread count.
Full bitwise determinism across thread counts is not possible with torch's CPU kernels, so a build
pins ``torch.set_num_threads(num_threads)`` (``BuildOptions.num_threads``, default
:data:`DEFAULT_BUILD_THREADS`) and switches ``torch.use_deterministic_algorithms(True)`` on, for the
build only (the caller's thread count, deterministic flag and global RNG states are restored after).
The thread count is one of the settings, and the cache key also holds what else decides the float
results (:func:`build_environment`: torch and transformers versions, the CPU kernels torch dispatches
to, the device, :data:`BUILD_VERSION`); the report's ``determinism`` records all of it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from unite_hf.calibration import CORPUS_ALIASES, _read_text_file, find_local_data_dir, load_calibration
from tools.demo import cache_dir as unite_cache_dir
from unite_hf.io import atomic_write_json
from unite_hf.sources import get_source
from unite_hf.training.pretrain import _TokenWindows

REPORT_FILE = "source_report.json"
HELD_OUT_FRACTION = 0.05  # the last 5% of the corpus's documents never reach training
#: Bump when a change to the builders' code changes the weights they produce (part of every cache key).
BUILD_VERSION = 2
#: Threads a build pins torch to unless told otherwise: CPU float sums, hence the weights, depend on it.
DEFAULT_BUILD_THREADS = 2


def default_cache_root() -> Path:
    """``$UNITE_HF_CACHE/sources``, i.e. ``~/.cache/unite_hf/sources`` by default."""
    return unite_cache_dir() / "sources"


def settings_hash(settings: dict[str, Any]) -> str:
    """12 hex digits identifying a build's settings (JSON with sorted keys)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of a model's class, config and every tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256(type(model).__name__.encode())
    digest.update(model.config.to_json_string(use_diff=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def build_device() -> str:
    """Where a build trains: ``"cuda"`` when torch sees a GPU, else ``"cpu"`` (part of the cache key)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def build_environment() -> dict[str, Any]:
    """What besides the settings decides a build's float results, so part of its cache key.

    The torch and transformers versions (kernels, Trainer's defaults, model code), the CPU kernels
    torch dispatches to (``torch.backends.cpu.get_cpu_capability()``: AVX2 and AVX512 kernels sum in
    other orders), the training device (and the GPU's name and CUDA version there) and
    :data:`BUILD_VERSION` (the builders' own code).
    """
    import transformers

    env = {"build_version": BUILD_VERSION, "torch": torch.__version__, "transformers": transformers.__version__,
           "cpu_capability": torch.backends.cpu.get_cpu_capability(), "device": build_device()}
    if env["device"] == "cuda":
        env["cuda"] = torch.version.cuda
        env["gpu"] = torch.cuda.get_device_name()
    return env


@contextlib.contextmanager
def deterministic_build(num_threads: int, seed: int) -> Iterator[dict[str, Any]]:
    """Pin what decides a build's float results for the ``with`` block; restore the caller's state after.

    ``torch.set_num_threads(num_threads)``; ``torch.use_deterministic_algorithms(True)`` (on CPU
    every op the builds use has a deterministic kernel; on CUDA it is ``warn_only``, since cuBLAS
    needs ``CUBLAS_WORKSPACE_CONFIG`` set before it starts, so GPU builds are not guaranteed
    bitwise); the global RNGs of ``random``, numpy and torch forked and seeded with ``seed`` (for
    anything that draws from them; Trainer reseeds them with ``seed`` too). Yields the record for
    the report's ``determinism``.
    """
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    threads = torch.get_num_threads()
    det, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    py_state, np_state = random.getstate(), np.random.get_state()
    cuda = torch.cuda.is_available()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if cuda else []):
        try:
            torch.set_num_threads(num_threads)
            torch.use_deterministic_algorithms(True, warn_only=cuda)
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.manual_seed(seed)
            yield {**build_environment(), "num_threads": num_threads,
                   "deterministic_algorithms": "warn_only" if cuda else True,
                   "note": "bitwise reproducible for the same settings (num_threads included) with the same "
                           "torch, transformers, CPU capability and device; another thread count sums floats "
                           "in another order and gives other weights" + ("; on CUDA not guaranteed" if cuda else "")}
        finally:
            torch.set_num_threads(threads)
            torch.use_deterministic_algorithms(det, warn_only=warn_only)
            random.setstate(py_state)
            np.random.set_state(np_state)


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """``data_dir`` if given, else ``$UNITE_HF_DATA_DIR`` (the library's rule: never a folder relative to the cwd)."""
    root = Path(data_dir).expanduser() if data_dir is not None else find_local_data_dir()
    if root is None or not root.is_dir():
        raise FileNotFoundError(f"no data folder ({data_dir!r}): pass data_dir= or set $UNITE_HF_DATA_DIR")
    return root


def resolve_text_file(text_file: str | os.PathLike | None, data_dir: str | os.PathLike | None) -> Path:
    """``text_file`` if given, else SimpleBooks-92 under :func:`resolve_data_dir`.

    Only SimpleBooks-92's validation file is available offline (no train split), so it is the corpus;
    its last documents are held out (see :func:`text_windows`).
    """
    path = Path(text_file).expanduser() if text_file is not None else (
        resolve_data_dir(data_dir) / CORPUS_ALIASES["simplebooks"].local_path)
    if not path.is_file():
        raise FileNotFoundError(f"training text {path} does not exist")
    return path.resolve()


def text_windows(tokenizer: Any, text_file: Path, *, seq_len: int, num_train: int, num_held_out: int,
                 seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded training and held-out windows ``[N, seq_len]`` from disjoint documents of ``text_file``.

    Documents are split at blank lines; the last ``HELD_OUT_FRACTION`` of them (at least one) are
    held out. Training windows may overlap (several epochs over a small corpus): that warning is muted.
    """
    docs = _read_text_file(text_file)
    if len(docs) < 2:
        raise ValueError(f"{text_file} has {len(docs)} document(s); need at least 2 (one is held out)")
    cut = len(docs) - max(1, round(HELD_OUT_FRACTION * len(docs)))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*the windows will overlap")
        train = load_calibration(docs[:cut], tokenizer, num_sequences=max(1, num_train), seq_len=seq_len, seed=seed,
                                 show_progress=False).input_ids
        held = load_calibration(docs[cut:], tokenizer, num_sequences=num_held_out, seq_len=seq_len, seed=seed + 1,
                                show_progress=False).input_ids
    return train, held


@torch.no_grad()
def expert_cosine(model: nn.Module) -> dict[str, Any]:
    """Mean pairwise cosine similarity of the flattened expert weights, per projection and layer.

    Returns ``{"gate": [per layer], "up": [...], "down": [...], "mean": {proj: mean over layers}}``;
    1.0 means identical experts (up to scale), about 0 means unrelated random ones.
    """
    out: dict[str, Any] = {}
    for block in get_source(model).blocks:
        for proj in block.projection_names():
            flat = nn.functional.normalize(block.stacked(proj).float().flatten(1), dim=1)
            gram = flat @ flat.T
            n = gram.shape[0]
            off_diagonal = (gram.sum() - gram.diagonal().sum()) / max(1, n * (n - 1))
            out.setdefault(proj, []).append(round(float(off_diagonal), 6))
    out["mean"] = {proj: round(sum(v) / len(v), 6) for proj, v in out.items()}
    return out


@torch.no_grad()
def held_out_loss(model: nn.Module, input_ids: torch.Tensor, batch_size: int) -> dict[str, float]:
    """Mean next-token cross-entropy (and router load-balancing loss, for a MoE) on ``input_ids``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ce = aux = 0.0
    is_moe = hasattr(model.config, "router_aux_loss_coef")
    for start in range(0, input_ids.shape[0], batch_size):
        ids = input_ids[start : start + batch_size].to(device)
        kwargs = {"output_router_logits": True} if is_moe else {}
        out = model(input_ids=ids, labels=ids, **kwargs)
        aux_loss = getattr(out, "aux_loss", None)
        part_aux = float(aux_loss) if aux_loss is not None else 0.0
        part_ce = float(out.loss) - (model.config.router_aux_loss_coef * part_aux if is_moe else 0.0)
        ce += part_ce * ids.shape[0]
        aux += part_aux * ids.shape[0]
    model.train(was_training)
    n = input_ids.shape[0]
    result = {"loss": round(ce / n, 5), "perplexity": round(math.exp(min(ce / n, 50.0)), 3)}
    if is_moe:
        result["aux_loss"] = round(aux / n, 5)
    return result


def train_causal_lm(model: nn.Module, input_ids: torch.Tensor, *, max_steps: int, batch_size: int,
                    learning_rate: float, seed: int, show_progress: bool) -> dict[str, Any]:
    """``max_steps`` of ``transformers.Trainer`` (AdamW, 5% warmup, cosine) on the windows ``input_ids``.

    A MoE's ``config.output_router_logits`` is switched on for training, so the logged loss is the LM
    loss plus ``router_aux_loss_coef`` times the load-balancing loss, and switched back off after.
    """
    from transformers import Trainer, TrainingArguments

    is_moe = hasattr(model.config, "output_router_logits")
    if is_moe:
        model.config.output_router_logits = True
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="unite_hf_source_trainer_") as output_dir:
        args = TrainingArguments(
            output_dir=output_dir, max_steps=max_steps, per_device_train_batch_size=batch_size,
            learning_rate=learning_rate, warmup_steps=0.05, lr_scheduler_type="cosine", weight_decay=0.01,
            max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to=[], seed=seed, data_seed=seed,
            disable_tqdm=not show_progress, use_cpu=build_device() == "cpu", dataloader_num_workers=0,
        )
        trainer = Trainer(model=model, args=args, train_dataset=_TokenWindows(input_ids))
        trainer.train()
    seconds = time.perf_counter() - started
    if is_moe:
        model.config.output_router_logits = False
    model.eval()
    losses = [round(float(entry["loss"]), 5) for entry in trainer.state.log_history if "loss" in entry]
    if not losses or not all(math.isfinite(v) for v in losses):
        raise RuntimeError(f"training produced no or non-finite losses: {losses[-5:]}")
    return {"steps": len(losses), "train_seconds": round(seconds, 2), "loss_curve": losses,
            "steps_per_second": round(len(losses) / seconds, 4)}


@dataclass
class SourceReport:
    """What a build did, saved as ``source_report.json`` next to the model.

    ``expert_cosine_*``: see :func:`expert_cosine`. ``train_loss_*``: the logged training loss (LM
    loss plus the weighted load-balancing loss) at the first and the last step. ``held_out_*``: loss
    on documents never trained on. ``build_seconds``: everything but saving (loading the dense model,
    upcycling or initialising, measuring, training). ``torch_threads``: the thread count the build was
    pinned to. ``determinism``: what the weights depend on besides the settings (see
    :func:`deterministic_build`). ``from_cache`` is not saved: it says whether this call loaded the
    source instead of building it. Two builds of the same settings agree on every field but
    :attr:`TIMING_FIELDS` (see :meth:`reproducible`).
    """

    #: fields that measure time or name the folder: the only ones two builds of the same settings differ in
    TIMING_FIELDS = ("path", "build_seconds", "train_seconds", "steps_per_second", "from_cache")

    kind: str
    path: str
    settings: dict[str, Any]
    settings_hash: str
    corpus: str = ""
    num_parameters: int = 0
    steps: int = 0
    build_seconds: float = 0.0
    train_seconds: float = 0.0
    steps_per_second: float = 0.0
    torch_threads: int = 0
    train_loss_first: float | None = None
    train_loss_last: float | None = None
    loss_curve: list[float] = field(default_factory=list)
    held_out_before: dict[str, float] = field(default_factory=dict)
    held_out_after: dict[str, float] = field(default_factory=dict)
    expert_cosine_before: dict[str, Any] = field(default_factory=dict)
    expert_cosine_after: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    determinism: dict[str, Any] = field(default_factory=dict)
    from_cache: bool = False

    def reproducible(self) -> dict[str, Any]:
        """The report without :attr:`TIMING_FIELDS`: equal for two builds of the same settings."""
        return {k: v for k, v in asdict(self).items() if k not in self.TIMING_FIELDS}

    def save(self, folder: str | os.PathLike) -> None:
        data = asdict(self)
        data.pop("from_cache")
        atomic_write_json(data, Path(folder) / REPORT_FILE)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> SourceReport:
        with open(Path(folder) / REPORT_FILE, encoding="utf-8") as handle:
            return cls(**json.load(handle), from_cache=True)


def load_source(path: str | os.PathLike) -> tuple[nn.Module, Any, SourceReport]:
    """A built source folder as ``(MixtralForCausalLM, tokenizer, SourceReport)``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    report = SourceReport.load(path)
    report.path = str(Path(path).resolve())
    model.source_report = report
    return model, AutoTokenizer.from_pretrained(path), report


def cached_build(kind: str, settings: dict[str, Any], build: Callable[[SourceReport], tuple[nn.Module, Any]],
                 opts: BuildOptions) -> nn.Module:
    """Load the source for ``settings`` (and ``opts``' training fields) from its folder, or run ``build``
    and save it there atomically.

    ``build(report)`` returns ``(model, tokenizer)`` and fills the report; it runs inside
    :func:`deterministic_build` (``opts.num_threads``, ``opts.seed``). The returned model carries
    its :class:`SourceReport` as ``model.source_report``. A folder holding a source built with other
    settings is refused (pass ``force=True`` to replace it).
    """
    settings, digest = cache_key(settings, opts)
    cache_dir, force = opts.cache_dir, opts.force
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root() / f"{kind}-{digest}"
    folder = folder.resolve()
    if (folder / REPORT_FILE).is_file() and not force:
        existing = SourceReport.load(folder)
        if existing.settings_hash != digest:
            raise ValueError(f"{folder} holds a {existing.kind} source built with other settings or in another "
                             f"environment (hash {existing.settings_hash}, asked {digest}; see build_environment); "
                             f"pass force=True to replace it")
        return load_source(folder)[0]
    if folder.exists() and any(folder.iterdir()) and not (folder / REPORT_FILE).is_file() and not force:
        raise FileExistsError(f"{folder} exists and is not a built source; pick another folder or pass force=True")

    started = time.perf_counter()
    report = SourceReport(kind=kind, path=str(folder), settings=settings, settings_hash=digest,
                          torch_threads=opts.num_threads)
    with deterministic_build(opts.num_threads, opts.seed) as determinism:
        model, tokenizer = build(report)
    report.determinism = {**determinism,
                          "experts_implementation": getattr(model.config, "_experts_implementation", None)}
    report.num_parameters = sum(p.numel() for p in model.parameters())
    report.build_seconds = round(time.perf_counter() - started, 2)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a source is meant to be shared
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        report.save(tmp)  # written last: a folder with a report is complete
        _move_into_place(tmp, folder, force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    model.source_report = report
    return model


def cache_key(settings: dict[str, Any], opts: BuildOptions) -> tuple[dict[str, Any], str]:
    """``(settings with opts' training fields, hash)``: the hash also covers :func:`build_environment`,
    so a build with other library versions, CPU kernels or device gets another folder."""
    settings = {**settings, **opts.training()}
    return settings, settings_hash({**settings, "environment": build_environment()})


def _move_into_place(tmp: Path, folder: Path, force: bool) -> None:
    if force and folder.exists():
        trash = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.old-"))
        os.replace(folder, trash / "old")
        shutil.rmtree(trash, ignore_errors=True)
    elif folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()  # an empty folder named by the caller
    try:
        os.rename(tmp, folder)
    except OSError:
        if not (folder / REPORT_FILE).is_file():  # not a concurrent build that finished first
            raise


@dataclass
class BuildOptions:
    """The training budget, data and cache options that both builders take as keyword arguments.

    Attributes:
        max_steps: optimizer steps of ``Trainer`` (0: no training).
        seq_len: tokens per training window.
        batch_size: windows per step.
        learning_rate: peak AdamW learning rate (5% warmup, cosine decay).
        aux_loss_coef: ``router_aux_loss_coef``, the weight of the load-balancing loss in training.
        seed: seed of every generator (weights, noise, windows) and of ``Trainer``.
        num_threads: torch's thread count during the build (pinned: CPU float sums, hence the weights,
            depend on it; see the module docstring). More threads build faster but other weights.
        num_held_out: held-out windows (from documents never trained on) for the loss before and after.
        data_dir: data folder; default ``$UNITE_HF_DATA_DIR`` (the library's
            :func:`unite_hf.calibration.find_local_data_dir`).
        text_file: a plain-text file to train on instead of SimpleBooks-92.
        cache_dir: the source's folder; default ``~/.cache/unite_hf/sources/<kind>-<hash of settings>``.
        force: rebuild even if the folder already holds this source (or another one).
        show_progress: Trainer's progress bars.
    """

    max_steps: int = 100
    seq_len: int = 128
    batch_size: int = 8
    learning_rate: float = 1e-3
    aux_loss_coef: float = 0.01
    seed: int = 0
    num_held_out: int = 32
    num_threads: int = DEFAULT_BUILD_THREADS
    data_dir: str | os.PathLike | None = None
    text_file: str | os.PathLike | None = None
    cache_dir: str | os.PathLike | None = None
    force: bool = False
    show_progress: bool = True

    #: the fields that change what is built (hashed into the cache folder's name)
    TRAINING = ("max_steps", "seq_len", "batch_size", "learning_rate", "aux_loss_coef", "seed", "num_held_out",
                "num_threads")

    @classmethod
    def training_defaults(cls, **overrides: Any) -> dict[str, Any]:
        return {name: overrides.get(name, getattr(cls, name)) for name in cls.TRAINING}

    def training(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.TRAINING}

    def text_path(self) -> Path:
        return resolve_text_file(self.text_file, self.data_dir)


def train_and_measure(report: SourceReport, model: nn.Module, tokenizer: Any, text_file: Path,
                      opts: BuildOptions, parent: nn.Module | None = None) -> None:
    """Held-out loss and expert cosine before, ``opts.max_steps`` of training, the same after; all into ``report``.

    ``parent`` (the dense model a MoE was upcycled from): its held-out loss on the same windows goes
    into ``report.extra["held_out_parent"]``.
    """
    train_ids, held_ids = text_windows(tokenizer, text_file, seq_len=opts.seq_len,
                                       num_train=opts.max_steps * opts.batch_size, num_held_out=opts.num_held_out,
                                       seed=opts.seed)
    report.corpus = f"{text_file} (last {HELD_OUT_FRACTION:.0%} of documents held out)"
    if parent is not None:
        report.extra["held_out_parent"] = held_out_loss(parent, held_ids, opts.batch_size)
    report.expert_cosine_before = expert_cosine(model)
    report.held_out_before = held_out_loss(model, held_ids, opts.batch_size)
    if opts.max_steps > 0:
        run = train_causal_lm(model, train_ids, max_steps=opts.max_steps, batch_size=opts.batch_size,
                              learning_rate=opts.learning_rate, seed=opts.seed, show_progress=opts.show_progress)
        report.steps, report.train_seconds = run["steps"], run["train_seconds"]
        report.steps_per_second, report.loss_curve = run["steps_per_second"], run["loss_curve"]
        report.train_loss_first, report.train_loss_last = run["loss_curve"][0], run["loss_curve"][-1]
    report.expert_cosine_after = expert_cosine(model)
    report.held_out_after = held_out_loss(model, held_ids, opts.batch_size)
