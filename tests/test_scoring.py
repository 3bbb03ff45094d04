"""Task metrics that mean what they say, checked against the answers that fool them: an echoed
prompt or label list, an empty or chatty answer, a collapsed model that always says the same."""

import pytest

from qlora.scoring import answer_budget
from qlora.tasks import Classification, Generation, extract_label, task_for

LABELS = ["fonts", "doc", "python", "perl", "libdevel", "games", "science", "net"]


@pytest.mark.parametrize("answer,label", [
    ("perl", "perl"),
    ("Perl.", "perl"),                                  # case, trailing punctuation
    ("  PERL!\n", "perl"),                              # surrounding whitespace
    ("perl, as it is a Perl module", "perl"),           # begins with one label, names no other
    ("games: a puzzle game", "games"),
    ("fonts, doc, python, perl, libdevel", None),        # the echoed label list
    ("Debian section of this package, one of: fonts, doc, python, perl.", None),  # the echoed prompt
    ("perl or python", None),                           # two labels
    ("python. Not perl.", None),
    ("libperl5", None),                                 # a label inside a longer word
    ("perl-doc", None),
    ("python3", None),
    ("The section is perl", None),                      # does not begin with the label
    ("", None),
])
def test_a_label_counts_only_when_the_answer_is_it(answer, label):
    assert extract_label(answer, LABELS) == label


def test_labels_that_are_numbers_and_nested_labels():
    assert extract_label("1", ["1", "2", "8"]) == "1"
    assert extract_label("1, 2, 8", ["1", "2", "8"]) is None, "the echoed list of numbers"
    assert extract_label("12", ["1", "2"]) is None
    assert extract_label("python 3", ["python", "python 3"]) == "python 3", "the longest label it begins with"


def test_classification_metrics_and_answered():
    references = ["a", "a", "a", "b", "c", "c"]
    answers = ["a", "A.", "b", "b", "a, b, c", "c"]
    metrics, rows = Classification(["a", "b", "c"]).score(answers, references)
    assert [r["label"] for r in rows] == ["a", "a", "b", "b", None, "c"]
    assert [r["correct"] for r in rows] == [1, 1, 0, 1, 0, 1]
    # per class F1: a 2*2/(2*2+0+1)=0.8, b 2*1/(2+1+0)=0.667, c 2*1/(2+0+1)=0.667
    assert metrics == {"accuracy": round(4 / 6, 4), "macro_f1": round((0.8 + 2 / 3 + 2 / 3) / 3, 4),
                       "answered": round(5 / 6, 4), "distinct": 3}


def test_an_echoing_model_scores_nothing_and_answers_nothing():
    references = ["perl", "python", "fonts"]
    echoes = ["Debian section of this package, one of: " + ", ".join(LABELS)] * 3
    metrics, _ = Classification(LABELS).score(echoes, references)
    assert metrics["accuracy"] == 0 and metrics["answered"] == 0


def test_a_collapsed_classifier_scores_low_macro_f1():
    references = ["a"] * 6 + ["b", "c"]
    metrics, _ = Classification(["a", "b", "c"]).score(["a"] * 8, references)
    assert metrics["accuracy"] == 0.75 and metrics["macro_f1"] < 0.35 and metrics["answered"] == 1


REFERENCES = ["Return the number of items in a container.", "Join two or more path components.",
              "Sleep for the given number of seconds."]


def test_generation_metrics_order_the_answers_that_fool_them():
    def score(answers):
        return Generation().score(answers, REFERENCES)[0]

    exact = score(REFERENCES)
    assert exact == {"exact_match": 1.0, "chrf": 1.0, "rouge_l": 1.0, "answered": 1.0, "distinct": 3}
    assert score(["return the number of items in a container", "join two or more path components",
                  "sleep for the given number of seconds"])["exact_match"] == 1.0, "case and punctuation"
    empty = score(["", "", ""])
    assert empty == {"exact_match": 0.0, "chrf": 0.0, "rouge_l": 0.0, "answered": 0.0, "distinct": 0}
    chatty = score([f"Sure! Here is the answer you asked for: {r} I hope this helps." for r in REFERENCES])
    assert chatty["exact_match"] == 0 and 0.3 < chatty["chrf"] < 1 and 0.3 < chatty["rouge_l"] < 1
    echoed = score(["What does len do?", "What does os.path.join do?", "What does time.sleep do?"])
    collapsed = score([REFERENCES[0]] * 3)
    for fooled in (echoed, collapsed):
        assert fooled["exact_match"] < 0.5 and fooled["chrf"] < chatty["chrf"] and fooled["rouge_l"] < 0.5
    assert collapsed["exact_match"] == round(1 / 3, 4), "right once in three"


def test_task_and_answer_budget():
    assert task_for("auto", ["a"]).name == "classification" and task_for("auto", []).name == "generation"
    assert task_for("generation", ["a"]).name == "generation"
    from qlora.params import TASKS as SETTINGS
    from qlora.tasks import TASKS

    assert SETTINGS == ("auto", *TASKS), "every task can be set in params.yaml"
    train = {"labels": [[-100, -100, 5, 6, 2], [-100, 7, 2]]}  # answers of 3 and 2 tokens, end of turn included
    assert answer_budget("auto", train) == 4 and answer_budget(12, train) == 12
    assert answer_budget("auto", {"labels": [[-100] + [1] * 40]}) == 50


def test_paired_interval_separates_a_real_difference_from_flipped_near_ties():
    from qlora.scoring import paired_interval

    adapter = [1, 0] * 36  # 72 answers, half right
    flipped = list(adapter)
    for i in (0, 2, 4, 7):  # three right answers turned wrong and one wrong turned right: -2/72
        flipped[i] = 1 - flipped[i]
    low, high = paired_interval(adapter, flipped)
    assert low < 0 < high, "a few flips either way are noise"
    broken = [0] * 72  # a merge into the wrong weights: every right answer lost
    low, high = paired_interval(adapter, broken)
    assert high < -0.3 and low > -0.7
    assert paired_interval(adapter, flipped) == paired_interval(adapter, flipped), "fixed seed"
