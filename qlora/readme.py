"""Render the README's measured figures from the files the pipeline wrote, so they cannot drift.

    python -m qlora.readme          # rewrite each block of README.md between its markers
    python -m qlora.readme --check  # exit 1 if a block differs from what the files say

A block sits between `<!-- begin NAME (python -m qlora.readme) -->` and `<!-- end NAME -->`.
"""

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def read(name):
    return json.loads((ROOT / "metrics" / f"{name}.json").read_text())


def default_scores():
    """The default run's base and fine-tuned scores on test, and its losses."""
    e, labels = read("evaluate"), read("labels")
    classes = len(labels["test"])
    rows = [
        (f"test accuracy ({classes} labels, chance {1 / classes:.1%})", "test_accuracy"),
        ("test macro F1", "test_macro_f1"),
        ("answered: the answer is exactly one label", "test_answered"),
        ("test loss on the answer tokens", "test_loss"),
    ]
    lines = ["| | base model (4-bit, no adapter) | fine-tuned (4-bit + LoRA) |", "|---|---|---|"]
    lines += [f"| {title} | {e['base_' + key]} | **{e[key]}** |" for title, key in rows]
    lines += ["", f"Train-sample / val / test loss: {e['train_loss']} / {e['val_loss']} / {e['test_loss']} "
                  f"(gap {e['gap']}); best val loss {e['best_val_loss']} at step {e['best_val_step']}, last "
                  f"{e['last_val_loss']} at step {e['last_val_step']} (`overfitting: {str(e['overfitting']).lower()}`)."]
    return "\n".join(lines)


BLOCKS = {"default-scores": default_scores}


def render(text):
    for name, make in BLOCKS.items():
        pattern = re.compile(rf"(<!-- begin {name} \(python -m qlora.readme\) -->\n)(?:.*?\n)?(<!-- end {name} -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"README.md: no block {name!r} between its markers")
        text = pattern.sub(lambda m: m.group(1) + make() + "\n" + m.group(2), text)
    return text


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m qlora.readme", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only check that README.md is up to date")
    args = parser.parse_args(argv)
    text = README.read_text()
    rendered = render(text)
    if args.check:
        return 0 if rendered == text else 1
    README.write_text(rendered)
    return 0


if __name__ == "__main__":
    sys.exit(main())
