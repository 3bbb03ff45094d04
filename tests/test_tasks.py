"""Free-form answers end to end: a chat JSONL the project has never seen, switched to in one edit of
the data keys, scored as generation (exact match, chrF, ROUGE-L) for base and fine-tuned, and held
to the same footing by the export check. Real DVC, tiny model."""

import builtins
import inspect
import json
import re

import pytest

from conftest import repro, reproduced_copy, run, set_params

GENERATION = ("exact_match", "chrf", "rouge_l", "answered")


def write_questions(path):
    """Question / one-line answer pairs from the docstrings of Python's builtins."""
    rows = []
    for name, obj in sorted(vars(builtins).items()):
        doc = (inspect.getdoc(obj) or "").split("\n")[0].strip()
        if callable(obj) and not name.startswith("_") and 10 < len(doc) < 100:
            rows.append({"messages": [{"role": "user", "content": f"What does Python's {name} do?"},
                                      {"role": "assistant", "content": doc}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


@pytest.fixture(scope="module")
def chat_project(tmp_path_factory, reproduced_project):
    project = reproduced_copy(tmp_path_factory.mktemp("chat") / "project", reproduced_project, {
        "train.max_steps": 3, "train.batch_size": 4, "train.logging_steps": 1, "train.eval_steps": 1,
    })
    rows = write_questions(project / "data/raw/questions.jsonl")
    # The edit a user makes, and nothing else: the data keys.
    set_params(project / "params.yaml", {"paths.raw": "data/raw/questions.jsonl", "data.messages_field": "messages",
                                         "data.labels": []})
    assert not repro(project) & {"base", "quantize"}, "the same model: quantized once, for both projects"
    return project, rows


def read(project, name):
    return json.loads((project / f"metrics/{name}.json").read_text())


def test_chat_data_runs_to_the_end_scored_as_generation(chat_project):
    p, rows = chat_project
    prepared = read(p, "prepare")
    assert sum(prepared[f"{s}_examples"] for s in ("train", "val", "test")) == rows, "no cap without labels"
    m, base = read(p, "evaluate"), read(p, "evaluate_base")
    assert base["task"] == "generation"
    for name in GENERATION:
        assert m[f"base_test_{name}"] == base[f"test_{name}"], name
    rows = json.loads((p / "metrics/predictions.json").read_text())
    for name in ("exact_match", "chrf", "rouge_l"):  # each metric is the mean of its per-answer scores
        assert m[f"test_{name}"] == pytest.approx(sum(r[name] for r in rows) / len(rows), abs=1e-4), name
    for name in ("exact_match", "chrf", "rouge_l"):
        assert m[f"{name}_gain"] == round(m[f"test_{name}"] - m[f"base_test_{name}"], 4)
    assert "test_accuracy" not in m and "test_macro_f1" not in m, "free-form answers are not scored as labels"
    # auto: the longest train answer in tokens plus a quarter, not a fixed 16
    assert base["max_new_tokens"] > 16

    predictions = read(p, "predictions")
    assert len(predictions) == prepared["test_examples"]
    for prefix in ("", "base_"):
        mean = sum(r[f"{prefix}chrf"] for r in predictions) / len(predictions)
        assert m[f"{prefix}test_chrf"] == pytest.approx(mean, abs=1e-4), "paired per example, adding up"
    assert read(p, "confusion") == [], "no confusion matrix of one class per answer"
    export = read(p, "export")
    assert export["adapter_test_chrf"] == m["test_chrf"] and abs(export["test_chrf"] - m["test_chrf"]) <= 0.03


def test_a_shorter_answer_budget_reruns_only_the_scoring(chat_project):
    p, _ = chat_project
    out = run(["dvc", "exp", "run", "-S", "evaluate.max_new_tokens=4"], p)
    assert set(re.findall(r"Running stage '(\w+)'", out.stdout)) == {"validate", "evaluate_base", "evaluate", "export"}
    assert read(p, "evaluate_base")["max_new_tokens"] == 4
