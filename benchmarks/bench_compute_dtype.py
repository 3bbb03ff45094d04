"""The default's train stage at each quantize.compute_dtype, on this CPU as it is and with its kernels
capped at AVX2 (a CPU without native bf16): tokens/s, peak memory and the final loss.

    python benchmarks/bench_compute_dtype.py [--steps 8] [--capped-bf16-steps 2] [--seeds 3]

Each run is the train stage (bench_train.py's `ours`: stages/train.py on a scratch copy of params.yaml,
timed by its whole training loop) for `--steps` optimizer steps, one after the other:
- as is: `auto`, forced `bfloat16`, forced `float32`; and forced bf16 with `--seeds` seeds in all, whose
  final losses' spread is the seed noise floor the other final losses are held to;
- capped at AVX2 (ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS, ATEN_CPU_CAPABILITY, as
  bench_matmul_dtype.py --isa avx2 sets them): `auto`, forced `float32`, and forced `bfloat16` for only
  `--capped-bf16-steps` steps, since that path runs at a few tokens/s (its tokens/s is per step all the same;
  its loss is not compared).
Writes `benchmarks/results/compute-dtype.json`; the README's laptop line and docs/levers.md render from it.
Needs a reproduced project (`make repro`).
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

CODE = ["benchmarks/bench_compute_dtype.py", "benchmarks/bench_train.py", "benchmarks/scratch.py",
        *TRAIN_STAGE, *UPSTREAM]
AVX2 = {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
SEED = 42  # the default's train.seed; the floor's other seeds follow it


def run(scratch, steps, dtype, env, seed=SEED):
    r = ours(scratch, steps, [f"quantize.compute_dtype={dtype}", f"train.seed={seed}"], env)
    train = json.loads((scratch / "ours/metrics/train.json").read_text())
    row = dict(compute_dtype=dtype, resolved=train["compute_dtype"], reason=train["compute_dtype_reason"],
               steps=steps, seed=seed, tokens_per_second=round(r["tokens_per_second"], 1),
               rss_mb=round(r["rss_mb"]), final_loss=round(r["final_loss"], 4), mfu=train["mfu"])
    print(f"{'capped' if env else 'as is':6s} {dtype:8s} -> {row['resolved']:8s} seed {seed}: "
          f"{row['tokens_per_second']:6.1f} tokens/s  {row['rss_mb']} MB  loss {row['final_loss']}", flush=True)
    return stamp(row)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per run")
    parser.add_argument("--capped-bf16-steps", type=int, default=2, help="steps of the slow capped bf16 run")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of forced bf16, as is: the noise floor")
    args = parser.parse_args()
    for needed in ("models/quantized", "data/tokenized"):
        if not (ROOT / needed).exists():
            raise SystemExit(f"{needed} is missing: run `make repro` (or `dvc pull`) first")

    with tempfile.TemporaryDirectory(prefix="qlora-dtype-") as tmp:
        scratch = Path(tmp)
        native = {dtype: run(scratch, args.steps, dtype, {}) for dtype in ("auto", "bfloat16", "float32")}
        capped = {"auto": run(scratch, args.steps, "auto", AVX2),
                  "float32": run(scratch, args.steps, "float32", AVX2),
                  "bfloat16": run(scratch, args.capped_bf16_steps, "bfloat16", AVX2)}
        seeds = [native["bfloat16"]] + [run(scratch, args.steps, "bfloat16", {}, SEED + i)
                                        for i in range(1, args.seeds)]
    losses = [r["final_loss"] for r in seeds]
    floor = round(max(losses) - min(losses), 4)
    auto = capped["auto"]
    result = dict(
        steps=args.steps, capped_bf16_steps=args.capped_bf16_steps, isa_cap=AVX2,
        native=native, capped=capped,
        seed_floor=dict(final_losses=losses, spread=floor, seeds=args.seeds, mean=round(statistics.mean(losses), 4)),
        # what auto gives on a CPU without native bf16, against what the same CPU did before auto:
        capped_auto_vs_bf16=round(auto["tokens_per_second"] / capped["bfloat16"]["tokens_per_second"], 2),
        capped_auto_vs_native_auto=round(auto["tokens_per_second"] / native["auto"]["tokens_per_second"], 3),
        capped_auto_memory_vs_native_auto=round(auto["rss_mb"] / native["auto"]["rss_mb"], 3),
        capped_auto_loss_difference=round(abs(auto["final_loss"] - native["bfloat16"]["final_loss"]), 4),
        **provenance(),
    )
    result["capped_auto_loss_within_floor"] = result["capped_auto_loss_difference"] <= floor
    out = ROOT / "benchmarks/results/compute-dtype.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}: capped auto {result['capped_auto_vs_bf16']}x capped bf16, "
          f"{result['capped_auto_vs_native_auto']}x native auto; loss difference "
          f"{result['capped_auto_loss_difference']} (seed floor {floor})")


if __name__ == "__main__":
    main()
