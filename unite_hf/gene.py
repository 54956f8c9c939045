"""The gene: the reusable knowledge extracted from a source, as a Hub-shareable checkpoint.

Every method writes the same folder (a local folder, or a Hub model repo)::

    gene_config.json           GeneConfig: method, provenance, shapes, method settings, and the size
                               and SHA-256 of every other file of the folder
    gene.safetensors           the method's tensors (see each gene class)
    source_weights.safetensors weights copied from the source as they are (may be empty)
    README.md                  model card, from model_cards/gene_<method>.md
    tokenizer files            the source's tokenizer, when set

A save replaces the whole folder at once (staged beside it, swapped in by rename; see
:func:`unite_hf.io.write_folder_atomically`); a load validates the config, the files and every
tensor before anything is built from them (:meth:`Gene.from_pretrained`).

:class:`Gene` holds that machinery once; each method is a subclass registered under its
``GeneConfig.method`` with :func:`register_gene`, so :func:`load_gene` (or
``Gene.from_pretrained``) returns the right class for any gene folder or repo:

- ``unite`` (:class:`UniteGene`): Tucker bases and cores of the fused experts;
- ``xpert`` (:class:`~unite_hf.methods.xpert.XpertGene`): Tucker bases of the common experts, with their
  commonality score (``importance.commonality``) in place of a Fisher;
- ``masa`` (:class:`~unite_hf.methods.masa.MasaGene`): square gene matrices.

UNITE tensor keys in ``gene.safetensors``: ``ffn.{proj}.core|layer_factor|out_factor|in_factor``,
``ffn.{proj}.spectral_energy.{layer,out,in}``, ``ffn.{proj}.fused_bias``, ``importance.fisher``,
``importance.frequency`` (per-expert statistics, ``[len(moe_layers), num_experts]``; ``importance.fisher`` only
where a Fisher was computed).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch

from ._version import __version__
from .decomposition import Decomposition
from .io import (
    CorruptedFileError, atomic_write_json, atomic_write_text, check_finite, check_writable_folder, file_records,
    load_safetensors_checked, record_name_problem, record_path, save_safetensors, verify_file, write_folder_atomically,
)
from .sources import PROJECTIONS

# 1: UNITE genes (still written as 1, so older readers keep reading them); 2: the method registry
# (MASA), which older unite_hf versions must refuse with "upgrade", not misread; 3: XPERT genes with their
# own commonality tensor and no Fisher (format 2 XPERT genes kept the commonality in importance.fisher and
# the selection strategy in fusion; still read). Each gene class writes its own (Gene.format_version).
GENE_FORMAT_VERSION = 3
CONFIG_NAME = "gene_config.json"
GENE_WEIGHTS_NAME = "gene.safetensors"
SOURCE_WEIGHTS_NAME = "source_weights.safetensors"
CARD_NAME = "README.md"
GENE_FILES = (CONFIG_NAME, GENE_WEIGHTS_NAME, SOURCE_WEIGHTS_NAME, CARD_NAME)
# the source's tokenizer travels with the gene, so targets grown from it can be fine-tuned right away
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "chat_template.jinja", "added_tokens.json", "vocab.txt")


class GeneFormatError(ValueError):
    """The folder or repo is not a gene this version of unite_hf can read."""


@dataclass
class GeneConfig:
    """Provenance and shape of a gene. Everything a target builder or a reader of the card needs."""

    method: str = "unite"
    format_version: int = GENE_FORMAT_VERSION
    library_version: str = __version__
    # source
    source_id: str | None = None
    source_revision: str | None = None  # the resolved commit sha where one is known
    source_license: str | None = None  # the source's license (its card), the default license of the gene's card
    source_model_type: str | None = None
    source_config: dict[str, Any] = field(default_factory=dict)
    source_layout: str = ""
    num_layers: int = 0
    moe_layers: list[int] = field(default_factory=list)
    dense_layers: list[int] = field(default_factory=list)
    num_experts: int = 0
    hidden_size: int = 0
    expert_intermediate_size: int = 0
    projections: list[str] = field(default_factory=lambda: list(PROJECTIONS))
    has_bias: bool = False
    custom_gating: bool = False
    shared_experts: list[str] = field(default_factory=list)
    # calibration and method
    calibration: str = ""
    num_sequences: int = 0
    seq_len: int = 0
    seed: int = 0
    fisher_labels: str = "empirical"  # "none" where no Fisher was computed (XPERT, MASA)
    # the UNITE fusion (unite_hf.fusion.FUSIONS) that made each layer's fused FFN; empty where a method
    # builds it its own way (XPERT: the routing-frequency-weighted mean of the selected experts) or fuses
    # no experts (MASA, whose genes also record no decomposition: unite_hf.methods.masa.config.NOT_MASA)
    fusion: str = "fisher"
    decomposition: str = "tucker"
    n_iter_max: int = 25
    ranks: dict[str, list[int]] = field(default_factory=dict)
    relative_error: dict[str, float] = field(default_factory=dict)
    retained_energy: dict[str, dict[str, float]] = field(default_factory=dict)
    # settings and measurements of methods other than UNITE (MASA: gene rank, alignment budget and
    # losses; XPERT: the expert analysis report); JSON, so it travels inside the checksummed config
    method_config: dict[str, Any] = field(default_factory=dict)
    # the recipe that made the gene: the method's config (unite_hf.methods.<method>.config), as mergekit
    # keeps its YAML; `unite-hf extract --config` runs it again. Empty for genes saved before recipes.
    recipe: dict[str, Any] = field(default_factory=dict)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> "GeneConfig":
        """Validate ``data`` against the typed schema (the field annotations) and build the config.

        Raises :class:`GeneFormatError` for a non-object, an unsupported ``format_version``, a missing
        required key (:data:`REQUIRED_CONFIG_KEYS`), a value of the wrong type (``format_version: true``,
        ``moe_layers: "0,1"``, ``num_layers: "three"``) or a file record without ``size``/``sha256``.
        Unknown keys are kept out of the config with a ``UserWarning`` naming them (a newer writer's
        optional field must not make an older reader refuse the gene; anything a reader needs bumps
        ``format_version``)."""
        if not isinstance(data, dict):
            raise GeneFormatError(f"{CONFIG_NAME} must hold a JSON object, not {type(data).__name__}")
        version = data.get("format_version")
        if type(version) is not int or version > GENE_FORMAT_VERSION or version < 1:
            raise GeneFormatError(
                f"gene format version {version!r} is not supported by unite_hf {__version__} "
                f"(reads versions 1..{GENE_FORMAT_VERSION}); upgrade unite_hf."
            )
        missing = [key for key in REQUIRED_CONFIG_KEYS if key not in data]
        if missing:
            raise GeneFormatError(f"{CONFIG_NAME} lacks the required keys {missing}; the gene is incomplete.")
        hints = typing.get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            warnings.warn(f"{CONFIG_NAME}: ignoring keys this unite_hf does not know: {unknown}", UserWarning,
                          stacklevel=3)
        for key in sorted(known & set(data)):
            problem = _type_problem(data[key], hints[key])
            if problem:
                raise GeneFormatError(f"{CONFIG_NAME}: {key!r} {problem}, got {data[key]!r:.80}")
        for name, record in data["files"].items():
            problem = record_name_problem(name)
            if problem:  # refused from the name alone: the named path is never looked at
                raise GeneFormatError(f"{CONFIG_NAME}: the record of {name[:200]!r} {problem}; a record names a file "
                                      "inside the gene folder")
            if not (isinstance(record, dict) and type(record.get("size")) is int and record["size"] >= 0
                    and isinstance(record.get("sha256"), str) and _SHA256.fullmatch(record["sha256"])):
                raise GeneFormatError(f"{CONFIG_NAME}: the record of {name!r} needs an int 'size' and a hex "
                                      f"'sha256', got {record!r:.120}")
        return cls(**{key: value for key, value in data.items() if key in known})


# keys every gene config carries since format 1; the others default when an older writer lacked them
REQUIRED_CONFIG_KEYS = ("format_version", "num_layers", "moe_layers", "hidden_size", "source_config", "files")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _type_problem(value: Any, hint: Any) -> str | None:
    """Why ``value`` does not fit the annotation ``hint`` (None when it fits). bool is not an int here."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return None
    if origin in (typing.Union, types.UnionType):
        return None if any(_type_problem(value, arg) is None for arg in args) else f"must be {hint}"
    if hint is type(None):
        return None if value is None else "must be null"
    if hint is bool:
        return None if isinstance(value, bool) else "must be true or false"
    if hint is int:
        return None if type(value) is int else "must be an integer"
    if hint is float:
        return None if type(value) in (int, float) else "must be a number"
    if hint is str:
        return None if isinstance(value, str) else "must be a string"
    if origin is list:
        if not isinstance(value, list):
            return f"must be a list of {args[0].__name__ if isinstance(args[0], type) else args[0]}"
        inner = next((p for p in (_type_problem(v, args[0]) for v in value) if p), None)
        return None if inner is None else f"holds an item that {inner}"
    if origin is dict:
        if not isinstance(value, dict):
            return "must be a JSON object"
        inner = next((p for p in (_type_problem(v, args[1]) for v in value.values()) if p), None)
        return None if inner is None else f"holds a value that {inner}"
    return None


GeneT = TypeVar("GeneT", bound="Gene")
GENE_TYPES: dict[str, type["Gene"]] = {}


def register_gene(method: str):
    """Class decorator: genes whose config says ``method`` load as this class."""

    def decorator(cls: type[GeneT]) -> type[GeneT]:
        cls.method = method
        GENE_TYPES[method] = cls
        return cls

    return decorator


class Gene:
    """What every gene shares: config, copied source weights, tokenizer, and the folder / Hub I/O.

    Subclasses implement :meth:`gene_state_dict`, :meth:`_from_tensors` and :meth:`card_variables`.
    """

    method: ClassVar[str] = ""
    card_template: ClassVar[str] = ""
    # the format_version this class writes (see GENE_FORMAT_VERSION): the oldest that holds its files
    format_version: ClassVar[int] = 2

    def __init__(self, config: GeneConfig, source_state_dict: dict[str, torch.Tensor] | None = None,
                 tokenizer=None) -> None:
        self.config = config
        self.source_state_dict = source_state_dict if source_state_dict is not None else {}
        self.tokenizer = tokenizer  # the source's tokenizer, saved beside the gene when set
        # the gene's own Hub repo id or folder (set by from_pretrained, save_pretrained and push_to_hub):
        # what targets grown from it record as config.gene
        self.name_or_path: str | None = None
        # the commit of the Hub repo it was loaded from or pushed as (None for a folder): targets record it as
        # config.gene_revision, so a target grown from a revision names that revision, not the branch's head
        self.revision: str | None = None
        self._card_repo_id: str | None = None  # set while push_to_hub renders the card

    # -- per method ------------------------------------------------------------------------------
    def gene_state_dict(self) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        """The tensors of ``gene.safetensors``."""
        raise NotImplementedError

    @classmethod
    def _from_tensors(cls: type[GeneT], config: GeneConfig, gene_tensors: dict[str, torch.Tensor],
                      source_tensors: dict[str, torch.Tensor]) -> GeneT:  # pragma: no cover - abstract
        """Rebuild the gene from its files; raise ``KeyError``/``ValueError`` when a tensor is missing."""
        raise NotImplementedError

    @property
    def recipe(self):
        """The method config that made this gene (``None`` for a gene saved before recipes were kept);
        ``gene.recipe.to_yaml()`` is a file ``unite-hf extract --config`` runs again. A setting given in
        Python that no file can hold (a token tensor) reads as ``None``."""
        if not self.config.recipe:
            return None
        from .methods.config import CONFIG_CLASSES

        return CONFIG_CLASSES[self.config.method].from_dict(self.config.recipe)

    def card_variables(self, config: GeneConfig) -> dict[str, Any]:  # pragma: no cover - abstract
        """Variables of the card template (``model_cards/<card_template>``)."""
        raise NotImplementedError

    def render_card(self, config: GeneConfig | None = None, model_id: str | None = None) -> str:
        """The gene's model card: ``base_model`` is the source's Hub id (never a local path), the
        license the source's, ``datasets`` the calibration corpus's Hub id; ``model_id`` (the repo
        id or folder the card goes to) fills the loading snippet."""
        from .cards import calibration_dataset_ids, hub_id, render_card

        config = config or self.config
        card_data = {"library_name": "unite_hf", "tags": [config.method, "learngene", "gene"],
                     "base_model": hub_id(config.source_id), "license": config.source_license,
                     "datasets": calibration_dataset_ids(config.calibration) or None}
        model_id = model_id or self._card_repo_id or self.name_or_path or "path/to/this/gene"
        return render_card(self.card_template, card_data=card_data, **_common_card_variables(config),
                           model_id=model_id, **self.card_variables(config))

    # -- serialisation ---------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write the gene to a folder, replacing any gene there as a whole.

        The files are staged in a sibling folder and swapped in with one rename (see
        :func:`unite_hf.io.write_folder_atomically`): a crash, a kill or a full disk leaves the
        complete old gene or the complete new one, never a mix, and concurrent saves to one path are
        serialized. ``gene_config.json`` records the size and SHA-256 of every other file (tokenizer
        and card included). A folder holding files that are not part of a gene is refused, so a
        mistyped path never replaces someone's folder. Saving the same gene twice gives the same bytes."""
        config = dataclasses.replace(self.config, method=self.method, library_version=__version__, files={},
                                     format_version=self.format_version)
        metadata = {"format": "pt", "unite_gene_format": str(config.format_version)}
        json.dumps(config.to_dict())  # an unserialisable config fails here, before any file is written
        gene_tensors = self.gene_state_dict()
        # every tensor is validated before the first byte is written
        check_finite(gene_tensors, f"the gene ({GENE_WEIGHTS_NAME})")
        check_finite(self.source_state_dict, f"the gene ({SOURCE_WEIGHTS_NAME})")
        card = self.render_card(config, model_id=self._card_repo_id or Path(save_directory).name)

        def write(staging: Path) -> None:
            save_safetensors(gene_tensors, staging / GENE_WEIGHTS_NAME, metadata)
            save_safetensors(dict(self.source_state_dict), staging / SOURCE_WEIGHTS_NAME, metadata)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(staging)
            atomic_write_text(card, staging / CARD_NAME)
            config.files = file_records(staging, exclude=(CONFIG_NAME,))
            atomic_write_json(config.to_dict(), staging / CONFIG_NAME)  # last: it vouches for the others

        write_folder_atomically(save_directory, write, owned=_gene_owner(Path(save_directory)))
        self.config = config
        if self._card_repo_id is None:  # push_to_hub names the gene by its repo id instead
            self.name_or_path, self.revision = str(save_directory), None
        return Path(save_directory)

    @classmethod
    def from_pretrained(
        cls: type[GeneT],
        path_or_repo_id: str | os.PathLike,
        *,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        force_download: bool = False,
        verify_checksums: bool = True,
    ) -> GeneT:
        """Load a gene from a local folder or a Hub repo id (safetensors only, checksums verified).

        Everything is validated before any model could be built from it: the config against its typed
        schema, every recorded file against its size and SHA-256 (the card excepted: it is
        documentation, and may be edited on the Hub), no unrecorded file beside them, and every tensor's
        dtype, shape and finiteness against the config; inconsistencies raise :class:`GeneFormatError`,
        damaged files :class:`~unite_hf.io.CorruptedFileError`.

        ``Gene.from_pretrained`` (or :func:`load_gene`) returns the class registered for the gene's
        method; a subclass refuses genes of another method."""
        directory = Path(path_or_repo_id)
        download = None
        if not directory.is_dir():
            download = dict(repo_id=str(path_or_repo_id), revision=revision, token=token, cache_dir=cache_dir,
                            local_files_only=local_files_only, force_download=force_download)
            directory = _download(**download)
        # a save swapping the folder in mid-load makes the files disagree: load again (the folder's
        # inode changes with every swap), so a reader never gets, nor fails on, a half-old half-new gene
        for attempt in range(_LOAD_ATTEMPTS):
            before = _folder_identity(directory)
            try:
                gene = cls._load_folder(directory, verify_checksums, download)
            except Exception:  # noqa: BLE001 - any failure, if the folder changed under it (the tokenizer's too)
                if attempt == _LOAD_ATTEMPTS - 1 or _folder_identity(directory) == before:
                    raise
                continue
            if _folder_identity(directory) == before:
                break
        else:
            raise CorruptedFileError(f"{directory} kept changing while it was loaded ({_LOAD_ATTEMPTS} attempts)")
        gene.name_or_path = str(path_or_repo_id)  # the gene's own name: targets record it as config.gene
        gene.revision = _snapshot_commit(directory) if download is not None else None
        return gene

    @classmethod
    def _load_folder(cls: type[GeneT], directory: Path, verify_checksums: bool,
                     download: dict[str, Any] | None) -> GeneT:
        """One validated load of a gene folder (see :meth:`from_pretrained`)."""
        config_path = directory / CONFIG_NAME
        if not config_path.is_file():
            raise GeneFormatError(f"{directory} is not a unite_hf gene: {CONFIG_NAME} is missing.")
        from .methods.config import check_nesting

        try:
            data = json.loads(config_path.read_text(encoding="utf-8"))
            check_nesting(data, str(config_path))  # source_config feeds transformers' configs, which recurse
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CorruptedFileError(f"{config_path} is not valid JSON: {err}") from err
        except (RecursionError, ValueError) as err:  # json's parser recurses: ~1000 nested lists are enough
            raise GeneFormatError(str(err) if isinstance(err, ValueError) else
                                  f"{config_path} nests lists or mappings too deeply to read; refusing it") from None
        config = GeneConfig.from_dict(data)
        gene_class = _gene_class(config.method)
        if not issubclass(gene_class, cls):
            raise GeneFormatError(f"{directory} holds a {config.method!r} gene ({gene_class.__name__}), not a "
                                  f"{cls.__name__}; load it with unite_hf.load_gene.")
        for name in (GENE_WEIGHTS_NAME, SOURCE_WEIGHTS_NAME):
            if name not in config.files:
                raise GeneFormatError(f"{config_path} records no checksum for {name}; the save did not complete.")
        if download is not None and any(not (directory / name).is_file() for name in config.files):
            directory = _download(**download, patterns=[CONFIG_NAME, *config.files])  # files beyond the defaults
        gene_class.validate_config(config)
        _verify_gene_files(directory, config, verify_checksums, download["repo_id"] if download else None)
        gene_tensors = load_safetensors_checked(record_path(directory, GENE_WEIGHTS_NAME),
                                                config.files[GENE_WEIGHTS_NAME], verify_checksums)
        source_tensors = load_safetensors_checked(record_path(directory, SOURCE_WEIGHTS_NAME),
                                                  config.files[SOURCE_WEIGHTS_NAME], verify_checksums)
        gene_class.validate_tensors(config, gene_tensors, source_tensors)
        check_source_config(config, source_tensors)
        known = gene_class.known_tensors(config)
        if known is not None:
            _refuse_unknown_tensors(set(gene_tensors) - known, config)
        try:
            gene = gene_class._from_tensors(config, gene_tensors, source_tensors)
        except (KeyError, ValueError) as err:
            raise GeneFormatError(f"{directory / GENE_WEIGHTS_NAME} does not hold a complete {config.method} gene: "
                                  f"{err}") from err
        if known is None:  # a class that names no tensors: what it would save again is what it knows
            _refuse_unknown_tensors(set(gene_tensors) - set(gene.gene_state_dict()), config)
        if (directory / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer

            gene.tokenizer = AutoTokenizer.from_pretrained(directory)
        return gene

    # -- validation on load (before any model is built) --------------------------------------------
    @classmethod
    def validate_config(cls, config: GeneConfig) -> None:
        """Raise :class:`GeneFormatError` where the config's values disagree with each other."""
        check_source_config_floats(config.source_config)
        if config.num_layers < 1:
            raise GeneFormatError(f"{CONFIG_NAME}: num_layers must be at least 1, got {config.num_layers}")
        for key in ("moe_layers", "dense_layers"):
            layers = getattr(config, key)
            if sorted(set(layers)) != layers or any(not 0 <= layer < config.num_layers for layer in layers):
                raise GeneFormatError(f"{CONFIG_NAME}: {key} must be increasing layer indices below num_layers="
                                      f"{config.num_layers}, got {layers}")
        for key in ("hidden_size", "num_experts", "expert_intermediate_size"):
            if getattr(config, key) < 0:
                raise GeneFormatError(f"{CONFIG_NAME}: {key} must not be negative, got {getattr(config, key)}")
        if not config.projections or len(set(config.projections)) != len(config.projections):
            raise GeneFormatError(f"{CONFIG_NAME}: projections must name each FFN projection the gene holds once "
                                  f"(at least one), got {config.projections}")

    @classmethod
    def known_tensors(cls, config: GeneConfig) -> set[str] | None:
        """Every name ``gene.safetensors`` may hold for ``config``; a load refuses any other tensor
        (:class:`GeneFormatError`). ``None`` (the default, for a method that does not list them): the names
        the rebuilt gene would save again (:meth:`gene_state_dict`)."""
        return None

    @classmethod
    def validate_tensors(cls, config: GeneConfig, gene_tensors: dict[str, torch.Tensor],
                         source_tensors: dict[str, torch.Tensor]) -> None:
        """Raise :class:`GeneFormatError` for a non-floating or non-finite tensor (subclasses add shapes)."""
        for file, tensors in ((GENE_WEIGHTS_NAME, gene_tensors), (SOURCE_WEIGHTS_NAME, source_tensors)):
            for name, tensor in tensors.items():
                if not tensor.is_floating_point():
                    raise GeneFormatError(f"{file}: tensor {name!r} is {tensor.dtype}; a gene holds floating-point "
                                          "tensors only")
                if not torch.isfinite(tensor).all():
                    raise GeneFormatError(f"{file}: tensor {name!r} contains NaN or Inf")

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | None = None,
        revision: str | None = None,
        commit_message: str | None = None,
        create_pr: bool = False,
    ):
        """Save to a temporary folder and make the repo hold exactly that gene, in one commit; returns the
        commit info.

        The commit uploads every file of the gene and deletes every other file of the repo (at
        ``revision``, default the main branch), ``.gitattributes`` excepted: an older gene's tokenizer,
        a file added on the Hub, anything the new gene lacks, since a gene load refuses files its config
        does not record. A repo holding a model or a peft adapter (``config.json``,
        ``adapter_config.json``) is refused with :class:`~unite_hf.io.ArtifactWriteError` before the
        gene is saved; so is the commit, by the Hub, if another commit lands on the revision meanwhile."""
        from huggingface_hub import HfApi

        from .io import hub_commit_artifact, hub_push_base, push_staging

        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        base = hub_push_base(api, repo_id, revision=revision, refuse=("config.json", "adapter_config.json"))
        self._card_repo_id = repo_id
        try:
            with push_staging() as tmp:  # a push killed mid-way leaves it for the next push or save to remove
                folder = self.save_pretrained(Path(tmp) / "gene")
                info = hub_commit_artifact(api, base, folder, revision=revision, create_pr=create_pr,
                                           commit_message=commit_message or f"Upload {self.method.upper()} gene")
        finally:
            self._card_repo_id = None
        self.name_or_path, self.revision = repo_id, getattr(info, "oid", None)
        return info


def _gene_class(method: str) -> type[Gene]:
    # every method folder registered its gene class when ``import unite_hf`` loaded the methods
    if method not in GENE_TYPES:
        raise GeneFormatError(f"unknown gene method {method!r}; this unite_hf reads {sorted(GENE_TYPES)}")
    return GENE_TYPES[method]


def __getattr__(name: str) -> Any:
    if name == "GENE_MODULES":  # the string map that the method registry replaced
        warnings.warn("unite_hf.gene.GENE_MODULES is deprecated: methods register themselves "
                      "(unite_hf.methods.METHODS, unite_hf.gene.GENE_TYPES)", FutureWarning, stacklevel=2)
        return {method: cls.__module__ for method, cls in GENE_TYPES.items() if method != "unite"}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_gene(path_or_repo_id: str | os.PathLike | Gene, **kwargs: Any) -> Gene:
    """Load any gene (UNITE, XPERT or MASA) from a folder or Hub repo; a loaded gene passes through."""
    if isinstance(path_or_repo_id, Gene):
        return path_or_repo_id
    return Gene.from_pretrained(path_or_repo_id, **kwargs)


@register_gene("unite")
class UniteGene(Gene):
    """Shared FFN bases and cores of a MoE source, with the non-FFN weights and provenance.

    Build one with :func:`unite_hf.extract_universal_knowledge`; load one with
    :meth:`from_pretrained`. Inspection API:

    - :attr:`moe_layers`: source layer indices that hold experts, in order;
    - :attr:`importance`: float tensor ``[len(moe_layers), num_experts]`` (Fisher scores; ``None`` for a
      gene whose method computes none);
    - :meth:`fused_weight`: a layer's fused projection rebuilt from the decomposition, ``(out, in)``.
    """

    card_template = "gene.md"
    format_version = 1

    def __init__(
        self,
        config: GeneConfig,
        decompositions: dict[str, Decomposition],
        importance: torch.Tensor | None,
        frequency: torch.Tensor,
        source_state_dict: dict[str, torch.Tensor],
        fused_biases: dict[str, torch.Tensor] | None = None,
        tokenizer=None,
    ) -> None:
        super().__init__(config, source_state_dict, tokenizer)
        self.decompositions = decompositions
        self._importance = importance
        self._frequency = frequency
        self.fused_biases = fused_biases or {}
        # optional (len(moe_layers), E) routed counts and routing mass: what `concat` fusion scales by
        self.routing: dict[str, torch.Tensor] = {}

    # -- inspection ------------------------------------------------------------------------------
    @property
    def moe_layers(self) -> list[int]:
        return list(self.config.moe_layers)

    @property
    def importance(self) -> torch.Tensor | None:
        """Fisher score per expert, ``[len(moe_layers), num_experts]``. Always the Fisher, whatever
        fusion was used (``config.fusion`` says which weights built the gene); ``None`` where the gene's
        method computes no Fisher."""
        return None if self._importance is None else self._importance.float()

    @property
    def frequency(self) -> torch.Tensor:
        """Routing frequency per expert, ``[len(moe_layers), num_experts]``, rows summing to 1."""
        return self._frequency.float()

    @property
    def spectral_energy(self) -> dict[str, dict[str, torch.Tensor]]:
        """``proj -> mode -> cumulative energy`` per rank (paper A.5 rank heuristic)."""
        return {proj: dict(dec.spectral_energy) for proj, dec in self.decompositions.items()}

    @property
    def ranks(self) -> dict[str, tuple[int, int, int]]:
        return {proj: dec.ranks for proj, dec in self.decompositions.items()}

    def expert_importance(self):
        """The stored Fisher and routing frequency as an :class:`~unite_hf.importance.ExpertImportance`,
        to re-extract with another fusion, decomposition or rank without a new calibration pass. Raises
        ``ValueError`` for a gene that stores no Fisher (an XPERT gene: its method needs none)."""
        from .importance import ExpertImportance

        if self._importance is None:
            raise ValueError(f"{self.name_or_path or 'this gene'} is a {self.method} gene: it stores no Fisher, so its "
                             "statistics cannot seed a UNITE extraction; use a UNITE gene of the source")

        routing = {name: tensor.double() for name, tensor in self.routing.items()}
        return ExpertImportance(moe_layers=self.moe_layers, fisher=self._importance.double(),
                                frequency=self._frequency.double(), num_sequences=self.config.num_sequences,
                                labels=self.config.fisher_labels, **routing)

    def _row(self, layer: int) -> int:
        if layer not in self.config.moe_layers:
            raise KeyError(f"layer {layer} holds no experts; the gene's MoE layers are {self.config.moe_layers}")
        return self.config.moe_layers.index(layer)

    def _decomposition(self, proj: str) -> Decomposition:
        if proj not in self.decompositions:
            raise KeyError(f"unknown projection {proj!r}; this gene has {sorted(self.decompositions)}")
        return self.decompositions[proj]

    def fused_weight(self, layer: int, proj: str) -> torch.Tensor:
        """The fused ``proj`` matrix of source ``layer``, rebuilt from the decomposition, ``(out, in)``."""
        return self._decomposition(proj).reconstruct_layer(self._row(layer))

    def fused_bias(self, layer: int, proj: str) -> torch.Tensor | None:
        """The fused ``proj`` bias of source ``layer`` (``None`` for bias-free experts)."""
        self._decomposition(proj)
        bias = self.fused_biases.get(proj)
        return None if bias is None else bias[self._row(layer)]

    def __repr__(self) -> str:
        c = self.config
        return (
            f"{type(self).__name__}(source={c.source_id!r}, moe_layers={c.moe_layers}, experts={c.num_experts}, "
            f"fusion={c.fusion!r}, decomposition={c.decomposition!r}, ranks={c.ranks})"
        )

    # -- validation on load ----------------------------------------------------------------------
    @classmethod
    def validate_config(cls, config: GeneConfig) -> None:
        super().validate_config(config)
        if not config.source_config:
            raise GeneFormatError(f"{CONFIG_NAME}: source_config is empty; targets are built from it")
        if not config.moe_layers or config.num_experts < 1 or config.hidden_size < 1:
            raise GeneFormatError(f"{CONFIG_NAME}: a {config.method} gene needs moe_layers, num_experts and hidden_size")
        for proj in config.projections:
            ranks = config.ranks.get(proj)
            if ranks is None or len(ranks) != 3 or min(ranks) < 1:
                raise GeneFormatError(f"{CONFIG_NAME}: ranks[{proj!r}] must be three positive ints, got {ranks}")

    @classmethod
    def validate_tensors(cls, config: GeneConfig, gene_tensors: dict[str, torch.Tensor],
                         source_tensors: dict[str, torch.Tensor]) -> None:
        """Dtype and finiteness (see :meth:`Gene.validate_tensors`), then every shape against the config."""
        super().validate_tensors(config, gene_tensors, source_tensors)
        n_layers, width, hidden = len(config.moe_layers), config.expert_intermediate_size, config.hidden_size
        expected: dict[str, tuple[tuple[int | None, ...], ...]] = {
            f"importance.{name}": ((n_layers, config.num_experts),)
            for name in ("fisher", "frequency", "routed", "routing_mass", "commonality")}
        for proj in config.projections:
            r_layer, r_out, r_in = config.ranks[proj]
            d_out, d_in = {"down": (hidden, width)}.get(proj, (width, hidden)) if proj in PROJECTIONS else (None, None)
            prefix = f"ffn.{proj}"
            expected[f"{prefix}.core"] = ((r_layer, r_out, r_in),)
            expected[f"{prefix}.layer_factor"] = ((n_layers, r_layer),)
            expected[f"{prefix}.out_factor"] = ((d_out, r_out), (n_layers, d_out, r_out))  # shared or per layer
            expected[f"{prefix}.in_factor"] = ((d_in, r_in), (n_layers, d_in, r_in))
            expected[f"{prefix}.fused_bias"] = ((n_layers, d_out),)
            expected[f"{prefix}.expert_factor"] = ((None, r_layer),)  # XPERT: one row per selected expert
        for name, tensor in gene_tensors.items():
            shapes = expected.get(name)
            if shapes is not None and not any(_shape_fits(tuple(tensor.shape), shape) for shape in shapes):
                raise GeneFormatError(f"{GENE_WEIGHTS_NAME}: tensor {name!r} has shape {tuple(tensor.shape)}; the "
                                      f"config implies {' or '.join(str(s) for s in shapes)} (None: any size)")
        for name in cls.required_statistics(config):
            if name not in gene_tensors:
                raise GeneFormatError(f"{GENE_WEIGHTS_NAME}: tensor {name!r} is missing")

    @classmethod
    def required_statistics(cls, config: GeneConfig) -> tuple[str, ...]:
        """The per-expert statistics every gene of this class and format holds in ``gene.safetensors``."""
        return "importance.fisher", "importance.frequency"

    @classmethod
    def known_tensors(cls, config: GeneConfig) -> set[str]:
        """The decomposition, spectral energies and fused bias of each projection, and the per-expert statistics."""
        parts = ("core", "layer_factor", "out_factor", "in_factor", "fused_bias",
                 *(f"spectral_energy.{mode}" for mode in ("layer", "out", "in")))
        return ({f"ffn.{proj}.{part}" for proj in config.projections for part in parts}
                | {f"importance.{name}" for name in ("fisher", "frequency", "routed", "routing_mass")})

    # -- serialisation ---------------------------------------------------------------------------
    def gene_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors of ``gene.safetensors`` (see the module docstring for the keys)."""
        tensors: dict[str, torch.Tensor] = {}
        for proj, dec in self.decompositions.items():
            tensors.update(dec.state_dict(f"ffn.{proj}"))
        for proj, bias in self.fused_biases.items():
            tensors[f"ffn.{proj}.fused_bias"] = bias
        if self._importance is not None:
            tensors["importance.fisher"] = self._importance
        tensors["importance.frequency"] = self._frequency
        tensors.update({f"importance.{name}": tensor for name, tensor in self.routing.items()})
        return tensors

    @classmethod
    def _from_tensors(cls, config: GeneConfig, gene_tensors: dict[str, torch.Tensor],
                      source_tensors: dict[str, torch.Tensor]) -> "UniteGene":
        decompositions = {
            proj: Decomposition.from_state_dict(gene_tensors, f"ffn.{proj}", config.decomposition,
                                                config.relative_error.get(proj, float("nan")))
            for proj in config.projections
        }
        fused_biases = {proj: gene_tensors[f"ffn.{proj}.fused_bias"] for proj in config.projections
                        if f"ffn.{proj}.fused_bias" in gene_tensors}
        gene = cls(config, decompositions, gene_tensors.get("importance.fisher"), gene_tensors["importance.frequency"],
                   source_tensors, fused_biases)
        gene.routing = {name: gene_tensors[f"importance.{name}"] for name in ("routed", "routing_mass")
                        if f"importance.{name}" in gene_tensors}
        return gene

    def card_variables(self, config: GeneConfig) -> dict[str, Any]:
        return {"energy_rows": _energy_rows(config), "fisher_labels": config.fisher_labels, "fusion": config.fusion,
                "decomposition": config.decomposition, "num_experts": config.num_experts}


_LOAD_ATTEMPTS = 5
_COMMIT = re.compile(r"[0-9a-f]{40}")


def _snapshot_commit(directory: Path) -> str | None:
    """The commit a Hub download resolved to: huggingface_hub names each snapshot folder after its commit
    (``.../snapshots/<sha>``), whatever branch, tag or sha the load asked for."""
    return directory.name if _COMMIT.fullmatch(directory.name) else None


def _folder_identity(directory: Path) -> tuple[int, int] | None:
    """(device, inode) of a folder: a save replaces the folder, so this changes with every save."""
    try:
        stat = directory.stat()
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def _download(repo_id: str, revision: str | None, token, cache_dir, local_files_only: bool,
              force_download: bool = False, patterns: list[str] | None = None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(snapshot_download(repo_id, revision=revision, token=token, cache_dir=cache_dir,
                                      local_files_only=local_files_only, force_download=force_download,
                                      allow_patterns=patterns or list(GENE_FILES + TOKENIZER_FILES)))
    except HFValidationError as err:
        raise GeneFormatError(f"{repo_id!r} is neither a local gene folder nor a valid Hub repo id") from err


# leftovers of older unite_hf versions' per-file writes inside a gene folder: `.gene.safetensors.abc123.tmp`
_LEGACY_TEMP = re.compile(r"^\..+\.tmp$")


def _gene_owner(directory: Path):
    """``owned(name)``: whether an entry of an existing folder is part of a gene (replaced by a save)
    or foreign (the save is refused). Only a folder with a valid ``gene_config.json`` (a JSON object with
    an integer ``format_version`` and a ``files`` record) is a gene: there the gene and tokenizer files
    and whatever its config records are the gene's. Elsewhere names alone prove nothing (a tokenizer
    and a README are not a gene): nothing is, but leftovers of older versions' per-file writes."""
    recorded: set[str] | None = None
    try:
        config = json.loads((directory / CONFIG_NAME).read_text(encoding="utf-8"))
        if isinstance(config, dict) and type(config.get("format_version")) is int and isinstance(config.get("files"), dict):
            recorded = {str(name).split("/")[0] for name in config["files"]}
    except (OSError, ValueError, RecursionError):
        pass  # no readable config: not a gene

    def owned(name: str) -> bool:
        if _LEGACY_TEMP.match(name):
            return True
        return recorded is not None and (name in GENE_FILES or name in TOKENIZER_FILES or name in recorded)

    return owned


def check_gene_destination(path: str | os.PathLike) -> None:
    """Raise :class:`~unite_hf.io.ArtifactWriteError` (an ``OSError``) now if a gene could not be saved
    at ``path`` later: an existing file, a read-only location, a folder that is not a gene (no valid
    ``gene_config.json``) and is not empty, a gene folder holding foreign files."""
    check_writable_folder(path, owned=_gene_owner(Path(path)))


def _verify_gene_files(directory: Path, config: GeneConfig, verify_checksums: bool,
                       repo_id: str | None = None) -> None:
    """Every recorded file matches its record, and (for genes that record every file, i.e. those that
    record their card) no unrecorded file sits beside them: a leftover of another gene would otherwise
    load as part of this one. The weights are checked as they are read; the card is not checked.
    ``repo_id``: the folder is a download of that Hub repo (the error's advice is then a push)."""
    for name, record in config.files.items():
        path = record_path(directory, name)  # a record cannot name a file outside the folder, nor a link out of it
        if name not in (GENE_WEIGHTS_NAME, SOURCE_WEIGHTS_NAME, CARD_NAME):
            verify_file(path, record, verify_checksums)
    if set(config.files) == {GENE_WEIGHTS_NAME, SOURCE_WEIGHTS_NAME}:  # written before every file was recorded
        unchecked = sorted(name for name in TOKENIZER_FILES if (directory / name).is_file())
        for name in unchecked:
            record_path(directory, name)  # no link out of the folder, even unrecorded
        if unchecked:
            warnings.warn(f"{directory} is a gene saved before genes recorded every file: its tokenizer files "
                          f"{unchecked} are loaded unchecked; save the gene again to record them", UserWarning,
                          stacklevel=4)
        return
    unrecorded = sorted(path.relative_to(directory).as_posix() for path in directory.rglob("*")
                        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(directory).parts)
                        and path.relative_to(directory).as_posix() not in config.files
                        and path.name != CONFIG_NAME)
    if not unrecorded:
        return
    if repo_id is not None:
        raise GeneFormatError(f"the Hub repo {repo_id} holds files that {CONFIG_NAME} does not record: {unrecorded}; "
                              "they belong to another push (a mixed gene). Push the gene again: a push deletes every "
                              "file of the repo that the gene lacks.")
    owned = _gene_owner(directory)
    foreign = sorted({name.split("/")[0] for name in unrecorded if not owned(name.split("/")[0])})
    advice = ("Save the gene again: a save replaces them." if not foreign else
              f"{foreign} are not a gene's files: move them out of the folder, then save the gene again (a save "
              "refuses a folder holding files that are not the gene's).")
    raise GeneFormatError(f"{directory} holds files that {CONFIG_NAME} does not record: {unrecorded}; they belong to "
                          f"another save (a mixed gene) or to someone else. {advice}")


def _refuse_unknown_tensors(unknown: set[str], config: GeneConfig) -> None:
    if unknown:
        names = sorted(unknown)
        raise GeneFormatError(f"{GENE_WEIGHTS_NAME} holds tensors a {config.method} gene does not have: "
                              f"{names[:5]}{' ...' if len(names) > 5 else ''}; it was written by another tool or "
                              "another version, or is damaged")


# sizes in a source config that a target allocates by (each must be a positive int where it is set)
_SOURCE_SIZES = ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "moe_intermediate_size",
                 "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
                 "num_local_experts", "num_experts", "n_routed_experts", "num_experts_per_tok")
_LAYER_KEY = re.compile(r"^(.*?\blayers)\.(\d+)\.")
_EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "tok_embeddings.weight",
                       "embed_in.weight")


def check_source_config(config: GeneConfig, source_tensors: dict[str, torch.Tensor]) -> None:
    """Raise :class:`GeneFormatError` where ``source_config`` disagrees with the gene, before a target is built
    from it (its sizes decide what ``from_gene`` allocates): every size it sets is a positive int, its
    ``num_hidden_layers`` and ``hidden_size`` are the gene's ``num_layers`` and ``hidden_size``, and, as far as
    ``source_weights.safetensors`` shows them, the embedding is ``(vocab_size, hidden_size)`` and the decoder
    layers present are exactly ``0 .. num_hidden_layers - 1``."""
    source = config.source_config
    text = source.get("text_config") if isinstance(source.get("text_config"), dict) and \
        "num_hidden_layers" not in source else source  # a composite config keeps the language model's inside
    where = f"{CONFIG_NAME}: source_config" + ("['text_config']" if text is not source else "")
    for key in _SOURCE_SIZES:
        value = text.get(key)
        per_layer = key not in ("vocab_size", "hidden_size", "num_hidden_layers") and isinstance(value, list)
        if value is not None and not all(type(v) is int and v >= 1 for v in (value if per_layer else [value])):
            raise GeneFormatError(f"{where}[{key!r}] must be a positive integer, got {value!r:.40}")
    layers, hidden, vocab = text.get("num_hidden_layers"), text.get("hidden_size"), text.get("vocab_size")
    if layers is not None and layers != config.num_layers:
        raise GeneFormatError(f"{where}['num_hidden_layers'] is {layers}, but the gene's num_layers is {config.num_layers}")
    if hidden is not None and config.hidden_size and hidden != config.hidden_size:
        raise GeneFormatError(f"{where}['hidden_size'] is {hidden}, but the gene's hidden_size is {config.hidden_size}")
    if not source_tensors:  # a method that copies no source weights (MASA): nothing more to compare with
        return
    embeddings = {name: tuple(t.shape) for name, t in source_tensors.items() if name.endswith(_EMBEDDING_SUFFIXES)}
    if vocab is not None and hidden is not None:
        if embeddings:
            name, shape = min(embeddings.items())
            if shape != (vocab, hidden):
                raise GeneFormatError(f"{where} says vocab_size {vocab} and hidden_size {hidden}, but the embedding "
                                      f"{name!r} in {SOURCE_WEIGHTS_NAME} is {shape}")
        elif not any(tuple(t.shape) == (vocab, hidden) for t in source_tensors.values()):
            raise GeneFormatError(f"{where} says vocab_size {vocab} and hidden_size {hidden}, but {SOURCE_WEIGHTS_NAME} "
                                  f"holds no ({vocab}, {hidden}) embedding")
    stacks: dict[str, set[int]] = {}
    for name in source_tensors:
        match = _LAYER_KEY.match(name)
        if match:
            stacks.setdefault(match.group(1), set()).add(int(match.group(2)))
    if layers is not None and stacks and not any(found == set(range(layers)) for found in stacks.values()):
        found = max(stacks.values(), key=len)
        raise GeneFormatError(f"{where} says num_hidden_layers {layers}, but {SOURCE_WEIGHTS_NAME} holds the weights "
                              f"of layers {min(found)}..{max(found)} ({len(found)} layers)")


def _shape_fits(shape: tuple[int, ...], expected: tuple[int | None, ...]) -> bool:
    return len(shape) == len(expected) and all(e is None or s == e for s, e in zip(shape, expected))


def _common_card_variables(config: GeneConfig) -> dict[str, Any]:
    model_type = config.source_model_type or "unknown"
    return {
        "source_id": config.source_id or "unknown", "source_revision": config.source_revision or "unknown",
        # a source built from a config has no id: say so instead of "gene of `unknown`"
        "source_title": f"`{config.source_id}`" if config.source_id else f"a `{model_type}` model built from a config",
        "source_name": f"the model `{config.source_id}`" if config.source_id else f"a `{model_type}` model built from a config",
        "source_model_type": config.source_model_type or "unknown", "moe_layers": config.moe_layers,
        "calibration": config.calibration, "num_sequences": config.num_sequences, "seq_len": config.seq_len,
        "seed": config.seed, "library_version": config.library_version, "method_config": config.method_config,
    }


def _energy_rows(config: GeneConfig) -> str:
    """Markdown rows: ranks, reconstruction error and retained spectral energy per projection."""
    return "\n".join(
        f"| {proj} | {tuple(config.ranks.get(proj, []))} | {config.relative_error.get(proj, float('nan')):.4f} | "
        + " | ".join(f"{config.retained_energy.get(proj, {}).get(mode, float('nan')):.4f}" for mode in ("layer", "out", "in"))
        + " |"
        for proj in config.projections
    )


# The floats of source_config that a grown target uses as they are, by key (nested configs and lists
# included): (key pattern, low, high, low allowed, high allowed). Out of range, the target computes NaN or
# Inf (rms_norm_eps NaN or 0: every norm of a zero vector; rope_theta or a RoPE factor 0: infinite frequencies).
_SOURCE_FLOAT_RANGES = (
    (re.compile(r".*_(eps|epsilon)"), 0.0, 1.0, False, False),  # rms_norm_eps, layer_norm_eps, norm_epsilon
    (re.compile(r".*(dropout|pdrop)"), 0.0, 1.0, True, True),
    (re.compile(r"rope_theta|.*factor|logits_scaling|.*softcapping"), 0.0, float("inf"), False, False),
    (re.compile(r"initializer_range"), 0.0, float("inf"), True, False),
)


def check_source_config_floats(source_config: Any) -> None:
    """Raise :class:`GeneFormatError` naming the first number of ``source_config`` that is NaN or infinite, or
    out of its range (a norm epsilon outside (0, 1), a dropout rate outside [0, 1], ``rope_theta``, a RoPE
    ``factor`` or a logit scale not positive, a negative ``initializer_range``): a target grown from it would
    compute NaN. Only the numbers' values: sizes and their agreement with the weights are checked elsewhere."""
    import math

    stack: list[tuple[str, str, Any]] = [("", "", source_config)]
    while stack:
        where, key, value = stack.pop()
        if isinstance(value, dict):
            stack.extend((f"{where}[{k!r}]", str(k), v) for k, v in reversed(list(value.items())))
        elif isinstance(value, list):
            stack.extend((f"{where}[{i}]", key, v) for i, v in reversed(list(enumerate(value))))
        elif type(value) in (int, float):
            if not math.isfinite(value):
                raise GeneFormatError(f"{CONFIG_NAME}: source_config{where} is {value}; it must be a finite number "
                                      "(a target grown from it would compute NaN)")
            for pattern, low, high, low_ok, high_ok in _SOURCE_FLOAT_RANGES:
                if pattern.fullmatch(key):
                    if not ((low <= value if low_ok else low < value) and (value <= high if high_ok else value < high)):
                        bounds = f"{'[' if low_ok else '('}{low:g}, {high:g}{']' if high_ok else ')'}"
                        raise GeneFormatError(f"{CONFIG_NAME}: source_config{where} is {value}, outside {bounds} (a "
                                              "target grown from it would compute NaN or Inf)")
                    break
