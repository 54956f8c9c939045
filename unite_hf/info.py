"""``unite-hf info``: what a gene or a target holds, read from its files without loading a model.

Torch-free: reads ``gene_config.json`` / ``config.json`` and the safetensors headers (local files),
or the Hub's safetensors metadata (a Hub repo id: only the small JSON files are downloaded).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

GENE_CONFIG = "gene_config.json"
TARGET_CONFIG = "config.json"
_SMALL_FILES = [GENE_CONFIG, TARGET_CONFIG, "README.md"]


# safetensors' own limit on a header (safetensors.tensor.MAX_HEADER_SIZE)
MAX_HEADER_BYTES = 100_000_000


def safetensors_parameters(path: str | os.PathLike) -> dict[str, int]:
    """``tensor name -> element count`` from a safetensors file's header (nothing else is read). A header
    that is not one (longer than the file or than safetensors allows, not a JSON object of entries with a
    ``shape`` of non-negative ints) raises ``ValueError`` before anything of its size is read."""
    from .methods.config import parse_json

    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        head = handle.read(8)
        (length,) = struct.unpack("<Q", head) if len(head) == 8 else (None,)
        if length is None or length > min(size - 8, MAX_HEADER_BYTES):
            raise ValueError(f"{path} is not a safetensors file: its header length "
                             f"{'is missing' if length is None else f'{length} exceeds the file or the 100 MB limit'} "
                             f"({size} bytes)")
        header = parse_json(handle.read(length), f"the header of {path}")
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a safetensors file: its header is a JSON {type(header).__name__}, not an object")
    counts = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise ValueError(f"{path} is not a safetensors file: the entry of {name[:80]!r} has no shape of "
                             "non-negative integers")
        counts[name] = _count(shape)
    return counts


def _folder(path_or_repo_id: str, revision: str | None) -> tuple[Path, bool]:
    """The local folder, or a snapshot of the repo's small files; ``True`` when it came from the Hub."""
    path = Path(path_or_repo_id)
    if path.is_dir():
        return path, False
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(snapshot_download(path_or_repo_id, revision=revision, allow_patterns=_SMALL_FILES)), True
    except HFValidationError as err:
        raise ValueError(f"{path_or_repo_id!r} is neither a local folder nor a valid Hub repo id") from err


def _files(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}


def _tensor_sizes(folder: Path, repo_id: str | None, revision: str | None) -> dict[str, dict[str, int]]:
    """``file -> tensor name -> element count`` per safetensors file (local headers, or the Hub's metadata)."""
    if repo_id is None:
        return {p.name: safetensors_parameters(p) for p in sorted(folder.glob("*.safetensors"))}
    from huggingface_hub import HfApi

    metadata = HfApi().get_safetensors_metadata(repo_id, revision=revision)
    return {name: {key: _count(tensor.shape) for key, tensor in info.tensors.items()}
            for name, info in metadata.files_metadata.items()}


def _parameters(folder: Path, repo_id: str | None, revision: str | None) -> dict[str, int]:
    """Element count per safetensors file."""
    return {name: sum(sizes.values()) for name, sizes in _tensor_sizes(folder, repo_id, revision).items()}


def _expert_statistics(config: dict[str, Any], gene_tensors: dict[str, int]) -> list[str]:
    """The per-expert statistics a gene stores (``importance.<name>``): fisher, frequency, commonality, ...
    An XPERT gene of format 2 kept its commonality score under ``importance.fisher``: named for what it is."""
    names = sorted(key.split(".", 1)[1] for key in gene_tensors if key.startswith("importance."))
    if config.get("method") == "xpert" and (config.get("format_version") or 0) < 3:
        names = sorted("commonality" if name == "fisher" else name for name in names)
    return names


def _count(shape: list[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def _hub_files(repo_id: str, revision: str | None) -> dict[str, int | None]:
    from huggingface_hub import HfApi

    info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
    return {sibling.rfilename: sibling.size for sibling in info.siblings or []}


def describe(path_or_repo_id: str | os.PathLike, revision: str | None = None) -> dict[str, Any]:
    """A JSON-able summary of a gene or a UNITE target (folder or Hub repo id).

    Gene: method, provenance (source id, revision, license, model type), calibration, fusion (``None``
    where the method fuses its own way; XPERT adds its ``selection``: strategy, k, commonality score),
    the per-expert statistics stored (``expert_statistics``: fisher, frequency, commonality, ...),
    decomposition, ranks, relative errors, spectral energy kept at the stored ranks, the recipe, parameters per
    file and the files with their sizes. Target: architecture, the gene and its source, depth,
    FFN layers, ranks, core init, parameters and files.
    """
    folder, from_hub = _folder(str(path_or_repo_id), revision)
    repo_id = str(path_or_repo_id) if from_hub else None
    try:
        return _describe(path_or_repo_id, folder, from_hub, repo_id, revision)
    except (AttributeError, TypeError, KeyError) as err:  # a value of the wrong kind: one line, not a traceback
        raise ValueError(f"{path_or_repo_id} does not hold a readable gene or target config: "
                         f"{type(err).__name__}: {err}") from None


def _json_object(path: Path) -> dict[str, Any]:
    from .methods.config import parse_json

    data = parse_json(path.read_text(encoding="utf-8"), str(path))
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, not a {type(data).__name__}")
    return data


def _describe(path_or_repo_id, folder: Path, from_hub: bool, repo_id: str | None, revision: str | None) -> dict[str, Any]:
    if (folder / GENE_CONFIG).is_file():
        config = _json_object(folder / GENE_CONFIG)
        files = {name: record.get("size") for name, record in config.get("files", {}).items()}
        files.setdefault(GENE_CONFIG, (folder / GENE_CONFIG).stat().st_size)
        tensors = _tensor_sizes(folder, repo_id, revision)
        if config.get("method") == "masa":  # MASA genes saved before said UNITE's fisher / tucker / empirical
            from .methods.masa.config import NOT_MASA  # torch-free

            config = {**config, **NOT_MASA}
        fusion = config.get("fusion") or None
        selection = None
        if config.get("method") == "xpert":  # format 2 wrote the selection strategy as fusion "xpert-<strategy>"
            fusion = None if fusion and fusion.startswith("xpert-") else fusion
            method_config = config.get("method_config") or {}
            selection = {"strategy": method_config.get("strategy"), "k": method_config.get("k"),
                         "score": (method_config.get("analysis") or {}).get("score")}
        return {
            "kind": "gene", "path": str(path_or_repo_id), "method": config.get("method"),
            "format_version": config.get("format_version"), "library_version": config.get("library_version"),
            "source": {key: config.get(f"source_{key}") for key in ("id", "revision", "license", "model_type")},
            "calibration": {key: config.get(key) for key in ("calibration", "num_sequences", "seq_len", "seed",
                                                             "fisher_labels")},
            "fusion": fusion, "decomposition": config.get("decomposition") or None,
            "expert_statistics": _expert_statistics(config, tensors.get("gene.safetensors", {})),
            **({"selection": selection} if selection is not None else {}),
            "moe_layers": config.get("moe_layers"), "num_experts": config.get("num_experts"),
            "ranks": config.get("ranks"), "relative_error": config.get("relative_error"),
            "spectral_energy_at_rank": config.get("retained_energy"),
            "recipe": config.get("recipe") or None,  # what `unite-hf extract --config` runs again
            "parameters": {name: sum(sizes.values()) for name, sizes in tensors.items()}, "files": files,
        }
    if (folder / TARGET_CONFIG).is_file():
        config = _json_object(folder / TARGET_CONFIG)
        if config.get("model_type") != "unite":
            raise ValueError(f"{path_or_repo_id} holds a {config.get('model_type')!r} model, not a UNITE gene or target")
        text = config.get("text_config") or {}
        parameters = _parameters(folder, repo_id, revision)
        return {
            "kind": "target", "path": str(path_or_repo_id), "architectures": config.get("architectures"),
            "gene": config.get("gene"), "gene_source": config.get("gene_source"),
            "family": text.get("model_type"), "num_hidden_layers": text.get("num_hidden_layers"),
            "hidden_size": text.get("hidden_size"), "source_layers": config.get("source_layers"),
            "ffn_layers": config.get("ffn_layers"), "ranks": config.get("ranks"),
            "expert_intermediate_size": config.get("expert_intermediate_size"), "core_init": config.get("core_init"),
            "tie_bases": config.get("tie_bases"), "shared_experts": config.get("shared_experts"),
            "shared_expert_names": config.get("shared_expert_names"),
            "card_info": config.get("card_info"), "parameters": parameters,
            "total_parameters": sum(parameters.values()),
            "files": _hub_files(repo_id, revision) if from_hub else _files(folder),
        }
    raise ValueError(f"{path_or_repo_id} is not a unite_hf gene ({GENE_CONFIG}) or target ({TARGET_CONFIG})")
