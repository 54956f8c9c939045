"""Tiny random MoE models (hidden <= 64) for every supported family, built from configs.

Also a transformers-4 style MoE with a per-expert ``nn.ModuleList`` written here, standing in for
remote-code checkpoints such as DeepSeek-MoE-16B.
"""

from __future__ import annotations

import torch
import transformers
from torch import nn
from transformers.activations import ACT2FN

VOCAB = 96
COMMON = dict(
    vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=128, tie_word_embeddings=False,
)

# family -> (config class name, model class name, config overrides)
FAMILIES: dict[str, tuple[str, str, dict]] = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        intermediate_size=48, moe_intermediate_size=24, shared_expert_intermediate_size=40, num_experts=4,
        num_experts_per_tok=2, decoder_sparse_step=1)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        intermediate_size=48, moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2, head_dim=8)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(
        intermediate_size=24, num_experts=4, num_experts_per_tok=2, eos_token_id=2, pad_token_id=1)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        intermediate_size=48, moe_intermediate_size=24, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
        first_k_dense_replace=1, n_group=2, topk_group=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=8, head_dim=8, num_key_value_heads=4)),
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM", dict(
        intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, embedding_multiplier=2.0,
        residual_multiplier=0.5, logits_scaling=2.0, attention_multiplier=0.25)),
}


def tiny_config(family: str, **overrides) -> transformers.PreTrainedConfig:
    config_cls, _, extra = FAMILIES[family]
    return getattr(transformers, config_cls)(**{**COMMON, **extra, **overrides})


def tiny_moe(family: str, seed: int = 0, **overrides) -> nn.Module:
    """A tiny random MoE causal LM of ``family`` with non-trivial router weights."""
    config = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, FAMILIES[family][1])(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            # some routers init to zeros (DeepSeek-V3): random routers make routing and Fisher non-trivial
            if param.abs().sum() == 0 and param.ndim == 2:
                param.normal_(0, 0.2)
    return model.eval()


# -- a transformers-4 / remote-code style MoE with per-expert ModuleList experts ----------------------

class ListExpertMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, names: tuple[str, str, str]) -> None:
        super().__init__()
        self.names = names
        for name, (fan_in, fan_out) in zip(names, [(hidden, intermediate), (hidden, intermediate), (intermediate, hidden)]):
            setattr(self, name, nn.Linear(fan_in, fan_out, bias=False))
        self.act_fn = ACT2FN["silu"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(self.act_fn(gate(x)) * up(x))


class ListMoEBlock(nn.Module):
    """Mixtral-v4 style block: softmax router, top-k, loop over a ModuleList of experts."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int, names, shared: bool) -> None:
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.experts = nn.ModuleList(ListExpertMLP(hidden, intermediate, names) for _ in range(num_experts))
        self.shared_experts = ListExpertMLP(hidden, intermediate, ("gate_proj", "up_proj", "down_proj")) if shared else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, shape[-1])
        probs = torch.softmax(self.gate(flat), dim=-1)
        weights, index = probs.topk(self.top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(index == e)
            if token.numel():
                out.index_add_(0, token, expert(flat[token]) * weights[token, slot, None])
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.reshape(shape)


def tiny_module_list_moe(seed: int = 0, names=("gate_proj", "up_proj", "down_proj"), shared: bool = True) -> nn.Module:
    """A Llama model whose MLPs are replaced by ModuleList MoE blocks (DeepSeek-MoE-16B style)."""
    config = transformers.LlamaConfig(**{**COMMON, "intermediate_size": 24})
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    for layer in model.model.layers:
        layer.mlp = ListMoEBlock(config.hidden_size, 24, num_experts=4, top_k=2, names=names, shared=shared)
    torch.manual_seed(seed + 1)
    for module in model.modules():
        if isinstance(module, ListMoEBlock):
            for p in module.parameters():
                nn.init.normal_(p, 0, 0.1)
    return model.eval()


def tiny_dense() -> nn.Module:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**COMMON, "intermediate_size": 24})).eval()


def tiny_gpt_oss(seed: int = 0) -> nn.Module:
    """gpt-oss: fused experts stored transposed, gate/up interleaved, with biases and custom gating."""
    config = transformers.GptOssConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    model = transformers.GptOssForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)  # biases init to zero; random ones make the bias handling visible
    return model


def tiny_nemotron_h(seed: int = 0) -> nn.Module:
    """NemotronH: non-gated fused experts (``has_gate=False``) under each layer's ``mixer``, between mamba
    and attention layers."""
    config = transformers.NemotronHConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, layers_block_type=["mamba", "moe", "attention", "moe"],
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, n_routed_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=24, moe_shared_expert_intermediate_size=24, intermediate_size=48, mamba_num_heads=4,
        mamba_head_dim=8, ssm_state_size=8, n_groups=1, mamba_n_groups=1, expand=1, max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = transformers.NemotronHForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.abs().sum() == 0 and param.ndim >= 2:
                param.normal_(0, 0.2)
    return model
