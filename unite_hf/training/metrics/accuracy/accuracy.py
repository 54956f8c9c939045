"""Accuracy, as an ``evaluate`` metric module shipped with unite_hf.

``evaluate.load("accuracy")`` downloads its script from the Hub; this module does the same job
offline. Load it by path (the folder or this file)::

    import evaluate
    from unite_hf.training import ACCURACY_METRIC_PATH
    accuracy = evaluate.load(ACCURACY_METRIC_PATH)
    accuracy.compute(predictions=[0, 1, 1], references=[0, 1, 0])   # {'accuracy': 0.666...}

It has the Hub metric's interface (``normalize``, ``sample_weight``) and results, without its
scikit-learn dependency. The file must stay self-contained: ``evaluate`` copies it into its cache
and imports it from there, so it cannot import unite_hf.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Accuracy is the proportion of correct predictions among all predictions:
Accuracy = (TP + TN) / (TP + TN + FP + FN). With ``sample_weight`` it is the weighted proportion.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted labels.
    references (`list` of `int`): ground-truth labels.
    normalize (`bool`): if False, return the number (or total weight) of correct predictions instead of
        the fraction. Defaults to True.
    sample_weight (`list` of `float`): weight of each prediction. Defaults to None (all 1).
Returns:
    accuracy (`float` or `int`): in [0, 1] when normalize is True, else the count (a float when weighted).
Examples:
    >>> accuracy = evaluate.load("path/to/unite_hf/training/metrics/accuracy")
    >>> accuracy.compute(references=[0, 1, 2, 0, 1, 2], predictions=[0, 1, 1, 2, 1, 0])
    {'accuracy': 0.5}
"""

_CITATION = """
@article{scikit-learn,
  title={Scikit-learn: Machine Learning in {P}ython},
  author={Pedregosa, F. and others},
  journal={Journal of Machine Learning Research},
  volume={12},
  pages={2825--2830},
  year={2011}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    """Fraction (or count) of predictions equal to their reference."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("int32")),
                    "references": datasets.Sequence(datasets.Value("int32")),
                }
                if self.config_name == "multilabel"
                else {
                    "predictions": datasets.Value("int32"),
                    "references": datasets.Value("int32"),
                }
            ),
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.accuracy_score.html"],
        )

    def _compute(self, predictions, references, normalize: bool = True, sample_weight=None) -> dict:
        predictions = np.asarray(predictions)
        references = np.asarray(references)
        if predictions.shape != references.shape:
            raise ValueError(f"predictions {predictions.shape} and references {references.shape} differ in shape")
        if len(references) == 0:
            raise ValueError("accuracy of no predictions is undefined: got empty predictions and references")
        # multilabel: a sample is correct only when all its labels are
        correct = (predictions == references).reshape(len(references), -1).all(axis=1).astype(np.float64)
        weights = np.ones_like(correct) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        total = float((correct * weights).sum())
        if normalize:
            return {"accuracy": total / float(weights.sum())}
        return {"accuracy": int(total) if sample_weight is None else total}
