"""A tiny model trained far too long on a tiny set overfits, the metrics say so, and early
stopping stops it and keeps the best adapter. Real DVC, real trainer, tiny model."""

import json
import re

import pandas as pd
import pytest

from conftest import make_project, repro, run

EVAL_STEPS = 10
OVERFIT = {
    "data.max_per_label": 4,  # 16 train and 5 val examples: easy to memorise, nothing to generalise from
    "train.epochs": 40, "train.max_steps": -1, "train.batch_size": 4,
    "train.learning_rate": 1.0e-2, "train.lr_scheduler": "constant", "train.warmup_ratio": 0.0,
    "train.eval_steps": EVAL_STEPS, "train.logging_steps": 5,
    "lora.dropout": 0.0, "lora.target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "evaluate.max_new_tokens": 3, "evaluate.overfitting_rise_pct": 2.0,
}


@pytest.fixture(scope="module")
def overfit_project(tmp_path_factory, tiny_model_dir):
    project = make_project(tmp_path_factory.mktemp("overfit") / "project",
                           {**OVERFIT, "base.source": "local", "base.path": str(tiny_model_dir)})
    repro(project)
    return project


def metrics(project, name):
    return json.loads((project / f"metrics/{name}.json").read_text())


def test_training_too_long_is_flagged_as_overfitting(overfit_project):
    p = overfit_project
    m, t = metrics(p, "evaluate"), metrics(p, "train")
    val = pd.read_csv(p / "metrics/live/plots/metrics/eval/loss.tsv", sep="\t")
    assert val["loss"].iloc[0] > m["best_val_loss"], "the val loss first falls"
    assert m["best_val_step"] < m["last_val_step"] == t["steps"] == 160
    assert m["last_val_loss"] > m["best_val_loss"] and m["val_loss_rise_pct"] > 2.0
    assert m["overfitting"] is True
    assert m["gap"] > 1.0 and m["gap_ratio"] > 1.2, "the model fits train far better than val"
    assert t["stopped_early"] is False


def test_early_stopping_stops_and_keeps_the_best_adapter(overfit_project):
    p = overfit_project
    out = run(["dvc", "exp", "run", "-S", "train.early_stopping_patience=3"], p)
    assert set(re.findall(r"Running stage '(\w+)'", out.stdout)) == {"validate", "train", "evaluate", "export"}
    m, t = metrics(p, "evaluate"), metrics(p, "train")
    assert t["stopped_early"] is True and t["stopped_at_step"] < 160
    assert t["best_step"] == m["best_val_step"], "the trainer's best is the curve's best"
    assert t["stopped_at_step"] == m["last_val_step"] == t["best_step"] + 3 * EVAL_STEPS, "3 evaluations of patience"
    assert m["last_val_loss"] > m["best_val_loss"]
    # The saved adapter is the best one: its val loss (measured again by the evaluate stage)
    # is the best point of the curve, not the last.
    assert abs(m["val_loss"] - m["best_val_loss"]) < abs(m["val_loss"] - m["last_val_loss"])
