"""What a task is (`evaluate.task`): how an answer is read and what counts as answered, its scores per
example and over a split, their bootstrap samples, the metric that decides between runs and which way is
better. Every stage, report and search asks a Task; nothing else branches on a task's name.

A kind of task is a subclass registered in TASKS. Its instances carry what scoring needs from the data
(the allowed labels), so a stage builds one with `task_for` and passes it on.
"""

import math
import re
import unicodedata
from pathlib import Path

MODULES = Path(__file__).parent / "evaluate_modules"  # evaluate metrics that load offline
LOWER_IS_BETTER = {"loss", "perplexity"}  # the completion loss, whatever the task


class Task:
    name = ""
    primary = ""  # the metric the export check holds to, and scores.json and the reports lead with
    metrics = ()  # over a split, in the order shown; `answered` among them
    per_example = {}  # {metric: the key of its per-example score in a row}, for metrics that are their mean
    lower_is_better = frozenset()  # of `metrics`; loss and perplexity always are
    titles = {}  # {metric: its column title in the reports}
    described = {}  # {metric: what it is, in the docs' tables}
    mark = ""  # what a ✓ marks in predictions.md
    order = "in the order of the test split"  # of predictions.md's rows (shown_first)

    reference = None  # a trivial predictor scored on the same examples, as the docs name it, or None
    reference_keys = {}  # {metric: the key of the trivial predictor's value of it}
    versus_reference = None  # the metric that pairs the model with the trivial predictor (below 0: the model wins)
    relative = False  # export.metric_tolerance is a share of the adapter's value (else in the metric's units)
    extra = ()  # further figures over a split that score() returns, without intervals or gains
    deciding = {}  # {scores.json key: evaluate.json key}: what `dvc exp show` lists beside the primary metric

    def __init__(self, labels=(), train_answers=()):
        self.labels = list(labels)
        self.reason = "set in params.yaml (evaluate.task)"

    @classmethod
    def fits(cls, labels, train_answers):
        """Why `evaluate.task: auto` picks this task for data.labels and the train split's answers, or None."""
        return None

    def score(self, answers, references):
        """(metrics over the split, one dict of scores per answer, with `answered` 0 or 1)."""
        raise NotImplementedError

    def samples(self, rows, references, idx):
        """Each metric recomputed on each resample `idx` (resamples x examples) from score's rows: {metric: array}.
        The metrics that are means of a per-example score are resampled means."""
        return {name: _mean_of([self.value(r, key) for r in rows], idx) for name, key in self.per_example.items()}

    def value(self, row, key):
        """A per-example score of a row; rows written before a score was recorded get it from what they hold."""
        return row[key]

    def better(self, metric):
        """+1 when a higher value of `metric` (a name in metrics, or a loss) is better, -1 when a lower one is."""
        return -1 if metric in LOWER_IS_BETTER or metric in self.lower_is_better else 1

    def shown(self, row, prefix=""):
        """A model's answer as predictions.md shows it, with its mark (`prefix`: base_ for the base model's)."""
        return row[f"{prefix}answer"]

    def confusion(self, rows):
        """Expected against given, for the confusion plot: [] where the task has none."""
        return []

    def scatter(self, rows, prefix=""):
        """Truth against prediction per example, for the scatter plot (`prefix`: base_ for the base model's
        answers in predictions.json's rows): [] where the answers are not numbers."""
        return []

    def shown_first(self, rows):
        """predictions.md's rows in the order it shows them: the test split's, unless the task says otherwise."""
        return rows

    def record(self):
        """What the records say of the task, and why it is this one."""
        return dict(task=self.name, task_reason=self.reason)

    @classmethod
    def owns(cls, rows):
        """Whether per-example rows (predictions.json) were scored by this task: they hold its primary score."""
        return bool(rows) and cls.per_example[cls.primary] in rows[0]


def _mean_of(values, idx):
    import numpy as np

    return np.asarray(values, dtype=float)[idx].mean(axis=1)


def _casefold_strip(text):
    """Case folded, with surrounding whitespace and punctuation removed."""
    return re.sub(r"^[\W_]+|[\W_]+$", "", str(text).casefold())


def _names(label, text):
    """Whether `text` names `label` as a word of its own (not `perl` in `libperl5` or `perl-doc`)."""
    return re.search(rf"(?<![\w-]){re.escape(label)}(?![\w-])", text) is not None


def extract_label(answer, labels):
    """The one allowed label an answer gives, or None.

    Strict on purpose: an answer counts only if, ignoring case and surrounding whitespace and
    punctuation, it *is* an allowed label, or begins with exactly one and names no other. So
    "Perl." and "perl, since it is a Perl module" give perl; an echoed list of the labels, "perl or
    python", "libperl5" and "The section is perl" give none (a model asked for a label must answer with it).
    """
    text = " ".join(str(answer).casefold().split())
    stripped = _casefold_strip(text)
    folded = {label.casefold(): label for label in labels}
    if text in folded or stripped in folded:
        return folded.get(text) or folded[stripped]
    starts = [f for f in folded if stripped.startswith(f) and not re.match(r"[\w-]", stripped[len(f):len(f) + 1])]
    if not starts:
        return None
    first = max(starts, key=len)  # "python 3" over "python" when both are labels
    rest = stripped[len(first):]
    if any(_names(other, rest) for other in folded if other != first):
        return None
    return folded[first]


def normalize_text(text):
    """Case folded, punctuation removed, whitespace collapsed: what exact match compares."""
    return " ".join("".join(" " if unicodedata.category(c).startswith("P") else c
                            for c in str(text).casefold()).split())


class Classification(Task):
    """Answers that must be one of data.labels: accuracy, macro F1 over the expected classes (so a model
    answering only the majority class scores low) and `answered`, the share of answers that give exactly
    one label (extract_label)."""
    name, primary = "classification", "accuracy"
    metrics = ("accuracy", "macro_f1", "answered")
    per_example = {"accuracy": "correct", "answered": "answered"}
    extra = ("distinct",)  # how many different labels it gave: 1, a model that says the same to everything
    titles = {"accuracy": "test acc", "macro_f1": "macro F1", "answered": "answered"}
    described = {"accuracy": "test accuracy", "macro_f1": "test macro F1", "answered": "answered (a usable answer)"}
    mark = "a correct label"

    @classmethod
    def fits(cls, labels, train_answers):
        return "data.labels lists the answers" if labels else None

    def score(self, answers, references):
        """Through `evaluate` modules that load from this project, offline."""
        import evaluate

        classes = sorted(set(references))
        allowed = sorted(set(self.labels) | set(classes))
        given = [extract_label(a, allowed) for a in answers]
        index = {label: i for i, label in enumerate(classes)}
        other = len(classes)  # no label, or one that is not expected anywhere in test
        pred, ref = [index.get(g, other) for g in given], [index[r] for r in references]
        accuracy = evaluate.load(str(MODULES / "accuracy")).compute(predictions=pred, references=ref)["accuracy"]
        f1 = evaluate.load(str(MODULES / "f1")).compute(predictions=pred, references=ref,
                                                          labels=list(range(len(classes))), average="macro")["f1"]
        rows = [dict(label=g, correct=int(g == r), answered=int(g is not None)) for g, r in zip(given, references)]
        metrics = dict(accuracy=accuracy, macro_f1=f1, answered=sum(r["answered"] for r in rows) / len(rows))
        return {**{k: round(v, 4) for k, v in metrics.items()}, "distinct": len(set(given) - {None})}, rows

    def samples(self, rows, references, idx):
        """Macro F1 from each resample's own counts, as the f1 module computes it."""
        import numpy as np

        classes = sorted(set(references))
        index = {label: i for i, label in enumerate(classes)}
        pred = np.array([index.get(r["label"], len(classes)) for r in rows])[idx]
        ref = np.array([index[r] for r in references])[idx]
        f1 = []
        for c in range(len(classes)):
            tp = ((pred == c) & (ref == c)).sum(axis=1)
            wrong = ((pred == c) != (ref == c)).sum(axis=1)  # false positives and false negatives
            f1.append(np.divide(2 * tp, 2 * tp + wrong, out=np.zeros(len(idx)), where=2 * tp + wrong > 0))
        return {**super().samples(rows, references, idx), "macro_f1": np.mean(f1, axis=0)}

    def value(self, row, key):
        return int(row["label"] is not None) if key == "answered" and key not in row else row[key]

    def shown(self, row, prefix=""):
        return ("✓ " if row[f"{prefix}correct"] else "") + row[f"{prefix}answer"]

    def confusion(self, rows, no_label="(no label)"):
        return [dict(expected=r["expected"], label=r["label"] or no_label) for r in rows]


class Generation(Task):
    """Free text: exact match after normalize_text, chrF (sacrebleu's sentence chrF, character n-grams,
    scaled to 0-1) and ROUGE-L F1 (rouge-score, longest common word subsequence); `answered` is the share
    of non-empty answers. An empty answer scores 0 on all three; an echoed prompt or a chatty answer that
    contains the reference scores partial chrF and ROUGE-L, no exact match."""
    name, primary = "generation", "chrf"
    metrics = ("exact_match", "chrf", "rouge_l", "answered")
    per_example = {"exact_match": "exact_match", "chrf": "chrf", "rouge_l": "rouge_l", "answered": "answered"}
    extra = ("distinct",)  # how many different answers (normalize_text) it gave, empty ones aside
    titles = {"exact_match": "exact match", "chrf": "chrF", "rouge_l": "ROUGE-L", "answered": "answered"}
    described = {"exact_match": "test exact match", "chrf": "test chrF", "rouge_l": "test ROUGE-L",
                 "answered": "answered (a usable answer)"}
    mark = "an exact match (chrF in brackets)"

    @classmethod
    def fits(cls, labels, train_answers):
        return "data.labels is empty and the answers are text"

    def score(self, answers, references):
        from rouge_score import rouge_scorer
        from sacrebleu.metrics import CHRF

        chrf, rouge = CHRF(), rouge_scorer.RougeScorer(["rougeL"])
        rows = [dict(exact_match=int(normalize_text(a) == normalize_text(r)),
                     chrf=round(chrf.sentence_score(a, [r]).score / 100, 4),
                     rouge_l=round(rouge.score(r, a)["rougeL"].fmeasure, 4),
                     answered=int(bool(a.strip())))
                for a, r in zip(answers, references)]
        distinct = len({normalize_text(a) for a in answers} - {""})
        return {**{k: round(sum(row[k] for row in rows) / len(rows), 4) for k in self.metrics}, "distinct": distinct}, rows

    def value(self, row, key):
        return int(bool(row["answer"].strip())) if key == "answered" and key not in row else row[key]

    def shown(self, row, prefix=""):
        return ("✓ " if row[f"{prefix}exact_match"] else "") + f"{row[f'{prefix}answer']} (chrF {row[f'{prefix}chrf']:.2f})"


NUMBER = re.compile(r"(?<![\w.])[-−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?(?![\w])"
                    r"|(?<![\w.])[-−]?\.\d+(?![\w])")


def parse_number(answer):
    """The number an answer gives, or None.

    Strict on purpose, as labels are: an answer counts when it holds exactly one number, whatever words,
    currency signs or units surround it. "$1,299.99", "1299 dollars", "Price is $1,299", "-3.5" and
    "1.2e3" give their number (commas only as thousands separators, in groups of three); "N/A", an empty
    answer and one with two or more numbers ("between 100 and 200", "1,299 or 1,399", "1,29") give None.
    """
    found = NUMBER.findall(str(answer))
    if len(found) != 1:
        return None
    value = float(found[0].replace(",", "").replace("−", "-"))
    return value if math.isfinite(value) else None


def is_number(text):
    """Whether a text is a number and nothing else but a currency sign or a percent sign around it: what a
    train answer must be for `auto` to pick regression (an answer in words is text, even with a number)."""
    return parse_number(text) is not None and re.fullmatch(r"\s*[$€£¥]?\s*[^\s$€£¥%]+\s*%?\s*", str(text)) is not None


class Regression(Task):
    """Numbers as answers (a price, a count, a score), judged by their error.

    An answer is read by parse_number. An unanswered example (no number, or several) is scored as if it
    had answered the train split's median: its error enters every error metric, so a model that answers
    nothing scores exactly what always answering the median scores, never better; `answered` says how
    often it gave a number. The metrics: MAE (primary, lower is better), median absolute error, RMSE,
    RMSLE (when every reference and prediction is >= 0), the share within a fifth of the reference, R² and
    Spearman's rank correlation. The trivial reference, always answering the train median, is scored on
    the same examples (`median_*`) and paired with the model (`mae_vs_median`: the model's MAE minus the
    median's, below 0 when the model beats it), so that a model that learned only the typical value is
    exposed; `distinct` counts the different numbers it answered and `spread` is the standard deviation
    of its predictions over the references' (near 0: a collapsed model)."""
    name, primary, relative = "regression", "mae", True
    reference = "always the train median"
    reference_keys = {"mae": "median_mae", "rmsle": "median_rmsle", "within_20": "median_within_20", "r2": "median_r2"}
    versus_reference = "mae_vs_median"
    metrics = ("mae", "median_ae", "rmse", "rmsle", "within_20", "r2", "spearman", "answered", "mae_vs_median")
    lower_is_better = frozenset({"mae", "median_ae", "rmse", "rmsle", "mae_vs_median"})
    per_example = {"mae": "abs_error", "within_20": "within_20", "answered": "answered"}
    extra = ("median_mae", "median_rmsle", "median_within_20", "median_r2", "distinct", "spread")
    deciding = {"rmsle": "test_rmsle", "within_20": "test_within_20", "vs_median": "test_mae_vs_median"}
    titles = {"mae": "MAE", "median_ae": "median AE", "rmse": "RMSE", "rmsle": "RMSLE", "within_20": "within 20%",
              "r2": "R²", "spearman": "Spearman", "answered": "answered", "mae_vs_median": "MAE vs median"}
    described = {"mae": "test mean absolute error", "median_ae": "test median absolute error", "rmse": "test RMSE",
                 "rmsle": "test RMSLE", "within_20": "test share within 20%", "r2": "test R²",
                 "spearman": "test Spearman correlation", "answered": "answered (a number)",
                 "mae_vs_median": "MAE minus always answering the train median's"}
    mark = "an answer within 20% of the reference (its error in brackets)"
    order = "the fine-tuned model's largest errors first"

    def __init__(self, labels=(), train_answers=()):
        super().__init__(labels, train_answers)
        import numpy as np

        values = [v for v in map(parse_number, train_answers) if v is not None]
        self.median = float(np.median(values)) if values else None

    @classmethod
    def fits(cls, labels, train_answers):
        if labels or not len(train_answers) or not all(map(is_number, train_answers)):
            return None
        return f"data.labels is empty and every one of the {len(train_answers)} train answers is a number"

    def score(self, answers, references):
        import numpy as np

        if self.median is None:
            raise SystemExit("regression: the train split has no answer that is a number, so there is no median "
                             "to score unanswered examples by; evaluate.task: generation scores text")
        truth = [parse_number(r) for r in references]
        bad = next((r for r, t in zip(references, truth) if t is None), None)
        if bad is not None:
            raise SystemExit(f"regression: the reference answer {bad!r} is not one number; every answer of the data "
                             "must be (evaluate.task: generation scores text)")
        given = [parse_number(a) for a in answers]
        rows = []
        for g, t in zip(given, truth):
            p = self.median if g is None else g
            rows.append(dict(value=g, prediction=p, abs_error=abs(p - t), within_20=int(abs(p - t) <= 0.2 * abs(t)),
                             median_error=abs(self.median - t), answered=int(g is not None)))
        metrics = self.error_metrics(truth, [r["prediction"] for r in rows])
        median = self.error_metrics(truth, [self.median] * len(truth))
        metrics.update(answered=sum(r["answered"] for r in rows) / len(rows),
                       mae_vs_median=metrics["mae"] - median["mae"],
                       **{f"median_{k}": median[k] for k in ("mae", "rmsle", "within_20", "r2")},
                       distinct=len({r["value"] for r in rows if r["value"] is not None}),
                       spread=float(np.std([r["prediction"] for r in rows]) / np.std(truth)) if np.std(truth) else None)
        return {k: v if v is None or k == "distinct" else round(float(v), 4) for k, v in metrics.items()}, rows

    @staticmethod
    def error_metrics(truth, predictions):
        """The error metrics of predictions against the truth, by scikit-learn and SciPy; None where one is
        undefined (RMSLE with a value below 0, R² or Spearman on constant references or predictions)."""
        import numpy as np
        from scipy.stats import spearmanr
        from sklearn import metrics as sk

        y, p = np.asarray(truth, dtype=float), np.asarray(predictions, dtype=float)
        constant = np.ptp(y) == 0 or np.ptp(p) == 0
        return dict(mae=sk.mean_absolute_error(y, p), median_ae=sk.median_absolute_error(y, p),
                    rmse=sk.root_mean_squared_error(y, p),
                    rmsle=sk.root_mean_squared_log_error(y, p) if (y >= 0).all() and (p >= 0).all() else None,
                    within_20=float((np.abs(p - y) <= 0.2 * np.abs(y)).mean()),
                    r2=sk.r2_score(y, p) if np.ptp(y) > 0 else None,
                    spearman=None if constant else spearmanr(y, p).statistic)

    def samples(self, rows, references, idx):
        """Every metric on each resample: the errors' means, median and roots from the resampled examples;
        R² and Spearman from each resample's own predictions and references; RMSLE only where every value
        is >= 0 (undefined otherwise, and left out)."""
        import numpy as np
        from scipy.stats import rankdata

        y = np.array([parse_number(r) for r in references])[idx]
        pred = np.array([r["prediction"] for r in rows], dtype=float)[idx]
        error = pred - y
        out = {"mae": np.abs(error).mean(axis=1), "median_ae": np.median(np.abs(error), axis=1),
               "rmse": np.sqrt((error ** 2).mean(axis=1)),
               "within_20": (np.abs(error) <= 0.2 * np.abs(y)).mean(axis=1),
               "answered": np.array([r["answered"] for r in rows], dtype=float)[idx].mean(axis=1),
               "mae_vs_median": (np.abs(error) - np.array([r["median_error"] for r in rows])[idx]).mean(axis=1)}
        if (y >= 0).all() and (pred >= 0).all():
            out["rmsle"] = np.sqrt(((np.log1p(pred) - np.log1p(y)) ** 2).mean(axis=1))
        with np.errstate(divide="ignore", invalid="ignore"):
            total = ((y - y.mean(axis=1, keepdims=True)) ** 2).sum(axis=1)
            out["r2"] = np.where(total > 0, 1 - (error ** 2).sum(axis=1) / total, np.nan)
            ry, rp = rankdata(y, axis=1), rankdata(pred, axis=1)
            ry, rp = ry - ry.mean(axis=1, keepdims=True), rp - rp.mean(axis=1, keepdims=True)
            out["spearman"] = (ry * rp).sum(axis=1) / np.sqrt((ry ** 2).sum(axis=1) * (rp ** 2).sum(axis=1))
        return out

    def scatter(self, rows, prefix=""):
        return [dict(reference=parse_number(r["expected"]), prediction=r[f"{prefix}prediction"]) for r in rows]

    def shown_first(self, rows):
        """Worst first: the largest errors of the fine-tuned model."""
        return sorted(rows, key=lambda r: -r["abs_error"])

    def shown(self, row, prefix=""):
        answer, error = row[f"{prefix}answer"], row[f"{prefix}abs_error"]
        if not row[f"{prefix}answered"]:
            return f"{answer} (no number: scored as the train median, off by {error:g})"
        return ("✓ " if row[f"{prefix}within_20"] else "") + f"{answer} (off by {error:g})"


TASKS = {task.name: task for task in (Classification, Generation, Regression)}
AUTO_ORDER = (Classification, Regression, Generation)  # what `auto` tries, first fit wins


def task_for(setting, labels=(), train_answers=()):
    """evaluate.task as a Task built for the data (data.labels, the train split's answers): `auto`
    resolved to the first kind that fits it (AUTO_ORDER), with the reason."""
    if setting != "auto":
        return TASKS[setting](labels, train_answers)
    kind = next(kind for kind in AUTO_ORDER if kind.fits(labels, train_answers))
    task = kind(labels, train_answers)
    task.reason = f"auto: {kind.fits(labels, train_answers)}"
    return task


NAMED = object()


def task_of(rows, default=NAMED):
    """The kind of task whose scores per-example rows (a run's predictions.json) hold; `default` where none
    does, if given (else the rows are named as an error)."""
    kind = next((kind for kind in TASKS.values() if kind.owns(rows)), None)
    if kind is None and default is not NAMED:
        return default
    if kind is None:
        raise SystemExit("the per-example rows hold no task's scores" + (f": {', '.join(rows[0])}" if rows else ""))
    return kind()
