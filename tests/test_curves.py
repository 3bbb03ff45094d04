"""Curves, overfitting metrics and sample predictions, on the reproduced tiny pipeline."""

import json
import math

import pandas as pd
import pytest
import yaml

from conftest import ROOT, run
from stages.evaluate import shown_inputs, val_curve_summary

LIVE = "metrics/live/plots/metrics"


def test_curves_are_logged_at_the_optimizer_step(reproduced_project):
    p, _ = reproduced_project
    # TINY_OVERRIDES: 3 steps, logging and evaluation every step, evaluation before the first.
    for name in ("loss", "learning_rate", "grad_norm", "tokens_per_second"):
        curve = pd.read_csv(p / f"{LIVE}/train/{name}.tsv", sep="\t")
        assert list(curve["step"]) == [1, 2, 3], name
        assert all(math.isfinite(v) for v in curve[name]), name
    assert (pd.read_csv(p / f"{LIVE}/train/tokens_per_second.tsv", sep="\t")["tokens_per_second"] > 0).all()
    val = pd.read_csv(p / f"{LIVE}/eval/loss.tsv", sep="\t")
    assert list(val["step"]) == [0, 1, 2, 3]
    assert (p / "dvc.yaml").read_text() == (ROOT / "dvc.yaml").read_text(), "dvclive must not rewrite dvc.yaml"


def test_dvc_plots_overlay_train_and_val_loss(reproduced_project):
    p, _ = reproduced_project
    plots = json.loads(run(["dvc", "plots", "show", "--json"], p).stdout)["data"]
    values = plots["Loss (train and val)"][0]["content"]["data"]["values"]
    assert {v["filename"] for v in values} == {"train/loss.tsv", "eval/loss.tsv"}
    assert {"Learning rate", "Gradient norm", "Training throughput"} <= set(plots)


def test_evaluate_reports_overfitting_and_task_metrics(reproduced_project):
    p, _ = reproduced_project
    m = json.loads((p / "metrics/evaluate.json").read_text())
    val = pd.read_csv(p / f"{LIVE}/eval/loss.tsv", sep="\t")
    assert m["best_val_loss"] == round(val["loss"].min(), 4)
    assert m["last_val_loss"] == round(val["loss"].iloc[-1], 4) and m["last_val_step"] == 3
    assert m["gap"] == round(m["val_loss"] - m["train_loss"], 4)
    assert m["gap_ratio"] == round(m["val_loss"] / m["train_loss"], 3)
    for key in ("test_macro_f1", "base_test_macro_f1", "macro_f1_gain", "accuracy_gain", "overfitting",
                "test_answered", "base_test_answered"):
        assert key in m
    rows = json.loads((p / "metrics/predictions.json").read_text())
    test_size = json.loads((p / "metrics/prepare.json").read_text())["test_examples"]
    assert len(rows) == test_size
    assert {"input", "expected", "base_answer", "base_label", "base_correct", "answer", "label", "correct"} <= set(rows[0])
    for prefix in ("", "base_"):  # each model's per-example scores add up to its metrics
        assert m[f"{prefix}test_accuracy"] == round(sum(r[f"{prefix}correct"] for r in rows) / len(rows), 4)
        assert m[f"{prefix}test_answered"] == round(sum(r[f"{prefix}label"] is not None for r in rows) / len(rows), 4)
    assert all(r["correct"] == (r["label"] == r["expected"]) for r in rows)
    confusion = json.loads((p / "metrics/confusion.json").read_text())
    assert [c["expected"] for c in confusion] == [r["expected"] for r in rows]
    table = (p / "metrics/predictions.md").read_text()
    assert "| input | expected | base answer | fine-tuned answer |" in table
    assert table.count("\n| ") == 1 + min(len(rows), 24)  # header + evaluate.samples rows


def test_val_curve_summary_flags_a_rise_past_the_threshold():
    curve = [dict(step=s, loss=v) for s, v in zip([0, 10, 20, 30, 40], [3.0, 2.0, 1.0, 1.04, 1.10])]
    s = val_curve_summary(curve, steps_per_epoch=20, rise_threshold_pct=5)
    assert (s["best_val_loss"], s["best_val_step"], s["best_val_epoch"]) == (1.0, 20, 1.0)
    assert (s["last_val_loss"], s["last_val_step"], s["val_loss_rise_pct"]) == (1.1, 40, 10.0)
    assert s["overfitting"] is True
    assert val_curve_summary(curve, 20, rise_threshold_pct=12)["overfitting"] is False


def test_shown_inputs_drop_the_shared_instruction_lines():
    prompts = ["Sort this.\nPackage: a\nDescription: x", "Sort this.\nPackage: b\nDescription: y"]
    assert shown_inputs(prompts) == ["Package: a Description: x", "Package: b Description: y"]


def test_plots_in_dvc_yaml_cover_loss_and_learning_rate():
    plots = {name for plot in yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"] for name in plot}
    assert {"Loss (train and val)", "Learning rate"} <= plots
