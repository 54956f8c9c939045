"""The batched per-sequence Fisher equals a brute-force reference: one backward pass per sequence."""

import pytest
import torch
from tiny_models import FAMILIES, VOCAB, tiny_gpt_oss, tiny_moe, tiny_module_list_moe, tiny_nemotron_h

from unite_hf import compute_expert_importance, compute_routing_frequency, get_source

CALIBRATION = torch.randint(0, VOCAB, (6, 12), generator=torch.Generator().manual_seed(0))


def _expert_grads(block, expert):
    """The gradients of all of one expert's parameters after a backward pass."""
    if hasattr(block, "first_parameter"):
        params = [block.first_parameter, block.experts.down_proj]
        if block.has_bias:
            params += [getattr(block.experts, n) for n in ("gate_up_proj_bias", "up_proj_bias", "down_proj_bias")
                       if hasattr(block.experts, n)]
        return [p.grad[expert] for p in params if p.grad is not None]
    return [p.grad for p in block.experts[expert].parameters() if p.grad is not None]


def brute_force_fisher(model, input_ids, labels_fn=None):
    """F[l, i] = mean_n ||grad log p(y_n | x_n)||^2 with one backward per sequence (the slow reference)."""
    source = get_source(model)
    fisher = torch.zeros(len(source.blocks), source.num_experts, dtype=torch.float64)
    diag = {}
    for p in model.parameters():
        p.requires_grad_(True)
    for n in range(input_ids.shape[0]):
        model.zero_grad()
        ids = input_ids[n:n + 1]
        log_probs = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), -1)
        targets = ids[:, 1:] if labels_fn is None else labels_fn(log_probs)
        log_probs.gather(-1, targets[..., None]).sum().backward()
        for row, block in enumerate(source.blocks):
            for e in range(source.num_experts):
                grads = _expert_grads(block, e)
                fisher[row, e] += sum(g.double().square().sum() for g in grads)
                for k, g in enumerate(grads):
                    diag[(row, e, k)] = diag.get((row, e, k), 0) + g.double().square()
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(False)
    return fisher / input_ids.shape[0], diag


@pytest.mark.parametrize("family", [*FAMILIES, "module_list"])
def test_fisher_equals_brute_force(family):
    model = tiny_moe(family) if family != "module_list" else tiny_module_list_moe()
    importance = compute_expert_importance(model, CALIBRATION, batch_size=4, show_progress=False)
    reference, _ = brute_force_fisher(model, CALIBRATION)
    assert importance.moe_layers == get_source(model).moe_layers
    assert (reference > 0).any()
    torch.testing.assert_close(importance.fisher, reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())


def test_fisher_with_biased_transposed_experts_equals_brute_force():
    model = tiny_gpt_oss()
    importance = compute_expert_importance(model, CALIBRATION, batch_size=3, show_progress=False)
    reference, _ = brute_force_fisher(model, CALIBRATION)
    torch.testing.assert_close(importance.fisher, reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())


def test_sampled_labels_equal_brute_force_with_the_same_draws():
    model = tiny_moe("qwen3_moe")
    importance = compute_expert_importance(model, CALIBRATION, labels="sampled", batch_size=1, seed=3,
                                           show_progress=False)
    generator = torch.Generator().manual_seed(3)

    def draw(log_probs):
        probs = log_probs.detach().exp().reshape(-1, log_probs.shape[-1])
        return torch.multinomial(probs, 1, generator=generator).reshape(log_probs.shape[:-1])

    reference, _ = brute_force_fisher(model, CALIBRATION, labels_fn=draw)
    torch.testing.assert_close(importance.fisher, reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())
    empirical = compute_expert_importance(model, CALIBRATION, show_progress=False)
    assert not torch.allclose(importance.fisher, empirical.fisher)


def test_diagonal_fisher_equals_brute_force_elementwise():
    model = tiny_moe("mixtral")
    importance = compute_expert_importance(model, CALIBRATION, diagonal=True, batch_size=4, show_progress=False)
    _, diag = brute_force_fisher(model, CALIBRATION)
    source = get_source(model)
    n = CALIBRATION.shape[0]
    for row, block in enumerate(source.blocks):
        for e in range(4):
            first, down = diag[(row, e, 0)] / n, diag[(row, e, 1)] / n  # stored layouts (2I, H) and (H, I)
            intermediate = first.shape[0] // 2
            got = {p: importance.fisher_diag[(block.layer_idx, p)][e].double() for p in ("gate", "up", "down")}
            torch.testing.assert_close(got["gate"], first[:intermediate], rtol=1e-4, atol=1e-9)
            torch.testing.assert_close(got["up"], first[intermediate:], rtol=1e-4, atol=1e-9)
            torch.testing.assert_close(got["down"], down, rtol=1e-4, atol=1e-9)
            # the scalar Fisher is the diagonal's total
            total = sum(v.sum() for v in got.values())
            torch.testing.assert_close(total, importance.fisher[row, e], rtol=1e-4, atol=0)


def test_routing_frequency_counts_router_choices():
    model = tiny_moe("mixtral")
    counts = torch.zeros(3, 4)
    hooks = []
    for row, layer in enumerate(model.model.layers):
        def hook(module, args, output, row=row):
            counts[row] += torch.bincount(output[2].flatten(), minlength=4)
        hooks.append(layer.mlp.gate.register_forward_hook(hook))
    with torch.no_grad():
        model(input_ids=CALIBRATION)
    for h in hooks:
        h.remove()
    frequency = compute_routing_frequency(model, CALIBRATION, show_progress=False)
    torch.testing.assert_close(frequency.float(), counts / counts.sum(1, keepdim=True))


def test_batch_size_does_not_change_the_fisher_and_model_is_left_untouched():
    model = tiny_moe("olmoe")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    one = compute_expert_importance(model, CALIBRATION, batch_size=1, show_progress=False).fisher
    six = compute_expert_importance(model, CALIBRATION, batch_size=6, show_progress=False).fisher
    torch.testing.assert_close(one, six, rtol=1e-5, atol=0)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())  # no weight gradient was ever allocated
    assert model.config._experts_implementation != "unite_probe"


def test_bad_arguments():
    model = tiny_moe("mixtral")
    with pytest.raises(ValueError, match="labels"):
        compute_expert_importance(model, CALIBRATION, labels="oracle")
    with pytest.raises(ValueError, match="non-empty"):
        compute_expert_importance(model, CALIBRATION[:0])


def test_non_gated_experts_under_a_mixer_equal_brute_force():
    model = tiny_nemotron_h()
    source = get_source(model)
    assert source.moe_layers == [1, 3] and source.blocks[0].projection_names() == ("up", "down")
    importance = compute_expert_importance(model, CALIBRATION, batch_size=3, show_progress=False)
    reference, _ = brute_force_fisher(model, CALIBRATION)
    torch.testing.assert_close(importance.fisher, reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())


def test_per_sequence_loop_path_equals_the_gram_path(monkeypatch):
    """Calls with more tokens than the Gram limit take the per-sequence loop: same Fisher, biases included."""
    import unite_hf.importance as importance_module

    model = tiny_gpt_oss()
    gram = compute_expert_importance(model, CALIBRATION, batch_size=6, show_progress=False).fisher
    monkeypatch.setattr(importance_module, "_GRAM_LIMIT", 0)
    loop = compute_expert_importance(model, CALIBRATION, batch_size=6, show_progress=False).fisher
    torch.testing.assert_close(loop, gram, rtol=1e-5, atol=0)


def test_experts_without_autograd_are_refused_and_train_mode_recovers():
    """DeepSeek-MoE-16B style remote code runs eval-mode experts under torch.no_grad."""
    from tiny_models import ListMoEBlock

    class NoGradInEval(ListMoEBlock):
        def forward(self, hidden_states):
            if self.training:
                return super().forward(hidden_states)
            with torch.no_grad():
                return super().forward(hidden_states)

    model = tiny_module_list_moe()
    for layer in model.model.layers:
        block = NoGradInEval.__new__(NoGradInEval)
        block.__dict__ = layer.mlp.__dict__
        layer.mlp = block
    with pytest.raises(RuntimeError, match=r"model\.layers\.0\.mlp\.experts: experts ran without autograd.*train_mode=True"):
        compute_expert_importance(model, CALIBRATION, show_progress=False)
    importance = compute_expert_importance(model, CALIBRATION, train_mode=True, show_progress=False)
    reference, _ = brute_force_fisher(model.train(), CALIBRATION)
    torch.testing.assert_close(importance.fisher, reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())
