"""Score the quantized base model, without an adapter, on the test split.

A stage of its own so that changing LoRA or training params never recomputes it:
it depends on the quantized model, the tokenized test split and the two
`evaluate.*` keys it reads. Its answers are kept for the evaluate stage's table of
sample predictions.
"""

from pathlib import Path

from qlora.models import load_model
from qlora.outputs import log, write_json
from qlora.params import load_params
from qlora.scoring import completion_loss, generate_answers, task_metrics
from qlora.splits import load_split

BASE_ANSWERS = "base_answers.json"  # under paths.metrics
PARAMS = ["evaluate.batch_size", "evaluate.max_new_tokens",
          "paths.quantized", "paths.tokenizer", "paths.tokenized", "paths.metrics"]


def main():
    from transformers import AutoTokenizer

    p = load_params(PARAMS)
    e = p.evaluate
    tokenizer = AutoTokenizer.from_pretrained(p.paths.tokenizer)
    test = load_split(p.paths.tokenized, "test")
    model = load_model(p.paths.quantized)

    loss = completion_loss(model, test, e.batch_size)
    answers = generate_answers(model, tokenizer, test, e.batch_size, e.max_new_tokens)
    task, labels = task_metrics(answers, test["completion"])
    metrics = dict(test_loss=loss["loss"], test_perplexity=loss["perplexity"],
                   test_accuracy=task["accuracy"], test_macro_f1=task["macro_f1"])
    write_json(Path(p.paths.metrics) / BASE_ANSWERS, [dict(answer=a, label=x) for a, x in zip(answers, labels)])
    write_json(Path(p.paths.metrics) / "evaluate_base.json", metrics)
    log(f"base model: test loss {metrics['test_loss']}, accuracy {metrics['test_accuracy']}, "
        f"macro F1 {metrics['test_macro_f1']}")


if __name__ == "__main__":
    main()
