"""The console of a stage, as a person following `dvc repro` or a queue worker's log sees it:
progress bars with a rate and the time left, one summary line per stage, and none of the two
library messages nobody can act on, while every other warning still shows."""

import logging
import re
import warnings

import pytest

from conftest import run
from qlora.console import KERNELS_LOGGER, progress, quiet_known_noise

KERNELS_WARNING = ("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
                   "`pip install kernels` and the kernels >= 0.11.1")  # as bitsandbytes/backends/cpu/ops.py logs it
CHECKPOINTING_WARNING = ("`is_gradient_checkpointing` is deprecated and will be removed in v6. Use "
                         "`is_activation_checkpointing` instead.")  # as transformers/modeling_utils.py warns
MODEL_STAGES = ("base", "quantize", "train", "evaluate_base", "evaluate", "export")


class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def kernels_logger(monkeypatch):
    """The bitsandbytes logger with a handler that keeps what reaches it (at its own level, not one a
    test sets); its filters and handlers put back after the test."""
    logger = logging.getLogger(KERNELS_LOGGER)
    monkeypatch.setattr(logger, "filters", [])
    monkeypatch.setattr(logger, "handlers", [Records()])
    monkeypatch.setattr(logger, "propagate", False)
    return logger


def test_only_the_two_known_messages_are_silenced(kernels_logger):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_known_noise()
        quiet_known_noise()  # every stage calls it; twice adds nothing
        warnings.warn(CHECKPOINTING_WARNING, FutureWarning)
        warnings.warn("`other_attribute` is deprecated and will be removed in v6.", FutureWarning)
        warnings.warn(CHECKPOINTING_WARNING, UserWarning)  # the same words in another category
    assert [(str(w.message)[:18], w.category) for w in caught] == [
        ("`other_attribute` ", FutureWarning), ("`is_gradient_check", UserWarning)]

    kernels_logger.warning(KERNELS_WARNING, "No module named 'kernels'")
    kernels_logger.warning("gemv_4bit fell back to the slow path")
    assert [r.getMessage() for r in kernels_logger.handlers[0].records] == ["gemv_4bit fell back to the slow path"]
    assert len(kernels_logger.filters) == 1


def test_a_bar_in_a_log_writes_whole_lines(capsys):
    bar = progress(3, "demo", unit="step")
    for _ in range(3):
        bar.update()
    bar.close()
    passing = progress(2, "passing", leave=False)  # shorter than one interval: nothing in a log
    passing.update(2)
    passing.close()
    progress(2, None).close()  # a caller that names no bar gets none
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b" not in err
    lines = err.splitlines()
    assert len(lines) == 2 and lines[0].startswith("demo:   0%|") and "0/3" in lines[0], err
    assert re.match(r"demo: 100%\|\S+\| 3/3 \[[\d:]+<[\d:]+, +[\d.]+(step/s|s/step)\]$", lines[1]), err


def test_a_dvc_run_shows_progress_and_one_summary_per_stage_and_no_noise(tiny_project):
    # As a DVC queue worker or CI runs it: stdout and stderr are pipes, not a terminal.
    result = run(["dvc", "repro", "--force"], tiny_project)
    out = result.stdout + result.stderr
    assert "kernels-community" not in out
    assert "is_gradient_checkpointing" not in out and "FutureWarning" not in out
    assert not re.search(r"\{'(eval_)?loss'", out), "no raw log dicts of the Trainer"
    rate = r"\[[\d:]+<[\d:]+, +[\d.]+(s/\w+|\w+/s)"  # elapsed<left, rate
    assert re.search(rf"^train: 100%\|\S+\| 3/3 {rate}, loss [\d.]+, lr ", out, re.M), out[-3000:]
    assert re.search(r"^\[train\] step 3/3: train loss [\d.]+, val loss [\d.]+$", out, re.M), out[-3000:]
    for bar in ("train loss", "val loss", "test loss", "test answers"):
        assert re.search(rf"^{bar}: 100%\|\S+\| \d+/\d+ {rate}", out, re.M), bar
    assert not re.search(r"\r(train|val loss|test loss|test answers):", out), "one line per refresh in a log"
    for stage in MODEL_STAGES:
        summaries = re.findall(rf"^\[{stage}\] done in \d+ s: .+$", out, re.M)
        assert len(summaries) == 1, (stage, out[-3000:])
    assert re.search(r"^\[train\] done in \d+ s: 3 steps in \d+ s .*loss [\d.]+ -> [\d.]+, [\d.]+ tokens/s$", out, re.M)
