"""Measuring genes: how much of the source's function they keep (:mod:`.retention`), and paired
intervals between targets scored on the same examples (:mod:`.paired`)."""

from .paired import PairedDifference, paired_difference
from .retention import LayerRetention, RetentionReport, held_out_windows, measure_retention, measure_routed_replacement

__all__ = ["LayerRetention", "PairedDifference", "paired_difference", "RetentionReport", "held_out_windows", "measure_retention",
           "measure_routed_replacement"]
