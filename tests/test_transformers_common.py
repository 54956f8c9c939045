"""transformers' own common tests (``ModelTesterMixin``, ``ConfigTester``) run against the UNITE targets.

The tests are transformers' (fetched from the installed version's sdist by ``hf_common_tests``); this
module only supplies what every transformers model test supplies: a model tester that builds a tiny
``UniteConfig`` and inputs, and the ``unittest.TestCase`` listing the classes under test. The model is built
from its config alone (as ``from_pretrained`` does), not grown from a gene: the common tests construct
models from ``config`` many times over.

What does not run, and why, is listed in one place: :data:`SKIPPED` (the three skips this module makes)
and :data:`SKIPPED_BY_TRANSFORMERS` (the common tests' own skip conditions that hold here, with their
reasons). Not run at all: the ``torch.export`` tests (``ExportTesterMixin``) and the ``generate`` tests
(``GenerationTesterMixin``), whose modules the sdist does not ship (see ``hf_common_tests``).
"""

from __future__ import annotations

import importlib
import unittest
from unittest import mock

import pytest
import torch
import transformers
from transformers.models.auto import modeling_auto

from unite_hf import (
    UniteConfig, UniteForCausalLM, UniteForMultipleChoice, UniteForSequenceClassification, UniteModel,
)

try:
    from hf_common_tests import PACKAGE, common_tests_package

    common_tests_package()
    modeling_common = importlib.import_module(f"{PACKAGE}.test_modeling_common")
    configuration_common = importlib.import_module(f"{PACKAGE}.test_configuration_common")
except (RuntimeError, ImportError) as error:  # no network, no pip, or an sdist without the files
    pytest.skip(f"transformers' common tests unavailable: {error}", allow_module_level=True)

ModelTesterMixin = modeling_common.ModelTesterMixin
ConfigTester = configuration_common.ConfigTester
ids_tensor, random_attention_mask = modeling_common.ids_tensor, modeling_common.random_attention_mask


# -- what is not run, and why: every skip of a common test, in one place -------------------------------
SKIPPED: dict[str, str] = {
    "test_generation_tester_mixin_inheritance": (
        "checks that the tester inherits GenerationTesterMixin, whose generate tests are in "
        "tests/generation/test_utils.py, a module the sdist does not ship: the generate tests are not run, so "
        "inheriting the empty stand-in would pass this check vacuously (generate itself is exercised by "
        "test_hf_conformance.py and the retention tests)"),
    "test_model_weights_reload_no_missing_tied_weights": (
        "overwrites the saved model.safetensors by hand and reloads the folder; unite_hf records every saved "
        "file's SHA-256 (unite_checksums.json) and from_pretrained refuses a folder whose files changed after "
        "saving, by design, so the reload raises CorruptedFileError before the missing keys can be compared"),
    "test_reverse_loading_mapping": (
        "the only weight conversions are the backbone family's (Qwen2-MoE: pack per-expert "
        "mlp.experts.*.{gate,up,down}_proj into fused expert tensors), scoped to expert modules that a UNITE "
        "target replaces by its factorized FFN: no target key matches them, so saving maps no key and the "
        "test's premise (a model with conversions serializes renamed keys) does not hold; the save/load round "
        "trips are covered by test_save_load, test_can_use_safetensors and test_load_save_without_tied_weights"),
}


# The common tests' own skips that hold for the UNITE targets on a CPU machine (transformers' reasons,
# unchanged; none is forced by this module): test name patterns -> why.
SKIPPED_BY_TRANSFORMERS: dict[str, str] = {
    "test_flash_attn_*, test_kernels_can_load_without_crashing": (
        "need CUDA with the flash-attention 2/3/4 packages, the kernels library, or Apple MPS (the targets "
        "declare _supports_flash_attn: the family backbone's attention runs unchanged)"),
    "test_disk_offload_bin, test_disk_offload_safetensors, test_cpu_offload, test_model_parallelism, "
    "test_can_load_with_device_context_manager, test_can_load_with_global_device_set, "
    "test_flex_attention_with_grads, test_sdpa_can_dispatch_on_flash, test_sdpa_can_compile_dynamic, "
    "test_torch_compile_for_training": "need an accelerator (one or several GPUs); the last is also @slow",
    "test_resize_*_with_deepspeed*": "need DeepSpeed",
    "test_keep_in_fp32_modules*": "the targets keep no module in fp32 (_keep_in_fp32_modules is None)",
    "test_eager_matches_batched_and_grouped_inference (3 rows)": (
        "no batched/grouped-GEMM experts: the UNITE FFN is one fused dense expert"),
    "test_moe_models_record_router_logits": "no router, no sparse experts: the UNITE FFN is dense by design",
    "test_eager_matches_sdpa_inference (output_attentions row)": "SDPA returns no attention weights",
    "test_attn_implementation_composite_models, test_sdpa_can_dispatch_composite_models, "
    "test_can_set_attention_dynamically_composite_model": "not a composite (vision/audio + text) model",
    "test_encoder_decoder_loss_no_double_shift": "not an encoder-decoder",
    "test_resize_position_vector_embeddings": "RoPE: no position embedding matrix to resize",
    "test_sliding_window_mask": "the tester's family (Qwen2-MoE) config has no sliding window",
    "test_model_rope_with_partial_rotation, test_vision_axial_rope": "no partial or axial RoPE in this family",
    "test_bc_cache_name_forward (4 subtests)": (
        "checks the deprecation warning of transformers 5.2x's past_key_values -> cache rename, for models "
        "whose forward names `cache`; the targets take past_key_values= (and cache= through **kwargs) so "
        "that they run on transformers before and after the rename"),
}


# where a model added to transformers is listed by name (model_type "unite")
AUTO_NAME_TABLES = {
    "MODEL_MAPPING_NAMES": "UniteModel",
    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES": "UniteForCausalLM",
    "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES": "UniteForSequenceClassification",
    "MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES": "UniteForMultipleChoice",
}


class UniteModelTester:
    """Builds a tiny UNITE target config (a 2-layer Qwen2-MoE backbone: a dense MLP in layer 0, a UNITE FFN
    with the shared expert kept in layer 1) and a batch of inputs, as transformers' ``*ModelTester`` classes
    do. Layer 0 is dense from the start because ``test_tp_plan_matches_params`` makes the first layer of
    any MoE config dense (``mlp_only_layers=[0]``) to see both kinds of layer."""

    def __init__(self, parent, batch_size=3, seq_length=7, num_choices=2, vocab_size=99, hidden_size=32,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=24,
                 rank=6, num_labels=3, is_training=True):
        self.parent = parent
        self.batch_size, self.seq_length, self.num_choices = batch_size, seq_length, num_choices
        self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.num_key_value_heads, self.rank, self.num_labels = num_key_value_heads, rank, num_labels
        self.is_training = is_training

    def get_config(self) -> UniteConfig:
        text_config = transformers.Qwen2MoeConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
            intermediate_size=48, moe_intermediate_size=self.intermediate_size, shared_expert_intermediate_size=40,
            num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[0],
            max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )
        # layer 0 keeps the family's dense MLP, layer 1 is a UNITE FFN (as in DeepSeek-V3 targets)
        return UniteConfig(
            text_config=text_config, ffn_layers=[1], source_layers=list(range(self.num_hidden_layers)),
            projections=["gate", "up", "down"],
            ranks={p: [self.rank, self.rank] for p in ("gate", "up", "down")},
            expert_intermediate_size=self.intermediate_size, num_labels=self.num_labels,
        )

    def prepare_config_and_inputs(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        attention_mask = random_attention_mask([self.batch_size, self.seq_length])
        return self.get_config(), input_ids, attention_mask

    def prepare_config_and_inputs_for_common(self):
        config, input_ids, attention_mask = self.prepare_config_and_inputs()
        return config, {"input_ids": input_ids, "attention_mask": attention_mask}


class UniteModelTest(ModelTesterMixin, unittest.TestCase):
    """``ModelTesterMixin`` over the four UNITE target classes."""

    all_model_classes = (UniteModel, UniteForCausalLM, UniteForSequenceClassification, UniteForMultipleChoice)
    # the UNITE modules are initialised by initialize_weights (ModelTesterMixin skips this check for models
    # whose config file has no "# Copyright 20xx" line, as UniteConfig's has not, unless this is set)
    test_can_init_all_missing_weights_before_2023 = True

    def setUp(self):
        self.model_tester = UniteModelTester(self)
        # UniteConfig's own fields, at values other than their defaults (text_config: the family's default)
        self.config_tester = ConfigTester(self, config_class=UniteConfig,
                                          common_properties=["hidden_size", "num_hidden_layers"],
                                          expert_intermediate_size=37, expert_activation="gelu", tie_bases=True,
                                          shared_experts="drop", layer_selection="uniform")

    @classmethod
    def setUpClass(cls):
        """List the UNITE classes in transformers' name mappings, as a model added to transformers is listed:
        the common tests look a class's role up there (which inputs get labels, which get a choices axis,
        that a base model has no loss). ``unite_hf`` registers its classes with the Auto classes, which do
        not fill these name tables."""
        super().setUpClass()
        cls._mappings = [mock.patch.dict(getattr(modeling_auto, table), {"unite": name})
                         for table, name in AUTO_NAME_TABLES.items()]
        for patcher in cls._mappings:
            patcher.start()

    @classmethod
    def tearDownClass(cls):
        for patcher in reversed(cls._mappings):
            patcher.stop()
        super().tearDownClass()

    def test_config(self):
        """transformers' ``ConfigTester`` on ``UniteConfig`` (a composite config: ``text_config``)."""
        assert UniteConfig.sub_configs, "the config_common_kwargs stand-in relies on UniteConfig being composite"
        self.config_tester.run_common_tests()


def _skip(name: str, reason: str):
    def skipped(self):
        pytest.skip(reason)

    skipped.__name__ = skipped.__qualname__ = name
    skipped.__doc__ = reason
    return skipped


for _name, _reason in SKIPPED.items():
    if not hasattr(UniteModelTest, _name):
        raise AttributeError(f"SKIPPED names {_name}, which ModelTesterMixin does not define")
    setattr(UniteModelTest, _name, _skip(_name, _reason))
