"""The LoRA variants on the default: the same data, seed and steps, one lever each.

    python benchmarks/bench_variants.py [--only NAME ...]

Each variant runs as a DVC experiment, `dvc exp run --temp -n variant-<name> -S ... evaluate`
(train and evaluate; the workspace is left as it is), one after another so that none shares the
cores. The default runs the same way, forced (`-f`: nothing of it changed, so DVC would otherwise
skip it), so that every row's speed and memory are measured alike. PiSSA needs a full-precision
base, so it is measured on the 16-bit base against plain LoRA on that same base. Writes benchmarks/results/lora-variants.json (every figure; each row
with the machine, versions, commit and date of the run that measured it, `--only` keeping the
others as they were); docs/levers.md renders it (make docs).
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.stamp import PIPELINE, command, kept, stamp  # noqa: E402

CODE = ["benchmarks/bench_variants.py", *PIPELINE]  # (python -m tools.docs)

VARIANTS = {
    "default (kaiming)": [],
    "dora": ["lora.use_dora=true"],
    "rslora": ["lora.use_rslora=true"],
    "gaussian": ["lora.init=gaussian"],
    "olora": ["lora.init=olora"],
    "eva": ["lora.init=eva"],
    "16-bit base": ["quantize.bits=16"],
    "pissa (16-bit base)": ["quantize.bits=16", "lora.init=pissa"],
}
KEEP = {
    "metrics/evaluate.json": ["val_loss", "best_val_loss", "test_loss", "test_accuracy", "test_accuracy_ci_low",
                              "test_accuracy_ci_high"],
    "metrics/train.json": ["tokens_per_second", "peak_memory_mb", "seconds", "steps", "trainable_parameters",
                           "final_loss"],
}


def figures(metrics):
    return {key: metrics.get(file, {}).get(key) for file, keys in KEEP.items() for key in keys}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", help="variants to (re)run; the others are kept from the results file")
    args = parser.parse_args()
    import os

    os.chdir(ROOT)
    from qlora.outputs import provenance
    from tools.report import experiment_rows

    out = ROOT / "benchmarks/results/lora-variants.json"
    old = kept(json.loads(out.read_text()), "variants") if out.exists() and args.only else {}
    variants = {}
    for name, overrides in VARIANTS.items():
        if args.only and name not in args.only:
            if name in old:
                variants[name] = old[name]
            continue
        exp = "variant-" + name.split(" (")[0].replace(" ", "-")
        force = [] if overrides else ["-f"]  # the default: rerun although nothing changed
        print(f"bench_variants: {exp}: {' '.join(overrides)}", flush=True)
        sets = [a for o in overrides for a in ("-S", o)]
        subprocess.run(["dvc", "exp", "remove", exp], capture_output=True)  # a rerun replaces it
        result = subprocess.run(["dvc", "exp", "run", "--temp", "-n", exp, *force, *sets, "evaluate"],
                                capture_output=True, text=True)
        if result.returncode:
            variants[name] = dict(overrides=overrides, error=(result.stderr.strip().splitlines() or ["?"])[-1][-400:])
            print(f"bench_variants: {exp} failed: {variants[name]['error']}", flush=True)
            continue
        row = next(r for r in experiment_rows(names=[exp]) if r["name"] == exp)
        variants[name] = stamp(dict(overrides=overrides, experiment=exp, **figures(row["metrics"])),
                               command_line=command([sys.argv[0], "--only", name]))
    out.write_text(json.dumps(dict(variants=variants, **provenance()), indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
