"""Scoring held-out data: completion-only loss, generated answers, task metrics.

Train, val and test are measured by the same function, so their losses compare.
"""

import math
import re
from pathlib import Path

import torch

from qlora.splits import IGNORE_INDEX

MODULES = Path(__file__).parent / "evaluate_modules"  # evaluate metrics that load offline


def pad(sequences, value, side="right"):
    width = max(map(len, sequences))
    rows = [[value] * (width - len(s)) + list(s) if side == "left" else list(s) + [value] * (width - len(s))
            for s in sequences]
    return torch.tensor(rows)


@torch.no_grad()
def completion_loss(model, dataset, batch_size):
    """Mean cross-entropy per completion token (the prompt is masked), and its perplexity."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        batch = dataset[start : start + batch_size]
        ids = pad(batch["input_ids"], 0).to(device)
        labels = pad(batch["labels"], IGNORE_INDEX).to(device)
        mask = pad([[1] * len(x) for x in batch["input_ids"]], 0).to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        targets = labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        total += loss.item()
        count += int((targets != IGNORE_INDEX).sum())
    loss = total / count
    return dict(loss=round(loss, 4), perplexity=round(math.exp(min(loss, 50)), 3))


@torch.no_grad()
def generate_answers(model, tokenizer, dataset, batch_size, max_new_tokens):
    """Greedy answers to each prompt (left-padded batches, KV cache on), decoded and stripped."""
    model.eval()
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers = []
    for start in range(0, len(dataset), batch_size):
        batch = dataset[start : start + batch_size]
        prompts = [ids[:n] for ids, n in zip(batch["input_ids"], batch["prompt_length"])]
        ids = pad(prompts, pad_id, side="left").to(device)
        mask = pad([[1] * len(x) for x in prompts], 0, side="left").to(device)
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=pad_id, use_cache=True,
        )
        answers += [a.strip() for a in tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)]
    return answers


def extract_label(answer, labels):
    """The first allowed label the answer names as a word ("It belongs to the perl section." -> perl).

    Lenient on purpose, so a chatty base model is not scored zero for its phrasing; an answer
    naming no label stays as it is and counts as wrong.
    """
    found = [(m.start(), label) for label in labels
             for m in [re.search(rf"(?<![\w-]){re.escape(label)}(?![\w-])", answer, flags=re.IGNORECASE)] if m]
    return min(found)[1] if found else answer


def task_metrics(answers, references):
    """Accuracy and macro F1 of generated answers against the expected labels, through `evaluate`
    modules that load from this project, offline. Each answer is first reduced to the label it names
    (`extract_label`); one naming no label counts as wrong for its expected class. Macro F1 averages
    over the expected classes, so a model that answers only the majority class scores low."""
    import evaluate

    classes = sorted(set(references))
    predictions = [extract_label(a, classes) for a in answers]
    index = {label: i for i, label in enumerate(classes + sorted(set(predictions) - set(classes)))}
    pred, ref = [index[p] for p in predictions], [index[r] for r in references]
    accuracy = evaluate.load(str(MODULES / "accuracy")).compute(predictions=pred, references=ref)["accuracy"]
    f1 = evaluate.load(str(MODULES / "f1")).compute(predictions=pred, references=ref,
                                                      labels=list(range(len(classes))), average="macro")["f1"]
    return dict(accuracy=round(accuracy, 4), macro_f1=round(f1, 4)), predictions
