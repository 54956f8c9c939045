"""Fine-tuning UNITE targets: Trainer helpers, trainable-parameter modes and an offline accuracy metric.

See :mod:`unite_hf.training.trainer_utils`.
"""

from .trainer_utils import (
    ACCURACY_METRIC_PATH, IGNORE_INDEX, TRAINABLE_MODES, argmax_logits, attention_projection_names, compute_accuracy,
    compute_token_accuracy, core_parameters, count_trainable_parameters, head_parameters, load_accuracy_metric,
    set_trainable,
)

__all__ = [
    "ACCURACY_METRIC_PATH", "IGNORE_INDEX", "TRAINABLE_MODES", "argmax_logits", "attention_projection_names",
    "compute_accuracy", "compute_token_accuracy", "core_parameters", "count_trainable_parameters",
    "head_parameters", "load_accuracy_metric", "set_trainable",
]
