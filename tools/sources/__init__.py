"""Representative MoE sources for benchmarks, built once and cached (outside the installed library).

- :func:`build_upcycled`: a dense Llama-family LM (SmolLM2-135M by default) sparse-upcycled into a
  Mixtral (every expert a copy of the dense FFN) and trained further with the load-balancing loss.
- :func:`build_drop_upcycled`: the same dense LM drop-upcycled (Drop-Upcycling: each expert re-draws
  its own random half of the FFN's neurons), then trained the same way: diverged experts that keep
  the parent's pretrained knowledge.
- :func:`build_native`: a small Mixtral trained from scratch, experts from different random inits.

All return a ``transformers.MixtralForCausalLM`` saved with ``save_pretrained`` (safetensors) in a
cache folder with its tokenizer and ``source_report.json``; :func:`load_source` reads a folder back.
``python -m tools.sources {upcycled,drop_upcycled,native} --help`` is the command line. Builds are
reproducible: the same settings (the pinned thread count included) give bit-identical weights; see
:mod:`tools.sources.cache`.
"""

from .cache import BuildOptions, SourceReport, default_cache_root, expert_cosine, load_source
from .drop_upcycled import DROP_UPCYCLED_DEFAULTS, DROP_UPCYCLED_TRAINING, build_drop_upcycled, drop_upcycle
from .native import NATIVE_DEFAULTS, NATIVE_TRAINING, build_native, gpt2_tokenizer, init_native
from .upcycled import UPCYCLED_DEFAULTS, UPCYCLED_TRAINING, build_upcycled, upcycle

__all__ = ["DROP_UPCYCLED_DEFAULTS", "DROP_UPCYCLED_TRAINING", "NATIVE_DEFAULTS", "NATIVE_TRAINING", "UPCYCLED_DEFAULTS", "UPCYCLED_TRAINING", "BuildOptions",
           "SourceReport", "build_drop_upcycled", "build_native", "build_upcycled", "default_cache_root", "drop_upcycle", "expert_cosine", "gpt2_tokenizer",
           "init_native", "load_source", "upcycle"]
