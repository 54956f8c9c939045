"""Adding an expert layout, walked through (CONTRIBUTING.md, "Adding an expert layout").

Everything new lives in this file: a MoE family whose experts are stored in a way unite_hf has never
seen (every expert packed into one flat parameter row), and the layout class that reads it, registered
with :func:`unite_hf.sources.register_layout`. Nothing in unite_hf is edited for it, yet

- extraction reads it (the layout's views equal hand slices of the packed rows; the gene's fused FFN
  equals the Fisher-weighted average computed here by hand), in memory and streamed from a
  safetensors checkpoint (the layout's on-disk keys);
- the exact per-sequence Fisher equals a brute-force reference (one backward per sequence, gradients
  of the packed rows read off autograd), the diagonal Fisher and the routing frequency too;
- a target grows from the gene, and at full rank computes what the source computes with each MoE block
  replaced by its hand-fused dense FFN plus the shared expert; the shared expert is what the layout's
  own ``find_shared_experts`` says (the block also holds a router input norm, which the structural rule
  would take for a second shared expert), recorded in the gene and the target's config, so a saved
  target loaded as remote code in a fresh interpreter without unite_hf computes the same.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers.activations import ACT2FN
from tiny_models import VOCAB

from unite_hf import UniteConfig, UniteForCausalLM, compute_expert_importance, extract_universal_knowledge, get_source
from unite_hf.model_structure import shared_expert_children
from unite_hf.sources import LAYOUTS, DiskKeys, ExpertProbe, ExpertWeights, MoEBlock, register_layout
from unite_hf.sources.base import CheckpointError

HIDDEN, INTERMEDIATE, EXPERTS, TOP_K = 32, 24, 4, 2
CALIBRATION = torch.randint(0, VOCAB, (5, 10), generator=torch.Generator().manual_seed(7))


# -- 1. a MoE family with a new expert storage (stands in for a new model's modeling code) ----------------

class PackedExperts(nn.Module):
    """Every expert as one flat row ``[gate (I*H) | up (I*H) | down (H*I)]`` of a single ``(E, 3*I*H)``
    parameter, called like transformers 5 experts: ``(hidden_states, top_k_index, top_k_weights)``."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int, act: str = "silu") -> None:
        super().__init__()
        self.hidden, self.intermediate = hidden, intermediate
        self.packed = nn.Parameter(torch.empty(num_experts, 3 * intermediate * hidden))
        self.act_fn = ACT2FN[act]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        size = self.intermediate * self.hidden
        final = torch.zeros_like(hidden_states)
        for e in torch.unique(top_k_index).tolist():
            token_idx, slot = torch.where(top_k_index == e)
            row = self.packed[e]
            gate = row[:size].view(self.intermediate, self.hidden)
            up = row[size:2 * size].view(self.intermediate, self.hidden)
            down = row[2 * size:].view(self.hidden, self.intermediate)
            x = hidden_states[token_idx]
            out = F.linear(self.act_fn(F.linear(x, gate)) * F.linear(x, up), down)
            final.index_add_(0, token_idx, out * top_k_weights[token_idx, slot, None])
        return final


class AlwaysOnMLP(nn.Module):
    """A shared expert, under a name no family uses (found by structure, not by name)."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.act_fn = ACT2FN["silu"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class PackedMoeBlock(nn.Module):
    """Softmax top-k router ``gate`` on normed inputs (``router_norm``, a child with parameters that is no
    expert), packed ``experts``, and a shared ``always_on`` MLP."""

    def __init__(self, config: transformers.PreTrainedConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.router_norm = nn.LayerNorm(config.hidden_size)
        self.gate = nn.Linear(config.hidden_size, config.num_local_experts, bias=False)
        self.experts = PackedExperts(config.hidden_size, config.intermediate_size, config.num_local_experts)
        self.always_on = AlwaysOnMLP(config.hidden_size, config.intermediate_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, shape[-1])
        weights, index = torch.softmax(self.gate(self.router_norm(flat)), dim=-1).topk(self.top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        return (self.experts(flat, index, weights) + self.always_on(flat)).reshape(shape)


class PackedMoeConfig(transformers.MixtralConfig):
    model_type = "unite_test_packed_moe"


def _pack(model: nn.Module, config: PackedMoeConfig) -> None:
    for layer in model.layers:
        layer.mlp = PackedMoeBlock(config)


class PackedMoeModel(transformers.MixtralModel):
    config_class = PackedMoeConfig

    def __init__(self, config: PackedMoeConfig) -> None:
        super().__init__(config)
        _pack(self, config)


class PackedMoeForCausalLM(transformers.MixtralForCausalLM):
    config_class = PackedMoeConfig

    def __init__(self, config: PackedMoeConfig) -> None:
        super().__init__(config)
        _pack(self.model, config)


# -- 2. the layout: the only unite_hf-facing code a new expert storage needs ------------------------------

class PackedRowsBlock(MoEBlock):  # in a layout's own file: decorated with @register_layout (see packed_family)
    """Experts packed as flat rows ``[gate | up | down]`` of one ``(E, 3*I*H)`` parameter."""

    layout = "packed_rows"
    # multi_sequence stays True: the experts see the batch's token rows in order, so seq ids apply

    @classmethod
    def matches(cls, experts: nn.Module) -> bool:
        packed = getattr(experts, "packed", None)
        return isinstance(packed, torch.Tensor) and packed.ndim == 2

    @property
    def num_experts(self) -> int:
        return self.experts.packed.shape[0]

    def _views(self, row: torch.Tensor) -> ExpertWeights:
        """One packed row as (out, in) views: the only place that knows the packing."""
        hidden, intermediate = self.experts.hidden, self.experts.intermediate
        gate, up, down = row.split(intermediate * hidden)
        return ExpertWeights(gate=gate.view(intermediate, hidden), up=up.view(intermediate, hidden),
                             down=down.view(hidden, intermediate))

    def expert(self, index: int) -> ExpertWeights:
        return self._views(self.experts.packed[index])

    # probed_linears / expert_from_linears: the defaults (one map per projection, named by it) fit.

    @contextlib.contextmanager
    def probe(self, probe: ExpertProbe) -> Iterator[None]:
        """The experts' forward, with every projection run through ``probe.linear``."""
        experts = self.experts

        def probed_forward(hidden_states, top_k_index, top_k_weights):
            probe.route(top_k_index, top_k_weights)  # routing frequency and mass
            seq_ids = probe.token_sequences(hidden_states)
            final = torch.zeros_like(hidden_states)
            for e in torch.unique(top_k_index).tolist():
                token_idx, slot = torch.where(top_k_index == e)
                w, x, rows = self.expert(e), hidden_states[token_idx], seq_ids[token_idx]
                h = experts.act_fn(probe.linear("gate", e, x, w.gate, None, rows)) * probe.linear("up", e, x, w.up, None, rows)
                out = probe.linear("down", e, h, w.down, None, rows)
                final.index_add_(0, token_idx, out * top_k_weights[token_idx, slot, None])
            return final

        experts.forward = probed_forward  # an instance attribute shadows the class's forward
        try:
            yield
        finally:
            del experts.forward

    def checkpoint_keys(self, names: dict[str, str], where: str) -> DiskKeys:
        if set(names) != {"packed"}:
            raise CheckpointError(f"{where}: expected one 'packed' tensor, found {sorted(names)}")
        return DiskKeys("packed_rows", dict(names))

    def read_checkpoint_expert(self, keys: DiskKeys, read: Callable[[str, int | None], torch.Tensor],
                               index: int) -> ExpertWeights:
        return self._views(read(keys.keys["packed"], index))  # one row off disk

    @classmethod
    def find_shared_experts(cls, block: nn.Module) -> list[tuple[str, nn.Module]]:
        """This family's own rule: its shared experts are its AlwaysOnMLP children. The structural default
        (every child with parameters besides the experts and the router) would also take the router's
        input norm for a shared expert."""
        return [(name, child) for name, child in block.named_children() if isinstance(child, AlwaysOnMLP)]


# -- the family's registration with transformers (a real new family ships this in its modeling code) ------

@pytest.fixture(scope="module", autouse=True)
def packed_family():
    """Register the toy family with transformers' Auto classes for this module, and leave both registries
    (transformers' and unite_hf's layouts) as they were afterwards."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING

    transformers.AutoConfig.register(PackedMoeConfig.model_type, PackedMoeConfig, exist_ok=True)
    transformers.AutoModel.register(PackedMoeConfig, PackedMoeModel, exist_ok=True)
    transformers.AutoModelForCausalLM.register(PackedMoeConfig, PackedMoeForCausalLM, exist_ok=True)
    # register_layout is the class decorator a layout file uses; called here instead, so that the layout is
    # known only while this module's tests run (a decorator would register it when pytest collects the file)
    register_layout(PackedRowsBlock)
    yield
    CONFIG_MAPPING._extra_content.pop(PackedMoeConfig.model_type, None)  # no public unregister
    MODEL_MAPPING._extra_content.pop(PackedMoeConfig, None)
    MODEL_FOR_CAUSAL_LM_MAPPING._extra_content.pop(PackedMoeConfig, None)
    LAYOUTS.pop(PackedRowsBlock.layout, None)


def packed_model(seed: int = 0) -> PackedMoeForCausalLM:
    config = PackedMoeConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, num_local_experts=EXPERTS,
                             num_experts_per_tok=TOP_K, max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = PackedMoeForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.experts.packed.normal_(0, 0.2)
            layer.mlp.gate.weight.normal_(0, 0.5)  # a decisive router: non-trivial routing and Fisher
            layer.mlp.router_norm.weight.normal_(1, 0.3)
    return model


def hand_expert(model: nn.Module, layer: int, expert: int) -> dict[str, torch.Tensor]:
    """Expert ``expert``'s matrices sliced out of the packed row by hand."""
    row = model.model.layers[layer].mlp.experts.packed[expert].detach()
    size = INTERMEDIATE * HIDDEN
    return {"gate": row[:size].reshape(INTERMEDIATE, HIDDEN), "up": row[size:2 * size].reshape(INTERMEDIATE, HIDDEN),
            "down": row[2 * size:].reshape(HIDDEN, INTERMEDIATE)}


def brute_force_fisher(model: nn.Module, input_ids: torch.Tensor):
    """F[l, e] = mean_n ||d log p(y_n|x_n) / d packed[l][e]||^2 with one backward per sequence, and the
    per-projection diagonal: the packed row's gradient sliced by hand, squared, averaged."""
    layers = model.model.layers
    fisher = torch.zeros(len(layers), EXPERTS, dtype=torch.float64)
    diag = {(l, p): torch.zeros(EXPERTS, *hand_expert(model, l, 0)[p].shape, dtype=torch.float64)
            for l in range(len(layers)) for p in ("gate", "up", "down")}
    size = INTERMEDIATE * HIDDEN
    for n in range(input_ids.shape[0]):
        model.zero_grad()
        ids = input_ids[n:n + 1]
        log_probs = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), -1)
        log_probs.gather(-1, ids[:, 1:, None]).sum().backward()
        for l, layer in enumerate(layers):
            grad = layer.mlp.experts.packed.grad.double()
            fisher[l] += grad.square().sum(1)
            diag[(l, "gate")] += grad[:, :size].reshape(EXPERTS, INTERMEDIATE, HIDDEN).square()
            diag[(l, "up")] += grad[:, size:2 * size].reshape(EXPERTS, INTERMEDIATE, HIDDEN).square()
            diag[(l, "down")] += grad[:, 2 * size:].reshape(EXPERTS, HIDDEN, INTERMEDIATE).square()
    model.zero_grad(set_to_none=True)
    return fisher / input_ids.shape[0], {k: v / input_ids.shape[0] for k, v in diag.items()}


def _extract(model_or_path, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the default rank is clipped to these tiny dimensions
        return extract_universal_knowledge(model_or_path, calibration=CALIBRATION, show_progress=False, **kwargs)


# -- 3. what works with it, unedited --------------------------------------------------------------------------

def test_the_layout_reads_the_packed_experts_and_finds_the_shared_expert_by_its_own_rule():
    model = packed_model()
    source = get_source(model)
    assert source.layout == "packed_rows" and source.moe_layers == [0, 1]
    for layer, block in enumerate(source.blocks):
        assert type(block) is PackedRowsBlock
        assert [name for name, _ in block.shared_experts] == ["always_on"]  # the layout's rule
        # the structural rule, which the layout overrides, would take the router's norm too
        assert [name for name, _ in shared_expert_children(block.block)] == ["router_norm", "always_on"]
        assert block.router_attr == "gate" and block.num_experts == EXPERTS
        for e in range(EXPERTS):
            views = block.expert(e)
            for proj, matrix in hand_expert(model, layer, e).items():
                assert torch.equal(views.projection(proj), matrix)
            packed = model.model.layers[layer].mlp.experts.packed
            assert views.gate.untyped_storage().data_ptr() == packed.untyped_storage().data_ptr()  # views, no copies


def test_exact_fisher_diagonal_and_routing_equal_brute_force():
    model = packed_model()
    importance = compute_expert_importance(model, CALIBRATION, batch_size=3, diagonal=True, show_progress=False)
    fisher, diag = brute_force_fisher(model, CALIBRATION)
    assert (fisher > 0).all()
    torch.testing.assert_close(importance.fisher, fisher, rtol=1e-4, atol=1e-4 * fisher.max().item())
    for (layer, proj), expected in diag.items():
        torch.testing.assert_close(importance.fisher_diag[(layer, proj)].double(), expected,
                                   rtol=1e-4, atol=1e-4 * expected.max().item())
    # routing frequency: the router's top-k choices, counted by hand from a forward hook
    counts = torch.zeros(2, EXPERTS)

    def count(row: int):
        def hook(module, inputs, logits) -> None:  # returns None: the router's output stays as it is
            counts[row] += torch.bincount(logits.softmax(-1).topk(TOP_K, -1).indices.flatten(), minlength=EXPERTS)
        return hook

    hooks = [layer.mlp.gate.register_forward_hook(count(row)) for row, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(input_ids=CALIBRATION)
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(importance.frequency.float(), counts / counts.sum(1, keepdim=True))
    assert all(p.grad is None for p in model.parameters())  # the probe allocated no weight gradient
    assert "forward" not in vars(model.model.layers[0].mlp.experts)  # the probe is gone


def hand_fused(model: nn.Module, layer: int, weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """sum_e w_e W_e per projection, over the hand-sliced experts."""
    return {proj: sum(float(w) * hand_expert(model, layer, e)[proj].double() for e, w in enumerate(weights))
            for proj in ("gate", "up", "down")}


@pytest.fixture(scope="module")
def extracted(packed_family):
    model = packed_model()
    return model, _extract(model)


def test_extraction_fuses_the_packed_experts_by_their_fisher(extracted):
    model, gene = extracted
    assert gene.config.source_layout == "packed_rows" and gene.moe_layers == [0, 1]
    assert gene.config.shared_experts == ["always_on"]
    reference, _ = brute_force_fisher(model, CALIBRATION)
    torch.testing.assert_close(gene.importance.double(), reference, rtol=1e-4, atol=1e-4 * reference.max().item())
    for row, layer in enumerate(gene.moe_layers):
        weights = gene.importance[row].double() / gene.importance[row].double().sum()
        for proj, expected in hand_fused(model, layer, weights).items():
            torch.testing.assert_close(gene.fused_weight(layer, proj).double(), expected, rtol=1e-4, atol=1e-5)
    assert not any(".experts." in name for name in gene.source_state_dict)  # routed experts are fused, not copied
    assert "model.layers.0.mlp.always_on.up_proj.weight" in gene.source_state_dict


def test_streaming_from_a_checkpoint_reads_the_layouts_on_disk_keys(extracted, tmp_path):
    from unite_hf.sources.checkpoint import MoECheckpoint

    model, gene = extracted
    model.save_pretrained(tmp_path)
    with MoECheckpoint(tmp_path) as checkpoint:
        block = checkpoint.blocks[1]
        assert block.layout == "checkpoint:packed_rows"
        for proj, matrix in hand_expert(model, 1, 2).items():
            assert torch.equal(block.expert(2).projection(proj), matrix)
    streamed = _extract(tmp_path, importance=gene.expert_importance())  # a checkpoint needs importance given
    for layer in gene.moe_layers:
        for proj in ("gate", "up", "down"):
            torch.testing.assert_close(streamed.fused_weight(layer, proj), gene.fused_weight(layer, proj),
                                       rtol=1e-4, atol=1e-5)


def hand_fused_source_logits(model: nn.Module, gene) -> torch.Tensor:
    """The source's logits with each MoE block replaced by its hand-fused dense FFN plus the shared expert."""

    def dense_ffn(block: PackedMoeBlock, fused: dict[str, torch.Tensor]):
        def forward(hidden_states: torch.Tensor) -> torch.Tensor:
            x = hidden_states.double()
            routed = F.linear(F.silu(F.linear(x, fused["gate"])) * F.linear(x, fused["up"]), fused["down"])
            return routed.to(hidden_states.dtype) + block.always_on(hidden_states)
        return forward

    for row, layer in enumerate(model.model.layers):
        weights = gene.importance[row].double() / gene.importance[row].double().sum()
        layer.mlp.forward = dense_ffn(layer.mlp, hand_fused(model, row, weights))
    try:
        with torch.no_grad():
            return model(input_ids=CALIBRATION).logits
    finally:
        for layer in model.model.layers:
            del layer.mlp.forward


def test_a_target_grows_and_computes_the_hand_fused_source(extracted):
    model, gene = extracted
    target = UniteForCausalLM.from_gene(gene, core_init="tucker").eval()  # full rank: the gene's fused FFNs exactly
    # the layout's shared experts, recorded at extraction, are the target's: not the router's norm
    assert gene.config.shared_experts == ["always_on"] and target.config.shared_expert_names == ["always_on"]
    assert [target.model.ffn(i).shared_mlps for i in (0, 1)] == [["always_on"], ["always_on"]]
    with torch.no_grad():
        got = target(input_ids=CALIBRATION).logits
    torch.testing.assert_close(got, hand_fused_source_logits(model, gene), rtol=1e-4, atol=1e-4)


# the toy family (section 1 of this file), for a fresh interpreter that has no unite_hf and no pytest
_FAMILY = ("PackedExperts", "AlwaysOnMLP", "PackedMoeBlock", "PackedMoeConfig", "_pack", "PackedMoeModel",
           "PackedMoeForCausalLM")
_REMOTE_LOAD = """
import json, sys, torch, transformers
sys.modules["unite_hf"] = None  # unite_hf is not importable here: the target's own code must do
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
exec(open(sys.argv[1]).read())  # the toy family, as a new model family ships its modeling code
transformers.AutoConfig.register(PackedMoeConfig.model_type, PackedMoeConfig)
transformers.AutoModel.register(PackedMoeConfig, PackedMoeModel)
target = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[2], trust_remote_code=True).eval()
assert type(target).__module__.startswith("transformers_modules"), type(target).__module__
ffns = [child for layer in target.model.backbone.layers for child in layer.children() if hasattr(child, "shared_mlps")]
with torch.no_grad():
    logits = target(input_ids=torch.tensor(json.loads(sys.argv[3]))).logits
print(json.dumps({"shared": [ffn.shared_mlps for ffn in ffns], "logits": logits.tolist()}))
"""


def test_a_saved_target_loads_as_remote_code_with_the_recorded_shared_experts(extracted, tmp_path):
    """The remote-code target (modeling_unite.py and model_structure.py beside config.json) keeps the shared
    experts the config records, not what the structural rule would find, in an interpreter without unite_hf."""
    model, gene = extracted
    UniteForCausalLM.from_gene(gene, core_init="tucker").save_pretrained(tmp_path / "target")
    assert json.loads((tmp_path / "target" / "config.json").read_text())["shared_expert_names"] == ["always_on"]
    source = Path(__file__).read_text()
    family = [ast.get_source_segment(source, node) for node in ast.parse(source).body
              if getattr(node, "name", None) in _FAMILY]
    assert len(family) == len(_FAMILY)
    (tmp_path / "family.py").write_text("\n\n".join(family))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", _REMOTE_LOAD, str(tmp_path / "family.py"), str(tmp_path / "target"),
                             json.dumps(CALIBRATION.tolist())], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["shared"] == [["always_on"], ["always_on"]]
    torch.testing.assert_close(torch.tensor(loaded["logits"]), hand_fused_source_logits(model, gene).float(),
                               rtol=1e-4, atol=1e-4)


def test_a_target_config_without_recorded_names_falls_back_to_the_structural_rule(extracted):
    """Targets saved before the names were recorded (``shared_expert_names`` absent: None) find shared
    experts by model_structure's rule, as they did: here that rule takes the router's norm too."""
    _, gene = extracted
    config = UniteForCausalLM.from_gene(gene).config.to_dict()
    config.pop("shared_expert_names")
    old = UniteForCausalLM(UniteConfig.from_dict(config))
    assert old.config.shared_expert_names is None
    assert [old.model.ffn(i).shared_mlps for i in (0, 1)] == [["router_norm", "always_on"]] * 2
