"""Measuring genes: how much of the source's function they keep (:mod:`.retention`)."""

from .retention import LayerRetention, RetentionReport, held_out_windows, measure_retention

__all__ = ["LayerRetention", "RetentionReport", "held_out_windows", "measure_retention"]
