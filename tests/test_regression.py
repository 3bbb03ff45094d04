"""Numbers as answers (evaluate.task: regression): the number an answer gives, error metrics that agree
with scikit-learn and SciPy and their bootstrap, checked against the answers that fool them: no number,
several numbers, the prompt echoed, a model that answers nothing or always the same value."""

import numpy as np
import pytest

from qlora.scoring import interval, metric_samples, resampled
from qlora.tasks import Regression, parse_number, task_for


@pytest.mark.parametrize("answer,value", [
    ("999", 999.0),
    ("$1,299.99", 1299.99),                        # currency sign, thousands separator, decimals
    ("1299 dollars", 1299.0),                      # words around one number
    ("Price is $1,299", 1299.0),
    ("€ 5", 5.0),
    ("-3.5", -3.5), ("−2", -2.0),                  # sign, the minus sign too
    ("1.2e3", 1200.0), (".5", 0.5),
    ("N/A", None), ("", None), ("about a thousand", None),   # no number
    ("between 100 and 200", None),                 # several numbers: no one answer
    ("1,299 or 1,399", None),
    ("1,29", None),                                # a comma that is not a thousands separator
    ("Item 3 of 12: $45", None),                   # an echoed prompt with its numbers
    ("model v2.0", None),                          # a number inside a word is not an answer
])
def test_an_answer_counts_when_it_holds_exactly_one_number(answer, value):
    assert parse_number(answer) == value


TRAIN = ["100", "200", "300", "400", "1000"]  # median 300
REFERENCES = ["120", "250", "310", "800", "90", "450", "600", "35"]


def test_the_metrics_are_scikit_learns_and_scipys():
    from scipy.stats import spearmanr
    from sklearn import metrics as sk

    task = Regression(train_answers=TRAIN)
    answers = ["$110", "240 dollars", "330", "700", "100", "500", "550", "40"]
    metrics, rows = task.score(answers, REFERENCES)
    y, p = np.array(REFERENCES, dtype=float), np.array([parse_number(a) for a in answers])
    assert metrics["mae"] == round(sk.mean_absolute_error(y, p), 4)
    assert metrics["median_ae"] == round(sk.median_absolute_error(y, p), 4)
    assert metrics["rmse"] == round(sk.root_mean_squared_error(y, p), 4)
    assert metrics["rmsle"] == round(sk.root_mean_squared_log_error(y, p), 4)
    assert metrics["r2"] == round(sk.r2_score(y, p), 4)
    assert metrics["spearman"] == round(spearmanr(y, p).statistic, 4)
    assert metrics["within_20"] == round(np.mean(np.abs(p - y) <= 0.2 * y), 4) and metrics["answered"] == 1.0
    # The bootstrap recomputes each one: on the identity resample, the metric itself.
    same = metric_samples(task, rows, REFERENCES, [1.0] * 8, [1] * 8, np.arange(8)[None, :])
    for name in task.metrics:
        assert same[name][0] == pytest.approx(metrics[name], abs=1e-4), name
    low, high = interval(metric_samples(task, rows, REFERENCES, [1.0] * 8, [1] * 8, resampled(8))["mae"])
    assert low < metrics["mae"] < high


def test_a_model_that_answers_nothing_scores_what_the_median_scores_never_better():
    task = Regression(train_answers=TRAIN)
    silent, _ = task.score(["I cannot tell"] * 8, REFERENCES)
    assert silent["answered"] == 0 and silent["mae"] == silent["median_mae"] and silent["mae_vs_median"] == 0
    assert silent["within_20"] == silent["median_within_20"] and silent["r2"] == silent["median_r2"]
    # Half its answers dropped: every dropped one scores the median's error, whatever it would have said.
    good = [str(float(r) * 1.05) for r in REFERENCES]
    half, _ = task.score(good[:4] + [""] * 4, REFERENCES)
    full, _ = task.score(good, REFERENCES)
    assert half["answered"] == 0.5 and full["mae"] < half["mae"] < silent["mae"]


def test_a_collapsed_model_is_exposed_by_its_spread_and_the_median():
    task = Regression(train_answers=TRAIN)
    collapsed, _ = task.score(["300"] * 8, REFERENCES)
    assert collapsed["distinct"] == 1 and collapsed["spread"] == 0 and collapsed["spearman"] is None
    assert collapsed["mae_vs_median"] == 0, "no better than always answering the train median"
    varied, _ = task.score(["$110", "240", "330", "700", "100", "500", "550", "40"], REFERENCES)
    assert varied["distinct"] == 8 and 0.5 < varied["spread"] < 1.5 and varied["mae_vs_median"] < 0


def test_every_kind_counts_distinct_answers_and_regression_shows_its_worst_first():
    from qlora.tasks import Classification, Generation

    assert Classification(["a", "b"]).score(["a", "A.", "a", "none"], ["a", "b", "a", "b"])[0]["distinct"] == 1
    assert Generation().score(["The cat.", "the cat", "", "a dog"], ["x"] * 4)[0]["distinct"] == 2
    task = Regression(train_answers=TRAIN)
    _, rows = task.score(["100", "700", "305"], ["120", "250", "310"])
    assert [r["abs_error"] for r in task.shown_first(rows)] == [450, 20, 5]


def test_rmsle_is_left_out_where_a_value_is_negative():
    task = Regression(train_answers=["-5", "5"])
    metrics, rows = task.score(["-3", "4"], ["-5", "5"])
    assert metrics["rmsle"] is None and metrics["mae"] == 1.5
    assert "rmsle" not in metric_samples(task, rows, ["-5", "5"], [1.0] * 2, [1] * 2, resampled(2))


def test_auto_picks_regression_when_every_train_answer_is_a_number_and_says_so():
    task = task_for("auto", [], TRAIN)
    assert task.name == "regression" and task.median == 300
    assert task.reason == "auto: data.labels is empty and every one of the 5 train answers is a number"
    assert task_for("auto", [], TRAIN + ["about 50"]).name == "generation", "one answer in words: text"
    assert task_for("auto", ["1", "2"], ["1", "2"]).name == "classification", "labels listed: classes"
    assert task_for("regression", [], TRAIN).reason == "set in params.yaml (evaluate.task)"


def test_a_reference_that_is_not_a_number_is_named():
    with pytest.raises(SystemExit, match="the reference answer 'a few' is not one number"):
        Regression(train_answers=TRAIN).score(["3"], ["a few"])


@pytest.fixture(scope="module")
def counting_project(tmp_path_factory, reproduced_project):
    """A numeric task the project was not built around: how many words a Debian package's description
    has, from the bundled data, switched to by the data keys alone in a project that has run."""
    import gzip

    import pandas as pd

    from conftest import ROOT, TINY_OVERRIDES, repro, reproduced_copy, set_params

    project = reproduced_copy(tmp_path_factory.mktemp("counting") / "project", reproduced_project, TINY_OVERRIDES)
    with gzip.open(ROOT / "data/raw/debian-bookworm-packages.csv.gz") as f:
        rows = pd.read_csv(f, nrows=60)
    rows["words"] = rows["description"].str.split().str.len()
    rows[["package", "description", "words"]].to_csv(project / "data/raw/words.csv", index=False)
    set_params(project / "params.yaml", {
        "paths.raw": "data/raw/words.csv", "data.completion_field": "words", "data.labels": [],
        "data.prompt_template": "How many words are in this description?\n{description}"})
    assert not repro(project) & {"base", "quantize"}, "the same model: quantized once, for both projects"
    return project


def test_numbers_as_answers_run_to_the_end_scored_by_their_error(counting_project):
    import json

    p = counting_project

    def read(name):
        return json.loads((p / f"metrics/{name}.json").read_text())

    base, m, scores = read("evaluate_base"), read("evaluate"), read("scores")
    assert base["task"] == "regression" and base["task_reason"].startswith("auto: data.labels is empty and every one")
    for name in ("mae", "rmse", "within_20", "answered"):
        assert m[f"test_{name}_ci_low"] <= m[f"test_{name}"] <= m[f"test_{name}_ci_high"], name
        assert m[f"base_test_{name}"] == base[f"test_{name}"], name
    predictions = read("predictions")
    assert m["test_mae"] == pytest.approx(np.mean([r["abs_error"] for r in predictions]), abs=1e-4)
    assert m["test_median_mae"] == base["test_median_mae"], "the same trivial reference for both models"
    assert m["mae_gain"] == round(m["test_mae"] - m["base_test_mae"], 4)
    assert {"mae", "ci_low", "ci_high", "rmsle", "within_20", "vs_median", "gain", "significant"} <= set(scores)
    assert scores["mae"] == m["test_mae"] and scores["vs_median"] == m["test_mae_vs_median"]
    assert "test_accuracy" not in m and "test_chrf" not in m
    assert "within 20% of the reference" in (p / "metrics/predictions.md").read_text()
    export = read("export")
    assert export["adapter_test_mae"] == m["test_mae"], "the export check holds the merged model to MAE"
    assert abs(export["test_mae"] - m["test_mae"]) <= 0.03 * m["test_mae"] or \
        export["mae_diff_ci_low"] <= 0 <= export["mae_diff_ci_high"]


def test_compare_gives_two_numeric_runs_an_error_verdict_and_a_truth_vs_prediction_plot(counting_project):
    import json
    import re
    import sys

    from conftest import run

    p = counting_project
    for name, r in (("r4", 4), ("r16", 16)):
        run(["dvc", "exp", "run", "-n", name, "-S", f"lora.r={r}", "-S", "train.learning_rate=0.01"], p)
    run([sys.executable, "-m", "tools.report", "compare", "--ref", "r4"], p)
    report = (p / "reports/compare.md").read_text()
    against = report.split("\n## Against ")[1]
    mae = re.search(r"^\| r16 \| mae \| ([\d.]+) \| ([\d.]+) \| ([-+][\d.]+) \| \[([-\d.]+), ([-\d.]+)\] \| (.+) \|$",
                    against, re.M)
    assert mae, against
    value, ref, diff, low, high, verdict = mae.groups()
    expected = "within noise" if float(low) <= 0 <= float(high) else "better" if float(diff) < 0 else "worse"
    assert verdict == expected, "a lower error is better"
    assert "| experiment | val loss | MAE | MAE vs base | answered | lora.r |" in report, "what decides first"
    assert (p / "reports/compare-truth.png").stat().st_size > 10_000
    plots = json.loads(run(["dvc", "plots", "show", "--json"], p).stdout)
    assert "Truth vs prediction (test)" in plots.get("data", plots)
