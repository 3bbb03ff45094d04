"""prepare and tokenize: deterministic disjoint splits, clear errors on bad data, prompt masking."""

import json
import shutil

import pandas as pd
import pytest

from conftest import ROOT, set_params
from qlora.splits import IGNORE_INDEX, load_split


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_rows(path, n=40, labels=("a", "b")):
    rows = [dict(question=f"question {i}", answer=labels[i % len(labels)]) for i in range(n)]
    if path.suffix == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    elif path.suffix == ".parquet":
        pd.DataFrame(rows).to_parquet(path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def use_file(workdir, name, **data):
    overrides = {"paths.raw": name, "data.prompt_field": "question", "data.completion_field": "answer",
                 "data.labels": [], "data.max_per_label": None, **{f"data.{k}": v for k, v in data.items()}}
    set_params(workdir / "params.yaml", overrides)


def prepare():
    from stages import prepare as stage

    stage.main()
    return {s: (stage.Path("data/prepared") / f"{s}.jsonl").read_text() for s in stage.SPLITS}


@pytest.mark.parametrize("name", ["own.jsonl", "own.csv", "own.parquet"])
def test_prepare_reads_each_format_into_disjoint_splits(workdir, name):
    write_rows(workdir / name)
    use_file(workdir, name)
    splits = prepare()
    lines = {s: set(text.splitlines()) for s, text in splits.items()}
    assert sum(map(len, lines.values())) == 40
    assert not (lines["train"] & lines["val"] or lines["train"] & lines["test"] or lines["val"] & lines["test"])
    metrics = json.loads((workdir / "metrics/prepare.json").read_text())
    assert metrics["cross_split_duplicates"] == 0 and metrics["train_examples"] == len(lines["train"])


def test_prepare_is_deterministic_and_seeded(workdir):
    write_rows(workdir / "own.jsonl")
    use_file(workdir, "own.jsonl")
    first, second = prepare(), prepare()
    assert first == second
    use_file(workdir, "own.jsonl", seed=7)
    assert prepare()["test"] != first["test"]


def test_duplicates_are_dropped_before_splitting(workdir):
    write_rows(workdir / "own.jsonl", n=20)
    text = (workdir / "own.jsonl").read_text()
    (workdir / "own.jsonl").write_text(text + text)
    use_file(workdir, "own.jsonl")
    splits = prepare()
    assert sum(len(s.splitlines()) for s in splits.values()) == 20
    assert json.loads((workdir / "metrics/prepare.json").read_text())["dropped_duplicate"] == 20


def test_default_data_is_stratified_by_label(workdir):
    shutil.copytree(ROOT / "data/raw", workdir / "data/raw")
    set_params(workdir / "params.yaml", {"data.max_per_label": 20})
    prepare()
    labels = json.loads((workdir / "metrics/labels.json").read_text())
    assert set(labels["test"]) == {"fonts", "doc", "python", "perl", "libdevel", "games", "science", "net"}
    assert set(labels["test"].values()) == {4} and set(labels["train"].values()) == {13}


@pytest.mark.parametrize("setup,message", [
    (lambda d: None, "raw data file not found"),
    (lambda d: (d / "own.jsonl").write_text(""), "raw data file is empty"),
    (lambda d: (d / "own.jsonl").write_text('{"question": "q", "reply": "a"}\n'), "missing field 'answer'"),
    (lambda d: (d / "own.jsonl").write_text("not json\n"), "cannot be read as jsonl"),
])
def test_bad_raw_data_names_the_file(workdir, setup, message):
    setup(workdir)
    use_file(workdir, "own.jsonl")
    with pytest.raises(SystemExit, match=message) as err:
        prepare()
    assert "own.jsonl" in str(err.value)
    assert not (workdir / "data/prepared").exists(), "nothing half-written"


def test_tokenize_masks_the_prompt_and_counts_truncation(workdir, tokenizer_dir):
    from transformers import AutoTokenizer

    from stages import tokenize as stage

    write_rows(workdir / "own.jsonl")
    use_file(workdir, "own.jsonl")
    prepare()
    set_params(workdir / "params.yaml", {"paths.tokenizer": str(tokenizer_dir), "tokenize.max_length": 30})
    stage.main()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    train = load_split("data/tokenized", "train")
    ex = train[0]
    answer = [t for t in ex["labels"] if t != IGNORE_INDEX]
    assert ex["labels"][: ex["prompt_length"]] == [IGNORE_INDEX] * ex["prompt_length"]
    assert tokenizer.decode(answer).strip() == f"{ex['completion']}<|im_end|>"
    assert ex["input_ids"][ex["prompt_length"]:] == answer

    set_params(workdir / "params.yaml", {"tokenize.max_length": ex["prompt_length"] + 1})
    stage.main()
    metrics = json.loads((workdir / "metrics/tokenize.json").read_text())
    assert metrics["truncated"] > 0 and metrics["truncated"] + metrics["dropped_prompt_too_long"] == 40
    assert max(map(len, load_split("data/tokenized", "train")["input_ids"])) == ex["prompt_length"] + 1


def write_with_bad_lines(path):
    write_rows(path)
    lines = path.read_text().splitlines()
    lines[2] = '{"question": "broken", "answer": '              # line 3: cut off
    lines[4] = '["question", "a"]'                             # line 5: not an object
    lines[5] = '{"question": "no answer here"}'                # line 6: missing field
    lines[6] = '{"question": ["a", "list"], "answer": "a"}'    # line 7: a list where text belongs
    path.write_text("\n".join(lines) + "\n")


def test_malformed_rows_stop_prepare_with_their_line_numbers(workdir):
    write_with_bad_lines(workdir / "own.jsonl")
    use_file(workdir, "own.jsonl")
    with pytest.raises(SystemExit) as err:
        prepare()
    message = str(err.value)
    assert "own.jsonl: 4 malformed rows" in message and "data.bad_rows" in message
    for expected in ("line 3: not valid JSON", "line 5: not a JSON object", "missing field 'answer'",
                     "field 'question' is a list, not text"):
        assert expected in message
    assert not (workdir / "data/prepared").exists()


def test_malformed_rows_are_dropped_and_counted_when_params_say_so(workdir):
    write_with_bad_lines(workdir / "own.jsonl")
    use_file(workdir, "own.jsonl", bad_rows="drop")
    splits = prepare()
    metrics = json.loads((workdir / "metrics/prepare.json").read_text())
    assert metrics["dropped_malformed"] == 4 and metrics["raw_rows"] == 40
    assert sum(len(s.splitlines()) for s in splits.values()) == 36


def test_a_file_that_is_not_what_its_extension_says(workdir):
    write_rows(workdir / "own.parquet")
    (workdir / "own.parquet").rename(workdir / "own.jsonl")
    use_file(workdir, "own.jsonl")
    with pytest.raises(SystemExit, match=r"own.jsonl: cannot be read as jsonl"):
        prepare()
