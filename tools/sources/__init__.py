"""Representative MoE sources for benchmarks, built once and cached (outside the installed library).

- :func:`build_upcycled`: a dense Llama-family LM (SmolLM2-135M by default) sparse-upcycled into a
  Mixtral (every expert a copy of the dense FFN) and trained further with the load-balancing loss.
- :func:`build_native`: a small Mixtral trained from scratch, experts from different random inits.

Both return a ``transformers.MixtralForCausalLM`` saved with ``save_pretrained`` (safetensors) in a
cache folder with its tokenizer and ``source_report.json``; :func:`load_source` reads a folder back.
``python -m tools.sources {upcycled,native} --help`` is the command line.
"""

from .cache import BuildOptions, SourceReport, default_cache_root, expert_cosine, load_source
from .native import NATIVE_DEFAULTS, NATIVE_TRAINING, build_native, gpt2_tokenizer, init_native
from .upcycled import UPCYCLED_DEFAULTS, UPCYCLED_TRAINING, build_upcycled, upcycle

__all__ = ["NATIVE_DEFAULTS", "NATIVE_TRAINING", "UPCYCLED_DEFAULTS", "UPCYCLED_TRAINING", "BuildOptions",
           "SourceReport", "build_native", "build_upcycled", "default_cache_root", "expert_cosine", "gpt2_tokenizer",
           "init_native", "load_source", "upcycle"]
