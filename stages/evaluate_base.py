"""Score the quantized base model, without an adapter, on the test split.

A stage of its own so that changing LoRA or training params never recomputes it:
it depends on the quantized model, the tokenized splits and the `evaluate.*` keys it
reads. Its answers and their per-example scores are kept for the evaluate stage,
which pairs them with the fine-tuned model's example by example.
"""

from pathlib import Path

from qlora import cores
from qlora.console import done, quiet_known_noise
from qlora.models import load_model
from qlora.outputs import write_json
from qlora.params import load_params
from qlora.scoring import (answer_budget, example_losses, generate_answers, interval, loss_summary, metric_samples,
                           resampled)
from qlora.splits import load_format, load_split
from qlora.tasks import task_for

BASE_ANSWERS = "base_answers.json"  # under paths.metrics
PARAMS = ["evaluate.task", "evaluate.batch_size", "evaluate.max_new_tokens", "data.labels", "quantize.compute_dtype",
          "paths.quantized", "paths.tokenizer", "paths.tokenized", "paths.metrics"]


def main():
    quiet_known_noise()  # before bitsandbytes is imported
    cores.claim()  # its share of the cores, with other stages running at once
    from transformers import AutoTokenizer

    p = load_params(PARAMS)
    e = p.evaluate
    tokenizer = AutoTokenizer.from_pretrained(p.paths.tokenizer)
    test, train = load_split(p.paths.tokenized, "test"), load_split(p.paths.tokenized, "train")
    task = task_for(e.task, p.data.labels, train["completion"])
    max_new_tokens = answer_budget(e.max_new_tokens, train)
    model = load_model(p.paths.quantized, p.quantize.compute_dtype)

    sums, counts = example_losses(model, test, e.batch_size, desc="test loss")
    loss = loss_summary(sums, counts)
    stop_ids = load_format(p.paths.tokenized)["stop_token_ids"]
    answers = generate_answers(model, tokenizer, test, e.batch_size, max_new_tokens, stop_ids, desc="test answers")
    scores, rows = task.score(answers, test["completion"])
    metrics = dict(**task.record(), max_new_tokens=max_new_tokens, **model.compute_precision.record(),
                   test_loss=loss["loss"],
                   test_perplexity=loss["perplexity"], **{f"test_{k}": v for k, v in scores.items()})
    samples = metric_samples(task, rows, test["completion"], sums, counts, resampled(len(test)))
    for name, values in samples.items():  # the task's metrics that have an interval (not its extra figures)
        metrics[f"test_{name}_ci_low"], metrics[f"test_{name}_ci_high"] = interval(values)
    write_json(Path(p.paths.metrics) / BASE_ANSWERS, [dict(answer=a, loss_sum=round(s, 5), tokens=c, **row)
                                                      for a, row, s, c in zip(answers, rows, sums, counts)])
    write_json(Path(p.paths.metrics) / "evaluate_base.json", metrics)
    done(f"base model ({task.name}, up to {max_new_tokens} new tokens) on {len(test)} test examples: "
         f"test loss {metrics['test_loss']}, " + ", ".join(f"{k} {v}" for k, v in scores.items()))


if __name__ == "__main__":
    main()
