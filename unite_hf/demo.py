"""Deprecated location: ``unite_hf.demo`` moved to ``tools/demo.py`` in the repository, which is not
installed with the library (``unite-hf demo`` still runs it from a source checkout). This alias
forwards to it, with a FutureWarning, where a checkout is there; it will be removed."""

from ._checkout import deprecated_alias

__getattr__, __dir__ = deprecated_alias("demo")
