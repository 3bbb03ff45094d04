"""The tokenized splits the tokenize stage writes, as the trainer and the scorers read them."""

from pathlib import Path

SPLITS = ("train", "val", "test")
FORMAT = "format.json"  # beside the splits: the template used, its hash, the tokens that end an answer
IGNORE_INDEX = -100  # labels with this value are left out of the loss


def load_split(folder, name):
    """A tokenized split as a datasets.Dataset (input_ids, labels, prompt_length, prompt, completion)."""
    import pandas as pd
    from datasets import Dataset

    return Dataset.from_pandas(pd.read_parquet(Path(folder) / f"{name}.parquet"), preserve_index=False)


def load_format(folder):
    """How the tokenize stage rendered the splits (stages/tokenize.py): `template`, `stop_token_ids`, ..."""
    import json

    return json.loads((Path(folder) / FORMAT).read_text())
