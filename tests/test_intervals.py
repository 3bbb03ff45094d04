"""The bootstrap intervals of the test metrics: deterministic for a seed, covering the true value at
about the nominal rate, narrower when paired, and equal to the metric itself on the identity resample."""

import numpy as np
import pytest

from qlora.scoring import interval, loss_summary, metric_samples, paired_interval, resampled
from qlora.tasks import Classification, Generation

LABELS = ["fonts", "doc", "python", "perl"]


def classification_case(seed, n=96):
    rng = np.random.default_rng(seed)
    references = list(rng.choice(LABELS, size=n))
    answers = [r if rng.random() < 0.8 else rng.choice(LABELS + ["I think it is a font", ""]) for r in references]
    sums, counts = list(rng.gamma(2.0, 0.2, size=n) * 3), [3] * n
    scores, rows = Classification(LABELS).score(answers, references)
    return answers, rows, references, sums, counts, scores


def test_on_the_identity_resample_every_metric_is_the_metric_itself():
    answers, rows, references, sums, counts, scores = classification_case(0)
    same = metric_samples(Classification(LABELS), rows, references, sums, counts, np.arange(96)[None, :])
    for name in Classification.metrics:
        assert same[name][0] == pytest.approx(scores[name], abs=1e-4), name  # macro F1 counted as the f1 module does
    assert same["loss"][0] == pytest.approx(loss_summary(sums, counts)["loss"], abs=1e-4)
    gen_answers = ["a cat sat", "", "the dog", "on the mat"]
    gen_scores, gen_rows = Generation().score(gen_answers, ["a cat sat", "a bird", "the dog ran", "on a mat"])
    same = metric_samples(Generation(), gen_rows, None, [1.0] * 4, [2] * 4, np.arange(4)[None, :])
    for name in Generation.metrics:
        assert same[name][0] == pytest.approx(gen_scores[name], abs=1e-4), name


def test_the_bootstrap_is_deterministic_for_a_seed():
    answers, rows, references, sums, counts, _ = classification_case(1)

    def intervals(seed):
        samples = metric_samples(Classification(LABELS), rows, references, sums, counts, resampled(96, seed=seed))
        return {name: interval(values) for name, values in samples.items()}

    first = intervals(0)
    assert intervals(0) == first
    assert intervals(1) != first, "another seed draws other resamples"
    assert all(low < high for low, high in first.values())


def test_the_interval_covers_the_true_accuracy_at_about_the_nominal_rate():
    # 200 synthetic test sets of 96 answers, each right with probability 0.8: a 95% interval should
    # contain 0.8 for about 95% of them.
    rng = np.random.default_rng(42)
    covered = 0
    for trial in range(200):
        correct = rng.random(96) < 0.8
        low, high = interval(correct[resampled(96, resamples=1000, seed=trial)].mean(axis=1))
        covered += low <= 0.8 <= high
    assert 0.90 <= covered / 200 <= 0.98, covered


def test_a_paired_interval_is_narrower_than_an_unpaired_one_on_correlated_answers():
    rng = np.random.default_rng(3)
    base = (rng.random(96) < 0.6).astype(float)
    fine = base.copy()
    fine[rng.choice(96, 8, replace=False)] = 1  # mostly the same answers, a few more right
    paired = paired_interval(base, fine)
    unpaired = interval(fine[resampled(96, seed=1)].mean(axis=1) - base[resampled(96, seed=2)].mean(axis=1))
    assert paired[1] - paired[0] < 0.5 * (unpaired[1] - unpaired[0])
    assert paired[0] > 0 >= unpaired[0], "the paired interval tells the gain from noise, the unpaired one cannot"


def predictions(correct, loss):
    """predictions.json rows of a classification run: right where `correct`, a given loss per example."""
    return [dict(input=f"package {i}", expected="perl", answer="perl" if ok else "python",
                 label="perl" if ok else "python", correct=int(ok), loss_sum=loss, tokens=2)
            for i, ok in enumerate(correct)]


def verdicts(ref, run):
    from tools.report import paired_comparison

    return {name: (diff, verdict) for name, _, _, diff, _, _, verdict in paired_comparison(ref, run)}


def test_a_paired_comparison_tells_better_from_within_noise():
    rng = np.random.default_rng(5)
    base = rng.random(96) < 0.7
    one_more = base.copy()
    one_more[np.flatnonzero(~base)[0]] = True  # a single answer more right: luck of the split
    many_more = base | (rng.random(96) < 0.6)  # about 17 more right, none worse

    small = verdicts(predictions(base, 0.3), predictions(one_more, 0.3))
    assert small["accuracy"] == (pytest.approx(1 / 96, abs=1e-4), "within noise")
    large = verdicts(predictions(base, 0.3), predictions(many_more, 0.2))
    assert large["accuracy"][1] == "better" and large["accuracy"][0] > 0.1
    assert large["loss"] == (pytest.approx(-0.05, abs=1e-4), "better"), "a lower loss is better"
    assert verdicts(predictions(many_more, 0.2), predictions(base, 0.3))["accuracy"][1] == "worse"


def test_runs_on_another_test_set_are_not_paired():
    from tools.report import same_test_set

    a = predictions([True] * 4, 0.1)
    b = [dict(r, input=r["input"] + " (other split)") for r in a]
    assert same_test_set(a, a) and not same_test_set(a, b)


def test_a_difference_within_the_seed_spread_is_within_noise_whatever_the_bootstrap_says():
    from tools.report import paired_comparison

    rng = np.random.default_rng(5)
    base = rng.random(96) < 0.7
    many_more = base | (rng.random(96) < 0.6)
    ref, run = predictions(base, 0.3), predictions(many_more, 0.3)
    diff = next(d for name, _, _, d, _, _, _ in paired_comparison(ref, run) if name == "accuracy")
    verdict = {name: v for name, *_, v in paired_comparison(ref, run, floor={"accuracy": diff + 0.01})}
    assert verdict["accuracy"] == "within noise (seed spread)"
    assert {name: v for name, *_, v in paired_comparison(ref, run, floor={"accuracy": diff - 0.01})}["accuracy"] == \
        "better"
