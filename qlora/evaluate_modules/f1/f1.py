"""F1 as an `evaluate` module that loads from this folder, with no hub access.

`evaluate.load("f1")` fetches its module from the hub; this one loads offline with
`evaluate.load("qlora/evaluate_modules/f1")` and takes the same arguments:
`average="macro"` is the unweighted mean of the per-class F1 over `labels` (by
default every class seen in predictions or references), so rare classes count as
much as common ones. A class never predicted and never expected is left out; one
with no true positives scores 0 (scikit-learn's `zero_division=0`).
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "F1 = 2 * precision * recall / (precision + recall), per class, then averaged."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): ground-truth labels.
    labels (list of int, optional): the classes to average over; default: all seen.
    average (str): "macro" (mean of per-class F1), "micro" (F1 of pooled counts) or None (a list per class).
Returns:
    f1 (float or list of float).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}),
        )

    def _compute(self, predictions, references, labels=None, average="macro"):
        predictions, references = np.asarray(predictions), np.asarray(references)
        labels = np.unique(np.concatenate([predictions, references])) if labels is None else np.asarray(labels)
        tp = np.array([np.sum((predictions == c) & (references == c)) for c in labels], dtype=float)
        fp = np.array([np.sum((predictions == c) & (references != c)) for c in labels], dtype=float)
        fn = np.array([np.sum((predictions != c) & (references == c)) for c in labels], dtype=float)
        if average == "micro":
            tp, fp, fn = tp.sum(keepdims=True), fp.sum(keepdims=True), fn.sum(keepdims=True)
        denominator = 2 * tp + fp + fn
        f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
        if average is None:
            return {"f1": f1.tolist()}
        return {"f1": float(f1.mean())}
