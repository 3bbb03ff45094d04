"""Held-out evaluation of the fine-tuned model: does it generalise, and when did it overfit?

- Loss and perplexity on a train sample, val and test, measured the same way (the
  train sample is as large as val, so the gap is not a sample-size artefact); the
  gap (val minus train) and ratio (val over train).
- From the val curve the train stage logged (kept in the adapter folder with train's
  figures, qlora.outputs.RUN_RECORD): the best val loss, the step and epoch where it
  happened, the last one, the rise since the best in percent, and `overfitting` when
  that rise passes `evaluate.overfitting_rise_pct`.
- The task metrics on test, beside the base model's from the evaluate_base stage, and
  the gains (qlora/scoring.py); the same metrics on val (what a search chooses by, since
  test never is), the primary one with its interval. Classification: accuracy, macro F1 and `answered`
  (answers that give exactly one allowed label). Generation: exact match, chrF and
  ROUGE-L of the generated answer against the reference, and `answered` (non-empty).
- What decides between runs and what the run cost, in `metrics/scores.json`, the only file
  declared as DVC metrics (so `dvc exp show` stays readable; `SCORES` lists its keys): val and
  test loss, the primary task metric on test with its interval, answered, the gain over the base
  model and its verdict, overfitting, the best val step, and train's tokens/s, peak memory and MFU.
  Every other figure stays in `metrics/evaluate.json` (and train's in `metrics/train.json`).
- Sample predictions (input, expected, base answer, fine-tuned answer, each whole) in
  `metrics/predictions.md`; every test example in `metrics/predictions.json` with its
  reference, both answers and each one's scores, so that two runs can be compared
  example by example; for classification, expected vs given label in
  `metrics/confusion.json` (a confusion-matrix plot in dvc.yaml; empty for generation); for
  numbers, each answer against its reference in `metrics/scatter.json` and the base model's in
  `metrics/scatter_base.json` (the truth-vs-prediction plot in dvc.yaml; empty for the other tasks).
"""

import json
import os
from pathlib import Path

from qlora import cores
from qlora.console import done, quiet_known_noise
from qlora.models import load_model
from qlora.outputs import RUN_RECORD, log, write_json
from qlora.params import load_params
from qlora.scoring import (answer_budget, decode_answers, example_losses, generate_answer_ids, generate_answers,
                           interval, loss_summary, metric_samples, resampled)
from qlora.splits import load_format, load_split
from qlora.tasks import task_for

BASE_ANSWERS = "base_answers.json"  # written by evaluate_base, under paths.metrics
PARAMS = ["evaluate", "data.labels", "quantize.compute_dtype", "paths.quantized", "paths.tokenizer", "paths.tokenized",
          "paths.adapter", "paths.metrics"]
# metrics/scores.json, what `dvc exp show` lists: {its key: the figure's key in evaluate.json}, and COST
# {its key: the figure's key in train.json, read from the adapter's RUN_RECORD}. The keys are short because
# DVC names its columns by them: a run and the default, compared with `dvc exp show --only-changed`, fit
# 200 columns. {primary}: the task's primary metric (qlora.tasks.Task.primary), on test; ci_low and ci_high
# its 95% interval; gain its difference from the base model's, and significant whether the paired
# interval of that difference excludes 0.
SCORES = {"val_loss": "val_loss", "test_loss": "test_loss", "{primary}": "test_{primary}",
          "ci_low": "test_{primary}_ci_low", "ci_high": "test_{primary}_ci_high", "answered": "test_answered",
          "gain": "{primary}_gain", "significant": "gain_significant", "overfit": "overfitting",
          "best_step": "best_val_step"}
COST = {"tokens_s": "tokens_per_second", "peak_mb": "peak_memory_mb", "mfu": "mfu"}


def train_sample(train, size):
    """Evenly spaced train examples: deterministic, no seed to declare, spread over the split."""
    step = max(1, len(train) // size)
    return train.select(range(0, step * min(size, len(train)), step))


def val_curve_summary(points, steps_per_epoch, rise_threshold_pct):
    """Best and last val loss of the training curve (its points: step, loss), and whether the rise since
    the best is overfitting."""
    import pandas as pd

    curve = pd.DataFrame(points, columns=["step", "loss"])
    if curve.empty:
        raise SystemExit("evaluate: the adapter's training record has no val loss; did the train stage evaluate?")
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


def headline(metrics, task):
    """The task metrics of the fine-tuned and the base model, as one sentence."""
    return ", ".join(f"{name} {metrics[f'test_{name}']} (base {metrics[f'base_test_{name}']})" for name in task.metrics)


def deciding(metrics, trained, task):
    """The figures that decide between runs and what the run cost (SCORES, COST): metrics/scores.json."""
    primary = task.primary
    return {**{k.format(primary=primary): metrics[v.format(primary=primary)] for k, v in SCORES.items()},
            **{k: metrics[v] for k, v in task.deciding.items()}, **{k: trained[v] for k, v in COST.items()}}


def predictions_markdown(rows, metrics, task, count):
    def cell(text, width=None):  # answers whole (a cut-off or chatty one is judged here); line breaks as ⏎
        text = str(text).replace("|", "\\|").replace("\n", "⏎")
        if not text.strip():
            return "(empty)"
        return text if width is None or len(text) <= width else text[: width - 1] + "…"

    def shown(row, prefix):
        return task.shown({**row, f"{prefix}answer": cell(row[f"{prefix}answer"])}, prefix)

    mark = task.mark
    lines = [
        "# Sample predictions on test",
        "",
        f"Fine-tuned model: {headline(metrics, task)}. {min(count, len(rows))} of {len(rows)} test "
        f"examples, {task.order}; ✓ marks {mark}. Answers are whole (⏎ a line break); inputs are cut at 110 characters "
        "(metrics/predictions.json has every example whole).",
        "",
        "| input | expected | base answer | fine-tuned answer |",
        "|---|---|---|---|",
    ]
    lines += [f"| {cell(r['input'], 110)} | {cell(r['expected'])} | {shown(r, 'base_')} | {shown(r, '')} |"
              for r in task.shown_first(rows)[:count]]
    return "\n".join(lines) + "\n"


def main():
    quiet_known_noise()  # before bitsandbytes is imported
    cores.claim()  # its share of the cores, with other stages running at once
    from peft import PeftModel
    from transformers import AutoTokenizer

    p = load_params(PARAMS)
    e = p.evaluate
    metrics_dir = Path(p.paths.metrics)
    tokenizer = AutoTokenizer.from_pretrained(p.paths.tokenizer)
    val, test = load_split(p.paths.tokenized, "val"), load_split(p.paths.tokenized, "test")
    full_train = load_split(p.paths.tokenized, "train")
    task = task_for(e.task, p.data.labels, full_train["completion"])
    train = train_sample(full_train, len(val))
    base_metrics = json.loads((metrics_dir / "evaluate_base.json").read_text())
    base_rows = json.loads((metrics_dir / BASE_ANSWERS).read_text())
    trained = json.loads((Path(p.paths.adapter) / RUN_RECORD).read_text())
    curve = val_curve_summary(trained["val_curve"], trained["steps"] / trained["epochs"], e.overfitting_rise_pct)
    model = PeftModel.from_pretrained(load_model(p.paths.quantized, p.quantize.compute_dtype), p.paths.adapter)

    per_example = {name: example_losses(model, split, e.batch_size, desc=f"{name} loss") for name, split in
                   (("train", train), ("val", val), ("test", test))}
    losses = {name: loss_summary(*sums_counts) for name, sums_counts in per_example.items()}
    log("loss " + ", ".join(f"{name} {v['loss']}" for name, v in losses.items()))
    budget, stop_ids = answer_budget(e.max_new_tokens, full_train), load_format(p.paths.tokenized)["stop_token_ids"]
    answer_ids = generate_answer_ids(model, tokenizer, test, e.batch_size, budget, stop_ids, desc="test answers")
    answers = decode_answers(tokenizer, answer_ids)
    scores, scored = task.score(answers, test["completion"])
    # The task metric on val too: what a search may choose by (test never is).
    val_answers = generate_answers(model, tokenizer, val, e.batch_size, budget, stop_ids, desc="val answers")
    val_scores, val_scored = task.score(val_answers, val["completion"])

    metrics = {f"{name}_{k}": v for name, result in losses.items() for k, v in result.items()}
    metrics.update(
        gap=round(losses["val"]["loss"] - losses["train"]["loss"], 4),  # > 0 and growing: overfitting
        gap_ratio=round(losses["val"]["loss"] / losses["train"]["loss"], 3),
        **curve,
        base_test_loss=base_metrics["test_loss"],
        **model.get_base_model().compute_precision.record(),  # quantize.compute_dtype as resolved here, and why
    )
    # 95% percentile-bootstrap intervals over the test examples; the gains paired (the same resamples
    # of the same examples for both models), so that what both get right or wrong cancels out.
    idx = resampled(len(test))
    mine = metric_samples(task, scored, test["completion"], *per_example["test"], idx)
    base_samples = metric_samples(task, base_rows, test["completion"], [b["loss_sum"] for b in base_rows],
                                  [b["tokens"] for b in base_rows], idx)
    metrics["test_loss_ci_low"], metrics["test_loss_ci_high"] = interval(mine["loss"])
    for name, value in scores.items():
        base = base_metrics[f"test_{name}"]
        metrics.update({f"test_{name}": value, f"base_test_{name}": base})
        if name not in mine:  # an extra figure of the task (no interval), or a metric undefined on this data
            continue
        metrics[f"test_{name}_ci_low"], metrics[f"test_{name}_ci_high"] = interval(mine[name])
        if name != "answered" and None not in (value, base) and name in base_samples:
            metrics[f"{name}_gain"] = round(value - base, 4)
            metrics[f"{name}_gain_ci_low"], metrics[f"{name}_gain_ci_high"] = interval(mine[name] - base_samples[name])
    metrics.update({f"val_{name}": value for name, value in val_scores.items()})
    val_samples = metric_samples(task, val_scored, val["completion"], *per_example["val"], resampled(len(val)))
    primary = task.primary
    metrics[f"val_{primary}_ci_low"], metrics[f"val_{primary}_ci_high"] = interval(val_samples[primary])
    low, high = metrics[f"{primary}_gain_ci_low"], metrics[f"{primary}_gain_ci_high"]
    metrics["gain_significant"] = low > 0 or high < 0  # the primary metric's paired interval excludes 0

    rows = [dict(input=i, expected=x, base_answer=b["answer"], answer=a,
                 **{f"base_{k}": v for k, v in b.items() if k != "answer"}, **s, loss_sum=round(ls, 5), tokens=n)
            for i, x, b, a, s, ls, n in zip(shown_inputs(test["prompt"]), test["completion"], base_rows, answers,
                                            scored, *per_example["test"])]
    confusion = task.confusion(rows)
    write_json(metrics_dir / "predictions.json", rows)
    write_json(metrics_dir / "confusion.json", confusion)
    write_json(metrics_dir / "scatter.json", task.scatter(rows))  # the truth-vs-prediction plot (numbers only)
    write_json(metrics_dir / "scatter_base.json", task.scatter(rows, "base_"))
    (metrics_dir / "predictions.md").write_text(predictions_markdown(rows, metrics, task, e.samples))
    write_json(metrics_dir / "evaluate.json", metrics)
    write_json(metrics_dir / "scores.json", deciding(metrics, trained, task))
    done(f"{task.name}: {headline(metrics, task)}; gap {metrics['gap']}, "
         f"best val loss {curve['best_val_loss']} at step {curve['best_val_step']}, last {curve['last_val_loss']}"
         f"{' (overfitting)' if curve['overfitting'] else ''}")


if __name__ == "__main__":
    main()
