"""Deprecated location: ``unite_hf.moefy`` moved to ``tools/moefy.py`` in the repository, which is not
installed with the library (``unite-hf moefy`` still runs it from a source checkout). This alias
forwards to it, with a FutureWarning, where a checkout is there; it will be removed.

The alias module is also callable, as ``moefy`` itself: ``import unite_hf.moefy`` binds this module to
the name ``unite_hf.moefy``, which ``from unite_hf import moefy`` then returns."""

import sys
import types

from ._checkout import deprecated_alias

__getattr__, __dir__ = deprecated_alias("moefy")


class _CallableAlias(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return self.moefy(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableAlias
