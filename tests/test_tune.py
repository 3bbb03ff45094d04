"""make tune: every trial is a DVC experiment; the study resumes after a kill; a bad search space
stops before any trial, naming the line."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml

from conftest import ROOT, run
from tools.tune import TuneError, load_config

SPACE = """\
study: {study}
objective: val_loss
trials: {trials}
seed: 1
startup_trials: 2
space:
  train.learning_rate: loguniform 1e-4 1e-2
  lora.r: choice [2, 4]
"""


@pytest.mark.parametrize("line,message", [
    ("  lora.rank: choice [2, 4]", "line 9 (lora.rank): no such key in"),
    ("  lora.dropout: uniform 0.3 0.1", "line 9 (lora.dropout): low must be below high, got low 0.3 and high 0.1"),
    ("  lora.dropout: uniform 0 1.5", "lora.dropout must be in [0, 1), got 1.5"),
    ("  train.batch_size: uniform 2 8", "line 9 (train.batch_size): 2.0 is refused by"),
    ("  train.learning_rate: loguniform 0 1e-2", "loguniform needs a positive low bound"),
    ("  lora.init: choice [kaiming, xavier]", "lora.init must be one of kaiming"),
    ("  train.learning_rate: normal 1e-3 1e-4", "a range: one of uniform, loguniform, int, choice"),
])
def test_a_bad_search_space_line_stops_before_any_trial(tmp_path, monkeypatch, line, message):
    monkeypatch.chdir(tmp_path)
    shutil.copy(ROOT / "params.yaml", "params.yaml")
    (tmp_path / "tune.yaml").write_text(SPACE.format(study="bad", trials=2) + line + "\n")
    with pytest.raises(TuneError) as err:
        load_config("tune.yaml")
    assert "tune.yaml" in str(err.value) and message in str(err.value)
    assert not (tmp_path / "reports").exists()


def test_the_objective_is_never_a_test_metric(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(ROOT / "params.yaml", "params.yaml")
    (tmp_path / "tune.yaml").write_text(SPACE.format(study="s", trials=2).replace("val_loss", "test_accuracy"))
    with pytest.raises(TuneError, match=r"line 2 \(objective\): a val metric .* the test split is never used"):
        load_config("tune.yaml")


def tune(project, trials, study="tiny"):
    (project / "tune.yaml").write_text(SPACE.format(study=study, trials=trials))
    return subprocess.Popen([sys.executable, "-m", "tools.tune"], cwd=project, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env=dict(os.environ, PATH=f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"))


def journal_trials(project, study="tiny"):
    from tools.tune import open_study

    config = load_config(project / "tune.yaml", project / "params.yaml")
    cwd = os.getcwd()
    os.chdir(project)
    try:
        return open_study(config).get_trials()
    finally:
        os.chdir(cwd)


@pytest.mark.fault("`make tune` killed mid-trial (one worker, the journal file)",
                   sees="the rerun keeps the finished trials and runs the cut-off one's params first", lost="that one run")
def test_each_trial_is_an_experiment_and_a_killed_search_resumes(tiny_project):
    p = tiny_project
    params_before = (p / "params.yaml").read_text()

    # Two trials; killed (the whole process group, as Ctrl-C twice or a lost session would) while
    # the second runs.
    proc = tune(p, trials=2)
    out = []
    for text in proc.stdout:
        out.append(text)
        if text.startswith("tune: trial 1 (1 of 2 finished so far)"):
            time.sleep(3)
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait()
    assert any(t.startswith("tune: tiny-0: val_loss = ") for t in out), "".join(out)[-3000:]

    # Raised to 3 and rerun: the finished trial is kept, the cut-off one is run again first.
    proc = tune(p, trials=3)
    rerun = proc.communicate()[0]
    assert proc.returncode == 0, rerun[-3000:]
    assert "tiny-0:" not in rerun, "a finished trial was run again"
    trials = journal_trials(p)
    states = [t.state.name for t in trials]
    assert states == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"], states
    assert trials[1].user_attrs["error"].startswith("interrupted")
    assert trials[2].params == trials[1].params, "the interrupted trial's params come first"

    # Each finished trial is a DVC experiment with its own params and metrics.
    from tools.report import experiment_rows

    cwd = os.getcwd()
    os.chdir(p)
    try:
        rows = {r["name"]: r for r in experiment_rows()}
    finally:
        os.chdir(cwd)
    for t in trials:
        if t.state.name != "COMPLETE":
            continue
        row = rows[t.user_attrs["experiment"]]
        assert row["params"]["lora.r"] == t.params["lora.r"]
        assert row["params"]["train.learning_rate"] == pytest.approx(t.params["train.learning_rate"])
        assert row["metrics"]["metrics/evaluate.json"]["val_loss"] == pytest.approx(t.values[0])
    assert len({t.values[0] for t in trials if t.values}) == 3, "each trial its own result"

    # The report names the best trial, to restore with dvc exp apply; the workspace is untouched.
    report = json.loads((p / "reports/tune/tiny.json").read_text())
    best = min((t for t in trials if t.values), key=lambda t: t.values[0])
    assert report["best"]["experiment"] == best.user_attrs["experiment"]
    assert f"dvc exp apply {best.user_attrs['experiment']}" in (p / "reports/tune/tiny.md").read_text()
    assert (p / "reports/tune/tiny.png").stat().st_size > 1000
    assert (p / "params.yaml").read_text() == params_before
    assert yaml.safe_load(run(["git", "status", "--porcelain", "params.yaml", "dvc.lock"], p).stdout or "") is None


def test_a_second_worker_in_the_same_clone_stops_naming_why(tmp_path, monkeypatch):
    from tools.tune import one_worker_per_clone

    monkeypatch.chdir(tmp_path)
    shutil.copy(ROOT / "params.yaml", "params.yaml")
    (tmp_path / "tune.yaml").write_text(SPACE.format(study="s", trials=1))
    held = one_worker_per_clone()  # noqa: F841 - a worker running in this clone
    second = subprocess.run([sys.executable, "-m", "tools.tune"], cwd=tmp_path, capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert second.returncode != 0
    assert "another worker runs in this clone" in second.stderr and "a clone of its own" in second.stderr
    assert not (tmp_path / "reports").exists(), "it stopped before touching the study"
