"""Held-out evaluation of the fine-tuned model: does it generalise, and when did it overfit?

- Loss and perplexity on a train sample, val and test, measured the same way (the
  train sample is as large as val, so the gap is not a sample-size artefact); the
  gap (val minus train) and ratio (val over train).
- From the val curve the train stage logged: the best val loss, the step and epoch
  where it happened, the last one, the rise since the best in percent, and
  `overfitting` when that rise passes `evaluate.overfitting_rise_pct`.
- The task metric on test (accuracy and macro F1 of the generated answer), beside
  the base model's from the evaluate_base stage, and the differences.
- Sample predictions (input, expected, base answer, fine-tuned answer) in
  `metrics/predictions.md`, and every test answer in `metrics/predictions.json`
  (a confusion-matrix plot in dvc.yaml).
"""

import json
import os
from pathlib import Path

from qlora.models import load_model
from qlora.outputs import log, write_json
from qlora.params import load_params
from qlora.scoring import completion_loss, generate_answers, task_metrics
from qlora.splits import load_split

BASE_ANSWERS = "base_answers.json"  # written by evaluate_base, under paths.metrics
VAL_CURVE = "live/plots/metrics/eval/loss.tsv"  # written by train through dvclive, under paths.metrics
PARAMS = ["evaluate", "paths.quantized", "paths.tokenizer", "paths.tokenized", "paths.adapter", "paths.metrics"]


def train_sample(train, size):
    """Evenly spaced train examples: deterministic, no seed to declare, spread over the split."""
    step = max(1, len(train) // size)
    return train.select(range(0, step * min(size, len(train)), step))


def val_curve_summary(curve_file, steps_per_epoch, rise_threshold_pct):
    """Best and last val loss of the training curve, and whether the rise since the best is overfitting."""
    import pandas as pd

    curve = pd.read_csv(curve_file, sep="\t")
    if curve.empty:
        raise SystemExit(f"evaluate: {curve_file} has no val loss; did the train stage evaluate?")
    best, last = curve.loc[curve["loss"].idxmin()], curve.iloc[-1]
    rise = 100 * (last["loss"] - best["loss"]) / best["loss"]
    return dict(
        best_val_loss=round(float(best["loss"]), 4),
        best_val_step=int(best["step"]),
        best_val_epoch=round(int(best["step"]) / steps_per_epoch, 2),
        last_val_loss=round(float(last["loss"]), 4),
        last_val_step=int(last["step"]),
        val_loss_rise_pct=round(float(rise), 2),
        overfitting=bool(rise > rise_threshold_pct),
    )


def shown_inputs(prompts):
    """Prompts without the lines they all start with (the instruction), whitespace collapsed."""
    prefix = os.path.commonprefix(list(prompts)) if len(prompts) > 1 else ""
    prefix = prefix[: prefix.rfind("\n") + 1]  # whole lines only
    return [" ".join(p[len(prefix):].split()) for p in prompts]


def predictions_markdown(rows, metrics, count):
    def cell(text, width=110):
        text = str(text).replace("|", "\\|").replace("\n", " ")
        return text if len(text) <= width else text[: width - 1] + "…"

    lines = [
        "# Sample predictions on test",
        "",
        f"Fine-tuned accuracy {metrics['test_accuracy']} (base {metrics['base_test_accuracy']}), "
        f"macro F1 {metrics['test_macro_f1']} (base {metrics['base_test_macro_f1']}). "
        f"The first {min(count, len(rows))} of {len(rows)} test examples; ✓ marks a correct answer.",
        "",
        "| input | expected | base answer | fine-tuned answer |",
        "|---|---|---|---|",
    ]
    for r in rows[:count]:
        mark = lambda label, answer: f"{'✓ ' if label == r['expected'] else ''}{cell(answer, 60)}"  # noqa: E731
        lines.append(f"| {cell(r['input'])} | {r['expected']} | {mark(r['base_label'], r['base_answer'])} "
                     f"| {mark(r['label'], r['answer'])} |")
    return "\n".join(lines) + "\n"


def main():
    from peft import PeftModel
    from transformers import AutoTokenizer

    p = load_params(PARAMS)
    e = p.evaluate
    metrics_dir = Path(p.paths.metrics)
    tokenizer = AutoTokenizer.from_pretrained(p.paths.tokenizer)
    val, test = load_split(p.paths.tokenized, "val"), load_split(p.paths.tokenized, "test")
    train = train_sample(load_split(p.paths.tokenized, "train"), len(val))
    base_metrics = json.loads((metrics_dir / "evaluate_base.json").read_text())
    base_answers = json.loads((metrics_dir / BASE_ANSWERS).read_text())
    trained = json.loads((metrics_dir / "train.json").read_text())
    curve = val_curve_summary(metrics_dir / VAL_CURVE, trained["steps"] / trained["epochs"], e.overfitting_rise_pct)
    model = PeftModel.from_pretrained(load_model(p.paths.quantized), p.paths.adapter)

    losses = {name: completion_loss(model, split, e.batch_size) for name, split in
              (("train", train), ("val", val), ("test", test))}
    log("loss " + ", ".join(f"{name} {v['loss']}" for name, v in losses.items()))
    answers = generate_answers(model, tokenizer, test, e.batch_size, e.max_new_tokens)
    task, labels = task_metrics(answers, test["completion"])

    metrics = {f"{name}_{k}": v for name, result in losses.items() for k, v in result.items()}
    metrics.update(
        gap=round(losses["val"]["loss"] - losses["train"]["loss"], 4),  # > 0 and growing: overfitting
        gap_ratio=round(losses["val"]["loss"] / losses["train"]["loss"], 3),
        **curve,
        test_accuracy=task["accuracy"],
        base_test_accuracy=base_metrics["test_accuracy"],
        accuracy_gain=round(task["accuracy"] - base_metrics["test_accuracy"], 4),
        test_macro_f1=task["macro_f1"],
        base_test_macro_f1=base_metrics["test_macro_f1"],
        macro_f1_gain=round(task["macro_f1"] - base_metrics["test_macro_f1"], 4),
        base_test_loss=base_metrics["test_loss"],
    )
    classes = set(test["completion"])
    named = lambda label: label if label in classes else "(no label)"  # noqa: E731  keeps the confusion matrix square
    rows = [dict(input=i, expected=x, base_answer=b["answer"], base_label=named(b["label"]), answer=a, label=named(y))
            for i, x, b, a, y in zip(shown_inputs(test["prompt"]), test["completion"], base_answers, answers, labels)]
    write_json(metrics_dir / "predictions.json", rows)
    (metrics_dir / "predictions.md").write_text(predictions_markdown(rows, metrics, e.samples))
    write_json(metrics_dir / "evaluate.json", metrics)
    log(f"test accuracy {metrics['test_accuracy']} (base {metrics['base_test_accuracy']}), gap {metrics['gap']}, "
        f"best val loss {curve['best_val_loss']} at step {curve['best_val_step']}, last {curve['last_val_loss']}"
        f"{' (overfitting)' if curve['overfitting'] else ''}")


if __name__ == "__main__":
    main()
