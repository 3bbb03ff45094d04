"""The export check's shortcut: one teacher-forced pass over another model's answers decides which
greedy answers are the same, and generation runs only from where they differ (qlora/scoring.py).
It must give, answer by answer, what generating every answer from scratch gives."""

import copy

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

import qlora.scoring
from qlora.scoring import (SHARED_PREFIX_MIN, example_losses, first_divergence, generate_answer_ids,
                           greedy_answers_like)
from qlora.splits import IGNORE_INDEX

BUDGET, BATCH = 10, 4


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    # Every prompt starts with the same instruction, as a system prompt and a template make them, so that
    # the scoring passes compute it once (qlora.scoring.shared_prefix).
    instruction = torch.randint(100, 5000, (SHARED_PREFIX_MIN + 4,), generator=generator).tolist()
    prompts = [instruction + torch.randint(100, 5000, (int(n),), generator=generator).tolist()
               for n in torch.randint(4, 12, (12,), generator=generator)]
    prompts_only = Dataset.from_dict(dict(input_ids=prompts, prompt_length=[len(p) for p in prompts]))
    # A stop token this model does produce: the 4th token of its first answer, so some answers end early.
    free = generate_answer_ids(model, tokenizer, prompts_only, BATCH, BUDGET, stop_ids=[])
    # Half the references are the model's own answers, so that the check shares the loss pass there.
    completions = [a if i % 2 else torch.randint(100, 5000, (6,), generator=generator).tolist()
                   for i, a in enumerate(free)]
    dataset = Dataset.from_dict(dict(input_ids=[p + c for p, c in zip(prompts, completions)],
                                     labels=[[IGNORE_INDEX] * len(p) + c for p, c in zip(prompts, completions)],
                                     prompt_length=[len(p) for p in prompts]))
    return tokenizer, model, dataset, [free[0][3]]


def perturbed(model, scale):
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for weight in other.parameters():
            weight.add_(scale * weight.std() * torch.randn(weight.shape, generator=generator))
    return other


def test_an_answer_is_the_same_exactly_when_every_argmax_matches_its_stop_token_included(setup):
    tokenizer, model, dataset, _ = setup
    own = generate_answer_ids(model, tokenizer, dataset, BATCH, BUDGET, stop_ids=[])
    assert own == generate_answer_ids(model, tokenizer, dataset, 1, BUDGET, stop_ids=[]), "batched by length, in order"
    assert first_divergence(model, dataset, own, BATCH) == [None] * len(own)
    # Its answers cut at k and ended by a stop token: where the model goes on instead, they differ at k.
    eos, cuts = tokenizer.eos_token_id, [1 + i % (BUDGET - 1) for i in range(len(own))]
    stopped = [ids[:k] + [eos] for ids, k in zip(own, cuts)]
    assert first_divergence(model, dataset, stopped, BATCH) == [None if ids[k] == eos else k
                                                              for ids, k in zip(own, cuts)]


def test_the_teacher_forced_check_gives_the_answers_full_generation_gives(setup):
    tokenizer, model, dataset, stop_ids = setup
    reference = generate_answer_ids(model, tokenizer, dataset, BATCH, BUDGET, stop_ids)
    assert any(len(a) < BUDGET and a[-1] in stop_ids for a in reference), "some answers end at a stop token"
    seen = set()
    for scale in (0.02, 0.05, 0.1, 0.3):
        other = perturbed(model, scale)
        generated = generate_answer_ids(other, tokenizer, dataset, BATCH, BUDGET, stop_ids)
        answers, firsts, losses = greedy_answers_like(other, tokenizer, dataset, reference, BATCH, BUDGET, stop_ids)
        assert answers == generated, f"scale {scale}: the shortcut's answers are not generation's"
        assert losses == example_losses(other, dataset, BATCH)
        assert [j is None for j in firsts] == [g == r for g, r in zip(generated, reference)]
        seen |= {"same" if j is None else "first token" if j == 0 else "mid-answer" for j in firsts}
    assert seen == {"same", "first token", "mid-answer"}, seen


def test_the_shared_prompt_prefix_changes_no_loss_and_no_check(setup, monkeypatch):
    """The passes run the prompts' common start once and the rest of each example after its cache: the
    losses and the teacher-forced check are those of running every example whole (float32: to rounding),
    for the model itself (every answer the same) and a perturbed one (answers that differ)."""
    tokenizer, model, dataset, _ = setup
    own = generate_answer_ids(model, tokenizer, dataset, BATCH, BUDGET, stop_ids=[])
    models = [model, perturbed(model, 0.03)]
    assert qlora.scoring.shared_prefix(model, dataset["input_ids"], 100, "cpu")[0] == SHARED_PREFIX_MIN + 4
    shared = [(example_losses(m, dataset, BATCH), first_divergence(m, dataset, own, BATCH)) for m in models]
    monkeypatch.setattr(qlora.scoring, "SHARED_PREFIX_MIN", 10**9)
    whole = [(example_losses(m, dataset, BATCH), first_divergence(m, dataset, own, BATCH)) for m in models]
    for ((sums, counts), firsts), ((whole_sums, whole_counts), whole_firsts) in zip(shared, whole):
        assert counts == whole_counts and firsts == whole_firsts
        assert sums == pytest.approx(whole_sums, abs=1e-4)
    assert shared[0][1] == [None] * len(own) and any(j is not None for j in shared[1][1])
