"""Score the quantized base model, without an adapter, on the test split.

A stage of its own so that changing LoRA or training params never recomputes it:
it depends on the quantized model, the tokenized test split and `evaluate.*` only.
"""

from pathlib import Path

from qlora.models import load_model
from qlora.outputs import log, write_json
from qlora.params import load_params
from qlora.scoring import accuracy, completion_loss, extract_label, generate_answers
from qlora.splits import load_split

PARAMS = ["evaluate", "paths.quantized", "paths.tokenizer", "paths.tokenized", "paths.metrics"]


def main():
    from transformers import AutoTokenizer

    p = load_params(PARAMS)
    e = p.evaluate
    tokenizer = AutoTokenizer.from_pretrained(p.paths.tokenizer)
    test = load_split(p.paths.tokenized, "test")
    model = load_model(p.paths.quantized)

    loss = completion_loss(model, test, e.batch_size)
    answers = generate_answers(model, tokenizer, test, e.batch_size, e.max_new_tokens)
    labels = sorted(set(test["completion"]))
    metrics = dict(test_loss=loss["loss"], test_perplexity=loss["perplexity"],
                   test_accuracy=accuracy([extract_label(a, labels) for a in answers], test["completion"]))
    write_json(Path(p.paths.metrics) / "evaluate_base.json", metrics)
    log(f"base model: test loss {metrics['test_loss']}, accuracy {metrics['test_accuracy']}")


if __name__ == "__main__":
    main()
