"""unite_hf: universal knowledge (genes) from Mixture-of-Experts LLMs, grown into small dense models.

>>> from unite_hf import extract_universal_knowledge, UniteGene
>>> gene = extract_universal_knowledge(moe, tokenizer=tok, calibration="wikitext2", rank=512)
>>> gene.save_pretrained("mixtral-gene")
"""

from ._version import __version__  # noqa: E402, F401  (one place, importable by submodules without a cycle)

from .calibration import CalibrationSet, load_calibration  # noqa: E402
from .decomposition import (  # noqa: E402
    DECOMPOSITIONS, Decomposition, decompose, decompose_streaming, register_decomposition,
)
from .distributed import compute_expert_importance_distributed  # noqa: E402
from .sources.checkpoint import CheckpointError, MoECheckpoint  # noqa: E402
from .fusion import FUSIONS, fuse_block, register_fusion  # noqa: E402
from .gene import Gene, GeneConfig, GeneFormatError, UniteGene, load_gene, register_gene  # noqa: E402
from .importance import ExpertImportance, compute_expert_importance, compute_routing_frequency  # noqa: E402
from .io import CorruptedFileError  # noqa: E402
from .methods.unite import extract_universal_knowledge  # noqa: E402
from .methods.masa import MasaGene, extract_masa_gene  # noqa: E402
from .methods.xpert.analysis import ExpertAnalysis, analyze_experts, select_experts  # noqa: E402
from .methods.xpert import XpertGene, extract_xpert_gene  # noqa: E402
from .methods import METHODS, MethodConfig, get_method, load_methods, register_method  # noqa: E402
from .methods.unite import UniteExtractionConfig  # noqa: E402
from .methods.masa import MasaExtractionConfig  # noqa: E402
from .methods.xpert import XpertExtractionConfig  # noqa: E402

load_methods()  # every method folder registers itself: a new method is a new folder, nothing listed here
from .llama_targets import llama_target_config, masa_init  # noqa: E402
from .methods.masa.scaling import adaptive_scale  # noqa: E402
from .sources import MoESource, UnsupportedSourceError, get_source, register_layout  # noqa: E402
from .configuration_unite import UniteConfig  # noqa: E402
from .modeling_unite import (  # noqa: E402
    UniteForCausalLM, UniteForMultipleChoice, UniteForSequenceClassification, UniteModel, UnitePreTrainedModel,
)


def _register_with_auto_classes() -> None:
    """``import unite_hf`` makes AutoConfig / AutoModel* know model_type "unite", and saved targets
    carry an auto_map plus the modeling files, so they load with trust_remote_code=True without us."""
    from transformers import (
        AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMultipleChoice, AutoModelForSequenceClassification,
    )

    AutoConfig.register("unite", UniteConfig, exist_ok=True)
    UniteConfig.register_for_auto_class()
    for auto_class, model_class in (
        (AutoModel, UniteModel),
        (AutoModelForCausalLM, UniteForCausalLM),
        (AutoModelForSequenceClassification, UniteForSequenceClassification),
        (AutoModelForMultipleChoice, UniteForMultipleChoice),
    ):
        auto_class.register(UniteConfig, model_class, exist_ok=True)
        model_class.register_for_auto_class(auto_class.__name__)


_register_with_auto_classes()

from .peft_lora import register_with_peft  # noqa: E402

register_with_peft()  # peft's LoraConfig and merges know the factorized FFN projections (unite_hf/peft_lora.py)

_MOVED_TO_TOOLS = {"moefy": "moefy", "MoefyError": "moefy"}
"""Names that moved out of the installed package into ``tools/`` (a source checkout's developer tools)."""


def __getattr__(name: str):
    """``from unite_hf import moefy`` keeps working from a source checkout (with a FutureWarning):
    ``moefy`` moved to ``tools/moefy.py``, which is not installed with the library."""
    if name in _MOVED_TO_TOOLS:
        import warnings

        from ._checkout import load_tool

        tool = load_tool(_MOVED_TO_TOOLS[name])
        warnings.warn(f"unite_hf.{name} moved to tools/{_MOVED_TO_TOOLS[name]}.py (not installed with the library): "
                      f"use `from tools.{_MOVED_TO_TOOLS[name]} import {name}` in a source checkout, or "
                      f"`unite-hf {_MOVED_TO_TOOLS[name]}`", FutureWarning, stacklevel=2)
        value = globals()[name] = getattr(tool, name)  # once: later lookups do not come here
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "UniteConfig", "UniteForCausalLM", "UniteForMultipleChoice", "UniteForSequenceClassification", "UniteModel",
    "UnitePreTrainedModel", "CheckpointError", "MoECheckpoint", "compute_expert_importance_distributed",
    "decompose_streaming", "CalibrationSet", "CorruptedFileError", "DECOMPOSITIONS", "Decomposition", "ExpertImportance", "FUSIONS",
    "Gene", "GeneConfig", "GeneFormatError", "MoESource", "UniteGene", "load_gene", "register_gene", "UnsupportedSourceError", "__version__",
    "compute_expert_importance", "compute_routing_frequency", "decompose", "extract_universal_knowledge",
    "fuse_block", "get_source", "load_calibration", "register_decomposition", "register_fusion", "register_layout",
    "MasaGene", "extract_masa_gene", "ExpertAnalysis", "analyze_experts", "select_experts", "XpertGene",
    "extract_xpert_gene", "adaptive_scale", "llama_target_config", "masa_init", "METHODS", "MethodConfig",
    "get_method", "load_methods", "register_method", "UniteExtractionConfig", "MasaExtractionConfig",
    "XpertExtractionConfig",
]
