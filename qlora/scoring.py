"""Scoring held-out data: completion-only loss, generated answers, task metrics.

Train, val and test are measured by the same function, so their losses compare.
"""

import math
import re
import unicodedata
from pathlib import Path

import torch

from qlora.console import progress
from qlora.cores import rebalance
from qlora.splits import IGNORE_INDEX

MODULES = Path(__file__).parent / "evaluate_modules"  # evaluate metrics that load offline


def pad(sequences, value, side="right"):
    width = max(map(len, sequences))
    rows = [[value] * (width - len(s)) + list(s) if side == "left" else list(s) + [value] * (width - len(s))
            for s in sequences]
    return torch.tensor(rows)


@torch.no_grad()
def example_losses(model, dataset, batch_size, desc=None):
    """Per example: the summed cross-entropy of its completion tokens (the prompt is masked), and how
    many tokens that is. `desc` names the progress bar (none without)."""
    model.eval()
    device = next(model.parameters()).device
    sums, counts = [], []
    bar = progress(len(dataset), desc, unit="ex")
    for start in range(0, len(dataset), batch_size):
        rebalance()
        batch = dataset[start : start + batch_size]
        ids = pad(batch["input_ids"], 0).to(device)
        labels = pad(batch["labels"], IGNORE_INDEX).to(device)
        mask = pad([[1] * len(x) for x in batch["input_ids"]], 0).to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        targets = labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
        )
        sums += loss.sum(dim=1).tolist()
        counts += (targets != IGNORE_INDEX).sum(dim=1).tolist()
        bar.update(len(ids))
    bar.close()
    return sums, counts


def loss_summary(sums, counts):
    """Mean cross-entropy per completion token over the examples, and its perplexity."""
    loss = sum(sums) / sum(counts)
    return dict(loss=round(loss, 4), perplexity=round(math.exp(min(loss, 50)), 3))


def completion_loss(model, dataset, batch_size, desc=None):
    """Mean cross-entropy per completion token (the prompt is masked), and its perplexity."""
    return loss_summary(*example_losses(model, dataset, batch_size, desc))


@torch.no_grad()
def generate_answers(model, tokenizer, dataset, batch_size, max_new_tokens, stop_ids, desc=None):
    """Greedy answers to each prompt (left-padded batches, KV cache on), decoded and stripped. Generation
    stops at `stop_ids`, the tokens that end an answer in the tokenized format (qlora.splits.load_format).
    `desc` names the progress bar (none without)."""
    model.eval()
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers = []
    bar = progress(len(dataset), desc, unit="ex")
    for start in range(0, len(dataset), batch_size):
        rebalance()
        batch = dataset[start : start + batch_size]
        prompts = [ids[:n] for ids, n in zip(batch["input_ids"], batch["prompt_length"])]
        ids = pad(prompts, pad_id, side="left").to(device)
        mask = pad([[1] * len(x) for x in prompts], 0, side="left").to(device)
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=pad_id, eos_token_id=list(stop_ids), use_cache=True,
        )
        answers += [a.strip() for a in tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)]
        bar.update(len(prompts))
    bar.close()
    return answers


TASKS = ("classification", "generation")
PRIMARY = {"classification": "accuracy", "generation": "chrf"}  # the metric the export check holds to
PER_EXAMPLE = {"accuracy": "correct", "chrf": "chrf"}  # its score of one answer, in predictions.json


def resolve_task(task, labels):
    """evaluate.task with `auto` resolved: classification when data.labels lists the answers."""
    if task != "auto":
        return task
    return "classification" if labels else "generation"


def answer_budget(setting, train):
    """evaluate.max_new_tokens with `auto` resolved: the longest answer of the train split in tokens
    (its end-of-turn token included), plus a quarter for room, so that generation can finish every
    answer the model was taught without paying for a chatty model's whole paragraph."""
    if setting != "auto":
        return setting
    longest = max(sum(1 for t in labels if t != IGNORE_INDEX) for labels in train["labels"])
    return max(4, math.ceil(1.25 * longest))


def _casefold_strip(text):
    """Case folded, with surrounding whitespace and punctuation removed."""
    return re.sub(r"^[\W_]+|[\W_]+$", "", str(text).casefold())


def _names(label, text):
    """Whether `text` names `label` as a word of its own (not `perl` in `libperl5` or `perl-doc`)."""
    return re.search(rf"(?<![\w-]){re.escape(label)}(?![\w-])", text) is not None


def extract_label(answer, labels):
    """The one allowed label an answer gives, or None.

    Strict on purpose: an answer counts only if, ignoring case and surrounding whitespace and
    punctuation, it *is* an allowed label, or begins with exactly one and names no other. So
    "Perl." and "perl, since it is a Perl module" give perl; an echoed list of the labels, "perl or
    python", "libperl5" and "The section is perl" give none (a model asked for a label must answer with it).
    """
    text = " ".join(str(answer).casefold().split())
    stripped = _casefold_strip(text)
    folded = {label.casefold(): label for label in labels}
    if text in folded or stripped in folded:
        return folded.get(text) or folded[stripped]
    starts = [f for f in folded if stripped.startswith(f) and not re.match(r"[\w-]", stripped[len(f):len(f) + 1])]
    if not starts:
        return None
    first = max(starts, key=len)  # "python 3" over "python" when both are labels
    rest = stripped[len(first):]
    if any(_names(other, rest) for other in folded if other != first):
        return None
    return folded[first]


def normalize_text(text):
    """Case folded, punctuation removed, whitespace collapsed: what exact match compares."""
    return " ".join("".join(" " if unicodedata.category(c).startswith("P") else c
                            for c in str(text).casefold()).split())


def classification_scores(answers, references, labels):
    """Per answer: the label it gives (or None) and whether it is the expected one; overall: accuracy,
    macro F1 over the expected classes (so a model answering only the majority class scores low) and
    `answered`, the share of answers that give exactly one label. Through `evaluate` modules that
    load from this project, offline."""
    import evaluate

    classes = sorted(set(references))
    allowed = sorted(set(labels) | set(classes))
    given = [extract_label(a, allowed) for a in answers]
    index = {label: i for i, label in enumerate(classes)}
    other = len(classes)  # no label, or one that is not expected anywhere in test
    pred, ref = [index.get(g, other) for g in given], [index[r] for r in references]
    accuracy = evaluate.load(str(MODULES / "accuracy")).compute(predictions=pred, references=ref)["accuracy"]
    f1 = evaluate.load(str(MODULES / "f1")).compute(predictions=pred, references=ref,
                                                      labels=list(range(len(classes))), average="macro")["f1"]
    rows = [dict(label=g, correct=int(g == r)) for g, r in zip(given, references)]
    metrics = dict(accuracy=accuracy, macro_f1=f1, answered=sum(g is not None for g in given) / len(given))
    return {k: round(v, 4) for k, v in metrics.items()}, rows


def generation_scores(answers, references):
    """Per answer and averaged: exact match after `normalize_text`, chrF (sacrebleu's sentence chrF,
    character n-grams, scaled to 0-1) and ROUGE-L F1 (rouge-score, longest common word subsequence);
    `answered` is the share of non-empty answers. An empty answer scores 0 on all three; an echoed
    prompt or a chatty answer that contains the reference scores partial chrF and ROUGE-L, no exact match."""
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import CHRF

    chrf, rouge = CHRF(), rouge_scorer.RougeScorer(["rougeL"])
    rows = [dict(exact_match=int(normalize_text(a) == normalize_text(r)),
                 chrf=round(chrf.sentence_score(a, [r]).score / 100, 4),
                 rouge_l=round(rouge.score(r, a)["rougeL"].fmeasure, 4))
            for a, r in zip(answers, references)]
    metrics = {k: sum(row[k] for row in rows) / len(rows) for k in ("exact_match", "chrf", "rouge_l")}
    metrics["answered"] = sum(bool(a.strip()) for a in answers) / len(answers)
    return {k: round(v, 4) for k, v in metrics.items()}, rows


def task_scores(task, answers, references, labels=()):
    """(metrics over the split, one dict of scores per answer) for a resolved task."""
    if task == "classification":
        return classification_scores(answers, references, labels)
    return generation_scores(answers, references)


def paired_interval(before, after, resamples=None, seed=None):
    """95% percentile-bootstrap interval of mean(after - before) over examples scored twice, the same
    resampled examples for both (paired): how far the difference could be luck of the test split."""
    import numpy as np

    deltas = np.asarray(after, dtype=float) - np.asarray(before, dtype=float)
    idx = resampled(len(deltas), resamples or RESAMPLES, SEED if seed is None else seed)
    return interval(deltas[idx].mean(axis=1))

RESAMPLES, SEED = 2000, 0  # the bootstrap over test examples: how many resamples, and a fixed seed


def resampled(n, resamples=RESAMPLES, seed=SEED):
    """Indices of `resamples` bootstrap resamples of n examples (drawn with replacement), fixed by `seed`."""
    import numpy as np

    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def metric_samples(task, answers, rows, references, loss_sums, loss_counts, idx):
    """Each test metric recomputed on each resample `idx` (resamples x examples): {metric: array}.
    Means of per-example scores for accuracy, answered, exact match, chrF and ROUGE-L; macro F1
    from each resample's own counts, as the f1 module computes it; the loss per token as the ratio of
    the resampled sums (examples of more tokens weigh more, as in the loss itself)."""
    import numpy as np

    def mean_of(values):
        return np.asarray(values, dtype=float)[idx].mean(axis=1)

    out = {"loss": np.asarray(loss_sums)[idx].sum(axis=1) / np.asarray(loss_counts)[idx].sum(axis=1)}
    if task == "classification":
        classes = sorted(set(references))
        index = {label: i for i, label in enumerate(classes)}
        pred = np.array([index.get(r["label"], len(classes)) for r in rows])[idx]
        ref = np.array([index[r] for r in references])[idx]
        f1 = []
        for c in range(len(classes)):
            tp = ((pred == c) & (ref == c)).sum(axis=1)
            wrong = ((pred == c) != (ref == c)).sum(axis=1)  # false positives and false negatives
            f1.append(np.divide(2 * tp, 2 * tp + wrong, out=np.zeros(len(idx)), where=2 * tp + wrong > 0))
        out.update(accuracy=mean_of([r["correct"] for r in rows]), macro_f1=np.mean(f1, axis=0),
                   answered=mean_of([r["label"] is not None for r in rows]))
    else:
        out.update({k: mean_of([r[k] for r in rows]) for k in ("exact_match", "chrf", "rouge_l")},
                   answered=mean_of([bool(a.strip()) for a in answers]))
    return out


def interval(samples):
    """The 95% percentile interval of bootstrap samples, rounded as the metrics are."""
    import numpy as np

    return round(float(np.quantile(samples, 0.025)), 4), round(float(np.quantile(samples, 0.975)), 4)
