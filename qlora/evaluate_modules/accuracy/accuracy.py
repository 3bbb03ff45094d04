"""Accuracy as an `evaluate` module that loads from this folder, with no hub access.

`evaluate.load("accuracy")` fetches the module from the hub; the same interface
loaded from a local path works offline: `evaluate.load("qlora/evaluate_modules/accuracy")`.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "The share of predictions equal to their reference: (TP + TN) / (TP + TN + FP + FN)."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): ground-truth labels.
Returns:
    accuracy (float): in [0, 1].
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}),
        )

    def _compute(self, predictions, references):
        return {"accuracy": float(np.mean(np.asarray(predictions) == np.asarray(references)))}
