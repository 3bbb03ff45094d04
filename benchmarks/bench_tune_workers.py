"""One study of the default run by N workers against the same budget run by one worker, on this machine.

    python benchmarks/bench_tune_workers.py [--workers 2] [--trials 6] [--study val-accuracy]

Needs the default reproduced and committed (`make repro`, then commit): each worker is a clone of
this repo (git clone, its DVC cache this repo's), as it would be on its own machine. The study is
kept in a real PostgreSQL (tools/pgserver.py), its objective the val task metric with the median
pruner (the study file below); each finished trial is pushed to this repo (`push: origin`), so its
experiment can be compared and applied here. Then the same budget with one worker, as study
<study>-1w. Writes benchmarks/results/tune-workers.json: both studies' reports (trials, pruned,
wall time), the machine and versions.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.stamp import PIPELINE  # noqa: E402

# What the figures depend on (python -m tools.docs): the workers' search over the pipeline's experiments
CODE = ["benchmarks/bench_tune_workers.py", "tools/tune.py", "tools/report.py",
        "tools/pgserver.py", "tune.yaml", *PIPELINE]

STUDY = """\
study: {study}
storage: {storage}
objective: val_accuracy
trials: {trials}
seed: 7
startup_trials: 2
pruner: median
push: origin
heartbeat_seconds: 30
space:
  train.learning_rate: loguniform 1e-4 3e-3
  lora.r: choice [4, 8, 16]
  lora.dropout: uniform 0 0.2
"""


def sh(cmd, cwd, **kw):
    return subprocess.run(cmd, cwd=cwd, check=True, text=True, capture_output=True, **kw).stdout


def make_clone(dest, remote):
    sh(["git", "clone", "-q", str(ROOT), str(dest)], dest.parent)
    sh(["dvc", "cache", "dir", "--local", str(ROOT / ".dvc/cache")], dest)
    sh(["dvc", "remote", "add", "--local", "-d", "bench", str(remote)], dest)
    sh(["dvc", "checkout", "-q"], dest)
    return dest


def run_study(name, workers, trials, storage, scratch):
    config = scratch / f"{name}.yaml"
    config.write_text(STUDY.format(study=name, storage=storage, trials=trials))
    clones = [make_clone(scratch / f"{name}-w{i}", scratch / "dvc-remote") for i in range(workers)]
    start = time.time()
    procs = [subprocess.Popen([sys.executable, "-m", "tools.tune", "--config", str(config)], cwd=c,
                              stdout=open(scratch / f"{c.name}.log", "w"), stderr=subprocess.STDOUT) for c in clones]
    codes = [p.wait() for p in procs]
    seconds = round(time.time() - start, 1)
    if any(codes):
        raise SystemExit(f"a worker of {name} failed: see {scratch}/{name}-w*.log")
    sh([sys.executable, "-m", "tools.tune", "report", "--config", str(config)], clones[0])
    report = json.loads((clones[0] / "reports/tune" / f"{name}.json").read_text())
    return dict(report, workers=workers, process_seconds=seconds)


def main():
    from benchmarks.stamp import stamp
    from qlora.outputs import provenance, write_json

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--study", default="val-accuracy")
    args = parser.parse_args()
    if sh(["git", "status", "--porcelain", "--untracked-files=no"], ROOT).strip():
        raise SystemExit("commit first: each worker clones the committed repo")
    scratch = Path(tempfile.mkdtemp(prefix="tune-bench-"))
    storage = sh([sys.executable, "-W", "ignore", "-m", "tools.pgserver", str(scratch / "pg")], ROOT).strip()
    try:
        many = run_study(args.study, args.workers, args.trials, storage, scratch)
        one = run_study(f"{args.study}-1w", 1, args.trials, storage, scratch)
    finally:
        sh([sys.executable, "-W", "ignore", "-m", "tools.pgserver", str(scratch / "pg"), "--stop"], ROOT)
    many, one = stamp(many), stamp(one)  # one command measures both: each study keeps its run's provenance
    result = dict(studies=[many, one], speedup=round(one["process_seconds"] / many["process_seconds"], 3),
                  cores=os.cpu_count(), **provenance())
    write_json(ROOT / "benchmarks/results/tune-workers.json", result)
    print(f"{args.workers} workers: {many['process_seconds']} s; 1 worker: {one['process_seconds']} s "
          f"for {args.trials} trials each ({result['speedup']}x)")


if __name__ == "__main__":
    main()
