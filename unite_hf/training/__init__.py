"""Fine-tuning UNITE targets: Trainer helpers, trainable-parameter modes and an offline accuracy metric.

See :mod:`unite_hf.training.trainer_utils`, :mod:`unite_hf.training.tasks` (task readers) and
:mod:`unite_hf.training.hub` (``UniteTrainer``: Trainer pushes that publish the UNITE model card).
"""

from .trainer_utils import (
    ACCURACY_METRIC_PATH, IGNORE_INDEX, TRAINABLE_MODES, argmax_logits, attention_projection_names, compute_accuracy,
    compute_token_accuracy, core_parameters, count_trainable_parameters, head_parameters, load_accuracy_metric,
    set_trainable,
)

from .hub import UniteCardMixin, UniteTrainer

from .lora import UNITE_FFN_PROJECTIONS, UniteLoraLinear, load_unite_lora_config, register_unite_lora, unite_lora_config

from .tasks import (
    TASKS, TaskData, TaskDataCollator, TaskLoadError, TaskSpec, get_task_spec, load_task, normalize_dataset,
    register_task, tokenize_task,
)

__all__ = [
    "UniteCardMixin", "UniteTrainer",
    "UNITE_FFN_PROJECTIONS", "UniteLoraLinear", "load_unite_lora_config", "register_unite_lora", "unite_lora_config",
    "TASKS", "TaskData", "TaskDataCollator", "TaskLoadError", "TaskSpec", "get_task_spec", "load_task",
    "normalize_dataset", "register_task", "tokenize_task",
    "ACCURACY_METRIC_PATH", "IGNORE_INDEX", "TRAINABLE_MODES", "argmax_logits", "attention_projection_names",
    "compute_accuracy", "compute_token_accuracy", "core_parameters", "count_trainable_parameters",
    "head_parameters", "load_accuracy_metric", "set_trainable",
]
