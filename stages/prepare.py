"""Raw data to seeded, deterministic train/val/test splits of prompt and completion.

Reads `paths.raw` (JSONL, CSV or Parquet, optionally gzipped) or a hub dataset,
builds each example's prompt turns and completion as `data.*` says, drops empty
and duplicate prompts (counted), and splits per label so that every split has the
same label mix. No prompt appears in two splits.
"""

import json
import random
from collections import Counter
from pathlib import Path

from qlora.outputs import atomic_dir, log, write_json
from qlora.params import load_params

PARAMS = ["data", "paths.raw", "paths.prepared", "paths.metrics"]

SPLITS = ("train", "val", "test")


class DataError(SystemExit):
    """Bad raw data: the stage exits non-zero with a message naming the file and field."""


class Bad(str):
    """A raw row that cannot be used, as the reason with its place in the file."""


def read_jsonl(path):
    """Rows of a JSON Lines file, one per line; a line that is not a JSON object is a Bad row."""
    import gzip

    rows = []
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    rows.append(Bad(f"{path} line {number}: not valid JSON ({err.msg})"))
                    continue
                rows.append(row if isinstance(row, dict) else Bad(f"{path} line {number}: not a JSON object"))
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: cannot be read as jsonl: not UTF-8 text ({err.reason} at byte {err.start}); "
                        "is it really JSON Lines?") from None
    if rows and all(isinstance(r, Bad) for r in rows):
        raise DataError(f"{path}: cannot be read as jsonl: no line is a JSON object ({rows[0]})")
    return rows


def read_raw(path):
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: raw data file not found (params.yaml: paths.raw)")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: raw data file is empty")
    suffixes = [s for s in path.suffixes if s != ".gz"]
    kind = suffixes[-1] if suffixes else ""
    try:
        if kind == ".jsonl":
            rows = read_jsonl(path)
            if not rows:
                raise DataError(f"{path}: no rows")
            return rows
        if kind == ".json":
            frame = pd.read_json(path)
        elif kind == ".csv":
            frame = pd.read_csv(path, keep_default_na=False, dtype=str)  # text as written: "01" stays "01"
        elif kind == ".parquet":
            frame = pd.read_parquet(path)
        else:
            raise DataError(f"{path}: unknown format {kind!r}; use .jsonl, .json, .csv or .parquet (optionally .gz)")
    except DataError:
        raise
    except Exception as err:  # pandas raises many types; the user needs the file and the reason
        raise DataError(f"{path}: cannot be read as {kind[1:]}: {err}") from None
    if frame.empty:
        raise DataError(f"{path}: no rows")
    return frame.to_dict("records")


def fields_read(d):
    """The raw fields data.* says to read: the messages, or the prompt (or the template's
    columns) and the completion. The kind of data follows from which keys are set."""
    if d.messages_field:
        return [d.messages_field]
    if d.prompt_field:
        return [d.prompt_field, d.completion_field]
    import string

    columns = [name for _, name, _, _ in string.Formatter().parse(d.prompt_template) if name and name != "labels"]
    return [*dict.fromkeys(columns), d.completion_field]


def as_turns(value):
    """A messages field as a list of turns: JSON text (from CSV) and arrays (from Parquet) too."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return value
    if hasattr(value, "tolist") and not isinstance(value, dict):
        value = value.tolist()
    return value


def bad_field(row, d):
    """Why a row's fields cannot be used (a list or mapping where text belongs, messages that are
    not chat turns ending with the assistant's), or None."""
    if d.messages_field:
        turns = row[d.messages_field]
        if not (isinstance(turns, list) and turns and all(isinstance(t, dict) and "role" in t and "content" in t
                                                          for t in turns)):
            return f"field {d.messages_field!r} is not a list of chat turns ({{role, content}})"
        if turns[-1]["role"] != "assistant":
            return f"field {d.messages_field!r} does not end with an assistant turn (the completion)"
        return None
    for field in (d.prompt_field, d.completion_field):
        if field and isinstance(row[field], (list, dict)):
            return f"field {field!r} is a {type(row[field]).__name__}, not text"
    return None


def read_hub(hub_id, split):
    from datasets import load_dataset

    return load_dataset(hub_id, split=split).to_list()


def to_example(row, d):
    """One raw row to (prompt turns, completion); None fields make it an empty example."""
    if d.messages_field:
        turns = row[d.messages_field]
        return [dict(role=t["role"], content=str(t["content"])) for t in turns[:-1]], str(turns[-1]["content"]).strip()
    if d.prompt_field:
        prompt = row[d.prompt_field]
    else:
        values = {k: "" if v is None else v for k, v in row.items()}
        prompt = d.prompt_template.format(labels=", ".join(d.labels), **values)
    completion = row[d.completion_field]
    return [dict(role="user", content=str(prompt).strip())], ("" if completion is None else str(completion).strip())


def key_of(field, d):
    """The params key that names a raw field."""
    for key in ("messages_field", "prompt_field", "completion_field"):
        if getattr(d, key) == field:
            return f"data.{key}"
    return "data.prompt_template"


def check_fields(rows, d, source):
    """A field that no row has is a params mistake, not a malformed row: name the key."""
    present = {name for row in rows if not isinstance(row, Bad) for name in row}
    for field in fields_read(d):
        if field not in present:
            raise DataError(f"{source}: no row has the field {field!r} that params.yaml {key_of(field, d)} names; "
                            f"the file has: {', '.join(map(str, sorted(present, key=str)))}")


def most_common(values, n=8):
    return ", ".join(f"{v!r} ({c})" for v, c in Counter(values).most_common(n))


def build_examples(rows, d, source):
    """Examples as dicts with `messages` (prompt turns) and `completion`, with counts of what was dropped.

    Malformed rows (not JSON, not an object, missing a field, a list where text belongs) stop the
    stage with their line numbers when `data.bad_rows` is `error`; with `drop` they are dropped,
    counted, and the first few are listed in the log. A filter that leaves nothing says which key
    did it and what values the file has."""
    check_fields(rows, d, source)
    bad = []
    for i, row in enumerate(rows, start=1):
        if isinstance(row, Bad):
            bad.append(row)
            continue
        missing = [f for f in fields_read(d) if f not in row]
        if d.messages_field and not missing:
            row[d.messages_field] = as_turns(row[d.messages_field])  # parsed once, for the checks and the example
        reason = f"missing field {missing[0]!r}" if missing else bad_field(row, d)
        if reason:
            bad.append(Bad(f"{source} row {i}: {reason}"))
            rows[i - 1] = bad[-1]
    if bad and d.bad_rows == "error":
        raise DataError(f"{source}: {len(bad)} malformed rows (params.yaml data.bad_rows: error; set drop to skip "
                        f"them): " + "; ".join(bad[:5]) + (" ..." if len(bad) > 5 else ""))
    rows = [r for r in rows if not isinstance(r, Bad)]
    if not rows:
        raise DataError(f"{source}: every row is malformed: " + "; ".join(bad[:5]))
    if bad:
        log(f"dropped {len(bad)} malformed rows: " + "; ".join(bad[:5]) + (" ..." if len(bad) > 5 else ""))
    labels = set(d.labels)
    examples, seen, dropped, others = [], set(), Counter(malformed=len(bad)), []
    for row in rows:
        messages, completion = to_example(row, d)
        if not completion or not messages or not messages[-1]["content"]:
            dropped["empty"] += 1
            continue
        if labels and completion not in labels:
            dropped["other_label"] += 1
            others.append(completion)
            continue
        key = json.dumps(messages)
        if key in seen:  # the same prompt twice could land in train and test
            dropped["duplicate"] += 1
            continue
        seen.add(key)
        examples.append(dict(messages=messages, completion=completion))
    answer = d.messages_field and f"last assistant turn of {d.messages_field!r}" or repr(d.completion_field)
    found = {ex["completion"] for ex in examples}
    if labels and not examples:
        raise DataError(f"{source}: params.yaml data.labels keeps rows whose answer ({answer}) is one of "
                        f"{sorted(labels)}, and no row's is. The most common answers in the file: "
                        f"{most_common(others)}. Set data.labels to some of them, or [] for free-form answers.")
    if labels - found:
        log(f"warning: params.yaml data.labels {sorted(labels - found)} match no row's answer ({answer}); "
            f"the most common others: {most_common(others)}")
    if not examples:
        raise DataError(f"{source}: no usable examples (dropped: {dict(dropped)}): every row's prompt or answer "
                        f"is empty; check {', '.join(key_of(f, d) for f in fields_read(d))}")
    return examples, dropped


def split_examples(examples, d):
    """Shuffle with data.seed and keep the first data.max_examples (all when null); with labels, cap each
    label at data.max_per_label and split each label by the fractions (stratified). Free-form answers and
    numbers are split as one group."""
    rng = random.Random(d.seed)
    rng.shuffle(examples)
    examples = examples[: d.max_examples] if d.max_examples else examples
    by_label = {}
    for ex in examples:
        key = ex["completion"] if d.labels else None
        by_label.setdefault(key, []).append(ex)
    splits = {s: [] for s in SPLITS}
    for group in by_label.values():
        group = group[: d.max_per_label] if d.labels and d.max_per_label else group
        n_test = max(1, round(len(group) * d.test_fraction))
        n_val = max(1, round(len(group) * d.val_fraction))
        splits["test"] += group[:n_test]
        splits["val"] += group[n_test : n_test + n_val]
        splits["train"] += group[n_test + n_val :]
    for split in splits.values():
        rng.shuffle(split)
    return splits


def count_overlap(splits):
    keys = {s: {json.dumps(ex["messages"]) for ex in rows} for s, rows in splits.items()}
    return sum(len(keys[a] & keys[b]) for i, a in enumerate(SPLITS) for b in SPLITS[i + 1 :])


def make_splits(rows, d, source):
    """Examples split into train/val/test, with what was dropped; every check of the data on the way."""
    examples, dropped = build_examples(rows, d, source)
    dropped["over_max_examples"] = max(0, len(examples) - d.max_examples) if d.max_examples else 0
    splits = split_examples(examples, d)
    overlap = count_overlap(splits)
    assert overlap == 0, f"{overlap} prompts in more than one split"
    for name in SPLITS:
        if not splits[name]:
            raise DataError(f"{source}: split {name!r} is empty ({len(examples)} usable examples, dropped: "
                            f"{dict(dropped)}); use more data or larger data.val_fraction / data.test_fraction")
    return splits, dropped, overlap


def main():
    p = load_params(PARAMS)
    d = p.data
    source = f"hub:{d.hub_id}" if d.hub_id else p.paths.raw
    rows = read_hub(d.hub_id, d.hub_split) if d.hub_id else read_raw(p.paths.raw)
    log(f"read {len(rows)} rows from {source}")
    splits, dropped, overlap = make_splits(rows, d, source)

    with atomic_dir(p.paths.prepared) as out:
        for name, split in splits.items():
            with open(out / f"{name}.jsonl", "w") as f:
                f.writelines(json.dumps(ex, ensure_ascii=False) + "\n" for ex in split)
    metrics = {
        "raw_rows": len(rows),
        **{f"{name}_examples": len(split) for name, split in splits.items()},
        "dropped_malformed": dropped["malformed"],
        "dropped_empty": dropped["empty"],
        "dropped_duplicate": dropped["duplicate"],
        "dropped_other_label": dropped["other_label"],
        "dropped_over_max_examples": dropped["over_max_examples"],  # data.max_examples
        "cross_split_duplicates": overlap,
    }
    # The label mix per split (classification only): a file of its own, to keep `dvc exp show` narrow.
    write_json(Path(p.paths.metrics) / "labels.json",
               {name: dict(sorted(Counter(ex["completion"] for ex in split).items())) if d.labels else {}
                for name, split in splits.items()})
    write_json(Path(p.paths.metrics) / "prepare.json", metrics)
    log(" ".join(f"{name}={len(split)}" for name, split in splits.items()) + f" dropped={dict(dropped)}")


if __name__ == "__main__":
    main()
