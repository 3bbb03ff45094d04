"""Scoring held-out data: completion-only loss, generated answers, task metrics.

Train, val and test are measured by the same function, so their losses compare.
"""

import copy
import inspect
import math
import os

import torch

from qlora.console import progress
from qlora.cores import rebalance
from qlora.splits import IGNORE_INDEX



def pad(sequences, value, side="right"):
    width = max(map(len, sequences))
    rows = [[value] * (width - len(s)) + list(s) if side == "left" else list(s) + [value] * (width - len(s))
            for s in sequences]
    return torch.tensor(rows)


def by_length(lengths, batch_size):
    """Batches of example indices, longest first, so that each batch pads to little more than its own
    longest example; the callers put every result back in the dataset's order."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def auto_batch_size(setting, model, longest, new_tokens=0):
    """evaluate.batch_size with `auto` resolved for one pass over examples of at most `longest` tokens
    (plus `new_tokens` generated): as many as half the memory at hand holds (the GPU's free memory, or
    the machine's available memory on CPU), counting per token the logits over the vocabulary (in the
    model's dtype, in float32, and the loss's log-softmax) plus the KV cache and a layer's activations,
    capped at 64 on a GPU and 16 on CPU (where larger batches do not run faster)."""
    if setting != "auto":
        return setting
    c = model.config.get_text_config()
    heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    per_token = (10 * c.vocab_size + 2 * 2 * c.num_hidden_layers * heads * head_dim
                 + 8 * (c.hidden_size + getattr(c, "intermediate_size", 4 * c.hidden_size)))
    device = next(model.parameters()).device
    if device.type == "cuda":
        free, cap = torch.cuda.mem_get_info(device)[0], 64
    else:
        import psutil

        free, cap = psutil.virtual_memory().available, 16
    return max(1, min(cap, int(free / 2 // (per_token * (longest + new_tokens)))))


# logits_to_keep as a tensor of positions, not a count: transformers slices a count as a strided view of the
# hidden states, and on CPU a strided input can send the output layer's bf16 matmul down a slow path (seen with
# Gemma 3's 262,144-token head under peft: prefill and loss passes many times slower); positions index a copy.
LAST_POSITION = torch.tensor([-1])
SHARED_PREFIX_MIN = 8  # tokens every example starts with (system prompt, instruction): fewer are not worth a cache


def _accepts(model, name):
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return name in inspect.signature(inner.forward).parameters


@torch.no_grad()
def shared_prefix(model, seqs, limit, device):
    """The tokens every sequence starts with (at most `limit`), and the model's KV cache of them, computed
    once and repeated over each batch, so that a pass computes the common system prompt and instruction
    once instead of once per example; (0, None) when they are fewer than SHARED_PREFIX_MIN."""
    n = min(len(os.path.commonprefix([list(s) for s in seqs])), limit) if seqs else 0
    if n < SHARED_PREFIX_MIN or not _accepts(model, "past_key_values"):
        return 0, None
    return n, model(input_ids=torch.tensor([list(seqs[0][:n])], device=device), use_cache=True).past_key_values


def _tail_logits(model, seqs, keep, device, prefix=(0, None)):
    """Float32 logits of the last `keep` positions of each sequence. Left-padded, so that every sequence
    ends at the last position, with position ids counted from each one's first token, so that padding
    moves none; the output layer runs on those positions only (transformers' logits_to_keep), which is
    what a loss over the answer and a check of it read. A model without logits_to_keep gets them cut
    from the whole. With `prefix` (shared_prefix: its length and cache), only what follows it runs."""
    n, cache = prefix
    suffixes = [list(x)[n:] for x in seqs]
    ids = pad(suffixes, 0, side="left").to(device)
    mask = pad([[1] * len(x) for x in suffixes], 0, side="left").to(device)
    positions = n + (mask.cumsum(-1) - 1).clamp(min=0)
    extra = {}
    if cache is not None:
        cache = copy.deepcopy(cache)
        cache.batch_repeat_interleave(len(seqs))
        extra = dict(past_key_values=cache, use_cache=True)
        mask = torch.cat([torch.ones(len(seqs), n, dtype=mask.dtype, device=device), mask], dim=1)
    if _accepts(model, "logits_to_keep"):  # as positions: see LAST_POSITION
        kept = torch.arange(ids.shape[1] - keep, ids.shape[1], device=device)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=kept, **extra).logits
    else:
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, **extra).logits[:, -keep:]
    return out.float()


def _diverges(greedy, first, answer):
    """The first answer position where the greedy next token (`greedy`: the argmax at each position, of
    which `first` predicts the answer's first token) is not the answer's own, or None."""
    predicted = greedy[first : first + len(answer)]
    return next((i for i, (p, t) in enumerate(zip(predicted, answer)) if p != t), None)


@torch.no_grad()
def example_losses(model, dataset, batch_size, desc=None):
    """Per example: the summed cross-entropy of its completion tokens (the prompt is masked), and how
    many tokens that is. `desc` names the progress bar (none without). `batch_size` may be auto."""
    sums, counts, _ = losses_and_divergence(model, dataset, None, batch_size, desc)
    return sums, counts


@torch.no_grad()
def losses_and_divergence(model, dataset, answer_ids, batch_size, desc=None):
    """example_losses, and with `answer_ids` (another model's greedy answers, stop tokens included) each
    one's first_divergence, from one forward pass where they can share it: an answer that is the start
    of the example's own completion is checked on the logits of the loss pass (a causal model's logits
    at a position depend on the tokens up to it only); the other answers get a pass of their own."""
    model.eval()
    device = next(model.parameters()).device
    n = len(dataset)
    rows = dataset.select_columns(["input_ids", "labels", "prompt_length"])[:]
    seqs, labels, lengths = rows["input_ids"], rows["labels"], rows["prompt_length"]
    # Where each example's loss starts: its first label (the prompt is masked, so never before prompt_length).
    starts = [min(lengths[i], next((j for j, t in enumerate(labels[i]) if t != IGNORE_INDEX), lengths[i]))
              for i in range(n)]
    size = auto_batch_size(batch_size, model, max(map(len, seqs)))
    prefix = shared_prefix(model, seqs, min(starts) - 1, device)  # each prediction made after it
    sums, counts, firsts = [None] * n, [None] * n, [None] * n
    shared = [answer_ids is not None and list(a) == seqs[i][lengths[i] : lengths[i] + len(a)]
              for i, a in enumerate(answer_ids or [None] * n)]
    bar = progress(n, desc, unit="ex")
    for batch in by_length([len(s) for s in seqs], size):
        rebalance()
        keep = max(2, max(len(seqs[i]) - starts[i] + 1 for i in batch))  # from the position before the first label
        logits = _tail_logits(model, [seqs[i] for i in batch], keep, device, prefix)
        targets = pad([labels[i] for i in batch], IGNORE_INDEX, side="left")[:, -(keep - 1):].to(device)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE_INDEX,
                                                 reduction="none")
        for i, s, c in zip(batch, loss.sum(dim=1).tolist(), (targets != IGNORE_INDEX).sum(dim=1).tolist()):
            sums[i], counts[i] = s, c
        greedy = logits.argmax(-1).tolist()
        for i, row in zip(batch, greedy):
            if shared[i]:  # kept position k - len + j is the sequence's position j
                firsts[i] = _diverges(row, keep - len(seqs[i]) + lengths[i] - 1, answer_ids[i])
        bar.update(len(batch))
    bar.close()
    rest = [i for i in range(n) if answer_ids is not None and not shared[i]]
    if rest:
        for i, j in zip(rest, first_divergence(model, dataset.select(rest), [answer_ids[i] for i in rest], size)):
            firsts[i] = j
    return sums, counts, (firsts if answer_ids is not None else None)


def loss_summary(sums, counts):
    """Mean cross-entropy per completion token over the examples, and its perplexity."""
    loss = sum(sums) / sum(counts)
    return dict(loss=round(loss, 4), perplexity=round(math.exp(min(loss, 50)), 3))


def completion_loss(model, dataset, batch_size, desc=None):
    """Mean cross-entropy per completion token (the prompt is masked), and its perplexity."""
    return loss_summary(*example_losses(model, dataset, batch_size, desc))


def cut_at_stop(ids, stop_ids, budget=None):
    """A generated answer's ids up to and including its first stop token, at most `budget` of them."""
    ids = list(ids)[:budget]
    return next((ids[: i + 1] for i, t in enumerate(ids) if t in stop_ids), ids)


@torch.no_grad()
def generate_answer_ids(model, tokenizer, dataset, batch_size, max_new_tokens, stop_ids, desc=None, prefixes=None):
    """Greedy answers to each prompt as token ids (left-padded batches of similar length, KV cache on),
    each up to and including the first of `stop_ids`, the tokens that end an answer in the tokenized
    format (qlora.splits.load_format), and at most `max_new_tokens` long. With `prefixes` (per example,
    ids the answer starts with), generation continues from them and the answer includes them. `desc`
    names the progress bar (none without). `batch_size` may be auto."""
    model.eval()
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prefixes = prefixes or [[] for _ in range(len(dataset))]
    rows = dataset.select_columns(["input_ids", "prompt_length"])[:]
    prompts = [ids[:n] + list(a) for ids, n, a in zip(rows["input_ids"], rows["prompt_length"], prefixes)]
    size = auto_batch_size(batch_size, model, max(map(len, prompts), default=1), max_new_tokens)
    answers = [None] * len(prompts)
    bar = progress(len(prompts), desc, unit="ex")
    for batch in by_length([len(x) for x in prompts], size):
        rebalance()
        ids = pad([prompts[i] for i in batch], pad_id, side="left").to(device)
        mask = pad([[1] * len(prompts[i]) for i in batch], 0, side="left").to(device)
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens - min(len(prefixes[i]) for i in batch),
            do_sample=False, pad_token_id=pad_id, eos_token_id=list(stop_ids), use_cache=True,
            **({"logits_to_keep": LAST_POSITION.to(device)} if _accepts(model, "logits_to_keep") else {}),
        )  # a greedy answer does not depend on how long the others in its batch run: each is cut to its own budget
        for i, row in zip(batch, out[:, ids.shape[1] :].tolist()):
            answers[i] = cut_at_stop(list(prefixes[i]) + row, stop_ids, max_new_tokens)
        bar.update(len(batch))
    bar.close()
    return answers


def decode_answers(tokenizer, answer_ids):
    """Answers as text: decoded without special tokens, stripped."""
    return [a.strip() for a in tokenizer.batch_decode(answer_ids, skip_special_tokens=True)]


def generate_answers(model, tokenizer, dataset, batch_size, max_new_tokens, stop_ids, desc=None):
    """Greedy answers to each prompt as text (generate_answer_ids, decoded)."""
    return decode_answers(tokenizer, generate_answer_ids(model, tokenizer, dataset, batch_size, max_new_tokens,
                                                         stop_ids, desc))


@torch.no_grad()
def first_divergence(model, dataset, answer_ids, batch_size, desc=None):
    """Per example, the first position of `answer_ids` (another model's greedy answer, its stop token
    included) where this model's greedy next token differs, or None where it never does, which is
    exactly when this model's greedy answer is the same. One forward pass over each prompt and answer
    (teacher forcing): the argmax at every answer position against the answer's own next token."""
    model.eval()
    device = next(model.parameters()).device
    rows = dataset.select_columns(["input_ids", "prompt_length"])[:]
    seqs = [ids[:n] + list(a) for ids, n, a in zip(rows["input_ids"], rows["prompt_length"], answer_ids)]
    firsts = [None] * len(seqs)
    prefix = shared_prefix(model, seqs, min(rows["prompt_length"], default=1) - 1, device)
    bar = progress(len(seqs), desc, unit="ex")
    for batch in by_length([len(x) for x in seqs], auto_batch_size(batch_size, model, max(map(len, seqs), default=1))):
        rebalance()
        keep = max(len(answer_ids[i]) for i in batch) + 1  # from the position before each answer
        greedy = _tail_logits(model, [seqs[i] for i in batch], keep, device, prefix).argmax(-1).tolist()
        for i, row in zip(batch, greedy):
            firsts[i] = _diverges(row, keep - len(answer_ids[i]) - 1, answer_ids[i])
        bar.update(len(batch))
    bar.close()
    return firsts


def greedy_answers_like(model, tokenizer, dataset, answer_ids, batch_size, max_new_tokens, stop_ids, desc=None):
    """This model's greedy answer ids, decided against another model's (`answer_ids`), with its completion
    losses: one teacher-forced pass finds where the answers are the same (losses_and_divergence, which
    shares the loss pass where it can); generation runs only for the others, from the first position that
    differs. Returns the answers, each one's first differing position (None: the same), and the loss sums
    and token counts of example_losses."""
    sums, counts, firsts = losses_and_divergence(model, dataset, answer_ids, batch_size, desc=desc and f"{desc}, checked")
    differ = [i for i, j in enumerate(firsts) if j is not None]
    answers = [list(a) for a in answer_ids]
    if differ:
        regenerated = generate_answer_ids(model, tokenizer, dataset.select(differ), batch_size, max_new_tokens,
                                          stop_ids, desc=desc and f"{desc}, regenerated",
                                          prefixes=[answer_ids[i][: firsts[i]] for i in differ])
        for i, ids in zip(differ, regenerated):
            answers[i] = ids
    return answers, firsts, (sums, counts)


def answer_budget(setting, train):
    """evaluate.max_new_tokens with `auto` resolved: the longest answer of the train split in tokens
    (its end-of-turn token included), plus a quarter for room, so that generation can finish every
    answer the model was taught without paying for a chatty model's whole paragraph."""
    if setting != "auto":
        return setting
    longest = max(sum(1 for t in labels if t != IGNORE_INDEX) for labels in train["labels"])
    return max(4, math.ceil(1.25 * longest))


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


def metric_samples(task, rows, references, loss_sums, loss_counts, idx):
    """Each test metric recomputed on each resample `idx` (resamples x examples): {metric: array}. The
    task's metrics from its per-example rows (qlora.tasks.Task.samples); the loss per token as the ratio of
    the resampled sums (examples of more tokens weigh more, as in the loss itself)."""
    import numpy as np

    loss = np.asarray(loss_sums)[idx].sum(axis=1) / np.asarray(loss_counts)[idx].sum(axis=1)
    return {"loss": loss, **task.samples(rows, references, idx)}


def interval(samples):
    """The 95% percentile interval of bootstrap samples, rounded as the metrics are; over the resamples where
    the metric is defined (R² or a correlation is not where every resampled reference is the same), and
    (None, None) where it never is."""
    import numpy as np

    samples = np.asarray(samples, dtype=float)
    samples = samples[np.isfinite(samples)]
    if not samples.size:
        return None, None
    return round(float(np.quantile(samples, 0.025)), 4), round(float(np.quantile(samples, 0.975)), 4)
