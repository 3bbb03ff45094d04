"""Held-out evaluation of the fine-tuned model, next to the base model's score.

Loss and perplexity on a train sample, val and test, measured the same way (the
train sample is as large as val, so the gap is not a sample-size artefact); the gap
between them shows overfitting. The task metric is the accuracy of the generated
answer on test, beside the base model's from the evaluate_base stage.
"""

import json
from pathlib import Path

from qlora.models import load_model
from qlora.outputs import log, write_json
from qlora.params import load_params
from qlora.scoring import accuracy, completion_loss, extract_label, generate_answers
from qlora.splits import load_split

PARAMS = ["evaluate", "paths.quantized", "paths.tokenizer", "paths.tokenized", "paths.adapter", "paths.metrics"]


def train_sample(train, size):
    """Evenly spaced train examples: deterministic, no seed to declare, spread over the split."""
    step = max(1, len(train) // size)
    return train.select(range(0, step * min(size, len(train)), step))


def main():
    from peft import PeftModel
    from transformers import AutoTokenizer

    p = load_params(PARAMS)
    e = p.evaluate
    tokenizer = AutoTokenizer.from_pretrained(p.paths.tokenizer)
    val, test = load_split(p.paths.tokenized, "val"), load_split(p.paths.tokenized, "test")
    train = train_sample(load_split(p.paths.tokenized, "train"), len(val))
    base_metrics = json.loads((Path(p.paths.metrics) / "evaluate_base.json").read_text())
    model = PeftModel.from_pretrained(load_model(p.paths.quantized), p.paths.adapter)

    losses = {name: completion_loss(model, split, e.batch_size) for name, split in
              (("train", train), ("val", val), ("test", test))}
    log("loss " + ", ".join(f"{name} {v['loss']}" for name, v in losses.items()))
    answers = generate_answers(model, tokenizer, test, e.batch_size, e.max_new_tokens)
    labels = sorted(set(test["completion"]))
    test_accuracy = accuracy([extract_label(a, labels) for a in answers], test["completion"])

    metrics = {f"{name}_{k}": v for name, result in losses.items() for k, v in result.items()}
    metrics.update(
        gap=round(losses["val"]["loss"] - losses["train"]["loss"], 4),  # > 0 and growing: overfitting
        test_accuracy=test_accuracy,
        base_test_accuracy=base_metrics["test_accuracy"],
        accuracy_gain=round(test_accuracy - base_metrics["test_accuracy"], 4),
        base_test_loss=base_metrics["test_loss"],
    )
    write_json(Path(p.paths.metrics) / "evaluate.json", metrics)
    log(f"test accuracy {test_accuracy} (base {base_metrics['test_accuracy']}), gap {metrics['gap']}")


if __name__ == "__main__":
    main()
