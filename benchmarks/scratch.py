"""A scratch copy of the project's params.yaml for a benchmark run: inputs read in place, outputs apart."""

from pathlib import Path

import yaml
from dvc.exceptions import InvalidArgumentError
from dvc.utils.hydra import apply_overrides

ROOT = Path(__file__).resolve().parents[1]


def write_params(folder, overrides=()):
    """params.yaml in `folder`: the project's inputs by absolute path, train's outputs under `folder`,
    no checkpoints or early stopping, then `overrides` ("section.key=value", as `dvc exp run -S`)."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for key in ("quantized", "tokenizer", "tokenized"):
        raw["paths"][key] = str(ROOT / raw["paths"][key])
    raw["paths"].update(adapter=str(folder / "adapter"), metrics=str(folder / "metrics"),
                        checkpoints=str(folder / "ckpt"))
    raw["train"].update(checkpoint_steps=0, early_stopping_patience=0)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    try:
        apply_overrides(path, list(overrides))  # what `dvc exp run -S` itself calls
    except InvalidArgumentError as e:
        raise SystemExit(f"-S {' '.join(overrides)}: {e.__cause__}") from e
    return path
