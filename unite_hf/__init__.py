"""unite_hf: universal knowledge (genes) from Mixture-of-Experts LLMs, grown into small dense models."""

__version__ = "0.1.0"
