"""The package version, in a module of its own: submodules that record it (gene configs, model cards)
import it from here, not from the ``unite_hf`` package, whose ``__init__`` imports them (an import cycle)."""

__version__ = "0.1.0"
