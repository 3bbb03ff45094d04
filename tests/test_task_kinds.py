"""A kind of task is one object (qlora/tasks.py). A toy kind defined here, whose metric is better lower,
flows through scoring, the bootstrap, compare's verdict and the tune objective with nothing else taught
about it."""

import shutil

import numpy as np
import pytest

from conftest import ROOT
from qlora.scoring import metric_samples, resampled
from qlora.tasks import TASKS, Task, task_for, task_of


class Length(Task):
    """Answers judged by how many characters they miss the reference's length by: lower is better."""
    name, primary = "length", "miss"
    metrics = ("miss", "answered")
    per_example = {"miss": "miss", "answered": "answered"}
    lower_is_better = frozenset({"miss"})
    titles = {"miss": "length miss", "answered": "answered"}

    def score(self, answers, references):
        rows = [dict(miss=abs(len(a) - len(r)), answered=int(bool(a))) for a, r in zip(answers, references)]
        return {k: round(sum(r[k] for r in rows) / len(rows), 4) for k in self.metrics}, rows


@pytest.fixture
def length(monkeypatch):
    monkeypatch.setitem(TASKS, Length.name, Length)
    return task_for("length")


def predictions(task, answers, references):
    """A run's predictions.json rows, as the evaluate stage writes them."""
    _, scored = task.score(answers, references)
    return [dict(expected=x, answer=a, loss_sum=1.0, tokens=2, **s) for x, a, s in zip(references, answers, scored)]


def test_a_toy_task_is_scored_and_resampled_as_it_says(length):
    references = ["abcd"] * 40
    metrics, rows = length.score(["abc"] * 20 + ["abcdefgh"] * 20, references)
    assert metrics == {"miss": 2.5, "answered": 1.0}
    samples = metric_samples(length, rows, references, [1.0] * 40, [2] * 40, np.arange(40)[None, :])
    assert set(samples) == {"loss", "miss", "answered"} and samples["miss"][0] == 2.5
    assert task_of(predictions(length, ["a"], ["ab"])).name == "length", "its rows are told apart from the others'"


def test_compare_calls_the_run_that_misses_less_better(length):
    from tools.report import paired_comparison

    references = [f"reference {i}" for i in range(60)]
    close = predictions(length, [r[:-1] for r in references], references)  # one character short
    far = predictions(length, [r[:-5] for r in references], references)  # five short
    verdicts = {name: (diff, verdict) for name, _, _, diff, _, _, verdict in paired_comparison(far, close)}
    assert verdicts["miss"] == (-4.0, "better"), "a lower miss is the better run"
    verdicts = {name: (diff, verdict) for name, _, _, diff, _, _, verdict in paired_comparison(close, far)}
    assert verdicts["miss"] == (4.0, "worse")


def test_a_study_minimizes_the_toy_tasks_val_metric(length, tmp_path, monkeypatch):
    from tools.tune import load_config, objectives

    assert objectives()["val_miss"] == "minimize"
    monkeypatch.chdir(tmp_path)
    shutil.copy(ROOT / "params.yaml", "params.yaml")
    (tmp_path / "tune.yaml").write_text("objective: val_miss\nspace:\n  lora.r: choice [2, 4]\n")
    assert load_config("tune.yaml")["direction"] == "minimize"


def test_no_code_but_the_task_module_names_a_task():
    """What a task does is asked of its object; a branch on its name elsewhere would miss a new kind.
    The one list of names outside qlora/tasks.py is params.py's, checked against it in test_scoring."""
    import re

    names = "|".join(TASKS)
    found = []
    for path in sorted({*ROOT.glob("qlora/**/*.py"), *ROOT.glob("stages/*.py"), *ROOT.glob("tools/*.py"),
                        *ROOT.glob("benchmarks/*.py")}):
        if path.relative_to(ROOT).as_posix() == "qlora/tasks.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if re.search(rf"""["']({names})["']""", code) and not code.startswith("TASKS = ("):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert found == []
