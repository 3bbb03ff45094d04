"""A scratch copy of the project's params.yaml for a benchmark run: inputs read in place, outputs apart."""

from pathlib import Path

import yaml

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
    for item in overrides:
        key, value = item.split("=", 1)
        section, name = key.split(".", 1)
        if name not in raw.get(section, {}):
            raise SystemExit(f"-S {item}: params.yaml has no {key}")
        raw[section][name] = yaml.safe_load(value)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path
