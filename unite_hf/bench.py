"""Deprecated location: ``unite_hf.bench`` moved to ``tools/bench.py`` in the repository, which is not
installed with the library (``unite-hf bench`` still runs it from a source checkout). This alias
forwards to it, with a FutureWarning, where a checkout is there; it will be removed."""

from ._checkout import deprecated_alias

__getattr__, __dir__ = deprecated_alias("bench")
