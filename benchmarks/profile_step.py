"""Where one optimizer step of our train stage spends its time: a torch.profiler table.

    python benchmarks/profile_step.py [--warmup 3] [--steps 3] [-S train.batch_size=4 ...]

Builds the train stage's own SFTTrainer (stages/train.py `build_trainer`) from
params.yaml, with `-S key=value` overrides as `dvc exp run -S` takes them; runs
`--warmup` steps, then times `--steps` more and profiles the last one. Prints the
wall seconds per step and the operators by self CPU time (CUDA time on a GPU), and writes
them to `benchmarks/results/<--name>.json` with the machine, versions, commit and date
(benchmarks/README.md renders it, make docs). Needs a reproduced project (`make repro`);
trains only under a temporary folder.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.stamp import TRAIN_STAGE, UPSTREAM  # noqa: E402

CODE = ["benchmarks/profile_step.py", "benchmarks/scratch.py", *TRAIN_STAGE, *UPSTREAM]  # (python -m tools.docs)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--warmup", type=int, default=3, help="steps before timing starts")
    parser.add_argument("--steps", type=int, default=3, help="steps timed; the last is profiled")
    parser.add_argument("--rows", type=int, default=25, help="operators listed")
    parser.add_argument("--name", default="profile-step", help="the results file: benchmarks/results/NAME.json")
    parser.add_argument("-S", dest="overrides", action="append", default=[], help="key=value, as dvc exp run -S")
    args = parser.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    from benchmarks.scratch import write_params
    from qlora.params import parse_params
    from stages.train import build_trainer

    total = args.warmup + args.steps
    gpu = torch.cuda.is_available()

    class Profile(TrainerCallback):
        def __init__(self):
            self.times, self.prof = [], None

        def on_step_begin(self, args_, state, control, **kwargs):
            if gpu:
                torch.cuda.synchronize()
            self.started = time.perf_counter()
            if state.global_step == total - 1:
                activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
                self.prof = profile(activities=activities, profile_memory=True)
                self.prof.__enter__()

        def on_step_end(self, args_, state, control, **kwargs):
            if gpu:
                torch.cuda.synchronize()
            if self.prof and state.global_step == total:
                self.prof.__exit__(None, None, None)
            if state.global_step > args.warmup:
                self.times.append(time.perf_counter() - self.started)

    with tempfile.TemporaryDirectory(prefix="qlora-profile-") as tmp:
        p = parse_params(write_params(Path(tmp), [f"train.max_steps={total}", "train.eval_steps=100000",
                                                  "train.logging_steps=1", *args.overrides]))
        callback = Profile()
        trainer = build_trainer(p, Path(tmp) / "out", [callback])
        trainer.args.eval_on_start = False
        trainer.train()

    from benchmarks.stamp import command
    from qlora.outputs import provenance

    sort = "self_cuda_time_total" if gpu else "self_cpu_time_total"
    averages = callback.prof.key_averages()
    print(averages.table(sort_by=sort, row_limit=args.rows))
    tokens = trainer.state.num_input_tokens_seen
    per_step = sum(callback.times) / len(callback.times)
    print(f"{per_step:.3f} s per step over {len(callback.times)} steps after {args.warmup} warm-up; {tokens} "
          f"non-padding tokens in all {total} steps; overrides: {' '.join(args.overrides) or 'none'}")
    whole = sum(getattr(e, sort) for e in averages)
    top = sorted(averages, key=lambda e: getattr(e, sort), reverse=True)[: args.rows]
    result = dict(seconds_per_step=round(per_step, 3), steps_timed=len(callback.times), warmup=args.warmup,
                  tokens_per_step=round(tokens / total), overrides=args.overrides, time=sort,
                  operators=[dict(name=e.key, seconds=round(getattr(e, sort) / 1e6, 4),
                                  share=round(getattr(e, sort) / whole, 4), calls=e.count) for e in top],
                  **provenance(), command=command())
    out = ROOT / "benchmarks/results" / f"{args.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
