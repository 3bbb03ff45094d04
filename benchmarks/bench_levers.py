"""What each speed lever of the train stage costs and saves: tokens/s, peak memory and the loss.

    python benchmarks/bench_levers.py [--steps 15] [--reps 2]

Runs the train stage (stages/train.py, as `dvc repro` runs it) on a scratch copy of
params.yaml, once per variant and round, the variants in turn within each round so that
drift on a noisy machine hits all of them: the default, then each lever alone. Writes
`benchmarks/results/levers.json`: per variant the median of non-padding tokens/s over its
whole training loop (bench_train.py's clock, val-loss passes left out), peak RSS of the
process, and the final train loss, with every run's figures and the variant's machine,
versions, commit and date. docs/levers.md renders
its table from that file (make docs). Needs a reproduced project (`make repro`).
"""

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_train import ours  # noqa: E402
from benchmarks.stamp import TRAIN_STAGE, UPSTREAM, stamp  # noqa: E402
from qlora.outputs import provenance  # noqa: E402

# What the figures depend on (python -m tools.docs): bench_train.py's run of the train stage and its clock
CODE = ["benchmarks/bench_levers.py", "benchmarks/bench_train.py", "benchmarks/scratch.py",
        *TRAIN_STAGE, *UPSTREAM]

VARIANTS = {
    "default": [],
    "checkpointing every 2nd layer": ["train.gradient_checkpointing=true", "train.gradient_checkpointing_every=2"],
    "checkpointing every layer": ["train.gradient_checkpointing=true", "train.gradient_checkpointing_every=1"],
    "sdpa attention": ["train.attn_implementation=sdpa"],
    "group by length": ["train.group_by_length=true"],
    "padding-free": ["train.padding_free=true"],
    "no LoRA dropout": ["lora.dropout=0"],
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=15, help="optimizer steps per run")
    parser.add_argument("--reps", type=int, default=2, help="rounds; each runs every variant once")
    args = parser.parse_args()
    for needed in ("models/quantized", "data/tokenized", "metrics/train.json"):
        if not (ROOT / needed).exists():
            raise SystemExit(f"{needed} is missing: run `make repro` (or `dvc pull`) first")

    runs = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="qlora-levers-") as tmp:
        for rep in range(args.reps):
            for name, overrides in VARIANTS.items():
                r = ours(Path(tmp), args.steps, overrides)
                runs[name].append({k: v if v is None else round(v, 4) for k, v in r.items()})
                print(f"round {rep + 1} {name:32s} {r['tokens_per_second']:6.1f} tokens/s  {r['rss_mb']:6.0f} MB  "
                      f"loss {r['final_loss']:.4f}", flush=True)
    variants = {}
    for name, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in ("tokens_per_second", "rss_mb", "final_loss")}
        variants[name] = stamp(dict(overrides=VARIANTS[name], runs=rs, **{k: round(v, 4) for k, v in med.items()}))
    base = variants["default"]
    for v in variants.values():
        v["speed_vs_default"] = round(v["tokens_per_second"] / base["tokens_per_second"], 3)
        v["memory_vs_default"] = round(v["rss_mb"] / base["rss_mb"], 3)
    result = dict(steps=args.steps, reps=args.reps, variants=variants, **provenance())
    out = ROOT / "benchmarks/results/levers.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
