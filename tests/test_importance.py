"""The batched per-sequence Fisher equals a brute-force reference: one backward pass per sequence."""

import os

import pytest
import torch
from tiny_models import FAMILIES, VOCAB, tiny_gpt_oss, tiny_moe, tiny_module_list_moe, tiny_nemotron_h
from tolerances import eps_tolerance

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


def test_fisher_with_unaligned_expert_widths_equals_brute_force():
    """Expert widths whose float32 rows are not 16-byte aligned (hidden 30, intermediate 13), which torch's
    grouped GEMM refuses (transformers' default grouped_mm forward fails on this model too, hence the eager
    experts for the reference): the grouped probe multiplies them in a loop instead."""
    model = tiny_moe("mixtral", hidden_size=30, intermediate_size=13, num_attention_heads=3, num_key_value_heads=1,
                     head_dim=10)
    importance = compute_expert_importance(model, CALIBRATION, batch_size=3, show_progress=False)
    model.set_experts_implementation("eager")
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


# -- the per-sequence squared-norm kernels: both forms, and float32 against float64 references -------------

def _sq_norm_reference(x, grad, seq_ids, bias=False):
    """float64 brute force: each sequence's weight gradient ``G_n.T X_n`` formed, squared and summed."""
    total = 0.0
    for n in seq_ids.unique():
        rows = seq_ids == n
        g, xs = grad[rows].double(), x[rows].double()
        total += float((g.T @ xs).square().sum()) + (float(g.sum(0).square().sum()) if bias else 0.0)
    return total


def _uncentred_gram_condition(x, grad, seq_ids):
    """The condition number of the uncentred Gram form, in float64: ``sum |(x_s.x_t)(g_s.g_t)|`` over
    ``|sum (x_s.x_t)(g_s.g_t)|``. Rounding each Gram entry to float32 (relative u = eps/2) may move the
    sum by up to this times u: a property of the inputs, the same on any BLAS (unlike running the
    float32 form itself, whose actual error depends on how the BLAS orders its sums)."""
    magnitude = total = 0.0
    for n in seq_ids.unique():
        xs, g = x[seq_ids == n].double(), grad[seq_ids == n].double()
        terms = (xs @ xs.T) * (g @ g.T)
        magnitude, total = magnitude + float(terms.abs().sum()), total + float(terms.sum())
    return magnitude / abs(total)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Which kernels a Fisher pass runs: Gram stacks per dtype, and whether groups were split by form."""
    import unite_hf.importance as importance_module

    calls = {"gram": [], "mixed": 0}
    gram, rows_of_groups = importance_module._gram_sq_norms, importance_module._rows_of_groups

    def counted_gram(x, grad):
        calls["gram"].append(x.dtype)
        return gram(x, grad)

    def counted_rows(*args):
        calls["mixed"] += 1
        return rows_of_groups(*args)

    monkeypatch.setattr(importance_module, "_gram_sq_norms", counted_gram)
    monkeypatch.setattr(importance_module, "_rows_of_groups", counted_rows)
    return calls


@pytest.mark.parametrize("form", ["gram", "direct", "mixed"])
@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "module_list"])
def test_gram_and_direct_forms_equal_brute_force(family, form, monkeypatch, kernel_calls):
    """Tiny models take the Gram form by flops; _GRAM_LIMIT sends every group (0) or the longer ones (3)
    through the direct product instead."""
    import unite_hf.importance as importance_module

    model = {"mixtral": lambda: tiny_moe("mixtral"), "gpt_oss": tiny_gpt_oss, "module_list": tiny_module_list_moe}[family]()
    monkeypatch.setattr(importance_module, "_GRAM_LIMIT", {"gram": 4096, "direct": 0, "mixed": 3}[form])
    importance = compute_expert_importance(model, CALIBRATION, batch_size=3, show_progress=False)
    assert bool(kernel_calls["gram"]) == (form != "direct")
    # ModuleList experts run one sequence per pass: their "mixed" is a choice per call, not within one
    assert bool(kernel_calls["mixed"]) == (form == "mixed" and family != "module_list")
    reference, _ = brute_force_fisher(model, CALIBRATION)
    torch.testing.assert_close(importance.fisher, reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())


def _adversarial(kind, counts, d_in, d_out, generator):
    """Token groups whose uncentred float32 Gram sum cancels (offsets) or whose gradient nearly vanishes."""
    n = sum(counts)
    x = torch.randn(n, d_in, generator=generator)
    g = torch.randn(n, d_out, generator=generator) * 1e-3
    seq_ids = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    if kind in ("offset", "offset_both"):  # a large common offset; each sequence's gradients sum to zero
        x += 1e3 * torch.randn(d_in, generator=generator)
        for n_ in range(len(counts)):
            g[seq_ids == n_] -= g[seq_ids == n_].mean(0)
        if kind == "offset_both":
            g += 1e-1 * torch.randn(d_out, generator=generator)
    elif kind == "outlier_channels":  # a few channels 1000x larger, random signs per token
        x[:, :3] *= 1e3
    elif kind == "orthogonal":  # x_t = a_t v, g_t = b_t w with a.b = 0 in every sequence: G_n.T X_n ~ 0
        a, b = torch.randn(n, generator=generator), torch.randn(n, generator=generator)
        for n_ in range(len(counts)):
            rows = seq_ids == n_
            b[rows] -= (a[rows] @ b[rows]) / (a[rows] @ a[rows]) * a[rows]
        x = a[:, None] * torch.randn(d_in, generator=generator) + 1e-3 * x
        g = b[:, None] * torch.randn(d_out, generator=generator) + g
    return x, g, seq_ids


@pytest.mark.parametrize("kind", ["offset", "offset_both", "outlier_channels", "orthogonal"])
def test_float32_gram_form_is_exact_on_adversarial_inputs(kind, kernel_calls):
    """float32 token Grams, centred, with the error estimate's float64 fallback, against a float64 brute
    force; sequences of unequal length (padding), one of a single token, rows out of order (sorting)."""
    from unite_hf.importance import _ieee_float32_matmul, _sum_per_sequence_sq_norms

    generator = torch.Generator().manual_seed(0)
    x, g, seq_ids = _adversarial(kind, [40, 7, 25, 1, 33], 256, 384, generator)
    order = torch.randperm(seq_ids.numel(), generator=generator)
    x, g, seq_ids = x[order], g[order], seq_ids[order]
    reference = _sq_norm_reference(x, g, seq_ids, bias=True)
    with _ieee_float32_matmul():
        got = float(_sum_per_sequence_sq_norms(x, g, seq_ids, bias=True))
    # the library's contract: a group is kept in float32 only where its error estimate is at most
    # _F32_GRAM_RTOL (5e-6, ~40 eps) of its value, else redone in float64
    assert abs(got - reference) <= 1e-5 * reference
    assert kernel_calls["gram"][0] == torch.float32 and kernel_calls["mixed"] == 0
    if kind == "offset":  # the cancellation is real: the plain float32 Gram form has no digit it can
        # promise (condition ~2.5e6, times eps ~0.3; the inputs' property, not one BLAS's luck)
        assert _uncentred_gram_condition(x, g, seq_ids) * torch.finfo(torch.float32).eps > 1e-2
    if kind in ("offset_both", "outlier_channels"):  # centring removed the cancellation: float32 sufficed
        assert torch.float64 not in kernel_calls["gram"]
    if kind in ("offset", "orthogonal"):  # cancellation that centring leaves (in the gradient sums for
        # "offset", whose gradients sum to zero): the estimate sees it and float64 redoes those sequences
        assert torch.float64 in kernel_calls["gram"]
        assert abs(got - reference) <= 1e-9 * reference


def test_float32_kernels_keep_full_precision_under_reduced_matmul_precision():
    """``set_float32_matmul_precision("medium")`` makes oneDNN CPUs multiply float32 in bf16 and CUDA in
    TF32; the sink runs its products in full float32 anyway and leaves the setting as it found it."""
    from unite_hf.importance import _GradientSink

    matmul = getattr(torch.backends.mkldnn, "matmul", None)
    if matmul is None or not hasattr(matmul, "fp32_precision"):
        pytest.skip("torch without per-backend float32 matmul precision")
    generator = torch.Generator().manual_seed(0)
    x, g, seq_ids = _adversarial("offset_both", [40, 7, 25], 256, 384, generator)
    previous = (matmul.fp32_precision, torch.backends.cuda.matmul.fp32_precision)
    matmul.fp32_precision, torch.backends.cuda.matmul.fp32_precision = "bf16", "tf32"
    try:
        fisher = torch.zeros(1, dtype=torch.float64)
        _GradientSink(fisher, None)(0, x, g, seq_ids, True)
        assert (matmul.fp32_precision, torch.backends.cuda.matmul.fp32_precision) == ("bf16", "tf32")
    finally:
        matmul.fp32_precision, torch.backends.cuda.matmul.fp32_precision = previous
    reference = _sq_norm_reference(x, g, seq_ids, bias=True)
    assert abs(float(fisher[0]) - reference) <= 1e-5 * reference


def _float32_direct_form_tolerance(x, g, seq_ids):
    """How far ``sum_n ||G_n.T X_n||^2 + ||sum_t g_t||^2`` may come out when each gradient is formed in
    float32: a T_n-term sum puts each entry within r = eps_tolerance(k=T_n, scale=|g|.T @ |x|) of the
    exact one, its square within 2 |G| r + r^2, and the float32 norm of the d_out x d_in squares adds
    eps_tolerance(k=d_out * d_in) of their sum (the bias sums likewise, over T_n rows)."""
    total = 0.0
    for n in seq_ids.unique():
        gs, xs = g[seq_ids == n].double(), x[seq_ids == n].double()
        for exact, magnitude in ((gs.T @ xs, gs.abs().T @ xs.abs()), (gs.sum(0), gs.abs().sum(0))):
            reach = eps_tolerance(torch.float32, k=gs.shape[0], scale=magnitude)
            total += float((2 * exact.abs() * reach + reach.square()).sum())
            total += eps_tolerance(torch.float32, k=exact.numel(), scale=float(exact.square().sum()))
    return total


@pytest.mark.parametrize("kind", ["offset", "outlier_channels", "orthogonal"])
def test_low_precision_direct_form_is_exact_for_its_inputs(kind, monkeypatch):
    """The tensor-core path of bf16 models (CUDA): each sequence's gradient formed whole from the bf16
    rows, squares summed, against a float64 brute force over the same bf16 values; unequal sequence
    lengths (padding), rows out of order, and several chunks (a chunk size forced down to 2 gradients)."""
    from unite_hf import importance

    generator = torch.Generator().manual_seed(1)
    x, g, seq_ids = _adversarial(kind, [40, 7, 25, 1, 33], 96, 128, generator)
    order = torch.randperm(seq_ids.numel(), generator=generator)
    x, g, seq_ids = x[order].bfloat16(), g[order].bfloat16(), seq_ids[order]
    reference = _sq_norm_reference(x.double(), g.double(), seq_ids, bias=True)
    monkeypatch.setattr(importance, "_DIRECT_CHUNK_BYTES", 2 * 4 * 96 * 128)
    got = float(importance._direct_sq_norms_low_precision(x, g, seq_ids, bias=True))
    assert abs(got - reference) <= _float32_direct_form_tolerance(x, g, seq_ids)
    assert not importance._tensor_core_direct(x, g)  # on a CPU the float32 kernels stay in charge


def _bf16_rounding_budget(g, x):
    """How far ``||bf16(G)||^2`` may move, G = g.T @ x, when G is accumulated in float32 (exact products
    of bf16 numbers, T-term sums: within gamma_T |g|.T @ |x| of G) before its rounding to bf16: an entry
    whose interval reaches past a bf16 rounding point may round to the neighbouring value."""
    exact = g.double().T @ x.double()
    reach = eps_tolerance(torch.float32, k=g.shape[0], scale=g.double().abs().T @ x.double().abs())
    rounded, low, high = (v.bfloat16().double() for v in (exact, exact - reach, exact + reach))
    moved = torch.maximum((low.square() - rounded.square()).abs(), (high.square() - rounded.square()).abs())
    return float(moved.sum())


@pytest.mark.parametrize("kind", ["offset", "outlier_channels", "orthogonal"])
def test_grouped_direct_form_is_exact_per_group_for_its_inputs(kind, monkeypatch):
    """The grouped path of bf16 models on Hopper GPUs: every group's gradient from one grouped GEMM over
    the token axis, against a float64 brute force per group over the same bf16 values; empty groups (whose
    output slices the kernel never writes), unequal lengths, and chunks (forced down to 2 groups)."""
    from unite_hf import importance

    generator = torch.Generator().manual_seed(2)
    counts = [40, 0, 7, 25, 0, 1, 33]
    x, g, group = _adversarial(kind, counts, 96, 128, generator)
    x, g = x.bfloat16(), g.bfloat16()
    reference = torch.tensor([_sq_norm_reference(x[group == n].double(), g[group == n].double(),
                                                 group[group == n], bias=True) if c else 0.0
                              for n, c in enumerate(counts)], dtype=torch.float64)
    # what autograd's own bf16 weight gradient of each group would give: the exact product, rounded to bf16
    autograd_bf16 = torch.tensor([float((g[group == n].double().T @ x[group == n].double()).bfloat16().double()
                                        .square().sum() + g[group == n].double().sum(0).square().sum()) if c else 0.0
                                  for n, c in enumerate(counts)], dtype=torch.float64)
    # float32 accumulation moves each entry by up to gamma_T |g|.T|x|, which may cross a bf16 rounding
    # point (one bf16 ulp: the data's own budget below), and the float32 norm of the 96 x 128 entries
    # (and of the bias sums, smaller) adds eps_tolerance(k=96 * 128)
    budget = torch.tensor([_bf16_rounding_budget(g[group == n], x[group == n]) if c else 0.0
                           for n, c in enumerate(counts)], dtype=torch.float64)
    tolerance = budget + eps_tolerance(torch.float32, k=96 * 128, scale=autograd_bf16)
    for chunk_groups in (len(counts), 2):
        monkeypatch.setattr(importance, "_GROUPED_DIRECT_BYTES", chunk_groups * 2 * 96 * 128)
        got = importance._grouped_direct_sq_norms(x, g, group, len(counts), bias=True)
        assert ((got - autograd_bf16).abs() <= tolerance).all(), (got - autograd_bf16) / autograd_bf16
        # against the exact value of the inputs: the bf16 rounding of each gradient entry (2^-9 relative)
        # doubled by squaring, at most 2^-8 where one entry dominates (the one-token group of outliers);
        # a 96 x 128 gradient of comparable entries averages it down to ~1e-5
        torch.testing.assert_close(got, reference, rtol=2.0 ** -8, atol=0.0)
    assert not importance._grouped_direct(x, g)  # on a CPU the float32 kernels stay in charge


def _triton_runs() -> bool:
    """The fused Triton kernel runs here: a CUDA device, or Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    from unite_hf import triton_sq_norms

    return triton_sq_norms._triton_ok() and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


needs_triton = pytest.mark.skipif(not _triton_runs(), reason="Triton with a CUDA device or TRITON_INTERPRET=1")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_triton_kernel_equals_float64_per_group(dtype):
    """The fused kernel's per-group ``||G_n.T X_n||^2`` against float64 on the same rows: widths that are
    not multiples of the tiles, empty groups, a one-row group. (bf16 is checked on GPUs by
    ``bench_fisher.py --grouped-kernels``: Triton's CPU interpreter has no bf16.)"""
    from unite_hf.triton_sq_norms import grouped_sq_norms

    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator().manual_seed(3)
    counts = torch.tensor([40, 0, 7, 70, 0, 1, 33])
    bounds = [0, *counts.cumsum(0).tolist()]
    for d_in, d_out in [(64, 192), (100, 72)]:
        x = torch.randn(int(counts.sum()), d_in, generator=generator).to(dtype)
        g = torch.randn(int(counts.sum()), d_out, generator=generator).to(dtype)
        got = grouped_sq_norms(x.to(device), g.to(device), counts.to(device)).cpu().double()
        reference = torch.tensor([float((g[a:b].double().T @ x[a:b].double()).square().sum())
                                  for a, b in zip(bounds, bounds[1:])], dtype=torch.float64)
        torch.testing.assert_close(got, reference, rtol=1e-5, atol=0.0)


interpreted_triton = pytest.mark.skipif(not (_triton_runs() and os.environ.get("TRITON_INTERPRET") == "1"),
                                        reason="Triton's CPU interpreter (TRITON_INTERPRET=1): the tiny models run on the CPU")


@pytest.mark.parametrize("kernel", [pytest.param("triton", marks=interpreted_triton), "grouped_mm", "padded_bmm"])
@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_grouped_sink_equals_brute_force(family, kernel, monkeypatch):
    """The whole pass with every (expert, sequence) group in one product per projection (the paths bf16
    models take on GPUs, forced here on float32 CPU rows) against one backward per sequence: group
    numbering, biases (gpt-oss), transposed weights (gpt-oss), unrouted experts."""
    from unite_hf import importance, triton_sq_norms

    monkeypatch.setattr(importance, "GROUPED_KERNEL", kernel)
    monkeypatch.setattr(importance, "_grouped_direct", lambda x, grad: True)
    monkeypatch.setattr(importance, "_tensor_core_direct", lambda x, grad: True)
    monkeypatch.setattr(triton_sq_norms, "available", lambda x: kernel == "triton")
    calls = []
    name = {"triton": "_grouped_direct_sq_norms", "grouped_mm": "_grouped_direct_sq_norms",
            "padded_bmm": "_padded_direct_group_sq_norms"}[kernel]
    counted = getattr(importance, name)
    monkeypatch.setattr(importance, name, lambda *a, **k: calls.append(1) or counted(*a, **k))
    model = {"mixtral": lambda: tiny_moe("mixtral"), "gpt_oss": tiny_gpt_oss}[family]()
    got = compute_expert_importance(model, CALIBRATION, batch_size=4, show_progress=False).fisher
    source = get_source(model)
    assert len(calls) == 2 * len(source.blocks) * 2  # one call per projection, block and batch (6 = 4 + 2)
    reference, _ = brute_force_fisher(model, CALIBRATION)
    torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())


def test_the_probes_table_is_a_deprecated_alias_of_the_layouts_own_probes():
    """PROBES (layout name -> (install, whether a pass may hold several sequences)) still answers, with a
    FutureWarning: fused experts take several sequences per pass, ModuleList experts one."""
    import unite_hf.importance as importance

    with pytest.warns(FutureWarning, match="PROBES is deprecated"):
        probes = importance.PROBES
    from unite_hf.sources import LAYOUTS

    assert set(probes) == set(LAYOUTS) and probes["fused_3d"][1] is True and probes["module_list"][1] is False
    assert all(callable(install) for install, _ in probes.values())
