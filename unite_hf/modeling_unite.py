"""UNITE target models: the source family's own transformers stack with factorized FFNs.

A target is built from its family's base model (``AutoModel.from_config(config.text_config)``),
so attention, norms, RoPE variants, q/k norms, MLA and multipliers are the family's own code and
stay exact. Only each MoE block (the decoder-layer child that holds ``experts``) is swapped for a
:class:`UniteFFN`, whose projections are rebuilt from the gene as ``W_l = U_out @ G_l @ U_in.T``.

This file is self-contained (torch + transformers) so that a saved target loads with
``trust_remote_code=True`` where unite_hf is not installed. Growing a target from a gene
(``from_gene``) needs the unite_hf package.
"""

import dataclasses
import importlib
import math
import os
import re
import tempfile
import warnings

import torch
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_outputs import (
    BaseModelOutputWithPast, CausalLMOutputWithPast, MultipleChoiceModelOutput, SequenceClassifierOutputWithPast,
)
from transformers.utils import can_return_tuple

from .configuration_unite import UNITE_MODEL_TAGS, UniteConfig  # noqa: F401  (UNITE_MODEL_TAGS: also read from here)
from .model_structure import find_layer_list, is_shared_gate, moe_slot, shared_expert_children  # noqa: F401


def decoder_layers(backbone: nn.Module) -> nn.ModuleList:
    found = find_layer_list(backbone)
    if found is None:
        raise ValueError(f"{type(backbone).__name__} has no decoder layer list")
    return found[1]


class UniteBases(nn.Module):
    """The gene's bases of one projection: ``U_out`` (d_out, r_out) and ``U_in`` (d_in, r_in).

    With ``fold=True`` a side at full rank (``r == d``) holds no basis: an orthonormal square basis is a
    change of coordinates that the core absorbs exactly (``G' = U_out G`` or ``G U_in^T``), so that
    side costs no parameters and the core is the dense matrix along it. That side's attribute is None.
    """

    def __init__(self, d_out: int, d_in: int, r_out: int, r_in: int, fold: bool = False) -> None:
        super().__init__()
        for side, d, r in (("out_basis", d_out, r_out), ("in_basis", d_in, r_in)):
            self.register_parameter(side, None if fold and r == d else nn.Parameter(torch.empty(d, r)))

    def extra_repr(self) -> str:
        def shape(basis):
            return "identity" if basis is None else tuple(basis.shape)
        return f"U_out={shape(self.out_basis)}, U_in={shape(self.in_basis)}"

    def project_in(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ U_in``: the input in the core's coordinates."""
        return x if self.in_basis is None else x @ self.in_basis

    def project_out(self, y: torch.Tensor) -> torch.Tensor:
        """``y @ U_out^T``: core coordinates back to the output space."""
        return y if self.out_basis is None else y @ self.out_basis.T

    def dense(self, core: torch.Tensor) -> torch.Tensor:
        """``U_out @ core @ U_in^T``."""
        weight = core if self.out_basis is None else self.out_basis @ core
        return weight if self.in_basis is None else weight @ self.in_basis.T


class UniteFactorizedLinear(nn.Module):
    """``y = U_out @ G @ U_in.T @ x (+ b)``, computed right to left: O(d r + r^2) per token."""

    def __init__(self, d_out: int, d_in: int, r_out: int, r_in: int, bias: bool, own_bases: bool,
                 fold: bool = False) -> None:
        super().__init__()
        self.d_out, self.d_in = d_out, d_in
        self.core = nn.Parameter(torch.empty(r_out, r_in))
        self.bases = UniteBases(d_out, d_in, r_out, r_in, fold) if own_bases else None
        self.bias = nn.Parameter(torch.empty(d_out)) if bias else None

    def extra_repr(self) -> str:
        r_out, r_in = self.core.shape
        bases = "own bases" if self.bases is not None else "tied bases (shared by all layers)"
        return (f"d_in={self.d_in}, d_out={self.d_out}, rank=(r_out={r_out}, r_in={r_in}), {bases}, "
                f"bias={self.bias is not None}")

    def forward(self, x: torch.Tensor, bases: UniteBases) -> torch.Tensor:
        y = bases.project_out(bases.project_in(x) @ self.core.T)
        return y if self.bias is None else y + self.bias

    def dense_weight(self, bases: UniteBases) -> torch.Tensor:
        """The rebuilt dense matrix ``(d_out, d_in)`` (for inspection and checks). Not called
        ``weight``: peft reads ``module.weight`` as a tensor."""
        return bases.dense(self.core)


class UniteFFN(nn.Module):
    """A fused expert grown from a gene, plus the source's shared experts.

    ``gate``/``up``/``down`` are factorized; ``act(gate(x)) * up(x)`` as in the source experts
    (non-gated experts: ``act(up(x))``). Shared experts, by ``config.shared_experts``:

    - ``"keep"``: the family's own modules, combined as the family does (Qwen2-MoE gates
      ``shared_expert`` by ``sigmoid(shared_expert_gate(x))``, DeepSeek adds ``shared_experts``);
    - ``"fuse"``: re-expressed on the gene's bases with their own small cores
      (``W_shared ~ U_out @ S @ U_in.T``, ``S = U_out.T @ W_shared @ U_in``), keeping only the scalar
      gate; exact at full rank, r x r parameters per projection instead of d x I;
    - ``"drop"``: removed.
    """

    def __init__(self, config: UniteConfig, shared: dict[str, nn.Module], shared_bases: nn.ModuleDict | None) -> None:
        super().__init__()
        hidden, intermediate = config.text_config.hidden_size, config.expert_intermediate_size
        dims = {"gate": (intermediate, hidden), "up": (intermediate, hidden), "down": (hidden, intermediate)}
        self.projections = list(config.projections)
        for proj in self.projections:
            r_out, r_in = config.ranks[proj]
            setattr(self, proj, UniteFactorizedLinear(*dims[proj], r_out, r_in, config.expert_bias,
                                                      own_bases=shared_bases is None,
                                                      fold=config.fold_full_rank_bases))
        self.act_fn = ACT2FN[config.expert_activation]
        self.shared_cores = None
        if config.shared_experts == "fuse" and any(not is_shared_gate(m) for m in shared.values()):
            self.shared_cores = nn.ParameterDict(
                {proj: nn.Parameter(torch.empty(*config.ranks[proj])) for proj in self.projections})
            shared = {n: m for n, m in shared.items() if is_shared_gate(m)}
        for name, module in shared.items():
            self.add_module(name, module)
        # the family's shared experts by role (names differ: shared_expert, shared_experts, shared_mlp)
        self.shared_mlps = [n for n, m in shared.items() if not is_shared_gate(m)]
        self.shared_gates = [n for n, m in shared.items() if is_shared_gate(m)]
        # not registered: tied bases belong to the model, this is only a lookup
        self.__dict__["_shared_bases"] = shared_bases

    def extra_repr(self) -> str:
        shared = "fused onto the bases" if self.shared_cores is not None else "none"
        if self.shared_cores is None and self.shared_mlps:
            shared = "kept"
        return f"projections={self.projections}, act={type(self.act_fn).__name__}, shared_experts={shared}"

    def linear(self, proj: str) -> UniteFactorizedLinear:
        """The factorized ``proj`` projection (unwrapped from a peft LoRA layer, if one wraps it)."""
        module = getattr(self, proj)
        return module.get_base_layer() if hasattr(module, "get_base_layer") else module

    def _bases(self, proj: str) -> UniteBases:
        shared = self.__dict__["_shared_bases"]
        return shared[proj] if shared is not None else self.linear(proj).bases

    def project(self, proj: str, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, proj)(x, self._bases(proj))

    def _mlp(self, x: torch.Tensor, project) -> torch.Tensor:
        if "gate" in self.projections:
            return project("down", self.act_fn(project("gate", x)) * project("up", x))
        return project("down", self.act_fn(project("up", x)))

    def _shared_on_bases(self, proj: str, x: torch.Tensor) -> torch.Tensor:
        bases = self._bases(proj)
        return bases.project_out(bases.project_in(x) @ self.shared_cores[proj].T)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.combine(self._mlp(hidden_states, self.project), hidden_states)

    def routed(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The fused routed expert alone (no shared experts)."""
        return self._mlp(hidden_states, self.project)

    def combine(self, out: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        """Add the shared experts to a routed output ``out``, as the family does (retention swaps
        other routed outputs in here)."""
        shared = None
        if self.shared_cores is not None:
            shared = self._mlp(hidden_states, self._shared_on_bases)
        for name in self.shared_mlps:
            branch = getattr(self, name)(hidden_states)
            shared = branch if shared is None else shared + branch
        if shared is not None:
            for name in self.shared_gates:  # Qwen2-MoE: sigmoid(shared_expert_gate(x)) * shared_expert(x)
                shared = torch.sigmoid(getattr(self, name)(hidden_states)) * shared
        return out if shared is None else out + shared



# The model outputs' cache field: "cache" from transformers 5.2x, "past_key_values" before. Read and
# written under its own name, so no forward touches the deprecated alias (which logs a warning).
CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"

# logit post-processing some families apply in their ForCausalLM head: config attribute -> transform
LOGIT_TRANSFORMS = {
    "logits_scaling": lambda logits, value: logits / value,  # Granite
    "final_logit_softcapping": lambda logits, value: torch.tanh(logits / value) * value,  # Gemma-style
}


class UnitePreTrainedModel(PreTrainedModel):
    config: UniteConfig
    config_class = UniteConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _skip_keys_device_placement = ["past_key_values"]

    def __init__(self, config: UniteConfig, *inputs, **kwargs) -> None:
        super().__init__(config, *inputs, **kwargs)
        # per instance: transformers' push_to_hub appends to this list; Trainer's card reads it
        self.model_tags = list(UNITE_MODEL_TAGS)
        # the gene's tokenizer (from_gene sets it): saved and pushed with the target, so that its folder or repo
        # is a complete model (pipeline("text-generation", model=folder)); None: no tokenizer is written
        self.tokenizer = None

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):  # heads; the backbone's layers use the family's own init
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if module.bias is not None:
                init.zeros_(module.bias)

    def initialize_weights(self) -> None:
        super().initialize_weights()
        # The UNITE FFNs sit inside the family backbone, whose init dispatch never reaches them.
        # init.* functions skip tensors already loaded from a checkpoint.
        for module in self.modules():
            if isinstance(module, (UniteBases, UniteFactorizedLinear, UniteFFN)):
                _init_unite_module(module, self.config.initializer_range)

    @classmethod
    def from_gene(cls, gene, **kwargs):
        """Grow this target from a gene (a :class:`unite_hf.UniteGene`, a folder or a Hub id).

        See :func:`unite_hf.targets.grow_from_gene` for the options (depth, rank, core_init,
        layer_selection, tie_bases, shared_experts). Needs the unite_hf package.
        """
        targets = importlib.import_module("unite_hf.targets")
        return targets.grow_from_gene(cls, gene, **kwargs)

    def set_card_info(self, datasets: list[str] | None = None, eval_results: list[dict] | None = None,
                      license: str | None = None, tags: list[str] | None = None) -> None:
        """What the model card says beyond the architecture; arguments left ``None`` keep their value.

        Args:
            datasets: datasets the target was tuned on, as Hub ids (unite_hf task names such as
                ``"sst2"`` are mapped to theirs).
            eval_results: ``{"dataset_name", "dataset_type", "metric_type", "metric_value"}`` dicts
                (the card's ``model-index``).
            license: the card's license (default: the gene source's license).
            tags: tags beside ``unite``, ``learngene`` and ``unite_hf``.

        Kept in ``config.card_info``, so a saved and reloaded target publishes the same card.
        """
        info = dict(self.config.card_info or {})
        for key, value in (("datasets", datasets), ("eval_results", eval_results), ("license", license), ("tags", tags)):
            if value is not None:
                info[key] = list(value) if key != "license" else value
        self.config.card_info = info

    def _write_card(self, save_directory, repo_id: str | None, tags: list[str] | None = None) -> bool:
        """Write the UNITE model card to ``save_directory/README.md``; ``False`` where unite_hf is not
        installed (loaded as remote code: no card templates)."""
        try:
            cards, io = importlib.import_module("unite_hf.cards"), importlib.import_module("unite_hf.io")
        except ImportError:
            return False
        # the destination's name, not the staging folder's (.target.tmp-123-ab12): same name, same bytes
        model_id = repo_id or io.destination_name(save_directory)
        io.atomic_write_text(cards.target_card(self, model_id, tags), os.path.join(save_directory, "README.md"))
        return True

    def save_pretrained(self, save_directory, is_main_process: bool = True, *args, push_to_hub: bool = False,
                        **kwargs):
        """``PreTrainedModel.save_pretrained`` plus the UNITE model card (when unite_hf is installed).

        With ``push_to_hub=True`` (``repo_id``, ``commit_message``, ``commit_description``,
        ``create_pr``, ``private``, ``revision``, ``tags``, ``token`` as in transformers), the card is
        written with the repo id before the upload, so the Hub gets the UNITE card; the push then replaces
        the repo's previous target as :meth:`push_to_hub` does (uploading the files this save wrote, not
        the other files of ``save_directory``). With unite_hf installed the folder is replaced atomically:
        the files a previous save recorded go, the folder's other files stay, and a folder holding a gene
        or a peft adapter is refused (``unite_hf.io.save_target_folder``). A target grown
        from a gene takes the saved location as its ``name_or_path`` (what peft records as an
        adapter's base model)."""
        hub = {key: kwargs.pop(key) for key in ("repo_id", "commit_message", "commit_description", "create_pr",
                                                 "private", "revision", "tags") if key in kwargs}
        # Weights under their in-memory names, as Trainer's resume_from_checkpoint and load_best_model_at_end
        # read them back (a plain load_state_dict): transformers would otherwise revert the family's key
        # mapping, and Mixtral's (.mlp. <- .block_sparse_moe.) moves the UNITE FFN to a name load_state_dict
        # skips. Targets saved under those names still load: from_pretrained applies the mapping.
        kwargs.setdefault("save_original_format", False)
        if not is_main_process:
            return super().save_pretrained(save_directory, is_main_process, *args, **kwargs)
        repo_id, timestamps, token, base = None, {}, kwargs.get("token"), None
        io = _unite_io()
        if push_to_hub:
            from huggingface_hub import HfApi

            api = HfApi(token=token)
            name = hub.get("repo_id") or os.path.basename(os.path.normpath(os.fspath(save_directory)))
            repo_id = api.create_repo(name, private=hub.get("private"), exist_ok=True).repo_id
            if io:  # before the save: the repo's files, which the push replaces; another artifact's repo is refused
                base = _hub_base(io, api, repo_id, hub.get("revision"), hub.get("create_pr", False))
            else:
                timestamps = self._get_files_timestamps(save_directory) if os.path.isdir(save_directory) else {}
        def save(folder):
            saved = super(UnitePreTrainedModel, self).save_pretrained(folder, is_main_process, *args, **kwargs)
            self._write_card(folder, repo_id, hub.get("tags"))
            if self.tokenizer is not None:  # recorded with the rest, so pushed and replaced with the target
                self.tokenizer.save_pretrained(folder)
            return saved

        # with unite_hf: the folder is replaced atomically and records every file's SHA-256
        writes_tokenizer = self.tokenizer is not None
        result = io.save_target_folder(save_directory, save, tokenizer=writes_tokenizer) if io else save(save_directory)
        if base is not None:  # the files this save wrote; the repo's others as in push_to_hub
            io.hub_commit_artifact(api, base, save_directory, files=io.target_record_files(save_directory),
                                   owned=io.hub_target_owner(api, base, tokenizer=writes_tokenizer),
                                   revision=hub.get("revision"),
                                   create_pr=hub.get("create_pr", False),
                                   commit_message=hub.get("commit_message") or "Upload UNITE target",
                                   commit_description=hub.get("commit_description"))
        elif push_to_hub:  # remote code without unite_hf: transformers' upload (nothing deleted on the repo)
            self._upload_modified_files(save_directory, repo_id, timestamps, commit_message=hub.get("commit_message"),
                                        token=token, create_pr=hub.get("create_pr", False),
                                        revision=hub.get("revision"), commit_description=hub.get("commit_description"))
        if not self.name_or_path:
            self.name_or_path = repo_id or os.fspath(save_directory)
        return result

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, verify: bool = True, **kwargs):
        """``PreTrainedModel.from_pretrained``; with unite_hf installed, every load is whole or fails clearly:

        - the target's ``unite_checksums.json`` is checked (``unite_hf.io.verify_target_folder``): a local
          folder's before loading, a Hub download's before the model is returned. Every recorded file must
          match its size and SHA-256 (``CorruptedFileError``), and every file transformers may load (config,
          weights, shards, indexes, ``pytorch_model*.bin``) must be recorded: an unrecorded one (an old
          ``model.safetensors`` beside new shards) is refused. A target (config.json: model_type ``"unite"``)
          without its record is refused, since every unite_hf save and push writes one; so is a record of a
          newer unite_hf (``unite_hf.io.TargetFormatError``: upgrade unite_hf);
        - a local folder that a save swaps in while it loads is loaded again, so a load never pairs one
          save's config with another save's weights (``unite_hf.io.load_unchanged``: the fifth attempt holds
          the folder's write lock, so unite_hf saves by this user on this host wait for it; a
          ``CorruptedFileError`` if writers that do not share that lock kept swapping it in).

        ``verify=False`` skips the checksum checks, with a warning (the retry stays): the way to load a
        target whose record was lost, or one saved where unite_hf was not installed (remote code, i.e.
        transformers' own save or push: no record is written there, so unite_hf refuses it until then).
        Without unite_hf (remote code) nothing beyond transformers' own loading is checked."""
        io = _unite_io()
        load = super().from_pretrained
        if io is None:
            return load(pretrained_model_name_or_path, *args, **kwargs)
        if not verify:
            warnings.warn(f"verify=False: {pretrained_model_name_or_path} is loaded without checking its files against "
                          "its unite_checksums.json; corrupted, mixed or unrecorded weights load silently",
                          UserWarning, stacklevel=2)
        path = pretrained_model_name_or_path
        if path is not None and os.path.isdir(path):
            directory = os.path.join(path, kwargs.get("subfolder") or "")

            def load_once():
                if verify:
                    io.verify_target_folder(directory)
                return load(path, *args, **kwargs)

            return io.load_unchanged(dict.fromkeys(map(os.path.normpath, (path, directory))), load_once)
        model = load(path, *args, **kwargs)
        if verify and path is not None:
            io.verify_target_download(str(path), kwargs)
        return model

    def push_to_hub(self, repo_id: str, *, commit_message: str | None = "Upload UNITE target",
                    commit_description: str | None = None, private: bool | None = None,
                    token: str | bool | None = None, revision: str | None = None, create_pr: bool = False,
                    max_shard_size: int | str = "5GB", tags: list[str] | str | None = None, **kwargs):
        """Save (weights, config, modeling code, the UNITE model card with this repo id and ``tags``)
        and upload in one commit. ``tags`` are added to ``model.model_tags``, as in transformers.

        With unite_hf installed, the same commit deletes what the repo (at ``revision``, default the main
        branch) holds of an older target that this one lacks: the files the previous push recorded in
        ``unite_checksums.json`` and any weights, shards, indexes or configs under transformers' checkpoint
        names (an unsharded ``model.safetensors`` left beside new shards would load instead of them). Every
        other file of the repo stays (``.gitattributes``, a tokenizer, Trainer's files, the user's files).
        A repo holding a gene or a peft adapter is refused with ``unite_hf.io.ArtifactWriteError`` before
        anything is saved; the Hub refuses the commit if another one lands on the revision meanwhile.
        Without unite_hf (remote code) the folder is uploaded and nothing is deleted."""
        from huggingface_hub import HfApi

        if tags:
            self.add_model_tags(tags)
        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        io = _unite_io()
        base = io.hub_push_base(api, repo_id, revision=revision, refuse=io.TARGET_REFUSES) if io else None
        # with unite_hf: staged where a push killed mid-way is cleaned up by the next push or save
        with (io.push_staging() if io else tempfile.TemporaryDirectory()) as work_dir:
            kwargs.setdefault("save_original_format", False)  # in-memory names, as save_pretrained
            super().save_pretrained(work_dir, max_shard_size=max_shard_size, **kwargs)
            self._write_card(work_dir, repo_id)
            if self.tokenizer is not None:  # the gene's tokenizer goes with the target
                self.tokenizer.save_pretrained(work_dir)
            if base is not None:
                io.record_target_checksums(work_dir)  # verified by from_pretrained after download
                owned = io.hub_target_owner(api, base, tokenizer=self.tokenizer is not None)
                info = io.hub_commit_artifact(api, base, work_dir, owned=owned,
                                              commit_message=commit_message or "Upload UNITE target",
                                              commit_description=commit_description, revision=revision,
                                              create_pr=create_pr)
            else:
                info = api.upload_folder(repo_id=repo_id, folder_path=work_dir, commit_message=commit_message,
                                         commit_description=commit_description, revision=revision,
                                         create_pr=create_pr)
        if not self.name_or_path:
            self.name_or_path = repo_id
        return info

    def unite_parameter_breakdown(self) -> dict[str, int]:
        """Parameters by role: embeddings, attention, norms, dense_mlp, shared_experts, bases, cores,
        ffn_bias, head, other; and total (tied weights counted once)."""
        breakdown: dict[str, int] = {}
        embeddings = self.get_input_embeddings().weight
        for name, param in self.named_parameters():
            breakdown[_role(name, param, embeddings)] = breakdown.get(_role(name, param, embeddings), 0) + param.numel()
        breakdown["total"] = sum(breakdown.values())
        return breakdown


def _hub_base(io, api, repo_id: str, revision: str | None, create_pr: bool):
    """``io.hub_push_base`` for ``save_pretrained(push_to_hub=True)``, which creates the ``revision`` branch
    first, as transformers' upload does."""
    if revision is not None and not revision.startswith("refs/pr"):
        from huggingface_hub.errors import HfHubHTTPError

        try:
            api.create_branch(repo_id=repo_id, branch=revision, exist_ok=True)
        except HfHubHTTPError as err:
            if not (create_pr and err.response is not None and err.response.status_code == 403):
                raise  # a pull request on a repo we cannot write: the branch should exist
    return io.hub_push_base(api, repo_id, revision=revision, refuse=io.TARGET_REFUSES)


def _unite_io():
    """``unite_hf.io`` where unite_hf is installed; None when this file runs as remote code without it."""
    try:
        return importlib.import_module("unite_hf.io")
    except ImportError:
        return None


def _core_std(std: float, d_out: int, d_in: int, core: torch.Tensor) -> float:
    """Core std such that the rebuilt W has the entry std of a dense init: with orthonormal bases
    ||W||_F = ||G||_F, so E||G||^2 = d_out * d_in * std^2."""
    return std * math.sqrt(d_out * d_in / core.numel())


def _init_unite_module(module: nn.Module, std: float) -> None:
    if isinstance(module, UniteBases):
        for basis in (module.out_basis, module.in_basis):
            if basis is not None:
                init.orthogonal_(basis)
    elif isinstance(module, UniteFactorizedLinear):
        init.normal_(module.core, mean=0.0, std=_core_std(std, module.d_out, module.d_in, module.core))
        if module.bias is not None:
            init.zeros_(module.bias)
    elif module.shared_cores is not None:  # UniteFFN with fused shared experts
        for proj, core in module.shared_cores.items():
            linear = module.linear(proj)
            init.normal_(core, mean=0.0, std=_core_std(std, linear.d_out, linear.d_in, core))


def _role(name: str, param: torch.Tensor, embeddings: torch.Tensor) -> str:
    parts = name.split(".")
    if param is embeddings or "embed" in name:
        return "embeddings"
    if "in_basis" in parts or "out_basis" in parts:
        return "bases"
    if parts[-1] == "core" or "shared_cores" in parts:
        return "cores"
    if any(p.startswith("shared_") for p in parts):  # shared_expert(s), shared_expert_gate, shared_mlp
        return "shared_experts"
    if parts[-1] == "bias" and any(p in ("gate", "up", "down") for p in parts):
        return "ffn_bias"
    if any("norm" in p for p in parts):  # before attention: post_attention_layernorm, q_norm
        return "norms"
    if any("attn" in p or "attention" in p for p in parts):
        return "attention"
    if any(p in ("mlp", "feed_forward") for p in parts):
        return "dense_mlp"
    if parts[0] in ("lm_head", "score", "classifier"):
        return "head"
    return "other"


class UniteModel(UnitePreTrainedModel):
    """The backbone: the source family's base model at the target depth, with UNITE FFNs."""

    def __init__(self, config: UniteConfig) -> None:
        super().__init__(config)
        self.backbone = AutoModel.from_config(config.text_config)
        self.unite_bases = None
        if config.tie_bases and config.ffn_layers:
            self.unite_bases = nn.ModuleDict()
            for proj in config.projections:
                hidden, intermediate = config.text_config.hidden_size, config.expert_intermediate_size
                d_out, d_in = (hidden, intermediate) if proj == "down" else (intermediate, hidden)
                self.unite_bases[proj] = UniteBases(d_out, d_in, *config.ranks[proj], fold=config.fold_full_rank_bases)
        layers = decoder_layers(self.backbone)
        slots = [i for i, layer in enumerate(layers) if moe_slot(layer) is not None]
        if slots != list(config.ffn_layers):
            raise ValueError(
                f"the {config.text_config.model_type} backbone has MoE blocks at layers {slots}, but the target's "
                f"UNITE FFNs are at {config.ffn_layers}; the text_config does not describe this target."
            )
        for i in slots:
            name = moe_slot(layers[i])
            block = getattr(layers[i], name)
            shared = {}
            if config.shared_experts != "drop":  # the children recorded at extraction, else by structure
                shared = dict(shared_expert_children(block, config.shared_expert_names))
            setattr(layers[i], name, UniteFFN(config, shared, self.unite_bases))
        _prune_parallel_plans(self.backbone)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.backbone.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.backbone.set_input_embeddings(value)

    def ffn(self, layer: int) -> UniteFFN:
        """The UNITE FFN of target ``layer``."""
        for child in decoder_layers(self.backbone)[layer].children():
            if isinstance(child, UniteFFN):
                return child
        raise KeyError(f"target layer {layer} has a dense MLP, not a UNITE FFN; FFN layers: {self.config.ffn_layers}")

    @can_return_tuple
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, **kwargs) -> BaseModelOutputWithPast:
        # The family backbones take the cache as their 4th argument, named past_key_values before
        # transformers 5.2x and cache after: passed by position, it works on both sides of the rename.
        cache = kwargs.pop("cache", None)
        cache = cache if cache is not None else past_key_values
        return self.backbone(input_ids, attention_mask, position_ids, cache, inputs_embeds=inputs_embeds,
                             use_cache=use_cache, return_dict=True, **kwargs)


def _prune_parallel_plans(backbone: nn.Module) -> None:
    """Drop the entries of the family backbone's tensor- and expert-parallel plans that name modules the
    UNITE FFNs replaced (``mlp.experts``, the router, the source's dense projections): transformers
    applies every entry of a plan, and the factorized FFNs have none (they stay replicated)."""
    names = {n for n, _ in backbone.named_modules()} | {n for n, _ in backbone.named_parameters()}
    for attribute in ("_tp_plan", "_ep_plan"):
        plan = getattr(backbone, attribute, None)
        if plan:
            used = {key: value for key, value in plan.items()
                    if any(re.fullmatch(re.escape(key).replace(r"\*", r"[^.]+"), n) for n in names)}
            setattr(backbone, attribute, used)


def _last_token_pool(hidden: torch.Tensor, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
                     pad_token_id: int | None) -> torch.Tensor:
    """Hidden state of each sequence's last real token (right or left padding)."""
    batch = hidden.shape[0]
    positions = torch.arange(hidden.shape[1], device=hidden.device)
    if attention_mask is not None:
        last = (positions * attention_mask.to(hidden.device)).argmax(-1)
    elif input_ids is not None and pad_token_id is not None:
        last = (positions * (input_ids != pad_token_id).to(hidden.device)).argmax(-1)
    else:
        last = torch.full((batch,), hidden.shape[1] - 1, device=hidden.device)
    return hidden[torch.arange(batch, device=hidden.device), last]


class UniteForCausalLM(UnitePreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.backbone.embed_tokens.weight"}
    # as every transformers causal LM: the backbone's plans come from the family (see _prune_parallel_plans)
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: UniteConfig) -> None:
        super().__init__(config)
        self.model = UniteModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep: int | torch.Tensor = 0,
                **kwargs) -> CausalLMOutputWithPast:
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                             return_dict=True, **kwargs)
        hidden = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        for attribute, transform in LOGIT_TRANSFORMS.items():
            value = getattr(self.config.text_config, attribute, None)
            if value:
                logits = transform(logits, value)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
                                      hidden_states=outputs.hidden_states, attentions=outputs.attentions)


class UniteForSequenceClassification(UnitePreTrainedModel):
    """Last-real-token pooling and a linear head (the paper's k-way classification format, A.2.5)."""

    accepts_loss_kwargs = False  # the loss is a plain mean: Trainer must scale it for gradient accumulation

    def __init__(self, config: UniteConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = UniteModel(config)
        self.score = nn.Linear(config.text_config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, **kwargs) -> SequenceClassifierOutputWithPast:
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                             return_dict=True, **kwargs)
        pooled = _last_token_pool(outputs.last_hidden_state, input_ids, attention_mask, self.config.pad_token_id)
        logits = self.score(pooled)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=logits, config=self.config)
        return SequenceClassifierOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
                                                hidden_states=outputs.hidden_states, attentions=outputs.attentions)


class UniteForMultipleChoice(UnitePreTrainedModel):
    """Scores each (context, choice) sequence with a linear head on its last real token."""

    accepts_loss_kwargs = False  # the loss is a plain mean: Trainer must scale it for gradient accumulation

    def __init__(self, config: UniteConfig) -> None:
        super().__init__(config)
        self.model = UniteModel(config)
        self.score = nn.Linear(config.text_config.hidden_size, 1, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None,
                **kwargs) -> MultipleChoiceModelOutput:
        source = input_ids if input_ids is not None else inputs_embeds
        batch, choices = source.shape[:2]
        flat = lambda t: None if t is None else t.reshape(batch * choices, *t.shape[2:])  # noqa: E731
        outputs = self.model(input_ids=flat(input_ids), attention_mask=flat(attention_mask),
                             inputs_embeds=flat(inputs_embeds), use_cache=False, return_dict=True, **kwargs)
        pooled = _last_token_pool(outputs.last_hidden_state, flat(input_ids), flat(attention_mask), self.config.pad_token_id)
        logits = self.score(pooled).view(batch, choices)
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels.to(logits.device))
        return MultipleChoiceModelOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                         attentions=outputs.attentions)


__all__ = [
    "UniteFFN", "UniteFactorizedLinear", "UniteForCausalLM", "UniteForMultipleChoice",
    "UniteForSequenceClassification", "UniteModel", "UnitePreTrainedModel",
]
