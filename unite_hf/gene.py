"""The gene: the reusable knowledge extracted from a source, as a Hub-shareable checkpoint.

Every method writes the same folder (a local folder, or a Hub model repo)::

    gene_config.json           GeneConfig: method, provenance, shapes, method settings, file checksums
                               (written last, so an interrupted save never loads)
    gene.safetensors           the method's tensors (see each gene class)
    source_weights.safetensors weights copied from the source as they are (may be empty)
    README.md                  model card, from model_cards/gene_<method>.md
    tokenizer files            the source's tokenizer, when set

:class:`Gene` holds that machinery once; each method is a subclass registered under its
``GeneConfig.method`` with :func:`register_gene`, so :func:`load_gene` (or
``Gene.from_pretrained``) returns the right class for any gene folder or repo:

- ``unite`` (:class:`UniteGene`): Tucker bases and cores of the fused experts;
- ``xpert`` (:class:`~unite_hf.methods.xpert.XpertGene`): Tucker bases of the common experts;
- ``masa`` (:class:`~unite_hf.methods.masa.MasaGene`): square gene matrices.

UNITE tensor keys in ``gene.safetensors``: ``ffn.{proj}.core|layer_factor|out_factor|in_factor``,
``ffn.{proj}.spectral_energy.{layer,out,in}``, ``ffn.{proj}.fused_bias``, ``importance.fisher``,
``importance.frequency``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch

from . import __version__
from .decomposition import Decomposition
from .io import (
    CorruptedFileError, atomic_save_safetensors, atomic_write_json, atomic_write_text, check_finite,
    load_safetensors_checked,
)
from .sources import PROJECTIONS

# 1: UNITE genes (still written as 1, so older readers keep reading them); 2: the method registry
# (MASA, XPERT), which older unite_hf versions must refuse with "upgrade", not misread
GENE_FORMAT_VERSION = 2
CONFIG_NAME = "gene_config.json"
GENE_WEIGHTS_NAME = "gene.safetensors"
SOURCE_WEIGHTS_NAME = "source_weights.safetensors"
CARD_NAME = "README.md"
GENE_FILES = (CONFIG_NAME, GENE_WEIGHTS_NAME, SOURCE_WEIGHTS_NAME, CARD_NAME)
# the source's tokenizer travels with the gene, so targets grown from it can be fine-tuned right away
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "chat_template.jinja")


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
    fisher_labels: str = "empirical"
    fusion: str = "fisher"
    decomposition: str = "tucker"
    n_iter_max: int = 25
    ranks: dict[str, list[int]] = field(default_factory=dict)
    relative_error: dict[str, float] = field(default_factory=dict)
    retained_energy: dict[str, dict[str, float]] = field(default_factory=dict)
    # settings and measurements of methods other than UNITE (MASA: gene rank, alignment budget and
    # losses; XPERT: the expert analysis report); JSON, so it travels inside the checksummed config
    method_config: dict[str, Any] = field(default_factory=dict)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GeneConfig":
        version = data.get("format_version")
        if not isinstance(version, int) or version > GENE_FORMAT_VERSION or version < 1:
            raise GeneFormatError(
                f"gene format version {version!r} is not supported by unite_hf {__version__} "
                f"(reads versions 1..{GENE_FORMAT_VERSION}); upgrade unite_hf."
            )
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})


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

    def __init__(self, config: GeneConfig, source_state_dict: dict[str, torch.Tensor] | None = None,
                 tokenizer=None) -> None:
        self.config = config
        self.source_state_dict = source_state_dict if source_state_dict is not None else {}
        self.tokenizer = tokenizer  # the source's tokenizer, saved beside the gene when set
        # the gene's own Hub repo id or folder (set by from_pretrained, save_pretrained and push_to_hub):
        # what targets grown from it record as config.gene
        self.name_or_path: str | None = None
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
        """Write the gene to a folder. Each file is written atomically and the config, which holds
        the other files' checksums, goes last: an interrupted save never leaves a gene that loads."""
        directory = Path(save_directory)
        if directory.exists() and not directory.is_dir():
            raise NotADirectoryError(f"{directory} exists and is not a folder")
        config = dataclasses.replace(self.config, method=self.method, library_version=__version__, files={},
                                     format_version=1 if self.method == "unite" else GENE_FORMAT_VERSION)
        metadata = {"format": "pt", "unite_gene_format": str(config.format_version)}
        json.dumps(config.to_dict())  # an unserialisable config fails here, before any file is written
        gene_tensors = self.gene_state_dict()
        # every tensor is validated before the first byte is written
        check_finite(gene_tensors, f"the gene ({GENE_WEIGHTS_NAME})")
        check_finite(self.source_state_dict, f"the gene ({SOURCE_WEIGHTS_NAME})")
        card = self.render_card(config, model_id=self._card_repo_id or Path(save_directory).name)
        config.files[GENE_WEIGHTS_NAME] = atomic_save_safetensors(gene_tensors, directory / GENE_WEIGHTS_NAME, metadata)
        config.files[SOURCE_WEIGHTS_NAME] = atomic_save_safetensors(
            dict(self.source_state_dict), directory / SOURCE_WEIGHTS_NAME, metadata
        )
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory)
        atomic_write_text(card, directory / CARD_NAME)
        atomic_write_json(config.to_dict(), directory / CONFIG_NAME)
        self.config = config
        if self._card_repo_id is None:  # push_to_hub names the gene by its repo id instead
            self.name_or_path = str(save_directory)
        return directory

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

        ``Gene.from_pretrained`` (or :func:`load_gene`) returns the class registered for the gene's
        method; a subclass refuses genes of another method."""
        directory = Path(path_or_repo_id)
        if not directory.is_dir():
            directory = _download(str(path_or_repo_id), revision, token, cache_dir, local_files_only, force_download)
        config_path = directory / CONFIG_NAME
        if not config_path.is_file():
            raise GeneFormatError(f"{directory} is not a unite_hf gene: {CONFIG_NAME} is missing.")
        try:
            config = GeneConfig.from_dict(json.loads(config_path.read_text(encoding="utf-8")))
        except json.JSONDecodeError as err:
            raise CorruptedFileError(f"{config_path} is not valid JSON: {err}") from err
        gene_class = _gene_class(config.method)
        if not issubclass(gene_class, cls):
            raise GeneFormatError(f"{directory} holds a {config.method!r} gene ({gene_class.__name__}), not a "
                                  f"{cls.__name__}; load it with unite_hf.load_gene.")
        for name in (GENE_WEIGHTS_NAME, SOURCE_WEIGHTS_NAME):
            if name not in config.files:
                raise GeneFormatError(f"{config_path} records no checksum for {name}; the save did not complete.")
        gene_tensors = load_safetensors_checked(directory / GENE_WEIGHTS_NAME, config.files[GENE_WEIGHTS_NAME], verify_checksums)
        source_tensors = load_safetensors_checked(directory / SOURCE_WEIGHTS_NAME, config.files[SOURCE_WEIGHTS_NAME], verify_checksums)
        try:
            gene = gene_class._from_tensors(config, gene_tensors, source_tensors)
        except (KeyError, ValueError) as err:
            raise GeneFormatError(f"{directory / GENE_WEIGHTS_NAME} does not hold a complete {config.method} gene: "
                                  f"{err}") from err
        if (directory / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer

            gene.tokenizer = AutoTokenizer.from_pretrained(directory)
        gene.name_or_path = str(path_or_repo_id)  # the gene's own name: targets record it as config.gene
        return gene

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
        """Save to a temporary folder and upload it as one commit; returns the commit info."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        self._card_repo_id = repo_id
        try:
            with tempfile.TemporaryDirectory() as tmp:
                self.save_pretrained(tmp)
                info = api.upload_folder(repo_id=repo_id, folder_path=tmp, revision=revision,
                                         commit_message=commit_message or f"Upload {self.method.upper()} gene",
                                         create_pr=create_pr)
        finally:
            self._card_repo_id = None
        self.name_or_path = repo_id
        return info


# genes of these methods are registered when their module is imported
GENE_MODULES: dict[str, str] = {"masa": "unite_hf.methods.masa", "xpert": "unite_hf.methods.xpert"}


def _gene_class(method: str) -> type[Gene]:
    if method not in GENE_TYPES and method in GENE_MODULES:
        import importlib

        importlib.import_module(GENE_MODULES[method])
    if method not in GENE_TYPES:
        raise GeneFormatError(f"unknown gene method {method!r}; this unite_hf reads {sorted(set(GENE_TYPES) | set(GENE_MODULES))}")
    return GENE_TYPES[method]


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
    - :attr:`importance`: float tensor ``[len(moe_layers), num_experts]`` (Fisher scores);
    - :meth:`fused_weight`: a layer's fused projection rebuilt from the decomposition, ``(out, in)``.
    """

    card_template = "gene.md"

    def __init__(
        self,
        config: GeneConfig,
        decompositions: dict[str, Decomposition],
        importance: torch.Tensor,
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
    def importance(self) -> torch.Tensor:
        """Fisher score per expert, ``[len(moe_layers), num_experts]``. Always the Fisher, whatever
        fusion was used (``config.fusion`` says which weights built the gene)."""
        return self._importance.float()

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
        to re-extract with another fusion, decomposition or rank without a new calibration pass."""
        from .importance import ExpertImportance

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

    # -- serialisation ---------------------------------------------------------------------------
    def gene_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors of ``gene.safetensors`` (see the module docstring for the keys)."""
        tensors: dict[str, torch.Tensor] = {}
        for proj, dec in self.decompositions.items():
            tensors.update(dec.state_dict(f"ffn.{proj}"))
        for proj, bias in self.fused_biases.items():
            tensors[f"ffn.{proj}.fused_bias"] = bias
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
        gene = cls(config, decompositions, gene_tensors["importance.fisher"], gene_tensors["importance.frequency"],
                   source_tensors, fused_biases)
        gene.routing = {name: gene_tensors[f"importance.{name}"] for name in ("routed", "routing_mass")
                        if f"importance.{name}" in gene_tensors}
        return gene

    def card_variables(self, config: GeneConfig) -> dict[str, Any]:
        return {"energy_rows": _energy_rows(config), "fisher_labels": config.fisher_labels, "fusion": config.fusion,
                "decomposition": config.decomposition, "num_experts": config.num_experts}


def _download(repo_id: str, revision: str | None, token, cache_dir, local_files_only: bool,
              force_download: bool = False) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(snapshot_download(repo_id, revision=revision, token=token, cache_dir=cache_dir,
                                      local_files_only=local_files_only, force_download=force_download,
                                      allow_patterns=list(GENE_FILES + TOKENIZER_FILES)))
    except HFValidationError as err:
        raise GeneFormatError(f"{repo_id!r} is neither a local gene folder nor a valid Hub repo id") from err


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
