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
    assert metrics["train_examples"] == len(lines["train"]) and metrics["test_examples"] == len(lines["test"])


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


def test_max_examples_bounds_free_form_data_before_the_split(workdir):
    write_rows(workdir / "own.jsonl", n=200)
    use_file(workdir, "own.jsonl", max_examples=50)
    splits = prepare()
    kept = [json.loads(line) for text in splits.values() for line in text.splitlines()]
    assert len(kept) == 50 and json.loads((workdir / "metrics/prepare.json").read_text())["dropped_over_max_examples"] == 150
    numbers = sorted(int(ex["messages"][-1]["content"].split()[-1]) for ex in kept)
    assert numbers[-1] > 100, "sampled at random over the file, not its first rows"
    use_file(workdir, "own.jsonl", max_examples=50, seed=7)
    assert prepare() != splits, "another seed, another sample"


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
    (lambda d: (d / "own.jsonl").write_text('{"question": "q", "reply": "a"}\n'), "no row has the field 'answer' that params.yaml data.completion_field names"),
    (lambda d: (d / "own.jsonl").write_text("not json\n"), "cannot be read as jsonl"),
])
def test_bad_raw_data_names_the_file(workdir, setup, message):
    setup(workdir)
    use_file(workdir, "own.jsonl")
    with pytest.raises(SystemExit, match=message) as err:
        prepare()
    assert "own.jsonl" in str(err.value)
    assert not (workdir / "data/prepared").exists(), "nothing half-written"


def test_tokenize_masks_the_prompt_counts_truncation_and_stops_on_unlabelled_examples(workdir, tokenizer_dir):
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

    longest_prompt = max(load_split("data/tokenized", "train")["prompt_length"])
    set_params(workdir / "params.yaml", {"tokenize.max_length": longest_prompt + 1})
    stage.main()
    metrics = json.loads((workdir / "metrics/tokenize.json").read_text())
    assert metrics["truncated"] > 0 and metrics["max_tokens"] == longest_prompt + 1
    assert max(map(len, load_split("data/tokenized", "train")["input_ids"])) == longest_prompt + 1
    tokenized = {f: f.read_bytes() for f in (workdir / "data/tokenized").iterdir()}

    # A prompt that fills max_length leaves no labelled token: the stage stops, naming how many, where,
    # and the params to change, and keeps the last good output.
    set_params(workdir / "params.yaml", {"tokenize.max_length": longest_prompt})
    with pytest.raises(SystemExit, match=r"tokenize: [1-9]\d* of \d+ examples in .*train.jsonl \(lines .*no labelled "
                                         rf"token.*tokenize.max_length={longest_prompt}.*tokenize.system_prompt"):
        stage.main()
    assert {f: f.read_bytes() for f in (workdir / "data/tokenized").iterdir()} == tokenized


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


def write_chat(path, n=30, turns=1):
    """A messages JSONL: `turns` user/assistant exchanges per row, the last answer the completion."""
    rows = []
    for i in range(n):
        messages = []
        for t in range(turns):
            messages += [dict(role="user", content=f"row {i} question {t}"), dict(role="assistant", content=f"answer {i}.{t}")]
        rows.append(dict(messages=messages))
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_chat_data_in_one_edit_reads_no_prompt_or_completion_field(workdir):
    # Only the data keys a user edits; the demo's completion_field, prompt_template and
    # max_per_label stay as shipped and are not read.
    write_chat(workdir / "chat.jsonl", n=100, turns=2)
    set_params(workdir / "params.yaml", {"paths.raw": "chat.jsonl", "data.messages_field": "messages",
                                         "data.labels": []})
    splits = prepare()
    examples = [json.loads(line) for text in splits.values() for line in text.splitlines()]
    assert len(examples) == 100, "max_per_label caps labels only: nothing is cut from free-form data"
    ex = examples[0]
    i = int(ex["completion"].split()[1].split(".")[0])
    assert ex["completion"] == f"answer {i}.1", "the last assistant turn is the completion"
    assert [m["content"] for m in ex["messages"]] == [f"row {i} question 0", f"answer {i}.0", f"row {i} question 1"]
    labels = json.loads((workdir / "metrics/labels.json").read_text())
    assert labels == {"train": {}, "val": {}, "test": {}}, "no label mix without labels"


def test_chat_data_from_parquet_and_csv(workdir):
    write_chat(workdir / "chat.jsonl", n=20)
    frame = pd.read_json(workdir / "chat.jsonl", lines=True)
    frame.to_parquet(workdir / "chat.parquet")  # the turns come back as arrays of structs
    frame.assign(messages=frame["messages"].map(json.dumps)).to_csv(workdir / "chat.csv", index=False)  # JSON text
    for name in ("chat.parquet", "chat.csv"):
        set_params(workdir / "params.yaml", {"paths.raw": name, "data.messages_field": "messages", "data.labels": []})
        assert sum(len(s.splitlines()) for s in prepare().values()) == 20, name


def test_labels_written_as_numbers_are_labels(workdir):
    rows = [dict(name=f"tool{i}", text=f"does thing {i}", section=[1, 2, 8][i % 3]) for i in range(60)]
    pd.DataFrame(rows).to_csv(workdir / "man.csv", index=False)
    set_params(workdir / "params.yaml", {"paths.raw": "man.csv", "data.completion_field": "section",
                                         "data.prompt_template": "Manual section of {name}: {text}. One of {labels}.",
                                         "data.labels": [1, 8], "data.max_per_label": 10})
    splits = prepare()
    examples = [json.loads(line) for text in splits.values() for line in text.splitlines()]
    assert {ex["completion"] for ex in examples} == {"1", "8"} and len(examples) == 20
    assert "One of 1, 8." in examples[0]["messages"][0]["content"]


def test_chat_data_with_the_demo_labels_names_the_key_and_the_answers_found(workdir):
    write_chat(workdir / "chat.jsonl")
    set_params(workdir / "params.yaml", {"paths.raw": "chat.jsonl", "data.messages_field": "messages"})
    with pytest.raises(SystemExit) as err:
        prepare()
    message = str(err.value)
    assert "chat.jsonl" in message and "data.labels" in message and "'answer 0.0' (1)" in message
    assert "[] for free-form answers" in message


def test_a_field_no_row_has_names_the_key_and_the_fields_there(workdir):
    write_chat(workdir / "chat.jsonl")
    set_params(workdir / "params.yaml", {"paths.raw": "chat.jsonl", "data.messages_field": "conversation",
                                         "data.labels": []})
    with pytest.raises(SystemExit, match=r"no row has the field 'conversation' that params.yaml "
                                         r"data.messages_field names; the file has: messages"):
        prepare()


def test_rows_whose_messages_are_not_chat_turns_are_malformed(workdir):
    write_chat(workdir / "chat.jsonl", n=20)
    lines = (workdir / "chat.jsonl").read_text().splitlines()
    lines[3] = json.dumps({"messages": "just text"})
    lines[4] = json.dumps({"messages": [{"role": "user", "content": "no answer"}]})
    (workdir / "chat.jsonl").write_text("\n".join(lines) + "\n")
    set_params(workdir / "params.yaml", {"paths.raw": "chat.jsonl", "data.messages_field": "messages",
                                         "data.labels": []})
    with pytest.raises(SystemExit) as err:
        prepare()
    assert "2 malformed rows" in str(err.value) and "row 4: field 'messages' is not a list of chat turns" in str(err.value)
    assert "row 5: field 'messages' does not end with an assistant turn" in str(err.value)
