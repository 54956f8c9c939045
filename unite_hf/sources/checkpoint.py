"""Read a MoE checkpoint folder lazily, one expert at a time, straight from its safetensors shards.

A checkpoint folder holds ``config.json``, one or more ``*.safetensors`` shards and, when sharded,
``model.safetensors.index.json``. The model is built on the ``meta`` device only (no memory), so
that the usual source adapters (:func:`unite_hf.sources.get_source`) tell which layers hold experts,
their layout flags and the in-memory names of every other weight. On-disk names are mapped to
in-memory names with transformers' own renamings for the family (``block_sparse_moe`` -> ``mlp`` for
Mixtral, GraniteMoE's ``input_linear``/``output_linear``, ...). Which on-disk keys hold which expert is
the layout's to say (:meth:`MoEBlock.checkpoint_keys`, :meth:`MoEBlock.read_checkpoint_expert`):

- per-expert keys (every layout, by default), as ``save_pretrained`` writes them in transformers 5:
  ``...experts.{i}.w1.weight`` / ``w3`` / ``w2`` or ``...experts.{i}.gate_proj.weight`` / ``up_proj`` / ``down_proj``;
- fused 3D keys (the fused layout): ``...experts.gate_up_proj`` (E, 2I, H) and ``...experts.down_proj``
  (E, H, I) (plus ``*_bias``), read one expert slice at a time with ``safe_open(...).get_slice``.

Only safetensors are read, never pickle.
"""

from __future__ import annotations

import json
import os
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open

from .base import CheckpointError, DiskKeys, ExpertWeights, MoEBlock, UnsupportedSourceError

INDEX_NAME = "model.safetensors.index.json"


class CheckpointMoEBlock(MoEBlock):
    """A MoE block whose experts live on disk: :meth:`expert` reads one expert's matrices lazily,
    through the meta block's layout (:meth:`MoEBlock.read_checkpoint_expert`)."""

    def __init__(self, meta_block: MoEBlock, checkpoint: MoECheckpoint, keys: DiskKeys) -> None:
        # share the meta block's identity (names, router, shared experts) without its parameters
        self.__dict__.update({k: v for k, v in meta_block.__dict__.items()})
        self.meta_block = meta_block
        self.checkpoint = checkpoint
        self.keys = keys
        self.layout = f"checkpoint:{keys.format}"

    @property
    def num_experts(self) -> int:
        return self.meta_block.num_experts

    @property
    def has_gate(self) -> bool:
        return self.meta_block.has_gate

    @property
    def has_bias(self) -> bool:
        return self.meta_block.has_bias

    def projection_names(self) -> tuple[str, ...]:
        return self.meta_block.projection_names()

    @property
    def activation(self):
        return self.meta_block.activation

    @property
    def custom_gating(self) -> bool:
        return self.meta_block.custom_gating

    def expert(self, index: int) -> ExpertWeights:
        if not 0 <= index < self.num_experts:
            raise IndexError(f"{self.name}: expert {index} out of range ({self.num_experts} experts)")
        return self.meta_block.read_checkpoint_expert(self.keys, self.checkpoint.read, index)


class MoECheckpoint:
    """A MoE checkpoint folder, read lazily. Use as a context manager (it keeps shard handles open).

    >>> with MoECheckpoint("mixtral-folder") as ckpt:
    ...     ckpt.source.moe_layers, ckpt.blocks[0].expert(3).up.shape
    """

    def __init__(self, path: str | os.PathLike, trust_remote_code: bool = False) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        from . import get_source

        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path} is not a folder; expected config.json and *.safetensors files")
        if not (self.path / "config.json").is_file():
            raise CheckpointError(f"{self.path} has no config.json")
        self.weight_map = self._weight_map()
        self.config = AutoConfig.from_pretrained(self.path, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            self.meta_model = AutoModelForCausalLM.from_config(self.config, trust_remote_code=trust_remote_code)
        self.source = get_source(self.meta_model)  # raises UnsupportedSourceError for dense models
        self._stack = ExitStack()
        self._handles: dict[str, object] = {}
        self._classify_keys()

    # -- files -------------------------------------------------------------------------------
    def _weight_map(self) -> dict[str, str]:
        index = self.path / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise CheckpointError(f"{index} is not a valid safetensors index: {err}") from err
            missing = sorted({f for f in weight_map.values() if not (self.path / f).is_file()})
            if missing:
                raise CheckpointError(f"{index} names shard(s) missing from {self.path}: {missing}")
            return dict(weight_map)
        shards = sorted(self.path.glob("*.safetensors"))
        if not shards:
            pickles = sorted(p.name for p in self.path.glob("*.bin"))
            hint = f" (found {pickles}: pickle checkpoints are not read; convert them to safetensors)" if pickles else ""
            raise CheckpointError(f"{self.path} holds no *.safetensors weights{hint}")
        weight_map = {}
        for shard in shards:
            with safe_open(shard, framework="pt") as f:
                weight_map.update({key: shard.name for key in f.keys()})  # noqa: SIM118 (a safe_open handle)
        return weight_map

    def _handle(self, filename: str):
        if filename not in self._handles:
            self._handles[filename] = self._stack.enter_context(safe_open(self.path / filename, framework="pt"))
        return self._handles[filename]

    def read(self, key: str, index: int | None = None) -> torch.Tensor:
        """The tensor stored under on-disk ``key`` (only its ``index``-th slice along dim 0 if given)."""
        handle = self._handle(self.weight_map[key])
        if index is None:
            return handle.get_tensor(key)
        return handle.get_slice(key)[index]

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()

    def __enter__(self) -> MoECheckpoint:  # noqa: PYI034
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- names -------------------------------------------------------------------------------
    def _renamings(self) -> list:
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import WeightRenaming
        except ImportError:  # pragma: no cover - older transformers
            return []
        return [t for t in get_model_conversion_mapping(self.meta_model) if isinstance(t, WeightRenaming)]

    def _classify_keys(self) -> None:
        from ..compat import apply_renamings

        renamings = self._renamings()
        meta_names = set(self.meta_model.state_dict())
        expert_prefixes = {f"{b.name}.{b.experts_attr}.": b for b in self.source.blocks}
        router_prefixes = tuple(f"{b.name}.{b.router_attr}." for b in self.source.blocks)
        names: dict[str, dict[str, str]] = {prefix: {} for prefix in expert_prefixes}  # below experts -> disk key
        self.non_expert_keys: dict[str, str] = {}  # in-memory name -> on-disk key
        unknown = []
        for disk_key in self.weight_map:
            name = apply_renamings(disk_key, renamings)
            if name not in meta_names and f"model.{name}" in meta_names:  # base-model checkpoints
                name = f"model.{name}"
            prefix = next((p for p in expert_prefixes if name.startswith(p)), None)
            if prefix is not None:
                names[prefix][name[len(prefix):]] = disk_key  # the layout places it (checkpoint_keys)
            elif name.startswith(router_prefixes):
                continue
            elif name in meta_names:
                self.non_expert_keys[name] = disk_key
            else:
                unknown.append(disk_key)
        if unknown:
            raise CheckpointError(f"{self.path}: {len(unknown)} tensor(s) match no weight of "
                                  f"{type(self.meta_model).__name__}, e.g. {unknown[:3]}")
        self.blocks: list[CheckpointMoEBlock] = []
        for prefix, block in expert_prefixes.items():
            keys = block.checkpoint_keys(names[prefix], where=f"{self.path}: {block.name}.{block.experts_attr}")
            self.blocks.append(CheckpointMoEBlock(block, self, keys))
        missing = [n for n in self.source.non_expert_state_dict() if n not in self.non_expert_keys]
        if missing:
            raise CheckpointError(f"{self.path}: weights missing from the checkpoint: {missing[:5]}")

    # -- what the extractor needs ------------------------------------------------------------
    @property
    def moe_layers(self) -> list[int]:
        return self.source.moe_layers

    def non_expert_state_dict(self) -> dict[str, torch.Tensor]:
        """Embeddings, attention, norms, shared experts, dense layers, untied lm_head, read from disk."""
        return {name: self.read(self.non_expert_keys[name]) for name in self.source.non_expert_state_dict()}


def is_checkpoint_path(value: object) -> bool:
    return isinstance(value, (str, os.PathLike)) and Path(value).is_dir()


__all__ = ["CheckpointError", "CheckpointMoEBlock", "MoECheckpoint", "UnsupportedSourceError", "is_checkpoint_path"]
